//! The lean HTTP/1.1 path of the public listener: parses a request with httparse straight from
//! the bytes a connection read and answers `GET`/`HEAD /{code}` with pre-shaped bytes, no
//! allocation per request. Anything else — another method or route, a body, `Connection:
//! close`, `Expect`, HTTP/1.0, malformed or oversized heads — is left to hyper, which takes the
//! connection, with every byte already read ([`Prefixed`]), for the rest of its life, so hyper
//! stays the one place that deals with unusual HTTP. The event loops (`lean_loop`) drive it.
//! Never answers anything but `/{code}`, and never reads the store except through
//! [`redirect::decide`].

use std::cell::RefCell;
use std::io;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use hyper::StatusCode;
use time::macros::format_description;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::redirect::{self, ClickContext, Verdict};
use super::{App, ClickEvents};
use crate::analytics::pipeline::EventBatch;
use crate::decimal;
use crate::metrics::Route;
use crate::store::link::RedirectStatus;
use crate::store::snapshot::Probe;

/// Longest code [`code_hint`] looks for.
const CODE_HINT_BYTES_MAX: usize = 64;
/// Headers the fast path parses; a request with more goes to hyper (which caps them itself).
const HEADERS_MAX: usize = 32;

/// A connection handed to hyper: the bytes the fast path read but did not answer, then the socket.
pub struct Prefixed {
    prefix: Bytes,
    stream: TcpStream,
}

impl Prefixed {
    pub fn new(prefix: Bytes, stream: TcpStream) -> Prefixed {
        Prefixed { prefix, stream }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let count = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..count]);
            this.prefix.advance(count);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// What one parse of the buffer led to.
pub(super) enum Step {
    /// A request of this many bytes was answered into the output buffer.
    Answered(usize),
    /// The head is not complete yet.
    Partial,
    /// Not for the fast path: hyper takes the connection.
    Hyper,
}

/// Writes `bytes`, giving a client that does not read its responses `timeout` to make room;
/// false means the connection is done. Tries once without a timer: a response nearly always
/// fits the socket's buffer.
pub(super) async fn write_all(stream: &mut TcpStream, bytes: &[u8], timeout: Duration) -> bool {
    let written = match stream.try_write(bytes) {
        Ok(written) => written,
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
        Err(_) => return false,
    };
    written == bytes.len()
        || matches!(
            tokio::time::timeout(timeout, stream.write_all(&bytes[written..])).await,
            Ok(Ok(()))
        )
}

/// The first step of answering a batch of requests: when `buf` starts with a plain
/// `GET /{code}`, starts loading the table slot of its code ([`redirect::Hints::prefetch_slot`];
/// the second step is [`redirect::Hints::prefetch_record`]). Only a hint: [`step`] decides the
/// answer.
pub fn prefetch(hints: &redirect::Hints, buf: &[u8]) -> Option<Probe> {
    code_hint(buf).and_then(|code| hints.prefetch_slot(code))
}

/// The code a request at the start of `buf` asks for if it is a plain `GET /{code}`, found
/// without parsing it.
fn code_hint(buf: &[u8]) -> Option<&[u8]> {
    let rest = buf.strip_prefix(b"GET /")?;
    let rest = &rest[..rest.len().min(CODE_HINT_BYTES_MAX + 1)];
    let end = rest.iter().position(|&byte| byte == b' ' || byte == b'?')?;
    (end > 0).then(|| &rest[..end])
}

/// Answers the request at the start of `buf` into `out` exactly as a connection does and
/// returns its length in bytes; `None` when it is not a complete plain `GET`/`HEAD /{code}`
/// (hyper's to answer). A click's analytics event goes into `events`, for
/// [`App::hand_over_clicks`]. The redirect benchmark's way into the lean path.
pub fn answer(
    app: &App,
    peer: IpAddr,
    buf: &[u8],
    (out, events): (&mut Vec<u8>, &mut EventBatch),
) -> Option<usize> {
    match step(app, (peer, true), buf, buf.len(), (out, events)) {
        Step::Answered(consumed) => Some(consumed),
        Step::Partial | Step::Hyper => None,
    }
}

