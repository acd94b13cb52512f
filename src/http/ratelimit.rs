//! Token buckets that limit link creation per API key and per client IP. Owns only the buckets;
//! never decides who a client is (the API handler passes the bucket names in).

use std::sync::Mutex;
use std::time::Instant;

use dashmap::DashMap;

/// Buckets kept before idle ones (those refilled to full) are dropped, so a flood of client
/// addresses cannot grow the map without bound.
const BUCKETS_MAX: usize = 100_000;

struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

pub struct RateLimiter {
    rate_per_s: f64,
    burst: f64,
    buckets: DashMap<String, Mutex<Bucket>, ahash::RandomState>,
}

impl RateLimiter {
    pub fn new(rate_per_s: f64, burst: u32) -> RateLimiter {
        RateLimiter {
            rate_per_s,
            burst: f64::from(burst),
            buckets: DashMap::default(),
        }
    }

    /// Takes `cost` tokens (at most the burst) from the bucket `name`, or says in how many whole
    /// seconds enough will have refilled.
    pub fn take(&self, name: &str, cost: u32) -> Result<(), u64> {
        let cost = f64::from(cost).min(self.burst);
        let now = Instant::now();
        if self.buckets.len() >= BUCKETS_MAX {
            self.evict_full(now);
        }
        let entry = match self.buckets.get(name) {
            Some(entry) => entry,
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
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            Ok(())
        } else {
            let wait_s = (cost - bucket.tokens) / self.rate_per_s;
            Err(wait_s.ceil().max(1.0) as u64)
        }
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
        assert_eq!(limiter.take("c", 10), Ok(()));
        assert_eq!(limiter.take("c", 3), Err(3));
    }
}
