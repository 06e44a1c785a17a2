//! The HTTP endpoint and the metrics as an operator sees them: status codes of every
//! route, exact counts after known traffic, readiness during a drain, limits published
//! as gauges — and the metrics reference (docs/metrics.md) and Grafana dashboard naming only metrics that exist.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::support::{
    self, CONFIGURED, Daemon, Expected, LOCAL, admitted, daemon_with_drain_timeout,
    daemon_with_limits, dashboard, dashboard_queries, expect_metrics, families, http_get,
    http_response, is_exported, random_bytes, refused, repo_path, tcp_roundtrip, udp_client,
    wait_for, wait_until,
};

crate::support::tests![
    every_route_answers_with_its_status,
    tcp_connections_bytes_and_global_limit_rejects_are_exact,
    per_ip_limit_rejects_only_the_crowded_source,
    udp_datagrams_bytes_and_drops_by_reason_are_exact,
    readiness_fails_at_sigterm_while_liveness_holds_until_exit,
    limit_gauges_follow_the_config_across_reloads,
    grafana_dashboard_queries_only_metrics_echod_exports,
    metrics_reference_lists_every_exported_family_and_endpoint,
    every_documented_reason_kind_and_cap_exists_at_zero_from_the_start,
    source_addresses_never_become_labels,
    probes_and_scrapes_keep_answering_while_echo_ports_are_flooded,
    byte_counters_move_while_a_slow_reader_streams,
];

const SETTLE: Duration = Duration::from_secs(10);
/// How long a UDP client waits for a reply.
const WAIT: Duration = Duration::from_secs(5);

fn every_route_answers_with_its_status() {
    let before_start = unix_now();
    let daemon = Daemon::start("");
    let after_start = unix_now();
    assert_eq!(
        http_get(daemon.http, "/healthz").unwrap(),
        (200, "ok\n".into())
    );
    assert_eq!(
        http_get(daemon.http, "/readyz").unwrap(),
        (200, "ready\n".into())
    );
    assert_eq!(http_get(daemon.http, "/nope").unwrap().0, 404);
    assert_eq!(http_get(daemon.http, "/metrics/extra").unwrap().0, 404);
    for path in ["/metrics", "/healthz", "/readyz", "/"] {
        for method in ["POST", "DELETE"] {
            let response = http_response(daemon.http, method, path).unwrap();
            assert_eq!(response.status, 405, "{method} {path}");
            assert_eq!(
                response.header("allow"),
                Some("GET, HEAD"),
                "{method} {path}: {response:?}"
            );
        }
        let get = http_response(daemon.http, "GET", path).unwrap();
        let head = http_response(daemon.http, "HEAD", path).unwrap();
        assert_eq!((get.status, head.status), (200, 200), "GET/HEAD {path}");
        assert!(!get.body.is_empty(), "GET {path} has a body");
        assert_eq!(head.body, "", "HEAD {path} must have an empty body");
        assert_eq!(
            head.header("content-type"),
            get.header("content-type"),
            "HEAD {path} describes what GET sends"
        );
    }
    let metrics = http_response(daemon.http, "GET", "/metrics").unwrap();
    let content_type = metrics.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "/metrics is not the Prometheus text format: {content_type:?}"
    );
    let (status, page) = http_get(daemon.http, "/").unwrap();
    assert_eq!(status, 200);
    for link in ["href=\"/metrics\"", "href=\"/healthz\"", "href=\"/readyz\""] {
        assert!(page.contains(link), "landing page lacks {link}:\n{page}");
    }
    assert!(
        page.contains(env!("CARGO_PKG_VERSION")),
        "landing page lacks the version:\n{page}"
    );
    let scrape = daemon.scrape();
    assert!(scrape.contains(&format!(
        "echod_build_info{{revision=\"{}\",version=\"{}\"}} 1",
        scrape_revision(&scrape),
        env!("CARGO_PKG_VERSION")
    )));
    assert!(scrape.contains("\nprocess_resident_memory_bytes "));
    // The start time is this start's, to the second (not 0, not the build's time).
    let started = support::metric_value(&scrape, "echod_start_time_seconds", &[]);
    assert!(
        (before_start - 1.0..=after_start + 1.0).contains(&started),
        "echod_start_time_seconds {started} is not between {before_start} and {after_start}"
    );
}

