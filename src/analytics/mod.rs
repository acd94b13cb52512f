//! Click counting: an exact per-link count of redirects served and the time of the last one,
//! which also enforces `max_clicks`. Counts live in memory (a sharded map of atomics, no lock
//! shared by all workers). They reach the data dir in two files: every checkpoint interval
//! (default 1 s) the counts that changed are appended to `clicks-changes.tsv` and fsynced, so a
//! `kill -9` loses at most that interval; when the changes outgrow the full file, and at
//! shutdown, every count is written to `clicks.tsv` (temp file, fsync, rename) and the changes
//! file starts over. Never touches the store.

pub mod agent;
pub mod aggregate;
pub mod clicklog;
pub mod geo;
pub mod pipeline;
pub mod referrer;

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use dashmap::DashMap;

/// Every count, in the data dir.
pub const CLICKS_FILE: &str = "clicks.tsv";
/// Counts changed since `clicks.tsv` was written, appended, in the data dir.
pub const CLICK_CHANGES_FILE: &str = "clicks-changes.tsv";
const CLICKS_FILE_HEADER: &str =
    "# kurz click counts: code<TAB>clicks<TAB>last_clicked_at (unix s)";

#[derive(Debug, thiserror::Error)]
pub enum ClicksError {
    #[error("cannot read click counts {path}: {cause}")]
    Read { path: PathBuf, cause: io::Error },
    #[error("cannot write click counts {path}: {cause}")]
    Write { path: PathBuf, cause: io::Error },
}

/// One link's counters.
#[derive(Default, Debug)]
struct ClickCell {
    clicks: AtomicU64,
    /// The count the files in the data dir hold (written by the checkpoint thread only).
    saved_clicks: AtomicU64,
    /// Unix seconds; 0 = never.
    last_clicked_at_s: AtomicI64,
}

/// What the counters say about one link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClickStats {
    pub clicks: u64,
    pub last_clicked_at_s: Option<i64>,
}

/// Shards of the counter map. Many, so that a checkpoint, which reads one shard at a time under
/// its read lock, holds up a redirect that adds a newly clicked link for microseconds, not
/// milliseconds (at 1M clicked links a shard holds about 1,000).
const COUNTER_SHARDS: usize = 1024;

/// Per-link click counters, keyed by code.
pub struct ClickCounters {
    cells: DashMap<Box<str>, ClickCell, ahash::RandomState>,
    clicks_total: AtomicU64,
}

impl Default for ClickCounters {
    fn default() -> ClickCounters {
        ClickCounters {
            cells: DashMap::with_hasher_and_shard_amount(ahash::RandomState::new(), COUNTER_SHARDS),
            clicks_total: AtomicU64::new(0),
        }
    }
}

impl ClickCounters {
    /// Counts one redirect of `code` unless that would exceed `cap`; returns whether the click
    /// may be served. With a cap of N exactly N calls return true, however many race.
    pub fn record(&self, code: &str, cap: Option<u64>, now_s: i64) -> bool {
        if cap == Some(0) {
            return false;
        }
        let served = match self.cells.get(code) {
            Some(cell) => count(&cell, cap, now_s),
            None => count(&self.cells.entry(code.into()).or_default(), cap, now_s),
        };
        if served {
            self.clicks_total.fetch_add(1, Ordering::Relaxed);
        }
        served
    }

    /// Whether `code` has reached `cap` (without counting a click).
    pub fn capped(&self, code: &str, cap: Option<u64>) -> bool {
        match cap {
            None => false,
            Some(cap) => self.stats(code).clicks >= cap,
        }
    }

    pub fn stats(&self, code: &str) -> ClickStats {
        match self.cells.get(code) {
            None => ClickStats::default(),
            Some(cell) => {
                let last = cell.last_clicked_at_s.load(Ordering::Relaxed);
                ClickStats {
                    clicks: cell.clicks.load(Ordering::Relaxed),
                    last_clicked_at_s: (last != 0).then_some(last),
                }
            }
        }
    }

    /// Redirects served since start-up, all links together.
    pub fn clicks_total(&self) -> u64 {
        self.clicks_total.load(Ordering::Relaxed)
    }

