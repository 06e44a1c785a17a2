//! Which sockets are bound and running, and how a new config changes that.
//!
//! [`ListenerSet::reconcile`] binds every new socket *before* it stops or starts
//! anything, so a reload whose new address cannot be bound changes nothing. Sockets
//! the caller hands over ([`Sockets`]) are used instead of binding: under systemd socket
//! activation they replace the config's echo addresses; otherwise a provided socket is
//! adopted when the config lists its address (how tests run the daemon on port 0, and
//! how sockets come back from systemd's descriptor store).
//!
//! When the host keeps sockets (systemd's descriptor store, through [`Host`]), every
//! socket echod binds is also handed to it once it serves, and taken back out when a
//! reload removes it. The set keeps a duplicate descriptor of every running socket for
//! that, and for an upgrade's handover.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::host::Host;
use super::kind::{ListenerKey, ListenerKind, SocketOrigin};
use super::upgrade::handover::HandedListener;
use crate::config::Config;

/// The accept queue of the HTTP endpoint. Probes and scrapes are few, but an attacker
/// that reconnects the moment it is evicted keeps the queue full: once it holds more
/// connections than the queue and the endpoint's 64 places, a probe's SYN is dropped
/// (and retried only after 1 s). 1024 waiting connections cost the kernel little.
const HTTP_BACKLOG: u32 = 1024;

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

/// What happens to the connections waiting in a listener's accept queue when echod
/// stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backlog {
    /// systemd keeps the socket open (socket activation, descriptor store): they wait
    /// for the next echod.
    Kept,
    /// Nothing keeps the socket: they are refused gently (EOF, counted).
    Refused,
}

/// Sockets the caller binds (or inherits) and hands to [`super::serve`].
#[derive(Debug, Default)]
pub struct Sockets {
    provided: Vec<Provided>,
}

/// One provided socket and how it may be used.
#[derive(Debug)]
struct Provided {
    socket: BoundSocket,
    /// The configured address it stands for; its own address when `None`.
    addr: Option<SocketAddr>,
    origin: SocketOrigin,
}

impl Provided {
    fn adopted(socket: BoundSocket) -> Self {
        Self {
            socket,
            addr: None,
            origin: SocketOrigin::Bound,
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
            this = this.provided(socket, None, SocketOrigin::Activated);
        }
        this
    }

    /// A socket of `origin` that stands for the configured address `addr` (its own
    /// address when `None`): socket-activated ones whatever the config says, the others
    /// when the config lists `addr`.
    pub(crate) fn provided(
        mut self,
        socket: BoundSocket,
        addr: Option<SocketAddr>,
        origin: SocketOrigin,
    ) -> Self {
        self.provided.push(Provided {
            socket,
            addr,
            origin,
        });
        self
    }

    /// The listeners an earlier image of this process handed over, used as they were.
    pub(crate) fn handed_over(mut self, listeners: Vec<HandedListener>) -> Self {
        for l in listeners {
            let socket = match l.kind {
                ListenerKind::Tcp => BoundSocket::Tcp(std::net::TcpListener::from(l.fd)),
                ListenerKind::Http => BoundSocket::Http(std::net::TcpListener::from(l.fd)),
                ListenerKind::Tls => BoundSocket::Tls(std::net::TcpListener::from(l.fd)),
                ListenerKind::Udp => BoundSocket::Udp(std::net::UdpSocket::from(l.fd)),
            };
            self = self.provided(socket, Some(l.addr), l.origin);
        }
        self
    }
}

/// The listeners `config` asks for beside the `activated` ones, which stand in for the
/// config's addresses of their kind (HTTP follows the config unless systemd passed an
/// HTTP socket too).
fn wanted(activated: &BTreeSet<ListenerKey>, config: &Config) -> BTreeSet<ListenerKey> {
    let mut wanted = activated.clone();
    for kind in [
        ListenerKind::Tcp,
        ListenerKind::Udp,
        ListenerKind::Http,
        ListenerKind::Tls,
    ] {
        let activated_kind = match kind {
            // systemd cannot pass a TLS socket (it is plain TCP to it).
            ListenerKind::Http | ListenerKind::Tls => activated.iter().any(|(k, _)| *k == kind),
            _ => !activated.is_empty(),
        };
        if !activated_kind {
            wanted.extend(kind.configured(config).iter().map(|&a| (kind, a)));
        }
    }
    wanted
}

