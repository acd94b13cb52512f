//! The raw click log (`--click-log FILE`) for users who ship clicks elsewhere (a log shipper, a
//! warehouse): one JSON object per served redirect, appended by the aggregator thread, written
//! and fsynced every flush interval, rotated by size (`FILE` → `FILE.1` → ... → `FILE.<keep>`,
//! the oldest deleted). Independent of the aggregates: kurz never reads it back.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Where the log goes and how much of it is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClickLogOptions {
    pub path: PathBuf,
    /// A file is rotated before it would grow past this.
    pub file_bytes_max: u64,
    /// Rotated files kept besides the current one.
    pub files_kept: u32,
}

/// One line of the log.
#[derive(Serialize)]
pub struct ClickLine<'a> {
    pub code: &'a str,
    /// RFC 3339, UTC.
    pub at: &'a str,
    pub at_s: i64,
    /// The `Referer` header as sent (cut at 512 bytes), and its normalised domain.
    pub referer: Option<&'a str>,
    pub referrer_domain: &'a str,
    pub user_agent: Option<&'a str>,
    pub client_ip: Option<IpAddr>,
    pub country: &'a str,
    pub browser: &'a str,
    pub os: &'a str,
    pub bot: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("click log {path}: {source}")]
pub struct ClickLogError {
    path: PathBuf,
    source: io::Error,
}

/// Most bytes buffered while the file cannot be written (a full or failing disk); lines beyond
/// it are dropped and counted, so a broken disk costs no more memory than this.
const PENDING_BYTES_MAX: usize = 64 << 20;

/// The open log: lines buffered since the last flush, the current file and its size.
pub struct ClickLog {
    options: ClickLogOptions,
    file: File,
    file_bytes: u64,
    pending: Vec<u8>,
    /// Lines dropped because the buffer was full, since the last successful flush.
    dropped_lines: u64,
}

impl ClickLog {
    /// Opens (or creates) the log file for appending.
    pub fn open(options: ClickLogOptions) -> Result<ClickLog, ClickLogError> {
        let (file, file_bytes) = open_append(&options.path)?;
        Ok(ClickLog {
            options,
            file,
            file_bytes,
            pending: Vec::new(),
            dropped_lines: 0,
        })
    }

    /// Buffers one line; [`ClickLog::flush`] writes it.
    pub fn push(&mut self, line: &ClickLine<'_>) {
        if self.pending.len() >= PENDING_BYTES_MAX {
            self.dropped_lines += 1;
            return;
        }
        // Serialising borrowed strings and numbers into a Vec cannot fail.
        if serde_json::to_writer(&mut self.pending, line).is_ok() {
            self.pending.push(b'\n');
        }
    }

    /// Writes and fsyncs the buffered lines, rotating first when they would not fit. On an
    /// error the lines stay buffered for the next try.
    pub fn flush(&mut self) -> Result<(), ClickLogError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let would_be = self.file_bytes + self.pending.len() as u64;
        if self.file_bytes > 0 && would_be > self.options.file_bytes_max {
            self.rotate()?;
        }
        self.file
            .write_all(&self.pending)
            .and_then(|()| self.file.sync_data())
            .map_err(|source| self.error(source))?;
        self.file_bytes += self.pending.len() as u64;
        self.pending.clear();
        if self.dropped_lines > 0 {
            tracing::warn!(
                "click log {}: {} lines were dropped while it could not be written",
                self.options.path.display(),
                self.dropped_lines
            );
            self.dropped_lines = 0;
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), ClickLogError> {
        let path = &self.options.path;
        let kept = self.options.files_kept;
        if kept == 0 {
            fs::remove_file(path).map_err(|source| self.error(source))?;
        } else {
            for index in (1..kept).rev() {
                match fs::rename(rotated(path, index), rotated(path, index + 1)) {
                    Err(error) if error.kind() != io::ErrorKind::NotFound => {
                        return Err(self.error(error))
                    }
                    _ => {}
                }
            }
            fs::rename(path, rotated(path, 1)).map_err(|source| self.error(source))?;
        }
        let (file, file_bytes) = open_append(path)?;
        self.file = file;
        self.file_bytes = file_bytes;
        Ok(())
    }

    fn error(&self, source: io::Error) -> ClickLogError {
        ClickLogError {
            path: self.options.path.clone(),
            source,
        }
    }
}

/// `FILE.<index>`.
fn rotated(path: &Path, index: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{index}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> Result<(File, u64), ClickLogError> {
    let error = |source| ClickLogError {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(error)?;
    let bytes = file.metadata().map_err(error)?.len();
    crate::fsutil::sync_parent_dir(path).map_err(error)?;
    Ok((file, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(code: &str) -> ClickLine<'_> {
        ClickLine {
            code,
            at: "2026-11-23T22:00:00Z",
            at_s: 1_795_471_200,
            referer: Some("https://news.example/item?id=1"),
            referrer_domain: "news.example",
            user_agent: Some("Mozilla/5.0 \"quoted\""),
            client_ip: "192.0.2.7".parse().ok(),
            country: "DE",
            browser: "Firefox",
            os: "Linux",
            bot: false,
        }
    }

    fn lines_of(path: &Path) -> Vec<serde_json::Value> {
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect()
    }

    #[test]
    fn lines_are_json_objects_with_every_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("clicks.ndjson");
        let mut log = ClickLog::open(ClickLogOptions {
            path: path.clone(),
            file_bytes_max: 1 << 20,
            files_kept: 2,
        })
        .expect("open");
        log.push(&line("abc"));
        assert!(
            lines_of(&path).is_empty(),
            "nothing is written before a flush"
        );
        log.flush().expect("flush");
        let lines = lines_of(&path);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["code"], "abc");
        assert_eq!(lines[0]["user_agent"], "Mozilla/5.0 \"quoted\"");
        assert_eq!(lines[0]["client_ip"], "192.0.2.7");
        assert_eq!(lines[0]["referrer_domain"], "news.example");
        assert_eq!(lines[0]["bot"], false);
    }

    #[test]
    fn files_rotate_by_size_and_only_the_newest_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("clicks.ndjson");
        let one_line = serde_json::to_vec(&line("c0")).expect("json").len() as u64 + 1;
        let options = ClickLogOptions {
            path: path.clone(),
            file_bytes_max: one_line * 2,
            files_kept: 2,
        };
        let mut log = ClickLog::open(options.clone()).expect("open");
        for i in 0..7 {
            log.push(&line(&format!("c{i}")));
            log.flush().expect("flush");
        }
        let codes = |path: &Path| -> Vec<String> {
            lines_of(path)
                .iter()
                .map(|line| line["code"].as_str().unwrap_or("").to_owned())
                .collect()
        };
        assert_eq!(codes(&path), ["c6"]);
        assert_eq!(codes(&rotated(&path, 1)), ["c4", "c5"]);
        assert_eq!(codes(&rotated(&path, 2)), ["c2", "c3"]);
        assert!(!rotated(&path, 3).exists());

        // Reopened, the log appends to the current file and counts its size.
        drop(log);
        let mut log = ClickLog::open(options).expect("reopen");
        log.push(&line("c7"));
        log.flush().expect("flush");
        assert_eq!(codes(&path), ["c6", "c7"]);
    }

    #[test]
    fn an_unwritable_path_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing-dir").join("clicks.ndjson");
        let error = ClickLog::open(ClickLogOptions {
            path,
            file_bytes_max: 1 << 20,
            files_kept: 1,
        })
        .err()
        .expect("refused");
        assert!(error.to_string().contains("missing-dir"), "{error}");
    }
}
