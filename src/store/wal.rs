//! The write-ahead log: segment files of length-prefixed, checksummed records with strictly
//! increasing sequence numbers, one writer thread that commits appends in groups, and replay.
//!
//! Owns the record and segment formats, the group-commit writer and its fsync policy, and the
//! scan that recovery and `kurz verify` share. Never decides what a record means: the writer
//! hands each durable record to a [`WalApply`] and replay hands it to a closure.
//!
//! Segment file `wal-<first seq, 20 digits>.log`:
//!
//! ```text
//! segment header, 32 bytes: magic "KURZWAL\0", version u32, reserved u32, first seq u64,
//!                           header crc32c u32 (over bytes 0..24), reserved u32
//! then records:             payload bytes u32, crc32c u32, seq u64, payload
//!                           (payload = kind u8 + rkyv archive; the crc covers the length,
//!                            the seq and the payload)
//! ```
//!
//! A segment is created complete (temp file, fsync, rename, fsync dir), so its header is never
//! torn; only the tail of the newest segment can be, and replay cuts it at the last good record.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rkyv::rancor;
use rkyv::util::AlignedVec;
use tokio::sync::oneshot;

use super::link::Link;
use crate::fsutil;

const SEGMENT_MAGIC: &[u8; 8] = b"KURZWAL\0";
const SEGMENT_VERSION: u32 = 1;
pub const SEGMENT_HEADER_BYTES: usize = 32;
const FRAME_HEADER_BYTES: usize = 16;
/// A record larger than this is corruption, not data (links are a few KiB at most).
const RECORD_PAYLOAD_BYTES_MAX: usize = 1 << 20;
/// The writer starts a new segment once the current one passes this size.
const SEGMENT_BYTES_TARGET: u64 = 64 << 20;
/// Most records one group commit takes; the rest wait for the next fsync.
const BATCH_RECORDS_MAX: usize = 8192;
/// Bound of the queue in front of the writer; appends wait (asynchronously) when it is full.
const QUEUE_RECORDS_MAX: usize = 65_536;
const KIND_PUT_LINK: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("WAL {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("WAL {path}: corrupt at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("WAL segments are not contiguous: {path} starts at seq {found}, expected {expected}")]
    Gap {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("the WAL writer stopped after an earlier failure ({0}); restart to recover")]
    Broken(String),
    #[error("the WAL writer has shut down")]
    Closed,
    #[error("record could not be encoded: {0}")]
    Encode(String),
}

/// When the writer calls fsync, and so when an append counts as durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Acknowledge only after the batch holding the record is fsynced (the default).
    Always,
    /// Acknowledge once written; fsync at most this long after the first unsynced write.
    Interval(Duration),
    /// Acknowledge once written; leave syncing to the kernel (and to rotation and shutdown).
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            _ => {
                let ms = text
                    .strip_prefix("interval=")
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .filter(|ms| *ms > 0)
                    .ok_or_else(|| {
                        format!("{text:?} is not an fsync policy: use always, never or interval=<ms> (ms > 0)")
                    })?;
                Ok(FsyncPolicy::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

/// Receives every record once it is durable under the policy (or once it has failed), on the
/// writer thread, before the appender is told. The store applies records to its overlay here,
/// so a snapshot that asks the writer for its last seq sees every record up to that seq.
pub trait WalApply: Send + 'static {
    fn durable(&self, seq: u64, link: Link);
    fn failed(&self, link: &Link);
}

/// Counters the writer keeps for metrics; read without locks.
#[derive(Default, Debug)]
pub struct WalStats {
    pub records_total: AtomicU64,
    pub batches_total: AtomicU64,
    pub fsyncs_total: AtomicU64,
    pub fsync_us_total: AtomicU64,
    pub fsync_us_last: AtomicU64,
    pub batch_records_last: AtomicU64,
    pub last_seq: AtomicU64,
    pub broken: AtomicBool,
}

pub fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("wal-{first_seq:020}.log"))
}

