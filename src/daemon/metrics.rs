//! Prometheus metrics: what happened, counted exactly, in base units.
//!
//! Labels are bounded: `listener` is a configured address, `reason` and `kind` are
//! fixed sets; a client address never becomes a label. Handlers get pre-resolved
//! children per listener ([`TcpListenerMetrics`], [`UdpListenerMetrics`]) so the hot
//! path never hashes label values, and byte counts are added once per burst, not per read.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::reasons::{
    AcceptErrorKind, ConnectionCap, DropReason, HandshakeResult, RejectReason, TlsEnd,
};
use crate::config::Config;

/// The version baked in at build time.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git revision baked in at build time (see `build.rs`).
pub const REVISION: &str = env!("ECHOD_REVISION");

/// All of echod's metric families, registered in one registry.
pub struct Metrics {
    registry: Registry,
    tcp_accepted: IntCounterVec,
    tcp_closed: IntCounterVec,
    tcp_rejected: IntCounterVec,
    tcp_idle_timeouts: IntCounterVec,
    tcp_capped: IntCounterVec,
    tcp_active: IntGaugeVec,
    tcp_rx_bytes: IntCounterVec,
    tcp_tx_bytes: IntCounterVec,
    tcp_duration: HistogramVec,
    tcp_accept_errors: IntCounterVec,
    udp_rx: IntCounterVec,
    udp_tx: IntCounterVec,
    udp_rx_bytes: IntCounterVec,
    udp_tx_bytes: IntCounterVec,
    udp_dropped: IntCounterVec,
    /// Source addresses in the UDP rate-limit table.
    pub udp_rate_limit_sources: IntGauge,
    /// Successful configuration reloads.
    pub config_reloads: IntCounter,
    /// Rejected configuration reloads (the old configuration kept serving).
    pub config_reload_failures: IntCounter,
    /// 1 when the last reload attempt succeeded (or none was made).
    pub config_last_reload_success: IntGauge,
    /// 1 while draining after a stop request.
    pub draining: IntGauge,
    /// 1 while every configured listener is bound and serving.
    pub ready: IntGauge,
    tcp_max_connections: IntGauge,
    tcp_max_connections_per_ip: IntGauge,
    udp_rate_limit_max_sources: IntGauge,
    tls_handshakes: IntCounterVec,
    tls_active: IntGaugeVec,
    http_rejected: IntCounterVec,
    http_accept_errors: IntCounterVec,
    tls_closed: IntCounterVec,
    /// The TLS echo certificate's notAfter, in seconds since the Unix epoch (absent
    /// while TLS echo is off).
    tls_certificate_expiry: IntGauge,
    /// Upgrades in place, by result (counted by the image that decided it).
    upgrades: IntCounterVec,
    /// The last upgrade's pause: from the old image's stop of accepting to the new one's
    /// readiness.
    last_upgrade_pause: Gauge,
    start_time: Gauge,
    /// What earlier images of this process had counted, added to every series of the
    /// same name and labels when the exposition is written: an upgrade in place does not
    /// reset a counter (see [`Metrics::carry`]).
    carried: RwLock<HashMap<String, f64>>,
}

/// How an upgrade in place ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpgradeResult {
    /// The new image serves.
    Ok,
    /// The new binary said it could not take over; nothing stopped.
    Refused,
    /// The exec failed; the old image took everything back.
    Failed,
}

