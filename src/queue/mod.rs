//! The durable task queue: the [`TaskQueue`] trait every backend implements,
//! and the types that cross it.
//!
//! A queue owns task state and its transitions (queued → running →
//! completed | dead-lettered, and back to queued on retry). It never decides
//! policy: the dispatcher chooses between ack, nak, progress and term; the
//! queue applies them atomically and durably, fenced by the attempt number
//! so that a stale replica can never complete a task twice.

pub mod conformance;
pub mod jetstream;
pub mod sqlite;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::clock::UnixMillis;

/// Longest task id accepted.
pub const MAX_TASK_ID_BYTES: usize = 128;
/// Most tasks in one submit call.
pub const MAX_SUBMIT_BATCH: usize = 100_000;
/// Longest reason or detail text kept with an attempt or dead letter.
pub const MAX_REASON_BYTES: usize = 4096;

/// Task priority; higher priorities are leased first, FIFO within one.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    JsonSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Leased before everything else.
    Critical,
    /// Before normal.
    High,
    /// The default.
    #[default]
    Normal,
    /// After everything else.
    Low,
}

impl Priority {
    /// Rank in lease order, 0 first.
    pub fn rank(self) -> i64 {
        match self {
            Self::Critical => 0,
            Self::High => 1,
            Self::Normal => 2,
            Self::Low => 3,
        }
    }

    /// The priority of rank `rank`.
    pub fn from_rank(rank: i64) -> Self {
        match rank {
            0 => Self::Critical,
            1 => Self::High,
            2 => Self::Normal,
            _ => Self::Low,
        }
    }

    /// Its name in config, JSON and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting to be leased (possibly delayed for a retry).
    Queued,
    /// Leased to a replica.
    Running,
    /// Finished with a result. Terminal.
    Completed,
    /// Given up on, with a reason and its attempt history. Terminal until
    /// replayed.
    DeadLettered,
    /// Handed to a human (its agent was unavailable and its fallback
    /// policy is `escalate_to_human`). Terminal until resolved.
    Escalated,
}

impl TaskState {
    /// Every state, in display order.
    pub const ALL: [Self; 5] = [
        Self::Queued,
        Self::Running,
        Self::Completed,
        Self::DeadLettered,
        Self::Escalated,
    ];

    /// Its name in JSON and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::DeadLettered => "dead_lettered",
            Self::Escalated => "escalated",
        }
    }

    /// Whether no further transition happens without a human.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::DeadLettered | Self::Escalated)
    }
}

/// Hand-overs of a task to another agent (a fallback, a gate's
/// `escalate_to`) that are not charged against `max_deliver`. Beyond, each
/// is charged: a cycle of escalations and fallbacks (A escalates to B,
/// which falls back to A while unavailable) ends in the dead-letter queue
/// instead of handing the task around for ever.
pub const FREE_HANDOVERS: u32 = 16;

/// `queued, running or escalated`.
fn one_of(states: &[TaskState]) -> String {
    match states {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => {
            let rest: Vec<&str> = rest.iter().map(|state| state.as_str()).collect();
            format!("{} or {last}", rest.join(", "))
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| {
                format!(
                    "unknown task state {text:?}; valid: queued, running, completed, dead_lettered, escalated"
                )
            })
    }
}

/// A task to submit.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// Idempotency key; see [`validate_task_id`].
    pub id: String,
    /// The agent that runs it.
    pub agent: String,
    /// Lease order.
    pub priority: Priority,
    /// Opaque JSON handed to the agent.
    pub payload: Value,
}

/// What happened to one submitted task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SubmitReceipt {
    /// The task id.
    pub id: String,
    /// True when the id was already known: nothing new was stored.
    pub duplicate: bool,
    /// The task's state after the submit.
    pub state: TaskState,
}

/// Most bytes of payloads, results and checkpoints one listing holds: a
/// listing of many large records would otherwise take the daemon's memory
/// in proportion.
#[cfg(not(test))]
pub const MAX_LIST_BYTES: usize = 256 << 20;
/// [`MAX_LIST_BYTES`] in unit tests, which reach it with little data.
#[cfg(test)]
pub const MAX_LIST_BYTES: usize = 1 << 20;

