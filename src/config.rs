//! The configuration of `kurz serve`: command-line flags, `KURZ_*` environment variables and an
//! optional TOML file (`--config FILE`), merged in that order of precedence into one validated
//! [`ServeConfig`]. Owns parsing and validation of settings; never opens a listener or the store.

use std::collections::HashSet;
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use clap::builder::BoolishValueParser;
use serde::Deserialize;

use crate::cluster::{self, shard::SHARDS_MAX, ClusterOptions};
use crate::links::codegen::{CodeStrategy, CODE_LEN_DEFAULT, COUNTER_NODE_ID_MAX};
use crate::links::validate::{self, UrlRules, CODE_BYTES_MAX, URL_BYTES_MAX_DEFAULT};
use crate::store::link::RedirectStatus;
use crate::store::wal::FsyncPolicy;

pub const DATA_DIR_DEFAULT: &str = "./data";
pub const LISTEN_DEFAULT: &str = "127.0.0.1:8080";
pub const ADMIN_LISTEN_DEFAULT: &str = "127.0.0.1:8081";
pub const KEYS_FILE_NAME: &str = "keys";
pub const CACHE_MAX_AGE_S_DEFAULT: u64 = 86_400;
pub const BODY_BYTES_MAX_DEFAULT: usize = 16 * 1024;
pub const BATCH_BODY_BYTES_MAX_DEFAULT: usize = 4 * 1024 * 1024;
pub const RATE_LIMIT_PER_S_DEFAULT: f64 = 50.0;
pub const RATE_LIMIT_BURST_DEFAULT: u32 = 200;
pub const CONNECTIONS_MAX_DEFAULT: usize = 10_000;
pub const TIMEOUT_HEADER_READ_MS_DEFAULT: u64 = 10_000;
pub const TIMEOUT_BODY_READ_MS_DEFAULT: u64 = 10_000;
pub const TIMEOUT_WRITE_MS_DEFAULT: u64 = 10_000;
pub const TIMEOUT_SHUTDOWN_MS_DEFAULT: u64 = 10_000;
/// Schemes no configuration may allow: their "links" run code or read local files.
const SCHEMES_NEVER_ALLOWED: [&str; 6] =
    ["javascript", "data", "vbscript", "file", "blob", "about"];
pub const CLICKS_CHECKPOINT_MS_DEFAULT: u64 = 1_000;
/// Checkpoints rewrite every counter, so they must not run back to back.
const CLICKS_CHECKPOINT_MS_MIN: u64 = 100;
pub const CLICK_LOG_FLUSH_MS_DEFAULT: u64 = 1000;
const CLICK_LOG_FLUSH_MS_MIN: u64 = 10;
pub const CLICK_LOG_FILE_BYTES_MAX_DEFAULT: u64 = 100 << 20;
const CLICK_LOG_FILE_BYTES_MAX_MIN: u64 = 4096;
pub const CLICK_LOG_FILES_KEPT_DEFAULT: u32 = 5;
pub const SNAPSHOT_EVERY_RECORDS_DEFAULT: u64 = 1_000_000;
pub const SNAPSHOT_AGE_MAX_S_DEFAULT: u64 = 3600;
/// Largest accepted blocklist file; a bigger one is almost certainly the wrong file.
const BLOCKLIST_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Largest accepted TOML config file.
const CONFIG_BYTES_MAX: u64 = 1024 * 1024;
const WORKERS_MAX: usize = 1024;
/// Most NATS server URLs `--nats` takes; the client learns the rest of the cluster from them.
const NATS_URLS_MAX: usize = 64;
/// JetStream keeps at most 5 replicas of a stream.
const NATS_REPLICAS_MAX: usize = 5;
/// Shortest click flush period of cluster mode: each flush publishes every changed count.
const CLUSTER_CLICK_FLUSH_MS_MIN: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} is {bytes} bytes; the limit is {max} (is it the right file?)")]
    TooLarge { path: PathBuf, bytes: u64, max: u64 },
    #[error("config file {path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("invalid setting {name}: {message}")]
    Invalid { name: &'static str, message: String },
}

/// The `url_schemes` setting, lower-cased and checked: RFC 3986 scheme syntax, none of
/// [`SCHEMES_NEVER_ALLOWED`], at least one.
fn url_schemes(schemes: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let schemes: Vec<String> = schemes
        .iter()
        .map(|scheme| scheme.trim().to_ascii_lowercase())
        .filter(|scheme| !scheme.is_empty())
        .collect();
    if schemes.is_empty() {
        return Err(invalid("url_schemes", "names no scheme"));
    }
    for scheme in &schemes {
        let well_formed = scheme.starts_with(|c: char| c.is_ascii_lowercase())
            && scheme
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
        if !well_formed {
            return Err(invalid(
                "url_schemes",
                format!("{scheme:?} is not a URL scheme"),
            ));
        }
        if SCHEMES_NEVER_ALLOWED.contains(&scheme.as_str()) {
            return Err(invalid(
                "url_schemes",
                format!("{scheme:?} links can run code or read local files; it is never allowed"),
            ));
        }
    }
    Ok(schemes)
}

fn invalid(name: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        message: message.into(),
    }
}