/// Seconds since the Unix epoch, now.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

fn scrape_revision(scrape: &str) -> String {
    scrape
        .split("echod_build_info{revision=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("build_info has a revision")
        .to_string()
}

/// The rejected-connection counts by reason (none at shutdown: nothing is stopping).
fn rejected(global_limit: f64, per_ip_limit: f64) -> [Expected<'static>; 3] {
    let family = "echod_tcp_connections_rejected_total";
    [
        (family, &[("reason", "global_limit")], global_limit),
        (family, &[("reason", "per_ip_limit")], per_ip_limit),
        (family, &[("reason", "shutdown")], 0.0),
    ]
}

fn tcp_connections_bytes_and_global_limit_rejects_are_exact() {
    let daemon = daemon_with_limits(3, 3);
    let l = CONFIGURED;
    let sizes = [0usize, 1, 100, 4096, 1 << 20];
    for (i, &size) in sizes.iter().enumerate() {
        let data = random_bytes(size, i as u64);
        assert!(tcp_roundtrip(daemon.tcp, &data, i as u64) == data);
    }
    let held: Vec<_> = (0..3).map(|_| admitted(LOCAL, daemon.tcp)).collect();
    let rejects = 4;
    for _ in 0..rejects {
        refused(LOCAL, daemon.tcp);
    }
    let listener: &[(&str, &str)] = &[("listener", l)];
    expect_metrics(
        &daemon,
        &[
            ("echod_tcp_connections_active", listener, 3.0),
            (
                "echod_tcp_connections_rejected_total",
                &[("listener", l), ("reason", "global_limit")],
                rejects as f64,
            ),
        ],
        SETTLE,
    );
    drop(held);
    let bytes = (sizes.iter().sum::<usize>() + 3) as f64;
    let accepted = (sizes.len() + 3) as f64;
    let mut expected: Vec<Expected<'_>> = vec![
        ("echod_tcp_connections_accepted_total", listener, accepted),
        ("echod_tcp_connections_closed_total", listener, accepted),
        ("echod_tcp_connections_active", listener, 0.0),
        (
            "echod_tcp_connection_duration_seconds_count",
            listener,
            accepted,
        ),
        ("echod_tcp_received_bytes_total", listener, bytes),
        ("echod_tcp_sent_bytes_total", listener, bytes),
        ("echod_tcp_idle_timeouts_total", listener, 0.0),
        ("echod_tcp_accept_errors_total", listener, 0.0),
    ];
    expected.extend(rejected(rejects as f64, 0.0));
    expect_metrics(&daemon, &expected, SETTLE);
}

fn per_ip_limit_rejects_only_the_crowded_source() {
    let daemon = daemon_with_limits(10, 2);
    let other = Ipv4Addr::new(127, 0, 0, 2);
    let mut held = vec![admitted(LOCAL, daemon.tcp), admitted(LOCAL, daemon.tcp)];
    refused(LOCAL, daemon.tcp);
    held.push(admitted(other, daemon.tcp));
    held.push(admitted(other, daemon.tcp));
    refused(other, daemon.tcp);
    refused(LOCAL, daemon.tcp);
    let mut expected: Vec<Expected<'_>> = vec![
        ("echod_tcp_connections_accepted_total", &[], 4.0),
        ("echod_tcp_connections_active", &[], 4.0),
    ];
    expected.extend(rejected(0.0, 3.0));
    expect_metrics(&daemon, &expected, SETTLE);
    drop(held);
    expect_metrics(
        &daemon,
        &[
            ("echod_tcp_connections_closed_total", &[], 4.0),
            ("echod_tcp_connections_active", &[], 0.0),
            ("echod_tcp_received_bytes_total", &[], 4.0),
        ],
        SETTLE,
    );
}

/// Reads whatever replies are already queued on `s`, without waiting.
fn queued_replies(s: &UdpSocket) -> usize {
    s.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 65_536];
    let mut n = 0;
    while s.recv(&mut buf).is_ok() {
        n += 1;
    }
    n
}

