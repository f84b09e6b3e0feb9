//! Property tests of the state model ("the KMS is the truth").
//!
//! * `events_and_one_probe_converge_to_the_kms` drives byokd's library against the real
//!   PostgreSQL and byokd's own local KMS: random sequences of KMS operations, the events they
//!   emit delivered late, twice, out of order, with skewed times, lost, and split across the
//!   two lanes (the lifecycle queue and the urgent lane that gets its own copy of every
//!   revocation), with confirmation rounds at random points. At every step a revocation that
//!   was delivered keeps the tenant from `accessible` while the key is unusable at the KMS; a
//!   confirmation that observed the key leaves byokd's record equal to the KMS (a claim too
//!   young to be settled may stay, only ever stricter than the KMS); and after the events
//!   drain, the claims' settle time passes and one probe runs, record and access equal the
//!   KMS's actual state. Each case has its own tenant and key in one database; the summary of
//!   what the cases exercised prints with `--nocapture`, and `PROPTEST_CASES` sets how many.
//! * `kek_state_model` checks the pure model (`byokd::domain::kek`) the same way, without I/O:
//!   a revocation in force since the last observation is never usable, and an observation of
//!   the truth alone decides access.

mod common;

use byokd::domain::kek::{self, KekStatus, TenantKey, Usability};
use byokd::domain::{Access, EventKind, KeyState, LifecycleEvent, Observation, Origin, Provider};
use byokd::kms::{KeyInfo, Kms, KmsProvider, LocalKms};
use byokd::store::{AuditRow, KekView, NewTenant, Store, TenantView};
use chrono::{DateTime, Duration, SubsecRound, TimeZone, Utc};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestError, TestRunner};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Shared vocabulary
// ---------------------------------------------------------------------------------------------

/// How many copies of one event a lane delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copies {
    Lost,
    Once,
    Twice,
}

impl Copies {
    fn count(self) -> usize {
        match self {
            Copies::Lost => 0,
            Copies::Once => 1,
            Copies::Twice => 2,
        }
    }
}

fn copies() -> impl Strategy<Value = Copies> {
    prop_oneof![
        1 => Just(Copies::Lost),
        5 => Just(Copies::Once),
        2 => Just(Copies::Twice),
    ]
}

/// Access as the KMS's own answer implies it, computed here without byokd's derivation.
fn access_of_kms(state: KeyState, revoked: bool, expired: bool, provider: Provider) -> Access {
    match state {
        KeyState::Disabled | KeyState::PendingDeletion | KeyState::Destroyed => {
            Access::Inaccessible
        }
        _ if revoked => Access::Inaccessible,
        // AWS keys with imported material refuse everything once expired; elsewhere unwrap stays.
        KeyState::Expired if provider == Provider::Aws => Access::Inaccessible,
        KeyState::Expired => Access::EncryptBlocked,
        KeyState::Enabled if expired && provider == Provider::Aws => Access::Inaccessible,
        KeyState::Enabled if expired => Access::EncryptBlocked,
        KeyState::Enabled => Access::Accessible,
    }
}

/// An event that takes effect at once: a revoking kind, or an expiry moved into the past on a
/// provider whose KMS holds the expiry.
fn revokes(event: &LifecycleEvent, now: DateTime<Utc>) -> bool {
    event.kind.is_revoking()
        || (event.kind == EventKind::ExpiryChanged
            && event.provider.kms_holds_expiry()
            && event.expires_at.is_some_and(|at| at <= now))
}

// ---------------------------------------------------------------------------------------------
// Against PostgreSQL and the local KMS
// ---------------------------------------------------------------------------------------------

/// A KMS operation on the local keyring, as `byokd kms local ...` performs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Disable,
    Enable,
    ScheduleDeletion,
    CancelDeletion,
    Rotate,
    ExpirePast,
    ExpireFuture,
    ClearExpiry,
    Destroy,
}

/// One lane of deliveries: the lifecycle queue gets every event, the urgent lane its own copy
/// of revocations (`*.disabled`, `*.deletion_scheduled`, `*.destroyed`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Main,
    Urgent,
}

/// What happens between KMS operations.
#[derive(Debug, Clone)]
enum Action {
    /// The lane's consumer takes up to `n` of its pending deliveries, in the order `picks`
    /// chooses from what is pending (delays and reordering), and applies them in one batch.
    /// `aged`: on byokd's clock the batch lies further back than the claim settle time, as
    /// when the confirmation comes when it is due; otherwise a confirmation round may come
    /// while a claim it made is still too young to be settled.
    Deliver {
        lane: Lane,
        n: usize,
        picks: Vec<Index>,
        aged: bool,
    },
    /// One confirmation round, as the daemon's confirm loop runs it.
    Confirm,
}

#[derive(Debug, Clone)]
struct Step {
    op: Op,
    /// Which of the two publishers reports it (both number their events `evt-0001`, ...).
    source: usize,
    /// Event time relative to the real time of the operation, seconds.
    skew_secs: i64,
    /// For `ExpirePast`: how far in the past the new date lies, seconds.
    past_secs: i64,
    main: Copies,
    urgent: Copies,
    then: Vec<Action>,
}

