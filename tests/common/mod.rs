//! Shared harness for integration tests: each test gets its own database (PostgreSQL, or a
//! SQLite file for the standalone back end: [`Backend`]), its own AMQP exchange and queue
//! names on the real broker, and an in-process daemon on port 0.
//!
//! Tests that run on both back ends are written once, taking a [`Backend`], and
//! [`on_both_backends!`] makes a `NAME::postgres` and a `NAME::sqlite` test of each. Their
//! raw-SQL assertions go through [`TestApp::sql`], which runs on either database.
#![allow(dead_code, missing_docs)]

pub mod aws;
pub mod azure;
pub mod catalog;
pub mod gcp;
pub mod http_fault;
pub mod notify;
pub mod proxy;
pub mod sweeps;
pub mod vault;

use byokd::config::{AmqpSettings, Config};
use byokd::daemon::RunError;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub const TOKEN: &str = "test-admin-token-0123456789";
/// A fixed root key for tests (base64 of 32 bytes of 0x42).
pub const ROOT_KEY: &str = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";

pub fn pg_admin_url() -> String {
    std::env::var("BYOKD_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn amqp_url() -> String {
    std::env::var("BYOKD_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// An HTTP client for tests. reqwest is built without a default TLS crypto provider (byokd
/// uses ring, avoiding aws-lc-sys), so the process needs one installed before any client.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// The database back end a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A PostgreSQL database of its own on the test server.
    Postgres,
    /// A SQLite file of its own in the temporary directory (standalone mode's store).
    Sqlite,
}

/// Makes `NAME::postgres` and `NAME::sqlite` tests of `async fn NAME(backend: Backend)`,
/// with the given test attribute (`#[tokio::test]` when none is given).
#[macro_export]
macro_rules! on_both_backends {
    ($test:ident) => {
        $crate::on_both_backends!($test, #[tokio::test]);
    };
    ($test:ident, #[$($attr:tt)+]) => {
        mod $test {
            #[$($attr)+]
            async fn postgres() {
                super::$test($crate::common::Backend::Postgres).await
            }

            #[$($attr)+]
            async fn sqlite() {
                super::$test($crate::common::Backend::Sqlite).await
            }
        }
    };
}

/// The `pool` of a test on SQLite: a PostgreSQL pool that never connects (its host names the
/// mistake should a PostgreSQL-only assertion use it).
pub fn no_postgres() -> PgPool {
    PgPool::connect_lazy("postgres://sqlite-test-has-no-postgres-pool.invalid/none")
        .expect("lazy pool")
}

/// A fresh, empty database; dropped by [`TestDb::drop_db`].
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub backend: Backend,
}

impl TestDb {
    pub async fn create() -> TestDb {
        Self::create_on(Backend::Postgres).await
    }

    /// A fresh database on `backend` (for SQLite: a new file; the store creates it).
    pub async fn create_on(backend: Backend) -> TestDb {
        byokd::install_crypto_provider();
        if backend == Backend::Sqlite {
            let dir = std::env::temp_dir().join("byokd-test-sqlite");
            std::fs::create_dir_all(&dir).expect("create SQLite test dir");
            let name = dir
                .join(format!(
                    "byokd_t_{}_{}.db",
                    Utc::now().timestamp(),
                    &Uuid::new_v4().simple().to_string()[..16]
                ))
                .to_string_lossy()
                .into_owned();
            let url = format!("sqlite://{name}");
            return TestDb { name, url, backend };
        }
        // The creation time in the name lets scripts/test drop leftovers of interrupted runs
        // without touching the databases of a run still going on.
        let name = format!(
            "byokd_t_{}_{}",
            Utc::now().timestamp(),
            &Uuid::new_v4().simple().to_string()[..16]
        );
        let admin = PgPool::connect(&pg_admin_url())
            .await
            .expect("admin connection");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let base = pg_admin_url();
        let url = format!(
            "{}/{name}",
            base.rsplit_once('/').expect("url has a path").0
        );
        TestDb { name, url, backend }
    }

    pub async fn drop_db(&self) {
        if self.backend == Backend::Sqlite {
            for suffix in ["", "-wal", "-shm", ".lock"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", self.name));
            }
            return;
        }
        if let Ok(admin) = PgPool::connect(&pg_admin_url()).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&admin)
            .await;
        }
    }
}

/// AMQP names unique to one test.
pub fn unique_amqp() -> AmqpSettings {
    let p = format!("t.{}", &Uuid::new_v4().simple().to_string()[..12]);
    AmqpSettings {
        lifecycle_exchange: format!("{p}.byok.lifecycle"),
        lifecycle_queue: format!("{p}.byokd.lifecycle"),
        urgent_queue: format!("{p}.byokd.lifecycle.urgent"),
        dead_letter_exchange: format!("{p}.byok.lifecycle.dlx"),
        dead_letter_queue: format!("{p}.byokd.lifecycle.dead"),
        access_exchange: format!("{p}.byok.access"),
        ..AmqpSettings::default()
    }
}

/// An empty schedules directory: tests run sweeps explicitly, not on the shipped crons.
pub fn no_schedules() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join("byokd-test-no-schedules");
    std::fs::create_dir_all(&dir).expect("create empty schedules dir");
    dir
}