fn udp_datagrams_bytes_and_drops_by_reason_are_exact() {
    // The denied source: a socket of the test's, bound before echod starts.
    let denied = udp_client("127.0.0.1:0", WAIT);
    let denied_port = denied.local_addr().unwrap().port();
    let daemon = Daemon::start(&format!(
        r#"
        [udp]
        max_datagram_size = 1000
        deny_source_ports = [{denied_port}]
        [udp.rate_limit]
        packets_per_second = 1
        burst = 5
        max_sources = 100
        "#
    ));
    let target = daemon.udp;
    let l = CONFIGURED;
    // Echoed: sizes up to the limit, from 127.0.0.1 (4 of its 5 tokens).
    let echo = udp_client("127.0.0.1:0", WAIT);
    let echoed_sizes = [1usize, 100, 500, 1000];
    let mut buf = vec![0u8; 65_536];
    for (i, &size) in echoed_sizes.iter().enumerate() {
        let data = random_bytes(size, 50 + i as u64);
        echo.send_to(&data, target).unwrap();
        let (n, from) = echo.recv_from(&mut buf).expect("echo reply");
        assert_eq!((&buf[..n], from), (&data[..], target));
    }
    // Oversize: checked before the rate limit, so no tokens are spent.
    let oversize_sizes = [1001usize, 5000, 60_000];
    for &size in &oversize_sizes {
        echo.send_to(&random_bytes(size, size as u64), target)
            .unwrap();
    }
    // Denied source port.
    let denied_sends = 2;
    for _ in 0..denied_sends {
        denied.send_to(b"loop?", target).unwrap();
    }
    // Rate limited: a fresh source gets its burst of 5, the rest is dropped.
    let flooder = udp_client("127.0.0.3:0", WAIT);
    let (burst, over) = (5usize, 6usize);
    for _ in 0..burst + over {
        flooder.send_to(&[7u8; 20], target).unwrap();
    }
    let received = echoed_sizes.len() + oversize_sizes.len() + denied_sends + burst + over;
    let rx_bytes = echoed_sizes.iter().sum::<usize>()
        + oversize_sizes.iter().sum::<usize>()
        + denied_sends * 5
        + (burst + over) * 20;
    let sent = echoed_sizes.len() + burst;
    let tx_bytes = echoed_sizes.iter().sum::<usize>() + burst * 20;
    let reason = |r| [("listener", l), ("reason", r)];
    let (oversize, denied_port_l, rate_limited, send_error) = (
        reason("oversize"),
        reason("denied_port"),
        reason("rate_limited"),
        reason("send_error"),
    );
    let listener: &[(&str, &str)] = &[("listener", l)];
    expect_metrics(
        &daemon,
        &[
            (
                "echod_udp_received_datagrams_total",
                listener,
                received as f64,
            ),
            ("echod_udp_received_bytes_total", listener, rx_bytes as f64),
            ("echod_udp_sent_datagrams_total", listener, sent as f64),
            ("echod_udp_sent_bytes_total", listener, tx_bytes as f64),
            (
                "echod_udp_dropped_datagrams_total",
                &oversize,
                oversize_sizes.len() as f64,
            ),
            (
                "echod_udp_dropped_datagrams_total",
                &denied_port_l,
                denied_sends as f64,
            ),
            (
                "echod_udp_dropped_datagrams_total",
                &rate_limited,
                over as f64,
            ),
            ("echod_udp_dropped_datagrams_total", &send_error, 0.0),
        ],
        SETTLE,
    );
    // Replies are sent before counts are flushed, so they are all queued by now.
    assert_eq!(queued_replies(&echo), 0, "oversize datagrams were echoed");
    assert_eq!(queued_replies(&denied), 0, "denied port was answered");
    assert_eq!(queued_replies(&flooder), burst, "rate limit let through");

    // Both sources are in the rate-limit table until their buckets refill (4–5 s at
    // 1/s); the table is swept every second, so the gauge shows them, then empties.
    let sources = |d: &Daemon| d.metric("echod_udp_rate_limit_sources", &[]);
    wait_until(
        Duration::from_secs(4),
        || "rate-limit table gauge stayed 0",
        || sources(&daemon) >= 1.0,
    );
    assert!(sources(&daemon) <= 2.0);
    expect_metrics(
        &daemon,
        &[("echod_udp_rate_limit_sources", &[], 0.0)],
        Duration::from_secs(20),
    );
}

