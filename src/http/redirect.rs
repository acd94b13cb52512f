//! The hot path: `GET /{code}` and `HEAD /{code}` answered from memory with a redirect, 404 or
//! 410 (SPEC section 3). [`decide`] is shared by the hyper path and the lean HTTP/1.1 fast path
//! (`fast`); each renders the verdict its own way. Never takes a lock shared by all workers,
//! never does disk I/O, and never writes to the store; the only shared writes are the link's
//! click counter and the metrics.

use std::net::IpAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode};

use super::{error_for, App, ClickEvents, Response};
use crate::analytics::CountHints;
use crate::links::lifecycle::{self, Gone};
use crate::links::validate;
use crate::store::link::{LongUrl, RedirectStatus};
use crate::store::snapshot::Probe;
use crate::store::{LookupHints, Store};

pub const CACHE_CONTROL_TEMPORARY: &str = "private, max-age=0";

/// What `/{code}` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// The store is still opening.
    NotReady,
    NotFound,
    /// Cluster mode: the code's shard is held by other nodes (the load balancer misrouted it).
    Misdirected,
    Gone(Gone),
    Redirect {
        status: RedirectStatus,
        long_url: LongUrl<'a>,
        /// The request's query, to append to `long_url` (only when the link forwards queries).
        query: Option<&'a str>,
        /// Seconds caches may keep a permanent redirect: the configured max-age, or less when
        /// the link expires sooner (a cache must not outlive the link). None for 302 and 307.
        max_age_s: Option<u64>,
    },
}

impl Verdict<'_> {
    /// Status code, machine code and text of an error verdict.
    pub fn error(&self) -> Option<(StatusCode, &'static str, &'static str)> {
        match self {
            Verdict::NotReady => Some((
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "the server is starting; retry in a moment",
            )),
            Verdict::NotFound => {
                Some((StatusCode::NOT_FOUND, "not_found", "no link has this code"))
            }
            Verdict::Misdirected => Some((
                StatusCode::MISDIRECTED_REQUEST,
                "wrong_shard",
                "this node does not hold the shard of this code; route it to its shard group",
            )),
            Verdict::Gone(gone) => Some((StatusCode::GONE, gone.code(), gone.message())),
            Verdict::Redirect { .. } => None,
        }
    }
}

/// What a redirect's request says about its client, for click analytics; borrowed from the
/// request's headers, copied only if the click is served.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClickContext<'a> {
    pub peer: Option<IpAddr>,
    pub referer: Option<&'a [u8]>,
    pub user_agent: Option<&'a [u8]>,
    pub forwarded_for: Option<&'a [u8]>,
    /// The value of the configured country header.
    pub country: Option<&'a [u8]>,
}

impl<'a> ClickContext<'a> {
    fn of(app: &App, headers: &'a HeaderMap, peer: IpAddr) -> ClickContext<'a> {
        let value = |name: &str| headers.get(name).map(HeaderValue::as_bytes);
        ClickContext {
            peer: Some(peer),
            referer: value("referer"),
            user_agent: value("user-agent"),
            forwarded_for: value("x-forwarded-for"),
            country: app.config.country_header.as_deref().and_then(value),
        }
    }
}

/// Decides what `path` (with `query`) answers at `now_s` (unix seconds) and hands the verdict
/// to `render` while the link is borrowed from the store, so the target is never copied on the
/// way. A GET counts a click (and is refused once a click cap is reached) and hands its event
/// to `events`; a HEAD only looks.
pub fn decide<R>(
    app: &App,
    head: bool,
    (path, query): (&str, Option<&str>),
    click: &ClickContext<'_>,
    events: ClickEvents<'_>,
    now_s: i64,
    render: impl FnOnce(Verdict<'_>) -> R,
) -> R {
    let code = path.strip_prefix('/').unwrap_or(path);
    if !validate::is_code(code) {
        return render(Verdict::NotFound);
    }
    let Some(store) = app.store() else {
        return render(Verdict::NotReady);
    };
    store.lookup_placed(code, |link, slot| {
        let Some(link) = link else {
            // Only misses pay for the shard check.
            return render(if app.misdirected(code) {
                Verdict::Misdirected
            } else {
                Verdict::NotFound
            });
        };
        if let Err(gone) = lifecycle::check(&link.meta, now_s) {
            return render(Verdict::Gone(gone));
        }
        let cap = app.click_cap(code, link.meta.max_clicks);
        let served = if head {
            !app.clicks.capped(code, cap)
        } else {
            app.clicks.record(code, slot, cap, now_s)
        };
        if !served {
            return render(Verdict::Gone(Gone::ClickCapReached));
        }
        if !head {
            app.record_click(code, now_s, click, events);
        }
        let status = link
            .meta
            .redirect_status
            .unwrap_or(app.config.redirect_status_default);
        let max_age_s = match status {
            RedirectStatus::MovedPermanently | RedirectStatus::PermanentRedirect => {
                let until_expiry_s = link.meta.expires_at_s.map_or(u64::MAX, |expires_at_s| {
                    (expires_at_s - now_s).max(0) as u64
                });
                Some(app.config.cache_max_age_s.min(until_expiry_s))
            }
            RedirectStatus::Found | RedirectStatus::TemporaryRedirect => None,
        };
        render(Verdict::Redirect {
            status,
            long_url: link.long_url,
            query: query.filter(|query| link.meta.forward_query && !query.is_empty()),
            max_age_s,
        })
    })
}

/// Memory hints for a round of redirects about to be answered, taken once per round: lets a
/// loop over many ready requests overlap their cache misses before it answers them. Hints
/// only: [`decide`] alone decides what they get. Drop it at the end of the round.
pub struct Hints {
    lookups: Option<LookupHints>,
    counts: CountHints,
}

impl Hints {
    pub fn new(app: &App) -> Hints {
        Hints {
            lookups: app.store().map(Store::lookup_hints),
            counts: app.clicks.hints(),
        }
    }

    /// The first of two hints for a redirect: starts loading the snapshot table slot of
    /// `code`.
    pub fn prefetch_slot(&self, code: &[u8]) -> Option<Probe> {
        Some(self.lookups.as_ref()?.prefetch_slot(code))
    }

    /// The second, once the slot is in cache: starts loading the link's record and its click
    /// count.
    pub fn prefetch_record(&self, probe: Probe) {
        if let Some(slot) = self
            .lookups
            .as_ref()
            .and_then(|lookups| lookups.prefetch_record(probe))
        {
            self.counts.prefetch(slot);
        }
    }
}

/// Writes the `Location` of a redirect into `out`: the long URL, with the request's query
/// appended before any fragment. Bytes of the query that may not stand in a URL as they are
/// (controls, spaces, non-ASCII) are percent-encoded, so whatever query a client sends, the
/// answer is a valid `Location` and the same on both paths.
pub fn write_location(out: &mut Vec<u8>, long_url: LongUrl<'_>, query: Option<&str>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    // A scheme prefix holds neither '?' nor '#'.
    let [prefix, rest] = long_url.parts();
    out.extend_from_slice(prefix.as_bytes());
    let Some(query) = query else {
        out.extend_from_slice(rest.as_bytes());
        return;
    };
    let (base, fragment) = match rest.find('#') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    out.extend_from_slice(base.as_bytes());
    out.push(if base.contains('?') { b'&' } else { b'?' });
    for &byte in query.as_bytes() {
        if (b'!'..=b'~').contains(&byte) {
            out.push(byte);
        } else {
            out.extend_from_slice(&[
                b'%',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 15)],
            ]);
        }
    }
    out.extend_from_slice(fragment.as_bytes());
}

