//! What one image of echod hands the next across an in-place upgrade (`execve`, same
//! PID): every listening socket and every open connection, each with what the new image
//! needs to serve it as the old one did.
//!
//! The descriptors cross `execve` themselves (their `FD_CLOEXEC` cleared); their
//! description ([`super::wire`]) travels in a memory file (`memfd`) whose descriptor
//! number is in the environment variable `ECHOD_HANDOVER`. A memory file, not the
//! variable itself: ten thousand connections do not fit the kernel's 128 KiB limit on one
//! variable, and a connection whose client stopped reading may come with bytes echod
//! read but could not yet write back (at most `tcp.buffer_size` each), which the new
//! image writes first.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use socket2::{Socket, Type};
use tracing::warn;

pub(crate) use super::wire::Past;
use super::wire::{self, ConnectionEntry, Description, ListenerEntry};
use crate::daemon::kind::{ListenerKind, SocketOrigin};
use crate::daemon::limits::Permit;

/// The environment variable naming the descriptor of the description.
pub(crate) const ENV: &str = "ECHOD_HANDOVER";

/// A listening socket handed over: its line in the description, with the descriptor
/// itself.
pub(crate) type HandedListener = ListenerEntry<OwnedFd>;

/// An open TCP echo connection handed over, at a point where it held no byte it had not
/// echoed, or with those bytes in `pending`.
#[derive(Debug)]
pub(crate) struct HandedConnection {
    /// Without `FD_CLOEXEC` in the image that hands it over ([`dup_for_exec`]), so the
    /// exec costs no system call per connection; close-on-exec again in the image that
    /// serves it.
    pub(crate) fd: OwnedFd,
    /// The listener it was accepted on (its metrics label).
    pub(crate) label: String,
    /// The client.
    pub(crate) peer: SocketAddr,
    /// Its pending bytes, accept time, bytes echoed and last traffic: its caps and idle
    /// timeout go on from there.
    pub(crate) past: Past,
    /// Its slot under the limits in the image that hands it over, held until the exec
    /// (the listeners accept meanwhile) or, when the exec fails, kept as it is served
    /// again; none once it has crossed an exec.
    pub(crate) slot: Option<Permit>,
}

/// Everything handed over.
#[derive(Debug, Default)]
pub(crate) struct Handover {
    /// When the old image stopped accepting ([`monotonic_micros`]).
    pub(crate) stopped: Option<u64>,
    pub(crate) listeners: Vec<HandedListener>,
    pub(crate) connections: Vec<HandedConnection>,
    /// What the metrics had counted (`name{labels}`, value), and the first image's start
    /// time, for the next image to go on from.
    pub(crate) samples: Vec<(String, f64)>,
    pub(crate) started: Option<f64>,
    /// The lines of the first of `connections` (those handed over before the pause),
    /// encoded while the listeners still accepted.
    pub(crate) early: Early,
}

/// The description's lines of the connections handed over before the pause, encoded
/// then, so that the pause writes only those of the connections accepted meanwhile.
#[derive(Debug, Default)]
pub(crate) struct Early(wire::Encoded);

impl Early {
    /// The lines of `connections`, which must come first in the handover's.
    pub(crate) fn encode(connections: &[HandedConnection]) -> Self {
        Self(wire::encode_connections(
            &connections.iter().map(entry).collect::<Vec<_>>(),
        ))
    }
}

/// A connection's line in the description.
fn entry(c: &HandedConnection) -> ConnectionEntry {
    ConnectionEntry {
        fd: c.fd.as_raw_fd(),
        label: c.label.clone(),
        peer: c.peer,
        past: c.past.clone(),
    }
}

/// `CLOCK_MONOTONIC` in microseconds: one clock for the whole system, so it means the
/// same before and after an exec.
pub(crate) fn monotonic_micros() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec passed; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000
}

/// Why a handover description was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandoverError {
    #[error("{ENV}: {0}")]
    Invalid(String),
    #[error("{ENV}: cannot read the description: {0}")]
    Io(#[from] io::Error),
}

