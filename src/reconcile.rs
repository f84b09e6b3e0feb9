//! Observing keys at their KMS: the one place that asks a KMS what a key is and turns the
//! answer into an [`Answer`], and the confirmation loop that does so after every event.
//!
//! An observation is the key's metadata plus, where metadata cannot tell (a revoked grant or
//! policy leaves the key enabled: every KMS but byokd's own keyring), a test wrap and unwrap
//! of a throwaway DEK bound to a throwaway context. Each provider classifies its own errors ([`KmsError`]); here a
//! definitive error becomes a fact about the key, and anything else ([`KmsError::is_transient`],
//! or an answer that makes no sense) is indeterminate: it never revokes and never destroys.
//!
//! Confirmations run in their own loop ([`confirm_loop`] around [`Confirmer::run_once`]),
//! never in the consumer's path: the consumer only marks keys due, and this loop leases due
//! keys (one replica per key), asks their KMS concurrently, and applies the answers through
//! [`lifecycle::apply_observations`].

pub use crate::config::StateSettings;
use crate::domain::{KeyState, Observation};
use crate::kms::{Kms, KmsError, KmsProvider, round_trip};
use crate::lifecycle::{self, Answer, ObservedReport, Unanswered};
use crate::store::{ObserveTarget, Store, StoreError};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// Asks `target`'s KMS about the key, within `timeout`.
pub async fn observe(kms: &Kms, target: &ObserveTarget, timeout: Duration) -> Answer {
    let provider = match kms.provider(target.provider) {
        Ok(p) => p,
        Err(_) => return Answer::NotConfigured,
    };
    match tokio::time::timeout(timeout, observe_with(provider, &target.key_ref)).await {
        Ok(Answer::Known(mut o)) => {
            // Where expiry is byokd's own record, a KMS that reports none says nothing.
            if !target.provider.kms_holds_expiry() {
                o.expires_at = None;
            }
            Answer::Known(o)
        }
        Ok(answer) => answer,
        Err(_) => Answer::Indeterminate(format!("no answer within {timeout:?}")),
    }
}

/// Classifies a definitive error about the key; `None` for anything that says nothing.
fn definitive(e: &KmsError) -> Option<Observation> {
    let known = |state: Option<KeyState>, revoked| {
        Some(Observation {
            state,
            revoked,
            version: None,
            expires_at: None,
            versions: None,
        })
    };
    match e {
        KmsError::NotFound { .. } => known(Some(KeyState::Destroyed), false),
        KmsError::AccessDenied { .. } => known(None, true),
        KmsError::Unusable { state, .. } if *state != KeyState::Expired => {
            known(Some(*state), false)
        }
        _ => None,
    }
}

async fn observe_with<P: KmsProvider>(kms: &P, key_ref: &str) -> Answer {
    let info = match kms.describe(key_ref).await {
        Ok(info) => info,
        Err(e) => {
            return match definitive(&e) {
                Some(o) => Answer::Known(o),
                None => Answer::Indeterminate(e.to_string()),
            };
        }
    };
    // Where versions have their own state, the ones still holding DEKs matter as well (the
    // lifecycle keeps those); without them the answer is not the whole truth about the key.
    let versions = match kms.version_states(key_ref).await {
        Ok(v) => v,
        Err(e) if e.is_transient() => {
            return Answer::Indeterminate(format!("listing key versions failed: {e}"));
        }
        Err(e) => {
            return match definitive(&e) {
                Some(o) => Answer::Known(o),
                None => Answer::Indeterminate(format!("listing key versions failed: {e}")),
            };
        }
    };
    let mut observed = Observation {
        state: Some(info.state),
        revoked: false,
        version: Some(info.current_version.clone()),
        expires_at: Some(info.expires_at),
        versions,
    };
    if info.state != KeyState::Enabled || kms.describe_is_complete() {
        // Refuses wrapping already (expired keys still unwrap: expiry is computed from the
        // date the KMS reports).
        return Answer::Known(observed);
    }
    // Metadata says usable; only a real wrap and unwrap shows byokd may still use it.
    match round_trip(kms, key_ref).await {
        Ok(()) => Answer::Known(observed),
        Err(e) => match definitive(&e) {
            Some(refused) => {
                observed.revoked = refused.revoked;
                if let Some(state) = refused.state {
                    observed.state = Some(state);
                }
                Answer::Known(observed)
            }
            None => Answer::Indeterminate(format!("test wrap/unwrap failed: {e}")),
        },
    }
}

