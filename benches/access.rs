//! Key-access benchmark (issue 10), against daemons started as processes of the release
//! binary:
//!
//! 1. Unwrap of cached DEKs with the audit on (`POST /v1/tenants/{id}/deks/{dek_id}/unwrap`),
//!    one replica, beside a bare axum handler returning 32 bytes on another port (its own
//!    two-thread runtime in this process, as the daemon has), in the same run, with the same
//!    client code and concurrency; rounds alternate so both see the same machine. For where
//!    the time goes: the daemon's HTTP stack alone (`POST /healthz`, 405), PostgreSQL's
//!    commit of one small INSERT, and byokd's audit writer driven directly.
//! 2. Batch unwrap of 1000 DEKs: cold (first time, KMS) and hot (cached), and the database's
//!    share (1000 audit rows inserted in one transaction).
//! 3. Revocation to refusal across 3 replicas under load: clients unwrap cached DEKs at full
//!    rate on every replica while a `disabled` event is published (after the key is disabled
//!    at the local KMS); per replica, the time from the publish to the first 403. Each round
//!    is split, on a thread of this process away from the load clients, at the broker's
//!    delivery (a bare consumer of a quorum queue bound like the urgent lane) and at the
//!    commit (a `LISTEN` on `byokd_access`); the slowest rounds are printed with the
//!    checkpoints PostgreSQL completed meanwhile, and each replica's receipt-to-commit
//!    histogram is read from its `/metrics`.
//! 4. RSS of a fresh daemon process holding 10,000 cached DEKs.
//!
//! `cargo bench --bench access` (local RabbitMQ and PostgreSQL, loopback only). Sizes:
//! `BYOKD_BENCH_CLIENTS` (concurrent keep-alive clients in 1, default 16),
//! `BYOKD_BENCH_SECS` (seconds measured per side and round in 1, default 5),
//! `BYOKD_BENCH_ROUNDS` (default 2), `BYOKD_BENCH_HOT` (hot DEKs in 1, default 64),
//! `BYOKD_BENCH_BATCHES` (cold batches of 1000 in 2, default 20),
//! `BYOKD_BENCH_REVOCATIONS` (default 20), `BYOKD_BENCH_REPLICA_CLIENTS` (clients per
//! replica in 3, default 8), `BYOKD_BENCH_RSS_DEKS` (default 10000);
//! `BYOKD_BENCH_PARTS` picks parts (default `1234`). `BYOKD_ACCESS__*` settings are passed
//! to the daemons, and `BYOKD_BENCH_PG_OPTIONS` to their database sessions (e.g.
//! `-c synchronous_commit=off`). Prints figures; asserts none.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use common::{TOKEN, TestApp, canonical};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use uuid::Uuid;

const BATCH: usize = 1000;
const REPLICAS: usize = 3;
/// DEKs of each tenant revoked in 3, all cached on every replica beforehand.
const PROBE_DEKS: usize = 8;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether part `n` runs (`BYOKD_BENCH_PARTS`, default `1234`).
fn part(n: char) -> bool {
    std::env::var("BYOKD_BENCH_PARTS").map_or(true, |p| p.contains(n))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

/// `n=… p50=… ms p99=… ms max=… ms` of unsorted latencies.
fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "n={} p50={:.2} ms p99={:.2} ms max={:.2} ms",
        v.len(),
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    )
}

/// A `byokd run` child process and its HTTP base.
struct Daemon {
    child: Child,
    base: String,
}

/// The database URL the daemons (and the audit writer driven directly) use: the
/// benchmark's, with `BYOKD_BENCH_PG_OPTIONS` as session options if set (e.g.
/// `-c synchronous_commit=off`, to see what the audit's commits cost).
fn daemon_db_url(app: &TestApp) -> String {
    match std::env::var("BYOKD_BENCH_PG_OPTIONS") {
        Ok(options) => format!(
            "{}?options={}",
            app.db.url,
            url::form_urlencoded::byte_serialize(options.as_bytes()).collect::<String>()
        ),
        Err(_) => app.db.url.clone(),
    }
}

