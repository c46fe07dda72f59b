//! The fleet's configuration (`flotilla.toml`): its types, defaults, loading
//! and validation.
//!
//! Loading never stops at the first mistake: every problem is collected,
//! each naming its key, the bad value and what would be valid, with the line
//! and column where the file gives them. This module only reads; it never
//! starts anything.

mod load;
pub mod readiness;
pub mod units;
pub mod validation;
pub mod watchdog;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use load::{ConfigError, MAX_FILE_BYTES, MAX_TOKEN_BYTES, Problem, load, parse, read_capped};
pub use readiness::{CheckConfig, Probe, ReadinessConfig};
pub use units::{ByteSize, HumanDuration};
pub use validation::{GateConfig, OnFailure, ValidationConfig, WatchCheck, WatchConfig};
pub use watchdog::{ThresholdOverrides, Thresholds, WatchdogConfig};

/// The whole configuration file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The embedded task store (and the task limits on both backends).
    #[serde(default)]
    pub store: StoreConfig,
    /// A NATS JetStream broker: when present, tasks live there instead of
    /// the embedded store and many daemons can share one fleet.
    #[serde(default)]
    pub broker: Option<BrokerConfig>,
    /// Daemon-wide settings.
    #[serde(default)]
    pub daemon: DaemonConfig,
    /// The fleet: one table per agent, keyed by the agent's name
    /// (letters, digits, `-` and `_`, at most 64 characters).
    #[serde(default)]
    pub agents: BTreeMap<String, AgentConfig>,
    /// Degradation levels: when the fleet gives up less urgent work to keep
    /// the urgent work going.
    #[serde(default)]
    pub degradation: DegradationConfig,
    /// Where events for humans go (`[[notify]]`, any number).
    #[serde(default)]
    pub notify: Vec<NotifyConfig>,
    /// The daemon's HTTP server: health endpoints.
    #[serde(default)]
    pub http: HttpConfig,
    /// The fleet watchdog: scaling, stuck replicas, error rates.
    #[serde(default)]
    pub watchdog: WatchdogConfig,
    /// Limits of agent-to-agent messages (`send`).
    #[serde(default)]
    pub delegation: DelegationConfig,
    /// Chaos experiments against this fleet (off by default).
    #[serde(default)]
    pub chaos: ChaosConfig,
    /// Directory that relative paths are resolved against (the config file's
    /// directory). Not part of the file.
    #[serde(skip)]
    #[schemars(skip)]
    pub base_dir: PathBuf,
}

impl Config {
    /// The agent named `name`.
    pub fn agent(&self, name: &str) -> Option<&AgentConfig> {
        self.agents.get(name)
    }

    /// The store file's absolute path.
    pub fn store_path(&self) -> PathBuf {
        self.resolve(&self.store.path)
    }

    /// `path` resolved against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    /// The names of all agents, comma-separated, for error messages.
    pub fn agent_names(&self) -> String {
        if self.agents.is_empty() {
            return "(none configured)".into();
        }
        self.agents.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// The JSON Schema of the configuration file.
    pub fn schema() -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(Config)).expect("schema serializes")
    }
}

/// `[store]`: where and how tasks are kept.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The SQLite database file, relative to the config file's directory.
    pub path: PathBuf,
    /// A task id submitted again within this window of the first submission
    /// is deduplicated (stored once). A task that is still queued or running
    /// is always deduplicated.
    pub dedup_window: HumanDuration,
    /// Completed tasks older than this are deleted. Dead-lettered tasks are
    /// kept until replayed or purged. Must be at least `dedup_window`.
    pub retention: HumanDuration,
    /// Largest payload accepted at submit.
    pub max_payload_bytes: ByteSize,
    /// Largest result stored for a task; a larger result fails the attempt.
    pub max_result_bytes: ByteSize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("flotilla.db"),
            dedup_window: HumanDuration::secs(24 * 3600),
            retention: HumanDuration::secs(7 * 24 * 3600),
            max_payload_bytes: ByteSize::mib(1),
            max_result_bytes: ByteSize::mib(1),
        }
    }
}

/// `[daemon]`: settings of the `flotilla up` process.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// On SIGTERM/SIGINT, how long in-flight tasks may run to completion
    /// before they are released back to the queue and replicas are stopped.
    pub shutdown_grace: HumanDuration,
    /// How often the daemon writes its status snapshot (read by
    /// `flotilla status`).
    pub status_interval: HumanDuration,
    /// This daemon's name in the fleet (letters, digits, `-`, `_`), unique
    /// among the daemons sharing a broker. Default: the host name.
    pub name: Option<String>,
    /// Run only these agents (default: all). Daemons on other machines run
    /// the rest; tasks of agents no daemon runs stay queued.
    pub agents: Option<Vec<String>>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            shutdown_grace: HumanDuration::secs(30),
            status_interval: HumanDuration::secs(1),
            name: None,
            agents: None,
        }
    }
}

/// Broker URLs (several, separated by commas, as `broker.url` takes
/// them), each as [`redact_url`] shows it.
pub fn redact_urls(urls: &str) -> String {
    urls.split(',')
        .map(|one| redact_url(one.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

/// `url` without what may be a secret in it, for logs, health answers,
/// status and errors: whatever comes before an `@` (user, password,
/// token) and the query become `***`: `nats://***@broker:4222`,
/// `http://model:8080/health?***`. Errs on hiding too much: an `@`
/// anywhere after the scheme counts, parsed or not.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url
        .split_once("://")
        .map_or(("", url), |(scheme, rest)| (scheme, rest));
    let (secret, rest) = match rest.rfind('@') {
        Some(at) => (true, &rest[at + 1..]),
        None => (false, rest),
    };
    // The query (and fragment) may hold a key.
    let rest = match rest.find(['?', '#']) {
        Some(at) => format!("{}?***", &rest[..at]),
        None => rest.to_string(),
    };
    let credentials = if secret { "***@" } else { "" };
    if scheme.is_empty() {
        format!("{credentials}{rest}")
    } else {
        format!("{scheme}://{credentials}{rest}")
    }
}

/// `[broker]`: the NATS JetStream backend.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Server URL, or several separated by commas, e.g.
    /// `"nats://10.0.0.1:4222,nats://10.0.0.2:4222"`.
    pub url: String,
    /// Prefix of every stream, bucket and subject flotilla uses, so that
    /// several fleets can share one NATS account (lower-case letters,
    /// digits, `-`, `_`).
    pub namespace: String,
    /// Copies of each stream and bucket kept by the cluster: 1, or 3 on a
    /// cluster of at least three servers.
    pub replicas: u32,
    /// How long the broker waits for an acknowledgement before it hands a
    /// task to another daemon. Kept alive while the agent makes progress,
    /// so it bounds how long a dead daemon's tasks wait, not how long a
    /// task may run.
    pub ack_wait: HumanDuration,
    /// The broker remembers message ids this long, so that a submit retried
    /// after a timeout is stored once. Longer ids are deduplicated through
    /// the task records (`store.dedup_window`).
    pub duplicate_window: HumanDuration,
    /// How long a daemon's entry in the fleet table outlives its last
    /// heartbeat: `status` drops daemons not heard from for this long.
    pub fleet_ttl: HumanDuration,
    /// Timeout of one connection attempt.
    pub connect_timeout: HumanDuration,
    /// Timeout of one request to the broker (a publish is then retried
    /// with the same message id).
    pub request_timeout: HumanDuration,
    /// Longest pause between reconnect attempts (reconnects never stop).
    pub reconnect_max_delay: HumanDuration,
    /// How often the connection is pinged: a connection whose pings go
    /// unanswered twice is declared lost (a silent network partition is
    /// noticed within about three intervals).
    pub ping_interval: HumanDuration,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password; prefer the `FLOTILLA_BROKER_PASSWORD` environment variable.
    pub password: Option<String>,
    /// Token; prefer the `FLOTILLA_BROKER_TOKEN` environment variable.
    pub token: Option<String>,
    /// A `.creds` file (JWT and NKey seed), relative to the config file.
    pub creds_file: Option<PathBuf>,
    /// A file holding an NKey seed, relative to the config file.
    pub nkey_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server with.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), with `tls_key`, for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Refuse to connect without TLS.
    pub tls_required: bool,
    /// Set by the daemon when it connects through its fault proxy: the
    /// servers the broker advertises are not used (they bypass the proxy).
    #[serde(skip)]
    #[schemars(skip)]
    pub via_proxy: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            namespace: "flotilla".into(),
            replicas: 1,
            ack_wait: HumanDuration::secs(30),
            duplicate_window: HumanDuration::secs(120),
            fleet_ttl: HumanDuration::secs(15),
            connect_timeout: HumanDuration::secs(5),
            request_timeout: HumanDuration::secs(5),
            reconnect_max_delay: HumanDuration::secs(5),
            ping_interval: HumanDuration::secs(10),
            user: None,
            password: None,
            token: None,
            creds_file: None,
            nkey_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            via_proxy: false,
        }
    }
}

