//! The audit writer of key access: attempts arrive from many requests at once, and each
//! request learns whether its rows are recorded before it answers. A request whose rows
//! could not be recorded is refused: the trail fails closed.
//!
//! Two modes (`access.audit_mode`):
//! - `spool` (the default): the rows are appended to this replica's local spool, one write
//!   per group of requests, and shipped to `audit_log` in large batches within about a
//!   second ([`super::spool`]). The answer does not wait for a database commit.
//! - `commit`: the rows are written in group commits (whatever queued while the previous
//!   write ran, up to `access.audit_batch` rows per transaction) and the answer waits for
//!   the commit.

use super::spool::{RecordError, Spool};
use crate::store::{AuditRow, SpooledAudit, Store, StoreError};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

type Ack = oneshot::Sender<Result<(), Arc<StoreError>>>;

/// Records audit rows; cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditWriter {
    mode: Mode,
}

#[derive(Debug, Clone)]
enum Mode {
    Commit(mpsc::Sender<(Vec<AuditRow>, Ack)>),
    Spool(Spool),
}

/// Why rows were not recorded.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The database refused or failed the write.
    #[error("audit write failed: {0}")]
    Store(Arc<StoreError>),
    /// The spool could not be written, or holds too much not yet shipped.
    #[error(transparent)]
    Spool(#[from] RecordError),
    /// The writer is gone (shutting down).
    #[error("the audit writer is stopped")]
    Stopped,
}

impl AuditWriter {
    /// Starts the group-commit writer task on `store` (`commit` mode); it ends when every
    /// [`AuditWriter`] is dropped.
    pub fn start(store: Store, batch: usize) -> AuditWriter {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(write_loop(store, rx, batch.max(1)));
        AuditWriter {
            mode: Mode::Commit(tx),
        }
    }

    /// A writer appending to `spool` (`spool` mode); [`super::spool::ship_loop`] ships it.
    pub fn spooled(spool: Spool) -> AuditWriter {
        AuditWriter {
            mode: Mode::Spool(spool),
        }
    }

    /// Why attempts are refused now whatever they are (the spool's backlog is over its
    /// cap), for `/readyz`.
    pub fn refusing(&self) -> Option<String> {
        match &self.mode {
            Mode::Spool(spool) => spool.refusing(),
            Mode::Commit(_) => None,
        }
    }

    /// Records `rows`, returning once they are committed (`commit`) or spooled (`spool`).
    ///
    /// # Errors
    ///
    /// The rows were not recorded; the caller must not serve the attempt.
    pub async fn record(&self, rows: Vec<AuditRow>) -> Result<(), AuditError> {
        if rows.is_empty() {
            return Ok(());
        }
        let tx = match &self.mode {
            Mode::Spool(spool) => {
                let at = chrono::Utc::now();
                let rows = rows
                    .into_iter()
                    .map(|row| SpooledAudit {
                        // Time-ordered ids keep the trail's unique index appending.
                        attempt_id: uuid::Uuid::now_v7(),
                        at,
                        row: storable(row),
                    })
                    .collect();
                return Ok(spool.record(rows).await?);
            }
            Mode::Commit(tx) => tx,
        };
        let (ack, done) = oneshot::channel();
        tx.send((rows, ack))
            .await
            .map_err(|_| AuditError::Stopped)?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AuditError::Store(e)),
            Err(_) => Err(AuditError::Stopped),
        }
    }
}

/// `row` with every NUL character replaced (U+FFFD): PostgreSQL's text and jsonb cannot
/// hold one, and a spooled row the database refuses would stop the shipper for good. In
/// commit mode such a row fails its own group; spooled, it is answered before it meets the
/// database, so it must be one the database takes. (A request path can carry `%00`.)
fn storable(mut row: AuditRow) -> AuditRow {
    fn clean(s: &mut String) {
        if s.contains('\0') {
            *s = s.replace('\0', "\u{FFFD}");
        }
    }
    fn clean_json(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) => clean(s),
            serde_json::Value::Array(items) => items.iter_mut().for_each(clean_json),
            serde_json::Value::Object(map) => {
                if map.keys().any(|k| k.contains('\0')) {
                    *map = std::mem::take(map)
                        .into_iter()
                        .map(|(k, v)| (k.replace('\0', "\u{FFFD}"), v))
                        .collect();
                }
                map.values_mut().for_each(clean_json);
            }
            _ => {}
        }
    }
    for s in [&mut row.action, &mut row.outcome, &mut row.source] {
        clean(s);
    }
    for s in [&mut row.tenant_id, &mut row.key_ref, &mut row.event_id]
        .into_iter()
        .flatten()
    {
        clean(s);
    }
    clean_json(&mut row.detail);
    row
}

async fn write_loop(store: Store, mut rx: mpsc::Receiver<(Vec<AuditRow>, Ack)>, batch: usize) {
    while let Some(first) = rx.recv().await {
        let mut rows = first.0;
        let mut acks = vec![first.1];
        // Whatever queued while the last write ran goes into this one.
        while rows.len() < batch {
            match rx.try_recv() {
                Ok((more, ack)) => {
                    rows.extend(more);
                    acks.push(ack);
                }
                Err(_) => break,
            }
        }
        let result = store.append_audit(&rows).await.map_err(Arc::new);
        if let Err(e) = &result {
            tracing::error!(error = %e, rows = rows.len(),
                "could not write access attempts to the audit trail; they are refused");
            metrics::counter!(crate::telemetry::AUDIT_WRITE_FAILURES).increment(1);
        }
        metrics::counter!(crate::telemetry::ACCESS_ATTEMPTS_AUDITED).increment(rows.len() as u64);
        for ack in acks {
            let _ = ack.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_characters_are_replaced_before_a_row_is_spooled() {
        let row = storable(AuditRow::operation(
            Some("a\0b"),
            "dek_unwrap",
            "api",
            json!({ "reason": "tenant \"a\0b\"", "k\0": ["x\0"] }),
        ));
        assert_eq!(row.tenant_id.as_deref(), Some("a\u{FFFD}b"));
        assert!(
            !row.detail.to_string().contains("\\u0000"),
            "{}",
            row.detail
        );
        assert_eq!(row.detail["k\u{FFFD}"][0], "x\u{FFFD}");
    }
}
