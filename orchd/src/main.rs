//! `orchd`: the command line. Parses arguments, loads settings, starts tracing, and calls the
//! library. Exit codes: 0 success, 1 a check failed or the thing named does not exist, 2 usage,
//! configuration or IO error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use orch_store::{Location, Store};
use orchd::config::Settings;
use orchd::{AppState, SystemClock};

/// jemalloc returns freed memory to the system; glibc's malloc, with an arena per thread of
/// tokio's blocking pool, kept it, and RSS grew under sustained load while the live heap did not.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
        /// Ledger: a SQLite file, or a `postgres://` URL that several orchd may share; created
        /// and migrated if absent [default: ./orchd.db].
        #[arg(long)]
        db: Option<Location>,
        /// Address to listen on [default: 127.0.0.1:8080].
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Also run a small demo workload (two tenants, an in-process worker).
        #[arg(long)]
        demo: bool,
    },
    /// Manage API tokens (bound to a tenant, or `*` for site administrators, with scopes).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Print the control plane's OpenAPI 3.1 document.
    Openapi,
    /// Import a bundle from another site (Offline Kit): verify it as orch-verify does, plan it
    /// against what was imported before, and apply it in one transaction. Exit 1 if refused.
    Import {
        /// The bundle (.tar.zst).
        file: PathBuf,
        /// Ledger: a SQLite file or a `postgres://` URL.
        #[arg(long, default_value = "orchd.db")]
        db: Location,
        /// The trusted root.json.
        #[arg(long)]
        root: PathBuf,
        /// A directory of newer roots (`N.root.json`) to rotate to.
        #[arg(long)]
        root_chain: Option<PathBuf>,
        /// Largest allowed age of the bundle's time anchor, e.g. `30d`.
        #[arg(long)]
        max_age: Option<String>,
        /// Only print the plan.
        #[arg(long)]
        dry_run: bool,
        /// Accept a bundle older (time anchor or trust root) than what was imported before.
        #[arg(long, requires_all = ["reason", "ticket"])]
        allow_rollback: bool,
        /// Why (recorded in the audit history).
        #[arg(long)]
        reason: Option<String>,
        /// The change ticket (recorded in the audit history).
        #[arg(long)]
        ticket: Option<String>,
        /// Print the plan (and outcome) as one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Pause claims of a tenant, a job type or a source (audited); a running daemon on the
    /// same ledger applies it within `flow.reload_ms`.
    Pause {
        #[command(flatten)]
        on: ControlArgs,
    },
    /// Resume what `pause` paused (audited).
    Resume {
        #[command(flatten)]
        on: ControlArgs,
    },
    /// Lower a rate limit (`--host H`, or the tenant's) for a while (audited).
    Throttle {
        /// Ledger: a SQLite file or a `postgres://` URL.
        #[arg(long, default_value = "orchd.db")]
        db: Location,
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The source host whose rate limit to lower (default: the tenant's own).
        #[arg(long)]
        host: Option<String>,
        /// Tokens per second while the throttle lasts.
        #[arg(long)]
        rate: f64,
        /// How long, e.g. `30m`.
        #[arg(long = "for")]
        duration: String,
        /// Why (recorded in the audit history).
        #[arg(long)]
        reason: String,
        /// The change ticket.
        #[arg(long)]
        ticket: Option<String>,
    },
    /// Retry a dead-lettered or cancelled job (`--job`), or every dead-lettered job (of `--queue`).
    Retry {
        /// Ledger: a SQLite file or a `postgres://` URL.
        #[arg(long, default_value = "orchd.db")]
        db: Location,
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// One job.
        #[arg(long, conflicts_with_all = ["queue", "all_dead"])]
        job: Option<i64>,
        /// Dead-lettered jobs of this type.
        #[arg(long)]
        queue: Option<String>,
        /// Every dead-lettered job of the tenant.
        #[arg(long = "all-dead")]
        all_dead: bool,
        /// Why (recorded on each job's event).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Cancel a job that has not finished.
    Cancel {
        /// Ledger: a SQLite file or a `postgres://` URL.
        #[arg(long, default_value = "orchd.db")]
        db: Location,
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The job.
        #[arg(long)]
        job: i64,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Replay a run: start a new run with the same jobs and dependencies (audited).
    Replay {
        /// Ledger: a SQLite file or a `postgres://` URL.
        #[arg(long, default_value = "orchd.db")]
        db: Location,
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The run.
        #[arg(long)]
        run: i64,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
        /// The change ticket.
        #[arg(long)]
        ticket: Option<String>,
    },
    /// Move a site's SQLite ledger into an empty PostgreSQL ledger (stop orchd first): every
    /// row in one transaction, then the same check as `orchd check` on the copy. The site keeps
    /// its id and history, so its bundles stay byte-identical. Exit 1 if the target is not empty.
    CopyLedger {
        /// The SQLite ledger file.
        #[arg(long)]
        from: PathBuf,
        /// The PostgreSQL ledger (`postgres://…`).
        #[arg(long)]
        to: Location,
        /// Print the report as one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Verify a ledger: every event's hash, each tenant's hash chain, and that replaying the
    /// history reproduces the jobs table exactly. Exit 1 if anything is wrong.
    Check {
        /// Ledger: a SQLite file or a `postgres://` URL.
        #[arg(long, default_value = "orchd.db")]
        db: Location,
        /// Print the report as one JSON document.
        #[arg(long)]
        json: bool,
    },
}

/// What an operator control applies to.
#[derive(clap::Args)]
struct ControlArgs {
    /// Ledger: a SQLite file or a `postgres://` URL.
    #[arg(long, default_value = "orchd.db")]
    db: Location,
    /// The tenant.
    #[arg(long)]
    tenant: String,
    /// Only this job type.
    #[arg(long, conflicts_with = "source")]
    queue: Option<String>,
    /// Only this source.
    #[arg(long)]
    source: Option<String>,
    /// Why (recorded in the audit history).
    #[arg(long)]
    reason: Option<String>,
    /// The change ticket.
    #[arg(long)]
    ticket: Option<String>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it once on stdout (only its hash is stored).
    Create {
        /// Ledger: a SQLite file or a `postgres://` URL.
        #[arg(long, default_value = "orchd.db")]
        db: Location,
        /// The tenant the token is bound to, or `*` for a site administrator.
        #[arg(long)]
        tenant: String,
        /// Comma-separated scopes: orch:read, orch:work, orch:operate, orch:quota, orch:backfill, orch:admin.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// Expiry: a duration from now (`30d`, `12h`) or an RFC 3339 time. Default: never.
        #[arg(long)]
        expires: Option<String>,
        /// A note saying whose token it is.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Revoke a token by id; it stops working at once.
    Revoke {
        /// Ledger: a SQLite file or a `postgres://` URL.
        #[arg(long, default_value = "orchd.db")]
        db: Location,
        /// The token's id (as `token list` shows).
        id: String,
    },
    /// List tokens (never their secrets).
    List {
        /// Ledger: a SQLite file or a `postgres://` URL.
        #[arg(long, default_value = "orchd.db")]
        db: Location,
        /// One JSON document.
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
        Command::Token { command } => token(command),
        Command::Import { file, db, root, root_chain, max_age, dry_run, allow_rollback, reason, ticket, json } => {
            let (root, root_chain) =
                orch_verify::load_roots(&root, root_chain.as_deref()).map_err(anyhow::Error::msg)?;
            let max_age_ms = max_age
                .map(|s| orch_verify::parse_max_age(&s).with_context(|| format!("--max-age {s:?}")))
                .transpose()?;
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let opts = orchd::import::ImportOptions {
                root,
                root_chain,
                now: orch_core::Clock::now(&SystemClock),
                max_age_ms,
                allow_rollback,
                reason,
                ticket,
            };
            let store = open(&db, true)?;
            let actor = format!("cli:{}", std::env::var("USER").unwrap_or_else(|_| "operator".into()));
            match orchd::import::import(&*store, &actor, &bytes, &opts, !dry_run) {
                Ok((plan, outcome)) => {
                    if json {
                        println!("{}", serde_json::json!({ "plan": plan, "outcome": outcome }));
                    } else {
                        let what = format!(
                            "site {} events {}..={} ({} events, {} jobs)",
                            plan.site_id, plan.from_seq, plan.to_seq, plan.events, plan.jobs
                        );
                        match (&outcome, plan.status.as_str()) {
                            (_, "already_imported") => println!("already imported: {what}; nothing to do"),
                            (Some(o), _) => println!("imported {what}; audit event {}", o.audit_seq),
                            (None, _) => println!("would import {what}"),
                        }
                        for o in &plan.overrides {
                            println!("override: {o}");
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e @ (orchd::import::ImportError::Store(_) | orchd::import::ImportError::ReasonRequired)) => {
                    Err(e.into())
                }
                Err(e) => {
                    eprintln!("orchd: refused: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Pause { on } => pause(on, false),
        Command::Resume { on } => pause(on, true),
        Command::Throttle { db, tenant, host, rate, duration, reason, ticket } => {
            let store = open_existing(&db)?;
            let id = host.map_or_else(|| "tenant".to_string(), |h| format!("host:{h}"));
            let d = humantime::parse_duration(&duration).with_context(|| format!("--for {duration:?}"))?;
            let current = store
                .settings(&orch_store::Scope::Tenant(tenant.clone()), orch_store::SettingKind::RateLimit)?
                .into_iter()
                .find(|s| s.id == id)
                .with_context(|| format!("tenant {tenant} has no rate limit {id}: set one before throttling it"))?;
            let mut doc: orchd::flow::RateLimitDoc = serde_json::from_value(current.doc)?;
            if reason.trim().is_empty() {
                anyhow::bail!("--reason must say why");
            }
            let now = orch_core::Clock::now(&SystemClock);
            let for_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            doc.throttle(rate, for_ms, now)
                .map_err(|(_, e)| anyhow::anyhow!("{e} (--rate {rate}, --for {duration})"))?;
            let until = doc.throttle.as_ref().map(|t| t.until).expect("just set");
            let change = orch_store::SettingChange {
                tenant,
                project: "default".into(),
                kind: orch_store::SettingKind::RateLimit,
                id: id.clone(),
                doc: serde_json::to_value(doc)?,
                reason: Some(reason),
                ticket,
            };
            let ev = store.put_setting(&cli_actor(), change)?;
            println!("throttled {id} to {rate}/s until {until}; audit event {}", ev.seq);
            Ok(ExitCode::SUCCESS)
        }
        Command::Retry { db, tenant, job, queue, all_dead, reason } => {
            let store = open_existing(&db)?;
            let scope = orch_store::Scope::Tenant(tenant);
            match job {
                Some(id) => match store.retry(&scope, id, &cli_actor(), reason) {
                    Ok(j) => println!("job {} is {} again", j.id, j.state.as_str()),
                    Err(e) => return not_found_is_1(e),
                },
                None if queue.is_some() || all_dead => {
                    let jobs = store.retry_dead(&scope, queue.as_deref(), &cli_actor(), reason, 100_000)?;
                    println!("retried {} dead-lettered jobs", jobs.len());
                }
                None => anyhow::bail!("say which: --job ID, --queue TYPE or --all-dead"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { db, tenant, job, reason } => {
            let store = open_existing(&db)?;
            match store.cancel(&orch_store::Scope::Tenant(tenant), job, &cli_actor(), reason) {
                Ok(j) => println!("job {} is {}", j.id, j.state.as_str()),
                Err(e) => return not_found_is_1(e),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay { db, tenant, run, reason, ticket } => {
            let store = open_existing(&db)?;
            let scope = orch_store::Scope::Tenant(tenant);
            match orchd::http::flow::replay_run(&*store, &scope, &cli_actor(), run, reason, ticket) {
                Ok((new, jobs)) => println!("run {new_id} replays run {run} with {} jobs", jobs.len(), new_id = new.id),
                Err(e) => return not_found_is_1(e),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Openapi => {
            println!("{}", serde_json::to_string_pretty(&orchd::http::openapi_document())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::CopyLedger { from, to, json } => {
            let Location::Postgres(url) = &to else {
                anyhow::bail!("--to must be a postgres:// URL (copy-ledger moves a SQLite ledger into PostgreSQL)");
            };
            if !from.exists() {
                anyhow::bail!("{}: no such ledger", from.display());
            }
            let src =
                orch_store::SqliteStore::open(&from, Arc::new(SystemClock), Default::default(), Default::default())
                    .with_context(|| format!("opening {}", from.display()))?;
            let dst = orch_store::PgStore::open(url, Arc::new(SystemClock), Default::default())
                .with_context(|| format!("opening {to}"))?;
            let report = match orch_store::copy_ledger(&src, &dst) {
                Ok(r) => r,
                Err(e @ orch_store::StoreError::Refused(_)) => {
                    eprintln!("orchd: refused: {e}");
                    return Ok(ExitCode::from(1));
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("copying {} to {to}", from.display()))),
            };
            let check = orch_store::check_ledger(&dst)?;
            if json {
                println!("{}", serde_json::json!({ "copy": report, "check": check }));
            } else {
                let rows: u64 = report.tables.iter().map(|(_, n)| n).sum();
                println!("copied {rows} rows of site {} from {} to {to}", report.site_id, from.display());
                for p in &check.problems {
                    println!("FAIL {p}");
                }
                if check.ok() {
                    println!(
                        "ok: {} events in {} chains, {} jobs reproduced by replay",
                        check.events, check.tenants, check.jobs
                    );
                }
            }
            Ok(if check.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Check { db, json } => {
            let store = open_existing(&db)?;
            let report = orch_store::check_ledger(&*store)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else if report.ok() {
                println!(
                    "ok: {} events in {} chains, {} jobs reproduced by replay",
                    report.events, report.tenants, report.jobs
                );
                if report.imported_events > 0 {
                    println!(
                        "ok: {} imported events, {} imported jobs reproduced by replay",
                        report.imported_events, report.imported_jobs
                    );
                }
            } else {
                for p in &report.problems {
                    println!("FAIL {p}");
                }
            }
            Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}

/// Who a command acts as, in the audit history.
fn cli_actor() -> String {
    format!("cli:{}", std::env::var("USER").unwrap_or_else(|_| "operator".into()))
}

/// A job or run that does not exist (in the tenant) is exit 1 with one line; other errors 2.
fn not_found_is_1(e: orch_store::StoreError) -> anyhow::Result<ExitCode> {
    match e {
        orch_store::StoreError::NotFound(_) | orch_store::StoreError::Missing { .. } => {
            eprintln!("orchd: {e}");
            Ok(ExitCode::from(1))
        }
        e => Err(e.into()),
    }
}

/// `orchd pause` and `orchd resume`.
fn pause(on: ControlArgs, resume: bool) -> anyhow::Result<ExitCode> {
    let store = open_existing(&on.db)?;
    let id = match (&on.queue, &on.source) {
        (Some(q), _) => format!("queue:{q}"),
        (None, Some(s)) => format!("source:{s}"),
        (None, None) => "tenant".into(),
    };
    let change = orch_store::SettingChange {
        tenant: on.tenant.clone(),
        project: "default".into(),
        kind: orch_store::SettingKind::Pause,
        id: id.clone(),
        doc: serde_json::json!({"since": orch_core::Clock::now(&SystemClock)}),
        reason: on.reason,
        ticket: on.ticket,
    };
    let result =
        if resume { store.delete_setting(&cli_actor(), change) } else { store.put_setting(&cli_actor(), change) };
    match result {
        Ok(ev) => {
            let what = if resume { "resumed" } else { "paused" };
            println!("{what} {id} of tenant {}; audit event {}", on.tenant, ev.seq);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => not_found_is_1(e),
    }
}

/// Opens a ledger that must exist already.
fn open_existing(db: &Location) -> anyhow::Result<Arc<dyn Store>> {
    open(db, false)
}

/// Opens a ledger (creating it, with `create`) for a command.
fn open(db: &Location, create: bool) -> anyhow::Result<Arc<dyn Store>> {
    match db.open(Arc::new(SystemClock), Default::default(), Default::default(), create) {
        Err(orch_store::StoreError::Missing { what: "ledger", .. }) => anyhow::bail!("{db}: no such ledger"),
        r => r.with_context(|| format!("opening {db}")),
    }
}

fn token(command: TokenCommand) -> anyhow::Result<ExitCode> {
    use orchd::http::auth;
    match command {
        TokenCommand::Create { db, tenant, scopes, expires, label } => {
            for s in &scopes {
                if !auth::ALL_SCOPES.contains(&s.as_str()) {
                    anyhow::bail!("unknown scope {s:?}; scopes are {}", auth::ALL_SCOPES.join(", "));
                }
            }
            let now = orch_core::Clock::now(&SystemClock);
            let expires_at = expires.as_deref().map(|e| parse_expiry(e, now)).transpose()?;
            let store = open(&db, true)?;
            let (id, secret) = auth::mint_token();
            let record = store.put_token(orch_store::NewToken {
                id,
                tenant,
                scopes,
                label,
                expires_at,
                hash: auth::token_hash(&secret),
            })?;
            eprintln!(
                "created token {} for tenant {} with scopes {}{}; it is shown only once:",
                record.id,
                record.tenant,
                record.scopes.join(","),
                record.expires_at.map(|e| format!(", expiring {e}")).unwrap_or_default()
            );
            println!("{secret}");
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Revoke { db, id } => {
            let store = open_existing(&db)?;
            match store.revoke_token(&id) {
                Ok(t) => {
                    println!("revoked token {} (tenant {})", t.id, t.tenant);
                    Ok(ExitCode::SUCCESS)
                }
                Err(orch_store::StoreError::Missing { .. }) => {
                    eprintln!("orchd: no token with id {id:?}");
                    Ok(ExitCode::from(1))
                }
                Err(e) => Err(e.into()),
            }
        }
        TokenCommand::List { db, json } => {
            let tokens = open_existing(&db)?.tokens()?;
            if json {
                println!("{}", serde_json::to_string(&tokens)?);
            } else {
                for t in tokens {
                    let status = if t.revoked_at.is_some() { "revoked" } else { "active" };
                    let expires = t.expires_at.map_or("never".to_string(), |e| e.to_string());
                    println!(
                        "{}\t{}\t{}\t{status}\texpires {expires}\t{}",
                        t.id,
                        t.tenant,
                        t.scopes.join(","),
                        t.label
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `30d`-style durations from `now`, or an RFC 3339 instant.
fn parse_expiry(text: &str, now: orch_core::Timestamp) -> anyhow::Result<orch_core::Timestamp> {
    if let Ok(d) = humantime::parse_duration(text) {
        let at = now.plus_millis(d.as_millis().min(i64::MAX as u128) as i64);
        // An instant past year 9999 could be stored but not read back as text.
        orch_core::Timestamp::parse(&at.to_string())
            .map_err(|_| anyhow::anyhow!("--expires {text:?}: too far in the future"))?;
        return Ok(at);
    }
    orch_core::Timestamp::parse(text)
        .map_err(|_| anyhow::anyhow!("--expires {text:?}: expected a duration like 30d or an RFC 3339 time"))
}

fn serve(settings: Settings) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let jwt = orchd::jwt::JwtVerifier::from_settings(&settings.jwt).context("loading the JWT settings")?;
    rt.block_on(async move {
        let clock = Arc::new(SystemClock);
        let sync = settings.sync_mode()?;
        let store = settings
            .db
            .open(clock.clone(), settings.store_options(), sync, true)
            .with_context(|| format!("opening ledger {}", settings.db))?;
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("binding {}", settings.listen))?;
        tracing::info!(db = %settings.db, "ledger open");
        let demo = settings.demo;
        let state = AppState::new(store, clock, settings).with_jwt(jwt);
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
