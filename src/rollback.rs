//! The rollback journal: the changes an agent's result declares it applied
//! (`"changes": [{"description": ..., "rollback": [argv]}]` in its
//! `result`), kept per task in the store, and undone in reverse order by
//! `flotilla rollback TASK_ID`, by a validation gate's `auto_rollback` or
//! by a post-accept watch breach. Undoing is idempotent: a change already
//! rolled back is skipped, and each outcome is recorded as it happens, so
//! a rollback cut short resumes where it stopped. One rollback of a task
//! runs at a time, across every process of the fleet: it holds a claim
//! in the store (compare-and-set) while it runs, so an operator's
//! `flotilla rollback` and a gate's `auto_rollback` racing never run a
//! change's command twice.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::UnixMillis;
use crate::queue::QueueError;
use crate::store::Store;
use crate::supervisor::process::SpawnSpec;

/// Most changes one result may declare.
pub const MAX_CHANGES: usize = 100;

/// Changes a task's journal holds (ten attempts' worth), besides those
/// rolled back and dropped to make room.
pub const MAX_JOURNAL: usize = MAX_CHANGES * 10;
/// Most arguments of one rollback command.
const MAX_ARGS: usize = 64;
/// Longest argument of a rollback command, and longest description.
const MAX_TEXT: usize = 4096;
/// Bytes of a rollback command's output kept in the journal.
const OUTPUT_BYTES: usize = 1024;
/// Bytes of a rollback run's outcome (how it ended, with its output)
/// kept in the journal, as JSON (escapes counted).
const OUTCOME_BYTES: usize = 2048;
/// Room kept in a journal for the outcome of each change not rolled back
/// yet, so that a rollback can always record its progress: the outcome
/// and the fields written beside it.
const OUTCOME_ROOM: usize = OUTCOME_BYTES + 128;
/// Bytes of a rollback's reason kept in the journal, as JSON.
const BECAUSE_BYTES: usize = 2048;
/// Room kept in a journal for what a rollback writes besides outcomes:
/// its reason and its claim's owner.
const JOURNAL_ROOM: usize = BECAUSE_BYTES + 512;

/// Where the store keeps the journal of `task`.
fn key(task: &str) -> String {
    format!("journal.{task}")
}

/// Where the store keeps the claim of a running rollback of `task`.
fn claim_key(task: &str) -> String {
    format!("rollback.{task}")
}

/// How long a claim outlives its last renewal beyond the command timeout:
/// a rollback whose process died frees its task after that.
const CLAIM_MARGIN: Duration = Duration::from_secs(30);

/// A rollback running, stored under [`claim_key`] while it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Claim {
    /// Who runs it: host, process and a token of this run.
    owner: String,
    /// Why it runs.
    because: String,
    /// When it started.
    since_ms: UnixMillis,
    /// When it lapses unless renewed (before each change's command).
    until_ms: UnixMillis,
    /// The process holding it, so that one on the same machine can tell
    /// at once that it died (absent in claims of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    holder: Option<Holder>,
}

impl Claim {
    fn value(&self) -> Value {
        serde_json::to_value(self).expect("a claim serializes")
    }

    /// Whether it still holds the task at `now`: not lapsed, and its
    /// process not seen dead.
    fn live(&self, now: UnixMillis) -> bool {
        self.until_ms > now && !self.holder.as_ref().is_some_and(Holder::is_dead)
    }
}

/// A process, as a claim names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Holder {
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`), random
    /// at each boot: the same value means the same machine, the same
    /// boot. Host names and pid namespace inodes repeat across machines.
    boot: String,
    /// The inode of its pid namespace: containers of one machine share
    /// its boot id, not a pid namespace.
    pid_ns: u64,
    pid: u32,
}

impl Holder {
    /// This process, where its boot id and pid namespace can be read.
    fn this() -> Option<Self> {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let boot = boot.trim();
        if boot.is_empty() {
            return None;
        }
        Some(Self {
            boot: boot.to_string(),
            pid_ns: pid_namespace()?,
            pid: std::process::id(),
        })
    }

    /// Whether the process is known to be gone: on this machine since the
    /// same boot, in this pid namespace, and no process has its pid. A
    /// pid reused since looks alive: the claim then lapses by time, as
    /// any other.
    fn is_dead(&self) -> bool {
        let Some(here) = Self::this() else {
            return false;
        };
        if self.boot != here.boot || self.pid_ns != here.pid_ns || self.pid == here.pid {
            return false;
        }
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        )
    }
}

/// The inode of this process's pid namespace (`/proc/self/ns/pid` links
/// to `pid:[INODE]`).
fn pid_namespace() -> Option<u64> {
    let link = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let link = link.to_str()?;
    link.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
}

/// Whether a rollback of a task holds it, as [`running`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Running {
    /// None does.
    No,
    /// One does, until `until_ms` unless it renews its claim.
    Live {
        /// When its claim lapses unless renewed.
        until_ms: UnixMillis,
        /// Why it runs.
        because: String,
    },
    /// One was cut off (its process died, or stalled past its claim): its
    /// claim is left, and the rollback is unfinished.
    CutOff {
        /// Why it ran.
        because: String,
    },
}

/// Whether a rollback of `task` runs now, or was cut off.
///
/// # Errors
/// When the store cannot be read.
pub async fn running(store: &Store, task: &str, now: UnixMillis) -> Result<Running, QueueError> {
    let held = store.get_control(&claim_key(task)).await?;
    Ok(judge(held.as_ref(), now))
}

/// What the stored claim `held` says at `now`. A freed claim is null; an
/// unreadable one holds nothing (it would otherwise block for good).
fn judge(held: Option<&Value>, now: UnixMillis) -> Running {
    let Some(held) = held.filter(|held| !held.is_null()) else {
        return Running::No;
    };
    match serde_json::from_value::<Claim>(held.clone()) {
        Ok(claim) if claim.live(now) => Running::Live {
            until_ms: claim.until_ms,
            because: claim.because,
        },
        Ok(claim) => Running::CutOff {
            because: claim.because,
        },
        Err(_) => Running::CutOff {
            because: "an unreadable claim".into(),
        },
    }
}

/// Removes the claim of `task` if it is not live: left by a rollback that
/// was cut off after its last command. Returns whether none is left.
///
/// # Errors
/// When the store fails.
pub async fn clear_cut_off(store: &Store, task: &str, now: UnixMillis) -> Result<bool, QueueError> {
    let key = claim_key(task);
    let held = store.get_control(&key).await?;
    match judge(held.as_ref(), now) {
        Running::No => Ok(true),
        Running::Live { .. } => Ok(false),
        Running::CutOff { .. } => {
            store
                .compare_and_put_control(&key, held.as_ref(), &Value::Null)
                .await
        }
    }
}

/// A change declared by a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// What was changed, for humans.
    pub description: String,
    /// The command that undoes it (argv), run in the agent's working
    /// directory.
    pub rollback: Vec<String>,
}

/// Where a change stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeState {
    /// Applied by the agent; not undone.
    Applied,
    /// Its rollback command succeeded.
    RolledBack,
    /// Its rollback command failed; running the rollback again retries it.
    Failed,
}

/// One change in the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Entry {
    /// The change.
    #[serde(flatten)]
    pub change: Change,
    /// The attempt whose result declared it.
    #[serde(default)]
    pub attempt: u32,
    /// The agent whose result declared it: its directory and environment
    /// run the rollback command (absent in older journals: the journal's
    /// `agent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Where it stands.
    pub state: ChangeState,
    /// Rollback runs of it so far.
    pub runs: u32,
    /// How its last rollback run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// When its last rollback run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<UnixMillis>,
}