/// The answer to a listing over [`MAX_LIST_BYTES`], reached at its
/// `count`th record.
pub(crate) fn listing_too_large(count: usize) -> QueueError {
    QueueError::Invalid(format!(
        "the listing holds over {} MiB of payloads and results by its task number {count}; ask for fewer (limit) or narrow it (state, agent)",
        MAX_LIST_BYTES >> 20
    ))
}

/// What the store keeps beside a task under its id (`control.KIND.ID`):
/// its rollback journal and the claim of a running rollback
/// (`src/rollback.rs`), its link to a waiting parent and its children
/// (`src/delegate.rs`). Deleted with the task, so that a new task given
/// the same id starts clean.
pub(crate) const TASK_CONTROLS: [&str; 4] = ["journal", "rollback", "link", "children"];

/// Identifies one delivery of a task. Every outcome names the delivery it
/// settles; an outcome for an older delivery is refused as stale.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseKey {
    /// The task id.
    pub task_id: String,
    /// The delivery number (1 for the first).
    pub attempt: u32,
    /// Which life of the id: a purged (or pruned) id submitted again is a
    /// new task whose attempts start again at 1, and a holder of the old
    /// life's attempt must not settle it. The backend's own number.
    pub life: u64,
}

impl fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.task_id, self.attempt)
    }
}

/// A task handed to the dispatcher until it is settled (ack, nak, release or
/// term). Dropping an unsettled lease releases it back to the queue.
#[derive(Debug)]
pub struct Lease {
    /// Which delivery this is.
    pub key: LeaseKey,
    /// The agent.
    pub agent: String,
    /// The priority it was submitted with.
    pub priority: Priority,
    /// The payload.
    pub payload: Value,
    /// The checkpoint left by the last progress of an earlier attempt.
    pub checkpoint: Option<Value>,
    /// Why the previous attempt did not count: its validation report, or
    /// why the task was handed over from another agent.
    pub feedback: Option<String>,
    /// Attempts counted against `max_deliver`, this one included.
    pub charged: u32,
    /// Releases the lease if it is dropped unsettled.
    pub guard: LeaseGuard,
}

impl Lease {
    /// Marks the lease settled: dropping it no longer releases it.
    pub fn settle(&mut self) {
        self.guard.disarm();
    }
}

/// What lease guards tell their backend.
#[derive(Debug)]
pub enum Returned {
    /// This lease was dropped unsettled: release it.
    Lease(LeaseKey),
    /// Answer once every lease returned before this one is released.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// Releases a lease on drop unless disarmed: a lease lost by a bug, a panic
/// or a cancelled future goes back to the queue instead of waiting for its
/// deadline.
pub struct LeaseGuard {
    key: Option<LeaseKey>,
    returns: mpsc::UnboundedSender<Returned>,
}

impl LeaseGuard {
    /// A guard that sends `key` to `returns` when dropped armed.
    pub fn new(key: LeaseKey, returns: mpsc::UnboundedSender<Returned>) -> Self {
        Self {
            key: Some(key),
            returns,
        }
    }

    fn disarm(&mut self) {
        self.key = None;
    }
}

impl fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("armed", &self.key.is_some())
            .finish()
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            // The receiver is gone only when the queue is shut down, and
            // then the daemon requeues running tasks on its next start.
            let _ = self.returns.send(Returned::Lease(key));
        }
    }
}

/// A request for up to `max` tasks of one agent.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    /// The agent.
    pub agent: String,
    /// Most tasks to lease (1 or more).
    pub max: usize,
    /// The lease lasts this long unless extended by progress.
    pub lease_for: Duration,
    /// Who holds the lease (daemon instance), for status.
    pub owner: String,
    /// A task already charged this many attempts is dead-lettered instead
    /// of leased (its last lease expired or its daemon died).
    pub max_deliver: u32,
    /// Only tasks of this priority or more urgent are leased (`Low` for
    /// all): degradation levels hold the others back.
    pub lowest: Priority,
}

