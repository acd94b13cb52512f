//! Click counting: an exact per-link count of redirects served and the time of the last one,
//! which also enforces `max_clicks`. Counts live in memory, in two places that add up:
//! - dense counts, an array by table slot of the snapshot lookups read (one array access per
//!   click, no hashing, no lock; 8 bytes a slot, untouched pages cost no memory). Uncapped
//!   links of the snapshot count here, up to 2^31 clicks each. When the store swaps to a new
//!   snapshot, [`ClickCounters::follow`] moves the counts to an array for the new one; until
//!   then clicks count in the keyed map;
//! - a keyed map (a sharded map of atomics, no lock shared by all workers) for links in the
//!   overlay, capped links (a cap's count must live in one cell to be exact), clicks made
//!   while the dense counts move and clicks past what a dense cell holds.
//!   [`ClickCounters::follow`] folds its uncapped entries into the dense counts.
//!
//! Counts reach the data dir in two files: every checkpoint interval (default 1 s) the counts
//! that changed are appended to `clicks-changes.tsv` and fsynced, so a `kill -9` loses at most
//! that interval; when the changes outgrow the full file, and at shutdown, every count is
//! written to `clicks.tsv` (temp file, fsync, rename) and the changes file starts over. A line
//! always holds a link's total, so the largest line of a code is its latest count. Reads the
//! snapshot's table (to place counts by slot), never writes to the store.

pub mod agent;
pub mod aggregate;
pub mod clicklog;
pub mod geo;
pub mod pipeline;
pub mod referrer;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;

use crate::decimal;
use crate::store::snapshot::Snapshot;
use crate::store::SnapshotSlot;
use crate::threads::Pacer;

/// Every count, in the data dir.
pub const CLICKS_FILE: &str = "clicks.tsv";
/// Counts changed since `clicks.tsv` was written, appended, in the data dir.
pub const CLICK_CHANGES_FILE: &str = "clicks-changes.tsv";
const CLICKS_FILE_HEADER: &str =
    "# kurz click counts: code<TAB>clicks<TAB>last_clicked_at (unix s)";
/// Lines (or links moved) between two looks at the clock of a [`Pacer`]: a few microseconds of
/// work.
const PACE_EVERY: usize = 64;
/// Longest [`ClickCounters::follow`] waits for redirects still counting into the old dense
/// counts before it moves them anyway (a redirect takes microseconds; this only guards against
/// a stuck thread).
const FOLLOW_WAIT_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ClicksError {
    #[error("cannot read click counts {path}: {cause}")]
    Read { path: PathBuf, cause: io::Error },
    #[error("cannot write click counts {path}: {cause}")]
    Write { path: PathBuf, cause: io::Error },
}

/// One link's counters in the keyed map.
#[derive(Default, Debug)]
struct ClickCell {
    clicks: AtomicU64,
    /// The count the files in the data dir hold (written by the checkpoint thread only).
    saved_clicks: AtomicU64,
    /// Unix seconds; 0 = never.
    last_clicked_at_s: AtomicI64,
    /// A click judged against a cap used this cell: it stays in the keyed map.
    capped: AtomicBool,
}

/// One link's counters in the dense counts: 8 bytes, so that a million slots cost 8 MB once
/// clicks touched every page.
#[derive(Debug)]
struct DenseCell {
    /// At most [`DENSE_CLICKS_MAX`] (plus one click per racing thread); clicks past it count in
    /// the keyed map, which adds up with this.
    clicks: AtomicU32,
    /// Unix seconds (a u32 reaches 2106); 0 = never.
    last_clicked_at_s: AtomicU32,
}

/// The count past which a dense cell takes no more clicks: far enough below `u32::MAX` that
/// the clicks of threads racing past the check can never wrap it.
const DENSE_CLICKS_MAX: u32 = 1 << 31;

impl DenseCell {
    /// Counts one click unless the cell is full; whether it did.
    fn count(&self, now_s: i64) -> bool {
        if self.clicks.load(Ordering::Relaxed) >= DENSE_CLICKS_MAX {
            return false;
        }
        self.clicks.fetch_add(1, Ordering::SeqCst);
        self.raise_last_clicked(now_s);
        true
    }

    /// Adds `stats` unless the count would pass [`DENSE_CLICKS_MAX`]; whether it did.
    fn add(&self, stats: ClickStats) -> bool {
        let added = self
            .clicks
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |clicks| {
                u32::try_from(stats.clicks)
                    .ok()
                    .and_then(|more| clicks.checked_add(more))
                    .filter(|total| *total <= DENSE_CLICKS_MAX)
            });
        if added.is_ok() {
            self.raise_last_clicked(stats.last_clicked_at_s.unwrap_or(0));
        }
        added.is_ok()
    }

    /// Empties the cell and returns what it held (restoring only, before redirects start).
    fn take(&self) -> ClickStats {
        let stats = self.stats();
        self.clicks.store(0, Ordering::SeqCst);
        self.last_clicked_at_s.store(0, Ordering::SeqCst);
        stats
    }

    fn raise_last_clicked(&self, at_s: i64) {
        let at_s = u32::try_from(at_s.max(0)).unwrap_or(u32::MAX);
        if self.last_clicked_at_s.load(Ordering::Relaxed) < at_s {
            self.last_clicked_at_s.fetch_max(at_s, Ordering::Relaxed);
        }
    }

    fn stats(&self) -> ClickStats {
        let last = self.last_clicked_at_s.load(Ordering::Relaxed);
        ClickStats {
            clicks: u64::from(self.clicks.load(Ordering::SeqCst)),
            last_clicked_at_s: (last != 0).then_some(i64::from(last)),
        }
    }
}

