//! Deferred admission: a connection takes a place in the slot table ([`super::slots`])
//! only once its first bytes have arrived.
//!
//! A connection that has sent nothing cannot be told from a probe whose client has not
//! sent yet (curl loads its CA file between connect and ClientHello), so when attackers
//! from the probe's own address reconnect the moment they are closed, the table held
//! several such silent newcomers at once and eviction had to guess among them (34–40 of
//! 40 own-address TLS probes answered). Deferred, every connection in the table has
//! sent something by the time eviction looks at it: a probe's complete ClientHello or
//! request is read and answered at once (protected, or being served), while an
//! attacker's stalled bytes never are.
//!
//! Two layers. The kernel's `TCP_DEFER_ACCEPT` on the listener keeps a connection out of
//! the accept queue until data arrives (a silent one is handed over only after about a
//! second, when the kernel gives up deferring), so a silent flood costs no descriptor
//! of ours meanwhile. What still arrives without bytes waits here, in a [`Lobby`] of at
//! most [`MAX_WAITING`] connections holding no slot, for [`FIRST_BYTES_WITHIN`]; a
//! connection that stays silent longer, or is pushed out as the oldest by a newcomer
//! when the lobby is full, is closed and counted as `silent`.
//!
//! Each waiting connection holds a descriptor, so the lobby is sized from the
//! open-files limit ([`Budget`]): under `ulimit -n 256` a lobby of 256 took every
//! descriptor, accept failed with EMFILE, and the spares borrowed to accept a probe went
//! to the next silent connection (0–24 of 40 probes answered). A connection accepted on
//! borrowed spares that has sent nothing is closed at once, counted `silent`: spares are
//! for clients with a request.

use std::collections::BTreeMap;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Connections that wait for their first bytes, at most (each holds a descriptor and no
/// slot); a newcomer beyond pushes out the one that has waited longest. Fewer under a
/// low open-files limit ([`Budget`]).
pub(super) const MAX_WAITING: usize = 256;
/// The fraction of the open-files limit the HTTP endpoint holds at most (slots and lobby
/// together): the rest is for the echo listeners, the process's own files and a probe.
const SHARE_OF_OPEN_FILES: u64 = 4;
/// Slots and lobby places the endpoint keeps however low the limit.
const MIN_SLOTS: usize = 16;
const MIN_WAITING: usize = 8;

/// How many descriptors the HTTP endpoint may hold: `max_slots` connections being
/// served and `max_waiting` waiting for their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Budget {
    pub(super) max_slots: usize,
    pub(super) max_waiting: usize,
}

impl Budget {
    /// A quarter of `open_files` (the soft RLIMIT_NOFILE) at most, slots first (up to
    /// `max_slots`), the lobby from the rest (up to [`MAX_WAITING`]); never below
    /// [`MIN_SLOTS`] and [`MIN_WAITING`]. From 1280 open files on, the full table and lobby.
    pub(super) fn for_open_files(open_files: u64, max_slots: usize) -> Self {
        let share = usize::try_from(open_files / SHARE_OF_OPEN_FILES).unwrap_or(usize::MAX);
        let slots = (share / 2).clamp(MIN_SLOTS.min(max_slots), max_slots);
        let waiting = share.saturating_sub(slots).clamp(MIN_WAITING, MAX_WAITING);
        Self {
            max_slots: slots,
            max_waiting: waiting,
        }
    }

    /// The budget under the process's open-files limit now (the full one when it cannot
    /// be read).
    pub(super) fn of_process(max_slots: usize) -> Self {
        let mut rlim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct passed in.
        let open_files = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlim) } == 0 {
            rlim.rlim_cur
        } else {
            u64::MAX
        };
        Self::for_open_files(open_files, max_slots)
    }
}
/// A connection sends its first bytes within this time or is closed: the time it would
/// have had for its request head or TLS handshake.
pub(super) const FIRST_BYTES_WITHIN: Duration = Duration::from_secs(2);
/// `TCP_DEFER_ACCEPT`, in seconds: the kernel rounds it to SYN-ACK retransmissions (1 s
/// is one), after which a silent connection is accepted anyway.
const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// The label a connection closed before its first bytes is counted under in
/// `echod_http_connections_rejected_total`.
pub(super) const SILENT: &str = "silent";

