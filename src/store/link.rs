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
            long_url: &self.long_url,
            meta: self.meta,
        }
    }
}

/// A link borrowed from wherever it lives (the mapped snapshot or the overlay), valid for the
/// duration of a lookup callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkView<'a> {
    pub code: &'a str,
    pub long_url: &'a str,
    pub meta: LinkMeta,
}

impl LinkView<'_> {
    pub fn to_link(&self) -> Link {
        Link {
            code: self.code.to_owned(),
            long_url: self.long_url.to_owned(),
            meta: self.meta,
        }
    }
}
