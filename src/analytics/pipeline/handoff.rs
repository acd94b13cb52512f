//! The hand-off of click events from the redirect workers to the aggregator thread. Each worker
//! thread appends its events, encoded as bytes, to a buffer of its own (a lane); the aggregator
//! swaps each lane's buffer for an empty one every drain interval and reads the events back.
//!
//! A click costs a copy of its code and headers and one uncontended lock; it never allocates
//! once the buffers have grown, never waits (a lane that is busy or full drops the event, and
//! the caller counts the drop) and never touches a lock or cache line shared by all workers.

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

/// A click event as the aggregator reads it back: header values as text, bytes that are not
/// UTF-8 replaced by U+FFFD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadEvent<'a> {
    pub code: Cow<'a, str>,
    pub at_s: i64,
    pub referer: Option<Cow<'a, str>>,
    pub user_agent: Option<Cow<'a, str>>,
    pub client_ip: Option<IpAddr>,
    pub country_header: Option<Cow<'a, str>>,
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

    fn take_value(&mut self) -> Option<Option<Cow<'a, str>>> {
        let len = u16::from_le_bytes(self.take_array()?);
        if len == ABSENT {
            return Some(None);
        }
        Some(Some(String::from_utf8_lossy(self.take(usize::from(len))?)))
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

/// One worker's buffer, on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct Lane {
    batch: Mutex<EventBatch>,
    /// Events in `batch`, for the metrics endpoint (written under the lock).
    queued: AtomicUsize,
}

impl Lane {
    fn lock(&self) -> MutexGuard<'_, EventBatch> {
        // A panic while holding the lock leaves whole events behind (push appends an event only
        // after checking it fits); keep using them.
        self.batch
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

/// The lanes of one pipeline: two per CPU (at least two, at most [`LANES_MAX`]), each holding
/// at most `events_per_lane_max` events.
pub struct Lanes {
    lanes: Box<[Lane]>,
    events_per_lane_max: usize,
}

impl Lanes {
    /// Lanes that together hold about `events_max` events (split evenly, at least one each).
    pub fn new(events_max: usize) -> Lanes {
        let cpus = std::thread::available_parallelism().map_or(1, |cpus| cpus.get());
        Lanes::with_lanes(events_max, (cpus * 2).clamp(2, LANES_MAX))
    }

