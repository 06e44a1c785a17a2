//! Why something was refused or failed, as closed sets: the limits, the listeners and
//! the metrics all name these, so each is defined once and every label value exists
//! (at 0) from the start.

use std::io;

/// Why a TCP connection was refused right after accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// `tcp.max_connections` reached.
    GlobalLimit,
    /// `tcp.max_connections_per_ip` reached for the source address.
    PerIpLimit,
    /// Accepted while the daemon was draining.
    Shutdown,
    /// A trusted source (`tcp.proxy_protocol.trusted_sources`) sent no valid PROXY
    /// protocol header in time.
    ProxyProtocol,
    /// The client's address is in `tcp.deny`, or not in a non-empty `tcp.allow`.
    Denied,
    /// The client's address opened new connections faster than `tcp.connection_rate`.
    ConnectionRate,
}

impl RejectReason {
    /// Every reason, in label order.
    pub const ALL: [Self; 6] = [
        Self::GlobalLimit,
        Self::PerIpLimit,
        Self::Shutdown,
        Self::ProxyProtocol,
        Self::Denied,
        Self::ConnectionRate,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::GlobalLimit => "global_limit",
            Self::PerIpLimit => "per_ip_limit",
            Self::Shutdown => "shutdown",
            Self::ProxyProtocol => "proxy_protocol",
            Self::Denied => "denied",
            Self::ConnectionRate => "connection_rate",
        }
    }
}

/// Why a UDP datagram was not echoed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Larger than `udp.max_datagram_size`.
    Oversize,
    /// From a source port in `udp.deny_source_ports` or one of echod's own UDP ports,
    /// or from a non-unicast source address.
    DeniedPort,
    /// The source exceeded its token bucket (or the table of sources is full).
    RateLimited,
    /// The reply could not be sent.
    SendError,
    /// The source address is in `udp.deny`, or not in a non-empty `udp.allow`.
    Denied,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [Self; 5] = [
        Self::Oversize,
        Self::DeniedPort,
        Self::RateLimited,
        Self::SendError,
        Self::Denied,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Oversize => "oversize",
            Self::DeniedPort => "denied_port",
            Self::RateLimited => "rate_limited",
            Self::SendError => "send_error",
            Self::Denied => "denied",
        }
    }
}

/// A per-connection cap that closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionCap {
    /// `tcp.max_connection_duration` reached.
    MaxDuration,
    /// `tcp.max_bytes_per_connection` reached.
    MaxBytes,
}

impl ConnectionCap {
    /// Every cap, in label order.
    pub const ALL: [Self; 2] = [Self::MaxDuration, Self::MaxBytes];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::MaxDuration => "max_duration",
            Self::MaxBytes => "max_bytes",
        }
    }
}

/// How a TLS handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeResult {
    /// Done: the connection echoes.
    Ok,
    /// Not done within `tls.handshake_timeout` (a stalled ClientHello, say).
    Timeout,
    /// Not TLS, or TLS broken: a malformed or oversized record, a bad message.
    ProtocolError,
    /// Nothing in common: only TLS 1.0/1.1 offered, no shared cipher suite or group.
    Incompatible,
    /// `tls.client_ca_file` is set and the client presented no certificate.
    NoClientCertificate,
    /// The client's certificate did not verify (another CA, expired, wrong usage).
    BadCertificate,
    /// The client sent an alert: typically it does not trust echod's certificate.
    ClientAlert,
    /// The client closed or reset the connection mid-handshake.
    PeerClosed,
    /// A stop cut it, or an upgrade began, before it was done.
    Interrupted,
}

impl HandshakeResult {
    /// Every result, in label order.
    pub const ALL: [Self; 9] = [
        Self::Ok,
        Self::Timeout,
        Self::ProtocolError,
        Self::Incompatible,
        Self::NoClientCertificate,
        Self::BadCertificate,
        Self::ClientAlert,
        Self::PeerClosed,
        Self::Interrupted,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Timeout => "timeout",
            Self::ProtocolError => "protocol_error",
            Self::Incompatible => "incompatible",
            Self::NoClientCertificate => "no_client_certificate",
            Self::BadCertificate => "bad_certificate",
            Self::ClientAlert => "client_alert",
            Self::PeerClosed => "peer_closed",
            Self::Interrupted => "interrupted",
        }
    }
}