#[derive(Debug, Clone)]
struct Scenario {
    steps: Vec<Step>,
    /// Deliveries after the last operation; the rest of the lanes drains after them.
    drain: Vec<Action>,
}

fn action() -> impl Strategy<Value = Action> {
    let deliver = (
        prop_oneof![Just(Lane::Main), Just(Lane::Urgent)],
        1usize..=4,
        prop::collection::vec(any::<Index>(), 4),
        // Young claims make the case wait out the settle time at its end: not too often.
        prop::bool::weighted(0.85),
    )
        .prop_map(|(lane, n, picks, aged)| Action::Deliver {
            lane,
            n,
            picks,
            aged,
        });
    prop_oneof![3 => deliver, 1 => Just(Action::Confirm)]
}

fn step(op: impl Strategy<Value = Op>) -> impl Strategy<Value = Step> {
    (
        op,
        0usize..2,
        // Up to 10 minutes late or early, but never beyond the 5 minutes ahead that intake
        // allows (events further ahead are refused before they reach the lifecycle).
        -600i64..=290,
        60i64..=86_400,
        copies(),
        copies(),
        prop::collection::vec(action(), 0..=3),
    )
        .prop_map(
            |(op, source, skew_secs, past_secs, main, urgent, then)| Step {
                op,
                source,
                skew_secs,
                past_secs,
                main,
                urgent,
                then,
            },
        )
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let op = prop_oneof![
        3 => Just(Op::Disable),
        3 => Just(Op::Enable),
        // Once pending deletion, little else is legal: not too often.
        1 => Just(Op::ScheduleDeletion),
        2 => Just(Op::CancelDeletion),
        2 => Just(Op::Rotate),
        2 => Just(Op::ExpirePast),
        2 => Just(Op::ExpireFuture),
        2 => Just(Op::ClearExpiry),
    ];
    (
        prop::collection::vec(step(op), 1..=12),
        // Destroyed is final: rarely, and only as the last operation.
        proptest::option::weighted(0.1, step(Just(Op::Destroy))),
        prop::collection::vec(action(), 0..=8),
    )
        .prop_map(|(mut steps, destroy, drain)| {
            steps.extend(destroy);
            Scenario { steps, drain }
        })
}

/// The database and KMS shared by every case (each case has its own tenant and key).
struct Env {
    db: common::TestDb,
    store: Store,
    kms: Kms,
    local: LocalKms,
    /// For the test's own bookkeeping only (retiring a finished case's key).
    pool: sqlx::PgPool,
    stats: Mutex<Stats>,
}

/// What the cases exercised, printed at the end (`--nocapture`) to show the checks had teeth.
#[derive(Debug, Default)]
struct Stats {
    ops: usize,
    skipped_ops: usize,
    batches: usize,
    deliveries: usize,
    duplicates: usize,
    rounds: usize,
    rounds_observed: usize,
    /// Observations that kept a claim too young to be settled.
    young_claims_kept: usize,
    /// Cases that waited out a claim's settle time before the probe.
    settle_waits: usize,
    /// Safety checks made while a delivered revocation of the current unusable spell had to
    /// keep the tenant from `accessible`.
    safety_armed: usize,
    /// Final KMS states, by name.
    finals: BTreeMap<String, usize>,
}

async fn env() -> Env {
    let db = common::TestDb::create().await;
    let store = Store::connect(&db.url, 4).await.expect("store");
    store.migrate().await.expect("migrate");
    let config = common::test_config(&db.url, common::unique_amqp());
    let root = config.require_root_keys().expect("root key");
    let kms = byokd::daemon::build_kms(&store, &root, &config.kms).expect("kms");
    let local = LocalKms::new(
        store.clone(),
        Arc::new(byokd::seal::Sealer::with_previous(
            &root,
            byokd::seal::LOCAL_KMS_PURPOSE,
        )),
    );
    Env {
        store,
        kms,
        local,
        pool: sqlx::PgPool::connect(&db.url).await.expect("pool"),
        stats: Mutex::new(Stats::default()),
        db,
    }
}

/// One event as emitted, and what became of it.
struct Emitted {
    revoking: bool,
    delivered: bool,
}

/// The running state of one case.
struct Case<'a> {
    env: &'a Env,
    tenant: String,
    key: String,
    sources: [String; 2],
    counters: [u32; 2],
    /// What the KMS says now (`describe`), refreshed after every operation.
    truth: KeyInfo,
    emitted: Vec<Emitted>,
    /// Index into `emitted` of the operation that made the key stop being usable, while it
    /// still is not.
    blocked_since: Option<usize>,
    lanes: [Vec<(usize, LifecycleEvent)>; 2],
    delivered: HashSet<(String, String)>,
    /// A first delivery happened since the last confirmation round.
    fresh_since_round: bool,
    /// The claim in force as last read, and until when it is too young to be settled.
    last_claim: Option<EventKind>,
    claim_young_until: Option<DateTime<Utc>>,
    log: Vec<String>,
}

