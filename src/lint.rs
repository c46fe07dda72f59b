//! `flotilla check`: the resilience checklist as a lint of a config. Each
//! item passes, fails, or (for recommended items) warns, and says how to
//! fix what it found. A failed required item makes the command exit 1.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{Config, OnFailure};

/// One item of the checklist.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    /// A short stable name.
    pub id: &'static str,
    /// What is checked.
    pub title: &'static str,
    /// Whether a failure fails the check.
    pub required: bool,
    /// `pass`, `fail` or `warn`.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// How to fix it (empty when it passes).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

/// An item's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// It holds.
    Pass,
    /// A required item does not hold.
    Fail,
    /// A recommended item does not hold.
    Warn,
}

/// The scorecard.
#[derive(Debug, Clone, Serialize)]
pub struct Scorecard {
    /// Items that pass, of all.
    pub passed: usize,
    /// All items.
    pub total: usize,
    /// Whether every required item passes.
    pub ok: bool,
    /// The items.
    pub items: Vec<Item>,
}

/// The alert names `deploy/prometheus/alerts.yml` defines; an alert rules
/// file should have them all.
pub const ALERTS: [&str; 10] = [
    "AgentStuck",
    "QueueDepthHigh",
    "AgentErrorRateHigh",
    "FleetDegraded",
    "BreakerOpen",
    "DeadLettersGrowing",
    "BrokerDisconnected",
    "AgentRestartLoop",
    "StoreCountsStale",
    "NotificationsFailing",
];

fn item(
    id: &'static str,
    title: &'static str,
    required: bool,
    problems: Vec<String>,
    ok: String,
    fix: &str,
) -> Item {
    let status = match (problems.is_empty(), required) {
        (true, _) => Status::Pass,
        (false, true) => Status::Fail,
        (false, false) => Status::Warn,
    };
    Item {
        id,
        title,
        required,
        status,
        detail: if problems.is_empty() {
            ok
        } else {
            problems.join("; ")
        },
        fix: if problems.is_empty() {
            String::new()
        } else {
            fix.to_string()
        },
    }
}