/// Why an attempt ended, as kept in the task's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The agent returned a result.
    Completed,
    /// The agent reported an error.
    Error,
    /// The replica exited or was killed while working on it.
    Crashed,
    /// No progress within `progress_timeout`.
    ProgressTimeout,
    /// Ran past `max_duration`.
    MaxDuration,
    /// The replica exceeded its memory limit.
    MemoryLimit,
    /// The result was unusable (too large, or the task could not be started).
    Rejected,
    /// The lease expired without news from the daemon.
    LeaseExpired,
    /// The daemon stopped or died while the task ran.
    DaemonRestart,
    /// Handed back without fault (shutdown); not counted against
    /// `max_deliver`.
    Released,
    /// Handed to a fallback agent while its own was unavailable; not
    /// counted against `max_deliver`.
    Rerouted,
    /// Completed without running, marked `proceeded_with_warning`, while
    /// its agent was unavailable.
    ProceededWithWarning,
    /// Handed to a human while its agent was unavailable, or by a
    /// validation gate.
    Escalated,
    /// The result failed a required validation gate; the report goes to
    /// the next attempt as feedback.
    ValidationFailed,
    /// The task was cancelled while it ran (e.g. its parent ended).
    Cancelled,
}

impl AttemptOutcome {
    /// Its name in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Error => "error",
            Self::Crashed => "crashed",
            Self::ProgressTimeout => "progress_timeout",
            Self::MaxDuration => "max_duration",
            Self::MemoryLimit => "memory_limit",
            Self::Rejected => "rejected",
            Self::LeaseExpired => "lease_expired",
            Self::DaemonRestart => "daemon_restart",
            Self::Released => "released",
            Self::Rerouted => "rerouted",
            Self::ProceededWithWarning => "proceeded_with_warning",
            Self::Escalated => "escalated",
            Self::ValidationFailed => "validation_failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses [`Self::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Completed,
            Self::Error,
            Self::Crashed,
            Self::ProgressTimeout,
            Self::MaxDuration,
            Self::MemoryLimit,
            Self::Rejected,
            Self::LeaseExpired,
            Self::DaemonRestart,
            Self::Released,
            Self::Rerouted,
            Self::ProceededWithWarning,
            Self::Escalated,
            Self::ValidationFailed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|outcome| outcome.as_str() == text)
    }
}

/// The feedback an attempt leaves the next one: its validation report, or
/// why the task was handed over.
pub fn feedback_of(outcome: Option<&str>, detail: Option<&str>) -> Option<String> {
    let outcome = AttemptOutcome::parse(outcome?)?;
    matches!(
        outcome,
        AttemptOutcome::ValidationFailed | AttemptOutcome::Rerouted
    )
    .then(|| detail.unwrap_or_default().to_string())
}

/// How an attempt ended, recorded with the outcome verb.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptEnd {
    /// Why it ended.
    pub outcome: AttemptOutcome,
    /// Which replica ran it, e.g. `worker/2`.
    pub replica: Option<String>,
    /// Details (error message, exit status).
    pub detail: Option<String>,
}

impl AttemptEnd {
    /// An attempt end with a detail.
    pub fn new(
        outcome: AttemptOutcome,
        replica: Option<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            outcome,
            replica,
            detail: Some(detail.into()),
        }
    }
}

impl AttemptEnd {
    /// The end of an attempt whose lease was dropped without an outcome
    /// (released through its [`LeaseGuard`]).
    pub fn dropped() -> Self {
        Self::new(
            AttemptOutcome::Released,
            None,
            "the lease was dropped without an outcome",
        )
    }
}

/// One attempt in a task's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Attempt {
    /// Delivery number, from 1.
    pub number: u32,
    /// When it was leased.
    pub started_ms: UnixMillis,
    /// When it ended, if it did.
    pub ended_ms: Option<UnixMillis>,
    /// Which replica ran it.
    pub replica: Option<String>,
    /// Why it ended.
    pub outcome: Option<AttemptOutcome>,
    /// Error message, exit status or other detail.
    pub detail: Option<String>,
}

