//! Configuration: embedded defaults → TOML file → `ECHOD_*` environment → CLI overrides.
//!
//! Loading is a pure function of its inputs, so the same code validates at start-up,
//! in `echod check-config` and on reload: a config that one accepts, all accept.
//! Every error names where the bad value came from (the file or the environment), the
//! dotted key and what is wrong, because an operator reading a journal has nothing else.
//!
//! This module depends on nothing else in the crate: the daemon, the tools and the
//! command line all read it, so it sits at the bottom of the house.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod cidr;
pub mod web;
pub use cidr::{Cidr, CidrError};
pub use web::{WebConfig, WebConfigError};

/// The documented defaults file, kept in the repository as `config/echod.toml`; a test
/// proves it matches [`Config::default`] so the documentation cannot drift.
pub const DOCUMENTED_DEFAULTS: &str = include_str!("../config/echod.toml");

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
            buffer_size: 16 * 1024,
            send_buffer_size: 256 * 1024,
            receive_buffer_size: 256 * 1024,
            nodelay: true,
            keepalive: Duration::from_secs(60),
            max_connection_duration: None,
            max_bytes_per_connection: None,
            proxy_protocol: ProxyProtocolConfig::default(),
        }
    }
}

impl TcpConfig {
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
            rate_limit: RateLimitConfig::default(),
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
    /// That file, loaded and checked by [`ConfigSource::load`] (never read from TOML).
    #[serde(skip)]
    pub web_config: Option<Arc<WebConfig>>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 9107))],
            web_config_file: None,
            web_config: None,
        }
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

/// Where the configuration comes from; kept so a reload reads the same sources again.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The TOML file, if any; without one the embedded defaults apply.
    pub file: Option<PathBuf>,
    /// `key = value` overrides from the command line, applied last.
    pub overrides: Vec<(String, String)>,
}

/// A configuration that cannot be used, with enough context to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named by the operator.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema.
    #[error("invalid config file {path}: {message}")]
    File {
        /// The file named by the operator.
        path: PathBuf,
        /// The parser's message, with line, column and key.
        message: String,
    },
    /// An `ECHOD_*` variable whose name is not a configuration key.
    #[error("invalid environment variable `{name}`: {message}")]
    Variable {
        /// The variable's name.
        name: String,
        /// What is wrong with it.
        message: String,
    },
    /// An `ECHOD_*` variable or CLI override does not fit the schema.
    #[error("invalid configuration from environment (ECHOD_*) or command line: {0}")]
    Layer(String),
    /// A value is well-typed but out of range or inconsistent.
    #[error("invalid configuration ({origin}): key `{key}`: {message}")]
    Value {
        /// Where the value came from: the environment variable, the command line, the
        /// file, or the defaults.
        origin: String,
        /// The dotted key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The key naming the exporter web configuration file.
const WEB_CONFIG_KEY: &str = "metrics.web_config_file";

impl ConfigSource {
    /// Reads every layer and validates the result.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        self.load_with_env(&env)
    }

    /// Like [`ConfigSource::load`], with the environment passed in (for tests).
    pub fn load_with_env(&self, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut config = self.load_settings(env)?;
        if let Some(path) = &config.metrics.web_config_file {
            let web = WebConfig::load(path).map_err(|e| ConfigError::Value {
                origin: self.origin_of(WEB_CONFIG_KEY, env),
                key: WEB_CONFIG_KEY.to_string(),
                message: format!("web config file {}: {e}", path.display()),
            })?;
            config.metrics.web_config = Some(Arc::new(web));
        }
        Ok(config)
    }

    /// Every layer merged and validated, without reading the files the settings name.
    fn load_settings(&self, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        check_variable_names(env)?;
        let mut builder = config::Config::builder();
        let mut file_text = None;
        if let Some(path) = &self.file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            // The toml crate points at the exact line, column and key; the config crate
            // would not name the file.
            let file_error = |message: String| ConfigError::File {
                path: path.clone(),
                message,
            };
            toml::from_str::<Config>(&text)
                .map_err(|e| file_error(plain(e.to_string().trim_end())))?;
            check_integers(&text).map_err(file_error)?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
            file_text = Some(text);
        }
        builder = builder.add_source(environment_layer(env));
        // `ECHOD_UDP__LISTEN=` means "no addresses": the list parser would read one
        // empty address instead.
        for key in LIST_KEYS {
            let var = format!("ECHOD_{}", key.to_uppercase().replace('.', "__"));
            if env.get(&var).is_some_and(|v| v.trim().is_empty()) {
                builder = builder
                    .set_override(key, Vec::<String>::new())
                    .map_err(|e| ConfigError::Layer(plain(&e.to_string())))?;
            }
        }
        for (key, value) in &self.overrides {
            builder = builder
                .set_override(key.as_str(), value.as_str())
                .map_err(|e| ConfigError::Layer(plain(&e.to_string())))?;
        }
        let merged = builder
            .build()
            .and_then(config::Config::try_deserialize::<Config>);
        let config = match (merged, &self.file, &file_text) {
            (Ok(config), _, _) => config,
            // The file passed the checks above but not the loader: still the file's
            // fault when the loader refuses it alone, so name the file, not the
            // environment.
            (Err(e), Some(path), Some(text)) if file_alone_fails(text) => {
                return Err(ConfigError::File {
                    path: path.clone(),
                    message: plain(&e.to_string()),
                });
            }
            (Err(e), _, _) => return Err(ConfigError::Layer(plain(&e.to_string()))),
        };
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Value {
                origin: self.origin_of(key, env),
                key: key.to_string(),
                message,
            })?;
        Ok(config)
    }

    /// Where the value of dotted `key` came from, highest layer first.
    fn origin_of(&self, key: &str, env: &HashMap<String, String>) -> String {
        if self.overrides.iter().any(|(k, _)| k == key) {
            return "command line".to_string();
        }
        let wanted = format!("ECHOD_{}", key.replace('.', "__"));
        if let Some(name) = env.keys().find(|name| name.eq_ignore_ascii_case(&wanted)) {
            return format!("environment variable {name}");
        }
        match &self.file {
            Some(path) => path.display().to_string(),
            None => "defaults".to_string(),
        }
    }
}