/// A segment file found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentFile {
    pub path: PathBuf,
    pub first_seq: u64,
}

/// The segments in `dir`, oldest first. A missing directory holds none.
pub fn list_segments(dir: &Path) -> Result<Vec<SegmentFile>, WalError> {
    let io_error = |source| WalError::Io {
        path: dir.to_owned(),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(io_error(error)),
    };
    let mut segments = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error)?;
        let name = entry.file_name();
        let first_seq = name
            .to_str()
            .and_then(|name| name.strip_prefix("wal-"))
            .and_then(|name| name.strip_suffix(".log"))
            .and_then(|digits| digits.parse::<u64>().ok());
        if let Some(first_seq) = first_seq {
            segments.push(SegmentFile {
                path: entry.path(),
                first_seq,
            });
        }
    }
    segments.sort_by_key(|segment| segment.first_seq);
    Ok(segments)
}

fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut header = [0u8; SEGMENT_HEADER_BYTES];
    header[0..8].copy_from_slice(SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32c::crc32c(&header[0..24]);
    header[24..28].copy_from_slice(&crc.to_le_bytes());
    header
}

fn decode_segment_header(bytes: &[u8]) -> Result<u64, String> {
    if bytes.len() < SEGMENT_HEADER_BYTES {
        return Err(format!(
            "file is {} bytes, shorter than a segment header",
            bytes.len()
        ));
    }
    if &bytes[0..8] != SEGMENT_MAGIC {
        return Err("not a kurz WAL segment (bad magic bytes)".into());
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != SEGMENT_VERSION {
        return Err(format!("segment version {version} is not supported"));
    }
    let stored = u32::from_le_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]);
    if stored != crc32c::crc32c(&bytes[0..24]) {
        return Err("segment header checksum mismatch".into());
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[16..24]);
    Ok(u64::from_le_bytes(seq))
}

fn frame_crc(len_bytes: &[u8], seq_and_payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(len_bytes), seq_and_payload)
}

/// Appends one framed record to `buf`.
fn encode_frame(buf: &mut Vec<u8>, seq: u64, link: &Link) -> Result<(), WalError> {
    let archived =
        rkyv::to_bytes::<rancor::Error>(link).map_err(|e| WalError::Encode(e.to_string()))?;
    let payload_len = 1 + archived.len();
    if payload_len > RECORD_PAYLOAD_BYTES_MAX {
        return Err(WalError::Encode(format!(
            "record is {payload_len} bytes, more than {RECORD_PAYLOAD_BYTES_MAX}"
        )));
    }
    let start = buf.len();
    buf.extend_from_slice(&(payload_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0u8; 4]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.push(KIND_PUT_LINK);
    buf.extend_from_slice(&archived);
    let crc = frame_crc(&buf[start..start + 4], &buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    debug_assert!(
        decode_frame(&buf[start..]).is_ok(),
        "a frame must read back as written"
    );
    Ok(())
}

/// One record read back from a segment, still as bytes.
struct Frame<'a> {
    seq: u64,
    kind: u8,
    body: &'a [u8],
    bytes: usize,
}

fn decode_frame(bytes: &[u8]) -> Result<Frame<'_>, String> {
    if bytes.len() < FRAME_HEADER_BYTES {
        return Err(format!("torn record header ({} bytes)", bytes.len()));
    }
    let payload_len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if payload_len == 0 || payload_len > RECORD_PAYLOAD_BYTES_MAX {
        return Err(format!("record length {payload_len} is out of range"));
    }
    let end = FRAME_HEADER_BYTES + payload_len;
    if bytes.len() < end {
        return Err(format!(
            "torn record: {} of {end} bytes present",
            bytes.len()
        ));
    }
    let stored = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if stored != frame_crc(&bytes[0..4], &bytes[8..end]) {
        return Err("record checksum mismatch".into());
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[8..16]);
    Ok(Frame {
        seq: u64::from_le_bytes(seq),
        kind: bytes[16],
        body: &bytes[17..end],
        bytes: end,
    })
}

