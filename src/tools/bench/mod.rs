//! `echod bench`: a load generator that trusts nothing it is sent back.
//!
//! Modes: TCP ping-pong (N connections, message size, pipelining depth), TCP bulk
//! streaming, TCP connect (a new connection per message), UDP ping-pong; the TCP modes
//! run inside TLS against a tls:// target. Every echoed byte is compared with what was sent
//! ([`pattern`]); latency goes into an HDR histogram; a run is always bounded by
//! `--duration` (and optionally `--count`). With `--rate` the load is open-loop: each
//! message has an intended send time and its latency is measured from that time, so a
//! stalled server cannot hide its stall by slowing the generator down (no coordinated
//! omission). It only ever connects to the one address the user gives.

mod pattern;
mod plot;
mod report;
mod tcp;
mod udp;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::Instant;

use pattern::Pattern;
use report::Report;

use super::net::{self, MAX_DATAGRAM, ResolveError};
use super::tls::{self, TlsArgs, TlsSetupError};

/// Largest message or chunk size accepted.
const MAX_SIZE: usize = 16 * 1024 * 1024;
/// Latencies above this are recorded as this (the histogram's range).
const MAX_LATENCY_NS: u64 = 60_000_000_000;
/// Samples a connection collects before merging them into the shared histogram.
const SAMPLE_BATCH: usize = 512;

/// What kind of load to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// TCP: send a message, wait for its echo (up to `--pipeline` in flight).
    PingPong,
    /// TCP: stream as fast as possible while reading the echo concurrently.
    Bulk,
    /// TCP: a new connection (over TLS: a full handshake) per message, closed after
    /// its echo — connections (handshakes) per second.
    Connect,
    /// UDP: send a datagram, wait for its echo (lost ones are counted).
    Udp,
}

impl Mode {
    /// How reports and plots name the mode.
    pub fn label(self) -> &'static str {
        match self {
            Mode::PingPong => "tcp ping-pong",
            Mode::Bulk => "tcp bulk",
            Mode::Connect => "tcp connect",
            Mode::Udp => "udp ping-pong",
        }
    }
}

/// `echod bench` flags.
#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    /// Echo server to load, HOST:PORT, or tls://HOST:PORT for echo over TLS (only this
    /// address is ever contacted).
    #[arg(default_value = "127.0.0.1:7007")]
    pub(crate) addr: String,
    /// Load pattern.
    #[arg(long, short, value_enum, default_value = "ping-pong")]
    pub(crate) mode: Mode,
    /// Concurrent connections (UDP: sockets).
    #[arg(long, short = 'C', default_value_t = 10)]
    pub(crate) connections: usize,
    /// Message size in bytes (bulk: write size); default 64, bulk 65536.
    #[arg(long, short)]
    pub(crate) size: Option<usize>,
    /// Messages in flight per TCP connection in closed-loop ping-pong.
    #[arg(long, short, default_value_t = 1)]
    pub(crate) pipeline: usize,
    /// How long to send (always bounded).
    #[arg(long, short, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Stop after this many messages in total (or when the duration is over).
    #[arg(long, short = 'n')]
    pub(crate) count: Option<u64>,
    /// Open-loop target rate, messages per second over all connections.
    #[arg(long, short)]
    pub(crate) rate: Option<f64>,
    /// How long an echo may take before the connection counts as stalled (TCP) or the
    /// datagram as lost (UDP).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
    /// Draw the latency percentile plot into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub(crate) plot: Option<PathBuf>,
    /// How a tls:// server is verified, and the client certificate.
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
}

/// Why a benchmark could not run at all.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BenchError {
    /// A flag value is out of range.
    #[error("{0}")]
    Usage(String),
    /// The target did not resolve.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// Not a single connection could be made.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The target.
        addr: SocketAddr,
        /// The first failure.
        reason: String,
    },
    /// The TLS client cannot be set up.
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    /// The runtime or the plot file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What every connection worker shares: the limits, the pattern and the counters.
pub(crate) struct Plan {
    pattern: Pattern,
    size: usize,
    start: Instant,
    /// No new message is sent after this instant (and UDP replies are not awaited).
    stop_sending: Instant,
    /// Open-loop gap between two messages of one connection.
    interval: Option<Duration>,
    timeout: Duration,
    /// Messages not yet claimed when `--count` is set.
    tickets: Option<AtomicU64>,
    live: Live,
    latency: Mutex<Histogram<u64>>,
}

/// Counters the progress bar reads while the run goes on.
#[derive(Default)]
pub(crate) struct Live {
    messages: AtomicU64,
    bytes: AtomicU64,
}

