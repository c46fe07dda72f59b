//! Degradation levels: the fleet's answer to losing parts of itself.
//!
//! | level | name | behaviour |
//! |---|---|---|
//! | 0 | nominal | everything runs |
//! | 1 | reduced | an unavailable agent's tasks go to its fallback agents |
//! | 2 | essential | only `high` and `critical` tasks are dispatched |
//! | 3 | emergency | only `critical` tasks are dispatched; humans are alerted |
//!
//! The [`Degrader`] is a state machine on passed-in time: each check it is
//! shown an [`Observation`] of the fleet, finds the highest level whose
//! triggers hold, and moves there with hysteresis: up at once, down only
//! after the higher level's triggers have been clear for `min_dwell` and the
//! level has been held at least `min_dwell`. An operator may force a level
//! for a while; a forced level replaces the computed one until it ends.

use std::collections::HashMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::clock::UnixMillis;
use crate::config::{DegradationConfig, Trigger};
use crate::queue::Priority;

/// How long an agent without a ready replica takes to count as
/// unavailable.
pub const UNREADY_GRACE_MS: UnixMillis = 10_000;

/// A degradation level.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// 0: everything runs.
    #[default]
    Nominal,
    /// 1: unavailable agents' tasks go to their fallback agents.
    Reduced,
    /// 2: only `high` and `critical` tasks are dispatched.
    Essential,
    /// 3: only `critical` tasks are dispatched; humans are alerted.
    Emergency,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Self; 4] = [
        Self::Nominal,
        Self::Reduced,
        Self::Essential,
        Self::Emergency,
    ];

    /// 0 to 3.
    pub fn number(self) -> u8 {
        self as u8
    }

    /// The level numbered `number` (0 to 3).
    pub fn from_number(number: u8) -> Option<Self> {
        Self::ALL.get(usize::from(number)).copied()
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nominal => "nominal",
            Self::Reduced => "reduced",
            Self::Essential => "essential",
            Self::Emergency => "emergency",
        }
    }

    /// The least urgent priority dispatched at this level.
    pub fn lowest_priority(self) -> Priority {
        match self {
            Self::Nominal | Self::Reduced => Priority::Low,
            Self::Essential => Priority::High,
            Self::Emergency => Priority::Critical,
        }
    }

    /// Whether unavailable agents' tasks go to their fallback agents even
    /// when their breaker is closed (no ready replica).
    pub fn reroutes_unready(self) -> bool {
        self >= Self::Reduced
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.number(), self.as_str())
    }
}

/// Whether a breaker in `state` makes its agent unavailable to the
/// degrader: open only. Half-open, it is being probed; an agent that gets
/// no task stays half-open, and counting that as open would hold the
/// whole fleet at a raised level for as long as the agent is idle. A
/// failed probe opens it again.
pub fn breaker_holds_back(state: Option<crate::breaker::BreakerState>) -> bool {
    state == Some(crate::breaker::BreakerState::Open)
}

/// One agent as the degrader sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentView {
    /// Name.
    pub name: String,
    /// `critical = true` in its config.
    pub critical: bool,
    /// Its breaker is open (see [`breaker_holds_back`]).
    pub breaker_open: bool,
    /// It failed (too many restarts).
    pub failed: bool,
    /// Replicas ready (idle or busy).
    pub ready: u32,
    /// Replicas failing: restarting after a crash, stopped, or starting
    /// for longer than [`UNREADY_GRACE_MS`] (a replica that is just
    /// starting, as all are when the daemon starts, is not failing).
    pub failing: u32,
    /// Replicas configured.
    pub replicas: u32,
}

/// What the fleet looks like at one check.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// The agents this daemon runs.
    pub agents: Vec<AgentView>,
    /// Whether the broker connection is up (`None` without a broker).
    pub broker_connected: Option<bool>,
    /// Nodes of the broker cluster that are current (`None` when unknown).
    pub broker_nodes: Option<u32>,
}

