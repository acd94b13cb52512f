//! The hand-off of click events from the redirect workers to the aggregator thread. Each worker
//! thread appends its events, encoded as bytes, to a buffer of its own (a lane); the aggregator
//! swaps each lane's buffer for an empty one every drain interval and reads the events back.
//!
//! A click costs a copy of its code and headers and one uncontended lock, or a share of one: an
//! event loop gathers the events of a round in a batch of its own and hands them over together
//! ([`Lanes::push_batch`]). It never allocates once the buffers have grown, never waits (a lane
//! that is busy or full drops the events, and the caller counts the drop) and never touches a
//! lock or cache line shared by all workers.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use super::HEADER_BYTES_MAX;

/// One served redirect, as the hot path hands it over: borrowed from the request and copied
/// into a lane.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClickEvent<'a> {
    pub code: &'a str,
    pub at_s: i64,
    /// Header values as sent; the first [`HEADER_BYTES_MAX`] bytes of each are kept.
    pub referer: Option<&'a [u8]>,
    pub user_agent: Option<&'a [u8]>,
    pub client_ip: Option<IpAddr>,
    /// The trusted country header's value, if the operator configured one.
    pub country_header: Option<&'a [u8]>,
}

/// A click event as the aggregator reads it back: the code as text, header values as the
/// request's bytes (cut at [`HEADER_BYTES_MAX`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadEvent<'a> {
    pub code: Cow<'a, str>,
    pub at_s: i64,
    pub referer: Option<&'a [u8]>,
    pub user_agent: Option<&'a [u8]>,
    pub client_ip: Option<IpAddr>,
    pub country_header: Option<&'a [u8]>,
}

/// The length field of a header the request did not have.
const ABSENT: u16 = u16::MAX;
const _: () = assert!(HEADER_BYTES_MAX < ABSENT as usize);

/// Encoded click events, back to back: code length (u16), code, unix seconds (i64), address
/// (0, or 4 or 6 and its octets), then referer, user agent and country header, each a length
/// (u16, [`ABSENT`] for none) and at most [`HEADER_BYTES_MAX`] bytes. Little-endian.
#[derive(Debug, Default)]
pub struct EventBatch {
    bytes: Vec<u8>,
    events: usize,
}

impl EventBatch {
    /// Appends `event`; false (and nothing appended) when its code is too long to encode.
    pub fn push(&mut self, event: &ClickEvent<'_>) -> bool {
        let code_len = match u16::try_from(event.code.len()) {
            Ok(len) if len != ABSENT => len,
            _ => return false,
        };
        let bytes = &mut self.bytes;
        bytes.extend_from_slice(&code_len.to_le_bytes());
        bytes.extend_from_slice(event.code.as_bytes());
        bytes.extend_from_slice(&event.at_s.to_le_bytes());
        match event.client_ip {
            None => bytes.push(0),
            Some(IpAddr::V4(ip)) => {
                bytes.push(4);
                bytes.extend_from_slice(&ip.octets());
            }
            Some(IpAddr::V6(ip)) => {
                bytes.push(6);
                bytes.extend_from_slice(&ip.octets());
            }
        }
        for value in [event.referer, event.user_agent, event.country_header] {
            match value {
                None => bytes.extend_from_slice(&ABSENT.to_le_bytes()),
                Some(value) => {
                    let value = &value[..value.len().min(HEADER_BYTES_MAX)];
                    bytes.extend_from_slice(&(value.len() as u16).to_le_bytes());
                    bytes.extend_from_slice(value);
                }
            }
        }
        self.events += 1;
        true
    }

    /// Appends every event of `other`.
    fn append(&mut self, other: &EventBatch) {
        self.bytes.extend_from_slice(&other.bytes);
        self.events += other.events;
    }

    /// Events in the batch.
    pub fn events(&self) -> usize {
        self.events
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.events = 0;
    }

