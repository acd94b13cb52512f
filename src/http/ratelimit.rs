//! Token buckets that limit link creation per API key and per client IP. Owns only the buckets;
//! never decides who a client is (the API handler passes the bucket names in).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use dashmap::DashMap;

/// Buckets kept before idle ones (those refilled to full) are dropped, so a flood of client
/// addresses cannot grow the map without bound.
const BUCKETS_MAX: usize = 100_000;
/// Least time between two sweeps for idle buckets: a sweep walks every bucket, so a flood of new
/// names must not trigger one per request.
const SWEEP_INTERVAL_MS: u64 = 1000;

struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

pub struct RateLimiter {
    rate_per_s: f64,
    burst: f64,
    buckets: DashMap<String, Mutex<Bucket>, ahash::RandomState>,
    started: Instant,
    /// Milliseconds after `started` of the last sweep.
    swept_at_ms: AtomicU64,
}

impl RateLimiter {
    pub fn new(rate_per_s: f64, burst: u32) -> RateLimiter {
        RateLimiter {
            rate_per_s,
            burst: f64::from(burst),
            buckets: DashMap::default(),
            started: Instant::now(),
            swept_at_ms: AtomicU64::new(0),
        }
    }

    /// Takes `cost` tokens from the bucket `name`, or says in how many whole seconds enough will
    /// have refilled. A cost above the burst (a large batch) needs a full bucket and leaves it
    /// in debt, so it is paid for in full before the next request. When the map is full of busy
    /// buckets, a new name is refused until a sweep makes room.
    pub fn take(&self, name: &str, cost: u32) -> Result<(), u64> {
        let cost = f64::from(cost);
        let needed = cost.min(self.burst);
        let now = Instant::now();
        let entry = match self.buckets.get(name) {
            Some(entry) => entry,
            None if self.buckets.len() >= BUCKETS_MAX && !self.sweep(now) => return Err(1),
            None => self
                .buckets
                .entry(name.to_owned())
                .or_insert_with(|| {
                    Mutex::new(Bucket {
                        tokens: self.burst,
                        refilled_at: now,
                    })
                })
                .downgrade(),
        };
        let Ok(mut bucket) = entry.lock() else {
            return Err(1);
        };
        let elapsed_s = now
            .saturating_duration_since(bucket.refilled_at)
            .as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed_s * self.rate_per_s).min(self.burst);
        bucket.refilled_at = now;
        if bucket.tokens >= needed {
            bucket.tokens -= cost;
            Ok(())
        } else {
            let wait_s = (needed - bucket.tokens) / self.rate_per_s;
            Err(wait_s.ceil().max(1.0) as u64)
        }
    }

    /// Gives back `cost` tokens that [`Self::take`] took from the bucket `name` for a request
    /// another bucket then refused (never above the burst).
    pub fn refund(&self, name: &str, cost: u32) {
        if let Some(entry) = self.buckets.get(name) {
            if let Ok(mut bucket) = entry.lock() {
                bucket.tokens = (bucket.tokens + f64::from(cost)).min(self.burst);
            }
        }
    }

    /// Drops idle buckets, at most once per [`SWEEP_INTERVAL_MS`]; true if there is room now.
    fn sweep(&self, now: Instant) -> bool {
        let now_ms = now.saturating_duration_since(self.started).as_millis() as u64;
        let swept_at_ms = self.swept_at_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(swept_at_ms) >= SWEEP_INTERVAL_MS
            && self
                .swept_at_ms
                .compare_exchange(swept_at_ms, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.evict_full(now);
        }
        self.buckets.len() < BUCKETS_MAX
    }

    fn evict_full(&self, now: Instant) {
        self.buckets.retain(|_, bucket| match bucket.get_mut() {
            Ok(bucket) => {
                let elapsed_s = now
                    .saturating_duration_since(bucket.refilled_at)
                    .as_secs_f64();
                bucket.tokens + elapsed_s * self.rate_per_s < self.burst
            }
            Err(_) => false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refusal_with_retry_after() {
        let limiter = RateLimiter::new(1.0, 3);
        assert_eq!(limiter.take("a", 1), Ok(()));
        assert_eq!(limiter.take("a", 2), Ok(()));
        assert_eq!(limiter.take("a", 1), Err(1));
        assert_eq!(limiter.take("b", 1), Ok(()));
        assert_eq!(limiter.take("c", 2), Ok(()));
        assert_eq!(limiter.take("c", 3), Err(2));
    }

    #[test]
    fn a_refund_gives_back_what_was_taken_up_to_the_burst() {
        let limiter = RateLimiter::new(0.001, 3);
        assert_eq!(limiter.take("key", 3), Ok(()));
        assert_eq!(limiter.take("key", 1), Err(1000));
        limiter.refund("key", 2);
        assert_eq!(limiter.take("key", 2), Ok(()));
        assert_eq!(limiter.take("key", 1), Err(1000));
        limiter.refund("key", 10);
        assert_eq!(limiter.take("key", 3), Ok(()), "refilled to the burst");
        assert_eq!(limiter.take("key", 1), Err(1000), "not above it");
        limiter.refund("unknown", 1);
        assert!(limiter.buckets.get("unknown").is_none());
    }

    #[test]
    fn a_cost_above_the_burst_is_paid_in_full() {
        let limiter = RateLimiter::new(2.0, 10);
        assert_eq!(limiter.take("batch", 1), Ok(()));
        assert_eq!(limiter.take("batch", 11), Err(1), "needs a full bucket");
        assert_eq!(limiter.take("other", 100), Ok(()), "a full bucket takes it");
        // 100 taken from 10: 90 in debt, then one more token: 91 at 2 per second.
        assert_eq!(limiter.take("other", 1), Err(46));
    }

    #[test]
    fn a_flood_of_names_is_bounded() {
        let limiter = RateLimiter::new(0.001, 3);
        for n in 0..BUCKETS_MAX {
            assert_eq!(limiter.take(&format!("ip:{n}"), 1), Ok(()));
        }
        assert_eq!(
            limiter.take("ip:new", 1),
            Err(1),
            "no room for another busy bucket"
        );
        assert_eq!(
            limiter.take("ip:7", 1),
            Ok(()),
            "known names keep their buckets"
        );
        assert_eq!(limiter.buckets.len(), BUCKETS_MAX);
    }
}
