//! What the benchmarks share: deterministic synthetic links and a snapshot file of them.

use std::path::Path;

use kurz::store::link::{Link, LinkMeta};
use kurz::store::snapshot::SnapshotBuilder;

/// Deterministic synthetic links shaped like data/gen-links.py's: 7-char codes, ~80-byte URLs.
pub fn synthetic_links(count: usize, salt: u64) -> Vec<(String, String)> {
    const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ salt;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|i| {
            let mut word = next();
            // Six random characters plus the index keep codes unique and 7+ bytes long.
            let prefix: String = (0..6)
                .map(|_| {
                    let c = BASE62[(word % 62) as usize] as char;
                    word /= 62;
                    c
                })
                .collect();
            let code = format!("{prefix}{i:x}");
            let url = format!(
                "https://www.example-{}.com/docs/archive/{}/item?id={}",
                next() % 100_000,
                next() % 1_000,
                next()
            );
            (code, url)
        })
        .collect()
}

pub fn link(code: &str, url: &str) -> Link {
    Link {
        code: code.to_owned(),
        long_url: url.to_owned(),
        meta: LinkMeta::new(1_700_000_000),
    }
}

pub fn write_snapshot(path: &Path, links: &[(String, String)]) {
    let mut builder = SnapshotBuilder::with_capacity(links.len(), links.len() * 96);
    for (code, url) in links {
        builder.add(link(code, url).view()).expect("add");
    }
    builder.write(path, 0).expect("write snapshot");
}
