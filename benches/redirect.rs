//! Redirect-path benchmarks: one request through the lean HTTP/1.1 path in-process (parse →
//! lookup → click count → response bytes) over 1M links, cold and hot, and cold in batches
//! prefetched as the event loops do; the same over loopback
//! against the real `kurz serve` binary (one keep-alive connection, request to response); code
//! generation per strategy; and the JSON create path over loopback (`POST /api/v1/shorten`,
//! `--fsync never` so the disk is not what is measured).
//!
//! Run: `cargo bench --bench redirect` (results in PERFORMANCE.md).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use kurz::analytics::pipeline::EventBatch;
use kurz::auth::Keys;
use kurz::config::{ServeArgs, ServeConfig};
use kurz::http::{fast, redirect, App};
use kurz::links::codegen::{self, CounterCodes};
use kurz::service::LinkService;
use kurz::store::wal::FsyncPolicy;
use kurz::store::{Store, StoreOptions, SNAPSHOT_FILE};

mod common;

use common::{synthetic_links, write_snapshot};

const LINKS: usize = 1_000_000;
const HOT_KEYS: usize = 4096;
/// Requests in a round of the event loop (~46 ready connections per `epoll_wait` were seen).
const BATCH: usize = 64;

/// Requests back to back in one buffer, with where each one starts.
struct Requests {
    bytes: Vec<u8>,
    starts: Vec<usize>,
}

impl Requests {
    fn new<'a>(codes: impl Iterator<Item = &'a str>) -> Requests {
        let mut requests = Requests {
            bytes: Vec::new(),
            starts: Vec::new(),
        };
        for code in codes {
            requests.starts.push(requests.bytes.len());
            requests.bytes.extend_from_slice(
                format!("GET /{code} HTTP/1.1\r\nHost: sho.rt\r\nUser-Agent: bench/1.0\r\nAccept: */*\r\n\r\n")
                    .as_bytes(),
            );
        }
        requests
    }

    fn get(&self, index: usize) -> &[u8] {
        let end = self
            .starts
            .get(index + 1)
            .copied()
            .unwrap_or(self.bytes.len());
        &self.bytes[self.starts[index]..end]
    }
}

fn in_process(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let links = synthetic_links(LINKS, 5);
    write_snapshot(&dir.path().join(SNAPSHOT_FILE), &links);
    let config = ServeConfig::load(ServeArgs {
        data_dir: Some(dir.path().to_owned()),
        ..ServeArgs::default()
    })
    .expect("config");
    let keys = Keys::load(&dir.path().join("no-keys")).expect("keys");
    let app = App::new(config, keys);
    let options = StoreOptions {
        fsync: FsyncPolicy::Never,
    };
    let store = Store::open(dir.path(), options).expect("open");
    // As `kurz serve` does once the store is open: clicks count by snapshot slot.
    app.clicks.follow(store.current_snapshot());
    assert!(app.set_links(LinkService::local(store)));
    let peer: IpAddr = "127.0.0.1".parse().expect("ip");

    // Scattered order over the whole table, as uniformly random traffic hits it.
    let scattered = (0..LINKS).map(|i| (i * 7_919) % LINKS);
    let cold = Requests::new(scattered.map(|i| links[i].0.as_str()));
    let hot = Requests::new(links[..HOT_KEYS].iter().map(|(code, _)| code.as_str()));
    let mut group = c.benchmark_group("redirect");
    group.throughput(Throughput::Elements(1));
    for (name, requests, count) in [
        ("in_process_cold", &cold, LINKS),
        ("in_process_hot", &hot, HOT_KEYS),
    ] {
        let mut out = Vec::with_capacity(4096);
        let mut clicks = EventBatch::default();
        let mut index = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                let answered =
                    fast::answer(&app, peer, requests.get(index), (&mut out, &mut clicks));
                app.hand_over_clicks(&mut clicks);
                index = (index + 1) % count;
                assert!(answered.is_some() && out.starts_with(b"HTTP/1.1 302"));
            })
        });
    }
    // As the event loops answer a round of ready connections: every request's table slot
    // first, then records and counts, then the answers.
    let mut out = Vec::with_capacity(4096);
    let mut clicks = EventBatch::default();
    let mut index = 0;
    let mut probes = Vec::with_capacity(BATCH);
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("in_process_cold_batch_of_64", |b| {
        b.iter(|| {
            let batch = (index..index + BATCH).map(|at| cold.get(at % LINKS));
            let hints = redirect::Hints::new(&app);
            probes.clear();
            probes.extend(batch.clone().map(|request| fast::prefetch(&hints, request)));
            for probe in probes.iter().flatten() {
                hints.prefetch_record(*probe);
            }
            for request in batch {
                out.clear();
                let answered = fast::answer(&app, peer, request, (&mut out, &mut clicks));
                assert!(answered.is_some() && out.starts_with(b"HTTP/1.1 302"));
            }
            app.hand_over_clicks(&mut clicks);
            index = (index + BATCH) % LINKS;
        })
    });
    group.finish();
}

