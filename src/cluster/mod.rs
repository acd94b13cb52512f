//! Cluster mode: many kurz nodes kept in sync through a NATS JetStream stream, which is the
//! cluster's write log (replicated, ordered, quorum-durable) and, with one message kept per
//! subject, a compacted table of every link's current state. [`ClusterNode`] is the only door in.
//!
//! Owns the NATS connection, the link stream's layout (`<prefix>.<shard>.<code>`, one subject per
//! link), the write path (publish with compare-and-set on the subject's last sequence → JetStream
//! ack → wait until this node has applied it → answer), the follower task that applies the stream
//! to the store in order, and snapshot upload and download through a JetStream object store.
//! Must never write a link into the store except as a record of the stream, and never implements
//! replication or consensus of its own: ordering, durability and the one-winner-per-code rule all
//! come from JetStream.
//!
//! Invariants:
//! - Records are applied in stream order; `applied_seq` only grows, and every record of this
//!   node's shards with a stream sequence at or below it has been applied.
//! - A write is answered only after JetStream acknowledged it (stored on a quorum) and this node
//!   applied it (read-your-writes on the node that took the write).
//! - A code is created at most once cluster-wide: a create publishes with an expected last
//!   subject sequence of 0, and JetStream refuses it once the subject holds a record. Deleted
//!   links stay in the stream as tombstones, so a code is never handed out again.
//! - A snapshot covering stream sequence S holds every record up to S (it may hold newer ones:
//!   records are whole states, so replaying them from S + 1 is harmless).

pub mod clicks;
pub mod datadir;
pub mod record;
pub mod shard;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::header::{NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID};
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::object_store::{self, ObjectStore};
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind, StorageType};
use async_nats::HeaderMap;
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::links::validate;
use crate::store::link::{Link, LinkStatus};
use crate::store::{Store, StoreError, SNAPSHOT_FILE};
use datadir::{DataDirError, DirState, Marker};
use record::RecordError;
use shard::ShardSet;

pub const STREAM_NAME_DEFAULT: &str = "KURZ_LINKS";
pub const SUBJECT_PREFIX_DEFAULT: &str = "kurz.links";
pub const SNAPSHOT_BUCKET_DEFAULT: &str = "kurz-snapshots";
pub const REPLICAS_DEFAULT: usize = 3;
/// A node further behind than this many records of its shards is not ready.
pub const READY_LAG_RECORDS_MAX_DEFAULT: u64 = 1_000;
/// How long a write waits for this node to apply its own acknowledged record. Covers a NATS
/// server failover (a new stream leader, the follower's consumer recreated), which takes
/// seconds.
pub const APPLY_WAIT_MS_DEFAULT: u64 = 10_000;
/// Timeout of one JetStream API request or publish acknowledgement. Short, so that a request
/// lost in a failover is retried soon rather than waited on.
const JETSTREAM_REQUEST_TIMEOUT_MS: u64 = 2_000;
/// How long a publish keeps retrying (with the same message id, so JetStream drops duplicates)
/// after a lost acknowledgement or while the stream has no leader: a JetStream leader election
/// after a server loss takes a few seconds.
const PUBLISH_RETRY_WINDOW_MS: u64 = 20_000;
const PUBLISH_RETRY_MS: u64 = 250;
/// Read-modify-write rounds an update makes while other nodes keep changing the same link.
const UPDATE_ATTEMPTS_MAX: u32 = 8;
/// The follower's pull requests expire after this long, and the server sends heartbeats at half
/// of it: a consumer lost with its NATS server is noticed (and recreated from the last applied
/// record) within about two of these, at the cost of one pull request per period when idle.
const FOLLOW_PULL_EXPIRES_MS: u64 = 1_000;
/// When no record has arrived for this long, the follower asks the stream whether it is behind,
/// and re-subscribes if it still is at the next check: a consumer can go silent without an error
/// across a NATS server failover. Costs one request per period on an idle node.
const FOLLOW_STALL_CHECK_MS: u64 = 1_000;
/// Pause before the follower re-subscribes after losing its consumer.
const FOLLOW_RETRY_MS: u64 = 250;
const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Tries at fetching the newest snapshot, which a concurrent upload may replace mid-download.
const DOWNLOAD_ATTEMPTS_MAX: u32 = 3;
/// The "latest" pointer object holds one object name.
const POINTER_BYTES_MAX: u64 = 1_024;

/// How to run a cluster node. Passed explicitly: replicas and the shard layout decide
/// durability and what the node holds.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// NATS servers to connect to (any subset of the cluster; the client learns the rest).
    pub nats_urls: Vec<String>,
    pub data_dir: PathBuf,
    /// The JetStream stream holding the link records.
    pub stream_name: String,
    /// Subjects are `<subject_prefix>.<shard>.<code>`.
    pub subject_prefix: String,
    /// JetStream replicas of the stream and the snapshot bucket (3 in a 3-server NATS cluster).
    pub replicas: usize,
    /// How many shards the code space is cut into (the same on every node of a cluster).
    pub shards: u32,
    /// The shards this node holds; empty means all of them.
    pub shard_set: Vec<u32>,
    pub ready_lag_records_max: u64,
    pub apply_wait_ms: u64,
    /// The JetStream object store bucket holding snapshots.
    pub snapshot_bucket: String,
}

