//! The public listener's event loops: one thread per worker, each with its own epoll instance
//! (mio), answering `GET`/`HEAD /{code}` through the lean path ([`fast::step`]) straight from
//! readiness events. No task, waker or timer per connection. Each round a loop first reads
//! every ready connection (one `recv` each, into the round's batch buffer) and asks the CPU for
//! the table slot of each one's code, then for the records and click counts those slots point
//! to, and only then answers them (one `send` each): the cache misses of a round's lookups
//! overlap instead of stalling one answer each. The analytics events of a round's clicks are
//! gathered in a batch of the loop's and handed to the pipeline together at the end of the
//! round. The first loop owns the listener and deals accepted connections out to the loops in
//! turn.
//!
//! Owns, per connection: the bytes of a request head not yet complete, answers the client has
//! not taken yet (it then reads nothing more from that client until they are gone), and one
//! deadline, checked on a coarse tick — the time a request head or a keep-alive wait may take,
//! or a client may leave its answers unread. Takes a permit of the listener's connection cap
//! for every connection; hands a connection whose request is not for the lean path, with the
//! bytes already read and the answers not yet sent, to hyper on the tokio runtime
//! ([`HandedOver`]). On stop: closes the listener, closes idle connections at once and the rest
//! as soon as they are idle, and ends once none are left or the grace period is over.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::fast::{self, Step};
use super::{redirect, App};
use crate::analytics::pipeline::EventBatch;
use crate::store::snapshot::Probe;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
/// Readiness events taken per `epoll_wait`.
const EVENTS_MAX: usize = 1024;
/// One `recv` takes up to this many bytes of one connection.
const READ_BYTES: usize = 16 * 1024;
/// A loop's batch buffer: the reads of one round of ready connections, before any is answered.
const BATCH_BYTES: usize = 16 * READ_BYTES;
/// Bounds of the tick that checks deadlines (a quarter of the timeout within them).
const TICK_MIN: Duration = Duration::from_millis(5);
const TICK_MAX: Duration = Duration::from_millis(250);
/// Latency samples: every this-many-th request of a connection (the first included) is timed.
const LATENCY_SAMPLE_EVERY: u32 = 8;

/// A connection that needs hyper, as the loop leaves it.
pub struct HandedOver {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    /// Bytes read from the client and not answered, starting with the request hyper must read.
    pub prefix: Bytes,
    /// Answers to earlier requests the client has not taken yet; they go out first.
    pub unsent: Vec<u8>,
    /// The connection's place under the listener's cap.
    pub permit: OwnedSemaphorePermit,
}

/// Takes a connection for hyper; called on a loop's thread, so it must not block.
pub type Handoff = Arc<dyn Fn(HandedOver) + Send + Sync>;

/// How the loops serve: shared by all of them.
pub struct LoopOptions {
    pub app: Arc<App>,
    /// The listener's connection cap.
    pub slots: Arc<Semaphore>,
    pub handoff: Handoff,
    /// How long a request head (or an idle keep-alive wait) may take, and how long a client may
    /// leave its answers unread.
    pub timeout: Duration,
    pub head_bytes_max: usize,
    /// How long stopping waits for connections in the middle of a request.
    pub grace: Duration,
}

/// The running loops.
pub struct LeanLoops {
    stop: Arc<AtomicBool>,
    wakers: Vec<Arc<Waker>>,
    threads: Vec<JoinHandle<()>>,
}

