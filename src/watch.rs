//! The post-accept watch (`[agents.NAME.watch]`): after a task is
//! accepted, its checks are sampled every `interval` for `duration`,
//! against a baseline taken at acceptance. A breach rolls back the changes
//! the task's result declared (see [`crate::rollback`]) and tells humans.
//!
//! A watch is kept in the store (per agent, `watches.AGENT`: the task,
//! its daemon, when it ends and its baseline) while it runs, so that it
//! survives its daemon: a daemon that starts goes on with the watches of
//! its previous run (same name), and on a broker with those of daemons
//! that are gone; on the embedded store, where one daemon runs at a time,
//! with every watch it finds.

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::UnixMillis;
use crate::config::WatchCheck;
use crate::dispatch::AgentRuntime;
use crate::notify::{Event, EventKind};
use crate::queue::QueueError;
use crate::store::Store;

/// Bytes of a watch command's output kept.
const OUTPUT_BYTES: usize = 1024;

/// Starts watching `task` (of type `kind`) of `agent`, if its config
/// watches tasks of that type.
pub fn start(agent: &Arc<AgentRuntime>, task: &str, attempt: u32, kind: &str) {
    let config = &agent.config.watch;
    if config.checks.is_empty()
        || !(config.types.is_empty() || config.types.iter().any(|t| t == kind))
    {
        return;
    }
    let Some(permit) = permit(agent, task) else {
        return;
    };
    let agent = agent.clone();
    let task = task.to_string();
    tokio::spawn(async move {
        let _permit = permit;
        let client = reqwest::Client::builder().build().ok();
        let config = agent.config.watch.clone();
        let duration_ms = u64::try_from(config.duration.get().as_millis()).unwrap_or(u64::MAX);
        // Which life of the id was accepted: a task given the same id
        // later (after a prune) is created anew.
        let created_ms = match agent.store().queue().get(&task).await {
            Ok(Some(record)) if record.attempts == attempt => Some(record.created_ms),
            _ => None,
        };
        let mut watched = Watched {
            task,
            daemon: agent.owner().to_string(),
            until_ms: agent.clock_now_ms().saturating_add(duration_ms),
            baseline: config
                .checks
                .iter()
                .map(|check| (check.name.clone(), None))
                .collect(),
            attempt: Some(attempt),
            created_ms,
            breached: None,
        };
        // Stored before the baselines are sampled (up to a timeout each):
        // a daemon stopped meanwhile leaves it for the next one.
        let kept = edit_list(agent.store(), &agent.name, |list| {
            list.retain(|other| other.task != watched.task);
            if list.len() >= MAX_WATCHED {
                return false;
            }
            list.push(watched.clone());
            true
        })
        .await;
        if !matches!(kept, Ok(true)) {
            tracing::warn!(agent = %agent.name, task = %watched.task, ?kept, "the watch is not kept in the store: it ends if this daemon stops");
        }
        let stored = watched.clone();
        for (check, (_, base)) in config.checks.iter().zip(watched.baseline.iter_mut()) {
            *base = sample(&agent, &watched.task, check, client.as_ref())
                .await
                .ok()
                .filter(|sample| *sample != Sample::TimedOut);
        }
        if matches!(kept, Ok(true)) {
            let _ = edit_list(agent.store(), &agent.name, |list| {
                let Some(entry) = list.iter_mut().find(|entry| **entry == stored) else {
                    return false;
                };
                entry.baseline.clone_from(&watched.baseline);
                true
            })
            .await;
        }
        tracing::info!(agent = %agent.name, task = %watched.task, duration = %config.duration, "watching the accepted task");
        watch(&agent, &watched, client.as_ref()).await;
    });
}

/// Goes on with the watches of `agent` that no running daemon follows:
/// those of this daemon's previous run, of daemons gone from a broker,
/// and on the embedded store every one. Called as the agent starts; on a
/// broker it looks again every `broker.fleet_ttl` (at most every
/// [`ADOPT_EVERY`]), for daemons that died since (their fleet entries
/// lapse after `broker.fleet_ttl`).
pub fn resume(agent: &Arc<AgentRuntime>) {
    let agent = agent.clone();
    tokio::spawn(async move {
        let mut phase = agent.phase();
        resume_pass(&agent, true).await;
        let every = match agent.store() {
            Store::Embedded(_) => return,
            Store::Broker(queue) => queue
                .fleet_ttl()
                .clamp(std::time::Duration::from_secs(1), ADOPT_EVERY),
        };
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = phase.wait_for(|phase| phase.stopping()) => return,
            }
            resume_pass(&agent, false).await;
        }
    });
}

