//! Listeners and connections: binds the public and admin listeners, opens the store (or, in
//! cluster mode, joins the cluster) in the background (so /healthz answers at once and /readyz
//! says 503 until recovery is done), starts the public listener's event loops (`lean_loop`) and
//! serves hyper connections (the admin listener, and whatever the loops hand over) with a
//! header-read (and idle) timeout, under a cap on open connections per listener, and shuts down
//! gracefully on SIGTERM/SIGINT: stop accepting, let in-flight requests finish, then close the
//! store so the WAL is flushed. Never answers a request itself beyond routing.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use super::lean_loop::{HandedOver, LeanLoops, LoopOptions};
use super::slow_client::WriteDeadline;
use super::{admin, api, fast, redirect, App, Response, ServeError};
use crate::analytics::geo::CountryResolver;
use crate::analytics::pipeline::{AnalyticsOptions, ClickPipeline};
use crate::analytics::ClickCounters;
use crate::auth::Keys;
use crate::cluster::datadir::MARKER_FILE;
use crate::cluster::ClusterError;
use crate::config::ServeConfig;
use crate::datafile::{self, ImportOptions};
use crate::metrics::Route;
use crate::service::LinkService;
use crate::store::snapshotter::Snapshotter;
use crate::store::{Store, StoreOptions};
use crate::threads;

/// Sample links imported on the first start of an empty data dir, for the quick start.
pub const SAMPLE_LINKS_FILE: &str = "sample-links.tsv";
/// Where click analytics keep their event log and checkpoint, under the data dir.
pub const ANALYTICS_DIR: &str = "analytics";
/// Largest request head (request line and headers) hyper buffers; beyond it the client gets 431.
const REQUEST_HEAD_BYTES_MAX: usize = 16 * 1024;
const REQUEST_HEADERS_MAX: usize = 64;
const LISTEN_BACKLOG: i32 = 1024;
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE_MS: u64 = 50;
/// How often shutdown checks whether the last request handler has let go of the store.
const STORE_RELEASE_POLL_MS: u64 = 10;
/// Pause between attempts at joining the cluster while NATS cannot be reached.
const CLUSTER_JOIN_RETRY_MS: u64 = 1_000;
/// How often a cluster node checks whether a snapshot is due.
const CLUSTER_SNAPSHOT_CHECK_MS: u64 = 1_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listener {
    Public,
    Admin,
}

/// Runs `kurz serve` until SIGTERM or SIGINT.
pub fn run(config: ServeConfig) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    runtime.block_on(serve(config))
}

fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, ServeError> {
    let bind_error = |cause| ServeError::Bind { addr, cause };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(bind_error)?;
    socket.set_reuse_address(true).map_err(bind_error)?;
    socket.set_nonblocking(true).map_err(bind_error)?;
    socket.bind(&addr.into()).map_err(bind_error)?;
    socket.listen(LISTEN_BACKLOG).map_err(bind_error)?;
    Ok(socket.into())
}

