//! Agent-to-agent messages with real processes, on both backends: a
//! manager fans out to two specialists, waits and combines their answers;
//! its replica is killed while waiting, the task is retried on another
//! replica, and each specialist child ran exactly once. A child whose
//! agent's breaker is open follows its fallback; a send that would wait
//! on itself is refused.

mod support;

use std::time::Duration;

use flotilla::queue::{AttemptOutcome, NewTask, Priority, TaskState};
use serde_json::{Value, json};
use support::nats::NatsServer;
use support::*;

/// Sends one waiting message per agent in `payload.to`, then answers with
/// every reply.
const MANAGER: &str = r#"
import json, sys
def out(m):
    print(json.dumps(m), flush=True)
out({"type": "ready", "protocol": 1})
pending = {}
for line in sys.stdin:
    m = json.loads(line)
    kind = m.get("type")
    if kind == "shutdown":
        break
    if kind == "task":
        p = m["payload"]
        for to in p.get("forget", []):
            out({"type": "send", "id": m["id"], "to": to, "key": to, "payload": {"asked_by": m["id"]}})
        targets = p["to"]
        for to in targets:
            out({"type": "send", "id": m["id"], "to": to, "key": to,
                 "payload": {"asked_by": m["id"]}, "wait": True, "timeout_ms": 30000})
        if p.get("give_up"):
            out({"type": "error", "id": m["id"], "message": "gave up", "retryable": False})
        else:
            pending[m["id"]] = {"want": len(targets), "got": {}}
    elif kind == "reply" and m["id"] in pending:
        p = pending[m["id"]]
        p["got"][m["key"]] = {k: m.get(k) for k in ("status", "result", "error", "task")}
        if len(p["got"]) == p["want"]:
            out({"type": "result", "id": m["id"], "output": {"answers": p["got"]}})
            del pending[m["id"]]
"#;

fn fleet(broker: Option<&NatsServer>) -> Fleet {
    let broker = broker.map_or_else(String::new, |server| {
        format!("[broker]\nurl = \"{}\"\nack_wait = \"5s\"\n\n", server.url)
    });
    let fleet = Fleet::new(&format!(
        r#"{broker}
[agents.manager]
command = ["python3", "manager.py"]
replicas = {{ min = 2 }}
retry = {{ backoff = ["10ms"] }}
breaker = {{ enabled = false }}

[agents.backend]
command = {slow}

[agents.frontend]
command = {slow}

[agents.design]
command = ["sh", "-c", "echo design is down >&2; exit 3"]
mode = "oneshot"
breaker = {{ failure_threshold = 1, recovery_timeout = "1h" }}
fallback = ["generalist"]

[agents.generalist]
command = {quick}
"#,
        slow = example_agent(&["--work-ms", "1500"]),
        quick = example_agent(&["--work-ms", "1"]),
    ));
    std::fs::write(fleet.path("manager.py"), MANAGER).unwrap();
    fleet
}

fn task(id: &str, agent: &str, payload: Value) -> NewTask {
    NewTask {
        id: id.into(),
        agent: agent.into(),
        priority: Priority::Normal,
        payload,
    }
}

