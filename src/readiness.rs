//! Agents' readiness checks (`[agents.NAME.readiness]`): run every
//! `interval`, each bounded by `timeout`; their results gate the agent's
//! replicas (a replica asks for tasks only while every required check
//! passes for it) and feed `/health/ready` and `status`.
//!
//! `http`, `tcp`, `command` and `workspace_writable` are checks of the
//! agent as a whole; `memory_below_pct` is judged per replica.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::clock::UnixMillis;
use crate::config::{CheckConfig, Probe, ReadinessConfig};
use crate::dispatch::{AgentRuntime, Phase};
use crate::supervisor::process::SpawnSpec;

/// Bytes of a check command's output kept for its detail.
const OUTPUT_BYTES: usize = 512;

/// The last result of one check, as `status` and `/health/ready` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CheckStatus {
    /// The check's name.
    pub name: String,
    /// Whether it passed (for a per-replica check: for every replica).
    pub ok: bool,
    /// Whether a failure keeps the replicas from taking tasks.
    pub required: bool,
    /// What was seen.
    pub detail: String,
    /// When it ran.
    pub checked_ms: UnixMillis,
    /// A required check that failed, but fewer rounds in a row than
    /// `failure_threshold` after it had passed: it stops no replica yet,
    /// and the daemon still answers ready.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tolerated: bool,
}

/// What the agent's replicas may do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gate {
    /// Why no replica of the agent may take tasks, if so.
    pub agent: Option<String>,
    /// Replicas that may not take tasks, with why.
    pub replicas: BTreeMap<u32, String>,
}

impl Gate {
    /// Why replica `index` may not take tasks now, if so.
    pub fn blocks(&self, index: u32) -> Option<&str> {
        self.agent
            .as_deref()
            .or_else(|| self.replicas.get(&index).map(String::as_str))
    }

    /// The gate before the first round of checks.
    pub fn initial(config: &ReadinessConfig) -> Self {
        Self {
            agent: (!config.checks.is_empty())
                .then(|| "readiness checks have not run yet".to_string()),
            replicas: BTreeMap::new(),
        }
    }
}

/// Runs `agent`'s checks every interval until shutdown.
pub async fn run(agent: Arc<AgentRuntime>, mut shutdown: watch::Receiver<Phase>) {
    let config = agent.config.readiness.clone();
    let total_memory = machine_memory();
    let limit = config.timeout();
    let client = |redirects| {
        reqwest::Client::builder()
            .timeout(limit.get())
            .connect_timeout(limit.get())
            .redirect(redirects)
            .build()
            .ok()
    };
    // A check that expects a 3xx sees the redirect itself; every other
    // check follows redirects (up to 10) to the final status.
    let clients = Clients {
        following: client(reqwest::redirect::Policy::limited(10)),
        not_following: client(reqwest::redirect::Policy::none()),
    };
    let mut ticker = tokio::time::interval(config.interval.get());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing: BTreeMap<String, String> = BTreeMap::new();
    // Each check's recent rounds: the agent's (`None`) or a replica's.
    let mut streaks: BTreeMap<(String, Option<u32>), Streak> = BTreeMap::new();
    let threshold = config.failure_threshold;
    loop {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || shutdown.borrow().stopping() {
                    return;
                }
                continue;
            }
            _ = ticker.tick() => {}
        }
        let round = futures_util::future::join_all(config.checks.iter().map(|check| {
            let agent = agent.clone();
            let client = clients.for_check(check).cloned();
            async move {
                let outcome = match check.probe() {
                    Some(Probe::MemoryBelowPct(pct)) => {
                        Round::Replicas(memory(&agent, pct, total_memory))
                    }
                    Some(Probe::Command(argv)) => Round::Agent(command(&agent, &argv, limit).await),
                    Some(probe) => Round::Agent(
                        match tokio::time::timeout(
                            limit.get(),
                            probe_once(&agent, &probe, client.as_ref()),
                        )
                        .await
                        {
                            Ok(result) => result,
                            Err(_) => Err(format!("no answer within timeout = {limit}")),
                        },
                    ),
                    None => Round::Agent(Err("invalid check".into())),
                };
                (check, outcome)
            }
        }));
        // A round (up to its checks' timeout) does not hold up a stop.
        let round = tokio::select! {
            round = round => round,
            changed = shutdown.changed() => {
                if changed.is_err() || shutdown.borrow().stopping() {
                    return;
                }
                continue;
            }
        };
        let now = agent.clock_now_ms();
        let replicas: Vec<u32> = agent
            .status()
            .replicas
            .iter()
            .map(|replica| replica.index)
            .collect();
        let mut statuses = Vec::with_capacity(round.len());
        let mut gate = Gate::default();
        for (check, outcome) in round {
            let name = check.display_name();
            let mut streak = |replica: Option<u32>, ok: bool| {
                streaks
                    .entry((name.clone(), replica))
                    .or_default()
                    .record(ok, threshold)
            };
            let (ok, detail, held) = match outcome {
                Round::Agent(Ok(detail)) => {
                    streak(None, true);
                    (true, detail, false)
                }
                Round::Agent(Err(detail)) => {
                    let (stops, failures) = streak(None, false);
                    if check.required && stops && gate.agent.is_none() {
                        gate.agent = Some(format!("readiness check {name:?} failed: {detail}"));
                    }
                    (
                        false,
                        tolerated(check, stops, failures, threshold, detail),
                        stops,
                    )
                }
                Round::Replicas(over) => {
                    for index in &replicas {
                        if !over.iter().any(|(over, _)| over == index) {
                            streak(Some(*index), true);
                        }
                    }
                    if over.is_empty() {
                        (
                            true,
                            format!("every replica below {}", pct_of(check)),
                            false,
                        )
                    } else {
                        let mut parts = Vec::with_capacity(over.len());
                        let mut held = false;
                        for (index, what) in over {
                            let (stops, failures) = streak(Some(index), false);
                            held |= stops;
                            if check.required && stops {
                                gate.replicas.entry(index).or_insert_with(|| {
                                    format!("readiness check {name:?} failed: {what}")
                                });
                            }
                            parts.push(tolerated(
                                check,
                                stops,
                                failures,
                                threshold,
                                format!("replica {index}: {what}"),
                            ));
                        }
                        (false, parts.join("; "), held)
                    }
                }
            };
            log_change(&agent.name, &name, ok, &detail, &mut failing);
            statuses.push(CheckStatus {
                name,
                ok,
                required: check.required,
                detail,
                checked_ms: now,
                tolerated: check.required && !ok && !held,
            });
        }
        agent.set_readiness(statuses, gate);
    }
}

