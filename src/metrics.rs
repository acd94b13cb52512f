//! The Prometheus registry: counters and a latency histogram kept in plain atomics, rendered in
//! the Prometheus text format. Owns the metric names; never reads the store (the admin handler
//! passes in the store's gauges when it renders).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// The routes requests are counted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Redirect,
    Shorten,
    ShortenBatch,
    UrlGet,
    UrlPatch,
    UrlDelete,
    UrlQr,
    Stats,
    OpenApi,
    Health,
    Ready,
    Metrics,
    AdminSnapshot,
    AdminReload,
    AdminInfo,
    Other,
}

const ROUTES: [(Route, &str); 16] = [
    (Route::Redirect, "redirect"),
    (Route::Shorten, "shorten"),
    (Route::ShortenBatch, "shorten_batch"),
    (Route::UrlGet, "url_get"),
    (Route::UrlPatch, "url_patch"),
    (Route::UrlDelete, "url_delete"),
    (Route::UrlQr, "url_qr"),
    (Route::Stats, "stats"),
    (Route::OpenApi, "openapi"),
    (Route::Health, "healthz"),
    (Route::Ready, "readyz"),
    (Route::Metrics, "metrics"),
    (Route::AdminSnapshot, "admin_snapshot"),
    (Route::AdminReload, "admin_reload"),
    (Route::AdminInfo, "admin_info"),
    (Route::Other, "other"),
];

/// The statuses counted one by one; any other lands in the last slot, labelled "other".
const STATUSES: [u16; 23] = [
    200, 201, 204, 301, 302, 307, 308, 400, 401, 403, 404, 405, 409, 410, 413, 415, 421, 429, 431,
    500, 503, 504, 0,
];

/// Upper bounds of the redirect latency buckets, in microseconds.
const LATENCY_BUCKETS_US: [u64; 12] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 100_000,
];

fn status_slot(status: u16) -> usize {
    STATUSES
        .iter()
        .position(|known| *known == status)
        .unwrap_or(STATUSES.len() - 1)
}

/// Gauges that belong to the store, read by the caller at render time.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreGauges {
    pub ready: bool,
    pub links_live: u64,
    pub overlay_links: u64,
    pub snapshot_covered_seq: u64,
    pub snapshot_links: u64,
    pub snapshot_age_s: u64,
    pub snapshot_file_bytes: u64,
    /// The snapshot file's format version (0 before the store is open).
    pub snapshot_format: u32,
    pub wal_last_seq: u64,
    pub wal_records_total: u64,
    pub wal_batches_total: u64,
    pub wal_fsyncs_total: u64,
    pub wal_fsync_us_total: u64,
    pub wal_fsync_us_last: u64,
    pub wal_batch_records_last: u64,
    pub wal_broken: bool,
    pub clicks_total: u64,
    /// The click analytics pipeline's counters (zero until it runs).
    pub analytics: crate::analytics::pipeline::PipelineCounters,
    /// Cluster mode only.
    pub cluster: Option<ClusterGauges>,
}

/// A cluster node's place in the link stream.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClusterGauges {
    pub applied_seq: u64,
    /// `u64::MAX` until the follower first subscribed.
    pub lag_records: u64,
    pub following: bool,
    /// Whether /readyz says 200.
    pub serving: bool,
    pub clicks_folded_seq: u64,
}

