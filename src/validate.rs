//! Validation gates (`[agents.NAME.validation]`): the checks a result must
//! pass before its task is acknowledged. Each is a command run in the
//! agent's working directory with the result at hand:
//!
//! - `FLOTILLA_RESULT_FILE`: a file holding the result (JSON); a fix may
//!   rewrite it, and the task completes with what it holds at the end;
//! - `FLOTILLA_RESULT`: the same JSON, when under 64 KiB;
//! - `FLOTILLA_TASK_ID`, `FLOTILLA_TASK_ATTEMPT`, `FLOTILLA_TASK_TYPE`,
//!   `FLOTILLA_VALIDATION_ROUND` (0, then 1 after the first fix...).
//!
//! The first required check that fails decides, per its `on_failure`.

use std::path::PathBuf;

use serde_json::Value;

use crate::config::{GateConfig, OnFailure};
use crate::dispatch::AgentRuntime;
use crate::queue::Lease;

/// Bytes of a check's output kept in its report.
const REPORT_BYTES: usize = 2048;
/// Largest result also passed in `FLOTILLA_RESULT`.
const RESULT_ENV_BYTES: usize = 64 * 1024;

/// What the gates decided about a result.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Every required check passed: acknowledge with `output` (a fix may
    /// have changed it); `notes` report optional checks that failed.
    Accept {
        /// The result to store.
        output: Value,
        /// Failed optional checks.
        notes: Vec<String>,
    },
    /// Retry the task; `report` is the next attempt's feedback.
    Retry {
        /// What failed.
        report: String,
    },
    /// Hand the task to `to`, or to a human.
    Escalate {
        /// The agent, or `None` for a human.
        to: Option<String>,
        /// What failed.
        report: String,
    },
    /// Undo the result's changes, then retry.
    Rollback {
        /// What failed.
        report: String,
    },
    /// A check could not be run (its program cannot be started, the
    /// result file cannot be written): nothing is known of the result.
    /// The attempt fails as an error, neither the agent's nor the
    /// result's fault, and no check's `on_failure` is applied: a missing
    /// program must not roll back good work or page a human.
    CouldNotRun {
        /// What could not be run, and why.
        report: String,
    },
}

/// How a check's run failed.
enum Failed {
    /// It ran and failed: the line that says how.
    Check(String),
    /// It could not be started.
    Start(String),
}

/// The gates of `agent` that apply to tasks of `kind`.
pub fn gates<'a>(agent: &'a AgentRuntime, kind: &str) -> Vec<&'a GateConfig> {
    agent
        .config
        .validation
        .checks
        .iter()
        .filter(|gate| gate.applies_to(kind))
        .collect()
}

