//! The `echod` binary: parse the command line, load the configuration, hand over to
//! the library. Exit codes follow sysexits: 78 (EX_CONFIG) for a bad configuration.

use std::process::ExitCode;

use clap::Parser;
use echod::cli::{Cli, Command};
use echod::config::{Config, ConfigSource};

/// sysexits.h EX_CONFIG: the configuration is wrong; nothing was bound.
const EX_CONFIG: u8 = 78;

fn load(source: &ConfigSource) -> Result<Config, ExitCode> {
    source.load().map_err(|e| {
        eprintln!("echod: {e}");
        ExitCode::from(EX_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let source = cli.config.source();
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => match load(&source) {
            Ok(config) => {
                println!(
                    "# effective configuration ({} + environment)\n{}",
                    echod::config::describe_source(source.file.as_deref()),
                    config.to_toml()
                );
                eprintln!("echod: configuration OK");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Bench(args) => echod::bench::run(&args),
        Command::Client(args) => echod::client::run(&args),
        Command::Probe(args) => echod::probe::run(&args, &source),
        Command::Serve => match load(&source) {
            Ok(config) => serve(source, config),
            Err(code) => code,
        },
    }
}

fn serve(source: ConfigSource, config: Config) -> ExitCode {
    let log = echod::logging::init(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("echod-worker")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(echod::server::run(source, config, log)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("echod: {e}");
            ExitCode::FAILURE
        }
    }
}
