//! Per-link click aggregates: human and bot clicks per hour and per day, referrer domains,
//! countries, browsers, operating systems and bot names, and the stats query over them.
//!
//! Owns the in-memory shape and its limits; fed classified clicks by the aggregator thread, read
//! by the stats API. Never sees a raw request: classification happens before a click gets here.
//!
//! Compact, because every clicked link has an entry: each distinct name (referrer domain,
//! country, browser, ...) is interned once in [`Values`], and a link keeps its tallies sorted by
//! (kind, key), the key being an hour, a day or a name's id, 8 bytes each (kind and key in 32
//! bits, the count in 32) with room for a first click's six inline; a link whose count or key
//! outgrows that switches to 16-byte tallies. Links live in fixed-size chunks in the order they
//! were first clicked (growing never copies one), found through a table of (hash, position)
//! pairs (growing it rehashes 8-byte entries); codes up to 22 bytes are stored inline; a link's
//! totals are the sum of its daily tallies. A link clicked once costs about 110 bytes (96 and
//! its index slot) and no allocation of its own; a click is a hash lookup and a few binary
//! searches and adds.

use std::collections::HashMap;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smallvec::SmallVec;

use crate::prefetch::{prefetch, prefetch_lines};

pub const HOUR_S: i64 = 3600;
pub const DAY_S: i64 = 86_400;
/// Hourly buckets are kept this long; daily buckets are kept forever.
pub const HOURS_KEPT: i64 = 24 * 92;
/// Distinct values kept per breakdown (referrers, countries, ...) of one link; the rest count
/// as "other".
pub const DISTINCT_VALUES_MAX: usize = 1000;
/// Distinct names interned over all links; names first seen after that count as "other".
pub const VALUES_MAX: usize = 1 << 20;
/// Entries a stats answer lists per breakdown.
pub const TOP_ENTRIES: usize = 10;
/// Buckets one stats answer may hold (a year of hours is 8784).
pub const BUCKETS_MAX: usize = 10_000;
pub const OTHER: &str = "other";
/// The id of [`OTHER`] in every [`Values`].
pub const OTHER_ID: u32 = 0;

type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// Interned names: each distinct referrer domain, country, browser, OS or bot name is stored
/// once and referred to by its id. Id [`OTHER_ID`] is "other".
#[derive(Debug)]
pub struct Values {
    names: Vec<Box<str>>,
    ids: FastMap<Box<str>, u32>,
}

impl Default for Values {
    fn default() -> Values {
        let mut values = Values {
            names: Vec::new(),
            ids: FastMap::default(),
        };
        values.intern(OTHER);
        values
    }
}

impl Values {
    /// The id of `name`, interning it if it is new (and there is room; else "other").
    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let Ok(id) = u32::try_from(self.names.len()) else {
            return OTHER_ID;
        };
        if self.names.len() >= VALUES_MAX {
            return OTHER_ID;
        }
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        id
    }

    /// The name of `id` ("other" for an id never handed out).
    pub fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or(OTHER, |name| name)
    }

    fn from_names(names: Vec<Box<str>>) -> Result<Values, String> {
        if names.first().map(|name| &**name) != Some(OTHER) {
            return Err(format!("the first value must be {OTHER:?}"));
        }
        if names.len() > VALUES_MAX {
            return Err(format!("more than {VALUES_MAX} values"));
        }
        let mut ids = FastMap::default();
        for (id, name) in names.iter().enumerate() {
            if ids.insert(name.clone(), id as u32).is_some() {
                return Err(format!("the value {name:?} is listed twice"));
            }
        }
        Ok(Values { names, ids })
    }
}

/// One click after classification, its names interned in the aggregates' [`Values`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassifiedClick<'a> {
    pub code: &'a str,
    pub at_s: i64,
    pub referrer: u32,
    pub country: u32,
    pub browser: u32,
    pub os: u32,
    pub bot: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub human: u64,
    pub bot: u64,
}

/// What a tally counts. The order is the order of a link's tallies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Kind {
    HourHuman,
    HourBot,
    DayHuman,
    DayBot,
    /// Human clicks only: a referrer, country, browser or OS of an unfurler says nothing.
    Referrer,
    Country,
    Browser,
    Os,
    /// Bot clicks by bot name.
    Bot,
}

const KINDS: [Kind; 9] = [
    Kind::HourHuman,
    Kind::HourBot,
    Kind::DayHuman,
    Kind::DayBot,
    Kind::Referrer,
    Kind::Country,
    Kind::Browser,
    Kind::Os,
    Kind::Bot,
];

impl Kind {
    fn names_a_value(self) -> bool {
        self >= Kind::Referrer
    }
}

/// One counter of a link: clicks in an hour or a day (key = hours or days since the epoch), or
/// clicks with a name (key = the name's id). Written to a checkpoint as `[kind, key, count]`;
/// in memory the form of a link whose tallies do not fit [`CompactTally`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "(u8, u32, u64)", try_from = "(u8, u32, u64)")]
struct Tally {
    kind: Kind,
    key: u32,
    count: u64,
}

impl From<Tally> for (u8, u32, u64) {
    fn from(tally: Tally) -> (u8, u32, u64) {
        (tally.kind as u8, tally.key, tally.count)
    }
}

impl TryFrom<(u8, u32, u64)> for Tally {
    type Error = String;

    fn try_from((kind, key, count): (u8, u32, u64)) -> Result<Tally, String> {
        let kind = *KINDS
            .get(kind as usize)
            .ok_or_else(|| format!("unknown tally kind {kind}"))?;
        Ok(Tally { kind, key, count })
    }
}

/// Largest key a [`CompactTally`] holds: hours up to the year 3883, every day, every name id.
const COMPACT_KEY_MAX: u32 = (1 << 24) - 1;
const _: () = assert!(VALUES_MAX <= COMPACT_KEY_MAX as usize + 1);
const _: () = assert!(KINDS.len() <= 1 << 8);

/// A tally in 8 bytes: the kind in the top 8 bits of `slot` and the key in the low 24, so that
/// slots order as (kind, key) do; a count up to `u32::MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CompactTally {
    slot: u32,
    count: u32,
}

impl CompactTally {
    /// The slot of (kind, key), if the key fits.
    fn slot(kind: Kind, key: u32) -> Option<u32> {
        (key <= COMPACT_KEY_MAX).then_some((kind as u32) << 24 | key)
    }

