//! Telling humans: events (breaker transitions, escalations, level
//! changes, failed agents) delivered to the sinks of `[[notify]]`: the log,
//! a webhook (JSON POST with a Slack-compatible `text`), or a command (the
//! event JSON on its stdin).
//!
//! Delivery never holds up the fleet: events go into a bounded queue per
//! sink, each sink has its own task, and every attempt is bounded by the
//! sink's timeout, with a bounded number of retries. When a sink's queue is
//! full (its endpoint is down), its oldest waiting event is dropped and
//! counted: the newest tell what is happening now.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::clock::UnixMillis;
use crate::config::{NotifyConfig, SinkKind};

/// Events waiting per sink; past it the oldest are dropped.
const SINK_QUEUE: usize = 1024;
/// Longest stdout/stderr kept from a notification command (discarded).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A circuit breaker opened.
    BreakerOpened,
    /// A circuit breaker let probes through.
    BreakerHalfOpen,
    /// A circuit breaker closed again.
    BreakerClosed,
    /// A task was handed to a human.
    Escalation,
    /// The degradation level changed.
    LevelChanged,
    /// An agent restarted too often and was given up on.
    AgentFailed,
    /// A replica was lost (crashed or killed); its manager is told.
    ReplicaLost,
    /// The fleet watchdog acted: added, removed or restarted a replica.
    Watchdog,
    /// The fleet watchdog saw an agent's error rate over its threshold.
    ErrorRate,
    /// A post-accept watch saw a breach; the task's changes were rolled
    /// back.
    WatchBreach,
    /// An operator injected a fault (`flotilla chaos`).
    Chaos,
    /// A replica restarted (only live followers get it: too frequent for
    /// sinks).
    ReplicaRestarted,
}

impl EventKind {
    /// Its name in config and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BreakerOpened => "breaker_opened",
            Self::BreakerHalfOpen => "breaker_half_open",
            Self::BreakerClosed => "breaker_closed",
            Self::Escalation => "escalation",
            Self::LevelChanged => "level_changed",
            Self::AgentFailed => "agent_failed",
            Self::ReplicaLost => "replica_lost",
            Self::Watchdog => "watchdog",
            Self::ErrorRate => "error_rate",
            Self::WatchBreach => "watch_breach",
            Self::Chaos => "chaos",
            Self::ReplicaRestarted => "replica_restarted",
        }
    }
}

/// One event, as sinks receive it (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    /// What happened.
    pub event: EventKind,
    /// When.
    pub at_ms: UnixMillis,
    /// The daemon that saw it.
    pub daemon: String,
    /// The agent concerned, if one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The task concerned, if one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The degradation level after the event, for level changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<u8>,
    /// Whether a human should act now (escalations, level 3, failed
    /// agents).
    pub urgent: bool,
    /// One line for humans; Slack and compatible webhooks show it.
    pub text: String,
    /// Structured details for programs (e.g. a lost replica's tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// Sends events to the configured sinks, and to live followers (the
/// dashboard's event feed).
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    sinks: Vec<SinkHandle>,
    daemon: String,
    /// Live followers; a slow one misses events rather than holding
    /// anything up.
    live: Option<tokio::sync::broadcast::Sender<Event>>,
}

/// Events a live follower may fall behind by before it misses some.
const LIVE_EVENTS: usize = 256;

#[derive(Debug, Clone)]
struct SinkHandle {
    events: Option<Vec<EventKind>>,
    queue: Arc<SinkQueue>,
    counted: Counted,
}

/// Where a sink's outcomes are counted: its counts, and the metrics under
/// its name (or place in the config) and kind.
#[derive(Clone)]
struct Counted {
    stats: Arc<SinkStats>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Its name, else its place in the config.
    label: String,
    kind: &'static str,
}

impl std::fmt::Debug for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted")
            .field("stats", &self.stats)
            .field("label", &self.label)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Counted {
    fn count(&self, outcome: &str) {
        let counter = match outcome {
            "delivered" => &self.stats.delivered,
            "failed" => &self.stats.failed,
            _ => &self.stats.dropped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(metrics) = &self.metrics {
            metrics.notification(&self.label, self.kind, outcome);
        }
    }
}

/// Counts of one sink, for status and tests.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Events delivered.
    pub delivered: AtomicU64,
    /// Events given up on after the retries.
    pub failed: AtomicU64,
    /// Events dropped because the sink's queue was full.
    pub dropped: AtomicU64,
    /// Events queued or being delivered.
    pub pending: AtomicU64,
}

