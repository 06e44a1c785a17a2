//! `echod probe` as a health checker sees it: exit 0 only when the echo path really
//! works, exit 1 with a one-line reason otherwise — quickly, and never later than the
//! timeout.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use crate::support::{Daemon, Run, refusing, run_echod, tcp_server};

const LIMIT: Duration = Duration::from_secs(30);

fn probe(args: &[&str]) -> Run {
    let mut all = vec!["probe"];
    all.extend_from_slice(args);
    run_echod(&all, b"", LIMIT)
}

/// `echod probe --config FILE` without targets, FILE holding `toml`; it must pass.
fn probe_with_config(toml: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("echod.toml");
    std::fs::write(&config, toml).unwrap();
    let run = probe(&["--config", config.to_str().unwrap()]);
    assert_eq!(run.code(), 0, "stderr: {}", run.stderr);
    run
}

fn assert_unhealthy(run: &Run, reason: &str) {
    assert_eq!(run.code(), 1, "expected unhealthy; stderr: {}", run.stderr);
    assert_eq!(
        run.stderr.trim_end().lines().count(),
        1,
        "one-line reason expected: {:?}",
        run.stderr
    );
    assert!(
        run.stderr.contains(reason),
        "reason should mention {reason:?}: {:?}",
        run.stderr
    );
}

#[test]
fn healthy_daemon_passes_tcp_udp_and_http_probes() {
    let daemon = Daemon::start("");
    let tcp = daemon.tcp.to_string();
    let udp = daemon.udp.to_string();
    let url = format!("http://{}/readyz", daemon.http);
    let run = probe(&["--tcp", &tcp, "--udp", &udp, "--http", &url]);
    assert_eq!(run.code(), 0, "stderr: {}", run.stderr);
    let out = run.stdout_text();
    assert!(out.starts_with("ok "), "{out}");
    assert!(
        out.contains(&tcp) && out.contains(&url),
        "names what it checked: {out}"
    );
    // The probe really went through the echo path.
    assert!(daemon.metric("echod_tcp_connections_accepted_total", &[]) >= 1.0);
    daemon.wait_metric_at_least("echod_udp_sent_datagrams_total", &[], 1.0);
}

#[test]
fn without_targets_it_probes_the_configured_daemon() {
    let daemon = Daemon::start("");
    // The daemon's own file names port 0; the probe reads one naming the ports it got.
    let run = probe_with_config(&format!(
        "[tcp]\nlisten = [\"{}\"]\n[udp]\nlisten = [\"{}\"]\n[metrics]\nlisten = [\"{}\"]\n\
             [log]\nlevel = \"warn\"\n",
        daemon.tcp, daemon.udp, daemon.http
    ));
    let out = run.stdout_text();
    assert!(
        out.contains(&format!("http://{}/readyz", daemon.http)),
        "{out}"
    );
    assert!(out.contains(&format!("tcp {}", daemon.tcp)), "{out}");
    assert!(daemon.metric("echod_tcp_connections_accepted_total", &[]) >= 1.0);
}

#[test]
fn without_targets_wildcard_listeners_are_probed_on_loopback() {
    // The daemon listens on loopback; the probe reads a config naming the same ports
    // as wildcards (as in a container) and must reach them on loopback.
    let daemon = Daemon::start("");
    let run = probe_with_config(&format!(
        "[tcp]\nlisten = [\"0.0.0.0:{}\"]\n[metrics]\nlisten = [\"0.0.0.0:{}\"]\n",
        daemon.tcp.port(),
        daemon.http.port()
    ));
    let out = run.stdout_text();
    assert!(
        out.contains(&format!("tcp 127.0.0.1:{}", daemon.tcp.port())),
        "{out}"
    );
    assert!(
        out.contains(&format!("http://127.0.0.1:{}/readyz", daemon.http.port())),
        "{out}"
    );
}