impl Plan {
    /// Claims the right to send one more message, due at `intended` (open loop) or now;
    /// false once the run is over. An open-loop sender that fell behind may catch up
    /// after the duration, but never by more than the timeout.
    fn claim(&self, intended: Option<Instant>) -> bool {
        let now = Instant::now();
        let over = match intended {
            Some(at) => at >= self.stop_sending || now >= self.stop_sending + self.timeout,
            None => now >= self.stop_sending,
        };
        if over {
            return false;
        }
        match &self.tickets {
            None => true,
            Some(t) => t
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok(),
        }
    }

    /// When connection `id`'s message number `seq` should leave, open-loop; connections
    /// are spread evenly over one interval.
    fn intended(&self, id: usize, connections: usize, seq: u64) -> Option<Instant> {
        self.interval.map(|gap| {
            let phase = gap.mul_f64(id as f64 / connections as f64);
            self.start + phase + gap.mul_f64(seq as f64)
        })
    }

    /// Waits until connection `id`'s message `seq` is due and returns the time its
    /// latency counts from (the intended send time when open-loop, now otherwise), or
    /// `None` once the run is over.
    async fn next_send(&self, id: usize, connections: usize, seq: u64) -> Option<Instant> {
        let intended = self.intended(id, connections, seq);
        if !self.claim(intended) {
            return None;
        }
        Some(match intended {
            Some(at) => {
                tokio::time::sleep_until(at).await;
                at
            }
            None => Instant::now(),
        })
    }

    fn merge(&self, samples: &mut Vec<u64>) {
        if let Ok(mut h) = self.latency.lock() {
            for &s in samples.iter() {
                h.saturating_record(s.max(1));
            }
        }
        samples.clear();
    }
}

/// What one connection did, merged into the report at the end.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct Tally {
    /// Messages echoed (verified, including mismatched ones).
    messages: u64,
    /// Bytes written to the server.
    bytes_sent: u64,
    /// Bytes echoed back.
    bytes_received: u64,
    /// Messages whose echo differed from what was sent.
    mismatches: u64,
    /// UDP datagrams with no echo within the timeout.
    lost: u64,
    /// Connections that failed or stalled.
    errors: u64,
    /// The first mismatch or error, for the operator to start from.
    first_problem: Option<String>,
}

impl Tally {
    fn problem(&mut self, what: String) {
        self.first_problem.get_or_insert(what);
    }

    /// Counts a failed connection (or socket), `why` kept if it is the first problem.
    fn error(&mut self, why: String) {
        self.errors += 1;
        self.problem(why);
    }

    fn add(&mut self, other: &Tally) {
        self.messages += other.messages;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.mismatches += other.mismatches;
        self.lost += other.lost;
        self.errors += other.errors;
        if self.first_problem.is_none() {
            self.first_problem.clone_from(&other.first_problem);
        }
    }

    /// Waits for every worker and adds up what they did; a worker that panicked is an
    /// error of the run, not a crash of the tool.
    async fn join(mut workers: tokio::task::JoinSet<Tally>) -> Tally {
        let mut tally = Tally::default();
        while let Some(joined) = workers.join_next().await {
            match joined {
                Ok(t) => tally.add(&t),
                Err(e) => {
                    tally.error(format!("worker failed: {e}"));
                }
            }
        }
        tally
    }
}

/// A connection's latency samples, batched to keep the shared histogram lock cold.
pub(crate) struct Samples<'a> {
    plan: &'a Plan,
    batch: Vec<u64>,
}

impl<'a> Samples<'a> {
    fn new(plan: &'a Plan) -> Self {
        Self {
            plan,
            batch: Vec::with_capacity(SAMPLE_BATCH),
        }
    }

    /// Records one echo that took from `sent` until now.
    fn record(&mut self, sent: Instant, bytes: usize) {
        let ns = u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.batch.push(ns);
        self.plan.live.messages.fetch_add(1, Ordering::Relaxed);
        self.plan
            .live
            .bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        if self.batch.len() == SAMPLE_BATCH {
            self.plan.merge(&mut self.batch);
        }
    }
}

impl Drop for Samples<'_> {
    fn drop(&mut self) {
        self.plan.merge(&mut self.batch);
    }
}

fn validate(args: &BenchArgs) -> Result<usize, BenchError> {
    let usage = |m: &str| Err(BenchError::Usage(m.to_string()));
    let size = args.size.unwrap_or(match args.mode {
        Mode::Bulk => 65_536,
        _ => 64,
    });
    if !(1..=MAX_SIZE).contains(&size) {
        return usage("--size must be between 1 and 16777216");
    }
    if args.mode == Mode::Udp && !(udp::HEADER..=MAX_DATAGRAM).contains(&size) {
        return usage("UDP --size must be between 8 and 65507 (8 bytes carry the sequence)");
    }
    if !(1..=100_000).contains(&args.connections) {
        return usage("--connections must be between 1 and 100000");
    }
    if args.pipeline == 0 || (matches!(args.mode, Mode::Udp | Mode::Connect) && args.pipeline != 1)
    {
        return usage("--pipeline must be at least 1 (UDP and connect: exactly 1)");
    }
    if args.mode == Mode::Udp && tls::split_target(&args.addr).0 {
        return usage("tls:// targets are TCP: -m udp does not apply");
    }
    if args.duration.is_zero() || args.duration > Duration::from_secs(24 * 3600) {
        return usage("--duration must be between 1ns and 24h");
    }
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return usage("--rate must be a positive number of messages per second");
    }
    if args
        .plot
        .as_ref()
        .is_some_and(|p| p.extension().is_none_or(|e| e != "svg"))
    {
        return usage("--plot writes SVG: give a FILE.svg");
    }
    Ok(size)
}

