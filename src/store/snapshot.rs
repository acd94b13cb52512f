//! The snapshot file: every link at one point of the WAL, as an rkyv archive that is
//! memory-mapped and read in place.
//!
//! Owns the file format, the header and its checksums, the open-addressing table inside the
//! archive, the builder that writes a file (temp file, fsync, rename, fsync dir) and the reader
//! that maps one. Never deserialises links into the heap: a lookup is one hash probe into the
//! mapped table plus one read of the link's bytes.
//!
//! File layout, format version 2 (version 1 files, whose URLs are never prefixed, read the
//! same way):
//!
//! ```text
//! 0   magic "KURZSNAP"            8 bytes
//! 8   format version (u32 LE)     = 2
//! 12  header bytes (u32 LE)       = 64
//! 16  covered WAL seq (u64 LE)    every WAL record with seq <= this is in the file
//! 24  link count (u64 LE)         tombstones included
//! 32  body bytes (u64 LE)         length of the rkyv archive that follows the header
//! 40  body crc32c (u32 LE)
//! 44  reserved (u32)              = 0
//! 48  written at, unix ms (u64 LE)
//! 56  header crc32c (u32 LE)      over bytes 0..56
//! 60  reserved (u32)              = 0
//! 64  rkyv archive of SnapshotBody
//! ```
//!
//! The body is laid out so that a link costs little more than its own bytes:
//! - `slots`: an open-addressing (linear probing) table of 8-byte words, at most 87% full. A
//!   word holds the offset of the link's record in `text` (low 40 bits) and a 24-bit tag from
//!   the code's hash (high bits), so most probes that miss never leave the table; 0 is empty.
//! - `text`: every link as one record, back to back, starting at offset 8 (so no record sits at
//!   offset 0): `flags u8, code_len u8, url_len u16 LE, created_at_s u32 LE, code, url`. A URL
//!   that starts with one of [`URL_PREFIXES`] is stored as one byte, 1 + the prefix's index,
//!   and the rest (a stored URL never starts with a byte below 0x20 otherwise: URLs are
//!   visible ASCII); `url_len` counts the stored bytes. A hit reads one record, usually one
//!   cache line.
//! - `extras`: the rarely used fields (expiry, click cap, update time, out-of-range creation
//!   time) of the few links that have them, sorted by record offset for binary search.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hashbrown::HashTable;
use memmap2::Mmap;
use rkyv::rancor;
use rkyv::ser::writer::IoWriter;
use rkyv::{Archive, Serialize};

use super::link::{LinkMeta, LinkStatus, LinkView, LongUrl, RedirectStatus, URL_PREFIXES};
use crate::fsutil;
use crate::prefetch::{prefetch, CACHE_LINE_BYTES};
use crate::threads::PacedWriter;

const MAGIC: &[u8; 8] = b"KURZSNAP";
const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
const FORMAT_VERSION_MIN: u32 = 1;
/// A multiple of 16, so the archive that follows keeps the alignment of the page-aligned map.
pub const HEADER_BYTES: usize = 64;
/// Slots are at most this full. Linear probing over 8-byte slots stays within one or two cache
/// lines for a hit (about 4 probes on average) and a few lines for a miss.
const SLOT_LOAD_PERCENT_MAX: u64 = 87;
/// Bytes of a text record before its code: flags, code_len, url_len, created_at_s.
const RECORD_HEADER_BYTES: usize = 8;
/// `text` starts with this many unused bytes so that a slot word is never 0 for a record.
const TEXT_START: usize = 8;
const TEXT_OFFSET_BITS: u32 = 40;
const TEXT_OFFSET_MASK: u64 = (1 << TEXT_OFFSET_BITS) - 1;
/// The largest text region the slot format can address (1 TiB).
const TEXT_BYTES_MAX: u64 = 1 << TEXT_OFFSET_BITS;
const CODE_BYTES_MAX: usize = u8::MAX as usize;
const URL_BYTES_MAX: usize = u16::MAX as usize;
const WRITE_BUFFER_BYTES: usize = 1 << 20;
/// Slots a prefetch walks along a probe path before it gives up (at most 87% of the slots are
/// taken, so nearly every path is shorter).
const PREFETCH_PROBE_STEPS: usize = 8;
/// Cache lines of a record a prefetch asks for: header, code and a URL of up to ~230 bytes.
const RECORD_PREFETCH_LINES: usize = 4;

/// The stored byte that stands for `URL_PREFIXES[0]`; the others follow.
const URL_PREFIX_BYTE_FIRST: u8 = 1;
/// Stored URL bytes below this stand for a prefix (no URL starts with a control character).
const URL_PREFIX_BYTE_END: u8 = URL_PREFIX_BYTE_FIRST + URL_PREFIXES.len() as u8;
const FLAG_STATUS_MASK: u8 = 0b0000_0011;
const FLAG_REDIRECT_SHIFT: u8 = 2;
const FLAG_REDIRECT_MASK: u8 = 0b0001_1100;
const FLAG_FORWARD_QUERY: u8 = 1 << 5;
const FLAG_CUSTOM: u8 = 1 << 6;
const FLAG_HAS_EXTRA: u8 = 1 << 7;
const EXTRA_NO_EXPIRY: i64 = i64::MIN;
const EXTRA_NO_CLICK_CAP: u64 = u64::MAX;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("snapshot {path}: not a kurz snapshot (bad magic bytes)")]
    BadMagic { path: PathBuf },
    #[error("snapshot {path}: format version {found} is not supported (this build reads {FORMAT_VERSION_MIN} to {FORMAT_VERSION})")]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("snapshot {path}: header checksum mismatch (the header is corrupt)")]
    HeaderChecksum { path: PathBuf },
    #[error("snapshot {path}: file is {actual_bytes} bytes but its header says {expected_bytes} (truncated or padded)")]
    Length {
        path: PathBuf,
        expected_bytes: u64,
        actual_bytes: u64,
    },
    #[error("snapshot {path}: body checksum mismatch (stored {stored:#010x}, computed {computed:#010x}); the file is corrupt")]
    BodyChecksum {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    #[error("snapshot {path}: archive is invalid: {detail}")]
    Archive { path: PathBuf, detail: String },
    #[error("snapshot {path}: the header counts {header} links but the table holds {table}")]
    CountMismatch {
        path: PathBuf,
        header: u64,
        table: u64,
    },
}

