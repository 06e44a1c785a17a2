//! PROXY protocol (HAProxy's v1 text and v2 binary headers) on TCP connections from the
//! proxies listed in `tcp.proxy_protocol.trusted_sources`.
//!
//! Such a connection must start with a header naming the client; echod reads it before
//! anything else, never echoes it, and then serves the connection as that client's: its
//! per-IP slot, its access log line. The header is read without consuming a byte past
//! it (bytes are peeked, and only header bytes are read), so whatever the client sent
//! behind it stays in the socket for the echo loop. The buffer is small, grows only for
//! a v2 header that announces more (up to [`V2_MAX`]) and is freed once the header is
//! read: the echo runs in a task of its own, as small as any direct connection's.
//!
//! A trusted connection that sends anything else, too much, or nothing in time is closed
//! and counted (`reason="proxy_protocol"`); it can neither be echoed nor hang. This
//! module reads and checks headers; `tcp` decides what happens to the connection.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ppp::{PartialResult, v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::limits::canonical_ip;

/// Longest v1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// Longest v2 header accepted, the 16 fixed bytes included: room for Unix-socket
/// addresses (216 bytes) and several times as much in TLVs, while a length field
/// claiming up to 64 KiB cannot make echod wait for (or hold) that much.
const V2_MAX: usize = 2048;
/// The v2 fixed part: signature, version/command, family/protocol, length.
const V2_FIXED: usize = 16;
/// The first buffer: any v1 header, and v2 headers with IP addresses and some TLVs.
const FIRST_BUFFER: usize = 256;
// A v1 line is refused at 107 bytes without its end: the first buffer must hold them.
const _: () = assert!(FIRST_BUFFER > V1_MAX);

/// Why a trusted connection was closed before it was served.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeaderError {
    /// Nothing complete arrived within `tcp.proxy_protocol.header_timeout`.
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    /// The peer closed first.
    #[error("closed before a complete PROXY header")]
    Closed,
    /// Not a v1 header (or a malformed one).
    #[error("invalid PROXY v1 header: {0}")]
    V1(#[from] v1::BinaryParseError),
    /// A malformed v2 header.
    #[error("invalid PROXY v2 header: {0}")]
    V2(#[from] v2::ParseError),
    /// A v1 line without its end within [`V1_MAX`] bytes, or a v2 header announcing
    /// more than [`V2_MAX`].
    #[error("PROXY header of {len} bytes or more, longer than the {max} accepted")]
    TooLong {
        /// Bytes seen or announced.
        len: usize,
        /// The bound for this version.
        max: usize,
    },
    /// A socket error while reading.
    #[error("socket error before the PROXY header: {0}")]
    Io(#[from] io::Error),
}

/// What the bytes seen so far amount to.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// A whole header of `len` bytes, naming `client` (None: use the proxy's address).
    Done {
        len: usize,
        client: Option<SocketAddr>,
    },
    /// A proper beginning of a header; a v2 header's total length once known.
    Incomplete { total: Option<usize> },
}

/// Parses the start of a connection with `ppp`, telling "not yet" from "never".
fn parse(buf: &[u8]) -> Result<Step, HeaderError> {
    let sig = v2::PROTOCOL_PREFIX;
    let looks_v2 = buf[..buf.len().min(sig.len())] == sig[..buf.len().min(sig.len())];
    if looks_v2 {
        let result = v2::Header::try_from(buf);
        return match result {
            Ok(h) => Ok(Step::Done {
                len: h.len(),
                client: v2_client(&h),
            }),
            Err(_) if result.is_incomplete() => {
                // The length field is known after 16 bytes: refuse a long header before
                // reading it.
                let total = (buf.len() >= V2_FIXED)
                    .then(|| V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]])));
                match total {
                    Some(len) if len > V2_MAX => Err(HeaderError::TooLong { len, max: V2_MAX }),
                    total => Ok(Step::Incomplete { total }),
                }
            }
            Err(e) => Err(e.into()),
        };
    }
    // v1: garbage shows in the first bytes; otherwise wait for the whole line (it ends
    // at its line feed) before parsing it, since ppp takes some line prefixes, such as
    // one ending in the space before a port, for errors.
    let prefix = b"PROXY ";
    let n = buf.len().min(prefix.len());
    if buf[..n] != prefix[..n] {
        return Err(v1::BinaryParseError::from(v1::ParseError::InvalidPrefix).into());
    }
    if !buf.contains(&b'\n') {
        return if buf.len() >= V1_MAX {
            Err(HeaderError::TooLong {
                len: buf.len(),
                max: V1_MAX,
            })
        } else {
            Ok(Step::Incomplete { total: None })
        };
    }
    let header = v1::Header::try_from(buf)?;
    Ok(Step::Done {
        len: header.header.len(),
        client: v1_client(&header.addresses),
    })
}

/// The client a v2 header names: LOCAL (the proxy's own health check), unspecified and
/// Unix-socket addresses leave the proxy's address in place.
fn v2_client(header: &v2::Header<'_>) -> Option<SocketAddr> {
    if header.command != v2::Command::Proxy {
        return None;
    }
    match header.addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}