    fn with_lanes(events_max: usize, lanes: usize) -> Lanes {
        Lanes {
            lanes: (0..lanes).map(|_| Lane::default()).collect(),
            events_per_lane_max: events_max.div_ceil(lanes).max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    /// Hands `event` over without waiting; false when it was dropped (the lanes it tried were
    /// busy or full, or its code is too long to encode).
    pub fn push(&self, event: &ClickEvent<'_>) -> bool {
        let first = LANE.with(|lane| *lane);
        for attempt in 0..LANE_TRIES.min(self.lanes.len()) {
            let lane = &self.lanes[(first + attempt) % self.lanes.len()];
            let mut batch = match lane.batch.try_lock() {
                Ok(batch) => batch,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => continue,
            };
            if batch.events() >= self.events_per_lane_max {
                return false;
            }
            let pushed = batch.push(event);
            lane.queued.store(batch.events(), Ordering::Relaxed);
            return pushed;
        }
        false
    }

    /// Events waiting in all lanes.
    pub fn queued(&self) -> u64 {
        self.lanes
            .iter()
            .map(|lane| lane.queued.load(Ordering::Relaxed) as u64)
            .sum()
    }

    /// Takes lane `index`'s events: swaps its batch with `spare`, which must be empty.
    pub fn take(&self, index: usize, spare: &mut EventBatch) {
        debug_assert_eq!(spare.events(), 0);
        let Some(lane) = self.lanes.get(index) else {
            return;
        };
        let mut batch = lane.lock();
        std::mem::swap(&mut *batch, spare);
        lane.queued.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_back(event: &ClickEvent<'_>) -> ReadEvent<'static> {
        let mut batch = EventBatch::default();
        assert!(batch.push(event));
        let events: Vec<ReadEvent<'_>> = batch.iter().collect();
        assert_eq!(events.len(), 1);
        let event = &events[0];
        let owned = |value: &Option<Cow<'_, str>>| value.as_deref().map(|v| Cow::Owned(v.into()));
        ReadEvent {
            code: Cow::Owned(event.code.clone().into_owned()),
            at_s: event.at_s,
            referer: owned(&event.referer),
            user_agent: owned(&event.user_agent),
            client_ip: event.client_ip,
            country_header: owned(&event.country_header),
        }
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
        let back = read_back(&full);
        assert_eq!(back.code, "abc-_XY9");
        assert_eq!(back.at_s, 1_800_000_000);
        assert_eq!(
            back.referer.as_deref(),
            Some("https://news.example/item?id=1")
        );
        assert_eq!(back.user_agent.as_deref(), Some("Mozilla/5.0"));
        assert_eq!(back.client_ip, Some(v6));
        assert_eq!(back.country_header.as_deref(), Some("de"));

        let bare = ClickEvent {
            code: "a",
            at_s: -1,
            referer: Some(b""),
            client_ip: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))),
            ..ClickEvent::default()
        };
        let back = read_back(&bare);
        assert_eq!((back.code.as_ref(), back.at_s), ("a", -1));
        assert_eq!(back.referer.as_deref(), Some(""), "empty is not absent");
        assert_eq!((back.user_agent, back.country_header), (None, None));
        assert_eq!(
            back.client_ip,
            Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)))
        );
        assert_eq!(read_back(&ClickEvent::default()).client_ip, None);
    }

    #[test]
    fn headers_are_cut_at_the_limit_and_bytes_that_are_not_utf8_replaced() {
        let longest = "x".repeat(HEADER_BYTES_MAX);
        let longer = "y".repeat(HEADER_BYTES_MAX + 1);
        // A two-byte character across the limit: its first byte is kept, and replaced.
        let split = format!("{}é", "z".repeat(HEADER_BYTES_MAX - 1));
        let event = ClickEvent {
            code: "abc",
            referer: Some(longest.as_bytes()),
            user_agent: Some(longer.as_bytes()),
            country_header: Some(split.as_bytes()),
            ..ClickEvent::default()
        };
        let back = read_back(&event);
        assert_eq!(back.referer.as_deref(), Some(longest.as_str()));
        assert_eq!(
            back.user_agent.as_deref(),
            Some(&longer[..HEADER_BYTES_MAX])
        );
        let expected = format!("{}\u{FFFD}", "z".repeat(HEADER_BYTES_MAX - 1));
        assert_eq!(back.country_header.as_deref(), Some(expected.as_str()));

        let garbage = ClickEvent {
            code: "abc",
            user_agent: Some(b"bot\xff\xfe/1.0"),
            ..ClickEvent::default()
        };
        assert_eq!(
            read_back(&garbage).user_agent.as_deref(),
            Some("bot\u{FFFD}\u{FFFD}/1.0")
        );
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

    #[test]
    fn full_lanes_drop_and_every_event_is_taken_or_dropped() {
        let lanes = Lanes::with_lanes(8, 4);
        let event = ClickEvent {
            code: "abc",
            ..ClickEvent::default()
        };
        // One thread fills its lane (2 events each), then drops: it does not spill over.
        let pushed = (0..5).filter(|_| lanes.push(&event)).count();
        assert_eq!(pushed, 2);
        assert_eq!(lanes.queued(), 2);

        let threads: Vec<usize> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..1000).filter(|_| lanes.push(&event)).count()))
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("thread"))
                .collect()
        });
        let mut taken = 0;
        let mut spare = EventBatch::default();
        for index in 0..lanes.len() {
            lanes.take(index, &mut spare);
            taken += spare.iter().count();
            spare.clear();
        }
        assert_eq!(taken, pushed + threads.iter().sum::<usize>());
        assert!(taken <= 8);
        assert_eq!(lanes.queued(), 0);
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
        assert_eq!(lanes.lanes[(own + 1) % 2].lock().events(), 1);
        assert_eq!(lanes.lanes[own].lock().events(), 0);
        let both = (lanes.lanes[0].lock(), lanes.lanes[1].lock());
        assert!(
            !lanes.push(&event),
            "every lane busy: dropped, not waited for"
        );
        drop(both);
    }
}