/// Why a link cannot go into a snapshot being built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddError {
    #[error("code {0:?} is already in the snapshot")]
    Duplicate(String),
    #[error("code is {0} bytes; a snapshot holds codes of 1 to {CODE_BYTES_MAX} bytes")]
    CodeLength(usize),
    #[error("URL is {0} bytes; a snapshot holds URLs of at most {URL_BYTES_MAX} bytes")]
    UrlLength(usize),
    #[error("the snapshot's text region is full ({TEXT_BYTES_MAX} bytes)")]
    TextFull,
    #[error(
        "URL starts with the control byte {0:#04x}, which a snapshot reserves for scheme prefixes"
    )]
    UrlControlByte(u8),
}

/// What the header of a snapshot file says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Format 1 files are read as they are and rewritten as the current format by the next
    /// snapshot.
    pub format_version: u32,
    pub covered_seq: u64,
    pub link_count: u64,
    pub body_bytes: u64,
    pub body_crc32c: u32,
    pub written_at_ms: u64,
}

impl SnapshotHeader {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut bytes = [0u8; HEADER_BYTES];
        bytes[0..8].copy_from_slice(MAGIC);
        bytes[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        bytes[12..16].copy_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
        bytes[16..24].copy_from_slice(&self.covered_seq.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.link_count.to_le_bytes());
        bytes[32..40].copy_from_slice(&self.body_bytes.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.body_crc32c.to_le_bytes());
        bytes[48..56].copy_from_slice(&self.written_at_ms.to_le_bytes());
        let header_crc = crc32c::crc32c(&bytes[0..56]);
        bytes[56..60].copy_from_slice(&header_crc.to_le_bytes());
        bytes
    }

    fn decode(path: &Path, bytes: &[u8]) -> Result<SnapshotHeader, SnapshotError> {
        let too_short = || SnapshotError::Length {
            path: path.to_owned(),
            expected_bytes: HEADER_BYTES as u64,
            actual_bytes: bytes.len() as u64,
        };
        if bytes.len() < 8 || &bytes[0..8] != MAGIC {
            return if bytes.len() < 8 {
                Err(too_short())
            } else {
                Err(SnapshotError::BadMagic {
                    path: path.to_owned(),
                })
            };
        }
        if bytes.len() < HEADER_BYTES {
            return Err(too_short());
        }
        let version = read_u32(bytes, 8);
        if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
            return Err(SnapshotError::UnsupportedVersion {
                path: path.to_owned(),
                found: version,
            });
        }
        if read_u32(bytes, 56) != crc32c::crc32c(&bytes[0..56])
            || read_u32(bytes, 12) != HEADER_BYTES as u32
        {
            return Err(SnapshotError::HeaderChecksum {
                path: path.to_owned(),
            });
        }
        Ok(SnapshotHeader {
            format_version: version,
            covered_seq: read_u64(bytes, 16),
            link_count: read_u64(bytes, 24),
            body_bytes: read_u64(bytes, 32),
            body_crc32c: read_u32(bytes, 40),
            written_at_ms: read_u64(bytes, 48),
        })
    }
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// The rarely used fields of a link, kept out of its record so that most links cost 8 bytes of
/// metadata.
#[derive(Archive, Serialize, Clone, Copy)]
struct Extra {
    text_offset: u64,
    created_at_s: i64,
    updated_at_s: i64,
    expires_at_s: i64,
    max_clicks: u64,
}

#[derive(Archive, Serialize)]
struct SnapshotBody {
    slots: Vec<u64>,
    text: Vec<u8>,
    extras: Vec<Extra>,
}

/// The hash that places codes in the table. Part of the file format: changing it needs a new
/// format version. Word-at-a-time multiply-rotate with a murmur3 finaliser; codes are short.
/// Where a lookup of a code starts in a snapshot's table (see [`Snapshot::prefetch_slot`]).
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    hash: u64,
    home: usize,
}

pub fn code_hash(code: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut hash = (code.len() as u64).wrapping_mul(K);
    let mut chunks = code.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        hash = (hash ^ u64::from_le_bytes(word))
            .wrapping_mul(K)
            .rotate_left(29);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        hash = (hash ^ u64::from_le_bytes(word))
            .wrapping_mul(K)
            .rotate_left(29);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    hash ^ (hash >> 33)
}

fn home_slot(hash: u64, slot_count: usize) -> usize {
    (((hash >> 32) * slot_count as u64) >> 32) as usize
}