/// Everything known about a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskRecord {
    /// Id.
    pub id: String,
    /// Agent.
    pub agent: String,
    /// Priority.
    pub priority: Priority,
    /// State.
    pub state: TaskState,
    /// Payload.
    pub payload: Value,
    /// Deliveries so far.
    pub attempts: u32,
    /// Attempts counted against `max_deliver` (released ones are not).
    pub charged_attempts: u32,
    /// Times replayed from the dead-letter queue.
    pub replays: u32,
    /// Latest checkpoint.
    pub checkpoint: Option<Value>,
    /// The result, when completed.
    pub result: Option<Value>,
    /// Why it was dead-lettered.
    pub reason: Option<String>,
    /// When a queued task becomes leasable (retry delay).
    pub visible_ms: UnixMillis,
    /// When the current lease ends, while running.
    pub lease_deadline_ms: Option<UnixMillis>,
    /// Submit time.
    pub created_ms: UnixMillis,
    /// Last change.
    pub updated_ms: UnixMillis,
    /// When it reached a terminal state.
    pub finished_ms: Option<UnixMillis>,
    /// Attempt history, oldest first (empty in listings).
    pub history: Vec<Attempt>,
}

/// Filter for [`TaskQueue::list`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this state.
    pub state: Option<TaskState>,
    /// Only this agent.
    pub agent: Option<String>,
    /// Most rows returned (newest first).
    pub limit: usize,
}

/// Task counts of one agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StateCounts {
    /// Ready or waiting for a retry delay.
    pub queued: u64,
    /// Leased.
    pub running: u64,
    /// Completed.
    pub completed: u64,
    /// Dead-lettered.
    pub dead_lettered: u64,
    /// Escalated to a human.
    #[serde(default)]
    pub escalated: u64,
}

impl StateCounts {
    /// Adds `count` to `state`.
    pub fn add(&mut self, state: TaskState, count: u64) {
        match state {
            TaskState::Queued => self.queued += count,
            TaskState::Running => self.running += count,
            TaskState::Completed => self.completed += count,
            TaskState::DeadLettered => self.dead_lettered += count,
            TaskState::Escalated => self.escalated += count,
        }
    }

    /// All tasks.
    pub fn total(&self) -> u64 {
        self.queued + self.running + self.completed + self.dead_lettered + self.escalated
    }
}

/// Which dead letters an operation applies to.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// These ids (each must be dead-lettered).
    Ids(Vec<String>),
    /// Every dead letter.
    All,
}

/// How a human resolves an escalated task.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Back to the queue with a fresh attempt budget.
    Retry,
    /// Completed with this result.
    Complete(Value),
    /// Given up: dead-lettered with the escalation's reason.
    Drop,
}

/// Result of an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// This ack completed the task.
    Completed,
    /// The task was already completed by this same delivery; nothing changed.
    AlreadyCompleted,
}

/// Queue errors. Tests match on the variant.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The outcome names a delivery that no longer owns the task.
    #[error("task {key} no longer holds the lease (the task is {state}); the outcome was ignored")]
    StaleLease {
        /// The stale delivery.
        key: LeaseKey,
        /// The task's state now.
        state: TaskState,
    },
    /// No such task.
    #[error("no task with id {id:?}")]
    NotFound {
        /// The id.
        id: String,
    },
    /// The operation needs the task in another state.
    #[error(
        "task {id:?} is {state}; only a task that is {} can be {done}",
        one_of(expected)
    )]
    WrongState {
        /// The id.
        id: String,
        /// Its state.
        state: TaskState,
        /// The states the operation takes a task in.
        expected: &'static [TaskState],
        /// What the operation does, as in "can be replayed".
        done: &'static str,
    },
    /// Bad input: nothing was applied.
    #[error("{0}")]
    Invalid(String),
    /// The storage failed. The operation was not applied, except when
    /// the embedded store's fsync failed after its commit: then it was
    /// written but is not known to be durable (the message says so).
    #[error("store error: {0}")]
    Storage(String),
    /// The queue is shut down.
    #[error("the queue is closed")]
    Closed,
}

