//! The JSON API under `/api/v1/` (SPEC section 3): create (one or a batch), read, change and
//! delete links, click totals, and the OpenAPI document. Owns request parsing, authentication and
//! rate limiting of API calls and the `{"error","code"}` answers; never touches a file, writes
//! only through the link service (`crate::service`, local store or cluster node alike) and
//! acknowledges a write only after the service says it is durable.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use super::{json as json_response, now_s, parse_rfc3339, rfc3339, App, Response};
use crate::analytics::aggregate::{Granularity, LinkStats, StatsQuery};
use crate::auth::{KeyRefusal, Principal, Scope};
use crate::links::codegen::{self, random_code, CodeStrategy};
use crate::links::lifecycle::{self, Gone};
use crate::links::validate::{self, LinkError, CODE_BYTES_MAX};
use crate::metrics::Route;
use crate::service::WriteError;
use crate::store::link::{Link, LinkMeta, LinkStatus, RedirectStatus};

/// Most items in one batch create.
pub const BATCH_ITEMS_MAX: usize = 1000;
/// Draws of a generated code before giving up; the length grows by one every
/// [`CODE_DRAWS_PER_LENGTH`] collisions.
const CODE_DRAWS_MAX: usize = 16;
const CODE_DRAWS_PER_LENGTH: usize = 4;
/// Retries of a write that found another write on the same code in flight.
const BUSY_RETRIES_MAX: u32 = 5;
const BUSY_RETRY_SLEEP_MS: u64 = 2;
/// Alternatives offered when an alias is taken.
const SUGGESTIONS_MAX: usize = 3;
const SUGGESTION_DRAWS_MAX: usize = 20;
/// Longest `expires_in` accepted: 100 years.
const EXPIRES_IN_S_MAX: i64 = 100 * 365 * 86_400;

static OPENAPI_JSON: &str = include_str!("openapi.json");

/// An API error: status, machine code, human text, and extra fields for the body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Option<(&'static str, Value)>,
    retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: None,
            retry_after_s: None,
        }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn body(&self) -> Value {
        let mut body = json!({ "error": self.message, "code": self.code });
        if let (Some((key, value)), Some(object)) = (&self.extra, body.as_object_mut()) {
            object.insert((*key).to_owned(), value.clone());
        }
        body
    }

    pub fn into_response(self) -> Response {
        let mut response = json_response(self.status, &self.body());
        let headers = response.headers_mut();
        if let Some(retry_after_s) = self.retry_after_s {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"kurz\""),
            );
        }
        response
    }
}

impl From<LinkError> for ApiError {
    fn from(error: LinkError) -> ApiError {
        ApiError::bad_request(error.code(), error.to_string())
    }
}

fn not_ready() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        "the server is starting; retry in a moment",
    )
}

/// The answer to a write the link service refused or failed. Callers handle `CodeTaken` (with
/// suggestions) and `Busy` (retried) themselves where they can.
fn write_failed(error: WriteError) -> ApiError {
    match error {
        WriteError::CodeTaken(code) => ApiError::new(
            StatusCode::CONFLICT,
            "alias_taken",
            format!("the code {code:?} is taken"),
        ),
        WriteError::NotFound(_) => not_found(),
        WriteError::Busy(_) => ApiError::new(
            StatusCode::CONFLICT,
            "busy",
            "another change to this link is in progress; retry",
        ),
        WriteError::InvalidCode(code) => ApiError::bad_request(
            "invalid_code",
            format!("{code:?} is not a valid code (1-64 of A-Z a-z 0-9 _ -)"),
        ),
        WriteError::WrongShard {
            code,
            shard,
            held,
            shards,
        } => ApiError {
            extra: Some(("shard", json!(shard))),
            ..ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "wrong_shard",
                format!("code {code:?} is in shard {shard} of {shards} and this node holds shards {held:?}: send the request to a node of shard {shard}'s group"),
            )
        },
        WriteError::Lagging {
            seq, applied_seq, ..
        } => {
            tracing::warn!("write {seq} is durable but this node has applied only {applied_seq}");
            ApiError {
                retry_after_s: Some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "node_lagging",
                    format!("the write is durable in the cluster (log record {seq}) but this node lags behind the log and has not applied it yet; it becomes visible shortly, so read it back rather than repeating it"),
                )
            }
        }
        WriteError::Store(error) => {
            tracing::error!("store write failed: {error}");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the link store cannot take writes right now; nothing was changed",
            )
        }
        WriteError::Cluster(error) => {
            tracing::error!("cluster write failed: {error}");
            ApiError {
                retry_after_s: Some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cluster_unavailable",
                    "NATS JetStream cannot take writes right now; retry (a retried create answers 409 if the first attempt did land)",
                )
            }
        }
    }
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no link has this code")
}

