//! The OpenAPI document (`src/http/openapi.json`, served at `GET /api/v1/openapi.json`) against
//! the real server, both ways:
//! - every operation the document lists is routed on the listener its tags name (never the
//!   generic 404 `no_such_route` or 405 `method_not_allowed`), and every method it does not list
//!   for a path, and every path it does not list, gets exactly those generic answers;
//! - every status the server answers to a broad set of requests (each status that can be
//!   reached from outside: creates, reuse, conflicts, every kind of bad request, slow bodies,
//!   keys, deleted and expired links, batches, QR codes, stats, admin calls, health, redirects of
//!   every status on the lean path and through hyper, and a node whose store never opens) is
//!   listed for that path and method, with the media type of the body; an error body is
//!   `{"error","code"}` with a code the response lists; a JSON body has no field the document
//!   does not name.
//!
//! The routing code itself is also read: a path literal in a router that no documented path
//! starts or ends with is a route the document lacks. Never reached from here, documented from
//! the code: 409 busy, 421 (cluster shards), 500 of a snapshot that cannot be written,
//! qr_failed and stats_failed, and the 503s of a failing store or cluster.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{add_key, data_dir, parse_reply, raw, request, KeepAlive, Reply, Server};
use serde_json::Value;

/// The methods every documented path is tried with.
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listener {
    Public,
    Admin,
}

/// The OpenAPI document, as served.
struct Doc {
    root: Value,
}

impl Doc {
    fn fetch(public: SocketAddr) -> Doc {
        let reply = request(public, "GET", "/api/v1/openapi.json", &[], b"");
        assert_eq!(reply.status, 200, "{}", reply.text());
        let root = reply.json();
        assert!(
            root["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.")),
            "not an OpenAPI 3 document"
        );
        Doc { root }
    }

    /// What a local `$ref` points at.
    fn pointer(&self, reference: &str) -> &Value {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local references: {reference}"));
        self.root
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling reference {reference}"))
    }

    /// A response object, following a `$ref` to `#/components/responses/..`.
    fn resolve<'a>(&'a self, response: &'a Value) -> &'a Value {
        match response.get("$ref").and_then(Value::as_str) {
            Some(reference) => self.resolve(self.pointer(reference)),
            None => response,
        }
    }

    fn operation(&self, path: &str, method: &str) -> Option<&Value> {
        self.root["paths"]
            .get(path)?
            .get(method.to_ascii_lowercase())
    }

    /// Every (path, METHOD) the document lists.
    fn operations(&self) -> Vec<(String, String)> {
        let paths = self.root["paths"].as_object().expect("paths");
        let mut operations = Vec::new();
        for (path, item) in paths {
            for method in item.as_object().expect("path item").keys() {
                let upper = method.to_ascii_uppercase();
                if METHODS.contains(&upper.as_str()) {
                    operations.push((path.clone(), upper));
                } else {
                    assert!(
                        !["trace", "connect"].contains(&method.as_str()),
                        "{path}: the test does not try {method}"
                    );
                }
            }
        }
        operations
    }

    /// The listeners an operation is served on, by its tags: `admin` is the admin listener,
    /// `public` and `api` the public one.
    fn listeners(&self, path: &str, method: &str) -> Vec<Listener> {
        let tags: Vec<&str> = self
            .operation(path, method)
            .and_then(|operation| operation["tags"].as_array())
            .map(|tags| tags.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut listeners = Vec::new();
        if tags.iter().any(|tag| *tag == "public" || *tag == "api") {
            listeners.push(Listener::Public);
        }
        if tags.contains(&"admin") {
            listeners.push(Listener::Admin);
        }
        assert!(
            !listeners.is_empty(),
            "{method} {path}: no tag says which listener serves it"
        );
        listeners
    }

    /// The listeners a path is served on: those of any of its operations.
    fn path_listeners(&self, path: &str) -> Vec<Listener> {
        let mut listeners = Vec::new();
        for (other, method) in self.operations() {
            if other == path {
                for listener in self.listeners(path, &method) {
                    if !listeners.contains(&listener) {
                        listeners.push(listener);
                    }
                }
            }
        }
        listeners
    }

    fn generic(&self, name: &str) -> &Value {
        self.root["components"]["responses"]
            .get(name)
            .unwrap_or_else(|| panic!("#/components/responses/{name} is missing"))
    }
}

fn is_type(value: &Value, name: &str) -> bool {
    match name {
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        _ => false,
    }
}

/// Checks `value` against `schema` (the subset of JSON Schema the document uses), reading an
/// object whose schema names properties as closed: a field no applicable schema names is
/// missing from the document.
fn validate(doc: &Doc, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let mut named = BTreeSet::new();
    if evaluate(doc, schema, value, at, errors, &mut named) {
        if let Some(object) = value.as_object() {
            for key in object.keys().filter(|key| !named.contains(*key)) {
                errors.push(format!("{at}: field {key:?} is not in the document"));
            }
        }
    }
}

/// Applies `schema` to `value`, adding the property names it declares to `named`; says whether
/// it declares any.
fn evaluate(
    doc: &Doc,
    schema: &Value,
    value: &Value,
    at: &str,
    errors: &mut Vec<String>,
    named: &mut BTreeSet<String>,
) -> bool {
    let mut declares = false;
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        declares |= evaluate(doc, doc.pointer(reference), value, at, errors, named);
    }
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(name) => vec![name.as_str()],
            Value::Array(names) => names.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !types.iter().any(|name| is_type(value, name)) {
            errors.push(format!("{at}: {value} is not of type {types:?}"));
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            errors.push(format!(
                "{at}: {value} is not one of {}",
                Value::Array(allowed.clone())
            ));
        }
    }
    if let (Some(required), Some(object)) = (
        schema.get("required").and_then(Value::as_array),
        value.as_object(),
    ) {
        for name in required.iter().filter_map(Value::as_str) {
            if !object.contains_key(name) {
                errors.push(format!("{at}: required field {name:?} is missing"));
            }
        }
    }
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        declares = true;
        named.extend(properties.keys().cloned());
        if let Some(object) = value.as_object() {
            for (name, property) in properties {
                if let Some(field) = object.get(name) {
                    validate(doc, property, field, &format!("{at}.{name}"), errors);
                }
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (index, item) in array.iter().enumerate() {
            validate(doc, items, item, &format!("{at}[{index}]"), errors);
        }
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for branch in all {
            declares |= evaluate(doc, branch, value, at, errors, named);
        }
    }
    for keyword in ["oneOf", "anyOf"] {
        let Some(branches) = schema.get(keyword).and_then(Value::as_array) else {
            continue;
        };
        let mut matched = Vec::new();
        let mut refusals = Vec::new();
        for branch in branches {
            let (mut branch_errors, mut branch_named) = (Vec::new(), BTreeSet::new());
            let branch_declares = evaluate(
                doc,
                branch,
                value,
                at,
                &mut branch_errors,
                &mut branch_named,
            );
            if branch_errors.is_empty() {
                matched.push((branch_declares, branch_named));
            } else {
                refusals.push(branch_errors.join("; "));
            }
        }
        match matched.len() {
            0 => errors.push(format!(
                "{at}: matches none of {keyword}: {}",
                refusals.join(" | ")
            )),
            n if n > 1 && keyword == "oneOf" => {
                errors.push(format!("{at}: matches {n} branches of oneOf"));
            }
            _ => {
                let (branch_declares, branch_named) = matched.swap_remove(0);
                declares |= branch_declares;
                named.extend(branch_named);
            }
        }
    }
    declares
}

