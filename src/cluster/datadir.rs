//! A cluster node's data dir: the marker file that says which stream and shard layout the dir
//! follows, and installing a snapshot downloaded from the cluster. Owns `<data-dir>/cluster.json`
//! and the download temp file; must never touch a dir that follows another stream or layout, nor
//! one a single-node server wrote (its snapshot counts local WAL records, not stream records).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::store::SNAPSHOT_FILE;

pub const MARKER_FILE: &str = "cluster.json";

/// What `cluster.json` holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    /// The JetStream stream whose sequence numbers the dir's snapshot counts.
    pub stream: String,
    /// [`crate::cluster::shard::ShardSet::layout_name`] of the shards the dir holds.
    pub layout: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("data dir {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a cluster marker ({source}); it was damaged or written by something else: restore it or use an empty --data-dir")]
    Marker {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("data dir {dir} follows stream {found_stream:?} with shard layout {found_layout:?}, not stream {stream:?} with layout {layout:?}; use an empty --data-dir for this node")]
    Mismatch {
        dir: PathBuf,
        found_stream: String,
        found_layout: String,
        stream: String,
        layout: String,
    },
    #[error("data dir {dir} holds a {SNAPSHOT_FILE} but no {MARKER_FILE}: it was written in single-node mode, whose snapshot counts local WAL records, not stream records; use an empty --data-dir (the node then loads the cluster's snapshot), or if the snapshot was copied from a node of this cluster, write {MARKER_FILE} for it by hand")]
    NotACluster { dir: PathBuf },
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What a data dir holds before the node opens it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirState {
    /// No snapshot and no marker: the node may install the cluster's newest snapshot.
    Fresh,
    /// Marked for this stream and layout.
    Following,
}

/// Checks `dir` against `expected`, creating the dir when missing.
pub fn check(dir: &Path, expected: &Marker) -> Result<DirState, DataDirError> {
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    let marker_path = dir.join(MARKER_FILE);
    let bytes = match fs::read(&marker_path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            if dir.join(SNAPSHOT_FILE).exists() {
                return Err(DataDirError::NotACluster {
                    dir: dir.to_owned(),
                });
            }
            return Ok(DirState::Fresh);
        }
        Err(error) => return Err(io_error(&marker_path)(error)),
    };
    let found: Marker = serde_json::from_slice(&bytes).map_err(|source| DataDirError::Marker {
        path: marker_path.clone(),
        source,
    })?;
    if &found != expected {
        return Err(DataDirError::Mismatch {
            dir: dir.to_owned(),
            found_stream: found.stream,
            found_layout: found.layout,
            stream: expected.stream.clone(),
            layout: expected.layout.clone(),
        });
    }
    Ok(DirState::Following)
}

/// Marks `dir` as following `marker`'s stream and layout.
pub fn mark(dir: &Path, marker: &Marker) -> Result<(), DataDirError> {
    let path = dir.join(MARKER_FILE);
    let bytes = serde_json::to_vec_pretty(marker).expect("two strings always serialise to JSON");
    fsutil::write_durably(&path, &bytes).map_err(io_error(&path))
}

/// Where a download is written before it becomes the snapshot.
pub fn download_path(dir: &Path) -> PathBuf {
    fsutil::temp_path(&dir.join(SNAPSHOT_FILE))
}

/// Makes the fully written `download` the dir's snapshot: fsync, rename, fsync the dir.
pub fn install_download(dir: &Path, download: &Path) -> Result<(), DataDirError> {
    fs::File::open(download)
        .and_then(|file| file.sync_all())
        .map_err(io_error(download))?;
    let path = dir.join(SNAPSHOT_FILE);
    fsutil::rename_durably(download, &path).map_err(io_error(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(stream: &str) -> Marker {
        Marker {
            stream: stream.into(),
            layout: "all-1".into(),
        }
    }

    #[test]
    fn a_dir_follows_one_stream_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node");
        assert_eq!(check(&path, &marker("A")).expect("fresh"), DirState::Fresh);
        mark(&path, &marker("A")).expect("mark");
        assert_eq!(
            check(&path, &marker("A")).expect("same"),
            DirState::Following
        );
        assert!(matches!(
            check(&path, &marker("B")),
            Err(DataDirError::Mismatch { .. })
        ));
    }

    #[test]
    fn a_single_node_dir_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(SNAPSHOT_FILE), b"x").expect("write");
        assert!(matches!(
            check(dir.path(), &marker("A")),
            Err(DataDirError::NotACluster { .. })
        ));
        fs::write(dir.path().join(MARKER_FILE), b"{").expect("write");
        assert!(matches!(
            check(dir.path(), &marker("A")),
            Err(DataDirError::Marker { .. })
        ));
    }
}