/// The counts of one snapshot's links, by table slot.
struct DenseCounts {
    snapshot: Arc<Snapshot>,
    cells: Box<[DenseCell]>,
    /// One bit per slot: the count changed since it was last saved.
    changed: Box<[AtomicU64]>,
}

impl DenseCounts {
    fn new(snapshot: Arc<Snapshot>) -> DenseCounts {
        let slots = snapshot.slot_count();
        // SAFETY: atomics are valid when zeroed, and zeroed is the state every cell starts in.
        // A zeroed allocation of this size comes straight from the OS, so pages no click
        // touches are never made resident.
        let cells = unsafe { Box::<[DenseCell]>::new_zeroed_slice(slots).assume_init() };
        // SAFETY: as above.
        let changed =
            unsafe { Box::<[AtomicU64]>::new_zeroed_slice(slots.div_ceil(64)).assume_init() };
        DenseCounts {
            snapshot,
            cells,
            changed,
        }
    }

    /// Counts a click in `slot` unless its cell is full; whether it did. The count is raised
    /// before the changed bit is looked at, and a save clears the bit before it reads the count
    /// (both sequentially consistent), so a click a save did not see always leaves its bit set.
    fn count(&self, slot: usize, now_s: i64) -> bool {
        let counted = self.cells.get(slot).is_some_and(|cell| cell.count(now_s));
        if counted {
            self.mark_changed(slot);
        }
        counted
    }

    fn mark_changed(&self, slot: usize) {
        let word = &self.changed[slot / 64];
        let bit = 1u64 << (slot % 64);
        if word.load(Ordering::SeqCst) & bit == 0 {
            word.fetch_or(bit, Ordering::SeqCst);
        }
    }

    fn slot_of(&self, code: &str) -> Option<usize> {
        self.snapshot.slot_of(code)
    }

    fn stats_at(&self, slot: usize) -> ClickStats {
        self.cells
            .get(slot)
            .map_or_else(ClickStats::default, DenseCell::stats)
    }

    fn stats(&self, code: &str) -> ClickStats {
        self.slot_of(code)
            .map_or_else(ClickStats::default, |slot| self.stats_at(slot))
    }

    /// Adds `stats` to the count in `slot` (moving counts in) unless its cell cannot hold
    /// them; whether it did.
    fn add(&self, slot: usize, stats: ClickStats) -> bool {
        self.cells.get(slot).is_some_and(|cell| cell.add(stats))
    }
}

/// Raises `at` to `now_s`; most clicks of a busy link find it raised already and write nothing.
fn raise(at: &AtomicI64, now_s: i64) {
    if at.load(Ordering::Relaxed) < now_s {
        at.fetch_max(now_s, Ordering::Relaxed);
    }
}

fn stats_of(clicks: &AtomicU64, last_clicked_at_s: &AtomicI64) -> ClickStats {
    let last = last_clicked_at_s.load(Ordering::Relaxed);
    ClickStats {
        clicks: clicks.load(Ordering::SeqCst),
        last_clicked_at_s: (last != 0).then_some(last),
    }
}

/// What the counters say about one link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClickStats {
    pub clicks: u64,
    pub last_clicked_at_s: Option<i64>,
}

impl ClickStats {
    fn plus(self, other: ClickStats) -> ClickStats {
        ClickStats {
            clicks: self.clicks + other.clicks,
            last_clicked_at_s: self.last_clicked_at_s.max(other.last_clicked_at_s),
        }
    }
}

/// Shards of the keyed map. Many, so that a checkpoint, which reads one shard at a time under
/// its read lock, holds up a redirect that adds a newly clicked link for microseconds, not
/// milliseconds.
const COUNTER_SHARDS: usize = 1024;

/// Memory hints for a stretch of clicks about to be recorded, pinned to the dense counts current
/// when it was taken. Hold it briefly: [`ClickCounters::follow`] waits for it to be dropped
/// before it moves the counts.
pub struct CountHints(arc_swap::Guard<Option<Arc<DenseCounts>>>);

impl CountHints {
    /// Starts loading, into the CPU's cache, the count of the snapshot link in table `slot` and
    /// the word of its changed bit, for a click about to be recorded (both are written by it).
    pub fn prefetch(&self, slot: usize) {
        if let Some(dense) = self.0.as_ref() {
            if let Some(cell) = dense.cells.get(slot) {
                crate::prefetch::prefetch(cell);
            }
            if let Some(word) = dense.changed.get(slot / 64) {
                crate::prefetch::prefetch(word);
            }
        }
    }
}

/// Per-link click counters.
pub struct ClickCounters {
    keyed: DashMap<Box<str>, ClickCell, ahash::RandomState>,
    /// The dense counts of the snapshot lookups read; None before the first
    /// [`Self::follow`] and while the counts move to a new snapshot.
    dense: ArcSwapOption<DenseCounts>,
    /// While the counts move: the previous dense counts, which no redirect changes any more.
    retiring: ArcSwapOption<DenseCounts>,
    /// Held by whatever reads or moves every count (saves and [`Self::follow`]); the buffer
    /// of count lines on their way to a file, kept between saves.
    persisting: Mutex<Vec<u8>>,
    clicks_total: AtomicU64,
}