/// A task's journal: every change any of its attempts declared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Journal {
    /// The task.
    pub task: String,
    /// The agent whose result declared the latest changes (its directory
    /// and environment run the rollback commands).
    pub agent: String,
    /// The latest attempt that declared changes.
    pub attempt: u32,
    /// The changes, in the order they were applied.
    pub changes: Vec<Entry>,
    /// Changes rolled back and then dropped from the front of `changes` to
    /// make room for a later attempt's: `changes[i]` is change number
    /// `dropped + i` of the task.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped: usize,
    /// Why the last rollback ran (`flotilla rollback`, a gate, a watch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_because: Option<String>,
    /// Made with the journal: a rollback tells by it that the journal it
    /// works on was not replaced (its task purged, the id given to a new
    /// task). Absent from journals of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The claim owner of the rollback that last took the journal: one
    /// whose claim lapsed and was taken by another saves nothing over the
    /// newer one's progress. Absent from journals of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
}

fn is_zero(value: &usize) -> bool {
    *value == 0
}

impl Journal {
    /// Changes declared by the task's attempts, dropped ones included.
    pub fn declared(&self) -> usize {
        self.dropped + self.changes.len()
    }

    /// Whether every change is rolled back.
    pub fn is_rolled_back(&self) -> bool {
        self.changes
            .iter()
            .all(|entry| entry.state == ChangeState::RolledBack)
    }

    /// Changes rolled back, dropped ones included.
    pub fn rolled_back(&self) -> usize {
        self.dropped
            + self
                .changes
                .iter()
                .filter(|entry| entry.state == ChangeState::RolledBack)
                .count()
    }

    /// The change whose rollback command failed, where a rollback stopped.
    /// A rollback that ended without one undid every change it began with
    /// (changes recorded while it ran stay applied, for the next one).
    pub fn failed(&self) -> Option<&Entry> {
        // The highest: a failed change above it would have been run again.
        self.changes
            .iter()
            .rev()
            .find(|entry| entry.state == ChangeState::Failed)
    }

    /// What a rollback that just ended did, for humans: how many changes
    /// are rolled back, and what is left (a failed change, or changes
    /// recorded while it ran).
    pub fn summary(&self) -> String {
        let mut summary = format!("{} change(s) rolled back", self.rolled_back());
        let applied = self
            .changes
            .iter()
            .filter(|entry| entry.state == ChangeState::Applied)
            .count();
        if applied > 0 && self.failed().is_none() {
            summary.push_str(&format!(
                "; {applied} change(s) recorded while it ran stay applied (roll back again to undo them)"
            ));
        }
        summary
    }
}

/// The changes of a result's `changes` field, checked.
///
/// # Errors
/// What is wrong with them, naming the change.
pub fn parse_changes(value: &Value) -> Result<Vec<Change>, String> {
    let changes: Vec<Change> = serde_json::from_value(value.clone()).map_err(|error| {
        format!(
            "`changes` is not a list of {{\"description\": TEXT, \"rollback\": [PROGRAM, ARGS...]}}: {error}"
        )
    })?;
    if changes.len() > MAX_CHANGES {
        return Err(format!(
            "`changes` lists {} changes; at most {MAX_CHANGES}",
            changes.len()
        ));
    }
    for (index, change) in changes.iter().enumerate() {
        if change.rollback.first().is_none_or(String::is_empty) || change.rollback.len() > MAX_ARGS
        {
            return Err(format!(
                "changes[{index}].rollback must name a program and at most {} arguments",
                MAX_ARGS - 1
            ));
        }
        if change.description.len() > MAX_TEXT
            || change.rollback.iter().any(|arg| arg.len() > MAX_TEXT)
        {
            return Err(format!("changes[{index}] has text over {MAX_TEXT} bytes"));
        }
    }
    Ok(changes)
}

/// Records `changes` of `task` (attempt `attempt`, agent `agent`).
///
/// # Errors
/// When the store refuses the write; [`QueueError::Invalid`] when the
/// journal has no room for them all (it keeps ten attempts' worth of
/// changes, in at most what the store keeps in one setting, with room for
/// each one's rollback outcome; those rolled back at its front make room
/// when needed): the changes that fit are recorded then.
pub async fn record(
    store: &Store,
    task: &str,
    agent: &str,
    attempt: u32,
    changes: Vec<Change>,
) -> Result<Journal, QueueError> {
    record_within(
        store,
        task,
        agent,
        attempt,
        changes,
        store.max_control_bytes(),
    )
    .await
}

/// [`record`], in a journal of at most `max_bytes`.
async fn record_within(
    store: &Store,
    task: &str,
    agent: &str,
    attempt: u32,
    changes: Vec<Change>,
    max_bytes: usize,
) -> Result<Journal, QueueError> {
    // Appended to what earlier attempts declared: a change a rejected
    // attempt applied is still there to undo.
    let mut full = None;
    let stored = edit(store, task, |stored| {
        full = None;
        let mut journal = stored.unwrap_or_else(|| Journal {
            task: task.to_string(),
            agent: agent.to_string(),
            attempt,
            changes: Vec::new(),
            dropped: 0,
            rolled_back_because: None,
            id: Some(uuid::Uuid::now_v7().simple().to_string()),
            claimed_by: None,
        });
        if journal.changes.iter().any(|entry| entry.attempt == attempt) {
            // Recorded already (the same result handled twice).
            return None;
        }
        // Changes rolled back at the front are done with: as many as
        // needed make room (a rollback saving its progress meanwhile
        // finds its changes by their number, see `save_progress`).
        let needed = (journal.changes.len() + changes.len()).saturating_sub(MAX_JOURNAL);
        let done = journal
            .changes
            .iter()
            .take_while(|entry| entry.state == ChangeState::RolledBack)
            .count();
        let drop = needed.min(done);
        journal.changes.drain(..drop);
        journal.dropped += drop;
        let room = MAX_JOURNAL.saturating_sub(journal.changes.len());
        let entries: Vec<Entry> = changes
            .iter()
            .take(room)
            .map(|change| Entry {
                change: change.clone(),
                attempt,
                agent: Some(agent.to_string()),
                state: ChangeState::Applied,
                runs: 0,
                outcome: None,
                at_ms: None,
            })
            .collect();
        // In bytes too: each change with room for its rollback's outcome,
        // and room for the rollback's reason. Changes rolled back at the
        // front make room here as well.
        let waiting = journal
            .changes
            .iter()
            .filter(|entry| entry.state != ChangeState::RolledBack)
            .count();
        let mut bytes = json_bytes(&journal) + waiting * OUTCOME_ROOM + JOURNAL_ROOM;
        let wanted: usize = entries
            .iter()
            .map(|entry| json_bytes(entry) + 1 + OUTCOME_ROOM)
            .sum();
        let mut more = 0;
        while bytes + wanted > max_bytes
            && journal
                .changes
                .get(more)
                .is_some_and(|entry| entry.state == ChangeState::RolledBack)
        {
            bytes -= (json_bytes(&journal.changes[more]) + 1).min(bytes);
            more += 1;
        }
        journal.changes.drain(..more);
        journal.dropped += more;
        let fit = entries
            .iter()
            .take_while(|entry| {
                bytes += json_bytes(entry) + 1 + OUTCOME_ROOM;
                bytes <= max_bytes
            })
            .count();
        if changes.len() > fit {
            // Those that fit are kept (they were applied, and can still be
            // undone), but the result cannot be accepted: an accepted
            // task must be one whose every declared change can be undone.
            let limit = if fit < room {
                format!(
                    "the {max_bytes} bytes the store keeps in one journal (on a broker, its max_payload; with room for each change's rollback outcome)"
                )
            } else {
                format!("its limit of {MAX_JOURNAL} changes")
            };
            full = Some(format!(
                "the task's rollback journal held {} changes from its earlier attempts ({waiting} not rolled back); {} of this attempt's {} did not fit {limit} (not recorded, so not undone by `flotilla rollback`: the first was {:?})",
                journal.changes.len(),
                changes.len() - fit,
                changes.len(),
                changes[fit].description,
            ));
            if fit == 0 {
                return None;
            }
        }
        journal.agent = agent.to_string();
        journal.attempt = attempt;
        journal.changes.extend(entries.into_iter().take(fit));
        Some(journal)
    })
    .await?;
    if let Some(reason) = full {
        return Err(QueueError::Invalid(reason));
    }
    Ok(stored.expect("stored or recorded already"))
}

