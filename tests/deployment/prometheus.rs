//! echod under the real Prometheus tools: `promtool` lints a live scrape and checks the
//! deploy material, a real Prometheus server scrapes echod with the example config and
//! answers PromQL with the exact counts of known traffic, and a real blackbox_exporter
//! probes the echo port and `/readyz`.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::support::{
    self, Blackbox, Daemon, LOCAL, Need, Prometheus, admitted, assert_passes,
    daemon_with_drain_timeout, daemon_with_limits, dashboard, dashboard_queries, expect_metrics,
    families, get, metric_value, promtool, random_bytes, refused, repo_path, tcp_roundtrip,
    udp_echo,
};

crate::support::tests![
    promtool_accepts_a_live_scrape_after_traffic needs &[Need::Tool("promtool")],
    deploy_configs_and_alert_rules_pass_promtool_and_their_unit_tests needs &[Need::Tool("promtool"), Need::Tool("prometheus-blackbox-exporter")],
    prometheus_scrapes_exact_counts_and_probe_results needs &[Need::Tool("prometheus"), Need::Tool("prometheus-blackbox-exporter")],
    blackbox_probes_pass_on_echo_and_readiness_and_fail_when_draining needs &[Need::Tool("prometheus-blackbox-exporter")],
];

const SETTLE: Duration = Duration::from_secs(10);
/// The first sample lands 5–6 s after Prometheus starts; a loaded machine needs more.
const PROMETHEUS_WAIT: Duration = Duration::from_secs(40);

/// One echoed UDP datagram of `len` bytes.
fn udp_roundtrip(target: SocketAddr, len: usize) {
    let data = random_bytes(len, len as u64);
    let echo = udp_echo(target, &data, Duration::from_secs(5)).expect("UDP echo");
    assert!(echo == data);
}

fn promtool_accepts_a_live_scrape_after_traffic() {
    let daemon = daemon_with_limits(1, 1);
    let data = random_bytes(10_000, 3);
    assert!(tcp_roundtrip(daemon.tcp, &data, 3) == data);
    let held = admitted(LOCAL, daemon.tcp);
    refused(LOCAL, daemon.tcp);
    drop(held);
    udp_roundtrip(daemon.udp, 100);
    let scrape = expect_metrics(
        &daemon,
        &[
            ("echod_tcp_connections_closed_total", &[], 2.0),
            ("echod_udp_sent_datagrams_total", &[], 1.0),
        ],
        SETTLE,
    );
    for (family, kind) in families(&scrape) {
        let sample = if kind == "histogram" {
            format!("{family}_count")
        } else {
            family.clone()
        };
        assert!(
            scrape
                .lines()
                .any(|l| l.starts_with(&format!("{sample} "))
                    || l.starts_with(&format!("{sample}{{"))),
            "family {family} has no sample"
        );
    }
    let out = promtool(&["check", "metrics"], scrape.as_bytes());
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // And it does fail on a broken exposition, so the pass above means something.
    let broken = scrape.replace("echod_tcp_sent_bytes_total", "echod_tcp_sent_bytes_counter");
    assert!(
        !promtool(&["check", "metrics"], broken.as_bytes())
            .status
            .success(),
        "promtool accepted a counter without _total"
    );
}

fn deploy_configs_and_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = repo_path("deploy/prometheus");
    let run = |args: &[&str]| assert_passes(Command::new("promtool").args(args).current_dir(&dir));
    let config = run(&["check", "config", "prometheus.yml"]);
    assert!(config.contains("SUCCESS"), "{config}");
    let rules = run(&["check", "rules", "echod-alerts.yml"]);
    assert!(rules.contains("SUCCESS: 6 rules found"), "{rules}");
    let tests = run(&["test", "rules", "rules.test.yml"]);
    assert!(tests.contains("SUCCESS"), "{tests}");
    let out = Command::new("prometheus-blackbox-exporter")
        .arg("--config.check")
        .arg(format!(
            "--config.file={}",
            dir.join("blackbox.yml").display()
        ))
        .output()
        .expect("run blackbox_exporter");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "blackbox.yml invalid:\n{text}");
    assert!(
        !text.contains("level=warn"),
        "blackbox.yml warnings:\n{text}"
    );
}

/// The example `deploy/prometheus/prometheus.yml`, pointed at this test's processes and
/// sped up; each substitution must apply, so the example cannot drift from the test.
fn example_config(echod_http: SocketAddr, probe_tcp: SocketAddr, blackbox: SocketAddr) -> String {
    let mut config =
        std::fs::read_to_string(repo_path("deploy/prometheus/prometheus.yml")).unwrap();
    for (from, to) in [
        ("scrape_interval: 15s", "scrape_interval: 1s".to_string()),
        (
            "evaluation_interval: 15s",
            "evaluation_interval: 1s".to_string(),
        ),
        ("127.0.0.1:9107", echod_http.to_string()),
        ("127.0.0.1:7007", probe_tcp.to_string()),
        ("127.0.0.1:9115", blackbox.to_string()),
    ] {
        assert!(config.contains(from), "example config lost `{from}`");
        config = config.replace(from, &to);
    }
    config
}

