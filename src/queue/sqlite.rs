//! The embedded queue backend: SQLite (bundled) in WAL mode, one writer
//! thread with group commit, and a sync thread that fsyncs the WAL.
//!
//! Every write (submit, lease, ack, nak, progress, term, …) is a job sent to
//! the writer thread, which runs as many queued jobs as it can in one
//! `BEGIN IMMEDIATE` transaction, each inside its own savepoint, and
//! commits. Jobs that must be durable (submits, outcomes, checkpoints) are
//! answered by the sync thread only after an fsync of the WAL that covers
//! their commit: one fsync serves every commit made meanwhile, and the
//! writer goes on committing while the disk syncs (pipelined group commit;
//! SQLite's `synchronous=FULL` would hold the write lock during the fsync).
//! Leases and lease extensions are answered at commit: losing one in a
//! power cut only leaves the task queued. Reads use their own connection.
//! Other processes (the CLI submitting while the daemon runs) write through
//! their own writer; SQLite's lock serializes them and a counter in `meta`
//! tells the daemon to look for new work.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    AckOutcome, Attempt, AttemptEnd, AttemptOutcome, Lease, LeaseGuard, LeaseKey, LeaseRequest,
    Limits, ListFilter, NewTask, Priority, QueueError, Resolution, Returned, Selection,
    StateCounts, SubmitReceipt, TASK_CONTROLS, TaskQueue, TaskRecord, TaskState, bound_reason,
    exhausted_reason,
};
use crate::clock::{SharedClock, UnixMillis};

/// Schema version kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;
/// Most jobs committed in one transaction.
const MAX_GROUP: usize = 1024;
/// Jobs waiting for the writer; senders wait when it is full.
const JOB_QUEUE_CAPACITY: usize = 4096;
/// How often the daemon looks for tasks submitted by other processes.
const EXTERNAL_POLL: Duration = Duration::from_millis(10);
/// Longest wait for SQLite's lock held by another process.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Why writes are refused after an fsync failed.
const POISONED: &str = "an earlier fsync of the store failed, so later writes cannot be trusted to be durable; writes are refused until the daemon restarts";

/// Completed tasks deleted per transaction of a prune.
const PRUNE_BATCH: i64 = 2_000;
/// Dead letters replayed or purged per transaction by `--all`.
const DEAD_LETTER_BATCH: i64 = 2_000;
/// Most batches of one prune: 200,000 tasks every `PRUNE_INTERVAL` (10
/// minutes) keeps up with 300 completions a second.
const PRUNE_ROUNDS: usize = 100;

// Internal states. `Queued` is split in two so that the claim query's
// partial index holds only tasks that can be leased now.
const READY: i64 = 1;
const DELAYED: i64 = 2;
const RUNNING: i64 = 3;
const COMPLETED: i64 = 4;
const DEAD: i64 = 5;
const ESCALATED: i64 = 6;

fn state_of(code: i64) -> TaskState {
    match code {
        READY | DELAYED => TaskState::Queued,
        RUNNING => TaskState::Running,
        COMPLETED => TaskState::Completed,
        ESCALATED => TaskState::Escalated,
        _ => TaskState::DeadLettered,
    }
}

fn codes_of(state: TaskState) -> &'static [i64] {
    match state {
        TaskState::Queued => &[READY, DELAYED],
        TaskState::Running => &[RUNNING],
        TaskState::Completed => &[COMPLETED],
        TaskState::DeadLettered => &[DEAD],
        TaskState::Escalated => &[ESCALATED],
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    agent TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state INTEGER NOT NULL,
    payload TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    charged INTEGER NOT NULL DEFAULT 0,
    replays INTEGER NOT NULL DEFAULT 0,
    visible_at INTEGER NOT NULL,
    lease_deadline INTEGER,
    lease_owner TEXT,
    leased_at INTEGER,
    checkpoint TEXT,
    result TEXT,
    reason TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks (agent, priority, seq) WHERE state = 1;
CREATE INDEX IF NOT EXISTS tasks_delayed ON tasks (agent, visible_at) WHERE state = 2;
CREATE INDEX IF NOT EXISTS tasks_running ON tasks (lease_deadline) WHERE state = 3;
CREATE INDEX IF NOT EXISTS tasks_completed ON tasks (finished_at) WHERE state = 4;
CREATE INDEX IF NOT EXISTS tasks_dead ON tasks (seq) WHERE state = 5;
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state, agent);
CREATE TABLE IF NOT EXISTS attempts (
    task_seq INTEGER NOT NULL,
    number INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at INTEGER,
    replica TEXT,
    outcome TEXT,
    detail TEXT,
    PRIMARY KEY (task_seq, number)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS status (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
";

/// Who opens the store: the daemon leases and watches for outside submits;
/// a client (the CLI) tells the daemon about its submits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `flotilla up`.
    Daemon,
    /// Any other command.
    Client,
}

/// Limits and windows of the store, and who opens it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Limits and windows.
    pub limits: Limits,
    /// Who opens the store.
    pub role: Role,
}

impl Settings {
    /// Settings from the `[store]` config.
    pub fn from_config(store: &crate::config::StoreConfig, role: Role) -> Self {
        Self {
            limits: Limits::from_config(store),
            role,
        }
    }
}

/// When a durable status write goes ahead.
enum Only {
    /// Whatever is there.
    Always,
    /// Over nothing, or over `null`.
    OverNothing,
    /// Over exactly this text.
    Over(String),
}

fn storage(error: rusqlite::Error) -> QueueError {
    QueueError::Storage(error.to_string())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn to_sql_ms(value: UnixMillis) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// What a job sees inside the group transaction.
struct Context<'a> {
    conn: &'a Connection,
    now: UnixMillis,
    settings: &'a Settings,
    woken: HashSet<String>,
    external_submit: bool,
}

impl Context<'_> {
    fn now_sql(&self) -> i64 {
        to_sql_ms(self.now)
    }

    /// Runs `operation` in a savepoint: all of it or none of it.
    fn atomically<T>(
        &mut self,
        operation: impl FnOnce(&mut Self) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        // Cached statements: a savepoint per job must not cost a parse.
        let run = |sql: &str| {
            self.conn
                .prepare_cached(sql)
                .and_then(|mut statement| statement.execute([]))
        };
        run("SAVEPOINT job").map_err(storage)?;
        match operation(self) {
            Ok(value) => {
                run("RELEASE job").map_err(storage)?;
                Ok(value)
            }
            Err(error) => {
                self.conn
                    .execute_batch("ROLLBACK TO job; RELEASE job")
                    .map_err(storage)?;
                Err(error)
            }
        }
    }
}

type Deliver = Box<dyn FnOnce(Result<(), String>) + Send>;
/// A job runs inside the group transaction (`Some`), or is told that the
/// transaction could not start (`None`); either way it yields how to answer.
type Run = Box<dyn for<'a, 'b> FnOnce(Option<&'a mut Context<'b>>) -> Deliver + Send>;

/// A write for the writer thread.
struct Job {
    /// Whether its answer must wait for fsync. Leases, lease extensions and
    /// status snapshots need not: if one is lost in a power cut the task is
    /// simply still queued (or its lease expires), which at-least-once
    /// delivery allows. The next fsync makes them durable too, since the
    /// WAL is written in order.
    durable: bool,
    run: Run,
}

/// Sends jobs to the writer thread.
#[derive(Clone)]
struct Writer {
    jobs: mpsc::Sender<Job>,
}

impl Writer {
    /// Runs `operation` and answers once it is on disk (fsync'd).
    async fn call<T: Send + 'static>(
        &self,
        operation: impl FnOnce(&mut Context<'_>) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        self.send(true, operation).await
    }

    /// Runs `operation` and answers once it is committed, without waiting
    /// for fsync (see [`Job::durable`]).
    async fn call_fast<T: Send + 'static>(
        &self,
        operation: impl FnOnce(&mut Context<'_>) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        self.send(false, operation).await
    }

    async fn send<T: Send + 'static>(
        &self,
        durable: bool,
        operation: impl FnOnce(&mut Context<'_>) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        self.send_then(durable, operation, |value| value).await
    }