fn gone(gone: Gone) -> ApiError {
    ApiError::new(StatusCode::GONE, gone.code(), gone.message())
}

/// Answers a request under `/api/`.
pub async fn handle(app: &Arc<App>, request: Request<Incoming>, peer: IpAddr) -> (Route, Response) {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let (route, result) = match (method, path.as_str()) {
        (Method::POST, "/api/v1/shorten") => (Route::Shorten, shorten(app, request, peer).await),
        (Method::POST, "/api/v1/shorten/batch") => {
            (Route::ShortenBatch, shorten_batch(app, request, peer).await)
        }
        (Method::GET, "/api/v1/openapi.json") => (Route::OpenApi, Ok(openapi())),
        (method, path) => match path.strip_prefix("/api/v1/urls/") {
            Some(rest) if rest.ends_with("/qr") => match method {
                Method::GET => {
                    let code = rest.trim_end_matches("/qr");
                    (Route::UrlQr, qr(app, &request, code))
                }
                _ => (Route::Other, Err(method_not_allowed())),
            },
            Some(code) if method == Method::GET => (Route::UrlGet, get_url(app, &request, code)),
            Some(code) if method == Method::PATCH => {
                let code = code.to_owned();
                (Route::UrlPatch, patch_url(app, request, &code).await)
            }
            Some(code) if method == Method::DELETE => {
                (Route::UrlDelete, delete_url(app, &request, code).await)
            }
            Some(_) => (Route::Other, Err(method_not_allowed())),
            None => match path.strip_prefix("/api/v1/stats/") {
                Some(code) if method == Method::GET => {
                    (Route::Stats, stats(app, &request, code).await)
                }
                Some(_) => (Route::Other, Err(method_not_allowed())),
                None if matches!(
                    path,
                    "/api/v1/shorten" | "/api/v1/shorten/batch" | "/api/v1/openapi.json"
                ) =>
                {
                    (Route::Other, Err(method_not_allowed()))
                }
                None => (
                    Route::Other,
                    Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "no_such_route",
                        "no such API route",
                    )),
                ),
            },
        },
    };
    (route, result.unwrap_or_else(ApiError::into_response))
}

fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not answer that method",
    )
}

fn openapi() -> Response {
    let mut response = hyper::Response::new(http_body_util::Full::new(Bytes::from_static(
        OPENAPI_JSON.as_bytes(),
    )));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

// ---------------------------------------------------------------------------------------------
// Authentication and rate limiting

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().unwrap_or("");
        let key = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .unwrap_or("");
        return Some(key.trim());
    }
    headers
        .get("x-api-key")
        .map(|value| value.to_str().unwrap_or("").trim())
}

/// Who is calling; a presented key that is not known is refused even where anonymous calls are
/// allowed, so a typo in a key is noticed.
pub fn principal(app: &App, headers: &HeaderMap) -> Result<Principal, ApiError> {
    app.keys
        .authenticate(presented_key(headers))
        .map_err(|KeyRefusal::Unknown| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_key",
                "the API key is not known (revoked, or mistyped)",
            )
        })
}

/// Requires a key of at least `scope`.
pub fn require(principal: &Principal, scope: Scope) -> Result<(), ApiError> {
    match principal {
        Principal::Key { scope: held, .. } if held.allows(scope) => Ok(()),
        Principal::Key { .. } => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "this API key may not make this call",
        )),
        Principal::Anonymous => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_key",
            "this call needs an API key (Authorization: Bearer <key> or X-API-Key: <key>)",
        )),
    }
}

/// Who may create: a write-scope key, or anyone when anonymous creation is on.
fn authorize_create(app: &App, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let principal = principal(app, headers)?;
    if !(principal == Principal::Anonymous && app.config.allow_anonymous_create) {
        require(&principal, Scope::Write)?;
    }
    Ok(principal)
}

/// The client's address, from the peer and every X-Forwarded-For header (see
/// [`super::client_ip`]).
fn client_ip(app: &App, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter(|value| value.len() <= super::FORWARDED_FOR_BYTES_MAX)
        .collect::<Vec<_>>()
        .join(",");
    super::client_ip(&app.config.trusted_proxies, &forwarded, peer)
}