fn fail(case: &Case<'_>, what: String) -> TestCaseError {
    TestCaseError::fail(format!("{what}\n  trace:\n    {}", case.log.join("\n    ")))
}

macro_rules! check {
    ($case:expr, $cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(fail($case, format!($($msg)+)));
        }
    };
}

fn kms_access(info: &KeyInfo) -> Access {
    // The local KMS reports `expired` itself for an enabled key past its date.
    access_of_kms(info.state, false, false, Provider::Local)
}

/// How much an access forbids.
fn strictness(access: Access) -> u8 {
    match access {
        Access::Accessible => 0,
        Access::EncryptBlocked => 1,
        Access::Inaccessible => 2,
    }
}

fn millis(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(|t| t.timestamp_millis())
}

impl Case<'_> {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.env.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn view(&self) -> TenantView {
        self.env.store.tenant(&self.tenant).await.expect("tenant")
    }

    async fn describe(&self) -> KeyInfo {
        self.env.local.describe(&self.key).await.expect("describe")
    }

    /// Performs the step's operation at the KMS if it is legal in the key's state, and puts
    /// the event it emits into the lanes.
    async fn operate(&mut self, step: &Step) {
        use KeyState::{Destroyed, Disabled, Enabled, PendingDeletion};
        let local = &self.env.local;
        let key = self.key.as_str();
        let raw = match self.truth.state {
            KeyState::Expired => Enabled,
            s => s,
        };
        let now = Utc::now().trunc_subsecs(0);
        let toggles = matches!(raw, Enabled | Disabled);
        let done = match step.op {
            Op::Disable if toggles => Some((
                EventKind::Disabled,
                local.transition(key, &[Enabled, Disabled], Disabled).await,
            )),
            Op::Enable if toggles => Some((
                EventKind::Enabled,
                local.transition(key, &[Enabled, Disabled], Enabled).await,
            )),
            Op::ScheduleDeletion if toggles => Some((
                EventKind::DeletionScheduled,
                local
                    .transition(key, &[Enabled, Disabled], PendingDeletion)
                    .await,
            )),
            Op::CancelDeletion if raw == PendingDeletion => Some((
                EventKind::DeletionCancelled,
                local.transition(key, &[PendingDeletion], Disabled).await,
            )),
            Op::Destroy if raw != Destroyed => Some((
                EventKind::Destroyed,
                local
                    .transition(key, &[Enabled, Disabled, PendingDeletion], Destroyed)
                    .await,
            )),
            Op::Rotate if toggles => Some((EventKind::Rotated, local.rotate(key).await)),
            Op::ExpirePast if raw != Destroyed => Some((
                EventKind::ExpiryChanged,
                local
                    .set_expiry(key, Some(now - Duration::seconds(step.past_secs)))
                    .await,
            )),
            Op::ExpireFuture if raw != Destroyed => Some((
                EventKind::ExpiryChanged,
                local.set_expiry(key, Some(now + Duration::days(1))).await,
            )),
            Op::ClearExpiry if raw != Destroyed => {
                Some((EventKind::ExpiryChanged, local.set_expiry(key, None).await))
            }
            _ => None,
        };
        let Some((kind, result)) = done else {
            self.log
                .push(format!("skip {:?} (key is {})", step.op, raw));
            self.stats().skipped_ops += 1;
            return;
        };
        let info = result.unwrap_or_else(|e| panic!("local KMS {:?}: {e}", step.op));
        self.stats().ops += 1;
        self.truth = self.describe().await;
        assert_eq!(info.state, self.truth.state, "the KMS answers consistently");
        self.counters[step.source] += 1;
        let event = LifecycleEvent {
            provider: Provider::Local,
            event_id: format!("evt-{:04}", self.counters[step.source]),
            kind,
            key_ref: self.key.clone(),
            version: (kind == EventKind::Rotated).then(|| info.current_version.clone()),
            expires_at: info.expires_at,
            time: Utc::now() + Duration::seconds(step.skew_secs),
            source: self.sources[step.source].clone(),
            origin: Origin::Event,
        };
        let index = self.emitted.len();
        self.emitted.push(Emitted {
            revoking: revokes(&event, Utc::now()),
            delivered: false,
        });
        if kms_access(&self.truth) == Access::Accessible {
            self.blocked_since = None;
        } else if self.blocked_since.is_none() {
            self.blocked_since = Some(index);
        }
        let urgent = if kind.is_revoking() {
            step.urgent.count()
        } else {
            0
        };
        for _ in 0..step.main.count() {
            self.lanes[0].push((index, event.clone()));
        }
        for _ in 0..urgent {
            self.lanes[1].push((index, event.clone()));
        }
        self.log.push(format!(
            "#{index} {:?} -> KMS {} v{} exp {:?}; {}/{} {} skew {}s; copies main {} urgent {}",
            step.op,
            self.truth.state,
            self.truth.current_version,
            self.truth.expires_at.map(|t| t.to_rfc3339()),
            ["kms-a", "kms-b"][step.source],
            event.event_id,
            kind,
            step.skew_secs,
            step.main.count(),
            urgent,
        ));
    }

    async fn act(&mut self, action: &Action) -> Result<(), TestCaseError> {
        match action {
            Action::Deliver {
                lane,
                n,
                picks,
                aged,
            } => self.deliver(*lane, *n, Some(picks), *aged).await,
            Action::Confirm => self.confirm().await,
        }
    }

    /// Applies up to `n` pending deliveries of `lane` in one batch, chosen by `picks` (the
    /// oldest first without).
    async fn deliver(
        &mut self,
        lane: Lane,
        n: usize,
        picks: Option<&[Index]>,
        aged: bool,
    ) -> Result<(), TestCaseError> {
        let pool = &mut self.lanes[lane as usize];
        let mut batch = Vec::new();
        let mut ops = Vec::new();
        for i in 0..n {
            if pool.is_empty() {
                break;
            }
            let at = picks
                .and_then(|p| p.get(i))
                .map_or(0, |pick| pick.index(pool.len()));
            let (op, event) = pool.remove(at);
            ops.push(op);
            batch.push(event);
        }
        if batch.is_empty() {
            return Ok(());
        }
        // The intake's check: none of these lies beyond the allowed skew.
        let skew_ok =
            byokd::events::normalize::check_times(&batch, Utc::now(), Duration::seconds(300));
        check!(self, skew_ok.is_ok(), "intake refused a batch: {skew_ok:?}");
        let mut expected_dup = Vec::new();
        for event in &batch {
            let id = (event.source.clone(), event.event_id.clone());
            expected_dup.push(!self.delivered.insert(id));
        }
        let now = if aged {
            Utc::now() - byokd::lifecycle::CLAIM_SETTLE - Duration::seconds(1)
        } else {
            Utc::now()
        };
        let result = byokd::lifecycle::apply_batch(&self.env.store, &batch, now)
            .await
            .expect("apply batch");
        self.log.push(format!(
            "deliver {lane:?}{} [{}] -> {:?}",
            if aged { "" } else { " (young)" },
            batch
                .iter()
                .zip(&ops)
                .map(|(e, op)| format!("#{op} {}", e.kind))
                .collect::<Vec<_>>()
                .join(", "),
            result.outcomes
        ));
        for (i, outcome) in result.outcomes.iter().enumerate() {
            let dup = *outcome == byokd::lifecycle::Outcome::Duplicate;
            check!(
                self,
                dup == expected_dup[i],
                "event {} of the batch: outcome {outcome:?}, but it was {}delivered before",
                i,
                if expected_dup[i] { "" } else { "not " }
            );
        }
        if expected_dup.iter().any(|d| !d) {
            self.fresh_since_round = true;
        }
        {
            let mut stats = self.stats();
            stats.batches += 1;
            stats.deliveries += batch.len();
            stats.duplicates += expected_dup.iter().filter(|d| **d).count();
        }
        for op in ops {
            self.emitted[op].delivered = true;
        }
        let view = self.view().await;
        let claim = view.keks[0].claim;
        if claim.is_none() {
            self.claim_young_until = None;
        } else if claim != self.last_claim {
            // The store stamps a new claim with the batch's clock.
            self.claim_young_until = Some(now + byokd::lifecycle::CLAIM_SETTLE);
        }
        self.last_claim = claim;
        self.check_safety(&view, "after a batch")
    }

    /// A delivered revocation of the key's current unusable spell keeps the tenant from
    /// `accessible` until the KMS says otherwise (an observation at the KMS, which still finds
    /// the key unusable). Lost ones are the probe's business.
    fn check_safety(&self, view: &TenantView, when: &str) -> Result<(), TestCaseError> {
        let Some(since) = self.blocked_since else {
            return Ok(());
        };
        let delivered = self.emitted[since..]
            .iter()
            .any(|e| e.revoking && e.delivered);
        if delivered {
            self.stats().safety_armed += 1;
        }
        check!(
            self,
            !(delivered && view.access == Access::Accessible),
            "{when}: the key is {} at the KMS and its revocation was delivered, yet the tenant \
             is accessible (kek {:?})",
            self.truth.state,
            view.keks.first()
        );
        Ok(())
    }

    /// One confirmation round; when it observed the key, byokd's record equals the KMS.
    async fn confirm(&mut self) -> Result<(), TestCaseError> {
        let before = self.view().await;
        let start = Utc::now().trunc_subsecs(6);
        common::confirm_round(&self.env.store, &self.env.kms).await;
        let view = self.view().await;
        let kek = &view.keks[0];
        let observed = kek.observed_at.is_some_and(|at| at >= start);
        self.log.push(format!(
            "confirm -> {}observed: {} claim {:?}, access {}",
            if observed { "" } else { "not " },
            kek.observed_state,
            kek.claim,
            view.access
        ));
        check!(
            self,
            observed
                || !self.fresh_since_round
                || before.keks[0].observed_state == KeyState::Destroyed,
            "a fresh event was applied since the last round, yet the round did not observe the key"
        );
        self.fresh_since_round = false;
        {
            let mut stats = self.stats();
            stats.rounds += 1;
            stats.rounds_observed += usize::from(observed);
        }
        let claim = kek.claim;
        if observed && claim.is_some() {
            // Only a claim too young to be settled survives an observation, and it only adds
            // to what the KMS says.
            self.stats().young_claims_kept += 1;
            check!(
                self,
                self.claim_young_until.is_some_and(|until| until > start),
                "a confirmation that observed the key kept the claim {claim:?}, which was not \
                 young (young until {:?}, round at {start})",
                self.claim_young_until
            );
            let expected = kms_access(&self.truth);
            check!(
                self,
                strictness(view.access) >= strictness(expected),
                "with the claim {claim:?} in force the tenant is {}, yet the KMS's state {} \
                 means {expected}",
                view.access,
                self.truth.state
            );
            self.check_observed_part(&view, "after a confirmation that observed the key")?;
        } else if observed {
            self.check_matches_kms(&view, "after a confirmation that observed the key")?;
        }
        if claim.is_none() {
            self.claim_young_until = None;
        }
        self.last_claim = claim;
        self.check_safety(&view, "after a confirmation")
    }

    /// Every claim settles once its settle time has passed: waits it out where one is young.
    async fn settle_claims(&mut self) -> Result<(), TestCaseError> {
        if self.last_claim.is_none() {
            return Ok(());
        }
        if let Some(until) = self.claim_young_until {
            let wait = (until - Utc::now() + Duration::milliseconds(20))
                .to_std()
                .unwrap_or_default();
            self.log
                .push(format!("wait {wait:?} for the claim to settle"));
            self.stats().settle_waits += 1;
            tokio::time::sleep(wait).await;
        }
        self.confirm().await
    }

    fn check_matches_kms(&self, view: &TenantView, when: &str) -> Result<(), TestCaseError> {
        let kek: &KekView = &view.keks[0];
        let truth = &self.truth;
        self.check_observed_part(view, when)?;
        check!(
            self,
            kek.claim.is_none(),
            "{when}: claim {:?} left in force",
            kek.claim
        );
        let expected = kms_access(truth);
        check!(
            self,
            view.access == expected,
            "{when}: access {} ({:?}) but the KMS's state {} means {}",
            view.access,
            view.reason,
            truth.state,
            expected
        );
        Ok(())
    }

    /// The observed part of the record (state, version, expiry) equals the KMS.
    fn check_observed_part(&self, view: &TenantView, when: &str) -> Result<(), TestCaseError> {
        let kek: &KekView = &view.keks[0];
        let truth = &self.truth;
        check!(
            self,
            kek.observed_state == truth.state,
            "{when}: observed_state {} but the KMS says {}",
            kek.observed_state,
            truth.state
        );
        check!(
            self,
            kek.current_version.as_deref() == Some(truth.current_version.as_str()),
            "{when}: version {:?} but the KMS says {}",
            kek.current_version,
            truth.current_version
        );
        check!(
            self,
            millis(kek.expires_at) == millis(truth.expires_at),
            "{when}: expires_at {:?} but the KMS says {:?}",
            kek.expires_at,
            truth.expires_at
        );
        Ok(())
    }

    /// Every lane drains: first the scenario's own deliveries, then the rest in the order they
    /// prescribe (cycled), falling back to FIFO batches when they deliver nothing.
    async fn drain(&mut self, drain: &[Action]) -> Result<(), TestCaseError> {
        for action in drain {
            self.act(action).await?;
        }
        let delivering: Vec<&Action> = drain
            .iter()
            .filter(|a| matches!(a, Action::Deliver { .. }))
            .collect();
        let mut turn = 0usize;
        while self.lanes.iter().any(|l| !l.is_empty()) {
            match delivering.get(turn % delivering.len().max(1)) {
                Some(Action::Deliver {
                    lane,
                    n,
                    picks,
                    aged,
                }) => {
                    let lane = if self.lanes[*lane as usize].is_empty() {
                        other(*lane)
                    } else {
                        *lane
                    };
                    self.deliver(lane, *n, Some(picks), *aged).await?;
                }
                _ => {
                    let lane = if self.lanes[0].is_empty() {
                        Lane::Urgent
                    } else {
                        Lane::Main
                    };
                    self.deliver(lane, 4, None, true).await?;
                }
            }
            turn += 1;
        }
        Ok(())
    }
}

