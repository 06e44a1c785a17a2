//! Helpers for the tests of deployment files (Dockerfile, compose, Kubernetes): run a
//! linter or validator and demand a clean pass, and read YAML as JSON values.
//!
//! YAML is read with PyYAML, which yamllint brings along, so the build needs no YAML
//! crate and the tests read the files exactly as the validators do.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A path inside the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Runs `cmd` and panics with its output unless it exits 0; returns stdout and stderr.
pub fn assert_passes(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Every document of a YAML stream, as JSON values (empty documents skipped).
pub fn yaml_documents(yaml: &str) -> Vec<serde_json::Value> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n\
             json.dump(docs, sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (with PyYAML, installed with yamllint)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write YAML");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "YAML does not parse:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from python3")
}

/// The single document of a YAML file.
pub fn yaml_file(rel: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let mut docs = yaml_documents(&text);
    assert_eq!(docs.len(), 1, "{rel} holds one document");
    docs.remove(0)
}

/// The port of every address in a config list, which must all agree (one port on
/// several interfaces), e.g. `["0.0.0.0:7007", "[::]:7007"]` → 7007.
pub fn single_port(addrs: &[std::net::SocketAddr]) -> u16 {
    let port = addrs.first().expect("at least one address").port();
    assert!(
        addrs.iter().all(|a| a.port() == port),
        "listen addresses use different ports: {addrs:?}"
    );
    port
}

/// The effective configuration of a shipped config file, loaded as echod loads it.
pub fn shipped_config(rel: &str) -> echod::config::Config {
    echod::config::ConfigSource {
        file: Some(repo_path(rel)),
        overrides: Vec::new(),
    }
    .load_with_env(&Default::default())
    .unwrap_or_else(|e| panic!("{rel}: {e}"))
}
