//! Referrer domains: the host of a `Referer` header, lower-cased and without a leading `www.`,
//! so `https://www.Example.com/a?b` and `http://example.com/` count as one referrer. Pure.

/// Longest referrer domain kept, in bytes; a longer host is counted as "invalid".
pub const DOMAIN_BYTES_MAX: usize = 253;
/// The bucket for clicks without a referrer.
pub const DIRECT: &str = "direct";
const INVALID: &str = "invalid";

/// The referrer domain of a `Referer` header value (`None`: no header).
pub fn domain(referer: Option<&str>) -> String {
    let Some(referer) = referer.map(str::trim).filter(|r| !r.is_empty()) else {
        return DIRECT.to_owned();
    };
    let host = url::Url::parse(referer)
        .ok()
        .and_then(|url| url.host_str().map(str::to_ascii_lowercase));
    match host {
        Some(host) if host.len() <= DOMAIN_BYTES_MAX => {
            let host = host.trim_end_matches('.');
            host.strip_prefix("www.").unwrap_or(host).to_owned()
        }
        _ => INVALID.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_normalised() {
        assert_eq!(domain(Some("https://www.Example.com/a?b=1")), "example.com");
        assert_eq!(
            domain(Some("http://news.ycombinator.com/item?id=1")),
            "news.ycombinator.com"
        );
        assert_eq!(domain(Some("https://t.co/abc")), "t.co");
        assert_eq!(domain(Some("android-app://com.slack/")), "com.slack");
        assert_eq!(
            domain(Some("https://xn--bcher-kva.example./")),
            "xn--bcher-kva.example"
        );
    }

    #[test]
    fn missing_and_garbage_referrers() {
        assert_eq!(domain(None), DIRECT);
        assert_eq!(domain(Some("  ")), DIRECT);
        assert_eq!(domain(Some("not a url")), "invalid");
        assert_eq!(domain(Some("about:blank")), "invalid");
    }
}
