//! The schema: every section and key with its default, as serde reads and writes it.
//! Types only — where values come from is `sources`, which values are allowed is
//! `validate`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Cidr, TlsMaterial, WebConfig};

/// The documented defaults file, kept in the repository as `config/echod.toml`; a test
/// proves it matches [`Config::default`] so the documentation cannot drift.
pub const DOCUMENTED_DEFAULTS: &str = include_str!("../../config/echod.toml");

/// Source ports whose services answer any datagram (echo, daytime, qotd, chargen, time,
/// DNS, NTP, NetBIOS, SNMP, LDAP, SSDP, mDNS, memcached …, and 7007, echod's own default
/// and container port): echoing to them would start a reflection loop, so UDP echo
/// refuses them by default (as BSD inetd did).
pub const DEFAULT_DENY_SOURCE_PORTS: &[u16] = &[
    0, 7, 9, 13, 17, 19, 37, 53, 69, 111, 123, 137, 138, 161, 162, 389, 520, 1900, 5353, 7007,
    11211,
];

/// Connections from one source address when `tcp.max_connections_per_ip` is unset (and
/// `tcp.max_connections` is not lower): one address may use a tenth of the default
/// global limit.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 1_000;

/// The whole effective configuration of the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// TCP echo listeners and their per-connection limits.
    pub tcp: TcpConfig,
    /// UDP echo sockets and their anti-reflection rules.
    pub udp: UdpConfig,
    /// TLS echo listeners (off by default); their connections obey the `[tcp]` limits.
    pub tls: TlsConfig,
    /// The HTTP endpoint for Prometheus and health probes.
    pub metrics: MetricsConfig,
    /// How a stop drains open connections.
    pub shutdown: ShutdownConfig,
    /// Log verbosity and format.
    pub log: LogConfig,
}

/// TCP echo settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TcpConfig {
    /// Addresses to listen on; empty disables TCP echo.
    pub listen: Vec<SocketAddr>,
    /// Kernel accept queue length.
    pub backlog: u32,
    /// Concurrent connections over all listeners; one more is closed at once.
    pub max_connections: usize,
    /// Concurrent connections from one source address; unset, the smaller of
    /// [`DEFAULT_MAX_CONNECTIONS_PER_IP`] and `max_connections` (as systemd's
    /// `MaxConnectionsPerSource=` follows `MaxConnections=`), so lowering the global
    /// limit alone is always a valid config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_ip: Option<usize>,
    /// A connection with no traffic for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Bytes read (and so held) per connection at most; bounds memory per busy client.
    pub buffer_size: usize,
    /// Kernel send buffer per connection (SO_SNDBUF), in bytes; 0 leaves it to the
    /// kernel, which grows it up to `net.ipv4.tcp_wmem` max (4 MiB) for a client that
    /// does not read. Bounds the kernel memory one connection can pin.
    pub send_buffer_size: usize,
    /// Kernel receive buffer per connection (SO_RCVBUF), in bytes; 0 leaves it to the
    /// kernel's autotuning (up to `net.ipv4.tcp_rmem` max).
    pub receive_buffer_size: usize,
    /// Disable Nagle, so small echoes return without delay.
    pub nodelay: bool,
    /// Idle time before TCP keepalive probes start; "0s" turns keepalive off.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// Longest a connection may stay open, so one client cannot hold a slot forever;
    /// unset (the default), no limit.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<Duration>,
    /// Most bytes echoed on one connection, so one client cannot use the link without
    /// end; unset (the default), no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes_per_connection: Option<u64>,
    /// Client addresses served (CIDRs or single addresses); empty (the default), every
    /// address not denied. Checked on the client's address: the PROXY header's when
    /// the connection comes from a trusted proxy. Covers the TLS listeners too.
    pub allow: Vec<Cidr>,
    /// Client addresses refused, even when `allow` lists them.
    pub deny: Vec<Cidr>,
    /// New connections per second from one client address (TLS included).
    pub connection_rate: ConnectionRateConfig,
    /// Client addresses from a load balancer's PROXY protocol header.
    pub proxy_protocol: ProxyProtocolConfig,
}