/// A new, empty directory for a daemon's audit spool: one per daemon (it is locked).
pub fn fresh_spool_dir() -> std::path::PathBuf {
    std::env::temp_dir()
        .join("byokd-test-spool")
        .join(Uuid::new_v4().simple().to_string())
}

pub fn test_config(db_url: &str, amqp: AmqpSettings) -> Config {
    Config {
        access: byokd::config::AccessSettings {
            audit_spool_dir: Some(fresh_spool_dir()),
            ..Default::default()
        },
        schedules_dir: no_schedules(),
        database_url: Some(db_url.to_owned()),
        amqp_url: Some(amqp_url()),
        admin_token: Some(SecretString::from(TOKEN)),
        local_kms_root_key: Some(SecretString::from(ROOT_KEY)),
        shutdown_grace_secs: 10,
        // No SMTP server configured: the daemon writes emails here, not into the work tree.
        mail_dir: std::env::temp_dir().join("byokd-test-mail"),
        amqp,
        ..Config::default()
    }
}

/// Another daemon sharing a [`TestApp`]'s database and queues.
pub struct Replica {
    /// `http://127.0.0.1:port` of its HTTP listener.
    pub base: String,
    stop: oneshot::Sender<()>,
    handle: JoinHandle<Result<(), RunError>>,
}

impl Replica {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.handle
            .await
            .expect("replica task")
            .expect("replica exits cleanly");
    }
}