fn other(lane: Lane) -> Lane {
    match lane {
        Lane::Main => Lane::Urgent,
        Lane::Urgent => Lane::Main,
    }
}

async fn run_scenario(env: &Env, scenario: &Scenario) -> Result<(), TestCaseError> {
    let id = Uuid::new_v4().simple().to_string();
    let tenant = format!("prop-{}", &id[..12]);
    let key = format!("prop-key-{}", &id[..12]);
    let initial = env.local.create(&key, None).await.expect("create key");
    env.store
        .create_tenant(&NewTenant {
            id: tenant.clone(),
            name: tenant.clone(),
            contacts: Vec::new(),
            webhooks: Vec::new(),
        })
        .await
        .expect("tenant");
    // As `POST /v1/tenants/{id}/keks` registers a key the test wrap/unwrap found usable.
    let status = KekStatus::observed(
        Provider::Local,
        key.clone(),
        Some(initial.current_version.clone()),
        initial.expires_at,
    );
    let audit = AuditRow {
        tenant_id: Some(tenant.clone()),
        provider: Some(Provider::Local),
        key_ref: Some(key.clone()),
        action: "kek_registered".into(),
        outcome: "applied".into(),
        source: "api".into(),
        event_id: None,
        detail: serde_json::json!({}),
    };
    env.store
        .register_kek(&tenant, &status, &audit, false)
        .await
        .expect("register kek");
    let cause = byokd::lifecycle::Cause::new("registration", Some((Provider::Local, key.clone())));
    byokd::lifecycle::refresh_access(
        &env.store,
        std::slice::from_ref(&tenant),
        &cause,
        Utc::now(),
    )
    .await
    .expect("refresh access");

    let mut case = Case {
        env,
        tenant,
        sources: [format!("test://kms-a/{id}"), format!("test://kms-b/{id}")],
        key,
        counters: [0, 0],
        truth: initial,
        emitted: Vec::new(),
        blocked_since: None,
        lanes: [Vec::new(), Vec::new()],
        delivered: HashSet::new(),
        fresh_since_round: false,
        last_claim: None,
        claim_young_until: None,
        log: Vec::new(),
    };
    let result = play(&mut case, scenario).await;
    // Done with this key: keep it out of later cases' probes and confirmation rounds.
    sqlx::query("UPDATE keks SET retired_at = now(), confirm_due_at = NULL WHERE key_ref = $1")
        .bind(&case.key)
        .execute(&env.pool)
        .await
        .expect("retire the case's key");
    result
}

