//! The queue conformance suite against the JetStream backend and a real
//! nats-server (started by the test on a free port, with a temporary store).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flotilla::clock;
use flotilla::config::{BrokerConfig, HumanDuration};
use flotilla::queue::conformance;
use flotilla::queue::jetstream::{self, ConnectionStats, JetStreamQueue, Settings};
use flotilla::queue::{
    AttemptEnd, AttemptOutcome, LeaseRequest, ListFilter, NewTask, Priority, QueueError, Selection,
    TaskQueue, TaskState,
};
use futures_util::StreamExt as _;
use serde_json::json;
use support::nats::NatsServer;

async fn open(url: &str, namespace: &str) -> JetStreamQueue {
    open_as(url, namespace, "conformance", Duration::from_secs(30)).await
}

async fn open_as(url: &str, namespace: &str, owner: &str, ack_wait: Duration) -> JetStreamQueue {
    open_with(url, namespace, owner, ack_wait, clock::system()).await
}

async fn open_with(
    url: &str,
    namespace: &str,
    owner: &str,
    ack_wait: Duration,
    clock: clock::SharedClock,
) -> JetStreamQueue {
    open_config(
        BrokerConfig {
            url: url.to_string(),
            namespace: namespace.to_string(),
            ack_wait: HumanDuration::millis(ack_wait.as_millis() as u64),
            ..BrokerConfig::default()
        },
        owner,
        clock,
    )
    .await
}

async fn open_config(
    config: BrokerConfig,
    owner: &str,
    clock: clock::SharedClock,
) -> JetStreamQueue {
    let stats = Arc::new(ConnectionStats::default());
    let client = jetstream::connect(&config, std::path::Path::new("."), "test", stats.clone())
        .await
        .unwrap();
    let settings = Settings {
        limits: conformance::limits(),
        owner: owner.into(),
    };
    JetStreamQueue::open(client, stats, &config, settings, clock)
        .await
        .unwrap()
}

