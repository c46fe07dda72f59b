//! Benchmarks of flotilla on this machine, written up in BENCHMARKS.md.
//!
//! `cargo build --release && target/release/flotilla-bench` runs every
//! scenario; each figure is the median of several runs with min and max.
//! Scenarios:
//! - `throughput`: tasks/s through N persistent no-op replicas (the
//!   built-in example agent with `--work-ms 0`) on the embedded queue with
//!   fsync'd group commits, for a pre-loaded queue.
//! - `recovery`: time from `kill -9` of the replica working on a task to
//!   the task starting on another replica.
//! - `start`: time from a submit by another process (as `flotilla submit`)
//!   to the task starting on an idle fleet.
//! - `jetstream`: on a nats-server the harness starts (free port, temporary
//!   store; `--nats-server` or `.tools/bin/nats-server`), alternating in
//!   one run: the raw JetStream baseline (publish with awaited PubAcks +
//!   pull consumer + ack), and flotilla end to end (a client submitting
//!   while 4 persistent no-op replicas work); then crash-to-redispatch.
//!   `BENCH_NATS_EXTRA` adds arguments to that nats-server, e.g.
//!   `--profile 6061` to take a pprof CPU profile from
//!   `http://127.0.0.1:6061/debug/pprof/profile?seconds=5`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Parser;
use flotilla::clock;
use flotilla::config;
use flotilla::daemon::Daemon;
use flotilla::queue::{NewTask, Priority, TaskQueue, TaskState};

#[derive(Debug, Parser)]
#[command(about = "Benchmarks of flotilla (see BENCHMARKS.md)")]
struct Args {
    /// Which scenario: throughput, recovery or all.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Runs per figure (the median is reported with min and max).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Tasks per throughput run.
    #[arg(long, default_value_t = 50_000)]
    tasks: usize,
    /// Replicas for the throughput runs (comma-separated).
    #[arg(long, default_value = "4")]
    replicas: String,
    /// `prefetch` values for the throughput runs (comma-separated).
    #[arg(long, default_value = "0,64")]
    prefetch: String,
    /// Submits per start-latency run.
    #[arg(long, default_value_t = 100)]
    starts: usize,
    /// Kills per recovery run.
    #[arg(long, default_value_t = 200)]
    kills: usize,
    /// Working directory for stores (a temporary one by default).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// nats-server binary for the `jetstream` scenario.
    #[arg(long, default_value = ".tools/bin/nats-server")]
    nats_server: PathBuf,
    /// Tasks per JetStream throughput run.
    #[arg(long, default_value_t = 20_000)]
    jetstream_tasks: usize,
}

fn flotilla_exe() -> anyhow::Result<PathBuf> {
    let own = std::env::current_exe()?;
    let exe = own.with_file_name("flotilla");
    if !exe.exists() {
        bail!(
            "{} not found; build it first (cargo build --release)",
            exe.display()
        );
    }
    Ok(exe)
}

/// A store connection from outside the daemon, as `flotilla submit` opens.
fn client(
    config: &config::Config,
) -> Result<flotilla::queue::sqlite::SqliteQueue, flotilla::queue::QueueError> {
    use flotilla::queue::sqlite::{Role, Settings, SqliteQueue};
    SqliteQueue::open(
        &config.store_path(),
        Settings::from_config(&config.store, Role::Client),
        clock::system(),
    )
}

/// A fresh directory with a config of one agent of no-op example agents;
/// `extra` adds keys to the agent's table.
fn noop_fleet(dir: &Path, agent: &str, extra: &str) -> anyhow::Result<config::Config> {
    let _ = std::fs::remove_dir_all(dir);
    let exe = flotilla_exe()?.display().to_string();
    write_config(
        dir,
        &format!(
            "[agents.{agent}]\ncommand = [{exe:?}, \"example-agent\", \"--work-ms\", \"0\"]\n{extra}\n"
        ),
    )
}

