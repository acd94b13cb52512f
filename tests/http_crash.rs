//! Durability and robustness of the real server: SIGKILL right after acknowledged creates,
//! graceful SIGTERM, snapshot and reload under a redirecting client, and malformed or hostile
//! requests that must not take the server down.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{add_key, data_dir, parse_reply, raw, request, sample_server, KeepAlive, Server};

#[test]
fn every_acknowledged_create_survives_kill_9() {
    let dir = data_dir();
    let key = add_key(dir.path(), "writer", "write");
    let server = Server::start(dir.path(), &["--rate-limit-burst", "100000"]);
    let codes: Vec<(String, String)> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..4)
            .map(|thread| {
                let server = &server;
                let key = &key;
                scope.spawn(move || {
                    (0..50)
                        .map(|n| {
                            let url = format!("https://example.com/{thread}/{n}");
                            let code = server.create(key, &format!(r#"{{"long_url":"{url}"}}"#));
                            (code, url)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|thread| thread.join().unwrap_or_default())
            .collect()
    });
    let batch = server.post_json(
        "/api/v1/shorten/batch",
        &key,
        r#"{"items":[{"long_url":"https://example.com/b1"},{"long_url":"https://example.com/b2","custom_alias":"batch-two"}]}"#,
    );
    assert_eq!(batch.json()["created"], 2);
    let batch_codes: Vec<(String, String)> = batch.json()["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            (
                r["short_code"].as_str().unwrap_or("").to_owned(),
                r["long_url"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(codes.len(), 200);
    server.kill9();

    let server = Server::start(dir.path(), &[]);
    for (code, url) in codes.iter().chain(&batch_codes) {
        let reply = server.get(&format!("/{code}"));
        assert_eq!(reply.status, 302, "{code} lost after kill -9");
        assert_eq!(reply.header("location"), Some(url.as_str()));
    }
}

#[test]
fn sigterm_drains_and_closes_cleanly() {
    let dir = data_dir();
    let key = add_key(dir.path(), "writer", "write");
    let server = Server::start(dir.path(), &["--fsync", "never"]);
    let code = server.create(&key, r#"{"long_url":"https://example.com/term"}"#);
    let status = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    let server = Server::start(dir.path(), &[]);
    assert_eq!(server.get(&format!("/{code}")).status, 302);
}

#[test]
fn snapshot_and_reload_under_load_fail_no_request() {
    let dir = data_dir();
    let key = add_key(dir.path(), "writer", "write");
    let admin_key = add_key(dir.path(), "root", "admin");
    let server = Server::start(dir.path(), &[]);
    let codes: Vec<String> = (0..20)
        .map(|n| {
            server.create(
                &key,
                &format!(r#"{{"long_url":"https://example.com/{n}"}}"#),
            )
        })
        .collect();
    let stop = AtomicBool::new(false);
    let served = AtomicU64::new(0);
    let failures = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                // One keep-alive connection per client, as a real load would use.
                let mut stream = TcpStream::connect(server.public).expect("connect");
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let code = &codes[n % codes.len()];
                    n += 1;
                    let request = format!("GET /{code} HTTP/1.1\r\nHost: t\r\n\r\n");
                    let ok = stream.write_all(request.as_bytes()).is_ok() && {
                        let mut buffer = [0u8; 1024];
                        let mut reply = Vec::new();
                        loop {
                            match stream.read(&mut buffer) {
                                Ok(0) | Err(_) => break false,
                                Ok(read) => reply.extend_from_slice(&buffer[..read]),
                            }
                            if reply.windows(4).any(|w| w == b"\r\n\r\n") {
                                break parse_reply(&reply).status == 302;
                            }
                        }
                    };
                    if ok {
                        served.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failures.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            });
        }
        for round in 0..3 {
            let more = server.create(
                &key,
                &format!(r#"{{"long_url":"https://example.com/more/{round}"}}"#),
            );
            let snapshot = server.admin_call("POST", "/admin/snapshot", &admin_key);
            assert_eq!(snapshot.status, 200, "{}", snapshot.text());
            assert!(snapshot.json()["link_count"]
                .as_u64()
                .is_some_and(|count| count >= 21));
            let reload = server.admin_call("POST", "/admin/reload", &admin_key);
            assert_eq!(reload.status, 200, "{}", reload.text());
            assert_eq!(server.get(&format!("/{more}")).status, 302);
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(served.load(Ordering::Relaxed) > 0);
    let info = server.admin_call("GET", "/admin/info", &admin_key).json();
    assert_eq!(
        info["overlay_links"], 0,
        "the snapshot took over every write: {info}"
    );
    assert_eq!(info["links_live"], 23);
}

fn status_of(reply: &[u8]) -> u16 {
    parse_reply(reply).status
}

#[test]
fn malformed_requests_get_4xx_and_the_server_keeps_serving() {
    let dir = data_dir();
    std::fs::write(
        dir.path().join("sample-links.tsv"),
        "rust\thttps://www.rust-lang.org/\n",
    )
    .expect("sample");
    let server = Server::start(dir.path(), &["--timeout-header-read-ms", "300"]);

    let garbage = raw(server.public, b"\x00\x01\x02garbage garbage\r\n\r\n").expect("garbage");
    assert_eq!(status_of(&garbage), 400);

    let not_http = raw(server.public, b"GET / SPDY/9\r\n\r\n").expect("bad version");
    assert!((400..500).contains(&status_of(&not_http)) || not_http.is_empty());

    let mut oversized = b"GET /rust HTTP/1.1\r\nHost: t\r\n".to_vec();
    for n in 0..200 {
        oversized.extend_from_slice(format!("X-Filler-{n}: {}\r\n", "x".repeat(200)).as_bytes());
    }
    oversized.extend_from_slice(b"\r\n");
    let reply = raw(server.public, &oversized).expect("oversized headers");
    assert_eq!(status_of(&reply), 431);

    let huge_url = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(1 << 20));
    let reply = raw(server.public, huge_url.as_bytes()).expect("1 MB URL");
    let status = status_of(&reply);
    assert!((400..500).contains(&status), "1 MB URL got {status}");

    let many_headers: String = (0..100).map(|n| format!("X-{n}: y\r\n")).collect();
    let reply = raw(
        server.public,
        format!("GET /rust HTTP/1.1\r\nHost: t\r\n{many_headers}\r\n").as_bytes(),
    )
    .expect("headers");
    assert_eq!(status_of(&reply), 431);

    // What hyper refused itself is counted like every other answer.
    let metrics = request(server.admin, "GET", "/metrics", &[], b"").text();
    let counted = |status: &str| {
        metrics
            .lines()
            .find(|line| {
                line.starts_with("kurz_http_requests_total{")
                    && line.contains("route=\"other\"")
                    && line.contains(&format!("status=\"{status}\""))
            })
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(counted("400") >= 1, "{metrics}");
    assert!(counted("431") >= 2, "{metrics}");

    // A client that never finishes its headers is cut off after the header-read timeout (300
    // ms): not before it, and within the IO timeout after it.
    let started = Instant::now();
    let mut slow = KeepAlive::connect(server.public);
    slow.send(b"GET /rust HTTP/1.1\r\nHost: t\r\n");
    let said = slow
        .wait_closed()
        .expect("a client that stopped mid-head is never cut off");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "cut off after {:?}, before the header-read timeout",
        started.elapsed()
    );
    assert!(
        said.is_empty() || status_of(&said) == 408,
        "{}",
        String::from_utf8_lossy(&said)
    );

    // An idle keep-alive connection is closed after the same timeout.
    let mut idle = TcpStream::connect(server.public).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    idle.write_all(b"GET /rust HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("request");
    let mut everything = Vec::new();
    idle.read_to_end(&mut everything)
        .expect("closed by the server");
    assert_eq!(status_of(&everything), 302);

    let reply = server.get("/rust");
    assert_eq!(reply.status, 302, "still serving after the abuse");
}

/// With a cap of one connection, a second client is not answered while the first holds its
/// connection (the timeouts are far longer than the test), and is answered once it closes.
fn cap_holds_a_second_client(addr: std::net::SocketAddr, path: &str, status: u16, what: &str) {
    let mut first = KeepAlive::connect(addr);
    assert_eq!(first.request("GET", path, &[]).status, status, "{what}");
    let mut second = KeepAlive::connect(addr);
    second.send(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    assert!(
        second.silent_for(Duration::from_millis(500)),
        "{what}: a second client was served while the only slot was taken"
    );
    assert_eq!(
        first.request("GET", path, &[]).status,
        status,
        "{what}: the first client keeps its slot"
    );
    drop(first);
    assert_eq!(
        second.read_reply(false).status,
        status,
        "{what}: served once the slot was free"
    );
    assert_eq!(second.request("GET", path, &[]).status, status, "{what}");
}

#[test]
fn connection_cap_queues_extra_clients() {
    let flags = [
        "--connections-max",
        "1",
        "--timeout-header-read-ms",
        "60000",
    ];
    let (_dir, server) = sample_server(&flags);
    cap_holds_a_second_client(server.public, "/rust", 302, "public listener, lean path");
    cap_holds_a_second_client(server.admin, "/healthz", 200, "admin listener");
    let mut hyper_flags = flags.to_vec();
    hyper_flags.push("--hyper-only");
    let (_dir, server) = sample_server(&hyper_flags);
    cap_holds_a_second_client(server.public, "/rust", 302, "public listener, hyper only");
}

/// The header-read timeout of `sample_server` below, in ms.
const HEADER_READ_MS: u64 = 500;

/// Checks that `addr` cuts off a client that says nothing, one that stops mid-head and one idle
/// after a request, each no sooner than the header-read timeout, and keeps a connection whose
/// requests come more often than that.
fn slow_and_idle_clients_are_cut_off(
    addr: std::net::SocketAddr,
    path: &str,
    status: u16,
    what: &str,
) {
    let timeout = Duration::from_millis(HEADER_READ_MS);
    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    for (case, sent) in [
        ("a client that sends nothing", &b""[..]),
        (
            "a client that stops mid-head",
            &request.as_bytes()[..request.len() - 2],
        ),
    ] {
        let started = Instant::now();
        let mut connection = KeepAlive::connect(addr);
        connection.send(sent);
        let said = connection
            .wait_closed()
            .unwrap_or_else(|| panic!("{what}: {case} is never cut off"));
        assert!(
            started.elapsed() >= timeout,
            "{what}: {case} cut off after {:?}",
            started.elapsed()
        );
        assert!(
            said.is_empty() || status_of(&said) == 408,
            "{what}: {case}: {}",
            String::from_utf8_lossy(&said)
        );
    }
    let mut idle = KeepAlive::connect(addr);
    let started = Instant::now();
    assert_eq!(idle.request("GET", path, &[]).status, status, "{what}");
    let said = idle
        .wait_closed()
        .unwrap_or_else(|| panic!("{what}: an idle keep-alive connection is never closed"));
    assert!(
        started.elapsed() >= timeout,
        "{what}: idle connection closed after {:?}",
        started.elapsed()
    );
    assert!(
        said.is_empty(),
        "{what}: {}",
        String::from_utf8_lossy(&said)
    );
    // A request every fifth of the timeout, for twice the timeout: the wait restarts with each
    // (a fifth leaves room for a slow scheduler).
    let mut busy = KeepAlive::connect(addr);
    for round in 0..10 {
        assert_eq!(
            busy.request("GET", path, &[]).status,
            status,
            "{what}: round {round}"
        );
        std::thread::sleep(timeout / 5);
    }
    assert!(busy.wait_closed().is_some(), "{what}: closed once idle");
}

#[test]
fn slow_and_idle_clients_are_cut_off_on_every_listener() {
    let timeout = HEADER_READ_MS.to_string();
    let (_dir, server) = sample_server(&["--timeout-header-read-ms", &timeout]);
    slow_and_idle_clients_are_cut_off(server.public, "/rust", 302, "public listener, lean path");
    slow_and_idle_clients_are_cut_off(server.admin, "/healthz", 200, "admin listener");
    let (_dir, server) = sample_server(&["--timeout-header-read-ms", &timeout, "--hyper-only"]);
    slow_and_idle_clients_are_cut_off(server.public, "/rust", 302, "public listener, hyper only");
    slow_and_idle_clients_are_cut_off(server.admin, "/healthz", 200, "admin listener, hyper only");
}

/// Garbage, a bad version, oversized heads and too many headers: each gets a 4xx or a close
/// (never silence, never a crash), and `addr` answers `path` with `status` after each.
fn hostile_requests_leave_the_listener_serving(
    addr: std::net::SocketAddr,
    path: &str,
    status: u16,
    what: &str,
) {
    let mut oversized = format!("GET {path} HTTP/1.1\r\nHost: t\r\n").into_bytes();
    for n in 0..200 {
        oversized.extend_from_slice(format!("X-Filler-{n}: {}\r\n", "x".repeat(200)).as_bytes());
    }
    oversized.extend_from_slice(b"\r\n");
    let many_headers: String = (0..100).map(|n| format!("X-{n}: y\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\x01\x02garbage garbage\r\n\r\n".to_vec()),
        ("binary noise", (0..=255u8).cycle().take(5000).collect()),
        (
            "a bad version",
            format!("GET {path} SPDY/9\r\n\r\n").into_bytes(),
        ),
        (
            "a bad method",
            format!("G\x01T {path} HTTP/1.1\r\nHost: t\r\n\r\n").into_bytes(),
        ),
        ("40 KB of headers", oversized),
        (
            "100 headers",
            format!("GET {path} HTTP/1.1\r\nHost: t\r\n{many_headers}\r\n").into_bytes(),
        ),
        (
            "a 1 MB target",
            format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(1 << 20)).into_bytes(),
        ),
        (
            "a header line without a colon",
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n").into_bytes(),
        ),
    ];
    for (case, bytes) in cases {
        // raw() fails if the server neither answers nor closes within the IO timeout.
        let reply = raw(addr, &bytes).unwrap_or_else(|error| panic!("{what}: {case}: {error}"));
        if !reply.is_empty() {
            let answered = status_of(&reply);
            assert!(
                (400..500).contains(&answered),
                "{what}: {case} got {answered}"
            );
        }
        let after = request(addr, "GET", path, &[], b"");
        assert_eq!(after.status, status, "{what}: still serving after {case}");
    }
}

#[test]
fn hostile_requests_to_the_admin_listener_and_hyper_only_leave_them_serving() {
    let (_dir, server) = sample_server(&[]);
    hostile_requests_leave_the_listener_serving(server.admin, "/healthz", 200, "admin listener");
    let (_dir, server) = sample_server(&["--hyper-only"]);
    hostile_requests_leave_the_listener_serving(server.public, "/rust", 302, "hyper only");
    hostile_requests_leave_the_listener_serving(server.admin, "/healthz", 200, "admin, hyper only");
    let mut connection = KeepAlive::connect(server.public);
    assert_eq!(connection.request("GET", "/rust", &[]).status, 302);
}

#[test]
fn invalid_utf8_json_is_400_and_the_same_and_a_new_connection_keep_working() {
    for hyper_only in [false, true] {
        let dir = data_dir();
        let key = add_key(dir.path(), "writer", "write");
        std::fs::write(
            dir.path().join("sample-links.tsv"),
            "rust\thttps://www.rust-lang.org/\n",
        )
        .expect("sample");
        let flags: &[&str] = if hyper_only { &["--hyper-only"] } else { &[] };
        let server = Server::start(dir.path(), flags);
        let what = format!("hyper only: {hyper_only}");
        let json = [
            ("X-API-Key", key.as_str()),
            ("Content-Type", "application/json"),
        ];
        let mut connection = KeepAlive::connect(server.public);
        // A redirect first, so a lean connection moves to hyper mid-way.
        assert_eq!(
            connection.request("GET", "/rust", &[]).status,
            302,
            "{what}"
        );
        for body in [
            &b"{\"long_url\":\"https://example.com/\xff\"}"[..],
            b"{\"long_url\":\"https://example.com/\xc3\"}",
            b"\xfe\xff{}",
        ] {
            let reply = connection.request_with_body("POST", "/api/v1/shorten", &json, body);
            assert_eq!(
                (reply.status, reply.code()),
                (400, "invalid_utf8".to_owned()),
                "{what}: {body:?}"
            );
            let redirect = connection.request("GET", "/rust", &[]);
            assert_eq!(
                redirect.status, 302,
                "{what}: the same connection redirects"
            );
        }
        let created = connection.request_with_body(
            "POST",
            "/api/v1/shorten",
            &json,
            br#"{"long_url":"https://example.com/after-bad-utf8"}"#,
        );
        assert_eq!(created.status, 201, "{what}: {}", created.text());
        let code = created.json()["short_code"]
            .as_str()
            .expect("code")
            .to_owned();
        let mut fresh = KeepAlive::connect(server.public);
        let redirect = fresh.request("GET", &format!("/{code}"), &[]);
        assert_eq!(
            (redirect.status, redirect.header("location")),
            (302, Some("https://example.com/after-bad-utf8")),
            "{what}: a new connection"
        );
        server.create(&key, r#"{"long_url":"https://example.com/and-another"}"#);
    }
}

#[test]
fn a_1_mb_url_in_a_json_body_is_413_and_the_server_keeps_serving() {
    let dir = data_dir();
    let key = add_key(dir.path(), "writer", "write");
    let admin_key = add_key(dir.path(), "root", "admin");
    std::fs::write(
        dir.path().join("sample-links.tsv"),
        "rust\thttps://www.rust-lang.org/\n",
    )
    .expect("sample");
    let server = Server::start(dir.path(), &[]);
    let url = format!("https://example.com/{}", "a".repeat(1 << 20));
    let body = serde_json::json!({ "long_url": url }).to_string();
    let mut head = format!(
        "POST /api/v1/shorten HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    head.extend_from_slice(body.as_bytes());
    let reply = raw(server.public, &head).expect("an answer to a 1 MB body");
    let reply = parse_reply(&reply);
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert_eq!(reply.code(), "body_too_large");
    // In a batch (whose body may be 4 MB) the same URL is refused as an item.
    let batch = server.post_json(
        "/api/v1/shorten/batch",
        &key,
        &serde_json::json!({ "items": [{ "long_url": url }, { "long_url": "https://example.com/ok" }] })
            .to_string(),
    );
    assert_eq!(batch.status, 200, "{}", batch.text());
    let results = batch.json()["results"].clone();
    assert_eq!(
        (&results[0]["status"], &results[0]["code"]),
        (&serde_json::json!(400), &serde_json::json!("url_too_long")),
        "{results}"
    );
    assert_eq!(results[1]["status"], 201);
    // Still serving, on the lean path and through the API, and nothing long was stored.
    let mut connection = KeepAlive::connect(server.public);
    assert_eq!(connection.request("GET", "/rust", &[]).status, 302);
    server.create(&key, r#"{"long_url":"https://example.com/after-1mb"}"#);
    let info = server.admin_call("GET", "/admin/info", &admin_key);
    assert_eq!(
        info.json()["links_live"],
        3,
        "the sample, the batch's good item, the last create"
    );
}

#[test]
fn a_second_server_on_the_same_data_dir_refuses_to_start() {
    let dir = data_dir();
    let _first = Server::start(dir.path(), &[]);
    let second = common::serve_command(dir.path(), &[])
        .output()
        .expect("run a second kurz serve");
    assert_eq!(second.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("in use by another kurz process"),
        "{stderr}"
    );
}

#[test]
fn settings_come_from_a_config_file_and_the_environment() {
    let dir = data_dir();
    let key = add_key(dir.path(), "writer", "write");
    let config = dir.path().join("kurz.toml");
    std::fs::write(&config, "code_length = 11\nredirect_status_default = 307\n").expect("config");
    let server = Server::start(
        dir.path(),
        &["--config", config.to_str().expect("utf-8 path")],
    );
    let code = server.create(&key, r#"{"long_url":"https://example.com/cfg"}"#);
    assert_eq!(code.len(), 11);
    assert_eq!(server.get(&format!("/{code}")).status, 307);
    drop(server);
    let bad = common::kurz()
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .env("KURZ_FSYNC", "sometimes")
        .output()
        .expect("run kurz serve");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("fsync"));
}

#[test]
fn click_counts_and_caps_survive_restarts() {
    let dir = data_dir();
    let key = add_key(dir.path(), "writer", "write");
    // The default checkpoint interval: changed counts are appended to clicks-changes.tsv.
    let server = Server::start(dir.path(), &[]);
    let code = server.create(
        &key,
        r#"{"long_url":"https://example.com/c","max_clicks":3}"#,
    );
    let path = format!("/{code}");
    assert_eq!(server.get(&path).status, 302);
    assert_eq!(server.get(&path).status, 302);
    // Wait for a checkpoint holding both clicks, then crash.
    let checkpoint = dir.path().join("clicks-changes.tsv");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&checkpoint)
        .unwrap_or_default()
        .contains(&format!("{code}\t2\t"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint written"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill9();

    let server = Server::start(dir.path(), &[]);
    assert_eq!(server.get(&path).status, 302, "the third click of three");
    assert_eq!(
        server.get(&path).status,
        410,
        "the cap holds across a crash"
    );
    let status = server.terminate();
    assert!(status.success());

    let server = Server::start(dir.path(), &[]);
    let link = server
        .with_key("GET", &format!("/api/v1/urls/{code}"), &key, "")
        .json();
    assert_eq!(link["clicks"], 3, "SIGTERM writes the last counts: {link}");
    assert_eq!(server.get(&path).status, 410);
}
