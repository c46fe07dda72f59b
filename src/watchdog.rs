//! The fleet watchdog: what one agent's supervisor cannot see. Every
//! `[watchdog] interval` it looks at each agent of the daemon and acts:
//!
//! - **scale up**: more than `queue_depth` tasks queued for `scale_up_after`
//!   → one replica more, up to `replicas.max` (then again after another
//!   `scale_up_after`);
//! - **scale down**: nothing queued and no task running for
//!   `scale_down_after` → one idle replica less, down to `replicas.min`;
//! - **restart**: a replica whose task made no progress for `stuck_after`
//!   → restarted, its task retried;
//! - **open the breaker**: more than `error_rate` of the attempts within
//!   `error_window` failed (at least `min_calls` attempts) → the breaker
//!   opens and humans are told the rate.
//!
//! [`Watchdog`] decides on passed-in time and observations (tested on
//! simulated time); [`run`] observes the agents and carries the actions
//! out. Every action is logged, counted
//! (`flotilla_watchdog_actions_total`), kept in the agent's status and
//! sent as an event.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

use crate::clock::{SharedClock, UnixMillis};
use crate::config::{Thresholds, WatchdogConfig};
use crate::dispatch::AgentRuntime;
use crate::notify::{Event, EventKind, Notifier};
use crate::store::Store;

/// One replica as the watchdog sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaView {
    /// Its index.
    pub index: u32,
    /// Its process id, while it runs.
    pub pid: Option<u32>,
    /// The tasks it holds.
    pub tasks: Vec<String>,
    /// The last progress (or start) of its most silent task.
    pub silent_since_ms: Option<UnixMillis>,
}

/// One agent as the watchdog sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentView {
    /// Its name.
    pub name: String,
    /// Its tasks waiting in the queue.
    pub queued: u64,
    /// Its replicas.
    pub replicas: Vec<ReplicaView>,
    /// `replicas.min`.
    pub min: u32,
    /// `replicas.max`.
    pub max: u32,
    /// Attempts within the error window.
    pub calls: u32,
    /// Failed attempts within the error window.
    pub failures: u32,
    /// Whether its breaker is closed (or off): only then is it opened.
    pub breaker_closed: bool,
    /// Whether it failed (restarted too often): it is not scaled.
    pub failed: bool,
    /// Whether the fleet's degradation level holds back some of its
    /// tasks by priority: then `queued` counts tasks no replica may take,
    /// so it is not scaled up, and counts as idle once its replicas are.
    pub shedding: bool,
    /// Its thresholds.
    pub thresholds: Thresholds,
}

/// What the watchdog decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Add a replica.
    ScaleUp {
        /// The agent.
        agent: String,
        /// Replicas after.
        to: u32,
        /// Why.
        reason: String,
    },
    /// Remove the idle replica `replica`.
    ScaleDown {
        /// The agent.
        agent: String,
        /// The replica to remove.
        replica: u32,
        /// Replicas after.
        to: u32,
        /// Why.
        reason: String,
    },
    /// Restart replica `replica` (process `pid`) and retry its tasks.
    Restart {
        /// The agent.
        agent: String,
        /// The replica.
        replica: u32,
        /// Its process.
        pid: u32,
        /// Its tasks.
        tasks: Vec<String>,
        /// Why.
        reason: String,
    },
    /// Open the agent's breaker and tell humans.
    OpenBreaker {
        /// The agent.
        agent: String,
        /// The error rate seen.
        rate: f64,
        /// Attempts it was measured over.
        calls: u32,
        /// Why.
        reason: String,
    },
}

impl Action {
    /// The agent acted on.
    pub fn agent(&self) -> &str {
        match self {
            Self::ScaleUp { agent, .. }
            | Self::ScaleDown { agent, .. }
            | Self::Restart { agent, .. }
            | Self::OpenBreaker { agent, .. } => agent,
        }
    }