async fn serve(mut config: ServeConfig) -> Result<(), ServeError> {
    let keys = Keys::load(&config.keys_path)?;
    let public = bind(config.listen)?;
    let admin = bind(config.admin_listen)?;
    let public_addr = public.local_addr().map_err(ServeError::Runtime)?;
    let admin_addr = admin.local_addr().map_err(ServeError::Runtime)?;
    tracing::info!("listening public={public_addr} admin={admin_addr}");
    if !config.public_url_explicit {
        config.public_url = format!("http://{public_addr}");
    }
    if keys.is_empty() {
        tracing::warn!(
            "no API keys in {}: create one with `kurz keys add NAME`{}",
            config.keys_path.display(),
            if config.allow_anonymous_create {
                " (anonymous creation is on)"
            } else {
                "; until then nobody can create links"
            }
        );
    }
    let grace = Duration::from_millis(config.timeout_shutdown_ms);
    let app = Arc::new(App::new(config, keys));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let public_task = if app.config.hyper_only {
        let public = TcpListener::from_std(public).map_err(ServeError::Runtime)?;
        tokio::spawn(accept_loop(
            public,
            app.clone(),
            Listener::Public,
            shutdown_rx.clone(),
        ))
    } else {
        let open = Connections::new(app.config.connections_max);
        let loops = LeanLoops::start(public, app.config.workers, lean_options(&app, &open))
            .map_err(ServeError::Runtime)?;
        tokio::spawn(lean_listener(loops, open, grace, shutdown_rx.clone()))
    };
    let admin = TcpListener::from_std(admin).map_err(ServeError::Runtime)?;
    let admin_task = tokio::spawn(accept_loop(
        admin,
        app.clone(),
        Listener::Admin,
        shutdown_rx.clone(),
    ));
    // A cluster node's counts live in the clicks stream, not in a checkpoint file.
    let checkpoints = match app.config.cluster {
        Some(_) => None,
        None => match ClickCheckpoints::start(app.clone()) {
            Ok(checkpoints) => Some(checkpoints),
            Err(error) => {
                tracing::error!("click counts will be saved only at shutdown: {error}");
                None
            }
        },
    };
    let mut opener = match app.config.cluster {
        None => {
            let app = app.clone();
            tokio::task::spawn_blocking(move || open_store(&app))
        }
        Some(_) => tokio::spawn(join_cluster(app.clone(), shutdown_rx.clone())),
    };
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut outcome = Ok(());
    let mut snapshotter = None;
    let mut cluster_snapshotter = None;
    let mut opener_running = true;
    tokio::select! {
        () = &mut signal => {}
        opened = &mut opener => {
            opener_running = false;
            match opened {
                Ok(Ok(())) if app.config.cluster.is_some() => {
                    cluster_snapshotter =
                        Some(tokio::spawn(cluster_snapshots(app.clone(), shutdown_rx.clone())));
                    signal.await
                }
                Ok(Ok(())) => {
                    let policy = app.config.snapshot_policy;
                    match Snapshotter::start(app.clone(), App::store, policy) {
                        Ok(started) => snapshotter = Some(started),
                        Err(error) => tracing::error!("automatic snapshots are off: {error}"),
                    }
                    signal.await
                }
                Ok(Err(error)) => outcome = Err(error),
                Err(error) => outcome = Err(ServeError::Opener(error.to_string())),
            }
        }
    }
    tracing::info!("shutting down: no new connections; waiting for in-flight requests");
    let _ = shutdown_tx.send(true);
    for task in [public_task, admin_task]
        .into_iter()
        .chain(cluster_snapshotter)
    {
        if let Err(error) = task.await {
            tracing::error!("listener or snapshot task failed: {error}");
        }
    }
    if let Some(checkpoints) = checkpoints {
        checkpoints.stop().await;
    }
    // Still opening when the signal came: it holds the app until it has ended (a blocking
    // store open runs to its end; joining the cluster stops at once).
    if opener_running {
        opener.abort();
        if let Err(error) = opener.await {
            if !error.is_cancelled() {
                tracing::error!("the store opener failed: {error}");
            }
        }
    }
    if app.store().is_some() && app.config.cluster.is_none() {
        // Only once the store (and with it the last checkpoint) was read, or the counts of the
        // previous run would be overwritten.
        let app = app.clone();
        if tokio::task::spawn_blocking(move || save_clicks(&app))
            .await
            .is_err()
        {
            tracing::error!("the last click checkpoint task failed");
        }
    }
    // Stops the policy thread (a cycle in progress finishes) and lets go of its hold on the app.
    drop(snapshotter);
    close_store(app, grace).await;
    outcome
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => tracing::info!("SIGTERM"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
                }
            }
            Err(error) => {
                tracing::warn!("cannot watch SIGTERM ({error}); only SIGINT stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Closes the store once every handler has let go of the app (or after `grace`).
async fn close_store(mut app: Arc<App>, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        match Arc::try_unwrap(app) {
            Ok(app) => {
                let (links, analytics) = app.into_parts();
                if let Some(analytics) = analytics {
                    let flushed = tokio::task::spawn_blocking(move || analytics.shutdown()).await;
                    match flushed {
                        Ok(()) => tracing::info!("click analytics flushed and checkpointed"),
                        Err(error) => tracing::error!("closing click analytics failed: {error}"),
                    }
                }
                if let Some(links) = links {
                    links.close().await;
                }
                return;
            }
            Err(shared) if tokio::time::Instant::now() < deadline => {
                app = shared;
                tokio::time::sleep(Duration::from_millis(STORE_RELEASE_POLL_MS)).await;
            }
            Err(_) => {
                tracing::warn!(
                    "requests still running after the shutdown grace period; exiting without closing the store (acknowledged writes are already durable per the fsync policy)"
                );
                return;
            }
        }
    }
}

/// Writes every click count to the data dir (blocking); false if that failed.
fn save_clicks(app: &App) -> bool {
    match app.clicks.save(&app.config.data_dir) {
        Ok(count) => {
            tracing::debug!("click counts of {count} links checkpointed");
            true
        }
        Err(error) => {
            tracing::error!("{error}");
            false
        }
    }
}

/// The changes file is folded into a full rewrite once it is larger than the full file and than
/// this.
const CLICK_CHANGES_BYTES_MIN: u64 = 1 << 20;

/// Makes the click counts that changed durable, and rewrites them all when the changes have
/// grown large or the last attempt failed; returns whether a full rewrite is still owed.
fn checkpoint_clicks(app: &App, full_owed: bool) -> bool {
    if full_owed {
        return !save_clicks(app);
    }
    let dir = &app.config.data_dir;
    match app.clicks.save_changes(dir) {
        Ok(changes) => {
            let full_bytes = ClickCounters::saved_file_bytes(dir);
            changes.file_bytes > full_bytes.max(CLICK_CHANGES_BYTES_MIN) && !save_clicks(app)
        }
        Err(error) => {
            tracing::error!("{error}; writing every count next");
            true
        }
    }
}

/// The background thread that checkpoints the click counters.
struct ClickCheckpoints {
    stop: crossbeam_channel::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl ClickCheckpoints {
    /// Makes changed click counts durable every `clicks_checkpoint_ms`, on a background thread,
    /// so that writing them never holds up a redirect; first moves the counts to the snapshot
    /// lookups read, if the store swapped it since.
    fn start(app: Arc<App>) -> std::io::Result<ClickCheckpoints> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        let every = Duration::from_millis(app.config.clicks_checkpoint_ms);
        let thread = threads::spawn_background("kurz-clicks-checkpoint", move || {
            let mut full_owed = false;
            while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(every)
            {
                // Only once the store (and with it the saved counts) was read, or the counts
                // of the previous run would be overwritten.
                if let Some(store) = app.store() {
                    app.clicks.follow(store.current_snapshot());
                    full_owed = checkpoint_clicks(&app, full_owed);
                }
            }
        })?;
        Ok(ClickCheckpoints { stop, thread })
    }

    /// Stops the thread (a checkpoint in progress finishes) and lets go of its hold on the app.
    async fn stop(self) {
        let _ = self.stop.send(());
        let thread = self.thread;
        if tokio::task::spawn_blocking(move || thread.join())
            .await
            .is_err()
        {
            tracing::error!("the click checkpoint thread failed");
        }
    }
}

fn store_is_empty(store: &Store) -> bool {
    store.snapshot_header().link_count == 0
        && store.recovery().last_seq == 0
        && store.overlay_len() == 0
}

/// Opens the store, imports the sample links into an empty one, and hands it to the app.
fn open_store(app: &App) -> Result<(), ServeError> {
    let config = &app.config;
    if config.data_dir.join(MARKER_FILE).exists() {
        return Err(ServeError::ClusterDataDir {
            dir: config.data_dir.clone(),
            marker: MARKER_FILE,
        });
    }
    let store = Store::open(
        &config.data_dir,
        StoreOptions {
            fsync: config.fsync,
        },
    )?;
    let recovery = store.recovery();
    tracing::info!(
        "store open in {} ms: {} links in the snapshot, {} WAL records replayed, last seq {}",
        recovery.duration_ms,
        recovery.snapshot_links,
        recovery.wal_records_replayed,
        recovery.last_seq
    );
    app.clicks.follow(store.current_snapshot());
    let restored = app.clicks.restore(&config.data_dir)?;
    if restored > 0 {
        tracing::info!(
            "{restored} click counts restored from {}",
            config.data_dir.display()
        );
    }
    let sample = config.data_dir.join(SAMPLE_LINKS_FILE);
    if store_is_empty(&store) && sample.exists() {
        import_sample(&store, &sample, config);
    }
    if config.click_analytics {
        start_analytics(app)?;
    }
    if !app.set_links(LinkService::local(store)) {
        tracing::error!("the store was opened twice; keeping the first");
    }
    tracing::info!("ready");
    Ok(())
}

/// Cluster mode's start-up: joins the cluster (retrying while NATS cannot be reached, so a node
/// started before its NATS servers waits for them with /readyz at 503), starts click analytics
/// and hands the link service to the app. Other failures (a data dir of another stream, a
/// misconfigured stream) stop the server with the error.
async fn join_cluster(
    app: Arc<App>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let Some(cluster) = &app.config.cluster else {
        return Err(ServeError::Opener("join_cluster without --nats".into()));
    };
    let links = loop {
        match LinkService::join_cluster(cluster, &app.config.data_dir).await {
            Ok(links) => break links,
            Err(error @ (ClusterError::Connect { .. } | ClusterError::Nats { .. })) => {
                tracing::warn!("joining the cluster: {error}; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(CLUSTER_JOIN_RETRY_MS)) => {}
                    () = stopped(&mut shutdown) => return Ok(()),
                }
            }
            Err(error) => return Err(error.into()),
        }
    };
    if let Some(node) = links.cluster().map(|cluster| &cluster.node) {
        tracing::info!(
            "joined the cluster: stream {}, shards {:?} of {}, bootstrap {:?}",
            cluster.stream_name,
            node.shard_set().held(),
            node.shard_set().shards(),
            node.bootstrap()
        );
    }
    if app.config.click_analytics {
        let app = app.clone();
        tokio::task::spawn_blocking(move || start_analytics(&app))
            .await
            .map_err(|error| ServeError::Opener(error.to_string()))??;
    }
    if !app.set_links(links) {
        tracing::error!("the cluster was joined twice; keeping the first");
    }
    tracing::info!("ready");
    Ok(())
}

/// Cluster mode's snapshot policy: once enough stream records were applied since the snapshot,
/// or it is old enough and anything was applied, write a snapshot at the applied sequence and
/// upload it for new nodes to start from. The stream sequence counts every shard's records, so
/// a node holding some shards snapshots somewhat early.
async fn cluster_snapshots(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let policy = app.config.snapshot_policy;
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(CLUSTER_SNAPSHOT_CHECK_MS)) => {}
            () = stopped(&mut shutdown) => return,
        }
        let Some(cluster) = app.links().and_then(LinkService::cluster) else {
            continue;
        };
        let header = cluster.node.store().snapshot_header();
        let records_since = cluster
            .node
            .applied_seq()
            .saturating_sub(header.covered_seq);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        let age = Duration::from_millis(now_ms.saturating_sub(header.written_at_ms));
        if !policy.due(records_since, age) {
            continue;
        }
        match cluster.node.snapshot_and_upload().await {
            Ok(upload) => tracing::info!(
                "snapshot of {} links covering stream seq {} uploaded as {} ({} ms + {} ms)",
                upload.link_count,
                upload.covered_seq,
                upload.object_name,
                upload.snapshot_ms,
                upload.upload_ms
            ),
            Err(error) => tracing::warn!("automatic snapshot: {error}; retrying later"),
        }
    }
}

