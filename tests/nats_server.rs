//! The JetStream facts the coming backend relies on (see shared NOTES),
//! checked against a real nats-server: work-queue retention, dedup by
//! message id, a shared durable pull consumer, explicit ack, progress
//! (+WPI) and NAK.

mod support;

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures_util::StreamExt;
use support::nats::NatsServer;

#[tokio::test]
async fn jetstream_work_queue_dedup_and_acks() {
    let Some(server) = NatsServer::start("jetstream_work_queue_dedup_and_acks") else {
        return;
    };
    let client = async_nats::connect(&server.url).await.unwrap();
    let js = jetstream::new(client);
    let tasks = js
        .create_stream(stream::Config {
            name: "FLOTILLA_TASKS".into(),
            subjects: vec!["flotilla.tasks.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap();
    // The same message id twice is stored once.
    for _ in 0..2 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "task-1");
        js.publish_with_headers("flotilla.tasks.worker", headers, "payload".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let consumer = tasks
        .create_consumer(consumer::pull::Config {
            durable_name: Some("worker".into()),
            filter_subject: "flotilla.tasks.worker".into(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(2),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .unwrap();
    let first = batch.next().await.unwrap().unwrap();
    assert!(batch.next().await.is_none(), "deduplicated to one message");
    // Progress, then a plain NAK: redelivered at once.
    first.ack_with(AckKind::Progress).await.unwrap();
    first.ack_with(AckKind::Nak(None)).await.unwrap();
    let mut again = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let second = again.next().await.unwrap().unwrap();
    assert_eq!(second.info().unwrap().delivered, 2);
    second.double_ack().await.unwrap();
    // Acked on a work-queue stream: gone.
    let mut info = tasks.clone();
    assert_eq!(info.info().await.unwrap().state.messages, 0);
}
