//! Finds where one HTTP/1.1 response ends, reading as little as it can: the status line and the
//! headers that frame the body (`Content-Length`, `Transfer-Encoding: chunked`, `Connection`).
//! Bodies are skipped, never stored, so a response of any size goes through one fixed buffer. It
//! never allocates and never looks at anything it does not need to count the response.

use thiserror::Error;

/// Most headers a response may carry; more is reported as malformed.
pub const HEADERS_COUNT_MAX: usize = 64;
/// Most hex digits in a chunk size (16 digits already exceed any real body).
const CHUNK_SIZE_DIGITS_MAX: u32 = 16;

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ResponseError {
    #[error("malformed response head: {0}")]
    Head(httparse::Error),
    #[error("malformed or conflicting Content-Length")]
    ContentLength,
    #[error("malformed chunked body")]
    Chunk,
    #[error("the server switched protocols (101), which a load test cannot follow")]
    SwitchingProtocols,
}

/// What [`ResponseReader::advance`] made of the bytes it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// The response is not complete. The first `consumed` bytes are done with and can be dropped;
    /// the rest must be offered again together with the bytes that follow.
    NeedMore { consumed: usize },
    /// The response ended after `consumed` bytes.
    Complete {
        status: u16,
        close: bool,
        consumed: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Sized {
        remaining_bytes: u64,
    },
    Chunked(Chunk),
    /// No length given: the body runs until the server closes the connection.
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size { value: u64, digits: u32 },
    Extension { value: u64 },
    SizeLf { value: u64 },
    Data { remaining_bytes: u64 },
    DataCr,
    DataLf,
    Trailer { at_line_start: bool },
}

/// The framing state of the response in flight on one connection.
#[derive(Debug, Clone)]
pub struct ResponseReader {
    state: State,
    status: u16,
    close: bool,
}

impl Default for ResponseReader {
    fn default() -> Self {
        Self {
            state: State::Head,
            status: 0,
            close: false,
        }
    }
}

impl ResponseReader {
    /// Forgets the response in flight, for a new connection.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// True before any byte of the head has been accepted.
    pub fn is_at_head(&self) -> bool {
        self.state == State::Head
    }

    /// Feeds the unconsumed bytes received so far.
    pub fn advance(&mut self, input: &[u8]) -> Result<Parsed, ResponseError> {
        let mut consumed = 0;
        loop {
            match self.state {
                State::Head => match self.parse_head(&input[consumed..])? {
                    Some(head_bytes) => consumed += head_bytes,
                    None => return Ok(Parsed::NeedMore { consumed }),
                },
                State::Sized { remaining_bytes } => {
                    let available = (input.len() - consumed) as u64;
                    if available < remaining_bytes {
                        self.state = State::Sized {
                            remaining_bytes: remaining_bytes - available,
                        };
                        return Ok(Parsed::NeedMore {
                            consumed: input.len(),
                        });
                    }
                    consumed += remaining_bytes as usize;
                    return Ok(self.complete(consumed));
                }
                State::Chunked(chunk) => {
                    let (chunk, used) = skip_chunked(chunk, &input[consumed..])?;
                    consumed += used;
                    match chunk {
                        None => return Ok(self.complete(consumed)),
                        Some(chunk) => {
                            self.state = State::Chunked(chunk);
                            return Ok(Parsed::NeedMore { consumed });
                        }
                    }
                }
                State::UntilClose => {
                    return Ok(Parsed::NeedMore {
                        consumed: input.len(),
                    })
                }
            }
        }
    }

    /// The server closed the connection: returns the status if that ends the response in flight
    /// (a body delimited by the close), else `None` (the response was cut short). The state is
    /// left as it was, for the caller to inspect; a new connection resets it.
    pub fn finish_on_close(&self) -> Option<u16> {
        (self.state == State::UntilClose).then_some(self.status)
    }