/// The loader reads `ECHOD_A__B[3]` as element 3 of `a.b`, growing the list to that
/// index (`[99999999999]` asks for terabytes and aborts the process), and `.` as a key
/// separator. Configuration variables are names only: letters, digits and `_`.
fn check_variable_names(env: &HashMap<String, String>) -> Result<(), ConfigError> {
    let bad = env
        .keys()
        .filter(|name| is_config_variable(name))
        .find(|name| !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    let Some(name) = bad else {
        return Ok(());
    };
    // The key the variable was meant for: its name up to the first stray character.
    let key = name["ECHOD_".len()..]
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
        .replace("__", ".");
    Err(ConfigError::Variable {
        name: name.clone(),
        message: format!(
            "key `{key}`: configuration variables are named ECHOD_SECTION__KEY with \
             letters, digits and `_` only; list elements cannot be set one by one by index \
             (set the whole list, comma-separated)"
        ),
    })
}

/// `ECHOD_SECTION__KEY` variables configure echod; single-segment ones such as
/// `ECHOD_CONFIG` or Kubernetes' injected `ECHOD_SERVICE_HOST` do not.
fn is_config_variable(name: &str) -> bool {
    name.starts_with("ECHOD_") && name.contains("__")
}

/// The loader reads every TOML integer as an i64, while the schema check above reads an
/// unsigned field as a u64: a value between the two passes one and fails the other
/// with no key named. Finds such a value and names its key and line.
fn check_integers(text: &str) -> Result<(), String> {
    // Syntax errors were reported by the schema check, with more detail.
    let Ok(doc) = toml::de::DeTable::parse(text) else {
        return Ok(());
    };
    let mut key = String::new();
    for (name, value) in doc.get_ref() {
        key.clear();
        key.push_str(name.get_ref());
        check_integer(value, &mut key, text)?;
    }
    Ok(())
}

fn check_integer(
    value: &toml::Spanned<toml::de::DeValue<'_>>,
    key: &mut String,
    text: &str,
) -> Result<(), String> {
    let len = key.len();
    let result = match value.get_ref() {
        toml::de::DeValue::Integer(n) if i64::from_str_radix(n.as_str(), n.radix()).is_err() => {
            let line = text
                .get(..value.span().start)
                .map_or(0, |before| before.matches('\n').count() + 1);
            Err(format!(
                "key `{key}` (line {line}): integer is larger than {}, the most a \
                 configuration value can be",
                i64::MAX
            ))
        }
        toml::de::DeValue::Table(table) => table.iter().try_for_each(|(name, value)| {
            key.truncate(len);
            key.push('.');
            key.push_str(name.get_ref());
            check_integer(value, key, text)
        }),
        toml::de::DeValue::Array(items) => items.iter().enumerate().try_for_each(|(i, value)| {
            key.truncate(len);
            key.push_str(&format!("[{i}]"));
            check_integer(value, key, text)
        }),
        _ => Ok(()),
    };
    key.truncate(len);
    result
}

/// True when the loader refuses the file's text on its own.
fn file_alone_fails(text: &str) -> bool {
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(config::Config::try_deserialize::<Config>)
        .is_err()
}

/// Says a parser's message in an operator's words: the TOML and config crates speak of
/// Rust types (`expected usize`, `enum LogFormat does not have variant constructor`),
/// which mean nothing to someone editing a config file.
fn plain(message: &str) -> String {
    let mut text = message.to_string();
    for rust_type in [
        "usize",
        "u64",
        "u32",
        "u16",
        "u8",
        "i64",
        "i32",
        "an integer",
    ] {
        text = text.replace(&format!("expected {rust_type}"), "expected a whole number");
    }
    text = text
        .replace("invalid type: ", "got ")
        .replace("unknown variant", "unknown value")
        .replace(
            "invalid socket address syntax",
            "expected IP:PORT with a numeric address (IPv4, or IPv6 in brackets) and a port \
             from 0 to 65535; host names are not resolved",
        );
    const CONSTRUCTOR: &str = " does not have variant constructor ";
    if let (Some(start), Some(at)) = (text.find("enum "), text.find(CONSTRUCTOR)) {
        let value_start = at + CONSTRUCTOR.len();
        let value_end = text[value_start..]
            .find(char::is_whitespace)
            .map_or(text.len(), |i| value_start + i);
        let value = text[value_start..value_end].to_string();
        text.replace_range(start..value_end, &format!("unknown value `{value}`"));
    }
    text
}

/// Keys whose environment values are comma-separated lists.
const LIST_KEYS: [&str; 5] = [
    "tcp.listen",
    "tcp.proxy_protocol.trusted_sources",
    "udp.listen",
    "metrics.listen",
    "udp.deny_source_ports",
];

/// Only `ECHOD_SECTION__KEY` variables are configuration ([`is_config_variable`]); the
/// others must not trip unknown-key detection.
fn environment_layer(env: &HashMap<String, String>) -> config::Environment {
    let filtered: config::Map<String, String> = env
        .iter()
        .filter(|(k, v)| is_config_variable(k) && !v.trim().is_empty())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    LIST_KEYS.iter().fold(
        config::Environment::with_prefix("ECHOD")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .source(Some(filtered)),
        |env, key| env.with_list_parse_key(key),
    )
}

/// The largest socket buffer a config may ask for (256 MiB): the kernel doubles the
/// request into an `int`, and more than this per socket is a typo, not a plan.
const MAX_SOCKET_BUFFER: usize = 256 * 1024 * 1024;

/// The most sockets one UDP address may have (`udp.sockets_per_address`).
const MAX_UDP_SOCKETS_PER_ADDRESS: usize = 256;

type Invalid = (&'static str, String);

fn check(ok: bool, key: &'static str, message: impl FnOnce() -> String) -> Result<(), Invalid> {
    if ok { Ok(()) } else { Err((key, message())) }
}

/// A socket buffer size: 0 (the kernel decides) or 4 KiB to [`MAX_SOCKET_BUFFER`].
fn socket_buffer(key: &'static str, size: usize) -> Result<(), Invalid> {
    check(
        size == 0 || (4096..=MAX_SOCKET_BUFFER).contains(&size),
        key,
        || {
            format!(
                "must be 0 (kernel default) or between 4096 and {MAX_SOCKET_BUFFER}, got {size}"
            )
        },
    )
}

fn no_duplicates(key: &'static str, addrs: &[SocketAddr]) -> Result<(), Invalid> {
    let mut seen = BTreeSet::new();
    for addr in addrs {
        check(seen.insert(addr), key, || {
            format!("address {addr} is listed twice")
        })?;
    }
    Ok(())
}

impl Config {
    /// Range and consistency checks that types alone cannot express.
    fn validate(&self) -> Result<(), Invalid> {
        let tcp = &self.tcp;
        no_duplicates("tcp.listen", &tcp.listen)?;
        check((1..=65_535).contains(&tcp.backlog), "tcp.backlog", || {
            format!("must be between 1 and 65535, got {}", tcp.backlog)
        })?;
        check(tcp.max_connections >= 1, "tcp.max_connections", || {
            "must be at least 1".into()
        })?;
        if let Some(per_ip) = tcp.max_connections_per_ip {
            check(
                (1..=tcp.max_connections).contains(&per_ip),
                "tcp.max_connections_per_ip",
                || {
                    format!(
                        "must be between 1 and tcp.max_connections ({}), got {per_ip}",
                        tcp.max_connections
                    )
                },
            )?;
        }
        check(!tcp.idle_timeout.is_zero(), "tcp.idle_timeout", || {
            "must be longer than 0s".into()
        })?;
        check(
            tcp.max_connection_duration.is_none_or(|d| !d.is_zero()),
            "tcp.max_connection_duration",
            || "must be longer than 0s (leave it unset for no limit)".into(),
        )?;
        check(
            tcp.max_bytes_per_connection.is_none_or(|n| n >= 1),
            "tcp.max_bytes_per_connection",
            || "must be at least 1 (leave it unset for no limit)".into(),
        )?;
        check(
            (512..=16 * 1024 * 1024).contains(&tcp.buffer_size),
            "tcp.buffer_size",
            || format!("must be between 512 and 16777216, got {}", tcp.buffer_size),
        )?;
        socket_buffer("tcp.send_buffer_size", tcp.send_buffer_size)?;
        socket_buffer("tcp.receive_buffer_size", tcp.receive_buffer_size)?;
        check(
            !tcp.proxy_protocol.header_timeout.is_zero(),
            "tcp.proxy_protocol.header_timeout",
            || "must be longer than 0s".into(),
        )?;
        let udp = &self.udp;
        no_duplicates("udp.listen", &udp.listen)?;
        check(
            (1..=65_535).contains(&udp.max_datagram_size),
            "udp.max_datagram_size",
            || format!("must be between 1 and 65535, got {}", udp.max_datagram_size),
        )?;
        socket_buffer("udp.receive_buffer_size", udp.receive_buffer_size)?;
        check(
            udp.sockets_per_address <= MAX_UDP_SOCKETS_PER_ADDRESS,
            "udp.sockets_per_address",
            || {
                format!(
                    "must be between 0 (one per worker thread) and {MAX_UDP_SOCKETS_PER_ADDRESS}, got {}",
                    udp.sockets_per_address
                )
            },
        )?;
        let rl = &udp.rate_limit;
        check(
            rl.packets_per_second == 0 || rl.burst >= 1,
            "udp.rate_limit.burst",
            || "must be at least 1 when packets_per_second is set".into(),
        )?;
        check(rl.max_sources >= 1, "udp.rate_limit.max_sources", || {
            "must be at least 1".into()
        })?;
        no_duplicates("metrics.listen", &self.metrics.listen)?;
        check(
            !self.shutdown.drain_timeout.is_zero(),
            "shutdown.drain_timeout",
            || "must be longer than 0s".into(),
        )?;
        if let Err(message) = parse_log_filter(&self.log.level) {
            return Err(("log.level", message));
        }
        Ok(())
    }

    /// The effective configuration as TOML, for `check-config` and the logs.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

/// The longest `log.level` accepted: a filter is a handful of directives.
pub const MAX_LOG_FILTER_LEN: usize = 1024;

/// Parses a level (`info`) or a full filter (`info,echod=debug`) the way the daemon will
/// use it, so validation and logging can never disagree. A bare word that is not a level
/// is refused: `EnvFilter` would read `loud` as a target name and silently log nothing.
///
/// Field-value filters (`[{peer=1.2.3.4}]`) are refused: tracing-subscriber compiles
/// each value as a regular expression, whose cost doubles with every `[ab]` (114 bytes
/// took 26 s and 832 MB), in `check-config`, at start and on reload. Parsing is also done
/// with regular expressions off, so nothing here ever compiles one. Span and target
/// filters, and field names (`[{peer}]`), remain.
pub fn parse_log_filter(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];
    let level = level.trim();
    if level.len() > MAX_LOG_FILTER_LEN {
        return Err(format!(
            "is {} bytes long; at most {MAX_LOG_FILTER_LEN} are accepted",
            level.len()
        ));
    }
    if has_field_value_filter(level) {
        return Err(
            "field-value filters (`{field=value}`) are not accepted (tracing compiles them \
             as regular expressions); filter by target or span, or on field names only"
                .to_string(),
        );
    }
    let is_directive = level.contains('=') || level.contains(',');
    if !is_directive && !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
        return Err(format!("`{level}` is not one of {}", LEVELS.join(", ")));
    }
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(level)
        .map_err(|e| e.to_string())
}

/// True when a `{…}` field list in `filter` gives a field a value (`{name=value}`).
fn has_field_value_filter(filter: &str) -> bool {
    let mut rest = filter;
    while let Some(open) = rest.find('{') {
        let fields = &rest[open + 1..];
        let close = fields.find('}').unwrap_or(fields.len());
        if fields[..close].contains('=') {
            return true;
        }
        rest = &fields[close..];
    }
    false
}

/// Names the configuration source for log lines; echod reads only a file it is told
/// about, so a stray file on disk cannot change its behaviour.
pub fn describe_source(file: Option<&Path>) -> String {
    file.map_or_else(
        || "embedded defaults".to_string(),
        |p| p.display().to_string(),
    )
}

#[cfg(test)]
mod tests;
