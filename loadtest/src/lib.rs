//! The load generator behind `kurz loadtest`. It knows nothing of the kurz server and can drive
//! any HTTP/1.1 server, so results for kurz, nginx and HAProxy are comparable side by side.
//!
//! Crate map:
//! - `flags`: parsers for flag values with units (durations, the read:create mix).
//! - `target`: `--url` to a socket address, `Host` header and path prefix.
//! - `workload`: the code list, the pre-built request bytes, the choice of the next request.
//! - `sampler`: the fast random generator and the uniform and Zipf code samplers.
//! - `response`: where one HTTP/1.1 response ends, without storing its body.
//! - `engine`: one generator thread, its connections and its epoll loop (the hot path).
//! - `stats`: the counts a thread keeps (latency histogram, statuses, errors).
//! - `coordinator`: starts the threads, merges their counts, prints progress, writes the HDR log.
//! - `report`: the final numbers, as a table or as JSON.
//!
//! Architecture invariant: nothing on the hot path (sending a request, reading a response)
//! allocates, formats or takes a lock shared between threads; each thread owns its connections and
//! its counts and hands them over once per second.

mod coordinator;
mod engine;
mod flags;
mod report;
mod response;
mod sampler;
mod stats;
mod target;
mod workload;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

pub use engine::EngineError;
pub use flags::{parse_duration, parse_mix, Mix};
pub use report::{Errors, LatencyUs, Report};
pub use stats::ErrorCounts;
pub use target::TargetError;
pub use workload::WorkloadError;

use engine::{Shared, Stop, ThreadPlan};
use report::RunShape;
use target::Target;
use workload::{Workload, WorkloadSpec};

/// Most connections in one run.
pub const CONNECTIONS_MAX: usize = 10_000;
/// Most generator threads in one run.
pub const THREADS_MAX: usize = 64;
/// Lowest open-loop rate, in requests per second (keeps a connection's interval finite).
pub const RATE_MIN: f64 = 0.01;
/// Highest open-loop rate, in requests per second.
pub const RATE_MAX: f64 = 10_000_000.0;
/// Highest Zipf exponent; beyond it nearly every request is for the first code anyway.
pub const ZIPF_EXPONENT_MAX: f64 = 10.0;
/// Longest `--duration`, `--warmup` or `--timeout`.
pub const DURATION_MAX: Duration = Duration::from_secs(24 * 3600);

/// Flags of `kurz loadtest` (and of the stand-alone `loadtest` binary).
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Base URL of the server under test, plain http only; reads go to `{url}/{code}` and
    /// creates to `{url}/api/v1/shorten`.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// File of codes to request: one code per line, or TSV `code<TAB>url` (only the first
    /// column is used). Lines starting with `#` are skipped.
    #[arg(long, value_name = "FILE")]
    pub codes: Option<PathBuf>,

    /// Open loop: total requests per second across all connections, each request timed from
    /// when it should have been sent (so a stalled server shows in the tail). Without it the
    /// test runs closed loop: each connection sends its next request as soon as a response
    /// arrives.
    #[arg(long, value_name = "REQ_PER_S")]
    pub rate: Option<f64>,

    /// Keep-alive connections, spread over the threads.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub connections: usize,

    /// Generator threads, each with its own event loop and share of the connections.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: usize,

    /// How long to measure after the warm-up (units: us, ms, s, m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,

    /// Measure exactly this many requests after the warm-up instead of a duration.
    #[arg(long, value_name = "N", conflicts_with = "duration")]
    pub requests: Option<u64>,

    /// Load sent before measuring starts; its responses are left out of the results.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0s")]
    pub warmup: Duration,

    /// A request without a complete response after this long counts as a timeout error, and
    /// its connection is opened again.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "2s")]
    pub timeout: Duration,

    /// Draw codes Zipf-skewed with exponent S > 0 (the file's first code is the hottest)
    /// instead of uniformly.
    #[arg(long, value_name = "S")]
    pub zipf: Option<f64>,

    /// Share of reads, 0 to 1, that ask for codes which are not in the file (expect 404s).
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub miss_ratio: f64,

    /// Weights of reads and creates, READ:CREATE (e.g. 95:5); creates are
    /// `POST /api/v1/shorten` with a JSON body naming a new random URL.
    #[arg(long, value_name = "READ:CREATE", value_parser = parse_mix, default_value = "100:0")]
    pub mix: Mix,

    /// API key for creates, sent as `Authorization: Bearer KEY`.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,

    /// Fail (exit code 1 from `kurz loadtest`) when the measured p99 latency is above this
    /// (units: us, ms, s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub p99_target: Option<Duration>,

    /// Print the final report as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Write the latency histograms, one per second, to FILE as an HdrHistogram interval log
    /// (V2, compressed) for plotting.
    #[arg(long, value_name = "FILE")]
    pub hdr_log: Option<PathBuf>,

    /// Seed for the choice of codes, to repeat a run's request sequence; random if not given.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Do not print the progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// What a finished run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// False when `--p99-target` was given and the measured p99 is above it.
    pub target_met: bool,
    pub report: Report,
}

