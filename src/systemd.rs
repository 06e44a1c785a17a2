//! systemd integration: the notify protocol, the watchdog and socket activation.
//!
//! Everything here is a no-op outside systemd (no `NOTIFY_SOCKET`, no `LISTEN_FDS`), so
//! the daemon runs the same under a terminal, a container or a service manager.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};
use std::time::Duration;

use sd_notify::NotifyState;
use socket2::{Socket, Type};
use tracing::{debug, warn};

/// Tells systemd that every listener is bound and echod serves (`READY=1`).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Replaces the one-line status `systemctl status` shows.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Announces a reload (`RELOADING=1` with the monotonic timestamp Type=notify-reload wants).
pub fn reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Announces that shutdown started (`STOPPING=1`).
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// The interval at which to ping the watchdog (half of `WATCHDOG_USEC`), if enabled.
/// `WATCHDOG_USEC=0` means disabled (and a zero period would panic the ping task).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// Pings the watchdog; call it from the runtime that serves traffic, so that a stalled
/// runtime stops the pings and systemd restarts the service.
pub fn watchdog_ping() {
    send(&[NotifyState::Watchdog]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "sd_notify failed");
    }
}

/// A socket handed over by the service manager.
#[derive(Debug)]
pub struct InheritedSocket {
    /// `FileDescriptorName=` from the socket unit (`LISTEN_FDNAMES`), or "unknown".
    pub name: String,
    /// The local address it is bound to.
    pub addr: SocketAddr,
    /// The socket, type already checked.
    pub socket: Socket,
    /// True for a stream (TCP) socket, false for a datagram (UDP) one.
    pub stream: bool,
}

/// Takes the sockets passed by socket activation (`LISTEN_FDS`), checking each one's
/// type, because the protocol passes bare descriptors. Empty when not socket-activated.
pub fn inherited_sockets() -> io::Result<Vec<InheritedSocket>> {
    // The variables stay set: removing them would race with the runtime's threads
    // (`remove_var` is unsafe once threads exist), and a child could not misuse them
    // anyway, because `LISTEN_PID` names this process only.
    let fds: Vec<(RawFd, String)> = sd_notify::listen_fds_with_names()?.collect();
    let mut sockets = Vec::with_capacity(fds.len());
    for (fd, name) in fds {
        // SAFETY: systemd passed us ownership of this descriptor; nothing else uses it.
        let socket = unsafe { Socket::from_raw_fd(fd) };
        let ty = socket.r#type()?;
        let stream = if ty == Type::STREAM {
            true
        } else if ty == Type::DGRAM {
            false
        } else {
            warn!(fd, name, "ignoring inherited socket of unsupported type");
            continue;
        };
        let addr = socket.local_addr()?.as_socket().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inherited socket {name} (fd {fd}) is not an IP socket"),
            )
        })?;
        socket.set_nonblocking(true)?;
        sockets.push(InheritedSocket {
            name,
            addr,
            socket,
            stream,
        });
    }
    Ok(sockets)
}
