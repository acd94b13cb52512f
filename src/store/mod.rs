//! The store: every link, in an immutable memory-mapped snapshot plus an overlay of the writes
//! since, with a write-ahead log underneath. [`Store`] is the only door in.
//!
//! Owns the data directory (`snapshot.kurz`, `wal/`, `LOCK`), recovery, the write path
//! (reserve in the overlay → WAL group commit → commit in the overlay → answer) and the
//! snapshot cycle. Knows nothing of HTTP, JSON or the rules of what a valid link is.
//!
//! Invariants:
//! - A lookup takes no lock shared by all threads: an arc-swap load of the snapshot and at most
//!   one dashmap shard read lock.
//! - A write is visible to lookups only once the WAL writer says it is durable, and its caller
//!   hears back only after that (read-your-writes).
//! - Every WAL record with seq <= the snapshot's covered seq is in the snapshot; segments are
//!   deleted only after a snapshot covering them is durable.

pub mod link;
pub mod overlay;
pub mod snapshot;
pub mod snapshotter;
pub mod wal;

use std::fs::{self, File, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;

use link::{Link, LinkStatus, LinkView};
use overlay::{Overlay, ReserveError};
use snapshot::{AddError, Probe, Snapshot, SnapshotBuilder, SnapshotError, SnapshotHeader};
use wal::{FsyncPolicy, WalApply, WalError, WalStats, WalWriter};

pub const SNAPSHOT_FILE: &str = "snapshot.kurz";
pub const WAL_DIR: &str = "wal";
const LOCK_FILE: &str = "LOCK";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data dir {dir} is in use by another kurz process (lock file {dir}/{LOCK_FILE} is held); stop it or use another --data-dir")]
    Locked { dir: PathBuf },
    #[error("data dir {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("code {0:?} is taken")]
    CodeTaken(String),
    #[error("code {0:?} has no link")]
    NotFound(String),
    #[error("code {0:?} has another write in progress; retry")]
    Busy(String),
    #[error("snapshot build: {0}")]
    Build(#[from] AddError),
    #[error("the store was opened read-only (or follows a replicated log); write through the log")]
    ReadOnly,
    #[error("data dir {dir}: its local WAL holds {records} records newer than the snapshot; run `kurz snapshot --data-dir {dir}` in single-node mode before following a cluster")]
    LocalWalNotEmpty { dir: PathBuf, records: u64 },
    #[error("a snapshot is already being written")]
    SnapshotInProgress,
}

/// Memory hints for a stretch of lookups about to be made, pinned to the snapshot lookups read
/// when it was taken. Hints only: a snapshot swapped in meanwhile makes them useless, never
/// wrong, as every lookup reads the current snapshot itself. Hold it briefly (it keeps its
/// snapshot mapped).
pub struct LookupHints(arc_swap::Guard<Arc<Snapshot>>);

impl LookupHints {
    /// Starts loading, into the CPU's cache, the table slot where a lookup of `code` begins;
    /// with [`Self::prefetch_record`] once that is in, a loop over many requests overlaps their
    /// memory misses before it looks them up.
    pub fn prefetch_slot(&self, code: &[u8]) -> Probe {
        self.0.prefetch_slot(code)
    }

    /// Starts loading the record the probe leads to, and returns its slot.
    pub fn prefetch_record(&self, probe: Probe) -> Option<usize> {
        self.0.prefetch_probed_record(probe)
    }
}

/// Where a link found in the snapshot sits: its table slot in the snapshot with this id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotSlot {
    pub snapshot_id: u64,
    pub slot: usize,
}

/// How to open a store. Passed explicitly because it decides durability.
#[derive(Clone, Copy, Debug)]
pub struct StoreOptions {
    pub fsync: FsyncPolicy,
}

/// What a snapshot cycle did.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotReport {
    pub header: SnapshotHeader,
    pub links_from_overlay: usize,
    pub wal_segments_removed: usize,
    pub duration_ms: u64,
}

/// What recovery found when the store opened.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    pub snapshot_links: u64,
    pub wal_records_replayed: u64,
    pub last_seq: u64,
    pub cut: Option<(PathBuf, u64, String)>,
    pub duration_ms: u64,
}

