//! Retry delays for failed attempts: a pure function of the backoff policy,
//! the attempt number and a random source.
//!
//! It never sleeps and never reads the time; the dispatcher turns its answer
//! into a `nak` delay.

use std::time::Duration;

use rand::Rng;

use crate::config::Backoff;

/// Longest delay an agent may ask for with `retry_after_ms`; longer asks are
/// cut to this so that a confused agent cannot park a task for years.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The delay before retry number `retry` (1 for the first retry), at least
/// `retry_after` when the agent asked for one.
pub fn delay(
    backoff: &Backoff,
    retry: u32,
    retry_after: Option<Duration>,
    rng: &mut impl Rng,
) -> Duration {
    let retry = retry.max(1);
    let planned = match backoff {
        Backoff::List(delays) => {
            let index = usize::try_from(retry - 1)
                .unwrap_or(usize::MAX)
                .min(delays.len().saturating_sub(1));
            delays
                .get(index)
                .map(|delay| delay.get())
                .unwrap_or_default()
        }
        Backoff::Exponential(exponential) => {
            let initial = exponential.initial.get().as_secs_f64();
            let max = exponential.max.get().as_secs_f64();
            let exponent = i32::try_from(retry - 1).unwrap_or(i32::MAX).min(1024);
            let base = (initial * exponential.multiplier.powi(exponent)).min(max);
            let spread = base * exponential.jitter;
            // Drawn within the cap rather than clamped to it: clamped, half
            // the delays at the cap would all be exactly `max`, and tasks
            // failing since one outage would retry in step.
            let jittered = if spread > 0.0 {
                rng.random_range((base - spread).max(0.0)..=(base + spread).min(max))
            } else {
                base
            };
            Duration::from_secs_f64(jittered.clamp(0.0, max))
        }
    };
    match retry_after {
        Some(asked) => planned.max(asked.min(MAX_RETRY_AFTER)),
        None => planned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ExponentialBackoff, HumanDuration};
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn list_backoff_repeats_its_last_delay() {
        let backoff = Backoff::List(vec![HumanDuration::secs(1), HumanDuration::secs(5)]);
        let mut rng = SmallRng::seed_from_u64(1);
        let delays: Vec<u64> = (1..=4)
            .map(|n| delay(&backoff, n, None, &mut rng).as_secs())
            .collect();
        assert_eq!(delays, [1, 5, 5, 5]);
    }

    #[test]
    fn exponential_backoff_stays_within_jitter_and_cap() {
        // Property: for every seed and retry number, the delay lies within
        // ±jitter of min(initial * multiplier^(n-1), max) and never above max.
        let exponential = ExponentialBackoff {
            initial: HumanDuration::millis(100),
            max: HumanDuration::secs(10),
            multiplier: 2.0,
            jitter: 0.25,
        };
        let backoff = Backoff::Exponential(exponential);
        for seed in 0..200 {
            let mut rng = SmallRng::seed_from_u64(seed);
            for retry in 1..40 {
                let got = delay(&backoff, retry, None, &mut rng).as_secs_f64();
                let base = (0.1 * 2f64.powi(retry as i32 - 1)).min(10.0);
                assert!(
                    got >= base * 0.75 - 1e-9 && got <= (base * 1.25).min(10.0) + 1e-9,
                    "retry {retry}: {got} vs {base}"
                );
            }
        }
    }

    #[test]
    fn delays_at_the_cap_stay_spread() {
        let backoff = Backoff::Exponential(ExponentialBackoff {
            initial: HumanDuration::secs(1),
            max: HumanDuration::secs(10),
            multiplier: 2.0,
            jitter: 0.2,
        });
        let mut rng = SmallRng::seed_from_u64(7);
        let delays: Vec<Duration> = (0..1000)
            .map(|_| delay(&backoff, 30, None, &mut rng))
            .collect();
        let at_max = delays
            .iter()
            .filter(|delay| **delay == Duration::from_secs(10))
            .count();
        assert!(at_max < 10, "{at_max} of 1000 delays exactly at the cap");
        assert!(
            delays
                .iter()
                .all(|delay| *delay >= Duration::from_secs(8) && *delay <= Duration::from_secs(10))
        );
        let below_nine = delays
            .iter()
            .filter(|delay| **delay < Duration::from_secs(9))
            .count();
        assert!((350..650).contains(&below_nine), "{below_nine}");
    }

    #[test]
    fn retry_after_is_honoured_but_bounded() {
        let backoff = Backoff::List(vec![HumanDuration::secs(1)]);
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(
            delay(&backoff, 1, Some(Duration::from_secs(30)), &mut rng),
            Duration::from_secs(30)
        );
        assert_eq!(
            delay(&backoff, 1, Some(Duration::from_millis(10)), &mut rng),
            Duration::from_secs(1)
        );
        assert_eq!(
            delay(
                &backoff,
                1,
                Some(Duration::from_secs(u64::MAX / 4)),
                &mut rng
            ),
            MAX_RETRY_AFTER
        );
    }
}
