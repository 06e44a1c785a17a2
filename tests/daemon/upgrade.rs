//! Upgrade in place outside systemd (a plain process, as in a container): when the binary
//! on disk has been replaced, SIGHUP makes echod exec the new one in the same process,
//! handing over its listeners and open connections; a new binary that fails its
//! `check-config` is refused and the running one keeps serving.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{Chatter, Daemon, Options, StalledClient, echod_bin, udp_echo};

use crate::support::wait_for_log;

crate::support::tests![
    sighup_after_the_binary_was_replaced_hands_everything_over,
    a_new_binary_that_fails_its_check_is_refused,
];

/// A copy of echod in a directory of its own, which a test can replace.
pub(crate) fn own_copy(dir: &Path) -> PathBuf {
    let bin = dir.join("echod");
    std::fs::copy(echod_bin(), &bin).unwrap();
    bin
}

/// Replaces `bin` the way a package manager does: a new file renamed over the old one.
pub(crate) fn replace(bin: &Path, contents: &[u8]) {
    let new = bin.with_extension("new");
    std::fs::write(&new, contents).unwrap();
    std::fs::set_permissions(&new, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&new, bin).unwrap();
}

/// The `key=N` value of the first log line containing `line`.
fn logged_number(log: &str, line: &str, key: &str) -> u64 {
    let l = log
        .lines()
        .find(|l| l.contains(line))
        .unwrap_or_else(|| panic!("no {line:?} in:\n{log}"));
    l.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {l:?}"))
}

fn sighup_after_the_binary_was_replaced_hands_everything_over() {
    let dir = tempfile::tempdir().unwrap();
    let bin = own_copy(dir.path());
    let mut daemon = Daemon::start_with(Options {
        binary: Some(bin.clone()),
        ..Options::default()
    });
    let pid = daemon.pid();
    let chatter = Chatter::start(daemon.tcp);
    let mut stalled = StalledClient::start(daemon.tcp, 7);
    assert!(
        stalled.sent() > 64 * 1024,
        "the stalled client filled no buffer"
    );
    daemon.wait_metric("echod_tcp_connections_active", &[], 2.0);
    chatter.still_echoing();

    replace(&bin, &std::fs::read(echod_bin()).unwrap());
    daemon.signal(libc::SIGHUP);
    let log = wait_for_log(&daemon, "serving the connections handed over");
    // Same process, a new image: it took over both connections, the stalled one with the
    // burst echod had read and could not write back yet.
    assert!(daemon.child.0.try_wait().unwrap().is_none(), "echod exited");
    assert_eq!(daemon.pid(), pid);
    assert!(
        log.contains("taking over from the previous binary"),
        "{log}"
    );
    assert_eq!(
        logged_number(&log, "executing the new binary", "connections"),
        2
    );
    assert!(logged_number(&log, "executing the new binary", "pending_bytes") > 0);
    assert_eq!(
        logged_number(&log, "executing the new binary", "listeners"),
        3
    );
    // The new image serves: a fresh /readyz, the held connection, new connections, UDP.
    wait_for_log(&daemon, "echod ready");
    daemon.wait_metric("echod_ready", &[], 1.0);
    daemon.wait_metric("echod_tcp_connections_active", &[], 2.0);
    chatter.still_echoing();
    let data = crate::support::random_bytes(100_000, 3);
    assert!(crate::support::tcp_roundtrip(daemon.tcp, &data, 4) == data);
    assert_eq!(
        udp_echo(daemon.udp, b"after", Duration::from_secs(5)).as_deref(),
        Some(&b"after"[..])
    );
    // The client that stopped reading is still held to one buffer: the new image does
    // not read from it while it cannot write back.
    let more = stalled.more_taken(Duration::from_millis(300));
    assert!(
        more <= 64 * 1024,
        "the stalled connection took {more} more bytes after the handover"
    );
    stalled.finish();
    assert!(chatter.finish() > 0);
    // And the new image stops as the old one did.
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(15)).success());
    assert!(daemon.log().contains("shutdown complete"));
}

fn a_new_binary_that_fails_its_check_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bin = own_copy(dir.path());
    let daemon = Daemon::start_with(Options {
        binary: Some(bin.clone()),
        ..Options::default()
    });
    let pid = daemon.pid();
    let chatter = Chatter::start(daemon.tcp);
    replace(&bin, b"#!/bin/sh\necho 'this is not echod' >&2\nexit 1\n");
    daemon.signal(libc::SIGHUP);
    daemon.wait_metric("echod_config_reload_failures_total", &[], 1.0);
    let log = wait_for_log(&daemon, "new binary refused");
    assert!(log.contains("this is not echod"), "{log}");
    assert_eq!(
        daemon.metric("echod_config_last_reload_successful", &[]),
        0.0
    );
    assert_eq!(daemon.pid(), pid);
    chatter.still_echoing();
    assert!(chatter.finish() > 0);
}
