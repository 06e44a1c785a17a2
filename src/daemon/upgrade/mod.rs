//! In-place upgrade: on a reload (SIGHUP), when the binary on disk is no longer the one
//! running (a package replaced it), echod checks the new binary and then becomes it —
//! `execve` of the binary's path in the same process, so the PID, systemd's MainPID, the
//! cgroup and the watchdog stay — handing over every listener and open connection
//! ([`super::handover`]). Clients see a pause of a few milliseconds, never a refusal.
//!
//! The new binary must first say it can take over ([`check`]: it reads this handover's
//! version, accepts the configuration and can bind what the configuration adds); a
//! binary that does not is refused and the running one keeps serving. After a package
//! upgrade `/proc/self/exe` reads `/usr/bin/echod (deleted)`: the path is remembered at
//! start and exec'd by name, never through `/proc/self/exe`.
//!
//! The folder holds the whole upgrade: [`check`] before, [`handover`] and its [`wire`]
//! format for what crosses, [`exec`] itself, and the [`handoff`] connections give
//! themselves to.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32};

use tokio::sync::oneshot;

use crate::config::ConfigSource;

pub(crate) mod check;
mod exec;
pub(crate) mod handoff;
pub(crate) mod handover;
mod wire;

pub(crate) use exec::{block_stop_signals_in_this_thread, unblock_stop_signals};

use handover::Handover;

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
    /// The flags that load the running configuration, for the new binary's check.
    config_args: Vec<OsString>,
    /// Where that configuration comes from, loaded once more right before the exec.
    source: ConfigSource,
    /// Dropped with the upgrade: tells whoever asked for it that the server is done.
    finished: Option<oneshot::Sender<()>>,
    /// The file the check ran (device, inode): only that file is exec'd, never one
    /// renamed over the path meanwhile.
    checked: std::sync::Mutex<Option<FileId>>,
    /// The check's process (group) while it runs, 0 otherwise, -1 once abandoned (a
    /// check that has not started yet then ends as it starts).
    running_check: AtomicI32,
}

/// A file's identity: device and inode.
pub(crate) type FileId = (u64, u64);

/// The identity of the file at `path` now.
fn file_id(path: &Path) -> io::Result<FileId> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

impl Upgrade {
    /// Becoming `binary`, started with `argv` (this process's own command line), once
    /// it has checked the configuration `config_args` load.
    pub(crate) fn new(
        binary: PathBuf,
        argv: Vec<OsString>,
        config_args: Vec<OsString>,
        source: ConfigSource,
    ) -> Self {
        Self {
            binary,
            argv,
            config_args,
            source,
            finished: None,
            checked: std::sync::Mutex::default(),
            running_check: AtomicI32::new(0),
        }
    }

    /// Asks the new binary whether it can take over the listeners `description` lists
    /// (blocking: it runs the binary); `Err` says why not.
    pub(crate) fn check(&self, description: &[u8]) -> Result<(), String> {
        let before = file_id(&self.binary)
            .map_err(|e| format!("cannot read {}: {e}", self.binary.display()))?;
        check::ask(
            &self.binary,
            &self.config_args,
            description,
            &self.running_check,
        )?;
        *self.checked.lock().unwrap_or_else(|e| e.into_inner()) = Some(before);
        Ok(())
    }

    /// Ends the new binary's check, if it still runs, with everything it started: the
    /// upgrade was abandoned (a stop came first).
    pub(crate) fn abandon(&self) {
        let pid = self
            .running_check
            .swap(-1, std::sync::atomic::Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill(2) of the process group our own check leads; its waiter has
            // not reaped it (it would have cleared `running_check` first).
            unsafe { libc::kill(-pid, libc::SIGKILL) };
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
        let checked = *self.checked.lock().unwrap_or_else(|e| e.into_inner());
        let Some(checked) = checked else {
            return io::Error::other("the new binary was not checked");
        };
        // The new image loads the configuration again: an edit saved since the check
        // that no longer loads would make it exit. Loaded here, a moment before the
        // exec, such an edit refuses the upgrade instead (the window left is this
        // load and the exec, a few milliseconds; see docs/systemd.md).
        if let Err(e) = self.source.load() {
            return io::Error::other(format!(
                "the configuration changed during the upgrade and no longer loads: {e}"
            ));
        }
        let Err(e) = exec::exec(
            exec::Image {
                binary: &self.binary,
                argv: &self.argv,
                checked,
            },
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
}
