//! The dispatcher: per agent, a leaser that takes tasks from the queue only
//! for idle replicas, and the replica loops that hand tasks to agent
//! processes, watch progress and time, and turn what happens into queue
//! outcomes (ack, nak with backoff, release, term).
//!
//! Each agent is its own bulkhead: its own leaser, replicas and bounded
//! channels, so one agent's backlog or failures never take capacity from
//! another. The dispatcher never blocks on an agent: every wait on a
//! process is bounded by a timeout.

mod gate;
mod oneshot;
mod persistent;

pub use gate::Availability;
use gate::{Calls, DIVERT_BATCH, DIVERT_WAIT, Handed};

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng as _;
use rand::rngs::SmallRng;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::clock::SharedClock;
use crate::config::{AgentConfig, Config, Mode};
use crate::protocol::LineError;
use crate::queue::{
    AttemptEnd, AttemptOutcome, Lease, LeaseKey, LeaseRequest, QueueError, TaskQueue, TaskState,
};
use crate::status::{AgentState, AgentStatus, ReplicaState, ReplicaStatus};
use crate::supervisor::policy::{Intensity, Streak, Verdict};
use crate::supervisor::process::{INSTANCE_ENV, PASSED_THROUGH, SpawnSpec};
use crate::template::{TaskContext, Template, TemplateError};

/// Longest a lease call waits for work before the leaser looks again.
const LEASE_WAIT: Duration = Duration::from_secs(1);
/// Extra lease time beyond what the progress watchdog allows, so that only
/// a dead daemon lets a lease expire.
const LEASE_MARGIN: Duration = Duration::from_secs(30);
/// Longest wait for a write to an agent's stdin.
const STDIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Completions being stored at once per agent; a replica waits for a permit
/// before taking its next task, so pending writes stay bounded.
const OUTCOME_PERMITS: u32 = 256;
/// Longest a task leased ahead waits in memory before it is handed back.
const PREFETCH_TTL: Duration = Duration::from_secs(2);
/// Longest one rollback command may run.
pub const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a task waiting for an earlier attempt's rollback looks again.
pub(crate) const ROLLBACK_RECHECK: Duration = Duration::from_secs(5);
/// Most `rebalance` tasks one agent sends its manager in a minute.
pub const MANAGER_TASKS_PER_MINUTE: usize = 10;

/// Where the daemon is in its life; replicas and leasers watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Taking and running tasks.
    Running,
    /// Shutting down: no new tasks; running ones may finish within
    /// `daemon.shutdown_grace`.
    Draining,
    /// Shutting down at once (a second signal): release running tasks now.
    Hurry,
}

impl Phase {
    /// Whether shutdown has begun.
    pub fn stopping(self) -> bool {
        self != Self::Running
    }
}

/// Memory of every process group, refreshed by the daemon's sampler.
pub type MemoryMap = Arc<HashMap<u32, u64>>;

/// Everything a replica of one agent needs, shared by its leaser and
/// replicas.
pub struct AgentRuntime {
    /// The agent's name.
    pub name: String,
    /// Its configuration.
    pub config: AgentConfig,
    queue: Arc<dyn TaskQueue>,
    store: crate::store::Store,
    clock: SharedClock,
    status: Mutex<AgentStatus>,
    intensity: Mutex<Intensity>,
    slots: mpsc::Sender<SlotRequest>,
    argv: Vec<Template>,
    env: Vec<(String, Template)>,
    base_env: Vec<(String, String)>,
    workdir: PathBuf,
    owner: String,
    memory: watch::Receiver<MemoryMap>,
    rng: Mutex<SmallRng>,
    shutdown_grace: Duration,
    outcomes: Arc<tokio::sync::Semaphore>,
    breaker: Mutex<crate::breaker::Breaker>,
    calls: Mutex<Calls>,
    availability: Arc<Availability>,
    /// Wakes the leaser when the breaker lets more through.
    gate_changed: tokio::sync::Notify,
    notifier: crate::notify::Notifier,
    metrics: Arc<crate::metrics::Metrics>,
    /// Which replicas may take tasks, from the readiness checks.
    gate: watch::Sender<crate::readiness::Gate>,
    delegation: crate::config::DelegationConfig,
    fleet_agents: Arc<Vec<String>>,
    /// The whole fleet's config: a rollback runs each change as the agent
    /// that declared it.
    fleet: Arc<Config>,
    /// The fleet watchdog's orders to replicas (retire, restart).
    orders: watch::Sender<Orders>,
    /// The replicas' join handles (the watchdog adds replicas).
    handles: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The daemon's phase, for replicas added later.
    phase: watch::Receiver<Phase>,
    /// Recent attempt outcomes (when, failed) for the watchdog's error
    /// rate; bounded.
    recent: Mutex<VecDeque<(crate::clock::UnixMillis, bool)>>,
    /// Tasks a replica held when it was lost, for the manager's notice.
    lost: Mutex<HashMap<u32, Vec<String>>>,
    /// When the manager was last sent rebalance tasks, the latest
    /// [`MANAGER_TASKS_PER_MINUTE`] of them.
    manager_told_ms: Mutex<std::collections::VecDeque<crate::clock::UnixMillis>>,
    /// Post-accept watches running (bounded).
    watches: Arc<tokio::sync::Semaphore>,
    /// Whether a gate of the fleet rolls back (`auto_rollback`): a retried
    /// task of this agent is then checked for a rollback of an earlier
    /// attempt that was cut off (see [`AgentRuntime::unless_rolling_back`]).
    checks_rollbacks: bool,
}

/// Most attempt outcomes kept for the watchdog's error rate.
const RECENT_OUTCOMES: usize = 10_000;

/// The fleet watchdog's orders to an agent's replicas, and the tasks
/// they are to abandon.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Orders {
    /// Replicas to stop once idle, for good.
    pub retire: std::collections::BTreeSet<u32>,
    /// Replicas to restart now (their process id, and why), retrying their
    /// tasks.
    pub restart: std::collections::BTreeMap<u32, (u32, String)>,
    /// Attempts the store no longer gives to this daemon (the task was
    /// cancelled, or taken over elsewhere), with why: whichever replica
    /// runs one stops working on it.
    pub abandon: HashMap<LeaseKey, String>,
}

/// A replica asking the leaser for one task.
struct SlotRequest {
    reply: tokio::sync::oneshot::Sender<Handed>,
}

/// Shared inputs for building agent runtimes.
pub struct Wiring {
    /// The queue.
    pub queue: Arc<dyn TaskQueue>,
    /// The store (journals).
    pub store: crate::store::Store,
    /// The clock.
    pub clock: SharedClock,
    /// The store's id, marking spawned processes (orphan detection).
    pub instance: String,
    /// Lease owner name (the daemon).
    pub owner: String,
    /// Memory samples.
    pub memory: watch::Receiver<MemoryMap>,
    /// Which agents are unavailable, shared by all agents of the daemon.
    pub availability: Arc<Availability>,
    /// Where events for humans go.
    pub notifier: crate::notify::Notifier,
    /// The daemon's metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Limits of agent-to-agent messages.
    pub delegation: crate::config::DelegationConfig,
    /// The whole fleet's config (also the agents other daemons run).
    pub fleet: Arc<Config>,
}

/// Problems that keep an agent from starting (missing `${VAR}`, bad
/// placeholders).
pub fn check_agent(name: &str, agent: &AgentConfig, config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let mut check = |key: String, text: &str| match Template::parse(text) {
        Err(error) => problems.push(format!("agents.{name}.{key}: {error}")),
        Ok(template) => {
            if template.needs_task() && agent.mode == Mode::Persistent {
                problems.push(format!(
                    "agents.{name}.{key}: {text:?} uses task placeholders, which only oneshot agents have; a persistent agent gets the task on stdin"
                ));
            }
            for var in template.variables() {
                if std::env::var_os(var).is_none() {
                    problems.push(format!(
                        "agents.{name}.{key}: ${{{var}}} is not set in the daemon's environment (write $${{{var}}} to pass it to the program literally)"
                    ));
                }
            }
        }
    };
    for (index, arg) in agent.command.iter().enumerate() {
        check(format!("command[{index}]"), arg);
    }
    for (var, value) in &agent.env {
        check(format!("env.{var}"), value);
    }
    let workdir = agent.workdir(config);
    if !workdir.is_dir() {
        problems.push(format!(
            "agents.{name}.workdir: {} is not a directory",
            workdir.display()
        ));
    } else {
        // The agent's program, and its validation gates' (a gate that
        // cannot start fails every result it sees).
        let mut programs = vec![("command[0]".to_string(), agent.command.first())];
        for (index, gate) in agent.validation.checks.iter().enumerate() {
            let key = format!("validation.checks[{index}]");
            programs.push((format!("{key}.command[0]"), gate.command.first()));
            if let Some(fix) = &gate.fix {
                programs.push((format!("{key}.fix[0]"), fix.first()));
            }
        }
        let path = agent_path(agent);
        for (key, program) in programs {
            if let Some(program) = program
                && !program.contains(['{', '$'])
                && let Some(problem) = missing_program(program, &workdir, &path)
            {
                problems.push(format!("agents.{name}.{key}: {problem}"));
            }
        }
    }
    problems
}

/// The `PATH` the agent's programs are looked up on: its `env.PATH`, else
/// the daemon's.
fn agent_path(agent: &AgentConfig) -> String {
    let lookup = |var: &str| std::env::var(var).ok();
    agent
        .env
        .get("PATH")
        .and_then(|value| Template::parse(value).ok()?.render(&lookup, None).ok())
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default()
}

