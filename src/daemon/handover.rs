//! What one image of echod hands the next across an in-place upgrade (`execve`, same
//! PID): every listening socket and every open connection, each with what the new image
//! needs to serve it as the old one did.
//!
//! The descriptors cross `execve` themselves (their `FD_CLOEXEC` cleared); their
//! description travels in a memory file (`memfd`) whose descriptor number is in the
//! environment variable `ECHOD_HANDOVER`. A memory file, not the variable itself: ten
//! thousand connections do not fit the kernel's 128 KiB limit on one variable, and a
//! connection whose client stopped reading may come with bytes echod read but could not
//! yet write back (at most `tcp.buffer_size` each), which the new image writes first.
//!
//! The description is text lines, then the pending bytes in the order of the lines:
//!
//! ```text
//! echod-handover 1
//! stopped 123456789
//! listener tcp 3 0.0.0.0:7 stored
//! listener udp 4 [::]:7 activated
//! connection 9 0.0.0.0:7 192.0.2.1:40000 0
//! connection 10 0.0.0.0:7 192.0.2.2:40001 16384
//! end
//! <16384 bytes>
//! ```
//!
//! `stopped`: when the old image stopped accepting (`CLOCK_MONOTONIC`, microseconds), so
//! the new one can tell how long the pause lasted. A listener line: kind, descriptor, configured address, then `activated` (from socket
//! activation: it serves whatever the config says) and `stored` (systemd's descriptor
//! store holds it). A connection line: descriptor, the listener it came from (its
//! metrics label), the client (from a PROXY header when one named it) and its pending
//! byte count.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use socket2::{Socket, Type};
use tracing::warn;

use super::kind::ListenerKind;

/// The environment variable naming the descriptor of the description.
pub(crate) const ENV: &str = "ECHOD_HANDOVER";

const HEADER: &str = "echod-handover 1";

/// A listening socket handed over.
#[derive(Debug)]
pub(crate) struct HandedListener {
    pub(crate) kind: ListenerKind,
    /// The configured address it serves (its key in the listener set).
    pub(crate) addr: SocketAddr,
    pub(crate) fd: OwnedFd,
    /// From socket activation.
    pub(crate) activated: bool,
    /// Held by systemd's descriptor store.
    pub(crate) stored: bool,
}

/// An open TCP echo connection handed over, at a point where it held no byte it had not
/// echoed, or with those bytes in `pending`.
#[derive(Debug)]
pub(crate) struct HandedConnection {
    pub(crate) fd: OwnedFd,
    /// The listener it was accepted on (its metrics label).
    pub(crate) label: String,
    /// The client.
    pub(crate) peer: SocketAddr,
    /// Bytes read from the client and not yet echoed: written back first.
    pub(crate) pending: Vec<u8>,
}

/// Everything handed over.
#[derive(Debug, Default)]
pub(crate) struct Handover {
    /// When the old image stopped accepting ([`monotonic_micros`]).
    pub(crate) stopped: Option<u64>,
    pub(crate) listeners: Vec<HandedListener>,
    pub(crate) connections: Vec<HandedConnection>,
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

fn invalid(what: impl Into<String>) -> HandoverError {
    HandoverError::Invalid(what.into())
}

/// A listener line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ListenerEntry {
    kind: ListenerKind,
    fd: RawFd,
    addr: SocketAddr,
    activated: bool,
    stored: bool,
}

/// A connection line and its pending bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ConnectionEntry {
    fd: RawFd,
    label: String,
    peer: SocketAddr,
    pending: Vec<u8>,
}

/// The description: what crosses `execve` besides the descriptors themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Description {
    stopped: Option<u64>,
    listeners: Vec<ListenerEntry>,
    connections: Vec<ConnectionEntry>,
}

fn kind_token(kind: ListenerKind) -> &'static str {
    match kind {
        ListenerKind::Tcp => "tcp",
        ListenerKind::Udp => "udp",
        ListenerKind::Http => "http",
        ListenerKind::Tls => "tls",
    }
}