    /// Its name in metrics, logs and status.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ScaleUp { .. } => "scale_up",
            Self::ScaleDown { .. } => "scale_down",
            Self::Restart { .. } => "restart",
            Self::OpenBreaker { .. } => "open_breaker",
        }
    }

    /// Why.
    pub fn reason(&self) -> &str {
        match self {
            Self::ScaleUp { reason, .. }
            | Self::ScaleDown { reason, .. }
            | Self::Restart { reason, .. }
            | Self::OpenBreaker { reason, .. } => reason,
        }
    }
}

/// What the watchdog remembers of one agent between looks.
#[derive(Debug, Default)]
struct Memory {
    /// Since when the queue is over the threshold (reset by each addition).
    over_since: Option<UnixMillis>,
    /// Since when the agent is idle (reset by each removal).
    idle_since: Option<UnixMillis>,
    /// When each replica was last restarted for being stuck.
    restarted: HashMap<u32, UnixMillis>,
    /// When the breaker was last opened for the error rate.
    opened_at: Option<UnixMillis>,
}

/// The watchdog's rules, on passed-in time.
#[derive(Debug, Default)]
pub struct Watchdog {
    agents: HashMap<String, Memory>,
}

fn millis(duration: crate::config::HumanDuration) -> u64 {
    duration.as_millis()
}

impl Watchdog {
    /// The actions for `agents` as seen at `now`.
    pub fn tick(&mut self, now: UnixMillis, agents: &[AgentView]) -> Vec<Action> {
        let mut actions = Vec::new();
        self.agents
            .retain(|name, _| agents.iter().any(|agent| &agent.name == name));
        for agent in agents {
            let memory = self.agents.entry(agent.name.clone()).or_default();
            let limits = &agent.thresholds;
            let count = u32::try_from(agent.replicas.len()).unwrap_or(u32::MAX);
            // Scale up on a backlog that lasts, one replicas can take:
            // not while the breaker, or the degradation level, holds the
            // agent's tasks back (more replicas would add load while the
            // fleet sheds it).
            if agent.queued > limits.queue_depth
                && !agent.failed
                && agent.breaker_closed
                && !agent.shedding
            {
                let since = *memory.over_since.get_or_insert(now);
                if now.saturating_sub(since) >= millis(limits.scale_up_after) && count < agent.max {
                    actions.push(Action::ScaleUp {
                        agent: agent.name.clone(),
                        to: count + 1,
                        reason: format!(
                            "{} tasks queued, over queue_depth = {} for {}",
                            agent.queued,
                            limits.queue_depth,
                            humantime::format_duration(std::time::Duration::from_millis(
                                now.saturating_sub(since)
                            ))
                        ),
                    });
                    memory.over_since = Some(now);
                }
            } else {
                memory.over_since = None;
            }
            // Scale down after an idle cool-down, an idle replica only.
            let idle = (agent.queued == 0 || agent.shedding)
                && agent.replicas.iter().all(|r| r.tasks.is_empty());
            if idle && !agent.failed {
                let since = *memory.idle_since.get_or_insert(now);
                if now.saturating_sub(since) >= millis(limits.scale_down_after) && count > agent.min
                {
                    let replica = agent
                        .replicas
                        .iter()
                        .map(|replica| replica.index)
                        .max()
                        .expect("count > min >= 0 means a replica");
                    actions.push(Action::ScaleDown {
                        agent: agent.name.clone(),
                        replica,
                        to: count - 1,
                        reason: format!(
                            "idle (nothing queued or running) for scale_down_after = {}",
                            limits.scale_down_after
                        ),
                    });
                    memory.idle_since = Some(now);
                }
            } else {
                memory.idle_since = None;
            }
            // Restart a replica whose task is stuck (once per stuck_after).
            memory
                .restarted
                .retain(|index, _| agent.replicas.iter().any(|r| r.index == *index));
            for replica in &agent.replicas {
                let (Some(since), Some(pid)) = (replica.silent_since_ms, replica.pid) else {
                    continue;
                };
                if replica.tasks.is_empty() {
                    continue;
                }
                let silent = now.saturating_sub(since);
                let again = memory
                    .restarted
                    .get(&replica.index)
                    .is_none_or(|at| now.saturating_sub(*at) >= millis(limits.stuck_after));
                if silent >= millis(limits.stuck_after) && again {
                    memory.restarted.insert(replica.index, now);
                    actions.push(Action::Restart {
                        agent: agent.name.clone(),
                        replica: replica.index,
                        pid,
                        tasks: replica.tasks.clone(),
                        reason: format!(
                            "fleet watchdog: no progress for {}, over stuck_after = {}",
                            humantime::format_duration(std::time::Duration::from_secs(
                                silent / 1000
                            )),
                            limits.stuck_after
                        ),
                    });
                }
            }
            // Open the breaker on an error rate over the threshold.
            if agent.calls >= limits.min_calls && agent.calls > 0 {
                let rate = f64::from(agent.failures) / f64::from(agent.calls);
                let again = memory
                    .opened_at
                    .is_none_or(|at| now.saturating_sub(at) >= millis(limits.error_window));
                if rate > limits.error_rate && agent.breaker_closed && again {
                    memory.opened_at = Some(now);
                    actions.push(Action::OpenBreaker {
                        agent: agent.name.clone(),
                        rate,
                        calls: agent.calls,
                        reason: format!(
                            "error rate {:.0}% ({} of {} attempts within {}) over error_rate = {:.0}%",
                            rate * 100.0,
                            agent.failures,
                            agent.calls,
                            limits.error_window,
                            limits.error_rate * 100.0
                        ),
                    });
                }
            }
        }
        actions
    }
}