/// Observes `targets`, `concurrency` at a time.
pub async fn observe_all(
    kms: &Kms,
    targets: Vec<ObserveTarget>,
    timeout: Duration,
    concurrency: usize,
) -> Vec<(ObserveTarget, Answer)> {
    futures_util::stream::iter(targets)
        .map(|target| async move {
            let answer = observe(kms, &target, timeout).await;
            (target, answer)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await
}

/// Works due confirmations.
#[derive(Clone)]
pub struct Confirmer {
    store: Store,
    kms: Kms,
    settings: StateSettings,
    /// Woken by the consumer when it marked keys due.
    pub wake: Arc<Notify>,
    access_changed: Arc<Notify>,
    rewrap_work: Arc<Notify>,
}

impl Confirmer {
    /// A confirmer over `store` and `kms`; wakes the access relay and re-wrap workers when
    /// an answer changed access or started work.
    pub fn new(
        store: Store,
        kms: Kms,
        settings: StateSettings,
        wake: Arc<Notify>,
        access_changed: Arc<Notify>,
        rewrap_work: Arc<Notify>,
    ) -> Confirmer {
        Confirmer {
            store,
            kms,
            settings,
            wake,
            access_changed,
            rewrap_work,
        }
    }

    /// Leases due keys, asks their KMS, applies the answers. Returns what changed, and how
    /// many keys were asked (0: nothing was due).
    ///
    /// # Errors
    ///
    /// A [`StoreError`]; leased keys become due again when their lease ends.
    pub async fn run_once(
        &self,
        now: DateTime<Utc>,
    ) -> Result<(usize, ObservedReport), StoreError> {
        let timeout = Duration::from_secs(self.settings.observe_timeout_secs.max(1));
        let lease = now + chrono::Duration::from_std(timeout * 3).unwrap_or_default();
        let targets = self
            .store
            .claim_confirmations(now, lease, self.settings.batch)
            .await?;
        if targets.is_empty() {
            return Ok((0, ObservedReport::default()));
        }
        let asked = targets.len();
        let attempts = targets.iter().map(|t| t.attempts).max().unwrap_or(0);
        let answers = observe_all(&self.kms, targets, timeout, self.settings.concurrency).await;
        let retry = backoff(attempts, self.settings.retry_max_secs);
        let report = lifecycle::apply_observations(
            &self.store,
            &answers,
            "confirm",
            Unanswered::RetryAt(Utc::now() + retry),
            Utc::now(),
        )
        .await?;
        if report.access_changed > 0 {
            self.access_changed.notify_one();
        }
        if report.rewrap_work > 0 {
            self.rewrap_work.notify_one();
        }
        Ok((asked, report))
    }
}

/// Exponential from 1 s, capped.
fn backoff(attempts: i32, max_secs: u64) -> chrono::Duration {
    let secs = 1u64
        .checked_shl(u32::try_from(attempts.clamp(0, 20)).unwrap_or(20))
        .unwrap_or(u64::MAX)
        .min(max_secs.max(1));
    chrono::Duration::seconds(i64::try_from(secs).unwrap_or(60))
}

/// Runs confirmations until shutdown: at once when woken, otherwise every `poll_ms` (a
/// revocation's settle time, a retry, another replica's marks). After a round that asked the
/// KMS, the next waits `round_gap_ms`: a backlog keeps making keys due again, and the
/// consumer shares the database.
pub async fn confirm_loop(confirmer: Confirmer, mut shutdown: watch::Receiver<bool>) {
    let poll = Duration::from_millis(confirmer.settings.poll_ms.max(10));
    let gap = Duration::from_millis(confirmer.settings.round_gap_ms);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let busy = match confirmer.run_once(Utc::now()).await {
            Ok((asked, _)) => asked > 0,
            Err(e) => {
                tracing::warn!(error = %e, "confirmation round failed; retrying");
                false
            }
        };
        if busy {
            tokio::select! {
                _ = tokio::time::sleep(gap) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        tokio::select! {
            _ = confirmer.wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
            _ = shutdown.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Provider;

    #[test]
    fn definitive_errors_are_facts_and_the_rest_says_nothing() {
        let p = Provider::Vault;
        let gone = KmsError::NotFound {
            provider: p,
            key_ref: "k".into(),
        };
        assert_eq!(
            definitive(&gone).and_then(|o| o.state),
            Some(KeyState::Destroyed)
        );
        let denied = KmsError::AccessDenied {
            provider: p,
            key_ref: "k".into(),
            detail: "permission denied".into(),
        };
        assert!(definitive(&denied).is_some_and(|o| o.revoked && o.state.is_none()));
        for nothing in [
            KmsError::Unreachable {
                provider: p,
                detail: "HTTP 503".into(),
            },
            KmsError::Integrity,
            KmsError::NotConfigured(p),
        ] {
            assert_eq!(definitive(&nothing), None, "{nothing}");
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(0, 60).num_seconds(), 1);
        assert_eq!(backoff(3, 60).num_seconds(), 8);
        assert_eq!(backoff(30, 60).num_seconds(), 60);
    }
}
