//! An HTTP fault injector for answers the real OpenBao cannot produce: a misrouted reverse
//! proxy's HTML 404, an empty 403, a load balancer's 503, a captive portal's 200 page, a
//! server that never answers, an error page that never ends. It is a real TCP server, so the classification of such answers
//! is tested through reqwest exactly as byokd receives them; it can also stand in front of
//! OpenBao as a route that works until it breaks.

use super::proxy::{fresh, pipe};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
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
    /// Reads the request, writes this response head and then a chunked body that goes on
    /// until the client hangs up ([`ENDLESS_CAP`] bytes or [`ENDLESS_FOR`] at most, so a
    /// test that goes wrong still ends).
    Endless(Arc<Vec<u8>>),
}

/// Most body bytes an endless answer writes.
pub const ENDLESS_CAP: usize = 1 << 30;
/// Longest an endless answer goes on.
const ENDLESS_FOR: Duration = Duration::from_secs(60);

pub struct Responder {
    pub addr: SocketAddr,
    target: Option<String>,
    mode: Arc<Mutex<Mode>>,
    connections: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    streamed: Arc<AtomicUsize>,
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

    /// Answers every request with `status` and a body of `x`s that never ends; [`answered`]
    /// counts the answers that ended (the client hung up), [`streamed`] their body bytes.
    ///
    /// [`answered`]: Responder::answered
    /// [`streamed`]: Responder::streamed
    pub async fn endless(status: &str) -> Responder {
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        Responder::serve(Mode::Endless(Arc::new(head.into_bytes())), None).await
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
        let streamed = Arc::new(AtomicUsize::new(0));
        let (cut, cut_rx) = watch::channel(0u64);
        let (current, accepted, count) = (mode.clone(), connections.clone(), answered.clone());
        let bytes = streamed.clone();
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
                    Mode::Endless(head) => {
                        tokio::spawn(endless(stream, head, count.clone(), bytes.clone()));
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
            streamed,
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

    /// Body bytes written by endless answers so far.
    pub fn streamed(&self) -> usize {
        self.streamed.load(Ordering::SeqCst)
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

/// Reads one request, writes `head` and body chunks until the client hangs up or a bound is
/// reached, then counts the answer in `answered`.
async fn endless(
    mut stream: TcpStream,
    head: Arc<Vec<u8>>,
    answered: Arc<AtomicUsize>,
    streamed: Arc<AtomicUsize>,
) {
    if !read_request(&mut stream).await || stream.write_all(&head).await.is_err() {
        return;
    }
    const CHUNK: usize = 64 * 1024;
    let mut chunk = format!("{CHUNK:x}\r\n").into_bytes();
    chunk.extend(std::iter::repeat_n(b'x', CHUNK));
    chunk.extend_from_slice(b"\r\n");
    let deadline = tokio::time::Instant::now() + ENDLESS_FOR;
    let mut sent = 0;
    while sent < ENDLESS_CAP {
        match tokio::time::timeout_at(deadline, stream.write_all(&chunk)).await {
            Ok(Ok(())) => {}
            _ => break,
        }
        sent += CHUNK;
        streamed.fetch_add(CHUNK, Ordering::SeqCst);
    }
    answered.fetch_add(1, Ordering::SeqCst);
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