/// `kurz serve`: every flag can also come from its `KURZ_*` variable or from the TOML file given
/// with `--config` (keys spelled like the flags, with `_` for `-`). Flags win over the
/// environment, which wins over the file.
#[derive(clap::Args, Deserialize, Debug, Default, Clone)]
#[serde(default, deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of these settings (see deploy/kurz.toml).
    #[arg(long, env = "KURZ_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Data directory holding snapshot.kurz and wal/ [default: ./data].
    #[arg(long, env = "KURZ_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the public listener (redirects and the JSON API) [default: 127.0.0.1:8080].
    #[arg(long, env = "KURZ_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of the admin listener (metrics, snapshot, reload, info) [default: 127.0.0.1:8081].
    /// Keep it on loopback or a private network.
    #[arg(long, env = "KURZ_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// API keys file (name, scope and SHA-256 of each key) [default: <data-dir>/keys].
    #[arg(long, env = "KURZ_KEYS")]
    pub keys: Option<PathBuf>,
    /// Let clients without an API key create links (they are still rate limited per IP).
    #[arg(long, env = "KURZ_ALLOW_ANONYMOUS_CREATE", value_parser = BoolishValueParser::new())]
    pub allow_anonymous_create: bool,
    /// Base of short_url in API answers, e.g. https://sho.rt [default: http://<listen>].
    /// Its host is also refused as a link target (redirect loops).
    #[arg(long, env = "KURZ_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// When the WAL is fsynced: always (a create is acknowledged after its fsync),
    /// interval=MS, or never [default: always].
    #[arg(long, env = "KURZ_FSYNC")]
    pub fsync: Option<String>,
    /// Redirect workers: event loops of the public listener, and threads of the async runtime
    /// that serves the API and the admin listener [default: number of CPUs].
    #[arg(long, env = "KURZ_WORKERS")]
    pub workers: Option<usize>,
    /// Redirect status of links that do not choose one: 301, 302, 307 or 308 [default: 302].
    #[arg(long, env = "KURZ_REDIRECT_STATUS_DEFAULT")]
    pub redirect_status_default: Option<u16>,
    /// max-age of the Cache-Control header on 301 and 308 redirects, in seconds [default: 86400].
    #[arg(long, env = "KURZ_CACHE_MAX_AGE_S")]
    pub cache_max_age_s: Option<u64>,
    /// How codes without an alias are generated: random (CSPRNG base62), counter (Snowflake-style
    /// time + node + sequence, permuted, up to 11 characters) or hash (from the URL's SHA-256;
    /// with "reuse": true a create of a known URL returns its code) [default: random].
    #[arg(long, env = "KURZ_CODE_STRATEGY", value_enum)]
    pub code_strategy: Option<CodeStrategy>,
    /// Node id (0-1023) in counter codes; give every server sharing a data set its own.
    #[arg(long, env = "KURZ_COUNTER_NODE_ID")]
    pub counter_node_id: Option<u16>,
    /// Counter codes in plain sequence instead of permuted (guessable; for debugging).
    #[arg(long, env = "KURZ_COUNTER_UNPERMUTED", value_parser = BoolishValueParser::new())]
    pub counter_unpermuted: bool,
    /// Length of generated codes; grows by one after repeated collisions [default: 7].
    #[arg(long, env = "KURZ_CODE_LENGTH")]
    pub code_length: Option<usize>,
    /// Longest accepted long URL, in bytes [default: 2048].
    #[arg(long, env = "KURZ_URL_BYTES_MAX")]
    pub url_bytes_max: Option<usize>,
    /// Comma-separated URL schemes a long URL may have; javascript, data, vbscript, file, blob
    /// and about are always refused [default: http,https].
    #[arg(long, env = "KURZ_URL_SCHEMES", value_delimiter = ',')]
    pub url_schemes: Option<Vec<String>>,
    /// File of blocked domains, one per line ('#' starts a comment); subdomains are blocked too.
    #[arg(long, env = "KURZ_BLOCKLIST")]
    pub blocklist: Option<PathBuf>,
    /// Refuse long URLs whose host is a private, loopback or link-local address.
    #[arg(long, env = "KURZ_REJECT_PRIVATE_ADDRESSES", value_parser = BoolishValueParser::new())]
    pub reject_private_addresses: bool,
    /// Comma-separated words no custom alias may be (replaces the default list:
    /// api, admin, metrics, healthz, readyz, static, ...).
    #[arg(long, env = "KURZ_RESERVED_WORDS", value_delimiter = ',')]
    pub reserved_words: Option<Vec<String>>,
    /// Largest accepted JSON body of a single API call, in bytes [default: 16384].
    #[arg(long, env = "KURZ_BODY_BYTES_MAX")]
    pub body_bytes_max: Option<usize>,
    /// Largest accepted JSON body of POST /api/v1/shorten/batch, in bytes [default: 4194304].
    #[arg(long, env = "KURZ_BATCH_BODY_BYTES_MAX")]
    pub batch_body_bytes_max: Option<usize>,
    /// Sustained link creations per second allowed per API key and per client IP [default: 50].
    #[arg(long, env = "KURZ_RATE_LIMIT_PER_S")]
    pub rate_limit_per_s: Option<f64>,
    /// Creations a key or IP may make at once before the per-second rate applies [default: 200].
    #[arg(long, env = "KURZ_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,
    /// Comma-separated addresses of reverse proxies whose X-Forwarded-For names the client
    /// (for per-IP rate limits); from anyone else the header is ignored [default: none].
    #[arg(long, env = "KURZ_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<IpAddr>>,
    /// Open connections per listener; further clients wait in the accept backlog [default: 10000].
    #[arg(long, env = "KURZ_CONNECTIONS_MAX")]
    pub connections_max: Option<usize>,
    /// Time a client has to send a request's headers, in ms; hyper applies it to idle
    /// keep-alive connections too, so it is also the idle timeout [default: 10000].
    #[arg(long, env = "KURZ_TIMEOUT_HEADER_READ_MS")]
    pub timeout_header_read_ms: Option<u64>,
    /// Time a client has to send a request's body once its headers arrived, in ms; a slower
    /// one gets 408 and the connection is closed [default: 10000].
    #[arg(long, env = "KURZ_TIMEOUT_BODY_READ_MS")]
    pub timeout_body_read_ms: Option<u64>,
    /// Time an answer may wait for a client that does not read it, in ms; after that the
    /// connection is closed [default: 10000].
    #[arg(long, env = "KURZ_TIMEOUT_WRITE_MS")]
    pub timeout_write_ms: Option<u64>,
    /// How often the click counts that changed are made durable (appended to
    /// <data-dir>/clicks-changes.tsv and fsynced; all of them go to clicks.tsv when the changes
    /// outgrow it, and at shutdown), in ms: a kill -9 loses at most this much [default: 1000].
    #[arg(long, env = "KURZ_CLICKS_CHECKPOINT_MS")]
    pub clicks_checkpoint_ms: Option<u64>,
    /// How often click analytics (referrers, countries, user agents, time series) are flushed to
    /// their event log under <data-dir>/analytics, in ms; a kill -9 loses at most this much
    /// [default: 1000].
    #[arg(long, env = "KURZ_CLICK_LOG_FLUSH_MS")]
    pub click_log_flush_ms: Option<u64>,
    /// GeoIP2/GeoLite2-style country database (.mmdb) for the countries of clicks; read at start,
    /// never downloaded.
    #[arg(long, env = "KURZ_GEOIP_DB")]
    pub geoip_db: Option<PathBuf>,
    /// Also write every click, raw (code, time, referer, user agent, client IP, country,
    /// browser, OS, bot), as one JSON line to this file, for shipping clicks elsewhere; fsynced
    /// with the analytics, rotated by size to FILE.1 ... FILE.<kept>. Needs click analytics on.
    #[arg(long, env = "KURZ_CLICK_LOG")]
    pub click_log: Option<PathBuf>,
    /// Size at which the click log is rotated, in bytes [default: 104857600].
    #[arg(long, env = "KURZ_CLICK_LOG_FILE_BYTES_MAX")]
    pub click_log_file_bytes_max: Option<u64>,
    /// Rotated click log files kept besides the current one [default: 5].
    #[arg(long, env = "KURZ_CLICK_LOG_FILES_KEPT")]
    pub click_log_files_kept: Option<u32>,
    /// Request header a CDN in front sets to the client's country code (e.g. CF-IPCountry), used
    /// when no database is configured or it does not know the address.
    #[arg(long, env = "KURZ_COUNTRY_HEADER")]
    pub country_header: Option<String>,
    /// Write a snapshot (and drop the WAL it covers) after this many writes [default: 1000000].
    #[arg(long, env = "KURZ_SNAPSHOT_EVERY_RECORDS")]
    pub snapshot_every_records: Option<u64>,
    /// Write a snapshot when the last one is this old and anything was written since, in
    /// seconds [default: 3600].
    #[arg(long, env = "KURZ_SNAPSHOT_AGE_MAX_S")]
    pub snapshot_age_max_s: Option<u64>,
    /// Turn the click analytics pipeline off (exact counts and caps stay on): no referrers,
    /// countries, user agents or time series, and no per-click hand-off on the redirect path.
    #[arg(long, env = "KURZ_NO_CLICK_ANALYTICS", value_parser = BoolishValueParser::new())]
    pub no_click_analytics: bool,
    /// Serve the public listener with hyper alone on the async runtime, without the event loops
    /// and lean HTTP/1.1 path that answer plain GET/HEAD /{code} requests themselves (for
    /// comparison and debugging).
    #[arg(long, env = "KURZ_HYPER_ONLY", value_parser = BoolishValueParser::new())]
    pub hyper_only: bool,
    /// Cluster mode: NATS servers (comma-separated URLs, any of the cluster's) whose JetStream
    /// stream is the cluster's write log. Without it kurz runs single-node with its local WAL.
    /// With it, --fsync does not apply: a write is acknowledged once JetStream has it on a
    /// quorum of servers and this node has applied it.
    #[arg(long, env = "KURZ_NATS", value_delimiter = ',')]
    pub nats: Option<Vec<String>>,
    /// Cluster mode: JetStream stream holding the link records (one per cluster)
    /// [default: KURZ_LINKS].
    #[arg(long, env = "KURZ_NATS_STREAM")]
    pub nats_stream: Option<String>,
    /// Cluster mode: JetStream replicas of the link stream, the clicks stream and the snapshot
    /// bucket; 3 in a 3-server NATS cluster (only the node that creates a stream sets it)
    /// [default: 3].
    #[arg(long, env = "KURZ_NATS_REPLICAS")]
    pub nats_replicas: Option<usize>,
    /// Cluster mode: how many shards the code space is cut into; the same on every node and in
    /// the load balancer's routing [default: 1].
    #[arg(long, env = "KURZ_SHARDS")]
    pub shards: Option<u32>,
    /// Cluster mode: comma-separated shards (0 to shards-1) this node holds and takes writes
    /// for [default: all].
    #[arg(long, env = "KURZ_SHARD_SET", value_delimiter = ',')]
    pub shard_set: Option<Vec<u32>>,
    /// Cluster mode: /readyz answers 503 while this node is more than this many records of its
    /// shards behind the stream [default: 1000].
    #[arg(long, env = "KURZ_READY_LAG_RECORDS_MAX")]
    pub ready_lag_records_max: Option<u64>,
    /// Cluster mode: how long a write waits for this node to apply its own acknowledged record
    /// before answering 503 (the write is durable then, the node lags), in ms [default: 10000].
    #[arg(long, env = "KURZ_CLUSTER_APPLY_WAIT_MS")]
    pub cluster_apply_wait_ms: Option<u64>,
    /// Cluster mode: how often this node publishes its click counts to the clicks stream, in ms;
    /// other nodes see its clicks (and enforce caps on them) this much later [default: 1000].
    #[arg(long, env = "KURZ_CLUSTER_CLICK_FLUSH_MS")]
    pub cluster_click_flush_ms: Option<u64>,
    /// On SIGTERM/SIGINT, how long in-flight requests may take before the store is closed
    /// anyway, in ms [default: 10000].
    #[arg(long, env = "KURZ_TIMEOUT_SHUTDOWN_MS")]
    pub timeout_shutdown_ms: Option<u64>,
}

