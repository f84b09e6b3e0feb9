//! Notification benchmark (issue 5): webhook deliveries per second through the outbox loop
//! to a local receiver (loopback, allowlisted), first with ten healthy endpoints, then with
//! one of the ten answering only after 5 s, to show the other nine keep their rate.
//!
//! Run with `cargo bench --bench notify` (needs the local PostgreSQL). `BYOKD_BENCH_WEBHOOKS`
//! sets the number of notifications per scenario (default 10000). Prints figures; asserts
//! none.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use byokd::notify::outbox::outbox_loop;
use common::notify::{NotifyEnv, Receiver, Reply};
use std::time::{Duration, Instant};
use uuid::Uuid;

const ENDPOINTS: usize = 10;

fn total() -> usize {
    std::env::var("BYOKD_BENCH_WEBHOOKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

async fn seed(env: &NotifyEnv, tenant: &str, endpoints: &[Uuid], n: usize) {
    let recipients: Vec<String> = endpoints.iter().map(Uuid::to_string).collect();
    let payload = common::notify::payload(tenant, "key.expired");
    sqlx::query(
        "INSERT INTO outbox (id, tenant_id, channel, recipient, kind, dedupe_key, payload)
         SELECT gen_random_uuid(), $1, 'webhook', ($2::text[])[1 + g % $3], 'key.expired',
                $1 || ':' || g, $4::jsonb
         FROM generate_series(0, $5 - 1) g",
    )
    .bind(tenant)
    .bind(&recipients)
    .bind(recipients.len() as i32)
    .bind(payload.to_string())
    .bind(n as i32)
    .execute(&env.pool)
    .await
    .unwrap();
}

async fn delivered(env: &NotifyEnv, recipients: &[String]) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE status = 'delivered' AND recipient = ANY($1)",
    )
    .bind(recipients)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

/// Runs the loop until the rows of `measured` endpoints are delivered; returns the elapsed
/// time and how many rows of the other endpoints were delivered by then.
async fn run(
    env: &NotifyEnv,
    measured: &[String],
    expected: i64,
    others: &[String],
) -> (Duration, i64) {
    let dispatcher = env.dispatcher(|c| {
        c.notify.poll_ms = 20;
        c.notify.webhook_timeout_ms = 15_000;
    });
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let worker = tokio::spawn(outbox_loop(dispatcher, stopped));
    loop {
        if delivered(env, measured).await >= expected {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            println!("gave up waiting after 600 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    let others_done = delivered(env, others).await;
    let _ = stop.send(true);
    let _ = worker.await;
    (elapsed, others_done)
}

#[tokio::main]
async fn main() {
    let n = total();
    let per_endpoint = n / ENDPOINTS;
    let env = NotifyEnv::new().await;
    let defaults = byokd::config::NotifySettings::default();
    println!(
        "notify benchmark: {n} webhooks over {ENDPOINTS} endpoints on loopback; \
         {} in flight overall, {} per endpoint",
        defaults.max_in_flight, defaults.max_in_flight_per_recipient
    );

    // Scenario 1: ten healthy endpoints.
    let rx = Receiver::start().await;
    let urls: Vec<String> = (0..ENDPOINTS).map(|i| rx.url(&format!("/e{i}"))).collect();
    let eps = env.tenant("bench-a", &[], &urls).await;
    seed(&env, "bench-a", &eps, n).await;
    let all: Vec<String> = eps.iter().map(Uuid::to_string).collect();
    let (elapsed, _) = run(&env, &all, n as i64, &[]).await;
    let rate = n as f64 / elapsed.as_secs_f64();
    println!(
        "healthy:   {n} delivered in {:.2} s = {rate:.0} deliveries/s ({:.0}/s per endpoint)",
        elapsed.as_secs_f64(),
        rate / ENDPOINTS as f64
    );

    // Scenario 2: endpoint 0 answers after 5 s.
    let slow = Receiver::start().await;
    slow.set_default(Reply::Slow(Duration::from_secs(5)));
    let fast = Receiver::start().await;
    let mut urls = vec![slow.url("/slow")];
    urls.extend((1..ENDPOINTS).map(|i| fast.url(&format!("/e{i}"))));
    let eps = env.tenant("bench-b", &[], &urls).await;
    seed(&env, "bench-b", &eps, n).await;
    let slow_ep = vec![eps[0].to_string()];
    let fast_eps: Vec<String> = eps[1..].iter().map(Uuid::to_string).collect();
    let fast_n = (per_endpoint * (ENDPOINTS - 1)) as i64;
    let (elapsed, slow_done) = run(&env, &fast_eps, fast_n, &slow_ep).await;
    let rate = fast_n as f64 / elapsed.as_secs_f64();
    println!(
        "one slow:  the 9 healthy endpoints' {fast_n} delivered in {:.2} s = {rate:.0} deliveries/s \
         ({:.0}/s per endpoint); the 5 s endpoint had {slow_done} of {per_endpoint} delivered by then",
        elapsed.as_secs_f64(),
        rate / (ENDPOINTS - 1) as f64
    );
    env.cleanup().await;
}
