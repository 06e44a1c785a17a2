//! Which sockets are bound and running, and how a new config changes that.
//!
//! [`ListenerSet::reconcile`] binds every new socket *before* it stops or starts
//! anything, so a reload whose new address cannot be bound changes nothing. Sockets
//! the caller hands over ([`Sockets`]) are used instead of binding: under systemd socket
//! activation they replace the config's echo addresses; otherwise a provided socket is
//! adopted when the config lists its address (how tests run the daemon on port 0).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;

/// The accept queue of the HTTP endpoint: probes and scrapes are few.
const HTTP_BACKLOG: u32 = 128;

/// What a listening socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum ListenerKind {
    Tcp,
    Udp,
    Http,
}

impl ListenerKind {
    pub(crate) fn proto(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Http => "HTTP",
        }
    }

    fn configured(self, config: &Config) -> &[SocketAddr] {
        match self {
            Self::Tcp => &config.tcp.listen,
            Self::Udp => &config.udp.listen,
            Self::Http => &config.metrics.listen,
        }
    }
}

/// A socket bound (or handed over) but not yet serving; the variant says its use, so a
/// stream socket can never be started as UDP.
#[derive(Debug)]
pub(crate) enum BoundSocket {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
    Http(std::net::TcpListener),
}

impl BoundSocket {
    pub(crate) fn kind(&self) -> ListenerKind {
        match self {
            Self::Tcp(_) => ListenerKind::Tcp,
            Self::Udp(_) => ListenerKind::Udp,
            Self::Http(_) => ListenerKind::Http,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Tcp(l) | Self::Http(l) => l.local_addr(),
            Self::Udp(s) => s.local_addr(),
        }
    }

    fn bind(kind: ListenerKind, addr: SocketAddr, config: &Config) -> Result<Self, BindError> {
        let bound = match kind {
            ListenerKind::Tcp => super::tcp::bind(addr, config.tcp.backlog).map(Self::Tcp),
            ListenerKind::Http => super::tcp::bind(addr, HTTP_BACKLOG).map(Self::Http),
            ListenerKind::Udp => super::udp::bind(addr).map(Self::Udp),
        };
        bound.map_err(|source| BindError {
            proto: kind.proto(),
            addr,
            source,
        })
    }
}

/// A listener that could not be set up, with a hint at the usual cause.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {proto} {addr}: {source}{}", hint(source))]
pub struct BindError {
    proto: &'static str,
    addr: SocketAddr,
    source: io::Error,
}

fn hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::AddrInUse => {
            " (another process already uses this port — is echod already running?)"
        }
        io::ErrorKind::PermissionDenied => {
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE, or use systemd socket activation)"
        }
        io::ErrorKind::AddrNotAvailable => " (no local interface has this address)",
        _ => "",
    }
}

/// Sockets the caller binds (or inherits) and hands to [`super::serve`].
#[derive(Debug, Default)]
pub struct Sockets {
    provided: Vec<BoundSocket>,
    activated: bool,
}

impl Sockets {
    /// No sockets: everything the config lists is bound by the daemon.
    pub fn new() -> Self {
        Self::default()
    }

    /// A TCP echo listener to use for the config address it is bound to.
    pub fn tcp(mut self, listener: std::net::TcpListener) -> Self {
        self.provided.push(BoundSocket::Tcp(listener));
        self
    }

    /// A UDP echo socket to use for the config address it is bound to.
    pub fn udp(mut self, socket: std::net::UdpSocket) -> Self {
        self.provided.push(BoundSocket::Udp(socket));
        self
    }

    /// An HTTP listener to use for the `metrics.listen` address it is bound to.
    pub fn http(mut self, listener: std::net::TcpListener) -> Self {
        self.provided.push(BoundSocket::Http(listener));
        self
    }

    /// Sockets from systemd socket activation: they are the echo listeners whatever
    /// the config says (and the HTTP one too, when one was passed).
    pub(crate) fn activated(sockets: Vec<BoundSocket>) -> Self {
        Self {
            activated: !sockets.is_empty(),
            provided: sockets,
        }
    }
}

