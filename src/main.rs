//! Entry point: parses the command line, turns signals into the daemon's stop
//! and reloads, and maps every outcome to an exit code (`offloadd::exit`).

use clap::Parser;
use futures::StreamExt;
use offloadd::cli::{Cli, Command};
use offloadd::config::{self, preflight, Active, RootCheck};
use offloadd::control::client as control;
use offloadd::observe::logging;
use offloadd::{daemon, exit};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::process::ExitCode;
use tokio::sync::{mpsc, oneshot};

/// Runs the daemon with SIGTERM/SIGINT as its stop and SIGHUP as a reload.
async fn run_with_signals(config: config::Config) -> Result<(), daemon::Fatal> {
    let signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| daemon::Fatal::Runtime(format!("cannot install signal handlers: {e}")))?;
    let handle = signals.handle();
    let (reload_tx, reload_rx) = mpsc::channel(4);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let listener = tokio::spawn(async move {
        let mut signals = signals;
        let mut stop_tx = Some(stop_tx);
        while let Some(sig) = signals.next().await {
            if sig == SIGHUP {
                // A reload already waiting covers this one.
                let _ = reload_tx.try_send(());
            } else if let Some(tx) = stop_tx.take() {
                tracing::info!(signal = sig, "stop requested");
                let _ = tx.send(());
            }
        }
    });
    let result = daemon::run(config, reload_rx, async {
        let _ = stop_rx.await;
    })
    .await;
    // The listener only forwards signals: end it rather than wait for the
    // closed stream to say so (it can miss that wake-up when the daemon
    // fails before the listener first ran, and `run` then hung instead of
    // exiting 78).
    handle.close();
    listener.abort();
    let _ = listener.await;
    result
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = match cli.command {
        Command::Run
        | Command::CheckConfig { .. }
        | Command::Delete { .. }
        | Command::Backfill { .. } => RootCheck::MustExist,
        Command::Status { .. }
        | Command::Locate { .. }
        | Command::TestConnection { .. }
        | Command::Retry { .. } => RootCheck::MayBeAway,
    };
    let loaded = match config::load(&cli.config, root) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("offloadd: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let config = loaded.config;
    match cli.command {
        Command::Run => {
            offloadd::pipeline::budget::tune_allocator();
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
                    return ExitCode::from(exit::NEGATIVE);
                }
            };
            let result = rt.block_on(run_with_signals(config));
            // A blocking read still running must not hold up the exit.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            match result {
                Ok(()) => ExitCode::from(exit::SUCCESS),
                Err(e) => {
                    logging::fatal(&e.to_string());
                    ExitCode::from(exit::of_fatal(&e))
                }
            }
        }
        Command::CheckConfig { samples } => {
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
            if !config.rules.is_empty() || !samples.is_empty() {
                let samples = if samples.is_empty() {
                    preflight::sample_files(&config.watch.root, 5)
                } else {
                    let mut parsed = Vec::new();
                    for s in &samples {
                        match offloadd::keys::RelPath::parse(s) {
                            Ok(r) => parsed.push(r),
                            Err(e) => {
                                eprintln!("offloadd: --sample {s}: {e}");
                                return ExitCode::from(exit::USAGE);
                            }
                        }
                    }
                    parsed
                };
                for line in preflight::rule_lines(&config, &samples) {
                    println!("{line}");
                }
            }
            match config.active() {
                Active::Provider(_) if probes.iter().any(|p| !p.ok) => ExitCode::from(exit::CONFIG),
                Active::Provider(p) => {
                    println!("ok: provider `{}` is active and complete", p.name);
                    ExitCode::SUCCESS
                }
                Active::Local { reason } => {
                    eprintln!("offloadd: local mode: nothing would be offloaded because {reason}");
                    ExitCode::from(exit::CONFIG)
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
