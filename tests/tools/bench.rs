//! `echod bench` as an operator sizing a deployment uses it: its numbers must agree
//! with what the daemon itself counted, and a server that corrupts data must fail the
//! run rather than produce a pretty throughput figure.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    Daemon, Run, corrupting_echo_server, corrupting_udp_echo_server, refusing, run_echod,
    stalling_echo_server, wait_until,
};

const LIMIT: Duration = Duration::from_secs(60);

/// `echod bench --json ARGS`: its run and its report (null when it printed none).
pub(crate) fn bench(args: &[&str]) -> (Run, Value) {
    let mut all = vec!["bench", "--json"];
    all.extend_from_slice(args);
    let run = run_echod(&all, b"", LIMIT);
    let json = serde_json::from_slice(&run.stdout).unwrap_or(Value::Null);
    (run, json)
}

/// A number of a bench report.
pub(crate) fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// Waits until the daemon has closed every connection it accepted, so its byte
/// counters (flushed per burst and at close) are final.
fn wait_all_closed(daemon: &Daemon) {
    let open = || {
        daemon.metric("echod_tcp_connections_accepted_total", &[])
            - daemon.metric("echod_tcp_connections_closed_total", &[])
    };
    wait_until(
        Duration::from_secs(20),
        || format!("daemon still has {} open connections", open()),
        || open() == 0.0,
    );
}

fn assert_tcp_run_matches_daemon(daemon: &Daemon, report: &Value, connections: f64) {
    wait_all_closed(daemon);
    assert_eq!(
        daemon.metric("echod_tcp_connections_accepted_total", &[]),
        connections
    );
    assert_eq!(num(report, "connections"), connections);
    let sent = num(report, "bytes_sent");
    let echoed = num(report, "bytes_received");
    assert!(echoed > 0.0, "nothing echoed: {report}");
    assert_eq!(sent, echoed, "every byte sent came back: {report}");
    assert_eq!(daemon.metric("echod_tcp_received_bytes_total", &[]), sent);
    assert_eq!(daemon.metric("echod_tcp_sent_bytes_total", &[]), echoed);
    assert_eq!(
        num(report, "messages") * num(report, "size"),
        echoed,
        "{report}"
    );
    assert_eq!(num(report, "mismatches"), 0.0);
    assert_eq!(num(report, "errors"), 0.0);
}

/// The rates in a report are its counts over its elapsed time.
fn assert_rates_agree_with_counts(report: &Value) {
    let elapsed = num(report, "elapsed_s");
    let close = |got: f64, want: f64| (got - want).abs() <= want * 0.01;
    let per_s = num(report, "messages") / elapsed;
    assert!(
        close(num(report, "messages_per_s"), per_s),
        "messages_per_s is not messages / elapsed_s ({per_s}): {report}"
    );
    let mb_per_s = num(report, "bytes_received") / elapsed / 1e6;
    assert!(
        close(num(report, "mb_per_s"), mb_per_s),
        "mb_per_s is not bytes_received / elapsed_s ({mb_per_s}): {report}"
    );
}

