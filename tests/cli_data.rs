//! The data-file commands as an operator runs them: the real `kurz` binary on real files in a
//! temp dir — import, snapshot, export, verify, inspect — including corrupt input.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use kurz::store::link::{Link, LinkMeta};
use kurz::store::wal::FsyncPolicy;
use kurz::store::{Store, StoreError, StoreOptions};

fn kurz(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kurz"))
        .args(args)
        .env("KURZ_LOG", "warn")
        .output()
        .expect("run kurz")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write_links(path: &Path, count: usize) -> BTreeSet<(String, String)> {
    let links: BTreeSet<(String, String)> = (0..count)
        .map(|i| {
            (
                format!("c{i:05}"),
                format!("https://example.com/{i}/page?q={}", i * 7),
            )
        })
        .collect();
    let body: String = links
        .iter()
        .map(|(code, url)| format!("{code}\t{url}\n"))
        .collect();
    fs::write(path, body).expect("write links file");
    links
}

#[test]
fn import_snapshot_reopen_finds_every_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf-8 path");
    let input = dir.path().join("links.tsv");
    let links = write_links(&input, 5000);

    let imported = kurz(&[
        "import",
        "--data-dir",
        data_arg,
        input.to_str().expect("path"),
    ]);
    assert!(imported.status.success(), "{}", text(&imported.stderr));
    assert!(
        text(&imported.stdout).contains("imported 5000 links"),
        "{}",
        text(&imported.stdout)
    );
    let compacted = kurz(&["snapshot", "--data-dir", data_arg]);
    assert!(compacted.status.success(), "{}", text(&compacted.stderr));

    let store = Store::open_read_only(&data).expect("reopen");
    for (code, url) in &links {
        assert_eq!(
            store.get(code).map(|link| link.long_url).as_ref(),
            Some(url)
        );
    }
    assert!(store.get("c99999").is_none());
    assert!(store.get("C00001").is_none(), "codes are case-sensitive");
    assert_eq!(store.live_links(), 5000);

    let exported = kurz(&["export", "--data-dir", data_arg, "--format", "tsv"]);
    assert!(exported.status.success());
    let exported: BTreeSet<(String, String)> = text(&exported.stdout)
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(code, url)| (code.to_owned(), url.to_owned()))
        .collect();
    assert_eq!(exported, links);

    let inspected = kurz(&["inspect", "--data-dir", data_arg]);
    assert!(inspected.status.success());
    assert!(
        text(&inspected.stdout).contains("5000 live"),
        "{}",
        text(&inspected.stdout)
    );
    assert!(
        text(&inspected.stdout).contains("snapshot        format 2,"),
        "{}",
        text(&inspected.stdout)
    );
}

#[test]
fn import_names_the_lines_it_skips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let input = dir.path().join("links.tsv");
    fs::write(
        &input,
        "ok\thttps://example.com/\nbad\tjavascript:alert(1)\nok\thttps://dup.example/\n",
    )
    .expect("write");
    let output = kurz(&[
        "import",
        "--data-dir",
        data.to_str().expect("path"),
        input.to_str().expect("path"),
    ]);
    assert!(output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("links.tsv:2: skipped"), "{stderr}");
    assert!(stderr.contains("links.tsv:3: skipped"), "{stderr}");
    assert!(text(&output.stdout).contains("2 rows skipped"));

    let strict = kurz(&[
        "import",
        "--strict",
        "--data-dir",
        dir.path().join("strict").to_str().expect("path"),
        input.to_str().expect("path"),
    ]);
    assert_eq!(strict.status.code(), Some(2));
    assert!(text(&strict.stderr).contains("nothing was imported"));

    let rejects = dir.path().join("skipped.tsv");
    let listed = kurz(&[
        "import",
        "--data-dir",
        dir.path().join("listed").to_str().expect("path"),
        "--rejects",
        rejects.to_str().expect("path"),
        input.to_str().expect("path"),
    ]);
    assert!(listed.status.success());
    let skipped = fs::read_to_string(&rejects).expect("rejects file");
    let lines: Vec<&str> = skipped.lines().collect();
    assert_eq!(lines.len(), 2, "{skipped}");
    assert!(lines[0].starts_with("2\t"), "{skipped}");
    assert!(
        lines[1].starts_with("3\t") && lines[1].contains("already exists"),
        "{skipped}"
    );
}

