//! Cron sweeps: schedules from `schedules/*.toml`, run on one replica at a time, each calling
//! one job function.
//!
//! A schedule's tick runs once across replicas: the runner takes the schedule's advisory lock
//! (PostgreSQL, on a connection of its own, so a crash releases it), re-reads the last tick
//! run, and records the tick after the job. A tick missed while every daemon was down runs
//! once at start, not once per missed tick. Jobs take `now` as an argument, so tests drive
//! them with any clock.

pub mod anomaly;
pub mod expiry;
pub mod probe;

use crate::kms::Kms;
use crate::notify::catalog::{Notification, ScheduleFailed};
use crate::store::{Store, StoreError};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// A schedule file that cannot be used: names the file and the field.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ScheduleError {
    /// The file.
    pub file: String,
    /// What is wrong with it.
    pub message: String,
}

/// What a schedule runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    /// Warn of keys nearing expiry at tiered thresholds; expire keys past their date.
    ExpiryScan {
        /// Days before expiry at which to warn, e.g. `[30, 14, 7, 1]`.
        thresholds_days: Vec<u32>,
    },
    /// Ask every KEK's KMS whether the key is usable.
    KeyProbe {
        /// How long a key may be unreachable before `key.unreachable` is notified.
        unreachable_grace: Duration,
        /// Per-key timeout of a probe.
        timeout: Duration,
        /// Keys probed at once.
        concurrency: usize,
    },
    /// Delete delivered outbox rows older than the retention period.
    OutboxPrune {
        /// How long delivered rows are kept.
        retention: Duration,
    },
    /// Evaluate the key-access anomaly rules over the last window.
    AnomalyScan(anomaly::AnomalyRules),
}

impl Job {
    /// The job's name in schedule files.
    pub fn name(&self) -> &'static str {
        match self {
            Job::ExpiryScan { .. } => "expiry_scan",
            Job::KeyProbe { .. } => "key_probe",
            Job::OutboxPrune { .. } => "outbox_prune",
            Job::AnomalyScan(_) => "anomaly_scan",
        }
    }
}

