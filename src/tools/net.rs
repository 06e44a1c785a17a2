//! What the tools share about reaching an echo server: name resolution, the local side
//! of a UDP socket, the largest datagram, and the resend-on-silence UDP exchange.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::Duration;

/// UDP is lossy: the tools send a datagram this many times before they give up.
pub(crate) const UDP_ATTEMPTS: u32 = 3;

/// The largest UDP payload over IPv4 (65 535 − 8 UDP − 20 IP header bytes).
pub(crate) const MAX_DATAGRAM: usize = 65_507;

/// A target that did not resolve, in the words the user typed.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve {addr}: {reason}")]
pub(crate) struct ResolveError {
    addr: String,
    reason: String,
}

/// Every address `addr` (HOST:PORT) names; at least one.
pub(crate) fn resolve(addr: &str) -> Result<Vec<SocketAddr>, ResolveError> {
    let error = |reason: String| ResolveError {
        addr: addr.to_string(),
        reason,
    };
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| error(e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(error("no addresses".into()));
    }
    Ok(addrs)
}

/// The wildcard address of `target`'s family, port 0: where a client socket binds so
/// the kernel picks the route and the port.
pub(crate) fn any_local(target: SocketAddr) -> SocketAddr {
    if target.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    }
}

/// A UDP socket connected to `target`, so only its replies are received.
pub(crate) fn connected_udp(target: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(any_local(target))?;
    socket.connect(target)?;
    Ok(socket)
}

/// How a UDP exchange failed.
#[derive(Debug)]
pub(crate) enum UdpFailure {
    /// The port is closed (an ICMP port-unreachable came back).
    Refused(io::Error),
    /// No reply to any attempt.
    Silence,
    /// Sending or receiving failed otherwise.
    Io(&'static str, io::Error),
}

/// Sends `payload` on a connected socket and waits for a reply, resending up to
/// `attempts` times within `total`: UDP is lossy, and one lost datagram must not fail a
/// health check or a client line. Returns the reply's length in `reply`.
pub(crate) fn udp_exchange(
    socket: &UdpSocket,
    payload: &[u8],
    reply: &mut [u8],
    attempts: u32,
    total: Duration,
) -> Result<usize, UdpFailure> {
    let per_attempt = (total / attempts.max(1)).max(Duration::from_millis(1));
    socket
        .set_read_timeout(Some(per_attempt))
        .map_err(|e| UdpFailure::Io("cannot set a timeout", e))?;
    for _ in 0..attempts {
        socket.send(payload).map_err(|e| match e.kind() {
            io::ErrorKind::ConnectionRefused => UdpFailure::Refused(e),
            _ => UdpFailure::Io("cannot send", e),
        })?;
        match socket.recv(reply) {
            Ok(n) => return Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(UdpFailure::Refused(e));
            }
            Err(e) => return Err(UdpFailure::Io("cannot receive", e)),
        }
    }
    Err(UdpFailure::Silence)
}
