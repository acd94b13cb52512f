//! One generator thread: its share of the keep-alive connections, driven by its own epoll loop
//! (mio), sending pre-built requests on a schedule (open loop) or back to back (closed loop) and
//! timing each response. It owns the connections and the hot path; it never prints, never
//! allocates per request, and hands its counts to the coordinator once per second.
//!
//! Architecture notes:
//! - Latency in open loop is measured from each request's *intended* send time, not from when it
//!   could be sent (coordinated-omission correction, as wrk2 does): a server that stalls makes
//!   every request scheduled during the stall late, and that shows in the tail.
//! - epoll's timeout has millisecond granularity, and a send made late by the timer would be
//!   charged to the server; so when the next send is less than a millisecond away the loop polls
//!   without sleeping.
//! - A response is read until it is complete, not until the socket would block: the next one
//!   only comes after the next request, and edge-triggered epoll reports its arrival. This saves
//!   one `read` per request.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use thiserror::Error;

use crate::response::{Parsed, ResponseReader};
use crate::sampler::Rng;
use crate::stats::{ErrorKind, Stats};
use crate::workload::{Pick, Workload};

/// Bytes of the per-connection read buffer; also the largest response head accepted.
pub const READ_BUFFER_BYTES: usize = 16 * 1024;
/// Readiness events taken from the kernel per poll.
const EVENTS_PER_POLL: usize = 1024;
/// Wait before opening a connection again after a failed attempt.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(20);
/// Connection attempts in a row that may fail, across a thread's connections, before the thread
/// decides the server is gone and stops the run.
pub const CONNECT_FAILURES_IN_ROW_MAX: u32 = 200;
/// How often a thread hands its counts to the coordinator.
pub const TICK: Duration = Duration::from_secs(1);
/// Below this wait the loop polls without sleeping (see the module notes).
const SPIN_BELOW: Duration = Duration::from_millis(1);
/// Longest the loop sleeps in one poll, so it notices an abort quickly.
const POLL_SLEEP_MAX: Duration = Duration::from_millis(100);

#[derive(Debug, Error, Clone)]
pub enum EngineError {
    #[error("cannot set up the event loop: {0}")]
    Poll(String),
    #[error(
        "{failures} connection attempts in a row to {addr} failed (last: {last}); is the server \
         still up?"
    )]
    ServerGone {
        addr: SocketAddr,
        failures: u32,
        last: String,
    },
}

/// When the run stops issuing requests.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// Stop this long after the warm-up; requests still in flight then are not counted.
    After(Duration),
    /// Stop once this many requests were issued after the warm-up and all of them completed.
    Requests(u64),
}

/// What every thread shares.
#[derive(Debug)]
pub struct Shared {
    pub addr: SocketAddr,
    pub workload: Arc<Workload>,
    pub warmup: Duration,
    pub timeout: Duration,
    /// Set by the coordinator to stop every thread early (another thread failed).
    pub abort: AtomicBool,
}

/// One thread's share of the run.
#[derive(Debug, Clone)]
pub struct ThreadPlan {
    pub thread: usize,
    pub connections: usize,
    /// Index of this thread's first connection among all threads', to spread send times.
    pub first_connection: usize,
    /// Open loop: time between two requests on one connection (connections × 1/rate).
    pub connection_interval: Option<Duration>,
    /// Open loop: time between two requests across all connections (1/rate).
    pub global_interval: Option<Duration>,
    pub stop: Stop,
    pub seed: u64,
}

/// Counts handed to the coordinator.
#[derive(Debug)]
pub enum Message {
    /// Counts of interval `tick` (`tick` seconds after the start, the last one maybe shorter).
    Tick {
        thread: usize,
        tick: u64,
        warmup: Box<Stats>,
        measured: Box<Stats>,
        last: bool,
    },
    Failed {
        thread: usize,
        error: EngineError,
    },
}

