//! The command line: one `echod` binary whose subcommands are the daemon and its tools,
//! so a container image or a package carries everything an operator needs.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigSource, LogFormat};

/// echod — a production-grade TCP and UDP echo daemon (RFC 862).
#[derive(Debug, Parser)]
#[command(name = "echod", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("ECHOD_REVISION"), ")"))]
pub struct Cli {
    /// Where the configuration comes from.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Flags that select and override the configuration, shared by every subcommand.
#[derive(Debug, Args, Clone, Default)]
pub struct ConfigArgs {
    /// TOML config file; without it the embedded defaults apply (see config/echod.toml).
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "ECHOD_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    /// Overrides log.level (RUST_LOG overrides both).
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Overrides log.format.
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormatArg>,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(f: LogFormatArg) -> Self {
        match f {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

impl ConfigArgs {
    /// The configuration layers these flags describe.
    pub fn source(&self) -> ConfigSource {
        let mut overrides = Vec::new();
        if let Some(level) = &self.log_level {
            overrides.push(("log.level".to_string(), level.clone()));
        }
        if let Some(format) = self.log_format {
            let name = match LogFormat::from(format) {
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
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default).
    Serve,
    /// Validate the configuration exactly as start-up and reload do, and print the
    /// effective result.
    CheckConfig,
    /// Health check: send a nonce over TCP/UDP and expect it back, or GET an HTTP URL;
    /// without targets, probe the local configuration. Exit 0 healthy, 1 unhealthy.
    Probe(crate::probe::ProbeArgs),
    /// Talk to an echo server: a prompt on a terminal, a byte-exact pipe otherwise.
    Client(crate::client::ClientArgs),
    /// Load an echo server and verify every echoed byte; report throughput and latency.
    Bench(crate::bench::BenchArgs),
}