/// Takes `cost` tokens from the caller's key bucket (if any) and client-IP bucket.
fn rate_limit(app: &App, principal: &Principal, peer: IpAddr, cost: u32) -> Result<(), ApiError> {
    let rate_limited = |retry_after_s| ApiError {
        retry_after_s: Some(retry_after_s),
        ..ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many links created; retry in {retry_after_s} s"),
        )
    };
    let key_bucket = match principal {
        Principal::Key { name, .. } => Some(format!("key:{name}")),
        Principal::Anonymous => None,
    };
    if let Some(bucket) = &key_bucket {
        app.limiter.take(bucket, cost).map_err(rate_limited)?;
    }
    app.limiter
        .take(&format!("ip:{peer}"), cost)
        .map_err(|retry_after_s| {
            // Refused by the address's bucket: the key did not create anything either.
            if let Some(bucket) = &key_bucket {
                app.limiter.refund(bucket, cost);
            }
            rate_limited(retry_after_s)
        })
}

// ---------------------------------------------------------------------------------------------
// Bodies

fn is_json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| value.split(';').next().unwrap_or("").trim())
        .is_some_and(|media| {
            media.eq_ignore_ascii_case("application/json")
                || (media.len() > 5
                    && media.is_char_boundary(media.len() - 5)
                    && media[media.len() - 5..].eq_ignore_ascii_case("+json"))
        })
}

fn too_large(bytes_max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the request body is larger than {bytes_max} bytes"),
    )
}

/// Reads a JSON body of at most `bytes_max` bytes into `T`; the whole body must arrive within
/// the configured body-read timeout.
async fn read_json<T: DeserializeOwned>(
    app: &App,
    request: Request<Incoming>,
    bytes_max: usize,
) -> Result<T, ApiError> {
    let headers = request.headers();
    if !is_json_content_type(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        ));
    }
    let declared_bytes = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared_bytes.is_some_and(|bytes| bytes > bytes_max as u64) {
        return Err(too_large(bytes_max));
    }
    let within = Duration::from_millis(app.config.timeout_body_read_ms);
    let collecting = Limited::new(request.into_body(), bytes_max).collect();
    let collected = tokio::time::timeout(within, collecting)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} ms",
                    within.as_millis()
                ),
            )
        })?
        .map_err(|error| {
            if error.is::<http_body_util::LengthLimitError>() {
                too_large(bytes_max)
            } else {
                ApiError::bad_request("body_unreadable", format!("cannot read the body: {error}"))
            }
        })?;
    let bytes = collected.to_bytes();
    let text = std::str::from_utf8(&bytes).map_err(|error| {
        ApiError::bad_request(
            "invalid_utf8",
            format!("the body is not valid UTF-8: {error}"),
        )
    })?;
    parse_json(text)
}

fn parse_json<T: DeserializeOwned>(text: &str) -> Result<T, ApiError> {
    serde_json::from_str(text).map_err(|error| match error.classify() {
        serde_json::error::Category::Data => ApiError::bad_request(
            "invalid_request",
            format!("the request does not fit: {error}"),
        ),
        _ => ApiError::bad_request(
            "invalid_json",
            format!("the body is not valid JSON: {error}"),
        ),
    })
}

/// Distinguishes an absent field (None) from an explicit `null` (Some(None)).
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

// ---------------------------------------------------------------------------------------------
// Create

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct ShortenRequest {
    long_url: String,
    custom_alias: Option<String>,
    expires_at: Option<String>,
    expires_in: Option<i64>,
    redirect_status: Option<u16>,
    max_clicks: Option<u64>,
    forward_query: Option<bool>,
    /// With `--code-strategy hash`: answer with the existing link of the same URL, if any.
    reuse: Option<bool>,
}

fn parse_redirect_status(code: u16) -> Result<RedirectStatus, ApiError> {
    RedirectStatus::from_code(code).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_redirect_status",
            format!("redirect_status {code} is not one of 301, 302, 307, 308"),
        )
    })
}

fn parse_expires_at(text: &str, now: i64) -> Result<i64, ApiError> {
    let expires_at_s = parse_rfc3339(text).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_expiry",
            format!("expires_at {text:?} is not an RFC 3339 timestamp"),
        )
    })?;
    if expires_at_s <= now {
        return Err(ApiError::bad_request(
            "invalid_expiry",
            "expires_at is in the past",
        ));
    }
    Ok(expires_at_s)
}

