//! The background runtime: one thread of its own for the audit trail's bulk work (the spool's
//! shipper and the chainer).
//!
//! Both work in batches of about a thousand rows: the shipper decodes them and encodes one
//! INSERT, the chainer decodes them and computes an HMAC per row. On the request runtime each
//! batch held one of its worker threads for a millisecond or more, and the requests queued
//! behind it waited as long (the cached unwrap's p99 was about 4 ms against 0.4 ms for the
//! bare HTTP stack). On a thread of their own, at the lowest priority, they still share the
//! machine's cores, but the kernel preempts them for a request worker instead of a request
//! waiting for a batch.
//!
//! The tasks' database pools are made on this runtime too ([`Background::run`]), so their
//! connections' I/O is driven here and not by the request workers.

use std::future::Future;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::task::AbortOnDropHandle;

/// The background thread and its runtime; dropping it stops the runtime (its tasks are
/// cancelled) and lets the thread end.
pub struct Background {
    handle: Handle,
    _stop: oneshot::Sender<()>,
}

impl Background {
    /// Starts the thread (`byokd-background`).
    ///
    /// # Errors
    ///
    /// The runtime or the thread cannot be made.
    pub fn start() -> std::io::Result<Background> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("byokd-bg-block")
            // The blocking threads it starts (the shipper reads the spool on them).
            .on_thread_start(lower_priority)
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("byokd-background".to_owned())
            .spawn(move || {
                lower_priority();
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Background {
            handle,
            _stop: stop,
        })
    }

    /// Runs `task` on the background thread. The returned future ends with it; dropping it
    /// aborts the task, and a panic in the task is resumed in the caller, so the daemon's
    /// supervisor sees both as it would for a task of its own runtime.
    pub fn run<F>(&self, task: F) -> impl Future<Output = F::Output> + Send + 'static
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        // Dropping the caller aborts the task (the supervisor aborts what still runs after
        // the grace period).
        let handle = AbortOnDropHandle::new(self.handle.spawn(task));
        async move {
            match handle.await {
                Ok(out) => out,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // Cancelled: the background runtime stopped, which happens only once the
                // daemon is shutting down and every task is being dropped anyway.
                Err(_) => std::future::pending().await,
            }
        }
    }
}

/// Lowers the calling thread's scheduling priority (its nice value; on Linux it is a
/// thread's own): when the cores are contended the kernel runs a request worker first.
/// Where it cannot be lowered the thread keeps the default priority.
fn lower_priority() {
    if let Err(e) = rustix::process::setpriority_process(None, NICE) {
        tracing::debug!(error = %e, "cannot lower the background thread's priority");
    }
}

/// The background threads' nice value, the lowest: a contended core goes to a nice-0 thread
/// about 70 times as often, and an idle one is theirs. Measured at full load (access bench):
/// nice 10 gave a p99 of 1.8-2.0 ms, nice 19 1.4-1.5 ms, while the spool's backlog stayed
/// under half a second. Under an overload that never leaves a core idle shipping falls
/// behind, and the spool's cap (`access.audit_spool_max_bytes`) then refuses attempts: fail
/// closed, as when the database is down.
const NICE: i32 = 19;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_on_its_own_thread_and_resumes_panics() {
        let bg = Background::start().expect("background thread");
        let name = bg
            .run(async { std::thread::current().name().map(str::to_owned) })
            .await;
        assert_eq!(name.as_deref(), Some("byokd-background"));
        let panicked = tokio::spawn(bg.run(async { panic!("boom") })).await;
        assert!(panicked.expect_err("the task panicked").is_panic());
    }

    #[tokio::test]
    async fn dropping_the_caller_aborts_the_task() {
        let bg = Background::start().expect("background thread");
        let (tx, rx) = oneshot::channel::<()>();
        let caller = tokio::spawn(bg.run(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        }));
        caller.abort();
        // The sender is dropped with the aborted task: the receiver sees it closed.
        assert!(rx.await.is_err());
    }
}
