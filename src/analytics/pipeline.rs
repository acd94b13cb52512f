//! The click pipeline: the redirect path hands each click to a bounded queue without blocking
//! (a full queue drops the event and counts the drop; exact per-link counts live in
//! [`super::ClickCounters`] and are never dropped), and one aggregator thread classifies it
//! (referrer domain, country, user agent, bot), folds it into the aggregates and appends it to
//! an event log.
//!
//! Persistence: the event log (`<dir>/clicks-<generation>.log`, NDJSON) is fsynced every flush
//! interval (default 1 s), so a `kill -9` loses at most that much; a checkpoint of all aggregates
//! (`<dir>/aggregates.json`, temp file + fsync + rename) is written every checkpoint interval
//! and at shutdown, after which the logs it covers are deleted. Start-up loads the checkpoint
//! and replays the newer logs.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use serde::{Deserialize, Serialize};

use super::aggregate::{Aggregates, ClassifiedClick, LinkStats, StatsQuery, StatsQueryError};
use super::geo::CountryResolver;
use super::{agent, referrer};
use crate::fsutil;

const CHECKPOINT_FILE: &str = "aggregates.json";
/// Most events the aggregator takes off the queue before it looks at its timers again.
const BATCH_EVENTS_MAX: usize = 4096;
/// Longest referrer or user agent kept from a request, in bytes (longer ones are cut).
pub const HEADER_BYTES_MAX: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    #[error("click analytics {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("click analytics checkpoint {path} is unreadable: {detail}")]
    Checkpoint { path: PathBuf, detail: String },
}

/// One served redirect, as the hot path hands it over.
#[derive(Debug)]
pub struct ClickEvent {
    pub code: Box<str>,
    pub at_s: i64,
    pub referer: Option<Box<str>>,
    pub user_agent: Option<Box<str>>,
    pub client_ip: Option<IpAddr>,
    /// The trusted country header's value, if the operator configured one.
    pub country_header: Option<Box<str>>,
}

/// Where the pipeline keeps its files and how often it writes them.
pub struct AnalyticsOptions {
    pub dir: PathBuf,
    pub flush_interval: Duration,
    pub checkpoint_interval: Duration,
    pub queue_events_max: usize,
    pub countries: CountryResolver,
}

impl AnalyticsOptions {
    pub fn new(dir: PathBuf) -> AnalyticsOptions {
        AnalyticsOptions {
            dir,
            flush_interval: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(60),
            queue_events_max: 65_536,
            countries: CountryResolver::without_database(),
        }
    }
}

/// Counters for the metrics endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineCounters {
    pub events_total: u64,
    pub bot_events_total: u64,
    pub dropped_total: u64,
    pub queued: u64,
    /// Seconds between the newest applied click and now, while clicks are waiting.
    pub lag_s: i64,
}

#[derive(Default)]
struct Shared {
    aggregates: Mutex<Aggregates>,
    events_total: AtomicU64,
    bot_events_total: AtomicU64,
    dropped_total: AtomicU64,
    last_applied_at_s: AtomicI64,
}

impl Shared {
    fn aggregates(&self) -> MutexGuard<'_, Aggregates> {
        // A panic while holding the lock leaves counts that are still counts; keep serving them.
        self.aggregates
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn apply(&self, click: &ClassifiedClick) {
        self.aggregates().apply(click);
        self.events_total.fetch_add(1, Ordering::Relaxed);
        if click.bot {
            self.bot_events_total.fetch_add(1, Ordering::Relaxed);
        }
        self.last_applied_at_s
            .fetch_max(click.at_s, Ordering::Relaxed);
    }
}

/// The checkpoint file's shape, as read back.
#[derive(Deserialize)]
struct Checkpoint {
    /// Every log with a generation up to this one is folded in.
    covered_generation: u64,
    aggregates: Aggregates,
}

/// The checkpoint file's shape, as written (borrowing the live aggregates).
#[derive(Serialize)]
struct CheckpointRef<'a> {
    covered_generation: u64,
    aggregates: &'a Aggregates,
}

/// Handle to the pipeline. Dropping it drains the queue, flushes and checkpoints.
pub struct ClickPipeline {
    sender: Option<Sender<ClickEvent>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> AnalyticsError + '_ {
    move |source| AnalyticsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn log_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("clicks-{generation:012}.log"))
}

