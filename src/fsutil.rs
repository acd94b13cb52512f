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
    let mut out = DurableFile::create(path)?;
    write_to(&mut out)?;
    out.commit()
}

/// A replacement of a file written piece by piece: the pieces go to a temp file beside it, and
/// only [`DurableFile::commit`] (fsync, rename, fsync dir) puts it in place. Dropped without a
/// commit, it removes the temp file and leaves the old file as it was.
pub struct DurableFile {
    path: PathBuf,
    temp: PathBuf,
    out: Option<BufWriter<File>>,
}

impl DurableFile {
    pub fn create(path: &Path) -> io::Result<DurableFile> {
        let temp = temp_path(path);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)?;
        Ok(DurableFile {
            path: path.to_owned(),
            temp,
            out: Some(BufWriter::with_capacity(STREAM_BUFFER_BYTES, file)),
        })
    }

    /// Flushes, fsyncs and renames the temp file over the path.
    pub fn commit(mut self) -> io::Result<()> {
        let Some(out) = self.out.take() else {
            return Err(io::Error::other("already committed"));
        };
        let committed = out
            .into_inner()
            .map_err(|error| error.into_error())
            .and_then(|file| file.sync_all())
            .and_then(|()| rename_durably(&self.temp, &self.path));
        if committed.is_err() {
            // Best effort: the error that matters is the write's, not the cleanup's.
            let _ = fs::remove_file(&self.temp);
        }
        committed
    }
}

impl Write for DurableFile {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match &mut self.out {
            Some(out) => out.write(bytes),
            None => Err(io::Error::other("already committed")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for DurableFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            // Not committed: the temp file is not the file anyone asked for.
            let _ = fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_file_replaces_the_old_one_only_on_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("list.tsv");
        fs::write(&path, b"old\n").expect("write old");

        let mut abandoned = DurableFile::create(&path).expect("create");
        abandoned.write_all(b"half").expect("write");
        assert!(temp_path(&path).exists());
        drop(abandoned);
        assert_eq!(fs::read(&path).expect("read"), b"old\n");
        assert!(
            !temp_path(&path).exists(),
            "an abandoned temp file is removed"
        );

        let mut replacement = DurableFile::create(&path).expect("create");
        replacement.write_all(b"new\n").expect("write");
        assert_eq!(fs::read(&path).expect("read"), b"old\n");
        replacement.commit().expect("commit");
        assert_eq!(fs::read(&path).expect("read"), b"new\n");
        assert!(!temp_path(&path).exists());
    }

    #[test]
    fn a_failed_stream_leaves_the_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        write_durably(&path, b"first").expect("first write");
        let failed = write_durably_with(&path, |out| {
            out.write_all(b"partial")?;
            Err(io::Error::other("the source failed"))
        });
        assert!(failed.is_err());
        assert_eq!(fs::read(&path).expect("read"), b"first");
        assert!(!temp_path(&path).exists());
    }
}
