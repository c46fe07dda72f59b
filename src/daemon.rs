//! The daemon (`flotilla up`): takes the store's lock, cleans up after a
//! predecessor that died, starts every agent, runs the housekeeping loops
//! (lease reaper, pruning, memory sampling, status snapshots) and shuts the
//! fleet down gracefully.
//!
//! It owns the lifecycle only; task handling lives in the dispatcher.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::breaker::BreakerState;
use crate::clock::{SharedClock, UnixMillis};
use crate::config::Config;
use crate::degrade::{AgentView, Degrader, Forced, Observation};
use crate::dispatch::{self, AgentRuntime, MemoryMap, Phase, Wiring};
use crate::queue::TaskQueue;
use crate::queue::sqlite::Role;
use crate::status::{AgentState, DaemonSnapshot, ReplicaState, ReplicaStatus};
use crate::store::{self, Store};
use crate::supervisor::process;

/// How often expired leases are returned to the queue.
const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// How often completed tasks past their retention are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(600);
/// How often resident memory is sampled.
const MEMORY_INTERVAL: Duration = Duration::from_secs(1);

/// A running daemon.
pub struct Daemon {
    config: Config,
    identity: Identity,
    store: Store,
    queue: Arc<dyn TaskQueue>,
    agents: Vec<Arc<AgentRuntime>>,
    replicas: Vec<JoinHandle<()>>,
    housekeeping: Vec<JoinHandle<()>>,
    shutdown: watch::Sender<Phase>,
    housekeeping_stop: watch::Sender<bool>,
    started_ms: UnixMillis,
    clock: SharedClock,
    fatal: watch::Receiver<Option<String>>,
    /// Its notifications, drained at the stop.
    notifier: crate::notify::Notifier,
    _lock: Option<File>,
}

/// Who a daemon is, as its snapshots say.
#[derive(Debug, Clone)]
struct Identity {
    name: String,
    host: String,
    /// How old its snapshots may grow while it counts as running.
    fresh_for_ms: UnixMillis,
    /// Where its HTTP server listens, if it has one.
    http: Option<std::net::SocketAddr>,
}

/// The lock file beside the store.
pub fn lock_path(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

fn take_lock(store: &Path) -> anyhow::Result<File> {
    let path = lock_path(store);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "another flotilla daemon (pid {}) is running on store {}; stop it first or use another [store] path",
                holder.trim(),
                store.display()
            );
        }
        Err(std::fs::TryLockError::Error(error)) => {
            return Err(error).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    file.flush()?;
    Ok(file)
}