impl BrokerConfig {
    /// The server URLs.
    pub fn urls(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(String::from)
            .collect()
    }
}

/// Whether `name` is a valid daemon name or namespace.
pub fn valid_token(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// How an agent's processes take tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Long-lived replicas speaking JSON Lines on stdin/stdout.
    #[default]
    Persistent,
    /// One process per task: task JSON on stdin, result on stdout.
    Oneshot,
}

/// `[agents.NAME]`: one agent of the fleet.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The program and its arguments (argv). In oneshot mode, `{payload.x}`,
    /// `{task.id}`, `{task.attempt}` and `{task.agent}` are replaced per task.
    pub command: Vec<String>,
    /// `persistent` (default) or `oneshot`.
    #[serde(default)]
    pub mode: Mode,
    /// How many replicas run.
    #[serde(default)]
    pub replicas: Replicas,
    /// Tasks one persistent replica works on at once (default 1). Oneshot
    /// agents run one task per process.
    #[serde(default = "one")]
    pub concurrency: NonZeroU32,
    /// The only variables the agent sees besides PATH, HOME, LANG and
    /// flotilla's own FLOTILLA_*. `${NAME}` copies NAME from the daemon's
    /// environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory, relative to the config file's directory (default:
    /// that directory).
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// Restart policy for crashed replicas.
    #[serde(default)]
    pub restart: RestartConfig,
    /// Time limits.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Retry policy for failed attempts.
    #[serde(default)]
    pub retry: RetryConfig,
    /// A replica whose process group's resident memory exceeds this is
    /// killed and restarted; its task is retried.
    #[serde(default)]
    pub memory_limit: Option<ByteSize>,
    /// Longest line accepted from the agent; longer lines are discarded and
    /// counted as malformed.
    #[serde(default = "default_max_line")]
    pub max_line_bytes: ByteSize,
    /// Oneshot only: exit codes that mean "do not retry" (the task is
    /// dead-lettered at once). Other non-zero codes are retried.
    #[serde(default)]
    pub fatal_exit_codes: Vec<i32>,
    /// Oneshot only: let a payload value that begins an argument of the
    /// command start with `-`. By default such a task is refused, since
    /// the program would read the value as an option (a prompt of
    /// `--dangerously-skip-permissions`); a `--` before the placeholder
    /// in the command allows it too. Set it when the program reads no
    /// options there (a script's positional arguments).
    #[serde(default)]
    pub allow_dash_args: bool,
    /// Most tasks leased ahead of idle replicas (0 to 1024, default 0: a
    /// task is leased only for an idle replica). With a value above 0 a
    /// busy agent takes tasks from the store in batches: the dispatcher
    /// leases ahead at most as many as the agent's replicas took in the last
    /// second, holds them at most 2 s (they show as running) and hands them
    /// back on shutdown. Worth it for agents that finish many short tasks
    /// per second; a critical task may then wait behind the batch.
    #[serde(default)]
    pub prefetch: u32,
    /// The circuit breaker in front of the agent.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// While the agent is unavailable (its breaker open, or failed after
    /// too many restarts): the agents that take its tasks instead, in
    /// order; the first available one gets each task. Checked for unknown
    /// agents and cycles.
    #[serde(default)]
    pub fallback: Vec<String>,
    /// What happens to the agent's tasks while it is unavailable and no
    /// agent of `fallback` is available.
    #[serde(default)]
    pub fallback_policy: FallbackPolicy,
    /// Whether the fleet cannot do without this agent: the degradation
    /// trigger `critical_agent_unavailable` watches critical agents.
    #[serde(default)]
    pub critical: bool,
    /// Checks that must pass before the agent's replicas take tasks
    /// (e.g. its model endpoint answers).
    #[serde(default)]
    pub readiness: ReadinessConfig,
    /// This agent's fleet watchdog thresholds, where they differ from
    /// `[watchdog]`.
    #[serde(default)]
    pub watchdog: ThresholdOverrides,
    /// The agent that manages this one: told (as an event, and with
    /// `manager_tasks` as a task) when one of its replicas is lost.
    #[serde(default)]
    pub manager: Option<String>,
    /// Whether the manager also receives a `rebalance` task when a replica
    /// is lost (at most 10 a minute per agent).
    #[serde(default)]
    pub manager_tasks: bool,
    /// Gates every result must pass before its task is acknowledged.
    #[serde(default)]
    pub validation: ValidationConfig,
    /// Checks watched after a task is accepted; a breach rolls back its
    /// declared changes.
    #[serde(default)]
    pub watch: WatchConfig,
}

/// `[chaos]`: whether operators may inject faults into this daemon
/// (`flotilla chaos`, through the API and its token).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ChaosConfig {
    /// Allow chaos actions (kill and pause replicas). Default false: a
    /// production fleet refuses them.
    pub enabled: bool,
    /// Reach the broker through a fault proxy of the daemon's own, so
    /// that `flotilla chaos partition` and `latency` can cut or slow the
    /// connection (needs `enabled` and `[broker]`, without TLS).
    pub proxy: bool,
    /// Experiments the daemon runs on its own, every `every`
    /// (`[[chaos.schedule]]`); needs `enabled`, the HTTP server and a
    /// token.
    pub schedule: Vec<ScheduledExperiment>,
}

/// `[[chaos.schedule]]`: an experiment the daemon runs periodically:
/// every `every`, or when `cron` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduledExperiment {
    /// The experiment file, relative to the config's directory.
    pub experiment: PathBuf,
    /// How often (10s to 30d); the first run is one period after start.
    #[serde(default)]
    pub every: Option<HumanDuration>,
    /// A cron expression in UTC (`MIN HOUR DAY MONTH WEEKDAY`, e.g.
    /// `0 10 * * MON`), in place of `every`.
    #[serde(default)]
    pub cron: Option<String>,
}

impl ScheduledExperiment {
    /// About how long between two runs from `now_ms` on: `every`, or the
    /// gap between the cron's next two firings.
    ///
    /// # Errors
    /// As [`Self::next_in`].
    pub fn period(&self, now_ms: u64) -> Result<std::time::Duration, String> {
        let first = self.next_in(now_ms)?;
        if self.every.is_some() {
            return Ok(first);
        }
        let after = now_ms
            .saturating_add(u64::try_from(first.as_millis()).unwrap_or(u64::MAX / 2))
            .saturating_add(1000);
        Ok(self.next_in(after)? + std::time::Duration::from_secs(1))
    }

