//! UDP echo: one datagram back per datagram, unchanged, to its sender — unless that
//! would make echod a reflector.
//!
//! A datagram is dropped (and counted) when it is larger than `udp.max_datagram_size`
//! (never echoed truncated), when it comes from a denied source port or a non-unicast
//! address (the echo–chargen loop, CVE-1999-0103), from one of echod's own UDP ports
//! (a spoofed datagram from echod itself, or from another echod on the same port, would
//! otherwise bounce until the rate limit stops it), or when its source has used up its
//! token bucket. Datagrams are handled in bursts: read until the socket is empty (or
//! [`MAX_BATCH`] datagrams), then add the burst's counts to the metrics once. Every
//! datagram spends tokio's coop budget, so a socket that never empties (a flood, an
//! echo loop) cannot starve the other tasks on its worker. `udp.sockets_per_address`
//! serves an address with several sockets (SO_REUSEPORT, see `siblings`), so that UDP
//! can use more than one core.
//!
//! An echo loop between echod and another echo server on a *different* port cannot be
//! told from traffic, but servers talk from fixed ports, and clients from the
//! ephemeral range (`net.ipv4.ip_local_port_range`, read once at start): a source
//! port outside that range gets its own small bucket, per address and port
//! ([`SERVER_PORT_BURST`] replies, then [`SERVER_PORT_RATE`] a second), on top of the
//! per-address one. One spoofed datagram between two echo servers then costs at most
//! about twice the burst, and clients on ephemeral ports are not affected. Turning the
//! rate limit off (`packets_per_second = 0`) turns this bucket off too.

use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::limits::{RateLimiter, canonical_ip};
use super::logging::RateLimitedLog;
use super::metrics::{UdpBatch, UdpListenerMetrics};
use super::reasons::DropReason;
use crate::config::RateLimitConfig;
use crate::config::UdpConfig;
use crate::config::{Cidr, admits};

/// Larger than any UDP payload, so the kernel never truncates what it hands us and an
/// oversize datagram is recognised by its true length.
const RECV_BUFFER: usize = 65_536;

/// Replies a source port outside the ephemeral range may get at once (per address and
/// port); a loop between two echo servers ends after about twice this.
const SERVER_PORT_BURST: u32 = 32;
/// Replies a second such a source gets after its burst.
const SERVER_PORT_RATE: u32 = 8;
/// Sources on such ports tracked at most.
const SERVER_PORT_SOURCES: usize = 4096;
/// Linux's default `net.ipv4.ip_local_port_range`, when it cannot be read.
const DEFAULT_EPHEMERAL: (u16, u16) = (32_768, 60_999);

/// The buckets of sources on ports outside the ephemeral range, for every UDP socket.
static SERVER_PORTS: std::sync::LazyLock<Arc<RateLimiter<SocketAddr>>> =
    std::sync::LazyLock::new(|| {
        RateLimiter::new(&RateLimitConfig {
            packets_per_second: SERVER_PORT_RATE,
            burst: SERVER_PORT_BURST,
            max_sources: SERVER_PORT_SOURCES,
        })
    });

/// The ephemeral port range, read once.
static EPHEMERAL: std::sync::LazyLock<(u16, u16)> = std::sync::LazyLock::new(|| {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut it = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or(DEFAULT_EPHEMERAL)
});

/// True when `port` is outside the ephemeral range: where servers talk from.
fn is_server_port(port: u16) -> bool {
    let (low, high) = *EPHEMERAL;
    port < low || port > high
}

/// Datagrams handled before counts are flushed even if the socket is still busy.
const MAX_BATCH: usize = 256;

/// Binds a UDP socket (IPv6-only for `[::]`). Never SO_REUSEADDR: on Linux it lets any
/// other socket that also sets it bind the same UDP address and take the datagrams;
/// UDP has no TIME_WAIT for it to help with, so a restart rebinds at once without it.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    bind_socket(addr, false)
}

/// [`bind`], optionally joining the SO_REUSEPORT group already on `addr` (a sibling).
fn bind_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if reuse_port {
        socket.set_reuse_port(true)?;
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
    /// The ports of all of echod's UDP sockets, this one included.
    pub(crate) own_ports: Arc<OwnPorts>,
    pub(crate) metrics: UdpListenerMetrics,
    /// Stops this socket alone (reload) or with all (drain).
    pub(crate) stop: CancellationToken,
}

