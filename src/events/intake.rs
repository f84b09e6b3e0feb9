//! The path every lifecycle event takes into the database, whatever carried it: the AMQP
//! consumer ([`super::amqp`]) and, on a node without a broker, `POST /v1/events` (which
//! `byokd publish` and `byokd kms local` use there).
//!
//! [`in_time`] refuses events dated too far ahead of byokd's clock (after [`normalize`]
//! turned the message into events); [`apply`] applies them in one transaction
//! ([`lifecycle::apply_batch`]: `(provider, source, id)` deduplication, the key record, the
//! derived access, audit and outbox), counts their outcomes, and wakes the loops that have
//! work from the commit: the access relay, the re-wrap workers and the confirmation of
//! events at their KMS. Both carriers acknowledge an event only after [`apply`] returned
//! `Ok`: the AMQP consumer acks the delivery, the HTTP API answers 202.
//!
//! [`normalize`]: super::normalize::normalize

use crate::domain::LifecycleEvent;
use crate::events::normalize::{NormalizeError, check_times};
use crate::lifecycle::{self, BatchResult};
use crate::store::{Store, StoreError};
use crate::telemetry::EVENTS;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::Notify;

/// How many times in a row a batch is applied again after losing a race (each loss means
/// another transaction committed one of its events, so a retry finds more duplicates).
const RACE_RETRIES: u32 = 3;

/// The loops a commit may have given work to.
#[derive(Clone, Debug, Default)]
pub struct Wakers {
    /// Woken after a commit that changed a tenant's access (an access message waits in the
    /// outbox).
    pub access_changed: Arc<Notify>,
    /// Woken after a commit that created or resumed a re-wrap job.
    pub rewrap_work: Arc<Notify>,
    /// Woken after a commit that asked for keys to be confirmed at their KMS.
    pub confirm_work: Arc<Notify>,
}

/// `events`, unless one of them lies more than `max_skew` ahead of byokd's clock.
///
/// # Errors
///
/// [`NormalizeError::FromTheFuture`] naming the first such event.
pub fn in_time(
    events: Vec<LifecycleEvent>,
    max_skew: chrono::Duration,
) -> Result<Vec<LifecycleEvent>, NormalizeError> {
    check_times(&events, chrono::Utc::now(), max_skew)?;
    Ok(events)
}

/// Applies `events` in one transaction, then counts their outcomes and wakes the loops with
/// work from the commit. Duplicates (an event already applied, from either carrier) are
/// counted as such and change nothing.
///
/// # Errors
///
/// A [`StoreError`]; when [`StoreError::is_transient`], nothing was written and the same
/// events can be applied again.
pub async fn apply(
    store: &Store,
    events: &[LifecycleEvent],
    wake: &Wakers,
) -> Result<BatchResult, StoreError> {
    // A batch that lost a race with another applying a copy of one of its events is run
    // again at once: it then finds that event applied and calls it a duplicate.
    let mut raced = 0;
    let result = loop {
        match lifecycle::apply_batch(store, events, chrono::Utc::now()).await {
            Err(StoreError::Raced(why)) if raced < RACE_RETRIES => {
                raced += 1;
                tracing::debug!(%why, raced, "applying the batch again");
            }
            other => break BatchResult { raced, ..other? },
        }
    };
    record(events, &result, wake);
    Ok(result)
}

/// Counts outcomes and wakes whoever has work from the commit, so the platform hears of an
/// access change now rather than at the next poll.
fn record(events: &[LifecycleEvent], result: &BatchResult, wake: &Wakers) {
    // Tallied first: a batch holds a handful of (kind, outcome) pairs, and a registry
    // lookup per event was a measurable share of intake's own work.
    let mut tally: BTreeMap<(&'static str, &'static str), u64> = BTreeMap::new();
    for (event, outcome) in events.iter().zip(&result.outcomes) {
        *tally
            .entry((event.kind.as_str(), outcome.as_str()))
            .or_default() += 1;
    }
    for ((kind, outcome), n) in tally {
        metrics::counter!(EVENTS, "kind" => kind, "outcome" => outcome).increment(n);
    }
    if result.access_changed {
        wake.access_changed.notify_one();
    }
    if result.rewrap_work {
        wake.rewrap_work.notify_one();
    }
    if result.confirm_work {
        wake.confirm_work.notify_one();
    }
}
