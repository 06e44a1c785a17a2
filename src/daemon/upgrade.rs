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

use std::convert::Infallible;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::handover::{self, Handover};

/// How long the new binary's `check-config` may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Variables an exec must not pass on: systemd's `LISTEN_*` describe descriptors of the
/// first start (the PID stays, so the new image would believe them), and the handover
/// variable is set afresh.
const NOT_PASSED_ON: [&str; 4] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", handover::ENV];

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

/// A checked new binary to become, and the command line to run it with.
#[derive(Debug)]
pub struct Upgrade {
    binary: PathBuf,
    argv: Vec<OsString>,
}

impl Upgrade {
    /// Becoming `binary`, started with `argv` (this process's own command line).
    pub(crate) fn new(binary: PathBuf, argv: Vec<OsString>) -> Self {
        Self { binary, argv }
    }

    /// The new binary.
    pub(crate) fn binary(&self) -> &Path {
        &self.binary
    }

    /// Replaces this process's image by the new binary, handing `handover` to it. Returns
    /// only when that failed: with the handover, for the running image to take back.
    pub(crate) fn exec(self, handover: Handover) -> (Handover, io::Error) {
        let Err(e) = exec(&self.binary, &self.argv, &handover);
        (handover, e)
    }
}

/// SIGHUP, SIGTERM and SIGINT blocked in the calling thread; the previous mask comes
/// back on drop.
struct StopSignals {
    previous: libc::sigset_t,
}

/// The signals an upgrade keeps pending across the exec.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set passed in; an
    // all-zero sigset_t is a valid value to start from.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

impl StopSignals {
    fn block() -> Self {
        let set = stop_signals();
        // SAFETY: pthread_sigmask reads `set` and writes the old mask into `previous`;
        // both are valid sigset_t values.
        unsafe {
            let mut previous: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous);
            Self { previous }
        }
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        // SAFETY: restores a mask pthread_sigmask returned.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut()) };
    }
}

/// Unblocks the signals an upgrade kept pending (see [`StopSignals`]) in the calling
/// thread, once their handlers are installed: signals that arrived during the exec are
/// delivered now. A no-op when nothing was blocked.
pub(crate) fn unblock_stop_signals() {
    let set = stop_signals();
    // SAFETY: pthread_sigmask only reads `set`.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn exec(binary: &Path, argv: &[OsString], handover: &Handover) -> io::Result<Infallible> {
    let description = handover.write()?;
    let path = cstring(binary.as_os_str().as_bytes())?;
    let args = argv
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os() {
        if NOT_PASSED_ON.iter().any(|k| key == *k) {
            continue;
        }
        let mut entry = key.into_vec();
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        env.push(cstring(&entry)?);
    }
    env.push(cstring(
        format!("{}={}", handover::ENV, description.as_raw_fd()).as_bytes(),
    )?);
    let mut fds = handover.raw_fds();
    fds.push(description.as_raw_fd());
    let arg_ptrs: Vec<*const libc::c_char> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let env_ptrs: Vec<*const libc::c_char> = env
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let mut cleared = Vec::with_capacity(fds.len());
    let mut result = Ok(());
    for &fd in &fds {
        result = handover::set_cloexec(fd, false);
        if result.is_err() {
            break;
        }
        cleared.push(fd);
    }
    if result.is_ok() {
        // A stop or reload signal arriving before the new image has installed its
        // handlers would find the default action (terminate): blocked, it stays pending
        // across the exec (the signal mask is kept) until the new image unblocks it.
        let blocked = StopSignals::block();
        // SAFETY: `path`, every argument and every environment entry are NUL-terminated
        // strings that outlive the call, and both pointer arrays end with a null
        // pointer, as execve(2) requires. On success it does not return.
        unsafe { libc::execve(path.as_ptr(), arg_ptrs.as_ptr(), env_ptrs.as_ptr()) };
        result = Err(io::Error::last_os_error());
        drop(blocked);
    }
    // Still here: nothing may leak into a later child process.
    for fd in cleared {
        let _ = handover::set_cloexec(fd, true);
    }
    match result {
        Err(e) => Err(e),
        Ok(()) => unreachable!("execve returned without an error"),
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