fn readiness_fails_at_sigterm_while_liveness_holds_until_exit() {
    let mut daemon = daemon_with_drain_timeout("60s");
    let mut conn = admitted(LOCAL, daemon.tcp);
    let signalled = Instant::now();
    daemon.signal(libc::SIGTERM);
    wait_until(
        Duration::from_secs(5),
        || "readyz still 200 5 s after SIGTERM",
        || {
            let (status, body) = http_get(daemon.http, "/readyz").expect("readyz while draining");
            if status == 503 {
                assert_eq!(body, "draining\n");
                return true;
            }
            assert_eq!(status, 200, "readyz before the drain: {body}");
            false
        },
    );
    let turned = signalled.elapsed();
    assert!(
        turned < Duration::from_millis(200),
        "readyz turned 503 {turned:?} after SIGTERM, not at once"
    );
    let scrape = daemon.scrape();
    assert_eq!(support::metric_value(&scrape, "echod_draining", &[]), 1.0);
    assert_eq!(support::metric_value(&scrape, "echod_ready", &[]), 0.0);
    // Liveness holds all through the drain, sampled, not checked once.
    let healthy = |daemon: &Daemon| {
        http_get(daemon.http, "/healthz").map(|(status, body)| {
            assert_eq!(
                (status, body.as_str()),
                (200, "ok\n"),
                "healthz while draining"
            );
        })
    };
    let sampling = Instant::now();
    let mut samples = 0;
    while sampling.elapsed() < Duration::from_secs(1) {
        healthy(&daemon).expect("healthz answers while draining");
        samples += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(samples >= 10, "only {samples} healthz samples");
    // The open connection is still served while draining.
    conn.write_all(b"still here").unwrap();
    let mut back = [0u8; 10];
    conn.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"still here");
    drop(conn);
    // Until the process exits, every answer is 200; the endpoint goes away only once
    // the drain is complete (the summary is logged before HTTP stops).
    wait_for(
        Duration::from_secs(20),
        || "echod still up 20 s after drain",
        || {
            if daemon.try_exit().is_some() {
                return Some(());
            }
            if healthy(&daemon).is_err() {
                assert!(
                    daemon.log().contains("shutdown complete"),
                    "healthz failed before the drain ended:\n{}",
                    daemon.log()
                );
                return Some(());
            }
            None
        },
    );
    let status = daemon.wait_exit(Duration::from_secs(20));
    assert_eq!(
        status.code(),
        Some(0),
        "exit after drain; log:\n{}",
        daemon.log()
    );
}

fn limit_gauges_follow_the_config_across_reloads() {
    let daemon = Daemon::start(
        r#"
        [tcp]
        max_connections = 50
        max_connections_per_ip = 5
        [udp.rate_limit]
        max_sources = 77
        "#,
    );
    // Each step: a config to reload (or none), then the limit gauges
    // [max, per-IP, UDP sources] and [reloads, failures, last successful].
    let steps = [
        (None, [50.0, 5.0, 77.0], [0.0, 0.0, 1.0]),
        (
            Some(
                r#"
                [tcp]
                max_connections = 60
                max_connections_per_ip = 6
                [udp.rate_limit]
                max_sources = 88
                "#,
            ),
            [60.0, 6.0, 88.0],
            [1.0, 0.0, 1.0],
        ),
        // Invalid: per-IP above the global limit. The old limits stay, the failure shows.
        (
            Some(
                r#"
                [tcp]
                max_connections = 10
                max_connections_per_ip = 20
                "#,
            ),
            [60.0, 6.0, 88.0],
            [1.0, 1.0, 0.0],
        ),
    ];
    for (config, [max, per_ip, sources], [reloads, failures, last_ok]) in steps {
        if let Some(config) = config {
            daemon.rewrite_config(config);
            daemon.signal(libc::SIGHUP);
        }
        expect_metrics(
            &daemon,
            &[
                ("echod_tcp_max_connections", &[], max),
                ("echod_tcp_max_connections_per_ip", &[], per_ip),
                ("echod_udp_rate_limit_max_sources", &[], sources),
                ("echod_config_reloads_total", &[], reloads),
                ("echod_config_reload_failures_total", &[], failures),
                ("echod_config_last_reload_successful", &[], last_ok),
            ],
            SETTLE,
        );
    }
}

