//! Validation and layering as pure functions: the same checks the black-box tests run
//! through `echod check-config`, here case by case and in microseconds.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use super::*;

fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn with_file(text: &str) -> (tempfile::NamedTempFile, ConfigSource) {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(text.as_bytes()).expect("write config");
    let source = ConfigSource {
        file: Some(file.path().to_path_buf()),
        overrides: Vec::new(),
    };
    (file, source)
}

#[test]
fn every_invalid_value_names_its_key() {
    let cases: &[(&str, &str)] = &[
        ("[tcp]\nbacklog = 0", "tcp.backlog"),
        ("[tcp]\nbacklog = 70000", "tcp.backlog"),
        ("[tcp]\nmax_connections = 0", "tcp.max_connections"),
        (
            "[tcp]\nmax_connections = 10\nmax_connections_per_ip = 11",
            "tcp.max_connections_per_ip",
        ),
        (
            "[tcp]\nmax_connections_per_ip = 0",
            "tcp.max_connections_per_ip",
        ),
        ("[tcp]\nidle_timeout = \"0s\"", "tcp.idle_timeout"),
        ("[tcp]\nbuffer_size = 511", "tcp.buffer_size"),
        ("[tcp]\nbuffer_size = 16777217", "tcp.buffer_size"),
        (
            "[tcp]\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:1\"]",
            "tcp.listen",
        ),
        ("[udp]\nmax_datagram_size = 0", "udp.max_datagram_size"),
        ("[udp]\nmax_datagram_size = 65536", "udp.max_datagram_size"),
        (
            "[udp]\nsockets_per_address = 257",
            "udp.sockets_per_address",
        ),
        ("[udp.rate_limit]\nburst = 0", "udp.rate_limit.burst"),
        (
            "[udp.rate_limit]\nmax_sources = 0",
            "udp.rate_limit.max_sources",
        ),
        (
            "[metrics]\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:1\"]",
            "metrics.listen",
        ),
        (
            "[shutdown]\ndrain_timeout = \"0s\"",
            "shutdown.drain_timeout",
        ),
        ("[log]\nlevel = \"loud\"", "log.level"),
        (
            "[tcp.proxy_protocol]\nheader_timeout = \"0s\"",
            "tcp.proxy_protocol.header_timeout",
        ),
    ];
    for (text, key) in cases {
        let (_file, source) = with_file(text);
        match source.load_with_env(&HashMap::new()) {
            Err(ConfigError::Value {
                key: got, origin, ..
            }) => {
                assert_eq!(&got, key, "for {text:?}");
                assert_eq!(origin, source.file.as_ref().unwrap().display().to_string());
            }
            other => panic!("{text:?} gave {other:?}, expected an error naming {key}"),
        }
    }
}

#[test]
fn lowering_the_global_limit_alone_is_valid_and_the_per_ip_limit_follows() {
    // README's example: the per-IP default must not make it fail.
    let config = ConfigSource::default()
        .load_with_env(&env(&[("ECHOD_TCP__MAX_CONNECTIONS", "500")]))
        .expect("ECHOD_TCP__MAX_CONNECTIONS=500 is valid");
    assert_eq!(config.tcp.max_connections, 500);
    assert_eq!(config.tcp.per_ip_limit(), 500);
    let (_file, source) = with_file("[tcp]\nmax_connections = 5\n");
    let config = source.load_with_env(&HashMap::new()).expect("valid");
    assert_eq!(config.tcp.per_ip_limit(), 5);
    assert_eq!(
        Config::default().tcp.per_ip_limit(),
        DEFAULT_MAX_CONNECTIONS_PER_IP
    );
    let (_file, source) = with_file("[tcp]\nmax_connections = 50\nmax_connections_per_ip = 7\n");
    assert_eq!(
        source
            .load_with_env(&HashMap::new())
            .unwrap()
            .tcp
            .per_ip_limit(),
        7
    );
}

