//! Peers and fixtures for notification tests: a store-level environment that drives the
//! [`Dispatcher`] directly (time injected), a real HTTP webhook receiver (axum on port 0),
//! the shared maildev SMTP server, and the independent `standardwebhooks` Python verifier.

use super::{Backend, ROOT_KEY, Sql, TestDb};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use byokd::config::{Config, RootKey};
use byokd::notify::outbox::Dispatcher;
use byokd::seal::Sealer;
use byokd::store::{Channel, NewOutbox, NewTenant, NewWebhook, Store};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::SecretString;
use serde_json::{Value, json};
use sha2::Sha256;
use sqlx::PgPool;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;
use zeroize::Zeroizing;

/// A fixed webhook secret (24 bytes).
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

pub fn sealer() -> Arc<Sealer> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(ROOT_KEY)
        .expect("root key");
    let key: [u8; 32] = raw.try_into().expect("32 bytes");
    Arc::new(Sealer::new(&RootKey(Zeroizing::new(key)), "webhook-secret"))
}

/// A migrated database and a store, without the daemon: tests call the dispatcher.
pub struct NotifyEnv {
    pub db: TestDb,
    pub store: Store,
    /// PostgreSQL-only assertions (see [`super::no_postgres`]); [`NotifyEnv::sql`] runs on
    /// either back end.
    pub pool: PgPool,
    pub sqlite: Option<sqlx::SqlitePool>,
    pub sealer: Arc<Sealer>,
    pub mail_dir: std::path::PathBuf,
}

impl NotifyEnv {
    pub async fn new() -> NotifyEnv {
        Self::new_on(Backend::Postgres).await
    }

    pub async fn new_on(backend: Backend) -> NotifyEnv {
        let db = TestDb::create_on(backend).await;
        let store = Store::connect(&db.url, 8).await.expect("store");
        store.migrate().await.expect("migrate");
        let (pool, sqlite) = match backend {
            Backend::Postgres => (PgPool::connect(&db.url).await.expect("pool"), None),
            Backend::Sqlite => (
                super::no_postgres(),
                Some(sqlx::SqlitePool::connect(&db.url).await.expect("pool")),
            ),
        };
        let mail_dir = std::env::temp_dir().join(format!("byokd-mail-{}", db.name));
        NotifyEnv {
            db,
            store,
            pool,
            sqlite,
            sealer: sealer(),
            mail_dir,
        }
    }

    /// Test defaults: loopback allowlisted, short timeouts, maildev as SMTP.
    pub fn config(&self) -> Config {
        let mut config = super::test_config(&self.db.url, super::unique_amqp());
        config.smtp_url = Some(SecretString::from(format!("smtp://{}", maildev_smtp())));
        config.mail_from = "byokd@platform.example".into();
        config.mail_dir = self.mail_dir.clone();
        config.webhook_allow_cidrs = Some("127.0.0.0/8,::1".into());
        config.notify.webhook_timeout_ms = 2_000;
        config.notify.smtp_timeout_ms = 5_000;
        config.notify.lease_secs = 30;
        config
    }

    pub fn dispatcher(&self, tweak: impl FnOnce(&mut Config)) -> Dispatcher {
        let mut config = self.config();
        tweak(&mut config);
        Dispatcher::new(self.store.clone(), &config, self.sealer.clone()).expect("dispatcher")
    }

    /// A tenant with these contacts and one webhook endpoint per URL; returns endpoint ids.
    pub async fn tenant(&self, id: &str, contacts: &[String], urls: &[String]) -> Vec<Uuid> {
        let webhooks: Vec<NewWebhook> = urls
            .iter()
            .map(|url| NewWebhook {
                id: Uuid::now_v7(),
                url: url.clone(),
                secret_sealed: self.sealer.seal(&SecretString::from(SECRET)),
            })
            .collect();
        let ids = webhooks.iter().map(|w| w.id).collect();
        self.store
            .create_tenant(&NewTenant {
                id: id.to_owned(),
                name: format!("Tenant {id}"),
                contacts: contacts.to_vec(),
                webhooks,
            })
            .await
            .expect("tenant");
        ids
    }