impl ServeArgs {
    /// Fills every setting not given on the command line or in the environment from `file`.
    fn or(self, file: ServeArgs) -> ServeArgs {
        ServeArgs {
            config: self.config,
            data_dir: self.data_dir.or(file.data_dir),
            listen: self.listen.or(file.listen),
            admin_listen: self.admin_listen.or(file.admin_listen),
            keys: self.keys.or(file.keys),
            allow_anonymous_create: self.allow_anonymous_create || file.allow_anonymous_create,
            public_url: self.public_url.or(file.public_url),
            fsync: self.fsync.or(file.fsync),
            workers: self.workers.or(file.workers),
            redirect_status_default: self
                .redirect_status_default
                .or(file.redirect_status_default),
            cache_max_age_s: self.cache_max_age_s.or(file.cache_max_age_s),
            code_strategy: self.code_strategy.or(file.code_strategy),
            counter_node_id: self.counter_node_id.or(file.counter_node_id),
            counter_unpermuted: self.counter_unpermuted || file.counter_unpermuted,
            code_length: self.code_length.or(file.code_length),
            url_bytes_max: self.url_bytes_max.or(file.url_bytes_max),
            url_schemes: self.url_schemes.or(file.url_schemes),
            blocklist: self.blocklist.or(file.blocklist),
            reject_private_addresses: self.reject_private_addresses
                || file.reject_private_addresses,
            reserved_words: self.reserved_words.or(file.reserved_words),
            body_bytes_max: self.body_bytes_max.or(file.body_bytes_max),
            batch_body_bytes_max: self.batch_body_bytes_max.or(file.batch_body_bytes_max),
            rate_limit_per_s: self.rate_limit_per_s.or(file.rate_limit_per_s),
            rate_limit_burst: self.rate_limit_burst.or(file.rate_limit_burst),
            trusted_proxies: self.trusted_proxies.or(file.trusted_proxies),
            connections_max: self.connections_max.or(file.connections_max),
            timeout_header_read_ms: self.timeout_header_read_ms.or(file.timeout_header_read_ms),
            timeout_body_read_ms: self.timeout_body_read_ms.or(file.timeout_body_read_ms),
            timeout_write_ms: self.timeout_write_ms.or(file.timeout_write_ms),
            timeout_shutdown_ms: self.timeout_shutdown_ms.or(file.timeout_shutdown_ms),
            clicks_checkpoint_ms: self.clicks_checkpoint_ms.or(file.clicks_checkpoint_ms),
            click_log_flush_ms: self.click_log_flush_ms.or(file.click_log_flush_ms),
            geoip_db: self.geoip_db.or(file.geoip_db),
            click_log: self.click_log.or(file.click_log),
            click_log_file_bytes_max: self
                .click_log_file_bytes_max
                .or(file.click_log_file_bytes_max),
            click_log_files_kept: self.click_log_files_kept.or(file.click_log_files_kept),
            country_header: self.country_header.or(file.country_header),
            snapshot_every_records: self.snapshot_every_records.or(file.snapshot_every_records),
            snapshot_age_max_s: self.snapshot_age_max_s.or(file.snapshot_age_max_s),
            no_click_analytics: self.no_click_analytics || file.no_click_analytics,
            hyper_only: self.hyper_only || file.hyper_only,
            nats: self.nats.or(file.nats),
            nats_stream: self.nats_stream.or(file.nats_stream),
            nats_replicas: self.nats_replicas.or(file.nats_replicas),
            shards: self.shards.or(file.shards),
            shard_set: self.shard_set.or(file.shard_set),
            ready_lag_records_max: self.ready_lag_records_max.or(file.ready_lag_records_max),
            cluster_apply_wait_ms: self.cluster_apply_wait_ms.or(file.cluster_apply_wait_ms),
            cluster_click_flush_ms: self.cluster_click_flush_ms.or(file.cluster_click_flush_ms),
        }
    }
}

