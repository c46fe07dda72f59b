//! Prometheus metrics: one registry, every name and its help text here.
//!
//! Counters and histograms are updated where things happen (a task handed
//! to a replica, an attempt ending, a replica restarting, a malformed
//! line). Gauges that describe the fleet's state now (tasks in progress,
//! health, memory, breakers, the degradation level, the broker connection)
//! are set from the agents' status when `/metrics` is scraped, so they can
//! never drift from what `status` shows.
//!
//! Some gauges end in `_total` (`fleet_agents_healthy_total`, ...): that
//! is how dashboards and alert rules in the field name them, so they keep
//! those names although `promtool check metrics` warns that `_total` is
//! for counters.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::breaker::BreakerState;
use crate::status::AgentStatus;

/// Metric names (counters without the `_total` the encoder adds) and
/// their help texts.
pub mod names {
    /// Tasks handed to a replica.
    pub const TASKS_RECEIVED: (&str, &str) = (
        "agent_tasks_received",
        "Tasks handed to the agent's replicas (each attempt counts)",
    );
    /// Attempts ended.
    pub const TASKS_COMPLETED: (&str, &str) = (
        "agent_tasks_completed",
        "Attempts ended, by how: status is completed, error, crashed, progress_timeout, max_duration, memory_limit, rejected, released, ..",
    );
    /// Attempt durations.
    pub const TASK_DURATION: (&str, &str) = (
        "agent_task_duration_seconds",
        "Time from handing a task to a replica to the end of the attempt",
    );
    /// Tasks in flight.
    pub const TASKS_IN_PROGRESS: (&str, &str) = (
        "agent_tasks_in_progress",
        "Tasks the agent's replicas are working on now",
    );
    /// Messages sent by agents (delegation).
    pub const MESSAGES_SENT: (&str, &str) = (
        "agent_messages_sent",
        "Messages the agent sent to other agents",
    );
    /// Messages received by agents (delegation).
    pub const MESSAGES_RECEIVED: (&str, &str) = (
        "agent_messages_received",
        "Messages the agent received from other agents",
    );
    /// Delegation latency.
    pub const MESSAGE_LATENCY: (&str, &str) = (
        "agent_message_latency_seconds",
        "Time from an agent sending a message to its answer",
    );
    /// Health per agent.
    pub const HEALTH_STATUS: (&str, &str) = (
        "agent_health_status",
        "1 while the agent is available (a ready replica, breaker not open, not failed), else 0",
    );
    /// Last sign of life.
    pub const LAST_ACTIVITY: (&str, &str) = (
        "agent_last_activity_timestamp",
        "Unix time (seconds) of the agent's last progress or sign of life",
    );
    /// Memory per agent.
    pub const MEMORY_USAGE: (&str, &str) = (
        "agent_memory_usage_bytes",
        "Resident memory of the agent's replicas' process groups",
    );
    /// Context window usage.
    pub const CONTEXT_WINDOW: (&str, &str) = (
        "agent_context_window_usage_pct",
        "Highest context window usage the agent's replicas reported (percent)",
    );
    /// Healthy agents.
    pub const AGENTS_HEALTHY: (&str, &str) = (
        "fleet_agents_healthy_total",
        "Agents of this daemon that are available (a gauge; named as in the field)",
    );
    /// Unhealthy agents.
    pub const AGENTS_UNHEALTHY: (&str, &str) = (
        "fleet_agents_unhealthy_total",
        "Agents of this daemon that are unavailable (a gauge; named as in the field)",
    );
    /// Queue depth.
    pub const QUEUE_DEPTH: (&str, &str) = (
        "fleet_total_queue_depth",
        "Tasks queued in the store, all agents (refreshed every 5 s; every 30 s on a broker)",
    );
    /// Dead letters.
    pub const DEAD_LETTERS: (&str, &str) = (
        "flotilla_dead_letters",
        "Dead-lettered tasks in the store, all agents (refreshed with the queue depth)",
    );
    /// When the store was last counted.
    pub const STORE_COUNTED: (&str, &str) = (
        "flotilla_store_counted_timestamp_seconds",
        "When the queue depth and dead letters were last counted (Unix time; 0 before the first count): while counting fails they keep that count's values",
    );
    /// Tasks dead-lettered.
    pub const DEAD_LETTERED: (&str, &str) = (
        "flotilla_dead_lettered",
        "Tasks this daemon's agents dead-lettered (not retryable, or attempts used up)",
    );
    /// Open breakers.
    pub const BREAKERS_OPEN: (&str, &str) = (
        "fleet_circuit_breakers_open_total",
        "Circuit breakers of this daemon that are not closed (a gauge; named as in the field)",
    );
    /// Breaker state.
    pub const BREAKER_STATE: (&str, &str) = (
        "flotilla_breaker_state",
        "1 for the state each agent's circuit breaker is in (closed, open, half_open), 0 for the others",
    );
    /// Degradation level.
    pub const DEGRADATION_LEVEL: (&str, &str) = (
        "flotilla_degradation_level",
        "The fleet's degradation level: 0 nominal, 1 reduced, 2 essential, 3 emergency",
    );
    /// Replica restarts.
    pub const RESTARTS: (&str, &str) = (
        "flotilla_replica_restarts",
        "Replica restarts of every kind (crash, timeout kill, memory kill)",
    );
    /// Redeliveries.
    pub const REDELIVERIES: (&str, &str) = (
        "flotilla_redeliveries",
        "Tasks handed to a replica again after an earlier attempt that ran (retries, redeliveries after a crash or a lost daemon)",
    );
    /// Escalations.
    pub const ESCALATIONS: (&str, &str) = (
        "flotilla_escalations",
        "Tasks escalated to a human: from an unavailable agent (fallback_policy = escalate_to_human) or after failed validation",
    );
    /// Validation failures.
    pub const VALIDATION_FAILURES: (&str, &str) = (
        "flotilla_validation_failures",
        "Attempts whose result was rejected (invalid or too large)",
    );
    /// Watchdog actions.
    pub const WATCHDOG_ACTIONS: (&str, &str) = (
        "flotilla_watchdog_actions",
        "Actions of the fleet watchdog: scale_up, scale_down, restart, open_breaker",
    );
    /// Chaos actions.
    pub const CHAOS_ACTIONS: (&str, &str) = (
        "flotilla_chaos_actions",
        "Faults injected by operators (flotilla chaos) and experiments: kill, pause, partition, latency, stop",
    );
    /// Chaos experiments.
    pub const CHAOS_EXPERIMENTS: (&str, &str) = (
        "flotilla_chaos_experiments",
        "Chaos experiments the daemon ran on its schedule, by verdict",
    );
    /// Notifications, by sink and outcome.
    pub const NOTIFICATIONS: (&str, &str) = (
        "flotilla_notifications",
        "Events sent to the [[notify]] sinks, by sink (its name, else its place in the config), kind and outcome (delivered, failed after its retries, dropped from its full queue to make room for a newer one)",
    );
    /// Malformed lines.
    pub const MALFORMED_LINES: (&str, &str) = (
        "flotilla_malformed_lines",
        "Lines from agents that were not valid protocol messages",
    );
    /// Broker connection.
    pub const BROKER_CONNECTED: (&str, &str) = (
        "flotilla_broker_connected",
        "1 while the daemon is connected to the broker, else 0 (only with a broker)",
    );
    /// Broker disconnects.
    pub const BROKER_DISCONNECTS: (&str, &str) = (
        "flotilla_broker_disconnects",
        "Times the broker connection was lost",
    );
    /// Broker reconnects.
    pub const BROKER_RECONNECTS: (&str, &str) = (
        "flotilla_broker_reconnects",
        "Times the broker connection was re-established",
    );
}

