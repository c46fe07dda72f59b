//! Chaos actions on a running daemon, through its API (`flotilla chaos`):
//! kill replicas of an agent (one, all, or a percentage; SIGKILL or
//! SIGTERM to their process groups) and pause them (SIGSTOP, then SIGCONT
//! after a while); `stop` ends every pause (and broker fault) at once.
//! They are off unless `[chaos] enabled = true`, need the
//! API token like every mutating call, and each is logged, counted
//! (`flotilla_chaos_actions_total`) and sent as a `chaos` event.

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use rand::seq::SliceRandom as _;
use serde::{Deserialize, Serialize};

use crate::dispatch::AgentRuntime;
use crate::supervisor::process;

/// Longest pause.
pub const MAX_PAUSE: Duration = Duration::from_secs(3600);

/// `POST /api/v1/chaos/kill`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillRequest {
    /// The agent.
    pub agent: String,
    /// `one`, `all` or `percent:N` (1 to 100) of its running replicas.
    #[serde(default = "one")]
    pub mode: String,
    /// `KILL` (default) or `TERM`.
    #[serde(default = "kill")]
    pub signal: String,
}

fn one() -> String {
    "one".into()
}

fn kill() -> String {
    "KILL".into()
}

/// `POST /api/v1/chaos/pause`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseRequest {
    /// The agent: every running replica is paused.
    pub agent: String,
    /// How long, e.g. `30s` (up to 1h).
    #[serde(rename = "for")]
    pub duration: String,
}

/// `GET /api/v1/chaos`: which faults this daemon can inject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// Whether `[chaos] enabled` is set: no fault is injected without it.
    pub enabled: bool,
    /// Whether its broker connection runs through the fault proxy
    /// (`[chaos] proxy`): `partition` and `latency` need it.
    pub proxy: bool,
    /// The agents running on this daemon: `kill` and `pause` name one.
    pub agents: Vec<String>,
}

impl Info {
    /// Why `action` (on `agent`) cannot be injected here, if it cannot.
    pub fn refuses(&self, action: &str, agent: Option<&str>) -> Option<String> {
        if !self.enabled {
            return Some("chaos actions are off on this daemon ([chaos] enabled = false)".into());
        }
        match action {
            "kill" | "pause" => {
                let agent = agent.unwrap_or_default();
                (!self.agents.iter().any(|name| name == agent)).then(|| {
                    format!(
                        "agent {agent:?} does not run on this daemon; its agents: {}",
                        self.agents.join(", ")
                    )
                })
            }
            _ => (!self.proxy).then(|| {
                "this daemon reaches its broker directly: set [chaos] proxy = true (with a [broker]) to cut or slow the connection".into()
            }),
        }
    }
}

/// What a chaos action did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Done {
    /// `kill` or `pause`.
    pub action: String,
    /// The agent.
    pub agent: String,
    /// The replicas hit, e.g. `coder/1`, with their process ids.
    pub replicas: Vec<(String, u32)>,
    /// One line for humans.
    pub detail: String,
}

/// How many of `running` replicas `mode` selects.
///
/// # Errors
/// When `mode` is not `one`, `all` or `percent:N`.
pub fn how_many(mode: &str, running: usize) -> Result<usize, String> {
    let count = match mode {
        "one" => 1,
        "all" => running,
        other => {
            let percent = other
                .strip_prefix("percent:")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| (1..=100).contains(n))
                .ok_or_else(|| {
                    format!(
                        "mode {other:?} is not valid; valid: one, all, percent:N (N from 1 to 100)"
                    )
                })?;
            (running * percent as usize).div_ceil(100)
        }
    };
    Ok(count.min(running))
}

