//! The gate in front of each agent: its circuit breaker decides whether a
//! leased task may go to a replica, and while the agent is unavailable
//! (breaker open, or failed after too many restarts) its fallback sends
//! the agent's tasks elsewhere: to the first available agent of its
//! `fallback` chain, else per its `fallback_policy`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde_json::json;

use super::{AgentRuntime, LEASE_MARGIN};
use crate::breaker::{BreakerState, Call, Transition, Verdict};
use crate::clock::UnixMillis;
use crate::config::FallbackPolicy;
use crate::degrade::{DegradationStatus, Level};
use crate::notify::{Event, EventKind};
use crate::queue::{AttemptEnd, AttemptOutcome, Lease, LeaseKey};
use crate::status::AgentState;

/// Which agents of this daemon are unavailable (fallback chains skip
/// them), and the fleet's degradation level. Agents this daemon does not
/// run count as available (another daemon runs them).
#[derive(Debug, Default)]
pub struct Availability {
    /// Breaker not closed, or failed.
    unavailable: Mutex<HashSet<String>>,
    /// The degrader's view, level included.
    degradation: Mutex<DegradationStatus>,
    /// Agents that another live daemon of the fleet runs healthily.
    elsewhere: Mutex<HashSet<String>>,
}

impl Availability {
    /// Whether `agent` may take tasks for others.
    pub fn is_available(&self, agent: &str) -> bool {
        !self
            .unavailable
            .lock()
            .expect("availability lock")
            .contains(agent)
            && !self.degraded(agent)
    }

    /// The degradation level.
    pub fn level(&self) -> Level {
        self.degradation.lock().expect("degradation lock").level
    }

    /// The degrader's view.
    pub fn degradation(&self) -> DegradationStatus {
        self.degradation.lock().expect("degradation lock").clone()
    }

    /// Publishes the degrader's view.
    pub fn set_degradation(&self, status: DegradationStatus) {
        *self.degradation.lock().expect("degradation lock") = status;
    }

    /// Records which agents other live daemons run healthily (breaker
    /// closed or off, a ready replica).
    pub fn set_available_elsewhere(&self, agents: HashSet<String>) {
        *self.elsewhere.lock().expect("elsewhere lock") = agents;
    }

    fn available_elsewhere(&self, agent: &str) -> bool {
        self.elsewhere
            .lock()
            .expect("elsewhere lock")
            .contains(agent)
    }

    /// Whether the degrader counts `agent` unavailable (including having
    /// had no ready replica for a while).
    fn degraded(&self, agent: &str) -> bool {
        self.degradation
            .lock()
            .expect("degradation lock")
            .unavailable
            .iter()
            .any(|name| name == agent)
    }

    fn set(&self, agent: &str, available: bool) {
        let mut unavailable = self.unavailable.lock().expect("availability lock");
        if available {
            unavailable.remove(agent);
        } else {
            unavailable.insert(agent.to_string());
        }
    }
}

/// What the leaser of an agent does now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Mode {
    /// Lease for replicas (and ahead) as usual.
    Normal,
    /// Half-open: lease at most this many probes, only for waiting
    /// replicas.
    Probing(u32),
    /// Unavailable: lease tasks to hand them to the fallback, for this
    /// reason.
    Diverting(String),
    /// Unavailable, and its tasks stay queued: lease nothing until
    /// about this time (Unix ms).
    Holding(UnixMillis),
}

/// Attempts handed towards replicas, by lease: the breaker's call (none
/// with the breaker off), when, and the task's type (for metrics).
#[derive(Debug, Default)]
pub(super) struct Calls {
    open: HashMap<LeaseKey, Open>,
    swept_ms: UnixMillis,
}

#[derive(Debug)]
struct Open {
    call: Option<Call>,
    at: UnixMillis,
    kind: String,
    /// Whether an earlier attempt of the task ran (one was charged): its
    /// reaching a replica is a redelivery. Attempts handed back unstarted
    /// (a lease held back, rerouted, or leased ahead and expired) are not.
    redelivered: bool,
    /// Its result is being validated and stored ([`Settling`]): the
    /// attempt is not lost, however long its gates take.
    settling: bool,
    /// When the sweep's clock for it started: when it was admitted, or
    /// when its settling ended without an outcome.
    sweep_from: UnixMillis,
}