/// Longest time between two looks for watches of daemons gone.
const ADOPT_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// One look for orphaned watches of `agent`; `own` includes those under
/// this daemon's name (its previous run's, at start only).
async fn resume_pass(agent: &Arc<AgentRuntime>, own: bool) {
    let me = agent.owner().to_string();
    // On the embedded store one daemon runs at a time: every watch in it
    // is an orphan. On a broker, those of daemons still running are
    // theirs.
    let running: HashSet<String> = match agent.store() {
        Store::Embedded(_) => HashSet::new(),
        Store::Broker(_) => match agent.store().snapshots().await {
            Ok(snapshots) => snapshots
                .into_iter()
                .filter(|snapshot| snapshot.running && snapshot.name != me)
                .map(|snapshot| snapshot.name)
                .collect(),
            Err(error) => {
                tracing::warn!(agent = %agent.name, %error, "could not see which daemons run; their watches are left to them");
                return;
            }
        },
    };
    let now = agent.clock_now_ms();
    let list = match load_list(agent.store(), &agent.name).await {
        Ok((list, _)) => list,
        Err(error) => {
            tracing::warn!(agent = %agent.name, %error, "could not read the watches to resume");
            return;
        }
    };
    for orphan in list
        .into_iter()
        .filter(|watched| !running.contains(&watched.daemon) && (own || watched.daemon != me))
    {
        // A breached one is taken over, never dropped, however late: its
        // rollback may be unfinished (see below).
        let ended = (orphan.until_ms <= now || agent.config.watch.checks.is_empty())
            && orphan.breached.is_none();
        // A slot first, so that a watch taken over is always followed.
        let permit = if ended || orphan.breached.is_some() {
            None
        } else {
            match permit(agent, &orphan.task) {
                Some(permit) => Some(permit),
                None => continue,
            }
        };
        // Taken over by compare-and-set: two daemons never both go on
        // with one watch.
        let taken = edit_list(agent.store(), &agent.name, |list| {
            let Some(entry) = list.iter_mut().find(|entry| **entry == orphan) else {
                return false;
            };
            if ended {
                list.retain(|entry| *entry != orphan);
            } else {
                entry.daemon.clone_from(&me);
            }
            true
        })
        .await;
        if !matches!(taken, Ok(true)) {
            continue;
        }
        let watched = Watched {
            daemon: me.clone(),
            ..orphan
        };
        // A breach whose rollback its daemon did not live to finish (the
        // breach is marked in the entry before the rollback begins): the
        // check may pass now (part of the work undone) or the watch be
        // over, so it is finished here rather than left to a new breach.
        if let Some(because) = watched.breached.clone() {
            let agent = agent.clone();
            tokio::spawn(async move {
                finish_breached(&agent, &watched, &because).await;
            });
            continue;
        }
        let Some(permit) = permit else {
            continue;
        };
        tracing::info!(agent = %agent.name, task = %watched.task, "going on with the watch of an accepted task");
        let agent = agent.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let client = reqwest::Client::builder().build().ok();
            watch(&agent, &watched, client.as_ref()).await;
        });
    }
}

/// Reads of a journal tried before a breached watch is left for a later
/// start (the store unreachable meanwhile).
const JOURNAL_TRIES: u32 = 5;