/// A level forced by an operator until `until_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Forced {
    /// The level.
    pub level: Level,
    /// When it ends.
    pub until_ms: UnixMillis,
}

impl Forced {
    /// The level `level` (0-3 or its name) forced for `duration` (more
    /// than 0s, up to 7d) from `now`.
    ///
    /// # Errors
    /// What is wrong and what would be valid.
    pub fn parse(level: &str, duration: &str, now: UnixMillis) -> Result<Self, String> {
        let parsed = level
            .parse::<u8>()
            .ok()
            .and_then(Level::from_number)
            .or_else(|| Level::ALL.into_iter().find(|l| l.as_str() == level));
        let Some(level) = parsed else {
            return Err(format!(
                "unknown level {level:?}; valid: 0 (nominal), 1 (reduced), 2 (essential), 3 (emergency)"
            ));
        };
        let duration = crate::config::HumanDuration::parse_within(
            duration,
            "duration",
            std::time::Duration::from_secs(7 * 86_400),
        )?;
        Ok(Self {
            level,
            until_ms: now.saturating_add(duration.as_millis()),
        })
    }
}

/// A change of level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LevelChange {
    /// The level left.
    pub from: Level,
    /// The level entered.
    pub to: Level,
    /// When.
    pub at_ms: UnixMillis,
    /// Why, in words.
    pub reason: String,
}

/// The degradation state shown by `status`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct DegradationStatus {
    /// The current level.
    pub level: Level,
    /// Since when.
    pub since_ms: UnixMillis,
    /// Why it is at this level.
    pub reason: Option<String>,
    /// The level an operator forced, and until when.
    pub forced: Option<Forced>,
    /// Agents counted unavailable at the last check.
    pub unavailable: Vec<String>,
    /// The triggers ask for a lower level: when the level drops if they
    /// stay clear (`min_dwell`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower_at_ms: Option<UnixMillis>,
}

impl DegradationStatus {
    /// This status as it leaves the daemon: the degrader's steady times in
    /// wall time (see [`crate::clock::Clock::steady_ms`]).
    pub fn on_wall(mut self, clock: &dyn crate::clock::Clock) -> Self {
        self.since_ms = clock.wall_of(self.since_ms);
        self.lower_at_ms = self.lower_at_ms.map(|at| clock.wall_of(at));
        if let Some(forced) = &mut self.forced {
            forced.until_ms = clock.wall_of(forced.until_ms);
        }
        self
    }
}

/// The degradation state machine.
#[derive(Debug, Clone)]
pub struct Degrader {
    config: DegradationConfig,
    level: Level,
    since_ms: UnixMillis,
    reason: Option<String>,
    /// Since when the triggers have asked for less than the current level.
    calmer_since: Option<UnixMillis>,
    /// The highest level the triggers asked for since `calmer_since`: the
    /// level goes down to it, not below, so that each level's triggers
    /// must have been clear for the dwell before it is left.
    calm_ceiling: Level,
    /// Since when each agent has had no ready replica.
    unready_since: HashMap<String, UnixMillis>,
    unavailable: Vec<String>,
    forced: Option<Forced>,
}

impl Degrader {
    /// A degrader at level 0 since `now`.
    pub fn new(config: DegradationConfig, now: UnixMillis) -> Self {
        Self {
            config,
            level: Level::Nominal,
            since_ms: now,
            reason: None,
            calmer_since: None,
            calm_ceiling: Level::Nominal,
            unready_since: HashMap::new(),
            unavailable: Vec::new(),
            forced: None,
        }
    }

    /// The current level.
    pub fn level(&self) -> Level {
        self.level
    }

    /// Agents unavailable at the last check.
    pub fn unavailable(&self) -> &[String] {
        &self.unavailable
    }

