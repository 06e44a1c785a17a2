//! echod: a TCP and UDP echo daemon (RFC 862) built to be left running.
//!
//! Three rooms, and the arrows run one way: [`config`] depends on nothing else; the
//! [`daemon`] turns a config into listeners, connection handlers and metrics; the
//! [`tools`] (client, probe, load generator) talk to any echo server over the network
//! and share only the config with the daemon (the probe reads it to know what to check).
//! [`cli`] is the one binary's command line over all of them.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod tools;
