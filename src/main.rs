//! Entry point: parses the command line and wires the modules together.

use clap::Parser;
use offloadd::cli::{Cli, Command};
use offloadd::config::{self, Active};
use offloadd::{control, daemon, logging, preflight};
use std::process::ExitCode;

const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let loaded = match config::load(&cli.config) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("offloadd: {e}");
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    let config = loaded.config;
    match cli.command {
        Command::Run => {
            logging::init(config.log.format, &config.log.level);
            for w in &loaded.warnings {
                tracing::warn!("{w}");
            }
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("offloadd: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = rt.block_on(daemon::run(config));
            // A directory walk still running must not hold up the exit.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("offloadd: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig => {
            for w in &loaded.warnings {
                eprintln!("offloadd: warning: {w}");
            }
            print!("{}", config.report());
            let probes = preflight::run(
                &config.watch.root,
                &config.state_dir,
                config.storage.delete_local,
            );
            for p in &probes {
                if p.ok {
                    println!("{}", p.line);
                } else {
                    eprintln!("offloadd: {}", p.line);
                }
            }
            match config.active() {
                Active::Provider(_) if probes.iter().any(|p| !p.ok) => ExitCode::from(EX_CONFIG),
                Active::Provider(p) => {
                    println!("ok: provider `{}` is active and complete", p.name);
                    ExitCode::SUCCESS
                }
                Active::Local { reason } => {
                    eprintln!("offloadd: local mode: nothing would be offloaded because {reason}");
                    ExitCode::from(EX_CONFIG)
                }
            }
        }
        Command::Status { json } => control::status(&config, json),
        Command::Locate { rel_path } => control::locate(&config, &rel_path),
        Command::TestConnection { provider } => {
            control::test_connection_cli(&config, provider.as_deref())
        }
        Command::Retry { rel_path, all } => control::retry(&config, rel_path.as_deref(), all),
        Command::Delete { rel_path } => control::delete(&config, &rel_path),
        Command::Backfill { dry_run } => control::backfill(&config, dry_run),
    }
}
