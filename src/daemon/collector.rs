//! The metrics collector: the daemon task (`metrics_collector`) that refreshes the gauges
//! describing state rather than events — outbox depth and age, dead letters, keys, tenants,
//! re-wrap progress, schedules — plus the build info, the consumers' state and the process
//! metrics.
//!
//! Each round runs one aggregate query per gauge family (served by partial indexes where the
//! table is large) and one passive queue declare on the broker, so several replicas each
//! refreshing every `metrics.collect_interval_ms` cost the database a handful of index scans.
//! A failed source keeps its gauges at their last value and counts
//! `byokd_metrics_collector_errors_total`; the next round tries again.

use crate::broker::SETUP_TIMEOUT;
use crate::domain::{Access, KeyState, Provider};
use crate::events::amqp::{ConsumerHealth, ConsumerState};
use crate::store::Store;
use crate::store::metrics::{JobProgress, KeyCount, OutboxDepth};
use crate::sweeps::Schedule;
use crate::telemetry::{
    BUILD_INFO, COLLECTOR_ERRORS, CONSUMER_UP, DEAD_LETTER_QUEUE_MESSAGES, KEYS, KEYS_UNREACHABLE,
    MAX_JOB_SERIES, OUTBOX_OLDEST_AGE, OUTBOX_ROWS, REWRAP_DEKS_REMAINING, SCHEDULE_INTERVAL,
    SCHEDULE_LAST_SUCCESS, TENANTS, git_sha, process,
};
use chrono::{DateTime, Utc};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A re-wrap job's series: its id and `kind/state`.
type JobSeries = (i64, String);

/// Keys per (provider, state).
type KeysByProviderState = BTreeMap<(String, String), i64>;

/// Outbox channels and the undelivered statuses, zero-filled so an empty outbox shows 0
/// rather than no series.
const OUTBOX_CHANNELS: &[&str] = &["amqp", "email", "webhook", "operator"];
const OUTBOX_STATUSES: &[&str] = &["pending", "dead"];

/// What the collector reads.
#[derive(Clone)]
pub struct Collector {
    /// The database.
    pub store: Store,
    /// Broker URL, for the dead-letter queue's depth; `None` on a node without a broker
    /// (there is no dead-letter queue, and no broker to count as down).
    pub amqp_url: Option<String>,
    /// The lifecycle dead-letter queue.
    pub dead_letter_queue: String,
    /// Configured schedules (their names bound the schedule label).
    pub schedules: Arc<Vec<Schedule>>,
    /// The consumers, by queue name, whose state `byokd_consumer_up` shows.
    pub consumers: Vec<(String, Arc<ConsumerHealth>)>,
    /// Time between rounds.
    pub interval: Duration,
}

/// Runs a round at once and then every `interval` until `shutdown` turns true.
pub async fn collect_loop(collector: Collector, mut shutdown: watch::Receiver<bool>) {
    let mut broker = None;
    let mut jobs = BTreeSet::new();
    // The consumers declare the topology as the daemon starts: a passive declare of the
    // dead-letter queue in the same instant would count an error for nothing.
    let mut first = true;
    while !*shutdown.borrow() {
        collector.round(&mut broker, &mut jobs, !first).await;
        first = false;
        tokio::select! {
            _ = tokio::time::sleep(collector.interval) => {}
            _ = shutdown.changed() => {}
        }
    }
    if let Some(conn) = broker {
        let _ = conn.close(200, "shutdown".into()).await;
    }
}