/// Runs one generator thread to the end. Every thread, failed or not, calls `wait_for_start`
/// once, after opening its connections, so that all threads start their clocks together.
pub fn run_thread(
    shared: &Shared,
    plan: ThreadPlan,
    wait_for_start: impl FnOnce(),
    report: Sender<Message>,
) {
    let thread = plan.thread;
    let worker = Worker::new(shared, plan, report.clone()).map(|mut worker| {
        worker.open_all();
        worker
    });
    wait_for_start();
    if let Err(error) = worker.and_then(|worker| worker.run()) {
        let _ = report.send(Message::Failed { thread, error });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a non-blocking connect to finish.
    Connecting,
    /// Connected, nothing in flight; maybe waiting for the next send time.
    Idle,
    /// A request is partly written.
    Writing,
    /// The request is written; reading its response.
    Reading,
    /// A connect failed; waiting to try again.
    Backoff,
}

struct Connection {
    stream: Option<TcpStream>,
    phase: Phase,
    buffer: Box<[u8]>,
    filled: usize,
    reader: ResponseReader,
    request: Pick,
    written: usize,
    /// Latency is measured from here: the intended send time (open loop) or the send (closed).
    origin: Instant,
    /// When the request was really sent; the timeout counts from here.
    sent_at: Instant,
    /// Open loop: the intended send time of this connection's next request.
    next_at: Instant,
    /// The timer entry that is current for this connection; older entries are ignored.
    wake_at: Option<Instant>,
    connect_started: Instant,
    /// Whether the request in flight was sent after the warm-up.
    measured: bool,
    /// This connection's copy of the create request, rewritten before each create.
    create: Vec<u8>,
    /// Responses received on the current socket.
    responses_here: u64,
    /// The read in flight is waiting for a new connection to be sent again (see `fail`).
    resend: bool,
}

struct Worker<'a> {
    shared: &'a Shared,
    plan: ThreadPlan,
    report: Sender<Message>,
    poll: Poll,
    connections: Vec<Connection>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    rng: Rng,
    warmup: Box<Stats>,
    measured: Box<Stats>,
    start: Instant,
    /// When the measured phase begins; `None` while the connections are still being opened.
    warmup_end: Option<Instant>,
    deadline: Option<Instant>,
    requests_left: Option<u64>,
    in_flight: usize,
    connect_failures_in_row: u32,
    last_connect_error: String,
}

impl<'a> Worker<'a> {
    fn new(
        shared: &'a Shared,
        plan: ThreadPlan,
        report: Sender<Message>,
    ) -> Result<Self, EngineError> {
        let poll = Poll::new().map_err(|error| EngineError::Poll(error.to_string()))?;
        let now = Instant::now();
        let connections = (0..plan.connections)
            .map(|_| Connection {
                stream: None,
                phase: Phase::Backoff,
                buffer: vec![0; READ_BUFFER_BYTES].into_boxed_slice(),
                filled: 0,
                reader: ResponseReader::default(),
                request: Pick::Create,
                written: 0,
                origin: now,
                sent_at: now,
                next_at: now,
                wake_at: None,
                connect_started: now,
                measured: false,
                create: shared.workload.create_template(),
                responses_here: 0,
                resend: false,
            })
            .collect();
        let requests_left = match plan.stop {
            Stop::Requests(count) => Some(count),
            Stop::After(_) => None,
        };
        let rng = Rng::new(plan.seed);
        Ok(Self {
            shared,
            plan,
            report,
            poll,
            connections,
            timers: BinaryHeap::new(),
            rng,
            warmup: Box::default(),
            measured: Box::default(),
            start: now,
            warmup_end: None,
            deadline: None,
            requests_left,
            in_flight: 0,
            connect_failures_in_row: 0,
            last_connect_error: String::new(),
        })
    }

    /// Opens every connection and waits (at most the timeout) until each is up or has failed
    /// once, so that connection set-up is not charged to the first requests.
    fn open_all(&mut self) {
        for index in 0..self.connections.len() {
            self.connect(index);
        }
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
        let give_up_at = Instant::now() + self.shared.timeout;
        while self
            .connections
            .iter()
            .any(|c| c.phase == Phase::Connecting)
        {
            let now = Instant::now();
            if now >= give_up_at || self.poll_once(&mut events, give_up_at - now).is_err() {
                return;
            }
        }
    }

