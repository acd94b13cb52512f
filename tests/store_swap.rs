//! Snapshot cycles under load: lookups keep finding every link and writes keep landing while
//! the store writes snapshots and swaps to them; nothing is lost across a reopen.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kurz::store::link::{Link, LinkMeta, LinkStatus};
use kurz::store::snapshot::SnapshotBuilder;
use kurz::store::wal::FsyncPolicy;
use kurz::store::{Store, StoreOptions, SNAPSHOT_FILE};

const BASE_LINKS: u64 = 20_000;
const CYCLES: usize = 8;

fn link(code: String) -> Link {
    Link {
        long_url: format!("https://example.com/{code}"),
        code,
        meta: LinkMeta::new(1_700_000_000),
    }
}

fn options() -> StoreOptions {
    StoreOptions {
        fsync: FsyncPolicy::Always,
    }
}

#[test]
fn snapshot_swap_under_concurrent_lookups_and_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut builder = SnapshotBuilder::default();
    for i in 0..BASE_LINKS {
        builder.add(link(format!("base{i}")).view()).expect("add");
    }
    builder
        .write(&dir.path().join(SNAPSHOT_FILE), 0)
        .expect("write base snapshot");
    let store = Arc::new(Store::open(dir.path(), options()).expect("open"));

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let lookups = Arc::new(AtomicU64::new(0));
    let created: Arc<Mutex<Vec<String>>> = Arc::default();
    let readers: Vec<_> = (0..2)
        .map(|reader| {
            let (store, stop, failures, lookups, created) = (
                store.clone(),
                stop.clone(),
                failures.clone(),
                lookups.clone(),
                created.clone(),
            );
            std::thread::spawn(move || {
                let mut i = reader as u64;
                while !stop.load(Ordering::Relaxed) {
                    let code = format!("base{}", i % BASE_LINKS);
                    let expected = format!("https://example.com/{code}");
                    if !store.lookup(&code, |found| {
                        found.is_some_and(|l| l.long_url == *expected)
                    }) {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    let recent = created.lock().expect("lock").last().cloned();
                    if let Some(code) = recent {
                        if store.get(&code).is_none() {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    lookups.fetch_add(2, Ordering::Relaxed);
                    i += 7919;
                }
            })
        })
        .collect();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let writer = {
        let (store, stop, created) = (store.clone(), stop.clone(), created.clone());
        runtime.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let code = format!("new{i}");
                store
                    .create(link(code.clone()))
                    .await
                    .expect("create during snapshots");
                created.lock().expect("lock").push(code);
                // Also rewrite an earlier link, so overlay entries are replaced while snapshots
                // fold them in.
                if i % 10 == 5 {
                    let earlier = format!("new{}", i - 5);
                    let rewritten = store
                        .update(&earlier, |current| {
                            let mut next = current.clone();
                            next.meta.updated_at_s += 1;
                            Ok::<Link, ()>(next)
                        })
                        .await
                        .expect("update during snapshots");
                    assert!(rewritten.is_ok());
                }
                i += 1;
            }
        })
    };
    for _ in 0..CYCLES {
        std::thread::sleep(Duration::from_millis(30));
        let report = store.snapshot().expect("snapshot under load");
        assert!(report.header.link_count >= BASE_LINKS);
    }
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(writer).expect("writer task");
    for reader in readers {
        reader.join().expect("reader");
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "lookups failed during swaps"
    );
    assert!(lookups.load(Ordering::Relaxed) > 0);

    // A delete leaves a tombstone that survives the reopen.
    let deleted = runtime
        .block_on(store.update("base0", |current| {
            let mut gone = current.clone();
            gone.meta.status = LinkStatus::Deleted;
            Ok::<Link, ()>(gone)
        }))
        .expect("delete");
    assert!(deleted.is_ok());

    let created = created.lock().expect("lock").clone();
    assert!(!created.is_empty());
    let expected_live = BASE_LINKS + created.len() as u64 - 1;
    assert_eq!(store.live_links(), expected_live);
    drop(runtime);
    let store = Arc::try_unwrap(store).ok().expect("sole owner");
    store.close();

    let reopened = Store::open(dir.path(), options()).expect("reopen");
    assert_eq!(reopened.live_links(), expected_live);
    for code in &created {
        assert!(reopened.get(code).is_some(), "{code} lost across reopen");
    }
    let base0 = reopened.get("base0").expect("tombstone kept");
    assert_eq!(base0.meta.status, LinkStatus::Deleted);
    assert!(reopened.get("base1").is_some());
    assert!(reopened.get("nope").is_none());
}
