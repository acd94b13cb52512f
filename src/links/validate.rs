//! Validation of long URLs, custom aliases and requested codes (SPEC section 3). Each refusal
//! carries a machine code for the API's `{"error","code"}` body.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use url::{Host, Url};

/// Longest code or alias, in bytes.
pub const CODE_BYTES_MAX: usize = 64;
/// Shortest custom alias, in bytes (generated codes may be shorter only if configured so).
pub const ALIAS_BYTES_MIN: usize = 3;
pub const URL_BYTES_MAX_DEFAULT: usize = 2048;
/// Words no alias may be, because they are (or may become) routes of kurz itself.
pub const RESERVED_WORDS_DEFAULT: &[&str] = &[
    "api",
    "admin",
    "metrics",
    "healthz",
    "readyz",
    "static",
    "assets",
    "login",
    "logout",
    "favicon.ico",
    "robots.txt",
    "docs",
    "openapi",
    "stats",
    "kurz",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("long_url is not a valid absolute URL: {0}")]
    InvalidUrl(String),
    #[error("URL scheme {0:?} is not allowed")]
    SchemeNotAllowed(String),
    #[error("long_url is {bytes} bytes; the limit is {max}")]
    UrlTooLong { bytes: usize, max: usize },
    #[error("the domain {0:?} is blocked")]
    BlockedDomain(String),
    #[error("long_url points at this shortener itself ({0}), which would loop")]
    OwnHost(String),
    #[error("long_url points at a private, loopback or link-local address ({0})")]
    PrivateAddress(String),
    #[error("alias {0:?} must be {ALIAS_BYTES_MIN} to {CODE_BYTES_MAX} characters of A-Z, a-z, 0-9, '_' and '-'")]
    InvalidAlias(String),
    #[error("alias {0:?} is a reserved word")]
    ReservedAlias(String),
}

impl LinkError {
    /// The machine code the API puts in `{"code": ...}`.
    pub fn code(&self) -> &'static str {
        match self {
            LinkError::InvalidUrl(_) => "invalid_url",
            LinkError::SchemeNotAllowed(_) => "scheme_not_allowed",
            LinkError::UrlTooLong { .. } => "url_too_long",
            LinkError::BlockedDomain(_) => "blocked_domain",
            LinkError::OwnHost(_) => "own_host",
            LinkError::PrivateAddress(_) => "private_address",
            LinkError::InvalidAlias(_) => "invalid_alias",
            LinkError::ReservedAlias(_) => "reserved_alias",
        }
    }
}

/// What a long URL must satisfy. Built once from the configuration.
#[derive(Clone, Debug)]
pub struct UrlRules {
    pub url_bytes_max: usize,
    /// Lower-case schemes, without ':'.
    pub schemes_allowed: Vec<String>,
    /// Lower-case hosts; a host is blocked when it or any parent domain is listed.
    pub domains_blocked: HashSet<String>,
    /// Lower-case hosts of this service (from --public-url); links to them would loop.
    pub own_hosts: Vec<String>,
    pub reject_private_addresses: bool,
}

impl Default for UrlRules {
    fn default() -> Self {
        UrlRules {
            url_bytes_max: URL_BYTES_MAX_DEFAULT,
            schemes_allowed: vec!["http".into(), "https".into()],
            domains_blocked: HashSet::new(),
            own_hosts: Vec::new(),
            reject_private_addresses: false,
        }
    }
}

