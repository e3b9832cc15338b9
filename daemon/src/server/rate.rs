//! Token-bucket rate limits keyed by terminal ID (or, for enrollment, by peer address), in a
//! map of bounded size.
//!
//! **Why not `governor`.** Its keyed limiter (GCRA, one atomic `u64` per key in a `DashMap`
//! by default) answers the same question with the same `Retry-After` figure
//! (`NotUntil::wait_time_from`), and with less locking than the one `Mutex` here. But its
//! key map has no bound: it grows with every new key until the caller runs
//! `retain_recent()` (which drops keys whose state has fully replenished, as [`RateLimiter`]'s
//! eviction does), so we would still need a sweeping task and a size check of our own, and
//! between two sweeps a peer with many /64 prefixes (or IPv4 addresses) on the enrollment
//! listener grows it without limit. The bound is the point of this type (house rule 5: a
//! limit on everything); with it the limiter is about eighty lines, against a dependency
//! whose default features (`std`, `dashmap`, `jitter`, `quanta`) bring `dashmap`, `quanta`,
//! `rand` and `futures` crates (0.10). One `Mutex` taken once per request is cheap next to
//! the TLS and HSM work of the same request.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One key's bucket: tokens left as of `updated`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Allows each key `rate_per_second` requests per second on average and `burst` at once.
///
/// At most `entries_max` keys are remembered. When a new key finds the map full, every bucket
/// that has refilled completely is dropped (forgetting a full bucket loses nothing: a new one
/// starts full); if none has, the least recently used one is dropped, which errs towards
/// letting a request through rather than refusing a well-behaved terminal.
#[derive(Debug)]
pub(crate) struct RateLimiter<K> {
    buckets: Mutex<HashMap<K, Bucket>>,
    rate_per_second: f64,
    burst: f64,
    entries_max: usize,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub(crate) fn new(rate_per_second: u32, burst: u32, entries_max: usize) -> Self {
        assert!(
            rate_per_second > 0 && burst > 0 && entries_max > 0,
            "validated config"
        );
        Self {
            buckets: Mutex::new(HashMap::new()),
            rate_per_second: f64::from(rate_per_second),
            burst: f64::from(burst),
            entries_max,
        }
    }

    /// Takes one token for `key` at `now`; refused, says how long until one is available.
    pub(crate) fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        // A panic while holding the lock cannot leave a bucket half-updated in a way that
        // matters (each update is a plain store), so a poisoned lock is still usable.
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if !buckets.contains_key(key) && buckets.len() >= self.entries_max {
            self.evict(&mut buckets, now);
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let refilled = self.refilled(bucket, now);
        bucket.updated = now;
        if refilled >= 1.0 {
            bucket.tokens = refilled - 1.0;
            Ok(())
        } else {
            bucket.tokens = refilled;
            Err(Duration::from_secs_f64(
                (1.0 - refilled) / self.rate_per_second,
            ))
        }
    }

    fn refilled(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        (bucket.tokens + elapsed * self.rate_per_second).min(self.burst)
    }

    fn evict(&self, buckets: &mut HashMap<K, Bucket>, now: Instant) {
        buckets.retain(|_, bucket| self.refilled(bucket, now) < self.burst);
        if buckets.len() >= self.entries_max {
            let oldest = buckets
                .iter()
                .min_by_key(|(_, bucket)| bucket.updated)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                buckets.remove(&oldest);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_burst_then_the_rate() {
        let limiter = RateLimiter::new(10, 3, 100);
        let start = Instant::now();
        for _ in 0..3 {
            limiter.check(&"t1", start).unwrap();
        }
        let wait = limiter.check(&"t1", start).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Other keys are independent.
        limiter.check(&"t2", start).unwrap();
        // One token comes back after 1/rate seconds.
        limiter
            .check(&"t1", start + Duration::from_millis(100))
            .unwrap();
        limiter
            .check(&"t1", start + Duration::from_millis(100))
            .unwrap_err();
        // Never more than the burst, however long the key was quiet.
        let later = start + Duration::from_secs(3600);
        for _ in 0..3 {
            limiter.check(&"t1", later).unwrap();
        }
        limiter.check(&"t1", later).unwrap_err();
    }

    #[test]
    fn the_map_stays_bounded() {
        let limiter = RateLimiter::new(1, 2, 4);
        let start = Instant::now();
        for key in 0..1000 {
            limiter.check(&key, start).unwrap();
            assert!(limiter.len() <= 4);
        }
        // Full buckets are dropped first: a key that refilled does not survive eviction but
        // loses nothing either.
        let later = start + Duration::from_secs(10);
        limiter.check(&5000, later).unwrap();
        assert!(limiter.len() <= 4);
    }

    #[test]
    fn an_exhausted_key_stays_limited_while_others_come_and_go() {
        let limiter = RateLimiter::new(1, 1, 3);
        let start = Instant::now();
        limiter.check(&"busy", start).unwrap();
        limiter.check(&"busy", start).unwrap_err();
        // Two newcomers fit beside it; the busy key is not the least recently used.
        limiter
            .check(&"a", start + Duration::from_millis(1))
            .unwrap();
        limiter
            .check(&"busy", start + Duration::from_millis(2))
            .unwrap_err();
        limiter
            .check(&"b", start + Duration::from_millis(3))
            .unwrap();
        limiter
            .check(&"c", start + Duration::from_millis(4))
            .unwrap();
        limiter
            .check(&"busy", start + Duration::from_millis(5))
            .unwrap_err();
    }
}
