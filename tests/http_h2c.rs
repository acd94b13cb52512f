//! HTTP/2 with prior knowledge (h2c) on every listener of the real server: redirects, the API
//! and the admin listener answer it as they answer HTTP/1.1, several streams share a connection,
//! and a client that stops inside the preface is cut off like any slow client.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{add_key, data_dir, KeepAlive, Server};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A request: method, path, headers, body.
type Call = (Method, String, Vec<(&'static str, String)>, Bytes);

/// (status, location, body) of each request, all sent as streams of one HTTP/2 connection.
async fn over_h2(addr: SocketAddr, requests: Vec<Call>) -> Vec<(u16, Option<String>, Bytes)> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    tokio::spawn(connection);
    let sent: Vec<_> = requests
        .into_iter()
        .map(|(method, path, headers, body)| {
            let mut sender = sender.clone();
            tokio::spawn(async move {
                let mut request = Request::builder()
                    .method(method)
                    .uri(format!("http://{addr}{path}"));
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                let request = request.body(Full::new(body)).expect("request");
                let response = sender.send_request(request).await.expect("response");
                let status = response.status().as_u16();
                let location = response
                    .headers()
                    .get("location")
                    .and_then(|value| value.to_str().ok())
                    .map(str::to_owned);
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .expect("body")
                    .to_bytes();
                (status, location, body)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for request in sent {
        answers.push(request.await.expect("join"));
    }
    answers
}

fn get(path: &str) -> Call {
    (Method::GET, path.to_owned(), Vec::new(), Bytes::new())
}

fn sample_links(dir: &std::path::Path) {
    std::fs::write(
        dir.join("sample-links.tsv"),
        "rust\thttps://www.rust-lang.org/\ndocs\thttps://docs.rs/\n",
    )
    .expect("sample links");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_the_api_and_the_admin_listener_speak_h2c() {
    let dir = data_dir();
    sample_links(dir.path());
    let key = add_key(dir.path(), "writer", "write");
    let server = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || Server::start(&dir, &[])
    })
    .await
    .expect("start");

    let create = (
        Method::POST,
        "/api/v1/shorten".to_owned(),
        vec![
            ("authorization", format!("Bearer {key}")),
            ("content-type", "application/json".to_owned()),
        ],
        Bytes::from_static(br#"{"long_url":"https://example.com/over-h2","custom_alias":"viah2"}"#),
    );
    let answers = over_h2(
        server.public,
        vec![get("/rust"), get("/docs"), get("/nothere"), create],
    )
    .await;
    assert_eq!(answers[0].0, 302);
    assert_eq!(answers[0].1.as_deref(), Some("https://www.rust-lang.org/"));
    assert_eq!(answers[1].0, 302);
    assert_eq!(answers[1].1.as_deref(), Some("https://docs.rs/"));
    assert_eq!(answers[2].0, 404);
    assert_eq!(answers[3].0, 201, "{:?}", answers[3].2);

    // What was created over HTTP/2 redirects over HTTP/1.1, on the lean path.
    let mut lean = KeepAlive::connect(server.public);
    let reply = lean.request("GET", "/viah2", &[]);
    assert_eq!(reply.status, 302);
    assert_eq!(
        reply.header("location"),
        Some("https://example.com/over-h2")
    );

    let admin = over_h2(server.admin, vec![get("/healthz"), get("/metrics")]).await;
    assert_eq!(admin[0].0, 200);
    assert_eq!(admin[1].0, 200);
    let metrics = String::from_utf8_lossy(&admin[1].2).into_owned();
    assert!(
        metrics.contains("kurz_http_requests_total{route=\"shorten\",status=\"201\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_only_serves_h2c_redirects() {
    let dir = data_dir();
    sample_links(dir.path());
    let server = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || Server::start(&dir, &["--hyper-only"])
    })
    .await
    .expect("start");
    let answers = over_h2(server.public, vec![get("/rust"), get("/docs")]).await;
    assert_eq!(answers[0].1.as_deref(), Some("https://www.rust-lang.org/"));
    assert_eq!(answers[1].1.as_deref(), Some("https://docs.rs/"));
}

#[test]
fn a_client_that_stops_inside_the_preface_is_cut_off() {
    let dir = data_dir();
    let server = Server::start(dir.path(), &["--timeout-header-read-ms", "300"]);
    for addr in [server.public, server.admin] {
        let started = Instant::now();
        let mut stalled = KeepAlive::connect(addr);
        stalled.send(b"PRI * HTTP/2.0\r\n\r\nS");
        let said = stalled
            .wait_closed()
            .expect("a client that stopped inside the preface is never cut off");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300),
            "cut off after {waited:?}"
        );
        assert!(said.is_empty(), "{}", String::from_utf8_lossy(&said));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2c_connection_is_closed_and_a_busy_one_is_not() {
    let dir = data_dir();
    sample_links(dir.path());
    let server = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || Server::start(&dir, &["--timeout-header-read-ms", "400"])
    })
    .await
    .expect("start");
    for addr in [server.public, server.admin] {
        let connect = || async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2 handshake");
            (sender, tokio::spawn(connection))
        };
        let ask = |mut sender: http2::SendRequest<Full<Bytes>>| async move {
            let request = Request::get(format!("http://{addr}/healthz"))
                .body(Full::new(Bytes::new()))
                .expect("request");
            let status = sender.send_request(request).await.expect("answer").status();
            assert_eq!(status, 200);
        };

        // Busy: a request every 100 ms for 1.2 s (three times the limit) keeps it open.
        let (busy, busy_connection) = connect().await;
        for _ in 0..12 {
            ask(busy.clone()).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            !busy_connection.is_finished(),
            "a busy connection was closed"
        );

        // Idle after one request: closed by the server, not before the limit.
        let (idle, idle_connection) = connect().await;
        let started = Instant::now();
        // The sender stays alive: a client whose senders are all gone closes the connection itself.
        ask(idle.clone()).await;
        tokio::time::timeout(Duration::from_secs(10), idle_connection)
            .await
            .expect("an idle h2c connection is never closed")
            .expect("join")
            .expect("closed cleanly");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(400),
            "closed after {waited:?}"
        );
        drop(idle);
    }
}