/// The limits and windows of a store, whatever the backend (from
/// `[store]`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// A known id is deduplicated within this long of its first submit.
    pub dedup_window: Duration,
    /// Completed tasks older than this are pruned.
    pub retention: Duration,
    /// Largest payload, serialized.
    pub max_payload_bytes: usize,
    /// Largest result or checkpoint, serialized.
    pub max_result_bytes: usize,
}

impl Limits {
    /// The limits of the `[store]` config.
    pub fn from_config(store: &crate::config::StoreConfig) -> Self {
        Self {
            dedup_window: store.dedup_window.get(),
            retention: store.retention.get(),
            max_payload_bytes: store.max_payload_bytes.as_usize(),
            max_result_bytes: store.max_result_bytes.as_usize(),
        }
    }

    /// Checks a task to submit (id, agent name, payload size); returns its
    /// payload serialized.
    ///
    /// # Errors
    /// [`QueueError::Invalid`] naming the task and what is wrong.
    pub fn check_task(&self, task: &NewTask) -> Result<String, QueueError> {
        validate_task_id(&task.id)?;
        if !crate::config::valid_agent_name(&task.agent) {
            return Err(QueueError::Invalid(format!(
                "task {}: invalid agent name {:?}: use 1 to 64 letters, digits, '-' or '_'",
                task.id, task.agent
            )));
        }
        let payload = task.payload.to_string();
        if payload.len() > self.max_payload_bytes {
            return Err(QueueError::Invalid(format!(
                "task {}: payload of {} bytes exceeds store.max_payload_bytes = {}",
                task.id,
                payload.len(),
                self.max_payload_bytes
            )));
        }
        Ok(payload)
    }

    /// Checks a batch to submit with [`Self::check_task`]; an error names
    /// the task's place in the batch too (`tasks[3]`), for ids the client
    /// did not choose. Returns the payloads serialized.
    ///
    /// # Errors
    /// [`QueueError::Invalid`] for the first task that is wrong.
    pub fn check_tasks(&self, tasks: &[NewTask]) -> Result<Vec<String>, QueueError> {
        tasks
            .iter()
            .enumerate()
            .map(|(index, task)| {
                self.check_task(task).map_err(|error| match error {
                    QueueError::Invalid(message) if tasks.len() > 1 => {
                        QueueError::Invalid(format!("tasks[{index}]: {message}"))
                    }
                    other => other,
                })
            })
            .collect()
    }

    /// Checks a result or checkpoint (`what`) against `max_result_bytes`;
    /// returns it serialized.
    ///
    /// # Errors
    /// [`QueueError::Invalid`] naming its size and the limit.
    pub fn check_result(&self, what: &str, value: &Value) -> Result<String, QueueError> {
        let text = value.to_string();
        if text.len() > self.max_result_bytes {
            return Err(QueueError::Invalid(format!(
                "{what} of {} bytes exceeds store.max_result_bytes = {}",
                text.len(),
                self.max_result_bytes
            )));
        }
        Ok(text)
    }
}

/// Checks a task id: 1 to [`MAX_TASK_ID_BYTES`] bytes of letters, digits and
/// `-_.:@/`.
///
/// # Errors
/// [`QueueError::Invalid`] naming the id and the rule.
pub fn validate_task_id(id: &str) -> Result<(), QueueError> {
    let valid = !id.is_empty()
        && id.len() <= MAX_TASK_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@/".contains(&b))
        // Safe as a path or an argument where `{task.id}` goes (a work
        // tree per task): no `..`, no empty part, no leading `-`.
        && !id.starts_with('-')
        && id
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if valid {
        Ok(())
    } else {
        Err(QueueError::Invalid(format!(
            "invalid task id {:?}: use 1 to {MAX_TASK_ID_BYTES} letters, digits or any of - _ . : @ /, not starting with '-', with no empty, '.' or '..' part between slashes",
            crate::protocol::excerpt(id)
        )))
    }
}

