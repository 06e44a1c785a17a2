//! The tools over TLS (`tls://HOST:PORT`), against echod's own TLS listener: `client`
//! byte-exact for sizes around a record and far beyond, `probe` healthy only when the
//! server's certificate verifies (and, for a mutual-TLS server, with a client
//! certificate it accepts), `bench` whose numbers agree with the handshakes and bytes
//! the daemon counted — and every one of them refuses a tls:// target it has nothing
//! to verify by, unless `--insecure` is asked for.

#[path = "../support/pki.rs"]
mod pki;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use crate::bench::{bench, num};
use crate::support::{Daemon, Options, Run, random_bytes, run_echod, wait_until};
use pki::Pki;

const LIMIT: Duration = Duration::from_secs(60);
/// The TLS listener's series label (the configured address).
const LABEL: &str = "127.0.0.1:0";

/// echod serving `pki`'s pair on a TLS listener of its own port; `tls_extra` goes into
/// `[tls]`. Returns the daemon and `tls://ADDR`.
fn tls_daemon(pki: &Pki, tls_extra: &str) -> (Daemon, String) {
    let toml = format!(
        "[tls]\nlisten = [\"{LABEL}\"]\ncert_file = {:?}\nkey_file = {:?}\n{tls_extra}\n",
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
    );
    let daemon = Daemon::start_with(Options {
        toml: &toml,
        ..Options::default()
    });
    // The ready line the start waited for names the TLS address the kernel picked.
    let addr: SocketAddr = daemon.listening.tls[0];
    (daemon, format!("tls://{addr}"))
}

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

fn echod(args: &[&str], stdin: &[u8]) -> Run {
    run_echod(args, stdin, LIMIT)
}

fn handshakes(daemon: &Daemon, result: &str) -> f64 {
    daemon.metric(
        "echod_tls_handshakes_total",
        &[("listener", LABEL), ("result", result)],
    )
}

fn assert_fails(run: &Run, reason: &str) {
    assert_eq!(run.code(), 1, "expected a failure; stderr: {}", run.stderr);
    assert!(
        run.stderr.contains(reason),
        "the reason should mention {reason:?}: {:?}",
        run.stderr
    );
}

#[test]
fn client_over_tls_is_byte_exact_for_every_size_and_ends_with_close_notify() {
    let pki = Pki::new();
    let (daemon, target) = tls_daemon(&pki, "");
    let ca = path(&pki.ca);
    let sizes = [0usize, 1, 16_384, 16_385, 100_000, 1 << 20, 8 << 20];
    let mut total = 0;
    for (i, size) in sizes.into_iter().enumerate() {
        let data = random_bytes(size, 2100 + i as u64);
        let run = echod(&["client", &target, "--ca", &ca, "--verify"], &data);
        assert_eq!(run.code(), 0, "size {size}: {}", run.stderr);
        assert_eq!(run.stdout.len(), size, "size {size}: length differs");
        assert!(run.stdout == data, "size {size}: bytes differ");
        total += size;
    }
    // Every run was one handshake, its bytes went through TLS, and each client ended
    // with its close_notify (answered, or the client would have failed).
    let runs = sizes.len() as f64;
    assert_eq!(handshakes(&daemon, "ok"), runs);
    daemon.wait_metric_at_least(
        "echod_tls_connections_closed_total",
        &[("listener", LABEL), ("reason", "close_notify")],
        runs,
    );
    let received = daemon.wait_metric_at_least(
        "echod_tcp_received_bytes_total",
        &[("listener", LABEL)],
        total as f64,
    );
    assert_eq!(received, total as f64);
}

#[test]
fn client_refuses_an_unverifiable_server_and_insecure_is_only_when_asked() {
    let pki = Pki::new();
    let (daemon, target) = tls_daemon(&pki, "");
    let data = random_bytes(5_000, 2200);

    // Nothing to verify by: it says what to give, and never connects.
    let run = echod(&["client", &target], &data);
    assert_fails(&run, "--ca FILE");
    assert!(run.stderr.contains("--insecure"), "{}", run.stderr);
    assert!(run.stdout.is_empty());
    // A CA that did not sign the server's certificate: the handshake fails.
    let wrong = path(&pki.stranger_cert);
    let run = echod(&["client", &target, "--ca", &wrong], &data);
    assert_fails(&run, "TLS handshake with");
    assert!(run.stderr.contains("certificate"), "{}", run.stderr);
    assert!(run.stdout.is_empty(), "no byte echoed before verification");
    // A name the certificate does not carry fails too; the right one passes.
    let ca = path(&pki.ca);
    let run = echod(
        &[
            "client",
            &target,
            "--ca",
            &ca,
            "--server-name",
            "elsewhere.example",
        ],
        &data,
    );
    assert_fails(&run, "TLS handshake with");
    let run = echod(
        &[
            "client",
            &target,
            "--ca",
            &ca,
            "--server-name",
            "localhost",
            "--verify",
        ],
        &data,
    );
    assert_eq!(run.code(), 0, "{}", run.stderr);
    // --insecure skips verification, and only it.
    let run = echod(&["client", &target, "--insecure", "--verify"], &data);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert!(run.stdout == data);
    assert!(
        handshakes(&daemon, "client_alert") >= 2.0,
        "the refusals were alerts"
    );
    // tls:// is TCP.
    assert_fails(
        &echod(&["client", &target, "--udp", "--insecure"], &data),
        "--udp",
    );
}