fn write_config(dir: &Path, agent: &str) -> anyhow::Result<config::Config> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("flotilla.toml");
    std::fs::write(
        &path,
        format!("[store]\npath = \"bench.db\"\n\n[http]\nlisten = \"off\"\n\n{agent}"),
    )?;
    Ok(config::load(&path)?)
}

/// A nats-server for the run, killed on drop.
struct NatsServer {
    child: std::process::Child,
    url: String,
    store: PathBuf,
}

impl NatsServer {
    fn start(binary: &Path) -> anyhow::Result<Self> {
        let store =
            std::env::temp_dir().join(format!("flotilla-bench-nats-{}", std::process::id()));
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = std::process::Command::new(binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store)
            .args(
                std::env::var("BENCH_NATS_EXTRA")
                    .ok()
                    .iter()
                    .flat_map(|extra| extra.split_whitespace()),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (run scripts/install-nats-server.sh)",
                    binary.display()
                )
            })?;
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("nats-server did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            store,
        })
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// Submits `tasks` tasks `t0`, `t1`, ... for agent `noop`, `batch` per call.
async fn submit_noop(queue: &dyn TaskQueue, tasks: usize, batch: usize) -> anyhow::Result<()> {
    for chunk in (0..tasks).collect::<Vec<_>>().chunks(batch) {
        let batch = chunk
            .iter()
            .map(|n| NewTask {
                id: format!("t{n}"),
                agent: "noop".into(),
                priority: Priority::Normal,
                payload: serde_json::json!({"n": n}),
            })
            .collect();
        queue.submit(batch).await?;
    }
    Ok(())
}

/// CPU seconds (user + system) used so far by process `pid` (`self` for
/// this one), from /proc.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesized command: utime and stime are the
    // 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|field| field.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    (ticks(11) + ticks(12)) / per_second
}

/// The `[broker]` section of a fleet on `url` in its own namespace.
fn broker_section(url: &str, namespace: &str) -> String {
    format!("[broker]\nurl = \"{url}\"\nnamespace = \"{namespace}\"\n\n")
}

/// Raw JetStream: publish `tasks` messages with ids and awaited PubAcks
/// (256 in flight) while a pull consumer acks them; tasks/s from the first
/// publish to the last ack.
///
/// With `record`, the consumer also creates, reads and updates (compare-
/// and-set) a key-value record per task before its ack, 256 tasks in
/// flight: about what a record per task with one transition costs.
async fn raw_jetstream_run(
    url: &str,
    run: usize,
    tasks: usize,
    record: bool,
) -> anyhow::Result<f64> {
    use async_nats::jetstream::{self, consumer, kv, stream};
    use futures_util::StreamExt as _;
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let name = format!("RAW{run}{}", if record { "R" } else { "" });
    let records = if record {
        Some(
            js.create_key_value(kv::Config {
                bucket: format!("{name}_RECORDS"),
                history: 1,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await?,
        )
    } else {
        None
    };
    let subject_prefix = name.to_lowercase();
    let stream = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{subject_prefix}.>")],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let consume = tokio::spawn(async move {
        let messages = consumer.messages().await?;
        let settled = messages
            .take(tasks)
            .map(|message| {
                let records = records.clone();
                async move {
                    let message = message.map_err(|error| anyhow::anyhow!("{error}"))?;
                    if let Some(records) = records {
                        let key = format!(
                            "t.{}",
                            message
                                .info()
                                .map_err(|error| anyhow::anyhow!("{error}"))?
                                .stream_sequence
                        );
                        let revision = records.create(&key, message.payload.clone()).await?;
                        records.entry(&key).await?;
                        records
                            .update(&key, message.payload.clone(), revision)
                            .await?;
                    }
                    message
                        .ack()
                        .await
                        .map_err(|error| anyhow::anyhow!("{error}"))
                }
            })
            .buffer_unordered(256);
        tokio::pin!(settled);
        let mut acked = 0;
        while let Some(result) = settled.next().await {
            result?;
            acked += 1;
        }
        if acked < tasks {
            bail!("the stream ended after {acked} of {tasks} tasks");
        }
        anyhow::Ok(Instant::now())
    });
    let payload = bytes::Bytes::from(serde_json::to_vec(&serde_json::json!({"n": 0}))?);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for n in 0..tasks {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("t{n}").as_str());
        pending.push(std::future::IntoFuture::into_future(
            js.publish_with_headers(format!("{subject_prefix}.noop"), headers, payload.clone())
                .await?,
        ));
        if pending.len() >= 256 {
            pending.next().await.context("pending")??;
        }
    }
    while let Some(ack) = pending.next().await {
        ack?;
    }
    let finished = consume.await??;
    Ok(tasks as f64 / finished.duration_since(started).as_secs_f64())
}

