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
//! a newcomer that finds no room takes the place of the connection that has made no
//! progress for the longest among those not being served, sparing for a short grace one
//! that echod has answered (a probe mid-handshake) ([`slots`]); a connection takes a
//! place only once its first bytes have arrived, so the table never holds silent
//! newcomers that eviction could not tell from a probe ([`admission`]); each newcomer
//! makes its first read before the next accept; password checks
//! are bounded work that holds no place a probe needs ([`super::http_guard`]), and a
//! connection that cannot be served is closed at once rather than left in the accept
//! queue: a fast failure beats a hang. A client whose address `metrics.allow`/
//! `metrics.deny` refuses is closed before it takes a slot, counted as `denied`.
//!
//! The module's parts: [`admission`] (waiting for the first bytes), [`health`]
//! (readiness state), [`slots`] (the slot table and
//! eviction, on the per-address limiter the echo listeners use), [`io`] (the socket
//! with a write deadline and progress marks), [`routes`] (what each path answers);
//! this file accepts, sniffs TLS and runs hyper.
//!
//! With a web configuration file ([`super::http_guard`]) the endpoint speaks TLS (the
//! handshake gets the same 2 s as a request head) and asks for basic auth on every
//! path except `/healthz` and `/readyz`: probes from a kubelet or a load balancer
//! carry no credentials, and what they learn (alive, ready) is no secret; with TLS on,
//! they too must use TLS.

mod admission;
mod health;
mod io;
mod routes;
mod slots;

use std::convert::Infallible;
use std::io as stdio;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::AUTHORIZATION;
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use self::admission::{Arrived, Budget, Lobby, Ticket, Waited};
pub(crate) use self::health::Health;
use self::io::Socket;
use self::routes::{is_open, route, too_many_checks, unauthorized};
use self::slots::{Slot, Slots};
use super::accept::{Acceptor, Loan, close_at_once};
use super::http_guard::{Verdict, WebEndpoint};
use super::logging::RateLimitedLog;
use super::metrics::Metrics;
use super::reasons::AcceptErrorKind;
use crate::config::MetricsConfig;

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

/// The label a request answered 429 (the password checks at their bound) is counted
/// under in `echod_http_connections_rejected_total`.
const AUTH_BUSY: &str = "auth_busy";

/// What the endpoint serves from.
pub(crate) struct State {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) health: Arc<Health>,
    /// TLS and basic auth, replaced by a reload that changes the web config file.
    pub(crate) web: watch::Receiver<Arc<WebEndpoint>>,
    /// `metrics.allow` and `metrics.deny`, replaced by every reload.
    pub(crate) access: watch::Receiver<Arc<MetricsConfig>>,
}

/// Serves HTTP on `listener` until `stop`; open requests get a short grace period.
pub(crate) async fn serve(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    let budget = Budget::of_process(MAX_CONNECTIONS);
    let slots = Slots::new(budget.max_slots, MAX_CONNECTIONS_PER_IP);
    let lobby = Lobby::new(budget.max_waiting);
    if let Err(e) = admission::defer_accept(&listener) {
        // The lobby still defers admission; silent connections cost a descriptor each.
        warn!(error = %e, "cannot set TCP_DEFER_ACCEPT on the HTTP listener");
    }
    let connections = TaskTracker::new();
    let mut acceptor = Acceptor::new();
    let on_error = |kind: AcceptErrorKind, e: &stdio::Error| {
        state.metrics.http_accept_error(kind);
        if let Some(suppressed) = ACCEPT_ERROR_LOG.allow() {
            warn!(error = %e, kind = kind.label(), suppressed, "HTTP accept failed");
        }
    };
    while let Some((stream, peer, loan)) = acceptor.next_borrowing(&listener, &stop, on_error).await
    {
        if !state.access.borrow().admits(peer.ip()) {
            state.metrics.http_denied();
            if let Some(suppressed) = REFUSED_LOG.allow() {
                warn!(%peer, reason = "denied", suppressed, "HTTP connection refused");
            }
            // What it sent is discarded first, so it sees EOF, not a reset.
            close_at_once(stream);
            continue;
        }
        match admission::arrived(&stream) {
            Arrived::Bytes => {
                if let Some(slot) = admit(&slots, peer, &state.metrics) {
                    connections.spawn(serve_connection(
                        stream,
                        peer,
                        (slot, loan),
                        Arc::clone(&state),
                        stop.clone(),
                    ));
                }
            }
            // Spares borrowed while descriptors are exhausted are for a client with a
            // request: a silent one would hold them for its whole wait.
            Arrived::Nothing if loan.is_some() => {
                state.metrics.http_rejected(admission::SILENT);
                close_at_once(stream);
            }
            // Its first bytes are awaited in the lobby, where it holds no slot.
            Arrived::Nothing => {
                let ticket = lobby.enter();
                connections.spawn(wait_then_serve(
                    stream,
                    peer,
                    (ticket, loan),
                    (Arc::clone(&slots), Arc::clone(&state)),
                    stop.clone(),
                ));
            }
            Arrived::Gone => {}
        }
        // Let the newcomer make its first read (its request head, its ClientHello)
        // before the next accept: a burst of attackers accepted ahead of that read
        // would find it the stalest of its address and evict it.
        tokio::task::yield_now().await;
    }
    drop(listener);
    connections.close();
    let _ = tokio::time::timeout(STOP_GRACE, connections.wait()).await;
}

