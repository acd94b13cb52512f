//! Shared helpers of the HTTP tests: start the real `kurz serve` on ephemeral ports with a temp
//! data dir, and speak HTTP/1.1 to it over plain `TcpStream`s.
#![allow(dead_code)] // each test binary uses its own subset of these helpers

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

pub mod haproxy;
pub mod mmdb;
pub mod nats;

pub const START_TIMEOUT: Duration = Duration::from_secs(20);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub fn kurz() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kurz"));
    for (name, _) in std::env::vars() {
        if name.starts_with("KURZ_") {
            command.env_remove(name);
        }
    }
    command
}

/// Runs `command` to its end and returns its output, killing it (and failing) if it still runs
/// after `START_TIMEOUT`: for commands that must exit, such as a `kurz serve` that must refuse
/// its settings.
pub fn output_within_start_timeout(mut command: Command) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + START_TIMEOUT;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("wait");
            panic!(
                "still running after {START_TIMEOUT:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait")
}

/// Adds an API key with `scope` to the keys file of `dir` and returns it.
pub fn add_key(dir: &Path, name: &str, scope: &str) -> String {
    let output = kurz()
        .args(["keys", "add", name, "--scope", scope, "--data-dir"])
        .arg(dir)
        .output()
        .expect("run kurz keys add");
    assert!(output.status.success(), "keys add failed: {output:?}");
    let stdout = String::from_utf8(output.stdout).expect("utf-8");
    stdout.lines().last().expect("key line").trim().to_owned()
}

/// `kurz serve` on `dir` with ephemeral ports on loopback, plus `extra` flags.
pub fn serve_command(dir: &Path, extra: &[&str]) -> Command {
    let mut command = kurz();
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir)
        .args(extra);
    command
}

/// A running `kurz serve`, killed when dropped.
pub struct Server {
    child: Child,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    /// Log lines from stderr, as they come.
    pub log: Mutex<mpsc::Receiver<String>>,
}

impl Server {
    /// Starts `kurz serve` on `dir` with ephemeral ports plus `extra` flags, and waits for
    /// /readyz to say 200.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        let server = Server::launch(dir, extra);
        server.wait_ready();
        server
    }

    /// Starts `kurz serve` like [`Server::start`] but returns as soon as it listens, before its
    /// store is open.
    pub fn launch(dir: &Path, extra: &[&str]) -> Server {
        let mut child = serve_command(dir, extra)
            .env("KURZ_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kurz serve");
        let stderr = child.stderr.take().expect("stderr");
        let (lines_tx, lines_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    // Nobody listens any more; keep draining so the server never blocks on stderr.
                    continue;
                }
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let (public, admin) = loop {
            let line = lines_rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| {
                    let _ = child.kill();
                    panic!("kurz serve printed no listening line")
                });
            if let Some(at) = line.find("listening public=") {
                let rest = &line[at + "listening public=".len()..];
                let (public, admin) = rest.split_once(" admin=").expect("admin= in line");
                break (
                    public.trim().parse().expect("public addr"),
                    admin.trim().parse().expect("admin addr"),
                );
            }
        };
        Server {
            child,
            public,
            admin,
            log: Mutex::new(lines_rx),
        }
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(reply) = try_request(self.public, "GET", "/readyz", &[], b"") {
                if reply.status == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "server never became ready");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        self.child.wait().expect("wait for kurz")
    }

    pub fn get(&self, path: &str) -> Reply {
        request(self.public, "GET", path, &[], b"")
    }

    pub fn post_json(&self, path: &str, key: &str, body: &str) -> Reply {
        let auth = format!("Bearer {key}");
        request(
            self.public,
            "POST",
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
    }

    /// A call to the admin listener with `key` as its bearer token and no body.
    pub fn admin_call(&self, method: &str, path: &str, key: &str) -> Reply {
        let auth = format!("Bearer {key}");
        request(self.admin, method, path, &[("Authorization", &auth)], b"")
    }

    pub fn with_key(&self, method: &str, path: &str, key: &str, body: &str) -> Reply {
        let mut headers = vec![("X-API-Key", key)];
        if !body.is_empty() {
            headers.push(("Content-Type", "application/json"));
        }
        request(self.public, method, path, &headers, body.as_bytes())
    }

    /// Creates a link and returns its code.
    pub fn create(&self, key: &str, body: &str) -> String {
        let reply = self.post_json("/api/v1/shorten", key, body);
        assert_eq!(reply.status, 201, "create {body}: {}", reply.text());
        reply.json()["short_code"]
            .as_str()
            .expect("short_code")
            .to_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.text()))
    }

    /// The machine code of an error body.
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or("").to_owned()
    }
}

/// Sends raw bytes on a fresh connection and returns everything the server sends back until it
/// closes the connection.
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    raw_waiting(addr, bytes, IO_TIMEOUT)
}