#[test]
fn layers_apply_defaults_then_file_then_environment_then_flags() {
    let (_file, mut source) =
        with_file("[tcp]\nbacklog = 10\nidle_timeout = \"1m\"\n[log]\nlevel = \"warn\"\n");
    source.overrides.push(("log.level".into(), "debug".into()));
    let config = source
        .load_with_env(&env(&[
            ("ECHOD_TCP__IDLE_TIMEOUT", "2m"),
            ("ECHOD_UDP__LISTEN", ""),
            ("ECHOD_CONFIG", "/ignored"),
            ("ECHOD_SERVICE_HOST", "10.0.0.1"),
        ]))
        .expect("valid layers");
    assert_eq!(config.tcp.backlog, 10, "file over defaults");
    assert_eq!(
        config.tcp.idle_timeout,
        Duration::from_secs(120),
        "environment over file"
    );
    assert_eq!(config.log.level, "debug", "flags over everything");
    assert!(
        config.udp.listen.is_empty(),
        "an empty listen variable turns the listener off"
    );
    assert_eq!(config.tcp.buffer_size, TcpConfig::default().buffer_size);
}

/// An empty variable is not configuration — `${UNSET}` in a compose file must not
/// quietly drop a defence: only a `listen` list reads it as "none" (the listener's
/// absence shows at once in the ready line and in every probe).
#[test]
fn an_empty_list_variable_keeps_the_defences_and_turns_off_only_a_listener() {
    let (_file, source) = with_file(
        "[tcp]\ndeny = [\"192.0.2.0/24\"]\n[udp]\nallow = [\"127.0.0.1\"]\n\
         [tcp.proxy_protocol]\ntrusted_sources = [\"127.0.0.1\"]\n",
    );
    let empty = [
        "ECHOD_UDP__DENY_SOURCE_PORTS",
        "ECHOD_TCP__DENY",
        "ECHOD_UDP__ALLOW",
        "ECHOD_TCP__PROXY_PROTOCOL__TRUSTED_SOURCES",
        "ECHOD_METRICS__LISTEN",
    ]
    .map(|name| (name, ""));
    let config = source.load_with_env(&env(&empty)).expect("valid layers");
    assert_eq!(
        config.udp.deny_source_ports,
        UdpConfig::default().deny_source_ports
    );
    assert_eq!(config.tcp.deny.len(), 1);
    assert_eq!(config.udp.allow.len(), 1);
    assert_eq!(config.tcp.proxy_protocol.trusted_sources.len(), 1);
    assert!(config.metrics.listen.is_empty());
}

#[test]
fn log_filters_accept_levels_and_directives_and_refuse_bare_words() {
    for ok in [
        "info",
        "DEBUG",
        " warn ",
        "off",
        "info,echod=debug",
        "echod=trace",
    ] {
        assert!(parse_log_filter(ok).is_ok(), "{ok:?} should parse");
    }
    for bad in ["loud", "verbose", ""] {
        let err = parse_log_filter(bad).expect_err(bad);
        assert!(err.contains("is not one of"), "{bad:?}: {err}");
    }
}

#[test]
fn documented_defaults_file_is_the_default_config() {
    let documented: Config = toml::from_str(DOCUMENTED_DEFAULTS).expect("config/echod.toml parses");
    assert_eq!(documented, Config::default());
}

