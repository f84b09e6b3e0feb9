//! `byokd demo`: a scripted tour of what byokd does, in a temporary data dir, in well under
//! a minute, with nothing but the binary.
//!
//! It runs the daemon in process (standalone mode: SQLite in the data dir and no broker; or
//! the PostgreSQL of `BYOKD_DATABASE_URL` when that is set) and drives it the way a platform
//! and a tenant would: through the HTTP API (a tenant, its key, a client that creates and
//! unwraps DEKs, lifecycle events posted to `/v1/events`) and byokd's own local KMS (the
//! tenant's key changing at its KMS). Each step checks what the daemon did, and the demo
//! fails (non-zero exit) at the first step that did not do what it says.
//!
//! The expiry warning needs time to pass: the demo runs the expiry scan itself with a clock
//! it moves ahead ([`Sweeper::run_now`] takes the scan's `now`, as `byokd sweep` passes the
//! real one). Nothing else sees that clock: the daemon, the API and `byokd run` keep the
//! real one.

use crate::config::{Config, redact_url};
use crate::domain::{EventKind, KeyState, LifecycleEvent, Origin, Provider};
use crate::events::normalize::canonical;
use crate::kms::LocalKms;
use crate::seal::{LOCAL_KMS_PURPOSE, Sealer};
use crate::store::Store;
use crate::sweeps::{Sweeper, Wakers};
use anyhow::{Context, bail, ensure};
use chrono::{DateTime, Duration as Days, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// DEKs the tour creates and re-wraps.
const DEKS: usize = 10_000;
/// How long any one step may wait for the daemon.
const STEP_LIMIT: Duration = Duration::from_secs(60);
/// The expiry scan the demo runs with its own clock. Named apart from the shipped
/// `expiry-scan`, whose record of its last run the simulated clock must not move ahead (a
/// data dir kept with `--keep` runs the shipped schedules); its cron never fires in a tour.
const EXPIRY_SCHEDULE: &str = "name = \"demo-expiry-scan\"\ncron = \"0 0 0 1 1 *\"\n\
                               job = \"expiry_scan\"\n[params]\nthresholds_days = [30, 14, 7, 1]\n";

/// Runs the tour. With `keep`, the data dir stays and the command to run the daemon on it
/// is printed.
///
/// # Errors
///
/// The data dir cannot be made, the daemon does not start, or a step did not do what it
/// says (named in the error).
pub async fn run(json: bool, keep: bool, database_url: Option<String>) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!(
        "byokd-demo-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    let outcome = tour(json, &dir, keep, database_url).await;
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome
}

/// What the demo prints, as it goes.
struct Timeline {
    json: bool,
    start: Instant,
    last: Instant,
    steps: Vec<Value>,
}

impl Timeline {
    fn new(json: bool) -> Timeline {
        let now = Instant::now();
        Timeline {
            json,
            start: now,
            last: now,
            steps: Vec::new(),
        }
    }

    /// Records a finished step and prints it: time since the start, the step's own time.
    fn step(&mut self, what: &str, detail: String) {
        let now = Instant::now();
        let at = now.duration_since(self.start).as_secs_f64();
        let took = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        if !self.json {
            println!("{at:>7.2}s {took:>+7.2}s  {what}: {detail}");
        }
        self.steps
            .push(json!({ "step": what, "at_secs": at, "took_secs": took,
                                "detail": detail }));
    }
}

/// The emails the tour made, by file.
struct Mailbox {
    dir: PathBuf,
    seen: BTreeSet<PathBuf>,
}

impl Mailbox {
    /// Waits for a new .eml file whose subject contains `subject`, and returns its path and
    /// subject.
    async fn wait(&mut self, subject: &str) -> anyhow::Result<(PathBuf, String)> {
        let deadline = Instant::now() + STEP_LIMIT;
        loop {
            if let Ok(entries) = std::fs::read_dir(&self.dir) {
                let mut files: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                    .filter(|p| !self.seen.contains(p))
                    .collect();
                files.sort();
                for path in files {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    if let Some(found) = header(&text, "Subject")
                        && found.contains(subject)
                    {
                        self.seen.insert(path.clone());
                        return Ok((path, found));
                    }
                }
            }
            ensure!(
                Instant::now() < deadline,
                "no email about {subject:?} was written to {} within {STEP_LIMIT:?}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A header of an .eml file, unfolded (RFC 2047 words left as they are; byokd's subjects are
/// ASCII).
fn header(eml: &str, name: &str) -> Option<String> {
    let mut lines = eml.lines();
    let prefix = format!("{name}: ");
    let first = lines.find(|l| l.starts_with(&prefix))?;
    let mut value = first[prefix.len()..].to_owned();
    for next in lines {
        if next.starts_with(' ') || next.starts_with('\t') {
            // Unfolding removes the line break only; the whitespace stays.
            value.push_str(next);
        } else {
            break;
        }
    }
    Some(value)
}

/// The daemon's API as the demo uses it.
struct Api {
    http: reqwest::Client,
    base: String,
    admin: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{path}: no answer"))?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// An admin call that must answer `expect`.
    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        expect: u16,
    ) -> anyhow::Result<Value> {
        let (status, answer) = self.call(method, path, &self.admin, body).await?;
        ensure!(
            status == expect,
            "{path} answered {status}, not {expect}: {answer}"
        );
        Ok(answer)
    }

    /// Posts what the local KMS just did as the lifecycle event a real KMS would send.
    async fn event(
        &self,
        kind: EventKind,
        key_ref: &str,
        info: &crate::kms::KeyInfo,
    ) -> anyhow::Result<String> {
        let event = LifecycleEvent {
            provider: Provider::Local,
            event_id: uuid::Uuid::now_v7().to_string(),
            kind,
            key_ref: key_ref.to_owned(),
            version: (kind == EventKind::Rotated).then(|| info.current_version.clone()),
            expires_at: info.expires_at,
            time: Utc::now(),
            source: "byokd://demo".to_owned(),
            origin: Origin::Event,
        };
        let answer = self
            .admin(
                reqwest::Method::POST,
                "/v1/events",
                Some(&canonical::to_json(&event)),
                202,
            )
            .await?;
        Ok(answer["events"][0]["outcome"]
            .as_str()
            .unwrap_or("accepted")
            .to_owned())
    }

    async fn access(&self, tenant: &str) -> anyhow::Result<String> {
        let t = self
            .admin(
                reqwest::Method::GET,
                &format!("/v1/tenants/{tenant}"),
                None,
                200,
            )
            .await?;
        Ok(t["access"].as_str().unwrap_or("unknown").to_owned())
    }

    /// Waits until the KMS confirmed what the tenant's primary key's last event said: its
    /// observed state is `state` and no claim waits.
    async fn wait_confirmed(&self, tenant: &str, state: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + STEP_LIMIT;
        loop {
            let t = self
                .admin(
                    reqwest::Method::GET,
                    &format!("/v1/tenants/{tenant}"),
                    None,
                    200,
                )
                .await?;
            let confirmed = t["keks"].as_array().into_iter().flatten().any(|k| {
                k["primary"] == true && k["confirmed"] == true && k["observed_state"] == state
            });
            if confirmed {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the KMS did not confirm {tenant}'s key as {state} within {STEP_LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the tenant's access is `want`.
    async fn wait_access(&self, tenant: &str, want: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + STEP_LIMIT;
        loop {
            let access = self.access(tenant).await?;
            if access == want {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "tenant {tenant} is still {access}, not {want}, after {STEP_LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn tour(
    json_out: bool,
    dir: &Path,
    keep: bool,
    database_url: Option<String>,
) -> anyhow::Result<()> {
    let mut line = Timeline::new(json_out);
    let (config, database) = demo_config(dir, database_url)?;
    let store = Store::connect(
        config.database_url.as_deref().context("no database URL")?,
        8,
    )
    .await?;
    store.migrate().await?;
    let root = config.require_root_keys()?;
    let local = LocalKms::new(
        store.clone(),
        Arc::new(Sealer::with_previous(&root, LOCAL_KMS_PURPOSE)),
    );

    // The daemon, in process, on a port of its own.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    let daemon = tokio::spawn(crate::daemon::run(config.clone(), listener, async {
        let _ = stopped.await;
    }));
    let api = Api {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
        base,
        admin: config
            .admin_token
            .as_ref()
            .map(|t| t.expose_secret().to_owned())
            .context("no admin token")?,
    };
    let walk = async {
        wait_ready(&api).await?;
        line.step(
            "daemon",
            format!(
                "byokd running in process on {} ({database}, no broker), data dir {}",
                api.base,
                dir.display()
            ),
        );
        steps(&mut line, &api, &local, &store, &config).await
    };
    let outcome = walk.await;
    let _ = stop.send(());
    let stopped = tokio::time::timeout(Duration::from_secs(30), daemon).await;
    outcome?;
    match stopped {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => bail!("the daemon stopped with an error: {e}"),
        Ok(Err(e)) => bail!("the daemon task failed: {e}"),
        Err(_) => bail!("the daemon did not stop within 30 s"),
    }
    line.step("done", "the daemon stopped cleanly".to_owned());

    let total = line.start.elapsed().as_secs_f64();
    let run_command = keep.then(|| run_command(dir, &config));
    if json_out {
        println!(
            "{}",
            json!({ "steps": line.steps, "total_secs": total, "data_dir": dir,
                    "kept": keep, "run": run_command })
        );
    } else {
        println!("tour finished in {total:.1} s");
        match &run_command {
            Some(command) => {
                println!("data dir kept: {}", dir.display());
                println!("start byokd on it with:\n  {command}");
            }
            None => println!("data dir {} removed (--keep keeps it)", dir.display()),
        }
    }
    Ok(())
}

/// The demo's configuration: standalone mode in `dir`, or the PostgreSQL of
/// `BYOKD_DATABASE_URL` with the rest in `dir`. Never a broker. Returns it and a word on
/// the database for the timeline.
fn demo_config(dir: &Path, database_url: Option<String>) -> anyhow::Result<(Config, String)> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let schedules = dir.join("schedules");
    std::fs::create_dir_all(&schedules)?;
    std::fs::write(schedules.join("expiry-scan.toml"), EXPIRY_SCHEDULE)?;
    let mut config = Config {
        data_dir: dir.to_owned(),
        schedules_dir: schedules,
        database_url,
        ..Config::default()
    };
    config.rewrap.batch_size = 500;
    let database = match config.database_url.clone() {
        None => {
            crate::standalone::prepare(&mut config, true)?;
            "SQLite".to_owned()
        }
        Some(url) => {
            config.mail_dir = dir.join("mail");
            crate::standalone::secrets(&mut config, dir, true)?;
            format!("PostgreSQL at {}", redact_url(&url))
        }
    };
    config.validate()?;
    Ok((config, database))
}

/// The exact command that starts `byokd run` on the kept data dir.
fn run_command(dir: &Path, config: &Config) -> String {
    let exe =
        std::env::current_exe().map_or_else(|_| "byokd".to_owned(), |p| p.display().to_string());
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    match config.database_url.as_deref() {
        Some(url) if !url.starts_with("sqlite:") => format!(
            "BYOKD_DATABASE_URL='{}' BYOKD_LOCAL_KMS_ROOT_KEY_FILE={} BYOKD_ADMIN_TOKEN_FILE={} \
             BYOKD_MAIL_DIR={} {exe} run",
            redact_url(url),
            quote(&dir.join(crate::standalone::ROOT_KEY_FILE)),
            quote(&dir.join(crate::standalone::ADMIN_TOKEN_FILE)),
            quote(&dir.join("mail")),
        ),
        _ => format!("BYOKD_DATA_DIR={} {exe} run", quote(dir)),
    }
}

async fn wait_ready(api: &Api) -> anyhow::Result<()> {
    let deadline = Instant::now() + STEP_LIMIT;
    loop {
        if let Ok(r) = api.http.get(format!("{}/readyz", api.base)).send().await
            && r.status() == 200
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the daemon was not ready within {STEP_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The tour proper.
async fn steps(
    line: &mut Timeline,
    api: &Api,
    local: &LocalKms,
    store: &Store,
    config: &Config,
) -> anyhow::Result<()> {
    use reqwest::Method;
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let tenant = format!("acme-{suffix}");
    let key = format!("acme-kek-{suffix}");
    let contact = format!("security@{tenant}.example");
    let mut mail = Mailbox {
        dir: config.mail_dir.clone(),
        seen: BTreeSet::new(),
    };

    // A tenant and its key, at byokd's local KMS, expiring in 60 days.
    let expires = Utc::now() + Days::days(60);
    local.create(&key, Some(expires)).await?;
    api.admin(
        Method::POST,
        "/v1/tenants",
        Some(&json!({ "id": tenant, "name": "Acme Corp", "contacts": [contact] })),
        201,
    )
    .await?;
    api.admin(
        Method::POST,
        &format!("/v1/tenants/{tenant}/keks"),
        Some(&json!({ "provider": "local", "key_ref": key })),
        201,
    )
    .await?;
    line.step(
        "tenant",
        format!(
            "{tenant} with key {key} at the local KMS (version 1, expires {})",
            expires.format("%Y-%m-%d")
        ),
    );

    // The platform's service: a client token, and DEKs it creates through byokd.
    let client = api
        .admin(
            Method::POST,
            "/v1/clients",
            Some(&json!({ "name": format!("storage-{suffix}"), "tenants": [tenant] })),
            201,
        )
        .await?;
    let token = client["token"]
        .as_str()
        .context("no client token")?
        .to_owned();
    let (status, created) = api
        .call(
            Method::POST,
            &format!("/v1/tenants/{tenant}/deks"),
            &token,
            None,
        )
        .await?;
    ensure!(
        status == 201,
        "the client's DEK request answered {status}: {created}"
    );
    let probe = created["dek_id"].as_str().context("no dek_id")?.to_owned();
    let unwrap = format!("/v1/tenants/{tenant}/deks/{probe}/unwrap");
    let (status, _) = api.call(Method::POST, &unwrap, &token, None).await?;
    ensure!(status == 200, "unwrapping a fresh DEK answered {status}");
    let root = config.require_root_keys()?;
    let keys = crate::keys::Keys::new(
        store.clone(),
        crate::daemon::build_kms(store, &root, &config.kms)?,
        Arc::default(),
        Arc::default(),
    );
    let bulk = create_deks(&keys, &tenant, DEKS - 1).await?;
    line.step(
        "deks",
        format!(
            "{} DEKs wrapped by {key} v1: 1 created and unwrapped by the platform's client \
             over the API, {bulk} provisioned in bulk by the same use case",
            bulk + 1
        ),
    );

    // Rotation at the KMS: the event, the confirmation, and a re-wrap of every DEK.
    let info = local.rotate(&key).await?;
    let outcome = api.event(EventKind::Rotated, &key, &info).await?;
    line.step(
        "rotation",
        format!(
            "{key} rotated to version {} at the KMS; event {outcome}",
            info.current_version
        ),
    );
    let job = follow_job(
        store,
        &tenant,
        None,
        &format!("rotation to v{}", info.current_version),
    )
    .await?;
    let (file, subject) = mail.wait("rotated").await?;
    line.step(
        "re-wrap",
        format!(
            "job {} moved {} DEKs to v{} ({} failed); email \"{subject}\" in {}",
            job.id,
            job.done,
            info.current_version,
            job.failed,
            file.display()
        ),
    );

    // Time passes: the expiry scan, run with a clock 46 days ahead, warns of the expiry.
    let schedules = Arc::new(crate::sweeps::load_dir(&config.schedules_dir)?);
    let sweeper = Sweeper {
        kms: crate::daemon::build_kms(store, &root, &config.kms)?,
        store: store.clone(),
        schedules,
        wake: Wakers::default(),
    };
    let later = Utc::now() + Days::days(46);
    let report = sweep(&sweeper, later).await?;
    ensure!(
        report["keys_warned"] == 1,
        "the expiry scan at {later} warned of no key: {report}"
    );
    let (file, subject) = mail.wait("expires in").await?;
    line.step(
        "expiry warning",
        format!(
            "simulated clock +46 days: {} days left, the scan warned the tenant; email \
             \"{subject}\" to {contact} in {}",
            (expires - later).num_days() + 1,
            file.display()
        ),
    );

    // Recovery by extension: the tenant moves the expiry a year out; the warning is gone.
    let info = local
        .set_expiry(&key, Some(Utc::now() + Days::days(365)))
        .await?;
    let outcome = api.event(EventKind::ExpiryChanged, &key, &info).await?;
    let report = wait_no_warning(&sweeper, later).await?;
    line.step(
        "extension",
        format!(
            "expiry moved to {} (event {outcome}); the same scan at +46 days now warns of \
             nothing ({} keys in its window)",
            info.expires_at
                .map_or_else(|| "never".to_owned(), |e| e.format("%Y-%m-%d").to_string()),
            report["keys_in_window"]
        ),
    );

    // Revocation: the tenant disables its key; byokd refuses its DEKs at once.
    let info = local
        .transition(
            &key,
            &[KeyState::Enabled, KeyState::Disabled],
            KeyState::Disabled,
        )
        .await?;
    let outcome = api.event(EventKind::Disabled, &key, &info).await?;
    ensure!(
        api.access(&tenant).await? == "inaccessible",
        "the tenant is still accessible after the revocation"
    );
    let (unwrap_status, refusal) = api.call(Method::POST, &unwrap, &token, None).await?;
    ensure!(
        unwrap_status == 403,
        "an unwrap after the revocation answered {unwrap_status}: {refusal}"
    );
    let (create_status, _) = api
        .call(
            Method::POST,
            &format!("/v1/tenants/{tenant}/deks"),
            &token,
            None,
        )
        .await?;
    ensure!(
        create_status == 403,
        "a DEK request after the revocation answered {create_status}"
    );
    let (file, subject) = mail.wait("is inaccessible").await?;
    api.wait_confirmed(&tenant, "disabled").await?;
    line.step(
        "revocation",
        format!(
            "{key} disabled (event {outcome}): tenant inaccessible at once, unwrap refused \
             ({unwrap_status}), new DEKs refused ({create_status}), then confirmed at the KMS; \
             email \"{subject}\" in {}",
            file.display()
        ),
    );

    // The tenant enables it again: byokd restores access once the KMS confirms.
    let info = local
        .transition(
            &key,
            &[KeyState::Enabled, KeyState::Disabled],
            KeyState::Enabled,
        )
        .await?;
    let outcome = api.event(EventKind::Enabled, &key, &info).await?;
    api.wait_access(&tenant, "accessible").await?;
    let (status, _) = api.call(Method::POST, &unwrap, &token, None).await?;
    ensure!(
        status == 200,
        "an unwrap after the restoration answered {status}"
    );
    line.step(
        "restoration",
        format!("{key} enabled (event {outcome}); confirmed at the KMS, tenant accessible, unwrap allowed"),
    );

    // Recovery by replacement: a new key; every DEK moves to it, then the old one can go.
    let new_key = format!("acme-kek2-{suffix}");
    local.create(&new_key, None).await?;
    let registered = api
        .admin(
            Method::POST,
            &format!("/v1/tenants/{tenant}/keks"),
            Some(&json!({ "provider": "local", "key_ref": new_key, "replace": true })),
            201,
        )
        .await?;
    let job_id = registered["rewrap_job"].as_i64();
    let job = follow_job(store, &tenant, job_id, &format!("replacement by {new_key}")).await?;
    let (status, unwrapped) = api.call(Method::POST, &unwrap, &token, None).await?;
    ensure!(
        status == 200,
        "an unwrap after the replacement answered {status}"
    );
    let (file, subject) = mail.wait("now uses key").await?;
    line.step(
        "replacement",
        format!(
            "{new_key} replaced {key}: job {} moved {} DEKs ({} failed); the client's DEK \
             unwraps under {} v{}; email \"{subject}\" in {}",
            job.id,
            job.done,
            job.failed,
            new_key,
            unwrapped["kek_version"].as_str().unwrap_or("?"),
            file.display()
        ),
    );
    let report = keys.verify_deks(&tenant).await?;
    ensure!(
        report.failed == 0 && report.ok == DEKS as u64,
        "deks verify: {} ok, {} failed of {}",
        report.ok,
        report.failed,
        report.total
    );
    line.step(
        "verify",
        format!(
            "all {} DEKs unwrap under the new key with matching check values",
            report.ok
        ),
    );
    let mut files: Vec<String> = std::fs::read_dir(&mail.dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    line.step(
        "emails",
        format!(
            "{} written to {} (no SMTP server configured): {}",
            files.len(),
            mail.dir.display(),
            files.join(", ")
        ),
    );
    Ok(())
}

/// Creates `count` DEKs for the tenant through [`crate::keys::Keys::create_deks`], a
/// thousand at a time, with a progress bar on a terminal; returns how many.
async fn create_deks(
    keys: &crate::keys::Keys,
    tenant: &str,
    count: usize,
) -> anyhow::Result<usize> {
    let bar = bar(count as u64, "creating DEKs");
    let mut created = 0;
    while created < count {
        let chunk = (count - created).min(1000);
        created += keys.create_deks(tenant, chunk, Utc::now()).await?.len();
        bar.set_position(created as u64);
    }
    bar.finish_and_clear();
    Ok(created)
}

fn bar(len: u64, prefix: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} DEKs {per_sec} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}

/// Follows the tenant's re-wrap job (`id`, or the newest) with a progress bar until it
/// completes.
async fn follow_job(
    store: &Store,
    tenant: &str,
    id: Option<i64>,
    what: &str,
) -> anyhow::Result<crate::store::RewrapJobView> {
    let deadline = Instant::now() + STEP_LIMIT;
    let mut shown: Option<ProgressBar> = None;
    loop {
        let jobs = store.rewrap_jobs(tenant).await?;
        let job = match id {
            Some(id) => jobs.into_iter().find(|j| j.id == id),
            None => jobs.into_iter().max_by_key(|j| j.id),
        };
        if let Some(job) = job {
            let bar = shown.get_or_insert_with(|| bar(job.total.max(0) as u64, "re-wrapping"));
            bar.set_length(job.total.max(0) as u64);
            bar.set_position((job.done + job.failed).max(0) as u64);
            match job.state.as_str() {
                "completed" => {
                    bar.finish_and_clear();
                    ensure!(
                        job.failed == 0,
                        "the {what} job left {} DEKs failed",
                        job.failed
                    );
                    return Ok(job);
                }
                "failed" => {
                    bar.finish_and_clear();
                    bail!(
                        "the {what} job failed: {}",
                        job.last_error.as_deref().unwrap_or("no reason recorded")
                    );
                }
                _ => {}
            }
        }
        ensure!(
            Instant::now() < deadline,
            "the {what} re-wrap did not complete within {STEP_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the expiry scan as if it were `now`; its report.
async fn sweep(sweeper: &Sweeper, now: DateTime<Utc>) -> anyhow::Result<Value> {
    let report = sweeper
        .run_now("demo-expiry-scan", now)
        .await?
        .context("the expiry scan is running elsewhere")?;
    ensure!(
        report.status == "ok",
        "the expiry scan failed: {}",
        report.details
    );
    Ok(report.details)
}

/// Runs the expiry scan at `now` until the extension is on record and it warns of nothing.
async fn wait_no_warning(sweeper: &Sweeper, now: DateTime<Utc>) -> anyhow::Result<Value> {
    let deadline = Instant::now() + STEP_LIMIT;
    loop {
        let report = sweep(sweeper, now).await?;
        if report["keys_warned"] == 0 {
            return Ok(report);
        }
        ensure!(
            Instant::now() < deadline,
            "the expiry scan still warns after the extension: {report}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
