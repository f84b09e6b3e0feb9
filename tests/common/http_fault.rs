//! An HTTP fault injector for answers the real OpenBao cannot produce: a misrouted reverse
//! proxy's HTML 404, an empty 403, a load balancer's 503, a captive portal's 200 page, a
//! server that never answers. It is a real TCP server, so the classification of such answers
//! is tested through reqwest exactly as byokd receives them; it can also stand in front of
//! OpenBao as a route that works until it breaks.

use super::proxy::{fresh, pipe};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the responder does with each new connection.
#[derive(Clone)]
enum Mode {
    /// Passes it on to this address (host:port).
    Forward(String),
    /// Reads the request, writes this response and closes the connection.
    Answer(Arc<Vec<u8>>),
    /// Reads the request and never answers.
    Silent,
}

pub struct Responder {
    pub addr: SocketAddr,
    target: Option<String>,
    mode: Arc<Mutex<Mode>>,
    connections: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    cut: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Responder {
    /// Answers every request with `status` (e.g. `404 Not Found`), `content_type` and `body`.
    pub async fn start(status: &str, content_type: Option<&str>, body: &str) -> Responder {
        Responder::serve(Mode::Answer(response(status, content_type, body)), None).await
    }

    /// Accepts connections, reads the requests and never answers.
    pub async fn silent() -> Responder {
        Responder::serve(Mode::Silent, None).await
    }

    /// Forwards every connection to `target` (host:port) until told to [`Responder::answer`]:
    /// a route in front of OpenBao that can break.
    pub async fn forwarding(target: &str) -> Responder {
        Responder::serve(Mode::Forward(target.to_owned()), Some(target.to_owned())).await
    }

    async fn serve(mode: Mode, target: Option<String>) -> Responder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mode = Arc::new(Mutex::new(mode));
        let connections = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let (cut, cut_rx) = watch::channel(0u64);
        let (current, accepted, count) = (mode.clone(), connections.clone(), answered.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let mode = current.lock().expect("lock").clone();
                match mode {
                    Mode::Forward(target) => {
                        tokio::spawn(pipe(stream, target, fresh(&cut_rx)));
                    }
                    Mode::Answer(response) => {
                        tokio::spawn(answer(stream, Some(response), count.clone()));
                    }
                    Mode::Silent => {
                        tokio::spawn(answer(stream, None, count.clone()));
                    }
                }
            }
        });
        Responder {
            addr,
            target,
            mode,
            connections,
            answered,
            cut,
            task,
        }
    }

    /// Every request from now on gets `status`, `content_type` and `body`. Live forwarded
    /// connections are cut, so a pooled keep-alive connection cannot keep reaching the target.
    pub fn answer(&self, status: &str, content_type: Option<&str>, body: &str) {
        self.switch(Mode::Answer(response(status, content_type, body)));
    }

    /// Every connection from now on reaches the target of [`Responder::forwarding`] again.
    pub fn forward(&self) {
        let target = self.target.clone().expect("a forwarding responder");
        self.switch(Mode::Forward(target));
    }

    fn switch(&self, mode: Mode) {
        *self.mode.lock().expect("lock") = mode;
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far, however they were handled.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Canned responses written so far.
    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A complete HTTP/1.1 response that closes the connection.
fn response(status: &str, content_type: Option<&str>, body: &str) -> Arc<Vec<u8>> {
    let content_type = content_type
        .map(|t| format!("Content-Type: {t}\r\n"))
        .unwrap_or_default();
    let response = format!(
        "HTTP/1.1 {status}\r\n{content_type}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    Arc::new(response.into_bytes())
}

/// Reads one request and writes `response`, counting it in `answered`; without a response,
/// holds the connection open until the client gives up.
async fn answer(mut stream: TcpStream, response: Option<Arc<Vec<u8>>>, answered: Arc<AtomicUsize>) {
    if !read_request(&mut stream).await {
        return;
    }
    match response {
        Some(response) => {
            let _ = stream.write_all(&response).await;
            answered.fetch_add(1, Ordering::SeqCst);
            let _ = stream.shutdown().await;
        }
        None => {
            let _ = stream.read(&mut [0u8; 1024]).await;
        }
    }
}

/// Reads one HTTP request (head and `Content-Length` body); false if the peer went away.
async fn read_request(stream: &mut TcpStream) -> bool {
    let mut request = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => request.extend_from_slice(&chunk[..n]),
        }
        let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if request.len() >= end + 4 + length {
            return true;
        }
    }
}