fn encode(d: &Description) -> Vec<u8> {
    let mut text = format!("{HEADER}\n");
    if let Some(at) = d.stopped {
        text.push_str(&format!("stopped {at}\n"));
    }
    for l in &d.listeners {
        text.push_str(&format!(
            "listener {} {} {}",
            kind_token(l.kind),
            l.fd,
            l.addr
        ));
        if l.activated {
            text.push_str(" activated");
        }
        if l.stored {
            text.push_str(" stored");
        }
        text.push('\n');
    }
    for c in &d.connections {
        text.push_str(&format!(
            "connection {} {} {} {}\n",
            c.fd,
            c.label,
            c.peer,
            c.pending.len()
        ));
    }
    text.push_str("end\n");
    let mut bytes = text.into_bytes();
    for c in &d.connections {
        bytes.extend_from_slice(&c.pending);
    }
    bytes
}

/// Parses a description; every descriptor at most once, and only above stdio.
fn decode(bytes: &[u8]) -> Result<Description, HandoverError> {
    let mut d = Description::default();
    let mut fds = BTreeSet::new();
    let mut fd_of = |token: Option<&str>, line: &str| -> Result<RawFd, HandoverError> {
        let fd: RawFd = token
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| invalid(format!("no descriptor in {line:?}")))?;
        if fd < 3 || !fds.insert(fd) {
            return Err(invalid(format!("descriptor {fd} is stdio or used twice")));
        }
        Ok(fd)
    };
    let mut rest = bytes;
    let mut next_line = || -> Result<&str, HandoverError> {
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| invalid("description ends without \"end\""))?;
        let line = std::str::from_utf8(&rest[..end]).map_err(|_| invalid("a line is not UTF-8"))?;
        rest = &rest[end + 1..];
        Ok(line)
    };
    if next_line()? != HEADER {
        return Err(invalid(format!(
            "not a description of version 1 ({HEADER:?})"
        )));
    }
    let mut lengths = Vec::new();
    loop {
        let line = next_line()?;
        let mut words = line.split(' ');
        match words.next() {
            Some("end") if words.next().is_none() => break,
            Some("stopped") => {
                d.stopped = Some(
                    words
                        .next()
                        .and_then(|t| t.parse().ok())
                        .filter(|_| words.next().is_none())
                        .ok_or_else(|| invalid(format!("bad time in {line:?}")))?,
                );
            }
            Some("listener") => {
                let kind = match words.next() {
                    Some("tcp") => ListenerKind::Tcp,
                    Some("udp") => ListenerKind::Udp,
                    Some("http") => ListenerKind::Http,
                    Some("tls") => ListenerKind::Tls,
                    _ => return Err(invalid(format!("unknown listener kind in {line:?}"))),
                };
                let fd = fd_of(words.next(), line)?;
                let addr = words
                    .next()
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| invalid(format!("no address in {line:?}")))?;
                let (mut activated, mut stored) = (false, false);
                for flag in words {
                    match flag {
                        "activated" => activated = true,
                        "stored" => stored = true,
                        _ => return Err(invalid(format!("unknown flag {flag:?} in {line:?}"))),
                    }
                }
                d.listeners.push(ListenerEntry {
                    kind,
                    fd,
                    addr,
                    activated,
                    stored,
                });
            }
            Some("connection") => {
                let fd = fd_of(words.next(), line)?;
                let label = words
                    .next()
                    .filter(|l| !l.is_empty())
                    .ok_or_else(|| invalid(format!("no listener in {line:?}")))?
                    .to_string();
                let peer = words
                    .next()
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| invalid(format!("no client address in {line:?}")))?;
                let pending: usize = words
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| invalid(format!("no pending byte count in {line:?}")))?;
                if words.next().is_some() {
                    return Err(invalid(format!("trailing words in {line:?}")));
                }
                lengths.push(pending);
                d.connections.push(ConnectionEntry {
                    fd,
                    label,
                    peer,
                    pending: Vec::new(),
                });
            }
            _ => return Err(invalid(format!("unknown line {line:?}"))),
        }
    }
    let wanted: usize = lengths.iter().sum();
    if rest.len() != wanted {
        return Err(invalid(format!(
            "{} pending bytes follow the lines, which announce {wanted}",
            rest.len()
        )));
    }
    for (c, len) in d.connections.iter_mut().zip(lengths) {
        let (mine, tail) = rest.split_at(len);
        c.pending = mine.to_vec();
        rest = tail;
    }
    Ok(d)
}

