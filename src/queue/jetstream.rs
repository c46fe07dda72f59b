//! The NATS JetStream backend: one fleet shared by any number of daemons on
//! any number of machines.
//!
//! # Layout (for namespace `flotilla`)
//!
//! - Stream `FLOTILLA_TASKS` (work-queue retention, file storage), subjects
//!   `flotilla.tasks.<agent>.<rank>`: one message per queued task, its body
//!   the task envelope, its `Nats-Msg-Id` the task id. One durable pull
//!   consumer per agent and priority (`<agent>-<rank>`), shared by every
//!   daemon, with explicit acks: leasing asks the consumers in priority
//!   order.
//! - Bucket `FLOTILLA_RECORDS`: the task record (state, attempt history,
//!   checkpoint, result) under `t.<id>`. Every transition is a
//!   compare-and-set on the record's revision, so a stale delivery can never
//!   settle a task: this is the fence the SQLite backend gets from its
//!   transactions.
//! - Stream `FLOTILLA_DLQ`, subjects `flotilla.dlq.<agent>.<id>`: a copy of
//!   every dead letter (task, reason, history), written before `+TERM`.
//! - Bucket `FLOTILLA_FLEET` (TTL): each daemon's status snapshot.
//!
//! # Order of writes
//!
//! The record changes first, the message follows (`+ACK`, `-NAK`, `+TERM`).
//! A daemon that dies between the two leaves a message whose record already
//! says what happened: whoever receives it next applies the record's verdict
//! (acks a completed task's leftover message, re-sends a dead letter, delays
//! a task naked with a delay). A message whose delivery no record knows (the
//! record says running, but the broker redelivered it because its holder
//! stopped extending it) ends the old attempt as `lease_expired`.
//!
//! While a task is held, a keeper sends `+WPI` every third of `ack_wait`
//! until the lease deadline, which agent progress extends: `ack_wait` stays
//! short and still covers long tasks, and a dead daemon's tasks come back
//! within `ack_wait`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::{
    AckOutcome, Attempt, AttemptEnd, AttemptOutcome, Lease, LeaseGuard, LeaseKey, LeaseRequest,
    Limits, ListFilter, NewTask, Priority, QueueError, Resolution, Returned, Selection,
    StateCounts, SubmitReceipt, TASK_CONTROLS, TaskQueue, TaskRecord, TaskState, bound_reason,
    exhausted_reason,
};
use crate::clock::{SharedClock, UnixMillis};
use crate::config::BrokerConfig;

/// Attempts kept in a record's history (older ones are dropped; the
/// attempt count stays exact).
pub const MAX_HISTORY: usize = 16;
/// Bytes of a record besides its payload, result and checkpoint (history
/// and fields), kept free of the server's `max_payload`.
const RECORD_RESERVE: usize = 128 * 1024;
/// Most record writes retried after a conflict before giving up.
const CAS_TRIES: usize = 32;
/// Most tasks of one submit call published at once.
const SUBMIT_CONCURRENCY: usize = 256;
/// How often a waiting lease looks again without a wake-up (tasks whose
/// retry delay ended, or redelivered by the broker).
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Times a publish that timed out is sent again with the same id.
const PUBLISH_TRIES: u32 = 5;

/// 62 random bits (from a fresh UUIDv7).
fn random_u64() -> u64 {
    uuid::Uuid::now_v7().as_u128() as u64
}

/// The end of a follow-up to a change already written: the change stands
/// (it is answered as done, so that its caller goes on, e.g. to cancel a
/// cancelled parent's children), and a failed follow-up is logged.
fn followed_up(id: &str, what: &str, result: Result<(), QueueError>) {
    if let Err(error) = result {
        tracing::warn!(task = %id, %error, "the change is made, but could not {what}");
    }
}

fn storage(what: &str, error: impl std::fmt::Display) -> QueueError {
    QueueError::Storage(format!("{what}: {error}"))
}

/// What the backend needs besides the broker settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Limits and windows; the payload and result limits are lowered to
    /// fit the server's `max_payload`.
    pub limits: Limits,
    /// This daemon's name: running tasks it owned before a restart are
    /// returned by [`TaskQueue::requeue_running`].
    pub owner: String,
}

/// Connection counters, shown in `status`.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// A disconnect was seen and no connect since.
    lost: AtomicBool,
    connected: AtomicBool,
    disconnects: AtomicU64,
    reconnects: AtomicU64,
    last_event: Mutex<Option<String>>,
}

/// The broker connection as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BrokerStatus {
    /// The configured server URLs.
    pub url: String,
    /// Connected right now.
    pub connected: bool,
    /// Connections lost since start.
    pub disconnects: u64,
    /// Connections re-established since start.
    pub reconnects: u64,
    /// The last connection event.
    pub last_event: Option<String>,
}

/// Connects to the broker of `config`: reconnects forever with capped,
/// jittered backoff, logs and counts connection events.
///
/// # Errors
/// [`QueueError::Storage`] naming the server when the first connection
/// fails, or when a credentials file cannot be read.
pub async fn connect(
    config: &BrokerConfig,
    base_dir: &std::path::Path,
    name: &str,
    stats: Arc<ConnectionStats>,
) -> Result<async_nats::Client, QueueError> {
    let resolve = |path: &std::path::Path| {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            base_dir.join(path)
        }
    };
    // The addresses without credentials (the client would log them at
    // debug level, and does not use them); the first address's go to the
    // options below when the config gives no other.
    let mut url_auth: Option<(String, Option<String>)> = None;
    let mut addresses = Vec::new();
    // A `tls://` address asks for TLS everywhere: the servers a cluster
    // advertises come as `nats://` addresses, and would otherwise get the
    // credentials in clear text.
    let mut tls_url = false;
    for url in config.urls() {
        let address = url
            .parse::<async_nats::ServerAddr>()
            .map_err(|error| storage("invalid broker.url", error))?;
        tls_url |= address.tls_required();
        if !address.has_user_pass() {
            addresses.push(address);
            continue;
        }
        if url_auth.is_none() {
            // Written percent-encoded in the URL (`p%40ss` for `p@ss`).
            let decode = |text: &str| {
                percent_encoding::percent_decode_str(text)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            url_auth = Some((
                decode(address.username().unwrap_or_default()),
                address.password().map(decode),
            ));
        }
        let mut bare = address.into_inner();
        let _ = bare.set_username("");
        let _ = bare.set_password(None);
        addresses.push(
            async_nats::ServerAddr::from_url(bare)
                .map_err(|error| storage("invalid broker.url", error))?,
        );
    }
    let max_delay = config.reconnect_max_delay.get();
    let events = stats.clone();
    let mut options = async_nats::ConnectOptions::new();
    if config.via_proxy {
        options = options.ignore_discovered_servers();
    }
    let mut options = options
        .name(format!("flotilla {name}"))
        .max_reconnects(None)
        .connection_timeout(config.connect_timeout.get())
        .ping_interval(config.ping_interval.get())
        .request_timeout(Some(config.request_timeout.get()))
        .reconnect_delay_callback(move |attempts| {
            let base = Duration::from_millis(50)
                .saturating_mul(2u32.saturating_pow(attempts.min(16) as u32))
                .min(max_delay);
            base + Duration::from_millis(random_u64() % (base.as_millis() as u64 / 4 + 1))
        })
        .event_callback(move |event| {
            let stats = events.clone();
            async move { stats.record(&event) }
        });
    let password = config
        .password
        .clone()
        .or_else(|| std::env::var("FLOTILLA_BROKER_PASSWORD").ok());
    let token = config
        .token
        .clone()
        .or_else(|| std::env::var("FLOTILLA_BROKER_TOKEN").ok());
    // What the file names wins; the environment only fills in secrets.
    if let Some(user) = &config.user {
        options = options.user_and_password(user.clone(), password.unwrap_or_default());
    } else if let Some(token) = config.token.clone() {
        options = options.token(token);
    } else if let Some(creds) = &config.creds_file {
        let path = resolve(creds);
        options = options.credentials_file(&path).await.map_err(|error| {
            storage(
                &format!("cannot read broker.creds_file {}", path.display()),
                error,
            )
        })?;
    } else if let Some(nkey) = &config.nkey_file {
        let path = resolve(nkey);
        let seed = std::fs::read_to_string(&path).map_err(|error| {
            storage(
                &format!("cannot read broker.nkey_file {}", path.display()),
                error,
            )
        })?;
        options = options.nkey(seed.trim().to_string());
    } else if let Some((user, password)) = url_auth {
        // Credentials written into the URL (`nats://user:pass@host`):
        // the client takes them from the options only.
        options = match password {
            Some(password) => options.user_and_password(user, password),
            None => options.token(user),
        };
    } else if let Some(token) = token {
        options = options.token(token);
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(resolve(ca));
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        options = options.add_client_certificate(resolve(cert), resolve(key));
    }
    if config.tls_required || tls_url {
        options = options.require_tls(true);
    }
    let client = options.connect(addresses).await.map_err(|error| {
        storage(
            &format!(
                "cannot connect to {}",
                crate::config::redact_urls(&config.url)
            ),
            error,
        )
    })?;
    stats.connected.store(true, Ordering::Relaxed);
    Ok(client)
}

impl ConnectionStats {
    fn record(&self, event: &async_nats::Event) {
        use async_nats::Event;
        match event {
            Event::Connected => {
                self.connected.store(true, Ordering::Relaxed);
                if self.lost.swap(false, Ordering::Relaxed) {
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("broker connection re-established");
                }
            }
            Event::Disconnected => {
                self.connected.store(false, Ordering::Relaxed);
                if !self.lost.swap(true, Ordering::Relaxed) {
                    self.disconnects.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!("broker connection lost; reconnecting (publishes are buffered)");
            }
            Event::Closed => tracing::debug!("broker connection closed"),
            Event::SlowConsumer(_) | Event::LameDuckMode | Event::Draining => {
                tracing::warn!(%event, "broker connection event");
            }
            // Each failed reconnect attempt reports an error: the lost
            // connection was logged once already.
            Event::ClientError(_) if self.lost.load(Ordering::Relaxed) => {
                tracing::debug!(%event, "broker reconnect attempt failed");
            }
            Event::ServerError(_) | Event::ClientError(_) => {
                tracing::warn!(%event, "broker connection error");
            }
        }
        *self.last_event.lock().expect("not poisoned") = Some(event.to_string());
    }

    /// The connection as `status` shows it.
    pub fn status(&self, url: &str) -> BrokerStatus {
        BrokerStatus {
            url: url.to_string(),
            connected: self.connected.load(Ordering::Relaxed),
            disconnects: self.disconnects.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            last_event: self.last_event.lock().expect("not poisoned").clone(),
        }
    }
}

/// What a task message carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Envelope {
    id: String,
    agent: String,
    priority: Priority,
    /// The revision of the delete marker this life of the id began on (0
    /// for the first life); a purged task's messages are of older lives.
    #[serde(default)]
    life: u64,
    generation: u32,
    created_ms: UnixMillis,
    payload: Value,
    /// Set on the message that hands a running task to a fallback agent:
    /// the agent it came from…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rerouted_from: Option<String>,
    /// …and the attempt that was handing it over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rerouted_attempt: Option<u32>,
    /// Set on a message that brings a finished task back (dead-letter
    /// replay, escalation retry): the state the record must still be in
    /// for the message to count. Otherwise the republish lost a race (the
    /// task was resolved another way) and the message is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expects: Option<TaskState>,
    /// With `expects`: the version (life, generation) the record must
    /// still be at. A republish made from a read that is out of date (a
    /// second replay of the same dead letter, which ran meanwhile) is
    /// dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expects_version: Option<(u64, u32)>,
}

/// A task record as stored: the public record plus what the backend needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// The public record (nested, not flattened: serde's flatten buffers
    /// every field and made parsing records a tenth of the daemon's CPU).
    task: TaskRecord,
    /// See [`Envelope::life`].
    #[serde(default)]
    life: u64,
    /// Bumped each time the task is published again (replay, resubmit).
    generation: u32,
    /// The delay of the last retry, bounding how long a message seen
    /// early (its `-NAK` lost) is held back again.
    #[serde(default)]
    retry_delay_ms: u64,
    /// The daemon holding the current delivery.
    owner: Option<String>,
    /// Where the current delivery is settled (`+ACK`, `-NAK`, ...).
    reply: Option<String>,
    /// The stream sequence of the message the current delivery is of. A
    /// second message of the same publication (a submit retried after the
    /// broker's duplicate window) must not take the task from it.
    #[serde(default)]
    seq: Option<u64>,
    /// Random id of the write that produced this revision, to tell whether
    /// a write whose reply timed out was applied.
    write: u64,
    /// Hand-overs to another agent in this life of the task (the history
    /// keeps only the last attempts); see [`super::FREE_HANDOVERS`].
    #[serde(default, skip_serializing_if = "is_zero")]
    handovers: u32,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's signature
fn is_zero(value: &u32) -> bool {
    *value == 0
}

impl Record {
    fn from_envelope(envelope: &Envelope, now: UnixMillis) -> Self {
        Self {
            task: TaskRecord {
                id: envelope.id.clone(),
                agent: envelope.agent.clone(),
                priority: envelope.priority,
                state: TaskState::Queued,
                payload: envelope.payload.clone(),
                attempts: 0,
                charged_attempts: 0,
                replays: 0,
                checkpoint: None,
                result: None,
                reason: None,
                visible_ms: envelope.created_ms,
                lease_deadline_ms: None,
                created_ms: envelope.created_ms,
                updated_ms: now,
                finished_ms: None,
                history: Vec::new(),
            },
            life: envelope.life,
            generation: envelope.generation,
            retry_delay_ms: 0,
            owner: None,
            reply: None,
            seq: None,
            write: 0,
            handovers: 0,
        }
    }

    /// Which publication of the task this record follows, in order.
    fn version(&self) -> (u64, u32) {
        (self.life, self.generation)
    }

    fn envelope(&self) -> Envelope {
        Envelope {
            id: self.task.id.clone(),
            agent: self.task.agent.clone(),
            priority: self.task.priority,
            life: self.life,
            generation: self.generation,
            created_ms: self.task.created_ms,
            payload: self.task.payload.clone(),
            rerouted_from: None,
            rerouted_attempt: None,
            expects: None,
            expects_version: None,
        }
    }

    /// A hand-over to another agent (its attempt already ended
    /// `rerouted`) is not charged, up to [`super::FREE_HANDOVERS`] of them.
    fn refund_handover(&mut self) {
        self.handovers = self.handovers.saturating_add(1);
        if self.handovers <= super::FREE_HANDOVERS {
            self.task.charged_attempts = self.task.charged_attempts.saturating_sub(1);
        }
    }