fn parse_max_clicks(max_clicks: u64) -> Result<u64, ApiError> {
    if max_clicks == 0 {
        return Err(ApiError::bad_request(
            "invalid_max_clicks",
            "max_clicks must be at least 1",
        ));
    }
    Ok(max_clicks)
}

/// Checks a create request and turns it into a link (code still empty) and the alias, if any.
fn new_link(
    app: &App,
    request: ShortenRequest,
    now: i64,
) -> Result<(Link, Option<String>), ApiError> {
    let long_url = validate::long_url(&request.long_url, &app.config.url_rules)?;
    if let Some(alias) = &request.custom_alias {
        validate::alias(alias, &app.config.reserved_words)?;
    }
    let expires_at_s = match (&request.expires_at, request.expires_in) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_expiry",
                "give expires_at or expires_in, not both",
            ))
        }
        (Some(text), None) => Some(parse_expires_at(text, now)?),
        (None, Some(seconds)) if (1..=EXPIRES_IN_S_MAX).contains(&seconds) => Some(now + seconds),
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_expiry",
                format!("expires_in must be 1 to {EXPIRES_IN_S_MAX} seconds"),
            ))
        }
        (None, None) => None,
    };
    let meta = LinkMeta {
        expires_at_s,
        max_clicks: request.max_clicks.map(parse_max_clicks).transpose()?,
        redirect_status: request
            .redirect_status
            .map(parse_redirect_status)
            .transpose()?,
        custom: request.custom_alias.is_some(),
        forward_query: request.forward_query.unwrap_or(false),
        ..LinkMeta::new(now)
    };
    Ok((
        Link {
            code: String::new(),
            long_url,
            meta,
        },
        request.custom_alias,
    ))
}

fn is_reserved(app: &App, code: &str) -> bool {
    app.config
        .reserved_words
        .iter()
        .any(|word| word.eq_ignore_ascii_case(code))
}

/// Free codes close to a taken alias that this node takes writes for: `alias-1`.. first, then
/// random suffixes.
fn suggestions(app: &App, alias: &str) -> Vec<String> {
    let Some(links) = app.links() else {
        return Vec::new();
    };
    let store = links.store();
    let base: String = alias.chars().take(CODE_BYTES_MAX - 5).collect();
    let numbered = (1..=9).map(|n| format!("{base}-{n}"));
    let random = (0..SUGGESTION_DRAWS_MAX).map(|_| format!("{base}-{}", random_code(3)));
    numbered
        .chain(random)
        .filter(|code| {
            !is_reserved(app, code)
                && links.holds(code)
                && store.lookup(code, |link| link.is_none())
        })
        .take(SUGGESTIONS_MAX)
        .collect()
}

async fn busy_pause() {
    tokio::time::sleep(Duration::from_millis(BUSY_RETRY_SLEEP_MS)).await;
}

/// A stored link, and whether it existed before (`reuse` with the hash strategy).
struct Inserted {
    link: Link,
    reused: bool,
}

/// The `draw`-th candidate code for `link` under the configured strategy.
fn candidate(app: &App, link: &Link, draw: usize, code_len: usize) -> String {
    match app.config.code_strategy {
        CodeStrategy::Random => random_code(code_len),
        CodeStrategy::Counter => app.counter.next_code(),
        CodeStrategy::Hash => codegen::hash_code(&link.long_url, app.config.code_len + draw)
            .unwrap_or_else(|| random_code(code_len)),
    }
}

/// Whether the link stored under `code` is an active link to `long_url` (for `reuse`).
fn reusable(app: &App, code: &str, long_url: &str) -> Option<Link> {
    let link = app.store()?.get(code)?;
    (link.long_url == long_url && lifecycle::check(&link.meta, now_s()).is_ok()).then_some(link)
}