/// flotilla end to end on JetStream: a client submits `tasks` tasks (in
/// batches of 1,000) while 4 persistent no-op replicas work; tasks/s from
/// the first submit to the last completion.
async fn jetstream_throughput_run(
    dir: &Path,
    url: &str,
    run: usize,
    tasks: usize,
) -> anyhow::Result<f64> {
    use flotilla::queue::sqlite::Role;
    use flotilla::store::Store;
    let _ = std::fs::remove_dir_all(dir);
    let exe = flotilla_exe()?.display().to_string();
    let namespace = format!("bench{run}");
    let config = write_config(
        dir,
        &format!(
            "{}[agents.noop]\ncommand = [{exe:?}, \"example-agent\", \"--work-ms\", \"0\"]\nreplicas = {{ min = 4 }}\nprefetch = 64\n",
            broker_section(url, &namespace)
        ),
    )?;
    let daemon = Daemon::start(config.clone(), clock::system()).await?;
    let store = Store::open(&config, Role::Client, clock::system(), "bench").await?;
    let queue = store.queue();
    let started_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    submit_noop(queue.as_ref(), tasks, 1_000).await?;
    let submitted_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    println!(
        "    submitted {tasks} tasks in {} ms",
        submitted_ms - started_ms
    );
    // The work-queue stream is empty once every task was acked.
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client);
    let mut tasks_stream = js
        .get_stream(format!("{}_TASKS", namespace.to_uppercase()))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if tasks_stream.info().await?.state.messages == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("JetStream throughput run did not finish in 10 minutes");
        }
    }
    daemon.stop().await;
    let records = queue
        .list(&flotilla::queue::ListFilter {
            state: Some(TaskState::Completed),
            agent: None,
            limit: usize::MAX,
        })
        .await?;
    if records.len() != tasks {
        bail!("{} of {tasks} tasks completed", records.len());
    }
    let finished_ms = records
        .iter()
        .filter_map(|task| task.finished_ms)
        .max()
        .context("finished")?;
    Ok(tasks as f64 / ((finished_ms - started_ms).max(1) as f64 / 1000.0))
}

fn summary(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(|a, b| a.total_cmp(b));
    let median = values[values.len() / 2];
    (median, values[0], values[values.len() - 1])
}

/// p50 and p99 of each run of a latency scenario, reported as medians
/// with min and max.
#[derive(Default)]
struct Latencies {
    p50s: Vec<f64>,
    p99s: Vec<f64>,
    samples: usize,
}

impl Latencies {
    /// Records one run's `latencies` (ms) and prints its line.
    fn run(&mut self, label: &str, what: &str, mut latencies: Vec<f64>) {
        latencies.sort_by(|a, b| a.total_cmp(b));
        let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
        println!(
            "  {label}: {} {what}: p50 {p50:.1} ms, p99 {p99:.1} ms, max {:.1} ms",
            latencies.len(),
            latencies[latencies.len() - 1]
        );
        self.p50s.push(p50);
        self.p99s.push(p99);
        self.samples += latencies.len();
    }

