//! API keys: the keys file (one `name<TAB>scope<TAB>sha256-hex` line per key, never the key
//! itself), the `kurz keys` commands that edit it, and checking a presented key. Owns the keys
//! file; never sees a link, and never logs or stores a key in clear.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rand::Rng;
use sha2::{Digest, Sha256};

use crate::links::codegen::BASE62;

/// Prefix of every key, so a leaked one is recognisable in logs and scanners.
pub const KEY_PREFIX: &str = "kurz_";
/// Random base62 characters after the prefix (~190 bits).
const KEY_RANDOM_CHARS: usize = 32;
const KEY_NAME_BYTES_MAX: usize = 64;
/// Longest presented key worth hashing; anything longer is refused unhashed.
const KEY_BYTES_MAX: usize = 256;
const KEYS_FILE_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// How often the server looks at the keys file's mtime, so `kurz keys revoke` takes effect
/// without a restart.
const KEYS_RECHECK_MS: u64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read keys file {path}: {cause}")]
    Read { path: PathBuf, cause: io::Error },
    #[error("cannot write keys file {path}: {cause}")]
    Write { path: PathBuf, cause: io::Error },
    #[error("keys file {path} line {line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("keys file {path} is {bytes} bytes; the limit is {KEYS_FILE_BYTES_MAX}")]
    TooLarge { path: PathBuf, bytes: u64 },
    #[error("key name {0:?} must be 1 to {KEY_NAME_BYTES_MAX} characters of A-Z, a-z, 0-9, '_', '-' and '.'")]
    InvalidName(String),
    #[error("a key named {0:?} exists already; revoke it first or pick another name")]
    NameTaken(String),
    #[error("no key is named {0:?}")]
    NoSuchKey(String),
}

/// What a key may do. `Admin` includes everything `Write` may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scope {
    /// Create, read, change and delete links.
    Write,
    /// Everything, plus the admin listener's /admin/* calls.
    Admin,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Scope> {
        match text {
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    pub fn allows(self, needed: Scope) -> bool {
        self == Scope::Admin || needed == Scope::Write
    }
}

/// One line of the keys file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEntry {
    pub name: String,
    pub scope: Scope,
    pub hash: [u8; 32],
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (index, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).ok()?;
    }
    Some(out)
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= KEY_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'))
}

/// Reads the keys file; a missing file is an empty list.
pub fn read_keys_file(path: &Path) -> Result<Vec<KeyEntry>, AuthError> {
    let read_error = |cause| AuthError::Read {
        path: path.to_owned(),
        cause,
    };
    let bytes = match fs::metadata(path) {
        Ok(metadata) => metadata.len(),
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(read_error(error)),
    };
    if bytes > KEYS_FILE_BYTES_MAX {
        return Err(AuthError::TooLarge {
            path: path.to_owned(),
            bytes,
        });
    }
    let text = fs::read_to_string(path).map_err(read_error)?;
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parse_error = |message: &str| AuthError::Parse {
            path: path.to_owned(),
            line: index + 1,
            message: message.to_owned(),
        };
        let fields: Vec<&str> = line.split('\t').collect();
        let [name, scope, hash] = fields[..] else {
            return Err(parse_error("expected name<TAB>scope<TAB>sha256-hex"));
        };
        if !valid_name(name) {
            return Err(parse_error("invalid key name"));
        }
        let scope =
            Scope::parse(scope).ok_or_else(|| parse_error("scope must be write or admin"))?;
        let hash = unhex(hash).ok_or_else(|| parse_error("hash must be 64 hex digits"))?;
        entries.push(KeyEntry {
            name: name.to_owned(),
            scope,
            hash,
        });
    }
    Ok(entries)
}

fn write_keys_file(path: &Path, entries: &[KeyEntry]) -> Result<(), AuthError> {
    let mut text = String::from(
        "# kurz API keys: name<TAB>scope<TAB>sha256 of the key. Edit with `kurz keys`.\n",
    );
    for entry in entries {
        text.push_str(&format!(
            "{}\t{}\t{}\n",
            entry.name,
            entry.scope.as_str(),
            hex(&entry.hash)
        ));
    }
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        fs::create_dir_all(parent).map_err(|cause| AuthError::Write {
            path: path.to_owned(),
            cause,
        })?;
    }
    crate::fsutil::write_durably(path, text.as_bytes()).map_err(|cause| AuthError::Write {
        path: path.to_owned(),
        cause,
    })
}