impl Daemon {
    /// Starts `byokd run`; `BYOKD_ACCESS__*` settings are passed on.
    async fn start(app: &TestApp) -> Daemon {
        let mut extra: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("BYOKD_ACCESS__"))
            .collect();
        extra.push(("BYOKD_DATABASE_URL".into(), daemon_db_url(app)));
        let extra: Vec<(&str, &str)> = extra
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (child, port) = app.daemon_process(&extra);
        // Owned before the wait, so a daemon that never gets ready is killed with the panic.
        let daemon = Daemon {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        common::wait_for("daemon ready", Duration::from_secs(60), || {
            let url = format!("{}/readyz", daemon.base);
            async move { reqwest::get(&url).await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
        daemon
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (VmRSS, VmHWM) in MB.
    fn rss_mb(&self) -> (f64, f64) {
        common::rss_mb(self.pid())
    }

    fn unwrap_url(&self, tenant: &str, id: Uuid) -> String {
        format!("{}/v1/tenants/{tenant}/deks/{id}/unwrap", self.base)
    }

    /// Kills the daemon and waits for it to exit (what dropping it does).
    fn stop(self) {}
}

/// A daemon is never left running, even when the benchmark panics.
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system, clock ticks) of a process; 0 once it is gone.
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses: utime and stime are the
    // 12th and 13th of them.
    stat.rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|f| f.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// CPU time of the PostgreSQL backends serving this benchmark's database, by pid (the
/// server is shared: other databases' backends are not counted).
async fn postgres_ticks(app: &TestApp) -> HashMap<i32, u64> {
    let pids: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    pids.into_iter()
        .map(|pid| (pid, cpu_ticks(&pid.to_string())))
        .collect()
}

/// Ticks spent since `before` (a backend that started since counts whole).
fn ticks_since(before: &HashMap<i32, u64>, now: &HashMap<i32, u64>) -> u64 {
    now.iter()
        .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum()
}

/// (busy, total) ticks of the whole machine.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle and iowait
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Where the CPU went during a phase, in cores (100 ticks a second).
struct Cpu {
    daemon: Option<(String, u64)>,
    bench: u64,
    postgres: HashMap<i32, u64>,
    machine: (u64, u64),
    at: Instant,
}

impl Cpu {
    async fn start(app: &TestApp, daemon: Option<u32>) -> Cpu {
        let daemon = daemon.map(|p| {
            let p = p.to_string();
            let t = cpu_ticks(&p);
            (p, t)
        });
        Cpu {
            daemon,
            bench: cpu_ticks(&std::process::id().to_string()),
            postgres: postgres_ticks(app).await,
            machine: machine_ticks(),
            at: Instant::now(),
        }
    }

    async fn report(&self, app: &TestApp) -> String {
        let secs = self.at.elapsed().as_secs_f64();
        let cores = |ticks: u64| ticks as f64 / 100.0 / secs;
        let (busy, total) = machine_ticks();
        let machine = busy.saturating_sub(self.machine.0) as f64
            / total.saturating_sub(self.machine.1).max(1) as f64
            * 2.0;
        let daemon = self.daemon.as_ref().map_or(String::new(), |(p, t)| {
            format!("byokd {:.2}, ", cores(cpu_ticks(p).saturating_sub(*t)))
        });
        let bench = cores(cpu_ticks(&std::process::id().to_string()).saturating_sub(self.bench));
        let postgres = cores(ticks_since(&self.postgres, &postgres_ticks(app).await));
        format!(
            "CPU in cores: {daemon}this process {bench:.2}, this database's postgres backends {postgres:.2}, machine {machine:.2} of 2"
        )
    }
}

/// One keep-alive HTTP/1.1 connection's worth of client.
fn keep_alive_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// One request as every load generator here sends it: POST with a bearer token and no body,
/// the whole answer read so the connection is kept. Status 0: no answer.
async fn send(http: &reqwest::Client, url: &str, token: &str) -> (u16, Duration, Vec<u8>) {
    let start = Instant::now();
    let (status, body) = match http.post(url).bearer_auth(token).send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            match r.bytes().await {
                Ok(b) => (s, b.to_vec()),
                Err(_) => (0, Vec::new()),
            }
        }
        Err(_) => (0, Vec::new()),
    };
    (status, start.elapsed(), body)
}

struct Load {
    latencies: Vec<Duration>,
    failed: usize,
    secs: f64,
}

impl Load {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.secs
    }
}

/// `clients` closed-loop clients, each on its own connection, POSTing to `urls` in turn
/// for `warmup` and then `measure`; requests sent during `measure` are counted.
async fn closed_loop(
    urls: Arc<Vec<String>>,
    token: &str,
    clients: usize,
    warmup: Duration,
    measure: Duration,
    expect: u16,
) -> Load {
    let from = Instant::now() + warmup;
    let until = from + measure;
    let tasks: Vec<_> = (0..clients)
        .map(|w| {
            let urls = urls.clone();
            let token = token.to_owned();
            tokio::spawn(async move {
                let http = keep_alive_client();
                let mut latencies = Vec::with_capacity(65_536);
                let mut failed = 0;
                let mut i = w * 7;
                loop {
                    let sent = Instant::now();
                    if sent >= until {
                        break;
                    }
                    let (status, latency, _) = send(&http, &urls[i % urls.len()], &token).await;
                    i += 1;
                    if sent < from {
                        continue;
                    }
                    if status == expect {
                        latencies.push(latency);
                    } else {
                        failed += 1;
                    }
                }
                (latencies, failed)
            })
        })
        .collect();
    let mut load = Load {
        latencies: Vec::new(),
        failed: 0,
        secs: measure.as_secs_f64(),
    };
    for t in tasks {
        let (l, f) = t.await.unwrap();
        load.latencies.extend(l);
        load.failed += f;
    }
    load
}