    /// Ends attempt `number` with `end`.
    fn end_attempt(&mut self, number: u32, end: &AttemptEnd, now: UnixMillis) {
        if let Some(attempt) = self.task.history.iter_mut().find(|a| a.number == number) {
            attempt.ended_ms = Some(now);
            attempt.outcome = Some(end.outcome);
            attempt.detail = end.detail.as_deref().map(bound_reason);
            if end.replica.is_some() {
                attempt.replica.clone_from(&end.replica);
            }
        }
    }

    /// Back to the queue, leasable at `visible_ms`.
    fn requeue(&mut self, visible_ms: UnixMillis) {
        self.task.state = TaskState::Queued;
        self.task.visible_ms = visible_ms;
        self.task.lease_deadline_ms = None;
        self.owner = None;
        self.reply = None;
    }

    fn finish(&mut self, state: TaskState, now: UnixMillis) {
        self.task.state = state;
        self.task.lease_deadline_ms = None;
        self.task.finished_ms = Some(now);
        self.owner = None;
        self.reply = None;
    }

    fn holds(&self, key: &LeaseKey) -> bool {
        self.task.state == TaskState::Running
            && self.task.attempts == key.attempt
            && self.life == key.life
    }

    fn stale(&self, key: &LeaseKey) -> QueueError {
        QueueError::StaleLease {
            key: key.clone(),
            state: self.task.state,
        }
    }
}

/// What scans of all records keep of each: enough to count, filter,
/// sort and pick, without payloads, results or history.
#[derive(Debug, Deserialize)]
struct Summary {
    task: TaskSummary,
}

/// The part of a [`TaskRecord`] a [`Summary`] keeps.
#[derive(Debug, Deserialize)]
struct TaskSummary {
    id: String,
    agent: String,
    state: TaskState,
    created_ms: UnixMillis,
    finished_ms: Option<UnixMillis>,
    /// When the record was written (0 from a writer that did not say).
    #[serde(default)]
    updated_ms: UnixMillis,
}

/// A lease this process holds.
#[derive(Debug)]
struct Held {
    reply: String,
    /// When the lease ends unless extended, on the clock's steady reading
    /// (kept only in memory: a step of the wall clock does not move it).
    steady_deadline_ms: UnixMillis,
    /// The lease deadline in the record as this process last wrote it
    /// (wall time): a record showing another was extended meanwhile.
    deadline_ms: UnixMillis,
    /// The record as this process last wrote it, and its revision: an
    /// outcome tries its compare-and-set on it before reading the record.
    cached: Option<(Record, u64)>,
}

/// Stream, bucket and subject names of one namespace.
#[derive(Debug, Clone)]
struct Names {
    namespace: String,
    tasks_stream: String,
    dlq_stream: String,
    records_bucket: String,
    fleet_bucket: String,
}

impl Names {
    fn new(namespace: &str) -> Self {
        let upper = namespace.to_ascii_uppercase();
        Self {
            namespace: namespace.to_string(),
            tasks_stream: format!("{upper}_TASKS"),
            dlq_stream: format!("{upper}_DLQ"),
            records_bucket: format!("{upper}_RECORDS"),
            fleet_bucket: format!("{upper}_FLEET"),
        }
    }

    fn task_subject(&self, agent: &str, priority: Priority) -> String {
        format!("{}.tasks.{agent}.{}", self.namespace, priority.rank())
    }

    fn dlq_subject(&self, agent: &str, id: &str) -> String {
        format!("{}.dlq.{agent}.{}", self.namespace, escape(id))
    }

    fn wake_subject(&self, agent: &str) -> String {
        format!("{}.ready.{agent}", self.namespace)
    }
}