/// The `Cache-Control` of a redirect: `public, max-age=N` for permanent ones (shared caches may
/// keep them), `private, max-age=0` for temporary ones. The common values are built once.
pub fn cache_control(app: &App, max_age_s: Option<u64>) -> HeaderValue {
    static TEMPORARY: HeaderValue = HeaderValue::from_static(CACHE_CONTROL_TEMPORARY);
    match max_age_s {
        None => TEMPORARY.clone(),
        Some(max_age_s) if max_age_s == app.config.cache_max_age_s => {
            app.cache_control_permanent.clone()
        }
        Some(max_age_s) => HeaderValue::from_str(&format!("public, max-age={max_age_s}"))
            .unwrap_or_else(|_| TEMPORARY.clone()),
    }
}

/// Answers a request for `/{code}` through hyper.
pub fn handle<B>(app: &App, request: &Request<B>, peer: IpAddr) -> Response {
    let started = std::time::Instant::now();
    let headers = request.headers();
    let method = request.method();
    let head = method == Method::HEAD;
    let response = if head || method == Method::GET {
        decide(
            app,
            head,
            (request.uri().path(), request.uri().query()),
            &ClickContext::of(app, headers, peer),
            ClickEvents::Direct,
            super::now_s(),
            |verdict| render(app, headers, verdict),
        )
    } else {
        let mut response = error_for(
            headers,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "short links answer GET and HEAD only",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        response
    };
    app.metrics
        .redirect_latency(started.elapsed().as_micros() as u64);
    response
}

fn render(app: &App, headers: &HeaderMap, verdict: Verdict<'_>) -> Response {
    let Verdict::Redirect {
        status,
        long_url,
        query,
        max_age_s,
    } = verdict
    else {
        let (status, code, message) = verdict.error().unwrap_or((
            StatusCode::NOT_FOUND,
            "not_found",
            "no link has this code",
        ));
        return error_for(headers, status, code, message);
    };
    let mut location = Vec::with_capacity(long_url.len() + query.map_or(0, str::len) + 2);
    write_location(&mut location, long_url, query);
    let Ok(location) = HeaderValue::from_maybe_shared(Bytes::from(location)) else {
        return error_for(
            headers,
            StatusCode::INTERNAL_SERVER_ERROR,
            "bad_target",
            "the stored target of this link is not a valid Location",
        );
    };
    let mut response = hyper::Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::from_u16(status.code()).unwrap_or(StatusCode::FOUND);
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, location);
    headers.insert(header::CACHE_CONTROL, cache_control(app, max_age_s));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_goes_before_the_fragment() {
        let at = |url, query| {
            let mut out = Vec::new();
            write_location(&mut out, LongUrl::whole(url), query);
            String::from_utf8(out).expect("ASCII")
        };
        assert_eq!(at("https://a.example/x", None), "https://a.example/x");
        assert_eq!(
            at("https://a.example/x", Some("q=1")),
            "https://a.example/x?q=1"
        );
        assert_eq!(
            at("https://a.example/x?a=b#top", Some("q=1")),
            "https://a.example/x?a=b&q=1#top"
        );
        assert_eq!(
            at("https://a.example/x", Some("name=Jürgen&x=a b\r\n")),
            "https://a.example/x?name=J%C3%BCrgen&x=a%20b%0D%0A"
        );
    }
}