impl Default for ClickCounters {
    fn default() -> ClickCounters {
        ClickCounters {
            keyed: DashMap::with_hasher_and_shard_amount(ahash::RandomState::new(), COUNTER_SHARDS),
            dense: ArcSwapOption::empty(),
            retiring: ArcSwapOption::empty(),
            persisting: Mutex::new(Vec::new()),
            clicks_total: AtomicU64::new(0),
        }
    }
}

impl ClickCounters {
    /// Counts one redirect of `code` (found at `slot` of the snapshot, if it came from there)
    /// unless that would exceed `cap`; returns whether the click may be served. With a cap of N
    /// exactly N calls return true, however many race.
    pub fn record(
        &self,
        code: &str,
        slot: Option<SnapshotSlot>,
        cap: Option<u64>,
        now_s: i64,
    ) -> bool {
        let served = match cap {
            Some(cap) => self.record_capped(code, cap, now_s),
            None => {
                let dense = self.dense.load();
                let counted_dense = match (&*dense, slot) {
                    (Some(dense), Some(slot)) if dense.snapshot.id() == slot.snapshot_id => {
                        dense.count(slot.slot, now_s)
                    }
                    _ => false,
                };
                if !counted_dense {
                    self.record_keyed(code, now_s);
                }
                true
            }
        };
        if served {
            self.clicks_total.fetch_add(1, Ordering::Relaxed);
        }
        served
    }

    /// Memory hints for the clicks about to be recorded (a round of an event loop): one load of
    /// the dense counts for all of them.
    pub fn hints(&self) -> CountHints {
        CountHints(self.dense.load())
    }

    fn record_keyed(&self, code: &str, now_s: i64) {
        match self.keyed.get(code) {
            Some(cell) => count(&cell, None, now_s),
            None => count(&self.keyed.entry(code.into()).or_default(), None, now_s),
        };
    }

    /// A capped click counts in the keyed cell, against the cap less what the dense counts hold
    /// (clicks from before the link had a cap, or restored); those never change while it has
    /// one, as capped clicks never count there.
    fn record_capped(&self, code: &str, cap: u64, now_s: i64) -> bool {
        if cap == 0 {
            return false;
        }
        let cell = match self.keyed.get(code) {
            Some(cell) => cell,
            None => self.keyed.entry(code.into()).or_default().downgrade(),
        };
        // Marked before the dense part is read: from here on [`Self::follow`] leaves the cell
        // where it is.
        cell.capped.store(true, Ordering::SeqCst);
        let limit = cap.saturating_sub(self.dense_stats(code).clicks);
        count(&cell, Some(limit), now_s)
    }

    /// Whether `code` has reached `cap` (without counting a click).
    pub fn capped(&self, code: &str, cap: Option<u64>) -> bool {
        match cap {
            None => false,
            Some(cap) => self.stats(code).clicks >= cap,
        }
    }

    pub fn stats(&self, code: &str) -> ClickStats {
        self.keyed_stats(code).plus(self.dense_stats(code))
    }

    fn keyed_stats(&self, code: &str) -> ClickStats {
        self.keyed
            .get(code)
            .map_or_else(ClickStats::default, |cell| {
                stats_of(&cell.clicks, &cell.last_clicked_at_s)
            })
    }

    /// The dense part of `code`'s count, also while the counts move: [`Self::follow`] sets
    /// `retiring` before it clears `dense` and clears it after setting `dense` again, so of two
    /// rounds of looking at `dense`, then `retiring`, one finds them.
    fn dense_stats(&self, code: &str) -> ClickStats {
        for _ in 0..2 {
            if let Some(dense) = &*self.dense.load() {
                return dense.stats(code);
            }
            if let Some(retiring) = &*self.retiring.load() {
                return retiring.stats(code);
            }
        }
        ClickStats::default()
    }

    /// Redirects served since start-up, all links together.
    pub fn clicks_total(&self) -> u64 {
        self.clicks_total.load(Ordering::Relaxed)
    }

    /// Places counts by slot of `snapshot` (the one lookups now read): the first call sets up
    /// the dense counts; after the store swapped snapshots, moves every count to the new
    /// one's slots and folds the keyed map's uncapped entries in. Cheap when nothing changed:
    /// call it after every swap, or periodically. Blocking; off the async workers.
    pub fn follow(&self, snapshot: Arc<Snapshot>) {
        let _persisting = self.lock_persisting();
        let current = self.dense.load_full();
        if current
            .as_ref()
            .is_some_and(|dense| dense.snapshot.id() == snapshot.id())
        {
            return;
        }
        let fresh = Arc::new(DenseCounts::new(snapshot));
        let moved = current.is_some();
        if let Some(old) = current {
            self.retiring.store(Some(old.clone()));
            self.dense.store(None);
            // From here redirects count in the keyed map. Those that loaded `old` before hold
            // it (the swap turned their loads into references); wait for them to finish.
            let started = Instant::now();
            while Arc::strong_count(&old) > 2 && started.elapsed() < FOLLOW_WAIT_MAX {
                std::thread::sleep(Duration::from_micros(200));
            }
            self.move_dense(&old, &fresh);
        }
        self.dense.store(Some(fresh.clone()));
        self.retiring.store(None);
        self.fold_keyed(&fresh);
        if moved {
            // The old counts (8 bytes a slot of the old table) are gone: their memory goes back
            // to the OS now, not whenever the allocator next tidies this thread's heap.
            crate::allocator::release_freed_memory();
        }
    }

