//! Circuit breakers, fallback policies and degradation levels with real
//! agent processes on the embedded queue: a failing agent's breaker opens,
//! its tasks go to the fallback, probes test it, and it takes its tasks
//! back once it recovers; every fallback policy end to end; a degradation
//! level holds back less urgent tasks until it drops.

mod support;

use std::time::Duration;

use flotilla::breaker::BreakerState;
use flotilla::degrade::Level;
use flotilla::queue::{AttemptOutcome, ListFilter, NewTask, Priority, TaskQueue, TaskState};
use serde_json::{Value, json};
use support::*;

/// A oneshot agent that fails (exit 3) while the file `NAME.broken`
/// exists in the fleet's directory, and otherwise answers `{"by": NAME}`.
fn switchable(name: &str) -> String {
    toml_array(&[
        "sh".into(),
        "-c".into(),
        format!(
            "if [ -e {name}.broken ]; then echo {name} is broken >&2; exit 3; fi; echo '{{{{\"by\": \"{name}\"}}}}'"
        ),
    ])
}

fn set_broken(fleet: &Fleet, name: &str, broken: bool) {
    let path = fleet.path(&format!("{name}.broken"));
    if broken {
        std::fs::write(path, "").unwrap();
    } else {
        std::fs::remove_file(path).unwrap();
    }
}

async fn state_of(queue: &dyn TaskQueue, id: &str) -> TaskState {
    queue.get(id).await.unwrap().expect("task exists").state
}

async fn all_in(queue: &dyn TaskQueue, ids: &[String], state: TaskState) -> bool {
    for id in ids {
        if state_of(queue, id).await != state {
            return false;
        }
    }
    true
}

/// Waits until every task of `ids` is in `state`.
async fn wait_all(
    queue: &dyn TaskQueue,
    ids: &[String],
    state: TaskState,
    limit: Duration,
    what: &str,
) {
    wait_until(limit, what, || all_in(queue, ids, state)).await;
}

/// Attempts run by `agent`'s replicas that ended with `outcome`.
async fn attempts_by(
    queue: &dyn TaskQueue,
    ids: &[String],
    agent: &str,
    outcome: AttemptOutcome,
) -> usize {
    let prefix = format!("{agent}/");
    records(queue, ids)
        .await
        .iter()
        .flat_map(|task| task.history.clone())
        .filter(|attempt| {
            attempt.outcome == Some(outcome)
                && attempt
                    .replica
                    .as_deref()
                    .is_some_and(|replica| replica.starts_with(&prefix))
        })
        .count()
}

/// Submits one task to `agent` every 50 ms (as a steady flow of work
/// would) until `done`, collecting their ids.
async fn feed_until(
    queue: &dyn TaskQueue,
    agent: &str,
    ids: &mut Vec<String>,
    mut done: impl FnMut() -> bool,
) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "timed out feeding {agent}"
        );
        let (task, new) = numbered_tasks(agent, 1, &format!("fed{}", ids.len()));
        queue.submit(task).await.unwrap();
        ids.extend(new);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_agent_sends_its_tasks_to_its_fallback_until_a_probe_succeeds() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.specialist]
command = {}
mode = "oneshot"
fallback = ["manager"]
retry = {{ max_deliver = 20, backoff = ["10ms"] }}
breaker = {{ failure_threshold = 3, recovery_timeout = "700ms" }}

