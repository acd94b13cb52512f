//! A deliberately trivial HTTP/1.1 server for measuring the load generator itself: one thread,
//! one mio loop, and every request (anything ending in an empty line) answered with the same
//! pre-built 302. It parses nothing, so what limits a run against it is the generator (and the
//! kernel), not the server.
//!
//! `cargo run -p loadtest --release --example fixed_redirect_server -- 127.0.0.1:18080 30`
//! listens on the address for at most 30 seconds, then exits on its own.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const RESPONSE: &[u8] =
    b"HTTP/1.1 302 Found\r\nLocation: https://example.com/\r\nContent-Length: 0\r\n\r\n";
const LISTENER: Token = Token(usize::MAX);
const LIFETIME_DEFAULT_S: u64 = 30;

fn main() -> io::Result<()> {
    let mut arguments = std::env::args().skip(1);
    let address = arguments
        .next()
        .unwrap_or_else(|| "127.0.0.1:18080".to_owned());
    let lifetime_s = arguments
        .next()
        .and_then(|text| text.parse().ok())
        .unwrap_or(LIFETIME_DEFAULT_S);
    let address = address
        .parse()
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    let mut listener = TcpListener::bind(address)?;
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut connections: HashMap<usize, (TcpStream, usize)> = HashMap::new();
    let mut events = Events::with_capacity(1024);
    let mut buffer = vec![0u8; 64 * 1024];
    let mut next_token = 0;
    let stop_at = Instant::now() + Duration::from_secs(lifetime_s);
    while Instant::now() < stop_at {
        poll.poll(&mut events, Some(Duration::from_millis(100)))?;
        for event in events.iter() {
            if event.token() == LISTENER {
                while let Ok((mut stream, _)) = listener.accept() {
                    stream.set_nodelay(true)?;
                    poll.registry()
                        .register(&mut stream, Token(next_token), Interest::READABLE)?;
                    connections.insert(next_token, (stream, 0));
                    next_token += 1;
                }
                continue;
            }
            let token = event.token().0;
            if !serve(&mut connections, token, &mut buffer) {
                connections.remove(&token);
            }
        }
    }
    Ok(())
}

/// Answers every complete request received; false when the connection is finished.
fn serve(
    connections: &mut HashMap<usize, (TcpStream, usize)>,
    token: usize,
    buffer: &mut [u8],
) -> bool {
    let Some((stream, matched)) = connections.get_mut(&token) else {
        return true;
    };
    loop {
        match stream.read(buffer) {
            Ok(0) => return false,
            Ok(received) => {
                let mut responses = 0;
                for &byte in &buffer[..received] {
                    // Counts progress through "\r\n\r\n" across reads.
                    *matched = match (*matched, byte) {
                        (0 | 2, b'\r') => *matched + 1,
                        (1 | 3, b'\n') => *matched + 1,
                        (_, b'\r') => 1,
                        _ => 0,
                    };
                    if *matched == 4 {
                        *matched = 0;
                        responses += 1;
                    }
                }
                for _ in 0..responses {
                    if stream.write_all(RESPONSE).is_err() {
                        return false;
                    }
                }
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}