/// Stores `link` under `alias`, or under a fresh generated code this node holds; returns the
/// stored link once the link service says it is durable.
async fn insert(
    app: &App,
    mut link: Link,
    alias: Option<String>,
    reuse: bool,
) -> Result<Inserted, ApiError> {
    let links = app.links().ok_or_else(not_ready)?;
    if let Some(alias) = alias {
        link.code = alias;
        let mut attempts = 0;
        loop {
            match links.create(link.clone()).await {
                Ok(()) => {
                    return Ok(Inserted {
                        link,
                        reused: false,
                    })
                }
                Err(WriteError::Busy(code)) if attempts + 1 == BUSY_RETRIES_MAX => {
                    return Err(write_failed(WriteError::Busy(code)))
                }
                Err(WriteError::Busy(_)) => busy_pause().await,
                Err(WriteError::CodeTaken(_)) => break,
                Err(error) => return Err(write_failed(error)),
            }
            attempts += 1;
        }
        return Err(ApiError {
            extra: Some(("suggested", json!(suggestions(app, &link.code)))),
            ..ApiError::new(
                StatusCode::CONFLICT,
                "alias_taken",
                format!("the alias {:?} is taken", link.code),
            )
        });
    }
    let reuse = reuse && app.config.code_strategy == CodeStrategy::Hash;
    let mut code_len = app.config.code_len;
    let mut collisions = 0;
    // Codes of shards other nodes hold are skipped without counting as collisions.
    for draw in 0..CODE_DRAWS_MAX * links.draws_per_held_code() {
        link.code = candidate(app, &link, draw, code_len);
        if is_reserved(app, &link.code) || !links.holds(&link.code) {
            continue;
        }
        match links.create(link.clone()).await {
            Ok(()) => {
                return Ok(Inserted {
                    link,
                    reused: false,
                })
            }
            Err(WriteError::CodeTaken(_)) if reuse => {
                if let Some(existing) = reusable(app, &link.code, &link.long_url) {
                    return Ok(Inserted {
                        link: existing,
                        reused: true,
                    });
                }
            }
            Err(WriteError::Busy(_) | WriteError::CodeTaken(_)) => {}
            Err(error) => return Err(write_failed(error)),
        }
        collisions += 1;
        if collisions == CODE_DRAWS_MAX {
            break;
        }
        if collisions % CODE_DRAWS_PER_LENGTH == 0 {
            code_len = (code_len + 1).min(CODE_BYTES_MAX);
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_free_code",
        "could not draw a free code; retry",
    ))
}

fn short_url(app: &App, code: &str) -> String {
    format!("{}/{code}", app.config.public_url)
}

fn optional_time(unix_s: Option<i64>) -> Value {
    unix_s.map_or(Value::Null, |unix_s| Value::String(rfc3339(unix_s)))
}

fn created_body(app: &App, link: &Link) -> Value {
    json!({
        "short_code": link.code,
        "short_url": short_url(app, &link.code),
        "long_url": link.long_url,
        "created_at": rfc3339(link.meta.created_at_s),
        "expires_at": optional_time(link.meta.expires_at_s),
        "max_clicks": link.meta.max_clicks,
        "redirect_status": link.meta.redirect_status.map(RedirectStatus::code),
        "forward_query": link.meta.forward_query,
    })
}

async fn create_one(app: &App, request: ShortenRequest) -> Result<Inserted, ApiError> {
    let reuse = request.reuse.unwrap_or(false);
    let (link, alias) = new_link(app, request, now_s())?;
    insert(app, link, alias, reuse).await
}

async fn shorten(
    app: &Arc<App>,
    request: Request<Incoming>,
    peer: IpAddr,
) -> Result<Response, ApiError> {
    let principal = authorize_create(app, request.headers())?;
    rate_limit(app, &principal, client_ip(app, request.headers(), peer), 1)?;
    let body: ShortenRequest = read_json(app, request, app.config.body_bytes_max).await?;
    let Inserted { link, reused } = create_one(app, body).await?;
    let status = if reused {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let mut response = json_response(status, &created_body(app, &link));
    let location = format!("{}/api/v1/urls/{}", app.config.public_url, link.code);
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    items: Vec<Value>,
}

async fn shorten_batch(
    app: &Arc<App>,
    request: Request<Incoming>,
    peer: IpAddr,
) -> Result<Response, ApiError> {
    let principal = authorize_create(app, request.headers())?;
    let client = client_ip(app, request.headers(), peer);
    let body: BatchRequest = read_json(app, request, app.config.batch_body_bytes_max).await?;
    if body.items.len() > BATCH_ITEMS_MAX {
        return Err(ApiError::bad_request(
            "batch_too_large",
            format!(
                "a batch holds at most {BATCH_ITEMS_MAX} items; this one has {}",
                body.items.len()
            ),
        ));
    }
    // One token per item, at most the burst (else a batch larger than the burst could never pass).
    rate_limit(app, &principal, client, body.items.len().max(1) as u32)?;
    let mut tasks = tokio::task::JoinSet::new();
    for (index, item) in body.items.into_iter().enumerate() {
        let app = app.clone();
        tasks.spawn(async move {
            let result = match serde_json::from_value::<ShortenRequest>(item) {
                Ok(item) => create_one(&app, item).await,
                Err(error) => Err(ApiError::bad_request(
                    "invalid_request",
                    format!("item does not fit: {error}"),
                )),
            };
            let mut entry = match result {
                Ok(Inserted { link, reused }) => {
                    let mut body = created_body(&app, &link);
                    if let Some(object) = body.as_object_mut() {
                        object.insert("status".into(), json!(if reused { 200 } else { 201 }));
                    }
                    body
                }
                Err(error) => {
                    let mut body = error.body();
                    if let Some(object) = body.as_object_mut() {
                        object.insert("status".into(), json!(error.status.as_u16()));
                    }
                    body
                }
            };
            if let Some(object) = entry.as_object_mut() {
                object.insert("index".into(), json!(index));
            }
            (index, entry)
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(result) => results.push(result),
            Err(error) => tracing::error!("batch item task failed: {error}"),
        }
    }
    results.sort_by_key(|(index, _)| *index);
    let created = results
        .iter()
        .filter(|(_, entry)| entry["status"] == json!(201) || entry["status"] == json!(200))
        .count();
    let results: Vec<Value> = results.into_iter().map(|(_, entry)| entry).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "created": created, "failed": results.len() - created, "results": results }),
    ))
}

