//! Which shard a code belongs to, and the stream subjects a shard's records live on. Pure
//! functions over bytes: owns the shard function and the subject layout, and must never depend
//! on anything that could differ between nodes, builds or runs (no seeded or platform hashes).
//!
//! The shard of a code is `crc32c(code bytes) mod shards`: a fixed table of hash slots, like
//! Redis Cluster's. Slots are the unit a fleet moves when it grows (a node's `--shard-set`
//! names the slots it holds), so growing never rehashes codes between existing slots. CRC32C is
//! chosen because HAProxy computes it too (`path,field(2,/),crc32c,mod(N)`), so a load balancer
//! can route `GET /{code}` to a node holding that shard without asking kurz.

/// Most shards a cluster may be cut into: bounds the per-node shard table and keeps subjects
/// short.
pub const SHARDS_MAX: u32 = 4096;

/// The shard of `code` among `shards` shards. `shards` must be at least 1.
pub fn shard_of(code: &str, shards: u32) -> u32 {
    debug_assert!((1..=SHARDS_MAX).contains(&shards));
    crc32c::crc32c(code.as_bytes()) % shards.max(1)
}

/// The subject holding the current state of `code`: `<prefix>.<shard>.<code>`.
pub fn subject(prefix: &str, shard: u32, code: &str) -> String {
    format!("{prefix}.{shard}.{code}")
}

/// The subject filter matching every record of `shard`.
pub fn shard_filter(prefix: &str, shard: u32) -> String {
    format!("{prefix}.{shard}.>")
}

/// Splits a record subject into (shard, code); None when it is not `<prefix>.<shard>.<code>`.
pub fn parse_subject<'a>(prefix: &str, subject: &'a str) -> Option<(u32, &'a str)> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let (shard, code) = rest.split_once('.')?;
    Some((shard.parse().ok()?, code))
}

/// The shards one node holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardSet {
    shards: u32,
    held: Vec<bool>,
}

impl ShardSet {
    /// Every shard of `shards`.
    pub fn all(shards: u32) -> ShardSet {
        ShardSet {
            shards,
            held: vec![true; shards as usize],
        }
    }

    /// The listed shards of `shards`; None when `shards` is out of range, a listed shard is not
    /// below `shards`, or the list is empty.
    pub fn of(shards: u32, listed: &[u32]) -> Option<ShardSet> {
        if !(1..=SHARDS_MAX).contains(&shards) || listed.is_empty() {
            return None;
        }
        let mut held = vec![false; shards as usize];
        for &shard in listed {
            *held.get_mut(shard as usize)? = true;
        }
        Some(ShardSet { shards, held })
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    pub fn holds(&self, shard: u32) -> bool {
        self.held.get(shard as usize).copied().unwrap_or(false)
    }

    pub fn holds_code(&self, code: &str) -> bool {
        self.holds(shard_of(code, self.shards))
    }

    pub fn is_all(&self) -> bool {
        self.held.iter().all(|held| *held)
    }

    /// The held shards, ascending.
    pub fn held(&self) -> Vec<u32> {
        (0..self.shards)
            .filter(|shard| self.holds(*shard))
            .collect()
    }

    /// A short stable name of the layout, e.g. `all-1` or `3of16-0_5_9`, used to keep snapshots
    /// of different layouts apart.
    pub fn layout_name(&self) -> String {
        if self.is_all() {
            return format!("all-{}", self.shards);
        }
        let held: Vec<String> = self.held().iter().map(u32::to_string).collect();
        format!("{}of{}-{}", held.len(), self.shards, held.join("_"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shard_function_never_changes() {
        // CRC32C's published check value: a change of hash would move every code.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(shard_of("123456789", 1000), 0xE306_9283 % 1000);
        assert_eq!(shard_of("abc", 1), 0);
    }

    #[test]
    fn codes_spread_evenly_over_shards() {
        let shards = 16u32;
        let codes = 160_000u32;
        let mut counts = vec![0u32; shards as usize];
        for i in 0..codes {
            counts[shard_of(&crate::links::codegen::base62_u64(u64::from(i)), shards) as usize] +=
                1;
        }
        let expected = codes / shards;
        for (shard, count) in counts.iter().enumerate() {
            assert!(
                count.abs_diff(expected) < expected / 20,
                "shard {shard} got {count} of {codes}, expected about {expected}"
            );
        }
    }

    #[test]
    fn subjects_round_trip() {
        let subject = subject("kurz.links", 7, "aB3_-x");
        assert_eq!(subject, "kurz.links.7.aB3_-x");
        assert_eq!(parse_subject("kurz.links", &subject), Some((7, "aB3_-x")));
        assert_eq!(parse_subject("kurz.links", "kurz.other.7.x"), None);
        assert_eq!(parse_subject("kurz.links", "kurz.links.x.y"), None);
    }

    #[test]
    fn shard_sets_refuse_what_they_cannot_hold() {
        assert!(ShardSet::of(4, &[4]).is_none());
        assert!(ShardSet::of(0, &[0]).is_none());
        assert!(ShardSet::of(4, &[]).is_none());
        let set = ShardSet::of(4, &[3, 1]).expect("valid");
        assert_eq!(set.held(), vec![1, 3]);
        assert!(!set.is_all());
        assert_eq!(set.layout_name(), "2of4-1_3");
        assert_eq!(ShardSet::all(4).layout_name(), "all-4");
        assert!(ShardSet::of(2, &[0, 1]).expect("valid").is_all());
    }
}