fn hash_tag(hash: u64) -> u64 {
    (hash & 0xFF_FFFF) << TEXT_OFFSET_BITS
}

fn encode_flags(meta: &LinkMeta, has_extra: bool) -> u8 {
    let status = match meta.status {
        LinkStatus::Active => 0,
        LinkStatus::Disabled => 1,
        LinkStatus::Deleted => 2,
    };
    let redirect = match meta.redirect_status {
        None => 0,
        Some(RedirectStatus::MovedPermanently) => 1,
        Some(RedirectStatus::Found) => 2,
        Some(RedirectStatus::TemporaryRedirect) => 3,
        Some(RedirectStatus::PermanentRedirect) => 4,
    };
    let mut flags = status | (redirect << FLAG_REDIRECT_SHIFT);
    if meta.forward_query {
        flags |= FLAG_FORWARD_QUERY;
    }
    if meta.custom {
        flags |= FLAG_CUSTOM;
    }
    if has_extra {
        flags |= FLAG_HAS_EXTRA;
    }
    flags
}

fn decode_status(flags: u8) -> LinkStatus {
    match flags & FLAG_STATUS_MASK {
        0 => LinkStatus::Active,
        1 => LinkStatus::Disabled,
        _ => LinkStatus::Deleted,
    }
}

fn decode_redirect(flags: u8) -> Option<RedirectStatus> {
    match (flags & FLAG_REDIRECT_MASK) >> FLAG_REDIRECT_SHIFT {
        1 => Some(RedirectStatus::MovedPermanently),
        2 => Some(RedirectStatus::Found),
        3 => Some(RedirectStatus::TemporaryRedirect),
        4 => Some(RedirectStatus::PermanentRedirect),
        _ => None,
    }
}

/// A link accepted by the builder, waiting for its slot.
struct PendingEntry {
    hash: u64,
    text_offset: u64,
}

/// Collects links and writes them as a snapshot file. Refuses duplicates as they are added, so
/// an importer can report the offending line.
pub struct SnapshotBuilder {
    entries: Vec<PendingEntry>,
    extras: Vec<Extra>,
    text: Vec<u8>,
    index: HashTable<u32>,
    live_count: u64,
}

impl Default for SnapshotBuilder {
    fn default() -> Self {
        SnapshotBuilder::with_capacity(0, 0)
    }
}

impl SnapshotBuilder {
    pub fn with_capacity(links: usize, text_bytes: usize) -> SnapshotBuilder {
        SnapshotBuilder {
            entries: Vec::with_capacity(links),
            extras: Vec::new(),
            text: Vec::with_capacity(text_bytes),
            index: HashTable::with_capacity(links),
            live_count: 0,
        }
    }