// ---------------------------------------------------------------------------------------------
// Read, change, delete

fn require_key(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    require(&principal(app, headers)?, Scope::Write)
}

fn link_body(app: &App, link: &Link) -> Value {
    let clicks = app.click_stats(&link.code);
    json!({
        "short_code": link.code,
        "short_url": short_url(app, &link.code),
        "long_url": link.long_url,
        "created_at": rfc3339(link.meta.created_at_s),
        "updated_at": rfc3339(link.meta.updated_at_s),
        "expires_at": optional_time(link.meta.expires_at_s),
        "max_clicks": link.meta.max_clicks,
        "redirect_status": link.meta.redirect_status.map(RedirectStatus::code),
        "status": match link.meta.status {
            LinkStatus::Active => "active",
            LinkStatus::Disabled => "disabled",
            LinkStatus::Deleted => "deleted",
        },
        "custom": link.meta.custom,
        "forward_query": link.meta.forward_query,
        "clicks": clicks.clicks,
        "last_clicked_at": optional_time(clicks.last_clicked_at_s),
    })
}

fn existing(app: &App, code: &str) -> Result<Link, ApiError> {
    let links = app.links().ok_or_else(not_ready)?;
    let store = links.store();
    if !validate::is_code(code) {
        return Err(not_found());
    }
    match store.get(code) {
        // A code of another shard group is not here whether or not it exists: 421, not 404.
        None => Err(match links.check_shard(code) {
            Ok(()) => not_found(),
            Err(wrong_shard) => write_failed(wrong_shard),
        }),
        Some(link) if link.meta.status == LinkStatus::Deleted => Err(gone(Gone::Deleted)),
        Some(link) => Ok(link),
    }
}

fn get_url<B>(app: &App, request: &Request<B>, code: &str) -> Result<Response, ApiError> {
    require_key(app, request.headers())?;
    let link = existing(app, code)?;
    Ok(json_response(StatusCode::OK, &link_body(app, &link)))
}

/// Default window of a stats query without `from`, in seconds.
const STATS_WINDOW_S_DEFAULT: i64 = 30 * 86_400;

fn bad_query(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message)
}

/// A time in a query: RFC 3339 or unix seconds.
fn query_time(name: &str, value: &str) -> Result<i64, ApiError> {
    value
        .parse::<i64>()
        .ok()
        .or_else(|| parse_rfc3339(value))
        .ok_or_else(|| {
            bad_query(format!(
                "{name}={value:?} is not an RFC 3339 time or unix seconds"
            ))
        })
}

/// The window and bucket size of `GET /api/v1/stats/{code}?from=&to=&granularity=hour|day`.
fn stats_query(query: Option<&str>, now_s: i64) -> Result<StatsQuery, ApiError> {
    let (mut from_s, mut to_s, mut granularity) = (None, None, Granularity::Day);
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match name.as_ref() {
            "from" => from_s = Some(query_time("from", &value)?),
            "to" => to_s = Some(query_time("to", &value)?),
            "granularity" => {
                granularity = match value.as_ref() {
                    "hour" => Granularity::Hour,
                    "day" => Granularity::Day,
                    other => {
                        return Err(bad_query(format!("granularity={other:?}: use hour or day")))
                    }
                }
            }
            other => return Err(bad_query(format!("unknown query parameter {other:?}"))),
        }
    }
    let to_s = to_s.unwrap_or(now_s + 1);
    Ok(StatsQuery {
        from_s: from_s.unwrap_or(to_s - STATS_WINDOW_S_DEFAULT),
        to_s,
        granularity,
    })
}

