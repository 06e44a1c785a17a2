//! `echod probe`: a health check that exercises the real echo path, not just a port.
//!
//! A TCP or UDP probe sends a fresh random nonce and demands exactly it back, so a port
//! held open by a wedged process, or a proxy answering for a dead backend, fails. An
//! HTTP probe demands a 2xx (`/readyz`). With no targets the local configuration says
//! what to check, so a container HEALTHCHECK or a Kubernetes exec probe is one word.
//!
//! `--tcp tls://HOST:PORT` does the same inside TLS, verified by `--ca` (or not, with
//! `--insecure`), presenting `--cert`/`--key` to a mutual-TLS server.
//! HTTPS needs something to trust: `--ca-file` for a URL given on the command line;
//! without targets, when the local web config turns TLS on, the probe trusts exactly
//! the certificate echod serves (`tls_server_config.cert_file`), so it needs neither a
//! CA nor a matching host name to check its own endpoint on loopback.
//! Blocking sockets with deadlines keep a healthy probe in the millisecond range: no
//! runtime to start, no threads.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use rustls::ClientConfig;

use super::net::{self, ResolveError, UDP_ATTEMPTS, UdpFailure};
use super::tls::{self, TlsArgs, TlsSetupError, Trust};
use crate::config::web::ClientAuth;
use crate::config::{Config, ConfigSource, WebConfig};

/// `echod probe` flags.
#[derive(Debug, Args, Clone)]
pub struct ProbeArgs {
    /// TCP echo address (HOST:PORT, or tls://HOST:PORT for echo over TLS) to send a
    /// nonce to and expect it back; repeatable.
    #[arg(long = "tcp", value_name = "ADDR")]
    pub(crate) tcp: Vec<String>,
    /// UDP echo address (HOST:PORT), probed with retries; repeatable.
    #[arg(long = "udp", value_name = "ADDR")]
    pub(crate) udp: Vec<String>,
    /// HTTP(S) URL that must answer 2xx, e.g. http://127.0.0.1:9107/readyz; repeatable.
    #[arg(long = "http", value_name = "URL")]
    pub(crate) http: Vec<String>,
    /// How tls:// and https:// targets are verified, and the client certificate.
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
    /// Time allowed for each check (e.g. 500ms, 2s).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
}

/// One thing to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A TCP echo service.
    Tcp(String),
    /// A TCP echo service inside TLS (`tls://HOST:PORT`, the address without the scheme).
    Tls(String),
    /// A UDP echo service.
    Udp(String),
    /// An HTTP endpoint that must answer 2xx.
    Http(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(a) => write!(f, "tcp {a}"),
            Target::Tls(a) => write!(f, "tls {a}"),
            Target::Udp(a) => write!(f, "udp {a}"),
            Target::Http(u) => write!(f, "http {u}"),
        }
    }
}

/// Why a check failed, in the words an operator reads in a health-check log.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    /// The address did not resolve.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// Nothing to connect to, or the connection failed.
    #[error("connect failed: {0}")]
    Connect(io::Error),
    /// No (complete) answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The peer answered something other than the nonce.
    #[error("wrong reply: sent {sent} bytes, got {got:?}")]
    WrongReply {
        /// Nonce length.
        sent: usize,
        /// What came back (lossy text, truncated).
        got: String,
    },
    /// The peer closed the connection before the whole nonce came back.
    #[error("connection closed after {got} of {sent} bytes of the echo")]
    Closed {
        /// Bytes echoed before the close.
        got: usize,
        /// Nonce length.
        sent: usize,
    },
    /// The HTTP endpoint answered, but not 2xx.
    #[error("HTTP status {0}")]
    Status(u16),
    /// The URL is not `http(s)://host:port/path`.
    #[error("unsupported URL {0:?} (expected http://HOST:PORT/PATH or https://…)")]
    Url(String),
    /// An https URL with nothing to verify the server by.
    #[error("https needs --ca-file (the CA that signed the endpoint's certificate)")]
    NoTrust,
    /// A tls:// target or a TLS file cannot be set up.
    #[error(transparent)]
    Setup(#[from] TlsSetupError),
    /// The TLS handshake or session failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// A file for TLS (--ca-file, --client-cert, --client-key) cannot be used.
    #[error("{0}")]
    TlsSetup(String),
    /// Some other socket error.
    #[error("{0}")]
    Io(io::Error),
    /// Nothing to probe (no targets and none in the configuration).
    #[error("nothing to probe: no --tcp/--udp/--http given and no listeners configured")]
    Nothing,
}

impl ProbeError {
    fn from_io(e: io::Error, timeout: Duration) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ProbeError::Timeout(timeout),
            _ => ProbeError::Io(e),
        }
    }
}

