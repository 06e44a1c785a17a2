//! The server: starts the listeners, serves until told to stop, applies reloads, drains.
//!
//! It takes its sockets and a control channel from the caller ([`serve`]), the way
//! mini-redis's `server::run(listener, shutdown)` does, so a test runs it in-process on
//! port 0 and the process wrapper alone owns signals, `LISTEN_FDS` and rlimits. Data
//! flows one way: the [`Config`] becomes listeners, listeners spawn connection handlers,
//! handlers count into [`Metrics`]. Reload and shutdown flow down the same path as
//! messages (a `watch` of the new settings, a [`Shutdown`] broadcast); nothing below
//! reaches back up for state.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::http::{self, Health};
use super::limits::{ConnectionLimiter, RateLimiter};
use super::listeners::{BindError, BoundSocket, ListenerKind, ListenerSet, Sockets};
use super::logging::LogHandle;
use super::metrics::{Metrics, VERSION};
use super::shutdown::Shutdown;
use super::{systemd, tcp, udp};
use crate::config::{Config, TcpConfig, UdpConfig};

/// What the caller (the signal handlers, or a test) tells a running server.
#[derive(Debug)]
pub enum Control {
    /// Apply this configuration, or record why the new one could not be loaded; the
    /// old configuration keeps serving when it is an error or cannot be applied.
    Reload(Box<Result<Config, String>>),
    /// Drain and return; the name says why (a signal name, say).
    Stop(&'static str),
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
pub async fn serve(
    config: Config,
    sockets: Sockets,
    control: mpsc::Receiver<Control>,
) -> Result<Summary, ServeError> {
    serve_with_log(config, sockets, control, None).await
}

/// [`serve`], with the process's log handle so a reload can change the level.
pub(crate) async fn serve_with_log(
    config: Config,
    sockets: Sockets,
    mut control: mpsc::Receiver<Control>,
    log: Option<LogHandle>,
) -> Result<Summary, ServeError> {
    let mut server = Server {
        shared: Shared::new(&config),
        listeners: ListenerSet::new(sockets),
        config,
        log,
        last_reload_error: None,
        restart_needed: Vec::new(),
    };
    server.start()?;
    let reason = server.serve_until_stop(&mut control).await;
    Ok(server.drain(reason).await)
}

/// Handles every listener and connection shares, and that a reload updates.
struct Shared {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: Shutdown,
    limiter: Arc<ConnectionLimiter>,
    rate_limiter: Arc<RateLimiter>,
    own_udp_ports: Arc<udp::OwnPorts>,
    tcp_config: watch::Sender<Arc<TcpConfig>>,
    udp_config: watch::Sender<Arc<UdpConfig>>,
    connections: TaskTracker,
    /// HTTP stops last, so `/healthz` answers until the process exits.
    http_stop: CancellationToken,
}

impl Shared {
    fn new(config: &Config) -> Self {
        let metrics = Arc::new(Metrics::new());
        metrics.set_limits(config);
        Self {
            health: Arc::new(Health::new(&metrics)),
            metrics,
            shutdown: Shutdown::new(),
            limiter: ConnectionLimiter::new(&config.tcp),
            rate_limiter: RateLimiter::new(&config.udp.rate_limit),
            own_udp_ports: Arc::default(),
            tcp_config: watch::Sender::new(Arc::new(config.tcp.clone())),
            udp_config: watch::Sender::new(Arc::new(config.udp.clone())),
            connections: TaskTracker::new(),
            http_stop: CancellationToken::new(),
        }
    }

    /// Sends reloaded settings to everything that uses them.
    fn apply(&self, config: &Config) {
        self.limiter.update(&config.tcp);
        self.rate_limiter.update(&config.udp.rate_limit);
        self.tcp_config.send_replace(Arc::new(config.tcp.clone()));
        self.udp_config.send_replace(Arc::new(config.udp.clone()));
        self.metrics.set_limits(config);
    }

    /// Starts serving one socket; the token returned stops it.
    fn start(&self, bound: BoundSocket, label: String) -> io::Result<CancellationToken> {
        let stop = match bound {
            BoundSocket::Http(_) => self.http_stop.child_token(),
            BoundSocket::Tcp(_) | BoundSocket::Udp(_) => self.shutdown.listener_token(),
        };
        // Sockets a caller bound itself may still block; tokio needs them non-blocking.
        match &bound {
            BoundSocket::Tcp(l) | BoundSocket::Http(l) => l.set_nonblocking(true)?,
            BoundSocket::Udp(s) => s.set_nonblocking(true)?,
        }
        match bound {
            BoundSocket::Tcp(l) => {
                let listener = tcp::Listener {
                    listener: tokio::net::TcpListener::from_std(l)?,
                    metrics: Arc::new(self.metrics.tcp_listener(&label)),
                    label,
                    config: self.tcp_config.subscribe(),
                    limiter: Arc::clone(&self.limiter),
                    shutdown: self.shutdown.clone(),
                    stop: stop.clone(),
                    connections: self.connections.clone(),
                };
                tokio::spawn(listener.run());
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
                tokio::spawn(listener.run());
            }
            BoundSocket::Http(l) => {
                let state = Arc::new(http::State {
                    metrics: Arc::clone(&self.metrics),
                    health: Arc::clone(&self.health),
                });
                let listener = tokio::net::TcpListener::from_std(l)?;
                tokio::spawn(http::serve(listener, state, stop.clone()));
            }
        }
        Ok(stop)
    }
}

/// The running daemon: its configuration, its listeners and what they share.
struct Server {
    config: Config,
    shared: Shared,
    listeners: ListenerSet,
    log: Option<LogHandle>,
    last_reload_error: Option<String>,
    /// Keys changed by a reload that only a restart applies (the log format: the
    /// global logger is installed once).
    restart_needed: Vec<&'static str>,
}

impl Server {
    /// Binds (or adopts) every listener, starts them all and announces readiness.
    fn start(&mut self) -> Result<(), BindError> {
        let shared = &self.shared;
        self.listeners
            .reconcile(&self.config, |bound, label| shared.start(bound, label))?;
        self.shared.health.set_ready();
        let status = self.status_line();
        systemd::ready(&status);
        info!(version = VERSION, "echod ready: {status}");
        Ok(())
    }

    /// Serves, handling reloads, until a stop; returns why it stopped.
    async fn serve_until_stop(&mut self, control: &mut mpsc::Receiver<Control>) -> &'static str {
        let mut status_tick = tokio::time::interval(Duration::from_secs(5));
        let mut sweep_tick = tokio::time::interval(Duration::from_secs(1));
        systemd::spawn_watchdog();
        #[cfg(debug_assertions)]
        block_every_worker_if_a_test_asks();
        loop {
            tokio::select! {
                message = control.recv() => match message {
                    Some(Control::Stop(reason)) => return reason,
                    Some(Control::Reload(config)) => self.reload(*config),
                    None => return "control channel closed",
                },
                _ = status_tick.tick() => systemd::status(&self.status_line()),
                _ = sweep_tick.tick() => {
                    let sources = self.shared.rate_limiter.sweep(Instant::now());
                    self.shared.metrics.udp_rate_limit_sources.set(i64::try_from(sources).unwrap_or(i64::MAX));
                }
            }
        }
    }

    /// Applies a reloaded configuration; a bad one is refused and the old one keeps
    /// serving.
    fn reload(&mut self, loaded: Result<Config, String>) {
        systemd::reloading();
        let result = loaded.and_then(|config| self.apply(config).map_err(|e| e.to_string()));
        let metrics = &self.shared.metrics;
        match result {
            Ok(()) => {
                self.last_reload_error = None;
                metrics.config_reloads.inc();
                metrics.config_last_reload_success.set(1);
                info!("configuration reloaded");
            }
            Err(e) => {
                error!(error = %e, "reload failed; keeping the previous configuration");
                self.last_reload_error = Some(one_line(&e));
                metrics.config_reload_failures.inc();
                metrics.config_last_reload_success.set(0);
            }
        }
        systemd::ready(&self.status_line());
    }

    /// New listeners are bound first, so a bind failure changes nothing; then settings
    /// are broadcast. Connections are never touched: they belong to the drain.
    fn apply(&mut self, config: Config) -> Result<(), BindError> {
        let shared = &self.shared;
        self.listeners
            .reconcile(&config, |bound, label| shared.start(bound, label))?;
        if let Some(log) = &self.log {
            log.set_level(&config.log.level);
        }
        if config.log.format != self.config.log.format
            && !self.restart_needed.contains(&"log.format")
        {
            warn!(
                "log.format changed: the new format applies after a restart (systemctl restart echod)"
            );
            self.restart_needed.push("log.format");
        }
        self.shared.apply(&config);
        self.config = config;
        Ok(())
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
        let mut line = format!(
            "TCP {} UDP {} HTTP {}; {}",
            list(ListenerKind::Tcp),
            list(ListenerKind::Udp),
            list(ListenerKind::Http),
            count_connections(self.shared.limiter.active())
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
    async fn drain(self, reason: &'static str) -> Summary {
        let Shared {
            health,
            shutdown,
            limiter,
            connections,
            http_stop,
            ..
        } = &self.shared;
        let started = Instant::now();
        let timeout = self.config.shutdown.drain_timeout;
        let open = limiter.active();
        health.set_draining();
        systemd::stopping(&format!("draining {}", count_connections(open)));
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
mod tests {
    use super::one_line;

    #[test]
    fn multi_line_errors_become_first_and_last_line() {
        let toml_error = "invalid config file /etc/echod.toml: TOML parse error at line 3, column 9\n  |\n3 | backlog = \"x\"\n  |         ^^^\ninvalid type: string \"x\", expected u32\n";
        assert_eq!(
            one_line(toml_error),
            "invalid config file /etc/echod.toml: TOML parse error at line 3, column 9: invalid type: string \"x\", expected u32"
        );
        assert_eq!(one_line("just one line"), "just one line");
        assert_eq!(one_line("\n  same \n same\n"), "same");
        assert_eq!(one_line(""), "");
        assert!(!one_line("a\nb\nc").contains('\n'));
    }
}
