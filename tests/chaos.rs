//! The fault proxy against a real nats-server: `chaos partition` cuts the
//! daemon's broker connection (it notices through its pings, turns not
//! ready, and comes back by itself with no task lost), `chaos latency`
//! slows it.

mod support;

use std::time::Duration;

use serde_json::json;
use support::nats::NatsServer;
use support::*;

const TOKEN: &str = "chaos-token-0b1c2d3e4f";

async fn call(
    address: std::net::SocketAddr,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{address}{path}"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap(),
    )
}

async fn ready(address: std::net::SocketAddr) -> u16 {
    reqwest::get(format!("http://{address}/health/ready"))
        .await
        .map(|response| response.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_through_the_fault_proxy_heals_with_no_task_lost() {
    let Some(server) =
        NatsServer::start("a_partition_through_the_fault_proxy_heals_with_no_task_lost")
    else {
        return;
    };
    let fleet = Fleet::new(&format!(
        r#"
[broker]
url = "{url}"
ping_interval = "1s"
reconnect_max_delay = "200ms"
ack_wait = "5s"

[chaos]
enabled = true
proxy = true

[agents.worker]
command = {agent}
replicas = {{ min = 2 }}
"#,
        url = server.url,
        agent = example_agent(&["--work-ms", "20"]),
    ));
    fleet.set_token(TOKEN);
    let daemon = fleet.start().await;
    let address = daemon.http_address().unwrap();
    let queue = daemon.queue().clone();
    wait_until(Duration::from_secs(20), "ready", || async {
        ready(address).await == 200
    })
    .await;
    let (tasks, ids) = numbered_tasks("worker", 200, "cut");
    queue.submit(tasks).await.unwrap();

    // Long enough that the daemon surely notices (pings every second, a
    // few missed) before the cut heals, on a loaded machine too.
    let (status, done) = call(address, "/api/v1/chaos/partition", json!({"for": "10s"})).await;
    assert_eq!(status, 200, "{done}");
    assert!(
        done["detail"].as_str().unwrap().contains("cut for 10s"),
        "{done}"
    );
    wait_until(Duration::from_secs(15), "the daemon to notice", || async {
        ready(address).await == 503
    })
    .await;
    wait_until(
        Duration::from_secs(30),
        "the connection to heal",
        || async { ready(address).await == 200 },
    )
    .await;
    let (status, done) = call(
        address,
        "/api/v1/chaos/latency",
        json!({"add": "200ms", "for": "3s"}),
    )
    .await;
    assert_eq!(status, 200, "{done}");
    // The daemon's own calls to the broker go through the proxy: each is
    // held back now.
    let started = std::time::Instant::now();
    queue.get(&ids[0]).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "a broker call took {:?} under 200 ms of added latency",
        started.elapsed()
    );
    wait_until(Duration::from_secs(90), "every task", || async {
        finished(queue.as_ref()).await >= 200
    })
    .await;
    for task in records(queue.as_ref(), &ids).await {
        assert_eq!(task.state.to_string(), "completed", "{task:?}");
        assert_eq!(completions(&task), 1, "{task:?}");
    }
    let broker = daemon.store().broker_status().unwrap();
    assert!(
        broker.disconnects >= 1 && broker.reconnects >= 1,
        "{broker:?}"
    );
    daemon.stop().await;
}
