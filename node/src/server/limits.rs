//! In-memory token-bucket rate limits, keyed by phone, device or account (gateway and relays).
//!
//! Limits live in memory: they protect against floods within a process's life; the lasting
//! defences (code expiry, wrong-attempt lockouts) are in the database. Full buckets are pruned
//! when the map grows, so memory stays bounded by the number of *recently active* keys.

use std::collections::HashMap;
use std::sync::Mutex;

/// Prune full buckets once the map holds this many keys.
const PRUNE_AT: usize = 100_000;

/// One limit: `burst` actions at once, refilled at one per `refill_secs`.
#[derive(Debug)]
pub struct RateLimiter {
    burst: f64,
    /// Seconds per token.
    refill_secs: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: f64,
}

impl RateLimiter {
    /// A limiter allowing `burst` at once and one more every `refill_secs`.
    pub fn new(burst: u32, refill_secs: u64) -> Self {
        RateLimiter {
            burst: f64::from(burst.max(1)),
            refill_secs: refill_secs.max(1) as f64,
            buckets: Mutex::default(),
        }
    }

    /// A limiter allowing `burst` at once and `per_second` more each second.
    pub fn per_second(burst: u32, per_second: u32) -> Self {
        RateLimiter {
            burst: f64::from(burst.max(1)),
            refill_secs: 1.0 / f64::from(per_second.max(1)),
            buckets: Mutex::default(),
        }
    }

    /// Takes one token for `key` at `now` (unix seconds), or says how many whole seconds until
    /// one is available.
    pub fn check(&self, key: &str, now: u64) -> Result<(), u64> {
        self.check_n(key, 1, now)
    }

    /// Takes `n` tokens at once (all or none).
    pub fn check_n(&self, key: &str, n: u32, now: u64) -> Result<(), u64> {
        self.take(key, n, now, true)
    }

    /// Whether a token for `key` is there at `now`, without taking it: for limits on failures,
    /// asked before an attempt and taken ([`RateLimiter::check`]) only if it fails.
    pub fn wait(&self, key: &str, now: u64) -> Result<(), u64> {
        self.take(key, 1, now, false)
    }

    fn take(&self, key: &str, n: u32, now: u64, take: bool) -> Result<(), u64> {
        let n = f64::from(n);
        let now = now as f64;
        let mut buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if buckets.len() >= PRUNE_AT {
            let (burst, refill) = (self.burst, self.refill_secs);
            buckets.retain(|_, b| b.tokens + (now - b.updated) / refill < burst);
        }
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket { tokens: self.burst, updated: now });
        *bucket = Bucket { tokens: self.refilled(Some((bucket.tokens, bucket.updated)), now), updated: now };
        if bucket.tokens < n {
            return Err(self.secs_until(n - bucket.tokens));
        }
        if take {
            bucket.tokens -= n;
        }
        Ok(())
    }

    /// The tokens at `now` of a bucket left with `tokens` at `updated` (`None`: never used, so
    /// full). With [`RateLimiter::secs_until`], the arithmetic for buckets kept elsewhere (a
    /// database that several gateways share).
    pub fn refilled(&self, bucket: Option<(f64, f64)>, now: f64) -> f64 {
        match bucket {
            None => self.burst,
            Some((tokens, updated)) => (tokens + (now - updated).max(0.0) / self.refill_secs).min(self.burst),
        }
    }

    /// Whole seconds until a bucket has `missing` more tokens.
    pub fn secs_until(&self, missing: f64) -> u64 {
        (missing * self.refill_secs).ceil().max(1.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_wait_then_refill() {
        let limiter = RateLimiter::new(3, 10);
        for _ in 0..3 {
            assert!(limiter.check("a", 100).is_ok());
        }
        assert_eq!(limiter.check("a", 100), Err(10));
        assert_eq!(limiter.check("a", 104), Err(6));
        assert!(limiter.check("b", 104).is_ok(), "keys are independent");
        assert!(limiter.check("a", 110).is_ok());
        assert!(limiter.check("a", 110).is_err());
    }

    #[test]
    fn per_second_rates_take_batches_whole() {
        let limiter = RateLimiter::per_second(100, 50);
        assert!(limiter.check_n("a", 100, 0).is_ok());
        assert_eq!(limiter.check_n("a", 50, 0), Err(1));
        assert!(limiter.check_n("a", 50, 1).is_ok());
        assert!(limiter.check_n("a", 1000, 100).is_err(), "more than the burst never fits");
    }

    #[test]
    fn waiting_takes_nothing() {
        let limiter = RateLimiter::new(1, 10);
        assert!(limiter.wait("a", 100).is_ok());
        assert!(limiter.wait("a", 100).is_ok(), "still there");
        assert!(limiter.check("a", 100).is_ok());
        assert_eq!(limiter.wait("a", 100), Err(10));
    }

    #[test]
    fn clock_going_backwards_does_not_mint_tokens() {
        let limiter = RateLimiter::new(1, 10);
        assert!(limiter.check("a", 100).is_ok());
        assert!(limiter.check("a", 50).is_err());
    }
}
