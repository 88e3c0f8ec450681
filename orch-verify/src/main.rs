//! `orch-verify`: verify an audit bundle offline; prove and check that one event is in a bundle.
//! Exit codes: 0 every check passed, 1 a check failed, 2 usage error or unreadable input.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use orch_core::Timestamp;
use orch_verify::{proof, verify, VerifyOptions};

/// The readers of `history.jsonl` allocate events on their threads and the verifier frees them on
/// its own: jemalloc does that faster than glibc's malloc (the figures are in
/// docs/performance.md). The same allocator as `orchd`.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// orch-verify — checks an orch audit bundle against a trust root with no network: archive shape,
/// signatures, root rotation, file digests, hash chains, Merkle root, time anchor, and replay.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    verify: VerifyArgs,
}

#[derive(Args)]
struct VerifyArgs {
    /// The bundle (.tar.zst).
    #[arg(required = true)]
    file: Option<PathBuf>,
    #[command(flatten)]
    trust: TrustArgs,
    /// Print the report as one JSON document (schemas/verify-report.schema.json).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TrustArgs {
    /// The trusted root.json (required to verify a bundle).
    #[arg(long)]
    root: Option<PathBuf>,
    /// A directory of newer roots (`N.root.json`) to rotate to, in version order.
    #[arg(long)]
    root_chain: Option<PathBuf>,
    /// "Now" for staleness (RFC 3339) [default: the system clock].
    #[arg(long)]
    now: Option<String>,
    /// Largest allowed age of the time anchor, e.g. `30d`, `12h`.
    #[arg(long)]
    max_age: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Print a Merkle inclusion proof (JSON) that event SEQ is in the bundle.
    Prove {
        /// The bundle.
        file: PathBuf,
        /// The event's sequence number.
        #[arg(long)]
        event: u64,
    },
    /// Check an inclusion proof; with --bundle and --root, also that the bundle verifies and
    /// its signed manifest carries the proof's Merkle root.
    CheckProof {
        /// The proof (output of `prove`).
        proof: PathBuf,
        /// The bundle the proof claims.
        #[arg(long, requires = "root")]
        bundle: Option<PathBuf>,
        #[command(flatten)]
        trust: TrustArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("orch-verify: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn options(t: &TrustArgs) -> anyhow::Result<VerifyOptions> {
    let root_path = t.root.as_deref().context("--root is required")?;
    let (root, chain) = orch_verify::load_roots(root_path, t.root_chain.as_deref()).map_err(anyhow::Error::msg)?;
    let now = match &t.now {
        Some(s) => Some(Timestamp::parse(s)?),
        None => Some(Timestamp::from_millis(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
        )),
    };
    let max_age_ms = match &t.max_age {
        Some(s) => Some(orch_verify::parse_max_age(s).with_context(|| format!("--max-age {s:?}"))?),
        None => None,
    };
    Ok(VerifyOptions { root, root_chain: chain, now, max_age_ms })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        None => {
            let file = cli.verify.file.context("a bundle file is required")?;
            let opts = options(&cli.verify.trust)?;
            let bytes = read(&file)?;
            let report = verify(&bytes, &opts);
            if cli.verify.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                for f in &report.failures {
                    println!("FAIL {} {}: {}", f.check, f.entry, f.message);
                }
                if let (true, Some(s)) = (report.ok, &report.summary) {
                    println!(
                        "ok: {} events (seq {}..={}) and {} jobs of site {:?}, signed by {} key(s) of root v{}, merkle root {}",
                        s.events, s.from_seq, s.to_seq, s.jobs, s.site_id, s.signed_by.len(), s.root_version, s.merkle_root
                    );
                }
            }
            Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Some(Command::Prove { file, event }) => {
            let p = proof::prove(&read(&file)?, event).map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string_pretty(&p)?);
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::CheckProof { proof: path, bundle, trust }) => {
            let p: proof::EventProof =
                serde_json::from_slice(&read(&path)?).with_context(|| format!("{}: not a proof", path.display()))?;
            if let Err(e) = proof::check(&p) {
                println!("FAIL proof: {e}");
                return Ok(ExitCode::from(1));
            }
            if let Some(b) = bundle {
                let report = verify(&read(&b)?, &options(&trust)?);
                if !report.ok {
                    for f in &report.failures {
                        println!("FAIL {} {}: {}", f.check, f.entry, f.message);
                    }
                    return Ok(ExitCode::from(1));
                }
                let root = report.summary.map(|s| s.merkle_root).unwrap_or_default();
                if root != p.proof.root {
                    println!("FAIL proof: the bundle's signed Merkle root is {root}, the proof's is {}", p.proof.root);
                    return Ok(ExitCode::from(1));
                }
            } else if trust.root.is_some() {
                bail!("--root needs --bundle");
            }
            println!(
                "ok: event {} is leaf {} of {} under root {}",
                p.seq, p.proof.leaf_index, p.proof.tree_size, p.proof.root
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