/// A `kurz serve` child process, killed when dropped.
struct Server {
    child: Child,
    public: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

fn start_server(dir: &Path) -> Server {
    let (public, admin) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_kurz"))
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{public}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args([
            "--workers",
            "1",
            "--fsync",
            "never",
            "--allow-anonymous-create",
            "--rate-limit-per-s",
            "1000000000",
            "--no-click-analytics",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kurz serve");
    let public = SocketAddr::from(([127, 0, 0, 1], public));
    let deadline = Instant::now() + Duration::from_secs(30);
    let server = Server { child, public };
    while TcpStream::connect(("127.0.0.1", admin)).is_err() || TcpStream::connect(public).is_err() {
        assert!(Instant::now() < deadline, "kurz serve did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Sends `request` and reads one response (head and `content-length` body); returns its status.
fn round_trip(stream: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> u16 {
    stream.write_all(request).expect("send");
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let read = stream.read(&mut chunk).expect("read");
        assert!(read > 0, "the server closed the connection");
        buf.extend_from_slice(&chunk[..read]);
        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let body_bytes: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= head_end + 4 + body_bytes {
            return head
                .get(9..12)
                .and_then(|status| status.parse().ok())
                .unwrap_or(0);
        }
    }
}

fn loopback(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let links = synthetic_links(LINKS, 5);
    write_snapshot(&dir.path().join(SNAPSHOT_FILE), &links);
    let server = start_server(dir.path());
    let mut stream = TcpStream::connect(server.public).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let requests = Requests::new(links.iter().map(|(code, _)| code.as_str()));
    let mut buf = Vec::new();
    let mut group = c.benchmark_group("loopback");
    group.throughput(Throughput::Elements(1));
    let mut index = 0;
    group.bench_function("redirect_round_trip", |b| {
        b.iter(|| {
            let status = round_trip(&mut stream, requests.get(index), &mut buf);
            index = (index * 7_919 + 1) % LINKS;
            assert_eq!(status, 302);
        })
    });
    let mut serial = 0u64;
    group.bench_function("create_json_round_trip", |b| {
        b.iter(|| {
            serial += 1;
            let body = format!(r#"{{"long_url":"https://bench.example/{serial}/page"}}"#);
            let request = format!(
                "POST /api/v1/shorten HTTP/1.1\r\nHost: sho.rt\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let status = round_trip(&mut stream, request.as_bytes(), &mut buf);
            assert_eq!(status, 201, "{}", String::from_utf8_lossy(&buf));
        })
    });
    group.finish();
}

fn code_generation(c: &mut Criterion) {
    let mut group = c.benchmark_group("codegen");
    group.throughput(Throughput::Elements(1));
    group.bench_function("random_7", |b| b.iter(|| codegen::random_code(7)));
    let counter = CounterCodes::new(1, true);
    group.bench_function("counter_permuted", |b| b.iter(|| counter.next_code()));
    let mut serial = 0u64;
    group.bench_function("hash_7", |b| {
        b.iter(|| {
            serial += 1;
            codegen::hash_code(&format!("https://bench.example/{serial}"), 7)
        })
    });
    group.finish();
}

criterion_group!(benches, in_process, loopback, code_generation);
criterion_main!(benches);
