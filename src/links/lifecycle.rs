//! The life of a link: whether it may redirect now or answers 410 Gone, and why. Pure functions
//! over a link's meta and the time; click caps are counted elsewhere (analytics) and only judged
//! here. Never touches the store or a counter.

use crate::store::link::{LinkMeta, LinkStatus};

/// Why a link no longer redirects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gone {
    Deleted,
    Disabled,
    Expired,
    ClickCapReached,
}

impl Gone {
    /// The machine code of the 410 answer.
    pub fn code(self) -> &'static str {
        match self {
            Gone::Deleted => "deleted",
            Gone::Disabled => "disabled",
            Gone::Expired => "expired",
            Gone::ClickCapReached => "click_cap_reached",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Gone::Deleted => "this link was deleted",
            Gone::Disabled => "this link is disabled",
            Gone::Expired => "this link has expired",
            Gone::ClickCapReached => "this link has reached its click limit",
        }
    }
}

/// Whether a link with `meta` may redirect at `now_s` (unix seconds), caps aside.
pub fn check(meta: &LinkMeta, now_s: i64) -> Result<(), Gone> {
    match meta.status {
        LinkStatus::Deleted => Err(Gone::Deleted),
        LinkStatus::Disabled => Err(Gone::Disabled),
        LinkStatus::Active => match meta.expires_at_s {
            Some(expires_at_s) if now_s >= expires_at_s => Err(Gone::Expired),
            _ => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_expiry_decide() {
        let mut meta = LinkMeta::new(100);
        assert_eq!(check(&meta, 100), Ok(()));
        meta.expires_at_s = Some(200);
        assert_eq!(check(&meta, 199), Ok(()));
        assert_eq!(check(&meta, 200), Err(Gone::Expired));
        meta.status = LinkStatus::Disabled;
        assert_eq!(check(&meta, 0), Err(Gone::Disabled));
        meta.status = LinkStatus::Deleted;
        assert_eq!(check(&meta, 0), Err(Gone::Deleted));
    }
}
