//! TLS echo: a TCP listener whose admitted connections first do a TLS handshake, then
//! echo the decrypted bytes back encrypted.
//!
//! Admission is the TCP listener's own (global and per-address limits, PROXY headers
//! before the ClientHello), so a TLS connection is a TCP connection to every limit and
//! counts in the `echod_tcp_*` series under its listener's address; this module adds
//! the handshake (bounded by `tls.handshake_timeout`, its result counted and logged
//! rate-limited with the peer) and the echo loop inside TLS ([`session`]).
//!
//! The certificate comes from a `watch` of the `[tls]` settings that the server
//! replaces on every successful reload: a connection takes the pair current at its
//! accept, so new handshakes get a renewed pair while open connections keep theirs.
//! TLS session state cannot cross an in-place upgrade's exec, so at a handover an open
//! TLS connection ends with close_notify after its current echo (counted as `upgrade`);
//! the listening socket itself is handed over like any other.

mod session;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::warn;

use super::limits::Permit;
use super::logging::RateLimitedLog;
use super::metrics::{TcpListenerMetrics, TlsListenerMetrics};
use super::reasons::HandshakeResult;
use super::shutdown::Shutdown;
use crate::config::{TcpConfig, TlsConfig};

static HANDSHAKE_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(5));

/// What a TLS listener adds to a TCP one: the live `[tls]` settings and its series.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub(crate) config: watch::Receiver<Arc<TlsConfig>>,
    pub(crate) metrics: Arc<TlsListenerMetrics>,
}

impl Endpoint {
    /// Counts an admitted connection and returns the task that serves it: handshake,
    /// then echo. `peer` is the client (from a PROXY header when a proxy sent one).
    pub(crate) fn serve(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        tcp: Arc<TcpConfig>,
        shutdown: Shutdown,
        metrics: Arc<TcpListenerMetrics>,
        permit: Permit,
    ) -> impl Future<Output = ()> + Send + 'static {
        let tls = Arc::clone(&self.config.borrow());
        let tls_metrics = Arc::clone(&self.metrics);
        metrics.accepted.inc();
        session::Session {
            peer,
            tcp,
            shutdown,
            metrics,
            tls_metrics,
            permit: Some(permit),
            started: tokio::time::Instant::now(),
        }
        .run(stream, tls)
    }
}

/// Does the handshake under `tls.handshake_timeout`; a cut or an upgrade abandons it.
async fn handshake(
    stream: TcpStream,
    tls: &TlsConfig,
    shutdown: &Shutdown,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, (HandshakeResult, String)> {
    let Some(material) = &tls.loaded else {
        // Loading is part of every config load that lists a TLS address.
        return Err((
            HandshakeResult::ProtocolError,
            "no certificate loaded".into(),
        ));
    };
    let acceptor = TlsAcceptor::from(Arc::clone(&material.server_config));
    let accept = tokio::time::timeout(tls.handshake_timeout, acceptor.accept(stream));
    tokio::select! {
        done = accept => match done {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err((classify(&e), e.to_string())),
            Err(_) => Err((
                HandshakeResult::Timeout,
                format!("not done within {}", humantime::format_duration(tls.handshake_timeout)),
            )),
        },
        () = shutdown.interrupted() => Err((HandshakeResult::Interrupted, "stopping".into())),
    }
}

/// The result label of a failed handshake, from the error tokio-rustls returns (a
/// rustls error inside an `InvalidData` I/O error, or the socket's own).
fn classify(e: &io::Error) -> HandshakeResult {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return match tls {
            rustls::Error::NoCertificatesPresented => HandshakeResult::NoClientCertificate,
            rustls::Error::InvalidCertificate(_) => HandshakeResult::BadCertificate,
            rustls::Error::PeerIncompatible(_) => HandshakeResult::Incompatible,
            rustls::Error::AlertReceived(_) => HandshakeResult::ClientAlert,
            _ => HandshakeResult::ProtocolError,
        };
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => HandshakeResult::PeerClosed,
        _ => HandshakeResult::ProtocolError,
    }
}

/// Logs a failed handshake with its peer and reason, at most once per interval.
fn log_failure(label: &str, peer: SocketAddr, result: HandshakeResult, error: &str) {
    if let Some(suppressed) = HANDSHAKE_LOG.allow() {
        warn!(listener = %label, %peer, reason = result.label(), %error, suppressed,
            "TLS handshake failed");
    }
}
