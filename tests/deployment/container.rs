//! The container image as users get it: podman builds the real `deploy/Dockerfile`
//! (from source, in a builder stage) and runs the image — echo over published ports,
//! metrics, the HEALTHCHECK, a stop during traffic, a non-root user, a read-only root
//! filesystem and no capabilities.
//!
//! No registry is reachable here, so the builder base image is made locally
//! (`tests/deployment/podman-base-images.sh`: Debian + this machine's Rust toolchain + vendored
//! crates) and passed through the Dockerfile's `BUILDER_IMAGE` argument, exactly as a
//! user with a private mirror would. The runtime base is `scratch`, which needs no image.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::support::{
    Need, assert_passes, http_get, metric_value, paced_roundtrip, random_bytes, repo_path,
    tcp_roundtrip, wait_http_status, wait_until,
};

crate::support::tests![
    hadolint_passes_on_the_dockerfile needs &[Need::Tool("hadolint")],
    image_is_small_non_root_and_declares_ports_healthcheck_and_stop_signal needs PODMAN,
    container_echoes_tcp_and_udp_and_serves_metrics_read_only_without_capabilities needs PODMAN,
    healthcheck_is_healthy_and_turns_unhealthy_when_echod_is_frozen needs PODMAN,
    environment_variables_override_the_image_config needs PODMAN,
    podman_stop_during_traffic_lets_every_client_finish_and_exits_zero needs PODMAN,
    every_image_reference_in_deploy_is_fully_qualified,
    documented_container_commands_run_as_written needs PODMAN,
];

// Only `runnable` is used here; the daemon tests use the rest.
#[allow(dead_code)]
#[path = "../support/doc_blocks.rs"]
mod doc_blocks;

/// Base images, podman storage and vendored crates persist here between runs
/// (`$ECHOD_TEST_CACHE/podman`, as the other tests' caches, default /var/cache/echod-tests).
fn cache() -> PathBuf {
    let root = std::env::var_os("ECHOD_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/echod-tests"));
    root.join("podman")
}
/// The image the tests build and run.
const IMAGE: &str = "localhost/echod:container-test";
/// Every container a test creates is named with this prefix, the test process's PID and
/// a counter, so a run removes only its own (and those of runs that died).
const NAME_PREFIX: &str = "echod-test-";
/// The echo and metrics ports the image exposes.
const ECHO_PORT: u16 = 7007;
const METRICS_PORT: u16 = 9107;

