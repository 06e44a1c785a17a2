//! The server: starts the listeners, serves until told to stop, applies reloads, drains.
//!
//! It takes its sockets and a control channel from the caller ([`serve`]), the way
//! mini-redis's `server::run(listener, shutdown)` does, so a test runs it in-process on
//! port 0 and the process wrapper alone owns signals, `LISTEN_FDS` and rlimits. Data
//! flows one way: the [`Config`] becomes listeners, listeners spawn connection handlers,
//! handlers count into [`Metrics`]. Reload and shutdown flow down the same path as
//! messages (a `watch` of the new settings, a [`Shutdown`] broadcast); nothing below
//! reaches back up for state.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::host::{self, Detached, Host, Notice};
use super::http::{self, Health};
use super::http_guard::WebEndpoint;
use super::kind::ListenerKind;
use super::limits::{ConnectionLimiter, RateLimiter};
use super::listeners::{Backlog, BindError, BoundSocket, ListenerSet, Sockets};
use super::logging::LogHandle;
use super::metrics::{Metrics, TcpListenerMetrics, UpgradeResult, VERSION};
use super::shutdown::Shutdown;
use super::upgrade::Upgrade;
use super::upgrade::handoff::Handoff;
use super::upgrade::handover::{self, HandedConnection, HandedListener, Handover};
use super::{tcp, tls, udp};
use crate::config::{Config, MetricsConfig, TcpConfig, TlsConfig, UdpConfig};

/// What the caller (the signal handlers, or a test) tells a running server.
#[derive(Debug)]
pub enum Control {
    /// Apply this configuration, or record why the new one could not be loaded; the
    /// old configuration keeps serving when it is an error or cannot be applied.
    Reload(Box<Result<Config, String>>),
    /// Drain and return; the name says why (a signal name, say).
    Stop(&'static str),
    /// Become a new binary in place, handing every listener and connection over to it;
    /// if that fails, the running one takes them back and keeps serving.
    Upgrade(Upgrade),
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// What a finished run reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Connections that finished on their own during the drain.
    pub drained: usize,
    /// Connections closed when the drain timeout expired.
    pub cut: usize,
}

/// Runs the daemon on `sockets` until `control` says stop (or is dropped), then drains.
/// It runs detached from any process: no service manager is told anything, and an
/// upgrade is refused (everything is taken back).
pub async fn serve(
    config: Config,
    sockets: Sockets,
    control: mpsc::Receiver<Control>,
) -> Result<Summary, ServeError> {
    let process = Process {
        host: Arc::new(Detached),
        log: None,
    };
    serve_hosted(config, sockets, Handover::default(), control, process).await
}

/// What the process wrapper gives the server besides its sockets: the [`Host`] every
/// effect on the process goes through, and the log handle a reload changes the level of.
pub(crate) struct Process {
    pub(crate) host: Arc<dyn Host>,
    pub(crate) log: Option<LogHandle>,
}

/// [`serve`] inside a process: `handover` holds what an earlier image of the process
/// handed over besides its listeners (already in `sockets`): its open connections and
/// when it stopped accepting.
pub(crate) async fn serve_hosted(
    config: Config,
    sockets: Sockets,
    handover: Handover,
    mut control: mpsc::Receiver<Control>,
    process: Process,
) -> Result<Summary, ServeError> {
    let Process { host, log } = process;
    let mut server = Server {
        handles: Handles::new(&config),
        listeners: ListenerSet::new(sockets, Arc::clone(&host)),
        host,
        config,
        log,
        last_reload_error: None,
        restart_needed: Vec::new(),
    };
    let start = if handover.stopped.is_some() {
        Start::Upgraded
    } else {
        Start::Fresh
    };
    if let Some(started) = handover.started {
        server.handles.metrics.carry(handover.samples, started);
    }
    server.start(handover.connections, start, handover.stopped)?;
    host::spawn_watchdog(&server.host);
    #[cfg(debug_assertions)]
    block_every_worker_if_a_test_asks();
    loop {
        match server.serve_until_stop(&mut control).await {
            Next::Stop(reason) => return Ok(server.drain(reason).await),
            Next::Upgrade(upgrade) => {
                if let Some(reason) = server.upgrade(upgrade, &mut control).await {
                    return Ok(server.drain(reason).await);
                }
            }
        }
    }
}

/// How this server came to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// A new process (or a test): a listener that cannot be bound is fatal.
    Fresh,
    /// An upgrade in place: the previous image handed its listeners and connections
    /// over, and this one must never do worse than it would have.
    Upgraded,
}