impl ClusterOptions {
    /// Defaults for everything but where to connect and where to keep data.
    pub fn new(nats_urls: Vec<String>, data_dir: PathBuf) -> ClusterOptions {
        ClusterOptions {
            nats_urls,
            data_dir,
            stream_name: STREAM_NAME_DEFAULT.to_owned(),
            subject_prefix: SUBJECT_PREFIX_DEFAULT.to_owned(),
            replicas: REPLICAS_DEFAULT,
            shards: 1,
            shard_set: Vec::new(),
            ready_lag_records_max: READY_LAG_RECORDS_MAX_DEFAULT,
            apply_wait_ms: APPLY_WAIT_MS_DEFAULT,
            snapshot_bucket: SNAPSHOT_BUCKET_DEFAULT.to_owned(),
        }
    }

    fn shard_set(&self) -> Result<ShardSet, ClusterError> {
        let set = if self.shard_set.is_empty() {
            ShardSet::of(self.shards, &(0..self.shards).collect::<Vec<_>>())
        } else {
            ShardSet::of(self.shards, &self.shard_set)
        };
        set.ok_or_else(|| {
            ClusterError::Options(format!(
                "shards {} with shard set {:?}: shards must be 1..={} and the set must name shards below it",
                self.shards,
                self.shard_set,
                shard::SHARDS_MAX
            ))
        })
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster options: {0}")]
    Options(String),
    #[error("cannot connect to NATS at {urls}: {source}; check --nats and that the servers run")]
    Connect {
        urls: String,
        source: async_nats::ConnectError,
    },
    #[error("NATS: {action}: {source}")]
    Nats {
        action: &'static str,
        source: BoxError,
    },
    #[error("stream {stream} exists with {what}; kurz needs one message per subject and subjects {subjects}: fix or delete the stream")]
    StreamMisconfigured {
        stream: String,
        what: String,
        subjects: String,
    },
    #[error("data dir {dir} holds a snapshot covering record {covered_seq}, but stream {stream} ends at {stream_last_seq}: the stream was deleted and made anew; use an empty --data-dir (and delete the old snapshots from the bucket)")]
    AheadOfStream {
        dir: PathBuf,
        covered_seq: u64,
        stream: String,
        stream_last_seq: u64,
    },
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("snapshot file {path}: {source}")]
    SnapshotFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0:?} is not a valid code")]
    InvalidCode(String),
    #[error("code {code:?} is in shard {shard}, which this node does not hold (it holds {held:?} of {shards}); send the write to a node of that shard")]
    WrongShard {
        code: String,
        shard: u32,
        held: Vec<u32>,
        shards: u32,
    },
    #[error("code {0:?} is taken")]
    CodeTaken(String),
    #[error("code {0:?} has no link")]
    NotFound(String),
    #[error("code {code:?} kept changing under {attempts} attempts to update it; retry")]
    Conflict { code: String, attempts: u32 },
    #[error("record {seq} is acknowledged by JetStream but this node had applied only up to {applied_seq} after {waited_ms} ms; the write is durable, the node is lagging")]
    ApplyTimeout {
        seq: u64,
        applied_seq: u64,
        waited_ms: u64,
    },
    #[error("stream record {seq} on {subject}: {reason}; the follower stopped there")]
    Record {
        seq: u64,
        subject: String,
        reason: String,
    },
    #[error("a blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn nats<E: std::error::Error + Send + Sync + 'static>(
    action: &'static str,
) -> impl FnOnce(E) -> ClusterError {
    move |source| ClusterError::Nats {
        action,
        source: Box::new(source),
    }
}

/// What a snapshot upload did.
#[derive(Clone, Debug)]
pub struct SnapshotUpload {
    pub covered_seq: u64,
    pub object_name: String,
    pub link_count: u64,
    pub file_bytes: u64,
    pub snapshot_ms: u64,
    pub upload_ms: u64,
}

/// How a node's data came to be when it started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// The data dir already followed this stream; the stream is replayed from its snapshot.
    Resumed { covered_seq: u64 },
    /// A fresh dir got the cluster's newest snapshot from the object store.
    Downloaded {
        object_name: String,
        covered_seq: u64,
        file_bytes: u64,
        download_ms: u64,
    },
    /// A fresh dir with no snapshot in the cluster: the whole stream is replayed.
    Empty,
}

/// Whether a node should get traffic ([`ClusterNode::readiness`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Within the lag bound when it last heard from the stream, but not following it now (NATS
    /// unreachable, or a failover in progress): lookups answer from what was applied; writes
    /// fail.
    Disconnected,
    /// The follower has not subscribed to the stream yet.
    Starting,
    Lagging {
        lag_records: u64,
        lag_records_max: u64,
    },
    /// The follower stopped for good at a record it cannot decode.
    Failed(String),
}

impl Readiness {
    /// Whether a load balancer should send this node traffic.
    pub fn serves(&self) -> bool {
        matches!(self, Readiness::Ready | Readiness::Disconnected)
    }
}

