//! Rate-limit math: GCRA (the generic cell rate algorithm), pure over a
//! clock value, with its state in a [`Kv`].
//!
//! GCRA keeps one number per key, the theoretical arrival time (TAT): the
//! moment the bucket would be empty again. A request is allowed when, after
//! adding its cost, the TAT lies less than one period ahead of now. It is a
//! token bucket of `limit` tokens refilled evenly over `period_secs`, but
//! with a single 8-byte value to store and no timer.
//!
//! The state is kept in microseconds so that limits above 1000 per second
//! still get a non-zero emission interval.

use serde::{Deserialize, Serialize};

use crate::kv::Kv;

/// `limit` requests per `period_secs`, with bursts up to `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests allowed per period (and the largest burst). `0` blocks all.
    pub limit: u32,
    /// The period, in seconds (at least 1).
    pub period_secs: u32,
}

/// The outcome of one check, with what the response headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may go on.
    pub allowed: bool,
    /// `RateLimit-Limit`.
    pub limit: u32,
    /// `RateLimit-Remaining`: requests that would still be allowed now.
    pub remaining: u32,
    /// `RateLimit-Reset`: seconds until the full limit is available again.
    pub reset_secs: u64,
    /// `Retry-After`, seconds; set only when denied.
    pub retry_after_secs: Option<u64>,
}

impl Decision {
    /// The response headers, names as in the IETF RateLimit fields draft.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![
            ("RateLimit-Limit", self.limit.to_string()),
            ("RateLimit-Remaining", self.remaining.to_string()),
            ("RateLimit-Reset", self.reset_secs.to_string()),
        ];
        if let Some(r) = self.retry_after_secs {
            h.push(("Retry-After", r.to_string()));
        }
        h
    }
}

const MICROS: i64 = 1_000_000;

fn ceil_secs(micros: i64) -> u64 {
    u64::try_from(micros.max(0))
        .unwrap_or(0)
        .div_ceil(MICROS as u64)
}

/// One GCRA step. `stored_tat_us` is the state read for the key (`None`
/// when absent); returns the decision and the state to store (`None` when
/// nothing changed: a denied request costs nothing).
pub fn decide(
    limit: &RateLimit,
    stored_tat_us: Option<i64>,
    now_ms: i64,
    cost: u32,
) -> (Decision, Option<i64>) {
    let period_us = i64::from(limit.period_secs.max(1)) * MICROS;
    let now = now_ms.saturating_mul(1000);
    if limit.limit == 0 {
        let wait = ceil_secs(period_us);
        return (
            Decision {
                allowed: false,
                limit: 0,
                remaining: 0,
                reset_secs: wait,
                retry_after_secs: Some(wait),
            },
            None,
        );
    }
    let interval = (period_us / i64::from(limit.limit)).max(1);
    let tolerance = interval * i64::from(limit.limit);
    let tat = stored_tat_us.unwrap_or(now).max(now);
    let new_tat = tat.saturating_add(interval.saturating_mul(i64::from(cost)));
    let allow_at = new_tat - tolerance;
    if now < allow_at {
        let decision = Decision {
            allowed: false,
            limit: limit.limit,
            remaining: 0,
            reset_secs: ceil_secs(tat - now),
            // A request costing more than the whole limit can never pass; say
            // "one period" rather than a time that would not help either.
            retry_after_secs: Some(ceil_secs((allow_at - now).min(tolerance)).max(1)),
        };
        return (decision, None);
    }
    let remaining = u32::try_from((now + tolerance - new_tat) / interval).unwrap_or(u32::MAX);
    let decision = Decision {
        allowed: true,
        limit: limit.limit,
        remaining: remaining.min(limit.limit),
        reset_secs: ceil_secs(new_tat - now),
        retry_after_secs: None,
    };
    (decision, Some(new_tat))
}

