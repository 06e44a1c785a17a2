//! Configuration: embedded defaults → TOML file → `ECHOD_*` environment → CLI overrides.
//!
//! Loading is a pure function of its inputs, so the same code validates at start-up,
//! in `echod check-config` and on reload: a config that one accepts, all accept.
//! Every error names where the bad value came from (the file or the environment), the
//! dotted key and what is wrong, because an operator reading a journal has nothing else.
//!
//! This module depends on nothing else in the crate: the daemon, the tools and the
//! command line all read it, so it sits at the bottom of the house.

use std::path::Path;

mod cidr;
mod pem;
mod schema;
mod sources;
mod tls;
mod validate;
pub mod web;
pub use cidr::{Cidr, CidrError, admits};
pub use schema::*;
pub use sources::{ConfigError, ConfigSource};
pub use tls::TlsMaterial;
pub use validate::{MAX_LOG_FILTER_LEN, parse_log_filter};
pub use web::{WebConfig, WebConfigError};

/// Names the configuration source for log lines; echod reads only a file it is told
/// about, so a stray file on disk cannot change its behaviour.
pub fn describe_source(file: Option<&Path>) -> String {
    file.map_or_else(
        || "embedded defaults".to_string(),
        |p| p.display().to_string(),
    )
}

#[cfg(test)]
mod tests;