    /// Parses the head at the start of `input`; returns its length once complete and sets the
    /// body state. An interim 1xx response is skipped by leaving the state at `Head`.
    fn parse_head(&mut self, input: &[u8]) -> Result<Option<usize>, ResponseError> {
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_COUNT_MAX];
        let mut response = httparse::Response::new(&mut headers);
        let head_bytes = match response.parse(input).map_err(ResponseError::Head)? {
            httparse::Status::Complete(head_bytes) => head_bytes,
            httparse::Status::Partial => return Ok(None),
        };
        let status = response.code.unwrap_or(0);
        if status == 101 {
            return Err(ResponseError::SwitchingProtocols);
        }
        if (100..200).contains(&status) {
            return Ok(Some(head_bytes));
        }
        let mut content_length: Option<u64> = None;
        let mut chunked = false;
        let mut other_coding = false;
        let mut close = response.version == Some(0);
        for header in response.headers.iter() {
            if header.name.eq_ignore_ascii_case("content-length") {
                let length = parse_content_length(header.value)?;
                if content_length.is_some_and(|seen| seen != length) {
                    return Err(ResponseError::ContentLength);
                }
                content_length = Some(length);
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                let last = header.value.rsplit(|&b| b == b',').next().unwrap_or(b"");
                chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
                other_coding = !chunked;
            } else if header.name.eq_ignore_ascii_case("connection") {
                for token in header.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        close = false;
                    }
                }
            }
        }
        self.status = status;
        self.close = close;
        self.state = if status == 204 || status == 304 {
            State::Sized { remaining_bytes: 0 }
        } else if chunked {
            State::Chunked(Chunk::Size {
                value: 0,
                digits: 0,
            })
        } else if other_coding {
            State::UntilClose
        } else {
            match content_length {
                Some(length) => State::Sized {
                    remaining_bytes: length,
                },
                None => State::UntilClose,
            }
        };
        if self.state == State::UntilClose {
            self.close = true;
        }
        Ok(Some(head_bytes))
    }

    fn complete(&mut self, consumed: usize) -> Parsed {
        let parsed = Parsed::Complete {
            status: self.status,
            close: self.close,
            consumed,
        };
        self.reset();
        parsed
    }
}

fn parse_content_length(value: &[u8]) -> Result<u64, ResponseError> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ResponseError::ContentLength);
    }
    Ok(digits
        .iter()
        .fold(0u64, |length, digit| length * 10 + u64::from(digit - b'0')))
}

