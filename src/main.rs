//! The `kurz` command line: parse arguments, build a configuration, call into the library.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use kurz::cluster::datadir::MARKER_FILE;
use kurz::datafile::{self, Format, ImportOptions};
use kurz::store::wal::{self, FsyncPolicy};
use kurz::store::{snapshot, Store, StoreOptions, SNAPSHOT_FILE, WAL_DIR};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process. mimalloc asks for them on its whole
/// arena, so each 2 MiB region that a few small allocations touch became resident in full:
/// 14 MB more at start and ~50 MB more after a load over 1M links, for no speed-up measured
/// (PERFORMANCE.md, "Memory"). Best effort: where the kernel lacks the switch nothing changes.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: this prctl takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// kurz: a URL shortener built as a high-performance redirect front tier.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The data directory every data-file command works on.
#[derive(clap::Args)]
struct DataDirArg {
    /// Data directory holding snapshot.kurz and wal/.
    #[arg(long, env = "KURZ_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Import links from a file into a new snapshot (offline: the data dir must not be in use).
    ///
    /// TSV lines are `code<TAB>url` or a bare URL (a code is generated); CSV needs a header with
    /// a `url` or `long_url` column and optional `code`, `expires_at`, `max_clicks`,
    /// `redirect_status`, `forward_query`, `created_at`; NDJSON objects carry the same fields.
    Import {
        #[command(flatten)]
        data: DataDirArg,
        /// The file to import.
        file: PathBuf,
        /// Input format; guessed from the file extension when absent (.csv, .ndjson/.jsonl, else TSV).
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Refuse the whole import if any row fails validation.
        #[arg(long)]
        strict: bool,
        /// Length of generated codes for rows without one.
        #[arg(long, default_value_t = kurz::links::codegen::CODE_LEN_DEFAULT)]
        code_length: usize,
        /// Write every skipped row here as `line<TAB>reason` (the terminal shows the first
        /// 1000); the list is written even when --strict refuses the import.
        #[arg(long, value_name = "FILE")]
        rejects: Option<PathBuf>,
    },
    /// Write every link as NDJSON, TSV or CSV (works beside a running server).
    Export {
        #[command(flatten)]
        data: DataDirArg,
        /// Output format.
        #[arg(long, value_enum, default_value = "ndjson")]
        format: Format,
        /// Write here instead of standard output (temp file + fsync + rename).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Include deleted links (tombstones).
        #[arg(long)]
        include_deleted: bool,
    },
    /// Compact offline: merge the snapshot and the WAL into a new snapshot, drop covered WAL segments.
    Snapshot {
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Check a snapshot file or a WAL segment and report what is wrong (exit status 1 if anything is).
    Verify {
        /// A snapshot file (snapshot.kurz) or a WAL segment (wal/wal-*.log).
        file: PathBuf,
    },
    /// Show counts, sequence numbers and sizes of a data dir (works beside a running server).
    Inspect {
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Load-test any HTTP server (kurz, nginx, HAProxy) and judge it against a p99 target.
    Loadtest(Box<loadtest::Args>),
    /// Serve redirects, the JSON API and the admin listener (stops on SIGTERM/SIGINT).
    Serve(Box<kurz::config::ServeArgs>),
    /// Create, list and revoke API keys (the keys file stores only their SHA-256).
    #[command(subcommand)]
    Keys(kurz::auth::KeysCommand),
}

fn main() -> ExitCode {
    // First, before the allocations of parsing arguments fault in whole huge pages.
    disable_transparent_huge_pages();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KURZ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("kurz: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Import {
            data,
            file,
            format,
            strict,
            code_length,
            rejects,
        } => import(
            &data.data_dir,
            &file,
            ImportOptions {
                format,
                strict,
                code_len: code_length,
                progress: true,
                rejects,
                ..ImportOptions::default()
            },
        ),
        Command::Export {
            data,
            format,
            output,
            include_deleted,
        } => export(&data.data_dir, format, output.as_deref(), include_deleted),
        Command::Snapshot { data } => compact(&data.data_dir),
        Command::Verify { file } => verify(&file),
        Command::Inspect { data } => inspect(&data.data_dir),
        Command::Loadtest(args) => match loadtest::run(&args) {
            Ok(outcome) if outcome.target_met => Ok(ExitCode::SUCCESS),
            Ok(_) => Ok(ExitCode::from(1)),
            Err(error) => bail!(error),
        },
        Command::Serve(args) => {
            kurz::http::server::run(kurz::config::ServeConfig::load(*args)?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(command) => {
            for line in kurz::auth::run_keys_command(&command)? {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn open_writable(data_dir: &Path) -> anyhow::Result<Store> {
    // A cluster node's snapshot counts stream records; a local WAL on top would drift from them.
    if data_dir.join(MARKER_FILE).exists() {
        bail!(
            "data dir {} belongs to a cluster node (it holds {MARKER_FILE}); import and snapshot work on single-node data dirs only (a cluster node snapshots with POST /admin/snapshot, and links enter a cluster through its API)",
            data_dir.display()
        );
    }
    Store::open(
        data_dir,
        StoreOptions {
            fsync: FsyncPolicy::Always,
        },
    )
    .with_context(|| format!("cannot open data dir {}", data_dir.display()))
}

fn import(data_dir: &Path, file: &Path, options: ImportOptions) -> anyhow::Result<ExitCode> {
    if !(1..=kurz::links::validate::CODE_BYTES_MAX).contains(&options.code_len) {
        bail!(
            "--code-length must be 1 to {}",
            kurz::links::validate::CODE_BYTES_MAX
        );
    }
    let store = open_writable(data_dir)?;
    let report = datafile::import(&store, file, &options)?;
    store.close();
    for rejection in &report.rejections {
        eprintln!(
            "{}:{}: skipped: {}",
            file.display(),
            rejection.line,
            rejection.reason
        );
    }
    if report.rejected > report.rejections.len() as u64 {
        let unlisted = report.rejected - report.rejections.len() as u64;
        match &options.rejects {
            Some(path) => eprintln!(
                "... and {unlisted} more skipped rows, every one listed in {}",
                path.display()
            ),
            None => {
                eprintln!("... and {unlisted} more skipped rows (--rejects FILE lists every one)")
            }
        }
    }
    println!(
        "imported {} links ({} with generated codes) in {} ms; {} rows skipped; snapshot holds {} links, covers WAL seq {}",
        report.imported,
        report.generated_codes,
        report.duration_ms,
        report.rejected,
        report.snapshot.header.link_count,
        report.snapshot.header.covered_seq
    );
    Ok(ExitCode::SUCCESS)
}

fn export(
    data_dir: &Path,
    format: Format,
    output: Option<&Path>,
    include_deleted: bool,
) -> anyhow::Result<ExitCode> {
    let store = Store::open_read_only(data_dir)
        .with_context(|| format!("cannot read data dir {}", data_dir.display()))?;
    match output {
        None => {
            datafile::export(&store, format, include_deleted, io::stdout().lock())
                .context("export to standard output failed")?;
        }
        Some(path) => {
            let mut bytes = Vec::new();
            let count = datafile::export(&store, format, include_deleted, &mut bytes)?;
            kurz::fsutil::write_durably(path, &bytes)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("exported {count} links to {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn compact(data_dir: &Path) -> anyhow::Result<ExitCode> {
    let store = open_writable(data_dir)?;
    let report = store.snapshot()?;
    store.close();
    println!(
        "snapshot written in {} ms: {} links, covers WAL seq {}, {} from the WAL, {} WAL segments removed",
        report.duration_ms,
        report.header.link_count,
        report.header.covered_seq,
        report.links_from_overlay,
        report.wal_segments_removed
    );
    Ok(ExitCode::SUCCESS)
}

fn verify(path: &Path) -> anyhow::Result<ExitCode> {
    let mut start = [0u8; 8];
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let read = file.read(&mut start)?;
    if snapshot::has_magic(&start[..read]) {
        return verify_snapshot(path);
    }
    let scan = match wal::verify_segment(path) {
        Ok(scan) => scan,
        Err(error) => {
            println!("{}: BAD: {error}", path.display());
            return Ok(ExitCode::from(1));
        }
    };
    println!(
        "{}: WAL segment, first seq {}, {} records (seqs {}..={}), {} of {} bytes valid",
        path.display(),
        scan.first_seq,
        scan.records,
        scan.first_seq,
        scan.last_seq,
        scan.valid_bytes,
        scan.file_bytes
    );
    match scan.damage {
        None => Ok(ExitCode::SUCCESS),
        Some((offset, reason)) => {
            println!("{}: BAD at byte {offset}: {reason}", path.display());
            Ok(ExitCode::from(1))
        }
    }
}

fn verify_snapshot(path: &Path) -> anyhow::Result<ExitCode> {
    let opened = snapshot::Snapshot::open(path);
    let snapshot = match opened {
        Ok(snapshot) => snapshot,
        Err(error) => {
            println!("{}: BAD: {error}", path.display());
            return Ok(ExitCode::from(1));
        }
    };
    let mut links = 0u64;
    let mut unreachable = 0u64;
    for link in snapshot.iter() {
        links += 1;
        if snapshot.lookup(link.code) != Some(link) {
            unreachable += 1;
        }
    }
    let header = snapshot.header();
    println!(
        "{}: snapshot format {}, {} links ({} live), covers WAL seq {}, {} bytes, checksums good",
        path.display(),
        header.format_version,
        links,
        snapshot.live_count(),
        header.covered_seq,
        snapshot.file_bytes()
    );
    if links != header.link_count || unreachable > 0 {
        println!(
            "{}: BAD: header counts {} links, table walk found {links}, {unreachable} not reachable by lookup",
            path.display(),
            header.link_count
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(data_dir: &Path) -> anyhow::Result<ExitCode> {
    let snapshot_path = data_dir.join(SNAPSHOT_FILE);
    let header = snapshot::read_header(&snapshot_path)?;
    let snapshot_bytes = std::fs::metadata(&snapshot_path)?.len();
    let segments = wal::list_segments(&data_dir.join(WAL_DIR))?;
    let store = Store::open_read_only(data_dir)
        .with_context(|| format!("cannot read data dir {}", data_dir.display()))?;
    let recovery = store.recovery();
    let mut out = io::stdout().lock();
    writeln!(out, "data dir        {}", data_dir.display())?;
    writeln!(
        out,
        "snapshot        format {}, {} bytes, {} links, covers WAL seq {}, written at {}",
        header.format_version,
        snapshot_bytes,
        header.link_count,
        header.covered_seq,
        kurz::timefmt::rfc3339((header.written_at_ms / 1000) as i64)
    )?;
    writeln!(
        out,
        "wal             {} segments, {} records newer than the snapshot, last seq {}",
        segments.len(),
        recovery.wal_records_replayed,
        recovery.last_seq
    )?;
    for segment in &segments {
        let bytes = std::fs::metadata(&segment.path)
            .map(|m| m.len())
            .unwrap_or(0);
        writeln!(
            out,
            "  {}  first seq {}, {} bytes",
            segment.path.display(),
            segment.first_seq,
            bytes
        )?;
    }
    writeln!(
        out,
        "links           {} live, {} codes written since the snapshot",
        store.live_links(),
        store.overlay_len()
    )?;
    if let Some((path, offset, reason)) = &recovery.cut {
        writeln!(
            out,
            "damage          {} at byte {offset}: {reason} (the server cuts it at start-up)",
            path.display()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