/// Observes `agents` every interval and carries out the watchdog's
/// actions, until `stop` changes.
pub async fn run(
    config: WatchdogConfig,
    agents: Vec<Arc<AgentRuntime>>,
    store: Store,
    clock: SharedClock,
    notifier: Notifier,
    metrics: Arc<crate::metrics::Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut watchdog = Watchdog::default();
    let mut ticker = tokio::time::interval(config.interval.get());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = ticker.tick() => {}
        }
        let counts: HashMap<String, u64> = match store.periodic_counts().await {
            Ok(counts) => counts
                .into_iter()
                .map(|(agent, counts)| (agent, counts.queued))
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "fleet watchdog: cannot read the queue; looking again later");
                continue;
            }
        };
        // Steady time: silences, cooldowns and the error window are kept
        // in memory only (a clock set forward must not make every busy
        // replica look stuck).
        let now = clock.steady_ms();
        let views: Vec<AgentView> = agents
            .iter()
            .map(|agent| view(agent, &config, counts.get(&agent.name).copied(), now))
            .collect();
        for action in watchdog.tick(now, &views) {
            let Some(agent) = agents.iter().find(|agent| agent.name == action.agent()) else {
                continue;
            };
            act(agent, &action, &notifier, &metrics, clock.now_ms());
        }
    }
}

fn view(
    agent: &AgentRuntime,
    config: &WatchdogConfig,
    queued: Option<u64>,
    now: UnixMillis,
) -> AgentView {
    let thresholds = config.thresholds(&agent.config.watchdog);
    let status = agent.status();
    let (calls, failures) = agent.recent_outcomes(now, thresholds.error_window.get());
    AgentView {
        name: status.name.clone(),
        queued: queued.unwrap_or(0),
        replicas: status
            .replicas
            .iter()
            .map(|replica| ReplicaView {
                index: replica.index,
                pid: replica.pid,
                tasks: replica.tasks.clone(),
                silent_since_ms: replica.task_progress_ms,
            })
            .collect(),
        min: agent.config.replicas.min,
        max: agent.config.replicas.max(),
        shedding: agent.lowest_priority() != crate::queue::Priority::Low,
        calls,
        failures,
        breaker_closed: status
            .breaker
            .state
            .is_none_or(|state| state == crate::breaker::BreakerState::Closed),
        failed: status.state == crate::status::AgentState::Failed,
        thresholds,
    }
}

