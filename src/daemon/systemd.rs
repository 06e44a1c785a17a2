//! systemd integration: the notify protocol, the watchdog and socket activation.
//!
//! Everything here is a no-op outside systemd (no `NOTIFY_SOCKET`, no `LISTEN_FDS`), so
//! the daemon runs the same under a terminal, a container or a service manager.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use socket2::{Socket, Type};
use tracing::{debug, info, warn};

use super::fdstore;
use super::kind::ListenerKind;
use super::listeners::BoundSocket;

/// The longest `STATUS=` sent, in bytes. `systemctl status` shows one line, and a
/// datagram has a size limit: a 300 KB reload error once made the send fail, READY=1
/// with it, so systemd never learnt the reload had ended.
const MAX_STATUS_LEN: usize = 1024;
/// The shortest interval between watchdog pings, whatever `WATCHDOG_USEC` says: one
/// microsecond would make the ping task spin (half a core measured).
const MIN_WATCHDOG_INTERVAL: Duration = Duration::from_millis(100);
/// How long a lifecycle message may wait for room when the manager's queue is full; a
/// watchdog ping does not wait (the next one follows soon).
const LIFECYCLE_PATIENCE: Duration = Duration::from_millis(100);

/// Tells systemd that every listener is bound and echod serves (`READY=1`).
pub(crate) fn ready(status: &str) {
    send("READY=1\n", Some(status), LIFECYCLE_PATIENCE);
}

/// Replaces the one-line status `systemctl status` shows.
pub(crate) fn status(status: &str) {
    send("", Some(status), LIFECYCLE_PATIENCE);
}

/// Announces a reload (`RELOADING=1` with the monotonic timestamp Type=notify-reload wants).
pub(crate) fn reloading() {
    let message = match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => format!("RELOADING=1\n{now}\n"),
        Err(_) => "RELOADING=1\n".to_string(),
    };
    send(&message, None, LIFECYCLE_PATIENCE);
}

/// Announces that shutdown started (`STOPPING=1`).
pub(crate) fn stopping(status: &str) {
    send("STOPPING=1\n", Some(status), LIFECYCLE_PATIENCE);
}

/// The interval at which to ping the watchdog (half of `WATCHDOG_USEC`), if enabled,
/// and never below [`MIN_WATCHDOG_INTERVAL`]. `WATCHDOG_USEC=0` means disabled (and a
/// zero period would panic the ping task).
pub(crate) fn watchdog_interval() -> Option<Duration> {
    let half = sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)?;
    if half < MIN_WATCHDOG_INTERVAL {
        warn!(
            asked = ?half,
            interval = ?MIN_WATCHDOG_INTERVAL,
            "WATCHDOG_USEC asks for pings more often than echod sends them; systemd may \
             find them late (set WatchdogSec= to 1s or more)"
        );
        return Some(MIN_WATCHDOG_INTERVAL);
    }
    Some(half)
}

/// A watchdog ping (`WATCHDOG=1`); it does not wait for room (the next follows soon).
pub(crate) fn alive() {
    send("WATCHDOG=1\n", None, Duration::ZERO);
}

/// `STATUS=` text cut to [`MAX_STATUS_LEN`] bytes on a character boundary (ending in
/// `…` when cut), with line breaks made spaces: a newline would end the status and
/// start a key of its own.
fn status_line(status: &str) -> Cow<'_, str> {
    let status: Cow<'_, str> = if status.contains('\n') {
        Cow::Owned(status.replace('\n', " "))
    } else {
        Cow::Borrowed(status)
    };
    if status.len() <= MAX_STATUS_LEN {
        return status;
    }
    let mut end = MAX_STATUS_LEN - '…'.len_utf8();
    while !status.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &status[..end]))
}

/// The connection to the manager's notify socket, made once: a watchdog ping or a
/// READY=1 then needs no new descriptor (so they still go out when the process is out
/// of descriptors), and the socket is non-blocking, so a manager that does not read
/// cannot block a worker thread.
static NOTIFY: Mutex<Option<UnixDatagram>> = Mutex::new(None);

/// Sends `lines` (each ending in a newline) and the status, if any, to `NOTIFY_SOCKET`,
/// waiting at most `patience` for room. If the message cannot go out with its status,
/// the lines go out alone: READY=1 matters more than the text beside it.
fn send(lines: &str, status: Option<&str>, patience: Duration) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let mut message = lines.to_string();
    if let Some(status) = status {
        message.push_str("STATUS=");
        message.push_str(&status_line(status));
        message.push('\n');
    }
    let mut result = deliver(&path, message.as_bytes(), patience);
    if result.is_err() && status.is_some() && !lines.is_empty() {
        result = deliver(&path, lines.as_bytes(), patience);
    }
    if let Err(e) = result {
        debug!(error = %e, "sd_notify failed");
    }
}

