//! Time, injected: policy code (leases, backoff, restart intensity) reads a
//! [`Clock`] so tests can run it on simulated time.
//!
//! The clock gives two readings, both in Unix milliseconds:
//!
//! - [`Clock::now_ms`], wall time, for what is stored or compared with
//!   another process: lease deadlines that must survive a daemon restart,
//!   records other daemons read, events for humans.
//! - [`Clock::steady_ms`], the wall time of the process's start advanced by
//!   the monotonic clock, for durations kept in memory only (a breaker's
//!   open period, the degrader's dwell, the restart window, how long a task
//!   has been silent). It never jumps when the system clock is set: a step
//!   forward must not make every busy task look stuck, nor a step back keep
//!   a breaker open for the length of the step. It reads as wall time so
//!   that the status can show it; after a step it differs from wall time by
//!   the step, until the daemon restarts.
//!
//! The clock never sleeps; async loops sleep with tokio, whose time tests
//! can pause.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub type UnixMillis = u64;

/// A source of wall and steady time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now, in Unix milliseconds: wall time, which jumps when the system
    /// clock is set.
    fn now_ms(&self) -> UnixMillis;

    /// Now on the steady clock (see the module's docs): never goes back
    /// nor jumps, for durations kept in memory only.
    fn steady_ms(&self) -> UnixMillis;

    /// The steady reading of wall time `wall` (a stored deadline compared
    /// with steady readings).
    fn steady_of(&self, wall: UnixMillis) -> UnixMillis {
        shift(wall, self.steady_ms(), self.now_ms())
    }

    /// The wall time of steady reading `steady`, for what leaves the
    /// daemon (status, metrics): readers compare it with their own wall
    /// clocks.
    fn wall_of(&self, steady: UnixMillis) -> UnixMillis {
        shift(steady, self.now_ms(), self.steady_ms())
    }
}

/// `at` moved from the clock reading `from` to the one reading `to`.
fn shift(at: UnixMillis, to: UnixMillis, from: UnixMillis) -> UnixMillis {
    let moved = i128::from(at) + i128::from(to) - i128::from(from);
    u64::try_from(moved.max(0)).unwrap_or(u64::MAX)
}

/// A shared clock.
pub type SharedClock = Arc<dyn Clock>;

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> UnixMillis {
        wall_now()
    }

    fn steady_ms(&self) -> UnixMillis {
        // One anchor per process, so that every reading agrees.
        static ANCHOR: OnceLock<(UnixMillis, Instant)> = OnceLock::new();
        let (wall, at) = ANCHOR.get_or_init(|| (wall_now(), Instant::now()));
        wall.saturating_add(u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX))
    }
}

fn wall_now() -> UnixMillis {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// The system clock, shared.
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// A clock that only moves when told to, for tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    steady: AtomicU64,
    /// Wall time minus steady time: what [`Self::set_wall`] moved.
    skew: AtomicI64,
}

impl ManualClock {
    /// A clock showing `start_ms` on both readings.
    pub fn new(start_ms: UnixMillis) -> Arc<Self> {
        Arc::new(Self {
            steady: AtomicU64::new(start_ms),
            skew: AtomicI64::new(0),
        })
    }

    /// Time passes: both readings move forward by `millis`.
    pub fn advance(&self, millis: u64) {
        self.steady.fetch_add(millis, Ordering::SeqCst);
    }

    /// The system clock is set, `millis` forward (or back when negative):
    /// only the wall reading moves.
    pub fn set_wall(&self, millis: i64) {
        self.skew.fetch_add(millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> UnixMillis {
        self.steady_ms()
            .saturating_add_signed(self.skew.load(Ordering::SeqCst))
    }

    fn steady_ms(&self) -> UnixMillis {
        self.steady.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(250);
        assert_eq!(clock.now_ms(), 1_250);
        assert!(SystemClock.now_ms() > 1_600_000_000_000);
    }

    #[test]
    fn setting_the_wall_clock_moves_only_the_wall_reading() {
        let clock = ManualClock::new(10_000_000);
        clock.set_wall(3_600_000);
        assert_eq!(clock.now_ms(), 13_600_000);
        assert_eq!(clock.steady_ms(), 10_000_000);
        // A stored deadline 5 s ahead in wall time is 5 s ahead in steady.
        assert_eq!(clock.steady_of(13_605_000), 10_005_000);
        // Set back by two hours, then a second passes.
        clock.set_wall(-7_200_000);
        clock.advance(1_000);
        assert_eq!(clock.now_ms(), 6_401_000);
        assert_eq!(clock.steady_ms(), 10_001_000);
        assert_eq!(clock.steady_of(6_406_000), 10_006_000);
        assert_eq!(clock.wall_of(10_006_000), 6_406_000);
    }

    #[test]
    fn the_steady_clock_starts_at_wall_time_and_never_goes_back() {
        let first = SystemClock.steady_ms();
        let wall = SystemClock.now_ms();
        assert!(first.abs_diff(wall) < 60_000, "{first} vs {wall}");
        let mut last = first;
        for _ in 0..1_000 {
            let now = SystemClock.steady_ms();
            assert!(now >= last);
            last = now;
        }
    }
}
