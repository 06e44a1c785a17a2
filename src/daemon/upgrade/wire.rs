//! The handover description's wire format: text lines, then the pending bytes in the
//! order of the lines. Pure functions, so every version rule is tested without a
//! descriptor in sight; [`super::handover`] pairs the entries with real descriptors.
//!
//! ```text
//! echod-handover 3
//! stopped 123456789
//! started 1765000000.25
//! sample echod_tcp_connections_accepted_total{listener="0.0.0.0:7"} 12
//! listener tcp 3 0.0.0.0:7 stored
//! listener udp 4 [::]:7 activated
//! connection 9 0.0.0.0:7 192.0.2.1:40000 0 123000000 5 123400000
//! connection 10 0.0.0.0:7 192.0.2.2:40001 16384 123100000 0 123450000
//! end
//! <16384 bytes>
//! ```
//!
//! `stopped`: when the old image stopped accepting (`CLOCK_MONOTONIC`, microseconds), so
//! the new one can tell how long the pause lasted. A listener line: kind, descriptor,
//! configured address, then `activated` (from socket activation: it serves whatever the
//! config says) and `stored` (systemd's descriptor store holds it). A connection line:
//! descriptor, the listener it came from (its metrics label), the client (from a PROXY
//! header when one named it), its pending byte count, when it was accepted, the bytes
//! echoed on it, and when it last moved a byte (both times on `stopped`'s clock).
//!
//! Every version writes the listeners before the connections, and the connections'
//! lines of those handed over early may be encoded before the pause
//! ([`encode_connections`]), so that only the rest is written while nothing is accepted.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::str::{FromStr, Split};

use super::handover::{HandoverError, invalid};
use crate::daemon::kind::{ListenerKind, SocketOrigin};

/// The version this image writes; every version it reads is in [`READS`].
pub(super) const HEADER: &str = "echod-handover 3";

/// Version 2 has six words after `connection` (no last traffic); still read.
const HEADER_V2: &str = "echod-handover 2";

/// Version 1 (the first release with upgrades in place) has no `started`/`sample`
/// lines and four words after `connection`; it is still read, so that release can
/// upgrade to this one.
const HEADER_V1: &str = "echod-handover 1";

/// The versions this image reads, one a line: its answer to `upgrade-check`.
pub(super) const READS: &str = "echod-handover 1\nechod-handover 2\nechod-handover 3\n";

/// A listener line: on the wire its descriptor is a number (`Fd` is `RawFd`); handed
/// over, the descriptor itself ([`super::handover::HandedListener`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListenerEntry<Fd = RawFd> {
    pub(crate) kind: ListenerKind,
    pub(crate) fd: Fd,
    /// The configured address it serves (its key in the listener set).
    pub(crate) addr: SocketAddr,
    /// Where it came from (socket activation, systemd's descriptor store, a bind).
    pub(crate) origin: SocketOrigin,
}

impl<Fd> ListenerEntry<Fd> {
    /// The same listener with its descriptor in another form.
    pub(super) fn with_fd<T>(&self, fd: T) -> ListenerEntry<T> {
        ListenerEntry {
            kind: self.kind,
            fd,
            addr: self.addr,
            origin: self.origin,
        }
    }
}

/// What a connection brings from the image that hands it over besides its socket:
/// described on its line, served from it by the next image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Past {
    /// Bytes it had read and not yet echoed: written back first.
    pub(crate) pending: Vec<u8>,
    /// When it was accepted (`CLOCK_MONOTONIC`, microseconds) and the bytes echoed on it
    /// so far: its caps go on from there (version 2; zero, that is now, from version 1).
    pub(crate) accepted: u64,
    pub(crate) echoed: u64,
    /// When it last moved a byte (`CLOCK_MONOTONIC`, microseconds): its idle timeout
    /// goes on from there (version 3; zero, that is now, from earlier versions).
    pub(crate) last_traffic: u64,
}

/// A connection line and its pending bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ConnectionEntry {
    pub(super) fd: RawFd,
    pub(super) label: String,
    pub(super) peer: SocketAddr,
    pub(super) past: Past,
}