/// State the follower task shares with the node.
struct Shared {
    store: Store,
    /// The highest stream sequence applied; waiters watch it.
    applied: watch::Sender<u64>,
    /// Records of this node's shards in the stream but not applied, as JetStream last counted.
    lag_records: AtomicU64,
    /// Whether the follower has a live consumer.
    following: AtomicBool,
    /// Why the follower stopped for good, if it did.
    failed: Mutex<Option<String>>,
    /// Raised by a write whose acknowledged record is slow to arrive: the follower then
    /// re-subscribes, because that record certainly exists. Only a follower waiting on a
    /// consumer older than one stall-check period acts on it; raised while the follower is
    /// subscribing, it is dropped (`notify_waiters` stores no permit), so a late nudge never
    /// throws away the fresh consumer that would deliver the record.
    resubscribe: tokio::sync::Notify,
}

/// Object names in the snapshot bucket, kept apart per stream and shard layout.
struct SnapshotNames {
    prefix: String,
}

impl SnapshotNames {
    fn new(marker: &Marker) -> SnapshotNames {
        SnapshotNames {
            prefix: format!("{}.{}", marker.stream, marker.layout),
        }
    }

    fn latest(&self) -> String {
        format!("{}.latest", self.prefix)
    }

    fn snapshot(&self, covered_seq: u64) -> String {
        format!("{}.snapshot.{covered_seq:020}", self.prefix)
    }
}

/// One kurz node of a cluster: follows the link stream into its store and writes through it.
pub struct ClusterNode {
    shared: Arc<Shared>,
    jetstream: async_nats::jetstream::Context,
    stream: stream::Stream,
    options: ClusterOptions,
    shard_set: ShardSet,
    names: SnapshotNames,
    bootstrap: Bootstrap,
    follower: JoinHandle<()>,
    snapshot_cycle: tokio::sync::Mutex<()>,
    /// Changes on every NATS (re)connection; other followers of this connection watch it too.
    connections: watch::Receiver<u64>,
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

enum PublishRefused {
    /// The subject's last sequence was not the expected one.
    WrongLastSequence,
    Failed(ClusterError),
}

impl ClusterNode {
    /// Connects to NATS, opens (or creates) the link stream, prepares the data dir (installing
    /// the cluster's newest snapshot into a fresh one), opens the store as a follower and starts
    /// following the stream from just after what the store's snapshot covers.
    pub async fn start(options: ClusterOptions) -> Result<ClusterNode, ClusterError> {
        let shard_set = options.shard_set()?;
        if options.replicas == 0 {
            return Err(ClusterError::Options("replicas must be at least 1".into()));
        }
        let (client, connections_seen) = connect(&options.nats_urls).await?;
        let filter_subjects_supported = supports_filter_subjects(&client.server_info().version);
        let mut jetstream = async_nats::jetstream::new(client);
        jetstream.set_timeout(Duration::from_millis(JETSTREAM_REQUEST_TIMEOUT_MS));
        let stream = open_stream(&jetstream, &options).await?;
        let marker = Marker {
            stream: options.stream_name.clone(),
            layout: shard_set.layout_name(),
        };
        let names = SnapshotNames::new(&marker);
        let bootstrap = match datadir::check(&options.data_dir, &marker)? {
            DirState::Following => None,
            DirState::Fresh => Some(download_newest_snapshot(&jetstream, &options, &names).await?),
        };
        datadir::mark(&options.data_dir, &marker)?;
        let dir = options.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || Store::open_follower(&dir)).await??;
        let covered_seq = store.snapshot_header().covered_seq;
        let stream_last_seq = stream
            .get_info()
            .await
            .map_err(nats("read the link stream's state"))?
            .state
            .last_sequence;
        if covered_seq > stream_last_seq {
            return Err(ClusterError::AheadOfStream {
                dir: options.data_dir.clone(),
                covered_seq,
                stream: options.stream_name.clone(),
                stream_last_seq,
            });
        }
        let bootstrap = bootstrap.unwrap_or(Bootstrap::Resumed { covered_seq });
        let shared = Arc::new(Shared {
            store,
            applied: watch::Sender::new(covered_seq),
            lag_records: AtomicU64::new(u64::MAX),
            following: AtomicBool::new(false),
            failed: Mutex::new(None),
            resubscribe: tokio::sync::Notify::new(),
        });
        let follower = tokio::spawn(follow(
            shared.clone(),
            stream.clone(),
            Follow {
                prefix: options.subject_prefix.clone(),
                shard_set: shard_set.clone(),
                filter_subjects_supported,
                connections: connections_seen.clone(),
            },
        ));
        Ok(ClusterNode {
            shared,
            jetstream,
            stream,
            options,
            shard_set,
            names,
            bootstrap,
            follower,
            snapshot_cycle: tokio::sync::Mutex::new(()),
            connections: connections_seen,
        })
    }

