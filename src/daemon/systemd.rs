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
use tracing::{debug, info, warn};

use super::fdstore;
use super::listeners::{BoundSocket, ListenerKind};

/// Tells systemd that every listener is bound and echod serves (`READY=1`).
pub(crate) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Replaces the one-line status `systemctl status` shows.
pub(crate) fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Announces a reload (`RELOADING=1` with the monotonic timestamp Type=notify-reload wants).
pub(crate) fn reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Announces that shutdown started (`STOPPING=1`).
pub(crate) fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// The interval at which to ping the watchdog (half of `WATCHDOG_USEC`), if enabled.
/// `WATCHDOG_USEC=0` means disabled (and a zero period would panic the ping task).
fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// Starts pinging the watchdog when systemd asks for it. The task runs on the runtime
/// that serves traffic, so a stalled runtime stops the pings and systemd restarts the
/// service; a separate thread would keep pinging for a wedged daemon.
pub(crate) fn spawn_watchdog() {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    info!(
        interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
        "systemd watchdog enabled"
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    });
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "sd_notify failed");
    }
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