    fn of(tally: Tally) -> Option<CompactTally> {
        Some(CompactTally {
            slot: CompactTally::slot(tally.kind, tally.key)?,
            count: u32::try_from(tally.count).ok()?,
        })
    }

    fn wide(self) -> Tally {
        Tally {
            // Slots are only ever made from a Kind, by `slot`.
            kind: KINDS[(self.slot >> 24) as usize],
            key: self.slot & COMPACT_KEY_MAX,
            count: u64::from(self.count),
        }
    }
}

/// Tallies a first human click makes (hour, day, referrer, country, browser, OS): a link clicked
/// once keeps them inline.
const FIRST_CLICK_TALLIES: usize = 6;

/// A link's tallies, sorted by (kind, key) and unique: compact while every key and count fits,
/// wide from the first that does not (for good: a count never shrinks).
#[derive(Clone, Debug)]
enum Tallies {
    Compact(SmallVec<[CompactTally; FIRST_CLICK_TALLIES]>),
    Wide(Vec<Tally>),
}

impl Default for Tallies {
    fn default() -> Tallies {
        Tallies::Compact(SmallVec::new())
    }
}

impl Tallies {
    fn from_wide(tallies: Vec<Tally>) -> Tallies {
        match tallies
            .iter()
            .map(|tally| CompactTally::of(*tally))
            .collect()
        {
            Some(compact) => Tallies::Compact(compact),
            None => Tallies::Wide(tallies),
        }
    }

    fn len(&self) -> usize {
        match self {
            Tallies::Compact(tallies) => tallies.len(),
            Tallies::Wide(tallies) => tallies.len(),
        }
    }

    fn get(&self, index: usize) -> Option<Tally> {
        match self {
            Tallies::Compact(tallies) => tallies.get(index).map(|tally| tally.wide()),
            Tallies::Wide(tallies) => tallies.get(index).copied(),
        }
    }

    /// Where (kind, key) is, or where it would go.
    fn find(&self, kind: Kind, key: u32) -> Result<usize, usize> {
        match self {
            Tallies::Compact(tallies) => match CompactTally::slot(kind, key) {
                Some(slot) => tallies.binary_search_by_key(&slot, |tally| tally.slot),
                // Past every key of its kind.
                None => Err(tallies.partition_point(|tally| tally.slot >> 24 <= kind as u32)),
            },
            Tallies::Wide(tallies) => {
                tallies.binary_search_by(|tally| (tally.kind, tally.key).cmp(&(kind, key)))
            }
        }
    }

    /// The index range of the tallies of `kind`.
    fn range_of(&self, kind: Kind) -> std::ops::Range<usize> {
        let start = self.find(kind, 0).unwrap_or_else(|at| at);
        let end = match self {
            Tallies::Compact(tallies) => {
                tallies.partition_point(|tally| tally.slot >> 24 <= kind as u32)
            }
            Tallies::Wide(tallies) => tallies.partition_point(|tally| tally.kind <= kind),
        };
        start..end
    }

    /// Adds one click to (kind, key).
    fn add(&mut self, kind: Kind, key: u32) {
        if let Tallies::Compact(tallies) = self {
            if let Some(slot) = CompactTally::slot(kind, key) {
                match tallies.binary_search_by_key(&slot, |tally| tally.slot) {
                    Ok(index) => {
                        if let Some(count) = tallies[index].count.checked_add(1) {
                            tallies[index].count = count;
                            return;
                        }
                    }
                    Err(index) => {
                        tallies.insert(index, CompactTally { slot, count: 1 });
                        return;
                    }
                }
            }
            *self = Tallies::Wide(tallies.iter().map(|tally| tally.wide()).collect());
        }
        if let Tallies::Wide(tallies) = self {
            match tallies.binary_search_by(|tally| (tally.kind, tally.key).cmp(&(kind, key))) {
                Ok(index) => tallies[index].count += 1,
                Err(index) => tallies.insert(
                    index,
                    Tally {
                        kind,
                        key,
                        count: 1,
                    },
                ),
            }
        }
    }

    /// Adds one click to (kind, key) if it has a tally; false if not.
    fn add_existing(&mut self, kind: Kind, key: u32) -> bool {
        let Ok(index) = self.find(kind, key) else {
            return false;
        };
        match self {
            Tallies::Compact(tallies) => match tallies[index].count.checked_add(1) {
                Some(count) => tallies[index].count = count,
                None => self.add(kind, key),
            },
            Tallies::Wide(tallies) => tallies[index].count += 1,
        }
        true
    }

    /// Keeps the tallies `keep` says yes to.
    fn retain(&mut self, mut keep: impl FnMut(Tally) -> bool) {
        match self {
            Tallies::Compact(tallies) => tallies.retain(|tally| keep(tally.wide())),
            Tallies::Wide(tallies) => tallies.retain(|tally| keep(*tally)),
        }
    }

    /// Sorts by (kind, key), as a checkpoint may not have.
    fn sort(&mut self) {
        match self {
            Tallies::Compact(tallies) => tallies.sort_unstable_by_key(|tally| tally.slot),
            Tallies::Wide(tallies) => tallies.sort_unstable_by_key(|tally| (tally.kind, tally.key)),
        }
    }
}

impl Serialize for Tallies {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Tallies::Compact(tallies) => {
                serializer.collect_seq(tallies.iter().map(|tally| tally.wide()))
            }
            Tallies::Wide(tallies) => tallies.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Tallies {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Tallies, D::Error> {
        Vec::<Tally>::deserialize(deserializer).map(Tallies::from_wide)
    }
}

/// The hour or day index of `at_s` in steps of `step_s` (none before the epoch).
fn bucket_key(at_s: i64, step_s: i64) -> Option<u32> {
    u32::try_from(at_s.div_euclid(step_s)).ok()
}

/// Everything kept about one link's clicks. Its totals are the sum of its daily tallies (days
/// are kept forever); checkpoints of earlier versions also list them (`"n"`), which loading
/// ignores.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LinkAggregates {
    #[serde(rename = "l")]
    last_at_s: i64,
    #[serde(rename = "t")]
    tallies: Tallies,
}

