//! The data-file commands' library side: `import` (rows from TSV, CSV or NDJSON, validated,
//! written straight into a new snapshot) and `export` (every link as NDJSON, TSV or CSV).
//!
//! Owns the mapping between interchange rows and links. Validation is the link rules' (`links`);
//! storage is the store's. An import either writes a complete new snapshot or changes nothing.

pub mod rows;

use std::fs::File;
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::fsutil::DurableFile;
use crate::links::{codegen, validate};
use crate::store::link::{Link, LinkMeta, LinkStatus, LinkView, LongUrl, RedirectStatus};
use crate::store::snapshot::{AddError, SnapshotBuilder};
use crate::store::{SnapshotReport, Store, StoreError};
use crate::timefmt::{now_s, parse_rfc3339, rfc3339};
pub use rows::Format;
use rows::Row;

/// Rejected rows kept with their reasons; the rest are only counted.
pub const REJECTIONS_KEPT_MAX: usize = 1000;
/// Draws of a random code before the importer gives up on a row (each draw is checked against
/// every link already in the new snapshot).
const CODE_DRAWS_MAX: usize = 16;
const READ_BUFFER_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the list of skipped rows to {path}: {source}")]
    Rejects { path: PathBuf, source: io::Error },
    #[error("{rejected} row(s) failed validation (first: line {line}: {reason}); --strict: nothing was imported")]
    Strict {
        rejected: u64,
        line: u64,
        reason: String,
    },
}

/// How to import. `Default` gives the serve defaults: format from the file name, the default
/// URL rules, 7-character generated codes, non-strict.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// None: guess from the file name.
    pub format: Option<Format>,
    pub url_rules: validate::UrlRules,
    pub code_len: usize,
    /// Refuse the whole import when any row fails.
    pub strict: bool,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
    /// Write every skipped row here as `line<TAB>reason` (temp file + fsync + rename), not only
    /// the first [`REJECTIONS_KEPT_MAX`] the report keeps.
    pub rejects: Option<PathBuf>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            format: None,
            url_rules: validate::UrlRules::default(),
            code_len: codegen::CODE_LEN_DEFAULT,
            strict: false,
            progress: false,
            rejects: None,
        }
    }
}

/// One row that was not imported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub line: u64,
    pub reason: String,
}

#[derive(Debug)]
pub struct ImportReport {
    pub imported: u64,
    pub generated_codes: u64,
    pub rejected: u64,
    /// The first [`REJECTIONS_KEPT_MAX`] rejections, in file order.
    pub rejections: Vec<Rejection>,
    pub snapshot: SnapshotReport,
    pub duration_ms: u64,
}

fn row_to_link(
    row: Row,
    code: String,
    now: i64,
    rules: &validate::UrlRules,
) -> Result<Link, String> {
    let long_url = validate::long_url(&row.long_url, rules).map_err(|error| error.to_string())?;
    let created_at_s = row
        .created_at
        .as_deref()
        .map(parse_rfc3339)
        .transpose()?
        .unwrap_or(now);
    let redirect_status = row
        .redirect_status
        .map(|status| {
            RedirectStatus::from_code(status)
                .ok_or_else(|| format!("redirect_status {status} is not one of 301, 302, 307, 308"))
        })
        .transpose()?;
    Ok(Link {
        code,
        long_url,
        meta: LinkMeta {
            expires_at_s: row.expires_at.as_deref().map(parse_rfc3339).transpose()?,
            max_clicks: row.max_clicks,
            redirect_status,
            forward_query: row.forward_query.unwrap_or(false),
            custom: row.code.is_some(),
            ..LinkMeta::new(created_at_s)
        },
    })
}

fn free_code(builder: &SnapshotBuilder, len: usize) -> Option<String> {
    (0..CODE_DRAWS_MAX)
        .map(|_| codegen::random_code(len))
        .find(|code| !builder.contains(code))
}

/// Tallies of one import, filled row by row.
#[derive(Default)]
struct Tally {
    imported: u64,
    generated_codes: u64,
    rejected: u64,
    rejections: Vec<Rejection>,
    /// Every rejection, when asked for, and the first error writing it.
    rejects: Option<(DurableFile, io::Result<()>)>,
}