/// A task id as a key or subject token: `.`, `:` and `@` are not allowed
/// there, so they (and the escape `=`) become `=XX`.
fn escape(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for c in id.chars() {
        match c {
            '.' | ':' | '@' | '=' => out.push_str(&format!("={:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn record_key(id: &str) -> String {
    format!("t.{}", escape(id))
}

/// The message id of a publication: unique per life and generation, so the
/// broker's dedup window never swallows a new publication of an old id.
fn msg_id(id: &str, life: u64, generation: u32) -> String {
    match (life, generation) {
        (0, 0) => id.to_string(),
        (0, generation) => format!("{id}#{generation}"),
        (life, 0) => format!("{id}#d{life}"),
        (life, generation) => format!("{id}#d{life}#{generation}"),
    }
}

/// What the records bucket holds for a task id.
enum Lookup {
    /// A record, at this revision.
    Record(Box<Record>, u64),
    /// A delete marker (purged or pruned) at this revision.
    Marker(u64),
    /// Nothing ever.
    Absent,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    names: Names,
    tasks: stream::Stream,
    dlq: stream::Stream,
    records: kv::Store,
    fleet: kv::Store,
    settings: Settings,
    /// The shortest `ack_wait` of the consumers in use (an existing
    /// consumer keeps the value it was created with).
    ack_wait: Mutex<Duration>,
    /// Told when [`Self::ack_wait`] is lowered, so that the keep-alive
    /// loop goes by it at once.
    ack_wait_lowered: Arc<tokio::sync::Notify>,
    request_timeout: Duration,
    clock: SharedClock,
    consumers: tokio::sync::Mutex<HashMap<(String, i64), consumer::PullConsumer>>,
    held: Mutex<HashMap<LeaseKey, Held>>,
    wake: Mutex<HashMap<String, Arc<Notify>>>,
    stats: Arc<ConnectionStats>,
    url: String,
    returns: mpsc::UnboundedSender<Returned>,
    exhausted: super::Exhausted,
    /// How long a daemon's fleet entry outlives its last write.
    fleet_ttl: Duration,
}

/// The JetStream queue. Cheap to share behind an `Arc`.
pub struct JetStreamQueue {
    inner: Arc<Inner>,
    background: Vec<JoinHandle<()>>,
    /// Held by a periodic reader while it counts: the daemon's periodic
    /// readers share one count.
    counting: tokio::sync::Mutex<()>,
    /// The last counts taken (by any caller), and when: the periodic
    /// readers' shared count, and shared in the daemon's fleet entry for a
    /// `status` that reads the broker itself.
    last: std::sync::Mutex<Option<Counted>>,
    /// The counts kept up to date from the records written since the last
    /// look.
    tally: tokio::sync::Mutex<Tally>,
    /// The hourly full count while it is read (locked after `tally`).
    recount: tokio::sync::Mutex<Option<Tally>>,
}

/// Records the hourly full count reads per count (about a second here),
/// besides as many as were written since the last count.
const RECOUNT_CHUNK: usize = 100_000;

/// How often a [`Tally`] is counted again from every record (beside the
/// one in use, which it then replaces): between full counts,
/// the completed counts rise with each completion read but do not fall
/// when a completed task is pruned (its purge marker names no agent) or
/// submitted again.
const RECOUNT_EVERY_MS: UnixMillis = 3_600_000;

/// The task counts of the records bucket, kept up to date by reading only
/// the records written since the last look: a count costs in proportion
/// to what changed since, not to the completed tasks the retention keeps.
/// A read cut short leaves a consistent tally (each record applied in
/// revision order, and `read` with it), which the next look goes on from.
#[derive(Default)]
struct Tally {
    /// Each record not completed, by key: only these are kept, so the
    /// tally stays as small as the live work.
    live: HashMap<String, Live>,
    /// Completed records per agent (see [`RECOUNT_EVERY_MS`]).
    completed: HashMap<String, u64>,
    /// The last revision read; 0 before the first read.
    read: u64,
    /// When the last full read began, on the clock's steady reading.
    recounted: UnixMillis,
    /// When the bucket read was created (a bucket made anew starts its
    /// revisions again).
    bucket_created: String,
}

/// What a [`Tally`] reads of a record.
#[derive(Deserialize)]
struct StateOf {
    task: Live,
    #[serde(default)]
    owner: Option<String>,
}

/// What a [`Tally`] keeps of a record not completed: enough to count the
/// live work, and to list it (newest first) without reading every record.
#[derive(Debug, Deserialize)]
struct Live {
    id: String,
    agent: String,
    state: TaskState,
    created_ms: UnixMillis,
    /// The daemon holding a running task (kept only while running).
    #[serde(skip)]
    owner: Option<String>,
}

impl Tally {
    /// An empty tally of the bucket created at `created`, to be read from
    /// its first record, begun at `now` (the clock's steady reading).
    fn fresh(bucket_created: String, now: UnixMillis) -> Self {
        Self {
            recounted: now,
            bucket_created,
            ..Self::default()
        }
    }

    /// Applies the record written under `key` at `revision` (`None`: the
    /// key was deleted or purged).
    fn apply(&mut self, key: &str, value: Option<&[u8]>, revision: u64) {
        if revision <= self.read {
            // Read already: an ordered consumer made again before its
            // first message starts from the first record.
            return;
        }
        self.read = revision;
        let Some(bytes) = value else {
            // A completed record's count stays until the next full read:
            // the marker does not say whose it was.
            self.live.remove(key);
            return;
        };
        let Ok(record) = serde_json::from_slice::<StateOf>(bytes) else {
            return;
        };
        if record.task.state == TaskState::Completed {
            self.live.remove(key);
            *self.completed.entry(record.task.agent).or_default() += 1;
        } else {
            let mut live = record.task;
            if live.state == TaskState::Running {
                live.owner = record.owner;
            }
            self.live.insert(key.to_string(), live);
        }
    }

    fn counts(&self) -> Vec<(String, StateCounts)> {
        let mut counts: BTreeMap<String, StateCounts> = BTreeMap::new();
        for live in self.live.values() {
            counts
                .entry(live.agent.clone())
                .or_default()
                .add(live.state, 1);
        }
        for (agent, completed) in &self.completed {
            counts
                .entry(agent.clone())
                .or_default()
                .add(TaskState::Completed, *completed);
        }
        counts.retain(|_, counts| *counts != StateCounts::default());
        counts.into_iter().collect()
    }

    /// The creation times and ids of the `limit` newest records not
    /// completed that `keep` keeps, newest first (as [`TaskQueue::list`]
    /// orders them).
    fn newest(&self, keep: impl Fn(&Live) -> bool, limit: usize) -> Vec<(UnixMillis, String)> {
        let newer = |a: &&Live, b: &&Live| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id));
        let mut picked: Vec<&Live> = self.live.values().filter(|live| keep(live)).collect();
        if picked.len() > limit {
            picked.select_nth_unstable_by(limit, newer);
            picked.truncate(limit);
        }
        picked.sort_unstable_by(newer);
        picked
            .into_iter()
            .map(|live| (live.created_ms, live.id.clone()))
            .collect()
    }
}

/// Counts per agent, and when they were taken (the clock's steady reading).
type Counted = (UnixMillis, Vec<(String, StateCounts)>);

impl Drop for JetStreamQueue {
    fn drop(&mut self) {
        for task in &self.background {
            task.abort();
        }
    }
}

impl JetStreamQueue {
    /// Opens (creating where missing) the streams and buckets of
    /// `config.namespace` on a connected client.
    ///
    /// # Errors
    /// [`QueueError::Storage`] when the broker has no JetStream, refuses a
    /// stream, or an existing stream's settings conflict.
    pub async fn open(
        client: async_nats::Client,
        stats: Arc<ConnectionStats>,
        config: &BrokerConfig,
        mut settings: Settings,
        clock: SharedClock,
    ) -> Result<Self, QueueError> {
        let names = Names::new(&config.namespace);
        let mut js = jetstream::new(client.clone());
        js.set_timeout(config.request_timeout.get());
        let replicas = config.replicas as usize;
        let duplicate_window = config.duplicate_window.get();
        let server_max = client.server_info().max_payload;
        let fits = server_max.saturating_sub(RECORD_RESERVE) / 2;
        for (key, limit) in [
            (
                "store.max_payload_bytes",
                &mut settings.limits.max_payload_bytes,
            ),
            (
                "store.max_result_bytes",
                &mut settings.limits.max_result_bytes,
            ),
        ] {
            if *limit > fits {
                tracing::info!(
                    "{key} = {} does not fit the broker's max_payload = {server_max} (a record holds a payload and a result); using {fits}. Raise max_payload in nats-server.conf to allow more.",
                    *limit
                );
                *limit = fits;
            }
        }
        let tasks = open_stream(
            &js,
            stream::Config {
                name: names.tasks_stream.clone(),
                description: Some("flotilla: queued and running tasks".into()),
                subjects: vec![format!("{}.tasks.>", names.namespace)],
                retention: stream::RetentionPolicy::WorkQueue,
                discard: stream::DiscardPolicy::New,
                num_replicas: replicas,
                duplicate_window,
                ..Default::default()
            },
        )
        .await?;
        let dlq = open_stream(
            &js,
            stream::Config {
                name: names.dlq_stream.clone(),
                description: Some("flotilla: dead letters (task, reason, history)".into()),
                subjects: vec![format!("{}.dlq.>", names.namespace)],
                retention: stream::RetentionPolicy::Limits,
                num_replicas: replicas,
                duplicate_window,
                ..Default::default()
            },
        )
        .await?;
        let records = bucket(
            &js,
            kv::Config {
                bucket: names.records_bucket.clone(),
                description: "flotilla: task records".into(),
                history: 1,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        let fleet = bucket(
            &js,
            kv::Config {
                bucket: names.fleet_bucket.clone(),
                description: "flotilla: daemons and their replicas".into(),
                history: 1,
                max_age: config.fleet_ttl.get(),
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        let (returns, returned) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            returns,
            client: client.clone(),
            js,
            names,
            tasks,
            dlq,
            records,
            fleet,
            settings,
            ack_wait: Mutex::new(config.ack_wait.get()),
            ack_wait_lowered: Arc::default(),
            request_timeout: config.request_timeout.get(),
            clock,
            consumers: tokio::sync::Mutex::default(),
            held: Mutex::default(),
            wake: Mutex::default(),
            stats,
            url: crate::config::redact_urls(&config.url),
            exhausted: super::Exhausted::default(),
            fleet_ttl: config.fleet_ttl.get(),
        });
        let wakes = client
            .subscribe(format!("{}.ready.>", inner.names.namespace))
            .await
            .map_err(|error| storage("cannot subscribe to wake-ups", error))?;
        let background = vec![
            tokio::spawn(keep_alive(
                Arc::downgrade(&inner),
                inner.ack_wait_lowered.clone(),
            )),
            tokio::spawn(release_returned(Arc::downgrade(&inner), returned)),
            tokio::spawn(listen_for_wakes(Arc::downgrade(&inner), wakes)),
        ];
        Ok(Self {
            inner,
            background,
            counting: tokio::sync::Mutex::new(()),
            last: std::sync::Mutex::new(None),
            tally: tokio::sync::Mutex::new(Tally::default()),
            recount: tokio::sync::Mutex::new(None),
        })
    }

    /// The tally, brought up to date with the records written since its
    /// last look (see [`Tally`]).
    async fn tally(&self) -> Result<tokio::sync::MutexGuard<'_, Tally>, QueueError> {
        // Locked first: the stream's state must be no older than what the
        // tally read, or a count that waited here would take its last
        // revision for a bucket made anew.
        let mut tally = self.tally.lock().await;
        let info = self.inner.records_info().await?;
        let created = format!("{:?}", info.created);
        let now = self.inner.clock.steady_ms();
        if created != tally.bucket_created || info.state.last_sequence < tally.read {
            // The bucket made anew (or none read yet): nothing to count
            // meanwhile, so every record is read now.
            *tally = Tally::fresh(created.clone(), now);
        }
        // Written since the last count: the hourly full count reads as
        // many more than its chunk, so that it gains on the writes.
        let written = info.state.last_sequence.saturating_sub(tally.read);
        if written > 0 {
            self.inner.advance(&mut tally, None).await?;
        }
        if now.saturating_sub(tally.recounted) >= RECOUNT_EVERY_MS {
            // The hourly full count is read beside the one in use, a
            // chunk per count, and replaces it once it has caught up: the
            // counts never wait for a whole read.
            let mut recount = self.recount.lock().await;
            let next = match recount.take() {
                Some(next) if next.bucket_created == created => next,
                _ => Tally::fresh(created, now),
            };
            let next = recount.insert(next);
            let chunk =
                RECOUNT_CHUNK.saturating_add(usize::try_from(written).unwrap_or(usize::MAX));
            if self.inner.advance(next, Some(chunk)).await? {
                *tally = recount.take().expect("just inserted");
            }
        }
        Ok(tally)
    }

    /// The ids `selection` names, each once, after checking that every
    /// one is a dead letter (every dead letter's, oldest first, for
    /// [`Selection::All`]). Only ids: the records are read again one at a
    /// time as they are replayed or purged, so that a large dead-letter
    /// queue is never held in memory whole.
    async fn dead_letters(&self, selection: &Selection) -> Result<Vec<String>, QueueError> {
        match selection {
            Selection::All => {
                let dead = self
                    .tally()
                    .await?
                    .newest(|live| live.state == TaskState::DeadLettered, usize::MAX);
                Ok(dead.into_iter().rev().map(|(_, id)| id).collect())
            }
            Selection::Ids(ids) => self.inner.checked_dead_letters(ids).await,
        }
    }

    /// [`TaskQueue::counts`], taken at most `max_age` ago: the watchdog
    /// and the metrics of one daemon share a count. One count runs at a
    /// time.
    ///
    /// # Errors
    /// As [`TaskQueue::counts`].
    pub async fn recent_counts(
        &self,
        max_age: Duration,
    ) -> Result<Vec<(String, StateCounts)>, QueueError> {
        let _counting = self.counting.lock().await;
        let max_age = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
        if let Some((at, counts)) = self.last.lock().expect("not poisoned").as_ref()
            && self.inner.clock.steady_ms().saturating_sub(*at) < max_age
        {
            return Ok(counts.clone());
        }
        // Leaves its result in `last`.
        self.counts().await
    }

    /// The counts taken last, and when (wall time); `None` before the
    /// first.
    pub fn last_counts(&self) -> Option<(UnixMillis, Vec<(String, StateCounts)>)> {
        let last = self.last.lock().expect("not poisoned");
        let (at, counts) = last.as_ref()?;
        Some((self.inner.clock.wall_of(*at), counts.clone()))
    }

    /// How many messages the records' stream holds: task records and the
    /// markers of deleted ones.
    ///
    /// # Errors
    /// When the broker cannot be asked.
    pub async fn records_held(&self) -> Result<u64, QueueError> {
        Ok(self.inner.records_info().await?.state.messages)
    }

    /// The broker connection as `status` shows it.
    pub fn broker_status(&self) -> BrokerStatus {
        self.inner.stats.status(&self.inner.url)
    }

    /// How long a daemon's fleet entry outlives its last write
    /// (`broker.fleet_ttl`): a daemon gone is out of the fleet after it.
    pub fn fleet_ttl(&self) -> Duration {
        self.inner.fleet_ttl
    }

    /// The largest message the connected server takes (its
    /// `max_payload`).
    pub fn max_message_bytes(&self) -> usize {
        self.inner.client.server_info().max_payload
    }

    /// The payload limit in force (the configured one, lowered to fit the
    /// broker).
    pub fn max_payload_bytes(&self) -> usize {
        self.inner.settings.limits.max_payload_bytes
    }

    /// Stores `value` as this daemon's entry in the fleet table.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if the broker refuses it.
    pub async fn put_fleet(&self, name: &str, value: &Value) -> Result<(), QueueError> {
        self.inner
            .bounded(
                "write the fleet table",
                self.inner
                    .fleet
                    .put(escape(name), Bytes::from(value.to_string())),
            )
            .await?;
        Ok(())
    }

    /// Every daemon entry still in the fleet table (entries expire after
    /// `broker.fleet_ttl`), by name.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if the broker cannot be read.
    pub async fn fleet(&self) -> Result<BTreeMap<String, Value>, QueueError> {
        let entries = scan::<Value>(&self.inner.client, &self.inner.fleet, ">", |_| true).await?;
        Ok(entries
            .into_iter()
            .map(|(key, value, _)| (key, value))
            .collect())
    }

    /// Stores an operator's setting under `key` (e.g. a forced degradation
    /// level), shared by every daemon; `null` clears it.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if the broker refuses it.
    pub async fn put_control(&self, key: &str, value: &Value) -> Result<(), QueueError> {
        self.inner
            .bounded(
                "write an operator setting",
                self.inner
                    .records
                    .put(format!("c.{}", escape(key)), Bytes::from(value.to_string())),
            )
            .await?;
        Ok(())
    }

    /// The operator's setting under `key`, if any.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if the broker cannot be read.
    pub async fn get_control(&self, key: &str) -> Result<Option<Value>, QueueError> {
        let bytes = self
            .inner
            .bounded(
                "read an operator setting",
                self.inner.records.get(format!("c.{}", escape(key))),
            )
            .await?;
        Ok(bytes
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .filter(|value| !value.is_null()))
    }

    /// Writes `value` under operator key `key` only if what is there now
    /// is `expected` (`None`: nothing, or `null`), by compare-and-set on
    /// the key's revision. Returns whether it was written.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if the broker cannot be read or written.
    pub async fn compare_and_put_control(
        &self,
        key: &str,
        expected: Option<&Value>,
        value: &Value,
    ) -> Result<bool, QueueError> {
        let key = format!("c.{}", escape(key));
        let entry = self
            .inner
            .bounded("read an operator setting", self.inner.records.entry(&key))
            .await?;
        let (current, revision) = match &entry {
            Some(entry) if entry.operation == kv::Operation::Put => (
                serde_json::from_slice::<Value>(&entry.value)
                    .ok()
                    .filter(|value| !value.is_null()),
                entry.revision,
            ),
            // Deleted or purged: a marker to write over.
            Some(entry) => (None, entry.revision),
            None => (None, 0),
        };
        if current.as_ref() != expected.filter(|value| !value.is_null()) {
            return Ok(false);
        }
        let bytes = Bytes::from(value.to_string());
        let written = put_at(
            &self.inner.records,
            &key,
            bytes,
            revision,
            self.inner.request_timeout,
        )
        .await;
        match written {
            Ok(_) => Ok(true),
            // A conflict or a failure may be our own write applied under a
            // lost reply: what is stored now says.
            Err(error) => {
                let now = self
                    .inner
                    .bounded("read an operator setting", self.inner.records.get(&key))
                    .await?
                    .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
                match error {
                    _ if now.as_ref() == Some(value) => Ok(true),
                    None => Ok(false),
                    Some(error) => Err(storage("cannot write an operator setting", error)),
                }
            }
        }
    }

    /// How many nodes of the task stream's replica group are current (the
    /// leader and the followers that are neither offline nor behind).
    ///
    /// # Errors
    /// [`QueueError::Storage`] if the broker cannot be asked.
    pub async fn current_nodes(&self) -> Result<u32, QueueError> {
        let info = self
            .inner
            .bounded(
                "read the task stream's cluster",
                self.inner.tasks.get_info(),
            )
            .await?;
        Ok(info.cluster.map_or(1, |cluster| {
            u32::from(cluster.leader.is_some())
                + cluster
                    .replicas
                    .iter()
                    .filter(|peer| peer.current && !peer.offline)
                    .count() as u32
        }))
    }

    /// The fleet entry of daemon `name`.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if the broker cannot be read.
    pub async fn fleet_entry(&self, name: &str) -> Result<Option<Value>, QueueError> {
        let bytes = self
            .inner
            .bounded("read the fleet table", self.inner.fleet.get(escape(name)))
            .await?;
        Ok(bytes.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
    }

    /// Deletes completed tasks older than the retention. Returns how many.
    ///
    /// The records bucket keeps each record's latest write only, in the
    /// order written, and a completed record's last write is its
    /// completion: the records past the retention come before those
    /// completed after it. So a prune reads from the oldest record up to
    /// the first completed one that finished after the cutoff (give or
    /// take [`SKEW_MS`] for daemons' clocks), not every record; the
    /// records not completed it passes on the way (dead letters waiting
    /// for a replay, say) are left alone. A deleted record leaves a
    /// marker, which its id's next life starts on; markers older than the
    /// retention by [`MARKER_MARGIN_MS`] are deleted as they are met, or
    /// they would stay in the stream for good.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if the broker fails.
    pub async fn prune(&self) -> Result<u64, QueueError> {
        let now = self.inner.clock.now_ms();
        let cutoff = now.saturating_sub(
            u64::try_from(self.inner.settings.limits.retention.as_millis()).unwrap_or(0),
        );
        let mut deleted = 0;
        loop {
            // Records to delete: key, revision read, task id.
            let mut found: Vec<(String, u64, String)> = Vec::new();
            // Markers of deleted records, with their revision: deleted once
            // a record that completed over MARKER_MARGIN_MS before the
            // cutoff comes after them (so they are older than the
            // retention by that much, give or take the clocks' skew). By
            // then the id's old message ids are past the broker's window,
            // and a message of its old run still waiting somewhere (in the
            // queue of an agent no daemon runs, say) is old enough for
            // `claim` to drop it.
            let mut markers: Vec<(String, u64)> = Vec::new();
            let mut markers_before = 0;
            read_bucket(
                &self.inner.client,
                &self.inner.records,
                "t.>",
                consumer::DeliverPolicy::All,
                |key, value, revision| {
                    let Some(bytes) = value else {
                        // At most a batch a round (the rest in later ones).
                        if markers.len() < PRUNE_BATCH {
                            markers.push((key.to_string(), revision));
                        }
                        return ControlFlow::Continue(());
                    };
                    let Ok(summary) = serde_json::from_slice::<Summary>(bytes) else {
                        return ControlFlow::Continue(());
                    };
                    let finished = match (summary.task.state, summary.task.finished_ms) {
                        (TaskState::Completed, Some(finished)) => finished,
                        _ => return ControlFlow::Continue(()),
                    };
                    if finished.saturating_add(MARKER_MARGIN_MS) < cutoff {
                        markers_before = revision;
                    }
                    if finished < cutoff {
                        found.push((key.to_string(), revision, summary.task.id));
                    } else if finished >= cutoff.saturating_add(SKEW_MS) {
                        return ControlFlow::Break(());
                    }
                    if found.len() >= PRUNE_BATCH {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
            )
            .await?;
            for (key, revision) in markers {
                if revision >= markers_before {
                    break;
                }
                // The old run's journal and links, in case deleting them
                // with its record failed: a new run under the id must not
                // inherit them (its submit deletes them only while the
                // marker is there to say there was an old run).
                let Some(escaped) = key.strip_prefix("t.") else {
                    continue;
                };
                if self.inner.forget_escaped_controls(escaped).await.is_err() {
                    continue;
                }
                // Up to the marker: a record written since stays.
                let _ = self
                    .inner
                    .bounded(
                        "delete an old marker",
                        self.inner
                            .records
                            .stream
                            .purge()
                            .filter(format!("{}{key}", self.inner.records.prefix))
                            .sequence(revision + 1)
                            .into_future(),
                    )
                    .await;
            }
            let (batch, before) = (found.len(), deleted);
            for (key, revision, id) in found {
                // A record written since the read (the task submitted
                // again) stays, and so do its controls.
                if self
                    .inner
                    .bounded(
                        "delete a task record",
                        self.inner
                            .records
                            .purge_expect_revision(&key, Some(revision)),
                    )
                    .await
                    .is_ok()
                {
                    deleted += 1;
                    // Its journal and delegation links go with it.
                    self.inner.forget_controls(&id).await;
                }
            }
            // A full batch: read on, as long as the last one got somewhere.
            if batch < PRUNE_BATCH || deleted == before {
                return Ok(deleted);
            }
        }
    }
}

/// How much older than the retention a marker is before a prune deletes
/// it, and a message before a claim takes it for a leftover of an old run:
/// the daemons' clocks may differ by less than this.
const MARKER_MARGIN_MS: UnixMillis = 24 * 3_600_000;

/// Records a prune reads and deletes at most at a time.
const PRUNE_BATCH: usize = 10_000;

/// How far the daemons' clocks are taken to differ: how much later than
/// the cutoff a completed record may have finished and still come before
/// one past it, or a record been created and still come before one
/// completed earlier.
const SKEW_MS: UnixMillis = 10 * 60 * 1000;

/// Stream sequences the first window of a listing of completed tasks
/// spans, back from the end of the records' stream (records replaced or
/// deleted since leave gaps); each further window spans twice as many as
/// the one before, up to [`LIST_WINDOW_MAX`].
const LIST_WINDOW_FIRST: u64 = 1_000;

/// Stream sequences a window of a listing of completed tasks spans at
/// most.
const LIST_WINDOW_MAX: u64 = 100_000;

/// Opens the stream of `config` on file storage, creating it if missing.
/// Writes `bytes` under `key` of `records` over `revision` (0: create),
/// within `limit`. Returns the new revision; `Err(None)` when someone
/// else wrote first, `Err(Some(why))` when the write failed or its answer
/// was lost (it may have been applied: the caller reads to know).
async fn put_at(
    records: &kv::Store,
    key: &str,
    bytes: Bytes,
    revision: u64,
    limit: Duration,
) -> Result<u64, Option<String>> {
    let call = async {
        if revision == 0 {
            records
                .create(key, bytes)
                .await
                .map_err(|error| match error.kind() {
                    kv::CreateErrorKind::AlreadyExists => None,
                    _ => Some(error.to_string()),
                })
        } else {
            records
                .update(key, bytes, revision)
                .await
                .map_err(|error| match error.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => None,
                    _ => Some(error.to_string()),
                })
        }
    };
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| Err(Some("timed out".to_string())))
}

async fn open_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, QueueError> {
    let name = config.name.clone();
    js.get_or_create_stream(stream::Config {
        storage: stream::StorageType::File,
        ..config
    })
    .await
    .map_err(|error| storage(&format!("cannot open stream {name}"), error))
}

async fn bucket(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, QueueError> {
    match js.get_key_value(&config.bucket).await {
        Ok(store) => Ok(store),
        Err(_) => {
            let name = config.bucket.clone();
            match js.create_key_value(config).await {
                Ok(store) => Ok(store),
                // Another daemon created it meanwhile.
                Err(error) => js
                    .get_key_value(&name)
                    .await
                    .map_err(|_| storage(&format!("cannot open bucket {name}"), error)),
            }
        }
    }
}

/// The latest value of every key of `store` matching `filter` (`>` for
/// all), deleted keys left out, each parsed as `T` (values that do not
/// parse are skipped), of those `keep` keeps. Only the `T`s kept are held,
/// so a small `T` and a narrow `keep` keep the scan of a large bucket
/// small.
async fn scan<T: serde::de::DeserializeOwned>(
    client: &async_nats::Client,
    store: &kv::Store,
    filter: &str,
    keep: impl Fn(&T) -> bool,
) -> Result<Vec<(String, T, u64)>, QueueError> {
    // Keys written during the scan come again: keep each key's latest.
    let mut latest: BTreeMap<String, (T, u64)> = BTreeMap::new();
    read_bucket(
        client,
        store,
        filter,
        consumer::DeliverPolicy::LastPerSubject,
        |key, value, revision| {
            match value {
                None => {
                    latest.remove(key);
                }
                Some(bytes) => {
                    if latest.get(key).is_none_or(|(_, seen)| *seen < revision)
                        && let Ok(value) = serde_json::from_slice::<T>(bytes)
                    {
                        // A key written again during the scan comes again,
                        // and may no longer be kept.
                        if keep(&value) {
                            latest.insert(key.to_string(), (value, revision));
                        } else {
                            latest.remove(key);
                        }
                    }
                }
            }
            ControlFlow::Continue(())
        },
    )
    .await?;
    Ok(latest
        .into_iter()
        .map(|(key, (value, revision))| (key, value, revision))
        .collect())
}

/// Reads the messages of `store` on keys matching `filter` from where
/// `policy` says, in revision order, until none is pending or `each`
/// breaks, handing each to `each` with its key, its value (`None` for a
/// deletion or purge marker) and its revision.
async fn read_bucket(
    client: &async_nats::Client,
    store: &kv::Store,
    filter: &str,
    policy: consumer::DeliverPolicy,
    mut each: impl FnMut(&str, Option<&[u8]>, u64) -> ControlFlow<()>,
) -> Result<(), QueueError> {
    let prefix = store.prefix.clone();
    let timeout = Duration::from_secs(30);
    let consumer = tokio::time::timeout(
        timeout,
        store.stream.create_consumer(consumer::push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: format!("{prefix}{filter}"),
            deliver_policy: policy,
            replay_policy: consumer::ReplayPolicy::Instant,
            ..Default::default()
        }),
    )
    .await
    .map_err(|_| storage("cannot scan the bucket", "timed out"))?
    .map_err(|error| storage("cannot scan the bucket", error))?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(());
    }
    let mut messages = tokio::time::timeout(timeout, consumer.messages())
        .await
        .map_err(|_| storage("cannot scan the bucket", "timed out"))?
        .map_err(|error| storage("cannot scan the bucket", error))?;
    loop {
        let message = match tokio::time::timeout(timeout, messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(error))) => return Err(storage("bucket scan failed", error)),
            Ok(None) => break,
            Err(_) => return Err(storage("bucket scan", "timed out")),
        };
        let (pending, revision) = message
            .info()
            .map(|info| (info.pending, info.stream_sequence))
            .unwrap_or((0, 0));
        let deleted = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get("KV-Operation"))
            .is_some();
        if let Some(key) = message.subject.strip_prefix(prefix.as_str())
            && each(key, (!deleted).then_some(&message.payload[..]), revision).is_break()
        {
            break;
        }
        if pending == 0 {
            break;
        }
    }
    Ok(())
}