impl LeanLoops {
    /// Starts `workers` loops (at least one) serving `listener`.
    pub fn start(
        listener: std::net::TcpListener,
        workers: usize,
        options: LoopOptions,
    ) -> io::Result<LeanLoops> {
        listener.set_nonblocking(true)?;
        // A kept partial head and the next read share the loop's buffer.
        let options = Arc::new(LoopOptions {
            head_bytes_max: options.head_bytes_max.min(READ_BYTES / 2),
            ..options
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut loops = Vec::new();
        for _ in 0..workers.max(1) {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
            let (sender, receiver) = crossbeam_channel::unbounded();
            loops.push((poll, waker, sender, receiver));
        }
        let peers: Vec<Peer> = loops
            .iter()
            .map(|(_, waker, sender, _)| Peer {
                waker: waker.clone(),
                incoming: sender.clone(),
            })
            .collect();
        let wakers = peers.iter().map(|peer| peer.waker.clone()).collect();
        let mut listener = Some(TcpListener::from_std(listener));
        let mut threads = Vec::new();
        for (index, (poll, _, _, incoming)) in loops.into_iter().enumerate() {
            let mut lean = EventLoop::new(poll, options.clone(), stop.clone(), incoming);
            if let Some(mut listener) = listener.take() {
                lean.poll
                    .registry()
                    .register(&mut listener, LISTENER, Interest::READABLE)?;
                lean.listener = Some(Accepting {
                    listener,
                    peers: peers.clone(),
                    next_peer: 0,
                    paused: false,
                });
            }
            let thread = std::thread::Builder::new()
                .name(format!("kurz-lean-{index}"))
                .spawn(move || lean.run())?;
            threads.push(thread);
        }
        Ok(LeanLoops {
            stop,
            wakers,
            threads,
        })
    }

    /// Asks every loop to stop and waits until they have (blocking; at most about the grace
    /// period).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for waker in &self.wakers {
            if let Err(error) = waker.wake() {
                tracing::error!("cannot wake an event loop to stop it: {error}");
            }
        }
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("an event loop of the public listener panicked");
            }
        }
    }
}

/// A loop as the accepting loop sees it: where to send a connection and how to wake it.
#[derive(Clone)]
struct Peer {
    waker: Arc<Waker>,
    incoming: Sender<Accepted>,
}

struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
}

/// The listener, held by the first loop.
struct Accepting {
    listener: TcpListener,
    peers: Vec<Peer>,
    next_peer: usize,
    /// At the connection cap (or out of file descriptors): accepting again on the next tick.
    paused: bool,
}

/// One open connection of a loop.
struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    /// Its place under the listener's connection cap, given back when it closes.
    permit: OwnedSemaphorePermit,
    /// The start of a request whose head is not complete yet.
    partial: Vec<u8>,
    /// Answers the socket did not take yet.
    unsent: Vec<u8>,
    /// When the tick closes it: a request head or keep-alive wait, or unsent answers, too long.
    deadline: Instant,
    /// Requests answered so far, for sampling their latency.
    answered: u32,
    /// Registered for writability too (once a send fell short).
    writable: bool,
}

/// One connection's read in a round: its bytes (`batch_bytes[start..end]`, a kept partial head
/// first) and the probe that prefetched the table slot of its first request's code.
struct BatchRead {
    index: usize,
    start: usize,
    end: usize,
    probe: Option<Probe>,
}

/// What serving a ready connection left it in.
enum Outcome {
    Open,
    Close,
    /// Hyper takes it, starting with these bytes.
    Hyper(Bytes),
}

struct EventLoop {
    poll: Poll,
    options: Arc<LoopOptions>,
    stop: Arc<AtomicBool>,
    incoming: Receiver<Accepted>,
    listener: Option<Accepting>,
    connections: Vec<Option<Connection>>,
    free: Vec<usize>,
    /// What this round's ready connections sent, in `batch` order.
    batch_bytes: Box<[u8]>,
    batch: Vec<BatchRead>,
    /// The read buffer of a connection served on its own (outside a batch).
    input: Box<[u8]>,
    output: Vec<u8>,
    /// The analytics events of the clicks answered since the last hand-over: handed to the
    /// pipeline together, once per round (and after a connection served on its own).
    clicks: EventBatch,
    /// Set once stopping: when the loop gives up on the connections still open.
    give_up_at: Option<Instant>,
}