impl LinkAggregates {
    /// Human and bot clicks of all time.
    fn totals(&self) -> Counts {
        let sum = |kind| {
            self.tallies
                .range_of(kind)
                .filter_map(|index| self.tallies.get(index))
                .map(|tally| tally.count)
                .sum()
        };
        Counts {
            human: sum(Kind::DayHuman),
            bot: sum(Kind::DayBot),
        }
    }

    fn count(&self, kind: Kind, key: u32) -> u64 {
        self.tallies
            .find(kind, key)
            .ok()
            .and_then(|index| self.tallies.get(index))
            .map_or(0, |tally| tally.count)
    }

    /// The tallies of `kind`.
    fn of_kind(&self, kind: Kind) -> Vec<Tally> {
        self.tallies
            .range_of(kind)
            .filter_map(|index| self.tallies.get(index))
            .collect()
    }

    /// Adds a named click, counting it as "other" once the link has [`DISTINCT_VALUES_MAX`]
    /// names of this kind.
    fn add_named(&mut self, kind: Kind, id: u32) {
        if self.tallies.add_existing(kind, id) {
            return;
        }
        if self.tallies.range_of(kind).len() < DISTINCT_VALUES_MAX {
            self.tallies.add(kind, id);
        } else {
            self.tallies.add(kind, OTHER_ID);
        }
    }

    fn apply(&mut self, click: &ClassifiedClick<'_>) {
        self.last_at_s = self.last_at_s.max(click.at_s);
        let (hour_kind, day_kind) = if click.bot {
            (Kind::HourBot, Kind::DayBot)
        } else {
            (Kind::HourHuman, Kind::DayHuman)
        };
        if let Some(hour) = bucket_key(click.at_s, HOUR_S) {
            self.tallies.add(hour_kind, hour);
        }
        if let Some(day) = bucket_key(click.at_s, DAY_S) {
            self.tallies.add(day_kind, day);
        }
        if click.bot {
            self.add_named(Kind::Bot, click.browser);
        } else {
            self.add_named(Kind::Referrer, click.referrer);
            self.add_named(Kind::Country, click.country);
            self.add_named(Kind::Browser, click.browser);
            self.add_named(Kind::Os, click.os);
        }
    }

    /// Drops hourly buckets older than [`HOURS_KEPT`] before `now_s`.
    fn prune(&mut self, now_s: i64) {
        let oldest = bucket_key(now_s - HOURS_KEPT * HOUR_S, HOUR_S).unwrap_or(0);
        self.tallies.retain(|tally| {
            !matches!(tally.kind, Kind::HourHuman | Kind::HourBot) || tally.key >= oldest
        });
    }

    /// The `TOP_ENTRIES` largest tallies of `kind`, with their names.
    fn top(&self, kind: Kind, values: &Values) -> Vec<(String, u64)> {
        let mut entries: Vec<(String, u64)> = self
            .of_kind(kind)
            .into_iter()
            .map(|tally| (values.name(tally.key).to_owned(), tally.count))
            .collect();
        entries.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        entries.truncate(TOP_ENTRIES);
        entries
    }

    /// Checks what a checkpoint said: known names, sorted unique tallies.
    fn validate(&mut self, values: &Values) -> Result<(), String> {
        self.tallies.sort();
        let mut previous = None;
        for tally in (0..self.tallies.len()).filter_map(|index| self.tallies.get(index)) {
            if previous == Some((tally.kind, tally.key)) {
                return Err("a tally is listed twice".into());
            }
            if tally.kind.names_a_value() && tally.key as usize >= values.names.len() {
                return Err(format!("value id {} is not in the value list", tally.key));
            }
            previous = Some((tally.kind, tally.key));
        }
        Ok(())
    }

    /// Answers `query` (the window is aligned down to whole buckets); `now_s` says which hours
    /// are still kept.
    fn stats(
        &self,
        values: &Values,
        query: StatsQuery,
        now_s: i64,
    ) -> Result<LinkStats, StatsQueryError> {
        let step = query.granularity.seconds();
        let from = query.from_s.div_euclid(step) * step;
        if query.to_s <= from {
            return Err(StatsQueryError::EmptyWindow);
        }
        if (query.to_s - from) / step >= BUCKETS_MAX as i64 {
            return Err(StatsQueryError::TooManyBuckets);
        }
        let (human_kind, bot_kind) = match query.granularity {
            Granularity::Hour => {
                if from < now_s - HOURS_KEPT * HOUR_S {
                    return Err(StatsQueryError::HoursNotKept);
                }
                (Kind::HourHuman, Kind::HourBot)
            }
            Granularity::Day => (Kind::DayHuman, Kind::DayBot),
        };
        let mut buckets = Vec::new();
        let mut window = Counts::default();
        let mut start = from;
        while start < query.to_s {
            let (human, bot) = match bucket_key(start, step) {
                Some(key) => (self.count(human_kind, key), self.count(bot_kind, key)),
                None => (0, 0),
            };
            window.human += human;
            window.bot += bot;
            buckets.push(Bucket {
                start_s: start,
                human,
                bot,
            });
            start += step;
        }
        let totals = self.totals();
        Ok(LinkStats {
            human_total: totals.human,
            bot_total: totals.bot,
            last_clicked_at_s: (self.last_at_s != 0).then_some(self.last_at_s),
            window,
            buckets,
            referrers: self.top(Kind::Referrer, values),
            countries: self.top(Kind::Country, values),
            browsers: self.top(Kind::Browser, values),
            os: self.top(Kind::Os, values),
            bots: self.top(Kind::Bot, values),
        })
    }
}

/// Bucket size of a stats answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Hour,
    Day,
}