/// How an established TLS connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsEnd {
    /// The client sent close_notify; echod answered with its own after the last echo.
    CloseNotify,
    /// The client closed TCP without close_notify (a truncation, in TLS terms; ncat
    /// ends its input so); echod still answered with close_notify after the last echo.
    Truncated,
    /// No traffic for `tcp.idle_timeout`.
    IdleTimeout,
    /// A per-connection cap (`tcp.max_connection_duration`, `tcp.max_bytes_per_connection`).
    Capped,
    /// The drain timeout expired.
    DrainCut,
    /// An in-place upgrade: TLS state cannot cross the exec, so the connection ended
    /// with close_notify after its current echo.
    Upgrade,
    /// A socket or TLS error.
    Error,
}

impl TlsEnd {
    /// Every end, in label order.
    pub const ALL: [Self; 7] = [
        Self::CloseNotify,
        Self::Truncated,
        Self::IdleTimeout,
        Self::Capped,
        Self::DrainCut,
        Self::Upgrade,
        Self::Error,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::CloseNotify => "close_notify",
            Self::Truncated => "truncated",
            Self::IdleTimeout => "idle_timeout",
            Self::Capped => "capped",
            Self::DrainCut => "drain_cut",
            Self::Upgrade => "upgrade",
            Self::Error => "error",
        }
    }
}

/// Accept errors worth telling apart on a dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptErrorKind {
    /// Out of file descriptors (EMFILE, ENFILE).
    FdLimit,
    /// The kernel is out of memory for sockets (ENOBUFS, ENOMEM).
    NoMemory,
    /// The client gave up before accept (ECONNABORTED and the like).
    Aborted,
    /// Anything else.
    Other,
}

impl AcceptErrorKind {
    /// Every kind, in label order.
    pub const ALL: [Self; 4] = [Self::FdLimit, Self::NoMemory, Self::Aborted, Self::Other];

    /// Sorts an accept error into its kind.
    pub fn of(e: &io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => Self::FdLimit,
            Some(libc::ENOBUFS | libc::ENOMEM) => Self::NoMemory,
            Some(libc::ECONNABORTED | libc::EPROTO | libc::ECONNRESET) => Self::Aborted,
            _ => Self::Other,
        }
    }

    /// Whether to wait before the next accept: running out of descriptors or memory
    /// does not fix itself in a microsecond, so retrying at once would only spin; a
    /// client that gave up says nothing about the next one.
    pub fn backs_off(self) -> bool {
        self != Self::Aborted
    }

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::FdLimit => "fd_limit",
            Self::NoMemory => "no_memory",
            Self::Aborted => "aborted",
            Self::Other => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_are_classified_and_only_transient_ones_retry_at_once() {
        let cases = [
            (libc::EMFILE, AcceptErrorKind::FdLimit, true),
            (libc::ENFILE, AcceptErrorKind::FdLimit, true),
            (libc::ENOBUFS, AcceptErrorKind::NoMemory, true),
            (libc::ENOMEM, AcceptErrorKind::NoMemory, true),
            (libc::ECONNABORTED, AcceptErrorKind::Aborted, false),
            (libc::EPROTO, AcceptErrorKind::Aborted, false),
            (libc::ECONNRESET, AcceptErrorKind::Aborted, false),
            (libc::EINVAL, AcceptErrorKind::Other, true),
        ];
        for (errno, kind, backs_off) in cases {
            let got = AcceptErrorKind::of(&io::Error::from_raw_os_error(errno));
            assert_eq!(got, kind, "errno {errno}");
            assert_eq!(got.backs_off(), backs_off, "errno {errno}");
        }
    }

    #[test]
    fn label_values_are_distinct_and_in_index_order() {
        // For each closed set: no label twice, and `ALL[i] as usize == i` (the metrics
        // index their arrays of series by the value).
        macro_rules! check {
            ($($set:ident),*) => {$(
                let labels = $set::ALL.map($set::label).to_vec();
                let mut sorted = labels.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(sorted.len(), labels.len(), "duplicate label in {labels:?}");
                for (i, value) in $set::ALL.iter().enumerate() {
                    assert_eq!(*value as usize, i, "{value:?}");
                }
            )*};
        }
        check!(
            RejectReason,
            DropReason,
            AcceptErrorKind,
            ConnectionCap,
            HandshakeResult,
            TlsEnd
        );
    }
}
