//! The fleet with real agent processes: crashes, hangs, errors, bad output,
//! restarts, timeouts and limits, on the embedded queue.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use flotilla::example_agent::{self, Fate};
use flotilla::queue::{AttemptOutcome, NewTask, Priority, TaskState};
use flotilla::status::AgentState;
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tasks_through_crashes_and_hangs_none_lost_none_twice() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.worker]
command = {}
replicas = {{ min = 4 }}
# Leasing ahead must not lose or duplicate anything either.
prefetch = 16
timeouts = {{ progress_timeout = "400ms", max_duration = "20s", stop_grace = "1s" }}
retry = {{ max_deliver = 12, backoff = ["5ms", "20ms", "50ms"] }}
restart = {{ initial_backoff = "5ms", max_backoff = "50ms", max_restarts = 100000, window = "60s" }}
# Runs of failures open the breaker now and then: short recovery, so the
# test also shows that opening and probing lose and double nothing.
breaker = {{ recovery_timeout = "100ms" }}
"#,
        example_agent(&[
            "--work-ms",
            "2",
            "--crash-rate",
            "0.2",
            "--hang-rate",
            "0.05",
            "--seed",
            "11"
        ])
    ));
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (batch, ids) = numbered_tasks("worker", 1000, "load");
    queue.submit(batch).await.unwrap();
    wait_until(Duration::from_secs(240), "1000 tasks to finish", || async {
        finished(queue.as_ref()).await >= 1000
    })
    .await;
    let status = daemon.agents()[0].status();
    let restarts = status.restarts;
    eprintln!("breaker opened {} times", status.breaker.times_opened);
    daemon.stop().await;

    let records = records(queue.as_ref(), &ids).await;
    let mut outcomes = HashSet::new();
    for task in &records {
        assert!(task.state.is_terminal(), "{} is {}", task.id, task.state);
        assert!(completions(task) <= 1, "{} completed twice", task.id);
        if task.state == TaskState::Completed {
            assert_eq!(completions(task), 1);
            assert_eq!(task.result.as_ref().unwrap()["echo"], task.payload);
        }
        outcomes.extend(task.history.iter().filter_map(|a| a.outcome));
    }
    assert!(
        outcomes.contains(&AttemptOutcome::Crashed),
        "crashes happened"
    );
    assert!(
        outcomes.contains(&AttemptOutcome::ProgressTimeout),
        "hangs were caught"
    );
    assert!(restarts > 50, "replicas were restarted ({restarts})");
    let counts = queue.counts().await.unwrap();
    assert_eq!(counts[0].1.total(), 1000, "nothing extra, nothing missing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_retryable_errors_and_exhausted_attempts_are_dead_lettered_with_reasons() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.fatal]
command = {}
retry = {{ max_deliver = 5, backoff = ["10ms"] }}

[agents.flaky]
command = {}
retry = {{ max_deliver = 3, backoff = ["10ms"] }}
# Every attempt fails: with its breaker on, the sixth would wait for a
# probe instead of exhausting the retries this test is about.
breaker = {{ enabled = false }}
"#,
        example_agent(&["--work-ms", "0", "--fatal-rate", "1.0"]),
        example_agent(&["--work-ms", "0", "--error-rate", "1.0"]),
    ));
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (fatal, fatal_ids) = numbered_tasks("fatal", 3, "fatal");
    let (flaky, flaky_ids) = numbered_tasks("flaky", 2, "flaky");
    queue.submit(fatal).await.unwrap();
    queue.submit(flaky).await.unwrap();
    wait_until(Duration::from_secs(30), "5 dead letters", || async {
        finished(queue.as_ref()).await >= 5
    })
    .await;
    daemon.stop().await;
    for task in records(queue.as_ref(), &fatal_ids).await {
        assert_eq!(task.state, TaskState::DeadLettered);
        assert_eq!(
            task.reason.as_deref(),
            Some("error (not retryable): simulated fatal error")
        );
        assert_eq!(task.history.len(), 1, "not retried");
        assert_eq!(task.history[0].outcome, Some(AttemptOutcome::Error));
        assert_eq!(task.history[0].replica.as_deref(), Some("fatal/0"));
    }
    for task in records(queue.as_ref(), &flaky_ids).await {
        assert_eq!(task.state, TaskState::DeadLettered);
        let reason = task.reason.unwrap();
        assert!(
            reason.starts_with("attempts exhausted (retry.max_deliver = 3)"),
            "{reason}"
        );
        assert!(reason.contains("simulated retryable error"), "{reason}");
        assert_eq!(task.history.len(), 3);
    }
    // The dead-letter list shows them; replay gives them a fresh budget.
    let listed = fleet.cli(&["dlq", "list", "--json"]);
    assert!(listed.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 5);
}