fn prometheus_scrapes_exact_counts_and_probe_results() {
    // `counted` gets only this test's traffic; the blackbox TCP probe (a connection
    // every second) goes to `probed`, so it cannot disturb the exact counts.
    let counted = daemon_with_limits(2, 2);
    let probed = Daemon::start("");
    let blackbox = Blackbox::start(&repo_path("deploy/prometheus/blackbox.yml"));
    let rules = std::fs::read_to_string(repo_path("deploy/prometheus/echod-alerts.yml")).unwrap();
    let prometheus = Prometheus::start(
        &example_config(counted.http, probed.tcp, blackbox.service.addr),
        &[("echod-alerts.yml", rules)],
    );

    let sizes = [1usize, 1000, 300_000];
    for (i, &size) in sizes.iter().enumerate() {
        let data = random_bytes(size, i as u64);
        assert!(tcp_roundtrip(counted.tcp, &data, i as u64) == data);
    }
    let held = [admitted(LOCAL, counted.tcp), admitted(LOCAL, counted.tcp)];
    let rejects = 3;
    for _ in 0..rejects {
        refused(LOCAL, counted.tcp);
    }
    drop(held);
    let udp_sizes = [10usize, 2000];
    for &size in &udp_sizes {
        udp_roundtrip(counted.udp, size);
    }
    let tcp_bytes = (sizes.iter().sum::<usize>() + 2) as f64;
    let accepted = (sizes.len() + 2) as f64;
    let udp_bytes = udp_sizes.iter().sum::<usize>() as f64;
    expect_metrics(
        &counted,
        &[
            ("echod_tcp_sent_bytes_total", &[], tcp_bytes),
            ("echod_tcp_connections_closed_total", &[], accepted),
            ("echod_udp_sent_bytes_total", &[], udp_bytes),
        ],
        SETTLE,
    );

    let job = r#"{job="echod"}"#;
    prometheus.wait_value(&format!("up{job}"), 1.0, PROMETHEUS_WAIT);
    for (query, want) in [
        (
            format!("sum(echod_tcp_received_bytes_total{job})"),
            tcp_bytes,
        ),
        (format!("sum(echod_tcp_sent_bytes_total{job})"), tcp_bytes),
        (
            format!("sum(echod_tcp_connections_accepted_total{job})"),
            accepted,
        ),
        (
            format!("sum(echod_tcp_connections_closed_total{job})"),
            accepted,
        ),
        (
            r#"sum(echod_tcp_connections_rejected_total{job="echod",reason="global_limit"})"#
                .to_string(),
            f64::from(rejects),
        ),
        (
            r#"sum(echod_tcp_connections_rejected_total{job="echod",reason!="global_limit"})"#
                .to_string(),
            0.0,
        ),
        (format!("sum(echod_udp_sent_bytes_total{job})"), udp_bytes),
        (
            format!("sum(echod_udp_received_datagrams_total{job})"),
            udp_sizes.len() as f64,
        ),
        (format!("echod_tcp_max_connections{job}"), 2.0),
        (format!("sum(echod_tcp_connections_active{job})"), 0.0),
        (r#"probe_success{job="echod_tcp_probe"}"#.to_string(), 1.0),
        (r#"probe_success{job="echod_ready_probe"}"#.to_string(), 1.0),
    ] {
        prometheus.wait_value(&query, want, PROMETHEUS_WAIT);
    }
    // Every dashboard query is valid PromQL and finds data in a real Prometheus.
    for (title, expr) in dashboard_queries(&dashboard()) {
        let promql = expr
            .replace("$__rate_interval", "1m")
            .replace("\"$job\"", "\".+\"")
            .replace("\"$instance\"", "\".+\"");
        let deadline = std::time::Instant::now() + PROMETHEUS_WAIT;
        while prometheus.query(&promql).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "dashboard panel {title}: `{promql}` found no data"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    // The probes really reached `probed`.
    assert!(probed.metric("echod_tcp_connections_accepted_total", &[]) >= 1.0);

    // The alert rules load and evaluate against real series without errors.
    let (status, body) = get(prometheus.service.addr, "/api/v1/rules").unwrap();
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rules: Vec<_> = json["data"]["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(rules.len(), 6, "{body}");
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "rule unhealthy: {rule}");
    }
}

fn blackbox_probes_pass_on_echo_and_readiness_and_fail_when_draining() {
    let mut daemon = daemon_with_drain_timeout("60s");
    let blackbox = Blackbox::start(&repo_path("deploy/prometheus/blackbox.yml"));
    let readyz = format!("http://{}/readyz", daemon.http);
    let success = |module: &str, target: &str| {
        let body = blackbox.probe(module, target);
        (metric_value(&body, "probe_success", &[]), body)
    };

    let (ok, body) = success("echod_tcp_echo", &daemon.tcp.to_string());
    assert_eq!(ok, 1.0, "TCP echo probe failed:\n{body}");
    assert_eq!(metric_value(&body, "probe_failed_due_to_regex", &[]), 0.0);
    let (ok, body) = success("echod_http_ready", &readyz);
    assert_eq!(ok, 1.0, "readyz probe failed:\n{body}");
    assert_eq!(metric_value(&body, "probe_http_status_code", &[]), 200.0);
    let closed = format!("127.0.0.1:{}", support::free_port());
    assert_eq!(success("echod_tcp_echo", &closed).0, 0.0);

    // Draining: readiness probe fails (503) while the open connection is still served.
    let held = admitted(LOCAL, daemon.tcp);
    daemon.signal(libc::SIGTERM);
    expect_metrics(&daemon, &[("echod_draining", &[], 1.0)], SETTLE);
    let (ok, body) = success("echod_http_ready", &readyz);
    assert_eq!(ok, 0.0, "readyz probe passed while draining:\n{body}");
    assert_eq!(metric_value(&body, "probe_http_status_code", &[]), 503.0);
    drop(held);
    let status = daemon.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
}
