//! The daemon: one module per concern, and the arrows run one way.
//!
//! [`process`] owns what belongs to the whole process (signals, logger, rlimits,
//! `LISTEN_FDS`) and drives the [`server`] through a control channel. The server keeps
//! a [`listeners`] set (which sockets are bound) and starts a [`tcp`], [`udp`] or
//! [`http`] task per socket; TCP and UDP handlers respect the [`limits`] and count into
//! the [`metrics`], naming what went wrong with the [`reasons`]. [`shutdown`] is the
//! drain/cut broadcast down that tree; [`systemd`] and [`logging`] are the edges to the
//! service manager and the operator.

mod accept;
mod fdstore;
mod handover;
mod http;
mod kind;
mod limits;
mod listeners;
mod logging;
pub mod metrics;
mod process;
mod proxy;
pub mod reasons;
mod server;
mod shutdown;
mod systemd;
mod tcp;
mod udp;
mod upgrade;
mod web_config;

pub use listeners::{BindError, Sockets};
pub use process::run;
pub use server::{Control, ServeError, Summary, serve};