/// Connection lines encoded ahead of the rest of a description (see [`encode`]), with
/// their pending bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Encoded {
    /// How many connections the lines describe.
    pub(super) count: usize,
    pub(super) lines: String,
    pub(super) pending: Vec<u8>,
}

/// The lines (and pending bytes) of `connections`, for [`encode`] to put before the
/// description's own connections.
pub(super) fn encode_connections(connections: &[ConnectionEntry]) -> Encoded {
    use std::fmt::Write as _;
    let mut lines = String::with_capacity(64 * connections.len());
    let mut pending = Vec::new();
    for c in connections {
        let _ = writeln!(
            lines,
            "connection {} {} {} {} {} {} {}",
            c.fd,
            c.label,
            c.peer,
            c.past.pending.len(),
            c.past.accepted,
            c.past.echoed,
            c.past.last_traffic
        );
        pending.extend_from_slice(&c.past.pending);
    }
    Encoded {
        count: connections.len(),
        lines,
        pending,
    }
}

/// The description: what crosses `execve` besides the descriptors themselves.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Description {
    pub(super) stopped: Option<u64>,
    /// The first image's start time (seconds since the Unix epoch).
    pub(super) started: Option<f64>,
    /// Counter and histogram samples (`name{labels}`, value) the next image adds to.
    pub(super) samples: Vec<(String, f64)>,
    pub(super) listeners: Vec<ListenerEntry>,
    pub(super) connections: Vec<ConnectionEntry>,
}

