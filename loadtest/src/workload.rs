//! What to send: reads the code list, builds the bytes of every request once before the run (one
//! `GET` per known code, one per generated unknown code, a `POST` template for creates), and picks
//! the next request. The hot path only chooses an index and hands out a slice: it never formats or
//! allocates.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::sampler::{CodeSampler, Rng, Zipf};
use crate::target::Target;

/// Longest code accepted from the file, in bytes (kurz allows 64; other servers may allow more).
pub const CODE_BYTES_MAX: usize = 256;
/// Most codes read from one file; 50M codes take about 2.5 GB of pre-built requests.
pub const CODES_COUNT_MAX: usize = 50_000_000;
/// How many distinct unknown codes are generated for `--miss-ratio`.
pub const MISS_CODES_COUNT: usize = 4096;
/// Length of generated unknown codes is the first code's length, kept within these bounds so
/// there are always enough of them that cannot collide with the file.
const MISS_CODE_BYTES_MIN: usize = 7;
const MISS_CODE_BYTES_MAX: usize = 64;
/// Rounds of redrawing unknown codes that collided with the file before giving up.
const MISS_CODE_ROUNDS_MAX: usize = 16;
/// Longest `--api-key`, in bytes.
pub const API_KEY_BYTES_MAX: usize = 1024;
/// Hex digits of randomness in each created URL; rewritten in place before every create.
const CREATE_RANDOM_DIGITS: usize = 16;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

#[derive(Debug, Error)]
pub enum WorkloadError {
    #[error("cannot read codes file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("codes file {path}, line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("codes file {path} holds more than {CODES_COUNT_MAX} codes; use a smaller sample")]
    TooManyCodes { path: PathBuf },
    #[error("codes file {path} holds no codes (one per line, or TSV with the code first)")]
    NoCodes { path: PathBuf },
    #[error(
        "no codes to read: give --codes FILE, or send only unknown codes (--miss-ratio 1) or only \
         creates (--mix 0:1)"
    )]
    CodesRequired,
    #[error("could not generate {MISS_CODES_COUNT} unknown codes that are not in the codes file")]
    MissCodes,
    #[error("--api-key must be visible ASCII without spaces, at most {API_KEY_BYTES_MAX} bytes")]
    ApiKey,
}

/// What the workload is made of, straight from the flags (already range-checked).
#[derive(Debug, Clone)]
pub struct WorkloadSpec<'a> {
    pub codes_path: Option<&'a Path>,
    pub zipf_exponent: Option<f64>,
    pub miss_ratio: f64,
    pub create_share: f64,
    pub api_key: Option<&'a str>,
    pub seed: u64,
}

/// The next request to send: an index into the pre-built reads, or a create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    Read(usize),
    Create,
}

/// Every request of the run, pre-built; shared read-only by the generator threads.
#[derive(Debug)]
pub struct Workload {
    /// All `GET` requests back to back: the known codes (in file order), then the unknown ones.
    reads: Vec<u8>,
    /// `read_ends[i]` is where request `i` ends in `reads`; it starts where `i - 1` ends.
    read_ends: Vec<usize>,
    known_count: usize,
    unknown_count: usize,
    sampler: Option<CodeSampler>,
    miss_ratio: f64,
    create_share: f64,
    create_template: Vec<u8>,
    /// Where the random hex digits sit in `create_template`.
    create_random_at: usize,
}

