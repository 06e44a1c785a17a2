//! The outcome of a run: throughput, latency percentiles and every problem seen, for
//! people (a short table) and machines (`--json`).

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{BenchArgs, Mode, Tally};

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest echo.
    pub(crate) max: f64,
    /// Arithmetic mean.
    pub(crate) mean: f64,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// Load pattern.
    pub(crate) mode: Mode,
    /// The address loaded.
    pub(crate) target: String,
    /// Connections (UDP: sockets) used.
    pub(crate) connections: usize,
    /// Message (bulk: write) size in bytes.
    pub(crate) size: usize,
    /// Closed-loop pipelining depth.
    pub(crate) pipeline: usize,
    /// Open-loop target rate, if any.
    pub(crate) rate: Option<f64>,
    /// Wall time from the first send to the last echo.
    pub(crate) elapsed_s: f64,
    /// What the connections counted: echoes, bytes and problems (its keys stand in the
    /// JSON beside the others).
    #[serde(flatten)]
    pub(crate) tally: Tally,
    /// Echoes per second.
    pub(crate) messages_per_s: f64,
    /// Echoed megabytes (10^6) per second, one direction.
    pub(crate) mb_per_s: f64,
    /// Round-trip latency (open-loop: from the intended send time).
    pub(crate) latency_us: Latency,
    #[serde(skip)]
    pub(super) histogram: Histogram<u64>,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

impl Report {
    pub(super) fn new(
        args: &BenchArgs,
        target: SocketAddr,
        size: usize,
        connections: usize,
        elapsed: Duration,
        tally: Tally,
        histogram: Histogram<u64>,
    ) -> Self {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let empty = histogram.is_empty();
        let at = |q: f64| {
            if empty {
                0.0
            } else {
                us(histogram.value_at_quantile(q))
            }
        };
        let latency_us = Latency {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: if empty { 0.0 } else { us(histogram.max()) },
            mean: if empty { 0.0 } else { histogram.mean() / 1e3 },
        };
        Report {
            mode: args.mode,
            target: match crate::tools::tls::split_target(&args.addr) {
                (true, _) => format!("{}{target}", crate::tools::tls::SCHEME),
                (false, _) => target.to_string(),
            },
            connections,
            size,
            pipeline: args.pipeline,
            rate: args.rate,
            elapsed_s: secs,
            messages_per_s: tally.messages as f64 / secs,
            mb_per_s: tally.bytes_received as f64 / secs / 1e6,
            latency_us,
            tally,
            histogram,
        }
    }

    /// The report as one line of JSON.
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Ok when every echo came back intact; otherwise why the run failed.
    pub(crate) fn verdict(&self) -> Result<(), String> {
        let first = self.tally.first_problem.as_deref().unwrap_or("no detail");
        if self.tally.mismatches > 0 {
            return Err(format!(
                "{} mismatched echoes; first: {first}",
                self.tally.mismatches
            ));
        }
        if self.tally.errors > 0 {
            return Err(format!(
                "{} connection errors; first: {first}",
                self.tally.errors
            ));
        }
        if self.tally.messages == 0 {
            return Err("no echo came back".into());
        }
        Ok(())
    }
}

/// Microseconds as a short human figure.
fn human_us(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.2} ms", v / 1e3)
    } else {
        format!("{v:.0} µs")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = self.mode.label();
        let load = match self.rate {
            Some(r) => format!("open loop at {r:.0} msg/s"),
            None if self.mode == Mode::PingPong => format!("pipeline {}", self.pipeline),
            None if self.mode == Mode::Bulk => "streaming".into(),
            None => "closed loop".into(),
        };
        writeln!(
            f,
            "{mode} → {}: {} connections, {} B messages, {load}, {:.2} s",
            self.target, self.connections, self.size, self.elapsed_s
        )?;
        writeln!(
            f,
            "  throughput  {:.0} msg/s, {:.2} MB/s echoed ({} messages, {} bytes)",
            self.messages_per_s, self.mb_per_s, self.tally.messages, self.tally.bytes_received
        )?;
        let l = &self.latency_us;
        writeln!(
            f,
            "  latency     p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            human_us(l.p50),
            human_us(l.p90),
            human_us(l.p99),
            human_us(l.p999),
            human_us(l.max)
        )?;
        writeln!(
            f,
            "  verified    {} bytes: {} mismatches, {} errors{}",
            self.tally.bytes_received,
            self.tally.mismatches,
            self.tally.errors,
            if self.mode == Mode::Udp {
                format!(", {} lost", self.tally.lost)
            } else {
                String::new()
            }
        )?;
        if let Some(hint) = self.loss_hint() {
            writeln!(f, "  note        {hint}")?;
        }
        Ok(())
    }
}

impl Report {
    /// Why UDP datagrams were probably lost. Every socket of a run shares one source
    /// address, and echo servers such as echod limit replies per source address (echod:
    /// `udp.rate_limit`, 1 000/s with bursts of 2 000 by default), so a run faster than
    /// that loses datagrams by design, not because the path is lossy.
    pub(crate) fn loss_hint(&self) -> Option<String> {
        if self.mode != Mode::Udp || self.tally.lost == 0 {
            return None;
        }
        let sent_per_s = (self.tally.messages + self.tally.lost) as f64 / self.elapsed_s.max(1e-9);
        Some(format!(
            "{} of {} datagrams lost at {sent_per_s:.0}/s from one source address: a server \
             that rate-limits replies per source drops the excess (echod: udp.rate_limit, \
             counted in echod_udp_dropped_datagrams_total{{reason=\"rate_limited\"}}; \
             set packets_per_second = 0 on a benchmark server)",
            self.tally.lost,
            self.tally.messages + self.tally.lost
        ))
    }
}