async fn play(case: &mut Case<'_>, scenario: &Scenario) -> Result<(), TestCaseError> {
    let env = case.env;
    let view = case.view().await;
    check!(
        case,
        view.access == Access::Accessible,
        "a new key leaves the tenant {}",
        view.access
    );

    for step in &scenario.steps {
        case.operate(step).await;
        for action in &step.then {
            case.act(action).await?;
        }
    }
    case.drain(&scenario.drain).await?;

    // The events drained; one confirmation round (and, where a claim was still too young to
    // be settled, one more once it is not) and one probe converge to the KMS.
    case.confirm().await?;
    case.settle_claims().await?;
    let settings = byokd::sweeps::probe::ProbeSettings {
        unreachable_grace: std::time::Duration::from_secs(1800),
        timeout: std::time::Duration::from_secs(10),
        concurrency: 8,
    };
    let report = byokd::sweeps::probe::key_probe(&env.store, &env.kms, &settings, Utc::now())
        .await
        .expect("key probe");
    case.log.push(format!("probe -> {report:?}"));
    check!(
        case,
        report.unreachable == 0,
        "the local KMS was unreachable: {report:?}"
    );
    case.truth = case.describe().await;
    let view = case.view().await;
    case.check_matches_kms(&view, "after the events drained and one probe ran")?;
    *case
        .stats()
        .finals
        .entry(case.truth.state.to_string())
        .or_default() += 1;
    Ok(())
}

