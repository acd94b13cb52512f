//! The admin listener: `/metrics` (Prometheus text), `POST /admin/snapshot`, `POST /admin/reload`,
//! `GET /admin/info`, plus `/healthz` and `/readyz`. `/admin/*` needs an admin-scope key;
//! `/metrics` and the health checks are open, because the admin listener is meant for loopback or
//! a private network. In cluster mode a snapshot is also uploaded for new nodes to start from,
//! and metrics and info report the node's place in the stream. Every error it answers is
//! `{"error","code"}` JSON, as the OpenAPI document (`openapi.json`) says. Never served on the
//! public listener.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::{Method, Request, StatusCode};
use serde_json::json;

use super::api::{principal, require, ApiError};
use super::{json as json_response, text, App, Response};
use crate::auth::Scope;
use crate::cluster::{Bootstrap, ClusterError};
use crate::metrics::{ClusterGauges, Route, StoreGauges};
use crate::service::Cluster;
use crate::store::StoreError;

/// Answers a request on the admin listener.
pub async fn handle<B>(app: &Arc<App>, request: &Request<B>) -> (Route, Response) {
    let path = request.uri().path();
    let method = request.method();
    match (method, path) {
        (&Method::GET | &Method::HEAD, "/healthz") => (Route::Health, super::healthz()),
        (&Method::GET | &Method::HEAD, "/readyz") => (Route::Ready, super::readyz(app)),
        (&Method::GET, "/metrics") => (Route::Metrics, metrics(app)),
        (&Method::POST, "/admin/snapshot") => (
            Route::AdminSnapshot,
            answer(admin_only(app, request), || snapshot(app)).await,
        ),
        (&Method::POST, "/admin/reload") => (
            Route::AdminReload,
            answer(admin_only(app, request), || reload(app)).await,
        ),
        (&Method::GET, "/admin/info") => (
            Route::AdminInfo,
            match admin_only(app, request) {
                Ok(()) => info(app),
                Err(error) => error.into_response(),
            },
        ),
        (_, "/healthz" | "/readyz" | "/metrics" | "/admin/snapshot" | "/admin/reload" | "/admin/info") => (
            Route::Other,
            super::method_not_allowed(),
        ),
        _ => (
            Route::Other,
            super::error_json(
                StatusCode::NOT_FOUND,
                "no_such_route",
                "no such route: the admin listener serves /metrics, /healthz, /readyz, /admin/snapshot, /admin/reload and /admin/info",
            ),
        ),
    }
}

async fn answer<F, Fut>(admitted: Result<(), ApiError>, then: F) -> Response
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    match admitted {
        Ok(()) => then().await,
        Err(error) => error.into_response(),
    }
}

fn admin_only<B>(app: &App, request: &Request<B>) -> Result<(), ApiError> {
    require(&principal(app, request.headers())?, Scope::Admin)
}

fn gauges(app: &App) -> StoreGauges {
    let Some(store) = app.store() else {
        return StoreGauges {
            clicks_total: app.clicks.clicks_total(),
            ..StoreGauges::default()
        };
    };
    let header = store.snapshot_header();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64);
    let mut gauges = StoreGauges {
        ready: true,
        links_live: store.live_links(),
        overlay_links: store.overlay_len() as u64,
        snapshot_covered_seq: header.covered_seq,
        snapshot_links: header.link_count,
        snapshot_age_s: now_ms.saturating_sub(header.written_at_ms) / 1000,
        snapshot_file_bytes: store.snapshot_file_bytes(),
        snapshot_format: header.format_version,
        clicks_total: app.clicks.clicks_total(),
        analytics: app
            .analytics()
            .map(|analytics| analytics.counters(crate::http::now_s()))
            .unwrap_or_default(),
        cluster: app
            .links()
            .and_then(|links| links.cluster())
            .map(cluster_gauges),
        ..StoreGauges::default()
    };
    if let Some(cluster) = &gauges.cluster {
        gauges.ready = cluster.serving;
    }
    if let Some(wal) = store.wal_stats() {
        use std::sync::atomic::Ordering::Relaxed;
        gauges.wal_last_seq = wal.last_seq.load(Relaxed);
        gauges.wal_records_total = wal.records_total.load(Relaxed);
        gauges.wal_batches_total = wal.batches_total.load(Relaxed);
        gauges.wal_fsyncs_total = wal.fsyncs_total.load(Relaxed);
        gauges.wal_fsync_us_total = wal.fsync_us_total.load(Relaxed);
        gauges.wal_fsync_us_last = wal.fsync_us_last.load(Relaxed);
        gauges.wal_batch_records_last = wal.batch_records_last.load(Relaxed);
        gauges.wal_broken = wal.broken.load(Relaxed);
    }
    gauges
}

