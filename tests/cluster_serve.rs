//! `kurz serve --nats` end to end: every test starts its own 3-server NATS JetStream cluster on
//! loopback ports and real `kurz serve` child processes on ephemeral ports (each stopped by its
//! PID when dropped), and speaks HTTP to them. Deadlines are generous for a loaded 2-core
//! machine and polled, never slept; the one exception is the issue's own promise that a link
//! created on one node redirects from the others within a second.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::nats::NatsCluster;
use common::{add_key, parse_reply, raw_waiting, request, Reply, Server};
use kurz::cluster::shard::shard_of;

/// Deadline for what should take milliseconds (convergence, catching up).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(15);
/// What the issue promises for a link created on one node to redirect from the others.
const REDIRECT_EVERYWHERE_WITHIN: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(10);
/// Long enough for a write to give up on an unreachable NATS (the node retries publishes for
/// 20 s across a failover).
const NATS_DOWN_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts a 3-server NATS cluster and waits until JetStream takes writes.
fn start_nats() -> NatsCluster {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(NatsCluster::start())
}

fn urls(nats: &NatsCluster) -> String {
    nats.urls().join(",")
}

/// API keys shared by every node of a test (one keys file, passed with --keys).
struct Keys {
    dir: tempfile::TempDir,
    write: String,
    admin: String,
}

impl Keys {
    fn new() -> Keys {
        let dir = common::data_dir();
        let write = add_key(dir.path(), "writer", "write");
        let admin = add_key(dir.path(), "ops", "admin");
        Keys { dir, write, admin }
    }

    fn file(&self) -> String {
        self.dir.path().join("keys").display().to_string()
    }
}

/// Starts `kurz serve --nats nats` on `dir` with `extra` flags and waits for /readyz.
fn node(dir: &Path, nats: &str, keys: &Keys, extra: &[&str]) -> Server {
    let file = keys.file();
    let mut args = vec![
        "--nats",
        nats,
        "--keys",
        &file,
        "--workers",
        "1",
        "--cluster-click-flush-ms",
        "50",
    ];
    args.extend_from_slice(extra);
    Server::start(dir, &args)
}

/// Polls `condition` until it holds, panicking with `what` after `timeout`.
fn eventually_within(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        std::thread::sleep(POLL);
    }
}

fn eventually(what: &str, condition: impl FnMut() -> bool) {
    eventually_within(CONVERGE_TIMEOUT, what, condition);
}

/// Whether `code` redirects to `url` on `server`, asked with HEAD so that no click is counted.
fn redirects_to(server: &Server, code: &str, url: &str) -> bool {
    let reply = request(server.public, "HEAD", &format!("/{code}"), &[], b"");
    reply.status == 302 && reply.header("location") == Some(url)
}

fn admin_get(server: &Server, path: &str, key: &str) -> Reply {
    request(server.admin, "GET", path, &[("X-API-Key", key)], b"")
}

fn metric(server: &Server, name: &str) -> Option<f64> {
    let text = request(server.admin, "GET", "/metrics", &[], b"").text();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.trim().parse().ok())
}

fn clicks(server: &Server, key: &str, code: &str) -> u64 {
    let reply = server.with_key("GET", &format!("/api/v1/urls/{code}"), key, "");
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["clicks"].as_u64().expect("clicks")
}

