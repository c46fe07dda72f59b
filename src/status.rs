//! The fleet's observable state: what the daemon publishes about its agents
//! and replicas, and what `flotilla status` shows.
//!
//! These are plain data types. The dispatcher fills them; the daemon writes
//! them to the store as a snapshot; the CLI reads and renders them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::breaker::{BreakerState, Transition};
use crate::clock::UnixMillis;
use crate::config::Config;
use crate::config::Mode;
use crate::degrade::DegradationStatus;
use crate::queue::jetstream::BrokerStatus;
use crate::queue::{QueueError, StateCounts, TaskState};
use crate::store::Store;

/// The state of an agent as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Replicas are running or being restarted.
    Running,
    /// Restarted too often within `restart.window`: no longer restarted;
    /// its tasks stay queued until the daemon restarts.
    Failed,
    /// Shutting down.
    Stopping,
    /// Not running (the daemon is down or stopped it).
    Stopped,
}

/// The state of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// Spawned, waiting for `ready`.
    Starting,
    /// Ready, waiting for a task.
    Idle,
    /// Working on a task.
    Busy,
    /// Crashed; waiting for the restart delay.
    Backoff,
    /// Being stopped.
    Stopping,
    /// Not running.
    Stopped,
}

/// One replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReplicaStatus {
    /// Index within the agent, from 0.
    pub index: u32,
    /// The daemon running it (filled in by `status` when a broker is
    /// shared by several daemons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<String>,
    /// State.
    pub state: ReplicaState,
    /// Process id (and process group id) while running.
    pub pid: Option<u32>,
    /// Tasks in flight.
    pub tasks: Vec<String>,
    /// Times this replica was restarted.
    pub restarts: u32,
    /// When the current process started.
    pub started_ms: Option<UnixMillis>,
    /// Last progress message of a task.
    pub last_progress_ms: Option<UnixMillis>,
    /// The last progress (or start) of its most silent task in flight:
    /// what `/health/progress` measures.
    #[serde(default)]
    pub task_progress_ms: Option<UnixMillis>,
    /// Last heartbeat or other sign of life.
    pub last_seen_ms: Option<UnixMillis>,
    /// Why the last process ended.
    pub last_exit: Option<String>,
    /// Resident memory of its process group.
    pub rss_bytes: Option<u64>,
    /// Context window usage last reported by the agent.
    pub context_window_usage_pct: Option<f64>,
    /// Why the replica takes no tasks although it runs: a required
    /// readiness check fails for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready: Option<String>,
}

impl ReplicaStatus {
    /// Whether it runs and may take tasks (its process is up and every
    /// required readiness check passes for it).
    pub fn is_ready(&self) -> bool {
        matches!(self.state, ReplicaState::Idle | ReplicaState::Busy) && self.not_ready.is_none()
    }

    /// Its process is gone: enter `state` without a pid, memory or tasks.
    pub fn without_process(&mut self, state: ReplicaState) {
        self.state = state;
        self.pid = None;
        self.rss_bytes = None;
        self.tasks.clear();
        self.task_progress_ms = None;
    }

    /// A replica that has not started.
    pub fn new(index: u32) -> Self {
        Self {
            index,
            daemon: None,
            state: ReplicaState::Stopped,
            pid: None,
            tasks: Vec::new(),
            restarts: 0,
            started_ms: None,
            last_progress_ms: None,
            task_progress_ms: None,
            last_seen_ms: None,
            last_exit: None,
            rss_bytes: None,
            context_window_usage_pct: None,
            not_ready: None,
        }
    }
}

/// One agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentStatus {
    /// Name.
    pub name: String,
    /// Mode.
    pub mode: Mode,
    /// State.
    pub state: AgentState,
    /// Why it failed, when it did.
    pub failure: Option<String>,
    /// Replicas.
    pub replicas: Vec<ReplicaStatus>,
    /// Restarts of all its replicas since the daemon started.
    pub restarts: u64,
    /// Lines from the agent that were not valid protocol messages.
    pub malformed_lines: u64,
    /// The last malformed line (an excerpt) and why.
    pub last_malformed: Option<String>,
    /// Messages naming a task the replica does not hold.
    pub stale_messages: u64,
    /// Task counts (filled in by `status` from the store).
    #[serde(default)]
    pub tasks: StateCounts,
    /// Its circuit breaker.
    #[serde(default)]
    pub breaker: BreakerStatus,
    /// What happened to its tasks while it was unavailable, since the
    /// daemon started.
    #[serde(default)]
    pub diverted: Diverted,
    /// Its readiness checks' last results.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub readiness: Vec<crate::readiness::CheckStatus>,
    /// The fleet watchdog's last actions on it, oldest first (at most
    /// [`WATCHDOG_EVENTS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub watchdog: Vec<WatchdogEvent>,
}

