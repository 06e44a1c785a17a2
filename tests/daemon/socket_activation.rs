//! Socket activation as systemd does it: echod serves on the sockets it inherits
//! (`LISTEN_FDS`), by type — stream → TCP echo (or HTTP when named `metrics`),
//! datagram → UDP echo — and binds none of the config's echo addresses.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::time::Duration;

use crate::support::{
    ChildGuard, Need, echod_bin, http_get, listening_tcp, random_bytes, refusing, spawn_activated,
    tcp_roundtrip, udp_echo, wait_for, wait_until,
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
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    // It binds port 0; the port it got is read from its own listening socket.
    let child = std::process::Command::new("systemd-socket-activate")
        .arg("--listen=127.0.0.1:0")
        .arg("--fdname=echo")
        .arg(echod_bin())
        .arg("--config")
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start systemd-socket-activate");
    let pid = child.id();
    let _guard = ChildGuard(child);
    let addr: SocketAddr = wait_for(
        Duration::from_secs(10),
        || "systemd-socket-activate never listened",
        || listening_tcp(pid).first().copied(),
    );
    let data = random_bytes(50_000, 8);
    assert!(tcp_roundtrip(addr, &data, 9) == data);
    let text = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert!(text.contains("using socket passed by systemd"), "{text}");
}