    /// Moves every count of `old` to its code's slot in `fresh`, or to the keyed map for a
    /// code `fresh` does not hold.
    fn move_dense(&self, old: &DenseCounts, fresh: &DenseCounts) {
        let mut pacer = Pacer::default();
        for (slot, cell) in old.cells.iter().enumerate() {
            if slot % (PACE_EVERY * 64) == 0 {
                pacer.pace();
            }
            let stats = cell.stats();
            if stats.clicks == 0 {
                continue;
            }
            let Some(code) = old.snapshot.code_at(slot) else {
                continue;
            };
            let changed = old.changed[slot / 64].load(Ordering::SeqCst) & (1 << (slot % 64)) != 0;
            let moved_to = fresh
                .slot_of(code)
                .filter(|new_slot| fresh.add(*new_slot, stats));
            match moved_to {
                Some(new_slot) => {
                    if changed {
                        fresh.mark_changed(new_slot);
                    }
                }
                None => {
                    let entry = self.keyed.entry(code.into()).or_default();
                    entry.clicks.fetch_add(stats.clicks, Ordering::SeqCst);
                    raise(
                        &entry.last_clicked_at_s,
                        stats.last_clicked_at_s.unwrap_or(0),
                    );
                    if !changed {
                        entry.saved_clicks.fetch_add(stats.clicks, Ordering::SeqCst);
                    }
                }
            }
        }
    }

    /// Moves the keyed map's uncapped entries of links in `dense`'s snapshot into it. Each is
    /// removed under its shard's write lock, so no click is counted in it meanwhile, and is
    /// added to the dense counts before that lock is released.
    fn fold_keyed(&self, dense: &DenseCounts) {
        let codes: Vec<Box<str>> = self
            .keyed
            .iter()
            .filter(|entry| !entry.capped.load(Ordering::SeqCst))
            .map(|entry| entry.key().clone())
            .collect();
        for code in codes {
            let Some(slot) = dense.slot_of(&code) else {
                continue;
            };
            self.keyed.remove_if(&code, |_, cell| {
                if cell.capped.load(Ordering::SeqCst) {
                    return false;
                }
                let stats = stats_of(&cell.clicks, &cell.last_clicked_at_s);
                if !dense.add(slot, stats) {
                    return false;
                }
                if stats.clicks != cell.saved_clicks.load(Ordering::SeqCst) {
                    dense.mark_changed(slot);
                }
                true
            });
        }
    }

    fn lock_persisting(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // The guarded state is the counters' own atomics: a panic while holding it leaves
        // nothing half-written.
        self.persisting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Restores the counts saved in `dir` (missing files add nothing) and returns how many
    /// links they named. Call it after the first [`Self::follow`], before redirects start,
    /// so that counts of the snapshot's links go to their slots. A damaged line (a write cut short by a crash) is skipped with a
    /// warning: counts are statistics, not a reason to refuse to start.
    pub fn restore(&self, dir: &Path) -> Result<u64, ClicksError> {
        let mut restored = self.restore_file(&dir.join(CLICKS_FILE))?;
        restored += self.restore_file(&dir.join(CLICK_CHANGES_FILE))?;
        Ok(restored)
    }

    /// Reads one counts file; a count only ever grows, so the larger of what the counters and
    /// the file say wins, whatever order the files were written in.
    fn restore_file(&self, path: &Path) -> Result<u64, ClicksError> {
        let read_error = |cause| ClicksError::Read {
            path: path.to_owned(),
            cause,
        };
        let file = match File::open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(error) => return Err(read_error(error)),
        };
        let mut restored = 0;
        let mut input = BufReader::new(file);
        let mut line = Vec::new();
        // Restoring runs before redirects start, so only this restore adds to the keyed map
        // once it was found empty; while it is, no line needs to look there.
        let mut keyed_may_hold = !self.keyed.is_empty();
        for index in 0.. {
            line.clear();
            if input.read_until(b'\n', &mut line).map_err(read_error)? == 0 {
                break;
            }
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            if line.is_empty() || line.starts_with(b"#") {
                continue;
            }
            let parsed = std::str::from_utf8(&line).ok().and_then(|line| {
                let mut fields = line.split('\t');
                let code = fields.next()?;
                let clicks = fields.next()?.parse::<u64>().ok()?;
                let last = fields.next()?.parse::<i64>().ok()?;
                (fields.next().is_none() && !code.is_empty()).then_some((code, clicks, last))
            });
            let Some((code, clicks, last_clicked_at_s)) = parsed else {
                tracing::warn!(
                    "{} line {}: not code<TAB>clicks<TAB>time; skipped",
                    path.display(),
                    index + 1
                );
                continue;
            };
            let dense = self.dense.load();
            let dense_cell = dense
                .as_ref()
                .and_then(|dense| dense.cells.get(dense.slot_of(code)?));
            // A count too large for its dense cell, and every later line of its code, goes to
            // the keyed map with what the cell held.
            let mut total = ClickStats {
                clicks,
                last_clicked_at_s: Some(last_clicked_at_s),
            };
            let dense_clicks = u32::try_from(clicks)
                .ok()
                .filter(|clicks| *clicks <= DENSE_CLICKS_MAX);
            match (dense_cell, dense_clicks) {
                (Some(cell), Some(clicks))
                    if !(keyed_may_hold && self.keyed.contains_key(code)) =>
                {
                    cell.clicks.fetch_max(clicks, Ordering::SeqCst);
                    cell.raise_last_clicked(last_clicked_at_s);
                }
                _ => {
                    if let Some(cell) = dense_cell {
                        let held = cell.take();
                        total.clicks = total.clicks.max(held.clicks);
                        total.last_clicked_at_s =
                            total.last_clicked_at_s.max(held.last_clicked_at_s);
                    }
                    keyed_may_hold = true;
                    let cell = self.keyed.entry(code.into()).or_default();
                    cell.clicks.fetch_max(total.clicks, Ordering::SeqCst);
                    cell.saved_clicks.fetch_max(total.clicks, Ordering::SeqCst);
                    raise(
                        &cell.last_clicked_at_s,
                        total.last_clicked_at_s.unwrap_or(0),
                    );
                }
            }
            restored += 1;
        }
        Ok(restored)
    }