/// Starts the click analytics pipeline (recovering its checkpoint and logs) and hands it to the app.
fn start_analytics(app: &App) -> Result<(), ServeError> {
    let config = &app.config;
    let countries = match &config.geoip_db {
        Some(path) => CountryResolver::open(path)?,
        None => CountryResolver::without_database(),
    };
    let analytics = ClickPipeline::start(AnalyticsOptions {
        flush_interval: Duration::from_millis(config.click_log_flush_ms),
        countries,
        click_log: config.click_log.clone(),
        ..AnalyticsOptions::new(config.data_dir.join(ANALYTICS_DIR))
    })?;
    if !app.set_analytics(analytics) {
        tracing::error!("click analytics were started twice; keeping the first");
    }
    Ok(())
}

fn import_sample(store: &Store, sample: &Path, config: &ServeConfig) {
    let options = ImportOptions {
        url_rules: config.url_rules.clone(),
        code_len: config.code_len,
        ..ImportOptions::default()
    };
    match datafile::import(store, sample, &options) {
        Ok(report) => tracing::info!(
            "first start: imported {} sample links from {} ({} rows skipped)",
            report.imported,
            sample.display(),
            report.rejected
        ),
        Err(error) => tracing::warn!(
            "first start: sample import from {} failed: {error}",
            sample.display()
        ),
    }
}