/// A running daemon and the handles a test needs to drive and observe it.
pub struct TestApp {
    pub base: String,
    pub db: TestDb,
    /// The PostgreSQL database, for assertions in raw SQL that only run on PostgreSQL. On a
    /// SQLite app it is a pool that never connects (its host names the mistake): use
    /// [`TestApp::sql`], which runs on either back end.
    pub pool: PgPool,
    /// The SQLite database, on a SQLite app.
    pub sqlite: Option<sqlx::SqlitePool>,
    pub config: Config,
    pub http: reqwest::Client,
    pub amqp: Connection,
    pub channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), RunError>>>,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    /// Spawns with a config tweak (e.g. pointing URLs at a fault-injecting proxy).
    pub async fn spawn_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
        Self::spawn_on_with(Backend::Postgres, tweak).await
    }

    /// Spawns on `backend`.
    pub async fn spawn_on(backend: Backend) -> TestApp {
        Self::spawn_on_with(backend, |_| {}).await
    }

    /// Spawns on `backend` with a config tweak.
    pub async fn spawn_on_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let db = TestDb::create_on(backend).await;
        Self::spawn_on_db(db, tweak).await
    }

    /// Spawns on an existing database (e.g. one a test filled with `byokd import`).
    pub async fn spawn_on_db(db: TestDb, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let backend = db.backend;
        let mut config = test_config(&db.url, unique_amqp());
        tweak(&mut config);
        let (pool, sqlite) = match backend {
            Backend::Postgres => (PgPool::connect(&db.url).await.expect("test pool"), None),
            Backend::Sqlite => (no_postgres(), None),
        };
        let amqp = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("test AMQP connection");
        let channel = amqp.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let mut app = TestApp {
            base: String::new(),
            db,
            pool,
            sqlite,
            config,
            http: http_client(),
            amqp,
            channel,
            stop: None,
            handle: None,
        };
        app.start().await;
        if backend == Backend::Sqlite {
            app.sqlite = Some(
                sqlx::SqlitePool::connect(&app.db.url)
                    .await
                    .expect("test SQLite pool"),
            );
        }
        app
    }

    /// Starts (or restarts) the daemon on a new port and waits until it consumes.
    pub async fn start(&mut self) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        self.base = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let config = self.config.clone();
        self.handle = Some(tokio::spawn(byokd::daemon::run(config, listener, async {
            let _ = stopped.await;
        })));
        self.stop = Some(stop);
        self.wait_ready().await;
    }

    pub async fn wait_ready(&self) {
        let http = self.http.clone();
        let url = format!("{}/readyz", self.base);
        wait_for("daemon ready", Duration::from_secs(30), || {
            let http = http.clone();
            let url = url.clone();
            async move { matches!(http.get(&url).send().await, Ok(r) if r.status() == 200) }
        })
        .await;
    }

    /// Starts a second daemon (another replica) on the same database and queues.
    pub async fn replica(&self) -> Replica {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let mut config = self.config.clone();
        config.access.audit_spool_dir = Some(fresh_spool_dir());
        let handle = tokio::spawn(byokd::daemon::run(config, listener, async {
            let _ = stopped.await;
        }));
        Replica { base, stop, handle }
    }

    /// The daemon's audit spool directory.
    pub fn spool_dir(&self) -> std::path::PathBuf {
        self.config.access.spool_dir(&self.config.data_dir)
    }

    /// Waits until the daemon has shipped every key-access attempt it spooled into
    /// `audit_log` (polls the spool's files).
    pub async fn audit_shipped(&self) {
        let dir = self.spool_dir();
        wait_for("audit spool shipped", Duration::from_secs(15), || {
            let dir = dir.clone();
            async move { byokd::access::spool::unshipped_bytes(&dir).is_ok_and(|b| b == 0) }
        })
        .await;
    }

    /// Stops the daemon (graceful) and waits for `run` to return.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle
                .await
                .expect("daemon task")
                .expect("daemon exits cleanly");
        }
    }

    /// Stops the daemon and removes the test's queues, exchanges, database and audit spool.
    pub async fn shutdown(mut self) {
        self.stop().await;
        let _ = std::fs::remove_dir_all(self.spool_dir());
        self.pool.close().await;
        if let Some(pool) = &self.sqlite {
            pool.close().await;
        }
        let s = &self.config.amqp;
        for q in [&s.lifecycle_queue, &s.urgent_queue, &s.dead_letter_queue] {
            let _ = self
                .channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for e in [
            &s.lifecycle_exchange,
            &s.dead_letter_exchange,
            &s.access_exchange,
        ] {
            let _ = self
                .channel
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        self.db.drop_db().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("request")
    }

    /// The local KMS over the test's database, as the daemon sees it.
    pub async fn local_kms(&self) -> byokd::kms::LocalKms {
        let store = byokd::store::Store::connect(&self.db.url, 2)
            .await
            .expect("store");
        let root = self.config.require_root_keys().expect("root key");
        byokd::kms::LocalKms::new(
            store,
            std::sync::Arc::new(byokd::seal::Sealer::with_previous(
                &root,
                byokd::seal::LOCAL_KMS_PURPOSE,
            )),
        )
    }

    /// Creates a key in the local KMS.
    pub async fn create_local_key(&self, key_ref: &str) {
        self.local_kms()
            .await
            .create(key_ref, None)
            .await
            .expect("create local key");
    }

    /// Does at the local KMS what an event of `kind` reports (as `byokd kms local` does),
    /// without publishing anything. Kinds the local KMS has no operation for (permission
    /// changes, warnings) do nothing: an event of that kind is then a claim the KMS refutes.
    pub async fn kms_do(&self, key_ref: &str, kind: &str, data: &Value) {
        use byokd::domain::KeyState::{Destroyed, Disabled, Enabled, PendingDeletion};
        let kms = self.local_kms().await;
        let date = |field: &str| {
            data.get(field)
                .and_then(Value::as_str)
                .map(|d| d.parse::<DateTime<Utc>>().expect("RFC 3339 date"))
        };
        let result = match kind {
            "disabled" => {
                kms.transition(key_ref, &[Enabled, Disabled], Disabled)
                    .await
            }
            "enabled" => kms.transition(key_ref, &[Enabled, Disabled], Enabled).await,
            "deletion_scheduled" => {
                kms.transition(key_ref, &[Enabled, Disabled], PendingDeletion)
                    .await
            }
            "deletion_cancelled" => kms.transition(key_ref, &[PendingDeletion], Disabled).await,
            "destroyed" => {
                kms.transition(key_ref, &[Enabled, Disabled, PendingDeletion], Destroyed)
                    .await
            }
            "rotated" => kms.rotate(key_ref).await,
            "expired" => {
                kms.set_expiry(key_ref, Some(Utc::now() - ChronoDuration::seconds(1)))
                    .await
            }
            "expiry_changed" => kms.set_expiry(key_ref, date("expires_at")).await,
            _ => return,
        };
        result.unwrap_or_else(|e| panic!("local KMS {kind} on {key_ref}: {e}"));
    }

    /// Waits until byokd has observed `key_ref` at its KMS after `since` with no claim left
    /// in force: the confirmation of every event published before `since` is done.
    pub async fn wait_observed(&self, key_ref: &str, since: DateTime<Utc>) {
        wait_for(
            &format!("{key_ref} observed after {since}"),
            Duration::from_secs(30),
            || async move {
                self.sql(
                    "SELECT count(*) FROM keks
                     WHERE key_ref = $1 AND observed_at > $2 AND claim IS NULL",
                )
                .bind(key_ref)
                .bind(since)
                .int()
                .await
                    == 1
            },
        )
        .await;
    }

    /// Creates many keys in the local KMS (benchmarks seed their KEK rows in SQL; the keys
    /// must exist at the KMS too, or confirming an event would find them gone).
    #[allow(dead_code)]
    pub async fn create_local_keys(&self, names: impl IntoIterator<Item = String>) {
        let kms = self.local_kms().await;
        for name in names {
            kms.create(&name, None).await.expect("create local key");
        }
    }

    /// Creates a tenant and a local KEK straight in the database (the daemon may be stopped).
    pub async fn tenant_with_key_offline(&self, tenant: &str, key_ref: &str) {
        self.create_local_key(key_ref).await;
        self.tenant_with_native_key(tenant, "local", key_ref).await;
    }

    /// Creates a tenant whose primary KEK lives at a cloud provider, straight in SQL: the
    /// API's registration test-wraps against the KMS, which tests cannot reach. The attribute
    /// times are in the past so provider events with fixture timestamps are not stale.
    pub async fn tenant_with_native_key(&self, tenant: &str, provider: &str, key_ref: &str) {
        if self.sqlite.is_some() {
            let now = "2000-01-01T00:00:00.000000Z";
            self.sql(
                "INSERT INTO tenants (id, name, created_at, updated_at) VALUES ($1, $1, $2, $2)",
            )
            .bind(tenant)
            .bind(now)
            .rows()
            .await;
            self.sql(
                "INSERT INTO keks (tenant_id, provider, key_ref, state, current_version,
                                   created_at, updated_at)
                 VALUES ($1, $2, $3, 'enabled', '1', $4, $4)",
            )
            .bind(tenant)
            .bind(provider)
            .bind(key_ref)
            .bind(now)
            .rows()
            .await;
            return;
        }
        sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $1)")
            .bind(tenant)
            .execute(&self.pool)
            .await
            .expect("tenant");
        sqlx::query(
            "INSERT INTO keks (tenant_id, provider, key_ref, state, current_version,
                               state_changed_at, version_changed_at, expiry_changed_at)
             VALUES ($1, $2, $3, 'enabled', '1', '2000-01-01Z', '2000-01-01Z', '2000-01-01Z')",
        )
        .bind(tenant)
        .bind(provider)
        .bind(key_ref)
        .execute(&self.pool)
        .await
        .expect("kek");
    }

    /// Creates a tenant with one contact and one webhook, and registers a new local KEK.
    pub async fn tenant_with_key(&self, tenant: &str, key_ref: &str) {
        self.create_local_key(key_ref).await;
        let r = self
            .post(
                "/v1/tenants",
                json!({
                    "id": tenant,
                    "name": format!("Tenant {tenant}"),
                    "contacts": [format!("ops@{tenant}.example")],
                    "webhooks": [{ "url": format!("https://hooks.{tenant}.example/byok") }],
                }),
            )
            .await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
        let r = self
            .post(
                &format!("/v1/tenants/{tenant}/keks"),
                json!({ "provider": "local", "key_ref": key_ref }),
            )
            .await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    }

    /// Creates a tenant with one contact and no key.
    pub async fn create_tenant(&self, tenant: &str) {
        let r = self
            .post(
                "/v1/tenants",
                json!({ "id": tenant, "name": format!("Tenant {tenant}"),
                        "contacts": [format!("ops@{tenant}.example")] }),
            )
            .await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    }

    /// Registers `provider`'s `key_ref` for `tenant`, with `extra` fields (a JSON object, or
    /// null for none); returns the status and body.
    pub async fn bind_key(
        &self,
        tenant: &str,
        provider: &str,
        key_ref: &str,
        extra: Value,
    ) -> (u16, Value) {
        let mut body = json!({ "provider": provider, "key_ref": key_ref });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let r = self.post(&format!("/v1/tenants/{tenant}/keks"), body).await;
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Creates `n` DEKs of `tenant` with the admin token; their bodies.
    pub async fn create_deks(&self, tenant: &str, n: usize) -> Vec<Value> {
        let mut deks = Vec::new();
        for _ in 0..n {
            let r = self
                .post(&format!("/v1/tenants/{tenant}/deks"), json!({}))
                .await;
            assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
            deks.push(r.json().await.expect("json"));
        }
        deks
    }

    /// `tenant`'s access as the API reports it.
    pub async fn access(&self, tenant: &str) -> String {
        self.tenant(tenant).await["access"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits up to 30 s for `tenant`'s access to be `want`.
    pub async fn wait_access(&self, tenant: &str, want: &str) {
        wait_for(
            &format!("tenant {tenant} {want}"),
            Duration::from_secs(30),
            || async move { self.access(tenant).await == want },
        )
        .await;
    }

    pub async fn tenant(&self, id: &str) -> Value {
        let r = self.get(&format!("/v1/tenants/{id}")).await;
        assert_eq!(r.status(), 200);
        r.json().await.expect("json")
    }

    /// Publishes raw bytes to the test's lifecycle exchange and waits for the confirm.
    pub async fn publish_raw(&self, body: &[u8]) {
        self.channel
            .basic_publish(
                self.config.amqp.lifecycle_exchange.as_str().into(),
                "test".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }

    /// Publishes a canonical event and returns its id.
    pub async fn publish(
        &self,
        kind: &str,
        key_ref: &str,
        at: DateTime<Utc>,
        data: Value,
    ) -> String {
        let id = Uuid::new_v4().to_string();
        self.publish_with_id(&id, kind, key_ref, at, data).await;
        id
    }

    pub async fn publish_with_id(
        &self,
        id: &str,
        kind: &str,
        key_ref: &str,
        at: DateTime<Utc>,
        data: Value,
    ) {
        self.publish_raw(
            canonical(id, kind, key_ref, at, data)
                .to_string()
                .as_bytes(),
        )
        .await;
    }

    /// Publishes `bodies` to the lifecycle exchange with `routing_key`, pipelined: `window`
    /// in flight, then their confirms (benchmarks' backlogs).
    pub async fn publish_pipelined(&self, routing_key: &str, window: usize, bodies: &[&[u8]]) {
        for chunk in bodies.chunks(window) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for body in chunk {
                confirms.push(
                    self.channel
                        .basic_publish(
                            self.config.amqp.lifecycle_exchange.as_str().into(),
                            routing_key.into(),
                            BasicPublishOptions::default(),
                            body,
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await
                        .expect("publish"),
                );
            }
            for c in confirms {
                c.await.expect("confirm");
            }
        }
    }

    pub async fn processed(&self) -> i64 {
        self.sql("SELECT count(*) FROM processed_events")
            .int()
            .await
    }

    /// Waits until `n` events are in the inbox.
    pub async fn wait_processed(&self, n: i64) {
        wait_for(
            &format!("{n} events processed"),
            Duration::from_secs(60),
            || async move { self.processed().await >= n },
        )
        .await;
    }

    /// A queue bound to the test's access exchange, to observe `byok.access` messages.
    pub async fn access_listener(&self) -> lapin::Consumer {
        let ch = self.amqp.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare");
        ch.queue_bind(
            q.name().clone(),
            self.config.amqp.access_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
        ch.basic_consume(
            q.name().clone(),
            "access-listener".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume")
    }

    /// Messages (ready + unacked) in a queue.
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let ch = self.amqp.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        let _ = ch.close(200, "done".into()).await;
        q.message_count()
    }
}

/// Receives the next message within `timeout` and parses it as JSON, with its routing key.
pub async fn next_json(
    consumer: &mut lapin::Consumer,
    timeout: Duration,
) -> Option<(String, Value)> {
    // The listener consumes with no_ack: acking here would close its channel.
    let delivery = tokio::time::timeout(timeout, consumer.next())
        .await
        .ok()??
        .ok()?;
    Some((
        delivery.routing_key.to_string(),
        serde_json::from_slice(&delivery.data).ok()?,
    ))
}

pub fn canonical(id: &str, kind: &str, key_ref: &str, at: DateTime<Utc>, data: Value) -> Value {
    let mut d = json!({ "provider": "local", "key_ref": key_ref });
    if let Value::Object(extra) = data {
        for (k, v) in extra {
            d[k] = v;
        }
    }
    json!({
        "specversion": "1.0",
        "id": id,
        "source": "test://kms",
        "type": format!("byok.key.{kind}"),
        "time": at.to_rfc3339(),
        "data": d,
    })
}

/// Notifications of `kind` queued for `tenant` (AMQP rows are deleted once published).
pub async fn outbox_count(app: &TestApp, tenant: &str, kind: &str) -> i64 {
    app.sql("SELECT count(*) FROM outbox WHERE tenant_id = $1 AND kind = $2")
        .bind(tenant)
        .bind(kind)
        .int()
        .await
}

/// Reads the test's dead-letter queue.
pub async fn dead_letter_reader(app: &TestApp) -> lapin::Consumer {
    let ch = app.amqp.create_channel().await.expect("channel");
    ch.basic_consume(
        app.config.amqp.dead_letter_queue.as_str().into(),
        "dead-reader".into(),
        lapin::options::BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("consume dead queue")
}

/// The next dead letter (acked): its body length and the reason in its `x-byokd-error`
/// header. Fails the test if none arrives within 20 s or the header is missing.
pub async fn next_dead_letter(dead: &mut lapin::Consumer) -> (usize, String) {
    let d = tokio::time::timeout(Duration::from_secs(20), dead.next())
        .await
        .expect("a dead letter in time")
        .expect("stream open")
        .expect("delivery");
    let headers = d.properties.headers().clone().unwrap_or_default();
    let reason = match headers.inner().get("x-byokd-error") {
        Some(lapin::types::AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("no x-byokd-error header: {other:?}"),
    };
    d.acker
        .ack(lapin::options::BasicAckOptions::default())
        .await
        .expect("ack");
    (d.data.len(), reason)
}

/// Runs one confirmation round as the daemon's loop would, for tests that drive the engine
/// themselves: every key due within the next 5 s is observed at its KMS and the answers
/// applied (a claim younger than `lifecycle::CLAIM_SETTLE` stays for a later answer).
pub async fn confirm_round(store: &byokd::store::Store, kms: &byokd::kms::Kms) {
    let notify = || std::sync::Arc::new(tokio::sync::Notify::new());
    let confirmer = byokd::reconcile::Confirmer::new(
        store.clone(),
        kms.clone(),
        byokd::reconcile::StateSettings::default(),
        notify(),
        notify(),
        notify(),
    );
    confirmer
        .run_once(Utc::now() + ChronoDuration::seconds(5))
        .await
        .expect("confirmation round");
}

/// A time `secs` seconds after the test's reference point, an hour ago: event times are
/// hints and order only among themselves, and a time ahead of byokd's clock by more than
/// the allowed skew is refused.
pub fn at(secs: i64) -> DateTime<Utc> {
    Utc::now() + ChronoDuration::seconds(secs - 3600)
}

/// Polls `check` until it holds, failing the test after `limit`. A bounded wait for an
/// asynchronous effect, not a timing assertion.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The `byokd` binary with a clean `BYOKD_*` environment.
pub fn byokd_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_byokd"));
    for (k, _) in std::env::vars() {
        if k.starts_with("BYOKD_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// Points a `byokd` command at a test's database and AMQP names.
pub fn with_service_env(cmd: &mut std::process::Command, db_url: &str, amqp: &AmqpSettings) {
    cmd.env("BYOKD_DATABASE_URL", db_url)
        .env("BYOKD_AMQP_URL", amqp_url())
        .env("BYOKD_ADMIN_TOKEN", TOKEN)
        .env("BYOKD_LOCAL_KMS_ROOT_KEY", ROOT_KEY)
        .env("BYOKD_AMQP__LIFECYCLE_EXCHANGE", &amqp.lifecycle_exchange)
        .env("BYOKD_AMQP__LIFECYCLE_QUEUE", &amqp.lifecycle_queue)
        .env("BYOKD_AMQP__URGENT_QUEUE", &amqp.urgent_queue)
        .env(
            "BYOKD_AMQP__DEAD_LETTER_EXCHANGE",
            &amqp.dead_letter_exchange,
        )
        .env("BYOKD_AMQP__DEAD_LETTER_QUEUE", &amqp.dead_letter_queue)
        .env("BYOKD_AMQP__ACCESS_EXCHANGE", &amqp.access_exchange)
        .env("BYOKD_SCHEDULES_DIR", no_schedules())
        .env("BYOKD_ACCESS__AUDIT_SPOOL_DIR", fresh_spool_dir());
}

/// (VmRSS, VmHWM) of a process, in MB (0 when it is gone).
pub fn rss_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A free loopback port (bound, then released for a child process to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl TestApp {
    /// Starts `byokd run` as a child process on this test's database and queues, with
    /// extra environment; returns it and its HTTP port (not yet ready).
    pub fn daemon_process(&self, env: &[(&str, &str)]) -> (std::process::Child, u16) {
        let port = free_port();
        let mut cmd = byokd_command();
        with_service_env(&mut cmd, &self.db.url, &self.config.amqp);
        cmd.arg("run")
            .env("BYOKD_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        (cmd.spawn().expect("spawn byokd run"), port)
    }

    /// Runs `byokd deks verify --tenant T --json` and returns its report and success.
    pub fn verify_deks(&self, tenant: &str) -> (Value, bool) {
        let mut cmd = byokd_command();
        with_service_env(&mut cmd, &self.db.url, &self.config.amqp);
        if let Some(vault) = &self.config.kms.vault {
            use secrecy::ExposeSecret;
            cmd.env("BYOKD_KMS__VAULT__ADDRESS", &vault.address)
                .env("BYOKD_KMS__VAULT__TOKEN", vault.token.expose_secret())
                .env("BYOKD_KMS__VAULT__MOUNT", &vault.mount);
        }
        if let Some(aws) = &self.config.kms.aws {
            cmd.envs(aws::env(aws));
        }
        if let Some(azure) = &self.config.kms.azure {
            cmd.envs(azure::env(azure));
        }
        if let Some(gcp) = &self.config.kms.gcp {
            cmd.envs(gcp::env(gcp));
        }
        let out = cmd
            .args(["deks", "verify", "--json", "--tenant", tenant])
            .output()
            .expect("run deks verify");
        let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "deks verify printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (report, out.status.success())
    }

    /// The tenant's re-wrap jobs, newest first.
    pub async fn rewrap_jobs(&self, tenant: &str) -> Vec<Value> {
        let r = self.get(&format!("/v1/rewrap-jobs?tenant={tenant}")).await;
        assert_eq!(r.status(), 200);
        r.json().await.expect("json")
    }

    /// The tenant's re-wrap jobs straight from the store (the daemon may be stopped).
    pub async fn rewrap_jobs_offline(&self, tenant: &str) -> Vec<Value> {
        let store = byokd::store::Store::connect(&self.db.url, 2)
            .await
            .expect("store");
        let jobs = store.rewrap_jobs(tenant).await.expect("jobs");
        serde_json::to_value(jobs)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// Waits until the newest job of `tenant` reaches `state`.
    pub async fn wait_job(&self, tenant: &str, state: &str, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let jobs = self.rewrap_jobs(tenant).await;
            if let Some(job) = jobs.first()
                && job["state"] == state
            {
                return job.clone();
            }
            assert!(
                start.elapsed() < limit,
                "timed out waiting for a {state} job of {tenant}: {jobs:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates `n` DEKs for the tenant's primary KEK directly (real wraps by the local KMS,
    /// bulk insert), returning (id, kcv) pairs. Much faster than `n` API calls.
    pub async fn bulk_deks(&self, tenant: &str, key_ref: &str, n: usize) -> Vec<(Uuid, String)> {
        use byokd::kms::{Dek, DekContext, KmsProvider};
        let kms = self.local_kms().await;
        let kek_id = self
            .sql("SELECT id FROM keks WHERE key_ref = $1")
            .bind(key_ref)
            .int()
            .await;
        let mut out = Vec::with_capacity(n);
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            let deks: Vec<(Uuid, Dek)> = chunk
                .iter()
                .map(|_| (Uuid::now_v7(), Dek::generate()))
                .collect();
            let items: Vec<_> = deks
                .iter()
                .map(|(id, dek)| {
                    (
                        dek,
                        DekContext {
                            tenant_id: tenant,
                            dek_id: *id,
                        },
                    )
                })
                .collect();
            let wrapped = kms.wrap_many(key_ref, None, &items).await.expect("wrap");
            let ids: Vec<Uuid> = deks.iter().map(|(id, _)| *id).collect();
            let kcvs: Vec<String> = deks.iter().map(|(_, d)| d.kcv()).collect();
            let versions: Vec<String> = wrapped.iter().map(|w| w.version.clone()).collect();
            let blobs: Vec<Vec<u8>> = wrapped.into_iter().map(|w| w.ciphertext).collect();
            if let Some(pool) = &self.sqlite {
                let mut tx = pool.begin().await.expect("begin");
                let now = Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
                for (((id, version), blob), kcv) in ids.iter().zip(&versions).zip(&blobs).zip(&kcvs)
                {
                    sqlx::query(
                        "INSERT INTO deks (id, tenant_id, kek_id, kek_version, wrapped, kcv,
                                           created_at, updated_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
                    )
                    .bind(id.hyphenated().to_string())
                    .bind(tenant)
                    .bind(kek_id)
                    .bind(version)
                    .bind(blob)
                    .bind(kcv)
                    .bind(&now)
                    .execute(&mut *tx)
                    .await
                    .expect("insert dek");
                }
                tx.commit().await.expect("commit");
                out.extend(ids.into_iter().zip(kcvs));
                continue;
            }
            sqlx::query(
                "INSERT INTO deks (id, tenant_id, kek_id, kek_version, wrapped, kcv)
                 SELECT u.id, $1, $2, u.v, u.w, u.k
                 FROM UNNEST($3::uuid[], $4::text[], $5::bytea[], $6::text[]) AS u(id, v, w, k)",
            )
            .bind(tenant)
            .bind(kek_id)
            .bind(&ids)
            .bind(&versions)
            .bind(&blobs)
            .bind(&kcvs)
            .execute(&self.pool)
            .await
            .expect("insert deks");
            out.extend(ids.into_iter().zip(kcvs));
        }
        out
    }
}

/// A value bound to a [`Sql`] query.
#[derive(Debug, Clone)]
pub enum SqlArg {
    Text(String),
    Int(i64),
    Time(DateTime<Utc>),
    Bytes(Vec<u8>),
}

impl From<Vec<u8>> for SqlArg {
    fn from(v: Vec<u8>) -> Self {
        SqlArg::Bytes(v)
    }
}

impl From<&str> for SqlArg {
    fn from(v: &str) -> Self {
        SqlArg::Text(v.to_owned())
    }
}

impl From<&String> for SqlArg {
    fn from(v: &String) -> Self {
        SqlArg::Text(v.clone())
    }
}

impl From<String> for SqlArg {
    fn from(v: String) -> Self {
        SqlArg::Text(v)
    }
}

impl From<i64> for SqlArg {
    fn from(v: i64) -> Self {
        SqlArg::Int(v)
    }
}

impl From<DateTime<Utc>> for SqlArg {
    fn from(v: DateTime<Utc>) -> Self {
        SqlArg::Time(v)
    }
}

impl From<Uuid> for SqlArg {
    fn from(v: Uuid) -> Self {
        SqlArg::Text(v.hyphenated().to_string())
    }
}

/// A raw-SQL query for assertions that runs on either back end: `$1`-style placeholders
/// (SQLite reads them too), plain SQL both understand (`->`/`->>` on JSON work in both).
/// Each row comes back as JSON values: numbers, text, booleans, JSON documents (PostgreSQL
/// `jsonb`; on SQLite, text holding a JSON object or array, as the store keeps them), times
/// as RFC 3339 text, bytes as arrays of numbers, UUIDs as hyphenated text.
pub struct Sql<'a> {
    pg: &'a PgPool,
    sqlite: Option<&'a sqlx::SqlitePool>,
    sql: String,
    args: Vec<SqlArg>,
}

impl<'a> Sql<'a> {
    /// A query on the SQLite database when given, else on the PostgreSQL one.
    pub fn on(pg: &'a PgPool, sqlite: Option<&'a sqlx::SqlitePool>, sql: &str) -> Self {
        Sql {
            pg,
            sqlite,
            sql: sql.to_owned(),
            args: Vec::new(),
        }
    }
}

impl<'a> Sql<'a> {
    pub fn bind(mut self, arg: impl Into<SqlArg>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Every row.
    pub async fn rows(self) -> Vec<Vec<Value>> {
        use sqlx::{Column, Row, TypeInfo, ValueRef};
        match self.sqlite {
            Some(pool) => {
                let mut q = sqlx::query(sqlx::AssertSqlSafe(self.sql.clone()));
                for a in &self.args {
                    q = match a {
                        SqlArg::Text(t) => q.bind(t.clone()),
                        SqlArg::Int(i) => q.bind(*i),
                        SqlArg::Time(t) => q.bind(t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()),
                        SqlArg::Bytes(b) => q.bind(b.clone()),
                    };
                }
                let rows = q
                    .fetch_all(pool)
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e}", self.sql));
                rows.iter()
                    .map(|r| {
                        (0..r.columns().len())
                            .map(|i| {
                                let raw = r.try_get_raw(i).expect("column");
                                if raw.is_null() {
                                    return Value::Null;
                                }
                                match raw.type_info().name() {
                                    "INTEGER" | "BOOLEAN" => {
                                        json!(r.try_get::<i64, _>(i).expect("integer"))
                                    }
                                    "REAL" => json!(r.try_get::<f64, _>(i).expect("real")),
                                    "BLOB" => json!(r.try_get::<Vec<u8>, _>(i).expect("blob")),
                                    _ => {
                                        let text: String = r.try_get(i).expect("text");
                                        if text.starts_with('{') || text.starts_with('[') {
                                            serde_json::from_str(&text).unwrap_or(json!(text))
                                        } else {
                                            json!(text)
                                        }
                                    }
                                }
                            })
                            .collect()
                    })
                    .collect()
            }
            None => {
                let mut q = sqlx::query(sqlx::AssertSqlSafe(self.sql.clone()));
                for a in &self.args {
                    q = match a {
                        SqlArg::Text(t) => q.bind(t.clone()),
                        SqlArg::Int(i) => q.bind(*i),
                        SqlArg::Time(t) => q.bind(*t),
                        SqlArg::Bytes(b) => q.bind(b.clone()),
                    };
                }
                let rows = q
                    .fetch_all(self.pg)
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e}", self.sql));
                rows.iter()
                    .map(|r| {
                        r.columns()
                            .iter()
                            .map(|c| {
                                let i = c.ordinal();
                                if r.try_get_raw(i).expect("column").is_null() {
                                    return Value::Null;
                                }
                                match c.type_info().name() {
                                    "INT8" => json!(r.try_get::<i64, _>(i).expect("int8")),
                                    "INT4" => json!(r.try_get::<i32, _>(i).expect("int4")),
                                    "INT2" => json!(r.try_get::<i16, _>(i).expect("int2")),
                                    "BOOL" => json!(r.try_get::<bool, _>(i).expect("bool")),
                                    "FLOAT8" => json!(r.try_get::<f64, _>(i).expect("float8")),
                                    "JSON" | "JSONB" => r.try_get::<Value, _>(i).expect("json"),
                                    "BYTEA" => json!(r.try_get::<Vec<u8>, _>(i).expect("bytea")),
                                    "UUID" => {
                                        json!(r.try_get::<Uuid, _>(i).expect("uuid").to_string())
                                    }
                                    "TIMESTAMPTZ" => json!(
                                        r.try_get::<DateTime<Utc>, _>(i)
                                            .expect("timestamptz")
                                            .to_rfc3339()
                                    ),
                                    _ => json!(r.try_get::<String, _>(i).expect("text")),
                                }
                            })
                            .collect()
                    })
                    .collect()
            }
        }
    }

    /// The only row's first column.
    pub async fn scalar(self) -> Value {
        let sql = self.sql.clone();
        let rows = self.rows().await;
        assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
        rows[0][0].clone()
    }

    /// The only row's first column, an integer (a count).
    pub async fn int(self) -> i64 {
        let v = self.scalar().await;
        v.as_i64().unwrap_or_else(|| panic!("not an integer: {v}"))
    }

    /// The only row's first column, text.
    pub async fn text(self) -> String {
        let v = self.scalar().await;
        v.as_str()
            .unwrap_or_else(|| panic!("not text: {v}"))
            .to_owned()
    }

    /// The only row's first column, bytes.
    pub async fn bytes(self) -> Vec<u8> {
        let v = self.scalar().await;
        serde_json::from_value(v).expect("bytes")
    }

    /// The first column of every row, as text.
    pub async fn texts(self) -> Vec<String> {
        self.rows()
            .await
            .into_iter()
            .map(|r| r[0].as_str().expect("text").to_owned())
            .collect()
    }
}

impl TestApp {
    /// A raw-SQL query on the test's database, whichever back end (see [`Sql`]).
    pub fn sql(&self, sql: &str) -> Sql<'_> {
        Sql::on(&self.pool, self.sqlite.as_ref(), sql)
    }

    /// Audit rows not yet chained, whichever back end: SQLite keeps a row's place in
    /// `audit_log.chain_seq`, PostgreSQL in `audit_chain`.
    pub async fn unchained_audit_rows(&self) -> i64 {
        if self.sqlite.is_some() {
            self.sql("SELECT count(*) FROM audit_log WHERE chain_seq IS NULL")
                .int()
                .await
        } else {
            self.sql(PG_UNCHAINED).int().await
        }
    }

    /// POSTs `path` (an empty JSON body) with a client's `token`: the status and the JSON
    /// answer (null when it is not JSON).
    pub async fn as_client(&self, token: &str, path: &str) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(token)
            .json(&json!({}))
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Waits (up to 30 s) until every audit row is chained.
    pub async fn wait_chained(&self) {
        wait_for(
            "every audit row chained",
            Duration::from_secs(30),
            || async { self.unchained_audit_rows().await == 0 },
        )
        .await;
    }

    /// The chain's head place (0 when empty), whichever back end.
    pub async fn audit_head_seq(&self) -> i64 {
        let table = if self.sqlite.is_some() {
            "SELECT coalesce(max(chain_seq), 0) FROM audit_log"
        } else {
            "SELECT coalesce(max(chain_seq), 0) FROM audit_chain"
        };
        self.sql(table).int().await
    }
}

/// PostgreSQL: audit rows without a place in `audit_chain`.
pub const PG_UNCHAINED: &str = "SELECT count(*) FROM audit_log a
     WHERE NOT EXISTS (SELECT 1 FROM audit_chain c WHERE c.id = a.id)";

/// The `plaintext` of a key-access answer, decoded from base64.
pub fn plaintext(v: &Value) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(v["plaintext"].as_str().expect("plaintext"))
        .expect("base64")
}