/// Why [`Server::serve_until_stop`] returned.
enum Next {
    Stop(&'static str),
    Upgrade(Upgrade),
}

/// How long listener tasks get to stop when handing over (they stop at once).
const LISTENERS_STOP: Duration = Duration::from_secs(2);

/// How long an abandoned check gets to end (killed, it ends at once).
const CHECK_ENDS: Duration = Duration::from_secs(2);

/// Handles every listener and connection shares, and that a reload updates.
struct Handles {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: Shutdown,
    /// Where echo connections give themselves at an upgrade.
    handoff: Handoff,
    limiter: Arc<ConnectionLimiter>,
    rate_limiter: Arc<RateLimiter>,
    own_udp_ports: Arc<udp::OwnPorts>,
    tcp_config: watch::Sender<Arc<TcpConfig>>,
    udp_config: watch::Sender<Arc<UdpConfig>>,
    tls_config: watch::Sender<Arc<TlsConfig>>,
    web: watch::Sender<Arc<WebEndpoint>>,
    metrics_config: watch::Sender<Arc<MetricsConfig>>,
    connections: TaskTracker,
    /// The TCP and UDP echo listener tasks, which a handover waits for.
    listener_tasks: TaskTracker,
    /// HTTP stops last, so `/healthz` answers until the process exits.
    http_stop: CancellationToken,
}

impl Handles {
    fn new(config: &Config) -> Self {
        let metrics = Arc::new(Metrics::new());
        metrics.set_limits(config);
        metrics.set_tls_certificate_expiry(config.tls.loaded.as_ref().map(|m| m.not_after));
        Self {
            health: Arc::new(Health::new(&metrics)),
            metrics,
            shutdown: Shutdown::running(),
            handoff: Handoff::default(),
            limiter: ConnectionLimiter::new(&config.tcp),
            rate_limiter: RateLimiter::new(&config.udp.rate_limit),
            own_udp_ports: Arc::default(),
            tcp_config: watch::Sender::new(Arc::new(config.tcp.clone())),
            udp_config: watch::Sender::new(Arc::new(config.udp.clone())),
            tls_config: watch::Sender::new(Arc::new(config.tls.clone())),
            web: watch::Sender::new(Arc::new(WebEndpoint::new(
                config.metrics.web_config.clone(),
            ))),
            metrics_config: watch::Sender::new(Arc::new(config.metrics.clone())),
            connections: TaskTracker::new(),
            listener_tasks: TaskTracker::new(),
            http_stop: CancellationToken::new(),
        }
    }

    /// Sends reloaded settings to everything that uses them.
    fn apply(&self, config: &Config) {
        self.limiter.update(&config.tcp);
        self.rate_limiter.update(&config.udp.rate_limit);
        self.tcp_config.send_replace(Arc::new(config.tcp.clone()));
        self.udp_config.send_replace(Arc::new(config.udp.clone()));
        self.tls_config.send_replace(Arc::new(config.tls.clone()));
        self.metrics_config
            .send_replace(Arc::new(config.metrics.clone()));
        self.metrics
            .set_tls_certificate_expiry(config.tls.loaded.as_ref().map(|m| m.not_after));
        // An unchanged web config keeps its endpoint (and its cache of verified passwords).
        let web = config.metrics.web_config.as_ref();
        self.web.send_if_modified(|current| {
            let changed = !current.is_built_from(web);
            if changed {
                *current = Arc::new(WebEndpoint::new(web.cloned()));
            }
            changed
        });
        self.metrics.set_limits(config);
    }