    /// The store this node follows into: lookups go straight to it.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    pub fn bootstrap(&self) -> &Bootstrap {
        &self.bootstrap
    }

    pub fn shard_set(&self) -> &ShardSet {
        &self.shard_set
    }

    /// Whether this node holds (and takes writes for) `code`.
    pub fn holds_code(&self, code: &str) -> bool {
        self.shard_set.holds_code(code)
    }

    /// The highest stream sequence this node has applied.
    pub fn applied_seq(&self) -> u64 {
        *self.shared.applied.borrow()
    }

    /// Records of this node's shards that the stream holds and this node has not applied, as
    /// JetStream last counted them (when the follower subscribed, then with every record
    /// delivered). `u64::MAX` until the follower first subscribes.
    pub fn lag_records(&self) -> u64 {
        self.shared.lag_records.load(Ordering::Relaxed)
    }

    /// Why the follower stopped for good (a record it cannot decode), if it did.
    pub fn follower_error(&self) -> Option<String> {
        self.shared
            .failed
            .lock()
            .map(|failed| failed.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Whether this node should get traffic, and if not, why. Unlike [`ClusterNode::ready`], a
    /// node that was caught up and then lost its consumer (NATS unreachable, a failover) stays
    /// ready: it serves what it has applied, which beats every node of a cluster whose NATS is
    /// down answering 503.
    pub fn readiness(&self) -> Readiness {
        if let Some(reason) = self.follower_error() {
            return Readiness::Failed(reason);
        }
        let lag_records = self.lag_records();
        if lag_records == u64::MAX {
            return Readiness::Starting;
        }
        if lag_records > self.options.ready_lag_records_max {
            return Readiness::Lagging {
                lag_records,
                lag_records_max: self.options.ready_lag_records_max,
            };
        }
        if self.following() {
            Readiness::Ready
        } else {
            Readiness::Disconnected
        }
    }

    /// Whether the follower has a consumer on the link stream and the NATS connection is up
    /// right now (a consumer can outlive its connection without an error for a while).
    pub fn following(&self) -> bool {
        self.shared.following.load(Ordering::Relaxed)
            && matches!(
                self.jetstream.client().connection_state(),
                async_nats::connection::State::Connected
            )
    }

    /// Following the stream, and at most `ready_lag_records_max` records behind.
    pub fn ready(&self) -> bool {
        self.following()
            && self.lag_records() <= self.options.ready_lag_records_max
            && self.follower_error().is_none()
    }

    /// The stream's last sequence (all shards), asked of JetStream.
    pub async fn stream_last_seq(&self) -> Result<u64, ClusterError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(nats("read the link stream's state"))?;
        Ok(info.state.last_sequence)
    }

    /// Creates `link` unless its code exists anywhere in the cluster (tombstones included).
    /// Returns the record's stream sequence once JetStream has it on a quorum and this node has
    /// applied it.
    pub async fn create(&self, link: Link) -> Result<u64, ClusterError> {
        let subject = self.subject_for(&link.code)?;
        match self.publish(&subject, 0, record::encode(&link)).await {
            Ok(seq) => {
                self.wait_applied(seq).await?;
                Ok(seq)
            }
            Err(PublishRefused::WrongLastSequence) => Err(ClusterError::CodeTaken(link.code)),
            Err(PublishRefused::Failed(error)) => Err(error),
        }
    }

    /// Replaces the link for `code` with what `change` makes of its current state in the stream
    /// (tombstones included: `change` decides what a deleted link may become). Compare-and-set on
    /// the subject's last sequence: when another node wrote meanwhile, `change` runs again on the
    /// newer state. `change` may refuse with its own error, which comes back as `Ok(Err(..))` with
    /// nothing written. `change` must keep the code.
    pub async fn update<E>(
        &self,
        code: &str,
        mut change: impl FnMut(&Link) -> Result<Link, E>,
    ) -> Result<Result<Link, E>, ClusterError> {
        let subject = self.subject_for(code)?;
        for _ in 0..UPDATE_ATTEMPTS_MAX {
            let (current_seq, current) = self.current(&subject, code).await?;
            let changed = match change(&current) {
                Ok(changed) => changed,
                Err(refusal) => return Ok(Err(refusal)),
            };
            assert_eq!(changed.code, code, "an update must keep the code");
            match self
                .publish(&subject, current_seq, record::encode(&changed))
                .await
            {
                Ok(seq) => {
                    self.wait_applied(seq).await?;
                    return Ok(Ok(changed));
                }
                Err(PublishRefused::WrongLastSequence) => continue,
                Err(PublishRefused::Failed(error)) => return Err(error),
            }
        }
        Err(ClusterError::Conflict {
            code: code.to_owned(),
            attempts: UPDATE_ATTEMPTS_MAX,
        })
    }

    /// Turns the link for `code` into a tombstone at `now_s`: it answers 410 from then on and its
    /// code is never handed out again. Returns the tombstone.
    pub async fn delete(&self, code: &str, now_s: i64) -> Result<Link, ClusterError> {
        let deleted = self
            .update(code, |current| {
                let mut link = current.clone();
                link.meta.status = LinkStatus::Deleted;
                link.meta.updated_at_s = now_s;
                Ok::<Link, Infallible>(link)
            })
            .await?;
        match deleted {
            Ok(link) => Ok(link),
            Err(never) => match never {},
        }
    }

    /// Writes a snapshot covering everything applied so far and uploads it to the snapshot
    /// bucket as the newest one for this stream and shard layout (replacing the previous one),
    /// so a fresh node can start from it.
    pub async fn snapshot_and_upload(&self) -> Result<SnapshotUpload, ClusterError> {
        let _cycle = self.snapshot_cycle.lock().await;
        let covered_seq = self.applied_seq();
        let started = Instant::now();
        let shared = self.shared.clone();
        let report =
            tokio::task::spawn_blocking(move || shared.store.snapshot_covering(covered_seq))
                .await??;
        let snapshot_ms = started.elapsed().as_millis() as u64;

        let started = Instant::now();
        let bucket = self.snapshot_bucket().await?;
        let path = self.options.data_dir.join(SNAPSHOT_FILE);
        let mut file =
            tokio::fs::File::open(&path)
                .await
                .map_err(|source| ClusterError::SnapshotFile {
                    path: path.clone(),
                    source,
                })?;
        let object_name = self.names.snapshot(covered_seq);
        let info = bucket
            .put(object_name.as_str(), &mut file)
            .await
            .map_err(nats("upload the snapshot"))?;
        let previous = read_pointer(&bucket, &self.names.latest()).await?;
        bucket
            .put(self.names.latest().as_str(), &mut object_name.as_bytes())
            .await
            .map_err(nats("point to the newest snapshot"))?;
        if let Some(previous) = previous.filter(|previous| *previous != object_name) {
            // The pointer no longer names it; a failed delete only leaves a stale object behind.
            if let Err(error) = bucket.delete(&previous).await {
                tracing::warn!(
                    "snapshot bucket: could not delete the replaced {previous}: {error}"
                );
            }
        }
        Ok(SnapshotUpload {
            covered_seq,
            object_name,
            link_count: report.header.link_count,
            file_bytes: info.size as u64,
            snapshot_ms,
            upload_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Stops following and releases the data dir.
    pub async fn shutdown(mut self) {
        self.follower.abort();
        // The follower ends aborted; its outcome carries nothing to report.
        let _ = (&mut self.follower).await;
    }

    fn subject_for(&self, code: &str) -> Result<String, ClusterError> {
        if !validate::is_code(code) {
            return Err(ClusterError::InvalidCode(code.to_owned()));
        }
        let shard = shard::shard_of(code, self.shard_set.shards());
        if !self.shard_set.holds(shard) {
            return Err(ClusterError::WrongShard {
                code: code.to_owned(),
                shard,
                held: self.shard_set.held(),
                shards: self.shard_set.shards(),
            });
        }
        Ok(shard::subject(&self.options.subject_prefix, shard, code))
    }

    /// The stream's current record for `code` and its sequence, asked of the stream leader.
    async fn current(&self, subject: &str, code: &str) -> Result<(u64, Link), ClusterError> {
        let message = match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => message,
            Err(error) if matches!(error.kind(), LastRawMessageErrorKind::NoMessageFound) => {
                return Err(ClusterError::NotFound(code.to_owned()))
            }
            Err(error) => return Err(nats("read a link's current record")(error)),
        };
        let link = record::decode(&message.payload).map_err(|error| ClusterError::Record {
            seq: message.sequence,
            subject: subject.to_owned(),
            reason: error.to_string(),
        })?;
        Ok((message.sequence, link))
    }

    /// Publishes `payload` to `subject` if the subject's last sequence is `expected_last_seq`
    /// (0: the subject is empty), waits for JetStream's acknowledgement and returns the record's
    /// stream sequence. Lost acknowledgements and leaderless moments are retried under one
    /// message id, so a record that did land is not written twice; and a retry refused because
    /// the subject moved on checks whether it moved on by this very record.
    async fn publish(
        &self,
        subject: &str,
        expected_last_seq: u64,
        payload: Vec<u8>,
    ) -> Result<u64, PublishRefused> {
        let message_id = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let payload = bytes::Bytes::from(payload);
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut headers = HeaderMap::new();
            headers.insert(
                NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                expected_last_seq.to_string().as_str(),
            );
            headers.insert(NATS_MESSAGE_ID, message_id.as_str());
            let acked = async {
                self.jetstream
                    .publish_with_headers(subject.to_owned(), headers, payload.clone())
                    .await?
                    .await
            }
            .await;
            let error = match acked {
                Ok(ack) => return Ok(ack.sequence),
                Err(error) => error,
            };
            match error.kind() {
                PublishErrorKind::WrongLastSequence if attempt > 1 => {
                    return match self.landed(subject, &message_id).await {
                        Ok(Some(seq)) => Ok(seq),
                        Ok(None) => Err(PublishRefused::WrongLastSequence),
                        Err(error) => Err(PublishRefused::Failed(error)),
                    };
                }
                PublishErrorKind::WrongLastSequence => {
                    return Err(PublishRefused::WrongLastSequence)
                }
                PublishErrorKind::TimedOut
                | PublishErrorKind::BrokenPipe
                | PublishErrorKind::StreamNotFound
                    if started.elapsed() < Duration::from_millis(PUBLISH_RETRY_WINDOW_MS) =>
                {
                    tracing::warn!("publish to {subject} (attempt {attempt}): {error}; retrying");
                    tokio::time::sleep(Duration::from_millis(PUBLISH_RETRY_MS)).await;
                }
                _ => return Err(PublishRefused::Failed(nats("publish a link record")(error))),
            }
        }
    }

    /// The sequence of the subject's last record if it carries `message_id` (an earlier attempt
    /// of this publish landed although its acknowledgement was lost).
    async fn landed(&self, subject: &str, message_id: &str) -> Result<Option<u64>, ClusterError> {
        let last = self
            .stream
            .get_last_raw_message_by_subject(subject)
            .await
            .map_err(nats("read a link's current record"))?;
        let ours = last
            .headers
            .get(NATS_MESSAGE_ID)
            .is_some_and(|id| id.as_str() == message_id);
        Ok(ours.then_some(last.sequence))
    }

    /// Waits until this node has applied record `seq`, asking the follower to re-subscribe each
    /// time the record is a stall-check period late.
    async fn wait_applied(&self, seq: u64) -> Result<(), ClusterError> {
        let started = Instant::now();
        let wait = Duration::from_millis(self.options.apply_wait_ms);
        let mut applied = self.shared.applied.subscribe();
        while started.elapsed() < wait {
            let period = Duration::from_millis(FOLLOW_STALL_CHECK_MS).min(wait - started.elapsed());
            match tokio::time::timeout(period, applied.wait_for(|applied| *applied >= seq)).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(_)) => break,
                Err(_) => self.shared.resubscribe.notify_waiters(),
            }
        }
        Err(ClusterError::ApplyTimeout {
            seq,
            applied_seq: self.applied_seq(),
            waited_ms: started.elapsed().as_millis() as u64,
        })
    }

    async fn snapshot_bucket(&self) -> Result<ObjectStore, ClusterError> {
        if let Ok(bucket) = self
            .jetstream
            .get_object_store(&self.options.snapshot_bucket)
            .await
        {
            return Ok(bucket);
        }
        self.jetstream
            .create_object_store(object_store::Config {
                bucket: self.options.snapshot_bucket.clone(),
                description: Some("kurz snapshots of the link stream".into()),
                storage: StorageType::File,
                num_replicas: self.options.replicas,
                ..Default::default()
            })
            .await
            .map_err(nats("create the snapshot bucket"))
    }
}