/// Ids whose example-agent fates are: crash on attempt 1, succeed on 2.
fn crash_then_succeed(options: &example_agent::Options, count: usize) -> Vec<String> {
    (0..)
        .map(|n| format!("resume-{n}"))
        .filter(|id| {
            example_agent::fate(options, id, 1) == Fate::Crash
                && example_agent::fate(options, id, 2) == Fate::Succeed
        })
        .take(count)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replica_releases_its_task_at_once_with_its_checkpoint() {
    let options = example_agent::Options {
        work_ms: 40,
        crash_rate: 0.5,
        hang_rate: 0.0,
        error_rate: 0.0,
        fatal_rate: 0.0,
        bad_output_rate: 0.0,
        seed: 3,
    };
    let fleet = Fleet::new(&format!(
        r#"
[agents.worker]
command = {}
replicas = {{ min = 2 }}
timeouts = {{ progress_timeout = "60s" }}
retry = {{ max_deliver = 3, backoff = ["30s"] }}
"#,
        example_agent(&["--work-ms", "40", "--crash-rate", "0.5", "--seed", "3"])
    ));
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let ids = crash_then_succeed(&options, 3);
    let batch = ids
        .iter()
        .map(|id| NewTask {
            id: id.clone(),
            agent: "worker".into(),
            priority: Priority::Normal,
            payload: json!({}),
        })
        .collect();
    queue.submit(batch).await.unwrap();
    // With a 60 s progress timeout and a 30 s retry backoff, only an
    // immediate release lets these finish quickly.
    wait_until(
        Duration::from_secs(15),
        "crashed tasks to complete",
        || async { finished(queue.as_ref()).await >= 3 },
    )
    .await;
    daemon.stop().await;
    for task in records(queue.as_ref(), &ids).await {
        assert_eq!(task.state, TaskState::Completed, "{task:?}");
        let outcomes: Vec<_> = task.history.iter().map(|a| a.outcome).collect();
        assert_eq!(
            outcomes,
            [
                Some(AttemptOutcome::Crashed),
                Some(AttemptOutcome::Completed)
            ]
        );
        assert!(
            task.history[0]
                .detail
                .as_deref()
                .unwrap()
                .contains("exit code 70")
        );
        assert_eq!(
            task.result.unwrap()["resumed_from"],
            json!({"step": 1}),
            "checkpoint handed over"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_output_is_counted_and_the_fleet_goes_on() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.babbler]
command = {}
max_line_bytes = "1KiB"
"#,
        example_agent(&["--work-ms", "0", "--bad-output-rate", "1.0"])
    ));
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (batch, ids) = numbered_tasks("babbler", 20, "babble");
    queue.submit(batch).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "babbling tasks to finish",
        || async { finished(queue.as_ref()).await >= 20 },
    )
    .await;
    let status = daemon.agents()[0].status();
    assert!(status.malformed_lines >= 20, "{status:?}");
    assert!(
        status
            .last_malformed
            .as_deref()
            .unwrap()
            .contains("this is not a protocol message")
    );
    assert_eq!(status.restarts, 0, "bad lines do not crash anything");
    // The status command shows it from the daemon's snapshot (written
    // every 200 ms).
    wait_until(Duration::from_secs(10), "the snapshot", || async {
        let shown = fleet.cli(&["status", "--json"]);
        let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
        shown["daemon"]["running"].as_bool() == Some(true)
            && shown["agents"][0]["malformed_lines"]
                .as_u64()
                .is_some_and(|lines| lines >= 20)
    })
    .await;
    daemon.stop().await;
    for task in records(queue.as_ref(), &ids).await {
        assert_eq!(task.state, TaskState::Completed);
    }
}

/// Answers attempt 1 with an `error` whose `retry_after_ms` is a float,
/// attempt 2 with a `result` under the wrong name, attempt 3 rightly.
const SLOPPY: &str = r#"
import json, sys
def out(m):
    print(json.dumps(m), flush=True)
out({"type": "ready", "protocol": 1})
for line in sys.stdin:
    m = json.loads(line)
    if m.get("type") == "shutdown":
        break
    if m.get("type") != "task":
        continue
    if m["attempt"] == 1:
        out({"type": "error", "id": m["id"], "message": "rate limited", "retry_after_ms": 1.5})
    elif m["attempt"] == 2:
        out({"type": "result", "id": m["id"], "result": {"n": 2}})
    else:
        out({"type": "result", "id": m["id"], "output": {"n": 3}})
"#;

/// A malformed outcome of a task fails its attempt at once, saying why,
/// rather than leaving it to the progress timeout (or completing it with
/// a lost result).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_result_or_error_fails_the_attempt_at_once() {
    let fleet = Fleet::new(
        r#"
[agents.sloppy]
command = ["python3", "sloppy.py"]
retry = { backoff = ["10ms"] }
"#,
    );
    std::fs::write(fleet.path("sloppy.py"), SLOPPY).unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (batch, ids) = numbered_tasks("sloppy", 1, "sloppy");
    queue.submit(batch).await.unwrap();
    wait_until(Duration::from_secs(20), "the third attempt", || async {
        finished(queue.as_ref()).await >= 1
    })
    .await;
    let task = queue.get(&ids[0]).await.unwrap().unwrap();
    assert_eq!(task.state, TaskState::Completed, "{task:?}");
    assert_eq!(task.result, Some(json!({"n": 3})));
    let details: Vec<&str> = task
        .history
        .iter()
        .map(|attempt| attempt.detail.as_deref().unwrap_or_default())
        .collect();
    assert!(
        details[0].contains("the agent's error message was malformed")
            && details[0].contains("floating point `1.5`, expected u64")
            && details[1].contains("the agent's result message was malformed")
            && details[1].contains("`result`"),
        "{details:#?}"
    );
    daemon.stop().await;
}

/// Reads two tasks, then answers both with results over its 64 KiB
/// `max_line_bytes`.
const OVERSIZED: &str = r#"
import json, sys
print(json.dumps({"type": "ready"}), flush=True)
held = []
for line in sys.stdin:
    held.append(json.loads(line)["id"])
    if len(held) == 2:
        for id in held:
            print(json.dumps({"type": "result", "id": id, "output": "x" * 100000}), flush=True)
        held = []
"#;

/// Answers with a result line that is not UTF-8.
const LATIN1: &str = r#"
import json, sys
print(json.dumps({"type": "ready"}), flush=True)
for line in sys.stdin:
    id = json.loads(line)["id"]
    sys.stdout.buffer.write(b'{"type": "result", "id": "' + id.encode() + b'", "output": "caf\xe9"}\n')
    sys.stdout.flush()
"#;