impl Tally {
    fn reject(&mut self, line: u64, reason: String) {
        self.rejected += 1;
        if let Some((out, written @ Ok(()))) = &mut self.rejects {
            *written = writeln!(out, "{line}\t{}", reason.replace(['\t', '\n', '\r'], " "));
        }
        if self.rejections.len() < REJECTIONS_KEPT_MAX {
            self.rejections.push(Rejection { line, reason });
        }
    }
}

fn import_row(
    builder: &mut SnapshotBuilder,
    tally: &mut Tally,
    options: &ImportOptions,
    now: i64,
    row: Row,
) -> Result<(), String> {
    let (code, generated) = match &row.code {
        Some(code) if validate::is_code(code) => (code.clone(), false),
        Some(code) => {
            return Err(format!(
                "code {code:?} must be 1 to {} characters of A-Z, a-z, 0-9, '_' and '-'",
                validate::CODE_BYTES_MAX
            ))
        }
        None => match free_code(builder, options.code_len) {
            Some(code) => (code, true),
            None => return Err("no free code found; use a longer --code-length".into()),
        },
    };
    let link = row_to_link(row, code, now, &options.url_rules)?;
    builder.add(link.view()).map_err(|error| match error {
        AddError::Duplicate(code) => format!("code {code:?} already exists"),
        other => other.to_string(),
    })?;
    tally.imported += 1;
    tally.generated_codes += u64::from(generated);
    Ok(())
}

/// Rows an import reads before it sizes the builder for the whole input from them.
const SIZING_SAMPLE_ROWS: u64 = 4096;

/// Sizes a builder for an input of known length from what its first rows added.
struct InputSizing {
    /// The builder's record bytes before the input's first row (the store's own links).
    text_bytes_before: usize,
    total_bytes: u64,
}

impl InputSizing {
    /// Reserves room for the rest of the input, taking the `links` and record bytes its first
    /// `read_bytes` added as typical, plus a tenth: the builder then grows once, not by
    /// doublings that copy it all and hold it twice for a moment.
    fn reserve_rest(&self, builder: &mut SnapshotBuilder, links: u64, read_bytes: u64) {
        if read_bytes == 0 {
            return;
        }
        let rest = self.total_bytes.saturating_sub(read_bytes) as f64 / read_bytes as f64 * 1.1;
        let text_bytes = builder.text_bytes().saturating_sub(self.text_bytes_before);
        builder.reserve(
            (links as f64 * rest) as usize,
            (text_bytes as f64 * rest) as usize,
        );
    }
}

fn progress_bar(options: &ImportOptions, total_bytes: u64) -> ProgressBar {
    if !options.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}",
    );
    if let Ok(style) = style {
        bar.set_style(style);
    }
    bar
}

