//! Token-bucket rate limiters for block and network devices (Firecracker's `rate_limiter`).
//!
//! A [`RateLimiter`] has up to two buckets: bytes and operations. A bucket of `size` tokens
//! refills completely every `refill_time` milliseconds, continuously; `one_time_burst` tokens are
//! spent first and never come back. When a request does not fit, the limiter arms its timerfd for
//! the moment it will and reports itself blocked; the device thread waits on that timerfd in its
//! epoll loop instead of spinning. A request larger than a whole bucket goes through once the
//! bucket is full and leaves a debt that blocks later requests until it is paid off.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::config::{RateLimiterConfig, TokenBucketConfig};
use crate::timer::Timer;

const NANOS_PER_MS: u128 = 1_000_000;

/// One token bucket.
#[derive(Debug)]
struct TokenBucket {
    size: u64,
    refill_ns: u128,
    one_time_burst: u64,
    /// Tokens available; negative after an oversized request (a debt).
    budget: i128,
    last_refill: Instant,
}

impl TokenBucket {
    /// A full bucket, or None for a disabled one (size or refill time zero, as in Firecracker).
    fn new(config: &TokenBucketConfig) -> Option<Self> {
        if config.size == 0 || config.refill_time == 0 {
            return None;
        }
        Some(TokenBucket {
            size: config.size,
            refill_ns: u128::from(config.refill_time) * NANOS_PER_MS,
            one_time_burst: config.one_time_burst.unwrap_or(0),
            budget: i128::from(config.size),
            last_refill: Instant::now(),
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_refill).as_nanos();
        let tokens = elapsed * u128::from(self.size) / self.refill_ns;
        if tokens == 0 {
            return;
        }
        // Advance by the time those whole tokens took, so fractions are not lost.
        let used_ns = tokens * self.refill_ns / u128::from(self.size);
        self.last_refill += Duration::from_nanos(used_ns.min(u128::from(u64::MAX)) as u64);
        self.budget = (self.budget + tokens as i128).min(i128::from(self.size));
    }

    /// How long until `tokens` can be taken (zero if now).
    fn wait_for(&mut self, tokens: u64, now: Instant) -> Duration {
        self.refill(now);
        let from_burst = tokens.min(self.one_time_burst);
        // An oversized request only needs a full bucket.
        let needed = i128::from((tokens - from_burst).min(self.size));
        if needed <= self.budget {
            return Duration::ZERO;
        }
        let missing = (needed - self.budget) as u128;
        let ns = missing * self.refill_ns / u128::from(self.size);
        Duration::from_nanos(ns.min(u128::from(u64::MAX)) as u64)
    }

    /// Takes `tokens`; call only after `wait_for` returned zero.
    fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.one_time_burst);
        self.one_time_burst -= from_burst;
        self.budget -= i128::from(tokens - from_burst);
    }
}

/// Which bucket a change applies to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RateLimiterUpdate {
    /// New bandwidth bucket: None keeps it, a zero size or refill time removes it.
    pub bandwidth: Option<TokenBucketConfig>,
    /// New operations bucket: None keeps it, a zero size or refill time removes it.
    pub ops: Option<TokenBucketConfig>,
}

impl From<&RateLimiterConfig> for RateLimiterUpdate {
    fn from(config: &RateLimiterConfig) -> Self {
        RateLimiterUpdate {
            bandwidth: config.bandwidth.clone(),
            ops: config.ops.clone(),
        }
    }
}

