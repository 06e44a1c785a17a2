//! Every duration key at the edges of what it accepts: the largest value accepted must
//! start a daemon that serves (one echo over TCP, with the PROXY header timeout, the
//! idle timeout, the connection duration, the keepalive and the drain all at their
//! maximum; one echo over TLS with the TLS handshake timeout at its maximum), and
//! anything beyond — the `u64::MAX` seconds and `584542046090y` that once passed
//! `check-config` and panicked on the first connection — is refused with exit 78
//! naming the key. Values are generated per key: the maximum, the maximum plus one
//! nanosecond, and the overflowing spellings. `tcp.keepalive` also has a floor: below
//! one second (but not 0) the kernel would silently use its own default of 2 hours.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::{Daemon, check_config_text};
use crate::tls_echo;
use crate::web_config::tls::Pki;

crate::support::tests![
    every_duration_key_serves_at_its_maximum_and_refuses_beyond_it,
    a_keepalive_between_0_and_1s_is_refused,
];

/// (key, its section, its name, its maximum in seconds), as docs/hostile-traffic.md
/// states them.
const KEYS: &[(&str, &str, &str, u64)] = &[
    ("tcp.idle_timeout", "tcp", "idle_timeout", 365 * 86_400),
    (
        "tcp.max_connection_duration",
        "tcp",
        "max_connection_duration",
        365 * 86_400,
    ),
    ("tcp.keepalive", "tcp", "keepalive", 32_767),
    (
        "tcp.proxy_protocol.header_timeout",
        "tcp.proxy_protocol",
        "header_timeout",
        365 * 86_400,
    ),
    (
        "shutdown.drain_timeout",
        "shutdown",
        "drain_timeout",
        365 * 86_400,
    ),
    (
        "tls.handshake_timeout",
        "tls",
        "handshake_timeout",
        365 * 86_400,
    ),
];

fn toml(section: &str, name: &str, value: &str) -> String {
    format!("[{section}]\n{name} = {value:?}\n")
}

fn echoes(daemon: &Daemon) -> bool {
    let Ok(mut s) = TcpStream::connect(daemon.tcp) else {
        return false;
    };
    let mut back = [0u8; 4];
    s.set_read_timeout(Some(Duration::from_secs(2))).is_ok()
        && s.write_all(b"ping").is_ok()
        && s.read_exact(&mut back).is_ok()
        && &back == b"ping"
}

fn every_duration_key_serves_at_its_maximum_and_refuses_beyond_it() {
    let mut failures = Vec::new();
    for &(key, section, name, max) in KEYS {
        // At the maximum: accepted, and the daemon serves.
        let at_max = format!("{max}s");
        if section == "tls" {
            // The TLS keys need a listener with a pair: one echo over TLS.
            let pki = Pki::new();
            let tls = tls_echo::start(&pki, &format!("{name} = {at_max:?}"), "");
            let config = tls_echo::client_config(&pki.ca, None);
            let echoed = tls_echo::connect(tls.addr, &config)
                .and_then(|mut s| tls_echo::roundtrip(&mut s, b"ping"));
            if !matches!(&echoed, Ok(back) if back == b"ping") {
                failures.push(format!("{key} = {at_max:?}: no TLS echo: {echoed:?}"));
            }
        } else {
            let daemon = Daemon::start(&toml(section, name, &at_max));
            if !echoes(&daemon) {
                failures.push(format!("{key} = {at_max:?}: no echo"));
            }
        }
        // Beyond it: refused by check-config, exit 78, naming the key.
        for beyond in [
            format!("{max}s 1ns"),
            "18446744073709551615s".to_string(),
            "584542046090y".to_string(),
        ] {
            let (code, stderr) = check_config_text(&toml(section, name, &beyond));
            if code != Some(78) || !stderr.contains(key) {
                failures.push(format!("{key} = {beyond:?}: exit {code:?}, {stderr:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// `tcp.keepalive` is 0 (off) or at least one second: `TCP_KEEPIDLE` counts whole
/// seconds, and a value below one second once became the kernel's default (2 hours)
/// without a word. The edges around the floor are accepted and the daemon serves.
fn a_keepalive_between_0_and_1s_is_refused() {
    let mut failures = Vec::new();
    for below in ["1ns", "1ms", "500ms", "999ms 999us 999ns"] {
        let (code, stderr) = check_config_text(&toml("tcp", "keepalive", below));
        if code != Some(78)
            || !stderr.contains("tcp.keepalive")
            || !stderr.contains("must be 0s (off) or at least 1s")
        {
            failures.push(format!("keepalive = {below:?}: exit {code:?}, {stderr:?}"));
        }
    }
    for edge in ["0s", "1s", "1s 500ms"] {
        let (code, stderr) = check_config_text(&toml("tcp", "keepalive", edge));
        if code != Some(0) {
            failures.push(format!("keepalive = {edge:?}: exit {code:?}, {stderr:?}"));
        }
        let daemon = Daemon::start(&toml("tcp", "keepalive", edge));
        if !echoes(&daemon) {
            failures.push(format!("keepalive = {edge:?}: no echo"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