    /// The events, in the order they were pushed.
    pub fn iter(&self) -> BatchEvents<'_> {
        BatchEvents { rest: &self.bytes }
    }

    /// Gives back the memory of a batch that grew past `bytes_kept`.
    pub fn shrink(&mut self, bytes_kept: usize) {
        if self.bytes.capacity() > bytes_kept {
            self.bytes = Vec::new();
        }
    }
}

/// The events of an [`EventBatch`].
pub struct BatchEvents<'a> {
    rest: &'a [u8],
}

impl<'a> BatchEvents<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.rest.split_at_checked(len)?;
        self.rest = rest;
        Some(taken)
    }

    fn take_array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn take_value(&mut self) -> Option<Option<&'a [u8]>> {
        let len = u16::from_le_bytes(self.take_array()?);
        if len == ABSENT {
            return Some(None);
        }
        Some(Some(self.take(usize::from(len))?))
    }

    fn read(&mut self) -> Option<ReadEvent<'a>> {
        let code_len = u16::from_le_bytes(self.take_array()?);
        let code = String::from_utf8_lossy(self.take(usize::from(code_len))?);
        let at_s = i64::from_le_bytes(self.take_array()?);
        let client_ip = match self.take_array::<1>()? {
            [0] => None,
            [4] => Some(IpAddr::V4(Ipv4Addr::from(self.take_array::<4>()?))),
            [6] => Some(IpAddr::V6(Ipv6Addr::from(self.take_array::<16>()?))),
            _ => return None,
        };
        Some(ReadEvent {
            code,
            at_s,
            referer: self.take_value()?,
            user_agent: self.take_value()?,
            client_ip,
            country_header: self.take_value()?,
        })
    }
}

impl<'a> Iterator for BatchEvents<'a> {
    type Item = ReadEvent<'a>;

    fn next(&mut self) -> Option<ReadEvent<'a>> {
        if self.rest.is_empty() {
            return None;
        }
        let event = self.read();
        // Only `EventBatch::push` writes a batch: an event that does not read back is a bug.
        debug_assert!(event.is_some(), "an unreadable click event in a batch");
        if event.is_none() {
            self.rest = &[];
        }
        event
    }
}

/// Most lanes, whatever the machine.
const LANES_MAX: usize = 256;
/// Lanes a click tries before it is dropped: its own, then the next ones (busy only while the
/// aggregator swaps them, or when more threads than lanes share one).
const LANE_TRIES: usize = 4;
/// Queue room a lane claims from the shared pool at a time: the pool's counter is touched once
/// per this many clicks, not per click.
const EVENTS_PER_CLAIM: usize = 1024;

/// What a lane's lock guards.
#[derive(Debug, Default)]
struct LaneState {
    batch: EventBatch,
    /// Events this lane may still take in before it claims more room.
    room: usize,
}

/// One worker's buffer, on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct Lane {
    state: Mutex<LaneState>,
    /// Events in the batch, for the metrics endpoint (written under the lock).
    queued: AtomicUsize,
}

impl Lane {
    fn lock(&self) -> MutexGuard<'_, LaneState> {
        // A panic while holding the lock leaves whole events behind (push appends an event only
        // after checking it fits); keep using them.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The next lane a thread that has not handed over a click yet gets.
static NEXT_LANE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's lane (modulo the number of lanes).
    static LANE: usize = NEXT_LANE.fetch_add(1, Ordering::Relaxed);
}

/// The lanes of one pipeline, two per CPU (at least two, at most [`LANES_MAX`]), holding at
/// most `events_max` events together: room for that many is shared out to the lanes in claims
/// of [`EVENTS_PER_CLAIM`] and comes back when the aggregator takes their events. The pool's
/// room, the lanes' unused room and the queued events always add up to `events_max`.
pub struct Lanes {
    lanes: Box<[Lane]>,
    /// Room no lane holds.
    pool: AtomicUsize,
}

impl Lanes {
    pub fn new(events_max: usize) -> Lanes {
        let cpus = std::thread::available_parallelism().map_or(1, |cpus| cpus.get());
        Lanes::with_lanes(events_max, (cpus * 2).clamp(2, LANES_MAX))
    }