fn ranked(entries: &[(String, u64)], key: &str) -> Value {
    Value::Array(
        entries
            .iter()
            .map(|(name, clicks)| json!({ key: name, "clicks": clicks }))
            .collect(),
    )
}

async fn stats<B>(app: &Arc<App>, request: &Request<B>, code: &str) -> Result<Response, ApiError> {
    require_key(app, request.headers())?;
    let link = existing(app, code)?;
    let now_s = super::now_s();
    let query = stats_query(request.uri().query(), now_s)?;
    // With --no-click-analytics there are only the exact counts; the breakdowns stay empty.
    if app.analytics().is_none() && app.config.click_analytics {
        return Err(not_ready());
    }
    // Off the async workers: the aggregates' lock is also held by the aggregator, for as long
    // as a checkpoint takes, and a worker waiting on it would stall every redirect it serves.
    let asking = Arc::clone(app);
    let asked_code = link.code.clone();
    let answer = tokio::task::spawn_blocking(move || {
        asking
            .analytics()
            .and_then(|analytics| analytics.stats(&asked_code, query, now_s))
    })
    .await
    .map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "stats_failed",
            error.to_string(),
        )
    })?
    .unwrap_or_else(|| LinkStats::no_clicks(query, now_s))
    .map_err(|error| bad_query(error.to_string()))?;
    let analytics = app.analytics();
    let clicks = app.click_stats(&link.code);
    let step_s = query.granularity.seconds();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "short_code": link.code,
            "clicks": clicks.clicks,
            "last_clicked_at": optional_time(clicks.last_clicked_at_s),
            "human_clicks": answer.human_total,
            "bot_clicks": answer.bot_total,
            "from": rfc3339(query.from_s.div_euclid(step_s) * step_s),
            "to": rfc3339(query.to_s),
            "granularity": match query.granularity {
                Granularity::Hour => "hour",
                Granularity::Day => "day",
            },
            "window": { "clicks": answer.window.human, "bot_clicks": answer.window.bot },
            "buckets": answer.buckets.iter().map(|bucket| json!({
                "start": rfc3339(bucket.start_s),
                "clicks": bucket.human,
                "bot_clicks": bucket.bot,
            })).collect::<Vec<_>>(),
            "referrers": ranked(&answer.referrers, "domain"),
            "countries": ranked(&answer.countries, "country"),
            "browsers": ranked(&answer.browsers, "browser"),
            "os": ranked(&answer.os, "os"),
            "bots": ranked(&answer.bots, "bot"),
            "click_analytics": analytics.is_some(),
            "events_queued": analytics.map_or(0, |analytics| analytics.counters(now_s).queued),
        }),
    ))
}

/// Side of a QR code image, in pixels (at least; the code's modules are whole pixels).
const QR_PIXELS_MIN: u32 = 256;

/// `GET /api/v1/urls/{code}/qr?format=svg|png`: the link's short URL as a QR code.
fn qr<B>(app: &App, request: &Request<B>, code: &str) -> Result<Response, ApiError> {
    require_key(app, request.headers())?;
    let link = existing(app, code)?;
    let mut png = false;
    for (name, value) in url::form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
    {
        match (name.as_ref(), value.as_ref()) {
            ("format", "svg") => png = false,
            ("format", "png") => png = true,
            (name, value) => {
                return Err(bad_query(format!(
                    "{name}={value:?}: the only parameter is format=svg|png"
                )))
            }
        }
    }
    let url = short_url(app, &link.code);
    let code = qrcode::QrCode::new(url.as_bytes()).map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "qr_failed",
            error.to_string(),
        )
    })?;
    let (content_type, body) = if png {
        let image = code
            .render::<image::Luma<u8>>()
            .min_dimensions(QR_PIXELS_MIN, QR_PIXELS_MIN)
            .build();
        let mut bytes = Vec::new();
        image
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .map_err(|error| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "qr_failed",
                    error.to_string(),
                )
            })?;
        ("image/png", bytes)
    } else {
        let svg = code
            .render::<qrcode::render::svg::Color<'_>>()
            .min_dimensions(QR_PIXELS_MIN, QR_PIXELS_MIN)
            .build();
        ("image/svg+xml", svg.into_bytes())
    };
    let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    Ok(response)
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct PatchRequest {
    long_url: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    expires_at: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    max_clicks: Option<Option<u64>>,
    #[serde(default, deserialize_with = "nullable")]
    redirect_status: Option<Option<u16>>,
    status: Option<String>,
    forward_query: Option<bool>,
}