    /// What `status` shows.
    pub fn status(&self) -> DegradationStatus {
        DegradationStatus {
            level: self.level,
            since_ms: self.since_ms,
            reason: self.reason.clone(),
            forced: self.forced,
            unavailable: self.unavailable.clone(),
            lower_at_ms: self.calmer_since.map(|calmer_since| {
                calmer_since.max(self.since_ms) + self.config.min_dwell.as_millis()
            }),
        }
    }

    /// Looks at the fleet at `now`, with the operator's forced level if
    /// any; returns the change of level it caused.
    pub fn check(
        &mut self,
        observation: &Observation,
        forced: Option<Forced>,
        now: UnixMillis,
    ) -> Option<LevelChange> {
        self.track_readiness(observation, now);
        let (target, why) = self.wanted(observation, now);
        let forced = forced.filter(|forced| now < forced.until_ms);
        let was_forced = self.forced.take();
        if let Some(forced) = forced {
            self.forced = Some(forced);
            self.calmer_since = None;
            let reason = format!(
                "forced by an operator for {}",
                humantime::format_duration(std::time::Duration::from_secs(
                    forced.until_ms.saturating_sub(now).div_ceil(1000)
                ))
            );
            return self.enter(forced.level, now, reason);
        }
        if was_forced.is_some() {
            // The operator's level ended: the triggers decide at once.
            let reason = why.unwrap_or_else(|| "the forced level ended".into());
            return self.enter(target, now, reason);
        }
        if target > self.level {
            self.calmer_since = None;
            return self.enter(target, now, why.unwrap_or_default());
        }
        if target == self.level {
            self.calmer_since = None;
            if why.is_some() {
                self.reason = why;
            }
            return None;
        }
        let dwell = self.config.min_dwell.as_millis();
        if self.calmer_since.is_none() {
            self.calm_ceiling = target;
        }
        let calmer_since = *self.calmer_since.get_or_insert(now);
        self.calm_ceiling = self.calm_ceiling.max(target);
        let held = now.saturating_sub(self.since_ms);
        if now.saturating_sub(calmer_since) < dwell || held < dwell {
            return None;
        }
        self.calmer_since = None;
        let dwelt = humantime::format_duration(self.config.min_dwell.get());
        let (level, reason) = if self.calm_ceiling > target {
            // A level between asked for within the dwell: down to it
            // first, and on from there after another dwell.
            (
                self.calm_ceiling,
                format!("no trigger above {} held for {dwelt}", self.calm_ceiling),
            )
        } else {
            (
                target,
                why.unwrap_or_else(|| format!("no trigger held for {dwelt}")),
            )
        };
        self.enter(level, now, reason)
    }

    fn enter(&mut self, level: Level, now: UnixMillis, reason: String) -> Option<LevelChange> {
        if level == self.level {
            self.reason = Some(reason);
            return None;
        }
        let change = LevelChange {
            from: self.level,
            to: level,
            at_ms: now,
            reason: reason.clone(),
        };
        self.level = level;
        self.since_ms = now;
        self.reason = Some(reason);
        Some(change)
    }

    fn track_readiness(&mut self, observation: &Observation, now: UnixMillis) {
        for agent in &observation.agents {
            if agent.ready > 0 {
                self.unready_since.remove(&agent.name);
            } else {
                self.unready_since.entry(agent.name.clone()).or_insert(now);
            }
        }
        self.unready_since
            .retain(|name, _| observation.agents.iter().any(|agent| &agent.name == name));
        self.unavailable = observation
            .agents
            .iter()
            .filter(|agent| self.is_unavailable(agent, now))
            .map(|agent| agent.name.clone())
            .collect();
    }

    fn unready_for(&self, agent: &str, now: UnixMillis) -> Option<UnixMillis> {
        self.unready_since
            .get(agent)
            .map(|since| now.saturating_sub(*since))
    }

    fn is_unavailable(&self, agent: &AgentView, now: UnixMillis) -> bool {
        agent.breaker_open
            || agent.failed
            || self
                .unready_for(&agent.name, now)
                .is_some_and(|unready| unready >= UNREADY_GRACE_MS)
    }

