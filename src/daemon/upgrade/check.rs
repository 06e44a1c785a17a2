//! Both sides of the check before an exec. The running image asks the new binary
//! `echod upgrade-check` — with the configuration it will load and the description of
//! the listeners it will be handed on stdin — whether it can take over: the new binary
//! must read this description's version (an older or foreign binary cannot, and has no
//! such command), must accept the configuration, and must be able to bind every
//! listener the configuration adds. Only then is it exec'd; otherwise the running
//! image keeps serving and says why.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use super::wire;
use crate::config::Config;
use crate::daemon::listeners;

/// How long the new binary's check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The running image's side: runs `binary upgrade-check` with `config_args` and the
/// listener `description` on stdin; `Err` says why the binary is refused.
pub(crate) fn ask(
    binary: &Path,
    config_args: &[OsString],
    description: &[u8],
    running: &AtomicI32,
) -> Result<(), String> {
    // In a process group of its own, so a timeout kills whatever it started too, and
    // its pipes close and its waiter reaps it (no zombie, no orphan).
    let mut child = Command::new(binary)
        .process_group(0)
        .arg("upgrade-check")
        .args(config_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A binary that exits without reading closes the pipe: its exit says why.
        let _ = stdin.write_all(description);
    }
    let pid = child.id();
    // -1: the upgrade was abandoned before the check started; it is ended at once.
    if running
        .compare_exchange(0, pid as i32, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // SAFETY: kill(2) of the process group our own child leads, not yet reaped.
        unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = rx.recv_timeout(CHECK_TIMEOUT);
    let _ = running.compare_exchange(pid as i32, 0, Ordering::SeqCst, Ordering::SeqCst);
    let output = match output {
        Ok(output) => output.map_err(|e| format!("{}: {e}", binary.display()))?,
        Err(_) => {
            // SAFETY: kill(2) of the process group our own child leads; the child is not
            // yet reaped (its waiter still waits), so the group ID is still ours.
            unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
            return Err(format!(
                "{} upgrade-check did not finish within {CHECK_TIMEOUT:?}",
                binary.display()
            ));
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.success() && stdout.lines().any(|l| l == wire::HEADER) {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() || stderr.contains("unrecognized subcommand") {
        return Err(format!(
            "{} cannot take over in place (it does not read \"{}\": an older or foreign \
             binary); restart the service to run it",
            binary.display(),
            wire::HEADER
        ));
    }
    let why = stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("no message");
    Err(format!(
        "{} upgrade-check failed ({}): {why}",
        binary.display(),
        output.status
    ))
}

/// The new binary's side (`echod upgrade-check`): reads `description`, then binds (and
/// closes) every listener `config` asks for that the description does not hand over.
/// Returns the description versions this binary reads, one a line.
pub fn answer(config: &Config, description: &[u8]) -> Result<String, String> {
    let handed = wire::decode(description).map_err(|e| e.to_string())?;
    let present: Vec<_> = handed
        .listeners
        .iter()
        .map(|l| (l.kind, l.addr, l.origin))
        .collect();
    listeners::dry_run(config, &present).map_err(|e| e.to_string())?;
    Ok(wire::READS.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, body: &str) -> std::path::PathBuf {
        let path = dir.join("echod");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        path
    }

    #[test]
    fn a_binary_is_asked_and_refused_with_its_last_words() {
        let dir = tempfile::tempdir().unwrap();
        let args = ["--config".into(), "/x.toml".into()];
        let bin = script(dir.path(), "echo \"$@\" >&2\necho broken >&2\nexit 3");
        let err = ask(&bin, &args, b"", &AtomicI32::new(0)).unwrap_err();
        assert!(
            err.contains("upgrade-check failed") && err.ends_with(": broken"),
            "{err}"
        );
        let err = ask(&dir.path().join("missing"), &[], b"", &AtomicI32::new(0)).unwrap_err();
        assert!(err.contains("cannot run"), "{err}");
        // An older echod has no such command (clap says so, exit 2).
        let bin = script(
            dir.path(),
            "echo \"error: unrecognized subcommand 'upgrade-check'\" >&2\nexit 2",
        );
        let err = ask(&bin, &args, b"", &AtomicI32::new(0)).unwrap_err();
        assert!(err.contains("cannot take over in place"), "{err}");
        // One that succeeds without naming the version is not trusted either.
        let bin = script(dir.path(), "cat >/dev/null");
        assert!(
            ask(&bin, &args, b"", &AtomicI32::new(0))
                .unwrap_err()
                .contains("cannot take over")
        );
        // The arguments and the description reach it; its version line is the answer.
        let bin = script(
            dir.path(),
            &format!(
                "[ \"$1\" = upgrade-check ] && [ \"$3\" = /x.toml ] && grep -q '^end$' && echo '{}'",
                wire::HEADER
            ),
        );
        assert_eq!(
            ask(&bin, &args, b"echod-handover 1\nend\n", &AtomicI32::new(0)),
            Ok(())
        );
    }

    #[test]
    fn the_answer_binds_only_what_is_not_handed_over() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let mut config = Config::default();
        config.tcp.listen = vec![addr];
        config.udp.listen = Vec::new();
        config.metrics.listen = Vec::new();
        // Not handed over: the address is busy (held above), so the check fails.
        let empty = b"echod-handover 1\nend\n";
        let err = answer(&config, empty).unwrap_err();
        assert!(err.contains("already uses this port"), "{err}");
        // Handed over: nothing to bind, and the version comes back.
        let described = format!("echod-handover 1\nlistener tcp 3 {addr}\nend\n");
        assert_eq!(
            answer(&config, described.as_bytes()),
            Ok(wire::READS.to_string())
        );
        assert!(answer(&config, b"echod-handover 9\nend\n").is_err());
    }
}