/// The length of `value` in JSON.
fn json_bytes(value: &impl Serialize) -> usize {
    serde_json::to_vec(value).map_or(0, |bytes| bytes.len())
}

/// `text` cut so that it takes at most `max` bytes as a JSON string
/// (escapes counted: a control character takes six), with `…` when cut.
fn cut_json(text: &str, max: usize) -> String {
    let escaped = |c: char| match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if u32::from(c) < 0x20 => 6,
        c => c.len_utf8(),
    };
    // Room for the quotes and the mark.
    let budget = max.saturating_sub(2 + '…'.len_utf8());
    let mut used = 0;
    let mut end = text.len();
    for (index, c) in text.char_indices() {
        used += escaped(c);
        if used > budget {
            end = index;
            break;
        }
    }
    if end == text.len() {
        text.to_string()
    } else {
        format!("{}…", &text[..end])
    }
}

/// How a rollback finds the process a change's command runs as: from the
/// name of the agent that declared it.
pub type SpecFor<'a> = dyn Fn(&str) -> Option<SpawnSpec> + Send + Sync + 'a;

/// Tries of a journal's compare-and-set before giving up.
const EDIT_TRIES: usize = 16;

/// Changes the journal of `task` by compare-and-set: `change` gets the
/// journal as stored now (`None`: none yet) and returns the one to store,
/// or `None` to leave it; it is called again when another process wrote
/// meanwhile (a rollback's progress and a new attempt's changes never
/// overwrite each other). Returns the journal as stored.
async fn edit(
    store: &Store,
    task: &str,
    mut change: impl FnMut(Option<Journal>) -> Option<Journal>,
) -> Result<Option<Journal>, QueueError> {
    for _ in 0..EDIT_TRIES {
        let stored = store.get_control(&key(task)).await?;
        let current: Option<Journal> = stored
            .clone()
            .and_then(|value| serde_json::from_value(value).ok());
        let Some(next) = change(current.clone()) else {
            return Ok(current);
        };
        let value = serde_json::to_value(&next).expect("a journal serializes");
        if store
            .compare_and_put_control(&key(task), stored.as_ref(), &value)
            .await?
        {
            return Ok(Some(next));
        }
    }
    Err(QueueError::Storage(format!(
        "the rollback journal of task {task:?} kept changing under {EDIT_TRIES} tries; try again"
    )))
}

/// Stores the progress of the rollback of `journal` (which holds the
/// claim, so it alone changes the state of existing changes), keeping
/// changes appended meanwhile; `journal` becomes what is stored. The
/// rollback's first save (`taking`), made once its claim is renewed,
/// only marks the journal with its claim (`journal.claimed_by`) and
/// reason: it has undone nothing yet, and what it read may be older than
/// what a rollback before it saved. Later saves are made only while the
/// journal is still marked so, which no other rollback's claim could have
/// changed meanwhile.
///
/// # Errors
/// [`RollbackError::Replaced`] when the stored journal is another one
/// now; [`RollbackError::Busy`] when another rollback took it, this
/// one's claim having lapsed; [`RollbackError::Store`] when the store
/// fails.
async fn save_progress(
    store: &Store,
    journal: &mut Journal,
    taking: bool,
) -> Result<(), RollbackError> {
    let ours = journal.clone();
    let (mut written, mut replaced, mut taken) = (false, false, false);
    let stored = edit(store, &ours.task, |stored| {
        (written, replaced, taken) = (false, false, false);
        // Deleted meanwhile (the task purged): not written back, which
        // would hand the old changes to a new task given the id.
        let mut stored = stored?;
        if stored.id != ours.id {
            // Replaced: the task purged and its id given to a new task.
            replaced = true;
            return None;
        }
        if taking {
            // Its mark and reason only: it has done nothing yet, and what
            // it read may be older than what another rollback saved.
            stored.claimed_by.clone_from(&ours.claimed_by);
            stored
                .rolled_back_because
                .clone_from(&ours.rolled_back_because);
            written = true;
            return Some(stored);
        }
        if stored.claimed_by.is_some() && stored.claimed_by != ours.claimed_by {
            // This rollback stalled past its claim, and another took the
            // task: the states are that one's to write. (No mark at all:
            // rewritten by an older flotilla, which keeps none.)
            taken = true;
            return None;
        }
        stored
            .rolled_back_because
            .clone_from(&ours.rolled_back_because);
        // Changes are only ever appended, and dropped from the front once
        // rolled back: a change's number (`dropped` plus its index) names
        // it. A journal with fewer dropped than ours is another task's
        // (or was written back by an older flotilla that drops nothing).
        let Some(skip) = stored.dropped.checked_sub(ours.dropped) else {
            tracing::warn!(task = %ours.task, "the rollback journal changed under the rollback (another task's now?); its progress is not saved");
            return None;
        };
        for (entry, mine) in stored
            .changes
            .iter_mut()
            .zip(ours.changes.iter().skip(skip))
        {
            entry.state = mine.state;
            entry.runs = mine.runs;
            entry.outcome.clone_from(&mine.outcome);
            entry.at_ms = mine.at_ms;
        }
        written = true;
        Some(stored)
    })
    .await?;
    if replaced {
        return Err(RollbackError::Replaced(ours.task));
    }
    if taken {
        return Err(lapsed(ours.task));
    }
    if let Some(stored) = stored.filter(|_| written) {
        *journal = stored;
    }
    Ok(())
}

/// The journal of `task`, if its result declared changes.
///
/// # Errors
/// When the store cannot be read.
pub async fn load(store: &Store, task: &str) -> Result<Option<Journal>, QueueError> {
    Ok(store
        .get_control(&key(task))
        .await?
        .and_then(|value| serde_json::from_value(value).ok()))
}

