//! The tools an operator runs beside the daemon: an interactive/pipe client, a health
//! probe and a verifying load generator. They speak to any echo server over the network
//! and never reach into the daemon's internals, so what they measure is what a client sees.

pub mod bench;
pub mod client;
mod net;
pub mod probe;
mod tls;

pub use bench::BenchArgs;
pub use client::ClientArgs;
pub use probe::ProbeArgs;
