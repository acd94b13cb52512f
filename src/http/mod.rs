//! The HTTP layer: listeners and connections (`server`), the redirect hot path (`redirect`), the
//! JSON API (`api`), the admin listener (`admin`), and the shared state they all answer from
//! ([`App`]). Turns requests into calls on `links`, the link service (writes) and the store
//! (reads); never touches a data file.

pub mod admin;
pub mod api;
pub mod fast;
pub mod lean_loop;
pub mod ratelimit;
pub mod redirect;
pub mod server;
pub mod slow_client;

use std::sync::OnceLock;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::StatusCode;

use crate::analytics::pipeline::{ClickEvent, ClickPipeline, EventBatch};
use crate::analytics::{ClickCounters, ClickStats};
use crate::auth::{AuthError, Keys};
use crate::cluster::{ClusterError, Readiness};
use crate::config::{ConfigError, ServeConfig};
use crate::links::codegen::CounterCodes;
use crate::metrics::Metrics;
use crate::service::LinkService;
use crate::store::{Store, StoreError};
use ratelimit::RateLimiter;

pub type Body = Full<Bytes>;
pub type Response = hyper::Response<Body>;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Keys(#[from] AuthError),
    #[error("cannot listen on {addr}: {cause} (is another process using the port?)")]
    Bind {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot join the cluster: {0}")]
    Cluster(#[from] ClusterError),
    #[error("data dir {dir} belongs to a cluster node (it holds {marker}): its snapshot counts stream records, not local WAL records; start kurz serve with --nats, or use another --data-dir for single-node mode")]
    ClusterDataDir {
        dir: std::path::PathBuf,
        marker: &'static str,
    },
    #[error(transparent)]
    Clicks(#[from] crate::analytics::ClicksError),
    #[error(transparent)]
    Analytics(#[from] crate::analytics::pipeline::AnalyticsError),
    #[error(transparent)]
    Geo(#[from] crate::analytics::geo::GeoError),
    #[error("the store opener stopped unexpectedly: {0}")]
    Opener(String),
}

/// Everything a request handler may use. Shared by all connections of both listeners.
pub struct App {
    pub config: ServeConfig,
    /// Set once the store is open and the WAL replayed (single-node) or the node has joined the
    /// cluster; until then /readyz and data calls say 503.
    links: OnceLock<LinkService>,
    /// The click analytics pipeline, set when the store opens.
    analytics: OnceLock<ClickPipeline>,
    pub clicks: ClickCounters,
    pub metrics: Metrics,
    pub keys: Keys,
    pub limiter: RateLimiter,
    /// Ids for `--code-strategy counter`.
    pub counter: CounterCodes,
    /// `public, max-age=N` for 301 and 308, built once.
    cache_control_permanent: HeaderValue,
    pub started_at: Instant,
}

impl App {
    pub fn new(config: ServeConfig, keys: Keys) -> App {
        let cache_control_permanent =
            HeaderValue::from_str(&format!("public, max-age={}", config.cache_max_age_s))
                .unwrap_or(HeaderValue::from_static("public, max-age=86400"));
        App {
            limiter: RateLimiter::new(config.rate_limit_per_s, config.rate_limit_burst),
            counter: CounterCodes::new(config.counter_node_id, config.counter_permuted),
            config,
            links: OnceLock::new(),
            analytics: OnceLock::new(),
            clicks: ClickCounters::default(),
            metrics: Metrics::default(),
            keys,
            cache_control_permanent,
            started_at: Instant::now(),
        }
    }

    /// The store every read goes to, once it is open (in cluster mode: the node's follower
    /// store).
    pub fn store(&self) -> Option<&Store> {
        self.links.get().map(LinkService::store)
    }

    /// The link service every write goes through, once the store is open.
    pub fn links(&self) -> Option<&LinkService> {
        self.links.get()
    }

    /// Hands the link service over once its store is open; returns false (and drops `links`)
    /// if one was set before.
    pub fn set_links(&self, links: LinkService) -> bool {
        self.links.set(links).is_ok()
    }

    /// The cap a click on `code` is judged against by this node's counters, which count only
    /// this node's clicks: the link's cap less the clicks the rest of the cluster has served, as
    /// far as this node has heard (cluster mode), else the cap itself.
    pub fn click_cap(&self, code: &str, cap: Option<u64>) -> Option<u64> {
        let cap = cap?;
        match self.links.get().and_then(LinkService::cluster) {
            None => Some(cap),
            Some(cluster) => Some(cap.saturating_sub(cluster.clicks.elsewhere(code))),
        }
    }

    /// Clicks of `code`: this node's exact count, or in cluster mode the whole cluster's total
    /// as far as this node has heard (`last_clicked_at` stays this node's).
    pub fn click_stats(&self, code: &str) -> ClickStats {
        let local = self.clicks.stats(code);
        match self.links.get().and_then(LinkService::cluster) {
            None => local,
            Some(cluster) => ClickStats {
                clicks: cluster.clicks.total(code),
                ..local
            },
        }
    }

    /// Whether `code` belongs to a shard this node does not hold (cluster mode with shards).
    pub fn misdirected(&self, code: &str) -> bool {
        self.links.get().is_some_and(|links| !links.holds(code))
    }

    /// The click analytics pipeline, once it runs.
    pub fn analytics(&self) -> Option<&ClickPipeline> {
        self.analytics.get()
    }

    /// Hands the pipeline over once it runs; returns false (and drops it) if one was set before.
    pub fn set_analytics(&self, pipeline: ClickPipeline) -> bool {
        self.analytics.set(pipeline).is_ok()
    }

    /// Takes the link service and the analytics pipeline back for closing.
    pub fn into_parts(self) -> (Option<LinkService>, Option<ClickPipeline>) {
        (self.links.into_inner(), self.analytics.into_inner())
    }

    /// Hands a served click to the analytics pipeline without blocking (a no-op until it runs),
    /// or gathers it into the caller's batch (see [`ClickEvents`]). The pipeline keeps at most
    /// [`HEADER_BYTES_MAX`](crate::analytics::pipeline::HEADER_BYTES_MAX) bytes of each header.
    pub fn record_click(
        &self,
        code: &str,
        now_s: i64,
        click: &redirect::ClickContext<'_>,
        events: ClickEvents<'_>,
    ) {
        if let Some(links) = self.links.get() {
            links.record_click(code);
        }
        let Some(pipeline) = self.analytics.get() else {
            return;
        };
        let forwarded_for = click
            .forwarded_for
            .filter(|value| value.len() <= FORWARDED_FOR_BYTES_MAX)
            .and_then(|value| std::str::from_utf8(value).ok())
            .unwrap_or("");
        let event = ClickEvent {
            code,
            at_s: now_s,
            referer: click.referer,
            user_agent: click.user_agent,
            client_ip: click
                .peer
                .map(|peer| client_ip(&self.config.trusted_proxies, forwarded_for, peer)),
            country_header: click.country,
        };
        match events {
            ClickEvents::Direct => pipeline.record(&event),
            ClickEvents::Gathered(batch) => pipeline.gather(batch, &event),
        }
    }

    /// Hands the clicks gathered in `batch` to the analytics pipeline and empties it.
    pub fn hand_over_clicks(&self, batch: &mut EventBatch) {
        if let Some(pipeline) = self.analytics.get() {
            pipeline.record_batch(batch);
        }
    }
}

/// Where the analytics event of a served click goes.
pub enum ClickEvents<'a> {
    /// To the pipeline at once: one lock of the thread's lane per click.
    Direct,
    /// Into the caller's batch, which it hands over with [`App::hand_over_clicks`] once it has
    /// answered a round of requests: one lock per round.
    Gathered(&'a mut EventBatch),
}

/// Longest X-Forwarded-For worth reading; a longer one is ignored.
pub const FORWARDED_FOR_BYTES_MAX: usize = 1024;

/// The client's address: the peer, or, when the peer is a trusted proxy, the right-most address
/// in `forwarded_for` (X-Forwarded-For values joined by ',') that is not itself a trusted proxy.
pub fn client_ip(
    trusted: &[std::net::IpAddr],
    forwarded_for: &str,
    peer: std::net::IpAddr,
) -> std::net::IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    forwarded_for
        .rsplit(',')
        .filter_map(|entry| entry.trim().parse::<std::net::IpAddr>().ok())
        .find(|address| !trusted.contains(address))
        .unwrap_or(peer)
}

pub use crate::timefmt::{now_s, rfc3339};

/// Unix seconds of an RFC 3339 timestamp, if it is one.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    crate::timefmt::parse_rfc3339(text).ok()
}

/// Whether the client says it accepts JSON.
pub fn accepts_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json") || accept.contains("+json"))
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response {
    let mut response = hyper::Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A JSON answer.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut body = value.to_string().into_bytes();
    body.push(b'\n');
    response(status, "application/json", Bytes::from(body))
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response {
    response(status, "text/plain; charset=utf-8", body.into())
}

/// The `{"error","code"}` answer every API error carries.
pub fn error_json(status: StatusCode, code: &str, message: &str) -> Response {
    json(
        status,
        &serde_json::json!({ "error": message, "code": code }),
    )
}

/// The 405 of a route that exists but does not answer the request's method.
pub fn method_not_allowed() -> Response {
    error_json(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not answer that method",
    )
}

/// An error as JSON when the client accepts it, else as text.
pub fn error_for(headers: &HeaderMap, status: StatusCode, code: &str, message: &str) -> Response {
    if accepts_json(headers) {
        error_json(status, code, message)
    } else {
        text(status, format!("{message}\n"))
    }
}

/// `/healthz`: the process answers.
pub fn healthz() -> Response {
    text(StatusCode::OK, "ok\n")
}

/// `/readyz`: 200 once the store is open and the WAL replayed, 503 before. In cluster mode, 503
/// also while the node lags the stream by more than its bound or its follower failed; a node
/// cut off from NATS stays ready and serves what it has applied (see [`Readiness`]).
pub fn readyz(app: &App) -> Response {
    let unavailable =
        |reason: String| error_json(StatusCode::SERVICE_UNAVAILABLE, "not_ready", &reason);
    let Some(links) = app.links() else {
        return unavailable(match app.config.cluster {
            None => "not ready: the store is opening".into(),
            Some(_) => "not ready: joining the cluster (connecting to NATS)".into(),
        });
    };
    let Some(cluster) = links.cluster() else {
        return text(StatusCode::OK, "ready\n");
    };
    match cluster.node.readiness() {
        Readiness::Ready => text(StatusCode::OK, "ready\n"),
        Readiness::Disconnected => text(
            StatusCode::OK,
            "ready: not following the link stream right now (NATS unreachable?); serving what was applied, writes fail\n",
        ),
        Readiness::Starting => unavailable("not ready: subscribing to the link stream".into()),
        Readiness::Lagging {
            lag_records,
            lag_records_max,
        } => unavailable(format!(
            "not ready: {lag_records} records behind the link stream (the bound is {lag_records_max})"
        )),
        Readiness::Failed(reason) => {
            unavailable(format!("not ready: the stream follower stopped: {reason}"))
        }
    }
}