/// An attempt whose result is being validated and stored: the sweep of
/// lost calls passes it by until this is dropped (its outcome told, or
/// the task settling it gone without one).
pub(super) struct Settling {
    key: LeaseKey,
    agent: Weak<AgentRuntime>,
}

impl Drop for Settling {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.upgrade() {
            let now = agent.clock.steady_ms();
            if let Some(open) = agent
                .calls
                .lock()
                .expect("calls lock")
                .open
                .get_mut(&self.key)
            {
                open.settling = false;
                open.sweep_from = now;
            }
        }
    }
}

/// How often calls that never reported back are looked for.
const SWEEP_EVERY_MS: UnixMillis = 1_000;

/// The metrics' `status` of an attempt the agent said cannot succeed
/// (an error with `retryable: false`, an exit code in
/// `fatal_exit_codes`): the task's fault, not the agent's.
pub const NOT_RETRYABLE: &str = "not_retryable";

/// A lease on its way from the leaser to a replica. If the replica is
/// gone before it takes it out (it crashed, or the daemon is stopping),
/// dropping this tells the breaker the call never happened; the lease
/// itself goes back to the queue through its guard.
pub(super) struct Handed {
    lease: Option<Lease>,
    agent: Weak<AgentRuntime>,
}

impl Handed {
    pub(super) fn new(lease: Lease, agent: Weak<AgentRuntime>) -> Self {
        Self {
            lease: Some(lease),
            agent,
        }
    }

    /// The lease, now the replica's to settle.
    pub(super) fn take(mut self) -> Lease {
        self.lease.take().expect("a handed lease is taken once")
    }
}

impl Drop for Handed {
    fn drop(&mut self) {
        if let Some(lease) = &self.lease
            && let Some(agent) = self.agent.upgrade()
        {
            agent.finish_call(&lease.key, AttemptOutcome::Released);
        }
    }
}

impl AgentRuntime {
    /// What the leaser should do at `now` (steady time: its `Holding`
    /// time is steady too).
    pub(super) fn mode(&self, now: UnixMillis) -> Mode {
        let failed = self.is_failed();
        let (state, open_until, transition) = {
            let mut breaker = self.breaker.lock().expect("breaker lock");
            let transition = breaker.advance(now);
            (breaker.state(now), breaker.open_until(), transition)
        };
        if let Some(transition) = transition {
            self.transitioned(&transition, now);
        }
        self.sweep_lost_calls(now);
        let why = if failed {
            let status = self.status.lock().expect("status lock");
            format!(
                "agent {} failed ({})",
                self.name,
                status.failure.as_deref().unwrap_or("too many restarts")
            )
        } else {
            match state {
                BreakerState::Closed => {
                    let level = self.availability.level();
                    let fallback_available = self
                        .config
                        .fallback
                        .iter()
                        .any(|agent| self.availability.is_available(agent));
                    if level.reroutes_unready()
                        && fallback_available
                        && self.availability.degraded(&self.name)
                    {
                        return Mode::Diverting(format!(
                            "agent {} has no ready replica, and degradation level {level} sends its tasks to its fallback",
                            self.name
                        ));
                    }
                    return Mode::Normal;
                }
                BreakerState::HalfOpen => {
                    let capacity = self.breaker.lock().expect("breaker lock").capacity(now);
                    return Mode::Probing(capacity);
                }
                BreakerState::Open => format!("the circuit breaker of agent {} is open", self.name),
            }
        };
        let recheck = now + 1_000;
        if self.availability.available_elsewhere(&self.name) {
            // Another daemon runs this agent healthily: leave its tasks
            // to that daemon rather than diverting the shared queue.
            return Mode::Holding(recheck);
        }
        let fallback_available = self
            .config
            .fallback
            .iter()
            .any(|agent| self.availability.is_available(agent));
        if fallback_available || self.config.fallback_policy != FallbackPolicy::QueueForRetry {
            return Mode::Diverting(why);
        }
        // Queued for retry: look again when probes may go, and at least
        // every second (a fallback agent may become available).
        Mode::Holding(open_until.map_or(recheck, |until| until.min(recheck)))
    }