/// A queue in `namespace` owned by a daemon of that name, on a clock whose
/// wall reading the test sets (and whose steady reading it moves on).
async fn open_settable(
    url: &str,
    namespace: &str,
) -> (JetStreamQueue, Arc<support::SettableClock>) {
    let wall = Arc::new(support::SettableClock::default());
    let queue = open_with(
        url,
        namespace,
        namespace,
        Duration::from_secs(30),
        wall.clone(),
    )
    .await;
    (queue, wall)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_backend_conforms() {
    let Some(server) = NatsServer::start("jetstream_backend_conforms") else {
        return;
    };
    let counter = AtomicUsize::new(0);
    conformance::run_all(|| {
        // A namespace per check: fresh streams and buckets on one server.
        let namespace = format!("conf{}", counter.fetch_add(1, Ordering::SeqCst));
        let url = server.url.clone();
        async move { open(&url, &namespace).await }
    })
    .await;
}

fn task(id: &str) -> NewTask {
    NewTask {
        id: id.into(),
        agent: "worker".into(),
        priority: Priority::Normal,
        payload: json!({"id": id}),
    }
}

fn request(owner: &str, lease_for: Duration) -> LeaseRequest {
    LeaseRequest {
        agent: "worker".into(),
        max: 1,
        lease_for,
        owner: owner.into(),
        max_deliver: 5,
        lowest: Priority::Low,
    }
}

/// The subjects holding a message in `bucket`'s stream, sorted: every key
/// with a value or a marker.
async fn subjects_of(bucket: &async_nats::jetstream::kv::Store) -> Vec<String> {
    bucket
        .stream
        .info_with_subjects(format!("{}>", bucket.prefix))
        .await
        .unwrap()
        .map(|subject| subject.unwrap().0)
        .collect::<std::collections::BTreeSet<_>>()
        .await
        .into_iter()
        .collect()
}

/// Leases up to `max` of the worker's tasks as `owner`, without waiting.
async fn lease_up_to(
    queue: &JetStreamQueue,
    owner: &str,
    max: usize,
) -> Vec<flotilla::queue::Lease> {
    queue
        .lease(
            &LeaseRequest {
                max,
                ..request(owner, Duration::from_secs(30))
            },
            Duration::ZERO,
        )
        .await
        .unwrap()
}

/// The worker's queued and completed counts in `counts`, if it has any.
fn queued_and_completed(counts: Vec<(String, flotilla::queue::StateCounts)>) -> Option<(u64, u64)> {
    counts
        .into_iter()
        .find(|(agent, _)| agent == "worker")
        .map(|(_, counts)| (counts.queued, counts.completed))
}

/// Completes `lease` with `result`.
async fn complete(
    queue: &JetStreamQueue,
    lease: &mut flotilla::queue::Lease,
    result: serde_json::Value,
) {
    queue
        .ack(&lease.key, &result, end(AttemptOutcome::Completed))
        .await
        .unwrap();
    lease.settle();
}

fn end(outcome: AttemptOutcome) -> AttemptEnd {
    AttemptEnd::new(outcome, Some("worker/0".into()), "test")
}

/// A completed task submitted again (past the dedup window) gets a message
/// id the broker has not seen, even when the next one was used by a
/// publication that lost a race (a reroute, a replay, an escalation's
/// retry): it runs, rather than sitting queued with no message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubmitted_task_skips_a_used_message_id() {
    let Some(server) = NatsServer::start("a_resubmitted_task_skips_a_used_message_id") else {
        return;
    };
    let config = BrokerConfig {
        url: server.url.clone(),
        namespace: "resub".into(),
        ..BrokerConfig::default()
    };
    let stats = Arc::new(ConnectionStats::default());
    let client = jetstream::connect(&config, std::path::Path::new("."), "test", stats.clone())
        .await
        .unwrap();
    let settings = Settings {
        limits: flotilla::queue::Limits {
            dedup_window: Duration::from_millis(1),
            ..conformance::limits()
        },
        owner: "resub".into(),
    };
    let queue = JetStreamQueue::open(client, stats, &config, settings, clock::system())
        .await
        .unwrap();
    queue.submit(vec![task("r1")]).await.unwrap();
    let mut first = queue
        .lease(&request("resub", Duration::from_secs(30)), Duration::ZERO)
        .await
        .unwrap();
    complete(&queue, &mut first[0], json!(1)).await;
    // The id of the task's next generation, used by a publication that
    // lost its race (its message is dropped when claimed).
    let raw = async_nats::jetstream::new(async_nats::connect(&server.url).await.unwrap());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "r1#1");
    raw.publish_with_headers(
        format!("resub.tasks.worker.{}", Priority::Normal.rank()),
        headers,
        "not a task".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let none = queue
        .lease(
            &request("resub", Duration::from_secs(30)),
            Duration::from_millis(500),
        )
        .await
        .unwrap();
    assert!(none.is_empty(), "the stray message is dropped");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let receipts = queue.submit(vec![task("r1")]).await.unwrap();
    assert!(!receipts[0].duplicate, "{receipts:?}");
    let mut again = queue
        .lease(
            &request("resub", Duration::from_secs(30)),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "the resubmitted task has a message");
    assert_eq!(again[0].key.task_id, "r1");
    complete(&queue, &mut again[0], json!(2)).await;
}

/// A daemon's periodic readers share one count, taken at most so long
/// ago: counting reads every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_counts_are_shared_for_a_while() {
    let Some(server) = NatsServer::start("periodic_counts_are_shared_for_a_while") else {
        return;
    };
    let queue = open(&server.url, "counted").await;
    let queued = |counts: Vec<(String, flotilla::queue::StateCounts)>| {
        counts.iter().map(|(_, counts)| counts.queued).sum::<u64>()
    };
    queue.submit(vec![task("c1")]).await.unwrap();
    let minute = Duration::from_secs(60);
    assert_eq!(queued(queue.recent_counts(minute).await.unwrap()), 1);
    queue.submit(vec![task("c2")]).await.unwrap();
    assert_eq!(
        queued(queue.recent_counts(minute).await.unwrap()),
        1,
        "the count of a moment ago"
    );
    assert_eq!(
        queued(queue.recent_counts(Duration::ZERO).await.unwrap()),
        2
    );
    assert_eq!(queued(queue.counts().await.unwrap()), 2, "counts are fresh");
}