/// Validates a long URL and returns its normalised (WHATWG) serialisation, which is what the
/// store keeps and what `Location` carries.
pub fn long_url(input: &str, rules: &UrlRules) -> Result<String, LinkError> {
    let input = input.trim();
    if input.len() > rules.url_bytes_max {
        return Err(LinkError::UrlTooLong {
            bytes: input.len(),
            max: rules.url_bytes_max,
        });
    }
    let url = Url::parse(input).map_err(|error| LinkError::InvalidUrl(error.to_string()))?;
    let scheme = url.scheme();
    if !rules
        .schemes_allowed
        .iter()
        .any(|allowed| allowed == scheme)
    {
        return Err(LinkError::SchemeNotAllowed(scheme.to_owned()));
    }
    let host = url
        .host()
        .ok_or_else(|| LinkError::InvalidUrl("the URL has no host".into()))?;
    check_host(&host, rules)?;
    let normalised = String::from(url);
    if normalised.len() > rules.url_bytes_max {
        return Err(LinkError::UrlTooLong {
            bytes: normalised.len(),
            max: rules.url_bytes_max,
        });
    }
    Ok(normalised)
}

fn check_host(host: &Host<&str>, rules: &UrlRules) -> Result<(), LinkError> {
    match host {
        Host::Domain(domain) => {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            if rules.own_hosts.contains(&domain) {
                return Err(LinkError::OwnHost(domain));
            }
            let mut candidate = domain.as_str();
            loop {
                if rules.domains_blocked.contains(candidate) {
                    return Err(LinkError::BlockedDomain(domain.clone()));
                }
                match candidate.split_once('.') {
                    Some((_, parent)) => candidate = parent,
                    None => break,
                }
            }
            if rules.reject_private_addresses
                && (domain == "localhost" || domain.ends_with(".localhost"))
            {
                return Err(LinkError::PrivateAddress(domain));
            }
            Ok(())
        }
        Host::Ipv4(address) => {
            if rules
                .own_hosts
                .iter()
                .any(|own| *own == address.to_string())
            {
                return Err(LinkError::OwnHost(address.to_string()));
            }
            if rules.reject_private_addresses && is_private_v4(address) {
                return Err(LinkError::PrivateAddress(address.to_string()));
            }
            Ok(())
        }
        Host::Ipv6(address) => {
            if rules.reject_private_addresses && is_private_v6(address) {
                return Err(LinkError::PrivateAddress(address.to_string()));
            }
            Ok(())
        }
    }
}

fn is_private_v4(address: &Ipv4Addr) -> bool {
    address.is_private()
        || address.is_loopback()
        || address.is_link_local()
        || address.is_unspecified()
        || address.is_broadcast()
        // 100.64.0.0/10, carrier-grade NAT
        || (address.octets()[0] == 100 && (address.octets()[1] & 0xC0) == 64)
}

fn is_private_v6(address: &Ipv6Addr) -> bool {
    if let Some(mapped) = address.to_ipv4_mapped() {
        return is_private_v4(&mapped);
    }
    let first = address.segments()[0];
    address.is_loopback()
        || address.is_unspecified()
        || (first & 0xFE00) == 0xFC00 // unique local fc00::/7
        || (first & 0xFFC0) == 0xFE80 // link local fe80::/10
}

/// Whether `code` could be a code at all: 1–64 bytes of `[A-Za-z0-9_-]`. Cheap enough for the
/// redirect path, which answers 404 without touching the store when this fails.
pub fn is_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= CODE_BYTES_MAX
        && code
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

/// Validates a custom alias: 3–64 of `[A-Za-z0-9_-]`, not a reserved word (compared without
/// regard to case, so `API` is as reserved as `api`).
pub fn alias(alias: &str, reserved_words: &[String]) -> Result<(), LinkError> {
    if alias.len() < ALIAS_BYTES_MIN || !is_code(alias) {
        return Err(LinkError::InvalidAlias(alias.to_owned()));
    }
    if reserved_words
        .iter()
        .any(|word| word.eq_ignore_ascii_case(alias))
    {
        return Err(LinkError::ReservedAlias(alias.to_owned()));
    }
    Ok(())
}

