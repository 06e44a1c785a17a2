//! The HTTP endpoint: Prometheus metrics and health probes.
//!
//! `/healthz` is liveness (the runtime answers), `/readyz` is readiness (every listener
//! is bound and echod is not draining — it fails *first* on a stop, so load balancers
//! move traffic away before connections are drained).
//!
//! A liveness probe that fails gets a healthy daemon restarted, so the endpoint is built
//! to keep answering while someone attacks it: every connection is bounded in time (2 s
//! to send a request head, also between keep-alive requests; 5 s for a response to
//! drain; 10 s in all), one source address may hold only a few of the connection slots,
//! a full table makes room by evicting the oldest connection that has not sent a request
//! yet, and a connection that cannot be served is closed at once rather than left in
//! the accept queue: a fast failure beats a hang.
//!
//! With a web configuration file ([`super::web_config`]) the endpoint speaks TLS (the
//! handshake gets the same 2 s as a request head) and asks for basic auth on every
//! path except `/healthz` and `/readyz`: probes from a kubelet or a load balancer
//! carry no credentials, and what they learn (alive, ready) is no secret; with TLS on,
//! they too must use TLS.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::IntGauge;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::accept::{Acceptor, Loan};
use super::limits::canonical_ip;
use super::logging::RateLimitedLog;
use super::metrics::{Metrics, REVISION, VERSION};
use super::reasons::AcceptErrorKind;
use super::web_config::WebEndpoint;

static ACCEPT_ERROR_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(5));
static REFUSED_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(5));
static HANDSHAKE_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(5));

/// HTTP connections served at once; scrapes and probes are few.
const MAX_CONNECTIONS: usize = 64;
/// Connections one source address may hold, so one address cannot take the shared cap
/// (a kubelet or Prometheus needs one or two).
const MAX_CONNECTIONS_PER_IP: usize = 8;
/// A client must send each request head within this time, the first one and each one
/// after a keep-alive pause (hyper restarts the timer for every request).
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// A response whose bytes the client does not take for this long closes the connection
/// (with a reset, so the kernel frees the unsent data at once).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection lives at most this long; then it finishes its response and closes.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(10);
/// Bytes of requests hyper buffers per connection (pipelined requests wait here).
const MAX_BUF_SIZE: usize = 16 * 1024;
/// The kernel send buffer of an HTTP connection (Linux doubles it): a few scrapes.
const SEND_BUFFER_SIZE: usize = 64 * 1024;
/// How long open requests may finish when the endpoint stops.
const STOP_GRACE: Duration = Duration::from_secs(1);
/// A TLS client must finish its handshake within this time (then the request head has
/// `HEADER_TIMEOUT` of its own).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// The first byte of a TLS handshake record; anything else on a TLS endpoint is a
/// plain-HTTP client, told so in plain HTTP (as Go's servers do).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// The answer to plain HTTP sent to the TLS endpoint.
const PLAIN_HTTP_TO_TLS: &[u8] = b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n";

/// Readiness, stored once: in the `echod_ready` and `echod_draining` gauges that
/// Prometheus scrapes, so `/readyz` and the metrics can never disagree.
pub(crate) struct Health {
    ready: IntGauge,
    draining: IntGauge,
}

impl Health {
    pub(crate) fn new(metrics: &Metrics) -> Self {
        Self {
            ready: metrics.ready.clone(),
            draining: metrics.draining.clone(),
        }
    }

    /// Every listener is bound and serving.
    pub(crate) fn set_ready(&self) {
        self.ready.set(1);
    }

    /// A stop has begun: readiness fails from now on.
    pub(crate) fn set_draining(&self) {
        self.ready.set(0);
        self.draining.set(1);
    }

    fn is_ready(&self) -> bool {
        self.ready.get() == 1 && !self.is_draining()
    }

    fn is_draining(&self) -> bool {
        self.draining.get() == 1
    }
}

