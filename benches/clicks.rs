//! Click-count persistence benchmarks over a 1M-link snapshot: appending the counts that changed
//! (what the checkpoint thread does every second) and rewriting every count, for clicks spread
//! uniformly over the links (the worst case: nearly every click changes another link).
//!
//! Run: `cargo bench --bench clicks` (results in PERFORMANCE.md).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use kurz::analytics::ClickCounters;
use kurz::store::snapshot::Snapshot;
use kurz::store::SnapshotSlot;

mod common;

use common::{synthetic_links, write_snapshot};

const LINKS: usize = 1_000_000;
/// Links clicked between two checkpoints: a second of uniform traffic at 100k redirects/s.
const CHANGED: usize = 100_000;
/// Links with a count when every count is rewritten.
const CLICKED: usize = 600_000;

/// Clicks `count` links spread over the table, starting at the `offset`-th.
fn click_spread(
    counters: &ClickCounters,
    snapshot: &Snapshot,
    codes: &[String],
    (offset, count): (usize, usize),
) {
    for i in 0..count {
        let code = &codes[(offset + i * 7_919) % codes.len()];
        let slot = snapshot.lookup_slot(code).map(|(slot, _)| SnapshotSlot {
            snapshot_id: snapshot.id(),
            slot,
        });
        counters.record(code, slot, None, 1_800_000_000);
    }
}

fn persistence(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let links = synthetic_links(LINKS, 11);
    let path = dir.path().join("snapshot.kurz");
    write_snapshot(&path, &links);
    let snapshot = Arc::new(Snapshot::open(&path).expect("open"));
    let codes: Vec<String> = links.into_iter().map(|(code, _)| code).collect();
    let counters = ClickCounters::default();
    counters.follow(snapshot.clone());
    click_spread(&counters, &snapshot, &codes, (0, CLICKED));
    counters.save(dir.path()).expect("save");

    let mut group = c.benchmark_group("click_counts");
    group.sample_size(10);
    group.throughput(Throughput::Elements(CHANGED as u64));
    let mut round = 0;
    group.bench_function("save_changes_100k_of_1m", |b| {
        b.iter_batched(
            || {
                round += 1;
                click_spread(&counters, &snapshot, &codes, (round * 13, CHANGED));
            },
            |()| counters.save_changes(dir.path()).expect("save changes"),
            BatchSize::PerIteration,
        )
    });
    group.throughput(Throughput::Elements(CLICKED as u64));
    group.bench_function("save_all_600k_of_1m", |b| {
        b.iter(|| counters.save(dir.path()).expect("save"))
    });
    group.finish();
}

criterion_group!(benches, persistence);
criterion_main!(benches);