    /// Like [`Self::send`], turning the result with `then` once it is
    /// committed (on the writer thread; for a durable job, on the sync
    /// thread once synced). Leases get
    /// their guards there: if the caller is gone by then, dropping the
    /// answer releases them; if the commit failed, there is nothing to
    /// release and no guard is made.
    async fn send_then<T: Send + 'static, U: Send + 'static>(
        &self,
        durable: bool,
        operation: impl FnOnce(&mut Context<'_>) -> Result<T, QueueError> + Send + 'static,
        then: impl FnOnce(T) -> U + Send + 'static,
    ) -> Result<U, QueueError> {
        let (reply, answer) = oneshot::channel();
        let run: Run = Box::new(move |context| {
            let result = match context {
                Some(context) => context.atomically(operation),
                None => Err(QueueError::Storage(
                    "the store transaction could not start".into(),
                )),
            };
            Box::new(move |commit: Result<(), String>| {
                let answer = commit.map_err(QueueError::Storage).and(result).map(then);
                let _ = reply.send(answer);
            })
        });
        self.jobs
            .send(Job { durable, run })
            .await
            .map_err(|_| QueueError::Closed)?;
        answer.await.map_err(|_| QueueError::Closed)?
    }
}

/// Wakes lease waiters per agent.
#[derive(Default)]
struct Wakers {
    agents: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Wakers {
    fn subscribe(&self, agent: &str) -> watch::Receiver<u64> {
        let mut agents = self.agents.lock().expect("wakers lock");
        agents
            .entry(agent.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn wake<'a>(&self, agents: impl IntoIterator<Item = &'a String>) {
        let map = self.agents.lock().expect("wakers lock");
        for agent in agents {
            if let Some(sender) = map.get(agent) {
                sender.send_modify(|count| *count += 1);
            }
        }
    }

    fn wake_all(&self) {
        let map = self.agents.lock().expect("wakers lock");
        for sender in map.values() {
            sender.send_modify(|count| *count += 1);
        }
    }
}

/// The SQLite queue. Open it inside a tokio runtime.
pub struct SqliteQueue {
    writer: Writer,
    reader: Arc<Mutex<Connection>>,
    wakers: Arc<Wakers>,
    returns: mpsc::UnboundedSender<Returned>,
    settings: Settings,
    clock: SharedClock,
    store_id: String,
    path: PathBuf,
    stop_poller: Arc<AtomicBool>,
    poisoned: Arc<AtomicBool>,
    exhausted: super::Exhausted,
}

impl std::fmt::Debug for SqliteQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteQueue")
            .field("path", &self.path)
            .finish()
    }
}

fn open_connection(path: &Path) -> Result<Connection, QueueError> {
    let conn = Connection::open(path).map_err(|error| {
        QueueError::Storage(format!("cannot open store {}: {error}", path.display()))
    })?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(storage)?;
    // Every statement the writer runs stays prepared (rusqlite keeps 16).
    conn.set_prepared_statement_cache_capacity(64);
    let mode: String = retry_locked(|| {
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
    })
    .map_err(storage)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(QueueError::Storage(format!(
            "store {} refused WAL mode (got {mode}); put it on a local filesystem",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(storage)?;
    Ok(conn)
}

/// Runs `step` again while SQLite answers "database is locked" at once,
/// for up to [`BUSY_TIMEOUT`]. Before a new store is in WAL mode, its
/// rollback journal refuses a lock upgrade at once when another process
/// reads (to avoid a deadlock), without waiting for the busy timeout: two
/// processes opening a new store together (a daemon starting while
/// `flotilla status` runs) would otherwise fail.
fn retry_locked<T>(mut step: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match step() {
            Err(rusqlite::Error::SqliteFailure(error, _))
                if error.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            outcome => return outcome,
        }
    }
}

fn migrate(conn: &Connection, path: &Path) -> Result<String, QueueError> {
    let version: i64 = retry_locked(|| conn.query_row("PRAGMA user_version", [], |row| row.get(0)))
        .map_err(storage)?;
    if version > SCHEMA_VERSION {
        return Err(QueueError::Storage(format!(
            "store {} has schema version {version}, newer than this flotilla's {SCHEMA_VERSION}; upgrade flotilla",
            path.display()
        )));
    }
    retry_locked(|| conn.execute_batch("BEGIN IMMEDIATE")).map_err(storage)?;
    // Looked at inside the transaction: another process may have created
    // the store since the version was read.
    let foreign = (|| {
        let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        let tables: i64 = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
            [],
            |row| row.get(0),
        )?;
        // flotilla marks a store with its version as it creates it.
        Ok::<_, rusqlite::Error>(version == 0 && tables > 0)
    })();
    if !matches!(foreign, Ok(false)) {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(match foreign {
            Err(error) => storage(error),
            _ => QueueError::Storage(format!(
                "{} is an SQLite database but not a flotilla store; give [store] path a new file",
                path.display()
            )),
        });
    }
    let setup = (|| {
        conn.execute_batch(SCHEMA)?;
        // Columns added since version 1 was first written.
        let leased_at = conn
            .prepare("SELECT 1 FROM pragma_table_info('tasks') WHERE name = 'leased_at'")?
            .exists([])?;
        if !leased_at {
            conn.execute_batch("ALTER TABLE tasks ADD COLUMN leased_at INTEGER")?;
        }
        conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?1)",
            [uuid::Uuid::now_v7().simple().to_string()],
        )?;
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('external_seq', '0')",
            [],
        )?;
        conn.query_row("SELECT value FROM meta WHERE key = 'store_id'", [], |row| {
            row.get::<_, String>(0)
        })
    })();
    match setup {
        Ok(store_id) => {
            conn.execute_batch("COMMIT").map_err(storage)?;
            Ok(store_id)
        }
        Err(error) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(storage(error))
        }
    }
}

