//! The rollback journal: the changes an agent's result declares it applied
//! (`"changes": [{"description": ..., "rollback": [argv]}]` in its
//! `result`), kept per task in the store, and undone in reverse order by
//! `flotilla rollback TASK_ID`, by a validation gate's `auto_rollback` or
//! by a post-accept watch breach. Undoing is idempotent: a change already
//! rolled back is skipped, and each outcome is recorded as it happens, so
//! a rollback cut short resumes where it stopped.

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
/// Most arguments of one rollback command.
const MAX_ARGS: usize = 64;
/// Longest argument of a rollback command, and longest description.
const MAX_TEXT: usize = 4096;
/// Bytes of a rollback command's output kept in the journal.
const OUTPUT_BYTES: usize = 1024;

/// Where the store keeps the journal of `task`.
fn key(task: &str) -> String {
    format!("journal.{task}")
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
    /// Why the last rollback ran (`flotilla rollback`, a gate, a watch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_because: Option<String>,
}

impl Journal {
    /// Whether every change is rolled back.
    pub fn is_rolled_back(&self) -> bool {
        self.changes
            .iter()
            .all(|entry| entry.state == ChangeState::RolledBack)
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
/// When the store refuses the write.
pub async fn record(
    store: &Store,
    task: &str,
    agent: &str,
    attempt: u32,
    changes: Vec<Change>,
) -> Result<Journal, QueueError> {
    // Appended to what earlier attempts declared: a change a rejected
    // attempt applied is still there to undo.
    let mut journal = load(store, task).await?.unwrap_or_else(|| Journal {
        task: task.to_string(),
        agent: agent.to_string(),
        attempt,
        changes: Vec::new(),
        rolled_back_because: None,
    });
    if journal.changes.iter().any(|entry| entry.attempt == attempt) {
        // Recorded already (the same result handled twice).
        return Ok(journal);
    }
    journal.agent = agent.to_string();
    journal.attempt = attempt;
    let room = (MAX_CHANGES * 10).saturating_sub(journal.changes.len());
    journal
        .changes
        .extend(changes.into_iter().take(room).map(|change| Entry {
            change,
            attempt,
            state: ChangeState::Applied,
            runs: 0,
            outcome: None,
            at_ms: None,
        }));
    save(store, &journal).await?;
    Ok(journal)
}

async fn save(store: &Store, journal: &Journal) -> Result<(), QueueError> {
    store
        .put_control(
            &key(&journal.task),
            &serde_json::to_value(journal).expect("a journal serializes"),
        )
        .await
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
/// failure (running it again retries from there). `spec` gives the
/// process each command runs as (working directory, environment).
///
/// # Errors
/// When the store fails; a failed command is recorded, not an error.
pub async fn roll_back(
    store: &Store,
    journal: &mut Journal,
    because: &str,
    spec: &SpawnSpec,
    limit: Duration,
    now: impl Fn() -> UnixMillis,
) -> Result<(), QueueError> {
    if journal.is_rolled_back() {
        // Nothing left to undo: the journal stays as the last run left it.
        return Ok(());
    }
    journal.rolled_back_because = Some(because.to_string());
    save(store, journal).await?;
    for index in (0..journal.changes.len()).rev() {
        if journal.changes[index].state == ChangeState::RolledBack {
            continue;
        }
        let entry = &mut journal.changes[index];
        let mut command = spec.clone();
        command.argv.clone_from(&entry.change.rollback);
        let (ok, outcome) = match crate::command::run(command, limit, OUTPUT_BYTES).await {
            Ok(ran) => (
                ran.success(),
                ran.describe(&entry.change.rollback[0], limit),
            ),
            Err(error) => (false, error),
        };
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
        save(store, journal).await?;
        if !ok {
            break;
        }
    }
    Ok(())
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
    let spec = crate::dispatch::command_spec(config, &journal.agent).ok_or_else(|| {
        RollbackError::UnknownAgent {
            task: task.to_string(),
            agent: journal.agent.clone(),
        }
    })?;
    roll_back(
        store,
        &mut journal,
        because,
        &spec,
        crate::dispatch::ROLLBACK_TIMEOUT,
        now,
    )
    .await?;
    Ok(journal)
}

/// One line per change for humans: its state, description and outcome.
pub fn describe(journal: &Journal) -> String {
    journal
        .changes
        .iter()
        .enumerate()
        .map(|(index, entry)| {
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
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

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