/// Resolves once shutdown has been asked for (or the sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped, which also means stop.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// The open connections of one listener: its cap, and each connection's own stop signal, so
/// that shutdown notifies each one and no connection ever waits on a channel or lock that all
/// of them share.
struct Connections {
    max: usize,
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
    stops: DashMap<u64, Arc<Notify>, ahash::RandomState>,
}

impl Connections {
    fn new(max: usize) -> Arc<Connections> {
        Arc::new(Connections {
            max,
            slots: Arc::new(Semaphore::new(max)),
            next_id: AtomicU64::new(0),
            stops: DashMap::default(),
        })
    }

    /// Runs `serve` for one connection holding `permit` as a task on `runtime`, with a stop
    /// signal registered before the task starts, so a shutdown right after still reaches it.
    fn spawn<F, Served>(
        self: &Arc<Self>,
        runtime: &tokio::runtime::Handle,
        permit: OwnedSemaphorePermit,
        serve: F,
    ) where
        F: FnOnce(Arc<Notify>) -> Served,
        Served: std::future::Future<Output = ()> + Send + 'static,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(Notify::new());
        self.stops.insert(id, stop.clone());
        let served = serve(stop);
        let open = self.clone();
        runtime.spawn(async move {
            served.await;
            open.stops.remove(&id);
            drop(permit);
        });
    }

    /// Once the listener is closed: asks every connection to stop and waits until all have, or
    /// `grace` is over.
    async fn close_all(&self, grace: Duration, kind: Listener) {
        for stop in self.stops.iter() {
            // notify_one keeps a permit when the connection is not waiting right now.
            stop.notify_one();
        }
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        if tokio::time::timeout(grace, self.slots.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                "{kind:?} listener: connections still open after the shutdown grace period"
            );
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    app: Arc<App>,
    kind: Listener,
    mut shutdown: watch::Receiver<bool>,
) {
    let open = Connections::new(app.config.connections_max);
    let runtime = tokio::runtime::Handle::current();
    loop {
        let permit = tokio::select! {
            permit = open.slots.clone().acquire_owned() => permit,
            () = stopped(&mut shutdown) => break,
        };
        let Ok(permit) = permit else {
            break;
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopped(&mut shutdown) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!("accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_PAUSE_MS)).await;
                continue;
            }
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!("set_nodelay {peer}: {error}");
        }
        let app = app.clone();
        open.spawn(&runtime, permit, move |stop| async move {
            serve_hyper(stream, Bytes::new(), peer, app, kind, &stop).await;
        });
    }
    drop(listener);
    let grace = Duration::from_millis(app.config.timeout_shutdown_ms);
    open.close_all(grace, kind).await;
}