    /// Starts serving one socket; the token returned stops it. `backlog` says what
    /// becomes of its accept queue at a stop.
    fn start(
        &self,
        bound: BoundSocket,
        label: String,
        backlog: Backlog,
    ) -> io::Result<CancellationToken> {
        let stop = match bound {
            BoundSocket::Http(_) => self.http_stop.child_token(),
            BoundSocket::Tcp(_) | BoundSocket::Udp(_) | BoundSocket::Tls(_) => {
                self.shutdown.listener_token()
            }
        };
        // Sockets a caller bound itself may still block; tokio needs them non-blocking.
        match &bound {
            BoundSocket::Tcp(l) | BoundSocket::Http(l) | BoundSocket::Tls(l) => {
                l.set_nonblocking(true)?;
            }
            BoundSocket::Udp(s) => s.set_nonblocking(true)?,
        }
        match bound {
            BoundSocket::Tcp(l) => {
                let listener = self.echo_listener(l, label, &stop, backlog, None)?;
                self.listener_tasks.spawn(listener.run());
            }
            BoundSocket::Tls(l) => {
                let tls = tls::Endpoint {
                    config: self.tls_config.subscribe(),
                    metrics: Arc::new(self.metrics.tls_listener(&label)),
                };
                let listener = self.echo_listener(l, label, &stop, backlog, Some(tls))?;
                self.listener_tasks.spawn(listener.run());
            }
            BoundSocket::Udp(s) => {
                let listener = udp::Listener {
                    socket: tokio::net::UdpSocket::from_std(s)?,
                    metrics: self.metrics.udp_listener(&label),
                    label,
                    config: self.udp_config.subscribe(),
                    limiter: Arc::clone(&self.rate_limiter),
                    own_ports: Arc::clone(&self.own_udp_ports),
                    stop: stop.clone(),
                };
                self.listener_tasks.spawn(listener.run());
            }
            BoundSocket::Http(l) => {
                let state = Arc::new(http::State {
                    metrics: Arc::clone(&self.metrics),
                    health: Arc::clone(&self.health),
                    web: self.web.subscribe(),
                    access: self.metrics_config.subscribe(),
                });
                let listener = tokio::net::TcpListener::from_std(l)?;
                tokio::spawn(http::serve(listener, state, stop.clone()));
            }
        }
        Ok(stop)
    }
}

impl Handles {
    /// A TCP echo listener task's state; with `tls`, its connections handshake first.
    fn echo_listener(
        &self,
        socket: std::net::TcpListener,
        label: String,
        stop: &CancellationToken,
        backlog: Backlog,
        tls: Option<tls::Endpoint>,
    ) -> io::Result<tcp::Listener> {
        Ok(tcp::Listener {
            listener: tokio::net::TcpListener::from_std(socket)?,
            metrics: Arc::new(self.metrics.tcp_listener(&label)),
            label,
            config: self.tcp_config.subscribe(),
            limiter: Arc::clone(&self.limiter),
            shutdown: self.shutdown.clone(),
            handoff: self.handoff.clone(),
            stop: stop.clone(),
            connections: self.connections.clone(),
            keep_backlog: backlog == Backlog::Kept,
            tls,
        })
    }

    /// Goes on serving connections an earlier image of this process handed over, each
    /// under the series of the listener it came from.
    fn adopt(&self, connections: Vec<HandedConnection>) {
        let config = Arc::clone(&self.tcp_config.borrow());
        // One set of series per listener, not per connection: resolving every label
        // child anew cost most of the new image's pause at 10 000 connections.
        let mut series: HashMap<String, Arc<TcpListenerMetrics>> = HashMap::new();
        for c in connections {
            if !handover::is_stream_socket(&c.fd) {
                warn!(peer = %c.peer, "a handed-over descriptor is not a TCP connection: closed");
                continue;
            }
            let stream = std::net::TcpStream::from(c.fd);
            let stream = match stream
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(stream))
            {
                Ok(stream) => stream,
                Err(e) => {
                    warn!(peer = %c.peer, error = %e, "cannot serve a handed-over connection");
                    continue;
                }
            };
            let metrics = Arc::clone(
                series
                    .entry(c.label.clone())
                    .or_insert_with(|| Arc::new(self.metrics.tcp_listener(&c.label))),
            );
            let permit = c.slot.unwrap_or_else(|| self.limiter.adopt(c.peer.ip()));
            self.connections.spawn(tcp::adopted(
                stream,
                c.peer,
                c.past,
                Arc::clone(&config),
                tcp::Lifeline {
                    shutdown: self.shutdown.clone(),
                    handoff: self.handoff.clone(),
                },
                metrics,
                permit,
            ));
        }
    }
}

/// The running daemon: its configuration, its listeners and what they share.
struct Server {
    config: Config,
    handles: Handles,
    listeners: ListenerSet,
    /// Every effect on the process goes through it.
    host: Arc<dyn Host>,
    log: Option<LogHandle>,
    last_reload_error: Option<String>,
    /// Keys changed by a reload that only a restart applies (the log format, the
    /// number of sockets of a UDP address already listening).
    restart_needed: Vec<&'static str>,
}