#[test]
fn events_and_one_probe_converge_to_the_kms() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let env = runtime.block_on(env());
    let started = Instant::now();
    let mut runner = TestRunner::new(ProptestConfig {
        // PROPTEST_CASES=500 for a longer local run.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(32),
        // No regression files in the work tree; a failure prints its minimal scenario.
        failure_persistence: None,
        max_shrink_time: 120_000,
        ..ProptestConfig::default()
    });
    let cases = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&scenario(), |scenario| {
        cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        runtime.block_on(run_scenario(&env, &scenario))
    });
    eprintln!(
        "state properties: {} scenarios run in {:.1?}: {:#?}",
        cases.load(std::sync::atomic::Ordering::Relaxed),
        started.elapsed(),
        env.stats.lock().unwrap_or_else(|e| e.into_inner())
    );
    runtime.block_on(env.db.drop_db());
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, scenario)) => {
            panic!("property failed: {why}\nminimal scenario: {scenario:#?}")
        }
        Err(e) => panic!("property test aborted: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The pure model
// ---------------------------------------------------------------------------------------------

/// A change at the KMS (any provider whose KMS holds the key's expiry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PureOp {
    Disable,
    Enable,
    ScheduleDeletion,
    CancelDeletion,
    Destroy,
    Rotate,
    /// Seconds before now.
    ExpirePast(i64),
    /// Seconds after now.
    ExpireFuture(i64),
    ClearExpiry,
    RevokeAccess,
    RestoreAccess,
}

#[derive(Debug, Clone)]
enum PureStep {
    /// The KMS changes and emits an event: lost, once or twice, with a skewed time.
    Op {
        op: PureOp,
        copies: Copies,
        skew_secs: i64,
    },
    /// One pending event (any of them: delays and reordering) is applied.
    Deliver(Index),
    /// An event no KMS change backs (a claim the KMS will refute).
    Bogus {
        kind: Index,
        expires_in_secs: Option<i64>,
    },
    /// byokd observes the KMS. `newer`: a claim arrived while it asked. `expired_state`: the
    /// KMS reports an enabled key past its date as `expired`; `denied`: a KMS that denies
    /// byokd's access says nothing else.
    Observe {
        newer: bool,
        expired_state: bool,
        denied: bool,
    },
    /// The clock moves on.
    Tick(i64),
}

