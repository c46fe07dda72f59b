//! The daemon's health endpoints, against a running daemon: live, ready
//! (with the broker lost and back), progress naming a stuck agent, and the
//! bind rules (a non-loopback address needs a token, a port in use stops
//! the daemon at start).

mod support;

use std::time::Duration;

use serde_json::Value;
use support::nats::NatsServer;
use support::*;

async fn get(address: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let response = reqwest::get(format!("http://{address}{path}"))
        .await
        .expect("the daemon answers");
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("a body");
    (status, serde_json::from_slice(&body).expect("a JSON body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_ready_and_progress_naming_a_stuck_agent() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.steady]
command = {}

[agents.stuck]
command = {}
timeouts = {{ progress_timeout = "3s" }}
retry = {{ max_deliver = 1 }}
breaker = {{ enabled = false }}
"#,
        example_agent(&["--work-ms", "1"]),
        example_agent(&["--hang-rate", "1.0"]),
    ));
    let daemon = fleet.start().await;
    let address = daemon.http_address().expect("listening");
    assert!(address.ip().is_loopback());
    assert_eq!(get(address, "/health/live").await.0, 200);
    wait_until(Duration::from_secs(20), "ready replicas", || async {
        let (status, body) = get(address, "/health/ready").await;
        status == 200
            && body["checks"]
                .as_array()
                .unwrap()
                .iter()
                .all(|check| check["ok"] == true)
    })
    .await;
    let (status, body) = get(address, "/health/progress").await;
    assert_eq!((status, &body["status"]), (200, &Value::from("ok")));
    // A task that hangs: after half its progress timeout the endpoint
    // names the agent; once the watchdog killed it (and, at max_deliver
    // = 1, dead-lettered it), it is healthy again.
    daemon
        .queue()
        .submit(numbered_tasks("stuck", 1, "hang").0)
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "progress to name the agent",
        || async {
            // One answer, read while the task is stuck (it is killed
            // 3 s in).
            let (status, body) = get(address, "/health/progress").await;
            status == 503
                && body["stuck_agents"] == serde_json::json!(["stuck"])
                && body["stuck"][0]["tasks"] == serde_json::json!(["hang-00000"])
                && body["stuck"][0]["threshold_ms"] == 1500
        },
    )
    .await;
    wait_until(Duration::from_secs(20), "progress to recover", || async {
        get(address, "/health/progress").await.0 == 200
    })
    .await;
    // The CLI shows where the daemon listens.
    wait_until(
        Duration::from_secs(10),
        "status to show the address",
        || async {
            let status = fleet.cli(&["status"]);
            String::from_utf8_lossy(&status.stdout).contains(&format!("http {address}"))
        },
    )
    .await;
    daemon.stop().await;
}

/// A oneshot task whose process exited is validated with its slot still
/// busy: a slow gate is no silent process for `/health/progress`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_gate_is_not_a_stuck_task() {
    let fleet = Fleet::new(
        r#"
[agents.checked]
mode = "oneshot"
command = ["sh", "-c", "echo '{{\"ok\": true}}'"]
timeouts = { progress_timeout = "1s" }

[agents.checked.validation]
checks = [ { name = "slow", command = ["sh", "-c", "touch gate.started; sleep 3"] } ]
"#,
    );
    let daemon = fleet.start().await;
    let address = daemon.http_address().expect("listening");
    daemon
        .queue()
        .submit(numbered_tasks("checked", 1, "gated").0)
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "the gate to start", || async {
        fleet.path("gate.started").exists()
    })
    .await;
    // Past half the progress timeout, the gate still running.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = get(address, "/health/progress").await;
    assert_eq!(
        (status, &body["status"]),
        (200, &Value::from("ok")),
        "{body}"
    );
    wait_until(Duration::from_secs(20), "the task to complete", || async {
        daemon
            .queue()
            .get("gated-00000")
            .await
            .unwrap()
            .is_some_and(|task| task.state == flotilla::queue::TaskState::Completed)
    })
    .await;
    daemon.stop().await;
}