pub(super) fn invalid(what: impl Into<String>) -> HandoverError {
    HandoverError::Invalid(what.into())
}

/// The description of `listeners` alone (kind, configured address, origin, descriptor
/// number), as the new binary's check reads it before any descriptor crosses.
pub(crate) fn describe_listeners(
    listeners: &[(ListenerKind, SocketAddr, SocketOrigin, RawFd)],
) -> Vec<u8> {
    wire::encode(
        &Description {
            listeners: listeners
                .iter()
                .map(|&(kind, addr, origin, fd)| ListenerEntry {
                    kind,
                    fd,
                    addr,
                    origin,
                })
                .collect(),
            ..Description::default()
        },
        &wire::Encoded::default(),
    )
}

impl Handover {
    /// The descriptors that are close-on-exec and must cross `execve`: the listeners'
    /// (the connections' cross as they are, see [`HandedConnection::fd`]).
    pub(crate) fn listener_fds(&self) -> Vec<RawFd> {
        self.listeners.iter().map(|l| l.fd.as_raw_fd()).collect()
    }

    /// Every connection's descriptor made close-on-exec again: the exec failed and
    /// this image serves them on.
    pub(crate) fn keep_connections_from_children(&self) {
        for c in &self.connections {
            if let Err(e) = set_cloexec(c.fd.as_raw_fd(), true) {
                warn!(peer = %c.peer, error = %e, "cannot make a connection close-on-exec");
            }
        }
    }

    /// Bytes the connections carry that the next image writes first.
    pub(crate) fn pending_bytes(&self) -> usize {
        self.connections.iter().map(|c| c.past.pending.len()).sum()
    }

    fn describe(&self) -> Description {
        Description {
            stopped: self.stopped,
            started: self.started,
            samples: self.samples.clone(),
            listeners: self
                .listeners
                .iter()
                .map(|l| l.with_fd(l.fd.as_raw_fd()))
                .collect(),
            // Those after the early ones, whose lines are encoded already.
            connections: self
                .connections
                .iter()
                .skip(self.early.0.count)
                .map(entry)
                .collect(),
        }
    }

