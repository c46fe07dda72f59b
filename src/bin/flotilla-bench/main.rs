//! Benchmarks of flotilla on this machine, written up in BENCHMARKS.md.
//!
//! `scripts/bench.sh` builds the release binaries, installs what the
//! scenarios need, and runs `flotilla-bench --write`, which measures every
//! figure (each the median of `--runs` runs, with min and max, every
//! comparison taken in the same run) and rewrites the generated block of
//! BENCHMARKS.md and the plots in `docs/bench/`. Scenarios (`--scenario`,
//! comma-separated, default all):
//! - `throughput`: tasks/s through 1, 4 and 16 persistent no-op replicas
//!   (the built-in example agent with `--work-ms 0`) on the embedded queue
//!   with fsync'd group commits, for a pre-loaded queue.
//! - `jetstream`: on a nats-server the harness starts (free port, temporary
//!   store; `--nats-server` or `.tools/bin/nats-server`), alternating in
//!   one run: the raw JetStream baseline (publish with awaited PubAcks +
//!   pull consumer + ack) and flotilla end to end with 1, 4 and 16
//!   replicas; then crash-to-redispatch. `BENCH_NATS_EXTRA` adds arguments
//!   to that nats-server, e.g. `--profile 6061`.
//! - `latency`: submit-to-completion percentiles at fixed offered loads,
//!   on both backends.
//! - `recovery`: `kill -9` of a busy replica to its task starting on
//!   another; `kill -9` of the daemon to the first task completed after its
//!   restart; how late a stuck task is detected against its
//!   `progress_timeout`; submit-to-start on an idle fleet.
//! - `scale`: the daemon's memory and CPU with 100 and 1,000 replicas, idle
//!   and under load; 100,000 queued tasks drained.
//! - `celery`: Celery with `acks_late` on a local Redis (installed by
//!   `scripts/install-celery.sh`), against flotilla, same no-op work.

mod plot;
mod report;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Parser;
use flotilla::clock;
use flotilla::config;
use flotilla::daemon::Daemon;
use flotilla::queue::{NewTask, Priority, TaskQueue, TaskState};

use report::{LatencyPoint, Report, Row, ScalePoint, Stat, ThroughputPoint};

#[derive(Debug, Parser)]
#[command(about = "Benchmarks of flotilla (see BENCHMARKS.md)")]
struct Args {
    /// Scenarios, comma-separated: throughput, jetstream, latency,
    /// recovery, scale, celery, or all.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Runs per figure (the median is reported with min and max).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Tasks per embedded throughput run.
    #[arg(long, default_value_t = 50_000)]
    tasks: usize,
    /// Replica counts of the throughput runs, both backends.
    #[arg(long, default_value = "1,4,16")]
    replicas: String,
    /// Submits per start-latency run.
    #[arg(long, default_value_t = 100)]
    starts: usize,
    /// Kills per replica-recovery run.
    #[arg(long, default_value_t = 200)]
    kills: usize,
    /// Daemon kills per daemon-recovery run.
    #[arg(long, default_value_t = 5)]
    daemon_kills: usize,
    /// Offered loads of the latency runs, tasks/s.
    #[arg(long, default_value = "1000,10000")]
    loads: String,
    /// Seconds of offered load per latency run.
    #[arg(long, default_value_t = 5.0)]
    latency_seconds: f64,
    /// Replica counts of the scale runs.
    #[arg(long, default_value = "100,1000")]
    scale_replicas: String,
    /// Tasks of the backlog run (queued before the daemon starts).
    #[arg(long, default_value_t = 100_000)]
    backlog: usize,
    /// Tasks per Celery comparison run.
    #[arg(long, default_value_t = 20_000)]
    celery_tasks: usize,
    /// Working directory for stores (a temporary one by default).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// nats-server binary for the JetStream scenarios.
    #[arg(long, default_value = ".tools/bin/nats-server")]
    nats_server: PathBuf,
    /// Tasks per JetStream throughput run.
    #[arg(long, default_value_t = 20_000)]
    jetstream_tasks: usize,
    /// Python of the Celery virtualenv (from scripts/install-celery.sh).
    #[arg(long, default_value = ".tools/celery/bin/python")]
    celery_python: PathBuf,
    /// Rewrite BENCHMARKS.md's generated block and docs/bench/*.svg (run
    /// from the repository root).
    #[arg(long)]
    write: bool,
}

impl Args {
    fn wants(&self, scenario: &str) -> bool {
        self.scenario
            .split(',')
            .any(|s| s.trim() == scenario || s.trim() == "all")
    }
}

fn numbers(list: &str, flag: &str) -> anyhow::Result<Vec<u32>> {
    list.split(',')
        .map(|n| {
            n.trim()
                .parse()
                .with_context(|| format!("{flag} takes comma-separated numbers, not {n:?}"))
        })
        .collect()
}

const THROUGHPUT: &str = "Throughput";
const LATENCY: &str = "Latency under fixed offered load";
const RECOVERY: &str = "Recovery";
const SCALE: &str = "Scale";
const CELERY: &str = "Compared with Celery";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Resident memory of process `pid`, MB, from /proc.
fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// This machine, in one line.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {memory_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