fn decode_link(frame: &Frame<'_>, aligned: &mut AlignedVec) -> Result<Link, String> {
    if frame.kind != KIND_PUT_LINK {
        return Err(format!("unknown record kind {}", frame.kind));
    }
    aligned.clear();
    aligned.extend_from_slice(frame.body);
    rkyv::from_bytes::<Link, rancor::Error>(aligned).map_err(|e| format!("record body: {e}"))
}

/// What a scan of one segment found.
#[derive(Debug)]
pub struct SegmentScan {
    pub first_seq: u64,
    pub records: u64,
    /// Seq of the last good record, or `first_seq - 1` when there is none.
    pub last_seq: u64,
    /// Bytes up to the end of the last good record.
    pub valid_bytes: u64,
    pub file_bytes: u64,
    /// Where and why the scan stopped early.
    pub damage: Option<(u64, String)>,
}

/// Reads a segment and hands each good record with seq > `after_seq` to `apply`.
fn scan_segment(
    path: &Path,
    after_seq: u64,
    mut apply: impl FnMut(u64, Link),
) -> Result<SegmentScan, WalError> {
    let bytes = fs::read(path).map_err(|source| WalError::Io {
        path: path.to_owned(),
        source,
    })?;
    let first_seq = decode_segment_header(&bytes).map_err(|reason| WalError::Corrupt {
        path: path.to_owned(),
        offset: 0,
        reason,
    })?;
    let mut scan = SegmentScan {
        first_seq,
        records: 0,
        last_seq: first_seq.wrapping_sub(1),
        valid_bytes: SEGMENT_HEADER_BYTES as u64,
        file_bytes: bytes.len() as u64,
        damage: None,
    };
    let mut aligned = AlignedVec::new();
    let mut at = SEGMENT_HEADER_BYTES;
    while at < bytes.len() {
        let decoded = decode_frame(&bytes[at..]).and_then(|frame| {
            let expected = scan.last_seq.wrapping_add(1);
            if frame.seq != expected {
                return Err(format!(
                    "record seq {} where {expected} was expected",
                    frame.seq
                ));
            }
            let link = if frame.seq > after_seq {
                Some(decode_link(&frame, &mut aligned)?)
            } else {
                None
            };
            Ok((frame.seq, frame.bytes, link))
        });
        match decoded {
            Ok((seq, frame_bytes, link)) => {
                if let Some(link) = link {
                    apply(seq, link);
                }
                scan.records += 1;
                scan.last_seq = seq;
                at += frame_bytes;
                scan.valid_bytes = at as u64;
            }
            Err(reason) => {
                scan.damage = Some((at as u64, reason));
                break;
            }
        }
    }
    Ok(scan)
}

/// Checks one segment file without applying anything (`kurz verify`).
pub fn verify_segment(path: &Path) -> Result<SegmentScan, WalError> {
    scan_segment(path, u64::MAX, |_, _| {})
}

/// What replay did.
#[derive(Debug, Default)]
pub struct ReplayOutcome {
    /// Records applied (those newer than the snapshot).
    pub applied: u64,
    /// Seq of the last good record in the log, or `after_seq` if the log holds nothing newer.
    pub last_seq: u64,
    /// A torn or corrupt tail that was cut: file, offset, reason.
    pub cut: Option<(PathBuf, u64, String)>,
}

/// What replay does with a damaged tail of the newest segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DamagedTail {
    /// Truncate the file at the last good record (the owner of the data dir, at start-up).
    Cut,
    /// Stop reading there and leave the file alone (read-only readers).
    Skip,
}