[agents.manager]
command = {}
mode = "oneshot"
"#,
        switchable("specialist"),
        switchable("manager"),
    ));
    set_broken(&fleet, "specialist", true);
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();

    // Three tasks fail on the specialist and open its breaker; they and
    // the tasks after them are handed to the manager.
    let (first, first_ids) = numbered_tasks("specialist", 3, "first");
    queue.submit(first).await.unwrap();
    wait_until(Duration::from_secs(20), "the breaker to open", || async {
        agent(&daemon, "specialist").status().breaker.times_opened >= 1
    })
    .await;
    let (more, more_ids) = numbered_tasks("specialist", 10, "more");
    queue.submit(more).await.unwrap();
    let all: Vec<String> = first_ids.iter().chain(&more_ids).cloned().collect();
    wait_all(
        queue.as_ref(),
        &all,
        TaskState::Completed,
        Duration::from_secs(20),
        "the manager to do them",
    )
    .await;
    for task in records(queue.as_ref(), &all).await {
        assert_eq!(task.result, Some(json!({"by": "manager"})), "{task:?}");
        assert_eq!(task.agent, "manager");
        let rerouted = task
            .history
            .iter()
            .find(|a| a.outcome == Some(AttemptOutcome::Rerouted))
            .expect("a rerouted attempt");
        assert!(
            rerouted.detail.as_deref().unwrap().contains(
                "circuit breaker of agent specialist is open; handed to fallback agent manager"
            ),
            "{rerouted:?}"
        );
    }
    // A hand-over is no redelivery: only the tasks that ran on the
    // specialist before count as redelivered to the manager.
    let ran_before = records(queue.as_ref(), &all)
        .await
        .iter()
        .filter(|task| {
            task.history
                .iter()
                .any(|attempt| attempt.outcome == Some(AttemptOutcome::Error))
        })
        .count();
    assert!(ran_before >= 1 && ran_before < all.len(), "{ran_before}");
    let metrics = metrics_of(&daemon).await;
    assert!(
        metrics.contains(&format!(
            "flotilla_redeliveries_total{{agent=\"manager\"}} {ran_before}\n"
        )),
        "{metrics}"
    );
    // While it stays broken, each recovery timeout lets exactly one probe
    // through, which fails and opens the breaker again; the tasks that
    // keep coming meanwhile go to the manager.
    let mut probe_ids = Vec::new();
    feed_until(queue.as_ref(), "specialist", &mut probe_ids, || {
        agent(&daemon, "specialist").status().breaker.times_opened >= 3
    })
    .await;
    let status = agent(&daemon, "specialist").status();
    assert!(status.diverted.rerouted >= 13, "{:?}", status.diverted);
    let transition = status.breaker.last_transition.expect("transitions");
    assert_eq!(transition.to, BreakerState::Open, "{transition:?}");

    // Repaired: the next probe succeeds, the breaker closes, and the
    // specialist does its own tasks again.
    set_broken(&fleet, "specialist", false);
    feed_until(queue.as_ref(), "specialist", &mut probe_ids, || {
        agent(&daemon, "specialist").status().breaker.state == Some(BreakerState::Closed)
    })
    .await;
    let (after, after_ids) = numbered_tasks("specialist", 5, "after");
    queue.submit(after).await.unwrap();
    wait_all(
        queue.as_ref(),
        &after_ids,
        TaskState::Completed,
        Duration::from_secs(20),
        "the specialist's tasks",
    )
    .await;
    for task in records(queue.as_ref(), &after_ids).await {
        assert_eq!(task.result, Some(json!({"by": "specialist"})), "{task:?}");
    }
    let opened = agent(&daemon, "specialist").status().breaker.times_opened;
    wait_all(
        queue.as_ref(),
        &probe_ids,
        TaskState::Completed,
        Duration::from_secs(20),
        "the fed tasks to finish",
    )
    .await;
    daemon.stop().await;
    // Three failures opened it; every later opening was one failed probe.
    let everything: Vec<String> = all.iter().chain(&probe_ids).cloned().collect();
    let failed = attempts_by(
        queue.as_ref(),
        &everything,
        "specialist",
        AttemptOutcome::Error,
    )
    .await;
    assert_eq!(failed as u64, 3 + (opened - 1), "{opened} openings");
}

