//! The final report: the numbers a run ends with (latency percentiles, achieved rate, statuses,
//! errors), computed once from the merged counts and rendered as a table for people or as one
//! JSON object for scripts. It only formats; it never measures.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::{ErrorCounts, Stats};

/// Latency percentiles in microseconds, from the intended send time (open loop) or the send
/// (closed loop) to the end of the response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencyUs {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// Errors by kind, and their total (socket errors plus timeouts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Errors {
    pub total: u64,
    #[serde(flatten)]
    pub by_kind: ErrorCounts,
}

/// Everything a run measured after its warm-up.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub url: String,
    /// `open_loop` (with `target_rps`) or `closed_loop`.
    pub mode: &'static str,
    pub target_rps: Option<f64>,
    pub connections: usize,
    pub threads: usize,
    /// Responses received to requests sent after the warm-up, of any status.
    pub requests: u64,
    /// Length of the measured phase, in seconds.
    pub duration_s: f64,
    /// `requests / duration_s`.
    pub rps: f64,
    pub latency_us: LatencyUs,
    /// Response count by status code.
    pub status: BTreeMap<u16, u64>,
    pub errors: Errors,
    /// Connections opened again because the server closed one or an error did.
    pub reconnects: u64,
    pub p99_target_us: Option<u64>,
    /// False when `p99_target_us` is set and the measured p99 is above it.
    pub target_met: bool,
}

/// How the run was set up, for the report's header.
#[derive(Debug, Clone)]
pub struct RunShape {
    pub url: String,
    pub target_rps: Option<f64>,
    pub connections: usize,
    pub threads: usize,
    pub p99_target_us: Option<u64>,
}

impl Report {
    pub fn new(shape: RunShape, measured: &Stats, duration_s: f64) -> Self {
        let histogram = &measured.latency_us;
        let percentile = |quantile: f64| match histogram.len() {
            0 => 0,
            _ => histogram.value_at_quantile(quantile),
        };
        let latency_us = LatencyUs {
            p50: percentile(0.5),
            p90: percentile(0.9),
            p99: percentile(0.99),
            p999: percentile(0.999),
            max: histogram.max(),
            mean: histogram.mean(),
        };
        let requests = measured.responses();
        let target_met = shape
            .p99_target_us
            .is_none_or(|target| latency_us.p99 <= target);
        Self {
            url: shape.url,
            mode: match shape.target_rps {
                Some(_) => "open_loop",
                None => "closed_loop",
            },
            target_rps: shape.target_rps,
            connections: shape.connections,
            threads: shape.threads,
            requests,
            duration_s,
            rps: if duration_s > 0.0 {
                requests as f64 / duration_s
            } else {
                0.0
            },
            latency_us,
            status: measured.statuses().collect(),
            errors: Errors {
                total: measured.errors.total(),
                by_kind: measured.errors,
            },
            reconnects: measured.reconnects,
            p99_target_us: shape.p99_target_us,
            target_met,
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mode = match self.target_rps {
            Some(rate) => format!("open loop at {rate} req/s"),
            None => "closed loop".to_owned(),
        };
        let _ = writeln!(
            out,
            "{}: {mode}, {} connections, {} threads, {:.2} s measured",
            self.url, self.connections, self.threads, self.duration_s
        );
        let latency = &self.latency_us;
        let _ = writeln!(
            out,
            "  latency   {:>9} {:>9} {:>9} {:>9} {:>9}",
            "p50", "p90", "p99", "p99.9", "max"
        );
        let _ = writeln!(
            out,
            "            {:>9} {:>9} {:>9} {:>9} {:>9}",
            format_us(latency.p50),
            format_us(latency.p90),
            format_us(latency.p99),
            format_us(latency.p999),
            format_us(latency.max)
        );
        let _ = writeln!(
            out,
            "  rate      {:.1} req/s ({} responses)",
            self.rps, self.requests
        );
        let statuses: Vec<String> = self
            .status
            .iter()
            .map(|(status, count)| format!("{status}: {count}"))
            .collect();
        let _ = writeln!(out, "  status    {}", statuses.join("  "));
        let kinds = &self.errors.by_kind;
        let _ = writeln!(
            out,
            "  errors    {} (connect {}, io {}, closed {}, malformed {}, timeout {})",
            self.errors.total,
            kinds.connect,
            kinds.io,
            kinds.closed,
            kinds.malformed,
            kinds.timeout
        );
        let _ = writeln!(out, "  reconnects {}", self.reconnects);
        if let Some(target) = self.p99_target_us {
            let verdict = if self.target_met { "met" } else { "MISSED" };
            let _ = writeln!(out, "  p99 target {} {verdict}", format_us(target));
        }
        out
    }
}

/// `412us`, `2.31ms`, `1.500s`: short and still exact enough to compare.
pub fn format_us(latency_us: u64) -> String {
    match latency_us {
        0..1_000 => format!("{latency_us}us"),
        1_000..1_000_000 => format!("{:.2}ms", latency_us as f64 / 1e3),
        _ => format!("{:.3}s", latency_us as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(p99_target_us: Option<u64>) -> RunShape {
        RunShape {
            url: "http://127.0.0.1:1".to_owned(),
            target_rps: Some(100.0),
            connections: 2,
            threads: 1,
            p99_target_us,
        }
    }

    #[test]
    fn report_numbers_agree_with_the_counts() {
        let mut stats = Stats::new();
        for latency_us in 1..=1000 {
            stats.record_response(if latency_us % 10 == 0 { 404 } else { 302 }, latency_us);
        }
        let report = Report::new(shape(Some(2000)), &stats, 2.0);
        assert_eq!(report.requests, 1000);
        assert_eq!(report.status.values().sum::<u64>(), report.requests);
        assert_eq!(report.status[&404], 100);
        assert_eq!(report.rps, 500.0);
        assert!(
            (985..=995).contains(&report.latency_us.p99),
            "{:?}",
            report.latency_us
        );
        assert!(report.target_met);
        assert!(!Report::new(shape(Some(500)), &stats, 2.0).target_met);
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["errors"]["total"], 0);
        assert_eq!(json["status"]["302"], 900);
        assert!(report.table().contains("302: 900"));
    }

    #[test]
    fn an_empty_run_reports_zeros_not_garbage() {
        let report = Report::new(shape(None), &Stats::new(), 0.0);
        assert_eq!(report.requests, 0);
        assert_eq!(report.rps, 0.0);
        assert_eq!(report.latency_us.p99, 0);
        assert!(report.target_met);
    }

    #[test]
    fn latencies_are_formatted_with_units() {
        assert_eq!(format_us(412), "412us");
        assert_eq!(format_us(2_310), "2.31ms");
        assert_eq!(format_us(1_500_000), "1.500s");
    }
}
