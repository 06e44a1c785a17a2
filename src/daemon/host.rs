//! The one boundary between the serving core and the process it runs in.
//!
//! The server and its listener set act on the world outside their sockets in exactly
//! three ways: they tell the service manager where they are (ready, reloading,
//! stopping, a status line, a watchdog ping), they keep listening sockets in the
//! manager's descriptor store, and an upgrade execs a new binary. Each goes through a
//! [`Host`], handed to the core like its sockets and its control channel (pingora keeps
//! its process shell apart from its services the same way). The process runs with
//! [`SystemHost`] (systemd's notify socket and descriptor store, `execve`); a library
//! user or a test with [`Detached`], which acts on nothing; unit tests with a recording
//! host, so notify order, store traffic and an exec's rollback are checked in-process.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use super::kind::ListenerKey;
use super::upgrade::handover::Handover;
use super::upgrade::{SignalsMeanwhile, Upgrade};
use super::{fdstore, systemd, verdict};

/// Where the daemon is in its life, for the service manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Notice<'a> {
    /// Every listener is bound and echod serves (also: a reload or upgrade has ended).
    Ready(&'a str),
    /// A new one-line status.
    Status(&'a str),
    /// A reload or an upgrade has begun.
    Reloading,
    /// A stop has begun.
    Stopping(&'a str),
    /// A sign of life for the watchdog.
    Alive,
    /// The outcome of a reload or an upgrade, for `echod reload` to report.
    Reloaded(Result<(), &'a str>),
}

/// The process's side of the server: every effect the core has outside its sockets.
pub(crate) trait Host: Send + Sync + 'static {
    /// Tells the service manager where the daemon is.
    fn notify(&self, notice: Notice<'_>);

    /// How often the manager wants [`Notice::Alive`]; `None` when nobody watches.
    fn watchdog_interval(&self) -> Option<Duration>;

    /// True when the manager keeps listening sockets across restarts (a descriptor
    /// store): every socket echod binds is then [kept](Host::keep_socket).
    fn keeps_sockets(&self) -> bool;

    /// Hands the listening socket `key` names to the manager's store.
    fn keep_socket(&self, key: ListenerKey, fd: BorrowedFd<'_>) -> io::Result<()>;

    /// Asks the manager to close what it keeps for `key` (a reload removed the
    /// listener).
    fn release_socket(&self, key: ListenerKey);

    /// Replaces the process image by the upgrade's binary, handing `handover` over.
    /// Returns only when that failed, with why: the caller still owns everything in
    /// `handover` and takes it back.
    fn exec(&self, upgrade: &Upgrade, handover: &Handover) -> io::Error;
}

/// Sends [`Notice::Alive`] as often as the host's watchdog asks, from a task on the
/// runtime that serves traffic: a stalled runtime stops the pings and systemd restarts
/// the service, where a separate thread would keep pinging for a wedged daemon.
pub(crate) fn spawn_watchdog(host: &Arc<dyn Host>) {
    let Some(interval) = host.watchdog_interval() else {
        return;
    };
    info!(
        interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
        "systemd watchdog enabled"
    );
    let host = Arc::clone(host);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        // After a stall, one ping, not a burst of the missed ones.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            host.notify(Notice::Alive);
        }
    });
}

/// The real process: systemd's notify protocol and descriptor store (no-ops outside
/// systemd), and `execve`.
#[derive(Debug, Default)]
pub(crate) struct SystemHost {
    /// What the signals asked for meanwhile: an exec that finds a stop does not happen.
    signals: SignalsMeanwhile,
}

impl SystemHost {
    /// The process whose signal handlers set `signals`.
    pub(crate) fn new(signals: SignalsMeanwhile) -> Self {
        Self { signals }
    }
}

impl Host for SystemHost {
    fn notify(&self, notice: Notice<'_>) {
        match notice {
            Notice::Ready(status) => systemd::ready(status),
            Notice::Status(status) => systemd::status(status),
            Notice::Reloading => systemd::reloading(),
            Notice::Stopping(status) => systemd::stopping(status),
            Notice::Alive => systemd::alive(),
            Notice::Reloaded(outcome) => verdict::record(outcome),
        }
    }

    fn watchdog_interval(&self) -> Option<Duration> {
        systemd::watchdog_interval()
    }

    fn keeps_sockets(&self) -> bool {
        fdstore::enabled()
    }

    fn keep_socket(&self, (kind, at): ListenerKey, fd: BorrowedFd<'_>) -> io::Result<()> {
        fdstore::store(&fdstore::name(kind, at), fd)
    }

    fn release_socket(&self, (kind, addr): ListenerKey) {
        fdstore::remove(&fdstore::name(kind, addr));
    }

    fn exec(&self, upgrade: &Upgrade, handover: &Handover) -> io::Error {
        upgrade.exec(handover, &self.signals)
    }
}

/// No process around the server (a library user, an in-process test): notices go
/// nowhere, no socket is kept, and an upgrade is refused, so everything is taken back.
#[derive(Debug, Default)]
pub(crate) struct Detached;

impl Host for Detached {
    fn notify(&self, _: Notice<'_>) {}

    fn watchdog_interval(&self) -> Option<Duration> {
        None
    }

    fn keeps_sockets(&self) -> bool {
        false
    }

    fn keep_socket(&self, _: ListenerKey, _: BorrowedFd<'_>) -> io::Result<()> {
        Ok(())
    }

    fn release_socket(&self, _: ListenerKey) {}

    fn exec(&self, _: &Upgrade, _: &Handover) -> io::Error {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "no process to replace: the server runs detached",
        )
    }
}

#[cfg(test)]
pub(crate) mod recording {
    //! A host that writes down what the core asked of it, for unit tests.

    use std::net::SocketAddr;
    use std::sync::Mutex;

    use super::*;
    use crate::daemon::kind::ListenerKind;

    /// One thing the core asked of the host.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Event {
        Ready(String),
        Status(String),
        Reloading,
        Stopping(String),
        Alive,
        /// A reload's outcome: the failure, if any.
        Reloaded(Option<String>),
        Keep(ListenerKind, SocketAddr),
        Release(ListenerKind, SocketAddr),
        /// An exec of this binary with this many listeners and connections.
        Exec {
            binary: std::path::PathBuf,
            listeners: usize,
            connections: usize,
        },
    }

    /// Records every call; its exec always fails (the process stays), so a test sees
    /// the rollback.
    #[derive(Debug, Default)]
    pub(crate) struct Recording {
        events: Mutex<Vec<Event>>,
        keeps_sockets: bool,
        watchdog: Option<Duration>,
    }

    impl Recording {
        /// A host with a descriptor store and, when given, a watchdog.
        pub(crate) fn with_store(watchdog: Option<Duration>) -> Self {
            Self {
                keeps_sockets: true,
                watchdog,
                ..Self::default()
            }
        }

        fn push(&self, event: Event) {
            self.events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(event);
        }

        /// Everything recorded so far.
        pub(crate) fn events(&self) -> Vec<Event> {
            self.events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        }
    }

    impl Host for Recording {
        fn notify(&self, notice: Notice<'_>) {
            self.push(match notice {
                Notice::Ready(s) => Event::Ready(s.to_string()),
                Notice::Status(s) => Event::Status(s.to_string()),
                Notice::Reloading => Event::Reloading,
                Notice::Stopping(s) => Event::Stopping(s.to_string()),
                Notice::Alive => Event::Alive,
                Notice::Reloaded(outcome) => Event::Reloaded(outcome.err().map(str::to_string)),
            });
        }

        fn watchdog_interval(&self) -> Option<Duration> {
            self.watchdog
        }

        fn keeps_sockets(&self) -> bool {
            self.keeps_sockets
        }

        fn keep_socket(&self, (kind, addr): ListenerKey, _: BorrowedFd<'_>) -> io::Result<()> {
            self.push(Event::Keep(kind, addr));
            Ok(())
        }

        fn release_socket(&self, (kind, addr): ListenerKey) {
            self.push(Event::Release(kind, addr));
        }

        fn exec(&self, upgrade: &Upgrade, handover: &Handover) -> io::Error {
            self.push(Event::Exec {
                binary: upgrade.binary().to_path_buf(),
                listeners: handover.listeners.len(),
                connections: handover.connections.len(),
            });
            io::Error::other("recorded, not executed")
        }
    }
}
