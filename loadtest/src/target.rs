//! The server under test: turns `--url` into a socket address, a `Host` header and a path prefix.
//! Only plain `http://` is accepted; the generator never speaks TLS, so that the numbers measure
//! the server's redirect path and not a handshake.

use std::net::{SocketAddr, ToSocketAddrs};

use thiserror::Error;

/// Where requests go: the address to connect to, and what to put in front of each request.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Value of the `Host` header: the authority as written in the URL.
    pub host_header: String,
    /// Path before `/{code}`, without a trailing slash; empty for a URL with no path.
    pub path_prefix: String,
}

#[derive(Debug, Error)]
pub enum TargetError {
    #[error("--url {url}: only plain http:// is supported (point it at a plain-HTTP listener)")]
    NotHttp { url: String },
    #[error("--url {url}: {reason}")]
    Malformed { url: String, reason: &'static str },
    #[error("--url {url}: cannot resolve `{authority}`: {source}")]
    Resolve {
        url: String,
        authority: String,
        source: std::io::Error,
    },
}

const HTTP_PORT_DEFAULT: u16 = 80;

impl Target {
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        let malformed = |reason| TargetError::Malformed {
            url: url.to_owned(),
            reason,
        };
        let scheme_end = url
            .find("://")
            .ok_or_else(|| malformed("expected http://HOST:PORT"))?;
        if !url[..scheme_end].eq_ignore_ascii_case("http") {
            return Err(TargetError::NotHttp {
                url: url.to_owned(),
            });
        }
        let rest = &url[scheme_end + 3..];
        let (authority, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(malformed("no host"));
        }
        if authority.contains('@') {
            return Err(malformed("credentials in the URL are not supported"));
        }
        if !is_visible_ascii(authority) || !is_visible_ascii(path) {
            return Err(malformed("only visible ASCII without spaces is allowed"));
        }
        if path.contains(['?', '#']) {
            return Err(malformed("a query or fragment cannot prefix a code"));
        }
        let addr = resolve(authority).map_err(|source| TargetError::Resolve {
            url: url.to_owned(),
            authority: authority.to_owned(),
            source,
        })?;
        Ok(Self {
            addr,
            host_header: authority.to_owned(),
            path_prefix: path.trim_end_matches('/').to_owned(),
        })
    }
}

fn is_visible_ascii(text: &str) -> bool {
    text.bytes().all(|byte| byte.is_ascii_graphic())
}

/// Resolves `host`, `host:port`, `[v6]` or `[v6]:port`, preferring the first address.
fn resolve(authority: &str) -> std::io::Result<SocketAddr> {
    let has_port = match authority.rfind(']') {
        Some(bracket) => authority[bracket..].contains(':'),
        None => authority.contains(':'),
    };
    let mut addrs = if has_port {
        authority.to_socket_addrs()?
    } else {
        let host = authority.trim_start_matches('[').trim_end_matches(']');
        (host, HTTP_PORT_DEFAULT).to_socket_addrs()?
    };
    addrs.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no address for this host")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_port_and_prefix() {
        let target = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(target.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(target.host_header, "127.0.0.1:8080");
        assert_eq!(target.path_prefix, "");

        let target = Target::parse("HTTP://127.0.0.1:9/r/").unwrap();
        assert_eq!(target.path_prefix, "/r");

        let target = Target::parse("http://[::1]").unwrap();
        assert_eq!(target.addr, "[::1]:80".parse().unwrap());
    }

    #[test]
    fn refuses_what_it_cannot_drive() {
        assert!(matches!(
            Target::parse("https://127.0.0.1:8443"),
            Err(TargetError::NotHttp { .. })
        ));
        for bad in [
            "127.0.0.1:8080",
            "http://",
            "http://u:p@127.0.0.1:1",
            "http://127.0.0.1:1/a?b",
            "http://127.0.0.1:1/a b",
        ] {
            assert!(
                matches!(Target::parse(bad), Err(TargetError::Malformed { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            Target::parse("http://127.0.0.1:99999"),
            Err(TargetError::Resolve { .. })
        ));
    }
}
