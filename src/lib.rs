//! kurz: a URL shortener built as a high-performance redirect front tier.
//!
//! The crate map, one line per module (see README.md, "Architecture", for how they fit):

/// The memory allocator's housekeeping: freed memory back to the OS after a large build.
pub mod allocator;
/// Click counts and caps, and the analytics pipeline (referrers, countries, user agents, bots).
pub mod analytics;
/// API keys: the hashed keys file and `kurz keys`.
pub mod auth;
/// Cluster mode: many nodes following one NATS JetStream stream (`kurz serve --nats`).
pub mod cluster;
/// `kurz serve` settings: flags, `KURZ_*` environment and TOML file into one `ServeConfig`.
pub mod config;
/// Import and export of link files (TSV, CSV, NDJSON).
pub mod datafile;
/// Integers as decimal digits into byte buffers, without `core::fmt`.
pub mod decimal;
/// Durable file replacement: temp file, fsync, rename, fsync dir.
pub mod fsutil;
/// The HTTP server: listeners, the redirect hot path, the JSON API, the admin listener.
pub mod http;
/// The rules of a link: validation, code generation, lifecycle.
pub mod links;
/// The Prometheus registry.
pub mod metrics;
/// Cache prefetch hints for loops that overlap many lookups' memory misses.
pub mod prefetch;
/// The link service: the one write path of the API, over the local store or a cluster node.
pub mod service;
/// Link data: mapped snapshot, overlay, WAL, recovery, snapshot cycle.
pub mod store;
/// Background threads at a lower priority than the redirect workers.
pub mod threads;
/// Unix seconds inside, RFC 3339 text at the edges.
pub mod timefmt;
