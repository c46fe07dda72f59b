//! The queue conformance suite against the embedded SQLite backend.

use flotilla::clock;
use flotilla::queue::conformance;
use flotilla::queue::sqlite::{Role, Settings, SqliteQueue};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let counter = std::sync::atomic::AtomicUsize::new(0);
    conformance::run_all(|| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = dir.path().join(format!("queue-{n}.db"));
        async move {
            let settings = Settings {
                limits: conformance::limits(),
                role: Role::Daemon,
            };
            SqliteQueue::open(&path, settings, clock::system()).unwrap()
        }
    })
    .await;
}

/// A purged dead letter takes what the store keeps beside it under its id
/// (here its rollback journal) along: a new task given the id must never
/// roll back the old one's changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_task_leaves_no_journal_behind() {
    use flotilla::queue::{
        AttemptEnd, AttemptOutcome, LeaseRequest, NewTask, Priority, Selection, TaskQueue,
    };
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        limits: conformance::limits(),
        role: Role::Daemon,
    };
    let queue = SqliteQueue::open(&dir.path().join("q.db"), settings, clock::system()).unwrap();
    queue
        .put_status_durably("control.journal.j1", &serde_json::json!([{"attempt": 1}]))
        .await
        .unwrap();
    queue
        .submit(vec![NewTask {
            id: "j1".into(),
            agent: "a".into(),
            priority: Priority::Normal,
            payload: serde_json::json!({}),
        }])
        .await
        .unwrap();
    let request = LeaseRequest {
        agent: "a".into(),
        max: 1,
        lease_for: Duration::from_secs(30),
        owner: "test".into(),
        max_deliver: 3,
        lowest: Priority::Low,
    };
    let mut leases = queue.lease(&request, Duration::ZERO).await.unwrap();
    queue
        .term(
            &leases[0].key,
            "bad",
            AttemptEnd::new(AttemptOutcome::Error, None, "bad"),
        )
        .await
        .unwrap();
    leases[0].settle();
    assert_eq!(
        queue
            .purge(&Selection::Ids(vec!["j1".into()]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(queue.get_status("control.journal.j1").await.unwrap(), None);
}