/// The system clock set forward while a task is silent: neither
/// `/health/progress` nor the watchdog takes the step for silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_set_forward_makes_no_task_look_stuck() {
    let fleet = Fleet::new(&format!(
        r#"
[watchdog]
interval = "1s"
stuck_after = "30s"

[agents.slow]
command = {}
prefetch = 0
timeouts = {{ progress_timeout = "60s" }}
"#,
        // Silent for 4 s, then progress, then done 4 s later.
        example_agent(&["--work-ms", "8000"]),
    ));
    let clock = std::sync::Arc::new(SettableClock::default());
    let daemon = fleet.start_with_clock(clock.clone()).await;
    let address = daemon.http_address().expect("listening");
    let queue = daemon.queue();
    queue
        .submit(numbered_tasks("slow", 1, "long").0)
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "the task to run", || async {
        queue
            .get("long-00000")
            .await
            .unwrap()
            .is_some_and(|task| task.state.to_string() == "running")
    })
    .await;
    // 45 s: past both thresholds (30 s), within the lease (90 s), so that
    // only a clock taken for elapsed time could end the attempt.
    clock.set_wall(45_000);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (status, body) = get(address, "/health/progress").await;
        assert_eq!(status, 200, "the step read as silence: {body}");
    }
    wait_until(Duration::from_secs(30), "the task to complete", || async {
        queue
            .get("long-00000")
            .await
            .unwrap()
            .is_some_and(|task| task.state.to_string() == "completed")
    })
    .await;
    let task = queue.get("long-00000").await.unwrap().unwrap();
    assert_eq!(task.history.len(), 1, "restarted: {:#?}", task.history);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_503_while_the_broker_is_unreachable() {
    let Some(mut server) = NatsServer::start("ready_turns_503_while_the_broker_is_unreachable")
    else {
        return;
    };
    let fleet = Fleet::new(&format!(
        r#"
[broker]
url = "{}"
reconnect_max_delay = "200ms"

[agents.worker]
command = {}
"#,
        server.url,
        example_agent(&["--work-ms", "1"]),
    ));
    let daemon = fleet.start().await;
    let address = daemon.http_address().expect("listening");
    wait_until(Duration::from_secs(20), "ready", || async {
        get(address, "/health/ready").await.0 == 200
    })
    .await;
    server.kill();
    wait_until(Duration::from_secs(20), "not ready", || async {
        let (status, body) = get(address, "/health/ready").await;
        status == 503
            && body["checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|check| check["name"] == "broker" && check["ok"] == false)
    })
    .await;
    // Live all along: the process answers.
    assert_eq!(get(address, "/health/live").await.0, 200);
    // Its status answers too, with its own part, cut off.
    let (code, status) = get(address, "/api/v1/status").await;
    assert_eq!(code, 200, "{status}");
    assert!(
        status["store_error"]
            .as_str()
            .is_some_and(|error| !error.is_empty()),
        "{status}"
    );
    assert_eq!(status["daemon"]["broker"]["connected"], false, "{status}");
    assert_eq!(status["agents"][0]["name"], "worker", "{status}");
    // An answer that would show its counts as zeros is refused instead.
    assert_eq!(get(address, "/api/v1/agents").await.0, 503);
    server.restart();
    wait_until(Duration::from_secs(30), "ready again", || async {
        get(address, "/health/ready").await.0 == 200
    })
    .await;
    daemon.stop().await;
}

/// The check named `name` in a `/health/ready` answer.
fn check<'a>(body: &'a Value, name: &str) -> Option<&'a Value> {
    body["checks"]
        .as_array()?
        .iter()
        .find(|check| check["name"] == name)
}

/// Failed rounds of a check that passed before do not stop the replicas
/// until there are `failure_threshold` of them in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blip_under_the_failure_threshold_keeps_the_replicas_ready() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.gated]
command = {agent}