/// A new random key.
pub fn generate_key() -> String {
    let mut rng = rand::rng();
    let random: String = (0..KEY_RANDOM_CHARS)
        .map(|_| char::from(BASE62[rng.random_range(0..BASE62.len())]))
        .collect();
    format!("{KEY_PREFIX}{random}")
}

/// Adds a key named `name` to the keys file and returns the key, which exists nowhere else.
pub fn add_key(path: &Path, name: &str, scope: Scope) -> Result<String, AuthError> {
    if !valid_name(name) {
        return Err(AuthError::InvalidName(name.to_owned()));
    }
    let mut entries = read_keys_file(path)?;
    if entries.iter().any(|entry| entry.name == name) {
        return Err(AuthError::NameTaken(name.to_owned()));
    }
    let key = generate_key();
    entries.push(KeyEntry {
        name: name.to_owned(),
        scope,
        hash: hash_key(&key),
    });
    write_keys_file(path, &entries)?;
    Ok(key)
}

/// Removes the key named `name` from the keys file.
pub fn revoke_key(path: &Path, name: &str) -> Result<(), AuthError> {
    let mut entries = read_keys_file(path)?;
    let before = entries.len();
    entries.retain(|entry| entry.name != name);
    if entries.len() == before {
        return Err(AuthError::NoSuchKey(name.to_owned()));
    }
    write_keys_file(path, &entries)
}

/// Where `kurz keys` finds the keys file.
#[derive(clap::Args, Debug)]
pub struct KeysFileArgs {
    /// Data directory; the keys file is <data-dir>/keys unless --keys says otherwise.
    #[arg(long, env = "KURZ_DATA_DIR", default_value = crate::config::DATA_DIR_DEFAULT)]
    pub data_dir: PathBuf,
    /// The keys file.
    #[arg(long, env = "KURZ_KEYS")]
    pub keys: Option<PathBuf>,
}

impl KeysFileArgs {
    pub fn path(&self) -> PathBuf {
        self.keys
            .clone()
            .unwrap_or_else(|| self.data_dir.join(crate::config::KEYS_FILE_NAME))
    }
}

/// `kurz keys ...`
#[derive(clap::Subcommand, Debug)]
pub enum KeysCommand {
    /// Create an API key; it is printed once, as the last line, and only its hash is stored.
    Add {
        /// A name for the key (who or what uses it), unique in the file.
        name: String,
        /// What the key may do.
        #[arg(long, value_enum, default_value = "write")]
        scope: Scope,
        #[command(flatten)]
        file: KeysFileArgs,
    },
    /// List the keys' names and scopes (the keys themselves are not stored).
    List {
        #[command(flatten)]
        file: KeysFileArgs,
    },
    /// Delete a key; a running server stops accepting it within a second.
    Revoke {
        /// Name of the key.
        name: String,
        #[command(flatten)]
        file: KeysFileArgs,
    },
}

/// Runs a `kurz keys` command and returns the lines to print.
pub fn run_keys_command(command: &KeysCommand) -> Result<Vec<String>, AuthError> {
    match command {
        KeysCommand::Add { name, scope, file } => {
            let path = file.path();
            let key = add_key(&path, name, *scope)?;
            Ok(vec![
                format!(
                    "added key {name:?} with scope {} to {}; it is shown only now:",
                    scope.as_str(),
                    path.display()
                ),
                key,
            ])
        }
        KeysCommand::List { file } => {
            let path = file.path();
            let entries = read_keys_file(&path)?;
            let mut lines = vec![format!("{} keys in {}", entries.len(), path.display())];
            lines.extend(
                entries
                    .iter()
                    .map(|entry| format!("{}\t{}", entry.name, entry.scope.as_str())),
            );
            Ok(lines)
        }
        KeysCommand::Revoke { name, file } => {
            let path = file.path();
            revoke_key(&path, name)?;
            Ok(vec![format!("revoked key {name:?} in {}", path.display())])
        }
    }
}

/// Who made a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    Key { name: Arc<str>, scope: Scope },
}

