//! The circuit breaker in front of each agent: a small state machine on
//! injected time that decides whether the agent gets work.
//!
//! ```text
//!   Closed ──(failure_threshold consecutive failures, or failure rate over
//!      ▲      the window above failure_rate with at least min_calls)──► Open
//!      │                                                                 │
//!      │ all probes succeeded            recovery_timeout has passed     │
//!      │                                                                 ▼
//!      └──────────────────────────── HalfOpen ◄──────────────────────────┘
//!                                      │ a probe failed: Open again,
//!                                      └ recovery timer restarted
//! ```
//!
//! In HalfOpen at most `half_open_probes` calls are admitted; others wait.
//! Every admitted call carries the breaker's epoch (bumped by each
//! transition), so a late result of a call admitted under an earlier state
//! never moves the breaker: only probes decide HalfOpen, and results that
//! arrive while Open are ignored.
//!
//! The breaker never sleeps and never reads a clock itself: callers pass
//! the time, so tests run every transition on simulated time.

use std::collections::VecDeque;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::clock::UnixMillis;
use crate::config::{BreakerConfig, FailureKind};
use crate::queue::AttemptOutcome;

/// Buckets of the sliding failure-rate window.
const BUCKETS: u64 = 10;

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// The agent gets work.
    Closed,
    /// The agent gets no work until the recovery timeout has passed.
    Open,
    /// A limited number of probe tasks are sent; the rest wait.
    HalfOpen,
}

impl BreakerState {
    /// Its name in logs, JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an admitted call ended, as the breaker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It worked.
    Success,
    /// It failed in a way the breaker counts.
    Failure,
    /// It ended without telling anything about the agent's health (handed
    /// back at shutdown, or a failure kind the config does not count).
    Neutral,
}

impl Verdict {
    /// How the breaker configured by `config` sees an attempt that ended
    /// with `outcome`.
    pub fn of(outcome: AttemptOutcome, config: &BreakerConfig) -> Self {
        let kind = match outcome {
            AttemptOutcome::Completed | AttemptOutcome::ProceededWithWarning => {
                return Self::Success;
            }
            AttemptOutcome::Crashed | AttemptOutcome::MemoryLimit => FailureKind::Crash,
            AttemptOutcome::ProgressTimeout | AttemptOutcome::MaxDuration => FailureKind::Timeout,
            AttemptOutcome::Error => FailureKind::Error,
            AttemptOutcome::Rejected | AttemptOutcome::ValidationFailed => FailureKind::Validation,
            AttemptOutcome::LeaseExpired
            | AttemptOutcome::DaemonRestart
            | AttemptOutcome::Released
            | AttemptOutcome::Rerouted
            | AttemptOutcome::Escalated
            | AttemptOutcome::Cancelled => return Self::Neutral,
        };
        if config.failures.contains(&kind) {
            Self::Failure
        } else {
            Self::Neutral
        }
    }
}

/// A call the breaker admitted; hand it back with its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    epoch: u64,
    probe: bool,
}

impl Call {
    /// Whether this call is a HalfOpen probe.
    pub fn is_probe(self) -> bool {
        self.probe
    }
}

/// A change of state, for logs, status and notifications.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Transition {
    /// The state left.
    pub from: BreakerState,
    /// The state entered.
    pub to: BreakerState,
    /// When.
    pub at_ms: UnixMillis,
    /// Why, in words.
    pub reason: String,
}

/// Calls and failures of one slice of the sliding window.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    start_ms: UnixMillis,
    calls: u32,
    failures: u32,
}

