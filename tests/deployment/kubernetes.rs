//! The Kubernetes deployment (`deploy/kubernetes`, a kustomize base): every manifest is
//! valid for the Kubernetes versions we support, lint-clean, and agrees with echod
//! itself — probe paths it serves, ports it listens on, a grace period longer than its
//! drain, the image's user. No cluster can run here, so this is validation only.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value;

use crate::prometheus::tls;
use crate::support::{Need, assert_passes, repo_path, single_port, yaml_documents, yaml_file};

crate::support::tests![
    every_manifest_passes_strict_schema_validation_and_yamllint needs VALIDATORS,
    kustomize_build_output_is_valid_and_wires_the_generated_config_map
        needs &[Need::Tool("yamllint"), Need::Tool("kubernetes-validate"), Need::Tool("kubectl")],
    probes_ports_security_and_grace_period_agree_with_echod needs &[Need::Tool("yamllint")],
    prometheus_rule_carries_exactly_the_alert_rules needs &[Need::Tool("yamllint"), Need::Tool("promtool")],
    podmonitor_gives_the_job_name_the_alerts_match needs &[Need::Tool("yamllint")],
];

/// The oldest Kubernetes the manifests support (the preStop `sleep` action is on by
/// default from 1.30) and the newest the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];
/// Manifests with a schema in Kubernetes itself (the PodMonitor is a CRD).
const CORE_MANIFESTS: [&str; 4] = [
    "deployment.yaml",
    "service.yaml",
    "poddisruptionbudget.yaml",
    "horizontalpodautoscaler.yaml",
];

/// Validates a YAML stream strictly (unknown fields are errors) against each version;
/// a warning (such as a missing schema) fails too, so nothing passes unchecked.
fn validate_strictly(path: &std::path::Path) {
    for version in KUBERNETES_VERSIONS {
        let out = assert_passes(
            Command::new("kubernetes-validate")
                .args(["--strict", "--quiet", "-k", version])
                .arg(path),
        );
        assert!(
            !out.contains("WARN"),
            "{} against {version}:\n{out}",
            path.display()
        );
    }
}

/// yamllint (which brings PyYAML, used to read the manifests) and kubernetes-validate.
const VALIDATORS: &[Need] = &[Need::Tool("yamllint"), Need::Tool("kubernetes-validate")];

fn every_manifest_passes_strict_schema_validation_and_yamllint() {
    for file in CORE_MANIFESTS {
        validate_strictly(&repo_path(&format!("deploy/kubernetes/{file}")));
    }
    assert_passes(
        Command::new("yamllint")
            .arg("--strict")
            .arg(repo_path("deploy/kubernetes")),
    );
}

fn kustomize_build_output_is_valid_and_wires_the_generated_config_map() {
    let built = assert_passes(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(repo_path("deploy/kubernetes")),
    );
    let docs = yaml_documents(&built);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "ConfigMap",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "PodMonitor",
        "PrometheusRule",
    ] {
        assert!(kinds.contains(&kind), "kustomize output lacks a {kind}");
    }

    // Everything but the CRD against Kubernetes' own schemas.
    let core: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] != "PodMonitor" && d["kind"] != "PrometheusRule")
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("built.yaml");
    // JSON documents are YAML documents.
    let stream: Vec<String> = core.iter().map(|d| format!("---\n{d}\n")).collect();
    std::fs::write(&path, stream.concat()).unwrap();
    validate_strictly(&path);

    // The Deployment mounts the ConfigMap kustomize generated (hash-suffixed name).
    let config_map = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let name = config_map["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("echod-config-"), "{name}");
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(
        volumes.iter().any(|v| v["configMap"]["name"] == name),
        "no volume uses {name}"
    );
    let shipped = std::fs::read_to_string(repo_path("deploy/kubernetes/echod.toml")).unwrap();
    assert_eq!(config_map["data"]["echod.toml"].as_str(), Some(&*shipped));
    // Selectors carry the common labels, so the Service still finds the pods.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let service = docs.iter().find(|d| d["kind"] == "Service").unwrap();
    for (key, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[key], value, "pod label {key}");
    }
}

/// A named container port: (number, protocol).
fn container_ports(container: &Value) -> BTreeMap<String, (u64, String)> {
    container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("named port").to_string(),
                (
                    p["containerPort"].as_u64().expect("containerPort"),
                    p["protocol"].as_str().unwrap_or("TCP").to_string(),
                ),
            )
        })
        .collect()
}