impl Daemon {
    /// Starts the fleet of `config`.
    ///
    /// # Errors
    /// When an agent cannot be started (a `${VAR}` is missing), another
    /// daemon holds the store, or the store cannot be opened.
    pub async fn start(mut config: Config, clock: SharedClock) -> anyhow::Result<Self> {
        // The API answers for the whole fleet, also the agents other
        // daemons run.
        let fleet = Arc::new(config.clone());
        if let Some(selected) = config.daemon.agents.clone() {
            config.agents.retain(|name, _| selected.contains(name));
            if config.agents.is_empty() {
                bail!("daemon.agents selects no agent; nothing to run");
            }
        }
        let problems = dispatch::check_fleet(&config);
        if !problems.is_empty() {
            bail!("cannot start the fleet:\n  {}", problems.join("\n  "));
        }
        // The broker's own addresses name this fleet's agents (orphan
        // sweeps), whatever proxy stands in front of it.
        // Without credentials: the instance tag is in every agent's
        // environment.
        let broker_urls = config
            .broker
            .as_ref()
            .map(|broker| crate::config::redact_urls(&broker.urls().join(",")));
        let proxy = match config.broker.as_mut() {
            Some(broker) if config.chaos.proxy => {
                let proxy = crate::fault_proxy::FaultProxy::start(&broker.urls()).await?;
                broker.url = proxy.urls().join(",");
                broker.via_proxy = true;
                Some(Arc::new(proxy))
            }
            _ => None,
        };
        let mut identity = Identity {
            name: store::daemon_name(&config),
            host: store::host_name(),
            fresh_for_ms: store::fresh_within(&config),
            http: None,
        };
        let (lock, store, instance) = match &config.broker {
            None => {
                let path = config.store_path();
                let lock = take_lock(&path)?;
                let store =
                    Store::open(&config, Role::Daemon, clock.clone(), &identity.name).await?;
                let Store::Embedded(queue) = &store else {
                    unreachable!("no broker configured")
                };
                // Agents carry the store's id and path: a copy of the store
                // file (same id, other path) never sweeps the original
                // fleet's agents.
                let instance = format!(
                    "{}@{}",
                    queue.store_id(),
                    std::fs::canonicalize(&path)
                        .unwrap_or_else(|_| path.clone())
                        .display()
                );
                (Some(lock), store, instance)
            }
            Some(broker) => {
                let store = Store::open(&config, Role::Daemon, clock.clone(), &identity.name)
                    .await
                    .context("cannot open the broker")?;
                refuse_namesake(&store, &identity, &config, clock.now_ms()).await?;
                // The server's fsync setting cannot be read by a client.
                if broker.replicas == 1 {
                    tracing::warn!(
                        "broker.replicas = 1: nats-server acknowledges writes before it fsyncs them (every 2 minutes unless `sync_interval: always`), so a power loss of the broker machine can lose acknowledged tasks; use 3 replicas on a cluster, see \"Durability on a broker\" in docs/operations.md"
                    );
                }
                // Unique per broker, namespace and daemon name: a daemon of
                // another fleet on this machine is never swept.
                let instance = format!(
                    "nats:{}@{}#{}",
                    broker.namespace,
                    broker_urls.clone().unwrap_or_default(),
                    identity.name
                );
                (None, store, instance)
            }
        };
        // The HTTP port is taken once this daemon is known to be the only
        // one on its store (or its name), and before it changes anything
        // or starts an agent: a port in use stops it with nothing done.
        let listener = match config.http.address() {
            Some(address) => Some(crate::health::bind(address).await?),
            None => None,
        };
        identity.http = listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok());
        let queue = store.queue();
        let orphans = process::kill_orphans(&instance);
        if !orphans.is_empty() {
            tracing::warn!(count = orphans.len(), pids = ?orphans, "killed agent processes left behind by a daemon that died");
        }
        let requeued = queue.requeue_running().await?;
        if requeued > 0 {
            tracing::warn!(
                count = requeued,
                "returned tasks that were running when the previous daemon stopped to the queue"
            );
        }
        process::become_subreaper();