/// A breached watch taken over (now this daemon's): its rollback is
/// finished if its daemon did not live to finish it, and the watch ends.
/// A journal that cannot be read leaves the watch listed, for a later
/// start to try again: the mark is never dropped on a store error.
async fn finish_breached(agent: &Arc<AgentRuntime>, watched: &Watched, because: &str) {
    for _ in 0..JOURNAL_TRIES {
        match crate::rollback::load(agent.store(), &watched.task).await {
            Ok(Some(journal)) if !journal.is_rolled_back() => {
                finish_cut_off(agent, watched, because).await;
                return;
            }
            // Rolled back (or nothing declared): only the entry was left.
            Ok(_) => {
                let _ = end_entry(agent, watched).await;
                return;
            }
            Err(error) => {
                tracing::warn!(agent = %agent.name, task = %watched.task, %error, "cannot read the journal of a breached watch; trying again");
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        }
    }
    tracing::error!(agent = %agent.name, task = %watched.task, "the journal of a breached watch could not be read; the watch stays for the next daemon start to finish its rollback");
}

/// Finishes the rollback of `watched`'s task that a breach began and its
/// daemon did not live to end, tells humans, and ends the watch.
async fn finish_cut_off(agent: &Arc<AgentRuntime>, watched: &Watched, because: &str) {
    let task = &watched.task;
    let Some(undone) = roll_back_breach(agent, task, because).await else {
        return;
    };
    tracing::error!(agent = %agent.name, %task, reason = %because, %undone, "finished a watch breach's rollback that was cut short");
    agent.notifier().send(
        Event::new(
            EventKind::WatchBreach,
            agent.clock_now_ms(),
            true,
            format!(
                "task {task} of agent {}: {because}; its rollback was cut short (its daemon stopped) and is finished now: {undone}",
                agent.name
            ),
        )
        .agent(&agent.name)
        .task(task)
        .details(serde_json::json!({"breach": because, "rollback": undone, "resumed": true})),
    );
    let _ = end_entry(agent, watched).await;
}

/// Rolls `task` back for a breach until that is done: a rollback another
/// holds is waited for (its holder may be a daemon that died on another
/// machine: its claim then lapses by itself), and one the store kept from
/// finishing is tried again. Says what was done; `None` when the daemon
/// stops first: the breach stays marked in the store, for the next daemon
/// to finish.
async fn roll_back_breach(agent: &Arc<AgentRuntime>, task: &str, because: &str) -> Option<String> {
    let mut phase = agent.phase();
    let mut tries = 0u32;
    loop {
        match crate::rollback::load(agent.store(), task).await {
            Ok(Some(mut journal)) => {
                let (undone, unfinished) = agent.try_rollback(&mut journal, because).await;
                if !unfinished {
                    return Some(undone);
                }
                if tries == 0 {
                    tracing::warn!(agent = %agent.name, %task, %undone, "the rollback of a breached watch is not finished; looking again until it is");
                } else {
                    tracing::debug!(agent = %agent.name, %task, %undone, "the rollback of a breached watch is not finished yet");
                }
            }
            Ok(None) => return Some("the task declared no changes to roll back".into()),
            Err(error) => {
                tracing::warn!(agent = %agent.name, %task, %error, "cannot read the journal of a breached watch; trying again");
            }
        }
        tries += 1;
        tokio::select! {
            () = tokio::time::sleep(crate::dispatch::ROLLBACK_RECHECK) => {}
            _ = phase.wait_for(|phase| phase.stopping()) => {
                tracing::warn!(agent = %agent.name, %task, "the daemon stops before the rollback of a breached watch is finished; the next daemon finishes it");
                return None;
            }
        }
    }
}

/// Removes `watched` from the store's list of its agent's watches.
async fn end_entry(agent: &Arc<AgentRuntime>, watched: &Watched) -> Result<bool, QueueError> {
    edit_list(agent.store(), &agent.name, |list| {
        let before = list.len();
        list.retain(|entry| !watched.same(entry));
        list.len() != before
    })
    .await
}

/// Stores in `watched`'s entry that it breached, and why, before its
/// rollback begins. If that cannot be stored, the rollback goes on all
/// the same (only a daemon dying during it would then leave it unfinished).
async fn mark_breached(agent: &Arc<AgentRuntime>, watched: &Watched, reason: &str) {
    let marked = edit_list(agent.store(), &agent.name, |list| {
        let Some(entry) = list.iter_mut().find(|entry| watched.same(entry)) else {
            return false;
        };
        entry.breached = Some(reason.to_string());
        true
    })
    .await;
    if let Err(error) = marked {
        tracing::warn!(agent = %agent.name, task = %watched.task, %error, "could not mark the watch breached before its rollback");
    }
}

/// A watch slot of `agent`, if one is free. Bounded: a burst of accepted
/// tasks must not start unbounded watches (each samples its checks every
/// interval).
fn permit(agent: &AgentRuntime, task: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let permit = agent.watch_permits().try_acquire_owned().ok();
    if permit.is_none() {
        tracing::warn!(agent = %agent.name, %task, max = MAX_WATCHES, "too many tasks watched at once; this one is not watched");
    }
    permit
}

/// Most tasks one agent watches at once in one daemon.
pub const MAX_WATCHES: usize = 64;
/// Most watches one agent's list in the store holds (every daemon's).
const MAX_WATCHED: usize = 1024;
/// Largest Prometheus answer read.
const MAX_ANSWER: usize = 1 << 20;

/// One sample of a check: a value to compare, or pass/fail.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum Sample {
    Value(f64),
    Pass,
    Fail,
    /// A pass/fail command killed at its timeout: no answer once (a slow
    /// monitoring host), a breach when it keeps happening (a wedged
    /// service). Never stored as a baseline.
    TimedOut,
}

