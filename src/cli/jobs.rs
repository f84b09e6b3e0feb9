//! `byokd jobs watch`: re-wrap jobs followed live, one progress bar each with its rate and
//! ETA, until none is left active (or Ctrl-C).
//!
//! On a terminal the bars are drawn by indicatif; otherwise (a pipe, `--json`) each poll
//! that changed a job prints one line per job, with the rate and ETA computed from the last
//! two polls. A job that leaves the active set is looked up once more for how it ended.

use crate::config::Config;
use crate::domain::JobState;
use crate::store::{RewrapJobView, Store};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// `byokd jobs ...`
#[derive(Debug, clap::Subcommand)]
pub enum JobsCommand {
    /// Follow active re-wrap jobs with a progress bar and ETA each, until none is left.
    Watch {
        /// Only this tenant's jobs.
        #[arg(long)]
        tenant: Option<String>,
        /// Time between polls, in milliseconds.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
        interval_ms: u64,
    },
}

/// Most jobs read per page of the fleet-wide list.
const PAGE: i64 = 500;

/// Runs one `jobs` command.
pub async fn run(json: bool, config: &Config, command: JobsCommand) -> anyhow::Result<()> {
    let JobsCommand::Watch {
        tenant,
        interval_ms,
    } = command;
    let store = Store::connect(config.require_database_url()?, 2).await?;
    let interval = Duration::from_millis(interval_ms);
    let mut view = View::new(json);
    let mut stop = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let active = active_jobs(&store, tenant.as_deref()).await?;
        let gone: Vec<RewrapJobView> = view
            .jobs
            .values()
            .filter(|t| !active.iter().any(|j| j.id == t.last.id))
            .map(|t| t.last.clone())
            .collect();
        for job in gone {
            let ended = store
                .rewrap_jobs(&job.tenant_id)
                .await?
                .into_iter()
                .find(|j| j.id == job.id)
                .unwrap_or(job);
            view.finish(ended);
        }
        for job in active {
            view.update(job);
        }
        if view.jobs.is_empty() {
            view.done();
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = &mut stop => {
                view.done();
                return Ok(());
            }
        }
    }
}

async fn active_jobs(store: &Store, tenant: Option<&str>) -> anyhow::Result<Vec<RewrapJobView>> {
    let active = |j: &RewrapJobView| {
        matches!(
            j.state,
            JobState::Pending | JobState::Running | JobState::Waiting
        )
    };
    if let Some(tenant) = tenant {
        let mut jobs: Vec<RewrapJobView> = store
            .rewrap_jobs(tenant)
            .await?
            .into_iter()
            .filter(active)
            .collect();
        jobs.sort_by_key(|j| j.id);
        return Ok(jobs);
    }
    let mut jobs = Vec::new();
    let mut after = None;
    loop {
        let page = store.active_rewrap_jobs(after, PAGE).await?;
        let full = page.len() as i64 == PAGE;
        after = page.last().map(|j| j.id);
        jobs.extend(page);
        if !full {
            return Ok(jobs);
        }
    }
}

/// One job being followed.
struct Tracked {
    last: RewrapJobView,
    bar: Option<ProgressBar>,
    /// The previous poll's progress, for the rate.
    seen: (Instant, i64),
    rate: Option<f64>,
}

/// What the watcher shows: bars on a terminal, lines otherwise.
struct View {
    json: bool,
    bars: Option<MultiProgress>,
    jobs: BTreeMap<i64, Tracked>,
    finished: usize,
}