/// The description `d`, its connections preceded by those `early` describes (encoded
/// before the pause, while the listeners still accepted).
pub(super) fn encode(d: &Description, early: &Encoded) -> Vec<u8> {
    // Written into one string (no allocation a line): the connections' lines are
    // written while nothing is accepted.
    let late = encode_connections(&d.connections);
    let mut text = String::with_capacity(
        64 * (d.samples.len() + d.listeners.len() + 4) + early.lines.len() + late.lines.len(),
    );
    text.push_str(HEADER);
    text.push('\n');
    if let Some(at) = d.stopped {
        text.push_str(&format!("stopped {at}\n"));
    }
    if let Some(at) = d.started {
        text.push_str(&format!("started {at}\n"));
    }
    for (key, value) in &d.samples {
        text.push_str(&format!("sample {} {value}\n", key.replace('\n', " ")));
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
    text.push_str(&early.lines);
    text.push_str(&late.lines);
    text.push_str("end\n");
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(&early.pending);
    bytes.extend_from_slice(&late.pending);
    bytes
}

/// The number that is the last word of `line` (`words` holds what follows its keyword);
/// `what` names it in the error.
fn lone_number<T: FromStr>(
    mut words: Split<'_, char>,
    line: &str,
    what: &str,
) -> Result<T, HandoverError> {
    words
        .next()
        .and_then(|t| t.parse().ok())
        .filter(|_| words.next().is_none())
        .ok_or_else(|| invalid(format!("bad {what} in {line:?}")))
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
    let version = match next_line()? {
        HEADER => 3,
        HEADER_V2 => 2,
        HEADER_V1 => 1,
        other => {
            return Err(invalid(format!(
                "{other:?} is not a description this binary reads ({HEADER:?}, {HEADER_V2:?} \
                 or {HEADER_V1:?})"
            )));
        }
    };
    let mut lengths = Vec::new();
    loop {
        let line = next_line()?;
        let mut words = line.split(' ');
        match words.next() {
            Some("end") if words.next().is_none() => break,
            Some("stopped") => d.stopped = Some(lone_number(words, line, "time")?),
            Some("started") if version >= 2 => {
                d.started = Some(lone_number(words, line, "start time")?);
            }
            Some("sample") if version >= 2 => {
                let (key, value) = line["sample ".len()..]
                    .rsplit_once(' ')
                    .and_then(|(k, v)| Some((k, v.parse::<f64>().ok()?)))
                    .filter(|(k, v)| !k.is_empty() && v.is_finite())
                    .ok_or_else(|| invalid(format!("bad sample in {line:?}")))?;
                d.samples.push((key.to_string(), value));
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
                let mut number = || words.next().and_then(|n| n.parse::<u64>().ok());
                let (accepted, echoed) = if version >= 2 {
                    let accepted = number();
                    accepted.zip(number()).ok_or_else(|| {
                        invalid(format!("no accept time or echoed count in {line:?}"))
                    })?
                } else {
                    (0, 0)
                };
                let last_traffic = if version >= 3 {
                    number().ok_or_else(|| invalid(format!("no last traffic time in {line:?}")))?
                } else {
                    0
                };
                if words.next().is_some() {
                    return Err(invalid(format!("trailing words in {line:?}")));
                }
                lengths.push(pending);
                d.connections.push(ConnectionEntry {
                    fd,
                    label,
                    peer,
                    past: Past {
                        pending: Vec::new(),
                        accepted,
                        echoed,
                        last_traffic,
                    },
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
        c.past.pending = mine.to_vec();
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
            started: Some(1_765_000_000.25),
            samples: vec![
                (
                    "echod_tcp_connections_accepted_total{listener=\"0.0.0.0:7\"}".into(),
                    12.0,
                ),
                (
                    "echod_tcp_connection_duration_seconds_sum{listener=\"[::]:7\"}".into(),
                    0.5,
                ),
            ],
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
                    past: Past {
                        pending: Vec::new(),
                        accepted: 55,
                        echoed: 1 << 40,
                        last_traffic: 77,
                    },
                },
                ConnectionEntry {
                    fd: 10,
                    label: "[::]:7".into(),
                    peer: "[2001:db8::1]:40001".parse().unwrap(),
                    // Pending bytes are binary and may contain the line syntax.
                    past: Past {
                        pending: b"\nend\nconnection 11 x y 0\n\0\xff".to_vec(),
                        accepted: 0,
                        echoed: 0,
                        last_traffic: 0,
                    },
                },
                ConnectionEntry {
                    fd: 12,
                    label: "0.0.0.0:7".into(),
                    peer: "192.0.2.3:40002".parse().unwrap(),
                    past: Past {
                        pending: vec![7; 3],
                        accepted: 1,
                        echoed: 2,
                        last_traffic: 3,
                    },
                },
            ],
        }
    }

    #[test]
    fn a_description_survives_its_round_trip() {
        let d = sample();
        let bytes = encode(&d, &Encoded::default());
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.starts_with(
                "echod-handover 3\nstopped 123456789\nstarted 1765000000.25\n\
                 sample echod_tcp_connections_accepted_total{listener=\"0.0.0.0:7\"} 12\n\
                 sample echod_tcp_connection_duration_seconds_sum{listener=\"[::]:7\"} 0.5\n\
                 listener tcp 3 0.0.0.0:7 stored\nlistener udp 4 [::]:7 activated\n\
                 listener http 5 127.0.0.1:9107\nconnection 9 0.0.0.0:7 192.0.2.1:40000 0 55 1099511627776 77\n"
            ),
            "{text}"
        );
        assert_eq!(decode(&bytes).unwrap(), d);
        assert_eq!(
            decode(&encode(&Description::default(), &Encoded::default())).unwrap(),
            Description::default()
        );
        // The connections handed over early, encoded before the pause, and the rest:
        // the same description, byte for byte.
        for split in 0..=d.connections.len() {
            let early = encode_connections(&d.connections[..split]);
            let late = Description {
                connections: d.connections[split..].to_vec(),
                ..d.clone()
            };
            assert_eq!(encode(&late, &early), bytes, "split at {split}");
        }
    }

    /// What this round's earlier binaries write (version 2, frozen here): no last
    /// traffic time, so the idle timeout goes on from now.
    #[test]
    fn a_version_2_description_is_still_read() {
        let v2 = b"echod-handover 2\nstopped 9\nstarted 1765000000.25\n\
                   sample echod_tcp_connections_accepted_total{listener=\"0.0.0.0:7\"} 12\n\
                   listener tcp 3 0.0.0.0:7 stored\n\
                   connection 9 0.0.0.0:7 192.0.2.1:40000 2 55 6\nend\nhi";
        let d = decode(v2).unwrap();
        assert_eq!(d.connections[0].past.pending, b"hi");
        let c = &d.connections[0];
        assert_eq!(
            (c.past.accepted, c.past.echoed, c.past.last_traffic),
            (55, 6, 0)
        );
        assert_eq!(d.samples.len(), 1);
        // A version 3 line is not version 2's.
        assert!(decode(b"echod-handover 2\nconnection 9 a 192.0.2.1:1 0 5 6 7\nend\n").is_err());
    }

    /// What the first release with upgrades in place writes (version 1, frozen here):
    /// this version reads it, so that release can upgrade to this one.
    #[test]
    fn a_version_1_description_is_still_read() {
        let v1 = b"echod-handover 1\nstopped 9\nlistener tcp 3 0.0.0.0:7 stored\n\
                   connection 9 0.0.0.0:7 192.0.2.1:40000 2\nend\nhi";
        let d = decode(v1).unwrap();
        assert_eq!(d.stopped, Some(9));
        assert_eq!(d.listeners.len(), 1);
        assert_eq!(d.connections[0].past.pending, b"hi");
        assert_eq!(
            (
                d.connections[0].past.accepted,
                d.connections[0].past.echoed,
                d.connections[0].past.last_traffic
            ),
            (0, 0, 0)
        );
        assert!(d.samples.is_empty() && d.started.is_none());
        // Lines of version 2 are not version 1's.
        assert!(decode(b"echod-handover 1\nstarted 1\nend\n").is_err());
        assert!(decode(b"echod-handover 1\nconnection 9 a 192.0.2.1:1 0 5 6\nend\n").is_err());
    }

    #[test]
    fn broken_descriptions_are_refused() {
        let good = encode(&sample(), &Encoded::default());
        // Each broken description, and a word its error must carry.
        let broken = [
            ("", "without \"end\""),
            (
                "echod-handover 4\nend\n",
                "is not a description this binary reads",
            ),
            (
                "echod-handover 3\nconnection 4 0.0.0.0:7 192.0.2.1:1 0 5 6\nend\n",
                "no last traffic",
            ),
            ("echod-handover 2\nsample x\nend\n", "bad sample"),
            ("echod-handover 2\nsample x NaN\nend\n", "bad sample"),
            (
                "echod-handover 2\nconnection 4 0.0.0.0:7 192.0.2.1:1 0\nend\n",
                "no accept time",
            ),
            ("echod-handover 1\n", "without \"end\""),
            ("echod-handover 1\nlistener sctp 3 0.0.0.0:7\nend\n", "kind"),
            (
                "echod-handover 1\nlistener tcp x 0.0.0.0:7\nend\n",
                "descriptor",
            ),
            ("echod-handover 1\nlistener tcp 1 0.0.0.0:7\nend\n", "stdio"),
            ("echod-handover 1\nlistener tcp 3 nowhere\nend\n", "address"),
            (
                "echod-handover 1\nlistener tcp 3 0.0.0.0:7 kept\nend\n",
                "flag",
            ),
            (
                "echod-handover 1\nlistener tcp 3 0.0.0.0:7\nconnection 3 0.0.0.0:7 192.0.2.1:1 0\nend\n",
                "used twice",
            ),
            (
                "echod-handover 1\nconnection 4 0.0.0.0:7 192.0.2.1:1\nend\n",
                "pending byte count",
            ),
            (
                "echod-handover 1\nconnection 4 0.0.0.0:7 192.0.2.1:1 0 extra\nend\n",
                "trailing",
            ),
            ("echod-handover 1\nsocket 4\nend\n", "unknown line"),
            ("echod-handover 1\nstopped soon\nend\n", "bad time"),
        ];
        for (description, why) in broken {
            let error = decode(description.as_bytes()).unwrap_err().to_string();
            assert!(error.contains(why), "{description:?}: {error}");
        }
        // Pending bytes must be exactly what the lines announce.
        let mut short = good.clone();
        short.pop();
        assert!(decode(&short).unwrap_err().to_string().contains("announce"));
        let mut long = good;
        long.push(0);
        assert!(decode(&long).unwrap_err().to_string().contains("announce"));
    }
}