/// Why `program` cannot be started from `workdir` with `path`, if it
/// cannot: a path (with a `/`) must be an executable file, relative to the
/// working directory; a bare name must be one in a directory of `path`.
fn missing_program(program: &str, workdir: &std::path::Path, path: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |candidate: &std::path::Path| {
        std::fs::metadata(candidate)
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let candidate = workdir.join(program);
        if executable(&candidate) {
            None
        } else if candidate.is_file() {
            Some(format!(
                "{} is not executable (chmod +x it, or run it through its interpreter, e.g. [\"sh\", {program:?}])",
                candidate.display()
            ))
        } else {
            Some(format!("{} does not exist", candidate.display()))
        }
    } else if std::env::split_paths(path).any(|dir| executable(&workdir.join(dir).join(program))) {
        None
    } else {
        Some(format!(
            "program {program:?} is not found on PATH ({path}); install it, give its full path, or set the agent's env.PATH"
        ))
    }
}

/// What every process of agent `name` gets: the passed-through
/// variables and `FLOTILLA_AGENT`.
fn base_env(name: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = PASSED_THROUGH
        .iter()
        .filter_map(|var| {
            std::env::var(var)
                .ok()
                .map(|value| (var.to_string(), value))
        })
        .collect();
    env.push(("FLOTILLA_AGENT".into(), name.to_string()));
    env
}

/// How one-off commands of agent `name` (rollbacks run by the CLI) run:
/// in its working directory, with its environment. `None` for an agent
/// the config does not define.
pub fn command_spec(config: &Config, name: &str) -> Option<SpawnSpec> {
    let agent = config.agent(name)?;
    let lookup = |var: &str| std::env::var(var).ok();
    let mut env = base_env(name);
    for (var, value) in &agent.env {
        if let Ok(value) = Template::parse(value).and_then(|t| t.render(&lookup, None)) {
            env.retain(|(existing, _)| existing != var);
            env.push((var.clone(), value));
        }
    }
    Some(SpawnSpec {
        argv: Vec::new(),
        env,
        workdir: agent.workdir(config),
    })
}

/// [`check_agent`] for every agent of `config`, and the HTTP server's
/// token rule.
pub fn check_fleet(config: &Config) -> Vec<String> {
    let mut problems: Vec<String> = config
        .agents
        .iter()
        .flat_map(|(name, agent)| check_agent(name, agent, config))
        .collect();
    problems.extend(config.http.start_problems(&config.base_dir));
    // The embedded store's file (a broker keeps no file).
    let store = config.store_path();
    if config.broker.is_none() && !config.store.path.as_os_str().is_empty() && store.is_dir() {
        problems.push(format!(
            "store.path: {} is a directory; give a file in it, e.g. \"{}\"",
            store.display(),
            store.join("flotilla.db").display()
        ));
    }
    for (index, entry) in config.chaos.schedule.iter().enumerate() {
        if let Err(problem) =
            crate::experiment::Experiment::load(&config.resolve(&entry.experiment))
        {
            problems.push(format!("chaos.schedule[{index}].experiment: {problem}"));
        }
        if config.http.address().is_none()
            || !matches!(config.http.token(&config.base_dir), Ok(Some(_)))
        {
            problems.push(format!(
                "chaos.schedule[{index}]: scheduled experiments run through the daemon's API: they need [http] listen and a token (http.token_file, http.token or FLOTILLA_HTTP_TOKEN)"
            ));
        }
    }
    problems
}

impl AgentRuntime {
    /// Builds the runtime of agent `name` and spawns its leaser and
    /// replicas; returns the runtime and the replicas' join handles.
    ///
    /// # Panics
    /// If the agent's templates do not parse; call [`check_agent`] first.
    pub fn start(
        name: &str,
        config: &Config,
        wiring: &Wiring,
        shutdown: &watch::Receiver<Phase>,
    ) -> (Arc<Self>, Vec<tokio::task::JoinHandle<()>>) {
        let agent = config.agents[name].clone();
        let replicas = agent.replicas.min;
        let (slots, requests) = mpsc::channel(agent.replicas.max() as usize + 8);
        let mut base_env = base_env(name);
        base_env.push((INSTANCE_ENV.into(), wiring.instance.clone()));
        let gate = crate::readiness::Gate::initial(&agent.readiness);
        let runtime = Arc::new(Self {
            name: name.to_string(),
            argv: agent
                .command
                .iter()
                .map(|arg| Template::parse(arg).expect("checked by check_agent"))
                .collect(),
            env: agent
                .env
                .iter()
                .map(|(var, value)| {
                    (
                        var.clone(),
                        Template::parse(value).expect("checked by check_agent"),
                    )
                })
                .collect(),
            base_env,
            workdir: agent.workdir(config),
            status: Mutex::new(AgentStatus::new(name, agent.mode, replicas)),
            intensity: Mutex::new(Intensity::new(&agent.restart)),
            breaker: Mutex::new(crate::breaker::Breaker::new(agent.breaker.clone())),
            config: agent,
            queue: wiring.queue.clone(),
            store: wiring.store.clone(),
            clock: wiring.clock.clone(),
            slots,
            owner: wiring.owner.clone(),
            memory: wiring.memory.clone(),
            rng: Mutex::new(SmallRng::from_os_rng()),
            shutdown_grace: config.daemon.shutdown_grace.get(),
            outcomes: Arc::new(tokio::sync::Semaphore::new(OUTCOME_PERMITS as usize)),
            calls: Mutex::new(Calls::default()),
            availability: wiring.availability.clone(),
            gate_changed: tokio::sync::Notify::new(),
            notifier: wiring.notifier.clone(),
            metrics: wiring.metrics.clone(),
            gate: watch::Sender::new(gate),
            delegation: wiring.delegation.clone(),
            fleet_agents: Arc::new(wiring.fleet.agents.keys().cloned().collect()),
            checks_rollbacks: wiring.fleet.agents.values().any(|agent| {
                agent.validation.checks.iter().any(|gate| {
                    gate.on_failure == crate::config::validation::OnFailure::AutoRollback
                })
            }),
            fleet: wiring.fleet.clone(),
            orders: watch::Sender::new(Orders::default()),
            handles: Mutex::new(Vec::new()),
            phase: shutdown.clone(),
            recent: Mutex::new(VecDeque::new()),
            lost: Mutex::new(HashMap::new()),
            manager_told_ms: Mutex::default(),
            watches: Arc::new(tokio::sync::Semaphore::new(crate::watch::MAX_WATCHES)),
        });
        runtime.refresh_breaker_status(runtime.clock.steady_ms());
        // Replicas show why they wait for the first round of checks.
        let initial = runtime.gate.borrow().clone();
        runtime.set_readiness(Vec::new(), initial);
        runtime.metrics.add_agent(name);
        let mut handles = vec![tokio::spawn(leaser(
            runtime.clone(),
            requests,
            shutdown.clone(),
        ))];
        handles.push(tokio::spawn(look_for_abandoned(
            runtime.clone(),
            shutdown.clone(),
        )));
        if !runtime.config.readiness.checks.is_empty() {
            handles.push(tokio::spawn(crate::readiness::run(
                runtime.clone(),
                shutdown.clone(),
            )));
        }
        for index in 0..replicas {
            let handle = tokio::spawn(run_replica(runtime.clone(), index, shutdown.clone()));
            runtime.handles.lock().expect("handles lock").push(handle);
        }
        crate::watch::resume(&runtime);
        (runtime, handles)
    }

    /// Waits until every replica (also those added later) has stopped.
    pub async fn join_replicas(&self) {
        loop {
            let batch = std::mem::take(&mut *self.handles.lock().expect("handles lock"));
            if batch.is_empty() {
                return;
            }
            futures_util::future::join_all(batch).await;
        }
    }

    /// Adds a replica, up to `replicas.max`; returns its index, or `None`
    /// at the maximum or while the daemon stops.
    pub fn add_replica(self: &Arc<Self>) -> Option<u32> {
        if self.phase.borrow().stopping() || self.is_failed() {
            return None;
        }
        let index = {
            let mut status = self.status.lock().expect("status lock");
            if status.replicas.len() >= self.config.replicas.max() as usize {
                return None;
            }
            let index = (0..)
                .find(|index| !status.replicas.iter().any(|r| r.index == *index))
                .expect("a free index");
            // Blocked from the start if the readiness gate blocks it: the
            // next round of checks may be an interval away.
            let mut replica = ReplicaStatus::new(index);
            replica.not_ready = self.gate.borrow().blocks(index).map(str::to_string);
            status.replicas.push(replica);
            status.replicas.sort_by_key(|replica| replica.index);
            index
        };
        let handle = tokio::spawn(run_replica(self.clone(), index, self.phase.clone()));
        let mut handles = self.handles.lock().expect("handles lock");
        // Bounded: retired replicas' handles go.
        handles.retain(|handle| !handle.is_finished());
        handles.push(handle);
        Some(index)
    }

    /// Asks replica `index` to stop for good once it holds no task.
    pub fn retire_replica(&self, index: u32) {
        self.orders.send_modify(|orders| {
            orders.retire.insert(index);
        });
    }

    /// Asks replica `index`, running process `pid`, to restart now and
    /// retry its tasks.
    pub fn restart_replica(&self, index: u32, pid: u32, reason: String) {
        self.orders.send_modify(|orders| {
            orders.restart.insert(index, (pid, reason));
        });
    }

    /// The restart order for replica `index` running `pid`, taken.
    fn take_restart(&self, index: u32, pid: u32) -> Option<String> {
        let mut taken = None;
        self.orders
            .send_if_modified(|orders| match orders.restart.get(&index) {
                Some((ordered, _)) if *ordered == pid => {
                    taken = orders.restart.remove(&index).map(|(_, reason)| reason);
                    true
                }
                _ => false,
            });
        taken
    }

    fn watch_orders(&self) -> watch::Receiver<Orders> {
        self.orders.subscribe()
    }

    /// The order to abandon attempt `key`, taken (see [`Orders::abandon`]).
    fn take_abandon(&self, key: &LeaseKey) -> Option<String> {
        let mut taken = None;
        self.orders.send_if_modified(|orders| {
            taken = orders.abandon.remove(key);
            taken.is_some()
        });
        taken
    }

