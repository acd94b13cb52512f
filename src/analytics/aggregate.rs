//! Per-link click aggregates: human and bot clicks per hour and per day, referrer domains,
//! countries, browsers, operating systems and bot names, and the stats query over them.
//!
//! Owns the in-memory shape and its limits; fed one classified click at a time by the
//! aggregator thread, read by the stats API. Never sees a raw request: classification happens
//! before a click gets here.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

pub const HOUR_S: i64 = 3600;
pub const DAY_S: i64 = 86_400;
/// Hourly buckets are kept this long; daily buckets are kept forever.
pub const HOURS_KEPT: i64 = 24 * 92;
/// Distinct values kept per breakdown (referrers, countries, ...); the rest count as "other".
pub const DISTINCT_VALUES_MAX: usize = 1000;
/// Entries a stats answer lists per breakdown.
pub const TOP_ENTRIES: usize = 10;
/// Buckets one stats answer may hold (a year of hours is 8784).
pub const BUCKETS_MAX: usize = 10_000;
const OTHER: &str = "other";

/// One click after classification: what the aggregates need, nothing more.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassifiedClick {
    #[serde(rename = "c")]
    pub code: String,
    #[serde(rename = "t")]
    pub at_s: i64,
    #[serde(rename = "r")]
    pub referrer: String,
    #[serde(rename = "g")]
    pub country: String,
    #[serde(rename = "b")]
    pub browser: String,
    #[serde(rename = "o")]
    pub os: String,
    #[serde(rename = "x")]
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

/// Everything kept about one link's clicks.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LinkAggregates {
    pub total: Counts,
    pub last_at_s: i64,
    /// Hour start (unix s) → clicks.
    pub hours: BTreeMap<i64, Counts>,
    /// Day start (unix s, UTC midnight) → clicks.
    pub days: BTreeMap<i64, Counts>,
    /// Human clicks only: a referrer, country, browser or OS of an unfurler says nothing.
    pub referrers: HashMap<String, u64>,
    pub countries: HashMap<String, u64>,
    pub browsers: HashMap<String, u64>,
    pub os: HashMap<String, u64>,
    /// Bot clicks by bot name.
    pub bots: HashMap<String, u64>,
}

fn bump(map: &mut HashMap<String, u64>, key: &str) {
    if let Some(count) = map.get_mut(key) {
        *count += 1;
    } else if map.len() < DISTINCT_VALUES_MAX {
        map.insert(key.to_owned(), 1);
    } else {
        *map.entry(OTHER.to_owned()).or_default() += 1;
    }
}

impl LinkAggregates {
    fn apply(&mut self, click: &ClassifiedClick) {
        self.total.add(click.bot);
        self.last_at_s = self.last_at_s.max(click.at_s);
        let hour = click.at_s.div_euclid(HOUR_S) * HOUR_S;
        self.hours.entry(hour).or_default().add(click.bot);
        let day = click.at_s.div_euclid(DAY_S) * DAY_S;
        self.days.entry(day).or_default().add(click.bot);
        if click.bot {
            bump(&mut self.bots, &click.browser);
        } else {
            bump(&mut self.referrers, &click.referrer);
            bump(&mut self.countries, &click.country);
            bump(&mut self.browsers, &click.browser);
            bump(&mut self.os, &click.os);
        }
    }

    /// Drops hourly buckets older than [`HOURS_KEPT`] before `now_s`.
    fn prune(&mut self, now_s: i64) {
        let oldest = now_s - HOURS_KEPT * HOUR_S;
        self.hours = self.hours.split_off(&oldest);
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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StatsQueryError {
    #[error("`from` must be before `to`")]
    EmptyWindow,
    #[error("the window holds more than {BUCKETS_MAX} buckets; use a coarser granularity or a shorter window")]
    TooManyBuckets,
    #[error("hourly buckets are kept for {HOURS_KEPT} hours; ask for granularity=day before that")]
    HoursNotKept,
}

fn top(map: &HashMap<String, u64>) -> Vec<(String, u64)> {
    let mut entries: Vec<(String, u64)> = map.iter().map(|(k, v)| (k.clone(), *v)).collect();
    entries.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    entries.truncate(TOP_ENTRIES);
    entries
}

/// A stats query: buckets of `granularity` covering `[from_s, to_s)`.
#[derive(Clone, Copy, Debug)]
pub struct StatsQuery {
    pub from_s: i64,
    pub to_s: i64,
    pub granularity: Granularity,
}

impl LinkAggregates {
    /// Answers `query` (the window is aligned down to whole buckets); `now_s` says which hours
    /// are still kept.
    pub fn stats(&self, query: StatsQuery, now_s: i64) -> Result<LinkStats, StatsQueryError> {
        let step = query.granularity.seconds();
        let from = query.from_s.div_euclid(step) * step;
        if query.to_s <= from {
            return Err(StatsQueryError::EmptyWindow);
        }
        if (query.to_s - from) / step >= BUCKETS_MAX as i64 {
            return Err(StatsQueryError::TooManyBuckets);
        }
        let source = match query.granularity {
            Granularity::Hour => {
                if from < now_s - HOURS_KEPT * HOUR_S {
                    return Err(StatsQueryError::HoursNotKept);
                }
                &self.hours
            }
            Granularity::Day => &self.days,
        };
        let mut buckets = Vec::new();
        let mut window = Counts::default();
        let mut start = from;
        while start < query.to_s {
            let counts = source.get(&start).copied().unwrap_or_default();
            window.human += counts.human;
            window.bot += counts.bot;
            buckets.push(Bucket {
                start_s: start,
                human: counts.human,
                bot: counts.bot,
            });
            start += step;
        }
        Ok(LinkStats {
            human_total: self.total.human,
            bot_total: self.total.bot,
            last_clicked_at_s: (self.last_at_s != 0).then_some(self.last_at_s),
            window,
            buckets,
            referrers: top(&self.referrers),
            countries: top(&self.countries),
            browsers: top(&self.browsers),
            os: top(&self.os),
            bots: top(&self.bots),
        })
    }
}

/// Aggregates of every link that has been clicked.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Aggregates {
    pub links: HashMap<String, LinkAggregates>,
}

impl Aggregates {
    pub fn apply(&mut self, click: &ClassifiedClick) {
        match self.links.get_mut(&click.code) {
            Some(link) => link.apply(click),
            None => self
                .links
                .entry(click.code.clone())
                .or_default()
                .apply(click),
        }
    }