[agents.gated.readiness]
interval = "1s"
failure_threshold = 5
checks = [ {{ name = "flag", command = ["sh", "-c", "test ! -e down.flag"] }} ]
"#,
        agent = example_agent(&["--work-ms", "1"]),
    ));
    let daemon = fleet.start().await;
    let gated = agent(&daemon, "gated").clone();
    let ready = || gated.status().replicas[0].not_ready.is_none();
    wait_until(Duration::from_secs(20), "ready", || async {
        ready()
            && gated
                .status()
                .readiness
                .first()
                .is_some_and(|check| check.ok)
    })
    .await;
    std::fs::write(fleet.path("down.flag"), "").unwrap();
    wait_until(Duration::from_secs(10), "a failed round", || async {
        gated
            .status()
            .readiness
            .first()
            .is_some_and(|check| !check.ok)
    })
    .await;
    let detail = gated.status().readiness[0].detail.clone();
    assert!(
        detail.contains("round(s) in a row; the replicas stop at failure_threshold = 5"),
        "{detail}"
    );
    assert!(ready(), "a failed round stopped the replicas");
    let address = daemon.http_address().unwrap();
    let (status, body) = get(address, "/health/ready").await;
    assert_eq!(status, 200, "{body}");
    // Down for good: stopped after the fifth round.
    wait_until(Duration::from_secs(10), "not ready", || async { !ready() }).await;
    assert_eq!(get(address, "/health/ready").await.0, 503);
    let failed = gated.status().readiness[0].detail.clone();
    assert!(!failed.contains("round(s) in a row"), "{failed}");
    std::fs::remove_file(fleet.path("down.flag")).unwrap();
    wait_until(Duration::from_secs(10), "ready again", || async { ready() }).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_checks_gate_the_replicas_and_the_daemon() {
    let endpoint_status = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(200));
    // The model endpoint: answers with the status the test sets.
    let status = endpoint_status.clone();
    let endpoint = http_stand_in(move |line| {
        if line.contains("/moved") {
            return (302, String::new());
        }
        (
            status.load(std::sync::atomic::Ordering::SeqCst),
            String::new(),
        )
    })
    .await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let fleet = Fleet::new(&format!(
        r#"
[agents.gated]
command = {agent}
replicas = {{ min = 2 }}

[agents.gated.readiness]
interval = "1s"
timeout = "500ms"
checks = [
  {{ name = "model", http = "http://probe:secret-password@{endpoint}/health?key=secret-key" }},
  {{ name = "weights", command = ["test", "-e", "weights.bin"] }},
  {{ workspace_writable = true }},
  {{ name = "cache", tcp = "127.0.0.1:{closed_port}", required = false }},
  {{ name = "moved", http = "http://{endpoint}/moved", expect = 302 }},
]
"#,
        agent = example_agent(&["--work-ms", "1"]),
    ));
    let daemon = fleet.start().await;
    let address = daemon.http_address().expect("listening");
    let queue = daemon.queue();
    // The weights are missing: not ready, and the task waits.
    queue
        .submit(numbered_tasks("gated", 1, "first").0)
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "the failing check", || async {
        let (status, body) = get(address, "/health/ready").await;
        // The check's URL is shown without its password or query.
        assert!(!body.to_string().contains("secret"), "{body}");
        status == 503
            && check(&body, "agent:gated:weights").is_some_and(|c| {
                c["ok"] == false
                    && c["required"] == true
                    && c["detail"]
                        .as_str()
                        .unwrap()
                        .contains("\"test\" exit status: 1")
            })
            && check(&body, "agent:gated:model").is_some_and(|c| c["ok"] == true)
            && check(&body, "agent:gated:workspace_writable").is_some_and(|c| c["ok"] == true)
            && check(&body, "agent:gated:cache")
                .is_some_and(|c| c["ok"] == false && c["required"] == false)
            // Expecting a redirect, the check sees it rather than following.
            && check(&body, "agent:gated:moved").is_some_and(|c| c["ok"] == true)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let task = queue.get("first-00000").await.unwrap().unwrap();
    assert_eq!(
        task.state.to_string(),
        "queued",
        "not-ready replicas got a task"
    );
    let status = fleet.cli(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("NOT READY: readiness check \"weights\" failing"),
        "{text}"
    );
    // The weights appear: ready (the optional check still fails), and the
    // task runs.
    std::fs::write(fleet.path("weights.bin"), b"w").unwrap();
    wait_until(Duration::from_secs(20), "ready", || async {
        let (status, body) = get(address, "/health/ready").await;
        status == 200 && check(&body, "agent:gated:cache").is_some_and(|c| c["ok"] == false)
    })
    .await;
    wait_until(Duration::from_secs(20), "the task to complete", || async {
        queue
            .get("first-00000")
            .await
            .unwrap()
            .unwrap()
            .state
            .to_string()
            == "completed"
    })
    .await;
    // The model endpoint fails: not ready again, naming it; back when it
    // recovers.
    endpoint_status.store(503, std::sync::atomic::Ordering::SeqCst);
    wait_until(Duration::from_secs(20), "the endpoint to fail", || async {
        let (status, body) = get(address, "/health/ready").await;
        status == 503
            && check(&body, "agent:gated:model").is_some_and(|c| {
                c["ok"] == false
                    && c["detail"].as_str().unwrap().contains("503")
                    && c["detail"]
                        .as_str()
                        .unwrap()
                        .contains("GET http://***@127.0.0.1:")
                    && !c["detail"].as_str().unwrap().contains("secret")
            })
    })
    .await;
    queue
        .submit(numbered_tasks("gated", 1, "second").0)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let task = queue.get("second-00000").await.unwrap().unwrap();
    assert_eq!(task.state.to_string(), "queued");
    endpoint_status.store(200, std::sync::atomic::Ordering::SeqCst);
    wait_until(Duration::from_secs(20), "the second task", || async {
        queue
            .get("second-00000")
            .await
            .unwrap()
            .unwrap()
            .state
            .to_string()
            == "completed"
    })
    .await;
    // Checks run every second; wait for a round that saw the endpoint up.
    wait_until(Duration::from_secs(10), "ready again", || async {
        get(address, "/health/ready").await.0 == 200
    })
    .await;
    daemon.stop().await;

    // A per-replica check: the replica is over its share of memory, so it
    // takes no task and the check names it.
    let fleet = Fleet::new(&format!(
        r#"
[agents.greedy]
command = {}
readiness = {{ interval = "1s", checks = [{{ memory_below_pct = 0.0001 }}] }}
"#,
        example_agent(&["--work-ms", "1"]),
    ));
    let daemon = fleet.start().await;
    let address = daemon.http_address().expect("listening");
    wait_until(
        Duration::from_secs(20),
        "the replica to fail its check",
        || async {
            let (status, body) = get(address, "/health/ready").await;
            status == 503
                && check(&body, "agent:greedy:memory_below_pct 0.0001").is_some_and(|c| {
                    c["ok"] == false
                        && c["detail"]
                            .as_str()
                            .unwrap()
                            .contains("replica 0: resident memory")
                })
                && check(&body, "agent:greedy").is_some_and(|c| c["ok"] == false)
        },
    )
    .await;
    daemon
        .queue()
        .submit(numbered_tasks("greedy", 1, "third").0)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let task = daemon.queue().get("third-00000").await.unwrap().unwrap();
    assert_eq!(task.state.to_string(), "queued");
    daemon.stop().await;
}