impl UpgradeResult {
    const ALL: [Self; 3] = [Self::Ok, Self::Refused, Self::Failed];

    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

/// Registers a metric and hands it back. Names and labels are static, so a failure is
/// a programming error caught by every test that builds [`Metrics`].
fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<C>,
) -> C {
    let metric = metric.expect("valid metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(r, IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(r, IntGauge::new(name, help))
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(r, IntCounter::new(name, help))
}

impl Metrics {
    /// Builds and registers every family (names are static, so registration cannot fail).
    pub fn new() -> Self {
        let r = Registry::new();
        let l = &["listener"];
        let build_info = register(
            &r,
            IntGaugeVec::new(
                Opts::new("echod_build_info", "Build information; always 1."),
                &["version", "revision"],
            ),
        );
        build_info.with_label_values(&[VERSION, REVISION]).set(1);
        let start = register(
            &r,
            Gauge::new(
                "echod_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds.",
            ),
        );
        let start_time = start.clone();
        start.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        #[cfg(target_os = "linux")]
        {
            let _ = r.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }

        let m = Self {
            tcp_accepted: counter_vec(
                &r,
                "echod_tcp_connections_accepted_total",
                "TCP connections accepted and served.",
                l,
            ),
            tcp_closed: counter_vec(
                &r,
                "echod_tcp_connections_closed_total",
                "TCP connections that were served and have closed.",
                l,
            ),
            tcp_rejected: counter_vec(
                &r,
                "echod_tcp_connections_rejected_total",
                "TCP connections closed right after accept, by reason.",
                &["listener", "reason"],
            ),
            tcp_idle_timeouts: counter_vec(
                &r,
                "echod_tcp_idle_timeouts_total",
                "TCP connections closed for having no traffic for tcp.idle_timeout.",
                l,
            ),
            tcp_active: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "echod_tcp_connections_active",
                        "Open TCP echo connections, with those waiting for their PROXY header.",
                    ),
                    l,
                ),
            ),
            tcp_capped: counter_vec(
                &r,
                "echod_tcp_connections_capped_total",
                "TCP connections closed by a per-connection cap (tcp.max_connection_duration, tcp.max_bytes_per_connection).",
                &["listener", "cap"],
            ),
            tcp_rx_bytes: counter_vec(
                &r,
                "echod_tcp_received_bytes_total",
                "Bytes received from TCP clients.",
                l,
            ),
            tcp_tx_bytes: counter_vec(
                &r,
                "echod_tcp_sent_bytes_total",
                "Bytes echoed back to TCP clients.",
                l,
            ),
            tcp_duration: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "echod_tcp_connection_duration_seconds",
                        "How long TCP echo connections stayed open.",
                    )
                    .buckets(vec![
                        0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 7200.0,
                    ]),
                    l,
                ),
            ),
            tcp_accept_errors: counter_vec(
                &r,
                "echod_tcp_accept_errors_total",
                "Errors from accept(), by kind.",
                &["listener", "kind"],
            ),
            udp_rx: counter_vec(
                &r,
                "echod_udp_received_datagrams_total",
                "UDP datagrams received.",
                l,
            ),
            udp_tx: counter_vec(
                &r,
                "echod_udp_sent_datagrams_total",
                "UDP datagrams echoed.",
                l,
            ),
            udp_rx_bytes: counter_vec(
                &r,
                "echod_udp_received_bytes_total",
                "UDP payload bytes received.",
                l,
            ),
            udp_tx_bytes: counter_vec(
                &r,
                "echod_udp_sent_bytes_total",
                "UDP payload bytes echoed.",
                l,
            ),
            udp_dropped: counter_vec(
                &r,
                "echod_udp_dropped_datagrams_total",
                "UDP datagrams not echoed, by reason.",
                &["listener", "reason"],
            ),
            udp_rate_limit_sources: gauge(
                &r,
                "echod_udp_rate_limit_sources",
                "Source addresses tracked by the UDP rate limiter.",
            ),
            config_reloads: counter(
                &r,
                "echod_config_reloads_total",
                "Configuration reloads applied.",
            ),
            config_reload_failures: counter(
                &r,
                "echod_config_reload_failures_total",
                "Configuration reloads rejected; the previous configuration kept serving.",
            ),
            config_last_reload_success: gauge(
                &r,
                "echod_config_last_reload_successful",
                "1 if the last configuration reload succeeded or none was attempted.",
            ),
            draining: gauge(
                &r,
                "echod_draining",
                "1 while draining connections after a stop request.",
            ),
            ready: gauge(
                &r,
                "echod_ready",
                "1 while every configured listener is bound and serving.",
            ),
            tcp_max_connections: gauge(
                &r,
                "echod_tcp_max_connections",
                "Configured tcp.max_connections: open TCP connections allowed over all listeners.",
            ),
            tcp_max_connections_per_ip: gauge(
                &r,
                "echod_tcp_max_connections_per_ip",
                "Configured tcp.max_connections_per_ip: open TCP connections allowed per source address.",
            ),
            udp_rate_limit_max_sources: gauge(
                &r,
                "echod_udp_rate_limit_max_sources",
                "Configured udp.rate_limit.max_sources: size bound of the UDP rate-limit table.",
            ),
            tls_handshakes: counter_vec(
                &r,
                "echod_tls_handshakes_total",
                "TLS echo handshakes, by result.",
                &["listener", "result"],
            ),
            tls_active: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "echod_tls_connections_active",
                        "Open TLS echo connections past their handshake.",
                    ),
                    l,
                ),
            ),
            tls_closed: counter_vec(
                &r,
                "echod_tls_connections_closed_total",
                "TLS echo connections that ended after their handshake, by reason.",
                &["listener", "reason"],
            ),
            http_rejected: counter_vec(
                &r,
                "echod_http_connections_rejected_total",
                "HTTP endpoint connections closed before they were served, or requests refused, by reason (denied: metrics.allow/metrics.deny; per_ip_limit, global_limit: no place to take; evicted: closed, not being served, to make room for a newcomer; silent: accepted without bytes and closed by echod before its first bytes came, within 2s or pushed out of the full lobby, or accepted on borrowed spare descriptors; auth_busy: a request answered 429, the password checks at their bound).",
                &["reason"],
            ),
            http_accept_errors: counter_vec(
                &r,
                "echod_http_accept_errors_total",
                "Errors from accept() on the HTTP endpoint's listener, by kind.",
                &["kind"],
            ),
            tls_certificate_expiry: IntGauge::new(
                "echod_tls_certificate_expiry_seconds",
                "notAfter of the TLS echo certificate in use, in seconds since the Unix epoch.",
            )
            .expect("valid metric definition"),
            upgrades: counter_vec(
                &r,
                "echod_upgrades_total",
                "Upgrades in place to a new binary, by result.",
                &["result"],
            ),
            last_upgrade_pause: register(
                &r,
                Gauge::new(
                    "echod_last_upgrade_pause_seconds",
                    "How long the last upgrade in place kept new connections waiting, in seconds.",
                ),
            ),
            start_time,
            carried: RwLock::default(),
            registry: r,
        };
        m.config_last_reload_success.set(1);
        for result in UpgradeResult::ALL {
            m.upgrades.with_label_values(&[result.label()]);
        }
        for reason in [
            "denied",
            "per_ip_limit",
            "global_limit",
            "evicted",
            "silent",
            "auth_busy",
        ] {
            m.http_rejected.with_label_values(&[reason]);
        }
        for kind in AcceptErrorKind::ALL {
            m.http_accept_errors.with_label_values(&[kind.label()]);
        }
        m
    }

    /// Counts an upgrade's outcome; for `Ok`, with the pause clients saw.
    pub(crate) fn upgraded(&self, result: UpgradeResult, pause: Option<std::time::Duration>) {
        self.upgrades.with_label_values(&[result.label()]).inc();
        if let Some(pause) = pause {
            self.last_upgrade_pause.set(pause.as_secs_f64());
        }
    }

    /// What this image hands the next at an upgrade so that no series restarts: every
    /// echod counter and histogram sample (`name{labels} value`, as exposed, earlier
    /// images' counts included), and the start time.
    pub(crate) fn carried_samples(&self) -> (Vec<(String, f64)>, f64) {
        let text = String::from_utf8_lossy(&self.encode()).into_owned();
        let mut samples = Vec::new();
        let mut carry = false;
        for line in text.lines() {
            if let Some(kind) = line.strip_prefix("# TYPE ") {
                let mut words = kind.split(' ');
                let (name, kind) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                carry = name.starts_with("echod_") && matches!(kind, "counter" | "histogram");
                continue;
            }
            if !carry || line.starts_with('#') {
                continue;
            }
            if let Some((key, value)) = line.rsplit_once(' ')
                && let Ok(value) = value.parse::<f64>()
                && value != 0.0
            {
                samples.push((key.to_string(), value));
            }
        }
        (samples, self.start_time.get())
    }

    /// Takes over what an earlier image counted ([`Metrics::carried_samples`]): each
    /// sample is added to the series of the same name and labels from now on, and the
    /// start time is the first image's.
    pub(crate) fn carry(&self, samples: Vec<(String, f64)>, started: f64) {
        self.start_time.set(started);
        let mut carried = self.carried.write().unwrap_or_else(|e| e.into_inner());
        for (key, value) in samples {
            *carried.entry(key).or_insert(0.0) += value;
        }
    }

    /// An HTTP endpoint connection was closed at once: its client's address is not
    /// admitted by `metrics.allow`/`metrics.deny`.
    pub fn http_denied(&self) {
        self.http_rejected.with_label_values(&["denied"]).inc();
    }

    /// An HTTP endpoint connection was closed before it was served, or a request
    /// refused, for `reason` (`per_ip_limit`, `global_limit`, `evicted`, `silent`,
    /// `auth_busy`).
    pub(crate) fn http_rejected(&self, reason: &str) {
        self.http_rejected.with_label_values(&[reason]).inc();
    }

    /// accept() on the HTTP endpoint's listener failed.
    pub(crate) fn http_accept_error(&self, kind: AcceptErrorKind) {
        self.http_accept_errors
            .with_label_values(&[kind.label()])
            .inc();
    }

    /// Publishes the configured limits, so alerts and dashboards can compare usage
    /// with them (`active / max`) without knowing the config file. Called at start and
    /// after every successful reload.
    pub fn set_limits(&self, config: &Config) {
        let as_gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.tcp_max_connections
            .set(as_gauge(config.tcp.max_connections));
        self.tcp_max_connections_per_ip
            .set(as_gauge(config.tcp.per_ip_limit()));
        self.udp_rate_limit_max_sources
            .set(as_gauge(config.udp.rate_limit.max_sources));
    }

    /// The text exposition of every family, with what earlier images counted added.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        let carried = self.carried.read().unwrap_or_else(|e| e.into_inner());
        if carried.is_empty() {
            return out;
        }
        let text = String::from_utf8_lossy(&out);
        let mut sum = String::with_capacity(text.len());
        for line in text.lines() {
            let added = line.rsplit_once(' ').and_then(|(key, value)| {
                Some((key, value.parse::<f64>().ok()?, carried.get(key)?))
            });
            match added {
                Some((key, value, earlier)) => {
                    sum.push_str(key);
                    sum.push(' ');
                    sum.push_str(&(value + earlier).to_string());
                }
                None => sum.push_str(line),
            }
            sum.push('\n');
        }
        sum.into_bytes()
    }

    /// Children for one TCP listener, created at zero so every series exists at once.
    pub fn tcp_listener(&self, listener: &str) -> TcpListenerMetrics {
        let rejected =
            RejectReason::ALL.map(|r| self.tcp_rejected.with_label_values(&[listener, r.label()]));
        let accept_errors = AcceptErrorKind::ALL.map(|k| {
            self.tcp_accept_errors
                .with_label_values(&[listener, k.label()])
        });
        TcpListenerMetrics {
            label: listener.to_string(),
            accepted: self.tcp_accepted.with_label_values(&[listener]),
            closed: self.tcp_closed.with_label_values(&[listener]),
            rejected,
            idle_timeouts: self.tcp_idle_timeouts.with_label_values(&[listener]),
            capped: ConnectionCap::ALL
                .map(|c| self.tcp_capped.with_label_values(&[listener, c.label()])),
            active: self.tcp_active.with_label_values(&[listener]),
            rx_bytes: self.tcp_rx_bytes.with_label_values(&[listener]),
            tx_bytes: self.tcp_tx_bytes.with_label_values(&[listener]),
            duration: self.tcp_duration.with_label_values(&[listener]),
            accept_errors,
        }
    }

    /// Children for one TLS listener, created at zero so every series exists at once.
    pub fn tls_listener(&self, listener: &str) -> TlsListenerMetrics {
        TlsListenerMetrics {
            handshakes: HandshakeResult::ALL.map(|r| {
                self.tls_handshakes
                    .with_label_values(&[listener, r.label()])
            }),
            active: self.tls_active.with_label_values(&[listener]),
            closed: TlsEnd::ALL.map(|e| self.tls_closed.with_label_values(&[listener, e.label()])),
        }
    }

    /// Publishes the expiry of the TLS echo certificate in use; `None` (TLS off)
    /// removes the series, so an alert on it cannot fire for a certificate not served.
    pub fn set_tls_certificate_expiry(&self, not_after: Option<i64>) {
        let gauge = &self.tls_certificate_expiry;
        match not_after {
            Some(at) => {
                gauge.set(at);
                // Registered on first use; a second registration is refused, harmlessly.
                let _ = self.registry.register(Box::new(gauge.clone()));
            }
            None => {
                let _ = self.registry.unregister(Box::new(gauge.clone()));
            }
        }
    }

    /// Children for one UDP socket, created at zero so every series exists at once.
    pub fn udp_listener(&self, listener: &str) -> UdpListenerMetrics {
        UdpListenerMetrics {
            rx: self.udp_rx.with_label_values(&[listener]),
            tx: self.udp_tx.with_label_values(&[listener]),
            rx_bytes: self.udp_rx_bytes.with_label_values(&[listener]),
            tx_bytes: self.udp_tx_bytes.with_label_values(&[listener]),
            dropped: DropReason::ALL
                .map(|r| self.udp_dropped.with_label_values(&[listener, r.label()])),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One TCP listener's series.
#[derive(Clone)]
pub struct TcpListenerMetrics {
    /// The `listener` label: the configured address.
    pub label: String,
    /// Connections accepted and served.
    pub accepted: IntCounter,
    /// Served connections that ended.
    pub closed: IntCounter,
    rejected: [IntCounter; RejectReason::ALL.len()],
    /// Connections closed by the idle timeout.
    pub idle_timeouts: IntCounter,
    capped: [IntCounter; 2],
    /// Open connections.
    pub active: IntGauge,
    /// Bytes received.
    pub rx_bytes: IntCounter,
    /// Bytes echoed.
    pub tx_bytes: IntCounter,
    /// Connection lifetimes.
    pub duration: Histogram,
    accept_errors: [IntCounter; 4],
}

/// Methods that count one value of a closed set (see [`crate::daemon::reasons`]) in
/// the array of series that has one counter per value, in label order.
macro_rules! count_by {
    ($($(#[doc = $doc:literal])* $method:ident($value:ident: $set:ty) in $array:ident;)*) => {$(
        $(#[doc = $doc])*
        pub fn $method(&self, $value: $set) {
            self.$array[$value as usize].inc();
        }
    )*};
}

impl TcpListenerMetrics {
    count_by! {
        /// Counts a connection refused after accept.
        rejected(reason: RejectReason) in rejected;
        /// Counts a connection closed by a per-connection cap.
        capped(cap: ConnectionCap) in capped;
        /// Counts an accept error.
        accept_error(kind: AcceptErrorKind) in accept_errors;
    }
}

/// One TLS listener's own series (its connections also count in the TCP series under
/// the same `listener` label: accepted, rejected, active, bytes, durations).
#[derive(Clone)]
pub struct TlsListenerMetrics {
    handshakes: [IntCounter; HandshakeResult::ALL.len()],
    /// Open connections past their handshake.
    pub active: IntGauge,
    closed: [IntCounter; TlsEnd::ALL.len()],
}

impl TlsListenerMetrics {
    count_by! {
        /// Counts a handshake by its result.
        handshake(result: HandshakeResult) in handshakes;
        /// Counts an established connection's end.
        closed(end: TlsEnd) in closed;
    }
}

/// One UDP socket's series.
#[derive(Clone)]
pub struct UdpListenerMetrics {
    rx: IntCounter,
    tx: IntCounter,
    rx_bytes: IntCounter,
    tx_bytes: IntCounter,
    dropped: [IntCounter; DropReason::ALL.len()],
}

/// Counts gathered locally over a batch of datagrams and added to the shared counters
/// at once, so a datagram costs no atomic operations.
#[derive(Default)]
pub struct UdpBatch {
    rx: u64,
    tx: u64,
    rx_bytes: u64,
    tx_bytes: u64,
    dropped: [u64; DropReason::ALL.len()],
}

impl UdpBatch {
    /// A datagram arrived.
    pub fn received(&mut self, len: usize) {
        self.rx += 1;
        self.rx_bytes += len as u64;
    }

    /// A datagram was echoed.
    pub fn sent(&mut self, len: usize) {
        self.tx += 1;
        self.tx_bytes += len as u64;
    }

    /// A datagram was dropped.
    pub fn dropped(&mut self, reason: DropReason) {
        self.dropped[reason as usize] += 1;
    }

    /// Adds the batch to the shared counters and starts a new one.
    pub fn flush(&mut self, into: &UdpListenerMetrics) {
        let b = std::mem::take(self);
        into.rx.inc_by(b.rx);
        into.tx.inc_by(b.tx);
        into.rx_bytes.inc_by(b.rx_bytes);
        into.tx_bytes.inc_by(b.tx_bytes);
        for (counter, n) in into.dropped.iter().zip(b.dropped) {
            if n > 0 {
                counter.inc_by(n);
            }
        }
    }
}