    /// Writes every count to `dir/clicks.tsv` durably (temp file, fsync, rename), then empties
    /// the changes file, and returns how many lines it wrote. Blocking: call it off the async
    /// workers.
    pub fn save(&self, dir: &Path) -> Result<usize, ClicksError> {
        let mut text = self.lock_persisting();
        let path = dir.join(CLICKS_FILE);
        let mut saved = 0;
        crate::fsutil::write_durably_with(&path, |out| {
            let mut lines = LineSink::new(&mut text, out);
            lines.text.extend_from_slice(CLICKS_FILE_HEADER.as_bytes());
            lines.text.push(b'\n');
            if let Some(dense) = &*self.dense.load() {
                let keyed_empty = self.keyed.is_empty();
                for word in dense.changed.iter() {
                    word.store(0, Ordering::SeqCst);
                }
                let clicked = (0..dense.cells.len())
                    .filter(|slot| dense.cells[*slot].clicks.load(Ordering::SeqCst) != 0);
                saved += self.write_dense_lines(&mut lines, (dense, keyed_empty), clicked)?;
            }
            saved += self.write_keyed_lines(&mut lines, true)?;
            lines.flush()
        })
        .map_err(|cause| ClicksError::Write { path, cause })?;
        let changes = dir.join(CLICK_CHANGES_FILE);
        File::create(&changes)
            .and_then(|file| file.sync_all())
            .map_err(|cause| ClicksError::Write {
                path: changes,
                cause,
            })?;
        Ok(saved)
    }

    /// Appends the counts that changed since the last save to `dir/clicks-changes.tsv` and
    /// fsyncs it; returns how many lines it wrote and the changes file's size. After an error
    /// some changes may be marked saved without being on disk: follow it with [`Self::save`].
    pub fn save_changes(&self, dir: &Path) -> Result<SavedChanges, ClicksError> {
        let mut text = self.lock_persisting();
        let path = dir.join(CLICK_CHANGES_FILE);
        let write_error = |cause| ClicksError::Write {
            path: path.clone(),
            cause,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(write_error)?;
        let mut lines = LineSink::new(&mut text, &mut file);
        let mut links = 0;
        if let Some(dense) = &*self.dense.load() {
            let keyed_empty = self.keyed.is_empty();
            let changed = dense.changed.iter().enumerate().flat_map(|(index, word)| {
                let mut bits = if word.load(Ordering::SeqCst) == 0 {
                    0
                } else {
                    word.swap(0, Ordering::SeqCst)
                };
                std::iter::from_fn(move || {
                    let bit = (bits != 0).then(|| bits.trailing_zeros() as usize)?;
                    bits &= bits - 1;
                    Some(index * 64 + bit)
                })
            });
            links += self
                .write_dense_lines(&mut lines, (dense, keyed_empty), changed)
                .map_err(write_error)?;
        }
        links += self
            .write_keyed_lines(&mut lines, false)
            .map_err(write_error)?;
        lines.flush().map_err(write_error)?;
        if links > 0 {
            file.sync_data().map_err(write_error)?;
        }
        let file_bytes = file.metadata().map_err(write_error)?.len();
        Ok(SavedChanges { links, file_bytes })
    }

    /// Writes the totals of the links in `slots` of the dense counts that were ever clicked
    /// and returns how many (`keyed_empty`: the keyed map was empty when the save began, so it
    /// adds nothing; what a click adds to it meanwhile is written by
    /// [`Self::write_keyed_lines`]). Each code is a memory miss into the snapshot; they are
    /// prefetched a few slots ahead so that the misses overlap.
    fn write_dense_lines(
        &self,
        lines: &mut LineSink<'_>,
        (dense, keyed_empty): (&DenseCounts, bool),
        mut slots: impl Iterator<Item = usize>,
    ) -> io::Result<usize> {
        const PREFETCH_AHEAD: usize = 16;
        let mut ahead: VecDeque<usize> = slots
            .by_ref()
            .take(PREFETCH_AHEAD)
            .inspect(|slot| dense.snapshot.prefetch_record(*slot))
            .collect();
        let mut written = 0;
        let mut pacer = Pacer::default();
        let mut index = 0;
        while let Some(slot) = ahead.pop_front() {
            if let Some(next) = slots.next() {
                dense.snapshot.prefetch_record(next);
                ahead.push_back(next);
            }
            if index % PACE_EVERY == 0 {
                pacer.pace();
            }
            index += 1;
            let stats = dense.stats_at(slot);
            let Some(code) = dense.snapshot.code_at(slot).filter(|_| stats.clicks != 0) else {
                continue;
            };
            let keyed = if keyed_empty {
                ClickStats::default()
            } else {
                self.keyed_stats(code)
            };
            lines.push(code, stats.plus(keyed))?;
            written += 1;
        }
        Ok(written)
    }

    /// Writes the totals of the keyed map's links (`all`, or those that changed since their
    /// last save) and marks them saved; returns how many.
    fn write_keyed_lines(&self, lines: &mut LineSink<'_>, all: bool) -> io::Result<usize> {
        let mut written = 0;
        let mut pacer = Pacer::default();
        for (index, entry) in self.keyed.iter().enumerate() {
            if index % PACE_EVERY == 0 {
                pacer.pace();
            }
            let clicks = entry.clicks.load(Ordering::SeqCst);
            if !all && clicks == entry.saved_clicks.load(Ordering::SeqCst) {
                continue;
            }
            let keyed = stats_of(&entry.clicks, &entry.last_clicked_at_s);
            lines.push(entry.key(), keyed.plus(self.dense_stats(entry.key())))?;
            entry.saved_clicks.store(clicks, Ordering::SeqCst);
            written += 1;
        }
        Ok(written)
    }

    /// The size of `dir/clicks.tsv` (0 when there is none).
    pub fn saved_file_bytes(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(CLICKS_FILE)).map_or(0, |meta| meta.len())
    }
}