    fn run(mut self) -> Result<(), EngineError> {
        self.start = Instant::now();
        let warmup_end = self.start + self.shared.warmup;
        self.warmup_end = Some(warmup_end);
        self.deadline = match self.plan.stop {
            Stop::After(duration) => Some(warmup_end + duration),
            Stop::Requests(_) => None,
        };
        self.schedule_first_sends();
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
        let mut tick = 1u64;
        let mut next_tick_at = self.start + TICK;
        let scan_interval =
            (self.shared.timeout / 4).clamp(Duration::from_millis(1), Duration::from_millis(50));
        let mut next_scan_at = self.start + scan_interval;
        loop {
            let now = Instant::now();
            if self.is_done(now) || self.shared.abort.load(Ordering::Relaxed) {
                break;
            }
            if now >= next_tick_at {
                if !self.send_tick(tick, false) {
                    return Ok(());
                }
                tick += 1;
                next_tick_at += TICK;
            }
            if now >= next_scan_at {
                self.expire(now);
                next_scan_at = now + scan_interval;
            }
            self.fire_timers(now);
            if self.connect_failures_in_row >= CONNECT_FAILURES_IN_ROW_MAX {
                return Err(EngineError::ServerGone {
                    addr: self.shared.addr,
                    failures: self.connect_failures_in_row,
                    last: self.last_connect_error.clone(),
                });
            }
            let mut wake_at = next_tick_at.min(next_scan_at);
            if let Some(Reverse((at, _))) = self.timers.peek() {
                wake_at = wake_at.min(*at);
            }
            if let Some(deadline) = self.deadline {
                wake_at = wake_at.min(deadline);
            }
            let wait = wake_at.saturating_duration_since(Instant::now());
            self.poll_once(&mut events, wait)?;
        }
        self.send_tick(tick, true);
        Ok(())
    }

    fn is_done(&self, now: Instant) -> bool {
        match (self.deadline, self.requests_left) {
            (Some(deadline), _) => now >= deadline,
            (None, Some(left)) => left == 0 && self.in_flight == 0,
            (None, None) => false,
        }
    }

    /// Hands this interval's counts over; false if nobody is listening any more.
    fn send_tick(&mut self, tick: u64, last: bool) -> bool {
        let message = Message::Tick {
            thread: self.plan.thread,
            tick,
            warmup: std::mem::take(&mut self.warmup),
            measured: std::mem::take(&mut self.measured),
            last,
        };
        self.report.send(message).is_ok()
    }