/// Leases the one task there is and dead-letters it.
async fn kill(queue: &JetStreamQueue) {
    let mut leases = queue
        .lease(
            &request("dlqs", Duration::from_secs(30)),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(leases.len(), 1);
    queue
        .term(&leases[0].key, "broken", end(AttemptOutcome::Error))
        .await
        .unwrap();
    leases[0].settle();
}

/// The dead-letter stream keeps one copy per dead letter: a replay
/// deletes the copies it found, not one written since by the task dying
/// again; a purge deletes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_copies_follow_their_tasks() {
    let Some(server) = NatsServer::start("dead_letter_copies_follow_their_tasks") else {
        return;
    };
    let queue = open(&server.url, "dlqs").await;
    let raw = async_nats::jetstream::new(async_nats::connect(&server.url).await.unwrap());
    let copies = || async {
        let stream = raw.get_stream("DLQS_DLQ").await.unwrap();
        let info = stream
            .info_with_subjects("dlqs.dlq.worker.d1")
            .await
            .unwrap();
        use futures_util::TryStreamExt as _;
        let subjects: Vec<(String, usize)> = info.try_collect().await.unwrap();
        subjects.iter().map(|(_, count)| *count).sum::<usize>()
    };
    queue.submit(vec![task("d1")]).await.unwrap();
    kill(&queue).await;
    assert_eq!(copies().await, 1);
    // Replayed, and dead again before anything else: one copy, the new.
    let replayed = queue
        .replay(&Selection::Ids(vec!["d1".into()]))
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    assert_eq!(copies().await, 0);
    kill(&queue).await;
    assert_eq!(copies().await, 1);
    queue
        .purge(&Selection::Ids(vec!["d1".into()]))
        .await
        .unwrap();
    assert_eq!(copies().await, 0);
}

/// Two daemons on one stream: when the holder stops extending its lease
/// (it died, or its lease ran out), the broker hands the task to the other
/// after ack_wait, the first attempt ends as lease_expired, and the late
/// holder can no longer settle it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_moves_to_another_daemon_when_its_holder_stops_extending() {
    let Some(server) = NatsServer::start("a_task_moves_to_another_daemon") else {
        return;
    };
    let ack_wait = Duration::from_secs(1);
    let a = open_as(&server.url, "move", "a", ack_wait).await;
    let b = open_as(&server.url, "move", "b", ack_wait).await;
    a.submit(vec![task("m1")]).await.unwrap();
    let mut held = a
        .lease(&request("a", Duration::from_millis(200)), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    held[0].settle();
    let started = std::time::Instant::now();
    let mut moved = b
        .lease(
            &request("b", Duration::from_secs(30)),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(moved.len(), 1, "redelivered to the other daemon");
    assert_eq!(moved[0].key.attempt, 2);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "within about ack_wait"
    );
    let late = a
        .ack(&held[0].key, &json!("late"), end(AttemptOutcome::Completed))
        .await;
    assert!(
        matches!(late, Err(QueueError::StaleLease { .. })),
        "{late:?}"
    );
    complete(&b, &mut moved[0], json!("ok")).await;
    let record = b.get("m1").await.unwrap().unwrap();
    assert_eq!(record.state, TaskState::Completed);
    assert_eq!(record.result, Some(json!("ok")));
    assert_eq!(
        record.history[0].outcome,
        Some(AttemptOutcome::LeaseExpired)
    );
    assert_eq!(record.history[1].outcome, Some(AttemptOutcome::Completed));
}

