//! `[agents.NAME.validation]` (gates a result must pass before its task is
//! acknowledged) and `[agents.NAME.watch]` (checks sampled after
//! acceptance, rolling back on a breach).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::HumanDuration;

/// `[agents.NAME.validation]`: checks run on every result before the task
/// is acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// The checks, in order; the first required one that fails decides
    /// (at most 32).
    pub checks: Vec<GateConfig>,
    /// Rounds of fix-and-revalidate an `auto_fix_and_revalidate` check may
    /// run before the result is rejected (0 to 10).
    pub max_fix_rounds: u32,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            checks: Vec::new(),
            max_fix_rounds: 2,
        }
    }
}

/// One validation gate: a command run in the agent's working directory
/// with the result available (`FLOTILLA_RESULT_FILE`, `FLOTILLA_RESULT`);
/// exit 0 passes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GateConfig {
    /// Its name, in reports (1 to 64 characters, unique per agent).
    pub name: String,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// Only tasks of these types (the payload's `type`; `default` for
    /// tasks without one); all tasks when empty.
    #[serde(default)]
    pub types: Vec<String>,
    /// Whether a failure stops the task from being acknowledged (default
    /// true); a failing optional check is only reported.
    #[serde(default = "yes")]
    pub required: bool,
    /// Longest the command may run; it fails then (10ms to 24h, default
    /// 5m).
    #[serde(default = "five_minutes")]
    pub timeout: HumanDuration,
    /// What a failure does: `reject_and_retry` (default: the task is
    /// retried, the report handed to the next attempt), `auto_fix_and_revalidate`
    /// (run `fix`, then every check again), `escalate` (to `escalate_to`,
    /// else a human), `auto_rollback` (undo the result's declared changes,
    /// then retry).
    #[serde(default)]
    pub on_failure: OnFailure,
    /// `auto_fix_and_revalidate` only: the command that fixes the result.
    #[serde(default)]
    pub fix: Option<Vec<String>>,
    /// `escalate` only: the agent that takes the task over (its next
    /// attempt gets the report); without it, a human.
    #[serde(default)]
    pub escalate_to: Option<String>,
}

fn yes() -> bool {
    true
}

fn five_minutes() -> HumanDuration {
    HumanDuration::secs(300)
}

/// What a failed required gate does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Retry the task; the report is the next attempt's feedback.
    #[default]
    RejectAndRetry,
    /// Run the check's `fix`, then every check again.
    AutoFixAndRevalidate,
    /// Hand the task to `escalate_to`, or to a human.
    Escalate,
    /// Undo the result's declared changes, then retry.
    AutoRollback,
}

impl OnFailure {
    /// Its name in config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RejectAndRetry => "reject_and_retry",
            Self::AutoFixAndRevalidate => "auto_fix_and_revalidate",
            Self::Escalate => "escalate",
            Self::AutoRollback => "auto_rollback",
        }
    }
}

impl GateConfig {
    /// Whether the gate applies to tasks of `kind`.
    pub fn applies_to(&self, kind: &str) -> bool {
        self.types.is_empty() || self.types.iter().any(|t| t == kind)
    }
}

/// `[agents.NAME.watch]`: after a task is accepted, its checks are
/// sampled every `interval` for `duration`; a breach rolls the task's
/// declared changes back and tells humans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// How long after acceptance the checks are watched (1s to 24h).
    pub duration: HumanDuration,
    /// How often they are sampled (1s to 1h, at most `duration`).
    pub interval: HumanDuration,
    /// Only tasks of these types; all when empty.
    pub types: Vec<String>,
    /// The checks (at most 16).
    pub checks: Vec<WatchCheck>,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            duration: HumanDuration::secs(300),
            interval: HumanDuration::secs(30),
            types: Vec::new(),
            checks: Vec::new(),
        }
    }
}