/// Most distinct task types per daemon; more are counted as `other`.
const MAX_TYPES: usize = 64;

/// `{agent}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabel {
    /// The agent.
    pub agent: String,
}

/// `{agent, action}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// The agent.
    pub agent: String,
    /// The action.
    pub action: String,
}

/// `{experiment, verdict}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExperimentLabels {
    /// The experiment.
    pub experiment: String,
    /// passed or failed.
    pub verdict: String,
}

/// `{sink, kind, outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotificationLabels {
    /// The sink's place in the config's `[[notify]]` list, from 0.
    pub sink: String,
    /// log, webhook or command.
    pub kind: String,
    /// delivered, failed or dropped.
    pub outcome: String,
}

/// `{agent, type}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    /// The agent.
    pub agent: String,
    /// The task type.
    pub r#type: String,
}

/// `{agent, type, status}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CompletedLabels {
    /// The agent.
    pub agent: String,
    /// The task type.
    pub r#type: String,
    /// How the attempt ended.
    pub status: String,
}

/// `{agent, destination, type}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SentLabels {
    /// The sender.
    pub agent: String,
    /// The receiver.
    pub destination: String,
    /// The message type.
    pub r#type: String,
}

/// `{agent, source, type}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReceivedLabels {
    /// The receiver.
    pub agent: String,
    /// The sender.
    pub source: String,
    /// The message type.
    pub r#type: String,
}