/// Carries out `action` on `agent`, and records it.
fn act(
    agent: &Arc<AgentRuntime>,
    action: &Action,
    notifier: &Notifier,
    metrics: &crate::metrics::Metrics,
    now: UnixMillis,
) {
    let (detail, urgent) = match action {
        Action::ScaleUp { to, reason, .. } => match agent.add_replica() {
            Some(index) => (format!("added replica {index} ({to} now): {reason}"), false),
            None => return,
        },
        Action::ScaleDown {
            replica,
            to,
            reason,
            ..
        } => {
            agent.retire_replica(*replica);
            (
                format!("removing idle replica {replica} ({to} left): {reason}"),
                false,
            )
        }
        Action::Restart {
            replica,
            pid,
            tasks,
            reason,
            ..
        } => {
            agent.restart_replica(*replica, *pid, reason.clone());
            (
                format!(
                    "restarting replica {replica} and retrying {}: {reason}",
                    tasks.join(", ")
                ),
                false,
            )
        }
        Action::OpenBreaker { reason, .. } => {
            let opened = agent.trip_breaker(&format!("fleet watchdog: {reason}"));
            let done = if opened {
                "breaker opened"
            } else {
                "the breaker is disabled; humans told"
            };
            (format!("{done}: {reason}"), true)
        }
    };
    let kind = action.kind();
    if urgent {
        tracing::error!(agent = %agent.name, action = kind, %detail, "fleet watchdog");
    } else {
        tracing::warn!(agent = %agent.name, action = kind, %detail, "fleet watchdog");
    }
    metrics.watchdog_action(&agent.name, kind);
    agent.note_watchdog(crate::status::WatchdogEvent {
        at_ms: now,
        action: kind.to_string(),
        detail: detail.clone(),
    });
    let event_kind = if matches!(action, Action::OpenBreaker { .. }) {
        EventKind::ErrorRate
    } else {
        EventKind::Watchdog
    };
    let mut event = Event::new(
        event_kind,
        now,
        urgent,
        format!("agent {}: {detail}", agent.name),
    )
    .agent(&agent.name);
    if let Action::OpenBreaker { rate, calls, .. } = action {
        event = event.details(serde_json::json!({"error_rate": rate, "calls": calls}));
    }
    notifier.send(event);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    const SEC: u64 = 1000;

    fn thresholds() -> Thresholds {
        Thresholds {
            queue_depth: 10,
            scale_up_after: HumanDuration::secs(30),
            scale_down_after: HumanDuration::secs(300),
            stuck_after: HumanDuration::secs(900),
            error_rate: 0.2,
            error_window: HumanDuration::secs(300),
            min_calls: 10,
        }
    }

    fn replica(index: u32, task: Option<&str>, silent_since: Option<u64>) -> ReplicaView {
        ReplicaView {
            index,
            pid: Some(1000 + index),
            tasks: task.map(str::to_string).into_iter().collect(),
            silent_since_ms: silent_since,
        }
    }

    fn agent(queued: u64, replicas: Vec<ReplicaView>) -> AgentView {
        AgentView {
            name: "coder".into(),
            queued,
            replicas,
            min: 1,
            max: 3,
            calls: 0,
            failures: 0,
            breaker_closed: true,
            failed: false,
            shedding: false,
            thresholds: thresholds(),
        }
    }

    fn kinds(actions: &[Action]) -> Vec<&'static str> {
        actions.iter().map(Action::kind).collect()
    }

    #[test]
    fn a_lasting_backlog_adds_replicas_one_dwell_at_a_time_up_to_max() {
        let mut watchdog = Watchdog::default();
        let mut view = agent(50, vec![replica(0, Some("a"), Some(0))]);
        // Over the threshold, but not yet for scale_up_after.
        assert!(watchdog.tick(0, &[view.clone()]).is_empty());
        assert!(watchdog.tick(29 * SEC, &[view.clone()]).is_empty());
        let actions = watchdog.tick(30 * SEC, &[view.clone()]);
        assert!(
            matches!(&actions[..], [Action::ScaleUp { to: 2, .. }]),
            "{actions:?}"
        );
        // The next one needs another dwell.
        view.replicas.push(replica(1, Some("b"), Some(30 * SEC)));
        assert!(watchdog.tick(45 * SEC, &[view.clone()]).is_empty());
        assert_eq!(
            kinds(&watchdog.tick(60 * SEC, &[view.clone()])),
            ["scale_up"]
        );
        // At max: no more.
        view.replicas.push(replica(2, Some("c"), Some(60 * SEC)));
        assert!(watchdog.tick(90 * SEC, &[view.clone()]).is_empty());
        assert!(watchdog.tick(200 * SEC, &[view.clone()]).is_empty());
    }

    /// Tasks the degradation level holds back are no backlog replicas
    /// could take: no replica is added for them, and idle replicas go.
    #[test]
    fn a_backlog_held_back_by_the_level_neither_scales_up_nor_keeps_replicas() {
        let mut watchdog = Watchdog::default();
        let shedding = |replicas| AgentView {
            shedding: true,
            ..agent(50, replicas)
        };
        let busy = vec![replica(0, Some("a"), Some(0)), replica(1, None, None)];
        for at in [0, 30, 60, 90] {
            assert!(
                watchdog
                    .tick(at * SEC, &[shedding(busy.clone())])
                    .is_empty(),
                "{at} s"
            );
        }
        let idle = vec![replica(0, None, None), replica(1, None, None)];
        assert!(
            watchdog
                .tick(100 * SEC, &[shedding(idle.clone())])
                .is_empty()
        );
        assert_eq!(
            kinds(&watchdog.tick(400 * SEC, &[shedding(idle)])),
            ["scale_down"]
        );
    }

    #[test]
    fn a_backlog_that_dips_starts_the_dwell_again() {
        let mut watchdog = Watchdog::default();
        let busy = vec![replica(0, Some("a"), Some(0))];
        assert!(watchdog.tick(0, &[agent(50, busy.clone())]).is_empty());
        assert!(
            watchdog
                .tick(20 * SEC, &[agent(5, busy.clone())])
                .is_empty()
        );
        assert!(
            watchdog
                .tick(40 * SEC, &[agent(50, busy.clone())])
                .is_empty()
        );
        assert!(
            watchdog
                .tick(69 * SEC, &[agent(50, busy.clone())])
                .is_empty()
        );
        assert_eq!(
            kinds(&watchdog.tick(70 * SEC, &[agent(50, busy)])),
            ["scale_up"]
        );
    }

    #[test]
    fn idleness_removes_an_idle_replica_after_the_cool_down_down_to_min() {
        let mut watchdog = Watchdog::default();
        let idle = |count: u32| {
            (0..count)
                .map(|i| replica(i, None, None))
                .collect::<Vec<_>>()
        };
        assert!(watchdog.tick(0, &[agent(0, idle(3))]).is_empty());
        // Work in between restarts the cool-down.
        let mut busy = idle(3);
        busy[1] = replica(1, Some("x"), Some(100 * SEC));
        assert!(watchdog.tick(100 * SEC, &[agent(0, busy)]).is_empty());
        assert!(watchdog.tick(101 * SEC, &[agent(0, idle(3))]).is_empty());
        assert!(watchdog.tick(400 * SEC, &[agent(0, idle(3))]).is_empty());
        let actions = watchdog.tick(401 * SEC, &[agent(0, idle(3))]);
        assert!(
            matches!(
                &actions[..],
                [Action::ScaleDown {
                    replica: 2,
                    to: 2,
                    ..
                }]
            ),
            "{actions:?}"
        );
        assert!(watchdog.tick(500 * SEC, &[agent(0, idle(2))]).is_empty());
        assert_eq!(
            kinds(&watchdog.tick(701 * SEC, &[agent(0, idle(2))])),
            ["scale_down"]
        );
        // At min: no more.
        assert!(watchdog.tick(2000 * SEC, &[agent(0, idle(1))]).is_empty());
    }

    #[test]
    fn a_silent_replica_is_restarted_once_per_stuck_after() {
        let mut watchdog = Watchdog::default();
        // Replica 0 went silent at 0; replica 1 reports progress all along.
        let view = |now: u64| {
            agent(
                0,
                vec![
                    replica(0, Some("quiet"), Some(0)),
                    replica(1, Some("busy"), Some(now - SEC)),
                ],
            )
        };
        assert!(watchdog.tick(899 * SEC, &[view(899 * SEC)]).is_empty());
        let actions = watchdog.tick(900 * SEC, &[view(900 * SEC)]);
        assert!(
            matches!(&actions[..], [Action::Restart { replica: 0, pid: 1000, tasks, .. }] if tasks == &["quiet".to_string()]),
            "{actions:?}"
        );
        // Still silent right after: not again until another stuck_after.
        assert!(watchdog.tick(905 * SEC, &[view(905 * SEC)]).is_empty());
        assert_eq!(
            kinds(&watchdog.tick(1800 * SEC, &[view(1800 * SEC)])),
            ["restart"]
        );
    }

    #[test]
    fn an_error_rate_over_the_threshold_opens_the_breaker_once_per_window() {
        let mut watchdog = Watchdog::default();
        let mut view = agent(0, vec![replica(0, None, None)]);
        view.thresholds.scale_down_after = HumanDuration::secs(86_400);
        // Too few calls to judge.
        view.calls = 9;
        view.failures = 9;
        assert!(watchdog.tick(0, &[view.clone()]).is_empty());
        // At the threshold: not over it.
        view.calls = 10;
        view.failures = 2;
        assert!(watchdog.tick(SEC, &[view.clone()]).is_empty());
        view.failures = 3;
        let actions = watchdog.tick(2 * SEC, &[view.clone()]);
        assert!(
            matches!(&actions[..], [Action::OpenBreaker { rate, calls: 10, .. }] if (*rate - 0.3).abs() < 1e-9),
            "{actions:?}"
        );
        assert!(actions[0].reason().contains("30%"), "{actions:?}");
        // Once per window, and not while the breaker is not closed.
        assert!(watchdog.tick(100 * SEC, &[view.clone()]).is_empty());
        view.breaker_closed = false;
        assert!(watchdog.tick(400 * SEC, &[view.clone()]).is_empty());
        view.breaker_closed = true;
        assert_eq!(kinds(&watchdog.tick(401 * SEC, &[view])), ["open_breaker"]);
    }

    #[test]
    fn a_failed_agent_is_not_scaled() {
        let mut watchdog = Watchdog::default();
        let mut view = agent(50, vec![replica(0, None, None)]);
        view.failed = true;
        assert!(watchdog.tick(0, &[view.clone()]).is_empty());
        assert!(watchdog.tick(100 * SEC, &[view]).is_empty());
    }

    #[test]
    fn a_backlog_behind_an_open_breaker_is_not_scaled_for() {
        let mut watchdog = Watchdog::default();
        let mut view = agent(50, vec![replica(0, None, None)]);
        view.breaker_closed = false;
        assert!(watchdog.tick(0, &[view.clone()]).is_empty());
        assert!(watchdog.tick(100 * SEC, &[view.clone()]).is_empty());
        // Closed again: the backlog counts from then.
        view.breaker_closed = true;
        assert!(watchdog.tick(101 * SEC, &[view.clone()]).is_empty());
        assert!(matches!(
            watchdog.tick(200 * SEC, &[view]).as_slice(),
            [Action::ScaleUp { to: 2, .. }]
        ));
    }
}