/// Pass/fail samples timed out in a row that make a breach.
const TIMEOUTS_FOR_BREACH: u32 = 3;

/// A watch as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Watched {
    /// The accepted task.
    task: String,
    /// The daemon following it.
    daemon: String,
    /// When it ends without a breach.
    until_ms: UnixMillis,
    /// The baseline of each check, by name (`None`: not sampled yet, or
    /// it could not be: taken at the next round).
    baseline: Vec<(String, Option<Sample>)>,
    /// The attempt that was accepted: a task run again since (its id
    /// reused) is not this watch's to roll back. Absent in older entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
    /// When the accepted task was created: an id reused after a prune
    /// starts its attempts at 1 again, and only this tells the two apart.
    /// Absent in older entries, or if the task could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created_ms: Option<UnixMillis>,
    /// Why it breached, stored before its rollback begins: a daemon that
    /// dies during the rollback leaves it for the next to finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    breached: Option<String>,
}

impl Watched {
    /// Whether `entry` is this watch's stored entry: the same daemon's
    /// watch of the same acceptance. A newer acceptance of the task (its
    /// id reused) on the same daemon is another watch, whose entry this
    /// one must neither end nor mark.
    fn same(&self, entry: &Watched) -> bool {
        entry.task == self.task
            && entry.daemon == self.daemon
            && entry.attempt == self.attempt
            && entry.created_ms == self.created_ms
    }

    /// Whether `task` is still the acceptance this watch follows: the
    /// same life of the id, completed by the same attempt.
    fn accepted(&self, task: &crate::queue::TaskRecord) -> bool {
        task.state == crate::queue::TaskState::Completed
            && self.attempt.is_none_or(|attempt| task.attempts == attempt)
            && self
                .created_ms
                .is_none_or(|created| task.created_ms == created)
    }
}

fn list_key(agent: &str) -> String {
    format!("watches.{agent}")
}

/// The watches of `agent` in the store, and the stored value they came
/// from (for a compare-and-set).
async fn load_list(
    store: &Store,
    agent: &str,
) -> Result<(Vec<Watched>, Option<Value>), QueueError> {
    let stored = store.get_control(&list_key(agent)).await?;
    let list = match &stored {
        None => Vec::new(),
        // Unreadable: an error, never an empty list that a write would
        // then put over the watches of every daemon.
        Some(value) => serde_json::from_value(value.clone()).map_err(|error| {
            QueueError::Storage(format!(
                "the watches of agent {agent:?} in the store are unreadable: {error}"
            ))
        })?,
    };
    Ok((list, stored))
}