/// deploy/kubernetes/echod.toml as echod loads it, with the Secret's two files standing
/// in for `pki`'s (they exist only in the pod).
fn kubernetes_config(pki: &tls::Pki) -> echod::config::Config {
    echod::config::ConfigSource {
        file: Some(repo_path("deploy/kubernetes/echod.toml")),
        overrides: vec![
            ("tls.cert_file".into(), pki.cert.display().to_string()),
            ("tls.key_file".into(), pki.key.display().to_string()),
        ],
    }
    .load_with_env(&Default::default())
    .unwrap_or_else(|e| panic!("deploy/kubernetes/echod.toml: {e}"))
}

fn probes_ports_security_and_grace_period_agree_with_echod() {
    let pki = tls::Pki::new();
    let config = kubernetes_config(&pki);
    let deployment = yaml_file("deploy/kubernetes/deployment.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["name"], "echod");

    // Ports: the named container ports are the ones echod's config listens on.
    let ports = container_ports(container);
    let tcp = u64::from(single_port(&config.tcp.listen));
    let udp = u64::from(single_port(&config.udp.listen));
    let metrics = u64::from(single_port(&config.metrics.listen));
    assert_eq!(ports["echo-tcp"], (tcp, "TCP".to_string()));
    assert_eq!(ports["echo-udp"], (udp, "UDP".to_string()));
    assert_eq!(ports["metrics"], (metrics, "TCP".to_string()));
    let tls_port = u64::from(single_port(&config.tls.listen));
    assert_eq!(ports["echo-tls"], (tls_port, "TCP".to_string()));
    // Probes reach pods on their pod IP: echod must listen on every interface.
    assert!(
        config
            .metrics
            .listen
            .iter()
            .all(|a| a.ip().is_unspecified())
    );
    assert!(config.tcp.listen.iter().all(|a| a.ip().is_unspecified()));
    assert!(config.tls.listen.iter().all(|a| a.ip().is_unspecified()));

    // TLS: the certificate and key come from the Secret's volume, where echod.toml
    // looks for them (the Secret's standard tls.crt/tls.key names).
    let raw: toml::Table = std::fs::read_to_string(repo_path("deploy/kubernetes/echod.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let mounts = container["volumeMounts"].as_array().unwrap();
    let volumes = pod["volumes"].as_array().unwrap();
    let secret = volumes
        .iter()
        .find(|v| v["secret"].is_object())
        .expect("a Secret volume");
    assert_eq!(secret["secret"]["secretName"], "echod-tls");
    let tls_dir = mounts
        .iter()
        .find(|m| m["name"] == secret["name"])
        .expect("the Secret is mounted")["mountPath"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        raw["tls"]["cert_file"].as_str(),
        Some(&*format!("{tls_dir}/tls.crt"))
    );
    assert_eq!(
        raw["tls"]["key_file"].as_str(),
        Some(&*format!("{tls_dir}/tls.key"))
    );
    // The Secret's files are group-readable only, by the pod's group.
    assert_eq!(secret["secret"]["defaultMode"], 0o440);
    assert_eq!(
        pod["securityContext"]["fsGroup"],
        pod["securityContext"]["runAsGroup"]
    );

    // Readiness: an exec probe (the image has no shell) of /readyz — it fails first
    // on a stop — and of a nonce echoed over TLS on the TLS port, trusting the
    // certificate echod serves.
    let command: Vec<String> = container["readinessProbe"]["exec"]["command"]
        .as_array()
        .expect("readinessProbe exec")
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(command[..2], ["/echod".to_string(), "probe".to_string()]);
    let flags = &command[2..];
    let readyz = format!("--http=http://127.0.0.1:{metrics}/readyz");
    let tls_target = format!("--tcp=tls://127.0.0.1:{tls_port}");
    let ca = format!("--ca={tls_dir}/tls.crt");
    for flag in [&readyz, &tls_target, &ca] {
        assert!(
            flags.contains(flag),
            "readiness probe lacks {flag}: {command:?}"
        );
    }
    let probe_timeout: humantime::Duration = flags
        .iter()
        .find_map(|f| f.strip_prefix("--timeout="))
        .expect("--timeout")
        .parse()
        .unwrap();
    let checks = 2;
    assert!(
        probe_timeout.as_secs() * checks
            < container["readinessProbe"]["timeoutSeconds"]
                .as_u64()
                .unwrap(),
        "the probe's checks end before Kubernetes gives up on it"
    );
    // …and that very command passes against echod serving TLS, with the ports and
    // the certificate path moved to the test's.
    let daemon = crate::support::Daemon::start(&format!(
        "[tls]\nlisten = [\"127.0.0.1:0\"]\ncert_file = {:?}\nkey_file = {:?}\n",
        pki.cert.display().to_string(),
        pki.key.display().to_string()
    ));
    let tls_addr: std::net::SocketAddr = daemon.listening.tls[0];
    let local: Vec<String> = flags
        .iter()
        .map(|f| {
            f.replace(&format!("127.0.0.1:{metrics}"), &daemon.http.to_string())
                .replace(&format!("127.0.0.1:{tls_port}"), &tls_addr.to_string())
                .replace(
                    &format!("{tls_dir}/tls.crt"),
                    &pki.cert.display().to_string(),
                )
        })
        .collect();
    let out = Command::new(crate::support::echod_bin())
        .arg("probe")
        .args(&local)
        .env_remove("ECHOD_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{local:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        daemon.metric(
            "echod_tls_handshakes_total",
            &[("listener", "127.0.0.1:0"), ("result", "ok")]
        ),
        1.0,
        "the probe's nonce went over TLS"
    );
    drop(daemon);

    // Liveness and startup on /healthz, on the metrics port.
    for (probe, path) in [("livenessProbe", "/healthz"), ("startupProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], "metrics", "{probe}");
    }
    // …and echod really serves them.
    let daemon = crate::support::Daemon::start("");
    for path in ["/readyz", "/healthz", "/metrics"] {
        let (status, _) = crate::support::http_get(daemon.http, path).expect(path);
        assert_eq!(status, 200, "echod answers {path}");
    }
    drop(daemon);

    // Stop: the grace period covers the preStop wait plus echod's whole drain.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("preStop sleep action");
    let drain = config.shutdown.drain_timeout.as_secs();
    assert!(pre_stop >= 1, "a preStop wait lets endpoint removal settle");
    assert!(
        grace >= pre_stop + drain + 5,
        "terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} + drain {drain} (+5 s)"
    );

    // Security: the image's numeric user, nothing writable, no capabilities.
    let dockerfile = std::fs::read_to_string(repo_path("deploy/Dockerfile")).unwrap();
    let image_user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("Dockerfile USER")
        .trim();
    let pod_sc = &pod["securityContext"];
    assert_eq!(
        format!("{}:{}", pod_sc["runAsUser"], pod_sc["runAsGroup"]),
        image_user
    );
    assert_eq!(pod_sc["runAsNonRoot"], true);
    assert_eq!(pod_sc["seccompProfile"]["type"], "RuntimeDefault");
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    // Kubernetes would inject ECHOD_SERVICE_* variables for a Service named echod.
    assert_eq!(pod["enableServiceLinks"], false);
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
    // The config is mounted where the image (and ECHOD_CONFIG) expects it.
    assert!(dockerfile.contains("ENV ECHOD_CONFIG=/etc/echod/echod.toml"));
    assert_eq!(container["volumeMounts"][0]["mountPath"], "/etc/echod");

    // Service: TCP and UDP echo plus metrics, each to a named port of the right protocol.
    let service = yaml_file("deploy/kubernetes/service.yaml");
    let mut protocols = Vec::new();
    for port in service["spec"]["ports"].as_array().unwrap() {
        let target = port["targetPort"].as_str().expect("named targetPort");
        let protocol = port["protocol"].as_str().unwrap();
        assert_eq!(ports[target].1, protocol, "Service port {target}");
        protocols.push((port["port"].as_u64().unwrap(), protocol.to_string()));
    }
    assert!(protocols.contains(&(7, "TCP".into())));
    assert!(protocols.contains(&(7, "UDP".into())));
    assert!(protocols.contains(&(metrics, "TCP".into())));
    assert!(protocols.contains(&(tls_port, "TCP".into())));
    // The image publishes the TLS port too.
    let exposed = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .expect("Dockerfile EXPOSE");
    assert!(
        exposed
            .split_whitespace()
            .any(|p| p == format!("{tls_port}/tcp")),
        "EXPOSE {exposed} lacks the TLS port"
    );

    // Selectors of the Service, PDB and PodMonitor match the pods; HPA targets the
    // Deployment; the PodMonitor scrapes the named metrics port.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let pdb = yaml_file("deploy/kubernetes/poddisruptionbudget.yaml");
    let monitor = yaml_file("deploy/kubernetes/podmonitor.yaml");
    for selector in [
        &service["spec"]["selector"],
        &pdb["spec"]["selector"]["matchLabels"],
        &monitor["spec"]["selector"]["matchLabels"],
        &deployment["spec"]["selector"]["matchLabels"],
    ] {
        let selector = selector.as_object().expect("selector");
        assert!(!selector.is_empty());
        for (key, value) in selector {
            assert_eq!(&labels[key], value, "selector {key}");
        }
    }
    let hpa = yaml_file("deploy/kubernetes/horizontalpodautoscaler.yaml");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2);
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["kind"], "PodMonitor");
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(endpoint["path"], "/metrics");
}

/// deploy/kubernetes/prometheusrule.yaml as generated from
/// deploy/prometheus/echod-alerts.yml: the same groups under `spec:`, comments kept.
fn render_prometheus_rule() -> String {
    let alerts = std::fs::read_to_string(repo_path("deploy/prometheus/echod-alerts.yml")).unwrap();
    let body = &alerts[alerts.find("\ngroups:").expect("groups:") + 1..];
    let mut out = String::from(
        "# GENERATED from deploy/prometheus/echod-alerts.yml by tests/deployment/kubernetes.rs; do not edit.\n\
         # Regenerate: ECHOD_BLESS=1 cargo test --test deployment prometheus_rule\n\
         # echod's alert rules for prometheus-operator. If your Prometheus selects rules by\n\
         # label (ruleSelector, e.g. `release: kube-prometheus-stack`), add that label in\n\
         # kustomization.yaml (`labels:`), not here.\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: echod\n\
         spec:\n",
    );
    for line in body.lines() {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out
}

fn prometheus_rule_carries_exactly_the_alert_rules() {
    let path = repo_path("deploy/kubernetes/prometheusrule.yaml");
    let fresh = render_prometheus_rule();
    if std::env::var("ECHOD_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "deploy/kubernetes/prometheusrule.yaml differs from deploy/prometheus/echod-alerts.yml: \
         regenerate it with `ECHOD_BLESS=1 cargo test --test deployment prometheus_rule`"
    );
    let kustomization =
        std::fs::read_to_string(repo_path("deploy/kubernetes/kustomization.yaml")).unwrap();
    assert!(
        kustomization.contains("\n  - prometheusrule.yaml\n"),
        "the PrometheusRule is not in the kustomization"
    );
    // kubernetes-validate has no schema for CRDs: check the object's shape, and that its
    // rules are the alert file's, parsed.
    let rule = yaml_file("deploy/kubernetes/prometheusrule.yaml");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(rule["metadata"]["name"], "echod");
    let keys: Vec<&String> = rule["spec"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["groups"]);
    let alerts = yaml_file("deploy/prometheus/echod-alerts.yml");
    assert_eq!(rule["spec"]["groups"], alerts["groups"]);
    assert!(rule["spec"]["groups"][0]["rules"].as_array().unwrap().len() >= 11);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.json");
    std::fs::write(
        &file,
        serde_json::json!({ "groups": rule["spec"]["groups"] }).to_string(),
    )
    .unwrap();
    let out = assert_passes(Command::new("promtool").args(["check", "rules"]).arg(&file));
    assert!(out.contains("SUCCESS"), "{out}");
}

/// prometheus-operator names a PodMonitor's job `<namespace>/<name>` unless `jobLabel`
/// names a pod label to take it from; the alerts match `job="echod"`, so the PodMonitor
/// must produce exactly that.
fn podmonitor_gives_the_job_name_the_alerts_match() {
    let alerts = std::fs::read_to_string(repo_path("deploy/prometheus/echod-alerts.yml")).unwrap();
    let jobs: std::collections::BTreeSet<&str> = alerts
        .match_indices("job=")
        .map(|(at, _)| {
            let value = alerts[at + 4..].trim_start_matches('~');
            let value = value.strip_prefix('"').expect("quoted job value");
            &value[..value.find('"').unwrap()]
        })
        .collect();
    assert!(
        jobs.iter().all(|j| *j == "echod"),
        "alerts match job names {jobs:?}; only job=\"echod\" is produced everywhere"
    );
    let monitor = yaml_file("deploy/kubernetes/podmonitor.yaml");
    let label = monitor["spec"]["jobLabel"]
        .as_str()
        .expect("PodMonitor spec.jobLabel (else job is \"<namespace>/echod\")");
    let deployment = yaml_file("deploy/kubernetes/deployment.yaml");
    let kustomization = yaml_file("deploy/kubernetes/kustomization.yaml");
    let mut pod_labels = deployment["spec"]["template"]["metadata"]["labels"].clone();
    for set in kustomization["labels"].as_array().unwrap() {
        for (k, v) in set["pairs"].as_object().unwrap() {
            pod_labels[k] = v.clone();
        }
    }
    assert_eq!(
        pod_labels[label], "echod",
        "the pods' {label} label becomes the job"
    );
}
