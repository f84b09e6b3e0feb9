//! The audit writer of key access: attempts arrive from many requests at once and are
//! written in group commits (whatever queued while the previous write ran, up to
//! `access.audit_batch` rows per transaction), and each request learns whether its rows
//! are committed before it answers. A request whose rows could not be written is refused:
//! the trail fails closed.

use crate::store::{AuditRow, Store, StoreError};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

type Ack = oneshot::Sender<Result<(), Arc<StoreError>>>;

/// Queues audit rows for the writer task; cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditWriter {
    tx: mpsc::Sender<(Vec<AuditRow>, Ack)>,
}

/// Why rows were not recorded.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The database refused or failed the write.
    #[error("audit write failed: {0}")]
    Store(Arc<StoreError>),
    /// The writer is gone (shutting down).
    #[error("the audit writer is stopped")]
    Stopped,
}

impl AuditWriter {
    /// Starts the writer task on `store`; it ends when every [`AuditWriter`] is dropped.
    pub fn start(store: Store, batch: usize) -> AuditWriter {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(write_loop(store, rx, batch.max(1)));
        AuditWriter { tx }
    }

    /// Records `rows`, returning once they are committed.
    ///
    /// # Errors
    ///
    /// The rows were not written; the caller must not serve the attempt.
    pub async fn record(&self, rows: Vec<AuditRow>) -> Result<(), AuditError> {
        if rows.is_empty() {
            return Ok(());
        }
        let (ack, done) = oneshot::channel();
        self.tx
            .send((rows, ack))
            .await
            .map_err(|_| AuditError::Stopped)?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AuditError::Store(e)),
            Err(_) => Err(AuditError::Stopped),
        }
    }
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