/// `{agent, state}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerLabels {
    /// The agent.
    pub agent: String,
    /// The breaker state.
    pub state: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn histograms<L: Clone + std::hash::Hash + Eq>() -> Histograms<L> {
    Family::new_with_constructor(duration_histogram as fn() -> Histogram)
}

fn duration_histogram() -> Histogram {
    // 10 ms to about 16 hours (0.01 s x 2.5^17).
    Histogram::new(exponential_buckets(0.01, 2.5, 18))
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    families: Vec<String>,
    received: Family<TaskLabels, Counter>,
    completed: Family<CompletedLabels, Counter>,
    duration: Histograms<TaskLabels>,
    in_progress: Family<AgentLabel, Gauge>,
    /// Child tasks sent, per sender, destination and type (counted once
    /// per child, however often a retried parent sends it).
    pub messages_sent: Family<SentLabels, Counter>,
    /// Child tasks addressed to an agent, per source and type.
    pub messages_received: Family<ReceivedLabels, Counter>,
    /// From a waited-for send to its reply, per waiting agent.
    pub message_latency: Histograms<AgentLabel>,
    health: Family<AgentLabel, Gauge>,
    last_activity: Family<AgentLabel, FloatGauge>,
    memory: Family<AgentLabel, Gauge>,
    context: Family<AgentLabel, FloatGauge>,
    healthy: Gauge,
    unhealthy: Gauge,
    queue_depth: Gauge,
    dead_letters: Gauge,
    store_counted: FloatGauge,
    breakers_open: Gauge,
    breaker_state: Family<BreakerLabels, Gauge>,
    level: Gauge,
    restarts: Family<AgentLabel, Counter>,
    dead_lettered: Family<AgentLabel, Counter>,
    malformed: Family<AgentLabel, Counter>,
    redeliveries: Family<AgentLabel, Counter>,
    escalations: Family<AgentLabel, Counter>,
    validation_failures: Family<AgentLabel, Counter>,
    watchdog_actions: Family<ActionLabels, Counter>,
    chaos_actions: Family<ActionLabels, Counter>,
    chaos_experiments: Family<ExperimentLabels, Counter>,
    notifications: Family<NotificationLabels, Counter>,
    /// Connected, disconnects, reconnects: registered only with a broker.
    broker: Option<(Gauge, Counter, Counter)>,
    types: Mutex<HashSet<String>>,
    /// Serializes scrapes: the broker counters follow the connection's
    /// counts by adding the difference, which two scrapes at once would
    /// add twice.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(false)
    }
}

/// Counts one for `agent` in `family`.
fn inc(family: &Family<AgentLabel, Counter>, agent: &str) {
    family
        .get_or_create(&AgentLabel {
            agent: agent.into(),
        })
        .inc();
}

macro_rules! register {
    ($registry:expr, $families:expr, $name:expr, $metric:expr) => {{
        let metric = $metric;
        $families.extend(exported($name.0, &metric));
        $registry.register($name.0, $name.1, metric.clone());
        metric
    }};
}

/// The series names a metric registered as `name` is exported under.
fn exported(name: &str, metric: &impl prometheus_client::encoding::EncodeMetric) -> Vec<String> {
    use prometheus_client::metrics::MetricType;
    match metric.metric_type() {
        MetricType::Counter => vec![format!("{name}_total")],
        MetricType::Histogram => ["bucket", "sum", "count"]
            .iter()
            .map(|suffix| format!("{name}_{suffix}"))
            .collect(),
        _ => vec![name.to_string()],
    }
}