/// Replays every record with seq > `after_seq`, oldest first. A damaged tail of the newest
/// segment is cut at the last good record (the file is truncated and synced); damage anywhere
/// else is an error, because records after it were acknowledged.
pub fn replay(
    dir: &Path,
    after_seq: u64,
    tail: DamagedTail,
    mut apply: impl FnMut(u64, Link),
) -> Result<ReplayOutcome, WalError> {
    let segments = list_segments(dir)?;
    let mut outcome = ReplayOutcome {
        last_seq: after_seq,
        ..ReplayOutcome::default()
    };
    let mut previous_last: Option<u64> = None;
    for (index, segment) in segments.iter().enumerate() {
        let is_newest = index + 1 == segments.len();
        let scan = scan_segment(&segment.path, after_seq, |seq, link| {
            outcome.applied += 1;
            apply(seq, link);
        })?;
        if let Some(previous_last) = previous_last {
            if scan.first_seq != previous_last + 1 {
                return Err(WalError::Gap {
                    path: segment.path.clone(),
                    expected: previous_last + 1,
                    found: scan.first_seq,
                });
            }
        } else if scan.first_seq > after_seq + 1 {
            return Err(WalError::Gap {
                path: segment.path.clone(),
                expected: after_seq + 1,
                found: scan.first_seq,
            });
        }
        if let Some((offset, reason)) = scan.damage {
            if !is_newest {
                return Err(WalError::Corrupt {
                    path: segment.path.clone(),
                    offset,
                    reason,
                });
            }
            if tail == DamagedTail::Cut {
                cut_tail(&segment.path, scan.valid_bytes)?;
            }
            outcome.cut = Some((segment.path.clone(), offset, reason));
        }
        previous_last = Some(scan.last_seq);
        outcome.last_seq = outcome.last_seq.max(scan.last_seq);
    }
    Ok(outcome)
}

fn cut_tail(path: &Path, valid_bytes: u64) -> Result<(), WalError> {
    let io_error = |source| WalError::Io {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_error)?;
    file.set_len(valid_bytes).map_err(io_error)?;
    file.sync_all().map_err(io_error)
}

/// Creates a complete, empty segment starting at `first_seq` (temp file, fsync, rename).
fn create_segment(dir: &Path, first_seq: u64) -> Result<(File, PathBuf), WalError> {
    let path = segment_path(dir, first_seq);
    let io_error = |source| WalError::Io {
        path: path.clone(),
        source,
    };
    fsutil::write_durably(&path, &encode_segment_header(first_seq)).map_err(io_error)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_error)?;
    file.seek(SeekFrom::End(0)).map_err(io_error)?;
    Ok((file, path))
}

enum Command {
    Append {
        link: Link,
        done: oneshot::Sender<Result<u64, WalError>>,
    },
    /// Close the current segment and start a new one; answers the last seq of the old ones.
    Rotate {
        done: oneshot::Sender<Result<u64, WalError>>,
    },
}

/// Handle to the writer thread. Dropping it (or [`WalWriter::shutdown`]) lets the thread drain
/// its queue, fsync and stop.
pub struct WalWriter {
    sender: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<WalStats>,
}