#[test]
fn a_non_loopback_address_needs_a_token_and_a_busy_port_stops_the_start() {
    let fleet = Fleet::new("[agents.worker]\ncommand = [\"true\"]\n");
    let text = std::fs::read_to_string(&fleet.config_path).unwrap();
    std::fs::write(
        &fleet.config_path,
        text.replace("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:0\""),
    )
    .unwrap();
    let refused = fleet.cli(&["up"]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("http.listen") && stderr.contains("needs a token"),
        "{stderr}"
    );
    // A token file that is missing is named.
    std::fs::write(
        &fleet.config_path,
        text.replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"0.0.0.0:0\"\ntoken_file = \"missing-token\"",
        ),
    )
    .unwrap();
    let checked = fleet.cli(&["config", "check"]);
    assert_eq!(checked.status.code(), Some(2), "{checked:?}");
    assert!(
        String::from_utf8_lossy(&checked.stderr).contains("http.token_file: cannot read"),
        "{checked:?}"
    );
    // Other commands do not need the daemon's token.
    assert!(fleet.cli(&["status"]).status.success());
    std::fs::write(fleet.path("missing-token"), "s3cret-token\n").unwrap();
    assert!(fleet.cli(&["config", "check"]).status.success());
    std::fs::write(
        &fleet.config_path,
        text.replace("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:0\""),
    )
    .unwrap();
    // With a token it is accepted.
    let checked = std::process::Command::new(flotilla_bin())
        .args(["-c", fleet.config_path.to_str().unwrap(), "config", "check"])
        .env("FLOTILLA_HTTP_TOKEN", "a-long-random-token")
        .output()
        .unwrap();
    assert!(checked.status.success(), "{checked:?}");

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    std::fs::write(
        &fleet.config_path,
        text.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        ),
    )
    .unwrap();
    let stopped = fleet.cli(&["up"]);
    assert!(!stopped.status.success());
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on http.listen = 127.0.0.1:{port}")),
        "{stderr}"
    );
}

