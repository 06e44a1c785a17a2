//! `metrics.web_config_file`, the Prometheus exporters' web configuration, as an
//! operator meets it: TLS and basic auth on `/metrics` with the health probes left
//! open, client certificates required, bad files refused with exit 78 naming the key,
//! the file and the fault, a reload that swaps a password (and a bad one that keeps
//! the old file), and `echod probe` over TLS.

#[path = "../support/tls.rs"]
pub(crate) mod tls;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tls::{HttpsClient, Pki, daemon_with_web_config, users_yaml, web_config_toml};

use crate::support::{ChildGuard, Daemon, echod_bin, http_get, metric_value, poll, wait_until};

crate::support::tests![
    tls_and_basic_auth_guard_metrics_and_leave_health_open,
    required_client_certificates_refuse_a_client_without_one,
    bad_web_config_files_exit_78_naming_the_key_the_file_and_the_fault,
    reload_swaps_the_password_and_a_bad_file_keeps_the_old_one,
    probe_checks_readiness_over_tls,
    a_stalled_tls_handshake_is_closed_within_its_timeout,
];

const USER: &str = "prometheus";

fn tls_and_basic_auth_guard_metrics_and_leave_health_open() {
    let pki = Pki::new();
    let web = pki.web_config("web.yml", "", &[(USER, "s3cret"), ("grafana", "other")]);
    let client = HttpsClient::new(&pki.ca);
    let daemon = daemon_with_web_config(&web, &client);

    let get = |path, auth| client.get(daemon.http, path, auth).expect("HTTPS GET");
    for (path, auth) in [
        ("/metrics", None),
        ("/metrics", Some((USER, "wrong"))),
        ("/metrics", Some(("nobody", "s3cret"))),
        ("/metrics", Some((USER, ""))),
        ("/", None),
        ("/nothing-here", None),
    ] {
        assert_eq!(get(path, auth).0, 401, "{path} with {auth:?}");
    }
    let (status, body) = get("/metrics", Some((USER, "s3cret")));
    assert_eq!(status, 200);
    assert_eq!(metric_value(&body, "echod_ready", &[]), 1.0, "{body}");
    assert_eq!(get("/metrics", Some(("grafana", "other"))).0, 200);
    // Probes carry no credentials: health stays open, over TLS.
    assert_eq!(get("/healthz", None), (200, "ok\n".to_string()));
    assert_eq!(get("/readyz", None), (200, "ready\n".to_string()));

    // Plain HTTP to the TLS endpoint is told so, and gets nothing else.
    let (status, body) = http_get(daemon.http, "/readyz").expect("plain answer");
    assert_eq!(status, 400);
    assert!(body.contains("HTTP request to an HTTPS server"), "{body}");
    // A client that does not trust the server's CA refuses it.
    let stranger = HttpsClient::new(&pki.stranger_cert);
    let refused = stranger.get(daemon.http, "/healthz", None);
    assert!(refused.is_err(), "{refused:?}");
    let log = daemon.log();
    assert!(
        log.contains("TLS on") && log.contains("basic auth: 2 users"),
        "{log}"
    );
}

fn required_client_certificates_refuse_a_client_without_one() {
    let pki = Pki::new();
    let web = pki.web_config(
        "web.yml",
        &format!(
            "client_auth_type: RequireAndVerifyClientCert\nclient_ca_file: {}",
            pki.ca.display()
        ),
        &[],
    );
    let trusted = HttpsClient::with_client_cert(&pki.ca, &pki.client_cert, &pki.client_key);
    let daemon = daemon_with_web_config(&web, &trusted);
    assert_eq!(
        trusted.get(daemon.http, "/metrics", None).unwrap().0,
        200,
        "a client with a certificate from client_ca_file is served"
    );
    for (who, client) in [
        ("no certificate", HttpsClient::new(&pki.ca)),
        (
            "a certificate from another CA",
            HttpsClient::with_client_cert(&pki.ca, &pki.stranger_cert, &pki.stranger_key),
        ),
    ] {
        // Health too: the handshake itself fails, with a TLS alert.
        let err = client
            .get(daemon.http, "/healthz", None)
            .expect_err(who)
            .to_string();
        assert!(
            err.contains("alert") || err.contains("Certificate"),
            "{who}: {err}"
        );
    }
    assert!(daemon.log().contains("TLS handshake failed"));

    // The local probe must present a certificate too, and says so.
    let config = daemon.served_config().display().to_string();
    let (code, out) = probe(&["--config", &config]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("--client-cert"), "{out}");
    let (cert, key) = (
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
    );
    let (code, out) = probe(&[
        "--config",
        &config,
        "--client-cert",
        &cert,
        "--client-key",
        &key,
    ]);
    assert_eq!(code, Some(0), "{out}");
}

