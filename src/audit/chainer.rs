//! The chainer: the daemon task that gives unchained audit rows their place and chain value,
//! on one replica at a time, and records checkpoints of the head.
//!
//! Every replica keeps a connection of its own (a [`Seat`]) and asks each round for the
//! chain's advisory lock on it; the one that holds it chains, in batches, on that same
//! connection. When the leader dies its session ends, the lock is free, and another replica
//! takes over at its next round; rows meanwhile just wait, unchained.

use super::chain::ChainKey;
use crate::config::AuditSettings;
use crate::store::{AuditChainConn, AuditCheckpoint, ChainHead, Store, StoreError};
use chrono::{DateTime, Utc};
use std::time::Duration;
use tokio::sync::watch;

/// Chains the audit trail (see the module docs).
pub struct Chainer {
    store: Store,
    key: ChainKey,
    settings: AuditSettings,
}

/// A replica's connection for chaining, and what it knows while it leads.
pub struct Seat {
    conn: AuditChainConn,
    leading: bool,
    last_checkpoint: Option<AuditCheckpoint>,
}

impl Seat {
    /// Lets the lead go (if held) and closes the connection.
    pub async fn close(self) {
        self.conn.close().await;
    }
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// Whether this replica leads (only the leader chains).
    pub leading: bool,
    /// Rows chained.
    pub chained: usize,
    /// The checkpoint recorded, if one was due.
    pub checkpoint: Option<AuditCheckpoint>,
}

impl Chainer {
    /// A chainer writing through `store` (a small pool of its own: a leader keeps one
    /// connection for as long as it leads).
    pub fn new(store: Store, key: ChainKey, settings: AuditSettings) -> Chainer {
        Chainer {
            store,
            key,
            settings,
        }
    }

    /// A connection to chain on, not yet leading.
    ///
    /// # Errors
    ///
    /// The database cannot be reached.
    pub async fn seat(&self) -> Result<Seat, StoreError> {
        Ok(Seat {
            conn: self.store.audit_chain_conn().await?,
            leading: false,
            last_checkpoint: None,
        })
    }

    /// Takes the lead if it is free, then, leading, chains one batch and records a
    /// checkpoint of the head if one is due at `now`.
    ///
    /// # Errors
    ///
    /// Database failures; the seat should then be closed (its lock may be gone with its
    /// session).
    pub async fn round(&self, seat: &mut Seat, now: DateTime<Utc>) -> Result<Round, StoreError> {
        if !seat.leading {
            if !seat.conn.try_lead().await? {
                return Ok(Round::default());
            }
            seat.leading = true;
            seat.last_checkpoint = seat.conn.latest_checkpoint().await?;
            tracing::info!("this replica now chains the audit trail");
        }
        let key = &self.key;
        let (head, chained) = seat
            .conn
            .chain_batch(self.settings.batch_size, |head, rows| {
                key.link_rows(head, rows)
            })
            .await?;
        let mut checkpoint = None;
        if let Some(head) = head.filter(|h| self.checkpoint_due(seat, h, now)) {
            checkpoint = seat.conn.record_checkpoint(&head).await?;
            if let Some(cp) = &checkpoint {
                // The log is the checkpoint's copy outside the database: a tail deleted
                // together with its checkpoints is still caught against it.
                tracing::info!(chain_seq = cp.chain_seq, chain = %cp.chain, "audit checkpoint");
                seat.last_checkpoint = checkpoint.clone();
            }
        }
        Ok(Round {
            leading: true,
            chained,
            checkpoint,
        })
    }

    /// Due when the head moved past the last checkpoint and the interval has passed since.
    fn checkpoint_due(&self, seat: &Seat, head: &ChainHead, now: DateTime<Utc>) -> bool {
        let interval = chrono::Duration::seconds(
            i64::try_from(self.settings.checkpoint_interval_secs).unwrap_or(i64::MAX),
        );
        seat.last_checkpoint
            .as_ref()
            .is_none_or(|cp| head.chain_seq > cp.chain_seq && now - cp.at >= interval)
    }
}

/// Chains until `stop` turns true: at once while batches come back full, every
/// `chain_interval_ms` otherwise; a failure closes the seat and retries with backoff.
pub async fn chain_loop(chainer: Chainer, mut stop: watch::Receiver<bool>) {
    let idle = Duration::from_millis(chainer.settings.chain_interval_ms);
    let mut seat: Option<Seat> = None;
    let mut failures: u32 = 0;
    while !*stop.borrow() {
        let result = match seat.as_mut() {
            Some(s) => chainer.round(s, Utc::now()).await,
            None => match chainer.seat().await {
                Ok(mut s) => {
                    let r = chainer.round(&mut s, Utc::now()).await;
                    seat = Some(s);
                    r
                }
                Err(e) => Err(e),
            },
        };
        let wait = match result {
            Ok(round) => {
                failures = 0;
                if round.chained as i64 >= chainer.settings.batch_size {
                    Duration::ZERO
                } else {
                    idle
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, "audit chaining failed; reconnecting and retrying");
                if let Some(s) = seat.take() {
                    s.close().await;
                }
                idle.saturating_mul(2u32.saturating_pow(failures.min(5)))
                    .min(Duration::from_secs(30))
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
    }
    if let Some(s) = seat {
        s.close().await;
    }
}