/// The honest ceiling: axum answering 32 bytes, on a runtime of its own with the daemon's
/// two worker threads.
fn bare_server() -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = axum::Router::new()
                .fallback(|| async { axum::body::Bytes::from_static(&[0x42; 32]) });
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
    });
    (base, stop)
}

async fn create_client(http: &reqwest::Client, base: &str, name: &str) -> String {
    let r = http
        .post(format!("{base}/v1/clients"))
        .bearer_auth(TOKEN)
        .json(&json!({ "name": name, "all_tenants": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    v["token"].as_str().unwrap().to_owned()
}

/// A batch unwrap; returns its latency and how many DEKs came back with plaintext.
async fn batch_unwrap(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    tenant: &str,
    ids: &[Uuid],
) -> (Duration, usize) {
    let start = Instant::now();
    let r = http
        .post(format!("{base}/v1/tenants/{tenant}/deks/unwrap"))
        .bearer_auth(token)
        .json(&json!({ "dek_ids": ids }))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    let elapsed = start.elapsed();
    assert_eq!(status, 200, "{v}");
    let ok = v["deks"].as_array().map_or(0, |d| {
        d.iter().filter(|x| x["plaintext"].is_string()).count()
    });
    (elapsed, ok)
}

/// The newest audit row's id, to count what a phase wrote after it.
async fn audit_watermark(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM audit_log")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// Audit rows written after `since`, and the transactions that wrote them (distinct
/// `xmin`): the group commit's batch size, exactly.
async fn audit_commits(app: &TestApp, since: i64) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT xmin::text) FROM audit_log WHERE id > $1")
        .bind(since)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// The floor under an audited answer: one small INSERT committed, one after another, in an
/// explicit transaction (BEGIN, INSERT, COMMIT: three round trips, as the audit writer
/// does) and on its own (one round trip, committed all the same).
async fn commit_floor(app: &TestApp, n: usize) -> (Vec<Duration>, Vec<Duration>) {
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_commit (id BIGSERIAL PRIMARY KEY, v TEXT)")
        .execute(&app.pool)
        .await
        .unwrap();
    let mut conn = app.pool.acquire().await.unwrap();
    let (mut explicit, mut single) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let start = Instant::now();
        let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
        sqlx::query("INSERT INTO bench_commit (v) VALUES ('x')")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        explicit.push(start.elapsed());
        let start = Instant::now();
        sqlx::query("INSERT INTO bench_commit (v) VALUES ('x')")
            .execute(&mut *conn)
            .await
            .unwrap();
        single.push(start.elapsed());
    }
    (explicit, single)
}

/// What the audit of a hot batch costs the database alone: `BATCH` unwrap rows shaped like
/// the daemon's (same statement, same indexes, a copy of `audit_log`), one transaction.
async fn audit_insert_floor(app: &TestApp, n: usize) -> Vec<Duration> {
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_audit (LIKE audit_log INCLUDING ALL)")
        .execute(&app.pool)
        .await
        .unwrap();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let details: Vec<String> = (0..BATCH)
            .map(|_| {
                json!({ "kek_version": "1", "client": "bench", "dek_id": Uuid::now_v7() })
                    .to_string()
            })
            .collect();
        let start = Instant::now();
        let mut tx = app.pool.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO bench_audit (tenant_id, provider, key_ref, action, outcome, source,
                                      event_id, detail)
             SELECT 'batch', NULL, NULL, 'dek_unwrap', 'allowed', 'api', NULL, u.detail::jsonb
             FROM UNNEST($1::text[]) WITH ORDINALITY AS u(detail, n) ORDER BY u.n",
        )
        .bind(&details)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        out.push(start.elapsed());
    }
    out
}