    /// Makes room for `links` more links holding `text_bytes` more bytes of records, so that
    /// a builder filled from a source of known size grows its buffers and its index once
    /// instead of doubling them as it goes (each doubling copies everything so far and holds it
    /// twice for a moment). Only a hint, usually an estimate: when the memory cannot be had,
    /// nothing is reserved and the builder grows as it goes.
    pub fn reserve(&mut self, links: usize, text_bytes: usize) {
        if self.entries.try_reserve(links).is_err() || self.text.try_reserve(text_bytes).is_err() {
            return;
        }
        let entries = &self.entries;
        // Failing, it leaves the index as it was, to grow as links come.
        let _ = self
            .index
            .try_reserve(links, |&id| entries[id as usize].hash);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of records added so far.
    pub fn text_bytes(&self) -> usize {
        self.text.len()
    }

    /// The most bytes of records that adding `link` takes.
    pub fn record_bytes_max(link: &LinkView<'_>) -> usize {
        RECORD_HEADER_BYTES + link.code.len() + 1 + link.long_url.len()
    }

    /// Links added that are not tombstones.
    pub fn live_count(&self) -> u64 {
        self.live_count
    }

    pub fn contains(&self, code: &str) -> bool {
        let hash = code_hash(code.as_bytes());
        self.index
            .find(hash, |&id| {
                record_code(&self.text, self.entries[id as usize].text_offset) == code.as_bytes()
            })
            .is_some()
    }

    /// Adds one link. Deleted links (tombstones) keep their code but not their URL.
    pub fn add(&mut self, link: LinkView<'_>) -> Result<(), AddError> {
        let code = link.code.as_bytes();
        let (url_prefix, url) = if link.meta.status == LinkStatus::Deleted {
            (None, "")
        } else {
            link.long_url.split_prefix()
        };
        let url_prefix_byte = url_prefix.map(|index| URL_PREFIX_BYTE_FIRST + index as u8);
        let url_stored_bytes = url.len() + usize::from(url_prefix_byte.is_some());
        if code.is_empty() || code.len() > CODE_BYTES_MAX {
            return Err(AddError::CodeLength(code.len()));
        }
        // A stored URL's first byte below 0x20 stands for a prefix; a URL kept whole must not
        // start with one.
        let first_byte = url.as_bytes().first().copied();
        if let Some(first) = first_byte.filter(|first| url_prefix.is_none() && *first < b' ') {
            return Err(AddError::UrlControlByte(first));
        }
        if url_stored_bytes > URL_BYTES_MAX {
            return Err(AddError::UrlLength(link.long_url.len()));
        }
        if self.text.is_empty() {
            self.text.resize(TEXT_START, 0);
        }
        let text_offset = self.text.len() as u64;
        let record_bytes = (RECORD_HEADER_BYTES + code.len() + url_stored_bytes) as u64;
        if text_offset + record_bytes > TEXT_BYTES_MAX {
            return Err(AddError::TextFull);
        }
        let hash = code_hash(code);
        let entries = &self.entries;
        let text = &self.text;
        let same_code = |id: &u32| record_code(text, entries[*id as usize].text_offset) == code;
        if self.index.find(hash, same_code).is_some() {
            return Err(AddError::Duplicate(link.code.to_owned()));
        }
        let meta = &link.meta;
        let created_fits = u32::try_from(meta.created_at_s).is_ok();
        let has_extra = !created_fits
            || meta.updated_at_s != meta.created_at_s
            || meta.expires_at_s.is_some()
            || meta.max_clicks.is_some();
        if has_extra {
            self.extras.push(Extra {
                text_offset,
                created_at_s: meta.created_at_s,
                updated_at_s: meta.updated_at_s,
                expires_at_s: meta.expires_at_s.unwrap_or(EXTRA_NO_EXPIRY),
                max_clicks: meta.max_clicks.unwrap_or(EXTRA_NO_CLICK_CAP),
            });
        }
        let id = self.entries.len() as u32;
        self.entries.push(PendingEntry { hash, text_offset });
        self.text.push(encode_flags(meta, has_extra));
        self.text.push(code.len() as u8);
        self.text
            .extend_from_slice(&(url_stored_bytes as u16).to_le_bytes());
        let created_at_s = u32::try_from(meta.created_at_s).unwrap_or(0);
        self.text.extend_from_slice(&created_at_s.to_le_bytes());
        self.text.extend_from_slice(code);
        self.text.extend(url_prefix_byte);
        self.text.extend_from_slice(url.as_bytes());
        if meta.status != LinkStatus::Deleted {
            self.live_count += 1;
        }
        let entries = &self.entries;
        self.index
            .insert_unique(hash, id, |&id| entries[id as usize].hash);
        Ok(())
    }

    /// Lays out the table and writes the file at `path` (temp file, fsync, rename, fsync dir).
    pub fn write(self, path: &Path, covered_seq: u64) -> Result<SnapshotHeader, SnapshotError> {
        let link_count = self.entries.len() as u64;
        let body = self.into_body();
        let io_error = |source| SnapshotError::Io {
            path: path.to_owned(),
            source,
        };
        let temp_path = fsutil::temp_path(path);
        let result = write_body(&temp_path, &body, covered_seq, link_count);
        let header = match result {
            Ok(header) => header,
            Err(source) => {
                // Best effort: a half-written temp file must not linger; the original is untouched.
                let _ = fs::remove_file(&temp_path);
                return Err(io_error(source));
            }
        };
        fsutil::rename_durably(&temp_path, path).map_err(io_error)?;
        Ok(header)
    }

    fn into_body(self) -> SnapshotBody {
        let slot_count = (self.entries.len() as u64 * 100 / SLOT_LOAD_PERCENT_MAX + 1) as usize;
        let mut slots = vec![0u64; slot_count];
        for entry in &self.entries {
            let mut at = home_slot(entry.hash, slot_count);
            while slots[at] != 0 {
                at = if at + 1 == slot_count { 0 } else { at + 1 };
            }
            slots[at] = entry.text_offset | hash_tag(entry.hash);
        }
        let mut extras = self.extras;
        extras.sort_unstable_by_key(|extra| extra.text_offset);
        SnapshotBody {
            slots,
            text: self.text,
            extras,
        }
    }
}

/// The code of the record at `offset` (empty if the record is out of bounds).
fn record_code(text: &[u8], offset: u64) -> &[u8] {
    let start = offset as usize;
    let code_len = text.get(start + 1).copied().unwrap_or(0) as usize;
    let code_start = start + RECORD_HEADER_BYTES;
    text.get(code_start..code_start + code_len).unwrap_or(&[])
}

/// A writer that keeps a running crc32c and byte count of what passes through it.
struct ChecksumWriter<W> {
    inner: W,
    crc32c: u32,
    bytes: u64,
}

impl<W: Write> Write for ChecksumWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.crc32c = crc32c::crc32c_append(self.crc32c, &buf[..written]);
        self.bytes += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn write_body(
    temp_path: &Path,
    body: &SnapshotBody,
    covered_seq: u64,
    link_count: u64,
) -> io::Result<SnapshotHeader> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(temp_path)?;
    // Paced: a snapshot is built beside redirects, often on their CPU.
    let mut buffered = BufWriter::with_capacity(WRITE_BUFFER_BYTES, PacedWriter::new(file));
    buffered.write_all(&[0u8; HEADER_BYTES])?;
    let checksummed = ChecksumWriter {
        inner: buffered,
        crc32c: 0,
        bytes: 0,
    };
    let checksummed =
        rkyv::api::high::to_bytes_in::<_, rancor::Error>(body, IoWriter::new(checksummed))
            .map_err(io::Error::other)?
            .into_inner();
    let header = SnapshotHeader {
        format_version: FORMAT_VERSION,
        covered_seq,
        link_count,
        body_bytes: checksummed.bytes,
        body_crc32c: checksummed.crc32c,
        written_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as u64)
            .unwrap_or(0),
    };
    let mut file = checksummed
        .inner
        .into_inner()
        .map_err(|e| e.into_error())?
        .into_inner();
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&header.encode())?;
    file.sync_all()?;
    Ok(header)
}

