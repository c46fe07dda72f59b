//! Chaos experiments (`flotilla chaos run experiment.toml`, or scheduled
//! by the daemon with `[[chaos.schedule]]`): a steady-state hypothesis
//! checked before a method (a timed list of faults) and again after it,
//! with probe tasks to prove that none is lost. The verdict: every fault
//! was injected, the hypothesis held before, and held again, three looks
//! in a row, within `settle` after the last fault was over. Runs through
//! the daemon's API.

use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::client::ApiClient;
use crate::config::HumanDuration;
use crate::queue::TaskState;
use crate::status::StatusReport;

/// Most probe tasks of one experiment.
const MAX_LOAD: u32 = 10_000;
/// Most steps of one method.
const MAX_STEPS: usize = 100;

/// An experiment file.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Its name (1 to 64 letters, digits, `-`, `_`).
    pub name: String,
    /// What must hold before and after.
    #[serde(default)]
    pub hypothesis: Hypothesis,
    /// Probe tasks submitted at the start, followed to their end.
    #[serde(default)]
    pub load: Option<Load>,
    /// The faults, in order of `at`.
    pub method: Vec<Step>,
    /// How long after the last fault is over the hypothesis may take to
    /// hold again, three looks in a row (default 60s, up to 1h).
    #[serde(default = "settle")]
    pub settle: HumanDuration,
}

fn settle() -> HumanDuration {
    HumanDuration::secs(60)
}

/// The steady state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Hypothesis {
    /// Fewer tasks than this queued.
    #[serde(default)]
    pub queue_depth_below: Option<u64>,
    /// Every running agent has a ready replica and a closed breaker (a
    /// failed agent is not ready).
    #[serde(default)]
    pub all_agents_ready: bool,
    /// p99 of the probe tasks' time from submit to completion below this.
    #[serde(default)]
    pub p99_latency_below: Option<HumanDuration>,
}

/// Probe tasks.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// The agent they go to.
    pub agent: String,
    /// How many (1 to 10000).
    pub tasks: u32,
    /// Their payload.
    #[serde(default)]
    pub payload: Value,
}

/// One fault.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// When, from the start of the method.
    #[serde(default)]
    pub at: HumanDuration,
    /// `kill`, `pause`, `partition` or `latency`.
    pub action: String,
    /// `kill`, `pause`: the agent.
    #[serde(default)]
    pub agent: Option<String>,
    /// `kill`: one, all, percent:N.
    #[serde(default)]
    pub mode: Option<String>,
    /// `kill`: KILL or TERM.
    #[serde(default)]
    pub signal: Option<String>,
    /// `pause`, `partition`, `latency`: how long.
    #[serde(default, rename = "for")]
    pub duration: Option<String>,
    /// `latency`: the delay.
    #[serde(default)]
    pub add: Option<String>,
}

/// One check of the hypothesis.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Check {
    /// What.
    pub name: String,
    /// Whether it held.
    pub ok: bool,
    /// What was seen.
    pub detail: String,
}

/// What became of the probe tasks.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct LoadReport {
    /// Submitted.
    pub submitted: u32,
    /// Completed.
    pub completed: u32,
    /// Dead-lettered.
    pub dead_lettered: u32,
    /// Still queued or running at the end.
    pub unfinished: u32,
    /// Not found any more: lost.
    pub lost: u32,
    /// Completed more than once.
    pub twice: u32,
    /// p99 from submit to completion, in milliseconds.
    pub p99_ms: Option<u64>,
}

/// An experiment's report.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Report {
    /// The experiment.
    pub name: String,
    /// `passed` or `failed`.
    pub verdict: String,
    /// When it started.
    pub started_ms: u64,
    /// How long it took, in milliseconds.
    pub took_ms: u64,
    /// The hypothesis before the method.
    pub before: Vec<Check>,
    /// The hypothesis after it (the last look within `settle`).
    pub after: Vec<Check>,
    /// The faults injected.
    pub actions: Vec<String>,
    /// The probe tasks.
    pub load: Option<LoadReport>,
}