fn cluster_gauges(cluster: &Cluster) -> ClusterGauges {
    let node = &cluster.node;
    ClusterGauges {
        applied_seq: node.applied_seq(),
        lag_records: node.lag_records(),
        following: node.following(),
        serving: node.readiness().serves(),
        clicks_folded_seq: cluster.clicks.folded_seq(),
    }
}

fn metrics(app: &App) -> Response {
    let mut response = text(StatusCode::OK, app.metrics.render(&gauges(app)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

fn not_ready() -> Response {
    super::error_json(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        "the store is still opening",
    )
}

fn cycle_failed(error: &StoreError) -> Response {
    match error {
        StoreError::SnapshotInProgress => super::error_json(
            StatusCode::CONFLICT,
            "snapshot_in_progress",
            "a snapshot or reload is already running; retry when it is done",
        ),
        error => {
            tracing::error!("admin: {error}");
            super::error_json(
                StatusCode::INTERNAL_SERVER_ERROR,
                "snapshot_failed",
                &error.to_string(),
            )
        }
    }
}

/// Runs a blocking store call off the async workers.
async fn blocking<T: Send + 'static>(
    app: &Arc<App>,
    call: impl FnOnce(&crate::store::Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<Option<T>, Response> {
    let app = app.clone();
    let joined = tokio::task::spawn_blocking(move || app.store().map(call).transpose()).await;
    match joined {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(cycle_failed(&error)),
        Err(error) => Err(super::error_json(
            StatusCode::INTERNAL_SERVER_ERROR,
            "snapshot_failed",
            &error.to_string(),
        )),
    }
}

/// Cluster mode's snapshot: written at the applied stream sequence and uploaded to the object
/// store, where new nodes start from.
async fn snapshot_and_upload(cluster: &Cluster) -> Response {
    match cluster.node.snapshot_and_upload().await {
        Ok(upload) => {
            tracing::info!(
                "admin: snapshot of {} links covering stream seq {} uploaded as {}",
                upload.link_count,
                upload.covered_seq,
                upload.object_name
            );
            json_response(
                StatusCode::OK,
                &json!({
                    "covered_seq": upload.covered_seq,
                    "link_count": upload.link_count,
                    "object_name": upload.object_name,
                    "file_bytes": upload.file_bytes,
                    "duration_ms": upload.snapshot_ms,
                    "upload_ms": upload.upload_ms,
                }),
            )
        }
        Err(ClusterError::Store(error)) => cycle_failed(&error),
        Err(error) => {
            tracing::error!("admin: snapshot upload: {error}");
            super::error_json(
                StatusCode::SERVICE_UNAVAILABLE,
                "snapshot_failed",
                &error.to_string(),
            )
        }
    }
}

async fn snapshot(app: &Arc<App>) -> Response {
    if let Some(cluster) = app.links().and_then(|links| links.cluster()) {
        return snapshot_and_upload(cluster).await;
    }
    match blocking(app, |store| store.snapshot()).await {
        Ok(Some(report)) => {
            tracing::info!(
                "admin: snapshot of {} links covering WAL seq {} written in {} ms",
                report.header.link_count,
                report.header.covered_seq,
                report.duration_ms
            );
            json_response(
                StatusCode::OK,
                &json!({
                    "covered_seq": report.header.covered_seq,
                    "link_count": report.header.link_count,
                    "links_from_overlay": report.links_from_overlay,
                    "wal_segments_removed": report.wal_segments_removed,
                    "duration_ms": report.duration_ms,
                }),
            )
        }
        Ok(None) => not_ready(),
        Err(response) => response,
    }
}

async fn reload(app: &Arc<App>) -> Response {
    if app.config.cluster.is_some() {
        return super::error_json(
            StatusCode::CONFLICT,
            "cluster_mode",
            "a cluster node takes its snapshots from the cluster: to start from another one, stop the node and start it on an empty --data-dir (it downloads the newest uploaded snapshot)",
        );
    }
    match blocking(app, |store| store.reload()).await {
        Ok(Some(header)) => {
            tracing::info!(
                "admin: reloaded snapshot of {} links covering WAL seq {}",
                header.link_count,
                header.covered_seq
            );
            json_response(
                StatusCode::OK,
                &json!({ "covered_seq": header.covered_seq, "link_count": header.link_count }),
            )
        }
        Ok(None) => not_ready(),
        Err(response) => response,
    }
}

/// Resident memory from /proc/self/status (VmRSS), in bytes; None off Linux.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn info(app: &App) -> Response {
    let gauges = gauges(app);
    let recovery = app.store().map(|store| {
        let recovery = store.recovery();
        json!({
            "snapshot_links": recovery.snapshot_links,
            "wal_records_replayed": recovery.wal_records_replayed,
            "duration_ms": recovery.duration_ms,
            "cut": recovery.cut.as_ref().map(|(path, offset, reason)| json!({
                "file": path.display().to_string(), "offset": offset, "reason": reason,
            })),
        })
    });
    json_response(
        StatusCode::OK,
        &json!({
            "version": env!("CARGO_PKG_VERSION"),
            "ready": gauges.ready,
            "links_live": gauges.links_live,
            "overlay_links": gauges.overlay_links,
            "snapshot_seq": gauges.snapshot_covered_seq,
            "snapshot_links": gauges.snapshot_links,
            "snapshot_age_s": gauges.snapshot_age_s,
            "snapshot_file_bytes": gauges.snapshot_file_bytes,
            "snapshot_format": gauges.snapshot_format,
            "wal_seq": gauges.wal_last_seq,
            "clicks_total": gauges.clicks_total,
            "resident_bytes": resident_bytes(),
            "uptime_s": app.started_at.elapsed().as_secs(),
            "recovery": recovery,
            "mode": if app.config.cluster.is_some() { "cluster" } else { "single-node" },
            "cluster": app.links().and_then(|links| links.cluster()).map(cluster_info),
        }),
    )
}

fn cluster_info(cluster: &Cluster) -> serde_json::Value {
    let node = &cluster.node;
    let bootstrap = match node.bootstrap() {
        Bootstrap::Resumed { covered_seq } => {
            json!({ "kind": "resumed", "covered_seq": covered_seq })
        }
        Bootstrap::Downloaded {
            object_name,
            covered_seq,
            file_bytes,
            download_ms,
        } => json!({
            "kind": "downloaded",
            "object_name": object_name,
            "covered_seq": covered_seq,
            "file_bytes": file_bytes,
            "download_ms": download_ms,
        }),
        Bootstrap::Empty => json!({ "kind": "empty" }),
    };
    let readiness = node.readiness();
    json!({
        "nats_urls": cluster.config.nats_urls,
        "stream": cluster.config.stream_name,
        "replicas": cluster.config.replicas,
        "shards": node.shard_set().shards(),
        "shard_set": node.shard_set().held(),
        "applied_seq": node.applied_seq(),
        "lag_records": (node.lag_records() != u64::MAX).then(|| node.lag_records()),
        "following": node.following(),
        "readiness": format!("{readiness:?}"),
        "serving": readiness.serves(),
        "bootstrap": bootstrap,
        "clicks_folded_seq": cluster.clicks.folded_seq(),
    })
}