/// The first line `program --version` prints.
fn version_of(program: &Path, flag: &str) -> String {
    Command::new(program)
        .arg(flag)
        .output()
        .ok()
        .map(|out| {
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            text.lines().next().unwrap_or_default().trim().to_string()
        })
        .unwrap_or_else(|| "unknown version".into())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let base = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("flotilla-bench-{}", std::process::id())),
    };
    let started = Instant::now();
    println!(
        "flotilla-bench on {}: {} runs per figure, stores under {}",
        machine(),
        args.runs,
        base.display()
    );
    let mut report = Report::default();
    let mut failed = Vec::new();
    // A scenario that fails is reported as such; the others still run.
    macro_rules! scenario {
        ($name:literal, $section:expr, $run:expr) => {
            if args.wants($name) {
                if let Err(error) = $run.await {
                    eprintln!("flotilla-bench: the {} scenario failed: {error:#}", $name);
                    report.note(
                        $section,
                        format!("**The `{}` scenario failed**: {error:#}", $name),
                    );
                    failed.push($name);
                }
            }
        };
    }
    scenario!(
        "throughput",
        THROUGHPUT,
        throughput_scenario(&args, &base, &mut report)
    );
    let nats = if args.wants("jetstream") || args.wants("latency") {
        Some(NatsServer::start(&args.nats_server)?)
    } else {
        None
    };
    if let Some(server) = &nats {
        scenario!(
            "jetstream",
            THROUGHPUT,
            jetstream_scenario(&args, &base, server, &mut report)
        );
        scenario!(
            "latency",
            LATENCY,
            latency_scenario(&args, &base, server, &mut report)
        );
    }
    scenario!(
        "recovery",
        RECOVERY,
        recovery_scenario(&args, &base, &mut report)
    );
    scenario!("scale", SCALE, scale_scenario(&args, &base, &mut report));
    scenario!("celery", CELERY, celery_scenario(&args, &base, &mut report));
    drop(nats);
    let _ = std::fs::remove_dir_all(&base);
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    println!("flotilla-bench: done in {minutes:.1} minutes");
    if args.write {
        write_up(&args, &report, minutes)?;
    }
    if !failed.is_empty() {
        bail!("scenarios failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Rewrites the generated block of BENCHMARKS.md and the plots.
fn write_up(args: &Args, report: &Report, minutes: f64) -> anyhow::Result<()> {
    std::fs::create_dir_all("docs/bench")?;
    let mut plots = Vec::new();
    if !report.throughput.is_empty() {
        let mut groups: Vec<u32> = report.throughput.iter().map(|p| p.replicas).collect();
        groups.sort_unstable();
        groups.dedup();
        let mut series: Vec<String> = Vec::new();
        for point in &report.throughput {
            if !series.contains(&point.series) {
                series.push(point.series.clone());
            }
        }
        let values = groups
            .iter()
            .map(|replicas| {
                series
                    .iter()
                    .map(|name| {
                        report
                            .throughput
                            .iter()
                            .find(|p| p.replicas == *replicas && &p.series == name)
                            .map(|p| p.rate)
                    })
                    .collect()
            })
            .collect();
        let raw = report
            .throughput
            .iter()
            .find(|p| p.series == RAW_SERIES)
            .map(|p| p.rate.median);
        plot::Bars {
            title: "Throughput, no-op tasks (median, whiskers min–max)",
            unit: "tasks/s",
            groups: groups
                .iter()
                .map(|r| format!("{r} replica{}", if *r == 1 { "" } else { "s" }))
                .collect(),
            series,
            values,
            log: false,
            target: raw.map(|raw| (raw * 0.5, "0.5 × raw JetStream".to_string())),
        }
        .draw(Path::new("docs/bench/throughput.svg"))?;
        plots.push((THROUGHPUT, "docs/bench/throughput.svg"));
    }
    if !report.latency.is_empty() {
        let groups: Vec<String> = report
            .latency
            .iter()
            .map(|p| format!("{} {}/s", p.backend, report::group(f64::from(p.load), 0)))
            .collect();
        let values = report
            .latency
            .iter()
            .map(|p| vec![Some(p.p50), Some(p.p99), Some(p.p999)])
            .collect();
        plot::Bars {
            title: "Submit to completion (median of runs, whiskers min–max; log scale)",
            unit: "ms",
            groups,
            series: vec!["p50".into(), "p99".into(), "p99.9".into()],
            values,
            log: true,
            target: None,
        }
        .draw(Path::new("docs/bench/latency.svg"))?;
        plots.push((LATENCY, "docs/bench/latency.svg"));
    }
    if !report.scale.is_empty() {
        plot::Bars {
            title: "Daemon memory with many replicas (agents not counted)",
            unit: "MB resident",
            groups: report
                .scale
                .iter()
                .map(|p| format!("{} replicas", report::group(f64::from(p.replicas), 0)))
                .collect(),
            series: vec!["idle".into(), "under load (peak)".into()],
            values: report
                .scale
                .iter()
                .map(|p| vec![Some(p.idle_rss_mb), Some(p.load_rss_mb)])
                .collect(),
            log: false,
            target: Some((200.0, "target: 200 MB".into())),
        }
        .draw(Path::new("docs/bench/scale.svg"))?;
        plots.push((SCALE, "docs/bench/scale.svg"));
    }
    let date: String = humantime::format_rfc3339(SystemTime::now())
        .to_string()
        .chars()
        .take(10)
        .collect();
    let header = format!(
        "Measured {date} on {}: `scripts/bench.sh` ({} runs per figure, {minutes:.0} minutes). \
         Each figure is the median of the runs with min and max; every comparison was taken \
         in the same run.",
        machine(),
        args.runs
    );
    report::write_block(
        Path::new("BENCHMARKS.md"),
        &report.markdown(&header, &plots),
    )?;
    println!("flotilla-bench: wrote BENCHMARKS.md and docs/bench/");
    Ok(())
}

const RAW_SERIES: &str = "raw JetStream";

async fn throughput_scenario(args: &Args, base: &Path, report: &mut Report) -> anyhow::Result<()> {
    for replicas in numbers(&args.replicas, "--replicas")? {
        let mut rates = Vec::new();
        let mut cpu = Vec::new();
        for run in 0..args.runs {
            let dir = base.join(format!("throughput-{replicas}-{run}"));
            let done = throughput_run(&dir, replicas, 64, args.tasks).await?;
            println!(
                "  embedded run {run}: {replicas} replicas, prefetch 64: {:.0} tasks/s; CPU per task: daemon {:.0} µs, agents {:.0} µs, machine {:.0} µs",
                done.rate, done.daemon_cpu, done.agents_cpu, done.machine_cpu
            );
            rates.push(done.rate);
            cpu.push([done.daemon_cpu, done.agents_cpu, done.machine_cpu]);
        }
        if replicas == 4 {
            let column = |index: usize| Stat::column(&cpu, index);
            report.note(
                THROUGHPUT,
                format!(
                    "CPU per task on the embedded store (4 replicas, `prefetch = 64`): the daemon {}, \
                     the agents {}, the whole machine {}.",
                    column(0).show(0, "µs"),
                    column(1).show(0, "µs"),
                    column(2).show(0, "µs"),
                ),
            );
        }
        let rate = Stat::of(&rates);
        let figure = format!(
            "embedded, {replicas} no-op replica{}, `prefetch = 64`, {} tasks pre-loaded",
            if replicas == 1 { "" } else { "s" },
            report::group(args.tasks as f64, 0)
        );
        let measured = rate.show(0, "tasks/s");
        // One replica is not what the target is about.
        report.row(
            THROUGHPUT,
            if replicas >= 4 {
                Row::goal(
                    figure,
                    "≥ 20,000 tasks/s",
                    measured,
                    rate.median >= 20_000.0,
                )
            } else {
                Row::info(figure, measured)
            },
        );
        report.throughput.push(ThroughputPoint {
            series: "embedded".into(),
            replicas,
            rate,
        });
    }
    let mut rates = Vec::new();
    for run in 0..args.runs {
        let dir = base.join(format!("throughput-default-{run}"));
        let rate = throughput_run(&dir, 4, 0, args.tasks / 5).await?.rate;
        println!("  embedded run {run}: 4 replicas, prefetch 0: {rate:.0} tasks/s");
        rates.push(rate);
    }
    report.row(
        THROUGHPUT,
        Row::info(
            "embedded, 4 no-op replicas, `prefetch = 0` (the default)",
            Stat::of(&rates).show(0, "tasks/s"),
        ),
    );
    Ok(())
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
    // utime and stime: the 14th and 15th fields of /proc/PID/stat.
    process_ticks(pid, &[11, 12]) / ticks_per_second()
}

/// CPU seconds (user + system) used by this process's children that have
/// ended and been waited for: the agents, once their daemon stopped.
fn children_cpu_seconds() -> f64 {
    // cutime and cstime: the 16th and 17th fields.
    process_ticks("self", &[13, 14]) / ticks_per_second()
}

/// The sum of the given fields of /proc/PID/stat, counted from the field
/// after the parenthesized command (the state) as 0.
fn process_ticks(pid: &str, indices: &[usize]) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    indices
        .iter()
        .filter_map(|index| fields.get(*index)?.parse::<f64>().ok())
        .sum()
}

/// CPU seconds every core of the machine spent busy so far (user, nice,
/// system, irq and softirq; not idle, I/O wait or time stolen by the
/// hypervisor), from /proc/stat.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .filter(|line| line.starts_with("cpu "))
        .map(|line| {
            line.split_whitespace()
                .skip(1)
                .take(7)
                .filter_map(|field| field.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    (ticks.iter().sum::<f64>() - idle) / ticks_per_second()
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
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
/// What a raw JetStream run writes to a key-value bucket per task before
/// its ack.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RawRecord {
    /// Nothing: the baseline.
    None,
    /// A record created, read and updated by compare-and-set: the least
    /// a record kept through a task's life costs.
    Lifecycle,
    /// One create-only write (the task's final record, which fences a
    /// second completion): the least the lean-record design costs.
    Final,
}

async fn raw_jetstream_run(
    url: &str,
    run: usize,
    tasks: usize,
    record: RawRecord,
) -> anyhow::Result<f64> {
    use async_nats::jetstream::{self, consumer, kv, stream};
    use futures_util::StreamExt as _;
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let name = format!(
        "RAW{run}{}",
        match record {
            RawRecord::None => "",
            RawRecord::Lifecycle => "R",
            RawRecord::Final => "F",
        }
    );
    let records = if record != RawRecord::None {
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
                        if record == RawRecord::Lifecycle {
                            records.entry(&key).await?;
                            records
                                .update(&key, message.payload.clone(), revision)
                                .await?;
                        }
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
/// batches of 1,000) while `replicas` persistent no-op replicas work;
/// tasks/s from the first submit to the last completion.
async fn jetstream_throughput_run(
    dir: &Path,
    url: &str,
    namespace: &str,
    replicas: u32,
    tasks: usize,
    server_pid: &str,
) -> anyhow::Result<JetStreamRun> {
    use flotilla::queue::sqlite::Role;
    use flotilla::store::Store;
    let _ = std::fs::remove_dir_all(dir);
    let exe = flotilla_exe()?.display().to_string();
    let config = write_config(
        dir,
        &format!(
            "{}[agents.noop]\ncommand = [{exe:?}, \"example-agent\", \"--work-ms\", \"0\"]\nreplicas = {{ min = {replicas} }}\nprefetch = 64\n",
            broker_section(url, namespace)
        ),
    )?;
    let agents_cpu = children_cpu_seconds();
    let daemon = Daemon::start(config.clone(), clock::system()).await?;
    let store = Store::open(&config, Role::Client, clock::system(), "bench").await?;
    let queue = store.queue();
    let (server_cpu, own_cpu, machine_cpu) = (
        cpu_seconds(server_pid),
        cpu_seconds("self"),
        machine_busy_seconds(),
    );
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
    // CPU of the throughput window only (not of the listing below).
    let per_task = |before: f64, after: f64| (after - before) * 1e6 / tasks as f64;
    let server_cpu = per_task(server_cpu, cpu_seconds(server_pid));
    let own_cpu = per_task(own_cpu, cpu_seconds("self"));
    let machine_cpu = per_task(machine_cpu, machine_busy_seconds());
    // The agents' CPU counts once they ended and were waited for; idle
    // before and after the window, they add next to nothing.
    daemon.stop().await;
    let agents_cpu = per_task(agents_cpu, children_cpu_seconds());
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
    Ok(JetStreamRun {
        rate: tasks as f64 / ((finished_ms - started_ms).max(1) as f64 / 1000.0),
        server_cpu,
        own_cpu,
        agents_cpu,
        machine_cpu,
    })
}

/// One end-to-end JetStream run: tasks/s and CPU per task (µs).
struct JetStreamRun {
    rate: f64,
    /// nats-server's.
    server_cpu: f64,
    /// The process running the daemon and the submitting client.
    own_cpu: f64,
    /// The agents' processes.
    agents_cpu: f64,
    /// The whole machine's, every core.
    machine_cpu: f64,
}

/// A look into a fleet's embedded store from outside, cheap enough to
/// poll while the daemon works, so that the harness does not compete with
/// it for the CPU. It reads the store's own columns: state codes 1 to 3
/// are ready, delayed and running (see src/queue/sqlite.rs), each with a
/// partial index; `finished_at` is the time a task ended.
struct Watcher(rusqlite::Connection);

impl Watcher {
    fn open(store: &Path) -> anyhow::Result<Self> {
        Ok(Self(rusqlite::Connection::open(store)?))
    }

    /// Whether any task is queued or running.
    fn unfinished(&self) -> anyhow::Result<bool> {
        Ok(self.0.query_row(
            "SELECT EXISTS (SELECT 1 FROM tasks WHERE state = 1) OR EXISTS (SELECT 1 FROM tasks WHERE state = 2)
             OR EXISTS (SELECT 1 FROM tasks WHERE state = 3)",
            [],
            |row| row.get(0),
        )?)
    }

    /// When the last task ended (ms).
    fn last_finished_ms(&self) -> anyhow::Result<u64> {
        let last: Option<i64> =
            self.0
                .query_row("SELECT max(finished_at) FROM tasks", [], |row| row.get(0))?;
        Ok(last.context("no task ended")? as u64)
    }

    /// When the first task that ended at or after `since` (ms) ended.
    fn first_finished_since(&self, since: u64) -> anyhow::Result<Option<u64>> {
        let first: Option<i64> = self.0.query_row(
            "SELECT min(finished_at) FROM tasks WHERE finished_at >= ?1",
            [since as i64],
            |row| row.get(0),
        )?;
        Ok(first.map(|ms| ms as u64))
    }
}

async fn throughput_run(
    dir: &Path,
    replicas: u32,
    prefetch: u32,
    tasks: usize,
) -> anyhow::Result<EmbeddedRun> {
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
    let before = [
        cpu_seconds("self"),
        children_cpu_seconds(),
        machine_busy_seconds(),
    ];
    let daemon = Daemon::start(config, clock::system()).await?;
    let watcher = Watcher::open(&store)?;
    let started_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let deadline = Instant::now() + Duration::from_secs(600);
    // Poll rarely, and take the end time from the store (the last
    // completion), not from the poll.
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if !watcher.unfinished()? {
            break;
        }
        if Instant::now() > deadline {
            bail!("throughput run did not finish in 10 minutes");
        }
    }
    let elapsed = (watcher.last_finished_ms()? as i64 - started_ms).max(1) as f64 / 1000.0;
    let (own, machine) = (cpu_seconds("self"), machine_busy_seconds());
    daemon.stop().await;
    let per_task = |before: f64, after: f64| (after - before) * 1e6 / tasks as f64;
    Ok(EmbeddedRun {
        rate: tasks as f64 / elapsed,
        daemon_cpu: per_task(before[0], own),
        agents_cpu: per_task(before[1], children_cpu_seconds()),
        machine_cpu: per_task(before[2], machine),
    })
}

/// One end-to-end run on the embedded store: tasks/s and CPU per task (µs).
struct EmbeddedRun {
    rate: f64,
    /// The daemon's process (the harness's own polling is next to nothing).
    daemon_cpu: f64,
    /// The agents' processes.
    agents_cpu: f64,
    /// The whole machine's, every core.
    machine_cpu: f64,
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
# The kills are the experiment: no breaker or error-rate rule may hold the
# task back.
breaker = {{ enabled = false }}
watchdog = {{ error_rate = 1.0 }}
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

async fn jetstream_scenario(
    args: &Args,
    base: &Path,
    server: &NatsServer,
    report: &mut Report,
) -> anyhow::Result<()> {
    report.note(
        THROUGHPUT,
        format!(
            "JetStream rows: {}, one server, file storage, on the same machine as the daemon; \
             {} tasks per run submitted by a client while the replicas work. The raw baseline \
             publishes with `Nats-Msg-Id` and awaited PubAcks (256 in flight) while a durable \
             pull consumer acks.",
            version_of(&args.nats_server, "--version"),
            report::group(args.jetstream_tasks as f64, 0)
        ),
    );
    let server_pid = server.child.id().to_string();
    let replica_counts = numbers(&args.replicas, "--replicas")?;
    let mut raw = Vec::new();
    let mut ours: Vec<Vec<f64>> = vec![Vec::new(); replica_counts.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); replica_counts.len()];
    let mut cpu = Vec::new();
    let mut bounds = Vec::new();
    let mut recorded = Vec::new();
    let mut finals = Vec::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let per_task = |before: f64, after: f64| (after - before) * 1e6 / args.jetstream_tasks as f64;
    for run in 0..args.runs {
        let (server_cpu, machine_cpu) = (cpu_seconds(&server_pid), machine_busy_seconds());
        let baseline =
            raw_jetstream_run(&server.url, run, args.jetstream_tasks, RawRecord::None).await?;
        let (server_mid, machine_mid) = (cpu_seconds(&server_pid), machine_busy_seconds());
        let raw_machine = per_task(machine_cpu, machine_mid);
        let with_record =
            raw_jetstream_run(&server.url, run, args.jetstream_tasks, RawRecord::Lifecycle).await?;
        let with_final =
            raw_jetstream_run(&server.url, run, args.jetstream_tasks, RawRecord::Final).await?;
        println!(
            "  jetstream run {run}: raw {baseline:.0} tasks/s; raw with a key-value record per task {with_record:.0} tasks/s; with one final write per task {with_final:.0} tasks/s"
        );
        raw.push(baseline);
        recorded.push(with_record / baseline);
        finals.push(with_final / baseline);
        for (index, replicas) in replica_counts.iter().enumerate() {
            let ours_run = jetstream_throughput_run(
                &base.join(format!("jetstream-{run}-{replicas}")),
                &server.url,
                &format!("bench{run}r{replicas}"),
                *replicas,
                args.jetstream_tasks,
                &server_pid,
            )
            .await?;
            let rate = ours_run.rate;
            println!(
                "  jetstream run {run}: {replicas} replicas {rate:.0} tasks/s, ratio {:.2}; CPU per task: nats-server {:.0} µs, daemon and client {:.0} µs, agents {:.0} µs, machine {:.0} µs (raw: {raw_machine:.0} µs)",
                rate / baseline,
                ours_run.server_cpu,
                ours_run.own_cpu,
                ours_run.agents_cpu,
                ours_run.machine_cpu,
            );
            if *replicas == 4 {
                // No design can take less CPU per task than the raw path
                // plus the agents' own work, which share these cores.
                bounds.push(cores / (raw_machine + ours_run.agents_cpu) * 1e6 / baseline);
                cpu.push([
                    per_task(server_cpu, server_mid),
                    ours_run.server_cpu,
                    ours_run.own_cpu,
                    ours_run.agents_cpu,
                    raw_machine,
                    ours_run.machine_cpu,
                ]);
            }
            ours[index].push(rate);
            ratios[index].push(rate / baseline);
        }
    }
    let raw = Stat::of(&raw);
    report.row(
        THROUGHPUT,
        Row::info(
            "raw JetStream baseline (publish with awaited PubAcks + pull consumer + plain ack)",
            raw.show(0, "tasks/s"),
        ),
    );
    report.row(
        THROUGHPUT,
        Row::info("raw JetStream plus a key-value record per task, created, read and updated by compare-and-set before the ack (256 in flight): ratio to raw, the least a record per task costs", Stat::of(&recorded).times_raw()),
    );
    report.row(
        THROUGHPUT,
        Row::info("raw JetStream plus one create-only key-value write per task before the ack (256 in flight): ratio to raw, the least a design with only a final record per task costs", Stat::of(&finals).times_raw()),
    );
    for (index, replicas) in replica_counts.iter().enumerate() {
        let rate = Stat::of(&ours[index]);
        let ratio = Stat::of(&ratios[index]);
        report.row(
            THROUGHPUT,
            Row::goal(
                format!(
                    "JetStream, {replicas} no-op replica{}, `prefetch = 64`: ratio to raw",
                    if *replicas == 1 { "" } else { "s" }
                ),
                "≥ 0.5 × raw",
                format!("{}; {}", ratio.times_raw(), rate.show(0, "tasks/s")),
                ratio.median >= 0.5,
            ),
        );
        report.throughput.push(ThroughputPoint {
            series: "JetStream".into(),
            replicas: *replicas,
            rate,
        });
    }
    if !bounds.is_empty() {
        report.row(
            THROUGHPUT,
            Row::info(
                format!(
                    "JetStream, 4 no-op replicas: the most any design could reach on this machine, \
                     {cores:.0} cores ÷ (the raw baseline's CPU per task, whole machine, + the agents' CPU per task)"
                ),
                format!("≤ {}", Stat::of(&bounds).times_raw()),
            ),
        );
    }
    if !cpu.is_empty() {
        let column = |index: usize| Stat::column(&cpu, index);
        report.note(
            THROUGHPUT,
            format!(
                "CPU per task on JetStream (4 replicas): nats-server {} for the raw baseline, {} for flotilla; \
                 the process running the daemon and the submitting client {}; the agents {}; \
                 the whole machine {} for the raw baseline, {} for flotilla.",
                column(0).show(0, "µs"),
                column(1).show(0, "µs"),
                column(2).show(0, "µs"),
                column(3).show(0, "µs"),
                column(4).show(0, "µs"),
                column(5).show(0, "µs"),
            ),
        );
    }
    report.throughput.push(ThroughputPoint {
        series: RAW_SERIES.into(),
        replicas: 4,
        rate: raw,
    });
    replica_recovery(args, base, report, "JetStream", |run| {
        broker_section(&server.url, &format!("recovery{run}"))
    })
    .await?;
    Ok(())
}

/// Submit-to-completion latency at `rate` tasks/s offered for `seconds`
/// (open loop: tasks are submitted on schedule whatever the fleet does),
/// 4 no-op replicas with `prefetch = 64`, submits through the daemon (as
/// the API's are). Returns the latencies (ms) and the rate achieved.
async fn latency_run(
    dir: &Path,
    broker: &str,
    rate: u32,
    seconds: f64,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let _ = std::fs::remove_dir_all(dir);
    let exe = flotilla_exe()?.display().to_string();
    let config = write_config(
        dir,
        &format!(
            "{broker}[agents.noop]\ncommand = [{exe:?}, \"example-agent\", \"--work-ms\", \"0\"]\nreplicas = {{ min = 4 }}\nprefetch = 64\n"
        ),
    )?;
    let daemon = Daemon::start(config, clock::system()).await?;
    let queue = daemon.queue().clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = (f64::from(rate) * seconds) as usize;
    let started = Instant::now();
    let mut sent = 0;
    while sent < total {
        let due = ((started.elapsed().as_secs_f64() * f64::from(rate)) as usize).min(total);
        if due > sent {
            let batch = (sent..due)
                .map(|n| NewTask {
                    id: format!("l{n}"),
                    agent: "noop".into(),
                    priority: Priority::Normal,
                    payload: serde_json::json!({"n": n}),
                })
                .collect();
            queue.submit(batch).await?;
            sent = due;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let give_up = Instant::now() + Duration::from_secs(300);
    loop {
        let counts = queue.counts().await?;
        let done: u64 = counts
            .iter()
            .map(|(_, c)| c.completed + c.dead_lettered)
            .sum();
        if done as usize >= total {
            break;
        }
        if Instant::now() > give_up {
            bail!("latency run: {done} of {total} tasks finished in 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let records = queue
        .list(&flotilla::queue::ListFilter {
            state: Some(TaskState::Completed),
            agent: None,
            limit: usize::MAX,
        })
        .await?;
    daemon.stop().await;
    if records.len() != total {
        bail!("latency run: {} of {total} tasks completed", records.len());
    }
    let first = records.iter().map(|r| r.created_ms).min().unwrap_or(0);
    let last = records
        .iter()
        .filter_map(|r| r.finished_ms)
        .max()
        .unwrap_or(0);
    let mut latencies: Vec<f64> = records
        .iter()
        .filter_map(|r| Some(r.finished_ms?.saturating_sub(r.created_ms) as f64))
        .collect();
    latencies.sort_by(f64::total_cmp);
    Ok((
        latencies,
        total as f64 / ((last - first).max(1) as f64 / 1000.0),
    ))
}

async fn latency_scenario(
    args: &Args,
    base: &Path,
    server: &NatsServer,
    report: &mut Report,
) -> anyhow::Result<()> {
    for backend in ["embedded", "JetStream"] {
        for load in numbers(&args.loads, "--loads")? {
            let (mut p50, mut p99, mut p999, mut achieved) = (vec![], vec![], vec![], vec![]);
            for run in 0..args.runs {
                let broker = if backend == "embedded" {
                    String::new()
                } else {
                    broker_section(&server.url, &format!("latency{run}l{load}"))
                };
                let (latencies, rate) = latency_run(
                    &base.join(format!("latency-{backend}-{load}-{run}")),
                    &broker,
                    load,
                    args.latency_seconds,
                )
                .await?;
                println!(
                    "  latency run {run}: {backend}, {load}/s offered, {rate:.0}/s done: p50 {:.0} ms, p99 {:.0} ms, p99.9 {:.0} ms",
                    percentile(&latencies, 0.5),
                    percentile(&latencies, 0.99),
                    percentile(&latencies, 0.999)
                );
                p50.push(percentile(&latencies, 0.5));
                p99.push(percentile(&latencies, 0.99));
                p999.push(percentile(&latencies, 0.999));
                achieved.push(rate);
            }
            let point = LatencyPoint {
                backend: backend.into(),
                load,
                p50: Stat::of(&p50),
                p99: Stat::of(&p99),
                p999: Stat::of(&p999),
            };
            report.row(
                LATENCY,
                Row::info(
                    format!(
                        "{backend}, {} tasks/s offered for {} s: p50 / p99 / p99.9",
                        report::group(f64::from(load), 0),
                        args.latency_seconds
                    ),
                    format!(
                        "{} / {} / {}; done at {}",
                        point.p50.show(0, "ms"),
                        point.p99.show(0, "ms"),
                        point.p999.show(0, "ms"),
                        Stat::of(&achieved).show(0, "tasks/s")
                    ),
                ),
            );
            report.latency.push(point);
        }
    }
    report.note(
        LATENCY,
        "From the submit (the task's creation time in the store) to its completion (the time the \
         outcome was recorded), both taken by the daemon's clock, in milliseconds: ±1 ms. Tasks \
         are submitted through the daemon, as the API does, in batches every millisecond on \
         schedule (an open loop: a slow fleet does not slow the offered load), to 4 no-op \
         replicas with `prefetch = 64`. The harness runs in the daemon's process."
            .into(),
    );
    Ok(())
}

/// `flotilla up` for the fleet in `dir`, as its own process; its log goes
/// to `dir/daemon.log`.
fn spawn_daemon(dir: &Path) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join("daemon.log"))?;
    Command::new(flotilla_exe()?)
        .arg("-c")
        .arg(dir.join("flotilla.toml"))
        .arg("up")
        .env(
            "FLOTILLA_LOG",
            std::env::var("BENCH_DAEMON_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("flotilla up")
}

/// Stops a daemon process gracefully (SIGTERM, then SIGKILL after 60 s).
fn stop_daemon(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let give_up = Instant::now() + Duration::from_secs(60);
    while Instant::now() < give_up {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Replicas of the fleet in `dir` that are up (idle or busy), from
/// `flotilla status --json`.
fn replicas_up(dir: &Path) -> usize {
    let Ok(output) = Command::new(flotilla_exe().unwrap_or_default())
        .arg("-c")
        .arg(dir.join("flotilla.toml"))
        .args(["status", "--json"])
        .env("FLOTILLA_LOG", "error")
        .output()
    else {
        return 0;
    };
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    status["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|agent| agent["replicas"].as_array().into_iter().flatten())
        .filter(|replica| matches!(replica["state"].as_str(), Some("idle" | "busy")))
        .count()
}

/// Polls `done` every `every` until it is true, for at most `limit`.
async fn wait_for(
    limit: Duration,
    every: Duration,
    what: &str,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let give_up = Instant::now() + limit;
    while !done()? {
        if Instant::now() > give_up {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(every).await;
    }
    Ok(())
}

/// `kill -9` of the daemon, then the time from its restart (the process
/// spawned) to the first task it completes, `kills` times (ms each).
async fn daemon_restart_run(dir: &Path, kills: usize) -> anyhow::Result<Vec<f64>> {
    let _ = std::fs::remove_dir_all(dir);
    let exe = flotilla_exe()?.display().to_string();
    let config = write_config(
        dir,
        &format!(
            "[agents.noop]\ncommand = [{exe:?}, \"example-agent\", \"--work-ms\", \"10\"]\nreplicas = {{ min = 4 }}\n"
        ),
    )?;
    submit_noop(&client(&config)?, 50_000, 10_000).await?;
    let watcher = Watcher::open(&config.store_path())?;
    let mut latencies = Vec::new();
    // The first start is a cold one; each later one follows a kill -9.
    let mut daemon = spawn_daemon(dir)?;
    for round in 0..=kills {
        let spawned = now_ms();
        let mut first = None;
        wait_for(
            Duration::from_secs(60),
            Duration::from_millis(2),
            "a task completed after the daemon started",
            || {
                first = watcher.first_finished_since(spawned)?;
                Ok(first.is_some())
            },
        )
        .await?;
        if round > 0 {
            latencies.push(first.map_or(0, |first| first - spawned) as f64);
        }
        if round == kills {
            break;
        }
        // Work for a moment, then crash.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = daemon.kill();
        let _ = daemon.wait();
        daemon = spawn_daemon(dir)?;
    }
    stop_daemon(&mut daemon);
    Ok(latencies)
}

/// Tasks whose agent hangs without progress: how much later than
/// `progress_timeout` (1 s) each attempt was ended (ms each).
async fn stuck_run(dir: &Path, tasks: usize) -> anyhow::Result<Vec<f64>> {
    let _ = std::fs::remove_dir_all(dir);
    let exe = flotilla_exe()?.display().to_string();
    let config = write_config(
        dir,
        &format!(
            "[agents.stuck]\ncommand = [{exe:?}, \"example-agent\", \"--work-ms\", \"0\", \"--hang-rate\", \"1.0\"]\n\
             replicas = {{ min = 4 }}\ntimeouts = {{ progress_timeout = \"1s\", max_duration = \"1h\", stop_grace = \"1s\" }}\n\
             retry = {{ max_deliver = 1 }}\nbreaker = {{ enabled = false }}\n\
             restart = {{ initial_backoff = \"10ms\", max_backoff = \"10ms\", max_restarts = 100000 }}\n"
        ),
    )?;
    let daemon = Daemon::start(config, clock::system()).await?;
    let queue = daemon.queue().clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids: Vec<String> = (0..tasks).map(|n| format!("stuck{n}")).collect();
    queue
        .submit(
            ids.iter()
                .map(|id| NewTask {
                    id: id.clone(),
                    agent: "stuck".into(),
                    priority: Priority::Normal,
                    payload: serde_json::json!({}),
                })
                .collect(),
        )
        .await?;
    let mut errors = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(60);
    for id in &ids {
        loop {
            let task = queue.get(id).await?.context("task exists")?;
            if task.state == TaskState::DeadLettered {
                let attempt = task.history.first().context("an attempt")?;
                if attempt.outcome != Some(flotilla::queue::AttemptOutcome::ProgressTimeout) {
                    bail!(
                        "stuck task {id} ended with {:?}, not a progress timeout",
                        attempt.outcome
                    );
                }
                let took = attempt.ended_ms.context("ended")? - attempt.started_ms;
                errors.push(took as f64 - 1000.0);
                break;
            }
            if Instant::now() > give_up {
                bail!("stuck task {id} was not ended within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    daemon.stop().await;
    Ok(errors)
}

/// The replica-crash recovery figure on one backend (`broker` gives each
/// run's `[broker]` section, empty for the embedded store).
async fn replica_recovery(
    args: &Args,
    base: &Path,
    report: &mut Report,
    backend: &str,
    broker: impl Fn(usize) -> String,
) -> anyhow::Result<()> {
    let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        let dir = base.join(format!("recovery-{backend}-{run}"));
        let mut latencies = recovery_run(&dir, args.kills, &broker(run)).await?;
        latencies.sort_by(f64::total_cmp);
        p50s.push(percentile(&latencies, 0.5));
        p99s.push(percentile(&latencies, 0.99));
        println!(
            "  {backend} recovery run {run}: p50 {:.1} ms, p99 {:.1} ms",
            p50s[run], p99s[run]
        );
    }
    let p99 = Stat::of(&p99s);
    report.row(
        RECOVERY,
        Row::goal(format!(
                "{backend}: `kill -9` of a busy replica → its task starting on another, p99 ({} kills per run)",
                args.kills
            ), "< 20 ms", format!("{}; p50 {}", p99.show(1, "ms"), Stat::of(&p50s).show(1, "ms")), p99.median < 20.0),
    );
    Ok(())
}

async fn recovery_scenario(args: &Args, base: &Path, report: &mut Report) -> anyhow::Result<()> {
    replica_recovery(args, base, report, "embedded", |_| String::new()).await?;
    let (mut medians, mut maxima) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        let mut latencies =
            daemon_restart_run(&base.join(format!("restart-{run}")), args.daemon_kills).await?;
        latencies.sort_by(f64::total_cmp);
        println!("  daemon restart run {run}: {latencies:?} ms");
        medians.push(percentile(&latencies, 0.5));
        maxima.push(latencies[latencies.len() - 1]);
    }
    report.row(
        RECOVERY,
        Row::info(format!(
                "embedded: `kill -9` of the daemon → restarted → first task completed ({} kills per run; 4 replicas started anew)",
                args.daemon_kills
            ), format!("{}; slowest {}", Stat::of(&medians).show(0, "ms"), Stat::of(&maxima).show(0, "ms"))),
    );
    let (mut medians, mut maxima) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        let mut errors = stuck_run(&base.join(format!("stuck-{run}")), 8).await?;
        errors.sort_by(f64::total_cmp);
        println!("  stuck run {run}: {errors:?} ms late");
        medians.push(percentile(&errors, 0.5));
        maxima.push(errors[errors.len() - 1]);
    }
    report.row(
        RECOVERY,
        Row::info("stuck detection: how late a hung attempt is ended after `progress_timeout = \"1s\"` (8 hung tasks per run)", format!("{}; latest {}", Stat::of(&medians).show(0, "ms"), Stat::of(&maxima).show(0, "ms"))),
    );
    let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        let mut latencies = start_run(&base.join(format!("start-{run}")), args.starts).await?;
        latencies.sort_by(f64::total_cmp);
        p50s.push(percentile(&latencies, 0.5));
        p99s.push(percentile(&latencies, 0.99));
    }
    report.row(
        RECOVERY,
        Row::info(format!("submit by another process (`flotilla submit`) → task starting on an idle fleet, p99 ({} submits per run)", args.starts), format!("{}; p50 {}", Stat::of(&p99s).show(1, "ms"), Stat::of(&p50s).show(1, "ms"))),
    );
    report.note(
        RECOVERY,
        "Times are wall-clock milliseconds taken by the harness and recorded by the daemon: ±1 ms. \
         A killed replica's task goes back to the queue the moment its pipe closes (no lease \
         deadline to wait for). A restarted daemon opens the store, returns the dead daemon's \
         running tasks to the queue, starts its replicas and leases; most of the figure is the \
         replicas' start."
            .into(),
    );
    Ok(())
}

/// One scale run: the daemon as its own process with `replicas` no-op
/// replicas; its RSS and CPU idle, then while `load` tasks are drained.
struct ScaleRun {
    ready_s: f64,
    idle_rss: f64,
    idle_cpu_pct: f64,
    load_rss: f64,
    load_cpu_pct: f64,
    load_rate: f64,
}

async fn scale_run(dir: &Path, replicas: u32, load: usize) -> anyhow::Result<ScaleRun> {
    let _ = std::fs::remove_dir_all(dir);
    let exe = flotilla_exe()?.display().to_string();
    let config = write_config(
        dir,
        &format!(
            "[daemon]\nstatus_interval = \"1s\"\n\n[agents.noop]\ncommand = [{exe:?}, \"example-agent\", \"--work-ms\", \"0\"]\n\
             replicas = {{ min = {replicas}, max = {replicas} }}\ntimeouts = {{ startup = \"5m\" }}\n"
        ),
    )?;
    let started = Instant::now();
    let mut daemon = spawn_daemon(dir)?;
    let pid = daemon.id();
    let outcome = async {
        wait_for(
            Duration::from_secs(300),
            Duration::from_secs(1),
            "every replica up",
            || Ok(replicas_up(dir) >= replicas as usize),
        )
        .await?;
        let ready_s = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (cpu_before, idle_from) = (cpu_seconds(&pid.to_string()), Instant::now());
        tokio::time::sleep(Duration::from_secs(10)).await;
        let idle_cpu_pct = (cpu_seconds(&pid.to_string()) - cpu_before)
            / idle_from.elapsed().as_secs_f64()
            * 100.0;
        let idle_rss = rss_mb(pid);
        let queue = client(&config)?;
        let (cpu_before, load_from) = (cpu_seconds(&pid.to_string()), Instant::now());
        let submitted_ms = now_ms();
        submit_noop(&queue, load, 1_000).await?;
        let watcher = Watcher::open(&config.store_path())?;
        let mut load_rss = rss_mb(pid);
        wait_for(
            Duration::from_secs(600),
            Duration::from_millis(100),
            "the load drained",
            || {
                load_rss = load_rss.max(rss_mb(pid));
                Ok(!watcher.unfinished()?)
            },
        )
        .await?;
        let load_cpu_pct = (cpu_seconds(&pid.to_string()) - cpu_before)
            / load_from.elapsed().as_secs_f64()
            * 100.0;
        let last = watcher.last_finished_ms()?;
        let load_rate = load as f64 / (last.saturating_sub(submitted_ms).max(1) as f64 / 1000.0);
        anyhow::Ok(ScaleRun {
            ready_s,
            idle_rss,
            idle_cpu_pct,
            load_rss,
            load_cpu_pct,
            load_rate,
        })
    }
    .await;
    stop_daemon(&mut daemon);
    outcome
}

/// `tasks` queued before the daemon (its own process, 4 replicas,
/// `prefetch = 64`) starts: seconds to drain them and its peak RSS.
async fn backlog_run(dir: &Path, tasks: usize) -> anyhow::Result<(f64, f64)> {
    let config = noop_fleet(
        dir,
        "noop",
        "replicas = { min = 4 }
prefetch = 64",
    )?;
    submit_noop(&client(&config)?, tasks, 10_000).await?;
    let started_ms = now_ms();
    let mut daemon = spawn_daemon(dir)?;
    let pid = daemon.id();
    let watcher = Watcher::open(&config.store_path())?;
    let mut peak = 0.0_f64;
    let outcome = wait_for(
        Duration::from_secs(600),
        Duration::from_millis(100),
        "the backlog drained",
        || {
            peak = peak.max(rss_mb(pid));
            Ok(!watcher.unfinished()?)
        },
    )
    .await;
    stop_daemon(&mut daemon);
    outcome?;
    Ok((
        watcher.last_finished_ms()?.saturating_sub(started_ms) as f64 / 1000.0,
        peak,
    ))
}

async fn scale_scenario(args: &Args, base: &Path, report: &mut Report) -> anyhow::Result<()> {
    for replicas in numbers(&args.scale_replicas, "--scale-replicas")? {
        let mut runs = Vec::new();
        for run in 0..args.runs {
            let sample = scale_run(
                &base.join(format!("scale-{replicas}-{run}")),
                replicas,
                20_000,
            )
            .await?;
            println!(
                "  scale run {run}: {replicas} replicas up in {:.1} s; idle {:.0} MB, {:.2}% CPU; load {:.0} MB, {:.0}% CPU, {:.0} tasks/s",
                sample.ready_s,
                sample.idle_rss,
                sample.idle_cpu_pct,
                sample.load_rss,
                sample.load_cpu_pct,
                sample.load_rate
            );
            runs.push(sample);
        }
        let stat = |f: fn(&ScaleRun) -> f64| Stat::of(&runs.iter().map(f).collect::<Vec<_>>());
        let point = ScalePoint {
            replicas,
            idle_rss_mb: stat(|r| r.idle_rss),
            load_rss_mb: stat(|r| r.load_rss),
            idle_cpu_pct: stat(|r| r.idle_cpu_pct),
        };
        let n = report::group(f64::from(replicas), 0);
        report.row(
            SCALE,
            Row::goal(
                format!("{n} replicas: daemon RSS, idle"),
                "< 200 MB",
                point.idle_rss_mb.show(0, "MB"),
                point.idle_rss_mb.median < 200.0,
            ),
        );
        report.row(
            SCALE,
            Row::goal(
                format!("{n} replicas: daemon CPU, idle (10 s)"),
                "< 5% of a core",
                point.idle_cpu_pct.show(2, "%"),
                point.idle_cpu_pct.median < 5.0,
            ),
        );
        report.row(
            SCALE,
            Row::goal(
                format!(
                    "{n} replicas: daemon RSS, peak while 20,000 tasks are submitted and drained"
                ),
                "< 200 MB",
                point.load_rss_mb.show(0, "MB"),
                point.load_rss_mb.median < 200.0,
            ),
        );
        report.row(
            SCALE,
            Row::info(
                format!("{n} replicas: daemon CPU and throughput under that load (`prefetch = 0`)"),
                format!(
                    "{} of a core; {}",
                    stat(|r| r.load_cpu_pct).show(0, "%"),
                    stat(|r| r.load_rate).show(0, "tasks/s")
                ),
            ),
        );
        report.row(
            SCALE,
            Row::info(
                format!("{n} replicas: from `flotilla up` to every replica ready"),
                stat(|r| r.ready_s).show(1, "s"),
            ),
        );
        report.scale.push(point);
    }
    let (mut drains, mut peaks) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        let (drain, peak) = backlog_run(&base.join(format!("backlog-{run}")), args.backlog).await?;
        println!(
            "  backlog run {run}: {} tasks drained in {drain:.1} s, peak RSS {peak:.0} MB",
            args.backlog
        );
        drains.push(drain);
        peaks.push(peak);
    }
    let n = report::group(args.backlog as f64, 0);
    report.row(
        SCALE,
        Row::info(
            format!("{n} queued tasks, 4 replicas, `prefetch = 64`: time to drain"),
            Stat::of(&drains).show(1, "s"),
        ),
    );
    report.row(
        SCALE,
        Row::goal(
            format!("{n} queued tasks: daemon peak RSS while draining"),
            "< 200 MB",
            Stat::of(&peaks).show(0, "MB"),
            Stat::of(&peaks).median < 200.0,
        ),
    );
    report.note(
        SCALE,
        "The daemon runs as its own process (`flotilla up`); RSS is its resident memory from \
         /proc (the agents' own memory not counted), CPU its user + system time over the \
         interval. Idle: every replica up and waiting, no task."
            .into(),
    );
    Ok(())
}

/// One run of `benches/celery/bench.py`: tasks/s and the versions used.
fn celery_run(args: &Args, dir: &Path, fsync: &str) -> anyhow::Result<(f64, String)> {
    let script = Path::new("benches/celery/bench.py");
    let output = Command::new(&args.celery_python)
        .arg(script)
        .args([
            "--tasks",
            &args.celery_tasks.to_string(),
            "--workers",
            "4",
            "--fsync",
            fsync,
        ])
        .arg("--dir")
        .arg(dir)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    let result: serde_json::Value = serde_json::from_slice(
        output
            .stdout
            .split(|b| *b == b'\n')
            .rfind(|l| !l.is_empty())
            .unwrap_or_default(),
    )
    .context("the Celery harness's last line is its JSON result")?;
    Ok((
        result["rate"].as_f64().context("rate")?,
        result["versions"].as_str().unwrap_or_default().to_string(),
    ))
}

async fn celery_scenario(args: &Args, base: &Path, report: &mut Report) -> anyhow::Result<()> {
    if !args.celery_python.exists() {
        bail!(
            "{} not found: run scripts/install-celery.sh (or give --celery-python)",
            args.celery_python.display()
        );
    }
    let (mut always, mut everysec, mut ours, mut default) = (vec![], vec![], vec![], vec![]);
    let mut versions = String::new();
    for run in 0..args.runs {
        let (rate, used) = celery_run(args, &base.join(format!("celery-{run}")), "always")?;
        let (relaxed, _) = celery_run(
            args,
            &base.join(format!("celery-relaxed-{run}")),
            "everysec",
        )?;
        versions = used;
        let flotilla = throughput_run(
            &base.join(format!("celery-flotilla-{run}")),
            4,
            64,
            args.celery_tasks,
        )
        .await?
        .rate;
        let flotilla_default = throughput_run(
            &base.join(format!("celery-default-{run}")),
            4,
            0,
            args.celery_tasks,
        )
        .await?
        .rate;
        println!(
            "  celery run {run}: celery {rate:.0} tasks/s (fsync always), {relaxed:.0} (everysec); flotilla {flotilla:.0} (prefetch 64), {flotilla_default:.0} (prefetch 0)"
        );
        always.push(rate);
        everysec.push(relaxed);
        ours.push(flotilla);
        default.push(flotilla_default);
    }
    let n = report::group(args.celery_tasks as f64, 0);
    let rows = [
        (
            format!("Celery + Redis (`appendfsync always`), 4 prefork workers, `acks_late`, {n} no-op tasks pre-loaded"),
            Stat::of(&always),
        ),
        (
            "the same with `appendfsync everysec` (Redis' usual setting: a crash may lose the last second of acks)".to_string(),
            Stat::of(&everysec),
        ),
        (
            format!("flotilla embedded (fsync'd), 4 no-op replicas, `prefetch = 64`, {n} tasks pre-loaded"),
            Stat::of(&ours),
        ),
        (
            format!("flotilla embedded (fsync'd), 4 no-op replicas, `prefetch = 0`, {n} tasks pre-loaded"),
            Stat::of(&default),
        ),
    ];
    for (figure, stat) in &rows {
        report.row(CELERY, Row::info(figure.clone(), stat.show(0, "tasks/s")));
    }
    report.note(CELERY, format!(
        "{versions}. Celery with `task_acks_late = True`, `worker_prefetch_multiplier = 4` (its \
         default), results ignored; Redis with its append-only file. The queue is pre-loaded; \
         Celery's clock runs from its worker taking the first task (its start, about a second \
         of Python imports and forks, not counted) to the last task acknowledged, flotilla's \
         from the daemon's start (its replicas' start counted) to the last completion. \
         `benches/celery/bench.py` is the Celery side."
    ));
    report.throughput.push(ThroughputPoint {
        series: "Celery + Redis (fsync always)".into(),
        replicas: 4,
        rate: rows[0].1,
    });
    report.throughput.push(ThroughputPoint {
        series: "Celery + Redis (fsync every s)".into(),
        replicas: 4,
        rate: rows[1].1,
    });
    Ok(())
}

/// The `p` quantile of `sorted` (nearest rank).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}
