//! Where connections put themselves at an in-place upgrade: each echo connection,
//! interrupted at a point where it holds no byte it has not echoed (or with the bytes it
//! holds), gives its socket here, and the server collects them all for the exec — or
//! serves them again when the exec fails.

use std::sync::{Arc, Mutex};

use super::handover::HandedConnection;

/// The connections handed over so far; cheap to clone, one per connection task.
#[derive(Clone, Debug, Default)]
pub(crate) struct Handoff(Arc<Mutex<Vec<HandedConnection>>>);

impl Handoff {
    /// A connection's socket and state, for the next image.
    pub(crate) fn give(&self, connection: HandedConnection) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(connection);
    }

    /// Every connection given so far, taken out.
    pub(crate) fn take(&self) -> Vec<HandedConnection> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