/// A result line too long to read, or not UTF-8, fails its attempt at
/// once, naming the cause, instead of at the progress timeout; a result
/// too long is not retried (it would not fit next time either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_result_line_fails_its_attempt_at_once() {
    let fleet = Fleet::new(
        r#"
[agents.oversized]
command = ["python3", "oversized.py"]
concurrency = 2
max_line_bytes = "64KiB"
timeouts = { progress_timeout = "60s" }

[agents.latin1]
command = ["python3", "latin1.py"]
timeouts = { progress_timeout = "60s" }
retry = { max_deliver = 1 }
"#,
    );
    std::fs::write(fleet.path("oversized.py"), OVERSIZED).unwrap();
    std::fs::write(fleet.path("latin1.py"), LATIN1).unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (oversized, oversized_ids) = numbered_tasks("oversized", 2, "big");
    let (latin1, latin1_ids) = numbered_tasks("latin1", 1, "latin");
    queue.submit(oversized).await.unwrap();
    queue.submit(latin1).await.unwrap();
    wait_until(Duration::from_secs(20), "the tasks to fail", || async {
        finished(queue.as_ref()).await >= 3
    })
    .await;
    daemon.stop().await;
    for task in records(queue.as_ref(), &oversized_ids).await {
        assert_eq!(task.state, TaskState::DeadLettered, "{task:?}");
        assert_eq!(task.history.len(), 1, "not retried: {task:?}");
        let reason = task.reason.as_deref().unwrap();
        assert!(
            reason.contains("result message was longer than max_line_bytes = 65536"),
            "{reason}"
        );
    }
    let latin1 = &records(queue.as_ref(), &latin1_ids).await[0];
    assert_eq!(latin1.state, TaskState::DeadLettered, "{latin1:?}");
    let reason = latin1.reason.as_deref().unwrap();
    assert!(
        reason.contains("result message was malformed: not UTF-8"),
        "{reason}"
    );
}

/// Reads stdin only between tasks; a task marked poison kills it half a
/// second in.
const DIES_ON_POISON: &str = r#"
import json, sys, time
print(json.dumps({"type": "ready"}), flush=True)
for line in sys.stdin:
    task = json.loads(line)
    if task["payload"].get("poison"):
        time.sleep(0.5)
        sys.exit(1)
    print(json.dumps({"type": "result", "id": task["id"], "output": "ok"}), flush=True)
"#;

/// A task whose long message was being written when another task killed
/// the agent is not blamed for the crash: the poison is charged and
/// dead-lettered, the innocent task completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_written_when_another_kills_the_agent_is_not_blamed() {
    let fleet = Fleet::new(
        r#"
[agents.fragile]
command = ["python3", "fragile.py"]
concurrency = 2
retry = { max_deliver = 2, backoff = ["10ms"] }
"#,
    );
    std::fs::write(fleet.path("fragile.py"), DIES_ON_POISON).unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let task = |id: &str, payload: serde_json::Value| NewTask {
        id: id.into(),
        agent: "fragile".into(),
        priority: Priority::Normal,
        payload,
    };
    // The big task's message is over the 64 KiB a pipe holds: its write
    // waits while the agent works on the poison, then breaks.
    queue
        .submit(vec![
            task("poison", json!({"poison": true})),
            task("big", json!({"text": "x".repeat(200_000)})),
        ])
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "both tasks to end", || async {
        finished(queue.as_ref()).await >= 2
    })
    .await;
    daemon.stop().await;
    let poison = queue.get("poison").await.unwrap().unwrap();
    assert_eq!(poison.state, TaskState::DeadLettered, "{poison:?}");
    let big = queue.get("big").await.unwrap().unwrap();
    assert_eq!(big.state, TaskState::Completed, "{big:?}");
    assert!(
        big.history
            .iter()
            .all(|attempt| attempt.outcome != Some(AttemptOutcome::Crashed)),
        "{:?}",
        big.history
    );
}

/// Reads one task, byte by byte (no read-ahead), answers it half a
/// second later, and exits half a second after that without reading more.
const ANSWERS_ONE_AND_GOES: &str = r#"
import json, os, sys, time
print(json.dumps({"type": "ready"}), flush=True)
line = bytearray()
while not line.endswith(b"\n"):
    line += os.read(0, 1)
task = json.loads(line)
time.sleep(0.5)
print(json.dumps({"type": "result", "id": task["id"], "output": "done"}), flush=True)
time.sleep(0.5)
sys.exit(0)
"#;

/// A result the agent wrote just before it exited counts, though the
/// daemon read it while it waited to write the next task and then found
/// the agent gone: the task completes on its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_written_before_the_agent_exits_counts() {
    let fleet = Fleet::new(
        r#"
[agents.brief]
command = ["python3", "brief.py"]
concurrency = 2
"#,
    );
    std::fs::write(fleet.path("brief.py"), ANSWERS_ONE_AND_GOES).unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let task = |id: &str, payload: serde_json::Value| NewTask {
        id: id.into(),
        agent: "brief".into(),
        priority: Priority::Normal,
        payload,
    };
    // The second, leased after the first (lower priority), is over what a
    // pipe holds: its write waits while the agent answers the first and
    // exits.
    let mut second = task("second", json!({"text": "x".repeat(200_000)}));
    second.priority = Priority::Low;
    let mut first = task("first", json!({}));
    first.priority = Priority::High;
    queue.submit(vec![first, second]).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "both tasks to complete",
        || async { finished(queue.as_ref()).await >= 2 },
    )
    .await;
    daemon.stop().await;
    let first = queue.get("first").await.unwrap().unwrap();
    assert_eq!(first.state, TaskState::Completed, "{first:?}");
    assert_eq!(
        first
            .history
            .iter()
            .map(|attempt| attempt.outcome)
            .collect::<Vec<_>>(),
        [Some(AttemptOutcome::Completed)],
        "{first:?}"
    );
}

/// Takes tasks one at a time in one thread, and answers each, after a
/// second, with a result longer than a pipe holds.
const LONG_ANSWERS: &str = r#"
import json, sys, time
def out(m):
    sys.stdout.write(json.dumps(m) + "\n")
    sys.stdout.flush()
out({"type": "ready", "protocol": 1})
for line in sys.stdin:
    m = json.loads(line)
    if m.get("type") == "shutdown":
        break
    if m.get("type") != "task":
        continue
    time.sleep(1)
    out({"type": "result", "id": m["id"], "output": "x" * 300000})
"#;