/// A purged dead letter's id can be used again at once: the broker's
/// message-id window does not swallow the new task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_id_can_be_submitted_again() {
    let Some(server) = NatsServer::start("a_purged_id_can_be_submitted_again") else {
        return;
    };
    let queue = open(&server.url, "purge").await;
    queue
        .put_control("journal.p1", &json!([{"attempt": 1}]))
        .await
        .unwrap();
    queue.submit(vec![task("p1")]).await.unwrap();
    let mut leases = queue
        .lease(
            &request("conformance", Duration::from_secs(30)),
            Duration::ZERO,
        )
        .await
        .unwrap();
    queue
        .term(&leases[0].key, "bad", end(AttemptOutcome::Error))
        .await
        .unwrap();
    leases[0].settle();
    assert_eq!(queue.purge(&Selection::All).await.unwrap(), 1);
    assert!(queue.get("p1").await.unwrap().is_none());
    assert_eq!(
        queue.get_control("journal.p1").await.unwrap(),
        None,
        "the old task's journal goes with it"
    );
    // A message of the purged life left behind (say its +TERM was lost)
    // does not bring the task back.
    let client = async_nats::connect(&server.url).await.unwrap();
    let leftover = json!({
        "id": "p1", "agent": "worker", "priority": "normal", "life": 0,
        "generation": 0, "created_ms": 1, "payload": {"stale": true}
    });
    async_nats::jetstream::new(client)
        .publish("purge.tasks.worker.2", leftover.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let none = queue
        .lease(
            &request("conformance", Duration::from_secs(30)),
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert!(none.is_empty(), "the purged task stays purged");
    assert!(queue.get("p1").await.unwrap().is_none());
    let again = queue.submit(vec![task("p1")]).await.unwrap();
    assert!(!again[0].duplicate, "{again:?}");
    let mut leases = queue
        .lease(
            &request("conformance", Duration::from_secs(30)),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(leases.len(), 1, "the new task is leasable");
    assert_eq!(leases[0].payload, json!({"id": "p1"}), "the new payload");
    complete(&queue, &mut leases[0], json!(1)).await;
}

/// A task stored twice under one publication (a submit retried after the
/// broker's duplicate window, its first record write lost) runs under one
/// message: the second copy neither takes the task from its holder nor
/// runs it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_copy_of_a_task_message_does_not_take_the_task() {
    let Some(server) = NatsServer::start("a_second_copy_of_a_task_message") else {
        return;
    };
    let ack_wait = Duration::from_secs(30);
    let a = open_as(&server.url, "copy", "a", ack_wait).await;
    let b = open_as(&server.url, "copy", "b", ack_wait).await;
    a.submit(vec![task("c1")]).await.unwrap();
    let mut held = a
        .lease(&request("a", Duration::from_secs(30)), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    let copy = json!({
        "id": "c1", "agent": "worker", "priority": "normal", "life": 0,
        "generation": 0, "created_ms": 1, "payload": {"id": "c1"}
    });
    let client = async_nats::connect(&server.url).await.unwrap();
    async_nats::jetstream::new(client)
        .publish("copy.tasks.worker.2", copy.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let taken = b
        .lease(
            &request("b", Duration::from_secs(30)),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    assert!(
        taken.is_empty(),
        "the copy took the task: {:?}",
        taken.iter().map(|lease| &lease.key).collect::<Vec<_>>()
    );
    let outcome = a
        .ack(&held[0].key, &json!("done"), end(AttemptOutcome::Completed))
        .await
        .unwrap();
    held[0].settle();
    assert_eq!(outcome, flotilla::queue::AckOutcome::Completed);
    let record = a.get("c1").await.unwrap().unwrap();
    assert_eq!(record.attempts, 1, "{:?}", record.history);
    let later = b
        .lease(&request("b", Duration::from_secs(30)), Duration::ZERO)
        .await
        .unwrap();
    assert!(later.is_empty(), "nothing left to run");
}

/// A daemon times the leases it holds on the steady clock: setting the wall
/// clock forward ends no running task, and setting it back keeps no lease
/// past its time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_leases_ignore_steps_of_the_wall_clock() {
    let Some(server) = NatsServer::start("held_leases_ignore_steps_of_the_wall_clock") else {
        return;
    };
    let (queue, wall) = open_settable(&server.url, "steps").await;
    queue.submit(vec![task("s1")]).await.unwrap();
    let mut leases = queue
        .lease(&request("steps", Duration::from_secs(2)), Duration::ZERO)
        .await
        .unwrap();
    leases[0].settle();
    wall.set_wall(3_600_000);
    assert_eq!(queue.expire_leases().await.unwrap(), 0);
    let running = queue.get("s1").await.unwrap().unwrap();
    assert_eq!(running.state, TaskState::Running);
    // Back by two hours: the stored deadline is now an hour ahead.
    wall.set_wall(-7_200_000);
    wall.pass_steady(2_200);
    assert_eq!(queue.expire_leases().await.unwrap(), 1);
    let back = queue.get("s1").await.unwrap().unwrap();
    assert_eq!(back.state, TaskState::Queued);
    assert_eq!(back.history[0].outcome, Some(AttemptOutcome::LeaseExpired));
}

/// A daemon whose `broker.ack_wait` is longer than that of the consumer
/// it finds keeps its tasks alive by the consumer's from the first task
/// on: they are not handed to another daemon while they run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_tasks_are_kept_alive_by_a_shorter_consumer_ack_wait() {
    let Some(server) =
        NatsServer::start("held_tasks_are_kept_alive_by_a_shorter_consumer_ack_wait")
    else {
        return;
    };
    // The consumer is made by a daemon with a 1 s ack_wait.
    let first = open_as(&server.url, "short", "first", Duration::from_secs(1)).await;
    let none = first
        .lease(&request("first", Duration::from_secs(30)), Duration::ZERO)
        .await
        .unwrap();
    assert!(none.is_empty());
    let second = open_as(&server.url, "short", "second", Duration::from_secs(30)).await;
    second.submit(vec![task("k1")]).await.unwrap();
    let mut held = second
        .lease(&request("second", Duration::from_secs(30)), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    held[0].settle();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stolen = first
        .lease(&request("first", Duration::from_secs(30)), Duration::ZERO)
        .await
        .unwrap();
    assert!(stolen.is_empty(), "handed out again while held");
    let record = second.get("k1").await.unwrap().unwrap();
    assert_eq!(
        (record.state, record.attempts),
        (TaskState::Running, 1),
        "{record:?}"
    );
}

/// Completed tasks past the retention are deleted with what is kept
/// beside them; queued tasks and dead letters are kept, whatever their age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_completed_tasks_past_retention() {
    let Some(server) = NatsServer::start("prune_deletes_completed_tasks_past_retention") else {
        return;
    };
    let (queue, wall) = open_settable(&server.url, "prune").await;
    let raw = async_nats::jetstream::new(async_nats::connect(&server.url).await.unwrap());
    let bucket = raw.get_key_value("PRUNE_RECORDS").await.unwrap();
    queue
        .submit(vec![task("done"), task("dead")])
        .await
        .unwrap();
    let mut leases = lease_up_to(&queue, "prune", 2).await;
    leases.sort_by(|a, b| a.key.task_id.cmp(&b.key.task_id));
    queue
        .term(&leases[0].key, "bad input", end(AttemptOutcome::Error))
        .await
        .unwrap();
    leases[0].settle();
    complete(&queue, &mut leases[1], json!("ok")).await;
    queue.submit(vec![task("waiting")]).await.unwrap();
    assert_eq!(queue.prune().await.unwrap(), 0, "not yet");
    // Past the conformance limits' retention of 2 h.
    wall.set_wall(3 * 3_600_000);
    // Completed after the cutoff: where the prune stops reading.
    queue
        .submit(vec![NewTask {
            priority: Priority::High,
            ..task("recent")
        }])
        .await
        .unwrap();
    let mut recent = queue
        .lease(&request("prune", Duration::from_secs(30)), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(recent[0].key.task_id, "recent");
    complete(&queue, &mut recent[0], json!("ok")).await;
    assert_eq!(queue.prune().await.unwrap(), 1);
    assert!(queue.get("done").await.unwrap().is_none());
    assert!(queue.get("recent").await.unwrap().is_some());
    // The pruned record left a marker, which its id's next life starts
    // on; its controls left none.
    let subjects = subjects_of(&bucket).await;
    assert_eq!(
        subjects,
        [
            "$KV.PRUNE_RECORDS.t.dead",
            "$KV.PRUNE_RECORDS.t.done",
            "$KV.PRUNE_RECORDS.t.recent",
            "$KV.PRUNE_RECORDS.t.waiting"
        ]
    );
    assert_eq!(
        queue.get("dead").await.unwrap().unwrap().state,
        TaskState::DeadLettered
    );
    assert_eq!(
        queue.get("waiting").await.unwrap().unwrap().state,
        TaskState::Queued
    );
    // The id is free again: a task under it is new, not a duplicate.
    let again = queue.submit(vec![task("done")]).await.unwrap();
    assert!(!again[0].duplicate);
}

/// A daemon's counts follow what other daemons write: after its first
/// count it reads only the records written since, and must not miss them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_follow_what_other_daemons_write() {
    let Some(server) = NatsServer::start("counts_follow_what_other_daemons_write") else {
        return;
    };
    let (mine, theirs) = (
        open_as(&server.url, "tally", "mine", Duration::from_secs(30)).await,
        open_as(&server.url, "tally", "theirs", Duration::from_secs(30)).await,
    );
    let of = |counts: Vec<(String, flotilla::queue::StateCounts)>| {
        counts
            .into_iter()
            .find(|(agent, _)| agent == "worker")
            .map(|(_, counts)| {
                (
                    counts.queued,
                    counts.running,
                    counts.completed,
                    counts.dead_lettered,
                )
            })
    };
    assert_eq!(of(mine.counts().await.unwrap()), None, "nothing yet");
    theirs
        .submit(vec![task("a"), task("b"), task("c")])
        .await
        .unwrap();
    assert_eq!(of(mine.counts().await.unwrap()), Some((3, 0, 0, 0)));
    let mut leases = lease_up_to(&theirs, "theirs", 3).await;
    assert_eq!(leases.len(), 3);
    assert_eq!(of(mine.counts().await.unwrap()), Some((0, 3, 0, 0)));
    complete(&theirs, &mut leases[0], json!("ok")).await;
    theirs
        .term(&leases[1].key, "bad input", end(AttemptOutcome::Error))
        .await
        .unwrap();
    leases[1].settle();
    assert_eq!(of(mine.counts().await.unwrap()), Some((0, 1, 1, 1)));
    // Listings of live states, and `--all` of the dead letters, come from
    // the same tally.
    let dead = leases[1].key.task_id.clone();
    assert_eq!(ids(&mine, Some(TaskState::DeadLettered), 10).await, [dead]);
    assert_eq!(
        ids(&mine, Some(TaskState::Running), 10).await,
        [leases[2].key.task_id.clone()]
    );
    assert_eq!(mine.purge(&Selection::All).await.unwrap(), 1);
    assert!(
        ids(&mine, Some(TaskState::DeadLettered), 10)
            .await
            .is_empty()
    );
    complete(&theirs, &mut leases[2], json!("ok")).await;
    assert_eq!(of(mine.counts().await.unwrap()), Some((0, 0, 2, 0)));
    assert!(ids(&mine, Some(TaskState::Running), 10).await.is_empty());
    // A fresh reader counts the same from every record.
    let fresh = open_as(&server.url, "tally", "fresh", Duration::from_secs(30)).await;
    assert_eq!(of(fresh.counts().await.unwrap()), Some((0, 0, 2, 0)));
}

/// A daemon started again returns to the queue the tasks it ran before
/// (its own, by its name), and leaves those other daemons run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_returns_only_its_own_tasks() {
    let Some(server) = NatsServer::start("a_restarted_daemon_returns_only_its_own_tasks") else {
        return;
    };
    let (mine, theirs) = (
        open_as(&server.url, "restart", "mine", Duration::from_secs(30)).await,
        open_as(&server.url, "restart", "theirs", Duration::from_secs(30)).await,
    );
    mine.submit((0..4).map(|n| task(&format!("r{n}"))).collect())
        .await
        .unwrap();
    let mut held = lease_up_to(&mine, "mine", 2).await;
    held.extend(lease_up_to(&theirs, "theirs", 2).await);
    assert_eq!(held.len(), 4);
    for lease in &mut held {
        lease.settle();
    }
    drop(mine);
    let again = open_as(&server.url, "restart", "mine", Duration::from_secs(30)).await;
    assert_eq!(again.requeue_running().await.unwrap(), 2);
    for (n, lease) in held.iter().enumerate() {
        let record = again.get(&lease.key.task_id).await.unwrap().unwrap();
        if n < 2 {
            assert_eq!(record.state, TaskState::Queued);
            assert_eq!(
                record.history[0].outcome,
                Some(AttemptOutcome::DaemonRestart)
            );
        } else {
            assert_eq!(record.state, TaskState::Running, "theirs runs on");
        }
    }
    assert_eq!(again.requeue_running().await.unwrap(), 0, "returned once");
}

/// Submits and completes the tasks `ids` in turn.
async fn complete_each(queue: &JetStreamQueue, owner: &str, ids: &[String]) {
    for chunk in ids.chunks(100) {
        queue
            .submit(chunk.iter().map(|id| task(id)).collect())
            .await
            .unwrap();
        let mut leases = lease_up_to(queue, owner, chunk.len()).await;
        assert_eq!(leases.len(), chunk.len());
        for lease in &mut leases {
            complete(queue, lease, json!("ok")).await;
        }
    }
}

/// The ids of the worker's tasks `queue` lists in `state`, at most `limit`.
async fn ids(queue: &JetStreamQueue, state: Option<TaskState>, limit: usize) -> Vec<String> {
    let filter = ListFilter {
        state,
        agent: Some("worker".into()),
        limit,
    };
    let tasks = queue.list(&filter).await.unwrap();
    tasks.into_iter().map(|task| task.id).collect()
}

/// Listings of completed tasks read the records' stream back from its
/// end, a window at a time, and stop once the newest are found: a record
/// created later than those after it in the stream (a clock ahead) is
/// still found while within the skew allowed for clocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_tasks_are_listed_from_the_end_of_the_records() {
    let Some(server) = NatsServer::start("completed_tasks_are_listed_from_the_end_of_the_records")
    else {
        return;
    };
    const MINUTE: i64 = 60_000;
    // More tasks after the first than the first window reads.
    let many: Vec<String> = (0..1_000).map(|n| format!("n{n:04}")).collect();

    // Created by a clock 5 minutes ahead, then many completed after it.
    let (queue, wall) = open_settable(&server.url, "early").await;
    wall.set_wall(5 * MINUTE);
    complete_each(&queue, "early", &["early".to_string()]).await;
    wall.set_wall(-5 * MINUTE);
    complete_each(&queue, "early", &many).await;
    assert_eq!(
        ids(&queue, Some(TaskState::Completed), 2).await,
        ["early", "n0999"]
    );
    wall.set_wall(10 * MINUTE);
    queue.submit(vec![task("queued")]).await.unwrap();
    assert_eq!(
        ids(&queue, None, 3).await,
        ["queued", "early", "n0999"],
        "live and completed tasks together, newest first"
    );
    assert_eq!(
        ids(&queue, Some(TaskState::Completed), 2_000).await.len(),
        1_001
    );

    // Created by a clock 5 hours ahead: past the skew allowed, and so
    // not read once the window after it holds a task newer than the
    // skew allows before it.
    let (queue, wall) = open_settable(&server.url, "ahead").await;
    wall.set_wall(300 * MINUTE);
    complete_each(&queue, "ahead", &["ahead".to_string()]).await;
    wall.set_wall(-300 * MINUTE);
    complete_each(&queue, "ahead", &many).await;
    wall.set_wall(60 * MINUTE);
    complete_each(&queue, "ahead", &["recent".to_string()]).await;
    assert_eq!(
        ids(&queue, Some(TaskState::Completed), 1).await,
        ["recent"],
        "the read stopped before the start of the stream"
    );
    assert_eq!(
        ids(&queue, Some(TaskState::Completed), 2).await,
        ["ahead", "recent"],
        "a read that must go on finds it"
    );
}

