//! The wire format of one record in the cluster's link stream: a link's whole current state as
//! a JSON object carrying a format version. Owns encoding and decoding only; must never decide
//! anything about what a valid link is beyond what decoding needs.
//!
//! Format version 1 (the message payload, UTF-8 JSON):
//! `{"v":1,"code":"abc","long_url":"https://…","created_at_s":1700000000,"updated_at_s":…,
//! "expires_at_s":null|i64,"max_clicks":null|u64,"redirect_status":null|301|302|307|308,
//! "status":"active"|"disabled"|"deleted","custom":bool,"forward_query":bool}`.
//! JSON rather than rkyv bytes because records are small, rare next to redirects, and an
//! operator can read them with `nats stream get`; the version field lets a later format coexist.

use serde::{Deserialize, Serialize};

use crate::store::link::{Link, LinkMeta, LinkStatus, RedirectStatus};

pub const RECORD_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("not a kurz link record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("record format version {0} is not known to this kurz (knows {RECORD_VERSION}); upgrade this node")]
    Version(u32),
    #[error("record has redirect status {0}, not one of 301, 302, 307, 308")]
    RedirectStatus(u16),
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum WireStatus {
    Active,
    Disabled,
    Deleted,
}

#[derive(Serialize, Deserialize, Debug)]
struct WireRecord {
    v: u32,
    code: String,
    long_url: String,
    created_at_s: i64,
    updated_at_s: i64,
    expires_at_s: Option<i64>,
    max_clicks: Option<u64>,
    redirect_status: Option<u16>,
    status: WireStatus,
    custom: bool,
    forward_query: bool,
}

pub fn encode(link: &Link) -> Vec<u8> {
    let meta = &link.meta;
    let record = WireRecord {
        v: RECORD_VERSION,
        code: link.code.clone(),
        long_url: link.long_url.clone(),
        created_at_s: meta.created_at_s,
        updated_at_s: meta.updated_at_s,
        expires_at_s: meta.expires_at_s,
        max_clicks: meta.max_clicks,
        redirect_status: meta.redirect_status.map(RedirectStatus::code),
        status: match meta.status {
            LinkStatus::Active => WireStatus::Active,
            LinkStatus::Disabled => WireStatus::Disabled,
            LinkStatus::Deleted => WireStatus::Deleted,
        },
        custom: meta.custom,
        forward_query: meta.forward_query,
    };
    serde_json::to_vec(&record).expect("strings, integers and enums always serialise to JSON")
}

pub fn decode(bytes: &[u8]) -> Result<Link, RecordError> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let version: Version = serde_json::from_slice(bytes)?;
    if version.v != RECORD_VERSION {
        return Err(RecordError::Version(version.v));
    }
    let record: WireRecord = serde_json::from_slice(bytes)?;
    let redirect_status = match record.redirect_status {
        None => None,
        Some(code) => {
            Some(RedirectStatus::from_code(code).ok_or(RecordError::RedirectStatus(code))?)
        }
    };
    Ok(Link {
        code: record.code,
        long_url: record.long_url,
        meta: LinkMeta {
            created_at_s: record.created_at_s,
            updated_at_s: record.updated_at_s,
            expires_at_s: record.expires_at_s,
            max_clicks: record.max_clicks,
            redirect_status,
            status: match record.status {
                WireStatus::Active => LinkStatus::Active,
                WireStatus::Disabled => LinkStatus::Disabled,
                WireStatus::Deleted => LinkStatus::Deleted,
            },
            custom: record.custom,
            forward_query: record.forward_query,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_link() -> Link {
        Link {
            code: "abc_-9".into(),
            long_url: "https://example.com/a?b=\"c\"".into(),
            meta: LinkMeta {
                created_at_s: 1_700_000_000,
                updated_at_s: 1_700_000_100,
                expires_at_s: Some(1_800_000_000),
                max_clicks: Some(5),
                redirect_status: Some(RedirectStatus::PermanentRedirect),
                status: LinkStatus::Disabled,
                custom: true,
                forward_query: true,
            },
        }
    }

    #[test]
    fn every_field_round_trips() {
        let link = full_link();
        assert_eq!(decode(&encode(&link)).expect("decode"), link);
        let mut plain = Link {
            code: "x".into(),
            long_url: "https://e.org".into(),
            meta: LinkMeta::new(1),
        };
        assert_eq!(decode(&encode(&plain)).expect("decode"), plain);
        plain.meta.status = LinkStatus::Deleted;
        assert_eq!(decode(&encode(&plain)).expect("decode"), plain);
    }

    #[test]
    fn version_one_is_what_it_says() {
        let text = String::from_utf8(encode(&full_link())).expect("utf-8");
        assert!(text.starts_with(r#"{"v":1,"code":"abc_-9""#), "{text}");
        assert!(text.contains(r#""redirect_status":308"#), "{text}");
        assert!(text.contains(r#""status":"disabled""#), "{text}");
    }

    #[test]
    fn bad_records_are_refused() {
        assert!(matches!(decode(b"not json"), Err(RecordError::Json(_))));
        assert!(matches!(
            decode(br#"{"v":2,"anything":true}"#),
            Err(RecordError::Version(2))
        ));
        let text = String::from_utf8(encode(&full_link()))
            .expect("utf-8")
            .replace("308", "399");
        assert!(matches!(
            decode(text.as_bytes()),
            Err(RecordError::RedirectStatus(399))
        ));
        assert!(matches!(
            decode(br#"{"v":1,"code":"x"}"#),
            Err(RecordError::Json(_))
        ));
    }
}