/// Ids of opened snapshots, so that state kept per table slot elsewhere (click counters) can
/// tell which opening a slot number belongs to.
static NEXT_SNAPSHOT_ID: AtomicU64 = AtomicU64::new(1);

/// A mapped, verified snapshot file. Lookups read the mapping in place.
pub struct Snapshot {
    /// Unique among the snapshots this process opened.
    id: u64,
    path: PathBuf,
    header: SnapshotHeader,
    map: Mmap,
    /// The archive's table size, cached so lookups do not re-read it.
    slot_count: usize,
    live_count: u64,
}

impl Snapshot {
    /// Maps `path` and verifies it before trusting it: magic, version, header checksum, length,
    /// body checksum, archive structure and link count.
    pub fn open(path: &Path) -> Result<Snapshot, SnapshotError> {
        let io_error = |source| SnapshotError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(io_error)?;
        let mut header_bytes = Vec::with_capacity(HEADER_BYTES);
        Read::by_ref(&mut file)
            .take(HEADER_BYTES as u64)
            .read_to_end(&mut header_bytes)
            .map_err(io_error)?;
        let header = SnapshotHeader::decode(path, &header_bytes)?;
        let actual_bytes = file.metadata().map_err(io_error)?.len();
        let expected_bytes = HEADER_BYTES as u64 + header.body_bytes;
        if actual_bytes != expected_bytes {
            return Err(SnapshotError::Length {
                path: path.to_owned(),
                expected_bytes,
                actual_bytes,
            });
        }
        // SAFETY: the data dir lock keeps other kurz processes from writing this file, and kurz
        // only ever replaces a snapshot by renaming a new file over it, so the mapped inode's
        // bytes do not change while the map lives.
        let map = unsafe { Mmap::map(&file) }.map_err(io_error)?;
        let body = &map[HEADER_BYTES..];
        let computed = crc32c::crc32c(body);
        if computed != header.body_crc32c {
            return Err(SnapshotError::BodyChecksum {
                path: path.to_owned(),
                stored: header.body_crc32c,
                computed,
            });
        }
        let archive = rkyv::access::<ArchivedSnapshotBody, rancor::Error>(body).map_err(|e| {
            SnapshotError::Archive {
                path: path.to_owned(),
                detail: e.to_string(),
            }
        })?;
        let slot_count = archive.slots.len();
        let table = archive
            .slots
            .iter()
            .filter(|word| word.to_native() != 0)
            .count() as u64;
        let (records, live_count) = count_records(&archive.text);
        if table != header.link_count
            || records != header.link_count
            || slot_count as u64 <= header.link_count
        {
            return Err(SnapshotError::CountMismatch {
                path: path.to_owned(),
                header: header.link_count,
                table,
            });
        }
        #[cfg(unix)]
        {
            // Lookups hit random pages; read-ahead would only evict useful ones.
            let _ = map.advise(memmap2::Advice::Random);
        }
        Ok(Snapshot {
            id: NEXT_SNAPSHOT_ID.fetch_add(1, Ordering::Relaxed),
            path: path.to_owned(),
            header,
            map,
            slot_count,
            live_count,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    /// Links in the file that are not tombstones.
    pub fn live_count(&self) -> u64 {
        self.live_count
    }

    pub fn file_bytes(&self) -> u64 {
        self.map.len() as u64
    }

    fn body(&self) -> &ArchivedSnapshotBody {
        // SAFETY: `open` validated exactly these bytes with `rkyv::access` (bytecheck), and the
        // mapping is immutable for its lifetime (see the SAFETY note in `open`).
        unsafe { rkyv::access_unchecked::<ArchivedSnapshotBody>(&self.map[HEADER_BYTES..]) }
    }

    /// Unique among the snapshots this process opened (a reopened file gets a new id).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Slots in the table: every [`Self::lookup_slot`] slot is below this.
    pub fn slot_count(&self) -> usize {
        self.slot_count
    }

    /// Bytes of the records of every link in the file.
    pub fn text_bytes(&self) -> usize {
        self.body().text.len()
    }

    /// Finds `code` with one probe sequence into the mapped table.
    pub fn lookup(&self, code: &str) -> Option<LinkView<'_>> {
        self.lookup_slot(code).map(|(_, view)| view)
    }

    /// [`Self::lookup`], with the table slot that holds the link (stable for this snapshot's
    /// life, unique per link).
    pub fn lookup_slot(&self, code: &str) -> Option<(usize, LinkView<'_>)> {
        let (slot, offset) = self.probe(code)?;
        view(self.body(), offset).map(|view| (slot, view))
    }

    /// The table slot that holds `code`, without reading the rest of its record: for those who
    /// keep state by slot (click counts) and need no field of the link.
    pub fn slot_of(&self, code: &str) -> Option<usize> {
        self.probe(code).map(|(slot, _)| slot)
    }

    /// The slot holding `code` and the offset of its record.
    fn probe(&self, code: &str) -> Option<(usize, u64)> {
        let body = self.body();
        let code = code.as_bytes();
        let hash = code_hash(code);
        let tag = hash_tag(hash);
        let mut at = home_slot(hash, self.slot_count);
        // The table always has an empty slot, so the probe ends; the bound guards corrupt input.
        for _ in 0..self.slot_count {
            let word = body.slots[at].to_native();
            if word == 0 {
                return None;
            }
            if word & !TEXT_OFFSET_MASK == tag {
                let offset = word & TEXT_OFFSET_MASK;
                if record_code(&body.text, offset) == code {
                    return Some((at, offset));
                }
            }
            at = if at + 1 == self.slot_count { 0 } else { at + 1 };
        }
        None
    }

    /// Asks the CPU to start loading the table slot where a lookup of `code` begins, and says
    /// where that is: the first of two steps that let a loop over many requests overlap their
    /// memory misses (the second is [`Self::prefetch_probed_record`]). Only hints; a lookup
    /// decides.
    pub fn prefetch_slot(&self, code: &[u8]) -> Probe {
        let body = self.body();
        let hash = code_hash(code);
        let home = home_slot(hash, self.slot_count);
        if let Some(word) = body.slots.get(home) {
            prefetch(word);
        }
        Probe { hash, home }
    }

    /// The second step after [`Self::prefetch_slot`], once its slot is in cache: starts loading
    /// the record of the first slot on the probe's path whose tag matches, and returns that
    /// slot (None when the path ends or runs long first).
    pub fn prefetch_probed_record(&self, probe: Probe) -> Option<usize> {
        let body = self.body();
        let tag = hash_tag(probe.hash);
        let mut at = probe.home;
        for _ in 0..PREFETCH_PROBE_STEPS {
            let word = body.slots.get(at)?.to_native();
            if word == 0 {
                return None;
            }
            if word & !TEXT_OFFSET_MASK == tag {
                let offset = (word & TEXT_OFFSET_MASK) as usize;
                // The header, the code and the start of the URL, then the rest of a typical URL.
                for line in 0..RECORD_PREFETCH_LINES {
                    if let Some(byte) = body.text.get(offset + line * CACHE_LINE_BYTES) {
                        prefetch(byte);
                    }
                }
                return Some(at);
            }
            at = if at + 1 == self.slot_count { 0 } else { at + 1 };
        }
        None
    }

    /// Asks the CPU to start loading the record in table slot `slot`, so that a later
    /// [`Self::code_at`] of it finds it in cache: a walk over many slots overlaps their memory
    /// misses instead of waiting for each in turn.
    pub fn prefetch_record(&self, slot: usize) {
        let body = self.body();
        let Some(word) = body.slots.get(slot) else {
            return;
        };
        let offset = (word.to_native() & TEXT_OFFSET_MASK) as usize;
        if let Some(byte) = body.text.get(offset) {
            prefetch(byte);
        }
    }

    /// The code of the link in table slot `slot`; None for an empty or out-of-range slot.
    pub fn code_at(&self, slot: usize) -> Option<&str> {
        let body = self.body();
        let word = body.slots.get(slot)?.to_native();
        if word == 0 {
            return None;
        }
        std::str::from_utf8(record_code(&body.text, word & TEXT_OFFSET_MASK)).ok()
    }

    /// Every link in the file, tombstones included, in table order.
    pub fn iter(&self) -> impl Iterator<Item = LinkView<'_>> + '_ {
        let body = self.body();
        body.slots
            .iter()
            .map(|word| word.to_native())
            .filter(|word| *word != 0)
            .filter_map(move |word| view(body, word & TEXT_OFFSET_MASK))
    }
}

/// Counts the records in `text` by walking it front to back: (records, live records).
fn count_records(text: &[u8]) -> (u64, u64) {
    let mut records = 0u64;
    let mut live = 0u64;
    let mut at = TEXT_START;
    while let Some(header) = text.get(at..at + RECORD_HEADER_BYTES) {
        records += 1;
        if decode_status(header[0]) != LinkStatus::Deleted {
            live += 1;
        }
        let url_len = u16::from_le_bytes([header[2], header[3]]) as usize;
        at += RECORD_HEADER_BYTES + header[1] as usize + url_len;
    }
    (records, live)
}

/// The link whose record starts at `offset`, or None if the record is out of bounds or not
/// UTF-8 (which a verified file never is).
fn view(body: &ArchivedSnapshotBody, offset: u64) -> Option<LinkView<'_>> {
    let start = offset as usize;
    let text = &body.text[..];
    let header = text.get(start..start + RECORD_HEADER_BYTES)?;
    let flags = header[0];
    let code_start = start + RECORD_HEADER_BYTES;
    let url_start = code_start + header[1] as usize;
    let url_end = url_start + u16::from_le_bytes([header[2], header[3]]) as usize;
    let code = std::str::from_utf8(text.get(code_start..url_start)?).ok()?;
    let long_url = decode_url(text.get(url_start..url_end)?)?;
    let created_at_s = i64::from(u32::from_le_bytes([
        header[4], header[5], header[6], header[7],
    ]));
    let mut meta = LinkMeta {
        created_at_s,
        updated_at_s: created_at_s,
        expires_at_s: None,
        max_clicks: None,
        redirect_status: decode_redirect(flags),
        status: decode_status(flags),
        custom: flags & FLAG_CUSTOM != 0,
        forward_query: flags & FLAG_FORWARD_QUERY != 0,
    };
    if flags & FLAG_HAS_EXTRA != 0 {
        let found = body
            .extras
            .binary_search_by_key(&offset, |extra| extra.text_offset.to_native());
        if let Ok(index) = found {
            let extra = &body.extras[index];
            meta.created_at_s = extra.created_at_s.to_native();
            meta.updated_at_s = extra.updated_at_s.to_native();
            let expires_at_s = extra.expires_at_s.to_native();
            meta.expires_at_s = (expires_at_s != EXTRA_NO_EXPIRY).then_some(expires_at_s);
            let max_clicks = extra.max_clicks.to_native();
            meta.max_clicks = (max_clicks != EXTRA_NO_CLICK_CAP).then_some(max_clicks);
        }
    }
    Some(LinkView {
        code,
        long_url,
        meta,
    })
}

/// A stored URL: the prefix its first byte names, if it names one, and the rest.
fn decode_url(stored: &[u8]) -> Option<LongUrl<'_>> {
    match stored.split_first() {
        Some((&first, rest)) if first < URL_PREFIX_BYTE_END => {
            let index = first.checked_sub(URL_PREFIX_BYTE_FIRST)?;
            Some(LongUrl::prefixed(
                usize::from(index),
                std::str::from_utf8(rest).ok()?,
            ))
        }
        _ => Some(LongUrl::whole(std::str::from_utf8(stored).ok()?)),
    }
}