/// A live scrape after some traffic, and its families (name → type).
/// A daemon with every family the reference lists: TLS echo on too (its families exist
/// only while a TLS listener serves), with a certificate made for the test.
fn daemon_with_every_family() -> (Daemon, crate::web_config::tls::Pki) {
    let pki = crate::web_config::tls::Pki::new();
    let daemon = Daemon::start(&format!(
        "[tls]\nlisten = [\"{CONFIGURED}\"]\ncert_file = {:?}\nkey_file = {:?}\n",
        pki.cert.display().to_string(),
        pki.key.display().to_string()
    ));
    (daemon, pki)
}

fn live_scrape() -> (String, std::collections::BTreeMap<String, String>) {
    let (daemon, _pki) = daemon_with_every_family();
    let data = random_bytes(1000, 1);
    assert!(tcp_roundtrip(daemon.tcp, &data, 1) == data);
    let scrape = daemon.scrape();
    let all = families(&scrape);
    assert!(all.len() > 20, "too few families:\n{scrape}");
    (scrape, all)
}

/// Metric names (`echod_…`, `process_…`, `up`) used in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    // Label values ("…", such as module=~"echod_.+") are not metric names.
    let expr: String = expr.split('"').step_by(2).collect::<Vec<_>>().join(" ");
    expr.split(|c: char| !is_name_char(c))
        .filter(|w| {
            w.starts_with("echod_")
                || w.starts_with("process_")
                || *w == "up"
                || *w == "probe_success"
        })
        .map(str::to_string)
        .collect()
}

fn grafana_dashboard_queries_only_metrics_echod_exports() {
    let dashboard = dashboard();
    let panels = dashboard["panels"].as_array().expect("panels");
    let queries = dashboard_queries(&dashboard);
    // Template variable queries.
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["definition"].as_str())
        .collect();
    let (_, exported) = live_scrape();
    let mut ids = std::collections::BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(panel["id"].as_u64()),
            "duplicate panel id in {title}"
        );
        let (x, w) = (&panel["gridPos"]["x"], &panel["gridPos"]["w"]);
        let right = x.as_u64().unwrap_or(99) + w.as_u64().unwrap_or(99);
        assert!(right <= 24, "panel {title} leaves the 24-column grid");
    }
    let mut used = std::collections::BTreeSet::new();
    for (title, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "panel {title}: no metric in `{expr}`");
        used.extend(names);
    }
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap_or("?");
        assert!(
            queries.iter().any(|(t, _)| t == title),
            "panel {title} has no query"
        );
    }
    used.extend(variables.iter().flat_map(|q| metric_names(q)));
    assert!(queries.len() >= 20, "only {} queries", queries.len());

    let unknown: Vec<_> = used
        .iter()
        // up and blackbox_exporter's probe_success come from Prometheus, not echod.
        .filter(|n| *n != "up" && *n != "probe_success" && !is_exported(&exported, n))
        .collect();
    assert!(
        unknown.is_empty(),
        "dashboard names metrics echod does not export: {unknown:?}"
    );
    let unused: Vec<_> = exported
        .keys()
        .filter(|f| f.starts_with("echod_"))
        .filter(|f| {
            !used.iter().any(|u| {
                u == *f
                    || ["_bucket", "_sum", "_count"]
                        .map(|s| format!("{f}{s}"))
                        .contains(u)
            })
        })
        .collect();
    assert!(
        unused.is_empty(),
        "echod families missing from the dashboard: {unused:?}"
    );
}