impl Handover {
    /// Every descriptor that must cross `execve`.
    pub(crate) fn raw_fds(&self) -> Vec<RawFd> {
        self.listeners
            .iter()
            .map(|l| l.fd.as_raw_fd())
            .chain(self.connections.iter().map(|c| c.fd.as_raw_fd()))
            .collect()
    }

    /// Bytes the connections carry that the next image writes first.
    pub(crate) fn pending_bytes(&self) -> usize {
        self.connections.iter().map(|c| c.pending.len()).sum()
    }

    fn describe(&self) -> Description {
        Description {
            stopped: self.stopped,
            listeners: self
                .listeners
                .iter()
                .map(|l| ListenerEntry {
                    kind: l.kind,
                    fd: l.fd.as_raw_fd(),
                    addr: l.addr,
                    activated: l.activated,
                    stored: l.stored,
                })
                .collect(),
            connections: self
                .connections
                .iter()
                .map(|c| ConnectionEntry {
                    fd: c.fd.as_raw_fd(),
                    label: c.label.clone(),
                    peer: c.peer,
                    pending: c.pending.clone(),
                })
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
        file.write_all(&encode(&self.describe()))?;
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
        let mut file = unsafe { File::from_raw_fd(fd) };
        set_cloexec(fd, true)?;
        file.rewind()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        drop(file);
        let description = decode(&bytes)?;
        Self::adopt(description)
    }

    /// Takes ownership of the described descriptors after checking each is an open
    /// socket of the described type. A descriptor that is not is dropped with a warning.
    fn adopt(d: Description) -> Result<Handover, HandoverError> {
        let mut handover = Handover {
            stopped: d.stopped,
            ..Handover::default()
        };
        for l in d.listeners {
            let want = match l.kind {
                ListenerKind::Tcp | ListenerKind::Http | ListenerKind::Tls => Type::STREAM,
                ListenerKind::Udp => Type::DGRAM,
            };
            if let Some(fd) = adopt_socket(l.fd, want)? {
                handover.listeners.push(HandedListener {
                    kind: l.kind,
                    addr: l.addr,
                    fd,
                    activated: l.activated,
                    stored: l.stored,
                });
            }
        }
        for c in d.connections {
            if let Some(fd) = adopt_socket(c.fd, Type::STREAM)? {
                handover.connections.push(HandedConnection {
                    fd,
                    label: c.label,
                    peer: c.peer,
                    pending: c.pending,
                });
            }
        }
        Ok(handover)
    }
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
    use super::*;

    fn sample() -> Description {
        Description {
            stopped: Some(123_456_789),
            listeners: vec![
                ListenerEntry {
                    kind: ListenerKind::Tcp,
                    fd: 3,
                    addr: "0.0.0.0:7".parse().unwrap(),
                    activated: false,
                    stored: true,
                },
                ListenerEntry {
                    kind: ListenerKind::Udp,
                    fd: 4,
                    addr: "[::]:7".parse().unwrap(),
                    activated: true,
                    stored: false,
                },
                ListenerEntry {
                    kind: ListenerKind::Http,
                    fd: 5,
                    addr: "127.0.0.1:9107".parse().unwrap(),
                    activated: false,
                    stored: false,
                },
            ],
            connections: vec![
                ConnectionEntry {
                    fd: 9,
                    label: "0.0.0.0:7".into(),
                    peer: "192.0.2.1:40000".parse().unwrap(),
                    pending: Vec::new(),
                },
                ConnectionEntry {
                    fd: 10,
                    label: "[::]:7".into(),
                    peer: "[2001:db8::1]:40001".parse().unwrap(),
                    // Pending bytes are binary and may contain the line syntax.
                    pending: b"\nend\nconnection 11 x y 0\n\0\xff".to_vec(),
                },
                ConnectionEntry {
                    fd: 12,
                    label: "0.0.0.0:7".into(),
                    peer: "192.0.2.3:40002".parse().unwrap(),
                    pending: vec![7; 3],
                },
            ],
        }
    }

    #[test]
    fn a_description_survives_its_round_trip() {
        let d = sample();
        let bytes = encode(&d);
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.starts_with(
                "echod-handover 1\nstopped 123456789\nlistener tcp 3 0.0.0.0:7 stored\nlistener udp 4 [::]:7 activated\n\
                 listener http 5 127.0.0.1:9107\nconnection 9 0.0.0.0:7 192.0.2.1:40000 0\n"
            ),
            "{text}"
        );
        assert_eq!(decode(&bytes).unwrap(), d);
        assert_eq!(
            decode(&encode(&Description::default())).unwrap(),
            Description::default()
        );
    }