#[test]
fn a_link_created_on_one_node_redirects_from_the_others() {
    let nats = start_nats();
    let keys = Keys::new();
    let dirs: Vec<_> = (0..3).map(|_| common::data_dir()).collect();
    let nodes: Vec<Server> = dirs
        .iter()
        .map(|dir| node(dir.path(), &urls(&nats), &keys, &[]))
        .collect();
    let key = &keys.write;

    let code = nodes[0].create(
        key,
        r#"{"long_url":"https://example.com/cluster","custom_alias":"hello-cluster"}"#,
    );
    assert_eq!(code, "hello-cluster");
    assert!(
        redirects_to(&nodes[0], &code, "https://example.com/cluster"),
        "read-your-writes on the node that took the create"
    );
    eventually_within(
        REDIRECT_EVERYWHERE_WITHIN,
        "nodes 2 and 3 redirect the new link",
        || {
            nodes[1..]
                .iter()
                .all(|node| redirects_to(node, &code, "https://example.com/cluster"))
        },
    );

    // A generated code made on another node, and the alias taken cluster-wide.
    let generated = nodes[1].create(key, r#"{"long_url":"https://example.com/generated"}"#);
    eventually("every node redirects the generated code", || {
        nodes
            .iter()
            .all(|node| redirects_to(node, &generated, "https://example.com/generated"))
    });
    let taken = nodes[2].post_json(
        "/api/v1/shorten",
        key,
        r#"{"long_url":"https://example.com/other","custom_alias":"hello-cluster"}"#,
    );
    assert_eq!(taken.status, 409, "{}", taken.text());
    assert_eq!(taken.code(), "alias_taken");
    assert!(!taken.json()["suggested"]
        .as_array()
        .expect("suggestions")
        .is_empty());

    // A batch goes through the same write path.
    let batch = nodes[2].post_json(
        "/api/v1/shorten/batch",
        key,
        r#"{"items":[{"long_url":"https://example.com/b1","custom_alias":"batch-one"},{"long_url":"https://example.com/b2","custom_alias":"hello-cluster"}]}"#,
    );
    assert_eq!(batch.status, 200, "{}", batch.text());
    let statuses: Vec<_> = batch.json()["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|result| result["status"].as_u64())
        .collect();
    assert_eq!(statuses, [Some(201), Some(409)]);
    eventually("node 1 redirects the batch's link", || {
        redirects_to(&nodes[0], "batch-one", "https://example.com/b1")
    });

    // Change on one node, seen on another; clicks served anywhere count everywhere.
    let patched = nodes[1].with_key(
        "PATCH",
        "/api/v1/urls/hello-cluster",
        key,
        r#"{"long_url":"https://example.com/moved"}"#,
    );
    assert_eq!(patched.status, 200, "{}", patched.text());
    eventually("node 3 follows the change", || {
        redirects_to(&nodes[2], &code, "https://example.com/moved")
    });
    let served_before = clicks(&nodes[0], key, &code);
    for _ in 0..2 {
        assert_eq!(nodes[1].get("/hello-cluster").status, 302);
    }
    for _ in 0..3 {
        assert_eq!(nodes[2].get("/hello-cluster").status, 302);
    }
    eventually("node 1 counts the clicks of nodes 2 and 3", || {
        clicks(&nodes[0], key, &code) == served_before + 5
    });
    let stats = nodes[0].with_key("GET", "/api/v1/stats/hello-cluster", key, "");
    assert_eq!(stats.json()["clicks"], served_before + 5);

    // A click cap holds across nodes once the clicks have reached them.
    let capped = nodes[0].create(
        key,
        r#"{"long_url":"https://example.com/capped","custom_alias":"capped3","max_clicks":3}"#,
    );
    eventually("every node has the capped link", || {
        nodes
            .iter()
            .all(|node| node.with_key("GET", "/api/v1/urls/capped3", key, "").status == 200)
    });
    for _ in 0..3 {
        assert_eq!(nodes[1].get(&format!("/{capped}")).status, 302);
    }
    eventually("node 3 hears of node 2's clicks", || {
        clicks(&nodes[2], key, &capped) == 3
    });
    let refused = nodes[2].get(&format!("/{capped}"));
    assert_eq!(refused.status, 410, "{}", refused.text());

    let deleted = nodes[2].with_key("DELETE", "/api/v1/urls/hello-cluster", key, "");
    assert_eq!(deleted.status, 204);
    eventually("node 1 answers 410 for the deleted link", || {
        nodes[0].get("/hello-cluster").status == 410
    });

    // Readiness, metrics and info show the cluster state.
    for node in &nodes {
        assert_eq!(node.get("/readyz").status, 200);
        eventually("metrics show a caught-up follower", || {
            metric(node, "kurz_cluster_following") == Some(1.0)
                && metric(node, "kurz_cluster_lag_records") == Some(0.0)
                && metric(node, "kurz_cluster_applied_seq").is_some_and(|seq| seq >= 5.0)
        });
        assert_eq!(metric(node, "kurz_ready"), Some(1.0));
    }
    let info = admin_get(&nodes[0], "/admin/info", &keys.admin).json();
    assert_eq!(info["mode"], "cluster");
    assert_eq!(info["cluster"]["shards"], 1);
    assert_eq!(info["cluster"]["bootstrap"]["kind"], "empty");
    assert!(
        info["cluster"]["applied_seq"]
            .as_u64()
            .expect("applied_seq")
            >= 5
    );
    let snapshot = request(
        nodes[0].admin,
        "POST",
        "/admin/snapshot",
        &[("X-API-Key", &keys.admin)],
        b"",
    );
    assert_eq!(snapshot.status, 200, "{}", snapshot.text());
    assert!(snapshot.json()["object_name"]
        .as_str()
        .expect("object_name")
        .contains("snapshot"));
    let reload = request(
        nodes[0].admin,
        "POST",
        "/admin/reload",
        &[("X-API-Key", &keys.admin)],
        b"",
    );
    assert_eq!(reload.status, 409, "a cluster node does not reload by hand");
    for node in nodes {
        assert!(node.terminate().success(), "a clean shutdown on SIGTERM");
    }
}

#[test]
fn the_same_alias_posted_at_once_to_two_nodes_gets_one_201_and_one_409() {
    let nats = start_nats();
    let keys = Keys::new();
    let dirs: Vec<_> = (0..2).map(|_| common::data_dir()).collect();
    // Each node talks to a different NATS server, as two kurz machines would.
    let nodes: Vec<Server> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| node(dir.path(), &nats.url(i), &keys, &[]))
        .collect();
    let nodes = Arc::new(nodes);
    for round in 0..10 {
        let alias = format!("race{round}");
        let barrier = Arc::new(Barrier::new(2));
        let posts: Vec<_> = (0..2)
            .map(|i| {
                let (nodes, barrier, alias, key) = (
                    nodes.clone(),
                    barrier.clone(),
                    alias.clone(),
                    keys.write.clone(),
                );
                std::thread::spawn(move || {
                    let body = format!(
                        r#"{{"long_url":"https://node{i}.example/","custom_alias":"{alias}"}}"#
                    );
                    barrier.wait();
                    let reply = nodes[i].post_json("/api/v1/shorten", &key, &body);
                    (reply.status, i)
                })
            })
            .collect();
        let mut answers: Vec<(u16, usize)> = posts
            .into_iter()
            .map(|post| post.join().expect("post thread"))
            .collect();
        answers.sort();
        assert_eq!(
            answers
                .iter()
                .map(|(status, _)| *status)
                .collect::<Vec<_>>(),
            [201, 409],
            "{alias}: {answers:?}"
        );
        let winner = format!("https://node{}.example/", answers[0].1);
        eventually("both nodes redirect to the winner", || {
            nodes.iter().all(|node| redirects_to(node, &alias, &winner))
        });
    }
}

/// A create whose answer may take as long as a node's publish retries.
fn post_waiting(server: &Server, key: &str, body: &str) -> Reply {
    let head = format!(
        "POST /api/v1/shorten HTTP/1.1\r\nHost: kurz.test\r\nConnection: close\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let bytes =
        raw_waiting(server.public, head.as_bytes(), NATS_DOWN_ANSWER_TIMEOUT).expect("an answer");
    parse_reply(&bytes)
}

#[test]
fn a_killed_node_serves_the_links_created_while_it_was_down() {
    let mut nats = start_nats();
    let keys = Keys::new();
    let (dir_a, dir_b) = (common::data_dir(), common::data_dir());
    let a = node(dir_a.path(), &urls(&nats), &keys, &[]);
    let b = node(dir_b.path(), &urls(&nats), &keys, &[]);
    let url = |i: usize| format!("https://example.com/early{i}");
    for i in 0..5 {
        let body = format!(r#"{{"long_url":"{}","custom_alias":"early{i}"}}"#, url(i));
        a.create(&keys.write, &body);
    }
    eventually("node b has the early links", || {
        (0..5).all(|i| redirects_to(&b, &format!("early{i}"), &url(i)))
    });
    let snapshot = request(
        b.admin,
        "POST",
        "/admin/snapshot",
        &[("X-API-Key", &keys.admin)],
        b"",
    );
    assert_eq!(snapshot.status, 200, "{}", snapshot.text());
    b.kill9();

    let mut made_while_down = Vec::new();
    for i in 0..10 {
        let code = a.create(
            &keys.write,
            &format!(r#"{{"long_url":"{}"}}"#, url(100 + i)),
        );
        made_while_down.push((code, url(100 + i)));
    }
    let b = node(dir_b.path(), &urls(&nats), &keys, &[]);
    eventually("the restarted node serves every link", || {
        made_while_down
            .iter()
            .all(|(code, url)| redirects_to(&b, code, url))
            && (0..5).all(|i| redirects_to(&b, &format!("early{i}"), &url(i)))
    });
    let info = admin_get(&b, "/admin/info", &keys.admin).json();
    assert_eq!(info["cluster"]["bootstrap"]["kind"], "resumed", "{info}");

    // The whole NATS cluster down: redirects go on from memory, writes answer 503.
    for i in 0..3 {
        nats.kill(i);
    }
    for node in [&a, &b] {
        eventually("the node notices it lost the stream", || {
            metric(node, "kurz_cluster_following") == Some(0.0)
        });
        assert!(redirects_to(node, "early0", &url(0)));
        let (code, target) = &made_while_down[0];
        assert!(redirects_to(node, code, target));
        assert_eq!(node.get("/readyz").status, 200, "it still serves redirects");
    }
    let refused = post_waiting(
        &a,
        &keys.write,
        r#"{"long_url":"https://example.com/nats-down"}"#,
    );
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.code(), "cluster_unavailable");
}

#[test]
fn two_shard_groups_each_serve_their_own_codes() {
    let nats = start_nats();
    let keys = Keys::new();
    let (dir_0, dir_1) = (common::data_dir(), common::data_dir());
    let shard_0 = node(
        dir_0.path(),
        &urls(&nats),
        &keys,
        &["--shards", "2", "--shard-set", "0"],
    );
    let shard_1 = node(
        dir_1.path(),
        &urls(&nats),
        &keys,
        &["--shards", "2", "--shard-set", "1"],
    );
    let in_shard = |shard: u32| {
        (0..)
            .map(|i| format!("sharded{i}"))
            .find(|code| shard_of(code, 2) == shard)
            .expect("a code of every shard")
    };
    let (code_0, code_1) = (in_shard(0), in_shard(1));
    let body = |code: &str| {
        format!(r#"{{"long_url":"https://example.com/{code}","custom_alias":"{code}"}}"#)
    };

    let misrouted = shard_1.post_json("/api/v1/shorten", &keys.write, &body(&code_0));
    assert_eq!(misrouted.status, 421, "{}", misrouted.text());
    assert_eq!(misrouted.code(), "wrong_shard");
    assert_eq!(misrouted.json()["shard"], 0);
    shard_0.create(&keys.write, &body(&code_0));
    shard_1.create(&keys.write, &body(&code_1));

    // Each code's owner redirects; the other group answers 421 Misdirected Request, never 404.
    assert!(redirects_to(
        &shard_0,
        &code_0,
        &format!("https://example.com/{code_0}")
    ));
    assert!(redirects_to(
        &shard_1,
        &code_1,
        &format!("https://example.com/{code_1}")
    ));
    assert_eq!(shard_1.get(&format!("/{code_0}")).status, 421);
    let api_read = shard_1.with_key("GET", &format!("/api/v1/urls/{code_0}"), &keys.write, "");
    assert_eq!(api_read.status, 421, "{}", api_read.text());
    assert_eq!(api_read.json()["shard"], 0);
    assert_eq!(shard_0.get(&format!("/{code_1}")).status, 421);
    let unknown_1 = (0..)
        .map(|i| format!("nothing{i}"))
        .find(|code| shard_of(code, 2) == 1)
        .expect("a code of shard 1");
    assert_eq!(shard_1.get(&format!("/{unknown_1}")).status, 404);
    assert_eq!(shard_0.get(&format!("/{unknown_1}")).status, 421);

    // Generated codes land in the shards of the node that made them.
    for _ in 0..10 {
        let code = shard_1.create(&keys.write, r#"{"long_url":"https://example.com/any"}"#);
        assert_eq!(shard_of(&code, 2), 1, "{code}");
    }
    for server in [&shard_0, &shard_1] {
        assert_eq!(server.get("/readyz").status, 200);
        let info = admin_get(server, "/admin/info", &keys.admin).json();
        assert_eq!(info["cluster"]["shards"], 2);
    }
    assert_eq!(
        admin_get(&shard_0, "/admin/info", &keys.admin).json()["cluster"]["shard_set"],
        serde_json::json!([0])
    );
}

#[test]
fn cluster_flags_without_nats_a_missing_shard_or_a_cluster_data_dir_are_refused() {
    let fresh_dir = common::data_dir();
    let cluster_dir = common::data_dir();
    std::fs::write(
        cluster_dir.path().join(kurz::cluster::datadir::MARKER_FILE),
        r#"{"stream":"KURZ_LINKS","layout":"all-1"}"#,
    )
    .expect("write the marker");
    let missing_shard = [
        "--nats",
        "nats://127.0.0.1:1",
        "--shards",
        "2",
        "--shard-set",
        "0,2",
    ];
    for (args, dir, expected) in [
        (&["--shard-set", "1"][..], fresh_dir.path(), "--nats"),
        (
            &missing_shard[..],
            fresh_dir.path(),
            "shard 2 does not exist",
        ),
        (&[][..], cluster_dir.path(), "belongs to a cluster node"),
    ] {
        let mut child = common::kurz()
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kurz serve");
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for kurz serve") {
                break status;
            }
            if started.elapsed() > CONVERGE_TIMEOUT {
                // Stopped by its PID: a server that did not refuse the flags runs on.
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?}: kurz serve started instead of refusing the flags");
            }
            std::thread::sleep(POLL);
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            pipe.read_to_string(&mut stderr).expect("read stderr");
        }
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// HAProxy running `deploy/haproxy-shards.cfg`, stopped by its PID when dropped.
#[test]
fn the_example_haproxy_routing_in_front_of_two_shard_groups_serves_every_code() {
    let nats = start_nats();
    let keys = Keys::new();
    let dirs: Vec<_> = (0..4).map(|_| common::data_dir()).collect();
    // Nodes 0 and 1 hold shard 0, nodes 2 and 3 shard 1, as the example config names them.
    let nodes: Vec<Server> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            let shard = (i / 2).to_string();
            node(
                dir.path(),
                &urls(&nats),
                &keys,
                &["--shards", "2", "--shard-set", &shard],
            )
        })
        .collect();
    let front = common::nats::free_ports(1)[0];
    let front_addr: std::net::SocketAddr = ([127, 0, 0, 1], front).into();
    let addresses = [0, 1, 2, 3].map(|i| nodes[i].public);
    let _front = common::haproxy::ShardFront::start(front_addr, addresses);
    let through = |method: &str, path: &str, body: &str| {
        let mut headers = vec![("X-API-Key", keys.write.as_str())];
        if !body.is_empty() {
            headers.push(("Content-Type", "application/json"));
        }
        common::try_request(front_addr, method, path, &headers, body.as_bytes())
    };
    eventually("haproxy answers", || {
        through("GET", "/readyz", "").is_ok_and(|reply| reply.status == 200)
    });

    let mut made = Vec::new();
    for i in 0..20 {
        let url = format!("https://example.com/front{i}");
        let reply = through(
            "POST",
            "/api/v1/shorten",
            &format!(r#"{{"long_url":"{url}"}}"#),
        )
        .expect("create through haproxy");
        assert_eq!(reply.status, 201, "{}", reply.text());
        made.push((
            reply.json()["short_code"]
                .as_str()
                .expect("code")
                .to_owned(),
            url,
        ));
    }
    assert!(
        made.iter().any(|(code, _)| shard_of(code, 2) == 0)
            && made.iter().any(|(code, _)| shard_of(code, 2) == 1),
        "round robin spreads creates over both groups: {made:?}"
    );
    for (code, url) in &made {
        eventually("the code redirects through haproxy", || {
            through("HEAD", &format!("/{code}"), "").is_ok_and(|reply| {
                reply.status == 302 && reply.header("location") == Some(url.as_str())
            })
        });
        let read = through("GET", &format!("/api/v1/urls/{code}"), "").expect("read");
        assert_eq!(read.status, 200, "{}", read.text());
    }

    // A custom alias may reach the other group first (421); a retry reaches its own group.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let reply = through(
            "POST",
            "/api/v1/shorten",
            r#"{"long_url":"https://example.com/alias","custom_alias":"front-alias"}"#,
        )
        .expect("create through haproxy");
        statuses.push(reply.status);
        if reply.status == 201 {
            break;
        }
        assert_eq!(reply.code(), "wrong_shard", "{}", reply.text());
    }
    assert_eq!(statuses.last(), Some(&201), "{statuses:?}");
}

/// Create latency through the HTTP API of a cluster node and how soon another node redirects the
/// new link, printed for PERFORMANCE.md. Run by hand: `cargo nextest run --cargo-profile ci
/// --test cluster_serve --run-ignored only --no-capture measure`.
#[test]
#[ignore = "a measurement, not a check; run by hand"]
fn measure_http_creates_and_convergence() {
    let nats = start_nats();
    let keys = Keys::new();
    let (dir_a, dir_b) = (common::data_dir(), common::data_dir());
    let unlimited = [
        "--rate-limit-per-s",
        "1000000",
        "--rate-limit-burst",
        "1000000",
    ];
    let a = node(dir_a.path(), &urls(&nats), &keys, &unlimited);
    let b = node(dir_b.path(), &urls(&nats), &keys, &unlimited);
    let mut create_us = Vec::new();
    let mut converge_us = Vec::new();
    for i in 0..500 {
        let url = format!("https://example.com/measure{i}");
        let started = Instant::now();
        let code = a.create(&keys.write, &format!(r#"{{"long_url":"{url}"}}"#));
        create_us.push(started.elapsed().as_micros() as u64);
        let started = Instant::now();
        eventually("node b redirects", || redirects_to(&b, &code, &url));
        converge_us.push(started.elapsed().as_micros() as u64);
    }
    for (what, mut samples) in [
        (
            "POST /api/v1/shorten on node a (one connection per request)",
            create_us,
        ),
        ("node b redirects it, counted from the 201", converge_us),
    ] {
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
        println!(
            "{what}: p50 {} us, p99 {} us, max {} us",
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
}