/// A breaker for one agent.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    epoch: u64,
    /// Consecutive failures while Closed.
    consecutive: u32,
    /// Recent calls while Closed, oldest first, at most [`BUCKETS`] + 1.
    window: VecDeque<Bucket>,
    /// When an Open breaker may let probes through.
    open_until_ms: UnixMillis,
    /// Probes admitted and not yet ended, and probes that succeeded, in
    /// the current HalfOpen epoch.
    probes_out: u32,
    probes_ok: u32,
    last: Option<Transition>,
    opened: u64,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: BreakerState::Closed,
            epoch: 0,
            consecutive: 0,
            window: VecDeque::new(),
            open_until_ms: 0,
            probes_out: 0,
            probes_ok: 0,
            last: None,
            opened: 0,
        }
    }

    /// Its state as of `now`: an Open breaker whose recovery timeout has
    /// passed reads as HalfOpen (it becomes so at the next [`Self::admit`]).
    pub fn state(&self, now: UnixMillis) -> BreakerState {
        if self.state == BreakerState::Open && now >= self.open_until_ms {
            BreakerState::HalfOpen
        } else {
            self.state
        }
    }

    /// When an Open breaker lets its first probe through.
    pub fn open_until(&self) -> Option<UnixMillis> {
        (self.state == BreakerState::Open).then_some(self.open_until_ms)
    }

    /// The last transition.
    pub fn last_transition(&self) -> Option<&Transition> {
        self.last.as_ref()
    }

    /// Times it opened.
    pub fn times_opened(&self) -> u64 {
        self.opened
    }

    /// Whether the breaker lets no work through at `now` (open, and not
    /// yet due for probes).
    pub fn is_open(&self, now: UnixMillis) -> bool {
        self.state(now) == BreakerState::Open
    }

    /// How many calls [`Self::admit`] would admit now (`u32::MAX` when
    /// closed).
    pub fn capacity(&self, now: UnixMillis) -> u32 {
        match self.state(now) {
            BreakerState::Closed => u32::MAX,
            BreakerState::Open => 0,
            BreakerState::HalfOpen if self.state == BreakerState::Open => {
                self.config.half_open_probes
            }
            BreakerState::HalfOpen => self.probes_left(),
        }
    }

    fn probes_left(&self) -> u32 {
        self.config
            .half_open_probes
            .saturating_sub(self.probes_out + self.probes_ok)
    }

    /// Asks to send one call at `now`. Returns the call when admitted, and
    /// the transition it caused (Open → HalfOpen once the recovery timeout
    /// has passed).
    pub fn admit(&mut self, now: UnixMillis) -> (Option<Call>, Option<Transition>) {
        let transition = self.advance(now);
        let call = match self.state {
            BreakerState::Closed => Some(Call {
                epoch: self.epoch,
                probe: false,
            }),
            BreakerState::Open => None,
            BreakerState::HalfOpen => (self.probes_left() > 0).then(|| {
                self.probes_out += 1;
                Call {
                    epoch: self.epoch,
                    probe: true,
                }
            }),
        };
        (call, transition)
    }

    /// Makes an Open breaker whose recovery timeout has passed HalfOpen at
    /// `now`, as the next [`Self::admit`] would: so that the change is
    /// logged and told when it happens, not when the next task comes.
    /// Returns the transition, if any.
    pub fn advance(&mut self, now: UnixMillis) -> Option<Transition> {
        (self.state == BreakerState::Open && now >= self.open_until_ms).then(|| {
            self.enter(
                BreakerState::HalfOpen,
                now,
                format!(
                    "recovery_timeout = {} passed; sending up to {} probe(s)",
                    self.config.recovery_timeout, self.config.half_open_probes
                ),
            )
        })
    }

    /// Records how `call` ended at `now`; returns the transition it caused.
    pub fn record(&mut self, call: Call, verdict: Verdict, now: UnixMillis) -> Option<Transition> {
        if call.epoch != self.epoch {
            // Admitted under an earlier state: it says nothing about now.
            return None;
        }
        match self.state {
            BreakerState::Closed => self.record_closed(verdict, now),
            // Only calls of an earlier epoch end while Open.
            BreakerState::Open => None,
            BreakerState::HalfOpen => {
                self.probes_out = self.probes_out.saturating_sub(1);
                match verdict {
                    // The probe's slot is free for another probe.
                    Verdict::Neutral => None,
                    Verdict::Failure => Some(self.open(now, "a probe failed".into())),
                    Verdict::Success => {
                        self.probes_ok += 1;
                        (self.probes_ok >= self.config.half_open_probes).then(|| {
                            self.enter(
                                BreakerState::Closed,
                                now,
                                format!("{} probe(s) succeeded", self.probes_ok),
                            )
                        })
                    }
                }
            }
        }
    }

    /// Opens the breaker at once (e.g. the fleet watchdog saw too many
    /// errors); returns the transition unless it was open already.
    pub fn trip(&mut self, now: UnixMillis, reason: String) -> Option<Transition> {
        (self.state != BreakerState::Open).then(|| self.open(now, reason))
    }

    fn record_closed(&mut self, verdict: Verdict, now: UnixMillis) -> Option<Transition> {
        let failed = match verdict {
            Verdict::Neutral => return None,
            Verdict::Success => false,
            Verdict::Failure => true,
        };
        self.slide(now);
        let width = self.bucket_ms();
        match self.window.back_mut() {
            Some(bucket) if now < bucket.start_ms + width => {
                bucket.calls += 1;
                bucket.failures += u32::from(failed);
            }
            _ => self.window.push_back(Bucket {
                start_ms: now - now % width,
                calls: 1,
                failures: u32::from(failed),
            }),
        }
        if !failed {
            self.consecutive = 0;
            return None;
        }
        self.consecutive += 1;
        let threshold = self.config.failure_threshold;
        if self.consecutive >= threshold {
            return Some(self.open(
                now,
                format!("{threshold} consecutive failures (failure_threshold = {threshold})"),
            ));
        }
        let (calls, failures) = self
            .window
            .iter()
            .fold((0u32, 0u32), |(c, f), b| (c + b.calls, f + b.failures));
        let rate = f64::from(failures) / f64::from(calls.max(1));
        if calls >= self.config.min_calls && rate > self.config.failure_rate {
            return Some(self.open(
                now,
                format!(
                    "{failures} of the last {calls} calls failed within {} ({:.0}% > failure_rate = {:.0}%)",
                    self.config.window,
                    rate * 100.0,
                    self.config.failure_rate * 100.0
                ),
            ));
        }
        None
    }

    fn bucket_ms(&self) -> UnixMillis {
        (self.config.window.as_millis() / BUCKETS).max(1)
    }

    /// Drops buckets that ended before the window.
    fn slide(&mut self, now: UnixMillis) {
        let window = self.config.window.as_millis();
        let width = self.bucket_ms();
        while self
            .window
            .front()
            .is_some_and(|bucket| bucket.start_ms + width + window <= now)
        {
            self.window.pop_front();
        }
    }

    fn open(&mut self, now: UnixMillis, reason: String) -> Transition {
        self.open_until_ms = now.saturating_add(self.config.recovery_timeout.as_millis());
        self.opened += 1;
        self.enter(BreakerState::Open, now, reason)
    }

    fn enter(&mut self, to: BreakerState, now: UnixMillis, reason: String) -> Transition {
        let transition = Transition {
            from: self.state,
            to,
            at_ms: now,
            reason,
        };
        self.state = to;
        self.epoch += 1;
        self.consecutive = 0;
        self.window.clear();
        self.probes_out = 0;
        self.probes_ok = 0;
        self.last = Some(transition.clone());
        transition
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng as _, SeedableRng as _};

    use super::*;
    use crate::config::units::HumanDuration;

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            failure_rate: 0.5,
            window: HumanDuration::secs(10),
            min_calls: 6,
            recovery_timeout: HumanDuration::secs(30),
            half_open_probes: 1,
            ..BreakerConfig::default()
        }
    }

    fn call(breaker: &mut Breaker, now: UnixMillis) -> Call {
        breaker.admit(now).0.expect("admitted")
    }

    fn fail(breaker: &mut Breaker, now: UnixMillis) -> Option<Transition> {
        let call = call(breaker, now);
        breaker.record(call, Verdict::Failure, now)
    }

    fn succeed(breaker: &mut Breaker, now: UnixMillis) -> Option<Transition> {
        let call = call(breaker, now);
        breaker.record(call, Verdict::Success, now)
    }

    #[test]
    fn consecutive_failures_open_it_and_a_success_resets_the_count() {
        let mut breaker = Breaker::new(config());
        assert!(fail(&mut breaker, 0).is_none());
        assert!(fail(&mut breaker, 1).is_none());
        assert!(succeed(&mut breaker, 2).is_none());
        assert!(fail(&mut breaker, 3).is_none());
        assert!(fail(&mut breaker, 4).is_none());
        let opened = fail(&mut breaker, 5).expect("third failure in a row opens");
        assert_eq!(
            (opened.from, opened.to),
            (BreakerState::Closed, BreakerState::Open)
        );
        assert!(opened.reason.contains("3 consecutive"), "{}", opened.reason);
        assert_eq!(breaker.state(5), BreakerState::Open);
        assert_eq!(breaker.admit(5).0, None);
        assert_eq!(breaker.capacity(5), 0);
        assert_eq!(breaker.open_until(), Some(30_005));
    }

    #[test]
    fn an_idle_open_breaker_turns_half_open_on_time() {
        let mut breaker = Breaker::new(config());
        for now in 0..3 {
            fail(&mut breaker, now);
        }
        assert_eq!(breaker.advance(30_001), None, "not yet");
        let half = breaker.advance(30_002).expect("recovery timeout passed");
        assert_eq!(
            (half.from, half.to, half.at_ms),
            (BreakerState::Open, BreakerState::HalfOpen, 30_002)
        );
        assert_eq!(breaker.advance(30_003), None, "once");
        let (probe, again) = breaker.admit(30_004);
        assert!(probe.expect("a probe goes").is_probe());
        assert_eq!(again, None, "admit does not repeat it");
    }

    #[test]
    fn the_failure_rate_opens_it_once_enough_calls_were_seen() {
        let mut breaker = Breaker::new(BreakerConfig {
            failure_threshold: 100,
            ..config()
        });
        // 2 of 4 failed: rate 50%, but fewer than min_calls = 6.
        for (now, ok) in [(0, true), (1, false), (2, true), (3, false)] {
            let call = call(&mut breaker, now);
            let verdict = if ok {
                Verdict::Success
            } else {
                Verdict::Failure
            };
            assert!(breaker.record(call, verdict, now).is_none());
        }
        assert!(succeed(&mut breaker, 4).is_none());
        // 3 of 6 = 50% is not above 50%; 4 of 7 is.
        assert!(fail(&mut breaker, 5).is_none());
        let opened = fail(&mut breaker, 6).expect("4 of 7 failed");
        assert!(
            opened.reason.contains("4 of the last 7"),
            "{}",
            opened.reason
        );
    }

    #[test]
    fn calls_older_than_the_window_no_longer_count() {
        let mut breaker = Breaker::new(BreakerConfig {
            failure_threshold: 100,
            ..config()
        });
        // Half of ten calls failed: not above failure_rate.
        for now in 0..5 {
            succeed(&mut breaker, now);
            assert!(fail(&mut breaker, now).is_none());
        }
        // 20 s later the ten old calls are out of the 10 s window: four
        // failures in a row are 4 calls, fewer than min_calls.
        for now in 20_000..20_004 {
            assert!(fail(&mut breaker, now).is_none());
        }
        assert_eq!(breaker.state(20_004), BreakerState::Closed);
        assert!(breaker.window.len() <= BUCKETS as usize + 1);
    }

    #[test]
    fn after_the_recovery_timeout_exactly_the_configured_probes_go_out() {
        for probes in [1u32, 3] {
            let mut breaker = Breaker::new(BreakerConfig {
                half_open_probes: probes,
                ..config()
            });
            for now in 0..3 {
                fail(&mut breaker, now);
            }
            assert_eq!(breaker.admit(29_999).0, None, "still open");
            let (first, transition) = breaker.admit(30_002);
            let transition = transition.expect("Open → HalfOpen");
            assert_eq!(transition.to, BreakerState::HalfOpen);
            let mut admitted = vec![first.expect("first probe")];
            // Many callers at once: only `probes` get through.
            for _ in 0..10 {
                if let (Some(call), None) = breaker.admit(30_003) {
                    admitted.push(call);
                }
            }
            assert_eq!(admitted.len(), probes as usize);
            assert!(admitted.iter().all(|call| call.is_probe()));
            assert_eq!(breaker.capacity(30_003), 0);
            // All probes succeed: closed.
            let mut closed = None;
            for call in admitted {
                closed = breaker.record(call, Verdict::Success, 30_010);
            }
            let closed = closed.expect("last probe closes it");
            assert_eq!(
                (closed.from, closed.to),
                (BreakerState::HalfOpen, BreakerState::Closed)
            );
            assert!(succeed(&mut breaker, 30_011).is_none());
        }
    }

    #[test]
    fn racing_callers_get_exactly_the_configured_probes() {
        use std::sync::{Arc, Barrier, Mutex};
        for probes in [1u32, 2, 5] {
            let breaker = Arc::new(Mutex::new(Breaker::new(BreakerConfig {
                half_open_probes: probes,
                ..config()
            })));
            for now in 0..3 {
                fail(&mut breaker.lock().unwrap(), now);
            }
            let start = Arc::new(Barrier::new(16));
            let callers: Vec<_> = (0..16)
                .map(|_| {
                    let breaker = breaker.clone();
                    let start = start.clone();
                    std::thread::spawn(move || {
                        start.wait();
                        (0..10)
                            .filter(|_| breaker.lock().unwrap().admit(40_000).0.is_some())
                            .count()
                    })
                })
                .collect();
            let admitted: usize = callers.into_iter().map(|c| c.join().unwrap()).sum();
            assert_eq!(admitted, probes as usize);
        }
    }

    #[test]
    fn a_failed_probe_reopens_it_and_restarts_the_timer() {
        let mut breaker = Breaker::new(config());
        for now in 0..3 {
            fail(&mut breaker, now);
        }
        let probe = call(&mut breaker, 40_000);
        let reopened = breaker
            .record(probe, Verdict::Failure, 41_000)
            .expect("reopens");
        assert_eq!(
            (reopened.from, reopened.to),
            (BreakerState::HalfOpen, BreakerState::Open)
        );
        assert_eq!(breaker.open_until(), Some(71_000));
        assert_eq!(breaker.admit(70_999).0, None);
        assert!(breaker.admit(71_000).0.is_some());
        assert_eq!(breaker.times_opened(), 2);
    }

    #[test]
    fn a_neutral_probe_frees_its_slot() {
        let mut breaker = Breaker::new(config());
        for now in 0..3 {
            fail(&mut breaker, now);
        }
        let probe = call(&mut breaker, 30_002);
        assert_eq!(breaker.admit(30_003).0, None);
        assert!(breaker.record(probe, Verdict::Neutral, 30_004).is_none());
        assert!(breaker.admit(30_005).0.is_some(), "another probe may go");
    }

    #[test]
    fn late_results_of_earlier_calls_do_not_move_it() {
        let mut breaker = Breaker::new(config());
        let slow = call(&mut breaker, 0);
        for now in 1..4 {
            fail(&mut breaker, now);
        }
        // A call admitted while closed succeeds while open: still open.
        assert!(breaker.record(slow, Verdict::Success, 5).is_none());
        assert_eq!(breaker.state(5), BreakerState::Open);
        // Nor can it close a half-open breaker.
        let probe = call(&mut breaker, 30_003);
        assert!(breaker.record(slow, Verdict::Success, 30_004).is_none());
        assert_eq!(breaker.state(30_004), BreakerState::HalfOpen);
        assert!(breaker.record(probe, Verdict::Success, 30_005).is_some());
    }

    #[test]
    fn trip_opens_a_closed_breaker() {
        let mut breaker = Breaker::new(config());
        let opened = breaker.trip(100, "error rate 40%".into()).expect("opens");
        assert_eq!(opened.reason, "error rate 40%");
        assert!(breaker.is_open(100));
        assert!(breaker.trip(200, "again".into()).is_none());
    }

    #[test]
    fn what_counts_as_a_failure_is_configurable() {
        let only_crashes = BreakerConfig {
            failures: vec![FailureKind::Crash],
            ..config()
        };
        assert_eq!(
            Verdict::of(AttemptOutcome::Crashed, &only_crashes),
            Verdict::Failure
        );
        assert_eq!(
            Verdict::of(AttemptOutcome::Error, &only_crashes),
            Verdict::Neutral
        );
        assert_eq!(
            Verdict::of(AttemptOutcome::ProgressTimeout, &config()),
            Verdict::Failure
        );
        assert_eq!(
            Verdict::of(AttemptOutcome::Released, &config()),
            Verdict::Neutral
        );
        assert_eq!(
            Verdict::of(AttemptOutcome::Completed, &only_crashes),
            Verdict::Success
        );
    }

    /// Property: under any interleaving of admissions, results and time,
    /// an Open breaker admits nothing before its recovery time, and a
    /// HalfOpen one never has more than `half_open_probes` probes out.
    #[test]
    fn it_never_admits_work_while_open() {
        for seed in 0..300u64 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let probes = rng.random_range(1..4);
            let mut breaker = Breaker::new(BreakerConfig {
                failure_threshold: rng.random_range(1..6),
                min_calls: rng.random_range(1..10),
                failure_rate: rng.random_range(0.1..1.0),
                half_open_probes: probes,
                ..config()
            });
            let mut now: UnixMillis = 0;
            let mut out: Vec<Call> = Vec::new();
            for _ in 0..500 {
                now += rng.random_range(0..3_000);
                if rng.random_bool(0.5) {
                    let was = breaker.state;
                    let until = breaker.open_until_ms;
                    let (call, _) = breaker.admit(now);
                    if was == BreakerState::Open && now < until {
                        assert_eq!(call, None, "seed {seed}: admitted while open");
                    }
                    if let Some(call) = call {
                        out.push(call);
                    }
                    let probes_out = out
                        .iter()
                        .filter(|c| c.probe && c.epoch == breaker.epoch)
                        .count();
                    assert!(
                        probes_out <= probes as usize,
                        "seed {seed}: {probes_out} probes out of {probes}"
                    );
                } else if !out.is_empty() {
                    let call = out.swap_remove(rng.random_range(0..out.len()));
                    let verdict = match rng.random_range(0..3) {
                        0 => Verdict::Success,
                        1 => Verdict::Failure,
                        _ => Verdict::Neutral,
                    };
                    breaker.record(call, verdict, now);
                }
                if breaker.state == BreakerState::Open {
                    assert_eq!(
                        breaker.capacity(now.min(breaker.open_until_ms.saturating_sub(1))),
                        0
                    );
                }
            }
        }
    }
}