impl EventLoop {
    fn new(
        poll: Poll,
        options: Arc<LoopOptions>,
        stop: Arc<AtomicBool>,
        incoming: Receiver<Accepted>,
    ) -> EventLoop {
        EventLoop {
            poll,
            options,
            stop,
            incoming,
            listener: None,
            connections: Vec::new(),
            free: Vec::new(),
            batch_bytes: vec![0; BATCH_BYTES].into_boxed_slice(),
            batch: Vec::new(),
            input: vec![0; READ_BYTES].into_boxed_slice(),
            output: Vec::with_capacity(READ_BYTES),
            clicks: EventBatch::default(),
            give_up_at: None,
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_MAX);
        let tick = (self.options.timeout / 4).clamp(TICK_MIN, TICK_MAX);
        let mut next_tick = Instant::now() + tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            if let Err(error) = self.poll.poll(&mut events, Some(wait)) {
                if error.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("event loop: epoll_wait failed: {error}");
                    return;
                }
            }
            let now = Instant::now();
            // Every ready connection is read before any is answered, so that the memory misses
            // of their lookups overlap instead of each stalling its own answer.
            let hints = redirect::Hints::new(&self.options.app);
            let mut used = 0;
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    WAKER => self.take_incoming(now),
                    Token(index) => {
                        if used + READ_BYTES > BATCH_BYTES {
                            self.answer_batch(&hints, now);
                            used = 0;
                        }
                        used = self.read_into_batch(&hints, index, used, now);
                    }
                }
            }
            self.answer_batch(&hints, now);
            drop(hints);
            if now >= next_tick {
                next_tick = now + tick;
                self.on_tick(now);
            }
            if self.stop.load(Ordering::Acquire) && self.give_up_at.is_none() {
                self.begin_stop(now);
            }
            if let Some(give_up_at) = self.give_up_at {
                if self.connections.len() == self.free.len() || now >= give_up_at {
                    return;
                }
            }
        }
    }

    /// Accepts every waiting connection the cap allows and deals them out to the loops.
    fn accept(&mut self, now: Instant) {
        let Some(accepting) = self.listener.as_mut() else {
            return;
        };
        accepting.paused = false;
        let mut own = Vec::new();
        loop {
            let Ok(permit) = self.options.slots.clone().try_acquire_owned() else {
                accepting.paused = true;
                break;
            };
            let (stream, peer) = match accepting.listener.accept() {
                Ok(accepted) => accepted,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(error) => {
                    tracing::warn!("accept failed: {error}; trying again shortly");
                    accepting.paused = true;
                    break;
                }
            };
            let accepted = Accepted {
                stream,
                peer,
                permit,
            };
            let target = accepting.next_peer % accepting.peers.len();
            accepting.next_peer = accepting.next_peer.wrapping_add(1);
            if target == 0 {
                own.push(accepted);
                continue;
            }
            let peer = &accepting.peers[target];
            if peer.incoming.send(accepted).is_ok() {
                if let Err(error) = peer.waker.wake() {
                    tracing::error!("cannot wake event loop {target}: {error}");
                }
            }
        }
        for accepted in own {
            self.add(accepted, now);
        }
    }

    fn take_incoming(&mut self, now: Instant) {
        while let Ok(accepted) = self.incoming.try_recv() {
            self.add(accepted, now);
        }
    }

    fn add(&mut self, accepted: Accepted, now: Instant) {
        let Accepted {
            mut stream,
            peer,
            permit,
        } = accepted;
        if self.give_up_at.is_some() {
            return;
        }
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!("set_nodelay {peer}: {error}");
        }
        let index = self.free.pop().unwrap_or_else(|| {
            self.connections.push(None);
            self.connections.len() - 1
        });
        if let Err(error) =
            self.poll
                .registry()
                .register(&mut stream, Token(index), Interest::READABLE)
        {
            tracing::warn!("cannot watch the connection of {peer}: {error}");
            self.free.push(index);
            return;
        }
        self.connections[index] = Some(Connection {
            stream,
            peer,
            permit,
            partial: Vec::new(),
            unsent: Vec::new(),
            deadline: now + self.options.timeout,
            answered: 0,
            writable: false,
        });
    }

    /// Reads what connection `index` sent into the batch at `used` and starts loading its first
    /// request's table slot; returns the batch bytes used now. A connection that owes its client
    /// answers is served on its own instead.
    fn read_into_batch(
        &mut self,
        hints: &redirect::Hints,
        index: usize,
        used: usize,
        now: Instant,
    ) -> usize {
        let Some(Some(connection)) = self.connections.get_mut(index) else {
            return used;
        };
        if !connection.unsent.is_empty() {
            self.serve(index, now);
            return used;
        }
        let space = &mut self.batch_bytes[used..used + READ_BYTES];
        match read(connection, space) {
            Ok(Some(filled)) => {
                let probe = fast::prefetch(hints, &space[..filled]);
                self.batch.push(BatchRead {
                    index,
                    start: used,
                    end: used + filled,
                    probe,
                });
                used + filled
            }
            Ok(None) => used,
            Err(_) => {
                self.close(index);
                used
            }
        }
    }

    /// Answers the batch's reads: first starts loading each one's record and click count (their
    /// table slots are in cache by now), then answers them in turn.
    fn answer_batch(&mut self, hints: &redirect::Hints, now: Instant) {
        let mut batch = std::mem::take(&mut self.batch);
        for read in &batch {
            if let Some(probe) = read.probe {
                hints.prefetch_record(probe);
            }
        }
        for read in batch.drain(..) {
            let Some(Some(connection)) = self.connections.get_mut(read.index) else {
                continue;
            };
            let bytes = &self.batch_bytes[read.start..read.end];
            let mut outcome = answer(
                &self.options,
                connection,
                bytes,
                (&mut self.output, &mut self.clicks),
                now,
            );
            if matches!(outcome, Outcome::Open)
                && read.end - read.start == READ_BYTES
                && connection.unsent.is_empty()
            {
                // The read filled its space: the socket may hold more.
                outcome = serve_connection(
                    &self.options,
                    connection,
                    (&mut self.input, &mut self.output, &mut self.clicks),
                    now,
                );
            }
            self.settle(read.index, outcome);
        }
        self.batch = batch;
        self.options.app.hand_over_clicks(&mut self.clicks);
    }

    /// Serves connection `index` on its own: what it owes first, then every request it sent.
    fn serve(&mut self, index: usize, now: Instant) {
        let Some(Some(connection)) = self.connections.get_mut(index) else {
            return;
        };
        let outcome = serve_connection(
            &self.options,
            connection,
            (&mut self.input, &mut self.output, &mut self.clicks),
            now,
        );
        self.settle(index, outcome);
        self.options.app.hand_over_clicks(&mut self.clicks);
    }

    /// Acts on what serving connection `index` left it in.
    fn settle(&mut self, index: usize, outcome: Outcome) {
        self.output.clear();
        let Some(Some(connection)) = self.connections.get_mut(index) else {
            return;
        };
        let outcome = match outcome {
            Outcome::Open if !connection.unsent.is_empty() && !connection.writable => {
                // A send fell short: wait for room as well as for requests.
                connection.writable = true;
                let registered = self.poll.registry().reregister(
                    &mut connection.stream,
                    Token(index),
                    Interest::READABLE | Interest::WRITABLE,
                );
                match registered {
                    Ok(()) => Outcome::Open,
                    Err(_) => Outcome::Close,
                }
            }
            Outcome::Open if self.give_up_at.is_some() && is_idle(connection) => Outcome::Close,
            outcome => outcome,
        };
        match outcome {
            Outcome::Open => {}
            Outcome::Close => self.close(index),
            Outcome::Hyper(prefix) => self.hand_over(index, prefix),
        }
    }

    fn take(&mut self, index: usize) -> Option<Connection> {
        let mut connection = self.connections.get_mut(index)?.take()?;
        self.free.push(index);
        if let Err(error) = self.poll.registry().deregister(&mut connection.stream) {
            tracing::debug!("deregistering {}: {error}", connection.peer);
        }
        Some(connection)
    }

    fn close(&mut self, index: usize) {
        drop(self.take(index));
    }

    fn hand_over(&mut self, index: usize, prefix: Bytes) {
        let Some(connection) = self.take(index) else {
            return;
        };
        (self.options.handoff)(HandedOver {
            stream: connection.stream.into(),
            peer: connection.peer,
            prefix,
            unsent: connection.unsent,
            permit: connection.permit,
        });
    }

    /// Closes connections past their deadline; resumes accepting if it had paused.
    fn on_tick(&mut self, now: Instant) {
        for index in 0..self.connections.len() {
            let expired = self.connections[index]
                .as_ref()
                .is_some_and(|connection| now >= connection.deadline);
            if expired {
                self.close(index);
            }
        }
        if self
            .listener
            .as_ref()
            .is_some_and(|accepting| accepting.paused)
        {
            self.accept(now);
        }
    }

    /// Stops accepting and closes every connection that is between requests.
    fn begin_stop(&mut self, now: Instant) {
        self.give_up_at = Some(now + self.options.grace);
        if let Some(mut accepting) = self.listener.take() {
            if let Err(error) = self.poll.registry().deregister(&mut accepting.listener) {
                tracing::debug!("deregistering the listener: {error}");
            }
        }
        // Connections dealt to this loop but not taken yet are dropped (closed) here.
        while self.incoming.try_recv().is_ok() {}
        for index in 0..self.connections.len() {
            if self.connections[index].as_ref().is_some_and(is_idle) {
                self.close(index);
            }
        }
    }
}

