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
