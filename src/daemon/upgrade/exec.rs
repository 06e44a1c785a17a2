//! The exec itself: `execve` of the new binary with the handover's descriptors left
//! open and the stop signals kept pending across it, or — when it fails — every
//! descriptor closed-on-exec again, for the running image to take back.

use std::convert::Infallible;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::handover::{self, Handover};
use super::{FileId, file_id};

/// Variables an exec must not pass on: systemd's `LISTEN_*` describe descriptors of the
/// first start (the PID stays, so the new image would believe them), and the handover
/// variable is set afresh.
const NOT_PASSED_ON: [&str; 4] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", handover::ENV];
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

/// Blocks SIGHUP, SIGTERM and SIGINT in the calling thread for good: every runtime
/// thread but the main one, on which the server runs and the exec happens, so that
/// a stop can only be handled where the exec can see it.
pub(crate) fn block_stop_signals_in_this_thread() {
    std::mem::forget(StopSignals::block());
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

/// The image to become: the binary's path, the file the check ran, the command line.
pub(crate) struct Image<'a> {
    pub(crate) binary: &'a Path,
    pub(crate) argv: &'a [OsString],
    pub(crate) checked: FileId,
}

pub(crate) fn exec(
    image: Image<'_>,
    handover: &Handover,
    stop: &AtomicBool,
    reload: &AtomicBool,
) -> io::Result<Infallible> {
    let description = handover.write()?;
    let path = cstring(image.binary.as_os_str().as_bytes())?;
    let args = image
        .argv
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
    // The connections' descriptors are not close-on-exec already (see
    // `HandedConnection::fd`): only the listeners and the description are cleared here.
    let mut fds = handover.listener_fds();
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
        // Every other thread of the process blocks them from its start (see
        // `block_stop_signals_in_this_thread`), so from here on a stop stays pending and
        // crosses the exec; one that arrived before was handled here and set `stop`,
        // and then there is no exec: the stop is carried out by this image.
        let blocked = StopSignals::block();
        if reload.swap(false, Ordering::SeqCst) {
            // A reload asked for during the upgrade is for the new image: blocked
            // everywhere, this SIGHUP stays pending across the exec (or, when the exec
            // fails, reaches this image once unblocked).
            // SAFETY: kill(2) of this very process with a valid signal number.
            unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
        }
        if stop.load(Ordering::SeqCst) {
            result = Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "a stop was requested during the upgrade; stopping instead",
            ));
        } else if file_id(image.binary).ok() != Some(image.checked) {
            // Another file was renamed over the path after the check (a second
            // package upgrade, say): it was not checked, so it is not run.
            result = Err(io::Error::other(format!(
                "{} changed after its check; reload again to check the new file",
                image.binary.display()
            )));
        } else {
            // SAFETY: `path`, every argument and every environment entry are
            // NUL-terminated strings that outlive the call, and both pointer arrays end
            // with a null pointer, as execve(2) requires. On success it does not return.
            unsafe { libc::execve(path.as_ptr(), arg_ptrs.as_ptr(), env_ptrs.as_ptr()) };
            result = Err(io::Error::last_os_error());
        }
        drop(blocked);
    }
    // Still here: nothing may leak into a later child process.
    for fd in cleared {
        let _ = handover::set_cloexec(fd, true);
    }
    handover.keep_connections_from_children();
    match result {
        Err(e) => Err(e),
        Ok(()) => unreachable!("execve returned without an error"),
    }
}