impl Metrics {
    /// Every metric, registered; the broker's only `with_broker`.
    pub fn new(with_broker: bool) -> Self {
        use names::*;
        let mut registry = Registry::default();
        let mut families = Vec::new();
        Self {
            received: register!(registry, families, TASKS_RECEIVED, Family::default()),
            completed: register!(registry, families, TASKS_COMPLETED, Family::default()),
            duration: register!(registry, families, TASK_DURATION, histograms()),
            in_progress: register!(registry, families, TASKS_IN_PROGRESS, Family::default()),
            messages_sent: register!(registry, families, MESSAGES_SENT, Family::default()),
            messages_received: register!(registry, families, MESSAGES_RECEIVED, Family::default()),
            message_latency: register!(registry, families, MESSAGE_LATENCY, histograms()),
            health: register!(registry, families, HEALTH_STATUS, Family::default()),
            last_activity: register!(registry, families, LAST_ACTIVITY, Family::default()),
            memory: register!(registry, families, MEMORY_USAGE, Family::default()),
            context: register!(registry, families, CONTEXT_WINDOW, Family::default()),
            healthy: register!(registry, families, AGENTS_HEALTHY, Gauge::default()),
            unhealthy: register!(registry, families, AGENTS_UNHEALTHY, Gauge::default()),
            queue_depth: register!(registry, families, QUEUE_DEPTH, Gauge::default()),
            dead_letters: register!(registry, families, DEAD_LETTERS, Gauge::default()),
            store_counted: register!(registry, families, STORE_COUNTED, FloatGauge::default()),
            breakers_open: register!(registry, families, BREAKERS_OPEN, Gauge::default()),
            breaker_state: register!(registry, families, BREAKER_STATE, Family::default()),
            level: register!(registry, families, DEGRADATION_LEVEL, Gauge::default()),
            restarts: register!(registry, families, RESTARTS, Family::default()),
            dead_lettered: register!(registry, families, DEAD_LETTERED, Family::default()),
            malformed: register!(registry, families, MALFORMED_LINES, Family::default()),
            redeliveries: register!(registry, families, REDELIVERIES, Family::default()),
            watchdog_actions: register!(registry, families, WATCHDOG_ACTIONS, Family::default()),
            chaos_actions: register!(registry, families, CHAOS_ACTIONS, Family::default()),
            chaos_experiments: register!(registry, families, CHAOS_EXPERIMENTS, Family::default()),
            notifications: register!(registry, families, NOTIFICATIONS, Family::default()),
            escalations: register!(registry, families, ESCALATIONS, Family::default()),
            validation_failures: register!(
                registry,
                families,
                VALIDATION_FAILURES,
                Family::default()
            ),
            broker: with_broker.then(|| {
                (
                    register!(registry, families, BROKER_CONNECTED, Gauge::default()),
                    register!(registry, families, BROKER_DISCONNECTS, Counter::default()),
                    register!(registry, families, BROKER_RECONNECTS, Counter::default()),
                )
            }),
            types: Mutex::new(HashSet::new()),
            scrape: Mutex::new(()),
            registry,
            families,
        }
    }

    /// The name of every series this registry can export (counters with
    /// `_total`, histograms' `_bucket`, `_sum` and `_count`), for checking
    /// dashboards and alert rules against.
    pub fn families(&self) -> &[String] {
        &self.families
    }