/// `echod` with `args`, killed after 10 s if it has not exited (a bad file that is
/// accepted would start serving).
fn run_briefly(args: &[&str], env: &[(&str, String)]) -> (Option<i32>, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new(echod_bin());
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = ChildGuard(cmd.spawn().expect("run echod"));
    let code = poll(Duration::from_secs(10), || child.0.try_wait().unwrap())
        .and_then(|status| status.code());
    drop(child);
    (code, std::fs::read_to_string(log.path()).unwrap())
}

fn bad_web_config_files_exit_78_naming_the_key_the_file_and_the_fault() {
    let pki = Pki::new();
    let cert = pki.cert.display().to_string();
    let key = pki.key.display().to_string();
    let ca = pki.ca.display().to_string();
    let tls = |extra: &str| {
        format!("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n{extra}")
    };
    // (web config text, what the message must say)
    let cases: Vec<(String, &str)> = vec![
        ("tls_server_config: [\n".into(), "invalid YAML"),
        (
            "tls_server_config:\n  certfile: server.pem\n".into(),
            "unknown field `certfile`",
        ),
        (
            "basic_auth_user:\n  a: b\n".into(),
            "unknown field `basic_auth_user`",
        ),
        (
            "basic_auth_users:\n  alice: plaintext\n".into(),
            "basic_auth_users.alice: not a bcrypt hash",
        ),
        (
            "tls_server_config:\n  cert_file: missing.pem\n  key_file: server-key.pem\n".into(),
            "cannot read tls_server_config.cert_file",
        ),
        (
            format!("tls_server_config:\n  cert_file: {key}\n  key_file: {key}\n"),
            "no PEM certificate",
        ),
        (
            "tls_server_config:\n  key_file: server-key.pem\n".into(),
            "tls_server_config.cert_file: missing",
        ),
        (
            format!(
                "tls_server_config:\n  cert_file: {cert}\n  key_file: {}\n",
                pki.client_key.display()
            ),
            "tls_server_config.key_file",
        ),
        (
            tls("  client_auth_type: RequireAndVerifyClientCert\n"),
            "tls_server_config.client_ca_file: missing",
        ),
        (
            tls(&format!("  client_ca_file: {ca}\n")),
            "tls_server_config.client_ca_file",
        ),
        (
            tls(&format!(
                "  client_auth_type: RequestClientCert\n  client_ca_file: {ca}\n"
            )),
            "RequestClientCert is not supported",
        ),
        (
            tls("  min_version: TLS10\n"),
            "tls_server_config.min_version",
        ),
    ];
    for (i, (yaml, fault)) in cases.iter().enumerate() {
        let web = pki.write(&format!("bad-{i}.yml"), yaml);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("echod.toml");
        std::fs::write(&config, web_config_toml(&web)).unwrap();
        let config = config.display().to_string();
        for args in [
            vec!["check-config", "--config", config.as_str()],
            vec!["--config", config.as_str()],
        ] {
            let (code, stderr) = run_briefly(&args, &[]);
            assert_eq!(code, Some(78), "{args:?} with {yaml:?}: {stderr}");
            for needle in [
                "metrics.web_config_file",
                config.as_str(),
                &web.display().to_string(),
                fault,
            ] {
                assert!(
                    stderr.contains(needle),
                    "{args:?} with {yaml:?}: no {needle:?} in {stderr}"
                );
            }
        }
    }
    // A file that does not exist, named by the environment.
    let missing = pki.ca.with_file_name("nowhere.yml").display().to_string();
    let (code, stderr) = run_briefly(
        &["check-config"],
        &[("ECHOD_METRICS__WEB_CONFIG_FILE", missing.clone())],
    );
    assert_eq!(code, Some(78), "{stderr}");
    for needle in [
        "ECHOD_METRICS__WEB_CONFIG_FILE",
        "metrics.web_config_file",
        &missing,
        "cannot read",
    ] {
        assert!(stderr.contains(needle), "no {needle:?} in {stderr}");
    }
    // The good file passes, and check-config shows the key.
    let good = pki.web_config("good.yml", "", &[(USER, "x")]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("echod.toml");
    std::fs::write(&config, web_config_toml(&good)).unwrap();
    let out = Command::new(echod_bin())
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("web_config_file"), "{stdout}");
}

/// Scrapes over TLS as `password`; the value of `family`, or `None` if refused.
fn scraped(client: &HttpsClient, daemon: &Daemon, password: &str, family: &str) -> Option<f64> {
    match client.get(daemon.http, "/metrics", Some((USER, password))) {
        Ok((200, body)) => Some(metric_value(&body, family, &[])),
        _ => None,
    }
}