impl Granularity {
    pub fn seconds(self) -> i64 {
        match self {
            Granularity::Hour => HOUR_S,
            Granularity::Day => DAY_S,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Bucket {
    pub start_s: i64,
    pub human: u64,
    pub bot: u64,
}

/// The answer to a stats query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LinkStats {
    pub human_total: u64,
    pub bot_total: u64,
    pub last_clicked_at_s: Option<i64>,
    /// Human and bot clicks inside the window, from the buckets.
    pub window: Counts,
    pub buckets: Vec<Bucket>,
    /// All-time breakdowns of human clicks, largest first.
    pub referrers: Vec<(String, u64)>,
    pub countries: Vec<(String, u64)>,
    pub browsers: Vec<(String, u64)>,
    pub os: Vec<(String, u64)>,
    /// All-time bot clicks by bot name.
    pub bots: Vec<(String, u64)>,
}

impl LinkStats {
    /// The answer for a link nobody has clicked.
    pub fn no_clicks(query: StatsQuery, now_s: i64) -> Result<LinkStats, StatsQueryError> {
        LinkAggregates::default().stats(&Values::default(), query, now_s)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StatsQueryError {
    #[error("`from` must be before `to`")]
    EmptyWindow,
    #[error("the window holds more than {BUCKETS_MAX} buckets; use a coarser granularity or a shorter window")]
    TooManyBuckets,
    #[error("hourly buckets are kept for {HOURS_KEPT} hours; ask for granularity=day before that")]
    HoursNotKept,
}

/// A stats query: buckets of `granularity` covering `[from_s, to_s)`.
#[derive(Clone, Copy, Debug)]
pub struct StatsQuery {
    pub from_s: i64,
    pub to_s: i64,
    pub granularity: Granularity,
}

/// Links per chunk of [`Links`]: a chunk is allocated whole and never moves.
const LINKS_PER_CHUNK: usize = 4096;
/// Longest code stored inline (generated codes are 7 bytes); longer ones go on the heap.
const CODE_INLINE_BYTES_MAX: usize = 22;

/// A link's code.
#[derive(Clone, Debug)]
enum Code {
    Inline {
        len: u8,
        bytes: [u8; CODE_INLINE_BYTES_MAX],
    },
    Heap(Box<str>),
}

impl Code {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Code::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Code::Heap(code) => code.as_bytes(),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // The bytes were copied whole from a str, so they are UTF-8.
            Code::Inline { .. } => std::str::from_utf8(self.as_bytes()).unwrap_or_default(),
            Code::Heap(code) => code,
        }
    }

    /// Whether this is the code `key` stands for: two inline codes compare as whole fixed-size
    /// arrays (a few word compares, no call), as every click of the aggregator does at least
    /// once.
    fn is(&self, key: &CodeKey<'_>) -> bool {
        match (self, key) {
            (Code::Inline { len, bytes }, CodeKey::Inline(key_len, key_bytes)) => {
                len == key_len && bytes == key_bytes
            }
            (Code::Heap(code), CodeKey::Long(key)) => **code == **key,
            _ => false,
        }
    }
}

/// A code as a lookup holds it: padded as an inline [`Code`] is when it fits one.
enum CodeKey<'a> {
    Inline(u8, [u8; CODE_INLINE_BYTES_MAX]),
    Long(&'a str),
}

impl CodeKey<'_> {
    fn new(code: &str) -> CodeKey<'_> {
        let mut bytes = [0; CODE_INLINE_BYTES_MAX];
        match bytes.get_mut(..code.len()) {
            Some(head) => {
                head.copy_from_slice(code.as_bytes());
                CodeKey::Inline(code.len() as u8, bytes)
            }
            None => CodeKey::Long(code),
        }
    }

    fn to_code(&self) -> Code {
        match self {
            CodeKey::Inline(len, bytes) => Code::Inline {
                len: *len,
                bytes: *bytes,
            },
            CodeKey::Long(code) => Code::Heap((*code).into()),
        }
    }
}

/// One clicked link.
#[derive(Clone, Debug)]
struct Link {
    code: Code,
    aggregates: LinkAggregates,
}

/// Where each clicked link is, by the 32-bit hash of its code: open addressing with linear
/// probing over 8-byte slots, each `hash << 32 | (position + 1)` (0 = empty), at most 3/4 full.
/// A slot's address follows from the hash alone, so a batch of clicks can ask for it ahead
/// ([`Aggregates::prefetch_slot`]), and growing the table never reads a link.
#[derive(Debug, Default)]
struct LinkIndex {
    slots: Vec<u64>,
    len: usize,
}

/// Slots of a table's first allocation.
const INDEX_SLOTS_MIN: usize = 1024;

impl LinkIndex {
    fn home(&self, hash: u32) -> usize {
        hash as usize & (self.slots.len() - 1)
    }

    fn next(&self, at: usize) -> usize {
        (at + 1) & (self.slots.len() - 1)
    }

    /// The position of the link with `hash` for which `is_link` says yes.
    fn find(&self, hash: u32, mut is_link: impl FnMut(u32) -> bool) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let mut at = self.home(hash);
        // At most 3/4 full: every probe reaches an empty slot.
        loop {
            let slot = self.slots[at];
            if slot == 0 {
                return None;
            }
            if (slot >> 32) as u32 == hash && is_link(slot as u32 - 1) {
                return Some(slot as u32 - 1);
            }
            at = self.next(at);
        }
    }

    /// Adds a link that is not in the table yet. `position` is below `u32::MAX`.
    fn insert(&mut self, hash: u32, position: u32) {
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            let slots = (self.slots.len() * 2).max(INDEX_SLOTS_MIN);
            let old = std::mem::replace(&mut self.slots, vec![0; slots]);
            for slot in old.into_iter().filter(|slot| *slot != 0) {
                self.place(slot);
            }
        }
        self.place(u64::from(hash) << 32 | u64::from(position + 1));
        self.len += 1;
    }

    fn place(&mut self, slot: u64) {
        let mut at = self.home((slot >> 32) as u32);
        while self.slots[at] != 0 {
            at = self.next(at);
        }
        self.slots[at] = slot;
    }

    fn prefetch_slot(&self, hash: u32) {
        if !self.slots.is_empty() {
            prefetch(&self.slots[self.home(hash)]);
        }
    }
}

/// The hash of a code in the aggregates' table, computed once for the prefetches and the
/// [`Aggregates::apply_hashed`] that follow.
#[derive(Clone, Copy, Debug)]
pub struct CodeHash(u32);

/// Every clicked link's aggregates by code: the links in chunks in the order they were first
/// clicked, and a [`LinkIndex`] to find them. At most `u32::MAX - 1` links.
#[derive(Debug, Default)]
struct Links {
    index: LinkIndex,
    chunks: Vec<Vec<Link>>,
    len: u32,
    hasher: ahash::RandomState,
}

impl Links {
    fn hash(&self, code: &str) -> u32 {
        (self.hasher.hash_one(code.as_bytes()) >> 32) as u32
    }

    fn at(&self, position: u32) -> &Link {
        let position = position as usize;
        &self.chunks[position / LINKS_PER_CHUNK][position % LINKS_PER_CHUNK]
    }