/// Undoes the journal's changes in reverse order, skipping those already
/// rolled back, recording each outcome as it goes; stops at the first
/// failure (running it again retries from there). `spec_for` gives the
/// process each command runs as (working directory, environment) for the
/// agent that declared the change; `None` for an agent unknown here.
/// `journal` is read again from the store once this rollback holds the
/// task, and left as the rollback ends.
///
/// # Errors
/// [`RollbackError::Busy`] when another rollback of the task runs;
/// [`RollbackError::Store`] when the store fails. A failed command is
/// recorded, not an error.
pub async fn roll_back(
    store: &Store,
    journal: &mut Journal,
    because: &str,
    spec_for: &SpecFor<'_>,
    limit: Duration,
    now: impl Fn() -> UnixMillis,
) -> Result<(), RollbackError> {
    if journal.is_rolled_back() {
        // Nothing left to undo: the journal stays as the last run left it.
        return Ok(());
    }
    let lease_ms = u64::try_from((limit + CLAIM_MARGIN).as_millis()).unwrap_or(u64::MAX / 4);
    let mut claim = Claim {
        owner: format!(
            "{} pid {} run {}",
            crate::store::host_name(),
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ),
        because: because.to_string(),
        since_ms: now(),
        until_ms: now().saturating_add(lease_ms),
        holder: Holder::this(),
    };
    take_claim(store, &journal.task, &claim, now()).await?;
    let result = undo(
        store, journal, because, spec_for, limit, &now, &mut claim, lease_ms,
    )
    .await;
    // Freed at once, not left to lapse; a failure to free it only delays
    // the next rollback until the claim lapses. A rollback the store kept
    // from finishing leaves its claim lapsed instead: it reads as cut off,
    // so that the next look (a new attempt of the task, a watch taken
    // over) finishes it, rather than as ended.
    let left = if matches!(result, Err(RollbackError::Store(_))) {
        Claim {
            until_ms: now(),
            ..claim.clone()
        }
        .value()
    } else {
        Value::Null
    };
    if let Err(error) = store
        .compare_and_put_control(&claim_key(&journal.task), Some(&claim.value()), &left)
        .await
    {
        tracing::warn!(task = %journal.task, %error, "could not free the rollback claim; it lapses by itself");
    }
    result
}

/// Takes the rollback claim of `task`, unless a live one is held.
async fn take_claim(
    store: &Store,
    task: &str,
    claim: &Claim,
    now: UnixMillis,
) -> Result<(), RollbackError> {
    let key = claim_key(task);
    let current = store.get_control(&key).await?;
    let busy = |held: &Value| {
        let held: Option<Claim> = serde_json::from_value(held.clone()).ok();
        RollbackError::Busy {
            task: task.to_string(),
            held_by: held.map_or_else(
                || "another process".to_string(),
                |held| {
                    format!(
                        "{} ({}), since {}",
                        held.owner,
                        held.because,
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_millis(held.since_ms)
                        )
                    )
                },
            ),
        }
    };
    if let (Some(held), Running::Live { .. }) = (&current, judge(current.as_ref(), now)) {
        return Err(busy(held));
    }
    if store
        .compare_and_put_control(&key, current.as_ref(), &claim.value())
        .await?
    {
        return Ok(());
    }
    // Taken meanwhile.
    let held = store.get_control(&key).await?.unwrap_or(Value::Null);
    Err(busy(&held))
}

/// The rollback proper, under `claim`.
#[allow(clippy::too_many_arguments)]
async fn undo(
    store: &Store,
    journal: &mut Journal,
    because: &str,
    spec_for: &SpecFor<'_>,
    limit: Duration,
    now: &impl Fn() -> UnixMillis,
    claim: &mut Claim,
    lease_ms: u64,
) -> Result<(), RollbackError> {
    // What an earlier rollback did while this one waited for the claim.
    if let Some(stored) = load(store, &journal.task).await? {
        *journal = stored;
    }
    if journal.is_rolled_back() {
        return Ok(());
    }
    journal.rolled_back_because = Some(cut_json(because, BECAUSE_BYTES));
    journal.claimed_by = Some(claim.owner.clone());
    // Still held (it may have lapsed while this one waited for the
    // store), so that the mark goes only to the claim's holder.
    renew(store, &journal.task, claim, now, lease_ms).await?;
    save_progress(store, journal, true).await?;
    // By number: changes appended meanwhile are left to the next
    // rollback, and those dropped meanwhile (rolled back, at the front)
    // shift the indices of the rest.
    for number in (0..journal.declared()).rev() {
        let Some(index) = number.checked_sub(journal.dropped) else {
            // Dropped: rolled back, as is every change before it.
            break;
        };
        let Some(entry) = journal.changes.get(index) else {
            // Fewer changes than this rollback began with: the journal
            // was replaced (the task purged, its id given to a new task).
            return Err(RollbackError::Replaced(journal.task.clone()));
        };
        if entry.state == ChangeState::RolledBack {
            continue;
        }
        // Renewed before each command, which the claim then outlasts.
        renew(store, &journal.task, claim, now, lease_ms).await?;
        let agent = journal.changes[index]
            .agent
            .clone()
            .unwrap_or_else(|| journal.agent.clone());
        let entry = &mut journal.changes[index];
        let (ok, outcome) = match spec_for(&agent) {
            Some(mut command) => {
                command.argv.clone_from(&entry.change.rollback);
                match crate::command::run(command, limit, OUTPUT_BYTES).await {
                    Ok(ran) => (
                        ran.success(),
                        ran.describe(&entry.change.rollback[0], limit),
                    ),
                    Err(error) => (false, error),
                }
            }
            None => (
                false,
                format!(
                    "agent {agent}, which declared this change, is not in this config; run the rollback where it is"
                ),
            ),
        };
        let outcome = cut_json(&outcome, OUTCOME_BYTES);
        entry.runs += 1;
        entry.outcome = Some(outcome.clone());
        entry.at_ms = Some(now());
        entry.state = if ok {
            ChangeState::RolledBack
        } else {
            ChangeState::Failed
        };
        if ok {
            tracing::info!(task = %journal.task, change = %entry.change.description, %outcome, "change rolled back");
        } else {
            tracing::error!(task = %journal.task, change = %entry.change.description, %outcome, "rollback of a change failed; later changes stay applied");
        }
        save_progress(store, journal, false).await?;
        if !ok {
            break;
        }
    }
    Ok(())
}

/// Renews `claim` on `task` for `lease_ms` from now.
///
/// # Errors
/// The lapsed-claim error when another rollback took it (this process
/// stalled longer than the claim): that one goes on from here.
async fn renew(
    store: &Store,
    task: &str,
    claim: &mut Claim,
    now: &impl Fn() -> UnixMillis,
    lease_ms: u64,
) -> Result<(), RollbackError> {
    let renewed = Claim {
        until_ms: now().saturating_add(lease_ms),
        ..claim.clone()
    };
    if !store
        .compare_and_put_control(&claim_key(task), Some(&claim.value()), &renewed.value())
        .await?
    {
        // No claim at all: deleted with the task (purged, or its id given
        // to a new task), not taken by another rollback.
        if store.get_control(&claim_key(task)).await?.is_none() {
            return Err(RollbackError::Replaced(task.to_string()));
        }
        return Err(lapsed(task.to_string()));
    }
    *claim = renewed;
    Ok(())
}

/// The error of a rollback whose claim lapsed and was taken by another.
fn lapsed(task: String) -> RollbackError {
    RollbackError::Busy {
        task,
        held_by: "another rollback, after this one's claim lapsed".into(),
    }
}

/// Why a task could not be rolled back.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// The task's result declared no changes.
    #[error(
        "task {0:?} has no rollback journal: its result declared no changes (or the task is unknown)"
    )]
    NoJournal(String),
    /// The journal's agent is not in the config.
    #[error(
        "task {task:?} was done by agent {agent:?}, which the config does not define; its rollback commands run in that agent's directory"
    )]
    UnknownAgent {
        /// The task.
        task: String,
        /// Its agent.
        agent: String,
    },
    /// Another rollback of the task is running.
    #[error(
        "a rollback of task {task:?} is already running: {held_by}; it goes on by itself (see `flotilla rollback {task}` or `tasks show` when it ends)"
    )]
    Busy {
        /// The task.
        task: String,
        /// Who runs the other rollback, why and since when.
        held_by: String,
    },
    /// The journal was replaced while the rollback ran (the task purged,
    /// its id given to a new task): the rest of its changes were not
    /// undone.
    #[error(
        "the rollback journal of task {0:?} was deleted or replaced while the rollback ran (the task purged, or its id given to a new task); the changes not yet undone stay applied"
    )]
    Replaced(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] QueueError),
}

