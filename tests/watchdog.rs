//! The fleet watchdog with real processes: a backlog scales an agent up to
//! its maximum and idleness back down; a replica whose task stops making
//! progress is restarted, the task completes elsewhere and the agent's
//! manager receives the rebalancing notice; an error rate over the
//! threshold opens the breaker.

mod support;

use std::time::Duration;

use flotilla::queue::{AttemptOutcome, ListFilter, TaskQueue, TaskState};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_scales_up_to_max_and_idleness_back_down() {
    let fleet = Fleet::new(&format!(
        r#"
[watchdog]
interval = "1s"

[agents.worker]
command = {}
replicas = {{ min = 1, max = 3 }}
watchdog = {{ queue_depth = 5, scale_up_after = "1s", scale_down_after = "2s" }}
"#,
        example_agent(&["--work-ms", "100"]),
    ));
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (tasks, _) = numbered_tasks("worker", 120, "backlog");
    queue.submit(tasks).await.unwrap();
    wait_until(Duration::from_secs(30), "three replicas", || async {
        agent(&daemon, "worker").status().replicas.len() == 3
    })
    .await;
    wait_until(Duration::from_secs(60), "the backlog to drain", || async {
        finished(queue.as_ref()).await == 120
    })
    .await;
    // Every added replica worked.
    let done = queue
        .list(&ListFilter {
            state: Some(TaskState::Completed),
            agent: None,
            limit: 200,
        })
        .await
        .unwrap();
    let mut replicas: Vec<String> = Vec::new();
    for task in &done {
        let task = queue.get(&task.id).await.unwrap().unwrap();
        replicas.extend(task.history.iter().filter_map(|a| a.replica.clone()));
    }
    replicas.sort();
    replicas.dedup();
    assert_eq!(
        replicas,
        ["worker/0", "worker/1", "worker/2"],
        "{replicas:?}"
    );
    wait_until(Duration::from_secs(30), "back to one replica", || async {
        agent(&daemon, "worker").status().replicas.len() == 1
    })
    .await;
    let status = agent(&daemon, "worker").status();
    let actions: Vec<&str> = status.watchdog.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        ["scale_up", "scale_up", "scale_down", "scale_down"],
        "{:?}",
        status.watchdog
    );
    let metrics = metrics_of(&daemon).await;
    assert!(
        metrics
            .contains("flotilla_watchdog_actions_total{agent=\"worker\",action=\"scale_up\"} 2\n"),
        "{metrics}"
    );
    // No task was lost or run twice while replicas came and went.
    let tasks = queue
        .list(&ListFilter {
            state: None,
            agent: Some("worker".into()),
            limit: 200,
        })
        .await
        .unwrap();
    assert_eq!(tasks.len(), 120);
    assert!(tasks.iter().all(|task| task.state == TaskState::Completed));
    daemon.stop().await;
}