/// What the endpoint serves from.
pub(crate) struct State {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) health: Arc<Health>,
    /// TLS and basic auth, replaced by a reload that changes the web config file.
    pub(crate) web: watch::Receiver<Arc<WebEndpoint>>,
}

/// Serves HTTP on `listener` until `stop`; open requests get a short grace period.
pub(crate) async fn serve(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    let slots = Arc::new(Slots::default());
    let connections = TaskTracker::new();
    let mut acceptor = Acceptor::new();
    let on_error = |kind: AcceptErrorKind, e: &io::Error| {
        if let Some(suppressed) = ACCEPT_ERROR_LOG.allow() {
            warn!(error = %e, kind = kind.label(), suppressed, "HTTP accept failed");
        }
    };
    while let Some((stream, peer, loan)) = acceptor.next_borrowing(&listener, &stop, on_error).await
    {
        let slot = match slots.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refused) => {
                if let Some(suppressed) = REFUSED_LOG.allow() {
                    warn!(%peer, reason = refused.label(), suppressed,
                        "HTTP connection refused");
                }
                // Dropping the stream closes it: the client learns at once.
                continue;
            }
        };
        connections.spawn(serve_connection(
            stream,
            peer,
            (slot, loan),
            Arc::clone(&state),
            stop.clone(),
        ));
    }
    drop(listener);
    connections.close();
    let _ = tokio::time::timeout(STOP_GRACE, connections.wait()).await;
}

/// Serves one connection within its time bounds, holding its slot (and the spare
/// descriptors it borrowed, if the process was out of them) until it has closed.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    held: (Slot, Option<Loan>),
    state: Arc<State>,
    stop: CancellationToken,
) {
    let expires = Instant::now() + MAX_CONNECTION_AGE;
    // A fixed, small send buffer: a client that does not read stalls after a few
    // responses (and the write timeout starts) instead of after megabytes of them.
    let _ = SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER_SIZE);
    let tls = state.web.borrow().tls().cloned();
    let io = WriteTimeout::new(stream, WRITE_TIMEOUT);
    match tls {
        None => serve_http(io, &held.0, state, stop, expires).await,
        Some(acceptor) => {
            let handshake = async {
                if !starts_tls(&io).await? {
                    let mut io = io;
                    let _ = io.write_all(PLAIN_HTTP_TO_TLS).await;
                    let _ = io.shutdown().await;
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "plain HTTP sent to the TLS endpoint",
                    ));
                }
                acceptor.accept(io).await
            };
            let handshake = tokio::select! {
                done = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => done
                    .unwrap_or_else(|_| Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no TLS handshake within 2s",
                    ))),
                // Dropping the connection closes it; it had not sent a request.
                _ = held.0.evicted.cancelled() => return,
                _ = stop.cancelled() => return,
            };
            match handshake {
                Ok(tls) => serve_http(tls, &held.0, state, stop, expires).await,
                Err(e) => {
                    if let Some(suppressed) = HANDSHAKE_LOG.allow() {
                        warn!(%peer, error = %e, suppressed, "HTTP TLS handshake failed");
                    }
                }
            }
        }
    }
    // The socket is closed by now, so a borrowed spare can be reopened on it.
    drop(held);
}

/// True when the client's first byte opens a TLS handshake; waits for it (the caller
/// bounds the wait).
async fn starts_tls(io: &WriteTimeout) -> io::Result<bool> {
    let mut first = [0u8; 1];
    if io.stream.peek(&mut first).await? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before a TLS handshake",
        ));
    }
    Ok(first[0] == TLS_HANDSHAKE_RECORD)
}

