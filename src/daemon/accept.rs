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

/// The accept backoff of one listener, kept between calls.
#[derive(Debug)]
pub(crate) struct Acceptor {
    backoff: Duration,
}

impl Default for Acceptor {
    fn default() -> Self {
        Self {
            backoff: FIRST_BACKOFF,
        }
    }
}

impl Acceptor {
    /// The next connection on `listener`, or `None` once `stop` fires. Errors go to
    /// `on_error` and never end the loop. Cancel-safe: dropping the future loses no
    /// connection.
    pub(crate) async fn next(
        &mut self,
        listener: &TcpListener,
        stop: &CancellationToken,
        mut on_error: impl FnMut(AcceptErrorKind, &io::Error),
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                r = listener.accept() => r,
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
                            _ = stop.cancelled() => return None,
                            _ = tokio::time::sleep(self.backoff) => {}
                        }
                        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }
}
