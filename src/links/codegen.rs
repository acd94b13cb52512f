//! Code generation (SPEC section 4): random base62 codes drawn from a CSPRNG (the default),
//! Snowflake-style counter codes (time, node id, sequence; permuted so they are not guessable),
//! and codes hashed from the URL. Uniqueness is not decided here but by the store's atomic
//! check-and-insert; callers draw again on a collision.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;
use sha2::{Digest, Sha256};

pub const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
pub const CODE_LEN_DEFAULT: usize = 7;

/// A random base62 code of `len` characters from the thread's CSPRNG (ChaCha, OS-seeded).
pub fn random_code(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(BASE62[rng.random_range(0..BASE62.len())]))
        .collect()
}

/// How generated codes are drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodeStrategy {
    /// Random base62 of the configured length from a CSPRNG.
    #[default]
    Random,
    /// A Snowflake-style 64-bit id (time, node id, sequence), permuted, in base62 (up to 11).
    Counter,
    /// Derived from the SHA-256 of the long URL: the same URL gets the same code.
    Hash,
}

/// Milliseconds since 2024-01-01T00:00:00Z, the counter's epoch (41 bits last until 2093).
const COUNTER_EPOCH_MS: u64 = 1_704_067_200_000;
const COUNTER_SEQUENCE_BITS: u32 = 12;
const COUNTER_NODE_BITS: u32 = 10;
pub const COUNTER_NODE_ID_MAX: u16 = (1 << COUNTER_NODE_BITS) - 1;
const FEISTEL_ROUNDS: usize = 4;

/// Snowflake-style ids: `ms since epoch << 22 | node << 12 | sequence`, never repeating within a
/// process (the sequence borrows from the next millisecond when it runs out), optionally passed
/// through a keyed Feistel permutation of the 64-bit space so consecutive codes look unrelated.
/// The key is drawn per process: a permutation is a bijection, so distinct ids stay distinct codes.
pub struct CounterCodes {
    node_id: u64,
    /// `ms << 12 | sequence` of the last id handed out.
    last: AtomicU64,
    round_keys: Option<[u32; FEISTEL_ROUNDS]>,
}

impl CounterCodes {
    /// `node_id` must be at most [`COUNTER_NODE_ID_MAX`] (checked by the configuration).
    pub fn new(node_id: u16, permuted: bool) -> CounterCodes {
        debug_assert!(node_id <= COUNTER_NODE_ID_MAX);
        let mut rng = rand::rng();
        CounterCodes {
            node_id: u64::from(node_id & COUNTER_NODE_ID_MAX),
            last: AtomicU64::new(0),
            round_keys: permuted.then(|| std::array::from_fn(|_| rng.random())),
        }
    }

    /// The next id.
    pub fn next_id(&self) -> u64 {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64)
            .saturating_sub(COUNTER_EPOCH_MS);
        let floor = now_ms << COUNTER_SEQUENCE_BITS;
        let previous = self
            .last
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(floor.max(last + 1))
            })
            .unwrap_or(floor);
        let state = floor.max(previous + 1);
        let ms = state >> COUNTER_SEQUENCE_BITS;
        let sequence = state & ((1 << COUNTER_SEQUENCE_BITS) - 1);
        (ms << (COUNTER_SEQUENCE_BITS + COUNTER_NODE_BITS))
            | (self.node_id << COUNTER_SEQUENCE_BITS)
            | sequence
    }

    /// The next code: the (permuted) id in base62.
    pub fn next_code(&self) -> String {
        let id = self.next_id();
        let id = match &self.round_keys {
            Some(keys) => feistel(id, keys),
            None => id,
        };
        base62_u64(id)
    }
}

fn feistel(value: u64, keys: &[u32; FEISTEL_ROUNDS]) -> u64 {
    let mut left = (value >> 32) as u32;
    let mut right = value as u32;
    for key in keys {
        let mixed = right.wrapping_mul(0x9E37_79B1) ^ key;
        let mixed = mixed.rotate_left(13).wrapping_mul(0x85EB_CA6B);
        (left, right) = (right, left ^ mixed);
    }
    (u64::from(left) << 32) | u64::from(right)
}

/// `value` in base62, most significant digit first, without leading zeros ("0" for 0).
pub fn base62_u64(mut value: u64) -> String {
    let mut digits = Vec::with_capacity(11);
    loop {
        digits.push(BASE62[(value % 62) as usize]);
        value /= 62;
        if value == 0 {
            break;
        }
    }
    digits.reverse();
    digits.into_iter().map(char::from).collect()
}

/// Longest code [`hash_code`] can give (one base62 digit per SHA-256 byte).
pub const HASH_CODE_LEN_MAX: usize = 32;

/// The code of `len` characters derived from the SHA-256 of `long_url`; longer lengths extend
/// shorter ones, so a collision is resolved by asking for one more character. None beyond
/// [`HASH_CODE_LEN_MAX`].
pub fn hash_code(long_url: &str, len: usize) -> Option<String> {
    if len == 0 || len > HASH_CODE_LEN_MAX {
        return None;
    }
    let digest = Sha256::digest(long_url.as_bytes());
    Some(
        digest
            .iter()
            .take(len)
            .map(|byte| char::from(BASE62[usize::from(*byte) % BASE62.len()]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_have_the_length_and_charset_asked_for() {
        for len in [1, 7, 12] {
            let code = random_code(len);
            assert_eq!(code.len(), len);
            assert!(crate::links::validate::is_code(&code));
        }
    }

    #[test]
    fn codes_do_not_repeat_in_practice() {
        let codes: HashSet<String> = (0..10_000).map(|_| random_code(7)).collect();
        assert_eq!(codes.len(), 10_000);
    }

    #[test]
    fn counter_codes_are_unique_and_permuted() {
        let plain = CounterCodes::new(5, false);
        let first = plain.next_id();
        let second = plain.next_id();
        assert!(second > first);
        assert_eq!(
            (first >> COUNTER_SEQUENCE_BITS) & u64::from(COUNTER_NODE_ID_MAX),
            5
        );
        let permuted = CounterCodes::new(0, true);
        let codes: HashSet<String> = (0..50_000).map(|_| permuted.next_code()).collect();
        assert_eq!(codes.len(), 50_000);
        assert!(codes
            .iter()
            .all(|code| code.len() <= 11 && crate::links::validate::is_code(code)));
    }

    #[test]
    fn feistel_is_a_bijection_on_samples() {
        let keys = [1, 2, 3, 4];
        let outputs: HashSet<u64> = (0..10_000u64).map(|n| feistel(n, &keys)).collect();
        assert_eq!(outputs.len(), 10_000);
        assert_ne!(feistel(1, &keys), 1);
    }

    #[test]
    fn hash_codes_are_deterministic_and_extend() {
        let seven = hash_code("https://example.com/", 7).expect("7");
        let eight = hash_code("https://example.com/", 8).expect("8");
        assert_eq!(seven.len(), 7);
        assert!(eight.starts_with(&seven));
        assert_eq!(hash_code("https://example.com/", 7), Some(seven));
        assert_ne!(
            hash_code("https://example.org/", 7),
            hash_code("https://example.com/", 7)
        );
        assert_eq!(hash_code("x", 33), None);
        assert_eq!(base62_u64(0), "0");
        assert_eq!(base62_u64(61), "z");
        assert_eq!(base62_u64(62), "10");
    }
}