/// Binds (and closes at once) every listener `config` asks for that `present` (the
/// listeners an upgrade would hand over) does not hold: how a new binary checks,
/// before it is exec'd, that it can serve the configuration it will load.
pub(crate) fn dry_run(
    config: &Config,
    present: &[(ListenerKind, SocketAddr, SocketOrigin)],
) -> Result<(), BindError> {
    let activated: BTreeSet<ListenerKey> = present
        .iter()
        .filter(|(_, _, origin)| *origin == SocketOrigin::Activated)
        .map(|&(kind, addr, _)| (kind, addr))
        .collect();
    let held: BTreeSet<ListenerKey> = present
        .iter()
        .map(|&(kind, addr, _)| (kind, addr))
        .collect();
    for key in wanted(&activated, config) {
        if !held.contains(&key) {
            drop(BoundSocket::bind(key.0, key.1, config)?);
        }
    }
    Ok(())
}

/// A running listener: how to stop it, the address it really has (port 0 resolved), a
/// duplicate of its descriptor (what the descriptor store and a handover get) and
/// where it came from.
#[derive(Debug)]
struct Running {
    stop: CancellationToken,
    local: SocketAddr,
    fd: OwnedFd,
    origin: SocketOrigin,
}

/// A provided socket not (yet) in use.
#[derive(Debug)]
struct Spare {
    socket: BoundSocket,
    origin: SocketOrigin,
}

/// The sockets that are bound and running, keyed by kind and configured address.
pub(crate) struct ListenerSet {
    running: BTreeMap<ListenerKey, Running>,
    /// Provided sockets not (yet) in use, by the address they stand for.
    spare: BTreeMap<ListenerKey, Spare>,
    /// Listeners that come from socket activation and stay whatever the config says.
    activated: BTreeSet<ListenerKey>,
    /// Keeps the sockets echod binds, when it can.
    host: Arc<dyn Host>,
}

impl ListenerSet {
    pub(crate) fn new(sockets: Sockets, host: Arc<dyn Host>) -> Self {
        let mut set = Self {
            running: BTreeMap::new(),
            spare: BTreeMap::new(),
            activated: BTreeSet::new(),
            host,
        };
        for provided in sockets.provided {
            let socket = provided.socket;
            match provided.addr.map_or_else(|| socket.local_addr(), Ok) {
                Ok(addr) => {
                    let key = (socket.kind(), addr);
                    let origin = provided.origin;
                    if origin == SocketOrigin::Activated {
                        set.activated.insert(key);
                    }
                    if let Some(old) = set.spare.insert(key, Spare { socket, origin }) {
                        warn!(proto = key.0.proto(), %addr, "two provided sockets for one address: using the last");
                        drop(old);
                    }
                }
                Err(e) => warn!(error = %e, "ignoring a provided socket without an address"),
            }
        }
        set
    }

    /// The listeners `config` asks for. Socket-activated sockets stand in for the
    /// config's addresses of their kind; HTTP follows the config unless systemd passed
    /// an HTTP socket too.
    fn wanted(&self, config: &Config) -> BTreeSet<ListenerKey> {
        wanted(&self.activated, config)
    }

    /// Every running listener's kind, configured address, origin and descriptor: what a
    /// handover would describe, for the new binary's check.
    pub(crate) fn running(&self) -> Vec<(ListenerKind, SocketAddr, SocketOrigin, RawFd)> {
        self.running
            .iter()
            .map(|(&(kind, addr), r)| (kind, addr, r.origin, r.fd.as_raw_fd()))
            .collect()
    }

