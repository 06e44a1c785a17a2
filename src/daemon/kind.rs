//! What a listening socket serves and where it came from: the one vocabulary the
//! listener set, the descriptor store and the upgrade handover share, kept apart so that
//! none of them depends on another for it.

use std::net::SocketAddr;

use crate::config::Config;

/// A listener's identity: what it serves and its configured address (the listener
/// set's key, and what the descriptor store names it by).
pub(crate) type ListenerKey = (ListenerKind, SocketAddr);

/// What a listening socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum ListenerKind {
    Tcp,
    Udp,
    Http,
    Tls,
}

impl ListenerKind {
    pub(crate) fn proto(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Http => "HTTP",
            Self::Tls => "TLS",
        }
    }

    /// The word that names the kind in the handover description and in descriptor
    /// store names.
    pub(crate) fn token(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Http => "http",
            Self::Tls => "tls",
        }
    }

    /// The kind a [`ListenerKind::token`] names.
    pub(crate) fn from_token(token: &str) -> Option<Self> {
        [Self::Tcp, Self::Udp, Self::Http, Self::Tls]
            .into_iter()
            .find(|kind| kind.token() == token)
    }

    pub(crate) fn configured(self, config: &Config) -> &[SocketAddr] {
        match self {
            Self::Tcp => &config.tcp.listen,
            Self::Udp => &config.udp.listen,
            Self::Http => &config.metrics.listen,
            Self::Tls => &config.tls.listen,
        }
    }
}

/// Where a listening socket came from, which decides how it is used and who else
/// holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SocketOrigin {
    /// systemd's socket activation: it serves whatever the config says, and systemd
    /// keeps it open.
    Activated,
    /// systemd's descriptor store holds it under its name.
    Stored,
    /// Bound by echod, or by the caller, and held by nobody else.
    Bound,
}