#[test]
fn the_loaded_web_config_cannot_be_set_from_toml_and_a_bad_file_names_the_key() {
    let (_file, source) = with_file("[metrics]\nweb_config = \"x\"\n");
    let err = source.load_with_env(&env(&[])).unwrap_err().to_string();
    assert!(err.contains("web_config"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web.yml");
    std::fs::write(&web, "basic_auth_users:\n  alice: x\n").unwrap();
    let (_file, source) = with_file(&format!(
        "[metrics]\nweb_config_file = {:?}\n",
        web.display().to_string()
    ));
    let err = source.load_with_env(&env(&[])).unwrap_err().to_string();
    assert!(
        err.contains("key `metrics.web_config_file`")
            && err.contains(&web.display().to_string())
            && err.contains("basic_auth_users.alice: not a bcrypt hash"),
        "{err}"
    );
}

#[test]
fn trusted_sources_parse_from_file_and_environment_and_bad_ones_name_the_key() {
    let (_file, source) =
        with_file("[tcp.proxy_protocol]\ntrusted_sources = [\"10.0.0.0/8\", \"fd00::/8\"]\n");
    let config = source.load_with_env(&HashMap::new()).expect("valid");
    let proxy = &config.tcp.proxy_protocol;
    assert!(proxy.trusts("10.1.2.3".parse().unwrap()));
    assert!(proxy.trusts("::ffff:10.1.2.3".parse().unwrap()));
    assert!(proxy.trusts("fd00::1".parse().unwrap()));
    assert!(!proxy.trusts("192.0.2.1".parse().unwrap()));
    assert!(
        !Config::default()
            .tcp
            .proxy_protocol
            .trusts("10.1.2.3".parse().unwrap())
    );
    let config = ConfigSource::default()
        .load_with_env(&env(&[(
            "ECHOD_TCP__PROXY_PROTOCOL__TRUSTED_SOURCES",
            "192.0.2.0/24,2001:db8::1",
        )]))
        .expect("a list from the environment");
    assert_eq!(config.tcp.proxy_protocol.trusted_sources.len(), 2);
    let err = ConfigSource::default()
        .load_with_env(&env(&[(
            "ECHOD_TCP__PROXY_PROTOCOL__TRUSTED_SOURCES",
            "10.0.0.1/8",
        )]))
        .expect_err("host bits set");
    let text = err.to_string();
    assert!(
        text.contains("tcp.proxy_protocol.trusted_sources"),
        "{text}"
    );
    assert!(text.contains("the network is 10.0.0.0/8"), "{text}");
    let (_file, source) = with_file("[tcp.proxy_protocol]\ntrusted_sources = [\"10.0.0.0/33\"]\n");
    let text = source
        .load_with_env(&HashMap::new())
        .expect_err("/33")
        .to_string();
    assert!(
        text.contains("trusted_sources") && text.contains("prefix length 33"),
        "{text}"
    );
}

#[test]
fn parser_errors_speak_of_values_not_rust_types() {
    let cases: &[(&str, &str)] = &[
        ("[tcp]\nmax_connections = \"x\"", "expected a whole number"),
        (
            "[log]\nformat = \"xml\"",
            "unknown value `xml`, expected `text` or `json`",
        ),
        (
            "[tcp]\nlisten = [\"127.0.0.1:70000\"]",
            "host names are not resolved",
        ),
        (
            "[tcp]\nlisten = [\"localhost:7\"]",
            "host names are not resolved",
        ),
    ];
    let internals = [
        "usize",
        "variant",
        "invalid socket address syntax",
        "invalid type",
    ];
    for (text, want) in cases {
        let (_file, source) = with_file(text);
        let message = source
            .load_with_env(&HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(message.contains(want), "{text:?}: {message}");
        for word in internals {
            assert!(!message.contains(word), "{text:?} says {word}: {message}");
        }
    }
    for (var, value, want) in [
        ("ECHOD_TCP__MAX_CONNECTIONS", "x", "expected a whole number"),
        ("ECHOD_LOG__FORMAT", "xml", "unknown value `xml`"),
        (
            "ECHOD_TCP__LISTEN",
            "localhost:7",
            "host names are not resolved",
        ),
    ] {
        let message = ConfigSource::default()
            .load_with_env(&env(&[(var, value)]))
            .unwrap_err()
            .to_string();
        assert!(message.contains(want), "{var}={value}: {message}");
        for word in internals {
            assert!(
                !message.contains(word),
                "{var}={value} says {word}: {message}"
            );
        }
    }
}

#[test]
fn a_missing_tls_file_is_reported_where_tls_listen_was_set() {
    let listen_from_env = env(&[("ECHOD_TLS__LISTEN", "127.0.0.1:0")]);
    let (_file, with_file_source) = with_file("[tcp]\nmax_connections = 5\n");
    for source in [ConfigSource::default(), with_file_source] {
        match source.load_with_env(&listen_from_env) {
            Err(ConfigError::Value { key, origin, .. }) => {
                assert_eq!(key, "tls.cert_file");
                assert_eq!(origin, "environment variable ECHOD_TLS__LISTEN");
            }
            other => panic!("{other:?}"),
        }
    }
    // Named in the file, it is the file's.
    let (_file, source) = with_file("[tls]\nlisten = [\"127.0.0.1:0\"]\n");
    match source.load_with_env(&HashMap::new()) {
        Err(ConfigError::Value { key, origin, .. }) => {
            assert_eq!(key, "tls.cert_file");
            assert_eq!(origin, source.file.as_ref().unwrap().display().to_string());
        }
        other => panic!("{other:?}"),
    }
}