/// What [`ClickCounters::save_changes`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SavedChanges {
    pub links: usize,
    pub file_bytes: u64,
}

/// Bytes of count lines formatted before they go out to the file.
const LINES_CHUNK_BYTES: usize = 64 * 1024;

/// Count lines on their way to a file: formatted into the buffer kept between saves and
/// written out in chunks, so that a save of a million counts never holds them all.
struct LineSink<'a> {
    text: &'a mut Vec<u8>,
    out: &'a mut dyn Write,
}

impl<'a> LineSink<'a> {
    fn new(text: &'a mut Vec<u8>, out: &'a mut dyn Write) -> LineSink<'a> {
        text.clear();
        LineSink { text, out }
    }

    fn push(&mut self, code: &str, stats: ClickStats) -> io::Result<()> {
        write_line(self.text, code, stats);
        if self.text.len() >= LINES_CHUNK_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.write_all(self.text)?;
        self.text.clear();
        Ok(())
    }
}

/// Appends `code<TAB>clicks<TAB>last_clicked_at` and a newline.
fn write_line(text: &mut Vec<u8>, code: &str, stats: ClickStats) {
    text.extend_from_slice(code.as_bytes());
    text.push(b'\t');
    decimal::write_u64(text, stats.clicks);
    text.push(b'\t');
    decimal::write_i64(text, stats.last_clicked_at_s.unwrap_or(0));
    text.push(b'\n');
}