    fn at_mut(&mut self, position: u32) -> &mut Link {
        let position = position as usize;
        &mut self.chunks[position / LINKS_PER_CHUNK][position % LINKS_PER_CHUNK]
    }

    fn position(&self, hash: u32, code: &CodeKey<'_>) -> Option<u32> {
        self.index
            .find(hash, |position| self.at(position).code.is(code))
    }

    fn get(&self, code: &str) -> Option<&LinkAggregates> {
        let position = self.position(self.hash(code), &CodeKey::new(code))?;
        Some(&self.at(position).aggregates)
    }

    /// The aggregates of `code`, added empty if it has none; `None` when there is no room for
    /// another link.
    fn get_or_add(&mut self, code: &str) -> Option<&mut LinkAggregates> {
        self.get_or_add_hashed(code, self.hash(code))
    }

    fn get_or_add_hashed(&mut self, code: &str, hash: u32) -> Option<&mut LinkAggregates> {
        let key = CodeKey::new(code);
        let position = match self.position(hash, &key) {
            Some(position) => position,
            None => self.add(hash, key.to_code())?,
        };
        Some(&mut self.at_mut(position).aggregates)
    }

    fn add(&mut self, hash: u32, code: Code) -> Option<u32> {
        let position = self.len;
        // u32::MAX itself is left out: the index stores position + 1.
        self.len = position.checked_add(1).filter(|len| *len < u32::MAX)?;
        if (position as usize).is_multiple_of(LINKS_PER_CHUNK) {
            self.chunks.push(Vec::with_capacity(LINKS_PER_CHUNK));
        }
        self.chunks.last_mut()?.push(Link {
            code,
            aggregates: LinkAggregates::default(),
        });
        self.index.insert(hash, position);
        Some(position)
    }

    /// Starts loading the link the table's slot for `hash` points to (once that slot is in
    /// cache).
    fn prefetch_link(&self, hash: u32) {
        // The first link filed under `hash`: nearly always the one a click of it will want.
        let Some(position) = self.index.find(hash, |_| true) else {
            return;
        };
        let position = position as usize;
        if let Some(link) = self
            .chunks
            .get(position / LINKS_PER_CHUNK)
            .and_then(|chunk| chunk.get(position % LINKS_PER_CHUNK))
        {
            prefetch_lines(link);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Link> {
        self.chunks.iter().flatten()
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Link> {
        self.chunks.iter_mut().flatten()
    }
}

impl Serialize for Links {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(
            self.iter()
                .map(|link| (link.code.as_str(), &link.aggregates)),
        )
    }
}

impl<'de> Deserialize<'de> for Links {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Links, D::Error> {
        struct LinksVisitor;

        impl<'de> Visitor<'de> for LinksVisitor {
            type Value = Links;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a map of codes to link aggregates")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Links, M::Error> {
                let mut links = Links::default();
                while let Some((code, aggregates)) = map.next_entry::<String, LinkAggregates>()? {
                    // A code listed twice: the last one counts, as in any JSON map.
                    let link = links.get_or_add(&code).ok_or_else(|| {
                        serde::de::Error::custom("more links than the aggregates hold")
                    })?;
                    *link = aggregates;
                }
                Ok(links)
            }
        }

        deserializer.deserialize_map(LinksVisitor)
    }
}

/// Aggregates of every link that has been clicked, and the names they use. Written to a
/// checkpoint as `{"values": [names by id], "links": {code: {"n","l","t"}}}`.
#[derive(Debug, Default, Deserialize)]
#[serde(try_from = "AggregatesFile")]
pub struct Aggregates {
    values: Values,
    links: Links,
}

#[derive(Deserialize)]
struct AggregatesFile {
    values: Vec<Box<str>>,
    links: Links,
}

#[derive(Serialize)]
struct AggregatesFileRef<'a> {
    values: &'a [Box<str>],
    links: &'a Links,
}

impl TryFrom<AggregatesFile> for Aggregates {
    type Error = String;

    fn try_from(file: AggregatesFile) -> Result<Aggregates, String> {
        let values = Values::from_names(file.values)?;
        let mut links = file.links;
        for link in links.iter_mut() {
            link.aggregates
                .validate(&values)
                .map_err(|error| format!("link {:?}: {error}", link.code.as_str()))?;
        }
        Ok(Aggregates { values, links })
    }
}

impl Serialize for Aggregates {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        AggregatesFileRef {
            values: &self.values.names,
            links: &self.links,
        }
        .serialize(serializer)
    }
}

impl Aggregates {
    /// The id of `name` for a [`ClassifiedClick`].
    pub fn intern(&mut self, name: &str) -> u32 {
        self.values.intern(name)
    }

    /// The name behind an id of a [`ClassifiedClick`].
    pub fn name(&self, id: u32) -> &str {
        self.values.name(id)
    }

    /// Counts `click`; a click of a new link once `u32::MAX` links have been clicked is not
    /// counted (there is no room to say which link it was).
    pub fn apply(&mut self, click: &ClassifiedClick<'_>) {
        let hash = self.code_hash(click.code);
        self.apply_hashed(click, hash);
    }

    /// [`Self::apply`] with the code's hash already computed.
    pub fn apply_hashed(&mut self, click: &ClassifiedClick<'_>, hash: CodeHash) {
        if let Some(link) = self.links.get_or_add_hashed(click.code, hash.0) {
            link.apply(click);
        }
    }

    pub fn code_hash(&self, code: &str) -> CodeHash {
        CodeHash(self.links.hash(code))
    }

    /// The first of two memory hints for a batch of clicks: starts loading the table slot of
    /// the code with `hash`. The second, [`Self::prefetch_link`], once the slot is in cache.
    pub fn prefetch_slot(&self, hash: CodeHash) {
        self.links.index.prefetch_slot(hash.0);
    }

    /// Starts loading the aggregates the code's table slot points to.
    pub fn prefetch_link(&self, hash: CodeHash) {
        self.links.prefetch_link(hash.0);
    }

    pub fn prune(&mut self, now_s: i64) {
        for link in self.links.iter_mut() {
            link.aggregates.prune(now_s);
        }
    }