/// A podman command that uses the tests' own configuration (runc, rlimits, storage).
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", cache().join("containers.conf"))
        .env("CONTAINERS_STORAGE_CONF", cache().join("storage.conf"))
        .stdin(Stdio::null());
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a podman command that must succeed and returns its trimmed stdout.
fn podman_ok(args: &[&str]) -> String {
    let out = run(podman().args(args));
    assert!(
        out.status.success(),
        "podman {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Removes containers left by earlier test processes that died without cleaning up.
fn remove_orphans() {
    let names = podman_ok(&["ps", "-a", "--format", "{{.Names}}"]);
    for name in names.lines() {
        let Some(pid) = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(podman().args(["rm", "-f", "-t", "0", name]));
        }
    }
}

/// The revision the image is built with, as `build.rs` would name it.
fn git_revision() -> String {
    let out = run(Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo_path("")));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Builds the image once per test process: local base images first, then the real
/// Dockerfile with `--format docker` (the OCI format drops HEALTHCHECK).
fn image() -> &'static str {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let started = Instant::now();
        let script = repo_path("tests/deployment/podman-base-images.sh");
        let out = run(Command::new("bash").arg(&script).arg(cache()));
        if !out.status.success() {
            return Err(format!(
                "base images: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let mut lines = stdout.lines();
        let (Some(builder), Some(vendor)) = (lines.next(), lines.next()) else {
            return Err(format!("base-images.sh printed {stdout:?}"));
        };
        eprintln!("base images ready in {:?}", started.elapsed());
        remove_orphans();
        let revision = git_revision();
        let out = run(podman()
            .arg("build")
            .args(["--format", "docker", "--network", "none"])
            .arg(format!("--build-arg=BUILDER_IMAGE={builder}"))
            .arg(format!("--build-arg=ECHOD_REVISION={revision}"))
            .arg(format!("--volume={vendor}:/opt/echod-vendor:ro"))
            .args(["-f", "deploy/Dockerfile", "-t", IMAGE, "."])
            .current_dir(repo_path("")));
        if !out.status.success() {
            return Err(format!(
                "podman build failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // Earlier builds' images are dangling now; keep the cache small.
        let _ = run(podman().args(["image", "prune", "-f"]));
        eprintln!("image built in {:?}", started.elapsed());
        Ok(())
    });
    if let Err(e) = built {
        panic!("{e}");
    }
    IMAGE
}

/// A running container this test created; removed (by name) when dropped.
struct PodmanContainer {
    name: String,
    /// The host side of the published TCP echo port (127.0.0.1).
    tcp: SocketAddr,
    /// The host side of the published UDP echo port (127.0.0.1).
    udp: SocketAddr,
    /// The host side of the published metrics port (127.0.0.1).
    http: SocketAddr,
}

impl PodmanContainer {
    /// Runs the image detached, with the ports published on 127.0.0.1 only (on host
    /// ports podman picks, read back with `podman port`), a read-only root filesystem
    /// and every capability dropped.
    fn start() -> PodmanContainer {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let image = image();
        let name = format!(
            "{NAME_PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let publish = [
            format!("--publish=127.0.0.1::{ECHO_PORT}/tcp"),
            format!("--publish=127.0.0.1::{ECHO_PORT}/udp"),
            format!("--publish=127.0.0.1::{METRICS_PORT}/tcp"),
        ];
        let out = run(podman()
            .args(["run", "--detach", "--name", &name])
            .args(["--read-only", "--cap-drop=ALL"])
            .args(["--security-opt", "no-new-privileges"])
            .args(&publish)
            .arg(image));
        Self::started(name, &out, "podman run failed")
    }

    /// The container `podman run` (its output `out`; `what` names the run) started as
    /// `name`, once its published ports are known and it is ready. Made before the run's
    /// status is checked, so a failed run's container is removed all the same.
    fn started(name: String, out: &Output, what: &str) -> PodmanContainer {
        let unknown = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut container = PodmanContainer {
            name,
            tcp: unknown,
            udp: unknown,
            http: unknown,
        };
        assert!(
            out.status.success(),
            "{what}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        container.tcp = container.host_port(&format!("{ECHO_PORT}/tcp"));
        container.udp = container.host_port(&format!("{ECHO_PORT}/udp"));
        container.http = container.host_port(&format!("{METRICS_PORT}/tcp"));
        container.wait_ready();
        container
    }

    /// The host address podman published the container's `port` ("7007/tcp") on.
    fn host_port(&self, port: &str) -> SocketAddr {
        let out = podman_ok(&["port", &self.name, port]);
        out.lines()
            .find_map(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("podman port {port}: {out:?}"))
    }

    /// Waits until `/readyz` answers 200 through the published port.
    fn wait_ready(&self) {
        if !wait_http_status(self.http, "/readyz", 200, Duration::from_secs(30)) {
            panic!("container did not become ready; logs:\n{}", self.logs());
        }
    }

    fn logs(&self) -> String {
        let out = run(podman().args(["logs", &self.name]));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn inspect(&self, format: &str) -> String {
        podman_ok(&["inspect", &self.name, "--format", format])
    }

    /// `podman healthcheck run`: true when healthy.
    fn healthy(&self) -> bool {
        run(podman().args(["healthcheck", "run", &self.name]))
            .status
            .success()
    }

    fn kill(&self, signal: &str) {
        podman_ok(&["kill", "--signal", signal, &self.name]);
    }
}

impl Drop for PodmanContainer {
    fn drop(&mut self) {
        let _ = run(podman().args(["rm", "--force", "--time", "0", &self.name]));
    }
}

/// podman, and debootstrap for the local builder base image.
const PODMAN: &[Need] = &[Need::Tool("podman"), Need::Tool("debootstrap")];

fn hadolint_passes_on_the_dockerfile() {
    assert_passes(
        Command::new("hadolint")
            .arg(repo_path("deploy/Dockerfile"))
            .current_dir(repo_path("")),
    );
}

fn image_is_small_non_root_and_declares_ports_healthcheck_and_stop_signal() {
    let image = image();
    let inspect = |format: &str| podman_ok(&["image", "inspect", image, "--format", format]);
    let size: u64 = inspect("{{.Size}}").parse().expect("image size");
    eprintln!("image size: {size} bytes");
    assert!(
        size < 15 * 1024 * 1024,
        "image is {size} bytes, over 15 MiB"
    );
    assert_eq!(inspect("{{.Config.User}}"), "65532:65532");
    assert_eq!(inspect("{{.Config.StopSignal}}"), "SIGTERM");
    // Exec form: no shell in the image, and none needed.
    assert_eq!(
        inspect("{{json .Config.Healthcheck.Test}}"),
        r#"["CMD","/echod","probe"]"#
    );
    let ports = inspect("{{json .Config.ExposedPorts}}");
    for port in ["7007/tcp", "7007/udp", "9107/tcp"] {
        assert!(ports.contains(port), "{port} not exposed: {ports}");
    }
}

fn container_echoes_tcp_and_udp_and_serves_metrics_read_only_without_capabilities() {
    let c = PodmanContainer::start();

    // The process really runs as the image's user, with no capabilities at all.
    let pid = c.inspect("{{.State.Pid}}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), ["65532"; 4], "{status}");
    assert_eq!(field("CapEff:"), ["0000000000000000"], "{status}");
    assert_eq!(c.inspect("{{.HostConfig.ReadonlyRootfs}}"), "true");

    let data = random_bytes(1 << 20, 7);
    assert!(tcp_roundtrip(c.tcp, &data, 7) == data, "TCP echo differs");

    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut answered = 0;
    for i in 0..20u64 {
        let datagram = random_bytes(1 + (i as usize * 97) % 1400, i);
        // UDP may drop a datagram on a loaded machine: retry each a few times.
        for _ in 0..5 {
            udp.send_to(&datagram, c.udp).unwrap();
            let mut buf = [0u8; 2048];
            if let Ok((n, from)) = udp.recv_from(&mut buf) {
                assert_eq!(from, c.udp);
                assert_eq!(&buf[..n], &datagram[..], "UDP echo differs");
                answered += 1;
                break;
            }
        }
    }
    assert_eq!(answered, 20, "every datagram is echoed");

    let (status, body) = http_get(c.http, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    assert!(metric_value(&body, "echod_tcp_connections_accepted_total", &[]) >= 1.0);
    assert!(metric_value(&body, "echod_tcp_received_bytes_total", &[]) >= data.len() as f64);
    assert!(metric_value(&body, "echod_udp_sent_datagrams_total", &[]) >= 20.0);
    assert_eq!(metric_value(&body, "echod_ready", &[]), 1.0);
    // The revision passed as a build argument reached the binary.
    let revision = git_revision();
    assert!(
        body.contains(&format!("revision=\"{revision}\"")),
        "build_info lacks revision {revision}"
    );
}

fn healthcheck_is_healthy_and_turns_unhealthy_when_echod_is_frozen() {
    let c = PodmanContainer::start();
    assert!(c.healthy(), "healthy while serving; logs:\n{}", c.logs());
    // A wedged daemon: the kernel still accepts connections, but nothing answers, so
    // the probe's nonce round trip (and /readyz) time out.
    c.kill("SIGSTOP");
    let check = run(podman().args(["healthcheck", "run", &c.name]));
    c.kill("SIGCONT");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // 1 is "unhealthy"; podman itself failing (125 and the like) proves nothing.
    assert_eq!(
        check.status.code(),
        Some(1),
        "a frozen echod must be reported unhealthy: {said}"
    );
    // …and for the probe's reason: its request got no answer in time.
    let health: serde_json::Value =
        serde_json::from_str(&c.inspect("{{json .State.Health}}")).expect("health state JSON");
    let last = health["Log"]
        .as_array()
        .and_then(|log| log.last())
        .unwrap_or_else(|| panic!("no healthcheck log: {health}"));
    let output = last["Output"].as_str().unwrap_or_default();
    assert!(
        last["ExitCode"] == 1
            && output.contains("echod probe: unhealthy:")
            && output.contains("no answer within"),
        "the probe's own verdict: {last}"
    );
    assert!(c.healthy(), "healthy again once it runs again");
}

fn environment_variables_override_the_image_config() {
    let out = run(podman()
        .args(["run", "--rm", "--read-only", "--cap-drop=ALL"])
        .args(["--env", "ECHOD_TCP__MAX_CONNECTIONS=4321"])
        .args(["--env", "ECHOD_SHUTDOWN__DRAIN_TIMEOUT=3s"])
        .arg(image())
        .arg("check-config"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective: toml::Table = stdout.parse().expect("check-config prints TOML");
    assert_eq!(effective["tcp"]["max_connections"].as_integer(), Some(4321));
    assert_eq!(effective["shutdown"]["drain_timeout"].as_str(), Some("3s"));
    // The image's own file still applies to the keys not overridden.
    assert_eq!(
        effective["metrics"]["listen"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(
        effective["metrics"]["listen"][0].as_str(),
        Some("0.0.0.0:9107")
    );
}

/// One client of the stop test: streams `chunks` × 32 KiB at a steady pace, counting
/// each chunk in `sent`; true when every byte came back in order.
fn streaming_client(addr: SocketAddr, seed: u64, chunks: usize, sent: Arc<AtomicUsize>) -> bool {
    let data = random_bytes(chunks * 32 * 1024, seed);
    let count = move |_| {
        sent.fetch_add(1, Ordering::SeqCst);
    };
    paced_roundtrip(addr, &data, 32 * 1024, Duration::from_millis(50), count)
        .is_ok_and(|got| got == data)
}

fn podman_stop_during_traffic_lets_every_client_finish_and_exits_zero() {
    let c = PodmanContainer::start();
    const CLIENTS: usize = 6;
    const CHUNKS: usize = 40; // ≈ 2 s per client, well inside the 8 s drain.
    let sent = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let sent = Arc::clone(&sent);
            let addr = c.tcp;
            std::thread::spawn(move || streaming_client(addr, 100 + i as u64, CHUNKS, sent))
        })
        .collect();
    // Stop once every client is mid-stream.
    wait_until(
        Duration::from_secs(20),
        || "clients did not start streaming",
        || sent.load(Ordering::SeqCst) >= CLIENTS * 5,
    );
    let stop_started = Instant::now();
    let stop = podman()
        .args(["stop", "--time", "30", &c.name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("podman stop");
    let at_stop = sent.load(Ordering::SeqCst);
    assert!(
        at_stop < CLIENTS * CHUNKS,
        "the stop must arrive while clients are still sending"
    );
    let finished: Vec<bool> = clients
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect();
    let mut stop = stop;
    let stop_status = stop.wait().expect("podman stop");
    eprintln!(
        "podman stop took {:?} ({at_stop} of {} chunks sent when it began)",
        stop_started.elapsed(),
        CLIENTS * CHUNKS
    );
    assert!(stop_status.success(), "podman stop failed");
    assert!(
        finished.iter().all(|ok| *ok),
        "every client gets all its bytes back: {finished:?}; logs:\n{}",
        c.logs()
    );
    assert_eq!(
        c.inspect("{{.State.ExitCode}}"),
        "0",
        "echod as PID 1 drains and exits 0; logs:\n{}",
        c.logs()
    );
    // The drain overlapped the traffic: connections were open at the stop, and all of
    // them finished inside the drain timeout.
    let logs = c.logs();
    let drained = drained_without_cuts(&logs)
        .unwrap_or_else(|| panic!("no `shutdown complete drained=N cut=0` line:\n{logs}"));
    assert!(
        (1..=CLIENTS).contains(&drained),
        "{drained} connections drained, {CLIENTS} clients were streaming:\n{logs}"
    );
}

/// N of echod's `shutdown complete drained=N cut=0 …` log line.
fn drained_without_cuts(logs: &str) -> Option<usize> {
    let (_, rest) = logs.split_once("shutdown complete drained=")?;
    let (count, rest) = rest.split_once(' ')?;
    rest.starts_with("cut=0 ").then(|| count.parse().ok())?
}

/// True when `image` names its registry, so no short-name resolution is involved:
/// the first path component is a host (has a `.` or a `:`) or `localhost`, as
/// containers-registries.conf(5) defines it. podman on Debian 12 has no
/// unqualified-search registries and refuses short names like `rust:1-bookworm`.
fn fully_qualified(image: &str) -> bool {
    image.split_once('/').is_some_and(|(first, _)| {
        first == "localhost" || first.contains('.') || first.contains(':')
    })
}

fn every_image_reference_in_deploy_is_fully_qualified() {
    assert!(fully_qualified("docker.io/library/rust:1-bookworm"));
    assert!(fully_qualified("localhost/echod:latest"));
    assert!(fully_qualified("registry.example:5000/echod"));
    for short in ["rust:1-bookworm", "prom/prometheus:v2.53.0", "echod"] {
        assert!(!fully_qualified(short), "{short}");
    }
    let mut checked = Vec::new();
    let mut bad = Vec::new();

    // Dockerfile: every FROM, with build arguments replaced by their defaults; `scratch`
    // (no image at all) and earlier stages are not image references.
    let dockerfile =
        std::fs::read_to_string(crate::support::repo_path("deploy/Dockerfile")).unwrap();
    let mut args = std::collections::HashMap::new();
    let mut stages = Vec::new();
    for line in dockerfile.lines().map(str::trim) {
        if let Some(arg) = line.strip_prefix("ARG ") {
            if let Some((name, default)) = arg.split_once('=') {
                args.insert(format!("${{{name}}}"), default.to_string());
            }
        } else if let Some(from) = line.strip_prefix("FROM ") {
            let mut words = from.split_whitespace().filter(|w| !w.starts_with("--"));
            let image = words.next().expect("FROM names an image");
            let image = args.get(image).cloned().unwrap_or(image.to_string());
            if let (Some(as_), Some(stage)) = (words.next(), words.next()) {
                assert!(as_.eq_ignore_ascii_case("AS"));
                stages.push(stage.to_string());
            }
            if image != "scratch" && !stages.contains(&image) {
                checked.push(format!("Dockerfile: {image}"));
                if !fully_qualified(&image) {
                    bad.push(format!("deploy/Dockerfile: FROM {image}"));
                }
            }
        }
    }
    assert!(
        !checked.is_empty() && args.contains_key("${BUILDER_IMAGE}"),
        "the builder image stays a build argument (the tests substitute a local one)"
    );

    // Compose and Kubernetes: every `image:`. A Kubernetes image is a name the
    // kustomization's `images:` maps to the real one (`newName`).
    let kustomization = crate::support::yaml_file("deploy/kubernetes/kustomization.yaml");
    let renames: std::collections::HashMap<String, String> = kustomization["images"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            let name = i["name"].as_str().unwrap().to_string();
            let new = i["newName"].as_str().unwrap_or(&name).to_string();
            (name, new)
        })
        .collect();
    let mut files = vec![crate::support::repo_path("deploy/compose.yaml")];
    for entry in std::fs::read_dir(crate::support::repo_path("deploy/kubernetes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let kubernetes = path.parent().unwrap().ends_with("kubernetes");
        for line in text.lines() {
            let line = line.trim_start().trim_start_matches("- ");
            let Some(image) = line
                .strip_prefix("image:")
                .or(line.strip_prefix("newName:"))
            else {
                continue;
            };
            let image = image.trim().trim_matches('"').trim_matches('\'');
            let effective = match renames.get(image) {
                Some(new) if kubernetes => new.as_str(),
                _ => image,
            };
            checked.push(format!("{}: {effective}", path.display()));
            if !fully_qualified(effective) {
                bad.push(format!("{}: {line}", path.display()));
            }
        }
    }
    eprintln!("checked:\n  {}", checked.join("\n  "));
    assert!(
        checked.len() >= 5,
        "too few image references found: {checked:?}"
    );
    assert!(
        bad.is_empty(),
        "short image names (podman without unqualified-search registries cannot pull them):\n  {}",
        bad.join("\n  ")
    );
}

/// docs/deploying.md's container block (`runnable:container`) run as written, with
/// podman for `docker` and these swaps: the build is the test's build of the same
/// Dockerfile (local base images, since no registry is reachable), the container gets a
/// name of this run, and each published host port (`7`, `9107`) is one podman picks on
/// 127.0.0.1 — a test never takes a fixed port. `nc` must print `hello` back and `curl`
/// the metrics.
fn documented_container_commands_run_as_written() {
    let block = doc_blocks::runnable("container").replace("\\\n", " ");
    let lines: Vec<&str> = block
        .lines()
        .map(|l| l.split(" #").next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .collect();
    let [build, run_line, nc, curl] = lines[..] else {
        panic!("runnable:container is build, run, nc, curl: {lines:?}");
    };
    let build: Vec<&str> = build.split_whitespace().collect();
    assert_eq!(
        build,
        [
            "docker",
            "build",
            "-f",
            "deploy/Dockerfile",
            "-t",
            "echod",
            "."
        ],
        "the documented build is no longer the one image() makes"
    );
    let image = image();
    let name = format!("{NAME_PREFIX}{}-docs", std::process::id());
    let words: Vec<&str> = run_line.split_whitespace().collect();
    assert_eq!(words[..2], ["docker", "run"], "{run_line}");
    assert_eq!(words.last(), Some(&"echod"), "{run_line}");
    let mut args: Vec<String> = Vec::new();
    let mut published = Vec::new();
    let mut rest = words[2..words.len() - 1].iter();
    while let Some(&word) = rest.next() {
        match word {
            "--name" => {
                rest.next();
                args.extend(["--name".to_string(), name.clone()]);
            }
            "-p" => {
                let spec = rest.next().expect("-p HOST:CONTAINER");
                let (_, container) = spec.rsplit_once(':').expect("-p HOST:CONTAINER");
                published.push((spec.to_string(), container.to_string()));
                args.push(format!("--publish=127.0.0.1::{container}"));
            }
            other => args.push(other.to_string()),
        }
    }
    assert_eq!(published.len(), 3, "{run_line}");
    let out = run(podman().arg("run").args(&args).arg(image));
    let c = PodmanContainer::started(name, &out, &format!("podman run {args:?}"));
    // The documented host ports, for the ones podman picked.
    let documented_port = |container: &str| -> String {
        let (spec, _) = published
            .iter()
            .find(|(_, c)| c == container)
            .unwrap_or_else(|| panic!("{container} is not published: {published:?}"));
        let host = spec.rsplit_once(':').expect("HOST:CONTAINER").0;
        host.rsplit(':').next().unwrap_or(host).to_string()
    };
    assert_eq!(documented_port("7007/tcp"), "7");
    assert_eq!(documented_port("7007/udp"), "7");
    let sh = |command: &str| -> String {
        let out = run(Command::new("sh").args(["-c", command]));
        assert!(out.status.success(), "`{command}` failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let nc = nc.replace("127.0.0.1 7", &format!("127.0.0.1 {}", c.tcp.port()));
    assert_eq!(sh(&nc), "hello\n", "`{nc}`");
    let curl = curl.replace(
        &format!("127.0.0.1:{}", documented_port("9107")),
        &c.http.to_string(),
    );
    assert!(sh(&curl).contains("echod_build_info{"), "`{curl}`");
}