impl Collector {
    /// One round: every gauge the collector owns. `jobs` carries the job series set last
    /// round, so a job that finished is set to 0 once (then dropped as idle).
    async fn round(
        &self,
        broker: &mut Option<Connection>,
        jobs: &mut BTreeSet<JobSeries>,
        read_broker: bool,
    ) {
        metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "git_sha" => git_sha())
            .set(1.0);
        process().collect();
        for (queue, health) in &self.consumers {
            if health.get() != ConsumerState::Disabled {
                let up = health.get() == ConsumerState::Consuming;
                metrics::gauge!(CONSUMER_UP, "queue" => queue.clone()).set(f64::from(u8::from(up)));
            }
        }
        let now = Utc::now();
        for schedule in self.schedules.iter() {
            if let Some(secs) = interval_secs(&schedule.cron, now) {
                metrics::gauge!(SCHEDULE_INTERVAL, "schedule" => schedule.name.clone()).set(secs);
            }
        }
        if let Err(e) = self.database(now, jobs).await {
            metrics::counter!(COLLECTOR_ERRORS, "source" => "database").increment(1);
            tracing::debug!(error = %e, "metrics collector: database query failed");
        }
        let Some(amqp_url) = self.amqp_url.as_deref().filter(|_| read_broker) else {
            return;
        };
        match self.dead_letters(amqp_url, broker).await {
            Ok(depth) => metrics::gauge!(DEAD_LETTER_QUEUE_MESSAGES).set(f64::from(depth)),
            Err(e) => {
                // A failed passive declare closes the channel, sometimes the connection:
                // start over next round.
                if let Some(conn) = broker.take() {
                    let _ = conn
                        .close(200, "metrics collector reconnecting".into())
                        .await;
                }
                metrics::counter!(COLLECTOR_ERRORS, "source" => "broker").increment(1);
                tracing::debug!(error = %e, "metrics collector: dead-letter queue depth unavailable");
            }
        }
    }

    async fn database(
        &self,
        now: DateTime<Utc>,
        jobs: &mut BTreeSet<JobSeries>,
    ) -> Result<(), crate::store::StoreError> {
        for ((channel, status), (rows, age)) in
            outbox_series(&self.store.outbox_depth().await?, now)
        {
            metrics::gauge!(OUTBOX_ROWS, "channel" => channel.clone(), "status" => status.clone())
                .set(rows as f64);
            metrics::gauge!(OUTBOX_OLDEST_AGE, "channel" => channel, "status" => status).set(age);
        }

        let (keys, unreachable) = key_series(&self.store.key_counts().await?);
        for ((provider, state), n) in keys {
            metrics::gauge!(KEYS, "provider" => provider, "state" => state).set(n as f64);
        }
        for (provider, n) in unreachable {
            metrics::gauge!(KEYS_UNREACHABLE, "provider" => provider).set(n as f64);
        }

        for (access, n) in tenant_series(&self.store.tenant_counts().await?) {
            metrics::gauge!(TENANTS, "access" => access).set(n as f64);
        }

        let active = self.store.active_job_progress(MAX_JOB_SERIES).await?;
        let (current, finished) = job_series(&active, jobs);
        for job in &active {
            metrics::gauge!(REWRAP_DEKS_REMAINING, "job_id" => job.id.to_string(),
                "kind" => job.kind.clone(), "state" => job.state.clone())
            .set(job.remaining as f64);
        }
        for (id, labels) in finished {
            let (kind, state) = labels.split_once('/').unwrap_or((&labels, ""));
            metrics::gauge!(REWRAP_DEKS_REMAINING, "job_id" => id.to_string(),
                "kind" => kind.to_owned(), "state" => state.to_owned())
            .set(0.0);
        }
        *jobs = current;

        let configured: BTreeSet<&str> = self.schedules.iter().map(|s| s.name.as_str()).collect();
        for (name, at) in self.store.schedule_successes().await? {
            if configured.contains(name.as_str()) {
                metrics::gauge!(SCHEDULE_LAST_SUCCESS, "schedule" => name)
                    .set(at.timestamp_millis() as f64 / 1000.0);
            }
        }
        Ok(())
    }

    /// The dead-letter queue's depth, by a passive declare (it never creates the queue).
    async fn dead_letters(
        &self,
        amqp_url: &str,
        broker: &mut Option<Connection>,
    ) -> Result<u32, String> {
        let work = async {
            let conn = match broker.take() {
                Some(conn) if conn.status().connected() => conn,
                _ => Connection::connect(amqp_url, ConnectionProperties::default()).await?,
            };
            let conn = broker.insert(conn);
            let channel = conn.create_channel().await?;
            let queue = channel
                .queue_declare(
                    self.dead_letter_queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            let _ = channel.close(200, "done".into()).await;
            Ok::<_, lapin::Error>(queue.message_count())
        };
        match tokio::time::timeout(SETUP_TIMEOUT, work).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {SETUP_TIMEOUT:?}")),
        }
    }
}

/// Seconds between a cron schedule's next two ticks after `now`.
pub fn interval_secs(cron: &cron::Schedule, now: DateTime<Utc>) -> Option<f64> {
    let mut upcoming = cron.after(&now);
    let first = upcoming.next()?;
    let second = upcoming.next()?;
    Some((second - first).num_milliseconds() as f64 / 1000.0)
}

/// Rows and oldest age (seconds, 0 when empty) for every channel and undelivered status,
/// zero-filled, plus any channel or status the database has that the list lacks.
pub fn outbox_series(
    depth: &[OutboxDepth],
    now: DateTime<Utc>,
) -> BTreeMap<(String, String), (i64, f64)> {
    let mut series = BTreeMap::new();
    for channel in OUTBOX_CHANNELS {
        for status in OUTBOX_STATUSES {
            series.insert(((*channel).to_owned(), (*status).to_owned()), (0, 0.0));
        }
    }
    for d in depth {
        let age = d.oldest.map_or(0.0, |oldest| {
            ((now - oldest).num_milliseconds() as f64 / 1000.0).max(0.0)
        });
        series.insert((d.channel.clone(), d.status.clone()), (d.rows, age));
    }
    series
}

