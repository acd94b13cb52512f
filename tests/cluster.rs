//! Cluster mode against real NATS: every test starts its own 3-server JetStream cluster on
//! loopback ports (stopped by PID when the test ends) and runs kurz cluster nodes with their own
//! data dirs, in process or, for the crash test, as a child process killed with SIGKILL.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::nats::NatsCluster;
use kurz::cluster::clicks::ClickCounter;
use kurz::cluster::{Bootstrap, ClusterError, ClusterNode, ClusterOptions};
use kurz::store::link::{Link, LinkMeta, LinkStatus};
use kurz::store::StoreError;

/// Deadline for anything that should take milliseconds (convergence, catching up), generous
/// for a loaded 2-core machine: tests poll until it, never sleep a fixed time and assert.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(10);

const CHILD_DIR_ENV: &str = "KURZ_CLUSTER_TEST_CHILD_DIR";
const CHILD_NATS_ENV: &str = "KURZ_CLUSTER_TEST_CHILD_NATS";
const CHILD_SNAPSHOT_AT_ENV: &str = "KURZ_CLUSTER_TEST_CHILD_SNAPSHOT_AT";

/// Creates, convergence and bootstrap through a real 3-server cluster, printed for
/// PERFORMANCE.md. Run by hand: `cargo nextest run --cargo-profile ci -E 'test(measure)'
/// --run-ignored only --no-capture` (KURZ_MEASURE_LINKS sets the bootstrap size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check; run by hand"]
async fn measure_creates_convergence_and_bootstrap() {
    let links: usize = std::env::var("KURZ_MEASURE_LINKS")
        .ok()
        .and_then(|links| links.parse().ok())
        .unwrap_or(100_000);
    let nats = NatsCluster::start().await;
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let a = std::sync::Arc::new(start_node(options(nats.urls(), dirs[0].path())).await);
    let b = start_node(options(nats.urls(), dirs[1].path())).await;

    let mut latencies_us = Vec::new();
    for i in 0..1_000 {
        let started = Instant::now();
        a.create(link(&format!("seq{i}"))).await.expect("create");
        latencies_us.push(started.elapsed().as_micros() as u64);
    }
    latencies_us.sort();
    let at = |q: f64| latencies_us[((latencies_us.len() - 1) as f64 * q) as usize];
    println!(
        "sequential create (publish, R3 ack, local apply): p50 {} us, p99 {} us, max {} us",
        at(0.5),
        at(0.99),
        at(1.0)
    );

    let mut convergence_us = Vec::new();
    for i in 0..200 {
        let code = format!("conv{i}");
        a.create(link(&code)).await.expect("create");
        let started = Instant::now();
        while b.store().get(&code).is_none() {
            tokio::task::yield_now().await;
        }
        convergence_us.push(started.elapsed().as_micros() as u64);
    }
    convergence_us.sort();
    println!(
        "convergence on another node after the create returned: p50 {} us, max {} us",
        convergence_us[convergence_us.len() / 2],
        convergence_us[convergence_us.len() - 1]
    );

    let in_flight = 256;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..in_flight {
        let a = a.clone();
        tasks.spawn(async move {
            for i in (worker..links).step_by(in_flight) {
                a.create(link(&format!("bulk{i}"))).await.expect("create");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("create task");
    }
    let took = started.elapsed();
    println!(
        "{links} creates, {in_flight} in flight on one node: {:?}, {:.0} creates/s",
        took,
        links as f64 / took.as_secs_f64()
    );
    let last = a.stream_last_seq().await.expect("stream info");
    eventually("node b caught up", || b.applied_seq() == last).await;

    let upload = a.snapshot_and_upload().await.expect("snapshot");
    println!(
        "snapshot of {} links: written in {} ms, {} bytes uploaded in {} ms",
        upload.link_count, upload.snapshot_ms, upload.file_bytes, upload.upload_ms
    );
    for i in 0..1_000 {
        a.create(link(&format!("tail{i}"))).await.expect("create");
    }
    let started = Instant::now();
    let fresh = start_node(options(nats.urls(), dirs[2].path())).await;
    let total = a.store().live_links();
    eventually("the fresh node caught up", || {
        fresh.store().live_links() == total && fresh.ready()
    })
    .await;
    println!(
        "fresh node with {total} links: {:?} (download and open: {:?})",
        started.elapsed(),
        fresh.bootstrap()
    );
}

fn options(urls: Vec<String>, dir: &Path) -> ClusterOptions {
    ClusterOptions::new(urls, dir.to_owned())
}

/// Starts a node, retrying while a node dropped a moment ago still holds the data dir's lock.
async fn start_node(options: ClusterOptions) -> ClusterNode {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        match ClusterNode::start(options.clone()).await {
            Ok(node) => return node,
            Err(ClusterError::Store(StoreError::Locked { .. })) if Instant::now() < deadline => {
                tokio::time::sleep(POLL).await
            }
            Err(error) => panic!("start node on {}: {error}", options.data_dir.display()),
        }
    }
}

fn link(code: &str) -> Link {
    Link {
        code: code.to_owned(),
        long_url: format!("https://example.com/{code}"),
        meta: LinkMeta::new(1_700_000_000),
    }
}

/// Polls `condition` until it holds, panicking with `what` at the deadline.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < CONVERGE_TIMEOUT,
            "{what}: not within {CONVERGE_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
    started.elapsed()
}

fn url_of(node: &ClusterNode, code: &str) -> Option<String> {
    node.store().get(code).map(|link| link.long_url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_created_on_one_node_is_seen_on_the_others() {
    let nats = NatsCluster::start().await;
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let mut nodes = Vec::new();
    for dir in &dirs {
        nodes.push(start_node(options(nats.urls(), dir.path())).await);
    }
    for node in &nodes {
        eventually("node ready", || node.ready()).await;
    }

    let mut convergence = Vec::new();
    for i in 0..20 {
        let code = format!("seen{i}");
        let seq = nodes[0].create(link(&code)).await.expect("create");
        assert_eq!(
            url_of(&nodes[0], &code).as_deref(),
            Some(format!("https://example.com/{code}").as_str()),
            "read-your-writes on the node that took the write"
        );
        assert!(nodes[0].applied_seq() >= seq);
        let took = eventually("the other nodes see the link", || {
            nodes[1..].iter().all(|node| url_of(node, &code).is_some())
        })
        .await;
        convergence.push(took);
    }
    convergence.sort();
    eprintln!(
        "convergence to 2 other nodes after the create returned: median {:?}, max {:?}",
        convergence[convergence.len() / 2],
        convergence[convergence.len() - 1]
    );

    let changed = nodes[1]
        .update("seen3", |current| {
            let mut changed = current.clone();
            changed.long_url = "https://example.org/changed".into();
            Ok::<Link, ()>(changed)
        })
        .await
        .expect("update")
        .expect("change accepted");
    assert_eq!(changed.long_url, "https://example.org/changed");
    let tombstone = nodes[2]
        .delete("seen4", 1_700_000_500)
        .await
        .expect("delete");
    assert_eq!(tombstone.meta.status, LinkStatus::Deleted);
    eventually("update and delete reach every node", || {
        nodes.iter().all(|node| {
            url_of(node, "seen3").as_deref() == Some("https://example.org/changed")
                && node.store().get("seen4").map(|l| l.meta.status) == Some(LinkStatus::Deleted)
        })
    })
    .await;
    assert!(matches!(
        nodes[0].create(link("seen4")).await,
        Err(ClusterError::CodeTaken(code)) if code == "seen4"
    ));
    assert!(matches!(
        nodes[0].delete("never-made", 1).await,
        Err(ClusterError::NotFound(_))
    ));
    assert!(matches!(
        nodes[0].create(link("bad.code")).await,
        Err(ClusterError::InvalidCode(_))
    ));
    let last = nodes[0].stream_last_seq().await.expect("stream info");
    eventually("every node applied the whole stream", || {
        nodes.iter().all(|node| node.applied_seq() == last)
    })
    .await;
    for node in &nodes {
        assert_eq!(node.store().live_links(), 19);
        assert_eq!(node.lag_records(), 0);
        assert!(node.ready());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_alias_created_at_once_on_two_nodes_has_one_winner() {
    let nats = NatsCluster::start().await;
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    // Each node talks to a different NATS server, as two kurz machines would.
    let a = start_node(options(vec![nats.url(0)], dir_a.path())).await;
    let b = start_node(options(vec![nats.url(1)], dir_b.path())).await;
    for i in 0..30 {
        let code = format!("race{i}");
        let mut from_a = link(&code);
        from_a.long_url = "https://a.example/".into();
        let mut from_b = link(&code);
        from_b.long_url = "https://b.example/".into();
        let (won_a, won_b) = tokio::join!(a.create(from_a), b.create(from_b));
        let winner = match (&won_a, &won_b) {
            (Ok(_), Err(ClusterError::CodeTaken(_))) => "https://a.example/",
            (Err(ClusterError::CodeTaken(_)), Ok(_)) => "https://b.example/",
            other => panic!("{code}: expected exactly one winner, got {other:?}"),
        };
        eventually("both nodes agree on the winner", || {
            url_of(&a, &code).as_deref() == Some(winner)
                && url_of(&b, &code).as_deref() == Some(winner)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_keep_succeeding_while_one_nats_server_is_down() {
    let mut nats = NatsCluster::start().await;
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let a = start_node(options(nats.urls(), dir_a.path())).await;
    let b = start_node(options(nats.urls(), dir_b.path())).await;
    for i in 0..10 {
        a.create(link(&format!("before{i}"))).await.expect("create");
    }
    // Stop the stream's leader: the hardest server to lose (a new leader must be elected).
    let leader = stream_leader(&nats).await;
    nats.kill(leader);
    for i in 0..20 {
        let node = if i % 2 == 0 { &a } else { &b };
        node.create(link(&format!("down{i}")))
            .await
            .unwrap_or_else(|error| panic!("create with server n{leader} down: {error}"));
    }
    nats.restart(leader);
    nats.wait_jetstream_ready(&[nats.url(leader)]).await;
    for i in 0..10 {
        b.create(link(&format!("after{i}"))).await.expect("create");
    }
    let total = 10 + 20 + 10;
    eventually("both nodes hold every link", || {
        a.store().live_links() == total && b.store().live_links() == total
    })
    .await;

    // Nothing lost on the servers either: each one, asked alone, holds every record.
    for i in 0..3 {
        let client = async_nats::connect(nats.url(i)).await.expect("connect");
        let jetstream = async_nats::jetstream::new(client);
        let started = Instant::now();
        loop {
            let messages = jetstream
                .get_stream(kurz::cluster::STREAM_NAME_DEFAULT)
                .await
                .expect("stream")
                .get_info()
                .await
                .map(|info| info.state.messages);
            if messages.as_ref().ok() == Some(&total) {
                break;
            }
            assert!(
                started.elapsed() < CONVERGE_TIMEOUT,
                "server {i}: stream holds {messages:?}, not {total}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The index of the server leading the link stream.
async fn stream_leader(nats: &NatsCluster) -> usize {
    let client = async_nats::connect(nats.urls()).await.expect("connect");
    let info = async_nats::jetstream::new(client)
        .get_stream(kurz::cluster::STREAM_NAME_DEFAULT)
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("stream info");
    let leader = info
        .cluster
        .and_then(|cluster| cluster.leader)
        .expect("a leader");
    leader
        .strip_prefix('n')
        .and_then(|index| index.parse().ok())
        .expect("servers are named n0, n1, n2")
}

/// The crash test's node: runs only as the child process `a_killed_node_catches_up` starts.
/// Follows the stream, snapshots once it has applied the given sequence, says so, and then
/// keeps following until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_test_child_node() {
    let (Ok(dir), Ok(urls), Ok(snapshot_at)) = (
        std::env::var(CHILD_DIR_ENV),
        std::env::var(CHILD_NATS_ENV),
        std::env::var(CHILD_SNAPSHOT_AT_ENV),
    ) else {
        return;
    };
    // Never outlive the parent test: it holds this process's stdin, closed when it exits.
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(0);
    });
    let snapshot_at: u64 = snapshot_at.parse().expect("sequence");
    let urls = urls.split(',').map(str::to_owned).collect();
    let node = start_node(options(urls, Path::new(&dir))).await;
    eventually("the child applied the parent's links", || {
        node.applied_seq() >= snapshot_at
    })
    .await;
    let upload = node.snapshot_and_upload().await.expect("snapshot");
    println!("snapshot {}", upload.covered_seq);
    std::future::pending::<()>().await;
}

/// The crash test's child process, killed by its PID if the test ends early.
struct ChildNode(Child);

impl Drop for ChildNode {
    fn drop(&mut self) {
        // Killed and reaped already when the test ran through.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_catches_up_on_restart() {
    let nats = NatsCluster::start().await;
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_victim = tempfile::tempdir().expect("tempdir");
    let a = start_node(options(nats.urls(), dir_a.path())).await;
    let mut last_seq = 0;
    for i in 0..20 {
        last_seq = a.create(link(&format!("early{i}"))).await.expect("create");
    }

    let mut child = ChildNode(
        Command::new(std::env::current_exe().expect("test binary"))
            .args(["crash_test_child_node", "--exact", "--nocapture"])
            .env(CHILD_DIR_ENV, dir_victim.path())
            .env(CHILD_NATS_ENV, nats.urls().join(","))
            .env(CHILD_SNAPSHOT_AT_ENV, last_seq.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the child node"),
    );
    let stdout = child.0.stdout.take().expect("child stdout");
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let covered_seq = tokio::task::spawn_blocking(move || loop {
        match lines_rx.recv_timeout(CONVERGE_TIMEOUT) {
            Ok(line) => {
                if let Some(seq) = line.strip_prefix("snapshot ") {
                    return seq.parse::<u64>().expect("covered seq");
                }
            }
            Err(error) => panic!("the child node never snapshotted: {error}"),
        }
    })
    .await
    .expect("reader");
    assert!(covered_seq >= last_seq);

    for i in 0..10 {
        a.create(link(&format!("while_up{i}")))
            .await
            .expect("create");
    }
    child.0.kill().expect("SIGKILL the child node");
    child.0.wait().expect("reap the child node");
    for i in 0..30 {
        a.create(link(&format!("while_down{i}")))
            .await
            .expect("create");
    }
    a.update("early0", |current| {
        let mut changed = current.clone();
        changed.long_url = "https://example.org/moved".into();
        Ok::<Link, ()>(changed)
    })
    .await
    .expect("update")
    .expect("accepted");

    let victim = start_node(options(nats.urls(), dir_victim.path())).await;
    assert_eq!(victim.bootstrap(), &Bootstrap::Resumed { covered_seq });
    eventually("the restarted node catches up", || {
        victim.store().live_links() == 60
            && url_of(&victim, "early0").as_deref() == Some("https://example.org/moved")
            && victim.ready()
    })
    .await;
    for i in 0..30 {
        assert!(url_of(&victim, &format!("while_down{i}")).is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_node_bootstraps_from_the_snapshot_and_the_tail() {
    let nats = NatsCluster::start().await;
    let dir_a = tempfile::tempdir().expect("tempdir");
    let a = start_node(options(nats.urls(), dir_a.path())).await;
    let fresh_dir = tempfile::tempdir().expect("tempdir");
    let empty = start_node(options(nats.urls(), &fresh_dir.path().join("first"))).await;
    assert_eq!(
        empty.bootstrap(),
        &Bootstrap::Empty,
        "no snapshot uploaded yet"
    );
    empty.shutdown().await;

    for i in 0..200 {
        a.create(link(&format!("snap{i}"))).await.expect("create");
    }
    let first = a.snapshot_and_upload().await.expect("snapshot");
    for i in 0..50 {
        a.create(link(&format!("more{i}"))).await.expect("create");
    }
    let second = a.snapshot_and_upload().await.expect("second snapshot");
    assert!(second.covered_seq > first.covered_seq);
    assert_eq!(second.link_count, 250);
    for i in 0..20 {
        a.create(link(&format!("tail{i}"))).await.expect("create");
    }
    a.delete("snap7", 1_700_000_900).await.expect("delete");

    let started = Instant::now();
    let fresh = start_node(options(nats.urls(), &fresh_dir.path().join("second"))).await;
    match fresh.bootstrap() {
        Bootstrap::Downloaded {
            covered_seq,
            object_name,
            ..
        } => {
            assert_eq!(*covered_seq, second.covered_seq);
            assert_eq!(*object_name, second.object_name);
        }
        other => panic!("expected a downloaded snapshot, got {other:?}"),
    }
    // The follower may already be replaying the tail, so the snapshot is checked by its header.
    let opened = fresh.store().snapshot_header();
    assert_eq!(opened.link_count, 250, "the snapshot alone");
    assert_eq!(opened.covered_seq, second.covered_seq);
    eventually("the fresh node replays the tail", || {
        fresh.store().live_links() == 269 && fresh.ready()
    })
    .await;
    eprintln!(
        "fresh node: started, downloaded {:?} and caught up in {:?}",
        fresh.bootstrap(),
        started.elapsed()
    );
    assert_eq!(
        fresh.store().get("snap7").map(|link| link.meta.status),
        Some(LinkStatus::Deleted)
    );
    assert!(url_of(&fresh, "tail19").is_some());

    let single_node_dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(single_node_dir.path().join("snapshot.kurz"), b"x").expect("write");
    assert!(matches!(
        ClusterNode::start(options(nats.urls(), single_node_dir.path())).await,
        Err(ClusterError::DataDir(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shard_groups_hold_only_their_shards() {
    let nats = NatsCluster::start().await;
    let dirs: Vec<_> = (0..4)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let mut nodes = Vec::new();
    // Two nodes per shard group.
    for (i, dir) in dirs.iter().enumerate() {
        let mut options = options(nats.urls(), dir.path());
        options.shards = 2;
        options.shard_set = vec![(i % 2) as u32];
        nodes.push(start_node(options).await);
    }
    let codes: Vec<String> = (0..60).map(|i| format!("shard{i}")).collect();
    for code in &codes {
        let owner = nodes
            .iter()
            .find(|node| node.holds_code(code))
            .expect("some node holds every shard");
        let stranger = nodes
            .iter()
            .find(|node| !node.holds_code(code))
            .expect("some node does not");
        assert!(matches!(
            stranger.create(link(code)).await,
            Err(ClusterError::WrongShard { .. })
        ));
        owner.create(link(code)).await.expect("create");
    }
    let in_shard_0 = codes
        .iter()
        .filter(|code| kurz::cluster::shard::shard_of(code, 2) == 0)
        .count() as u64;
    assert!(in_shard_0 > 0 && in_shard_0 < 60);
    eventually("each node holds exactly its shard", || {
        nodes.iter().enumerate().all(|(i, node)| {
            let expected = if i % 2 == 0 {
                in_shard_0
            } else {
                60 - in_shard_0
            };
            node.store().live_links() == expected
        })
    })
    .await;
    for node in &nodes {
        for code in &codes {
            assert_eq!(node.store().get(code).is_some(), node.holds_code(code));
        }
        assert!(node.ready());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_ahead_of_a_remade_stream_is_refused() {
    let nats = NatsCluster::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_node(options(nats.urls(), dir.path())).await;
    for i in 0..5 {
        node.create(link(&format!("old{i}"))).await.expect("create");
    }
    node.snapshot_and_upload().await.expect("snapshot");
    node.shutdown().await;

    let client = async_nats::connect(nats.urls()).await.expect("connect");
    async_nats::jetstream::new(client)
        .delete_stream(kurz::cluster::STREAM_NAME_DEFAULT)
        .await
        .expect("delete the stream");
    let refused = ClusterNode::start(options(nats.urls(), dir.path())).await;
    assert!(
        matches!(
            refused,
            Err(ClusterError::AheadOfStream {
                covered_seq: 5,
                stream_last_seq: 0,
                ..
            })
        ),
        "{:?}",
        refused.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_counts_the_clicks_of_the_whole_cluster() {
    let nats = NatsCluster::start().await;
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let a = start_node(options(nats.urls(), dir_a.path())).await;
    let b = start_node(options(nats.urls(), dir_b.path())).await;
    let flush_ms = 50;
    let clicks_a = ClickCounter::start(&a, flush_ms).await.expect("clicks a");
    let clicks_b = ClickCounter::start(&b, flush_ms).await.expect("clicks b");
    for _ in 0..5 {
        clicks_a.record("hot");
    }
    for _ in 0..7 {
        clicks_b.record("hot");
    }
    clicks_b.record("cold");
    assert_eq!(
        clicks_a.total("hot"),
        5,
        "a node's own clicks count at once"
    );
    eventually("both nodes see every click", || {
        clicks_a.total("hot") == 12 && clicks_b.total("hot") == 12 && clicks_a.total("cold") == 1
    })
    .await;

    // A restarted counter (a new process) takes a fresh slot and folds the old ones.
    drop(clicks_a);
    let clicks_a = ClickCounter::start(&a, flush_ms)
        .await
        .expect("clicks a again");
    eventually("the restarted counter folds every slot", || {
        clicks_a.total("hot") == 12
    })
    .await;
    clicks_a.record("hot");
    clicks_a.flush().await.expect("flush");
    eventually("the other node sees the new click", || {
        clicks_b.total("hot") == 13
    })
    .await;
}