    /// Brings the running set to what `config` asks for: binds every new socket first
    /// (on error nothing has changed), then stops the removed ones and starts the new
    /// ones with `start`, which returns the token that stops a listener. `start` is also
    /// told what becomes of the accept queue at a stop ([`Backlog`]). When the host keeps
    /// sockets, new ones go to it and removed ones come back out.
    pub(crate) fn reconcile(
        &mut self,
        config: &Config,
        mut start: impl FnMut(BoundSocket, String, Backlog) -> io::Result<CancellationToken>,
    ) -> Result<(), BindError> {
        let wanted = self.wanted(config);
        let mut added = Vec::new();
        for &key in &wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            let bound = match self.spare.remove(&key) {
                Some(spare) => Ok((spare.socket, Some(spare.origin))),
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
                        if let Some(origin) = provided {
                            self.spare.insert(key, Spare { socket, origin });
                        }
                    }
                    return Err(e);
                }
            }
        }
        let removed: Vec<ListenerKey> = self
            .running
            .keys()
            .filter(|key| !wanted.contains(key))
            .copied()
            .collect();
        for key in removed {
            if let Some(running) = self.running.remove(&key) {
                running.stop.cancel();
                if running.origin == SocketOrigin::Stored {
                    self.host.release_socket(key);
                }
                info!(proto = key.0.proto(), addr = %running.local, "stopped listening");
            }
        }
        for (key, (bound, provided, fd)) in added {
            let local = bound.local_addr().unwrap_or(key.1);
            let origin = provided.unwrap_or(SocketOrigin::Bound);
            let backlog = if origin == SocketOrigin::Activated || self.host.keeps_sockets() {
                Backlog::Kept
            } else {
                Backlog::Refused
            };
            match start(bound, key.1.to_string(), backlog) {
                Ok(stop) => {
                    info!(proto = key.0.proto(), addr = %local, "listening");
                    let mut running = Running {
                        stop,
                        local,
                        fd,
                        origin,
                    };
                    if self.host.keeps_sockets() && origin == SocketOrigin::Bound {
                        running.origin = self.keep(key, &running.fd);
                    }
                    self.running.insert(key, running);
                }
                Err(e) => {
                    warn!(proto = key.0.proto(), addr = %key.1, error = %e, "cannot serve socket");
                    if origin == SocketOrigin::Stored {
                        self.host.release_socket(key);
                    }
                }
            }
        }
        for ((kind, addr), spare) in std::mem::take(&mut self.spare) {
            info!(proto = kind.proto(), %addr, "closing a provided socket the config does not list");
            if spare.origin == SocketOrigin::Stored {
                self.host.release_socket((kind, addr));
            }
        }
        Ok(())
    }

    /// Makes `config` list exactly the provided sockets (an upgrade's handed-over
    /// listeners) for each kind, so that the next reconcile binds nothing new.
    pub(crate) fn serve_only_provided(&self, config: &mut Config) {
        let provided = |kind: ListenerKind| -> Vec<SocketAddr> {
            self.spare
                .keys()
                .chain(self.running.keys())
                .filter(|(k, _)| *k == kind)
                .map(|(_, addr)| *addr)
                .collect()
        };
        config.tcp.listen = provided(ListenerKind::Tcp);
        config.udp.listen = provided(ListenerKind::Udp);
        config.metrics.listen = provided(ListenerKind::Http);
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
                    origin: running.origin,
                }
            })
            .collect()
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