/// A persistent agent that hangs on a task's first attempt (no progress,
/// no answer) and answers every later one.
const HANGS_ONCE: &str = r#"
import json, sys
print(json.dumps({"type": "ready", "protocol": 1}), flush=True)
for line in sys.stdin:
    message = json.loads(line)
    if message.get("type") == "shutdown":
        break
    if message.get("type") != "task" or message["attempt"] == 1:
        continue
    print(json.dumps({"type": "result", "id": message["id"], "output": {"attempt": message["attempt"]}}), flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_replica_is_restarted_its_task_completes_elsewhere_and_the_manager_is_told() {
    let fleet = Fleet::new(&format!(
        r#"
[watchdog]
interval = "1s"

[agents.boss]
command = {boss}

[agents.worker]
command = ["python3", "hangs_once.py"]
replicas = {{ min = 2 }}
timeouts = {{ progress_timeout = "10m" }}
retry = {{ backoff = ["10ms"] }}
watchdog = {{ stuck_after = "2s" }}
manager = "boss"
manager_tasks = true

[[notify]]
kind = "command"
command = ["sh", "-c", "cat >> events.jsonl"]
events = ["watchdog", "replica_lost"]
"#,
        boss = example_agent(&["--work-ms", "1"]),
    ));
    std::fs::write(fleet.path("hangs_once.py"), HANGS_ONCE).unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    queue
        .submit(numbered_tasks("worker", 1, "stuck").0)
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "the task to complete", || async {
        queue.get("stuck-00000").await.unwrap().unwrap().state == TaskState::Completed
    })
    .await;
    let task = queue.get("stuck-00000").await.unwrap().unwrap();
    let first = &task.history[0];
    assert_eq!(
        first.outcome,
        Some(AttemptOutcome::ProgressTimeout),
        "{task:?}"
    );
    assert!(
        first
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("fleet watchdog"),
        "{task:?}"
    );
    let last = task.history.last().unwrap();
    assert_eq!(last.outcome, Some(AttemptOutcome::Completed));
    assert_ne!(first.replica, last.replica, "completed elsewhere: {task:?}");
    // The manager got a rebalance task naming the lost replica and task
    // (submitted in the background as the replica is lost).
    wait_until(Duration::from_secs(10), "the rebalance notice", || async {
        !boss_tasks(queue.as_ref()).await.is_empty()
    })
    .await;
    let notices = boss_tasks(queue.as_ref()).await;
    assert_eq!(notices.len(), 1, "{notices:?}");
    let notice = &notices[0];
    assert!(notice.id.starts_with("rebalance-worker-"), "{notice:?}");
    assert_eq!(notice.payload["type"], "rebalance");
    assert_eq!(
        notice.payload["replica"],
        first.replica.clone().unwrap().as_str()
    );
    assert_eq!(
        notice.payload["pending_tasks"],
        serde_json::json!(["stuck-00000"])
    );
    assert_eq!(notice.payload["human_needed"], false, "{notice:?}");
    let status = agent(&daemon, "worker").status();
    assert_eq!(
        status.watchdog[0].action, "restart",
        "{:?}",
        status.watchdog
    );
    // The action and the loss reached the notification sink too.
    let events = sink_events(&fleet, "events.jsonl", 2).await;
    let restart = events
        .iter()
        .find(|event| event["event"] == "watchdog")
        .unwrap_or_else(|| panic!("no watchdog event: {events:#?}"));
    assert_eq!(restart["agent"], "worker");
    assert!(
        restart["text"].as_str().unwrap().contains("restart"),
        "{restart}"
    );
    let lost = events
        .iter()
        .find(|event| event["event"] == "replica_lost")
        .unwrap_or_else(|| panic!("no replica_lost event: {events:#?}"));
    assert_eq!(
        lost["details"]["pending_tasks"],
        serde_json::json!(["stuck-00000"]),
        "{lost}"
    );
    assert_eq!(lost["details"]["human_needed"], false, "{lost}");
    assert!(
        lost["text"].as_str().unwrap().starts_with("to boss: "),
        "{lost}"
    );

    // A second loss within the minute reaches the manager too.
    queue
        .submit(numbered_tasks("worker", 1, "again").0)
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the second rebalance notice",
        || async {
            boss_tasks(queue.as_ref())
                .await
                .iter()
                .any(|notice| notice.payload["pending_tasks"] == serde_json::json!(["again-00000"]))
        },
    )
    .await;
    daemon.stop().await;
}

/// A oneshot tool that shows progress by redrawing one line with `\r`
/// ends no line for longer than `stuck_after`, yet the fleet watchdog sees
/// it working and leaves it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_that_ends_no_line_is_progress_for_the_watchdog() {
    let fleet = Fleet::new(
        r#"
[watchdog]
interval = "1s"

[agents.spinner]
mode = "oneshot"
command = ["sh", "-c", "i=0; while [ $i -lt 45 ]; do printf '\r%s' $i >&2; i=$((i+1)); sleep 0.1; done; echo '{{\"spun\": true}}'"]
timeouts = { progress_timeout = "10m" }
watchdog = { stuck_after = "2s" }
retry = { max_deliver = 1 }
"#,
    );
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    queue
        .submit(numbered_tasks("spinner", 1, "spin").0)
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "the task to end", || async {
        queue
            .get("spin-00000")
            .await
            .unwrap()
            .unwrap()
            .state
            .is_terminal()
    })
    .await;
    let task = queue.get("spin-00000").await.unwrap().unwrap();
    assert_eq!(task.state, TaskState::Completed, "{task:?}");
    assert_eq!(task.history.len(), 1, "{task:?}");
    assert!(
        agent(&daemon, "spinner").status().watchdog.is_empty(),
        "{:?}",
        agent(&daemon, "spinner").status().watchdog
    );
    daemon.stop().await;
}

/// A replica added while the readiness gate blocks the agent is shown
/// not ready at once, not only after the next round of checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_behind_a_closed_gate_is_not_ready() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.gated]
command = {}
replicas = {{ min = 1, max = 2 }}
readiness = {{ interval = "1h", checks = [{{ name = "model", command = ["false"] }}] }}
"#,
        example_agent(&["--work-ms", "1"]),
    ));
    let daemon = fleet.start().await;
    let gated = agent(&daemon, "gated");
    wait_until(Duration::from_secs(20), "the first round", || async {
        gated.status().replicas[0].not_ready.is_some() && !gated.status().readiness.is_empty()
    })
    .await;
    let added = gated.add_replica().expect("below replicas.max");
    let status = gated.status();
    let replica = status
        .replicas
        .iter()
        .find(|replica| replica.index == added)
        .unwrap();
    assert!(
        replica
            .not_ready
            .as_deref()
            .is_some_and(|why| why.contains("model")),
        "{replica:?}"
    );
    daemon.stop().await;
}