    /// Attempts within the last `window` ending at `now`, and how many
    /// failed.
    pub fn recent_outcomes(&self, now: crate::clock::UnixMillis, window: Duration) -> (u32, u32) {
        let since = now.saturating_sub(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
        let mut recent = self.recent.lock().expect("recent lock");
        while recent.front().is_some_and(|(at, _)| *at < since) {
            recent.pop_front();
        }
        let calls = u32::try_from(recent.len()).unwrap_or(u32::MAX);
        let failures =
            u32::try_from(recent.iter().filter(|(_, failed)| *failed).count()).unwrap_or(u32::MAX);
        (calls, failures)
    }

    /// Counts an attempt's outcome towards the watchdog's error rate, as
    /// the `AgentErrorRateHigh` alert does: hand-overs, releases and
    /// cancellations are no attempts of the agent's; a task's own fault
    /// (`rejected`: bad arguments, a result too large) is an attempt, not
    /// the agent's failure.
    fn note_outcome(&self, outcome: AttemptOutcome, task_fault: bool) {
        let failed = match outcome {
            AttemptOutcome::Completed | AttemptOutcome::Rejected => false,
            _ if task_fault => false,
            AttemptOutcome::Released
            | AttemptOutcome::Rerouted
            | AttemptOutcome::ProceededWithWarning
            | AttemptOutcome::Escalated
            | AttemptOutcome::Cancelled => return,
            _ => true,
        };
        let mut recent = self.recent.lock().expect("recent lock");
        if recent.len() >= RECENT_OUTCOMES {
            recent.pop_front();
        }
        recent.push_back((self.clock.steady_ms(), failed));
    }

    /// Remembers the tasks replica `index` held when it was lost.
    pub(crate) fn note_lost(&self, index: u32, tasks: Vec<String>) {
        self.lost.lock().expect("lost lock").insert(index, tasks);
    }

    /// Opens the breaker now (the watchdog saw too many errors); false
    /// when the breaker is disabled or already not closed.
    pub fn trip_breaker(&self, reason: &str) -> bool {
        if !self.config.breaker.enabled {
            return false;
        }
        let now = self.clock.steady_ms();
        let transition = self
            .breaker
            .lock()
            .expect("breaker lock")
            .trip(now, reason.to_string());
        match transition {
            Some(transition) => {
                self.transitioned(&transition, now);
                true
            }
            None => false,
        }
    }

    /// Tells the agent's manager (event, and with `manager_tasks` a task)
    /// that replica `index` was lost holding `tasks`, and what was done.
    /// A human is needed when no replica of the agent is left.
    fn tell_manager(&self, index: u32, reason: &str, tasks: &[String], action: &str) {
        let now = self.clock.now_ms();
        let status = self.status();
        let left = status
            .replicas
            .iter()
            .filter(|replica| replica.index != index && replica.is_ready())
            .count();
        let human_needed = status.state == AgentState::Failed || left == 0;
        if self.config.manager.is_none() && !human_needed {
            // Nobody to tell: the restart speaks for itself in the log
            // and the metrics.
            return;
        }
        let details = serde_json::json!({
            "type": "rebalance",
            "agent": self.name,
            "replica": self.replica_name(index),
            "reason": reason,
            "pending_tasks": tasks,
            "action": action,
            "replicas_left": left,
            "human_needed": human_needed,
        });
        let mut text = format!(
            "replica {} lost ({reason}) holding {} task(s); {action}",
            self.replica_name(index),
            tasks.len()
        );
        if human_needed {
            text.push_str("; no replica of the agent is left: a human is needed");
        }
        let mut event = crate::notify::Event::new(
            crate::notify::EventKind::ReplicaLost,
            now,
            human_needed,
            text,
        )
        .agent(&self.name)
        .details(details.clone());
        if let Some(manager) = &self.config.manager {
            event.text = format!("to {manager}: {}", event.text);
        }
        self.notifier.send(event);
        let Some(manager) = self
            .config
            .manager
            .clone()
            .filter(|_| self.config.manager_tasks)
        else {
            return;
        };
        // A few tasks a minute: every loss of an ordinary day reaches the
        // manager, but a crash loop must not flood it (the events still
        // say everything).
        {
            let steady = self.clock.steady_ms();
            let mut told = self.manager_told_ms.lock().expect("manager lock");
            while told
                .front()
                .is_some_and(|at| steady.saturating_sub(*at) >= 60_000)
            {
                told.pop_front();
            }
            if told.len() >= MANAGER_TASKS_PER_MINUTE {
                tracing::info!(agent = %self.name, %manager, "rebalance task not sent: {MANAGER_TASKS_PER_MINUTE} sent in the last minute; the replica_lost event says it");
                return;
            }
            told.push_back(steady);
        }
        let task = crate::queue::NewTask {
            id: format!("rebalance-{}-{index}-{now}", self.name),
            agent: manager.clone(),
            priority: crate::queue::Priority::High,
            payload: details,
        };
        let queue = self.queue.clone();
        let agent = self.name.clone();
        tokio::spawn(async move {
            if let Err(error) = queue.submit(vec![task]).await {
                tracing::warn!(%agent, %manager, %error, "could not send the rebalance task to the manager");
            }
        });
    }

    /// Carries out a `send` of this agent: the child task, its links and
    /// metrics.
    pub(crate) async fn delegate(
        &self,
        send: &crate::delegate::Send,
    ) -> Result<crate::delegate::Sent, String> {
        let sent = crate::delegate::send(
            &self.store,
            &self.delegation,
            &self.fleet_agents,
            send,
            self.clock.now_ms(),
        )
        .await?;
        if !sent.existed {
            let kind = self.metrics.task_type(&send.payload);
            self.metrics.message(&send.from, &send.to, &kind);
        }
        Ok(sent)
    }

    /// Records a watchdog action in the agent's status.
    pub fn note_watchdog(&self, event: crate::status::WatchdogEvent) {
        let mut status = self.status.lock().expect("status lock");
        status.watchdog.push(event);
        let excess = status
            .watchdog
            .len()
            .saturating_sub(crate::status::WATCHDOG_EVENTS);
        status.watchdog.drain(..excess);
    }

    /// Permits for post-accept watches.
    pub(crate) fn watch_permits(&self) -> Arc<tokio::sync::Semaphore> {
        self.watches.clone()
    }

    /// The daemon's metrics.
    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The store.
    pub(crate) fn store(&self) -> &crate::store::Store {
        &self.store
    }

    /// Where events for humans go.
    pub(crate) fn notifier(&self) -> &crate::notify::Notifier {
        &self.notifier
    }

    /// The daemon's name (lease owner).
    pub(crate) fn owner(&self) -> &str {
        &self.owner
    }

    /// The daemon's phase, to stop with it.
    pub(crate) fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.clone()
    }

    /// The clock's wall time now.
    pub(crate) fn clock_now_ms(&self) -> crate::clock::UnixMillis {
        self.clock.now_ms()
    }

    /// The agent's working directory.
    pub(crate) fn workdir(&self) -> PathBuf {
        self.workdir.clone()
    }

    /// How readiness check commands run: in the agent's working directory
    /// with its environment (task placeholders are not available).
    pub(crate) fn check_spec(&self) -> SpawnSpec {
        let lookup = |var: &str| std::env::var(var).ok();
        let mut env = self.base_env.clone();
        for (var, value) in &self.env {
            if let Ok(value) = value.render(&lookup, None) {
                env.retain(|(existing, _)| existing != var);
                env.push((var.clone(), value));
            }
        }
        SpawnSpec {
            argv: Vec::new(),
            env,
            workdir: self.workdir.clone(),
        }
    }

    /// Records a round of readiness checks and lets replicas take tasks,
    /// or stops them, accordingly.
    pub(crate) fn set_readiness(
        &self,
        checks: Vec<crate::readiness::CheckStatus>,
        gate: crate::readiness::Gate,
    ) {
        {
            let mut status = self.status.lock().expect("status lock");
            status.readiness = checks;
            for replica in &mut status.replicas {
                replica.not_ready = gate.blocks(replica.index).map(str::to_string);
            }
        }
        self.gate.send_if_modified(|current| {
            let changed = *current != gate;
            *current = gate;
            changed
        });
    }

    /// Follows which replicas may take tasks.
    fn watch_gate(&self) -> watch::Receiver<crate::readiness::Gate> {
        self.gate.subscribe()
    }

    /// A copy of the agent's status.
    pub fn status(&self) -> AgentStatus {
        self.refresh_breaker_status(self.clock.steady_ms());
        self.status.lock().expect("status lock").clone()
    }

    fn is_failed(&self) -> bool {
        self.status.lock().expect("status lock").state == AgentState::Failed
    }

    fn update_replica(&self, index: u32, update: impl FnOnce(&mut ReplicaStatus)) {
        let mut status = self.status.lock().expect("status lock");
        if let Some(replica) = status.replicas.iter_mut().find(|r| r.index == index) {
            update(replica);
        }
    }

    /// Marks the agent as shutting down (for status).
    pub fn set_stopping(&self) {
        let mut status = self.status.lock().expect("status lock");
        if status.state != AgentState::Failed {
            status.state = AgentState::Stopping;
        }
    }

    fn replica_name(&self, index: u32) -> String {
        format!("{}/{index}", self.name)
    }

    fn record_malformed(&self, index: u32, error: &LineError) {
        let mut status = self.status.lock().expect("status lock");
        status.malformed_lines += 1;
        self.metrics.malformed(&self.name);
        status.last_malformed = Some(format!("replica {index}: {error}"));
        // Logged at most once per hundred to keep a babbling agent from
        // flooding the log.
        if status.malformed_lines % 100 == 1 {
            tracing::warn!(agent = %self.name, replica = index, %error, count = status.malformed_lines, "malformed line from agent");
        }
    }

    fn record_stale(&self, index: u32, what: &str) {
        let mut status = self.status.lock().expect("status lock");
        status.stale_messages += 1;
        tracing::debug!(agent = %self.name, replica = index, what, "message for a task the replica does not hold");
    }

    /// When a lease taken or extended at `from` should be extended.
    fn renew_at(&self, from: Instant) -> Instant {
        from + renew_after(self.config.timeouts.progress_timeout.get())
    }