    #[test]
    fn broken_descriptions_are_refused() {
        let good = encode(&sample());
        let text = |s: &str| decode(s.as_bytes()).unwrap_err().to_string();
        assert!(text("").contains("without \"end\""));
        assert!(text("echod-handover 2\nend\n").contains("version 1"));
        assert!(text("echod-handover 1\n").contains("without \"end\""));
        assert!(text("echod-handover 1\nlistener sctp 3 0.0.0.0:7\nend\n").contains("kind"));
        assert!(text("echod-handover 1\nlistener tcp x 0.0.0.0:7\nend\n").contains("descriptor"));
        assert!(text("echod-handover 1\nlistener tcp 1 0.0.0.0:7\nend\n").contains("stdio"));
        assert!(text("echod-handover 1\nlistener tcp 3 nowhere\nend\n").contains("address"));
        assert!(text("echod-handover 1\nlistener tcp 3 0.0.0.0:7 kept\nend\n").contains("flag"));
        assert!(
            text("echod-handover 1\nlistener tcp 3 0.0.0.0:7\nconnection 3 0.0.0.0:7 192.0.2.1:1 0\nend\n")
                .contains("used twice")
        );
        assert!(
            text("echod-handover 1\nconnection 4 0.0.0.0:7 192.0.2.1:1\nend\n")
                .contains("pending byte count")
        );
        assert!(
            text("echod-handover 1\nconnection 4 0.0.0.0:7 192.0.2.1:1 0 extra\nend\n")
                .contains("trailing")
        );
        assert!(text("echod-handover 1\nsocket 4\nend\n").contains("unknown line"));
        assert!(text("echod-handover 1\nstopped soon\nend\n").contains("bad time"));
        // Pending bytes must be exactly what the lines announce.
        let mut short = good.clone();
        short.pop();
        assert!(decode(&short).unwrap_err().to_string().contains("announce"));
        let mut long = good;
        long.push(0);
        assert!(decode(&long).unwrap_err().to_string().contains("announce"));
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
                    activated: false,
                    stored: true,
                },
                HandedListener {
                    kind: ListenerKind::Tcp,
                    addr,
                    fd: udp.into(),
                    activated: false,
                    stored: false,
                },
            ],
            connections: Vec::new(),
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
        assert!(back.listeners[0].stored);
        let socket = socket2::SockRef::from(&back.listeners[0].fd);
        assert_eq!(socket.local_addr().unwrap().as_socket(), Some(addr));
    }
}