/// While the daemon writes a long task to an agent busy writing a long
/// result, it reads that result: neither waits for the other until the
/// stdin timeout breaks the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lines_both_ways_do_not_deadlock_a_replica() {
    let fleet = Fleet::new(
        r#"
[agents.long]
command = ["python3", "long.py"]
concurrency = 2
"#,
    );
    std::fs::write(fleet.path("long.py"), LONG_ANSWERS).unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let tasks: Vec<NewTask> = (0..2)
        .map(|n| NewTask {
            id: format!("long-{n}"),
            agent: "long".into(),
            priority: Priority::Normal,
            payload: json!({"blob": "y".repeat(200_000)}),
        })
        .collect();
    queue.submit(tasks).await.unwrap();
    wait_until(Duration::from_secs(30), "both tasks to finish", || async {
        finished(queue.as_ref()).await >= 2
    })
    .await;
    for id in ["long-0", "long-1"] {
        let task = queue.get(id).await.unwrap().unwrap();
        assert_eq!(task.state, TaskState::Completed, "{task:?}");
        assert_eq!(task.history.len(), 1, "{:?}", task.history);
    }
    assert_eq!(daemon.agents()[0].status().restarts, 0);
    daemon.stop().await;
}

/// The `ready` contract: an agent speaking another protocol version, or
/// silent past `timeouts.startup`, does not start (the reason is its
/// replica's last exit); what it says before `ready` is not taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_not_ready_in_the_protocol_does_not_start() {
    let fleet = Fleet::new(
        r#"
[agents.future]
command = ["sh", "-c", "echo '{{\"type\":\"result\",\"id\":\"x\",\"output\":1}}'; echo '{{\"type\":\"ready\",\"protocol\":2}}'; sleep 60"]
restart = { initial_backoff = "10s", max_backoff = "10s" }

[agents.mute]
command = ["sh", "-c", "sleep 60"]
timeouts = { startup = "500ms", stop_grace = "1s" }
restart = { initial_backoff = "10s", max_backoff = "10s" }

[agents.chatty]
command = ["sh", "-c", "echo 'loading model...'; sleep 60"]
timeouts = { startup = "500ms", stop_grace = "1s" }
restart = { initial_backoff = "10s", max_backoff = "10s" }
"#,
    );
    let daemon = fleet.start().await;
    let last_exit = |name: &str| {
        daemon
            .agents()
            .iter()
            .find(|agent| agent.name == name)
            .unwrap()
            .status()
    };
    wait_until(Duration::from_secs(20), "both starts to fail", || async {
        ["future", "mute", "chatty"]
            .iter()
            .all(|name| last_exit(name).replicas[0].last_exit.is_some())
    })
    .await;
    let future = last_exit("future");
    assert!(
        future.replicas[0]
            .last_exit
            .as_deref()
            .unwrap()
            .contains("the agent speaks protocol 2; this flotilla speaks 1"),
        "{future:?}"
    );
    assert_eq!(future.stale_messages, 1, "{future:?}");
    let mute = last_exit("mute");
    assert!(
        mute.replicas[0]
            .last_exit
            .as_deref()
            .unwrap()
            .contains("no ready message within timeouts.startup = 500ms"),
        "{mute:?}"
    );
    // What it wrote instead is named: a log line on stdout, here.
    let chatty = last_exit("chatty");
    let said = chatty.replicas[0].last_exit.as_deref().unwrap();
    assert!(
        said.contains("no ready message within timeouts.startup = 500ms; the last line it wrote instead: malformed message")
            && said.contains("loading model..."),
        "{said}"
    );
    daemon.stop().await;
}

/// Works on a task until told to cancel it (then notes the cancel in a
/// file), except tasks whose payload says `quick`, answered at once.
const CANCELLABLE: &str = r#"
import json, sys
def out(m):
    sys.stdout.write(json.dumps(m) + "\n")
    sys.stdout.flush()
out({"type": "ready", "protocol": 1})
for line in sys.stdin:
    m = json.loads(line)
    if m.get("type") == "shutdown":
        break
    if m.get("type") == "cancel":
        open("cancelled-" + m["id"], "w").close()
    elif m.get("type") == "task" and m["payload"].get("quick"):
        out({"type": "result", "id": m["id"], "output": "done"})
"#;

/// A cancelled task's agent hears `cancel` within seconds, though it sends
/// no progress (which would otherwise be when its replica learns), and
/// its replica goes on with the next task; a oneshot task's process is
/// stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_task_is_abandoned_by_its_agent_within_seconds() {
    let fleet = Fleet::new(
        r#"
[agents.long]
command = ["python3", "cancellable.py"]
concurrency = 2
timeouts = { progress_timeout = "5m" }

[agents.once]
command = ["sh", "-c", "sleep 120"]
mode = "oneshot"
timeouts = { progress_timeout = "5m", stop_grace = "1s" }
"#,
    );
    std::fs::write(fleet.path("cancellable.py"), CANCELLABLE).unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let task = |id: &str, agent: &str, payload| NewTask {
        id: id.into(),
        agent: agent.into(),
        priority: Priority::Normal,
        payload,
    };
    queue
        .submit(vec![
            task("slow", "long", json!({})),
            task("sleeper", "once", json!({})),
        ])
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "both to run", || async {
        let mut both = true;
        for id in ["slow", "sleeper"] {
            both &= queue.get(id).await.unwrap().unwrap().state == TaskState::Running;
        }
        both
    })
    .await;
    for id in ["slow", "sleeper"] {
        flotilla::api::cancel(daemon.store(), id, "not needed")
            .await
            .unwrap();
    }
    wait_until(
        Duration::from_secs(15),
        "the agent to hear the cancel",
        || async { fleet.path("cancelled-slow").exists() },
    )
    .await;
    let once = daemon
        .agents()
        .iter()
        .find(|agent| agent.name == "once")
        .unwrap()
        .clone();
    wait_until(
        Duration::from_secs(15),
        "the oneshot process to stop",
        || async {
            once.status()
                .replicas
                .iter()
                .all(|replica| replica.pid.is_none())
        },
    )
    .await;
    // The replica goes on with the next task.
    queue
        .submit(vec![task("next", "long", json!({"quick": true}))])
        .await
        .unwrap();
    wait_until(Duration::from_secs(15), "the next task", || async {
        queue.get("next").await.unwrap().unwrap().state == TaskState::Completed
    })
    .await;
    let long = daemon
        .agents()
        .iter()
        .find(|agent| agent.name == "long")
        .unwrap()
        .status();
    assert_eq!(long.restarts, 0, "{long:?}");
    daemon.stop().await;
}

/// Says it is alive every 100 ms and never advances.
const ONLY_HEARTBEATS: &str = r#"
import json, sys, threading, time
def out(m):
    sys.stdout.write(json.dumps(m) + "\n")
    sys.stdout.flush()