/// Runs `echod probe` and maps the outcome to the exit code: 0 healthy, 1 unhealthy.
pub fn run(args: &ProbeArgs, source: &ConfigSource) -> ExitCode {
    let setup = targets(args, source).and_then(|(targets, local)| {
        let https = https_client(args, local.as_deref()).map_err(|e| e.to_string())?;
        let echo = if targets.iter().any(|t| matches!(t, Target::Tls(_))) {
            Some(
                args.tls
                    .client_config("a tls:// target")
                    .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        Ok((
            targets,
            Clients {
                https,
                echo,
                tls: &args.tls,
            },
        ))
    });
    let (targets, tls) = match setup {
        Ok(t) => t,
        Err(e) => {
            eprintln!("echod probe: unhealthy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut passed = Vec::with_capacity(targets.len());
    for target in &targets {
        let started = Instant::now();
        match check(target, args.timeout, &tls) {
            Ok(()) => passed.push(format!(
                "{target} ({:.1} ms)",
                started.elapsed().as_secs_f64() * 1e3
            )),
            Err(e) => {
                eprintln!("echod probe: unhealthy: {target}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("ok {}", passed.join(", "));
    ExitCode::SUCCESS
}

/// The targets given on the command line, or those of the local configuration (with
/// its web config, whose certificate the local endpoint is then trusted by).
fn targets(
    args: &ProbeArgs,
    source: &ConfigSource,
) -> Result<(Vec<Target>, Option<Arc<WebConfig>>), String> {
    let given: Vec<Target> = args
        .tcp
        .iter()
        .cloned()
        .map(|addr| match tls::split_target(&addr) {
            (true, addr) => Target::Tls(addr.to_string()),
            (false, _) => Target::Tcp(addr),
        })
        .chain(args.udp.iter().cloned().map(Target::Udp))
        .chain(args.http.iter().cloned().map(Target::Http))
        .collect();
    if !given.is_empty() {
        return Ok((given, None));
    }
    let config = source
        .load()
        .map_err(|e| format!("cannot load the configuration: {e}"))?;
    let local = config_targets(&config);
    if local.is_empty() {
        return Err(ProbeError::Nothing.to_string());
    }
    Ok((local, config.metrics.web_config))
}

/// What a probe without arguments checks: readiness on the first metrics address and
/// the first TCP echo listener (the first UDP one when TCP is off).
pub(crate) fn config_targets(config: &Config) -> Vec<Target> {
    let mut targets = Vec::new();
    if let Some(addr) = config.metrics.listen.first() {
        let tls = config
            .metrics
            .web_config
            .as_ref()
            .is_some_and(|w| w.tls.is_some());
        let scheme = if tls { "https" } else { "http" };
        targets.push(Target::Http(format!(
            "{scheme}://{}/readyz",
            reachable(*addr)
        )));
    }
    if let Some(addr) = config.tcp.listen.first() {
        targets.push(Target::Tcp(reachable(*addr).to_string()));
    } else if let Some(addr) = config.udp.listen.first() {
        targets.push(Target::Udp(reachable(*addr).to_string()));
    }
    targets
}

/// A listen address as a local client reaches it: a wildcard means loopback.
pub(crate) fn reachable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// The TLS clients of a run: for https URLs (if anything to trust) and for tls:// echo
/// targets (if any), with the flags that name the server.
pub(crate) struct Clients<'a> {
    https: Option<Arc<ClientConfig>>,
    echo: Option<Arc<ClientConfig>>,
    tls: &'a TlsArgs,
}

/// Runs one check within `timeout`.
pub(crate) fn check(
    target: &Target,
    timeout: Duration,
    tls: &Clients<'_>,
) -> Result<(), ProbeError> {
    let deadline = Deadline::new(timeout);
    match target {
        Target::Tcp(addr) => {
            let stream = connect(addr, &deadline)?;
            let socket = stream.try_clone().map_err(ProbeError::Io)?;
            check_echo(stream, &socket, &deadline)
        }
        Target::Tls(addr) => {
            let config = tls
                .echo
                .clone()
                .ok_or(ProbeError::Setup(TlsSetupError::NoTrust("a tls:// target")))?;
            let name = tls.tls.server_name(addr)?;
            let mut stream = connect(addr, &deadline)?;
            let socket = stream.try_clone().map_err(ProbeError::Io)?;
            let mut conn = rustls::ClientConnection::new(config, name)
                .map_err(|e| ProbeError::Tls(e.to_string()))?;
            tls::handshake_by(&mut conn, &mut stream, deadline.at)
                .map_err(|e| tls_error(deadline.io_error(e)))?;
            check_echo(rustls::StreamOwned::new(conn, stream), &socket, &deadline)
                .map_err(tls_error)
        }
        Target::Udp(addr) => check_udp(addr, &deadline),
        Target::Http(url) => check_http(url, &deadline, tls.https.as_ref()),
    }
}

/// rustls reports handshake failures as I/O errors wrapping its own: say it is TLS.
fn tls_error(e: ProbeError) -> ProbeError {
    match e {
        ProbeError::Io(e) => match tls::tls_failure(&e) {
            Some(why) => ProbeError::Tls(why),
            None => ProbeError::Io(e),
        },
        other => other,
    }
}

/// The TLS client for https targets: trusting `--ca-file`, or else the certificate of
/// the local web config; presenting `--client-cert` when given. `None` when there is
/// nothing to trust (an https target then fails, saying so).
fn https_client(
    args: &ProbeArgs,
    local: Option<&WebConfig>,
) -> Result<Option<Arc<ClientConfig>>, ProbeError> {
    let local_tls = local.and_then(|w| w.tls.as_ref());
    let trust = match (
        args.tls.trust(),
        local_tls.and_then(|t| t.cert_chain.first()),
    ) {
        (Some(trust), _) => trust,
        (None, Some(served)) => Trust::Pinned(served.clone()),
        (None, None) => return Ok(None),
    };
    if args.tls.identity().is_none()
        && local_tls.is_some_and(|t| t.client_auth == ClientAuth::RequireAndVerifyClientCert)
    {
        return Err(ProbeError::TlsSetup(
            "the local endpoint requires client certificates (client_auth_type \
             RequireAndVerifyClientCert): give --client-cert and --client-key"
                .to_string(),
        ));
    }
    Ok(Some(tls::client_config(trust, args.tls.identity())?))
}

/// One time budget shared by the steps of a check (resolve, connect, send, receive).
struct Deadline {
    at: Instant,
    total: Duration,
}

impl Deadline {
    fn new(total: Duration) -> Self {
        Self {
            at: Instant::now() + total,
            total,
        }
    }

    /// Time left; an exhausted budget is a timeout.
    fn remaining(&self) -> Result<Duration, ProbeError> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(ProbeError::Timeout(self.total))
        } else {
            Ok(left)
        }
    }

    fn io_error(&self, e: io::Error) -> ProbeError {
        ProbeError::from_io(e, self.total)
    }
}

/// Connects to the first address of `addr` that accepts within the deadline.
fn connect(addr: &str, deadline: &Deadline) -> Result<TcpStream, ProbeError> {
    let mut last = None;
    for candidate in net::resolve(addr)? {
        match TcpStream::connect_timeout(&candidate, deadline.remaining()?) {
            Ok(stream) => {
                let left = deadline.remaining()?;
                stream
                    .set_read_timeout(Some(left))
                    .map_err(ProbeError::Io)?;
                stream
                    .set_write_timeout(Some(left))
                    .map_err(ProbeError::Io)?;
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(ProbeError::Timeout(deadline.total));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(ProbeError::Connect(
        last.unwrap_or_else(|| io::Error::other("no address")),
    ))
}

/// A nonce no earlier probe or stray packet can match.
fn nonce() -> Vec<u8> {
    let mut rng = fastrand::Rng::new();
    format!("echod-probe {:032x}\n", rng.u128(..)).into_bytes()
}

fn expect_echo(sent: &[u8], got: &[u8]) -> Result<(), ProbeError> {
    if sent == got {
        Ok(())
    } else {
        let shown = String::from_utf8_lossy(&got[..got.len().min(64)]).into_owned();
        Err(ProbeError::WrongReply {
            sent: sent.len(),
            got: shown,
        })
    }
}

/// Sends a nonce on `stream` (plain or TLS over `socket`) and demands it back.
fn check_echo(
    mut stream: impl Read + Write,
    socket: &TcpStream,
    deadline: &Deadline,
) -> Result<(), ProbeError> {
    let nonce = nonce();
    stream.write_all(&nonce).map_err(|e| deadline.io_error(e))?;
    let mut got = vec![0u8; nonce.len()];
    let mut filled = 0;
    while filled < got.len() {
        socket
            .set_read_timeout(Some(deadline.remaining()?))
            .map_err(ProbeError::Io)?;
        match stream.read(&mut got[filled..]) {
            Ok(0) => {
                return Err(ProbeError::Closed {
                    got: filled,
                    sent: nonce.len(),
                });
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(deadline.io_error(e)),
        }
        // A wrong prefix fails at once instead of waiting for the rest.
        expect_echo(&nonce[..filled], &got[..filled])?;
    }
    expect_echo(&nonce, &got[..filled])
}

fn check_udp(addr: &str, deadline: &Deadline) -> Result<(), ProbeError> {
    let target = net::resolve(addr)?[0];
    let socket = net::connected_udp(target).map_err(ProbeError::Connect)?;
    let nonce = nonce();
    let mut buf = vec![0u8; 2048];
    let n = net::udp_exchange(
        &socket,
        &nonce,
        &mut buf,
        UDP_ATTEMPTS,
        deadline.remaining()?,
    )
    .map_err(|f| match f {
        UdpFailure::Refused(e) => ProbeError::Connect(e),
        UdpFailure::Silence => ProbeError::Timeout(deadline.total),
        UdpFailure::Io(_, e) => ProbeError::Io(e),
    })?;
    expect_echo(&nonce, &buf[..n])
}

/// A URL the probe can GET.
#[derive(Debug, PartialEq, Eq)]
struct Url {
    tls: bool,
    /// `host:port`, the port filled in.
    authority: String,
    path: String,
}

/// Splits `http(s)://host:port/path` into its parts.
fn parse_url(url: &str) -> Result<Url, ProbeError> {
    let (tls, rest, default_port) = if let Some(rest) = url.strip_prefix("http://") {
        (false, rest, 80)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (true, rest, 443)
    } else {
        return Err(ProbeError::Url(url.to_string()));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(ProbeError::Url(url.to_string()));
    }
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && !port.contains(']'));
    let authority = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    Ok(Url {
        tls,
        authority,
        path: path.to_string(),
    })
}

fn check_http(
    url: &str,
    deadline: &Deadline,
    tls: Option<&Arc<ClientConfig>>,
) -> Result<(), ProbeError> {
    let url = parse_url(url)?;
    let tls = match (url.tls, tls) {
        (true, None) => return Err(ProbeError::NoTrust),
        (true, Some(config)) => Some(Arc::clone(config)),
        (false, _) => None,
    };
    let stream = connect(&url.authority, deadline)?;
    // The same socket, to set its read timeout while TLS owns the stream.
    let socket = stream.try_clone().map_err(ProbeError::Io)?;
    match tls {
        None => http_exchange(stream, &socket, &url, deadline),
        Some(config) => {
            let conn = rustls::ClientConnection::new(config, tls::server_name(&url.authority)?)
                .map_err(|e| ProbeError::Tls(e.to_string()))?;
            let tls = rustls::StreamOwned::new(conn, stream);
            http_exchange(tls, &socket, &url, deadline).map_err(tls_error)
        }
    }
}

/// Sends the GET on `stream` and demands a 2xx status line.
fn http_exchange(
    mut stream: impl Read + Write,
    socket: &TcpStream,
    url: &Url,
    deadline: &Deadline,
) -> Result<(), ProbeError> {
    let Url {
        authority, path, ..
    } = url;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: echod-probe\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| deadline.io_error(e))?;
    // Only the status line matters; read until its end.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 8192 {
        socket
            .set_read_timeout(Some(deadline.remaining()?))
            .map_err(ProbeError::Io)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(deadline.io_error(e)),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let status = line
        .lines()
        .next()
        .filter(|l| l.starts_with("HTTP/1."))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| ProbeError::WrongReply {
            sent: request.len(),
            got: line.chars().take(64).collect(),
        })?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(ProbeError::Status(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_map_to_loopback() {
        assert_eq!(
            reachable("0.0.0.0:7".parse().unwrap()),
            "127.0.0.1:7".parse().unwrap()
        );
        assert_eq!(
            reachable("[::]:7".parse().unwrap()),
            "[::1]:7".parse().unwrap()
        );
        assert_eq!(
            reachable("10.1.2.3:7".parse().unwrap()),
            "10.1.2.3:7".parse().unwrap()
        );
    }

    #[test]
    fn urls_split_into_authority_and_path() {
        let url = |tls, authority: &str, path: &str| Url {
            tls,
            authority: authority.into(),
            path: path.into(),
        };
        let cases = [
            (
                "http://127.0.0.1:9107/readyz",
                false,
                "127.0.0.1:9107",
                "/readyz",
            ),
            ("http://[::1]:9107", false, "[::1]:9107", "/"),
            ("http://localhost/x", false, "localhost:80", "/x"),
            ("https://localhost/x", true, "localhost:443", "/x"),
            ("https://[::1]:9107/readyz", true, "[::1]:9107", "/readyz"),
        ];
        for (input, tls, authority, path) in cases {
            assert_eq!(
                parse_url(input).unwrap(),
                url(tls, authority, path),
                "{input}"
            );
        }
        assert!(parse_url("ftp://x/").is_err());
        assert!(parse_url("http:///x").is_err());
    }

    #[test]
    fn default_config_probes_readiness_and_tcp() {
        let targets = config_targets(&Config::default());
        assert_eq!(
            targets,
            vec![
                Target::Http("http://127.0.0.1:9107/readyz".into()),
                Target::Tcp("127.0.0.1:7007".into()),
            ]
        );
    }
}