    /// How long from `now_ms` until the next run.
    ///
    /// # Errors
    /// When the cron expression does not parse or never fires.
    pub fn next_in(&self, now_ms: u64) -> Result<std::time::Duration, String> {
        if let Some(every) = self.every {
            return Ok(every.get());
        }
        let expression = self.cron.as_deref().unwrap_or_default();
        let cron = croner::Cron::new(expression)
            .parse()
            .map_err(|error| format!("cron {expression:?}: {error}"))?;
        let now =
            chrono::DateTime::from_timestamp_millis(i64::try_from(now_ms).unwrap_or(i64::MAX))
                .ok_or("the clock is out of range")?;
        let next = cron
            .find_next_occurrence(&now, false)
            .map_err(|error| format!("cron {expression:?}: {error}"))?;
        Ok((next - now).to_std().unwrap_or_default())
    }
}

/// `[delegation]`: limits of the child tasks agents send each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DelegationConfig {
    /// Most children one task may send (1 to 1000).
    pub max_fan_out: u32,
    /// Deepest tree: a task `max_depth` levels below its root may send no
    /// more (1 to 16).
    pub max_depth: u32,
    /// Longest `timeout_ms` a waiting send may ask for (1s to 24h).
    pub max_wait: HumanDuration,
}

impl Default for DelegationConfig {
    fn default() -> Self {
        Self {
            max_fan_out: 32,
            max_depth: 4,
            max_wait: HumanDuration::secs(3600),
        }
    }
}

impl DelegationConfig {
    fn validate(&self, problem: &mut impl FnMut(String, String)) {
        if !(1..=1000).contains(&self.max_fan_out) {
            problem(
                "delegation.max_fan_out".into(),
                format!("{} is out of range; valid: 1 to 1000", self.max_fan_out),
            );
        }
        if !(1..=16).contains(&self.max_depth) {
            problem(
                "delegation.max_depth".into(),
                format!("{} is out of range; valid: 1 to 16", self.max_depth),
            );
        }
        let wait = self.max_wait.get();
        if wait < std::time::Duration::from_secs(1) || wait > std::time::Duration::from_secs(86_400)
        {
            problem(
                "delegation.max_wait".into(),
                format!("{} is out of range; valid: 1s to 24h", self.max_wait),
            );
        }
    }
}

/// `[http]`: the daemon's HTTP server (health endpoints, metrics, API).
/// Its `Debug` output hides the token.
#[derive(Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `IP:PORT` to listen on (`127.0.0.1:9750` by default; port 0 picks a
    /// free one), or `off`. A non-loopback address needs a token.
    pub listen: String,
    /// Bearer token for mutating endpoints; prefer `token_file` or the
    /// `FLOTILLA_HTTP_TOKEN` environment variable.
    pub token: Option<String>,
    /// A file holding the token (relative to the config's directory); not
    /// together with `token`.
    pub token_file: Option<PathBuf>,
}

impl std::fmt::Debug for BrokerConfig {
    /// Everything but the secrets: the password and token hidden, the URL
    /// redacted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |secret: &Option<String>| secret.as_ref().map(|_| "<hidden>");
        f.debug_struct("BrokerConfig")
            .field("url", &redact_urls(&self.url))
            .field("namespace", &self.namespace)
            .field("replicas", &self.replicas)
            .field("ack_wait", &self.ack_wait)
            .field("duplicate_window", &self.duplicate_window)
            .field("fleet_ttl", &self.fleet_ttl)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("reconnect_max_delay", &self.reconnect_max_delay)
            .field("ping_interval", &self.ping_interval)
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("creds_file", &self.creds_file)
            .field("nkey_file", &self.nkey_file)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_required", &self.tls_required)
            .field("via_proxy", &self.via_proxy)
            .finish()
    }
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9750".into(),
            token: None,
            token_file: None,
        }
    }
}

impl HttpConfig {
    /// The address to listen on, `None` for `off`.
    pub fn address(&self) -> Option<std::net::SocketAddr> {
        if self.listen == "off" {
            return None;
        }
        self.listen.parse().ok()
    }

    /// The API token: `token`, else the content of `token_file` (relative
    /// to `base_dir`), else `FLOTILLA_HTTP_TOKEN`.
    ///
    /// # Errors
    /// When `token_file` cannot be read or is empty, naming the key.
    pub fn token(&self, base_dir: &Path) -> Result<Option<String>, String> {
        if let Some(token) = &self.token {
            return Ok(Some(token.trim().to_string()));
        }
        if let Some(file) = &self.token_file {
            let path = if file.is_absolute() {
                file.clone()
            } else {
                base_dir.join(file)
            };
            let text = load::read_capped(&path, load::MAX_TOKEN_BYTES).map_err(|error| {
                format!("http.token_file: cannot read {}: {error}", path.display())
            })?;
            let token = text.trim();
            if token.is_empty() {
                return Err(format!("http.token_file: {} is empty", path.display()));
            }
            return Ok(Some(token.to_string()));
        }
        Ok(std::env::var("FLOTILLA_HTTP_TOKEN")
            .ok()
            .map(|token| token.trim().to_string())
            .filter(|token| !token.is_empty()))
    }

    /// Problems that keep the daemon from serving (checked when it starts
    /// and by `config check`, not by every command: the token may be in
    /// the daemon's environment only).
    pub fn start_problems(&self, base_dir: &Path) -> Vec<String> {
        let Some(address) = self.address() else {
            return Vec::new();
        };
        match self.token(base_dir) {
            Err(problem) => vec![problem],
            Ok(None) if !address.ip().is_loopback() => vec![format!(
                "http.listen: {address} is reachable from other machines, so the API needs a token: set http.token_file (or http.token, or FLOTILLA_HTTP_TOKEN), or listen on 127.0.0.1"
            )],
            Ok(_) => Vec::new(),
        }
    }

    fn validate(&self, problem: &mut impl FnMut(String, String)) {
        if self.listen == "off" {
            return;
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            problem(
                "http.listen".into(),
                format!(
                    "{:?} is not IP:PORT; e.g. \"127.0.0.1:9750\", \"0.0.0.0:9750\", or \"off\"",
                    self.listen
                ),
            );
        }
        if self.token.is_some() && self.token_file.is_some() {
            problem(
                "http.token".into(),
                "is set and so is http.token_file; keep one (token_file keeps the secret out of the config)".into(),
            );
        }
        if self
            .token
            .as_deref()
            .is_some_and(|token| token.trim().is_empty())
        {
            problem(
                "http.token".into(),
                "is empty; give a long random string, or leave it out".into(),
            );
        }
    }
}

/// `[[notify]]`: one sink of events for humans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// The sink's name in the `sink` label of its metrics and in its log
    /// lines (letters, digits, `_`, `-`; up to 64); default: its place in
    /// the list, from 0.
    #[serde(default)]
    pub name: Option<String>,
    /// `log`, `webhook` or `command`.
    pub kind: SinkKind,
    /// Webhook only: the URL events are POSTed to (http or https).
    #[serde(default)]
    pub url: Option<String>,
    /// Command only: the program and its arguments; the event arrives as
    /// one JSON line on its stdin.
    #[serde(default)]
    pub command: Vec<String>,
    /// Longest one delivery may take (100ms to 5m, default 5s).
    #[serde(default = "default_notify_timeout")]
    pub timeout: HumanDuration,
    /// Further attempts after a failed delivery (0 to 10, default 3).
    #[serde(default = "default_notify_retries")]
    pub retries: u32,
    /// Only these events (default: all).
    #[serde(default)]
    pub events: Option<Vec<crate::notify::EventKind>>,
}

fn default_notify_timeout() -> HumanDuration {
    HumanDuration::secs(5)
}

fn default_notify_retries() -> u32 {
    3
}

/// Where a `[[notify]]` sink sends events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// The daemon's log, at WARN.
    Log,
    /// An HTTP POST of the event JSON (Slack-compatible `text` field).
    Webhook,
    /// A program run with the event JSON on stdin.
    Command,
}