/// PROXY protocol (HAProxy's v1 text and v2 binary headers): a proxy in front of echod
/// tells it who the client is, so per-IP limits and logs see clients, not the proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyProtocolConfig {
    /// Sources whose connections must start with a PROXY header; empty (the default)
    /// turns the protocol off. Only these are believed: anyone else could claim any
    /// client address.
    pub trusted_sources: Vec<Cidr>,
    /// How long a trusted connection may take to send its header; a proxy sends it at
    /// once, so this only bounds what a broken or hostile peer can hold.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
}

impl Default for ProxyProtocolConfig {
    fn default() -> Self {
        Self {
            trusted_sources: Vec::new(),
            header_timeout: Duration::from_secs(5),
        }
    }
}

impl ProxyProtocolConfig {
    /// True when connections from `ip` must carry a PROXY header.
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        self.trusted_sources.iter().any(|net| net.contains(ip))
    }
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 7007))],
            backlog: 1024,
            max_connections: 10_000,
            max_connections_per_ip: None,
            idle_timeout: Duration::from_secs(300),
            buffer_size: 32 * 1024,
            send_buffer_size: 256 * 1024,
            receive_buffer_size: 256 * 1024,
            nodelay: true,
            keepalive: Duration::from_secs(60),
            max_connection_duration: None,
            max_bytes_per_connection: None,
            allow: Vec::new(),
            deny: Vec::new(),
            connection_rate: ConnectionRateConfig::default(),
            proxy_protocol: ProxyProtocolConfig::default(),
        }
    }
}

/// A token bucket of new connections per client address, in a table of bounded size
/// (xinetd's `cps`, per address).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionRateConfig {
    /// Sustained new connections per second from one address; 0 (the default) turns
    /// the limit off.
    pub per_second: u32,
    /// New connections one address may open at once above the sustained rate.
    pub burst: u32,
    /// Client addresses tracked at most; when full, and none has refilled, a new
    /// address is refused.
    pub max_sources: usize,
}

impl Default for ConnectionRateConfig {
    fn default() -> Self {
        Self {
            per_second: 0,
            burst: 20,
            max_sources: 65_536,
        }
    }
}

impl ConnectionRateConfig {
    /// The same bucket in the form the rate limiter takes.
    pub fn as_rate_limit(&self) -> RateLimitConfig {
        RateLimitConfig {
            packets_per_second: self.per_second,
            burst: self.burst,
            max_sources: self.max_sources,
        }
    }
}

impl TcpConfig {
    /// True when the client at `ip` may connect (`tcp.allow`, `tcp.deny`).
    pub fn admits(&self, ip: std::net::IpAddr) -> bool {
        super::admits(&self.allow, &self.deny, ip)
    }

    /// The per-source limit in force: the configured one, or the default that follows
    /// the global limit.
    pub fn per_ip_limit(&self) -> usize {
        self.max_connections_per_ip
            .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_IP.min(self.max_connections))
    }
}

/// UDP echo settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UdpConfig {
    /// Addresses to listen on; empty disables UDP echo.
    pub listen: Vec<SocketAddr>,
    /// Largest datagram echoed; a larger one is dropped, never echoed truncated.
    pub max_datagram_size: usize,
    /// Kernel receive buffer per UDP socket (SO_RCVBUF), in bytes: how much of a burst
    /// waits while echod is busy instead of being dropped. 0 keeps the kernel default.
    pub receive_buffer_size: usize,
    /// Sockets per UDP address (SO_REUSEPORT), each served by its own task so that
    /// more than one worker thread serves the address: 1 (one socket), or 0 for one
    /// per worker thread. Takes effect when a socket is opened (a start, or an address
    /// added by a reload).
    pub sockets_per_address: usize,
    /// Source ports never answered (reflection-loop protection).
    pub deny_source_ports: Vec<u16>,
    /// Also never answer the ports echod's own UDP sockets listen on: a datagram from
    /// one comes from echod itself or from another echo server on the same port, and
    /// answering it starts a loop.
    pub deny_own_ports: bool,
    /// Source addresses answered (CIDRs or single addresses); empty (the default),
    /// every address not denied.
    pub allow: Vec<Cidr>,
    /// Source addresses never answered, even when `allow` lists them.
    pub deny: Vec<Cidr>,
    /// Per-source reply rate limit.
    pub rate_limit: RateLimitConfig,
}