    /// How long a lease lasts.
    fn lease_for(&self) -> Duration {
        lease_duration(self.config.timeouts.progress_timeout.get())
    }

    /// The process spec for replica `index`, for `task` in oneshot mode.
    fn spawn_spec(
        &self,
        index: u32,
        task: Option<&TaskContext<'_>>,
    ) -> Result<SpawnSpec, TemplateError> {
        let lookup = |var: &str| std::env::var(var).ok();
        let mut argv = Vec::with_capacity(self.argv.len());
        // A payload value that begins an argument must not become an
        // option of the program (`--dangerously-skip-permissions` as a
        // prompt) unless `--` ended its options before it.
        let mut options_ended = self.config.allow_dash_args;
        for (place, arg) in self.argv.iter().enumerate() {
            let value = arg.render(&lookup, task)?;
            if place > 0 && !options_ended && arg.starts_with_payload() && value.starts_with('-') {
                return Err(TemplateError::OptionLike {
                    index: place,
                    value: crate::protocol::truncate(&value, 80),
                });
            }
            options_ended |= arg.is_literal("--");
            argv.push(value);
        }
        let mut env = self.base_env.clone();
        env.push(("FLOTILLA_REPLICA".into(), index.to_string()));
        for (var, value) in &self.env {
            let value = value.render(&lookup, task)?;
            env.retain(|(existing, _)| existing != var);
            env.push((var.clone(), value));
        }
        Ok(SpawnSpec {
            argv,
            env,
            workdir: self.workdir.clone(),
        })
    }

    /// Stores a completion without holding up the replica: the write (and
    /// the validation gates before it) runs while the replica goes on
    /// reading its agent. When [`OUTCOME_PERMITS`] completions are already
    /// pending (slow gates) it waits its turn in the background, and the
    /// agent's replicas take no new task meanwhile
    /// ([`Self::outcomes_pending`]): the replica loop itself never blocks.
    async fn complete(
        self: &Arc<Self>,
        lease: Lease,
        output: serde_json::Value,
        changes: Option<serde_json::Value>,
        replica: String,
    ) {
        let permit = self.outcomes.clone().try_acquire_owned();
        let agent = self.clone();
        let settling = self.settling(&lease.key);
        tokio::spawn(async move {
            let _settling = settling;
            let _permit = match permit {
                Ok(permit) => permit,
                Err(_) => {
                    // The wait can outlast the lease (the completions
                    // ahead may be validating for minutes): kept alive
                    // meanwhile, lest the finished work be handed out again.
                    let _renewing = agent.keep_lease(&lease.key);
                    agent
                        .outcomes
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the outcome semaphore is never closed")
                }
            };
            agent.store_result(lease, output, changes, &replica).await;
        });
    }

    /// Whether [`OUTCOME_PERMITS`] completions are pending: replicas take
    /// no new task until some are stored.
    pub(super) fn outcomes_pending(&self) -> bool {
        self.outcomes.available_permits() == 0
    }

    /// Records a result's `changes` in the task's rollback journal (none:
    /// nothing to do). Fails with how the attempt ends instead: `None`,
    /// released (the store refused the write; the lease, dropped, hands
    /// the task back); a failure, when the journal has no room for them
    /// (the task's fault: dead-lettered, never accepted half-recorded).
    async fn journal(
        &self,
        key: &LeaseKey,
        changes: Vec<crate::rollback::Change>,
    ) -> Result<(), Option<Failure>> {
        if changes.is_empty() {
            return Ok(());
        }
        match crate::rollback::record(&self.store, &key.task_id, &self.name, key.attempt, changes)
            .await
        {
            Ok(_) => Ok(()),
            Err(QueueError::Invalid(reason)) => Err(Some(Failure::rejected(reason))),
            Err(error) => {
                tracing::error!(%error, "could not record the result's changes; the task will be released");
                self.finish_call(key, AttemptOutcome::Released);
                Err(None)
            }
        }
    }

    /// Validates a result and completes the task with it; a result the
    /// gates or the store refuse fails the attempt with the reason.
    async fn store_result(
        self: &Arc<Self>,
        lease: Lease,
        output: serde_json::Value,
        changes: Option<serde_json::Value>,
        replica: &str,
    ) {
        let span = self.attempt_span(&lease.key);
        let _settling = self.settling(&lease.key);
        self.store_result_in_span(lease, output, changes, replica)
            .instrument(span)
            .await;
    }

    async fn store_result_in_span(
        self: &Arc<Self>,
        mut lease: Lease,
        output: serde_json::Value,
        changes: Option<serde_json::Value>,
        replica: &str,
    ) {
        let changes = match changes.as_ref().map(crate::rollback::parse_changes) {
            None => Vec::new(),
            Some(Ok(changes)) => changes,
            Some(Err(problem)) => {
                // The agent's own mistake (as a malformed line is), so an
                // error it may not make again: retried, and counted
                // against its error rate.
                let failure =
                    Failure::new(AttemptOutcome::Error, format!("the result's {problem}"));
                self.fail_attempt(lease, failure, replica).await;
                return;
            }
        };
        // Gates and watches go by the payload's own type, not the
        // metrics' bounded label.
        let kind = task_kind(&lease.payload);
        let (output, notes) = if crate::validate::gates(self, &kind).is_empty() {
            (output, Vec::new())
        } else {
            // Kept alive until the decision is carried out: an
            // auto_rollback can take minutes, and the task must not be
            // handed out again while its changes are being undone.
            let _renewing = self.keep_lease(&lease.key);
            // Journaled before the gates run (they may take minutes): a
            // daemon lost meanwhile must not lose the record of changes the
            // agent already made. Recording is idempotent per attempt.
            match self.journal(&lease.key, changes.clone()).await {
                Ok(()) => {}
                Err(None) => return,
                Err(Some(failure)) => {
                    self.fail_attempt(lease, failure, replica).await;
                    return;
                }
            }
            let decision = crate::validate::validate(self, &lease, output, &kind).await;
            match decision {
                crate::validate::Decision::Accept { output, notes } => (output, notes),
                crate::validate::Decision::Retry { report } => {
                    let failure = Failure::new(AttemptOutcome::ValidationFailed, report);
                    self.fail_attempt(lease, failure, replica).await;
                    return;
                }
                crate::validate::Decision::Escalate { to, report } => {
                    self.escalate_result(lease, to.as_deref(), &report, replica)
                        .await;
                    return;
                }
                crate::validate::Decision::CouldNotRun { report } => {
                    tracing::error!(agent = %self.name, task = %lease.key, %report, "validation could not run");
                    self.finish_call_uncounted(&lease.key, AttemptOutcome::Error);
                    let failure = Failure::new(
                        AttemptOutcome::Error,
                        format!("validation could not run: {report}"),
                    );
                    self.fail_attempt(lease, failure, replica).await;
                    return;
                }
                crate::validate::Decision::Rollback { report } => {
                    let undone = self.roll_back_result(&lease, changes, &report).await;
                    let failure = Failure::new(
                        AttemptOutcome::ValidationFailed,
                        format!("{report}; auto_rollback: {undone}"),
                    );
                    self.fail_attempt(lease, failure, replica).await;
                    return;
                }
            }
        };
        // The journal is written before the ack, so that an accepted task
        // can always be rolled back.
        match self.journal(&lease.key, changes).await {
            Ok(()) => {}
            Err(None) => return,
            Err(Some(failure)) => {
                self.fail_attempt(lease, failure, replica).await;
                return;
            }
        }
        let end = AttemptEnd {
            outcome: AttemptOutcome::Completed,
            replica: Some(replica.to_string()),
            detail: (!notes.is_empty())
                .then(|| format!("optional checks failed: {}", notes.join("; "))),
        };
        match self.queue.ack(&lease.key, &output, end).await {
            Ok(_) => {
                self.finish_call(&lease.key, AttemptOutcome::Completed);
                lease.settle();
                crate::watch::start(self, &lease.key.task_id, lease.key.attempt, &kind);
            }
            Err(QueueError::Invalid(message)) => {
                self.fail_attempt(lease, Failure::rejected(message), replica)
                    .await;
            }
            Err(error) => self.settle(&mut lease, Err(error)),
        }
    }