/// The system clock set back while a breaker is open: the breaker still
/// lets a probe through once its recovery timeout has passed, not once
/// the wall clock has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_set_back_keeps_no_breaker_open() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.flaky]
command = {}
mode = "oneshot"
retry = {{ max_deliver = 1 }}
breaker = {{ failure_threshold = 1, recovery_timeout = "5s" }}
"#,
        switchable("flaky"),
    ));
    set_broken(&fleet, "flaky", true);
    let clock = std::sync::Arc::new(SettableClock::default());
    let daemon = fleet.start_with_clock(clock.clone()).await;
    let queue = daemon.queue().clone();
    queue
        .submit(numbered_tasks("flaky", 1, "first").0)
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "the breaker to open", || async {
        agent(&daemon, "flaky").status().breaker.times_opened >= 1
    })
    .await;
    // Still open when the clock is set (else the test proves nothing).
    assert_eq!(
        agent(&daemon, "flaky").status().breaker.state,
        Some(BreakerState::Open)
    );
    clock.set_wall(-2 * 3_600_000);
    set_broken(&fleet, "flaky", false);
    let (tasks, ids) = numbered_tasks("flaky", 1, "probe");
    queue.submit(tasks).await.unwrap();
    wait_all(
        queue.as_ref(),
        &ids,
        TaskState::Completed,
        Duration::from_secs(20),
        "the probe to complete",
    )
    .await;
    // The breaker hears of the probe's success just after it is stored.
    wait_until(Duration::from_secs(10), "the breaker to close", || async {
        agent(&daemon, "flaky").status().breaker.state == Some(BreakerState::Closed)
    })
    .await;
    daemon.stop().await;
}

/// A result whose gate runs past the time after which an attempt that
/// never reported back is forgotten (max_duration, twice stop_grace and a
/// minute: 63 s here, passed by moving the steady clock on) still tells
/// the breaker how it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_gate_still_reports_to_the_breaker() {
    let fleet = Fleet::new(
        r#"
[agents.coder]
command = ["sh", "-c", "echo '{{\"done\": true}}'"]
mode = "oneshot"
replicas = { min = 2 }
retry = { max_deliver = 1 }
timeouts = { max_duration = "1s", stop_grace = "1s" }
breaker = { failure_threshold = 1, recovery_timeout = "1h", failures = ["validation"] }

[agents.coder.validation]
checks = [{ name = "slow", command = ["sh", "-c", "touch gate.started; sleep 4; exit 1"] }]
"#,
    );
    let clock = std::sync::Arc::new(SettableClock::default());
    let daemon = fleet.start_with_clock(clock.clone()).await;
    let queue = daemon.queue().clone();
    let (tasks, ids) = numbered_tasks("coder", 1, "slow");
    queue.submit(tasks).await.unwrap();
    let started = fleet.path("gate.started");
    wait_until(Duration::from_secs(20), "the gate to start", || async {
        started.exists()
    })
    .await;
    clock.pass_steady(120_000);
    wait_all(
        queue.as_ref(),
        &ids,
        TaskState::DeadLettered,
        Duration::from_secs(20),
        "the task to fail its gate",
    )
    .await;
    wait_until(Duration::from_secs(10), "the breaker to open", || async {
        agent(&daemon, "coder").status().breaker.times_opened >= 1
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_for_retry_keeps_tasks_queued_without_using_attempts() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.flaky]
command = {}
mode = "oneshot"
replicas = {{ min = 2 }}
retry = {{ max_deliver = 4, backoff = ["10ms"] }}
breaker = {{ failure_threshold = 2, recovery_timeout = "3s" }}
"#,
        switchable("flaky"),
    ));
    set_broken(&fleet, "flaky", true);
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (tasks, ids) = numbered_tasks("flaky", 6, "held");
    queue.submit(tasks).await.unwrap();
    wait_until(Duration::from_secs(20), "the breaker to open", || async {
        agent(&daemon, "flaky").status().breaker.times_opened >= 1
    })
    .await;
    // Without the breaker, six tasks at 10 ms per retry would have used
    // all 24 attempts and been dead-lettered by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = records(queue.as_ref(), &ids).await;
    let charged: u32 = held.iter().map(|task| task.charged_attempts).sum();
    assert!(
        held.iter().all(|task| !task.state.is_terminal()),
        "{held:#?}"
    );
    assert!(
        charged <= 4,
        "two failures and at most two probes: {charged}"
    );
    set_broken(&fleet, "flaky", false);
    wait_all(
        queue.as_ref(),
        &ids,
        TaskState::Completed,
        Duration::from_secs(20),
        "all to complete",
    )
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proceed_with_warning_completes_tasks_without_running_them() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.linter]
command = {}
mode = "oneshot"
retry = {{ max_deliver = 5, backoff = ["10ms"] }}
breaker = {{ failure_threshold = 1, recovery_timeout = "1h" }}
fallback_policy = "proceed_with_warning"
"#,
        switchable("linter"),
    ));
    set_broken(&fleet, "linter", true);
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (tasks, ids) = numbered_tasks("linter", 4, "gate");
    queue.submit(tasks).await.unwrap();
    wait_all(
        queue.as_ref(),
        &ids,
        TaskState::Completed,
        Duration::from_secs(20),
        "all to complete",
    )
    .await;
    // The counter is raised just after the completion is stored, so the
    // last task can be seen completed a moment before it is counted.
    wait_until(Duration::from_secs(5), "four tasks counted", || async {
        agent(&daemon, "linter")
            .status()
            .diverted
            .proceeded_with_warning
            >= 4
    })
    .await;
    let status = agent(&daemon, "linter").status();
    daemon.stop().await;
    for task in records(queue.as_ref(), &ids).await {
        let result = task.result.clone().unwrap();
        assert_eq!(result["proceeded_with_warning"], true, "{task:?}");
        assert_eq!(result["agent"], "linter");
        assert_eq!(
            task.history.last().unwrap().outcome,
            Some(AttemptOutcome::ProceededWithWarning)
        );
    }
    assert_eq!(status.diverted.proceeded_with_warning, 4);
    assert_eq!(status.breaker.state, Some(BreakerState::Open));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalated_tasks_wait_for_a_human_who_retries_completes_or_drops_them() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.deployer]