/// How the public listener's event loops serve, with hyper taking the connections they hand
/// over (under the same cap, on the runtime this is called on).
fn lean_options(app: &Arc<App>, open: &Arc<Connections>) -> LoopOptions {
    let timeout = Duration::from_millis(app.config.timeout_header_read_ms);
    let runtime = tokio::runtime::Handle::current();
    let handoff_app = app.clone();
    let handoff_open = open.clone();
    LoopOptions {
        app: app.clone(),
        slots: open.slots.clone(),
        handoff: Arc::new(move |handed: HandedOver| {
            let HandedOver {
                stream,
                peer,
                prefix,
                unsent,
                permit,
            } = handed;
            let app = handoff_app.clone();
            handoff_open.spawn(&runtime, permit, move |stop| async move {
                let mut stream = match TcpStream::from_std(stream) {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::warn!("cannot hand the connection of {peer} to hyper: {error}");
                        return;
                    }
                };
                if unsent.is_empty() || fast::write_all(&mut stream, &unsent, timeout).await {
                    serve_hyper(stream, prefix, peer, app, Listener::Public, &stop).await;
                }
            });
        }),
        timeout,
        head_bytes_max: REQUEST_HEAD_BYTES_MAX,
        grace: Duration::from_millis(app.config.timeout_shutdown_ms),
    }
}