/// State shared with the WAL writer thread, which commits durable writes into it.
struct Shared {
    snapshot: ArcSwap<Snapshot>,
    overlay: Overlay,
    /// Links that are not tombstones.
    live_links: AtomicI64,
}

fn is_live(link: Option<&LinkView<'_>>) -> bool {
    link.is_some_and(|link| link.meta.status != LinkStatus::Deleted)
}

impl Shared {
    fn apply(&self, seq: u64, link: Link) {
        let now_live = link.meta.status != LinkStatus::Deleted;
        let code = link.code.clone();
        let was_live = match self.overlay.commit(seq, link) {
            Some(previous) => previous.meta.status != LinkStatus::Deleted,
            None => is_live(self.snapshot.load().lookup(&code).as_ref()),
        };
        let delta = i64::from(now_live) - i64::from(was_live);
        if delta != 0 {
            self.live_links.fetch_add(delta, Ordering::Relaxed);
        }
    }
}

struct SharedApply(Arc<Shared>);

impl WalApply for SharedApply {
    fn durable(&self, seq: u64, link: Link) {
        self.0.apply(seq, link);
    }

    fn failed(&self, link: &Link) {
        self.0.overlay.roll_back(&link.code);
    }
}

pub struct Store {
    dir: PathBuf,
    shared: Arc<Shared>,
    /// None when opened read-only.
    wal: Option<WalWriter>,
    /// One snapshot cycle at a time.
    cycle: Mutex<()>,
    recovery: RecoveryReport,
    /// Held (and flock-ed) for as long as the store is open; None when read-only.
    _lock: Option<File>,
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn lock_data_dir(dir: &Path) -> Result<File, StoreError> {
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_error(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(TryLockError::WouldBlock) => Err(StoreError::Locked {
            dir: dir.to_owned(),
        }),
        Err(TryLockError::Error(source)) => Err(StoreError::Io {
            path: lock_path,
            source,
        }),
    }
}

/// Opens the snapshot in `dir`, writing an empty one first if the directory has none.
fn open_or_create_snapshot(dir: &Path) -> Result<Snapshot, StoreError> {
    let path = dir.join(SNAPSHOT_FILE);
    if !path.exists() {
        SnapshotBuilder::default().write(&path, 0)?;
    }
    Ok(Snapshot::open(&path)?)
}

impl Store {
    /// Opens (or creates) the store in `dir`: locks it, maps the snapshot, replays the WAL
    /// (cutting a torn tail), and starts the WAL writer.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        let lock = lock_data_dir(dir)?;
        let snapshot = open_or_create_snapshot(dir)?;
        Store::recover(dir, snapshot, Some((lock, options)))
    }

    /// Opens (or creates) the store in `dir` as a follower of a replicated log kept elsewhere
    /// (cluster mode): locked like a writer, but with no local WAL. Records arrive through
    /// [`Store::apply_replicated`] in log order, and snapshots are taken at a log position the
    /// caller names ([`Store::snapshot_covering`]). Refuses a data dir whose local WAL holds
    /// records the snapshot does not, because those would be lost.
    pub fn open_follower(dir: &Path) -> Result<Store, StoreError> {
        let lock = lock_data_dir(dir)?;
        let snapshot = open_or_create_snapshot(dir)?;
        let covered_seq = snapshot.header().covered_seq;
        let local = wal::replay(
            &dir.join(WAL_DIR),
            covered_seq,
            wal::DamagedTail::Skip,
            |_, _| {},
        )?;
        if local.applied > 0 {
            return Err(StoreError::LocalWalNotEmpty {
                dir: dir.to_owned(),
                records: local.applied,
            });
        }
        let mut store = Store::recover(dir, snapshot, None)?;
        store._lock = Some(lock);
        Ok(store)
    }

    /// Applies record `seq` of the replicated log (follower mode). Records must come in log
    /// order; a record is a link's whole new state, so applying one twice is harmless.
    pub fn apply_replicated(&self, seq: u64, link: Link) {
        self.shared.apply(seq, link);
    }

