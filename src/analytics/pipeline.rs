//! The click pipeline: the redirect path hands each click to its worker's bounded lane without
//! blocking or allocating (see [`handoff`]; a full lane drops the event and counts the drop;
//! exact per-link counts live in [`super::ClickCounters`] and are never dropped), and one
//! aggregator thread classifies it (referrer domain, country, user agent, bot), folds it into
//! the aggregates and appends it to an event log.
//!
//! Persistence: the event log (`<dir>/clicks-<generation>.log`, one tab-separated line per
//! click) is fsynced every flush interval (default 1 s), so a `kill -9` loses at most that much;
//! a checkpoint of all aggregates (`<dir>/aggregates.json`, temp file + fsync + rename) is
//! written every checkpoint interval and at shutdown, after which the logs it covers are
//! deleted. Start-up loads the checkpoint and replays the newer logs.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::aggregate::{
    Aggregates, ClassifiedClick, LinkStats, StatsQuery, StatsQueryError, OTHER,
};
use super::clicklog::{ClickLine, ClickLog, ClickLogError, ClickLogOptions};
use super::geo::CountryResolver;
use super::{agent, geo, referrer};
use crate::fsutil;
use crate::threads::{PacedWriter, Pacer};

mod handoff;

pub use handoff::{ClickEvent, EventBatch};
use handoff::{Lanes, ReadEvent};

const CHECKPOINT_FILE: &str = "aggregates.json";
/// Most events the aggregator applies under one lock of the aggregates: ~0.15 ms of work, after
/// which it lets go of the lock and, if its burst is over, of the CPU.
const BATCH_EVENTS_MAX: usize = 512;
/// Events the aggregator reads ahead of the one it applies, to prefetch their links.
const FOLD_LOOKAHEAD: usize = 16;
/// How often the aggregator looks at the lanes. It polls rather than waits: waking it per click
/// would make every click on the redirect path pay for a thread wake-up (a futex call and a
/// context switch), polling costs the aggregator one wake-up per interval.
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);
/// Longest referrer, user agent or country header kept from a request, in bytes (longer ones
/// are cut).
pub const HEADER_BYTES_MAX: usize = 512;
/// Bytes of memory a drained lane's buffer keeps for the next drain; one that grew past this in
/// a burst is given back.
const LANE_BYTES_KEPT: usize = 1 << 20;
/// Log lines buffered before they are written to the event log between two flushes, so that
/// a second of clicks at a high rate is not held in memory until the fsync.
const LOG_WRITE_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    #[error("click analytics {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("click analytics checkpoint {path} is unreadable: {detail}")]
    Checkpoint { path: PathBuf, detail: String },
    #[error(transparent)]
    ClickLog(#[from] ClickLogError),
}

/// Where the pipeline keeps its files and how often it writes them.
pub struct AnalyticsOptions {
    pub dir: PathBuf,
    pub flush_interval: Duration,
    pub checkpoint_interval: Duration,
    /// Events waiting for the aggregator, all lanes together.
    pub queue_events_max: usize,
    pub countries: CountryResolver,
    /// The raw click log for shipping clicks elsewhere, if one is wanted.
    pub click_log: Option<ClickLogOptions>,
}

