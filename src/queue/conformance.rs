//! The queue conformance suite: the behaviour every [`TaskQueue`] backend
//! must show, written once against the trait and run against each backend
//! (`tests/queue_sqlite.rs`, and the JetStream backend's tests).
//!
//! Each check takes a fresh, empty queue whose limits are
//! [`CONFORMANCE_MAX_PAYLOAD`] for payloads and results, and panics with a
//! message on the first broken promise. Timing uses real time with short
//! waits so that backends with server-side timers can run it too.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::{
    AckOutcome, AttemptEnd, AttemptOutcome, LeaseKey, LeaseRequest, ListFilter, NewTask, Priority,
    QueueError, Resolution, Selection, TaskQueue, TaskState,
};

/// Payload and result limit the suite expects its queues to be opened with.
pub const CONFORMANCE_MAX_PAYLOAD: usize = 64 * 1024;

/// The limits the suite expects its queues to be opened with.
pub fn limits() -> super::Limits {
    super::Limits {
        dedup_window: Duration::from_secs(3600),
        retention: Duration::from_secs(7200),
        max_payload_bytes: CONFORMANCE_MAX_PAYLOAD,
        max_result_bytes: CONFORMANCE_MAX_PAYLOAD,
    }
}

const AGENT: &str = "conformance";

fn task(id: &str, priority: Priority, payload: Value) -> NewTask {
    NewTask {
        id: id.to_string(),
        agent: AGENT.to_string(),
        priority,
        payload,
    }
}

fn request(max: usize) -> LeaseRequest {
    LeaseRequest {
        agent: AGENT.to_string(),
        max,
        lease_for: Duration::from_secs(30),
        owner: "conformance".into(),
        max_deliver: 5,
        lowest: Priority::Low,
    }
}

fn end(outcome: AttemptOutcome) -> AttemptEnd {
    AttemptEnd::new(outcome, Some("conformance/0".into()), "conformance")
}

async fn state_of<Q: TaskQueue + ?Sized>(queue: &Q, id: &str) -> TaskState {
    queue.get(id).await.unwrap().expect("task exists").state
}

/// Runs every check, each on a queue from `make`.
pub async fn run_all<Q, F, Fut>(make: F)
where
    Q: TaskQueue,
    F: Fn() -> Fut,
    Fut: Future<Output = Q>,
{
    submit_lease_ack(&make().await).await;
    dedup_by_id(&make().await).await;
    priority_then_fifo(&make().await).await;
    nak_delays_and_checkpoint_survives(&make().await).await;
    stale_outcomes_are_refused(&make().await).await;
    expired_leases_return_and_exhaust(&make().await).await;
    term_replay_purge(&make().await).await;
    release_does_not_charge(&make().await).await;
    progress_extends_lease(&make().await).await;
    requeue_running_after_crash(&make().await).await;
    lease_wait_wakes_on_submit(Arc::new(make().await)).await;
    bad_input_is_rejected_whole(&make().await).await;
    dropped_lease_is_released(&make().await).await;
    concurrent_leases_never_share(Arc::new(make().await)).await;
    counts_per_agent(&make().await).await;
    reroute_hands_a_task_to_another_agent(&make().await).await;
    handovers_beyond_the_free_ones_are_charged(&make().await).await;
    escalations_wait_for_a_human(&make().await).await;
    validation_reports_reach_the_next_attempt(&make().await).await;
    cancel_ends_queued_and_running_tasks(&make().await).await;
    a_purged_id_submitted_again_is_a_new_task(&make().await).await;
    listings_pick_newest_first(&make().await).await;
}