/// Imports `path` into `store` by writing a new snapshot that holds every existing link plus
/// every valid row. Rows that fail are reported with their line numbers; with
/// `options.strict` any failure leaves the store untouched. Blocking.
pub fn import(
    store: &Store,
    path: &Path,
    options: &ImportOptions,
) -> Result<ImportReport, ImportError> {
    let started = Instant::now();
    let read_error = |source| ImportError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let total_bytes = file.metadata().map_err(read_error)?.len();
    let format = options.format.unwrap_or_else(|| Format::from_path(path));
    let bar = progress_bar(options, total_bytes);
    let now = now_s();
    let rejects_error = |path: &Path| {
        let path = path.to_owned();
        move |source| ImportError::Rejects { path, source }
    };
    let mut tally = Tally::default();
    if let Some(path) = &options.rejects {
        let out = DurableFile::create(path).map_err(rejects_error(path))?;
        tally.rejects = Some((out, Ok(())));
    }
    let snapshot = store.snapshot_with(|builder| {
        let input = BufReader::with_capacity(READ_BUFFER_BYTES, file);
        let sizing = InputSizing {
            text_bytes_before: builder.text_bytes(),
            total_bytes,
        };
        rows::for_each_row(format, input, |line, row, bytes_read| {
            let outcome = row.and_then(|row| import_row(builder, &mut tally, options, now, row));
            if let Err(reason) = outcome {
                tally.reject(line, reason);
            }
            if line == SIZING_SAMPLE_ROWS {
                sizing.reserve_rest(builder, tally.imported, bytes_read);
            }
            if line % 65_536 == 0 {
                bar.set_position(bytes_read);
                bar.set_message(format!("{} links", tally.imported));
            }
        })
        .map_err(read_error)?;
        // Written before the snapshot, so a list that cannot be written stops the import.
        if let (Some((out, written)), Some(path)) = (tally.rejects.take(), &options.rejects) {
            written
                .and_then(|()| out.commit())
                .map_err(rejects_error(path))?;
        }
        if options.strict && tally.rejected > 0 {
            let first = tally.rejections[0].clone();
            return Err(ImportError::Strict {
                rejected: tally.rejected,
                line: first.line,
                reason: first.reason,
            });
        }
        Ok(())
    });
    bar.finish_and_clear();
    Ok(ImportReport {
        imported: tally.imported,
        generated_codes: tally.generated_codes,
        rejected: tally.rejected,
        rejections: tally.rejections,
        snapshot: snapshot?,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// One link as NDJSON and CSV export it (and as import reads it back).
#[derive(Serialize)]
struct ExportRow<'a> {
    code: &'a str,
    #[serde(serialize_with = "serialize_as_text")]
    long_url: LongUrl<'a>,
    created_at: String,
    updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_clicks: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redirect_status: Option<u16>,
    status: &'static str,
    custom: bool,
    forward_query: bool,
}

fn serialize_as_text<S: serde::Serializer>(url: &LongUrl<'_>, out: S) -> Result<S::Ok, S::Error> {
    out.collect_str(url)
}

pub fn status_name(status: LinkStatus) -> &'static str {
    match status {
        LinkStatus::Active => "active",
        LinkStatus::Disabled => "disabled",
        LinkStatus::Deleted => "deleted",
    }
}

impl<'a> ExportRow<'a> {
    fn of(link: &LinkView<'a>) -> ExportRow<'a> {
        let meta = &link.meta;
        ExportRow {
            code: link.code,
            long_url: link.long_url,
            created_at: rfc3339(meta.created_at_s),
            updated_at: rfc3339(meta.updated_at_s),
            expires_at: meta.expires_at_s.map(rfc3339),
            max_clicks: meta.max_clicks,
            redirect_status: meta.redirect_status.map(RedirectStatus::code),
            status: status_name(meta.status),
            custom: meta.custom,
            forward_query: meta.forward_query,
        }
    }
}

/// Where export rows go: plain lines, or a CSV writer that quotes.
enum Sink<W: Write> {
    Lines(io::BufWriter<W>),
    Csv(Box<csv::Writer<W>>),
}

impl<W: Write> Sink<W> {
    fn write(&mut self, format: Format, link: &LinkView<'_>) -> io::Result<()> {
        match self {
            Sink::Lines(out) if format == Format::Tsv => {
                writeln!(out, "{}\t{}", link.code, link.long_url)
            }
            Sink::Lines(out) => {
                serde_json::to_writer(&mut *out, &ExportRow::of(link)).map_err(io::Error::other)?;
                out.write_all(b"\n")
            }
            Sink::Csv(out) => out.serialize(ExportRow::of(link)).map_err(io::Error::other),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Lines(out) => out.flush(),
            Sink::Csv(out) => out.flush(),
        }
    }
}

/// Writes every link (tombstones only with `include_deleted`) to `out`. Returns the count.
pub fn export(
    store: &Store,
    format: Format,
    include_deleted: bool,
    out: impl Write,
) -> io::Result<u64> {
    let mut sink = match format {
        Format::Csv => Sink::Csv(Box::new(csv::Writer::from_writer(out))),
        Format::Tsv | Format::Ndjson => Sink::Lines(io::BufWriter::with_capacity(1 << 20, out)),
    };
    let mut count = 0u64;
    let mut failure: Option<io::Error> = None;
    store.for_each_link(|link| {
        if failure.is_some() || (link.meta.status == LinkStatus::Deleted && !include_deleted) {
            return;
        }
        match sink.write(format, &link) {
            Ok(()) => count += 1,
            Err(error) => failure = Some(error),
        }
    });
    if let Some(error) = failure {
        return Err(error);
    }
    sink.flush()?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::wal::FsyncPolicy;
    use crate::store::StoreOptions;

    fn open(dir: &Path) -> Store {
        Store::open(
            dir,
            StoreOptions {
                fsync: FsyncPolicy::Always,
            },
        )
        .expect("open store")
    }

    #[test]
    fn import_reports_bad_rows_and_keeps_good_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("links.tsv");
        std::fs::write(
            &input,
            "a1\thttps://example.com/1\nbad code\thttps://example.com/2\na2\tjavascript:alert(1)\na1\thttps://example.com/dup\nhttps://example.com/generated\n",
        )
        .expect("write input");
        let store = open(&dir.path().join("data"));
        let report = import(&store, &input, &ImportOptions::default()).expect("import");
        assert_eq!(report.imported, 2);
        assert_eq!(report.generated_codes, 1);
        assert_eq!(report.rejected, 3);
        let lines: Vec<u64> = report.rejections.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![2, 3, 4]);
        assert!(report.rejections[2].reason.contains("already exists"));
        assert_eq!(
            store.get("a1").map(|l| l.long_url),
            Some("https://example.com/1".into())
        );
        assert_eq!(store.live_links(), 2);
    }

    #[test]
    fn strict_import_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("links.tsv");
        std::fs::write(&input, "ok\thttps://example.com/\nno\tftp://example.com/\n")
            .expect("write");
        let store = open(&dir.path().join("data"));
        let options = ImportOptions {
            strict: true,
            ..ImportOptions::default()
        };
        let error = import(&store, &input, &options).expect_err("strict refuses");
        assert!(
            matches!(
                error,
                ImportError::Strict {
                    rejected: 1,
                    line: 2,
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(store.get("ok"), None);
        assert_eq!(store.snapshot_header().link_count, 0);
    }

    #[test]
    fn every_skipped_row_is_listed_in_the_rejects_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("links.tsv");
        let bad_rows = REJECTIONS_KEPT_MAX + 500;
        let mut text = String::from("good\thttps://example.com/\n");
        for row in 0..bad_rows {
            text.push_str(&format!("bad{row}\tftp://example.com/{row}\n"));
        }
        std::fs::write(&input, text).expect("write input");
        let store = open(&dir.path().join("data"));
        let rejects = dir.path().join("skipped.tsv");
        let options = ImportOptions {
            rejects: Some(rejects.clone()),
            ..ImportOptions::default()
        };
        let report = import(&store, &input, &options).expect("import");
        assert_eq!(report.imported, 1);
        assert_eq!(report.rejected, bad_rows as u64);
        assert_eq!(report.rejections.len(), REJECTIONS_KEPT_MAX);
        let listed = std::fs::read_to_string(&rejects).expect("rejects file");
        let lines: Vec<u64> = listed
            .lines()
            .map(|line| {
                let (number, reason) = line.split_once('\t').expect("line<TAB>reason");
                assert!(reason.contains("ftp"), "{reason}");
                number.parse().expect("line number")
            })
            .collect();
        let expected: Vec<u64> = (2..2 + bad_rows as u64).collect();
        assert_eq!(lines, expected);
        assert!(!crate::fsutil::temp_path(&rejects).exists());
    }

    #[test]
    fn a_rejects_file_that_cannot_be_written_stops_the_import() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("links.tsv");
        std::fs::write(&input, "ok\thttps://example.com/\nno\tftp://example.com/\n")
            .expect("write");
        let store = open(&dir.path().join("data"));
        let options = ImportOptions {
            rejects: Some(dir.path().join("missing-dir").join("skipped.tsv")),
            ..ImportOptions::default()
        };
        let error = import(&store, &input, &options).expect_err("no place for the list");
        assert!(matches!(error, ImportError::Rejects { .. }), "{error}");
        assert_eq!(store.get("ok"), None);
        assert_eq!(store.snapshot_header().link_count, 0);

        let rejects = dir.path().join("skipped.tsv");
        let strict = ImportOptions {
            strict: true,
            rejects: Some(rejects.clone()),
            ..ImportOptions::default()
        };
        import(&store, &input, &strict).expect_err("strict refuses");
        assert!(std::fs::read_to_string(&rejects)
            .expect("the list is written when strict refuses")
            .starts_with("2\t"));
        assert_eq!(store.get("ok"), None);
    }

    #[test]
    fn csv_and_ndjson_rows_without_a_code_get_generated_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let csv = dir.path().join("links.csv");
        std::fs::write(
            &csv,
            "code,url\n,https://example.com/csv-generated\nnamed,https://example.com/named\n",
        )
        .expect("write csv");
        let ndjson = dir.path().join("links.ndjson");
        std::fs::write(
            &ndjson,
            "{\"long_url\":\"https://example.com/json-generated\"}\n",
        )
        .expect("write ndjson");
        let store = open(&dir.path().join("data"));
        let options = ImportOptions {
            code_len: 9,
            ..ImportOptions::default()
        };
        let from_csv = import(&store, &csv, &options).expect("csv import");
        assert_eq!((from_csv.imported, from_csv.generated_codes), (2, 1));
        let from_ndjson = import(&store, &ndjson, &options).expect("ndjson import");
        assert_eq!((from_ndjson.imported, from_ndjson.generated_codes), (1, 1));
        let mut tsv = Vec::new();
        export(&store, Format::Tsv, false, &mut tsv).expect("export");
        let exported = String::from_utf8_lossy(&tsv).into_owned();
        for url in [
            "https://example.com/csv-generated",
            "https://example.com/json-generated",
        ] {
            let line = exported
                .lines()
                .find(|line| line.ends_with(url))
                .unwrap_or_else(|| panic!("{url} not exported: {exported}"));
            let code = line.split('\t').next().expect("code");
            assert_eq!(code.len(), 9, "{line}");
            assert_eq!(store.get(code).map(|link| link.long_url), Some(url.into()));
        }
        assert_eq!(
            store.get("named").map(|link| link.long_url),
            Some("https://example.com/named".into())
        );
    }

    #[test]
    fn export_then_import_round_trips_every_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("links.ndjson");
        std::fs::write(
            &input,
            concat!(
                "{\"code\":\"rich\",\"long_url\":\"https://example.com/r\",\"expires_at\":\"2030-01-01T00:00:00Z\",",
                "\"max_clicks\":7,\"redirect_status\":308,\"forward_query\":true,\"created_at\":\"2024-05-01T10:00:00Z\"}\n",
                "{\"code\":\"plain\",\"long_url\":\"https://example.com/p\"}\n"
            ),
        )
        .expect("write");
        let first = open(&dir.path().join("one"));
        import(&first, &input, &ImportOptions::default()).expect("import");
        let exported = dir.path().join("export.ndjson");
        let file = File::create(&exported).expect("create");
        assert_eq!(
            export(&first, Format::Ndjson, false, file).expect("export"),
            2
        );
        let second = open(&dir.path().join("two"));
        import(&second, &exported, &ImportOptions::default()).expect("re-import");
        for code in ["rich", "plain"] {
            let (a, b) = (
                first.get(code).expect("first"),
                second.get(code).expect("second"),
            );
            assert_eq!(a.long_url, b.long_url);
            assert_eq!(a.meta.expires_at_s, b.meta.expires_at_s);
            assert_eq!(a.meta.max_clicks, b.meta.max_clicks);
            assert_eq!(a.meta.redirect_status, b.meta.redirect_status);
            assert_eq!(a.meta.forward_query, b.meta.forward_query);
            assert_eq!(a.meta.created_at_s, b.meta.created_at_s);
        }
        let rich = second.get("rich").expect("rich");
        assert_eq!(rich.meta.created_at_s, 1_714_557_600);
    }

    #[test]
    fn export_formats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("links.tsv");
        std::fs::write(&input, "a\thttps://example.com/a?x=1,2\n").expect("write");
        let store = open(&dir.path().join("data"));
        import(&store, &input, &ImportOptions::default()).expect("import");
        let mut tsv = Vec::new();
        export(&store, Format::Tsv, false, &mut tsv).expect("tsv");
        assert_eq!(
            String::from_utf8_lossy(&tsv),
            "a\thttps://example.com/a?x=1,2\n"
        );
        let mut csv = Vec::new();
        export(&store, Format::Csv, false, &mut csv).expect("csv");
        let csv = String::from_utf8_lossy(&csv);
        assert!(csv.starts_with("code,long_url,"), "{csv}");
        assert!(csv.contains("\"https://example.com/a?x=1,2\""), "{csv}");
    }
}
