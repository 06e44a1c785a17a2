//! Shutdown as a broadcast down the listener → connection tree.
//!
//! A stop has two phases. *Drain*: listeners close at once and readiness turns false,
//! while open connections keep being echoed until their clients finish. *Cut*: after
//! `shutdown.drain_timeout` the connections still open are closed. Listeners and
//! connections hold a [`Shutdown`] and `select!` on it; nobody polls a flag.

use tokio_util::sync::CancellationToken;

/// The two-phase stop broadcast; cheap to clone, one per task.
#[derive(Clone, Debug, Default)]
pub(crate) struct Shutdown {
    drain: CancellationToken,
    cut: CancellationToken,
}

impl Shutdown {
    /// A fresh broadcast, nothing triggered.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Starts draining: listeners stop, connections may finish.
    pub(crate) fn begin_drain(&self) {
        self.drain.cancel();
    }

    /// Cuts the connections that are still open.
    pub(crate) fn cut(&self) {
        self.drain.cancel();
        self.cut.cancel();
    }

    /// True once draining has started.
    pub(crate) fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Completes when open connections must be closed (connections wait on this).
    pub(crate) async fn cutting(&self) {
        self.cut.cancelled().await;
    }

    /// A token that stops one listener on its own (a reload removing it) or with all.
    pub(crate) fn listener_token(&self) -> CancellationToken {
        self.drain.child_token()
    }
}