command = {}
mode = "oneshot"
retry = {{ max_deliver = 5, backoff = ["10ms"] }}
breaker = {{ failure_threshold = 1, recovery_timeout = "1s" }}
fallback_policy = "escalate_to_human"
"#,
        switchable("deployer"),
    ));
    set_broken(&fleet, "deployer", true);
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (tasks, ids) = numbered_tasks("deployer", 3, "deploy");
    queue.submit(tasks).await.unwrap();
    wait_all(
        queue.as_ref(),
        &ids,
        TaskState::Escalated,
        Duration::from_secs(20),
        "all to be escalated",
    )
    .await;
    // Counted just after the escalation is stored (see above).
    wait_until(
        Duration::from_secs(5),
        "three escalations counted",
        || async { agent(&daemon, "deployer").status().diverted.escalated >= 3 },
    )
    .await;
    assert_eq!(agent(&daemon, "deployer").status().diverted.escalated, 3);
    let metrics = metrics_of(&daemon).await;
    assert!(
        metrics.contains("flotilla_escalations_total{agent=\"deployer\"} 3\n"),
        "{metrics}"
    );

    let listed = fleet.cli(&["escalations", "list", "--json"]);
    assert!(listed.status.success(), "{listed:?}");
    let listed: Vec<Value> = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    let shown = fleet.cli(&["escalations", "show", &ids[0]]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("escalated") && shown.contains("escalate_to_human"),
        "{shown}"
    );

    // A task that is not escalated cannot be resolved.
    queue
        .submit(numbered_tasks("nobody", 1, "other").0)
        .await
        .unwrap();
    let refused = fleet.cli(&["escalations", "resolve", "other-00000", "--retry"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("is queued; only a task that is escalated can be resolved"),
        "{refused:?}"
    );
    let ambiguous = fleet.cli(&["escalations", "resolve", &ids[0], "--retry", "--drop"]);
    assert!(!ambiguous.status.success());

    // Repaired; once the breaker lets a probe through, the retried task
    // is that probe (retried while it is open, it would be escalated
    // again).
    set_broken(&fleet, "deployer", false);
    wait_until(
        Duration::from_secs(20),
        "the breaker to half-open",
        || async {
            agent(&daemon, "deployer").status().breaker.state == Some(BreakerState::HalfOpen)
        },
    )
    .await;
    let resolved = fleet.cli(&["escalations", "resolve", &ids[0], "--retry"]);
    assert!(resolved.status.success(), "{resolved:?}");
    let resolved = fleet.cli(&[
        "escalations",
        "resolve",
        &ids[1],
        "--complete",
        r#"{"deployed_by": "a human"}"#,
    ]);
    assert!(resolved.status.success(), "{resolved:?}");
    let resolved = fleet.cli(&["escalations", "resolve", &ids[2], "--drop"]);
    assert!(resolved.status.success(), "{resolved:?}");

    wait_until(
        Duration::from_secs(20),
        "the retried task to complete",
        || {
            let queue = queue.clone();
            let id = ids[0].clone();
            async move { state_of(queue.as_ref(), &id).await == TaskState::Completed }
        },
    )
    .await;
    daemon.stop().await;
    let tasks = records(queue.as_ref(), &ids).await;
    assert_eq!(tasks[0].result, Some(json!({"by": "deployer"})));
    assert_eq!(
        (tasks[1].state, tasks[1].result.clone()),
        (
            TaskState::Completed,
            Some(json!({"deployed_by": "a human"}))
        )
    );
    assert_eq!(tasks[2].state, TaskState::DeadLettered);
    assert!(
        tasks[2]
            .reason
            .as_deref()
            .unwrap()
            .starts_with("dropped by a human after escalation"),
        "{:?}",
        tasks[2].reason
    );
    let left = queue
        .list(&ListFilter {
            state: Some(TaskState::Escalated),
            agent: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}

fn task(agent: &str, id: &str, priority: Priority) -> NewTask {
    NewTask {
        id: id.into(),
        agent: agent.into(),
        priority,
        payload: json!({}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn level_2_holds_back_normal_tasks_until_the_level_drops() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.worker]
command = {}
mode = "oneshot"

[agents.flaky]
command = {}
mode = "oneshot"
retry = {{ max_deliver = 20, backoff = ["10ms"] }}
breaker = {{ failure_threshold = 1, recovery_timeout = "500ms" }}

[degradation]
check_interval = "100ms"
min_dwell = "1s"
essential = {{ triggers = [{{ when = "breaker_open", agent = "flaky" }}] }}
"#,
        switchable("worker"),
        switchable("flaky"),
    ));
    set_broken(&fleet, "flaky", true);
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let level = || agent(&daemon, "worker").availability().level();
    // flaky fails, its breaker opens, and the fleet goes to level 2.
    queue
        .submit(vec![task("flaky", "flaky-1", Priority::Normal)])
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "level 2", || async {
        level() == Level::Essential
    })
    .await;
    wait_until(
        Duration::from_secs(20),
        "status to show level 2",
        || async {
            let status = fleet.cli(&["status"]);
            let status = String::from_utf8_lossy(&status.stdout);
            status.contains("DEGRADED: level 2 (essential)")
                && status.contains("the circuit breaker of flaky is open")
                && status.contains("only high and critical tasks run")
        },
    )
    .await;
    queue
        .submit(vec![
            task("worker", "normal-1", Priority::Normal),
            task("worker", "low-1", Priority::Low),
            task("worker", "high-1", Priority::High),
            task("worker", "critical-1", Priority::Critical),
        ])
        .await
        .unwrap();
    let urgent: Vec<String> = vec!["high-1".into(), "critical-1".into()];
    wait_all(
        queue.as_ref(),
        &urgent,
        TaskState::Completed,
        Duration::from_secs(20),
        "urgent tasks to run",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let held: Vec<String> = vec!["normal-1".into(), "low-1".into()];
    assert!(
        all_in(queue.as_ref(), &held, TaskState::Queued).await,
        "held back at level 2"
    );
    // flaky recovers: its task is the probe (a normal one: probes go at
    // any level), the breaker closes, and after min_dwell the level drops
    // and the held tasks run.
    set_broken(&fleet, "flaky", false);
    wait_all(
        queue.as_ref(),
        &held,
        TaskState::Completed,
        Duration::from_secs(20),
        "the held tasks to run",
    )
    .await;
    assert_eq!(level(), Level::Nominal);

    // An operator forces level 3: only critical tasks run until cleared.
    let forced = fleet.cli(&["degrade", "set", "3", "--for", "10m"]);
    assert!(forced.status.success(), "{forced:?}");
    wait_until(Duration::from_secs(20), "level 3", || async {
        level() == Level::Emergency
    })
    .await;
    queue
        .submit(vec![
            task("worker", "high-2", Priority::High),
            task("worker", "critical-2", Priority::Critical),
        ])
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "the critical task", || {
        let queue = queue.clone();
        async move { state_of(queue.as_ref(), "critical-2").await == TaskState::Completed }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(state_of(queue.as_ref(), "high-2").await, TaskState::Queued);
    let bad = fleet.cli(&["degrade", "set", "9", "--for", "1m"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("valid: 0 (nominal)"),
        "{bad:?}"
    );
    let cleared = fleet.cli(&["degrade", "clear"]);
    assert!(cleared.status.success(), "{cleared:?}");
    wait_until(Duration::from_secs(20), "high-2 after the clear", || {
        let queue = queue.clone();
        async move { state_of(queue.as_ref(), "high-2").await == TaskState::Completed }
    })
    .await;
    assert_eq!(level(), Level::Nominal);
    daemon.stop().await;
}

/// A webhook endpoint on loopback that records each JSON body, answering
/// 500 to the first request and 200 to the rest.
fn webhook() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = bodies.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let status = if n == 0 {
                "500 Internal Server Error"
            } else {
                seen.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                "200 OK"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    (url, bodies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_escalation_and_level_events_reach_webhooks_and_commands() {
    let (url, received) = webhook();
    let fleet = Fleet::new(&format!(
        r#"
[agents.gate]
command = {}
mode = "oneshot"
breaker = {{ failure_threshold = 1, recovery_timeout = "1h" }}
fallback_policy = "escalate_to_human"
retry = {{ backoff = ["10ms"] }}

[degradation]
check_interval = "100ms"
reduced = {{ triggers = [{{ when = "breaker_open", agent = "gate" }}] }}

[[notify]]
kind = "webhook"
url = "{url}"
timeout = "2s"
retries = 2

[[notify]]
kind = "command"
command = ["sh", "-c", "cat >> escalations.jsonl"]
events = ["escalation"]
"#,
        switchable("gate"),
    ));
    set_broken(&fleet, "gate", true);
    let daemon = fleet.start().await;
    daemon
        .queue()
        .submit(vec![task("gate", "deploy-1", Priority::High)])
        .await
        .unwrap();
    let kinds = || -> Vec<String> {
        received
            .lock()
            .unwrap()
            .iter()
            .map(|event| event["event"].as_str().unwrap().to_string())
            .collect()
    };
    wait_until(
        Duration::from_secs(20),
        "three events at the webhook",
        || async {
            let kinds = kinds();
            ["breaker_opened", "escalation", "level_changed"]
                .iter()
                .all(|kind| kinds.iter().any(|k| k == kind))
        },
    )
    .await;
    let events = received.lock().unwrap().clone();
    let escalation = events.iter().find(|e| e["event"] == "escalation").unwrap();
    assert_eq!(escalation["task"], "deploy-1");
    assert_eq!(escalation["agent"], "gate");
    assert_eq!(escalation["urgent"], true);
    assert!(
        escalation["text"]
            .as_str()
            .unwrap()
            .contains("flotilla escalations resolve deploy-1"),
        "{escalation}"
    );
    let level = events
        .iter()
        .find(|e| e["event"] == "level_changed")
        .unwrap();
    assert_eq!(level["level"], 1, "{level}");
    // The command sink only wants escalations.
    wait_until(Duration::from_secs(10), "the command sink", || async {
        !fleet.sink_events("escalations.jsonl").is_empty()
    })
    .await;
    let lines = fleet.sink_events("escalations.jsonl");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["event"], "escalation");
    daemon.stop().await;
}

/// examples/org.toml runs as documented: the flaky backend's breaker opens,
/// its tasks go to the CTO, and the fleet drops to level 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_organisation_runs() {
    let text = std::fs::read_to_string(repo_root().join("examples/org.toml"))
        .unwrap()
        .replace(
            r#"["flotilla", "example-agent""#,
            &format!(r#"["{}", "example-agent""#, flotilla_bin()),
        )
        + "\n[http]\nlisten = \"127.0.0.1:0\"\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("org.toml");
    std::fs::write(&path, text).unwrap();
    let config = flotilla::config::load(&path).unwrap();
    let daemon = flotilla::daemon::Daemon::start(config, flotilla::clock::system())
        .await
        .unwrap();
    let queue = daemon.queue().clone();
    // Replicas that are just starting are not failing: the example's
    // `replicas_failing` trigger must not degrade the fleet at start.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(agent(&daemon, "ceo").availability().level(), Level::Nominal);
    let (tasks, ids) = numbered_tasks("backend", 20, "ticket");
    queue.submit(tasks).await.unwrap();
    wait_until(Duration::from_secs(60), "the tickets to finish", || {
        let queue = queue.clone();
        let ids = ids.clone();
        async move {
            records(queue.as_ref(), &ids)
                .await
                .iter()
                .all(|task| task.state.is_terminal())
        }
    })
    .await;
    let tickets = records(queue.as_ref(), &ids).await;
    let by_cto = tickets.iter().filter(|task| task.agent == "cto").count();
    assert!(by_cto > 0, "the CTO took some of the backend's tickets");
    assert!(
        tickets
            .iter()
            .filter(|task| task.state == TaskState::Completed)
            .count()
            >= 15,
        "{tickets:#?}"
    );
    assert!(agent(&daemon, "backend").status().breaker.times_opened >= 1);
    assert!(agent(&daemon, "backend").availability().level() >= Level::Reduced);
    daemon.stop().await;
}

/// Bulkheads: an agent with a deep backlog of slow tasks and an agent that
/// crashes on every task take nothing from a third agent, whose tasks run
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agents_backlog_or_failure_takes_no_capacity_from_another() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.slow]
command = {}
replicas = {{ min = 2 }}

[agents.crashy]
command = {}
replicas = {{ min = 2 }}
restart = {{ initial_backoff = "5ms", max_backoff = "20ms", max_restarts = 100000 }}
breaker = {{ enabled = false }}
retry = {{ max_deliver = 1000, backoff = ["1ms"] }}

[agents.fast]
command = {}
"#,
        example_agent(&["--work-ms", "60000"]),
        example_agent(&["--work-ms", "1", "--crash-rate", "1.0"]),
        example_agent(&["--work-ms", "1"]),
    ));
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    queue
        .submit(numbered_tasks("slow", 500, "slow").0)
        .await
        .unwrap();
    queue
        .submit(numbered_tasks("crashy", 500, "crashy").0)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fast, ids) = numbered_tasks("fast", 20, "fast");
    queue.submit(fast).await.unwrap();
    // Without bulkheads they would wait a minute behind the slow backlog.
    wait_all(
        queue.as_ref(),
        &ids,
        TaskState::Completed,
        Duration::from_secs(20),
        "the fast agent's tasks",
    )
    .await;
    // Meanwhile the crashy agent keeps crashing and being restarted (how
    // often by now depends on the machine's load).
    wait_until(
        Duration::from_secs(20),
        "the crashy agent to be restarted over 10 times",
        || async { agent(&daemon, "crashy").status().restarts > 10 },
    )
    .await;
    daemon.stop().await;
}
