//! The server: binds every listener, runs them, and owns the daemon's lifecycle —
//! ready, reload, drain, exit.
//!
//! Data flows one way: the [`Config`] becomes listeners, listeners spawn connection
//! handlers, handlers count into [`Metrics`]. Reload and shutdown flow down the same
//! path as messages (a `watch` of the new settings, a [`Shutdown`] broadcast); nothing
//! below reaches back up for state.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigSource, TcpConfig, UdpConfig};
use crate::http::{self, Health};
use crate::limits::{ConnectionLimiter, RateLimiter};
use crate::logging::LogHandle;
use crate::metrics::Metrics;
use crate::shutdown::{Request, Shutdown, Signals};
use crate::systemd::{self, InheritedSocket};
use crate::{tcp, udp};

/// A listener that could not be set up, with a hint at the usual cause.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {proto} {addr}: {source}{}", hint(source))]
pub struct BindError {
    /// "TCP", "UDP" or "HTTP".
    pub proto: &'static str,
    /// The address asked for.
    pub addr: SocketAddr,
    /// What the kernel said.
    pub source: io::Error,
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

/// Shortens a multi-line error (TOML errors quote the offending line with a caret) to
/// its first and last lines: a newline inside `STATUS=` would end the status and be
/// read by systemd as a key of its own.
fn one_line(error: &str) -> String {
    let mut lines = error.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    match lines.next_back() {
        Some(last) if last != first => format!("{first}: {last}"),
        _ => first.to_string(),
    }
}

/// Which kind of endpoint a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Tcp,
    Udp,
    Http,
}

impl Kind {
    fn proto(self) -> &'static str {
        match self {
            Kind::Tcp => "TCP",
            Kind::Udp => "UDP",
            Kind::Http => "HTTP",
        }
    }
}

/// A socket bound (or inherited) but not yet serving.
enum Bound {
    Stream(std::net::TcpListener),
    Datagram(std::net::UdpSocket),
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    /// Sockets passed by systemd were unusable.
    #[error("cannot use the sockets passed by systemd (LISTEN_FDS): {0}")]
    Inherited(io::Error),
}

/// What a finished run reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Connections that finished on their own during the drain.
    pub drained: usize,
    /// Connections closed when the drain timeout expired.
    pub cut: usize,
}

/// The running daemon.
pub struct Server {
    source: ConfigSource,
    config: Config,
    log: LogHandle,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: Shutdown,
    limiter: Arc<ConnectionLimiter>,
    rate_limiter: Arc<RateLimiter>,
    tcp_config: watch::Sender<Arc<TcpConfig>>,
    udp_config: watch::Sender<Arc<UdpConfig>>,
    connections: TaskTracker,
    /// Each running listener's stop token and bound address, by kind and configured address.
    listeners: BTreeMap<(Kind, SocketAddr), (CancellationToken, SocketAddr)>,
    /// HTTP stops last, so `/healthz` answers until the process exits.
    http_stop: CancellationToken,
    /// True when systemd handed the echo sockets over; reload then leaves them alone.
    socket_activated: bool,
    last_reload_error: Option<String>,
}

/// Runs the daemon until a stop signal has been handled and connections are drained.
pub async fn run(
    source: ConfigSource,
    config: Config,
    log: LogHandle,
) -> Result<Summary, ServeError> {
    // Signals first: a stop that arrives while binding must not be lost.
    let mut signals = Signals::install().map_err(ServeError::Signals)?;
    let inherited = systemd::inherited_sockets().map_err(ServeError::Inherited)?;
    check_open_files_limit(config.tcp.max_connections);
    let mut server = Server::new(source, config, log);
    server.start(inherited)?;
    let signal = server.serve_until_stop(&mut signals).await;
    Ok(server.drain(signal).await)
}

/// Descriptors echod needs besides one per connection (listeners, HTTP, runtime).
const RESERVED_FDS: u64 = 128;

