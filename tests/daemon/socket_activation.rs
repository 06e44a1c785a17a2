//! Socket activation as systemd does it: echod serves on the sockets it inherits
//! (`LISTEN_FDS`), by type — stream → TCP echo (or HTTP when named `metrics`),
//! datagram → UDP echo — and binds none of the config's echo addresses.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use crate::support::{
    ChildGuard, Need, echod_bin, http_get, listening_tcp, poll, random_bytes, refusing,
    spawn_activated, tcp_roundtrip, udp_echo, wait_for, wait_until,
};

crate::support::tests![
    inherited_tcp_udp_and_metrics_sockets_serve,
    a_unix_socket_passed_in_is_refused_with_a_clear_error,
    systemd_socket_activate_starts_echod_on_first_connection needs &[Need::Tool("systemd-socket-activate")],
];

/// A socket-activated echod, killed (by PID) when dropped.
struct Activated {
    child: ChildGuard,
    dir: tempfile::TempDir,
}

impl Activated {
    fn start(config: &str, fds: Vec<(OwnedFd, &str)>) -> Activated {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("echod.toml");
        std::fs::write(&config_path, config).unwrap();
        let config_arg = config_path.display().to_string();
        let child = spawn_activated(
            &echod_bin(),
            &["--config", &config_arg],
            fds,
            &dir.path().join("echod.log"),
        );
        Activated { child, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("echod.log")).unwrap_or_default()
    }

    fn wait_log(&mut self, needle: &str) {
        let log = self.dir.path().join("echod.log");
        let child = &mut self.child.0;
        wait_until(
            Duration::from_secs(10),
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                format!("no {needle:?} in log:\n{text}")
            },
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("echod exited ({status}); log:\n{text}");
                }
                text.contains(needle)
            },
        );
    }
}

fn inherited_tcp_udp_and_metrics_sockets_serve() {
    let metrics = TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_addr = metrics.local_addr().unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_addr = udp.local_addr().unwrap();
    // The config names another address, held (bound, not listening) by the test: under
    // activation echod must not bind it.
    let unused = refusing();
    let config = format!(
        "[tcp]\nlisten = [\"{u}\"]\n[udp]\nlisten = [\"{u}\"]\n[metrics]\nlisten = [\"{u}\"]\n",
        u = unused.addr
    );
    let mut daemon = Activated::start(
        &config,
        vec![
            (tcp.into(), "echo"),
            (udp.into(), "echo"),
            (metrics.into(), "metrics"),
        ],
    );
    daemon.wait_log("echod ready");

    let data = random_bytes(300_000, 5);
    assert!(
        tcp_roundtrip(tcp_addr, &data, 6) == data,
        "TCP echo on the inherited socket"
    );
    assert_eq!(
        udp_echo(udp_addr, b"activated datagram", Duration::from_secs(5)).as_deref(),
        Some(&b"activated datagram"[..]),
        "UDP echo on the inherited socket"
    );
    let (status, body) = http_get(metrics_addr, "/metrics").expect("inherited metrics socket");
    assert_eq!(status, 200);
    assert!(body.contains("echod_tcp_connections_accepted_total"));
    assert!(
        TcpStream::connect(unused.addr).is_err(),
        "echod bound the config's address although systemd passed sockets"
    );
    let log = daemon.log();
    assert_eq!(
        log.matches("using socket passed by systemd").count(),
        3,
        "{log}"
    );
}

fn a_unix_socket_passed_in_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let unix = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
    let mut daemon = Activated::start("", vec![(unix.into(), "echo")]);
    let child = &mut daemon.child.0;
    let status = wait_for(
        Duration::from_secs(10),
        || "echod kept running",
        || child.try_wait().unwrap(),
    );
    assert!(!status.success());
    let log = daemon.log();
    assert!(
        log.contains("LISTEN_FDS") && log.contains("not an IP socket"),
        "{log}"
    );
}

fn systemd_socket_activate_starts_echod_on_first_connection() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("echod.toml");
    std::fs::write(&config, "[metrics]\nlisten = [\"127.0.0.1:0\"]\n").unwrap();
    let log_path = dir.path().join("log");
    let (_guard, addr) = socket_activate(&config, &log_path);
    let data = random_bytes(50_000, 8);
    assert!(tcp_roundtrip(addr, &data, 9) == data);
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(text.contains("using socket passed by systemd"), "{text}");
}

/// Starts `systemd-socket-activate` for echod with `config` on a loopback TCP port and
/// returns it once it listens, with its address. It cannot take port 0 (it refuses to
/// parse it) nor a socket of ours, so the port is one the kernel just gave a socket of
/// ours, closed right before: another process taking it in that moment makes
/// `systemd-socket-activate` fail to bind and exit, and the start is retried on a fresh
/// port; once it listens (its own socket, read from /proc), the port is surely its.
fn socket_activate(config: &Path, log: &Path) -> (ChildGuard, SocketAddr) {
    for _ in 0..5 {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0");
        let out = std::fs::File::create(log).unwrap();
        let child = std::process::Command::new("systemd-socket-activate")
            .arg(format!("--listen={addr}"))
            .arg("--fdname=echo")
            .arg(echod_bin())
            .arg("--config")
            .arg(config)
            .env_remove("NOTIFY_SOCKET")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start systemd-socket-activate");
        let pid = child.id();
        let mut guard = ChildGuard(child);
        let listening = poll(Duration::from_secs(10), || {
            if listening_tcp(pid).contains(&addr) {
                return Some(true);
            }
            guard.0.try_wait().ok().flatten().map(|_| false)
        });
        match listening {
            Some(true) => return (guard, addr),
            Some(false) => continue,
            None => panic!(
                "systemd-socket-activate never listened on {addr}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            ),
        }
    }
    panic!(
        "systemd-socket-activate could not bind 5 times:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}