/// `coder/1 (pid 4242), coder/2 (pid 4250)`.
fn describe(targets: &[(String, u32)]) -> String {
    targets
        .iter()
        .map(|(name, pid)| format!("{name} (pid {pid})"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn running(agent: &AgentRuntime) -> Vec<(String, u32)> {
    agent
        .status()
        .replicas
        .iter()
        .filter_map(|replica| {
            replica
                .pid
                .map(|pid| (format!("{}/{}", agent.name, replica.index), pid))
        })
        .collect()
}

/// Kills replicas of `agent` per `request`.
///
/// # Errors
/// What is wrong with the request.
pub fn kill_replicas(agent: &AgentRuntime, request: &KillRequest) -> Result<Done, String> {
    let signal = match request.signal.to_ascii_uppercase().as_str() {
        "KILL" | "SIGKILL" => Signal::SIGKILL,
        "TERM" | "SIGTERM" => Signal::SIGTERM,
        other => return Err(format!("signal {other:?} is not valid; valid: KILL, TERM")),
    };
    let mut targets = running(agent);
    let count = how_many(&request.mode, targets.len())?;
    if targets.is_empty() {
        return Err(format!("agent {} has no running replica", agent.name));
    }
    targets.shuffle(&mut <rand::rngs::SmallRng as rand::SeedableRng>::from_os_rng());
    targets.truncate(count);
    targets.sort();
    for (_, pid) in &targets {
        process::signal_group(*pid, signal);
    }
    let detail = format!(
        "sent SIG{} to {}",
        signal.as_str().trim_start_matches("SIG"),
        describe(&targets)
    );
    Ok(Done {
        action: "kill".into(),
        agent: agent.name.clone(),
        replicas: targets,
        detail,
    })
}

/// When each paused process group is due to resume: a later, longer pause
/// of the same replica must not be ended by an earlier one's SIGCONT.
static RESUME_AT: std::sync::Mutex<std::collections::BTreeMap<u32, tokio::time::Instant>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Pauses every running replica of `agent` for the request's duration
/// (SIGSTOP now, SIGCONT later).
///
/// # Errors
/// What is wrong with the request.
pub fn pause_replicas(agent: &Arc<AgentRuntime>, request: &PauseRequest) -> Result<Done, String> {
    let duration = crate::config::HumanDuration::parse_within(&request.duration, "for", MAX_PAUSE)?;
    let targets = running(agent);
    if targets.is_empty() {
        return Err(format!("agent {} has no running replica", agent.name));
    }
    let wait = duration.get();
    let until = tokio::time::Instant::now() + wait;
    {
        let mut resume_at = RESUME_AT.lock().expect("not poisoned");
        for (_, pid) in &targets {
            let at = resume_at.entry(*pid).or_insert(until);
            *at = (*at).max(until);
            process::signal_group(*pid, Signal::SIGSTOP);
        }
    }
    let paused = targets.clone();
    let owner = agent.clone();
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        // Only the replicas still running as they were: one that was
        // killed meanwhile (its progress timer fired) is gone, and its
        // process group id may belong to another process by now. One
        // paused again meanwhile, for longer, stays paused until then.
        let current = running(&owner);
        let now = tokio::time::Instant::now();
        let resumed: Vec<_> = {
            let mut resume_at = RESUME_AT.lock().expect("not poisoned");
            paused
                .iter()
                .filter(|(_, pid)| match resume_at.get(pid) {
                    Some(at) if *at > now => false,
                    _ => {
                        resume_at.remove(pid);
                        true
                    }
                })
                .filter(|target| current.contains(target))
                .collect()
        };
        for (_, pid) in &resumed {
            process::signal_group(*pid, Signal::SIGCONT);
        }
        tracing::warn!(
            resumed = resumed.len(),
            gone = paused.len() - resumed.len(),
            "chaos: paused replicas resumed"
        );
    });
    let detail = format!("paused {} for {duration}", describe(&targets));
    Ok(Done {
        action: "pause".into(),
        agent: agent.name.clone(),
        replicas: targets,
        detail,
    })
}

/// `POST /api/v1/chaos/stop` with a body: which faults to end (without
/// one, every fault).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// The paused process groups to resume.
    #[serde(default)]
    pub pids: Vec<u32>,
    /// Whether to end the broker fault in force.
    #[serde(default)]
    pub broker: bool,
}

/// Ends pauses now (`flotilla chaos stop`): SIGCONT to each paused replica
/// of `agents` still running as it was; only those of `only` when given.
/// Returns them.
pub fn resume(agents: &[Arc<AgentRuntime>], only: Option<&[u32]>) -> Vec<(String, u32)> {
    let current: Vec<(String, u32)> = agents.iter().flat_map(|agent| running(agent)).collect();
    // Under the lock, so that a pause made meanwhile is not undone.
    let mut resume_at = RESUME_AT.lock().expect("not poisoned");
    let paused: Vec<u32> = resume_at
        .keys()
        .copied()
        .filter(|pid| only.is_none_or(|only| only.contains(pid)))
        .collect();
    for pid in &paused {
        resume_at.remove(pid);
    }
    // A paused group no longer running as a replica (killed meanwhile)
    // is not signalled: its id may belong to another process by now.
    let resumed: Vec<(String, u32)> = current
        .into_iter()
        .filter(|(_, pid)| paused.contains(pid))
        .collect();
    for (_, pid) in &resumed {
        process::signal_group(*pid, Signal::SIGCONT);
    }
    resumed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_select_replicas() {
        assert_eq!(how_many("one", 4), Ok(1));
        assert_eq!(how_many("all", 4), Ok(4));
        assert_eq!(how_many("percent:50", 4), Ok(2));
        assert_eq!(how_many("percent:10", 4), Ok(1), "rounds up");
        assert_eq!(how_many("one", 0), Ok(0));
        for bad in ["some", "percent:0", "percent:101", "percent:x"] {
            assert!(
                how_many(bad, 4).unwrap_err().contains("valid: one, all"),
                "{bad}"
            );
        }
    }
}