/// `[degradation]`: levels 1 (reduced), 2 (essential) and 3 (emergency),
/// each entered when one of its triggers holds. Level 0 is nominal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DegradationConfig {
    /// How often the triggers are evaluated (100ms to 1m).
    pub check_interval: HumanDuration,
    /// A level is left only after its triggers have been clear for this
    /// long, and never sooner than this after it was entered (0s to 1h).
    /// Entering a higher level is immediate.
    pub min_dwell: HumanDuration,
    /// Level 1: unavailable agents' tasks go to their fallback agents.
    pub reduced: LevelConfig,
    /// Level 2: only `high` and `critical` tasks are dispatched.
    pub essential: LevelConfig,
    /// Level 3: only `critical` tasks are dispatched; humans are alerted.
    pub emergency: LevelConfig,
}

impl Default for DegradationConfig {
    fn default() -> Self {
        Self {
            check_interval: HumanDuration::secs(1),
            min_dwell: HumanDuration::secs(60),
            reduced: LevelConfig::default(),
            essential: LevelConfig::default(),
            emergency: LevelConfig::default(),
        }
    }
}

/// One degradation level: entered when any of its triggers holds.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LevelConfig {
    /// Conditions, any of which puts the fleet at this level (or higher).
    pub triggers: Vec<Trigger>,
}

/// A condition on the fleet, written `{ when = "KIND", ... }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "when", rename_all = "snake_case", deny_unknown_fields)]
pub enum Trigger {
    /// The circuit breaker of `agent` is not closed.
    BreakerOpen {
        /// The agent.
        agent: String,
    },
    /// `agent` has had no ready replica for `for`.
    AgentUnresponsive {
        /// The agent.
        agent: String,
        /// How long.
        #[serde(rename = "for")]
        duration: HumanDuration,
    },
    /// At least `at_least` agents are unavailable (breaker not closed,
    /// failed, or no ready replica for 10 s).
    AgentsUnavailable {
        /// How many.
        at_least: u32,
    },
    /// The broker connection is down.
    // `{}` rather than a unit variant: serde checks a struct variant's
    // fields, so `{ when = "broker_unreachable", for = "5m" }` is refused
    // rather than read without its `for`.
    BrokerUnreachable {},
    /// The broker cluster has fewer than `nodes` nodes current.
    BrokerNodesBelow {
        /// How many.
        nodes: u32,
    },
    /// More than the fraction `above` of the daemon's replicas are failing
    /// (restarting after a crash, stopped after running, or starting for
    /// 10 s or more).
    ReplicasFailing {
        /// The fraction, 0.0 up to (not including) 1.0.
        above: f64,
    },
    /// An agent with `critical = true` is unavailable.
    CriticalAgentUnavailable {},
}

/// `[agents.NAME.breaker]`: when to stop sending an agent work, and when
/// to try again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Whether the breaker is in use (default true).
    pub enabled: bool,
    /// Opens after this many failures in a row (1 to 10000).
    pub failure_threshold: u32,
    /// Opens when more than this fraction of the calls within `window`
    /// failed (above 0.0, up to 1.0), once at least `min_calls` were seen.
    pub failure_rate: f64,
    /// The sliding window of `failure_rate` (1s to 24h).
    pub window: HumanDuration,
    /// Calls within `window` needed before `failure_rate` is judged (1 to
    /// 100000).
    pub min_calls: u32,
    /// How long it stays open before probe tasks are sent (1ms to 7d).
    pub recovery_timeout: HumanDuration,
    /// Tasks sent while half-open (1 to 100); the others wait. All must
    /// succeed to close it; one failure opens it again.
    pub half_open_probes: u32,
    /// What counts as a failure: any of `crash` (the replica exited or
    /// exceeded its memory limit), `timeout` (progress timeout or
    /// max_duration), `error` (the agent reported an error), `validation`
    /// (the result was rejected).
    pub failures: Vec<FailureKind>,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_threshold: 5,
            failure_rate: 0.5,
            window: HumanDuration::secs(60),
            min_calls: 20,
            recovery_timeout: HumanDuration::secs(30),
            half_open_probes: 1,
            failures: vec![
                FailureKind::Crash,
                FailureKind::Timeout,
                FailureKind::Error,
                FailureKind::Validation,
            ],
        }
    }
}

/// A kind of failed attempt a breaker may count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The replica exited or exceeded its memory limit.
    Crash,
    /// No progress within `progress_timeout`, or past `max_duration`.
    Timeout,
    /// The agent reported an error.
    Error,
    /// The result was rejected (unusable, or failed validation).
    Validation,
}

/// What happens to an unavailable agent's tasks when no fallback agent is
/// available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FallbackPolicy {
    /// They stay queued, using up no attempt, until the breaker lets
    /// probes through.
    #[default]
    QueueForRetry,
    /// They move to the state `escalated` for a human to resolve
    /// (`flotilla escalations`).
    EscalateToHuman,
    /// They complete without running, with a result marked
    /// `proceeded_with_warning`: for gates that must not block.
    ProceedWithWarning,
}

impl FallbackPolicy {
    /// Its name in config and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueForRetry => "queue_for_retry",
            Self::EscalateToHuman => "escalate_to_human",
            Self::ProceedWithWarning => "proceed_with_warning",
        }
    }
}

fn one() -> NonZeroU32 {
    NonZeroU32::MIN
}

fn default_max_line() -> ByteSize {
    ByteSize::mib(1)
}

/// `replicas = { min, max }`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Replicas {
    /// Replicas started with the daemon and kept running (1 to 1024).
    #[serde(default = "one_u32")]
    pub min: u32,
    /// Upper bound for scaling (default: `min`).
    #[serde(default)]
    pub max: Option<u32>,
}

fn one_u32() -> u32 {
    1
}

impl Default for Replicas {
    fn default() -> Self {
        Self { min: 1, max: None }
    }
}

impl Replicas {
    /// The upper bound, `min` when not given.
    pub fn max(&self) -> u32 {
        self.max.unwrap_or(self.min)
    }
}

/// `[agents.NAME.restart]`: restarts with exponential backoff and an
/// intensity limit.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RestartConfig {
    /// Delay before the first restart; doubled after each crash.
    pub initial_backoff: HumanDuration,
    /// Cap of the restart delay.
    pub max_backoff: HumanDuration,
    /// A replica that ran this long without crashing starts again from
    /// `initial_backoff`.
    pub reset_after: HumanDuration,
    /// More restarts than this within `window`, across the agent's replicas,
    /// or more failed starts than this of one replica in a row (it could
    /// not start, or never said `ready`), marks the agent `failed`: it is
    /// no longer restarted and its tasks go to its fallback, else stay
    /// queued.
    pub max_restarts: u32,
    /// The window of `max_restarts`.
    pub window: HumanDuration,
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self {
            initial_backoff: HumanDuration::millis(100),
            max_backoff: HumanDuration::secs(30),
            reset_after: HumanDuration::secs(60),
            max_restarts: 20,
            window: HumanDuration::secs(60),
        }
    }
}

/// `[agents.NAME.timeouts]`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// An attempt running longer than this is killed and retried.
    pub max_duration: HumanDuration,
    /// An attempt without a progress message (or, in oneshot mode, an output
    /// line) for this long is killed and retried.
    pub progress_timeout: HumanDuration,
    /// A persistent replica must print `ready` within this time of starting.
    pub startup: HumanDuration,
    /// Between SIGTERM and SIGKILL of a replica's process group.
    pub stop_grace: HumanDuration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            max_duration: HumanDuration::secs(30 * 60),
            progress_timeout: HumanDuration::secs(5 * 60),
            startup: HumanDuration::secs(30),
            stop_grace: HumanDuration::secs(10),
        }
    }
}

/// `[agents.NAME.retry]`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Deliveries before a task is dead-lettered (1 = never retried).
    pub max_deliver: NonZeroU32,
    /// Delay before each retry.
    pub backoff: Backoff,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_deliver: NonZeroU32::new(5).expect("5 is not zero"),
            backoff: Backoff::default(),
        }
    }
}

