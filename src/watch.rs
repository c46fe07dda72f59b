//! The post-accept watch (`[agents.NAME.watch]`): after a task is
//! accepted, its checks are sampled every `interval` for `duration`,
//! against a baseline taken at acceptance. A breach rolls back the changes
//! the task's result declared (see [`crate::rollback`]) and tells humans.
//!
//! A watch lives in the daemon that accepted the task: a daemon that stops
//! ends its watches (the journal stays, `flotilla rollback` still works).

use std::sync::Arc;

use serde_json::Value;

use crate::config::WatchCheck;
use crate::dispatch::AgentRuntime;
use crate::notify::{Event, EventKind};

/// Bytes of a watch command's output kept.
const OUTPUT_BYTES: usize = 1024;

/// Starts watching `task` (of type `kind`) of `agent`, if its config
/// watches tasks of that type.
pub fn start(agent: &Arc<AgentRuntime>, task: &str, kind: &str) {
    let config = &agent.config.watch;
    if config.checks.is_empty()
        || !(config.types.is_empty() || config.types.iter().any(|t| t == kind))
    {
        return;
    }
    // Bounded: a burst of accepted tasks must not start unbounded
    // watches (each samples its checks every interval).
    let Ok(permit) = agent.watch_permits().try_acquire_owned() else {
        tracing::warn!(agent = %agent.name, %task, max = MAX_WATCHES, "too many tasks watched at once; this one is not watched");
        return;
    };
    let agent = agent.clone();
    let task = task.to_string();
    tokio::spawn(async move {
        let _permit = permit;
        watch(agent, task).await;
    });
}

/// Most tasks one agent watches at once.
pub const MAX_WATCHES: usize = 64;
/// Largest Prometheus answer read.
const MAX_ANSWER: usize = 1 << 20;

/// One sample of a check: a value to compare, or pass/fail.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Sample {
    Value(f64),
    Pass,
    Fail,
}

async fn watch(agent: Arc<AgentRuntime>, task: String) {
    let config = agent.config.watch.clone();
    let client = reqwest::Client::builder().build().ok();
    let mut baseline = Vec::with_capacity(config.checks.len());
    for check in &config.checks {
        baseline.push(sample(&agent, &task, check, client.as_ref()).await.ok());
    }
    tracing::info!(agent = %agent.name, %task, duration = %config.duration, "watching the accepted task");
    let started = tokio::time::Instant::now();
    while started.elapsed() < config.duration.get() {
        tokio::time::sleep(config.interval.get()).await;
        for (check, base) in config.checks.iter().zip(&baseline) {
            let now = match sample(&agent, &task, check, client.as_ref()).await {
                Ok(now) => now,
                Err(error) => {
                    tracing::warn!(agent = %agent.name, %task, check = %check.name, %error, "watch check could not be sampled");
                    continue;
                }
            };
            if let Some(breach) = breach(check, *base, now) {
                breached(&agent, &task, check, &breach).await;
                return;
            }
        }
    }
    tracing::info!(agent = %agent.name, %task, "watch ended without a breach");
}

/// Why `now` breaches `check` against `base`, if it does.
fn breach(check: &WatchCheck, base: Option<Sample>, now: Sample) -> Option<String> {
    match now {
        Sample::Fail => Some("the check failed".into()),
        Sample::Pass => None,
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
            .map(Sample::Value)
            .map_err(|_| {
                format!(
                    "{:?} printed {:?}, not a number",
                    argv[0],
                    ran.stdout.trim()
                )
            });
    }
    let (Some(base), Some(query)) = (&check.prometheus, &check.query) else {
        return Err("neither a command nor a query".into());
    };
    let client = client.ok_or("the HTTP client could not be built")?;
    let url = format!("{}/api/v1/query", base.trim_end_matches('/'));
    let response = tokio::time::timeout(limit, client.get(&url).query(&[("query", query)]).send())
        .await
        .map_err(|_| format!("{url}: no answer within {}", check.timeout))?
        .map_err(|error| format!("{url}: {error}"))?;
    if response
        .content_length()
        .is_some_and(|length| length > MAX_ANSWER as u64)
    {
        return Err(format!("{url}: the answer is over {MAX_ANSWER} bytes"));
    }
    let body: Value = tokio::time::timeout(limit, response.bytes())
        .await
        .map_err(|_| format!("{url}: no answer within {}", check.timeout))?
        .map_err(|error| format!("{url}: {error}"))
        .and_then(|bytes| {
            if bytes.len() > MAX_ANSWER {
                return Err(format!("{url}: the answer is over {MAX_ANSWER} bytes"));
            }
            serde_json::from_slice(&bytes).map_err(|error| format!("{url}: not JSON: {error}"))
        })?;
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
        .ok_or_else(|| format!("unexpected value {value}"))
}

async fn breached(agent: &Arc<AgentRuntime>, task: &str, check: &WatchCheck, why: &str) {
    let reason = format!("watch check {:?} breached: {why}", check.name);
    let undone = match crate::rollback::load(agent.store(), task).await {
        Ok(Some(mut journal)) => agent.run_rollback(&mut journal, &reason).await,
        Ok(None) => "the task declared no changes to roll back".into(),
        Err(error) => format!("its journal could not be read: {error}"),
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
        assert!(breach(&absolute, Some(Sample::Value(0.02)), Sample::Value(0.025)).is_none());
        assert!(breach(&absolute, Some(Sample::Value(0.02)), Sample::Value(0.031)).is_some());
        let relative = check(None, Some(1.0));
        assert!(breach(&relative, Some(Sample::Value(100.0)), Sample::Value(100.9)).is_none());
        assert!(breach(&relative, Some(Sample::Value(100.0)), Sample::Value(101.5)).is_some());
        // From a zero baseline any rise breaches a relative threshold.
        assert!(breach(&relative, Some(Sample::Value(0.0)), Sample::Value(0.1)).is_some());
        // Without a baseline a value cannot be judged; a failure always is.
        assert!(breach(&absolute, None, Sample::Value(9.0)).is_none());
        assert!(breach(&check(None, None), None, Sample::Fail).is_some());
    }

    #[test]
    fn prometheus_answers_are_read() {
        let vector = serde_json::json!({"status": "success", "data": {"resultType": "vector",
            "result": [{"metric": {}, "value": [1700000000.0, "0.042"]}]}});
        assert_eq!(prometheus_value(&vector), Ok(0.042));
        let empty = serde_json::json!({"status": "success", "data": {"resultType": "vector", "result": []}});
        assert_eq!(prometheus_value(&empty), Ok(0.0));
        let error = serde_json::json!({"status": "error", "error": "parse error"});
        assert!(
            prometheus_value(&error)
                .unwrap_err()
                .contains("parse error")
        );
    }
}
