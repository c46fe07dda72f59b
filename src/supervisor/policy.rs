//! Restart policy: exponential restart delays that reset after a stable run,
//! and the restart intensity limit (too many restarts in a window → the
//! agent is failed). Pure state machines on the injected clock.

use std::collections::VecDeque;
use std::time::Duration;

use crate::clock::UnixMillis;
use crate::config::RestartConfig;

/// The delay before restart number `consecutive` (1 for the first crash
/// after a stable run): `initial_backoff * 2^(consecutive-1)`, capped.
pub fn restart_delay(config: &RestartConfig, consecutive: u32) -> Duration {
    let exponent = consecutive.saturating_sub(1).min(32);
    let delay = config
        .initial_backoff
        .get()
        .saturating_mul(1u32 << exponent.min(31));
    delay.min(config.max_backoff.get())
}

/// What the intensity limit says about one more restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Restart.
    Restart,
    /// Too many restarts in the window: give up on the agent.
    GiveUp {
        /// Restarts counted in the window, this one included.
        restarts: u32,
    },
}

/// Restart intensity across an agent's replicas: at most `max_restarts`
/// within `window`.
#[derive(Debug, Clone)]
pub struct Intensity {
    max_restarts: u32,
    window_ms: u64,
    recent: VecDeque<UnixMillis>,
}

impl Intensity {
    /// A tracker for `config`.
    pub fn new(config: &RestartConfig) -> Self {
        Self {
            max_restarts: config.max_restarts,
            window_ms: u64::try_from(config.window.get().as_millis()).unwrap_or(u64::MAX),
            recent: VecDeque::new(),
        }
    }

    /// Records a restart at `now` and says whether it may happen.
    pub fn record(&mut self, now: UnixMillis) -> Verdict {
        while let Some(oldest) = self.recent.front() {
            if now.saturating_sub(*oldest) >= self.window_ms {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        self.recent.push_back(now);
        let restarts = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        if restarts > self.max_restarts {
            Verdict::GiveUp { restarts }
        } else {
            Verdict::Restart
        }
    }
}

/// A replica's crash streak: the consecutive count resets after a run of at
/// least `reset_after`.
#[derive(Debug, Clone, Default)]
pub struct Streak {
    consecutive: u32,
}

impl Streak {
    /// Records a crash after a run of `ran_for`; returns the restart delay.
    pub fn crashed(&mut self, config: &RestartConfig, ran_for: Duration) -> Duration {
        if ran_for >= config.reset_after.get() {
            self.consecutive = 0;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        restart_delay(config, self.consecutive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::config::HumanDuration;

    fn config() -> RestartConfig {
        RestartConfig {
            initial_backoff: HumanDuration::millis(100),
            max_backoff: HumanDuration::secs(2),
            reset_after: HumanDuration::secs(60),
            max_restarts: 3,
            window: HumanDuration::secs(10),
        }
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        let delays: Vec<u128> = (1..=7)
            .map(|n| restart_delay(&config(), n).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(restart_delay(&config(), u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn streak_resets_after_a_stable_run() {
        let mut streak = Streak::default();
        let short = Duration::from_secs(1);
        assert_eq!(streak.crashed(&config(), short).as_millis(), 100);
        assert_eq!(streak.crashed(&config(), short).as_millis(), 200);
        assert_eq!(streak.crashed(&config(), short).as_millis(), 400);
        assert_eq!(
            streak
                .crashed(&config(), Duration::from_secs(61))
                .as_millis(),
            100
        );
    }

    #[test]
    fn intensity_gives_up_within_the_window_only() {
        let clock = ManualClock::new(0);
        let mut intensity = Intensity::new(&config());
        for _ in 0..3 {
            assert_eq!(intensity.record(clock.now_ms()), Verdict::Restart);
            clock.advance(1_000);
        }
        assert_eq!(
            intensity.record(clock.now_ms()),
            Verdict::GiveUp { restarts: 4 }
        );
        // Spread out over more than the window, the same count is fine.
        let mut intensity = Intensity::new(&config());
        for _ in 0..20 {
            assert_eq!(intensity.record(clock.now_ms()), Verdict::Restart);
            clock.advance(4_000);
        }
    }
}