fn check_open_files_limit(max_connections: usize) {
    match crate::limits::raise_open_files_limit() {
        Ok(limit) if limit < max_connections as u64 + RESERVED_FDS => warn!(
            limit,
            max_connections,
            "open-files limit is below tcp.max_connections; accept will fail with EMFILE \
             before the connection limit is reached (raise LimitNOFILE / ulimit -n)"
        ),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read or raise the open-files limit"),
    }
}

impl Server {
    fn new(source: ConfigSource, config: Config, log: LogHandle) -> Self {
        let metrics = Metrics::new();
        metrics.set_limits(&config);
        Self {
            limiter: ConnectionLimiter::new(&config.tcp),
            rate_limiter: RateLimiter::new(&config.udp.rate_limit),
            tcp_config: watch::Sender::new(Arc::new(config.tcp.clone())),
            udp_config: watch::Sender::new(Arc::new(config.udp.clone())),
            source,
            config,
            log,
            metrics: Arc::new(metrics),
            health: Arc::new(Health::default()),
            shutdown: Shutdown::new(),
            connections: TaskTracker::new(),
            listeners: BTreeMap::new(),
            http_stop: CancellationToken::new(),
            socket_activated: false,
            last_reload_error: None,
        }
    }

    /// Binds (or adopts) every listener, then starts them all and announces readiness.
    fn start(&mut self, inherited: Vec<InheritedSocket>) -> Result<(), BindError> {
        self.socket_activated = !inherited.is_empty();
        for socket in inherited {
            let kind = match (socket.stream, socket.name.as_str()) {
                (true, "metrics" | "http") => Kind::Http,
                (true, _) => Kind::Tcp,
                (false, _) => Kind::Udp,
            };
            info!(name = %socket.name, proto = kind.proto(), addr = %socket.addr,
                "using socket passed by systemd");
            let b = if socket.stream {
                Bound::Stream(socket.socket.into())
            } else {
                Bound::Datagram(socket.socket.into())
            };
            self.spawn_listener(kind, socket.addr, b);
        }
        // Only after the inherited sockets are registered does `wanted` know whether
        // systemd passed the HTTP endpoint too (then the config's is not bound).
        let mut bound = Vec::new();
        for (kind, addr) in self.wanted(&self.config) {
            if !self.listeners.contains_key(&(kind, addr)) {
                bound.push((kind, addr, self.bind(kind, addr)?));
            }
        }
        for (kind, addr, b) in bound {
            self.spawn_listener(kind, addr, b);
        }
        self.health.set_ready(true);
        self.metrics.ready.set(1);
        let status = self.status_line();
        systemd::ready(&status);
        info!(version = crate::metrics::VERSION, "echod ready: {status}");
        Ok(())
    }

    /// The listeners a config asks for. Under socket activation the echo sockets come
    /// from systemd, so only the HTTP endpoint follows the config.
    fn wanted(&self, config: &Config) -> Vec<(Kind, SocketAddr)> {
        let mut wanted = Vec::new();
        if self.socket_activated {
            wanted.extend(
                self.listeners
                    .keys()
                    .filter(|(k, _)| *k != Kind::Http)
                    .copied(),
            );
        } else {
            wanted.extend(config.tcp.listen.iter().map(|a| (Kind::Tcp, *a)));
            wanted.extend(config.udp.listen.iter().map(|a| (Kind::Udp, *a)));
        }
        let inherited_http =
            self.socket_activated && self.listeners.keys().any(|(k, _)| *k == Kind::Http);
        if !inherited_http {
            wanted.extend(config.metrics.listen.iter().map(|a| (Kind::Http, *a)));
        }
        wanted
    }

    fn bind(&self, kind: Kind, addr: SocketAddr) -> Result<Bound, BindError> {
        let result = match kind {
            Kind::Tcp => tcp::bind(addr, self.config.tcp.backlog).map(Bound::Stream),
            Kind::Http => tcp::bind(addr, 128).map(Bound::Stream),
            Kind::Udp => udp::bind(addr).map(Bound::Datagram),
        };
        result.map_err(|source| BindError {
            proto: kind.proto(),
            addr,
            source,
        })
    }

