//! `tessera stash put|get|list|log|show|tag|rm|gc|verify|repair --store PATH_OR_URL`: keep files
//! as versioned, tagged entries of a stash, and inspect and maintain it, from the command
//! line. Saves and loads of large files print their progress to stderr.
use std::sync::Mutex;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use tessera::{Stash, TransferKind, TransferProgress, Version, VersionInfo};

#[derive(Args)]
pub(crate) struct StashArgs {
    /// The stash: a directory, file:///dir, s3://bucket/prefix?..., postgres://..., or
    /// mirror:URL,URL[;min_copies=N] (a copy on each)
    #[arg(long, global = true)]
    store: Option<String>,
    #[command(subcommand)]
    command: StashCommand,
}

#[derive(Subcommand)]
enum StashCommand {
    /// Save a file's bytes as a new version of NAME (like `git stash` for blobs).
    Put {
        /// The entry's name.
        name: String,
        /// The file to save; `-` for standard input. Standard input and other pipes are
        /// copied to a temporary file first (in $TMPDIR), since a save needs the length.
        file: std::path::PathBuf,
        /// A tag for the new version, as key=value (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Write a version of NAME (saved by `put`, or any byte vector) to a file.
    Get {
        /// The entry's name.
        name: String,
        /// Where to write the bytes (`-` for standard output).
        #[arg(short, long)]
        output: std::path::PathBuf,
        /// A version id (24 hex digits); the latest by default.
        #[arg(long, conflicts_with = "tag")]
        version: Option<String>,
        /// The latest version carrying this tag, as key=value.
        #[arg(long)]
        tag: Option<String>,
    },
    /// List entries (latest version of each name), optionally only names with a prefix.
    List {
        /// Only names that start with this.
        prefix: Option<String>,
    },
    /// Show every version of an entry, newest first.
    Log {
        /// The entry's name.
        name: String,
    },
    /// Show one version of an entry in detail (the latest by default).
    Show {
        /// The entry's name.
        name: String,
        /// A version id (24 hex digits).
        #[arg(long, conflicts_with = "tag")]
        version: Option<String>,
        /// The latest version carrying this tag, as key=value.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Set a tag (key=value) on a version.
    Tag {
        /// The entry's name.
        name: String,
        /// The version id.
        version: String,
        /// The tag, as key=value.
        tag: String,
    },
    /// Delete one version of an entry, or all its versions.
    Rm {
        /// The entry's name.
        name: String,
        /// Only this version (otherwise every version).
        #[arg(long)]
        version: Option<String>,
    },
    /// Delete chunks no version references.
    Gc {
        /// Keep unreferenced chunks younger than this many seconds (saves in flight).
        #[arg(long, default_value_t = tessera::DEFAULT_GC_GRACE.as_secs())]
        grace_secs: u64,
    },
    /// Read every chunk and check its hash; exits with status 1 if anything is damaged.
    /// On a mirror, a chunk counts as good when some replica holds it intact (`repair`
    /// checks every replica).
    Verify,
    /// On a mirror (`--store 'mirror:URL,URL'`): check every chunk and version on every
    /// replica and copy an intact copy over each missing or damaged one; exits with
    /// status 1 if a blob has no intact copy anywhere or a replica failed.
    Repair,
}

pub(crate) fn run(args: StashArgs) -> Result<()> {
    let Some(url) = args.store else {
        bail!("no stash given: pass --store PATH_OR_URL");
    };
    // Only `put` may make a new stash: elsewhere a mistyped path must be an error, not an
    // empty stash. Messages carry the URL without its keys or password.
    let opened = match args.command {
        StashCommand::Put { .. } => Stash::open_url(&url),
        _ => Stash::open_url_existing(&url),
    };
    let stash = opened.with_context(|| format!("opening stash {}", tessera::redact_url(&url)))?;
    let stash = stash.with_progress(progress_printer());
    match args.command {
        StashCommand::Put { name, file, tags } => {
            let pairs = tags.iter().map(|t| split_tag(t)).collect::<Result<Vec<_>>>()?;
            let started = Instant::now();
            let spooled = if file.as_os_str() == "-" || std::fs::metadata(&file).is_ok_and(|m| !m.is_file()) {
                Some(spool(&file)?)
            } else {
                None
            };
            let version = stash.save_file(&name, spooled.as_ref().map_or(&file, |s| &s.0), &pairs)?;
            drop(spooled);
            let size = stash.info(&name, Some(version))?.size;
            eprintln!(
                "saved {} as {name} {version} in {:.1} s",
                human_size(size),
                started.elapsed().as_secs_f64()
            );
            out!("{version}")?;
        }
        StashCommand::Get { name, output, version, tag } => {
            let version = match (version, tag) {
                (Some(v), _) => Some(parse_version(&v)?),
                (None, Some(t)) => {
                    let (k, v) = split_tag(&t)?;
                    Some(stash.info_tagged(&name, k, v)?.version)
                }
                (None, None) => None,
            };
            if output.as_os_str() == "-" {
                // Streamed, a chunk at a time; a damaged chunk stops it with an error
                // (and a non-zero exit) after the bytes before it.
                stash.load_to_writer(&name, version, &mut std::io::stdout().lock())?;
            } else {
                let written = stash.load_to_file(&name, version, &output)?;
                eprintln!("wrote {} of {name} to {}", human_size(written), output.display());
            }
        }
        StashCommand::List { prefix } => {
            let entries = stash.list(prefix.as_deref().unwrap_or(""))?;
            out!("{:<32} {:<24} {:>12} {:>8}  {:<24} TAGS", "NAME", "LATEST", "SIZE", "VERSIONS", "TYPE")?;
            for info in entries {
                let count = stash.history(&info.name)?.len();
                out!(
                    "{:<32} {:<24} {:>12} {:>8}  {:<24} {}",
                    info.name,
                    info.version,
                    human_size(info.size),
                    count,
                    info.type_name,
                    tags(&info)
                )?;
            }
        }
        StashCommand::Log { name } => {
            let history = stash.history(&name)?;
            if history.is_empty() {
                bail!("no entry `{name}` in {}", stash.location());
            }
            for info in history.iter().rev() {
                out!(
                    "{}  {}  {:>10}  {}  {}",
                    info.version,
                    timestamp(info),
                    human_size(info.size),
                    info.type_name,
                    tags(info)
                )?;
            }
        }
        StashCommand::Show { name, version, tag } => {
            let info = match (version, tag) {
                (Some(v), _) => stash.info(&name, Some(parse_version(&v)?))?,
                (None, Some(t)) => {
                    let (k, v) = split_tag(&t)?;
                    stash.info_tagged(&name, k, v)?
                }
                (None, None) => stash.info(&name, None)?,
            };
            out!("name:        {}", info.name)?;
            out!("version:     {}", info.version)?;
            out!("created:     {}", timestamp(&info))?;
            out!("type:        {}", info.type_name)?;
            out!("fingerprint: {}", info.fingerprint)?;
            out!("layout:      {}", info.layout)?;
            out!("size:        {} ({} bytes)", human_size(info.size), info.size)?;
            out!("chunks:      {}", info.chunks)?;
            out!("checksum:    blake3:{}", info.checksum)?;
            out!("tags:        {}", tags(&info))?;
        }
        StashCommand::Tag { name, version, tag } => {
            let (k, v) = split_tag(&tag)?;
            stash.tag(&name, parse_version(&version)?, k, v)?;
            out!("tagged {name} {version} {k}={v}")?;
        }
        StashCommand::Rm { name, version } => {
            let version = version.as_deref().map(parse_version).transpose()?;
            let n = stash.delete(&name, version)?;
            out!("deleted {n} version(s) of {name}; run `tessera stash gc` to reclaim space")?;
        }
        StashCommand::Gc { grace_secs } => {
            let r = stash.gc_with_grace(Duration::from_secs(grace_secs))?;
            out!(
                "deleted {} chunks ({}), kept {} live and {} younger than {grace_secs} s, removed {} temporary files",
                r.chunks_deleted,
                human_size(r.bytes_freed),
                r.chunks_live,
                r.chunks_young,
                r.temporaries_removed
            )?;
        }
        StashCommand::Verify => {
            let r = stash.verify()?;
            for problem in &r.problems {
                out!("DAMAGED: {problem}")?;
            }
            out!(
                "checked {} versions, {} chunks, {}: {}",
                r.versions,
                r.chunks,
                human_size(r.bytes),
                if r.problems.is_empty() {
                    "ok".to_string()
                } else {
                    format!("{} problem(s)", r.problems.len())
                }
            )?;
            if !r.problems.is_empty() {
                std::process::exit(1);
            }
        }
        StashCommand::Repair => {
            let started = Instant::now();
            let r = stash.repair()?;
            if r.replicas < 2 {
                out!("{} keeps one copy: nothing to repair (use `verify` to check it)", stash.location())?;
                return Ok(());
            }
            for problem in &r.unrecoverable {
                out!("UNRECOVERABLE: {problem}")?;
            }
            for problem in &r.problems {
                out!("FAILED: {problem}")?;
            }
            out!(
                "checked {} blobs on {} replicas in {:.1} s, wrote {} copies ({}): {}",
                r.blobs_checked,
                r.replicas,
                started.elapsed().as_secs_f64(),
                r.copies_written,
                human_size(r.bytes_written),
                if r.is_complete() {
                    "every replica is whole".to_string()
                } else {
                    format!("{} unrecoverable, {} failed", r.unrecoverable.len(), r.problems.len())
                }
            )?;
            if !r.is_complete() {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

/// A temporary copy of standard input or a pipe, removed when dropped.
struct Spooled(std::path::PathBuf);

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Copies `source` (`-`: standard input) to a new temporary file, for `save_file`, which
/// reads a regular file of known length.
fn spool(source: &std::path::Path) -> Result<Spooled> {
    let nanos =
        std::time::SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let spooled =
        Spooled(std::env::temp_dir().join(format!("tessera-stash-put-{}-{nanos:x}", std::process::id())));
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&spooled.0)
        .with_context(|| format!("creating {}", spooled.0.display()))?;
    let copied = if source.as_os_str() == "-" {
        std::io::copy(&mut std::io::stdin().lock(), &mut out)
    } else {
        let mut input =
            std::fs::File::open(source).with_context(|| format!("opening {}", source.display()))?;
        std::io::copy(&mut input, &mut out)
    };
    copied.with_context(|| format!("copying {} to {}", source.display(), spooled.0.display()))?;
    Ok(spooled)
}

fn parse_version(text: &str) -> Result<Version> {
    text.parse::<Version>().with_context(|| format!("bad version `{text}`"))
}

fn split_tag(text: &str) -> Result<(&str, &str)> {
    text.split_once('=').with_context(|| format!("tag `{text}` is not key=value"))
}

fn tags(info: &VersionInfo) -> String {
    info.tags.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// The version's creation time as UTC `YYYY-MM-DD hh:mm:ss`.
fn timestamp(info: &VersionInfo) -> String {
    let secs = info.created.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Prints how a transfer of more than 64 MiB goes, to stderr, at most twice a second and
/// once at the end.
fn progress_printer() -> impl Fn(TransferProgress<'_>) + Send + Sync + 'static {
    const WORTH_SHOWING: u64 = 64 << 20;
    let last: Mutex<Option<(Instant, Instant)>> = Mutex::new(None); // (started, last printed)
    move |p: TransferProgress<'_>| {
        if p.total < WORTH_SHOWING {
            return;
        }
        let now = Instant::now();
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        let (started, printed) = last.get_or_insert((now, now));
        let finished = p.done >= p.total;
        if !finished && now.duration_since(*printed) < Duration::from_millis(500) {
            return;
        }
        *printed = now;
        let seconds = now.duration_since(*started).as_secs_f64().max(1e-9);
        let verb = match p.kind {
            TransferKind::Save => "saving",
            TransferKind::Load => "loading",
            TransferKind::Repair => "repairing",
            _ => "moving",
        };
        eprintln!(
            "{verb} {}: {} of {} ({:.0} %), {}/s",
            p.name,
            human_size(p.done),
            human_size(p.total),
            100.0 * p.done as f64 / p.total as f64,
            human_size((p.done as f64 / seconds) as u64)
        );
        if finished {
            *last = None;
        }
    }
}