/// Connects to NATS. The receiver changes on every (re)connection: the follower re-subscribes
/// after each one, because a pull consumer whose requests were in flight on the lost connection
/// can go silent.
async fn connect(
    urls: &[String],
) -> Result<(async_nats::Client, watch::Receiver<u64>), ClusterError> {
    let connections = Arc::new(watch::Sender::new(0u64));
    let connections_seen = connections.subscribe();
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .event_callback(move |event| {
            let connections = connections.clone();
            async move {
                if matches!(event, async_nats::Event::Connected) {
                    connections.send_modify(|count| *count += 1);
                }
            }
        })
        .connect(urls)
        .await
        .map_err(|source| ClusterError::Connect {
            urls: urls.join(","),
            source,
        })?;
    Ok((client, connections_seen))
}

/// NATS servers before 2.10 know only one filter subject per consumer.
fn supports_filter_subjects(version: &str) -> bool {
    let mut parts = version
        .split('.')
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (2, 10)
}

async fn open_stream(
    jetstream: &async_nats::jetstream::Context,
    options: &ClusterOptions,
) -> Result<stream::Stream, ClusterError> {
    let subjects = format!("{}.>", options.subject_prefix);
    let mut stream = jetstream
        .get_or_create_stream(stream::Config {
            name: options.stream_name.clone(),
            subjects: vec![subjects.clone()],
            max_messages_per_subject: 1,
            storage: StorageType::File,
            num_replicas: options.replicas,
            ..Default::default()
        })
        .await
        .map_err(nats("open or create the link stream"))?;
    let config = &stream
        .info()
        .await
        .map_err(nats("read the link stream's config"))?
        .config;
    if config.max_messages_per_subject != 1 || config.subjects != [subjects.clone()] {
        return Err(ClusterError::StreamMisconfigured {
            stream: options.stream_name.clone(),
            what: format!(
                "max messages per subject {} and subjects {:?}",
                config.max_messages_per_subject, config.subjects
            ),
            subjects,
        });
    }
    Ok(stream)
}

