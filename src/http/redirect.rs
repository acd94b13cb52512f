//! The hot path: `GET /{code}` and `HEAD /{code}` answered from memory with a redirect, 404 or
//! 410 (SPEC section 3). Never takes a lock shared by all workers, never does disk I/O, and never
//! writes to the store; the only shared writes are the link's click counter and the metrics.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode};

use super::{error_for, App, Response};
use crate::links::lifecycle::{self, Gone};
use crate::links::validate;
use crate::store::link::RedirectStatus;

static CACHE_CONTROL_TEMPORARY: HeaderValue = HeaderValue::from_static("private, max-age=0");

enum Outcome {
    NotFound,
    Gone(Gone),
    Redirect(RedirectStatus, Result<HeaderValue, ()>),
}

/// Answers a request for `/{code}` and records its latency.
pub fn handle<B>(app: &App, request: &Request<B>) -> Response {
    let started = Instant::now();
    let response = answer(app, request);
    app.metrics
        .redirect_latency(started.elapsed().as_micros() as u64);
    response
}

fn answer<B>(app: &App, request: &Request<B>) -> Response {
    let headers = request.headers();
    let method = request.method();
    let head = method == Method::HEAD;
    if !head && method != Method::GET {
        let mut response = error_for(
            headers,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "short links answer GET and HEAD only",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let path = request.uri().path();
    let code = path.strip_prefix('/').unwrap_or(path);
    if !validate::is_code(code) {
        return not_found(headers);
    }
    let Some(store) = app.store() else {
        return error_for(
            headers,
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the server is starting; retry in a moment",
        );
    };
    let now_s = super::now_s();
    let query = request.uri().query();
    let outcome = store.lookup(code, |link| {
        let Some(link) = link else {
            return Outcome::NotFound;
        };
        if let Err(gone) = lifecycle::check(&link.meta, now_s) {
            return Outcome::Gone(gone);
        }
        let served = if head {
            !app.clicks.capped(code, link.meta.max_clicks)
        } else {
            app.clicks.record(code, link.meta.max_clicks, now_s)
        };
        if !served {
            return Outcome::Gone(Gone::ClickCapReached);
        }
        let status = link
            .meta
            .redirect_status
            .unwrap_or(app.config.redirect_status_default);
        let query = query.filter(|query| link.meta.forward_query && !query.is_empty());
        Outcome::Redirect(status, location(link.long_url, query))
    });
    match outcome {
        Outcome::NotFound => not_found(headers),
        Outcome::Gone(gone) => error_for(headers, StatusCode::GONE, gone.code(), gone.message()),
        Outcome::Redirect(_, Err(())) => error_for(
            headers,
            StatusCode::INTERNAL_SERVER_ERROR,
            "bad_target",
            "the stored target of this link is not a valid Location",
        ),
        Outcome::Redirect(status, Ok(location)) => redirect(app, status, location),
    }
}

fn not_found(headers: &HeaderMap) -> Response {
    error_for(
        headers,
        StatusCode::NOT_FOUND,
        "not_found",
        "no link has this code",
    )
}

/// The `Location` of a redirect: the long URL, with the request's query appended (before any
/// fragment) when the link forwards queries.
fn location(long_url: &str, query: Option<&str>) -> Result<HeaderValue, ()> {
    let bytes = match query {
        None => Bytes::copy_from_slice(long_url.as_bytes()),
        Some(query) => {
            let (base, fragment) = match long_url.find('#') {
                Some(at) => long_url.split_at(at),
                None => (long_url, ""),
            };
            let separator = if base.contains('?') { "&" } else { "?" };
            Bytes::from([base, separator, query, fragment].concat())
        }
    };
    HeaderValue::from_maybe_shared(bytes).map_err(|_| ())
}

fn redirect(app: &App, status: RedirectStatus, location: HeaderValue) -> Response {
    let mut response = hyper::Response::new(Full::new(Bytes::new()));
    let (status, cache_control) = match status {
        RedirectStatus::MovedPermanently => (
            StatusCode::MOVED_PERMANENTLY,
            app.cache_control_permanent.clone(),
        ),
        RedirectStatus::PermanentRedirect => (
            StatusCode::PERMANENT_REDIRECT,
            app.cache_control_permanent.clone(),
        ),
        RedirectStatus::Found => (StatusCode::FOUND, CACHE_CONTROL_TEMPORARY.clone()),
        RedirectStatus::TemporaryRedirect => (
            StatusCode::TEMPORARY_REDIRECT,
            CACHE_CONTROL_TEMPORARY.clone(),
        ),
    };
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, location);
    headers.insert(header::CACHE_CONTROL, cache_control);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_goes_before_the_fragment() {
        let at = |url, query| location(url, query).map(|value| value.as_bytes().to_vec());
        assert_eq!(
            at("https://a.example/x", None),
            Ok(b"https://a.example/x".to_vec())
        );
        assert_eq!(
            at("https://a.example/x", Some("q=1")),
            Ok(b"https://a.example/x?q=1".to_vec())
        );
        assert_eq!(
            at("https://a.example/x?a=b#top", Some("q=1")),
            Ok(b"https://a.example/x?a=b&q=1#top".to_vec())
        );
    }
}