impl ListenerSet {
    /// Hands a running socket to the host to keep; its origin from now on.
    fn keep(&self, key: ListenerKey, fd: &OwnedFd) -> SocketOrigin {
        match self.host.keep_socket(key, fd.as_fd()) {
            Ok(()) => SocketOrigin::Stored,
            Err(e) => {
                warn!(proto = key.0.proto(), addr = %key.1, error = %e,
                    "cannot keep the socket in systemd's descriptor store; a restart will refuse connections on it");
                SocketOrigin::Bound
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, UdpSocket};

    use super::*;
    use crate::daemon::host::Detached;
    use crate::daemon::host::recording::{Event, Recording};

    /// A set of `sockets` with no process around it.
    fn detached(sockets: Sockets) -> ListenerSet {
        ListenerSet::new(sockets, Arc::new(Detached))
    }

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

    fn running(set: &ListenerSet) -> Vec<ListenerKey> {
        set.running.keys().copied().collect()
    }

    #[test]
    fn provided_sockets_are_adopted_by_address_and_the_rest_is_bound() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (t, u) = (tcp.local_addr().unwrap(), udp.local_addr().unwrap());
        let mut set = detached(Sockets::new().tcp(tcp).udp(udp));
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
        let mut set = detached(Sockets::new().tcp(first));
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
        let mut set = detached(Sockets::activated(vec![BoundSocket::Tcp(tcp)]));
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
        let mut set = detached(Sockets::activated(vec![BoundSocket::Http(http)]));
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
        let mut set = detached(
            Sockets::new()
                .provided(
                    BoundSocket::Tcp(tcp),
                    Some(configured),
                    SocketOrigin::Stored,
                )
                .provided(BoundSocket::Udp(udp), Some(u), SocketOrigin::Stored),
        );
        // The config lists the TCP address only: the kept socket serves it (no fresh
        // bind), still marked as stored; the UDP socket is closed.
        let started = reconcile(&mut set, &config(&[configured], &[], &[])).unwrap();
        assert_eq!(started, vec![(ListenerKind::Tcp, configured.to_string())]);
        assert_eq!(set.addresses(ListenerKind::Tcp), vec![own]);
        assert_eq!(
            set.running[&(ListenerKind::Tcp, configured)].origin,
            SocketOrigin::Stored
        );
        assert!(set.spare.is_empty());
        assert!(
            UdpSocket::bind(u).is_ok(),
            "the unlisted kept socket was closed"
        );
    }

    #[test]
    fn start_is_told_whether_systemd_keeps_the_socket() {
        let kept = |set: &mut ListenerSet, config: &Config| {
            let mut seen = Vec::new();
            set.reconcile(config, |bound, _, backlog| {
                seen.push((bound.kind(), backlog));
                Ok(CancellationToken::new())
            })
            .unwrap();
            seen
        };
        let local = config(&[addr("127.0.0.1:0")], &[], &[]);
        assert_eq!(
            kept(&mut detached(Sockets::new()), &local),
            vec![(ListenerKind::Tcp, Backlog::Refused)]
        );
        // With a descriptor store every socket is kept.
        let mut stored = ListenerSet::new(Sockets::new(), Arc::new(Recording::with_store(None)));
        assert_eq!(
            kept(&mut stored, &local),
            vec![(ListenerKind::Tcp, Backlog::Kept)]
        );
        let activated = TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            kept(
                &mut detached(Sockets::activated(vec![BoundSocket::Tcp(activated)])),
                &config(&[], &[], &[])
            ),
            vec![(ListenerKind::Tcp, Backlog::Kept)]
        );
    }

    /// The descriptor store sees every socket echod binds once, never one it already
    /// holds, and a reload that removes a listener takes it back out — also one whose
    /// socket came back from the store.
    #[test]
    fn the_host_keeps_what_echod_binds_and_releases_what_a_reload_removes() {
        let host = Arc::new(Recording::with_store(None));
        let from_store = TcpListener::bind("127.0.0.1:0").unwrap();
        let stored_addr = from_store.local_addr().unwrap();
        let sockets = Sockets::new().provided(
            BoundSocket::Tcp(from_store),
            Some(stored_addr),
            SocketOrigin::Stored,
        );
        let mut set = ListenerSet::new(sockets, Arc::clone(&host) as Arc<dyn Host>);
        let fresh = addr("127.0.0.1:0");
        reconcile(&mut set, &config(&[stored_addr, fresh], &[], &[])).unwrap();
        assert_eq!(host.events(), vec![Event::Keep(ListenerKind::Tcp, fresh)]);
        reconcile(&mut set, &config(&[], &[], &[])).unwrap();
        let mut released = host.events().split_off(1);
        released.sort_by_key(|e| format!("{e:?}"));
        let mut want = vec![
            Event::Release(ListenerKind::Tcp, stored_addr),
            Event::Release(ListenerKind::Tcp, fresh),
        ];
        want.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(released, want);
    }

    #[test]
    fn provided_sockets_the_config_does_not_list_are_closed() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let t = tcp.local_addr().unwrap();
        let mut set = detached(Sockets::new().tcp(tcp));
        reconcile(&mut set, &config(&[], &[], &[])).unwrap();
        assert!(set.spare.is_empty());
        assert!(
            std::net::TcpStream::connect(t).is_err(),
            "the unlisted socket was closed"
        );
    }
}