    /// Stats of `code`; `None` when it has never been clicked.
    pub fn stats(
        &self,
        code: &str,
        query: StatsQuery,
        now_s: i64,
    ) -> Option<Result<LinkStats, StatsQueryError>> {
        let link = self.links.get(code)?;
        Some(link.stats(&self.values, query, now_s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_index_finds_every_link_through_growth_and_shared_hashes() {
        let mut index = LinkIndex::default();
        // Every hash is shared by two links; the table grows several times on the way.
        for position in 0..10_000u32 {
            index.insert(position % 5_000, position);
        }
        for position in 0..10_000u32 {
            let found = index.find(position % 5_000, |candidate| candidate == position);
            assert_eq!(found, Some(position));
        }
        assert_eq!(index.find(7_777, |_| true), None, "a hash never inserted");
        assert_eq!(
            index.find(42, |candidate| candidate == 9_999),
            None,
            "a link filed under another hash"
        );
        assert_eq!(
            index.find(42, |_| true),
            Some(42),
            "the first link filed under a hash"
        );
        assert!(index.len * 4 <= index.slots.len() * 3, "at most 3/4 full");
    }

    /// A click of `code` at `at_s` from Firefox on Linux in Germany, no referrer.
    fn firefox_click<'a>(
        aggregates: &mut Aggregates,
        code: &'a str,
        at_s: i64,
    ) -> ClassifiedClick<'a> {
        ClassifiedClick {
            code,
            at_s,
            referrer: aggregates.intern("direct"),
            country: aggregates.intern("DE"),
            browser: aggregates.intern("Firefox"),
            os: aggregates.intern("Linux"),
            bot: false,
        }
    }

    #[test]
    fn applying_with_a_hash_counts_like_applying_without() {
        let mut by_code = Aggregates::default();
        let mut by_hash = Aggregates::default();
        for (index, code) in ["a", "b", "a", "c", "a"].into_iter().enumerate() {
            let at_s = 1_800_000_000 + index as i64;
            let click = firefox_click(&mut by_code, code, at_s);
            by_code.apply(&click);
            let click = firefox_click(&mut by_hash, code, at_s);
            let hash = by_hash.code_hash(code);
            by_hash.prefetch_slot(hash);
            by_hash.prefetch_link(hash);
            by_hash.apply_hashed(&click, hash);
        }
        let totals = |aggregates: &Aggregates| {
            ["a", "b", "c", "d"].map(|code| aggregates.links.get(code).map(LinkAggregates::totals))
        };
        assert_eq!(totals(&by_code), totals(&by_hash));
        assert!(totals(&by_hash)[0].is_some() && totals(&by_hash)[3].is_none());
    }

    /// Applies a click of link "abc" from Firefox on Linux in Germany (or from Slackbot).
    fn apply(aggregates: &mut Aggregates, at_s: i64, bot: bool, referrer: &str) {
        let click = ClassifiedClick {
            code: "abc",
            at_s,
            referrer: aggregates.intern(referrer),
            country: aggregates.intern("DE"),
            browser: aggregates.intern(if bot { "Slackbot" } else { "Firefox" }),
            os: aggregates.intern("Linux"),
            bot,
        };
        aggregates.apply(&click);
    }

    fn stats(aggregates: &Aggregates, query: StatsQuery) -> LinkStats {
        aggregates
            .stats("abc", query, T)
            .expect("clicked")
            .expect("stats")
    }

    const T: i64 = 1_700_000_000 - 1_700_000_000 % HOUR_S; // an hour boundary

    #[test]
    fn clicks_fall_into_the_right_hour_across_a_boundary() {
        let mut aggregates = Aggregates::default();
        apply(&mut aggregates, T - 1, false, "direct");
        apply(&mut aggregates, T, false, "direct");
        apply(&mut aggregates, T + HOUR_S - 1, false, "direct");
        apply(&mut aggregates, T + HOUR_S, true, "direct");
        let query = StatsQuery {
            from_s: T - HOUR_S,
            to_s: T + 2 * HOUR_S,
            granularity: Granularity::Hour,
        };
        let stats = stats(&aggregates, query);
        let counts: Vec<(i64, u64, u64)> = stats
            .buckets
            .iter()
            .map(|b| (b.start_s - T, b.human, b.bot))
            .collect();
        assert_eq!(counts, vec![(-HOUR_S, 1, 0), (0, 2, 0), (HOUR_S, 0, 1)]);
        assert_eq!(stats.window, Counts { human: 3, bot: 1 });
        assert_eq!((stats.human_total, stats.bot_total), (3, 1));
        assert_eq!(stats.last_clicked_at_s, Some(T + HOUR_S));
    }

    #[test]
    fn bots_are_kept_out_of_human_breakdowns() {
        let mut aggregates = Aggregates::default();
        apply(&mut aggregates, T, false, "news.example");
        apply(&mut aggregates, T, false, "news.example");
        apply(&mut aggregates, T, false, "t.co");
        apply(&mut aggregates, T, true, "slack.com");
        let query = StatsQuery {
            from_s: T,
            to_s: T + DAY_S,
            granularity: Granularity::Day,
        };
        let stats = stats(&aggregates, query);
        assert_eq!(
            stats.referrers,
            vec![("news.example".to_owned(), 2), ("t.co".to_owned(), 1)]
        );
        assert_eq!(stats.browsers, vec![("Firefox".to_owned(), 3)]);
        assert_eq!(stats.bots, vec![("Slackbot".to_owned(), 1)]);
        assert_eq!(stats.countries, vec![("DE".to_owned(), 3)]);
        assert_eq!(stats.window, Counts { human: 3, bot: 1 });
    }

    #[test]
    fn distinct_values_are_capped_into_other() {
        let mut aggregates = Aggregates::default();
        for i in 0..DISTINCT_VALUES_MAX + 5 {
            apply(&mut aggregates, T, false, &format!("r{i}.example"));
        }
        apply(&mut aggregates, T, false, "r3.example");
        let link = aggregates.links.get("abc").expect("clicked");
        let referrers = link.of_kind(Kind::Referrer);
        assert_eq!(referrers.len(), DISTINCT_VALUES_MAX + 1);
        assert_eq!(link.count(Kind::Referrer, OTHER_ID), 5);
        let r3 = aggregates.values.ids["r3.example"];
        assert_eq!(
            link.count(Kind::Referrer, r3),
            2,
            "a known name still counts"
        );
    }

    #[test]
    fn names_past_the_interning_limit_are_other() {
        let mut values = Values::default();
        for i in 0..VALUES_MAX - 1 {
            values.intern(&i.to_string());
        }
        assert_eq!(values.intern("one too many"), OTHER_ID);
        assert_eq!(values.intern("7"), 8);
        assert_eq!(values.name(8), "7");
        assert_eq!(values.name(u32::MAX), OTHER);
    }

    #[test]
    fn bad_windows_are_refused() {
        let query = |from_s, to_s, granularity| StatsQuery {
            from_s,
            to_s,
            granularity,
        };
        assert_eq!(
            LinkStats::no_clicks(query(T, T, Granularity::Hour), T),
            Err(StatsQueryError::EmptyWindow)
        );
        assert_eq!(
            LinkStats::no_clicks(query(T - 20_000 * HOUR_S, T, Granularity::Hour), T),
            Err(StatsQueryError::TooManyBuckets)
        );
        assert_eq!(
            LinkStats::no_clicks(
                query(T - 5000 * HOUR_S, T - 4000 * HOUR_S, Granularity::Hour),
                T
            ),
            Err(StatsQueryError::HoursNotKept)
        );
        let empty = LinkStats::no_clicks(query(T - 5000 * HOUR_S, T, Granularity::Day), T)
            .expect("a day window");
        assert_eq!(empty.window, Counts::default());
        assert!(empty.referrers.is_empty());
    }

    #[test]
    fn pruning_drops_only_old_hours() {
        let mut aggregates = Aggregates::default();
        apply(
            &mut aggregates,
            T - (HOURS_KEPT + 1) * HOUR_S,
            false,
            "direct",
        );
        apply(&mut aggregates, T, false, "direct");
        aggregates.prune(T);
        let link = aggregates.links.get("abc").expect("clicked");
        assert_eq!(link.of_kind(Kind::HourHuman).len(), 1);
        assert_eq!(link.of_kind(Kind::DayHuman).len(), 2);
        assert_eq!(link.totals().human, 2);
    }

    #[test]
    fn a_checkpoint_round_trips_and_damage_is_refused() {
        let mut aggregates = Aggregates::default();
        apply(&mut aggregates, T, false, "news.example");
        apply(&mut aggregates, T + 1, true, "slack.com");
        let json = serde_json::to_string(&aggregates).expect("serialise");
        let back: Aggregates = serde_json::from_str(&json).expect("read back");
        let query = StatsQuery {
            from_s: T,
            to_s: T + DAY_S,
            granularity: Granularity::Day,
        };
        assert_eq!(stats(&back, query), stats(&aggregates, query));

        for damaged in [
            json.replace("\"other\"", "\"else\""),
            json.replace("[4,", "[42,"),
            r#"{"values":["other"],"links":{"abc":{"n":{"human":1,"bot":0},"l":1,"t":[[4,9,1]]}}}"#.to_owned(),
            r#"{"values":["other","x","x"],"links":{}}"#.to_owned(),
            r#"{"values":["other"],"links":{"abc":{"n":{"human":1,"bot":0},"l":1,"t":[[0,1,1],[0,1,1]]}}}"#.to_owned(),
        ] {
            assert!(
                serde_json::from_str::<Aggregates>(&damaged).is_err(),
                "accepted {damaged}"
            );
        }
    }

    fn day_query(from_s: i64) -> StatsQuery {
        StatsQuery {
            from_s,
            to_s: from_s + DAY_S,
            granularity: Granularity::Day,
        }
    }

    fn round_trip(aggregates: &Aggregates) -> Aggregates {
        let json = serde_json::to_string(aggregates).expect("serialise");
        serde_json::from_str(&json).expect("read back")
    }

    #[test]
    fn compact_and_wide_tallies_count_alike() {
        let mut compact = Tallies::default();
        let mut wide = Tallies::Wide(Vec::new());
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..5000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let kind = KINDS[(state % KINDS.len() as u64) as usize];
            let key = ((state >> 8) % 40) as u32 * 100_003;
            if (state >> 40).is_multiple_of(2) {
                compact.add(kind, key);
                wide.add(kind, key);
            } else {
                assert_eq!(
                    compact.add_existing(kind, key),
                    wide.add_existing(kind, key)
                );
            }
        }
        assert!(matches!(compact, Tallies::Compact(_)));
        assert_eq!(compact.len(), wide.len());
        for index in 0..=compact.len() {
            assert_eq!(compact.get(index), wide.get(index));
        }
        for kind in KINDS {
            assert_eq!(compact.range_of(kind), wide.range_of(kind));
            for key in [0, 100_003, 39 * 100_003, 7, COMPACT_KEY_MAX, u32::MAX] {
                assert_eq!(
                    compact.find(kind, key),
                    wide.find(kind, key),
                    "{kind:?} {key}"
                );
            }
        }
    }