    fn with_lanes(events_max: usize, lanes: usize) -> Lanes {
        Lanes {
            lanes: (0..lanes).map(|_| Lane::default()).collect(),
            pool: AtomicUsize::new(events_max),
        }
    }

    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    /// Hands `event` over without waiting; false when it was dropped (the lanes it tried were
    /// busy, the queue is full, or its code is too long to encode).
    pub fn push(&self, event: &ClickEvent<'_>) -> bool {
        self.push_with(1, |batch| batch.push(event))
    }

    /// Hands every event of `batch` over without waiting; false when they were all dropped (the
    /// lanes it tried were busy or the queue has no room for all of them).
    pub fn push_batch(&self, batch: &EventBatch) -> bool {
        self.push_with(batch.events(), |lane_batch| {
            lane_batch.append(batch);
            true
        })
    }

    /// Finds a lane that is free, with room for `events` more, and lets `append` add them to its
    /// batch; false when none was, or `append` added nothing.
    fn push_with(&self, events: usize, append: impl FnOnce(&mut EventBatch) -> bool) -> bool {
        let first = LANE.with(|lane| *lane);
        for attempt in 0..LANE_TRIES.min(self.lanes.len()) {
            let lane = &self.lanes[(first + attempt) % self.lanes.len()];
            let mut state = match lane.state.try_lock() {
                Ok(state) => state,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => continue,
            };
            while state.room < events {
                let claimed = self.claim();
                if claimed == 0 {
                    return false;
                }
                state.room += claimed;
            }
            if !append(&mut state.batch) {
                return false;
            }
            state.room -= events;
            lane.queued.store(state.batch.events(), Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Takes up to [`EVENTS_PER_CLAIM`] of the pool's room; how much it took.
    fn claim(&self) -> usize {
        let taken = self
            .pool
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |room| {
                (room > 0).then(|| room - room.min(EVENTS_PER_CLAIM))
            });
        taken.map_or(0, |room| room.min(EVENTS_PER_CLAIM))
    }

    /// Events waiting in all lanes.
    pub fn queued(&self) -> u64 {
        self.lanes
            .iter()
            .map(|lane| lane.queued.load(Ordering::Relaxed) as u64)
            .sum()
    }

    /// Takes lane `index`'s events: swaps its batch with `spare`, which must be empty, and gives
    /// their room back to the pool.
    pub fn take(&self, index: usize, spare: &mut EventBatch) {
        debug_assert_eq!(spare.events(), 0);
        let Some(lane) = self.lanes.get(index) else {
            return;
        };
        let mut state = lane.lock();
        std::mem::swap(&mut state.batch, spare);
        lane.queued.store(0, Ordering::Relaxed);
        drop(state);
        self.pool.fetch_add(spare.events(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `event` after a trip through a batch, its header values as text.
    fn read_back(event: &ClickEvent<'_>) -> (String, i64, [Option<String>; 3], Option<IpAddr>) {
        let mut batch = EventBatch::default();
        assert!(batch.push(event));
        let events: Vec<ReadEvent<'_>> = batch.iter().collect();
        assert_eq!(events.len(), 1);
        let event = &events[0];
        let text = |value: Option<&[u8]>| value.map(|v| String::from_utf8_lossy(v).into_owned());
        (
            event.code.clone().into_owned(),
            event.at_s,
            [
                text(event.referer),
                text(event.user_agent),
                text(event.country_header),
            ],
            event.client_ip,
        )
    }

    #[test]
    fn events_read_back_as_they_were_handed_over() {
        let v6: IpAddr = "2001:db8::7".parse().expect("ip");
        let full = ClickEvent {
            code: "abc-_XY9",
            at_s: 1_800_000_000,
            referer: Some(b"https://news.example/item?id=1"),
            user_agent: Some(b"Mozilla/5.0"),
            client_ip: Some(v6),
            country_header: Some(b"de"),
        };
        let (code, at_s, [referer, user_agent, country], client_ip) = read_back(&full);
        assert_eq!((code.as_str(), at_s), ("abc-_XY9", 1_800_000_000));
        assert_eq!(referer.as_deref(), Some("https://news.example/item?id=1"));
        assert_eq!(user_agent.as_deref(), Some("Mozilla/5.0"));
        assert_eq!(country.as_deref(), Some("de"));
        assert_eq!(client_ip, Some(v6));

        let bare = ClickEvent {
            code: "a",
            at_s: -1,
            referer: Some(b""),
            client_ip: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))),
            ..ClickEvent::default()
        };
        let (code, at_s, [referer, user_agent, country], client_ip) = read_back(&bare);
        assert_eq!((code.as_str(), at_s), ("a", -1));
        assert_eq!(referer.as_deref(), Some(""), "empty is not absent");
        assert_eq!((user_agent, country), (None, None));
        assert_eq!(client_ip, Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))));
        assert_eq!(read_back(&ClickEvent::default()).3, None);
    }

    #[test]
    fn headers_are_cut_at_the_limit_and_any_bytes_are_kept() {
        let longest = "x".repeat(HEADER_BYTES_MAX);
        let longer = "y".repeat(HEADER_BYTES_MAX + 1);
        // A two-byte character across the limit: its first byte is kept, as record_click kept it
        // (and it reads as U+FFFD).
        let split = format!("{}é", "z".repeat(HEADER_BYTES_MAX - 1));
        let event = ClickEvent {
            code: "abc",
            referer: Some(longest.as_bytes()),
            user_agent: Some(longer.as_bytes()),
            country_header: Some(split.as_bytes()),
            ..ClickEvent::default()
        };
        let (_, _, [referer, user_agent, country], _) = read_back(&event);
        assert_eq!(referer.as_deref(), Some(longest.as_str()));
        assert_eq!(user_agent.as_deref(), Some(&longer[..HEADER_BYTES_MAX]));
        let expected = format!("{}\u{FFFD}", "z".repeat(HEADER_BYTES_MAX - 1));
        assert_eq!(country.as_deref(), Some(expected.as_str()));

        let garbage = b"bot\xff\xfe/1.0\0\t\n";
        let mut batch = EventBatch::default();
        assert!(batch.push(&ClickEvent {
            code: "abc",
            user_agent: Some(garbage),
            ..ClickEvent::default()
        }));
        let read: Vec<ReadEvent<'_>> = batch.iter().collect();
        assert_eq!(read[0].user_agent, Some(&garbage[..]));
    }

    #[test]
    fn a_code_too_long_to_encode_is_refused_whole() {
        let long = "c".repeat(usize::from(ABSENT));
        let mut batch = EventBatch::default();
        let event = ClickEvent {
            code: &long,
            ..ClickEvent::default()
        };
        assert!(!batch.push(&event));
        assert_eq!((batch.events(), batch.iter().count()), (0, 0));
        let longest = "c".repeat(usize::from(ABSENT) - 1);
        assert!(batch.push(&ClickEvent {
            code: &longest,
            ..event
        }));
        assert_eq!(
            batch.iter().next().map(|e| e.code.len()),
            Some(longest.len())
        );
    }

    #[test]
    fn a_batch_keeps_the_order_and_empties() {
        let mut batch = EventBatch::default();
        let codes: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
        for (i, code) in codes.iter().enumerate() {
            let user_agent = (i % 2 == 0).then_some(code.as_bytes());
            assert!(batch.push(&ClickEvent {
                code,
                at_s: i as i64,
                user_agent,
                ..ClickEvent::default()
            }));
        }
        assert_eq!(batch.events(), 100);
        for (i, event) in batch.iter().enumerate() {
            assert_eq!(
                (event.code.as_ref(), event.at_s),
                (codes[i].as_str(), i as i64)
            );
            assert_eq!(event.user_agent.is_some(), i % 2 == 0);
        }
        batch.clear();
        assert_eq!((batch.events(), batch.iter().count()), (0, 0));
    }

    /// Takes every lane's events; how many there were.
    fn take_all(lanes: &Lanes) -> usize {
        let mut taken = 0;
        let mut spare = EventBatch::default();
        for index in 0..lanes.len() {
            lanes.take(index, &mut spare);
            taken += spare.iter().count();
            spare.clear();
        }
        taken
    }

    #[test]
    fn the_lanes_hold_at_most_the_queue_length_and_make_room_when_taken() {
        let lanes = Lanes::with_lanes(EVENTS_PER_CLAIM + 3, 4);
        let event = ClickEvent {
            code: "abc",
            ..ClickEvent::default()
        };
        // One thread may use the whole queue, claim by claim.
        let pushed = (0..EVENTS_PER_CLAIM + 10)
            .filter(|_| lanes.push(&event))
            .count();
        assert_eq!(pushed, EVENTS_PER_CLAIM + 3);
        assert_eq!(lanes.queued(), pushed as u64);
        assert_eq!(take_all(&lanes), pushed);
        assert_eq!(lanes.queued(), 0);

        // Threads racing for the room: every event is taken or dropped, never more than fit.
        let lanes = Lanes::with_lanes(8, 4);
        let pushed: Vec<usize> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..1000).filter(|_| lanes.push(&event)).count()))
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("thread"))
                .collect()
        });
        assert_eq!(pushed.iter().sum::<usize>(), 8);
        assert_eq!(take_all(&lanes), 8);
        // The room came back: to the pool, or to the lanes that claimed it.
        let room: usize = lanes.pool.load(Ordering::Relaxed)
            + lanes
                .lanes
                .iter()
                .map(|lane| lane.lock().room)
                .sum::<usize>();
        assert_eq!(room, 8);
    }

    #[test]
    fn a_batch_is_handed_over_whole_or_not_at_all() {
        let lanes = Lanes::with_lanes(EVENTS_PER_CLAIM + 5, 2);
        let codes: Vec<String> = (0..EVENTS_PER_CLAIM + 3).map(|i| format!("c{i}")).collect();
        let mut batch = EventBatch::default();
        for code in &codes {
            assert!(batch.push(&ClickEvent {
                code,
                ..ClickEvent::default()
            }));
        }
        // More events than one claim of room: the lane claims again.
        assert!(lanes.push_batch(&batch));
        assert_eq!(lanes.queued(), codes.len() as u64);
        // Two places left: a batch of three is dropped whole, and takes none of them.
        let mut three = EventBatch::default();
        for code in ["x", "y", "z"] {
            assert!(three.push(&ClickEvent {
                code,
                ..ClickEvent::default()
            }));
        }
        assert!(!lanes.push_batch(&three));
        let event = ClickEvent {
            code: "one",
            ..ClickEvent::default()
        };
        assert!(lanes.push(&event) && lanes.push(&event) && !lanes.push(&event));
        let mut spare = EventBatch::default();
        let index = LANE.with(|lane| *lane) % lanes.len();
        lanes.take(index, &mut spare);
        let taken: Vec<String> = spare.iter().map(|e| e.code.into_owned()).collect();
        assert_eq!(taken[..codes.len()], codes[..]);
        assert_eq!(taken[codes.len()..], ["one", "one"]);
    }

    #[test]
    fn a_busy_lane_passes_the_click_to_the_next() {
        let lanes = Lanes::with_lanes(100, 2);
        let event = ClickEvent {
            code: "abc",
            ..ClickEvent::default()
        };
        let own = LANE.with(|lane| *lane) % 2;
        let held = lanes.lanes[own].lock();
        assert!(lanes.push(&event));
        drop(held);
        assert_eq!(lanes.lanes[(own + 1) % 2].lock().batch.events(), 1);
        assert_eq!(lanes.lanes[own].lock().batch.events(), 0);
        let both = (lanes.lanes[0].lock(), lanes.lanes[1].lock());
        assert!(
            !lanes.push(&event),
            "every lane busy: dropped, not waited for"
        );
        drop(both);
    }
}