/// A check's rounds in a row, for the agent or one replica.
#[derive(Debug, Default)]
struct Streak {
    /// Whether it has passed since the daemon started.
    passed: bool,
    /// Failed rounds in a row.
    failures: u32,
}

impl Streak {
    /// Records a round; whether the check now stops the replicas (it
    /// never passed yet, or failed `threshold` rounds in a row), and the
    /// failures in a row.
    fn record(&mut self, ok: bool, threshold: u32) -> (bool, u32) {
        if ok {
            self.passed = true;
            self.failures = 0;
            return (false, 0);
        }
        self.failures = self.failures.saturating_add(1);
        (!self.passed || self.failures >= threshold, self.failures)
    }
}

/// `detail` of a failed check, saying when a required one does not stop
/// the replicas yet.
fn tolerated(
    check: &CheckConfig,
    stops: bool,
    failures: u32,
    threshold: u32,
    detail: String,
) -> String {
    if check.required && !stops {
        format!(
            "{detail} (failed {failures} round(s) in a row; the replicas stop at failure_threshold = {threshold})"
        )
    } else {
        detail
    }
}

/// The HTTP clients of the checks, built once.
struct Clients {
    following: Option<reqwest::Client>,
    not_following: Option<reqwest::Client>,
}

impl Clients {
    fn for_check(&self, check: &CheckConfig) -> Option<&reqwest::Client> {
        if check
            .expect
            .is_some_and(|status| (300..400).contains(&status))
        {
            self.not_following.as_ref()
        } else {
            self.following.as_ref()
        }
    }
}

/// The result of one check in one round.
enum Round {
    /// An agent-wide check: its detail, or why it failed.
    Agent(Result<String, String>),
    /// A per-replica check: the replicas that fail it, with why.
    Replicas(Vec<(u32, String)>),
}

fn pct_of(check: &CheckConfig) -> String {
    format!("{}%", check.memory_below_pct.unwrap_or_default())
}

/// Logs a check that starts failing (warning) or recovers (info).
fn log_change(
    agent: &str,
    check: &str,
    ok: bool,
    detail: &str,
    failing: &mut BTreeMap<String, String>,
) {
    if ok {
        if failing.remove(check).is_some() {
            tracing::info!(agent, check, %detail, "readiness check passes again");
        }
    } else if failing
        .insert(check.to_string(), detail.to_string())
        .is_none()
    {
        tracing::warn!(agent, check, %detail, "readiness check failed");
    }
}