/// Why a publish failed.
enum PublishFailure {
    /// Larger than the broker's `max_payload`.
    TooLarge,
    /// Anything else, after the retries.
    Failed(String),
}

/// What a record update decided.
enum Change<T> {
    /// Write the record, then answer `T`.
    Write(T),
    /// Answer `T` without writing.
    Keep(T),
}

impl Inner {
    fn now(&self) -> UnixMillis {
        self.clock.now_ms()
    }

    fn notify(&self, agent: &str) -> Arc<Notify> {
        self.wake
            .lock()
            .expect("not poisoned")
            .entry(agent.to_string())
            .or_default()
            .clone()
    }

    /// Tells every daemon that `agent` has a task ready.
    async fn ring(&self, agent: &str) {
        let publish = self
            .client
            .publish(self.names.wake_subject(agent), Bytes::new());
        let _ = tokio::time::timeout(self.request_timeout, publish).await;
    }

    /// Acks the message a written hand-over replaced, if any.
    async fn settle_replaced(&self, replaced: Option<String>) {
        if let Some(old) = replaced {
            self.settle_message(&old, Bytes::from_static(b"+ACK")).await;
        }
    }

    async fn settle_message(&self, reply: &str, verb: Bytes) {
        let publish = self.client.publish(reply.to_string(), verb);
        match tokio::time::timeout(self.request_timeout, publish).await {
            Ok(Ok(())) => {}
            // Lost with the connection: the broker redelivers the message
            // after ack_wait and its record decides what happens.
            Ok(Err(error)) => tracing::warn!(%error, "could not settle a task message"),
            Err(_) => tracing::warn!("could not settle a task message: the connection is down"),
        }
    }