/// Everything `kurz serve` runs with, validated.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub keys_path: PathBuf,
    pub allow_anonymous_create: bool,
    /// Without a trailing '/'.
    pub public_url: String,
    /// False when `public_url` was derived from `--listen`; the server then rewrites it with the
    /// port actually bound (which matters for `--listen 127.0.0.1:0`).
    pub public_url_explicit: bool,
    pub fsync: FsyncPolicy,
    pub workers: usize,
    pub redirect_status_default: RedirectStatus,
    pub cache_max_age_s: u64,
    pub code_len: usize,
    pub code_strategy: CodeStrategy,
    pub counter_node_id: u16,
    pub counter_permuted: bool,
    pub url_rules: UrlRules,
    pub reserved_words: Vec<String>,
    pub body_bytes_max: usize,
    pub batch_body_bytes_max: usize,
    pub rate_limit_per_s: f64,
    pub rate_limit_burst: u32,
    pub trusted_proxies: Vec<IpAddr>,
    pub connections_max: usize,
    pub timeout_header_read_ms: u64,
    pub timeout_body_read_ms: u64,
    pub timeout_write_ms: u64,
    pub timeout_shutdown_ms: u64,
    pub clicks_checkpoint_ms: u64,
    pub click_log_flush_ms: u64,
    pub geoip_db: Option<PathBuf>,
    pub click_log: Option<crate::analytics::clicklog::ClickLogOptions>,
    /// Lower-case header name.
    pub country_header: Option<String>,
    pub snapshot_policy: crate::store::snapshotter::SnapshotPolicy,
    pub click_analytics: bool,
    pub hyper_only: bool,
    /// Cluster mode; None is single-node mode with the local WAL.
    pub cluster: Option<ClusterConfig>,
}