impl Workload {
    pub fn build(target: &Target, spec: &WorkloadSpec) -> Result<Self, WorkloadError> {
        if spec.api_key.is_some_and(|key| {
            key.len() > API_KEY_BYTES_MAX || !key.bytes().all(|b| b.is_ascii_graphic())
        }) {
            return Err(WorkloadError::ApiKey);
        }
        let needs_known = spec.miss_ratio < 1.0 && spec.create_share < 1.0;
        let codes = match spec.codes_path {
            Some(path) => read_codes(path)?,
            None if needs_known => return Err(WorkloadError::CodesRequired),
            None => Codes::default(),
        };
        let known_count = codes.ends.len();
        let first_code_bytes = codes.ends.first().copied().unwrap_or(MISS_CODE_BYTES_MIN);
        let unknown = unknown_codes(&codes, first_code_bytes, spec.seed)?;

        let request_prefix = format!("GET {}/", target.path_prefix);
        let request_suffix = format!(" HTTP/1.1\r\nHost: {}\r\n\r\n", target.host_header);
        let per_request = request_prefix.len() + request_suffix.len();
        let mut reads = Vec::with_capacity(
            codes.bytes.len()
                + unknown.bytes.len()
                + per_request * (known_count + MISS_CODES_COUNT),
        );
        let mut read_ends = Vec::with_capacity(known_count + MISS_CODES_COUNT);
        for code in codes.iter().chain(unknown.iter()) {
            reads.extend_from_slice(request_prefix.as_bytes());
            reads.extend_from_slice(code);
            reads.extend_from_slice(request_suffix.as_bytes());
            read_ends.push(reads.len());
        }
        let sampler = (known_count > 0).then(|| match spec.zipf_exponent {
            Some(exponent) => CodeSampler::Zipf(Zipf::new(known_count as u64, exponent)),
            None => CodeSampler::Uniform {
                count: known_count as u64,
            },
        });
        let (create_template, create_random_at) = create_template(target, spec.api_key);
        Ok(Self {
            reads,
            read_ends,
            known_count,
            unknown_count: unknown.ends.len(),
            sampler,
            miss_ratio: spec.miss_ratio,
            create_share: spec.create_share,
            create_template,
            create_random_at,
        })
    }

    #[cfg(test)]
    pub fn known_count(&self) -> usize {
        self.known_count
    }

    /// Chooses the next request: a create with the mix's share, else a read of an unknown code
    /// with the miss ratio, else a known code drawn by the sampler.
    pub fn pick(&self, rng: &mut Rng) -> Pick {
        if self.create_share > 0.0 && rng.unit_f64() < self.create_share {
            return Pick::Create;
        }
        match &self.sampler {
            Some(sampler) if self.miss_ratio == 0.0 || rng.unit_f64() >= self.miss_ratio => {
                Pick::Read(sampler.sample(rng) as usize)
            }
            _ => Pick::Read(self.known_count + rng.below(self.unknown_count as u64) as usize),
        }
    }

    /// The bytes of read request `index`.
    pub fn read_request(&self, index: usize) -> &[u8] {
        let start = match index {
            0 => 0,
            _ => self.read_ends[index - 1],
        };
        &self.reads[start..self.read_ends[index]]
    }

    /// A private copy of the create request for one connection to rewrite with
    /// [`Workload::randomize_create`].
    pub fn create_template(&self) -> Vec<u8> {
        self.create_template.clone()
    }

    /// Puts fresh random digits into a create request copied from [`Workload::create_template`],
    /// so each create asks for a new URL; the length never changes.
    pub fn randomize_create(&self, request: &mut [u8], rng: &mut Rng) {
        let digits =
            &mut request[self.create_random_at..self.create_random_at + CREATE_RANDOM_DIGITS];
        let mut random = rng.next_u64();
        for digit in digits.iter_mut() {
            *digit = b"0123456789abcdef"[(random & 0xf) as usize];
            random >>= 4;
        }
    }
}

/// Codes packed back to back; `ends[i]` is where code `i` ends.
#[derive(Debug, Default)]
struct Codes {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Codes {
    fn push(&mut self, code: &[u8]) {
        self.bytes.extend_from_slice(code);
        self.ends.push(self.bytes.len());
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter())
            .map(|(start, &end)| &self.bytes[start..end])
    }
}