impl Experiment {
    /// Reads and checks an experiment file.
    ///
    /// # Errors
    /// What is wrong, naming the file and the field.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = crate::config::read_capped(path, crate::config::MAX_FILE_BYTES)
            .map_err(|error| format!("{}: {error}", path.display()))?;
        // toml's whole message: the line and column, and the line itself.
        let experiment: Self = toml::from_str(&text)
            .map_err(|error| format!("{}: {}", path.display(), error.to_string().trim_end()))?;
        experiment
            .check()
            .map_err(|problem| format!("{}: {problem}", path.display()))?;
        Ok(experiment)
    }

    fn check(&self) -> Result<(), String> {
        if !crate::config::valid_token(&self.name, 64) {
            return Err(format!(
                "name {:?}: use 1 to 64 letters, digits, '-' or '_'",
                self.name
            ));
        }
        if self.method.is_empty() || self.method.len() > MAX_STEPS {
            return Err(format!(
                "method has {} steps; valid: 1 to {MAX_STEPS}",
                self.method.len()
            ));
        }
        if self.settle.get() > Duration::from_secs(3600) {
            return Err(format!("settle = {} is over 1h", self.settle));
        }
        if let Some(load) = &self.load
            && !(1..=MAX_LOAD).contains(&load.tasks)
        {
            return Err(format!(
                "load.tasks = {} is out of range; valid: 1 to {MAX_LOAD}",
                load.tasks
            ));
        }
        for (index, step) in self.method.iter().enumerate() {
            let needs = |field: &str, present: bool| {
                if present {
                    Ok(())
                } else {
                    Err(format!(
                        "method[{index}]: `{}` needs `{field}`",
                        step.action
                    ))
                }
            };
            // The daemon's own limits: a step it would refuse fails every
            // run, so it is refused here, when the file is checked.
            let duration = |field: &str, value: Option<&String>, max: Duration| match value {
                Some(text) => crate::config::HumanDuration::parse_within(text, field, max)
                    .map(|_| ())
                    .map_err(|problem| {
                        format!("method[{index}].{problem}; e.g. \"30s\" or \"2m\"")
                    }),
                None => Ok(()),
            };
            let max_for = if step.action == "pause" {
                crate::chaos::MAX_PAUSE
            } else {
                crate::fault_proxy::MAX_FAULT
            };
            duration("for", step.duration.as_ref(), max_for)?;
            duration("add", step.add.as_ref(), crate::fault_proxy::MAX_ADD)?;
            // A field the action does not use is a mistake (a `for` on a
            // kill would make the run wait that long for nothing).
            let used: &[&str] = match step.action.as_str() {
                "kill" => &["agent", "mode", "signal"],
                "pause" => &["agent", "for"],
                "partition" => &["for"],
                "latency" => &["for", "add"],
                // Named below.
                _ => &["agent", "mode", "signal", "for", "add"],
            };
            for (field, present) in [
                ("agent", step.agent.is_some()),
                ("mode", step.mode.is_some()),
                ("signal", step.signal.is_some()),
                ("for", step.duration.is_some()),
                ("add", step.add.is_some()),
            ] {
                if present && !used.contains(&field) {
                    return Err(format!(
                        "method[{index}]: `{}` takes no `{field}`; it takes {}",
                        step.action,
                        used.iter()
                            .map(|field| format!("`{field}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            if let Some(mode) = &step.mode {
                crate::chaos::how_many(mode, 1)
                    .map_err(|problem| format!("method[{index}]: {problem}"))?;
            }
            if let Some(signal) = &step.signal
                && !["KILL", "SIGKILL", "TERM", "SIGTERM"]
                    .contains(&signal.to_ascii_uppercase().as_str())
            {
                return Err(format!(
                    "method[{index}].signal {signal:?} is not valid; valid: KILL, TERM"
                ));
            }
            match step.action.as_str() {
                "kill" => needs("agent", step.agent.is_some())?,
                "pause" => {
                    needs("agent", step.agent.is_some())?;
                    needs("for", step.duration.is_some())?;
                }
                "partition" => needs("for", step.duration.is_some())?,
                "latency" => {
                    needs("for", step.duration.is_some())?;
                    needs("add", step.add.is_some())?;
                }
                other => {
                    return Err(format!(
                        "method[{index}].action {other:?} is not valid; valid: kill, pause, partition, latency"
                    ));
                }
            }
            if step.at.get() > Duration::from_secs(3600) {
                return Err(format!("method[{index}].at = {} is over 1h", step.at));
            }
        }
        let hypothesis = &self.hypothesis;
        if hypothesis.p99_latency_below.is_some() && self.load.is_none() {
            return Err(
                "hypothesis.p99_latency_below needs a [load]: the latency is that of its probe tasks"
                    .into(),
            );
        }
        if hypothesis.queue_depth_below.is_none()
            && !hypothesis.all_agents_ready
            && self.load.is_none()
        {
            return Err(
                "the experiment checks nothing, so it could not fail: give [hypothesis] queue_depth_below or all_agents_ready, or a [load] of probe tasks"
                    .into(),
            );
        }
        Ok(())
    }
}

impl Experiment {
    /// The longest a run can take: its last fault's end, then `settle`,
    /// with a margin for the looks and the daemon's answers.
    fn longest(&self) -> Duration {
        let faults = self
            .method
            .iter()
            .map(|step| step.at.get() + lasts(step))
            .max()
            .unwrap_or_default();
        faults + self.settle.get() + Duration::from_secs(300)
    }
}

/// How long `step`'s fault lasts once injected: a pause, a partition or a
/// latency lasts its `for`; a kill is over at once.
fn lasts(step: &Step) -> Duration {
    step.duration
        .as_deref()
        .and_then(|text| humantime::parse_duration(text).ok())
        .unwrap_or_default()
}

/// Looks in a row, a second apart, in which the hypothesis must hold for
/// the fleet to count as recovered: one good look may come before a
/// fault's effect shows, or between two restarts of a crash loop.
const STEADY_LOOKS: u32 = 3;

fn hypothesis(report: &StatusReport, hypothesis: &Hypothesis) -> Vec<Check> {
    let mut checks = Vec::new();
    if let Some(limit) = hypothesis.queue_depth_below {
        // A daemon cut off from its store cannot count: not a pass.
        checks.push(match &report.store_error {
            Some(error) => Check {
                name: format!("queue depth below {limit}"),
                ok: false,
                detail: format!("unknown: {error}"),
            },
            None => Check {
                name: format!("queue depth below {limit}"),
                ok: report.queue_depth < limit,
                detail: format!("{} queued", report.queue_depth),
            },
        });
    }
    if hypothesis.all_agents_ready {
        let unready: Vec<String> = report
            .agents
            .iter()
            // A failed agent (restarted too often) is the worst of not
            // ready, not one to leave out.
            .filter(|agent| {
                matches!(
                    agent.state,
                    crate::status::AgentState::Running | crate::status::AgentState::Failed
                )
            })
            .filter(|agent| {
                agent.state == crate::status::AgentState::Failed
                    || !agent
                        .replicas
                        .iter()
                        .any(crate::status::ReplicaStatus::is_ready)
                    || agent
                        .breaker
                        .state
                        .is_some_and(|state| state != crate::breaker::BreakerState::Closed)
            })
            .map(|agent| agent.name.clone())
            .collect();
        checks.push(Check {
            name: "all agents ready".into(),
            ok: unready.is_empty(),
            detail: if unready.is_empty() {
                "every running agent has a ready replica and a closed breaker".into()
            } else {
                format!("not ready: {}", unready.join(", "))
            },
        });
    }
    checks
}

fn holds(checks: &[Check]) -> bool {
    checks.iter().all(|check| check.ok)
}

async fn inject(client: &ApiClient, step: &Step) -> Result<crate::chaos::Done, String> {
    let failed = |error: crate::client::ClientError| match error {
        crate::client::ClientError::Refused(_, message)
        | crate::client::ClientError::Unreached(message)
        | crate::client::ClientError::Failed(message) => message,
    };
    let done = match step.action.as_str() {
        "kill" => client
            .chaos_kill(&crate::chaos::KillRequest {
                agent: step.agent.clone().unwrap_or_default(),
                mode: step.mode.clone().unwrap_or_else(|| "one".into()),
                signal: step.signal.clone().unwrap_or_else(|| "KILL".into()),
            })
            .await
            .map_err(failed)?,
        "pause" => client
            .chaos_pause(&crate::chaos::PauseRequest {
                agent: step.agent.clone().unwrap_or_default(),
                duration: step.duration.clone().unwrap_or_default(),
            })
            .await
            .map_err(failed)?,
        "partition" => client
            .chaos_broker(step.duration.as_deref().unwrap_or_default(), None)
            .await
            .map_err(failed)?,
        _ => client
            .chaos_broker(
                step.duration.as_deref().unwrap_or_default(),
                step.add.as_deref(),
            )
            .await
            .map_err(failed)?,
    };
    Ok(done)
}

/// Runs `experiment` against the daemon behind `client`.
///
/// # Errors
/// When the daemon cannot be asked (not a failed verdict: that is a
/// report).
pub async fn run(
    client: &ApiClient,
    experiment: &Experiment,
    now_ms: u64,
) -> Result<Report, String> {
    let started = Instant::now();
    let status = |error: crate::client::ClientError| match error {
        crate::client::ClientError::Refused(_, message)
        | crate::client::ClientError::Unreached(message)
        | crate::client::ClientError::Failed(message) => message,
    };
    let before = hypothesis(
        &client.status().await.map_err(status)?,
        &experiment.hypothesis,
    );
    // A run that ends before its recovery is judged.
    let cut_short = |before: Vec<Check>, after: Vec<Check>, actions: Vec<String>| Report {
        name: experiment.name.clone(),
        verdict: "failed".into(),
        started_ms: now_ms,
        took_ms: millis(started.elapsed()),
        before,
        after,
        actions,
        load: None,
    };
    let mut actions = Vec::new();
    let mut probes = Vec::new();
    if !holds(&before) {
        return Ok(cut_short(
            before,
            Vec::new(),
            vec!["none: the steady state did not hold before the method".into()],
        ));
    }
    // Every fault must be possible here before any load is submitted: a
    // daemon with chaos off (a production fleet) or without the agent
    // must not be given probe tasks for nothing.
    let info = client.chaos_info().await.map_err(status)?;
    let refused: Vec<String> = experiment
        .method
        .iter()
        .filter_map(|step| {
            info.refuses(&step.action, step.agent.as_deref())
                .map(|why| format!("{}: {why}", step.action))
        })
        .collect();
    if !refused.is_empty() {
        let check = Check {
            name: "every fault can be injected".into(),
            ok: false,
            detail: refused.join("; "),
        };
        return Ok(cut_short(
            before,
            vec![check],
            vec!["none: the method cannot be carried out on this daemon, so nothing was injected and no load submitted".into()],
        ));
    }
    if let Some(load) = &experiment.load {
        let prefix = format!("chaos-{}-{now_ms}", experiment.name);
        let tasks: Vec<crate::api::TaskBody> = (0..load.tasks)
            .map(|n| crate::api::TaskBody {
                id: Some(format!("{prefix}-{n:05}")),
                payload: load.payload.clone(),
                priority: crate::queue::Priority::Normal,
            })
            .collect();
        probes = tasks.iter().filter_map(|task| task.id.clone()).collect();
        client
            .submit(&crate::api::SubmitBody {
                agent: load.agent.clone(),
                id: None,
                priority: None,
                payload: None,
                tasks: Some(tasks),
            })
            .await
            .map_err(status)?;
    }
    let mut steps: Vec<&Step> = experiment.method.iter().collect();
    steps.sort_by_key(|step| step.at);
    let mut not_injected = Vec::new();
    // When the last fault is over, from when each was injected (a slow
    // injection delays the next).
    let mut faults_over = Instant::now();
    let total = steps.len();
    // What this run put in force, to end it alone if the run fails.
    let mut own = crate::chaos::StopRequest::default();
    for (index, step) in steps.into_iter().enumerate() {
        let due = step.at.get().saturating_sub(started.elapsed());
        tokio::time::sleep(due).await;
        match inject(client, step).await {
            Ok(done) => {
                faults_over = faults_over.max(Instant::now() + lasts(step));
                match done.action.as_str() {
                    "pause" => own.pids.extend(done.replicas.iter().map(|(_, pid)| *pid)),
                    "partition" | "latency" => own.broker = true,
                    _ => {}
                }
                actions.push(format!("{}: {}", done.action, done.detail));
            }
            Err(error) => {
                actions.push(format!("{} failed: {error}", step.action));
                not_injected.push(format!("{}: {error}", step.action));
                if index + 1 < total {
                    actions.push(format!(
                        "the {} later fault(s) of the method were not injected",
                        total - index - 1
                    ));
                }
                break;
            }
        }
    }
    if !not_injected.is_empty() {
        // A fault that did not happen proves nothing: failed, whatever
        // the fleet looks like. The faults this run put in force are
        // ended rather than left to run out on a fleet nobody judges
        // (others', an operator's or another experiment's, go on).
        if !own.pids.is_empty() || own.broker {
            actions.push(match client.chaos_stop(Some(&own)).await {
                Ok(done) => format!("stop: {}", done.detail),
                Err(error) => format!("stop failed: {}", status(error)),
            });
        }
        if let Some(first) = probes.first() {
            actions.push(format!(
                "the {} probe task(s) submitted (ids from {first}) were left to run",
                probes.len()
            ));
        }
        let check = Check {
            name: "every fault was injected".into(),
            ok: false,
            detail: not_injected.join("; "),
        };
        return Ok(cut_short(before, vec![check], actions));
    }
    // Recovery: once the last fault is over, the hypothesis must hold
    // again (and the probes end) within `settle`, for STEADY_LOOKS looks
    // in a row.
    tokio::time::sleep_until(faults_over.into()).await;
    let deadline = Instant::now() + experiment.settle.get();
    let mut steady = 0;
    // The last probe report read: a look whose read fails keeps it.
    let mut last_load = None;
    let (after, load) = loop {
        // A look the daemon cannot answer (its store or broker still
        // recovering) is a failed look, not the end of the experiment.
        let mut after = match client.status().await {
            Ok(report) => hypothesis(&report, &experiment.hypothesis),
            Err(error) => vec![Check {
                name: "the daemon's status".into(),
                ok: false,
                detail: format!("unknown: {}", status(error)),
            }],
        };
        let load = if probes.is_empty() {
            None
        } else {
            match follow(client, &probes).await {
                Ok(load) => {
                    last_load = Some(load.clone());
                    Some(load)
                }
                Err(error) => {
                    after.push(Check {
                        name: "the probe tasks could be read".into(),
                        ok: false,
                        detail: format!("unknown: {}", status(error)),
                    });
                    last_load.clone()
                }
            }
        };
        if let (Some(load), Some(limit)) = (&load, experiment.hypothesis.p99_latency_below) {
            after.push(Check {
                name: format!("p99 latency below {limit}"),
                ok: load.p99_ms.is_some_and(|p99| p99 < limit.as_millis()),
                detail: load.p99_ms.map_or_else(
                    || "no probe completed".into(),
                    |p99| format!("p99 {p99} ms"),
                ),
            });
        }
        if let Some(load) = &load {
            after.push(Check {
                name: "no task lost or completed twice".into(),
                ok: load.lost == 0 && load.twice == 0,
                detail: format!("{} lost, {} completed twice", load.lost, load.twice),
            });
            after.push(Check {
                name: "every probe task ended".into(),
                ok: load.unfinished == 0,
                detail: format!(
                    "{} completed, {} dead-lettered, {} unfinished",
                    load.completed, load.dead_lettered, load.unfinished
                ),
            });
        }
        steady = if holds(&after) { steady + 1 } else { 0 };
        // Past the deadline a streak under way may still complete.
        if steady >= STEADY_LOOKS || (steady == 0 && Instant::now() >= deadline) {
            break (after, load);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    Ok(Report {
        name: experiment.name.clone(),
        verdict: if steady >= STEADY_LOOKS {
            "passed"
        } else {
            "failed"
        }
        .into(),
        started_ms: now_ms,
        took_ms: millis(started.elapsed()),
        before,
        after,
        actions,
        load,
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

async fn follow(
    client: &ApiClient,
    ids: &[String],
) -> Result<LoadReport, crate::client::ClientError> {
    let mut load = LoadReport {
        submitted: u32::try_from(ids.len()).unwrap_or(u32::MAX),
        ..LoadReport::default()
    };
    let mut latencies = Vec::new();
    for id in ids {
        let Some(task) = client.get_task(id).await? else {
            load.lost += 1;
            continue;
        };
        let completions = task
            .history
            .iter()
            .filter(|attempt| attempt.outcome == Some(crate::queue::AttemptOutcome::Completed))
            .count();
        if completions > 1 {
            load.twice += 1;
        }
        match task.state {
            TaskState::Completed => {
                load.completed += 1;
                if let Some(finished) = task.finished_ms {
                    latencies.push(finished.saturating_sub(task.created_ms));
                }
            }
            TaskState::DeadLettered => load.dead_lettered += 1,
            _ => load.unfinished += 1,
        }
    }
    latencies.sort_unstable();
    load.p99_ms = (!latencies.is_empty())
        .then(|| latencies[(latencies.len() * 99).div_ceil(100).saturating_sub(1)]);
    Ok(load)
}

/// A scheduled experiment and its last report.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct LastRun {
    /// The experiment's name (its file's, when the file does not load).
    pub experiment: String,
    /// Its file, as `[[chaos.schedule]]` names it.
    pub file: String,
    /// Why the file does not load, if it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Its last report; none before its first run.
    pub report: Option<Report>,
}

/// The last report of every experiment `[[chaos.schedule]]` runs, as the
/// daemon stored them (`chaos.last.NAME`).
///
/// # Errors
/// When the store cannot be read.
pub async fn last_runs(
    config: &crate::config::Config,
    store: &crate::store::Store,
) -> Result<Vec<LastRun>, crate::queue::QueueError> {
    let mut runs = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for entry in &config.chaos.schedule {
        let path = config.base_dir.join(&entry.experiment);
        // Scheduled twice (`every` and `cron`), listed once.
        if !seen.insert(path.clone()) {
            continue;
        }
        let (experiment, mut problem) = match Experiment::load(&path) {
            Ok(experiment) => (experiment.name, None),
            Err(problem) => (
                entry
                    .experiment
                    .file_stem()
                    .map_or_else(String::new, |stem| stem.to_string_lossy().into_owned()),
                Some(problem),
            ),
        };
        let report = match store.get_control(&last_key(&experiment)).await? {
            None => None,
            Some(value) => match serde_json::from_value(value) {
                Ok(report) => Some(report),
                Err(error) => {
                    problem.get_or_insert(format!(
                        "its stored report cannot be read ({error}); the next run replaces it"
                    ));
                    None
                }
            },
        };
        runs.push(LastRun {
            experiment,
            file: entry.experiment.display().to_string(),
            problem,
            report,
        });
    }
    Ok(runs)
}

fn last_key(experiment: &str) -> String {
    format!("chaos.last.{experiment}")
}

/// A scheduled run of an experiment in progress, kept in the store so
/// that one daemon of a fleet runs it at a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunLock {
    /// The daemon running it.
    daemon: String,
    /// When the run is over at the latest (the lock of a daemon that died
    /// mid-run lapses then).
    until_ms: u64,
}

impl RunLock {
    fn key(experiment: &str) -> String {
        format!("chaos.running.{experiment}")
    }

    /// Takes the lock of `experiment`; the daemon holding it, if another
    /// does.
    async fn take(
        &self,
        store: &crate::store::Store,
        experiment: &str,
        now_ms: u64,
    ) -> Result<Option<String>, crate::queue::QueueError> {
        let key = Self::key(experiment);
        let current = store.get_control(&key).await?;
        if let Some(held) = current
            .clone()
            .and_then(|value| serde_json::from_value::<RunLock>(value).ok())
            .filter(|held| held.until_ms > now_ms && held.daemon != self.daemon)
        {
            return Ok(Some(held.daemon));
        }
        let mine = serde_json::to_value(self).expect("a lock serializes");
        if store
            .compare_and_put_control(&key, current.as_ref(), &mine)
            .await?
        {
            return Ok(None);
        }
        // Taken meanwhile.
        let holder = store
            .get_control(&key)
            .await?
            .and_then(|value| serde_json::from_value::<RunLock>(value).ok())
            .map_or_else(|| "another daemon".into(), |held| held.daemon);
        Ok(Some(holder))
    }

    /// Frees it (if it is still this one).
    async fn release(&self, store: &crate::store::Store, experiment: &str) {
        let mine = serde_json::to_value(self).expect("a lock serializes");
        if let Err(error) = store
            .compare_and_put_control(&Self::key(experiment), Some(&mine), &Value::Null)
            .await
        {
            tracing::warn!(%experiment, %error, "could not free the experiment's run lock; it lapses by itself");
        }
    }
}

/// The report for humans.
pub fn render(report: &Report) -> String {
    let mut text = format!(
        "experiment {}: {} in {:.1}s\n",
        report.name,
        report.verdict.to_uppercase(),
        report.took_ms as f64 / 1000.0
    );
    for (when, checks) in [("before", &report.before), ("after", &report.after)] {
        for check in checks {
            text.push_str(&format!(
                "  {when:<6} {} {}: {}\n",
                if check.ok { "ok  " } else { "FAIL" },
                check.name,
                check.detail
            ));
        }
    }
    for action in &report.actions {
        text.push_str(&format!("  fault  {action}\n"));
    }
    text
}

/// What a daemon's schedule of experiments runs with.
#[derive(Clone)]
pub struct Scheduler {
    /// The daemon's own API.
    pub address: std::net::SocketAddr,
    /// Its token.
    pub token: String,
    /// Its name in the fleet.
    pub daemon: String,
    /// The agents it runs.
    pub agents: Vec<String>,
    /// The fleet's store.
    pub store: crate::store::Store,
    /// Its metrics.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Its notifications.
    pub notifier: crate::notify::Notifier,
    /// Its clock.
    pub clock: crate::clock::SharedClock,
    /// Its phase: no run starts once it stops, and a run its shutdown
    /// cuts short is not reported.
    pub phase: tokio::sync::watch::Receiver<crate::dispatch::Phase>,
}

/// Runs the experiment of `entry` (file `path`) every `entry.every`
/// against this daemon's own API, until `stop` changes; keeps the last
/// report in the store (`chaos.last.NAME`), counts the verdicts and tells
/// humans about failures. Of the daemons sharing a config, one runs each
/// due run: a daemon that does not run every agent the method hurts
/// leaves it to one that does, and a run lock in the store keeps the
/// others from running it at the same time.
pub async fn schedule(
    entry: crate::config::ScheduledExperiment,
    path: std::path::PathBuf,
    scheduler: Scheduler,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Scheduler {
        address,
        token,
        daemon,
        agents,
        store,
        metrics,
        notifier,
        clock,
        mut phase,
    } = scheduler;
    loop {
        let wait = match entry.next_in(clock.now_ms()) {
            Ok(wait) => wait,
            Err(problem) => {
                tracing::error!(%problem, "scheduled chaos experiment: no next run");
                return;
            }
        };
        tokio::select! {
            _ = stop.changed() => return,
            _ = phase.wait_for(|phase| phase.stopping()) => return,
            () = tokio::time::sleep(wait) => {}
        }
        // Read at each run: an edit applies to the next one.
        let experiment = match Experiment::load(&path) {
            Ok(experiment) => experiment,
            Err(problem) => {
                tracing::error!(%problem, "scheduled chaos experiment cannot be read; skipped");
                continue;
            }
        };
        let client = match ApiClient::new(&format!("http://{address}"), Some(token.clone())) {
            Ok(client) => client,
            Err(problem) => {
                tracing::error!(%problem, "scheduled chaos experiment: no API client");
                continue;
            }
        };
        // One run per period across the fleet: daemons sharing the config
        // wake at their own times (`every` counts from each one's start),
        // so a run another made within most of the period counts.
        if let (Ok(period), Ok(Some(last))) = (
            entry.period(clock.now_ms()),
            store.get_control(&last_key(&experiment.name)).await,
        ) && let Ok(last) = serde_json::from_value::<Report>(last)
        {
            let since = clock.now_ms().saturating_sub(last.started_ms);
            if u128::from(since) < period.as_millis() * 9 / 10 {
                tracing::info!(experiment = %experiment.name, since_ms = since, "scheduled chaos experiment ran within this period (on another daemon of the fleet); skipped here");
                continue;
            }
        }
        if let Some(agent) = experiment
            .method
            .iter()
            .find_map(|step| step.agent.as_ref().filter(|agent| !agents.contains(agent)))
        {
            tracing::info!(experiment = %experiment.name, %agent, "scheduled chaos experiment hurts an agent this daemon does not run; left to a daemon that runs every agent it hurts (if no daemon runs them all, it never runs: split its method)");
            continue;
        }
        let lock = RunLock {
            daemon: daemon.clone(),
            until_ms: clock.now_ms().saturating_add(millis(experiment.longest())),
        };
        match lock.take(&store, &experiment.name, clock.now_ms()).await {
            Ok(None) => {}
            Ok(Some(holder)) => {
                tracing::info!(experiment = %experiment.name, %holder, "scheduled chaos experiment already running on another daemon of the fleet; skipped here");
                continue;
            }
            Err(error) => {
                tracing::warn!(experiment = %experiment.name, %error, "scheduled chaos experiment skipped: its run lock cannot be taken");
                continue;
            }
        }
        tracing::warn!(experiment = %experiment.name, "scheduled chaos experiment starting");
        let (started_ms, started) = (clock.now_ms(), Instant::now());
        let report = tokio::select! {
            _ = stop.changed() => {
                lock.release(&store, &experiment.name).await;
                return;
            }
            report = run(&client, &experiment, started_ms) => report,
        };
        lock.release(&store, &experiment.name).await;
        if phase.borrow().stopping() {
            // Its faults were refused or cut short by the drain: no
            // verdict on the fleet.
            tracing::info!(experiment = %experiment.name, "scheduled chaos experiment ended by the daemon's shutdown; not reported");
            return;
        }
        // One that could not run is failed like any other: stored, counted
        // and told, never left silent behind an older report.
        let report = report.unwrap_or_else(|problem| Report {
            name: experiment.name.clone(),
            verdict: "failed".into(),
            started_ms,
            took_ms: millis(started.elapsed()),
            before: Vec::new(),
            after: vec![Check {
                name: "the experiment could run".into(),
                ok: false,
                detail: problem,
            }],
            actions: Vec::new(),
            load: None,
        });
        // Stored first: whoever sees the count or the event can read it.
        if let Err(error) = store
            .put_control(
                &last_key(&report.name),
                &serde_json::to_value(&report).expect("report serializes"),
            )
            .await
        {
            tracing::warn!(%error, "could not store the experiment's report");
        }
        metrics.chaos_experiment(&report.name, &report.verdict);
        let failed = report.verdict != "passed";
        if failed {
            tracing::error!(experiment = %report.name, "scheduled chaos experiment FAILED:\n{}", render(&report));
        } else {
            tracing::info!(experiment = %report.name, "scheduled chaos experiment passed");
        }
        notifier.send(
            crate::notify::Event::new(
                crate::notify::EventKind::Chaos,
                clock.now_ms(),
                failed,
                format!("chaos experiment {}: {}", report.name, report.verdict),
            )
            .details(serde_json::to_value(&report).expect("report serializes")),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Experiment, String> {
        let experiment: Experiment = toml::from_str(text).map_err(|error| error.to_string())?;
        experiment.check().map(|()| experiment)
    }

    /// One daemon of a fleet runs a scheduled experiment at a time; the
    /// lock of one that died lapses.
    #[tokio::test]
    async fn a_run_lock_lets_one_daemon_run_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::embedded_in(dir.path());
        let lock = |daemon: &str, until_ms| RunLock {
            daemon: daemon.into(),
            until_ms,
        };
        let a = lock("a", 1_000);
        assert_eq!(a.take(&store, "x", 0).await.unwrap(), None);
        assert_eq!(
            lock("b", 1_000).take(&store, "x", 10).await.unwrap(),
            Some("a".into())
        );
        // Another experiment is another lock.
        assert_eq!(lock("b", 1_000).take(&store, "y", 10).await.unwrap(), None);
        a.release(&store, "x").await;
        let b = lock("b", 2_000);
        assert_eq!(b.take(&store, "x", 20).await.unwrap(), None);
        // b died mid-run: its lock lapses at its end.
        assert_eq!(
            lock("c", 3_000).take(&store, "x", 1_999).await.unwrap(),
            Some("b".into())
        );
        assert_eq!(
            lock("c", 3_000).take(&store, "x", 2_000).await.unwrap(),
            None
        );
    }

    /// A daemon cut off from its store reports no queue: the depth check
    /// fails as unknown rather than pass on a zero.
    #[test]
    fn an_unknown_queue_depth_fails_the_hypothesis() {
        let experiment = parse(
            "name = \"x\"\n[hypothesis]\nqueue_depth_below = 10\n[[method]]\naction = \"kill\"\nagent = \"a\"\n",
        )
        .unwrap();
        let mut report = StatusReport {
            daemon: crate::status::DaemonState::default(),
            daemons: Vec::new(),
            store: "test".into(),
            queue_depth: 0,
            tasks: crate::queue::StateCounts::default(),
            degradation: crate::degrade::DegradationStatus::default(),
            agents: Vec::new(),
            store_error: None,
            counted_by: None,
        };
        assert!(hypothesis(&report, &experiment.hypothesis)[0].ok);
        report.store_error = Some("store error: timed out".into());
        let checks = hypothesis(&report, &experiment.hypothesis);
        assert!(!checks[0].ok);
        assert_eq!(checks[0].detail, "unknown: store error: timed out");
    }

    #[test]
    fn an_experiment_that_could_not_fail_is_refused() {
        let method = "\n[[method]]\naction = \"kill\"\nagent = \"a\"\n";
        let nothing = parse(&format!("name = \"x\"\n{method}")).unwrap_err();
        assert!(nothing.contains("checks nothing"), "{nothing}");
        let latency_alone = parse(&format!(
            "name = \"x\"\n[hypothesis]\np99_latency_below = \"1s\"\n{method}"
        ))
        .unwrap_err();
        assert!(latency_alone.contains("needs a [load]"), "{latency_alone}");
        assert!(
            parse(&format!(
                "name = \"x\"\n[hypothesis]\nall_agents_ready = true\n{method}"
            ))
            .is_ok()
        );
    }

    #[test]
    fn faults_are_checked_before_the_run() {
        let with = |step: &str| {
            parse(&format!(
                "name = \"x\"\n[hypothesis]\nall_agents_ready = true\n[[method]]\n{step}\n"
            ))
        };
        let mode = with("action = \"kill\"\nagent = \"a\"\nmode = \"al\"").unwrap_err();
        assert!(
            mode.contains("method[0]") && mode.contains("percent:N"),
            "{mode}"
        );
        let signal = with("action = \"kill\"\nagent = \"a\"\nsignal = \"HUP\"").unwrap_err();
        assert!(signal.contains("KILL, TERM"), "{signal}");
        let duration = with("action = \"pause\"\nagent = \"a\"\nfor = \"5 parsecs\"").unwrap_err();
        assert!(duration.contains("method[0].for"), "{duration}");
        let paused = with("at = \"10s\"\naction = \"pause\"\nagent = \"a\"\nfor = \"1m\"").unwrap();
        assert_eq!(lasts(&paused.method[0]), Duration::from_secs(60));
        // The daemon's limits, and fields an action does not take.
        for (step, expected) in [
            (
                "action = \"pause\"\nagent = \"a\"\nfor = \"2h\"",
                "method[0].for 2h is out of range; valid: more than 0s, up to 1h",
            ),
            (
                "action = \"pause\"\nagent = \"a\"\nfor = \"0s\"",
                "method[0].for 0s is out of range",
            ),
            (
                "action = \"latency\"\nfor = \"1m\"\nadd = \"5m\"",
                "method[0].add 5m is out of range; valid: more than 0s, up to 1m",
            ),
            (
                "action = \"kill\"\nagent = \"a\"\nfor = \"10m\"",
                "method[0]: `kill` takes no `for`; it takes `agent`, `mode`, `signal`",
            ),
            (
                "action = \"partition\"\nagent = \"a\"\nfor = \"10s\"",
                "method[0]: `partition` takes no `agent`",
            ),
        ] {
            let problem = with(step).unwrap_err();
            assert!(problem.contains(expected), "{step}: {problem}");
        }
    }
}