/// The daemon's audit writer alone (its code, in this process, on a pool of its own like
/// the daemon's): `clients` callers recording one unwrap row each and waiting for the
/// commit, as every cached unwrap does. With `writers` > 1, that many independent writers
/// share the callers: what several commits in flight would give (the daemon has one).
/// Returns (rows/s, latencies, rows per transaction).
async fn audit_writer_alone(
    app: &TestApp,
    clients: usize,
    writers: usize,
    measure: Duration,
) -> (f64, Vec<Duration>, f64) {
    let mut pool = Vec::with_capacity(writers);
    for _ in 0..writers {
        let store = byokd::store::Store::connect(&daemon_db_url(app), 4)
            .await
            .unwrap();
        pool.push(byokd::access::audit::AuditWriter::start(store, 1024));
    }
    let since = audit_watermark(app).await;
    let until = Instant::now() + measure;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let writer = pool[c % writers].clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < until {
                    let row = byokd::store::AuditRow {
                        tenant_id: Some("hot".into()),
                        provider: None,
                        key_ref: None,
                        action: "dek_unwrap".into(),
                        outcome: "allowed".into(),
                        source: "api".into(),
                        event_id: None,
                        detail: json!({ "kek_version": "1", "client": "bench",
                                        "dek_id": Uuid::now_v7() }),
                    };
                    let start = Instant::now();
                    writer.record(vec![row]).await.unwrap();
                    latencies.push(start.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let (rows, commits) = audit_commits(app, since).await;
    (
        all.len() as f64 / measure.as_secs_f64(),
        all,
        rows as f64 / commits.max(1) as f64,
    )
}

async fn seed(app: &TestApp, tenant: &str, key: &str, deks: usize) -> Vec<Uuid> {
    app.tenant_with_key_offline(tenant, key).await;
    app.bulk_deks(tenant, key, deks)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

async fn unwrap_from_cache(app: &TestApp, daemon: &Daemon, token: &str, hot: &[Uuid]) {
    let clients = env("BYOKD_BENCH_CLIENTS", 16);
    let secs = env("BYOKD_BENCH_SECS", 5) as u64;
    let rounds = env("BYOKD_BENCH_ROUNDS", 2);
    println!(
        "\n1. unwrap of {} cached DEKs, audit on, one replica: {clients} keep-alive HTTP/1.1 clients, {rounds} round(s) of {secs} s per side",
        hot.len()
    );
    let (explicit, single) = commit_floor(app, 500).await;
    println!(
        "PostgreSQL (server defaults), one small INSERT committed, sequential (the floor of an audited answer): BEGIN/INSERT/COMMIT {}; INSERT alone {}",
        summary(explicit),
        summary(single)
    );
    // Cached: each hot DEK unwrapped once (the KMS), then served from the replica's cache.
    let http = keep_alive_client();
    for id in hot {
        assert_eq!(
            send(&http, &daemon.unwrap_url("hot", *id), token).await.0,
            200
        );
    }
    let urls = Arc::new(
        hot.iter()
            .map(|id| daemon.unwrap_url("hot", *id))
            .collect::<Vec<_>>(),
    );
    let (bare_base, stop_bare) = bare_server();
    let bare_urls = Arc::new(
        hot.iter()
            .map(|id| format!("{bare_base}/v1/tenants/hot/deks/{id}/unwrap"))
            .collect::<Vec<_>>(),
    );
    let stack_urls = Arc::new(vec![format!("{}/healthz", daemon.base)]);
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs(secs);
    let (mut bare_all, mut byokd_all) = (Vec::new(), Vec::new());
    let (mut bare_n, mut byokd_n) = (0usize, 0usize);
    for round in 1..=rounds {
        let cpu = Cpu::start(app, None).await;
        let bare = closed_loop(bare_urls.clone(), token, clients, warmup, measure, 200).await;
        let bare_cpu = cpu.report(app).await;
        // The daemon's HTTP stack without key access: a route that refuses the method
        // (405, no authentication, no audit).
        let cpu = Cpu::start(app, Some(daemon.pid())).await;
        let stack = closed_loop(stack_urls.clone(), token, clients, warmup, measure, 405).await;
        let stack_cpu = cpu.report(app).await;
        let since = audit_watermark(app).await;
        let cpu = Cpu::start(app, Some(daemon.pid())).await;
        let byokd = closed_loop(urls.clone(), token, clients, warmup, measure, 200).await;
        let byokd_cpu = cpu.report(app).await;
        let (rows, commits) = audit_commits(app, since).await;
        println!(
            "[round {round}] bare axum, 32 bytes: {:.0} req/s, {} (failed {}); {bare_cpu}",
            bare.rate(),
            summary(bare.latencies.clone()),
            bare.failed
        );
        println!(
            "[round {round}] byokd, POST /healthz (405: its HTTP stack, no key access): {:.0} req/s, {}; {stack_cpu}",
            stack.rate(),
            summary(stack.latencies),
        );
        println!(
            "[round {round}] byokd unwrap (cached, audited): {:.0} req/s, {} (failed {}); {byokd_cpu}; audit group commits of {:.1} rows on average ({rows} rows in {commits} transactions, warm-up included)",
            byokd.rate(),
            summary(byokd.latencies.clone()),
            byokd.failed,
            rows as f64 / commits.max(1) as f64,
        );
        println!(
            "[round {round}] ratio byokd / bare = {:.2}",
            byokd.rate() / bare.rate()
        );
        bare_n += bare.latencies.len();
        byokd_n += byokd.latencies.len();
        bare_all.extend(bare.latencies);
        byokd_all.extend(byokd.latencies);
    }
    let total = (rounds as u64 * secs) as f64;
    let (bare_rate, byokd_rate) = (bare_n as f64 / total, byokd_n as f64 / total);
    println!(
        "=> unwrap from cache: {byokd_rate:.0} req/s vs bare axum {bare_rate:.0} req/s: ratio {:.2} (goal >= 0.5); byokd {} (goal p99 < 2 ms); bare {}",
        byokd_rate / bare_rate,
        summary(byokd_all),
        summary(bare_all)
    );
    for writers in [1, 4] {
        let (rate, latencies, per_commit) =
            audit_writer_alone(app, clients, writers, Duration::from_secs(secs)).await;
        println!(
            "the audit writer alone (byokd's AuditWriter in this process, no HTTP), {clients} callers of one row each, {}: {rate:.0} rows/s, {}; group commits of {per_commit:.1} rows",
            if writers == 1 {
                "one writer as in the daemon".to_owned()
            } else {
                format!("{writers} independent writers (commits in flight at once)")
            },
            summary(latencies)
        );
    }
    // The same with one client: the latency of an answer that waits for its own commit.
    let single = closed_loop(urls.clone(), token, 1, warmup, Duration::from_secs(2), 200).await;
    println!(
        "byokd unwrap with 1 client: {:.0} req/s, {}",
        single.rate(),
        summary(single.latencies)
    );
    let _ = stop_bare.send(());
}

async fn batch_unwraps(app: &TestApp, daemon: &Daemon, token: &str, ids: &[Uuid]) {
    let batches = ids.len() / BATCH;
    let repeats = 3;
    println!(
        "\n2. batch unwrap of {BATCH} DEKs, one client: {batches} distinct batches cold (KMS), each then {repeats} times hot (cache)"
    );
    let http = keep_alive_client();
    let (mut cold, mut hot) = (Vec::new(), Vec::new());
    // CPU ticks (10 ms) of the daemon and of this database's PostgreSQL backends spent in
    // cold and in hot batches.
    let pid = daemon.pid().to_string();
    let (mut cold_cpu, mut hot_cpu) = ((0, 0), (0, 0));
    for chunk in ids.chunks(BATCH) {
        for i in 0..=repeats {
            let (d0, p0) = (cpu_ticks(&pid), postgres_ticks(app).await);
            let (t, ok) = batch_unwrap(&http, &daemon.base, token, "batch", chunk).await;
            let d = cpu_ticks(&pid).saturating_sub(d0);
            let p = ticks_since(&p0, &postgres_ticks(app).await);
            assert_eq!(ok, chunk.len());
            let (latencies, cpu) = if i == 0 {
                (&mut cold, &mut cold_cpu)
            } else {
                (&mut hot, &mut hot_cpu)
            };
            latencies.push(t);
            *cpu = (cpu.0 + d, cpu.1 + p);
        }
    }
    let per_batch = |(d, p): (u64, u64), n: usize| {
        format!(
            "CPU per batch: byokd {:.0} ms, postgres {:.0} ms",
            d as f64 * 10.0 / n as f64,
            p as f64 * 10.0 / n as f64
        )
    };
    let (n_cold, n_hot) = (cold.len(), hot.len());
    println!(
        "=> batch of {BATCH} cold: {}; {}",
        summary(cold),
        per_batch(cold_cpu, n_cold)
    );
    println!(
        "=> batch of {BATCH} hot: {}; {}",
        summary(hot),
        per_batch(hot_cpu, n_hot)
    );
    println!(
        "the database alone: {BATCH} audit rows like the daemon's inserted and committed in one transaction: {}",
        summary(audit_insert_floor(app, batches.max(5)).await)
    );
}

/// One revoked tenant: when its event was published, and when each replica first refused.
#[derive(Default)]
struct Probe {
    published: OnceLock<Instant>,
    /// When the broker delivered a copy of the event to a bare consumer, per queue type of
    /// [`OBSERVED_QUEUES`]: the broker's share of a round, without byokd.
    delivered: [OnceLock<Duration>; 2],
    /// When PostgreSQL delivered the commit's `byokd_access` notification to a listener of
    /// this process (the same channel the replicas listen on): splits a slow round into the
    /// commit's share and the replicas' share.
    notified: OnceLock<Duration>,
    refused: [OnceLock<Duration>; REPLICAS],
    /// Checkpoints PostgreSQL had completed when the round started and ended.
    checkpoints: OnceLock<(i64, i64)>,
}

/// The queue types the observer times the broker's delivery through, each bound like the
/// urgent lane: a quorum queue, as the urgent lane is, and a classic durable queue, which
/// delivers without waiting for its log's fsync (what the urgent lane would gain as one).
const OBSERVED_QUEUES: [&str; 2] = ["quorum", "classic"];

/// Times each round's broker delivery and commit notification on a thread and runtime of
/// its own, away from the load clients: a quorum queue of its own bound like the urgent lane
/// and a classic durable queue bound the same (two more copies of each revocation for the
/// broker to write), and a `LISTEN` on `byokd_access`.
struct Observer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Observer {
    async fn start(app: &TestApp, probes: Arc<Vec<Probe>>) -> Observer {
        let queue = format!("{}.probe", app.config.amqp.lifecycle_queue);
        let exchange = app.config.amqp.lifecycle_exchange.clone();
        let db_url = app.db.url.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, is_ready) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(observe(queue, exchange, db_url, probes, ready, stopped));
        });
        is_ready.await.unwrap();
        Observer {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// The round a `byokd_access` payload or an event id (`rv{p}` / `rv-{p}-...`) belongs to.
fn round_of(text: &str) -> Option<usize> {
    let rest = text.strip_prefix("rv")?;
    let rest = rest.strip_prefix('-').unwrap_or(rest);
    rest.split('-').next()?.parse().ok()
}

async fn observe(
    queue: String,
    exchange: String,
    db_url: String,
    probes: Arc<Vec<Probe>>,
    ready: tokio::sync::oneshot::Sender<()>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    use futures_util::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let conn = lapin::Connection::connect(&common::amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let names = OBSERVED_QUEUES.map(|kind| format!("{queue}-{kind}"));
    let mut consumers = Vec::new();
    for (i, (name, kind)) in names.iter().zip(OBSERVED_QUEUES).enumerate() {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(kind)),
        );
        channel
            .queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .unwrap();
        channel
            .queue_bind(
                name.as_str().into(),
                exchange.as_str().into(),
                "local.disabled".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let consumer = channel
            .basic_consume(
                name.as_str().into(),
                format!("bench-observer-{kind}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        consumers.push(consumer.map(move |delivery| (i, delivery)));
    }
    let mut deliveries = futures_util::stream::select_all(consumers);
    let mut listener = sqlx::postgres::PgListener::connect(&db_url).await.unwrap();
    listener.listen("byokd_access").await.unwrap();
    let _ = ready.send(());
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            Some((queue, Ok(delivery))) = deliveries.next() => {
                if let Some((probe, at)) = delivered_round(&probes, &delivery) {
                    let _ = probe.delivered[queue].set(at);
                }
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
            Ok(n) = listener.recv() => {
                if let Some(probe) = round_of(n.payload()).and_then(|p| probes.get(p))
                    && let Some(at) = probe.published.get()
                {
                    let _ = probe.notified.set(at.elapsed());
                }
            }
        }
    }
    for name in &names {
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
}

/// The round a delivered event belongs to, and the time since its publish.
fn delivered_round<'p>(
    probes: &'p [Probe],
    delivery: &lapin::message::Delivery,
) -> Option<(&'p Probe, Duration)> {
    let body = serde_json::from_slice::<Value>(&delivery.data).ok()?;
    let probe = probes.get(body["id"].as_str().and_then(round_of)?)?;
    Some((probe, probe.published.get()?.elapsed()))
}

async fn revocation_to_refusal(app: &TestApp, replicas: &[Daemon], token: &str) {
    let revocations = env("BYOKD_BENCH_REVOCATIONS", 20);
    let per_replica = env("BYOKD_BENCH_REPLICA_CLIENTS", 8);
    println!(
        "\n3. revocation to refusal, {REPLICAS} replicas on one database and one set of queues, {per_replica} clients per replica unwrapping cached DEKs of the tenant about to be revoked at full rate; {revocations} revocations (key disabled at the local KMS, then `disabled` published with routing key local.disabled)"
    );
    let mut probe_ids = Vec::with_capacity(revocations);
    for p in 0..revocations {
        probe_ids.push(seed(app, &format!("rv{p}"), &format!("rv-key-{p}"), PROBE_DEKS).await);
    }
    // Every probe DEK cached on every replica before the load starts.
    let http = keep_alive_client();
    for d in replicas {
        for (p, ids) in probe_ids.iter().enumerate() {
            let (_, ok) = batch_unwrap(&http, &d.base, token, &format!("rv{p}"), ids).await;
            assert_eq!(ok, ids.len());
        }
    }
    // urls[replica][probe][dek]
    let urls: Arc<Vec<Vec<Vec<String>>>> = Arc::new(
        replicas
            .iter()
            .map(|d| {
                probe_ids
                    .iter()
                    .enumerate()
                    .map(|(p, ids)| {
                        ids.iter()
                            .map(|id| d.unwrap_url(&format!("rv{p}"), *id))
                            .collect()
                    })
                    .collect()
            })
            .collect(),
    );
    let probes: Arc<Vec<Probe>> = Arc::new((0..revocations).map(|_| Probe::default()).collect());
    let round = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let served: Arc<[AtomicU64; REPLICAS]> = Arc::default();
    let unexpected = Arc::new(AtomicU64::new(0));
    let first_unexpected: Arc<OnceLock<String>> = Arc::default();
    let mut workers = Vec::new();
    for r in 0..REPLICAS {
        for w in 0..per_replica {
            let (urls, probes, round, stop, served, unexpected, first_unexpected) = (
                urls.clone(),
                probes.clone(),
                round.clone(),
                stop.clone(),
                served.clone(),
                unexpected.clone(),
                first_unexpected.clone(),
            );
            let token = token.to_owned();
            workers.push(tokio::spawn(async move {
                let http = keep_alive_client();
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let p = round.load(Ordering::Acquire);
                    let deks = &urls[r][p];
                    let (status, _, body) = send(&http, &deks[i % deks.len()], &token).await;
                    i += 1;
                    // Refused because the tenant is inaccessible, not by the KMS.
                    let inaccessible = || String::from_utf8_lossy(&body).contains("inaccessible");
                    match (status, probes[p].published.get()) {
                        (200, _) => {
                            served[r].fetch_add(1, Ordering::Relaxed);
                        }
                        (403, Some(at)) if inaccessible() => {
                            let _ = probes[p].refused[r].set(at.elapsed());
                        }
                        (_, published) => {
                            unexpected.fetch_add(1, Ordering::Relaxed);
                            let _ = first_unexpected.set(format!(
                                "replica {}, tenant rv{p}, {}: {status} {}",
                                r + 1,
                                if published.is_some() {
                                    "after the publish"
                                } else {
                                    "before the publish"
                                },
                                String::from_utf8_lossy(&body)
                            ));
                        }
                    }
                }
            }));
        }
    }
    // The broker's delivery and the commit's notification are timed on a thread of their
    // own: on this process's runtime they queued behind the 24 load clients, and the
    // notification was seen up to 100 ms after the replicas had acted on it. The thread
    // still waits for the machine's cores, so its times are upper bounds.
    let observer = Observer::start(app, probes.clone()).await;
    let checkpoints = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap_or(-1)
    };
    let started = Instant::now();
    let cpu = Cpu::start(app, None).await;
    let mut timeouts = 0;
    for (p, probe) in probes.iter().enumerate() {
        let checkpoints_before = checkpoints().await;
        round.store(p, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The KMS says disabled first, as it would; the cached DEKs are still served.
        app.kms_do(&format!("rv-key-{p}"), "disabled", &json!({}))
            .await;
        let body = canonical(
            &format!("rv-{p}-{}", Uuid::new_v4()),
            "disabled",
            &format!("rv-key-{p}"),
            chrono::Utc::now(),
            json!({}),
        )
        .to_string();
        probe.published.set(Instant::now()).unwrap();
        app.channel
            .basic_publish(
                app.config.amqp.lifecycle_exchange.as_str().into(),
                "local.disabled".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while probe.refused.iter().any(|r| r.get().is_none()) {
            if Instant::now() > deadline {
                timeouts += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = probe
            .checkpoints
            .set((checkpoints_before, checkpoints().await));
    }
    observer.stop();
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu.report(app).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let rates: Vec<String> = served
        .iter()
        .map(|s| format!("{:.0}", s.load(Ordering::Relaxed) as f64 / elapsed))
        .collect();
    println!(
        "load meanwhile: {} unwraps/s served per replica; other answers (a 403 before the publish or from the KMS rather than the gate, errors): {}; {cpu}",
        rates.join(", "),
        unexpected.load(Ordering::Relaxed)
    );
    if let Some(first) = first_unexpected.get() {
        println!("the first of them: {first}");
    }
    let mut all = Vec::new();
    for r in 0..REPLICAS {
        let v: Vec<Duration> = probes
            .iter()
            .filter_map(|p| p.refused[r].get().copied())
            .collect();
        println!(
            "replica {}: publish -> first 403: {}",
            r + 1,
            summary(v.clone())
        );
        all.extend(v);
    }
    let last: Vec<Duration> = probes
        .iter()
        .filter_map(|p| {
            p.refused
                .iter()
                .map(|r| r.get().copied())
                .collect::<Option<Vec<_>>>()
                .and_then(|v| v.into_iter().max())
        })
        .collect();
    // The slowest rounds, split at the commit's notification.
    let mut slowest: Vec<(usize, Duration)> = probes
        .iter()
        .enumerate()
        .map(|(p, probe)| {
            let worst = probe.refused.iter().map(|r| r.get().copied());
            // A replica that never refused counts as slowest.
            (
                p,
                worst
                    .map(|r| r.unwrap_or(Duration::MAX))
                    .max()
                    .unwrap_or_default(),
            )
        })
        .collect();
    slowest.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
    let ms =
        |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.0}", d.as_secs_f64() * 1e3));
    for (p, _) in slowest.iter().take(3) {
        let probe = &probes[*p];
        let refused: Vec<String> = probe.refused.iter().map(|r| ms(r.get().copied())).collect();
        let (before, after) = probe.checkpoints.get().copied().unwrap_or((-1, -1));
        println!(
            "slow round {}: publish -> broker delivery to a bare consumer {} ms (classic queue {} ms); -> commit notified {} ms; -> first 403 per replica {} ms; checkpoints completed during it: {}",
            p + 1,
            ms(probe.delivered[0].get().copied()),
            ms(probe.delivered[1].get().copied()),
            ms(probe.notified.get().copied()),
            refused.join(" / "),
            after - before
        );
    }
    let times = |of: &dyn Fn(&Probe) -> &OnceLock<Duration>| -> Vec<Duration> {
        probes.iter().filter_map(|p| of(p).get().copied()).collect()
    };
    for (i, kind) in OBSERVED_QUEUES.iter().enumerate() {
        println!(
            "publish -> broker delivery to a bare consumer of a {kind} queue: {}",
            summary(times(&|p| &p.delivered[i]))
        );
    }
    println!(
        "publish -> commit notified: {}",
        summary(times(&|p| &p.notified))
    );
    println!(
        "=> revocation to refusal, every replica's first 403 (goal p99 < 250 ms): {}; until all {REPLICAS} refuse: {}; rounds with a replica still serving after 5 s: {timeouts}",
        summary(all),
        summary(last)
    );
}

/// `count`, mean and the non-empty buckets of one histogram in Prometheus text.
fn histogram(text: &str, name: &str) -> String {
    let value = |suffix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_{suffix} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (count, sum) = (value("count"), value("sum"));
    let mut below = 0.0;
    let mut buckets = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{le=\"")) else {
            continue;
        };
        let Some((le, n)) = rest.split_once("\"} ") else {
            continue;
        };
        let n: f64 = n.trim().parse().unwrap_or(0.0);
        if n > below {
            buckets.push(format!("{} <= {le} s", n - below));
        }
        below = n;
    }
    format!(
        "n={count} mean={:.0} ms ({})",
        if count > 0.0 { sum / count * 1e3 } else { 0.0 },
        buckets.join(", ")
    )
}

async fn rss_with_cache(app: &TestApp, token: &str, ids: &[Uuid]) {
    println!(
        "\n4. RSS of a fresh daemon process after unwrapping {} distinct DEKs (batches of {BATCH})",
        ids.len()
    );
    let daemon = Daemon::start(app).await;
    let (idle, _) = daemon.rss_mb();
    let http = keep_alive_client();
    let mut cached_rss = 0.0;
    for pass in ["the first time, from the KMS", "again, from the cache"] {
        let start = Instant::now();
        for chunk in ids.chunks(BATCH) {
            let (_, ok) = batch_unwrap(&http, &daemon.base, token, "batch", chunk).await;
            assert_eq!(ok, chunk.len());
        }
        let took = start.elapsed().as_secs_f64();
        // moka applies its bookkeeping in the background.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rss, hwm) = daemon.rss_mb();
        println!(
            "after unwrapping the {} DEKs {pass} ({took:.2} s): VmRSS {rss:.1} MB, VmHWM {hwm:.1} MB (idle {idle:.1} MB)",
            ids.len()
        );
        if cached_rss == 0.0 {
            cached_rss = rss;
        }
    }
    println!(
        "=> RSS with {} cached DEKs: {cached_rss:.1} MB (idle {idle:.1} MB; goal < 60 MB)",
        ids.len()
    );
    daemon.stop();
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let hot_n = env("BYOKD_BENCH_HOT", 64);
    let batches = env("BYOKD_BENCH_BATCHES", 20);
    let rss_deks = env("BYOKD_BENCH_RSS_DEKS", 10_000);
    let t = Instant::now();
    let mut app = TestApp::spawn().await;
    // The in-process daemon only set up the database and queues: the daemons measured are
    // processes of the release binary.
    app.stop().await;
    let hot = seed(&app, "hot", "hot-key", hot_n).await;
    let batch_ids = seed(&app, "batch", "batch-key", (batches * BATCH).max(rss_deks)).await;
    sqlx::query("VACUUM ANALYZE")
        .execute(&app.pool)
        .await
        .unwrap();
    println!(
        "key-access benchmark: seeded {} DEKs in {:.1} s",
        hot.len() + batch_ids.len(),
        t.elapsed().as_secs_f64()
    );
    let a = Daemon::start(&app).await;
    let token = create_client(&app.http, &a.base, "bench").await;

    if part('1') {
        unwrap_from_cache(&app, &a, &token, &hot).await;
    }
    if part('2') {
        batch_unwraps(&app, &a, &token, &batch_ids[..batches * BATCH]).await;
    }
    a.stop();
    if part('3') {
        // Fresh replicas: every probe DEK fits in their caches (a full cache may decline to
        // admit a new entry).
        let replicas = [
            Daemon::start(&app).await,
            Daemon::start(&app).await,
            Daemon::start(&app).await,
        ];
        revocation_to_refusal(&app, &replicas, &token).await;
        // The consumers' own share: from a revoking event's receipt to its commit.
        let mut received_to_commit = Vec::new();
        for d in &replicas {
            let text = app
                .http
                .get(format!("{}/metrics", d.base))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            received_to_commit.push(histogram(&text, "byokd_revocation_effect_latency_seconds"));
        }
        println!(
            "receipt -> commit of the revoking events, per replica (byokd_revocation_effect_latency_seconds; each event is applied by whichever of the main queue's and the urgent lane's consumers gets it first): {}",
            received_to_commit.join("; ")
        );
        for d in replicas {
            d.stop();
        }
    }
    if part('4') {
        rss_with_cache(&app, &token, &batch_ids[..rss_deks]).await;
    }
    println!("\ndone in {:.0} s", t.elapsed().as_secs_f64());
    app.shutdown().await;
}