impl WalWriter {
    /// Starts the writer with a fresh segment whose first record will be `next_seq`.
    pub fn start(
        dir: &Path,
        next_seq: u64,
        policy: FsyncPolicy,
        apply: Box<dyn WalApply>,
    ) -> Result<WalWriter, WalError> {
        fs::create_dir_all(dir).map_err(|source| WalError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let (file, path) = create_segment(dir, next_seq)?;
        let stats = Arc::new(WalStats::default());
        stats.last_seq.store(next_seq - 1, Ordering::Relaxed);
        let (sender, receiver) = crossbeam_channel::bounded(QUEUE_RECORDS_MAX);
        let mut thread_state = WriterThread {
            dir: dir.to_owned(),
            file,
            path,
            segment_bytes: SEGMENT_HEADER_BYTES as u64,
            next_seq,
            policy,
            apply,
            stats: stats.clone(),
            unsynced_since: None,
            broken: None,
            buf: Vec::with_capacity(1 << 16),
        };
        let thread = std::thread::Builder::new()
            .name("kurz-wal".into())
            .spawn(move || thread_state.run(receiver))
            .map_err(|source| WalError::Io {
                path: dir.to_owned(),
                source,
            })?;
        Ok(WalWriter {
            sender: Some(sender),
            thread: Some(thread),
            stats,
        })
    }

    pub fn stats(&self) -> &Arc<WalStats> {
        &self.stats
    }

    fn send(&self, command: Command) -> Result<(), WalError> {
        let sender = self.sender.as_ref().ok_or(WalError::Closed)?;
        sender.send(command).map_err(|_| WalError::Closed)
    }

    /// Queues `link`; the receiver answers its seq once it is durable under the policy.
    pub fn append(&self, link: Link) -> oneshot::Receiver<Result<u64, WalError>> {
        let (done, receiver) = oneshot::channel();
        let sender = match self.sender.as_ref() {
            Some(sender) => sender,
            None => {
                let _ = done.send(Err(WalError::Closed));
                return receiver;
            }
        };
        if let Err(crossbeam_channel::SendError(Command::Append { done, .. })) =
            sender.send(Command::Append { link, done })
        {
            let _ = done.send(Err(WalError::Closed));
        }
        receiver
    }

    /// Starts a new segment; answers the last seq held by the older segments, all of which are
    /// durable and applied by then.
    pub fn rotate(&self) -> oneshot::Receiver<Result<u64, WalError>> {
        let (done, receiver) = oneshot::channel();
        if let Err(error) = self.send(Command::Rotate { done }) {
            let (done, receiver) = oneshot::channel();
            let _ = done.send(Err(error));
            return receiver;
        }
        receiver
    }

    /// Drains the queue, fsyncs and stops the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.sender = None;
        if let Some(thread) = self.thread.take() {
            // A panicked writer has nothing left to flush; its error reached every appender.
            let _ = thread.join();
        }
    }
}

impl Drop for WalWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

struct WriterThread {
    dir: PathBuf,
    file: File,
    path: PathBuf,
    segment_bytes: u64,
    next_seq: u64,
    policy: FsyncPolicy,
    apply: Box<dyn WalApply>,
    stats: Arc<WalStats>,
    /// When the oldest write not yet fsynced happened (interval and never policies).
    unsynced_since: Option<Instant>,
    /// Set after a write that could not be undone; every later append fails.
    broken: Option<String>,
    buf: Vec<u8>,
}