/// Rolls back the journal of `task` (by `flotilla rollback` or the API),
/// its commands run as its agent's per `config`; returns the journal as
/// it ends.
///
/// # Errors
/// See [`RollbackError`]; a failed command is recorded in the journal.
pub async fn roll_back_task(
    store: &Store,
    config: &crate::config::Config,
    task: &str,
    because: &str,
    now: impl Fn() -> UnixMillis,
) -> Result<Journal, RollbackError> {
    let mut journal = load(store, task)
        .await?
        .ok_or_else(|| RollbackError::NoJournal(task.to_string()))?;
    if config.agent(&journal.agent).is_none() {
        return Err(RollbackError::UnknownAgent {
            task: task.to_string(),
            agent: journal.agent.clone(),
        });
    }
    let spec_for = |agent: &str| crate::dispatch::command_spec(config, agent);
    roll_back(
        store,
        &mut journal,
        because,
        &spec_for,
        crate::dispatch::ROLLBACK_TIMEOUT,
        now,
    )
    .await?;
    Ok(journal)
}

/// One line per change for humans: its state, description and outcome.
pub fn describe(journal: &Journal) -> String {
    let dropped = match journal.dropped {
        0 => None,
        1 => Some(
            "0: rolled back, and dropped from the journal to make room for later changes"
                .to_string(),
        ),
        dropped => Some(format!(
            "0-{}: rolled back, and dropped from the journal to make room for later changes",
            dropped - 1
        )),
    };
    let entries = journal.changes.iter().enumerate().map(|(index, entry)| {
        let index = journal.dropped + index;
        let state = match entry.state {
            ChangeState::Applied => "applied",
            ChangeState::RolledBack => "rolled back",
            ChangeState::Failed => "FAILED",
        };
        let mut line = format!("{index}: {state}: {}", entry.change.description);
        if let Some(outcome) = &entry.outcome {
            line.push_str(&format!(" ({outcome})"));
        }
        line
    });
    dropped
        .into_iter()
        .chain(entries)
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Changes whose rollback appends their number to `log`, slowly.
    fn slow_changes(log: &std::path::Path, count: usize) -> Vec<Change> {
        (0..count)
            .map(|n| Change {
                description: format!("change {n}"),
                rollback: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("echo {n} >> '{}'; sleep 0.3", log.display()),
                ],
            })
            .collect()
    }

    /// Task `t`'s journal with one slow change, by agent `a`.
    async fn one_change(store: &Store, dir: &std::path::Path) -> Journal {
        record(store, "t", "a", 1, slow_changes(&dir.join("log"), 1))
            .await
            .unwrap()
    }

    /// Every agent's commands run in `dir`.
    fn spec(dir: &std::path::Path) -> impl Fn(&str) -> Option<SpawnSpec> + Send + Sync {
        let dir = dir.to_path_buf();
        move |_agent: &str| {
            Some(SpawnSpec {
                argv: Vec::new(),
                env: vec![("PATH".into(), "/usr/bin:/bin".into())],
                workdir: dir.clone(),
            })
        }
    }

    fn now() -> UnixMillis {
        crate::clock::system().now_ms()
    }

    /// An operator's rollback of `journal`, each command allowed 10 s.
    async fn by_operator(
        store: &Store,
        journal: &mut Journal,
        spec_for: &SpecFor<'_>,
    ) -> Result<(), RollbackError> {
        roll_back(
            store,
            journal,
            "operator",
            spec_for,
            Duration::from_secs(10),
            now,
        )
        .await
    }

    /// A journal is bounded in bytes as in changes (a broker keeps at most
    /// its max_payload in one value), with room for each change's rollback
    /// outcome and the rollback's reason: changes over it are refused,
    /// those that fit are kept, and changes rolled back at the front make
    /// room.
    #[tokio::test]
    async fn a_journal_holds_no_more_bytes_than_the_store_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let big = |n: usize| Change {
            description: format!("change {n}"),
            rollback: vec!["echo".into(), "x".repeat(3000)],
        };
        let limit = 32_000;
        let refused = record_within(&store, "t", "a", 1, (0..8).map(big).collect(), limit)
            .await
            .unwrap_err();
        let message = refused.to_string();
        assert!(
            matches!(refused, QueueError::Invalid(_))
                && message.contains("3 of this attempt's 8 did not fit the 32000 bytes")
                && message.contains("\"change 5\""),
            "{message}"
        );
        let mut journal = load(&store, "t").await.unwrap().unwrap();
        assert_eq!(journal.changes.len(), 5);
        let stored = serde_json::to_vec(&journal).unwrap().len();
        assert!(
            stored + 5 * OUTCOME_ROOM + JOURNAL_ROOM <= limit,
            "{stored}"
        );
        // No room left for another: nothing more is recorded.
        assert!(
            record_within(&store, "t", "a", 2, vec![big(9)], limit)
                .await
                .is_err()
        );
        assert_eq!(load(&store, "t").await.unwrap().unwrap().changes.len(), 5);
        // Once rolled back, they make room for the next attempt's.
        for entry in &mut journal.changes {
            entry.state = ChangeState::RolledBack;
        }
        store
            .put_control(&key("t"), &serde_json::to_value(&journal).unwrap())
            .await
            .unwrap();
        let recorded = record_within(&store, "t", "a", 3, (10..15).map(big).collect(), limit)
            .await
            .unwrap();
        assert_eq!(recorded.dropped, 5, "{recorded:?}");
        assert_eq!(recorded.changes.len(), 5);
        assert_eq!(recorded.changes[0].change.description, "change 10");
    }

    #[test]
    fn cut_text_fits_its_json_bytes() {
        let plain = "a".repeat(100);
        assert_eq!(cut_json(&plain, 200), plain);
        let escapes = "\u{1b}[31m".repeat(100);
        let cut = cut_json(&escapes, 200);
        assert!(serde_json::to_string(&cut).unwrap().len() <= 200, "{cut}");
        assert!(cut.ends_with('…'));
        let wide = "é".repeat(100);
        assert!(serde_json::to_string(&cut_json(&wide, 51)).unwrap().len() <= 51);
    }

    /// A task purged while its rollback runs deletes its claim: the
    /// rollback stops as replaced, not as taken over by another.
    #[tokio::test]
    async fn a_rollback_whose_claim_is_deleted_stops_as_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let log = dir.path().join("undo.log");
        let mut journal = record(&store, "t", "a", 1, slow_changes(&log, 3))
            .await
            .unwrap();
        let spec = spec(dir.path());
        let rollback = by_operator(&store, &mut journal, &spec);
        let purge = async {
            while !std::fs::read_to_string(&log).is_ok_and(|text| text.contains('2')) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            store
                .put_control(&claim_key("t"), &Value::Null)
                .await
                .unwrap();
        };
        let (stopped, ()) = tokio::join!(rollback, purge);
        let stopped = stopped.unwrap_err();
        assert!(matches!(stopped, RollbackError::Replaced(_)), "{stopped}");
    }

    #[tokio::test]
    async fn two_rollbacks_of_one_task_run_each_command_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let log = dir.path().join("undo.log");
        let mut first = record(&store, "t", "a", 1, slow_changes(&log, 3))
            .await
            .unwrap();
        let mut second = first.clone();
        let spec = spec(dir.path());
        let limit = Duration::from_secs(10);
        let (a, b) = tokio::join!(
            roll_back(&store, &mut first, "operator", &spec, limit, now),
            roll_back(&store, &mut second, "gate", &spec, limit, now),
        );
        let (done, busy) = match (a, b) {
            (Ok(()), Err(busy)) => (first, busy),
            (Err(busy), Ok(())) => (second, busy),
            other => panic!("one rollback runs, the other is told: {other:?}"),
        };
        assert!(done.is_rolled_back(), "{done:?}");
        assert!(
            matches!(&busy, RollbackError::Busy { task, held_by } if task == "t" && held_by.contains("pid")),
            "{busy}"
        );
        assert!(busy.to_string().contains("already running"), "{busy}");
        // Reverse order, once each.
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "2\n1\n0\n");
        // The claim is freed: running again finds nothing to undo.
        let mut again = load(&store, "t").await.unwrap().unwrap();
        roll_back(&store, &mut again, "again", &spec, limit, now)
            .await
            .unwrap();
        assert!(again.is_rolled_back());
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "2\n1\n0\n");
        assert_eq!(store.get_control(&claim_key("t")).await.unwrap(), None);
    }

    /// A task whose attempts ran on two agents (a fallback, an
    /// escalation) has each change undone where the agent that made it
    /// runs; an agent this config lacks is recorded as the failure.
    #[tokio::test]
    async fn each_change_is_undone_as_the_agent_that_made_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let touch = |name: &str| Change {
            description: name.into(),
            rollback: vec!["touch".into(), name.into()],
        };
        record(&store, "t", "a", 1, vec![touch("undo-1")])
            .await
            .unwrap();
        let mut journal = record(&store, "t", "b", 2, vec![touch("undo-2")])
            .await
            .unwrap();
        let dirs = [("a", a.clone()), ("b", b.clone())];
        let spec_for = move |agent: &str| {
            dirs.iter()
                .find(|(name, _)| *name == agent)
                .map(|(_, dir)| SpawnSpec {
                    argv: Vec::new(),
                    env: vec![("PATH".into(), "/usr/bin:/bin".into())],
                    workdir: dir.clone(),
                })
        };
        by_operator(&store, &mut journal, &spec_for).await.unwrap();
        assert!(journal.is_rolled_back(), "{journal:?}");
        assert!(a.join("undo-1").exists() && !b.join("undo-1").exists());
        assert!(b.join("undo-2").exists() && !a.join("undo-2").exists());
        // An agent gone from the config: its change is not undone elsewhere.
        let mut journal = record(&store, "u", "gone", 1, vec![touch("undo-3")])
            .await
            .unwrap();
        by_operator(&store, &mut journal, &spec_for).await.unwrap();
        assert!(!journal.is_rolled_back());
        let outcome = journal.changes[0].outcome.as_deref().unwrap();
        assert!(outcome.contains("agent gone"), "{outcome}");
    }

    #[tokio::test]
    async fn a_journal_deleted_during_a_rollback_is_not_written_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let mut journal = one_change(&store, dir.path()).await;
        // The task purged meanwhile, its journal with it.
        store.put_control(&key("t"), &Value::Null).await.unwrap();
        journal.changes[0].state = ChangeState::RolledBack;
        save_progress(&store, &mut journal, false).await.unwrap();
        assert_eq!(load(&store, "t").await.unwrap(), None);
        // Then its id given to a new task with changes of its own: the
        // rollback stops, and the new journal is left as it is.
        let new = record(
            &store,
            "t",
            "a",
            1,
            slow_changes(&dir.path().join("new"), 1),
        )
        .await
        .unwrap();
        let stopped = save_progress(&store, &mut journal, false)
            .await
            .unwrap_err();
        assert!(matches!(stopped, RollbackError::Replaced(_)), "{stopped}");
        assert_eq!(load(&store, "t").await.unwrap(), Some(new));
    }

    #[tokio::test]
    async fn changes_recorded_during_a_rollback_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let log = dir.path().join("undo.log");
        let mut journal = record(&store, "t", "a", 1, slow_changes(&log, 2))
            .await
            .unwrap();
        let spec = spec(dir.path());
        let rollback = by_operator(&store, &mut journal, &spec);
        let later = async {
            // While the first undo command runs, a new attempt's result.
            tokio::time::sleep(Duration::from_millis(100)).await;
            record(&store, "t", "a", 2, slow_changes(&log, 1))
                .await
                .unwrap()
        };
        let (rolled, recorded) = tokio::join!(rollback, later);
        rolled.unwrap();
        assert_eq!(recorded.changes.len(), 3);
        let stored = load(&store, "t").await.unwrap().unwrap();
        let states: Vec<_> = stored
            .changes
            .iter()
            .map(|entry| (entry.attempt, entry.state))
            .collect();
        assert_eq!(
            states,
            [
                (1, ChangeState::RolledBack),
                (1, ChangeState::RolledBack),
                (2, ChangeState::Applied)
            ],
            "{stored:?}"
        );
        assert_eq!(stored.rolled_back_because.as_deref(), Some("operator"));
        // Every change it began with is undone: not a failure.
        assert!(stored.failed().is_none(), "{stored:?}");
        assert_eq!(
            stored.summary(),
            "2 change(s) rolled back; 1 change(s) recorded while it ran stay applied (roll back again to undo them)"
        );
    }

    /// A failed command stops the rollback there, and says so.
    #[tokio::test]
    async fn a_failed_command_stops_the_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let change = |description: &str, program: &str| Change {
            description: description.into(),
            rollback: vec![program.into()],
        };
        let changes = vec![change("first", "true"), change("second", "false")];
        let mut journal = record(&store, "t", "a", 1, changes).await.unwrap();
        let spec = spec(dir.path());
        by_operator(&store, &mut journal, &spec).await.unwrap();
        let failed = journal.failed().expect("the second change failed");
        assert_eq!(failed.change.description, "second");
        assert_eq!(
            journal.changes[0].state,
            ChangeState::Applied,
            "not reached"
        );
        assert_eq!(journal.summary(), "0 change(s) rolled back");
    }

    /// A rollback that stalled past its claim while another took the
    /// task over saves nothing over the newer one's progress.
    #[tokio::test]
    async fn a_rollback_whose_claim_was_taken_saves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let (log, gate) = (dir.path().join("undo.log"), dir.path().join("gate"));
        let mut changes = slow_changes(&log, 2);
        // The last change's command (run first) waits for the gate.
        changes[1].rollback[2] = format!(
            "echo 1 >> '{}'; while [ ! -e '{}' ]; do sleep 0.01; done",
            log.display(),
            gate.display()
        );
        let mut journal = record(&store, "t", "a", 1, changes).await.unwrap();
        let spec = spec(dir.path());
        let rollback = by_operator(&store, &mut journal, &spec);
        let newer = Claim {
            owner: "elsewhere pid 1 run newer".into(),
            because: "gate".into(),
            since_ms: now(),
            until_ms: now() + 60_000,
            holder: None,
        };
        let take_over = async {
            let started = std::time::Instant::now();
            while std::fs::read_to_string(&log).unwrap_or_default() != "1\n" {
                assert!(started.elapsed() < Duration::from_secs(10), "no undo began");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // As if this rollback's claim had lapsed: another takes the
            // task, marks the journal (its first save) and records that
            // the same command failed for it.
            store
                .put_control(&claim_key("t"), &newer.value())
                .await
                .unwrap();
            let mut theirs = load(&store, "t").await.unwrap().unwrap();
            theirs.claimed_by = Some(newer.owner.clone());
            theirs.changes[1].state = ChangeState::Failed;
            theirs.changes[1].outcome = Some("theirs".into());
            store
                .put_control(&key("t"), &serde_json::to_value(&theirs).unwrap())
                .await
                .unwrap();
            std::fs::write(&gate, "").unwrap();
        };
        let (stopped, ()) = tokio::join!(rollback, take_over);
        let stopped = stopped.unwrap_err();
        assert!(
            matches!(&stopped, RollbackError::Busy { held_by, .. } if held_by.contains("lapsed")),
            "{stopped}"
        );
        let stored = load(&store, "t").await.unwrap().unwrap();
        assert_eq!(stored.changes[1].state, ChangeState::Failed, "{stored:?}");
        assert_eq!(stored.changes[1].outcome.as_deref(), Some("theirs"));
        assert_eq!(stored.changes[0].state, ChangeState::Applied);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "1\n",
            "went no further"
        );
        // The newer claim is left to its holder.
        assert_eq!(
            store.get_control(&claim_key("t")).await.unwrap(),
            Some(newer.value())
        );
    }

    /// A rollback's first save marks the journal as its own, and writes
    /// no change states: what it read may be older than what the rollback
    /// before it saved.
    #[tokio::test]
    async fn a_rollback_taking_over_keeps_what_the_last_one_saved() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let mut stale = one_change(&store, dir.path()).await;
        // Another rollback undid the change meanwhile.
        let mut theirs = stale.clone();
        theirs.claimed_by = Some("theirs".into());
        theirs.changes[0].state = ChangeState::RolledBack;
        store
            .put_control(&key("t"), &serde_json::to_value(&theirs).unwrap())
            .await
            .unwrap();
        stale.claimed_by = Some("ours".into());
        stale.rolled_back_because = Some("operator".into());
        save_progress(&store, &mut stale, true).await.unwrap();
        let stored = load(&store, "t").await.unwrap().unwrap();
        assert_eq!(stored.changes[0].state, ChangeState::RolledBack);
        assert_eq!(stored.claimed_by.as_deref(), Some("ours"));
        assert_eq!(stored.rolled_back_because.as_deref(), Some("operator"));
        assert_eq!(stale, stored, "the rollback goes on from what is stored");
    }

    #[tokio::test]
    async fn a_claim_left_by_a_dead_process_lapses() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let log = dir.path().join("undo.log");
        let mut journal = record(&store, "t", "a", 1, slow_changes(&log, 1))
            .await
            .unwrap();
        let spec = spec(dir.path());
        let limit = Duration::from_secs(10);
        let held = |until_ms| Claim {
            owner: "elsewhere pid 1 run x".into(),
            because: "operator".into(),
            since_ms: 0,
            until_ms,
            holder: None,
        };
        // A live claim of another process: refused, nothing run.
        store
            .put_control(&claim_key("t"), &held(now() + 60_000).value())
            .await
            .unwrap();
        let error = roll_back(&store, &mut journal, "gate", &spec, limit, now)
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("elsewhere pid 1 run x (operator)"),
            "{error}"
        );
        assert!(!log.exists());
        // Its process died: once the claim lapses, the task is free.
        store
            .put_control(&claim_key("t"), &held(now() - 1).value())
            .await
            .unwrap();
        roll_back(&store, &mut journal, "gate", &spec, limit, now)
            .await
            .unwrap();
        assert!(journal.is_rolled_back());
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "0\n");
    }

    #[tokio::test]
    async fn a_claim_of_a_process_seen_dead_is_cut_off_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let log = dir.path().join("undo.log");
        let mut journal = record(&store, "t", "a", 1, slow_changes(&log, 1))
            .await
            .unwrap();
        assert_eq!(running(&store, "t", now()).await.unwrap(), Running::No);
        let here = Holder::this().expect("this machine has /proc");
        let held = |pid| Claim {
            owner: format!("here pid {pid} run x"),
            because: "validation: the smoke test failed".into(),
            since_ms: now(),
            until_ms: now() + 300_000,
            holder: Some(Holder {
                pid,
                ..here.clone()
            }),
        };
        // Held by a process that runs: live for its whole claim.
        let mut alive = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        store
            .put_control(&claim_key("t"), &held(alive.id()).value())
            .await
            .unwrap();
        assert!(matches!(
            running(&store, "t", now()).await.unwrap(),
            Running::Live { .. }
        ));
        assert!(!clear_cut_off(&store, "t", now()).await.unwrap());
        alive.kill().unwrap();
        alive.wait().unwrap();
        // That pid gone here, but the claim from another machine (another
        // boot id; host names and pid namespaces repeat): still live.
        let elsewhere = Claim {
            holder: Some(Holder {
                boot: "0f0e0d0c-another-machine".into(),
                pid: alive.id(),
                ..here.clone()
            }),
            ..held(alive.id())
        };
        store
            .put_control(&claim_key("t"), &elsewhere.value())
            .await
            .unwrap();
        assert!(matches!(
            running(&store, "t", now()).await.unwrap(),
            Running::Live { .. }
        ));
        store
            .put_control(&claim_key("t"), &held(alive.id()).value())
            .await
            .unwrap();
        // The same process gone (a daemon killed mid-rollback): cut off
        // now, not five minutes later, and a rollback takes it over.
        assert_eq!(
            running(&store, "t", now()).await.unwrap(),
            Running::CutOff {
                because: "validation: the smoke test failed".into()
            }
        );
        let spec = spec(dir.path());
        roll_back(
            &store,
            &mut journal,
            "resumed",
            &spec,
            Duration::from_secs(10),
            now,
        )
        .await
        .unwrap();
        assert!(journal.is_rolled_back());
        assert_eq!(running(&store, "t", now()).await.unwrap(), Running::No);
        // A claim left after the last command (freeing it failed): cleared.
        store
            .put_control(&claim_key("t"), &held(alive.id()).value())
            .await
            .unwrap();
        assert!(clear_cut_off(&store, "t", now()).await.unwrap());
        assert_eq!(running(&store, "t", now()).await.unwrap(), Running::No);
    }

    #[tokio::test]
    async fn compare_and_put_writes_only_over_what_it_expects() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let (one, two) = (serde_json::json!({"n": 1}), serde_json::json!({"n": 2}));
        assert!(
            store
                .compare_and_put_control("k", None, &one)
                .await
                .unwrap()
        );
        assert!(
            !store
                .compare_and_put_control("k", None, &two)
                .await
                .unwrap()
        );
        assert!(
            !store
                .compare_and_put_control("k", Some(&two), &two)
                .await
                .unwrap()
        );
        assert!(
            store
                .compare_and_put_control("k", Some(&one), &two)
                .await
                .unwrap()
        );
        assert_eq!(store.get_control("k").await.unwrap(), Some(two.clone()));
        // Cleared (null) counts as nothing.
        assert!(
            store
                .compare_and_put_control("k", Some(&two), &Value::Null)
                .await
                .unwrap()
        );
        assert!(
            store
                .compare_and_put_control("k", None, &one)
                .await
                .unwrap()
        );
    }

    /// A journal with no room left for all of an attempt's changes keeps
    /// those that fit (they can still be undone) and refuses the result,
    /// naming the first it could not keep.
    #[tokio::test]
    async fn a_full_journal_keeps_what_fits_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let log = dir.path().join("undo.log");
        for attempt in 1..=9 {
            record(&store, "t", "a", attempt, slow_changes(&log, MAX_CHANGES))
                .await
                .unwrap();
        }
        let refused = record(&store, "t", "a", 10, slow_changes(&log, MAX_CHANGES + 1))
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains(
                "held 900 changes from its earlier attempts (900 not rolled back); 1 of this attempt's 101 did not fit its limit of 1000"
            ) && refused.to_string().contains("\"change 100\""),
            "{refused}"
        );
        let journal = load(&store, "t").await.unwrap().unwrap();
        assert_eq!(journal.changes.len(), 1000, "what fits is kept");
        // Nothing more fits.
        let refused = record(&store, "t", "a", 11, slow_changes(&log, 1))
            .await
            .unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("1 of this attempt's 1 did not fit"),
            "{refused}"
        );
    }

    /// A journal of changes in `states` (`true` undoes them), stored as
    /// task `t`'s.
    async fn store_journal(store: &Store, states: impl Iterator<Item = ChangeState>) {
        let entry = |n: usize, state| Entry {
            change: Change {
                description: format!("old {n}"),
                rollback: vec!["true".into()],
            },
            attempt: 1,
            agent: None,
            state,
            runs: 0,
            outcome: None,
            at_ms: None,
        };
        let journal = Journal {
            task: "t".into(),
            agent: "a".into(),
            attempt: 1,
            changes: states
                .enumerate()
                .map(|(n, state)| entry(n, state))
                .collect(),
            dropped: 0,
            rolled_back_because: None,
            id: Some("stored".into()),
            claimed_by: None,
        };
        let value = serde_json::to_value(&journal).unwrap();
        assert!(
            store
                .compare_and_put_control(&key("t"), None, &value)
                .await
                .unwrap()
        );
    }

    /// Changes rolled back at the front of a full journal make room for
    /// a later attempt's; changes keep their numbers.
    #[tokio::test]
    async fn a_full_journal_drops_changes_rolled_back_to_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let log = dir.path().join("undo.log");
        store_journal(
            &store,
            std::iter::repeat_n(ChangeState::RolledBack, 950)
                .chain(std::iter::repeat_n(ChangeState::Applied, 50)),
        )
        .await;
        let journal = record(&store, "t", "a", 2, slow_changes(&log, MAX_CHANGES))
            .await
            .unwrap();
        assert_eq!((journal.dropped, journal.changes.len()), (100, 1000));
        assert_eq!(journal.declared(), 1100);
        assert_eq!(journal.changes[0].change.description, "old 100");
        let described = describe(&journal);
        let lines: Vec<&str> = described.lines().collect();
        assert_eq!(lines.len(), 1001);
        assert_eq!(
            lines[0],
            "0-99: rolled back, and dropped from the journal to make room for later changes"
        );
        assert_eq!(lines[1], "100: rolled back: old 100");
        assert_eq!(lines[1000], "1099: applied: change 99");

        // With too few rolled back, what fits is kept and the rest refused.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        store_journal(
            &store,
            std::iter::repeat_n(ChangeState::RolledBack, 20)
                .chain(std::iter::repeat_n(ChangeState::Applied, 980)),
        )
        .await;
        let refused = record(&store, "t", "a", 2, slow_changes(&log, MAX_CHANGES))
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains(
                "held 980 changes from its earlier attempts (980 not rolled back); 80 of this attempt's 100 did not fit"
            ) && refused.to_string().contains("\"change 20\""),
            "{refused}"
        );
        let journal = load(&store, "t").await.unwrap().unwrap();
        assert_eq!((journal.dropped, journal.changes.len()), (20, 1000));

        // Only changes rolled back at the front are dropped: one still
        // applied before them keeps them all.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let states = std::iter::once(ChangeState::Applied)
            .chain(std::iter::repeat_n(ChangeState::RolledBack, 999));
        store_journal(&store, states).await;
        let refused = record(&store, "t", "a", 2, slow_changes(&log, 1))
            .await
            .unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("held 1000 changes from its earlier attempts (1 not rolled back); 1 of this attempt's 1 did not fit"),
            "{refused}"
        );
        let journal = load(&store, "t").await.unwrap().unwrap();
        assert_eq!((journal.dropped, journal.changes.len()), (0, 1000));
    }

    /// A rollback running while a new attempt's changes drop rolled-back
    /// ones from the journal's front undoes its own changes, by number,
    /// and not the new ones that took their places.
    #[tokio::test]
    async fn a_rollback_keeps_its_place_while_changes_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let log = dir.path().join("undo.log");
        store_journal(&store, std::iter::repeat_n(ChangeState::RolledBack, 998)).await;
        let mut journal = record(&store, "t", "a", 2, slow_changes(&log, 2))
            .await
            .unwrap();
        assert_eq!(journal.dropped, 0, "it fits");
        let spec = spec(dir.path());
        let rollback = by_operator(&store, &mut journal, &spec);
        let later = async {
            // While the first undo command runs (it logs, then sleeps):
            // two changes fit only by dropping two rolled back.
            let started = std::time::Instant::now();
            while std::fs::read_to_string(&log).unwrap_or_default() != "1\n" {
                assert!(started.elapsed() < Duration::from_secs(10), "no undo began");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let fresh = dir.path().join("fresh.log");
            record(&store, "t", "a", 3, slow_changes(&fresh, 2))
                .await
                .unwrap()
        };
        let (rolled, recorded) = tokio::join!(rollback, later);
        rolled.unwrap();
        assert_eq!(recorded.dropped, 2);
        assert_eq!(
            recorded.changes[996].state,
            ChangeState::Applied,
            "recorded while the rollback ran"
        );
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "1\n0\n");
        assert!(!dir.path().join("fresh.log").exists(), "not undone");
        let stored = load(&store, "t").await.unwrap().unwrap();
        let states: Vec<_> = stored.changes[994..]
            .iter()
            .map(|entry| (entry.attempt, entry.state))
            .collect();
        assert_eq!(
            states,
            [
                (1, ChangeState::RolledBack),
                (1, ChangeState::RolledBack),
                (2, ChangeState::RolledBack),
                (2, ChangeState::RolledBack),
                (3, ChangeState::Applied),
                (3, ChangeState::Applied)
            ],
            "{:?}",
            &stored.changes[994..]
        );
    }

    #[test]
    fn changes_are_checked() {
        let good = serde_json::json!([{"description": "wrote a.txt", "rollback": ["rm", "a.txt"]}]);
        assert_eq!(parse_changes(&good).unwrap().len(), 1);
        for (bad, expected) in [
            (serde_json::json!({"description": "x"}), "is not a list"),
            (
                serde_json::json!([{"description": "x", "rollback": []}]),
                "changes[0].rollback",
            ),
            (
                serde_json::json!([{"description": "x", "rollback": ["rm"], "extra": 1}]),
                "unknown field",
            ),
        ] {
            let error = parse_changes(&bad).unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
        let many: Vec<Value> = (0..=MAX_CHANGES)
            .map(|n| serde_json::json!({"description": n.to_string(), "rollback": ["true"]}))
            .collect();
        assert!(
            parse_changes(&Value::Array(many))
                .unwrap_err()
                .contains("at most")
        );
    }
}
