//! Click counts across nodes: each node counts the redirects it serves, publishes its counts in
//! batches to a clicks stream, and folds every node's counts, so any node answers with the
//! cluster's total. Owns the clicks stream and the per-node counters; must never touch the link
//! stream or the store, and never puts a lock shared by all workers on the redirect path.
//!
//! The clicks stream is a grow-only counter (a G-counter CRDT) kept by JetStream: subject
//! `<prefix>.<shard>.<code>.<slot>` holds, as decimal ASCII, the number of redirects of `code`
//! that counter slot `slot` has served; one message is kept per subject. The total of a code is
//! the sum over its slots. Publishing a slot's running count rather than a delta makes a lost or
//! repeated publish harmless: the next one carries the full count. Every process takes a fresh
//! random slot, so a restarted node never needs its old count back before counting again (its
//! old slot stays in the sum); the price is one more subject per clicked link per restart.
//!
//! Click caps across nodes: a node sees other nodes' clicks one flush period plus the stream's
//! delivery late, so a capped link can overshoot its cap by at most the clicks the other nodes
//! of its shard group serve on it in that window (about `(nodes - 1) x rate x flush period`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::stream::{self, StorageType};
use dashmap::{DashMap, DashSet};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::shard::{self, ShardSet};
use super::{nats, ClusterError, ClusterNode};

pub const CLICKS_STREAM_SUFFIX: &str = "_CLICKS";
pub const CLICKS_SUBJECT_PREFIX: &str = "kurz.clicks";
/// How often a node publishes the counts that changed.
pub const CLICK_FLUSH_MS_DEFAULT: u64 = 1_000;
/// Pause before the fold re-subscribes after losing its consumer.
const FOLD_RETRY_MS: u64 = 250;

/// Counts of one code: this process's own, and every slot folded from the stream.
#[derive(Default)]
struct Counts {
    /// slot → count, this process's own slot excluded.
    others: Vec<(u64, u64)>,
}

struct Shared {
    slot: u64,
    prefix: String,
    shards: u32,
    own: DashMap<String, u64>,
    /// Codes whose own count changed since the last flush.
    dirty: DashSet<String>,
    folded: DashMap<String, Counts>,
    folded_seq: AtomicU64,
    /// One flush at a time: two in flight could land a slot's older count after its newer one,
    /// and the stream keeps only the last.
    flushing: tokio::sync::Mutex<()>,
}

/// Cluster-wide click counts for the codes a node holds.
pub struct ClickCounter {
    shared: Arc<Shared>,
    jetstream: async_nats::jetstream::Context,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ClickCounter {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl ClickCounter {
    /// Opens (or creates) the clicks stream beside `node`'s link stream, starts folding every
    /// slot's counts for the node's shards, and publishes this process's counts every
    /// `flush_ms`.
    pub async fn start(node: &ClusterNode, flush_ms: u64) -> Result<ClickCounter, ClusterError> {
        let prefix = CLICKS_SUBJECT_PREFIX.to_owned();
        let stream = node
            .jetstream
            .get_or_create_stream(stream::Config {
                name: format!("{}{CLICKS_STREAM_SUFFIX}", node.options.stream_name),
                subjects: vec![format!("{prefix}.>")],
                max_messages_per_subject: 1,
                storage: StorageType::File,
                num_replicas: node.options.replicas,
                ..Default::default()
            })
            .await
            .map_err(nats("open or create the clicks stream"))?;
        let shared = Arc::new(Shared {
            slot: rand::random(),
            prefix,
            shards: node.shard_set.shards(),
            own: DashMap::new(),
            dirty: DashSet::new(),
            folded: DashMap::new(),
            folded_seq: AtomicU64::new(0),
            flushing: tokio::sync::Mutex::new(()),
        });
        let fold = tokio::spawn(fold(
            shared.clone(),
            stream,
            node.shard_set.clone(),
            node.connections.clone(),
        ));
        let flusher = {
            let shared = shared.clone();
            let jetstream = node.jetstream.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(flush_ms.max(1)));
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    if let Err(error) = flush(&shared, &jetstream).await {
                        tracing::warn!("click counts: {error}; retrying at the next flush");
                    }
                }
            })
        };
        Ok(ClickCounter {
            shared: shared.clone(),
            jetstream: node.jetstream.clone(),
            tasks: vec![fold, flusher],
        })
    }

    /// Counts one redirect of `code` served by this node. Two dashmap shard locks, no I/O.
    pub fn record(&self, code: &str) {
        match self.shared.own.get_mut(code) {
            Some(mut count) => *count += 1,
            None => *self.shared.own.entry(code.to_owned()).or_insert(0) += 1,
        }
        if !self.shared.dirty.contains(code) {
            self.shared.dirty.insert(code.to_owned());
        }
    }

    /// Redirects of `code` served by the whole cluster, as far as this node has heard.
    pub fn total(&self, code: &str) -> u64 {
        let own = self.shared.own.get(code).map_or(0, |count| *count);
        own + self.elsewhere(code)
    }

    /// Redirects of `code` served by every other counter slot (other nodes, and this node's
    /// earlier processes), as far as this node has heard. One dashmap read.
    pub fn elsewhere(&self, code: &str) -> u64 {
        self.shared.folded.get(code).map_or(0, |counts| {
            counts.others.iter().map(|(_, count)| count).sum::<u64>()
        })
    }

    /// The clicks stream's sequence folded so far.
    pub fn folded_seq(&self) -> u64 {
        self.shared.folded_seq.load(Ordering::Relaxed)
    }

    /// Publishes the counts that changed since the last flush now (the flush task does it every
    /// flush period), returning once JetStream has them. Call it before dropping the counter:
    /// clicks counted since the last flush are lost otherwise.
    pub async fn flush(&self) -> Result<(), ClusterError> {
        flush(&self.shared, &self.jetstream).await
    }
}

