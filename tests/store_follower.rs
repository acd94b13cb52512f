//! Follower mode (cluster mode's store): records arrive from a replicated log in order,
//! snapshots are taken at a log position, and a local WAL is neither written nor silently lost.

use kurz::store::link::{Link, LinkMeta, LinkStatus};
use kurz::store::wal::FsyncPolicy;
use kurz::store::{Store, StoreError, StoreOptions};

fn link(i: u64) -> Link {
    Link {
        code: format!("f{i}"),
        long_url: format!("https://example.com/{i}"),
        meta: LinkMeta::new(1_700_000_000),
    }
}

#[test]
fn applies_in_order_snapshots_at_a_position_and_reopens_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_follower(dir.path()).expect("open follower");
    for seq in 1..=1000 {
        store.apply_replicated(seq, link(seq));
    }
    let mut gone = link(7);
    gone.meta.status = LinkStatus::Deleted;
    store.apply_replicated(1001, gone);
    assert_eq!(store.live_links(), 999);
    let report = store.snapshot_covering(1001).expect("snapshot");
    assert_eq!(report.header.covered_seq, 1001);
    assert_eq!(report.header.link_count, 1000);
    assert_eq!(
        store.overlay_len(),
        0,
        "the snapshot took over every applied record"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let refused = runtime.block_on(store.create(link(5000)));
    assert!(matches!(refused, Err(StoreError::ReadOnly)), "{refused:?}");
    assert!(
        store.get("f5000").is_none(),
        "a refused create leaves nothing behind"
    );
    store.close();

    let reopened = Store::open_follower(dir.path()).expect("reopen");
    assert_eq!(reopened.snapshot_header().covered_seq, 1001);
    assert_eq!(reopened.live_links(), 999);
    assert_eq!(
        reopened.get("f7").map(|l| l.meta.status),
        Some(LinkStatus::Deleted)
    );
    assert_eq!(
        reopened.get("f1000").map(|l| l.long_url),
        Some("https://example.com/1000".into())
    );
}

#[test]
fn a_data_dir_with_local_writes_is_not_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let single = Store::open(
        dir.path(),
        StoreOptions {
            fsync: FsyncPolicy::Always,
        },
    )
    .expect("open");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(single.create(link(1))).expect("create");
    single.close();
    let refused = Store::open_follower(dir.path());
    assert!(matches!(
        refused,
        Err(StoreError::LocalWalNotEmpty { records: 1, .. })
    ));

    let single = Store::open(
        dir.path(),
        StoreOptions {
            fsync: FsyncPolicy::Always,
        },
    )
    .expect("open");
    single.snapshot().expect("fold the WAL into the snapshot");
    single.close();
    let follower = Store::open_follower(dir.path()).expect("now it can follow");
    assert!(follower.get("f1").is_some());
}
