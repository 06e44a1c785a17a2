//! Which values are allowed: range and consistency checks that types alone cannot
//! express, and the log filter parsed exactly as the logger will parse it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use super::Config;

/// The largest socket buffer a config may ask for (256 MiB): the kernel doubles the
/// request into an `int`, and more than this per socket is a typo, not a plan.
const MAX_SOCKET_BUFFER: usize = 256 * 1024 * 1024;

/// The most sockets one UDP address may have (`udp.sockets_per_address`).
const MAX_UDP_SOCKETS_PER_ADDRESS: usize = 256;

/// The longest a timeout or a deadline may be (365 days): a deadline is an instant
/// plus this, which must not overflow, and anything longer is a typo for "no limit".
pub(super) const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// The longest `tcp.keepalive`: Linux's limit for `TCP_KEEPIDLE` (32767 s).
pub(super) const MAX_KEEPALIVE: Duration = Duration::from_secs(32_767);

pub(super) type Invalid = (&'static str, String);

/// A duration no longer than `max`.
fn at_most(key: &'static str, value: Duration, max: Duration) -> Result<(), Invalid> {
    check(value <= max, key, || {
        format!(
            "must be at most {}s, got {}",
            max.as_secs(),
            humantime::format_duration(value)
        )
    })
}

fn check(ok: bool, key: &'static str, message: impl FnOnce() -> String) -> Result<(), Invalid> {
    if ok { Ok(()) } else { Err((key, message())) }
}

/// A timeout or deadline: longer than 0s and at most [`MAX_DURATION`].
fn timeout(key: &'static str, value: Duration) -> Result<(), Invalid> {
    longer_than_zero(key, value)?;
    at_most(key, value, MAX_DURATION)
}

fn longer_than_zero(key: &'static str, value: Duration) -> Result<(), Invalid> {
    check(!value.is_zero(), key, || "must be longer than 0s".into())
}

/// A count in `low..=high`.
fn between<T>(key: &'static str, value: T, low: T, high: T) -> Result<(), Invalid>
where
    T: PartialOrd + std::fmt::Display,
{
    check(low <= value && value <= high, key, || {
        format!("must be between {low} and {high}, got {value}")
    })
}

/// A token bucket's burst: at least 1 whenever its rate (`rate_name`, 0 is off) is set.
fn burst(key: &'static str, burst: u32, rate_name: &str, rate: u32) -> Result<(), Invalid> {
    check(rate == 0 || burst >= 1, key, || {
        format!("must be at least 1 when {rate_name} is set")
    })
}

fn at_least_one(key: &'static str, value: usize) -> Result<(), Invalid> {
    check(value >= 1, key, || "must be at least 1".into())
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
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        let tcp = &self.tcp;
        no_duplicates("tcp.listen", &tcp.listen)?;
        between("tcp.backlog", tcp.backlog, 1, 65_535)?;
        at_least_one("tcp.max_connections", tcp.max_connections)?;
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
        timeout("tcp.idle_timeout", tcp.idle_timeout)?;
        if let Some(d) = tcp.max_connection_duration {
            at_most("tcp.max_connection_duration", d, MAX_DURATION)?;
        }
        at_most("tcp.keepalive", tcp.keepalive, MAX_KEEPALIVE)?;
        // `TCP_KEEPIDLE` counts whole seconds: below one, the kernel's default (2 h)
        // would be used without a word.
        check(
            tcp.keepalive.is_zero() || tcp.keepalive >= Duration::from_secs(1),
            "tcp.keepalive",
            || {
                format!(
                    "must be 0s (off) or at least 1s, got {}",
                    humantime::format_duration(tcp.keepalive)
                )
            },
        )?;
        at_most(
            "tcp.proxy_protocol.header_timeout",
            tcp.proxy_protocol.header_timeout,
            MAX_DURATION,
        )?;
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
        between("tcp.buffer_size", tcp.buffer_size, 512, 16 * 1024 * 1024)?;
        socket_buffer("tcp.send_buffer_size", tcp.send_buffer_size)?;
        socket_buffer("tcp.receive_buffer_size", tcp.receive_buffer_size)?;
        longer_than_zero(
            "tcp.proxy_protocol.header_timeout",
            tcp.proxy_protocol.header_timeout,
        )?;
        let rate = &tcp.connection_rate;
        burst(
            "tcp.connection_rate.burst",
            rate.burst,
            "per_second",
            rate.per_second,
        )?;
        at_least_one("tcp.connection_rate.max_sources", rate.max_sources)?;
        let udp = &self.udp;
        no_duplicates("udp.listen", &udp.listen)?;
        between("udp.max_datagram_size", udp.max_datagram_size, 1, 65_535)?;
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
        burst(
            "udp.rate_limit.burst",
            rl.burst,
            "packets_per_second",
            rl.packets_per_second,
        )?;
        at_least_one("udp.rate_limit.max_sources", rl.max_sources)?;
        no_duplicates("metrics.listen", &self.metrics.listen)?;
        no_duplicates("tls.listen", &self.tls.listen)?;
        timeout("tls.handshake_timeout", self.tls.handshake_timeout)?;
        timeout("shutdown.drain_timeout", self.shutdown.drain_timeout)?;
        if let Err(message) = parse_log_filter(&self.log.level) {
            return Err(("log.level", message));
        }
        Ok(())
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