impl SqliteQueue {
    /// Opens (creating if needed) the store at `path`.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if the file cannot be opened, is not a
    /// flotilla store of a known version, or refuses WAL mode.
    pub fn open(path: &Path, settings: Settings, clock: SharedClock) -> Result<Self, QueueError> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|error| {
                QueueError::Storage(format!("cannot create {}: {error}", parent.display()))
            })?;
        }
        let writer_conn = open_connection(path)?;
        let store_id = migrate(&writer_conn, path)?;
        // The writer commits without fsync; the sync thread fsyncs the WAL
        // before durable jobs are answered (see `sync_loop`).
        writer_conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(storage)?;
        let poisoned = Arc::new(AtomicBool::new(false));
        let poisoned_flag = poisoned.clone();
        let (syncer, sync_batches) =
            std::sync::mpsc::sync_channel::<Vec<Deliver>>(JOB_QUEUE_CAPACITY);
        {
            let mut wal = path.as_os_str().to_owned();
            wal.push("-wal");
            let wal = PathBuf::from(wal);
            std::thread::Builder::new()
                .name("flotilla-store-sync".into())
                .spawn({
                    let poisoned = poisoned.clone();
                    move || sync_loop(&wal, &sync_batches, &poisoned)
                })
                .map_err(|error| {
                    QueueError::Storage(format!("cannot start the sync thread: {error}"))
                })?;
        }
        let reader = open_connection(path)?;
        let wakers = Arc::new(Wakers::default());
        let (jobs_tx, jobs_rx) = mpsc::channel(JOB_QUEUE_CAPACITY);
        {
            let settings = settings.clone();
            let clock = clock.clone();
            let wakers = wakers.clone();
            std::thread::Builder::new()
                .name("flotilla-store-writer".into())
                .spawn(move || {
                    writer_loop(
                        &writer_conn,
                        jobs_rx,
                        &settings,
                        &clock,
                        &wakers,
                        &syncer,
                        &poisoned,
                    )
                })
                .map_err(|error| QueueError::Storage(format!("cannot start writer: {error}")))?;
        }
        let writer = Writer { jobs: jobs_tx };
        let (returns, mut returned) = mpsc::unbounded_channel::<Returned>();
        {
            let writer = writer.clone();
            tokio::spawn(async move {
                while let Some(message) = returned.recv().await {
                    match message {
                        Returned::Lease(key) => {
                            // A store error (the lock held by a command
                            // beside the daemon) is tried again: else the
                            // task waits for its lease to run out, and is
                            // charged for it.
                            for retry in [None, Some(500), Some(2_000)] {
                                if let Some(ms) = retry {
                                    tokio::time::sleep(Duration::from_millis(ms)).await;
                                }
                                let (key, end) = (key.clone(), AttemptEnd::dropped());
                                match writer
                                    .call(move |context| release(context, &key, &end))
                                    .await
                                {
                                    Err(QueueError::Storage(error)) => {
                                        tracing::warn!(%error, "could not release a dropped lease; trying again");
                                    }
                                    _ => break,
                                }
                            }
                        }
                        Returned::Barrier(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            });
        }
        let stop_poller = Arc::new(AtomicBool::new(false));
        if settings.role == Role::Daemon {
            let poll_conn = open_connection(path)?;
            let wakers = Arc::downgrade(&wakers);
            let stop = stop_poller.clone();
            std::thread::Builder::new()
                .name("flotilla-store-poller".into())
                .spawn(move || poll_external(&poll_conn, &wakers, &stop))
                .map_err(|error| QueueError::Storage(format!("cannot start poller: {error}")))?;
        }
        Ok(Self {
            writer,
            reader: Arc::new(Mutex::new(reader)),
            wakers,
            returns,
            settings,
            clock,
            store_id,
            path: path.to_path_buf(),
            stop_poller,
            poisoned: poisoned_flag,
            exhausted: super::Exhausted::default(),
        })
    }

    /// The store's permanent random id (marks the agents it spawned).
    pub fn store_id(&self) -> &str {
        &self.store_id
    }

    /// Whether an fsync failed: the store refuses writes until restarted.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Saves a status snapshot under `key`.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if it cannot be written.
    pub async fn put_status(&self, key: &str, value: &Value) -> Result<(), QueueError> {
        let key = key.to_string();
        let text = value.to_string();
        self.writer
            .call_fast(move |context| {
                context
                    .conn
                    .prepare_cached(
                        "INSERT INTO status (key, value, updated_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (key) DO UPDATE SET value = ?2, updated_at = ?3",
                    )
                    .and_then(|mut statement| {
                        statement.execute(params![key, text, context.now_sql()])
                    })
                    .map_err(storage)?;
                Ok(())
            })
            .await
    }

    /// Stores `value` under status `key` like [`Self::put_status`], but
    /// answers only once it is on disk (fsync'd): for what must survive a
    /// power cut, such as a rollback journal.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if it cannot be written.
    pub async fn put_status_durably(&self, key: &str, value: &Value) -> Result<(), QueueError> {
        self.put_if(key.to_string(), Only::Always, value.to_string())
            .await
            .map(|_| ())
    }

    /// Writes `value` under status `key` only if what is there now is
    /// `expected` (`None`: nothing, or `null`); answers once on disk.
    /// Returns whether it was written.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if it cannot be written.
    pub async fn compare_and_put_status(
        &self,
        key: &str,
        expected: Option<&Value>,
        value: &Value,
    ) -> Result<bool, QueueError> {
        let only = match expected.filter(|expected| !expected.is_null()) {
            None => Only::OverNothing,
            Some(expected) => Only::Over(expected.to_string()),
        };
        self.put_if(key.to_string(), only, value.to_string()).await
    }

    /// The durable write of a status key, if `only` holds. Returns
    /// whether it was written.
    async fn put_if(&self, key: String, only: Only, text: String) -> Result<bool, QueueError> {
        self.writer
            .call(move |context| {
                let now = context.now_sql();
                let conn = context.conn;
                let changed = match only {
                    Only::Always => conn
                        .prepare_cached(
                            "INSERT INTO status (key, value, updated_at) VALUES (?1, ?2, ?3)
                             ON CONFLICT (key) DO UPDATE SET value = ?2, updated_at = ?3",
                        )
                        .and_then(|mut statement| statement.execute(params![key, text, now])),
                    Only::OverNothing => conn
                        .prepare_cached(
                            "INSERT INTO status (key, value, updated_at) VALUES (?1, ?2, ?3)
                             ON CONFLICT (key) DO UPDATE SET value = ?2, updated_at = ?3
                             WHERE status.value = 'null'",
                        )
                        .and_then(|mut statement| statement.execute(params![key, text, now])),
                    Only::Over(expected) => conn
                        .prepare_cached(
                            "UPDATE status SET value = ?2, updated_at = ?3
                             WHERE key = ?1 AND value = ?4",
                        )
                        .and_then(|mut statement| {
                            statement.execute(params![key, text, now, expected])
                        }),
                }
                .map_err(storage)?;
                Ok(changed == 1)
            })
            .await
    }

    /// The status snapshot under `key` and when it was written.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if it cannot be read.
    pub async fn get_status(&self, key: &str) -> Result<Option<(Value, UnixMillis)>, QueueError> {
        let key = key.to_string();
        self.read(move |conn| {
            let row: Option<(String, i64)> = conn
                .query_row(
                    "SELECT value, updated_at FROM status WHERE key = ?1",
                    [key],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()
                .map_err(storage)?;
            Ok(row.map(|(text, at)| {
                (
                    serde_json::from_str(&text).unwrap_or(Value::Null),
                    u64::try_from(at).unwrap_or(0),
                )
            }))
        })
        .await
    }

    /// The task counts per agent, without the completed ones (left at 0),
    /// for periodic readers (the watchdog, the metrics): it costs in
    /// proportion to the tasks not completed, where [`TaskQueue::counts`]
    /// reads every task the retention keeps.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if it cannot be read.
    pub async fn counts_without_completed(&self) -> Result<Vec<(String, StateCounts)>, QueueError> {
        self.count(NOT_COMPLETED).await
    }

    /// The task counts per agent of the rows `filter` (a `WHERE` clause of
    /// this file's own, never user input) selects.
    async fn count(&self, filter: &'static str) -> Result<Vec<(String, StateCounts)>, QueueError> {
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(&count_query(filter)).map_err(storage)?;
            let rows = statement
                .query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, i64>(2)?,
                    ))
                })
                .map_err(storage)?;
            // SQLite may return the groups in any order (it walks the
            // state index): sum them per agent.
            let mut counts: std::collections::BTreeMap<String, StateCounts> = Default::default();
            for row in rows {
                let (agent, state, count) = row.map_err(storage)?;
                counts
                    .entry(agent)
                    .or_default()
                    .add(state_of(state), as_u64(count));
            }
            Ok(counts.into_iter().collect())
        })
        .await
    }

    /// Deletes completed tasks older than the retention, oldest first, in
    /// transactions of [`PRUNE_BATCH`] (others write in between), at most
    /// [`PRUNE_ROUNDS`] of them. Returns how many.
    ///
    /// # Errors
    /// [`QueueError::Storage`] if the store fails.
    pub async fn prune(&self) -> Result<u64, QueueError> {
        let retention = to_sql_ms(millis(self.settings.limits.retention));
        let mut deleted = 0;
        for _ in 0..PRUNE_ROUNDS {
            let batch = self
                .writer
                .call(move |context| {
                    let cutoff = context.now_sql().saturating_sub(retention);
                    let victims: Vec<(i64, String)> = context
                        .conn
                        .prepare_cached(
                            "SELECT seq, id FROM tasks WHERE state = 4 AND finished_at < ?1
                             ORDER BY finished_at, seq LIMIT ?2",
                        )
                        .map_err(storage)?
                        .query_map(params![cutoff, PRUNE_BATCH], |row| {
                            Ok((row.get(0)?, row.get(1)?))
                        })
                        .map_err(storage)?
                        .collect::<Result<_, _>>()
                        .map_err(storage)?;
                    // Its attempts, journal and delegation links go with it.
                    for (seq, id) in &victims {
                        delete_task(context.conn, *seq, id)?;
                    }
                    Ok(victims.len() as u64)
                })
                .await?;
            deleted += batch;
            if batch < PRUNE_BATCH as u64 {
                break;
            }
        }
        Ok(deleted)
    }

    /// Applies `apply` to the dead letters of `selection`: named ones in one
    /// transaction (all or nothing), every one in transactions of
    /// [`DEAD_LETTER_BATCH`], so that a huge dead-letter queue neither
    /// fills memory nor holds the write lock for long. Returns how many.
    async fn in_batches(
        &self,
        selection: &Selection,
        apply: impl Fn(&mut Context<'_>, &[(i64, String, String)]) -> Result<(), QueueError>
        + Clone
        + Send
        + 'static,
    ) -> Result<u64, QueueError> {
        let mut after = 0;
        let mut count = 0;
        loop {
            let (named, apply) = (selection.clone(), apply.clone());
            let found = self
                .writer
                .call(move |context| {
                    let found = dead_letters(context, &named, after)?;
                    apply(context, &found)?;
                    Ok(found
                        .iter()
                        .map(|(seq, _, _)| *seq)
                        .max()
                        .map(|last| (last, found.len())))
                })
                .await?;
            let Some((last, done)) = found else {
                return Ok(count);
            };
            count += done as u64;
            if matches!(selection, Selection::Ids(_)) || done < DEAD_LETTER_BATCH as usize {
                return Ok(count);
            }
            after = last;
        }
    }

    async fn read<T: Send + 'static>(
        &self,
        operation: impl FnOnce(&Connection) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().expect("reader lock");
            operation(&conn)
        })
        .await
        .map_err(|error| QueueError::Storage(format!("reader failed: {error}")))?
    }
}

impl Drop for SqliteQueue {
    fn drop(&mut self) {
        self.stop_poller.store(true, Ordering::Relaxed);
    }
}

fn writer_loop(
    conn: &Connection,
    mut jobs: mpsc::Receiver<Job>,
    settings: &Settings,
    clock: &SharedClock,
    wakers: &Wakers,
    syncer: &std::sync::mpsc::SyncSender<Vec<Deliver>>,
    poisoned: &AtomicBool,
) {
    let mut group: Vec<Job> = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = jobs.blocking_recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        if poisoned.load(Ordering::SeqCst) {
            fail_group(std::mem::take(&mut group), POISONED);
            continue;
        }
        commit_group(
            conn,
            settings,
            clock,
            wakers,
            syncer,
            std::mem::take(&mut group),
        );
    }
}

fn fail_group(group: Vec<Job>, message: &str) {
    tracing::error!(%message);
    for job in group {
        (job.run)(None)(Err(message.to_string()));
    }
}

/// Runs `group` in one transaction and commits it without waiting for
/// fsync; answers the jobs that need no fsync at once and hands the others
/// to the sync thread, which answers them after the WAL is fsync'd.
fn commit_group(
    conn: &Connection,
    settings: &Settings,
    clock: &SharedClock,
    wakers: &Wakers,
    syncer: &std::sync::mpsc::SyncSender<Vec<Deliver>>,
    group: Vec<Job>,
) {
    // busy_timeout already waits 10 s for another process's lock; a client
    // submitting a huge batch may hold it longer, so try a few times.
    let mut began = conn.execute_batch("BEGIN IMMEDIATE");
    for _ in 0..2 {
        match &began {
            Err(rusqlite::Error::SqliteFailure(error, _))
                if error.code == rusqlite::ErrorCode::DatabaseBusy =>
            {
                began = conn.execute_batch("BEGIN IMMEDIATE");
            }
            _ => break,
        }
    }
    if let Err(error) = began {
        let busy = matches!(&error, rusqlite::Error::SqliteFailure(failure, _)
            if failure.code == rusqlite::ErrorCode::DatabaseBusy);
        let why = if busy {
            " (another process, such as a flotilla command run beside the daemon, held the store's lock for over 30 s)"
        } else {
            ""
        };
        return fail_group(
            group,
            &format!("the store transaction could not start: {error}{why}"),
        );
    }
    // Read once the lock is held: the wait for it must not shorten the
    // leases and delays this group gives out.
    let mut context = Context {
        conn,
        now: clock.now_ms(),
        settings,
        woken: HashSet::new(),
        external_submit: false,
    };
    let mut fast = Vec::new();
    let mut durable = Vec::new();
    let mut jobs = group.into_iter();
    let mut lost_transaction = false;
    for job in jobs.by_ref() {
        let deliver = (job.run)(Some(&mut context));
        if job.durable {
            durable.push(deliver);
        } else {
            fast.push(deliver);
        }
        // SQLite rolls the whole transaction back by itself on some errors
        // (disk full, I/O): then nothing of this group may be reported
        // done, and later jobs must not run outside a transaction.
        if conn.is_autocommit() {
            lost_transaction = true;
            break;
        }
    }
    if lost_transaction {
        let message = "the store rolled the transaction back (disk full or I/O error?)".to_string();
        tracing::error!(%message);
        for job in jobs {
            (job.run)(None)(Err(message.clone()));
        }
        for deliver in fast.into_iter().chain(durable) {
            deliver(Err(message.clone()));
        }
        return;
    }
    if context.external_submit && settings.role == Role::Client {
        let bumped = conn.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'external_seq'",
            [],
        );
        if let Err(error) = bumped {
            tracing::warn!(%error, "could not signal the daemon about new tasks");
        }
    }
    let commit = conn
        .execute_batch("COMMIT")
        .map_err(|error| error.to_string());
    if commit.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    for deliver in fast {
        deliver(commit.clone());
    }
    match &commit {
        Ok(()) => {
            wakers.wake(context.woken.iter());
            if !durable.is_empty()
                && let Err(std::sync::mpsc::SendError(durable)) = syncer.send(durable)
            {
                for deliver in durable {
                    deliver(Err("the store's sync thread is gone".into()));
                }
            }
        }
        Err(_) => {
            for deliver in durable {
                deliver(commit.clone());
            }
        }
    }
}