impl Default for UdpConfig {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 7007))],
            max_datagram_size: 65_507,
            receive_buffer_size: 4 * 1024 * 1024,
            sockets_per_address: 1,
            deny_source_ports: DEFAULT_DENY_SOURCE_PORTS.to_vec(),
            deny_own_ports: true,
            allow: Vec::new(),
            deny: Vec::new(),
            rate_limit: RateLimitConfig::default(),
        }
    }
}

impl UdpConfig {
    /// True when datagrams from `ip` may be answered (`udp.allow`, `udp.deny`).
    pub fn admits(&self, ip: std::net::IpAddr) -> bool {
        super::admits(&self.allow, &self.deny, ip)
    }
}

/// TLS echo settings: raw echo inside TLS 1.2 or 1.3, under the `[tcp]` limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Addresses to listen on for TLS echo; empty (the default) disables it.
    pub listen: Vec<SocketAddr>,
    /// The server certificate, PEM, leaf first (a chain may follow).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// The private key of that certificate, PEM (PKCS#8, PKCS#1 or SEC1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// CA certificates, PEM: set, every client must present a certificate they signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// A connection whose handshake (PROXY header included) is not done by then is
    /// closed and counted as `timeout`.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// The files above, read and checked by [`ConfigSource::load`](super::ConfigSource)
    /// when `listen` is not empty (never read from TOML); re-read on every reload.
    #[serde(skip)]
    pub loaded: Option<Arc<TlsMaterial>>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            handshake_timeout: Duration::from_secs(10),
            loaded: None,
        }
    }
}

/// A token bucket per source address, in a table of bounded size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained replies per second to one source address; 0 turns the limit off.
    pub packets_per_second: u32,
    /// Replies one source may get in a burst above the sustained rate.
    pub burst: u32,
    /// Source addresses tracked at most; beyond it new sources are not answered.
    pub max_sources: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            packets_per_second: 1_000,
            burst: 2_000,
            max_sources: 65_536,
        }
    }
}

/// The HTTP endpoint (metrics and health).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Addresses to serve `/metrics`, `/healthz` and `/readyz` on; empty disables.
    pub listen: Vec<SocketAddr>,
    /// A Prometheus exporter web configuration file (exporter-toolkit's
    /// `--web.config.file` format: `tls_server_config`, `basic_auth_users`); unset (the
    /// default), the endpoint is plain HTTP and open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub web_config_file: Option<PathBuf>,
    /// Client addresses served (CIDRs or single addresses); empty (the default), every
    /// address not denied.
    pub allow: Vec<Cidr>,
    /// Client addresses refused, even when `allow` lists them.
    pub deny: Vec<Cidr>,
    /// That file, loaded and checked by [`ConfigSource::load`] (never read from TOML).
    #[serde(skip)]
    pub web_config: Option<Arc<WebConfig>>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 9107))],
            web_config_file: None,
            allow: Vec::new(),
            deny: Vec::new(),
            web_config: None,
        }
    }
}

impl MetricsConfig {
    /// True when the client at `ip` may connect (`metrics.allow`, `metrics.deny`).
    pub fn admits(&self, ip: std::net::IpAddr) -> bool {
        super::admits(&self.allow, &self.deny, ip)
    }
}

/// Graceful shutdown settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long open connections may finish after a stop before they are cut.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// trace, debug, info, warn or error (or a full `RUST_LOG`-style filter).
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// How log lines are written; also the `--log-format` flag's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines for a terminal or the journal.
    #[default]
    Text,
    /// One JSON object per line for log shippers.
    Json,
}

impl Config {
    /// The effective configuration as TOML, for `check-config` and the logs.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}
