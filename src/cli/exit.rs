//! The CLI's exit codes: what a script or an orchestrator calling `byokd` can tell apart
//! without reading the message (README, "Exit codes").
//!
//! The code is read off the error's chain, so commands keep returning plain `anyhow` errors
//! and only the few that mean "usage" say so with [`Usage`].

use crate::broker::AmqpError;
use crate::config::ConfigError;
use crate::kms::KmsError;
use crate::store::StoreError;

/// A check found a failure (`deks verify`, `audit verify`, a failed sweep), or anything not
/// classified below.
pub const FAILURE: u8 = 1;
/// The command line is wrong (clap's own usage errors exit 2 as well).
pub const USAGE: u8 = 2;
/// The configuration is missing or invalid.
pub const CONFIG: u8 = 3;
/// A dependency (database, broker, a KMS) cannot be reached: retrying later may succeed.
pub const UNAVAILABLE: u8 = 4;

/// An error in what the user asked for, found after parsing (an unknown schedule name, say).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// The exit code for `error`: the first cause in its chain that says what kind it is.
pub fn code(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if cause.is::<ConfigError>() {
            return CONFIG;
        }
        if cause.is::<crate::sweeps::ScheduleError>() {
            return CONFIG;
        }
        if cause.is::<crate::standalone::StandaloneError>() {
            return CONFIG;
        }
        // Its variants are transparent: the inner error is not a separate link of the chain.
        if let Some(e) = cause.downcast_ref::<crate::daemon::RunError>() {
            use crate::daemon::RunError as R;
            match e {
                R::Config(_) | R::Schedule(_) | R::Kms(_) | R::Notify(_) => return CONFIG,
                R::Store(e) if e.is_transient() => return UNAVAILABLE,
                R::AuditKey(crate::audit::ChainKeyError::Sealed(_)) => return CONFIG,
                _ => continue,
            }
        }
        if let Some(crate::audit::ChainKeyError::Sealed(_)) = cause.downcast_ref() {
            // Sealed under a root key that is not configured.
            return CONFIG;
        }
        if let Some(e) = cause.downcast_ref::<crate::transfer::TransferError>() {
            use crate::transfer::TransferError as T;
            match e {
                T::NotEmpty(_) => return USAGE,
                T::WrongRootKey => return CONFIG,
                T::Archive(_) => return FAILURE,
                // Transparent: the store error is not a link of its own.
                T::Store(e) if e.is_transient() => return UNAVAILABLE,
                T::Io(_) | T::Store(_) => continue,
            }
        }
        if cause.is::<Usage>() {
            return USAGE;
        }
        if let Some(e) = cause.downcast_ref::<crate::sweeps::SweepError>()
            && matches!(e, crate::sweeps::SweepError::UnknownSchedule(_))
        {
            return USAGE;
        }
        if let Some(e) = cause.downcast_ref::<StoreError>() {
            if e.is_transient() {
                return UNAVAILABLE;
            }
            continue;
        }
        if let Some(e) = cause.downcast_ref::<KmsError>() {
            if e.is_transient() {
                return UNAVAILABLE;
            }
            continue;
        }
        if let Some(e) = cause.downcast_ref::<AmqpError>() {
            // A publish no queue takes is the topology's fault, not the broker's health.
            if !matches!(e, AmqpError::Unroutable(_)) {
                return UNAVAILABLE;
            }
            continue;
        }
        if cause.is::<lapin::Error>() {
            return UNAVAILABLE;
        }
        if let Some(e) = cause.downcast_ref::<sqlx::Error>()
            && crate::store::is_transient_sqlx(e)
        {
            return UNAVAILABLE;
        }
    }
    FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_first_classified_cause() {
        let config = anyhow::Error::new(ConfigError(vec!["BYOKD_DATABASE_URL is not set".into()]));
        assert_eq!(code(&config), CONFIG);
        assert_eq!(code(&config.context("cannot start")), CONFIG);
        assert_eq!(
            code(&anyhow::Error::new(Usage("no such job".into()))),
            USAGE
        );
        let down = StoreError::Unavailable(sqlx::Error::PoolTimedOut);
        assert_eq!(code(&anyhow::Error::new(down)), UNAVAILABLE);
        let broker = anyhow::Error::new(AmqpError::Unavailable("refused".into()))
            .context("cannot reach the broker");
        assert_eq!(code(&broker), UNAVAILABLE);
        assert_eq!(
            code(&anyhow::Error::new(AmqpError::Unroutable("x".into()))),
            FAILURE
        );
        assert_eq!(
            code(&anyhow::anyhow!("3 of 9 DEKs failed verification")),
            FAILURE
        );
        let conflict = StoreError::Conflict("taken".into());
        assert_eq!(code(&anyhow::Error::new(conflict)), FAILURE);
        use crate::transfer::TransferError as T;
        assert_eq!(code(&anyhow::Error::new(T::NotEmpty("x".into()))), USAGE);
        assert_eq!(code(&anyhow::Error::new(T::WrongRootKey)), CONFIG);
        assert_eq!(code(&anyhow::Error::new(T::Archive("x".into()))), FAILURE);
        let down = T::Store(StoreError::Unavailable(sqlx::Error::PoolTimedOut));
        assert_eq!(code(&anyhow::Error::new(down)), UNAVAILABLE);
    }
}
