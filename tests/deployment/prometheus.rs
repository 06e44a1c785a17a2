//! echod under the real Prometheus tools: `promtool` lints a live scrape and checks the
//! deploy material, a real Prometheus server scrapes echod with the example config and
//! answers PromQL with the exact counts of known traffic, and a real blackbox_exporter
//! probes the echo port, the TLS echo port (`tcp` prober, `tls: true`, under a real
//! Prometheus) and `/readyz`.

#[path = "../support/tls.rs"]
pub(crate) mod tls;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::{
    Blackbox, Daemon, LOCAL, Need, Prometheus, admitted, assert_passes, daemon_with_drain_timeout,
    daemon_with_limits, dashboard, dashboard_queries, expect_metrics, families, http_get,
    metric_value, promtool, random_bytes, refused, refusing, repo_path, tcp_roundtrip, udp_echo,
    wait_until,
};
use tls::{HttpsClient, Pki, daemon_with_web_config};

crate::support::tests![
    promtool_accepts_a_live_scrape_after_traffic needs &[Need::Tool("promtool")],
    deploy_configs_and_alert_rules_pass_promtool_and_their_unit_tests needs &[Need::Tool("promtool"), Need::Tool("prometheus-blackbox-exporter")],
    prometheus_scrapes_exact_counts_and_probe_results needs &[Need::Tool("prometheus"), Need::Tool("prometheus-blackbox-exporter")],
    blackbox_probes_pass_on_echo_and_readiness_and_fail_when_draining needs &[Need::Tool("prometheus-blackbox-exporter")],
    alerts_cover_what_the_deploy_sets_up_and_each_is_tested_firing_and_quiet needs &[Need::Tool("yamllint")],
    alert_table_of_the_metrics_reference_is_generated_from_the_rules needs &[Need::Tool("yamllint")],
    example_prometheus_config_targets_the_packaged_service needs &[Need::Tool("yamllint")],
    dashboard_asks_for_its_data_source_colours_health_and_shows_probes_and_restarts,
    dashboard_annotation_queries_are_valid_promql needs &[Need::Tool("prometheus")],
    prometheus_scrapes_over_tls_with_basic_auth_and_a_wrong_password_is_down needs &[Need::Tool("prometheus")],
    blackbox_probes_readiness_and_metrics_over_https needs &[Need::Tool("prometheus-blackbox-exporter")],
    blackbox_tls_echo_module_probes_the_tls_listener_under_prometheus needs &[Need::Tool("prometheus"), Need::Tool("prometheus-blackbox-exporter")],
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
    assert!(rules.contains("SUCCESS: 12 rules found"), "{rules}");
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
        ("\"127.0.0.1:7\"", format!("\"{probe_tcp}\"")),
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
    // TLS echo is on too (no TLS traffic): the dashboard's TLS panel has series to show.
    let pki = Pki::new();
    let counted = Daemon::start(&format!(
        "[tcp]\nmax_connections = 2\nmax_connections_per_ip = 2\n\
         [tls]\nlisten = [\"127.0.0.1:0\"]\ncert_file = {:?}\nkey_file = {:?}\n",
        pki.cert.display().to_string(),
        pki.key.display().to_string()
    ));
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
        (r#"probe_success{module="echod_tcp_echo"}"#.to_string(), 1.0),
        (
            r#"probe_success{module="echod_http_ready"}"#.to_string(),
            1.0,
        ),
    ] {
        prometheus.wait_value(&query, want, PROMETHEUS_WAIT);
    }
    // Every dashboard query is valid PromQL and finds data in a real Prometheus.
    for (title, expr) in dashboard_queries(&dashboard()) {
        let promql = expr
            .replace("$__rate_interval", "1m")
            .replace("\"$job\"", "\".+\"")
            .replace("\"$instance\"", "\".+\"");
        wait_until(
            PROMETHEUS_WAIT,
            || format!("dashboard panel {title}: `{promql}` found no data"),
            || !prometheus.query(&promql).is_empty(),
        );
    }

    // The probes really reached `probed`.
    probed.wait_metric_at_least("echod_tcp_connections_accepted_total", &[], 1.0);

    // The alert rules load and evaluate against real series without errors.
    let (status, body) = http_get(prometheus.service.addr, "/api/v1/rules").unwrap();
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rules: Vec<_> = json["data"]["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(rules.len(), 12, "{body}");
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
    let closed = refusing();
    assert_eq!(success("echod_tcp_echo", &closed.addr.to_string()).0, 0.0);

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

/// The alert rules and their unit tests as JSON: (alerts, tests).
fn alerts_and_tests() -> (Vec<serde_json::Value>, serde_json::Value) {
    let rules = crate::support::yaml_file("deploy/prometheus/echod-alerts.yml");
    let alerts = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect();
    (
        alerts,
        crate::support::yaml_file("deploy/prometheus/rules.test.yml"),
    )
}

/// docs/metrics.md's alert table for the rules of deploy/prometheus/echod-alerts.yml:
/// each alert's name, expression (on one line), `for`, severity and summary.
fn alert_table(alerts: &[serde_json::Value]) -> String {
    let cell = |text: &str| {
        text.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .replace('|', "\\|")
    };
    let mut out =
        String::from("| alert | fires when | for | severity | summary |\n|---|---|---|---|---|\n");
    for alert in alerts {
        let text = |value: &serde_json::Value| value.as_str().map(cell);
        let name = text(&alert["alert"]).expect("every rule here is an alert");
        out.push_str(&format!(
            "| `{name}` | `{}` | {} | {} | {} |\n",
            text(&alert["expr"]).unwrap_or_else(|| panic!("{name}: no expr")),
            text(&alert["for"]).unwrap_or_else(|| "at once".to_string()),
            text(&alert["labels"]["severity"]).unwrap_or_else(|| panic!("{name}: no severity")),
            text(&alert["annotations"]["summary"]).unwrap_or_else(|| panic!("{name}: no summary")),
        ));
    }
    out
}

/// The alert table in docs/metrics.md is the rules file's, regenerated with
/// `ECHOD_BLESS=1 cargo test --test deployment is_generated`.
fn alert_table_of_the_metrics_reference_is_generated_from_the_rules() {
    let (alerts, _) = alerts_and_tests();
    let fresh = alert_table(&alerts);
    let path = repo_path("docs/metrics.md");
    let committed = std::fs::read_to_string(&path).expect("docs/metrics.md");
    let begin = committed
        .find("<!-- BEGIN GENERATED from deploy/prometheus/echod-alerts.yml")
        .expect("docs/metrics.md has a generated alert table");
    let start = begin + committed[begin..].find('\n').expect("a marker line") + 1;
    let end = start
        + committed[start..]
            .find("<!-- END GENERATED -->")
            .expect("the generated alert table ends");
    if std::env::var("ECHOD_BLESS").is_ok_and(|v| v == "1") {
        let blessed = format!("{}{fresh}{}", &committed[..start], &committed[end..]);
        std::fs::write(&path, blessed).expect("write docs/metrics.md");
    } else {
        assert!(
            committed[start..end] == fresh,
            "docs/metrics.md's alert table is stale: regenerate it with \
             `ECHOD_BLESS=1 cargo test --test deployment is_generated`"
        );
    }
    assert!(alerts.len() >= 12, "only {} alerts", alerts.len());
    assert!(
        fresh.contains("| `EchodDown` | `up{job=\"echod\"} == 0` | 1m | critical |"),
        "{fresh}"
    );
}

fn alerts_cover_what_the_deploy_sets_up_and_each_is_tested_firing_and_quiet() {
    let (alerts, tests) = alerts_and_tests();
    let exprs: Vec<String> = alerts
        .iter()
        .map(|a| a["expr"].as_str().unwrap().to_string())
        .collect();
    // What the deploy material sets up or exports, and an operator must hear about.
    for (what, needles) in [
        ("a failing blackbox probe", &["probe_success", "== 0"][..]),
        (
            "accept() failing for lack of file descriptors",
            &["echod_tcp_accept_errors_total", "kind=\"fd_limit\""],
        ),
        (
            "file descriptors near the limit",
            &["process_open_fds", "process_max_fds"],
        ),
        ("a restart", &["changes(echod_start_time_seconds"]),
        ("a drain that does not end", &["echod_draining"]),
    ] {
        assert!(
            exprs.iter().any(|e| needles.iter().all(|n| e.contains(n))),
            "no alert for {what} (an expression with {needles:?})"
        );
    }
    let reference =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    for alert in &alerts {
        let name = alert["alert"].as_str().unwrap();
        assert!(
            reference.contains(&format!("`{name}`")),
            "docs/metrics.md does not list {name}"
        );
    }
    // Each alert has a unit test where it fires and one where it stays quiet.
    let cases: Vec<&serde_json::Value> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .collect();
    for alert in &alerts {
        let name = alert["alert"].as_str().unwrap();
        let mine: Vec<_> = cases.iter().filter(|c| c["alertname"] == name).collect();
        assert!(
            mine.iter()
                .any(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty())),
            "{name}: no unit test where it fires"
        );
        assert!(
            mine.iter()
                .any(|c| c["exp_alerts"].as_array().is_some_and(|a| a.is_empty())),
            "{name}: no unit test where it stays quiet"
        );
        assert!(
            alert["labels"]["severity"].is_string()
                && alert["annotations"]["summary"].is_string()
                && alert["annotations"]["description"].is_string(),
            "{name}: severity, summary and description"
        );
    }
}

/// deploy/prometheus is the example for the Debian package's service on the same host:
/// the blackbox TCP probe goes to the port the package serves, the scrape to its metrics
/// address.
fn example_prometheus_config_targets_the_packaged_service() {
    let packaged = crate::support::shipped_config("packaging/echod.toml");
    let echo_port = crate::support::single_port(&packaged.tcp.listen);
    let metrics = packaged.metrics.listen[0];
    let text = std::fs::read_to_string(crate::support::repo_path(
        "deploy/prometheus/prometheus.yml",
    ))
    .unwrap();
    assert!(
        text.contains("Debian package"),
        "prometheus.yml should say which echod it is for"
    );
    let config = crate::support::yaml_file("deploy/prometheus/prometheus.yml");
    let jobs = config["scrape_configs"].as_array().unwrap();
    let job = |name: &str| {
        jobs.iter()
            .find(|j| j["job_name"] == name)
            .unwrap_or_else(|| panic!("no job {name}"))
    };
    assert_eq!(
        job("echod")["static_configs"][0]["targets"],
        serde_json::json!([metrics.to_string()])
    );
    assert_eq!(
        job("echod_tcp_probe")["static_configs"][0]["targets"],
        serde_json::json!([format!("127.0.0.1:{echo_port}")]),
        "the TCP echo probe must reach the packaged service's port"
    );
    assert_eq!(
        job("echod_ready_probe")["static_configs"][0]["targets"],
        serde_json::json!([format!("http://{metrics}/readyz")])
    );
    // Probe results carry the blackbox module, which the probe alert matches (not the
    // job name, which differs between setups).
    for name in ["echod_tcp_probe", "echod_ready_probe"] {
        let relabels = job(name)["relabel_configs"].as_array().unwrap();
        assert!(
            relabels.iter().any(
                |r| r["source_labels"] == serde_json::json!(["__param_module"])
                    && r["target_label"] == "module"
            ),
            "{name}: no `module` label"
        );
    }
}

/// The colour a stat panel shows for `value`: the last threshold step at or below it.
fn threshold_colour(panel: &serde_json::Value, value: f64) -> String {
    let steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("stat panel {} has no thresholds", panel["title"]));
    steps
        .iter()
        .rfind(|s| s["value"].is_null() || s["value"].as_f64().is_some_and(|v| v <= value))
        .and_then(|s| s["color"].as_str())
        .unwrap_or_else(|| panic!("{}: no base step", panel["title"]))
        .to_string()
}

