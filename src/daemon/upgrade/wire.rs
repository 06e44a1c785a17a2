//! The handover description's wire format: text lines, then the pending bytes in the
//! order of the lines. Pure functions, so every version rule is tested without a
//! descriptor in sight; [`super::handover`] pairs the entries with real descriptors.
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
//! the new one can tell how long the pause lasted. A listener line: kind, descriptor,
//! configured address, then `activated` (from socket activation: it serves whatever the
//! config says) and `stored` (systemd's descriptor store holds it). A connection line:
//! descriptor, the listener it came from (its metrics label), the client (from a PROXY
//! header when one named it) and its pending byte count.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use super::handover::{HandoverError, invalid};
use crate::daemon::kind::{ListenerKind, SocketOrigin};

pub(super) const HEADER: &str = "echod-handover 1";

/// A listener line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ListenerEntry {
    pub(super) kind: ListenerKind,
    pub(super) fd: RawFd,
    pub(super) addr: SocketAddr,
    pub(super) origin: SocketOrigin,
}

/// A connection line and its pending bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ConnectionEntry {
    pub(super) fd: RawFd,
    pub(super) label: String,
    pub(super) peer: SocketAddr,
    pub(super) pending: Vec<u8>,
}

/// The description: what crosses `execve` besides the descriptors themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Description {
    pub(super) stopped: Option<u64>,
    pub(super) listeners: Vec<ListenerEntry>,
    pub(super) connections: Vec<ConnectionEntry>,
}

pub(super) fn encode(d: &Description) -> Vec<u8> {
    let mut text = format!("{HEADER}\n");
    if let Some(at) = d.stopped {
        text.push_str(&format!("stopped {at}\n"));
    }
    for l in &d.listeners {
        text.push_str(&format!("listener {} {} {}", l.kind.token(), l.fd, l.addr));
        match l.origin {
            SocketOrigin::Activated => text.push_str(" activated"),
            SocketOrigin::Stored => text.push_str(" stored"),
            SocketOrigin::Bound => {}
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
pub(super) fn decode(bytes: &[u8]) -> Result<Description, HandoverError> {
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
                let kind = words
                    .next()
                    .and_then(ListenerKind::from_token)
                    .ok_or_else(|| invalid(format!("unknown listener kind in {line:?}")))?;
                let fd = fd_of(words.next(), line)?;
                let addr = words
                    .next()
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| invalid(format!("no address in {line:?}")))?;
                let origin = match (words.next(), words.next()) {
                    (None, _) => SocketOrigin::Bound,
                    (Some("activated"), None) => SocketOrigin::Activated,
                    (Some("stored"), None) => SocketOrigin::Stored,
                    (Some(flag), _) => {
                        return Err(invalid(format!("unknown flag {flag:?} in {line:?}")));
                    }
                };
                d.listeners.push(ListenerEntry {
                    kind,
                    fd,
                    addr,
                    origin,
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
                    origin: SocketOrigin::Stored,
                },
                ListenerEntry {
                    kind: ListenerKind::Udp,
                    fd: 4,
                    addr: "[::]:7".parse().unwrap(),
                    origin: SocketOrigin::Activated,
                },
                ListenerEntry {
                    kind: ListenerKind::Http,
                    fd: 5,
                    addr: "127.0.0.1:9107".parse().unwrap(),
                    origin: SocketOrigin::Bound,
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
}