/// docs/metrics.md, the metrics reference (its table generated from the registry).
fn documented_metrics_section() -> String {
    std::fs::read_to_string(repo_path("docs/metrics.md")).expect("docs/metrics.md")
}

/// One row of docs/metrics.md's metric table.
#[derive(Debug)]
struct DocumentedMetric {
    name: String,
    kind: String,
    labels: BTreeSet<String>,
    /// For the `reason`, `kind` and `cap` labels: the values the row names (in
    /// backticks, without dots, so config keys such as `tcp.max_connections` are not).
    values: BTreeSet<String>,
}

/// The labels whose values are a fixed set the reference lists.
const ENUM_LABELS: [&str; 3] = ["reason", "kind", "cap"];

fn documented_metric_table() -> Vec<DocumentedMetric> {
    let rows: Vec<DocumentedMetric> = documented_metrics_section()
        .lines()
        .filter(|l| l.starts_with("| `echod_"))
        .map(|row| {
            let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
            assert!(cells.len() >= 4, "metric table row: {row}");
            let meaning = cells[3..].join("|");
            DocumentedMetric {
                name: cells[0].trim_matches('`').to_string(),
                kind: cells[1].to_string(),
                labels: cells[2]
                    .split(',')
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect(),
                values: meaning
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .filter(|v| v.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                    .map(str::to_string)
                    .collect(),
            }
        })
        .collect();
    assert!(rows.len() >= 20, "docs/metrics.md metric table: {rows:#?}");
    rows
}

/// Label names, and the values of `label`, of every sample of `family` in `scrape`
/// (a histogram's `_bucket`/`_sum`/`_count` samples count as the family's; `le` is the
/// histogram's own).
fn exposed_labels(scrape: &str, family: &str, label: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut names, mut values) = (BTreeSet::new(), BTreeSet::new());
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, _)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        if name != family && base != family {
            continue;
        }
        for pair in labels
            .trim_end_matches('}')
            .split("\",")
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once("=\"").expect("label=\"value\"");
            if key != "le" {
                names.insert(key.to_string());
            }
            if key == label {
                values.insert(value.trim_end_matches('"').to_string());
            }
        }
    }
    (names, values)
}

fn metrics_reference_lists_every_exported_family_and_endpoint() {
    let section = documented_metrics_section();
    for endpoint in ["/metrics", "/healthz", "/readyz", "9107"] {
        assert!(
            section.contains(endpoint),
            "docs/metrics.md lacks {endpoint}"
        );
    }
    let (scrape, exported) = live_scrape();
    let table = documented_metric_table();
    // Exported → reference: every echod family has its row.
    let missing: Vec<_> = exported
        .keys()
        .filter(|f| f.starts_with("echod_") && !table.iter().any(|m| &m.name == *f))
        .collect();
    assert!(missing.is_empty(), "docs/metrics.md lacks: {missing:?}");
    // Reference → exported: every row exists, with the type and the label names it says.
    for row in &table {
        assert_eq!(
            exported.get(&row.name),
            Some(&row.kind),
            "docs/metrics.md row {row:?}: type in the scrape"
        );
        let (labels, _) = exposed_labels(&scrape, &row.name, "");
        assert_eq!(
            labels, row.labels,
            "docs/metrics.md row {}: label names",
            row.name
        );
    }
}

