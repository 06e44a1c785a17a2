//! The daemon: one module per concern, and the arrows run one way.
//!
//! `process` owns what belongs to the whole process (signals, logger, rlimits,
//! `LISTEN_FDS`, the image) and drives the `server` through a control channel. The
//! server's every effect on the process — notifications to the service manager, the
//! descriptor store, the exec of an upgrade — goes through one `host`, which the process
//! gives it (and a test replaces). The server keeps a `listeners` set (which sockets are
//! bound) and starts a `tcp`, `udp` or `http` task per socket; TCP and UDP handlers
//! respect the `limits` and count into the `metrics`, naming what went wrong with the
//! `reasons`. `shutdown` is the drain/cut broadcast down that tree, and it rings the
//! `alarms` table in which every echo connection waits for its deadline; `systemd`,
//! `fdstore` and `logging` are the edges to the service manager and the operator.
//!
//! Around that core: `proxy` reads PROXY headers for `tcp`; `http_guard` puts the web
//! configuration (`config::web`) to work as TLS and basic auth for `http`; `accept` is
//! the accept-error policy both stream listeners share; `upgrade` passes listeners and
//! connections to a new binary in place (its wire format, the exec, the handoff
//! connections give themselves to); `tls` is TLS echo, a TCP listener whose connections
//! handshake first. `kind` is the one vocabulary of socket kinds and origins they all
//! share.

mod accept;
mod alarms;
mod fdstore;
mod host;
mod http;
mod http_guard;
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
mod verdict;

pub use listeners::{BindError, Sockets};
pub use process::run;
pub use server::{Control, ServeError, Summary, serve};
pub use upgrade::check::answer as answer_upgrade_check;
pub use verdict::request as request_reload;