/// Sends SIGHUP and waits until `family` (scraped as `password`) reaches `want`.
fn reload_until(daemon: &Daemon, client: &HttpsClient, password: &str, family: &str, want: f64) {
    daemon.signal(libc::SIGHUP);
    wait_until(
        Duration::from_secs(10),
        || {
            format!(
                "{family} never reached {want} for password {password:?}; log:\n{}",
                daemon.log()
            )
        },
        || scraped(client, daemon, password, family) == Some(want),
    );
}

fn reload_swaps_the_password_and_a_bad_file_keeps_the_old_one() {
    let pki = Pki::new();
    let web = pki.web_config("web.yml", "", &[(USER, "old")]);
    let client = HttpsClient::new(&pki.ca);
    let daemon = daemon_with_web_config(&web, &client);
    assert_eq!(
        scraped(&client, &daemon, "old", "echod_config_reloads_total"),
        Some(0.0)
    );

    pki.web_config("web.yml", "", &[(USER, "new")]);
    reload_until(&daemon, &client, "new", "echod_config_reloads_total", 1.0);
    assert_eq!(scraped(&client, &daemon, "old", "echod_ready"), None);

    // A bad file on reload: counted, logged with the key, and the old one still rules.
    let text = std::fs::read_to_string(&web).unwrap();
    std::fs::write(&web, text.replace("$2b$", "$9z$")).unwrap();
    reload_until(
        &daemon,
        &client,
        "new",
        "echod_config_reload_failures_total",
        1.0,
    );
    assert_eq!(
        scraped(
            &client,
            &daemon,
            "new",
            "echod_config_last_reload_successful"
        ),
        Some(0.0)
    );
    let log = daemon.log();
    assert!(
        log.contains("reload failed") && log.contains("metrics.web_config_file"),
        "{log}"
    );

    // Basic auth alone (TLS off) after a good reload: plain HTTP again, password kept.
    pki.write("web.yml", &users_yaml(&[(USER, "plain")]));
    daemon.signal(libc::SIGHUP);
    wait_until(
        Duration::from_secs(10),
        || format!("TLS still on; log:\n{}", daemon.log()),
        || http_get(daemon.http, "/readyz").is_ok_and(|(status, _)| status == 200),
    );
    assert_eq!(http_get(daemon.http, "/metrics").unwrap().0, 401);
}
/// `echod probe ARGS`: its exit code and everything it printed.
fn probe(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(echod_bin())
        .arg("probe")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn probe_checks_readiness_over_tls() {
    let pki = Pki::new();
    let ca = pki.ca.display().to_string();
    let web = pki.web_config("web.yml", "", &[(USER, "s3cret")]);
    let client = HttpsClient::new(&pki.ca);
    let daemon = daemon_with_web_config(&web, &client);
    let config = daemon.served_config().display().to_string();
    let url = format!("https://{}/readyz", daemon.http);

    // Without targets: the local config says TLS, and its certificate is trusted.
    let (code, out) = probe(&["--config", &config]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&url), "{out}");
    // An explicit https URL with the CA.
    let (code, out) = probe(&["--http", &url, "--ca-file", &ca]);
    assert_eq!(code, Some(0), "{out}");
    // Without a CA there is nothing to trust the server by.
    let (code, out) = probe(&["--http", &url]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("--ca-file"), "{out}");
    // The wrong CA: unhealthy, saying why.
    let wrong = pki.stranger_cert.display().to_string();
    let (code, out) = probe(&["--http", &url, "--ca-file", &wrong]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("certificate"), "{out}");
    // Plain http:// to the TLS endpoint fails (400).
    let (code, out) = probe(&["--http", &format!("http://{}/readyz", daemon.http)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("400"), "{out}");
}

/// A client that opens a TLS handshake and stalls (half a record header, or nothing)
/// is closed after the 2 s handshake timeout, like a slow request head.
fn a_stalled_tls_handshake_is_closed_within_its_timeout() {
    let pki = Pki::new();
    let web = pki.web_config("web.yml", "", &[]);
    let client = HttpsClient::new(&pki.ca);
    let daemon = daemon_with_web_config(&web, &client);
    let stalled: Vec<(TcpStream, Instant)> = [&b"\x16\x03"[..], b""]
        .iter()
        .map(|bytes| {
            let mut s = TcpStream::connect(daemon.http).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
            s.write_all(bytes).unwrap();
            (s, Instant::now())
        })
        .collect();
    // Served meanwhile.
    assert_eq!(client.get(daemon.http, "/healthz", None).unwrap().0, 200);
    for (mut s, opened) in stalled {
        let mut buf = [0u8; 64];
        let closed = matches!(s.read(&mut buf), Ok(0) | Err(_));
        let after = opened.elapsed();
        assert!(closed, "still open after {after:?}");
        assert!(
            after >= Duration::from_millis(1500) && after < Duration::from_secs(5),
            "closed after {after:?}"
        );
    }
}