/// Changes the watches of `agent` in the store by compare-and-set, trying
/// again when another daemon wrote meanwhile; `change` says whether it
/// changed anything. Returns whether the change was stored.
async fn edit_list(
    store: &Store,
    agent: &str,
    change: impl Fn(&mut Vec<Watched>) -> bool,
) -> Result<bool, QueueError> {
    for _ in 0..16 {
        let (mut list, stored) = load_list(store, agent).await?;
        if !change(&mut list) {
            return Ok(false);
        }
        let value = if list.is_empty() {
            Value::Null
        } else {
            serde_json::to_value(&list).expect("watches serialize")
        };
        if store
            .compare_and_put_control(&list_key(agent), stored.as_ref(), &value)
            .await?
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Samples the checks of `watched` every interval until it ends or
/// breaches; a daemon that stops leaves it in the store for the next.
async fn watch(agent: &Arc<AgentRuntime>, watched: &Watched, client: Option<&reqwest::Client>) {
    let config = agent.config.watch.clone();
    let task = &watched.task;
    // Baselines that could not be sampled yet are taken at the next round.
    let mut baselines = watched.baseline.clone();
    let left = watched.until_ms.saturating_sub(agent.clock_now_ms());
    let until = tokio::time::Instant::now() + std::time::Duration::from_millis(left);
    let mut phase = agent.phase();
    let mut breached_once = false;
    // Pass/fail samples timed out in a row, by check.
    let mut timed_out: std::collections::HashMap<String, u32> = Default::default();
    'watching: while tokio::time::Instant::now() < until {
        // Every interval, and once more at the window's end, never after
        // it: a sample after it could roll back a task whose watch had
        // ended.
        let next = (tokio::time::Instant::now() + config.interval.get()).min(until);
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            _ = phase.wait_for(|phase| phase.stopping()) => return,
        }
        for check in &config.checks {
            let base = baselines
                .iter()
                .find(|(name, _)| *name == check.name)
                .and_then(|(_, base)| *base);
            let now = match sample(agent, task, check, client).await {
                Ok(now) => now,
                Err(error) => {
                    tracing::warn!(agent = %agent.name, %task, check = %check.name, %error, "watch check could not be sampled");
                    continue;
                }
            };
            let in_a_row = timed_out.entry(check.name.clone()).or_insert(0);
            let breach = if now == Sample::TimedOut {
                *in_a_row += 1;
                if *in_a_row < TIMEOUTS_FOR_BREACH {
                    tracing::warn!(agent = %agent.name, %task, check = %check.name, timeout = %check.timeout, "watch check timed out; not a breach unless it keeps timing out");
                    continue;
                }
                Some(format!(
                    "the check timed out {in_a_row} times in a row (timeout = {})",
                    check.timeout
                ))
            } else {
                *in_a_row = 0;
                None
            };
            if base.is_none()
                && let Sample::Value(_) = now
            {
                if let Some((_, slot)) = baselines.iter_mut().find(|(name, _)| *name == check.name)
                {
                    *slot = Some(now);
                } else {
                    baselines.push((check.name.clone(), Some(now)));
                }
                continue;
            }
            if let Some(breach) = breach.or_else(|| breach_of(check, base, now)) {
                if !still_mine(agent, watched).await {
                    // Taken over by another daemon, which thought this
                    // one dead (cut off from the broker for a while): the
                    // breach is that daemon's to handle.
                    tracing::info!(agent = %agent.name, %task, check = %check.name, %breach, "watch breached, but another daemon follows this watch now; leaving it to that one");
                    return;
                }
                if still_accepted(agent, watched).await {
                    let reason = format!("watch check {:?} breached: {breach}", check.name);
                    mark_breached(agent, watched, &reason).await;
                    if !breached(agent, task, check, &breach).await {
                        // Left marked in the store for the next daemon.
                        return;
                    }
                } else {
                    tracing::info!(agent = %agent.name, %task, check = %check.name, %breach, "watch breached, but the task was run again since; the watch ends without a rollback");
                }
                breached_once = true;
                break 'watching;
            }
        }
    }
    // Stopped before its time: left in the store for the next daemon
    // (but a breach is handled once).
    if phase.borrow().stopping() && !breached_once {
        return;
    }
    match edit_list(agent.store(), &agent.name, |list| {
        let before = list.len();
        list.retain(|entry| !watched.same(entry));
        list.len() != before
    })
    .await
    {
        Ok(_) => tracing::info!(agent = %agent.name, %task, "watch ended"),
        Err(error) => {
            tracing::warn!(agent = %agent.name, %task, %error, "watch ended, but stays in the store: a daemon that starts will end it");
        }
    }
}