    /// Keeps `key`'s lease alive while the daemon validates its result, or
    /// stops the process working on it. Renews at once (the result may
    /// have come late in the lease), then every half renewal interval;
    /// stops when the guard is dropped.
    fn keep_lease(&self, key: &crate::queue::LeaseKey) -> AbortOnDrop {
        let queue = self.queue.clone();
        let key = key.clone();
        let lease_for = self.lease_for();
        let every = (renew_after(self.config.timeouts.progress_timeout.get()) / 2)
            .max(Duration::from_millis(100));
        AbortOnDrop(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            loop {
                ticker.tick().await;
                if let Err(error) = queue.progress(&key, lease_for, None).await {
                    tracing::warn!(task = %key, %error, "could not extend the lease");
                }
            }
        }))
    }

    /// `lease`, unless it is a waited-for child whose parent is a dead
    /// letter (the parent's end cancels its children, but a crash or a
    /// store error in between leaves them queued): then it is cancelled
    /// rather than run, and `None`.
    async fn unless_orphaned(&self, mut lease: Lease) -> Option<Lease> {
        let Some(parent) = crate::delegate::orphaned(&self.store, &lease.key.task_id).await else {
            return Some(lease);
        };
        let task = lease.key.task_id.clone();
        let reason = crate::delegate::orphan_reason(&parent);
        let end = AttemptEnd::new(AttemptOutcome::Cancelled, None, reason.clone());
        match self.queue.term(&lease.key, &reason, end).await {
            Ok(()) => {
                lease.settle();
                tracing::warn!(agent = %self.name, %task, %reason, "a child whose waiting parent is a dead letter was cancelled, not run");
                crate::delegate::orphan_cancelled(&self.store, &task, &parent).await;
                None
            }
            // Cancelled meanwhile (by the parent's own end, most likely):
            // not ours to run.
            Err(QueueError::StaleLease { .. } | QueueError::NotFound { .. }) => {
                lease.settle();
                None
            }
            Err(error) => {
                tracing::warn!(agent = %self.name, %task, %error, "could not cancel a child whose waiting parent is a dead letter; running it");
                Some(lease)
            }
        }
    }

    /// `lease`, unless a rollback of one of its earlier attempts is
    /// running or was cut off (the daemon that ran a gate's
    /// `auto_rollback` died): the next attempt must not run on top of
    /// changes that were being undone. Then the lease is held (renewed)
    /// in the background while that rollback ends, or is finished here,
    /// and released uncharged to be leased again.
    async fn unless_rolling_back(self: &Arc<Self>, lease: Lease) -> Option<Lease> {
        if !self.checks_rollbacks || lease.key.attempt < 2 {
            return Some(lease);
        }
        let task = lease.key.task_id.clone();
        match crate::rollback::running(&self.store, &task, self.clock.now_ms()).await {
            Ok(crate::rollback::Running::No) => return Some(lease),
            Err(error) => {
                tracing::warn!(agent = %self.name, %task, %error, "could not check for an unfinished rollback of an earlier attempt; running the task");
                return Some(lease);
            }
            Ok(_) => {}
        }
        let agent = self.clone();
        tokio::spawn(async move {
            let _renewing = agent.keep_lease(&lease.key);
            let mut phase = agent.phase();
            let mut phase_closed = false;
            let detail = loop {
                if phase_closed || phase.borrow().stopping() {
                    break "the daemon shut down while an earlier attempt's rollback ran"
                        .to_string();
                }
                let now = agent.clock.now_ms();
                let wait = match crate::rollback::running(&agent.store, &task, now).await {
                    Ok(crate::rollback::Running::No) => {
                        break "an earlier attempt's rollback ended first".to_string();
                    }
                    Ok(crate::rollback::Running::Live { until_ms, because }) => {
                        tracing::info!(agent = %agent.name, %task, %because, "waiting for the rollback of an earlier attempt before running the task again");
                        Duration::from_millis(until_ms.saturating_sub(now))
                    }
                    Ok(crate::rollback::Running::CutOff { because }) => {
                        tracing::warn!(agent = %agent.name, %task, %because, "finishing a rollback of an earlier attempt that was cut off");
                        let (undone, unfinished) = match crate::rollback::load(&agent.store, &task)
                            .await
                        {
                            Ok(Some(mut journal)) => {
                                agent
                                    .try_rollback(
                                        &mut journal,
                                        &format!(
                                            "finishing a rollback that was cut off ({because})"
                                        ),
                                    )
                                    .await
                            }
                            Ok(None) => ("no journal".into(), false),
                            Err(error) => (format!("its journal could not be read: {error}"), true),
                        };
                        if unfinished {
                            // Taken by another rollback, or the store
                            // failed: looked at again, its claim kept.
                            tracing::warn!(agent = %agent.name, %task, %undone, "the rollback of an earlier attempt is not finished; looking again");
                            ROLLBACK_RECHECK
                        } else {
                            tracing::warn!(agent = %agent.name, %task, %undone, "rollback of an earlier attempt finished");
                            // Left by a rollback cut off after its last
                            // command, the claim is removed; a live one
                            // (taken meanwhile) is waited for.
                            match crate::rollback::clear_cut_off(
                                &agent.store,
                                &task,
                                agent.clock.now_ms(),
                            )
                            .await
                            {
                                Ok(_) => Duration::ZERO,
                                Err(error) => {
                                    tracing::warn!(agent = %agent.name, %task, %error, "could not clear the claim of a rollback that was cut off; looking again");
                                    ROLLBACK_RECHECK
                                }
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(agent = %agent.name, %task, %error, "could not check the rollback of an earlier attempt; looking again");
                        ROLLBACK_RECHECK
                    }
                };
                let wait = wait.clamp(Duration::from_millis(10), ROLLBACK_RECHECK);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    changed = phase.changed() => phase_closed = changed.is_err(),
                }
            };
            agent.release(lease, "leaser", &detail).await;
        });
        None
    }

    /// A validation gate escalated the result: to agent `to` (the task is
    /// handed over, the report its feedback), or to a human.
    async fn escalate_result(
        &self,
        mut lease: Lease,
        to: Option<&str>,
        report: &str,
        replica: &str,
    ) {
        self.finish_call(&lease.key, AttemptOutcome::ValidationFailed);
        let key = lease.key.clone();
        let result = match to {
            Some(target) => {
                let end = AttemptEnd::new(
                    AttemptOutcome::Rerouted,
                    Some(replica.to_string()),
                    format!("validation failed, escalated to agent {target}: {report}"),
                );
                self.queue.reroute(&key, target, end).await
            }
            None => {
                let end =
                    AttemptEnd::new(AttemptOutcome::Escalated, Some(replica.to_string()), report);
                let reason = format!("validation failed: {report}");
                let result = self.queue.escalate(&key, &reason, end).await;
                if result.is_ok() {
                    self.metrics.escalated(&self.name);
                    self.notifier.send(
                        crate::notify::Event::new(
                            crate::notify::EventKind::Escalation,
                            self.clock.now_ms(),
                            true,
                            format!(
                                "task {} of agent {} needs a human: {reason}; resolve with `flotilla escalations resolve {} --retry|--complete JSON|--drop`",
                                key.task_id, self.name, key.task_id
                            ),
                        )
                        .agent(&self.name)
                        .task(&key.task_id),
                    );
                }
                result
            }
        };
        if result.is_ok() {
            tracing::warn!(to = to.unwrap_or("a human"), %report, "result escalated by a validation gate");
        }
        self.settle(&mut lease, result);
    }

    /// Records and undoes the changes a rejected result declared; says
    /// what happened.
    async fn roll_back_result(
        &self,
        lease: &Lease,
        changes: Vec<crate::rollback::Change>,
        report: &str,
    ) -> String {
        if changes.is_empty() {
            return "the result declared no changes".into();
        }
        let recorded = crate::rollback::record(
            &self.store,
            &lease.key.task_id,
            &self.name,
            lease.key.attempt,
            changes,
        )
        .await;
        let mut journal = match recorded {
            Ok(journal) => journal,
            Err(error) => return format!("the changes could not be recorded: {error}"),
        };
        self.run_rollback(&mut journal, &format!("validation: {report}"))
            .await
    }

    /// Undoes `journal`, each change as the agent that declared it; says
    /// what happened.
    pub(crate) async fn run_rollback(
        &self,
        journal: &mut crate::rollback::Journal,
        because: &str,
    ) -> String {
        self.try_rollback(journal, because).await.0
    }

    /// [`Self::run_rollback`], and whether the rollback is left unfinished:
    /// another one holds the task, or the store failed.
    pub(crate) async fn try_rollback(
        &self,
        journal: &mut crate::rollback::Journal,
        because: &str,
    ) -> (String, bool) {
        let fleet = self.fleet.clone();
        let spec_for = move |agent: &str| command_spec(&fleet, agent);
        let clock = self.clock.clone();
        let result = crate::rollback::roll_back(
            &self.store,
            journal,
            because,
            &spec_for,
            ROLLBACK_TIMEOUT,
            move || clock.now_ms(),
        )
        .await;
        match result {
            Err(error @ crate::rollback::RollbackError::Busy { .. }) => (
                format!("the rollback was left to the one already running: {error}"),
                true,
            ),
            Err(error @ crate::rollback::RollbackError::Store(_)) => {
                (format!("the rollback could not be recorded: {error}"), true)
            }
            Err(error) => (
                format!("the rollback could not be recorded: {error}"),
                false,
            ),
            Ok(()) if journal.failed().is_none() => (journal.summary(), false),
            Ok(()) => (
                format!(
                    "the rollback failed, see `flotilla rollback {}`:\n{}",
                    journal.task,
                    crate::rollback::describe(journal)
                ),
                false,
            ),
        }
    }

    /// The span of one attempt: every log line inside it names the agent,
    /// the task and the attempt, so one task can be followed through the
    /// logs (`--log-format json` puts them in each line's `spans`).
    pub(crate) fn attempt_span(&self, key: &crate::queue::LeaseKey) -> tracing::Span {
        // Already inside this attempt's span (a oneshot run): do not nest
        // another. WARN level, so warnings keep their context when the
        // log shows only warnings.
        let current = tracing::Span::current();
        if current
            .metadata()
            .is_some_and(|metadata| metadata.name() == "attempt")
        {
            return current;
        }
        tracing::warn_span!("attempt", agent = %self.name, task = %key.task_id, attempt = key.attempt)
    }

    /// Waits until every completion handed to [`Self::complete`] is stored.
    pub async fn flush_outcomes(&self) {
        let _all = self.outcomes.acquire_many(OUTCOME_PERMITS).await;
    }

    /// The `task` message for `lease`, its deadline counted from now.
    fn task_message(&self, lease: &Lease) -> crate::protocol::ToAgent {
        let timeouts = &self.config.timeouts;
        let millis = |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        crate::protocol::ToAgent::Task(crate::protocol::TaskMessage {
            id: lease.key.task_id.clone(),
            attempt: lease.key.attempt,
            agent: self.name.clone(),
            payload: lease.payload.clone(),
            checkpoint: lease.checkpoint.clone(),
            feedback: lease.feedback.clone(),
            deadline_ms: self
                .clock
                .now_ms()
                .saturating_add(millis(timeouts.max_duration.get())),
            progress_timeout_ms: millis(timeouts.progress_timeout.get()),
        })
    }

    /// Settles a failed attempt: dead letter when not retryable or out of
    /// attempts, otherwise back to the queue after the retry delay (at once
    /// for `immediate`).
    async fn fail_attempt(&self, lease: Lease, failure: Failure, replica: &str) {
        let span = self.attempt_span(&lease.key);
        self.fail_attempt_in_span(lease, failure, replica)
            .instrument(span)
            .await;
    }

    async fn fail_attempt_in_span(&self, mut lease: Lease, failure: Failure, replica: &str) {
        let Failure {
            outcome,
            detail,
            retryable,
            immediate,
            retry_after,
        } = failure;
        // A task that cannot succeed (not retryable) says nothing about
        // the agent's health: a bad payload must not open the breaker, nor
        // count for the watchdog's error rate.
        if retryable {
            self.finish_call(&lease.key, outcome);
        } else {
            self.finish_task_fault(&lease.key, outcome);
        }
        let end = AttemptEnd::new(outcome, Some(replica.to_string()), detail.clone());
        let max_deliver = self.config.retry.max_deliver.get();
        tracing::info!(
            outcome = outcome.as_str(),
            %detail,
            retryable,
            charged = lease.charged,
            max_deliver,
            "attempt failed"
        );
        let result = if !retryable || lease.charged >= max_deliver {
            let reason = if retryable {
                format!(
                    "attempts exhausted (retry.max_deliver = {max_deliver}); last attempt: {}: {detail}",
                    outcome.as_str()
                )
            } else {
                format!("{} (not retryable): {detail}", outcome.as_str())
            };
            let termed = self.queue.term(&lease.key, &reason, end).await;
            if termed.is_ok() {
                // The children it waited for are no longer wanted.
                let cancelled = crate::delegate::dead_lettered(
                    &self.store,
                    &self.metrics,
                    &lease.key.task_id,
                    &self.name,
                )
                .await;
                if cancelled > 0 {
                    tracing::info!(task = %lease.key.task_id, cancelled, "cancelled the children the dead-lettered task waited for");
                }
            }
            termed
        } else {
            let delay = if immediate {
                Duration::ZERO
            } else {
                let mut rng = self.rng.lock().expect("rng lock");
                crate::retry::delay(
                    &self.config.retry.backoff,
                    lease.charged,
                    retry_after,
                    &mut *rng,
                )
            };
            self.queue.nak(&lease.key, delay, end).await
        };
        self.settle(&mut lease, result.map(|_| ()));
    }

    /// Marks `lease` settled unless the outcome could not be stored, in
    /// which case dropping it releases the task.
    fn settle(&self, lease: &mut Lease, result: Result<(), QueueError>) {
        // Whatever happened, the breaker stops waiting for this call (a
        // no-op when its outcome was recorded already).
        self.finish_call(&lease.key, AttemptOutcome::Released);
        match result {
            Ok(()) => lease.settle(),
            Err(QueueError::StaleLease { .. } | QueueError::NotFound { .. }) => {
                tracing::warn!(agent = %self.name, task = %lease.key, "outcome for a task this replica no longer holds was ignored");
                lease.settle();
            }
            Err(error) => {
                tracing::error!(agent = %self.name, task = %lease.key, %error, "could not store an outcome; the task will be released");
            }
        }
    }

    /// Gives a lease back without charging an attempt.
    async fn release(&self, mut lease: Lease, replica: &str, detail: &str) {
        self.finish_call(&lease.key, AttemptOutcome::Released);
        let end = AttemptEnd::new(AttemptOutcome::Released, Some(replica.to_string()), detail);
        let result = self.queue.release(&lease.key, end).await;
        self.settle(&mut lease, result);
    }

    /// Extends the lease on progress when due, storing `checkpoint`.
    async fn progress(
        &self,
        tracked: &mut Tracked,
        checkpoint: Option<&serde_json::Value>,
    ) -> Result<(), QueueError> {
        let now = Instant::now();
        tracked.last_progress = now;
        if checkpoint.is_none() && now < tracked.renew_at {
            return Ok(());
        }
        let lease_for = self.lease_for();
        match self
            .queue
            .progress(&tracked.lease.key, lease_for, checkpoint)
            .await
        {
            Ok(()) => {
                tracked.renew_at = self.renew_at(now);
                Ok(())
            }
            Err(QueueError::Invalid(message)) => {
                tracing::warn!(agent = %self.name, task = %tracked.lease.key, %message, "checkpoint not stored");
                Ok(())
            }
            // Only the queue saying the lease is gone ends the attempt; a
            // passing store error is retried with the next progress.
            Err(error @ (QueueError::StaleLease { .. } | QueueError::NotFound { .. })) => {
                Err(error)
            }
            Err(error) => {
                tracing::warn!(agent = %self.name, task = %tracked.lease.key, %error, "could not extend the lease; trying again with the next progress");
                Ok(())
            }
        }
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A task's type for gates and watches: its payload's `type`, or
/// `default`.
pub(crate) fn task_kind(payload: &serde_json::Value) -> String {
    payload
        .get("type")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("default")
        .to_string()
}

/// A lease lasts twice the progress timeout plus a margin, and is extended
/// on a progress message once less than one progress timeout plus the
/// margin is left. Since the watchdog wants a progress message at least
/// every progress timeout, the lease always outlives the attempt while the
/// daemon lives.
fn lease_duration(progress_timeout: Duration) -> Duration {
    progress_timeout
        .saturating_mul(2)
        .saturating_add(LEASE_MARGIN)
}

/// How often the attempts running here are compared with the store, and
/// how old an attempt must be to be looked at.
const ABANDON_CHECK: Duration = Duration::from_secs(3);

/// Every [`ABANDON_CHECK`]: the attempts this agent's replicas run whose
/// task the store no longer gives them (cancelled by `tasks cancel` from
/// any process, or taken over by another daemon) are ordered abandoned,
/// so that the agent hears `cancel` within seconds rather than at its
/// next lease extension (up to `progress_timeout` away), and stops
/// spending on work nobody wants.
async fn look_for_abandoned(agent: Arc<AgentRuntime>, mut shutdown: watch::Receiver<Phase>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(ABANDON_CHECK) => {}
            changed = shutdown.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        if shutdown.borrow().stopping() {
            return;
        }
        let running = agent.running_attempts(ABANDON_CHECK);
        // Orders for attempts no longer running here are dropped.
        agent.orders.send_if_modified(|orders| {
            let before = orders.abandon.len();
            orders.abandon.retain(|key, _| running.contains(key));
            orders.abandon.len() != before
        });
        for key in running {
            let read = tokio::select! {
                read = agent.queue.get(&key.task_id) => read,
                _ = shutdown.changed() => return,
            };
            let why = match read {
                Ok(None) => "the task was deleted".to_string(),
                Ok(Some(task)) if task.state != TaskState::Running => {
                    format!("the task is {} now", task.state)
                }
                Ok(Some(task)) if task.attempts != key.attempt => {
                    format!("the task runs as attempt {} elsewhere now", task.attempts)
                }
                // Still ours: the next one.
                Ok(Some(_)) => continue,
                // The store unreachable: the lease extensions decide, and
                // this round ends (every read would wait as long).
                Err(_) => break,
            };
            agent.orders.send_modify(|orders| {
                orders.abandon.insert(key, why);
            });
        }
    }
}

/// How long after taking or extending a lease the next progress extends it.
fn renew_after(progress_timeout: Duration) -> Duration {
    progress_timeout
}

/// How an attempt failed.
#[derive(Clone)]
struct Failure {
    outcome: AttemptOutcome,
    detail: String,
    retryable: bool,
    immediate: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    /// The task itself cannot succeed (bad arguments, result too large):
    /// dead-lettered at once.
    fn rejected(detail: impl Into<String>) -> Self {
        Self {
            retryable: false,
            ..Self::new(AttemptOutcome::Rejected, detail)
        }
    }

    fn new(outcome: AttemptOutcome, detail: impl Into<String>) -> Self {
        Self {
            outcome,
            detail: detail.into(),
            retryable: true,
            immediate: false,
            retry_after: None,
        }
    }
}

/// A task in flight with its timers.
struct Tracked {
    lease: Lease,
    last_progress: Instant,
    deadline: Instant,
    renew_at: Instant,
    /// The keys of the sends whose replies it waits for (its child
    /// tasks), one waiter each: the progress watchdog rests meanwhile
    /// (each wait is bounded by its own timeout).
    waited: HashMap<String, AbortOnDrop>,
}

impl Tracked {
    fn new(lease: Lease, agent: &AgentRuntime) -> Self {
        let now = Instant::now();
        Self {
            lease,
            last_progress: now,
            deadline: now + agent.config.timeouts.max_duration.get(),
            renew_at: agent.renew_at(now),
            waited: HashMap::new(),
        }
    }

    /// When this task's next timeout falls.
    fn next_timeout(&self, agent: &AgentRuntime) -> Instant {
        if !self.waited.is_empty() {
            return self.deadline;
        }
        self.deadline
            .min(self.last_progress + agent.config.timeouts.progress_timeout.get())
    }

    /// The timeout that has passed, if any.
    fn expired(&self, agent: &AgentRuntime, now: Instant) -> Option<Failure> {
        let timeouts = &agent.config.timeouts;
        if now >= self.deadline {
            return Some(Failure::new(
                AttemptOutcome::MaxDuration,
                format!("ran past timeouts.max_duration = {}", timeouts.max_duration),
            ));
        }
        if self.waited.is_empty() && now >= self.last_progress + timeouts.progress_timeout.get() {
            return Some(Failure::new(
                AttemptOutcome::ProgressTimeout,
                format!(
                    "no progress for timeouts.progress_timeout = {}",
                    timeouts.progress_timeout
                ),
            ));
        }
        None
    }
}

/// How many tasks an agent took per second recently (leases handed to its
/// replicas): the leaser leases at most that many ahead, so a slow agent
/// never holds tasks it cannot start soon.
#[derive(Debug)]
struct Rate {
    window_start: Instant,
    current: u32,
    previous: u32,
}

impl Rate {
    fn new() -> Self {
        Self {
            window_start: Instant::now(),
            current: 0,
            previous: 0,
        }
    }

    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= Duration::from_secs(2) {
            self.previous = 0;
            self.current = 0;
            self.window_start = now;
        } else if elapsed >= Duration::from_secs(1) {
            self.previous = self.current;
            self.current = 0;
            self.window_start += Duration::from_secs(1);
        }
    }

    fn record(&mut self) {
        self.roll(Instant::now());
        self.current = self.current.saturating_add(1);
    }

    fn per_second(&mut self) -> u32 {
        self.roll(Instant::now());
        self.previous.max(self.current)
    }
}

