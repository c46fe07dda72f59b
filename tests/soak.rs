//! The chaos soak: 5,000 tasks, some of them delegating to another agent,
//! while agents crash, hang and err on their own, replicas are killed and
//! paused at random, and the daemon is killed with `kill -9` twice and
//! restarted; on JetStream also nats-server is killed and restarted and
//! the daemon's broker connection is cut for 20 s through the fault
//! proxy. At the end every task is terminal, none is lost, none was
//! completed twice.
//!
//! Seeded: the seed is printed, and `FLOTILLA_SOAK_SEED=N cargo test
//! --test soak` replays the same faults (agents' fates and the chaos
//! schedule; the timing of the machine still varies).

mod support;

use std::collections::HashMap;
use std::process::Child;
use std::time::{Duration, Instant};

use flotilla::queue::{ListFilter, TaskState};
use nix::sys::signal::Signal;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::Value;
use support::nats::NatsServer;
use support::*;

const TASKS: usize = 5_000;
const MANAGED: usize = 300;

/// The running replicas' process ids, from `flotilla status --json`.
fn replica_pids(fleet: &Fleet) -> Vec<u32> {
    let output = fleet.cli(&["status", "--json"]);
    let Ok(status) = serde_json::from_slice::<Value>(&output.stdout) else {
        return Vec::new();
    };
    status["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|agent| agent["replicas"].as_array().cloned().unwrap_or_default())
        .filter_map(|replica| replica["pid"].as_u64())
        .filter_map(|pid| u32::try_from(pid).ok())
        .collect()
}

fn signal_group(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
    }
}

#[test]
fn five_thousand_tasks_through_chaos_none_lost_none_twice() {
    soak(None);
}

#[test]
fn five_thousand_tasks_through_chaos_on_jetstream() {
    let Some(mut server) = NatsServer::start("five_thousand_tasks_through_chaos_on_jetstream")
    else {
        return;
    };
    soak(Some(&mut server));
}