impl WriterThread {
    fn run(&mut self, receiver: Receiver<Command>) {
        let mut batch: Vec<Command> = Vec::with_capacity(BATCH_RECORDS_MAX);
        loop {
            let first = match (self.policy, self.unsynced_since) {
                (FsyncPolicy::Interval(interval), Some(since)) => {
                    match receiver.recv_timeout(interval.saturating_sub(since.elapsed())) {
                        Ok(command) => command,
                        Err(RecvTimeoutError::Timeout) => {
                            self.sync_now();
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                _ => match receiver.recv() {
                    Ok(command) => command,
                    Err(_) => break,
                },
            };
            batch.push(first);
            while batch.len() < BATCH_RECORDS_MAX {
                match receiver.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            self.process(&mut batch);
        }
        if self.unsynced_since.is_some() {
            self.sync_now();
        }
    }

    fn process(&mut self, batch: &mut Vec<Command>) {
        let mut appends = Vec::with_capacity(batch.len());
        for command in batch.drain(..) {
            match command {
                Command::Append { link, done } => appends.push((link, done)),
                Command::Rotate { done } => {
                    self.commit(std::mem::take(&mut appends));
                    let _ = done.send(self.rotate());
                }
            }
        }
        self.commit(appends);
        if self.segment_bytes >= SEGMENT_BYTES_TARGET && self.broken.is_none() {
            if let Err(error) = self.rotate() {
                tracing::error!("WAL rotation failed: {error}");
            }
        }
    }

    fn fail_all(
        &self,
        appends: Vec<(Link, oneshot::Sender<Result<u64, WalError>>)>,
        error: impl Fn() -> WalError,
    ) {
        for (link, done) in appends {
            self.apply.failed(&link);
            let _ = done.send(Err(error()));
        }
    }

    /// Writes one group of appends with one write and (policy `always`) one fsync.
    fn commit(&mut self, appends: Vec<(Link, oneshot::Sender<Result<u64, WalError>>)>) {
        if appends.is_empty() {
            return;
        }
        if let Some(reason) = &self.broken {
            let reason = reason.clone();
            return self.fail_all(appends, || WalError::Broken(reason.clone()));
        }
        self.buf.clear();
        let mut accepted = Vec::with_capacity(appends.len());
        let mut seq = self.next_seq;
        for (link, done) in appends {
            match encode_frame(&mut self.buf, seq, &link) {
                Ok(()) => {
                    accepted.push((seq, link, done));
                    seq += 1;
                }
                Err(error) => {
                    self.apply.failed(&link);
                    let _ = done.send(Err(error));
                }
            }
        }
        if accepted.is_empty() {
            return;
        }
        if let Err(source) = self.write_and_sync() {
            let message = source.to_string();
            self.undo_partial_write();
            let path = self.path.clone();
            let failed = accepted
                .into_iter()
                .map(|(_, link, done)| (link, done))
                .collect();
            return self.fail_all(failed, || WalError::Io {
                path: path.clone(),
                source: io::Error::new(source.kind(), message.clone()),
            });
        }
        self.next_seq = seq;
        self.segment_bytes += self.buf.len() as u64;
        self.stats
            .records_total
            .fetch_add(accepted.len() as u64, Ordering::Relaxed);
        self.stats.batches_total.fetch_add(1, Ordering::Relaxed);
        self.stats
            .batch_records_last
            .store(accepted.len() as u64, Ordering::Relaxed);
        debug_assert!(
            seq - 1 > self.stats.last_seq.load(Ordering::Relaxed),
            "seqs only grow"
        );
        self.stats.last_seq.store(seq - 1, Ordering::Relaxed);
        for (seq, link, done) in accepted {
            self.apply.durable(seq, link);
            let _ = done.send(Ok(seq));
        }
    }

    fn write_and_sync(&mut self) -> io::Result<()> {
        self.file.write_all(&self.buf)?;
        match self.policy {
            FsyncPolicy::Always => self.timed_sync(),
            FsyncPolicy::Interval(interval) => {
                let since = *self.unsynced_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= interval {
                    self.timed_sync()?;
                    self.unsynced_since = None;
                }
                Ok(())
            }
            FsyncPolicy::Never => {
                self.unsynced_since.get_or_insert_with(Instant::now);
                Ok(())
            }
        }
    }

    fn timed_sync(&mut self) -> io::Result<()> {
        let started = Instant::now();
        self.file.sync_data()?;
        let elapsed_us = started.elapsed().as_micros() as u64;
        self.stats.fsyncs_total.fetch_add(1, Ordering::Relaxed);
        self.stats
            .fsync_us_total
            .fetch_add(elapsed_us, Ordering::Relaxed);
        self.stats
            .fsync_us_last
            .store(elapsed_us, Ordering::Relaxed);
        Ok(())
    }

    fn sync_now(&mut self) {
        match self.timed_sync() {
            Ok(()) => self.unsynced_since = None,
            Err(error) => {
                // Records acknowledged under interval/never are not durable: stop taking more.
                tracing::error!("WAL {}: fsync failed: {error}", self.path.display());
                self.mark_broken(format!("fsync of {} failed: {error}", self.path.display()));
            }
        }
    }

    /// After a failed write, cut the segment back to its last committed byte so the next batch
    /// does not land after garbage; if even that fails, refuse all further appends.
    fn undo_partial_write(&mut self) {
        let undone = self.file.set_len(self.segment_bytes).and_then(|()| {
            self.file
                .seek(SeekFrom::Start(self.segment_bytes))
                .map(|_| ())
        });
        if let Err(error) = undone {
            self.mark_broken(format!(
                "could not cut {} back after a failed write: {error}",
                self.path.display()
            ));
        }
    }

    fn mark_broken(&mut self, reason: String) {
        self.stats.broken.store(true, Ordering::Relaxed);
        self.broken = Some(reason);
    }

    fn rotate(&mut self) -> Result<u64, WalError> {
        if let Some(reason) = &self.broken {
            return Err(WalError::Broken(reason.clone()));
        }
        self.file.sync_all().map_err(|source| WalError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.unsynced_since = None;
        let (file, path) = create_segment(&self.dir, self.next_seq)?;
        self.file = file;
        self.path = path;
        self.segment_bytes = SEGMENT_HEADER_BYTES as u64;
        Ok(self.next_seq - 1)
    }
}

/// Deletes every segment whose records all have seq <= `covered_seq` (they are in a snapshot).
/// The newest segment is always kept: the writer may be appending to it.
pub fn remove_covered_segments(dir: &Path, covered_seq: u64) -> Result<usize, WalError> {
    let segments = list_segments(dir)?;
    let mut removed = 0;
    for pair in segments.windows(2) {
        let (older, newer) = (&pair[0], &pair[1]);
        if newer.first_seq <= covered_seq + 1 {
            fs::remove_file(&older.path).map_err(|source| WalError::Io {
                path: older.path.clone(),
                source,
            })?;
            removed += 1;
        }
    }
    if removed > 0 {
        fsutil::sync_parent_dir(&segment_path(dir, 0)).map_err(|source| WalError::Io {
            path: dir.to_owned(),
            source,
        })?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::link::LinkMeta;
    use std::sync::Mutex;

    fn link(i: u64) -> Link {
        Link {
            code: format!("code{i}"),
            long_url: format!("https://example.com/{i}"),
            meta: LinkMeta::new(1_700_000_000 + i as i64),
        }
    }

    #[derive(Default)]
    struct Collected(Arc<Mutex<Vec<(u64, Link)>>>);

    impl WalApply for Collected {
        fn durable(&self, seq: u64, link: Link) {
            self.0.lock().expect("lock").push((seq, link));
        }
        fn failed(&self, _link: &Link) {}
    }

    fn write_links(dir: &Path, first_seq: u64, count: u64) -> Vec<(u64, Link)> {
        let applied = Arc::new(Mutex::new(Vec::new()));
        let writer = WalWriter::start(
            dir,
            first_seq,
            FsyncPolicy::Always,
            Box::new(Collected(applied.clone())),
        )
        .expect("start");
        let receivers: Vec<_> = (0..count).map(|i| writer.append(link(i))).collect();
        for (i, receiver) in receivers.into_iter().enumerate() {
            let seq = receiver.blocking_recv().expect("answer").expect("durable");
            assert_eq!(seq, first_seq + i as u64);
        }
        writer.shutdown();
        let applied = applied.lock().expect("lock").clone();
        applied
    }

    fn replay_all(dir: &Path, after: u64) -> (Vec<(u64, Link)>, ReplayOutcome) {
        let mut seen = Vec::new();
        let outcome = replay(dir, after, DamagedTail::Cut, |seq, link| {
            seen.push((seq, link))
        })
        .expect("replay");
        (seen, outcome)
    }

    #[test]
    fn append_then_replay_returns_every_record_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = write_links(dir.path(), 1, 500);
        assert_eq!(written.len(), 500);
        let (seen, outcome) = replay_all(dir.path(), 0);
        assert_eq!(seen, written);
        assert_eq!(outcome.last_seq, 500);
        assert!(outcome.cut.is_none());
        let (tail, _) = replay_all(dir.path(), 450);
        assert_eq!(tail.len(), 50);
        assert_eq!(tail[0].0, 451);
    }

    #[test]
    fn every_truncation_of_the_last_record_keeps_exactly_the_complete_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_links(dir.path(), 1, 3);
        let path = segment_path(dir.path(), 1);
        let full = fs::read(&path).expect("read");
        let scan = verify_segment(&path).expect("scan");
        assert_eq!(scan.records, 3);
        // Find where the last record starts by scanning two records.
        let mut at = SEGMENT_HEADER_BYTES;
        for _ in 0..2 {
            at += decode_frame(&full[at..]).expect("frame").bytes;
        }
        for cut in at..full.len() {
            fs::write(&path, &full[..cut]).expect("write");
            let (seen, outcome) = replay_all(dir.path(), 0);
            assert_eq!(seen.len(), 2, "cut at {cut}");
            assert_eq!(outcome.last_seq, 2);
            assert_eq!(outcome.cut.is_some(), cut > at, "cut at {cut}");
            assert_eq!(fs::metadata(&path).expect("meta").len(), at as u64);
        }
    }

    #[test]
    fn a_flipped_byte_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_links(dir.path(), 1, 3);
        let path = segment_path(dir.path(), 1);
        let full = fs::read(&path).expect("read");
        for offset in SEGMENT_HEADER_BYTES..full.len() {
            let mut bytes = full.clone();
            bytes[offset] ^= 0x01;
            fs::write(&path, &bytes).expect("write");
            let scan = verify_segment(&path).expect("scan");
            assert!(scan.damage.is_some(), "flip at {offset} went unnoticed");
            assert!(scan.records < 3);
        }
    }

    #[test]
    fn damage_before_the_newest_segment_is_an_error_not_a_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_links(dir.path(), 1, 3);
        write_links(dir.path(), 4, 3);
        let path = segment_path(dir.path(), 1);
        let mut bytes = fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        fs::write(&path, &bytes).expect("write");
        let error = replay(dir.path(), 0, DamagedTail::Cut, |_, _| {}).expect_err("refused");
        assert!(matches!(error, WalError::Corrupt { .. }), "{error}");
        assert!(error.to_string().contains("wal-00000000000000000001.log"));
    }

    #[test]
    fn a_gap_between_segments_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_links(dir.path(), 1, 3);
        write_links(dir.path(), 10, 3);
        let error = replay(dir.path(), 0, DamagedTail::Cut, |_, _| {}).expect_err("refused");
        assert!(
            matches!(
                error,
                WalError::Gap {
                    expected: 4,
                    found: 10,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn rotation_and_removal_of_covered_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let applied = Arc::new(Mutex::new(Vec::new()));
        let writer = WalWriter::start(
            dir.path(),
            1,
            FsyncPolicy::Always,
            Box::new(Collected(applied.clone())),
        )
        .expect("start");
        for i in 0..10 {
            writer
                .append(link(i))
                .blocking_recv()
                .expect("answer")
                .expect("durable");
        }
        let covered = writer
            .rotate()
            .blocking_recv()
            .expect("answer")
            .expect("rotated");
        assert_eq!(covered, 10);
        writer
            .append(link(10))
            .blocking_recv()
            .expect("answer")
            .expect("durable");
        writer.shutdown();
        assert_eq!(list_segments(dir.path()).expect("list").len(), 2);
        assert_eq!(
            remove_covered_segments(dir.path(), covered).expect("remove"),
            1
        );
        let (seen, outcome) = replay_all(dir.path(), covered);
        assert_eq!(seen.len(), 1);
        assert_eq!(outcome.last_seq, 11);
    }

    #[test]
    fn fsync_policy_parses() {
        assert_eq!("always".parse(), Ok(FsyncPolicy::Always));
        assert_eq!("never".parse(), Ok(FsyncPolicy::Never));
        assert_eq!(
            "interval=5".parse(),
            Ok(FsyncPolicy::Interval(Duration::from_millis(5)))
        );
        assert!("interval=0".parse::<FsyncPolicy>().is_err());
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
    }
}