/// A lease call in flight, with how many tasks it asked for.
type LeaseFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = (usize, Result<Vec<Lease>, QueueError>)> + Send>,
>;

/// Lease calls one leaser keeps in flight at most.
const LEASES_IN_FLIGHT: usize = 4;

/// Leases tasks for idle replicas of one agent: as many as are waiting,
/// plus up to `prefetch` ahead (at most what its replicas took in the last
/// second), held for at most [`PREFETCH_TTL`]. The next batch is leased
/// while the current one is handed out, so replicas do not wait for the
/// store's commit.
async fn leaser(
    agent: Arc<AgentRuntime>,
    mut requests: mpsc::Receiver<SlotRequest>,
    mut shutdown: watch::Receiver<Phase>,
) {
    let mut pending: VecDeque<SlotRequest> = VecDeque::new();
    let mut ahead: VecDeque<(Lease, Instant)> = VecDeque::new();
    let mut rate = Rate::new();
    let mut failures = 0u32;
    // Several lease calls may be in flight: requests that arrive while one
    // is pending get their own call, which joins the next group commit.
    let mut leasing: futures_util::stream::FuturesUnordered<LeaseFuture> = Default::default();
    let mut asked = 0usize;
    let mut retry_at: Option<Instant> = None;
    loop {
        while let Ok(request) = requests.try_recv() {
            pending.push_back(request);
        }
        pending.retain(|request| !request.reply.is_closed());
        while !pending.is_empty() {
            let Some((lease, leased_at)) = ahead.pop_front() else {
                break;
            };
            if let Some(lease) = agent.hand_out_gated(&mut pending, lease, &mut rate).await {
                ahead.push_front((lease, leased_at));
            }
        }
        let mode = agent.mode(agent.clock.steady_ms());
        let now = Instant::now();
        // Without prefetch nothing is held: a task whose replica went away
        // (not ready any more, stopping) goes back at once.
        let holds = agent.config.prefetch > 0;
        while ahead
            .front()
            .is_some_and(|(_, at)| !holds || now.saturating_duration_since(*at) >= PREFETCH_TTL)
        {
            let (lease, _) = ahead.pop_front().expect("checked");
            let why = if holds {
                "leased ahead but not started in time"
            } else {
                "the replica it was leased for no longer takes tasks"
            };
            agent.release(lease, "leaser", why).await;
        }
        if shutdown.borrow().stopping() {
            break;
        }
        // What to lease now: for waiting replicas and ahead as usual; only
        // probes while half-open; batches to divert while unavailable;
        // nothing while its tasks wait for the breaker.
        let (target, limit, diverting, hold_until) = match &mode {
            gate::Mode::Normal => (
                rate.per_second().min(agent.config.prefetch) as usize,
                usize::MAX,
                false,
                None,
            ),
            // With no probe slot free, look again in a second (lost calls
            // are swept there).
            gate::Mode::Probing(capacity) => (
                0,
                *capacity as usize,
                false,
                (*capacity == 0).then(|| agent.clock.steady_ms() + 1_000),
            ),
            gate::Mode::Diverting(_) => (0, 0, true, None),
            gate::Mode::Holding(until) => (0, 0, false, Some(*until)),
        };
        let starved = pending.len() > asked;
        let low = ahead.len() + asked < target.div_ceil(2);
        let wanted = (pending.len() + target).min(limit);
        let have = ahead.len() + asked;
        let may_lease = leasing.len() < LEASES_IN_FLIGHT && retry_at.is_none_or(|at| now >= at);
        if diverting && leasing.is_empty() && may_lease {
            let request = LeaseRequest {
                agent: agent.name.clone(),
                max: DIVERT_BATCH,
                lease_for: agent.lease_for(),
                owner: agent.owner.clone(),
                max_deliver: agent.config.retry.max_deliver.get(),
                lowest: agent.lowest_priority(),
            };
            let queue = agent.queue.clone();
            asked += DIVERT_BATCH;
            leasing.push(Box::pin(async move {
                (DIVERT_BATCH, queue.lease(&request, DIVERT_WAIT).await)
            }));
        } else if (starved || low) && wanted > have && may_lease {
            let max = wanted - have;
            let request = LeaseRequest {
                agent: agent.name.clone(),
                max,
                lease_for: agent.lease_for(),
                owner: agent.owner.clone(),
                max_deliver: agent.config.retry.max_deliver.get(),
                // Probes are taken whatever their priority.
                lowest: if matches!(mode, gate::Mode::Probing(_)) {
                    crate::queue::Priority::Low
                } else {
                    agent.lowest_priority()
                },
            };
            // Wait for work only when a replica is waiting for it.
            let wait = if starved { LEASE_WAIT } else { Duration::ZERO };
            let queue = agent.queue.clone();
            asked += max;
            leasing.push(Box::pin(
                async move { (max, queue.lease(&request, wait).await) },
            ));
        }
        let expiry = ahead.front().map(|(_, at)| *at + PREFETCH_TTL);
        let hold = hold_until.map(|until| {
            now + Duration::from_millis(until.saturating_sub(agent.clock.steady_ms()).max(10))
        });
        let wake = [expiry, retry_at, hold].into_iter().flatten().min();
        // Lease calls are never dropped mid-way: at shutdown they are awaited
        // and what they took is released (see the end of this function).
        tokio::select! {
            biased;
            changed = shutdown.changed() => {
                // The daemon is gone without a goodbye: stop too.
                if changed.is_err() {
                    break;
                }
            }
            Some((max, leased)) = futures_util::StreamExt::next(&mut leasing), if !leasing.is_empty() => {
                asked -= max;
                match leased {
                    Ok(leases) => {
                        failures = 0;
                        retry_at = None;
                        let now = Instant::now();
                        // Once per batch: the gate rarely changes within one.
                        let lowest = agent.lowest_priority();
                        let mode = if leases.is_empty() {
                            gate::Mode::Normal
                        } else {
                            agent.mode(agent.clock.steady_ms())
                        };
                        for lease in leases {
                            let Some(lease) = agent.unless_orphaned(lease).await else {
                                continue;
                            };
                            let Some(lease) = agent.unless_rolling_back(lease).await else {
                                continue;
                            };
                            if lease.priority > lowest && !matches!(mode, gate::Mode::Probing(_)) {
                                // The level rose while the lease call ran.
                                agent.release(lease, "leaser", "held back by the degradation level").await;
                            } else if let gate::Mode::Diverting(why) = &mode {
                                agent.divert(lease, why).await;
                            } else if let Some(lease) =
                                agent.hand_out_gated(&mut pending, lease, &mut rate).await
                            {
                                ahead.push_back((lease, now));
                            }
                        }
                    }
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        let pause = Duration::from_millis(100 * 2u64.pow(failures.min(6)))
                            .min(Duration::from_secs(5));
                        tracing::error!(agent = %agent.name, %error, ?pause, "leasing failed; retrying");
                        retry_at = Some(Instant::now() + pause);
                    }
                }
            }
            request = requests.recv() => match request {
                Some(request) => pending.push_back(request),
                None => break,
            },
            () = agent.gate_changed.notified() => {}
            () = tokio::time::sleep_until(wake.unwrap_or(now + LEASE_WAIT)), if wake.is_some() => {
                if retry_at.is_some_and(|at| Instant::now() >= at) {
                    retry_at = None;
                }
            }
        }
    }
    // Lease calls still in flight may already have taken tasks: let them
    // finish (each waits at most LEASE_WAIT) and hand their tasks back.
    while let Some((_, leased)) = futures_util::StreamExt::next(&mut leasing).await {
        if let Ok(leases) = leased {
            ahead.extend(leases.into_iter().map(|lease| (lease, Instant::now())));
        }
    }
    for (lease, _) in ahead {
        agent.release(lease, "leaser", "the daemon shut down").await;
    }
}