/// The settings of cluster mode (`--nats` and the flags that need it).
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub nats_urls: Vec<String>,
    pub stream_name: String,
    pub replicas: usize,
    pub shards: u32,
    /// Empty: every shard.
    pub shard_set: Vec<u32>,
    pub ready_lag_records_max: u64,
    pub apply_wait_ms: u64,
    pub click_flush_ms: u64,
}

impl ClusterConfig {
    /// The cluster node's options for a node keeping its data in `data_dir`.
    pub fn options(&self, data_dir: &Path) -> ClusterOptions {
        ClusterOptions {
            stream_name: self.stream_name.clone(),
            replicas: self.replicas,
            shards: self.shards,
            shard_set: self.shard_set.clone(),
            ready_lag_records_max: self.ready_lag_records_max,
            apply_wait_ms: self.apply_wait_ms,
            ..ClusterOptions::new(self.nats_urls.clone(), data_dir.to_owned())
        }
    }
}

/// The cluster settings, or None without `--nats`; refuses cluster flags without `--nats`.
fn cluster_config(args: &ServeArgs) -> Result<Option<ClusterConfig>, ConfigError> {
    let Some(urls) = &args.nats else {
        let given = [
            ("nats_stream", args.nats_stream.is_some()),
            ("nats_replicas", args.nats_replicas.is_some()),
            ("shards", args.shards.is_some()),
            ("shard_set", args.shard_set.is_some()),
            (
                "ready_lag_records_max",
                args.ready_lag_records_max.is_some(),
            ),
            (
                "cluster_apply_wait_ms",
                args.cluster_apply_wait_ms.is_some(),
            ),
            (
                "cluster_click_flush_ms",
                args.cluster_click_flush_ms.is_some(),
            ),
        ];
        return match given.iter().find(|(_, given)| *given) {
            Some((name, _)) => Err(invalid(
                name,
                "is a cluster-mode setting: give --nats URL[,URL...] too, or leave it out for single-node mode",
            )),
            None => Ok(None),
        };
    };
    let nats_urls: Vec<String> = urls
        .iter()
        .map(|url| url.trim().to_owned())
        .filter(|url| !url.is_empty())
        .collect();
    if nats_urls.is_empty() || nats_urls.len() > NATS_URLS_MAX {
        return Err(invalid(
            "nats",
            format!("give 1 to {NATS_URLS_MAX} NATS server URLs, e.g. nats://10.0.0.1:4222"),
        ));
    }
    let stream_name = args
        .nats_stream
        .clone()
        .unwrap_or_else(|| cluster::STREAM_NAME_DEFAULT.to_owned());
    if stream_name.is_empty()
        || !stream_name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
    {
        return Err(invalid(
            "nats_stream",
            "must be letters, digits, '_' and '-' (a JetStream stream name)",
        ));
    }
    let replicas = args.nats_replicas.unwrap_or(cluster::REPLICAS_DEFAULT);
    if !(1..=NATS_REPLICAS_MAX).contains(&replicas) {
        return Err(invalid(
            "nats_replicas",
            format!("must be 1 to {NATS_REPLICAS_MAX}"),
        ));
    }
    let shards = args.shards.unwrap_or(1);
    if !(1..=SHARDS_MAX).contains(&shards) {
        return Err(invalid("shards", format!("must be 1 to {SHARDS_MAX}")));
    }
    let shard_set = args.shard_set.clone().unwrap_or_default();
    if let Some(shard) = shard_set.iter().find(|shard| **shard >= shards) {
        return Err(invalid(
            "shard_set",
            format!(
                "shard {shard} does not exist: with --shards {shards} shards are 0 to {}",
                shards - 1
            ),
        ));
    }
    let click_flush_ms = args
        .cluster_click_flush_ms
        .unwrap_or(cluster::clicks::CLICK_FLUSH_MS_DEFAULT);
    if click_flush_ms < CLUSTER_CLICK_FLUSH_MS_MIN {
        return Err(invalid(
            "cluster_click_flush_ms",
            format!("must be at least {CLUSTER_CLICK_FLUSH_MS_MIN}"),
        ));
    }
    let apply_wait_ms = args
        .cluster_apply_wait_ms
        .unwrap_or(cluster::APPLY_WAIT_MS_DEFAULT);
    if apply_wait_ms == 0 {
        return Err(invalid("cluster_apply_wait_ms", "must be at least 1"));
    }
    Ok(Some(ClusterConfig {
        nats_urls,
        stream_name,
        replicas,
        shards,
        shard_set,
        ready_lag_records_max: args
            .ready_lag_records_max
            .unwrap_or(cluster::READY_LAG_RECORDS_MAX_DEFAULT),
        apply_wait_ms,
        click_flush_ms,
    }))
}

fn read_bounded(path: &Path, bytes_max: u64) -> Result<String, ConfigError> {
    let read_error = |cause| ConfigError::Read {
        path: path.to_owned(),
        cause,
    };
    let bytes = fs::metadata(path).map_err(read_error)?.len();
    if bytes > bytes_max {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
            bytes,
            max: bytes_max,
        });
    }
    fs::read_to_string(path).map_err(read_error)
}

/// Reads a blocklist: one domain per line, '#' comments and blank lines ignored.
pub fn read_blocklist(path: &Path) -> Result<HashSet<String>, ConfigError> {
    let text = read_bounded(path, BLOCKLIST_BYTES_MAX)?;
    Ok(text
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .map(|line| line.trim_end_matches('.').to_ascii_lowercase())
        .collect())
}