/// Runs `echod bench`: exit 0 when every echo came back intact, 1 otherwise.
pub fn run(args: &BenchArgs) -> ExitCode {
    match execute(args) {
        Ok(report) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{report}");
            }
            match report.verdict() {
                Ok(()) => ExitCode::SUCCESS,
                Err(why) => {
                    eprintln!("echod bench: FAILED: {why}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("echod bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the benchmark and returns its report (also used by tests and scripts).
pub(crate) fn execute(args: &BenchArgs) -> Result<Report, BenchError> {
    let size = validate(args)?;
    let (tls, addr) = tls::split_target(&args.addr);
    let target = net::resolve(addr)?[0];
    let tls = if tls {
        let config = args.tls.client_config("a tls:// target")?;
        Some((
            tokio_rustls::TlsConnector::from(config),
            args.tls.server_name(addr)?,
        ))
    } else {
        None
    };
    let dialer = tcp::Dialer {
        target,
        tls,
        limit: args.timeout,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("echod-bench")
        .build()?;
    let report = runtime.block_on(drive(args, dialer, size))?;
    if let Some(path) = &args.plot {
        std::fs::write(path, plot::svg(&report))?;
    }
    Ok(report)
}

async fn drive(args: &BenchArgs, dialer: tcp::Dialer, size: usize) -> Result<Report, BenchError> {
    let target = dialer.target;
    let latency = Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3)
        .map_err(|e| BenchError::Usage(e.to_string()))?;
    // Connections are set up before the clock starts.
    let endpoints = match args.mode {
        Mode::PingPong | Mode::Bulk => {
            Endpoints::Tcp(tcp::connect_all(&dialer, args.connections).await?)
        }
        Mode::Connect => Endpoints::Churn(dialer),
        Mode::Udp => Endpoints::Udp(udp::open_all(target, args.connections).await?),
    };
    let start = Instant::now();
    let plan = Arc::new(Plan {
        pattern: Pattern::new(size),
        size,
        start,
        stop_sending: start + args.duration,
        interval: args
            .rate
            .map(|r| Duration::from_secs_f64(args.connections as f64 / r)),
        timeout: args.timeout,
        tickets: args.count.map(AtomicU64::new),
        live: Live::default(),
        latency: Mutex::new(latency),
    });
    let bar = progress(args, &plan);
    let tally = match endpoints {
        Endpoints::Tcp(streams) => {
            let closed_loop = args.mode == Mode::PingPong && args.rate.is_none();
            tcp::run_all(
                streams,
                Arc::clone(&plan),
                closed_loop.then_some(args.pipeline),
            )
            .await
        }
        Endpoints::Churn(dialer) => {
            tcp::churn_all(dialer, args.connections, Arc::clone(&plan)).await
        }
        Endpoints::Udp(sockets) => udp::run_all(sockets, Arc::clone(&plan)).await,
    };
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    let histogram = match plan.latency.lock() {
        Ok(h) => h.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    Ok(Report::new(
        args,
        target,
        size,
        args.connections,
        elapsed,
        tally,
        histogram,
    ))
}

/// The sockets of a run, opened before the clock starts (connect mode: how to open
/// them as it goes).
enum Endpoints {
    Tcp(Vec<tcp::Wire>),
    Churn(tcp::Dialer),
    Udp(Vec<tokio::net::UdpSocket>),
}

/// A live progress bar on a terminal; nothing otherwise.
fn progress(args: &BenchArgs, plan: &Arc<Plan>) -> ProgressBar {
    if args.json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let millis = u64::try_from(args.duration.as_millis()).unwrap_or(u64::MAX);
    let bar = ProgressBar::new(millis).with_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {elapsed}/{duration} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let plan = Arc::clone(plan);
    let ticker = bar.clone();
    tokio::spawn(async move {
        let mut last = (plan.start, 0u64);
        while !ticker.is_finished() {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = Instant::now();
            let done = plan.live.messages.load(Ordering::Relaxed);
            let rate = (done - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-9);
            last = (now, done);
            let ms = u64::try_from((now - plan.start).as_millis()).unwrap_or(u64::MAX);
            ticker.set_position(ms);
            ticker.set_message(format!("{done} echoes, {rate:.0}/s"));
        }
    });
    bar
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        crate::cli::Cli::command().debug_assert();
    }
}