impl View {
    fn new(json: bool) -> View {
        let bars = (!json && std::io::stdout().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()));
        View {
            json,
            bars,
            jobs: BTreeMap::new(),
            finished: 0,
        }
    }

    fn update(&mut self, job: RewrapJobView) {
        let moved = job.done + job.failed;
        let now = Instant::now();
        let bars = self.bars.clone();
        let tracked = self.jobs.entry(job.id).or_insert_with(|| Tracked {
            bar: bars.map(|m| {
                let bar = m.add(ProgressBar::new(job.total.max(0) as u64));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {pos}/{len} DEKs {per_sec} ETA {eta} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(label(&job));
                bar
            }),
            seen: (now, moved),
            rate: None,
            last: job.clone(),
        });
        let (then, before) = tracked.seen;
        let changed = moved != before || job.state != tracked.last.state || tracked.rate.is_none();
        let secs = now.duration_since(then).as_secs_f64();
        if secs > 0.0 && moved != before {
            tracked.rate = Some((moved - before) as f64 / secs);
            tracked.seen = (now, moved);
        } else if tracked.rate.is_none() {
            tracked.rate = Some(0.0);
        }
        if let Some(bar) = &tracked.bar {
            bar.set_length(job.total.max(0) as u64);
            bar.set_position(moved.max(0) as u64);
            bar.set_message(state_message(&job));
        } else if changed {
            print_line(self.json, &job, tracked.rate);
        }
        tracked.last = job;
    }

    fn finish(&mut self, job: RewrapJobView) {
        let Some(tracked) = self.jobs.remove(&job.id) else {
            return;
        };
        self.finished += 1;
        match tracked.bar {
            Some(bar) => {
                bar.set_position((job.done + job.failed).max(0) as u64);
                bar.finish_with_message(state_message(&job));
            }
            None => print_line(self.json, &job, tracked.rate),
        }
    }

    fn done(&self) {
        if self.json {
            return;
        }
        let line = match self.finished {
            0 if self.jobs.is_empty() => "no active re-wrap jobs".to_owned(),
            n => format!("{n} job(s) finished; {} still active", self.jobs.len()),
        };
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(line);
            }
            None => println!("{line}"),
        }
    }
}

fn label(job: &RewrapJobView) -> String {
    format!(
        "job {} {} {} {} -> {}",
        job.id, job.tenant_id, job.kind, job.key_ref, job.target_version
    )
}

fn state_message(job: &RewrapJobView) -> String {
    match (&job.state, &job.last_error) {
        (JobState::Waiting, Some(e)) => format!("waiting: {e}"),
        (state, _) if job.failed > 0 => format!("{state}, {} failed", job.failed),
        (state, _) => state.to_string(),
    }
}

/// Seconds left at `rate` DEKs/s, when it can be told.
fn eta_secs(job: &RewrapJobView, rate: Option<f64>) -> Option<u64> {
    let left = (job.total - job.done - job.failed).max(0) as f64;
    match rate {
        _ if left == 0.0 => Some(0),
        Some(r) if r > 0.0 => Some((left / r).ceil() as u64),
        _ => None,
    }
}

fn print_line(json: bool, job: &RewrapJobView, rate: Option<f64>) {
    let eta = eta_secs(job, rate);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "id": job.id,
                "tenant_id": job.tenant_id,
                "kind": job.kind,
                "key_ref": job.key_ref,
                "target_version": job.target_version,
                "state": job.state,
                "total": job.total,
                "done": job.done,
                "failed": job.failed,
                "rate_per_sec": rate.map(|r| (r * 10.0).round() / 10.0),
                "eta_secs": eta,
                "last_error": job.last_error,
            })
        );
    } else {
        println!(
            "{}: {}/{} DEKs, {} failed, {}{}",
            label(job),
            job.done,
            job.total,
            job.failed,
            state_message(job),
            match (rate, eta) {
                (Some(r), Some(e)) if !is_final(job) => format!(", {r:.0}/s, ETA {e}s"),
                _ => String::new(),
            }
        );
    }
}

fn is_final(job: &RewrapJobView) -> bool {
    !matches!(
        job.state,
        JobState::Pending | JobState::Running | JobState::Waiting
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{JobKind, Provider};

    fn job(total: i64, done: i64, failed: i64) -> RewrapJobView {
        RewrapJobView {
            id: 1,
            tenant_id: "t".into(),
            kind: JobKind::Rotation,
            provider: Provider::Local,
            key_ref: "k".into(),
            target_key_ref: "k".into(),
            from_versions: vec!["1".into()],
            target_version: "2".into(),
            state: JobState::Running,
            total,
            done,
            failed,
            last_error: None,
            created_at: chrono::Utc::now(),
            completed_at: None,
        }
    }

    #[test]
    fn eta_follows_the_remaining_work_and_the_rate() {
        assert_eq!(eta_secs(&job(1000, 400, 0), Some(100.0)), Some(6));
        assert_eq!(eta_secs(&job(1000, 399, 1), Some(300.0)), Some(2));
        assert_eq!(eta_secs(&job(1000, 400, 0), Some(0.0)), None);
        assert_eq!(eta_secs(&job(1000, 400, 0), None), None);
        assert_eq!(eta_secs(&job(1000, 990, 10), None), Some(0));
    }
}