/// Parses the request at the start of `buf` and, if it is a plain `GET`/`HEAD /{code}`, answers
/// it into `out` and gathers its click's analytics event into `events`; `timed` says whether
/// its latency goes into the histogram.
pub(super) fn step(
    app: &App,
    (peer, timed): (IpAddr, bool),
    buf: &[u8],
    head_bytes_max: usize,
    (out, events): (&mut Vec<u8>, &mut EventBatch),
) -> Step {
    // Left uninitialised: httparse writes the headers it finds and hands back only those.
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; HEADERS_MAX];
    let mut request = httparse::Request::new(&mut []);
    let consumed = match request.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(consumed)) => consumed,
        Ok(httparse::Status::Partial) if buf.len() <= head_bytes_max => return Step::Partial,
        Ok(httparse::Status::Partial) | Err(_) => return Step::Hyper,
    };
    let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version)
    else {
        return Step::Hyper;
    };
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Step::Hyper,
    };
    // A byte loop: `split_once` goes through memchr, which costs more than it saves on a
    // target of a few bytes.
    let (path, query) = match target.bytes().position(|byte| byte == b'?') {
        Some(at) => (&target[..at], Some(&target[at + 1..])),
        None => (target, None),
    };
    if !path.starts_with('/')
        || path.starts_with("/api/")
        || path == "/healthz"
        || path == "/readyz"
    {
        return Step::Hyper;
    }
    let mut accepts_json = false;
    let mut click = ClickContext {
        peer: Some(peer),
        ..ClickContext::default()
    };
    let country_header = app.config.country_header.as_deref();
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("referer") {
            click.referer = Some(header.value);
        } else if name.eq_ignore_ascii_case("user-agent") {
            click.user_agent = Some(header.value);
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            click.forwarded_for = Some(header.value);
        } else if country_header.is_some_and(|country| name.eq_ignore_ascii_case(country)) {
            click.country = Some(header.value);
        } else if name.eq_ignore_ascii_case("accept") {
            accepts_json =
                contains(header.value, b"application/json") || contains(header.value, b"+json");
        } else if (name.eq_ignore_ascii_case("content-length") && header.value != b"0")
            || name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("connection")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Step::Hyper;
        }
    }
    let started = timed.then(Instant::now);
    // The one wall-clock read of the request (a coarse one): expiry, the click's time and the
    // Date header.
    let now_s = crate::timefmt::now_s_coarse();
    let status = redirect::decide(
        app,
        head,
        (path, query),
        &click,
        ClickEvents::Gathered(events),
        now_s,
        |verdict| write_verdict(head, accepts_json, verdict, now_s, out),
    );
    if let Some(started) = started {
        app.metrics
            .redirect_latency(started.elapsed().as_micros() as u64);
    }
    app.metrics.request(Route::Redirect, status);
    Step::Answered(consumed)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Whether `text` may stand in a header value as it is (visible ASCII, spaces and tabs).
fn header_safe(text: &[u8]) -> bool {
    text.iter()
        .all(|&byte| byte == b'\t' || (b' '..=b'~').contains(&byte))
}

fn status_line(status: RedirectStatus) -> &'static [u8] {
    match status {
        RedirectStatus::MovedPermanently => b"HTTP/1.1 301 Moved Permanently\r\n",
        RedirectStatus::Found => b"HTTP/1.1 302 Found\r\n",
        RedirectStatus::TemporaryRedirect => b"HTTP/1.1 307 Temporary Redirect\r\n",
        RedirectStatus::PermanentRedirect => b"HTTP/1.1 308 Permanent Redirect\r\n",
    }
}

/// Writes the response to `verdict` at `now_s` into `out` and returns its status code.
fn write_verdict(
    head: bool,
    accepts_json: bool,
    verdict: Verdict<'_>,
    now_s: i64,
    out: &mut Vec<u8>,
) -> u16 {
    if let Verdict::Redirect {
        status,
        long_url,
        query,
        max_age_s,
    } = verdict
    {
        let start = out.len();
        out.extend_from_slice(status_line(status));
        out.extend_from_slice(b"location: ");
        let location = out.len();
        redirect::write_location(out, long_url, query);
        if header_safe(&out[location..]) {
            out.extend_from_slice(b"\r\ncache-control: ");
            match max_age_s {
                None => out.extend_from_slice(redirect::CACHE_CONTROL_TEMPORARY.as_bytes()),
                Some(max_age_s) => {
                    out.extend_from_slice(b"public, max-age=");
                    decimal::write_u64(out, max_age_s);
                }
            }
            out.extend_from_slice(b"\r\ncontent-length: 0\r\n");
            write_date(out, now_s);
            out.extend_from_slice(b"\r\n");
            return status.code();
        }
        out.truncate(start);
        return write_error(
            out,
            (head, accepts_json),
            now_s,
            StatusCode::INTERNAL_SERVER_ERROR,
            "bad_target",
            "the stored target of this link is not a valid Location",
        );
    }
    let (status, code, message) =
        verdict
            .error()
            .unwrap_or((StatusCode::NOT_FOUND, "not_found", "no link has this code"));
    write_error(out, (head, accepts_json), now_s, status, code, message)
}