    /// Writes the description into a new memory file (close-on-exec, like everything
    /// until the exec clears it).
    pub(crate) fn write(&self) -> io::Result<OwnedFd> {
        // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor
        // or -1; nothing else is touched.
        let fd = unsafe { libc::memfd_create(c"echod-handover".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let mut file = unsafe { File::from_raw_fd(fd) };
        file.write_all(&wire::encode(&self.describe(), &self.early.0))?;
        Ok(file.into())
    }

    /// The handover an earlier image of this process left in `ECHOD_HANDOVER`, if any.
    /// Call before any thread exists: the variable is removed from the environment.
    pub(crate) fn take_from_env() -> Option<Result<Handover, HandoverError>> {
        let value = std::env::var_os(ENV)?;
        // SAFETY: called at start-up, before the runtime or any other thread exists, so
        // nothing reads the environment concurrently.
        unsafe { std::env::remove_var(ENV) };
        Some(Self::take(&value.to_string_lossy()))
    }

    fn take(value: &str) -> Result<Handover, HandoverError> {
        let fd: RawFd = value
            .parse()
            .ok()
            .filter(|fd| *fd >= 3)
            .ok_or_else(|| invalid(format!("{value:?} is not a descriptor")))?;
        check_open(fd)?;
        // SAFETY: the previous image left this descriptor for us alone; it is open
        // (checked) and nothing else in this process knows it.
        let file = unsafe { File::from_raw_fd(fd) };
        set_cloexec(fd, true)?;
        let bytes = read_description(file)?;
        let description = wire::decode(&bytes)?;
        Self::adopt(description)
    }

    /// Takes ownership of the described descriptors after checking each is an open
    /// socket of the described type. A descriptor that is not is dropped with a warning.
    fn adopt(d: Description) -> Result<Handover, HandoverError> {
        let mut handover = Handover {
            stopped: d.stopped,
            started: d.started,
            samples: d.samples,
            ..Handover::default()
        };
        for l in d.listeners {
            let want = match l.kind {
                ListenerKind::Tcp | ListenerKind::Http | ListenerKind::Tls => Type::STREAM,
                ListenerKind::Udp => Type::DGRAM,
            };
            if let Some(fd) = adopt_socket(l.fd, want)? {
                handover.listeners.push(l.with_fd(fd));
            }
        }
        // The connections, ten thousand or more, in two system calls while nothing is
        // accepted: every descriptor is made close-on-exec at once, and one `poll`
        // tells which are open. Whether each is a stream socket is asked later, when
        // it is served ([`is_stream_socket`]), after the listeners accept again.
        let fds: Vec<RawFd> = d.connections.iter().map(|c| c.fd).collect();
        let open = open_descriptors(&fds)?;
        for (c, open) in d.connections.into_iter().zip(open) {
            if !open {
                warn!(
                    fd = c.fd,
                    "a handed-over connection's descriptor is not open: skipped"
                );
                continue;
            }
            // SAFETY: the description names this descriptor as ours alone (each at
            // most once, checked by `decode`), and it is open (`poll` said so).
            let fd = unsafe { OwnedFd::from_raw_fd(c.fd) };
            handover.connections.push(HandedConnection {
                fd,
                label: c.label,
                peer: c.peer,
                past: c.past,
                slot: None,
            });
        }
        Ok(handover)
    }
}

/// Which of `fds` are open, each made close-on-exec (nothing this image inherited goes
/// on to its children): `close_range` marks every descriptor above stdio in one call
/// (one call per descriptor on kernels before 5.11), and one `poll` answers `POLLNVAL`
/// for each that is not open.
fn open_descriptors(fds: &[RawFd]) -> Result<Vec<bool>, HandoverError> {
    if fds.is_empty() {
        return Ok(Vec::new());
    }
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing: it sets FD_CLOEXEC on
    // every open descriptor from 3 up.
    let marked = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    } == 0;
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `polled` is a valid array of its length; a zero timeout only asks.
        let rc = unsafe {
            libc::poll(
                polled.as_mut_ptr(),
                libc::nfds_t::try_from(polled.len()).unwrap_or(libc::nfds_t::MAX),
                0,
            )
        };
        if rc >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    }
    let open: Vec<bool> = polled
        .iter()
        .map(|p| p.revents & libc::POLLNVAL == 0)
        .collect();
    if !marked {
        for (&fd, _) in fds.iter().zip(&open).filter(|(_, open)| **open) {
            set_cloexec(fd, true)?;
        }
    }
    Ok(open)
}

/// Whether `fd` is a stream socket: asked of each handed-over connection as it is
/// served, after the listeners accept again.
pub(crate) fn is_stream_socket(fd: &OwnedFd) -> bool {
    socket2::SockRef::from(fd)
        .r#type()
        .is_ok_and(|ty| ty == Type::STREAM)
}

/// A duplicate of `socket` without `FD_CLOEXEC`, for an exec to hand over.
pub(crate) fn dup_for_exec(socket: &impl AsRawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD duplicates a descriptor the borrow keeps open; the new one is
    // ours alone.
    let fd = unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_DUPFD, 3) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The largest description read: ten thousand connections each carrying a full
/// 64 KiB buffer take 640 MiB (the default is 32 KiB); anything past this is not a
/// description.
const MAX_DESCRIPTION: u64 = 1 << 30;