#[derive(Debug, Clone)]
struct Truth {
    state: KeyState,
    revoked: bool,
    version: u32,
    expires_at: Option<DateTime<Utc>>,
}

fn pure_step() -> impl Strategy<Value = PureStep> {
    let op = prop_oneof![
        3 => Just(PureOp::Disable),
        3 => Just(PureOp::Enable),
        3 => Just(PureOp::ScheduleDeletion),
        3 => Just(PureOp::CancelDeletion),
        3 => Just(PureOp::Rotate),
        3 => (1i64..86_400).prop_map(PureOp::ExpirePast),
        3 => (1i64..7_200).prop_map(PureOp::ExpireFuture),
        3 => Just(PureOp::ClearExpiry),
        3 => Just(PureOp::RevokeAccess),
        3 => Just(PureOp::RestoreAccess),
        // Rare: it ends the key's story.
        1 => Just(PureOp::Destroy),
    ];
    prop_oneof![
        4 => (op, copies(), -600i64..=290)
            .prop_map(|(op, copies, skew_secs)| PureStep::Op { op, copies, skew_secs }),
        4 => any::<Index>().prop_map(PureStep::Deliver),
        1 => (any::<Index>(), proptest::option::of(-3_600i64..3_600))
            .prop_map(|(kind, expires_in_secs)| PureStep::Bogus { kind, expires_in_secs }),
        2 => (any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(newer, expired_state, denied)| PureStep::Observe {
                newer,
                expired_state,
                denied,
            }),
        1 => (1i64..3_600).prop_map(PureStep::Tick),
    ]
}

fn observation(
    truth: &Truth,
    now: DateTime<Utc>,
    expired_state: bool,
    denied: bool,
) -> Observation {
    if truth.state == KeyState::Destroyed {
        return Observation {
            state: Some(KeyState::Destroyed),
            revoked: false,
            version: None,
            expires_at: None,
            versions: None,
        };
    }
    if truth.revoked && denied {
        return Observation {
            state: None,
            revoked: true,
            version: None,
            expires_at: None,
            versions: None,
        };
    }
    let expired = truth.expires_at.is_some_and(|at| at <= now);
    Observation {
        state: Some(
            if truth.state == KeyState::Enabled && expired && expired_state {
                KeyState::Expired
            } else {
                truth.state
            },
        ),
        revoked: truth.revoked,
        version: Some(truth.version.to_string()),
        expires_at: Some(truth.expires_at),
        versions: None,
    }
}

/// Applies `op` to the truth if the KMS allows it; the kind of event it emits.
fn kms_op(truth: &mut Truth, op: PureOp, now: DateTime<Utc>) -> Option<EventKind> {
    use KeyState::{Destroyed, Disabled, Enabled, PendingDeletion};
    let toggles = matches!(truth.state, Enabled | Disabled);
    let alive = truth.state != Destroyed;
    let (kind, state) = match op {
        PureOp::Disable if toggles => (EventKind::Disabled, Disabled),
        PureOp::Enable if toggles => (EventKind::Enabled, Enabled),
        PureOp::ScheduleDeletion if toggles => (EventKind::DeletionScheduled, PendingDeletion),
        PureOp::CancelDeletion if truth.state == PendingDeletion => {
            (EventKind::DeletionCancelled, Disabled)
        }
        PureOp::Destroy if alive => (EventKind::Destroyed, Destroyed),
        PureOp::Rotate if toggles => {
            truth.version += 1;
            (EventKind::Rotated, truth.state)
        }
        PureOp::ExpirePast(s) if alive => {
            truth.expires_at = Some(now - Duration::seconds(s));
            (EventKind::ExpiryChanged, truth.state)
        }
        PureOp::ExpireFuture(s) if alive => {
            truth.expires_at = Some(now + Duration::seconds(s));
            (EventKind::ExpiryChanged, truth.state)
        }
        PureOp::ClearExpiry if alive => {
            truth.expires_at = None;
            (EventKind::ExpiryChanged, truth.state)
        }
        PureOp::RevokeAccess if alive => {
            truth.revoked = true;
            (EventKind::AccessRevoked, truth.state)
        }
        PureOp::RestoreAccess if alive => {
            truth.revoked = false;
            (EventKind::AccessRestored, truth.state)
        }
        _ => return None,
    };
    truth.state = state;
    Some(kind)
}

fn primary(status: &KekStatus) -> [TenantKey<'_>; 1] {
    [TenantKey {
        status,
        primary: true,
        held_deks: 0,
    }]
}