impl AnalyticsOptions {
    pub fn new(dir: PathBuf) -> AnalyticsOptions {
        AnalyticsOptions {
            dir,
            flush_interval: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(60),
            queue_events_max: 65_536,
            countries: CountryResolver::without_database(),
            click_log: None,
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
    /// Set when the pipeline stops: the aggregator drains the lanes once more and checkpoints.
    closed: AtomicBool,
}

impl Shared {
    fn aggregates(&self) -> MutexGuard<'_, Aggregates> {
        // A panic while holding the lock leaves counts that are still counts; keep serving them.
        self.aggregates
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn counted(&self, events: u64, bot_events: u64, newest_at_s: i64) {
        self.events_total.fetch_add(events, Ordering::Relaxed);
        self.bot_events_total
            .fetch_add(bot_events, Ordering::Relaxed);
        self.last_applied_at_s
            .fetch_max(newest_at_s, Ordering::Relaxed);
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

/// Appends `click` to the log as one line of tab-separated fields: code, unix seconds,
/// referrer, country, browser, os, bot (`0`/`1`). Names never hold a tab or a line break (codes,
/// hosts, ISO codes and agent families cannot); one that did would be written as "other".
fn write_log_line(
    (line, second): (&mut Vec<u8>, &mut SecondText),
    aggregates: &Aggregates,
    click: &ClassifiedClick<'_>,
) {
    line.extend_from_slice(click.code.as_bytes());
    line.push(b'\t');
    second.write(line, click.at_s);
    for id in [click.referrer, click.country, click.browser, click.os] {
        line.push(b'\t');
        let name = aggregates.name(id);
        if name
            .bytes()
            .any(|byte| matches!(byte, b'\t' | b'\n' | b'\r'))
        {
            line.extend_from_slice(OTHER.as_bytes());
        } else {
            line.extend_from_slice(name.as_bytes());
        }
    }
    line.extend_from_slice(if click.bot { b"\t1\n" } else { b"\t0\n" });
}

/// The decimal text of the second of the last click logged: the clicks of one second share it.
#[derive(Default)]
struct SecondText {
    at_s: i64,
    text: Vec<u8>,
}

impl SecondText {
    fn write(&mut self, out: &mut Vec<u8>, at_s: i64) {
        if self.text.is_empty() || self.at_s != at_s {
            self.text.clear();
            crate::decimal::write_i64(&mut self.text, at_s);
            self.at_s = at_s;
        }
        out.extend_from_slice(&self.text);
    }
}

/// Applies one log line; false when it is not a whole line (a write cut short by a crash).
fn apply_log_line(aggregates: &mut Aggregates, line: &[u8]) -> bool {
    let Ok(line) = std::str::from_utf8(line) else {
        return false;
    };
    let fields: Vec<&str> = line.split('\t').collect();
    let [code, at_s, referrer, country, browser, os, bot] = fields[..] else {
        return false;
    };
    let (Ok(at_s), Some(bot)) = (
        at_s.parse::<i64>(),
        match bot {
            "0" => Some(false),
            "1" => Some(true),
            _ => None,
        },
    ) else {
        return false;
    };
    if code.is_empty() {
        return false;
    }
    let click = ClassifiedClick {
        code,
        at_s,
        referrer: aggregates.intern(referrer),
        country: aggregates.intern(country),
        browser: aggregates.intern(browser),
        os: aggregates.intern(os),
        bot,
    };
    aggregates.apply(&click);
    true
}

/// Handle to the pipeline. Dropping it drains the lanes, flushes and checkpoints.
pub struct ClickPipeline {
    lanes: Arc<Lanes>,
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
    let covered = match File::open(&checkpoint_path) {
        Ok(file) => {
            // Parsed from a mapping rather than a copy on the heap: a checkpoint of a million
            // clicked links is ~90 MB that the allocator would keep for a while after the parse.
            // SAFETY: a checkpoint is only ever replaced by renaming a new file over it (and
            // the data dir lock keeps other kurz processes out), so the mapped bytes do not
            // change while the map lives.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_error(&checkpoint_path))?;
            let checkpoint: Checkpoint =
                serde_json::from_slice(&map).map_err(|error| AnalyticsError::Checkpoint {
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
    let mut aggregates = shared.aggregates();
    for generation in generations.iter().filter(|g| **g > covered) {
        let path = log_path(dir, *generation);
        let file = File::open(&path).map_err(io_error(&path))?;
        for line in BufReader::new(file).split(b'\n') {
            let line = line.map_err(io_error(&path))?;
            if !apply_log_line(&mut aggregates, &line) {
                tracing::warn!(
                    "{}: skipped an unreadable click record (a write cut short by a crash)",
                    path.display()
                );
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
        let click_log = options.click_log.clone().map(ClickLog::open).transpose()?;
        let lanes = Arc::new(Lanes::new(options.queue_events_max));
        let mut aggregator = Aggregator {
            lanes: lanes.clone(),
            spare: EventBatch::default(),
            shared: shared.clone(),
            options,
            log,
            pending: Vec::new(),
            second: SecondText::default(),
            classifier: Classifier::default(),
            click_log,
        };
        let thread = crate::threads::spawn_background("kurz-clicks", move || aggregator.run())
            .map_err(io_error(Path::new("kurz-clicks thread")))?;
        Ok(ClickPipeline {
            lanes,
            shared,
            thread: Some(thread),
        })
    }

    /// Hands a click to the aggregator without blocking or allocating; a full or busy lane
    /// drops it (counted).
    pub fn record(&self, event: &ClickEvent<'_>) {
        if !self.lanes.push(event) {
            self.shared.dropped_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds a click to `batch`, which the caller hands over later with [`Self::record_batch`]
    /// (one lock of its lane for many clicks); a click that cannot be encoded is dropped
    /// (counted).
    pub fn gather(&self, batch: &mut EventBatch, event: &ClickEvent<'_>) {
        if !batch.push(event) {
            self.shared.dropped_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hands every click of `batch` to the aggregator without blocking or allocating, and
    /// empties it; a full or busy lane drops them (counted).
    pub fn record_batch(&self, batch: &mut EventBatch) {
        if batch.events() == 0 {
            return;
        }
        if !self.lanes.push_batch(batch) {
            self.shared
                .dropped_total
                .fetch_add(batch.events() as u64, Ordering::Relaxed);
        }
        batch.clear();
    }

    /// Stats of `code`; `None` when it has never been clicked.
    pub fn stats(
        &self,
        code: &str,
        query: StatsQuery,
        now_s: i64,
    ) -> Option<Result<LinkStats, StatsQueryError>> {
        self.shared.aggregates().stats(code, query, now_s)
    }

    pub fn counters(&self, now_s: i64) -> PipelineCounters {
        let queued = self.lanes.queued();
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

    /// Drains the lanes, flushes the log, writes a checkpoint and stops the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // Every click recorded so far is in a lane: `record` cannot run while `stop` has
        // `self` exclusively.
        self.shared.closed.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
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
    /// Lines were appended since the last fsync.
    unsynced: bool,
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
            unsynced: false,
        })
    }

    /// Hands `lines` to the file and empties them (not yet durable: see [`Self::sync`]). On
    /// an error they stay, to be retried.
    fn append(&mut self, lines: &mut Vec<u8>) -> io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        self.file.write_all(lines)?;
        lines.clear();
        self.unsynced = true;
        Ok(())
    }

    /// Makes every line appended so far durable.
    fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }
}

struct Aggregator {
    lanes: Arc<Lanes>,
    /// The empty batch the next drained lane gets.
    spare: EventBatch,
    shared: Arc<Shared>,
    options: AnalyticsOptions,
    log: EventLog,
    /// Log lines applied but not yet written.
    pending: Vec<u8>,
    second: SecondText,
    classifier: Classifier,
    click_log: Option<ClickLog>,
}

/// Entries each classification cache holds before it starts over.
const CACHE_ENTRIES_MAX: usize = 4096;

/// What a user agent was classified as, its names interned.
#[derive(Clone, Copy)]
struct AgentIds {
    browser: u32,
    os: u32,
    bot: bool,
}

/// Classifies clicks into interned ids, remembering recent user agents and referrers: real
/// traffic repeats a few thousand of each, and parsing one costs microseconds. Header values
/// arrive as the request's bytes and are classified as text, bytes that are not UTF-8 replaced
/// by U+FFFD; the caches are keyed by the bytes, so a value seen before is not even checked.
#[derive(Default)]
struct Classifier {
    agents: HashMap<Box<[u8]>, AgentIds, ahash::RandomState>,
    referrers: HashMap<Box<[u8]>, u32, ahash::RandomState>,
    /// Ids of names every click without a header needs.
    no_agent: Option<AgentIds>,
    direct: Option<u32>,
    unknown_country: Option<u32>,
}

/// The cached value of `key`, or `make`'s, remembered (a full cache starts over).
fn cached<V: Copy>(
    cache: &mut HashMap<Box<[u8]>, V, ahash::RandomState>,
    key: &[u8],
    make: impl FnOnce() -> V,
) -> V {
    if let Some(value) = cache.get(key) {
        return *value;
    }
    let value = make();
    if cache.len() >= CACHE_ENTRIES_MAX {
        cache.clear();
    }
    cache.insert(key.into(), value);
    value
}

impl Classifier {
    fn agent(&mut self, aggregates: &mut Aggregates, user_agent: Option<&[u8]>) -> AgentIds {
        let intern = |aggregates: &mut Aggregates, agent: &str| {
            let class = agent::classify(agent);
            AgentIds {
                browser: aggregates.intern(&class.browser),
                os: aggregates.intern(&class.os),
                bot: class.bot,
            }
        };
        match user_agent {
            None => *self.no_agent.get_or_insert_with(|| intern(aggregates, "")),
            Some(agent) => cached(&mut self.agents, agent, || {
                intern(aggregates, &String::from_utf8_lossy(agent))
            }),
        }
    }

    fn referrer(&mut self, aggregates: &mut Aggregates, referer: Option<&[u8]>) -> u32 {
        match referer {
            None => *self
                .direct
                .get_or_insert_with(|| aggregates.intern(&referrer::domain(None))),
            Some(referer) => cached(&mut self.referrers, referer, || {
                aggregates.intern(&referrer::domain(Some(&String::from_utf8_lossy(referer))))
            }),
        }
    }

    fn country(
        &mut self,
        aggregates: &mut Aggregates,
        countries: &CountryResolver,
        event: &ReadEvent<'_>,
    ) -> u32 {
        if event.country_header.is_none() && !countries.has_database() {
            return *self
                .unknown_country
                .get_or_insert_with(|| aggregates.intern(geo::UNKNOWN));
        }
        let header = event.country_header.map(String::from_utf8_lossy);
        aggregates.intern(&countries.country(event.client_ip, header.as_deref()))
    }
}

/// What one batch of events is folded into.
struct Fold<'a> {
    aggregates: &'a mut Aggregates,
    classifier: &'a mut Classifier,
    countries: &'a CountryResolver,
    log_lines: &'a mut Vec<u8>,
    second: &'a mut SecondText,
    click_log: Option<&'a mut ClickLog>,
}

/// What [`fold`] saw.
struct Folded {
    events: u64,
    bot_events: u64,
    newest_at_s: i64,
}

/// The aggregator's work on each event: classifies it, applies it to the aggregates, appends its
/// event-log line (and its click-log line).
fn fold<'e>(into: &mut Fold<'_>, events: impl Iterator<Item = ReadEvent<'e>>) -> Folded {
    let mut folded = Folded {
        events: 0,
        bot_events: 0,
        newest_at_s: 0,
    };
    let aggregates = &mut *into.aggregates;
    // Events are taken FOLD_LOOKAHEAD ahead of the one applied: each one's table slot is asked
    // for as it enters the window and its link halfway through, so the two cache misses of a
    // cold link overlap with the work on the events before it.
    let mut events = events.fuse();
    let mut window = VecDeque::with_capacity(FOLD_LOOKAHEAD);
    loop {
        while window.len() < FOLD_LOOKAHEAD {
            let Some(event) = events.next() else {
                break;
            };
            let hash = aggregates.code_hash(&event.code);
            aggregates.prefetch_slot(hash);
            window.push_back((event, hash));
        }
        if let Some((_, hash)) = window.get(FOLD_LOOKAHEAD / 2) {
            aggregates.prefetch_link(*hash);
        }
        let Some((event, hash)) = window.pop_front() else {
            break;
        };
        let agent = into.classifier.agent(aggregates, event.user_agent);
        let click = ClassifiedClick {
            code: &event.code,
            at_s: event.at_s,
            referrer: into.classifier.referrer(aggregates, event.referer),
            country: into.classifier.country(aggregates, into.countries, &event),
            browser: agent.browser,
            os: agent.os,
            bot: agent.bot,
        };
        aggregates.apply_hashed(&click, hash);
        write_log_line((into.log_lines, into.second), aggregates, &click);
        if let Some(click_log) = &mut into.click_log {
            click_log.push(&ClickLine {
                code: &event.code,
                at: &crate::timefmt::rfc3339(event.at_s),
                at_s: event.at_s,
                referer: event.referer.map(String::from_utf8_lossy).as_deref(),
                referrer_domain: aggregates.name(click.referrer),
                user_agent: event.user_agent.map(String::from_utf8_lossy).as_deref(),
                client_ip: event.client_ip,
                country: aggregates.name(click.country),
                browser: aggregates.name(click.browser),
                os: aggregates.name(click.os),
                bot: click.bot,
            });
        }
        folded.events += 1;
        folded.bot_events += u64::from(click.bot);
        folded.newest_at_s = folded.newest_at_s.max(click.at_s);
    }
    folded
}

/// The aggregator thread's per-event work (classification, aggregation, event-log line) without
/// its thread, queue and files, over aggregates of its own and without GeoIP or a click log. The
/// aggregator benchmark's way in.
pub struct EventFolder {
    aggregates: Aggregates,
    classifier: Classifier,
    countries: CountryResolver,
    log_lines: Vec<u8>,
    second: SecondText,
}

impl Default for EventFolder {
    fn default() -> EventFolder {
        EventFolder {
            aggregates: Aggregates::default(),
            classifier: Classifier::default(),
            countries: CountryResolver::without_database(),
            log_lines: Vec::new(),
            second: SecondText::default(),
        }
    }
}

impl EventFolder {
    /// Folds the events of `batch` in, as the aggregator does with a lane it drained.
    pub fn fold(&mut self, batch: &EventBatch) {
        fold(
            &mut Fold {
                aggregates: &mut self.aggregates,
                classifier: &mut self.classifier,
                countries: &self.countries,
                log_lines: &mut self.log_lines,
                second: &mut self.second,
                click_log: None,
            },
            batch.iter(),
        );
    }

    /// Empties the event-log lines folded so far, as a flush does, and returns their length in
    /// bytes.
    pub fn flush_log(&mut self) -> usize {
        let bytes = self.log_lines.len();
        self.log_lines.clear();
        bytes
    }

    /// The aggregates folded so far.
    pub fn aggregates(&self) -> &Aggregates {
        &self.aggregates
    }
}

impl Aggregator {
    fn run(&mut self) {
        let mut next_flush = Instant::now() + self.options.flush_interval;
        let mut next_checkpoint = Instant::now() + self.options.checkpoint_interval;
        loop {
            // Read before draining: a stop that comes later is seen by the next round.
            let closed = self.shared.closed.load(Ordering::Acquire);
            self.drain();
            let now = Instant::now();
            if now >= next_flush {
                self.flush();
                next_flush = now + self.options.flush_interval;
            }
            if now >= next_checkpoint {
                self.checkpoint();
                next_checkpoint = now + self.options.checkpoint_interval;
            }
            if closed {
                break;
            }
            std::thread::park_timeout(DRAIN_INTERVAL.min(self.options.flush_interval));
        }
        self.checkpoint();
    }

    /// Applies every event waiting in the lanes, at most [`BATCH_EVENTS_MAX`] under one lock of
    /// the aggregates.
    fn drain(&mut self) {
        let mut pacer = Pacer::default();
        for lane in 0..self.lanes.len() {
            self.lanes.take(lane, &mut self.spare);
            if self.spare.events() == 0 {
                continue;
            }
            let mut events = self.spare.iter();
            loop {
                let mut aggregates = self.shared.aggregates();
                let folded = fold(
                    &mut Fold {
                        aggregates: &mut aggregates,
                        classifier: &mut self.classifier,
                        countries: &self.options.countries,
                        log_lines: &mut self.pending,
                        second: &mut self.second,
                        click_log: self.click_log.as_mut(),
                    },
                    events.by_ref().take(BATCH_EVENTS_MAX),
                );
                drop(aggregates);
                self.shared
                    .counted(folded.events, folded.bot_events, folded.newest_at_s);
                if self.pending.len() >= LOG_WRITE_BYTES {
                    // A failed write keeps the lines; the next flush retries and reports it.
                    let _ = self.log.append(&mut self.pending);
                }
                pacer.pace();
                if folded.events < BATCH_EVENTS_MAX as u64 {
                    break;
                }
            }
            self.spare.clear();
            self.spare.shrink(LANE_BYTES_KEPT);
        }
    }

    fn flush(&mut self) {
        if let Some(click_log) = &mut self.click_log {
            // The lines stay buffered for the next flush.
            if let Err(error) = click_log.flush() {
                tracing::error!("{error}");
            }
        }
        let synced = self
            .log
            .append(&mut self.pending)
            .and_then(|()| self.log.sync());
        if let Err(error) = synced {
            // The lines not written stay pending: the next flush retries them, and the
            // aggregates already count them.
            tracing::error!("{}: {error}", self.log.path.display());
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
        let path = self.log.dir.join(CHECKPOINT_FILE);
        let written = fsutil::write_durably_with(&path, |out| {
            let mut aggregates = self.shared.aggregates();
            aggregates.prune(crate::timefmt::now_s());
            let checkpoint = CheckpointRef {
                covered_generation: covered,
                aggregates: &aggregates,
            };
            // Streamed and paced: the aggregates of every clicked link are never held a second
            // time as JSON, and serialising them yields to redirects like other background work.
            serde_json::to_writer(PacedWriter::new(out), &checkpoint).map_err(io::Error::from)
        });
        if let Err(error) = written {
            return tracing::error!("click checkpoint {}: {error}", path.display());
        }
        self.log = next;
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

    fn event<'a>(
        code: &'a str,
        at_s: i64,
        agent: &'a str,
        referer: Option<&'a str>,
    ) -> ClickEvent<'a> {
        ClickEvent {
            code,
            at_s,
            referer: referer.map(str::as_bytes),
            user_agent: Some(agent.as_bytes()),
            client_ip: "127.0.0.1".parse().ok(),
            country_header: Some(b"de"),
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
        pipeline.record(&event("a", T, FIREFOX, Some("https://www.news.example/x")));
        pipeline.record(&event("a", T + 1, FIREFOX, None));
        pipeline.record(&event(
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
            crashed.record(&event("b", T + i, FIREFOX, None));
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
        file.write_all(b"b\t18000").expect("tear");

        let recovered = ClickPipeline::start(options(dir.path())).expect("recover");
        let stats = recovered
            .stats("b", day_query(), T)
            .expect("clicked")
            .expect("stats");
        assert_eq!(stats.human_total, 100);
    }

    #[test]
    fn lines_reach_the_log_between_flushes_at_a_high_click_rate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pipeline = ClickPipeline::start(AnalyticsOptions {
            flush_interval: Duration::from_secs(3600),
            ..AnalyticsOptions::new(dir.path().to_owned())
        })
        .expect("start");
        let log = log_path(dir.path(), 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut clicks = 0;
        while fs::metadata(&log).map_or(0, |meta| meta.len()) < LOG_WRITE_BYTES as u64 {
            assert!(
                Instant::now() < deadline,
                "the lines of {clicks} clicks were held for the flush"
            );
            for _ in 0..1000 {
                pipeline.record(&event("c", T + clicks, FIREFOX, None));
                clicks += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        pipeline.shutdown();
    }

    #[test]
    fn a_log_line_has_its_own_second_whatever_came_before() {
        let mut second = SecondText::default();
        let mut out = Vec::new();
        for at_s in [0, T, T, T + 1, T, -5, -5, 0] {
            out.clear();
            second.write(&mut out, at_s);
            assert_eq!(out, at_s.to_string().as_bytes());
        }
    }

    #[test]
    fn every_event_is_either_counted_or_counted_as_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pipeline = ClickPipeline::start(AnalyticsOptions {
            queue_events_max: 2,
            ..options(dir.path())
        })
        .expect("start");
        let mut batch = EventBatch::default();
        for i in 0..5000 {
            pipeline.record(&event("c", T + i, FIREFOX, None));
            // And as an event loop hands them over: a round of three at a time.
            pipeline.gather(&mut batch, &event("g", T + i, FIREFOX, None));
            if i % 3 == 2 {
                pipeline.record_batch(&mut batch);
                assert_eq!(batch.events(), 0);
            }
        }
        pipeline.record_batch(&mut batch);
        // A code too long to encode is dropped (counted) as it is gathered.
        let long = "c".repeat(usize::from(u16::MAX));
        pipeline.gather(&mut batch, &event(&long, T, FIREFOX, None));
        assert_eq!(batch.events(), 0);
        let shared = pipeline.shared.clone();
        pipeline.shutdown();
        let events = shared.events_total.load(Ordering::Relaxed);
        let dropped = shared.dropped_total.load(Ordering::Relaxed);
        assert_eq!(events + dropped, 10_001);
    }

    #[test]
    fn classification_is_the_same_from_the_cache_and_after_it_starts_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pipeline = ClickPipeline::start(options(dir.path())).expect("start");
        let links = CACHE_ENTRIES_MAX + 10;
        let referer = |i: usize| format!("https://r{i}.example/page");
        let agent = |i: usize| format!("{FIREFOX} Build/{i}");
        for i in (0..links).chain([0, links - 1]) {
            pipeline.record(&event(&format!("l{i}"), T, &agent(i), Some(&referer(i))));
        }
        pipeline.record(&event("bot", T, "Twitterbot/1.0", None));
        pipeline.record(&event("bot", T, "Twitterbot/1.0", None));
        let shared = pipeline.shared.clone();
        pipeline.shutdown();
        let aggregates = shared.aggregates();
        for i in [0, links - 1] {
            let stats = aggregates
                .stats(&format!("l{i}"), day_query(), T)
                .expect("clicked")
                .expect("stats");
            assert_eq!(stats.referrers, vec![(format!("r{i}.example"), 2)]);
            assert_eq!(stats.browsers, vec![("Firefox".to_owned(), 2)]);
            assert_eq!(stats.os, vec![("Linux".to_owned(), 2)]);
        }
        let bot = aggregates
            .stats("bot", day_query(), T)
            .expect("clicked")
            .expect("stats");
        assert_eq!((bot.human_total, bot.bot_total), (0, 2));
        assert_eq!(bot.bots, vec![("Twitterbot".to_owned(), 2)]);
    }

    #[test]
    fn header_bytes_that_are_not_utf8_classify_as_their_text_does() {
        let referers: [&[u8]; 4] = [
            b"https://news.example/\xff",
            b"https://\xffbad.example/",
            b"https://news.example/ok",
            b"https://\xffbad.example/",
        ];
        let agent = b"Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0 \xfe";
        let mut batch = EventBatch::default();
        for referer in referers {
            assert!(batch.push(&ClickEvent {
                code: "nu",
                at_s: T,
                referer: Some(referer),
                user_agent: Some(agent),
                ..ClickEvent::default()
            }));
        }
        let mut folder = EventFolder::default();
        folder.fold(&batch);
        assert!(folder.flush_log() > 0);
        let stats = folder
            .aggregates()
            .stats("nu", day_query(), T)
            .expect("clicked")
            .expect("stats");
        let mut expected: Vec<(String, u64)> = Vec::new();
        for referer in referers {
            let domain = referrer::domain(Some(&String::from_utf8_lossy(referer)));
            match expected.iter_mut().find(|(name, _)| *name == domain) {
                Some((_, count)) => *count += 1,
                None => expected.push((domain, 1)),
            }
        }
        expected.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        assert_eq!(stats.referrers, expected);
        let class = agent::classify(&String::from_utf8_lossy(agent));
        assert_eq!(stats.browsers, vec![(class.browser, 4)]);
        assert_eq!(stats.os, vec![(class.os, 4)]);
    }

    #[test]
    fn a_corrupt_checkpoint_is_refused_with_its_name() {
        for damaged in [&b"{not json"[..], b"", b"{\"covered_generation\":1,"] {
            let dir = tempfile::tempdir().expect("tempdir");
            fs::write(dir.path().join(CHECKPOINT_FILE), damaged).expect("write");
            let error = ClickPipeline::start(options(dir.path()))
                .err()
                .expect("refused");
            assert!(error.to_string().contains(CHECKPOINT_FILE), "{error}");
        }
    }
}