/// Retry delays: an explicit list (`["1s", "10s", "1m"]`, the last repeated)
/// or exponential (`{ initial = "1s", max = "5m", multiplier = 2.0,
/// jitter = 0.2 }`).
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Backoff {
    /// The n-th retry waits the n-th delay; past the end, the last one.
    List(Vec<HumanDuration>),
    /// `initial * multiplier^(n-1)`, capped at `max`, randomized by ±jitter.
    Exponential(ExponentialBackoff),
}

impl Default for Backoff {
    fn default() -> Self {
        Self::Exponential(ExponentialBackoff::default())
    }
}

/// Parameters of exponential backoff.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ExponentialBackoff {
    /// First delay.
    pub initial: HumanDuration,
    /// Largest delay.
    pub max: HumanDuration,
    /// Growth factor per retry (at least 1.0).
    pub multiplier: f64,
    /// Random spread as a fraction of the delay, 0.0 to 1.0.
    pub jitter: f64,
}

impl Default for ExponentialBackoff {
    fn default() -> Self {
        Self {
            initial: HumanDuration::secs(1),
            max: HumanDuration::secs(300),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl<'de> Deserialize<'de> for Backoff {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Backoff;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a list of durations like [\"1s\", \"10s\", \"1m\"] or a table { initial = \"1s\", max = \"5m\", multiplier = 2.0, jitter = 0.2 }",
                )
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Backoff, A::Error> {
                Vec::deserialize(SeqAccessDeserializer::new(seq)).map(Backoff::List)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Backoff, A::Error> {
                ExponentialBackoff::deserialize(MapAccessDeserializer::new(map))
                    .map(Backoff::Exponential)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Largest `replicas.max`.
pub const MAX_REPLICAS: u32 = 1024;
/// Largest `concurrency`.
pub const MAX_CONCURRENCY: u32 = 256;
/// Largest `retry.max_deliver`.
pub const MAX_DELIVER: u32 = 1000;
/// Largest `prefetch`.
pub const MAX_PREFETCH: u32 = 1024;

/// Whether `name` is a valid agent name.
pub fn valid_agent_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Names `key` unless `value` is within `least` and `most`.
fn check_range(
    key: &str,
    value: HumanDuration,
    least: HumanDuration,
    most: HumanDuration,
    problem: &mut impl FnMut(String, String),
) {
    if value < least || value > most {
        problem(
            key.to_string(),
            format!("{value} is out of range; valid: {least} to {most}"),
        );
    }
}

impl Config {
    /// Cross-field rules that types cannot express. Agents in
    /// `unknown_mode` had an invalid `mode`: rules that depend on it are
    /// skipped. Returns every problem.
    pub(crate) fn validate(&self, unknown_mode: &[String]) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key: String, message: String| problems.push(Problem::new(key, message));
        let store = &self.store;
        if store.path.as_os_str().is_empty() && self.broker.is_none() {
            problem(
                "store.path".into(),
                "is empty; give the store's file, e.g. \"flotilla.db\" (beside this config)".into(),
            );
        }
        if store.dedup_window.get() < std::time::Duration::from_secs(60) {
            problem(
                "store.dedup_window".into(),
                format!(
                    "{} is too short; valid: 1m or more (the id of a task stays reserved this long, so that a client's retried submit does not run it again)",
                    store.dedup_window
                ),
            );
        } else if store.retention < store.dedup_window {
            problem(
                "store.retention".into(),
                format!(
                    "{} is shorter than store.dedup_window = {}; it must be at least as long",
                    store.retention, store.dedup_window
                ),
            );
        }
        // A task pruned while watched takes its rollback journal with it:
        // a breach could then undo nothing.
        for (name, agent) in &self.agents {
            if !agent.watch.checks.is_empty() && store.retention < agent.watch.duration {
                problem(
                    format!("agents.{name}.watch.duration"),
                    format!(
                        "{} is longer than store.retention = {}: an accepted task could be pruned, with its rollback journal, while it is watched; shorten the watch or keep tasks longer",
                        agent.watch.duration, store.retention
                    ),
                );
            }
        }
        for (key, size) in [
            ("store.max_payload_bytes", store.max_payload_bytes),
            ("store.max_result_bytes", store.max_result_bytes),
        ] {
            if size.bytes() < 64 || size > ByteSize::mib(64) {
                problem(
                    key.into(),
                    format!("{size} is out of range; valid: 64B to 64MiB"),
                );
            }
        }
        if let Some(name) = &self.daemon.name
            && !valid_token(name, 64)
        {
            problem(
                "daemon.name".into(),
                format!("invalid daemon name {name:?}: use 1 to 64 letters, digits, '-' or '_'"),
            );
        }
        if self.daemon.agents.as_ref().is_some_and(Vec::is_empty) {
            problem(
                "daemon.agents".into(),
                "is empty, so this daemon would run nothing; list the agents it runs, or leave it out for all".into(),
            );
        }
        for name in self.daemon.agents.iter().flatten() {
            if !self.agents.contains_key(name) {
                problem(
                    "daemon.agents".into(),
                    format!(
                        "unknown agent {name:?}; configured agents: {}",
                        self.agent_names()
                    ),
                );
            }
        }
        if let Some(broker) = &self.broker {
            broker.validate(self.daemon.status_interval, &mut problem);
            // The records take over deduplication where the broker's memory
            // of message ids ends; a gap between the two would let a
            // resubmit reuse a message id the broker still holds.
            if store.dedup_window < broker.duplicate_window {
                problem(
                    "store.dedup_window".into(),
                    format!(
                        "{} is shorter than broker.duplicate_window = {}; it must be at least as long",
                        store.dedup_window, broker.duplicate_window
                    ),
                );
            }
        }
        for (key, value, least, most) in [
            (
                "daemon.status_interval",
                self.daemon.status_interval,
                HumanDuration::millis(100),
                HumanDuration::secs(60),
            ),
            (
                "daemon.shutdown_grace",
                self.daemon.shutdown_grace,
                HumanDuration::secs(0),
                HumanDuration::secs(3600),
            ),
        ] {
            check_range(key, value, least, most, &mut problem);
        }
        for (name, agent) in &self.agents {
            if !valid_agent_name(name) {
                problem(
                    format!("agents.{name}"),
                    format!("invalid agent name {name:?}: use 1 to 64 letters, digits, '-' or '_'"),
                );
            }
            let mode_known = !unknown_mode.contains(name);
            agent.validate(&format!("agents.{name}"), mode_known, &mut problem);
        }
        self.validate_fallbacks(&mut problem);
        self.validate_degradation(&mut problem);
        let mut labels = std::collections::HashMap::new();
        for (index, sink) in self.notify.iter().enumerate() {
            sink.validate(&format!("notify[{index}]"), &mut problem);
            if let Some(first) = labels.insert(sink.label(index), index) {
                problem(
                    format!("notify[{index}].name"),
                    format!(
                        "{:?} also names notify[{first}] (an unnamed sink is named by its place); give each sink its own name",
                        sink.label(index)
                    ),
                );
            }
        }
        self.http.validate(&mut problem);
        self.watchdog.validate(&mut problem);
        self.delegation.validate(&mut problem);
        for (index, entry) in self.chaos.schedule.iter().enumerate() {
            match (&entry.every, &entry.cron) {
                (Some(every), None) => {
                    if every.get() < std::time::Duration::from_secs(10)
                        || every.get() > std::time::Duration::from_secs(30 * 86_400)
                    {
                        problem(
                            format!("chaos.schedule[{index}].every"),
                            format!("{every} is out of range; valid: 10s to 30d"),
                        );
                    }
                }
                (None, Some(_)) => {
                    if let Err(error) = entry.next_in(0) {
                        problem(
                            format!("chaos.schedule[{index}].cron"),
                            format!("{error}; e.g. \"0 10 * * MON\" (Mondays 10:00 UTC)"),
                        );
                    }
                }
                _ => problem(
                    format!("chaos.schedule[{index}]"),
                    "give exactly one of `every` and `cron`".into(),
                ),
            }
            if !self.chaos.enabled {
                problem(
                    format!("chaos.schedule[{index}]"),
                    "needs chaos.enabled = true".into(),
                );
            }
        }
        if self.chaos.proxy {
            match &self.broker {
                None => problem(
                    "chaos.proxy".into(),
                    "the fault proxy sits in front of a broker; add [broker] or leave it out"
                        .into(),
                ),
                Some(broker)
                    if broker.tls_required
                        || broker.tls_ca.is_some()
                        || broker.urls().iter().any(|url| url.starts_with("tls://")) =>
                {
                    problem(
                        "chaos.proxy".into(),
                        "the fault proxy cannot carry TLS (the server name would not match); use it on a test broker without TLS".into(),
                    );
                }
                Some(_) => {}
            }
            if !self.chaos.enabled {
                problem("chaos.proxy".into(), "needs chaos.enabled = true".into());
            }
        }
        let names: Vec<String> = self.agents.keys().cloned().collect();
        for (name, agent) in &self.agents {
            agent.validation.validate(
                &format!("agents.{name}.validation"),
                name,
                &names,
                &mut problem,
            );
            agent
                .watch
                .validate(&format!("agents.{name}.watch"), &mut problem);
            if let Some(manager) = &agent.manager {
                if manager == name {
                    problem(
                        format!("agents.{name}.manager"),
                        format!("{name:?} cannot manage itself; name another agent"),
                    );
                } else if !self.agents.contains_key(manager) {
                    problem(
                        format!("agents.{name}.manager"),
                        format!(
                            "unknown agent {manager:?}; configured agents: {}",
                            self.agent_names()
                        ),
                    );
                }
            }
        }
        problems
    }

    fn validate_degradation(&self, problem: &mut impl FnMut(String, String)) {
        let degradation = &self.degradation;
        if degradation.check_interval < HumanDuration::millis(100)
            || degradation.check_interval > HumanDuration::secs(60)
        {
            problem(
                "degradation.check_interval".into(),
                format!(
                    "{} is out of range; valid: 100ms to 1m",
                    degradation.check_interval
                ),
            );
        }
        if degradation.min_dwell > HumanDuration::secs(3600) {
            problem(
                "degradation.min_dwell".into(),
                format!("{} is out of range; valid: 0s to 1h", degradation.min_dwell),
            );
        }
        for (level, config) in [
            ("reduced", &degradation.reduced),
            ("essential", &degradation.essential),
            ("emergency", &degradation.emergency),
        ] {
            for (index, trigger) in config.triggers.iter().enumerate() {
                let key = format!("degradation.{level}.triggers[{index}]");
                let agent = match trigger {
                    Trigger::BreakerOpen { agent } | Trigger::AgentUnresponsive { agent, .. } => {
                        Some(agent)
                    }
                    _ => None,
                };
                if let Some(agent) = agent
                    && !self.agents.contains_key(agent)
                {
                    problem(
                        format!("{key}.agent"),
                        format!(
                            "unknown agent {agent:?}; configured agents: {}",
                            self.agent_names()
                        ),
                    );
                }
                if let Trigger::BreakerOpen { agent } = trigger
                    && self
                        .agents
                        .get(agent)
                        .is_some_and(|config| !config.breaker.enabled)
                {
                    problem(
                        format!("{key}.agent"),
                        format!(
                            "agent {agent:?} has its breaker disabled, so this trigger could never hold; enable its breaker or use agent_unresponsive"
                        ),
                    );
                }
                match trigger {
                    Trigger::AgentsUnavailable { at_least: 0 } => problem(
                        format!("{key}.at_least"),
                        "0 is out of range; valid: 1 or more".into(),
                    ),
                    Trigger::AgentsUnavailable { at_least }
                        if *at_least as usize > self.agents.len() =>
                    {
                        problem(
                            format!("{key}.at_least"),
                            format!(
                                "{at_least} is more than the {} agent(s) of the fleet, so this trigger could never hold; valid: 1 to {}",
                                self.agents.len(),
                                self.agents.len()
                            ),
                        );
                    }
                    Trigger::BrokerNodesBelow { nodes } if *nodes < 2 || *nodes > 5 => problem(
                        format!("{key}.nodes"),
                        format!("{nodes} is out of range; valid: 2 to 5"),
                    ),
                    Trigger::BrokerNodesBelow { nodes }
                        if self
                            .broker
                            .as_ref()
                            .is_some_and(|broker| broker.replicas < *nodes) =>
                    {
                        problem(
                            format!("{key}.nodes"),
                            format!(
                                "{nodes} is more than broker.replicas = {}, the most nodes the task stream has, so this trigger would always hold",
                                self.broker.as_ref().map_or(0, |broker| broker.replicas)
                            ),
                        );
                    }
                    Trigger::ReplicasFailing { above } if !(0.0..1.0).contains(above) => {
                        problem(
                            format!("{key}.above"),
                            format!(
                                "{above} is out of range; valid: 0.0 up to (not including) 1.0"
                            ),
                        );
                    }
                    Trigger::AgentUnresponsive { duration, .. } if duration.get().is_zero() => {
                        problem(
                            format!("{key}.for"),
                            "0s is not valid; give how long, e.g. \"30s\"".into(),
                        );
                    }
                    Trigger::BrokerUnreachable {} | Trigger::BrokerNodesBelow { .. }
                        if self.broker.is_none() =>
                    {
                        problem(
                            key.clone(),
                            "a broker trigger needs a [broker]; the embedded store has no broker to lose".into(),
                        );
                    }
                    Trigger::CriticalAgentUnavailable {}
                        if !self.agents.values().any(|agent| agent.critical) =>
                    {
                        problem(
                            key.clone(),
                            "no agent has critical = true, so this trigger could never hold".into(),
                        );
                    }
                    _ => {}
                }
            }
        }
    }

    /// Fallback chains name configured agents and never lead back to where
    /// they started.
    fn validate_fallbacks(&self, problem: &mut impl FnMut(String, String)) {
        for (name, agent) in &self.agents {
            let key = format!("agents.{name}.fallback");
            for (index, target) in agent.fallback.iter().enumerate() {
                if target == name {
                    problem(
                        format!("{key}[{index}]"),
                        format!("{name:?} cannot fall back to itself"),
                    );
                } else if !self.agents.contains_key(target) {
                    problem(
                        format!("{key}[{index}]"),
                        format!(
                            "unknown agent {target:?}; configured agents: {}",
                            self.agent_names()
                        ),
                    );
                } else if agent.fallback[..index].contains(target) {
                    problem(
                        format!("{key}[{index}]"),
                        format!("{target:?} is listed twice"),
                    );
                }
            }
        }
        // A cycle through other agents: depth-first from each agent, over
        // known agents only (unknown ones were reported above). Each cycle
        // is reported once, at its alphabetically first agent.
        for start in self.agents.keys() {
            let mut path = vec![start.clone()];
            if let Some(cycle) = self.fallback_cycle(start, &mut path)
                && cycle.iter().min() == Some(start)
                && cycle.len() > 2
            {
                problem(
                    format!("agents.{start}.fallback"),
                    format!(
                        "fallback chains form a cycle: {}; a task could be handed around forever",
                        cycle.join(" → ")
                    ),
                );
            }
        }
    }

    /// The first cycle back to `path[0]` reachable from the last agent of
    /// `path`, as the list of agents ending with `path[0]` again.
    fn fallback_cycle(&self, start: &str, path: &mut Vec<String>) -> Option<Vec<String>> {
        let last = path.last().expect("path starts with the start").clone();
        for next in self
            .agents
            .get(&last)
            .map(|a| &a.fallback)
            .into_iter()
            .flatten()
        {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(next.clone());
                return Some(cycle);
            }
            if path.contains(next) || !self.agents.contains_key(next) {
                continue;
            }
            path.push(next.clone());
            if let Some(cycle) = self.fallback_cycle(start, path) {
                return Some(cycle);
            }
            path.pop();
        }
        None
    }
}

impl BrokerConfig {
    fn validate(&self, status_interval: HumanDuration, problem: &mut impl FnMut(String, String)) {
        let urls = self.urls();
        if urls.is_empty() {
            problem(
                "broker.url".into(),
                "no server URL given; e.g. \"nats://127.0.0.1:4222\"".into(),
            );
        }
        for url in &urls {
            if url.parse::<async_nats::ServerAddr>().is_err() {
                problem(
                    "broker.url".into(),
                    format!(
                        "{:?} is not a server URL; e.g. \"nats://127.0.0.1:4222\" or \"tls://nats.example.com:4222\"",
                        redact_url(url)
                    ),
                );
            }
        }
        let namespace_ok = valid_token(&self.namespace, 32)
            && !self.namespace.bytes().any(|b| b.is_ascii_uppercase());
        if !namespace_ok {
            problem(
                "broker.namespace".into(),
                format!(
                    "invalid namespace {:?}: use 1 to 32 lower-case letters, digits, '-' or '_'",
                    self.namespace
                ),
            );
        }
        if !matches!(self.replicas, 1 | 3 | 5) {
            problem(
                "broker.replicas".into(),
                format!("{} is not valid; valid: 1, 3 or 5", self.replicas),
            );
        }
        let ack_wait = self.ack_wait.get();
        if ack_wait < std::time::Duration::from_secs(1)
            || ack_wait > std::time::Duration::from_secs(600)
        {
            problem(
                "broker.ack_wait".into(),
                format!(
                    "{} is out of range; valid: 1s to 10m (30s or less is best)",
                    self.ack_wait
                ),
            );
        }
        if self.duplicate_window.get() < std::time::Duration::from_secs(1) {
            problem(
                "broker.duplicate_window".into(),
                format!(
                    "{} is too short; valid: 1s or more, e.g. \"2m\"",
                    self.duplicate_window
                ),
            );
        }
        // A submit tries a timed-out publish up to 5 times in all with the same
        // message id: the broker must remember the id that long.
        let retry_span = self.request_timeout.get() * 6 + std::time::Duration::from_secs(2);
        if self.duplicate_window.get() < retry_span {
            problem(
                "broker.duplicate_window".into(),
                format!(
                    "{} is shorter than a publish's retries (6 x broker.request_timeout + 2s = {}); a retried submit could be stored twice",
                    self.duplicate_window,
                    humantime::format_duration(retry_span)
                ),
            );
        }
        if self.fleet_ttl.get() < status_interval.get() * 2 {
            problem(
                "broker.fleet_ttl".into(),
                format!(
                    "{} is shorter than twice daemon.status_interval = {}; live daemons would flicker out of the fleet",
                    self.fleet_ttl, status_interval
                ),
            );
        }
        for (key, value, least, most) in [
            (
                "broker.connect_timeout",
                self.connect_timeout,
                HumanDuration::millis(100),
                HumanDuration::secs(300),
            ),
            (
                "broker.request_timeout",
                self.request_timeout,
                HumanDuration::millis(100),
                HumanDuration::secs(300),
            ),
            (
                "broker.reconnect_max_delay",
                self.reconnect_max_delay,
                HumanDuration::millis(10),
                HumanDuration::secs(300),
            ),
            (
                "broker.ping_interval",
                self.ping_interval,
                HumanDuration::secs(1),
                HumanDuration::secs(600),
            ),
        ] {
            check_range(key, value, least, most, problem);
        }
        if self.user.is_some() != self.password.is_some()
            && std::env::var_os("FLOTILLA_BROKER_PASSWORD").is_none()
        {
            problem(
                "broker.user".into(),
                "user and password go together; give both (the password may come from FLOTILLA_BROKER_PASSWORD)".into(),
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            problem(
                "broker.tls_cert".into(),
                "tls_cert and tls_key go together; give both for mutual TLS".into(),
            );
        }
        let methods = [
            self.user.is_some(),
            self.token.is_some(),
            self.creds_file.is_some(),
            self.nkey_file.is_some(),
        ];
        if methods.into_iter().filter(|set| *set).count() > 1 {
            problem(
                "broker".into(),
                "give one of user/password, token, creds_file or nkey_file, not several".into(),
            );
        }
    }
}

impl NotifyConfig {
    /// What the sink at `index` of the list is called: its name, else its
    /// place.
    pub fn label(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| index.to_string())
    }

    fn validate(&self, key: &str, problem: &mut impl FnMut(String, String)) {
        if let Some(name) = &self.name
            && (name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        {
            problem(
                format!("{key}.name"),
                format!(
                    "{name:?} is not valid; give 1 to 64 letters, digits, `_` or `-`, e.g. \"oncall-pager\""
                ),
            );
        }
        match (self.kind, &self.url, self.command.is_empty()) {
            (SinkKind::Webhook, None, _) => problem(
                format!("{key}.url"),
                "a webhook needs a url, e.g. \"https://hooks.slack.com/services/...\"".into(),
            ),
            (SinkKind::Webhook, Some(url), _)
                if !(url.starts_with("http://") || url.starts_with("https://"))
                    || reqwest::Url::parse(url).is_err() =>
            {
                // Not the URL itself: it may carry a secret.
                problem(
                    format!("{key}.url"),
                    "is not an http:// or https:// URL with a host, e.g. \"https://hooks.slack.com/services/...\"".into(),
                );
            }
            (SinkKind::Command, _, true) => problem(
                format!("{key}.command"),
                "a command sink needs a command, e.g. [\"/usr/local/bin/page\", \"--team\", \"agents\"]".into(),
            ),
            (SinkKind::Log | SinkKind::Command, Some(_), _) => problem(
                format!("{key}.url"),
                "only a webhook has a url".into(),
            ),
            (SinkKind::Log | SinkKind::Webhook, _, false) => problem(
                format!("{key}.command"),
                "only a command sink has a command".into(),
            ),
            _ => {}
        }
        if self.timeout < HumanDuration::millis(100) || self.timeout > HumanDuration::secs(300) {
            problem(
                format!("{key}.timeout"),
                format!("{} is out of range; valid: 100ms to 5m", self.timeout),
            );
        }
        if self.retries > 10 {
            problem(
                format!("{key}.retries"),
                format!("{} is out of range; valid: 0 to 10", self.retries),
            );
        }
        if self.events.as_ref().is_some_and(Vec::is_empty) {
            problem(
                format!("{key}.events"),
                "is empty, so nothing would be sent; leave it out for all events".into(),
            );
        }
        if self
            .events
            .iter()
            .flatten()
            .any(|event| *event == crate::notify::EventKind::ReplicaRestarted)
        {
            problem(
                format!("{key}.events"),
                "replica_restarted goes only to the live event feed (too frequent for sinks); the replica_lost, agent_failed and watchdog events tell sinks about restarts that matter".into(),
            );
        }
    }
}

impl BreakerConfig {
    fn validate(&self, key: &str, problem: &mut impl FnMut(String, String)) {
        let mut range = |field: &str, value: String, ok: bool, valid: &str| {
            if !ok {
                problem(
                    format!("{key}.{field}"),
                    format!("{value} is out of range; valid: {valid}"),
                );
            }
        };
        range(
            "failure_threshold",
            self.failure_threshold.to_string(),
            (1..=10_000).contains(&self.failure_threshold),
            "1 to 10000",
        );
        range(
            "failure_rate",
            self.failure_rate.to_string(),
            self.failure_rate > 0.0 && self.failure_rate <= 1.0,
            "above 0.0, up to 1.0 (a fraction, e.g. 0.5)",
        );
        range(
            "window",
            self.window.to_string(),
            self.window >= HumanDuration::secs(1) && self.window <= HumanDuration::secs(86_400),
            "1s to 24h",
        );
        range(
            "min_calls",
            self.min_calls.to_string(),
            (1..=100_000).contains(&self.min_calls),
            "1 to 100000",
        );
        range(
            "recovery_timeout",
            self.recovery_timeout.to_string(),
            self.recovery_timeout >= HumanDuration::millis(1)
                && self.recovery_timeout <= HumanDuration::secs(7 * 86_400),
            "1ms to 7d",
        );
        range(
            "half_open_probes",
            self.half_open_probes.to_string(),
            (1..=100).contains(&self.half_open_probes),
            "1 to 100",
        );
        if self.enabled && self.failures.is_empty() {
            problem(
                format!("{key}.failures"),
                "is empty, so the breaker could never open; list some of crash, timeout, error, validation, or set enabled = false".into(),
            );
        }
    }
}

impl AgentConfig {
    fn validate(&self, key: &str, mode_known: bool, problem: &mut impl FnMut(String, String)) {
        self.breaker.validate(&format!("{key}.breaker"), problem);
        self.readiness
            .validate(&format!("{key}.readiness"), problem);
        WatchdogConfig::default()
            .thresholds(&self.watchdog)
            .validate(&format!("{key}.watchdog"), problem);
        if self.manager_tasks && self.manager.is_none() {
            problem(
                format!("{key}.manager_tasks"),
                "needs `manager`: the agent that receives the tasks".into(),
            );
        }
        if self.command.is_empty() || self.command[0].trim().is_empty() {
            problem(
                format!("{key}.command"),
                "the command is empty; give the program and its arguments, e.g. [\"python3\", \"agent.py\"]".into(),
            );
        }
        let replicas = self.replicas;
        if replicas.min == 0 || replicas.min > MAX_REPLICAS {
            problem(
                format!("{key}.replicas.min"),
                format!(
                    "{} is out of range; valid: 1 to {MAX_REPLICAS}",
                    replicas.min
                ),
            );
        }
        if replicas.max() < replicas.min || replicas.max() > MAX_REPLICAS {
            problem(
                format!("{key}.replicas.max"),
                format!(
                    "{} is out of range; valid: replicas.min ({}) to {MAX_REPLICAS}",
                    replicas.max(),
                    replicas.min
                ),
            );
        }
        if self.concurrency.get() > MAX_CONCURRENCY {
            problem(
                format!("{key}.concurrency"),
                format!(
                    "{} is out of range; valid: 1 to {MAX_CONCURRENCY}",
                    self.concurrency
                ),
            );
        }
        if mode_known && self.mode == Mode::Oneshot && self.concurrency.get() != 1 {
            problem(
                format!("{key}.concurrency"),
                format!(
                    "{} is not valid for a oneshot agent, which runs one task per process; raise replicas instead",
                    self.concurrency
                ),
            );
        }
        if self.prefetch > MAX_PREFETCH {
            problem(
                format!("{key}.prefetch"),
                format!(
                    "{} is out of range; valid: 0 to {MAX_PREFETCH}",
                    self.prefetch
                ),
            );
        }
        if mode_known && self.mode == Mode::Persistent && !self.fatal_exit_codes.is_empty() {
            problem(
                format!("{key}.fatal_exit_codes"),
                "only oneshot agents have exit codes per task; a persistent agent reports an error with \"retryable\": false".into(),
            );
        }
        for code in &self.fatal_exit_codes {
            if !(1..=255).contains(code) {
                problem(
                    format!("{key}.fatal_exit_codes"),
                    format!(
                        "{code} can never be an exit code that fails a task; valid: 1 to 255 (0 is success)"
                    ),
                );
            }
        }
        for name in self.env.keys() {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                problem(
                    format!("{key}.env"),
                    format!(
                        "invalid variable name {name:?}: it must be non-empty without '=' or NUL"
                    ),
                );
            }
        }
        let timeouts = &self.timeouts;
        for (field, value) in [
            ("max_duration", timeouts.max_duration),
            ("progress_timeout", timeouts.progress_timeout),
            ("startup", timeouts.startup),
        ] {
            if value.get() < std::time::Duration::from_millis(10) {
                problem(
                    format!("{key}.timeouts.{field}"),
                    format!("{value} is too short; valid: 10ms or more"),
                );
            }
        }
        check_range(
            &format!("{key}.timeouts.stop_grace"),
            timeouts.stop_grace,
            HumanDuration::secs(0),
            HumanDuration::secs(600),
            problem,
        );
        let restart = &self.restart;
        if restart.initial_backoff.get() < std::time::Duration::from_millis(1) {
            problem(
                format!("{key}.restart.initial_backoff"),
                format!(
                    "{} is too short; valid: 1ms or more (a replica that crashes at start would be restarted in a busy loop)",
                    restart.initial_backoff
                ),
            );
        }
        if restart.max_restarts > 100_000 {
            problem(
                format!("{key}.restart.max_restarts"),
                format!(
                    "{} is out of range; valid: 0 to 100000",
                    restart.max_restarts
                ),
            );
        }
        if restart.max_backoff < restart.initial_backoff {
            problem(
                format!("{key}.restart.max_backoff"),
                format!(
                    "{} is shorter than restart.initial_backoff = {}",
                    restart.max_backoff, restart.initial_backoff
                ),
            );
        }
        if restart.window.get() < std::time::Duration::from_millis(10) {
            problem(
                format!("{key}.restart.window"),
                format!(
                    "{} is too short; valid: 10ms or more, e.g. \"60s\" (restarts are counted over this window)",
                    restart.window
                ),
            );
        }
        if self.retry.max_deliver.get() > MAX_DELIVER {
            problem(
                format!("{key}.retry.max_deliver"),
                format!(
                    "{} is out of range; valid: 1 to {MAX_DELIVER}",
                    self.retry.max_deliver
                ),
            );
        }
        match &self.retry.backoff {
            Backoff::List(delays) if delays.is_empty() => problem(
                format!("{key}.retry.backoff"),
                "the list is empty; give at least one delay, e.g. [\"1s\", \"10s\"]".into(),
            ),
            Backoff::List(_) => {}
            Backoff::Exponential(exponential) => {
                if !(exponential.multiplier >= 1.0 && exponential.multiplier <= 100.0) {
                    problem(
                        format!("{key}.retry.backoff.multiplier"),
                        format!(
                            "{} is out of range; valid: 1.0 to 100.0",
                            exponential.multiplier
                        ),
                    );
                }
                if !(0.0..=1.0).contains(&exponential.jitter) {
                    problem(
                        format!("{key}.retry.backoff.jitter"),
                        format!("{} is out of range; valid: 0.0 to 1.0", exponential.jitter),
                    );
                }
                if exponential.max < exponential.initial {
                    problem(
                        format!("{key}.retry.backoff.max"),
                        format!(
                            "{} is shorter than retry.backoff.initial = {}",
                            exponential.max, exponential.initial
                        ),
                    );
                }
            }
        }
        if let Some(limit) = self.memory_limit
            && limit < ByteSize::mib(1)
        {
            problem(
                format!("{key}.memory_limit"),
                format!("{limit} is too small; valid: 1MiB or more"),
            );
        }
        let line = self.max_line_bytes;
        if line < ByteSize(1024) || line > ByteSize::mib(64) {
            problem(
                format!("{key}.max_line_bytes"),
                format!("{line} is out of range; valid: 1KiB to 64MiB"),
            );
        }
    }

    /// The agent's working directory, resolved.
    pub fn workdir(&self, config: &Config) -> PathBuf {
        match &self.workdir {
            Some(dir) => config.resolve(dir),
            None => config.base_dir.clone(),
        }
    }
}
