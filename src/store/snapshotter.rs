//! The snapshot policy of a running server: a background thread that starts a snapshot cycle
//! once enough has been written since the last one, or once the last one is old enough and
//! anything has been written since. Without it the WAL and the overlay (heap memory) would grow
//! for as long as the server runs. Owns only the decision of when; the cycle is the store's.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Store;

/// How often the policy looks at the store.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// When to snapshot. Both limits apply; whichever is reached first starts a cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// WAL records written since the snapshot.
    pub wal_records_max: u64,
    /// Age of the snapshot, once at least one record has been written since.
    pub age_max: Duration,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        SnapshotPolicy {
            wal_records_max: 1_000_000,
            age_max: Duration::from_secs(3600),
        }
    }
}

impl SnapshotPolicy {
    /// Whether a cycle is due, given the records and time since the last snapshot.
    pub fn due(&self, records_since: u64, age: Duration) -> bool {
        records_since >= self.wal_records_max || (records_since > 0 && age >= self.age_max)
    }
}

/// The running policy thread; dropping it stops the thread (a cycle in progress finishes).
pub struct Snapshotter {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Snapshotter {
    /// Starts the policy thread on the store that `store_of` finds in `owner` (the store itself,
    /// or the server's state that holds it once open). The thread holds `owner` until dropped.
    pub fn start<T: Send + Sync + 'static>(
        owner: Arc<T>,
        store_of: fn(&T) -> Option<&Store>,
        policy: SnapshotPolicy,
    ) -> std::io::Result<Snapshotter> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = crate::threads::spawn_background("kurz-snapshotter", move || {
            if let Some(store) = store_of(&owner) {
                run(store, policy, &stopped);
            }
        })?;
        Ok(Snapshotter {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        self.stop = None;
        if let Some(thread) = self.thread.take() {
            // A panicked policy thread has nothing to clean up; the store is unaffected.
            let _ = thread.join();
        }
    }
}

fn run(store: &Store, policy: SnapshotPolicy, stopped: &mpsc::Receiver<()>) {
    let mut last_cycle = Instant::now();
    loop {
        match stopped.recv_timeout(CHECK_INTERVAL) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(stats) = store.wal_stats() else {
            return;
        };
        let written = stats.last_seq.load(std::sync::atomic::Ordering::Relaxed);
        let records_since = written.saturating_sub(store.snapshot_header().covered_seq);
        if !policy.due(records_since, last_cycle.elapsed()) {
            continue;
        }
        match store.snapshot() {
            Ok(report) => {
                last_cycle = Instant::now();
                tracing::info!(
                    "snapshot written in {} ms: {} links, covers WAL seq {}",
                    report.duration_ms,
                    report.header.link_count,
                    report.header.covered_seq
                );
            }
            // Retry at the next check; a full disk or a concurrent admin cycle is transient.
            Err(error) => tracing::error!("automatic snapshot failed: {error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::link::{Link, LinkMeta};
    use crate::store::wal::FsyncPolicy;
    use crate::store::StoreOptions;

    #[test]
    fn policy_decisions() {
        let policy = SnapshotPolicy {
            wal_records_max: 10,
            age_max: Duration::from_secs(60),
        };
        assert!(!policy.due(0, Duration::from_secs(3600)), "nothing written");
        assert!(!policy.due(9, Duration::from_secs(59)));
        assert!(policy.due(10, Duration::ZERO));
        assert!(policy.due(1, Duration::from_secs(60)));
    }

    #[test]
    fn a_busy_store_gets_snapshotted_in_the_background() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(
            Store::open(
                dir.path(),
                StoreOptions {
                    fsync: FsyncPolicy::Never,
                },
            )
            .expect("open"),
        );
        let snapshotter = Snapshotter::start(
            store.clone(),
            |store| Some(store),
            SnapshotPolicy {
                wal_records_max: 100,
                age_max: Duration::from_secs(3600),
            },
        )
        .expect("start");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        for i in 0..150 {
            let link = Link {
                code: format!("s{i}"),
                long_url: format!("https://example.com/{i}"),
                meta: LinkMeta::new(1_700_000_000),
            };
            runtime.block_on(store.create(link)).expect("create");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while store.snapshot_header().covered_seq < 100 {
            assert!(Instant::now() < deadline, "no snapshot within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(snapshotter);
        assert_eq!(store.live_links(), 150);
        assert!(
            store.overlay_len() < 150,
            "the snapshot took over the overlay"
        );
    }
}
