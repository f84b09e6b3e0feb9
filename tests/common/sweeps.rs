//! Sweeps driven by the test: a [`Sweeper`] with the expiry scan and the key probe (never
//! loaded from the shipped crons), run with an injected clock.

use super::TestApp;
use byokd::sweeps::{Schedule, Sweeper, Wakers, parse_schedule};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::sync::Arc;

/// The expiry scan, warning at 30, 14, 7 and 1 days left.
pub const EXPIRY: &str = "name = \"expiry-scan\"\ncron = \"0 */15 * * * *\"\njob = \"expiry_scan\"\n[params]\nthresholds_days = [30, 14, 7, 1]\n";
/// The key probe, with a 30-minute grace for an unreachable KMS and a 2 s timeout per key.
pub const PROBE: &str = "name = \"key-probe\"\ncron = \"0 */5 * * * *\"\njob = \"key_probe\"\n[params]\nunreachable_grace_minutes = 30\ntimeout_seconds = 2\n";

/// The [`EXPIRY`] and [`PROBE`] schedules.
pub fn schedules() -> Vec<Schedule> {
    vec![
        parse_schedule("expiry.toml", EXPIRY).expect("expiry schedule"),
        parse_schedule("probe.toml", PROBE).expect("probe schedule"),
    ]
}

/// A sweeper over the test's database and the daemon's KMS settings, with [`schedules`]: the
/// test runs them when it wants (see [`run`]).
pub async fn sweeper(app: &TestApp) -> Sweeper {
    let store = byokd::store::Store::connect(&app.db.url, 4)
        .await
        .expect("store");
    let root = app.config.require_root_keys().expect("root");
    Sweeper {
        kms: byokd::daemon::build_kms(&store, &root, &app.config.kms).expect("kms"),
        store,
        schedules: Arc::new(schedules()),
        wake: Wakers::default(),
    }
}

/// Runs schedule `name` as at `now` and returns its report; panics unless it ran and was ok.
pub async fn run(s: &Sweeper, name: &str, now: DateTime<Utc>) -> Value {
    let report = s
        .run_now(name, now)
        .await
        .expect("sweep")
        .expect("not locked");
    assert_eq!(report.status, "ok", "{:?}", report.details);
    report.details
}