/// The sync thread: fsyncs the WAL once for every batch of commits that
/// arrived meanwhile, then answers their durable jobs. Commits are written
/// to the WAL in order, so one fsync makes every earlier commit durable;
/// data already checkpointed into the database file was synced by the
/// checkpoint (SQLite syncs both sides of a checkpoint at
/// synchronous=NORMAL).
fn sync_loop(wal: &Path, batches: &std::sync::mpsc::Receiver<Vec<Deliver>>, poisoned: &AtomicBool) {
    let mut handle: Option<(std::fs::File, u64)> = None;
    while let Ok(first) = batches.recv() {
        let mut ready = vec![first];
        while let Ok(more) = batches.try_recv() {
            ready.push(more);
        }
        // After a failed fsync the kernel may have dropped dirty pages and a
        // later fsync may "succeed": never trust the file again (fail-stop).
        let result = if poisoned.load(Ordering::SeqCst) {
            Err(POISONED.to_string())
        } else {
            sync_wal(wal, &mut handle).map_err(|error| {
                poisoned.store(true, Ordering::SeqCst);
                let message = format!(
                    "cannot fsync {}: {error}; the change was written but may not survive a crash of the machine (it may show as done, and a retry as a duplicate); writes are refused until the daemon restarts",
                    wal.display()
                );
                tracing::error!(%message);
                message
            })
        };
        for deliver in ready.into_iter().flatten() {
            deliver(result.clone());
        }
    }
}

/// fsyncs the WAL file at `wal`, reopening it if SQLite replaced it.
fn sync_wal(wal: &Path, handle: &mut Option<(std::fs::File, u64)>) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let inode = match std::fs::metadata(wal) {
        Ok(metadata) => metadata.ino(),
        // No WAL: everything was checkpointed into the database file, and
        // synced by the checkpoint.
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    if handle.as_ref().is_none_or(|(_, known)| *known != inode) {
        *handle = Some((std::fs::File::open(wal)?, inode));
        // A new WAL file: its directory entry must be durable too.
        if let Some(directory) = wal.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::File::open(directory)?.sync_all()?;
        }
    }
    let (file, _) = handle.as_ref().expect("opened above");
    file.sync_data()
}

fn poll_external(conn: &Connection, wakers: &Weak<Wakers>, stop: &AtomicBool) {
    let read = |conn: &Connection| -> Option<i64> {
        conn.query_row(
            "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'external_seq'",
            [],
            |row| row.get(0),
        )
        .ok()
    };
    let mut last = read(conn);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(EXTERNAL_POLL);
        let Some(wakers) = wakers.upgrade() else {
            return;
        };
        let seen = read(conn);
        if seen != last {
            last = seen;
            wakers.wake_all();
        }
    }
}

const RECORD_COLUMNS: &str = "id, agent, priority, state, payload, attempt, charged, replays,
    checkpoint, result, reason, visible_at, lease_deadline, created_at, updated_at, finished_at, seq";

/// How many columns [`RECORD_COLUMNS`] names.
const RECORD_COLUMN_COUNT: usize = 17;