    /// Restores the counts saved in `dir` (missing files add nothing) and returns how many
    /// links they named. A damaged line (a write cut short by a crash) is skipped with a
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
        for (index, line) in BufReader::new(file).split(b'\n').enumerate() {
            let line = line.map_err(read_error)?;
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
            let cell = self.cells.entry(code.into()).or_default();
            cell.clicks.fetch_max(clicks, Ordering::Relaxed);
            cell.saved_clicks.fetch_max(clicks, Ordering::Relaxed);
            cell.last_clicked_at_s
                .fetch_max(last_clicked_at_s, Ordering::Relaxed);
            restored += 1;
        }
        Ok(restored)
    }

    /// Writes every count to `dir/clicks.tsv` durably (temp file, fsync, rename), then empties
    /// the changes file, and returns how many links it wrote. Blocking: call it off the async
    /// workers.
    pub fn save(&self, dir: &Path) -> Result<usize, ClicksError> {
        let path = dir.join(CLICKS_FILE);
        let mut text = String::with_capacity(self.cells.len() * 32 + CLICKS_FILE_HEADER.len() + 1);
        text.push_str(CLICKS_FILE_HEADER);
        text.push('\n');
        let mut saved = 0;
        for entry in self.cells.iter() {
            let clicks = entry.clicks.load(Ordering::Relaxed);
            let last = entry.last_clicked_at_s.load(Ordering::Relaxed);
            let _ = writeln!(text, "{}\t{clicks}\t{last}", entry.key());
            entry.saved_clicks.store(clicks, Ordering::Relaxed);
            saved += 1;
        }
        crate::fsutil::write_durably(&path, text.as_bytes())
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
    /// fsyncs it; returns how many links changed and the changes file's size. After an error
    /// some changes may be marked saved without being on disk: follow it with [`Self::save`].
    pub fn save_changes(&self, dir: &Path) -> Result<SavedChanges, ClicksError> {
        let path = dir.join(CLICK_CHANGES_FILE);
        let mut text = String::new();
        let mut links = 0;
        for entry in self.cells.iter() {
            let clicks = entry.clicks.load(Ordering::Relaxed);
            if clicks == entry.saved_clicks.load(Ordering::Relaxed) {
                continue;
            }
            let last = entry.last_clicked_at_s.load(Ordering::Relaxed);
            let _ = writeln!(text, "{}\t{clicks}\t{last}", entry.key());
            entry.saved_clicks.store(clicks, Ordering::Relaxed);
            links += 1;
        }
        let write_error = |cause| ClicksError::Write {
            path: path.clone(),
            cause,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(write_error)?;
        if links > 0 {
            file.write_all(text.as_bytes())
                .and_then(|()| file.sync_data())
                .map_err(write_error)?;
        }
        let file_bytes = file.metadata().map_err(write_error)?.len();
        Ok(SavedChanges { links, file_bytes })
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

fn count(cell: &ClickCell, cap: Option<u64>, now_s: i64) -> bool {
    match cap {
        None => {
            cell.clicks.fetch_add(1, Ordering::Relaxed);
        }
        Some(cap) => {
            let claimed =
                cell.clicks
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |clicks| {
                        (clicks < cap).then_some(clicks + 1)
                    });
            if claimed.is_err() {
                return false;
            }
        }
    }
    cell.last_clicked_at_s.fetch_max(now_s, Ordering::Relaxed);
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
                        .filter(|_| counters.record("abc", Some(777), 1))
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
        counters.record("abc", None, 50);
        counters.record("abc", None, 60);
        counters.record("x-y_z", Some(5), 70);
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
        counters.record("a", None, 10);
        counters.record("b", None, 10);
        counters.save(dir.path()).expect("save");
        let unchanged = counters.save_changes(dir.path()).expect("no changes");
        assert_eq!((unchanged.links, unchanged.file_bytes), (0, 0));
        counters.record("a", None, 20);
        counters.record("c", None, 30);
        let first = counters.save_changes(dir.path()).expect("changes");
        assert_eq!(first.links, 2);
        counters.record("a", None, 40);
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
        assert!(counters.record("x", None, 10));
        assert!(counters.record("x", None, 12));
        assert_eq!(
            counters.stats("x"),
            ClickStats {
                clicks: 2,
                last_clicked_at_s: Some(12)
            }
        );
        assert!(!counters.record("y", Some(0), 1));
    }
}