/// The value of the sample `series` (name and labels, as exported).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().unwrap())
}

async fn scrape(address: std::net::SocketAddr) -> String {
    let response = reqwest::get(format!("http://{address}/metrics"))
        .await
        .expect("the daemon answers");
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    response.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_tasks_complete_fail_and_retry() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.good]
command = {}

[agents.flaky]
command = {}
retry = {{ max_deliver = 3, backoff = ["10ms"] }}
breaker = {{ enabled = false }}

[agents.fatal]
command = {}
"#,
        example_agent(&["--work-ms", "1"]),
        example_agent(&["--work-ms", "1", "--error-rate", "1.0"]),
        example_agent(&["--work-ms", "1", "--fatal-rate", "1.0"]),
    ));
    let daemon = fleet.start().await;
    let address = daemon.http_address().expect("listening");
    let before = scrape(address).await;
    assert_eq!(
        sample(
            &before,
            r#"agent_tasks_received_total{agent="good",type="default"}"#
        ),
        None,
        "nothing received yet"
    );
    let queue = daemon.queue().clone();
    let mut good = numbered_tasks("good", 5, "ok").0;
    good[0].payload = serde_json::json!({"type": "review"});
    queue.submit(good).await.unwrap();
    queue
        .submit(numbered_tasks("flaky", 2, "bad").0)
        .await
        .unwrap();
    queue
        .submit(numbered_tasks("fatal", 2, "unusable").0)
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "9 finished tasks", || async {
        finished(queue.as_ref()).await >= 9
    })
    .await;
    wait_until(Duration::from_secs(20), "the metrics", || async {
        let text = scrape(address).await;
        sample(&text, r#"agent_tasks_completed_total{agent="good",type="default",status="completed"}"#)
            == Some(4.0)
            && sample(&text, r#"agent_tasks_completed_total{agent="good",type="review",status="completed"}"#)
                == Some(1.0)
            // Two tasks, three attempts each, all errors (the retries).
            && sample(&text, r#"agent_tasks_received_total{agent="flaky",type="default"}"#)
                == Some(6.0)
            && sample(&text, r#"agent_tasks_completed_total{agent="flaky",type="default",status="error"}"#)
                == Some(6.0)
            // The agent said these tasks cannot succeed: the task's
            // fault, which the error-rate alert leaves out.
            && sample(&text, r#"agent_tasks_completed_total{agent="fatal",type="default",status="not_retryable"}"#)
                == Some(2.0)
            // Raised just after the dead letter is stored, and after the
            // count of completions.
            && sample(&text, r#"flotilla_dead_lettered_total{agent="flaky"}"#) == Some(2.0)
            && sample(&text, r#"agent_task_duration_seconds_count{agent="good",type="default"}"#)
                == Some(4.0)
    })
    .await;
    let text = scrape(address).await;
    assert_eq!(
        sample(
            &text,
            r#"agent_task_duration_seconds_count{agent="good",type="default"}"#
        ),
        Some(4.0)
    );
    assert_eq!(
        sample(&text, r#"agent_health_status{agent="good"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"agent_tasks_in_progress{agent="good"}"#),
        Some(0.0)
    );
    assert_eq!(sample(&text, "fleet_agents_healthy_total"), Some(3.0));
    assert_eq!(sample(&text, "flotilla_degradation_level"), Some(0.0));
    assert_eq!(
        sample(
            &text,
            r#"flotilla_breaker_state{agent="good",state="closed"}"#
        ),
        Some(1.0)
    );
    // Memory is sampled every few seconds.
    wait_until(Duration::from_secs(20), "memory samples", || async {
        let text = scrape(address).await;
        sample(&text, r#"agent_memory_usage_bytes{agent="good"}"#).is_some_and(|rss| rss > 0.0)
    })
    .await;
    assert!(sample(&text, "fleet_total_queue_depth").is_some());
    // Counted at start, and stamped with the time of the count.
    wait_until(Duration::from_secs(20), "a store count", || async {
        let text = scrape(address).await;
        sample(&text, "flotilla_store_counted_timestamp_seconds").is_some_and(|at| at > 1.7e9)
    })
    .await;
    assert!(
        text.contains("# HELP agent_tasks_received_total "),
        "{text}"
    );
    // Without a broker there is no broker to be disconnected from.
    assert!(!text.contains("flotilla_broker_connected"), "{text}");
    assert_eq!(
        sample(&text, r#"flotilla_dead_lettered_total{agent="flaky"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, r#"flotilla_replica_restarts_total{agent="good"}"#),
        Some(0.0),
        "counters exist from the start"
    );
    // Two tasks, each handed out again twice after its first attempt.
    assert_eq!(
        sample(&text, r#"flotilla_redeliveries_total{agent="flaky"}"#),
        Some(4.0)
    );
    assert_eq!(
        sample(&text, r#"flotilla_redeliveries_total{agent="good"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, r#"flotilla_escalations_total{agent="flaky"}"#),
        Some(0.0)
    );
    daemon.stop().await;
}

/// A connection that sends nothing is closed after the first-byte timeout
/// (10 s), so idle connections cannot hold the server's slots; the server
/// answers others meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed() {
    use tokio::io::AsyncReadExt;
    let fleet = Fleet::new(&format!(
        "[agents.a]\ncommand = {}\n",
        example_agent(&["--work-ms", "1"])
    ));
    let daemon = fleet.start().await;
    let address = daemon.http_address().expect("listening");
    let mut silent = tokio::net::TcpStream::connect(address).await.unwrap();
    let started = std::time::Instant::now();
    assert_eq!(get(address, "/health/live").await.0, 200);
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(30), silent.read(&mut buffer))
        .await
        .expect("closed within 30 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    daemon.stop().await;
}

/// Until an agent's readiness checks have run once, the daemon is not
/// ready: a first round that takes its timeout (an endpoint that hangs)
/// must not let a new pod be taken as ready meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_is_not_ready_before_the_first_readiness_round() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.gated]
command = {agent}

[agents.gated.readiness]
interval = "10s"
timeout = "5s"
checks = [{{ name = "slow", command = ["sleep", "4"] }}]
"#,
        agent = example_agent(&["--work-ms", "1"]),
    ));
    let daemon = fleet.start().await;
    let address = daemon.http_address().expect("listening");
    let (status, body) = get(address, "/health/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        check(&body, "agent:gated:readiness").is_some_and(
            |c| c["ok"] == false && c["detail"].as_str().unwrap().contains("not run yet")
        ),
        "{body}"
    );
    wait_until(Duration::from_secs(20), "ready after the round", || async {
        get(address, "/health/ready").await.0 == 200
    })
    .await;
    daemon.stop().await;
}
