//! `flotilla demo`: a fleet of example agents with failure rates in a
//! temporary directory, a few hundred tasks, a progress bar, then a
//! resilience report whose "lost" figure is counted task by task.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};

use crate::clock;
use crate::daemon::Daemon;
use crate::queue::{AttemptOutcome, NewTask, Priority, TaskState};

/// Options of the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Tasks to submit.
    #[arg(long, default_value_t = 300)]
    pub tasks: usize,
    /// Seed of the agents' failures (random when absent; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep the temporary directory (config, store) for inspection.
    #[arg(long)]
    pub keep: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 50)]
    pub timeout_secs: u64,
}

fn demo_config(exe: &str, seed: u64) -> String {
    let agent = |crash: f64, hang: f64, error: f64, fatal: f64, bad: f64| {
        format!(
            r#"[{exe:?}, "example-agent", "--work-ms", "30", "--crash-rate", "{crash}", "--hang-rate", "{hang}", "--error-rate", "{error}", "--fatal-rate", "{fatal}", "--bad-output-rate", "{bad}", "--seed", "{seed}"]"#
        )
    };
    format!(
        r#"# The demo fleet: two agents that fail on purpose.
[store]
path = "demo.db"

[daemon]
shutdown_grace = "5s"

[http]
listen = "127.0.0.1:0"

# The coder fails about a fifth of its attempts on purpose: the fleet
# watchdog opens a breaker only above half.
[watchdog]
error_rate = 0.5

[agents.coder]
command = {coder}
replicas = {{ min = 4 }}
timeouts = {{ progress_timeout = "1s", max_duration = "10s", startup = "10s", stop_grace = "1s" }}
retry = {{ max_deliver = 4, backoff = ["50ms", "200ms", "500ms"] }}
restart = {{ initial_backoff = "20ms", max_backoff = "500ms", max_restarts = 1000, window = "60s" }}

[agents.reviewer]
command = {reviewer}
replicas = {{ min = 2 }}
timeouts = {{ progress_timeout = "1s", max_duration = "10s", startup = "10s", stop_grace = "1s" }}
retry = {{ max_deliver = 4, backoff = {{ initial = "50ms", max = "1s", multiplier = 2.0, jitter = 0.2 }} }}
restart = {{ initial_backoff = "20ms", max_backoff = "500ms", max_restarts = 1000, window = "60s" }}
"#,
        coder = agent(0.08, 0.02, 0.10, 0.02, 0.03),
        reviewer = agent(0.05, 0.01, 0.05, 0.01, 0.02),
    )
}

/// Runs the demo and prints the report. Exit 0 only when no task was lost
/// or completed twice and all finished.
///
/// # Errors
/// When the temporary fleet cannot be set up.
pub async fn run(options: &Options) -> anyhow::Result<ExitCode> {
    let seed = options.seed.unwrap_or_else(|| {
        rand::RngCore::next_u64(&mut <rand::rngs::SmallRng as rand::SeedableRng>::from_os_rng())
    });
    let dir = std::env::temp_dir().join(format!("flotilla-demo-{}-{seed}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = run_in(&dir, seed, options).await;
    if options.keep {
        eprintln!("kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn run_in(dir: &Path, seed: u64, options: &Options) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the flotilla executable")?;
    let config_path = dir.join("flotilla.toml");
    std::fs::write(&config_path, demo_config(&exe.display().to_string(), seed))?;
    let config = crate::config::load(&config_path)?;
    eprintln!(
        "demo: {} tasks for 2 agents (6 replicas) that crash, hang, fail and babble on purpose; seed {seed}",
        options.tasks
    );
    let daemon = Daemon::start(config, clock::system()).await?;
    let queue = daemon.queue().clone();
    let ids: Vec<String> = (0..options.tasks).map(|n| format!("demo-{n:05}")).collect();
    let tasks = ids
        .iter()
        .enumerate()
        .map(|(n, id)| NewTask {
            id: id.clone(),
            agent: if n % 3 == 2 {
                "reviewer".into()
            } else {
                "coder".into()
            },
            priority: if n % 10 == 0 {
                Priority::High
            } else {
                Priority::Normal
            },
            payload: serde_json::json!({"n": n, "prompt": format!("task number {n}")}),
        })
        .collect();
    queue.submit(tasks).await?;

    let bar = ProgressBar::new(options.tasks as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} finished  {msg}")
            .expect("template is valid"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(options.timeout_secs);
    loop {
        let counts = queue.counts().await?;
        let (mut finished, mut dead) = (0, 0);
        for (_, counts) in &counts {
            finished += counts.completed + counts.dead_lettered;
            dead += counts.dead_lettered;
        }
        let restarts: u64 = daemon
            .agents()
            .iter()
            .map(|agent| agent.status().restarts)
            .sum();
        bar.set_position(finished);
        bar.set_message(format!("{dead} dead-lettered, {restarts} restarts"));
        if finished as usize >= options.tasks || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish();
    let statuses: Vec<_> = daemon.agents().iter().map(|agent| agent.status()).collect();
    daemon.stop().await;

    // Count, task by task.
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    let (mut lost, mut twice, mut retried, mut attempts) = (0, 0, 0, 0);
    for id in &ids {
        let Some(task) = queue.get(id).await? else {
            lost += 1;
            continue;
        };
        *states.entry(task.state.as_str()).or_default() += 1;
        if task.state == TaskState::DeadLettered {
            let reason = task.reason.unwrap_or_default();
            let category = reason
                .split([';', ':'])
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            *reasons.entry(category).or_default() += 1;
        }
        let completions = task
            .history
            .iter()
            .filter(|attempt| attempt.outcome == Some(AttemptOutcome::Completed))
            .count();
        if completions > 1 {
            twice += 1;
        }
        if task.history.len() > 1 {
            retried += 1;
        }
        attempts += task.history.len();
        for attempt in &task.history {
            *outcomes
                .entry(attempt.outcome.map_or("unfinished", AttemptOutcome::as_str))
                .or_default() += 1;
        }
    }
    let count = |state: TaskState| states.get(state.as_str()).copied().unwrap_or(0);
    let restarts: u64 = statuses.iter().map(|status| status.restarts).sum();
    let malformed: u64 = statuses.iter().map(|status| status.malformed_lines).sum();
    let unfinished = count(TaskState::Queued) + count(TaskState::Running);
    println!();
    println!("resilience report (seed {seed})");
    println!("  submitted        {:>6}", ids.len());
    println!("  completed        {:>6}", count(TaskState::Completed));
    println!("  dead-lettered    {:>6}", count(TaskState::DeadLettered));
    for (reason, n) in &reasons {
        println!("    {n:>4}  {reason}");
    }
    println!("  still queued     {unfinished:>6}");
    println!("  retried          {retried:>6}  tasks that needed more than one attempt");
    println!("  attempts         {attempts:>6}");
    for (outcome, n) in &outcomes {
        println!("    {n:>4}  {outcome}");
    }
    println!("  restarts         {restarts:>6}  replica processes restarted");
    println!("  malformed lines  {malformed:>6}  counted and ignored");
    println!("  completed twice  {twice:>6}");
    println!("  lost: {lost}");
    if lost == 0 && twice == 0 && unfinished == 0 {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("demo: FAILED: {lost} lost, {twice} completed twice, {unfinished} unfinished");
        Ok(ExitCode::from(1))
    }
}