/// Counts a click in `cell` unless that would exceed `cap`; whether it did.
fn count(cell: &ClickCell, cap: Option<u64>, now_s: i64) -> bool {
    match cap {
        None => {
            cell.clicks.fetch_add(1, Ordering::SeqCst);
        }
        Some(cap) => {
            let claimed = cell
                .clicks
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |clicks| {
                    (clicks < cap).then_some(clicks + 1)
                });
            if claimed.is_err() {
                return false;
            }
        }
    }
    raise(&cell.last_clicked_at_s, now_s);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_cap_of_n_serves_exactly_n_under_contention() {
        let counters = Arc::new(ClickCounters::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let counters = counters.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .filter(|_| counters.record("abc", None, Some(777), 1))
                        .count()
                })
            })
            .collect();
        let served: usize = threads
            .into_iter()
            .map(|thread| thread.join().expect("thread"))
            .sum();
        assert_eq!(served, 777);
        assert_eq!(counters.stats("abc").clicks, 777);
        assert!(counters.capped("abc", Some(777)));
        assert_eq!(counters.clicks_total(), 777);
    }

    #[test]
    fn checkpoints_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(CLICKS_FILE);
        let counters = ClickCounters::default();
        assert_eq!(counters.restore(dir.path()).expect("missing files"), 0);
        counters.record("abc", None, None, 50);
        counters.record("abc", None, None, 60);
        counters.record("x-y_z", None, Some(5), 70);
        assert_eq!(counters.save(dir.path()).expect("save"), 2);
        let restored = ClickCounters::default();
        std::fs::write(
            &path,
            format!(
                "{}garbage line\n",
                std::fs::read_to_string(&path).expect("read")
            ),
        )
        .expect("append garbage");
        assert_eq!(restored.restore(dir.path()).expect("restore"), 2);
        assert_eq!(
            restored.stats("abc"),
            ClickStats {
                clicks: 2,
                last_clicked_at_s: Some(60)
            }
        );
        assert_eq!(restored.stats("x-y_z").clicks, 1);
    }

    #[test]
    fn changes_are_appended_and_win_over_an_older_full_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let counters = ClickCounters::default();
        counters.record("a", None, None, 10);
        counters.record("b", None, None, 10);
        counters.save(dir.path()).expect("save");
        let unchanged = counters.save_changes(dir.path()).expect("no changes");
        assert_eq!((unchanged.links, unchanged.file_bytes), (0, 0));
        counters.record("a", None, None, 20);
        counters.record("c", None, None, 30);
        let first = counters.save_changes(dir.path()).expect("changes");
        assert_eq!(first.links, 2);
        counters.record("a", None, None, 40);
        let second = counters.save_changes(dir.path()).expect("more changes");
        assert_eq!(second.links, 1);
        assert!(second.file_bytes > first.file_bytes);

        // As after a kill -9: only what the files say.
        let restored = ClickCounters::default();
        restored.restore(dir.path()).expect("restore");
        assert_eq!(
            restored.stats("a"),
            ClickStats {
                clicks: 3,
                last_clicked_at_s: Some(40)
            }
        );
        assert_eq!(restored.stats("b").clicks, 1);
        assert_eq!(restored.stats("c").clicks, 1);
        assert_eq!(
            restored
                .save_changes(dir.path())
                .expect("nothing new")
                .links,
            0
        );

        // A full save empties the changes file; the counts stay.
        restored.save(dir.path()).expect("save");
        assert_eq!(
            std::fs::metadata(dir.path().join(CLICK_CHANGES_FILE))
                .expect("changes file")
                .len(),
            0
        );
        let again = ClickCounters::default();
        again.restore(dir.path()).expect("restore");
        assert_eq!(again.stats("a").clicks, 3);
    }

    #[test]
    fn uncapped_links_count_every_click() {
        let counters = ClickCounters::default();
        assert_eq!(counters.stats("x"), ClickStats::default());
        assert!(counters.record("x", None, None, 10));
        assert!(counters.record("x", None, None, 12));
        assert_eq!(
            counters.stats("x"),
            ClickStats {
                clicks: 2,
                last_clicked_at_s: Some(12)
            }
        );
        assert!(!counters.record("y", None, Some(0), 1));
    }

    fn snapshot_of(dir: &Path, name: &str, codes: &[String]) -> Arc<Snapshot> {
        let mut builder = crate::store::snapshot::SnapshotBuilder::default();
        for code in codes {
            builder
                .add(crate::store::link::LinkView {
                    code,
                    long_url: crate::store::link::LongUrl::whole("https://example.com/"),
                    meta: crate::store::link::LinkMeta::new(1),
                })
                .expect("add");
        }
        let path = dir.join(name);
        builder.write(&path, 0).expect("write");
        Arc::new(Snapshot::open(&path).expect("open"))
    }

    /// Fresh counters placed on `snapshot` and restored from `dir`, as at start-up; with the
    /// number of saved links they read.
    fn restored_from(dir: &Path, snapshot: Arc<Snapshot>) -> (ClickCounters, u64) {
        let restored = ClickCounters::default();
        restored.follow(snapshot);
        let lines = restored.restore(dir).expect("restore");
        (restored, lines)
    }

    fn codes(count: usize) -> Vec<String> {
        (0..count).map(|i| format!("c{i}")).collect()
    }

    /// A click as the redirect path makes it: the slot from `snapshot`, if the code is there.
    fn click(counters: &ClickCounters, snapshot: &Snapshot, code: &str, cap: Option<u64>) -> bool {
        let slot = snapshot.lookup_slot(code).map(|(slot, _)| SnapshotSlot {
            snapshot_id: snapshot.id(),
            slot,
        });
        counters.record(code, slot, cap, 100)
    }

    #[test]
    fn dense_and_keyed_counts_add_up_and_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let snapshot = snapshot_of(dir.path(), "s1", &codes(3));
        let counters = ClickCounters::default();
        counters.follow(snapshot.clone());
        for _ in 0..3 {
            click(&counters, &snapshot, "c0", None);
        }
        click(&counters, &snapshot, "c1", None);
        // Not in the snapshot (a link in the overlay): the keyed map.
        click(&counters, &snapshot, "new", None);
        click(&counters, &snapshot, "new", None);
        assert_eq!(counters.keyed.len(), 1, "only the overlay link is keyed");
        assert_eq!(counters.stats("c0").clicks, 3);
        assert_eq!(counters.stats("c1").clicks, 1);
        assert_eq!(counters.stats("c2"), ClickStats::default());
        assert_eq!(counters.stats("new").clicks, 2);
        assert_eq!(counters.clicks_total(), 6);
        assert_eq!(counters.save(dir.path()).expect("save"), 3);

        let (restored, lines) = restored_from(dir.path(), snapshot.clone());
        assert_eq!(lines, 3);
        assert_eq!(
            restored.keyed.len(),
            1,
            "snapshot links restored to their slots"
        );
        for code in ["c0", "c1", "c2", "new"] {
            assert_eq!(restored.stats(code), counters.stats(code), "{code}");
        }
    }

    #[test]
    fn counts_past_what_a_dense_cell_holds_go_on_in_the_keyed_map() {
        let dir = tempfile::tempdir().expect("tempdir");
        let snapshot = snapshot_of(dir.path(), "s1", &codes(3));
        let nearly_full = u64::from(DENSE_CLICKS_MAX) - 1;
        let huge = 5_000_000_000u64;
        std::fs::write(
            dir.path().join(CLICKS_FILE),
            format!("c0\t{nearly_full}\t50\nc1\t7\t60\nc1\t{huge}\t70\nc1\t9\t80\n"),
        )
        .expect("write counts");
        let (counters, _) = restored_from(dir.path(), snapshot.clone());
        assert_eq!(counters.stats("c0").clicks, nearly_full);
        assert_eq!(
            counters.stats("c1"),
            ClickStats {
                clicks: huge,
                last_clicked_at_s: Some(80)
            },
            "a count too large for its cell, and the lines after it, are kept whole"
        );

        for _ in 0..3 {
            click(&counters, &snapshot, "c0", None);
        }
        click(&counters, &snapshot, "c1", None);
        click(&counters, &snapshot, "c2", None);
        assert_eq!(counters.stats("c0").clicks, nearly_full + 3);
        assert_eq!(counters.stats("c1").clicks, huge + 1);
        assert_eq!(counters.stats("c2").clicks, 1);
        assert!(counters.keyed.contains_key("c0"), "the full cell's clicks");
        assert!(!counters.keyed.contains_key("c2"));

        let moved = snapshot_of(dir.path(), "s2", &codes(3));
        counters.follow(moved.clone());
        click(&counters, &moved, "c0", None);
        assert_eq!(counters.stats("c0").clicks, nearly_full + 4);
        assert_eq!(counters.stats("c1").clicks, huge + 1);

        counters.save(dir.path()).expect("save");
        let (restored, _) = restored_from(dir.path(), moved);
        for code in ["c0", "c1", "c2"] {
            assert_eq!(restored.stats(code), counters.stats(code), "{code}");
        }
    }

    #[test]
    fn only_changed_dense_counts_are_appended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let snapshot = snapshot_of(dir.path(), "s1", &codes(200));
        let counters = ClickCounters::default();
        counters.follow(snapshot.clone());
        click(&counters, &snapshot, "c7", None);
        counters.save(dir.path()).expect("save");
        assert_eq!(counters.save_changes(dir.path()).expect("none").links, 0);
        click(&counters, &snapshot, "c150", None);
        click(&counters, &snapshot, "c7", None);
        assert_eq!(counters.save_changes(dir.path()).expect("two").links, 2);
        assert_eq!(
            counters.save_changes(dir.path()).expect("none again").links,
            0
        );

        let (restored, _) = restored_from(dir.path(), snapshot);
        assert_eq!(restored.stats("c7").clicks, 2);
        assert_eq!(restored.stats("c150").clicks, 1);
    }

    #[test]
    fn saves_of_many_chunks_write_every_count_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let all = codes(20_000);
        let snapshot = snapshot_of(dir.path(), "s1", &all);
        let counters = ClickCounters::default();
        counters.follow(snapshot.clone());
        for (index, code) in all.iter().enumerate() {
            for _ in 0..index % 7 + 1 {
                click(&counters, &snapshot, code, None);
            }
        }
        assert_eq!(counters.save(dir.path()).expect("save"), all.len());
        let saved = std::fs::read(dir.path().join(CLICKS_FILE)).expect("read");
        assert!(saved.len() > 3 * LINES_CHUNK_BYTES, "several chunks");
        assert_eq!(
            saved.iter().filter(|byte| **byte == b'\n').count(),
            all.len() + 1
        );
        for code in all.iter().step_by(3) {
            click(&counters, &snapshot, code, None);
        }
        let changes = counters.save_changes(dir.path()).expect("changes");
        assert_eq!(changes.links, all.len().div_ceil(3));
        assert!(changes.file_bytes > LINES_CHUNK_BYTES as u64);

        let (restored, _) = restored_from(dir.path(), snapshot);
        for code in &all {
            assert_eq!(restored.stats(code), counters.stats(code), "{code}");
        }
    }

    #[test]
    fn a_cap_counts_the_clicks_from_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let snapshot = snapshot_of(dir.path(), "s1", &codes(1));
        let counters = ClickCounters::default();
        counters.follow(snapshot.clone());
        for _ in 0..5 {
            assert!(click(&counters, &snapshot, "c0", None));
        }
        let served = (0..10)
            .filter(|_| click(&counters, &snapshot, "c0", Some(7)))
            .count();
        assert_eq!(served, 2);
        assert_eq!(counters.stats("c0").clicks, 7);
        assert!(counters.capped("c0", Some(7)));
    }

    #[test]
    fn counts_follow_the_store_to_a_new_snapshot_while_clicks_go_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = snapshot_of(dir.path(), "s1", &codes(1000));
        // Another table size, so every link sits in another slot; c999 is gone.
        let second = snapshot_of(
            dir.path(),
            "s2",
            &codes(999)
                .into_iter()
                .chain(codes(3000).into_iter().skip(1000))
                .collect::<Vec<_>>(),
        );
        let store = Arc::new(arc_swap::ArcSwap::new(first.clone()));
        let counters = Arc::new(ClickCounters::default());
        counters.follow(first.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let clickers: Vec<_> = (0..3u64)
            .map(|seed| {
                let (store, counters, stop) = (store.clone(), counters.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut served = vec![0u64; 1000];
                    let mut state = seed + 1;
                    while !stop.load(Ordering::Relaxed) {
                        state = state
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1);
                        let index = (state >> 33) as usize % 1000;
                        let code = format!("c{index}");
                        let snapshot = store.load();
                        if click(&counters, &snapshot, &code, None) {
                            served[index] += 1;
                        }
                    }
                    served
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        store.store(second.clone());
        std::thread::sleep(Duration::from_millis(20));
        counters.follow(second.clone());
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::Relaxed);
        let mut served = vec![0u64; 1000];
        for clicker in clickers {
            for (total, count) in served.iter_mut().zip(clicker.join().expect("clicker")) {
                *total += count;
            }
        }
        for (index, expected) in served.iter().enumerate() {
            let code = format!("c{index}");
            assert_eq!(counters.stats(&code).clicks, *expected, "{code}");
        }
        assert!(
            counters.keyed.len() < 1000,
            "clicks made while the counts moved were folded in"
        );

        // And all of it is saved and restored against the new snapshot.
        counters.save(dir.path()).expect("save");
        let (restored, _) = restored_from(dir.path(), second);
        for (index, expected) in served.iter().enumerate() {
            let code = format!("c{index}");
            assert_eq!(restored.stats(&code).clicks, *expected, "{code} restored");
        }
    }
}