async fn probe_once(
    agent: &AgentRuntime,
    probe: &Probe,
    client: Option<&reqwest::Client>,
) -> Result<String, String> {
    match probe {
        Probe::Http { url, expect } => {
            let client = client.ok_or("the HTTP client could not be built")?;
            // Shown on /health/ready and logged: never with a password or
            // a query (which may hold a key).
            let shown = crate::config::redact_url(url);
            let response =
                client.get(url).send().await.map_err(|error| {
                    format!("GET {shown}: {}", error_chain(&error.without_url()))
                })?;
            let status = response.status();
            let passes = match expect {
                Some(expected) => status.as_u16() == *expected,
                None => status.is_success(),
            };
            let wanted = expect.map_or_else(|| "2xx".to_string(), |code| code.to_string());
            if passes {
                Ok(format!("GET {shown}: {status}"))
            } else {
                Err(format!("GET {shown}: {status}, expected {wanted}"))
            }
        }
        Probe::Tcp(address) => tokio::net::TcpStream::connect(address.as_str())
            .await
            .map(|_| format!("connected to {address}"))
            .map_err(|error| format!("connect {address}: {error}")),
        Probe::WorkspaceWritable => writable(&agent.workdir(), &agent.name).await,
        Probe::Command(_) | Probe::MemoryBelowPct(_) => {
            unreachable!("run by `command` and judged per replica")
        }
    }
}

/// The error and its sources, e.g. "error sending request: connection
/// refused".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Runs `argv` in the agent's working directory with its environment;
/// after `limit` its process group is killed and the check fails.
async fn command(
    agent: &AgentRuntime,
    argv: &[String],
    limit: crate::config::HumanDuration,
) -> Result<String, String> {
    let mut spec: SpawnSpec = agent.check_spec();
    spec.argv = argv.to_vec();
    let ran = crate::command::run(spec, limit.get(), OUTPUT_BYTES).await?;
    let line = ran.describe(&argv[0], limit.get());
    if ran.success() { Ok(line) } else { Err(line) }
}

/// Creates, writes, syncs and removes a file in `dir`.
/// The directories whose write probe is still running. A probe on a hung
/// filesystem (NFS, FUSE) blocks its thread past the check's timeout;
/// one such thread per probe file (a directory and an agent) at most, or
/// every interval would add one until the blocking pool (which the store
/// uses too) is full.
static WRITING: std::sync::Mutex<std::collections::BTreeSet<std::path::PathBuf>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Takes `dir` off [`WRITING`] when its probe ends, however it ends.
struct Writing(std::path::PathBuf);

impl Drop for Writing {
    fn drop(&mut self) {
        WRITING.lock().expect("not poisoned").remove(&self.0);
    }
}

async fn writable(dir: &Path, agent: &str) -> Result<String, String> {
    // A file of each agent's own: agents sharing a working directory
    // probe it at the same time without meeting.
    let path = dir.join(format!(".flotilla-ready-{}-{agent}", std::process::id()));
    if !WRITING.lock().expect("not poisoned").insert(path.clone()) {
        return Err(format!(
            "the previous write probe of {} has not finished (a hung filesystem?)",
            dir.display()
        ));
    }
    let writing = Writing(path.clone());
    let probe = tokio::task::spawn_blocking(move || {
        let _writing = writing;
        let result = (|| {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&path)?;
            file.write_all(b"ok")?;
            file.sync_all()
        })();
        let _ = std::fs::remove_file(&path);
        result
    });
    match probe.await {
        Ok(result) => result
            .map(|()| format!("{} is writable", dir.display()))
            .map_err(|error| format!("cannot write in {}: {error}", dir.display())),
        Err(error) => Err(format!(
            "the write probe of {} failed: {error}",
            dir.display()
        )),
    }
}

/// The replicas whose memory is at or above `pct` of the agent's memory
/// limit (of the machine's memory without one).
fn memory(agent: &AgentRuntime, pct: f64, total: Option<u64>) -> Vec<(u32, String)> {
    let (base, of) = match (agent.config.memory_limit, total) {
        (Some(limit), _) => (limit.bytes(), format!("memory_limit = {limit}")),
        (None, Some(total)) => (total, "the machine's memory".to_string()),
        // Unknown is not below: a check that cannot be judged must not pass.
        (None, None) => {
            return agent
                .status()
                .replicas
                .iter()
                .filter(|replica| replica.pid.is_some())
                .map(|replica| {
                    (
                        replica.index,
                        "the machine's memory is unknown (/proc/meminfo cannot be read); set the agent's memory_limit".to_string(),
                    )
                })
                .collect();
        }
    };
    agent
        .status()
        .replicas
        .iter()
        .filter_map(|replica| {
            let rss = replica.rss_bytes?;
            #[allow(clippy::cast_precision_loss)]
            let used = rss as f64 * 100.0 / base.max(1) as f64;
            (used >= pct).then(|| {
                (
                    replica.index,
                    format!("resident memory {used:.1}% of {of}, limit {pct}%"),
                )
            })
        })
        .collect()
}

/// The machine's memory in bytes (`MemTotal` of /proc/meminfo).
fn machine_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}