/// Serves HTTP/1.1 on `io` (the socket, or TLS over it) until the client is done, the
/// connection is evicted, it expires or the endpoint stops.
async fn serve_http<I>(
    io: I,
    slot: &Slot,
    state: Arc<State>,
    stop: CancellationToken,
    expires: Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let evicted = slot.evicted.clone();
    let requested = slot.clone_handle();
    let service = hyper::service::service_fn(move |req| {
        requested.request_started();
        let state = Arc::clone(&state);
        async move {
            // One request at a time per turn: a client pipelining hundreds of costly
            // `/metrics` requests must not keep a worker from the probes in between.
            tokio::task::yield_now().await;
            // The web config in force now: a reload applies to the next request.
            let web = Arc::clone(&state.web.borrow());
            if !is_open(req.uri().path()) && !web.authorize(req.headers().get(AUTHORIZATION)).await
            {
                return Ok::<_, Infallible>(unauthorized());
            }
            Ok::<_, Infallible>(route(&req, &state))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        // Dropping the connection closes it; it had not sent a request.
        _ = evicted.cancelled() => return,
        _ = tokio::time::sleep_until(expires) => {}
        _ = stop.cancelled() => {}
    }
    // Finish the response in progress (bounded by the write timeout), then close.
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(WRITE_TIMEOUT, conn).await;
}

/// Paths served without basic auth: the health probes.
fn is_open(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz")
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut resp = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
    resp.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"echod\", charset=\"UTF-8\""),
    );
    resp
}

/// Why a connection was closed right after accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Its source address holds `MAX_CONNECTIONS_PER_IP` already.
    PerIp,
    /// `MAX_CONNECTIONS` are open and every one of them has sent a request.
    Full,
}

impl Refused {
    fn label(self) -> &'static str {
        match self {
            Self::PerIp => "per_ip_limit",
            Self::Full => "global_limit",
        }
    }
}

/// The connection table: how many are open, per source address, and which have not
/// sent a request yet (the ones a full table evicts, oldest first).
#[derive(Default)]
struct Slots {
    table: Mutex<SlotTable>,
}

#[derive(Default)]
struct SlotTable {
    next_id: u64,
    open: usize,
    per_ip: HashMap<IpAddr, usize>,
    /// Connections still waiting for their first request head, by age (ids grow).
    waiting: BTreeMap<u64, CancellationToken>,
}

/// One admitted connection; dropping it frees its place.
struct Slot {
    handle: SlotHandle,
    ip: IpAddr,
    /// Cancelled when a newer connection needs the place.
    evicted: CancellationToken,
}

/// What the request handler needs to mark its connection as having sent a request.
#[derive(Clone)]
struct SlotHandle {
    slots: Arc<Slots>,
    id: u64,
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection from `ip`: refused when its address holds its share or when
    /// every slot is busy serving; evicts the oldest connection without a request when
    /// the table is full of them.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let ip = canonical_ip(ip);
        let mut table = self.lock();
        let from_ip = table.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= MAX_CONNECTIONS_PER_IP {
            return Err(Refused::PerIp);
        }
        if table.open >= MAX_CONNECTIONS {
            // The victim closes at its next poll and gives back its place then.
            let (_, victim) = table.waiting.pop_first().ok_or(Refused::Full)?;
            victim.cancel();
        }
        let id = table.next_id;
        table.next_id += 1;
        table.open += 1;
        *table.per_ip.entry(ip).or_insert(0) += 1;
        let evicted = CancellationToken::new();
        table.waiting.insert(id, evicted.clone());
        Ok(Slot {
            handle: SlotHandle {
                slots: Arc::clone(self),
                id,
            },
            ip,
            evicted,
        })
    }
}

impl Slot {
    fn clone_handle(&self) -> SlotHandle {
        self.handle.clone()
    }
}

impl SlotHandle {
    /// A request head arrived: the connection is doing real work and is not evicted.
    fn request_started(&self) {
        self.slots.lock().waiting.remove(&self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = self.handle.slots.lock();
        table.open -= 1;
        table.waiting.remove(&self.handle.id);
        if let Some(n) = table.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                table.per_ip.remove(&self.ip);
            }
        }
    }
}