/// Why `now` breaches `check` against `base`, if it does.
fn breach_of(check: &WatchCheck, base: Option<Sample>, now: Sample) -> Option<String> {
    match now {
        Sample::Fail => Some("the check failed".into()),
        Sample::Pass | Sample::TimedOut => None,
        Sample::Value(value) => {
            let Some(Sample::Value(base)) = base else {
                return None;
            };
            let increase = value - base;
            if let Some(max) = check.max_increase
                && increase > max
            {
                return Some(format!(
                    "{value} is {increase} over the baseline {base}, more than max_increase = {max}"
                ));
            }
            if let Some(pct) = check.max_increase_pct {
                let over = if base > 0.0 {
                    increase / base * 100.0 > pct
                } else {
                    increase > 0.0 && check.max_increase.is_none()
                };
                if over {
                    return Some(format!(
                        "{value} rose from the baseline {base}, more than max_increase_pct = {pct}%"
                    ));
                }
            }
            None
        }
    }
}

async fn sample(
    agent: &AgentRuntime,
    task: &str,
    check: &WatchCheck,
    client: Option<&reqwest::Client>,
) -> Result<Sample, String> {
    let limit = check.timeout.get();
    if let Some(argv) = &check.command {
        let mut spec = agent.check_spec();
        spec.argv.clone_from(argv);
        spec.env.push(("FLOTILLA_TASK_ID".into(), task.to_string()));
        let ran = crate::command::run(spec, limit, OUTPUT_BYTES).await?;
        if !check.has_threshold() && ran.status.is_none() {
            return Ok(Sample::TimedOut);
        }
        if !check.has_threshold() {
            return Ok(if ran.success() {
                Sample::Pass
            } else {
                Sample::Fail
            });
        }
        if !ran.success() {
            return Err(ran.describe(&argv[0], limit));
        }
        return ran
            .stdout
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|value| value.is_finite())
            .map(Sample::Value)
            .ok_or_else(|| {
                format!(
                    "{:?} printed {:?}, not a finite number",
                    argv[0],
                    ran.stdout.trim()
                )
            });
    }
    let (Some(base), Some(query)) = (&check.prometheus, &check.query) else {
        return Err("neither a command nor a query".into());
    };
    let client = client.ok_or("the HTTP client could not be built")?;
    let address = format!("{}/api/v1/query", base.trim_end_matches('/'));
    // Shown in errors, logs and events: never with credentials.
    let url = crate::config::redact_url(&address);
    let response = tokio::time::timeout(
        limit,
        client.get(&address).query(&[("query", query)]).send(),
    )
    .await
    .map_err(|_| format!("{url}: no answer within {}", check.timeout))?
    .map_err(|error| format!("{url}: {}", error.without_url()))?;
    if response
        .content_length()
        .is_some_and(|length| length > MAX_ANSWER as u64)
    {
        return Err(format!("{url}: the answer is over {MAX_ANSWER} bytes"));
    }
    // Read in chunks up to the bound: an answer without a length (chunked)
    // must not grow without limit either.
    let read = async {
        let mut response = response;
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| format!("{url}: {}", error.without_url()))?
        {
            if bytes.len() + chunk.len() > MAX_ANSWER {
                return Err(format!("{url}: the answer is over {MAX_ANSWER} bytes"));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    };
    let bytes = tokio::time::timeout(limit, read)
        .await
        .map_err(|_| format!("{url}: no answer within {}", check.timeout))??;
    let body: Value =
        serde_json::from_slice(&bytes).map_err(|error| format!("{url}: not JSON: {error}"))?;
    prometheus_value(&body).map(Sample::Value)
}

