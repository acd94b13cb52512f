//! Click counting: an exact per-link count of redirects served and the time of the last one,
//! which also enforces `max_clicks`. Counts live in memory (a sharded map of atomics, no lock
//! shared by all workers) and are checkpointed to `<data-dir>/clicks.tsv` (temp file, fsync,
//! rename) by the server every few seconds and at shutdown, so a restart keeps them; a `kill -9`
//! loses the clicks since the last checkpoint. Never touches the store.

pub mod agent;
pub mod aggregate;
pub mod clicklog;
pub mod geo;
pub mod pipeline;
pub mod referrer;

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use dashmap::DashMap;

/// The checkpoint file in the data dir.
pub const CLICKS_FILE: &str = "clicks.tsv";
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

    /// Adds the counts of a checkpoint file to these counters (a missing file adds nothing) and
    /// returns how many links it named. A damaged line is skipped with a warning: counts are
    /// statistics, not a reason to refuse to start.
    pub fn restore(&self, path: &Path) -> Result<u64, ClicksError> {
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
        for (index, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(read_error)?;
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split('\t');
            let parsed = (|| {
                let code = fields.next()?;
                let clicks = fields.next()?.parse::<u64>().ok()?;
                let last = fields.next()?.parse::<i64>().ok()?;
                (fields.next().is_none() && !code.is_empty()).then_some((code, clicks, last))
            })();
            let Some((code, clicks, last_clicked_at_s)) = parsed else {
                tracing::warn!(
                    "{} line {}: not code<TAB>clicks<TAB>time; skipped",
                    path.display(),
                    index + 1
                );
                continue;
            };
            let cell = self.cells.entry(code.into()).or_default();
            cell.clicks.fetch_add(clicks, Ordering::Relaxed);
            cell.last_clicked_at_s
                .fetch_max(last_clicked_at_s, Ordering::Relaxed);
            restored += 1;
        }
        Ok(restored)
    }

    /// Writes every counter to `path` durably (temp file, fsync, rename) and returns how many.
    /// Blocking: call it off the async workers.
    pub fn save(&self, path: &Path) -> Result<usize, ClicksError> {
        let mut text = String::with_capacity(self.cells.len() * 32 + CLICKS_FILE_HEADER.len() + 1);
        text.push_str(CLICKS_FILE_HEADER);
        text.push('\n');
        let mut saved = 0;
        for entry in self.cells.iter() {
            let _ = writeln!(
                text,
                "{}\t{}\t{}",
                entry.key(),
                entry.clicks.load(Ordering::Relaxed),
                entry.last_clicked_at_s.load(Ordering::Relaxed)
            );
            saved += 1;
        }
        crate::fsutil::write_durably(path, text.as_bytes()).map_err(|cause| {
            ClicksError::Write {
                path: path.to_owned(),
                cause,
            }
        })?;
        Ok(saved)
    }
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
        assert_eq!(counters.restore(&path).expect("missing file"), 0);
        counters.record("abc", None, 50);
        counters.record("abc", None, 60);
        counters.record("x-y_z", Some(5), 70);
        assert_eq!(counters.save(&path).expect("save"), 2);
        let restored = ClickCounters::default();
        std::fs::write(
            &path,
            format!(
                "{}garbage line\n",
                std::fs::read_to_string(&path).expect("read")
            ),
        )
        .expect("append garbage");
        assert_eq!(restored.restore(&path).expect("restore"), 2);
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