/// Runs the gates of `agent` for tasks of `kind` on `output`, the result
/// of `lease`.
pub async fn validate(agent: &AgentRuntime, lease: &Lease, output: Value, kind: &str) -> Decision {
    let gates = gates(agent, kind);
    if gates.is_empty() {
        return Decision::Accept {
            output,
            notes: Vec::new(),
        };
    }
    let file = ResultFile::new();
    if let Err(error) = file.write(&output.to_string()) {
        return Decision::CouldNotRun {
            report: format!(
                "the result could not be written to {} for the checks: {error}",
                file.0.display()
            ),
        };
    }
    let max_rounds = agent.config.validation.max_fix_rounds;
    let mut round = 0u32;
    'rounds: loop {
        let current = std::fs::read_to_string(&file.0)
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok());
        let Some(current) = current else {
            return Decision::Retry {
                report: "a fix left the result file without valid JSON".into(),
            };
        };
        let mut notes = Vec::new();
        for gate in &gates {
            let line = match run(
                agent,
                lease,
                &gate.command,
                gate,
                &file,
                &current,
                kind,
                round,
            )
            .await
            {
                Ok(()) => continue,
                Err(Failed::Check(line)) => line,
                // An optional check is only reported, run or not.
                Err(Failed::Start(error)) if !gate.required => {
                    tracing::warn!(agent = %agent.name, task = %lease.key, check = %gate.name, %error, "optional validation check could not be run");
                    notes.push(format!("check {:?} could not be run: {error}", gate.name));
                    continue;
                }
                Err(Failed::Start(error)) => {
                    return Decision::CouldNotRun {
                        report: format!("check {:?} could not be run: {error}", gate.name),
                    };
                }
            };
            let report = format!("check {:?} failed: {line}", gate.name);
            tracing::info!(agent = %agent.name, task = %lease.key, check = %gate.name, required = gate.required, %line, "validation check failed");
            if !gate.required {
                notes.push(report);
                continue;
            }
            match gate.on_failure {
                OnFailure::RejectAndRetry => return Decision::Retry { report },
                OnFailure::Escalate => {
                    return Decision::Escalate {
                        to: gate.escalate_to.clone(),
                        report,
                    };
                }
                OnFailure::AutoRollback => return Decision::Rollback { report },
                OnFailure::AutoFixAndRevalidate => {
                    if round >= max_rounds {
                        return Decision::Retry {
                            report: format!(
                                "{report} (still failing after validation.max_fix_rounds = {max_rounds} fix round(s))"
                            ),
                        };
                    }
                    round += 1;
                    let fix = gate.fix.as_ref().expect("validated: auto-fix has a fix");
                    match run(agent, lease, fix, gate, &file, &current, kind, round).await {
                        Ok(()) => {}
                        Err(Failed::Check(line)) => {
                            return Decision::Retry {
                                report: format!("{report}; its fix failed too: {line}"),
                            };
                        }
                        Err(Failed::Start(error)) => {
                            return Decision::CouldNotRun {
                                report: format!("{report}; its fix could not be run: {error}"),
                            };
                        }
                    }
                    tracing::info!(agent = %agent.name, task = %lease.key, check = %gate.name, round, "validation fix ran; checking again");
                    continue 'rounds;
                }
            }
        }
        return Decision::Accept {
            output: current,
            notes,
        };
    }
}

/// Runs `argv` for `gate` with the result at hand: `Ok` on exit 0, else
/// how it failed.
#[allow(clippy::too_many_arguments)]
async fn run(
    agent: &AgentRuntime,
    lease: &Lease,
    argv: &[String],
    gate: &GateConfig,
    file: &ResultFile,
    output: &Value,
    kind: &str,
    round: u32,
) -> Result<(), Failed> {
    let mut spec = agent.check_spec();
    spec.argv = argv.to_vec();
    spec.env
        .push(("FLOTILLA_TASK_ID".into(), lease.key.task_id.clone()));
    spec.env.push((
        "FLOTILLA_TASK_ATTEMPT".into(),
        lease.key.attempt.to_string(),
    ));
    spec.env
        .push(("FLOTILLA_TASK_TYPE".into(), kind.to_string()));
    spec.env
        .push(("FLOTILLA_VALIDATION_ROUND".into(), round.to_string()));
    spec.env
        .push(("FLOTILLA_RESULT_FILE".into(), file.0.display().to_string()));
    let text = output.to_string();
    if text.len() <= RESULT_ENV_BYTES {
        spec.env.push(("FLOTILLA_RESULT".into(), text));
    }
    let limit = gate.timeout.get();
    match crate::command::run(spec, limit, REPORT_BYTES).await {
        Ok(ran) if ran.success() => Ok(()),
        Ok(ran) => Err(Failed::Check(ran.describe(&argv[0], limit))),
        Err(error) => Err(Failed::Start(error)),
    }
}

/// A temporary file holding a result, removed when dropped.
struct ResultFile(PathBuf);

impl ResultFile {
    fn new() -> Self {
        Self(std::env::temp_dir().join(format!("flotilla-result-{}.json", uuid::Uuid::now_v7())))
    }

    /// Writes `text`, readable and writable by the daemon's user only (a
    /// result may hold what other users of the machine must not read).
    fn write(&self, text: &str) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.0)?
            .write_all(text.as_bytes())
    }
}

impl Drop for ResultFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