/// Between requests: nothing half-read, nothing unsent.
fn is_idle(connection: &Connection) -> bool {
    connection.partial.is_empty() && connection.unsent.is_empty()
}

/// Reads what `connection` sent into `space`, after the partial head it kept (which moves
/// there too): Some(bytes now in `space`), None when there was nothing to read, an error when
/// the connection is over (closed by the client included).
fn read(connection: &mut Connection, space: &mut [u8]) -> io::Result<Option<usize>> {
    let kept = connection.partial.len();
    loop {
        match socket::recv(&connection.stream, &mut space[kept..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(read) => {
                space[..kept].copy_from_slice(&connection.partial);
                connection.partial.clear();
                return Ok(Some(kept + read));
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
}

/// Answers the requests in `bytes` (what `connection` sent) into `output` and sends the
/// answers, gathering their clicks' analytics events into `clicks`; keeps an incomplete last
/// head for the next read.
fn answer(
    options: &LoopOptions,
    connection: &mut Connection,
    bytes: &[u8],
    (output, clicks): (&mut Vec<u8>, &mut EventBatch),
    now: Instant,
) -> Outcome {
    let mut at = 0;
    while at < bytes.len() {
        let timed = connection.answered.is_multiple_of(LATENCY_SAMPLE_EVERY);
        let peer = (connection.peer.ip(), timed);
        match fast::step(
            &options.app,
            peer,
            &bytes[at..],
            options.head_bytes_max,
            (output, clicks),
        ) {
            Step::Answered(consumed) => {
                at += consumed;
                connection.answered = connection.answered.wrapping_add(1);
                connection.deadline = now + options.timeout;
            }
            Step::Partial => break,
            Step::Hyper => {
                connection.unsent = std::mem::take(output);
                return Outcome::Hyper(Bytes::copy_from_slice(&bytes[at..]));
            }
        }
    }
    connection.partial.extend_from_slice(&bytes[at..]);
    if output.is_empty() {
        return Outcome::Open;
    }
    match send(&connection.stream, output) {
        Err(_) => Outcome::Close,
        Ok(sent) => {
            if sent < output.len() {
                connection.unsent.extend_from_slice(&output[sent..]);
                connection.deadline = now + options.timeout;
            }
            output.clear();
            Outcome::Open
        }
    }
}

/// Serves one ready connection on its own: sends what it owes, then reads and answers until the
/// socket has nothing more (or the client stops taking answers).
fn serve_connection(
    options: &LoopOptions,
    connection: &mut Connection,
    (input, output, clicks): (&mut [u8], &mut Vec<u8>, &mut EventBatch),
    now: Instant,
) -> Outcome {
    if !connection.unsent.is_empty() {
        match send(&connection.stream, &connection.unsent) {
            Err(_) => return Outcome::Close,
            Ok(sent) if sent < connection.unsent.len() => {
                connection.unsent.drain(..sent);
                return Outcome::Open;
            }
            Ok(_) => {
                connection.unsent.clear();
                connection.deadline = now + options.timeout;
            }
        }
    }
    loop {
        let filled = match read(connection, input) {
            Ok(Some(filled)) => filled,
            Ok(None) => return Outcome::Open,
            Err(_) => return Outcome::Close,
        };
        let outcome = answer(options, connection, &input[..filled], (output, clicks), now);
        // A read that did not fill the buffer emptied the socket; a full one may have left more.
        if !matches!(outcome, Outcome::Open)
            || !connection.unsent.is_empty()
            || filled < input.len()
        {
            return outcome;
        }
    }
}

/// Sends as much of `bytes` as the socket takes now.
fn send(stream: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < bytes.len() {
        match socket::send(stream, &bytes[sent..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(count) => sent += count,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(sent)
}

/// A connection's `recv` and `send`. On Linux they go straight to the system call: glibc's
/// wrappers are thread-cancellation points that switch the thread's cancellation state off and
/// on around every call (~0.8% of the process's CPU at the peak, with the wrappers themselves
/// ~2%; PERFORMANCE.md, "Where the time goes"), and these threads are never cancelled.
mod socket {
    use std::io;

    use mio::net::TcpStream;

    #[cfg(target_os = "linux")]
    pub(super) fn recv(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call, and null
        // address arguments ask recvfrom for no source address.
        let received = unsafe {
            libc::syscall(
                libc::SYS_recvfrom,
                libc::c_long::from(stream.as_raw_fd()),
                buf.as_mut_ptr(),
                buf.len(),
                0 as libc::c_long,
                std::ptr::null_mut::<libc::sockaddr>(),
                std::ptr::null_mut::<libc::socklen_t>(),
            )
        };
        usize::try_from(received).map_err(|_| io::Error::last_os_error())
    }

    #[cfg(target_os = "linux")]
    pub(super) fn send(stream: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY: `bytes` is valid for reads of `bytes.len()` bytes for the whole call, and a
        // null address with length 0 sends on the connected socket. MSG_NOSIGNAL: a closed peer
        // is an EPIPE error, not a signal.
        let sent = unsafe {
            libc::syscall(
                libc::SYS_sendto,
                libc::c_long::from(stream.as_raw_fd()),
                bytes.as_ptr(),
                bytes.len(),
                libc::c_long::from(libc::MSG_NOSIGNAL),
                std::ptr::null::<libc::sockaddr>(),
                0 as libc::c_long,
            )
        };
        usize::try_from(sent).map_err(|_| io::Error::last_os_error())
    }

    #[cfg(not(target_os = "linux"))]
    pub(super) fn recv(mut stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut stream, buf)
    }

    #[cfg(not(target_os = "linux"))]
    pub(super) fn send(mut stream: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut stream, bytes)
    }
}