    /// Prints the summary line of the scenario.
    fn report(mut self, label: &str, what: &str) {
        let (p50, p50_min, p50_max) = summary(&mut self.p50s);
        let (p99, p99_min, p99_max) = summary(&mut self.p99s);
        println!(
            "{label}: p50 median {p50:.1} ms (min {p50_min:.1}, max {p50_max:.1}); p99 median {p99:.1} ms (min {p99_min:.1}, max {p99_max:.1}); {} {what}",
            self.samples
        );
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

async fn throughput_run(
    dir: &Path,
    replicas: u32,
    prefetch: u32,
    tasks: usize,
) -> anyhow::Result<f64> {
    let config = noop_fleet(
        dir,
        "noop",
        &format!(
            "replicas = {{ min = {replicas} }}
prefetch = {prefetch}"
        ),
    )?;
    // Pre-load the queue through a client, as `flotilla submit` would.
    {
        submit_noop(&client(&config)?, tasks, 10_000).await?;
    }
    let store = config.store_path();
    let daemon = Daemon::start(config, clock::system()).await?;
    let watcher = rusqlite::Connection::open(&store)?;
    let started_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let deadline = Instant::now() + Duration::from_secs(600);
    // Poll rarely and cheaply, so that the harness does not compete with
    // the daemon for the CPU, and take the end time from the store (the last
    // completion), not from the poll.
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Cheap: the partial indexes of ready, delayed and running tasks.
        let unfinished: bool = watcher.query_row(
            "SELECT EXISTS (SELECT 1 FROM tasks WHERE state = 1) OR EXISTS (SELECT 1 FROM tasks WHERE state = 2)
             OR EXISTS (SELECT 1 FROM tasks WHERE state = 3)",
            [],
            |row| row.get(0),
        )?;
        if !unfinished {
            break;
        }
        if Instant::now() > deadline {
            bail!("throughput run did not finish in 10 minutes");
        }
    }
    let finished_ms: i64 =
        watcher.query_row("SELECT max(finished_at) FROM tasks", [], |row| row.get(0))?;
    let elapsed = (finished_ms - started_ms).max(1) as f64 / 1000.0;
    daemon.stop().await;
    Ok(tasks as f64 / elapsed)
}

async fn recovery_run(dir: &Path, kills: usize, broker: &str) -> anyhow::Result<Vec<f64>> {
    let _ = std::fs::remove_dir_all(dir);
    let exe = flotilla_exe()?;
    let config = write_config(
        dir,
        &format!(
            r#"{broker}[agents.busy]
command = [{:?}, "example-agent", "--work-ms", "3600000"]
replicas = {{ min = 3 }}
timeouts = {{ progress_timeout = "2h", max_duration = "2h" }}
retry = {{ max_deliver = 1000 }}
restart = {{ initial_backoff = "10ms", max_backoff = "10ms", max_restarts = 100000 }}
"#,
            exe.display().to_string()
        ),
    )?;
    let daemon = Daemon::start(config, clock::system()).await?;
    let queue = daemon.queue().clone();
    queue
        .submit(vec![NewTask {
            id: "moving".into(),
            agent: "busy".into(),
            priority: Priority::Normal,
            payload: serde_json::json!({}),
        }])
        .await?;
    let agent = daemon.agents()[0].clone();
    let mut latencies = Vec::with_capacity(kills);
    while latencies.len() < kills {
        // Wait until the task runs and every replica is up.
        let give_up = Instant::now() + Duration::from_secs(30);
        let (holder, attempt) = loop {
            if Instant::now() > give_up {
                bail!("the task did not settle on a replica within 30 s");
            }
            let task = queue.get("moving").await?.context("task exists")?;
            let status = agent.status();
            let ready = status
                .replicas
                .iter()
                .filter(|r| {
                    matches!(
                        r.state,
                        flotilla::status::ReplicaState::Idle | flotilla::status::ReplicaState::Busy
                    )
                })
                .count();
            let holder = status
                .replicas
                .iter()
                .find(|r| r.tasks.iter().any(|t| t == "moving"))
                .and_then(|r| r.pid);
            if let Some(holder) = holder
                && task.state == TaskState::Running
                && ready == 3
            {
                break (holder, task.attempts);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // Let the replica get into its work.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let killed_at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64() * 1000.0;
        // The replica may have died on its own meanwhile: measure another.
        if nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(holder as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .is_err()
        {
            continue;
        }
        let give_up = Instant::now() + Duration::from_secs(30);
        let restarted_ms = loop {
            if Instant::now() > give_up {
                bail!("the killed replica's task did not start again within 30 s");
            }
            let task = queue.get("moving").await?.context("task exists")?;
            if let Some(next) = task.history.iter().find(|a| a.number == attempt + 1) {
                break next.started_ms as f64;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        // started_ms has millisecond resolution: the figure is ±1 ms.
        latencies.push((restarted_ms - killed_at).max(0.0));
    }
    daemon.stop().await;
    Ok(latencies)
}

async fn start_run(dir: &Path, starts: usize) -> anyhow::Result<Vec<f64>> {
    let config = noop_fleet(dir, "idle", "replicas = { min = 2 }")?;
    let client = client(&config)?;
    let daemon = Daemon::start(config, clock::system()).await?;
    // Let the replicas start and the fleet go idle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::with_capacity(starts);
    for n in 0..starts {
        let id = format!("start-{n}");
        let submitted = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64() * 1000.0;
        client
            .submit(vec![NewTask {
                id: id.clone(),
                agent: "idle".into(),
                priority: Priority::Normal,
                payload: serde_json::json!({}),
            }])
            .await?;
        let started = loop {
            let task = client.get(&id).await?.context("task exists")?;
            if task.state == TaskState::Completed {
                break task.history[0].started_ms as f64;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        latencies.push((started - submitted).max(0.0));
        // Idle again before the next one.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    daemon.stop().await;
    Ok(latencies)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let base = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("flotilla-bench-{}", std::process::id())),
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "flotilla-bench: {cores} cores, {} runs per figure, store under {}",
        args.runs,
        base.display()
    );
    if args.scenario == "all" || args.scenario == "throughput" {
        for replicas in args.replicas.split(',') {
            let replicas: u32 = replicas
                .trim()
                .parse()
                .context("--replicas takes numbers")?;
            for prefetch in args.prefetch.split(',') {
                let prefetch: u32 = prefetch
                    .trim()
                    .parse()
                    .context("--prefetch takes numbers")?;
                let mut rates = Vec::new();
                for run in 0..args.runs {
                    let dir = base.join(format!("throughput-{replicas}-{prefetch}-{run}"));
                    let rate = throughput_run(&dir, replicas, prefetch, args.tasks).await?;
                    println!(
                        "  throughput run {run}: {replicas} replicas, prefetch {prefetch}, {} tasks: {rate:.0} tasks/s",
                        args.tasks
                    );
                    rates.push(rate);
                }
                let (median, min, max) = summary(&mut rates);
                println!(
                    "throughput, {replicas} persistent no-op replicas, prefetch {prefetch}, embedded queue (fsync'd group commit): median {median:.0} tasks/s (min {min:.0}, max {max:.0})"
                );
            }
        }
    }
    if args.scenario == "all" || args.scenario == "recovery" {
        let mut latencies = Latencies::default();
        for run in 0..args.runs {
            let dir = base.join(format!("recovery-{run}"));
            let run_latencies = recovery_run(&dir, args.kills, "").await?;
            latencies.run(&format!("recovery run {run}"), "kills", run_latencies);
        }
        latencies.report(
            "recovery, kill -9 of a busy replica to its task starting on another",
            "kills",
        );
    }
    if args.scenario == "all" || args.scenario == "start" {
        let mut latencies = Latencies::default();
        for run in 0..args.runs {
            let dir = base.join(format!("start-{run}"));
            let run_latencies = start_run(&dir, args.starts).await?;
            latencies.run(&format!("start run {run}"), "submits", run_latencies);
        }
        latencies.report(
            "start, submit by another process to the task starting on an idle fleet",
            "submits",
        );
    }
    if args.scenario == "all" || args.scenario == "jetstream" {
        jetstream_scenario(&args, &base).await?;
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

async fn jetstream_scenario(args: &Args, base: &Path) -> anyhow::Result<()> {
    let server = NatsServer::start(&args.nats_server)?;
    let server_pid = server.child.id().to_string();
    let (mut raw, mut flotilla, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut recorded = Vec::new();
    let per_task = |before: f64, after: f64| (after - before) * 1e6 / args.jetstream_tasks as f64;
    for run in 0..args.runs {
        let (server_cpu, own_cpu) = (cpu_seconds(&server_pid), cpu_seconds("self"));
        let baseline = raw_jetstream_run(&server.url, run, args.jetstream_tasks, false).await?;
        let (server_mid, own_mid) = (cpu_seconds(&server_pid), cpu_seconds("self"));
        let ours = jetstream_throughput_run(
            &base.join(format!("jetstream-{run}")),
            &server.url,
            run,
            args.jetstream_tasks,
        )
        .await?;
        let (server_end, own_end) = (cpu_seconds(&server_pid), cpu_seconds("self"));
        let with_record = raw_jetstream_run(&server.url, run, args.jetstream_tasks, true).await?;
        let (server_last, own_last) = (cpu_seconds(&server_pid), cpu_seconds("self"));
        println!(
            "  jetstream run {run}: raw with a key-value record per task (create, read, update) {with_record:.0} tasks/s, ratio {:.2}; CPU per task: nats-server {:.0} µs, client {:.0} µs",
            with_record / baseline,
            per_task(server_end, server_last),
            per_task(own_end, own_last),
        );
        recorded.push(with_record / baseline);
        println!(
            "  jetstream run {run}: raw {baseline:.0} tasks/s, flotilla {ours:.0} tasks/s, ratio {:.2}; CPU per task: nats-server {:.0} µs raw, {:.0} µs flotilla; client/daemon process {:.0} µs raw, {:.0} µs flotilla (agents not counted)",
            ours / baseline,
            per_task(server_cpu, server_mid),
            per_task(server_mid, server_end),
            per_task(own_cpu, own_mid),
            per_task(own_mid, own_end),
        );
        raw.push(baseline);
        flotilla.push(ours);
        ratios.push(ours / baseline);
    }
    let (raw_median, raw_min, raw_max) = summary(&mut raw);
    let (median, min, max) = summary(&mut flotilla);
    let (ratio, ratio_min, ratio_max) = summary(&mut ratios);
    let (record_ratio, record_min, record_max) = summary(&mut recorded);
    println!(
        "jetstream raw with a key-value record per task (create, read, update): ratio to the baseline median {record_ratio:.2} (min {record_min:.2}, max {record_max:.2})"
    );
    println!(
        "jetstream throughput, {} tasks: raw baseline median {raw_median:.0} tasks/s (min {raw_min:.0}, max {raw_max:.0}); flotilla, 4 persistent no-op replicas, prefetch 64: median {median:.0} tasks/s (min {min:.0}, max {max:.0}); ratio median {ratio:.2} (min {ratio_min:.2}, max {ratio_max:.2})",
        args.jetstream_tasks
    );
    let mut latencies = Latencies::default();
    for run in 0..args.runs {
        let broker = broker_section(&server.url, &format!("recovery{run}"));
        let dir = base.join(format!("js-recovery-{run}"));
        let run_latencies = recovery_run(&dir, args.kills, &broker).await?;
        latencies.run(
            &format!("jetstream recovery run {run}"),
            "kills",
            run_latencies,
        );
    }
    latencies.report(
        "jetstream recovery, kill -9 of a busy replica to its task starting on another",
        "kills",
    );
    Ok(())
}