/// Every `datasource` object in the dashboard (panels, targets, variables, annotations).
fn datasource_refs(value: &serde_json::Value, found: &mut Vec<serde_json::Value>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                if key == "datasource" && v.is_object() {
                    found.push(v.clone());
                }
                datasource_refs(v, found);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| datasource_refs(v, found)),
        _ => {}
    }
}

fn dashboard_asks_for_its_data_source_colours_health_and_shows_probes_and_restarts() {
    let text = std::fs::read_to_string(crate::support::repo_path(
        "deploy/grafana/echod-dashboard.json",
    ))
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();

    // Import asks for the Prometheus data source, and everything uses the answer.
    let inputs = json["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"
            && i["type"] == "datasource"
            && i["pluginId"] == "prometheus"),
        "no DS_PROMETHEUS data source input: {inputs:?}"
    );
    let mut refs = Vec::new();
    datasource_refs(&json, &mut refs);
    assert!(refs.len() > 20);
    for r in &refs {
        assert_eq!(
            (&r["type"], &r["uid"]),
            (&"prometheus".into(), &"${DS_PROMETHEUS}".into()),
            "data source reference {r}"
        );
    }
    // File provisioning ignores __inputs: a data source variable of the same name
    // resolves ${DS_PROMETHEUS} there (to the default Prometheus).
    let variables = json["templating"]["list"].as_array().unwrap();
    assert!(
        variables
            .iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"),
        "no DS_PROMETHEUS data source variable"
    );

    // Stat panels colour by thresholds: a 0 for "up", "ready" or a probe is red.
    let board = crate::support::dashboard();
    let queries = crate::support::dashboard_queries(&board);
    let stats: Vec<_> = board["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] == "stat")
        .collect();
    assert!(stats.len() >= 5);
    for panel in &stats {
        let title = panel["title"].as_str().unwrap();
        assert_eq!(
            panel["fieldConfig"]["defaults"]["color"]["mode"], "thresholds",
            "{title}"
        );
        let expr = panel["targets"][0]["expr"].as_str().unwrap();
        let health = ["up{", "echod_ready{", "probe_success{"]
            .iter()
            .any(|m| expr.starts_with(m));
        if health {
            assert_eq!(threshold_colour(panel, 0.0), "red", "{title} at 0");
            assert_eq!(threshold_colour(panel, 1.0), "green", "{title} at 1");
        } else if expr.starts_with("echod_draining{") {
            assert_eq!(threshold_colour(panel, 0.0), "green", "{title} at 0");
            assert_ne!(threshold_colour(panel, 1.0), "green", "{title} at 1");
        } else {
            threshold_colour(panel, 0.0);
        }
    }
    assert!(
        queries.iter().any(|(_, e)| e.starts_with("probe_success{")),
        "no panel shows the blackbox probes"
    );

    // Restarts and reloads are marked on every time series.
    let annotations = json["annotations"]["list"].as_array().unwrap();
    for metric in ["echod_start_time_seconds", "echod_config_reloads_total"] {
        assert!(
            annotations
                .iter()
                .any(|a| a["enable"] == true
                    && a["expr"].as_str().is_some_and(|e| e.contains(metric))),
            "no annotation on {metric}"
        );
    }
}