/// The default reserved words, owned.
pub fn reserved_words_default() -> Vec<String> {
    RESERVED_WORDS_DEFAULT
        .iter()
        .map(|word| (*word).to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_normalises_http_urls() {
        let rules = UrlRules::default();
        assert_eq!(
            long_url("HTTPS://Example.COM/a b?x=1", &rules),
            Ok("https://example.com/a%20b?x=1".to_owned())
        );
        assert_eq!(
            long_url("http://bücher.example/", &rules),
            Ok("http://xn--bcher-kva.example/".to_owned())
        );
    }

    #[test]
    fn refuses_bad_urls_with_their_machine_codes() {
        let rules = UrlRules::default();
        let code = |input: &str| long_url(input, &rules).map_err(|e| e.code());
        assert_eq!(code("not a url"), Err("invalid_url"));
        assert_eq!(code("/relative/path"), Err("invalid_url"));
        assert_eq!(code("javascript:alert(1)"), Err("scheme_not_allowed"));
        assert_eq!(code("data:text/html,hi"), Err("scheme_not_allowed"));
        assert_eq!(code("vbscript:x"), Err("scheme_not_allowed"));
        assert_eq!(code("ftp://example.com/"), Err("scheme_not_allowed"));
        assert_eq!(code("file:///etc/passwd"), Err("scheme_not_allowed"));
        let long = format!("https://example.com/{}", "a".repeat(3000));
        assert_eq!(code(&long), Err("url_too_long"));
    }

    #[test]
    fn blocklist_covers_subdomains_only() {
        let rules = UrlRules {
            domains_blocked: ["evil.example".to_owned()].into_iter().collect(),
            ..UrlRules::default()
        };
        let code = |input: &str| long_url(input, &rules).map_err(|e| e.code());
        assert_eq!(code("https://evil.example/x"), Err("blocked_domain"));
        assert_eq!(code("https://a.b.EVIL.example/x"), Err("blocked_domain"));
        assert!(code("https://notevil.example/x").is_ok());
    }

    #[test]
    fn own_host_and_private_addresses() {
        let rules = UrlRules {
            own_hosts: vec!["sho.rt".into()],
            reject_private_addresses: true,
            ..UrlRules::default()
        };
        let code = |input: &str| long_url(input, &rules).map_err(|e| e.code());
        assert_eq!(code("https://sho.rt/abc"), Err("own_host"));
        assert_eq!(code("http://127.0.0.1/"), Err("private_address"));
        assert_eq!(code("http://10.1.2.3/"), Err("private_address"));
        assert_eq!(
            code("http://169.254.169.254/latest"),
            Err("private_address")
        );
        assert_eq!(code("http://[::1]/"), Err("private_address"));
        assert_eq!(code("http://[::ffff:192.168.0.1]/"), Err("private_address"));
        assert_eq!(code("http://localhost:8080/"), Err("private_address"));
        assert!(code("http://8.8.8.8/").is_ok());
        let permissive = UrlRules::default();
        assert!(long_url("http://127.0.0.1/", &permissive).is_ok());
    }

    #[test]
    fn alias_rules() {
        let reserved = reserved_words_default();
        assert_eq!(alias("my-link_1", &reserved), Ok(()));
        assert_eq!(
            alias("ab", &reserved).map_err(|e| e.code()),
            Err("invalid_alias")
        );
        assert_eq!(
            alias("a/b", &reserved).map_err(|e| e.code()),
            Err("invalid_alias")
        );
        assert_eq!(
            alias("héllo", &reserved).map_err(|e| e.code()),
            Err("invalid_alias")
        );
        assert_eq!(
            alias(&"a".repeat(65), &reserved).map_err(|e| e.code()),
            Err("invalid_alias")
        );
        assert_eq!(
            alias("API", &reserved).map_err(|e| e.code()),
            Err("reserved_alias")
        );
        assert_eq!(
            alias("metrics", &reserved).map_err(|e| e.code()),
            Err("reserved_alias")
        );
    }

    #[test]
    fn code_charset() {
        assert!(is_code("aZ09_-"));
        assert!(!is_code(""));
        assert!(!is_code("a.b"));
        assert!(!is_code("%41"));
        assert!(!is_code(&"a".repeat(65)));
    }
}
