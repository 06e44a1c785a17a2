//! One accept-error policy for every stream listener (TCP echo and HTTP): an error is
//! classified, reported, and — when it cannot fix itself at once (EMFILE, ENOBUFS) —
//! followed by a pause that starts at 5 ms and doubles to 1 s, so a descriptor shortage
//! costs a few wake-ups a second instead of a spinning core.
//!
//! Running out of descriptors gets more than a pause: the process keeps a small
//! [`Reserve`] of spare descriptors (open on `/dev/null`) that echo connections never
//! get. When accept fails with EMFILE or ENFILE, the echo listener spends one spare to
//! accept the waiting client and close it at once (it sees EOF instead of waiting
//! silently in the accept queue), and the HTTP endpoint borrows spares to serve its
//! probe and the files a scrape reads, so `/healthz` and `/metrics` keep answering
//! while the echo port is saturated. The classic "reserve descriptor" trick.

use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::reasons::AcceptErrorKind;

const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Spare descriptors held back from echo connections.
const SPARE_FDS: usize = 10;
/// Spares an HTTP connection accepted during exhaustion borrows: one for its socket, one
/// for the `/proc` files a scrape reads.
const HTTP_LOAN: usize = 2;
/// Spares an HTTP loan leaves behind, so the echo listener can still shed clients.
const KEEP_FOR_SHEDDING: usize = 2;

/// The spare descriptors, shared by every listener of the process.
struct Reserve {
    held: Vec<OwnedFd>,
    /// Spares closed on purpose for HTTP connections that are still open.
    lent: usize,
    /// How many spares to keep: [`SPARE_FDS`], or fewer when the process could not get
    /// them at start (a tiny open-files limit, no `/dev/null`): a reserve that can never
    /// be complete would refuse every echo connection.
    target: usize,
}

static RESERVE: Mutex<Reserve> = Mutex::new(Reserve {
    held: Vec::new(),
    lent: 0,
    target: SPARE_FDS,
});
/// Set while the reserve is not complete (lent out, or not reopened yet), so an echo
/// accept learns with one atomic load that it must not keep its descriptor.
static SHORT: AtomicBool = AtomicBool::new(true);

impl Reserve {
    fn lock() -> std::sync::MutexGuard<'static, Reserve> {
        RESERVE.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fills the reserve when a listener starts; what cannot be had now (nothing is
    /// lent out, so the shortage is the process's own) is given up for good.
    fn fill(&mut self) {
        if self.refill() || self.lent > 0 {
            return;
        }
        warn!(
            spares = self.held.len(),
            wanted = self.target,
            "cannot open spare descriptors on /dev/null; probes may fail while the \
             process is out of descriptors"
        );
        self.target = self.held.len();
        self.refill();
    }

    /// Reopens spares up to the target; true when the reserve is complete (none lent,
    /// none missing).
    fn refill(&mut self) -> bool {
        while self.held.len() + self.lent < self.target {
            match File::open("/dev/null") {
                Ok(file) => self.held.push(file.into()),
                Err(_) => break,
            }
        }
        let complete = self.lent == 0 && self.held.len() >= self.target;
        SHORT.store(!complete, Ordering::Release);
        complete
    }

    /// Closes `n` spares (keeping `keep` back); false when there are not enough.
    fn release(&mut self, n: usize, keep: usize) -> bool {
        if self.held.len() < n + keep {
            return false;
        }
        self.held.truncate(self.held.len() - n);
        SHORT.store(true, Ordering::Release);
        true
    }
}

/// Spares borrowed by one HTTP connection, reopened when it closes.
#[derive(Debug)]
pub(crate) struct Loan(usize);

impl Drop for Loan {
    fn drop(&mut self) {
        let mut reserve = Reserve::lock();
        reserve.lent -= self.0;
        reserve.refill();
    }
}

/// Accepts one waiting connection without waiting: `None` when nobody is waiting.
///
/// Goes through tokio's own accept, polled once, so that an empty queue clears the
/// listener's readiness: Linux reports EMFILE before it looks at the queue, so after
/// an EMFILE the listener still looks ready, and only a WouldBlock seen by tokio lets
/// the next accept wait instead of spinning.
fn accept_once(listener: &TcpListener) -> Option<io::Result<(TcpStream, SocketAddr)>> {
    let mut cx = Context::from_waker(Waker::noop());
    match std::pin::pin!(listener.accept()).poll(&mut cx) {
        Poll::Ready(result) => Some(result),
        Poll::Pending => None,
    }
}

/// What the listener does when the process is out of descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnExhaustion {
    /// Spend a spare to accept the waiting client and close it at once (echo).
    Shed,
    /// Borrow spares to serve the waiting client (HTTP).
    Borrow,
}

/// The accept state of one listener, kept between calls: its backoff. The listener
/// and its stop token are passed to each call, so a caller can wait on other things
/// (a reload) beside an accept and lose nothing: every call is cancel-safe.
#[derive(Debug)]
pub(crate) struct Acceptor {
    backoff: Duration,
}