impl AgentStatus {
    /// This status as it leaves the daemon: the times the daemon keeps on
    /// its steady clock (replicas', breaker's) in wall time, which readers
    /// compare with their own clocks.
    pub fn on_wall(mut self, clock: &dyn crate::clock::Clock) -> Self {
        let wall = |at: &mut Option<UnixMillis>| {
            if let Some(at) = at {
                *at = clock.wall_of(*at);
            }
        };
        for replica in &mut self.replicas {
            wall(&mut replica.started_ms);
            wall(&mut replica.last_progress_ms);
            wall(&mut replica.task_progress_ms);
            wall(&mut replica.last_seen_ms);
        }
        wall(&mut self.breaker.open_until_ms);
        if let Some(transition) = &mut self.breaker.last_transition {
            transition.at_ms = clock.wall_of(transition.at_ms);
        }
        self
    }
}

/// Watchdog actions kept per agent in its status.
pub const WATCHDOG_EVENTS: usize = 10;

/// One action of the fleet watchdog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WatchdogEvent {
    /// When.
    pub at_ms: UnixMillis,
    /// `scale_up`, `scale_down`, `restart` or `open_breaker`.
    pub action: String,
    /// What it saw and did.
    pub detail: String,
}

/// An agent's circuit breaker, as shown by `status`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct BreakerStatus {
    /// Whether the breaker is in use.
    pub enabled: bool,
    /// Its state.
    pub state: Option<BreakerState>,
    /// When an open breaker lets its first probe through.
    pub open_until_ms: Option<UnixMillis>,
    /// Times it opened since the daemon started.
    pub times_opened: u64,
    /// Its last transition.
    pub last_transition: Option<Transition>,
}

/// Counts of tasks handled by an agent's fallback while it was
/// unavailable.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Diverted {
    /// Handed to a fallback agent.
    pub rerouted: u64,
    /// Escalated to a human.
    pub escalated: u64,
    /// Completed without running, marked `proceeded_with_warning`.
    pub proceeded_with_warning: u64,
}

impl AgentStatus {
    /// A new agent with `replicas` stopped replicas.
    pub fn new(name: &str, mode: Mode, replicas: u32) -> Self {
        Self {
            name: name.to_string(),
            mode,
            state: AgentState::Running,
            failure: None,
            replicas: (0..replicas).map(ReplicaStatus::new).collect(),
            restarts: 0,
            malformed_lines: 0,
            last_malformed: None,
            stale_messages: 0,
            tasks: StateCounts::default(),
            breaker: BreakerStatus::default(),
            diverted: Diverted::default(),
            readiness: Vec::new(),
            watchdog: Vec::new(),
        }
    }
}

/// The daemon's snapshot, written to the store every `status_interval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DaemonSnapshot {
    /// The daemon's name in the fleet.
    #[serde(default)]
    pub name: String,
    /// The machine it runs on.
    #[serde(default)]
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// flotilla version.
    pub version: String,
    /// When it started.
    pub started_ms: UnixMillis,
    /// When this snapshot was taken.
    pub taken_ms: UnixMillis,
    /// False in the last snapshot of a daemon that stopped cleanly.
    pub running: bool,
    /// How old this snapshot may grow while its daemon still counts as
    /// running (from its own `status_interval`). Absent from older
    /// daemons' snapshots: readers then use their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fresh_for_ms: Option<UnixMillis>,
    /// Its agents.
    pub agents: Vec<AgentStatus>,
    /// Its broker connection, when it uses one.
    #[serde(default)]
    pub broker: Option<crate::queue::jetstream::BrokerStatus>,
    /// Its degradation level.
    #[serde(default)]
    pub degradation: crate::degrade::DegradationStatus,
    /// Where its HTTP server listens.
    #[serde(default)]
    pub http: Option<String>,
    /// The task counts it took last (on a broker only), for a `status`
    /// that reads the broker itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<SharedCounts>,
}