#[derive(Debug, Error)]
pub enum LoadtestError {
    #[error("--{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error("cannot connect to {url} ({addr}): {source}; is the server running?")]
    Connect {
        url: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot write the HDR log {path}: {reason}")]
    HdrLog { path: PathBuf, reason: String },
    #[error("cannot start a generator thread: {0}")]
    Thread(String),
    #[error("cannot write the report to stdout: {0}")]
    Output(std::io::Error),
}

/// Runs the load test, prints the live progress line to stderr and the final table (or JSON with
/// --json) to stdout.
pub fn run(args: &Args) -> Result<Outcome, LoadtestError> {
    let stop = check_args(args)?;
    let target = Target::parse(&args.url)?;
    let seed = args.seed.unwrap_or_else(random_seed);
    let workload = Workload::build(
        &target,
        &WorkloadSpec {
            codes_path: args.codes.as_deref(),
            zipf_exponent: args.zipf,
            miss_ratio: args.miss_ratio,
            create_share: args.mix.create_share(),
            api_key: args.api_key.as_deref(),
            seed,
        },
    )?;
    std::net::TcpStream::connect_timeout(&target.addr, args.timeout).map_err(|source| {
        LoadtestError::Connect {
            url: args.url.clone(),
            addr: target.addr,
            source,
        }
    })?;
    let shared = Arc::new(Shared {
        addr: target.addr,
        workload: Arc::new(workload),
        warmup: args.warmup,
        timeout: args.timeout,
        abort: AtomicBool::new(false),
    });
    let plans = thread_plans(args, stop, seed);
    let gathered = coordinator::run(shared, plans, args.hdr_log.as_deref(), !args.quiet)?;
    let measured_duration = match stop {
        Stop::After(duration) => duration,
        Stop::Requests(_) => gathered.measured_duration,
    };
    let report = Report::new(
        RunShape {
            url: args.url.clone(),
            target_rps: args.rate,
            connections: args.connections,
            threads: args.threads,
            p99_target_us: args.p99_target.map(|target| target.as_micros() as u64),
        },
        &gathered.measured,
        measured_duration.as_secs_f64(),
    );
    let text = if args.json {
        let mut json = serde_json::to_string(&report)
            .map_err(|error| LoadtestError::Output(std::io::Error::other(error)))?;
        json.push('\n');
        json
    } else {
        report.table()
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(LoadtestError::Output)?;
    Ok(Outcome {
        target_met: report.target_met,
        report,
    })
}

/// Checks the flags that have limits or depend on each other; returns when the run stops.
fn check_args(args: &Args) -> Result<Stop, LoadtestError> {
    let flag = |flag: &'static str, reason: String| Err(LoadtestError::Flag { flag, reason });
    if !(1..=CONNECTIONS_MAX).contains(&args.connections) {
        return flag("connections", format!("must be 1 to {CONNECTIONS_MAX}"));
    }
    if !(1..=THREADS_MAX).contains(&args.threads) {
        return flag("threads", format!("must be 1 to {THREADS_MAX}"));
    }
    if args.threads > args.connections {
        return flag(
            "threads",
            format!("{} threads need at least as many connections", args.threads),
        );
    }
    if let Some(rate) = args.rate {
        if !(RATE_MIN..=RATE_MAX).contains(&rate) {
            return flag("rate", format!("must be {RATE_MIN} to {RATE_MAX}"));
        }
    }
    if let Some(exponent) = args.zipf {
        if !(exponent > 0.0 && exponent <= ZIPF_EXPONENT_MAX) {
            return flag(
                "zipf",
                format!("must be above 0 and at most {ZIPF_EXPONENT_MAX}"),
            );
        }
    }
    if !(0.0..=1.0).contains(&args.miss_ratio) {
        return flag("miss-ratio", "must be between 0 and 1".to_owned());
    }
    for (name, duration) in [
        ("warmup", args.warmup),
        ("timeout", args.timeout),
        ("duration", args.duration),
    ] {
        if duration > DURATION_MAX {
            return flag(
                name,
                format!("must be at most {} s", DURATION_MAX.as_secs()),
            );
        }
    }
    if args.timeout.is_zero() {
        return flag("timeout", "must be above zero".to_owned());
    }
    match args.requests {
        Some(0) => flag("requests", "must be at least 1".to_owned()),
        Some(count) => Ok(Stop::Requests(count)),
        None if args.duration.is_zero() => flag("duration", "must be above zero".to_owned()),
        None => Ok(Stop::After(args.duration)),
    }
}

/// Splits connections, rate and request count over the threads in proportion to connections,
/// so that all threads run at the same per-connection pace and finish together.
fn thread_plans(args: &Args, stop: Stop, seed: u64) -> Vec<ThreadPlan> {
    let connections = args.connections;
    let share = |total: u64, first: usize, count: usize| -> u64 {
        let upto = |index: usize| (u128::from(total) * index as u128 / connections as u128) as u64;
        upto(first + count) - upto(first)
    };
    let mut first_connection = 0;
    (0..args.threads)
        .map(|thread| {
            let count =
                connections / args.threads + usize::from(thread < connections % args.threads);
            let plan = ThreadPlan {
                thread,
                connections: count,
                first_connection,
                connection_interval: args
                    .rate
                    .map(|rate| Duration::from_secs_f64(connections as f64 / rate)),
                global_interval: args.rate.map(|rate| Duration::from_secs_f64(1.0 / rate)),
                stop: match stop {
                    Stop::Requests(total) => Stop::Requests(share(total, first_connection, count)),
                    Stop::After(duration) => Stop::After(duration),
                },
                seed: seed ^ (thread as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            };
            first_connection += count;
            plan
        })
        .collect()
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}
