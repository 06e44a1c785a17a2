//! The command line: one `echod` binary whose subcommands are the daemon and its tools,
//! so a container image or a package carries everything an operator needs.
//!
//! Only the commands that read the daemon's configuration (`serve`, `check-config`,
//! `probe`) take `--config`/`--log-*`; the client and the load generator talk to any
//! echo server and would only ignore them.

use std::ffi::OsString;
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

    /// The flags that load `source` again (the inverse of [`ConfigArgs::source`]): how
    /// the daemon has a new binary check its configuration before upgrading to it.
    pub fn flags_for(source: &ConfigSource) -> Vec<OsString> {
        let mut flags = Vec::new();
        if let Some(file) = &source.file {
            flags.push("--config".into());
            flags.push(file.clone().into_os_string());
        }
        for (key, value) in &source.overrides {
            let flag = match key.as_str() {
                "log.level" => "--log-level",
                "log.format" => "--log-format",
                _ => continue,
            };
            flags.push(flag.into());
            flags.push(value.into());
        }
        flags
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
    /// Asked by a running echod before it execs this binary in an upgrade: can this
    /// binary take over the listeners described on stdin and serve the configuration?
    /// Prints the handover versions it reads; exit 0 yes, 1 no, 78 a bad configuration.
    #[command(hide = true)]
    UpgradeCheck(ConfigArgs),
    /// Ask a running echod to reload (SIGHUP) and wait for its verdict: exit 0 when the
    /// new configuration (or binary) is in force, 1 with the reason when it was refused.
    /// The unit's `ExecReload=`; needs the runtime directory the unit gives echod.
    Reload {
        /// The daemon's process ID (`$MAINPID` in a unit).
        #[arg(long)]
        pid: i32,
        /// How long to wait for the verdict (an upgrade drains connections first).
        #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// `check-config` with the flags made from a source loads that very source.
    #[test]
    fn flags_for_a_source_give_it_back() {
        for args in [
            vec!["echod"],
            vec!["echod", "--config", "/etc/echod/echod.toml"],
            vec!["echod", "serve", "-c", "/x y.toml", "--log-level", "debug"],
            vec![
                "echod",
                "--log-format",
                "json",
                "serve",
                "--log-level",
                "warn",
            ],
        ] {
            let cli = Cli::parse_from(&args);
            let source = match cli.command {
                Some(Command::Serve(a)) => a.or(&cli.config).source(),
                None => cli.config.source(),
                Some(other) => panic!("{other:?}"),
            };
            let mut again = vec![OsString::from("echod"), "check-config".into()];
            again.extend(ConfigArgs::flags_for(&source));
            let Some(Command::CheckConfig(checked)) = Cli::parse_from(again).command else {
                panic!("not check-config");
            };
            let back = checked.source();
            assert_eq!(back.file, source.file, "{args:?}");
            assert_eq!(back.overrides, source.overrides, "{args:?}");
        }
    }
}