impl Server {
    /// Binds (or adopts) every listener, starts them all, goes on serving the
    /// connections an earlier image handed over, and announces readiness.
    ///
    /// After an upgrade, a configuration the new image cannot apply (a port it cannot
    /// bind, say) is not fatal: the old image would have refused it as a reload and kept
    /// serving, so the new one serves the listeners handed over, as they were, and
    /// reports a failed reload.
    ///
    /// The listeners accept before the handed-over connections are taken on: the pause
    /// new clients see (since `stopped`, when the old image stopped accepting) ends
    /// there, and does not grow with the connections held.
    fn start(
        &mut self,
        mut connections: Vec<HandedConnection>,
        start: Start,
        stopped: Option<u64>,
    ) -> Result<(), BindError> {
        // Their slots first: the listeners accept before the connections are served,
        // and would otherwise admit newcomers past the limits meanwhile.
        for c in &mut connections {
            if c.slot.is_none() {
                c.slot = Some(self.handles.limiter.adopt(c.peer.ip()));
            }
        }
        let outcome = match (self.bind_all(), start) {
            (Ok(()), _) => Ok(()),
            (Err(e), Start::Fresh) => return Err(e),
            (Err(e), Start::Upgraded) => {
                error!(error = %e, "the new binary cannot apply the configuration: serving the listeners handed over");
                self.listeners.serve_only_provided(&mut self.config);
                self.bind_all()?;
                Err(format!(
                    "the new binary serves the previous listeners; it cannot apply the configuration: {e}"
                ))
            }
        };
        let paused = stopped.map(|at| handover::monotonic_micros().saturating_sub(at));
        let held = connections.len();
        let pending_bytes = connections
            .iter()
            .map(|c| c.past.pending.len())
            .sum::<usize>();
        if held > 0 {
            info!(
                connections = held,
                pending_bytes, "serving the connections handed over"
            );
        }
        self.handles.adopt(connections);
        if let (Some(stopped), Some(paused)) = (stopped, paused) {
            self.handles
                .metrics
                .upgraded(UpgradeResult::Ok, Some(Duration::from_micros(paused)));
            info!(
                paused_us = paused,
                connections_served_us = handover::monotonic_micros().saturating_sub(stopped),
                "upgrade complete: the new binary serves, {:.1} ms after the old one stopped accepting",
                paused as f64 / 1000.0
            );
        }
        self.handles.health.set_ready();
        match start {
            Start::Fresh => self.host.notify(Notice::Ready(&self.status_line())),
            Start::Upgraded => self.conclude(outcome),
        }
        info!(version = VERSION, "echod ready: {}", self.status_line());
        Ok(())
    }

    /// Brings the listener set to the configuration.
    fn bind_all(&mut self) -> Result<(), BindError> {
        let handles = &self.handles;
        self.listeners
            .reconcile(&self.config, |bound, label, backlog| {
                handles.start(bound, label, backlog)
            })
    }

