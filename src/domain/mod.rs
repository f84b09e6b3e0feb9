//! Pure domain types and the key/tenant state machine.
//!
//! Everything here is free of I/O so the rules that decide a tenant's access can be unit
//! tested exhaustively: [`kek::apply_event`] and [`kek::apply_observation`] move one KEK's
//! record, and [`kek::derive_access`] turns a tenant's keys and the clock into its access.
//! [`job`] says what a re-wrap job does, where it stands and which DEKs it moves.

/// A name that does not match any variant of a domain enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {name:?} (expected one of: {expected})")]
pub struct UnknownName {
    /// What kind of name it was meant to be.
    pub what: &'static str,
    /// The name as given.
    pub name: String,
    /// The accepted names, for the error message.
    pub expected: &'static str,
}

/// Declares a fieldless enum whose variants map one-to-one onto snake_case names, with
/// `as_str`, `Display`, `FromStr` and serde derived from that single table.
macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every variant.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The snake_case name used in events, the database and the API.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        // By hand: the derive would name the variants, not the snake_case names they
        // travel as.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$($text),+]))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {
            fn name() -> std::borrow::Cow<'static, str> {
                std::borrow::Cow::Borrowed(stringify!($name))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::domain::UnknownName;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err($crate::domain::UnknownName {
                        what: $what,
                        name: s.to_owned(),
                        expected: concat!($($text, " "),+),
                    }),
                }
            }
        }
    };
}

named_enum!(
    /// The KMS family a KEK lives in. Part of a KEK's identity: `(provider, key_ref)` is unique.
    Provider, "provider" {
        /// byokd's built-in keyring (embedded mode, tests, demos).
        Local => "local",
        /// AWS KMS.
        Aws => "aws",
        /// Azure Key Vault.
        Azure => "azure",
        /// Google Cloud KMS.
        Gcp => "gcp",
        /// HashiCorp Vault / OpenBao Transit.
        Vault => "vault",
    }
);

impl Provider {
    /// Whether an expired key of this provider can still decrypt.
    ///
    /// AWS keys with imported material go to `PendingImport` when the material expires and
    /// refuse every cryptographic operation, so expiry there is as final as disabling.
    /// Elsewhere (Azure `exp`, local keys) expiry only forbids new encryption.
    pub fn expiry_makes_unusable(self) -> bool {
        matches!(self, Provider::Aws)
    }

    /// Whether the KMS itself holds the key's expiry (and reports it when asked), so an
    /// observation settles it. Elsewhere (Vault, GCP) expiry is byokd's own record, set at
    /// registration and by expiry events.
    pub fn kms_holds_expiry(self) -> bool {
        matches!(self, Provider::Local | Provider::Aws | Provider::Azure)
    }

    /// Whether each key version has a state of its own at the KMS (GCP: a version is enabled,
    /// disabled, scheduled for destruction or destroyed by itself), so an event about one
    /// version is not an event about the key. The key's state is then its primary version's,
    /// and the other versions matter only for the DEKs still wrapped under them.
    pub fn versions_have_state(self) -> bool {
        matches!(self, Provider::Gcp)
    }
}

/// The tenant's IAM role byokd assumes to reach an AWS key: the usual cross-account BYOK
/// pattern, where the key's account trusts a role it controls and byokd's principal may
/// assume it. Set when the key is registered, never changed after.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AwsRole {
    /// `arn:<partition>:iam::<account>:role/<path><name>`.
    pub role_arn: String,
    /// The external id the role's trust policy requires (AWS: not a secret, a confused
    /// deputy guard).
    pub external_id: Option<String>,
}

impl AwsRole {
    /// Checks the role ARN's and external id's forms (as IAM and STS define them).
    ///
    /// # Errors
    ///
    /// One sentence naming what is wrong.
    pub fn new(role_arn: &str, external_id: Option<&str>) -> Result<AwsRole, String> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || "+=,.@_-/".contains(c);
        let parts: Vec<&str> = role_arn.splitn(6, ':').collect();
        let ok = matches!(parts.as_slice(), ["arn", partition, "iam", "", account, resource]
        if !partition.is_empty()
            && partition.chars().all(|c| c.is_ascii_lowercase() || c == '-')
            && account.len() == 12
            && account.chars().all(|c| c.is_ascii_digit())
            && resource.strip_prefix("role/").is_some_and(|name| {
                !name.is_empty() && name.len() <= 512 && name.chars().all(allowed)
            }));
        if !ok {
            return Err(format!(
                "role_arn {role_arn:?} is not an IAM role ARN (arn:aws:iam::<12-digit account>:role/<name>)"
            ));
        }
        if let Some(id) = external_id
            && (!(2..=1224).contains(&id.len())
                || id
                    .chars()
                    .any(|c| !(c.is_ascii_alphanumeric() || "+=,.@:/_-".contains(c))))
        {
            return Err(
                "external_id must be 2 to 1224 of letters, digits and +=,.@:/_-".to_owned(),
            );
        }
        Ok(AwsRole {
            role_arn: role_arn.to_owned(),
            external_id: external_id.map(str::to_owned),
        })
    }
}

pub mod event;
pub mod job;
pub mod kek;

pub use event::{EventKind, LifecycleEvent, Origin};
pub use job::{JobKind, JobState};
pub use kek::{Access, BlockCause, Blocked, KekStatus, KeyState, Observation};
