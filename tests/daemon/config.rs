//! Configuration as an operator meets it: `check-config`, layering, and every kind of
//! mistake refused with exit 78 and a message naming the file and the key.

use std::process::{Command, Output};

use crate::support::{Daemon, Options, echod_bin};

crate::support::tests![
    bad_configs_exit_78_naming_file_and_key,
    missing_file_exits_78_naming_it,
    bad_environment_variable_exits_78_naming_the_key,
    layers_apply_in_order_and_check_config_prints_the_result,
    documented_config_file_is_exactly_the_defaults,
    port_in_use_names_the_address_and_fails_before_serving,
];

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(echod_bin());
    cmd.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run echod")
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("echod.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn bad_configs_exit_78_naming_file_and_key() {
    // (file contents, text the message must contain besides the file name)
    let cases: &[(&str, &str)] = &[
        ("[tcp]\nlisten = [\"127.0.0.1:7007\"\n", "TOML"),
        ("[tcp]\nbaklog = 5\n", "baklog"),
        ("[tpc]\nbacklog = 5\n", "tpc"),
        ("[tcp]\nbacklog = \"big\"\n", "backlog"),
        ("[tcp]\nlisten = [\"127.0.0.1:70000\"]\n", "listen"),
        ("[tcp]\nlisten = \"127.0.0.1:7\"\n", "listen"),
        ("[tcp]\nbacklog = 0\n", "tcp.backlog"),
        ("[tcp]\nmax_connections = 0\n", "tcp.max_connections"),
        (
            "[tcp]\nmax_connections = 10\nmax_connections_per_ip = 11\n",
            "tcp.max_connections_per_ip",
        ),
        ("[tcp]\nidle_timeout = \"banana\"\n", "idle_timeout"),
        ("[tcp]\nidle_timeout = \"0s\"\n", "tcp.idle_timeout"),
        ("[tcp]\nbuffer_size = 0\n", "tcp.buffer_size"),
        ("[tcp]\nnodelay = \"yes\"\n", "nodelay"),
        (
            "[udp]\nmax_datagram_size = 70000\n",
            "udp.max_datagram_size",
        ),
        ("[udp]\ndeny_source_ports = [70000]\n", "deny_source_ports"),
        ("[udp.rate_limit]\nburst = 0\n", "udp.rate_limit.burst"),
        (
            "[udp]\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n",
            "udp.listen",
        ),
        ("[shutdown]\ndrain_timeout = \"soon\"\n", "drain_timeout"),
        ("[log]\nlevel = \"loud\"\n", "log.level"),
        ("[log]\nformat = \"xml\"\n", "format"),
        ("[metrics]\nlisten = [\"localhost\"]\n", "listen"),
    ];
    assert!(cases.len() >= 12);
    for (text, key) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(&dir, text);
        for args in [
            vec!["--config", path.as_str()],
            vec!["check-config", "--config", path.as_str()],
        ] {
            let out = run(&args, &[]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(78),
                "{args:?} with {text:?}: {stderr}"
            );
            assert!(
                stderr.contains(&path),
                "message for {text:?} does not name the file: {stderr}"
            );
            assert!(
                stderr.contains(key),
                "message for {text:?} does not name `{key}`: {stderr}"
            );
        }
    }
}

fn missing_file_exits_78_naming_it() {
    let out = run(&["--config", "/nonexistent/echod.toml"], &[]);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/echod.toml"), "{stderr}");
}

fn bad_environment_variable_exits_78_naming_the_key() {
    let out = run(&["check-config"], &[("ECHOD_TCP__MAX_CONECTIONS", "5")]);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_conections"), "{stderr}");
    let out = run(&["check-config"], &[("ECHOD_TCP__BACKLOG", "0")]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tcp.backlog"));
}

fn layers_apply_in_order_and_check_config_prints_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        "[tcp]\nmax_connections = 300\nbacklog = 64\n[udp]\nlisten = []\n",
    );
    let out = run(
        &["check-config", "--config", &path, "--log-level", "debug"],
        &[
            ("ECHOD_TCP__MAX_CONNECTIONS", "1500"),
            ("ECHOD_TCP__LISTEN", "127.0.0.1:7,[::1]:7"),
            ("ECHOD_METRICS__LISTEN", ""),
            // Not configuration: must be ignored, not rejected as unknown keys.
            ("ECHOD_SERVICE_HOST", "10.0.0.1"),
            ("ECHOD_PORT_7_TCP", "tcp://10.0.0.1:7"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective: echod::config::Config = toml::from_str(
        &stdout
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .expect("check-config prints valid TOML");
    assert_eq!(
        effective.tcp.max_connections, 1500,
        "environment beats file"
    );
    assert_eq!(effective.tcp.backlog, 64, "file beats defaults");
    assert_eq!(effective.tcp.listen.len(), 2);
    assert!(effective.udp.listen.is_empty(), "empty list disables UDP");
    assert!(
        effective.metrics.listen.is_empty(),
        "empty variable means no addresses"
    );
    assert_eq!(effective.log.level, "debug", "flag beats everything");
    assert_eq!(
        effective.tcp.idle_timeout.as_secs(),
        300,
        "defaults fill the rest"
    );
}

fn documented_config_file_is_exactly_the_defaults() {
    let documented: echod::config::Config =
        toml::from_str(echod::config::DOCUMENTED_DEFAULTS).expect("config/echod.toml parses");
    assert_eq!(documented, echod::config::Config::default());
    let out = run(&["check-config", "--config", "config/echod.toml"], &[]);
    assert!(out.status.success());
}

fn port_in_use_names_the_address_and_fails_before_serving() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let mut daemon = Daemon::start_with(Options {
        toml: &format!("[tcp]\nlisten = [\"{addr}\"]\n"),
        no_wait: true,
        ..Options::default()
    });
    let status = daemon.wait_exit(std::time::Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(1),
        "a port in use exits 1 (not 78: a bind failure is not a config error)"
    );
    let log = daemon.log();
    assert!(log.contains(&addr.to_string()), "{log}");
    assert!(log.contains("already uses this port"), "{log}");
    assert!(!log.contains("echod ready"), "{log}");
    assert_eq!(
        log.matches("cannot listen on").count(),
        1,
        "the bind error is printed once:\n{log}"
    );
}