/// Reads one code per line: the whole line, or the text before the first tab (TSV
/// `code<TAB>url`). Blank lines and lines starting with `#` are skipped.
fn read_codes(path: &Path) -> Result<Codes, WorkloadError> {
    let read_error = |source| WorkloadError::Read {
        path: path.to_owned(),
        source,
    };
    let mut reader = BufReader::with_capacity(1 << 20, File::open(path).map_err(read_error)?);
    let mut codes = Codes::default();
    let mut line = Vec::new();
    let mut line_number = 0;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(read_error)? == 0 {
            break;
        }
        line_number += 1;
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let code = text.split(|&byte| byte == b'\t').next().unwrap_or(text);
        if code.is_empty() || code[0] == b'#' {
            continue;
        }
        let line_error = |reason: String| WorkloadError::Line {
            path: path.to_owned(),
            line: line_number,
            reason,
        };
        if code.len() > CODE_BYTES_MAX {
            return Err(line_error(format!(
                "code longer than {CODE_BYTES_MAX} bytes"
            )));
        }
        if let Some(bad) = code.iter().find(|byte| !byte.is_ascii_graphic()) {
            return Err(line_error(format!(
                "byte 0x{bad:02x} cannot be sent in a request path; codes are visible ASCII"
            )));
        }
        if codes.ends.len() == CODES_COUNT_MAX {
            return Err(WorkloadError::TooManyCodes {
                path: path.to_owned(),
            });
        }
        codes.push(code);
    }
    if codes.ends.is_empty() {
        return Err(WorkloadError::NoCodes {
            path: path.to_owned(),
        });
    }
    Ok(codes)
}

/// Draws [`MISS_CODES_COUNT`] base62 codes that match no code of the file, compared without
/// case: nginx's `map` ignores case, and a miss must be a miss for every server compared.
fn unknown_codes(known: &Codes, code_bytes: usize, seed: u64) -> Result<Codes, WorkloadError> {
    let code_bytes = code_bytes.clamp(MISS_CODE_BYTES_MIN, MISS_CODE_BYTES_MAX);
    let mut rng = Rng::new(seed ^ 0x6d69_7373);
    let mut chosen: HashSet<Vec<u8>> = HashSet::with_capacity(MISS_CODES_COUNT);
    for _ in 0..MISS_CODE_ROUNDS_MAX {
        while chosen.len() < MISS_CODES_COUNT {
            let code = (0..code_bytes)
                .map(|_| BASE62[rng.below(BASE62.len() as u64) as usize])
                .collect::<Vec<u8>>();
            chosen.insert(code.to_ascii_lowercase());
        }
        let before = chosen.len();
        for code in known.iter().filter(|code| code.len() == code_bytes) {
            chosen.remove(&code.to_ascii_lowercase());
        }
        if chosen.len() == before {
            let mut codes = Codes::default();
            for code in &chosen {
                codes.push(code);
            }
            return Ok(codes);
        }
    }
    Err(WorkloadError::MissCodes)
}