impl Notifier {
    /// Starts one delivery task per sink of `config`; commands run in
    /// `workdir` (the config file's directory); outcomes are counted in
    /// `metrics`. Without sinks, events are only logged by their source.
    pub fn start(
        config: &[NotifyConfig],
        daemon: &str,
        workdir: &Path,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Self {
        let sinks = config
            .iter()
            .enumerate()
            .map(|(index, sink)| {
                let queue = Arc::new(SinkQueue::default());
                let counted = Counted {
                    stats: Arc::new(SinkStats::default()),
                    metrics: metrics.clone(),
                    label: sink.label(index),
                    kind: match sink.kind {
                        SinkKind::Log => "log",
                        SinkKind::Webhook => "webhook",
                        SinkKind::Command => "command",
                    },
                };
                // Every outcome exported from the start, at 0: a series
                // that appears at 1 shows Prometheus no increase, and a
                // sink's first failures would not alert.
                if let Some(metrics) = &metrics {
                    for outcome in ["delivered", "failed", "dropped"] {
                        metrics.notification_series(&counted.label, counted.kind, outcome);
                    }
                }
                tokio::spawn(deliver(
                    sink.clone(),
                    workdir.to_path_buf(),
                    queue.clone(),
                    counted.clone(),
                ));
                SinkHandle {
                    events: sink.events.clone(),
                    queue,
                    counted,
                }
            })
            .collect();
        Self {
            sinks,
            daemon: daemon.to_string(),
            live: Some(tokio::sync::broadcast::channel(LIVE_EVENTS).0),
        }
    }

    /// Tells only the live followers (the dashboard's feed), not the sinks.
    pub fn announce(&self, mut event: Event) {
        event.daemon.clone_from(&self.daemon);
        if let Some(live) = &self.live {
            let _ = live.send(event);
        }
    }

    /// Follows every event sent from now on.
    pub fn follow(&self) -> Option<tokio::sync::broadcast::Receiver<Event>> {
        self.live
            .as_ref()
            .map(tokio::sync::broadcast::Sender::subscribe)
    }

    /// A notifier without sinks.
    pub fn none() -> Self {
        Self::default()
    }

    /// Queues `event` for every sink that wants it; never waits.
    pub fn send(&self, mut event: Event) {
        event.daemon.clone_from(&self.daemon);
        if let Some(live) = &self.live {
            // No follower is fine.
            let _ = live.send(event.clone());
        }
        for sink in &self.sinks {
            if sink
                .events
                .as_ref()
                .is_some_and(|wanted| !wanted.contains(&event.event))
            {
                continue;
            }
            sink.counted.stats.pending.fetch_add(1, Ordering::Relaxed);
            if sink.queue.push(event.clone()) {
                // The oldest waiting event made room: it is not delivered.
                sink.counted.stats.pending.fetch_sub(1, Ordering::Relaxed);
                sink.counted.count("dropped");
                let dropped = sink.counted.stats.dropped.load(Ordering::Relaxed);
                if dropped.is_power_of_two() {
                    tracing::warn!(
                        sink = %sink.counted.label,
                        dropped,
                        "a notification sink is not keeping up; events dropped"
                    );
                }
            }
        }
    }

    /// Waits, up to `limit`, until every event queued so far is delivered
    /// or given up on (the daemon's last events, raised as it stops, must
    /// not vanish with it). Returns how many are left.
    pub async fn drain(&self, limit: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left: u64 = self
                .sinks
                .iter()
                .map(|sink| sink.counted.stats.pending.load(Ordering::Relaxed))
                .sum();
            if left == 0 || tokio::time::Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The counts of each sink, in config order.
    pub fn stats(&self) -> Vec<Arc<SinkStats>> {
        self.sinks
            .iter()
            .map(|sink| sink.counted.stats.clone())
            .collect()
    }
}

impl Event {
    /// An event at `at_ms` (the daemon's name is filled in when sent).
    pub fn new(event: EventKind, at_ms: UnixMillis, urgent: bool, text: String) -> Self {
        Self {
            event,
            at_ms,
            daemon: String::new(),
            agent: None,
            task: None,
            level: None,
            urgent,
            text,
            details: None,
        }
    }

    /// With structured details.
    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// With the agent concerned.
    pub fn agent(mut self, agent: &str) -> Self {
        self.agent = Some(agent.to_string());
        self
    }

    /// With the task concerned.
    pub fn task(mut self, task: &str) -> Self {
        self.task = Some(task.to_string());
        self
    }

    /// With the level after a change.
    pub fn level(mut self, level: u8) -> Self {
        self.level = Some(level);
        self
    }
}

/// The events waiting for one sink, at most [`SINK_QUEUE`].
#[derive(Debug, Default)]
struct SinkQueue {
    events: std::sync::Mutex<std::collections::VecDeque<Event>>,
    ready: tokio::sync::Notify,
}

impl SinkQueue {
    /// Adds `event`; returns whether the oldest waiting one was dropped
    /// to make room.
    fn push(&self, event: Event) -> bool {
        let dropped = {
            let mut events = self.events.lock().expect("not poisoned");
            let full = events.len() >= SINK_QUEUE;
            if full {
                events.pop_front();
            }
            events.push_back(event);
            full
        };
        self.ready.notify_one();
        dropped
    }

    /// The oldest waiting event, when there is one.
    async fn pop(&self) -> Event {
        loop {
            if let Some(event) = self.events.lock().expect("not poisoned").pop_front() {
                return event;
            }
            self.ready.notified().await;
        }
    }
}

/// Takes one event off its sink's pending count when dropped.
struct Pending<'a>(&'a AtomicU64);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Delivers the events of one sink, one at a time, with bounded retries.
async fn deliver(sink: NotifyConfig, workdir: PathBuf, events: Arc<SinkQueue>, counted: Counted) {
    let client = match sink.kind {
        // No redirects: a 301 or 302 would turn the POST into a GET that
        // answers 200, counted as delivered while nothing was.
        SinkKind::Webhook => reqwest::Client::builder()
            .timeout(sink.timeout.get())
            .connect_timeout(sink.timeout.get())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .ok(),
        _ => None,
    };
    loop {
        let event = events.pop().await;
        let mut attempt = 0;
        // Counted out however this event ends.
        let _pending = Pending(&counted.stats.pending);
        loop {
            let result = match sink.kind {
                SinkKind::Log => {
                    tracing::warn!(
                        event = event.event.as_str(),
                        agent = event.agent.as_deref().unwrap_or("-"),
                        task = event.task.as_deref().unwrap_or("-"),
                        urgent = event.urgent,
                        "notification: {}",
                        event.text
                    );
                    Ok(())
                }
                SinkKind::Webhook => match &client {
                    Some(client) => post(client, &sink, &event).await,
                    None => Err("the HTTP client could not be built".to_string()),
                },
                SinkKind::Command => run(&sink, &workdir, &event).await,
            };
            match result {
                Ok(()) => {
                    counted.count("delivered");
                    break;
                }
                Err(error) if attempt < sink.retries => {
                    attempt += 1;
                    let pause = Duration::from_millis(250 * 2u64.pow(attempt.min(6)));
                    tracing::warn!(sink = %counted.label, kind = ?sink.kind, %error, attempt, ?pause, "notification failed; retrying");
                    tokio::time::sleep(pause).await;
                }
                Err(error) => {
                    counted.count("failed");
                    tracing::error!(sink = %counted.label, kind = ?sink.kind, %error, event = event.event.as_str(), "notification failed; giving up on it");
                    break;
                }
            }
        }
    }
}

async fn post(client: &reqwest::Client, sink: &NotifyConfig, event: &Event) -> Result<(), String> {
    let url = sink.url.as_deref().unwrap_or_default();
    let body = serde_json::to_vec(event).expect("events serialize");
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        // The URL may carry a secret (Slack's do): never log it.
        .map_err(|error| format!("POST to the webhook failed: {}", error.without_url()))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the webhook answered {status}"))
    }
}