#[test]
fn client_presents_its_certificate_to_a_mutual_tls_server() {
    let pki = Pki::new();
    let client_ca = format!("client_ca_file = {:?}", path(&pki.ca));
    let (daemon, target) = tls_daemon(&pki, &client_ca);
    let ca = path(&pki.ca);
    let data = random_bytes(300_000, 2300);
    let (cert, key) = (path(&pki.client_cert), path(&pki.client_key));
    let run = echod(
        &[
            "client", &target, "--ca", &ca, "--cert", &cert, "--key", &key, "--verify",
        ],
        &data,
    );
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert!(run.stdout == data);
    // Without one, or with one from another CA, nothing is echoed.
    let run = echod(&["client", &target, "--ca", &ca], &data);
    assert_eq!(run.code(), 1, "{}", run.stderr);
    assert!(run.stdout.is_empty());
    let (cert, key) = (path(&pki.stranger_cert), path(&pki.stranger_key));
    let run = echod(
        &[
            "client", &target, "--ca", &ca, "--cert", &cert, "--key", &key,
        ],
        &data,
    );
    assert_eq!(run.code(), 1, "{}", run.stderr);
    assert!(run.stdout.is_empty());
    assert_eq!(handshakes(&daemon, "ok"), 1.0);
    daemon.wait_metric_at_least(
        "echod_tls_handshakes_total",
        &[("listener", LABEL), ("result", "no_client_certificate")],
        1.0,
    );
    daemon.wait_metric_at_least(
        "echod_tls_handshakes_total",
        &[("listener", LABEL), ("result", "bad_certificate")],
        1.0,
    );
}

#[test]
fn probe_over_tls_is_healthy_only_when_the_server_verifies() {
    let pki = Pki::new();
    let (daemon, target) = tls_daemon(&pki, "");
    let ca = path(&pki.ca);
    let run = echod(&["probe", "--tcp", &target, "--ca", &ca], b"");
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let addr = target.trim_start_matches("tls://");
    assert!(
        run.stdout_text().starts_with(&format!("ok tls {addr} (")),
        "{}",
        run.stdout_text()
    );
    // The nonce went through TLS.
    assert_eq!(handshakes(&daemon, "ok"), 1.0);
    // --ca-file, the probe's older name, is the same flag.
    let run = echod(&["probe", "--tcp", &target, "--ca-file", &ca], b"");
    assert_eq!(run.code(), 0, "{}", run.stderr);

    let wrong = path(&pki.stranger_cert);
    for (args, reason) in [
        (vec!["--tcp", target.as_str()], "--ca FILE"),
        (
            vec!["--tcp", target.as_str(), "--ca", wrong.as_str()],
            "TLS: invalid peer certificate",
        ),
        // TLS to a plain echo port: the nonce-shaped ClientHello comes back, not a
        // ServerHello.
        (
            vec![
                "--tcp",
                &format!("tls://{}", daemon.tcp),
                "--ca",
                ca.as_str(),
            ],
            "TLS:",
        ),
    ] {
        let mut all = vec!["probe"];
        all.extend(args.iter().copied());
        let run = echod(&all, b"");
        assert_fails(&run, reason);
        assert_eq!(run.stderr.trim_end().lines().count(), 1, "{}", run.stderr);
    }
    let run = echod(&["probe", "--tcp", &target, "--insecure"], b"");
    assert_eq!(run.code(), 0, "{}", run.stderr);
}

#[test]
fn probe_presents_a_client_certificate_to_a_mutual_tls_server() {
    let pki = Pki::new();
    let client_ca = format!("client_ca_file = {:?}", path(&pki.ca));
    let (daemon, target) = tls_daemon(&pki, &client_ca);
    let ca = path(&pki.ca);
    let (cert, key) = (path(&pki.client_cert), path(&pki.client_key));
    let run = echod(
        &[
            "probe", "--tcp", &target, "--ca", &ca, "--cert", &cert, "--key", &key,
        ],
        b"",
    );
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let run = echod(&["probe", "--tcp", &target, "--ca", &ca], b"");
    assert_fails(&run, "tls ");
    let (cert, key) = (path(&pki.stranger_cert), path(&pki.stranger_key));
    let run = echod(
        &[
            "probe",
            "--tcp",
            &target,
            "--ca",
            &ca,
            "--client-cert",
            &cert,
            "--client-key",
            &key,
        ],
        b"",
    );
    assert_fails(&run, "tls ");
    assert_eq!(handshakes(&daemon, "ok"), 1.0);
}