/// The public listener on the lean path: its event loops serve until shutdown, then stop
/// (finishing requests in flight), then the connections they handed to hyper are closed.
async fn lean_listener(
    loops: LeanLoops,
    open: Arc<Connections>,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    stopped(&mut shutdown).await;
    if tokio::task::spawn_blocking(move || loops.stop())
        .await
        .is_err()
    {
        tracing::error!("stopping the event loops failed");
    }
    open.close_all(grace, Listener::Public).await;
}

/// The client preface of HTTP/2 with prior knowledge (h2c, RFC 9113 section 3.3).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the client speaks HTTP/2: reads into `head` (what was read of the connection so far)
/// until it holds the whole HTTP/2 preface or departs from it. None when the client closes, or
/// says too little to tell within `within`.
async fn speaks_h2(stream: &mut TcpStream, head: &mut BytesMut, within: Duration) -> Option<bool> {
    let sniff = async {
        loop {
            let seen = head.len().min(H2_PREFACE.len());
            if head[..seen] != H2_PREFACE[..seen] {
                return Some(false);
            }
            if seen == H2_PREFACE.len() {
                return Some(true);
            }
            match stream.read_buf(head).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, sniff).await.ok().flatten()
}

/// Serves a connection with hyper, HTTP/1.1 or (when it opens with the HTTP/2 preface) h2c;
/// `prefix` is what was already read of it.
async fn serve_hyper(
    mut stream: TcpStream,
    prefix: Bytes,
    peer: SocketAddr,
    app: Arc<App>,
    kind: Listener,
    stop: &Notify,
) {
    let timeout_header_read = Duration::from_millis(app.config.timeout_header_read_ms);
    let mut head = BytesMut::from(prefix.as_ref());
    let h2 = tokio::select! {
        h2 = speaks_h2(&mut stream, &mut head, timeout_header_read) => h2,
        () = stop.notified() => return,
    };
    let Some(h2) = h2 else {
        return;
    };
    let io = fast::Prefixed::new(head.freeze(), stream);
    let io = TokioIo::new(WriteDeadline::new(
        io,
        Duration::from_millis(app.config.timeout_write_ms),
    ));
    let counted = app.clone();
    // HTTP/2 has no idle timeout in hyper: an h2c connection is watched here and closed when no
    // request has been in flight for as long as an HTTP/1.1 keep-alive connection may idle.
    let activity = h2.then(|| Arc::new(Activity::new()));
    let watched = activity.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let app = app.clone();
        let activity = activity.clone();
        async move {
            let _busy = activity.as_deref().map(Activity::begin);
            Ok::<_, Infallible>(route(&app, request, peer, kind).await)
        }
    });
    let ends = (stop, watched.as_deref().map(|a| (a, timeout_header_read)));
    if h2 {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(REQUEST_HEAD_BYTES_MAX as u32)
            .keep_alive_interval(timeout_header_read)
            .keep_alive_timeout(timeout_header_read);
        let connection = builder.serve_connection(io, service);
        drive(
            connection,
            |c| c.graceful_shutdown(),
            ends,
            (peer, &counted),
        )
        .await;
    } else {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(timeout_header_read)
            .max_buf_size(REQUEST_HEAD_BYTES_MAX.max(8192))
            .max_headers(REQUEST_HEADERS_MAX);
        let connection = builder.serve_connection(io, service);
        drive(
            connection,
            |c| c.graceful_shutdown(),
            ends,
            (peer, &counted),
        )
        .await;
    }
}