/// flotilla's own secrets, kept from notification commands.
const SECRETS: [&str; 3] = [
    "FLOTILLA_HTTP_TOKEN",
    "FLOTILLA_BROKER_PASSWORD",
    "FLOTILLA_BROKER_TOKEN",
];

/// What a notification command inherits of the daemon's environment
/// `vars`: all of it but flotilla's own secrets, and variables that are
/// not UTF-8 (which a process cannot be given here).
fn inherited_env(
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Vec<(String, String)> {
    vars.filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .filter(|(name, _)| !SECRETS.contains(&name.as_str()))
        .collect()
}

async fn run(sink: &NotifyConfig, workdir: &Path, event: &Event) -> Result<(), String> {
    let program = sink.command.first().cloned().unwrap_or_default();
    let mut line = serde_json::to_vec(event).expect("events serialize");
    line.push(b'\n');
    // In its own process group, killed with it at the timeout (a hung
    // `curl` of a `sh -c` no longer outlives its attempt), and judged by
    // its own exit (a process it leaves in the background holding stderr
    // does not turn a delivery into a timeout, and a retry).
    let spec = crate::supervisor::process::SpawnSpec {
        argv: sink.command.clone(),
        env: inherited_env(std::env::vars_os()),
        workdir: workdir.to_path_buf(),
    };
    let ran =
        crate::command::run_with_input(spec, Some(line), sink.timeout.get(), MAX_RESPONSE_BYTES)
            .await?;
    match ran.status {
        None => Err(format!("{program} did not finish within {}", sink.timeout)),
        Some(status) if status.success() => Ok(()),
        Some(status) => Err(format!("{program} exited with {status}: {}", ran.output)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_inherit_the_environment_without_secrets_or_bytes() {
        use std::os::unix::ffi::OsStringExt as _;
        let vars = [
            ("SLACK_URL", b"https://hooks".to_vec()),
            ("FLOTILLA_HTTP_TOKEN", b"secret".to_vec()),
            ("FLOTILLA_BROKER_PASSWORD", b"secret".to_vec()),
            ("LATIN1", b"caf\xe9".to_vec()),
        ]
        .into_iter()
        .map(|(name, value)| (name.into(), std::ffi::OsString::from_vec(value)));
        assert_eq!(
            inherited_env(vars),
            [("SLACK_URL".to_string(), "https://hooks".to_string())]
        );
    }

    fn sink(command: &[&str]) -> NotifyConfig {
        NotifyConfig {
            name: None,
            kind: SinkKind::Command,
            url: None,
            command: command.iter().map(|arg| (*arg).to_string()).collect(),
            timeout: crate::config::HumanDuration::secs(5),
            retries: 0,
            events: None,
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_its_oldest_event() {
        let queue = SinkQueue::default();
        let event = |n: usize| Event::new(EventKind::AgentFailed, 1, false, n.to_string());
        for n in 0..SINK_QUEUE {
            assert!(!queue.push(event(n)));
        }
        assert!(queue.push(event(SINK_QUEUE)), "full: the oldest goes");
        assert_eq!(queue.pop().await.text, "1");
        let mut last = String::new();
        for _ in 1..SINK_QUEUE {
            last = queue.pop().await.text;
        }
        assert_eq!(last, SINK_QUEUE.to_string(), "the newest is kept");
    }

    #[tokio::test]
    async fn outcomes_are_counted_in_the_metrics_by_sink() {
        let metrics = Arc::new(crate::metrics::Metrics::new(false));
        let dir = tempfile::tempdir().unwrap();
        let named = NotifyConfig {
            name: Some("pager".into()),
            ..sink(&["false"])
        };
        let notifier = Notifier::start(
            &[sink(&["true"]), named],
            "d",
            dir.path(),
            Some(metrics.clone()),
        );
        notifier.send(Event::new(EventKind::AgentFailed, 1, true, "x".into()));
        let stats = notifier.stats();
        for _ in 0..500 {
            if stats[0].delivered.load(Ordering::Relaxed) == 1
                && stats[1].failed.load(Ordering::Relaxed) == 1
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(notifier.drain(Duration::from_secs(10)).await, 0);
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"flotilla_notifications_total{sink="0",kind="command",outcome="delivered"} 1"#
            ) && text.contains(
                r#"flotilla_notifications_total{sink="pager",kind="command",outcome="failed"} 1"#
            ) && text.contains(
                r#"flotilla_notifications_total{sink="0",kind="command",outcome="failed"} 0"#
            ),
            "exported at 0 before any failure: {text}"
        );
    }
}