    /// Asks the breaker to let `lease` through; false when it may not go
    /// to a replica now.
    pub(super) fn admit(&self, lease: &Lease) -> bool {
        let now = self.clock.steady_ms();
        let call = if self.config.breaker.enabled {
            let (call, transition) = self.breaker.lock().expect("breaker lock").admit(now);
            if let Some(transition) = transition {
                self.transitioned(&transition, now);
            }
            let Some(call) = call else {
                return false;
            };
            Some(call)
        } else {
            None
        };
        let kind = self.metrics.task_type(&lease.payload);
        self.calls.lock().expect("calls lock").open.insert(
            lease.key.clone(),
            Open {
                call,
                at: now,
                kind,
                redelivered: lease.charged > 1,
                settling: false,
                sweep_from: now,
            },
        );
        true
    }

    /// The attempts handed to this agent's replicas at least `age` ago
    /// and not settled yet (a result being validated excluded: it is
    /// settled by its own path).
    pub(super) fn running_attempts(&self, age: std::time::Duration) -> Vec<LeaseKey> {
        let now = self.clock.steady_ms();
        let age = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        self.calls
            .lock()
            .expect("calls lock")
            .open
            .iter()
            .filter(|(_, open)| !open.settling && now.saturating_sub(open.at) >= age)
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// The result of attempt `key` is being validated and stored: see
    /// [`Settling`].
    pub(super) fn settling(self: &Arc<Self>, key: &LeaseKey) -> Settling {
        if let Some(open) = self.calls.lock().expect("calls lock").open.get_mut(key) {
            open.settling = true;
        }
        Settling {
            key: key.clone(),
            agent: Arc::downgrade(self),
        }
    }

    /// The task of `key` reached a replica.
    pub(super) fn received(&self, key: &LeaseKey) {
        let (kind, redelivered) = match self.calls.lock().expect("calls lock").open.get(key) {
            Some(open) => (open.kind.clone(), open.redelivered),
            None => return,
        };
        self.metrics.received(&self.name, &kind, redelivered);
    }

    /// The task of `key` was admitted but never sent: forget it, as if it
    /// had not been admitted.
    pub(super) fn unsent(&self, key: &LeaseKey) {
        let removed = self.calls.lock().expect("calls lock").open.remove(key);
        if let Some(Open {
            call: Some(call), ..
        }) = removed
        {
            self.record(call, Verdict::Neutral);
        }
    }

    /// Tells the breaker and the metrics how the attempt `key` ended.
    pub(super) fn finish_call(&self, key: &LeaseKey, outcome: AttemptOutcome) {
        self.finish(
            key,
            outcome,
            Verdict::of(outcome, &self.config.breaker),
            Fault::Agent,
        );
    }

    /// An attempt that counts for neither the breaker nor the watchdog's
    /// error rate; the metrics count it. Such are:
    /// - a task that failed with others in one crash or kill of their
    ///   replica, after the first: one exit is one failure however many
    ///   tasks it held (otherwise one crash of a replica with
    ///   `concurrency = 8` would count 8, and could trip the error-rate
    ///   alarm on its own);
    /// - a result whose validation gates could not be run: the daemon's
    ///   trouble, not the agent's.
    pub(super) fn finish_call_uncounted(&self, key: &LeaseKey, outcome: AttemptOutcome) {
        self.finish(key, outcome, Verdict::Neutral, Fault::Uncounted);
    }

    /// An attempt that failed through the task's own fault (the agent said
    /// it cannot succeed: not retryable, a fatal exit code): neither the
    /// breaker nor the watchdog's error rate hold it against the agent,
    /// and the metrics count it as `not_retryable`.
    pub(super) fn finish_task_fault(&self, key: &LeaseKey, outcome: AttemptOutcome) {
        self.finish(key, outcome, Verdict::Neutral, Fault::Task);
    }

    fn finish(&self, key: &LeaseKey, outcome: AttemptOutcome, verdict: Verdict, fault: Fault) {
        let Some(open) = self.calls.lock().expect("calls lock").open.remove(key) else {
            return;
        };
        let task_fault = fault == Fault::Task;
        if fault != Fault::Uncounted {
            self.note_outcome(outcome, task_fault);
        }
        let now = self.clock.steady_ms();
        let seconds = now.saturating_sub(open.at) as f64 / 1000.0;
        let status = if task_fault && outcome != AttemptOutcome::Rejected {
            NOT_RETRYABLE
        } else {
            outcome.as_str()
        };
        self.metrics
            .attempt_ended(&self.name, &open.kind, status, seconds);
        if let Some(call) = open.call {
            self.record(call, verdict);
        }
    }

    fn record(&self, call: Call, verdict: Verdict) {
        let now = self.clock.steady_ms();
        let transition = self
            .breaker
            .lock()
            .expect("breaker lock")
            .record(call, verdict, now);
        if let Some(transition) = transition {
            self.transitioned(&transition, now);
        }
        if call.is_probe() {
            // A probe slot is free, or the breaker moved: the leaser may
            // be waiting for exactly this.
            self.gate_changed.notify_one();
        }
    }

    /// A call whose attempt never reported back (its lease vanished
    /// without an outcome) is forgotten once its attempt is surely over,
    /// so that neither a probe slot nor memory stays taken. One whose
    /// result is being validated is not lost (its gates may take hours).
    /// Looks at most once a second.
    fn sweep_lost_calls(&self, now: UnixMillis) {
        // Past the longest an attempt can take to end: its max_duration,
        // stopping the process, and margins.
        let over = self.config.timeouts.max_duration.get()
            + self.config.timeouts.stop_grace.get() * 2
            + LEASE_MARGIN * 2;
        let over = u64::try_from(over.as_millis()).unwrap_or(u64::MAX);
        let lost: Vec<LeaseKey> = {
            let mut calls = self.calls.lock().expect("calls lock");
            if now.saturating_sub(calls.swept_ms) < SWEEP_EVERY_MS {
                return;
            }
            calls.swept_ms = now;
            calls
                .open
                .iter()
                .filter(|(_, open)| !open.settling && now.saturating_sub(open.sweep_from) > over)
                .map(|(key, _)| key.clone())
                .collect()
        };
        for key in lost {
            tracing::warn!(agent = %self.name, task = %key, "a task's attempt never reported back to the circuit breaker; forgetting it");
            self.finish_call(&key, AttemptOutcome::Released);
        }
    }

    /// Logs a breaker transition, shows it in status and tells humans.
    pub(super) fn transitioned(&self, transition: &Transition, now: UnixMillis) {
        let (kind, what) = match transition.to {
            BreakerState::Open => (EventKind::BreakerOpened, "opened"),
            BreakerState::HalfOpen => (EventKind::BreakerHalfOpen, "is half-open"),
            BreakerState::Closed => (EventKind::BreakerClosed, "closed"),
        };
        self.notifier.send(
            Event::new(
                kind,
                self.clock.now_ms(),
                false,
                format!(
                    "circuit breaker of agent {} {what}: {}",
                    self.name, transition.reason
                ),
            )
            .agent(&self.name),
        );
        match transition.to {
            BreakerState::Open => {
                tracing::warn!(agent = %self.name, from = %transition.from, reason = %transition.reason, recovery_timeout = %self.config.breaker.recovery_timeout, "circuit breaker opened");
            }
            BreakerState::HalfOpen | BreakerState::Closed => {
                tracing::info!(agent = %self.name, from = %transition.from, to = %transition.to, reason = %transition.reason, "circuit breaker changed");
            }
        }
        self.refresh_breaker_status(now);
    }

    /// Copies the breaker's state into the agent's status, and its
    /// availability into the fleet's.
    pub(super) fn refresh_breaker_status(&self, now: UnixMillis) {
        let (state, open_until, opened, last) = {
            let breaker = self.breaker.lock().expect("breaker lock");
            (
                breaker.state(now),
                breaker.open_until(),
                breaker.times_opened(),
                breaker.last_transition().cloned(),
            )
        };
        let enabled = self.config.breaker.enabled;
        let failed = {
            let mut status = self.status.lock().expect("status lock");
            status.breaker.enabled = enabled;
            status.breaker.state = enabled.then_some(state);
            status.breaker.open_until_ms = open_until;
            status.breaker.times_opened = opened;
            status.breaker.last_transition = last;
            status.state == AgentState::Failed
        };
        // An open breaker whose recovery timeout has passed reads
        // half-open: the agent may take a rerouted task, which becomes its
        // probe (an agent used only as a fallback would never recover
        // otherwise).
        let available = !failed && (!enabled || state != BreakerState::Open);
        self.availability.set(&self.name, available);
    }

    /// Sends a task of this unavailable agent elsewhere: to the first
    /// available agent of its fallback chain, else per its fallback
    /// policy. `why` says why the agent is unavailable.
    pub(super) async fn divert(&self, mut lease: Lease, why: &str) {
        let key = lease.key.clone();
        let target = self
            .config
            .fallback
            .iter()
            .find(|agent| self.availability.is_available(agent));
        let result = if let Some(target) = target {
            let end = AttemptEnd::new(
                AttemptOutcome::Rerouted,
                None,
                format!("{why}; handed to fallback agent {target}"),
            );
            let result = self.queue.reroute(&key, target, end).await;
            if result.is_ok() {
                tracing::info!(agent = %self.name, task = %key, to = %target, "task handed to a fallback agent");
                self.status.lock().expect("status lock").diverted.rerouted += 1;
            }
            result
        } else {
            let policy = self.config.fallback_policy;
            let reason = format!("{why}; fallback_policy = {}", policy.as_str());
            match policy {
                FallbackPolicy::QueueForRetry => {
                    let end = AttemptEnd::new(AttemptOutcome::Released, None, &reason);
                    self.queue.release(&key, end).await
                }
                FallbackPolicy::EscalateToHuman => {
                    let end = AttemptEnd::new(AttemptOutcome::Escalated, None, &reason);
                    let result = self.queue.escalate(&key, &reason, end).await;
                    if result.is_ok() {
                        tracing::warn!(agent = %self.name, task = %key, %reason, "task escalated to a human");
                        self.notifier.send(
                            Event::new(
                                EventKind::Escalation,
                                self.clock.now_ms(),
                                true,
                                format!(
                                    "task {} of agent {} needs a human: {reason}; resolve with `flotilla escalations resolve {} --retry|--complete JSON|--drop`",
                                    key.task_id, self.name, key.task_id
                                ),
                            )
                            .agent(&self.name)
                            .task(&key.task_id),
                        );
                        // Metric first: whoever sees the status count can
                        // rely on the metric too.
                        self.metrics.escalated(&self.name);
                        self.status.lock().expect("status lock").diverted.escalated += 1;
                    }
                    result
                }
                FallbackPolicy::ProceedWithWarning => {
                    let end = AttemptEnd::new(AttemptOutcome::ProceededWithWarning, None, &reason);
                    let result = json!({
                        "proceeded_with_warning": true,
                        "agent": self.name,
                        "reason": why,
                    });
                    let acked = self.queue.ack(&key, &result, end).await;
                    if acked.is_ok() {
                        tracing::warn!(agent = %self.name, task = %key, %reason, "task completed without running: proceeded with warning");
                        self.status
                            .lock()
                            .expect("status lock")
                            .diverted
                            .proceeded_with_warning += 1;
                    }
                    acked.map(|_| ())
                }
            }
        };
        self.settle(&mut lease, result);
    }
}

/// How long the leaser of an unavailable agent waits for tasks to divert.
pub(super) const DIVERT_WAIT: Duration = Duration::from_secs(1);
/// Most tasks leased at once to divert.
pub(super) const DIVERT_BATCH: usize = 64;

/// Whose fault a failed attempt was, for the watchdog's error rate.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The agent's (or no failure).
    Agent,
    /// The task's own: not held against the agent.
    Task,
    /// Not counted: see [`AgentRuntime::finish_call_uncounted`].
    Uncounted,
}