/// The value of the first sample of a Prometheus query answer (0 when the
/// answer holds none, as `rate()` of a series that never moved).
fn prometheus_value(body: &Value) -> Result<f64, String> {
    if body["status"] != "success" {
        return Err(format!(
            "Prometheus answered {}: {}",
            body["status"],
            body["error"].as_str().unwrap_or("no error text")
        ));
    }
    let data = &body["data"];
    let value = match data["resultType"].as_str() {
        Some("vector") => match data["result"].as_array().and_then(|r| r.first()) {
            Some(first) => &first["value"][1],
            None => return Ok(0.0),
        },
        Some("scalar") => &data["result"][1],
        other => return Err(format!("unexpected result type {other:?}")),
    };
    value
        .as_str()
        .and_then(|text| text.parse::<f64>().ok())
        // NaN (0/0 in a query) and infinities compare with nothing.
        .filter(|value| value.is_finite())
        .ok_or_else(|| format!("unexpected value {value}"))
}

/// Whether the watched task is still the completed attempt the watch was
/// started for (an id reused after the dedup window is a new task).
/// Whether `watched` is still this daemon's to follow: another daemon
/// that saw it gone from the fleet may have taken it over. A watch the
/// store does not list at all (its write failed when it began) is still
/// this daemon's.
async fn still_mine(agent: &Arc<AgentRuntime>, watched: &Watched) -> bool {
    match load_list(agent.store(), &agent.name).await {
        Ok((list, _)) => {
            let of_task = || list.iter().filter(|entry| entry.task == watched.task);
            of_task().any(|entry| entry.daemon == watched.daemon) || of_task().next().is_none()
        }
        // Unsure: the breach is acted on (a rollback's claim still keeps
        // two daemons from undoing it twice).
        Err(_) => true,
    }
}

async fn still_accepted(agent: &Arc<AgentRuntime>, watched: &Watched) -> bool {
    match agent.store().queue().get(&watched.task).await {
        Ok(Some(task)) => watched.accepted(&task),
        Ok(None) => false,
        // Unsure: the breach is acted on, as before.
        Err(_) => true,
    }
}

