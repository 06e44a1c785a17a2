//! Every duration key at the edges of what it accepts: the largest value accepted must
//! start a daemon that serves (one echo over TCP, with the PROXY header timeout, the
//! idle timeout, the connection duration, the keepalive and the drain all at their
//! maximum), and anything beyond — the `u64::MAX` seconds and `584542046090y` that
//! once passed `check-config` and panicked on the first connection — is refused with
//! exit 78 naming the key. Values are generated per key: the maximum, the maximum plus
//! one nanosecond, and the overflowing spellings.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::{Daemon, check_config_text};

crate::support::tests![every_duration_key_serves_at_its_maximum_and_refuses_beyond_it,];

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
        let daemon = Daemon::start(&toml(section, name, &at_max));
        if !echoes(&daemon) {
            failures.push(format!("{key} = {at_max:?}: no echo"));
        }
        drop(daemon);
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