/// A listing holds the newest tasks first, of the state and agent asked
/// for, at most `limit` of them.
pub async fn listings_pick_newest_first<Q: TaskQueue>(queue: &Q) {
    // One at a time: each task is newer than the one before.
    for id in ["l1", "l2", "l3", "l4", "l5"] {
        queue
            .submit(vec![task(id, Priority::Normal, json!({}))])
            .await
            .unwrap();
    }
    let other = NewTask {
        agent: "other".into(),
        ..task("o1", Priority::Normal, json!({}))
    };
    queue.submit(vec![other]).await.unwrap();
    let mut leases = queue.lease(&request(2), Duration::ZERO).await.unwrap();
    assert_eq!(leases.len(), 2);
    let dead = leases.iter().position(|lease| lease.key.task_id == "l1");
    let mut dead = leases.remove(dead.expect("the oldest task is leased first"));
    queue
        .term(&dead.key, "bad input", end(AttemptOutcome::Error))
        .await
        .unwrap();
    dead.settle();
    let ids = |state: Option<TaskState>, agent: Option<&str>, limit: usize| {
        let filter = ListFilter {
            state,
            agent: agent.map(str::to_string),
            limit,
        };
        async move {
            let listed = queue.list(&filter).await.unwrap();
            listed.into_iter().map(|task| task.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(
        ids(Some(TaskState::Queued), None, 10).await,
        ["o1", "l5", "l4", "l3"]
    );
    assert_eq!(
        ids(Some(TaskState::Queued), Some(AGENT), 2).await,
        ["l5", "l4"]
    );
    assert_eq!(
        ids(Some(TaskState::Queued), Some("other"), 10).await,
        ["o1"]
    );
    assert_eq!(ids(Some(TaskState::Running), None, 10).await, ["l2"]);
    assert_eq!(ids(Some(TaskState::DeadLettered), None, 10).await, ["l1"]);
    assert_eq!(ids(None, None, 3).await, ["o1", "l5", "l4"]);
    assert_eq!(
        ids(None, Some(AGENT), 10).await,
        ["l5", "l4", "l3", "l2", "l1"]
    );
    let mut running = leases.pop().expect("l2 is held");
    queue
        .ack(&running.key, &json!({}), end(AttemptOutcome::Completed))
        .await
        .unwrap();
    running.settle();
    assert_eq!(ids(Some(TaskState::Completed), None, 10).await, ["l2"]);
    assert!(ids(Some(TaskState::Running), None, 10).await.is_empty());
    assert!(
        ids(Some(TaskState::Queued), Some("nobody"), 10)
            .await
            .is_empty()
    );
}

/// A dead letter purged and its id submitted again is a new task, whose
/// attempts count from 1 again: a late outcome of the old task's attempt
/// must not settle the new one.
pub async fn a_purged_id_submitted_again_is_a_new_task<Q: TaskQueue>(queue: &Q) {
    queue
        .submit(vec![task("life", Priority::Normal, json!("old"))])
        .await
        .unwrap();
    let mut old = queue.lease(&request(1), Duration::ZERO).await.unwrap();
    assert_eq!(old[0].key.attempt, 1);
    assert!(queue.cancel("life", "superseded").await.unwrap());
    assert_eq!(
        queue
            .purge(&Selection::Ids(vec!["life".into()]))
            .await
            .unwrap(),
        1
    );
    queue
        .submit(vec![task("life", Priority::Normal, json!("new"))])
        .await
        .unwrap();
    let mut new = queue
        .lease(&request(1), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(new.len(), 1);
    assert_eq!((new[0].key.attempt, &new[0].payload), (1, &json!("new")));
    let old_key = old[0].key.clone();
    let late_ack_is_stale = || async {
        let late = queue
            .ack(
                &old_key,
                &json!("old result"),
                end(AttemptOutcome::Completed),
            )
            .await;
        assert!(
            matches!(late, Err(QueueError::StaleLease { .. })),
            "{late:?}"
        );
    };
    late_ack_is_stale().await;
    old[0].settle();
    assert_eq!(
        queue
            .ack(
                &new[0].key,
                &json!("new result"),
                end(AttemptOutcome::Completed)
            )
            .await
            .unwrap(),
        AckOutcome::Completed
    );
    new[0].settle();
    // With the new task completed by its attempt 1, the old task's attempt
    // 1 is still stale, not a repeat of the completing ack.
    late_ack_is_stale().await;
    let record = queue.get("life").await.unwrap().unwrap();
    assert_eq!(record.result, Some(json!("new result")));
}

/// A queued or running task can be cancelled (a dead letter with the
/// reason; the running attempt's late outcome is stale); an ended one
/// cannot.
pub async fn cancel_ends_queued_and_running_tasks<Q: TaskQueue>(queue: &Q) {
    queue
        .submit(vec![
            task("c-queued", Priority::Normal, json!({})),
            task("c-running", Priority::High, json!({})),
            task("c-done", Priority::Low, json!({})),
        ])
        .await
        .unwrap();
    let mut running = queue.lease(&request(1), Duration::ZERO).await.unwrap();
    assert_eq!(running[0].key.task_id, "c-running");
    assert!(queue.cancel("c-queued", "parent gone").await.unwrap());
    assert!(queue.cancel("c-running", "parent gone").await.unwrap());
    let late = queue
        .ack(&running[0].key, &json!(1), end(AttemptOutcome::Completed))
        .await;
    assert!(
        matches!(late, Err(QueueError::StaleLease { .. })),
        "{late:?}"
    );
    running[0].settle();
    for id in ["c-queued", "c-running"] {
        let record = queue.get(id).await.unwrap().unwrap();
        assert_eq!(record.state, TaskState::DeadLettered, "{id}");
        assert_eq!(record.reason.as_deref(), Some("parent gone"));
    }
    let record = queue.get("c-running").await.unwrap().unwrap();
    assert_eq!(
        record.history.last().unwrap().outcome,
        Some(AttemptOutcome::Cancelled)
    );
    let mut done = queue
        .lease(&request(1), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        done[0].key.task_id, "c-done",
        "cancelled tasks are not leased"
    );
    queue
        .ack(&done[0].key, &json!(1), end(AttemptOutcome::Completed))
        .await
        .unwrap();
    done[0].settle();
    assert!(!queue.cancel("c-done", "too late").await.unwrap());
    assert!(matches!(
        queue.cancel("nope", "x").await,
        Err(QueueError::NotFound { .. })
    ));
}

/// The report of an attempt whose result failed validation is the next
/// attempt's feedback; other outcomes leave none.
pub async fn validation_reports_reach_the_next_attempt<Q: TaskQueue>(queue: &Q) {
    queue
        .submit(vec![task("v1", Priority::Normal, json!({}))])
        .await
        .unwrap();
    let mut first = queue.lease(&request(1), Duration::ZERO).await.unwrap();
    assert_eq!(first[0].feedback, None);
    let report = "check \"tests\" failed: 3 tests failed";
    queue
        .nak(
            &first[0].key,
            Duration::ZERO,
            AttemptEnd::new(AttemptOutcome::ValidationFailed, None, report),
        )
        .await
        .unwrap();
    first[0].settle();
    let mut second = queue
        .lease(&request(1), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(second[0].feedback.as_deref(), Some(report));
    queue
        .nak(&second[0].key, Duration::ZERO, end(AttemptOutcome::Error))
        .await
        .unwrap();
    second[0].settle();
    let mut third = queue
        .lease(&request(1), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(third[0].feedback, None, "an error leaves no feedback");
    third[0].settle();
}

/// A rerouted task is queued for the other agent, its attempt not charged;
/// the first agent sees it no more.
pub async fn reroute_hands_a_task_to_another_agent<Q: TaskQueue>(queue: &Q) {
    queue
        .submit(vec![task("rr1", Priority::High, json!({"n": 1}))])
        .await
        .unwrap();
    let mut leases = queue.lease(&request(1), Duration::ZERO).await.unwrap();
    queue
        .progress(
            &leases[0].key,
            Duration::from_secs(30),
            Some(&json!({"step": 3})),
        )
        .await
        .unwrap();
    queue
        .reroute(&leases[0].key, "fallback", end(AttemptOutcome::Rerouted))
        .await
        .unwrap();
    leases[0].settle();
    let record = queue.get("rr1").await.unwrap().unwrap();
    assert_eq!(
        (record.agent.as_str(), record.state, record.charged_attempts),
        ("fallback", TaskState::Queued, 0)
    );
    assert_eq!(
        record.checkpoint, None,
        "another agent's checkpoint is dropped"
    );
    assert_eq!(record.history[0].outcome, Some(AttemptOutcome::Rerouted));
    assert!(
        queue
            .lease(&request(1), Duration::ZERO)
            .await
            .unwrap()
            .is_empty(),
        "the first agent no longer gets it"
    );
    let mut other = request(1);
    other.agent = "fallback".into();
    let mut leases = queue.lease(&other, Duration::from_secs(2)).await.unwrap();
    assert_eq!(leases.len(), 1, "the fallback agent gets it");
    assert_eq!(
        (
            leases[0].key.attempt,
            leases[0].priority,
            &leases[0].payload
        ),
        (2, Priority::High, &json!({"n": 1}))
    );
    queue
        .ack(
            &leases[0].key,
            &json!("done"),
            end(AttemptOutcome::Completed),
        )
        .await
        .unwrap();
    leases[0].settle();
    assert_eq!(state_of(queue, "rr1").await, TaskState::Completed);
    // A stale lease cannot reroute.
    let stale = LeaseKey {
        attempt: 1,
        ..leases[0].key.clone()
    };
    assert!(matches!(
        queue
            .reroute(&stale, "fallback", end(AttemptOutcome::Rerouted))
            .await,
        Err(QueueError::StaleLease { .. })
    ));
}

/// A task handed back and forth (a cycle of escalations and fallbacks)
/// is charged for each hand-over beyond the free ones, so it ends.
pub async fn handovers_beyond_the_free_ones_are_charged<Q: TaskQueue>(queue: &Q) {
    queue
        .submit(vec![task("bounce", Priority::Normal, json!({}))])
        .await
        .unwrap();
    let agents = [AGENT, "fallback"];
    let mut handovers: u32 = 0;
    loop {
        let mut asking = request(1);
        asking.agent = agents[handovers as usize % 2].to_string();
        let mut leases = queue.lease(&asking, Duration::from_secs(2)).await.unwrap();
        if leases.is_empty() {
            break;
        }
        queue
            .reroute(
                &leases[0].key,
                agents[(handovers as usize + 1) % 2],
                end(AttemptOutcome::Rerouted),
            )
            .await
            .unwrap();
        leases[0].settle();
        handovers += 1;
        let record = queue.get("bounce").await.unwrap().unwrap();
        let charged = handovers.saturating_sub(super::FREE_HANDOVERS);
        assert_eq!(record.charged_attempts, charged, "{record:?}");
        assert!(handovers < 100, "never ends: {record:?}");
    }
    // request(1) allows 5 attempts: the 5th charged hand-over used them up.
    let record = queue.get("bounce").await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::DeadLettered, "{record:?}");
    assert_eq!(handovers, super::FREE_HANDOVERS + 5);
}

/// An escalated task is terminal until a human resolves it: retried,
/// completed with a given result, or dropped to the dead letters.
pub async fn escalations_wait_for_a_human<Q: TaskQueue>(queue: &Q) {
    let ids = ["e1", "e2", "e3", "e5"];
    queue
        .submit(
            ids.iter()
                .map(|id| task(id, Priority::Normal, json!({})))
                .collect(),
        )
        .await
        .unwrap();
    let mut leases = queue.lease(&request(4), Duration::ZERO).await.unwrap();
    assert_eq!(leases.len(), 4);
    for lease in &mut leases {
        queue
            .escalate(&lease.key, "breaker open", end(AttemptOutcome::Escalated))
            .await
            .unwrap();
        lease.settle();
    }
    let record = queue.get("e1").await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Escalated);
    assert_eq!(record.reason.as_deref(), Some("breaker open"));
    assert!(record.state.is_terminal());
    let listed = queue
        .list(&ListFilter {
            state: Some(TaskState::Escalated),
            agent: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 4);
    let everything = queue
        .list(&ListFilter {
            state: None,
            agent: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(everything.len(), 4, "a listing of every state has them");
    let counts = queue.counts().await.unwrap();
    assert_eq!(counts[0].1.escalated, 4);
    assert!(
        queue
            .lease(&request(3), Duration::ZERO)
            .await
            .unwrap()
            .is_empty(),
        "escalated tasks are not leased"
    );
    // Not escalated: refused, nothing changed.
    queue
        .submit(vec![task("e4", Priority::Normal, json!({}))])
        .await
        .unwrap();
    assert!(matches!(
        queue.resolve("e4", &Resolution::Retry).await,
        Err(QueueError::WrongState { .. })
    ));
    assert!(matches!(
        queue.resolve("nope", &Resolution::Retry).await,
        Err(QueueError::NotFound { .. })
    ));
    queue
        .resolve("e2", &Resolution::Complete(json!({"by": "human"})))
        .await
        .unwrap();
    let done = queue.get("e2").await.unwrap().unwrap();
    assert_eq!(
        (done.state, done.result),
        (TaskState::Completed, Some(json!({"by": "human"})))
    );
    queue.resolve("e3", &Resolution::Drop).await.unwrap();
    let dropped = queue.get("e3").await.unwrap().unwrap();
    assert_eq!(dropped.state, TaskState::DeadLettered);
    assert!(
        dropped.reason.as_deref().unwrap().contains("breaker open"),
        "{dropped:?}"
    );
    // Cancelled (its parent was): no longer waiting for anyone.
    assert!(queue.cancel("e5", "parent gone").await.unwrap());
    let cancelled = queue.get("e5").await.unwrap().unwrap();
    assert_eq!(
        (cancelled.state, cancelled.reason.as_deref()),
        (TaskState::DeadLettered, Some("parent gone"))
    );
    assert!(matches!(
        queue.resolve("e5", &Resolution::Retry).await,
        Err(QueueError::WrongState { .. })
    ));
    queue.resolve("e1", &Resolution::Retry).await.unwrap();
    assert!(matches!(
        queue.resolve("e1", &Resolution::Retry).await,
        Err(QueueError::WrongState { .. })
    ));
    let mut leases = queue
        .lease(&request(3), Duration::from_secs(2))
        .await
        .unwrap();
    let ids: HashSet<String> = leases.iter().map(|l| l.key.task_id.clone()).collect();
    assert!(ids.contains("e1"), "retried task is leased again: {ids:?}");
    for lease in &mut leases {
        queue
            .ack(&lease.key, &json!(1), end(AttemptOutcome::Completed))
            .await
            .unwrap();
        lease.settle();
    }
    let record = queue.get("e1").await.unwrap().unwrap();
    assert_eq!(
        (record.state, record.charged_attempts),
        (TaskState::Completed, 1)
    );
}

/// Submit, lease, ack: the result and a one-attempt history are kept.
pub async fn submit_lease_ack<Q: TaskQueue>(queue: &Q) {
    let receipts = queue
        .submit(vec![task("a1", Priority::Normal, json!({"n": 1}))])
        .await
        .unwrap();
    assert_eq!(receipts.len(), 1);
    assert!(!receipts[0].duplicate);
    assert_eq!(state_of(queue, "a1").await, TaskState::Queued);
    let mut leases = queue.lease(&request(10), Duration::ZERO).await.unwrap();
    assert_eq!(leases.len(), 1, "one task leased");
    let lease = &mut leases[0];
    assert_eq!(lease.key.task_id, "a1");
    assert_eq!(lease.key.attempt, 1);
    assert_eq!(lease.payload, json!({"n": 1}));
    let running = queue.get("a1").await.unwrap().unwrap();
    assert_eq!(running.state, TaskState::Running);
    assert_eq!(running.history.len(), 1, "the running attempt shows");
    assert_eq!(
        (running.history[0].number, running.history[0].outcome),
        (1, None)
    );
    let outcome = queue
        .ack(
            &lease.key,
            &json!({"ok": true}),
            end(AttemptOutcome::Completed),
        )
        .await
        .unwrap();
    lease.settle();
    assert_eq!(outcome, AckOutcome::Completed);
    let record = queue.get("a1").await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Completed);
    assert_eq!(record.result, Some(json!({"ok": true})));
    assert_eq!(record.history.len(), 1);
    assert_eq!(record.history[0].outcome, Some(AttemptOutcome::Completed));
    assert!(
        queue
            .lease(&request(10), Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );
}

/// The same id twice stores one task, whatever the second payload.
pub async fn dedup_by_id<Q: TaskQueue>(queue: &Q) {
    queue
        .submit(vec![task("d1", Priority::Normal, json!(1))])
        .await
        .unwrap();
    let again = queue
        .submit(vec![
            task("d1", Priority::High, json!(2)),
            task("d2", Priority::Normal, json!(3)),
            task("d2", Priority::Normal, json!(4)),
        ])
        .await
        .unwrap();
    assert!(again[0].duplicate && !again[1].duplicate && again[2].duplicate);
    assert_eq!(queue.get("d1").await.unwrap().unwrap().payload, json!(1));
    let mut leases = queue.lease(&request(10), Duration::ZERO).await.unwrap();
    assert_eq!(leases.len(), 2, "two distinct tasks");
    for lease in &mut leases {
        queue
            .ack(&lease.key, &json!(null), end(AttemptOutcome::Completed))
            .await
            .unwrap();
        lease.settle();
    }
    // Completed within the window: still a duplicate.
    let late = queue
        .submit(vec![task("d1", Priority::Normal, json!(5))])
        .await
        .unwrap();
    assert!(late[0].duplicate);
    assert_eq!(late[0].state, TaskState::Completed);
}

/// Higher priority first, first-in first-out within a priority.
pub async fn priority_then_fifo<Q: TaskQueue>(queue: &Q) {
    let order = [
        ("p-low", Priority::Low),
        ("p-normal-1", Priority::Normal),
        ("p-critical", Priority::Critical),
        ("p-normal-2", Priority::Normal),
        ("p-high", Priority::High),
    ];
    for (id, priority) in order {
        queue
            .submit(vec![task(id, priority, json!(id))])
            .await
            .unwrap();
    }
    // Degradation: only `high` and more urgent.
    let mut urgent = request(10);
    urgent.lowest = Priority::High;
    let mut leases = queue.lease(&urgent, Duration::ZERO).await.unwrap();
    let ids: Vec<&str> = leases.iter().map(|l| l.key.task_id.as_str()).collect();
    assert_eq!(ids, ["p-critical", "p-high"], "only urgent tasks leased");
    for lease in &mut leases {
        queue
            .release(&lease.key, end(AttemptOutcome::Released))
            .await
            .unwrap();
        lease.settle();
    }
    let mut seen = Vec::new();
    for _ in 0..order.len() {
        let mut leases = queue.lease(&request(1), Duration::ZERO).await.unwrap();
        assert_eq!(leases.len(), 1);
        seen.push(leases[0].key.task_id.clone());
        queue
            .ack(&leases[0].key, &json!(null), end(AttemptOutcome::Completed))
            .await
            .unwrap();
        leases[0].settle();
    }
    assert_eq!(
        seen,
        ["p-critical", "p-high", "p-normal-1", "p-normal-2", "p-low"]
    );
}

/// A nak with a delay hides the task for that long; the checkpoint of the
/// failed attempt reaches the next one.
pub async fn nak_delays_and_checkpoint_survives<Q: TaskQueue>(queue: &Q) {
    queue
        .submit(vec![task("n1", Priority::Normal, json!({}))])
        .await
        .unwrap();
    let mut first = queue.lease(&request(1), Duration::ZERO).await.unwrap();
    let key = first[0].key.clone();
    queue
        .progress(&key, Duration::from_secs(30), Some(&json!({"step": 3})))
        .await
        .unwrap();
    // Before the nak: the delay runs from when the backend takes it.
    let started = std::time::Instant::now();
    queue
        .nak(&key, Duration::from_millis(400), end(AttemptOutcome::Error))
        .await
        .unwrap();
    first[0].settle();
    assert_eq!(state_of(queue, "n1").await, TaskState::Queued);
    assert!(
        queue
            .lease(&request(1), Duration::ZERO)
            .await
            .unwrap()
            .is_empty(),
        "a delayed task is not leased before its delay"
    );
    let mut second = queue
        .lease(&request(1), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(second.len(), 1, "the delayed task comes back");
    assert!(
        started.elapsed() >= Duration::from_millis(390),
        "not before its delay (a clock reading may round down a millisecond)"
    );
    assert_eq!(second[0].key.attempt, 2);
    assert_eq!(second[0].checkpoint, Some(json!({"step": 3})));
    queue
        .ack(&second[0].key, &json!(1), end(AttemptOutcome::Completed))
        .await
        .unwrap();
    second[0].settle();
    let record = queue.get("n1").await.unwrap().unwrap();
    let outcomes: Vec<_> = record.history.iter().map(|a| a.outcome).collect();
    assert_eq!(
        outcomes,
        [Some(AttemptOutcome::Error), Some(AttemptOutcome::Completed)]
    );
}

/// An outcome for an older delivery changes nothing; a repeated ack of the
/// completing delivery is accepted once.
pub async fn stale_outcomes_are_refused<Q: TaskQueue>(queue: &Q) {
    queue
        .submit(vec![task("s1", Priority::Normal, json!({}))])
        .await
        .unwrap();
    let mut first = queue.lease(&request(1), Duration::ZERO).await.unwrap();
    let old = first[0].key.clone();
    queue
        .nak(&old, Duration::ZERO, end(AttemptOutcome::Crashed))
        .await
        .unwrap();
    first[0].settle();
    let mut second = queue.lease(&request(1), Duration::ZERO).await.unwrap();
    let new = second[0].key.clone();
    assert_eq!(new.attempt, 2);
    let stale = queue
        .ack(&old, &json!("late"), end(AttemptOutcome::Completed))
        .await;
    assert!(
        matches!(stale, Err(QueueError::StaleLease { .. })),
        "{stale:?}"
    );
    let stale_nak = queue
        .nak(&old, Duration::ZERO, end(AttemptOutcome::Error))
        .await;
    assert!(matches!(stale_nak, Err(QueueError::StaleLease { .. })));
    assert_eq!(
        queue
            .ack(&new, &json!("fresh"), end(AttemptOutcome::Completed))
            .await
            .unwrap(),
        AckOutcome::Completed
    );
    second[0].settle();
    assert_eq!(
        queue
            .ack(&new, &json!("again"), end(AttemptOutcome::Completed))
            .await
            .unwrap(),
        AckOutcome::AlreadyCompleted
    );
    let record = queue.get("s1").await.unwrap().unwrap();
    assert_eq!(record.result, Some(json!("fresh")));
    let completions = record
        .history
        .iter()
        .filter(|a| a.outcome == Some(AttemptOutcome::Completed))
        .count();
    assert_eq!(completions, 1, "completed once");
    let missing = queue
        .ack(
            &LeaseKey {
                task_id: "nope".into(),
                attempt: 1,
                life: 0,
            },
            &json!(1),
            end(AttemptOutcome::Completed),
        )
        .await;
    assert!(matches!(missing, Err(QueueError::NotFound { .. })));
}

/// An expired lease returns the task; once `max_deliver` attempts are used
/// the task is dead-lettered with a reason instead of leased.
pub async fn expired_leases_return_and_exhaust<Q: TaskQueue>(queue: &Q) {
    queue
        .submit(vec![task("e1", Priority::Normal, json!({}))])
        .await
        .unwrap();
    let mut short = request(1);
    short.lease_for = Duration::from_millis(100);
    short.max_deliver = 2;
    for attempt in 1..=2 {
        let mut leases = queue.lease(&short, Duration::ZERO).await.unwrap();
        assert_eq!(leases.len(), 1, "attempt {attempt} leased");
        assert_eq!(leases[0].key.attempt, attempt);
        leases[0].settle();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(queue.expire_leases().await.unwrap(), 1);
        assert_eq!(state_of(queue, "e1").await, TaskState::Queued);
    }
    assert!(
        queue
            .lease(&short, Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );
    let record = queue.get("e1").await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::DeadLettered);
    let reason = record.reason.unwrap();
    assert!(
        reason.contains("max_deliver = 2") && reason.contains("lease_expired"),
        "{reason}"
    );
    assert_eq!(record.history.len(), 2);
}

/// Term dead-letters with a reason; replay brings the task back with a
/// fresh budget; purge deletes.
pub async fn term_replay_purge<Q: TaskQueue>(queue: &Q) {
    queue
        .submit(vec![
            task("t1", Priority::Normal, json!(1)),
            task("t2", Priority::Normal, json!(2)),
        ])
        .await
        .unwrap();
    let mut leases = queue.lease(&request(2), Duration::ZERO).await.unwrap();
    for lease in &mut leases {
        queue
            .term(
                &lease.key,
                "bad input: no field x",
                end(AttemptOutcome::Error),
            )
            .await
            .unwrap();
        lease.settle();
    }
    let dead = queue
        .list(&ListFilter {
            state: Some(TaskState::DeadLettered),
            agent: None,
            limit: 100,
        })
        .await
        .unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].reason.as_deref(), Some("bad input: no field x"));
    let wrong = queue
        .replay(&Selection::Ids(vec!["t1".into(), "nope".into()]))
        .await;
    assert!(
        matches!(wrong, Err(QueueError::NotFound { .. })),
        "{wrong:?}"
    );
    assert_eq!(
        state_of(queue, "t1").await,
        TaskState::DeadLettered,
        "nothing half-applied"
    );
    assert_eq!(
        queue
            .replay(&Selection::Ids(vec!["t1".into(), "t1".into()]))
            .await
            .unwrap(),
        1,
        "an id named twice is replayed once"
    );
    let record = queue.get("t1").await.unwrap().unwrap();
    assert_eq!(
        (record.state, record.replays, record.reason),
        (TaskState::Queued, 1, None)
    );
    let mut again = queue.lease(&request(1), Duration::ZERO).await.unwrap();
    assert_eq!(again[0].key.attempt, 2, "history continues after a replay");
    assert_eq!(again[0].charged, 1, "the attempt budget starts afresh");
    let not_dead = queue.purge(&Selection::Ids(vec!["t1".into()])).await;
    assert!(
        matches!(not_dead, Err(QueueError::WrongState { .. })),
        "{not_dead:?}"
    );
    queue
        .ack(&again[0].key, &json!(1), end(AttemptOutcome::Completed))
        .await
        .unwrap();
    again[0].settle();
    assert_eq!(queue.purge(&Selection::All).await.unwrap(), 1);
    assert!(queue.get("t2").await.unwrap().is_none());
    assert!(queue.get("t1").await.unwrap().is_some());
}

/// A released task is not charged an attempt.
pub async fn release_does_not_charge<Q: TaskQueue>(queue: &Q) {
    queue
        .submit(vec![task("r1", Priority::Normal, json!({}))])
        .await
        .unwrap();
    let mut once = request(1);
    once.max_deliver = 1;
    for _ in 0..3 {
        let mut leases = queue.lease(&once, Duration::ZERO).await.unwrap();
        assert_eq!(leases.len(), 1, "released tasks stay leasable");
        queue
            .release(&leases[0].key, end(AttemptOutcome::Released))
            .await
            .unwrap();
        leases[0].settle();
    }
    let record = queue.get("r1").await.unwrap().unwrap();
    assert_eq!(
        (record.state, record.charged_attempts, record.attempts),
        (TaskState::Queued, 0, 3)
    );
}

/// Progress moves the lease deadline.
pub async fn progress_extends_lease<Q: TaskQueue>(queue: &Q) {
    queue
        .submit(vec![task("g1", Priority::Normal, json!({}))])
        .await
        .unwrap();
    let mut short = request(1);
    short.lease_for = Duration::from_millis(300);
    let mut leases = queue.lease(&short, Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    queue
        .progress(&leases[0].key, Duration::from_secs(10), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        queue.expire_leases().await.unwrap(),
        0,
        "progress extended the lease"
    );
    assert_eq!(state_of(queue, "g1").await, TaskState::Running);
    queue
        .ack(&leases[0].key, &json!(1), end(AttemptOutcome::Completed))
        .await
        .unwrap();
    leases[0].settle();
}

/// After a daemon crash every running task goes back to the queue.
pub async fn requeue_running_after_crash<Q: TaskQueue>(queue: &Q) {
    let tasks = (0..3)
        .map(|n| task(&format!("c{n}"), Priority::Normal, json!(n)))
        .collect();
    queue.submit(tasks).await.unwrap();
    let mut leases = queue.lease(&request(3), Duration::ZERO).await.unwrap();
    assert_eq!(leases.len(), 3);
    for lease in &mut leases {
        lease.settle();
    }
    assert_eq!(queue.requeue_running().await.unwrap(), 3);
    for n in 0..3 {
        let record = queue.get(&format!("c{n}")).await.unwrap().unwrap();
        assert_eq!(record.state, TaskState::Queued);
        assert_eq!(
            record.history[0].outcome,
            Some(AttemptOutcome::DaemonRestart)
        );
    }
}

/// A waiting lease returns soon after a task is submitted.
pub async fn lease_wait_wakes_on_submit<Q: TaskQueue>(queue: Arc<Q>) {
    let waiter = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let leases = queue
                .lease(&request(1), Duration::from_secs(10))
                .await
                .unwrap();
            (leases, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    queue
        .submit(vec![task("w1", Priority::Normal, json!({}))])
        .await
        .unwrap();
    let (mut leases, waited) = waiter.await.unwrap();
    assert_eq!(leases.len(), 1);
    assert!(
        waited < Duration::from_secs(5),
        "woken by the submit, not the timeout"
    );
    leases[0].settle();
}

/// An oversized payload or a bad id rejects the whole batch.
pub async fn bad_input_is_rejected_whole<Q: TaskQueue>(queue: &Q) {
    let big = Value::String("x".repeat(CONFORMANCE_MAX_PAYLOAD + 1));
    let result = queue
        .submit(vec![
            task("ok1", Priority::Normal, json!(1)),
            task("big", Priority::Normal, big),
        ])
        .await;
    match result {
        Err(QueueError::Invalid(message)) => {
            // Named by its place too: ids are often generated.
            assert!(
                message.contains("max_payload_bytes") && message.contains("tasks[1]"),
                "{message}"
            );
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    let bad_id = queue
        .submit(vec![task("has space", Priority::Normal, json!(1))])
        .await;
    assert!(matches!(bad_id, Err(QueueError::Invalid(_))));
    assert!(
        queue.get("ok1").await.unwrap().is_none(),
        "nothing half-applied"
    );
    queue
        .submit(vec![task("big-result", Priority::Normal, json!(1))])
        .await
        .unwrap();
    let mut leases = queue.lease(&request(1), Duration::ZERO).await.unwrap();
    let big_result = Value::String("y".repeat(CONFORMANCE_MAX_PAYLOAD + 1));
    let refused = queue
        .ack(&leases[0].key, &big_result, end(AttemptOutcome::Completed))
        .await;
    assert!(
        matches!(refused, Err(QueueError::Invalid(_))),
        "{refused:?}"
    );
    assert_eq!(state_of(queue, "big-result").await, TaskState::Running);
    queue
        .term(
            &leases[0].key,
            "result too large",
            end(AttemptOutcome::Rejected),
        )
        .await
        .unwrap();
    leases[0].settle();
}

/// A lease dropped without an outcome goes back to the queue uncharged.
pub async fn dropped_lease_is_released<Q: TaskQueue>(queue: &Q) {
    queue
        .submit(vec![task("x1", Priority::Normal, json!({}))])
        .await
        .unwrap();
    let leases = queue.lease(&request(1), Duration::ZERO).await.unwrap();
    assert_eq!(leases.len(), 1);
    drop(leases);
    queue.flush_released().await;
    let record = queue.get("x1").await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Queued, "released by the flush");
    assert_eq!(record.charged_attempts, 0, "a release is not charged");
}

/// Many concurrent leasers: every task is handed out and completed exactly
/// once.
pub async fn concurrent_leases_never_share<Q: TaskQueue>(queue: Arc<Q>) {
    const TASKS: usize = 300;
    let tasks = (0..TASKS)
        .map(|n| task(&format!("m{n}"), Priority::Normal, json!(n)))
        .collect();
    queue.submit(tasks).await.unwrap();
    let mut workers = Vec::new();
    for _ in 0..8 {
        let queue = queue.clone();
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let mut leases = queue.lease(&request(2), Duration::ZERO).await.unwrap();
                if leases.is_empty() {
                    return done;
                }
                for lease in &mut leases {
                    let outcome = queue
                        .ack(&lease.key, &json!("ok"), end(AttemptOutcome::Completed))
                        .await
                        .unwrap();
                    assert_eq!(outcome, AckOutcome::Completed);
                    lease.settle();
                    done.push(lease.key.task_id.clone());
                }
            }
        }));
    }
    let mut seen = HashSet::new();
    for worker in workers {
        for id in worker.await.unwrap() {
            assert!(seen.insert(id.clone()), "{id} handed out twice");
        }
    }
    assert_eq!(seen.len(), TASKS);
}

/// Counts are kept per agent and state, whatever the mix.
pub async fn counts_per_agent<Q: TaskQueue>(queue: &Q) {
    let for_agent = |id: &str, agent: &str| NewTask {
        id: id.into(),
        agent: agent.into(),
        priority: Priority::Normal,
        payload: json!(1),
    };
    queue
        .submit(vec![
            task("k1", Priority::Normal, json!(1)),
            task("k2", Priority::Normal, json!(1)),
            task("k3", Priority::Normal, json!(1)),
            for_agent("o1", "other"),
            for_agent("o2", "other"),
            for_agent("z1", "zeta"),
        ])
        .await
        .unwrap();
    // conformance: one completed, one dead, one running.
    let mut leases = queue.lease(&request(3), Duration::ZERO).await.unwrap();
    queue
        .ack(&leases[0].key, &json!(1), end(AttemptOutcome::Completed))
        .await
        .unwrap();
    queue
        .term(&leases[1].key, "no", end(AttemptOutcome::Error))
        .await
        .unwrap();
    // other: one completed, one queued.
    let mut other = request(1);
    other.agent = "other".into();
    let mut theirs = queue.lease(&other, Duration::ZERO).await.unwrap();
    queue
        .ack(&theirs[0].key, &json!(1), end(AttemptOutcome::Completed))
        .await
        .unwrap();
    let counts = queue.counts().await.unwrap();
    let of = |agent: &str| {
        counts
            .iter()
            .filter(|(name, _)| name == agent)
            .map(|(_, counts)| counts.clone())
            .collect::<Vec<_>>()
    };
    let mine = of(AGENT);
    assert_eq!(mine.len(), 1, "one entry per agent: {counts:?}");
    assert_eq!(
        (
            mine[0].queued,
            mine[0].running,
            mine[0].completed,
            mine[0].dead_lettered
        ),
        (0, 1, 1, 1)
    );
    let theirs_counts = of("other");
    assert_eq!(theirs_counts.len(), 1, "{counts:?}");
    assert_eq!(
        (theirs_counts[0].queued, theirs_counts[0].completed),
        (1, 1)
    );
    assert_eq!(of("zeta")[0].queued, 1);
    // Counted again after more changes (on a broker, from what was
    // written since the first count): the running one completes, the dead
    // letter is purged, a new task is queued.
    queue
        .ack(&leases[2].key, &json!(1), end(AttemptOutcome::Completed))
        .await
        .unwrap();
    let dead = leases[1].key.task_id.clone();
    assert_eq!(queue.purge(&Selection::Ids(vec![dead])).await.unwrap(), 1);
    queue
        .submit(vec![task("k4", Priority::Normal, json!(1))])
        .await
        .unwrap();
    let counts = queue.counts().await.unwrap();
    let mine: Vec<_> = counts.iter().filter(|(name, _)| name == AGENT).collect();
    assert_eq!(mine.len(), 1, "one entry per agent: {counts:?}");
    assert_eq!(
        (
            mine[0].1.queued,
            mine[0].1.running,
            mine[0].1.completed,
            mine[0].1.dead_lettered
        ),
        (1, 0, 2, 0),
        "{counts:?}"
    );
    for lease in leases.iter_mut().chain(theirs.iter_mut()) {
        lease.settle();
    }
}
