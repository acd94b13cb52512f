//! Per-link click aggregates: human and bot clicks per hour and per day, referrer domains,
//! countries, browsers, operating systems and bot names, and the stats query over them.
//!
//! Owns the in-memory shape and its limits; fed classified clicks by the aggregator thread, read
//! by the stats API. Never sees a raw request: classification happens before a click gets here.
//!
//! Compact, because every clicked link has an entry: each distinct name (referrer domain,
//! country, browser, ...) is interned once in [`Values`], and a link keeps one vector of 16-byte
//! tallies sorted by (kind, key), the key being an hour, a day or a name's id. A link clicked
//! once costs about 200 bytes; a click is a few binary searches and adds, with no allocation
//! once the link and its names have been seen.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

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

impl Counts {
    fn add(&mut self, bot: bool) {
        if bot {
            self.bot += 1;
        } else {
            self.human += 1;
        }
    }
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
/// clicks with a name (key = the name's id). Written to a checkpoint as `[kind, key, count]`.
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

/// The hour or day index of `at_s` in steps of `step_s` (none before the epoch).
fn bucket_key(at_s: i64, step_s: i64) -> Option<u32> {
    u32::try_from(at_s.div_euclid(step_s)).ok()
}

/// Everything kept about one link's clicks.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LinkAggregates {
    #[serde(rename = "n")]
    total: Counts,
    #[serde(rename = "l")]
    last_at_s: i64,
    #[serde(rename = "t")]
    tallies: Vec<Tally>,
}

impl LinkAggregates {
    fn find(&self, kind: Kind, key: u32) -> Result<usize, usize> {
        self.tallies
            .binary_search_by(|tally| (tally.kind, tally.key).cmp(&(kind, key)))
    }

    fn count(&self, kind: Kind, key: u32) -> u64 {
        self.find(kind, key)
            .map_or(0, |index| self.tallies[index].count)
    }

    /// The tallies of `kind`.
    fn of_kind(&self, kind: Kind) -> &[Tally] {
        let start = self.tallies.partition_point(|tally| tally.kind < kind);
        let end = self.tallies.partition_point(|tally| tally.kind <= kind);
        &self.tallies[start..end]
    }

    fn add(&mut self, kind: Kind, key: u32) {
        match self.find(kind, key) {
            Ok(index) => self.tallies[index].count += 1,
            Err(index) => self.tallies.insert(
                index,
                Tally {
                    kind,
                    key,
                    count: 1,
                },
            ),
        }
    }

    /// Adds a named click, counting it as "other" once the link has [`DISTINCT_VALUES_MAX`]
    /// names of this kind.
    fn add_named(&mut self, kind: Kind, id: u32) {
        let known = self.find(kind, id).is_ok();
        if known || self.of_kind(kind).len() < DISTINCT_VALUES_MAX {
            self.add(kind, id);
        } else {
            self.add(kind, OTHER_ID);
        }
    }

    fn apply(&mut self, click: &ClassifiedClick<'_>) {
        self.total.add(click.bot);
        self.last_at_s = self.last_at_s.max(click.at_s);
        let (hour_kind, day_kind) = if click.bot {
            (Kind::HourBot, Kind::DayBot)
        } else {
            (Kind::HourHuman, Kind::DayHuman)
        };
        if let Some(hour) = bucket_key(click.at_s, HOUR_S) {
            self.add(hour_kind, hour);
        }
        if let Some(day) = bucket_key(click.at_s, DAY_S) {
            self.add(day_kind, day);
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
            .iter()
            .map(|tally| (values.name(tally.key).to_owned(), tally.count))
            .collect();
        entries.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        entries.truncate(TOP_ENTRIES);
        entries
    }

    /// Checks what a checkpoint said: known names, sorted unique tallies.
    fn validate(&mut self, values: &Values) -> Result<(), String> {
        self.tallies
            .sort_unstable_by_key(|tally| (tally.kind, tally.key));
        for pair in self.tallies.windows(2) {
            if (pair[0].kind, pair[0].key) == (pair[1].kind, pair[1].key) {
                return Err("a tally is listed twice".into());
            }
        }
        match self
            .tallies
            .iter()
            .find(|tally| tally.kind.names_a_value() && tally.key as usize >= values.names.len())
        {
            Some(tally) => Err(format!("value id {} is not in the value list", tally.key)),
            None => Ok(()),
        }
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
        Ok(LinkStats {
            human_total: self.total.human,
            bot_total: self.total.bot,
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

/// Aggregates of every link that has been clicked, and the names they use. Written to a
/// checkpoint as `{"values": [names by id], "links": {code: {"n","l","t"}}}`.
#[derive(Debug, Default, Deserialize)]
#[serde(try_from = "AggregatesFile")]
pub struct Aggregates {
    values: Values,
    links: FastMap<Box<str>, LinkAggregates>,
}

#[derive(Deserialize)]
struct AggregatesFile {
    values: Vec<Box<str>>,
    links: FastMap<Box<str>, LinkAggregates>,
}

#[derive(Serialize)]
struct AggregatesFileRef<'a> {
    values: &'a [Box<str>],
    links: &'a FastMap<Box<str>, LinkAggregates>,
}

impl TryFrom<AggregatesFile> for Aggregates {
    type Error = String;

    fn try_from(file: AggregatesFile) -> Result<Aggregates, String> {
        let values = Values::from_names(file.values)?;
        let mut links = file.links;
        for (code, link) in links.iter_mut() {
            link.validate(&values)
                .map_err(|error| format!("link {code:?}: {error}"))?;
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

    pub fn apply(&mut self, click: &ClassifiedClick<'_>) {
        match self.links.get_mut(click.code) {
            Some(link) => link.apply(click),
            None => {
                // Room for exactly the tallies a first click makes (most links stay small).
                let first_tallies = if click.bot { 3 } else { 6 };
                let mut link = LinkAggregates {
                    tallies: Vec::with_capacity(first_tallies),
                    ..LinkAggregates::default()
                };
                link.apply(click);
                self.links.insert(click.code.into(), link);
            }
        }
    }

    pub fn prune(&mut self, now_s: i64) {
        for link in self.links.values_mut() {
            link.prune(now_s);
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
        assert_eq!(link.total.human, 2);
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
}
