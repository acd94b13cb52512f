//! Reading link rows from the interchange formats `kurz import` accepts: TSV (`code<TAB>url`,
//! or a bare URL for a generated code), CSV with a header row, and NDJSON. Owns parsing only:
//! a row comes out as text fields with its line number; validation happens in the importer.

use std::io::{self, BufRead};
use std::path::Path;

use serde::Deserialize;

/// Longest input line accepted, in bytes; a longer one is an error for that line, not an
/// out-of-memory for the process.
pub const LINE_BYTES_MAX: usize = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Tsv,
    Csv,
    Ndjson,
}

impl Format {
    /// Guesses the format from the file name: `.csv`, `.ndjson`/`.jsonl`/`.json`, else TSV.
    pub fn from_path(path: &Path) -> Format {
        match path.extension().and_then(|ext| ext.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("csv") => Format::Csv,
            Some(ext)
                if ["ndjson", "jsonl", "json"]
                    .iter()
                    .any(|known| ext.eq_ignore_ascii_case(known)) =>
            {
                Format::Ndjson
            }
            _ => Format::Tsv,
        }
    }
}

/// One input row, before validation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Row {
    #[serde(default, alias = "short_code", alias = "alias")]
    pub code: Option<String>,
    #[serde(alias = "url")]
    pub long_url: String,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub max_clicks: Option<u64>,
    #[serde(default)]
    pub redirect_status: Option<u16>,
    #[serde(default)]
    pub forward_query: Option<bool>,
    #[serde(default)]
    pub created_at: Option<String>,
}

/// A row, or why its line could not be read as one.
pub type RowResult = Result<Row, String>;

/// Calls `f(line_number, row, bytes_read_so_far)` for every data row of `input`. An I/O error
/// stops the walk; a malformed row is passed on as `Err` so the importer can report it.
pub fn for_each_row(
    format: Format,
    input: impl BufRead,
    f: impl FnMut(u64, RowResult, u64),
) -> io::Result<()> {
    match format {
        Format::Tsv => for_each_line(input, f, tsv_row),
        Format::Ndjson => for_each_line(input, f, |line| {
            serde_json::from_str::<Row>(line).map_err(|error| format!("invalid JSON: {error}"))
        }),
        Format::Csv => for_each_csv_row(input, f),
    }
}

fn tsv_row(line: &str) -> RowResult {
    let mut fields = line.split('\t');
    let (code, url) = match (fields.next(), fields.next(), fields.next()) {
        (Some(url), None, _) => (None, url),
        (Some(code), Some(url), None) => (Some(code.to_owned()), url),
        _ => return Err("expected `code<TAB>url` or a bare URL".into()),
    };
    Ok(Row {
        code: code.filter(|code| !code.is_empty()),
        long_url: url.to_owned(),
        ..Row::default()
    })
}

fn for_each_line(
    mut input: impl BufRead,
    mut f: impl FnMut(u64, RowResult, u64),
    parse: impl Fn(&str) -> RowResult,
) -> io::Result<()> {
    let mut raw = Vec::with_capacity(512);
    let mut line_number = 0u64;
    let mut bytes_read = 0u64;
    loop {
        raw.clear();
        let read =
            io::Read::take(&mut input, LINE_BYTES_MAX as u64 + 1).read_until(b'\n', &mut raw)?;
        if read == 0 {
            return Ok(());
        }
        bytes_read += read as u64;
        line_number += 1;
        if raw.len() > LINE_BYTES_MAX && !raw.ends_with(b"\n") {
            // Skip the rest of the oversized line.
            let mut rest = Vec::new();
            loop {
                rest.clear();
                let more = io::Read::take(&mut input, 1 << 16).read_until(b'\n', &mut rest)?;
                bytes_read += more as u64;
                if more == 0 || rest.ends_with(b"\n") {
                    break;
                }
            }
            f(
                line_number,
                Err(format!("line is longer than {LINE_BYTES_MAX} bytes")),
                bytes_read,
            );
            continue;
        }
        let text = match std::str::from_utf8(&raw) {
            Ok(text) => text.trim_end_matches(['\n', '\r']),
            Err(_) => {
                f(
                    line_number,
                    Err("line is not valid UTF-8".into()),
                    bytes_read,
                );
                continue;
            }
        };
        let trimmed = text.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || is_tsv_header(trimmed) {
            continue;
        }
        f(line_number, parse(text), bytes_read);
    }
}

fn is_tsv_header(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    lower == "code\turl" || lower == "code\tlong_url"
}

