//! The overlay: every create, update and delete since the snapshot, in a sharded concurrent map
//! (dashmap with ahash). Tombstones live here too, as links with status `Deleted`.
//!
//! Owns the per-code write state machine: a write first reserves its code as `Pending`
//! (atomically, so two creates can never both win a code), then the WAL writer commits it or
//! rolls it back. Never touches a file, and never blocks a lookup for longer than one shard's
//! read lock.
//!
//! Most lookups are of codes the overlay does not hold: a filter of the codes written since it
//! was last rebuilt ([`WrittenFilter`], a bit per hash bucket) lets them skip the map, its
//! shard lock and its probe.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use dashmap::mapref::entry::Entry;
use dashmap::mapref::one::Ref;
use dashmap::DashMap;

use super::link::Link;

/// The state of one code in the overlay.
#[derive(Debug)]
pub enum OverlayEntry {
    /// A durable write: the link as of WAL record `seq`.
    Committed { link: Link, seq: u64 },
    /// A write on its way through the WAL. Lookups keep seeing the committed state: the earlier
    /// overlay value if there is one, else whatever the snapshot holds.
    Pending { committed: Option<(Link, u64)> },
}

impl OverlayEntry {
    /// The link lookups see, or `None` when the snapshot decides.
    pub fn visible(&self) -> Option<&Link> {
        match self {
            OverlayEntry::Committed { link, .. }
            | OverlayEntry::Pending {
                committed: Some((link, _)),
            } => Some(link),
            OverlayEntry::Pending { committed: None } => None,
        }
    }
}

/// Why a write could not reserve its code.
#[derive(Debug, PartialEq, Eq)]
pub enum ReserveError {
    /// Another write on this code is still on its way through the WAL.
    Busy,
    /// Create only: the code already has a link (or a tombstone).
    Taken,
}

/// Bits of each [`WrittenFilter`] set: 128 KiB, a few dozen pages a lookup may touch. A million
/// codes written since the last rebuild still leave a third of the bits clear.
const FILTER_BITS: usize = 1 << 20;

/// Which codes may have an entry that lookups see: the bit of a code's hash bucket is set before
/// such an entry goes into the map, and is cleared only by a rebuild from the map. A clear bit
/// means the map holds nothing visible for the code; a set bit means it may.
///
/// A rebuild fills the set lookups do not read, from the map, while commits wait (`gate`), then
/// makes it the one they read; commits set their bit in both sets. `generation` is odd while a
/// rebuild runs, and names the set lookups read otherwise; a lookup that saw it change while it
/// read a bit asks the map (a seqlock).
struct WrittenFilter {
    sets: [Box<[AtomicU64]>; 2],
    generation: AtomicU64,
    gate: RwLock<()>,
}

impl WrittenFilter {
    fn new() -> WrittenFilter {
        let set = || (0..FILTER_BITS / 64).map(|_| AtomicU64::new(0)).collect();
        WrittenFilter {
            sets: [set(), set()],
            generation: AtomicU64::new(0),
            gate: RwLock::new(()),
        }
    }

    fn position(hash: u64) -> (usize, u64) {
        let bit = (hash as usize) % FILTER_BITS;
        (bit / 64, 1 << (bit % 64))
    }

    /// Whether the map may hold a visible entry for the code with `hash`.
    fn may_hold(&self, hash: u64) -> bool {
        let generation = self.generation.load(Ordering::Acquire);
        if generation % 2 == 1 {
            return true;
        }
        let (word, mask) = Self::position(hash);
        let set = &self.sets[(generation / 2 % 2) as usize];
        let held = set[word].load(Ordering::Relaxed) & mask != 0;
        // Pairs with the rebuild's release fence: a bit cleared by a rebuild that started after
        // the first read shows as a changed generation here.
        fence(Ordering::Acquire);
        held || self.generation.load(Ordering::Relaxed) != generation
    }