/// A slot for a connection from `peer` whose first bytes have arrived, evicting one not
/// being served if need be; `None` (counted) when every candidate is being served.
fn admit(slots: &Arc<Slots>, peer: SocketAddr, metrics: &Metrics) -> Option<Slot> {
    match slots.admit(peer.ip()) {
        Ok(slot) => {
            if slot.evicted_one {
                metrics.http_rejected(slots::EVICTED);
            }
            Some(slot)
        }
        Err(refused) => {
            metrics.http_rejected(refused.label());
            if let Some(suppressed) = REFUSED_LOG.allow() {
                warn!(%peer, reason = refused.label(), suppressed, "HTTP connection refused");
            }
            // Dropping the stream closes it: the client learns at once.
            None
        }
    }
}

/// A connection accepted before its first bytes: waits for them in the lobby (bounded
/// in time, and pushed out by newcomers when the lobby is full), then is admitted and
/// served like one that arrived with them.
async fn wait_then_serve(
    stream: TcpStream,
    peer: SocketAddr,
    (ticket, loan): (Ticket, Option<Loan>),
    (slots, state): (Arc<Slots>, Arc<State>),
    stop: CancellationToken,
) {
    match admission::wait_for_bytes(&stream, &ticket, &stop).await {
        Waited::Bytes => {
            drop(ticket);
            if let Some(slot) = admit(&slots, peer, &state.metrics) {
                serve_connection(stream, peer, (slot, loan), state, stop).await;
            }
        }
        Waited::Silent => {
            state.metrics.http_rejected(admission::SILENT);
            if let Some(suppressed) = REFUSED_LOG.allow() {
                warn!(%peer, reason = admission::SILENT, suppressed,
                    "HTTP connection closed before it sent anything");
            }
        }
        Waited::Gone | Waited::Stopped => {}
    }
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
    let io = Socket::new(stream, WRITE_TIMEOUT, held.0.handle());
    match tls {
        None => serve_http(io, peer, &held.0, state, stop, expires).await,
        Some(acceptor) => {
            let handshake = async {
                if !starts_tls(&io).await? {
                    let mut io = io;
                    let _ = io.write_all(PLAIN_HTTP_TO_TLS).await;
                    let _ = io.shutdown().await;
                    return Err(stdio::Error::new(
                        stdio::ErrorKind::InvalidData,
                        "plain HTTP sent to the TLS endpoint",
                    ));
                }
                acceptor.accept(io).await
            };
            let handshake = tokio::select! {
                done = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => done
                    .unwrap_or_else(|_| Err(stdio::Error::new(
                        stdio::ErrorKind::TimedOut,
                        "no TLS handshake within 2s",
                    ))),
                // Dropping the connection closes it; it had not sent a request.
                _ = held.0.evicted.cancelled() => return,
                _ = stop.cancelled() => return,
            };
            match handshake {
                Ok(tls) => serve_http(tls, peer, &held.0, state, stop, expires).await,
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
async fn starts_tls(io: &Socket) -> stdio::Result<bool> {
    let mut first = [0u8; 1];
    if io.stream.peek(&mut first).await? == 0 {
        return Err(stdio::Error::new(
            stdio::ErrorKind::UnexpectedEof,
            "closed before a TLS handshake",
        ));
    }
    Ok(first[0] == TLS_HANDSHAKE_RECORD)
}

/// Serves HTTP/1.1 on `io` (the socket, or TLS over it) until the client is done, the
/// connection is evicted, it expires or the endpoint stops.
async fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    slot: &Slot,
    state: Arc<State>,
    stop: CancellationToken,
    expires: Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let evicted = slot.evicted.clone();
    let handle = slot.handle();
    let service = hyper::service::service_fn(move |req| {
        let state = Arc::clone(&state);
        let handle = handle.clone();
        async move {
            // The health paths never wait behind a password check (and are served
            // from here on); a request that does is not "being served" while it
            // waits, so it can be evicted.
            let open = is_open(req.uri().path());
            if open {
                handle.serving();
            }
            // One request at a time per turn: a client pipelining hundreds of costly
            // `/metrics` requests must not keep a worker from the probes in between.
            tokio::task::yield_now().await;
            if !open {
                // The web config in force now: a reload applies to the next request.
                let web = Arc::clone(&state.web.borrow());
                match web
                    .authorize(req.headers().get(AUTHORIZATION), peer.ip())
                    .await
                {
                    Verdict::Granted => {}
                    Verdict::Denied => return Ok::<_, Infallible>(unauthorized()),
                    Verdict::Busy => {
                        state.metrics.http_rejected(AUTH_BUSY);
                        return Ok(too_many_checks());
                    }
                }
            }
            handle.serving();
            let response = route(&req, &state);
            handle.answered();
            Ok(response)
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
        // Dropping the connection closes it; it was not being served.
        _ = evicted.cancelled() => return,
        _ = tokio::time::sleep_until(expires) => {}
        _ = stop.cancelled() => {}
    }
    // Finish the response in progress (bounded by the write timeout), then close.
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(WRITE_TIMEOUT, conn).await;
}