/// Writes `line` to the test process's stderr past libtest's capture, so
/// the seed and the counts show in CI's log even when the soak passes.
fn shout(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn soak(mut broker: Option<&mut NatsServer>) {
    let seed: u64 = std::env::var("FLOTILLA_SOAK_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            use rand::RngCore as _;
            SmallRng::from_os_rng().next_u64()
        });
    shout(&format!(
        "chaos soak seed: {seed} (replay with FLOTILLA_SOAK_SEED={seed})"
    ));
    let mut rng = SmallRng::seed_from_u64(seed);
    let manager = repo_root().join("examples/agents/manager.py");
    let broker_section = broker.as_ref().map_or_else(String::new, |server| {
        format!(
            "[broker]\nurl = \"{}\"\nack_wait = \"2s\"\nping_interval = \"1s\"\nreconnect_max_delay = \"200ms\"\n\n[chaos]\nenabled = true\nproxy = true\n",
            server.url
        )
    });
    let fleet = Fleet::new(&format!(
        r#"{broker_section}
[agents.worker]
command = {worker}
replicas = {{ min = 4 }}
prefetch = 16
timeouts = {{ progress_timeout = "1s", max_duration = "20s", stop_grace = "1s" }}
retry = {{ max_deliver = 20, backoff = ["5ms", "20ms", "50ms"] }}
restart = {{ initial_backoff = "5ms", max_backoff = "50ms", max_restarts = 100000, window = "60s" }}
breaker = {{ recovery_timeout = "100ms" }}
watchdog = {{ error_rate = 1.0 }}

[agents.manager]
command = ["python3", {manager:?}]
replicas = {{ min = 2 }}
timeouts = {{ progress_timeout = "5s", max_duration = "60s", stop_grace = "1s" }}
retry = {{ max_deliver = 20, backoff = ["5ms", "20ms"] }}
restart = {{ initial_backoff = "5ms", max_backoff = "50ms", max_restarts = 100000, window = "60s" }}
breaker = {{ enabled = false }}
"#,
        worker = example_agent(&[
            "--work-ms",
            "2",
            "--crash-rate",
            "0.03",
            "--hang-rate",
            "0.005",
            "--error-rate",
            "0.03",
            "--seed",
            &seed.to_string(),
        ]),
        manager = manager.display().to_string(),
    ));
    if broker.is_some() {
        fleet.set_token("soak-token-1f2e3d");
    }
    let started = Instant::now();
    let mut daemon = fleet.spawn_daemon();
    let mut ids = fleet.submit_numbered("worker", TASKS - MANAGED, "soak");
    // Managers each delegate one piece of work to the worker agent and
    // wait for it.
    let lines: Vec<String> = (0..MANAGED)
        .map(|n| {
            serde_json::json!({"id": format!("lead-{n:05}"), "payload": {"ask": {"worker": {"n": n}}}})
                .to_string()
        })
        .collect();
    let file = fleet.path("leads.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let submitted = fleet.cli(&[
        "submit",
        "--agent",
        "manager",
        "--file",
        file.to_str().unwrap(),
    ]);
    assert!(submitted.status.success(), "{submitted:?}");
    ids.extend((0..MANAGED).map(|n| format!("lead-{n:05}")));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let store = runtime
        .block_on(flotilla::store::Store::open(
            &fleet.config(),
            flotilla::queue::sqlite::Role::Client,
            flotilla::clock::system(),
            "soak",
        ))
        .unwrap();
    let queue = store.queue();
    let unfinished = |queue: &std::sync::Arc<dyn flotilla::queue::TaskQueue>| {
        runtime.block_on(async {
            let Ok(counts) = queue.counts().await else {
                return u64::MAX;
            };
            counts
                .iter()
                .map(|(_, counts)| counts.queued + counts.running)
                .sum::<u64>()
        })
    };
    let total = (TASKS + MANAGED) as u64;
    let mut daemon_kills = 0;
    let mut broker_faults = 0;
    let mut actions: HashMap<&str, u32> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        std::thread::sleep(Duration::from_millis(rng.random_range(200..800)));
        let left = unfinished(&queue);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} tasks still unfinished after 5 minutes (seed {seed})"
        );
        // The faults go by progress, not time, so that each meets work
        // however fast the machine: unfinished tasks, children included,
        // of TASKS + MANAGED (the leads are among the TASKS; unknown while
        // the broker is down).
        let done = if left == u64::MAX {
            0
        } else {
            total.saturating_sub(left)
        };
        // Two kill -9s of the daemon, early in the run (10 %, 20 %).
        if daemon_kills < 2 && done >= total * (1 + daemon_kills) / 10 {
            signal(&daemon, Signal::SIGKILL);
            wait_exit(&mut daemon, Duration::from_secs(10));
            daemon_kills += 1;
            eprintln!("soak: kill -9 of the daemon #{daemon_kills}, {left} tasks unfinished");
            std::thread::sleep(Duration::from_millis(200));
            daemon = fleet.spawn_daemon();
            continue;
        }
        // On a broker: nats-server killed and restarted, then a 20 s
        // partition of the daemon's connection, after the daemon kills
        // (40 %, 50 %).
        if let Some(server) = broker.as_deref_mut()
            && daemon_kills == 2
            && broker_faults < 2
            && done >= total * (4 + broker_faults) / 10
        {
            if broker_faults == 0 {
                server.kill();
                eprintln!("soak: nats-server killed");
                std::thread::sleep(Duration::from_millis(rng.random_range(500..3000)));
                server.restart();
                eprintln!("soak: nats-server restarted");
            } else {
                let cut = fleet.cli(&["chaos", "partition", "--for", "20s"]);
                assert!(cut.status.success(), "{cut:?}");
                eprintln!("soak: broker connection cut for 20s");
            }
            broker_faults += 1;
            continue;
        }
        let pids = replica_pids(&fleet);
        if pids.is_empty() {
            continue;
        }
        let pid = pids[rng.random_range(0..pids.len())];
        if rng.random_bool(0.7) {
            signal_group(pid, Signal::SIGKILL);
            *actions.entry("replica killed").or_default() += 1;
        } else {
            signal_group(pid, Signal::SIGSTOP);
            std::thread::sleep(Duration::from_millis(rng.random_range(100..1500)));
            signal_group(pid, Signal::SIGCONT);
            *actions.entry("replica paused").or_default() += 1;
        }
    }
    signal(&daemon, Signal::SIGTERM);
    wait_exit(&mut daemon, Duration::from_secs(30));
    let _: &mut Child = &mut daemon;

    // Every task, children included, is terminal; none was lost or
    // completed twice.
    let tasks = runtime.block_on(records(queue.as_ref(), &ids));
    assert_eq!(tasks.len(), TASKS, "a task went missing (seed {seed})");
    let mut states: HashMap<TaskState, usize> = HashMap::new();
    for task in &tasks {
        assert!(
            task.state.is_terminal(),
            "{} is {} (seed {seed})",
            task.id,
            task.state
        );
        assert!(
            completions(task) <= 1,
            "{} completed twice (seed {seed})",
            task.id
        );
        *states.entry(task.state).or_default() += 1;
    }
    let children = runtime
        .block_on(queue.list(&ListFilter {
            state: None,
            agent: Some("worker".into()),
            limit: 100_000,
        }))
        .unwrap()
        .into_iter()
        .filter(|task| task.id.starts_with("lead-"))
        .collect::<Vec<_>>();
    let child_ids: Vec<String> = children.iter().map(|task| task.id.clone()).collect();
    let children = runtime.block_on(records(queue.as_ref(), &child_ids));
    assert_eq!(children.len(), MANAGED, "one child per lead (seed {seed})");
    for child in &children {
        assert!(child.state.is_terminal(), "{} is {}", child.id, child.state);
        assert!(
            completions(child) <= 1,
            "{} completed twice (seed {seed})",
            child.id
        );
    }
    let completed = states.get(&TaskState::Completed).copied().unwrap_or(0);
    shout(&format!(
        "soak (seed {seed}): {TASKS} tasks + {MANAGED} children in {:.0?}: {completed} completed, {} dead-lettered; daemon killed {daemon_kills} times, {broker_faults} broker faults; {actions:?}",
        started.elapsed(),
        states.get(&TaskState::DeadLettered).copied().unwrap_or(0)
    ));
    assert_eq!(daemon_kills, 2);
    if broker.is_some() {
        assert_eq!(broker_faults, 2, "the broker faults happened (seed {seed})");
    }
    assert!(
        completed > TASKS * 9 / 10,
        "most tasks complete (seed {seed})"
    );
}