        let (shutdown, shutdown_rx) = watch::channel(Phase::Running);
        // Housekeeping (memory limits, lease reaper, status) runs until the
        // replicas have stopped, so a shutdown in progress stays visible.
        let (housekeeping_stop, stop_rx) = watch::channel(false);
        let (memory_tx, memory) = watch::channel::<MemoryMap>(Arc::default());
        let metrics = Arc::new(crate::metrics::Metrics::new(config.broker.is_some()));
        let mut housekeeping = vec![
            tokio::spawn(sample_memory(memory_tx, stop_rx.clone())),
            tokio::spawn(reap_leases(store.clone(), metrics.clone(), stop_rx.clone())),
        ];
        let availability: Arc<dispatch::Availability> = Arc::default();
        let notifier = crate::notify::Notifier::start(
            &config.notify,
            &identity.name,
            &config.base_dir,
            Some(metrics.clone()),
        );
        let watchdog_notifier = notifier.clone();
        let chaos_notifier = notifier.clone();
        let schedule_notifier = notifier.clone();
        let stop_notifier = notifier.clone();
        let wiring = Wiring {
            delegation: config.delegation.clone(),
            fleet: fleet.clone(),
            queue: queue.clone(),
            store: store.clone(),
            clock: clock.clone(),
            instance,
            owner: identity.name.clone(),
            memory,
            availability: availability.clone(),
            notifier: notifier.clone(),
            metrics: metrics.clone(),
        };
        let mut agents = Vec::new();
        let mut replicas = Vec::new();
        for name in config.agents.keys() {
            let (agent, handles) = AgentRuntime::start(name, &config, &wiring, &shutdown_rx);
            agents.push(agent);
            replicas.extend(handles);
        }
        let started_ms = clock.now_ms();
        tracing::info!(store = %Store::describe(&config), daemon = %identity.name, agents = agents.len(), "fleet started");
        if let (Some(listener), Some(address)) = (listener, identity.http) {
            let health = crate::health::Health {
                agents: agents.clone(),
                store: store.clone(),
                clock: clock.clone(),
                metrics: metrics.clone(),
            };
            let token = config
                .http
                .token(&config.base_dir)
                .map_err(|problem| anyhow::anyhow!(problem))?;
            let live = {
                let (identity, store, agents, clock) = (
                    identity.clone(),
                    store.clone(),
                    agents.clone(),
                    clock.clone(),
                );
                move || snapshot(&identity, &store, &agents, started_ms, clock.as_ref(), true)
            };
            let api = Arc::new(crate::api::Api {
                config: fleet,
                store: store.clone(),
                clock: clock.clone(),
                token,
                live: Box::new(live),
                agents: agents.clone(),
                notifier: chaos_notifier,
                metrics: metrics.clone(),
                proxy: proxy.clone(),
                refusals: crate::api::Refusals::default(),
            });
            tracing::info!(%address, "HTTP server listening: /health/live, /health/ready, /health/progress, /metrics, /api/v1");
            housekeeping.push(tokio::spawn(crate::health::serve(
                listener,
                health,
                api,
                stop_rx.clone(),
            )));
        }
        let (fatal_tx, fatal) = watch::channel(None);
        let daemon_status = StatusWriter {
            store: store.clone(),
            identity: identity.clone(),
            agents: agents.clone(),
            clock: clock.clone(),
            started_ms,
            fatal: fatal_tx,
        };
        housekeeping.push(tokio::spawn(
            daemon_status.run(config.daemon.status_interval.get(), stop_rx.clone()),
        ));
        housekeeping.push(tokio::spawn(prune(store.clone(), stop_rx.clone())));
        let uses_broker_nodes = [
            &config.degradation.reduced,
            &config.degradation.essential,
            &config.degradation.emergency,
        ]
        .iter()
        .flat_map(|level| &level.triggers)
        .any(|trigger| matches!(trigger, crate::config::Trigger::BrokerNodesBelow { .. }));
        let degrade = DegradeLoop {
            config: config.degradation.clone(),
            store: store.clone(),
            agents: agents.clone(),
            availability,
            clock: clock.clone(),
            uses_broker_nodes,
            notifier,
            name: identity.name.clone(),
            fresh_within: store::fresh_within(&config),
        };
        if let (Some(address), Ok(Some(token))) =
            (identity.http, config.http.token(&config.base_dir))
        {
            let scheduler = crate::experiment::Scheduler {
                address,
                token,
                daemon: identity.name.clone(),
                agents: agents.iter().map(|agent| agent.name.clone()).collect(),
                store: store.clone(),
                metrics: metrics.clone(),
                notifier: schedule_notifier.clone(),
                clock: clock.clone(),
                phase: shutdown_rx.clone(),
            };
            for entry in &config.chaos.schedule {
                housekeeping.push(tokio::spawn(crate::experiment::schedule(
                    entry.clone(),
                    config.resolve(&entry.experiment),
                    scheduler.clone(),
                    stop_rx.clone(),
                )));
            }
        }
        housekeeping.push(tokio::spawn(degrade.run(stop_rx.clone())));
        if config.watchdog.enabled {
            housekeeping.push(tokio::spawn(crate::watchdog::run(
                config.watchdog.clone(),
                agents.clone(),
                store.clone(),
                clock.clone(),
                watchdog_notifier,
                metrics.clone(),
                stop_rx.clone(),
            )));
        }
        housekeeping.push(tokio::spawn(count_store(
            store.clone(),
            metrics,
            clock.clone(),
            stop_rx,
        )));
        Ok(Self {
            config,
            identity,
            store,
            queue,
            agents,
            replicas,
            housekeeping,
            shutdown,
            housekeeping_stop,
            started_ms,
            clock,
            fatal,
            notifier: stop_notifier,
            _lock: lock,
        })
    }

    /// The queue.
    pub fn queue(&self) -> &Arc<dyn TaskQueue> {
        &self.queue
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Where the HTTP server listens (`None` with `[http] listen = "off"`).
    pub fn http_address(&self) -> Option<std::net::SocketAddr> {
        self.identity.http
    }

    /// This daemon's name in the fleet.
    pub fn name(&self) -> &str {
        &self.identity.name
    }

    /// The agents.
    pub fn agents(&self) -> &[Arc<AgentRuntime>] {
        &self.agents
    }

    /// When the daemon started.
    pub fn started_ms(&self) -> UnixMillis {
        self.started_ms
    }

    /// Resolves when the daemon cannot go on (the store failed an fsync
    /// and refuses writes), with the reason: stop it and let the service
    /// manager start it again.
    pub async fn failed(&self) -> String {
        let mut fatal = self.fatal.clone();
        loop {
            if let Some(reason) = fatal.borrow_and_update().clone() {
                return reason;
            }
            if fatal.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Stops the fleet: no new leases, in-flight tasks finish within
    /// `daemon.shutdown_grace`, then the replicas are stopped and the tasks
    /// they did not finish released.
    pub async fn stop(self) {
        self.stop_unless(std::future::pending()).await;
    }

    /// [`Self::stop`], cutting the grace period short when `hurry` resolves
    /// (a second SIGTERM or Ctrl-C): the replicas are stopped at once.
    pub async fn stop_unless(self, hurry: impl std::future::Future<Output = ()>) {
        tracing::info!(grace = %self.config.daemon.shutdown_grace, "shutting down; send the signal again to stop the replicas at once");
        for agent in &self.agents {
            agent.set_stopping();
        }
        let _ = self.shutdown.send(Phase::Draining);
        let longest_stop = self
            .config
            .agents
            .values()
            .map(|agent| agent.timeouts.stop_grace.get())
            .max()
            .unwrap_or_default();
        // Beyond the grace periods: the `shutdown` line may take 10 s to
        // write to an agent that reads nothing, SIGKILL up to 11 s to take
        // effect and be reaped, then the releases are stored.
        let limit =
            self.config.daemon.shutdown_grace.get() + longest_stop * 2 + Duration::from_secs(30);
        let agents = self.agents.clone();
        let replicas = async move {
            futures_util::future::join_all(self.replicas).await;
            for agent in &agents {
                agent.join_replicas().await;
            }
        };
        tokio::pin!(replicas);
        let hurried = async {
            tokio::select! {
                _ = &mut replicas => true,
                () = hurry => false,
            }
        };
        let finished = tokio::time::timeout(limit, hurried).await;
        let finished = match finished {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!("second signal: stopping the replicas now");
                let _ = self.shutdown.send(Phase::Hurry);
                tokio::time::timeout(limit, &mut replicas).await.is_ok()
            }
            Err(_) => false,
        };
        if !finished {
            tracing::error!(
                ?limit,
                "replicas did not stop in time; their tasks return to the queue on the next start"
            );
        }
        // Completions still being validated or stored (a rollback can take
        // minutes): waited for, but not past the shutdown's own limit; a
        // task left running returns to the queue on the next start.
        let flushed = tokio::time::timeout(
            limit,
            futures_util::future::join_all(self.agents.iter().map(|agent| agent.flush_outcomes())),
        )
        .await;
        if flushed.is_err() {
            tracing::warn!(
                ?limit,
                "completions still being validated or stored after the shutdown limit; those tasks return to the queue on the next start"
            );
        }
        if tokio::time::timeout(Duration::from_secs(30), self.queue.flush_released())
            .await
            .is_err()
        {
            tracing::warn!(
                "some dropped leases were not released in 30 s; they return to the queue on the next start"
            );
        }
        let _ = self.housekeeping_stop.send(true);
        for task in self.housekeeping {
            let _ = task.await;
        }
        // The events of the stop itself (replicas lost, levels changed)
        // are delivered before the process exits, within a bound.
        let left = self.notifier.drain(NOTIFY_DRAIN).await;
        if left > 0 {
            tracing::warn!(
                left,
                ?NOTIFY_DRAIN,
                "notifications not delivered before the daemon stopped"
            );
        }
        let snapshot = snapshot(
            &self.identity,
            &self.store,
            &self.agents,
            self.started_ms,
            self.clock.as_ref(),
            false,
        );
        if let Err(error) = self.store.put_snapshot(&snapshot).await {
            tracing::warn!(%error, "could not write the final status");
        }
        tracing::info!("stopped");
    }
}

/// Longest the daemon waits at its stop for notifications still queued.
const NOTIFY_DRAIN: Duration = Duration::from_secs(5);

/// Refuses to start when a live daemon of the same name shares the broker:
/// both would claim each other's running tasks after a restart.
async fn refuse_namesake(
    store: &Store,
    identity: &Identity,
    config: &Config,
    now: UnixMillis,
) -> anyhow::Result<()> {
    let Some(other) = store.snapshot_of(&identity.name).await? else {
        return Ok(());
    };
    if !store::is_fresh(&other, now, store::fresh_within(config)) {
        return Ok(());
    }
    // The same machine can tell a dead predecessor (gone, or a zombie
    // not yet reaped) from a live namesake.
    let alive = other.host != identity.host
        || (other.pid != std::process::id() && process_alive(other.pid));
    if alive {
        bail!(
            "a daemon named {:?} (pid {} on {}) is already running on this broker; give this one another name with --name or [daemon] name",
            identity.name,
            other.pid,
            other.host
        );
    }
    Ok(())
}

/// Whether `pid` is a live (not zombie) process.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

fn snapshot(
    identity: &Identity,
    store: &Store,
    agents: &[Arc<AgentRuntime>],
    started_ms: UnixMillis,
    clock: &dyn crate::clock::Clock,
    running: bool,
) -> DaemonSnapshot {
    // Leaving the daemon: steady times become wall times.
    let mut statuses: Vec<_> = agents
        .iter()
        .map(|agent| agent.status().on_wall(clock))
        .collect();
    if !running {
        for status in &mut statuses {
            if status.state != AgentState::Failed {
                status.state = AgentState::Stopped;
            }
        }
    }
    DaemonSnapshot {
        name: identity.name.clone(),
        host: identity.host.clone(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_ms,
        taken_ms: clock.now_ms(),
        running,
        fresh_for_ms: Some(identity.fresh_for_ms),
        agents: statuses,
        broker: store.broker_status(),
        http: identity.http.map(|address| address.to_string()),
        degradation: agents
            .first()
            .map(|agent| agent.availability().degradation().on_wall(clock))
            .unwrap_or_default(),
        counts: store.shared_counts(),
    }
}

/// Refreshes the store's queue depth and dead letters for the metrics:
/// every 5 s, every 30 s on a broker (where the watchdog shares the
/// count, and the daemon's snapshot carries the last count for
/// `status`), each count bounded, in its own task so that a slow broker
/// holds up nothing else. The time of the last count is a metric too: while
/// counting fails the gauges keep their last values.
async fn count_store(
    store: Store,
    metrics: Arc<crate::metrics::Metrics>,
    clock: SharedClock,
    mut shutdown: watch::Receiver<bool>,
) {
    // On a broker every count reads each task's latest record written
    // since the last: counted less often, a task that changed several
    // times in between is read once (measured: counting every 5 s cost
    // the JetStream benchmark about 6% of its throughput).
    let every = Duration::from_secs(if matches!(store, Store::Broker(_)) {
        30
    } else {
        5
    });
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when counting fails (the gauges keep their last values): told
    // once when it starts failing and once when it recovers.
    let mut failing_since: Option<UnixMillis> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = ticker.tick() => {}
        }
        let failure = match tokio::time::timeout(every, store.periodic_counts()).await {
            Ok(Ok(counts)) => {
                // On a broker, the last count taken (by the watchdog's
                // shared count, this one, or the API's), with its time.
                let (counts, counted_ms) = match store.shared_counts() {
                    Some(shared) => (shared.agents.into_iter().collect(), shared.taken_ms),
                    None => (counts, clock.now_ms()),
                };
                metrics.set_store_counts(
                    counts.iter().map(|(_, counts)| counts.queued).sum(),
                    counts.iter().map(|(_, counts)| counts.dead_lettered).sum(),
                    counted_ms,
                );
                if let Some(since) = failing_since.take() {
                    let failed_for =
                        Duration::from_secs(clock.now_ms().saturating_sub(since) / 1000);
                    tracing::info!(
                        failed_for = %humantime::format_duration(failed_for),
                        "the store is counted again for the queue depth metrics"
                    );
                }
                continue;
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no count within {}", humantime::format_duration(every)),
        };
        if failing_since.is_none() {
            failing_since = Some(clock.now_ms());
            tracing::warn!(
                error = %failure,
                "could not count the store: the queue depth metrics keep their last values (see flotilla_store_counted_timestamp_seconds)"
            );
        } else {
            tracing::debug!(error = %failure, "could not count the store for the metrics");
        }
    }
}

/// The key of the operator's forced degradation level in the store.
pub const FORCED_LEVEL_KEY: &str = "degrade";

/// Evaluates the degradation triggers every `degradation.check_interval`
/// and publishes the level to the agents' leasers.
struct DegradeLoop {
    config: crate::config::DegradationConfig,
    store: Store,
    agents: Vec<Arc<AgentRuntime>>,
    availability: Arc<dispatch::Availability>,
    clock: SharedClock,
    uses_broker_nodes: bool,
    notifier: crate::notify::Notifier,
    /// This daemon's name, and how fresh another daemon's snapshot must be
    /// to count (broker only).
    name: String,
    fresh_within: UnixMillis,
}

impl DegradeLoop {
    /// Agents that a live daemon other than this one runs with a closed (or
    /// disabled) breaker and a ready replica.
    fn healthy_elsewhere(&self, snapshots: &[DaemonSnapshot]) -> std::collections::HashSet<String> {
        let now = self.clock.now_ms();
        snapshots
            .iter()
            .filter(|snapshot| {
                snapshot.name != self.name && store::is_fresh(snapshot, now, self.fresh_within)
            })
            .flat_map(|snapshot| &snapshot.agents)
            .filter(|agent| {
                agent.state == AgentState::Running
                    && agent
                        .breaker
                        .state
                        .is_none_or(|state| state == BreakerState::Closed)
                    && agent.replicas.iter().any(ReplicaStatus::is_ready)
            })
            .map(|agent| agent.name.clone())
            .collect()
    }

    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut degrader = Degrader::new(self.config.clone(), self.clock.steady_ms());
        let mut ticker = tokio::time::interval(self.config.check_interval.get());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut nodes = None;
        let mut nodes_at: Option<tokio::time::Instant> = None;
        let mut peers_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticker.tick() => {}
            }
            // Asking the cluster costs a request: at most every 5 s.
            if self.uses_broker_nodes
                && nodes_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(5))
            {
                nodes_at = Some(tokio::time::Instant::now());
                nodes = self.store.broker_nodes().await;
            }
            // On a broker, which agents other daemons run healthily: an
            // agent unavailable here leaves its tasks to them instead of
            // diverting the shared queue. Read every 5 s.
            if matches!(self.store, Store::Broker(_))
                && peers_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(5))
            {
                peers_at = Some(tokio::time::Instant::now());
                if let Ok(snapshots) = self.store.snapshots().await {
                    self.availability
                        .set_available_elsewhere(self.healthy_elsewhere(&snapshots));
                }
            }
            // Steady time: the dwell and the readiness grace are kept in
            // memory only, and replicas' times are steady too.
            let now = self.clock.steady_ms();
            let observation = Observation {
                agents: self
                    .agents
                    .iter()
                    .map(|agent| {
                        let status = agent.status();
                        AgentView {
                            name: status.name.clone(),
                            critical: agent.config.critical,
                            breaker_open: crate::degrade::breaker_holds_back(status.breaker.state),
                            failed: status.state == AgentState::Failed,
                            ready: status
                                .replicas
                                .iter()
                                .filter(|replica| replica.is_ready())
                                .count() as u32,
                            failing: status
                                .replicas
                                .iter()
                                .filter(|replica| match replica.state {
                                    ReplicaState::Backoff => true,
                                    // Not yet started is not failing; stopped
                                    // after running (the agent failed) is.
                                    ReplicaState::Stopped => {
                                        replica.started_ms.is_some() || replica.restarts > 0
                                    }
                                    ReplicaState::Starting => {
                                        replica.started_ms.is_some_and(|at| {
                                            now.saturating_sub(at)
                                                >= crate::degrade::UNREADY_GRACE_MS
                                        })
                                    }
                                    _ => false,
                                })
                                .count() as u32,
                            replicas: status.replicas.len() as u32,
                        }
                    })
                    .collect(),
                broker_connected: self.store.broker_status().map(|broker| broker.connected),
                broker_nodes: nodes,
            };
            // A store that cannot be read keeps the last forced level.
            // The stored end is wall time; the degrader compares steady.
            let forced = match self.store.get_control(FORCED_LEVEL_KEY).await {
                Ok(value) => value
                    .and_then(|value| serde_json::from_value::<Forced>(value).ok())
                    .map(|forced| Forced {
                        until_ms: self.clock.steady_of(forced.until_ms),
                        ..forced
                    }),
                Err(_) => degrader.status().forced,
            };
            let change = degrader.check(&observation, forced, now);
            self.availability.set_degradation(degrader.status());
            if let Some(change) = change {
                if change.to > change.from {
                    tracing::warn!(from = %change.from, to = %change.to, reason = %change.reason, "degradation level raised");
                } else {
                    tracing::info!(from = %change.from, to = %change.to, reason = %change.reason, "degradation level lowered");
                }
                let what = match change.to {
                    crate::degrade::Level::Nominal => "everything runs again".to_string(),
                    crate::degrade::Level::Reduced => {
                        "unavailable agents' tasks go to their fallback agents".to_string()
                    }
                    level => format!(
                        "only {} and more urgent tasks run",
                        level.lowest_priority().as_str()
                    ),
                };
                self.notifier.send(
                    crate::notify::Event::new(
                        crate::notify::EventKind::LevelChanged,
                        self.clock.now_ms(),
                        change.to == crate::degrade::Level::Emergency,
                        format!(
                            "degradation level {} → {}: {}; {what}",
                            change.from, change.to, change.reason
                        ),
                    )
                    .level(change.to.number()),
                );
                for agent in &self.agents {
                    agent.wake_leaser();
                }
            }
        }
    }
}