#[test]
fn ping_pong_numbers_match_the_daemons_metrics() {
    let daemon = Daemon::start("");
    let target = daemon.tcp.to_string();
    let (run, report) = bench(&[&target, "-C", "8", "-s", "100", "-p", "4", "-d", "1s"]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_tcp_run_matches_daemon(&daemon, &report, 8.0);
    assert_rates_agree_with_counts(&report);
    // Closed loop keeps 8 connections × 4 messages in flight: by Little's law, the
    // message rate times the mean latency is that, if latency and rate are both right
    // (a unit slip or a latency timed from the wrong moment breaks it).
    let in_flight = num(&report, "messages_per_s") * num(&report["latency_us"], "mean") / 1e6;
    assert!(
        (0.75 * 32.0..=1.05 * 32.0).contains(&in_flight),
        "rate × mean latency = {in_flight} messages in flight, 32 expected: {report}"
    );
}

/// The latencies of a run of `echod bench --json ARGS…` against a server that stalls
/// once for 300 ms; the stall must show in the maximum.
fn latencies_with_one_stall(args: &[&str]) -> Value {
    let server = stalling_echo_server(64 * 200, Duration::from_millis(300)).to_string();
    let mut all = vec![server.as_str(), "-C", "2", "-s", "64"];
    all.extend_from_slice(args);
    let (run, report) = bench(&all);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert!(
        num(&report["latency_us"], "max") >= STALL_US,
        "the stall is missing from max: {report}"
    );
    report["latency_us"].clone()
}

const STALL_US: f64 = 300_000.0;

#[test]
fn a_stall_of_the_server_shows_in_the_latencies() {
    // Closed loop: the message caught in the stall waited it out, and only it.
    let latency = latencies_with_one_stall(&["-d", "1500ms"]);
    assert!(
        num(&latency, "p50") < STALL_US / 10.0,
        "one stall moved the median: {latency}"
    );
    // Open loop at 500/s: every message scheduled during the stall on that connection
    // (~75 of 1 000) is late from its intended send time, so the stall reaches p99; a
    // generator that waited for the server would show it in one message only.
    let latency = latencies_with_one_stall(&["-r", "500", "-d", "2s"]);
    assert!(
        num(&latency, "p99") >= STALL_US / 2.0,
        "coordinated omission: the stall shows in too few messages: {latency}"
    );
}

#[test]
fn bulk_numbers_match_the_daemons_metrics() {
    let daemon = Daemon::start("");
    let target = daemon.tcp.to_string();
    let (run, report) = bench(&[&target, "-m", "bulk", "-C", "3", "-d", "1s"]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_tcp_run_matches_daemon(&daemon, &report, 3.0);
    assert_rates_agree_with_counts(&report);
}

#[test]
fn udp_numbers_match_the_daemons_metrics() {
    let daemon = Daemon::start(
        r#"
        [udp.rate_limit]
        packets_per_second = 0
        "#,
    );
    let target = daemon.udp.to_string();
    let (run, report) = bench(&[&target, "-m", "udp", "-C", "4", "-n", "2000"]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(num(&report, "messages"), 2000.0);
    assert_eq!(num(&report, "lost"), 0.0);
    assert_eq!(num(&report, "mismatches"), 0.0);
    for family in [
        "echod_udp_received_datagrams_total",
        "echod_udp_sent_datagrams_total",
    ] {
        assert_eq!(daemon.wait_metric_at_least(family, &[], 2000.0), 2000.0);
    }
    assert_eq!(
        daemon.metric("echod_udp_sent_bytes_total", &[]),
        num(&report, "bytes_received")
    );
}

#[test]
fn count_bounds_the_run_exactly_and_open_loop_keeps_the_rate() {
    let daemon = Daemon::start("");
    let target = daemon.tcp.to_string();
    let (run, report) = bench(&[&target, "-C", "3", "-n", "777", "-p", "8"]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(num(&report, "messages"), 777.0);

    // 500 msg/s for 1 s: the generator sends on schedule, not as fast as it can.
    let (run, report) = bench(&[&target, "-C", "2", "-r", "500", "-d", "1s"]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let messages = num(&report, "messages");
    assert!(
        (495.0..=505.0).contains(&messages),
        "open loop at 500/s for 1 s sent {messages}"
    );
    assert!(num(&report, "elapsed_s") >= 0.95, "{report}");
}

#[test]
fn a_corrupting_server_fails_the_run() {
    let addr = corrupting_echo_server(1000).to_string();
    let (run, report) = bench(&[&addr, "-C", "2", "-s", "64", "-d", "1s"]);
    assert_eq!(run.code(), 1, "must fail; stderr: {}", run.stderr);
    assert!(num(&report, "mismatches") > 0.0, "{report}");
    assert!(
        run.stderr.contains("FAILED") && run.stderr.contains("mismatched echoes"),
        "{}",
        run.stderr
    );
    let (run, report) = bench(&[&addr, "-m", "bulk", "-C", "1", "-d", "500ms"]);
    assert_eq!(run.code(), 1, "bulk must fail too; stderr: {}", run.stderr);
    assert!(num(&report, "mismatches") > 0.0, "{report}");
    // UDP: one datagram in ten comes back with a bit flipped.
    let addr = corrupting_udp_echo_server(10).to_string();
    let (run, report) = bench(&[&addr, "-m", "udp", "-C", "2", "-n", "200"]);
    assert_eq!(run.code(), 1, "udp must fail too; stderr: {}", run.stderr);
    assert_eq!(num(&report, "mismatches"), 20.0, "{report}");
    assert!(run.stderr.contains("FAILED"), "{}", run.stderr);
}

#[test]
fn plot_writes_a_percentile_svg() {
    let daemon = Daemon::start("");
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("latency.svg");
    let (run, _) = bench(&[
        &daemon.tcp.to_string(),
        "-C",
        "2",
        "-n",
        "3000",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    assert!(
        text.contains("<polyline") && text.contains("99.9%"),
        "{text}"
    );
}

#[test]
fn nothing_listening_is_a_clear_failure() {
    let closed = refusing();
    let target = closed.addr.to_string();
    let (run, _) = bench(&[&target, "-d", "1s"]);
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr.contains("cannot connect to") && run.stderr.contains("refused"),
        "{}",
        run.stderr
    );
}

/// A UDP run against a server that rate-limits ends when `--duration` says (a reply
/// still missing at the end is not waited for), and says why datagrams were lost
/// instead of leaving the operator to guess.
#[test]
fn udp_losses_to_a_rate_limit_are_explained_and_the_duration_bounds_the_run() {
    let daemon = Daemon::start("[udp.rate_limit]\npackets_per_second = 50\nburst = 10");
    let addr = daemon.udp.to_string();
    let started = Instant::now();
    let run = run_echod(
        &["bench", "-m", "udp", "-C", "4", "-d", "1s", &addr],
        b"",
        LIMIT,
    );
    let took = started.elapsed();
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert!(
        took < Duration::from_millis(2500),
        "-d 1s ran for {took:?}: a missing reply was waited for past the duration"
    );
    let run = run_echod(
        &[
            "bench",
            "-m",
            "udp",
            "-C",
            "4",
            "-d",
            "1s",
            "--timeout",
            "50ms",
            &addr,
        ],
        b"",
        LIMIT,
    );
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let out = run.stdout_text();
    assert!(out.contains("datagrams lost at"), "{out}");
    assert!(out.contains("rate_limited"), "{out}");
    let dropped = daemon.metric(
        "echod_udp_dropped_datagrams_total",
        &[("reason", "rate_limited")],
    );
    assert!(dropped > 0.0, "the server dropped nothing: {out}");
}