/// An error answer shaped like the hyper path's: JSON `{"code","error"}` when the client accepts
/// JSON, else one line of text. `code` and `message` are fixed strings without quotes.
fn write_error(
    out: &mut Vec<u8>,
    (head, accepts_json): (bool, bool),
    now_s: i64,
    status: StatusCode,
    code: &str,
    message: &str,
) -> u16 {
    let (content_type, body): (&[u8], [&str; 5]) = if accepts_json {
        (
            b"application/json",
            ["{\"code\":\"", code, "\",\"error\":\"", message, "\"}\n"],
        )
    } else {
        (b"text/plain; charset=utf-8", [message, "\n", "", "", ""])
    };
    let body_bytes: usize = body.iter().map(|part| part.len()).sum();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: ");
    out.extend_from_slice(content_type);
    out.extend_from_slice(b"\r\ncontent-length: ");
    decimal::write_u64(out, body_bytes as u64);
    out.extend_from_slice(b"\r\n");
    write_date(out, now_s);
    out.extend_from_slice(b"\r\n");
    if !head {
        for part in body {
            out.extend_from_slice(part.as_bytes());
        }
    }
    status.as_u16()
}

thread_local! {
    /// The `date:` header line of the current second, formatted once per second per thread.
    static DATE_LINE: RefCell<(i64, Vec<u8>)> = const { RefCell::new((0, Vec::new())) };
}

fn write_date(out: &mut Vec<u8>, now_s: i64) {
    DATE_LINE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != now_s || cached.1.is_empty() {
            cached.0 = now_s;
            cached.1.clear();
            let format = format_description!(
                "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
            );
            if let Some(text) = OffsetDateTime::from_unix_timestamp(now_s)
                .ok()
                .and_then(|time| time.format(&format).ok())
            {
                cached.1.extend_from_slice(b"date: ");
                cached.1.extend_from_slice(text.as_bytes());
                cached.1.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(&cached.1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_line_is_an_imf_fixdate() {
        let mut out = Vec::new();
        write_date(&mut out, 784_111_777);
        assert_eq!(out, b"date: Sun, 06 Nov 1994 08:49:37 GMT\r\n");
        out.clear();
        write_date(&mut out, 784_111_778);
        assert_eq!(
            out, b"date: Sun, 06 Nov 1994 08:49:38 GMT\r\n",
            "a new second"
        );
    }

    #[test]
    fn error_bodies_match_their_length() {
        let mut out = Vec::new();
        let status = write_error(
            &mut out,
            (false, true),
            0,
            StatusCode::GONE,
            "expired",
            "gone",
        );
        assert_eq!(status, 410);
        let text = String::from_utf8(out).expect("ascii");
        assert!(text.starts_with("HTTP/1.1 410 Gone\r\n"));
        let (head, body) = text.split_once("\r\n\r\n").expect("head end");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let parsed: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(parsed["code"], "expired");
    }

    #[test]
    fn code_hints_come_from_plain_gets_only() {
        assert_eq!(code_hint(b"GET /abc HTTP/1.1\r\n"), Some(&b"abc"[..]));
        assert_eq!(code_hint(b"GET /abc?x=1 HTTP/1.1\r\n"), Some(&b"abc"[..]));
        assert_eq!(code_hint(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(code_hint(b"HEAD /abc HTTP/1.1\r\n"), None);
        assert_eq!(code_hint(b"GET /abc"), None, "not known to end yet");
        let long = [b"GET /".as_slice(), &[b'a'; 100], b" HTTP/1.1\r\n"].concat();
        assert_eq!(code_hint(&long), None);
    }

    #[test]
    fn header_safety() {
        assert!(header_safe(b"https://example.com/a?b=c#d"));
        assert!(!header_safe(b"https://example.com/\r\nx: y"));
    }
}