out({"type": "ready", "protocol": 1})
def beat():
    while True:
        out({"type": "heartbeat"})
        time.sleep(0.1)
threading.Thread(target=beat, daemon=True).start()
for line in sys.stdin:
    if json.loads(line).get("type") == "shutdown":
        break
"#;

/// A heartbeat is not progress: an agent alive but stuck is caught by
/// its progress timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_do_not_keep_a_stuck_task_alive() {
    let fleet = Fleet::new(
        r#"
[agents.beater]
command = ["python3", "beater.py"]
timeouts = { progress_timeout = "1s", stop_grace = "1s" }
retry = { max_deliver = 1 }
"#,
    );
    std::fs::write(fleet.path("beater.py"), ONLY_HEARTBEATS).unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (batch, ids) = numbered_tasks("beater", 1, "beat");
    queue.submit(batch).await.unwrap();
    wait_until(Duration::from_secs(20), "the stuck task to end", || async {
        finished(queue.as_ref()).await >= 1
    })
    .await;
    let task = queue.get(&ids[0]).await.unwrap().unwrap();
    assert_eq!(task.state, TaskState::DeadLettered, "{task:?}");
    assert_eq!(
        task.history[0].outcome,
        Some(AttemptOutcome::ProgressTimeout),
        "{task:?}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_keeps_crashing_is_failed_and_its_tasks_stay_queued() {
    let fleet = Fleet::new(
        r#"
[agents.broken]
command = ["sh", "-c", "echo starting >&2; exit 1"]
replicas = { min = 2 }
restart = { initial_backoff = "10ms", max_backoff = "20ms", max_restarts = 5, window = "60s" }

[[notify]]
kind = "command"
command = ["sh", "-c", "cat >> events.jsonl"]
events = ["agent_failed", "replica_lost"]
"#,
    );
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (batch, ids) = numbered_tasks("broken", 2, "stuck");
    queue.submit(batch).await.unwrap();
    let agent = daemon.agents()[0].clone();
    wait_until(Duration::from_secs(20), "the agent to be failed", || {
        let agent = agent.clone();
        async move { agent.status().state == AgentState::Failed }
    })
    .await;
    let status = agent.status();
    let failure = status.failure.unwrap();
    assert!(
        failure.contains("restart.max_restarts = 5") && failure.contains("exited before ready"),
        "{failure}"
    );
    // Humans are told, urgently: the agent failed, and no replica of it
    // is left to take its tasks.
    wait_until(Duration::from_secs(10), "the failure event", || async {
        fleet
            .sink_events("events.jsonl")
            .iter()
            .any(|event| event["event"] == "agent_failed")
    })
    .await;
    let events = fleet.sink_events("events.jsonl");
    let failed = events
        .iter()
        .find(|event| event["event"] == "agent_failed")
        .unwrap();
    assert_eq!(failed["urgent"], true, "{failed}");
    assert!(
        events.iter().any(|event| event["event"] == "replica_lost"
            && event["urgent"] == true
            && event["details"]["human_needed"] == true
            && event["text"]
                .as_str()
                .unwrap()
                .contains("a human is needed")),
        "{events:#?}"
    );
    daemon.stop().await;
    for task in records(queue.as_ref(), &ids).await {
        assert_eq!(task.state, TaskState::Queued, "never started, still queued");
    }
}

/// One replica that cannot start never fills the restart window once its
/// restart delay has grown; failing to start `max_restarts` times in a
/// row fails the agent all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_failing_to_start_in_a_row_fails_the_agent() {
    let fleet = Fleet::new(
        r#"
[agents.broken]
command = ["sh", "-c", "exit 1"]
restart = { initial_backoff = "100ms", max_backoff = "200ms", max_restarts = 4, window = "50ms" }
"#,
    );
    let daemon = fleet.start().await;
    let agent = daemon.agents()[0].clone();
    wait_until(Duration::from_secs(20), "the agent to be failed", || {
        let agent = agent.clone();
        async move { agent.status().state == AgentState::Failed }
    })
    .await;
    let failure = agent.status().failure.unwrap();
    assert!(
        failure.contains("failed to start 5 times in a row")
            && failure.contains("restart.max_restarts = 4")
            && failure.contains("exited before ready"),
        "{failure}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_over_its_memory_limit_is_killed_and_its_task_retried() {
    let agent = r#"
import json, sys
print(json.dumps({"type": "ready"}), flush=True)
for line in sys.stdin:
    task = json.loads(line)
    if task["attempt"] == 1:
        hog = bytearray(300 * 1024 * 1024)
        for i in range(0, len(hog), 4096):
            hog[i] = 1
        import time
        while True:
            print(json.dumps({"type": "progress", "id": task["id"]}), flush=True)
            time.sleep(0.2)
    print(json.dumps({"type": "result", "id": task["id"], "output": "small"}), flush=True)
"#;
    let fleet = Fleet::new("");
    std::fs::write(fleet.path("hog.py"), agent).unwrap();
    std::fs::write(
        &fleet.config_path,
        r#"
[store]
path = "fleet.db"
[http]
listen = "127.0.0.1:0"
[agents.hog]
command = ["python3", "hog.py"]
memory_limit = "100MiB"
retry = { backoff = ["10ms"] }
"#,
    )
    .unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (batch, ids) = numbered_tasks("hog", 1, "hog");
    queue.submit(batch).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "the hog task to finish",
        || async { finished(queue.as_ref()).await >= 1 },
    )
    .await;
    daemon.stop().await;
    let task = &records(queue.as_ref(), &ids).await[0];
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.history[0].outcome, Some(AttemptOutcome::MemoryLimit));
    assert!(
        task.history[0]
            .detail
            .as_deref()
            .unwrap()
            .contains("memory_limit = 100MiB")
    );
}