/// Requests in flight on a hyper connection, and since when it has had none.
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` when the last request ended.
    idle_since_ms: AtomicU64,
}

/// A request in flight; ends it when dropped.
struct Busy<'a>(&'a Activity);

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    fn begin(&self) -> Busy<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(self)
    }

    /// Whether no request has been in flight for `limit`.
    fn idle_for(&self, limit: Duration) -> bool {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return false;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        self.started.elapsed().saturating_sub(since) >= limit
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let now_ms = self.0.started.elapsed().as_millis() as u64;
        self.0.idle_since_ms.store(now_ms, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs a hyper connection to its end, until `stop`, or (with `idle`) until no request has been
/// in flight for its limit; then shuts it down gracefully (requests in flight finish).
async fn drive<C>(
    connection: C,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
    (stop, idle): (&Notify, Option<(&Activity, Duration)>),
    (peer, app): (SocketAddr, &App),
) where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(connection);
    // Checked four times per limit, so an idle connection goes within 1.25 limits.
    let mut check =
        idle.map(|(_, limit)| tokio::time::interval((limit / 4).max(Duration::from_millis(10))));
    loop {
        let tick = async {
            match check.as_mut() {
                Some(check) => {
                    check.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    count_protocol_error(app, &error);
                    tracing::debug!("connection {peer}: {error}");
                }
                return;
            }
            () = stop.notified() => break,
            () = tick => {
                if idle.is_some_and(|(activity, limit)| activity.idle_for(limit)) {
                    break;
                }
            }
        }
    }
    graceful_shutdown(connection.as_mut());
    if let Err(error) = connection.await {
        tracing::debug!("connection {peer} during shutdown: {error}");
    }
}

/// Counts a request hyper refused before any route saw it: it answers a head it cannot parse
/// with 400, and one too large with 431, itself.
fn count_protocol_error(app: &App, error: &hyper::Error) {
    if error.is_parse_too_large() {
        app.metrics.request(Route::Other, 431);
    } else if error.is_parse() {
        app.metrics.request(Route::Other, 400);
    }
}

async fn route(
    app: &Arc<App>,
    request: Request<Incoming>,
    peer: SocketAddr,
    kind: Listener,
) -> Response {
    let (route, response) = match kind {
        Listener::Admin => admin::handle(app, &request).await,
        Listener::Public => {
            let path = request.uri().path();
            if path.starts_with("/api/") {
                api::handle(app, request, peer.ip()).await
            } else if path == "/healthz" || path == "/readyz" {
                let method = request.method();
                if method != Method::GET && method != Method::HEAD {
                    (Route::Other, super::method_not_allowed())
                } else if path == "/healthz" {
                    (Route::Health, super::healthz())
                } else {
                    (Route::Ready, super::readyz(app))
                }
            } else {
                (Route::Redirect, redirect::handle(app, &request, peer.ip()))
            }
        }
    };
    app.metrics.request(route, response.status().as_u16());
    response
}