    #[test]
    fn a_count_past_the_compact_range_goes_on_counting() {
        let mut aggregates = Aggregates::default();
        apply(&mut aggregates, T, false, "direct");
        let link = aggregates.links.get_or_add("abc").expect("room");
        let Tallies::Compact(tallies) = &mut link.tallies else {
            panic!("a first click's tallies are compact");
        };
        // As after 4 billion clicks.
        for tally in tallies.iter_mut() {
            tally.count = u32::MAX;
        }
        apply(&mut aggregates, T, false, "direct");
        let beyond = u64::from(u32::MAX) + 1;
        for aggregates in [&aggregates, &round_trip(&aggregates)] {
            let link = aggregates.links.get("abc").expect("clicked");
            assert!(matches!(link.tallies, Tallies::Wide(_)));
            let stats = stats(aggregates, day_query(T));
            assert_eq!(stats.human_total, beyond);
            assert_eq!(
                stats.window,
                Counts {
                    human: beyond,
                    bot: 0
                }
            );
            assert_eq!(stats.referrers, vec![("direct".to_owned(), beyond)]);
            assert_eq!(stats.countries, vec![("DE".to_owned(), beyond)]);
        }
    }

    #[test]
    fn a_name_count_past_the_compact_range_goes_on_counting() {
        let mut aggregates = Aggregates::default();
        apply(&mut aggregates, T, false, "direct");
        let direct = aggregates.values.ids["direct"];
        let link = aggregates.links.get_or_add("abc").expect("room");
        let Tallies::Compact(tallies) = &mut link.tallies else {
            panic!("a first click's tallies are compact");
        };
        let slot = CompactTally::slot(Kind::Referrer, direct).expect("a small id");
        let referrer = tallies
            .iter_mut()
            .find(|tally| tally.slot == slot)
            .expect("the referrer's tally");
        // As after 4 billion clicks from one referrer.
        referrer.count = u32::MAX;
        apply(&mut aggregates, T, false, "direct");
        let link = aggregates.links.get("abc").expect("clicked");
        assert!(matches!(link.tallies, Tallies::Wide(_)));
        let stats = stats(&aggregates, day_query(T));
        assert_eq!(
            stats.referrers,
            vec![("direct".to_owned(), u64::from(u32::MAX) + 1)]
        );
        assert_eq!(stats.countries, vec![("DE".to_owned(), 2)]);
        assert_eq!(stats.window, Counts { human: 2, bot: 0 });
    }