/// A new random, time-ordered task id.
pub fn new_task_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Cuts `text` to at most [`MAX_REASON_BYTES`] on a character boundary.
pub fn bound_reason(text: &str) -> String {
    if text.len() <= MAX_REASON_BYTES {
        return text.to_string();
    }
    let mut end = MAX_REASON_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The reason given to a task dead-lettered because its attempts are used
/// up, naming its last attempt's outcome and detail.
pub fn exhausted_reason(max_deliver: u32, last: Option<(&str, Option<&str>)>) -> String {
    let last = match last {
        Some((outcome, Some(detail))) => format!("; last attempt: {outcome}: {detail}"),
        Some((outcome, None)) => format!("; last attempt: {outcome}"),
        None => String::new(),
    };
    bound_reason(&format!(
        "attempts exhausted (retry.max_deliver = {max_deliver}){last}"
    ))
}

/// The durable queue. Every method is atomic: it applies completely or not
/// at all, and a returned `Ok` means the change is on disk.
///
/// # Cancel safety
/// Dropping a returned future may or may not apply the operation; leases
/// taken by a dropped [`TaskQueue::lease`] future are released through
/// their guards.
#[async_trait]
pub trait TaskQueue: Send + Sync + 'static {
    /// Stores tasks: all or none on the embedded store; on a broker, a
    /// failure midway leaves the tasks stored before it (submitting the
    /// same batch again stores each id once). A known id is not stored
    /// again (see `store.dedup_window`).
    async fn submit(&self, tasks: Vec<NewTask>) -> Result<Vec<SubmitReceipt>, QueueError>;

    /// Leases up to `request.max` ready tasks, highest priority first,
    /// waiting up to `wait` for one to be ready. Returns an empty list when
    /// none became ready in time.
    async fn lease(&self, request: &LeaseRequest, wait: Duration)
    -> Result<Vec<Lease>, QueueError>;

    /// Completes the task with `result`.
    async fn ack(
        &self,
        key: &LeaseKey,
        result: &Value,
        end: AttemptEnd,
    ) -> Result<AckOutcome, QueueError>;

    /// Returns the task to the queue, leasable after `delay`; the attempt
    /// counts against `max_deliver`.
    async fn nak(&self, key: &LeaseKey, delay: Duration, end: AttemptEnd)
    -> Result<(), QueueError>;

    /// Returns the task to the queue at once without charging the attempt.
    async fn release(&self, key: &LeaseKey, end: AttemptEnd) -> Result<(), QueueError>;

    /// Extends the lease by `extend` from now and stores `checkpoint` if
    /// given.
    async fn progress(
        &self,
        key: &LeaseKey,
        extend: Duration,
        checkpoint: Option<&Value>,
    ) -> Result<(), QueueError>;

    /// Dead-letters the task with `reason`.
    async fn term(&self, key: &LeaseKey, reason: &str, end: AttemptEnd) -> Result<(), QueueError>;

    /// Hands the task to `agent` (its own agent is unavailable, or a
    /// gate escalated its result): queued for `agent` at once, the attempt
    /// not charged (while the task has been handed over at most
    /// [`FREE_HANDOVERS`] times), its checkpoint dropped (another agent's
    /// checkpoint means nothing to `agent`).
    async fn reroute(&self, key: &LeaseKey, agent: &str, end: AttemptEnd)
    -> Result<(), QueueError>;

    /// Cancels a task that is queued, running or escalated (waiting for a
    /// human): it becomes a dead letter with `reason`, and a running
    /// attempt ends `cancelled` (its holder's later outcome is refused as
    /// stale). Returns false, changing nothing, when the task had already
    /// ended.
    async fn cancel(&self, id: &str, reason: &str) -> Result<bool, QueueError>;

    /// Moves the task to `escalated` with `reason`, for a human.
    async fn escalate(
        &self,
        key: &LeaseKey,
        reason: &str,
        end: AttemptEnd,
    ) -> Result<(), QueueError>;

    /// Resolves the escalated task `id` (see [`Resolution`]); fails with
    /// `WrongState` when it is not escalated.
    async fn resolve(&self, id: &str, resolution: &Resolution) -> Result<(), QueueError>;

    /// Returns every running task to the queue (after the daemon that held
    /// them died), recording `DaemonRestart`. Returns how many.
    async fn requeue_running(&self) -> Result<u64, QueueError>;

    /// Returns running tasks whose lease deadline passed to the queue.
    async fn expire_leases(&self) -> Result<u64, QueueError>;

    /// The task with `id` and its history.
    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, QueueError>;

    /// Tasks matching `filter`, newest first, without history.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>, QueueError>;

    /// Task counts per agent.
    async fn counts(&self) -> Result<Vec<(String, StateCounts)>, QueueError>;

    /// Puts dead letters back in the queue with a fresh attempt budget.
    /// Returns how many.
    async fn replay(&self, selection: &Selection) -> Result<u64, QueueError>;

    /// Deletes dead letters. Returns how many.
    async fn purge(&self, selection: &Selection) -> Result<u64, QueueError>;

    /// Waits until every lease dropped unsettled so far has been released.
    async fn flush_released(&self);

    /// Tasks this handle dead-lettered by itself since the last call,
    /// `(id, agent)`: those found with their attempts used up when the
    /// broker or the store gave them out again (their holders died or
    /// lost their leases). The daemon cancels the children they waited
    /// for and counts them, as it does for the tasks it dead-letters.
    fn take_exhausted(&self) -> Vec<(String, String)>;
}