/// The media type of a reply, without parameters.
fn media_type(reply: &Reply) -> String {
    reply
        .header("content-type")
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn error_code(reply: &Reply) -> Option<String> {
    let body: Value = serde_json::from_slice(&reply.body).ok()?;
    body["code"].as_str().map(str::to_owned)
}

/// The checks, and what they found.
struct Audit {
    doc: Doc,
    failures: Vec<String>,
    /// (listener, path, METHOD, status, documented or generic) answered, for the summary.
    answered: BTreeSet<(String, String, String, u16, &'static str)>,
}

impl Audit {
    fn new(doc: Doc) -> Audit {
        Audit {
            doc,
            failures: Vec::new(),
            answered: BTreeSet::new(),
        }
    }

    /// Prints what was checked and fails the test if anything disagreed.
    fn finish(self) {
        eprintln!("answered and checked:");
        for (listener, path, method, status, by) in &self.answered {
            eprintln!("  {listener:<6} {method:<7} {path} {status} ({by})");
        }
        assert!(
            self.failures.is_empty(),
            "the document and the server disagree:\n{}",
            self.failures.join("\n")
        );
    }

    fn fail(&mut self, failure: String) {
        eprintln!("FAIL {failure}");
        self.failures.push(failure);
    }

    /// Checks a reply against `response`: the media type of a body is listed; a JSON body fits
    /// the schema; an error body is `{"error","code"}` with a code the response lists.
    fn against_response(&mut self, response: &Value, method: &str, reply: &Reply, label: &str) {
        if method == "HEAD" || reply.body.is_empty() {
            return;
        }
        let media = media_type(reply);
        let Some(content) = response["content"].get(&media) else {
            self.fail(format!(
                "{label}: a body of type {media:?} is not documented ({})",
                reply.text().trim_end()
            ));
            return;
        };
        if media != "application/json" {
            return;
        }
        let Ok(body) = serde_json::from_slice::<Value>(&reply.body) else {
            self.fail(format!("{label}: the body is not JSON: {}", reply.text()));
            return;
        };
        if reply.status >= 400 {
            if !(body["error"].is_string() && body["code"].is_string()) {
                self.fail(format!(
                    "{label}: not an {{\"error\",\"code\"}} body: {body}"
                ));
            }
            if !content["schema"]["properties"]["code"]["enum"].is_array() {
                self.fail(format!(
                    "{label}: the response lists no error codes (properties.code.enum)"
                ));
            }
        }
        let mut errors = Vec::new();
        validate(&self.doc, &content["schema"], &body, "body", &mut errors);
        for error in errors {
            self.fail(format!("{label}: {error} (body {body})"));
        }
    }

    /// Checks the reply to a documented operation: the status is listed for it, and the body
    /// fits that response.
    fn documented(
        &mut self,
        listener: Listener,
        (path, method): (&str, &str),
        reply: &Reply,
        what: &str,
    ) {
        let label = format!(
            "{what}: {method} {path} on the {listener:?} listener answered {}",
            reply.status
        );
        let Some(operation) = self.doc.operation(path, method).cloned() else {
            self.fail(format!("{label}: {method} {path} is not in the document"));
            return;
        };
        if !self.doc.listeners(path, method).contains(&listener) {
            self.fail(format!("{label}: its tags do not name this listener"));
        }
        let Some(response) = operation["responses"].get(reply.status.to_string()) else {
            self.fail(format!(
                "{label}: status {} is not documented for it ({})",
                reply.status,
                reply.text().trim_end()
            ));
            return;
        };
        let response = self.doc.resolve(response).clone();
        self.answered.insert((
            format!("{listener:?}"),
            path.to_owned(),
            method.to_owned(),
            reply.status,
            "listed",
        ));
        self.against_response(&response, method, reply, &label);
    }

    /// Checks the reply to a method or path the document does not list: the generic 405
    /// `method_not_allowed` or 404 `no_such_route`.
    fn unlisted(&mut self, listener: Listener, (path, method): (&str, &str), reply: &Reply) {
        let label = format!(
            "unlisted: {method} {path} on the {listener:?} listener answered {}",
            reply.status
        );
        let generic = match reply.status {
            405 => "MethodNotAllowed",
            404 if method == "HEAD" || error_code(reply).as_deref() == Some("no_such_route") => {
                "NoSuchRoute"
            }
            _ => {
                self.fail(format!(
                    "{label}: the document does not list it, so it must be 405 method_not_allowed or 404 no_such_route ({})",
                    reply.text().trim_end()
                ));
                return;
            }
        };
        let response = self.doc.resolve(self.doc.generic(generic)).clone();
        self.answered.insert((
            format!("{listener:?}"),
            path.to_owned(),
            method.to_owned(),
            reply.status,
            generic,
        ));
        self.against_response(&response, method, reply, &label);
    }
}

/// A running server with its keys.
struct Node {
    dir: tempfile::TempDir,
    server: Server,
    key: String,
    admin_key: String,
}

impl Node {
    fn start(flags: &[&str]) -> Node {
        let dir = data_dir();
        let key = add_key(dir.path(), "writer", "write");
        let admin_key = add_key(dir.path(), "root", "admin");
        let server = Server::start(dir.path(), flags);
        Node {
            dir,
            server,
            key,
            admin_key,
        }
    }

    fn addr(&self, listener: Listener) -> SocketAddr {
        match listener {
            Listener::Public => self.server.public,
            Listener::Admin => self.server.admin,
        }
    }

    /// Creates a link with the write key and returns its code.
    fn create(&self, body: &str) -> String {
        self.server.create(&self.key, body)
    }
}

/// `path` with `{code}` filled in.
fn fill(path: &str, code: &str) -> String {
    path.replace("{code}", code)
}

/// A request to a documented operation (`path` a template of the document, filled with `code`),
/// checked against the document.
#[allow(clippy::too_many_arguments)]
fn call(
    audit: &mut Audit,
    node: &Node,
    listener: Listener,
    (method, path, code): (&str, &str, &str),
    headers: &[(&str, &str)],
    body: &[u8],
    what: &str,
) -> Reply {
    let reply = request(
        node.addr(listener),
        method,
        &fill(path, code),
        headers,
        body,
    );
    let template = path.split('?').next().unwrap_or(path);
    audit.documented(listener, (template, method), &reply, what);
    reply
}

const JSON: (&str, &str) = ("Content-Type", "application/json");
const ACCEPT_JSON: (&str, &str) = ("Accept", "application/json");

fn expect(reply: &Reply, status: u16, code: Option<&str>, what: &str) {
    assert_eq!(reply.status, status, "{what}: {}", reply.text());
    if let Some(code) = code {
        assert_eq!(
            error_code(reply).as_deref(),
            Some(code),
            "{what}: {}",
            reply.text()
        );
    }
}

/// Sends (method, path, headers) one way or another and returns the reply.
type Fetch<'a> = dyn FnMut(&str, &str, &[(&str, &str)]) -> Reply + 'a;

/// Asks for `/{code}` through `fetch` and checks the answer against the document.
fn ask(
    audit: &mut Audit,
    fetch: &mut Fetch<'_>,
    (method, path): (&str, &str),
    accept_json: bool,
    what: &str,
) -> Reply {
    let headers: &[(&str, &str)] = if accept_json { &[ACCEPT_JSON] } else { &[] };
    let reply = fetch(method, path, headers);
    audit.documented(Listener::Public, ("/{code}", method), &reply, what);
    reply
}

/// Redirects of every status and every error of `/{code}`, GET and HEAD, asked through `fetch`
/// (a keep-alive connection to reach the lean path, or one connection per request).
fn redirects(audit: &mut Audit, node: &Node, fetch: &mut Fetch<'_>) {
    let key = [("X-API-Key", node.key.as_str()), JSON];
    let urls = "/api/v1/urls/{code}";
    let expiring = node.create(r#"{"long_url":"https://example.com/soon","expires_in":1}"#);
    let created_at = Instant::now();
    for status in [301u16, 302, 307, 308] {
        let code = node.create(&format!(
            r#"{{"long_url":"https://example.com/{status}","redirect_status":{status}}}"#
        ));
        for method in ["HEAD", "GET"] {
            let reply = ask(
                audit,
                fetch,
                (method, &format!("/{code}")),
                false,
                "redirect",
            );
            expect(&reply, status, None, "redirect");
            assert!(reply.header("location").is_some(), "{reply:?}");
        }
    }
    for (path, what) in [
        ("/nothere1", "unknown code"),
        ("/a.b", "malformed code"),
        ("/a/b", "two segments"),
        ("/", "no code"),
        ("/metrics", "an admin path on the public listener is a code"),
    ] {
        for (method, accept_json) in [("GET", false), ("GET", true), ("HEAD", false)] {
            let reply = ask(audit, fetch, (method, path), accept_json, what);
            expect(&reply, 404, accept_json.then_some("not_found"), what);
        }
    }
    let capped = node.create(r#"{"long_url":"https://example.com/cap","max_clicks":1}"#);
    let path = format!("/{capped}");
    let reply = ask(audit, fetch, ("GET", &path), false, "first click");
    expect(&reply, 302, None, "first click");
    for (method, accept_json) in [("GET", true), ("GET", false), ("HEAD", false)] {
        let reply = ask(audit, fetch, (method, &path), accept_json, "capped");
        let machine = accept_json.then_some("click_cap_reached");
        expect(&reply, 410, machine, "cap reached");
    }
    let disabled = node.create(r#"{"long_url":"https://example.com/off"}"#);
    let body = br#"{"status":"disabled"}"#;
    let reply = call(
        audit,
        node,
        Listener::Public,
        ("PATCH", urls, &disabled),
        &key,
        body,
        "disable",
    );
    expect(&reply, 200, None, "disable");
    let deleted = node.create(r#"{"long_url":"https://example.com/del"}"#);
    let reply = call(
        audit,
        node,
        Listener::Public,
        ("DELETE", urls, &deleted),
        &key,
        b"",
        "delete",
    );
    expect(&reply, 204, None, "delete");
    for (code, machine) in [(&disabled, "disabled"), (&deleted, "deleted")] {
        for (method, accept_json) in [("GET", true), ("GET", false), ("HEAD", false)] {
            let reply = ask(
                audit,
                fetch,
                (method, &format!("/{code}")),
                accept_json,
                machine,
            );
            expect(&reply, 410, accept_json.then_some(machine), machine);
        }
    }
    let forwarding = node.create(r#"{"long_url":"https://example.com/fwd","forward_query":true}"#);
    let reply = ask(
        audit,
        fetch,
        ("GET", &format!("/{forwarding}?a=1")),
        false,
        "forward",
    );
    expect(&reply, 302, None, "forward");
    assert_eq!(
        reply.header("location"),
        Some("https://example.com/fwd?a=1")
    );
    // Expiry: wait for the clock to pass it (the lean path reads a coarse clock).
    let deadline = created_at + Duration::from_secs(6);
    let path = format!("/{expiring}");
    loop {
        let reply = ask(audit, fetch, ("GET", &path), true, "expiring");
        if reply.status == 410 {
            expect(&reply, 410, Some("expired"), "expired");
            let reply = ask(audit, fetch, ("HEAD", &path), false, "expired");
            expect(&reply, 410, None, "expired HEAD");
            break;
        }
        assert!(Instant::now() < deadline, "the link never expired");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The methods /{code} does not answer (last: on a keep-alive connection they hand it to
    // hyper for good).
    for method in ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        for accept_json in [false, true] {
            let headers: &[(&str, &str)] = if accept_json { &[ACCEPT_JSON] } else { &[] };
            let reply = fetch(method, &format!("/{forwarding}"), headers);
            audit.unlisted(Listener::Public, ("/{code}", method), &reply);
            let machine = accept_json.then_some("method_not_allowed");
            expect(&reply, 405, machine, method);
            assert_eq!(reply.header("allow"), Some("GET, HEAD"), "{method}");
        }
    }
}

/// Creates: 201, 400 of every kind, 401, 409 with suggestions, 413, 415; batches.
fn creates(audit: &mut Audit, node: &Node) {
    let key = [("X-API-Key", node.key.as_str()), JSON];
    let shorten = ("POST", "/api/v1/shorten", "");
    let batch = ("POST", "/api/v1/shorten/batch", "");
    let reply = call(
        audit,
        node,
        Listener::Public,
        shorten,
        &key,
        br#"{"long_url":"https://example.com/taken","custom_alias":"taken-alias"}"#,
        "create",
    );
    expect(&reply, 201, None, "create");
    let reply = call(
        audit,
        node,
        Listener::Public,
        shorten,
        &key,
        br#"{"long_url":"https://example.com/other","custom_alias":"taken-alias"}"#,
        "alias taken",
    );
    expect(&reply, 409, Some("alias_taken"), "alias taken");
    assert!(
        reply.json()["suggested"]
            .as_array()
            .is_some_and(|suggested| !suggested.is_empty()),
        "409 with suggestions: {}",
        reply.text()
    );
    let long = format!(
        r#"{{"long_url":"https://example.com/{}"}}"#,
        "a".repeat(900)
    );
    let bad_bodies: [(&[u8], &str); 14] = [
        (br#"{"long_url":"not a url"}"#, "invalid_url"),
        (
            br#"{"long_url":"javascript:alert(1)"}"#,
            "scheme_not_allowed",
        ),
        (
            br#"{"long_url":"https://example.com/","custom_alias":"a!"}"#,
            "invalid_alias",
        ),
        (
            br#"{"long_url":"https://example.com/","custom_alias":"admin"}"#,
            "reserved_alias",
        ),
        (
            br#"{"long_url":"https://example.com/","expires_in":0}"#,
            "invalid_expiry",
        ),
        (
            br#"{"long_url":"https://example.com/","expires_at":"2001-01-01T00:00:00Z"}"#,
            "invalid_expiry",
        ),
        (
            br#"{"long_url":"https://example.com/","max_clicks":0}"#,
            "invalid_max_clicks",
        ),
        (
            br#"{"long_url":"https://example.com/","redirect_status":303}"#,
            "invalid_redirect_status",
        ),
        (
            br#"{"long_url":"https://example.com/","nope":1}"#,
            "invalid_request",
        ),
        (br#"{"long_url":"#, "invalid_json"),
        (b"\xff\xfe", "invalid_utf8"),
        (long.as_bytes(), "url_too_long"),
        (br#"{"long_url":"http://10.1.2.3/"}"#, "private_address"),
        (br#"{"long_url":"http://127.0.0.1/x"}"#, "own_host"),
    ];
    for (body, code) in bad_bodies {
        let reply = call(audit, node, Listener::Public, shorten, &key, body, code);
        expect(&reply, 400, Some(code), code);
    }
    let big = format!(
        r#"{{"long_url":"https://example.com/{}"}}"#,
        "b".repeat(2000)
    );
    let reply = call(
        audit,
        node,
        Listener::Public,
        shorten,
        &key,
        big.as_bytes(),
        "too large",
    );
    expect(&reply, 413, Some("body_too_large"), "413");
    let text = [
        ("X-API-Key", node.key.as_str()),
        ("Content-Type", "text/plain"),
    ];
    let reply = call(
        audit,
        node,
        Listener::Public,
        shorten,
        &text,
        br#"{"long_url":"https://example.com/"}"#,
        "not JSON",
    );
    expect(&reply, 415, Some("unsupported_media_type"), "415");
    let body = br#"{"long_url":"https://example.com/nokey"}"#;
    let reply = call(
        audit,
        node,
        Listener::Public,
        shorten,
        &[JSON],
        body,
        "no key",
    );
    expect(&reply, 401, Some("missing_key"), "no key");
    let wrong = [("X-API-Key", "kurz_not_a_key"), JSON];
    let reply = call(
        audit,
        node,
        Listener::Public,
        shorten,
        &wrong,
        body,
        "bad key",
    );
    expect(&reply, 401, Some("invalid_key"), "bad key");

    let items = br#"{"items":[
        {"long_url":"https://example.com/b1"},
        {"long_url":"not a url"},
        {"long_url":"https://example.com/b3","custom_alias":"taken-alias"},
        {"long_url":"https://example.com/b4","bogus":true},
        17
    ]}"#;
    let reply = call(audit, node, Listener::Public, batch, &key, items, "batch");
    expect(&reply, 200, None, "batch");
    let statuses: Vec<u64> = reply.json()["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|item| item["status"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(statuses, [201, 400, 409, 400, 400], "{}", reply.text());
    let many = format!(r#"{{"items":[{}{{}}]}}"#, "{},".repeat(1000));
    let reply = call(
        audit,
        node,
        Listener::Public,
        batch,
        &key,
        many.as_bytes(),
        "batch too large",
    );
    expect(&reply, 400, Some("batch_too_large"), "1001 items");
    let reply = call(
        audit,
        node,
        Listener::Public,
        batch,
        &key,
        b"[",
        "bad batch",
    );
    expect(&reply, 400, Some("invalid_json"), "bad batch");
    let huge = format!(r#"{{"items":[{}]}}"#, "{},".repeat(3000));
    let reply = call(
        audit,
        node,
        Listener::Public,
        batch,
        &key,
        huge.as_bytes(),
        "batch body too large",
    );
    expect(&reply, 413, Some("body_too_large"), "batch 413");
    let reply = call(
        audit,
        node,
        Listener::Public,
        batch,
        &text,
        br#"{"items":[]}"#,
        "batch not JSON",
    );
    expect(&reply, 415, Some("unsupported_media_type"), "batch 415");
    let reply = call(
        audit,
        node,
        Listener::Public,
        batch,
        &[JSON],
        br#"{"items":[]}"#,
        "batch no key",
    );
    expect(&reply, 401, Some("missing_key"), "batch no key");
}

/// Bodies that stop arriving: 408 once --timeout-body-read-ms has passed.
fn slow_bodies(audit: &mut Audit, node: &Node) {
    let code = node.create(r#"{"long_url":"https://example.com/slow"}"#);
    for (method, path) in [
        ("POST", "/api/v1/shorten"),
        ("POST", "/api/v1/shorten/batch"),
        ("PATCH", "/api/v1/urls/{code}"),
    ] {
        let head = format!(
            "{method} {} HTTP/1.1\r\nHost: kurz.test\r\nX-API-Key: {}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"long_url\":",
            fill(path, &code),
            node.key
        );
        let answer = raw(node.server.public, head.as_bytes()).expect("send a partial body");
        let reply = parse_reply(&answer);
        audit.documented(Listener::Public, (path, method), &reply, "slow body");
        expect(&reply, 408, Some("body_timeout"), path);
    }
}

/// Reads, changes, deletes, QR codes and stats, with their errors.
fn link_calls(audit: &mut Audit, node: &Node) {
    let key = [("X-API-Key", node.key.as_str()), JSON];
    let no_key = [JSON];
    let code = node.create(r#"{"long_url":"https://example.com/link"}"#);
    let gone = node.create(r#"{"long_url":"https://example.com/gone"}"#);
    let urls = "/api/v1/urls/{code}";
    let qr = "/api/v1/urls/{code}/qr";
    let stats = "/api/v1/stats/{code}";
    let public = Listener::Public;

    let reply = call(
        audit,
        node,
        public,
        ("DELETE", urls, &gone),
        &key,
        b"",
        "delete",
    );
    expect(&reply, 204, None, "delete");
    let reply = call(
        audit,
        node,
        public,
        ("DELETE", urls, &gone),
        &key,
        b"",
        "again",
    );
    expect(&reply, 204, None, "delete twice");
    let reply = call(
        audit,
        node,
        public,
        ("DELETE", urls, "nothere1"),
        &key,
        b"",
        "404",
    );
    expect(&reply, 404, Some("not_found"), "delete unknown");
    let reply = call(
        audit,
        node,
        public,
        ("DELETE", urls, &code),
        &no_key,
        b"",
        "401",
    );
    expect(&reply, 401, Some("missing_key"), "delete without key");

    for (path, query) in [(urls, ""), (qr, ""), (qr, "?format=png"), (stats, "")] {
        let filled = format!("{path}{query}");
        let what = format!("read {filled}");
        let reply = call(
            audit,
            node,
            public,
            ("GET", &filled, &code),
            &key,
            b"",
            &what,
        );
        expect(&reply, 200, None, &what);
        let reply = call(
            audit,
            node,
            public,
            ("GET", &filled, &gone),
            &key,
            b"",
            &what,
        );
        expect(&reply, 410, Some("deleted"), &what);
        let reply = call(
            audit,
            node,
            public,
            ("GET", &filled, "nothere1"),
            &key,
            b"",
            &what,
        );
        expect(&reply, 404, Some("not_found"), &what);
        let reply = call(
            audit,
            node,
            public,
            ("GET", &filled, "a.b"),
            &key,
            b"",
            &what,
        );
        expect(&reply, 404, Some("not_found"), &what);
        let reply = call(
            audit,
            node,
            public,
            ("GET", &filled, &code),
            &no_key,
            b"",
            &what,
        );
        expect(&reply, 401, Some("missing_key"), &what);
    }
    for (path, query) in [(qr, "?format=gif"), (stats, "?granularity=week")] {
        let filled = format!("{path}{query}");
        let reply = call(
            audit,
            node,
            public,
            ("GET", &filled, &code),
            &key,
            b"",
            "bad query",
        );
        expect(&reply, 400, Some("invalid_query"), "bad query");
    }
    let reply = call(audit, node, public, ("GET", qr, &code), &key, b"", "svg");
    assert_eq!(media_type(&reply), "image/svg+xml");

    let patches: [(&str, &[u8], u16, Option<&str>); 8] = [
        (
            &code,
            br#"{"long_url":"https://example.com/new","redirect_status":301}"#,
            200,
            None,
        ),
        (
            &code,
            br#"{"redirect_status":null,"status":"active"}"#,
            200,
            None,
        ),
        (
            &code,
            br#"{"status":"deleted"}"#,
            400,
            Some("invalid_status"),
        ),
        (
            &code,
            br#"{"long_url":"ftp://example.com/"}"#,
            400,
            Some("scheme_not_allowed"),
        ),
        (
            &code,
            br#"{"max_clicks":"many"}"#,
            400,
            Some("invalid_request"),
        ),
        (&code, b"{", 400, Some("invalid_json")),
        (
            "nothere1",
            br#"{"status":"active"}"#,
            404,
            Some("not_found"),
        ),
        (&gone, br#"{"status":"active"}"#, 410, Some("deleted")),
    ];
    for (target, body, status, machine) in patches {
        let reply = call(
            audit,
            node,
            public,
            ("PATCH", urls, target),
            &key,
            body,
            "patch",
        );
        expect(&reply, status, machine, "patch");
    }
    let big = format!(
        r#"{{"long_url":"https://example.com/{}"}}"#,
        "c".repeat(2000)
    );
    let reply = call(
        audit,
        node,
        public,
        ("PATCH", urls, &code),
        &key,
        big.as_bytes(),
        "patch 413",
    );
    expect(&reply, 413, Some("body_too_large"), "patch 413");
    let text = [
        ("X-API-Key", node.key.as_str()),
        ("Content-Type", "text/plain"),
    ];
    let reply = call(
        audit,
        node,
        public,
        ("PATCH", urls, &code),
        &text,
        b"{}",
        "415",
    );
    expect(&reply, 415, Some("unsupported_media_type"), "patch 415");
    let reply = call(
        audit,
        node,
        public,
        ("PATCH", urls, &code),
        &no_key,
        b"{}",
        "401",
    );
    expect(&reply, 401, Some("missing_key"), "patch 401");
}

/// The admin listener: snapshot, reload, info, metrics, and their key checks; health on both.
fn admin_calls(audit: &mut Audit, node: &Node) {
    let admin = [("X-API-Key", node.admin_key.as_str())];
    let write = [("X-API-Key", node.key.as_str())];
    let wrong = [("Authorization", "Bearer kurz_not_a_key")];
    for (method, path) in [
        ("POST", "/admin/snapshot"),
        ("POST", "/admin/reload"),
        ("GET", "/admin/info"),
    ] {
        let reply = call(
            audit,
            node,
            Listener::Admin,
            (method, path, ""),
            &admin,
            b"",
            path,
        );
        expect(&reply, 200, None, path);
        let reply = call(
            audit,
            node,
            Listener::Admin,
            (method, path, ""),
            &write,
            b"",
            path,
        );
        expect(&reply, 403, Some("insufficient_scope"), path);
        let reply = call(
            audit,
            node,
            Listener::Admin,
            (method, path, ""),
            &wrong,
            b"",
            path,
        );
        expect(&reply, 401, Some("invalid_key"), path);
        let reply = call(
            audit,
            node,
            Listener::Admin,
            (method, path, ""),
            &[],
            b"",
            path,
        );
        expect(&reply, 401, Some("missing_key"), path);
    }
    let reply = call(
        audit,
        node,
        Listener::Admin,
        ("GET", "/metrics", ""),
        &[],
        b"",
        "metrics",
    );
    expect(&reply, 200, None, "metrics");
    assert!(reply.text().contains("kurz_http_requests_total"));
    for listener in [Listener::Public, Listener::Admin] {
        for (method, path) in [
            ("GET", "/healthz"),
            ("HEAD", "/healthz"),
            ("GET", "/readyz"),
            ("HEAD", "/readyz"),
        ] {
            let reply = call(audit, node, listener, (method, path, ""), &[], b"", path);
            expect(&reply, 200, None, path);
        }
    }
    // Snapshots and reloads at once: some may find another one running (409).
    let addr = node.server.admin;
    let admin_key = node.admin_key.clone();
    let racers: Vec<_> = (0..4)
        .map(|racer| {
            let admin_key = admin_key.clone();
            std::thread::spawn(move || {
                let path = if racer % 2 == 0 {
                    "/admin/snapshot"
                } else {
                    "/admin/reload"
                };
                (0..3)
                    .map(|_| {
                        let reply = request(addr, "POST", path, &[("X-API-Key", &admin_key)], b"");
                        (path, reply)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for racer in racers {
        for (path, reply) in racer.join().expect("racer") {
            audit.documented(Listener::Admin, (path, "POST"), &reply, "racing");
            assert!(
                reply.status == 200
                    || error_code(&reply).as_deref() == Some("snapshot_in_progress"),
                "{path}: {}",
                reply.text()
            );
        }
    }
    // An operator puts a file in place that is not a snapshot: the reload refuses it.
    let snapshot = node.dir.path().join("snapshot.kurz");
    let placed = node.dir.path().join("snapshot.kurz.placing");
    std::fs::write(&placed, b"this is not a snapshot").expect("write");
    std::fs::rename(&placed, &snapshot).expect("rename");
    let reply = call(
        audit,
        node,
        Listener::Admin,
        ("POST", "/admin/reload", ""),
        &admin,
        b"",
        "refused file",
    );
    expect(&reply, 500, Some("snapshot_failed"), "refused file");
    // The next snapshot writes a good file again.
    let reply = call(
        audit,
        node,
        Listener::Admin,
        ("POST", "/admin/snapshot", ""),
        &admin,
        b"",
        "snapshot after",
    );
    expect(&reply, 200, None, "snapshot after");
}

/// Every documented operation is routed on its listeners (never the generic 404/405), every
/// method a path does not list is refused with 405 (or 404 no_such_route), and paths the
/// document does not list are 404 no_such_route.
fn routing(audit: &mut Audit, node: &Node) {
    let admin = ("X-API-Key", node.admin_key.as_str());
    let code = node.create(r#"{"long_url":"https://example.com/probe"}"#);
    for (path, method) in audit.doc.operations() {
        for listener in audit.doc.listeners(&path, &method) {
            // A link of its own for each (the DELETE deletes it).
            let code = node.create(r#"{"long_url":"https://example.com/routed"}"#);
            let body: &[u8] = match (method.as_str(), path.as_str()) {
                ("POST", "/api/v1/shorten") => br#"{"long_url":"https://example.com/r"}"#,
                ("POST", "/api/v1/shorten/batch") => br#"{"items":[]}"#,
                ("POST" | "PUT" | "PATCH", _) => b"{}",
                _ => b"",
            };
            let headers = [admin, JSON];
            let reply = call(
                audit,
                node,
                listener,
                (&method, &path, &code),
                &headers,
                body,
                "routed",
            );
            if reply.status == 405 || error_code(&reply).as_deref() == Some("no_such_route") {
                audit.fail(format!(
                    "routed: {method} {path} on the {listener:?} listener is documented but not routed: {} {}",
                    reply.status,
                    reply.text().trim_end()
                ));
            }
        }
    }
    let paths: BTreeSet<String> = audit
        .doc
        .operations()
        .into_iter()
        .map(|(path, _)| path)
        .collect();
    for path in paths {
        let listed: Vec<String> = audit
            .doc
            .operations()
            .into_iter()
            .filter(|(other, _)| *other == path)
            .map(|(_, method)| method)
            .collect();
        for listener in [Listener::Public, Listener::Admin] {
            let serves = audit.doc.path_listeners(&path).contains(&listener);
            for method in METHODS {
                if serves && listed.iter().any(|listed| listed == method) {
                    continue;
                }
                let body: &[u8] = if ["POST", "PUT", "PATCH"].contains(&method) {
                    b"{}"
                } else {
                    b""
                };
                let filled = fill(&path, &code);
                let reply = request(node.addr(listener), method, &filled, &[admin, JSON], body);
                if !serves {
                    // Another listener's path: never served here. On the public listener a
                    // path outside /api/ is a /{code}.
                    match listener {
                        Listener::Public if !path.starts_with("/api/") => {
                            if method == "GET" || method == "HEAD" {
                                audit.documented(listener, ("/{code}", method), &reply, "foreign");
                                if reply.status != 404 {
                                    audit.fail(format!(
                                        "{method} {filled} on the public listener: {} (an admin path must not be served there)",
                                        reply.status
                                    ));
                                }
                            } else {
                                audit.unlisted(listener, ("/{code}", method), &reply);
                            }
                        }
                        _ => {
                            let label = format!("{method} {path} on the {listener:?} listener");
                            if reply.status != 404 {
                                audit.fail(format!(
                                    "{label}: {} (a path of the other listener must be 404 no_such_route here)",
                                    reply.status
                                ));
                            }
                            audit.unlisted(listener, (&path, method), &reply);
                        }
                    }
                    continue;
                }
                audit.unlisted(listener, (&path, method), &reply);
            }
        }
    }
    for (listener, method, path) in [
        (Listener::Public, "GET", "/api/"),
        (Listener::Public, "GET", "/api/v1"),
        (Listener::Public, "GET", "/api/v1/"),
        (Listener::Public, "GET", "/api/v1/nothing"),
        (Listener::Public, "POST", "/api/v2/shorten"),
        (Listener::Public, "GET", "/api/v1/urls"),
        (Listener::Public, "GET", "/api/v1/shorten/batch/x"),
        (Listener::Public, "GET", "/api/v1/openapi.yaml"),
        (Listener::Admin, "GET", "/"),
        (Listener::Admin, "GET", "/admin"),
        (Listener::Admin, "GET", "/admin/"),
        (Listener::Admin, "POST", "/admin/nothing"),
        (Listener::Admin, "GET", "/abc123"),
        (Listener::Admin, "GET", "/api/v1/openapi.json"),
        (Listener::Admin, "HEAD", "/nothing"),
    ] {
        let reply = request(node.addr(listener), method, path, &[admin], b"");
        if reply.status != 404 {
            audit.fail(format!(
                "{method} {path} on the {listener:?} listener: {} (a path the document does not list must be 404 no_such_route)",
                reply.status
            ));
        }
        audit.unlisted(listener, (path, method), &reply);
    }
}

#[test]
fn the_document_matches_the_server_both_ways() {
    // The main server: keys only, the lean redirect path, small bodies so 413 is cheap.
    let main = Node::start(&[
        "--body-bytes-max",
        "1024",
        "--batch-body-bytes-max",
        "8192",
        "--reject-private-addresses",
        "--url-bytes-max",
        "512",
        "--rate-limit-burst",
        "100000",
        "--timeout-body-read-ms",
        "300",
    ]);
    let mut audit = Audit::new(Doc::fetch(main.server.public));
    let openapi = call(
        &mut audit,
        &main,
        Listener::Public,
        ("GET", "/api/v1/openapi.json", ""),
        &[],
        b"",
        "openapi",
    );
    expect(&openapi, 200, None, "openapi");

    // Redirects on the lean path (keep-alive connections are its), including a forwarded query
    // with bytes outside visible ASCII (percent-encoded into the Location).
    let mut lean = KeepAlive::connect(main.server.public);
    redirects(&mut audit, &main, &mut |method, path, headers| {
        lean.request(method, path, headers)
    });
    let forwarding = main.create(r#"{"long_url":"https://example.com/q","forward_query":true}"#);
    let mut lean = KeepAlive::connect(main.server.public);
    for method in ["GET", "HEAD"] {
        let reply = lean.request(method, &format!("/{forwarding}?q=\u{e9}"), &[ACCEPT_JSON]);
        audit.documented(
            Listener::Public,
            ("/{code}", method),
            &reply,
            "forwarded query",
        );
        assert_eq!(reply.status, 302, "{}", reply.text());
        assert_eq!(
            reply.header("location"),
            Some("https://example.com/q?q=%C3%A9")
        );
    }

    creates(&mut audit, &main);
    slow_bodies(&mut audit, &main);
    link_calls(&mut audit, &main);
    admin_calls(&mut audit, &main);
    routing(&mut audit, &main);

    // A second server: anonymous creation, hash codes (reuse answers 200), a small rate-limit
    // burst, and hyper answering every redirect.
    let open = Node::start(&[
        "--allow-anonymous-create",
        "--code-strategy",
        "hash",
        "--hyper-only",
        "--rate-limit-burst",
        "40",
        "--rate-limit-per-s",
        "0.01",
    ]);
    redirects(&mut audit, &open, &mut |method, path, headers| {
        request(open.server.public, method, path, headers, b"")
    });
    let shorten = ("POST", "/api/v1/shorten", "");
    let body = br#"{"long_url":"https://example.com/reused","reuse":true}"#;
    let first = call(
        &mut audit,
        &open,
        Listener::Public,
        shorten,
        &[JSON],
        body,
        "anonymous",
    );
    expect(&first, 201, None, "anonymous create");
    let again = call(
        &mut audit,
        &open,
        Listener::Public,
        shorten,
        &[JSON],
        body,
        "reuse",
    );
    expect(&again, 200, None, "reuse");
    assert_eq!(first.json()["short_code"], again.json()["short_code"]);
    let items = br#"{"items":[
        {"long_url":"https://example.com/reused","reuse":true},
        {"long_url":"https://example.com/fresh"}
    ]}"#;
    let reply = call(
        &mut audit,
        &open,
        Listener::Public,
        ("POST", "/api/v1/shorten/batch", ""),
        &[JSON],
        items,
        "batch reuse",
    );
    expect(&reply, 200, None, "batch reuse");
    let statuses: Vec<u64> = reply.json()["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|item| item["status"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(statuses, [200, 201], "{}", reply.text());
    let wrong = [("X-API-Key", "kurz_not_a_key"), JSON];
    let reply = call(
        &mut audit,
        &open,
        Listener::Public,
        shorten,
        &wrong,
        body,
        "typo",
    );
    expect(
        &reply,
        401,
        Some("invalid_key"),
        "an unknown key even when anonymous is open",
    );
    let reply = call(
        &mut audit,
        &open,
        Listener::Public,
        (
            "GET",
            "/api/v1/urls/{code}",
            first.json()["short_code"].as_str().unwrap_or(""),
        ),
        &[],
        b"",
        "anonymous read",
    );
    expect(&reply, 401, Some("missing_key"), "anonymous read");
    let mut limited = None;
    for n in 0..60 {
        let body = format!(r#"{{"long_url":"https://example.com/flood/{n}"}}"#);
        let reply = call(
            &mut audit,
            &open,
            Listener::Public,
            shorten,
            &[JSON],
            body.as_bytes(),
            "flood",
        );
        if reply.status == 429 {
            limited = Some(reply);
            break;
        }
    }
    let limited = limited.expect("the rate limit never answered 429");
    expect(&limited, 429, Some("rate_limited"), "429");
    assert!(limited.header("retry-after").is_some());
    let reply = call(
        &mut audit,
        &open,
        Listener::Public,
        ("POST", "/api/v1/shorten/batch", ""),
        &[JSON],
        br#"{"items":[{"long_url":"https://example.com/late"}]}"#,
        "batch flood",
    );
    expect(&reply, 429, Some("rate_limited"), "batch 429");

    audit.finish();
}

/// A node that is not ready and stays so: a cluster node whose NATS cannot be reached keeps
/// joining, its store never opens. Killed when dropped.
fn joining(dir: &Path) -> Server {
    // A port nothing listens on.
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port");
    Server::launch(dir, &["--nats", &format!("nats://{unused}")])
}

/// (listener, method, path, headers, body, status, machine code) of a request and its answer.
type Case<'a> = (
    Listener,
    &'a str,
    &'a str,
    &'a [(&'a str, &'a str)],
    &'a [u8],
    u16,
    Option<&'a str>,
);

#[test]
fn a_node_that_is_not_ready_answers_as_documented() {
    let dir = data_dir();
    let key = add_key(dir.path(), "writer", "write");
    let admin_key = add_key(dir.path(), "root", "admin");
    let node = joining(dir.path());
    let mut audit = Audit::new(Doc::fetch(node.public));
    let with_key = [("X-API-Key", key.as_str()), JSON, ACCEPT_JSON];
    let with_admin_key = [("X-API-Key", admin_key.as_str())];
    let (public, admin) = (Listener::Public, Listener::Admin);
    let cases: [Case<'_>; 18] = [
        (
            public,
            "GET",
            "/{code}",
            &with_key,
            b"",
            503,
            Some("not_ready"),
        ),
        (public, "GET", "/{code}", &[], b"", 503, None),
        (public, "HEAD", "/{code}", &[], b"", 503, None),
        (
            public,
            "POST",
            "/api/v1/shorten",
            &with_key,
            br#"{"long_url":"https://example.com/"}"#,
            503,
            Some("not_ready"),
        ),
        (
            public,
            "POST",
            "/api/v1/shorten/batch",
            &with_key,
            br#"{"items":[{"long_url":"https://example.com/"}]}"#,
            200,
            None,
        ),
        (
            public,
            "GET",
            "/api/v1/urls/{code}",
            &with_key,
            b"",
            503,
            Some("not_ready"),
        ),
        (
            public,
            "PATCH",
            "/api/v1/urls/{code}",
            &with_key,
            br#"{"status":"disabled"}"#,
            503,
            Some("not_ready"),
        ),
        (
            public,
            "DELETE",
            "/api/v1/urls/{code}",
            &with_key,
            b"",
            503,
            Some("not_ready"),
        ),
        (
            public,
            "GET",
            "/api/v1/urls/{code}/qr",
            &with_key,
            b"",
            503,
            Some("not_ready"),
        ),
        (
            public,
            "GET",
            "/api/v1/stats/{code}",
            &with_key,
            b"",
            503,
            Some("not_ready"),
        ),
        (public, "GET", "/readyz", &[], b"", 503, None),
        (admin, "GET", "/readyz", &[], b"", 503, Some("not_ready")),
        (admin, "HEAD", "/readyz", &[], b"", 503, None),
        (public, "GET", "/healthz", &[], b"", 200, None),
        (
            admin,
            "POST",
            "/admin/snapshot",
            &with_admin_key,
            b"",
            503,
            Some("not_ready"),
        ),
        (
            admin,
            "POST",
            "/admin/reload",
            &with_admin_key,
            b"",
            409,
            Some("cluster_mode"),
        ),
        (admin, "GET", "/admin/info", &with_admin_key, b"", 200, None),
        (admin, "GET", "/metrics", &[], b"", 200, None),
    ];
    for (listener, method, path, headers, body, status, machine) in cases {
        let to = match listener {
            Listener::Public => node.public,
            Listener::Admin => node.admin,
        };
        let reply = request(to, method, &fill(path, "abc123"), headers, body);
        audit.documented(listener, (path, method), &reply, "not ready");
        expect(&reply, status, machine, &format!("{method} {path}"));
        if path == "/api/v1/shorten/batch" {
            let item = &reply.json()["results"][0];
            assert_eq!(
                (&item["status"], &item["code"]),
                (&Value::from(503), &Value::from("not_ready"))
            );
        }
    }
    // The lean path too.
    let mut lean = KeepAlive::connect(node.public);
    for (method, accept_json) in [("GET", true), ("GET", false), ("HEAD", false)] {
        let headers: &[(&str, &str)] = if accept_json { &[ACCEPT_JSON] } else { &[] };
        let reply = lean.request(method, "/abc123", headers);
        audit.documented(
            Listener::Public,
            ("/{code}", method),
            &reply,
            "lean, not ready",
        );
        expect(
            &reply,
            503,
            accept_json.then_some("not_ready"),
            "lean, not ready",
        );
    }
    audit.finish();
}

/// The text of the function `signature` opens in `source`, to its closing brace at the start of
/// a line.
fn function<'a>(source: &'a str, signature: &str) -> &'a str {
    let start = source
        .find(signature)
        .unwrap_or_else(|| panic!("no {signature:?} in the router source"));
    let rest = &source[start..];
    &rest[..rest.find("\n}\n").expect("end of function")]
}

#[test]
fn every_path_the_routers_name_is_documented() {
    let doc: Value =
        serde_json::from_str(include_str!("../src/http/openapi.json")).expect("openapi.json");
    let documented: Vec<&str> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(String::as_str)
        .collect();
    let source = |file: &str| {
        std::fs::read_to_string(format!("{}/src/http/{file}", env!("CARGO_MANIFEST_DIR")))
            .expect("router source")
    };
    let (api, admin, server) = (source("api.rs"), source("admin.rs"), source("server.rs"));
    let routers = [
        ("api.rs", function(&api, "pub async fn handle")),
        ("admin.rs", function(&admin, "pub async fn handle")),
        ("server.rs", function(&server, "async fn route(")),
    ];
    let mut literals = 0;
    for (file, text) in routers {
        for line in text
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
        {
            for piece in line.split('"').skip(1).step_by(2) {
                if !piece.starts_with('/') || piece.contains(' ') {
                    continue;
                }
                literals += 1;
                assert!(
                    documented.iter().any(|path| *path == piece
                        || path.starts_with(piece)
                        || path.ends_with(piece)),
                    "{file} routes {piece:?}, which no path of openapi.json is, starts or ends with: document the route"
                );
            }
        }
    }
    assert!(
        literals >= 10,
        "found only {literals} path literals in the routers"
    );
}