fn every_documented_reason_kind_and_cap_exists_at_zero_from_the_start() {
    let (daemon, _pki) = daemon_with_every_family();
    let scrape = daemon.scrape();
    let (tcp, udp) = (CONFIGURED.to_string(), CONFIGURED.to_string());
    let mut checked = 0;
    for row in documented_metric_table() {
        let Some(label) = ENUM_LABELS.iter().find(|l| row.labels.contains(**l)) else {
            continue;
        };
        assert!(
            !row.values.is_empty(),
            "docs/metrics.md names no {label} for {row:?}"
        );
        let listener = if row.name.starts_with("echod_udp_") {
            &udp
        } else {
            &tcp
        };
        for value in &row.values {
            let labels = [(*label, value.as_str()), ("listener", listener.as_str())];
            // The HTTP endpoint's families have no listener label.
            let labels = if row.labels.contains("listener") {
                &labels[..]
            } else {
                &labels[..1]
            };
            assert_eq!(
                support::metric_value(&scrape, &row.name, labels),
                0.0,
                "{}{labels:?} on a fresh daemon",
                row.name
            );
            checked += 1;
        }
        let (_, exposed) = exposed_labels(&scrape, &row.name, label);
        assert_eq!(
            exposed, row.values,
            "{}: {label} values exported vs documented",
            row.name
        );
    }
    // rejected 6 + capped 2 + accept errors 4 + UDP drops 5 + HTTP rejected 6 + HTTP
    // accept errors 4 + TLS closed 7.
    assert_eq!(checked, 34, "documented reason/kind/cap values");
}

fn source_addresses_never_become_labels() {
    let daemon = Daemon::start("");
    let peer = Ipv4Addr::new(127, 0, 0, 5);
    drop(admitted(peer, daemon.tcp));
    let udp = udp_client(SocketAddr::from((peer, 0)), WAIT);
    udp.send_to(b"hi", daemon.udp).unwrap();
    let mut buf = [0u8; 2];
    udp.recv(&mut buf).expect("UDP echo");
    let scrape = expect_metrics(
        &daemon,
        &[
            ("echod_tcp_connections_closed_total", &[], 1.0),
            ("echod_udp_sent_datagrams_total", &[], 1.0),
        ],
        SETTLE,
    );
    assert!(
        !scrape.contains(&IpAddr::V4(peer).to_string()),
        "a client address appears in the exposition"
    );
}

fn probes_and_scrapes_keep_answering_while_echo_ports_are_flooded() {
    let daemon = daemon_with_limits(20, 20);
    let flood_for = Duration::from_secs(3);
    let (tcp, udp) = (daemon.tcp, daemon.udp);
    // Bounded in time and count: at most 5 000 connections and 200 000 datagrams.
    let tcp_flood = std::thread::spawn(move || {
        let end = Instant::now() + flood_for;
        let mut open = std::collections::VecDeque::new();
        for _ in 0..5_000 {
            if Instant::now() > end {
                break;
            }
            if let Ok(s) = std::net::TcpStream::connect_timeout(&tcp, Duration::from_secs(1)) {
                open.push_back(s);
            }
            if open.len() > 100 {
                open.pop_front();
            }
        }
    });
    let udp_flood = std::thread::spawn(move || {
        let end = Instant::now() + flood_for;
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let payload = [0u8; 1000];
        for i in 0..200_000u32 {
            if i % 256 == 0 && Instant::now() > end {
                break;
            }
            let _ = socket.send_to(&payload, udp);
        }
    });
    // Every probe answer within the deployment's own probe timeout: readiness fails on
    // the first one missed (failureThreshold: 1), so the slowest answer counts, not a
    // percentile. A scrape gets the 3 s it always had.
    let probes = kubernetes_probe_timeouts();
    let limit = |path: &str| {
        probes
            .iter()
            .filter(|(_, probed, _)| probed == path)
            .map(|(_, _, timeout)| *timeout)
            .min()
            .unwrap_or_else(|| panic!("no Kubernetes probe of {path}: {probes:?}"))
    };
    let limits = [
        ("/healthz", limit("/healthz")),
        ("/readyz", limit("/readyz")),
        ("/metrics", Duration::from_secs(3)),
    ];
    let mut slowest = [Duration::ZERO; 3];
    let mut requests = 0;
    while !(tcp_flood.is_finished() && udp_flood.is_finished()) {
        for (i, (path, limit)) in limits.iter().enumerate() {
            let t = Instant::now();
            let (status, _) = http_get(daemon.http, path)
                .unwrap_or_else(|e| panic!("{path} failed during the flood: {e}"));
            assert_eq!(status, 200, "{path} during the flood");
            let took = t.elapsed();
            assert!(
                took < *limit,
                "{path} took {took:?} during the flood; its probe times out after {limit:?}"
            );
            slowest[i] = slowest[i].max(took);
            requests += 1;
        }
    }
    tcp_flood.join().unwrap();
    udp_flood.join().unwrap();
    assert!(requests >= 3, "no request made during the flood");
    let scrape = daemon.scrape();
    let rejected = support::metric_value(
        &scrape,
        "echod_tcp_connections_rejected_total",
        &[("reason", "global_limit")],
    );
    let datagrams = support::metric_value(&scrape, "echod_udp_received_datagrams_total", &[]);
    assert!(rejected > 0.0, "the TCP flood never reached the limit");
    assert!(datagrams > 1000.0, "the UDP flood never arrived");
    eprintln!(
        "flood: {rejected} TCP rejects, {datagrams} datagrams; {requests} HTTP answers, slowest {slowest:?} (limits {limits:?})"
    );
}

