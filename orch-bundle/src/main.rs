//! `orch-bundle`: export signed audit bundles and manage the keys and trust roots that sign them.
//! stdout carries results, stderr logs and errors. Exit codes: 0 ok, 2 usage or IO error.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use orch_core::bundle::{RedactionPolicy, Redactor};
use orch_core::trust::{Root, SigningKey};
use orch_core::Timestamp;
use orch_store::Scope;

/// orch-bundle — deterministic, signed audit bundles of an orch ledger.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a new Ed25519 key pair: DIR/NAME.key (secret, mode 0600) and DIR/NAME.pub.json
    /// (the public key as a TUF key object). Prints the key id.
    Keygen {
        /// Directory to write into (created if absent).
        #[arg(long)]
        out: PathBuf,
        /// File name stem.
        #[arg(long, default_value = "bundle")]
        name: String,
    },
    /// Manage a TUF-format trust root (root.json).
    #[command(subcommand)]
    Root(RootCommand),
    /// Export a signed bundle from a ledger (safe while orchd runs).
    Export {
        /// Ledger: a SQLite file or a `postgres://` URL.
        #[arg(long)]
        db: orch_store::Location,
        /// Signing key (repeat for several signatures).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// Output file (.tar.zst); written atomically.
        #[arg(long)]
        out: PathBuf,
        /// Export one tenant only.
        #[arg(long)]
        tenant: Option<String>,
        /// First sequence number.
        #[arg(long, default_value_t = 1)]
        from_seq: u64,
        /// Last sequence number [default: the ledger's head].
        #[arg(long)]
        to_seq: Option<u64>,
        /// The bundle this one continues (its manifest digest is recorded).
        #[arg(long)]
        previous: Option<PathBuf>,
        /// The site id recorded in the manifest [default: the ledger's own].
        #[arg(long)]
        site_id: Option<String>,
        /// Time anchor (RFC 3339) [default: the time of the last included event].
        #[arg(long)]
        anchor: Option<String>,
        /// Export the history imported from this origin site (a ledger rebuilt by `orchd import`)
        /// instead of the ledger's own; the manifest names the origin site.
        #[arg(long)]
        origin: Option<String>,
        /// A directory of newer trust roots (`N.root.json`) to carry in the bundle, for offline
        /// sites to rotate to.
        #[arg(long)]
        root_chain: Option<PathBuf>,
        /// File holding the key for redaction hashes.
        #[arg(long)]
        redaction_key: Option<PathBuf>,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Print a bundle's manifest: a readable summary, then the manifest itself. Verifies nothing
    /// (that is orch-verify's job).
    Inspect {
        /// The bundle.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum RootCommand {
    /// Create an unsigned root (version 1) naming root and bundle keys.
    Init {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Public key files (NAME.pub.json) of the root role.
        #[arg(long = "root-key", required = true)]
        root_keys: Vec<PathBuf>,
        /// Signatures the root role needs.
        #[arg(long, default_value_t = 1)]
        root_threshold: u32,
        /// Public key files of the bundle role.
        #[arg(long = "bundle-key", required = true)]
        bundle_keys: Vec<PathBuf>,
        /// Signatures a bundle needs.
        #[arg(long, default_value_t = 1)]
        bundle_threshold: u32,
        /// Expiry (RFC 3339).
        #[arg(long)]
        expires: String,
    },
    /// Add a signature to a root file (in place).
    Sign {
        /// The root file.
        root: PathBuf,
        /// The signing key.
        #[arg(long)]
        key: PathBuf,
    },
    /// Start the next version of a root: same content, version + 1, new keys or expiry, no
    /// signatures. Sign it with a threshold of the old root keys and of the new ones.
    Rotate {
        /// The current root.
        #[arg(long)]
        from: PathBuf,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Replace the root role's keys with these.
        #[arg(long = "root-key")]
        root_keys: Vec<PathBuf>,
        /// Replace the root role's threshold.
        #[arg(long)]
        root_threshold: Option<u32>,
        /// Replace the bundle role's keys with these.
        #[arg(long = "bundle-key")]
        bundle_keys: Vec<PathBuf>,
        /// Replace the bundle role's threshold.
        #[arg(long)]
        bundle_threshold: Option<u32>,
        /// New expiry (RFC 3339).
        #[arg(long)]
        expires: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("orch-bundle: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen { out, name } => {
            let mut seed = [0u8; 32];
            rand::fill(&mut seed);
            let key = SigningKey::from_seed(seed);
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let secret = out.join(format!("{name}.key"));
            write_secret(&secret, key.to_text().as_bytes())?;
            let public = out.join(format!("{name}.pub.json"));
            write_atomic(&public, &orch_bundle::keys::public_key_file(&key))?;
            println!("{}", key.key_id());
        }
        Command::Root(cmd) => root_command(cmd)?,
        Command::Export {
            db,
            keys,
            out,
            tenant,
            from_seq,
            to_seq,
            previous,
            site_id,
            anchor,
            origin,
            root_chain,
            redaction_key,
            json,
        } => {
            let keys =
                keys.iter().map(|p| orch_bundle::keys::read_signing_key(p)).collect::<anyhow::Result<Vec<_>>>()?;
            let previous = previous.map(|p| orch_bundle::keys::previous_link(&p)).transpose()?;
            let anchor = anchor.map(|a| Timestamp::parse(&a)).transpose()?;
            let redaction = match redaction_key {
                Some(p) => std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
                None => Vec::new(),
            };
            let store =
                match db.open(Arc::new(orch_bundle::keys::NoClock), Default::default(), Default::default(), false) {
                    Err(orch_store::StoreError::Missing { what: "ledger", .. }) => bail!("{db}: no such ledger"),
                    r => r.with_context(|| format!("opening {db}"))?,
                };
            // A progress bar on stderr, only when a person is watching.
            let bar = std::io::stderr().is_terminal().then(|| {
                let bar = indicatif::ProgressBar::new(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} events ({per_sec}, {eta})")
                        .expect("valid template")
                        .progress_chars("=> "),
                );
                bar.set_message("orch-bundle: reading ledger");
                bar
            });
            let opts = orch_bundle::ExportOptions {
                scope: tenant.map_or(Scope::All, Scope::Tenant),
                from_seq,
                to_seq,
                site_id,
                anchor,
                redactor: Redactor::new(RedactionPolicy::default(), redaction),
                previous,
                origin,
            };
            let exported = orch_bundle::export_with_progress(&*store, opts, &mut |done, total| {
                if let Some(bar) = &bar {
                    bar.set_length(total);
                    bar.set_position(done);
                }
            })?;
            if let Some(bar) = &bar {
                bar.set_message("orch-bundle: signing and packing");
            }
            let envelope = orch_bundle::keys::sign_manifest(&exported.manifest_bytes(), &keys);
            let roots = match &root_chain {
                Some(dir) => carried_roots(dir)?,
                None => Vec::new(),
            };
            let bytes = exported.pack_with_roots(&envelope, &roots)?;
            write_atomic(&out, &bytes)?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            let m = &exported.manifest;
            if json {
                let summary = serde_json::json!({
                    "file": out, "bytes": bytes.len(), "sha256": orch_core::hash::sha256_hex(&bytes),
                    "from_seq": m.from_seq, "to_seq": m.to_seq, "events": m.merkle.leaves,
                    "merkle_root": m.merkle.root, "tenant": m.tenant, "signed_by": keys.iter().map(|k| k.key_id()).collect::<Vec<_>>(),
                });
                println!("{summary}");
            } else {
                println!(
                    "{}: events {}..={} ({}), merkle root {}",
                    out.display(),
                    m.from_seq,
                    m.to_seq,
                    m.merkle.leaves,
                    m.merkle.root
                );
            }
        }
        Command::Inspect { file } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let m = orch_bundle::keys::read_manifest(&bytes)?;
            println!("format      {} (written by {} {})", m.format, m.producer.name, m.producer.version);
            println!("site        {}", m.site_id);
            println!("scope       {}", m.tenant.as_deref().unwrap_or("whole site"));
            println!(
                "events      seq {}..={}, {} in the Merkle tree, root {}",
                m.from_seq, m.to_seq, m.merkle.leaves, m.merkle.root
            );
            println!("anchor      {} ({})", m.time_anchor.at, m.time_anchor.source);
            if let Some(p) = &m.previous {
                println!("continues   bundle ending at seq {} (manifest sha256 {})", p.to_seq, p.manifest_sha256);
            }
            println!("redaction   {} value(s), key {}", m.redaction.redacted_values, m.redaction.key_id);
            println!(
                "compression {} level {} (library {})",
                m.compression.algorithm, m.compression.level, m.compression.library_version
            );
            for (tenant, c) in &m.chains {
                println!(
                    "chain       {tenant}: {} event(s), {} .. {}",
                    c.events,
                    &c.first_hash[..16],
                    &c.last_hash[..16]
                );
            }
            for (name, f) in &m.files {
                println!("file        {name}: {} bytes, {} lines, sha256 {}", f.size, f.lines, f.sha256);
            }
            println!("\n{}", serde_json::to_string_pretty(&m)?);
        }
    }
    Ok(())
}

