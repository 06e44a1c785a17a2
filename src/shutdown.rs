//! Shutdown and reload, as signals broadcast down the listener → connection tree.
//!
//! A stop has two phases. *Drain*: listeners close at once and readiness turns false,
//! while open connections keep being echoed until their clients finish. *Cut*: after
//! `shutdown.drain_timeout` the connections still open are closed. Listeners and
//! connections hold a [`Shutdown`] and `select!` on it; nobody polls a flag.
//!
//! [`Signals`] is the one place that owns process signals: TERM/INT start the drain,
//! HUP asks for a reload, and a second TERM/INT exits at once (from the signal handler
//! itself, so it works even if the runtime is busy).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Exit code of the immediate exit on a second stop signal.
pub const SECOND_SIGNAL_EXIT_CODE: i32 = 1;

/// The two-phase stop broadcast; cheap to clone, one per task.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    drain: CancellationToken,
    cut: CancellationToken,
}

impl Shutdown {
    /// A fresh broadcast, nothing triggered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts draining: listeners stop, connections may finish.
    pub fn begin_drain(&self) {
        self.drain.cancel();
    }

    /// Cuts the connections that are still open.
    pub fn cut(&self) {
        self.drain.cancel();
        self.cut.cancel();
    }

    /// True once draining has started.
    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Completes when open connections must be closed (connections wait on this).
    pub async fn cutting(&self) {
        self.cut.cancelled().await;
    }

    /// A token that stops one listener on its own (a reload removing it) or with all.
    pub fn listener_token(&self) -> CancellationToken {
        self.drain.child_token()
    }
}

/// What the operator asked for through a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGTERM or SIGINT: drain and exit.
    Stop(&'static str),
    /// SIGHUP: re-read the configuration.
    Reload,
}

/// The process's signal handlers.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers. Must run inside the runtime, before listeners are bound,
    /// so that a stop arriving during start-up is not lost.
    pub fn install() -> std::io::Result<Self> {
        // A second TERM/INT exits at once: the conditional handler fires only when the
        // flag is already set, and the flag is set by the first signal.
        let stopping = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register_conditional_shutdown(
                sig,
                SECOND_SIGNAL_EXIT_CODE,
                Arc::clone(&stopping),
            )?;
            signal_hook::flag::register(sig, Arc::clone(&stopping))?;
        }
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for the next request.
    pub async fn recv(&mut self) -> Request {
        tokio::select! {
            _ = self.term.recv() => Request::Stop("SIGTERM"),
            _ = self.int.recv() => Request::Stop("SIGINT"),
            _ = self.hup.recv() => Request::Reload,
        }
    }
}
