//! The JSON API and the redirect path of the real binary, over real sockets: every endpoint and
//! every error status of SPEC section 3.

mod common;

use std::time::{Duration, Instant};

use common::{add_key, data_dir, request, KeepAlive, Server};
use serde_json::Value;

fn server_with_keys() -> (tempfile::TempDir, Server, String, String) {
    let dir = data_dir();
    let write_key = add_key(dir.path(), "writer", "write");
    let admin_key = add_key(dir.path(), "root", "admin");
    let server = Server::start(dir.path(), &[]);
    (dir, server, write_key, admin_key)
}

#[test]
fn create_then_redirect_then_read_back_with_clicks() {
    let (_dir, server, key, _) = server_with_keys();
    let reply = server.post_json(
        "/api/v1/shorten",
        &key,
        r#"{"long_url":"https://example.com/a?b=1","custom_alias":"my-link"}"#,
    );
    assert_eq!(reply.status, 201, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["short_code"], "my-link");
    assert_eq!(body["long_url"], "https://example.com/a?b=1");
    assert_eq!(
        body["short_url"],
        format!("http://{}/my-link", server.public)
    );
    assert!(body["created_at"].as_str().is_some());
    assert_eq!(body["expires_at"], Value::Null);
    assert_eq!(
        reply.header("location"),
        Some(format!("http://{}/api/v1/urls/my-link", server.public).as_str())
    );

    let redirect = server.get("/my-link");
    assert_eq!(redirect.status, 302);
    assert_eq!(
        redirect.header("location"),
        Some("https://example.com/a?b=1")
    );
    assert_eq!(redirect.header("cache-control"), Some("private, max-age=0"));

    let head = request(server.public, "HEAD", "/my-link", &[], b"");
    assert_eq!(head.status, 302);
    assert_eq!(head.header("location"), Some("https://example.com/a?b=1"));

    let read = server.with_key("GET", "/api/v1/urls/my-link", &key, "");
    assert_eq!(read.status, 200, "{}", read.text());
    let link = read.json();
    assert_eq!(link["clicks"], 1, "GET counts, HEAD does not: {link}");
    assert!(link["last_clicked_at"].as_str().is_some());
    assert_eq!(link["status"], "active");
    assert_eq!(link["custom"], true);

    let stats = server.with_key("GET", "/api/v1/stats/my-link", &key, "");
    assert_eq!(stats.status, 200);
    assert_eq!(stats.json()["clicks"], 1);

    let generated = server.create(&key, r#"{"long_url":"https://example.org/"}"#);
    assert_eq!(generated.len(), 7);
    assert_eq!(server.get(&format!("/{generated}")).status, 302);
}

#[test]
fn per_link_status_cache_control_and_query_forwarding() {
    let (_dir, server, key, _) = server_with_keys();
    for (status, cache_control) in [
        (301, "public, max-age=86400"),
        (302, "private, max-age=0"),
        (307, "private, max-age=0"),
        (308, "public, max-age=86400"),
    ] {
        let code = server.create(
            &key,
            &format!(r#"{{"long_url":"https://example.com/{status}","redirect_status":{status}}}"#),
        );
        let reply = server.get(&format!("/{code}"));
        assert_eq!(reply.status, status);
        assert_eq!(reply.header("cache-control"), Some(cache_control));
    }
    let forwarding = server.create(
        &key,
        r#"{"long_url":"https://example.com/p?a=1#frag","forward_query":true}"#,
    );
    let reply = server.get(&format!("/{forwarding}?utm=x&b=2"));
    assert_eq!(
        reply.header("location"),
        Some("https://example.com/p?a=1&utm=x&b=2#frag")
    );
    let plain = server.create(&key, r#"{"long_url":"https://example.com/q"}"#);
    let reply = server.get(&format!("/{plain}?utm=x"));
    assert_eq!(reply.header("location"), Some("https://example.com/q"));
}

#[test]
fn unknown_and_malformed_codes_are_404_in_text_or_json() {
    let (_dir, server, _, _) = server_with_keys();
    let reply = server.get("/nope1234");
    assert_eq!(reply.status, 404);
    assert!(reply
        .header("content-type")
        .unwrap_or("")
        .starts_with("text/plain"));
    let reply = request(
        server.public,
        "GET",
        "/nope1234",
        &[("Accept", "application/json")],
        b"",
    );
    assert_eq!(reply.status, 404);
    assert_eq!(reply.code(), "not_found");
    for path in [
        "/a.b",
        "/%41bc",
        "/",
        "/a/b",
        &format!("/{}", "a".repeat(65)),
    ] {
        assert_eq!(server.get(path).status, 404, "{path}");
    }
    let reply = request(server.public, "POST", "/abc", &[], b"");
    assert_eq!(reply.status, 405);
    let reply = server.get("/api/v1/nothing");
    assert_eq!(reply.status, 404);
    assert_eq!(reply.code(), "no_such_route");
}

#[test]
fn create_errors_have_their_statuses_and_machine_codes() {
    let (_dir, server, key, _) = server_with_keys();
    let cases = [
        (r#"{"long_url":"not a url"}"#, 400, "invalid_url"),
        (
            r#"{"long_url":"javascript:alert(1)"}"#,
            400,
            "scheme_not_allowed",
        ),
        (
            r#"{"long_url":"data:text/html,hi"}"#,
            400,
            "scheme_not_allowed",
        ),
        (
            r#"{"long_url":"https://example.com/","custom_alias":"a/b"}"#,
            400,
            "invalid_alias",
        ),
        (
            r#"{"long_url":"https://example.com/","custom_alias":"ab"}"#,
            400,
            "invalid_alias",
        ),
        (
            r#"{"long_url":"https://example.com/","custom_alias":"admin"}"#,
            400,
            "reserved_alias",
        ),
        (
            r#"{"long_url":"https://example.com/","redirect_status":303}"#,
            400,
            "invalid_redirect_status",
        ),
        (
            r#"{"long_url":"https://example.com/","max_clicks":0}"#,
            400,
            "invalid_max_clicks",
        ),
        (
            r#"{"long_url":"https://example.com/","expires_in":-5}"#,
            400,
            "invalid_expiry",
        ),
        (
            r#"{"long_url":"https://example.com/","expires_at":"2001-01-01T00:00:00Z"}"#,
            400,
            "invalid_expiry",
        ),
        (
            r#"{"long_url":"https://example.com/","expires_at":"tomorrow"}"#,
            400,
            "invalid_expiry",
        ),
        (
            r#"{"long_url":"https://example.com/","surprise":1}"#,
            400,
            "invalid_request",
        ),
        (r#"{"long_url":42}"#, 400, "invalid_request"),
        (r#"{"long_url":"#, 400, "invalid_json"),
        ("", 400, "invalid_json"),
    ];
    for (body, status, code) in cases {
        let reply = server.post_json("/api/v1/shorten", &key, body);
        assert_eq!(reply.status, status, "{body}: {}", reply.text());
        assert_eq!(reply.code(), code, "{body}");
        assert!(reply.json()["error"]
            .as_str()
            .is_some_and(|text| !text.is_empty()));
    }
    let own = format!(r#"{{"long_url":"http://{}/x"}}"#, server.public);
    assert_eq!(
        server.post_json("/api/v1/shorten", &key, &own).code(),
        "own_host"
    );
    let long = format!(
        r#"{{"long_url":"https://example.com/{}"}}"#,
        "a".repeat(3000)
    );
    assert_eq!(
        server.post_json("/api/v1/shorten", &key, &long).code(),
        "url_too_long"
    );

    let auth = format!("Bearer {key}");
    let invalid_utf8 = request(
        server.public,
        "POST",
        "/api/v1/shorten",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        b"{\"long_url\":\"https://example.com/\xff\"}",
    );
    assert_eq!(invalid_utf8.status, 400);
    assert_eq!(invalid_utf8.code(), "invalid_utf8");

    let not_json = request(
        server.public,
        "POST",
        "/api/v1/shorten",
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
        br#"{"long_url":"https://example.com/"}"#,
    );
    assert_eq!(not_json.status, 415);
    assert_eq!(not_json.code(), "unsupported_media_type");

    let huge = format!(
        r#"{{"long_url":"https://example.com/{}"}}"#,
        "a".repeat(20_000)
    );
    let too_large = server.post_json("/api/v1/shorten", &key, &huge);
    assert_eq!(too_large.status, 413);
    assert_eq!(too_large.code(), "body_too_large");

    let chunked = request(
        server.public,
        "POST",
        "/api/v1/shorten",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
            ("Transfer-Encoding", "chunked"),
        ],
        format!("4e20\r\n{}\r\n0\r\n\r\n", "a".repeat(20_000)).as_bytes(),
    );
    assert_eq!(
        chunked.status, 413,
        "a body without Content-Length is capped too"
    );
}

#[test]
fn keys_are_required_and_checked() {
    let (_dir, server, key, _) = server_with_keys();
    let body = br#"{"long_url":"https://example.com/"}"#;
    let anonymous = request(
        server.public,
        "POST",
        "/api/v1/shorten",
        &[("Content-Type", "application/json")],
        body,
    );
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.code(), "missing_key");
    assert!(anonymous.header("www-authenticate").is_some());
    let wrong = server.post_json(
        "/api/v1/shorten",
        "kurz_wrong",
        std::str::from_utf8(body).unwrap_or(""),
    );
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.code(), "invalid_key");
    let code = server.create(&key, r#"{"long_url":"https://example.com/"}"#);
    for method in ["GET", "DELETE"] {
        let reply = request(
            server.public,
            method,
            &format!("/api/v1/urls/{code}"),
            &[],
            b"",
        );
        assert_eq!(reply.status, 401, "{method}");
    }
}

#[test]
fn anonymous_creation_when_allowed() {
    let dir = data_dir();
    let server = Server::start(dir.path(), &["--allow-anonymous-create"]);
    let reply = request(
        server.public,
        "POST",
        "/api/v1/shorten",
        &[("Content-Type", "application/json")],
        br#"{"long_url":"https://example.com/anon"}"#,
    );
    assert_eq!(reply.status, 201, "{}", reply.text());
    let code = reply.json()["short_code"].as_str().unwrap_or("").to_owned();
    assert_eq!(server.get(&format!("/{code}")).status, 302);
    let read = request(
        server.public,
        "GET",
        &format!("/api/v1/urls/{code}"),
        &[],
        b"",
    );
    assert_eq!(
        read.status, 401,
        "reading and changing links still needs a key"
    );
}

#[test]
fn taken_alias_is_409_with_free_suggestions() {
    let (_dir, server, key, _) = server_with_keys();
    server.create(
        &key,
        r#"{"long_url":"https://example.com/1","custom_alias":"promo"}"#,
    );
    server.create(
        &key,
        r#"{"long_url":"https://example.com/2","custom_alias":"promo-1"}"#,
    );
    let reply = server.post_json(
        "/api/v1/shorten",
        &key,
        r#"{"long_url":"https://example.com/3","custom_alias":"promo"}"#,
    );
    assert_eq!(reply.status, 409);
    let body = reply.json();
    assert_eq!(body["code"], "alias_taken");
    let suggested: Vec<String> = body["suggested"]
        .as_array()
        .expect("suggested")
        .iter()
        .filter_map(|value| value.as_str().map(str::to_owned))
        .collect();
    assert!(!suggested.is_empty());
    assert!(!suggested.contains(&"promo-1".to_owned()));
    for alias in suggested {
        server.create(
            &key,
            &format!(r#"{{"long_url":"https://example.com/s","custom_alias":"{alias}"}}"#),
        );
    }
}

#[test]
fn rate_limit_answers_429_with_retry_after() {
    let dir = data_dir();
    let key = add_key(dir.path(), "writer", "write");
    let server = Server::start(
        dir.path(),
        &["--rate-limit-burst", "2", "--rate-limit-per-s", "0.01"],
    );
    let body = r#"{"long_url":"https://example.com/"}"#;
    assert_eq!(server.post_json("/api/v1/shorten", &key, body).status, 201);
    assert_eq!(server.post_json("/api/v1/shorten", &key, body).status, 201);
    let limited = server.post_json("/api/v1/shorten", &key, body);
    assert_eq!(limited.status, 429);
    assert_eq!(limited.code(), "rate_limited");
    let retry_after: u64 = limited
        .header("retry-after")
        .and_then(|value| value.parse().ok())
        .expect("Retry-After in whole seconds");
    assert!(retry_after >= 1);
}

#[test]
fn batch_creates_with_per_item_results() {
    let (_dir, server, key, _) = server_with_keys();
    let reply = server.post_json(
        "/api/v1/shorten/batch",
        &key,
        r#"{"items":[
            {"long_url":"https://example.com/1"},
            {"long_url":"ftp://example.com/2"},
            {"long_url":"https://example.com/3","custom_alias":"batch-3"},
            {"nope":true}
        ]}"#,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["created"], 2);
    assert_eq!(body["failed"], 2);
    let results = body["results"].as_array().expect("results");
    let statuses: Vec<u64> = results
        .iter()
        .map(|r| r["status"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(statuses, vec![201, 400, 201, 400]);
    assert_eq!(results[1]["code"], "scheme_not_allowed");
    assert_eq!(results[2]["short_code"], "batch-3");
    assert_eq!(results[3]["index"], 3);
    let first = results[0]["short_code"].as_str().expect("code");
    assert_eq!(server.get(&format!("/{first}")).status, 302);
    assert_eq!(server.get("/batch-3").status, 302);

    let items: Vec<String> = (0..1001)
        .map(|_| r#"{"long_url":"https://e.com/"}"#.to_owned())
        .collect();
    let too_many = server.post_json(
        "/api/v1/shorten/batch",
        &key,
        &format!(r#"{{"items":[{}]}}"#, items.join(",")),
    );
    assert_eq!(too_many.status, 400);
    assert_eq!(too_many.code(), "batch_too_large");
}

#[test]
fn patch_disable_enable_and_delete() {
    let (_dir, server, key, _) = server_with_keys();
    let code = server.create(
        &key,
        r#"{"long_url":"https://example.com/old","custom_alias":"life"}"#,
    );
    let patched = server.with_key(
        "PATCH",
        "/api/v1/urls/life",
        &key,
        r#"{"long_url":"https://example.com/new","redirect_status":301,"max_clicks":100}"#,
    );
    assert_eq!(patched.status, 200, "{}", patched.text());
    assert_eq!(patched.json()["long_url"], "https://example.com/new");
    assert_eq!(patched.json()["redirect_status"], 301);
    let reply = server.get("/life");
    assert_eq!(
        (reply.status, reply.header("location")),
        (301, Some("https://example.com/new"))
    );

    let cleared = server.with_key(
        "PATCH",
        "/api/v1/urls/life",
        &key,
        r#"{"redirect_status":null,"max_clicks":null}"#,
    );
    assert_eq!(cleared.json()["redirect_status"], Value::Null);
    assert_eq!(cleared.json()["max_clicks"], Value::Null);
    assert_eq!(server.get("/life").status, 302);

    let disabled = server.with_key(
        "PATCH",
        "/api/v1/urls/life",
        &key,
        r#"{"status":"disabled"}"#,
    );
    assert_eq!(disabled.json()["status"], "disabled");
    let reply = request(
        server.public,
        "GET",
        "/life",
        &[("Accept", "application/json")],
        b"",
    );
    assert_eq!((reply.status, reply.code()), (410, "disabled".to_owned()));
    server.with_key("PATCH", "/api/v1/urls/life", &key, r#"{"status":"active"}"#);
    assert_eq!(server.get("/life").status, 302);

    let bad = server.with_key(
        "PATCH",
        "/api/v1/urls/life",
        &key,
        r#"{"status":"deleted"}"#,
    );
    assert_eq!((bad.status, bad.code()), (400, "invalid_status".to_owned()));
    let bad = server.with_key(
        "PATCH",
        "/api/v1/urls/life",
        &key,
        r#"{"long_url":"javascript:x"}"#,
    );
    assert_eq!(
        (bad.status, bad.code()),
        (400, "scheme_not_allowed".to_owned())
    );
    let missing = server.with_key(
        "PATCH",
        "/api/v1/urls/nothere",
        &key,
        r#"{"status":"active"}"#,
    );
    assert_eq!(missing.status, 404);

    let deleted = server.with_key("DELETE", &format!("/api/v1/urls/{code}"), &key, "");
    assert_eq!(deleted.status, 204);
    assert_eq!(server.get("/life").status, 410);
    assert_eq!(
        server.with_key("GET", "/api/v1/urls/life", &key, "").status,
        410
    );
    assert_eq!(
        server
            .with_key("DELETE", "/api/v1/urls/life", &key, "")
            .status,
        204
    );
    assert_eq!(
        server
            .with_key("PATCH", "/api/v1/urls/life", &key, r#"{"status":"active"}"#)
            .status,
        410
    );
    assert_eq!(
        server
            .with_key("DELETE", "/api/v1/urls/nothere", &key, "")
            .status,
        404
    );
    let again = server.post_json(
        "/api/v1/shorten",
        &key,
        r#"{"long_url":"https://example.com/again","custom_alias":"life"}"#,
    );
    assert_eq!(
        again.status, 409,
        "a deleted code is never handed out again"
    );
}

#[test]
fn expiry_answers_410() {
    let (_dir, server, key, _) = server_with_keys();
    let code = server.create(
        &key,
        r#"{"long_url":"https://example.com/brief","expires_in":1}"#,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = request(
            server.public,
            "GET",
            &format!("/{code}"),
            &[("Accept", "application/json")],
            b"",
        );
        if reply.status == 410 {
            assert_eq!(reply.code(), "expired");
            break;
        }
        assert_eq!(reply.status, 302);
        assert!(Instant::now() < deadline, "never expired");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn click_cap_serves_exactly_n_redirects_under_concurrency() {
    const CAP: usize = 1000;
    const CLIENTS: usize = 64;
    const REQUESTS_PER_CLIENT: usize = 20;
    let (_dir, server, key, _) = server_with_keys();
    let code = server.create(
        &key,
        &format!(r#"{{"long_url":"https://example.com/capped","max_clicks":{CAP}}}"#),
    );
    let path = format!("/{code}");
    let start = std::sync::Barrier::new(CLIENTS);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..CLIENTS)
            .map(|_| {
                scope.spawn(|| {
                    let mut connection = KeepAlive::connect(server.public);
                    start.wait();
                    (0..REQUESTS_PER_CLIENT)
                        .map(|_| connection.request("GET", &path, &[]).status)
                        .collect::<Vec<u16>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|thread| thread.join().unwrap_or_default())
            .collect()
    });
    assert_eq!(statuses.len(), CLIENTS * REQUESTS_PER_CLIENT);
    assert_eq!(
        statuses.iter().filter(|status| **status == 302).count(),
        CAP
    );
    assert_eq!(
        statuses.iter().filter(|status| **status == 410).count(),
        CLIENTS * REQUESTS_PER_CLIENT - CAP
    );
    let link = server
        .with_key("GET", &format!("/api/v1/urls/{code}"), &key, "")
        .json();
    assert_eq!(link["clicks"], CAP);
}

#[test]
fn health_openapi_metrics_and_admin_auth() {
    let (_dir, server, key, admin_key) = server_with_keys();
    for addr in [server.public, server.admin] {
        assert_eq!(request(addr, "GET", "/healthz", &[], b"").status, 200);
        assert_eq!(request(addr, "GET", "/readyz", &[], b"").status, 200);
    }
    let openapi = server.get("/api/v1/openapi.json");
    assert_eq!(openapi.status, 200);
    assert!(openapi.json()["openapi"]
        .as_str()
        .is_some_and(|v| v.starts_with("3.")));

    server.get("/missing1");
    let metrics = request(server.admin, "GET", "/metrics", &[], b"");
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    assert!(
        text.contains("kurz_http_requests_total{route=\"redirect\",status=\"404\"}"),
        "{text}"
    );
    assert!(text.contains("kurz_redirect_latency_seconds_bucket"));
    assert!(text.contains("kurz_ready 1"));

    assert_eq!(
        request(server.admin, "GET", "/admin/info", &[], b"").status,
        401
    );
    assert_eq!(server.admin_call("GET", "/admin/info", &key).status, 403);
    let admin = format!("Bearer {admin_key}");
    let info = server.admin_call("GET", "/admin/info", &admin_key);
    assert_eq!(info.status, 200);
    let info = info.json();
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["snapshot_format"], 2);
    assert!(info["resident_bytes"]
        .as_u64()
        .is_some_and(|bytes| bytes > 0));
    assert_eq!(
        request(server.public, "GET", "/metrics", &[], b"").status,
        404,
        "admin routes stay off the public listener"
    );
    assert_eq!(
        request(
            server.public,
            "POST",
            "/admin/snapshot",
            &[("Authorization", &admin)],
            b""
        )
        .status,
        405
    );
}

#[test]
fn revoked_keys_stop_working_without_a_restart() {
    let (dir, server, key, _) = server_with_keys();
    let listed = common::kurz()
        .args(["keys", "list", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("keys list");
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed.contains("writer\twrite") && listed.contains("root\tadmin"),
        "{listed}"
    );
    assert!(!listed.contains(&key));
    server.create(&key, r#"{"long_url":"https://example.com/"}"#);
    let revoked = common::kurz()
        .args(["keys", "revoke", "writer", "--data-dir"])
        .arg(dir.path())
        .status()
        .expect("keys revoke");
    assert!(revoked.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = server.post_json(
            "/api/v1/shorten",
            &key,
            r#"{"long_url":"https://example.com/"}"#,
        );
        if reply.status == 401 {
            break;
        }
        assert!(Instant::now() < deadline, "revoked key still accepted");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn first_start_imports_the_sample_links() {
    let dir = data_dir();
    std::fs::write(
        dir.path().join("sample-links.tsv"),
        "rust\thttps://www.rust-lang.org/\n",
    )
    .expect("write sample");
    let server = Server::start(dir.path(), &[]);
    let reply = server.get("/rust");
    assert_eq!(reply.status, 302);
    assert_eq!(reply.header("location"), Some("https://www.rust-lang.org/"));
}

#[test]
fn counter_and_hash_code_strategies() {
    let dir = data_dir();
    let key = add_key(dir.path(), "writer", "write");
    let server = Server::start(dir.path(), &["--code-strategy", "counter"]);
    let codes: Vec<String> = (0..20)
        .map(|n| {
            server.create(
                &key,
                &format!(r#"{{"long_url":"https://example.com/{n}"}}"#),
            )
        })
        .collect();
    let unique: std::collections::HashSet<&String> = codes.iter().collect();
    assert_eq!(unique.len(), 20);
    assert!(codes.iter().all(|code| code.len() <= 11));
    assert_eq!(server.get(&format!("/{}", codes[0])).status, 302);
    drop(server);

    let server = Server::start(dir.path(), &["--code-strategy", "hash"]);
    let body = r#"{"long_url":"https://example.com/same","reuse":true}"#;
    let first = server.post_json("/api/v1/shorten", &key, body);
    assert_eq!(first.status, 201, "{}", first.text());
    let again = server.post_json("/api/v1/shorten", &key, body);
    assert_eq!(again.status, 200, "reuse answers with the existing link");
    assert_eq!(first.json()["short_code"], again.json()["short_code"]);
    let fresh = server.post_json(
        "/api/v1/shorten",
        &key,
        r#"{"long_url":"https://example.com/same"}"#,
    );
    assert_eq!(
        fresh.status, 201,
        "without reuse the same URL gets a new code"
    );
    assert_ne!(fresh.json()["short_code"], first.json()["short_code"]);
}

#[test]
fn per_ip_limits_follow_x_forwarded_for_only_from_trusted_proxies() {
    let create = |server: &Server, forwarded_for: &str| {
        request(
            server.public,
            "POST",
            "/api/v1/shorten",
            &[
                ("Content-Type", "application/json"),
                ("X-Forwarded-For", forwarded_for),
            ],
            br#"{"long_url":"https://example.com/xff"}"#,
        )
        .status
    };
    let limits = [
        "--allow-anonymous-create",
        "--rate-limit-burst",
        "1",
        "--rate-limit-per-s",
        "0.01",
    ];
    let dir = data_dir();
    let mut flags = limits.to_vec();
    flags.extend(["--trusted-proxies", "127.0.0.1"]);
    let server = Server::start(dir.path(), &flags);
    assert_eq!(create(&server, "203.0.113.1"), 201);
    assert_eq!(create(&server, "203.0.113.1"), 429);
    assert_eq!(
        create(&server, "198.51.100.7, 127.0.0.1"),
        201,
        "a second client behind the proxy"
    );
    drop(server);

    let dir = data_dir();
    let server = Server::start(dir.path(), &limits);
    assert_eq!(create(&server, "203.0.113.1"), 201);
    assert_eq!(
        create(&server, "198.51.100.7"),
        429,
        "untrusted peers cannot pick their address"
    );
}

#[test]
fn a_key_is_not_charged_for_a_create_its_address_was_refused() {
    let dir = data_dir();
    let first = add_key(dir.path(), "first", "write");
    let second = add_key(dir.path(), "second", "write");
    let server = Server::start(
        dir.path(),
        &[
            "--rate-limit-burst",
            "2",
            "--rate-limit-per-s",
            "0.01",
            "--trusted-proxies",
            "127.0.0.1",
        ],
    );
    let create = |key: &str, forwarded_for: &str| {
        let auth = format!("Bearer {key}");
        request(
            server.public,
            "POST",
            "/api/v1/shorten",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
                ("X-Forwarded-For", forwarded_for),
            ],
            br#"{"long_url":"https://example.com/limited"}"#,
        )
        .status
    };
    // The first key empties the address's bucket; the second key, from there, is refused.
    assert_eq!(create(&first, "203.0.113.1"), 201);
    assert_eq!(create(&first, "203.0.113.1"), 201);
    for _ in 0..3 {
        assert_eq!(create(&second, "203.0.113.1"), 429);
    }
    // Those refusals took nothing from the second key's own bucket: from another address it
    // still has its whole burst.
    assert_eq!(create(&second, "198.51.100.7"), 201);
    assert_eq!(create(&second, "198.51.100.7"), 201);
    assert_eq!(create(&second, "198.51.100.7"), 429);
}

#[test]
fn blocklist_and_private_addresses_are_refused() {
    let dir = data_dir();
    let key = add_key(dir.path(), "writer", "write");
    let blocklist = dir.path().join("blocked.txt");
    std::fs::write(&blocklist, "# spam\nevil.example\n").expect("blocklist");
    let server = Server::start(
        dir.path(),
        &[
            "--blocklist",
            blocklist.to_str().expect("utf-8 path"),
            "--reject-private-addresses",
        ],
    );
    for (url, code) in [
        ("https://evil.example/x", "blocked_domain"),
        ("https://www.evil.example/x", "blocked_domain"),
        ("http://10.0.0.1/", "private_address"),
        ("http://[::1]/", "private_address"),
    ] {
        let reply = server.post_json(
            "/api/v1/shorten",
            &key,
            &format!(r#"{{"long_url":"{url}"}}"#),
        );
        assert_eq!(
            (reply.status, reply.code()),
            (400, code.to_owned()),
            "{url}"
        );
    }
    server.create(&key, r#"{"long_url":"https://good.example/x"}"#);
}

/// `links_live` of /admin/info.
fn links_live(server: &Server, admin_key: &str) -> u64 {
    let info = server.admin_call("GET", "/admin/info", admin_key);
    assert_eq!(info.status, 200, "{}", info.text());
    info.json()["links_live"].as_u64().expect("links_live")
}

#[test]
fn a_batch_of_exactly_1000_items_succeeds_and_1001_is_refused_whole() {
    let (_dir, server, key, admin_key) = server_with_keys();
    let url = |n: usize| format!("https://example.com/batch/{n}");
    let items: Vec<String> = (0..1000)
        .map(|n| format!(r#"{{"long_url":"{}"}}"#, url(n)))
        .collect();
    let reply = server.post_json(
        "/api/v1/shorten/batch",
        &key,
        &format!(r#"{{"items":[{}]}}"#, items.join(",")),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(
        (body["created"].as_u64(), body["failed"].as_u64()),
        (Some(1000), Some(0))
    );
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 1000);
    let mut codes = std::collections::HashSet::new();
    let mut connection = KeepAlive::connect(server.public);
    for (n, result) in results.iter().enumerate() {
        assert_eq!(result["index"], n, "results in item order: {result}");
        assert_eq!(result["status"], 201, "{result}");
        assert_eq!(result["long_url"], url(n));
        let code = result["short_code"].as_str().expect("short_code");
        assert!(codes.insert(code.to_owned()), "{code} handed out twice");
        let redirect = connection.request("HEAD", &format!("/{code}"), &[]);
        assert_eq!(
            (redirect.status, redirect.header("location")),
            (302, Some(url(n).as_str())),
            "item {n}"
        );
    }
    assert_eq!(links_live(&server, &admin_key), 1000);

    let items: Vec<String> = (0..1001)
        .map(|n| format!(r#"{{"long_url":"https://example.com/over/{n}"}}"#))
        .collect();
    let too_many = server.post_json(
        "/api/v1/shorten/batch",
        &key,
        &format!(r#"{{"items":[{}]}}"#, items.join(",")),
    );
    assert_eq!(too_many.status, 400, "{}", too_many.text());
    assert_eq!(too_many.code(), "batch_too_large");
    assert_eq!(
        links_live(&server, &admin_key),
        1000,
        "a refused batch stores none of its items"
    );
}

/// Seconds of `public, max-age=N`.
fn max_age(reply: &common::Reply) -> u64 {
    reply
        .header("cache-control")
        .and_then(|value| value.strip_prefix("public, max-age="))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no public max-age: {:?}", reply.headers))
}

#[test]
fn patching_expires_at_changes_what_the_redirect_answers() {
    for hyper_only in [false, true] {
        let dir = data_dir();
        let key = add_key(dir.path(), "writer", "write");
        let flags: &[&str] = if hyper_only { &["--hyper-only"] } else { &[] };
        let server = Server::start(dir.path(), flags);
        let context = format!("hyper only: {hyper_only}");
        let code = server.create(
            &key,
            r#"{"long_url":"https://example.com/later","redirect_status":308}"#,
        );
        let path = format!("/{code}");
        let api = format!("/api/v1/urls/{code}");
        // The lean path on the default server; hyper answers everything with --hyper-only.
        let mut connection = KeepAlive::connect(server.public);
        let accept = [("Accept", "application/json")];
        let reply = connection.request("GET", &path, &accept);
        assert_eq!((reply.status, max_age(&reply)), (308, 86_400), "{context}");

        // An expiry an hour ahead: still redirects, and caches may keep it an hour at most.
        let in_an_hour = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        let text = in_an_hour
            .replace_nanosecond(0)
            .expect("whole seconds")
            .format(&time::format_description::well_known::Rfc3339)
            .expect("rfc3339");
        let patched = server.with_key(
            "PATCH",
            &api,
            &key,
            &format!(r#"{{"expires_at":"{text}"}}"#),
        );
        assert_eq!(patched.status, 200, "{context}: {}", patched.text());
        assert!(patched.json()["expires_at"].as_str().is_some(), "{context}");
        let reply = connection.request("GET", &path, &accept);
        assert_eq!(reply.status, 308, "{context}");
        assert!(
            (3_500..=3_600).contains(&max_age(&reply)),
            "{context}: max-age {} after the expiry moved to an hour ahead",
            max_age(&reply)
        );

        // An expiry a second ahead: once it passed, the link answers 410 expired.
        let soon = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
        let text = soon
            .format(&time::format_description::well_known::Rfc3339)
            .expect("rfc3339");
        let patched = server.with_key(
            "PATCH",
            &api,
            &key,
            &format!(r#"{{"expires_at":"{text}"}}"#),
        );
        assert_eq!(patched.status, 200, "{context}: {}", patched.text());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = connection.request("GET", &path, &accept);
            if reply.status == 410 {
                assert_eq!(reply.code(), "expired", "{context}");
                break;
            }
            assert_eq!(reply.status, 308, "{context}");
            assert!(max_age(&reply) <= 2, "{context}: cached past its expiry");
            assert!(Instant::now() < deadline, "{context}: never expired");
            std::thread::sleep(Duration::from_millis(50));
        }
        // An expiry in the past is refused and changes nothing.
        let refused = server.with_key(
            "PATCH",
            &api,
            &key,
            r#"{"expires_at":"2001-01-01T00:00:00Z"}"#,
        );
        assert_eq!(
            (refused.status, refused.code()),
            (400, "invalid_expiry".to_owned()),
            "{context}"
        );
        // Clearing the expiry brings the link back.
        let cleared = server.with_key("PATCH", &api, &key, r#"{"expires_at":null}"#);
        assert_eq!(cleared.status, 200, "{context}: {}", cleared.text());
        assert_eq!(cleared.json()["expires_at"], Value::Null, "{context}");
        let reply = connection.request("GET", &path, &accept);
        assert_eq!((reply.status, max_age(&reply)), (308, 86_400), "{context}");
    }
}

#[test]
fn script_and_data_urls_are_refused_end_to_end() {
    let dir = data_dir();
    let key = add_key(dir.path(), "writer", "write");
    let admin_key = add_key(dir.path(), "root", "admin");
    // ftp allowed on top of http(s): the allowlist is in use, and still refuses these.
    let server = Server::start(dir.path(), &["--url-schemes", "http,https,ftp"]);
    server.create(
        &key,
        r#"{"long_url":"ftp://example.com/file","custom_alias":"ftp-ok"}"#,
    );
    server.create(
        &key,
        r#"{"long_url":"https://example.com/safe","custom_alias":"safe"}"#,
    );
    let hostile = [
        "vbscript:msgbox(1)",
        "VBScript:MsgBox(\"x\")",
        "data:text/html,<script>alert(1)</script>",
        "DATA:text/html;base64,PHNjcmlwdD4=",
        "  data:text/plain,x",
        "javascript:alert(1)",
        "JaVaScRiPt:alert(1)",
        "\tjavascript:alert(1)",
    ];
    for url in hostile {
        let body = serde_json::json!({ "long_url": url }).to_string();
        let reply = server.post_json("/api/v1/shorten", &key, &body);
        assert_eq!(
            (reply.status, reply.code()),
            (400, "scheme_not_allowed".to_owned()),
            "create {url:?}: {}",
            reply.text()
        );
        let body = serde_json::json!({ "long_url": url, "custom_alias": "hostile" }).to_string();
        let reply = server.post_json("/api/v1/shorten", &key, &body);
        assert_eq!(
            reply.code(),
            "scheme_not_allowed",
            "create {url:?} with an alias"
        );
        let body = serde_json::json!({ "long_url": url }).to_string();
        let reply = server.with_key("PATCH", "/api/v1/urls/safe", &key, &body);
        assert_eq!(
            (reply.status, reply.code()),
            (400, "scheme_not_allowed".to_owned()),
            "patch to {url:?}"
        );
    }
    let items: Vec<serde_json::Value> = hostile
        .iter()
        .map(|url| serde_json::json!({ "long_url": url }))
        .collect();
    let batch = server.post_json(
        "/api/v1/shorten/batch",
        &key,
        &serde_json::json!({ "items": items }).to_string(),
    );
    assert_eq!(batch.status, 200, "{}", batch.text());
    assert_eq!(batch.json()["created"], 0);
    for result in batch.json()["results"].as_array().expect("results") {
        assert_eq!(
            (&result["status"], &result["code"]),
            (
                &serde_json::json!(400),
                &serde_json::json!("scheme_not_allowed")
            ),
            "{result}"
        );
    }
    // Nothing was stored or changed: the alias is free, the patched link still goes where it did.
    assert_eq!(links_live(&server, &admin_key), 2);
    let mut connection = KeepAlive::connect(server.public);
    assert_eq!(connection.request("GET", "/hostile", &[]).status, 404);
    let safe = connection.request("GET", "/safe", &[]);
    assert_eq!(
        (safe.status, safe.header("location")),
        (302, Some("https://example.com/safe"))
    );
    drop(server);

    // An operator cannot allow them either.
    for schemes in ["http,https,vbscript", "http,https,data", "https,JavaScript"] {
        let serve = common::serve_command(dir.path(), &["--url-schemes", schemes]);
        let refused = common::output_within_start_timeout(serve);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{schemes}: {stderr}");
        assert!(stderr.contains("url_schemes"), "{schemes}: {stderr}");
    }
}

/// `sample-links.tsv` of `dir` as a named pipe: the first start of a server on `dir` imports it
/// before it is ready, and the open blocks until someone writes to the pipe, so the server
/// stays not ready exactly as long as the test wants.
fn sample_links_pipe(dir: &std::path::Path) -> std::path::PathBuf {
    let pipe = dir.join("sample-links.tsv");
    let made = std::process::Command::new("mkfifo")
        .arg(&pipe)
        .status()
        .expect("run mkfifo");
    assert!(made.success());
    pipe
}

/// Writes `links` into the pipe (waiting at most `START_TIMEOUT` for the server to open it).
fn feed_pipe(pipe: std::path::PathBuf, links: &'static str) {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Write;
        let written = std::fs::OpenOptions::new()
            .write(true)
            .open(&pipe)
            .and_then(|mut writer| writer.write_all(links.as_bytes()));
        let _ = done_tx.send(written);
    });
    done_rx
        .recv_timeout(common::START_TIMEOUT)
        .expect("the server never opened the sample links")
        .expect("write the sample links");
}

#[test]
fn until_the_store_is_open_readyz_redirects_and_the_api_answer_503_not_ready() {
    for hyper_only in [false, true] {
        let dir = data_dir();
        let key = add_key(dir.path(), "writer", "write");
        let pipe = sample_links_pipe(dir.path());
        let flags: &[&str] = if hyper_only { &["--hyper-only"] } else { &[] };
        let server = Server::launch(dir.path(), flags);
        let context = format!("hyper only: {hyper_only}");
        let mut connection = KeepAlive::connect(server.public);
        let accept = [("Accept", "application/json")];
        // Twice, a moment apart: the window stays open until the pipe is fed.
        for round in 0..2 {
            let context = format!("{context}, round {round}");
            for addr in [server.public, server.admin] {
                assert_eq!(
                    request(addr, "GET", "/healthz", &[], b"").status,
                    200,
                    "{context}"
                );
                let ready = request(addr, "GET", "/readyz", &[], b"");
                assert_eq!(ready.status, 503, "{context}: {}", ready.text());
            }
            let admin_ready = request(server.admin, "GET", "/readyz", &[], b"");
            assert_eq!(admin_ready.code(), "not_ready", "{context}");
            for method in ["GET", "HEAD"] {
                let reply = connection.request(method, "/rust", &accept);
                assert_eq!(reply.status, 503, "{method} /rust, {context}");
                if method == "GET" {
                    assert_eq!(reply.code(), "not_ready", "{context}");
                }
            }
            let text = connection.request("GET", "/rust", &[]);
            assert_eq!(text.status, 503, "{context}");
            assert!(text
                .header("content-type")
                .unwrap_or("")
                .starts_with("text/plain"));
            // A code outside the charset is 404 without the store.
            assert_eq!(
                connection.request("GET", "/bad.code", &[]).status,
                404,
                "{context}"
            );
            let create = server.post_json(
                "/api/v1/shorten",
                &key,
                r#"{"long_url":"https://example.com/early"}"#,
            );
            assert_eq!(
                (create.status, create.code()),
                (503, "not_ready".to_owned()),
                "{context}"
            );
            let read = server.with_key("GET", "/api/v1/urls/rust", &key, "");
            assert_eq!(
                (read.status, read.code()),
                (503, "not_ready".to_owned()),
                "{context}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        feed_pipe(pipe, "rust\thttps://www.rust-lang.org/\n");
        server.wait_ready();
        let admin_ready = request(server.admin, "GET", "/readyz", &[], b"");
        assert_eq!(admin_ready.status, 200, "{context}");
        let reply = connection.request("GET", "/rust", &[]);
        assert_eq!(
            (reply.status, reply.header("location")),
            (302, Some("https://www.rust-lang.org/")),
            "{context}: the same connection once ready"
        );
        server.create(&key, r#"{"long_url":"https://example.com/now"}"#);
    }
}
