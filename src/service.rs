//! The link service: the one door the HTTP API writes links through. Owns the backend that holds
//! them — the local [`Store`] with its WAL (single-node mode, the default) or a [`ClusterNode`]
//! following the cluster's NATS JetStream log (cluster mode, `--nats`) with the cluster's click
//! counter beside it — and turns each backend's write errors into one [`WriteError`], so the API
//! has one write path whatever the mode.
//!
//! Reads do not come through here: the redirect hot path and the API's reads go straight to
//! [`LinkService::store`], which in cluster mode is the node's follower store. Must never parse
//! HTTP or judge whether a link is valid (that is `http` and `links`).

use std::path::Path;

use crate::cluster::clicks::ClickCounter;
use crate::cluster::shard::shard_of;
use crate::cluster::{ClusterError, ClusterNode};
use crate::config::ClusterConfig;
use crate::store::link::Link;
use crate::store::{Store, StoreError};

/// Why a write was refused or failed. Nothing is acknowledged with any of these; only
/// [`WriteError::Lagging`] says the write is nevertheless durable.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("code {0:?} is taken")]
    CodeTaken(String),
    #[error("code {0:?} has no link")]
    NotFound(String),
    /// Another write on the code is in flight (single-node) or kept winning the race
    /// (cluster); retrying soon succeeds.
    #[error("code {0:?} has another write in progress; retry")]
    Busy(String),
    #[error("{0:?} is not a valid code")]
    InvalidCode(String),
    /// Cluster mode: the code lives in a shard this node does not hold.
    #[error("code {code:?} is in shard {shard} of {shards}; this node holds shards {held:?}")]
    WrongShard {
        code: String,
        shard: u32,
        held: Vec<u32>,
        shards: u32,
    },
    /// Cluster mode: JetStream acknowledged the record (it is durable on a quorum), but this
    /// node did not apply it in time.
    #[error("record {seq} is durable in the cluster's log, but this node had applied only up to {applied_seq} after {waited_ms} ms")]
    Lagging {
        seq: u64,
        applied_seq: u64,
        waited_ms: u64,
    },
    /// Single-node mode: the store cannot write (WAL failure, full disk).
    #[error(transparent)]
    Store(StoreError),
    /// Cluster mode: NATS JetStream cannot take the write (unreachable, no quorum, timeout).
    #[error(transparent)]
    Cluster(ClusterError),
}

impl From<StoreError> for WriteError {
    fn from(error: StoreError) -> WriteError {
        match error {
            StoreError::CodeTaken(code) => WriteError::CodeTaken(code),
            StoreError::NotFound(code) => WriteError::NotFound(code),
            StoreError::Busy(code) => WriteError::Busy(code),
            error => WriteError::Store(error),
        }
    }
}

impl From<ClusterError> for WriteError {
    fn from(error: ClusterError) -> WriteError {
        match error {
            ClusterError::CodeTaken(code) => WriteError::CodeTaken(code),
            ClusterError::NotFound(code) => WriteError::NotFound(code),
            ClusterError::Conflict { code, .. } => WriteError::Busy(code),
            ClusterError::InvalidCode(code) => WriteError::InvalidCode(code),
            ClusterError::WrongShard {
                code,
                shard,
                held,
                shards,
            } => WriteError::WrongShard {
                code,
                shard,
                held,
                shards,
            },
            ClusterError::ApplyTimeout {
                seq,
                applied_seq,
                waited_ms,
            } => WriteError::Lagging {
                seq,
                applied_seq,
                waited_ms,
            },
            error => WriteError::Cluster(error),
        }
    }
}

/// Cluster mode's parts: the node (link stream, follower store) and the cluster-wide click
/// counter.
pub struct Cluster {
    pub node: ClusterNode,
    pub clicks: ClickCounter,
    pub config: ClusterConfig,
}

enum Backend {
    Local(Store),
    /// Boxed: the node and its counter are large, and single-node mode should not pay for them.
    Cluster(Box<Cluster>),
}

/// The backend holding the links, and the write path into it.
pub struct LinkService {
    backend: Backend,
}

impl LinkService {
    /// Single-node mode over an open store.
    pub fn local(store: Store) -> LinkService {
        LinkService {
            backend: Backend::Local(store),
        }
    }