    pub fn prune(&mut self, now_s: i64) {
        for link in self.links.values_mut() {
            link.prune(now_s);
        }
    }

    pub fn get(&self, code: &str) -> Option<&LinkAggregates> {
        self.links.get(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn click(at_s: i64, bot: bool, referrer: &str) -> ClassifiedClick {
        ClassifiedClick {
            code: "abc".into(),
            at_s,
            referrer: referrer.into(),
            country: "DE".into(),
            browser: if bot {
                "Slackbot".into()
            } else {
                "Firefox".into()
            },
            os: "Linux".into(),
            bot,
        }
    }

    const T: i64 = 1_700_000_000 - 1_700_000_000 % HOUR_S; // an hour boundary

    #[test]
    fn clicks_fall_into_the_right_hour_across_a_boundary() {
        let mut aggregates = Aggregates::default();
        aggregates.apply(&click(T - 1, false, "direct"));
        aggregates.apply(&click(T, false, "direct"));
        aggregates.apply(&click(T + HOUR_S - 1, false, "direct"));
        aggregates.apply(&click(T + HOUR_S, true, "direct"));
        let query = StatsQuery {
            from_s: T - HOUR_S,
            to_s: T + 2 * HOUR_S,
            granularity: Granularity::Hour,
        };
        let stats = aggregates
            .get("abc")
            .expect("clicked")
            .stats(query, T)
            .expect("stats");
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
        aggregates.apply(&click(T, false, "news.example"));
        aggregates.apply(&click(T, false, "news.example"));
        aggregates.apply(&click(T, false, "t.co"));
        aggregates.apply(&click(T, true, "slack.com"));
        let query = StatsQuery {
            from_s: T,
            to_s: T + DAY_S,
            granularity: Granularity::Day,
        };
        let stats = aggregates
            .get("abc")
            .expect("clicked")
            .stats(query, T)
            .expect("stats");
        assert_eq!(
            stats.referrers,
            vec![("news.example".to_owned(), 2), ("t.co".to_owned(), 1)]
        );
        assert_eq!(stats.browsers, vec![("Firefox".to_owned(), 3)]);
        assert_eq!(stats.bots, vec![("Slackbot".to_owned(), 1)]);
        assert_eq!(stats.countries, vec![("DE".to_owned(), 3)]);
    }

    #[test]
    fn distinct_values_are_capped_into_other() {
        let mut aggregates = Aggregates::default();
        for i in 0..DISTINCT_VALUES_MAX + 5 {
            aggregates.apply(&click(T, false, &format!("r{i}.example")));
        }
        let link = aggregates.get("abc").expect("clicked");
        assert_eq!(link.referrers.len(), DISTINCT_VALUES_MAX + 1);
        assert_eq!(link.referrers.get("other"), Some(&5));
    }

    #[test]
    fn bad_windows_are_refused() {
        let link = LinkAggregates::default();
        let query = |from_s, to_s, granularity| StatsQuery {
            from_s,
            to_s,
            granularity,
        };
        assert_eq!(
            link.stats(query(T, T, Granularity::Hour), T),
            Err(StatsQueryError::EmptyWindow)
        );
        assert_eq!(
            link.stats(query(T - 20_000 * HOUR_S, T, Granularity::Hour), T),
            Err(StatsQueryError::TooManyBuckets)
        );
        assert_eq!(
            link.stats(
                query(T - 5000 * HOUR_S, T - 4000 * HOUR_S, Granularity::Hour),
                T
            ),
            Err(StatsQueryError::HoursNotKept)
        );
        assert!(link
            .stats(query(T - 5000 * HOUR_S, T, Granularity::Day), T)
            .is_ok());
    }

    #[test]
    fn pruning_drops_only_old_hours() {
        let mut aggregates = Aggregates::default();
        aggregates.apply(&click(T - (HOURS_KEPT + 1) * HOUR_S, false, "direct"));
        aggregates.apply(&click(T, false, "direct"));
        aggregates.prune(T);
        let link = aggregates.get("abc").expect("clicked");
        assert_eq!(link.hours.len(), 1);
        assert_eq!(link.days.len(), 2);
        assert_eq!(link.total.human, 2);
    }
}