    /// The task type of a payload: its `type` field when that is a short
    /// name (letters, digits, `-`, `_`, `.`, at most 64), `default`
    /// without one, `other` past [`MAX_TYPES`] distinct types (so a
    /// payload cannot blow up the number of series).
    pub fn task_type(&self, payload: &serde_json::Value) -> String {
        let Some(name) = payload.get("type").and_then(serde_json::Value::as_str) else {
            return "default".into();
        };
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            return "other".into();
        }
        let mut types = self.types.lock().expect("types lock");
        if types.contains(name) || types.len() < MAX_TYPES {
            types.insert(name.to_string());
            name.to_string()
        } else {
            "other".into()
        }
    }

    /// A task of `kind` was handed to a replica of `agent`; `redelivered`
    /// when an earlier attempt of it ran.
    pub fn received(&self, agent: &str, kind: &str, redelivered: bool) {
        if redelivered {
            inc(&self.redeliveries, agent);
        }
        self.received
            .get_or_create(&TaskLabels {
                agent: agent.into(),
                r#type: kind.into(),
            })
            .inc();
    }

    /// An operator's chaos `action` hit `agent`.
    pub fn chaos_action(&self, agent: &str, action: &str) {
        self.chaos_actions
            .get_or_create(&ActionLabels {
                agent: agent.into(),
                action: action.into(),
            })
            .inc();
    }

    /// A scheduled chaos experiment ended with `verdict`.
    pub fn chaos_experiment(&self, experiment: &str, verdict: &str) {
        self.chaos_experiments
            .get_or_create(&ExperimentLabels {
                experiment: experiment.into(),
                verdict: verdict.into(),
            })
            .inc();
    }

    /// An event for sink number `sink` (of `kind`) ended with `outcome`.
    pub fn notification(&self, sink: &str, kind: &str, outcome: &str) {
        self.notifications
            .get_or_create(&NotificationLabels {
                sink: sink.into(),
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Exports the series of sink `sink` (its name or place) and
    /// `outcome` (at 0 until counted).
    pub fn notification_series(&self, sink: &str, kind: &str, outcome: &str) {
        let _ = self.notifications.get_or_create(&NotificationLabels {
            sink: sink.into(),
            kind: kind.into(),
            outcome: outcome.into(),
        });
    }

    /// `from` sent a message (a child task) of `kind` to `to`.
    pub fn message(&self, from: &str, to: &str, kind: &str) {
        self.messages_sent
            .get_or_create(&SentLabels {
                agent: from.into(),
                destination: to.into(),
                r#type: kind.into(),
            })
            .inc();
        self.messages_received
            .get_or_create(&ReceivedLabels {
                agent: to.into(),
                source: from.into(),
                r#type: kind.into(),
            })
            .inc();
    }

    /// `agent` got the answer to a message after `seconds`.
    pub fn message_answered(&self, agent: &str, seconds: f64) {
        self.message_latency
            .get_or_create(&AgentLabel {
                agent: agent.into(),
            })
            .observe(seconds);
    }

    /// The fleet watchdog took `action` on `agent`.
    pub fn watchdog_action(&self, agent: &str, action: &str) {
        self.watchdog_actions
            .get_or_create(&ActionLabels {
                agent: agent.into(),
                action: action.into(),
            })
            .inc();
    }

    /// `agent`'s task was escalated to a human.
    pub fn escalated(&self, agent: &str) {
        inc(&self.escalations, agent);
    }

    /// An attempt ended with `status` after `seconds`.
    pub fn attempt_ended(&self, agent: &str, kind: &str, status: &str, seconds: f64) {
        if status == crate::queue::AttemptOutcome::Rejected.as_str()
            || status == crate::queue::AttemptOutcome::ValidationFailed.as_str()
        {
            inc(&self.validation_failures, agent);
        }
        self.completed
            .get_or_create(&CompletedLabels {
                agent: agent.into(),
                r#type: kind.into(),
                status: status.into(),
            })
            .inc();
        self.duration
            .get_or_create(&TaskLabels {
                agent: agent.into(),
                r#type: kind.into(),
            })
            .observe(seconds);
    }

    /// A replica of `agent` restarted.
    pub fn restarted(&self, agent: &str) {
        self.restarts
            .get_or_create(&AgentLabel {
                agent: agent.into(),
            })
            .inc();
    }

    /// `agent` dead-lettered a task.
    pub fn dead_lettered(&self, agent: &str) {
        self.dead_lettered
            .get_or_create(&AgentLabel {
                agent: agent.into(),
            })
            .inc();
    }

    /// Creates `agent`'s counters at 0, so that the first increment shows
    /// in `increase()` and `rate()`.
    pub fn add_agent(&self, agent: &str) {
        let label = AgentLabel {
            agent: agent.into(),
        };
        for family in [
            &self.restarts,
            &self.malformed,
            &self.dead_lettered,
            &self.redeliveries,
            &self.escalations,
            &self.validation_failures,
        ] {
            family.get_or_create(&label).inc_by(0);
        }
    }

    /// `agent` printed a malformed line.
    pub fn malformed(&self, agent: &str) {
        self.malformed
            .get_or_create(&AgentLabel {
                agent: agent.into(),
            })
            .inc();
    }

    /// Sets the queue depth and the dead letters from the store's counts,
    /// taken at `counted_ms`.
    pub fn set_store_counts(&self, queued: u64, dead_lettered: u64, counted_ms: u64) {
        self.queue_depth
            .set(i64::try_from(queued).unwrap_or(i64::MAX));
        self.dead_letters
            .set(i64::try_from(dead_lettered).unwrap_or(i64::MAX));
        self.store_counted.set(counted_ms as f64 / 1000.0);
    }

    /// Sets the state gauges from the agents' status, each with whether
    /// it is available, the degradation level and the broker connection
    /// (connected, disconnects, reconnects so far).
    pub fn set_state(
        &self,
        agents: &[(AgentStatus, bool)],
        level: u8,
        broker: Option<(bool, u64, u64)>,
    ) {
        let mut healthy = 0;
        let mut open = 0;
        for (status, available) in agents {
            let label = AgentLabel {
                agent: status.name.clone(),
            };
            let working: usize = status.replicas.iter().map(|r| r.tasks.len()).sum();
            self.in_progress
                .get_or_create(&label)
                .set(i64::try_from(working).unwrap_or(i64::MAX));
            self.health.get_or_create(&label).set(i64::from(*available));
            healthy += i64::from(*available);
            // While it holds tasks: when its most silent task last
            // progressed (or started), so that one stuck replica shows
            // among busy ones, and a heartbeat (alive, not advancing)
            // does not hide it. Otherwise its last sign of life.
            let last = status
                .replicas
                .iter()
                .filter(|r| !r.tasks.is_empty())
                .filter_map(|r| r.task_progress_ms)
                .min()
                .or_else(|| {
                    status
                        .replicas
                        .iter()
                        .filter_map(|r| r.last_progress_ms.max(r.last_seen_ms).max(r.started_ms))
                        .max()
                });
            if let Some(last) = last {
                self.last_activity
                    .get_or_create(&label)
                    .set(last as f64 / 1000.0);
            }
            let rss: u64 = status.replicas.iter().filter_map(|r| r.rss_bytes).sum();
            self.memory
                .get_or_create(&label)
                .set(i64::try_from(rss).unwrap_or(i64::MAX));
            // 0 when no running process reports one (restarting, waiting
            // out its backoff, stopped): never the last value of a
            // process that is gone.
            let pct = status
                .replicas
                .iter()
                .filter(|r| r.pid.is_some())
                .filter_map(|r| r.context_window_usage_pct)
                .reduce(f64::max);
            if pct.is_some() || self.context.get(&label).is_some() {
                self.context.get_or_create(&label).set(pct.unwrap_or(0.0));
            }
            if let Some(state) = status.breaker.state {
                open += i64::from(state != BreakerState::Closed);
                for each in [
                    BreakerState::Closed,
                    BreakerState::Open,
                    BreakerState::HalfOpen,
                ] {
                    self.breaker_state
                        .get_or_create(&BreakerLabels {
                            agent: status.name.clone(),
                            state: each.as_str().into(),
                        })
                        .set(i64::from(each == state));
                }
            }
        }
        self.healthy.set(healthy);
        self.unhealthy
            .set(i64::try_from(agents.len()).unwrap_or(i64::MAX) - healthy);
        self.breakers_open.set(open);
        self.level.set(i64::from(level));
        if let (Some((connected, disconnects, reconnects)), Some((gauge, lost, back))) =
            (broker, &self.broker)
        {
            gauge.set(i64::from(connected));
            // Counters follow the connection's own counts.
            lost.inc_by(disconnects.saturating_sub(lost.get()));
            back.inc_by(reconnects.saturating_sub(back.get()));
        }
    }

    /// Sets the state gauges (see [`Self::set_state`]) and encodes, one
    /// scrape at a time.
    pub fn scrape(
        &self,
        agents: &[(AgentStatus, bool)],
        level: u8,
        broker: Option<(bool, u64, u64)>,
    ) -> String {
        let _one_at_a_time = self.scrape.lock().expect("scrape lock");
        self.set_state(agents, level, broker);
        self.encode()
    }

    /// The registry in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::ReplicaState;

    #[test]
    fn every_name_of_the_issue_is_exported() {
        let metrics = Metrics::new(true);
        metrics.received("coder", "default", true);
        metrics.attempt_ended("coder", "default", "completed", 1.5);
        let mut status = AgentStatus::new("coder", crate::config::Mode::Persistent, 1);
        status.replicas[0].last_seen_ms = Some(1_000);
        status.replicas[0].context_window_usage_pct = Some(40.0);
        status.replicas[0].state = ReplicaState::Idle;
        status.replicas[0].pid = Some(4242);
        metrics.set_state(&[(status, true)], 0, Some((true, 1, 1)));
        metrics.set_store_counts(7, 2, 1_500);
        // Families without samples (delegation, until an agent sends a
        // message) print nothing; once used they appear.
        metrics
            .messages_sent
            .get_or_create(&SentLabels {
                agent: "coder".into(),
                destination: "reviewer".into(),
                r#type: "request".into(),
            })
            .inc();
        metrics
            .messages_received
            .get_or_create(&ReceivedLabels {
                agent: "reviewer".into(),
                source: "coder".into(),
                r#type: "request".into(),
            })
            .inc();
        metrics
            .message_latency
            .get_or_create(&AgentLabel {
                agent: "coder".into(),
            })
            .observe(0.5);
        let text = metrics.encode();
        assert!(
            text.contains("# HELP agent_tasks_received_total Tasks handed to the agent's replicas (each attempt counts).\n"),
            "{text}"
        );
        for name in [
            "agent_tasks_received_total{agent=\"coder\",type=\"default\"} 1",
            "agent_tasks_completed_total{agent=\"coder\",type=\"default\",status=\"completed\"} 1",
            "agent_task_duration_seconds_count{agent=\"coder\",type=\"default\"} 1",
            "agent_tasks_in_progress{agent=\"coder\"} 0",
            "agent_messages_sent_total{agent=\"coder\",destination=\"reviewer\",type=\"request\"} 1",
            "agent_messages_received_total{agent=\"reviewer\",source=\"coder\",type=\"request\"} 1",
            "agent_message_latency_seconds_count{agent=\"coder\"} 1",
            "agent_health_status{agent=\"coder\"} 1",
            "agent_last_activity_timestamp{agent=\"coder\"} 1",
            "agent_context_window_usage_pct{agent=\"coder\"} 40",
            "flotilla_broker_disconnects_total 1",
            "flotilla_redeliveries_total{agent=\"coder\"} 1",
            "fleet_total_queue_depth 7",
            "flotilla_dead_letters 2",
            "flotilla_store_counted_timestamp_seconds 1.5",
            "# TYPE agent_last_activity_timestamp gauge",
            "# TYPE agent_memory_usage_bytes gauge",
            "# TYPE agent_context_window_usage_pct gauge",
            "# TYPE fleet_agents_healthy_total gauge",
            "# TYPE fleet_agents_unhealthy_total gauge",
            "# TYPE fleet_total_queue_depth gauge",
            "# TYPE fleet_circuit_breakers_open_total gauge",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    /// A busy agent's activity is its most silent task's last progress,
    /// whatever its heartbeats say; a context window usage no running
    /// replica reports any more reads 0.
    #[test]
    fn activity_follows_the_most_silent_task_and_usage_is_cleared() {
        let metrics = Metrics::new(true);
        let mut status = AgentStatus::new("coder", crate::config::Mode::Persistent, 2);
        for replica in &mut status.replicas {
            replica.state = ReplicaState::Busy;
            replica.pid = Some(4242);
            replica.tasks = vec!["t".into()];
            replica.last_seen_ms = Some(900_000);
        }
        status.replicas[0].task_progress_ms = Some(100_000);
        status.replicas[1].task_progress_ms = Some(800_000);
        status.replicas[0].context_window_usage_pct = Some(95.0);
        metrics.set_state(&[(status.clone(), true)], 0, None);
        let text = metrics.encode();
        assert!(
            text.contains("agent_last_activity_timestamp{agent=\"coder\"} 100"),
            "{text}"
        );
        assert!(
            text.contains("agent_context_window_usage_pct{agent=\"coder\"} 95"),
            "{text}"
        );
        // Its process gone (waiting out its backoff), the value it
        // reported with it.
        status.replicas[0].pid = None;
        metrics.set_state(&[(status, true)], 0, None);
        assert!(
            metrics
                .encode()
                .contains("agent_context_window_usage_pct{agent=\"coder\"} 0"),
            "{}",
            metrics.encode()
        );
    }

    #[test]
    fn task_types_are_bounded() {
        let metrics = Metrics::new(true);
        assert_eq!(metrics.task_type(&serde_json::json!({})), "default");
        assert_eq!(
            metrics.task_type(&serde_json::json!({"type": "review"})),
            "review"
        );
        assert_eq!(
            metrics.task_type(&serde_json::json!({"type": "no spaces"})),
            "other"
        );
        for n in 0..200 {
            metrics.task_type(&serde_json::json!({"type": format!("t{n}")}));
        }
        assert_eq!(
            metrics.task_type(&serde_json::json!({"type": "late"})),
            "other"
        );
        assert_eq!(
            metrics.task_type(&serde_json::json!({"type": "review"})),
            "review"
        );
    }
}