/// Lints `config`; `alerts` is the alert rules file to look at (default:
/// `deploy/prometheus/alerts.yml`, then `alerts.yml`, beside the config,
/// then `deploy/prometheus/alerts.yml` up to three directories above it).
pub fn check(config: &Config, alerts: Option<&Path>) -> Scorecard {
    let agents = &config.agents;
    let mut items = Vec::new();
    items.push(item(
        "explicit_ack",
        "tasks are acknowledged explicitly, after validation",
        true,
        Vec::new(),
        "by design: a task is done only when its result is stored (and passed its gates)".into(),
        "",
    ));
    let mut timeouts: Vec<String> = agents
        .iter()
        .filter(|(_, agent)| agent.timeouts.progress_timeout >= agent.timeouts.max_duration)
        .map(|(name, agent)| {
            format!(
                "{name}: progress_timeout = {} is not below max_duration = {}, so the progress watchdog never fires first",
                agent.timeouts.progress_timeout, agent.timeouts.max_duration
            )
        })
        .collect();
    if agents.is_empty() {
        timeouts
            .push("the config defines no agents; add an [agents.NAME] table with a command".into());
    }
    // The fleet watchdog's stuck_after cuts a longer progress timeout
    // short: a replica silent that long is restarted, its attempt charged.
    if config.watchdog.enabled {
        timeouts.extend(agents.iter().filter_map(|(name, agent)| {
            let stuck_after = config.watchdog.thresholds(&agent.watchdog).stuck_after;
            (agent.timeouts.progress_timeout > stuck_after).then(|| {
                format!(
                    "{name}: progress_timeout = {} is longer than the fleet watchdog's stuck_after = {stuck_after}, which restarts a replica silent that long first; set agents.{name}.watchdog = {{ stuck_after = ... }} above the progress timeout",
                    agent.timeouts.progress_timeout
                )
            })
        }));
    }
    items.push(item(
        "timeouts",
        "every agent has a progress timeout and a total time limit",
        true,
        timeouts,
        format!(
            "{} agent(s), each with progress_timeout below max_duration (and within the watchdog's stuck_after)",
            agents.len()
        ),
        "set [agents.NAME.timeouts] progress_timeout well below max_duration, and the agent's watchdog stuck_after above it",
    ));
    let breakers: Vec<String> = agents
        .iter()
        .filter(|(_, agent)| !agent.breaker.enabled)
        .map(|(name, _)| format!("{name}: breaker disabled"))
        .collect();
    items.push(item(
        "breakers",
        "every agent has a circuit breaker",
        true,
        breakers,
        "every agent's breaker is enabled".into(),
        "remove `breaker = { enabled = false }` (or set enabled = true) in [agents.NAME.breaker]",
    ));
    let max_deliver: Vec<String> = agents
        .iter()
        .map(|(name, agent)| format!("{name}: {}", agent.retry.max_deliver))
        .collect();
    items.push(item(
        "dead_letters",
        "retries are finite and exhausted tasks become dead letters",
        true,
        Vec::new(),
        format!("retry.max_deliver: {}", max_deliver.join(", ")),
        "",
    ));
    let without_readiness: Vec<String> = agents
        .iter()
        .filter(|(_, agent)| agent.readiness.checks.is_empty())
        .map(|(name, _)| format!("{name}: no readiness checks"))
        .collect();
    // What `flotilla up` would refuse here: only recommended, since a
    // config is often checked away from where it runs (in CI).
    items.push(item(
        "starts",
        "the fleet can start on this machine",
        false,
        crate::dispatch::check_fleet(config),
        "every agent's program, working directory and variables are there".into(),
        "fix each problem named, or run the check where the fleet runs",
    ));
    items.push(item(
        "readiness",
        "agents check what they depend on before taking tasks",
        false,
        without_readiness,
        "every agent has readiness checks".into(),
        "add [agents.NAME.readiness] checks, e.g. { http = \"http://model:8080/health\" } for the model endpoint",
    ));
    items.push(item(
        "watchdog",
        "the fleet watchdog runs",
        true,
        if config.watchdog.enabled {
            Vec::new()
        } else {
            vec!["[watchdog] enabled = false".into()]
        },
        format!(
            "every {}; stuck after {}, error rate {:.0}%",
            config.watchdog.interval,
            config.watchdog.stuck_after,
            config.watchdog.error_rate * 100.0
        ),
        "remove `enabled = false` from [watchdog]",
    ));
    let degradation = &config.degradation;
    let levels = [
        &degradation.reduced,
        &degradation.essential,
        &degradation.emergency,
    ]
    .iter()
    .filter(|level| !level.triggers.is_empty())
    .count();
    items.push(item(
        "degradation",
        "degradation levels are defined",
        true,
        if levels == 0 {
            vec!["no [degradation] level has triggers".into()]
        } else {
            Vec::new()
        },
        format!("{levels} of 3 levels have triggers"),
        "add triggers under [degradation], e.g. reduced = { triggers = [{ when = \"agents_unavailable\", at_least = 1 }] } (docs/configuration.md)",
    ));
    let (alert_problems, alert_detail) = alert_rules(config, alerts);
    items.push(item(
        "alert_rules",
        "alert rules are present and valid",
        true,
        alert_problems,
        alert_detail,
        "copy deploy/prometheus/alerts.yml from the flotilla repository beside the config (or pass --alerts PATH) and load it into Prometheus",
    ));
    let experiments = experiments(config);
    items.push(item(
        "chaos",
        "at least one chaos experiment is defined",
        false,
        if experiments.is_empty() {
            vec!["no experiment ([[chaos.schedule]], or beside the config chaos/*.toml or deploy/chaos-mesh/*.yaml)".into()]
        } else {
            Vec::new()
        },
        format!("{} experiment(s)", experiments.len()),
        "write chaos/NAME.toml beside the config (see examples/chaos/kill-one.toml; `flotilla chaos run` it against a test fleet with [chaos] enabled = true), or copy deploy/chaos-mesh/ from the flotilla repository (Kubernetes)",
    ));
    let rollback: Vec<String> = agents
        .iter()
        .filter(|(_, agent)| {
            !agent.validation.checks.is_empty()
                && !agent
                    .validation
                    .checks
                    .iter()
                    .any(|gate| gate.on_failure == OnFailure::AutoRollback)
                && agent.watch.checks.is_empty()
        })
        .map(|(name, _)| format!("{name}: validates results but never rolls back"))
        .collect();
    items.push(item(
        "rollback",
        "agents whose results are validated can roll back",
        false,
        rollback,
        "every agent with validation gates rolls back (auto_rollback or a watch)".into(),
        "give a gate on_failure = \"auto_rollback\" or add [agents.NAME.watch], and have the agent declare `changes` with rollback commands in its results",
    ));
    let passed = items.iter().filter(|i| i.status == Status::Pass).count();
    let ok = items
        .iter()
        .all(|i| !(i.required && i.status == Status::Fail));
    Scorecard {
        passed,
        total: items.len(),
        ok,
        items,
    }
}