/// Why a presented key was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRefusal {
    /// A key was presented but is not in the keys file.
    Unknown,
}

type KeyRing = HashMap<[u8; 32], (Arc<str>, Scope)>;

fn ring(entries: Vec<KeyEntry>) -> KeyRing {
    entries
        .into_iter()
        .map(|entry| (entry.hash, (Arc::from(entry.name), entry.scope)))
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// The keys a running server accepts, re-read when the keys file changes.
pub struct Keys {
    path: PathBuf,
    ring: ArcSwap<KeyRing>,
    checked_at_ms: AtomicU64,
    modified: Mutex<Option<SystemTime>>,
}

impl Keys {
    pub fn load(path: &Path) -> Result<Keys, AuthError> {
        let modified = fs::metadata(path).and_then(|m| m.modified()).ok();
        let entries = read_keys_file(path)?;
        Ok(Keys {
            path: path.to_owned(),
            ring: ArcSwap::from_pointee(ring(entries)),
            checked_at_ms: AtomicU64::new(now_ms()),
            modified: Mutex::new(modified),
        })
    }

    pub fn len(&self) -> usize {
        self.ring.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-reads the keys file if its mtime changed, at most once per [`KEYS_RECHECK_MS`]. A file
    /// that has become unreadable keeps the keys last read (and says so in the log).
    fn refresh(&self) {
        let now = now_ms();
        let checked = self.checked_at_ms.load(Ordering::Relaxed);
        if now.saturating_sub(checked) < KEYS_RECHECK_MS
            || self
                .checked_at_ms
                .compare_exchange(checked, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let modified = fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let Ok(mut last) = self.modified.lock() else {
            return;
        };
        if *last == modified {
            return;
        }
        match read_keys_file(&self.path) {
            Ok(entries) => {
                tracing::info!(
                    "keys file {} changed: {} keys",
                    self.path.display(),
                    entries.len()
                );
                self.ring.store(Arc::new(ring(entries)));
                *last = modified;
            }
            Err(error) => tracing::warn!("{error}; keeping the keys read before"),
        }
    }

    /// Who presented `key` (None: no key presented).
    pub fn authenticate(&self, key: Option<&str>) -> Result<Principal, KeyRefusal> {
        let Some(key) = key else {
            return Ok(Principal::Anonymous);
        };
        if key.len() > KEY_BYTES_MAX {
            return Err(KeyRefusal::Unknown);
        }
        self.refresh();
        match self.ring.load().get(&hash_key(key)) {
            Some((name, scope)) => Ok(Principal::Key {
                name: name.clone(),
                scope: *scope,
            }),
            None => Err(KeyRefusal::Unknown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_list_revoke_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        let key = add_key(&path, "ci", Scope::Write).expect("add");
        assert!(key.starts_with(KEY_PREFIX));
        assert!(matches!(
            add_key(&path, "ci", Scope::Admin),
            Err(AuthError::NameTaken(_))
        ));
        let text = fs::read_to_string(&path).expect("read");
        assert!(!text.contains(&key), "the key itself must never be stored");
        let keys = Keys::load(&path).expect("load");
        assert_eq!(
            keys.authenticate(Some(&key)),
            Ok(Principal::Key {
                name: Arc::from("ci"),
                scope: Scope::Write
            })
        );
        assert_eq!(
            keys.authenticate(Some("kurz_nope")),
            Err(KeyRefusal::Unknown)
        );
        assert_eq!(keys.authenticate(None), Ok(Principal::Anonymous));
        revoke_key(&path, "ci").expect("revoke");
        assert!(read_keys_file(&path).expect("read").is_empty());
        assert!(matches!(
            revoke_key(&path, "ci"),
            Err(AuthError::NoSuchKey(_))
        ));
    }

    #[test]
    fn refuses_damaged_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        fs::write(&path, "ci\twrite\tnothex\n").expect("write");
        assert!(matches!(
            read_keys_file(&path),
            Err(AuthError::Parse { line: 1, .. })
        ));
    }

    #[test]
    fn admin_scope_includes_write() {
        assert!(Scope::Admin.allows(Scope::Write));
        assert!(Scope::Admin.allows(Scope::Admin));
        assert!(Scope::Write.allows(Scope::Write));
        assert!(!Scope::Write.allows(Scope::Admin));
    }
}