/// The ports echod's UDP sockets listen on, shared by all of them, so each socket also
/// refuses datagrams from its siblings' ports (two echo sockets of one echod on
/// different ports would otherwise loop between themselves).
#[derive(Debug, Default)]
pub(crate) struct OwnPorts {
    ports: Mutex<Vec<u16>>,
    /// Bumped on every change, so sockets rebuild their rules only when needed.
    version: AtomicU64,
}

/// A socket's entry in [`OwnPorts`]; dropping it removes the port.
struct OwnPort {
    ports: Arc<OwnPorts>,
    port: u16,
}

impl OwnPorts {
    fn register(self: &Arc<Self>, port: u16) -> OwnPort {
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(port);
        self.version.fetch_add(1, Ordering::Release);
        OwnPort {
            ports: Arc::clone(self),
            port,
        }
    }

    fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The version and the ports, read together.
    fn snapshot(&self) -> (u64, Vec<u16>) {
        let ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        (self.version(), ports.clone())
    }
}

impl Drop for OwnPort {
    fn drop(&mut self) {
        let mut ports = self.ports.ports.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = ports.iter().position(|&p| p == self.port) {
            ports.swap_remove(i);
        }
        drop(ports);
        self.ports.version.fetch_add(1, Ordering::Release);
    }
}

/// The current filtering rules in a form cheap to test per datagram.
struct Rules {
    max_datagram_size: usize,
    /// `udp.deny_source_ports`, plus echod's own ports unless `udp.deny_own_ports` is off.
    denied_ports: Box<[u64; 1024]>,
    /// The [`OwnPorts`] version these rules were built from.
    own_ports_version: u64,
    /// Rate limiting is on (`udp.rate_limit.packets_per_second` > 0), and with it the
    /// server-port bucket.
    rate_limited: bool,
    /// `udp.allow` and `udp.deny`.
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
}