/// Waits until every TLS connection the daemon took has closed, so its counters are
/// final.
fn wait_all_closed(daemon: &Daemon) {
    let open = || daemon.metric("echod_tls_connections_active", &[("listener", LABEL)]);
    wait_until(
        Duration::from_secs(20),
        || format!("daemon still has {} open TLS connections", open()),
        || open() == 0.0,
    );
}

fn assert_bytes_match(daemon: &Daemon, report: &Value) {
    wait_all_closed(daemon);
    let sent = num(report, "bytes_sent");
    let echoed = num(report, "bytes_received");
    assert!(echoed > 0.0, "nothing echoed: {report}");
    assert_eq!(sent, echoed, "every byte sent came back: {report}");
    let labels = [("listener", LABEL)];
    assert_eq!(
        daemon.metric("echod_tcp_received_bytes_total", &labels),
        sent
    );
    assert_eq!(daemon.metric("echod_tcp_sent_bytes_total", &labels), echoed);
    assert_eq!(num(report, "mismatches"), 0.0);
    assert_eq!(num(report, "errors"), 0.0);
}

#[test]
fn bench_over_tls_agrees_with_the_daemons_handshakes_and_bytes() {
    let pki = Pki::new();
    let (daemon, target) = tls_daemon(&pki, "");
    let ca = path(&pki.ca);
    let (run, report) = bench(&[
        &target, "--ca", &ca, "-C", "4", "-s", "100", "-p", "2", "-d", "1s",
    ]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(report["target"], Value::from(target.clone()), "{report}");
    assert_bytes_match(&daemon, &report);
    assert_eq!(
        handshakes(&daemon, "ok"),
        4.0,
        "one handshake per connection"
    );
    assert_eq!(
        daemon.metric(
            "echod_tls_connections_closed_total",
            &[("listener", LABEL), ("reason", "close_notify")]
        ),
        4.0,
        "each connection ended with close_notify"
    );
}

#[test]
fn bench_bulk_and_connect_modes_over_tls() {
    let pki = Pki::new();
    let (daemon, target) = tls_daemon(&pki, "");
    let ca = path(&pki.ca);
    let (run, report) = bench(&[&target, "--ca", &ca, "-m", "bulk", "-C", "2", "-d", "1s"]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_bytes_match(&daemon, &report);
    assert_eq!(handshakes(&daemon, "ok"), 2.0);

    // Connect mode: one full handshake per message, bounded by --count.
    let (run, report) = bench(&[
        &target, "--ca", &ca, "-m", "connect", "-C", "2", "-s", "1000", "-n", "40", "-d", "30s",
    ]);
    assert_eq!(run.code(), 0, "{}", run.stderr);
    assert_eq!(num(&report, "messages"), 40.0, "{report}");
    assert_eq!(num(&report, "errors"), 0.0, "{report}");
    assert_eq!(
        handshakes(&daemon, "ok"),
        2.0 + 40.0,
        "a handshake per message"
    );
    wait_all_closed(&daemon);
    assert_eq!(
        daemon.metric(
            "echod_tls_connections_closed_total",
            &[("listener", LABEL), ("reason", "close_notify")]
        ),
        42.0
    );
}

#[test]
fn bench_refuses_an_unverifiable_server() {
    let pki = Pki::new();
    let (daemon, target) = tls_daemon(&pki, "");
    let (run, _) = bench(&[&target, "-d", "1s"]);
    assert_fails(&run, "--ca FILE");
    let wrong = path(&pki.stranger_cert);
    for mode in ["ping-pong", "connect"] {
        let (run, _) = bench(&[&target, "--ca", &wrong, "-m", mode, "-C", "2", "-d", "1s"]);
        assert_fails(&run, "TLS handshake failed");
        assert!(run.stderr.contains("certificate"), "{}", run.stderr);
    }
    assert_eq!(handshakes(&daemon, "ok"), 0.0);
}

/// A server that answers the ClientHello a byte every 200 ms cannot hold a tool past its
/// `--timeout`: a timeout per socket read restarted on every byte (20 s seen for a 1 s
/// timeout); the handshake now has the time left, in all.
#[test]
fn a_trickling_handshake_is_bounded_by_the_timeout() {
    use std::io::{Read, Write};
    let pki = Pki::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(2) {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let _ = s.read(&mut [0u8; 1024]);
                // A handshake record's header and body, one byte at a time (at most 10 s).
                let record = [0x16u8, 0x03, 0x03, 0x00, 0x40];
                for b in record.iter().chain([0u8; 0x40].iter()).take(50) {
                    if s.write_all(&[*b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        }
    });
    let target = format!("tls://{addr}");
    let ca = path(&pki.ca);
    for args in [
        vec!["probe", "--tcp", &target, "--ca", &ca, "--timeout", "1s"],
        vec!["client", &target, "--ca", &ca, "--timeout", "1s"],
    ] {
        let started = std::time::Instant::now();
        let run = echod(&args, b"x");
        let took = started.elapsed();
        assert_eq!(run.code(), 1, "{args:?}: {}", run.stderr);
        assert!(
            took < Duration::from_secs(4),
            "{args:?} took {took:?}: {}",
            run.stderr
        );
    }
}