    async fn lookup(&self, id: &str) -> Result<Lookup, QueueError> {
        let entry = self
            .bounded("read a task record", self.records.entry(record_key(id)))
            .await?;
        match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let record = serde_json::from_slice(&entry.value)
                    .map_err(|error| storage(&format!("task record {id:?} is corrupt"), error))?;
                Ok(Lookup::Record(Box::new(record), entry.revision))
            }
            Some(entry) => Ok(Lookup::Marker(entry.revision)),
            None => Ok(Lookup::Absent),
        }
    }

    async fn entry(&self, id: &str) -> Result<Option<(Record, u64)>, QueueError> {
        match self.lookup(id).await? {
            Lookup::Record(record, revision) => Ok(Some((*record, revision))),
            Lookup::Marker(_) | Lookup::Absent => Ok(None),
        }
    }

    /// Awaits a broker call for at most `broker.request_timeout`: while the
    /// connection is down, the client's queue fills and a call could
    /// otherwise wait as long as the outage.
    async fn bounded<T, E: std::fmt::Display>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, QueueError> {
        match tokio::time::timeout(self.request_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(storage(&format!("cannot {what}"), error)),
            Err(_) => Err(storage(&format!("cannot {what}"), "timed out")),
        }
    }

    /// The state of the records' stream, as the broker has it now.
    async fn records_info(&self) -> Result<stream::Info, QueueError> {
        self.bounded("read the records' stream", self.records.stream.get_info())
            .await
    }

    /// Writes `record` over `revision` (0: create). Returns the new
    /// revision, or `None` if someone else wrote first.
    async fn write(&self, record: &mut Record, revision: u64) -> Result<Option<u64>, QueueError> {
        record.write = random_u64();
        record.task.updated_ms = self.now();
        if record.task.history.len() > MAX_HISTORY {
            let excess = record.task.history.len() - MAX_HISTORY;
            record.task.history.drain(..excess);
        }
        let key = record_key(&record.task.id);
        let bytes = Bytes::from(serde_json::to_vec(record).expect("record serializes"));
        let written = put_at(&self.records, &key, bytes, revision, self.request_timeout).await;
        match written {
            Ok(revision) => Ok(Some(revision)),
            Err(error) => {
                // A conflict may be our own write, applied under a reply
                // that was lost (the client then retries and finds it), and
                // a failure may have applied too: the record says which.
                match self.entry(&record.task.id).await {
                    Ok(Some((stored, revision))) if stored.write == record.write => {
                        Ok(Some(revision))
                    }
                    Ok(_) if error.is_none() => Ok(None),
                    Ok(_) => Err(storage(
                        "cannot write a task record",
                        error.unwrap_or_default(),
                    )),
                    Err(read) => Err(storage(
                        "cannot write a task record",
                        format!("{}; and then: {read}", error.unwrap_or_default()),
                    )),
                }
            }
        }
    }

    /// Reads the record of `id`, lets `decide` change it, and writes it
    /// back if the record did not change meanwhile (else starts over).
    async fn update<T>(
        &self,
        id: &str,
        lease: Option<&LeaseKey>,
        mut decide: impl FnMut(&mut Record) -> Result<Change<T>, QueueError>,
    ) -> Result<T, QueueError> {
        // Our own last write of a lease we hold saves a read; if anyone
        // wrote since, the compare-and-set fails and the record is read.
        let mut cached = lease.and_then(|key| {
            self.held
                .lock()
                .expect("not poisoned")
                .get_mut(key)
                .and_then(|held| held.cached.take())
        });
        for _ in 0..CAS_TRIES {
            let (mut record, revision) = match cached.take() {
                Some(found) => found,
                None => match self.entry(id).await? {
                    Some(found) => found,
                    None => {
                        if let Some(key) = lease {
                            self.unhold(key);
                        }
                        return Err(QueueError::NotFound { id: id.to_string() });
                    }
                },
            };
            let decided = match decide(&mut record) {
                Ok(decided) => decided,
                Err(error) => {
                    // The lease is gone: stop keeping its message alive,
                    // which now belongs to another delivery.
                    if let Some(key) = lease {
                        self.unhold(key);
                    }
                    return Err(error);
                }
            };
            match decided {
                Change::Keep(answer) => return Ok(answer),
                Change::Write(answer) => {
                    if let Some(revision) = self.write(&mut record, revision).await? {
                        if let Some(key) = lease
                            && let Some(held) = self.held.lock().expect("not poisoned").get_mut(key)
                        {
                            held.cached = Some((record, revision));
                        }
                        return Ok(answer);
                    }
                }
            }
        }
        Err(storage(
            &format!("task {id:?}"),
            "the record kept changing under this write; try again",
        ))
    }

    async fn consumer(
        &self,
        agent: &str,
        priority: Priority,
    ) -> Result<consumer::PullConsumer, QueueError> {
        let rank = priority.rank();
        let mut consumers = self.consumers.lock().await;
        if let Some(consumer) = consumers.get(&(agent.to_string(), rank)) {
            return Ok(consumer.clone());
        }
        let name = format!("{agent}-{rank}");
        let ack_wait = *self.ack_wait.lock().expect("not poisoned");
        let consumer = tokio::time::timeout(
            self.request_timeout,
            self.tasks.get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    description: Some(format!("flotilla: {} tasks of {agent}", priority.as_str())),
                    filter_subject: self.names.task_subject(agent, priority),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait,
                    max_deliver: -1,
                    max_ack_pending: 100_000,
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                },
            ),
        )
        .await
        .map_err(|_| storage(&format!("cannot open consumer {name}"), "timed out"))?
        .map_err(|error| storage(&format!("cannot open consumer {name}"), error))?;
        let actual = consumer.cached_info().config.ack_wait;
        let mut ack_wait = self.ack_wait.lock().expect("not poisoned");
        if actual != *ack_wait && !actual.is_zero() {
            tracing::warn!(
                consumer = %name,
                configured = ?*ack_wait,
                ?actual,
                "the consumer was created with another broker.ack_wait; keeping tasks alive for the shorter one"
            );
            *ack_wait = (*ack_wait).min(actual);
            self.ack_wait_lowered.notify_one();
        }
        drop(ack_wait);
        consumers.insert((agent.to_string(), rank), consumer.clone());
        Ok(consumer)
    }

    /// Publishes `envelope`, retrying a timed-out publish with the same
    /// message id. Returns whether the broker had seen the id already.
    async fn publish(&self, envelope: &Envelope, id: &str) -> Result<bool, QueueError> {
        let subject = self.names.task_subject(&envelope.agent, envelope.priority);
        let body = Bytes::from(serde_json::to_vec(envelope).expect("envelope serializes"));
        self.publish_with_id(subject, id, body)
            .await
            .map_err(|failure| match failure {
                PublishFailure::TooLarge => QueueError::Invalid(format!(
                    "task {:?} is larger than the broker's max_payload",
                    envelope.id
                )),
                PublishFailure::Failed(error) => {
                    storage(&format!("cannot publish task {:?}", envelope.id), error)
                }
            })
    }

    /// Publishes `body` to a stream under message id `id`. A try that timed
    /// out or lost the connection is made again with the same id (the
    /// broker stores it once), up to [`PUBLISH_TRIES`] tries in all, each
    /// bounded by `broker.request_timeout`. Returns whether the broker
    /// already had the id from another publisher.
    async fn publish_with_id(
        &self,
        subject: String,
        id: &str,
        body: Bytes,
    ) -> Result<bool, PublishFailure> {
        use jetstream::context::PublishErrorKind as Kind;
        let mut retried = false;
        let mut tries = 0;
        loop {
            tries += 1;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id);
            let attempt = async {
                match self
                    .js
                    .publish_with_headers(subject.clone(), headers, body.clone())
                    .await
                {
                    Ok(ack) => ack.await,
                    Err(error) => Err(error),
                }
            };
            let error = match tokio::time::timeout(self.request_timeout, attempt).await {
                // A duplicate after our own timed-out try is our message.
                Ok(Ok(ack)) => return Ok(ack.duplicate && !retried),
                Ok(Err(error)) if error.kind() == Kind::MaxPayloadExceeded => {
                    return Err(PublishFailure::TooLarge);
                }
                Ok(Err(error))
                    if !matches!(
                        error.kind(),
                        Kind::TimedOut | Kind::BrokenPipe | Kind::Other
                    ) =>
                {
                    return Err(PublishFailure::Failed(error.to_string()));
                }
                Ok(Err(error)) => error.to_string(),
                Err(_) => "timed out".to_string(),
            };
            if tries >= PUBLISH_TRIES {
                return Err(PublishFailure::Failed(error));
            }
            tracing::warn!(%subject, %error, "publish failed; retrying with the same message id");
            retried = true;
            tokio::time::sleep(Duration::from_millis(100 * u64::from(tries))).await;
        }
    }

    /// Submits one validated task.
    async fn submit_one(&self, task: NewTask) -> Result<SubmitReceipt, QueueError> {
        for _ in 0..CAS_TRIES {
            if let Some(receipt) = self.try_submit(&task).await? {
                return Ok(receipt);
            }
        }
        Err(storage(
            &format!("task {:?}", task.id),
            "the record kept changing under this submit; try again",
        ))
    }

    /// One try of [`Self::submit_one`]; `None` when the record changed
    /// under it in a way that needs a fresh start.
    async fn try_submit(&self, task: &NewTask) -> Result<Option<SubmitReceipt>, QueueError> {
        let now = self.now();
        let window =
            u64::try_from(self.settings.limits.dedup_window.as_millis()).unwrap_or(u64::MAX);
        // (life, generation, attempts so far, revision to write over, the
        // version of a completed record this submit brings back)
        let (life, generation, attempts, revision, resubmits) = match self.lookup(&task.id).await? {
            Lookup::Record(record, revision) => {
                // Queued, running and dead-lettered tasks are always
                // duplicates (a dead letter waits for replay or purge);
                // a completed one within the window.
                let kept = record.task.state != TaskState::Completed
                    || now.saturating_sub(record.task.created_ms) < window;
                if kept {
                    return Ok(Some(SubmitReceipt {
                        id: task.id.clone(),
                        duplicate: true,
                        state: record.task.state,
                    }));
                }
                // Attempt numbers go on rising, so that a holder of an
                // attempt of the earlier run can never settle this one.
                (
                    record.life,
                    record.generation,
                    record.task.attempts,
                    revision,
                    Some(record.version()),
                )
            }
            // A deleted record (purged dead letter, pruned task) leaves a
            // marker: a new life starts there, with its own message ids.
            Lookup::Marker(marker) => (marker, 0, 0, marker, None),
            Lookup::Absent => (0, 0, 0, 0, None),
        };
        let mut envelope = Envelope {
            id: task.id.clone(),
            agent: task.agent.clone(),
            priority: task.priority,
            life,
            generation,
            created_ms: now,
            payload: task.payload.clone(),
            rerouted_from: None,
            rerouted_attempt: None,
            // Bringing back a completed task: the message counts only
            // while the record is still that completed one (a concurrent
            // resubmit that won keeps this one from running too).
            expects: resubmits.map(|_| TaskState::Completed),
            expects_version: resubmits,
        };
        if revision != 0 {
            // A new task under an old id (a completed one past the window,
            // or a purged one): nothing of the old one's stays with it.
            // Before its message exists, so that nothing the new run
            // writes is deleted with them.
            self.try_forget_controls(&task.id).await?;
        }
        let duplicate = if resubmits.is_some() {
            // A later generation whose message id the broker has not
            // seen: one may have been used by a publication that lost a
            // race (a reroute, a replay, a retry of an escalation), and a
            // duplicate would leave the record queued with no message.
            self.publish_next(&mut envelope).await?;
            false
        } else {
            self.publish(&envelope, &msg_id(&task.id, life, generation))
                .await?
        };
        let generation = envelope.generation;
        let mut record = Record::from_envelope(&envelope, now);
        record.task.attempts = attempts;
        if self.write(&mut record, revision).await?.is_none() {
            // Someone wrote first. A consumer (or another submitter) that
            // wrote the record from the same message is fine; anything
            // else (the record of a completed task pruned meanwhile, whose
            // marker makes this message one of a dead life) means
            // starting over.
            match self.lookup(&task.id).await? {
                Lookup::Record(stored, _) if stored.version() >= (life, generation) => {}
                _ => return Ok(None),
            }
        }
        Ok(Some(SubmitReceipt {
            id: task.id.clone(),
            duplicate,
            state: TaskState::Queued,
        }))
    }

    /// Drops the cached consumer of `agent` at priority `rank`: looked up
    /// (or made) afresh next time.
    async fn forget_consumer(&self, agent: &str, rank: i64) {
        self.consumers
            .lock()
            .await
            .remove(&(agent.to_string(), rank));
    }

    /// Takes up to `request.max` messages, highest priority first.
    async fn take(self: &Arc<Self>, request: &LeaseRequest) -> Result<Vec<Lease>, QueueError> {
        let mut leases = Vec::new();
        self.take_into(request, &mut leases).await?;
        Ok(leases)
    }

    async fn take_into(
        self: &Arc<Self>,
        request: &LeaseRequest,
        leases: &mut Vec<Lease>,
    ) -> Result<(), QueueError> {
        let mut failure = None;
        for rank in 0..=request.lowest.rank() {
            if leases.len() >= request.max {
                break;
            }
            let priority = Priority::from_rank(rank);
            // A priority that cannot be fetched (its consumer cannot be
            // made, a broker call fails) neither throws away the tasks
            // taken at higher ones nor holds back the lower ones.
            let consumer = match self.consumer(&request.agent, priority).await {
                Ok(consumer) => consumer,
                Err(error) => {
                    tracing::warn!(agent = %request.agent, priority = %priority.as_str(), %error, "cannot fetch tasks of this priority");
                    failure.get_or_insert(error);
                    continue;
                }
            };
            let fetched = self
                .bounded(
                    "fetch tasks",
                    consumer
                        .fetch()
                        .max_messages(request.max - leases.len())
                        .messages(),
                )
                .await;
            let mut batch = match fetched {
                Ok(batch) => batch,
                Err(error) => {
                    // Looked up afresh next time, in case the consumer
                    // was deleted on the broker.
                    self.forget_consumer(&request.agent, rank).await;
                    tracing::warn!(agent = %request.agent, priority = %priority.as_str(), %error, "cannot fetch tasks of this priority");
                    failure.get_or_insert(error);
                    continue;
                }
            };
            // A pull request lost with the connection never ends: bound
            // it. Messages taken so far are ours; others come again after
            // ack_wait.
            let deadline = tokio::time::Instant::now() + self.request_timeout;
            let mut messages = Vec::new();
            loop {
                match tokio::time::timeout_at(deadline, batch.next()).await {
                    Ok(Some(Ok(message))) => messages.push(message),
                    Ok(None) => break,
                    Ok(Some(Err(error))) => {
                        // "No responders" among them: the consumer may be
                        // gone from the broker.
                        tracing::warn!(%error, "task fetch ended early");
                        self.forget_consumer(&request.agent, rank).await;
                        break;
                    }
                    Err(_) => {
                        tracing::warn!("task fetch got no answer in broker.request_timeout");
                        break;
                    }
                }
            }
            let claims = messages
                .into_iter()
                .map(|message| self.claim(message, request));
            // One failed claim does not throw away the others: its message
            // comes again after ack_wait.
            for claimed in futures_util::future::join_all(claims).await {
                match claimed {
                    Ok(Some(lease)) => leases.push(lease),
                    Ok(None) => {}
                    Err(error) if failure.is_none() => failure = Some(error),
                    Err(error) => tracing::warn!(%error, "could not claim a task"),
                }
            }
        }
        match failure {
            Some(error) if leases.is_empty() => Err(error),
            Some(error) => {
                tracing::warn!(%error, "could not claim a task");
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Turns one delivered message into a lease, or settles it when its
    /// record says it needs no more work.
    async fn claim(
        self: &Arc<Self>,
        message: jetstream::Message,
        request: &LeaseRequest,
    ) -> Result<Option<Lease>, QueueError> {
        let Some(reply) = message.reply.as_ref().map(ToString::to_string) else {
            return Ok(None);
        };
        let envelope: Envelope = match serde_json::from_slice(&message.payload) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::error!(subject = %message.subject, %error, "dropping a task message that is not a flotilla task");
                self.settle_message(&reply, Bytes::from_static(b"+TERM"))
                    .await;
                return Ok(None);
            }
        };
        let sequence = message.info().ok().map(|info| info.stream_sequence);
        for _ in 0..CAS_TRIES {
            // The message a hand-over to this agent replaces, acked only
            // once the hand-over is written: the server acks by stream
            // sequence, so an ack sent to it before would remove a
            // redelivery of it that another daemon holds meanwhile.
            let mut replaced: Option<String> = None;
            let now = self.now();
            // A message of a task older than the retention (and the
            // margin), with no record or one of a run that began that much
            // later: a leftover of a run whose marker a prune deleted (see
            // `prune`), never to be taken for the task. (Runs of one id are
            // told apart by their markers while they are kept.)
            let retention =
                u64::try_from(self.settings.limits.retention.as_millis()).unwrap_or(u64::MAX);
            let leftover = |created: Option<UnixMillis>| {
                let newer = created.unwrap_or(now);
                envelope
                    .created_ms
                    .saturating_add(retention)
                    .saturating_add(MARKER_MARGIN_MS)
                    < newer
            };
            let (mut record, revision) = match self.lookup(&envelope.id).await? {
                Lookup::Record(record, _) if leftover(Some(record.task.created_ms)) => {
                    tracing::warn!(task = %envelope.id, "dropped a message of an earlier run of the task, older than the retention");
                    self.settle_message(&reply, Bytes::from_static(b"+ACK"))
                        .await;
                    return Ok(None);
                }
                Lookup::Absent if leftover(None) => {
                    tracing::warn!(task = %envelope.id, "dropped a message of a deleted task, older than the retention");
                    self.settle_message(&reply, Bytes::from_static(b"+ACK"))
                        .await;
                    return Ok(None);
                }
                Lookup::Record(record, revision) => (*record, revision),
                // The record of a purged task is a marker: its messages are
                // of older lives and must not bring it back.
                Lookup::Marker(marker) if envelope.life < marker => {
                    self.settle_message(&reply, Bytes::from_static(b"+ACK"))
                        .await;
                    return Ok(None);
                }
                // Its submitter died before writing the record.
                Lookup::Marker(marker) => (Record::from_envelope(&envelope, now), marker),
                Lookup::Absent => (Record::from_envelope(&envelope, now), 0),
            };
            if record.version() > (envelope.life, envelope.generation) {
                // A message of an earlier publication of this task.
                self.settle_message(&reply, Bytes::from_static(b"+ACK"))
                    .await;
                return Ok(None);
            }
            let newer = record.version() < (envelope.life, envelope.generation);
            if newer
                && (envelope
                    .expects
                    .is_some_and(|expected| record.task.state != expected)
                    || envelope
                        .expects_version
                        .is_some_and(|version| record.version() != version))
            {
                // A republish that lost to another resolution of the task.
                self.settle_message(&reply, Bytes::from_static(b"+ACK"))
                    .await;
                return Ok(None);
            }
            if newer && let Some(from) = &envelope.rerouted_from {
                // Handed to a fallback agent by a daemon that has not
                // written the record yet (or died first): apply the
                // hand-over here, if the attempt handing it over still
                // holds the task.
                match record.task.state {
                    TaskState::Running
                        if Some(record.task.attempts) == envelope.rerouted_attempt =>
                    {
                        let attempt = record.task.attempts;
                        let end = AttemptEnd::new(
                            AttemptOutcome::Rerouted,
                            None,
                            format!(
                                "{from} is unavailable; handed to fallback agent {}",
                                envelope.agent
                            ),
                        );
                        record.end_attempt(attempt, &end, now);
                        record.refund_handover();
                        replaced = record.reply.clone();
                    }
                    TaskState::Queued => {}
                    // It ended, or another delivery holds it: moot.
                    _ => {
                        self.settle_message(&reply, Bytes::from_static(b"+ACK"))
                            .await;
                        return Ok(None);
                    }
                }
                record.generation = envelope.generation;
                record.task.agent.clone_from(&envelope.agent);
                record.task.checkpoint = None;
                record.requeue(now);
            } else if newer {
                // Republished (replay, or resubmit of a completed task)
                // before its record said so: the message is the newer
                // truth. A resubmitted task starts without the old run's
                // checkpoint.
                let dead = record.task.state == TaskState::DeadLettered;
                // A replayed dead letter and a retried escalation go on
                // from their checkpoint (as their own paths keep it).
                if matches!(envelope.expects, None | Some(TaskState::Completed)) {
                    record.task.checkpoint = None;
                }
                if envelope.expects == Some(TaskState::Completed) {
                    // A completed task submitted again is a new task
                    // under the old id (as its submitter writes it): its
                    // dedup window runs from now, no history, no replays.
                    record.task.created_ms = envelope.created_ms;
                    record.task.history.clear();
                    record.task.replays = 0;
                    record.handovers = 0;
                }
                record.life = envelope.life;
                record.generation = envelope.generation;
                record.task.agent.clone_from(&envelope.agent);
                record.task.payload = envelope.payload.clone();
                record.task.priority = envelope.priority;
                record.task.charged_attempts = 0;
                record.task.reason = None;
                record.task.result = None;
                record.task.finished_ms = None;
                record.task.replays += u32::from(dead);
                record.requeue(now);
            }
            match record.task.state {
                TaskState::Completed => {
                    self.settle_message(&reply, Bytes::from_static(b"+ACK"))
                        .await;
                    return Ok(None);
                }
                TaskState::DeadLettered => {
                    self.send_dead_letter(&record).await?;
                    self.settle_message(&reply, Bytes::from_static(b"+TERM"))
                        .await;
                    return Ok(None);
                }
                // Waits for a human; `resolve --retry` publishes it again.
                TaskState::Escalated => {
                    self.settle_message(&reply, Bytes::from_static(b"+TERM"))
                        .await;
                    return Ok(None);
                }
                TaskState::Running
                    if sequence.is_some() && record.seq.is_some() && record.seq != sequence =>
                {
                    // Another message of the same publication, stored
                    // twice (a submit retried after the broker's
                    // duplicate window): the task runs under the first.
                    self.settle_message(&reply, Bytes::from_static(b"+ACK"))
                        .await;
                    return Ok(None);
                }
                TaskState::Running => {
                    // The broker gave the task out again: its holder
                    // stopped extending it (died or lost the broker).
                    let attempt = record.task.attempts;
                    let end = AttemptEnd::new(
                        AttemptOutcome::LeaseExpired,
                        None,
                        format!(
                            "not extended within broker.ack_wait by {}",
                            record.owner.as_deref().unwrap_or("its daemon")
                        ),
                    );
                    record.end_attempt(attempt, &end, now);
                    record.requeue(now);
                    self.held.lock().expect("not poisoned").remove(&LeaseKey {
                        task_id: record.task.id.clone(),
                        attempt,
                        life: record.life,
                    });
                }
                TaskState::Queued => {
                    // Naked with a delay whose -NAK was lost: hold it back
                    // for the rest of the delay, never longer than the
                    // delay itself (clocks of daemons may disagree).
                    let early = record.task.visible_ms.saturating_sub(now);
                    let delay = early.min(record.retry_delay_ms);
                    if record.task.attempts > 0 && delay > 50 {
                        self.settle_message(&reply, nak(Duration::from_millis(delay)))
                            .await;
                        return Ok(None);
                    }
                }
            }
            if record.task.charged_attempts >= request.max_deliver {
                let last = record.task.history.last().and_then(|attempt| {
                    attempt
                        .outcome
                        .map(|outcome| (outcome.as_str(), attempt.detail.as_deref()))
                });
                let reason = exhausted_reason(request.max_deliver, last);
                record.task.reason = Some(reason);
                record.finish(TaskState::DeadLettered, now);
                if self.write(&mut record, revision).await?.is_none() {
                    continue;
                }
                self.settle_replaced(replaced).await;
                // Told before the copy, which may fail: the redelivery
                // that retries the copy no longer knows why it died.
                self.exhausted
                    .push(record.task.id.clone(), record.task.agent.clone());
                self.send_dead_letter(&record).await?;
                self.settle_message(&reply, Bytes::from_static(b"+TERM"))
                    .await;
                return Ok(None);
            }
            let number = record.task.attempts + 1;
            let lease_ms = u64::try_from(request.lease_for.as_millis()).unwrap_or(u64::MAX / 2);
            let deadline_ms = now.saturating_add(lease_ms);
            record.task.attempts = number;
            record.task.charged_attempts += 1;
            record.task.state = TaskState::Running;
            record.task.lease_deadline_ms = Some(deadline_ms);
            record.owner = Some(request.owner.clone());
            record.reply = Some(reply.clone());
            record.seq = sequence;
            let feedback = record.task.history.last().and_then(|previous| {
                super::feedback_of(
                    previous.outcome.map(AttemptOutcome::as_str),
                    previous.detail.as_deref(),
                )
            });
            record.task.history.push(Attempt {
                number,
                started_ms: now,
                ended_ms: None,
                replica: None,
                outcome: None,
                detail: None,
            });
            let Some(revision) = self.write(&mut record, revision).await? else {
                continue;
            };
            self.settle_replaced(replaced).await;
            let key = LeaseKey {
                task_id: record.task.id.clone(),
                attempt: number,
                life: record.life,
            };
            self.held.lock().expect("not poisoned").insert(
                key.clone(),
                Held {
                    reply,
                    steady_deadline_ms: self.clock.steady_ms().saturating_add(lease_ms),
                    deadline_ms,
                    cached: Some((record.clone(), revision)),
                },
            );
            return Ok(Some(Lease {
                guard: LeaseGuard::new(key.clone(), self.returns.clone()),
                key,
                agent: record.task.agent,
                priority: record.task.priority,
                payload: record.task.payload,
                checkpoint: record.task.checkpoint,
                feedback,
                charged: record.task.charged_attempts,
            }));
        }
        // The record kept changing: leave the message to come again.
        self.settle_message(&reply, Bytes::from_static(b"-NAK"))
            .await;
        Ok(None)
    }

    /// Writes the dead letter of `record` to the DLQ stream (idempotent per
    /// replay).
    /// [`Self::send_dead_letter`], tried three times (the copy is
    /// idempotent by its message id): for a dead letter whose message is
    /// gone, which no later fetch would copy again.
    async fn send_dead_letter_retried(&self, record: &Record) -> Result<(), QueueError> {
        let mut tries = 0;
        loop {
            match self.send_dead_letter(record).await {
                Err(error) if tries < 2 => {
                    tries += 1;
                    tracing::debug!(task = %record.task.id, %error, "writing the dead letter's copy again");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                result => return result,
            }
        }
    }

    async fn send_dead_letter(&self, record: &Record) -> Result<(), QueueError> {
        let id = format!(
            "{}#dlq{}.{}",
            record.task.id, record.life, record.task.replays
        );
        let body = Bytes::from(serde_json::to_vec(&record.task).expect("record serializes"));
        self.publish_with_id(
            self.names.dlq_subject(&record.task.agent, &record.task.id),
            &id,
            body,
        )
        .await
        .map(|_| ())
        .map_err(|failure| match failure {
            PublishFailure::TooLarge => storage("cannot write the dead letter", "too large"),
            PublishFailure::Failed(error) => storage("cannot write the dead letter", error),
        })
    }

    /// Publishes `envelope` as the task's next generation. A message id
    /// already used (by a message that was published but whose record
    /// change lost a race) is skipped: the generation goes on rising until
    /// the broker stores the message as new.
    async fn publish_next(&self, envelope: &mut Envelope) -> Result<(), QueueError> {
        for _ in 0..8 {
            envelope.generation += 1;
            let id = msg_id(&envelope.id, envelope.life, envelope.generation);
            if !self.publish(envelope, &id).await? {
                return Ok(());
            }
        }
        Err(storage(
            &format!("task {:?}", envelope.id),
            "eight message ids in a row were already used",
        ))
    }

    /// Takes `key` out of the held leases; its reply subject, from the
    /// table or else the record.
    fn unhold(&self, key: &LeaseKey) -> Option<Held> {
        self.held.lock().expect("not poisoned").remove(key)
    }

    /// Stops holding `key` and settles its message with `verb`, at the
    /// reply subject held, else the one the record gave (`reply`).
    async fn settle_held(&self, key: &LeaseKey, reply: Option<String>, verb: Bytes) {
        let held = self.unhold(key);
        if let Some(reply) = held.map(|held| held.reply).or(reply) {
            self.settle_message(&reply, verb).await;
        }
    }

    /// Ends the attempt `key` holds with `end`, and lets `then` change the
    /// record further (at the same time `now`), in one compare-and-set;
    /// `then` may also keep the record as it was ([`Change::Keep`]).
    /// Returns what `then` returned and the delivery's reply subject from
    /// the record, for settling its message.
    async fn end_held<T>(
        &self,
        key: &LeaseKey,
        end: &AttemptEnd,
        mut then: impl FnMut(&mut Record, UnixMillis) -> Change<T>,
    ) -> Result<(T, Option<String>), QueueError> {
        let mut reply = None;
        let answer = self
            .update(&key.task_id, Some(key), |record| {
                if !record.holds(key) {
                    return Err(record.stale(key));
                }
                let now = self.now();
                reply.clone_from(&record.reply);
                record.end_attempt(key.attempt, end, now);
                Ok(then(record, now))
            })
            .await?;
        Ok((answer, reply))
    }

    /// Back to the queue after `delay`, charged or not. With
    /// `expired_deadline`, the lease deadline seen expired, a lease
    /// extended since (progress in between: the record holds another
    /// deadline) is kept. Returns whether the task went back.
    async fn requeue(
        &self,
        key: &LeaseKey,
        delay: Duration,
        end: &AttemptEnd,
        refund: bool,
        expired_deadline: Option<UnixMillis>,
    ) -> Result<bool, QueueError> {
        let (agent, reply) = self
            .end_held(key, end, |record, now| {
                if expired_deadline.is_some_and(|seen| record.task.lease_deadline_ms != Some(seen))
                {
                    return Change::Keep(None);
                }
                if refund {
                    record.task.charged_attempts = record.task.charged_attempts.saturating_sub(1);
                }
                let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX / 2);
                record.retry_delay_ms = delay_ms;
                record.requeue(now + delay_ms);
                Change::Write(Some(record.task.agent.clone()))
            })
            .await?;
        let Some(agent) = agent else {
            return Ok(false);
        };
        self.settle_held(key, reply, nak(delay)).await;
        if delay.is_zero() {
            self.ring(&agent).await;
        } else {
            let client = self.client.clone();
            let subject = self.names.wake_subject(&agent);
            let limit = self.request_timeout;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tokio::time::timeout(limit, client.publish(subject, Bytes::new())).await;
            });
        }
        Ok(true)
    }

    /// Deletes what the store keeps beside task `id` under its id
    /// ([`TASK_CONTROLS`]): a new task given the same id starts clean, and
    /// never rolls back the old one's changes. Best effort: a key left
    /// behind by a failure is logged.
    async fn forget_controls(&self, id: &str) {
        if let Err(error) = self.try_forget_controls(id).await {
            tracing::warn!(task = %id, %error, "could not delete a key kept beside the task");
        }
    }

    /// [`Self::forget_controls`], failing at the first key that could not
    /// be deleted.
    async fn try_forget_controls(&self, id: &str) -> Result<(), QueueError> {
        self.forget_escaped_controls(&escape(id)).await
    }

    /// [`Self::try_forget_controls`] of the task whose escaped id is
    /// `escaped` (as in its record's key).
    async fn forget_escaped_controls(&self, escaped: &str) -> Result<(), QueueError> {
        for kind in TASK_CONTROLS {
            // A stream purge of the key leaves no marker behind (a key
            // value purge would leave one for good, for every task).
            // `escape` works a character at a time: the key of
            // `{kind}.{id}` is `{kind}=2E` and the escaped id.
            let subject = format!("{}c.{kind}=2E{escaped}", self.records.prefix);
            self.bounded(
                "delete a task's journal or links",
                self.records.stream.purge().filter(subject).into_future(),
            )
            .await?;
        }
        Ok(())
    }

    /// Reads into `tally` the records written since it last read (every
    /// record, for a tally that has read none), at most `limit` of them.
    /// Returns whether it caught up.
    async fn advance(&self, tally: &mut Tally, limit: Option<usize>) -> Result<bool, QueueError> {
        let policy = if tally.read == 0 {
            consumer::DeliverPolicy::LastPerSubject
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: tally.read + 1,
            }
        };
        let (mut applied, mut stopped) = (0, false);
        read_bucket(
            &self.client,
            &self.records,
            "t.>",
            policy,
            |key, value, revision| {
                tally.apply(key, value, revision);
                applied += 1;
                if limit.is_some_and(|limit| applied >= limit) {
                    stopped = true;
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .await?;
        Ok(!stopped)
    }

    /// The creation times and ids of the `limit` newest completed tasks
    /// (of `agent`, if given), newest first. Read backwards from the end of
    /// the records' stream a window at a time: the bucket keeps each
    /// record's last write, in write order, so every record before a
    /// window was written, and so created, before the earliest write read
    /// (give or take [`SKEW_MS`]). The read stops once `limit` tasks were
    /// found created after that: in a busy fleet, after the writes of the
    /// last minutes (the skew, plus how long the tasks shown took from
    /// submission to completion) rather than the whole retention's.
    async fn newest_completed(
        &self,
        agent: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(UnixMillis, String)>, QueueError> {
        let mut found: Vec<(UnixMillis, String)> = Vec::new();
        if limit == 0 {
            return Ok(found);
        }
        let info = self.records_info().await?;
        let (first, mut end) = (info.state.first_sequence.max(1), info.state.last_sequence);
        // The earliest write read: every record before it in the stream
        // was written, and so created, before it, give or take the skew.
        let mut written_before: Option<UnixMillis> = None;
        let mut window = LIST_WINDOW_FIRST;
        while end >= first {
            let start = end.saturating_sub(window - 1).max(first);
            let policy = consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            };
            read_bucket(
                &self.client,
                &self.records,
                "t.>",
                policy,
                |_, value, revision| {
                    if revision > end {
                        return ControlFlow::Break(());
                    }
                    let Some(Ok(summary)) = value.map(serde_json::from_slice::<Summary>) else {
                        return ControlFlow::Continue(());
                    };
                    let task = summary.task;
                    let written = task.updated_ms;
                    written_before = Some(written_before.map_or(written, |w| w.min(written)));
                    if task.state == TaskState::Completed
                        && agent.is_none_or(|agent| agent == task.agent)
                    {
                        found.push((task.created_ms, task.id));
                    }
                    ControlFlow::Continue(())
                },
            )
            .await?;
            found.sort_unstable_by(|a, b| b.cmp(a));
            found.truncate(limit);
            let newest_enough = found.len() == limit
                && written_before
                    .is_some_and(|before| found[limit - 1].0 > before.saturating_add(SKEW_MS));
            if newest_enough || start == first {
                break;
            }
            end = start - 1;
            window = (window * 2).min(LIST_WINDOW_MAX);
        }
        Ok(found)
    }

    /// `ids`, each once, after checking that every one is a dead letter.
    async fn checked_dead_letters(&self, ids: &[String]) -> Result<Vec<String>, QueueError> {
        let mut checked: Vec<String> = Vec::with_capacity(ids.len());
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        for id in ids {
            if !seen.insert(id) {
                continue;
            }
            let Some((record, _)) = self.entry(id).await? else {
                return Err(QueueError::NotFound { id: id.clone() });
            };
            if record.task.state != TaskState::DeadLettered {
                return Err(QueueError::WrongState {
                    id: id.clone(),
                    state: record.task.state,
                    expected: &[TaskState::DeadLettered],
                    done: "replayed or purged",
                });
            }
            checked.push(id.clone());
        }
        Ok(checked)
    }

    /// The record of dead letter `id` as it is now, with its revision;
    /// `None` if it is one no more (replayed, purged or replaced since it
    /// was checked).
    async fn dead_letter(&self, id: &str) -> Result<Option<(Record, u64)>, QueueError> {
        Ok(self
            .entry(id)
            .await?
            .filter(|(record, _)| record.task.state == TaskState::DeadLettered))
    }

    /// Deletes the dead-letter copies of `record`'s task; with `before`,
    /// only those stored before that stream sequence (a copy written
    /// since, by the task dying again, stays).
    async fn purge_dead_letter(
        &self,
        record: &Record,
        before: Option<u64>,
    ) -> Result<(), QueueError> {
        let purge = self
            .dlq
            .purge()
            .filter(self.names.dlq_subject(&record.task.agent, &record.task.id));
        match before {
            Some(sequence) => {
                self.bounded(
                    "purge the dead letter",
                    purge.sequence(sequence).into_future(),
                )
                .await?;
            }
            None => {
                self.bounded("purge the dead letter", purge.into_future())
                    .await?;
            }
        }
        Ok(())
    }

    /// The next sequence the dead-letter stream will give.
    async fn dlq_next_sequence(&self) -> Result<u64, QueueError> {
        let info = self
            .bounded("read the dead-letter stream", self.dlq.get_info())
            .await?;
        Ok(info.state.last_sequence.saturating_add(1))
    }
}

/// `-NAK`, with a delay when there is one (a zero delay goes through the
/// broker's timer and is much slower than a plain NAK).
fn nak(delay: Duration) -> Bytes {
    if delay.is_zero() {
        Bytes::from_static(b"-NAK")
    } else {
        Bytes::from(format!("-NAK {{\"delay\":{}}}", delay.as_nanos()))
    }
}

/// Sends `+WPI` for every held lease whose deadline is ahead, every third
/// of `ack_wait`; an `ack_wait` lowered meanwhile (a consumer made with a
/// shorter one) counts at once.
async fn keep_alive(inner: std::sync::Weak<Inner>, lowered: Arc<tokio::sync::Notify>) {
    let mut last = tokio::time::Instant::now();
    loop {
        let every = match inner.upgrade() {
            Some(inner) => {
                (*inner.ack_wait.lock().expect("not poisoned") / 3).max(Duration::from_millis(100))
            }
            None => return,
        };
        let due = last + every;
        if tokio::time::Instant::now() < due {
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = lowered.notified() => {}
            }
            continue;
        }
        last = tokio::time::Instant::now();
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let now = inner.clock.steady_ms();
        let replies: Vec<String> = inner
            .held
            .lock()
            .expect("not poisoned")
            .values()
            .filter(|held| held.steady_deadline_ms > now)
            .map(|held| held.reply.clone())
            .collect();
        for reply in replies {
            inner
                .settle_message(&reply, Bytes::from_static(b"+WPI"))
                .await;
        }
    }
}