#[test]
fn verify_reports_corrupt_snapshots_and_leaves_them_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("path");
    let input = dir.path().join("links.tsv");
    write_links(&input, 300);
    assert!(kurz(&[
        "import",
        "--data-dir",
        data_arg,
        input.to_str().expect("path")
    ])
    .status
    .success());
    let snapshot = data.join("snapshot.kurz");
    let snapshot_arg = snapshot.to_str().expect("path");
    let good = kurz(&["verify", snapshot_arg]);
    assert!(good.status.success(), "{}", text(&good.stdout));
    assert!(text(&good.stdout).contains("format 2, 300 links"));

    let original = fs::read(&snapshot).expect("read");
    for (name, corrupt) in [
        ("magic", {
            let mut bytes = original.clone();
            bytes[0] ^= 0xFF;
            bytes
        }),
        ("body", {
            let mut bytes = original.clone();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x10;
            bytes
        }),
        ("truncated", original[..original.len() - 100].to_vec()),
    ] {
        fs::write(&snapshot, &corrupt).expect("corrupt");
        let verified = kurz(&["verify", snapshot_arg]);
        assert_eq!(
            verified.status.code(),
            Some(1),
            "{name}: {}",
            text(&verified.stdout)
        );
        assert!(text(&verified.stdout).contains("BAD"), "{name}");
        // The server-side commands refuse it too, naming the file, and write nothing.
        let compacted = kurz(&["snapshot", "--data-dir", data_arg]);
        assert_eq!(compacted.status.code(), Some(2), "{name}");
        assert!(
            text(&compacted.stderr).contains("snapshot.kurz"),
            "{name}: {}",
            text(&compacted.stderr)
        );
        assert_eq!(
            fs::read(&snapshot).expect("read"),
            corrupt,
            "{name}: file was changed"
        );
    }
}

#[test]
fn verify_finds_a_torn_wal_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let store = Store::open(
        &data,
        StoreOptions {
            fsync: FsyncPolicy::Always,
        },
    )
    .expect("open");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for i in 0..3 {
        let link = Link {
            code: format!("w{i}"),
            long_url: format!("https://example.com/{i}"),
            meta: LinkMeta::new(1_700_000_000),
        };
        runtime.block_on(store.create(link)).expect("create");
    }
    store.close();
    let segment = data.join("wal").join("wal-00000000000000000001.log");
    let segment_arg = segment.to_str().expect("path");
    let good = kurz(&["verify", segment_arg]);
    assert!(good.status.success(), "{}", text(&good.stdout));
    assert!(text(&good.stdout).contains("3 records"));

    let bytes = fs::read(&segment).expect("read");
    fs::write(&segment, &bytes[..bytes.len() - 5]).expect("tear");
    let torn = kurz(&["verify", segment_arg]);
    assert_eq!(torn.status.code(), Some(1));
    assert!(
        text(&torn.stdout).contains("2 records"),
        "{}",
        text(&torn.stdout)
    );
    assert!(
        text(&torn.stdout).contains("BAD at byte"),
        "{}",
        text(&torn.stdout)
    );

    // The owner cuts the torn record at start-up and keeps the two whole ones.
    let reopened = Store::open(
        &data,
        StoreOptions {
            fsync: FsyncPolicy::Always,
        },
    )
    .expect("reopen");
    assert!(reopened.get("w1").is_some());
    assert!(reopened.get("w2").is_none());
    assert!(reopened.recovery().cut.is_some());
}

#[test]
fn a_data_dir_has_one_owner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Store::open(
        dir.path(),
        StoreOptions {
            fsync: FsyncPolicy::Always,
        },
    )
    .expect("open");
    let second = Store::open(
        dir.path(),
        StoreOptions {
            fsync: FsyncPolicy::Always,
        },
    );
    assert!(matches!(second, Err(StoreError::Locked { .. })));
    let imported = kurz(&["snapshot", "--data-dir", dir.path().to_str().expect("path")]);
    assert_eq!(imported.status.code(), Some(2));
    assert!(text(&imported.stderr).contains("in use by another kurz process"));
    first.close();
    assert!(Store::open(
        dir.path(),
        StoreOptions {
            fsync: FsyncPolicy::Always
        }
    )
    .is_ok());
}

#[test]
fn offline_writes_refuse_a_cluster_nodes_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(
        dir.path().join(kurz::cluster::datadir::MARKER_FILE),
        r#"{"stream":"KURZ_LINKS","layout":"all-1"}"#,
    )
    .expect("write the marker");
    let links = dir.path().join("links.tsv");
    write_links(&links, 3);
    let path = dir.path().to_str().expect("path");
    for args in [
        vec!["snapshot", "--data-dir", path],
        vec!["import", "--data-dir", path, links.to_str().expect("path")],
    ] {
        let refused = kurz(&args);
        assert_eq!(refused.status.code(), Some(2), "{args:?}");
        assert!(
            text(&refused.stderr).contains("belongs to a cluster node"),
            "{args:?}: {}",
            text(&refused.stderr)
        );
    }
    assert!(
        !dir.path().join("snapshot.kurz").exists(),
        "nothing was written"
    );
}