/// Task counts a daemon took, shared in its snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SharedCounts {
    /// When they were taken.
    pub taken_ms: UnixMillis,
    /// Per agent.
    pub agents: BTreeMap<String, StateCounts>,
}

/// Whose counts a `status` shows, when not its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CountedBy {
    /// The daemon that took them.
    pub daemon: String,
    /// When, on the reader's clock.
    pub taken_ms: UnixMillis,
}

/// Key of the daemon snapshot in the store's status table.
pub const SNAPSHOT_KEY: &str = "daemon";

/// What `status` shows.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct StatusReport {
    /// A live daemon (the first), else the one seen last.
    pub daemon: DaemonState,
    /// Every daemon known: the store's one, or each daemon sharing the
    /// broker (dead ones drop out after `broker.fleet_ttl`).
    pub daemons: Vec<DaemonState>,
    /// The store or broker.
    pub store: String,
    /// Tasks queued.
    pub queue_depth: u64,
    /// Tasks per state.
    pub tasks: StateCounts,
    /// The highest degradation level among the running daemons.
    pub degradation: DegradationStatus,
    /// Every agent of the config.
    pub agents: Vec<AgentStatus>,
    /// Why the task counts and the other daemons are missing: the store
    /// could not be read (a daemon's own API answers with its live part
    /// while its broker is unreachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
    /// The daemon whose counts are shown, and when it took them: a
    /// `status` reading a broker that holds many records itself shows a
    /// live daemon's recent counts rather than counting every record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted_by: Option<CountedBy>,
}

/// One daemon as `status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct DaemonState {
    /// Its name in the fleet.
    pub name: Option<String>,
    /// The machine.
    pub host: Option<String>,
    /// Whether it runs (a fresh snapshot).
    pub running: bool,
    /// Process id.
    pub pid: Option<u32>,
    /// When it started.
    pub started_ms: Option<UnixMillis>,
    /// Its last snapshot.
    pub last_seen_ms: Option<UnixMillis>,
    /// Its broker connection.
    pub broker: Option<BrokerStatus>,
    /// Where its HTTP server listens.
    pub http: Option<String>,
}