/// Keys per (provider, state) and unreachable keys per provider, zero-filled over every
/// provider and state.
pub fn key_series(counts: &[KeyCount]) -> (KeysByProviderState, BTreeMap<String, i64>) {
    let mut keys = BTreeMap::new();
    let mut unreachable = BTreeMap::new();
    for provider in Provider::ALL {
        unreachable.insert(provider.as_str().to_owned(), 0);
        for state in KeyState::ALL {
            keys.insert((provider.as_str().to_owned(), state.as_str().to_owned()), 0);
        }
    }
    for c in counts {
        *keys
            .entry((c.provider.clone(), c.state.clone()))
            .or_insert(0) += c.keys;
        *unreachable.entry(c.provider.clone()).or_insert(0) += c.unreachable;
    }
    (keys, unreachable)
}

/// Tenants per access, zero-filled over every access.
pub fn tenant_series(counts: &[(String, i64)]) -> BTreeMap<String, i64> {
    let mut series: BTreeMap<String, i64> = Access::ALL
        .iter()
        .map(|a| (a.as_str().to_owned(), 0))
        .collect();
    for (access, n) in counts {
        *series.entry(access.clone()).or_insert(0) += n;
    }
    series
}

/// The job series (`id`, `kind/state`) set this round, and those set last round that are
/// gone (the job finished or changed state) and are to be zeroed once.
pub fn job_series(
    active: &[JobProgress],
    previous: &BTreeSet<JobSeries>,
) -> (BTreeSet<JobSeries>, Vec<JobSeries>) {
    let current: BTreeSet<JobSeries> = active
        .iter()
        .map(|j| (j.id, format!("{}/{}", j.kind, j.state)))
        .collect();
    let gone = previous.difference(&current).cloned().collect();
    (current, gone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("RFC 3339")
            .with_timezone(&Utc)
    }

    #[test]
    fn interval_is_the_gap_between_the_next_two_ticks() {
        let hourly = cron::Schedule::from_str("0 0 * * * *").expect("cron");
        assert_eq!(
            interval_secs(&hourly, at("2026-11-29T10:20:00Z")),
            Some(3600.0)
        );
        let daily = cron::Schedule::from_str("0 30 2 * * *").expect("cron");
        assert_eq!(
            interval_secs(&daily, at("2026-11-29T10:20:00Z")),
            Some(86400.0)
        );
        let once = cron::Schedule::from_str("0 0 0 1 1 * 2020").expect("cron");
        assert_eq!(interval_secs(&once, at("2026-11-29T10:20:00Z")), None);
    }

    #[test]
    fn outbox_series_zero_fills_and_ages_the_oldest_row() {
        let now = at("2026-11-29T10:00:00Z");
        let series = outbox_series(
            &[
                OutboxDepth {
                    channel: "email".into(),
                    status: "pending".into(),
                    rows: 3,
                    oldest: Some(at("2026-11-29T09:59:30Z")),
                },
                OutboxDepth {
                    channel: "webhook".into(),
                    status: "dead".into(),
                    rows: 1,
                    // Another replica's clock may run ahead: never a negative age.
                    oldest: Some(at("2026-11-29T10:00:05Z")),
                },
            ],
            now,
        );
        assert_eq!(series.len(), OUTBOX_CHANNELS.len() * OUTBOX_STATUSES.len());
        assert_eq!(series[&("email".into(), "pending".into())], (3, 30.0));
        assert_eq!(series[&("webhook".into(), "dead".into())], (1, 0.0));
        assert_eq!(series[&("amqp".into(), "pending".into())], (0, 0.0));
    }

    #[test]
    fn key_and_tenant_series_cover_every_provider_state_and_access() {
        let (keys, unreachable) = key_series(&[KeyCount {
            provider: "vault".into(),
            state: "disabled".into(),
            keys: 4,
            unreachable: 1,
        }]);
        assert_eq!(keys.len(), Provider::ALL.len() * KeyState::ALL.len());
        assert_eq!(keys[&("vault".into(), "disabled".into())], 4);
        assert_eq!(keys[&("local".into(), "enabled".into())], 0);
        assert_eq!(unreachable["vault"], 1);
        assert_eq!(unreachable["aws"], 0);
        let tenants = tenant_series(&[("inaccessible".into(), 2)]);
        assert_eq!(tenants.len(), Access::ALL.len());
        assert_eq!(tenants["inaccessible"], 2);
        assert_eq!(tenants["accessible"], 0);
    }

    #[test]
    fn finished_or_moved_jobs_are_zeroed_once() {
        let job = |id, state: &str| JobProgress {
            id,
            kind: "rotation".into(),
            state: state.into(),
            remaining: 10,
        };
        let (first, gone) = job_series(&[job(1, "running"), job(2, "pending")], &BTreeSet::new());
        assert!(gone.is_empty());
        let (second, gone) = job_series(&[job(2, "running")], &first);
        assert_eq!(
            gone,
            vec![
                (1, "rotation/running".to_owned()),
                (2, "rotation/pending".to_owned())
            ]
        );
        let (_, gone) = job_series(&[job(2, "running")], &second);
        assert!(gone.is_empty());
    }
}