/// The annotation queries are PromQL a real Prometheus accepts (it answers 400 to a
/// query it cannot parse).
fn dashboard_annotation_queries_are_valid_promql() {
    let text = std::fs::read_to_string(crate::support::repo_path(
        "deploy/grafana/echod-dashboard.json",
    ))
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let prometheus = Prometheus::start("global:\n  scrape_interval: 15s\n", &[]);
    let mut checked = 0;
    for annotation in json["annotations"]["list"].as_array().unwrap() {
        let Some(expr) = annotation["expr"].as_str() else {
            continue;
        };
        let promql = expr
            .replace("$__interval", "1m")
            .replace("$__rate_interval", "1m")
            .replace("\"$job\"", "\".+\"")
            .replace("\"$instance\"", "\".+\"");
        prometheus.query(&promql);
        checked += 1;
    }
    assert!(checked >= 2, "only {checked} annotation queries");
}

/// A scrape job over https trusting `ca`, with basic auth and `extra_tls` lines.
fn https_job(name: &str, target: SocketAddr, ca: &Path, password: &str, extra_tls: &str) -> String {
    let mut tls_config = format!("      ca_file: {}\n", ca.display());
    for line in extra_tls.lines() {
        tls_config.push_str(&format!("      {line}\n"));
    }
    format!(
        "  - job_name: {name}\n    scheme: https\n    tls_config:\n{tls_config}    \
         basic_auth:\n      username: prometheus\n      password: {password}\n    \
         static_configs:\n      - targets: [\"{target}\"]\n"
    )
}

