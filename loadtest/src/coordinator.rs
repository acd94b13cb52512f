//! Runs the generator threads and gathers what they count: starts them together, merges their
//! per-second counts, prints the live progress line, writes the HDR interval log, and stops every
//! thread if one fails. It owns the run's clock and its output on stderr; it never touches a
//! socket.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
use hdrhistogram::serialization::V2DeflateSerializer;

use crate::engine::{self, EngineError, Message, Shared, ThreadPlan, TICK};
use crate::report::format_us;
use crate::stats::Stats;
use crate::LoadtestError;

/// What the threads measured after the warm-up, and how long that phase lasted.
#[derive(Debug)]
pub struct Gathered {
    pub measured: Stats,
    pub measured_duration: Duration,
}

/// Counts of one interval, merged as threads report it.
#[derive(Default)]
struct Interval {
    warmup: Stats,
    measured: Stats,
    reporters: usize,
}

/// Runs every thread plan to the end and returns the merged measured counts.
pub fn run(
    shared: Arc<Shared>,
    plans: Vec<ThreadPlan>,
    hdr_log: Option<&Path>,
    progress: bool,
) -> Result<Gathered, LoadtestError> {
    let mut log_file = match hdr_log {
        Some(path) => Some(BufWriter::new(File::create(path).map_err(|source| {
            LoadtestError::HdrLog {
                path: path.to_owned(),
                reason: source.to_string(),
            }
        })?)),
        None => None,
    };
    let mut serializer = V2DeflateSerializer::new();
    let log_start = SystemTime::now();
    let mut log_writer = match log_file.as_mut() {
        Some(file) => Some(
            IntervalLogWriterBuilder::new()
                .add_comment("kurz loadtest: latency in microseconds, one interval per second")
                .with_start_time(log_start)
                .begin_log_with(file, &mut serializer)
                .map_err(|error| hdr_log_error(hdr_log, error.to_string()))?,
        ),
        None => None,
    };

    let thread_count = plans.len();
    let gate = Arc::new(StartGate::default());
    let (sender, receiver) = mpsc::channel();
    let mut handles = Vec::with_capacity(thread_count);
    for plan in plans {
        let (thread_shared, thread_gate, sender) = (shared.clone(), gate.clone(), sender.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("loadtest-{}", plan.thread))
            .spawn(move || {
                let wait_for_start = || thread_gate.arrive_and_wait();
                engine::run_thread(&thread_shared, plan, wait_for_start, sender);
            });
        match spawned {
            Ok(handle) => handles.push(handle),
            Err(error) => {
                shared.abort.store(true, Ordering::Relaxed);
                gate.open();
                join_all(handles);
                return Err(LoadtestError::Thread(error.to_string()));
            }
        }
    }
    drop(sender);
    gate.wait_for(thread_count);
    gate.open();
    let start = Instant::now();
    let measured_start = start + shared.warmup;

    let mut pending: BTreeMap<u64, Interval> = BTreeMap::new();
    let mut last_tick: Vec<Option<u64>> = vec![None; thread_count];
    let mut total = Stats::new();
    let mut warmup_errors = 0;
    let mut failure: Option<EngineError> = None;
    let mut printer = Printer::new(progress);
    for message in receiver.iter() {
        match message {
            Message::Tick {
                thread,
                tick,
                warmup,
                measured,
                last,
            } => {
                let interval = pending.entry(tick).or_default();
                interval.warmup.merge(&warmup);
                interval.measured.merge(&measured);
                interval.reporters += 1;
                if last {
                    last_tick[thread] = Some(tick);
                }
            }
            Message::Failed { thread, error } => {
                shared.abort.store(true, Ordering::Relaxed);
                last_tick[thread] = Some(0);
                failure.get_or_insert(error);
            }
        }
        while let Some(interval) = pop_complete(&mut pending, &last_tick) {
            let (tick, interval) = interval;
            total.merge(&interval.measured);
            warmup_errors += interval.warmup.errors.total();
            if let Some(writer) = log_writer.as_mut() {
                write_interval(writer, &interval.measured, tick, hdr_log)?;
            }
            if last_tick
                .iter()
                .all(|last| last.is_none_or(|last| last > tick))
            {
                printer.line(tick, &interval, &total, warmup_errors);
            }
        }
    }
    let finished = Instant::now();
    printer.finish();
    join_all(handles);
    if let Some(error) = failure {
        return Err(LoadtestError::Engine(error));
    }
    drop(log_writer);
    if let Some(file) = log_file.as_mut() {
        file.flush()
            .map_err(|error| hdr_log_error(hdr_log, error.to_string()))?;
    }
    Ok(Gathered {
        measured: total,
        measured_duration: finished.saturating_duration_since(measured_start),
    })
}

