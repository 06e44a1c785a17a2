//! The command line: one `echod` binary whose subcommands are the daemon and its tools,
//! so a container image or a package carries everything an operator needs.
//!
//! Only the commands that read the daemon's configuration (`serve`, `check-config`,
//! `probe`) take `--config`/`--log-*`; the client and the load generator talk to any
//! echo server and would only ignore them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigSource, LogFormat};
use crate::tools::{BenchArgs, ClientArgs, ProbeArgs};

/// echod — a production-grade TCP and UDP echo daemon (RFC 862).
#[derive(Debug, Parser)]
#[command(name = "echod", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("ECHOD_REVISION"), ")"))]
pub struct Cli {
    /// Configuration for `serve` when no subcommand is given (`echod --config FILE`).
    #[command(flatten)]
    pub config: ConfigArgs,
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Flags that select and override the configuration.
#[derive(Debug, Args, Clone, Default)]
pub struct ConfigArgs {
    /// TOML config file; without it the embedded defaults apply (`echod check-config` prints them).
    #[arg(long, short = 'c', env = "ECHOD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Overrides log.level (RUST_LOG overrides both).
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Overrides log.format.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

impl ConfigArgs {
    /// The configuration layers these flags describe.
    pub fn source(&self) -> ConfigSource {
        let mut overrides = Vec::new();
        if let Some(level) = &self.log_level {
            overrides.push(("log.level".to_string(), level.clone()));
        }
        if let Some(format) = self.log_format {
            let name = match format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            };
            overrides.push(("log.format".to_string(), name.to_string()));
        }
        ConfigSource {
            file: self.config.clone(),
            overrides,
        }
    }

    /// Flags given after the subcommand win over those given before it.
    pub fn or(self, outer: &ConfigArgs) -> ConfigArgs {
        ConfigArgs {
            config: self.config.or_else(|| outer.config.clone()),
            log_level: self.log_level.or_else(|| outer.log_level.clone()),
            log_format: self.log_format.or(outer.log_format),
        }
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default).
    Serve(ConfigArgs),
    /// Validate the configuration exactly as start-up and reload do, and print the
    /// effective result.
    CheckConfig(ConfigArgs),
    /// Health check: send a nonce over TCP/UDP and expect it back, or GET an HTTP URL;
    /// without targets, probe the local configuration. Exit 0 healthy, 1 unhealthy.
    Probe {
        /// Where the local configuration comes from (used without targets).
        #[command(flatten)]
        config: ConfigArgs,
        /// What to check.
        #[command(flatten)]
        args: ProbeArgs,
    },
    /// Talk to an echo server: a prompt on a terminal, a byte-exact pipe otherwise.
    Client(ClientArgs),
    /// Load an echo server and verify every echoed byte; report throughput and latency.
    Bench(BenchArgs),
}