/// The `lastError` Prometheus reports for the target of `job`.
fn last_scrape_error(prometheus: &Prometheus, job: &str) -> String {
    let (_, body) = http_get(prometheus.service.addr, "/api/v1/targets").expect("targets");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    json["data"]["activeTargets"]
        .as_array()
        .expect("active targets")
        .iter()
        .find(|t| t["labels"]["job"] == job)
        .and_then(|t| t["lastError"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// A real Prometheus scrapes echod over TLS with basic auth (`up` 1, echod's series
/// there); the same job with a wrong password is down with a 401. Against an endpoint
/// requiring client certificates, the job presenting one is up and the jobs without
/// one, or with one from a CA echod does not trust, are down (the handshake fails).
fn prometheus_scrapes_over_tls_with_basic_auth_and_a_wrong_password_is_down() {
    let pki = Pki::new();
    let users = [("prometheus", "s3cret")];
    let open = daemon_with_web_config(
        &pki.web_config("web.yml", "", &users),
        &HttpsClient::new(&pki.ca),
    );
    let mtls_extra = format!(
        "client_auth_type: RequireAndVerifyClientCert\nclient_ca_file: {}",
        pki.ca.display()
    );
    let mtls = daemon_with_web_config(
        &pki.web_config("web-mtls.yml", &mtls_extra, &users),
        &HttpsClient::with_client_cert(&pki.ca, &pki.client_cert, &pki.client_key),
    );
    let client_cert = format!(
        "cert_file: {}\nkey_file: {}",
        pki.client_cert.display(),
        pki.client_key.display()
    );
    let stranger_cert = format!(
        "cert_file: {}\nkey_file: {}",
        pki.stranger_cert.display(),
        pki.stranger_key.display()
    );
    let config = [
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n".to_string(),
        https_job("echod", open.http, &pki.ca, "s3cret", ""),
        https_job("echod_wrong_password", open.http, &pki.ca, "wrong", ""),
        https_job("echod_mtls", mtls.http, &pki.ca, "s3cret", &client_cert),
        https_job("echod_no_client_cert", mtls.http, &pki.ca, "s3cret", ""),
        https_job(
            "echod_stranger_cert",
            mtls.http,
            &pki.ca,
            "s3cret",
            &stranger_cert,
        ),
    ]
    .concat();
    let prometheus = Prometheus::start(&config, &[]);

    for (query, want) in [
        (r#"up{job="echod"}"#, 1.0),
        (r#"echod_ready{job="echod"}"#, 1.0),
        (r#"echod_build_info{job="echod"}"#, 1.0),
        (r#"up{job="echod_wrong_password"}"#, 0.0),
        (r#"up{job="echod_mtls"}"#, 1.0),
        (r#"echod_ready{job="echod_mtls"}"#, 1.0),
        (r#"up{job="echod_no_client_cert"}"#, 0.0),
        (r#"up{job="echod_stranger_cert"}"#, 0.0),
    ] {
        prometheus.wait_value(query, want, PROMETHEUS_WAIT);
    }
    // Down for the right reasons: a 401, and a refused handshake.
    let wrong = last_scrape_error(&prometheus, "echod_wrong_password");
    assert!(wrong.contains("401"), "{wrong}");
    for job in ["echod_no_client_cert", "echod_stranger_cert"] {
        let error = last_scrape_error(&prometheus, job);
        assert!(
            error.contains("tls") || error.contains("certificate"),
            "{job}: {error}"
        );
    }
    assert!(
        prometheus
            .query(r#"echod_ready{job="echod_wrong_password"}"#)
            .is_empty(),
        "a refused scrape stored echod's series"
    );
    assert!(open.log().contains("HTTP basic auth failed"));
}

/// blackbox_exporter's http prober over HTTPS: `/readyz` with the CA in its
/// `tls_config` succeeds without credentials; without the CA it fails; `/metrics`
/// needs the module's basic auth.
fn blackbox_probes_readiness_and_metrics_over_https() {
    let pki = Pki::new();
    let web = pki.web_config("web.yml", "", &[("prometheus", "s3cret")]);
    let daemon = daemon_with_web_config(&web, &HttpsClient::new(&pki.ca));
    let ca = pki.ca.display();
    let modules = format!(
        "modules:
  https_ready:
    prober: http
    timeout: 5s
    http:
      fail_if_not_ssl: true
      tls_config:
        ca_file: {ca}
  https_untrusted:
    prober: http
    timeout: 5s
    http:
      fail_if_not_ssl: true
  https_metrics:
    prober: http
    timeout: 5s
    http:
      fail_if_not_ssl: true
      fail_if_body_not_matches_regexp: ['echod_ready 1']
      basic_auth:
        username: prometheus
        password: s3cret
      tls_config:
        ca_file: {ca}
"
    );
    let blackbox = Blackbox::start(&pki.write("blackbox.yml", &modules));
    let readyz = format!("https://{}/readyz", daemon.http);
    let metrics = format!("https://{}/metrics", daemon.http);
    let probe = |module: &str, target: &str| blackbox.probe(module, target);

    let body = probe("https_ready", &readyz);
    assert_eq!(metric_value(&body, "probe_success", &[]), 1.0, "{body}");
    assert_eq!(metric_value(&body, "probe_http_ssl", &[]), 1.0, "{body}");
    assert_eq!(
        metric_value(&body, "probe_http_status_code", &[]),
        200.0,
        "{body}"
    );
    let body = probe("https_untrusted", &readyz);
    assert_eq!(metric_value(&body, "probe_success", &[]), 0.0, "{body}");

    let body = probe("https_metrics", &metrics);
    assert_eq!(metric_value(&body, "probe_success", &[]), 1.0, "{body}");
    // The same probe of /metrics without credentials: 401.
    let body = probe("https_ready", &metrics);
    assert_eq!(metric_value(&body, "probe_success", &[]), 0.0, "{body}");
    assert_eq!(
        metric_value(&body, "probe_http_status_code", &[]),
        401.0,
        "{body}"
    );
}

/// deploy/prometheus/blackbox.yml with its echod CA path replaced by `ca`, written into
/// `pki`'s directory as `name`.
fn blackbox_with_ca(pki: &Pki, name: &str, ca: &Path) -> std::path::PathBuf {
    let shipped = std::fs::read_to_string(repo_path("deploy/prometheus/blackbox.yml")).unwrap();
    let placeholder = "ca_file: /etc/prometheus/echod-ca.crt";
    assert!(
        shipped.contains(placeholder),
        "blackbox.yml lost `{placeholder}`"
    );
    pki.write(
        name,
        &shipped.replace(placeholder, &format!("ca_file: {}", ca.display())),
    )
}

/// The shipped `echod_tls_echo` module (blackbox's `tcp` prober with `tls: true` and a
/// query_response) against echod's TLS listener, scraped by a real Prometheus: success,
/// the certificate's expiry agreeing with echod's own gauge, and each probe one
/// handshake in echod's counters. With another CA, or against the plain port, it fails.
fn blackbox_tls_echo_module_probes_the_tls_listener_under_prometheus() {
    let pki = Pki::new();
    let daemon = Daemon::start(&format!(
        "[tls]\nlisten = [\"127.0.0.1:0\"]\ncert_file = {:?}\nkey_file = {:?}\n",
        pki.cert.display().to_string(),
        pki.key.display().to_string()
    ));
    let tls_addr: SocketAddr = daemon.listening.tls[0];
    let handshakes = |result: &str| {
        daemon.metric(
            "echod_tls_handshakes_total",
            &[("listener", "127.0.0.1:0"), ("result", result)],
        )
    };
    let blackbox = Blackbox::start(&blackbox_with_ca(&pki, "blackbox.yml", &pki.ca));

    // Straight from the exporter first: the module really speaks TLS.
    let body = blackbox.probe("echod_tls_echo", &tls_addr.to_string());
    assert_eq!(metric_value(&body, "probe_success", &[]), 1.0, "{body}");
    assert_eq!(
        metric_value(&body, "probe_failed_due_to_regex", &[]),
        0.0,
        "{body}"
    );
    assert_eq!(handshakes("ok"), 1.0, "the probe was one handshake");
    let body = blackbox.probe("echod_tls_echo", &daemon.tcp.to_string());
    assert_eq!(
        metric_value(&body, "probe_success", &[]),
        0.0,
        "TLS to the plain port passed:\n{body}"
    );

    let prometheus = Prometheus::start(
        &format!(
            "global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: echod
    static_configs:
      - targets: [\"{http}\"]
  - job_name: echod_tls_probe
    metrics_path: /probe
    params:
      module: [echod_tls_echo]
    static_configs:
      - targets: [\"{tls_addr}\"]
    relabel_configs:
      - source_labels: [__param_module]
        target_label: module
      - source_labels: [__address__]
        target_label: __param_target
      - source_labels: [__param_target]
        target_label: instance
      - target_label: __address__
        replacement: {blackbox}
",
            http = daemon.http,
            blackbox = blackbox.service.addr
        ),
        &[],
    );
    prometheus.wait_value(
        r#"probe_success{job="echod_tls_probe",module="echod_tls_echo"}"#,
        1.0,
        PROMETHEUS_WAIT,
    );
    prometheus.wait_value(
        r#"probe_ssl_earliest_cert_expiry{module="echod_tls_echo"} - on() echod_tls_certificate_expiry_seconds{job="echod"}"#,
        0.0,
        PROMETHEUS_WAIT,
    );
    // Every probe Prometheus ran was a complete handshake and a clean close.
    let ok = daemon.wait_metric_at_least(
        "echod_tls_handshakes_total",
        &[("listener", "127.0.0.1:0"), ("result", "ok")],
        3.0,
    );
    assert_eq!(
        handshakes("protocol_error") + handshakes("client_alert") + handshakes("timeout"),
        0.0,
        "{ok} probes ok, yet failures"
    );
    drop(prometheus);

    // The same module trusting another CA fails the handshake, and echod hears why.
    let wrong = Blackbox::start(&blackbox_with_ca(&pki, "wrong.yml", &pki.stranger_cert));
    let body = wrong.probe("echod_tls_echo", &tls_addr.to_string());
    assert_eq!(metric_value(&body, "probe_success", &[]), 0.0, "{body}");
    daemon.wait_metric_at_least(
        "echod_tls_handshakes_total",
        &[("listener", "127.0.0.1:0"), ("result", "client_alert")],
        1.0,
    );
}