    /// Waits for readiness (see the module notes on spinning) and handles every event.
    fn poll_once(&mut self, events: &mut Events, wait: Duration) -> Result<(), EngineError> {
        let timeout = if wait < SPIN_BELOW {
            Duration::ZERO
        } else {
            // Whole milliseconds, rounded down: mio rounds up, and waking early is harmless.
            Duration::from_millis(wait.min(POLL_SLEEP_MAX).as_millis() as u64)
        };
        match self.poll.poll(events, Some(timeout)) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(error) => return Err(EngineError::Poll(error.to_string())),
        }
        for event in events.iter() {
            let index = event.token().0;
            match self.connections[index].phase {
                Phase::Connecting => self.finish_connect(index),
                Phase::Writing if event.is_writable() => self.write(index),
                Phase::Writing | Phase::Reading => self.read(index),
                Phase::Idle if event.is_readable() || event.is_read_closed() => {
                    self.read_idle(index)
                }
                Phase::Idle | Phase::Backoff => {}
            }
        }
        Ok(())
    }

    /// Open loop: spreads the first send of every connection evenly over one connection
    /// interval, so the requests of all connections interleave at the target rate.
    fn schedule_first_sends(&mut self) {
        let now = Instant::now();
        for index in 0..self.connections.len() {
            let offset = self
                .plan
                .global_interval
                .map(|interval| interval * (self.plan.first_connection + index) as u32)
                .unwrap_or_default();
            self.connections[index].next_at = self.start + offset;
            if self.connections[index].phase == Phase::Idle {
                self.send_next(index, now);
            }
        }
    }

    fn connect(&mut self, index: usize) {
        let now = Instant::now();
        let connection = &mut self.connections[index];
        connection.filled = 0;
        connection.reader.reset();
        connection.responses_here = 0;
        connection.connect_started = now;
        let result = TcpStream::connect(self.shared.addr).and_then(|mut stream| {
            stream.set_nodelay(true)?;
            self.poll.registry().register(
                &mut stream,
                Token(index),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(stream)
        });
        match result {
            Ok(stream) => {
                connection.stream = Some(stream);
                connection.phase = Phase::Connecting;
            }
            Err(error) => self.connect_failed(index, error, now),
        }
    }

    fn finish_connect(&mut self, index: usize) {
        let now = Instant::now();
        let Some(stream) = self.connections[index].stream.as_ref() else {
            return;
        };
        match stream.take_error() {
            Ok(Some(error)) | Err(error) => return self.connect_failed(index, error, now),
            Ok(None) => {}
        }
        match stream.peer_addr() {
            Ok(_) => {
                self.connect_failures_in_row = 0;
                let connection = &mut self.connections[index];
                if connection.resend {
                    connection.resend = false;
                    connection.written = 0;
                    connection.sent_at = now;
                    connection.phase = Phase::Writing;
                    self.write(index);
                } else {
                    connection.phase = Phase::Idle;
                    // While the connections are being opened nothing is sent; the start sends.
                    if self.warmup_end.is_some() {
                        self.send_next(index, now);
                    }
                }
            }
            Err(error) if error.kind() == io::ErrorKind::NotConnected => {}
            Err(error) => self.connect_failed(index, error, now),
        }
    }

    fn connect_failed(&mut self, index: usize, error: io::Error, now: Instant) {
        self.stats_at(now).record_error(ErrorKind::Connect);
        if self.connections[index].resend {
            // The read waiting to be sent again has no connection to go on: it failed.
            self.connections[index].resend = false;
            self.record_failure(index, ErrorKind::Closed);
        }
        self.connect_failures_in_row += 1;
        self.last_connect_error = error.to_string();
        self.close(index);
        self.connections[index].phase = Phase::Backoff;
        self.wake(index, now + RECONNECT_BACKOFF);
    }

    /// Closes the connection's socket (the request in flight, if any, is already accounted for).
    fn close(&mut self, index: usize) {
        if let Some(mut stream) = self.connections[index].stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
    }

    /// Opens the connection again, counting it as a reconnection.
    fn reconnect(&mut self, index: usize, now: Instant) {
        self.close(index);
        self.stats_at(now).reconnects += 1;
        self.connect(index);
    }

    fn wake(&mut self, index: usize, at: Instant) {
        self.connections[index].wake_at = Some(at);
        self.timers.push(Reverse((at, index)));
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, index))) = self.timers.peek().copied() {
            if at > now {
                return;
            }
            self.timers.pop();
            if self.connections[index].wake_at != Some(at) {
                continue;
            }
            self.connections[index].wake_at = None;
            match self.connections[index].phase {
                Phase::Idle => self.send_next(index, now),
                Phase::Backoff => self.connect(index),
                Phase::Connecting | Phase::Writing | Phase::Reading => {}
            }
        }
    }

    /// The stats that an event at `now` belongs to.
    fn stats_at(&mut self, now: Instant) -> &mut Stats {
        if self.warmup_end.is_some_and(|end| now >= end) {
            &mut self.measured
        } else {
            &mut self.warmup
        }
    }

    /// Sends the connection's next request now, or arms its timer if the schedule says later.
    fn send_next(&mut self, index: usize, now: Instant) {
        if self.deadline.is_some_and(|deadline| now >= deadline) || self.requests_left == Some(0) {
            return;
        }
        let origin = match self.plan.connection_interval {
            Some(interval) => {
                let intended = self.connections[index].next_at;
                if intended > now {
                    return self.wake(index, intended);
                }
                self.connections[index].next_at = intended + interval;
                intended
            }
            None => now,
        };
        let measured = self.warmup_end.is_some_and(|end| now >= end);
        if measured {
            if let Some(left) = self.requests_left.as_mut() {
                *left -= 1;
            }
        }
        let request = self.shared.workload.pick(&mut self.rng);
        let connection = &mut self.connections[index];
        if request == Pick::Create {
            self.shared
                .workload
                .randomize_create(&mut connection.create, &mut self.rng);
        }
        connection.request = request;
        connection.written = 0;
        connection.origin = origin;
        connection.sent_at = now;
        connection.measured = measured;
        connection.phase = Phase::Writing;
        self.in_flight += 1;
        self.write(index);
    }

    fn write(&mut self, index: usize) {
        let connection = &mut self.connections[index];
        let Some(stream) = connection.stream.as_ref() else {
            return;
        };
        let bytes = match connection.request {
            Pick::Read(read) => self.shared.workload.read_request(read),
            Pick::Create => &connection.create,
        };
        loop {
            match (&*stream).write(&bytes[connection.written..]) {
                Ok(0) => return self.fail(index, ErrorKind::Io),
                Ok(written) => {
                    connection.written += written;
                    if connection.written == bytes.len() {
                        connection.phase = Phase::Reading;
                        return;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.fail(index, ErrorKind::Io),
            }
        }
    }

    /// Reads until the response is complete or the socket has nothing more for now.
    fn read(&mut self, index: usize) {
        loop {
            let connection = &mut self.connections[index];
            let Some(stream) = connection.stream.as_ref() else {
                return;
            };
            if connection.filled == connection.buffer.len() {
                return self.fail(index, ErrorKind::Malformed);
            }
            let received = match (&*stream).read(&mut connection.buffer[connection.filled..]) {
                Ok(0) => return self.closed_while_reading(index),
                Ok(received) => received,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.fail(index, ErrorKind::Io),
            };
            if connection.phase != Phase::Reading {
                // Response bytes before the request was fully written.
                return self.fail(index, ErrorKind::Malformed);
            }
            connection.filled += received;
            match connection
                .reader
                .advance(&connection.buffer[..connection.filled])
            {
                Err(_) => return self.fail(index, ErrorKind::Malformed),
                Ok(Parsed::NeedMore { consumed }) => {
                    connection
                        .buffer
                        .copy_within(consumed..connection.filled, 0);
                    connection.filled -= consumed;
                }
                Ok(Parsed::Complete {
                    status,
                    close,
                    consumed,
                }) => {
                    if consumed != connection.filled {
                        return self.fail(index, ErrorKind::Malformed);
                    }
                    connection.filled = 0;
                    return self.complete(index, status, close);
                }
            }
        }
    }

    fn closed_while_reading(&mut self, index: usize) {
        match self.connections[index].reader.finish_on_close() {
            Some(status) => self.complete(index, status, true),
            None => self.fail(index, ErrorKind::Closed),
        }
    }

    /// Bytes or a close on a connection with nothing in flight: a close is the server ending an
    /// idle keep-alive connection (reconnect); bytes are a response nobody asked for (error).
    fn read_idle(&mut self, index: usize) {
        let now = Instant::now();
        let connection = &mut self.connections[index];
        let Some(stream) = connection.stream.as_ref() else {
            return;
        };
        match (&*stream).read(&mut connection.buffer[..]) {
            Ok(0) => self.reconnect(index, now),
            Ok(_) => {
                self.stats_at(now).record_error(ErrorKind::Malformed);
                self.reconnect(index, now);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                self.stats_at(now).record_error(ErrorKind::Io);
                self.reconnect(index, now);
            }
        }
    }

    fn complete(&mut self, index: usize, status: u16, close: bool) {
        let now = Instant::now();
        let connection = &mut self.connections[index];
        let latency_us = now.saturating_duration_since(connection.origin).as_micros() as u64;
        let stats = if connection.measured {
            &mut self.measured
        } else {
            &mut self.warmup
        };
        stats.record_response(status, latency_us);
        connection.phase = Phase::Idle;
        connection.responses_here += 1;
        self.in_flight -= 1;
        if close {
            self.reconnect(index, now);
        } else {
            self.send_next(index, now);
        }
    }

    /// The request in flight failed: count it and start over on a new connection.
    ///
    /// Except in one case, as HTTP clients do: a server may close a keep-alive connection that
    /// it considers idle just as a request goes out on it, and then nothing of a response has
    /// come. A read (idempotent) caught that way is sent once more on a new connection, its
    /// latency still counted from its first send (or intended send).
    fn fail(&mut self, index: usize, kind: ErrorKind) {
        let now = Instant::now();
        let connection = &mut self.connections[index];
        let closed_under_it = matches!(kind, ErrorKind::Closed | ErrorKind::Io)
            && connection.responses_here > 0
            && connection.filled == 0
            && connection.reader.is_at_head()
            && matches!(connection.request, Pick::Read(_));
        if closed_under_it {
            connection.resend = true;
            connection.phase = Phase::Idle;
            return self.reconnect(index, now);
        }
        self.record_failure(index, kind);
        self.reconnect(index, now);
    }

    fn record_failure(&mut self, index: usize, kind: ErrorKind) {
        let connection = &mut self.connections[index];
        let stats = if connection.measured {
            &mut self.measured
        } else {
            &mut self.warmup
        };
        stats.record_error(kind);
        connection.phase = Phase::Idle;
        self.in_flight -= 1;
    }

    /// Fails requests and connection attempts that have waited longer than the timeout.
    fn expire(&mut self, now: Instant) {
        let timeout = self.shared.timeout;
        for index in 0..self.connections.len() {
            let connection = &self.connections[index];
            match connection.phase {
                Phase::Writing | Phase::Reading
                    if now.saturating_duration_since(connection.sent_at) >= timeout =>
                {
                    self.fail(index, ErrorKind::Timeout);
                }
                Phase::Connecting
                    if now.saturating_duration_since(connection.connect_started) >= timeout =>
                {
                    let error = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                    self.connect_failed(index, error, now);
                }
                _ => {}
            }
        }
    }
}