struct StatusWriter {
    store: Store,
    identity: Identity,
    agents: Vec<Arc<AgentRuntime>>,
    clock: SharedClock,
    started_ms: UnixMillis,
    fatal: watch::Sender<Option<String>>,
}

impl StatusWriter {
    async fn run(self, every: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticker.tick() => {}
            }
            if let Some(reason) = self.store.fatal()
                && self.fatal.borrow().is_none()
            {
                tracing::error!(%reason);
                let _ = self.fatal.send(Some(reason));
            }
            let snapshot = snapshot(
                &self.identity,
                &self.store,
                &self.agents,
                self.started_ms,
                self.clock.as_ref(),
                true,
            );
            if let Err(error) = self.store.put_snapshot(&snapshot).await {
                tracing::warn!(%error, "could not write the status snapshot");
            }
        }
    }
}

/// Every [`PRUNE_INTERVAL`]: deletes completed tasks past
/// `store.retention`. A loop of its own: a long prune (on a broker, a few
/// round trips per task) must not hold up the daemon's heartbeat, or the
/// fleet would count it dead.
async fn prune(store: Store, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(PRUNE_INTERVAL) => {}
        }
        let pruned = tokio::select! {
            _ = shutdown.changed() => return,
            pruned = store.prune() => pruned,
        };
        match pruned {
            Ok(0) => {}
            Ok(count) => tracing::info!(count, "pruned completed tasks past store.retention"),
            Err(error) => tracing::warn!(%error, "pruning failed"),
        }
    }
}

/// Every second: returns the tasks whose leases expired to the queue,
/// and handles the tasks the queue dead-lettered by itself while leasing
/// (attempts used up by lost leases) as a replica's dead letter is
/// handled: counted, and the children they waited for cancelled.
async fn reap_leases(
    store: Store,
    metrics: Arc<crate::metrics::Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let queue = store.queue();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(REAP_INTERVAL) => {}
        }
        match queue.expire_leases().await {
            Ok(0) => {}
            Ok(count) => tracing::warn!(count, "leases expired; tasks returned to the queue"),
            Err(error) => tracing::warn!(%error, "could not expire leases"),
        }
        for (task, agent) in queue.take_exhausted() {
            let cancelled = crate::delegate::dead_lettered(&store, &metrics, &task, &agent).await;
            tracing::warn!(%task, %agent, cancelled, "dead-lettered: attempts used up by lost leases");
        }
    }
}

async fn sample_memory(memory: watch::Sender<MemoryMap>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(MEMORY_INTERVAL) => {}
        }
        if let Ok(sample) = tokio::task::spawn_blocking(process::rss_by_group).await {
            let _ = memory.send(Arc::new(sample));
        }
    }
}
