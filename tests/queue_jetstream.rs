//! The queue conformance suite against the JetStream backend and a real
//! nats-server (started by the test on a free port, with a temporary store).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flotilla::clock;
use flotilla::config::BrokerConfig;
use flotilla::queue::conformance::{self, CONFORMANCE_MAX_PAYLOAD};
use flotilla::queue::jetstream::{self, ConnectionStats, JetStreamQueue, Settings};
use support::nats::NatsServer;

async fn open(url: &str, namespace: &str) -> JetStreamQueue {
    let config = BrokerConfig {
        url: url.to_string(),
        namespace: namespace.to_string(),
        ..BrokerConfig::default()
    };
    let stats = Arc::new(ConnectionStats::default());
    let client = jetstream::connect(&config, std::path::Path::new("."), "test", stats.clone())
        .await
        .unwrap();
    let settings = Settings {
        dedup_window: Duration::from_secs(3600),
        retention: Duration::from_secs(7200),
        max_payload_bytes: CONFORMANCE_MAX_PAYLOAD,
        max_result_bytes: CONFORMANCE_MAX_PAYLOAD,
        owner: "conformance".into(),
    };
    JetStreamQueue::open(client, stats, &config, settings, clock::system())
        .await
        .unwrap()
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