impl Rules {
    fn new(config: &UdpConfig, own_ports: &OwnPorts) -> Self {
        let mut denied_ports = Box::new([0u64; 1024]);
        let (own_ports_version, own) = own_ports.snapshot();
        let own = if config.deny_own_ports {
            own
        } else {
            Vec::new()
        };
        for &port in config.deny_source_ports.iter().chain(&own) {
            denied_ports[usize::from(port) / 64] |= 1 << (port % 64);
        }
        Self {
            max_datagram_size: config.max_datagram_size,
            denied_ports,
            own_ports_version,
            rate_limited: config.rate_limit.packets_per_second > 0,
            allow: config.allow.clone(),
            deny: config.deny.clone(),
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

/// Sets the kernel receive buffer of `socket` to `size` bytes (0: leave it). Tries
/// SO_RCVBUFFORCE first, which may exceed `net.core.rmem_max` but needs CAP_NET_ADMIN,
/// then plain SO_RCVBUF, which the kernel silently caps at `rmem_max`. Returns the size
/// the kernel reports (twice the request: it counts its own bookkeeping).
fn set_receive_buffer(socket: &UdpSocket, size: usize) -> io::Result<usize> {
    let sock = SockRef::from(socket);
    if size == 0 {
        return sock.recv_buffer_size();
    }
    let value = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt(2) on a descriptor we own, with a pointer to a live c_int and
    // its exact length.
    let forced = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        sock.set_recv_buffer_size(size)?;
    }
    sock.recv_buffer_size()
}

static SEND_ERROR_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(5));

impl Listener {
    /// Echoes until stopped: the socket, and the sibling sockets that
    /// `udp.sockets_per_address` asks for (see [`siblings`]), each served by a task of
    /// its own.
    pub(crate) async fn run(self) {
        // A socket handed over by systemd comes with SO_REUSEADDR set (systemd sets it on
        // every socket it binds); cleared, no later bind can share the address.
        if let Err(e) = SockRef::from(&self.socket).set_reuse_address(false) {
            warn!(listener = %self.label, error = %e, "cannot clear SO_REUSEADDR");
        }
        let Self {
            socket,
            label,
            config,
            limiter,
            own_ports,
            metrics,
            stop,
        } = self;
        // A socket whose address cannot be read is on port 0 for this purpose: denied anyway.
        let port = socket.local_addr().map_or(0, |a| a.port());
        let _own_port = own_ports.register(port);
        let wanted = match config.borrow().sockets_per_address {
            0 => tokio::runtime::Handle::current().metrics().num_workers(),
            n => n,
        };
        let siblings = siblings(&socket, wanted, &label);
        let shared = Arc::new(Shared {
            label,
            limiter,
            own_ports,
            metrics,
            stop,
        });
        let mut tasks = tokio::task::JoinSet::new();
        for sibling in siblings {
            tasks.spawn(Arc::clone(&shared).serve(sibling, config.clone()));
        }
        shared.serve(socket, config).await;
        while tasks.join_next().await.is_some() {}
    }
}

/// Binds `wanted - 1` more sockets to `socket`'s address with SO_REUSEPORT, so the
/// kernel spreads datagrams (by source address and port) over them and the address is
/// not served by one thread at a time. Sharing the address needs SO_REUSEPORT on
/// `socket` too, which is set now, after its bind: the bind itself had none, so a
/// second echod (or anything else) binding the address first is refused as before;
/// from now on the kernel admits into the group sockets of the same user that ask for
/// it (other users never). None when one socket is wanted, or when the kernel refuses.
///
/// Not the default: on 2 CPUs shared with the load generator, two sockets cost 6.2–6.6
/// µs of server CPU per datagram against 5.6–6.1 µs for one, at the same rate (16
/// clients, `benches/syscalls.sh`), since each socket's bursts are shorter.
fn siblings(socket: &UdpSocket, wanted: usize, label: &str) -> Vec<UdpSocket> {
    if wanted <= 1 {
        return Vec::new();
    }
    let bind_one = |addr| bind_socket(addr, true).and_then(UdpSocket::from_std);
    let group = SockRef::from(socket)
        .set_reuse_port(true)
        .and_then(|()| socket.local_addr())
        .and_then(|addr| (1..wanted).map(|_| bind_one(addr)).collect());
    match group {
        Ok(siblings) => siblings,
        Err(e) => {
            let _ = SockRef::from(socket).set_reuse_port(false);
            warn!(listener = %label, error = %e, "UDP served by one socket: cannot open one per worker thread");
            Vec::new()
        }
    }
}

/// What wakes a UDP task besides a datagram.
enum Control {
    Stop,
    Reload,
}

/// Waits for a stop or new settings; gives the settings' receiver back for the next wait.
async fn next_control(
    stop: CancellationToken,
    mut watcher: watch::Receiver<Arc<UdpConfig>>,
) -> (Control, watch::Receiver<Arc<UdpConfig>>) {
    tokio::select! {
        biased;
        () = stop.cancelled() => (Control::Stop, watcher),
        Ok(()) = watcher.changed() => (Control::Reload, watcher),
    }
}

/// What the tasks serving one configured UDP address share.
struct Shared {
    label: String,
    limiter: Arc<RateLimiter>,
    own_ports: Arc<OwnPorts>,
    metrics: UdpListenerMetrics,
    stop: CancellationToken,
}

impl Shared {
    /// Echoes on one socket of the address until stopped.
    async fn serve(
        self: Arc<Self>,
        socket: UdpSocket,
        mut config: watch::Receiver<Arc<UdpConfig>>,
    ) {
        let mut receive_buffer = config.borrow().receive_buffer_size;
        self.apply_receive_buffer(&socket, receive_buffer);
        let mut buf = vec![0u8; RECV_BUFFER];
        let mut rules = Rules::new(&config.borrow_and_update(), &self.own_ports);
        let mut batch = UdpBatch::default();
        // A stop or new settings (which apply at once, on every socket of the address)
        // wake the task through one future, made again only after a reload: two made for
        // every burst would each join and leave a locked wait list per datagram burst.
        let mut control = Box::pin(next_control(self.stop.clone(), config.clone()));
        loop {
            let reloaded = tokio::select! {
                biased;
                event = &mut control => match event {
                    (Control::Stop, _) => break,
                    (Control::Reload, watcher) => {
                        control = Box::pin(next_control(self.stop.clone(), watcher));
                        true
                    }
                },
                // The socket's own waker slot, not a `readable()` future (which also
                // joins a locked wait list each time it waits).
                r = poll_fn(|cx| socket.poll_recv_ready(cx)) => match r {
                    Ok(()) => false,
                    Err(e) => {
                        warn!(listener = %self.label, error = %e, "UDP socket failed");
                        break;
                    }
                },
            };
            if reloaded || self.own_ports.version() != rules.own_ports_version {
                rules = Rules::new(&config.borrow_and_update(), &self.own_ports);
                let wanted = config.borrow().receive_buffer_size;
                if wanted != receive_buffer {
                    receive_buffer = wanted;
                    self.apply_receive_buffer(&socket, wanted);
                }
            }
            for _ in 0..MAX_BATCH {
                // A socket that is never empty (a flood, or an echo loop) must not keep
                // the worker to itself: `readable()` and `try_recv_from` spend no coop
                // budget, so each datagram spends one here, and the task yields when the
                // budget is gone. TCP, health and signals keep being served.
                tokio::task::coop::consume_budget().await;
                match socket.try_recv_from(&mut buf) {
                    Ok((n, peer)) => self.handle(&socket, &buf[..n], peer, &rules, &mut batch),
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

    fn apply_receive_buffer(&self, socket: &UdpSocket, requested: usize) {
        match set_receive_buffer(socket, requested) {
            Ok(effective) => {
                debug!(listener = %self.label, requested, effective, "UDP receive buffer");
            }
            Err(e) => {
                warn!(listener = %self.label, requested, error = %e,
                    "cannot set the UDP receive buffer");
            }
        }
    }

    fn handle(
        &self,
        socket: &UdpSocket,
        datagram: &[u8],
        peer: SocketAddr,
        rules: &Rules,
        batch: &mut UdpBatch,
    ) {
        batch.received(datagram.len());
        let verdict = if datagram.len() > rules.max_datagram_size {
            Err(DropReason::Oversize)
        } else if rules.denies(peer) {
            Err(DropReason::DeniedPort)
        } else if !admits(&rules.allow, &rules.deny, peer.ip()) {
            Err(DropReason::Denied)
        } else if !self.limiter.allows(peer.ip())
            || (rules.rate_limited && is_server_port(peer.port()) && !SERVER_PORTS.allows(peer))
        {
            Err(DropReason::RateLimited)
        } else {
            // A full send buffer drops the reply rather than blocking every other
            // sender behind one slow path; UDP promises no more.
            socket
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(config: &UdpConfig) -> Rules {
        Rules::new(config, &OwnPorts::default())
    }

    fn peer(addr: &str) -> SocketAddr {
        addr.parse().expect("test address")
    }

    #[test]
    fn non_unicast_sources_are_denied_and_unicast_ones_are_not() {
        let rules = rules(&UdpConfig::default());
        for source in [
            "0.0.0.0:40000",
            "255.255.255.255:40000",
            "224.0.0.1:40000",
            "239.255.255.250:40000",
            "0.1.2.3:40000",
            "[::]:40000",
            "[ff02::1]:40000",
            "[::ffff:255.255.255.255]:40000",
            "[::ffff:224.0.0.1]:40000",
            "[::ffff:0.1.2.3]:40000",
        ] {
            assert!(rules.denies(peer(source)), "{source} must be denied");
        }
        for source in [
            "127.0.0.1:40000",
            "192.0.2.1:40000",
            "1.2.3.4:40000",
            "[::1]:40000",
            "[2001:db8::1]:40000",
            "[::ffff:192.0.2.1]:40000",
        ] {
            assert!(!rules.denies(peer(source)), "{source} must be answered");
        }
    }

    #[test]
    fn every_denied_port_is_denied_and_only_those() {
        let config = UdpConfig::default();
        let rules = rules(&config);
        for port in 0..=u16::MAX {
            let denied = rules.denies(SocketAddr::from(([192, 0, 2, 1], port)));
            assert_eq!(
                denied,
                config.deny_source_ports.contains(&port),
                "source port {port}"
            );
        }
        assert_eq!(
            config.deny_source_ports,
            crate::config::DEFAULT_DENY_SOURCE_PORTS
        );
    }

    #[test]
    fn own_ports_are_denied_unless_turned_off() {
        let own = Arc::new(OwnPorts::default());
        let _registered = own.register(40_000);
        let source = SocketAddr::from(([192, 0, 2, 1], 40_000));
        assert!(Rules::new(&UdpConfig::default(), &own).denies(source));
        let config = UdpConfig {
            deny_own_ports: false,
            ..UdpConfig::default()
        };
        assert!(!Rules::new(&config, &own).denies(source));
    }
}