fn root_command(cmd: RootCommand) -> anyhow::Result<()> {
    use orch_bundle::keys::{read_public_key, read_root};
    match cmd {
        RootCommand::Init { out, root_keys, root_threshold, bundle_keys, bundle_threshold, expires } => {
            let rk = root_keys.iter().map(|p| read_public_key(p)).collect::<anyhow::Result<Vec<_>>>()?;
            let bk = bundle_keys.iter().map(|p| read_public_key(p)).collect::<anyhow::Result<Vec<_>>>()?;
            let root = orch_bundle::keys::new_root(1, &expires, &rk, root_threshold, &bk, bundle_threshold)?;
            write_atomic(&out, &orch_bundle::keys::root_file(&root))?;
            println!("{}: root version 1 (unsigned; sign it with `orch-bundle root sign`)", out.display());
        }
        RootCommand::Sign { root, key } => {
            let mut r: Root = read_root(&root)?;
            let k = orch_bundle::keys::read_signing_key(&key)?;
            r.add_signature(&k);
            write_atomic(&root, &orch_bundle::keys::root_file(&r))?;
            println!("{}: signed by {}", root.display(), k.key_id());
        }
        RootCommand::Rotate { from, out, root_keys, root_threshold, bundle_keys, bundle_threshold, expires } => {
            let old = read_root(&from)?;
            let rk = root_keys.iter().map(|p| read_public_key(p)).collect::<anyhow::Result<Vec<_>>>()?;
            let bk = bundle_keys.iter().map(|p| read_public_key(p)).collect::<anyhow::Result<Vec<_>>>()?;
            let next =
                orch_bundle::keys::next_root(&old, &rk, root_threshold, &bk, bundle_threshold, expires.as_deref())?;
            write_atomic(&out, &orch_bundle::keys::root_file(&next))?;
            println!("{}: root version {} (unsigned)", out.display(), next.signed.version);
        }
    }
    Ok(())
}

/// Writes a file atomically (temporary file in the same directory, then rename).
/// The `N.root.json` files of a directory, checked to be roots named by their version.
fn carried_roots(dir: &Path) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
    let mut roots = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let Some(version) = name.strip_suffix(".root.json").and_then(|v| v.parse::<u64>().ok()) else { continue };
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let root: orch_core::trust::Root =
            serde_json::from_slice(&bytes).with_context(|| format!("{}: not a root.json", path.display()))?;
        if root.signed.version != version {
            bail!("{}: holds root version {}", path.display(), root.signed.version);
        }
        roots.push((version, bytes));
    }
    roots.sort();
    Ok(roots)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("writing into {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_secret(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}
