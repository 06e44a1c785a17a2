//! Address ranges in CIDR notation, for `tcp.proxy_protocol.trusted_sources` and the
//! allow/deny lists of who may connect (`tcp.allow`, `udp.deny`, `metrics.allow` …).
//!
//! A range is checked strictly: a prefix longer than the address, or host bits set
//! (`10.0.0.1/8`), is refused rather than guessed at, because this list decides whose
//! word about client addresses echod takes.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An IPv4 or IPv6 network: an address with its host bits zero and a prefix length. A
/// bare address is a network of one (`/32`, `/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Why a string is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not an address, or not `address/length`.
    #[error("`{0}` is not an IP address or CIDR such as 10.0.0.0/8 or fd00::/8")]
    Syntax(String),
    /// The prefix is longer than the address.
    #[error("`{text}`: prefix length {prefix} is longer than the address ({max} bits)")]
    PrefixTooLong {
        /// What was written.
        text: String,
        /// The prefix length given, as written.
        prefix: String,
        /// 32 or 128.
        max: u8,
    },
    /// Bits beyond the prefix are set, so the intended network is ambiguous.
    #[error("`{text}` has bits set beyond the /{prefix} prefix; the network is {network}/{prefix}")]
    HostBits {
        /// What was written.
        text: String,
        /// The network the prefix leaves.
        network: IpAddr,
        /// The prefix length given.
        prefix: u8,
    },
}

/// A v4-mapped IPv6 address (`::ffff:10.0.0.1`, as a dual-stack socket reports IPv4
/// peers) is its IPv4 self, so one range written in IPv4 covers both.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The address's bits, left-aligned in a u128, and its width.
fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

/// A mask of `prefix` leading ones.
fn mask(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl Cidr {
    /// True when `ip` is in this network (a v4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if ip.is_ipv4() != self.network.is_ipv4() {
            return false;
        }
        let (ip_bits, _) = bits(ip);
        let (net_bits, _) = bits(self.network);
        ip_bits & mask(self.prefix) == net_bits
    }
}

/// Whether an allow/deny pair admits `ip`: a listed deny wins; an empty allow list
/// admits everyone else, a non-empty one only the addresses it holds (xinetd's
/// `only_from`/`no_access`, systemd's `IPAddressAllow=`/`IPAddressDeny=`).
pub fn admits(allow: &[Cidr], deny: &[Cidr], ip: IpAddr) -> bool {
    !deny.iter().any(|net| net.contains(ip))
        && (allow.is_empty() || allow.iter().any(|net| net.contains(ip)))
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || CidrError::Syntax(text.to_string());
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
        let (_, width) = bits(addr);
        let prefix = match prefix {
            None => width,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= width)
                .ok_or_else(|| CidrError::PrefixTooLong {
                    text: text.to_string(),
                    prefix: p.to_string(),
                    max: width,
                })?,
            Some(_) => return Err(syntax()),
        };
        // `::ffff:10.0.0.0/104` is the IPv4 network 10.0.0.0/8.
        let (addr, prefix) = match (canonical(addr), addr) {
            (IpAddr::V4(v4), IpAddr::V6(_)) if prefix >= 96 => (IpAddr::V4(v4), prefix - 96),
            _ => (addr, prefix),
        };
        let (addr_bits, _) = bits(addr);
        let network_bits = addr_bits & mask(prefix);
        if network_bits != addr_bits {
            let network = match addr {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(
                    u32::try_from(network_bits >> 96).unwrap_or(0),
                )),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(network_bits)),
            };
            return Err(CidrError::HostBits {
                text: text.to_string(),
                network,
                prefix,
            });
        }
        Ok(Self {
            network: addr,
            prefix,
        })
    }
}