    #[test]
    fn an_hour_past_the_compact_range_is_kept() {
        let mut aggregates = Aggregates::default();
        let far_s = i64::from(COMPACT_KEY_MAX + 1) * HOUR_S;
        for at_s in [far_s - HOUR_S, far_s, far_s] {
            apply(&mut aggregates, at_s, false, "direct");
        }
        let query = StatsQuery {
            from_s: far_s - HOUR_S,
            to_s: far_s + HOUR_S,
            granularity: Granularity::Hour,
        };
        for aggregates in [&aggregates, &round_trip(&aggregates)] {
            let link = aggregates.links.get("abc").expect("clicked");
            assert!(matches!(link.tallies, Tallies::Wide(_)));
            let stats = aggregates
                .stats("abc", query, far_s)
                .expect("clicked")
                .expect("stats");
            let counts: Vec<u64> = stats.buckets.iter().map(|bucket| bucket.human).collect();
            assert_eq!(counts, vec![1, 2]);
        }
    }

    #[test]
    fn codes_of_every_length_are_told_apart() {
        let long = "x".repeat(64);
        let codes = [
            "a",
            "ab",
            "ab\0",
            "abc",
            "0123456789012345678901",
            "01234567890123456789012",
            long.as_str(),
            "ünïcödé-über-dem-limit",
        ];
        let mut aggregates = Aggregates::default();
        for (clicks, code) in codes.iter().enumerate() {
            for _ in 0..=clicks {
                let click = ClassifiedClick {
                    code,
                    at_s: T,
                    referrer: OTHER_ID,
                    country: OTHER_ID,
                    browser: OTHER_ID,
                    os: OTHER_ID,
                    bot: false,
                };
                aggregates.apply(&click);
            }
        }
        for aggregates in [&aggregates, &round_trip(&aggregates)] {
            for (clicks, code) in codes.iter().enumerate() {
                let stats = aggregates
                    .stats(code, day_query(T), T)
                    .expect("clicked")
                    .expect("stats");
                assert_eq!(stats.human_total, clicks as u64 + 1, "{code:?}");
            }
            assert!(aggregates.stats("abcd", day_query(T), T).is_none());
            assert!(aggregates.stats("", day_query(T), T).is_none());
        }
    }

    #[test]
    fn links_past_one_chunk_are_all_found() {
        let links = 3 * LINKS_PER_CHUNK + 5;
        let mut aggregates = Aggregates::default();
        for i in 0..links {
            for _ in 0..i % 3 + 1 {
                let code = format!("c{i}");
                let click = ClassifiedClick {
                    code: &code,
                    at_s: T,
                    referrer: OTHER_ID,
                    country: OTHER_ID,
                    browser: OTHER_ID,
                    os: OTHER_ID,
                    bot: i % 2 == 0,
                };
                aggregates.apply(&click);
            }
        }
        assert_eq!(aggregates.links.len as usize, links);
        for aggregates in [&aggregates, &round_trip(&aggregates)] {
            for i in 0..links {
                let stats = aggregates
                    .stats(&format!("c{i}"), day_query(T), T)
                    .expect("clicked")
                    .expect("stats");
                let clicks = (i % 3 + 1) as u64;
                let expected = if i % 2 == 0 { (0, clicks) } else { (clicks, 0) };
                assert_eq!((stats.human_total, stats.bot_total), expected);
            }
        }
    }

    #[test]
    fn a_clicked_link_stays_within_its_memory_budget() {
        // Every clicked link has one (PERFORMANCE.md, "Memory of a running server"): the code
        // inline, the last click's time and a first click's six tallies inline.
        assert!(
            std::mem::size_of::<Link>() <= 96,
            "{}",
            std::mem::size_of::<Link>()
        );
        let mut aggregates = Aggregates::default();
        apply(&mut aggregates, T, false, "direct");
        let link = aggregates.links.get("abc").expect("clicked");
        assert!(matches!(&link.tallies, Tallies::Compact(tallies) if !tallies.spilled()));
    }

    #[test]
    fn a_checkpoint_in_the_format_of_earlier_versions_loads() {
        // As written by kurz before tallies were compacted: unsorted tallies, a count past
        // u32::MAX, and a code listed twice (the last one counts).
        let hour = T / HOUR_S;
        let day = T / DAY_S;
        let json = format!(
            r#"{{"values":["other","direct","DE","Firefox","Linux"],"links":{{
                "abc":{{"n":{{"human":5000000000,"bot":0}},"l":{T},
                    "t":[[4,1,5000000000],[0,{hour},2],[2,{day},5000000000],[5,2,5000000000],[6,3,5000000000],[7,4,5000000000]]}},
                "xyz":{{"n":{{"human":1,"bot":0}},"l":{T},"t":[[0,{hour},1],[2,{day},1]]}},
                "xyz":{{"n":{{"human":2,"bot":0}},"l":{T},"t":[[0,{hour},2],[2,{day},2]]}}}}}}"#
        );
        let aggregates: Aggregates = serde_json::from_str(&json).expect("an old checkpoint");
        let stats = stats(&aggregates, day_query(T));
        assert_eq!(stats.human_total, 5_000_000_000);
        assert_eq!(stats.window.human, 5_000_000_000);
        assert_eq!(stats.referrers, vec![("direct".to_owned(), 5_000_000_000)]);
        assert_eq!(stats.os, vec![("Linux".to_owned(), 5_000_000_000)]);
        let xyz = aggregates
            .stats("xyz", day_query(T), T)
            .expect("clicked")
            .expect("stats");
        assert_eq!(xyz.human_total, 2);
        assert_eq!(aggregates.links.len, 2);
    }
}
