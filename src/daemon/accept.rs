//! One accept-error policy for every stream listener (TCP echo and HTTP): an error is
//! classified, reported, and — when it cannot fix itself at once (EMFILE, ENOBUFS) —
//! followed by a pause that starts at 5 ms and doubles to 1 s, so a descriptor shortage
//! costs a few wake-ups a second instead of a spinning core.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::reasons::AcceptErrorKind;

const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts from one listener until it is stopped.
pub(crate) struct Acceptor<'a> {
    listener: &'a TcpListener,
    stop: &'a CancellationToken,
    backoff: Duration,
}

impl<'a> Acceptor<'a> {
    pub(crate) fn new(listener: &'a TcpListener, stop: &'a CancellationToken) -> Self {
        Self {
            listener,
            stop,
            backoff: FIRST_BACKOFF,
        }
    }

    /// The next connection, or `None` once the listener is stopped. Errors go to
    /// `on_error` and never end the loop.
    pub(crate) async fn next(
        &mut self,
        mut on_error: impl FnMut(AcceptErrorKind, &io::Error),
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let accepted = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return None,
                r = self.listener.accept() => r,
            };
            match accepted {
                Ok(conn) => {
                    self.backoff = FIRST_BACKOFF;
                    return Some(conn);
                }
                Err(e) => {
                    let kind = AcceptErrorKind::of(&e);
                    on_error(kind, &e);
                    if kind.backs_off() {
                        tokio::select! {
                            _ = self.stop.cancelled() => return None,
                            _ = tokio::time::sleep(self.backoff) => {}
                        }
                        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }
}