type Key = (ListenerKind, SocketAddr);

/// A running listener: how to stop it, and the address it really has (port 0 resolved).
#[derive(Debug)]
struct Running {
    stop: CancellationToken,
    local: SocketAddr,
}

/// The sockets that are bound and running, keyed by kind and configured address.
#[derive(Debug, Default)]
pub(crate) struct ListenerSet {
    running: BTreeMap<Key, Running>,
    /// Provided sockets not (yet) in use, by their address.
    spare: BTreeMap<Key, BoundSocket>,
    /// Listeners that come from socket activation and stay whatever the config says.
    pinned: BTreeSet<Key>,
}

impl ListenerSet {
    pub(crate) fn new(sockets: Sockets) -> Self {
        let mut set = Self::default();
        for socket in sockets.provided {
            match socket.local_addr() {
                Ok(addr) => {
                    let key = (socket.kind(), addr);
                    if sockets.activated {
                        set.pinned.insert(key);
                    }
                    set.spare.insert(key, socket);
                }
                Err(e) => warn!(error = %e, "ignoring a provided socket without an address"),
            }
        }
        set
    }

    /// The listeners `config` asks for. Pinned (socket-activated) sockets stand in for
    /// the config's addresses of their kind; HTTP follows the config unless systemd
    /// passed an HTTP socket too.
    fn wanted(&self, config: &Config) -> BTreeSet<Key> {
        let mut wanted = self.pinned.clone();
        for kind in [ListenerKind::Tcp, ListenerKind::Udp, ListenerKind::Http] {
            let pinned_kind = match kind {
                ListenerKind::Http => self.pinned.iter().any(|(k, _)| *k == kind),
                _ => !self.pinned.is_empty(),
            };
            if !pinned_kind {
                wanted.extend(kind.configured(config).iter().map(|&a| (kind, a)));
            }
        }
        wanted
    }

    /// Brings the running set to what `config` asks for: binds every new socket first
    /// (on error nothing has changed), then stops the removed ones and starts the new
    /// ones with `start`, which returns the token that stops a listener.
    pub(crate) fn reconcile(
        &mut self,
        config: &Config,
        mut start: impl FnMut(BoundSocket, String) -> io::Result<CancellationToken>,
    ) -> Result<(), BindError> {
        let wanted = self.wanted(config);
        let mut added = Vec::new();
        for &key in &wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            let bound = match self.spare.remove(&key) {
                Some(socket) => Ok((socket, true)),
                None => BoundSocket::bind(key.0, key.1, config).map(|socket| (socket, false)),
            };
            match bound {
                Ok(bound) => added.push((key, bound)),
                Err(e) => {
                    // Nothing changes: provided sockets go back, fresh ones close.
                    for (key, (socket, provided)) in added {
                        if provided {
                            self.spare.insert(key, socket);
                        }
                    }
                    return Err(e);
                }
            }
        }
        let removed: Vec<Key> = self
            .running
            .keys()
            .filter(|key| !wanted.contains(key))
            .copied()
            .collect();
        for key in removed {
            if let Some(running) = self.running.remove(&key) {
                running.stop.cancel();
                info!(proto = key.0.proto(), addr = %running.local, "stopped listening");
            }
        }
        for (key, (bound, _)) in added {
            let local = bound.local_addr().unwrap_or(key.1);
            match start(bound, key.1.to_string()) {
                Ok(stop) => {
                    info!(proto = key.0.proto(), addr = %local, "listening");
                    self.running.insert(key, Running { stop, local });
                }
                Err(e) => {
                    warn!(proto = key.0.proto(), addr = %key.1, error = %e, "cannot serve socket");
                }
            }
        }
        for (kind, addr) in std::mem::take(&mut self.spare).into_keys() {
            info!(proto = kind.proto(), %addr, "closing a provided socket the config does not list");
        }
        Ok(())
    }

    /// The addresses listeners of `kind` really have, for the status line.
    pub(crate) fn addresses(&self, kind: ListenerKind) -> Vec<SocketAddr> {
        self.running
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, r)| r.local)
            .collect()
    }
}