    /// Marks the code with `hash` as written, in both sets; the caller inserts its entry while
    /// holding the returned guard, so that no rebuild runs in between.
    fn mark(&self, hash: u64) -> RwLockReadGuard<'_, ()> {
        // A panic under the gate leaves the bits supersets of the map, as they always are.
        let gate = self
            .gate
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (word, mask) = Self::position(hash);
        for set in &self.sets {
            set[word].fetch_or(mask, Ordering::Release);
        }
        gate
    }

    /// Refills the set lookups do not read with `held`, the hashes of every visible entry of the
    /// map (a lazy walk of it, taken while commits wait), and makes it the one they read.
    fn rebuild(&self, held: impl Iterator<Item = u64>) {
        let _gate = self
            .gate
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::Release);
        let next = &self.sets[(generation / 2 % 2 + 1) as usize % 2];
        for word in next.iter() {
            word.store(0, Ordering::Relaxed);
        }
        for hash in held {
            let (word, mask) = Self::position(hash);
            next[word].fetch_or(mask, Ordering::Relaxed);
        }
        self.generation.fetch_add(1, Ordering::Release);
    }
}

pub struct Overlay {
    map: DashMap<Box<str>, OverlayEntry, ahash::RandomState>,
    written: WrittenFilter,
}

impl Default for Overlay {
    fn default() -> Self {
        Overlay {
            map: DashMap::with_hasher(ahash::RandomState::new()),
            written: WrittenFilter::new(),
        }
    }
}