/// Rolls the breached task back and tells humans; false when the daemon
/// stopped before the rollback was finished.
async fn breached(agent: &Arc<AgentRuntime>, task: &str, check: &WatchCheck, why: &str) -> bool {
    let reason = format!("watch check {:?} breached: {why}", check.name);
    let Some(undone) = roll_back_breach(agent, task, &reason).await else {
        return false;
    };
    tracing::error!(agent = %agent.name, %task, %reason, %undone, "post-accept watch breached");
    agent.notifier().send(
        Event::new(
            EventKind::WatchBreach,
            agent.clock_now_ms(),
            true,
            format!("task {task} of agent {}: {reason}; {undone}", agent.name),
        )
        .agent(&agent.name)
        .task(task)
        .details(serde_json::json!({"check": check.name, "breach": why, "rollback": undone})),
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(max_increase: Option<f64>, max_increase_pct: Option<f64>) -> WatchCheck {
        WatchCheck {
            name: "errors".into(),
            command: Some(vec!["true".into()]),
            prometheus: None,
            query: None,
            max_increase,
            max_increase_pct,
            timeout: crate::config::HumanDuration::secs(1),
        }
    }

    #[test]
    fn breaches_compare_with_the_baseline() {
        let absolute = check(Some(0.01), None);
        assert!(breach_of(&absolute, Some(Sample::Value(0.02)), Sample::Value(0.025)).is_none());
        assert!(breach_of(&absolute, Some(Sample::Value(0.02)), Sample::Value(0.031)).is_some());
        let relative = check(None, Some(1.0));
        assert!(breach_of(&relative, Some(Sample::Value(100.0)), Sample::Value(100.9)).is_none());
        assert!(breach_of(&relative, Some(Sample::Value(100.0)), Sample::Value(101.5)).is_some());
        // From a zero baseline any rise breaches a relative threshold.
        assert!(breach_of(&relative, Some(Sample::Value(0.0)), Sample::Value(0.1)).is_some());
        // Without a baseline a value cannot be judged; a failure always is.
        assert!(breach_of(&absolute, None, Sample::Value(9.0)).is_none());
        assert!(breach_of(&check(None, None), None, Sample::Fail).is_some());
    }

    #[tokio::test]
    async fn an_unreadable_list_is_an_error_not_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        let garbage = serde_json::json!([{"task": "t", "baseline": "?"}]);
        store.put_control(&list_key("a"), &garbage).await.unwrap();
        let edited = edit_list(&store, "a", |list| {
            list.clear();
            true
        })
        .await;
        assert!(edited.unwrap_err().to_string().contains("unreadable"));
        assert_eq!(
            store.get_control(&list_key("a")).await.unwrap(),
            Some(garbage)
        );
        // A readable list round-trips, baselines included.
        let watched = Watched {
            task: "t".into(),
            daemon: "d".into(),
            until_ms: 5,
            baseline: vec![
                ("errors".into(), Some(Sample::Value(0.25))),
                ("up".into(), None),
            ],
            attempt: Some(1),
            created_ms: Some(3),
            breached: None,
        };
        store
            .put_control(&list_key("b"), &Value::Null)
            .await
            .unwrap();
        assert!(
            edit_list(&store, "b", |list| {
                list.push(watched.clone());
                true
            })
            .await
            .unwrap()
        );
        assert_eq!(load_list(&store, "b").await.unwrap().0, vec![watched]);
    }

    #[test]
    fn a_watch_follows_one_acceptance_of_its_task() {
        let completed = crate::queue::TaskRecord {
            id: "t".into(),
            agent: "a".into(),
            priority: crate::queue::Priority::Normal,
            state: crate::queue::TaskState::Completed,
            payload: Value::Null,
            attempts: 1,
            charged_attempts: 1,
            replays: 0,
            checkpoint: None,
            result: Some(Value::Null),
            reason: None,
            visible_ms: 1_000,
            lease_deadline_ms: None,
            created_ms: 1_000,
            updated_ms: 1_100,
            finished_ms: Some(1_100),
            history: Vec::new(),
        };
        let watched = Watched {
            task: "t".into(),
            daemon: "d".into(),
            until_ms: 9_000,
            baseline: Vec::new(),
            attempt: Some(1),
            created_ms: Some(1_000),
            breached: None,
        };
        assert!(watched.accepted(&completed));
        // Run again (a replay of a later failure, say): a later attempt.
        let rerun = crate::queue::TaskRecord {
            attempts: 2,
            ..completed.clone()
        };
        assert!(!watched.accepted(&rerun));
        // The id pruned and submitted again: a new task, completed by its
        // own first attempt.
        let reused = crate::queue::TaskRecord {
            created_ms: 5_000,
            ..completed.clone()
        };
        assert!(!watched.accepted(&reused));
        let running = crate::queue::TaskRecord {
            state: crate::queue::TaskState::Running,
            ..completed.clone()
        };
        assert!(!watched.accepted(&running));
        // Its stored entry is its own, even with baselines filled in or a
        // breach marked; a newer acceptance's entry on the same daemon is
        // not (its end must not end that one).
        let marked = Watched {
            breached: Some("x".into()),
            baseline: vec![("up".into(), Some(Sample::Pass))],
            ..watched.clone()
        };
        assert!(watched.same(&marked));
        let newer = Watched {
            created_ms: Some(5_000),
            until_ms: 20_000,
            ..watched.clone()
        };
        assert!(!watched.same(&newer));
        assert!(!watched.same(&Watched {
            daemon: "e".into(),
            ..watched.clone()
        }));
        // An entry of an older version knows neither: any completion.
        let older = Watched {
            attempt: None,
            created_ms: None,
            ..watched
        };
        assert!(older.accepted(&reused));
    }

    #[test]
    fn prometheus_answers_are_read() {
        let vector = serde_json::json!({"status": "success", "data": {"resultType": "vector",
            "result": [{"metric": {}, "value": [1700000000.0, "0.042"]}]}});
        assert_eq!(prometheus_value(&vector), Ok(0.042));
        let empty = serde_json::json!({"status": "success", "data": {"resultType": "vector", "result": []}});
        assert_eq!(prometheus_value(&empty), Ok(0.0));
        let nan = serde_json::json!({"status": "success", "data": {"resultType": "scalar",
            "result": [1700000000.0, "NaN"]}});
        assert!(
            prometheus_value(&nan)
                .unwrap_err()
                .contains("unexpected value")
        );
        let error = serde_json::json!({"status": "error", "error": "parse error"});
        assert!(
            prometheus_value(&error)
                .unwrap_err()
                .contains("parse error")
        );
    }
}