impl AgentRuntime {
    /// The least urgent priority the degradation level lets through.
    pub(crate) fn lowest_priority(&self) -> crate::queue::Priority {
        self.availability.level().lowest_priority()
    }

    /// The fleet's availability and degradation state this agent shares.
    pub fn availability(&self) -> &Availability {
        &self.availability
    }

    /// Whether the breaker is half-open now (the next admitted task is a
    /// probe).
    fn probing(&self) -> bool {
        self.config.breaker.enabled
            && self
                .breaker
                .lock()
                .expect("breaker lock")
                .state(self.clock.steady_ms())
                == crate::breaker::BreakerState::HalfOpen
    }

    /// Wakes the leaser: the breaker or the degradation level changed.
    pub fn wake_leaser(&self) {
        self.gate_changed.notify_one();
    }

    /// Gives `lease` to a waiting replica if the breaker admits it; a task
    /// the breaker turns away goes to the fallback (breaker open) or back
    /// to the queue (half-open, probes out). Returns the lease when no
    /// replica is waiting.
    async fn hand_out_gated(
        self: &Arc<Self>,
        pending: &mut VecDeque<SlotRequest>,
        lease: Lease,
        rate: &mut Rate,
    ) -> Option<Lease> {
        let lowest = self.lowest_priority();
        // A probe goes whatever its priority: at level 2 or 3 an agent
        // whose tasks are all `normal` could otherwise never recover.
        if lease.priority > lowest && !self.probing() {
            // Leased before the degradation level rose.
            let level = self.availability.level();
            self.release(
                lease,
                "leaser",
                &format!(
                    "held back: degradation level {level} dispatches only {} and more urgent",
                    lowest.as_str()
                ),
            )
            .await;
            return None;
        }
        if !self.admit(&lease) {
            match self.mode(self.clock.steady_ms()) {
                gate::Mode::Diverting(why) => self.divert(lease, &why).await,
                _ => {
                    self.release(lease, "leaser", "waiting for the circuit breaker's probes")
                        .await;
                }
            }
            return None;
        }
        let key = lease.key.clone();
        match hand_out(pending, Handed::new(lease, Arc::downgrade(self))) {
            None => {
                self.received(&key);
                rate.record();
                None
            }
            Some(handed) => {
                // Nobody took it: it was not sent, so it is no call.
                self.unsent(&key);
                Some(handed.take())
            }
        }
    }
}