fn join_all(handles: Vec<std::thread::JoinHandle<()>>) {
    for handle in handles {
        if let Err(panic) = handle.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Takes the oldest interval once every thread still running at its time has reported it.
fn pop_complete(
    pending: &mut BTreeMap<u64, Interval>,
    last_tick: &[Option<u64>],
) -> Option<(u64, Interval)> {
    let (&tick, interval) = pending.first_key_value()?;
    let expected = last_tick
        .iter()
        .filter(|last| last.is_none_or(|last| last >= tick))
        .count();
    (interval.reporters >= expected).then(|| pending.pop_first())?
}

fn write_interval<W: Write>(
    writer: &mut hdrhistogram::serialization::interval_log::IntervalLogWriter<
        '_,
        '_,
        W,
        V2DeflateSerializer,
    >,
    measured: &Stats,
    tick: u64,
    path: Option<&Path>,
) -> Result<(), LoadtestError> {
    if measured.responses() == 0 {
        return Ok(());
    }
    writer
        .write_histogram(&measured.latency_us, TICK * (tick as u32 - 1), TICK, None)
        .map_err(|error| hdr_log_error(path, format!("{error:?}")))
}

fn hdr_log_error(path: Option<&Path>, reason: String) -> LoadtestError {
    LoadtestError::HdrLog {
        path: path.map(Path::to_owned).unwrap_or_default(),
        reason,
    }
}

/// Lets the threads start their clocks together, once each has opened its connections.
#[derive(Default)]
struct StartGate {
    /// Threads arrived, and whether the gate is open.
    state: Mutex<(usize, bool)>,
    changed: Condvar,
}

impl StartGate {
    fn arrive_and_wait(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0 += 1;
        self.changed.notify_all();
        while !state.1 {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn wait_for(&self, arrivals: usize) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while state.0 < arrivals {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn open(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).1 = true;
        self.changed.notify_all();
    }
}

/// The live progress line: rewritten in place on a terminal, one line per second otherwise.
struct Printer {
    enabled: bool,
    terminal: bool,
}

impl Printer {
    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn line(&mut self, tick: u64, interval: &Interval, total: &Stats, warmup_errors: u64) {
        if !self.enabled {
            return;
        }
        let responses = interval.warmup.responses() + interval.measured.responses();
        let rate = responses as f64 / TICK.as_secs_f64();
        let (phase, errors, p99_us) = if total.responses() > 0 || interval.warmup.responses() == 0 {
            (
                "",
                total.errors.total(),
                total.latency_us.value_at_quantile(0.99),
            )
        } else {
            (
                " (warm-up)",
                warmup_errors,
                interval.warmup.latency_us.value_at_quantile(0.99),
            )
        };
        let line = format!(
            "[{tick:>4}s] {rate:>10.0} req/s  errors {errors}  p99 {}{phase}",
            format_us(p99_us)
        );
        let mut stderr = std::io::stderr().lock();
        let _ = if self.terminal {
            write!(stderr, "\r{line}\x1b[K")
        } else {
            writeln!(stderr, "{line}")
        };
    }

    fn finish(&mut self) {
        if self.enabled && self.terminal {
            let _ = writeln!(std::io::stderr());
        }
    }
}