    /// Serves, handling reloads, until a stop or an upgrade.
    async fn serve_until_stop(&mut self, control: &mut mpsc::Receiver<Control>) -> Next {
        let mut status_tick = tokio::time::interval(Duration::from_secs(5));
        let mut sweep_tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                message = control.recv() => match message {
                    Some(Control::Stop(reason)) => return Next::Stop(reason),
                    Some(Control::Reload(config)) => self.reload(*config),
                    Some(Control::Upgrade(upgrade)) => return Next::Upgrade(upgrade),
                    None => return Next::Stop("control channel closed"),
                },
                _ = status_tick.tick() => self.host.notify(Notice::Status(&self.status_line())),
                _ = sweep_tick.tick() => {
                    let sources = self.handles.rate_limiter.sweep(Instant::now());
                    self.handles.metrics.udp_rate_limit_sources.set(i64::try_from(sources).unwrap_or(i64::MAX));
                }
            }
        }
    }

    /// Applies a reloaded configuration; a bad one is refused and the old one keeps
    /// serving.
    fn reload(&mut self, loaded: Result<Config, String>) {
        self.host.notify(Notice::Reloading);
        let result = loaded.and_then(|config| self.apply(config).map_err(|e| e.to_string()));
        match &result {
            Ok(()) => info!("configuration reloaded"),
            Err(e) => error!(error = %e, "reload failed; keeping the previous configuration"),
        }
        self.conclude(result);
    }

    /// Counts, records and announces the outcome of a reload or an upgrade: the
    /// metrics, the status line, the verdict `echod reload` waits for, and READY.
    fn conclude(&mut self, outcome: Result<(), String>) {
        let metrics = &self.handles.metrics;
        self.last_reload_error = outcome.as_ref().err().map(|e| one_line(e));
        match &self.last_reload_error {
            None => {
                metrics.config_reloads.inc();
                metrics.config_last_reload_success.set(1);
            }
            Some(_) => {
                metrics.config_reload_failures.inc();
                metrics.config_last_reload_success.set(0);
            }
        }
        self.host.notify(Notice::Reloaded(
            self.last_reload_error.as_deref().map_or(Ok(()), Err),
        ));
        self.host.notify(Notice::Ready(&self.status_line()));
    }

    /// New listeners are bound first, so a bind failure changes nothing; then settings
    /// are broadcast. Connections are never touched: they belong to the drain.
    fn apply(&mut self, config: Config) -> Result<(), BindError> {
        let handles = &self.handles;
        self.listeners.reconcile(&config, |bound, label, backlog| {
            handles.start(bound, label, backlog)
        })?;
        if let Some(log) = &self.log {
            log.set_level(&config.log.level);
        }
        // The global logger is installed once; a UDP address's sockets are bound once
        // (an address a reload adds gets the new number).
        let only_at_restart = [
            (
                "log.format",
                config.log.format != self.config.log.format,
                "the new format applies after a restart",
            ),
            (
                "udp.sockets_per_address",
                config.udp.sockets_per_address != self.config.udp.sockets_per_address,
                "addresses already listening keep their sockets until a restart",
            ),
        ];
        for (key, changed, what) in only_at_restart {
            if changed && !self.restart_needed.contains(&key) {
                warn!("{key} changed: {what} (systemctl restart echod)");
                self.restart_needed.push(key);
            }
        }
        self.handles.apply(&config);
        self.config = config;
        Ok(())
    }

    /// Becomes the new binary: the echo listeners stop accepting (new connections wait
    /// in the kernel's accept queue), every connection stops at a point where it holds
    /// no unechoed byte — or hands over the bytes it holds — and the process execs the
    /// new binary with all of it. Returns only when the exec failed; the running image
    /// then takes everything back and keeps serving, and the reload counts as failed.
    ///
    /// First the new binary is asked whether it can take over; a stop requested
    /// meanwhile ends the upgrade and is returned, for the caller to drain.
    async fn upgrade(
        &mut self,
        upgrade: Upgrade,
        control: &mut mpsc::Receiver<Control>,
    ) -> Option<&'static str> {
        self.host.notify(Notice::Reloading);
        let description = handover::describe_listeners(&self.listeners.running());
        let upgrade = Arc::new(upgrade);
        let asking = Arc::clone(&upgrade);
        let check = tokio::task::spawn_blocking(move || asking.check(&description));
        tokio::pin!(check);
        let checked = loop {
            tokio::select! {
                checked = &mut check => break checked.unwrap_or_else(|e| Err(e.to_string())),
                message = control.recv() => {
                    let reason = match message {
                        Some(Control::Stop(reason)) => reason,
                        None => "control channel closed",
                        Some(other) => {
                            warn!(?other, "ignored while an upgrade is under way");
                            continue;
                        }
                    };
                    info!(reason, "stop requested while the new binary is checked: stopping instead");
                    upgrade.abandon();
                    // A check still starting (between its fork and saying its PID)
                    // ends itself on seeing the upgrade abandoned; the process must not
                    // exit first, or that child outlives it (seen once in a CI run).
                    let _ = tokio::time::timeout(CHECK_ENDS, &mut check).await;
                    return Some(reason);
                }
            }
        };
        let upgrade = match (checked, Arc::try_unwrap(upgrade)) {
            (Ok(()), Ok(upgrade)) => upgrade,
            (Ok(()), Err(_)) => unreachable!("the check's task has ended"),
            (Err(why), _) => {
                self.handles.metrics.upgraded(UpgradeResult::Refused, None);
                error!(error = %why, "new binary refused, the running one keeps serving");
                self.conclude(Err(format!(
                    "new binary refused, the running one keeps serving: {why}"
                )));
                return None;
            }
        };
        info!(binary = %upgrade.binary().display(), "handing over to the new binary");
        // First the connections open now hand themselves over while the listeners go on
        // accepting and echoing (restarted on the same sockets under a fresh broadcast,
        // a gap of well under a millisecond, counted in the pause): that work grows
        // with the connections held, and new clients do not wait for it.
        let gap = Instant::now();
        let (earlier, earlier_connections) = self.next_generation().await;
        let gap = gap.elapsed();
        earlier.begin_handover();
        earlier_connections.close();
        // A connection still reading its PROXY header finishes that first.
        let wait = self.config.tcp.proxy_protocol.header_timeout + Duration::from_secs(2);
        if tokio::time::timeout(wait, earlier_connections.wait())
            .await
            .is_err()
        {
            warn!(
                left = earlier_connections.len(),
                "connections that did not reach a point to hand over in time are closed"
            );
        }
        drop(earlier);
        // Their lines of the description are written now, while the listeners accept:
        // the pause writes only those of the connections accepted meanwhile.
        let mut connections = self.handles.handoff.take();
        let early = handover::Early::encode(&connections);
        // Then the pause: the listeners stop, the connections accepted meanwhile hand
        // themselves over, and the exec. `stopped` counts the restart's gap in.
        let started = Instant::now();
        let stopped = handover::monotonic_micros()
            .saturating_sub(u64::try_from(gap.as_micros()).unwrap_or(u64::MAX));
        let listeners = self.listeners.hand_over();
        let handles = &self.handles;
        handles.listener_tasks.close();
        if tokio::time::timeout(LISTENERS_STOP, handles.listener_tasks.wait())
            .await
            .is_err()
        {
            warn!("a listener did not stop in time for the handover");
        }
        handles.shutdown.begin_handover();
        handles.connections.close();
        // A connection still reading its PROXY header finishes that first.
        let wait = self.config.tcp.proxy_protocol.header_timeout + Duration::from_secs(2);
        if tokio::time::timeout(wait, handles.connections.wait())
            .await
            .is_err()
        {
            warn!(
                left = handles.limiter.active(),
                "connections that did not reach a point to hand over in time are closed"
            );
        }
        // Every connection has added its counts by now: the next image goes on from
        // these.
        let (samples, first_started) = handles.metrics.carried_samples();
        connections.extend(handles.handoff.take());
        let handover = Handover {
            stopped: Some(stopped),
            listeners,
            connections,
            samples,
            started: Some(first_started),
            early,
        };
        info!(
            listeners = handover.listeners.len(),
            connections = handover.connections.len(),
            pending_bytes = handover.pending_bytes(),
            paused_ms = u64::try_from((started.elapsed() + gap).as_millis()).unwrap_or(u64::MAX),
            "executing the new binary"
        );
        let binary = upgrade.binary().display().to_string();
        let error = self.host.exec(&upgrade, &handover);
        error!(%binary, error = %error, "cannot execute the new binary; the running one takes everything back");
        self.resume(handover);
        self.handles.metrics.upgraded(UpgradeResult::Failed, None);
        self.conclude(Err(format!("upgrade to {binary} failed: {error}")));
        None
    }

    /// Restarts every listener on its socket under a fresh broadcast and connection
    /// tracker, and returns the previous ones, which the connections open until now
    /// still hold: an upgrade hands those over while new ones are served.
    async fn next_generation(&mut self) -> (Shutdown, TaskTracker) {
        let listeners = self.listeners.hand_over();
        self.handles.listener_tasks.close();
        if tokio::time::timeout(LISTENERS_STOP, self.handles.listener_tasks.wait())
            .await
            .is_err()
        {
            warn!("a listener did not stop in time for the handover");
        }
        self.handles.listener_tasks.reopen();
        let shutdown = std::mem::replace(&mut self.handles.shutdown, Shutdown::running());
        let connections = std::mem::replace(&mut self.handles.connections, TaskTracker::new());
        self.serve_again(listeners);
        (shutdown, connections)
    }

    /// Serves `listeners` (the ones just stopped for a handover) as a new listener set.
    fn serve_again(&mut self, listeners: Vec<HandedListener>) {
        let sockets = Sockets::new().handed_over(listeners);
        self.listeners = ListenerSet::new(sockets, Arc::clone(&self.host));
        let handles = &self.handles;
        if let Err(e) = self
            .listeners
            .reconcile(&self.config, |bound, label, backlog| {
                handles.start(bound, label, backlog)
            })
        {
            error!(error = %e, "cannot serve every listener again");
        }
    }

    /// Takes back what a failed upgrade had prepared to hand over.
    fn resume(&mut self, handover: Handover) {
        self.handles.shutdown = Shutdown::running();
        self.handles.connections.reopen();
        self.handles.listener_tasks.reopen();
        self.serve_again(handover.listeners);
        self.handles.adopt(handover.connections);
    }

    fn status_line(&self) -> String {
        let list = |kind| {
            let addrs: Vec<String> = self
                .listeners
                .addresses(kind)
                .iter()
                .map(ToString::to_string)
                .collect();
            if addrs.is_empty() {
                "off".to_string()
            } else {
                addrs.join(",")
            }
        };
        // TLS only when on, so the line of a plain echod keeps its format.
        let tls = list(ListenerKind::Tls);
        let tls = if tls == "off" {
            String::new()
        } else {
            format!(" TLS {tls}")
        };
        let mut line = format!(
            "TCP {} UDP {} HTTP {}{tls}; {}",
            list(ListenerKind::Tcp),
            list(ListenerKind::Udp),
            list(ListenerKind::Http),
            count_connections(self.handles.limiter.active())
        );
        if !self.restart_needed.is_empty() {
            line.push_str("; restart needed to apply ");
            line.push_str(&self.restart_needed.join(", "));
        }
        if let Some(e) = &self.last_reload_error {
            line.push_str("; last reload FAILED: ");
            line.push_str(e);
        }
        line
    }

    /// Stops listeners at once, lets connections finish within the drain timeout,
    /// then cuts the rest.
    async fn drain(mut self, reason: &'static str) -> Summary {
        self.listeners.release();
        let Handles {
            health,
            shutdown,
            limiter,
            connections,
            http_stop,
            ..
        } = &self.handles;
        let started = Instant::now();
        let timeout = self.config.shutdown.drain_timeout;
        let open = limiter.active();
        health.set_draining();
        self.host.notify(Notice::Stopping(&format!(
            "draining {}",
            count_connections(open)
        )));
        info!(
            reason,
            open,
            timeout = %humantime::format_duration(timeout),
            "stop requested: listeners closed, draining connections"
        );
        shutdown.begin_drain();
        connections.close();
        let cut = if tokio::time::timeout(timeout, connections.wait())
            .await
            .is_ok()
        {
            0
        } else {
            let cut = limiter.active();
            warn!(cut, "drain timeout expired; closing remaining connections");
            shutdown.cut();
            let _ = tokio::time::timeout(Duration::from_secs(2), connections.wait()).await;
            cut
        };
        let summary = Summary {
            drained: open.saturating_sub(cut),
            cut,
        };
        info!(
            drained = summary.drained,
            cut = summary.cut,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "shutdown complete"
        );
        http_stop.cancel();
        summary
    }
}