/// Between full counts, a pruned task's completion stays counted (its
/// marker names no agent); the hourly full count, read beside the counts
/// in use, then replaces them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_count_replaces_the_one_kept_up_to_date() {
    let Some(server) = NatsServer::start("a_full_count_replaces_the_one_kept_up_to_date") else {
        return;
    };
    let (queue, wall) = open_settable(&server.url, "recount").await;
    queue.submit(vec![task("done")]).await.unwrap();
    let mut leases = queue
        .lease(&request("recount", Duration::from_secs(30)), Duration::ZERO)
        .await
        .unwrap();
    complete(&queue, &mut leases[0], json!("ok")).await;
    assert_eq!(
        queued_and_completed(queue.counts().await.unwrap()),
        Some((0, 1))
    );
    wall.set_wall(3 * 3_600_000);
    assert_eq!(queue.prune().await.unwrap(), 1);
    queue.submit(vec![task("waiting")]).await.unwrap();
    assert_eq!(
        queued_and_completed(queue.counts().await.unwrap()),
        Some((1, 1)),
        "kept up to date: the pruned completion is still counted"
    );
    // An hour on, the full count is due.
    wall.pass_steady(3_600_000);
    assert_eq!(
        queued_and_completed(queue.counts().await.unwrap()),
        Some((1, 0))
    );
}

