//! One link as the store keeps it: the owned [`Link`] that writes carry, and the borrowed
//! [`LinkView`] that lookups hand out without copying. Owns the field encodings shared by the
//! snapshot and the WAL; knows nothing of HTTP, JSON or validation rules.

use rkyv::{Archive, Deserialize, Serialize};

/// Lifecycle state of a link. A deleted link is a tombstone: it answers 410 and its code is never
/// handed out again.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum LinkStatus {
    Active,
    Disabled,
    Deleted,
}

/// The HTTP redirect statuses a link may ask for.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum RedirectStatus {
    MovedPermanently,
    Found,
    TemporaryRedirect,
    PermanentRedirect,
}

impl RedirectStatus {
    pub fn code(self) -> u16 {
        match self {
            RedirectStatus::MovedPermanently => 301,
            RedirectStatus::Found => 302,
            RedirectStatus::TemporaryRedirect => 307,
            RedirectStatus::PermanentRedirect => 308,
        }
    }

    pub fn from_code(code: u16) -> Option<RedirectStatus> {
        match code {
            301 => Some(RedirectStatus::MovedPermanently),
            302 => Some(RedirectStatus::Found),
            307 => Some(RedirectStatus::TemporaryRedirect),
            308 => Some(RedirectStatus::PermanentRedirect),
            _ => None,
        }
    }
}

/// Everything about a link except its two strings. `Copy`, so lookups hand it out by value.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkMeta {
    /// Unix seconds, UTC.
    pub created_at_s: i64,
    /// Unix seconds, UTC.
    pub updated_at_s: i64,
    /// Unix seconds, UTC; after it the link answers 410.
    pub expires_at_s: Option<i64>,
    /// After this many redirects the link answers 410.
    pub max_clicks: Option<u64>,
    /// None means the instance default.
    pub redirect_status: Option<RedirectStatus>,
    pub status: LinkStatus,
    /// Whether the caller chose the code.
    pub custom: bool,
    /// Whether the request's query string is appended to the target.
    pub forward_query: bool,
}

impl LinkMeta {
    /// Meta of a fresh, active link with no options, created and updated at `now_s`.
    pub fn new(now_s: i64) -> LinkMeta {
        LinkMeta {
            created_at_s: now_s,
            updated_at_s: now_s,
            expires_at_s: None,
            max_clicks: None,
            redirect_status: None,
            status: LinkStatus::Active,
            custom: false,
            forward_query: false,
        }
    }
}

/// An owned link: what a write carries into the WAL and the overlay.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub code: String,
    pub long_url: String,
    pub meta: LinkMeta,
}

impl Link {
    pub fn view(&self) -> LinkView<'_> {
        LinkView {
            code: &self.code,
            long_url: LongUrl::whole(&self.long_url),
            meta: self.meta,
        }
    }
}

/// A link borrowed from wherever it lives (the mapped snapshot or the overlay), valid for the
/// duration of a lookup callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkView<'a> {
    pub code: &'a str,
    pub long_url: LongUrl<'a>,
    pub meta: LinkMeta,
}

impl LinkView<'_> {
    pub fn to_link(&self) -> Link {
        Link {
            code: self.code.to_owned(),
            long_url: self.long_url.to_string(),
            meta: self.meta,
        }
    }
}

/// The scheme prefixes a snapshot stores in one byte instead of their text, longest first (the
/// first that a URL starts with is the one it is stored with).
pub const URL_PREFIXES: [&str; 4] = ["https://www.", "http://www.", "https://", "http://"];

/// A link's target as it is stored: a common scheme prefix (one of [`URL_PREFIXES`], or
/// nothing) and the rest of the URL. Compared and printed as the whole URL; a writer of bytes
/// sends [`Self::parts`] one after the other.
#[derive(Clone, Copy, Debug)]
pub struct LongUrl<'a> {
    prefix: &'static str,
    rest: &'a str,
}

impl<'a> LongUrl<'a> {
    /// `url` in one piece.
    pub fn whole(url: &'a str) -> LongUrl<'a> {
        LongUrl {
            prefix: "",
            rest: url,
        }
    }

    /// The URL made of the [`URL_PREFIXES`] entry `prefix` (none if out of range) and `rest`.
    pub fn prefixed(prefix: usize, rest: &'a str) -> LongUrl<'a> {
        LongUrl {
            prefix: URL_PREFIXES.get(prefix).copied().unwrap_or(""),
            rest,
        }
    }

    /// Which of [`URL_PREFIXES`] the URL starts with, and the URL after it.
    pub fn split_prefix(&self) -> (Option<usize>, &'a str) {
        if !self.prefix.is_empty() {
            let index = URL_PREFIXES.iter().position(|known| *known == self.prefix);
            return (index, self.rest);
        }
        URL_PREFIXES
            .iter()
            .enumerate()
            .find_map(|(index, known)| Some((Some(index), self.rest.strip_prefix(known)?)))
            .unwrap_or((None, self.rest))
    }

    /// The prefix and the rest, in the order they make the URL.
    pub fn parts(&self) -> [&'a str; 2] {
        [self.prefix, self.rest]
    }

    pub fn len(&self) -> usize {
        self.prefix.len() + self.rest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn bytes(&self) -> impl Iterator<Item = u8> + 'a {
        self.prefix.bytes().chain(self.rest.bytes())
    }
}

impl PartialEq for LongUrl<'_> {
    fn eq(&self, other: &LongUrl<'_>) -> bool {
        self.len() == other.len() && self.bytes().eq(other.bytes())
    }
}

impl Eq for LongUrl<'_> {}

impl PartialEq<str> for LongUrl<'_> {
    fn eq(&self, other: &str) -> bool {
        other
            .strip_prefix(self.prefix)
            .is_some_and(|rest| rest == self.rest)
    }
}

impl PartialEq<&str> for LongUrl<'_> {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

impl std::fmt::Display for LongUrl<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.prefix)?;
        formatter.write_str(self.rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_splits_at_its_longest_known_prefix() {
        let split = |url| LongUrl::whole(url).split_prefix();
        assert_eq!(split("https://www.a.example/"), (Some(0), "a.example/"));
        assert_eq!(split("http://www.a.example/"), (Some(1), "a.example/"));
        assert_eq!(split("https://a.example/"), (Some(2), "a.example/"));
        assert_eq!(split("http://wwwa.example/"), (Some(3), "wwwa.example/"));
        assert_eq!(split("ftp://a.example/"), (None, "ftp://a.example/"));
        let stored = LongUrl::prefixed(2, "a.example/");
        assert_eq!(stored.split_prefix(), (Some(2), "a.example/"));
    }

    #[test]
    fn urls_compare_by_their_whole_text() {
        let stored = LongUrl::prefixed(0, "a.example/");
        assert_eq!(stored, LongUrl::whole("https://www.a.example/"));
        assert_eq!(stored, "https://www.a.example/");
        assert_ne!(stored, LongUrl::whole("https://www.a.example"));
        assert_ne!(stored, "http://www.a.example/");
        assert_eq!(stored.to_string(), "https://www.a.example/");
        assert_eq!(stored.len(), 22);
    }
}