/// A bandwidth bucket and an operations bucket, with the timerfd that unblocks them.
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: Timer,
    blocked: bool,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("bandwidth", &self.bandwidth)
            .field("ops", &self.ops)
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter for `config` (no limits when None or when both buckets are absent).
    pub fn new(config: Option<&RateLimiterConfig>) -> std::io::Result<Self> {
        let mut limiter = RateLimiter {
            bandwidth: None,
            ops: None,
            timer: Timer::new()?,
            blocked: false,
        };
        if let Some(config) = config {
            limiter.update(&RateLimiterUpdate::from(config));
        }
        Ok(limiter)
    }

    /// Whether a request was refused and the timer has not fired yet.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Takes `bytes` from the bandwidth bucket and one operation from the ops bucket, or takes
    /// nothing, arms the timer and returns false.
    pub fn consume(&mut self, bytes: u64) -> bool {
        if self.blocked {
            return false;
        }
        let now = Instant::now();
        let wait_bytes = self
            .bandwidth
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(bytes, now));
        let wait_ops = self
            .ops
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(1, now));
        let wait = wait_bytes.max(wait_ops);
        if wait.is_zero() {
            if let Some(b) = self.bandwidth.as_mut() {
                b.take(bytes);
            }
            if let Some(b) = self.ops.as_mut() {
                b.take(1);
            }
            return true;
        }
        match self.timer.arm(wait) {
            Ok(()) => self.blocked = true,
            // Without a timer nothing would wake the device: let the request through.
            Err(_) => return true,
        }
        false
    }

    /// Handles the timer firing: the device may retry.
    pub fn on_timer(&mut self) {
        self.timer.acknowledge();
        self.blocked = false;
    }

    /// Replaces the buckets named in `update` (new buckets start full) and unblocks.
    pub fn update(&mut self, update: &RateLimiterUpdate) {
        if let Some(config) = &update.bandwidth {
            self.bandwidth = TokenBucket::new(config);
        }
        if let Some(config) = &update.ops {
            self.ops = TokenBucket::new(config);
        }
        if self.blocked {
            // Best effort: a stale expiration only causes one extra retry.
            let _ = self.timer.disarm();
            self.blocked = false;
        }
    }

    /// Whether any bucket is configured.
    pub fn is_limiting(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, refill_time: u64, burst: Option<u64>) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time,
        }
    }

    fn limiter(bw: Option<TokenBucketConfig>, ops: Option<TokenBucketConfig>) -> RateLimiter {
        RateLimiter::new(Some(&RateLimiterConfig { bandwidth: bw, ops })).unwrap()
    }

    #[test]
    fn unlimited_never_blocks() {
        let mut l = RateLimiter::new(None).unwrap();
        assert!(!l.is_limiting());
        for _ in 0..1000 {
            assert!(l.consume(1 << 30));
        }
    }

    #[test]
    fn bandwidth_bucket_blocks_then_timer_unblocks() {
        let mut l = limiter(Some(bucket(1000, 100, None)), None);
        assert!(l.consume(600));
        assert!(!l.consume(600));
        assert!(l.is_blocked());
        // Refusals while blocked take nothing.
        assert!(!l.consume(1));
        let mut pfd = libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
        assert_eq!(n, 1, "the timer fires within the refill time");
        l.on_timer();
        assert!(l.consume(600));
    }

    #[test]
    fn ops_bucket_and_one_time_burst() {
        let mut l = limiter(None, Some(bucket(2, 1000, Some(3))));
        for _ in 0..5 {
            assert!(l.consume(0));
        }
        assert!(!l.consume(0));
    }

    #[test]
    fn oversized_request_passes_when_full_and_leaves_a_debt() {
        let mut l = limiter(Some(bucket(100, 1000, None)), None);
        assert!(l.consume(250));
        assert!(!l.consume(1));
    }

    #[test]
    fn updates_replace_remove_and_unblock() {
        let mut l = limiter(Some(bucket(10, 1000, None)), None);
        assert!(l.consume(10));
        assert!(!l.consume(10));
        l.update(&RateLimiterUpdate {
            bandwidth: Some(bucket(100, 1000, None)),
            ops: None,
        });
        assert!(!l.is_blocked());
        assert!(l.consume(50));
        l.update(&RateLimiterUpdate {
            bandwidth: Some(bucket(0, 0, None)),
            ops: None,
        });
        assert!(!l.is_limiting());
        assert!(l.consume(u64::MAX));
    }

    #[test]
    fn refill_is_continuous() {
        let mut b = TokenBucket::new(&bucket(1000, 100, None)).unwrap();
        let t0 = b.last_refill;
        b.take(1000);
        assert_eq!(b.wait_for(500, t0), Duration::from_millis(50));
        assert_eq!(
            b.wait_for(500, t0 + Duration::from_millis(50)),
            Duration::ZERO
        );
    }
}