impl StatusReport {
    /// The fleet's status from `store`: task counts, and each daemon's
    /// last snapshot; `live`, this daemon's snapshot taken now, stands in
    /// for its stored one.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn build(
        config: &Config,
        store: &Store,
        now: UnixMillis,
        live: Option<DaemonSnapshot>,
    ) -> Result<Self, QueueError> {
        // With this daemon's live part at hand, a store that cannot be
        // reached (the broker unreachable) still leaves something to
        // show: this daemon, and that it is cut off. Any other error, or
        // no live part, is the caller's.
        let fresh_within = crate::store::fresh_within(config);
        let read = async {
            let snapshots = store.snapshots().await?;
            // Without a daemon's own counts at hand (its tally is kept up
            // to date), a broker holding many records is not counted
            // again: a live daemon's recent counts are shown.
            // A count's age is measured on its daemon's clock, and the
            // snapshot's on this one's: clocks may differ.
            let shared = if live.is_none() && store.counting_is_slow().await? {
                snapshots
                    .iter()
                    .filter(|snapshot| crate::store::is_fresh(snapshot, now, fresh_within))
                    .filter_map(|snapshot| {
                        let counts = snapshot.counts.clone()?;
                        let age = snapshot.taken_ms.saturating_sub(counts.taken_ms);
                        (age <= crate::store::SHARED_COUNTS_MAX_AGE_MS).then(|| {
                            let age = age.saturating_add(now.saturating_sub(snapshot.taken_ms));
                            (age, snapshot.name.clone(), counts.agents)
                        })
                    })
                    .min_by_key(|(age, _, _)| *age)
            } else {
                None
            };
            let (counts, counted_by) = match shared {
                Some((age, daemon, counts)) => (
                    counts,
                    Some(CountedBy {
                        daemon,
                        taken_ms: now.saturating_sub(age),
                    }),
                ),
                None => (store.queue().counts().await?.into_iter().collect(), None),
            };
            Ok::<_, QueueError>((counts, counted_by, snapshots))
        };
        let (counts, counted_by, mut snapshots, store_error) = match read.await {
            Ok((counts, counted_by, snapshots)) => (counts, counted_by, snapshots, None),
            Err(error @ QueueError::Storage(_)) if live.is_some() => {
                (BTreeMap::new(), None, Vec::new(), Some(error.to_string()))
            }
            Err(error) => return Err(error),
        };
        let counts: BTreeMap<String, StateCounts> = counts;
        if let Some(live) = live {
            snapshots.retain(|snapshot| snapshot.name != live.name);
            snapshots.push(live);
        }
        snapshots.sort_by(|a, b| a.name.cmp(&b.name));
        let daemons: Vec<DaemonState> = snapshots
            .iter()
            .map(|snapshot| DaemonState {
                name: Some(snapshot.name.clone()).filter(|name| !name.is_empty()),
                host: Some(snapshot.host.clone()).filter(|host| !host.is_empty()),
                running: crate::store::is_fresh(snapshot, now, fresh_within),
                pid: Some(snapshot.pid),
                started_ms: Some(snapshot.started_ms),
                last_seen_ms: Some(snapshot.taken_ms),
                broker: snapshot.broker.clone(),
                http: snapshot.http.clone(),
            })
            .collect();
        let live: Vec<&DaemonSnapshot> = snapshots
            .iter()
            .filter(|snapshot| crate::store::is_fresh(snapshot, now, fresh_within))
            .collect();
        let several = snapshots.len() > 1;
        let mut agents: Vec<AgentStatus> = Vec::new();
        for (name, agent) in &config.agents {
            let mut merged: Option<AgentStatus> = None;
            for snapshot in &live {
                let Some(mut status) = snapshot.agents.iter().find(|a| &a.name == name).cloned()
                else {
                    continue;
                };
                if several {
                    for replica in &mut status.replicas {
                        replica.daemon = Some(snapshot.name.clone());
                    }
                }
                match &mut merged {
                    None => merged = Some(status),
                    Some(merged) => {
                        if status.state == AgentState::Running {
                            merged.state = AgentState::Running;
                        }
                        merged.replicas.extend(status.replicas);
                        merged.restarts += status.restarts;
                        merged.malformed_lines += status.malformed_lines;
                        merged.stale_messages += status.stale_messages;
                        merged.diverted.rerouted += status.diverted.rerouted;
                        merged.diverted.escalated += status.diverted.escalated;
                        merged.diverted.proceeded_with_warning +=
                            status.diverted.proceeded_with_warning;
                        // Each daemon has its own breaker: show the one that
                        // lets least through.
                        let rank = |state: Option<BreakerState>| match state {
                            Some(BreakerState::Open) => 2,
                            Some(BreakerState::HalfOpen) => 1,
                            _ => 0,
                        };
                        let opened = merged.breaker.times_opened + status.breaker.times_opened;
                        if rank(status.breaker.state) > rank(merged.breaker.state) {
                            merged.breaker = status.breaker;
                        }
                        merged.breaker.times_opened = opened;
                        if merged.failure.is_none() {
                            merged.failure = status.failure;
                        }
                        if merged.last_malformed.is_none() {
                            merged.last_malformed = status.last_malformed;
                        }
                    }
                }
            }
            let mut status = merged.unwrap_or_else(|| {
                let mut stopped = AgentStatus::new(name, agent.mode, agent.replicas.min);
                stopped.state = AgentState::Stopped;
                stopped
            });
            status.tasks = counts.get(name).cloned().unwrap_or_default();
            agents.push(status);
        }
        let mut total = StateCounts::default();
        for counts in counts.values() {
            total.add(TaskState::Queued, counts.queued);
            total.add(TaskState::Running, counts.running);
            total.add(TaskState::Completed, counts.completed);
            total.add(TaskState::DeadLettered, counts.dead_lettered);
            total.add(TaskState::Escalated, counts.escalated);
        }
        let degradation = live
            .iter()
            .map(|snapshot| snapshot.degradation.clone())
            .max_by_key(|degradation| degradation.level)
            .unwrap_or_default();
        let daemon = daemons
            .iter()
            .find(|daemon| daemon.running)
            .or_else(|| daemons.iter().max_by_key(|daemon| daemon.last_seen_ms))
            .cloned()
            .unwrap_or_default();
        Ok(Self {
            daemon,
            daemons,
            store: Store::describe(config),
            queue_depth: total.queued,
            tasks: total,
            degradation,
            agents,
            store_error,
            counted_by,
        })
    }
}