    /// The highest level whose triggers hold, with the first reason.
    fn wanted(&self, observation: &Observation, now: UnixMillis) -> (Level, Option<String>) {
        for (level, config) in [
            (Level::Emergency, &self.config.emergency),
            (Level::Essential, &self.config.essential),
            (Level::Reduced, &self.config.reduced),
        ] {
            if let Some(reason) = config
                .triggers
                .iter()
                .find_map(|trigger| self.holds(trigger, observation, now))
            {
                return (level, Some(reason));
            }
        }
        (Level::Nominal, None)
    }

    /// Why `trigger` holds, if it does.
    fn holds(
        &self,
        trigger: &Trigger,
        observation: &Observation,
        now: UnixMillis,
    ) -> Option<String> {
        let agent = |name: &str| observation.agents.iter().find(|agent| agent.name == name);
        match trigger {
            Trigger::BreakerOpen { agent: name } => agent(name)
                .filter(|agent| agent.breaker_open)
                .map(|_| format!("the circuit breaker of {name} is open")),
            Trigger::AgentUnresponsive {
                agent: name,
                duration,
            } => self
                .unready_for(name, now)
                .filter(|unready| *unready >= duration.as_millis())
                .map(|_| format!("{name} has had no ready replica for {duration}")),
            Trigger::AgentsUnavailable { at_least } => {
                let count = self.unavailable.len();
                (count >= *at_least as usize).then(|| {
                    format!(
                        "{count} agents are unavailable ({})",
                        self.unavailable.join(", ")
                    )
                })
            }
            Trigger::BrokerUnreachable {} => (observation.broker_connected == Some(false))
                .then(|| "the broker is unreachable".to_string()),
            Trigger::BrokerNodesBelow { nodes } => observation
                .broker_nodes
                .filter(|current| current < nodes)
                .map(|current| {
                    format!("the broker cluster has {current} of at least {nodes} nodes")
                }),
            Trigger::ReplicasFailing { above } => {
                let total: u32 = observation.agents.iter().map(|agent| agent.replicas).sum();
                let failing: u32 = observation.agents.iter().map(|agent| agent.failing).sum();
                let fraction = f64::from(failing.min(total)) / f64::from(total.max(1));
                (total > 0 && fraction > *above).then(|| {
                    format!(
                        "{failing} of {total} replicas are failing ({:.0}% > {:.0}%)",
                        fraction * 100.0,
                        above * 100.0
                    )
                })
            }
            Trigger::CriticalAgentUnavailable {} => observation
                .agents
                .iter()
                .find(|agent| agent.critical && self.unavailable.contains(&agent.name))
                .map(|agent| format!("critical agent {} is unavailable", agent.name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HumanDuration, LevelConfig};

    #[test]
    fn only_an_open_breaker_holds_its_agent_back() {
        use crate::breaker::BreakerState;
        assert!(breaker_holds_back(Some(BreakerState::Open)));
        // Half-open: probing; an idle agent stays so indefinitely.
        assert!(!breaker_holds_back(Some(BreakerState::HalfOpen)));
        assert!(!breaker_holds_back(Some(BreakerState::Closed)));
        assert!(!breaker_holds_back(None), "no breaker");
    }

    fn view(name: &str, ready: u32) -> AgentView {
        AgentView {
            name: name.into(),
            critical: false,
            breaker_open: false,
            failed: false,
            ready,
            failing: 2 - ready,
            replicas: 2,
        }
    }

    fn config() -> DegradationConfig {
        DegradationConfig {
            min_dwell: HumanDuration::secs(30),
            reduced: LevelConfig {
                triggers: vec![Trigger::BreakerOpen {
                    agent: "backend".into(),
                }],
            },
            essential: LevelConfig {
                triggers: vec![Trigger::AgentsUnavailable { at_least: 2 }],
            },
            emergency: LevelConfig {
                triggers: vec![Trigger::BrokerUnreachable {}],
            },
            ..DegradationConfig::default()
        }
    }

    fn fleet(backend_open: bool, frontend_failed: bool) -> Observation {
        let mut backend = view("backend", 2);
        backend.breaker_open = backend_open;
        let mut frontend = view("frontend", 2);
        frontend.failed = frontend_failed;
        Observation {
            agents: vec![backend, frontend],
            broker_connected: Some(true),
            broker_nodes: Some(3),
        }
    }

    #[test]
    fn up_at_once_down_after_the_dwell() {
        let mut degrader = Degrader::new(config(), 0);
        assert!(degrader.check(&fleet(false, false), None, 1_000).is_none());
        let up = degrader
            .check(&fleet(true, false), None, 2_000)
            .expect("up");
        assert_eq!((up.from, up.to), (Level::Nominal, Level::Reduced));
        assert_eq!(up.reason, "the circuit breaker of backend is open");
        let up = degrader.check(&fleet(true, true), None, 3_000).expect("up");
        assert_eq!(up.to, Level::Essential);
        assert!(
            up.reason.contains("2 agents are unavailable"),
            "{}",
            up.reason
        );
        assert_eq!(degrader.status().lower_at_ms, None);
        // Calm again: held for min_dwell first, and status says when.
        assert!(degrader.check(&fleet(false, false), None, 4_000).is_none());
        assert_eq!(degrader.status().lower_at_ms, Some(34_000));
        assert!(degrader.check(&fleet(false, false), None, 33_999).is_none());
        let down = degrader
            .check(&fleet(false, false), None, 34_000)
            .expect("down after 30 s calm");
        assert_eq!((down.from, down.to), (Level::Essential, Level::Nominal));
        assert_eq!(degrader.status().lower_at_ms, None);
    }

    /// From emergency, with the essential triggers clear only lately:
    /// down to essential after the dwell, and on only once those have been
    /// clear for the dwell too.
    #[test]
    fn each_level_left_is_clear_for_the_dwell() {
        let mut degrader = Degrader::new(config(), 0);
        let mut unreachable = fleet(false, true);
        unreachable.broker_connected = Some(false);
        // Two agents unavailable (frontend failed, backend unready): the
        // essential trigger holds; the broker down: emergency.
        unreachable.agents[0].ready = 0;
        let mut essential = fleet(false, true);
        essential.agents[0].ready = 0;
        degrader.check(&essential, None, 0);
        assert_eq!(
            degrader.check(&unreachable, None, 11_000).map(|c| c.to),
            Some(Level::Emergency)
        );
        // The broker is back; the agents are not, until 59 s.
        assert!(degrader.check(&essential, None, 12_000).is_none());
        assert!(degrader.check(&essential, None, 40_000).is_none());
        assert!(degrader.check(&fleet(false, false), None, 41_500).is_none());
        let down = degrader
            .check(&fleet(false, false), None, 42_000)
            .expect("down after 30 s without the broker trigger");
        assert_eq!((down.from, down.to), (Level::Emergency, Level::Essential));
        assert!(
            down.reason.contains("no trigger above 2 (essential)"),
            "{}",
            down.reason
        );
        assert!(degrader.check(&fleet(false, false), None, 43_000).is_none());
        assert!(degrader.check(&fleet(false, false), None, 72_999).is_none());
        let down = degrader
            .check(&fleet(false, false), None, 73_000)
            .expect("on down after another dwell");
        assert_eq!((down.from, down.to), (Level::Essential, Level::Nominal));
    }

    #[test]
    fn a_flapping_trigger_does_not_flap_the_level() {
        let mut degrader = Degrader::new(config(), 0);
        degrader.check(&fleet(true, false), None, 0);
        let mut changes = 0;
        for second in 1..100u64 {
            let open = second % 2 == 0;
            changes += usize::from(
                degrader
                    .check(&fleet(open, false), None, second * 1_000)
                    .is_some(),
            );
        }
        assert_eq!(changes, 0, "never calm for 30 s in a row");
        assert_eq!(degrader.level(), Level::Reduced);
    }

    #[test]
    fn a_level_is_held_at_least_the_dwell() {
        let mut degrader = Degrader::new(config(), 0);
        degrader.check(&fleet(true, false), None, 100_000);
        // The trigger clears at once, but the level was entered just now.
        assert!(
            degrader
                .check(&fleet(false, false), None, 100_500)
                .is_none()
        );
        assert!(
            degrader
                .check(&fleet(false, false), None, 129_999)
                .is_none()
        );
        assert!(
            degrader
                .check(&fleet(false, false), None, 130_500)
                .is_some()
        );
    }

    #[test]
    fn a_forced_level_wins_until_it_ends() {
        let mut degrader = Degrader::new(config(), 0);
        let forced = Forced {
            level: Level::Emergency,
            until_ms: 60_000,
        };
        let change = degrader
            .check(&fleet(false, false), Some(forced), 1_000)
            .expect("forced");
        assert_eq!(change.to, Level::Emergency);
        assert!(change.reason.starts_with("forced by an operator"));
        assert_eq!(degrader.status().forced, Some(forced));
        // Forced down while a trigger holds: forced wins.
        let calm = Forced {
            level: Level::Nominal,
            until_ms: 60_000,
        };
        degrader.check(&fleet(true, true), Some(calm), 2_000);
        assert_eq!(degrader.level(), Level::Nominal);
        // When it ends, the triggers decide at once.
        let back = degrader
            .check(&fleet(true, false), Some(calm), 60_000)
            .expect("back to the triggers");
        assert_eq!(back.to, Level::Reduced);
        assert_eq!(degrader.status().forced, None);
    }

    #[test]
    fn every_trigger_kind_holds_when_it_should() {
        let mut degrader = Degrader::new(DegradationConfig::default(), 0);
        let mut observation = fleet(false, false);
        observation.agents[1].ready = 0;
        observation.agents[1].failing = 2;
        observation.agents[1].critical = true;
        degrader.check(&observation, None, 0);
        let holds = |degrader: &Degrader, trigger: Trigger, observation: &Observation, now| {
            degrader.holds(&trigger, observation, now).is_some()
        };
        let unresponsive = Trigger::AgentUnresponsive {
            agent: "frontend".into(),
            duration: HumanDuration::secs(5),
        };
        assert!(!holds(&degrader, unresponsive.clone(), &observation, 4_999));
        assert!(holds(&degrader, unresponsive, &observation, 5_000));
        // Unavailable after the 10 s grace: critical and counted.
        degrader.check(&observation, None, 10_000);
        assert_eq!(degrader.unavailable(), ["frontend"]);
        assert!(holds(
            &degrader,
            Trigger::CriticalAgentUnavailable {},
            &observation,
            10_000
        ));
        assert!(holds(
            &degrader,
            Trigger::AgentsUnavailable { at_least: 1 },
            &observation,
            10_000
        ));
        assert!(holds(
            &degrader,
            Trigger::ReplicasFailing { above: 0.4 },
            &observation,
            10_000
        ));
        assert!(!holds(
            &degrader,
            Trigger::ReplicasFailing { above: 0.5 },
            &observation,
            10_000
        ));
        assert!(holds(
            &degrader,
            Trigger::BrokerNodesBelow { nodes: 4 },
            &observation,
            10_000
        ));
        assert!(!holds(
            &degrader,
            Trigger::BrokerNodesBelow { nodes: 3 },
            &observation,
            10_000
        ));
        observation.broker_connected = Some(false);
        assert!(holds(
            &degrader,
            Trigger::BrokerUnreachable {},
            &observation,
            10_000
        ));
        assert_eq!(Level::Essential.lowest_priority(), Priority::High);
        assert_eq!(Level::Emergency.lowest_priority(), Priority::Critical);
        assert_eq!(Level::Reduced.lowest_priority(), Priority::Low);
    }
}
