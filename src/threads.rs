//! Background threads: the click aggregator, the click-count checkpoints and the snapshot policy
//! run at a lower priority (nice +10 on Linux) than the redirect workers. A burst of background
//! work on a CPU a worker shares (writing a million click counters, building a snapshot) then
//! yields to requests instead of adding milliseconds to their answers, while still getting
//! about a tenth of a saturated CPU, so click events keep flowing and checkpoints keep their
//! interval. (`SCHED_IDLE` was measured too: it preempts background work on every request's
//! arrival, which cost ~10% more CPU per request through the extra context switches, for no
//! better tail, and starved the aggregator outright at saturation.) The WAL writer is not a
//! background thread: writes wait on it.
//!
//! A lower priority decides who gets the CPU, not how long a background thread keeps it once
//! it runs: with the kernel's 4 ms tick a busy worker could wait that long. So long loops of
//! background work go through a [`Pacer`], which offers the CPU back every quarter of a
//! millisecond.

use std::io::{self, Write};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest a background thread works before it offers the CPU to whatever else is waiting.
const BURST_MAX: Duration = Duration::from_micros(250);

/// Paces a loop of background work: call [`Pacer::pace`] between pieces of it (each well under
/// [`BURST_MAX`]); once a burst has lasted that long it yields the CPU. When nothing else
/// waits the yield returns at once.
pub struct Pacer {
    burst_started: Instant,
}

impl Default for Pacer {
    fn default() -> Pacer {
        Pacer {
            burst_started: Instant::now(),
        }
    }
}

impl Pacer {
    pub fn pace(&mut self) {
        if self.burst_started.elapsed() >= BURST_MAX {
            std::thread::yield_now();
            self.burst_started = Instant::now();
        }
    }
}

/// Most bytes a [`PacedWriter`] passes on in one write: well under [`BURST_MAX`] of copying.
const PACED_WRITE_BYTES_MAX: usize = 256 * 1024;
/// Bytes a [`PacedWriter`] passes on between two looks at the clock: a serialiser writes a
/// token at a time, and a clock read per token would cost more than the tokens.
const PACED_CHECK_BYTES: usize = 16 * 1024;

/// A writer that paces the work feeding it: once [`PACED_CHECK_BYTES`] went through since it
/// last looked, a write first offers the CPU back if the burst has lasted [`BURST_MAX`]; and
/// it passes on at most [`PACED_WRITE_BYTES_MAX`] a write. So a serialiser writing through it
/// yields between pieces of output without knowing about pacing, and one large slice is
/// copied to the kernel in several pieces.
pub struct PacedWriter<W> {
    inner: W,
    pacer: Pacer,
    unchecked_bytes: usize,
}

impl<W: Write> PacedWriter<W> {
    pub fn new(inner: W) -> PacedWriter<W> {
        PacedWriter {
            inner,
            pacer: Pacer::default(),
            unchecked_bytes: 0,
        }
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for PacedWriter<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.unchecked_bytes >= PACED_CHECK_BYTES {
            self.pacer.pace();
            self.unchecked_bytes = 0;
        }
        let written = self
            .inner
            .write(&bytes[..bytes.len().min(PACED_WRITE_BYTES_MAX)])?;
        self.unchecked_bytes += written;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// How much lower than the workers background threads run (a nice increment).
#[cfg(target_os = "linux")]
const BACKGROUND_NICE: libc::c_int = 10;

/// Spawns a named thread that lowers its own priority, then runs `work`.
pub fn spawn_background<F, T>(name: &str, work: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            lower_this_threads_priority();
            work()
        })
}

fn lower_this_threads_priority() {
    // On Linux `nice` changes only the calling thread (a thread is its own scheduling entity);
    // elsewhere it would slow the whole process, workers included, so it is left alone. Failing
    // to lower a priority changes nothing but latency, so the result is not checked.
    #[cfg(target_os = "linux")]
    // SAFETY: nice takes a plain integer and touches no memory of ours.
    unsafe {
        libc::nice(BACKGROUND_NICE);
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The nice value of the calling thread, from /proc (field 19 of its stat line).
    fn own_nice() -> i64 {
        // SAFETY: gettid takes no arguments.
        let tid = unsafe { libc::gettid() };
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("stat");
        // The fields after the parenthesised name start at field 3.
        let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
        after_name
            .split(' ')
            .nth(19 - 3)
            .expect("nice field")
            .parse()
            .expect("a number")
    }

    #[test]
    fn a_pacer_yields_and_starts_a_new_burst_once_one_lasted_long_enough() {
        let mut pacer = Pacer::default();
        let first = pacer.burst_started;
        std::thread::sleep(BURST_MAX);
        pacer.pace();
        assert!(
            pacer.burst_started >= first + BURST_MAX,
            "a yield, then a new burst"
        );
    }

    #[test]
    fn a_paced_writer_passes_every_byte_and_paces_its_writes() {
        let mut out = PacedWriter::new(Vec::new());
        let first = out.pacer.burst_started;
        out.write_all(b"one ").expect("write");
        std::thread::sleep(BURST_MAX);
        out.write_all(b"two").expect("write");
        assert_eq!(out.pacer.burst_started, first, "no look at the clock yet");
        out.write_all(&[b' '; PACED_CHECK_BYTES]).expect("write");
        out.write_all(b"!").expect("write");
        assert!(out.pacer.burst_started >= first + BURST_MAX, "a yield");
        let large = vec![7u8; 3 * PACED_WRITE_BYTES_MAX];
        assert_eq!(out.write(&large).expect("write"), PACED_WRITE_BYTES_MAX);
        out.write_all(&large).expect("write all");
        let written = out.into_inner();
        assert_eq!(&written[..7], b"one two");
        assert_eq!(
            written.len(),
            7 + PACED_CHECK_BYTES + 1 + 4 * PACED_WRITE_BYTES_MAX
        );
    }

    #[test]
    fn background_threads_run_below_the_spawning_thread() {
        let spawner = own_nice();
        let background = spawn_background("kurz-test-background", own_nice)
            .expect("spawn")
            .join()
            .expect("join");
        assert_eq!(background, (spawner + i64::from(BACKGROUND_NICE)).min(19));
        assert_eq!(
            own_nice(),
            spawner,
            "the spawning thread keeps its priority"
        );
    }
}