/// The create request with a placeholder for the random part of the URL, and where it sits.
fn create_template(target: &Target, api_key: Option<&str>) -> (Vec<u8>, usize) {
    let body_prefix = "{\"long_url\":\"https://example.com/";
    let body = format!("{body_prefix}{}\"}}", "0".repeat(CREATE_RANDOM_DIGITS));
    let authorization = api_key
        .map(|key| format!("Authorization: Bearer {key}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST {}/api/v1/shorten HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         {authorization}Content-Length: {}\r\n\r\n",
        target.path_prefix,
        target.host_header,
        body.len()
    );
    let random_at = head.len() + body_prefix.len();
    ((head + &body).into_bytes(), random_at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn target() -> Target {
        Target::parse("http://127.0.0.1:8080").unwrap()
    }

    fn spec(path: Option<&Path>) -> WorkloadSpec<'_> {
        WorkloadSpec {
            codes_path: path,
            zipf_exponent: None,
            miss_ratio: 0.0,
            create_share: 0.0,
            api_key: None,
            seed: 1,
        }
    }

    fn codes_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn reads_plain_and_tsv_lines_and_builds_requests() {
        let file = codes_file("abc\n# comment\r\n\nXyZ_1\thttps://example.com/x\r\n");
        let workload = Workload::build(&target(), &spec(Some(file.path()))).unwrap();
        assert_eq!(workload.known_count(), 2);
        assert_eq!(
            workload.read_request(0),
            b"GET /abc HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
        );
        assert_eq!(
            workload.read_request(1),
            b"GET /XyZ_1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
        );
    }

    #[test]
    fn refuses_bad_files() {
        let empty = codes_file("\n# nothing\n");
        assert!(matches!(
            Workload::build(&target(), &spec(Some(empty.path()))),
            Err(WorkloadError::NoCodes { .. })
        ));
        let spaced = codes_file("ok\nbad code\n");
        match Workload::build(&target(), &spec(Some(spaced.path()))) {
            Err(WorkloadError::Line { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected a line error, got {other:?}"),
        }
        let missing = Path::new("/nonexistent/codes.tsv");
        assert!(matches!(
            Workload::build(&target(), &spec(Some(missing))),
            Err(WorkloadError::Read { .. })
        ));
        assert!(matches!(
            Workload::build(&target(), &spec(None)),
            Err(WorkloadError::CodesRequired)
        ));
    }

    #[test]
    fn unknown_codes_never_match_known_ones_ignoring_case() {
        let mut text = String::new();
        let mut known = HashSet::new();
        let mut rng = Rng::new(9);
        for _ in 0..20_000 {
            let code: String = (0..7)
                .map(|_| BASE62[rng.below(62) as usize] as char)
                .collect();
            known.insert(code.to_ascii_lowercase());
            text.push_str(&code);
            text.push('\n');
        }
        let file = codes_file(&text);
        let workload = Workload::build(&target(), &spec(Some(file.path()))).unwrap();
        for index in workload.known_count()..workload.known_count() + MISS_CODES_COUNT {
            let request = std::str::from_utf8(workload.read_request(index)).unwrap();
            let code = &request[5..12];
            assert!(!known.contains(&code.to_ascii_lowercase()), "{code}");
        }
    }

    #[test]
    fn pick_respects_miss_ratio_and_mix() {
        let file = codes_file("a\nb\nc\n");
        let mut spec = spec(Some(file.path()));
        spec.miss_ratio = 0.25;
        spec.create_share = 0.5;
        let workload = Workload::build(&target(), &spec).unwrap();
        let mut rng = Rng::new(5);
        let (mut creates, mut misses, mut hits) = (0, 0, 0);
        for _ in 0..100_000 {
            match workload.pick(&mut rng) {
                Pick::Create => creates += 1,
                Pick::Read(index) if index >= workload.known_count() => misses += 1,
                Pick::Read(_) => hits += 1,
            }
        }
        assert!((45_000..55_000).contains(&creates), "{creates}");
        assert!((10_000..15_000).contains(&misses), "{misses}");
        assert!((35_000..40_000).contains(&hits), "{hits}");
    }

    #[test]
    fn create_requests_carry_json_and_the_key() {
        let mut spec = spec(None);
        spec.create_share = 1.0;
        spec.api_key = Some("sekret");
        let workload = Workload::build(&target(), &spec).unwrap();
        let mut request = workload.create_template();
        let before = request.len();
        workload.randomize_create(&mut request, &mut Rng::new(2));
        assert_eq!(request.len(), before);
        let text = String::from_utf8(request).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("POST /api/v1/shorten HTTP/1.1\r\n"));
        assert!(head.contains("\r\nAuthorization: Bearer sekret\r\n"));
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
        assert!(body.starts_with("{\"long_url\":\"https://example.com/"));
        assert!(!body.contains("0000000000000000"));
    }

    #[test]
    fn refuses_an_api_key_that_would_break_the_header() {
        let mut spec = spec(None);
        spec.create_share = 1.0;
        spec.api_key = Some("a\r\nX-Evil: 1");
        assert!(matches!(
            Workload::build(&target(), &spec),
            Err(WorkloadError::ApiKey)
        ));
    }
}
