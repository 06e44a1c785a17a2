//! Upgrades between real builds: the previous release of echod (the commit that ended
//! round 2, whose handover is `echod-handover 1`), built from this repository's history,
//! hands its connections over to the current binary; the reverse — the current echod
//! asked to become the previous one — is refused and the running image serves on.
//! The previous build is cached under `target/`, so only the first run pays for it.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{
    Chatter, Daemon, Need, Options, echod_bin, echoes_on, random_bytes, repo_path, tcp_roundtrip,
    wait_for,
};

crate::support::tests![
    the_previous_release_hands_over_to_this_one_and_not_back needs NEEDS,
];

/// The last commit of round 2: the release before the upgrade check and handover 2. One
/// source with the script that builds it.
const PREVIOUS: &str = include_str!("previous-release.commit").trim_ascii();

/// How many connections stay open across each upgrade.
const HELD: usize = 20;

fn has_previous_commit() -> bool {
    Command::new("git")
        .arg("-C")
        .arg(repo_path(""))
        .args(["cat-file", "-e", &format!("{PREVIOUS}^{{commit}}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// git and cargo to build the previous release, and the history that holds it: a
/// shallow clone does not, which no package on the machine can mend — so that one is
/// optional, ignored (and said) even where end-to-end tests are required.
const NEEDS: &[Need] = &[
    Need::Tool("git"),
    Need::Tool("cargo"),
    Need::Optional(
        "the previous release's commit in the git history (a full clone)",
        has_previous_commit,
    ),
];

/// The previous release's binary, built once by `previous-release.sh` (which CI's setup
/// runs before the tests) into a target directory of its own under `target/`.
fn previous_build() -> PathBuf {
    let target = echod_bin()
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(repo_path("tests/deployment/previous-release.sh"))
        .arg(&target)
        .stdin(Stdio::null())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "building {PREVIOUS} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "previous release {} built (or found built) in {:?}",
        &PREVIOUS[..12],
        started.elapsed()
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Puts `contents` at `bin` the way a package manager does: renamed over the old file.
fn replace(bin: &Path, contents: &[u8]) {
    let new = bin.with_extension("new");
    std::fs::write(&new, contents).unwrap();
    std::fs::set_permissions(&new, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&new, bin).unwrap();
}

fn wait_log(daemon: &Daemon, needle: &str) -> String {
    wait_for(
        Duration::from_secs(20),
        || format!("no {needle:?} in the log:\n{}", daemon.log()),
        || Some(daemon.log()).filter(|log| log.contains(needle)),
    )
}

/// The `revision` label of `echod_build_info`.
fn revision(daemon: &Daemon) -> String {
    let body = daemon.scrape();
    body.lines()
        .find(|l| l.starts_with("echod_build_info{"))
        .and_then(|l| l.split_once("revision=\""))
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(r, _)| r.to_string())
        .unwrap_or_else(|| panic!("no echod_build_info:\n{body}"))
}

fn all_echo(held: &mut [TcpStream], when: &str) {
    for (i, s) in held.iter_mut().enumerate() {
        let data = random_bytes(700, i as u64 + 1);
        assert!(
            echoes_on(s, &data, Duration::from_secs(10)),
            "held connection {i} no longer echoes {when}"
        );
    }
}

fn the_previous_release_hands_over_to_this_one_and_not_back() {
    let previous = previous_build();
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("echod");
    std::fs::copy(&previous, &bin).unwrap();
    let daemon = Daemon::start_with(Options {
        binary: Some(bin.clone()),
        ..Options::default()
    });
    let pid = daemon.pid();
    assert_eq!(revision(&daemon), &PREVIOUS[..12]);
    let mut held: Vec<TcpStream> = (0..HELD)
        .map(|_| TcpStream::connect(daemon.tcp).unwrap())
        .collect();
    all_echo(&mut held, "before the upgrade");
    let chatter = Chatter::start(daemon.tcp);
    daemon.wait_metric_at_least("echod_tcp_connections_active", &[], (HELD + 1) as f64);

    // Previous → current: the old image checks the new binary and execs it with the
    // version-1 handover, which the current binary still reads.
    replace(&bin, &std::fs::read(echod_bin()).unwrap());
    daemon.signal(libc::SIGHUP);
    let log = wait_log(&daemon, "upgrade complete");
    assert!(
        log.contains("taking over from the previous binary"),
        "{log}"
    );
    assert_eq!(daemon.pid(), pid, "not an upgrade in place");
    assert_ne!(revision(&daemon), &PREVIOUS[..12], "still the old image");
    assert_eq!(
        daemon.metric("echod_upgrades_total", &[("result", "ok")]),
        1.0
    );
    all_echo(&mut held, "after the upgrade from the previous release");
    chatter.still_echoing();
    let data = random_bytes(30_000, 3);
    assert!(tcp_roundtrip(daemon.tcp, &data, 4) == data);
    daemon.wait_metric_at_least("echod_tcp_connections_active", &[], (HELD + 1) as f64);

    // Current → previous: the previous binary does not know `upgrade-check`, so it
    // cannot say it reads this handover; refused, counted, and this image serves on.
    let current = revision(&daemon);
    let logged = daemon.log().len();
    replace(&bin, &std::fs::read(&previous).unwrap());
    daemon.signal(libc::SIGHUP);
    daemon.wait_metric_at_least("echod_config_reload_failures_total", &[], 1.0);
    assert_eq!(
        daemon.metric("echod_upgrades_total", &[("result", "refused")]),
        1.0
    );
    let log = wait_log(&daemon, "new binary refused")[logged..].to_string();
    assert!(log.contains("cannot take over in place"), "{log}");
    assert_eq!(log.matches("executing the new binary").count(), 0, "{log}");
    assert_eq!(daemon.pid(), pid);
    assert_eq!(revision(&daemon), current);
    all_echo(&mut held, "after the refused downgrade");
    chatter.still_echoing();
    assert!(chatter.finish() > 0);
}