/// A records bucket deleted and made anew is counted afresh, even once
/// its revisions have passed the last one read from the old bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_start_over_on_a_bucket_made_anew() {
    let Some(server) = NatsServer::start("counts_start_over_on_a_bucket_made_anew") else {
        return;
    };
    let queue = open_as(&server.url, "anew", "anew", Duration::from_secs(30)).await;
    queue
        .submit(vec![task("a"), task("b"), task("c")])
        .await
        .unwrap();
    let mut leases = lease_up_to(&queue, "anew", 2).await;
    for lease in &mut leases {
        complete(&queue, lease, json!("ok")).await;
    }
    assert_eq!(
        queued_and_completed(queue.counts().await.unwrap()),
        Some((1, 2))
    );
    let raw = async_nats::jetstream::new(async_nats::connect(&server.url).await.unwrap());
    raw.delete_key_value("ANEW_RECORDS").await.unwrap();
    // Another daemon opening the fleet makes the bucket again; more
    // records than the old bucket's revisions are written to it.
    let other = open_as(&server.url, "anew", "other", Duration::from_secs(30)).await;
    let ids: Vec<String> = (0..10).map(|n| format!("new{n}")).collect();
    other
        .submit(ids.iter().map(|id| task(id)).collect())
        .await
        .unwrap();
    assert_eq!(
        queued_and_completed(queue.counts().await.unwrap()),
        Some((10, 0))
    );
}