/// The object name the "latest" pointer holds, if there is one.
async fn read_pointer(bucket: &ObjectStore, pointer: &str) -> Result<Option<String>, ClusterError> {
    let object = match bucket.get(pointer).await {
        Ok(object) => object,
        Err(error) if matches!(error.kind(), object_store::GetErrorKind::NotFound) => {
            return Ok(None)
        }
        Err(error) => return Err(nats("read the newest snapshot's name")(error)),
    };
    let mut name = String::new();
    object
        .take(POINTER_BYTES_MAX)
        .read_to_string(&mut name)
        .await
        .map_err(nats("read the newest snapshot's name"))?;
    Ok(Some(name))
}

/// Installs the newest snapshot of this stream and layout into the fresh data dir, if the
/// bucket has one.
async fn download_newest_snapshot(
    jetstream: &async_nats::jetstream::Context,
    options: &ClusterOptions,
    names: &SnapshotNames,
) -> Result<Bootstrap, ClusterError> {
    let Ok(bucket) = jetstream.get_object_store(&options.snapshot_bucket).await else {
        return Ok(Bootstrap::Empty);
    };
    let download = datadir::download_path(&options.data_dir);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let Some(object_name) = read_pointer(&bucket, &names.latest()).await? else {
            return Ok(Bootstrap::Empty);
        };
        let started = Instant::now();
        match download_object(&bucket, &object_name, &download).await {
            Ok(file_bytes) => {
                datadir::install_download(&options.data_dir, &download)?;
                let covered_seq =
                    crate::store::snapshot::Snapshot::open(&options.data_dir.join(SNAPSHOT_FILE))
                        .map_err(StoreError::from)?
                        .header()
                        .covered_seq;
                return Ok(Bootstrap::Downloaded {
                    object_name,
                    covered_seq,
                    file_bytes,
                    download_ms: started.elapsed().as_millis() as u64,
                });
            }
            // A newer upload may have replaced the object between reading the pointer and
            // fetching it: read the pointer again.
            Err(error) if attempt < DOWNLOAD_ATTEMPTS_MAX => {
                tracing::warn!("downloading snapshot {object_name}: {error}; retrying");
            }
            Err(error) => return Err(error),
        }
    }
}

