//! The Debian package under a real systemd: systemd boots as PID 1 in a container
//! (systemd-nspawn, sharing the host's network), the .deb built by cargo-deb is
//! installed with dpkg, and the host talks to the packaged service on port 7 while the
//! test drives it with systemctl — start, reload, broken reload, stop during traffic,
//! watchdog restart, socket activation, purge. One boot, one test, sequential steps.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{
    self, Chatter, IPV6_LOOPBACK, Need, metric_at, output_with_input, random_bytes,
    refused_after_accept, repo_path, tcp_roundtrip, udp_echo, wait_for,
};

crate::support::tests![
    packaged_service_under_real_systemd needs NEEDS,
];

pub(crate) const ECHO: &str = "127.0.0.1:7";
pub(crate) const METRICS: &str = "127.0.0.1:9107";

pub(crate) fn echo_addr() -> SocketAddr {
    ECHO.parse().unwrap()
}

/// systemd booted in a container; powered off (and killed if it will not stop) on drop.
pub(crate) struct Nspawn {
    nspawn: Child,
    leader: i32,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Nspawn {
    /// Boots `rootfs` (kept pristine by an overlay) with `pkg_dir` mounted at /mnt/pkg.
    pub(crate) fn boot(rootfs: &Path, pkg_dir: &Path) -> Nspawn {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("nspawn.log");
        let out = std::fs::File::create(&log).unwrap();
        let nspawn = Command::new("systemd-nspawn")
            .args(["--register=no", "--keep-unit", "-b", "--console=passive"])
            .arg("-D")
            .arg(rootfs)
            .arg("--volatile=overlay")
            .arg(format!("--bind-ro={}:/mnt/pkg", pkg_dir.display()))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start systemd-nspawn");
        let mut container = Nspawn {
            leader: 0,
            nspawn,
            log,
            _dir: dir,
        };
        let pid = container.nspawn.id();
        // nspawn's first child is a short-lived helper; the container's PID 1 is the
        // child that has exec'd systemd.
        container.leader = wait_for(
            Duration::from_secs(30),
            || "the container's PID 1",
            || {
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                    .ok()?
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                    .find(|p| {
                        std::fs::read_to_string(format!("/proc/{p}/comm"))
                            .is_ok_and(|comm| comm.trim() == "systemd")
                    })
            },
        );
        wait_for(
            Duration::from_secs(60),
            || "systemd's private socket",
            || {
                container
                    .run(&["test", "-S", "/run/systemd/private"])
                    .status
                    .success()
                    .then_some(())
            },
        );
        let state = container.run(&["systemctl", "is-system-running", "--wait"]);
        let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
        assert!(
            state == "running" || state == "degraded",
            "system state {state}; {}",
            container.sh("systemctl --failed --no-pager").1
        );
        container
    }

    /// A command inside every namespace of the container, with a clean environment.
    pub(crate) fn nsenter(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.leader.to_string())
            .arg("-a")
            .args([
                "env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "SYSTEMD_PAGER=",
            ])
            .args(args);
        cmd
    }

