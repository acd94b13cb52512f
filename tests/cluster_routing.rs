//! The shipped HAProxy example (`deploy/haproxy-shards.cfg`) routes each code to a node of the
//! shard group that holds it: real HAProxy runs the real file in front of four stand-in nodes
//! that answer with their name, and every answer is checked against kurz's own shard function.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use kurz::cluster::shard::shard_of;

mod common;

use common::haproxy::{ShardFront, BACKENDS};

const START_TIMEOUT: Duration = Duration::from_secs(20);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const SHARDS: u32 = 2;
/// (name in the config, the shard its group holds)
const NODES: [(&str, u32); 4] = [
    ("SHARD0_A", 0),
    ("SHARD0_B", 0),
    ("SHARD1_A", 1),
    ("SHARD1_B", 1),
];

/// A stand-in kurz node: answers every HTTP/1.1 request (health checks included) with 200 and
/// its name as the body.
fn stand_in(name: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || answer(stream, name));
        }
    });
    port
}

fn answer(stream: TcpStream, name: &str) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(stream) => stream,
        Err(_) => return,
    });
    let mut writer = stream;
    loop {
        let mut line = String::new();
        let mut in_head = false;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" && in_head => break,
                Ok(_) => in_head = true,
            }
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name}",
            name.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: kurz\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

#[test]
fn the_example_routing_sends_each_code_to_its_shard_group() {
    let public = TcpListener::bind("127.0.0.1:0").expect("bind");
    let public_port = public.local_addr().expect("addr").port();
    drop(public);
    let front = std::net::SocketAddr::from(([127, 0, 0, 1], public_port));
    let _front = ShardFront::start(
        front,
        BACKENDS.map(|name| std::net::SocketAddr::from(([127, 0, 0, 1], stand_in(name)))),
    );
    let started = Instant::now();
    while get(public_port, "/healthz").is_none() {
        assert!(started.elapsed() < START_TIMEOUT, "haproxy did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let shard_of_node = |name: &str| {
        NODES
            .iter()
            .find(|(node, _)| *node == name)
            .map(|(_, shard)| *shard)
            .unwrap_or_else(|| panic!("unknown answer {name:?}"))
    };
    let mut seen = std::collections::HashSet::new();
    for i in 0..400 {
        let code = kurz::links::codegen::random_code(7 + i % 5);
        for path in [
            format!("/{code}"),
            format!("/api/v1/urls/{code}"),
            format!("/api/v1/stats/{code}"),
        ] {
            let node = get(public_port, &path).expect("an answer");
            assert_eq!(
                shard_of_node(&node),
                shard_of(&code, SHARDS),
                "{path} went to {node}"
            );
            seen.insert(node);
        }
        assert_eq!(
            get(public_port, &format!("/{code}")),
            get(public_port, &format!("/{code}")),
            "a code sticks to one node of its group"
        );
    }
    assert_eq!(
        seen.len(),
        4,
        "consistent hashing uses every node: {seen:?}"
    );
}
