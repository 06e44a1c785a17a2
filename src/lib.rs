//! echod: a TCP and UDP echo daemon (RFC 862) built to be left running.
//!
//! The modules follow the data: [`config`] becomes [`server`] listeners ([`tcp`],
//! [`udp`], [`http`]), whose handlers count into [`metrics`] and respect [`limits`];
//! [`shutdown`] and reload travel down the same path; [`systemd`] and [`logging`] are
//! the daemon's edges to its service manager and its operator.
#![warn(missing_docs)]

pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod http;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod probe;
pub mod server;
pub mod shutdown;
pub mod systemd;
pub mod tcp;
pub mod udp;