    /// Cluster mode: joins the cluster (connects to NATS, prepares `data_dir`, starts following
    /// the link stream) and starts the cluster-wide click counter.
    pub async fn join_cluster(
        config: &ClusterConfig,
        data_dir: &Path,
    ) -> Result<LinkService, ClusterError> {
        let node = ClusterNode::start(config.options(data_dir)).await?;
        let clicks = ClickCounter::start(&node, config.click_flush_ms).await?;
        Ok(LinkService {
            backend: Backend::Cluster(Box::new(Cluster {
                node,
                clicks,
                config: config.clone(),
            })),
        })
    }

    /// The store every read goes to: the local store, or the cluster node's follower store.
    pub fn store(&self) -> &Store {
        match &self.backend {
            Backend::Local(store) => store,
            Backend::Cluster(cluster) => cluster.node.store(),
        }
    }

    /// Cluster mode's parts; None in single-node mode.
    pub fn cluster(&self) -> Option<&Cluster> {
        match &self.backend {
            Backend::Local(_) => None,
            Backend::Cluster(cluster) => Some(cluster),
        }
    }

    /// Whether this node takes writes for `code` (always, in single-node mode).
    pub fn holds(&self, code: &str) -> bool {
        match &self.backend {
            Backend::Local(_) => true,
            Backend::Cluster(cluster) => cluster.node.holds_code(code),
        }
    }

    /// The refusal a call about `code` gets on this node because another shard group holds it
    /// (never in single-node mode).
    pub fn check_shard(&self, code: &str) -> Result<(), WriteError> {
        let Backend::Cluster(cluster) = &self.backend else {
            return Ok(());
        };
        let shard_set = cluster.node.shard_set();
        if shard_set.holds_code(code) {
            return Ok(());
        }
        Err(WriteError::WrongShard {
            code: code.to_owned(),
            shard: shard_of(code, shard_set.shards()),
            held: shard_set.held(),
            shards: shard_set.shards(),
        })
    }

    /// How many random codes it takes, on average, to draw one this node holds: shards / held.
    pub fn draws_per_held_code(&self) -> usize {
        match &self.backend {
            Backend::Local(_) => 1,
            Backend::Cluster(cluster) => {
                let shard_set = cluster.node.shard_set();
                let held = shard_set.held().len().max(1);
                (shard_set.shards() as usize).div_ceil(held)
            }
        }
    }

    /// Creates `link` unless its code is taken (in the cluster: anywhere in the cluster,
    /// tombstones included). Returns once the write is durable and visible to this node's reads.
    pub async fn create(&self, link: Link) -> Result<(), WriteError> {
        match &self.backend {
            Backend::Local(store) => store.create(link).await.map(drop)?,
            Backend::Cluster(cluster) => cluster.node.create(link).await.map(drop)?,
        }
        Ok(())
    }

    /// Replaces the link for `code` with what `change` makes of the current one (deleting is a
    /// change to a tombstone). `change` may run more than once in cluster mode, on a newer state
    /// each time, and may refuse with its own error: `Ok(Err(..))`, nothing written.
    pub async fn update<E>(
        &self,
        code: &str,
        change: impl FnMut(&Link) -> Result<Link, E>,
    ) -> Result<Result<Link, E>, WriteError> {
        Ok(match &self.backend {
            Backend::Local(store) => store.update(code, change).await?,
            Backend::Cluster(cluster) => cluster.node.update(code, change).await?,
        })
    }

    /// Counts one served redirect toward the cluster-wide total (a no-op in single-node mode,
    /// where the local counters are the whole truth).
    pub fn record_click(&self, code: &str) {
        if let Backend::Cluster(cluster) = &self.backend {
            cluster.clicks.record(code);
        }
    }

    /// Closes the backend: the local store's WAL is flushed; a cluster node publishes its last
    /// click counts and stops following.
    pub async fn close(self) {
        match self.backend {
            Backend::Local(store) => {
                if let Err(error) = tokio::task::spawn_blocking(move || store.close()).await {
                    tracing::error!("closing the store failed: {error}");
                    return;
                }
                tracing::info!("store closed; WAL flushed");
            }
            Backend::Cluster(cluster) => {
                let Cluster { node, clicks, .. } = *cluster;
                if let Err(error) = clicks.flush().await {
                    tracing::warn!("last click counts not published: {error}");
                }
                drop(clicks);
                node.shutdown().await;
                tracing::info!("left the cluster; click counts published");
            }
        }
    }
}