/// docs/tools.md: without targets and with TCP off, the probe checks the first UDP
/// listener instead.
#[test]
fn without_targets_and_tcp_off_it_probes_the_first_udp_listener() {
    let daemon = Daemon::start("");
    let run = probe_with_config(&format!(
        "[tcp]\nlisten = []\n[udp]\nlisten = [\"{}\"]\n[metrics]\nlisten = [\"{}\"]\n",
        daemon.udp, daemon.http
    ));
    let out = run.stdout_text();
    assert!(out.contains(&format!("udp {}", daemon.udp)), "{out}");
    assert!(!out.contains("tcp "), "{out}");
    daemon.wait_metric_at_least("echod_udp_sent_datagrams_total", &[], 1.0);
}

#[test]
fn a_server_answering_something_else_is_unhealthy() {
    let addr = tcp_server(|mut s| {
        let mut buf = [0u8; 256];
        if let Ok(n) = s.read(&mut buf) {
            // Same length, different bytes: only a real comparison catches it.
            let reply: Vec<u8> = buf[..n].iter().map(|b| b.wrapping_add(1)).collect();
            let _ = s.write_all(&reply);
        }
    });
    let run = probe(&["--tcp", &addr.to_string()]);
    assert_unhealthy(&run, "wrong reply");
}

#[test]
fn refused_connection_is_unhealthy() {
    let closed = refusing();
    let run = probe(&["--tcp", &closed.addr.to_string()]);
    assert_unhealthy(&run, "refused");
    let run = probe(&["--http", &format!("http://{}/readyz", closed.addr)]);
    assert_unhealthy(&run, "refused");
}

#[test]
fn a_silent_server_is_unhealthy_within_the_timeout() {
    let addr = tcp_server(|mut s| {
        // Accept, read, never answer; hold the connection until the client goes.
        let mut buf = [0u8; 256];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    });
    let run = probe(&["--tcp", &addr.to_string(), "--timeout", "500ms"]);
    assert_unhealthy(&run, "no answer within 500ms");
    assert!(
        run.elapsed >= Duration::from_millis(450),
        "gave up early: {:?}",
        run.elapsed
    );
    assert!(
        run.elapsed < Duration::from_secs(5),
        "took far longer than its timeout: {:?}",
        run.elapsed
    );
}

#[test]
fn udp_without_an_echo_is_unhealthy_after_retries() {
    // A bound socket that never answers: the probe retries, then gives up in time.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let run = probe(&["--udp", &addr, "--timeout", "600ms"]);
    assert_unhealthy(&run, "no answer within 600ms");
    assert!(run.elapsed < Duration::from_secs(5), "{:?}", run.elapsed);
    let mut buf = [0u8; 128];
    silent
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut received = 0;
    while silent.recv(&mut buf).is_ok() {
        received += 1;
    }
    assert!(
        received >= 2,
        "expected retries, saw {received} datagram(s)"
    );
}

#[test]
fn http_503_is_unhealthy() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\nConnection: close\r\n\r\ndraining\n",
            );
        }
    });
    let run = probe(&["--http", &format!("http://{addr}/readyz")]);
    assert_unhealthy(&run, "HTTP status 503");
}

#[test]
fn one_failing_target_among_healthy_ones_fails_the_probe() {
    let daemon = Daemon::start("");
    let closed = refusing();
    let dead = closed.addr.to_string();
    let run = probe(&["--tcp", &daemon.tcp.to_string(), "--tcp", &dead]);
    assert_unhealthy(&run, &dead);
}

#[test]
fn a_healthy_probe_takes_milliseconds() {
    let daemon = Daemon::start("");
    let run = probe(&[
        "--tcp",
        &daemon.tcp.to_string(),
        "--http",
        &format!("http://{}/readyz", daemon.http),
    ]);
    assert_eq!(run.code(), 0, "stderr: {}", run.stderr);
    // Process start included; generous for a loaded 2-core CI machine.
    assert!(run.elapsed < Duration::from_secs(2), "{:?}", run.elapsed);
}

#[test]
fn a_server_that_hangs_up_is_unhealthy() {
    let addr = tcp_server(|mut s| {
        // Read the whole nonce line (so the close is a clean FIN, not a reset), then
        // drop the stream without an answer.
        let mut buf = [0u8; 256];
        let mut seen = Vec::new();
        while !seen.contains(&b'\n') {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    });
    let run = probe(&["--tcp", &addr.to_string()]);
    assert_unhealthy(&run, "connection closed after 0 of");
}
