//! What a listening socket serves: the one vocabulary the listener set, the descriptor
//! store and the upgrade handover share, kept apart so that none of them depends on
//! another for it.

use std::net::SocketAddr;

use crate::config::Config;

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

    pub(crate) fn configured(self, config: &Config) -> &[SocketAddr] {
        match self {
            Self::Tcp => &config.tcp.listen,
            Self::Udp => &config.udp.listen,
            Self::Http => &config.metrics.listen,
            Self::Tls => &config.tls.listen,
        }
    }
}
