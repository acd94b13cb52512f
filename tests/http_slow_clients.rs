//! Clients that send a body too slowly or stop reading their answers: the real server gives up
//! on them after its timeouts and keeps serving everyone else.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{data_dir, parse_reply, request, Server};

#[test]
fn a_body_that_stops_arriving_gets_408_and_the_server_keeps_serving() {
    let dir = data_dir();
    let server = Server::start(
        dir.path(),
        &["--allow-anonymous-create", "--timeout-body-read-ms", "300"],
    );
    let mut stream = TcpStream::connect(server.public).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let started = Instant::now();
    stream
        .write_all(
            b"POST /api/v1/shorten HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"long_url\": \"https://exa",
        )
        .expect("send the head and the start of the body");
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .expect("the server answers and closes instead of waiting for the rest");
    let waited = started.elapsed();
    let reply = parse_reply(&answer);
    assert_eq!(reply.status, 408, "{}", reply.text());
    assert_eq!(reply.json()["code"], "body_timeout");
    assert!(
        waited >= Duration::from_millis(300),
        "answered after {waited:?}"
    );

    let created = request(
        server.public,
        "POST",
        "/api/v1/shorten",
        &[("Content-Type", "application/json")],
        br#"{"long_url": "https://example.com/"}"#,
    );
    assert_eq!(created.status, 201, "still serving: {}", created.text());
    let code = created.json()["short_code"]
        .as_str()
        .expect("short_code")
        .to_owned();
    assert_eq!(server.get(&format!("/{code}")).status, 302);
}

#[test]
fn a_client_that_stops_reading_loses_its_connection_and_its_slot() {
    let dir = data_dir();
    let server = Server::start(
        dir.path(),
        &[
            "--connections-max",
            "1",
            "--timeout-write-ms",
            "300",
            "--timeout-header-read-ms",
            "60000",
        ],
    );
    let one_answer = server.get("/api/v1/openapi.json").body.len();
    // A small receive buffer and many pipelined requests for a large answer: the server's
    // writes stall long before it has answered them all.
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    socket.connect(&server.public.into()).expect("connect");
    let mut stalled: TcpStream = socket.into();
    const REQUESTS: usize = 300;
    let request = b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n";
    stalled
        .write_all(&request.repeat(REQUESTS))
        .expect("send every request");

    // The only connection slot is taken until the server gives up on the stalled client; then
    // a new client is served.
    let mut fresh = TcpStream::connect(server.public).expect("connect (queued in the backlog)");
    fresh
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    fresh
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut answer = Vec::new();
    fresh
        .read_to_end(&mut answer)
        .expect("served once the stalled client is cut off");
    assert_eq!(parse_reply(&answer).status, 200);

    // The stalled client got only part of its answers before the server closed on it.
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut received = Vec::new();
    let _ = stalled.read_to_end(&mut received);
    assert!(
        received.len() < REQUESTS * one_answer,
        "{} bytes of {} answered",
        received.len(),
        REQUESTS * one_answer
    );
}
