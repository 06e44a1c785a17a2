//! The daemon: one module per concern, and the arrows run one way.
//!
//! `process` owns what belongs to the whole process (signals, logger, rlimits,
//! `LISTEN_FDS`) and drives the `server` through a control channel. The server keeps
//! a `listeners` set (which sockets are bound) and starts a `tcp`, `udp` or
//! `http` task per socket; TCP and UDP handlers respect the `limits` and count into
//! the `metrics`, naming what went wrong with the `reasons`. `shutdown` is the
//! drain/cut broadcast down that tree, and it rings the `alarms` table in which every
//! echo connection waits for its deadline; `systemd` and `logging` are the edges to
//! the service manager and the operator.
//!
//! Around that core: `proxy` reads PROXY headers for `tcp`; `web_config` adds TLS
//! and basic auth to `http`; `accept` is the accept-error policy both stream
//! listeners share; `fdstore` keeps the listeners in systemd's descriptor store across
//! restarts, and `upgrade` with `handover` passes listeners and connections to a new
//! binary in place; `tls` is TLS echo, a TCP listener whose connections handshake
//! first. `kind` is the one vocabulary of socket kinds they all share.

mod accept;
mod alarms;
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
mod tls;
mod udp;
mod upgrade;
mod web_config;

pub use listeners::{BindError, Sockets};
pub use process::run;
pub use server::{Control, ServeError, Summary, serve};