fn for_each_csv_row(input: impl BufRead, mut f: impl FnMut(u64, RowResult, u64)) -> io::Result<()> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .trim(csv::Trim::All)
        .from_reader(input);
    let headers = reader.headers().map_err(io::Error::other)?.clone();
    let has_url = headers
        .iter()
        .any(|name| name.eq_ignore_ascii_case("url") || name.eq_ignore_ascii_case("long_url"));
    if !has_url {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("CSV header {headers:?} has no `url` or `long_url` column"),
        ));
    }
    let mut record = csv::StringRecord::new();
    loop {
        let position_before = reader.position().line();
        match reader.read_record(&mut record) {
            Ok(false) => return Ok(()),
            Ok(true) => {
                let line = record
                    .position()
                    .map(|position| position.line())
                    .unwrap_or(position_before);
                let bytes = reader.position().byte();
                let row = record
                    .deserialize::<Row>(Some(&headers))
                    .map(|mut row| {
                        row.code = row.code.filter(|code| !code.is_empty());
                        row
                    })
                    .map_err(|error| format!("invalid CSV row: {error}"));
                f(line, row, bytes);
            }
            Err(error) if error.is_io_error() => return Err(io::Error::other(error)),
            Err(error) => {
                let line = error
                    .position()
                    .map(|position| position.line())
                    .unwrap_or(position_before + 1);
                f(
                    line,
                    Err(format!("invalid CSV: {error}")),
                    reader.position().byte(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(format: Format, text: &str) -> Vec<(u64, RowResult)> {
        let mut out = Vec::new();
        for_each_row(format, text.as_bytes(), |line, row, _| {
            out.push((line, row))
        })
        .expect("read");
        out
    }

    #[test]
    fn tsv_rows_headers_comments_and_bare_urls() {
        let got = rows(
            Format::Tsv,
            "code\turl\n# comment\nabc\thttps://a/\n\nhttps://b/\r\nx\ty\tz\n",
        );
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].0, 3);
        assert_eq!(got[0].1.as_ref().expect("row").code.as_deref(), Some("abc"));
        assert_eq!(got[1].0, 5);
        assert_eq!(got[1].1.as_ref().expect("row").code, None);
        assert_eq!(got[1].1.as_ref().expect("row").long_url, "https://b/");
        assert_eq!(got[2].0, 6);
        assert!(got[2].1.is_err());
    }

    #[test]
    fn invalid_utf8_and_oversized_lines_are_row_errors() {
        let mut input = b"ok\thttps://a/\n\xff\xfe\thttps://b/\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', LINE_BYTES_MAX + 10));
        input.extend(b"\nlast\thttps://c/\n");
        let mut got = Vec::new();
        for_each_row(Format::Tsv, &input[..], |line, row, _| {
            got.push((line, row.is_ok()))
        })
        .expect("read");
        assert_eq!(got, vec![(1, true), (2, false), (3, false), (4, true)]);
    }

    #[test]
    fn csv_with_header_and_quoting() {
        let got = rows(
            Format::Csv,
            "code,url,max_clicks\nabc,\"https://a/?x=1,2\",5\n,https://b/,\nbad,https://c/,notanumber\n",
        );
        assert_eq!(got.len(), 3);
        let first = got[0].1.as_ref().expect("row");
        assert_eq!(first.long_url, "https://a/?x=1,2");
        assert_eq!(first.max_clicks, Some(5));
        assert_eq!(got[1].1.as_ref().expect("row").code, None);
        assert_eq!(got[2].0, 4);
        assert!(got[2].1.is_err());
    }

    #[test]
    fn csv_without_url_column_is_refused() {
        let result = for_each_row(Format::Csv, &b"code,target\na,b\n"[..], |_, _, _| {});
        assert!(result.is_err());
    }

    #[test]
    fn ndjson_rows() {
        let got = rows(
            Format::Ndjson,
            "{\"code\":\"a\",\"long_url\":\"https://a/\",\"redirect_status\":301}\n{\"url\":\"https://b/\"}\n{nope\n",
        );
        assert_eq!(got[0].1.as_ref().expect("row").redirect_status, Some(301));
        assert_eq!(got[1].1.as_ref().expect("row").long_url, "https://b/");
        assert_eq!(got[2].0, 3);
        assert!(got[2].1.is_err());
    }

    #[test]
    fn format_from_extension() {
        assert_eq!(Format::from_path(Path::new("x.CSV")), Format::Csv);
        assert_eq!(Format::from_path(Path::new("x.jsonl")), Format::Ndjson);
        assert_eq!(Format::from_path(Path::new("x.tsv")), Format::Tsv);
        assert_eq!(Format::from_path(Path::new("x")), Format::Tsv);
    }
}