    /// Writes one notification row the way the lifecycle code does; returns its id.
    pub async fn enqueue(
        &self,
        tenant: &str,
        channel: Channel,
        recipient: &str,
        kind: &str,
    ) -> Uuid {
        let id = Uuid::now_v7();
        let mut tx = self.store.begin().await.expect("begin");
        tx.enqueue(&[NewOutbox {
            id,
            tenant_id: Some(tenant.to_owned()),
            channel,
            recipient: recipient.to_owned(),
            kind: kind.to_owned(),
            dedupe_key: format!("{kind}:test:{id}:{}:{recipient}", channel.as_str()),
            payload: payload(tenant, kind),
        }])
        .await
        .expect("enqueue");
        tx.commit().await.expect("commit");
        id
    }

    /// A raw-SQL query on the test's database, whichever back end (see [`Sql`]).
    pub fn sql(&self, sql: &str) -> Sql<'_> {
        Sql::on(&self.pool, self.sqlite.as_ref(), sql)
    }

    pub async fn row(&self, id: Uuid) -> Row {
        let r = &self
            .sql(
                "SELECT status, attempts, last_error, next_attempt_at FROM outbox
                 WHERE CAST(id AS TEXT) = $1",
            )
            .bind(id)
            .rows()
            .await[0];
        Row {
            status: r[0].as_str().expect("status").to_owned(),
            attempts: r[1]
                .as_i64()
                .and_then(|a| i32::try_from(a).ok())
                .expect("attempts"),
            last_error: r[2].as_str().map(str::to_owned),
            next_attempt_at: r[3]
                .as_str()
                .and_then(|t| t.parse().ok())
                .expect("next_attempt_at"),
        }
    }

    /// The attempt log of a row: (outcome, status code, detail).
    pub async fn attempts(&self, id: Uuid) -> Vec<(String, Option<i32>, Option<String>)> {
        self.sql(
            "SELECT outcome, status_code, detail FROM notification_attempts
             WHERE CAST(outbox_id AS TEXT) = $1 ORDER BY id",
        )
        .bind(id)
        .rows()
        .await
        .into_iter()
        .map(|r| {
            (
                r[0].as_str().expect("outcome").to_owned(),
                r[1].as_i64().and_then(|c| i32::try_from(c).ok()),
                r[2].as_str().map(str::to_owned),
            )
        })
        .collect()
    }

    pub async fn cleanup(self) {
        self.pool.close().await;
        if let Some(pool) = &self.sqlite {
            pool.close().await;
        }
        let _ = std::fs::remove_dir_all(&self.mail_dir);
        self.db.drop_db().await;
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub next_attempt_at: DateTime<Utc>,
}

/// The catalog's sample body of `kind` for `tenant` (key `key-<tenant>`).
pub fn payload(tenant: &str, kind: &str) -> Value {
    super::catalog::body(tenant, kind)
}

// ---------------------------------------------------------------------------------------
// Webhook receiver

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }
}

/// What the receiver answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    StatusWith(u16, Vec<(&'static str, String)>),
    /// Answers 200 after this long.
    Slow(Duration),
}

#[derive(Default)]
struct ReceiverState {
    received: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Option<Reply>>,
}

/// A real HTTP server on 127.0.0.1:0 that records requests and answers from a script
/// (then 200, or the default reply).
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<ReceiverState>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let state = Arc::new(ReceiverState::default());
        let app = Router::new().fallback(receive).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().expect("lock").extend(replies);
    }

    pub fn set_default(&self, reply: Reply) {
        *self.state.default.lock().expect("lock") = Some(reply);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("lock").clone()
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.received.lock().expect("lock").push(Received {
        path: uri.path().to_owned(),
        headers,
        body,
    });
    let reply = state.script.lock().expect("lock").pop_front();
    let reply = reply
        .or_else(|| state.default.lock().expect("lock").clone())
        .unwrap_or(Reply::Status(200));
    match reply {
        Reply::Status(s) => StatusCode::from_u16(s).expect("status").into_response(),
        Reply::StatusWith(s, headers) => {
            let mut r = StatusCode::from_u16(s).expect("status").into_response();
            for (k, v) in headers {
                r.headers_mut().insert(k, v.parse().expect("header"));
            }
            r
        }
        Reply::Slow(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK.into_response()
        }
    }
}