/// Reads a description from the memory file an earlier image wrote, and from nothing
/// else: a variable set by mistake may name `/dev/zero`, a pipe or a large file, none of
/// which is read. Only memory files answer `F_GET_SEALS`; the size comes from `fstat`
/// and is all that is read.
fn read_description(mut file: File) -> Result<Vec<u8>, HandoverError> {
    // SAFETY: F_GET_SEALS only reads the descriptor's seals; any other file gives EINVAL.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) } < 0 {
        return Err(invalid(
            "the descriptor is not a memory file (memfd) written by echod; unset the \
             variable unless an upgrade in place set it",
        ));
    }
    let size = file.metadata()?.len();
    if size > MAX_DESCRIPTION {
        return Err(invalid(format!(
            "the description is {size} bytes long; at most {MAX_DESCRIPTION} are read"
        )));
    }
    file.rewind()?;
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(size).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn check_open(fd: RawFd) -> Result<(), HandoverError> {
    // SAFETY: F_GETFD only reads the descriptor's flags; an invalid one gives EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(invalid(format!(
            "descriptor {fd}: {}",
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Owns `fd` if it is an open socket of type `want`.
fn adopt_socket(fd: RawFd, want: Type) -> Result<Option<OwnedFd>, HandoverError> {
    check_open(fd)?;
    set_cloexec(fd, true)?;
    // SAFETY: the description names this descriptor as ours alone (each at most once,
    // checked by `decode`), and it is open.
    let socket = unsafe { Socket::from_raw_fd(fd) };
    match socket.r#type() {
        Ok(ty) if ty == want => Ok(Some(socket.into())),
        other => {
            warn!(
                fd,
                ?other,
                "a handed-over descriptor is not the socket described: closed"
            );
            Ok(None)
        }
    }
}

/// Sets or clears `FD_CLOEXEC` on `fd`: descriptors handed over must survive `execve`,
/// and only those.
pub(crate) fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD read and write the descriptor's flags and nothing else.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        if libc::fcntl(fd, libc::F_SETFD, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::IntoRawFd;

    use super::*;

    /// Anything but a memory file is refused unread: `/dev/zero` would never end, and
    /// a large regular file would be read whole.
    #[test]
    fn only_a_memory_file_is_read() {
        for path in ["/dev/zero", "/dev/null"] {
            let fd = std::fs::File::open(path).unwrap().into_raw_fd();
            let err = Handover::take(&fd.to_string()).unwrap_err().to_string();
            assert!(err.contains("not a memory file"), "{path}: {err}");
        }
        let mut regular = tempfile::tempfile().unwrap();
        regular.write_all(b"echod-handover 1\nend\n").unwrap();
        let err = Handover::take(&regular.into_raw_fd().to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a memory file"), "{err}");
    }

    #[test]
    fn descriptors_are_checked_before_they_are_owned() {
        // An fd number nothing has open is refused rather than owned.
        assert!(Handover::take("987654").is_err());
        assert!(Handover::take("2").is_err());
        assert!(Handover::take("x").is_err());
        // A description round trip through a real memfd with a real socket: the socket
        // comes back, a descriptor of the wrong type is dropped.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let handover = Handover {
            stopped: Some(monotonic_micros()),
            listeners: vec![
                HandedListener {
                    kind: ListenerKind::Tcp,
                    addr,
                    fd: listener.into(),
                    origin: SocketOrigin::Stored,
                },
                HandedListener {
                    kind: ListenerKind::Tcp,
                    addr,
                    fd: udp.into(),
                    origin: SocketOrigin::Bound,
                },
            ],
            ..Handover::default()
        };
        let memfd = handover.write().unwrap();
        // Hand the descriptors over as an exec would: forget our ownership.
        let raw = memfd.as_raw_fd();
        std::mem::forget(memfd);
        for l in handover.listeners {
            std::mem::forget(l.fd);
        }
        let back = Handover::take(&raw.to_string()).unwrap();
        assert_eq!(
            back.listeners.len(),
            1,
            "the UDP socket described as TCP is dropped"
        );
        assert_eq!(back.listeners[0].origin, SocketOrigin::Stored);
        let socket = socket2::SockRef::from(&back.listeners[0].fd);
        assert_eq!(socket.local_addr().unwrap().as_socket(), Some(addr));
    }
}