impl TryFrom<String> for Cidr {
    type Error = CidrError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Cidr> for String {
    fn from(cidr: Cidr) -> Self {
        cidr.to_string()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_ranges_match_their_addresses_only() {
        let net = cidr("10.0.0.0/8");
        assert!(net.contains(ip("10.0.0.0")));
        assert!(net.contains(ip("10.255.255.255")));
        assert!(!net.contains(ip("11.0.0.0")));
        assert!(!net.contains(ip("9.255.255.255")));
        let net = cidr("192.168.1.128/25");
        assert!(net.contains(ip("192.168.1.200")));
        assert!(!net.contains(ip("192.168.1.127")));
        let one = cidr("127.0.0.4");
        assert_eq!(one.to_string(), "127.0.0.4/32");
        assert!(one.contains(ip("127.0.0.4")));
        assert!(!one.contains(ip("127.0.0.5")));
        let all = cidr("0.0.0.0/0");
        assert!(all.contains(ip("203.0.113.9")));
        assert!(
            !all.contains(ip("::1")),
            "an IPv4 range holds no IPv6 address"
        );
    }

    #[test]
    fn ipv6_ranges_and_v4_mapped_peers() {
        let net = cidr("fd00::/8");
        assert!(net.contains(ip("fd12:3456::1")));
        assert!(!net.contains(ip("fe80::1")));
        assert!(!net.contains(ip("10.0.0.1")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
        assert!(cidr("2001:db8::1/128").contains(ip("2001:db8::1")));
        assert!(!cidr("2001:db8::1/128").contains(ip("2001:db8::2")));
        // A dual-stack socket reports IPv4 peers v4-mapped; they match IPv4 ranges.
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(!cidr("10.0.0.0/8").contains(ip("::ffff:11.1.2.3")));
        // A v4-mapped range is the IPv4 range.
        assert_eq!(cidr("::ffff:10.0.0.0/104"), cidr("10.0.0.0/8"));
        assert!(cidr("::ffff:10.0.0.0/104").contains(ip("10.9.9.9")));
    }

    #[test]
    fn bad_ranges_are_refused_with_the_reason() {
        for (text, want) in [
            (
                "10.0.0.0/33",
                "prefix length 33 is longer than the address (32 bits)",
            ),
            ("fd00::/129", "prefix length 129"),
            ("10.0.0.0/99999999999", "prefix length"),
            ("10.0.0.1/8", "the network is 10.0.0.0/8"),
            ("fd00::1/64", "the network is fd00::/64"),
            ("banana", "not an IP address or CIDR"),
            ("10.0.0.0/", "not an IP address or CIDR"),
            ("10.0.0.0/-1", "not an IP address or CIDR"),
            ("10.0.0.0/8/8", "not an IP address or CIDR"),
            ("10.0.0/8", "not an IP address or CIDR"),
            ("", "not an IP address or CIDR"),
        ] {
            let err = text.parse::<Cidr>().expect_err(text).to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn deny_wins_and_an_empty_allow_list_admits_everyone() {
        let nets = |list: &[&str]| list.iter().map(|s| cidr(s)).collect::<Vec<_>>();
        assert!(admits(&[], &[], ip("203.0.113.9")));
        assert!(admits(&[], &nets(&["10.0.0.0/8"]), ip("11.0.0.1")));
        assert!(!admits(&[], &nets(&["10.0.0.0/8"]), ip("10.0.0.1")));
        let allow = nets(&["127.0.0.0/8", "fd00::/8"]);
        assert!(admits(&allow, &[], ip("127.0.0.3")));
        assert!(admits(&allow, &[], ip("::ffff:127.0.0.3")));
        assert!(admits(&allow, &[], ip("fd00::1")));
        assert!(!admits(&allow, &[], ip("10.0.0.1")));
        assert!(!admits(&allow, &nets(&["127.0.0.3"]), ip("127.0.0.3")));
        assert!(admits(&allow, &nets(&["127.0.0.3"]), ip("127.0.0.4")));
    }

    #[test]
    fn round_trips_through_its_text() {
        for text in [
            "10.0.0.0/8",
            "0.0.0.0/0",
            "fd00::/8",
            "::/0",
            "192.0.2.1/32",
        ] {
            assert_eq!(cidr(text).to_string(), text);
            assert_eq!(cidr(&cidr(text).to_string()), cidr(text));
        }
    }
}
