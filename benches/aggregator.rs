//! Click-aggregator benchmarks: the aggregator thread's work per click event (reading it from
//! its hand-off lane, classification, the per-link aggregates, the event-log line) in-process,
//! without its lanes, thread or files. Two workloads over 1M synthetic codes: every event a link's first
//! click (a fresh aggregator takes 1M distinct codes, as uniform traffic over many links does),
//! and repeat clicks in a Zipf(1.0) mix (an aggregator that has seen the mix already).
//!
//! And the whole pipeline's CPU per click, both sides: 1M first clicks recorded from one thread
//! as a redirect worker hands them over, into a running pipeline (its thread and event log),
//! measured as the process's CPU time (all threads) until the aggregator has applied them all;
//! checkpoints are not part of it.
//!
//! Run: `cargo bench --bench aggregator` (results in PERFORMANCE.md).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use kurz::analytics::pipeline::{AnalyticsOptions, ClickPipeline};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use kurz::analytics::pipeline::{ClickEvent, EventBatch, EventFolder};

/// The server's allocator: what the aggregator costs depends on it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// Shared with the other benches, which also use its snapshot helpers.
#[allow(dead_code)]
mod common;

use common::synthetic_links;

const LINKS: usize = 1_000_000;
/// Events per batch of the repeat-click workload (the aggregator's batch is up to 4096).
const BATCH_EVENTS: usize = 4096;
/// An hour boundary in 2027.
const T: i64 = 1_800_000_000;

const USER_AGENTS: [&str; 6] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
    "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
];

const REFERERS: [Option<&[u8]>; 6] = [
    None,
    Some(b"https://www.google.com/"),
    Some(b"https://t.co/"),
    Some(b"https://news.ycombinator.com/item?id=40000000"),
    None,
    Some(b"https://www.reddit.com/r/rust/comments/abc/"),
];

/// The event of the `serial`th click, on `code`, as the redirect path hands it over (about
/// 100k clicks a second, a handful of user agents and referrers).
fn event(code: &str, serial: usize) -> ClickEvent<'_> {
    ClickEvent {
        code,
        at_s: T + (serial / 100_000) as i64,
        referer: REFERERS[serial % REFERERS.len()],
        user_agent: Some(USER_AGENTS[serial % 7 % USER_AGENTS.len()].as_bytes()),
        client_ip: Some(IpAddr::V4(Ipv4Addr::from(
            0x0A00_0000 | serial as u32 & 0xFFFF,
        ))),
        country_header: None,
    }
}

/// Indices in `0..count` drawn with weight `1 / (k + 1)` (Zipf, exponent 1), deterministic.
fn zipf_indices(count: usize, draws: usize) -> Vec<usize> {
    let mut cumulative = Vec::with_capacity(count);
    let mut sum = 0.0;
    for k in 0..count {
        sum += 1.0 / (k + 1) as f64;
        cumulative.push(sum);
    }
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    (0..draws)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let target = (state >> 11) as f64 / (1u64 << 53) as f64 * sum;
            cumulative.partition_point(|c| *c < target).min(count - 1)
        })
        .collect()
}

fn aggregator(c: &mut Criterion) {
    let links = synthetic_links(LINKS, 7);
    let codes: Vec<&str> = links.iter().map(|(code, _)| code.as_str()).collect();
    let mut group = c.benchmark_group("aggregator");

    // One iteration: 1M first clicks, in scattered order, into a fresh aggregator.
    group.sample_size(10);
    group.throughput(Throughput::Elements(LINKS as u64));
    group.bench_function("first_clicks_1m", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let mut folder = EventFolder::default();
                let mut batch = EventBatch::default();
                let mut serial = 0;
                while serial < LINKS {
                    batch.clear();
                    for i in serial..(serial + BATCH_EVENTS).min(LINKS) {
                        batch.push(&event(codes[(i * 7_919) % LINKS], i));
                    }
                    serial += batch.events();
                    let start = Instant::now();
                    folder.fold(&batch);
                    folder.flush_log();
                    elapsed += start.elapsed();
                }
                // Freeing the aggregates is not part of a click's cost.
                drop(folder);
            }
            elapsed
        })
    });

    // One iteration: a batch of repeat clicks on a Zipf mix the aggregator has seen.
    let zipf = zipf_indices(LINKS, LINKS);
    let mut folder = EventFolder::default();
    let mut batch = EventBatch::default();
    for (serial, chunk) in zipf.chunks(BATCH_EVENTS).enumerate() {
        batch.clear();
        for &i in chunk {
            batch.push(&event(codes[i], serial * BATCH_EVENTS));
        }
        folder.fold(&batch);
        folder.flush_log();
    }
    group.sample_size(50);
    group.throughput(Throughput::Elements(BATCH_EVENTS as u64));
    let mut next = 0;
    group.bench_function("repeat_clicks_zipf", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                if next + BATCH_EVENTS > zipf.len() {
                    next = 0;
                }
                batch.clear();
                for i in next..next + BATCH_EVENTS {
                    batch.push(&event(codes[zipf[i]], i));
                }
                next += BATCH_EVENTS;
                let start = Instant::now();
                folder.fold(&batch);
                folder.flush_log();
                elapsed += start.elapsed();
            }
            elapsed
        })
    });
    group.finish();
}

/// CPU time this process has used, all threads together.
fn process_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
    assert_eq!(status, 0, "clock_gettime");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// Most events left waiting in the lanes while recording: far below the queue length, so that
/// nothing is dropped and the drops' lower cost does not flatter the result.
const QUEUED_EVENTS_MAX: u64 = 16_384;

fn pipeline(c: &mut Criterion) {
    let links = synthetic_links(LINKS, 7);
    let codes: Vec<&str> = links.iter().map(|(code, _)| code.as_str()).collect();
    let mut group = c.benchmark_group("pipeline");
    group.sample_size(10);
    group.throughput(Throughput::Elements(LINKS as u64));
    // One iteration: 1M first clicks through a fresh pipeline; CPU time, not wall time.
    group.bench_function("first_clicks_1m_cpu", |b| {
        b.iter_custom(|iters| {
            let mut cpu = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().expect("tempdir");
                let pipeline = ClickPipeline::start(AnalyticsOptions::new(dir.path().to_owned()))
                    .expect("start");
                let start = process_cpu();
                for i in 0..LINKS {
                    pipeline.record(&event(codes[(i * 7_919) % LINKS], i));
                    if i % 1024 == 0 {
                        while pipeline.counters(T).queued > QUEUED_EVENTS_MAX {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                loop {
                    let counters = pipeline.counters(T);
                    assert_eq!(counters.dropped_total, 0, "events were dropped");
                    if counters.events_total == LINKS as u64 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                cpu += process_cpu() - start;
                // Its checkpoint is not a click's cost.
                pipeline.shutdown();
            }
            cpu
        })
    });
    group.finish();
}

criterion_group!(benches, aggregator, pipeline);
criterion_main!(benches);