/// Most tasks an [`Exhausted`] list keeps before it drops the oldest.
const MAX_EXHAUSTED: usize = 10_000;

/// The tasks a queue handle dead-lettered while leasing, until the daemon
/// takes them ([`TaskQueue::take_exhausted`]); bounded.
#[derive(Debug, Clone, Default)]
pub(crate) struct Exhausted(
    std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<(String, String)>>>,
);

impl Exhausted {
    pub(crate) fn push(&self, id: String, agent: String) {
        let mut list = self.0.lock().expect("not poisoned");
        if list.len() >= MAX_EXHAUSTED
            && let Some((dropped, _)) = list.pop_front()
        {
            tracing::warn!(task = %dropped, "too many dead letters waiting to be handled; the children of this one are not cancelled");
        }
        list.push_back((id, agent));
    }

    pub(crate) fn take(&self) -> Vec<(String, String)> {
        self.0.lock().expect("not poisoned").drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_are_checked() {
        assert!(validate_task_id("build-42:retry/1").is_ok());
        assert!(validate_task_id(&new_task_id()).is_ok());
        assert!(validate_task_id("a.b/c..d/.e").is_ok(), "dots inside parts");
        for bad in [
            "",
            "has space",
            "semi;colon",
            &"x".repeat(129),
            "a/../b",
            "..",
            "./a",
            "/abs",
            "a//b",
            "trailing/",
            "-rf",
        ] {
            assert!(
                matches!(validate_task_id(bad), Err(QueueError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn states_and_outcomes_round_trip() {
        for state in TaskState::ALL {
            assert_eq!(state.as_str().parse::<TaskState>().unwrap(), state);
        }
        assert!(
            "done"
                .parse::<TaskState>()
                .unwrap_err()
                .contains("dead_lettered")
        );
        for rank in 0..4 {
            assert_eq!(Priority::from_rank(rank).rank(), rank);
        }
        assert_eq!(
            AttemptOutcome::parse("progress_timeout"),
            Some(AttemptOutcome::ProgressTimeout)
        );
    }

    #[test]
    fn reasons_are_bounded_on_char_boundaries() {
        let long = "é".repeat(MAX_REASON_BYTES);
        let bounded = bound_reason(&long);
        assert!(bounded.len() <= MAX_REASON_BYTES + '…'.len_utf8());
    }
}
