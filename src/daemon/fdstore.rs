//! systemd's file descriptor store: listening sockets that outlive the process.
//!
//! echod hands every listening socket it binds to systemd (`FDSTORE=1` with the socket
//! passed as `SCM_RIGHTS` over `NOTIFY_SOCKET`), named after what it is. systemd keeps
//! them while the service restarts — `systemctl restart`, a watchdog kill, a crash
//! restarted by `Restart=` — and passes them back in `LISTEN_FDS`/`LISTEN_FDNAMES`, where
//! the next echod adopts them by address before binding anything. A socket held by
//! systemd stays open, so connection attempts made while no echod runs wait in the
//! kernel's accept queue (and datagrams in the receive buffer) instead of being refused.
//! A plain `systemctl stop` empties the store.
//!
//! Names: `LISTEN_FDNAMES` separates names with `:`, so systemd refuses names that
//! contain one (only printable ASCII other than `:`, at most 255 characters). A name is
//! `echod-<kind>-<address>` with every `:` of the address written as `-`, a character
//! no socket address contains: `echod-tcp-0.0.0.0-7`, `echod-udp-[--]-7`,
//! `echod-http-127.0.0.1-9107`. The address is the configured one (the key a config
//! reload compares), not the one the kernel picked for port 0.

use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;

use sd_notify::NotifyState;
use tracing::{debug, info, warn};

use super::kind::ListenerKind;

/// The prefix of every name echod stores; other names come from socket units.
const PREFIX: &str = "echod-";

/// systemd's limit on a descriptor name.
const NAME_MAX: usize = 255;

/// True when systemd keeps a store for echod: `NOTIFY_SOCKET` is set and `FDSTORE` (set
/// by systemd ≥ 254 to `FileDescriptorStoreMax=`, and by echod.service itself for older
/// systemd) is a positive number. Without a store, sockets are not sent and a stop
/// closes the accept queue as before.
pub(crate) fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
        && std::env::var("FDSTORE")
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .is_some_and(|n| n > 0)
}

fn kind_token(kind: ListenerKind) -> &'static str {
    match kind {
        ListenerKind::Tcp => "tcp",
        ListenerKind::Udp => "udp",
        ListenerKind::Http => "http",
        ListenerKind::Tls => "tls",
    }
}

/// The store name of a listener of `kind` for the configured address `addr`.
pub(crate) fn name(kind: ListenerKind, addr: SocketAddr) -> String {
    format!(
        "{PREFIX}{}-{}",
        kind_token(kind),
        addr.to_string().replace(':', "-")
    )
}

/// What a name made by [`name`] stands for; `None` for any other name (a socket unit's
/// `FileDescriptorName=`, systemd's `unknown`, `stored`).
pub(crate) fn parse(name: &str) -> Option<(ListenerKind, SocketAddr)> {
    if name.contains(':') {
        return None;
    }
    let rest = name.strip_prefix(PREFIX)?;
    let (kind, addr) = rest.split_once('-')?;
    let kind = match kind {
        "tcp" => ListenerKind::Tcp,
        "udp" => ListenerKind::Udp,
        "http" => ListenerKind::Http,
        "tls" => ListenerKind::Tls,
        _ => return None,
    };
    let addr = addr.replace('-', ":").parse().ok()?;
    Some((kind, addr))
}

/// True when systemd accepts `name` as a descriptor name (`fdname_is_valid()`).
fn valid(name: &str) -> bool {
    name.len() <= NAME_MAX && name.bytes().all(|b| (b' '..0x7f).contains(&b) && b != b':')
}

/// Hands `fd` to systemd's store under `name`.
pub(crate) fn store(name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
    debug_assert!(valid(name), "{name} is not a valid descriptor name");
    sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], &[fd])?;
    info!(name, "listening socket kept in systemd's descriptor store");
    Ok(())
}

/// Asks systemd to close what it stores under `name` (a listener a reload removed).
pub(crate) fn remove(name: &str) {
    match sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]) {
        Ok(()) => debug!(name, "removed from systemd's descriptor store"),
        Err(e) => warn!(name, error = %e, "cannot remove a socket from systemd's descriptor store"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn names_say_what_the_socket_is_and_systemd_accepts_them() {
        let cases = [
            (ListenerKind::Tcp, "0.0.0.0:7", "echod-tcp-0.0.0.0-7"),
            (ListenerKind::Udp, "[::]:7", "echod-udp-[--]-7"),
            (
                ListenerKind::Http,
                "127.0.0.1:9107",
                "echod-http-127.0.0.1-9107",
            ),
            (
                ListenerKind::Tcp,
                "[fe80::1%2]:7007",
                "echod-tcp-[fe80--1%2]-7007",
            ),
            (
                ListenerKind::Udp,
                "[::ffff:192.0.2.1]:65535",
                "echod-udp-[--ffff-192.0.2.1]-65535",
            ),
        ];
        for (kind, a, want) in cases {
            let n = name(kind, addr(a));
            assert_eq!(n, want);
            assert!(valid(&n), "{n}");
            assert_eq!(parse(&n), Some((kind, addr(a))), "{n} round trip");
        }
        // The longest address there is still fits systemd's limit.
        let longest = name(
            ListenerKind::Http,
            addr("[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255%4294967295]:65535"),
        );
        assert!(valid(&longest), "{longest}");
    }

    #[test]
    fn other_names_are_not_echods() {
        for other in [
            "echo",
            "metrics",
            "unknown",
            "stored",
            "",
            "echod-",
            "echod-tcp",
            "echod-ftp-0.0.0.0-7",
            "echod-tcp-0.0.0.0",
            "echod-tcp-not-an-address",
            "echod-tcp-0.0.0.0:7",
        ] {
            assert_eq!(parse(other), None, "{other:?}");
        }
        assert!(!valid("echod-tcp-0.0.0.0:7"));
        assert!(!valid("tab\there"));
        assert!(!valid(&"x".repeat(256)));
    }
}
