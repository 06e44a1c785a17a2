//! UDP echo: one datagram back per datagram, unchanged, to its sender — unless that
//! would make echod a reflector.
//!
//! A datagram is dropped (and counted) when it is larger than `udp.max_datagram_size`
//! (never echoed truncated), when it comes from a denied source port or a non-unicast
//! address (the echo–chargen loop, CVE-1999-0103), or when its source has used up its
//! token bucket. Datagrams are handled in bursts: read until the socket is empty (or
//! [`MAX_BATCH`] datagrams), then add the burst's counts to the metrics once. Every
//! datagram spends tokio's coop budget, so a socket that never empties (a flood, an
//! echo loop) cannot starve the other tasks on its worker.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::limits::{RateLimiter, canonical_ip};
use super::logging::RateLimitedLog;
use super::metrics::{UdpBatch, UdpListenerMetrics};
use super::reasons::DropReason;
use crate::config::UdpConfig;

/// Larger than any UDP payload, so the kernel never truncates what it hands us and an
/// oversize datagram is recognised by its true length.
const RECV_BUFFER: usize = 65_536;

/// Datagrams handled before counts are flushed even if the socket is still busy.
const MAX_BATCH: usize = 256;

/// Binds a UDP socket (SO_REUSEADDR; IPv6-only for `[::]`).
pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Everything a UDP socket task needs, passed down from the server.
pub(crate) struct Listener {
    pub(crate) socket: UdpSocket,
    /// The configured address: the metrics label and the name in logs.
    pub(crate) label: String,
    /// Live UDP settings.
    pub(crate) config: watch::Receiver<Arc<UdpConfig>>,
    /// Per-source token buckets shared by all UDP sockets.
    pub(crate) limiter: Arc<RateLimiter>,
    pub(crate) metrics: UdpListenerMetrics,
    /// Stops this socket alone (reload) or with all (drain).
    pub(crate) stop: CancellationToken,
}

/// The current filtering rules in a form cheap to test per datagram.
struct Rules {
    max_datagram_size: usize,
    denied_ports: Box<[u64; 1024]>,
}

impl Rules {
    fn new(config: &UdpConfig) -> Self {
        let mut denied_ports = Box::new([0u64; 1024]);
        for &port in &config.deny_source_ports {
            denied_ports[usize::from(port) / 64] |= 1 << (port % 64);
        }
        Self {
            max_datagram_size: config.max_datagram_size,
            denied_ports,
        }
    }

    /// A source that must never be answered: a denied port, or an address a reply to
    /// which would go to many hosts or nowhere.
    fn denies(&self, peer: SocketAddr) -> bool {
        let port = peer.port();
        if self.denied_ports[usize::from(port) / 64] & (1 << (port % 64)) != 0 {
            return true;
        }
        match canonical_ip(peer.ip()) {
            IpAddr::V4(ip) => {
                ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.octets()[0] == 0
            }
            IpAddr::V6(ip) => ip.is_unspecified() || ip.is_multicast(),
        }
    }
}

static SEND_ERROR_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(5));

impl Listener {
    /// Echoes until stopped.
    pub(crate) async fn run(mut self) {
        let mut buf = vec![0u8; RECV_BUFFER];
        let mut rules = Rules::new(&self.config.borrow_and_update());
        let mut batch = UdpBatch::default();
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                r = self.socket.readable() => if let Err(e) = r {
                    warn!(listener = %self.label, error = %e, "UDP socket failed");
                    break;
                },
            }
            if self.config.has_changed().unwrap_or(false) {
                rules = Rules::new(&self.config.borrow_and_update());
            }
            for _ in 0..MAX_BATCH {
                // A socket that is never empty (a flood, or an echo loop) must not keep
                // the worker to itself: `readable()` and `try_recv_from` spend no coop
                // budget, so each datagram spends one here, and the task yields when the
                // budget is gone. TCP, health and signals keep being served.
                tokio::task::coop::consume_budget().await;
                match self.socket.try_recv_from(&mut buf) {
                    Ok((n, peer)) => self.handle(&buf[..n], peer, &rules, &mut batch),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        debug!(listener = %self.label, error = %e, "UDP receive error");
                        break;
                    }
                }
            }
            batch.flush(&self.metrics);
        }
        batch.flush(&self.metrics);
        debug!(listener = %self.label, "UDP socket closed");
    }

    fn handle(&self, datagram: &[u8], peer: SocketAddr, rules: &Rules, batch: &mut UdpBatch) {
        batch.received(datagram.len());
        let verdict = if datagram.len() > rules.max_datagram_size {
            Err(DropReason::Oversize)
        } else if rules.denies(peer) {
            Err(DropReason::DeniedPort)
        } else if !self.limiter.allow(peer.ip(), Instant::now()) {
            Err(DropReason::RateLimited)
        } else {
            // A full send buffer drops the reply rather than blocking every other
            // sender behind one slow path; UDP promises no more.
            self.socket
                .try_send_to(datagram, peer)
                .map_err(|e| {
                    if let Some(suppressed) = SEND_ERROR_LOG.allow() {
                        warn!(listener = %self.label, %peer, error = %e, suppressed,
                            "UDP reply not sent");
                    }
                    DropReason::SendError
                })
                .map(|_| ())
        };
        match verdict {
            Ok(()) => batch.sent(datagram.len()),
            Err(reason) => batch.dropped(reason),
        }
    }
}
