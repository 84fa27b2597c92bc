//! The `penstock` command: serve, or check a config file.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use penstock::Config;

#[global_allocator]
static ALLOCATOR: mialloc::Mimalloc = mialloc::Mimalloc;

#[derive(Parser)]
#[command(
    version,
    about = "A rate-limiting, retrying, coalescing reverse proxy for the OpenAI API"
)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, global = true, default_value = "config/penstock.toml")]
    config: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Validate the config file and print the effective config, secrets redacted.
    Check,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr through [`penstock::telemetry::logsink`]: lines gather in memory
/// and a thread of their own writes them every few milliseconds, so a
/// request's line costs no `write` on the worker. The guard writes what is
/// left when `main` ends.
fn init_logs(format: LogFormat) -> penstock::telemetry::logsink::Flushed {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PENSTOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, never into a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = penstock::telemetry::logsink::stderr();
    let direct = writer.clone();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => {
            // A request's line goes straight into the same sink.
            penstock::telemetry::logline::write_directly(move |line| direct.push(line));
            builder
                .event_format(penstock::telemetry::logline::Json)
                .init()
        }
    }
    guard
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("penstock: invalid config: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Check => {
            // Build what serving would build (the sidecar key must be present, the CA
            // file must parse) without binding anything.
            if let Err(e) = penstock::upstream::Upstream::several(
                &config.upstream,
                |k| std::env::var(k).ok(),
                None,
            ) {
                eprintln!("penstock: {}: {e}", cli.config.display());
                return ExitCode::from(2);
            }
            println!(
                "# {}: ok\n# jobs are kept {}\n{}",
                cli.config.display(),
                config.jobs_kept(),
                config.to_redacted_toml()
            );
            ExitCode::SUCCESS
        }
        Command::Serve => {
            let _flushed_at_exit = init_logs(cli.log_format);
            // With proxy threads of their own, this runtime only runs the admin
            // port and background work (budgets' timers, Redis, jobs): one
            // worker is enough. Serving the proxy itself, it gets one per core.
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if config.server.threads != 1 {
                builder.worker_threads(1);
            }
            let runtime = match builder.enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("penstock: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(serve(config, cli.config))
        }
    }
}

async fn serve(config: Config, path: PathBuf) -> ExitCode {
    let running = match penstock::start(&config, |k| std::env::var(k).ok()).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // Reloads: on SIGHUP, and when the file changes.
    let (reload, mut reloads) = tokio::sync::mpsc::channel::<()>(8);
    hangups(reload.clone());
    let _watcher = watch(&path, reload);
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(()) = reloads.recv() => {
                // An editor's save is several events: one reload for them all.
                tokio::time::sleep(RELOAD_DEBOUNCE).await;
                while reloads.try_recv().is_ok() {}
                running.reload_file(&path);
            }
        }
    }
    tracing::info!(grace = %humantime::format_duration(config.server.shutdown_grace), "shutting down: finishing in-flight requests");
    running.shutdown().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Changes to the config file closer together than this are one reload.
const RELOAD_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(300);

/// Each SIGHUP asks for a reload.
fn hangups(reload: tokio::sync::mpsc::Sender<()>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP: reloading the config");
                        let _ = reload.try_send(());
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: reload by editing the file")
            }
        }
    }
    #[cfg(not(unix))]
    let _ = reload;
}

/// Watches the config file's directory (editors replace files rather than
/// write them in place) and asks for a reload when the file changes.
fn watch(
    path: &std::path::Path,
    reload: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let path = std::path::absolute(path).ok()?;
    let dir = path.parent()?.to_path_buf();
    let name = path.file_name()?.to_os_string();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else {
            return;
        };
        if event.kind.is_access() {
            return;
        }
        if event
            .paths
            .iter()
            .any(|p| p.file_name() == Some(name.as_os_str()))
        {
            let _ = reload.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file: reload with SIGHUP");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the config file: reload with SIGHUP");
        return None;
    }
    Some(watcher)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