/// One loaded schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Unique name (`byokd sweep NAME`).
    pub name: String,
    /// When it runs (UTC).
    pub cron: cron::Schedule,
    /// What it runs.
    pub job: Job,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleFile {
    name: String,
    cron: String,
    job: String,
    #[serde(default)]
    params: toml::Table,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ExpiryParams {
    thresholds_days: Option<Vec<u32>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ProbeParams {
    unreachable_grace_minutes: Option<u64>,
    timeout_seconds: Option<u64>,
    concurrency: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AnomalyParams {
    window_seconds: Option<i64>,
    rate_factor: Option<f64>,
    rate_floor: Option<f64>,
    baseline_windows: Option<i32>,
    refused_per_window: Option<i64>,
    inaccessible_within_minutes: Option<i64>,
    bad_token_per_window: Option<i64>,
    alert_window_minutes: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PruneParams {
    retention_days: Option<u64>,
}

fn params<T: serde::de::DeserializeOwned>(table: toml::Table) -> Result<T, String> {
    T::deserialize(toml::Value::Table(table)).map_err(|e| format!("params: {}", e.message()))
}

/// Parses a cron line: the standard 5 fields (minute hour day-of-month month day-of-week,
/// as in crontab), or the `cron` crate's 6/7 fields with seconds first (and a year last), or
/// a shorthand such as `@hourly`. Five fields run at second 0.
pub fn parse_cron(line: &str) -> Result<cron::Schedule, String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let full = if let [minute, hour, dom, month, dow] = fields[..] {
        format!("0 {minute} {hour} {dom} {month} {}", crontab_weekdays(dow))
    } else {
        line.trim().to_owned()
    };
    cron::Schedule::from_str(&full).map_err(|e| {
        format!(
            "cron {line:?} is not a valid expression (5 fields as in crontab, 6 or 7 with \
             seconds first, or @hourly and the like): {e}"
        )
    })
}

/// Crontab numbers weekdays 0-7 from Sunday (0 and 7 both Sunday); the `cron` crate numbers
/// them 1-7 from Sunday. Numbers become names, which both read alike; a range ending at 7
/// (`5-7`) becomes `FRI-SAT,SUN`. Steps (`*/2`, `1-5/2`) keep their number.
fn crontab_weekdays(field: &str) -> String {
    const NAMES: [&str; 8] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"];
    let name = |day: &str| match day.parse::<usize>() {
        Ok(n) if n < NAMES.len() => NAMES[n].to_owned(),
        _ => day.to_owned(),
    };
    field
        .split(',')
        .map(|item| {
            let (range, step) = match item.split_once('/') {
                Some((range, step)) => (range, Some(step)),
                None => (item, None),
            };
            let range = match range.split_once('-') {
                Some((from, "7")) if step.is_none() && from != "7" => {
                    format!("{}-SAT,SUN", name(from))
                }
                Some((from, to)) => format!("{}-{}", name(from), name(to)),
                None => name(range),
            };
            match step {
                Some(step) => format!("{range}/{step}"),
                None => range,
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses one schedule file's text.
pub fn parse_schedule(file: &str, text: &str) -> Result<Schedule, ScheduleError> {
    let err = |message: String| ScheduleError {
        file: file.to_owned(),
        message,
    };
    let raw: ScheduleFile = toml::from_str(text).map_err(|e| err(e.message().to_owned()))?;
    if raw.name.trim().is_empty() {
        return Err(err("name must not be empty".to_owned()));
    }
    let cron = parse_cron(&raw.cron).map_err(err)?;
    let job = match raw.job.as_str() {
        "expiry_scan" => {
            let p: ExpiryParams = params(raw.params).map_err(err)?;
            let mut thresholds = p.thresholds_days.unwrap_or_else(|| vec![30, 14, 7, 1]);
            if thresholds.is_empty() || thresholds.contains(&0) {
                return Err(err(
                    "params.thresholds_days must list positive day counts".to_owned()
                ));
            }
            thresholds.sort_unstable_by(|a, b| b.cmp(a));
            thresholds.dedup();
            Job::ExpiryScan {
                thresholds_days: thresholds,
            }
        }
        "key_probe" => {
            let p: ProbeParams = params(raw.params).map_err(err)?;
            Job::KeyProbe {
                unreachable_grace: Duration::from_secs(
                    60 * p.unreachable_grace_minutes.unwrap_or(30),
                ),
                timeout: Duration::from_secs(p.timeout_seconds.unwrap_or(10).max(1)),
                concurrency: p.concurrency.unwrap_or(8).max(1),
            }
        }
        "outbox_prune" => {
            let p: PruneParams = params(raw.params).map_err(err)?;
            Job::OutboxPrune {
                retention: Duration::from_secs(86_400 * p.retention_days.unwrap_or(30)),
            }
        }
        "anomaly_scan" => {
            let p: AnomalyParams = params(raw.params).map_err(err)?;
            let d = anomaly::AnomalyRules::default();
            let rules = anomaly::AnomalyRules {
                window: p.window_seconds.map_or(d.window, chrono::Duration::seconds),
                rate_factor: p.rate_factor.unwrap_or(d.rate_factor),
                rate_floor: p.rate_floor.unwrap_or(d.rate_floor),
                baseline_windows: p.baseline_windows.unwrap_or(d.baseline_windows),
                refused_per_window: p.refused_per_window.unwrap_or(d.refused_per_window),
                inaccessible_within: p
                    .inaccessible_within_minutes
                    .map_or(d.inaccessible_within, chrono::Duration::minutes),
                bad_token_per_window: p.bad_token_per_window.unwrap_or(d.bad_token_per_window),
                alert_window: p
                    .alert_window_minutes
                    .map_or(d.alert_window, chrono::Duration::minutes),
            };
            let positive = rules.window > chrono::Duration::zero()
                && rules.alert_window > chrono::Duration::zero()
                && rules.rate_factor > 0.0
                && rules.baseline_windows > 0;
            if !positive {
                return Err(err(
                    "params: window, alert window, rate factor and baseline windows must be positive"
                        .to_owned(),
                ));
            }
            Job::AnomalyScan(rules)
        }
        other => {
            return Err(err(format!(
                "job {other:?} is not one of expiry_scan, key_probe, outbox_prune, anomaly_scan"
            )));
        }
    };
    Ok(Schedule {
        name: raw.name,
        cron,
        job,
    })
}

/// Loads every `*.toml` in `dir`, refusing duplicate names.
pub fn load_dir(dir: &Path) -> Result<Vec<Schedule>, ScheduleError> {
    let entries = std::fs::read_dir(dir).map_err(|e| ScheduleError {
        file: dir.display().to_string(),
        message: format!("cannot read the schedules directory: {e}"),
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut schedules: Vec<Schedule> = Vec::with_capacity(files.len());
    for path in files {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| ScheduleError {
            file: file.clone(),
            message: e.to_string(),
        })?;
        let schedule = parse_schedule(&file, &text)?;
        if schedules.iter().any(|s| s.name == schedule.name) {
            return Err(ScheduleError {
                file,
                message: format!("name {:?} is used by another schedule", schedule.name),
            });
        }
        schedules.push(schedule);
    }
    Ok(schedules)
}

/// The tick a schedule should run for at `now`: the latest tick at or before `now` that is
/// later than `last`. `None`: not due.
///
/// A never-run schedule is due at once, for its latest tick at or before `now` (within the
/// last year): a value every replica starting together computes alike, so the first to take
/// the lock records it and the others find it done. (Its own `now` would differ per replica
/// by milliseconds and let each run the sweep once more.)
pub fn due_tick(
    cron: &cron::Schedule,
    last: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let latest_since = |from: DateTime<Utc>| cron.after(&from).take_while(|t| *t <= now).last();
    let Some(last) = last else {
        // Frequent schedules find a tick in the last day; rare ones look back a year.
        return latest_since(now - chrono::Duration::days(1))
            .or_else(|| latest_since(now - chrono::Duration::days(366)));
    };
    // Missed ticks collapse into one run: walk only the last day of them.
    let latest = latest_since(last.max(now - chrono::Duration::days(1)));
    latest.filter(|t| *t > last)
}

/// What a sweep run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Schedule name.
    pub schedule: String,
    /// Job name.
    pub job: &'static str,
    /// The tick it ran for.
    pub tick: DateTime<Utc>,
    /// `ok` or `failed`.
    pub status: &'static str,
    /// Job-specific figures, or the error.
    pub details: serde_json::Value,
}

/// Why a sweep could not run.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// No schedule has this name.
    #[error("no schedule named {0:?}")]
    UnknownSchedule(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs schedules. Shared by the daemon's loop and `byokd sweep`.
#[derive(Clone)]
pub struct Sweeper {
    /// The database.
    pub store: Store,
    /// KMS providers (probes).
    pub kms: Kms,
    /// Loaded schedules.
    pub schedules: Arc<Vec<Schedule>>,
    /// Woken when a sweep changed access (relay) or created re-wrap work.
    pub wake: Wakers,
}

/// Loops to wake after a sweep applied changes.
#[derive(Clone, Default)]
pub struct Wakers {
    /// The access relay.
    pub access: Arc<Notify>,
    /// Re-wrap workers.
    pub rewrap: Arc<Notify>,
}

impl Sweeper {
    /// Runs every schedule due at `now` that no other replica is running.
    ///
    /// # Errors
    ///
    /// Database failures reading schedule state; a failing job is reported, not returned.
    pub async fn run_due(&self, now: DateTime<Utc>) -> Result<Vec<Report>, SweepError> {
        let mut reports = Vec::new();
        for schedule in self.schedules.iter() {
            let last = self.store.last_tick(&schedule.name).await?;
            let Some(tick) = due_tick(&schedule.cron, last, now) else {
                continue;
            };
            if let Some(report) = self.run_locked(schedule, tick, now, false).await? {
                reports.push(report);
            }
        }
        Ok(reports)
    }

    /// Runs schedule `name` now, whether due or not (`byokd sweep NAME`); waits for no other
    /// replica: `None` if one is running it right now.
    pub async fn run_now(
        &self,
        name: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Report>, SweepError> {
        let schedule = self
            .schedules
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| SweepError::UnknownSchedule(name.to_owned()))?;
        self.run_locked(schedule, now, now, true).await
    }

    async fn run_locked(
        &self,
        schedule: &Schedule,
        tick: DateTime<Utc>,
        now: DateTime<Utc>,
        forced: bool,
    ) -> Result<Option<Report>, SweepError> {
        let Some(lock) = self.store.try_lock_schedule(&schedule.name).await? else {
            return Ok(None);
        };
        // Another replica may have run this tick between our read and our lock.
        let last = self.store.last_tick(&schedule.name).await?;
        if !forced && last.is_some_and(|l| l >= tick) {
            lock.release().await;
            return Ok(None);
        }
        let result = self.run_job(&schedule.job, now).await;
        let (status, details) = match result {
            Ok(details) => ("ok", details),
            Err(e) => {
                tracing::warn!(schedule = %schedule.name, error = %e, "sweep failed");
                let alert = Notification::ScheduleFailed(ScheduleFailed {
                    schedule: schedule.name.clone(),
                    tick,
                    error: e.to_string(),
                });
                if let Err(e) = self
                    .store
                    .enqueue_outbox(&alert.outbox_rows(None, now))
                    .await
                {
                    tracing::warn!(schedule = %schedule.name, error = %e,
                        "could not queue the operators' notification of a failed sweep");
                }
                ("failed", serde_json::json!({ "error": e.to_string() }))
            }
        };
        let recorded = self
            .store
            .record_schedule_run(&schedule.name, tick, now, status, &details)
            .await;
        lock.release().await;
        recorded?;
        tracing::info!(schedule = %schedule.name, job = schedule.job.name(), status, %details, "sweep ran");
        Ok(Some(Report {
            schedule: schedule.name.clone(),
            job: schedule.job.name(),
            tick,
            status,
            details,
        }))
    }

    async fn run_job(
        &self,
        job: &Job,
        now: DateTime<Utc>,
    ) -> Result<serde_json::Value, SweepError> {
        let details = match job {
            Job::ExpiryScan { thresholds_days } => {
                let r = expiry::expiry_scan(&self.store, thresholds_days, now).await?;
                if r.expired > 0 {
                    self.wake.access.notify_one();
                }
                serde_json::to_value(r).unwrap_or_default()
            }
            Job::KeyProbe {
                unreachable_grace,
                timeout,
                concurrency,
            } => {
                let settings = probe::ProbeSettings {
                    unreachable_grace: *unreachable_grace,
                    timeout: *timeout,
                    concurrency: *concurrency,
                };
                let r = probe::key_probe(&self.store, &self.kms, &settings, now).await?;
                if r.changes > 0 {
                    self.wake.access.notify_one();
                    self.wake.rewrap.notify_one();
                }
                serde_json::to_value(r).unwrap_or_default()
            }
            Job::AnomalyScan(rules) => {
                let r = anomaly::anomaly_scan(&self.store, rules, now).await?;
                serde_json::to_value(r).unwrap_or_default()
            }
            Job::OutboxPrune { retention } => {
                let older_than = now
                    - chrono::Duration::from_std(*retention).unwrap_or(chrono::Duration::days(30));
                let deleted = crate::notify::outbox::prune(&self.store, older_than).await?;
                serde_json::json!({ "deleted": deleted, "older_than": older_than })
            }
        };
        Ok(details)
    }
}

/// Runs due schedules until shutdown, sleeping until the next tick of any schedule.
pub async fn sweep_loop(sweeper: Sweeper, mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        if let Err(e) = sweeper.run_due(Utc::now()).await {
            tracing::warn!(error = %e, "sweep runner failed; retrying");
        }
        let now = Utc::now();
        let next = sweeper
            .schedules
            .iter()
            .filter_map(|s| s.cron.after(&now).next())
            .min();
        // Re-check at least every minute: another replica may have run (or missed) a tick.
        let wait = next
            .and_then(|t| (t - now).to_std().ok())
            .unwrap_or(Duration::from_secs(60))
            .min(Duration::from_secs(60));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, h, m, 0)
            .single()
            .expect("valid")
    }

    #[test]
    fn cron_accepts_five_six_and_seven_fields_and_shorthands() {
        let now = DateTime::parse_from_rfc3339("2026-11-29T10:07:30Z")
            .expect("time")
            .with_timezone(&Utc);
        let next = |line: &str| {
            parse_cron(line)
                .expect(line)
                .after(&now)
                .next()
                .expect("tick")
        };
        // Five fields are crontab's: every 15 minutes at second 0.
        assert_eq!(
            next("*/15 * * * *").to_rfc3339(),
            "2026-11-29T10:15:00+00:00"
        );
        assert_eq!(next("0 */15 * * * *"), next("*/15 * * * *"));
        assert_eq!(next("0 */15 * * * * *"), next("*/15 * * * *"));
        assert_eq!(next("@hourly").to_rfc3339(), "2026-11-29T11:00:00+00:00");
        // Crontab's weekdays: 1 is Monday (2026-11-30), 0 and 7 are Sunday.
        assert_eq!(
            next("  30 2 * * 1  ").to_rfc3339(),
            "2026-11-30T02:30:00+00:00"
        );
        assert_eq!(next("30 2 * * 0").to_rfc3339(), "2026-12-06T02:30:00+00:00");
        assert_eq!(next("30 2 * * 7"), next("30 2 * * 0"));
        assert_eq!(next("30 2 * * 1-5"), next("30 2 * * MON-FRI"));
        assert_eq!(
            next("30 2 * * 6-7").to_rfc3339(),
            "2026-12-05T02:30:00+00:00"
        );
        assert_eq!(crontab_weekdays("5-7"), "FRI-SAT,SUN");
        assert_eq!(crontab_weekdays("*/2"), "*/2");
        assert_eq!(crontab_weekdays("1-5/2,0"), "MON-FRI/2,SUN");
        for bad in ["", "* * * *", "61 * * * *", "every day", "* * * * * * * *"] {
            let e = parse_cron(bad).expect_err(bad);
            assert!(e.contains("5 fields as in crontab"), "{e}");
        }
    }

    #[test]
    fn parses_each_job_with_defaults_and_params() {
        let s = parse_schedule(
            "a.toml",
            "name = \"x\"\ncron = \"0 */15 * * * *\"\njob = \"expiry_scan\"\n[params]\nthresholds_days = [7, 30, 1]\n",
        )
        .expect("valid");
        assert_eq!(
            s.job,
            Job::ExpiryScan {
                thresholds_days: vec![30, 7, 1]
            }
        );
        let s = parse_schedule(
            "b.toml",
            "name = \"p\"\ncron = \"0 */5 * * * *\"\njob = \"key_probe\"\n",
        )
        .expect("valid");
        assert!(matches!(s.job, Job::KeyProbe { concurrency: 8, .. }));
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let cases = [
            (
                "name = \"x\"\ncron = \"every day\"\njob = \"expiry_scan\"\n",
                "cron \"every day\"",
            ),
            (
                "name = \"x\"\ncron = \"0 * * * * *\"\njob = \"reboot\"\n",
                "job \"reboot\"",
            ),
            (
                "name = \"x\"\ncron = \"0 * * * * *\"\n",
                "missing field `job`",
            ),
            (
                "name = \"x\"\ncron = \"0 * * * * *\"\njob = \"expiry_scan\"\n[params]\nthresholds = [1]\n",
                "params: unknown field `thresholds`",
            ),
            (
                "name = \"x\"\ncron = \"0 * * * * *\"\njob = \"expiry_scan\"\n[params]\nthresholds_days = [0]\n",
                "thresholds_days",
            ),
        ];
        for (text, expected) in cases {
            let e = parse_schedule("schedules/bad.toml", text)
                .expect_err(text)
                .to_string();
            assert!(e.starts_with("schedules/bad.toml: "), "{e}");
            assert!(e.contains(expected), "{e}");
        }
    }

    #[test]
    fn missed_ticks_collapse_into_one_run() {
        let every_15 = cron::Schedule::from_str("0 */15 * * * *").expect("cron");
        assert_eq!(
            due_tick(&every_15, None, t(10, 7)),
            Some(t(10, 0)),
            "never run: its latest tick, the same on every replica"
        );
        assert_eq!(due_tick(&every_15, None, t(10, 14)), Some(t(10, 0)));
        let yearly = cron::Schedule::from_str("0 0 0 1 1 *").expect("cron");
        assert_eq!(
            due_tick(&yearly, None, t(10, 7)),
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single(),
            "a rare schedule looks back a year"
        );
        assert_eq!(
            due_tick(&every_15, Some(t(10, 0)), t(10, 7)),
            None,
            "not yet"
        );
        assert_eq!(
            due_tick(&every_15, Some(t(10, 0)), t(10, 15)),
            Some(t(10, 15))
        );
        // Down for hours: one run, for the latest tick.
        assert_eq!(
            due_tick(&every_15, Some(t(1, 0)), t(10, 50)),
            Some(t(10, 45))
        );
        assert_eq!(due_tick(&every_15, Some(t(10, 45)), t(10, 50)), None);
    }

    #[test]
    fn the_shipped_schedules_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schedules");
        let names: Vec<String> = load_dir(&dir)
            .expect("valid")
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(
            names,
            ["anomaly-scan", "expiry-scan", "key-probe", "outbox-prune"]
        );
    }
}