/// [`raw`] with a read and write timeout of `timeout`, for answers that take long.
pub fn raw_waiting(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    // The server may answer and close before it has read everything; that is fine.
    let _ = stream.write_all(bytes);
    let mut out = Vec::new();
    match stream.read_to_end(&mut out) {
        Ok(_) => Ok(out),
        Err(error) if !out.is_empty() => {
            let _ = error;
            Ok(out)
        }
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => Ok(out),
        Err(error) => Err(error),
    }
}

pub fn parse_reply(bytes: &[u8]) -> Reply {
    let head_end = bytes
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(bytes)));
    let head = std::str::from_utf8(&bytes[..head_end]).expect("ascii head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: bytes[head_end + 4..].to_vec(),
    }
}

pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Reply> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: kurz.test\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PATCH" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    let reply = raw(addr, &bytes)?;
    if reply.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed without a reply",
        ));
    }
    Ok(parse_reply(&reply))
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    try_request(addr, method, path, headers, body)
        .unwrap_or_else(|error| panic!("{method} {path}: {error}"))
}

/// A fresh temp data dir.
pub fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// A server with the quick-start link `/rust` and these flags.
pub fn sample_server(flags: &[&str]) -> (tempfile::TempDir, Server) {
    let dir = data_dir();
    std::fs::write(
        dir.path().join("sample-links.tsv"),
        "rust\thttps://www.rust-lang.org/\n",
    )
    .expect("sample");
    let server = Server::start(dir.path(), flags);
    (dir, server)
}

/// One keep-alive HTTP/1.1 connection: requests go out without a `Connection` header (so a plain
/// `GET`/`HEAD /{code}` reaches the public listener's lean path), and each response is read by
/// its Content-Length.
pub struct KeepAlive {
    stream: TcpStream,
    pending: Vec<u8>,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> KeepAlive {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        KeepAlive {
            stream,
            pending: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Sends what it can of `bytes`: the server may answer and close before it read them all.
    pub fn send_some(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Reads one response; `head` says it answers a HEAD (no body whatever Content-Length says).
    /// Every response must start right where the previous one ended: a body the server sent
    /// unannounced (to a HEAD, say) fails here.
    pub fn read_reply(&mut self, head: bool) -> Reply {
        let mut buffer = [0u8; 8192];
        loop {
            let prefix = self.pending.len().min(7);
            assert_eq!(
                &self.pending[..prefix],
                &b"HTTP/1."[..prefix],
                "a response must start here: {:?}",
                String::from_utf8_lossy(&self.pending)
            );
            if let Some(end) = self.pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let reply = parse_reply(&self.pending[..end + 4]);
                let body_bytes = if head {
                    0
                } else {
                    reply
                        .header("content-length")
                        .and_then(|value| value.parse::<usize>().ok())
                        .unwrap_or(0)
                };
                if self.pending.len() >= end + 4 + body_bytes {
                    let body = self.pending[end + 4..end + 4 + body_bytes].to_vec();
                    self.pending.drain(..end + 4 + body_bytes);
                    return Reply { body, ..reply };
                }
            }
            let read = self.stream.read(&mut buffer).expect("read reply");
            assert!(read > 0, "connection closed mid-reply");
            self.pending.extend_from_slice(&buffer[..read]);
        }
    }

    /// Whether bytes arrived that no response read so far took.
    pub fn has_unread_bytes(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.request_with_body(method, path, headers, b"")
    }

    /// A request with a body (sent with its Content-Length when not empty, or for POST/PATCH).
    pub fn request_with_body(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: kurz.test\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() || method == "POST" || method == "PATCH" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body);
        self.send(&bytes);
        self.read_reply(method == "HEAD")
    }

    /// Whether the server has closed the connection (reads EOF within the IO timeout).
    pub fn closed_by_server(&mut self) -> bool {
        let mut buffer = [0u8; 64];
        matches!(self.stream.read(&mut buffer), Ok(0))
    }

    /// Whether the server stays silent (sends nothing, and does not close) for `quiet`.
    pub fn silent_for(&mut self, quiet: Duration) -> bool {
        self.stream.set_read_timeout(Some(quiet)).expect("timeout");
        let mut buffer = [0u8; 8192];
        let silent = match self.stream.read(&mut buffer) {
            Ok(read) => {
                self.pending.extend_from_slice(&buffer[..read]);
                false
            }
            Err(error) => matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        self.stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("timeout");
        silent
    }

    /// Waits until the server closes the connection (EOF or reset), for at most the IO
    /// timeout: what the server sent before it closed (an answer such as 408, or nothing), or
    /// None if the connection is still open then.
    pub fn wait_closed(&mut self) -> Option<Vec<u8>> {
        let mut bytes = std::mem::take(&mut self.pending);
        let mut buffer = [0u8; 8192];
        loop {
            match self.stream.read(&mut buffer) {
                Ok(0) => return Some(bytes),
                Ok(read) => bytes.extend_from_slice(&buffer[..read]),
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Some(bytes)
                }
                Err(_) => return None,
            }
        }
    }
}