/// A payload value that would begin an argument with `-` is refused (the
/// program would read it as an option), unless `--` ends the program's
/// options before it or the agent allows it (`allow_dash_args`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_value_never_becomes_an_option() {
    let fleet = Fleet::new(
        r#"
[agents.plain]
mode = "oneshot"
command = ["python3", "said.py", "{payload.text}"]
retry = { max_deliver = 1 }

[agents.ended]
mode = "oneshot"
command = ["python3", "said.py", "--", "{payload.text}"]

[agents.allowed]
mode = "oneshot"
command = ["python3", "said.py", "{payload.text}"]
allow_dash_args = true
"#,
    );
    std::fs::write(
        fleet.path("said.py"),
        "import json, sys\nprint(json.dumps({\"said\": sys.argv[-1]}))\n",
    )
    .unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let task = |id: &str, agent: &str, text: &str| NewTask {
        id: id.into(),
        agent: agent.into(),
        priority: flotilla::queue::Priority::Normal,
        payload: serde_json::json!({ "text": text }),
    };
    queue
        .submit(vec![
            task("dash", "plain", "--dangerously-skip-permissions"),
            task("word", "plain", "hello"),
            task("ended", "ended", "--help"),
            task("allowed", "allowed", "-5"),
        ])
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "the tasks to end", || async {
        finished(queue.as_ref()).await >= 4
    })
    .await;
    let dash = queue.get("dash").await.unwrap().unwrap();
    assert_eq!(dash.state, TaskState::DeadLettered, "{dash:?}");
    assert!(
        dash.reason
            .as_deref()
            .unwrap_or_default()
            .contains("starts with '-'"),
        "{dash:?}"
    );
    let word = queue.get("word").await.unwrap().unwrap();
    assert_eq!(word.result, Some(serde_json::json!({"said": "hello"})));
    let ended = queue.get("ended").await.unwrap().unwrap();
    assert_eq!(ended.result, Some(serde_json::json!({"said": "--help"})));
    let allowed = queue.get("allowed").await.unwrap().unwrap();
    assert_eq!(allowed.result, Some(serde_json::json!({"said": "-5"})));
    daemon.stop().await;
}

/// Two tasks at once push this agent over its memory limit; one alone
/// does not.
const HOGS_WITH_TWO: &str = r#"
import json, os, select, time
print(json.dumps({"type": "ready"}), flush=True)
buf, held, hog = b"", [], None
while True:
    ready, _, _ = select.select([0], [], [], 1.0)
    if ready:
        data = os.read(0, 65536)
        if not data:
            break
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            message = json.loads(line)
            if message.get("type") == "shutdown":
                raise SystemExit(0)
            if message.get("type") == "task":
                held.append(message["id"])
    if len(held) >= 2 and hog is None:
        hog = bytearray(300 * 1024 * 1024)
        for i in range(0, len(hog), 4096):
            hog[i] = 1
    if hog is not None:
        for task in held:
            print(json.dumps({"type": "progress", "id": task}), flush=True)
        time.sleep(0.2)
    elif held and not ready:
        for task in held:
            print(json.dumps({"type": "result", "id": task, "output": "alone"}), flush=True)
        held = []
"#;