/// Test hook, in debug builds only: `ECHOD_TEST_BLOCK_RUNTIME_AFTER=1s` makes every
/// worker of the serving runtime run a blocking sleep of `ECHOD_TEST_BLOCK_RUNTIME_FOR`
/// (default 3s) that long after start, so a test can watch what stops with the runtime
/// (watchdog pings) while the process itself is not stopped.
#[cfg(debug_assertions)]
fn block_every_worker_if_a_test_asks() {
    let setting = |name| {
        std::env::var(name)
            .ok()
            .and_then(|v| humantime::parse_duration(&v).ok())
    };
    let Some(after) = setting("ECHOD_TEST_BLOCK_RUNTIME_AFTER") else {
        return;
    };
    let length = setting("ECHOD_TEST_BLOCK_RUNTIME_FOR").unwrap_or(Duration::from_secs(3));
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    warn!(
        ?after,
        ?length,
        workers,
        "test hook: every runtime worker will block"
    );
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        // A blocker holds its worker until all are in, so each holds a different one.
        let all_in = Arc::new(std::sync::Barrier::new(workers));
        for _ in 0..workers {
            let all_in = Arc::clone(&all_in);
            tokio::spawn(async move {
                all_in.wait();
                std::thread::sleep(length);
            });
        }
    });
}

/// "1 connection", "2 connections".
fn count_connections(n: usize) -> String {
    if n == 1 {
        "1 connection".to_string()
    } else {
        format!("{n} connections")
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

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
