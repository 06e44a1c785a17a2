//! In-place upgrade: on a reload (SIGHUP), when the binary on disk is no longer the one
//! running (a package replaced it), echod checks the new binary and then becomes it —
//! `execve` of the binary's path in the same process, so the PID, systemd's MainPID, the
//! cgroup and the watchdog stay — handing over every listener and open connection
//! ([`super::handover`]). Clients see a pause of a few milliseconds, never a refusal.
//!
//! The new binary must first pass `check-config` on the running configuration (exit 0
//! within [`CHECK_TIMEOUT`]); a binary that does not is refused and the running one keeps
//! serving. After a package upgrade `/proc/self/exe` reads `/usr/bin/echod (deleted)`:
//! the path is remembered at start and exec'd by name, never through `/proc/self/exe`.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::oneshot;

mod exec;
pub(crate) mod handoff;
pub(crate) mod handover;
mod wire;

pub(crate) use exec::{block_stop_signals_in_this_thread, unblock_stop_signals};

use handover::Handover;

/// How long the new binary's `check-config` may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// The binary this process runs: its path, and the file it was when the process started.
#[derive(Debug, Clone)]
pub(crate) struct Executable {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Executable {
    /// The running binary, from `/proc/self/exe`.
    pub(crate) fn current() -> io::Result<Self> {
        let link = std::fs::read_link("/proc/self/exe")?;
        let text = link.as_os_str().as_bytes();
        let path = match text.strip_suffix(b" (deleted)") {
            Some(p) => PathBuf::from(std::ffi::OsStr::from_bytes(p)),
            None => link,
        };
        let running = std::fs::metadata("/proc/self/exe")?;
        Ok(Self {
            path,
            dev: running.dev(),
            ino: running.ino(),
        })
    }

    /// The path, when another file now has it (the binary was replaced); `None` when it
    /// is still the running one, or when nothing is there any more.
    pub(crate) fn replaced(&self) -> Option<&Path> {
        let now = std::fs::metadata(&self.path).ok()?;
        (now.dev() != self.dev || now.ino() != self.ino).then_some(self.path.as_path())
    }
}

/// Runs `binary check-config` with `config_args`; `Err` says why it is refused.
pub(crate) fn check(binary: &Path, config_args: &[OsString]) -> Result<(), String> {
    let child = Command::new(binary)
        .arg("check-config")
        .args(config_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(CHECK_TIMEOUT) {
        Ok(output) => output.map_err(|e| format!("{}: {e}", binary.display()))?,
        Err(_) => {
            // SAFETY: kill(2) on our own child, not yet reaped (its waiter still waits).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            return Err(format!(
                "{} check-config did not finish within {CHECK_TIMEOUT:?}",
                binary.display()
            ));
        }
    };
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let why = stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("no message");
    Err(format!(
        "{} check-config failed ({}): {why}",
        binary.display(),
        output.status
    ))
}

/// What the signals asked for while an upgrade was under way, set outside the server:
/// `stop` by the handler of the first SIGTERM or SIGINT itself, `reload` when a SIGHUP
/// came while the upgrade was under way.
#[derive(Debug, Default)]
pub(crate) struct SignalsMeanwhile {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) reload: Arc<AtomicBool>,
}

/// A checked new binary to become, and the command line to run it with.
#[derive(Debug)]
pub struct Upgrade {
    binary: PathBuf,
    argv: Vec<OsString>,
    /// Dropped with the upgrade: tells whoever asked for it that the server is done.
    finished: Option<oneshot::Sender<()>>,
}

impl Upgrade {
    /// Becoming `binary`, started with `argv` (this process's own command line).
    pub(crate) fn new(binary: PathBuf, argv: Vec<OsString>) -> Self {
        Self {
            binary,
            argv,
            finished: None,
        }
    }

    /// The upgrade, and a receiver that completes when the server has dropped it (after
    /// an exec that failed; an exec that succeeds replaces the process).
    pub(crate) fn watched(mut self) -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        self.finished = Some(tx);
        (self, rx)
    }

    /// The new binary.
    pub(crate) fn binary(&self) -> &Path {
        &self.binary
    }

    /// Replaces this process's image by the new binary, handing `handover` to it. Returns
    /// only when that failed, with why; the caller still owns every descriptor.
    /// Refused, with the handover untouched, when `stop` (a stop signal arrived) is set
    /// once no signal can come between the check and the exec; `reload` (a SIGHUP
    /// arrived during the upgrade) becomes a SIGHUP the new image receives.
    pub(crate) fn exec(&self, handover: &Handover, signals: &SignalsMeanwhile) -> io::Error {
        let Err(e) = exec::exec(
            &self.binary,
            &self.argv,
            handover,
            &signals.stop,
            &signals.reload,
        );
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_binary_is_known_and_not_replaced() {
        let exe = Executable::current().unwrap();
        assert!(exe.path.is_absolute(), "{}", exe.path.display());
        assert_eq!(exe.replaced(), None);
        // Another file at the path counts as a new binary; no file at all does not.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echod");
        std::fs::write(&path, b"one").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let mut fake = Executable {
            path: path.clone(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        assert_eq!(fake.replaced(), None);
        std::fs::write(dir.path().join("new"), b"two").unwrap();
        std::fs::rename(dir.path().join("new"), &path).unwrap();
        assert_eq!(fake.replaced(), Some(path.as_path()));
        fake.path = dir.path().join("gone");
        assert_eq!(fake.replaced(), None);
    }

    #[test]
    fn a_binary_that_fails_its_check_is_refused_with_its_last_words() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("echod");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"$@\" >&2\necho broken >&2\nexit 3\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let err = check(&script, &["--config".into(), "/x.toml".into()]).unwrap_err();
        assert!(
            err.contains("check-config failed") && err.ends_with(": broken"),
            "{err}"
        );
        let err = check(&dir.path().join("missing"), &[]).unwrap_err();
        assert!(err.contains("cannot run"), "{err}");
        std::fs::write(
            &script,
            "#!/bin/sh\n[ \"$1\" = check-config ] && [ \"$3\" = /x.toml ]\n",
        )
        .unwrap();
        assert_eq!(
            check(&script, &["--config".into(), "/x.toml".into()]),
            Ok(())
        );
    }
}
