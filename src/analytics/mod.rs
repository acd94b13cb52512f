//! Click counting: an exact per-link count of redirects served and the time of the last one,
//! which also enforces `max_clicks`. Counts live in memory (a sharded map of atomics, no lock
//! shared by all workers); never touches the store or a file, so counts start from zero when the
//! server restarts.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use dashmap::DashMap;

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

/// Per-link click counters, keyed by code.
#[derive(Default)]
pub struct ClickCounters {
    cells: DashMap<Box<str>, ClickCell, ahash::RandomState>,
    clicks_total: AtomicU64,
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