async fn scenario(fleet: &Fleet) {
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    let store = daemon.store().clone();

    // Fan out, then kill the manager's replica while it waits.
    queue
        .submit(vec![task(
            "feature-1",
            "manager",
            json!({"to": ["backend", "frontend"]}),
        )])
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "two children", || async {
        flotilla::delegate::tree(&store, "feature-1")
            .await
            .unwrap()
            .children
            .len()
            == 2
    })
    .await;
    let manager = daemon
        .agents()
        .iter()
        .find(|agent| agent.name == "manager")
        .unwrap();
    let pid = manager
        .status()
        .replicas
        .iter()
        .find(|replica| replica.tasks.contains(&"feature-1".to_string()))
        .and_then(|replica| replica.pid)
        .expect("a replica holds feature-1");
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(Duration::from_secs(30), "feature-1 to complete", || async {
        queue.get("feature-1").await.unwrap().unwrap().state == TaskState::Completed
    })
    .await;
    let parent = queue.get("feature-1").await.unwrap().unwrap();
    assert_eq!(
        parent.history[0].outcome,
        Some(AttemptOutcome::Crashed),
        "{parent:?}"
    );
    let answers = &parent.result.clone().unwrap()["answers"];
    for specialist in ["backend", "frontend"] {
        assert_eq!(answers[specialist]["status"], "completed", "{answers}");
        let child = format!("feature-1/{specialist}");
        assert_eq!(answers[specialist]["task"], child.as_str());
        let record = queue.get(&child).await.unwrap().unwrap();
        assert_eq!(record.state, TaskState::Completed);
        assert_eq!(record.history.len(), 1, "{child} ran once: {record:?}");
        assert_eq!(record.payload, json!({"asked_by": "feature-1"}));
    }
    let tree = flotilla::delegate::tree(&store, "feature-1/backend")
        .await
        .unwrap();
    let link = tree.parent.expect("the child knows its parent");
    assert_eq!(
        (link.parent.as_str(), link.from.as_str(), link.depth),
        ("feature-1", "manager", 1)
    );

    // A child whose agent's breaker is open goes to its fallback; a send
    // that would wait on its own agent is refused.
    queue
        .submit(vec![task("trip", "design", json!({}))])
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "design's breaker to open",
        || async {
            daemon
                .agents()
                .iter()
                .find(|agent| agent.name == "design")
                .unwrap()
                .status()
                .breaker
                .state
                == Some(flotilla::breaker::BreakerState::Open)
        },
    )
    .await;
    queue
        .submit(vec![task(
            "feature-2",
            "manager",
            json!({"to": ["design", "manager"]}),
        )])
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "feature-2 to complete", || async {
        queue.get("feature-2").await.unwrap().unwrap().state == TaskState::Completed
    })
    .await;
    let answers = queue
        .get("feature-2")
        .await
        .unwrap()
        .unwrap()
        .result
        .unwrap()["answers"]
        .clone();
    assert_eq!(answers["design"]["status"], "completed", "{answers}");
    let design = queue.get("feature-2/design").await.unwrap().unwrap();
    assert_eq!(design.agent, "generalist", "followed design's fallback");
    assert_eq!(answers["manager"]["status"], "refused", "{answers}");
    assert!(
        answers["manager"]["error"]
            .as_str()
            .unwrap()
            .contains("cycle"),
        "{answers}"
    );
    // A parent dead-lettered cancels the child it waited for; the one it
    // sent without waiting goes on.
    queue
        .submit(vec![task(
            "feature-3",
            "manager",
            json!({"to": ["frontend"], "forget": ["backend"], "give_up": true}),
        )])
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "the waited-for child to be cancelled",
        || async {
            queue
                .get("feature-3/frontend")
                .await
                .unwrap()
                .is_some_and(|child| child.state == TaskState::DeadLettered)
        },
    )
    .await;
    let cancelled = queue.get("feature-3/frontend").await.unwrap().unwrap();
    assert!(
        cancelled
            .reason
            .as_deref()
            .unwrap()
            .contains("its parent feature-3 was dead-lettered"),
        "{cancelled:?}"
    );
    assert_eq!(
        queue.get("feature-3").await.unwrap().unwrap().state,
        TaskState::DeadLettered
    );
    wait_until(
        Duration::from_secs(20),
        "the fire-and-forget child",
        || async {
            queue
                .get("feature-3/backend")
                .await
                .unwrap()
                .is_some_and(|child| child.state == TaskState::Completed)
        },
    )
    .await;

    // Cancelling a waiting parent cancels its child too.
    queue
        .submit(vec![task(
            "feature-4",
            "manager",
            json!({"to": ["frontend"]}),
        )])
        .await
        .unwrap();
    // Listed among the parent's children (stored just after the child).
    wait_until(Duration::from_secs(20), "feature-4's child", || async {
        flotilla::delegate::tree(&store, "feature-4")
            .await
            .unwrap()
            .children
            .len()
            == 1
    })
    .await;
    let cancelled = flotilla::api::cancel(&store, "feature-4", "not needed any more")
        .await
        .unwrap();
    assert_eq!(cancelled.children, 1);
    for id in ["feature-4", "feature-4/frontend"] {
        let record = queue.get(id).await.unwrap().unwrap();
        assert_eq!(record.state, TaskState::DeadLettered, "{record:?}");
    }
    assert!(matches!(
        flotilla::api::cancel(&store, "feature-4", "again").await,
        Err(flotilla::queue::QueueError::WrongState { .. })
    ));

    // The traffic is counted once per child, however often it was sent
    // (feature-1's children were sent twice: before and after the crash).
    // A send is counted just after its child is stored.
    let series = [
        "agent_messages_sent_total{agent=\"manager\",destination=\"backend\",type=\"default\"} 2\n",
        "agent_messages_received_total{agent=\"frontend\",source=\"manager\",type=\"default\"} 3\n",
        "agent_messages_sent_total{agent=\"manager\",destination=\"design\",type=\"default\"} 1\n",
    ];
    let url = format!("http://{}/metrics", daemon.http_address().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let metrics = reqwest::get(&url).await.unwrap().text().await.unwrap();
        if series.iter().all(|series| metrics.contains(series))
            || std::time::Instant::now() > deadline
        {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for series in series {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
    assert!(
        metrics.contains("agent_message_latency_seconds_count{agent=\"manager\"}"),
        "{metrics}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_fans_out_survives_a_crash_and_each_child_runs_once() {
    let fleet = fleet(None);
    scenario(&fleet).await;
    the_tree_is_shown(&fleet);
}

/// The CLI shows the tree, from the parent and from a child, and refuses
/// to cancel a finished parent.
fn the_tree_is_shown(fleet: &Fleet) {
    let refused = fleet.cli(&["tasks", "cancel", "feature-1"]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains(
            "is completed; only a task that is queued, running or escalated can be cancelled"
        ),
        "{refused:?}"
    );
    let shown = fleet.cli(&["tasks", "show", "feature-1"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("children:")
            && text.contains("feature-1/backend")
            && text.contains("waited for"),
        "{text}"
    );
    let shown = fleet.cli(&["tasks", "show", "feature-1/backend"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("parent:   feature-1 (completed; sent by manager with key \"backend\""),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegation_works_the_same_on_jetstream() {
    let Some(server) = NatsServer::start("delegation_works_the_same_on_jetstream") else {
        return;
    };
    let fleet = fleet(Some(&server));
    scenario(&fleet).await;
    the_tree_is_shown(&fleet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_manager_combines_its_specialists_answers() {
    let manager = repo_root().join("examples/agents/manager.py");
    let fleet = Fleet::new(&format!(
        r#"
[agents.manager]
command = ["python3", {manager:?}]

[agents.backend]
command = {quick}

[agents.frontend]
command = {quick}
"#,
        manager = manager.display().to_string(),
        quick = example_agent(&["--work-ms", "1"]),
    ));
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    queue
        .submit(vec![
            task(
                "site",
                "manager",
                json!({"ask": {"backend": {"n": 1}, "frontend": {"n": 2}}}),
            ),
            task("bad", "manager", json!({})),
        ])
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "both tasks to end", || async {
        finished(queue.as_ref()).await >= 4
    })
    .await;
    let site = queue.get("site").await.unwrap().unwrap();
    assert_eq!(site.state, TaskState::Completed, "{site:?}");
    let answers = &site.result.unwrap()["answers"];
    assert_eq!(answers["backend"]["status"], "completed", "{answers}");
    assert_eq!(answers["frontend"]["status"], "completed", "{answers}");
    let bad = queue.get("bad").await.unwrap().unwrap();
    assert_eq!(bad.state, TaskState::DeadLettered);
    daemon.stop().await;
}

/// A parent whose attempts are used up by lost leases (its daemon killed
/// with `kill -9`, `max_deliver = 1`) is dead-lettered by the queue when
/// it is given out again, not by a replica: the daemon still cancels the
/// child it waited for.
async fn a_parent_dead_lettered_by_a_lost_lease_cancels_its_children(broker: Option<&NatsServer>) {
    let broker = broker.map_or_else(String::new, |server| {
        format!("[broker]\nurl = \"{}\"\nack_wait = \"2s\"\n\n", server.url)
    });
    let fleet = Fleet::new(&format!(
        r#"{broker}
[agents.manager]
command = ["python3", "manager.py"]
retry = {{ max_deliver = 1 }}

[agents.backend]
command = {slow}
"#,
        slow = example_agent(&["--work-ms", "60000"]),
    ));
    std::fs::write(fleet.path("manager.py"), MANAGER).unwrap();
    let mut first = fleet.spawn_daemon();
    let store = fleet.store().await;
    let queue = store.queue();
    queue
        .submit(vec![task(
            "feature-9",
            "manager",
            json!({"to": ["backend"]}),
        )])
        .await
        .unwrap();
    let child = "feature-9/backend";
    // Running, and linked to its parent (stored just after the child: a
    // kill in between would leave a child its parent never knew of).
    wait_until(Duration::from_secs(20), "the child running", || async {
        matches!(queue.get(child).await, Ok(Some(task)) if task.state == TaskState::Running)
            && flotilla::delegate::tree(&store, "feature-9")
                .await
                .is_ok_and(|tree| tree.children.len() == 1)
    })
    .await;
    signal(&first, nix::sys::signal::Signal::SIGKILL);
    wait_exit(&mut first, Duration::from_secs(10));
    let daemon = fleet.start().await;
    wait_until(Duration::from_secs(30), "the parent dead-lettered", || async {
        matches!(queue.get("feature-9").await, Ok(Some(task)) if task.state == TaskState::DeadLettered)
    })
    .await;
    // A cancelled child becomes a dead letter that says why.
    wait_until(Duration::from_secs(10), "the child cancelled", || async {
        matches!(queue.get(child).await, Ok(Some(task)) if task.state == TaskState::DeadLettered)
    })
    .await;
    let parent = queue.get("feature-9").await.unwrap().unwrap();
    assert!(
        parent
            .reason
            .as_deref()
            .is_some_and(|reason| reason.contains("max_deliver")),
        "{parent:?}"
    );
    let reason = queue.get(child).await.unwrap().unwrap().reason;
    assert!(
        reason
            .as_deref()
            .is_some_and(|reason| reason.contains("its parent feature-9 was dead-lettered")),
        "{reason:?}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_parent_cancels_its_children() {
    a_parent_dead_lettered_by_a_lost_lease_cancels_its_children(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_parent_cancels_its_children_on_jetstream() {
    let Some(server) = NatsServer::start("a_lost_parent_cancels_its_children_on_jetstream") else {
        return;
    };
    a_parent_dead_lettered_by_a_lost_lease_cancels_its_children(Some(&server)).await;
}

/// A waited-for child whose parent became a dead letter without its
/// children being cancelled (a daemon killed in between) is cancelled
/// when leased, not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_of_a_dead_parent_is_cancelled_not_run() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.manager]
command = ["true"]
mode = "oneshot"

[agents.backend]
command = {}
"#,
        example_agent(&["--work-ms", "1"]),
    ));
    let store = fleet.store().await;
    let queue = store.queue();
    queue
        .submit(vec![task("feature-3", "manager", json!({}))])
        .await
        .unwrap();
    let sent = flotilla::delegate::send(
        &store,
        &flotilla::config::DelegationConfig::default(),
        &["manager".to_string(), "backend".to_string()],
        &flotilla::delegate::Send {
            parent: "feature-3".into(),
            parent_priority: Priority::Normal,
            from: "manager".into(),
            to: "backend".into(),
            key: "api".into(),
            payload: json!({}),
            priority: None,
            wait: true,
            timeout: Some(Duration::from_secs(60)),
        },
        flotilla::clock::system().now_ms(),
    )
    .await
    .unwrap();
    // The parent ends; the cancelling of its children never happens.
    assert!(queue.cancel("feature-3", "gone").await.unwrap());
    let daemon = fleet.start().await;
    wait_until(Duration::from_secs(20), "the child cancelled", || async {
        matches!(queue.get(&sent.child).await, Ok(Some(task)) if task.state == TaskState::DeadLettered)
    })
    .await;
    let child = queue.get(&sent.child).await.unwrap().unwrap();
    assert_eq!(
        child.reason.as_deref(),
        Some("cancelled: its parent feature-3 was dead-lettered")
    );
    assert_eq!(
        child.history.last().and_then(|attempt| attempt.outcome),
        Some(AttemptOutcome::Cancelled),
        "{child:?}"
    );
    assert_eq!(child.result, None, "it never ran");
    daemon.stop().await;
}

/// Sends key `once` twice with a wait, then waits on a slower key; answers
/// with how many replies `once` got.
const DOUBLER: &str = r#"
import json, sys
def out(m):
    print(json.dumps(m), flush=True)
out({"type": "ready", "protocol": 1})
count = 0
for line in sys.stdin:
    m = json.loads(line)
    kind = m.get("type")
    if kind == "shutdown":
        break
    if kind == "task":
        for _ in range(2):
            out({"type": "send", "id": m["id"], "to": "quick", "key": "once",
                 "payload": {}, "wait": True, "timeout_ms": 30000})
        out({"type": "send", "id": m["id"], "to": "slow", "key": "later",
             "payload": {}, "wait": True, "timeout_ms": 30000})
    elif kind == "reply" and m["key"] == "once":
        count += 1
    elif kind == "reply" and m["key"] == "later":
        out({"type": "result", "id": m["id"], "output": {"once": count}})
"#;

/// A key sent again while its wait runs gets no second waiter: one reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sent_twice_while_waiting_is_answered_once() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.doubler]
command = ["python3", "doubler.py"]

[agents.quick]
command = {quick}

[agents.slow]
command = {slow}
"#,
        quick = example_agent(&["--work-ms", "1"]),
        slow = example_agent(&["--work-ms", "1500"]),
    ));
    std::fs::write(fleet.path("doubler.py"), DOUBLER).unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    queue
        .submit(vec![task("d1", "doubler", json!({}))])
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "d1 to complete", || async {
        queue.get("d1").await.unwrap().unwrap().state == TaskState::Completed
    })
    .await;
    let record = queue.get("d1").await.unwrap().unwrap();
    assert_eq!(record.result, Some(json!({"once": 1})), "{record:?}");
    daemon.stop().await;
}

/// Attempt 1 sends a waited child with a short timeout and fails at once;
/// attempt 2 sends the same key with a long one and answers with the
/// reply it got.
const RETRIER: &str = r#"
import json, sys
def out(m):
    print(json.dumps(m), flush=True)
out({"type": "ready", "protocol": 1})
for line in sys.stdin:
    m = json.loads(line)
    kind = m.get("type")
    if kind == "shutdown":
        break
    if kind == "task":
        short = m["attempt"] == 1
        out({"type": "send", "id": m["id"], "to": "slow", "key": "work", "payload": {},
             "wait": True, "timeout_ms": 700 if short else 30000})
        if short:
            out({"type": "error", "id": m["id"], "message": "try again", "retryable": True})
    elif kind == "reply":
        out({"type": "result", "id": m["id"], "output": {"status": m["status"]}})
"#;

/// A wait ends with the attempt that asked: the first attempt's short
/// wait must not answer the retry's own wait on the same key with a
/// `timeout` while the child is still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempts_wait_does_not_answer_the_retry() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.retrier]
command = ["python3", "retrier.py"]
retry = {{ backoff = ["10ms"] }}
breaker = {{ enabled = false }}

[agents.slow]
command = {slow}
"#,
        slow = example_agent(&["--work-ms", "2000"]),
    ));
    std::fs::write(fleet.path("retrier.py"), RETRIER).unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    queue
        .submit(vec![task("r1", "retrier", json!({}))])
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "r1 to complete", || async {
        queue.get("r1").await.unwrap().unwrap().state == TaskState::Completed
    })
    .await;
    let record = queue.get("r1").await.unwrap().unwrap();
    assert_eq!(record.attempts, 2, "{record:?}");
    assert_eq!(
        record.result,
        Some(json!({"status": "completed"})),
        "{record:?}"
    );
    daemon.stop().await;
}