impl Overlay {
    /// Number of codes with an overlay entry (pending ones included).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The entry for `code`, held under that shard's read lock while the guard lives; None
    /// without touching the map when the code was not written since the filter's last rebuild.
    /// An entry lookups cannot see yet (a pending create) may be missing too.
    pub fn get(&self, code: &str) -> Option<Ref<'_, Box<str>, OverlayEntry>> {
        if !self.written.may_hold(self.hash(code)) {
            return None;
        }
        self.map.get(code)
    }

    fn hash(&self, code: &str) -> u64 {
        self.map.hasher().hash_one(code)
    }

    /// Rebuilds the filter of written codes from the map, forgetting the codes whose entries
    /// are gone (after a snapshot took them in). Commits wait while it runs.
    pub fn rebuild_filter(&self) {
        self.written.rebuild(
            self.map
                .iter()
                .filter(|entry| entry.value().visible().is_some())
                .map(|entry| self.hash(entry.key())),
        );
    }

    /// Reserves `code` for a create. `exists_below` is asked, under the shard's write lock, whether
    /// the snapshot already holds the code.
    pub fn reserve_new(
        &self,
        code: &str,
        exists_below: impl FnOnce() -> bool,
    ) -> Result<(), ReserveError> {
        match self.map.entry(code.into()) {
            Entry::Occupied(_) => Err(ReserveError::Taken),
            Entry::Vacant(vacant) => {
                if exists_below() {
                    return Err(ReserveError::Taken);
                }
                vacant.insert(OverlayEntry::Pending { committed: None });
                Ok(())
            }
        }
    }

    /// Reserves `code` for a change of an existing link. `change` gets the current link (from
    /// the overlay, or from `below` — the snapshot — when the overlay has none) and returns the
    /// new one; on `Ok` the code is pending until the WAL answers.
    pub fn reserve_change<E>(
        &self,
        code: &str,
        below: impl FnOnce() -> Option<Link>,
        change: impl FnOnce(Option<&Link>) -> Result<Link, E>,
    ) -> Result<Result<Link, E>, ReserveError> {
        match self.map.entry(code.into()) {
            Entry::Occupied(mut occupied) => {
                let changed = match occupied.get() {
                    OverlayEntry::Pending { .. } => return Err(ReserveError::Busy),
                    OverlayEntry::Committed { link, .. } => change(Some(link)),
                };
                if changed.is_ok() {
                    let entry = occupied.get_mut();
                    let held = std::mem::replace(entry, OverlayEntry::Pending { committed: None });
                    if let OverlayEntry::Committed { link, seq } = held {
                        *entry = OverlayEntry::Pending {
                            committed: Some((link, seq)),
                        };
                    }
                }
                Ok(changed)
            }
            Entry::Vacant(vacant) => {
                let current = below();
                let changed = change(current.as_ref());
                if changed.is_ok() {
                    vacant.insert(OverlayEntry::Pending { committed: None });
                }
                Ok(changed)
            }
        }
    }

    /// Makes a write durable-visible (WAL writer thread, or replay). Returns the link it replaced
    /// in the overlay, if the overlay held one.
    pub fn commit(&self, seq: u64, link: Link) -> Option<Link> {
        let key: Box<str> = link.code.as_str().into();
        let _marked = self.written.mark(self.hash(&key));
        let previous = self.map.insert(key, OverlayEntry::Committed { link, seq });
        match previous {
            Some(OverlayEntry::Committed { link, .. })
            | Some(OverlayEntry::Pending {
                committed: Some((link, _)),
            }) => Some(link),
            _ => None,
        }
    }

    /// Undoes a reservation whose WAL write failed: the committed state comes back.
    pub fn roll_back(&self, code: &str) {
        if let Entry::Occupied(mut occupied) = self.map.entry(code.into()) {
            if let OverlayEntry::Pending { committed } = occupied.get_mut() {
                match committed.take() {
                    Some((link, seq)) => {
                        *occupied.get_mut() = OverlayEntry::Committed { link, seq }
                    }
                    None => {
                        occupied.remove();
                    }
                }
            }
        }
    }

    /// The durable state of every code, for a snapshot: (link, seq) of each committed entry, and
    /// of the committed state under each pending one.
    pub fn committed_links(&self) -> Vec<(Link, u64)> {
        let mut links = Vec::with_capacity(self.map.len());
        for entry in self.map.iter() {
            match entry.value() {
                OverlayEntry::Committed { link, seq }
                | OverlayEntry::Pending {
                    committed: Some((link, seq)),
                } => links.push((link.clone(), *seq)),
                OverlayEntry::Pending { committed: None } => {}
            }
        }
        links
    }

    /// Drops the entry for `code` if it is still the committed write `seq` (a newer snapshot now
    /// holds it). A newer or pending write stays.
    pub fn forget_if_committed_at(&self, code: &str, seq: u64) {
        self.map.remove_if(
            code,
            |_, entry| matches!(entry, OverlayEntry::Committed { seq: held, .. } if *held == seq),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::link::LinkMeta;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn link(code: &str, url: &str) -> Link {
        Link {
            code: code.into(),
            long_url: url.into(),
            meta: LinkMeta::new(0),
        }
    }

    fn url_of(overlay: &Overlay, code: &str) -> Option<String> {
        overlay
            .get(code)
            .and_then(|entry| entry.visible().map(|link| link.long_url.clone()))
    }

    #[test]
    fn pending_create_is_invisible_until_committed() {
        let overlay = Overlay::default();
        overlay.reserve_new("a", || false).expect("reserve");
        assert_eq!(url_of(&overlay, "a"), None);
        assert_eq!(overlay.reserve_new("a", || false), Err(ReserveError::Taken));
        overlay.commit(1, link("a", "https://a/"));
        assert_eq!(url_of(&overlay, "a").as_deref(), Some("https://a/"));
    }

    #[test]
    fn a_code_in_the_snapshot_cannot_be_created() {
        let overlay = Overlay::default();
        assert_eq!(overlay.reserve_new("a", || true), Err(ReserveError::Taken));
        assert!(overlay.is_empty());
    }

    #[test]
    fn pending_change_keeps_old_value_visible_and_rolls_back() {
        let overlay = Overlay::default();
        overlay.commit(1, link("a", "https://old/"));
        let changed = overlay
            .reserve_change::<()>("a", || None, |_| Ok(link("a", "https://new/")))
            .expect("reserve");
        assert_eq!(changed, Ok(link("a", "https://new/")));
        assert_eq!(url_of(&overlay, "a").as_deref(), Some("https://old/"));
        assert_eq!(
            overlay.reserve_change::<()>("a", || None, |_| Ok(link("a", "x"))),
            Err(ReserveError::Busy)
        );
        overlay.roll_back("a");
        assert_eq!(url_of(&overlay, "a").as_deref(), Some("https://old/"));
        overlay.reserve_new("b", || false).expect("reserve");
        overlay.roll_back("b");
        assert!(overlay.reserve_new("b", || false).is_ok());
    }

    #[test]
    fn a_refused_change_reserves_nothing() {
        let overlay = Overlay::default();
        let refused = overlay
            .reserve_change(
                "a",
                || None,
                |current| match current {
                    None => Err("not found"),
                    Some(link) => Ok(link.clone()),
                },
            )
            .expect("not busy");
        assert_eq!(refused, Err("not found"));
        assert!(overlay.is_empty());
    }

    #[test]
    fn forget_keeps_newer_writes() {
        let overlay = Overlay::default();
        overlay.commit(5, link("a", "https://a5/"));
        overlay.commit(6, link("a", "https://a6/"));
        overlay.forget_if_committed_at("a", 5);
        assert_eq!(url_of(&overlay, "a").as_deref(), Some("https://a6/"));
        overlay.forget_if_committed_at("a", 6);
        assert_eq!(url_of(&overlay, "a"), None);
    }

    #[test]
    fn the_filter_lets_lookups_skip_codes_not_written_and_never_hides_one() {
        let overlay = Overlay::default();
        let codes: Vec<String> = (0..10_000).map(|i| format!("c{i}")).collect();
        assert!(codes
            .iter()
            .all(|code| !overlay.written.may_hold(overlay.hash(code))));
        for (seq, code) in codes.iter().enumerate() {
            overlay.commit(seq as u64, link(code, "https://a/"));
            assert!(overlay.written.may_hold(overlay.hash(code)));
        }
        // A snapshot took the first half in; the second half's first code changes meanwhile.
        for (seq, code) in codes.iter().enumerate().take(5_000) {
            overlay.forget_if_committed_at(code, seq as u64);
        }
        let changed = overlay
            .reserve_change::<()>(&codes[5_000], || None, |_| Ok(link("x", "https://b/")))
            .expect("reserve");
        assert!(changed.is_ok());
        overlay.rebuild_filter();
        for code in &codes[5_000..] {
            assert_eq!(
                url_of(&overlay, code).as_deref(),
                Some("https://a/"),
                "{code}"
            );
        }
        let skipped = codes[..5_000]
            .iter()
            .filter(|code| !overlay.written.may_hold(overlay.hash(code)))
            .count();
        // Only codes sharing a bucket with one of the 5,000 kept may still say "maybe".
        assert!(
            skipped > 4_900,
            "{skipped} of 5000 forgotten codes skip the map"
        );
        for code in &codes[5_000..] {
            overlay.forget_if_committed_at(code, 0);
            overlay.roll_back(code);
        }
        for (seq, code) in codes.iter().enumerate().skip(5_000) {
            overlay.forget_if_committed_at(code, seq as u64);
        }
        overlay.rebuild_filter();
        assert!(overlay.is_empty());
        assert!(codes
            .iter()
            .all(|code| !overlay.written.may_hold(overlay.hash(code))));
    }

    #[test]
    fn a_commit_is_seen_by_every_later_lookup_while_the_filter_is_rebuilt() {
        let overlay = Overlay::default();
        let committed = AtomicUsize::new(0);
        let done = std::sync::atomic::AtomicBool::new(false);
        const CODES: usize = 20_000;
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !done.load(Ordering::Acquire) {
                    overlay.rebuild_filter();
                }
            });
            for reader in 0..2 {
                let (overlay, committed, done) = (&overlay, &committed, &done);
                scope.spawn(move || {
                    let mut next = reader;
                    while !done.load(Ordering::Acquire) {
                        let seen = committed.load(Ordering::Acquire);
                        if seen == 0 {
                            continue;
                        }
                        let code = format!("c{}", next % seen);
                        assert!(url_of(overlay, &code).is_some(), "{code} vanished");
                        next = next.wrapping_mul(31).wrapping_add(7);
                    }
                });
            }
            for i in 0..CODES {
                overlay.commit(i as u64, link(&format!("c{i}"), "https://a/"));
                committed.store(i + 1, Ordering::Release);
            }
            done.store(true, Ordering::Release);
        });
    }

    #[test]
    fn concurrent_creates_of_one_code_have_one_winner() {
        let overlay = Arc::new(Overlay::default());
        let winners = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let overlay = overlay.clone();
                let winners = winners.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        if overlay.reserve_new(&format!("c{i}"), || false).is_ok() {
                            winners.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("join");
        }
        assert_eq!(winners.load(Ordering::Relaxed), 1000);
    }
}