async fn release_returned(
    inner: std::sync::Weak<Inner>,
    mut returned: mpsc::UnboundedReceiver<Returned>,
) {
    while let Some(item) = returned.recv().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match item {
            Returned::Lease(key) => {
                let end = AttemptEnd::dropped();
                match inner.requeue(&key, Duration::ZERO, &end, true, None).await {
                    Ok(_) => {}
                    Err(error @ (QueueError::StaleLease { .. } | QueueError::NotFound { .. })) => {
                        tracing::debug!(task = %key, %error, "a dropped lease was already settled");
                    }
                    Err(error) => {
                        // No more keep-alives: the broker hands the task
                        // out again after ack_wait.
                        inner.unhold(&key);
                        tracing::warn!(task = %key, %error, "could not release a dropped lease; it returns after broker.ack_wait");
                    }
                }
            }
            Returned::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

async fn listen_for_wakes(inner: std::sync::Weak<Inner>, mut wakes: async_nats::Subscriber) {
    while let Some(message) = wakes.next().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        // Only agents someone leases here have an entry: a subject from
        // the wire never grows the map.
        let woken = message
            .subject
            .rsplit('.')
            .next()
            .and_then(|agent| inner.wake.lock().expect("not poisoned").get(agent).cloned());
        if let Some(notify) = woken {
            notify.notify_waiters();
        }
    }
}

#[async_trait]
impl TaskQueue for JetStreamQueue {
    async fn submit(&self, tasks: Vec<NewTask>) -> Result<Vec<SubmitReceipt>, QueueError> {
        self.inner.settings.limits.check_tasks(&tasks)?;
        // A repeated id within the batch is a duplicate of its first copy.
        let mut seen = HashSet::new();
        let mut agents = HashSet::new();
        let jobs: Vec<Result<NewTask, String>> = tasks
            .into_iter()
            .map(|task| {
                if seen.insert(task.id.clone()) {
                    agents.insert(task.agent.clone());
                    Ok(task)
                } else {
                    Err(task.id)
                }
            })
            .collect();
        let inner = &self.inner;
        // After the first failure no further task is started: with the
        // broker down, each would take its retries' worth of time
        // (seconds) in turn. Those under way finish (one cut off midway
        // could leave a resubmitted task's old journal deleted and the
        // task not published).
        let failed = std::sync::atomic::AtomicBool::new(false);
        let failed = &failed;
        // `Err(None)`: not tried, after an earlier task failed.
        let done: Vec<Result<SubmitReceipt, Option<QueueError>>> =
            futures_util::stream::iter(jobs.into_iter().map(|job| async move {
                match job {
                    Ok(_) if failed.load(std::sync::atomic::Ordering::Relaxed) => Err(None),
                    Ok(task) => inner.submit_one(task).await.map_err(|error| {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        Some(error)
                    }),
                    Err(id) => Ok(SubmitReceipt {
                        id,
                        duplicate: true,
                        state: TaskState::Queued,
                    }),
                }
            }))
            .buffered(SUBMIT_CONCURRENCY)
            .collect()
            .await;
        let mut receipts = Vec::with_capacity(done.len());
        let mut first_failure = None;
        for done in done {
            match done {
                Ok(receipt) => receipts.push(receipt),
                Err(Some(error)) => {
                    first_failure.get_or_insert(error);
                }
                Err(None) => {}
            }
        }
        let done = match first_failure {
            Some(error) => Err(error),
            None => Ok(receipts),
        };
        for agent in &agents {
            inner.ring(agent).await;
        }
        // On a failure, tasks published before it stay: submitting the
        // same batch again stores each id once.
        done
    }

    async fn lease(
        &self,
        request: &LeaseRequest,
        wait: Duration,
    ) -> Result<Vec<Lease>, QueueError> {
        let started = tokio::time::Instant::now();
        let notify = self.inner.notify(&request.agent);
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let leases = self.inner.take(request).await?;
            let left = wait.saturating_sub(started.elapsed());
            if !leases.is_empty() || left.is_zero() {
                return Ok(leases);
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(left.min(POLL_INTERVAL)) => {}
            }
        }
    }

    async fn ack(
        &self,
        key: &LeaseKey,
        result: &Value,
        end: AttemptEnd,
    ) -> Result<AckOutcome, QueueError> {
        self.inner.settings.limits.check_result("result", result)?;
        let mut reply = None;
        let outcome = self
            .inner
            .update(&key.task_id, Some(key), |record| {
                // Idempotent completion: a repeated ack of the completing
                // delivery (of this life of the id) changes nothing.
                if record.task.state == TaskState::Completed
                    && record.task.attempts == key.attempt
                    && record.life == key.life
                {
                    return Ok(Change::Keep(AckOutcome::AlreadyCompleted));
                }
                if !record.holds(key) {
                    return Err(record.stale(key));
                }
                let now = self.inner.now();
                reply.clone_from(&record.reply);
                record.end_attempt(key.attempt, &end, now);
                record.task.result = Some(result.clone());
                record.task.checkpoint = None;
                record.finish(TaskState::Completed, now);
                Ok(Change::Write(AckOutcome::Completed))
            })
            .await?;
        // Settles the delivery this process holds. A repeated ack (the
        // record already completed) has nothing left to settle here: a
        // message whose +ACK was lost comes again after ack_wait, and its
        // claim acks it against the completed record.
        self.inner
            .settle_held(key, reply, Bytes::from_static(b"+ACK"))
            .await;
        Ok(outcome)
    }

    async fn nak(
        &self,
        key: &LeaseKey,
        delay: Duration,
        end: AttemptEnd,
    ) -> Result<(), QueueError> {
        self.inner
            .requeue(key, delay, &end, false, None)
            .await
            .map(|_| ())
    }

    async fn release(&self, key: &LeaseKey, end: AttemptEnd) -> Result<(), QueueError> {
        self.inner
            .requeue(key, Duration::ZERO, &end, true, None)
            .await
            .map(|_| ())
    }

    async fn progress(
        &self,
        key: &LeaseKey,
        extend: Duration,
        checkpoint: Option<&Value>,
    ) -> Result<(), QueueError> {
        if let Some(checkpoint) = checkpoint {
            self.inner
                .settings
                .limits
                .check_result("checkpoint", checkpoint)?;
        }
        let extend_ms = u64::try_from(extend.as_millis()).unwrap_or(u64::MAX / 2);
        let deadline_ms = self.inner.now().saturating_add(extend_ms);
        let mut reply = None;
        self.inner
            .update(&key.task_id, Some(key), |record| {
                if !record.holds(key) {
                    return Err(record.stale(key));
                }
                reply.clone_from(&record.reply);
                record.task.lease_deadline_ms = Some(deadline_ms);
                if let Some(checkpoint) = checkpoint {
                    record.task.checkpoint = Some(checkpoint.clone());
                }
                Ok(Change::Write(()))
            })
            .await?;
        let reply = {
            let mut held = self.inner.held.lock().expect("not poisoned");
            match held.get_mut(key) {
                Some(held) => {
                    held.steady_deadline_ms =
                        self.inner.clock.steady_ms().saturating_add(extend_ms);
                    held.deadline_ms = deadline_ms;
                    Some(held.reply.clone())
                }
                None => reply,
            }
        };
        if let Some(reply) = reply {
            self.inner
                .settle_message(&reply, Bytes::from_static(b"+WPI"))
                .await;
        }
        Ok(())
    }

    async fn term(&self, key: &LeaseKey, reason: &str, end: AttemptEnd) -> Result<(), QueueError> {
        let (dead, reply) = self
            .inner
            .end_held(key, &end, |record, now| {
                record.task.reason = Some(bound_reason(reason));
                record.finish(TaskState::DeadLettered, now);
                Change::Write(Some(record.clone()))
            })
            .await?;
        let held = self.inner.unhold(key);
        let copied = match &dead {
            Some(record) => self.inner.send_dead_letter(record).await,
            None => Ok(()),
        };
        match copied {
            Ok(()) => {
                if let Some(reply) = held.map(|held| held.reply).or(reply) {
                    self.inner
                        .settle_message(&reply, Bytes::from_static(b"+TERM"))
                        .await;
                }
            }
            // The record says dead-lettered: whoever receives the message
            // next (after ack_wait) writes the copy and terms it.
            Err(error) => {
                tracing::warn!(task = %key, %error, "dead letter recorded; its copy in the DLQ stream follows on redelivery")
            }
        }
        Ok(())
    }

    async fn reroute(
        &self,
        key: &LeaseKey,
        agent: &str,
        end: AttemptEnd,
    ) -> Result<(), QueueError> {
        let inner = &self.inner;
        // The message for the new agent goes first: if this daemon dies
        // before the record says so, the message still carries the task
        // (see `claim`), and the old one is dropped as outdated.
        let cached = inner
            .held
            .lock()
            .expect("not poisoned")
            .get(key)
            .and_then(|held| held.cached.clone());
        let (record, _) = match cached {
            Some(found) => found,
            None => inner
                .entry(&key.task_id)
                .await?
                .ok_or_else(|| QueueError::NotFound {
                    id: key.task_id.clone(),
                })?,
        };
        if !record.holds(key) {
            inner.unhold(key);
            return Err(record.stale(key));
        }
        let mut envelope = record.envelope();
        envelope.agent = agent.to_string();
        envelope.rerouted_from = Some(record.task.agent.clone());
        envelope.rerouted_attempt = Some(key.attempt);
        inner.publish_next(&mut envelope).await?;
        let version = (envelope.life, envelope.generation);
        let mut reply = record.reply.clone();
        inner
            .update(&key.task_id, Some(key), |record| {
                if record.version() >= version && record.task.agent == agent {
                    // The fallback agent's daemon took the new message and
                    // applied the hand-over first.
                    return Ok(Change::Keep(()));
                }
                if !record.holds(key) {
                    return Err(record.stale(key));
                }
                let now = inner.now();
                reply.clone_from(&record.reply);
                record.end_attempt(key.attempt, &end, now);
                record.refund_handover();
                record.task.agent = agent.to_string();
                // Another agent's checkpoint means nothing to this one.
                record.task.checkpoint = None;
                (record.life, record.generation) = version;
                record.requeue(now);
                Ok(Change::Write(()))
            })
            .await?;
        inner
            .settle_held(key, reply, Bytes::from_static(b"+ACK"))
            .await;
        inner.ring(agent).await;
        Ok(())
    }

    async fn escalate(
        &self,
        key: &LeaseKey,
        reason: &str,
        end: AttemptEnd,
    ) -> Result<(), QueueError> {
        let ((), reply) = self
            .inner
            .end_held(key, &end, |record, now| {
                record.task.charged_attempts = record.task.charged_attempts.saturating_sub(1);
                record.task.reason = Some(bound_reason(reason));
                record.finish(TaskState::Escalated, now);
                Change::Write(())
            })
            .await?;
        self.inner
            .settle_held(key, reply, Bytes::from_static(b"+TERM"))
            .await;
        Ok(())
    }

    async fn cancel(&self, id: &str, reason: &str) -> Result<bool, QueueError> {
        let inner = &self.inner;
        let mut dead = None;
        let cancelled = inner
            .update(id, None, |record| {
                // A try that lost a race decided nothing.
                dead = None;
                match record.task.state {
                    TaskState::Queued | TaskState::Escalated => {}
                    TaskState::Running => {
                        let attempt = record.task.attempts;
                        let end = AttemptEnd::new(AttemptOutcome::Cancelled, None, reason);
                        record.end_attempt(attempt, &end, inner.now());
                    }
                    _ => return Ok(Change::Keep(false)),
                }
                record.task.reason = Some(bound_reason(reason));
                record.finish(TaskState::DeadLettered, inner.now());
                dead = Some(record.clone());
                Ok(Change::Write(true))
            })
            .await?;
        // The task's message, if still in the stream, is terminated when a
        // daemon next fetches it and finds it dead-lettered (and that
        // writes the copy again if this one fails; an escalated task has
        // no message left, so its copy is tried a few times here).
        if let Some(record) = dead {
            followed_up(
                id,
                "write the dead letter's copy",
                inner.send_dead_letter_retried(&record).await,
            );
        }
        Ok(cancelled)
    }

    async fn resolve(&self, id: &str, resolution: &Resolution) -> Result<(), QueueError> {
        let inner = &self.inner;
        if let Resolution::Complete(result) = resolution {
            inner.settings.limits.check_result("result", result)?;
        }
        let (record, _) = inner
            .entry(id)
            .await?
            .ok_or_else(|| QueueError::NotFound { id: id.to_string() })?;
        let escalated = |record: &Record| {
            if record.task.state == TaskState::Escalated {
                Ok(())
            } else {
                Err(QueueError::WrongState {
                    id: id.to_string(),
                    state: record.task.state,
                    expected: &[TaskState::Escalated],
                    done: "resolved",
                })
            }
        };
        escalated(&record)?;
        match resolution {
            Resolution::Retry => {
                let read = record.version();
                let mut envelope = record.envelope();
                envelope.expects = Some(TaskState::Escalated);
                envelope.expects_version = Some(read);
                inner.publish_next(&mut envelope).await?;
                let version = (envelope.life, envelope.generation);
                inner
                    .update(id, None, |record| {
                        if record.version() >= version {
                            // A daemon took the new message already.
                            return Ok(Change::Keep(()));
                        }
                        escalated(record)?;
                        if record.version() != read {
                            // Retried by another resolution meanwhile, and
                            // escalated again: this answer was to the
                            // earlier escalation.
                            return Err(QueueError::Invalid(format!(
                                "task {id:?} was retried and escalated again while this \
                                 answer was made; look at it again (`flotilla tasks show \
                                 {id}`) and resolve the new escalation"
                            )));
                        }
                        record.generation = version.1;
                        record.task.charged_attempts = 0;
                        record.task.reason = None;
                        record.task.finished_ms = None;
                        record.requeue(inner.now());
                        Ok(Change::Write(()))
                    })
                    .await?;
                inner.ring(&record.task.agent).await;
            }
            Resolution::Complete(result) => {
                inner
                    .update(id, None, |record| {
                        escalated(record)?;
                        record.task.result = Some(result.clone());
                        record.task.checkpoint = None;
                        record.finish(TaskState::Completed, inner.now());
                        Ok(Change::Write(()))
                    })
                    .await?;
            }
            Resolution::Drop => {
                let mut dead = None;
                inner
                    .update(id, None, |record| {
                        dead = None;
                        escalated(record)?;
                        let reason = format!(
                            "dropped by a human after escalation: {}",
                            record.task.reason.as_deref().unwrap_or_default()
                        );
                        record.task.reason = Some(bound_reason(&reason));
                        record.finish(TaskState::DeadLettered, inner.now());
                        dead = Some(record.clone());
                        Ok(Change::Write(()))
                    })
                    .await?;
                if let Some(record) = dead {
                    followed_up(
                        id,
                        "write the dead letter's copy",
                        inner.send_dead_letter_retried(&record).await,
                    );
                }
            }
        }
        Ok(())
    }

    async fn requeue_running(&self) -> Result<u64, QueueError> {
        let owner = self.inner.settings.owner.clone();
        let mut count = 0;
        // This daemon's running tasks, from the tally (a start needs its
        // first full read anyway), each read again before it is returned.
        let running = self.tally().await?.newest(
            |live| live.state == TaskState::Running && live.owner.as_deref() == Some(&owner),
            usize::MAX,
        );
        for (_, id) in running {
            let Some((record, _)) = self.inner.entry(&id).await? else {
                continue;
            };
            if record.task.state != TaskState::Running || record.owner.as_deref() != Some(&owner) {
                continue;
            }
            let key = LeaseKey {
                task_id: record.task.id,
                attempt: record.task.attempts,
                life: record.life,
            };
            let end = AttemptEnd::new(
                AttemptOutcome::DaemonRestart,
                None,
                format!("daemon {owner} restarted while the task ran"),
            );
            match self
                .inner
                .requeue(&key, Duration::ZERO, &end, false, None)
                .await
            {
                Ok(_) => count += 1,
                Err(QueueError::StaleLease { .. } | QueueError::NotFound { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(count)
    }

    async fn expire_leases(&self) -> Result<u64, QueueError> {
        let now = self.inner.clock.steady_ms();
        let expired: Vec<(LeaseKey, UnixMillis)> = self
            .inner
            .held
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(_, held)| held.steady_deadline_ms <= now)
            .map(|(key, held)| (key.clone(), held.deadline_ms))
            .collect();
        let mut count = 0;
        for (key, deadline_ms) in expired {
            let end = AttemptEnd::new(
                AttemptOutcome::LeaseExpired,
                None,
                "the lease expired without progress",
            );
            match self
                .inner
                .requeue(&key, Duration::ZERO, &end, false, Some(deadline_ms))
                .await
            {
                Ok(true) => count += 1,
                Ok(false) => {}
                Err(QueueError::StaleLease { .. } | QueueError::NotFound { .. }) => {
                    self.inner.unhold(&key);
                }
                Err(error) => return Err(error),
            }
        }
        Ok(count)
    }

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, QueueError> {
        Ok(self.inner.entry(id).await?.map(|(record, _)| record.task))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>, QueueError> {
        let agent_kept = |agent: &String| filter.agent.as_ref().is_none_or(|kept| agent == kept);
        // Pick the ids, then read only the records shown. Tasks not
        // completed come from the tally, which holds only the live work
        // (the dashboard lists dead letters and escalations every 2 s);
        // completed ones from the end of the records' stream.
        let mut picked = Vec::new();
        if filter
            .state
            .is_none_or(|state| state != TaskState::Completed)
        {
            picked = self.tally().await?.newest(
                |live| {
                    filter.state.is_none_or(|state| live.state == state) && agent_kept(&live.agent)
                },
                filter.limit,
            );
        }
        if filter
            .state
            .is_none_or(|state| state == TaskState::Completed)
        {
            let completed = self
                .inner
                .newest_completed(filter.agent.as_deref(), filter.limit)
                .await?;
            picked.extend(completed);
            picked.sort_unstable_by(|a, b| b.cmp(a));
            // A task completed since the tally read it comes twice.
            let mut seen = std::collections::HashSet::with_capacity(picked.len());
            picked.retain(|(_, id)| seen.insert(id.clone()));
            picked.truncate(filter.limit);
        }
        let (mut tasks, mut bytes) = (Vec::with_capacity(picked.len()), 0usize);
        for (_, id) in picked {
            // A task deleted, or moved out of the state asked for, since
            // it was picked is left out.
            if let Some((record, _)) =
                self.inner.entry(&id).await?.filter(|(record, _)| {
                    filter.state.is_none_or(|state| record.task.state == state)
                })
            {
                let mut task = record.task;
                task.history.clear();
                let size =
                    |value: &Option<Value>| value.as_ref().map_or(0, |v| v.to_string().len());
                bytes = bytes
                    .saturating_add(task.payload.to_string().len())
                    .saturating_add(size(&task.result))
                    .saturating_add(size(&task.checkpoint));
                if bytes > super::MAX_LIST_BYTES {
                    return Err(super::listing_too_large(tasks.len() + 1));
                }
                tasks.push(task);
            }
        }
        Ok(tasks)
    }

    async fn counts(&self) -> Result<Vec<(String, StateCounts)>, QueueError> {
        let tally = self.tally().await?;
        let counts = tally.counts();
        // Under the tally's lock: a count that finished earlier cannot
        // overwrite a later one.
        *self.last.lock().expect("not poisoned") =
            Some((self.inner.clock.steady_ms(), counts.clone()));
        drop(tally);
        Ok(counts)
    }

    async fn replay(&self, selection: &Selection) -> Result<u64, QueueError> {
        let ids = self.dead_letters(selection).await?;
        let mut count = 0;
        for id in ids {
            // The copies to delete once replayed: those there before its
            // record is read. A replayed task may die again before its
            // purge, and its new copy must stay.
            let before = self.inner.dlq_next_sequence().await?;
            let Some((record, _)) = self.inner.dead_letter(&id).await? else {
                continue;
            };
            let read = record.version();
            let mut envelope = record.envelope();
            envelope.expects = Some(TaskState::DeadLettered);
            envelope.expects_version = Some(read);
            self.inner.publish_next(&mut envelope).await?;
            let (envelope_life, generation) = (envelope.life, envelope.generation);
            let now = self.inner.now();
            let replayed = self
                .inner
                .update(&record.task.id, None, |record| {
                    if record.version() >= (envelope_life, generation) {
                        // A daemon took the new message already.
                        return Ok(Change::Keep(true));
                    }
                    if record.task.state != TaskState::DeadLettered || record.version() != read {
                        // Replayed another way meanwhile (a second replay
                        // of the same dead letter): the new message is
                        // dropped when it comes.
                        return Ok(Change::Keep(false));
                    }
                    record.generation = generation;
                    record.task.charged_attempts = 0;
                    record.task.replays += 1;
                    record.task.reason = None;
                    record.task.finished_ms = None;
                    record.requeue(now);
                    Ok(Change::Write(true))
                })
                .await?;
            if !replayed {
                continue;
            }
            // An empty stream has no copy to delete (and a purge below
            // sequence 1 would delete every copy of the subject).
            if before > 1 {
                followed_up(
                    &id,
                    "delete the replayed dead letter's copy",
                    self.inner.purge_dead_letter(&record, Some(before)).await,
                );
            }
            self.inner.ring(&record.task.agent).await;
            count += 1;
        }
        Ok(count)
    }

    async fn purge(&self, selection: &Selection) -> Result<u64, QueueError> {
        let ids = self.dead_letters(selection).await?;
        let mut count = 0;
        for id in ids {
            let Some((record, revision)) = self.inner.dead_letter(&id).await? else {
                continue;
            };
            // Only the dead letter that was checked: a task replayed
            // meanwhile is left alone.
            let purged = self
                .inner
                .bounded(
                    "delete a task record",
                    self.inner
                        .records
                        .purge_expect_revision(record_key(&record.task.id), Some(revision)),
                )
                .await;
            match purged {
                Ok(()) => {}
                Err(error) => {
                    if matches!(self.inner.entry(&record.task.id).await, Ok(Some((now, _))) if now.task.state != TaskState::DeadLettered)
                    {
                        continue;
                    }
                    return Err(error);
                }
            }
            followed_up(
                &id,
                "delete the dead letter's copy",
                self.inner.purge_dead_letter(&record, None).await,
            );
            self.inner.forget_controls(&record.task.id).await;
            count += 1;
        }
        Ok(count)
    }

    async fn flush_released(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.inner.returns.send(Returned::Barrier(done)).is_ok() {
            let _ = wait.await;
        }
    }

    fn take_exhausted(&self) -> Vec<(String, String)> {
        self.inner.exhausted.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_keeps_the_live_records_and_counts_completions() {
        let record = |agent: &str, state: &str| {
            serde_json::to_vec(&serde_json::json!({
                "task": {"id": "x", "agent": agent, "state": state, "created_ms": 1, "payload": {"big": "ignored"}}
            }))
            .unwrap()
        };
        let mut tally = Tally::default();
        tally.apply("t.a", Some(&record("one", "queued")), 3);
        tally.apply("t.b", Some(&record("one", "queued")), 4);
        tally.apply("t.c", Some(&record("two", "dead_lettered")), 5);
        assert_eq!(tally.newest(|live| live.agent == "one", 5).len(), 2);
        tally.apply("t.a", Some(&record("one", "running")), 6);
        tally.apply("t.b", Some(&record("one", "completed")), 7);
        // A purged dead letter leaves; a record that does not parse is
        // passed over, but read.
        tally.apply("t.c", None, 8);
        tally.apply("t.d", Some(b"not json"), 9);
        assert_eq!(tally.read, 9);
        assert_eq!(tally.live.len(), 1, "only records not completed are kept");
        let one = StateCounts {
            running: 1,
            completed: 1,
            ..StateCounts::default()
        };
        // The agent left with nothing is not listed.
        assert_eq!(tally.counts(), vec![("one".to_string(), one)]);
        // A completed record resubmitted is live again (its completion
        // stays counted until the next full read).
        tally.apply("t.b", Some(&record("one", "queued")), 10);
        assert_eq!(tally.counts()[0].1.queued, 1);
        // A record read already (a read started over) changes nothing.
        tally.apply("t.b", Some(&record("one", "completed")), 7);
        assert_eq!(tally.counts()[0].1.completed, 1);
        assert_eq!(tally.read, 10);
        // The holder of a running task is kept while it runs.
        let held = |state: &str| {
            serde_json::to_vec(&serde_json::json!({
                "task": {"id": "e", "agent": "one", "state": state, "created_ms": 1},
                "owner": "d1"
            }))
            .unwrap()
        };
        tally.apply("t.e", Some(&held("running")), 11);
        assert_eq!(tally.live["t.e"].owner.as_deref(), Some("d1"));
        tally.apply("t.e", Some(&held("queued")), 12);
        assert_eq!(tally.live["t.e"].owner, None);
    }

    #[test]
    fn a_tally_lists_its_newest_records_first() {
        let mut tally = Tally::default();
        for (revision, (id, state, created_ms)) in [
            ("a", "queued", 30),
            ("b", "dead_lettered", 10),
            ("c", "queued", 20),
            ("d", "queued", 20),
            ("e", "queued", 40),
        ]
        .into_iter()
        .enumerate()
        {
            let record = serde_json::json!({
                "task": {"id": id, "agent": "one", "state": state, "created_ms": created_ms}
            });
            let record = serde_json::to_vec(&record).unwrap();
            tally.apply(&record_key(id), Some(&record), revision as u64 + 1);
        }
        let queued = |live: &Live| live.state == TaskState::Queued;
        let ids = |keep: &dyn Fn(&Live) -> bool, limit| {
            let newest = tally.newest(keep, limit);
            newest.into_iter().map(|(_, id)| id).collect::<Vec<_>>()
        };
        // Newest first, ties broken by id.
        assert_eq!(ids(&queued, 10), ["e", "a", "d", "c"]);
        assert_eq!(ids(&queued, 3), ["e", "a", "d"]);
        assert!(ids(&queued, 0).is_empty());
        assert_eq!(ids(&|live| live.id == "b", 10), ["b"]);
        assert_eq!(tally.newest(queued, 1), [(40, "e".to_string())]);
    }

    #[test]
    fn ids_become_keys_and_subject_tokens() {
        assert_eq!(escape("build-42/retry_1"), "build-42/retry_1");
        assert_eq!(escape("a.b:c@d=e"), "a=2Eb=3Ac=40d=3De");
        // Distinct ids stay distinct, and no token is empty.
        assert_ne!(escape("a.b"), escape("a=2Eb"));
        assert_eq!(record_key("x..y"), "t.x=2E=2Ey");
        // Every publication of an id has its own message id.
        assert_eq!(msg_id("t1", 0, 0), "t1");
        assert_eq!(msg_id("t1", 0, 2), "t1#2");
        assert_eq!(msg_id("t1", 7, 0), "t1#d7");
        assert_eq!(msg_id("t1", 7, 2), "t1#d7#2");
    }

    #[test]
    fn naks_carry_their_delay_in_nanoseconds() {
        assert_eq!(&nak(Duration::ZERO)[..], b"-NAK");
        assert_eq!(
            &nak(Duration::from_millis(1500))[..],
            br#"-NAK {"delay":1500000000}"#
        );
    }

    #[test]
    fn attempts_end_by_number_and_requeue_clears_the_holder() {
        let envelope = Envelope {
            id: "t".into(),
            agent: "a".into(),
            priority: Priority::High,
            life: 0,
            generation: 0,
            created_ms: 5,
            payload: serde_json::json!({"x": 1}),
            rerouted_from: None,
            rerouted_attempt: None,
            expects: None,
            expects_version: None,
        };
        let mut record = Record::from_envelope(&envelope, 10);
        record.task.attempts = 1;
        record.task.state = TaskState::Running;
        record.owner = Some("d".into());
        record.reply = Some("$JS.ACK.x".into());
        record.task.history.push(Attempt {
            number: 1,
            started_ms: 10,
            ended_ms: None,
            replica: None,
            outcome: None,
            detail: None,
        });
        let key = LeaseKey {
            task_id: "t".into(),
            attempt: 1,
            life: 0,
        };
        assert!(record.holds(&key));
        record.end_attempt(
            1,
            &AttemptEnd::new(AttemptOutcome::Error, Some("a/0".into()), "boom"),
            20,
        );
        record.requeue(30);
        assert!(!record.holds(&key));
        assert_eq!(record.task.history[0].outcome, Some(AttemptOutcome::Error));
        assert_eq!(record.task.history[0].replica.as_deref(), Some("a/0"));
        assert_eq!((record.owner.as_ref(), record.reply.as_ref()), (None, None));
        assert_eq!(record.envelope().priority, Priority::High);
        // The stored form round-trips.
        let stored = serde_json::to_value(&record).unwrap();
        assert_eq!(stored["task"]["id"], "t");
        let back: Record = serde_json::from_value(stored).unwrap();
        assert_eq!(back.task, record.task);
    }
}