async fn download_object(
    bucket: &ObjectStore,
    object_name: &str,
    download: &std::path::Path,
) -> Result<u64, ClusterError> {
    let mut object = bucket
        .get(object_name)
        .await
        .map_err(nats("fetch the newest snapshot"))?;
    let file_error = |source| ClusterError::SnapshotFile {
        path: download.to_owned(),
        source,
    };
    let mut file = tokio::fs::File::create(download)
        .await
        .map_err(file_error)?;
    let file_bytes = tokio::io::copy(&mut object, &mut file)
        .await
        .map_err(file_error)?;
    file.sync_all().await.map_err(file_error)?;
    Ok(file_bytes)
}

/// What the follower task follows.
struct Follow {
    prefix: String,
    shard_set: ShardSet,
    filter_subjects_supported: bool,
    /// Changes whenever the NATS connection is re-established.
    connections: watch::Receiver<u64>,
}

/// Applies the stream to the store for as long as the node lives, re-subscribing from just
/// after the last applied record whenever the consumer is lost (a NATS server went away, the
/// connection dropped). Stops for good only at a record it cannot decode, because skipping it
/// would lose that link.
async fn follow(shared: Arc<Shared>, stream: stream::Stream, mut follow: Follow) {
    loop {
        let start_seq = *shared.applied.borrow() + 1;
        let outcome = follow_from(&shared, &stream, &mut follow, start_seq).await;
        shared.following.store(false, Ordering::Relaxed);
        match outcome {
            Err(error @ ClusterError::Record { .. }) => {
                tracing::error!("cluster follower stopped: {error}");
                let mut failed = shared
                    .failed
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                *failed = Some(error.to_string());
                return;
            }
            Err(error) => tracing::warn!("cluster follower: {error}; re-subscribing"),
            Ok(()) => tracing::info!("cluster follower: re-subscribing after a reconnection"),
        }
        tokio::time::sleep(Duration::from_millis(FOLLOW_RETRY_MS)).await;
    }
}

fn consumer_config(follow: &Follow, start_seq: u64) -> OrderedConfig {
    let held = follow.shard_set.held();
    let mut config = OrderedConfig {
        deliver_policy: DeliverPolicy::ByStartSequence {
            start_sequence: start_seq,
        },
        max_expires: Duration::from_millis(FOLLOW_PULL_EXPIRES_MS),
        ..Default::default()
    };
    // The server filters when it can; records of other shards that still arrive (several
    // shards on a server before 2.10) are skipped below.
    match held.as_slice() {
        [only] if !follow.shard_set.is_all() => {
            config.filter_subject = shard::shard_filter(&follow.prefix, *only)
        }
        _ if !follow.shard_set.is_all() && follow.filter_subjects_supported => {
            config.filter_subjects = held
                .iter()
                .map(|shard| shard::shard_filter(&follow.prefix, *shard))
                .collect()
        }
        _ => {}
    }
    config
}

