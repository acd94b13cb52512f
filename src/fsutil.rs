//! Durable file replacement: every file kurz writes goes through a temp file, an fsync and an
//! atomic rename, followed by an fsync of the directory so the rename itself survives a crash.
//! Owns nothing else; never writes a file in place.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// The temp file that sits beside `path` while it is being written.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|name| name.to_os_string())
        .unwrap_or_else(|| OsString::from("kurz"));
    name.push(".tmp");
    path.with_file_name(name)
}

/// Fsyncs the directory holding `path`, making a create, rename or delete in it durable.
pub fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Renames the fully written and fsynced `temp` over `path`, then fsyncs the directory.
pub fn rename_durably(temp: &Path, path: &Path) -> io::Result<()> {
    fs::rename(temp, path)?;
    sync_parent_dir(path)
}

/// Replaces `path` with `bytes`: temp file, fsync, rename, fsync dir. On error the old file is
/// untouched and the temp file removed.
pub fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_durably_with(path, |out| out.write_all(bytes))
}

/// Bytes buffered between `write_to` and the temp file of [`write_durably_with`].
const STREAM_BUFFER_BYTES: usize = 64 * 1024;

/// [`write_durably`] for content too large to build in memory first: `write_to` streams it
/// into the temp file through a buffer of [`STREAM_BUFFER_BYTES`].
pub fn write_durably_with<F>(path: &Path, write_to: F) -> io::Result<()>
where
    F: FnOnce(&mut dyn Write) -> io::Result<()>,
{
    let temp = temp_path(path);
    let written = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)?;
        let mut out = BufWriter::with_capacity(STREAM_BUFFER_BYTES, file);
        write_to(&mut out)?;
        out.into_inner()
            .map_err(|error| error.into_error())?
            .sync_all()
    })();
    if let Err(error) = written {
        // Best effort: the error that matters is the write's, not the cleanup's.
        let _ = fs::remove_file(&temp);
        return Err(error);
    }
    rename_durably(&temp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_durably_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        write_durably(&path, b"one").expect("first write");
        write_durably(&path, b"two").expect("second write");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        assert!(!temp_path(&path).exists());
    }

    #[test]
    fn a_failed_stream_keeps_the_old_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("counts");
        write_durably(&path, b"old").expect("first write");
        let failed = write_durably_with(&path, |out| {
            out.write_all(&[b'x'; 3 * STREAM_BUFFER_BYTES])?;
            Err(io::Error::other("serialiser gave up"))
        });
        assert!(failed.is_err());
        assert_eq!(fs::read(&path).expect("read"), b"old");
        assert!(!temp_path(&path).exists());
        write_durably_with(&path, |out| out.write_all(&[b'y'; 3 * STREAM_BUFFER_BYTES]))
            .expect("streamed write");
        assert_eq!(
            fs::read(&path).expect("read").len(),
            3 * STREAM_BUFFER_BYTES
        );
    }

    #[test]
    fn write_durably_into_missing_dir_fails_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent").join("keys");
        assert!(write_durably(&path, b"x").is_err());
        assert!(!path.exists());
    }
}