/// Log generations present in `dir`, oldest first.
fn log_generations(dir: &Path) -> Result<Vec<u64>, AnalyticsError> {
    let mut generations: Vec<u64> = fs::read_dir(dir)
        .map_err(io_error(dir))?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name();
            let name = name.to_str()?;
            name.strip_prefix("clicks-")?
                .strip_suffix(".log")?
                .parse()
                .ok()
        })
        .collect();
    generations.sort_unstable();
    Ok(generations)
}

/// Loads the checkpoint and replays newer logs; returns the aggregates and the generation the
/// checkpoint covers. A torn last line (a `kill -9` mid-append) is skipped.
fn recover(dir: &Path, shared: &Shared) -> Result<(u64, Vec<u64>), AnalyticsError> {
    let checkpoint_path = dir.join(CHECKPOINT_FILE);
    let covered = match fs::read(&checkpoint_path) {
        Ok(bytes) => {
            let checkpoint: Checkpoint =
                serde_json::from_slice(&bytes).map_err(|error| AnalyticsError::Checkpoint {
                    path: checkpoint_path.clone(),
                    detail: error.to_string(),
                })?;
            *shared.aggregates() = checkpoint.aggregates;
            checkpoint.covered_generation
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => 0,
        Err(error) => return Err(io_error(&checkpoint_path)(error)),
    };
    let generations = log_generations(dir)?;
    for generation in generations.iter().filter(|g| **g > covered) {
        let path = log_path(dir, *generation);
        let file = File::open(&path).map_err(io_error(&path))?;
        for line in BufReader::new(file).split(b'\n') {
            let line = line.map_err(io_error(&path))?;
            match serde_json::from_slice::<ClassifiedClick>(&line) {
                Ok(click) => shared.apply(&click),
                Err(_) => tracing::warn!(
                    "{}: skipped an unreadable click record (a write cut short by a crash)",
                    path.display()
                ),
            }
        }
    }
    Ok((covered, generations))
}

impl ClickPipeline {
    /// Recovers the aggregates from `options.dir` and starts the aggregator thread.
    pub fn start(options: AnalyticsOptions) -> Result<ClickPipeline, AnalyticsError> {
        fs::create_dir_all(&options.dir).map_err(io_error(&options.dir))?;
        let shared = Arc::new(Shared::default());
        let (covered, generations) = recover(&options.dir, &shared)?;
        let generation = generations.last().copied().unwrap_or(covered).max(covered) + 1;
        let log = EventLog::create(&options.dir, generation)?;
        let (sender, receiver) = crossbeam_channel::bounded(options.queue_events_max);
        let mut aggregator = Aggregator {
            shared: shared.clone(),
            options,
            log,
            pending: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("kurz-clicks".into())
            .spawn(move || aggregator.run(receiver))
            .map_err(io_error(Path::new("kurz-clicks thread")))?;
        Ok(ClickPipeline {
            sender: Some(sender),
            shared,
            thread: Some(thread),
        })
    }

    /// Hands a click to the aggregator without blocking; a full queue drops it (counted).
    pub fn record(&self, event: ClickEvent) {
        let Some(sender) = &self.sender else { return };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = sender.try_send(event) {
            self.shared.dropped_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stats of `code`; `None` when it has never been clicked.
    pub fn stats(
        &self,
        code: &str,
        query: StatsQuery,
        now_s: i64,
    ) -> Option<Result<LinkStats, StatsQueryError>> {
        let aggregates = self.shared.aggregates();
        aggregates.get(code).map(|link| link.stats(query, now_s))
    }

    pub fn counters(&self, now_s: i64) -> PipelineCounters {
        let queued = self.sender.as_ref().map_or(0, |sender| sender.len() as u64);
        let last = self.shared.last_applied_at_s.load(Ordering::Relaxed);
        PipelineCounters {
            events_total: self.shared.events_total.load(Ordering::Relaxed),
            bot_events_total: self.shared.bot_events_total.load(Ordering::Relaxed),
            dropped_total: self.shared.dropped_total.load(Ordering::Relaxed),
            queued,
            lag_s: if queued > 0 && last > 0 {
                (now_s - last).max(0)
            } else {
                0
            },
        }
    }

    /// Drains the queue, flushes the log, writes a checkpoint and stops the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.sender = None;
        if let Some(thread) = self.thread.take() {
            // A panicked aggregator has nothing left to write; its clicks since the last flush
            // are the ones a crash would lose too.
            let _ = thread.join();
        }
    }
}

impl Drop for ClickPipeline {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The current generation's append-only log.
struct EventLog {
    dir: PathBuf,
    generation: u64,
    file: File,
    path: PathBuf,
}

impl EventLog {
    fn create(dir: &Path, generation: u64) -> Result<EventLog, AnalyticsError> {
        let path = log_path(dir, generation);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?;
        fsutil::sync_parent_dir(&path).map_err(io_error(&path))?;
        Ok(EventLog {
            dir: dir.to_owned(),
            generation,
            file,
            path,
        })
    }
}

struct Aggregator {
    shared: Arc<Shared>,
    options: AnalyticsOptions,
    log: EventLog,
    /// Log lines applied but not yet written.
    pending: Vec<u8>,
}

fn cut(value: Option<&str>) -> Option<&str> {
    value.map(|value| match value.char_indices().nth(HEADER_BYTES_MAX) {
        Some((at, _)) => &value[..at],
        None => value,
    })
}

impl Aggregator {
    fn run(&mut self, receiver: Receiver<ClickEvent>) {
        let mut next_flush = Instant::now() + self.options.flush_interval;
        let mut next_checkpoint = Instant::now() + self.options.checkpoint_interval;
        loop {
            let wait = next_flush.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(wait) {
                Ok(event) => {
                    self.take(event);
                    for event in receiver.try_iter().take(BATCH_EVENTS_MAX) {
                        self.take(event);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_flush {
                self.flush();
                next_flush = now + self.options.flush_interval;
            }
            if now >= next_checkpoint {
                self.checkpoint();
                next_checkpoint = now + self.options.checkpoint_interval;
            }
        }
        self.checkpoint();
    }

    fn classify(&self, event: &ClickEvent) -> ClassifiedClick {
        let agent = agent::classify(cut(event.user_agent.as_deref()).unwrap_or(""));
        ClassifiedClick {
            code: event.code.to_string(),
            at_s: event.at_s,
            referrer: referrer::domain(cut(event.referer.as_deref())),
            country: self
                .options
                .countries
                .country(event.client_ip, event.country_header.as_deref()),
            browser: agent.browser,
            os: agent.os,
            bot: agent.bot,
        }
    }

    fn take(&mut self, event: ClickEvent) {
        let click = self.classify(&event);
        self.shared.apply(&click);
        // Serialising a plain struct of strings and numbers cannot fail.
        if serde_json::to_writer(&mut self.pending, &click).is_ok() {
            self.pending.push(b'\n');
        }
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let written = self
            .log
            .file
            .write_all(&self.pending)
            .and_then(|()| self.log.file.sync_data());
        match written {
            Ok(()) => self.pending.clear(),
            // Keep the lines: the next flush retries, and the aggregates already count them.
            Err(error) => tracing::error!("{}: {error}", self.log.path.display()),
        }
    }

    /// Writes every aggregate to the checkpoint, starts a new log generation and deletes the
    /// logs the checkpoint covers.
    fn checkpoint(&mut self) {
        self.flush();
        if !self.pending.is_empty() {
            return;
        }
        let covered = self.log.generation;
        let next = match EventLog::create(&self.log.dir, covered + 1) {
            Ok(next) => next,
            Err(error) => return tracing::error!("{error}"),
        };
        let bytes = {
            let mut aggregates = self.shared.aggregates();
            aggregates.prune(crate::timefmt::now_s());
            serde_json::to_vec(&CheckpointRef {
                covered_generation: covered,
                aggregates: &aggregates,
            })
        };
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(error) => return tracing::error!("click checkpoint: {error}"),
        };
        self.log = next;
        let path = self.log.dir.join(CHECKPOINT_FILE);
        if let Err(error) = fsutil::write_durably(&path, &bytes) {
            return tracing::error!("{}: {error}", path.display());
        }
        if let Ok(generations) = log_generations(&self.log.dir) {
            for generation in generations.into_iter().filter(|g| *g <= covered) {
                let _ = fs::remove_file(log_path(&self.log.dir, generation));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::aggregate::{Granularity, HOUR_S};

    const T: i64 = 1_800_000_000 - 1_800_000_000 % HOUR_S;

    fn event(code: &str, at_s: i64, agent: &str, referer: Option<&str>) -> ClickEvent {
        ClickEvent {
            code: code.into(),
            at_s,
            referer: referer.map(Into::into),
            user_agent: Some(agent.into()),
            client_ip: "127.0.0.1".parse().ok(),
            country_header: Some("de".into()),
        }
    }

    const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0";

    fn day_query() -> StatsQuery {
        StatsQuery {
            from_s: T - 86_400,
            to_s: T + 86_400,
            granularity: Granularity::Day,
        }
    }

    fn options(dir: &Path) -> AnalyticsOptions {
        AnalyticsOptions {
            flush_interval: Duration::from_millis(20),
            ..AnalyticsOptions::new(dir.to_owned())
        }
    }

    #[test]
    fn clicks_are_classified_and_survive_a_clean_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pipeline = ClickPipeline::start(options(dir.path())).expect("start");
        pipeline.record(event("a", T, FIREFOX, Some("https://www.news.example/x")));
        pipeline.record(event("a", T + 1, FIREFOX, None));
        pipeline.record(event(
            "a",
            T + 2,
            "Slackbot-LinkExpanding 1.0",
            Some("https://slack.com/"),
        ));
        pipeline.shutdown();

        let pipeline = ClickPipeline::start(options(dir.path())).expect("restart");
        let stats = pipeline
            .stats("a", day_query(), T)
            .expect("clicked")
            .expect("stats");
        assert_eq!((stats.human_total, stats.bot_total), (2, 1));
        assert_eq!(
            stats.referrers,
            vec![("direct".to_owned(), 1), ("news.example".to_owned(), 1)]
        );
        assert_eq!(stats.countries, vec![("DE".to_owned(), 2)]);
        assert_eq!(stats.bots, vec![("Slackbot".to_owned(), 1)]);
        assert!(pipeline.stats("never", day_query(), T).is_none());
    }

    #[test]
    fn flushed_clicks_survive_without_a_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let crashed = ClickPipeline::start(options(dir.path())).expect("start");
        for i in 0..100 {
            crashed.record(event("b", T + i, FIREFOX, None));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let log = log_path(dir.path(), 1);
        while fs::read(&log)
            .map(|bytes| bytes.iter().filter(|b| **b == b'\n').count())
            .unwrap_or(0)
            < 100
        {
            assert!(Instant::now() < deadline, "the log was never flushed");
            std::thread::sleep(Duration::from_millis(10));
        }
        // As after a kill -9: no shutdown, no checkpoint; a torn line at the end of the log.
        std::mem::forget(crashed);
        let mut file = OpenOptions::new()
            .append(true)
            .open(&log)
            .expect("open log");
        file.write_all(b"{\"c\":\"b\",\"t\":").expect("tear");

        let recovered = ClickPipeline::start(options(dir.path())).expect("recover");
        let stats = recovered
            .stats("b", day_query(), T)
            .expect("clicked")
            .expect("stats");
        assert_eq!(stats.human_total, 100);
    }

    #[test]
    fn every_event_is_either_counted_or_counted_as_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pipeline = ClickPipeline::start(AnalyticsOptions {
            queue_events_max: 2,
            ..options(dir.path())
        })
        .expect("start");
        for i in 0..5000 {
            pipeline.record(event("c", T + i, FIREFOX, None));
        }
        let shared = pipeline.shared.clone();
        pipeline.shutdown();
        let events = shared.events_total.load(Ordering::Relaxed);
        let dropped = shared.dropped_total.load(Ordering::Relaxed);
        assert_eq!(events + dropped, 5000);
    }

    #[test]
    fn a_corrupt_checkpoint_is_refused_with_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(CHECKPOINT_FILE), b"{not json").expect("write");
        let error = ClickPipeline::start(options(dir.path()))
            .err()
            .expect("refused");
        assert!(error.to_string().contains(CHECKPOINT_FILE), "{error}");
    }
}
