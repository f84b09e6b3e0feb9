//! A test's own corner of the shared OpenBao dev server (root token `root`, started by
//! `scripts/services --test-peers`): a Transit mount of its own, keys in it, policies and
//! tokens scoped to it, and byokd's Vault settings or client pointed at it. Tests run in
//! parallel on the one server, so nothing here touches anything outside the test's mount and
//! the policies it made; [`Vault::cleanup`] removes both.

use byokd::config::VaultSettings;
use byokd::kms::VaultKms;
use serde_json::{Value, json};
use std::sync::Mutex;
use uuid::Uuid;

/// The OpenBao dev server's address (`BYOKD_TEST_VAULT_ADDR`, else the local default).
pub fn vault_addr() -> String {
    std::env::var("BYOKD_TEST_VAULT_ADDR").unwrap_or_else(|_| "http://127.0.0.1:8200".to_owned())
}

/// byokd's Vault settings for the server at `address` (OpenBao, or a fault injector in front
/// of it) with `token` on Transit mount `mount`; a `timeout_secs` of `None` keeps byokd's
/// default.
pub fn settings(
    address: &str,
    token: &str,
    mount: &str,
    timeout_secs: Option<u64>,
) -> VaultSettings {
    let mut settings = json!({ "address": address, "token": token, "mount": mount });
    if let Some(timeout) = timeout_secs {
        settings["timeout_secs"] = json!(timeout);
    }
    serde_json::from_value(settings).expect("vault settings")
}

/// byokd's Vault client with [`settings`].
pub fn client(address: &str, token: &str, mount: &str, timeout_secs: Option<u64>) -> VaultKms {
    VaultKms::new(&settings(address, token, mount, timeout_secs)).expect("vault client")
}

/// A Transit mount of this test's own on the shared OpenBao dev server, and the policies made
/// for it; all removed by [`Vault::cleanup`].
pub struct Vault {
    pub addr: String,
    pub mount: String,
    pub http: reqwest::Client,
    policies: Mutex<Vec<String>>,
}

impl Vault {
    /// Mounts Transit at `transit-{prefix}-{random}`: the prefix tells which test file a
    /// mount left behind by an interrupted run belongs to.
    pub async fn new(prefix: &str) -> Vault {
        byokd::install_crypto_provider();
        let vault = Vault {
            addr: vault_addr(),
            mount: format!(
                "transit-{prefix}-{}",
                &Uuid::new_v4().simple().to_string()[..12]
            ),
            http: super::http_client(),
            policies: Mutex::new(Vec::new()),
        };
        vault
            .root(
                reqwest::Method::POST,
                &format!("sys/mounts/{}", vault.mount),
                Some(json!({ "type": "transit" })),
            )
            .await;
        vault
    }

