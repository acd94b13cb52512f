//! Crash test: a child process writes links through the store with fsync=always and reports
//! every acknowledged code on stdout; the parent SIGKILLs it at a random moment, reopens the
//! store itself and checks that every acknowledged write survived. Twenty rounds on one data
//! dir, so recovery also runs over cut tails, snapshots interrupted midway and many segments.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kurz::store::link::{Link, LinkMeta};
use kurz::store::wal::FsyncPolicy;
use kurz::store::{Store, StoreOptions};

const CHILD_DIR_ENV: &str = "KURZ_CRASH_CHILD_DIR";
const CHILD_ROUND_ENV: &str = "KURZ_CRASH_CHILD_ROUND";
const ROUNDS: u32 = 20;
const WRITERS: usize = 16;

fn options() -> StoreOptions {
    StoreOptions {
        fsync: FsyncPolicy::Always,
    }
}

fn url_for(code: &str) -> String {
    format!("https://example.com/crash/{code}")
}

/// The child: writes until killed. Only runs when the parent starts it with the env set.
#[test]
#[ignore = "child process of acknowledged_writes_survive_sigkill, started by it"]
fn crash_child_writer() {
    let dir = std::env::var(CHILD_DIR_ENV).expect("child needs its data dir");
    let round = std::env::var(CHILD_ROUND_ENV).expect("child needs its round");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let store = Arc::new(Store::open(Path::new(&dir), options()).expect("child opens store"));
        let (acks, acked) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            let stdout = std::io::stdout();
            for code in acked {
                let mut out = stdout.lock();
                // The parent reads only whole lines; a line cut by SIGKILL is not an ack.
                let _ = writeln!(out, "ACK {code}");
                let _ = out.flush();
            }
        });
        let snapshotter = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || loop {
                std::thread::sleep(Duration::from_millis(25));
                let _ = store.snapshot();
            })
        };
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let store = store.clone();
                let acks = acks.clone();
                let round = round.clone();
                tokio::spawn(async move {
                    for i in 0u64.. {
                        let code = format!("r{round}w{writer}n{i}");
                        let link = Link {
                            long_url: url_for(&code),
                            code: code.clone(),
                            meta: LinkMeta::new(1_700_000_000),
                        };
                        if store.create(link).await.is_ok() && acks.send(code).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        for writer in writers {
            let _ = writer.await;
        }
        let _ = snapshotter.await;
    });
}

/// A small xorshift generator: random kill moments without another dependency.
struct Jitter(u64);

impl Jitter {
    fn next_ms(&mut self, max_ms: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % max_ms
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(7)
        | 1;
    let mut jitter = Jitter(seed);
    let mut acknowledged: HashSet<String> = HashSet::new();
    for round in 0..ROUNDS {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "crash_child_writer",
                "--exact",
                "--ignored",
                "--nocapture",
                "--quiet",
            ])
            .env(CHILD_DIR_ENV, dir.path())
            .env(CHILD_ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let (lines, received) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let mut line = Vec::new();
            loop {
                line.clear();
                match stdout.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line.ends_with(b"\n") => {
                        let text = String::from_utf8_lossy(&line);
                        if let Some(code) = text.trim_end().strip_prefix("ACK ") {
                            let _ = lines.send(code.to_owned());
                        }
                    }
                    Ok(_) => return,
                }
            }
        });
        // Let the child get going (at least one ack), then kill it at a random moment.
        let first = received.recv_timeout(Duration::from_secs(30));
        let first = first.expect("the child acknowledged nothing within 30 s");
        std::thread::sleep(Duration::from_millis(jitter.next_ms(150)));
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");
        reader.join().expect("reader thread");
        for code in std::iter::once(first).chain(received.try_iter()) {
            acknowledged.insert(code);
        }

        let started = Instant::now();
        let store = Store::open(dir.path(), options()).expect("reopen after SIGKILL");
        let missing: Vec<&String> = acknowledged
            .iter()
            .filter(|code| store.get(code).map(|link| link.long_url) != Some(url_for(code)))
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} acknowledged links lost, e.g. {:?}",
            missing.len(),
            missing.first()
        );
        // Writes can be durable without their ack having reached us before the kill, so the
        // store may hold more than was acknowledged, never less; its live count must match
        // what it really holds.
        let mut held = 0u64;
        store.for_each_link(|_| held += 1);
        assert_eq!(store.live_links(), held, "round {round}");
        assert!(held >= acknowledged.len() as u64, "round {round}");
        store.close();
        assert!(started.elapsed() < Duration::from_secs(60));
    }
    assert!(acknowledged.len() as u32 >= ROUNDS);
}

const FULL_DISK_CHILD_ENV: &str = "KURZ_FULL_DISK_CHILD_DIR";
/// Writes a child may attempt after the first failure; each must fail cleanly too.
const WRITES_AFTER_FAILURE: u32 = 20;

/// The child of `a_full_disk_fails_writes_and_loses_nothing`: runs under a file-size limit
/// (`ulimit -f`), so WAL appends start failing with EFBIG as on a full disk.
#[test]
#[ignore = "child process of a_full_disk_fails_writes_and_loses_nothing, started by it"]
fn full_disk_child_writer() {
    let dir = std::env::var(FULL_DISK_CHILD_ENV).expect("child needs its data dir");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = Store::open(Path::new(&dir), options()).expect("child opens store");
    let mut failures = 0;
    let mut out = std::io::stdout().lock();
    for i in 0u64.. {
        let code = format!("full{i}");
        let link = Link {
            long_url: url_for(&code),
            code: code.clone(),
            meta: LinkMeta::new(1_700_000_000),
        };
        match runtime.block_on(store.create(link)) {
            Ok(_) => writeln!(out, "ACK {code}"),
            Err(error) => {
                failures += 1;
                writeln!(out, "FAIL {code} {error}")
            }
        }
        .expect("write to parent");
        if failures > WRITES_AFTER_FAILURE {
            break;
        }
    }
    store.close();
}

#[test]
fn a_full_disk_fails_writes_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Create the data dir (snapshot, first segment) without a limit, then let the child write
    // until the limit stops it. `ulimit -f` counts 512-byte blocks in POSIX sh; SIGXFSZ is
    // ignored so the write fails with EFBIG instead of killing the process.
    Store::open(dir.path(), options())
        .expect("create data dir")
        .close();
    let output = Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 128; exec \"$0\" \"$@\"")
        .arg(std::env::current_exe().expect("test binary"))
        .args([
            "full_disk_child_writer",
            "--exact",
            "--ignored",
            "--nocapture",
            "--quiet",
        ])
        .env(FULL_DISK_CHILD_ENV, dir.path())
        .stderr(Stdio::null())
        .output()
        .expect("run child");
    assert!(
        output.status.success(),
        "child did not exit cleanly: {:?}",
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let acked: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ACK "))
        .collect();
    let failed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("FAIL "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(!acked.is_empty(), "the limit left no room at all");
    assert_eq!(failed.len() as u32, WRITES_AFTER_FAILURE + 1, "{stdout}");

    let store = Store::open(dir.path(), options()).expect("reopen with space again");
    for code in &acked {
        assert_eq!(
            store.get(code).map(|link| link.long_url),
            Some(url_for(code))
        );
    }
    for code in &failed {
        assert!(store.get(code).is_none(), "{code} failed yet exists");
    }
    assert!(
        store.recovery().cut.is_none(),
        "a failed write left a torn record behind"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let again = Link {
        code: "after".into(),
        long_url: url_for("after"),
        meta: LinkMeta::new(1_700_000_000),
    };
    runtime
        .block_on(store.create(again))
        .expect("writes work once there is space");
}
