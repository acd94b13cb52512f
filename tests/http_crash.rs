//! Durability and robustness of the real server: SIGKILL right after acknowledged creates,
//! graceful SIGTERM, snapshot and reload under a redirecting client, and malformed or hostile
//! requests that must not take the server down.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{add_key, data_dir, parse_reply, raw, request, Server};

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
    let admin = format!("Bearer {admin_key}");
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
            let snapshot = request(
                server.admin,
                "POST",
                "/admin/snapshot",
                &[("Authorization", &admin)],
                b"",
            );
            assert_eq!(snapshot.status, 200, "{}", snapshot.text());
            assert!(snapshot.json()["link_count"]
                .as_u64()
                .is_some_and(|count| count >= 21));
            let reload = request(
                server.admin,
                "POST",
                "/admin/reload",
                &[("Authorization", &admin)],
                b"",
            );
            assert_eq!(reload.status, 200, "{}", reload.text());
            assert_eq!(server.get(&format!("/{more}")).status, 302);
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(served.load(Ordering::Relaxed) > 0);
    let info = request(
        server.admin,
        "GET",
        "/admin/info",
        &[("Authorization", &admin)],
        b"",
    )
    .json();
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

    // A client that never finishes its headers is cut off after the header-read timeout.
    let mut slow = TcpStream::connect(server.public).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    slow.write_all(b"GET /rust HTTP/1.1\r\nHost: t\r\n")
        .expect("partial");
    let mut rest = Vec::new();
    let read = slow.read_to_end(&mut rest);
    assert!(
        read.is_ok() || rest.is_empty(),
        "the server closes a slow client"
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

#[test]
fn connection_cap_queues_extra_clients() {
    let dir = data_dir();
    std::fs::write(
        dir.path().join("sample-links.tsv"),
        "rust\thttps://www.rust-lang.org/\n",
    )
    .expect("sample");
    let server = Server::start(
        dir.path(),
        &["--connections-max", "1", "--timeout-header-read-ms", "500"],
    );
    // The first connection holds the only slot until its idle timeout; the second waits in the
    // backlog and is then served.
    let mut first = TcpStream::connect(server.public).expect("connect");
    first
        .write_all(b"GET /rust HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("request");
    let mut buffer = [0u8; 512];
    let read = first.read(&mut buffer).expect("first reply");
    assert_eq!(status_of(&buffer[..read]), 302);
    let reply = request(server.public, "GET", "/rust", &[], b"");
    assert_eq!(reply.status, 302);
}

#[test]
fn a_second_server_on_the_same_data_dir_refuses_to_start() {
    let dir = data_dir();
    let _first = Server::start(dir.path(), &[]);
    let second = common::kurz()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
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