/// Gives `lease` to the first waiting replica still listening; returns it
/// when none is left.
fn hand_out(pending: &mut VecDeque<SlotRequest>, mut lease: Handed) -> Option<Handed> {
    while let Some(request) = pending.pop_front() {
        match request.reply.send(lease) {
            Ok(()) => return None,
            Err(back) => lease = back,
        }
    }
    Some(lease)
}

/// How one process of a replica ended.
enum Exit {
    /// The daemon is shutting down; do not restart.
    Shutdown,
    /// The fleet watchdog removed the replica (it was idle).
    Retired,
    /// It crashed; restart after a delay, within the restart intensity.
    Crashed(String),
    /// It could not start (the program cannot run, no `ready`): a crash
    /// that also counts towards the failed starts in a row.
    NotStarted(String),
    /// The daemon killed it because of a task (timeout, memory limit);
    /// restart at once.
    Killed(String),
}

/// One replica slot: runs processes and restarts them with backoff until
/// shutdown or until the agent's restart intensity is exceeded.
async fn run_replica(agent: Arc<AgentRuntime>, index: u32, mut shutdown: watch::Receiver<Phase>) {
    let mut streak = Streak::default();
    // Starts that failed in a row (the program cannot run, or never said
    // `ready`): the restart window alone never fills once the delay has
    // grown, so an agent that cannot start would be restarted for ever.
    let mut failed_starts = 0u32;
    loop {
        if agent.is_failed() || shutdown.borrow().stopping() {
            break;
        }
        let started = Instant::now();
        let mut ready_at = None;
        let exit = match agent.config.mode {
            Mode::Persistent => persistent::run(&agent, index, &mut shutdown, &mut ready_at).await,
            Mode::Oneshot => oneshot::run(&agent, index, &mut shutdown).await,
        };
        // How long it ran well: a persistent replica from its `ready` (one
        // that takes longer than restart.reset_after to load and then
        // crashes at once is crashing, not stable), a oneshot slot from its
        // start.
        let ran_for = match agent.config.mode {
            Mode::Persistent => ready_at.map_or(Duration::ZERO, |at| at.elapsed()),
            Mode::Oneshot => started.elapsed(),
        };
        let (reason, crashed) = match exit {
            Exit::Shutdown => break,
            Exit::Retired => {
                agent
                    .orders
                    .send_if_modified(|orders| orders.retire.remove(&index));
                agent
                    .status
                    .lock()
                    .expect("status lock")
                    .replicas
                    .retain(|replica| replica.index != index);
                tracing::info!(agent = %agent.name, replica = index, "replica retired by the fleet watchdog");
                return;
            }
            Exit::Crashed(reason) => {
                failed_starts = 0;
                (reason, true)
            }
            Exit::NotStarted(reason) => {
                failed_starts += 1;
                (reason, true)
            }
            Exit::Killed(reason) => {
                failed_starts = 0;
                (reason, false)
            }
        };
        let lost = agent
            .lost
            .lock()
            .expect("lost lock")
            .remove(&index)
            .unwrap_or_default();
        agent.update_replica(index, |replica| {
            replica.without_process(ReplicaState::Backoff);
            replica.last_exit = Some(reason.clone());
        });
        if shutdown.borrow().stopping() {
            break;
        }
        // A replica the daemon killed because of one task (timeout, memory)
        // is not crashing: it restarts at once and does not count towards
        // the restart intensity.
        let delay = if crashed {
            let delay = streak.crashed(&agent.config.restart, ran_for);
            let verdict = agent
                .intensity
                .lock()
                .expect("intensity lock")
                .record(agent.clock.steady_ms());
            let restart = &agent.config.restart;
            let give_up = match verdict {
                Verdict::GiveUp { restarts } => Some(format!(
                    "{restarts} restarts within restart.window = {} (restart.max_restarts = {})",
                    restart.window, restart.max_restarts
                )),
                Verdict::Restart if failed_starts > restart.max_restarts => Some(format!(
                    "replica {index} failed to start {failed_starts} times in a row (restart.max_restarts = {})",
                    restart.max_restarts
                )),
                Verdict::Restart => None,
            };
            if let Some(why) = give_up {
                let failure = format!("{why}; last: {reason}");
                tracing::error!(agent = %agent.name, %failure, "agent failed: no more restarts; its tasks go to its fallback, else stay queued");
                {
                    let mut status = agent.status.lock().expect("status lock");
                    status.state = AgentState::Failed;
                    status.failure = Some(failure.clone());
                }
                agent.notifier.send(
                    crate::notify::Event::new(
                        crate::notify::EventKind::AgentFailed,
                        agent.clock.now_ms(),
                        true,
                        format!(
                            "agent {} failed and is no longer restarted: {failure}",
                            agent.name
                        ),
                    )
                    .agent(&agent.name),
                );
                agent.refresh_breaker_status(agent.clock.steady_ms());
                agent.tell_manager(index, &reason, &lost, "no more restarts: the agent failed");
                break;
            }
            delay
        } else {
            Duration::ZERO
        };
        agent.tell_manager(
            index,
            &reason,
            &lost,
            &format!(
                "restarting the replica in {}; its tasks went back to the queue",
                humantime::format_duration(delay)
            ),
        );
        tracing::warn!(agent = %agent.name, replica = index, %reason, ?delay, "replica exited; restarting");
        agent.notifier.announce(
            crate::notify::Event::new(
                crate::notify::EventKind::ReplicaRestarted,
                agent.clock.now_ms(),
                false,
                format!("{} restarting: {reason}", agent.replica_name(index)),
            )
            .agent(&agent.name),
        );
        agent.metrics.restarted(&agent.name);
        {
            let mut status = agent.status.lock().expect("status lock");
            status.restarts += 1;
            if let Some(replica) = status.replicas.iter_mut().find(|r| r.index == index) {
                replica.restarts += 1;
            }
        }
        tokio::select! {
            _ = shutdown.changed() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    agent.update_replica(index, |replica| {
        replica.without_process(ReplicaState::Stopped)
    });
}

/// The next memory sample, if it shows `pgid` over the agent's limit.
fn over_memory(
    agent: &AgentRuntime,
    memory: &watch::Receiver<MemoryMap>,
    pgid: u32,
    index: u32,
) -> Option<Failure> {
    let rss = memory.borrow().get(&pgid).copied();
    agent.update_replica(index, |replica| replica.rss_bytes = rss);
    let limit = agent.config.memory_limit?;
    let rss = rss?;
    (rss > limit.bytes()).then(|| {
        Failure::new(
            AttemptOutcome::MemoryLimit,
            format!("resident memory {rss} bytes exceeded memory_limit = {limit}"),
        )
    })
}

/// Logs an agent's stderr line by line (bounded lines) until it closes.
fn log_stderr(agent: &AgentRuntime, index: u32, stderr: tokio::process::ChildStderr) {
    let name = agent.name.clone();
    let max = agent.config.max_line_bytes.as_usize();
    tokio::spawn(async move {
        let mut lines = crate::lines::LineReader::new(tokio::io::BufReader::new(stderr), max);
        while let Ok(Some(line)) = lines.next_line().await {
            if let crate::lines::Line::Text(text) = line {
                tracing::info!(agent = %name, replica = index, "stderr: {}", crate::protocol::truncate(&text, crate::protocol::STDERR_LOG_CHARS));
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_that_cannot_start_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path();
        std::fs::write(work.join("run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::write(work.join("plain.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(work.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let path = "/usr/bin:/bin";
        assert_eq!(missing_program("sh", work, path), None);
        assert_eq!(missing_program("./run.sh", work, path), None);
        let absolute = work.join("run.sh").display().to_string();
        assert_eq!(missing_program(&absolute, work, path), None);
        let missing = missing_program("claude-not-installed", work, path).unwrap();
        assert!(
            missing.contains("\"claude-not-installed\" is not found on PATH (/usr/bin:/bin)"),
            "{missing}"
        );
        // On the agent's own PATH, relative to its working directory.
        assert_eq!(missing_program("run.sh", work, "."), None);
        let plain = missing_program("./plain.sh", work, path).unwrap();
        assert!(plain.contains("is not executable"), "{plain}");
        let gone = missing_program("bin/agent", work, path).unwrap();
        assert!(gone.ends_with("bin/agent does not exist"), "{gone}");
    }

    /// Property: whatever the gaps between progress messages, as long as
    /// each is shorter than the progress timeout (or the watchdog kills the
    /// attempt), the lease never expires before the attempt ends.
    #[test]
    fn the_lease_outlives_the_progress_watchdog() {
        for timeout_s in [1u64, 10, 45, 300, 3600] {
            let timeout = Duration::from_secs(timeout_s);
            for seed in 0..200u64 {
                let mut rng = SmallRng::seed_from_u64(seed);
                let mut now = Duration::ZERO;
                let mut deadline = lease_duration(timeout);
                let mut renew = renew_after(timeout);
                for _ in 0..100 {
                    // The next progress comes before the watchdog fires…
                    let gap = Duration::from_millis(rand::Rng::random_range(
                        &mut rng,
                        0..timeout_s * 1000,
                    ));
                    now += gap;
                    assert!(
                        now < deadline,
                        "progress at {now:?} after the lease ended at {deadline:?}"
                    );
                    if now >= renew {
                        deadline = now + lease_duration(timeout);
                        renew = now + renew_after(timeout);
                    }
                }
                // …and the watchdog kills at most one timeout after the last.
                assert!(now + timeout < deadline);
            }
        }
    }
}
