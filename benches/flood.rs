//! Memory against hostile input (issue 15): the peak RSS of a `byokd run` process draining a
//! flood of messages at and over the size limit, with the prefetch bounded by
//! `amqp.prefetch_bytes` (the default, and a tighter budget) and, for contrast, effectively
//! unbounded (the prefetch of 2048 byokd used before the budget existed).
//!
//! The flood is published first, so the broker pushes the whole prefetch at once: the worst
//! case. Half the messages are exactly `max_message_bytes` of junk (read, parsed, refused),
//! half are 25% larger (refused unread); all are dead-lettered. The local broker accepts
//! both; production's `max_message_size` (compose sets it) refuses the larger ones at the
//! door, so this is worse than production sees.
//!
//! Run with `cargo bench --bench flood` (needs the local RabbitMQ and PostgreSQL).
//! `BYOKD_BENCH_FLOOD` sets the number of messages (default 3000, about 850 MB). Prints
//! figures; asserts none.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use common::{TestApp, rss_mb};
use std::time::{Duration, Instant};

const MAX_MESSAGE_BYTES: usize = 256 * 1024;

fn flood_size() -> usize {
    std::env::var("BYOKD_BENCH_FLOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

async fn publish_flood(app: &TestApp, n: usize) {
    let at_limit = vec![b'x'; MAX_MESSAGE_BYTES];
    let over = vec![b'y'; MAX_MESSAGE_BYTES + MAX_MESSAGE_BYTES / 4];
    let bodies: Vec<&[u8]> = (0..n)
        .map(|i| if i % 2 == 0 { &at_limit[..] } else { &over[..] })
        .collect();
    app.publish_pipelined("flood", 200, &bodies).await;
}

async fn run(label: &str, prefetch_bytes: usize, n: usize) {
    let mut app = TestApp::spawn_with(|c| c.amqp.max_message_bytes = MAX_MESSAGE_BYTES).await;
    // The flood waits in the queue for a daemon of its own process.
    app.stop().await;
    publish_flood(&app, n).await;
    let queue = app.config.amqp.lifecycle_queue.clone();
    let backlog = app.queue_depth(&queue).await;
    let prefetch_bytes = prefetch_bytes.to_string();
    let max = MAX_MESSAGE_BYTES.to_string();
    let (mut child, _port) = app.daemon_process(&[
        ("BYOKD_AMQP__PREFETCH", "2048"),
        ("BYOKD_AMQP__PREFETCH_BYTES", &prefetch_bytes),
        ("BYOKD_AMQP__MAX_MESSAGE_BYTES", &max),
    ]);
    let pid = child.id();
    let started = Instant::now();
    let mut peak_rss: f64 = 0.0;
    let mut drained = None;
    let dead_queue = app.config.amqp.dead_letter_queue.clone();
    // Every message is refused, so the flood is drained when all of it is in the dead-letter
    // queue (the queue's own count shows only messages not yet pushed to the consumer).
    while started.elapsed() < Duration::from_secs(600) {
        let (rss, _) = rss_mb(pid);
        peak_rss = peak_rss.max(rss);
        let dead = app.queue_depth(&dead_queue).await;
        if std::env::var_os("BYOKD_BENCH_TRACE").is_some() {
            eprintln!(
                "{:>6.2} s rss {rss:.1} MB ready {} dead {dead}",
                started.elapsed().as_secs_f64(),
                app.queue_depth(&queue).await,
            );
        }
        if dead >= backlog {
            drained = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (rss, hwm) = rss_mb(pid);
    let dead = app.queue_depth(&app.config.amqp.dead_letter_queue).await;
    let budget_prefetch = (prefetch_bytes.parse::<usize>().unwrap() / MAX_MESSAGE_BYTES).min(2048);
    println!(
        "{label:<34} prefetch {budget_prefetch:>4} (worst case {:>5.0} MB in flight): peak RSS \
         {:>6.1} MB (VmHWM {hwm:>6.1} MB, now {rss:>5.1} MB), {backlog} messages drained in {}, \
         {dead} dead-lettered",
        (budget_prefetch as f64 * (MAX_MESSAGE_BYTES + MAX_MESSAGE_BYTES / 4) as f64)
            / (1024.0 * 1024.0),
        peak_rss.max(hwm),
        drained.map_or("(not within 600 s)".to_owned(), |d| format!(
            "{:.1} s",
            d.as_secs_f64()
        )),
    );
    let _ = child.kill();
    let _ = child.wait();
    app.shutdown().await;
}

#[tokio::main]
async fn main() {
    let n = flood_size();
    println!(
        "Flood of {n} messages (half at the {} KiB limit, half 25% over it), published before \
         the daemon starts; peak RSS of the byokd process while it drains them:",
        MAX_MESSAGE_BYTES / 1024
    );
    // Idle, for the baseline.
    run("no budget (prefetch 2048, before)", usize::MAX / 2, n).await;
    run("default budget (256 MiB)", 256 * 1024 * 1024, n).await;
    run("tight budget (32 MiB)", 32 * 1024 * 1024, n).await;
}