/// A validated change.
#[derive(Clone, Debug)]
struct Change {
    long_url: Option<String>,
    expires_at_s: Option<Option<i64>>,
    max_clicks: Option<Option<u64>>,
    redirect_status: Option<Option<RedirectStatus>>,
    status: Option<LinkStatus>,
    forward_query: Option<bool>,
}

fn change(app: &App, patch: PatchRequest, now: i64) -> Result<Change, ApiError> {
    let status = match patch.status.as_deref() {
        None => None,
        Some("active") => Some(LinkStatus::Active),
        Some("disabled") => Some(LinkStatus::Disabled),
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_status",
                format!("status {other:?} must be active or disabled (use DELETE to delete)"),
            ))
        }
    };
    Ok(Change {
        long_url: patch
            .long_url
            .map(|url| validate::long_url(&url, &app.config.url_rules))
            .transpose()?,
        expires_at_s: patch
            .expires_at
            .map(|at| at.map(|text| parse_expires_at(&text, now)).transpose())
            .transpose()?,
        max_clicks: patch
            .max_clicks
            .map(|max| max.map(parse_max_clicks).transpose())
            .transpose()?,
        redirect_status: patch
            .redirect_status
            .map(|status| status.map(parse_redirect_status).transpose())
            .transpose()?,
        status,
        forward_query: patch.forward_query,
    })
}

fn apply(current: &Link, change: Change, now: i64) -> Result<Link, Gone> {
    if current.meta.status == LinkStatus::Deleted {
        return Err(Gone::Deleted);
    }
    let mut link = current.clone();
    if let Some(long_url) = change.long_url {
        link.long_url = long_url;
    }
    if let Some(expires_at_s) = change.expires_at_s {
        link.meta.expires_at_s = expires_at_s;
    }
    if let Some(max_clicks) = change.max_clicks {
        link.meta.max_clicks = max_clicks;
    }
    if let Some(redirect_status) = change.redirect_status {
        link.meta.redirect_status = redirect_status;
    }
    if let Some(status) = change.status {
        link.meta.status = status;
    }
    if let Some(forward_query) = change.forward_query {
        link.meta.forward_query = forward_query;
    }
    link.meta.updated_at_s = now.max(current.meta.updated_at_s);
    Ok(link)
}

/// Runs the link service's update with `change`, retrying while another write on the code is
/// in flight.
async fn update(app: &App, code: &str, change: Change) -> Result<Link, ApiError> {
    let links = app.links().ok_or_else(not_ready)?;
    if !validate::is_code(code) {
        return Err(not_found());
    }
    for _ in 0..BUSY_RETRIES_MAX {
        let now = now_s();
        match links
            .update(code, |current| apply(current, change.clone(), now))
            .await
        {
            Ok(Ok(link)) => return Ok(link),
            Ok(Err(refusal)) => return Err(gone(refusal)),
            Err(WriteError::Busy(_)) => busy_pause().await,
            Err(error) => return Err(write_failed(error)),
        }
    }
    Err(write_failed(WriteError::Busy(code.to_owned())))
}

async fn patch_url(
    app: &App,
    request: Request<Incoming>,
    code: &str,
) -> Result<Response, ApiError> {
    require_key(app, request.headers())?;
    let patch: PatchRequest = read_json(app, request, app.config.body_bytes_max).await?;
    let change = change(app, patch, now_s())?;
    let link = update(app, code, change).await?;
    Ok(json_response(StatusCode::OK, &link_body(app, &link)))
}

async fn delete_url<B>(app: &App, request: &Request<B>, code: &str) -> Result<Response, ApiError> {
    require_key(app, request.headers())?;
    let delete = Change {
        long_url: None,
        expires_at_s: None,
        max_clicks: None,
        redirect_status: None,
        status: Some(LinkStatus::Deleted),
        forward_query: None,
    };
    match update(app, code, delete).await {
        Ok(_) => {}
        // Deleting twice is not an error: the link is gone either way.
        Err(error) if error.status == StatusCode::GONE => {}
        Err(error) => return Err(error),
    }
    let mut response = hyper::Response::new(http_body_util::Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}
