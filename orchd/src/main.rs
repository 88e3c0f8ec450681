//! `orchd`: the command line. Parses arguments, loads settings, starts tracing, and calls the
//! library. Exit codes: 0 success, 1 a check failed, 2 usage, configuration or IO error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use orch_store::{SqliteStore, Store};
use orchd::config::Settings;
use orchd::{AppState, SystemClock};

/// orchd — an offline-first job orchestrator on an embedded, hash-chained SQLite ledger.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: the HTTP control plane and the background services (lease reaper).
    Serve {
        /// Settings file (TOML). `ORCHD_*` environment variables override it.
        #[arg(long, env = "ORCHD_CONFIG")]
        config: Option<PathBuf>,
        /// Ledger file; created and migrated if absent [default: ./orchd.db].
        #[arg(long)]
        db: Option<PathBuf>,
        /// Address to listen on [default: 127.0.0.1:8080].
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Also run a small demo workload (two tenants, an in-process worker).
        #[arg(long)]
        demo: bool,
    },
    /// Verify a ledger: every event's hash, each tenant's hash chain, and that replaying the
    /// history reproduces the jobs table exactly. Exit 1 if anything is wrong.
    Check {
        /// Ledger file.
        #[arg(long, default_value = "orchd.db")]
        db: PathBuf,
        /// Print the report as one JSON document.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("orchd: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { config, db, listen, demo } => {
            let mut settings = Settings::load(config.as_deref(), std::env::vars())?;
            if let Some(db) = db {
                settings.db = db;
            }
            if let Some(listen) = listen {
                settings.listen = listen;
            }
            settings.demo |= demo;
            init_tracing(settings.log_format == "json");
            serve(settings)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { db, json } => {
            if !db.exists() {
                anyhow::bail!("{}: no such ledger", db.display());
            }
            let store = SqliteStore::open(&db, Arc::new(SystemClock), Default::default(), Default::default())
                .with_context(|| format!("opening {}", db.display()))?;
            let report = orch_store::check_ledger(&store)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else if report.ok() {
                println!(
                    "ok: {} events in {} chains, {} jobs reproduced by replay",
                    report.events, report.tenants, report.jobs
                );
            } else {
                for p in &report.problems {
                    println!("FAIL {p}");
                }
            }
            Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}

fn serve(settings: Settings) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let clock = Arc::new(SystemClock);
        let sync = settings.sync_mode()?;
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&settings.db, clock.clone(), settings.store_options(), sync)
                .with_context(|| format!("opening ledger {}", settings.db.display()))?,
        );
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("binding {}", settings.listen))?;
        tracing::info!(db = %settings.db.display(), "ledger open");
        let demo = settings.demo;
        let state = AppState::new(store, clock, settings);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let demo_tasks = if demo { orchd::demo::spawn(&state, stop_rx) } else { Vec::new() };
        let shutdown = async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
            for t in demo_tasks {
                let _ = t.await;
            }
        };
        orchd::run(listener, state, shutdown).await
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