fn parse_json(text: Option<String>) -> Option<Value> {
    text.map(|text| serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn as_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn as_u32(value: i64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<(TaskRecord, i64)> {
    let record = TaskRecord {
        id: row.get(0)?,
        agent: row.get(1)?,
        priority: Priority::from_rank(row.get(2)?),
        state: state_of(row.get(3)?),
        payload: parse_json(Some(row.get(4)?)).unwrap_or(Value::Null),
        attempts: as_u32(row.get(5)?),
        charged_attempts: as_u32(row.get(6)?),
        replays: as_u32(row.get(7)?),
        checkpoint: parse_json(row.get(8)?),
        result: parse_json(row.get(9)?),
        reason: row.get(10)?,
        visible_ms: as_u64(row.get(11)?),
        lease_deadline_ms: row.get::<_, Option<i64>>(12)?.map(as_u64),
        created_ms: as_u64(row.get(13)?),
        updated_ms: as_u64(row.get(14)?),
        finished_ms: row.get::<_, Option<i64>>(15)?.map(as_u64),
        history: Vec::new(),
    };
    Ok((record, row.get(16)?))
}

fn history(conn: &Connection, seq: i64) -> Result<Vec<Attempt>, QueueError> {
    let mut statement = conn
        .prepare_cached(
            "SELECT number, started_at, ended_at, replica, outcome, detail
             FROM attempts WHERE task_seq = ?1 ORDER BY number",
        )
        .map_err(storage)?;
    let rows = statement
        .query_map([seq], |row| {
            Ok(Attempt {
                number: as_u32(row.get(0)?),
                started_ms: as_u64(row.get(1)?),
                ended_ms: row.get::<_, Option<i64>>(2)?.map(as_u64),
                replica: row.get(3)?,
                outcome: row
                    .get::<_, Option<String>>(4)?
                    .and_then(|text| AttemptOutcome::parse(&text)),
                detail: row.get(5)?,
            })
        })
        .map_err(storage)?;
    rows.collect::<Result<_, _>>().map_err(storage)
}

/// The task's `(seq, state code, attempt)`.
fn lookup(conn: &Connection, id: &str) -> Result<Option<(i64, i64, u32)>, QueueError> {
    conn.prepare_cached("SELECT seq, state, attempt FROM tasks WHERE id = ?1")
        .map_err(storage)?
        .query_row([id], |row| {
            Ok((row.get(0)?, row.get(1)?, as_u32(row.get(2)?)))
        })
        .optional()
        .map_err(storage)
}

/// Checks that `key` holds the lease; returns the task's seq.
fn leased_seq(context: &Context<'_>, key: &LeaseKey) -> Result<i64, QueueError> {
    match lookup(context.conn, &key.task_id)? {
        None => Err(QueueError::NotFound {
            id: key.task_id.clone(),
        }),
        Some((seq, RUNNING, attempt))
            if attempt == key.attempt && u64::try_from(seq).ok() == Some(key.life) =>
        {
            Ok(seq)
        }
        Some((_, state, _)) => Err(QueueError::StaleLease {
            key: key.clone(),
            state: state_of(state),
        }),
    }
}

fn end_attempt(
    context: &Context<'_>,
    seq: i64,
    number: u32,
    end: &AttemptEnd,
) -> Result<(), QueueError> {
    context
        .conn
        .prepare_cached(
            "INSERT OR REPLACE INTO attempts (task_seq, number, started_at, ended_at, replica, outcome, detail)
             SELECT ?1, ?2, COALESCE(leased_at, ?3), ?3, ?4, ?5, ?6 FROM tasks WHERE seq = ?1",
        )
        .map_err(storage)?
        .execute(params![
            seq,
            number,
            context.now_sql(),
            end.replica,
            end.outcome.as_str(),
            end.detail.as_deref().map(bound_reason),
        ])
        .map_err(storage)?;
    Ok(())
}

/// Deletes the task of row `seq` (id `id`) with its attempts and what the
/// store keeps beside it under its id (rollback journal and claim,
/// delegation links): a new task given the same id starts clean, and
/// never rolls back the old one's changes.
fn delete_task(conn: &Connection, seq: i64, id: &str) -> Result<(), QueueError> {
    conn.execute("DELETE FROM attempts WHERE task_seq = ?1", [seq])
        .map_err(storage)?;
    conn.execute("DELETE FROM tasks WHERE seq = ?1", [seq])
        .map_err(storage)?;
    for kind in TASK_CONTROLS {
        conn.execute(
            "DELETE FROM status WHERE key = ?1",
            [format!("control.{kind}.{id}")],
        )
        .map_err(storage)?;
    }
    Ok(())
}

struct Prepared {
    id: String,
    agent: String,
    priority: i64,
    payload: String,
}

fn submit(context: &mut Context<'_>, tasks: &[Prepared]) -> Result<Vec<SubmitReceipt>, QueueError> {
    let window = to_sql_ms(millis(context.settings.limits.dedup_window));
    let now = context.now_sql();
    let mut receipts = Vec::with_capacity(tasks.len());
    for task in tasks {
        let existing: Option<(i64, i64, i64)> = context
            .conn
            .prepare_cached("SELECT seq, state, created_at FROM tasks WHERE id = ?1")
            .map_err(storage)?
            .query_row([&task.id], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .optional()
            .map_err(storage)?;
        if let Some((seq, state, created_at)) = existing {
            // Only a completed task outside the window gives its id up: a
            // live task or a dead letter (kept until replayed or purged)
            // is never replaced.
            let replaceable = state == COMPLETED && created_at.saturating_add(window) <= now;
            if !replaceable {
                receipts.push(SubmitReceipt {
                    id: task.id.clone(),
                    duplicate: true,
                    state: state_of(state),
                });
                continue;
            }
            // Outside the window and finished: the id may be used again.
            delete_task(context.conn, seq, &task.id)?;
        }
        context
            .conn
            .prepare_cached(
                "INSERT INTO tasks (id, agent, priority, state, payload, visible_at, created_at, updated_at)
                 VALUES (?1, ?2, ?3, 1, ?4, ?5, ?5, ?5)",
            )
            .map_err(storage)?
            .execute(params![task.id, task.agent, task.priority, task.payload, now])
            .map_err(storage)?;
        context.woken.insert(task.agent.clone());
        context.external_submit = true;
        receipts.push(SubmitReceipt {
            id: task.id.clone(),
            duplicate: false,
            state: TaskState::Queued,
        });
    }
    Ok(receipts)
}

/// A ready row as the claim query returns it.
struct ReadyRow {
    seq: i64,
    id: String,
    priority: i64,
    payload: String,
    checkpoint: Option<String>,
    attempt: u32,
    charged: u32,
}

struct Claimed {
    key: LeaseKey,
    priority: Priority,
    payload: Value,
    checkpoint: Option<Value>,
    feedback: Option<String>,
    charged: u32,
}

/// Claims up to `request.max` ready tasks; also returns the ids of those
/// it dead-lettered instead (attempts used up).
fn lease(
    context: &mut Context<'_>,
    request: &LeaseRequest,
) -> Result<(Vec<Claimed>, Vec<String>), QueueError> {
    let conn = context.conn;
    let now = context.now_sql();
    conn.prepare_cached(
        "UPDATE tasks SET state = 1 WHERE agent = ?1 AND state = 2 AND visible_at <= ?2",
    )
    .map_err(storage)?
    .execute(params![request.agent, now])
    .map_err(storage)?;
    let deadline = now.saturating_add(to_sql_ms(millis(request.lease_for)));
    let mut claimed = Vec::new();
    let mut exhausted = Vec::new();
    // Tasks past their attempt budget are dead-lettered and skipped; the
    // bound keeps one call from scanning forever.
    for _round in 0..8 {
        let want = request.max - claimed.len();
        let rows: Vec<ReadyRow> = conn
            .prepare_cached(
                "SELECT seq, id, priority, payload, checkpoint, attempt, charged FROM tasks
                 WHERE agent = ?1 AND state = 1 AND priority <= ?3 ORDER BY priority, seq LIMIT ?2",
            )
            .map_err(storage)?
            .query_map(
                params![request.agent, want as i64, request.lowest.rank()],
                |row| {
                    Ok(ReadyRow {
                        seq: row.get(0)?,
                        id: row.get(1)?,
                        priority: row.get(2)?,
                        payload: row.get(3)?,
                        checkpoint: row.get(4)?,
                        attempt: as_u32(row.get(5)?),
                        charged: as_u32(row.get(6)?),
                    })
                },
            )
            .map_err(storage)?
            .collect::<Result<_, _>>()
            .map_err(storage)?;
        if rows.is_empty() {
            break;
        }
        for ReadyRow {
            seq,
            id,
            priority,
            payload,
            checkpoint,
            attempt,
            charged,
        } in rows
        {
            if charged >= request.max_deliver {
                exhaust(context, seq, request.max_deliver)?;
                exhausted.push(id);
                continue;
            }
            let number = attempt + 1;
            conn.prepare_cached(
                "UPDATE tasks SET state = 3, attempt = ?2, charged = charged + 1,
                 lease_deadline = ?3, lease_owner = ?4, updated_at = ?5, leased_at = ?5 WHERE seq = ?1",
            )
            .map_err(storage)?
            .execute(params![seq, number, deadline, request.owner, now])
            .map_err(storage)?;
            let feedback = if attempt > 0 {
                conn.prepare_cached(
                    "SELECT outcome, detail FROM attempts WHERE task_seq = ?1 AND number = ?2",
                )
                .map_err(storage)?
                .query_row(params![seq, attempt], |row| {
                    Ok((
                        row.get::<_, Option<String>>(0)?,
                        row.get::<_, Option<String>>(1)?,
                    ))
                })
                .optional()
                .map_err(storage)?
                .and_then(|(outcome, detail)| {
                    super::feedback_of(outcome.as_deref(), detail.as_deref())
                })
            } else {
                None
            };
            claimed.push(Claimed {
                key: LeaseKey {
                    task_id: id,
                    attempt: number,
                    // A purged id submitted again gets a new row.
                    life: u64::try_from(seq).unwrap_or_default(),
                },
                priority: Priority::from_rank(priority),
                payload: serde_json::from_str(&payload).unwrap_or(Value::Null),
                checkpoint: parse_json(checkpoint),
                feedback,
                charged: charged + 1,
            });
        }
        if claimed.len() >= request.max {
            break;
        }
    }
    Ok((claimed, exhausted))
}

/// Dead-letters a task whose attempts are used up, naming its last outcome.
fn exhaust(context: &Context<'_>, seq: i64, max_deliver: u32) -> Result<(), QueueError> {
    let last: Option<(Option<String>, Option<String>)> = context
        .conn
        .query_row(
            "SELECT outcome, detail FROM attempts WHERE task_seq = ?1 ORDER BY number DESC LIMIT 1",
            [seq],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
        .map_err(storage)?;
    let last = last.and_then(|(outcome, detail)| outcome.map(|outcome| (outcome, detail)));
    let reason = exhausted_reason(
        max_deliver,
        last.as_ref()
            .map(|(outcome, detail)| (outcome.as_str(), detail.as_deref())),
    );
    dead_letter(context, seq, &reason)
}

fn dead_letter(context: &Context<'_>, seq: i64, reason: &str) -> Result<(), QueueError> {
    context
        .conn
        .prepare_cached(
            "UPDATE tasks SET state = 5, reason = ?2, lease_deadline = NULL, lease_owner = NULL,
             updated_at = ?3, finished_at = ?3 WHERE seq = ?1",
        )
        .map_err(storage)?
        .execute(params![seq, reason, context.now_sql()])
        .map_err(storage)?;
    Ok(())
}

fn ack(
    context: &mut Context<'_>,
    key: &LeaseKey,
    result: &str,
    end: &AttemptEnd,
) -> Result<AckOutcome, QueueError> {
    // One statement in the common case; the lookup only explains a miss.
    let updated: Option<i64> = context
        .conn
        .prepare_cached(
            "UPDATE tasks SET state = 4, result = ?3, lease_deadline = NULL, updated_at = ?4,
             finished_at = ?4 WHERE id = ?1 AND state = 3 AND attempt = ?2 AND seq = ?5
             RETURNING seq",
        )
        .map_err(storage)?
        .query_row(
            params![
                key.task_id,
                key.attempt,
                result,
                context.now_sql(),
                i64::try_from(key.life).unwrap_or(-1)
            ],
            |row| row.get(0),
        )
        .optional()
        .map_err(storage)?;
    let Some(seq) = updated else {
        return match lookup(context.conn, &key.task_id)? {
            None => Err(QueueError::NotFound {
                id: key.task_id.clone(),
            }),
            // Idempotent completion: a repeated ack of the completing
            // delivery changes nothing.
            Some((seq, COMPLETED, attempt))
                if attempt == key.attempt && u64::try_from(seq).ok() == Some(key.life) =>
            {
                Ok(AckOutcome::AlreadyCompleted)
            }
            Some((_, state, _)) => Err(QueueError::StaleLease {
                key: key.clone(),
                state: state_of(state),
            }),
        };
    };
    end_attempt(context, seq, key.attempt, end)?;
    Ok(AckOutcome::Completed)
}

fn nak(
    context: &mut Context<'_>,
    key: &LeaseKey,
    delay: Duration,
    end: &AttemptEnd,
    refund: bool,
) -> Result<(), QueueError> {
    let seq = leased_seq(context, key)?;
    let delay_ms = to_sql_ms(millis(delay));
    let state = if delay_ms == 0 { READY } else { DELAYED };
    context
        .conn
        .prepare_cached(
            "UPDATE tasks SET state = ?2, visible_at = ?3, lease_deadline = NULL, lease_owner = NULL,
             charged = charged - ?4, updated_at = ?5 WHERE seq = ?1",
        )
        .map_err(storage)?
        .execute(params![
            seq,
            state,
            context.now_sql().saturating_add(delay_ms),
            i64::from(refund),
            context.now_sql()
        ])
        .map_err(storage)?;
    end_attempt(context, seq, key.attempt, end)?;
    // A delayed task wakes the agent's waiting leasers too: they sleep
    // until the earliest delay they saw, which may be later than this one.
    let agent: String = context
        .conn
        .query_row("SELECT agent FROM tasks WHERE seq = ?1", [seq], |row| {
            row.get(0)
        })
        .map_err(storage)?;
    context.woken.insert(agent);
    Ok(())
}

fn release(context: &mut Context<'_>, key: &LeaseKey, end: &AttemptEnd) -> Result<(), QueueError> {
    nak(context, key, Duration::ZERO, end, true)
}

fn requeue(
    context: &mut Context<'_>,
    seqs: &[(i64, u32, String)],
    outcome: AttemptOutcome,
    detail: &str,
) -> Result<u64, QueueError> {
    let end = AttemptEnd::new(outcome, None, detail);
    for (seq, attempt, agent) in seqs {
        context
            .conn
            .prepare_cached(
                "UPDATE tasks SET state = 1, visible_at = ?2, lease_deadline = NULL, lease_owner = NULL,
                 updated_at = ?2 WHERE seq = ?1",
            )
            .map_err(storage)?
            .execute(params![seq, context.now_sql()])
            .map_err(storage)?;
        end_attempt(context, *seq, *attempt, &end)?;
        context.woken.insert(agent.clone());
    }
    Ok(seqs.len() as u64)
}

/// Running tasks whose lease ends by `until` (all of them for `i64::MAX`).
fn running(context: &Context<'_>, until: i64) -> Result<Vec<(i64, u32, String)>, QueueError> {
    context
        .conn
        .prepare_cached(
            "SELECT seq, attempt, agent FROM tasks WHERE state = 3 AND lease_deadline <= ?1",
        )
        .map_err(storage)?
        .query_map([until], |row| {
            Ok((row.get(0)?, as_u32(row.get(1)?), row.get(2)?))
        })
        .map_err(storage)?
        .collect::<Result<_, _>>()
        .map_err(storage)
}

/// The next dead letters after row `?1`, at most `?2` of them.
const DEAD_LETTERS_AFTER: &str =
    "SELECT seq, id, agent FROM tasks INDEXED BY tasks_dead WHERE seq > ?1 AND state = 5
     ORDER BY seq LIMIT ?2";

/// The rows [`SqliteQueue::counts_without_completed`] counts.
const NOT_COMPLETED: &str = "WHERE state IN (1, 2, 3, 5, 6)";

/// Counts per agent and state of the rows `filter` selects.
fn count_query(filter: &str) -> String {
    format!("SELECT agent, state, count(*) FROM tasks {filter} GROUP BY agent, state")
}

/// A listing, newest first: states `?1` to `?2`, agent `?3` if not null,
/// at most `?4` rows. With `walk`, the rows are walked newest first until
/// the limit is reached (`+state` keeps SQLite off the state index); else
/// through the state index, whose rows are sorted.
fn list_query(walk: bool) -> String {
    let state = if walk { "+state" } else { "state" };
    // The last column: the bytes the record's large fields take.
    format!(
        "SELECT {RECORD_COLUMNS}, length(CAST(payload AS BLOB))
            + ifnull(length(CAST(result AS BLOB)), 0)
            + ifnull(length(CAST(checkpoint AS BLOB)), 0)
         FROM tasks WHERE {state} BETWEEN ?1 AND ?2
         AND (?3 IS NULL OR agent = ?3) ORDER BY seq DESC LIMIT ?4"
    )
}

/// The seqs of the selected dead letters; every named id must be one.
/// The dead letters `selection` names, as `(seq, id, agent)`, each once;
/// for [`Selection::All`], the next [`DEAD_LETTER_BATCH`] after row
/// `after` (in row order, so a task that dies again meanwhile is not met
/// twice).
fn dead_letters(
    context: &Context<'_>,
    selection: &Selection,
    after: i64,
) -> Result<Vec<(i64, String, String)>, QueueError> {
    match selection {
        // Through `tasks_dead`, in row order: a batch reads only dead
        // letters, however many other tasks the store keeps.
        Selection::All => context
            .conn
            .prepare_cached(DEAD_LETTERS_AFTER)
            .map_err(storage)?
            .query_map(params![after, DEAD_LETTER_BATCH], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .map_err(storage)?
            .collect::<Result<_, _>>()
            .map_err(storage),
        Selection::Ids(ids) => {
            let mut found: Vec<(i64, String, String)> = Vec::with_capacity(ids.len());
            for id in ids {
                match lookup(context.conn, id)? {
                    None => return Err(QueueError::NotFound { id: id.clone() }),
                    Some((seq, DEAD, _)) if found.iter().any(|(seen, _, _)| *seen == seq) => {}
                    Some((seq, DEAD, _)) => {
                        let agent: String = context
                            .conn
                            .query_row("SELECT agent FROM tasks WHERE seq = ?1", [seq], |row| {
                                row.get(0)
                            })
                            .map_err(storage)?;
                        found.push((seq, id.clone(), agent));
                    }
                    Some((_, state, _)) => {
                        return Err(QueueError::WrongState {
                            id: id.clone(),
                            state: state_of(state),
                            expected: &[TaskState::DeadLettered],
                            done: "replayed or purged",
                        });
                    }
                }
            }
            Ok(found)
        }
    }
}

#[async_trait]
impl TaskQueue for SqliteQueue {
    async fn submit(&self, tasks: Vec<NewTask>) -> Result<Vec<SubmitReceipt>, QueueError> {
        if tasks.len() > super::MAX_SUBMIT_BATCH {
            return Err(QueueError::Invalid(format!(
                "{} tasks in one submit; at most {} are accepted at once",
                tasks.len(),
                super::MAX_SUBMIT_BATCH
            )));
        }
        let payloads = self.settings.limits.check_tasks(&tasks)?;
        let prepared: Vec<Prepared> = tasks
            .into_iter()
            .zip(payloads)
            .map(|(task, payload)| Prepared {
                id: task.id,
                agent: task.agent,
                priority: task.priority.rank(),
                payload,
            })
            .collect();
        self.writer
            .call(move |context| submit(context, &prepared))
            .await
    }

    async fn lease(
        &self,
        request: &LeaseRequest,
        wait: Duration,
    ) -> Result<Vec<Lease>, QueueError> {
        if request.max == 0 {
            return Ok(Vec::new());
        }
        let mut woken = self.wakers.subscribe(&request.agent);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            woken.borrow_and_update();
            let owned = request.clone();
            let returns = self.returns.clone();
            let agent = request.agent.clone();
            let exhausted = self.exhausted.clone();
            let (leases, next_visible) = self
                .writer
                .send_then(
                    false,
                    move |context| {
                        let (claimed, dead) = lease(context, &owned)?;
                        let next: Option<i64> = if claimed.is_empty() {
                            context
                                .conn
                                .prepare_cached(
                                    "SELECT min(visible_at) FROM tasks WHERE agent = ?1 AND state = 2",
                                )
                                .map_err(storage)?
                                .query_row([&owned.agent], |row| row.get(0))
                                .map_err(storage)?
                        } else {
                            None
                        };
                        Ok((claimed, dead, next))
                    },
                    move |(claimed, dead, next): (Vec<Claimed>, Vec<String>, Option<i64>)| {
                        for id in dead {
                            exhausted.push(id, agent.clone());
                        }
                        let leases: Vec<Lease> = claimed
                            .into_iter()
                            .map(|claim| Lease {
                                guard: LeaseGuard::new(claim.key.clone(), returns.clone()),
                                key: claim.key,
                                agent: agent.clone(),
                                priority: claim.priority,
                                payload: claim.payload,
                                checkpoint: claim.checkpoint,
                                feedback: claim.feedback,
                                charged: claim.charged,
                            })
                            .collect();
                        (leases, next)
                    },
                )
                .await?;
            if !leases.is_empty() {
                return Ok(leases);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let mut wake_at = deadline;
            if let Some(visible) = next_visible {
                let in_ms = as_u64(visible).saturating_sub(self.clock.now_ms());
                wake_at = wake_at.min(now + Duration::from_millis(in_ms.max(1)));
            }
            tokio::select! {
                changed = woken.changed() => {
                    if changed.is_err() {
                        return Err(QueueError::Closed);
                    }
                }
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    async fn ack(
        &self,
        key: &LeaseKey,
        result: &Value,
        end: AttemptEnd,
    ) -> Result<AckOutcome, QueueError> {
        let text = self.settings.limits.check_result("result", result)?;
        let key = key.clone();
        self.writer
            .call(move |context| ack(context, &key, &text, &end))
            .await
    }

    async fn nak(
        &self,
        key: &LeaseKey,
        delay: Duration,
        end: AttemptEnd,
    ) -> Result<(), QueueError> {
        let key = key.clone();
        self.writer
            .call(move |context| nak(context, &key, delay, &end, false))
            .await
    }

    async fn release(&self, key: &LeaseKey, end: AttemptEnd) -> Result<(), QueueError> {
        let key = key.clone();
        self.writer
            .call(move |context| release(context, &key, &end))
            .await
    }

    async fn progress(
        &self,
        key: &LeaseKey,
        extend: Duration,
        checkpoint: Option<&Value>,
    ) -> Result<(), QueueError> {
        let key = key.clone();
        let checkpoint = checkpoint
            .map(|checkpoint| self.settings.limits.check_result("checkpoint", checkpoint))
            .transpose()?;
        let extend_ms = to_sql_ms(millis(extend));
        // A checkpoint is kept durably; a bare extension need not be.
        let durable = checkpoint.is_some();
        self.writer
            .send(durable, move |context| {
                let seq = leased_seq(context, &key)?;
                context
                    .conn
                    .prepare_cached(
                        "UPDATE tasks SET lease_deadline = ?2, checkpoint = COALESCE(?3, checkpoint),
                         updated_at = ?4 WHERE seq = ?1",
                    )
                    .map_err(storage)?
                    .execute(params![
                        seq,
                        context.now_sql().saturating_add(extend_ms),
                        checkpoint,
                        context.now_sql()
                    ])
                    .map_err(storage)?;
                Ok(())
            })
            .await
    }

    async fn term(&self, key: &LeaseKey, reason: &str, end: AttemptEnd) -> Result<(), QueueError> {
        let key = key.clone();
        let reason = bound_reason(reason);
        self.writer
            .call(move |context| {
                let seq = leased_seq(context, &key)?;
                dead_letter(context, seq, &reason)?;
                end_attempt(context, seq, key.attempt, &end)
            })
            .await
    }

    async fn reroute(
        &self,
        key: &LeaseKey,
        agent: &str,
        end: AttemptEnd,
    ) -> Result<(), QueueError> {
        let key = key.clone();
        let agent = agent.to_string();
        self.writer
            .call(move |context| {
                let seq = leased_seq(context, &key)?;
                end_attempt(context, seq, key.attempt, &end)?;
                let now = context.now_sql();
                context
                    .conn
                    .prepare_cached(
                        "UPDATE tasks SET agent = ?2, state = 1, visible_at = ?3, lease_deadline = NULL,
                         lease_owner = NULL, checkpoint = NULL, updated_at = ?3,
                         charged = charged - (
                             SELECT COUNT(*) <= ?4 FROM attempts
                             WHERE task_seq = ?1 AND outcome = 'rerouted'
                         )
                         WHERE seq = ?1",
                    )
                    .map_err(storage)?
                    .execute(params![seq, agent, now, super::FREE_HANDOVERS])
                    .map_err(storage)?;
                context.woken.insert(agent);
                Ok(())
            })
            .await
    }

    async fn escalate(
        &self,
        key: &LeaseKey,
        reason: &str,
        end: AttemptEnd,
    ) -> Result<(), QueueError> {
        let key = key.clone();
        let reason = bound_reason(reason);
        self.writer
            .call(move |context| {
                let seq = leased_seq(context, &key)?;
                end_attempt(context, seq, key.attempt, &end)?;
                context
                    .conn
                    .prepare_cached(
                        "UPDATE tasks SET state = ?2, reason = ?3, lease_deadline = NULL, lease_owner = NULL,
                         charged = charged - 1, updated_at = ?4, finished_at = ?4 WHERE seq = ?1",
                    )
                    .map_err(storage)?
                    .execute(params![seq, ESCALATED, reason, context.now_sql()])
                    .map_err(storage)?;
                Ok(())
            })
            .await
    }

    async fn cancel(&self, id: &str, reason: &str) -> Result<bool, QueueError> {
        let id = id.to_string();
        let reason = bound_reason(reason);
        self.writer
            .call(move |context| {
                let Some((seq, state, attempt)) = lookup(context.conn, &id)? else {
                    return Err(QueueError::NotFound { id });
                };
                match state {
                    READY | DELAYED | ESCALATED => {}
                    RUNNING => {
                        let end = AttemptEnd::new(AttemptOutcome::Cancelled, None, reason.clone());
                        end_attempt(context, seq, attempt, &end)?;
                    }
                    _ => return Ok(false),
                }
                dead_letter(context, seq, &reason)?;
                Ok(true)
            })
            .await
    }

    async fn resolve(&self, id: &str, resolution: &Resolution) -> Result<(), QueueError> {
        let result = match resolution {
            Resolution::Complete(result) => {
                Some(self.settings.limits.check_result("result", result)?)
            }
            Resolution::Retry | Resolution::Drop => None,
        };
        let id = id.to_string();
        let resolution = resolution.clone();
        self.writer
            .call(move |context| {
                let Some((seq, state, _)) = lookup(context.conn, &id)? else {
                    return Err(QueueError::NotFound { id });
                };
                if state != ESCALATED {
                    return Err(QueueError::WrongState {
                        id,
                        state: state_of(state),
                        expected: &[TaskState::Escalated],
                        done: "resolved",
                    });
                }
                let now = context.now_sql();
                match resolution {
                    Resolution::Retry => {
                        let agent: String = context
                            .conn
                            .prepare_cached(
                                "UPDATE tasks SET state = 1, charged = 0, reason = NULL, visible_at = ?2,
                                 updated_at = ?2, finished_at = NULL WHERE seq = ?1 RETURNING agent",
                            )
                            .map_err(storage)?
                            .query_row(params![seq, now], |row| row.get(0))
                            .map_err(storage)?;
                        context.woken.insert(agent);
                        context.external_submit = true;
                    }
                    Resolution::Complete(_) => {
                        context
                            .conn
                            .prepare_cached(
                                "UPDATE tasks SET state = 4, result = ?2, checkpoint = NULL,
                                 updated_at = ?3, finished_at = ?3 WHERE seq = ?1",
                            )
                            .map_err(storage)?
                            .execute(params![seq, result, now])
                            .map_err(storage)?;
                    }
                    Resolution::Drop => {
                        context
                            .conn
                            .prepare_cached(
                                "UPDATE tasks SET state = 5, reason = 'dropped by a human after escalation: ' || COALESCE(reason, ''),
                                 updated_at = ?2, finished_at = ?2 WHERE seq = ?1",
                            )
                            .map_err(storage)?
                            .execute(params![seq, now])
                            .map_err(storage)?;
                    }
                }
                Ok(())
            })
            .await
    }

    async fn requeue_running(&self) -> Result<u64, QueueError> {
        self.writer
            .call(|context| {
                let seqs = running(context, i64::MAX)?;
                requeue(
                    context,
                    &seqs,
                    AttemptOutcome::DaemonRestart,
                    "the daemon holding the lease stopped",
                )
            })
            .await
    }

    async fn expire_leases(&self) -> Result<u64, QueueError> {
        self.writer
            .call_fast(|context| {
                let seqs = running(context, context.now_sql())?;
                requeue(
                    context,
                    &seqs,
                    AttemptOutcome::LeaseExpired,
                    "the lease deadline passed",
                )
            })
            .await
    }

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, QueueError> {
        let id = id.to_string();
        self.read(move |conn| {
            // One snapshot: an ack committing between the reads would show
            // its attempt twice.
            let snapshot = conn.unchecked_transaction().map_err(storage)?;
            let conn = &*snapshot;
            let found = conn
                .query_row(
                    &format!("SELECT {RECORD_COLUMNS} FROM tasks WHERE id = ?1"),
                    [&id],
                    record_from_row,
                )
                .optional()
                .map_err(storage)?;
            match found {
                None => Ok(None),
                Some((mut record, seq)) => {
                    record.history = history(conn, seq)?;
                    if record.state == TaskState::Running {
                        // The running attempt is written when it ends.
                        let leased_at: Option<i64> = conn
                            .query_row("SELECT leased_at FROM tasks WHERE seq = ?1", [seq], |row| {
                                row.get(0)
                            })
                            .map_err(storage)?;
                        record.history.push(Attempt {
                            number: record.attempts,
                            started_ms: leased_at.map_or(record.updated_ms, as_u64),
                            ended_ms: None,
                            replica: None,
                            outcome: None,
                            detail: None,
                        });
                    }
                    Ok(Some(record))
                }
            }
        })
        .await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>, QueueError> {
        let filter = filter.clone();
        self.read(move |conn| {
            let (low, high) = match filter.state {
                None => (READY, ESCALATED),
                Some(state) => {
                    let codes = codes_of(state);
                    (codes[0], codes[codes.len() - 1])
                }
            };
            let limit = i64::try_from(filter.limit.max(1)).unwrap_or(i64::MAX);
            // Every task, or the completed ones (most of a store kept for
            // a week), of every agent: walk the rows newest first and stop
            // at the limit (`+state` keeps SQLite off the state index,
            // through which it would read and sort every such row first).
            // One agent's (perhaps rare), or a rarer state: through the
            // index.
            let walk =
                filter.agent.is_none() && matches!(filter.state, None | Some(TaskState::Completed));
            let mut statement = conn.prepare_cached(&list_query(walk)).map_err(storage)?;
            let mut rows = statement
                .query(params![low, high, filter.agent, limit])
                .map_err(storage)?;
            let (mut records, mut bytes) = (Vec::new(), 0usize);
            while let Some(row) = rows.next().map_err(storage)? {
                let size: i64 = row.get(RECORD_COLUMN_COUNT).map_err(storage)?;
                bytes = bytes.saturating_add(usize::try_from(size).unwrap_or(0));
                if bytes > super::MAX_LIST_BYTES {
                    return Err(super::listing_too_large(records.len() + 1));
                }
                records.push(record_from_row(row).map_err(storage)?.0);
            }
            Ok(records)
        })
        .await
    }

    async fn counts(&self) -> Result<Vec<(String, StateCounts)>, QueueError> {
        self.count("").await
    }

    async fn replay(&self, selection: &Selection) -> Result<u64, QueueError> {
        self.in_batches(selection, |context, found| {
            for (seq, _, agent) in found {
                context
                    .conn
                    .prepare_cached(
                        "UPDATE tasks SET state = 1, charged = 0, replays = replays + 1, reason = NULL,
                         visible_at = ?2, updated_at = ?2, finished_at = NULL WHERE seq = ?1",
                    )
                    .map_err(storage)?
                    .execute(params![seq, context.now_sql()])
                    .map_err(storage)?;
                context.woken.insert(agent.clone());
                context.external_submit = true;
            }
            Ok(())
        })
        .await
    }

    async fn flush_released(&self) {
        let (done, wait) = oneshot::channel();
        if self.returns.send(Returned::Barrier(done)).is_ok() {
            let _ = wait.await;
        }
    }

    fn take_exhausted(&self) -> Vec<(String, String)> {
        self.exhausted.take()
    }

    async fn purge(&self, selection: &Selection) -> Result<u64, QueueError> {
        self.in_batches(selection, |context, found| {
            for (seq, id, _) in found {
                delete_task(context.conn, *seq, id)?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use serde_json::json;

    fn settings() -> Settings {
        Settings {
            limits: Limits {
                dedup_window: Duration::from_secs(60),
                retention: Duration::from_secs(3600),
                max_payload_bytes: 1 << 16,
                max_result_bytes: 1 << 16,
            },
            role: Role::Client,
        }
    }

    /// SQLite's plan for `sql` on the schema, one detail per line.
    fn plan(conn: &Connection, sql: &str) -> String {
        let mut statement = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let nulls = vec![rusqlite::types::Null; statement.parameter_count()];
        let details: Vec<String> = statement
            .query_map(rusqlite::params_from_iter(nulls), |row| {
                row.get::<_, String>(3)
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        details.join("\n")
    }

    /// The reads whose cost must not grow with the completed tasks a store
    /// keeps: the periodic counts, listings of every task or the completed
    /// ones, and the batches of `dlq replay/purge --all`.
    #[test]
    fn reads_of_a_large_store_use_their_indexes() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let counts = plan(&conn, &count_query(NOT_COMPLETED));
        assert!(
            counts.contains("INDEX tasks_by_state (state=?)"),
            "{counts}"
        );
        let walk = plan(&conn, &list_query(true));
        assert!(walk.starts_with("SCAN tasks"), "{walk}");
        assert!(!walk.contains("TEMP B-TREE"), "{walk}");
        let indexed = plan(&conn, &list_query(false));
        assert!(indexed.contains("INDEX tasks_by_state"), "{indexed}");
        let dead = plan(&conn, DEAD_LETTERS_AFTER);
        assert!(dead.contains("INDEX tasks_dead"), "{dead}");
        assert!(!dead.contains("TEMP B-TREE"), "{dead}");
    }

    /// A listing stops, with a clear error, once its records hold more
    /// than [`super::MAX_LIST_BYTES`] (1 MiB in unit tests).
    #[tokio::test]
    async fn a_listing_of_too_many_large_records_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let queue = SqliteQueue::open(&dir.path().join("q.db"), settings(), crate::clock::system())
            .unwrap();
        let big = json!("x".repeat(60_000));
        let tasks: Vec<NewTask> = (0..20)
            .map(|n| task(&format!("big-{n}"), big.clone()))
            .collect();
        queue.submit(tasks).await.unwrap();
        let filter = |limit| ListFilter {
            state: None,
            agent: None,
            limit,
        };
        assert_eq!(queue.list(&filter(10)).await.unwrap().len(), 10);
        let refused = queue.list(&filter(20)).await.unwrap_err().to_string();
        assert!(
            refused.contains("over 1 MiB of payloads and results by its task number 18"),
            "{refused}"
        );
    }

    /// `--all` goes through the dead letters in batches, each once, and
    /// the counts add up.
    #[tokio::test]
    async fn every_dead_letter_is_replayed_and_purged_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let queue = SqliteQueue::open(&dir.path().join("q.db"), settings(), crate::clock::system())
            .unwrap();
        let total = DEAD_LETTER_BATCH * 2 + 7;
        queue
            .writer
            .call(move |context| {
                for n in 0..total {
                    context
                        .conn
                        .execute(
                            "INSERT INTO tasks (id, agent, priority, state, payload, visible_at, created_at, updated_at)
                             VALUES (?1, 'a', 2, 5, '{}', 0, 0, 0)",
                            [format!("dead-{n}")],
                        )
                        .map_err(storage)?;
                }
                Ok(())
            })
            .await
            .unwrap();
        let expected = u64::try_from(total).unwrap();
        assert_eq!(queue.replay(&Selection::All).await.unwrap(), expected);
        let counts = queue.counts().await.unwrap();
        assert_eq!(
            (counts[0].1.queued, counts[0].1.dead_lettered),
            (expected, 0)
        );
        queue
            .writer
            .call(|context| {
                context
                    .conn
                    .execute("UPDATE tasks SET state = 5", [])
                    .map_err(storage)?;
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(queue.purge(&Selection::All).await.unwrap(), expected);
        assert!(queue.counts().await.unwrap().is_empty());
    }

    /// A task handed back with a delay wakes a leaser already waiting,
    /// which slept until its own deadline: the task runs after its delay,
    /// not after the waiter's wait.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delayed_task_wakes_a_waiting_leaser() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Arc::new(
            SqliteQueue::open(&dir.path().join("q.db"), settings(), crate::clock::system())
                .unwrap(),
        );
        queue.submit(vec![task("t", json!(1))]).await.unwrap();
        let request = request(1);
        let mut first = queue.lease(&request, Duration::ZERO).await.unwrap();
        let waiter = tokio::spawn({
            let (queue, request) = (queue.clone(), request.clone());
            async move { queue.lease(&request, Duration::from_secs(5)).await }
        });
        // Let the waiter find nothing and go to sleep.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let error = AttemptEnd::new(AttemptOutcome::Error, None, "test");
        queue
            .nak(&first[0].key, Duration::from_millis(100), error)
            .await
            .unwrap();
        first[0].settle();
        let started = std::time::Instant::now();
        let mut again = waiter.await.unwrap().unwrap();
        assert_eq!(again.len(), 1, "the waiter took the task");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "taken after its delay, not at the end of the wait"
        );
        again[0].settle();
    }

    /// A lease request of agent `a` for up to `max` tasks.
    fn request(max: usize) -> LeaseRequest {
        LeaseRequest {
            agent: "a".into(),
            max,
            lease_for: Duration::from_secs(30),
            owner: "test".into(),
            max_deliver: 3,
            lowest: Priority::Low,
        }
    }

    fn task(id: &str, payload: Value) -> NewTask {
        NewTask {
            id: id.into(),
            agent: "a".into(),
            priority: Priority::Normal,
            payload,
        }
    }

    fn end() -> AttemptEnd {
        AttemptEnd::new(AttemptOutcome::Completed, None, "test")
    }

    /// A store created by several processes at once (a daemon starting
    /// while `flotilla status` runs): before WAL mode is set, SQLite's
    /// rollback journal answers a lock upgrade with an immediate "database
    /// is locked", busy timeout or not.
    #[test]
    fn a_new_store_opened_by_many_at_once_opens_for_all() {
        for round in 0..40 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("q.db");
            let start = Arc::new(std::sync::Barrier::new(4));
            let openers: Vec<_> = (0..4)
                .map(|_| {
                    let (path, start) = (path.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        let conn = open_connection(&path)?;
                        migrate(&conn, &path)
                    })
                })
                .collect();
            let ids: Vec<String> = openers
                .into_iter()
                .map(|opener| {
                    opener
                        .join()
                        .unwrap()
                        .unwrap_or_else(|e| panic!("round {round}: {e}"))
                })
                .collect();
            assert!(ids.iter().all(|id| *id == ids[0]), "one store id: {ids:?}");
        }
    }

    #[test]
    fn an_older_store_gains_new_columns_and_a_foreign_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let conn = open_connection(&path).unwrap();
        migrate(&conn, &path).unwrap();
        // A version-1 store from before the column existed.
        conn.execute_batch("ALTER TABLE tasks DROP COLUMN leased_at")
            .unwrap();
        migrate(&conn, &path).unwrap();
        conn.prepare("SELECT leased_at FROM tasks").unwrap();
        let other = dir.path().join("other.db");
        let conn = open_connection(&other).unwrap();
        conn.execute_batch("CREATE TABLE notes (text TEXT)")
            .unwrap();
        let refused = migrate(&conn, &other).unwrap_err().to_string();
        assert!(refused.contains("not a flotilla store"), "{refused}");
    }

    #[test]
    fn the_wal_is_reopened_when_replaced_and_a_missing_one_needs_no_sync() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("q.db-wal");
        let mut handle = None;
        sync_wal(&wal, &mut handle).unwrap();
        assert!(handle.is_none(), "nothing to sync without a WAL");
        std::fs::write(&wal, b"frames").unwrap();
        sync_wal(&wal, &mut handle).unwrap();
        std::fs::remove_file(&wal).unwrap();
        std::fs::write(dir.path().join("other"), b"keep the inode busy").unwrap();
        std::fs::write(&wal, b"new frames").unwrap();
        sync_wal(&wal, &mut handle).unwrap();
        let second = handle.as_ref().unwrap().1;
        assert_eq!(
            second,
            std::fs::metadata(&wal).unwrap().ino(),
            "the new WAL is synced"
        );
    }

    #[test]
    fn after_a_failed_fsync_every_durable_answer_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // A WAL path under a regular file: stat fails with ENOTDIR.
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let wal = dir.path().join("file").join("q.db-wal");
        let poisoned = AtomicBool::new(false);
        let (batches_tx, batches) = std::sync::mpsc::sync_channel::<Vec<Deliver>>(4);
        let (answers_tx, answers) = std::sync::mpsc::channel::<Result<(), String>>();
        for _ in 0..2 {
            let answers_tx = answers_tx.clone();
            let deliver: Deliver = Box::new(move |result| answers_tx.send(result).unwrap());
            batches_tx.send(vec![deliver]).unwrap();
        }
        drop(batches_tx);
        sync_loop(&wal, &batches, &poisoned);
        assert!(poisoned.load(Ordering::SeqCst));
        for answer in answers.try_iter() {
            let message = answer.unwrap_err();
            assert!(message.contains("writes are refused"), "{message}");
        }
    }

    #[tokio::test]
    async fn an_id_is_reusable_after_the_window_only_once_completed() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_000_000);
        let queue = SqliteQueue::open(&dir.path().join("q.db"), settings(), clock.clone()).unwrap();
        queue
            .submit(vec![task("done", json!(1)), task("dead", json!(1))])
            .await
            .unwrap();
        let request = request(2);
        let mut leases = queue.lease(&request, Duration::ZERO).await.unwrap();
        leases.sort_by(|a, b| a.key.task_id.cmp(&b.key.task_id));
        queue.term(&leases[0].key, "bad", end()).await.unwrap();
        queue
            .ack(&leases[1].key, &json!("ok"), end())
            .await
            .unwrap();
        for lease in &mut leases {
            lease.settle();
        }
        clock.advance(30_000);
        let within = queue.submit(vec![task("done", json!(2))]).await.unwrap();
        assert!(within[0].duplicate, "inside the window");
        clock.advance(31_000);
        let after = queue
            .submit(vec![task("done", json!(3)), task("dead", json!(3))])
            .await
            .unwrap();
        assert!(
            !after[0].duplicate,
            "a completed id is free after the window"
        );
        assert!(
            after[1].duplicate,
            "a dead letter is kept until replayed or purged"
        );
        assert_eq!(queue.get("done").await.unwrap().unwrap().payload, json!(3));
        assert_eq!(
            queue.get("dead").await.unwrap().unwrap().state,
            TaskState::DeadLettered
        );
    }

    #[tokio::test]
    async fn prune_deletes_completed_tasks_past_retention() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_000_000);
        let queue = SqliteQueue::open(&dir.path().join("q.db"), settings(), clock.clone()).unwrap();
        queue.submit(vec![task("old", json!(1))]).await.unwrap();
        let request = request(1);
        let mut leases = queue.lease(&request, Duration::ZERO).await.unwrap();
        queue
            .ack(&leases[0].key, &json!("ok"), end())
            .await
            .unwrap();
        leases[0].settle();
        assert_eq!(queue.prune().await.unwrap(), 0, "not yet");
        clock.advance(3_600_001);
        assert_eq!(queue.prune().await.unwrap(), 1);
        assert!(queue.get("old").await.unwrap().is_none());
    }
}