    /// Writes a snapshot covering log position `covered_seq` (follower mode): every record up to
    /// it must have been applied. Blocking.
    pub fn snapshot_covering(&self, covered_seq: u64) -> Result<SnapshotReport, StoreError> {
        let started = Instant::now();
        let _cycle = self
            .cycle
            .try_lock()
            .map_err(|_| StoreError::SnapshotInProgress)?;
        let (header, links_from_overlay) =
            self.write_and_swap(covered_seq, |_| Ok::<(), StoreError>(()))?;
        Ok(SnapshotReport {
            header,
            links_from_overlay,
            wal_segments_removed: 0,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Opens the store in `dir` for reading while another process may own it (export,
    /// inspect): no lock, no WAL writer, and a damaged WAL tail is skipped, not cut.
    pub fn open_read_only(dir: &Path) -> Result<Store, StoreError> {
        let snapshot = Snapshot::open(&dir.join(SNAPSHOT_FILE))?;
        Store::recover(dir, snapshot, None)
    }

    fn recover(
        dir: &Path,
        snapshot: Snapshot,
        writable: Option<(File, StoreOptions)>,
    ) -> Result<Store, StoreError> {
        let started = Instant::now();
        let covered_seq = snapshot.header().covered_seq;
        let snapshot_links = snapshot.header().link_count;
        let live_links = snapshot.live_count() as i64;
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            overlay: Overlay::default(),
            live_links: AtomicI64::new(live_links),
        });
        let wal_dir = dir.join(WAL_DIR);
        let tail = if writable.is_some() {
            wal::DamagedTail::Cut
        } else {
            wal::DamagedTail::Skip
        };
        let outcome = wal::replay(&wal_dir, covered_seq, tail, |seq, link| {
            shared.apply(seq, link)
        })?;
        if let Some((path, offset, reason)) = &outcome.cut {
            tracing::warn!(
                "WAL {}: damaged tail at byte {offset} ({reason}); every record before it was kept",
                path.display()
            );
        }
        let (lock, wal) = match writable {
            Some((lock, options)) => {
                let wal = WalWriter::start(
                    &wal_dir,
                    outcome.last_seq + 1,
                    options.fsync,
                    Box::new(SharedApply(shared.clone())),
                )?;
                (Some(lock), Some(wal))
            }
            None => (None, None),
        };
        let recovery = RecoveryReport {
            snapshot_links,
            wal_records_replayed: outcome.applied,
            last_seq: outcome.last_seq,
            cut: outcome.cut,
            duration_ms: started.elapsed().as_millis() as u64,
        };
        Ok(Store {
            dir: dir.to_owned(),
            shared,
            wal,
            cycle: Mutex::new(()),
            recovery,
            _lock: lock,
        })
    }

    fn writer(&self) -> Result<&WalWriter, StoreError> {
        self.wal.as_ref().ok_or(StoreError::ReadOnly)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Calls `f` with the link for `code`, if any, borrowed from the overlay or the mapped
    /// snapshot. The hot path: no allocation, no global lock, no I/O.
    pub fn lookup<R>(&self, code: &str, f: impl FnOnce(Option<LinkView<'_>>) -> R) -> R {
        self.lookup_placed(code, |link, _| f(link))
    }

    /// [`Self::lookup`], also saying where a link from the snapshot sits in it (None for a link
    /// from the overlay): per-link state elsewhere can live in an array by slot.
    pub fn lookup_placed<R>(
        &self,
        code: &str,
        f: impl FnOnce(Option<LinkView<'_>>, Option<SnapshotSlot>) -> R,
    ) -> R {
        if let Some(entry) = self.shared.overlay.get(code) {
            if let Some(link) = entry.visible() {
                return f(Some(link.view()), None);
            }
        }
        let snapshot = self.shared.snapshot.load();
        match snapshot.lookup_slot(code) {
            Some((slot, link)) => f(
                Some(link),
                Some(SnapshotSlot {
                    snapshot_id: snapshot.id(),
                    slot,
                }),
            ),
            None => f(None, None),
        }
    }

    /// Memory hints for the lookups about to be made (a round of an event loop): one load of the
    /// snapshot for all of them.
    pub fn lookup_hints(&self) -> LookupHints {
        LookupHints(self.shared.snapshot.load())
    }

    /// The snapshot lookups currently read.
    pub fn current_snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// An owned copy of the link for `code`.
    pub fn get(&self, code: &str) -> Option<Link> {
        self.lookup(code, |view| view.map(|view| view.to_link()))
    }

    /// Creates `link` if its code is free anywhere (overlay or snapshot, tombstones included).
    /// Returns the WAL seq once the record is durable and visible.
    pub async fn create(&self, link: Link) -> Result<u64, StoreError> {
        let reserved = self.shared.overlay.reserve_new(&link.code, || {
            self.shared.snapshot.load().lookup(&link.code).is_some()
        });
        match reserved {
            Ok(()) => self.append(link).await,
            Err(ReserveError::Taken) => Err(StoreError::CodeTaken(link.code)),
            Err(ReserveError::Busy) => Err(StoreError::Busy(link.code)),
        }
    }

    /// Replaces the link for `code` with what `change` makes of the current one. `change` may
    /// refuse with its own error, which comes back as `Ok(Err(..))` with nothing written.
    pub async fn update<E>(
        &self,
        code: &str,
        change: impl FnOnce(&Link) -> Result<Link, E>,
    ) -> Result<Result<Link, E>, StoreError> {
        enum Refusal<E> {
            NotFound,
            Change(E),
        }
        let reserved = self.shared.overlay.reserve_change(
            code,
            || {
                self.shared
                    .snapshot
                    .load()
                    .lookup(code)
                    .map(|view| view.to_link())
            },
            |current| match current {
                None => Err(Refusal::NotFound),
                Some(link) => change(link).map_err(Refusal::Change),
            },
        );
        match reserved {
            Err(ReserveError::Busy | ReserveError::Taken) => Err(StoreError::Busy(code.to_owned())),
            Ok(Err(Refusal::NotFound)) => Err(StoreError::NotFound(code.to_owned())),
            Ok(Err(Refusal::Change(refusal))) => Ok(Err(refusal)),
            Ok(Ok(link)) => {
                self.append(link.clone()).await?;
                Ok(Ok(link))
            }
        }
    }

    async fn append(&self, link: Link) -> Result<u64, StoreError> {
        let writer = match self.writer() {
            Ok(writer) => writer,
            Err(error) => {
                self.shared.overlay.roll_back(&link.code);
                return Err(error);
            }
        };
        match writer.append(link).await {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(WalError::Closed.into()),
        }
    }

    /// Links that are not tombstones.
    pub fn live_links(&self) -> u64 {
        self.shared.live_links.load(Ordering::Relaxed).max(0) as u64
    }

    pub fn overlay_len(&self) -> usize {
        self.shared.overlay.len()
    }

    pub fn snapshot_header(&self) -> SnapshotHeader {
        *self.shared.snapshot.load().header()
    }

    pub fn snapshot_file_bytes(&self) -> u64 {
        self.shared.snapshot.load().file_bytes()
    }

    /// The WAL writer's counters; None when read-only.
    pub fn wal_stats(&self) -> Option<&Arc<WalStats>> {
        self.wal.as_ref().map(WalWriter::stats)
    }

    /// Calls `f` on every link, tombstones included, overlay state winning over the snapshot.
    /// Writes made during the walk may or may not be seen.
    pub fn for_each_link(&self, mut f: impl FnMut(LinkView<'_>)) {
        let overlay_links = self.shared.overlay.committed_links();
        let overridden: ahash::HashSet<&str> = overlay_links
            .iter()
            .map(|(link, _)| link.code.as_str())
            .collect();
        for (link, _) in &overlay_links {
            f(link.view());
        }
        let snapshot = self.shared.snapshot.load();
        for view in snapshot.iter() {
            if !overridden.contains(view.code) {
                f(view);
            }
        }
    }

    /// Writes a new snapshot holding every durable link, swaps lookups to it without blocking
    /// them, drops the overlay entries it now holds, and deletes the WAL segments it covers.
    /// `add_more` may add further links to the builder (the importer does); its error aborts the
    /// cycle with nothing changed. Blocking: call it off the async runtime.
    pub fn snapshot_with<E: From<StoreError>>(
        &self,
        add_more: impl FnOnce(&mut SnapshotBuilder) -> Result<(), E>,
    ) -> Result<SnapshotReport, E> {
        let started = Instant::now();
        let _cycle = self
            .cycle
            .try_lock()
            .map_err(|_| E::from(StoreError::SnapshotInProgress))?;
        let covered_seq = match self.writer()?.rotate().blocking_recv() {
            Ok(Ok(seq)) => seq,
            Ok(Err(error)) => return Err(StoreError::from(error).into()),
            Err(_) => return Err(StoreError::from(WalError::Closed).into()),
        };
        let (header, links_from_overlay) = self.write_and_swap(covered_seq, add_more)?;
        let removed = wal::remove_covered_segments(&self.dir.join(WAL_DIR), covered_seq)
            .map_err(StoreError::from)?;
        Ok(SnapshotReport {
            header,
            links_from_overlay,
            wal_segments_removed: removed,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Merges the snapshot and the overlay (plus whatever `add_more` adds) into a new snapshot
    /// file covering `covered_seq`, swaps lookups to it and forgets the overlay entries it now
    /// holds. Returns the new header and how many overlay links went in.
    fn write_and_swap<E: From<StoreError>>(
        &self,
        covered_seq: u64,
        add_more: impl FnOnce(&mut SnapshotBuilder) -> Result<(), E>,
    ) -> Result<(SnapshotHeader, usize), E> {
        let old = self.shared.snapshot.load_full();
        let overlay_links = self.shared.overlay.committed_links();
        let overlay_text_bytes: usize = overlay_links
            .iter()
            .map(|(link, _)| SnapshotBuilder::record_bytes_max(&link.view()))
            .sum();
        let mut builder = SnapshotBuilder::with_capacity(
            old.header().link_count as usize + overlay_links.len(),
            old.text_bytes() + overlay_text_bytes,
        );
        for (link, _) in &overlay_links {
            builder.add(link.view()).map_err(StoreError::from)?;
        }
        // Often on a background thread beside the redirect workers: paced.
        let mut pacer = crate::threads::Pacer::default();
        for (index, view) in old.iter().enumerate() {
            if index % 1024 == 0 {
                pacer.pace();
            }
            if !builder.contains(view.code) {
                builder.add(view).map_err(StoreError::from)?;
            }
        }
        let live_before = builder.live_count();
        add_more(&mut builder)?;
        let live_added = builder.live_count() - live_before;
        let path = self.dir.join(SNAPSHOT_FILE);
        let header = builder
            .write(&path, covered_seq)
            .map_err(StoreError::from)?;
        // The builder is gone: its memory goes back before the file it wrote is mapped and
        // read, or the process holds both (2.07 GB instead of 1.16 GB importing 10M links).
        crate::allocator::release_freed_memory();
        let fresh = Snapshot::open(&path).map_err(StoreError::from)?;
        self.shared.snapshot.store(Arc::new(fresh));
        self.shared
            .live_links
            .fetch_add(live_added as i64, Ordering::Relaxed);
        for (link, seq) in &overlay_links {
            self.shared.overlay.forget_if_committed_at(&link.code, *seq);
        }
        self.shared.overlay.rebuild_filter();
        Ok((header, overlay_links.len()))
    }

    /// [`Store::snapshot_with`] with nothing added.
    pub fn snapshot(&self) -> Result<SnapshotReport, StoreError> {
        self.snapshot_with(|_| Ok::<(), StoreError>(()))
    }

    /// Re-reads `snapshot.kurz`, which an operator has replaced (by rename) with a snapshot from
    /// this data dir's history, and swaps lookups to it. The overlay stays on top.
    pub fn reload(&self) -> Result<SnapshotHeader, StoreError> {
        let _cycle = self
            .cycle
            .try_lock()
            .map_err(|_| StoreError::SnapshotInProgress)?;
        let fresh = Snapshot::open(&self.dir.join(SNAPSHOT_FILE))?;
        let header = *fresh.header();
        self.shared.snapshot.store(Arc::new(fresh));
        Ok(header)
    }

    /// Stops the WAL writer after it has written and synced everything queued.
    pub fn close(self) {
        if let Some(wal) = self.wal {
            wal.shutdown();
        }
    }
}
