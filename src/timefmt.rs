//! Time as kurz stores and shows it: unix seconds (UTC) inside, RFC 3339 text at the edges
//! (JSON, export files, logs). One definition for the API, the data-file commands and analytics.

use std::time::{SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Unix seconds now (0 if the clock is before 1970).
pub fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as i64)
}

/// Unix seconds from the kernel's coarse clock (updated every few ms, read without touching
/// the hardware clock): for the redirect path, which needs whole seconds on every request.
pub fn now_s_coarse() -> i64 {
    #[cfg(target_os = "linux")]
    {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid timespec the call writes into.
        if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut now) } == 0 {
            return now.tv_sec;
        }
    }
    now_s()
}

/// RFC 3339 (UTC) text of unix seconds; the bare number if it is out of range.
pub fn rfc3339(unix_s: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix_s)
        .ok()
        .and_then(|time| time.format(&Rfc3339).ok())
        .unwrap_or_else(|| unix_s.to_string())
}

/// Unix seconds of an RFC 3339 timestamp.
pub fn parse_rfc3339(text: &str) -> Result<i64, String> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map(|time| time.unix_timestamp())
        .map_err(|error| format!("{text:?} is not an RFC 3339 timestamp: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        assert_eq!(rfc3339(1_714_557_600), "2024-05-01T10:00:00Z");
        assert_eq!(
            parse_rfc3339("2024-05-01T12:00:00+02:00"),
            Ok(1_714_557_600)
        );
        assert!(parse_rfc3339("yesterday").is_err());
        assert!(now_s() > 1_700_000_000);
    }
}
