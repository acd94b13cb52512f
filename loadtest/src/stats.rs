//! What a generator thread counts while it runs: a latency histogram, responses by status code,
//! errors by kind, reconnections. Recording is allocation-free so it can sit on the hot path;
//! merging happens off it, in the thread that prints and reports.

use hdrhistogram::Histogram;

/// Largest latency the histograms hold, in microseconds (one hour); longer ones are clamped.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Significant decimal digits kept by the histograms: 0.1% resolution at every magnitude.
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;
/// Status codes are counted in a flat table; httparse only accepts three-digit codes.
pub const STATUS_CODES_COUNT: usize = 1000;

/// Why a request or a connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The connection could not be set up (refused, unreachable, or it took longer than the
    /// timeout).
    Connect,
    /// Reading or writing failed (e.g. reset by the server).
    Io,
    /// The server closed the connection while a request was waiting for its response.
    Closed,
    /// The response could not be parsed, or bytes came that no request asked for.
    Malformed,
    /// No complete response within `--timeout`.
    Timeout,
}

/// Error counts by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ErrorCounts {
    pub connect: u64,
    pub io: u64,
    pub closed: u64,
    pub malformed: u64,
    pub timeout: u64,
}

impl ErrorCounts {
    pub fn total(&self) -> u64 {
        self.connect + self.io + self.closed + self.malformed + self.timeout
    }

    fn add(&mut self, other: &ErrorCounts) {
        self.connect += other.connect;
        self.io += other.io;
        self.closed += other.closed;
        self.malformed += other.malformed;
        self.timeout += other.timeout;
    }
}

/// Counts for one phase (warm-up or measured) of one interval of one thread, or merged ones.
#[derive(Debug, Clone)]
pub struct Stats {
    pub latency_us: Histogram<u64>,
    /// `status_counts[code]` is how many responses had that status.
    pub status_counts: Box<[u64]>,
    pub errors: ErrorCounts,
    /// Connections opened again after the server closed one or after an error.
    pub reconnects: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new() -> Self {
        let latency_us = Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGNIFICANT_DIGITS)
            .expect("the latency bounds are constants that hdrhistogram accepts");
        Self {
            latency_us,
            status_counts: vec![0; STATUS_CODES_COUNT].into_boxed_slice(),
            errors: ErrorCounts::default(),
            reconnects: 0,
        }
    }

    pub fn record_response(&mut self, status: u16, latency_us: u64) {
        self.latency_us.saturating_record(latency_us.max(1));
        self.status_counts[usize::from(status) % STATUS_CODES_COUNT] += 1;
    }

    pub fn record_error(&mut self, kind: ErrorKind) {
        let counter = match kind {
            ErrorKind::Connect => &mut self.errors.connect,
            ErrorKind::Io => &mut self.errors.io,
            ErrorKind::Closed => &mut self.errors.closed,
            ErrorKind::Malformed => &mut self.errors.malformed,
            ErrorKind::Timeout => &mut self.errors.timeout,
        };
        *counter += 1;
    }

    /// Responses received, of any status.
    pub fn responses(&self) -> u64 {
        self.latency_us.len()
    }

    pub fn merge(&mut self, other: &Stats) {
        self.latency_us
            .add(&other.latency_us)
            .expect("every histogram here has the same bounds");
        for (mine, theirs) in self
            .status_counts
            .iter_mut()
            .zip(other.status_counts.iter())
        {
            *mine += theirs;
        }
        self.errors.add(&other.errors);
        self.reconnects += other.reconnects;
    }

    /// `(status, count)` for every status seen, in order.
    pub fn statuses(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.status_counts
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(status, count)| (status as u16, *count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_equal_the_sum_of_status_counts_after_merging() {
        let mut first = Stats::new();
        first.record_response(302, 120);
        first.record_response(404, 0);
        first.record_error(ErrorKind::Timeout);
        let mut second = Stats::new();
        second.record_response(302, LATENCY_US_MAX * 2);
        second.record_error(ErrorKind::Connect);
        second.reconnects = 3;
        first.merge(&second);
        assert_eq!(first.responses(), 3);
        assert_eq!(
            first.statuses().collect::<Vec<_>>(),
            vec![(302, 2), (404, 1)]
        );
        assert_eq!(first.errors.total(), 2);
        assert_eq!(first.reconnects, 3);
        assert!(first.latency_us.max() >= LATENCY_US_MAX * 999 / 1000);
        assert_eq!(first.latency_us.min(), 1);
    }
}