/// Experiment files: those `[[chaos.schedule]]` runs, and beside the
/// config `chaos/*.toml` or Chaos Mesh manifests in `deploy/chaos-mesh/`.
fn experiments(config: &Config) -> Vec<PathBuf> {
    let scheduled = config
        .chaos
        .schedule
        .iter()
        .map(|entry| config.base_dir.join(&entry.experiment))
        .filter(|path| path.is_file());
    let mut found: Vec<PathBuf> = [("chaos", "toml"), ("deploy/chaos-mesh", "yaml")]
        .iter()
        .flat_map(|(dir, extension)| {
            std::fs::read_dir(config.base_dir.join(dir))
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .map(|entry| entry.path())
                        .filter(|path| path.extension().is_some_and(|e| e == *extension))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .chain(scheduled)
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Where the alert rules are looked for without `--alerts`, nearest
/// first: `deploy/prometheus/alerts.yml` and `alerts.yml` beside the
/// config, then `deploy/prometheus/alerts.yml` in the directories above
/// it (a config in a subfolder of a checkout, such as `examples/`, finds
/// the repository's rules).
fn alert_rule_candidates(base: &Path) -> Vec<PathBuf> {
    let mut candidates = vec![base.join(ALERT_RULES), base.join("alerts.yml")];
    // The real parents, not the path's text (`a/../b`).
    let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
    candidates.extend(
        base.ancestors()
            .skip(1)
            .take(ALERT_RULES_PARENTS)
            .map(|dir| dir.join(ALERT_RULES)),
    );
    candidates
}

const ALERT_RULES: &str = "deploy/prometheus/alerts.yml";

/// How many directories above the config's are searched for
/// [`ALERT_RULES`].
const ALERT_RULES_PARENTS: usize = 3;

fn alert_rules(config: &Config, given: Option<&Path>) -> (Vec<String>, String) {
    let candidates: Vec<PathBuf> = match given {
        Some(path) => vec![path.to_path_buf()],
        None => alert_rule_candidates(&config.base_dir),
    };
    let Some(path) = candidates.iter().find(|path| path.is_file()) else {
        return (
            vec![format!(
                "no alert rules file ({})",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )],
            String::new(),
        );
    };
    let text = match crate::config::read_capped(path, crate::config::MAX_FILE_BYTES) {
        Ok(text) => text,
        Err(error) => return (vec![format!("{}: {error}", path.display())], String::new()),
    };
    let mut problems = match defined_alerts(&text) {
        Ok(defined) => ALERTS
            .iter()
            .filter(|alert| !defined.iter().any(|name| name == *alert))
            .map(|alert| format!("{}: no alert {alert}", path.display()))
            .collect(),
        Err(why) => vec![format!("{}: not a rules file: {why}", path.display())],
    };
    // promtool, when at hand, checks the rules for real.
    if let Some(promtool) = promtool() {
        match std::process::Command::new(&promtool)
            .args(["check", "rules"])
            .arg(path)
            .output()
        {
            Ok(output) if output.status.success() => {}
            Ok(output) => problems.push(format!(
                "promtool check rules: {}",
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .chain(String::from_utf8_lossy(&output.stderr).lines())
                    .filter(|line| line.contains("FAILED") || line.contains("error"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
            Err(_) => {}
        }
    }
    (
        problems,
        format!("{} has all {} alerts", path.display(), ALERTS.len()),
    )
}

/// The alerts a Prometheus rules file defines (`groups[].rules[].alert`),
/// or a Prometheus Operator `PrometheusRule` (`spec.groups[]...`).
fn defined_alerts(text: &str) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct File {
        groups: Option<Vec<Group>>,
        spec: Option<Spec>,
    }
    #[derive(serde::Deserialize)]
    struct Spec {
        groups: Vec<Group>,
    }
    #[derive(serde::Deserialize)]
    struct Group {
        rules: Option<Vec<Rule>>,
    }
    #[derive(serde::Deserialize)]
    struct Rule {
        alert: Option<String>,
    }
    let file: File = serde_yaml_ng::from_str(text).map_err(|error| error.to_string())?;
    let groups = file
        .groups
        .or(file.spec.map(|spec| spec.groups))
        .ok_or("no `groups` (nor `spec.groups` of a PrometheusRule)")?;
    Ok(groups
        .into_iter()
        .flat_map(|group| group.rules.unwrap_or_default())
        .filter_map(|rule| rule.alert)
        .collect())
}

fn promtool() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FLOTILLA_PROMTOOL") {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("promtool"))
            .find(|path| path.is_file())
    })
}

/// The scorecard for humans.
pub fn render(card: &Scorecard) -> String {
    let mut text = String::new();
    for item in &card.items {
        let mark = match item.status {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Warn => "WARN",
        };
        let kind = if item.required { "" } else { " (recommended)" };
        text.push_str(&format!(
            "{mark}  {}{kind}\n      {}\n",
            item.title, item.detail
        ));
        if !item.fix.is_empty() {
            text.push_str(&format!("      fix: {}\n", item.fix));
        }
    }
    text.push_str(&format!(
        "\nscore: {}/{} ({})\n",
        card.passed,
        card.total,
        if card.ok {
            "every required item passes"
        } else {
            "a required item fails"
        }
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_are_read_from_the_rules_not_from_the_text() {
        let rules = "groups:\n  - name: a\n    rules:\n      # alert: InComment\n      - alert: Real\n        expr: up == 0\n      - record: job:up\n        expr: sum(up)\n";
        assert_eq!(defined_alerts(rules).unwrap(), vec!["Real".to_string()]);
        let shipped = include_str!("../deploy/prometheus/alerts.yml");
        let defined = defined_alerts(shipped).unwrap();
        for alert in ALERTS {
            assert!(defined.iter().any(|name| name == alert), "{alert}");
        }
        assert!(defined_alerts("alert: Real\n").is_err(), "no groups");
        let operator = "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nspec:\n  groups:\n    - name: a\n      rules:\n        - alert: Real\n          expr: up == 0\n    - name: empty\n      rules:\n";
        assert_eq!(defined_alerts(operator).unwrap(), vec!["Real".to_string()]);
        assert!(defined_alerts("groups: [").is_err(), "not YAML");
    }
}