    fn spawn_listener(&mut self, kind: Kind, addr: SocketAddr, bound: Bound) {
        let stop = match kind {
            Kind::Http => self.http_stop.child_token(),
            Kind::Tcp | Kind::Udp => self.shutdown.listener_token(),
        };
        let name = addr.to_string();
        let local = match &bound {
            Bound::Stream(l) => l.local_addr(),
            Bound::Datagram(s) => s.local_addr(),
        }
        .unwrap_or(addr);
        let spawned = match (kind, bound) {
            (Kind::Tcp, Bound::Stream(l)) => tokio::net::TcpListener::from_std(l).map(|listener| {
                let metrics = Arc::new(self.metrics.tcp_listener(&name));
                tokio::spawn(
                    tcp::Listener {
                        listener,
                        name,
                        config: self.tcp_config.subscribe(),
                        limiter: Arc::clone(&self.limiter),
                        metrics,
                        shutdown: self.shutdown.clone(),
                        stop: stop.clone(),
                        connections: self.connections.clone(),
                    }
                    .run(),
                );
            }),
            (Kind::Http, Bound::Stream(l)) => {
                tokio::net::TcpListener::from_std(l).map(|listener| {
                    let state = Arc::new(http::State {
                        metrics: Arc::clone(&self.metrics),
                        health: Arc::clone(&self.health),
                    });
                    tokio::spawn(http::serve(listener, state, stop.clone()));
                })
            }
            (Kind::Udp, Bound::Datagram(s)) => tokio::net::UdpSocket::from_std(s).map(|socket| {
                let metrics = self.metrics.udp_listener(&name);
                tokio::spawn(
                    udp::Listener {
                        socket,
                        name,
                        config: self.udp_config.subscribe(),
                        limiter: Arc::clone(&self.rate_limiter),
                        metrics,
                        stop: stop.clone(),
                    }
                    .run(),
                );
            }),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "socket type does not match its use",
            )),
        };
        match spawned {
            Ok(()) => {
                info!(proto = kind.proto(), addr = %local, "listening");
                self.listeners.insert((kind, addr), (stop, local));
            }
            Err(e) => error!(proto = kind.proto(), %addr, error = %e, "cannot serve socket"),
        }
    }

    /// Serves, handling reloads, until a stop signal; returns its name.
    async fn serve_until_stop(&mut self, signals: &mut Signals) -> &'static str {
        let mut status_tick = tokio::time::interval(Duration::from_secs(5));
        let mut sweep_tick = tokio::time::interval(Duration::from_secs(1));
        if let Some(interval) = systemd::watchdog_interval() {
            info!(?interval, "systemd watchdog enabled");
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                loop {
                    tick.tick().await;
                    systemd::watchdog_ping();
                }
            });
        }
        loop {
            tokio::select! {
                request = signals.recv() => match request {
                    Request::Stop(signal) => return signal,
                    Request::Reload => self.reload(),
                },
                _ = status_tick.tick() => systemd::status(&self.status_line()),
                _ = sweep_tick.tick() => {
                    let sources = self.rate_limiter.sweep(Instant::now());
                    self.metrics.udp_rate_limit_sources.set(i64::try_from(sources).unwrap_or(i64::MAX));
                }
            }
        }
    }

    /// Re-reads the configuration; a bad one is refused and the old one keeps serving.
    fn reload(&mut self) {
        systemd::reloading();
        info!(source = %crate::config::describe_source(self.source.file.as_deref()), "reloading configuration");
        let result = self
            .source
            .load()
            .map_err(|e| e.to_string())
            .and_then(|config| self.apply(config).map_err(|e| e.to_string()));
        match result {
            Ok(()) => {
                self.last_reload_error = None;
                self.metrics.config_reloads.inc();
                self.metrics.config_last_reload_success.set(1);
                info!("configuration reloaded");
            }
            Err(e) => {
                error!(error = %e, "reload failed; keeping the previous configuration");
                self.last_reload_error = Some(one_line(&e));
                self.metrics.config_reload_failures.inc();
                self.metrics.config_last_reload_success.set(0);
            }
        }
        systemd::ready(&self.status_line());
    }

    /// Applies a validated config: new listeners are bound first, so a bind failure
    /// changes nothing; then settings are broadcast and removed listeners stopped.
    /// Connections are never touched: they belong to the drain, not to a listener.
    fn apply(&mut self, config: Config) -> Result<(), BindError> {
        let wanted = self.wanted(&config);
        let mut added = Vec::new();
        for &(kind, addr) in &wanted {
            if !self.listeners.contains_key(&(kind, addr)) {
                added.push((kind, addr, self.bind(kind, addr)?));
            }
        }
        self.log.set_level(&config.log.level);
        self.limiter.update(&config.tcp);
        self.rate_limiter.update(&config.udp.rate_limit);
        self.tcp_config.send_replace(Arc::new(config.tcp.clone()));
        self.udp_config.send_replace(Arc::new(config.udp.clone()));
        self.metrics.set_limits(&config);
        self.config = config;
        let removed: Vec<_> = self
            .listeners
            .keys()
            .filter(|key| !wanted.contains(key))
            .copied()
            .collect();
        for key in removed {
            if let Some((stop, local)) = self.listeners.remove(&key) {
                stop.cancel();
                info!(proto = key.0.proto(), addr = %local, "stopped listening");
            }
        }
        for (kind, addr, bound) in added {
            self.spawn_listener(kind, addr, bound);
        }
        Ok(())
    }

    fn status_line(&self) -> String {
        let list = |kind: Kind| {
            let addrs: Vec<String> = self
                .listeners
                .iter()
                .filter(|((k, _), _)| *k == kind)
                .map(|(_, (_, local))| local.to_string())
                .collect();
            if addrs.is_empty() {
                "off".to_string()
            } else {
                addrs.join(",")
            }
        };
        let mut line = format!(
            "TCP {} UDP {} HTTP {}; {} connections",
            list(Kind::Tcp),
            list(Kind::Udp),
            list(Kind::Http),
            self.limiter.active()
        );
        if let Some(e) = &self.last_reload_error {
            line.push_str("; last reload FAILED: ");
            line.push_str(e);
        }
        line
    }

    /// Stops listeners at once, lets connections finish within the drain timeout,
    /// then cuts the rest.
    async fn drain(self, signal: &'static str) -> Summary {
        let started = Instant::now();
        let timeout = self.config.shutdown.drain_timeout;
        let open = self.limiter.active();
        self.health.set_draining();
        self.metrics.ready.set(0);
        self.metrics.draining.set(1);
        systemd::stopping(&format!("draining {open} connections"));
        info!(
            signal,
            open,
            ?timeout,
            "stop requested: listeners closed, draining connections"
        );
        self.shutdown.begin_drain();
        self.connections.close();
        let cut = if tokio::time::timeout(timeout, self.connections.wait())
            .await
            .is_ok()
        {
            0
        } else {
            let cut = self.limiter.active();
            warn!(cut, "drain timeout expired; closing remaining connections");
            self.shutdown.cut();
            self.metrics.shutdown_cut.inc_by(cut as u64);
            let _ = tokio::time::timeout(Duration::from_secs(2), self.connections.wait()).await;
            cut
        };
        let summary = Summary {
            drained: open.saturating_sub(cut),
            cut,
        };
        info!(drained = summary.drained, cut = summary.cut, elapsed = ?started.elapsed(),
            "shutdown complete");
        self.http_stop.cancel();
        summary
    }
}
