//! Click analytics through the real server: classification of humans and bots, referrer
//! domains and countries (trusted header and GeoIP database), exact counts under concurrency,
//! persistence across SIGTERM and kill -9, the stats query, metrics, and QR codes.

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::mmdb::write_test_mmdb;
use common::{add_key, data_dir, request, KeepAlive, Server};
use kurz::analytics::geo::CountryResolver;
use serde_json::Value;

const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0";
const SLACKBOT: &str = "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)";
const FLUSH: [&str; 2] = ["--click-log-flush-ms", "50"];

fn stats(server: &Server, key: &str, code: &str, query: &str) -> Value {
    let reply = server.with_key("GET", &format!("/api/v1/stats/{code}{query}"), key, "");
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

/// Polls the stats until `done` holds (the aggregator runs beside the redirect path).
fn stats_when(server: &Server, key: &str, code: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = stats(server, key, code, "");
        if done(&answer) {
            return answer;
        }
        assert!(Instant::now() < deadline, "stats never settled: {answer}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ranked(answer: &Value, list: &str, key: &str) -> Vec<(String, u64)> {
    answer[list]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| {
                    (
                        e[key].as_str().unwrap_or("").to_owned(),
                        e["clicks"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn click(server: &Server, code: &str, headers: &[(&str, &str)]) {
    let reply = request(server.public, "GET", &format!("/{code}"), headers, b"");
    assert_eq!(reply.status, 302);
}

#[test]
fn humans_bots_referrers_and_countries_are_told_apart() {
    let dir = data_dir();
    let key = add_key(dir.path(), "alice", "write");
    let server = Server::start(
        dir.path(),
        &[FLUSH[0], FLUSH[1], "--country-header", "CF-IPCountry"],
    );
    let code = server.create(&key, r#"{"long_url":"https://example.com/launch"}"#);

    // Three humans through the lean keep-alive path, one through hyper, two unfurlers.
    let mut connection = KeepAlive::connect(server.public);
    for _ in 0..3 {
        let reply = connection.request(
            "GET",
            &format!("/{code}"),
            &[
                ("Referer", "https://www.News.example/story"),
                ("User-Agent", FIREFOX),
                ("CF-IPCountry", "de"),
            ],
        );
        assert_eq!(reply.status, 302);
    }
    click(&server, &code, &[("User-Agent", FIREFOX)]);
    click(
        &server,
        &code,
        &[("User-Agent", SLACKBOT), ("Referer", "https://slack.com/")],
    );
    click(&server, &code, &[("User-Agent", SLACKBOT)]);
    // HEAD only looks: no click.
    assert_eq!(
        request(server.public, "HEAD", &format!("/{code}"), &[], b"").status,
        302
    );

    let answer = stats_when(&server, &key, &code, |a| {
        a["human_clicks"] == 4 && a["bot_clicks"] == 2
    });
    assert_eq!(answer["clicks"], 6, "the exact count includes bots");
    assert_eq!(
        ranked(&answer, "referrers", "domain"),
        vec![("news.example".to_owned(), 3), ("direct".to_owned(), 1)]
    );
    assert_eq!(
        ranked(&answer, "countries", "country"),
        vec![("DE".to_owned(), 3), ("unknown".to_owned(), 1)]
    );
    assert_eq!(
        ranked(&answer, "browsers", "browser"),
        vec![("Firefox".to_owned(), 4)]
    );
    assert_eq!(
        ranked(&answer, "bots", "bot"),
        vec![("Slackbot".to_owned(), 2)]
    );
    let buckets = answer["buckets"].as_array().expect("buckets");
    let in_buckets: u64 = buckets
        .iter()
        .map(|b| b["clicks"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(in_buckets, 4);
    assert_eq!(answer["granularity"], "day");

    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let hourly = stats(
        &server,
        &key,
        &code,
        &format!("?granularity=hour&from={}&to={}", now_s - 86_400, now_s + 1),
    );
    let hours = hourly["buckets"].as_array().map_or(0, Vec::len);
    assert!((24..=25).contains(&hours), "{hours} hourly buckets");
    assert_eq!(hourly["window"]["clicks"], 4);
    for bad in [
        "?granularity=week",
        "?from=yesterday",
        "?colour=red",
        "?granularity=hour&from=0",
    ] {
        let reply = server.with_key("GET", &format!("/api/v1/stats/{code}{bad}"), &key, "");
        assert_eq!(reply.status, 400, "{bad}");
        assert_eq!(reply.json()["code"], "invalid_query", "{bad}");
    }
    let metrics = request(server.admin, "GET", "/metrics", &[], b"").text();
    assert!(metrics.contains("kurz_click_events_total 6"), "{metrics}");
    assert!(
        metrics.contains("kurz_click_events_bot_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kurz_click_events_dropped_total 0"),
        "{metrics}"
    );
}

#[test]
fn counts_are_exact_after_concurrent_redirects() {
    let dir = data_dir();
    let key = add_key(dir.path(), "alice", "write");
    let server = Server::start(dir.path(), &FLUSH);
    let code = server.create(&key, r#"{"long_url":"https://example.com/busy"}"#);
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                let mut connection = KeepAlive::connect(server.public);
                for _ in 0..50 {
                    let reply =
                        connection.request("GET", &format!("/{code}"), &[("User-Agent", FIREFOX)]);
                    assert_eq!(reply.status, 302);
                }
            });
        }
    });
    let answer = stats_when(&server, &key, &code, |a| a["human_clicks"] == 400);
    assert_eq!(answer["clicks"], 400);
    assert_eq!(answer["window"]["clicks"], 400);
}

#[test]
fn analytics_survive_sigterm_and_kill_9() {
    let dir = data_dir();
    let key = add_key(dir.path(), "alice", "write");
    let server = Server::start(dir.path(), &FLUSH);
    let code = server.create(&key, r#"{"long_url":"https://example.com/kept"}"#);
    for _ in 0..5 {
        click(
            &server,
            &code,
            &[("User-Agent", FIREFOX), ("Referer", "https://t.co/x")],
        );
    }
    stats_when(&server, &key, &code, |a| a["human_clicks"] == 5);
    // The event log is flushed every 50 ms; give it a few flushes before the kill.
    std::thread::sleep(Duration::from_millis(300));
    server.kill9();

    let server = Server::start(dir.path(), &FLUSH);
    let answer = stats(&server, &key, &code, "");
    assert_eq!(answer["human_clicks"], 5, "after kill -9: {answer}");
    assert_eq!(
        ranked(&answer, "referrers", "domain"),
        vec![("t.co".to_owned(), 5)]
    );
    for _ in 0..3 {
        click(&server, &code, &[("User-Agent", SLACKBOT)]);
    }
    stats_when(&server, &key, &code, |a| a["bot_clicks"] == 3);
    assert!(server.terminate().success());

    let server = Server::start(dir.path(), &FLUSH);
    let answer = stats(&server, &key, &code, "");
    assert_eq!(
        (answer["human_clicks"].clone(), answer["bot_clicks"].clone()),
        (5.into(), 3.into())
    );
}

#[test]
fn countries_come_from_a_geoip_database() {
    let dir = data_dir();
    let database = dir.path().join("countries.mmdb");
    write_test_mmdb(
        &database,
        &[([8, 8, 8, 0], 24, "US"), ([193, 99, 144, 0], 24, "DE")],
        true,
    );
    let key = add_key(dir.path(), "alice", "write");
    let server = Server::start(
        dir.path(),
        &[
            FLUSH[0],
            FLUSH[1],
            "--trusted-proxies",
            "127.0.0.1",
            "--geoip-db",
            database.to_str().expect("path"),
        ],
    );
    let code = server.create(&key, r#"{"long_url":"https://example.com/geo"}"#);
    click(&server, &code, &[("X-Forwarded-For", "8.8.8.8")]);
    click(
        &server,
        &code,
        &[("X-Forwarded-For", "10.0.0.1, 193.99.144.80")],
    );
    click(&server, &code, &[]);
    let answer = stats_when(&server, &key, &code, |a| a["human_clicks"] == 3);
    let mut countries = ranked(&answer, "countries", "country");
    countries.sort();
    assert_eq!(
        countries,
        vec![
            ("DE".to_owned(), 1),
            ("US".to_owned(), 1),
            ("unknown".to_owned(), 1)
        ]
    );
}

#[test]
fn both_database_layouts_are_read() {
    let dir = data_dir();
    for maxmind_style in [true, false] {
        let path = dir.path().join(format!("db-{maxmind_style}.mmdb"));
        write_test_mmdb(
            &path,
            &[([8, 8, 8, 0], 24, "US"), ([193, 99, 144, 0], 24, "de")],
            maxmind_style,
        );
        let resolver = CountryResolver::open(&path).expect("open test database");
        let ip = |text: &str| text.parse::<IpAddr>().ok();
        assert_eq!(resolver.country(ip("8.8.8.8"), None), "US");
        assert_eq!(resolver.country(ip("193.99.144.80"), Some("FR")), "DE");
        assert_eq!(resolver.country(ip("127.0.0.1"), Some("fr")), "FR");
        assert_eq!(resolver.country(ip("127.0.0.1"), None), "unknown");
    }
}

#[test]
fn a_missing_geoip_database_stops_start_up_with_its_name() {
    let dir = data_dir();
    let output = common::serve_command(dir.path(), &["--geoip-db", "/nonexistent/countries.mmdb"])
        .output()
        .expect("run kurz");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/countries.mmdb"));
}

#[test]
fn qr_codes_in_svg_and_png() {
    let dir = data_dir();
    let key = add_key(dir.path(), "alice", "write");
    let server = Server::start(dir.path(), &[]);
    let code = server.create(&key, r#"{"long_url":"https://example.com/qr"}"#);
    let svg = server.with_key("GET", &format!("/api/v1/urls/{code}/qr"), &key, "");
    assert_eq!(svg.status, 200);
    assert_eq!(svg.header("content-type"), Some("image/svg+xml"));
    assert!(svg.text().contains("<svg"));
    let png = server.with_key(
        "GET",
        &format!("/api/v1/urls/{code}/qr?format=png"),
        &key,
        "",
    );
    assert_eq!(png.status, 200);
    assert_eq!(png.header("content-type"), Some("image/png"));
    assert!(png.body.starts_with(b"\x89PNG\r\n\x1a\n"));
    let bad = server.with_key(
        "GET",
        &format!("/api/v1/urls/{code}/qr?format=gif"),
        &key,
        "",
    );
    assert_eq!(bad.status, 400);
    let unknown = server.with_key("GET", "/api/v1/urls/nosuchcode/qr", &key, "");
    assert_eq!(unknown.status, 404);
    let anonymous = request(
        server.public,
        "GET",
        &format!("/api/v1/urls/{code}/qr"),
        &[],
        b"",
    );
    assert_eq!(anonymous.status, 401);
}

#[test]
fn with_analytics_off_counts_stay_exact_and_breakdowns_empty() {
    let dir = data_dir();
    let key = add_key(dir.path(), "alice", "write");
    let server = Server::start(dir.path(), &["--no-click-analytics"]);
    let code = server.create(&key, r#"{"long_url":"https://example.com/off"}"#);
    click(&server, &code, &[("User-Agent", FIREFOX)]);
    let answer = stats(&server, &key, &code, "");
    assert_eq!(answer["clicks"], 1);
    assert_eq!(answer["click_analytics"], false);
    assert_eq!(answer["human_clicks"], 0);
    assert!(!dir.path().join("analytics").exists());
}

#[test]
fn the_raw_click_log_gets_every_click_as_a_json_line() {
    let dir = data_dir();
    let key = add_key(dir.path(), "alice", "write");
    let log_dir = tempfile::tempdir().expect("tempdir");
    let log = log_dir.path().join("clicks.ndjson");
    let log_arg = log.to_string_lossy().into_owned();
    let server = Server::start(
        dir.path(),
        &[
            FLUSH[0],
            FLUSH[1],
            "--click-log",
            &log_arg,
            "--trusted-proxies",
            "127.0.0.1",
        ],
    );
    let code = server.create(&key, r#"{"long_url":"https://example.com/shipped"}"#);
    click(
        &server,
        &code,
        &[
            ("User-Agent", FIREFOX),
            ("Referer", "https://www.news.example/item?id=1"),
            ("X-Forwarded-For", "192.0.2.7"),
        ],
    );
    click(&server, &code, &[("User-Agent", SLACKBOT)]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let lines: Vec<Value> = loop {
        let lines: Vec<Value> = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect();
        if lines.len() >= 2 {
            break lines;
        }
        assert!(Instant::now() < deadline, "the click log has {lines:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(lines.len(), 2);
    let human = &lines[0];
    assert_eq!(human["code"], code.as_str());
    assert_eq!(human["referer"], "https://www.news.example/item?id=1");
    assert_eq!(human["referrer_domain"], "news.example");
    assert_eq!(human["user_agent"], FIREFOX);
    assert_eq!(human["client_ip"], "192.0.2.7");
    assert_eq!(human["browser"], "Firefox");
    assert_eq!(human["bot"], false);
    assert!(human["at"].as_str().is_some_and(|at| at.ends_with('Z')));
    assert_eq!(lines[1]["bot"], true);
    assert_eq!(lines[1]["browser"], "Slackbot");

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_kurz"))
        .args(["serve", "--no-click-analytics", "--click-log", &log_arg])
        .output()
        .expect("run kurz");
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("click_log"));
}

/// A snapshot cycle through the admin API, which must succeed.
fn snapshot_now(server: &Server, admin_key: &str) {
    let snapshot = server.admin_call("POST", "/admin/snapshot", admin_key);
    assert_eq!(snapshot.status, 200, "{}", snapshot.text());
}

/// Waits (10 s at most) until the changes file holds `clicks` as `code`'s count.
fn wait_for_saved_count(changes: &Path, code: &str, clicks: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(changes)
        .unwrap_or_default()
        .contains(&format!("{code}\t{clicks}\t"))
    {
        assert!(
            Instant::now() < deadline,
            "a count of {clicks} for {code} never reached the disk"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn counts_and_aggregates_outlive_a_snapshot_cycle_and_a_kill_9() {
    let dir = data_dir();
    let key = add_key(dir.path(), "alice", "write");
    let admin_key = add_key(dir.path(), "root", "admin");
    let server = Server::start(dir.path(), &FLUSH);
    let code = server.create(&key, r#"{"long_url":"https://example.com/compacted"}"#);
    for _ in 0..4 {
        click(&server, &code, &[("User-Agent", FIREFOX)]);
    }
    stats_when(&server, &key, &code, |a| a["human_clicks"] == 4);
    // A snapshot cycle folds the link into a new snapshot file and deletes the WAL that held it;
    // the clicks live beside the snapshot and must not go with the WAL.
    snapshot_now(&server, &admin_key);
    click(&server, &code, &[("User-Agent", FIREFOX)]);
    stats_when(&server, &key, &code, |a| a["human_clicks"] == 5);
    // Both the exact counts (checkpointed every second by default) and the analytics log
    // (every 50 ms here) have had time to reach the disk.
    let changes = dir.path().join("clicks-changes.tsv");
    wait_for_saved_count(&changes, &code, 5);
    server.kill9();

    let server = Server::start(dir.path(), &FLUSH);
    let answer = stats(&server, &key, &code, "");
    assert_eq!(answer["clicks"], 5, "exact count: {answer}");
    assert_eq!(answer["human_clicks"], 5, "aggregates: {answer}");
    let link = server
        .with_key("GET", &format!("/api/v1/urls/{code}"), &key, "")
        .json();
    assert_eq!(link["clicks"], 5);

    // Now the link is in the snapshot and its count sits in the dense counts by slot; another
    // cycle lays the table out anew and the count has to move with it.
    click(&server, &code, &[("User-Agent", FIREFOX)]);
    snapshot_now(&server, &admin_key);
    click(&server, &code, &[("User-Agent", FIREFOX)]);
    wait_for_saved_count(&changes, &code, 7);
    assert_eq!(stats(&server, &key, &code, "")["clicks"], 7);
    server.kill9();
    let server = Server::start(dir.path(), &FLUSH);
    assert_eq!(
        stats(&server, &key, &code, "")["clicks"],
        7,
        "after the move and a kill -9"
    );
}
