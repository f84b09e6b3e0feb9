//! A TCP proxy for fault injection: forwards to a real service and can cut every live
//! connection or refuse new ones. RabbitMQ and PostgreSQL are shared by parallel tests, so
//! stopping them would disturb other tests; cutting this test's own connections is the
//! same fault as seen from the daemon.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let down = Arc::new(AtomicBool::new(false));
        let (cut, cut_rx) = watch::channel(0u64);
        let target = target.to_owned();
        let down_flag = down.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if down_flag.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(pipe(inbound, target.clone(), fresh(&cut_rx)));
            }
        });
        Proxy {
            addr,
            down,
            cut,
            task,
        }
    }

    /// Closes every live connection through the proxy.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// While down, new connections are accepted and closed at once; `set_down(true)` also
    /// cuts live ones.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.cut();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A receiver of `cut` that wakes only on cuts from now on. Taken before the connection's
/// task is spawned, so a cut between the accept and the task's start still reaches it.
pub(super) fn fresh(cut: &watch::Receiver<u64>) -> watch::Receiver<u64> {
    let mut cut = cut.clone();
    cut.mark_unchanged();
    cut
}

/// Forwards `inbound` to `target` (host:port) until either side closes or `cut` changes.
pub(super) async fn pipe(mut inbound: TcpStream, target: String, mut cut: watch::Receiver<u64>) {
    let Ok(mut outbound) = TcpStream::connect(&target).await else {
        return;
    };
    tokio::select! {
        _ = copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = cut.changed() => {}
    }
}