fn public_host(public_url: &str) -> Result<String, ConfigError> {
    let url = url::Url::parse(public_url)
        .map_err(|error| invalid("public_url", format!("{public_url:?}: {error}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("public_url", "must be an http or https URL"));
    }
    url.host_str()
        .map(|host| host.trim_matches(['[', ']']).to_ascii_lowercase())
        .ok_or_else(|| invalid("public_url", "must have a host"))
}

impl ServeConfig {
    /// Merges flags and environment (`args`) with the TOML file `args.config` names, applies the
    /// defaults, and checks every setting.
    pub fn load(args: ServeArgs) -> Result<ServeConfig, ConfigError> {
        let args = match &args.config {
            None => args,
            Some(path) => {
                let text = read_bounded(path, CONFIG_BYTES_MAX)?;
                let file: ServeArgs = toml::from_str(&text).map_err(|error| ConfigError::Toml {
                    path: path.clone(),
                    message: error.to_string(),
                })?;
                args.or(file)
            }
        };
        ServeConfig::validate(args)
    }

    fn validate(args: ServeArgs) -> Result<ServeConfig, ConfigError> {
        let cluster = cluster_config(&args)?;
        let data_dir = args
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DATA_DIR_DEFAULT));
        let listen = match args.listen {
            Some(listen) => listen,
            None => LISTEN_DEFAULT
                .parse()
                .map_err(|_| invalid("listen", LISTEN_DEFAULT))?,
        };
        let admin_listen = match args.admin_listen {
            Some(listen) => listen,
            None => ADMIN_LISTEN_DEFAULT
                .parse()
                .map_err(|_| invalid("admin_listen", ADMIN_LISTEN_DEFAULT))?,
        };
        if listen == admin_listen && listen.port() != 0 {
            return Err(invalid(
                "admin_listen",
                "must differ from --listen: the admin API is never served on the public listener",
            ));
        }
        let keys_path = args.keys.unwrap_or_else(|| data_dir.join(KEYS_FILE_NAME));
        let public_url_explicit = args.public_url.is_some();
        let public_url = args
            .public_url
            .unwrap_or_else(|| format!("http://{listen}"))
            .trim_end_matches('/')
            .to_owned();
        let own_host = public_host(&public_url)?;
        let fsync = match args.fsync {
            None => FsyncPolicy::Always,
            Some(text) => text.parse().map_err(|message| invalid("fsync", message))?,
        };
        let workers = args
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if !(1..=WORKERS_MAX).contains(&workers) {
            return Err(invalid("workers", format!("must be 1 to {WORKERS_MAX}")));
        }
        let redirect_status_default = match args.redirect_status_default {
            None => RedirectStatus::Found,
            Some(code) => RedirectStatus::from_code(code).ok_or_else(|| {
                invalid("redirect_status_default", "must be 301, 302, 307 or 308")
            })?,
        };
        let code_len = args.code_length.unwrap_or(CODE_LEN_DEFAULT);
        if !(1..=CODE_BYTES_MAX).contains(&code_len) {
            return Err(invalid(
                "code_length",
                format!("must be 1 to {CODE_BYTES_MAX}"),
            ));
        }
        let counter_node_id = args.counter_node_id.unwrap_or(0);
        if counter_node_id > COUNTER_NODE_ID_MAX {
            return Err(invalid(
                "counter_node_id",
                format!("must be 0 to {COUNTER_NODE_ID_MAX}"),
            ));
        }
        let url_bytes_max = args.url_bytes_max.unwrap_or(URL_BYTES_MAX_DEFAULT);
        if !(16..=64 * 1024).contains(&url_bytes_max) {
            return Err(invalid("url_bytes_max", "must be 16 to 65536"));
        }
        let domains_blocked = match &args.blocklist {
            None => HashSet::new(),
            Some(path) => read_blocklist(path)?,
        };
        let reserved_words = args
            .reserved_words
            .map(|words| {
                words
                    .into_iter()
                    .map(|word| word.trim().to_owned())
                    .filter(|word| !word.is_empty())
                    .collect()
            })
            .unwrap_or_else(validate::reserved_words_default);
        let body_bytes_max = args.body_bytes_max.unwrap_or(BODY_BYTES_MAX_DEFAULT);
        let batch_body_bytes_max = args
            .batch_body_bytes_max
            .unwrap_or(BATCH_BODY_BYTES_MAX_DEFAULT);
        if body_bytes_max < 256 || batch_body_bytes_max < 256 {
            return Err(invalid(
                "body_bytes_max",
                "body limits must be at least 256 bytes",
            ));
        }
        let rate_limit_per_s = args.rate_limit_per_s.unwrap_or(RATE_LIMIT_PER_S_DEFAULT);
        if !(rate_limit_per_s.is_finite() && rate_limit_per_s > 0.0) {
            return Err(invalid("rate_limit_per_s", "must be a positive number"));
        }
        let rate_limit_burst = args.rate_limit_burst.unwrap_or(RATE_LIMIT_BURST_DEFAULT);
        if rate_limit_burst == 0 {
            return Err(invalid("rate_limit_burst", "must be at least 1"));
        }
        let connections_max = args.connections_max.unwrap_or(CONNECTIONS_MAX_DEFAULT);
        if connections_max == 0 {
            return Err(invalid("connections_max", "must be at least 1"));
        }
        let timeout_header_read_ms = args
            .timeout_header_read_ms
            .unwrap_or(TIMEOUT_HEADER_READ_MS_DEFAULT);
        if timeout_header_read_ms == 0 {
            return Err(invalid("timeout_header_read_ms", "must be at least 1"));
        }
        let timeout_body_read_ms = args
            .timeout_body_read_ms
            .unwrap_or(TIMEOUT_BODY_READ_MS_DEFAULT);
        let timeout_write_ms = args.timeout_write_ms.unwrap_or(TIMEOUT_WRITE_MS_DEFAULT);
        if timeout_body_read_ms == 0 || timeout_write_ms == 0 {
            return Err(invalid(
                "timeout_body_read_ms",
                "timeout_body_read_ms and timeout_write_ms must be at least 1",
            ));
        }
        let schemes_allowed = match args.url_schemes {
            Some(schemes) => url_schemes(schemes)?,
            None => UrlRules::default().schemes_allowed,
        };
        let clicks_checkpoint_ms = args
            .clicks_checkpoint_ms
            .unwrap_or(CLICKS_CHECKPOINT_MS_DEFAULT);
        if clicks_checkpoint_ms < CLICKS_CHECKPOINT_MS_MIN {
            return Err(invalid(
                "clicks_checkpoint_ms",
                format!("must be at least {CLICKS_CHECKPOINT_MS_MIN}"),
            ));
        }
        let click_log_flush_ms = args
            .click_log_flush_ms
            .unwrap_or(CLICK_LOG_FLUSH_MS_DEFAULT);
        if click_log_flush_ms < CLICK_LOG_FLUSH_MS_MIN {
            return Err(invalid(
                "click_log_flush_ms",
                format!("must be at least {CLICK_LOG_FLUSH_MS_MIN}"),
            ));
        }
        let click_log_file_bytes_max = args
            .click_log_file_bytes_max
            .unwrap_or(CLICK_LOG_FILE_BYTES_MAX_DEFAULT);
        if click_log_file_bytes_max < CLICK_LOG_FILE_BYTES_MAX_MIN {
            return Err(invalid(
                "click_log_file_bytes_max",
                format!("must be at least {CLICK_LOG_FILE_BYTES_MAX_MIN}"),
            ));
        }
        let click_log = match args.click_log {
            Some(_) if args.no_click_analytics => {
                return Err(invalid(
                    "click_log",
                    "needs click analytics; drop no_click_analytics",
                ))
            }
            Some(path) => Some(crate::analytics::clicklog::ClickLogOptions {
                path,
                file_bytes_max: click_log_file_bytes_max,
                files_kept: args
                    .click_log_files_kept
                    .unwrap_or(CLICK_LOG_FILES_KEPT_DEFAULT),
            }),
            None => None,
        };
        let country_header = match args.country_header {
            Some(name) if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() => {
                return Err(invalid("country_header", "is not a valid header name"));
            }
            name => name.map(|name| name.to_ascii_lowercase()),
        };
        let snapshot_every_records = args
            .snapshot_every_records
            .unwrap_or(SNAPSHOT_EVERY_RECORDS_DEFAULT);
        let snapshot_age_max_s = args
            .snapshot_age_max_s
            .unwrap_or(SNAPSHOT_AGE_MAX_S_DEFAULT);
        if snapshot_every_records == 0 || snapshot_age_max_s == 0 {
            return Err(invalid(
                "snapshot_every_records",
                "snapshot_every_records and snapshot_age_max_s must be at least 1",
            ));
        }
        Ok(ServeConfig {
            data_dir,
            listen,
            admin_listen,
            keys_path,
            allow_anonymous_create: args.allow_anonymous_create,
            public_url,
            public_url_explicit,
            fsync,
            workers,
            redirect_status_default,
            cache_max_age_s: args.cache_max_age_s.unwrap_or(CACHE_MAX_AGE_S_DEFAULT),
            code_len,
            code_strategy: args.code_strategy.unwrap_or_default(),
            counter_node_id,
            counter_permuted: !args.counter_unpermuted,
            url_rules: UrlRules {
                url_bytes_max,
                schemes_allowed,
                domains_blocked,
                own_hosts: vec![own_host],
                reject_private_addresses: args.reject_private_addresses,
            },
            reserved_words,
            body_bytes_max,
            batch_body_bytes_max,
            rate_limit_per_s,
            rate_limit_burst,
            trusted_proxies: args.trusted_proxies.unwrap_or_default(),
            connections_max,
            timeout_header_read_ms,
            timeout_body_read_ms,
            timeout_write_ms,
            timeout_shutdown_ms: args
                .timeout_shutdown_ms
                .unwrap_or(TIMEOUT_SHUTDOWN_MS_DEFAULT),
            clicks_checkpoint_ms,
            click_log_flush_ms,
            geoip_db: args.geoip_db,
            click_log,
            country_header,
            snapshot_policy: crate::store::snapshotter::SnapshotPolicy {
                wal_records_max: snapshot_every_records,
                age_max: std::time::Duration::from_secs(snapshot_age_max_s),
            },
            click_analytics: !args.no_click_analytics,
            hyper_only: args.hyper_only,
            cluster,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let config = ServeConfig::load(ServeArgs::default()).expect("defaults");
        assert_eq!(config.listen.to_string(), LISTEN_DEFAULT);
        assert_eq!(config.public_url, "http://127.0.0.1:8080");
        assert_eq!(config.keys_path, Path::new("./data/keys"));
        assert_eq!(config.fsync, FsyncPolicy::Always);
        assert_eq!(config.url_rules.own_hosts, vec!["127.0.0.1".to_owned()]);
    }

    #[test]
    fn flags_win_over_the_file() {
        let file: ServeArgs = toml::from_str(
            "listen = \"127.0.0.1:9000\"\ncode_length = 9\nreserved_words = [\"x\"]\n",
        )
        .expect("toml");
        let flags = ServeArgs {
            code_length: Some(5),
            ..ServeArgs::default()
        };
        let config = ServeConfig::validate(flags.or(file)).expect("valid");
        assert_eq!(config.code_len, 5);
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.reserved_words, vec!["x".to_owned()]);
    }

    #[test]
    fn the_example_config_is_valid() {
        let file: ServeArgs =
            toml::from_str(include_str!("../deploy/kurz.toml")).expect("deploy/kurz.toml parses");
        let config = ServeConfig::validate(file).expect("deploy/kurz.toml is valid");
        assert_eq!(config.public_url, "https://sho.rt");
        assert_eq!(config.url_rules.own_hosts, vec!["sho.rt".to_owned()]);
    }

    #[test]
    fn refuses_bad_settings() {
        let bad = |args: ServeArgs| ServeConfig::validate(args).is_err();
        assert!(bad(ServeArgs {
            fsync: Some("sometimes".into()),
            ..ServeArgs::default()
        }));
        assert!(bad(ServeArgs {
            redirect_status_default: Some(303),
            ..ServeArgs::default()
        }));
        assert!(bad(ServeArgs {
            public_url: Some("ftp://x".into()),
            ..ServeArgs::default()
        }));
        assert!(toml::from_str::<ServeArgs>("no_such_setting = 1").is_err());
        for schemes in [
            vec!["https", "javascript"],
            vec!["1http"],
            vec![" "],
            vec!["DATA"],
        ] {
            assert!(
                bad(ServeArgs {
                    url_schemes: Some(schemes.iter().map(|s| s.to_string()).collect()),
                    ..ServeArgs::default()
                }),
                "{schemes:?}"
            );
        }
        assert!(bad(ServeArgs {
            timeout_write_ms: Some(0),
            ..ServeArgs::default()
        }));
    }

    #[test]
    fn url_schemes_can_be_widened_but_never_to_code() {
        let config = ServeConfig::validate(ServeArgs {
            url_schemes: Some(vec!["HTTPS".into(), "ftp".into()]),
            ..ServeArgs::default()
        })
        .expect("valid");
        let rules = &config.url_rules;
        assert_eq!(rules.schemes_allowed, vec!["https", "ftp"]);
        assert!(crate::links::validate::long_url("ftp://files.example.com/a", rules).is_ok());
        assert!(crate::links::validate::long_url("http://example.com/", rules).is_err());
    }

    #[test]
    fn boolean_settings_take_the_usual_spellings_from_the_environment() {
        let command = <ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"));
        let flags: Vec<&clap::Arg> = command
            .get_arguments()
            .filter(|arg| matches!(arg.get_action(), clap::ArgAction::SetTrue))
            .collect();
        assert_eq!(flags.len(), 5, "every on/off setting");
        for arg in flags {
            // A variable of this test's own, so no other test sees it change (clap keeps names
            // as `&'static str`; five small leaks in a test).
            let variable: &'static str =
                Box::leak(format!("KURZ_TEST_BOOLISH_{}", arg.get_id()).into_boxed_str());
            for (value, expected) in [
                ("1", true),
                ("yes", true),
                ("on", true),
                ("0", false),
                ("false", false),
            ] {
                std::env::set_var(variable, value);
                // clap reads the variable when the argument is given it.
                let alone = clap::Command::new("serve").arg((*arg).clone().env(variable));
                let matches = alone
                    .try_get_matches_from(["serve"])
                    .unwrap_or_else(|error| panic!("{variable}={value}: {error}"));
                assert_eq!(
                    matches.get_flag(arg.get_id().as_str()),
                    expected,
                    "{variable}={value}"
                );
            }
            std::env::remove_var(variable);
        }
    }

    #[test]
    fn the_example_config_names_every_setting() {
        let text = include_str!("../deploy/kurz.toml");
        let command = <ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"));
        for arg in command.get_arguments() {
            let key = arg.get_id().as_str();
            if key == "config" {
                continue;
            }
            let named = text.lines().any(|line| {
                line.trim_start_matches(['#', ' '])
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            });
            assert!(named, "deploy/kurz.toml does not mention {key}");
        }
    }

    #[test]
    fn cluster_mode_needs_nats() {
        let single = ServeConfig::validate(ServeArgs::default()).expect("valid");
        assert!(single.cluster.is_none(), "single-node mode is the default");
        let without_nats = ServeConfig::validate(ServeArgs {
            shard_set: Some(vec![0]),
            ..ServeArgs::default()
        });
        assert!(
            matches!(
                &without_nats,
                Err(ConfigError::Invalid {
                    name: "shard_set",
                    ..
                })
            ),
            "{without_nats:?}"
        );
        let cluster = ServeConfig::validate(ServeArgs {
            nats: Some(vec!["nats://a:4222".into(), " nats://b:4222 ".into()]),
            shards: Some(4),
            shard_set: Some(vec![1, 3]),
            ..ServeArgs::default()
        })
        .expect("valid")
        .cluster
        .expect("cluster mode");
        assert_eq!(cluster.nats_urls, ["nats://a:4222", "nats://b:4222"]);
        assert_eq!(cluster.replicas, crate::cluster::REPLICAS_DEFAULT);
        let options = cluster.options(Path::new("/d"));
        assert_eq!((options.shards, options.shard_set), (4, vec![1, 3]));
    }

    #[test]
    fn refuses_bad_cluster_settings() {
        let nats = || Some(vec!["nats://a:4222".to_owned()]);
        let refused = |args: ServeArgs| match ServeConfig::validate(args) {
            Err(ConfigError::Invalid { name, .. }) => name,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(
            refused(ServeArgs {
                nats: nats(),
                shards: Some(2),
                shard_set: Some(vec![2]),
                ..ServeArgs::default()
            }),
            "shard_set"
        );
        assert_eq!(
            refused(ServeArgs {
                nats: nats(),
                shards: Some(0),
                ..ServeArgs::default()
            }),
            "shards"
        );
        assert_eq!(
            refused(ServeArgs {
                nats: Some(vec![" ".into()]),
                ..ServeArgs::default()
            }),
            "nats"
        );
        assert_eq!(
            refused(ServeArgs {
                nats: nats(),
                nats_replicas: Some(0),
                ..ServeArgs::default()
            }),
            "nats_replicas"
        );
        assert_eq!(
            refused(ServeArgs {
                nats: nats(),
                nats_stream: Some("a.b".into()),
                ..ServeArgs::default()
            }),
            "nats_stream"
        );
    }
}