pub struct Metrics {
    requests: Vec<AtomicU64>,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_US.len()],
    latency_count: AtomicU64,
    latency_us_sum: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: (0..ROUTES.len() * STATUSES.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            latency_buckets: Default::default(),
            latency_count: AtomicU64::new(0),
            latency_us_sum: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn request(&self, route: Route, status: u16) {
        let route_slot = route as usize;
        if let Some(counter) = self
            .requests
            .get(route_slot * STATUSES.len() + status_slot(status))
        {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records the time one redirect took to answer.
    pub fn redirect_latency(&self, latency_us: u64) {
        if let Some(slot) = LATENCY_BUCKETS_US.iter().position(|le| latency_us <= *le) {
            self.latency_buckets[slot].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_us_sum.fetch_add(latency_us, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self, gauges: &StoreGauges) -> String {
        let mut out = String::with_capacity(8 * 1024);
        out.push_str(
            "# HELP kurz_http_requests_total HTTP requests answered, by route and status.\n",
        );
        out.push_str("# TYPE kurz_http_requests_total counter\n");
        for (route_slot, (_, route)) in ROUTES.iter().enumerate() {
            for (status_slot, status) in STATUSES.iter().enumerate() {
                let count = self.requests[route_slot * STATUSES.len() + status_slot]
                    .load(Ordering::Relaxed);
                if count == 0 {
                    continue;
                }
                let status = if *status == 0 {
                    "other".to_owned()
                } else {
                    status.to_string()
                };
                let _ = writeln!(
                    out,
                    "kurz_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}"
                );
            }
        }
        out.push_str(
            "# HELP kurz_redirect_latency_seconds Time from request to redirect answer (the lean path times every 8th request of a connection).\n",
        );
        out.push_str("# TYPE kurz_redirect_latency_seconds histogram\n");
        let mut cumulative = 0;
        for (slot, le_us) in LATENCY_BUCKETS_US.iter().enumerate() {
            cumulative += self.latency_buckets[slot].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "kurz_redirect_latency_seconds_bucket{{le=\"{}\"}} {cumulative}",
                *le_us as f64 / 1e6
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "kurz_redirect_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "kurz_redirect_latency_seconds_sum {}",
            self.latency_us_sum.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "kurz_redirect_latency_seconds_count {count}");
        let wal_fsync_s_total = gauges.wal_fsync_us_total as f64 / 1e6;
        let wal_fsync_s_last = gauges.wal_fsync_us_last as f64 / 1e6;
        let simple: [(&str, &str, &str, String); 20] = [
            (
                "kurz_ready",
                "gauge",
                "1 once the store is open and the WAL replayed.",
                u8::from(gauges.ready).to_string(),
            ),
            (
                "kurz_links_live",
                "gauge",
                "Links that are not deleted.",
                gauges.links_live.to_string(),
            ),
            (
                "kurz_overlay_links",
                "gauge",
                "Links written since the snapshot.",
                gauges.overlay_links.to_string(),
            ),
            (
                "kurz_snapshot_covered_seq",
                "gauge",
                "WAL sequence number the snapshot covers.",
                gauges.snapshot_covered_seq.to_string(),
            ),
            (
                "kurz_snapshot_links",
                "gauge",
                "Links in the snapshot file.",
                gauges.snapshot_links.to_string(),
            ),
            (
                "kurz_snapshot_age_seconds",
                "gauge",
                "Seconds since the snapshot was written.",
                gauges.snapshot_age_s.to_string(),
            ),
            (
                "kurz_snapshot_file_bytes",
                "gauge",
                "Size of the snapshot file.",
                gauges.snapshot_file_bytes.to_string(),
            ),
            (
                "kurz_wal_last_seq",
                "gauge",
                "Last WAL sequence number written.",
                gauges.wal_last_seq.to_string(),
            ),
            (
                "kurz_wal_records_total",
                "counter",
                "WAL records written since start-up.",
                gauges.wal_records_total.to_string(),
            ),
            (
                "kurz_wal_batches_total",
                "counter",
                "WAL group commits since start-up.",
                gauges.wal_batches_total.to_string(),
            ),
            (
                "kurz_wal_fsyncs_total",
                "counter",
                "WAL fsyncs since start-up.",
                gauges.wal_fsyncs_total.to_string(),
            ),
            (
                "kurz_wal_fsync_seconds_total",
                "counter",
                "Time spent in WAL fsyncs.",
                wal_fsync_s_total.to_string(),
            ),
            (
                "kurz_wal_fsync_seconds_last",
                "gauge",
                "Duration of the last WAL fsync.",
                wal_fsync_s_last.to_string(),
            ),
            (
                "kurz_wal_batch_records_last",
                "gauge",
                "Records in the last WAL group commit.",
                gauges.wal_batch_records_last.to_string(),
            ),
            (
                "kurz_click_events_total",
                "counter",
                "Click events aggregated (referrers, countries, user agents) since start-up.",
                gauges.analytics.events_total.to_string(),
            ),
            (
                "kurz_click_events_bot_total",
                "counter",
                "Aggregated click events from bots and link unfurlers since start-up.",
                gauges.analytics.bot_events_total.to_string(),
            ),
            (
                "kurz_click_events_dropped_total",
                "counter",
                "Click events dropped because the analytics queue was full (counts stay exact).",
                gauges.analytics.dropped_total.to_string(),
            ),
            (
                "kurz_click_events_queued",
                "gauge",
                "Click events waiting for the aggregator.",
                gauges.analytics.queued.to_string(),
            ),
            (
                "kurz_click_aggregator_lag_seconds",
                "gauge",
                "Age of the newest aggregated click while events are waiting.",
                gauges.analytics.lag_s.to_string(),
            ),
            (
                "kurz_wal_broken",
                "gauge",
                "1 if the WAL writer has failed and writes are refused.",
                u8::from(gauges.wal_broken).to_string(),
            ),
        ];
        for (name, kind, help, value) in simple {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP kurz_clicks_total Redirects served since start-up.\n# TYPE kurz_clicks_total counter\nkurz_clicks_total {}",
            gauges.clicks_total
        );
        if let Some(cluster) = &gauges.cluster {
            render_cluster(&mut out, cluster);
        }
        out
    }
}

fn render_cluster(out: &mut String, cluster: &ClusterGauges) {
    let lag_records = match cluster.lag_records {
        u64::MAX => "NaN".to_owned(),
        lag_records => lag_records.to_string(),
    };
    let gauges: [(&str, &str, String); 4] = [
        (
            "kurz_cluster_applied_seq",
            "Link stream sequence this node has applied up to.",
            cluster.applied_seq.to_string(),
        ),
        (
            "kurz_cluster_lag_records",
            "Records of this node's shards in the link stream and not applied yet (NaN before the first subscription).",
            lag_records,
        ),
        (
            "kurz_cluster_following",
            "1 while the node has a live consumer on the link stream.",
            u8::from(cluster.following).to_string(),
        ),
        (
            "kurz_cluster_clicks_folded_seq",
            "Clicks stream sequence this node has folded up to.",
            cluster.clicks_folded_seq.to_string(),
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let metrics = Metrics::default();
        metrics.request(Route::Redirect, 302);
        metrics.request(Route::Redirect, 302);
        metrics.request(Route::Shorten, 999);
        metrics.redirect_latency(7);
        metrics.redirect_latency(1_000_000);
        let text = metrics.render(&StoreGauges::default());
        assert!(text.contains("kurz_http_requests_total{route=\"redirect\",status=\"302\"} 2\n"));
        assert!(text.contains("kurz_http_requests_total{route=\"shorten\",status=\"other\"} 1\n"));
        assert!(text.contains("kurz_redirect_latency_seconds_bucket{le=\"0.00001\"} 1\n"));
        assert!(text.contains("kurz_redirect_latency_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("kurz_ready 0\n"));
        assert!(
            !text.contains("kurz_cluster_"),
            "cluster gauges only in cluster mode"
        );
        let cluster = metrics.render(&StoreGauges {
            cluster: Some(ClusterGauges {
                applied_seq: 42,
                lag_records: u64::MAX,
                following: true,
                ..ClusterGauges::default()
            }),
            ..StoreGauges::default()
        });
        assert!(cluster.contains("kurz_cluster_applied_seq 42\n"));
        assert!(cluster.contains("kurz_cluster_lag_records NaN\n"));
        assert!(cluster.contains("kurz_cluster_following 1\n"));
    }
}