/// Asks the kernel to accept a connection on `listener` only once its first data has
/// arrived (Linux `TCP_DEFER_ACCEPT`).
pub(super) fn defer_accept(listener: &TcpListener) -> io::Result<()> {
    let secs = DEFER_ACCEPT_SECS;
    // SAFETY: the descriptor is the listener's, open for the duration of the call, and
    // the option value is a c_int that lives across it, with its size passed.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const secs).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What a just-accepted connection has to show, without waiting.
pub(super) enum Arrived {
    /// Bytes are waiting to be read: admit it.
    Bytes,
    /// Nothing yet: it waits in the lobby.
    Nothing,
    /// The client closed (or the socket failed) before sending: drop it, uncounted.
    Gone,
}

/// Looks at the socket's receive queue without waiting (the socket is non-blocking).
pub(super) fn arrived(stream: &TcpStream) -> Arrived {
    let mut byte = [MaybeUninit::<u8>::uninit(); 1];
    match SockRef::from(stream).peek(&mut byte) {
        Ok(0) => Arrived::Gone,
        Ok(_) => Arrived::Bytes,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Arrived::Nothing,
        Err(_) => Arrived::Gone,
    }
}

/// The connections waiting for their first bytes.
pub(super) struct Lobby {
    capacity: usize,
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    next: u64,
    /// By arrival: the first is the one that has waited longest.
    queue: BTreeMap<u64, CancellationToken>,
}

/// A place in the lobby; dropping it gives the place back.
pub(super) struct Ticket {
    lobby: Arc<Lobby>,
    id: u64,
    /// Cancelled when a newcomer to a full lobby pushes this connection out.
    pub(super) pushed_out: CancellationToken,
}

impl Lobby {
    /// A lobby of `capacity` places (at least one).
    pub(super) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity: capacity.max(1),
            waiting: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a connection that has sent nothing yet; when the lobby is full, the
    /// one that has waited longest is pushed out to make room.
    pub(super) fn enter(self: &Arc<Self>) -> Ticket {
        let mut waiting = self.lock();
        while waiting.queue.len() >= self.capacity {
            match waiting.queue.pop_first() {
                Some((_, oldest)) => oldest.cancel(),
                None => break,
            }
        }
        let id = waiting.next;
        waiting.next += 1;
        let pushed_out = CancellationToken::new();
        waiting.queue.insert(id, pushed_out.clone());
        Ticket {
            lobby: Arc::clone(self),
            id,
            pushed_out,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().queue.len()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.lobby.lock().queue.remove(&self.id);
    }
}

/// How the wait in the lobby ended.
pub(super) enum Waited {
    /// Its first bytes arrived: admit it.
    Bytes,
    /// It closed without sending.
    Gone,
    /// Nothing within [`FIRST_BYTES_WITHIN`], or pushed out: close it and count it.
    Silent,
    /// The endpoint is stopping.
    Stopped,
}

/// Waits, holding `ticket`, until `stream` has bytes to read (bounded).
pub(super) async fn wait_for_bytes(
    stream: &TcpStream,
    ticket: &Ticket,
    stop: &CancellationToken,
) -> Waited {
    let mut byte = [0u8; 1];
    tokio::select! {
        peeked = tokio::time::timeout(FIRST_BYTES_WITHIN, stream.peek(&mut byte)) => match peeked {
            Ok(Ok(n)) if n > 0 => Waited::Bytes,
            Ok(_) => Waited::Gone,
            Err(_) => Waited::Silent,
        },
        _ = ticket.pushed_out.cancelled() => Waited::Silent,
        _ = stop.cancelled() => Waited::Stopped,
    }
}

#[cfg(test)]
mod tests {
    use super::{Budget, Lobby, MAX_WAITING};

    #[test]
    fn the_endpoint_holds_a_quarter_of_the_open_files_limit_at_most() {
        let budget = |n| {
            let b = Budget::for_open_files(n, 64);
            (b.max_slots, b.max_waiting)
        };
        // The red team's `ulimit -n 256`: 64 descriptors, not 64 + 256.
        assert_eq!(budget(256), (32, 32));
        assert_eq!(budget(1024), (64, 192));
        assert_eq!(budget(1280), (64, MAX_WAITING));
        assert_eq!(budget(1276), (64, 255));
        assert_eq!(budget(65_536), (64, MAX_WAITING));
        assert_eq!(budget(u64::MAX), (64, MAX_WAITING));
        // Floors under a tiny limit.
        assert_eq!(budget(64), (16, 8));
        assert_eq!(budget(0), (16, 8));
    }

    #[test]
    fn a_full_lobby_pushes_out_the_connection_that_waited_longest() {
        let lobby = Lobby::new(MAX_WAITING);
        let mut tickets: Vec<_> = (0..MAX_WAITING).map(|_| lobby.enter()).collect();
        assert!(tickets.iter().all(|t| !t.pushed_out.is_cancelled()));
        let newcomer = lobby.enter();
        assert!(tickets[0].pushed_out.is_cancelled(), "the oldest goes");
        assert_eq!(
            tickets
                .iter()
                .filter(|t| t.pushed_out.is_cancelled())
                .count(),
            1
        );
        assert!(!newcomer.pushed_out.is_cancelled());
        assert_eq!(lobby.len(), MAX_WAITING);
        // One that leaves (its bytes arrived) makes room without pushing anyone out.
        drop(tickets.remove(5));
        let _another = lobby.enter();
        assert_eq!(lobby.len(), MAX_WAITING);
        assert!(!newcomer.pushed_out.is_cancelled());
    }
}