/// Checks and updates the limit for `key` in a [`Kv`]. The entry expires
/// when the bucket would be full again, so idle keys cost no storage.
pub async fn check<K: Kv>(
    kv: &K,
    key: &str,
    limit: &RateLimit,
    now_ms: i64,
    cost: u32,
) -> Result<Decision, K::Error> {
    let stored = kv
        .get(key)
        .await?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(i64::from_le_bytes);
    let (decision, new_state) = decide(limit, stored, now_ms, cost);
    if let Some(tat) = new_state {
        let ttl = ceil_secs(tat - now_ms.saturating_mul(1000)).max(1);
        kv.put(key, &tat.to_le_bytes(), ttl).await?;
    }
    Ok(decision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{MemoryKv, block_on};

    const T0: i64 = 1_795_701_600_000;

    fn run(limit: RateLimit, times_ms: &[i64]) -> Vec<Decision> {
        let mut state = None;
        times_ms
            .iter()
            .map(|&t| {
                let (d, s) = decide(&limit, state, t, 1);
                if s.is_some() {
                    state = s;
                }
                d
            })
            .collect()
    }

    #[test]
    fn a_full_bucket_allows_a_burst_of_limit_then_denies() {
        let d = run(
            RateLimit {
                limit: 3,
                period_secs: 60,
            },
            &[T0, T0, T0, T0],
        );
        assert_eq!(
            d.iter().map(|d| d.allowed).collect::<Vec<_>>(),
            [true, true, true, false]
        );
        assert_eq!(
            d.iter().map(|d| d.remaining).collect::<Vec<_>>(),
            [2, 1, 0, 0]
        );
        assert_eq!(d[3].retry_after_secs, Some(20)); // one emission interval
        assert_eq!(d[2].reset_secs, 60);
        assert_eq!(d[0].retry_after_secs, None);
    }

    #[test]
    fn tokens_come_back_one_interval_at_a_time() {
        let l = RateLimit {
            limit: 2,
            period_secs: 10,
        };
        let d = run(l, &[T0, T0, T0, T0 + 4_999, T0 + 5_000, T0 + 5_001]);
        assert_eq!(
            d.iter().map(|d| d.allowed).collect::<Vec<_>>(),
            [true, true, false, false, true, false]
        );
        assert_eq!(d[3].retry_after_secs, Some(1));
    }

    #[test]
    fn an_idle_key_refills_completely_and_no_further() {
        let l = RateLimit {
            limit: 5,
            period_secs: 1,
        };
        let d = run(l, &[T0, T0 + 3_600_000]);
        assert!(d[1].allowed);
        assert_eq!(d[1].remaining, 4);
    }

    #[test]
    fn a_denied_request_costs_nothing() {
        let l = RateLimit {
            limit: 1,
            period_secs: 10,
        };
        let (_, s) = decide(&l, None, T0, 1);
        let (d, s2) = decide(&l, s, T0 + 1000, 1);
        assert!(!d.allowed);
        assert_eq!(s2, None);
        assert!(decide(&l, s, T0 + 10_000, 1).0.allowed);
    }

    #[test]
    fn edge_cases() {
        let zero = decide(
            &RateLimit {
                limit: 0,
                period_secs: 30,
            },
            None,
            T0,
            1,
        )
        .0;
        assert!(!zero.allowed);
        assert_eq!(zero.retry_after_secs, Some(30));
        // Above 1000 per second the interval is still non-zero.
        let fast = RateLimit {
            limit: 100_000,
            period_secs: 1,
        };
        let times = vec![T0; 100_001];
        let d = run(fast, &times);
        assert!(d[99_999].allowed);
        assert!(!d[100_000].allowed);
        // A cost larger than the whole limit is denied with a bounded wait.
        let (big, _) = decide(
            &RateLimit {
                limit: 3,
                period_secs: 60,
            },
            None,
            T0,
            10,
        );
        assert!(!big.allowed);
        assert_eq!(big.retry_after_secs, Some(60));
        // A clock that goes backwards does not grant extra tokens.
        let l = RateLimit {
            limit: 1,
            period_secs: 60,
        };
        let (_, s) = decide(&l, None, T0, 1);
        assert!(!decide(&l, s, T0 - 30_000, 1).0.allowed);
        // period 0 is treated as 1 s rather than dividing by zero.
        assert!(
            decide(
                &RateLimit {
                    limit: 1,
                    period_secs: 0
                },
                None,
                T0,
                1
            )
            .0
            .allowed
        );
    }

    #[test]
    fn headers_follow_the_draft_names() {
        let (d, _) = decide(
            &RateLimit {
                limit: 1,
                period_secs: 60,
            },
            Some((T0 + 60_000) * 1000),
            T0,
            1,
        );
        let h = d.headers();
        assert_eq!(h[0], ("RateLimit-Limit", "1".to_owned()));
        assert_eq!(h[1], ("RateLimit-Remaining", "0".to_owned()));
        assert_eq!(h[3].0, "Retry-After");
    }

    #[test]
    fn kv_state_round_trips_and_expires_when_full() {
        let kv = MemoryKv::default();
        kv.set_now_ms(T0);
        let l = RateLimit {
            limit: 2,
            period_secs: 10,
        };
        assert!(block_on(check(&kv, "rl:c1", &l, T0, 1)).unwrap().allowed);
        assert_eq!(kv.ttl_of("rl:c1"), Some(5));
        assert!(block_on(check(&kv, "rl:c1", &l, T0, 1)).unwrap().allowed);
        assert!(!block_on(check(&kv, "rl:c1", &l, T0, 1)).unwrap().allowed);
        assert!(block_on(check(&kv, "rl:c2", &l, T0, 1)).unwrap().allowed);
        kv.set_now_ms(T0 + 10_000);
        assert!(
            block_on(check(&kv, "rl:c1", &l, T0 + 10_000, 1))
                .unwrap()
                .allowed
        );
    }
}