async fn follow_from(
    shared: &Shared,
    stream: &stream::Stream,
    follow: &mut Follow,
    start_seq: u64,
) -> Result<(), ClusterError> {
    follow.connections.mark_unchanged();
    let consumer = stream
        .create_consumer(consumer_config(follow, start_seq))
        .await
        .map_err(nats("subscribe to the link stream"))?;
    shared
        .lag_records
        .store(consumer.cached_info().num_pending, Ordering::Relaxed);
    let mut messages = consumer
        .messages()
        .await
        .map_err(nats("read the link stream"))?;
    shared.following.store(true, Ordering::Relaxed);
    let subscribed_at = Instant::now();
    let mut stall_check = tokio::time::interval(Duration::from_millis(FOLLOW_STALL_CHECK_MS));
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet_checks = 0u32;
    loop {
        let message = tokio::select! {
            message = messages.next() => message,
            _ = follow.connections.changed() => return Ok(()),
            _ = shared.resubscribe.notified() => {
                // A consumer made since the record was written gets a full period to deliver it.
                if subscribed_at.elapsed() < Duration::from_millis(FOLLOW_STALL_CHECK_MS) {
                    continue;
                }
                return Err(ClusterError::Nats {
                    action: "follow the link stream",
                    source: "a record this node wrote has not arrived".into(),
                });
            }
            _ = stall_check.tick() => {
                quiet_checks += 1;
                let applied_seq = *shared.applied.borrow();
                if quiet_checks >= 2 && behind(stream, follow, applied_seq).await {
                    return Err(ClusterError::Nats {
                        action: "follow the link stream",
                        source: "the consumer stopped delivering while the stream has newer records".into(),
                    });
                }
                continue;
            }
        };
        quiet_checks = 0;
        let Some(message) = message else {
            return Err(ClusterError::Nats {
                action: "read the link stream",
                source: "the consumer's message stream ended".into(),
            });
        };
        let message = message.map_err(nats("read the link stream"))?;
        let (seq, pending) = match message.info() {
            Ok(info) => (info.stream_sequence, info.pending),
            Err(source) => {
                return Err(ClusterError::Nats {
                    action: "read a stream record's position",
                    source,
                })
            }
        };
        if seq <= *shared.applied.borrow() {
            continue;
        }
        apply(shared, follow, seq, &message.subject, &message.payload)?;
        shared.lag_records.store(pending, Ordering::Relaxed);
        shared.applied.send_replace(seq);
    }
}

/// Whether the stream holds a record of this node's shards after `applied_seq`. False when the
/// stream cannot be asked (a failover in progress): the consumer is then given more time.
async fn behind(stream: &stream::Stream, follow: &Follow, applied_seq: u64) -> bool {
    let held = follow.shard_set.held();
    let filtered_by_server =
        !follow.shard_set.is_all() && (held.len() == 1 || follow.filter_subjects_supported);
    let patience = Duration::from_millis(FOLLOW_STALL_CHECK_MS);
    if !filtered_by_server {
        let info = tokio::time::timeout(patience, stream.get_info()).await;
        return matches!(info, Ok(Ok(info)) if info.state.last_sequence > applied_seq);
    }
    for shard in held {
        let next = stream
            .raw_message_builder()
            .next_by_subject(shard::shard_filter(&follow.prefix, shard))
            .sequence(applied_seq + 1)
            .send();
        if matches!(tokio::time::timeout(patience, next).await, Ok(Ok(_))) {
            return true;
        }
    }
    false
}

/// Applies record `seq` if it belongs to one of this node's shards.
fn apply(
    shared: &Shared,
    follow: &Follow,
    seq: u64,
    subject: &str,
    payload: &[u8],
) -> Result<(), ClusterError> {
    let refuse = |reason: String| ClusterError::Record {
        seq,
        subject: subject.to_owned(),
        reason,
    };
    let Some((shard, code)) = shard::parse_subject(&follow.prefix, subject) else {
        return Err(refuse("not a <prefix>.<shard>.<code> subject".into()));
    };
    if !follow.shard_set.holds(shard) {
        return Ok(());
    }
    let link = record::decode(payload).map_err(|error: RecordError| refuse(error.to_string()))?;
    if link.code != code || shard::shard_of(code, follow.shard_set.shards()) != shard {
        return Err(refuse(format!(
            "the record is for code {:?}, which does not live on this subject",
            link.code
        )));
    }
    shared.store.apply_replicated(seq, link);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_subjects_need_nats_2_10() {
        assert!(!supports_filter_subjects("2.9.10"));
        assert!(supports_filter_subjects("2.10.0"));
        assert!(supports_filter_subjects("2.11.3"));
        assert!(supports_filter_subjects("3.0.0"));
        assert!(!supports_filter_subjects("garbage"));
    }

    #[test]
    fn a_single_held_shard_is_filtered_by_the_server() {
        let follow = |shard_set: ShardSet, supported| Follow {
            prefix: "p".into(),
            shard_set,
            filter_subjects_supported: supported,
            connections: watch::channel(0).1,
        };
        let one = consumer_config(&follow(ShardSet::of(4, &[2]).expect("set"), false), 5);
        assert_eq!(one.filter_subject, "p.2.>");
        let two_old = consumer_config(&follow(ShardSet::of(4, &[1, 2]).expect("set"), false), 5);
        assert!(two_old.filter_subject.is_empty() && two_old.filter_subjects.is_empty());
        let two_new = consumer_config(&follow(ShardSet::of(4, &[1, 2]).expect("set"), true), 5);
        assert_eq!(two_new.filter_subjects, vec!["p.1.>", "p.2.>"]);
        let all = consumer_config(&follow(ShardSet::all(1), true), 5);
        assert!(all.filter_subject.is_empty() && all.filter_subjects.is_empty());
        assert_eq!(
            all.deliver_policy,
            DeliverPolicy::ByStartSequence { start_sequence: 5 }
        );
    }
}