/// The client a v1 header names; `PROXY UNKNOWN` leaves the proxy's address.
fn v1_client(addresses: &v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    }
}

/// Reads the header at the start of `stream` and returns the client it names (or
/// `proxy` for LOCAL and the like). Consumes exactly the header: each round peeks at
/// what has arrived, and reads only bytes known to belong to the header.
pub(crate) async fn read_header(
    stream: &mut TcpStream,
    proxy: SocketAddr,
) -> Result<SocketAddr, HeaderError> {
    let mut buf = vec![0u8; FIRST_BUFFER];
    let mut have = 0;
    loop {
        let peeked = stream.peek(&mut buf[have..]).await?;
        if peeked == 0 {
            return Err(HeaderError::Closed);
        }
        let seen = have + peeked;
        match parse(&buf[..seen])? {
            Step::Done { len, client } => {
                // `have` bytes were an incomplete header, so the header is longer.
                stream.read_exact(&mut buf[have.min(len)..len]).await?;
                return Ok(
                    client.map_or(proxy, |c| SocketAddr::new(canonical_ip(c.ip()), c.port()))
                );
            }
            Step::Incomplete { total } => {
                // Everything seen is header so far: take it, so the next peek waits for
                // more instead of returning the same bytes again.
                stream.read_exact(&mut buf[have..seen]).await?;
                have = seen;
                if let Some(total) = total.filter(|t| *t > buf.len()) {
                    buf.resize(total, 0);
                }
                if have >= buf.len() {
                    // Unreachable (a v1 line fails at 107 bytes, a v2 header is complete at
                    // its announced length), but the loop must end whatever `parse` says.
                    return Err(HeaderError::TooLong {
                        len: have,
                        max: buf.len(),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = v2::PROTOCOL_PREFIX.to_vec();
        h.extend_from_slice(&[0x20 | command, family]);
        h.extend_from_slice(&u16::try_from(addresses.len()).unwrap().to_be_bytes());
        h.extend_from_slice(addresses);
        h
    }

    const TCP4: [u8; 12] = [192, 0, 2, 1, 127, 0, 0, 1, 0x1f, 0x90, 0, 7];

    #[test]
    fn complete_headers_give_their_length_and_client() {
        let line = b"PROXY TCP4 192.0.2.1 127.0.0.1 8080 7\r\n";
        let mut with_data = line.to_vec();
        with_data.extend_from_slice(b"hello");
        assert_eq!(
            parse(&with_data).unwrap(),
            Step::Done {
                len: line.len(),
                client: Some("192.0.2.1:8080".parse().unwrap())
            }
        );
        let header = v2(1, 0x11, &TCP4);
        let mut with_data = header.clone();
        with_data.extend_from_slice(b"PROXY and more");
        assert_eq!(
            parse(&with_data).unwrap(),
            Step::Done {
                len: 28,
                client: Some("192.0.2.1:8080".parse().unwrap())
            }
        );
        for local in [
            v2(0, 0x00, &[]),
            v2(0, 0x11, &TCP4),
            v2(1, 0x00, &[]),
            v2(1, 0x31, &[0; 216]),
            b"PROXY UNKNOWN\r\n".to_vec(),
        ] {
            assert!(
                matches!(parse(&local), Ok(Step::Done { client: None, .. })),
                "{local:?}"
            );
        }
    }

    #[test]
    fn every_proper_prefix_is_incomplete_and_consumed_bytes_stay_in_the_header() {
        let line = b"PROXY TCP6 2001:db8::1 ::1 65535 7\r\n";
        let binary = v2(1, 0x11, &TCP4);
        for header in [&line[..], &binary[..]] {
            for n in 1..header.len() {
                assert!(
                    matches!(parse(&header[..n]), Ok(Step::Incomplete { .. })),
                    "{:?} after {n} bytes: {:?}",
                    String::from_utf8_lossy(&header[..n]),
                    parse(&header[..n])
                );
            }
        }
        assert_eq!(
            parse(&binary[..20]).unwrap(),
            Step::Incomplete { total: Some(28) }
        );
    }

    #[test]
    fn hostile_input_is_refused_without_waiting_for_more() {
        let mut long_v2 = v2(1, 0x11, &TCP4);
        long_v2[14..16].copy_from_slice(&60_000u16.to_be_bytes());
        assert!(matches!(
            parse(&long_v2),
            Err(HeaderError::TooLong { len: 60_016, .. })
        ));
        let mut bad_sig = v2(1, 0x11, &TCP4);
        bad_sig[8] = b'X';
        let mut bad_version = v2(1, 0x11, &TCP4);
        bad_version[12] = 0x31;
        let oversized = format!("PROXY TCP4 {} 127.0.0.1 1 2\r\n", "1".repeat(100));
        let cases: [&[u8]; 9] = [
            b"GET / HTTP/1.1\r\n",
            b"hello",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            oversized.as_bytes(),
            &[b'P'; V1_MAX],
            &bad_sig,
            &bad_version,
        ];
        for case in cases {
            assert!(
                parse(case).is_err(),
                "{:?}: {:?}",
                String::from_utf8_lossy(case),
                parse(case)
            );
        }
    }
}