/// The events a `cat >> FILE` command sink wrote, once there are at least
/// `least` of them.
async fn sink_events(fleet: &Fleet, file: &str, least: usize) -> Vec<serde_json::Value> {
    wait_until(Duration::from_secs(10), "the notification sink", || async {
        fleet.sink_events(file).len() >= least
    })
    .await;
    fleet.sink_events(file)
}

/// The tasks the manager agent `boss` was given.
async fn boss_tasks(queue: &dyn TaskQueue) -> Vec<flotilla::queue::TaskRecord> {
    queue
        .list(&ListFilter {
            state: None,
            agent: Some("boss".into()),
            limit: 10,
        })
        .await
        .unwrap()
}

/// Tasks the agent says cannot succeed (`retryable: false`: a bad
/// payload) are their own fault: however many, they do not make a healthy
/// agent's error rate, and its breaker stays closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tasks_do_not_count_for_the_error_rate() {
    let fleet = Fleet::new(&format!(
        r#"
[watchdog]
interval = "1s"
error_rate = 0.5
min_calls = 5

[agents.strict]
command = {}
"#,
        example_agent(&["--work-ms", "1", "--fatal-rate", "1.0"]),
    ));
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    queue
        .submit(numbered_tasks("strict", 8, "bad").0)
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "8 dead letters", || async {
        finished(queue.as_ref()).await >= 8
    })
    .await;
    // Three watchdog rounds: the old rule opened the breaker in the first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = agent(&daemon, "strict").status();
    assert_eq!(
        status.breaker.state,
        Some(flotilla::breaker::BreakerState::Closed),
        "{:?}",
        status.breaker
    );
    assert!(status.watchdog.is_empty(), "{:?}", status.watchdog);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_rate_over_the_threshold_opens_the_breaker() {
    let fleet = Fleet::new(&format!(
        r#"
[watchdog]
interval = "1s"
error_rate = 0.5
min_calls = 5

[agents.flaky]
command = {}
retry = {{ max_deliver = 1 }}
# The breaker's own rules would not open it: only the watchdog does.
breaker = {{ failure_threshold = 10000, min_calls = 100000, recovery_timeout = "1h" }}

[[notify]]
kind = "command"
command = ["sh", "-c", "cat >> events.jsonl"]
events = ["error_rate"]
"#,
        example_agent(&["--work-ms", "1", "--error-rate", "1.0"]),
    ));
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    queue
        .submit(numbered_tasks("flaky", 6, "bad").0)
        .await
        .unwrap();
    // The watchdog records its action just after opening the breaker.
    wait_until(Duration::from_secs(30), "the breaker to open", || async {
        let status = agent(&daemon, "flaky").status();
        status.breaker.state == Some(flotilla::breaker::BreakerState::Open)
            && !status.watchdog.is_empty()
    })
    .await;
    let status = agent(&daemon, "flaky").status();
    let reason = &status.breaker.last_transition.as_ref().unwrap().reason;
    assert!(
        reason.contains("fleet watchdog") && reason.contains("100%"),
        "{reason}"
    );
    assert_eq!(status.watchdog.last().unwrap().action, "open_breaker");
    // Humans are told, with the rate.
    let events = sink_events(&fleet, "events.jsonl", 1).await;
    assert_eq!(events[0]["event"], "error_rate", "{events:#?}");
    assert_eq!(events[0]["agent"], "flaky");
    assert_eq!(events[0]["details"]["error_rate"], 1.0, "{events:#?}");
    assert!(
        events[0]["text"].as_str().unwrap().contains("100%"),
        "{events:#?}"
    );
    daemon.stop().await;
}

/// A oneshot slot held back by a failing readiness check still obeys a
/// retire order: a scale-down does not wait for the agent to be ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_that_is_not_ready_can_still_be_retired() {
    let fleet = Fleet::new(
        r#"
[agents.gated]
command = ["true"]
mode = "oneshot"
replicas = { min = 1, max = 2 }

[agents.gated.readiness]
interval = "1s"
checks = [{ name = "never", command = ["false"] }]
"#,
    );
    let daemon = fleet.start().await;
    let gated = agent(&daemon, "gated").clone();
    let added = gated.add_replica().expect("room for a second slot");
    wait_until(
        Duration::from_secs(10),
        "the new slot held back",
        || async {
            gated
                .status()
                .replicas
                .iter()
                .any(|replica| replica.index == added && replica.not_ready.is_some())
        },
    )
    .await;
    // Let it settle into its wait for readiness.
    tokio::time::sleep(Duration::from_millis(500)).await;
    gated.retire_replica(added);
    wait_until(Duration::from_secs(10), "the slot retired", || async {
        gated.status().replicas.len() == 1
    })
    .await;
    daemon.stop().await;
}
