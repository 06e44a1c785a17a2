//! Shutdown as a broadcast down the listener → connection tree.
//!
//! A stop has two phases. *Drain*: listeners close at once and readiness turns false,
//! while open connections keep being echoed until their clients finish. *Cut*: after
//! `shutdown.drain_timeout` the connections still open are closed. Listeners and
//! connections hold a [`Shutdown`] and wait on it (echo connections through its
//! `alarms` table, which a cut rings); nobody polls a flag.
//!
//! An in-place upgrade is the third message on the same path: *handover* interrupts
//! every connection, like a cut, but each one gives its socket (and any bytes it read
//! and has not yet echoed) to the upgrade's handoff instead of closing it, for the new
//! image of the process to serve.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

use super::alarms::Alarms;

/// The stop (and handover) broadcast; cheap to clone, one per task. One pointer, so
/// that every idle connection pays for one.
#[derive(Clone, Debug, Default)]
pub(crate) struct Shutdown(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    drain: CancellationToken,
    cut: CancellationToken,
    /// Cancelled by a cut and by a handover: what the echo loop waits on.
    interrupt: CancellationToken,
    /// Set before `interrupt` is cancelled when the process hands over to a new image.
    handing_over: AtomicBool,
    /// Echo connections wait on this instead of `interrupt` (and their own timer).
    alarms: Alarms,
}

impl Shutdown {
    /// A fresh broadcast, nothing triggered.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A fresh broadcast whose alarm table is swept by a task on the current runtime,
    /// for as long as the broadcast is in use: what a server hands its connections.
    pub(crate) fn running() -> Self {
        let shutdown = Self::new();
        tokio::spawn(shutdown.keep_time());
        shutdown
    }

    /// Starts draining: listeners stop, connections may finish.
    pub(crate) fn begin_drain(&self) {
        self.0.drain.cancel();
    }

    /// Cuts the connections that are still open.
    pub(crate) fn cut(&self) {
        self.0.drain.cancel();
        self.0.cut.cancel();
        self.0.interrupt.cancel();
        self.0.alarms.interrupt();
    }

    /// True once draining has started.
    pub(crate) fn is_draining(&self) -> bool {
        self.0.drain.is_cancelled()
    }

    /// Completes when open connections must be closed.
    pub(crate) async fn cutting(&self) {
        self.0.cut.cancelled().await;
    }

    /// Completes when a connection must stop echoing: a cut, or a handover (then
    /// [`Shutdown::is_handing_over`] is true).
    pub(crate) async fn interrupted(&self) {
        self.0.interrupt.cancelled().await;
    }

    /// The deadline table of the echo connections, which a cut or a handover rings.
    pub(crate) fn alarms(&self) -> &Alarms {
        &self.0.alarms
    }

    /// Sweeps [`Shutdown::alarms`] on its tick for as long as this broadcast is in use.
    fn keep_time(&self) -> impl Future<Output = ()> + Send + 'static {
        let inner = Arc::downgrade(&self.0);
        async move {
            loop {
                let Some(tick) = inner.upgrade().map(|inner| inner.alarms.sweep()) else {
                    return;
                };
                tokio::time::sleep(tick).await;
            }
        }
    }

    /// A token that stops one listener on its own (a reload removing it) or with all.
    pub(crate) fn listener_token(&self) -> CancellationToken {
        self.0.drain.child_token()
    }

    /// Asks every connection to hand its socket over at its next point where it holds
    /// no byte it has not echoed.
    pub(crate) fn begin_handover(&self) {
        self.0.handing_over.store(true, Ordering::SeqCst);
        self.0.interrupt.cancel();
        self.0.alarms.interrupt();
    }

    /// True once a cut or a handover has begun.
    pub(crate) fn is_interrupted(&self) -> bool {
        self.0.interrupt.is_cancelled()
    }

    /// True once a handover has begun.
    pub(crate) fn is_handing_over(&self) -> bool {
        self.0.handing_over.load(Ordering::Relaxed)
    }
}