fn deliver(path: &OsStr, message: &[u8], patience: Duration) -> io::Result<()> {
    let mut socket = NOTIFY.lock().unwrap_or_else(|e| e.into_inner());
    let deadline = Instant::now() + patience;
    let mut reconnected = false;
    loop {
        let connected = match socket.as_ref() {
            Some(connected) => connected,
            None => socket.insert(connect(path)?),
        };
        match connected.send(message) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            // The manager re-executed and bound a new socket: connect again, once.
            Err(e)
                if !reconnected
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNREFUSED | libc::ENOTCONN | libc::ECONNRESET)
                    ) =>
            {
                *socket = None;
                reconnected = true;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Connects a datagram socket to `NOTIFY_SOCKET`: a path, or `@name` for an abstract
/// socket.
fn connect(path: &OsStr) -> io::Result<UnixDatagram> {
    use std::os::linux::net::SocketAddrExt;
    let socket = UnixDatagram::unbound()?;
    match path.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            socket.connect_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name)?)?
        }
        None => socket.connect(path)?,
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Sockets systemd passed at start (`LISTEN_FDS`).
#[derive(Debug, Default)]
pub(crate) struct Inherited {
    /// From socket activation: they serve whatever the config says.
    pub(crate) activated: Vec<BoundSocket>,
    /// Back from the descriptor store, each with the configured address it was bound
    /// for; adopted when the config still lists that address.
    pub(crate) stored: Vec<(SocketAddr, BoundSocket)>,
}

/// Takes the sockets systemd passed (`LISTEN_FDS`), checking each one's type, because
/// the protocol passes bare descriptors. A name echod gave a socket in the descriptor
/// store (`echod-tcp-0.0.0.0-7`, see [`fdstore`]) says what it is; other names come
/// from socket activation: a stream socket named `metrics` or `http`
/// (`FileDescriptorName=`) serves HTTP; other stream sockets TCP echo and datagram
/// sockets UDP echo. Empty when systemd passed nothing.
pub(crate) fn inherited_sockets() -> io::Result<Inherited> {
    // The variables stay set: removing them would race with the runtime's threads
    // (`remove_var` is unsafe once threads exist), and a child could not misuse them
    // anyway, because `LISTEN_PID` names this process only (an in-place upgrade execs
    // the new image without them).
    let fds: Vec<(RawFd, String)> = sd_notify::listen_fds_with_names()?.collect();
    let mut inherited = Inherited::default();
    for (fd, name) in fds {
        // SAFETY: systemd passed us ownership of this descriptor; nothing else uses it.
        let socket = unsafe { Socket::from_raw_fd(fd) };
        let ty = socket.r#type()?;
        if ty != Type::STREAM && ty != Type::DGRAM {
            warn!(fd, name, "ignoring inherited socket of unsupported type");
            continue;
        }
        let addr = socket.local_addr()?.as_socket().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inherited socket {name} (fd {fd}) is not an IP socket"),
            )
        })?;
        socket.set_nonblocking(true)?;
        let stream = ty == Type::STREAM;
        if let Some((kind, configured)) = fdstore::parse(&name) {
            let bound = match (kind, stream) {
                (ListenerKind::Tcp, true) => BoundSocket::Tcp(socket.into()),
                (ListenerKind::Http, true) => BoundSocket::Http(socket.into()),
                (ListenerKind::Udp, false) => BoundSocket::Udp(socket.into()),
                _ => {
                    warn!(
                        fd,
                        name, "a stored socket is not of the kind its name says: dropped"
                    );
                    fdstore::remove(&name);
                    continue;
                }
            };
            info!(%name, proto = kind.proto(), %addr, "using socket kept in systemd's descriptor store");
            inherited.stored.push((configured, bound));
            continue;
        }
        let bound = match (stream, name.as_str()) {
            (true, "metrics" | "http") => BoundSocket::Http(socket.into()),
            (true, _) => BoundSocket::Tcp(socket.into()),
            (false, _) => BoundSocket::Udp(socket.into()),
        };
        info!(%name, proto = bound.kind().proto(), %addr, "using socket passed by systemd");
        inherited.activated.push(bound);
    }
    Ok(inherited)
}

#[cfg(test)]
mod tests {
    use super::{MAX_STATUS_LEN, status_line};

    #[test]
    fn a_long_status_is_cut_on_a_character_boundary() {
        assert_eq!(status_line("short"), "short");
        assert_eq!(status_line("two\nlines"), "two lines");
        let exact = "x".repeat(MAX_STATUS_LEN);
        assert_eq!(status_line(&exact), exact);
        // 'é' is two bytes: a cut in the middle of one moves back to its start.
        for long in ["é".repeat(300_000), format!("x{}", "é".repeat(1000))] {
            let cut = status_line(&long);
            assert!(cut.len() <= MAX_STATUS_LEN, "{}", cut.len());
            assert!(cut.len() >= MAX_STATUS_LEN - 4, "{}", cut.len());
            assert!(cut.ends_with('…'));
        }
    }
}