/// Runs the chunked-body state machine over `input`; returns the state to resume from (`None`
/// once the body and its trailers have ended) and how many bytes it used.
fn skip_chunked(mut chunk: Chunk, input: &[u8]) -> Result<(Option<Chunk>, usize), ResponseError> {
    let mut at = 0;
    while at < input.len() {
        if let Chunk::Data { remaining_bytes } = chunk {
            let skip = remaining_bytes.min((input.len() - at) as u64);
            at += skip as usize;
            chunk = match remaining_bytes - skip {
                0 => Chunk::DataCr,
                remaining_bytes => Chunk::Data { remaining_bytes },
            };
            continue;
        }
        let byte = input[at];
        at += 1;
        chunk = match (chunk, byte) {
            (Chunk::Size { value, digits }, _) if byte.is_ascii_hexdigit() => {
                if digits == CHUNK_SIZE_DIGITS_MAX {
                    return Err(ResponseError::Chunk);
                }
                let nibble = u64::from((byte as char).to_digit(16).unwrap_or(0));
                Chunk::Size {
                    value: value << 4 | nibble,
                    digits: digits + 1,
                }
            }
            (Chunk::Size { value, digits }, b';' | b' ' | b'\t') if digits > 0 => {
                Chunk::Extension { value }
            }
            (Chunk::Size { value, digits }, b'\r') if digits > 0 => Chunk::SizeLf { value },
            (Chunk::Extension { value }, b'\r') => Chunk::SizeLf { value },
            (Chunk::Extension { value }, _) => Chunk::Extension { value },
            (Chunk::SizeLf { value: 0 }, b'\n') => Chunk::Trailer {
                at_line_start: true,
            },
            (Chunk::SizeLf { value }, b'\n') => Chunk::Data {
                remaining_bytes: value,
            },
            (Chunk::DataCr, b'\r') => Chunk::DataLf,
            (Chunk::DataLf, b'\n') => Chunk::Size {
                value: 0,
                digits: 0,
            },
            (Chunk::Trailer { at_line_start }, b'\n') => {
                if at_line_start {
                    return Ok((None, at));
                }
                Chunk::Trailer {
                    at_line_start: true,
                }
            }
            (Chunk::Trailer { at_line_start }, b'\r') => Chunk::Trailer { at_line_start },
            (Chunk::Trailer { .. }, _) => Chunk::Trailer {
                at_line_start: false,
            },
            _ => return Err(ResponseError::Chunk),
        };
    }
    Ok((Some(chunk), at))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `response` in pieces of `step` bytes, the way reads may deliver it, and returns the
    /// result of the piece that completed it.
    fn feed_in_steps(response: &[u8], step: usize) -> Result<Parsed, ResponseError> {
        let mut reader = ResponseReader::default();
        let mut pending: Vec<u8> = Vec::new();
        for piece in response.chunks(step) {
            pending.extend_from_slice(piece);
            match reader.advance(&pending)? {
                Parsed::NeedMore { consumed } => {
                    pending.drain(..consumed);
                }
                complete => return Ok(complete),
            }
        }
        Ok(Parsed::NeedMore { consumed: 0 })
    }

    /// The status and close flag, after checking every way of splitting the bytes agrees.
    fn status_of(response: &[u8]) -> (u16, bool) {
        let whole = feed_in_steps(response, response.len()).unwrap();
        for step in 1..response.len() {
            assert_eq!(
                feed_in_steps(response, step).map(status_close),
                Ok(status_close(whole))
            );
        }
        status_close(whole)
    }

    fn status_close(parsed: Parsed) -> (u16, bool) {
        match parsed {
            Parsed::Complete { status, close, .. } => (status, close),
            Parsed::NeedMore { .. } => panic!("incomplete"),
        }
    }

    #[test]
    fn redirect_without_body() {
        let response =
            b"HTTP/1.1 302 Found\r\nLocation: https://example.com/\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(status_of(response), (302, false));
        let mut reader = ResponseReader::default();
        assert_eq!(
            reader.advance(response),
            Ok(Parsed::Complete {
                status: 302,
                close: false,
                consumed: response.len()
            })
        );
    }

    #[test]
    fn sized_body_is_skipped_in_any_split() {
        let response = b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\nConnection: keep-alive\r\n\r\nnot found";
        assert_eq!(status_of(response), (404, false));
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers() {
        let response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: 1\r\n\r\n";
        assert_eq!(status_of(response), (200, false));
        let empty = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(status_of(empty), (200, false));
    }

    #[test]
    fn close_and_http10_are_noticed() {
        let close = b"HTTP/1.1 302 Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(status_of(close), (302, true));
        let old = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(status_of(old), (200, true));
        let old_keep = b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(status_of(old_keep), (200, false));
    }

    #[test]
    fn no_length_means_the_body_ends_at_close() {
        let mut reader = ResponseReader::default();
        let response = b"HTTP/1.1 302 Found\r\nLocation: /x\r\n\r\nsome body";
        assert_eq!(
            reader.advance(response),
            Ok(Parsed::NeedMore {
                consumed: response.len()
            })
        );
        assert_eq!(reader.finish_on_close(), Some(302));
        assert!(!reader.is_at_head());
        reader.reset();
        assert_eq!(reader.finish_on_close(), None);
        assert!(reader.is_at_head());
    }

    #[test]
    fn no_body_statuses_end_at_the_head() {
        let response = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n";
        assert_eq!(status_of(response), (304, false));
        let response = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(status_of(response), (204, false));
    }

    #[test]
    fn interim_responses_are_skipped() {
        let response =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(status_of(response), (201, false));
    }

    #[test]
    fn malformed_responses_are_errors() {
        let cases: [&[u8]; 6] = [
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ];
        for response in cases {
            let mut reader = ResponseReader::default();
            assert!(
                reader.advance(response).is_err(),
                "{}",
                String::from_utf8_lossy(response)
            );
        }
    }

    #[test]
    fn too_many_headers_are_an_error() {
        let mut response = b"HTTP/1.1 200 OK\r\n".to_vec();
        for index in 0..=HEADERS_COUNT_MAX {
            response.extend_from_slice(format!("X-{index}: 1\r\n").as_bytes());
        }
        response.extend_from_slice(b"\r\n");
        assert_eq!(
            ResponseReader::default().advance(&response),
            Err(ResponseError::Head(httparse::Error::TooManyHeaders))
        );
    }
}