/// Verifies a request per Standard Webhooks v1, independently of byokd's signer.
pub fn verify_signature(r: &Received, secret: &str) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").expect("prefix"))
        .expect("base64");
    let signed = format!(
        "{}.{}.{}",
        r.header("webhook-id"),
        r.header("webhook-timestamp"),
        String::from_utf8_lossy(&r.body)
    );
    r.header("webhook-signature").split(' ').any(|sig| {
        let Some(b64) = sig.strip_prefix("v1,") else {
            return false;
        };
        let Ok(expected) = base64::engine::general_purpose::STANDARD.decode(b64) else {
            return false;
        };
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("key");
        mac.update(signed.as_bytes());
        mac.verify_slice(&expected).is_ok()
    })
}

/// Verifies with the `standardwebhooks` package from PyPI (a third party's verifier).
pub fn verify_with_python(r: &Received, secret: &str) -> Result<(), String> {
    let input = json!({
        "secret": secret,
        "body": String::from_utf8_lossy(&r.body),
        "headers": {
            "webhook-id": r.header("webhook-id"),
            "webhook-timestamp": r.header("webhook-timestamp"),
            "webhook-signature": r.header("webhook-signature"),
        },
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/verify_webhook.py");
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("python3: {e}"))?;
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

// ---------------------------------------------------------------------------------------
// maildev

/// maildev's SMTP address (shared by all tests; each test uses its own recipients).
pub fn maildev_smtp() -> String {
    std::env::var("BYOKD_TEST_MAILDEV_SMTP").unwrap_or_else(|_| "127.0.0.1:11025".into())
}

pub fn maildev_api() -> String {
    std::env::var("BYOKD_TEST_MAILDEV_API").unwrap_or_else(|_| "http://127.0.0.1:11080".into())
}

/// Starts the shared maildev if nothing answers (scripts/test normally has), then waits.
pub async fn ensure_maildev() {
    let http = super::http_client();
    let api = format!("{}/email", maildev_api());
    if http.get(&api).send().await.is_ok() {
        return;
    }
    let bin = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/.ci/maildev/node_modules/.bin/maildev"
    );
    let smtp_port = maildev_smtp().rsplit_once(':').expect("port").1.to_owned();
    let web_port = maildev_api().rsplit_once(':').expect("port").1.to_owned();
    // Left running like the database: a second test binary that races here fails to bind
    // and exits, and the first one serves both.
    let _ = std::process::Command::new(bin)
        .args([
            "--ip",
            "127.0.0.1",
            "--web-ip",
            "127.0.0.1",
            "-s",
            &smtp_port,
            "-w",
            &web_port,
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    super::wait_for("maildev", Duration::from_secs(30), || {
        let http = http.clone();
        let api = api.clone();
        async move {
            http.get(&api)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
}

/// Emails maildev holds for `to`.
pub async fn emails_to(to: &str) -> Vec<Value> {
    let all: Vec<Value> = super::http_client()
        .get(format!("{}/email", maildev_api()))
        .send()
        .await
        .expect("maildev")
        .json()
        .await
        .expect("json");
    all.into_iter()
        .filter(|m| {
            m["to"]
                .as_array()
                .is_some_and(|to_list| to_list.iter().any(|a| a["address"] == to))
        })
        .collect()
}

/// A unique mailbox for one test.
pub fn mailbox(tag: &str) -> String {
    format!(
        "{tag}-{}@tenant.example",
        &Uuid::new_v4().simple().to_string()[..10]
    )
}