impl Acceptor {
    /// Also fills the process's spare descriptors, once a listener exists to use them.
    pub(crate) fn new() -> Self {
        Reserve::lock().fill();
        Self {
            backoff: FIRST_BACKOFF,
        }
    }

    /// The next echo connection, or `None` once `stop` fires. Errors go to `on_error`
    /// and never end the loop; a client met while descriptors are exhausted is closed
    /// at once (and reported as an EMFILE error).
    pub(crate) async fn next(
        &mut self,
        listener: &TcpListener,
        stop: &CancellationToken,
        on_error: impl FnMut(AcceptErrorKind, &io::Error),
    ) -> Option<(TcpStream, SocketAddr)> {
        self.accept(listener, stop, OnExhaustion::Shed, on_error)
            .await
            .map(|(stream, peer, _)| (stream, peer))
    }

    /// The next HTTP connection, with the spares it borrowed when it could only be
    /// accepted with them (keep the loan as long as the connection).
    pub(crate) async fn next_borrowing(
        &mut self,
        listener: &TcpListener,
        stop: &CancellationToken,
        on_error: impl FnMut(AcceptErrorKind, &io::Error),
    ) -> Option<(TcpStream, SocketAddr, Option<Loan>)> {
        self.accept(listener, stop, OnExhaustion::Borrow, on_error)
            .await
    }

    async fn accept(
        &mut self,
        listener: &TcpListener,
        stop: &CancellationToken,
        exhausted: OnExhaustion,
        mut on_error: impl FnMut(AcceptErrorKind, &io::Error),
    ) -> Option<(TcpStream, SocketAddr, Option<Loan>)> {
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    self.backoff = FIRST_BACKOFF;
                    if exhausted == OnExhaustion::Shed
                        && SHORT.load(Ordering::Acquire)
                        && !Reserve::lock().refill()
                    {
                        // This descriptor belongs to the reserve: the client is closed.
                        close_at_once(stream);
                        on_error(AcceptErrorKind::FdLimit, &fd_limit());
                        continue;
                    }
                    return Some((stream, peer, None));
                }
                Err(e) => {
                    let kind = AcceptErrorKind::of(&e);
                    if kind == AcceptErrorKind::FdLimit {
                        match exhausted {
                            OnExhaustion::Shed => match shed(listener) {
                                Some(true) => {
                                    on_error(kind, &e);
                                    continue;
                                }
                                // Nobody was waiting: nothing was refused.
                                Some(false) => continue,
                                None => {}
                            },
                            OnExhaustion::Borrow => match borrow(listener) {
                                Some(Some(accepted)) => return Some(accepted),
                                Some(None) => continue,
                                None => {}
                            },
                        }
                    }
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

/// Spends a spare to accept one waiting client and close it at once: whether a
/// client was closed, or `None` when no spare was left (then pause).
fn shed(listener: &TcpListener) -> Option<bool> {
    let mut reserve = Reserve::lock();
    if !reserve.release(1, 0) {
        return None;
    }
    let shed = match accept_once(listener) {
        // Closing the client frees the descriptor the spare is reopened on.
        Some(Ok((stream, _))) => {
            close_at_once(stream);
            Some(true)
        }
        Some(Err(_)) => None,
        None => Some(false),
    };
    reserve.refill();
    shed
}

/// Borrows spares to accept one waiting client: the connection and its loan,
/// `Some(None)` when nobody was waiting, `None` when there are too few spares.
#[allow(clippy::option_option)]
fn borrow(listener: &TcpListener) -> Option<Option<(TcpStream, SocketAddr, Option<Loan>)>> {
    let mut reserve = Reserve::lock();
    if !reserve.release(HTTP_LOAN, KEEP_FOR_SHEDDING) {
        return None;
    }
    reserve.lent += HTTP_LOAN;
    // Accepting under the lock: an echo accept cannot slip in between.
    let accepted = accept_once(listener);
    drop(reserve);
    // Made after the lock is released: if no client was taken, dropping it here
    // reopens the spares at once.
    let loan = Loan(HTTP_LOAN);
    match accepted {
        Some(Ok((stream, peer))) => Some(Some((stream, peer, Some(loan)))),
        Some(Err(_)) => None,
        None => Some(None),
    }
}

/// Closes a client turned away for lack of descriptors so that it sees EOF, without
/// waiting: what it already sent is read and thrown away, and the write side is shut
/// before the close, because closing a socket with unread input sends a reset.
pub(crate) fn close_at_once(stream: TcpStream) {
    let socket = SockRef::from(&stream);
    let discard = || {
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        // Bounded: a client that keeps sending is reset; it will have had its EOF.
        for _ in 0..16 {
            if !matches!(socket.recv(&mut buf), Ok(n) if n > 0) {
                break;
            }
        }
    };
    discard();
    let _ = socket.shutdown(Shutdown::Write);
    discard();
}

fn fd_limit() -> io::Error {
    io::Error::from_raw_os_error(libc::EMFILE)
}