/// (probe, path, timeout) of every HTTP probe in deploy/kubernetes/deployment.yaml; a
/// probe without `timeoutSeconds` gets Kubernetes' default, 1 s. Read line by line: a
/// probe's keys are the lines indented below its `…Probe:` line.
fn kubernetes_probe_timeouts() -> Vec<(String, String, Duration)> {
    let manifest = std::fs::read_to_string(repo_path("deploy/kubernetes/deployment.yaml"))
        .expect("deployment.yaml");
    let indent = |line: &str| line.len() - line.trim_start().len();
    let lines: Vec<&str> = manifest.lines().collect();
    let mut probes = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(probe) = line.trim().strip_suffix("Probe:") else {
            continue;
        };
        let body = lines[i + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || indent(l) > indent(line));
        let (mut path, mut timeout) = (None, Duration::from_secs(1));
        for key in body.map(|l| l.trim()) {
            if let Some(p) = key.strip_prefix("path:") {
                path = Some(p.trim().to_string());
            }
            // An exec probe (`echod probe --http=URL …`) checks the URL's path.
            if let Some(url) = key.strip_prefix("- --http=") {
                path = url
                    .trim()
                    .split_once("://")
                    .and_then(|(_, rest)| rest.find('/').map(|at| rest[at..].to_string()));
            }
            if let Some(t) = key.strip_prefix("timeoutSeconds:") {
                timeout = Duration::from_secs(t.trim().parse().expect("timeoutSeconds"));
            }
        }
        let path = path.unwrap_or_else(|| panic!("{probe}Probe without an HTTP path"));
        probes.push((format!("{probe}Probe"), path, timeout));
    }
    assert!(probes.len() >= 3, "probes in deployment.yaml: {probes:?}");
    probes
}

/// The byte counters move while a connection streams to a client that reads slower than
/// it sends (echod then waits for room after nearly every read, and its socket never runs
/// dry): a scrape shows what was echoed so far. Before, such a connection's bytes were
/// counted only once it ended (a red team watched 243 MB go by at 0).
fn byte_counters_move_while_a_slow_reader_streams() {
    let daemon = Daemon::start("");
    let stream = std::net::TcpStream::connect(daemon.tcp).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let chunk = [7u8; 64 * 1024];
        let mut sent = 0usize;
        while sent < 256 << 20 {
            match writer.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
    });
    // About 13 MB/s: slower than the sender, so echod's writes keep finding the client's
    // window full.
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 64 * 1024];
        let mut got = 0usize;
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            got += n;
            std::thread::sleep(Duration::from_millis(5));
        }
        got
    });
    let want = f64::from(4u32 << 20);
    let sent = daemon.wait_metric_at_least("echod_tcp_sent_bytes_total", &[], want);
    let received = daemon.metric("echod_tcp_received_bytes_total", &[]);
    assert_eq!(
        daemon.metric("echod_tcp_connections_active", &[]),
        1.0,
        "the stream is still open"
    );
    stream.shutdown(std::net::Shutdown::Both).unwrap();
    sender.join().unwrap();
    let got = receiver.join().unwrap();
    println!(
        "while streaming: echod_tcp_sent_bytes_total {sent}, received {received}; the client read {got} bytes"
    );
    assert!(received >= sent, "received {received} < sent {sent}");
}