/// Reads only the header of a snapshot file, for `inspect` and `verify`.
pub fn read_header(path: &Path) -> Result<SnapshotHeader, SnapshotError> {
    let mut file = File::open(path).map_err(|source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut header_bytes = Vec::with_capacity(HEADER_BYTES);
    Read::by_ref(&mut file)
        .take(HEADER_BYTES as u64)
        .read_to_end(&mut header_bytes)
        .map_err(|source| SnapshotError::Io {
            path: path.to_owned(),
            source,
        })?;
    SnapshotHeader::decode(path, &header_bytes)
}

/// Whether `bytes` begin like a snapshot file.
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(code: &str, url: &str) -> crate::store::link::Link {
        crate::store::link::Link {
            code: code.to_owned(),
            long_url: url.to_owned(),
            meta: LinkMeta::new(1_700_000_000),
        }
    }

    fn build(links: &[crate::store::link::Link], path: &Path) -> Snapshot {
        let mut builder = SnapshotBuilder::default();
        for link in links {
            builder.add(link.view()).expect("add");
        }
        builder.write(path, 42).expect("write");
        Snapshot::open(path).expect("open")
    }

    #[test]
    fn finds_every_link_and_no_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("snapshot.kurz");
        let links: Vec<_> = (0..5000)
            .map(|i| link(&format!("c{i}"), &format!("https://example.com/{i}")))
            .collect();
        let snapshot = build(&links, &path);
        assert_eq!(snapshot.header().covered_seq, 42);
        assert_eq!(snapshot.header().link_count, 5000);
        let mut slots = std::collections::HashSet::new();
        for l in &links {
            assert_eq!(snapshot.lookup(&l.code), Some(l.view()));
            let slot = snapshot.slot_of(&l.code).expect("a slot");
            assert_eq!(snapshot.lookup_slot(&l.code).map(|(at, _)| at), Some(slot));
            assert!(slots.insert(slot), "one slot a link");
        }
        assert_eq!(snapshot.lookup("c5000"), None);
        assert_eq!(snapshot.lookup("nope"), None);
        assert_eq!(snapshot.slot_of("c5000"), None);
        assert_eq!(snapshot.iter().count(), 5000);
    }

    #[test]
    fn a_reservation_is_a_hint_that_cannot_fail_the_build() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("snapshot.kurz");
        let mut builder = SnapshotBuilder::default();
        builder
            .add(link("first", "https://example.com/1").view())
            .expect("add");
        // Far more than any machine has: refused, and the builder goes on as before.
        builder.reserve(usize::MAX / 4, usize::MAX / 4);
        builder.reserve(1000, 64_000);
        for i in 0..2000 {
            let code = format!("c{i}");
            builder
                .add(link(&code, &format!("https://example.com/{i}")).view())
                .expect("add");
        }
        builder.write(&path, 1).expect("write");
        let snapshot = Snapshot::open(&path).expect("open");
        assert_eq!(snapshot.header().link_count, 2001);
        assert_eq!(
            snapshot
                .lookup("c1999")
                .map(|view| view.long_url.to_string()),
            Some("https://example.com/1999".to_owned())
        );
    }

    #[test]
    fn keeps_every_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("snapshot.kurz");
        let mut rich = link("rich", "https://example.com/rich");
        rich.meta = LinkMeta {
            created_at_s: -5,
            updated_at_s: 9_000_000_000,
            expires_at_s: Some(1_800_000_000),
            max_clicks: Some(1000),
            redirect_status: Some(RedirectStatus::PermanentRedirect),
            status: LinkStatus::Disabled,
            custom: true,
            forward_query: true,
        };
        let mut gone = link("gone", "https://example.com/gone");
        gone.meta.status = LinkStatus::Deleted;
        let snapshot = build(&[rich.clone(), gone.clone()], &path);
        assert_eq!(snapshot.lookup("rich"), Some(rich.view()));
        let found = snapshot.lookup("gone").expect("tombstone kept");
        assert_eq!(found.meta.status, LinkStatus::Deleted);
        assert_eq!(found.long_url, "");
    }

    #[test]
    fn urls_with_and_without_a_known_prefix_read_back_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let urls = [
            "https://www.example.com/a?b=1#c",
            "http://www.example.net/",
            "https://example.org/p",
            "http://example.net/x",
            "https://",
            "http://wwwx.example/",
            "ftp://example.com/f",
        ];
        let links: Vec<_> = urls
            .iter()
            .enumerate()
            .map(|(i, url)| link(&format!("u{i}"), url))
            .collect();
        let path = dir.path().join("s");
        let snapshot = build(&links, &path);
        for link in &links {
            let found = snapshot.lookup(&link.code).expect("found");
            assert_eq!(found.long_url.to_string(), link.long_url);
            assert_eq!(found.long_url, link.long_url.as_str());
            assert_eq!(found.long_url.parts().concat(), link.long_url);
        }
        let raw_text: usize = links
            .iter()
            .map(|l| 8 + l.code.len() + l.long_url.len())
            .sum();
        let text_bytes = snapshot.body().text.len() - TEXT_START;
        assert_eq!(
            raw_text - text_bytes,
            (12 - 1) + (11 - 1) + (8 - 1) + (7 - 1) + (8 - 1) + (7 - 1),
            "each known prefix is stored in one byte"
        );
    }

    #[test]
    fn a_version_1_file_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("snapshot.kurz");
        fs::write(
            &path,
            include_bytes!("../../tests/fixtures/snapshot-v1.kurz"),
        )
        .expect("write");
        let snapshot = Snapshot::open(&path).expect("open");
        assert_eq!(snapshot.header().format_version, 1);
        for (code, url) in [
            ("www1", "https://www.example.com/a?b=1#c"),
            ("plain1", "https://example.org/p"),
            ("http1", "http://www.example.net/"),
            ("http2", "http://example.net/x"),
        ] {
            let found = snapshot.lookup(code).expect(code);
            assert_eq!(found.long_url.to_string(), url);
        }
        assert_eq!(snapshot.iter().count(), 4);
    }

    #[test]
    fn empty_snapshot_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let snapshot = build(&[], &dir.path().join("s"));
        assert_eq!(snapshot.lookup("x"), None);
        assert_eq!(snapshot.iter().count(), 0);
    }

    #[test]
    fn builder_refuses_duplicates_and_oversized_fields() {
        let mut builder = SnapshotBuilder::default();
        builder.add(link("a", "https://a/").view()).expect("add");
        assert_eq!(
            builder.add(link("a", "https://b/").view()),
            Err(AddError::Duplicate("a".into()))
        );
        assert_eq!(
            builder.add(link("", "https://b/").view()),
            Err(AddError::CodeLength(0))
        );
        let long = "x".repeat(URL_BYTES_MAX + 1);
        assert_eq!(
            builder.add(link("b", &long).view()),
            Err(AddError::UrlLength(long.len()))
        );
        assert!(builder.contains("a"));
        assert!(!builder.contains("b"));
        assert_eq!(
            builder.add(link("d", "\u{2}https://x/").view()),
            Err(AddError::UrlControlByte(2))
        );
        // The longest URL the server can be configured to accept (64 KiB) fits once its scheme
        // prefix is stored as one byte.
        let longest = format!("https://{}", "x".repeat(64 * 1024 - "https://".len()));
        builder.add(link("c", &longest).view()).expect("add");
    }

    fn corrupt_and_open(mutate: impl FnOnce(&mut Vec<u8>)) -> SnapshotError {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("snapshot.kurz");
        build(&[link("abc", "https://example.com/")], &path);
        let mut bytes = fs::read(&path).expect("read");
        mutate(&mut bytes);
        fs::write(&path, &bytes).expect("write");
        let error = Snapshot::open(&path).err().expect("must be refused");
        assert_eq!(fs::read(&path).expect("read"), bytes, "file left as it was");
        error
    }

    #[test]
    fn refuses_bad_magic() {
        let error = corrupt_and_open(|bytes| bytes[0] = b'X');
        assert!(matches!(error, SnapshotError::BadMagic { .. }), "{error}");
    }

    #[test]
    fn refuses_bad_header_checksum() {
        let error = corrupt_and_open(|bytes| bytes[17] ^= 1);
        assert!(
            matches!(error, SnapshotError::HeaderChecksum { .. }),
            "{error}"
        );
    }

    #[test]
    fn refuses_bad_body_checksum() {
        let error = corrupt_and_open(|bytes| {
            let last = bytes.len() - 30;
            bytes[last] ^= 0x40;
        });
        assert!(
            matches!(error, SnapshotError::BodyChecksum { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("snapshot.kurz"), "{error}");
    }

    #[test]
    fn refuses_truncated_file() {
        let error = corrupt_and_open(|bytes| bytes.truncate(bytes.len() - 1));
        assert!(matches!(error, SnapshotError::Length { .. }), "{error}");
        let error = corrupt_and_open(|bytes| bytes.truncate(20));
        assert!(matches!(error, SnapshotError::Length { .. }), "{error}");
    }

    #[test]
    fn hash_is_stable() {
        // Part of the file format: these values must never change within format version 1.
        assert_eq!(code_hash(b"abc"), 0x15de_8287_d520_5b8c);
        assert_eq!(code_hash(b"0123456789abcdefXYZ"), 0x5111_e560_772c_cffb);
        assert_ne!(code_hash(b"abc"), code_hash(b"abd"));
        assert_ne!(code_hash(b"abcdefgh"), code_hash(b"abcdefgh\0"));
    }
}
