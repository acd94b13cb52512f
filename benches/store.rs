//! Store benchmarks: lookups (snapshot hit, overlay hit, miss), creates per fsync policy
//! (group commit under 256 concurrent writers), snapshot open, and import of 1M links (and 10M
//! with `KURZ_BENCH_10M=1`).
//!
//! Run: `cargo bench --bench store` (results in PERFORMANCE.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use kurz::datafile::{self, ImportOptions};
use kurz::store::snapshot::Snapshot;
use kurz::store::wal::FsyncPolicy;
use kurz::store::{Store, StoreOptions, SNAPSHOT_FILE};

mod common;

use common::{link, synthetic_links, write_snapshot};

const LINKS: usize = 1_000_000;
const OVERLAY_LINKS: usize = 10_000;
const CONCURRENT_CREATES: usize = 256;
/// Codes the "hot" lookup benches cycle through: the keys and the links they hit stay in cache.
const HOT_KEYS: usize = 4096;

/// Codes back to back in one buffer, walked in order: the key is as cheap to reach as a request's
/// code in its read buffer, while the links it hits are spread over the whole table ("cold").
struct KeyArena {
    bytes: String,
    ends: Vec<usize>,
}

impl KeyArena {
    fn new<'a>(codes: impl Iterator<Item = &'a str>) -> KeyArena {
        let mut arena = KeyArena {
            bytes: String::new(),
            ends: Vec::new(),
        };
        for code in codes {
            arena.bytes.push_str(code);
            arena.ends.push(arena.bytes.len());
        }
        arena
    }

    fn get(&self, index: usize) -> &str {
        let start = if index == 0 { 0 } else { self.ends[index - 1] };
        &self.bytes[start..self.ends[index]]
    }
}

fn options(fsync: FsyncPolicy) -> StoreOptions {
    StoreOptions { fsync }
}

fn lookups(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let links = synthetic_links(LINKS, 1);
    write_snapshot(&dir.path().join(SNAPSHOT_FILE), &links);
    let store = Store::open(dir.path(), options(FsyncPolicy::Never)).expect("open");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let fresh = synthetic_links(OVERLAY_LINKS, 2);
    runtime.block_on(async {
        for (code, url) in &fresh {
            store.create(link(code, url)).await.expect("create");
        }
    });
    // A stride permutation, so walking the arena in order visits links in scattered order.
    let scattered = |count: usize| (0..count).map(move |i| (i * 7919) % count);
    let cold_hits = KeyArena::new(scattered(LINKS).map(|i| links[i].0.as_str()));
    let miss_codes: Vec<String> = (0..LINKS).map(|i| format!("zz{i}")).collect();
    let cold_misses = KeyArena::new(miss_codes.iter().map(String::as_str));
    let hot_hits = KeyArena::new(scattered(LINKS).take(HOT_KEYS).map(|i| links[i].0.as_str()));
    let overlay_hits = KeyArena::new(scattered(OVERLAY_LINKS).map(|i| fresh[i].0.as_str()));

    let mut group = c.benchmark_group("lookup");
    group.throughput(Throughput::Elements(1));
    for (name, keys) in [
        ("snapshot_hit_cold_1m", &cold_hits),
        ("snapshot_hit_hot", &hot_hits),
        ("overlay_hit_10k", &overlay_hits),
        ("miss_cold", &cold_misses),
    ] {
        let mut at = 0usize;
        group.bench_function(name, |b| {
            b.iter(|| {
                at += 1;
                if at == keys.ends.len() {
                    at = 0;
                }
                store.lookup(keys.get(at), |found| found.map(|link| link.long_url.len()))
            })
        });
    }
    group.finish();
    store.close();
}

fn creates(c: &mut Criterion) {
    let mut group = c.benchmark_group("create");
    group.throughput(Throughput::Elements(CONCURRENT_CREATES as u64));
    group.sample_size(20);
    for (name, policy) in [
        ("fsync_always", FsyncPolicy::Always),
        (
            "fsync_interval_10ms",
            FsyncPolicy::Interval(Duration::from_millis(10)),
        ),
        ("fsync_never", FsyncPolicy::Never),
    ] {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        let store = Arc::new(Store::open(dir.path(), options(policy)).expect("open"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mut round = 0u64;
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                let started = Instant::now();
                for _ in 0..iterations {
                    round += 1;
                    let tasks: Vec<_> = (0..CONCURRENT_CREATES)
                        .map(|i| {
                            let store = store.clone();
                            let code = format!("r{round}i{i}");
                            runtime.spawn(async move {
                                store
                                    .create(link(&code, "https://example.com/some/long/path"))
                                    .await
                            })
                        })
                        .collect();
                    runtime.block_on(async {
                        for task in tasks {
                            task.await.expect("join").expect("create");
                        }
                    });
                }
                started.elapsed()
            })
        });
    }
    group.finish();
}

/// Snapshot open and TSV import at 1M links, and at 10M too when `KURZ_BENCH_10M` is set
/// (~3 GB of temp files and a few minutes).
fn snapshot_files(c: &mut Criterion) {
    snapshot_files_of(c, LINKS, "1m");
    if std::env::var_os("KURZ_BENCH_10M").is_some() {
        snapshot_files_of(c, 10 * LINKS, "10m");
    }
}

fn snapshot_files_of(c: &mut Criterion, count: usize, label: &str) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let links = synthetic_links(count, 3);
    let path = dir.path().join(SNAPSHOT_FILE);
    write_snapshot(&path, &links);
    let tsv = dir.path().join("links.tsv");
    let body: String = links
        .iter()
        .map(|(code, url)| format!("{code}\t{url}\n"))
        .collect();
    std::fs::write(&tsv, body).expect("write tsv");
    drop(links);

    let mut group = c.benchmark_group("snapshot");
    group.sample_size(10);
    group.bench_function(format!("open_{label}"), |b| {
        b.iter(|| Snapshot::open(&path).expect("open").header().link_count)
    });
    group.bench_function(format!("import_tsv_{label}"), |b| {
        b.iter_batched(
            || tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir"),
            |data| {
                let store = Store::open(data.path(), options(FsyncPolicy::Always)).expect("open");
                let report =
                    datafile::import(&store, &tsv, &ImportOptions::default()).expect("import");
                assert_eq!(report.imported, count as u64);
                store.close();
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// Start-up after a crash with one million records in the WAL and none in the snapshot.
fn recovery(c: &mut Criterion) {
    const RECORDS: usize = 1_000_000;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let links = synthetic_links(RECORDS, 4);
    {
        let store = Arc::new(Store::open(dir.path(), options(FsyncPolicy::Never)).expect("open"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        for chunk in links.chunks(CONCURRENT_CREATES * 4) {
            let tasks: Vec<_> = chunk
                .iter()
                .map(|(code, url)| {
                    let store = store.clone();
                    let link = link(code, url);
                    runtime.spawn(async move { store.create(link).await })
                })
                .collect();
            runtime.block_on(async {
                for task in tasks {
                    task.await.expect("join").expect("create");
                }
            });
        }
        drop(runtime);
        Arc::try_unwrap(store).ok().expect("sole owner").close();
    }
    let mut group = c.benchmark_group("recovery");
    group.sample_size(10);
    group.bench_function("replay_1m_wal_records", |b| {
        b.iter(|| {
            let store = Store::open(dir.path(), options(FsyncPolicy::Never)).expect("reopen");
            assert_eq!(store.recovery().wal_records_replayed, RECORDS as u64);
            store.close();
        })
    });
    group.finish();
}

criterion_group!(benches, lookups, creates, snapshot_files, recovery);
criterion_main!(benches);