/// One watched signal: a command, or a Prometheus query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WatchCheck {
    /// Its name, in reports.
    pub name: String,
    /// A command: without a threshold, a non-zero exit is a breach; with
    /// one, it prints a number compared with the baseline.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// A Prometheus server's base URL (`http://prometheus:9090`), queried
    /// with `query`; the first sample's value is compared with the
    /// baseline.
    #[serde(default)]
    pub prometheus: Option<String>,
    /// The PromQL query for `prometheus`.
    #[serde(default)]
    pub query: Option<String>,
    /// A breach: the value rose more than this over the baseline (taken
    /// at acceptance).
    #[serde(default)]
    pub max_increase: Option<f64>,
    /// A breach: the value rose more than this percentage of the
    /// baseline.
    #[serde(default)]
    pub max_increase_pct: Option<f64>,
    /// Longest one sample may take (10ms to 5m, default 10s).
    #[serde(default = "ten_seconds")]
    pub timeout: HumanDuration,
}

fn ten_seconds() -> HumanDuration {
    HumanDuration::secs(10)
}

impl WatchCheck {
    /// Whether it compares a value with a baseline.
    pub fn has_threshold(&self) -> bool {
        self.max_increase.is_some() || self.max_increase_pct.is_some()
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64
}

impl ValidationConfig {
    pub(super) fn validate(
        &self,
        key: &str,
        own: &str,
        agents: &[String],
        problem: &mut impl FnMut(String, String),
    ) {
        if self.checks.len() > 32 {
            problem(
                format!("{key}.checks"),
                format!("{} checks; valid: at most 32", self.checks.len()),
            );
        }
        if self.max_fix_rounds > 10 {
            problem(
                format!("{key}.max_fix_rounds"),
                format!("{} is out of range; valid: 0 to 10", self.max_fix_rounds),
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for (index, gate) in self.checks.iter().enumerate() {
            let key = format!("{key}.checks[{index}]");
            if !valid_name(&gate.name) {
                problem(
                    format!("{key}.name"),
                    format!("{:?} is not valid; give 1 to 64 characters", gate.name),
                );
            } else if !names.insert(gate.name.clone()) {
                problem(
                    format!("{key}.name"),
                    format!("{:?} names two checks; give each its own", gate.name),
                );
            }
            if gate.command.first().is_none_or(String::is_empty) {
                problem(
                    format!("{key}.command"),
                    "is empty; give the program and its arguments, e.g. [\"pytest\", \"-q\"]"
                        .into(),
                );
            }
            let timeout = gate.timeout.get();
            if timeout < std::time::Duration::from_millis(10)
                || timeout > std::time::Duration::from_secs(86_400)
            {
                problem(
                    format!("{key}.timeout"),
                    format!("{} is out of range; valid: 10ms to 24h", gate.timeout),
                );
            }
            match (gate.on_failure, &gate.fix) {
                (OnFailure::AutoFixAndRevalidate, None) => problem(
                    format!("{key}.fix"),
                    "on_failure = \"auto_fix_and_revalidate\" needs `fix`: the command that fixes the result".into(),
                ),
                (OnFailure::AutoFixAndRevalidate, Some(fix)) if fix.first().is_none_or(String::is_empty) => problem(
                    format!("{key}.fix"),
                    "is empty; give the program and its arguments".into(),
                ),
                (OnFailure::AutoFixAndRevalidate, Some(_)) => {}
                (other, Some(_)) => problem(
                    format!("{key}.fix"),
                    format!("only on_failure = \"auto_fix_and_revalidate\" runs `fix`, not {:?}", other.as_str()),
                ),
                (_, None) => {}
            }
            if let Some(target) = &gate.escalate_to {
                if gate.on_failure != OnFailure::Escalate {
                    problem(
                        format!("{key}.escalate_to"),
                        "only on_failure = \"escalate\" escalates".into(),
                    );
                } else if target == own {
                    problem(
                        format!("{key}.escalate_to"),
                        format!(
                            "{own:?} cannot escalate to itself: the task would bounce forever; name another agent, or leave it out for a human"
                        ),
                    );
                } else if !agents.contains(target) {
                    problem(
                        format!("{key}.escalate_to"),
                        format!(
                            "unknown agent {target:?}; configured agents: {}",
                            agents.join(", ")
                        ),
                    );
                }
            }
            if !gate.required && gate.on_failure != OnFailure::RejectAndRetry {
                problem(
                    format!("{key}.on_failure"),
                    "an optional check (required = false) is only reported; leave on_failure out"
                        .into(),
                );
            }
        }
    }
}

impl WatchConfig {
    pub(super) fn validate(&self, key: &str, problem: &mut impl FnMut(String, String)) {
        if self.checks.is_empty() {
            return;
        }
        let secs = std::time::Duration::from_secs;
        if self.duration.get() < secs(1) || self.duration.get() > secs(86_400) {
            problem(
                format!("{key}.duration"),
                format!("{} is out of range; valid: 1s to 24h", self.duration),
            );
        }
        if self.interval.get() < secs(1)
            || self.interval.get() > secs(3600)
            || self.interval > self.duration
        {
            problem(
                format!("{key}.interval"),
                format!(
                    "{} is out of range; valid: 1s to 1h, at most duration = {}",
                    self.interval, self.duration
                ),
            );
        }
        if self.checks.len() > 16 {
            problem(
                format!("{key}.checks"),
                format!("{} checks; valid: at most 16", self.checks.len()),
            );
        }
        for (index, check) in self.checks.iter().enumerate() {
            let key = format!("{key}.checks[{index}]");
            if !valid_name(&check.name) {
                problem(
                    format!("{key}.name"),
                    format!("{:?} is not valid; give 1 to 64 characters", check.name),
                );
            }
            match (&check.command, &check.prometheus) {
                (Some(argv), None) if argv.first().is_none_or(String::is_empty) => problem(
                    format!("{key}.command"),
                    "is empty; give the program and its arguments".into(),
                ),
                (Some(_), None) => {}
                (None, Some(url)) => {
                    if !reqwest::Url::parse(url)
                        .is_ok_and(|url| matches!(url.scheme(), "http" | "https"))
                    {
                        problem(
                            format!("{key}.prometheus"),
                            format!(
                                "{:?} is not an http:// or https:// URL; e.g. \"http://prometheus:9090\"",
                                super::redact_url(url)
                            ),
                        );
                    }
                    if check.query.as_deref().is_none_or(str::is_empty) {
                        problem(
                            format!("{key}.query"),
                            "a `prometheus` check needs `query`, e.g. \"sum(rate(http_errors_total[1m]))\"".into(),
                        );
                    }
                    if !check.has_threshold() {
                        problem(
                            format!("{key}.max_increase"),
                            "a `prometheus` check needs max_increase or max_increase_pct".into(),
                        );
                    }
                }
                _ => problem(
                    key.clone(),
                    "give exactly one of `command` and `prometheus`".into(),
                ),
            }
            if check.query.is_some() && check.prometheus.is_none() {
                problem(
                    format!("{key}.query"),
                    "only a `prometheus` check has a query".into(),
                );
            }
            for (field, value) in [
                ("max_increase", check.max_increase),
                ("max_increase_pct", check.max_increase_pct),
            ] {
                if let Some(value) = value
                    && !(value.is_finite() && value >= 0.0)
                {
                    problem(
                        format!("{key}.{field}"),
                        format!("{value} is not valid; give 0 or more"),
                    );
                }
            }
            let timeout = check.timeout.get();
            if timeout < std::time::Duration::from_millis(10) || timeout > secs(300) {
                problem(
                    format!("{key}.timeout"),
                    format!("{} is out of range; valid: 10ms to 5m", check.timeout),
                );
            }
        }
    }
}