/// A replica over its memory limit with several tasks cannot tell which
/// one did it: each is charged, as in a crash, so tasks that always do it
/// together end in the dead-letter queue instead of coming back uncharged
/// for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_kill_with_several_tasks_charges_each() {
    let fleet = Fleet::new(
        r#"
[agents.hogs]
command = ["python3", "hogs.py"]
concurrency = 2
memory_limit = "100MiB"
retry = { max_deliver = 2, backoff = ["10ms"] }
restart = { initial_backoff = "10ms" }
"#,
    );
    std::fs::write(fleet.path("hogs.py"), HOGS_WITH_TWO).unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (batch, ids) = numbered_tasks("hogs", 2, "hogs");
    queue.submit(batch).await.unwrap();
    wait_until(Duration::from_secs(60), "both tasks to end", || async {
        finished(queue.as_ref()).await >= 2
    })
    .await;
    daemon.stop().await;
    let killed: Vec<_> = records(queue.as_ref(), &ids)
        .await
        .into_iter()
        .filter(|task| {
            task.history
                .iter()
                .any(|attempt| attempt.outcome == Some(AttemptOutcome::MemoryLimit))
        })
        .collect();
    assert!(!killed.is_empty(), "no memory kill");
    for task in &killed {
        // Each kill was charged to it (besides the attempt that ended it).
        let kills = task
            .history
            .iter()
            .filter(|attempt| attempt.outcome == Some(AttemptOutcome::MemoryLimit))
            .count();
        assert!(task.charged_attempts as usize >= kills, "{task:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_duration_kills_an_agent_that_keeps_reporting_progress() {
    let agent = r#"
import json, sys, time
print(json.dumps({"type": "ready"}), flush=True)
for line in sys.stdin:
    task = json.loads(line)
    while True:
        print(json.dumps({"type": "progress", "id": task["id"], "step": "spinning"}), flush=True)
        time.sleep(0.05)
"#;
    let fleet = Fleet::new("");
    std::fs::write(fleet.path("spin.py"), agent).unwrap();
    std::fs::write(
        &fleet.config_path,
        r#"
[store]
path = "fleet.db"
[http]
listen = "127.0.0.1:0"
[agents.spin]
command = ["python3", "spin.py"]
timeouts = { max_duration = "500ms", progress_timeout = "10s", stop_grace = "1s" }
retry = { max_deliver = 2, backoff = ["10ms"] }
"#,
    )
    .unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (batch, ids) = numbered_tasks("spin", 1, "spin");
    queue.submit(batch).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "the spinning task to be dead-lettered",
        || async { finished(queue.as_ref()).await >= 1 },
    )
    .await;
    daemon.stop().await;
    let task = &records(queue.as_ref(), &ids).await[0];
    assert_eq!(task.state, TaskState::DeadLettered);
    assert!(
        task.reason.as_deref().unwrap().contains("max_duration"),
        "{:?}",
        task.reason
    );
    assert!(
        task.history
            .iter()
            .all(|a| a.outcome == Some(AttemptOutcome::MaxDuration))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_agents_in_python_and_shell_work() {
    let root = repo_root();
    let python = root.join("examples/agents/python_agent.py");
    let shell = root.join("examples/agents/oneshot.sh");
    let fleet = Fleet::new(&format!(
        r#"
[agents.python]
command = ["python3", {python:?}]

[agents.words]
mode = "oneshot"
command = ["sh", {shell:?}, "{{payload.text}}"]
replicas = {{ min = 2 }}
fatal_exit_codes = [3]
"#,
        python = python.display().to_string(),
        shell = shell.display().to_string(),
    ));
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let submit = |id: &str, agent: &str, payload: serde_json::Value| NewTask {
        id: id.into(),
        agent: agent.into(),
        priority: Priority::Normal,
        payload,
    };
    queue
        .submit(vec![
            submit("py-ok", "python", json!({"text": "fleet", "steps": 3})),
            submit("py-bad", "python", json!({"steps": 1})),
            submit("sh-ok", "words", json!({"text": "three little words"})),
            submit("sh-empty", "words", json!({"text": ""})),
            submit("sh-missing", "words", json!({"other": 1})),
        ])
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "example tasks to finish",
        || async { finished(queue.as_ref()).await >= 5 },
    )
    .await;
    daemon.stop().await;
    let get = |id: &'static str| {
        let queue = queue.clone();
        async move { queue.get(id).await.unwrap().unwrap() }
    };
    let py_ok = get("py-ok").await;
    assert_eq!(py_ok.state, TaskState::Completed, "{py_ok:?}");
    assert_eq!(py_ok.result.as_ref().unwrap()["upper"], "FLEET");
    let py_bad = get("py-bad").await;
    assert_eq!(py_bad.state, TaskState::DeadLettered);
    assert!(py_bad.reason.unwrap().contains("text"));
    let sh_ok = get("sh-ok").await;
    assert_eq!(sh_ok.state, TaskState::Completed, "{sh_ok:?}");
    assert_eq!(sh_ok.result.unwrap()["words"], 3);
    let sh_empty = get("sh-empty").await;
    assert_eq!(sh_empty.state, TaskState::DeadLettered);
    assert!(sh_empty.reason.unwrap().contains("exit code 3"));
    let sh_missing = get("sh-missing").await;
    assert_eq!(sh_missing.state, TaskState::DeadLettered);
    assert!(
        sh_missing
            .reason
            .unwrap()
            .contains("the payload has no field payload.text")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oneshot_hang_is_killed_and_output_lines_count_as_progress() {
    let fleet = Fleet::new(
        r#"
[agents.slow]
mode = "oneshot"
command = ["sh", "-c", "for i in 1 2 3 4 5 6; do echo tick; sleep 0.1; done; echo '{{\"done\": true}}'"]
timeouts = { progress_timeout = "400ms" }

[agents.silent]
mode = "oneshot"
command = ["sh", "-c", "sleep 30"]
timeouts = { progress_timeout = "300ms", stop_grace = "1s" }
retry = { max_deliver = 1 }

[agents.binary]
mode = "oneshot"
command = ["sh", "-c", "printf 'a\\377b\\n'"]

[agents.suicidal]
mode = "oneshot"
command = ["sh", "-c", "kill -9 $$"]
retry = { max_deliver = 2, backoff = ["60s"] }

[agents.background]
mode = "oneshot"
command = ["sh", "-c", "sleep 60 & echo '{{\"left\": \"a helper\"}}'"]
timeouts = { progress_timeout = "20s" }
retry = { max_deliver = 1 }

[agents.spinner]
mode = "oneshot"
command = ["sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do printf '\\r%s' $i >&2; sleep 0.3; done; echo '{{\"spun\": true}}'"]
timeouts = { progress_timeout = "2s" }
retry = { max_deliver = 1 }
"#,
    );
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (slow, slow_ids) = numbered_tasks("slow", 1, "slow");
    let (silent, silent_ids) = numbered_tasks("silent", 1, "silent");
    let (binary, binary_ids) = numbered_tasks("binary", 1, "binary");
    let (suicidal, suicidal_ids) = numbered_tasks("suicidal", 1, "suicidal");
    let (background, background_ids) = numbered_tasks("background", 1, "background");
    let (spinner, spinner_ids) = numbered_tasks("spinner", 1, "spinner");
    queue.submit(slow).await.unwrap();
    queue.submit(spinner).await.unwrap();
    queue.submit(background).await.unwrap();
    queue.submit(silent).await.unwrap();
    queue.submit(binary).await.unwrap();
    queue.submit(suicidal).await.unwrap();
    // The suicidal task has a 60 s backoff: only an immediate retry of a
    // process killed by a signal finishes it in time.
    wait_until(
        Duration::from_secs(30),
        "the oneshot tasks to finish",
        || async { finished(queue.as_ref()).await >= 6 },
    )
    .await;
    let flotilla::store::Store::Embedded(store) = daemon.store() else {
        panic!("the embedded store")
    };
    let instance = store.store_id().to_string();
    daemon.stop().await;
    let slow = &records(queue.as_ref(), &slow_ids).await[0];
    assert_eq!(slow.state, TaskState::Completed, "{slow:?}");
    // Six ticks over 600 ms against a 400 ms progress timeout: each line
    // counted as progress. stdout is the result; not JSON as a whole here.
    assert!(
        slow.result
            .as_ref()
            .unwrap()
            .as_str()
            .unwrap()
            .ends_with("{\"done\": true}")
    );
    let silent = &records(queue.as_ref(), &silent_ids).await[0];
    assert_eq!(silent.state, TaskState::DeadLettered);
    assert_eq!(
        silent.history[0].outcome,
        Some(AttemptOutcome::ProgressTimeout)
    );
    assert!(
        processes_of(&instance).is_empty(),
        "the killed sleep is gone"
    );
    // Its exit ends the task, though the sleep it left holds its stdout:
    // not a progress timeout 20 s later. The sleep ends with its group
    // (none of the fleet's processes are left, above).
    let background = &records(queue.as_ref(), &background_ids).await[0];
    assert_eq!(background.state, TaskState::Completed, "{background:?}");
    assert_eq!(
        background.result.as_ref().unwrap(),
        &serde_json::json!({"left": "a helper"})
    );
    // A progress bar redrawn with \r ends no line, but it is progress:
    // 3.6 s of it against a 2 s progress timeout.
    let spinner = &records(queue.as_ref(), &spinner_ids).await[0];
    assert_eq!(spinner.state, TaskState::Completed, "{spinner:?}");
    let binary = &records(queue.as_ref(), &binary_ids).await[0];
    assert_eq!(binary.state, TaskState::Completed, "{binary:?}");
    assert_eq!(
        binary.result.as_ref().unwrap(),
        "a\u{fffd}b",
        "non-UTF-8 output is kept, lossily"
    );
    let suicidal = &records(queue.as_ref(), &suicidal_ids).await[0];
    assert_eq!(suicidal.state, TaskState::DeadLettered);
    assert!(
        suicidal
            .history
            .iter()
            .all(|a| a.outcome == Some(AttemptOutcome::Crashed)),
        "{suicidal:?}"
    );
    assert!(
        suicidal
            .reason
            .as_deref()
            .unwrap()
            .contains("killed by SIGKILL"),
        "{:?}",
        suicidal.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grandchildren_that_exit_while_their_agent_runs_are_reaped() {
    let agent = r#"
import json, os, sys
print(json.dumps({"type": "ready"}), flush=True)
for line in sys.stdin:
    task = json.loads(line)
    os.system("sleep 3 & echo $! >> sleeps.pids")
    print(json.dumps({"type": "result", "id": task["id"], "output": os.getpid()}), flush=True)
"#;
    let fleet = Fleet::new("");
    std::fs::write(fleet.path("spawner.py"), agent).unwrap();
    std::fs::write(
        &fleet.config_path,
        "[store]\npath = \"fleet.db\"\n[http]\nlisten = \"127.0.0.1:0\"\n[agents.spawner]\ncommand = [\"python3\", \"spawner.py\"]\n",
    )
    .unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (batch, _) = numbered_tasks("spawner", 5, "spawn");
    queue.submit(batch).await.unwrap();
    wait_until(Duration::from_secs(20), "the tasks to finish", || async {
        finished(queue.as_ref()).await >= 5
    })
    .await;
    // The sleeps were orphaned (their shell exited) and came to the daemon
    // (this process), a child subreaper: while they sleep, it is their
    // parent.
    let own = std::process::id();
    let pids: Vec<u32> = std::fs::read_to_string(fleet.path("sleeps.pids"))
        .unwrap()
        .lines()
        .map(|pid| pid.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 5, "{pids:?}");
    assert!(
        pids.iter().any(|pid| parent_of(*pid) == Some(own)),
        "an orphaned sleep is the daemon's child: {:?}",
        pids.iter().map(|pid| parent_of(*pid)).collect::<Vec<_>>()
    );
    // Once they exit, the memory sampler reaps them within a second or
    // so: gone from /proc (a zombie stays there until reaped).
    wait_until(
        Duration::from_secs(15),
        "orphaned sleeps to be reaped",
        || async { pids.iter().all(|pid| parent_of(*pid).is_none()) },
    )
    .await;
    daemon.stop().await;
}

/// A persistent replica that dies while a process it started holds its
/// stdout is a crash at once (its task released, the replica restarted),
/// not a silence noticed at the progress timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_exits_while_a_helper_holds_its_stdout_is_a_crash() {
    let agent = r#"
import json, os, subprocess, sys
print(json.dumps({"type": "ready"}), flush=True)
for line in sys.stdin:
    task = json.loads(line)
    if task["attempt"] == 1:
        subprocess.Popen(["sleep", "60"])
        os._exit(3)
    print(json.dumps({"type": "result", "id": task["id"], "output": "done"}), flush=True)
"#;
    let fleet = Fleet::new("");
    std::fs::write(fleet.path("leaver.py"), agent).unwrap();
    std::fs::write(
        &fleet.config_path,
        "[store]\npath = \"fleet.db\"\n[http]\nlisten = \"127.0.0.1:0\"\n[agents.leaver]\ncommand = [\"python3\", \"leaver.py\"]\ntimeouts = { progress_timeout = \"60s\" }\n",
    )
    .unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let (batch, ids) = numbered_tasks("leaver", 1, "leave");
    queue.submit(batch).await.unwrap();
    wait_until(Duration::from_secs(20), "the task to finish", || async {
        finished(queue.as_ref()).await >= 1
    })
    .await;
    daemon.stop().await;
    let task = &records(queue.as_ref(), &ids).await[0];
    assert_eq!(task.state, TaskState::Completed, "{task:?}");
    assert_eq!(task.history[0].outcome, Some(AttemptOutcome::Crashed));
    assert!(
        task.history[0]
            .detail
            .as_deref()
            .unwrap()
            .contains("exit code 3"),
        "{:?}",
        task.history[0].detail
    );
}

/// The parent of process `pid`, while it exists (a zombie included).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_too_big_for_argv_is_dead_lettered_not_retried_forever() {
    let fleet = Fleet::new(
        r#"
[agents.echo]
mode = "oneshot"
command = ["echo", "{payload.text}"]
restart = { max_restarts = 2 }
"#,
    );
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    // One argument over Linux's 128 KiB limit: the task cannot start.
    let big = NewTask {
        id: "big".into(),
        agent: "echo".into(),
        priority: Priority::Normal,
        payload: json!({"text": "x".repeat(200 * 1024)}),
    };
    let small = NewTask {
        id: "small".into(),
        agent: "echo".into(),
        priority: Priority::Normal,
        payload: json!({"text": "fine"}),
    };
    queue.submit(vec![big, small]).await.unwrap();
    wait_until(Duration::from_secs(20), "both tasks to finish", || async {
        finished(queue.as_ref()).await >= 2
    })
    .await;
    let agent = daemon.agents()[0].status();
    daemon.stop().await;
    let big = queue.get("big").await.unwrap().unwrap();
    assert_eq!(big.state, TaskState::DeadLettered);
    assert!(
        big.reason.as_deref().unwrap().contains("cannot start"),
        "{:?}",
        big.reason
    );
    assert_eq!(
        queue.get("small").await.unwrap().unwrap().state,
        TaskState::Completed
    );
    assert_eq!(
        agent.state,
        AgentState::Running,
        "the agent is not blamed: {agent:?}"
    );
}