    /// A request with the root token; panics unless it succeeds.
    pub async fn root(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self
            .http
            .request(method, format!("{}/v1/{path}", self.addr))
            .header("X-Vault-Token", "root");
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("OpenBao reachable");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(status.is_success(), "OpenBao {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Creates Transit key `name` in the mount (version 1).
    pub async fn create_key(&self, name: &str) {
        self.root(
            reqwest::Method::POST,
            &format!("{}/keys/{name}", self.mount),
            None,
        )
        .await;
    }

    /// Rotates key `name` at OpenBao, as an operator would; Vault sends no event for it.
    pub async fn rotate_key(&self, name: &str) {
        self.root(
            reqwest::Method::POST,
            &format!("{}/keys/{name}/rotate", self.mount),
            None,
        )
        .await;
    }

    /// The name of this mount's policy `name`.
    pub fn policy_name(&self, name: &str) -> String {
        format!("{}-{name}", self.mount)
    }

    /// A rule granting only `capabilities` on `path` (relative to the mount).
    pub fn rules(&self, path: &str, capabilities: &[&str]) -> String {
        format!(
            "path \"{}/{path}\" {{ capabilities = {} }}\n",
            self.mount,
            json!(capabilities)
        )
    }

    /// What byokd needs on the keys: read their metadata, encrypt and decrypt with them.
    /// No `create`, nothing outside the mount.
    pub fn full_rules(&self) -> String {
        [
            self.rules("keys/*", &["read"]),
            self.rules("encrypt/*", &["update"]),
            self.rules("decrypt/*", &["update"]),
        ]
        .concat()
    }

    /// Permission revoked: metadata still reads fine, encrypt and decrypt answer 403.
    pub fn read_only_rules(&self) -> String {
        self.rules("keys/*", &["read"])
    }

    /// Half revoked: byokd may still encrypt, but no longer decrypt (its DEKs are unreadable).
    pub fn encrypt_only_rules(&self) -> String {
        [
            self.rules("keys/*", &["read"]),
            self.rules("encrypt/*", &["update"]),
        ]
        .concat()
    }

    /// Writes (or rewrites) policy `name` with `rules`, as an operator would through the API.
    /// Tokens holding it see the change at once.
    pub async fn put_policy(&self, name: &str, rules: &str) {
        let policy = self.policy_name(name);
        self.root(
            reqwest::Method::PUT,
            &format!("sys/policies/acl/{policy}"),
            Some(json!({ "policy": rules })),
        )
        .await;
        let mut policies = self.policies.lock().expect("lock");
        if !policies.contains(&policy) {
            policies.push(policy);
        }
    }

    /// A token holding only policy `name` (no default policy), valid for an hour.
    pub async fn token(&self, name: &str) -> String {
        let created = self
            .root(
                reqwest::Method::POST,
                "auth/token/create",
                Some(json!({
                    "policies": [self.policy_name(name)],
                    "no_default_policy": true,
                    "ttl": "1h",
                })),
            )
            .await;
        created["auth"]["client_token"]
            .as_str()
            .expect("client token")
            .to_owned()
    }

    /// A token holding only `capabilities` on `path` (relative to the mount), through a policy
    /// `name` of its own.
    pub async fn capability_token(&self, name: &str, path: &str, capabilities: &[&str]) -> String {
        self.put_policy(name, &self.rules(path, capabilities)).await;
        self.token(name).await
    }

    /// What byokd's token should hold: use of the keys, no `create`, nothing outside the mount.
    pub async fn scoped_token(&self) -> String {
        self.capability_token("scoped", "*", &["read", "update"])
            .await
    }

    /// Revokes `token` at OpenBao: every request with it is denied from now on.
    pub async fn revoke_token(&self, token: &str) {
        self.root(
            reqwest::Method::POST,
            "auth/token/revoke",
            Some(json!({ "token": token })),
        )
        .await;
    }

    /// Status and body of an encrypt with `token`, straight at OpenBao.
    pub async fn try_encrypt(&self, token: &str, key: &str) -> (u16, String) {
        let r = self
            .http
            .post(format!("{}/v1/{}/encrypt/{key}", self.addr, self.mount))
            .header("X-Vault-Token", token)
            .json(&json!({ "plaintext": "aGVsbG8=" }))
            .send()
            .await
            .expect("OpenBao reachable");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    /// Status of a metadata read with `token`, straight at OpenBao.
    pub async fn try_read(&self, token: &str, key: &str) -> u16 {
        self.http
            .get(format!("{}/v1/{}/keys/{key}", self.addr, self.mount))
            .header("X-Vault-Token", token)
            .send()
            .await
            .expect("OpenBao reachable")
            .status()
            .as_u16()
    }

    /// byokd's settings for this mount, reached at `address` (OpenBao itself, or a proxy in
    /// front of it) with `token` and a 2 s request timeout, so a probe through a dead route
    /// gives up quickly.
    pub fn settings(&self, address: &str, token: &str) -> VaultSettings {
        settings(address, token, &self.mount, Some(2))
    }

    /// byokd's client for this mount, straight at OpenBao, with `token` and a 1 s timeout.
    pub fn kms(&self, token: &str) -> VaultKms {
        client(&self.addr, token, &self.mount, Some(1))
    }

    /// Removes the policies made for this mount, then the mount with its keys.
    pub async fn cleanup(self) {
        let policies = self.policies.lock().expect("lock").clone();
        for policy in policies {
            self.root(
                reqwest::Method::DELETE,
                &format!("sys/policies/acl/{policy}"),
                None,
            )
            .await;
        }
        self.root(
            reqwest::Method::DELETE,
            &format!("sys/mounts/{}", self.mount),
            None,
        )
        .await;
    }
}