    /// Runs a command inside (see [`Nspawn::nsenter`]).
    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.nsenter(args)
            .stdin(Stdio::null())
            .output()
            .expect("nsenter")
    }

    /// A shell command inside; returns (success, stdout + stderr).
    pub(crate) fn sh(&self, script: &str) -> (bool, String) {
        let out = self.run(&["sh", "-c", script]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// A shell command that must succeed; returns its stdout.
    pub(crate) fn ok(&self, script: &str) -> String {
        let out = self.run(&["sh", "-c", script]);
        assert!(
            out.status.success(),
            "`{script}` failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `systemctl show -p …` as a map.
    pub(crate) fn show(
        &self,
        unit: &str,
        props: &str,
    ) -> std::collections::HashMap<String, String> {
        self.ok(&format!("systemctl show {unit} -p {props}"))
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub(crate) fn prop(&self, unit: &str, prop: &str) -> String {
        self.show(unit, prop).remove(prop).unwrap_or_default()
    }

    pub(crate) fn write_file(&self, path: &str, text: &str) {
        let mut cat = self.nsenter(&["sh", "-c", &format!("cat > {path}")]);
        let out = output_with_input(&mut cat, text.as_bytes());
        assert!(out.status.success(), "cannot write {path}");
    }
}

impl Drop for Nspawn {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- journal of echod ---\n{}",
                self.sh("journalctl -u echod -u echod.socket --no-pager | tail -n 60")
                    .1
            );
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "--- nspawn log (tail) ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        // SIGTERM to nspawn powers the container off cleanly; SIGKILL its PID 1 (which
        // ends the whole PID namespace) and nspawn if that takes too long.
        // SAFETY: kill(2) on processes this test started.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let powered_off = crate::support::poll(Duration::from_secs(20), || {
            self.nspawn.try_wait().ok().flatten()
        });
        if powered_off.is_some() {
            return;
        }
        if self.leader > 0 {
            // SAFETY: as above.
            unsafe { libc::kill(self.leader, libc::SIGKILL) };
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// Waits (10 s at most) until echod.service is active. Started by its socket, echod
/// answers the first client before systemd has processed its READY=1, so the service can
/// still be "activating" at that moment.
fn wait_service_active(c: &Nspawn) {
    wait_for(
        Duration::from_secs(10),
        || "echod.service to be active",
        || (c.sh("systemctl is-active echod.service").1.trim() == "active").then_some(()),
    );
}

/// The packaged service's metrics endpoint.
pub(crate) fn metrics_addr() -> SocketAddr {
    METRICS.parse().unwrap()
}

pub(crate) fn wait_metric(family: &str, want: f64) {
    wait_for(
        Duration::from_secs(20),
        || format!("{family} = {want}"),
        || (metric_at(metrics_addr(), family, &[])? == want).then_some(()),
    );
}

fn tcp_echoes() -> bool {
    let data = random_bytes(64 * 1024, 11);
    TcpStream::connect(echo_addr()).is_ok() && tcp_roundtrip(echo_addr(), &data, 12) == data
}

/// Builds the .deb with cargo-deb from the binary `cargo test` just built (the dev
/// profile: a release build would add minutes and changes nothing systemd sees).
pub(crate) fn build_deb(out_dir: &Path) -> PathBuf {
    let bin = support::echod_bin();
    let target_dir = bin.parent().and_then(Path::parent).expect("target dir");
    cargo_deb(target_dir, out_dir, &[]);
    let deb = std::fs::read_dir(out_dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb was built");
    std::fs::rename(&deb, out_dir.join("echod.deb")).unwrap();
    out_dir.join("echod.deb")
}

/// Runs cargo-deb on the dev-profile binary under `target_dir` (no build), writing the
/// package into `out_dir`; `extra` adds flags such as `--deb-version`.
pub(crate) fn cargo_deb(target_dir: &Path, out_dir: &Path, extra: &[&str]) {
    let out = Command::new(env!("CARGO"))
        .args(["deb", "--no-build", "--profile", "dev", "--fast", "--quiet"])
        .args(extra)
        .arg("-o")
        .arg(out_dir)
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(repo_path(""))
        .output()
        .expect("run cargo deb");
    assert!(
        out.status.success(),
        "cargo deb failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cached rootfs (built by .ci/setup.d/systemd.sh, or now if missing).
pub(crate) fn rootfs() -> PathBuf {
    let script = repo_path("tests/deployment/systemd-rootfs.sh");
    let out = Command::new("bash")
        .arg(script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run rootfs.sh");
    assert!(out.status.success(), "cannot build the nspawn rootfs");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Root, to boot a container.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// systemd-nspawn, debootstrap (its root filesystem), cargo-deb (the package), root, and
/// an IPv6 loopback for the IPv6 echo on port 7.
pub(crate) const NEEDS: &[Need] = &[
    Need::Tool("systemd-nspawn"),
    Need::Tool("debootstrap"),
    Need::Tool("cargo-deb"),
    Need::Host("root (to boot systemd in a container)", is_root),
    IPV6_LOOPBACK,
];

fn packaged_service_under_real_systemd() {
    let _port_7 = crate::upgrade::port_7();
    let started = Instant::now();
    // The packaged config serves port 7 on every interface of the shared network.
    assert!(
        TcpStream::connect(ECHO).is_err() && UdpSocket::bind("0.0.0.0:7").is_ok(),
        "port 7 is already in use on this machine"
    );
    assert!(
        TcpStream::connect(METRICS).is_err(),
        "port 9107 is already in use"
    );
    let pkg = tempfile::tempdir().unwrap();
    build_deb(pkg.path());
    let rootfs = rootfs();
    let built = started.elapsed();
    let c = Nspawn::boot(&rootfs, pkg.path());
    let booted = started.elapsed();

    // Install: the service is enabled and started, the socket unit only shipped.
    c.ok("dpkg -i /mnt/pkg/echod.deb");
    assert_eq!(c.ok("systemctl is-active echod").trim(), "active");
    assert_eq!(
        c.sh("systemctl is-enabled echod.service").1.trim(),
        "enabled"
    );
    assert_eq!(
        c.sh("systemctl is-enabled echod.socket").1.trim(),
        "disabled"
    );
    assert_eq!(
        c.sh("systemctl is-active echod.socket").1.trim(),
        "inactive"
    );
    let show = c.show("echod", "Type,NRestarts,Result,WatchdogUSec,MainPID");
    assert_eq!(show["Type"], "notify");
    assert_eq!(show["NRestarts"], "0");
    assert_eq!(show["WatchdogUSec"], "30s");
    // DynamicUser: not root.
    let user = c.ok(&format!("ps -o user= -p {}", show["MainPID"]));
    assert_ne!(user.trim(), "root");
    assert!(
        c.ok("test -f /usr/share/man/man1/echod.1.gz && cat /usr/share/doc/echod/copyright")
            .contains("Copyright")
    );
    assert_eq!(
        c.ok("dpkg-query -W -f='${Conffiles}' echod")
            .split_whitespace()
            .next(),
        Some("/etc/echod/echod.toml")
    );
    // Port 7 from the host, TCP and UDP, IPv4 and IPv6.
    assert!(tcp_echoes(), "TCP echo on port 7");
    assert_eq!(
        udp_echo(echo_addr(), b"udp on port 7", Duration::from_secs(5)).as_deref(),
        Some(&b"udp on port 7"[..])
    );
    let data = random_bytes(10_000, 3);
    assert!(tcp_roundtrip("[::1]:7".parse().unwrap(), &data, 4) == data);
    let status = c.ok("systemctl status echod --no-pager");
    assert!(
        status.contains("TCP 0.0.0.0:7,[::]:7 UDP 0.0.0.0:7,[::]:7"),
        "{status}"
    );
    // The sandbox hides nothing echod needs: no warning at start, process metrics work.
    let journal = c.ok("journalctl -u echod --no-pager");
    assert!(
        !journal.contains(" WARN ") && !journal.contains(" ERROR "),
        "{journal}"
    );
    assert!(metric_at(metrics_addr(), "process_start_time_seconds", &[]).is_some_and(|t| t > 1e9));
    assert!(metric_at(metrics_addr(), "process_open_fds", &[]).is_some_and(|n| n > 0.0));
    documented_exposure_is_the_installed_services(&c);

    // Reload while a client keeps echoing; a lowered per-source limit takes effect.
    let packaged = c.ok("cat /etc/echod/echod.toml");
    let chatter = Chatter::start(echo_addr());
    let second = TcpStream::connect(ECHO).unwrap();
    wait_metric("echod_tcp_connections_active", 2.0);
    c.write_file(
        "/etc/echod/echod.toml",
        &packaged.replacen("[tcp]\n", "[tcp]\nmax_connections_per_ip = 2\n", 1),
    );
    c.ok("systemctl reload echod");
    wait_metric("echod_config_reloads_total", 1.0);
    chatter.still_echoing();
    assert!(
        refused_after_accept(echo_addr()),
        "per-source limit 2 not applied by reload"
    );
    drop(second);
    assert_eq!(c.prop("echod", "SubState"), "running");

    // A broken config: refused, the old one serves, and `systemctl status` says why.
    c.write_file(
        "/etc/echod/echod.toml",
        "[tcp]\nmax_connections = \"many\"\n",
    );
    broken_reload_fails_and_the_old_config_serves(&c, &chatter);
    c.ok("systemctl kill -s HUP --kill-who=main echod");
    wait_metric("echod_config_reload_failures_total", 1.0);
    chatter.still_echoing();
    let status = c.ok("systemctl status echod --no-pager");
    assert!(
        status.contains("last reload FAILED") && status.contains("max_connections"),
        "{status}"
    );
    // The journal stores echod's own refusal at priority err, as one entry.
    let errors = c.ok("journalctl -u echod -p err --no-pager -o cat");
    let refusals: Vec<&str> = errors
        .lines()
        .filter(|l| l.contains("reload failed; keeping the previous configuration"))
        .collect();
    assert_eq!(refusals.len(), 1, "journalctl -p err:\n{errors}");
    assert!(refusals[0].contains("max_connections"), "{}", refusals[0]);
    let info = c.ok("journalctl -u echod -p info --no-pager -o cat");
    assert!(
        !errors.contains("echod ready") && info.contains("echod ready"),
        "readiness is logged at info, not err:\n{errors}"
    );
    assert_eq!(c.prop("echod", "ActiveState"), "active");
    c.write_file("/etc/echod/echod.toml", &packaged);
    c.ok("systemctl reload echod");
    wait_metric("echod_config_reloads_total", 2.0);
    chatter.still_echoing();
    assert!(chatter.finish() > 0);

    // Stop during traffic: every client gets every byte back; Result=success.
    let clients: Vec<_> = (0..4u64)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(ECHO).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut sent = Vec::new();
                let mut got = Vec::new();
                for round in 0..40u64 {
                    let chunk = random_bytes(16 * 1024, i * 1000 + round);
                    s.write_all(&chunk).expect("write during drain");
                    let mut back = vec![0u8; chunk.len()];
                    s.read_exact(&mut back).expect("echo during drain");
                    sent.extend_from_slice(&chunk);
                    got.extend_from_slice(&back);
                    std::thread::sleep(Duration::from_millis(25));
                }
                s.shutdown(std::net::Shutdown::Write).unwrap();
                s.read_to_end(&mut got).unwrap();
                assert!(
                    got == sent,
                    "client {i}: {} of {} bytes",
                    got.len(),
                    sent.len()
                );
            })
        })
        .collect();
    wait_metric("echod_tcp_connections_active", 4.0);
    let stop_started = Instant::now();
    c.ok("systemctl stop echod");
    let stop_took = stop_started.elapsed();
    for client in clients {
        client.join().expect("client got all its bytes back");
    }
    let show = c.show("echod", "Result,ActiveState");
    assert_eq!(
        (show["Result"].as_str(), show["ActiveState"].as_str()),
        ("success", "inactive")
    );
    assert!(
        stop_took < Duration::from_secs(45),
        "stop took {stop_took:?}"
    );
    assert!(
        c.ok("journalctl -u echod --no-pager")
            .contains("drained=4 cut=0")
    );

    // Watchdog: a frozen echod is killed and restarted by systemd.
    c.ok("mkdir -p /etc/systemd/system/echod.service.d && \
          printf '[Service]\\nWatchdogSec=2s\\n' > /etc/systemd/system/echod.service.d/watchdog.conf && \
          systemctl daemon-reload && systemctl start echod");
    let before = c.show("echod", "MainPID,NRestarts");
    assert_eq!(before["NRestarts"], "0");
    let frozen_at = Instant::now();
    c.ok(&format!("kill -STOP {}", before["MainPID"]));
    wait_for(
        Duration::from_secs(30),
        || "a watchdog restart",
        || {
            let now = c.show("echod", "MainPID,NRestarts,ActiveState");
            (now["NRestarts"] == "1"
                && now["ActiveState"] == "active"
                && now["MainPID"] != before["MainPID"])
                .then_some(())
        },
    );
    let watchdog_took = frozen_at.elapsed();
    assert!(
        c.ok("journalctl -u echod --no-pager")
            .contains("Watchdog timeout")
    );
    assert!(tcp_echoes(), "echo after the watchdog restart");
    c.ok("rm -r /etc/systemd/system/echod.service.d && systemctl daemon-reload && systemctl stop echod");

    // Socket activation: only echod.socket runs; the first connection starts echod.
    c.ok("systemctl start echod.socket");
    assert_eq!(
        c.sh("systemctl is-active echod.service").1.trim(),
        "inactive"
    );
    assert!(tcp_echoes(), "TCP echo through socket activation");
    wait_service_active(&c);
    c.ok("systemctl stop echod.service");
    assert_eq!(
        c.sh("systemctl is-active echod.service").1.trim(),
        "inactive"
    );
    assert_eq!(
        udp_echo(echo_addr(), b"first datagram", Duration::from_secs(15)).as_deref(),
        Some(&b"first datagram"[..]),
        "UDP echo through socket activation"
    );
    wait_service_active(&c);
    let journal = c.ok("journalctl -u echod --no-pager");
    assert!(
        journal.contains("using socket passed by systemd name=echo proto=\"UDP\""),
        "{journal}"
    );
    c.ok("systemctl stop echod.socket echod.service");

    // Purge: nothing left behind, nothing listening.
    c.ok("systemctl start echod");
    c.ok("dpkg --purge echod");
    let (_, leftovers) = c.sh(
        "ls -d /usr/bin/echod /etc/echod /usr/lib/systemd/system/echod.* 2>/dev/null; \
         find /etc/systemd /var/lib/systemd/deb-systemd-helper-enabled -name 'echod*'",
    );
    assert!(leftovers.trim().is_empty(), "left behind: {leftovers}");
    assert_eq!(c.sh("systemctl is-active echod").1.trim(), "inactive");
    assert!(
        TcpStream::connect(ECHO).is_err(),
        "port 7 still served after purge"
    );

    drop(c);
    eprintln!(
        "systemd e2e: deb+rootfs {built:?}, boot {:?}, stop {stop_took:?}, watchdog restart {watchdog_took:?}, total {:?}",
        booted - built,
        started.elapsed()
    );
}

/// `systemctl reload` with a broken config: ExecReload's check fails, so the reload
/// fails (non-zero exit, the reason in the journal) and echod is never signalled — it
/// keeps serving the previous config (the per-source limit of 2 still holds).
fn broken_reload_fails_and_the_old_config_serves(c: &Nspawn, chatter: &Chatter) {
    let (reloaded, output) = c.sh("systemctl reload echod");
    assert!(
        !reloaded,
        "systemctl reload reported success for a broken config:\n{output}"
    );
    assert!(output.contains("echod.service"), "{output}");
    assert_eq!(c.prop("echod", "ActiveState"), "active");
    assert_eq!(c.prop("echod", "SubState"), "running");
    chatter.still_echoing();
    let second = TcpStream::connect(ECHO).unwrap();
    wait_metric("echod_tcp_connections_active", 2.0);
    assert!(
        refused_after_accept(echo_addr()),
        "the previous config (per-source limit 2) no longer applies"
    );
    drop(second);
    assert_eq!(
        metric_at(metrics_addr(), "echod_config_reloads_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        metric_at(metrics_addr(), "echod_config_reload_failures_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        metric_at(metrics_addr(), "echod_config_last_reload_successful", &[]),
        Some(1.0)
    );
    let journal = c.ok("journalctl -u echod --no-pager");
    assert!(
        journal.contains("invalid config file /etc/echod/echod.toml")
            && journal.contains("max_connections"),
        "the journal does not say why the reload failed:\n{journal}"
    );
    // check-config's stdout (the whole effective config) stays out of the journal.
    assert!(!journal.contains("[udp.rate_limit]"), "{journal}");
}

/// The service guide's hardening figure for the installed service is what
/// `systemd-analyze security echod` says about it under systemd.
fn documented_exposure_is_the_installed_services(c: &Nspawn) {
    let report = c.ok("systemd-analyze security echod --no-pager");
    let measured = report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for echod.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no overall exposure:\n{report}"));
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/systemd.md"))
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let claim = "`systemd-analyze security echod` rates the installed service ";
    let stated = guide
        .split_once(claim)
        .unwrap_or_else(|| panic!("docs/systemd.md no longer says `{claim}…`"))
        .1
        .split([' ', ',', ';'])
        .next()
        .unwrap();
    assert_eq!(
        stated, measured,
        "docs/systemd.md states exposure {stated}; systemd-analyze security echod measures {measured}"
    );
}
