//! `[watchdog]` and `[agents.NAME.watchdog]`: the fleet watchdog's
//! thresholds, fleet-wide with per-agent overrides.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::HumanDuration;

/// `[watchdog]`: the fleet watchdog. Every `interval` it looks at each
/// agent: a backlog adds a replica, idleness removes one, a replica with
/// no progress for too long is restarted, an error rate over the threshold
/// opens the agent's breaker. The thresholds hold for every agent;
/// `[agents.NAME.watchdog]` overrides them per agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogConfig {
    /// Whether the watchdog runs (default true).
    pub enabled: bool,
    /// How often it looks (1s to 10m).
    pub interval: HumanDuration,
    /// Queued tasks of an agent above which it needs another replica (1 to
    /// 1000000).
    pub queue_depth: u64,
    /// How long the queue must stay above `queue_depth` before a replica is
    /// added (and between two additions); 0s to 1h.
    pub scale_up_after: HumanDuration,
    /// How long an agent must be idle (nothing queued, no task running)
    /// before an idle replica is removed (and between two removals); 1s to
    /// 24h.
    pub scale_down_after: HumanDuration,
    /// A replica whose task made no progress for this long is restarted
    /// and the task retried (1s to 7d).
    pub stuck_after: HumanDuration,
    /// Failed attempts over all attempts within `error_window` above which
    /// the agent's breaker is opened and humans are told (above 0.0, up to
    /// 1.0).
    pub error_rate: f64,
    /// The window of `error_rate` (1s to 24h).
    pub error_window: HumanDuration,
    /// Attempts within `error_window` needed before `error_rate` is judged
    /// (1 to 100000).
    pub min_calls: u32,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        let thresholds = Thresholds::default();
        Self {
            enabled: true,
            interval: HumanDuration::secs(5),
            queue_depth: thresholds.queue_depth,
            scale_up_after: thresholds.scale_up_after,
            scale_down_after: thresholds.scale_down_after,
            stuck_after: thresholds.stuck_after,
            error_rate: thresholds.error_rate,
            error_window: thresholds.error_window,
            min_calls: thresholds.min_calls,
        }
    }
}

/// One agent's thresholds: `[watchdog]` with its overrides applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// See [`WatchdogConfig::queue_depth`].
    pub queue_depth: u64,
    /// See [`WatchdogConfig::scale_up_after`].
    pub scale_up_after: HumanDuration,
    /// See [`WatchdogConfig::scale_down_after`].
    pub scale_down_after: HumanDuration,
    /// See [`WatchdogConfig::stuck_after`].
    pub stuck_after: HumanDuration,
    /// See [`WatchdogConfig::error_rate`].
    pub error_rate: f64,
    /// See [`WatchdogConfig::error_window`].
    pub error_window: HumanDuration,
    /// See [`WatchdogConfig::min_calls`].
    pub min_calls: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            queue_depth: 10,
            scale_up_after: HumanDuration::secs(30),
            scale_down_after: HumanDuration::secs(300),
            stuck_after: HumanDuration::secs(900),
            error_rate: 0.2,
            error_window: HumanDuration::secs(300),
            min_calls: 10,
        }
    }
}

/// `[agents.NAME.watchdog]`: this agent's thresholds where they differ
/// from `[watchdog]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ThresholdOverrides {
    /// See `[watchdog] queue_depth`.
    pub queue_depth: Option<u64>,
    /// See `[watchdog] scale_up_after`.
    pub scale_up_after: Option<HumanDuration>,
    /// See `[watchdog] scale_down_after`.
    pub scale_down_after: Option<HumanDuration>,
    /// See `[watchdog] stuck_after`.
    pub stuck_after: Option<HumanDuration>,
    /// See `[watchdog] error_rate`.
    pub error_rate: Option<f64>,
    /// See `[watchdog] error_window`.
    pub error_window: Option<HumanDuration>,
    /// See `[watchdog] min_calls`.
    pub min_calls: Option<u32>,
}

impl Thresholds {
    /// Checks the thresholds, reporting under `key`.
    pub(super) fn validate(&self, key: &str, problem: &mut impl FnMut(String, String)) {
        let secs = std::time::Duration::from_secs;
        if !(1..=1_000_000).contains(&self.queue_depth) {
            problem(
                format!("{key}.queue_depth"),
                format!("{} is out of range; valid: 1 to 1000000", self.queue_depth),
            );
        }
        for (field, value, low, high, range) in [
            (
                "scale_up_after",
                self.scale_up_after,
                secs(0),
                secs(3600),
                "0s to 1h",
            ),
            (
                "scale_down_after",
                self.scale_down_after,
                secs(1),
                secs(86_400),
                "1s to 24h",
            ),
            (
                "stuck_after",
                self.stuck_after,
                secs(1),
                secs(7 * 86_400),
                "1s to 7d",
            ),
            (
                "error_window",
                self.error_window,
                secs(1),
                secs(86_400),
                "1s to 24h",
            ),
        ] {
            if value.get() < low || value.get() > high {
                problem(
                    format!("{key}.{field}"),
                    format!("{value} is out of range; valid: {range}"),
                );
            }
        }
        if !(self.error_rate > 0.0 && self.error_rate <= 1.0) {
            problem(
                format!("{key}.error_rate"),
                format!(
                    "{} is out of range; valid: above 0.0, up to 1.0",
                    self.error_rate
                ),
            );
        }
        if !(1..=100_000).contains(&self.min_calls) {
            problem(
                format!("{key}.min_calls"),
                format!("{} is out of range; valid: 1 to 100000", self.min_calls),
            );
        }
    }
}

impl WatchdogConfig {
    /// The thresholds of an agent with `overrides`.
    pub fn thresholds(&self, overrides: &ThresholdOverrides) -> Thresholds {
        Thresholds {
            queue_depth: overrides.queue_depth.unwrap_or(self.queue_depth),
            scale_up_after: overrides.scale_up_after.unwrap_or(self.scale_up_after),
            scale_down_after: overrides.scale_down_after.unwrap_or(self.scale_down_after),
            stuck_after: overrides.stuck_after.unwrap_or(self.stuck_after),
            error_rate: overrides.error_rate.unwrap_or(self.error_rate),
            error_window: overrides.error_window.unwrap_or(self.error_window),
            min_calls: overrides.min_calls.unwrap_or(self.min_calls),
        }
    }

    pub(super) fn validate(&self, problem: &mut impl FnMut(String, String)) {
        let interval = self.interval.get();
        if interval < std::time::Duration::from_secs(1)
            || interval > std::time::Duration::from_secs(600)
        {
            problem(
                "watchdog.interval".into(),
                format!("{} is out of range; valid: 1s to 10m", self.interval),
            );
        }
        self.thresholds(&ThresholdOverrides::default())
            .validate("watchdog", problem);
    }
}