/// A prune deletes a deleted task's marker once it is older than the
/// retention; a message of that task's run still waiting (a cancelled
/// task's, in the queue of an agent no daemon ran) is then never taken:
/// neither for the deleted task, nor for a new task under its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_marker_brings_no_old_message_back() {
    let Some(server) = NatsServer::start("a_deleted_marker_brings_no_old_message_back") else {
        return;
    };
    // The broker's clock cannot be set: its duplicate window is made
    // short instead, and waited out for real below.
    let wall = Arc::new(support::SettableClock::default());
    let config = BrokerConfig {
        url: server.url.clone(),
        namespace: "leftover".into(),
        duplicate_window: HumanDuration::secs(1),
        ..BrokerConfig::default()
    };
    let queue = open_config(config, "leftover", wall.clone()).await;
    queue
        .submit(vec![task("gone"), task("again")])
        .await
        .unwrap();
    for id in ["gone", "again"] {
        assert!(queue.cancel(id, "not wanted").await.unwrap());
    }
    let ids = Selection::Ids(vec!["gone".into(), "again".into()]);
    assert_eq!(queue.purge(&ids).await.unwrap(), 2);
    // Another agent's task completes after the markers, then the clock
    // passes the retention (2 h) and the marker margin (24 h).
    queue
        .submit(vec![NewTask {
            agent: "other".into(),
            ..task("done")
        }])
        .await
        .unwrap();
    let mut done = queue
        .lease(
            &LeaseRequest {
                agent: "other".into(),
                ..request("leftover", Duration::from_secs(30))
            },
            Duration::ZERO,
        )
        .await
        .unwrap();
    complete(&queue, &mut done[0], json!("ok")).await;
    // A journal left behind when the purge could not delete it: a new
    // task under the id must not inherit it.
    let raw = async_nats::jetstream::new(async_nats::connect(&server.url).await.unwrap());
    let bucket = raw.get_key_value("LEFTOVER_RECORDS").await.unwrap();
    bucket.put("c.journal=2Egone", "{}".into()).await.unwrap();
    wall.set_wall(27 * 3_600_000);
    assert_eq!(queue.prune().await.unwrap(), 1);
    let subjects = subjects_of(&bucket).await;
    assert_eq!(
        subjects,
        ["$KV.LEFTOVER_RECORDS.t.done"],
        "only the newest marker is left, and no journal"
    );
    // A new task under one of the ids: its own message runs it, the old
    // ones are dropped.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    queue
        .submit(vec![NewTask {
            payload: json!("the new one"),
            ..task("again")
        }])
        .await
        .unwrap();
    let mut leases = queue
        .lease(
            &LeaseRequest {
                max: 3,
                ..request("leftover", Duration::from_secs(30))
            },
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    let leased: Vec<(String, serde_json::Value)> = leases
        .iter()
        .map(|lease| (lease.key.task_id.clone(), lease.payload.clone()))
        .collect();
    assert_eq!(leased, [("again".to_string(), json!("the new one"))]);
    assert!(queue.get("gone").await.unwrap().is_none());
    for lease in &mut leases {
        lease.settle();
    }
}