/// Publishes this slot's running count of every code that changed, and waits for the acks. A
/// code whose publish failed is marked changed again, so the next flush carries it.
async fn flush(
    shared: &Shared,
    jetstream: &async_nats::jetstream::Context,
) -> Result<(), ClusterError> {
    let _one_at_a_time = shared.flushing.lock().await;
    let changed: Vec<String> = shared.dirty.iter().map(|code| code.clone()).collect();
    let mut acks = Vec::with_capacity(changed.len());
    for code in changed {
        shared.dirty.remove(&code);
        let count = shared.own.get(&code).map_or(0, |count| *count);
        let subject = format!(
            "{}.{}.{code}.{:016x}",
            shared.prefix,
            shard::shard_of(&code, shared.shards),
            shared.slot
        );
        let sent = jetstream
            .publish(subject, count.to_string().into_bytes().into())
            .await;
        acks.push((code, sent));
    }
    let mut first_error = None;
    for (code, sent) in acks {
        let acked = match sent {
            Ok(ack) => ack.await.map(|_| ()),
            Err(error) => Err(error),
        };
        if let Err(error) = acked {
            shared.dirty.insert(code);
            first_error.get_or_insert(error);
        }
    }
    match first_error {
        Some(error) => Err(nats("publish click counts")(error)),
        None => Ok(()),
    }
}

/// Folds the clicks stream into `shared.folded` for as long as the counter lives,
/// re-subscribing from just after the last folded record when the consumer is lost or the NATS
/// connection was re-established (a consumer can go silent across a failover).
async fn fold(
    shared: Arc<Shared>,
    stream: stream::Stream,
    shard_set: ShardSet,
    mut connections: watch::Receiver<u64>,
) {
    loop {
        connections.mark_unchanged();
        if let Err(error) = fold_from(&shared, &stream, &shard_set, &mut connections).await {
            tracing::warn!("click counts: {error}; re-subscribing");
        }
        tokio::time::sleep(Duration::from_millis(FOLD_RETRY_MS)).await;
    }
}

async fn fold_from(
    shared: &Shared,
    stream: &stream::Stream,
    shard_set: &ShardSet,
    connections: &mut watch::Receiver<u64>,
) -> Result<(), ClusterError> {
    let held = shard_set.held();
    let mut config = OrderedConfig {
        deliver_policy: DeliverPolicy::ByStartSequence {
            start_sequence: shared.folded_seq.load(Ordering::Relaxed) + 1,
        },
        max_expires: Duration::from_millis(super::FOLLOW_PULL_EXPIRES_MS),
        ..Default::default()
    };
    if let [only] = held.as_slice() {
        if !shard_set.is_all() {
            config.filter_subject = shard::shard_filter(&shared.prefix, *only);
        }
    }
    let mut messages = stream
        .create_consumer(config)
        .await
        .map_err(nats("subscribe to the clicks stream"))?
        .messages()
        .await
        .map_err(nats("read the clicks stream"))?;
    loop {
        let message = tokio::select! {
            message = messages.next() => message,
            _ = connections.changed() => return Ok(()),
        };
        let Some(message) = message else {
            return Ok(());
        };
        let message = message.map_err(nats("read the clicks stream"))?;
        let seq = match message.info() {
            Ok(info) => info.stream_sequence,
            Err(source) => {
                return Err(ClusterError::Nats {
                    action: "read a click record's position",
                    source,
                })
            }
        };
        if let Some((code, slot, count)) = parse(&shared.prefix, &message.subject, &message.payload)
        {
            if slot != shared.slot && shard_set.holds(shard::shard_of(code, shared.shards)) {
                let mut counts = shared.folded.entry(code.to_owned()).or_default();
                match counts.others.iter_mut().find(|(held, _)| *held == slot) {
                    // Counts only grow; an older record arriving late never lowers one.
                    Some((_, held)) => *held = (*held).max(count),
                    None => counts.others.push((slot, count)),
                }
            }
        }
        shared.folded_seq.fetch_max(seq, Ordering::Relaxed);
    }
}

/// (code, slot, count) of a click record; None for anything else (skipped: a count is only
/// ever a lower bound, so skipping one loses no more than its increase).
fn parse<'a>(prefix: &str, subject: &'a str, payload: &[u8]) -> Option<(&'a str, u64, u64)> {
    let (_, rest) = shard::parse_subject(prefix, subject)?;
    let (code, slot) = rest.rsplit_once('.')?;
    let slot = u64::from_str_radix(slot, 16).ok()?;
    let count = std::str::from_utf8(payload).ok()?.parse().ok()?;
    Some((code, slot, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn click_records_parse() {
        assert_eq!(
            parse("kurz.clicks", "kurz.clicks.3.abc.00000000000000ff", b"42"),
            Some(("abc", 255, 42))
        );
        assert_eq!(parse("kurz.clicks", "kurz.clicks.3.abc", b"42"), None);
        assert_eq!(parse("kurz.clicks", "kurz.clicks.3.abc.00ff", b"x"), None);
    }
}