fn run_pure(
    provider: Provider,
    initial_expiry: Option<i64>,
    steps: &[PureStep],
) -> Result<(), TestCaseError> {
    let mut now = Utc
        .timestamp_opt(1_900_000_000, 0)
        .single()
        .expect("valid time");
    let expires = initial_expiry.map(|s| now + Duration::seconds(s));
    let mut kek = KekStatus::observed(provider, "k1", Some("1".into()), expires);
    let mut truth = Truth {
        state: KeyState::Enabled,
        revoked: false,
        version: 1,
        expires_at: expires,
    };
    let mut pending: Vec<LifecycleEvent> = Vec::new();
    let mut seq = 0u32;
    // A revocation arrived since the last observation that settles claims.
    let mut revoked_since_observation = false;
    let mut log: Vec<String> = Vec::new();
    let fail = |log: &[String], what: String| {
        TestCaseError::fail(format!("{what}\n  trace:\n    {}", log.join("\n    ")))
    };
    let event = |seq: u32, kind: EventKind, expires_at, time| LifecycleEvent {
        provider,
        event_id: format!("e{seq}"),
        kind,
        key_ref: "k1".into(),
        version: None,
        expires_at,
        time,
        source: "test".into(),
        origin: Origin::Event,
    };
    for step in steps {
        let was_destroyed = kek.state == KeyState::Destroyed;
        let apply = |e: &LifecycleEvent, kek: &mut KekStatus, log: &mut Vec<String>| {
            let effect = kek::apply_event(kek, e, now);
            let revoking = revokes(e, now);
            log.push(format!(
                "apply {} {} (exp {:?}) -> {:?}{}",
                e.event_id,
                e.kind,
                e.expires_at.map(|t| (t - now).num_seconds()),
                effect.outcome,
                if revoking { " [revoking]" } else { "" }
            ));
            if let Some(next) = effect.next {
                *kek = next;
            }
            revoking
        };
        match step {
            PureStep::Op {
                op,
                copies,
                skew_secs,
            } => {
                let Some(kind) = kms_op(&mut truth, *op, now) else {
                    continue;
                };
                seq += 1;
                let e = event(
                    seq,
                    kind,
                    truth.expires_at,
                    now + Duration::seconds(*skew_secs),
                );
                log.push(format!(
                    "kms {op:?} -> {} revoked {} exp {:?}; e{seq} x{}",
                    truth.state,
                    truth.revoked,
                    truth.expires_at.map(|t| (t - now).num_seconds()),
                    copies.count()
                ));
                for _ in 0..copies.count() {
                    pending.push(e.clone());
                }
            }
            PureStep::Deliver(pick) => {
                if pending.is_empty() {
                    continue;
                }
                let e = pending.remove(pick.index(pending.len()));
                if apply(&e, &mut kek, &mut log) {
                    revoked_since_observation = true;
                }
            }
            PureStep::Bogus {
                kind,
                expires_in_secs,
            } => {
                seq += 1;
                let kind = *kind.get(EventKind::ALL);
                let e = event(
                    seq,
                    kind,
                    expires_in_secs.map(|s| now + Duration::seconds(s)),
                    now,
                );
                if apply(&e, &mut kek, &mut log) {
                    revoked_since_observation = true;
                }
            }
            PureStep::Observe {
                newer,
                expired_state,
                denied,
            } => {
                let obs = observation(&truth, now, *expired_state, *denied);
                let effect = kek::apply_observation(&kek, &obs, *newer, now);
                log.push(format!(
                    "observe{} {:?} -> unconfirmed {:?}",
                    if *newer { " (newer claim)" } else { "" },
                    obs,
                    effect.unconfirmed
                ));
                if let Some(next) = effect.next {
                    kek = next;
                }
                if !newer {
                    revoked_since_observation = false;
                    // A claim settles with the observation.
                    if kek.claim.is_some() {
                        return Err(fail(&log, format!("claim {:?} survived", kek.claim)));
                    }
                    let expired = truth.expires_at.is_some_and(|at| at <= now);
                    let expected = access_of_kms(truth.state, truth.revoked, expired, provider);
                    let decision = kek::derive_access(&primary(&kek), now);
                    if decision.access != expected {
                        return Err(fail(
                            &log,
                            format!(
                                "after observing {truth:?}: access {:?} ({:?}), the KMS's state \
                                 means {expected}; record {kek:?}",
                                decision.access, decision.reason
                            ),
                        ));
                    }
                }
            }
            PureStep::Tick(secs) => {
                now += Duration::seconds(*secs);
                log.push(format!("tick {secs}s"));
            }
        }
        if revoked_since_observation && kek::usability(&kek, now) == Usability::Usable {
            return Err(fail(
                &log,
                format!("a revocation is in force, yet the key is usable: {kek:?}"),
            ));
        }
        if was_destroyed && kek.state != KeyState::Destroyed {
            return Err(fail(&log, format!("destroyed was undone: {kek:?}")));
        }
        if kek.state == KeyState::Destroyed && truth.state != KeyState::Destroyed {
            return Err(fail(
                &log,
                format!("destroyed without the KMS saying so: {kek:?}"),
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn kek_state_model(
        provider in prop_oneof![Just(Provider::Local), Just(Provider::Aws), Just(Provider::Azure)],
        initial_expiry in proptest::option::weighted(0.3, 1i64..7_200),
        steps in prop::collection::vec(pure_step(), 1..40),
    ) {
        run_pure(provider, initial_expiry, &steps)?;
    }
}