/// The connection's socket, with a deadline on writes: a write that makes no progress
/// for `timeout` fails, so a client that requests and never reads cannot hold its
/// connection (and the response in memory) forever. hyper has header and keep-alive
/// timeouts but none for writes.
struct WriteTimeout {
    stream: TcpStream,
    timeout: Duration,
    /// Armed while a write waits for room; disarmed by any progress.
    stall: Option<Pin<Box<Sleep>>>,
}

impl WriteTimeout {
    fn new(stream: TcpStream, timeout: Duration) -> Self {
        Self {
            stream,
            timeout,
            stall: None,
        }
    }

    /// Called when a write would block: pending until the stall outlasts the timeout,
    /// then an error, after arranging for the close to reset the connection (the
    /// unsent response is thrown away instead of lingering in the kernel).
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let timeout = self.timeout;
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stall.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let _ = SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client did not read the response",
        )))
    }

    fn progressed<T>(&mut self, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.stall = None;
        }
        result
    }
}

impl AsyncRead for WriteTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteTimeout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Pending => this.poll_stall(cx),
            ready => this.progressed(ready),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.poll_stall(cx),
            ready => this.progressed(ready),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn route<B>(req: &Request<B>, state: &State) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/" | "/metrics" | "/healthz" | "/readyz") {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match path {
        "/metrics" => {
            let mut resp = text(StatusCode::OK, state.metrics.encode());
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.health.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" if state.health.is_draining() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
        _ => {
            let mut resp = text(StatusCode::OK, landing_page());
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            resp
        }
    }
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod route_tests;

fn landing_page() -> String {
    format!(
        "<!doctype html>\n<html><head><title>echod</title></head><body>\n\
         <h1>echod {VERSION}</h1>\n<p>TCP and UDP echo daemon (RFC 862), revision {REVISION}.</p>\n\
         <ul>\n<li><a href=\"/metrics\">/metrics</a> (Prometheus)</li>\n\
         <li><a href=\"/healthz\">/healthz</a> (liveness)</li>\n\
         <li><a href=\"/readyz\">/readyz</a> (readiness)</li>\n</ul>\n</body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    use super::{MAX_CONNECTIONS, MAX_CONNECTIONS_PER_IP, Refused, Slots};

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x7f00_0000 + n))
    }

    #[test]
    fn one_address_gets_its_share_and_no_more() {
        let slots = Arc::new(Slots::default());
        let held: Vec<_> = (0..MAX_CONNECTIONS_PER_IP)
            .map(|_| slots.admit(ip(1)).expect("within the share"))
            .collect();
        assert_eq!(slots.admit(ip(1)).err(), Some(Refused::PerIp));
        assert!(slots.admit(ip(2)).is_ok(), "another address is unaffected");
        drop(held);
        assert!(slots.admit(ip(1)).is_ok(), "closing frees the share");
        assert_eq!(slots.lock().open, 0);
    }

    #[test]
    fn a_full_table_evicts_the_oldest_connection_without_a_request() {
        let slots = Arc::new(Slots::default());
        let held: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|i| slots.admit(ip(1 + i as u32)).expect("room"))
            .collect();
        // The oldest has sent a request: it is working, the next oldest goes.
        held[0].clone_handle().request_started();
        let newcomer = slots.admit(ip(1000)).expect("room made by eviction");
        assert!(!held[0].evicted.is_cancelled());
        assert!(held[1].evicted.is_cancelled());
        assert!(held[2..].iter().all(|s| !s.evicted.is_cancelled()));
        // Every connection working: a newcomer is refused at once.
        for slot in &held {
            slot.clone_handle().request_started();
        }
        newcomer.clone_handle().request_started();
        assert_eq!(slots.admit(ip(1001)).err(), Some(Refused::Full));
        drop(held);
        drop(newcomer);
        assert_eq!(slots.lock().open, 0);
        assert!(slots.lock().per_ip.is_empty());
    }
}
