//! Which sockets are bound and running, and how a new config changes that.
//!
//! [`ListenerSet::reconcile`] binds every new socket *before* it stops or starts
//! anything, so a reload whose new address cannot be bound changes nothing. Sockets
//! the caller hands over ([`Sockets`]) are used instead of binding: under systemd socket
//! activation they replace the config's echo addresses; otherwise a provided socket is
//! adopted when the config lists its address (how tests run the daemon on port 0, and
//! how sockets come back from systemd's descriptor store).
//!
//! With a descriptor store ([`super::fdstore`]), every socket echod binds is also handed
//! to systemd once it serves, and taken out of the store when a reload removes it. The
//! set keeps a duplicate descriptor of every running socket for that.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::fdstore;
use super::handover::{HandedConnection, HandedListener, Handover};
use super::kind::ListenerKind;
use crate::config::Config;

/// The accept queue of the HTTP endpoint: probes and scrapes are few.
const HTTP_BACKLOG: u32 = 128;

/// A socket bound (or handed over) but not yet serving; the variant says its use, so a
/// stream socket can never be started as UDP.
#[derive(Debug)]
pub(crate) enum BoundSocket {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
    Http(std::net::TcpListener),
    Tls(std::net::TcpListener),
}

impl BoundSocket {
    pub(crate) fn kind(&self) -> ListenerKind {
        match self {
            Self::Tcp(_) => ListenerKind::Tcp,
            Self::Udp(_) => ListenerKind::Udp,
            Self::Http(_) => ListenerKind::Http,
            Self::Tls(_) => ListenerKind::Tls,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Tcp(l) | Self::Http(l) | Self::Tls(l) => l.local_addr(),
            Self::Udp(s) => s.local_addr(),
        }
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(l) | Self::Http(l) | Self::Tls(l) => l.as_fd(),
            Self::Udp(s) => s.as_fd(),
        }
    }

    fn bind(kind: ListenerKind, addr: SocketAddr, config: &Config) -> Result<Self, BindError> {
        let bound = match kind {
            ListenerKind::Tcp => super::tcp::bind(addr, config.tcp.backlog).map(Self::Tcp),
            ListenerKind::Http => super::tcp::bind(addr, HTTP_BACKLOG).map(Self::Http),
            ListenerKind::Tls => super::tcp::bind(addr, config.tcp.backlog).map(Self::Tls),
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
    provided: Vec<Provided>,
    /// Hand every socket echod binds to systemd's descriptor store.
    fd_store: bool,
    /// Open connections an earlier image of this process handed over.
    connections: Vec<HandedConnection>,
    /// When that image stopped accepting (monotonic microseconds).
    handover_stopped: Option<u64>,
}

/// One provided socket and how it may be used.
#[derive(Debug)]
struct Provided {
    socket: BoundSocket,
    /// The configured address it stands for; its own address when `None`.
    addr: Option<SocketAddr>,
    /// From socket activation: it serves whatever the config says.
    pinned: bool,
    /// Already in systemd's descriptor store under its name.
    stored: bool,
}

impl Provided {
    fn adopted(socket: BoundSocket) -> Self {
        Self {
            socket,
            addr: None,
            pinned: false,
            stored: false,
        }
    }
}

impl Sockets {
    /// No sockets: everything the config lists is bound by the daemon.
    pub fn new() -> Self {
        Self::default()
    }

    /// A TCP echo listener to use for the config address it is bound to.
    pub fn tcp(mut self, listener: std::net::TcpListener) -> Self {
        self.provided
            .push(Provided::adopted(BoundSocket::Tcp(listener)));
        self
    }

    /// A UDP echo socket to use for the config address it is bound to.
    pub fn udp(mut self, socket: std::net::UdpSocket) -> Self {
        self.provided
            .push(Provided::adopted(BoundSocket::Udp(socket)));
        self
    }

    /// An HTTP listener to use for the `metrics.listen` address it is bound to.
    pub fn http(mut self, listener: std::net::TcpListener) -> Self {
        self.provided
            .push(Provided::adopted(BoundSocket::Http(listener)));
        self
    }

    /// Sockets from systemd socket activation: they are the echo listeners whatever
    /// the config says (and the HTTP one too, when one was passed).
    pub(crate) fn activated(sockets: Vec<BoundSocket>) -> Self {
        let mut this = Self::default();
        for socket in sockets {
            this = this.pinned(socket, None);
        }
        this
    }

    /// A socket-activated socket that stands for `addr` (its own address when `None`).
    pub(crate) fn pinned(mut self, socket: BoundSocket, addr: Option<SocketAddr>) -> Self {
        self.provided.push(Provided {
            socket,
            addr,
            pinned: true,
            stored: false,
        });
        self
    }

    /// A socket from systemd's descriptor store (or an earlier image of this process),
    /// used when the config lists `addr`; `stored` says whether the store holds it.
    pub(crate) fn kept(mut self, socket: BoundSocket, addr: SocketAddr, stored: bool) -> Self {
        self.provided.push(Provided {
            socket,
            addr: Some(addr),
            pinned: false,
            stored,
        });
        self
    }

    /// Hands every socket echod binds to systemd's descriptor store (see [`fdstore`]).
    pub(crate) fn with_fd_store(mut self, enabled: bool) -> Self {
        self.fd_store = enabled;
        self
    }

    /// Everything an earlier image of this process handed over: its listeners, used as
    /// they were (socket-activated ones pinned, the others for their configured
    /// address), and its open connections.
    pub(crate) fn handed_over(mut self, handover: Handover) -> Self {
        self.handover_stopped = handover.stopped;
        for l in handover.listeners {
            let socket = match l.kind {
                ListenerKind::Tcp => BoundSocket::Tcp(std::net::TcpListener::from(l.fd)),
                ListenerKind::Http => BoundSocket::Http(std::net::TcpListener::from(l.fd)),
                ListenerKind::Tls => BoundSocket::Tls(std::net::TcpListener::from(l.fd)),
                ListenerKind::Udp => BoundSocket::Udp(std::net::UdpSocket::from(l.fd)),
            };
            self = if l.activated {
                self.pinned(socket, Some(l.addr))
            } else {
                self.kept(socket, l.addr, l.stored)
            };
        }
        self.connections.extend(handover.connections);
        self
    }

    /// When the image that handed over stopped accepting, if one did.
    pub(crate) fn handover_stopped(&self) -> Option<u64> {
        self.handover_stopped
    }

    /// The handed-over connections, taken out.
    pub(crate) fn take_connections(&mut self) -> Vec<HandedConnection> {
        std::mem::take(&mut self.connections)
    }
}

type Key = (ListenerKind, SocketAddr);

/// A running listener: how to stop it, the address it really has (port 0 resolved), a
/// duplicate of its descriptor (what the descriptor store gets) and whether systemd's
/// store holds it.
#[derive(Debug)]
struct Running {
    stop: CancellationToken,
    local: SocketAddr,
    fd: OwnedFd,
    stored: bool,
}

/// A provided socket not (yet) in use.
#[derive(Debug)]
struct Spare {
    socket: BoundSocket,
    stored: bool,
}

/// The sockets that are bound and running, keyed by kind and configured address.
#[derive(Debug, Default)]
pub(crate) struct ListenerSet {
    running: BTreeMap<Key, Running>,
    /// Provided sockets not (yet) in use, by the address they stand for.
    spare: BTreeMap<Key, Spare>,
    /// Listeners that come from socket activation and stay whatever the config says.
    pinned: BTreeSet<Key>,
    /// Hand the sockets echod binds to systemd's descriptor store.
    fd_store: bool,
}

impl ListenerSet {
    pub(crate) fn new(sockets: Sockets) -> Self {
        let mut set = Self {
            fd_store: sockets.fd_store,
            ..Self::default()
        };
        for provided in sockets.provided {
            let socket = provided.socket;
            match provided.addr.map_or_else(|| socket.local_addr(), Ok) {
                Ok(addr) => {
                    let key = (socket.kind(), addr);
                    if provided.pinned {
                        set.pinned.insert(key);
                    }
                    let stored = provided.stored;
                    if let Some(old) = set.spare.insert(key, Spare { socket, stored }) {
                        warn!(proto = key.0.proto(), %addr, "two provided sockets for one address: using the last");
                        drop(old);
                    }
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
        for kind in [
            ListenerKind::Tcp,
            ListenerKind::Udp,
            ListenerKind::Http,
            ListenerKind::Tls,
        ] {
            let pinned_kind = match kind {
                // systemd cannot pass a TLS socket (it is plain TCP to it).
                ListenerKind::Http | ListenerKind::Tls => {
                    self.pinned.iter().any(|(k, _)| *k == kind)
                }
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
    /// ones with `start`, which returns the token that stops a listener. `start` is also
    /// told whether something else keeps the socket open after echod lets go of it
    /// (systemd: socket activation or the descriptor store), so that a stop leaves its
    /// accept queue to the next echod. With a descriptor store, new sockets go into it
    /// and removed ones come out.
    pub(crate) fn reconcile(
        &mut self,
        config: &Config,
        mut start: impl FnMut(BoundSocket, String, bool) -> io::Result<CancellationToken>,
    ) -> Result<(), BindError> {
        let wanted = self.wanted(config);
        let mut added = Vec::new();
        for &key in &wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            let bound = match self.spare.remove(&key) {
                Some(spare) => Ok((spare.socket, Some(spare.stored))),
                None => BoundSocket::bind(key.0, key.1, config).map(|socket| (socket, None)),
            };
            let bound = bound.and_then(|(socket, provided)| {
                let fd = socket
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|source| BindError {
                        proto: key.0.proto(),
                        addr: key.1,
                        source,
                    })?;
                Ok((socket, provided, fd))
            });
            match bound {
                Ok(bound) => added.push((key, bound)),
                Err(e) => {
                    // Nothing changes: provided sockets go back, fresh ones close.
                    for (key, (socket, provided, _)) in added {
                        if let Some(stored) = provided {
                            self.spare.insert(key, Spare { socket, stored });
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
                if running.stored {
                    fdstore::remove(&fdstore::name(key.0, key.1));
                }
                info!(proto = key.0.proto(), addr = %running.local, "stopped listening");
            }
        }
        for (key, (bound, provided, fd)) in added {
            let local = bound.local_addr().unwrap_or(key.1);
            let pinned = self.pinned.contains(&key);
            let stored = provided.unwrap_or(false);
            match start(bound, key.1.to_string(), pinned || self.fd_store) {
                Ok(stop) => {
                    info!(proto = key.0.proto(), addr = %local, "listening");
                    let mut running = Running {
                        stop,
                        local,
                        fd,
                        stored,
                    };
                    if self.fd_store && !pinned && !stored {
                        running.stored = store(key, &running.fd);
                    }
                    self.running.insert(key, running);
                }
                Err(e) => {
                    warn!(proto = key.0.proto(), addr = %key.1, error = %e, "cannot serve socket");
                    if stored {
                        fdstore::remove(&fdstore::name(key.0, key.1));
                    }
                }
            }
        }
        for ((kind, addr), spare) in std::mem::take(&mut self.spare) {
            info!(proto = kind.proto(), %addr, "closing a provided socket the config does not list");
            if spare.stored {
                fdstore::remove(&fdstore::name(kind, addr));
            }
        }
        Ok(())
    }

    /// Stops every listener without closing its socket and returns the sockets (the
    /// duplicates the set keeps) for the next image of the process. Connections the
    /// kernel completes meanwhile wait in the accept queue.
    pub(crate) fn hand_over(&mut self) -> Vec<HandedListener> {
        std::mem::take(&mut self.running)
            .into_iter()
            .map(|(key, running)| {
                running.stop.cancel();
                HandedListener {
                    kind: key.0,
                    addr: key.1,
                    fd: running.fd,
                    activated: self.pinned.contains(&key),
                    stored: running.stored,
                }
            })
            .collect()
    }

    /// True when sockets go into systemd's descriptor store.
    pub(crate) fn fd_store(&self) -> bool {
        self.fd_store
    }

    /// Lets go of every listener's duplicate descriptor at the start of a drain, so that
    /// a socket nothing else keeps closes once its task ends, as it did before the set
    /// kept duplicates (systemd's copies, if any, stay).
    pub(crate) fn release(&mut self) {
        self.running.clear();
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

/// Hands a running socket to systemd's descriptor store; true when sent.
fn store(key: Key, fd: &OwnedFd) -> bool {
    match fdstore::store(&fdstore::name(key.0, key.1), fd.as_fd()) {
        Ok(()) => true,
        Err(e) => {
            warn!(proto = key.0.proto(), addr = %key.1, error = %e,
                "cannot keep the socket in systemd's descriptor store; a restart will refuse connections on it");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, UdpSocket};

    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn config(tcp: &[SocketAddr], udp: &[SocketAddr], http: &[SocketAddr]) -> Config {
        let mut config = Config::default();
        config.tcp.listen = tcp.to_vec();
        config.udp.listen = udp.to_vec();
        config.metrics.listen = http.to_vec();
        config
    }

    /// Runs reconcile with a `start` that records what it was given.
    fn reconcile(
        set: &mut ListenerSet,
        config: &Config,
    ) -> Result<Vec<(ListenerKind, String)>, BindError> {
        let mut started = Vec::new();
        set.reconcile(config, |bound, label, _| {
            started.push((bound.kind(), label));
            Ok(CancellationToken::new())
        })?;
        Ok(started)
    }

    fn running(set: &ListenerSet) -> Vec<Key> {
        set.running.keys().copied().collect()
    }

    #[test]
    fn provided_sockets_are_adopted_by_address_and_the_rest_is_bound() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (t, u) = (tcp.local_addr().unwrap(), udp.local_addr().unwrap());
        let mut set = ListenerSet::new(Sockets::new().tcp(tcp).udp(udp));
        let started = reconcile(&mut set, &config(&[t], &[u], &[addr("127.0.0.1:0")])).unwrap();
        assert_eq!(started.len(), 3);
        assert!(started.contains(&(ListenerKind::Tcp, t.to_string())));
        assert!(started.contains(&(ListenerKind::Udp, u.to_string())));
        // The HTTP socket was bound fresh: its real port is known, its key is the config's.
        let http = set.addresses(ListenerKind::Http);
        assert_eq!(http.len(), 1);
        assert_ne!(http[0].port(), 0);
        assert!(set.spare.is_empty());
    }

    #[test]
    fn reload_binds_new_first_and_a_failure_changes_nothing() {
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = first.local_addr().unwrap();
        let mut set = ListenerSet::new(Sockets::new().tcp(first));
        reconcile(&mut set, &config(&[a], &[], &[])).unwrap();
        // A port another socket holds cannot be bound: the reload fails as a whole.
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap();
        let started = std::cell::Cell::new(0);
        let before = running(&set);
        let err = set
            .reconcile(
                &config(&[busy, addr("127.0.0.1:0")], &[], &[]),
                |_, _, _| {
                    started.set(started.get() + 1);
                    Ok(CancellationToken::new())
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("already uses this port"), "{err}");
        assert_eq!(started.get(), 0, "nothing started on a failed reload");
        assert_eq!(running(&set), before, "nothing stopped on a failed reload");
        // A good reload stops the removed listener's token and starts the new one.
        let old_stop = set.running[&(ListenerKind::Tcp, a)].stop.clone();
        let started = reconcile(&mut set, &config(&[addr("127.0.0.1:0")], &[], &[])).unwrap();
        assert_eq!(
            started,
            vec![(ListenerKind::Tcp, "127.0.0.1:0".to_string())]
        );
        assert!(old_stop.is_cancelled());
        assert_eq!(
            running(&set),
            vec![(ListenerKind::Tcp, addr("127.0.0.1:0"))]
        );
    }

    #[test]
    fn activated_sockets_replace_the_config_echo_addresses_and_survive_reloads() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let t = tcp.local_addr().unwrap();
        let mut set = ListenerSet::new(Sockets::activated(vec![BoundSocket::Tcp(tcp)]));
        let defaults = Config::default();
        let started = reconcile(
            &mut set,
            &config(
                &defaults.tcp.listen,
                &defaults.udp.listen,
                &[addr("127.0.0.1:0")],
            ),
        )
        .unwrap();
        // systemd's TCP socket serves; the config's TCP and UDP addresses do not bind;
        // HTTP was not passed, so it follows the config.
        assert_eq!(started.len(), 2);
        assert!(started.contains(&(ListenerKind::Tcp, t.to_string())));
        assert!(started.contains(&(ListenerKind::Http, "127.0.0.1:0".to_string())));
        // A reload that drops every echo address leaves the activated socket alone.
        let started = reconcile(&mut set, &config(&[], &[], &[addr("127.0.0.1:0")])).unwrap();
        assert!(started.is_empty());
        assert_eq!(set.addresses(ListenerKind::Tcp), vec![t]);
    }

    #[test]
    fn an_activated_http_socket_replaces_metrics_listen() {
        let http = TcpListener::bind("127.0.0.1:0").unwrap();
        let h = http.local_addr().unwrap();
        let mut set = ListenerSet::new(Sockets::activated(vec![BoundSocket::Http(http)]));
        let started = reconcile(&mut set, &Config::default()).unwrap();
        assert_eq!(started, vec![(ListenerKind::Http, h.to_string())]);
        assert!(set.addresses(ListenerKind::Tcp).is_empty());
    }

    #[test]
    fn kept_sockets_stand_for_the_address_they_were_bound_for() {
        // A socket back from the descriptor store stands for the configured address its
        // name gives, which is not its own when the config said port 0.
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let own = tcp.local_addr().unwrap();
        let configured = addr("127.0.0.1:0");
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let u = udp.local_addr().unwrap();
        let mut set = ListenerSet::new(
            Sockets::new()
                .kept(BoundSocket::Tcp(tcp), configured, true)
                .kept(BoundSocket::Udp(udp), u, true),
        );
        // The config lists the TCP address only: the kept socket serves it (no fresh
        // bind), still marked as stored; the UDP socket is closed.
        let started = reconcile(&mut set, &config(&[configured], &[], &[])).unwrap();
        assert_eq!(started, vec![(ListenerKind::Tcp, configured.to_string())]);
        assert_eq!(set.addresses(ListenerKind::Tcp), vec![own]);
        assert!(set.running[&(ListenerKind::Tcp, configured)].stored);
        assert!(set.spare.is_empty());
        assert!(
            UdpSocket::bind(u).is_ok(),
            "the unlisted kept socket was closed"
        );
    }

    #[test]
    fn start_is_told_whether_systemd_keeps_the_socket() {
        let kept = |sockets: Sockets, config: &Config| {
            let mut set = ListenerSet::new(sockets);
            let mut seen = Vec::new();
            set.reconcile(config, |bound, _, kept| {
                seen.push((bound.kind(), kept));
                Ok(CancellationToken::new())
            })
            .unwrap();
            seen
        };
        let local = config(&[addr("127.0.0.1:0")], &[], &[]);
        assert_eq!(
            kept(Sockets::new(), &local),
            vec![(ListenerKind::Tcp, false)]
        );
        // With a descriptor store every socket is kept (storing is a no-op here: no
        // NOTIFY_SOCKET).
        assert_eq!(
            kept(Sockets::new().with_fd_store(true), &local),
            vec![(ListenerKind::Tcp, true)]
        );
        let activated = TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            kept(
                Sockets::activated(vec![BoundSocket::Tcp(activated)]),
                &config(&[], &[], &[])
            ),
            vec![(ListenerKind::Tcp, true)]
        );
    }

    #[test]
    fn provided_sockets_the_config_does_not_list_are_closed() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let t = tcp.local_addr().unwrap();
        let mut set = ListenerSet::new(Sockets::new().tcp(tcp));
        reconcile(&mut set, &config(&[], &[], &[])).unwrap();
        assert!(set.spare.is_empty());
        assert!(
            std::net::TcpStream::connect(t).is_err(),
            "the unlisted socket was closed"
        );
    }
}
