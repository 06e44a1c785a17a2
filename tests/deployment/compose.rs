//! `deploy/compose.yaml` (echod + Prometheus + Grafana): valid against the Compose
//! specification, lint-clean, and wired together — every mounted file exists, Prometheus
//! scrapes echod's metrics port and loads the alert rules (checked by promtool on the
//! files laid out as the containers see them), Grafana finds its data source and the
//! dashboard, and a stop gives echod time to drain.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::support::{Need, assert_passes, repo_path, shipped_config, single_port, yaml_file};

crate::support::tests![
    compose_file_is_valid_against_the_compose_spec_and_lint_clean needs &[Need::Tool("check-jsonschema"), Need::Tool("yamllint")],
    compose_services_are_wired_to_echod_and_to_each_other needs &[Need::Tool("yamllint")],
    prometheus_accepts_the_compose_config_and_rules_as_mounted needs &[Need::Tool("promtool"), Need::Tool("yamllint")],
    grafana_resolves_every_data_source_of_the_provisioned_dashboard needs &[Need::Tool("yamllint")],
    compose_prometheus_probes_echod_through_blackbox_exporter needs &[Need::Tool("yamllint")],
];

const COMPOSE: &str = "deploy/compose.yaml";

/// A service's bind mounts as (host path resolved from deploy/, container path).
fn bind_mounts(service: &Value) -> Vec<(PathBuf, String)> {
    service["volumes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_str())
        .filter(|v| v.starts_with("./") || v.starts_with("../"))
        .map(|v| {
            let mut parts = v.split(':');
            let source = parts.next().unwrap();
            let target = parts.next().expect("mount target");
            (repo_path("deploy").join(source), target.to_string())
        })
        .collect()
}

/// Copies a service's bind mounts into `root` at their container paths.
fn lay_out(mounts: &[(PathBuf, String)], root: &Path) {
    for (source, target) in mounts {
        let dest = root.join(target.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(source, &dest)
            .unwrap_or_else(|e| panic!("{} → {}: {e}", source.display(), dest.display()));
    }
}

/// Where Prometheus reads its config inside its container (`--config.file=`).
fn config_file_flag(prometheus: &Value) -> String {
    prometheus["command"]
        .as_array()
        .expect("prometheus command")
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix("--config.file="))
        .expect("--config.file")
        .to_string()
}

/// Seconds of a Compose duration such as "15s" or "1m30s".
fn seconds(duration: &str) -> u64 {
    humantime::parse_duration(duration)
        .unwrap_or_else(|e| panic!("{duration}: {e}"))
        .as_secs()
}

fn compose_file_is_valid_against_the_compose_spec_and_lint_clean() {
    assert_passes(
        Command::new("check-jsonschema")
            .args(["--builtin-schema", "vendor.compose-spec"])
            .arg(repo_path(COMPOSE)),
    );
    assert_passes(
        Command::new("yamllint")
            .arg("--strict")
            .arg(repo_path(COMPOSE))
            .arg(repo_path("deploy/compose")),
    );
}

fn compose_services_are_wired_to_echod_and_to_each_other() {
    let compose = yaml_file(COMPOSE);
    let services = &compose["services"];
    let image_config = shipped_config("deploy/container/echod.toml");

    // echod: built from the real Dockerfile; ports are the image's; the stop grace
    // period outlasts the drain.
    let echod = &services["echod"];
    let context = repo_path("deploy").join(echod["build"]["context"].as_str().unwrap());
    let dockerfile = context.join(echod["build"]["dockerfile"].as_str().unwrap());
    assert_eq!(
        dockerfile.canonicalize().unwrap(),
        repo_path("deploy/Dockerfile").canonicalize().unwrap()
    );
    let echo_port = single_port(&image_config.tcp.listen);
    let metrics_port = single_port(&image_config.metrics.listen);
    let published: Vec<&str> = echod["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    for (port, proto) in [
        (echo_port, "tcp"),
        (single_port(&image_config.udp.listen), "udp"),
        (metrics_port, "tcp"),
    ] {
        let suffix = format!(":{port}/{proto}");
        assert!(
            published.iter().any(|p| p.ends_with(&suffix)),
            "container port {port}/{proto} is not published: {published:?}"
        );
    }
    assert!(
        seconds(echod["stop_grace_period"].as_str().unwrap())
            > image_config.shutdown.drain_timeout.as_secs(),
        "stop_grace_period must outlast shutdown.drain_timeout"
    );
    assert_eq!(echod["read_only"], true);
    assert_eq!(echod["cap_drop"], serde_json::json!(["ALL"]));

    // Prometheus: waits for a healthy echod, scrapes it by service name on the metrics
    // port, and loads rule files that are mounted.
    let prometheus = &services["prometheus"];
    assert_eq!(
        prometheus["depends_on"]["echod"]["condition"],
        "service_healthy"
    );
    let prom_mounts = bind_mounts(prometheus);
    let config_target = config_file_flag(prometheus);
    let (config_source, _) = prom_mounts
        .iter()
        .find(|(_, target)| *target == config_target)
        .expect("the config file is mounted");
    let prom_config = yaml_file(
        config_source
            .strip_prefix(repo_path(""))
            .unwrap()
            .to_str()
            .unwrap(),
    );
    let targets = &prom_config["scrape_configs"][0]["static_configs"][0]["targets"];
    assert_eq!(
        targets,
        &serde_json::json!([format!("echod:{metrics_port}")])
    );
    assert_eq!(prom_config["scrape_configs"][0]["job_name"], "echod");
    assert!(!prom_config["rule_files"].as_array().unwrap().is_empty());

    // Grafana: the provisioned data source is the compose Prometheus, and the dashboard
    // provider reads the directory the dashboard is mounted into.
    let grafana = &services["grafana"];
    let graf_mounts = bind_mounts(grafana);
    let provisioning = graf_mounts
        .iter()
        .find(|(_, t)| t == "/etc/grafana/provisioning")
        .map(|(s, _)| s.clone())
        .expect("provisioning mounted");
    let rel = |p: &Path| {
        p.strip_prefix(repo_path(""))
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    let datasources = yaml_file(&rel(&provisioning.join("datasources/prometheus.yml")));
    assert_eq!(datasources["datasources"][0]["type"], "prometheus");
    assert_eq!(
        datasources["datasources"][0]["url"],
        "http://prometheus:9090"
    );
    let providers = yaml_file(&rel(&provisioning.join("dashboards/echod.yml")));
    let dashboards_dir = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let dashboard = graf_mounts
        .iter()
        .find(|(s, _)| s.extension().is_some_and(|e| e == "json"))
        .expect("a dashboard is mounted");
    assert_eq!(
        Path::new(&dashboard.1).parent().unwrap(),
        Path::new(dashboards_dir)
    );

    // Every file or directory mounted from the repository exists.
    for (source, target) in prom_mounts.iter().chain(&graf_mounts) {
        assert!(
            source.exists(),
            "{} (mounted at {target}) does not exist",
            source.display()
        );
    }
    let json = std::fs::read_to_string(&dashboard.0).unwrap();
    let parsed: Value = serde_json::from_str(&json).expect("dashboard JSON");
    assert!(parsed["panels"].is_array(), "a Grafana dashboard");
}

fn prometheus_accepts_the_compose_config_and_rules_as_mounted() {
    let compose = yaml_file(COMPOSE);
    let prometheus = &compose["services"]["prometheus"];
    let root = tempfile::tempdir().unwrap();
    lay_out(&bind_mounts(prometheus), root.path());
    let config = config_file_flag(prometheus);
    let out = assert_passes(
        Command::new("promtool")
            .args(["check", "config"])
            .arg(root.path().join(config.trim_start_matches('/'))),
    );
    // promtool names each rule file it loaded; an empty rules list would pass silently.
    assert!(
        out.contains("SUCCESS") && out.contains("rules found"),
        "{out}"
    );
}

/// Every data source the provisioned dashboard refers to resolves in the compose
/// Grafana: file provisioning ignores `__inputs`, so a `${NAME}` reference needs a data
/// source variable NAME (which picks the default data source of its type, provisioned
/// here) or a provisioned data source with that uid.
fn grafana_resolves_every_data_source_of_the_provisioned_dashboard() {
    let provisioned = yaml_file("deploy/compose/grafana/provisioning/datasources/prometheus.yml");
    let sources = provisioned["datasources"].as_array().unwrap();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_path("deploy/grafana/echod-dashboard.json")).unwrap(),
    )
    .unwrap();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let text = dashboard.to_string();
    let mut refs: Vec<&str> = text
        .match_indices("\"uid\":\"")
        .map(|(at, m)| {
            let rest = &text[at + m.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .filter(|uid| *uid != "echod-overview")
        .collect();
    refs.sort();
    refs.dedup();
    assert!(!refs.is_empty());
    for uid in refs {
        if let Some(name) = uid.strip_prefix("${").and_then(|u| u.strip_suffix('}')) {
            let variable = variables
                .iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("{uid}: no dashboard variable {name}"));
            assert_eq!(variable["type"], "datasource", "{uid}");
            assert!(
                sources
                    .iter()
                    .any(|s| s["type"] == variable["query"] && s["isDefault"] == true),
                "{uid}: no default {} data source is provisioned",
                variable["query"]
            );
        } else {
            assert!(
                sources.iter().any(|s| s["uid"] == uid),
                "data source uid {uid} is not provisioned"
            );
        }
    }
}

/// The compose stack probes echod through blackbox_exporter like deploy/prometheus
/// does, so the dashboard's probe panel and EchodProbeFailed work there too.
fn compose_prometheus_probes_echod_through_blackbox_exporter() {
    let compose = yaml_file(COMPOSE);
    let services = &compose["services"];
    let image_config = shipped_config("deploy/container/echod.toml");
    let blackbox = &services["blackbox"];
    assert!(blackbox.is_object(), "no blackbox service");
    let mounts = bind_mounts(blackbox);
    let (modules_file, target) = mounts.first().expect("blackbox.yml mounted");
    assert_eq!(
        modules_file.canonicalize().unwrap(),
        repo_path("deploy/prometheus/blackbox.yml")
            .canonicalize()
            .unwrap()
    );
    assert!(
        blackbox["command"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str() == Some(&format!("--config.file={target}"))),
        "blackbox_exporter does not read the mounted modules"
    );
    let modules = yaml_file("deploy/prometheus/blackbox.yml");
    let prom = yaml_file("deploy/compose/prometheus.yml");
    let jobs = prom["scrape_configs"].as_array().unwrap();
    let echo = format!("echod:{}", single_port(&image_config.tcp.listen));
    let ready = format!(
        "http://echod:{}/readyz",
        single_port(&image_config.metrics.listen)
    );
    for (module, target) in [("echod_tcp_echo", &echo), ("echod_http_ready", &ready)] {
        assert!(modules["modules"][module].is_object(), "{module}");
        let job = jobs
            .iter()
            .find(|j| j["params"]["module"][0] == module)
            .unwrap_or_else(|| panic!("no probe job with module {module}"));
        assert_eq!(
            job["static_configs"][0]["targets"],
            serde_json::json!([target])
        );
        let relabels = job["relabel_configs"].as_array().unwrap();
        assert!(relabels.iter().any(|r| r["target_label"] == "module"));
        assert!(
            relabels
                .iter()
                .any(|r| r["target_label"] == "__address__" && r["replacement"] == "blackbox:9115"),
            "{module}: not sent to the blackbox service"
        );
    }
}
