//! The daemon's JSON API against a running daemon: the bearer token guards
//! every call when configured, mutating calls are refused without one,
//! bad input is named and changes nothing, and the CLI works through the
//! API with `--api` (no config file, no store).

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const TOKEN: &str = "test-token-5f0c1e9a7b";

struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    fn new(address: std::net::SocketAddr) -> Self {
        Self {
            base: format!("http://{address}"),
            http: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.expect("the daemon answers");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, body)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, Some(TOKEN), None)
            .await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(TOKEN), Some(body))
            .await
    }
}

fn error_of(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_default()
}

/// Runs the CLI against `address` through the API, without a config.
fn remote_cli(
    address: std::net::SocketAddr,
    token: Option<&str>,
    args: &[&str],
) -> std::process::Output {
    let mut command = std::process::Command::new(flotilla_bin());
    command
        .args([
            "-c",
            "/nonexistent/flotilla.toml",
            "--api",
            &format!("http://{address}"),
        ])
        .args(args)
        .env("FLOTILLA_LOG", "warn")
        .env_remove("FLOTILLA_HTTP_TOKEN");
    if let Some(token) = token {
        command.env("FLOTILLA_HTTP_TOKEN", token);
    }
    command.output().expect("the CLI runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_the_token_checks_input_and_serves_the_cli() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.worker]
command = {}

[agents.broken]
command = {}
retry = {{ max_deliver = 1 }}
breaker = {{ enabled = false }}
"#,
        example_agent(&["--work-ms", "1"]),
        example_agent(&["--error-rate", "1.0"]),
    ));
    fleet.set_token(TOKEN);
    let daemon = fleet.start().await;
    let address = daemon.http_address().expect("listening");
    let api = Client::new(address);

    // Without the token, or with a wrong one: refused, nothing queued.
    let one = json!({"agent": "worker", "id": "api-1", "payload": {"n": 1}});
    for token in [None, Some("wrong-token")] {
        let (status, body) = api
            .call(
                reqwest::Method::POST,
                "/api/v1/tasks",
                token,
                Some(one.clone()),
            )
            .await;
        assert_eq!(status, 401, "{body}");
        assert!(error_of(&body).contains("Authorization: Bearer"), "{body}");
        let (status, _) = api
            .call(reqwest::Method::GET, "/api/v1/status", token, None)
            .await;
        assert_eq!(status, 401);
    }
    assert!(daemon.queue().get("api-1").await.unwrap().is_none());
    // Health and metrics stay open.
    let (status, _) = api
        .call(reqwest::Method::GET, "/health/live", None, None)
        .await;
    assert_eq!(status, 200);

    // Bad input is named and nothing of a batch is applied.
    let (status, body) = api
        .post(
            "/api/v1/tasks",
            json!({"agent": "worker", "tasks": [
                {"id": "batch-ok", "payload": 1},
                {"id": "bad id with spaces", "payload": 2},
            ]}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(error_of(&body).contains("tasks[1].id"), "{body}");
    assert!(daemon.queue().get("batch-ok").await.unwrap().is_none());
    let (status, body) = api
        .post("/api/v1/tasks", json!({"agent": "ghost", "payload": 1}))
        .await;
    assert_eq!(status, 400);
    assert!(
        error_of(&body).contains("unknown agent \"ghost\"; configured agents: broken, worker"),
        "{body}"
    );
    let (status, body) = api
        .post(
            "/api/v1/tasks",
            json!({"agent": "worker", "payload": 1, "colour": "red"}),
        )
        .await;
    assert!(
        status == 422 && error_of(&body).contains("colour"),
        "{status} {body}"
    );
    // A path that cannot be read is answered in JSON like the rest.
    let (status, body) = api.get("/api/v1/tasks/%FF").await;
    assert!(
        status == 400 && !error_of(&body).is_empty(),
        "{status} {body}"
    );
    let (status, body) = api.get("/api/v1/tasks?state=lost").await;
    assert!(
        status == 400 && error_of(&body).contains("queued"),
        "{status} {body}"
    );
    let (status, body) = api.get("/api/v1/tasks?limit=0").await;
    assert!(
        status == 400 && error_of(&body).contains("valid: 1 to"),
        "{body}"
    );

    // Submit, then follow the task to its end.
    let (status, body) = api.post("/api/v1/tasks", one.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body[0]["id"], "api-1");
    let (_, again) = api.post("/api/v1/tasks", one).await;
    assert_eq!(again[0]["duplicate"], true, "{again}");
    // `null` is a payload, as it is beside the config.
    let (status, body) = api
        .post(
            "/api/v1/tasks",
            json!({"agent": "worker", "id": "api-null", "payload": null}),
        )
        .await;
    assert_eq!(
        (status, &body[0]["id"]),
        (200, &json!("api-null")),
        "{body}"
    );
    wait_until(Duration::from_secs(20), "api-1 to complete", || async {
        api.get("/api/v1/tasks/api-1").await.1["state"] == "completed"
    })
    .await;
    let (_, task) = api.get("/api/v1/tasks/api-1").await;
    assert!(!task["history"].as_array().unwrap().is_empty(), "{task}");
    let (status, body) = api.get("/api/v1/tasks/nope").await;
    assert!(
        status == 404 && error_of(&body).contains("no task with id"),
        "{body}"
    );
    let (status, body) = api.get("/api/v1/tasks/nope/tree").await;
    assert!(
        status == 404 && error_of(&body).contains("no task with id"),
        "{status} {body}"
    );
    // The scheme of the token is case-insensitive.
    let lower = reqwest::Client::new()
        .get(format!("http://{address}/api/v1/status"))
        .header("authorization", format!("bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status().as_u16(), 200);
    // Unknown routes, methods and agents answer in the same JSON.
    let (status, body) = api.get("/api/v1/nothing").await;
    assert!(
        status == 404 && error_of(&body).contains("no API route GET /api/v1/nothing"),
        "{status} {body}"
    );
    let (status, body) = api
        .call(reqwest::Method::DELETE, "/api/v1/tasks", Some(TOKEN), None)
        .await;
    assert!(
        status == 405 && error_of(&body).contains("/api/v1/tasks does not take DELETE"),
        "{status} {body}"
    );
    let (status, body) = api.get("/api/v1/tasks?agent=nosuch").await;
    assert!(
        status == 404 && error_of(&body).contains("no agent \"nosuch\"; configured agents"),
        "{status} {body}"
    );

    // Dead letters: listed, replayed, purged.
    api.post(
        "/api/v1/tasks",
        json!({"agent": "broken", "id": "doomed", "payload": 1}),
    )
    .await;
    wait_until(Duration::from_secs(20), "the dead letter", || async {
        let (_, letters) = api.get("/api/v1/dlq").await;
        letters
            .as_array()
            .unwrap()
            .iter()
            .any(|task| task["id"] == "doomed")
    })
    .await;
    let (status, body) = api.post("/api/v1/dlq/replay", json!({})).await;
    assert!(
        status == 400 && error_of(&body).contains("\"all\": true"),
        "{body}"
    );
    let (status, body) = api
        .post("/api/v1/dlq/replay", json!({"ids": ["doomed"]}))
        .await;
    assert_eq!((status, &body["count"]), (200, &json!(1)), "{body}");
    wait_until(Duration::from_secs(20), "the dead letter again", || async {
        api.get("/api/v1/tasks/doomed").await.1["state"] == "dead_lettered"
    })
    .await;
    let (status, body) = api.post("/api/v1/dlq/purge", json!({"all": true})).await;
    assert_eq!((status, &body["count"]), (200, &json!(1)), "{body}");

    // Escalations: a task that is not escalated cannot be resolved.
    let (status, body) = api
        .post("/api/v1/escalations/api-1/resolve", json!({"retry": true}))
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = api
        .post(
            "/api/v1/escalations/api-1/resolve",
            json!({"retry": true, "drop": true}),
        )
        .await;
    assert!(
        status == 400 && error_of(&body).contains("exactly one"),
        "{body}"
    );
    let (status, body) = api.get("/api/v1/escalations").await;
    assert_eq!((status, body), (200, json!([])));

    // Degradation forced and cleared.
    let (status, body) = api
        .call(
            reqwest::Method::PUT,
            "/api/v1/degrade",
            Some(TOKEN),
            Some(json!({"level": 9, "for": "1m"})),
        )
        .await;
    assert!(
        status == 400 && error_of(&body).contains("valid: 0 (nominal)"),
        "{body}"
    );
    let (status, body) = api
        .call(
            reqwest::Method::PUT,
            "/api/v1/degrade",
            Some(TOKEN),
            Some(json!({"level": "essential", "for": "1m"})),
        )
        .await;
    assert_eq!(
        (status, &body["level"]),
        (200, &json!("essential")),
        "{body}"
    );
    let (status, _) = api
        .call(
            reqwest::Method::DELETE,
            "/api/v1/degrade",
            Some(TOKEN),
            None,
        )
        .await;
    assert_eq!(status, 200);

    // Status and agents, live.
    let (status, report) = api.get("/api/v1/status").await;
    assert_eq!(status, 200);
    assert_eq!(report["daemon"]["running"], true, "{report}");
    assert_eq!(report["agents"].as_array().unwrap().len(), 2);
    let (status, agent) = api.get("/api/v1/agents/worker").await;
    assert_eq!((status, &agent["name"]), (200, &json!("worker")));
    let (status, body) = api.get("/api/v1/agents/ghost").await;
    assert!(
        status == 404 && error_of(&body).contains("configured agents"),
        "{body}"
    );

    // The CLI through the API, without a config or the store.
    let status = remote_cli(address, Some(TOKEN), &["status"]);
    assert!(status.status.success(), "{status:?}");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("worker") && text.contains("broken"), "{text}");
    let refused = remote_cli(
        address,
        None,
        &["submit", "--agent", "worker", "--payload", "{}"],
    );
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("FLOTILLA_HTTP_TOKEN"),
        "{refused:?}"
    );
    let submitted = remote_cli(
        address,
        Some(TOKEN),
        &[
            "submit",
            "--agent",
            "worker",
            "--id",
            "cli-1",
            "--payload",
            "{\"n\": 2}",
        ],
    );
    assert!(submitted.status.success(), "{submitted:?}");
    wait_until(Duration::from_secs(20), "cli-1 to complete", || async {
        api.get("/api/v1/tasks/cli-1").await.1["state"] == "completed"
    })
    .await;
    let shown = remote_cli(address, Some(TOKEN), &["tasks", "show", "cli-1", "--json"]);
    assert!(shown.status.success(), "{shown:?}");
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["state"], "completed");
    let missing = remote_cli(address, Some(TOKEN), &["tasks", "show", "nope"]);
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
    let unknown = remote_cli(
        address,
        Some(TOKEN),
        &["submit", "--agent", "ghost", "--payload", "1"],
    );
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("configured agents: broken, worker"),
        "{unknown:?}"
    );
    let not_remote = remote_cli(address, Some(TOKEN), &["up"]);
    assert_eq!(not_remote.status.code(), Some(2), "{not_remote:?}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_api_is_read_only() {
    let fleet = Fleet::new(&format!(
        "[agents.worker]\ncommand = {}\n",
        example_agent(&["--work-ms", "1"])
    ));
    let daemon = fleet.start().await;
    let address = daemon.http_address().expect("listening");
    let api = Client::new(address);
    let (status, report) = api
        .call(reqwest::Method::GET, "/api/v1/status", None, None)
        .await;
    assert_eq!(status, 200, "{report}");
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            "/api/v1/tasks",
            None,
            Some(json!({"agent": "worker", "id": "t", "payload": 1})),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(error_of(&body).contains("read-only"), "{body}");
    assert!(daemon.queue().get("t").await.unwrap().is_none());
    // A page whose name points at 127.0.0.1 (DNS rebinding) reads nothing.
    let addressed_to = |name: &str| {
        reqwest::Client::new()
            .get(format!("http://{address}/api/v1/tasks"))
            .header("host", format!("{name}:{}", address.port()))
            .send()
    };
    let rebound = addressed_to("evil.example").await.unwrap();
    assert_eq!(rebound.status().as_u16(), 403);
    let said = rebound.text().await.unwrap();
    assert!(said.contains("\\\"evil.example:"), "{said}");
    let local = addressed_to("localhost").await.unwrap();
    assert_eq!(local.status().as_u16(), 200);
    daemon.stop().await;
}

/// The example experiment of the repository, for agent `worker`.
const EXPERIMENT: &str = include_str!("../examples/chaos/kill-one.toml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kills_and_pauses_replicas_through_the_api_when_enabled() {
    let fleet = Fleet::new(&format!(
        r#"
[chaos]
enabled = true

[agents.worker]
command = {}
replicas = {{ min = 2 }}

# Oneshot: no process runs while it has no task, so it has nothing to kill.
[agents.idle]
mode = "oneshot"
command = ["true"]
"#,
        example_agent(&["--work-ms", "1"]),
    ));
    fleet.set_token(TOKEN);
    std::fs::write(fleet.path("kill-one.toml"), EXPERIMENT).unwrap();
    let daemon = fleet.start().await;
    let worker = daemon
        .agents()
        .iter()
        .find(|agent| agent.name == "worker")
        .unwrap()
        .clone();
    wait_until(Duration::from_secs(20), "two ready replicas", || async {
        worker
            .status()
            .replicas
            .iter()
            .filter(|r| r.is_ready())
            .count()
            == 2
    })
    .await;
    // The CLI finds the daemon through the store and reads the token
    // from the config.
    let killed = fleet.cli(&["chaos", "kill", "--agent", "worker", "--mode", "all"]);
    assert!(killed.status.success(), "{killed:?}");
    let said = String::from_utf8_lossy(&killed.stdout);
    assert!(
        said.contains("sent SIGKILL to worker/0") && said.contains("worker/1"),
        "{said}"
    );
    wait_until(
        Duration::from_secs(20),
        "both replicas restarted",
        || async {
            let status = worker.status();
            status.restarts >= 2 && status.replicas.iter().filter(|r| r.is_ready()).count() == 2
        },
    )
    .await;
    // Paused replicas take no task until they resume (long enough for a
    // slow CLI exit).
    let paused = fleet.cli(&["chaos", "pause", "--agent", "worker", "--for", "3s"]);
    assert!(paused.status.success(), "{paused:?}");
    let queue = daemon.queue().clone();
    queue
        .submit(numbered_tasks("worker", 1, "paused").0)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_ne!(
        queue.get("paused-00000").await.unwrap().unwrap().state,
        flotilla::queue::TaskState::Completed
    );
    wait_until(
        Duration::from_secs(20),
        "the task after the pause",
        || async {
            queue.get("paused-00000").await.unwrap().unwrap().state
                == flotilla::queue::TaskState::Completed
        },
    )
    .await;
    // An experiment: the steady state holds before, a replica is killed,
    // it holds again, and the probe tasks all completed once.
    let ran = fleet.cli(&[
        "chaos",
        "run",
        fleet.path("kill-one.toml").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(ran.status.code(), Some(0), "{ran:?}");
    let report: Value = serde_json::from_slice(&ran.stdout).unwrap();
    assert_eq!(report["verdict"], "passed", "{report}");
    assert_eq!(report["load"]["completed"], 20, "{report}");
    assert_eq!(report["load"]["lost"], 0);
    assert!(
        report["actions"][0]
            .as_str()
            .unwrap()
            .starts_with("kill: sent SIGKILL"),
        "{report}"
    );
    // A hypothesis that cannot hold fails the experiment, before any fault.
    std::fs::write(
        fleet.path("impossible.toml"),
        EXPERIMENT
            .replace("kill-one", "impossible")
            .replace("queue_depth_below = 100", "queue_depth_below = 0"),
    )
    .unwrap();
    let failed = fleet.cli(&[
        "chaos",
        "run",
        fleet.path("impossible.toml").to_str().unwrap(),
    ]);
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    assert!(
        String::from_utf8_lossy(&failed.stdout).contains("FAILED"),
        "{failed:?}"
    );
    // A hypothesis the fleet does not meet again within `settle` after
    // the fault fails the experiment after the method, and the report
    // says which check: 1,000 probes queued at once, behind a pause,
    // cannot all complete within 1 ms of their submit.
    std::fs::write(
        fleet.path("pause-all.toml"),
        r#"
name = "pause-all"
settle = "2s"

[hypothesis]
all_agents_ready = true
p99_latency_below = "1ms"

[load]
agent = "worker"
tasks = 1000

[[method]]
action = "pause"
agent = "worker"
for = "1s"
"#,
    )
    .unwrap();
    let broken = fleet.cli(&[
        "chaos",
        "run",
        fleet.path("pause-all.toml").to_str().unwrap(),
    ]);
    assert_eq!(broken.status.code(), Some(1), "{broken:?}");
    let said = String::from_utf8_lossy(&broken.stdout);
    assert!(
        said.contains("experiment pause-all: FAILED")
            && said.contains("before ok   all agents ready")
            && said.contains("after  FAIL p99 latency below 1ms: p99 ")
            && said.contains("fault  pause"),
        "{said}"
    );
    // The pause's 1,000 probes drain before the next experiment checks
    // its steady state (queue depth below 100).
    wait_until(Duration::from_secs(60), "the probes drained", || async {
        let shown = fleet.cli(&["status", "--json"]);
        let status: Value = serde_json::from_slice(&shown.stdout).unwrap_or_default();
        status["tasks"]["queued"] == 0
    })
    .await;
    // A fault this daemon cannot inject proves nothing: failed, though
    // the fleet is healthy, and found before its load is submitted.
    std::fs::write(
        fleet.path("no-fault.toml"),
        EXPERIMENT
            .replace("kill-one", "no-fault")
            .replace("agent = \"worker\"\nmode", "agent = \"nobody\"\nmode"),
    )
    .unwrap();
    let empty = fleet.cli(&[
        "chaos",
        "run",
        fleet.path("no-fault.toml").to_str().unwrap(),
    ]);
    assert_eq!(empty.status.code(), Some(1), "{empty:?}");
    let said = String::from_utf8_lossy(&empty.stdout);
    assert!(
        said.contains("experiment no-fault: FAILED")
            && said.contains(
                "after  FAIL every fault can be injected: kill: agent \"nobody\" does not run on this daemon"
            ),
        "{said}"
    );
    let probes = daemon
        .queue()
        .list(&flotilla::queue::ListFilter {
            state: None,
            agent: Some("worker".into()),
            limit: 10_000,
        })
        .await
        .unwrap();
    assert!(
        !probes
            .iter()
            .any(|task| task.id.starts_with("chaos-no-fault-")),
        "probe tasks were submitted"
    );
    // One that fails on a later fault injects nothing more and ends the
    // faults already in force: an hour's pause is over at once.
    std::fs::write(
        fleet.path("halted.toml"),
        r#"
name = "halted"
settle = "5s"

[hypothesis]
all_agents_ready = true

[[method]]
at = "0s"
action = "pause"
agent = "worker"
for = "1h"

[[method]]
at = "200ms"
action = "kill"
agent = "idle"

[[method]]
at = "400ms"
action = "pause"
agent = "worker"
for = "1s"
"#,
    )
    .unwrap();
    let halted = fleet.cli(&["chaos", "run", fleet.path("halted.toml").to_str().unwrap()]);
    assert_eq!(halted.status.code(), Some(1), "{halted:?}");
    let said = String::from_utf8_lossy(&halted.stdout);
    assert!(
        said.contains("experiment halted: FAILED")
            && said.contains("fault  kill failed: ")
            && said.contains("fault  the 1 later fault(s) of the method were not injected")
            && said.contains("fault  stop: resumed 2 paused replica(s)"),
        "{said}"
    );
    let (tasks, ids) = numbered_tasks("worker", 4, "after-halt");
    daemon.queue().submit(tasks).await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "tasks on the resumed replicas",
        || async {
            for id in &ids {
                let task = daemon.queue().get(id).await.unwrap().unwrap();
                if task.state != flotilla::queue::TaskState::Completed {
                    return false;
                }
            }
            true
        },
    )
    .await;
    // The operator's halt answers even with nothing in force.
    let stopped = fleet.cli(&["chaos", "stop"]);
    assert!(stopped.status.success(), "{stopped:?}");
    assert_eq!(
        String::from_utf8_lossy(&stopped.stdout).trim(),
        "no fault was in force"
    );
    let bad = fleet.cli(&["chaos", "kill", "--agent", "worker", "--mode", "most"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("valid: one, all, percent:N"));
    daemon.stop().await;
}

/// The daemon runs a scheduled experiment on its own, counts it, and keeps
/// its report for `chaos last`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_experiment_runs_and_is_reported() {
    let fleet = Fleet::new(&format!(
        r#"
[chaos]
enabled = true
schedule = [
  {{ experiment = "kill-one.toml", every = "10s" }},
  {{ experiment = "ghost-load.toml", every = "10s" }},
]

[agents.worker]
command = {}
replicas = {{ min = 2 }}
"#,
        example_agent(&["--work-ms", "1"]),
    ));
    fleet.set_token(TOKEN);
    std::fs::write(fleet.path("kill-one.toml"), EXPERIMENT).unwrap();
    // One whose load the daemon refuses (no such agent) cannot run: it is
    // reported failed, not left silent.
    std::fs::write(
        fleet.path("ghost-load.toml"),
        EXPERIMENT
            .replace("kill-one", "ghost-load")
            .replace("[load]\nagent = \"worker\"", "[load]\nagent = \"ghost\""),
    )
    .unwrap();
    let daemon = fleet.start().await;
    // The daemon runs the scheduled one on its own and counts it.
    let address = daemon.http_address().unwrap();
    wait_until(
        Duration::from_secs(60),
        "the scheduled experiment",
        || async {
            reqwest::get(format!("http://{address}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
                .contains(
                    "flotilla_chaos_experiments_total{experiment=\"kill-one\",verdict=\"passed\"}",
                )
        },
    )
    .await;
    // Its report is kept in the store, for `chaos last` (the latest
    // run's).
    let runs = || {
        let last = fleet.cli(&["chaos", "last", "--json"]);
        assert!(last.status.success(), "{last:?}");
        serde_json::from_slice::<Value>(&last.stdout).unwrap()
    };
    // (Another run may end between two reads: the one that passed is
    // checked.)
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let runs = loop {
        let runs = runs();
        if runs[0]["report"]["verdict"] == "passed" {
            break runs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no passed report: {runs}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(runs[0]["experiment"], "kill-one", "{runs}");
    assert_eq!(runs[0]["file"], "kill-one.toml", "{runs}");
    // (A run whose steady state did not hold, during kill-one's fault,
    // reports that instead: the next one is looked for.)
    let ghost = loop {
        let runs = fleet.cli(&["chaos", "last", "--json"]);
        let runs: Value = serde_json::from_slice(&runs.stdout).unwrap();
        if runs[1]["report"]["after"][0]["name"] == "the experiment could run" {
            break runs[1].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ghost-load report: {runs}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ghost["report"]["verdict"], "failed", "{ghost}");
    assert_eq!(
        ghost["report"]["after"][0]["name"], "the experiment could run",
        "{ghost}"
    );
    assert!(
        ghost["report"]["after"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("ghost"),
        "{ghost}"
    );
    assert_eq!(runs[0]["report"]["verdict"], "passed", "{runs}");
    assert_eq!(runs[0]["report"]["load"]["lost"], 0, "{runs}");
    let last = fleet.cli(&["chaos", "last"]);
    let text = String::from_utf8_lossy(&last.stdout);
    assert!(
        text.contains("last run ")
            && text.contains("experiment kill-one: ")
            && text.contains("fault  kill: sent SIGKILL"),
        "{text}"
    );
    daemon.stop().await;
}

/// While the daemon drains, no fault is injected: a replica killed then
/// would have its task charged as crashed instead of released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fault_is_injected_while_the_daemon_drains() {
    let fleet = Fleet::new(&format!(
        "[chaos]\nenabled = true\n\n[agents.worker]\ncommand = {}\n",
        example_agent(&["--work-ms", "4000"])
    ));
    fleet.set_token(TOKEN);
    let daemon = fleet.start().await;
    let address = daemon.http_address().unwrap();
    let queue = daemon.queue().clone();
    queue
        .submit(numbered_tasks("worker", 1, "long").0)
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "the task to run", || async {
        queue.get("long-00000").await.unwrap().unwrap().state == flotilla::queue::TaskState::Running
    })
    .await;
    let api = Client::new(address);
    let (status, body) = api
        .post(
            "/api/v1/chaos/pause",
            json!({"agent": "worker", "for": "1s"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let stopping = tokio::spawn(daemon.stop());
    // Within the drain (shutdown_grace is 2 s; the task needs 4).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = api
        .post("/api/v1/chaos/kill", json!({"agent": "worker"}))
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(error_of(&body).contains("stopping"), "{body}");
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_is_refused_unless_enabled() {
    let fleet = Fleet::new(&format!(
        "[agents.worker]\ncommand = {}\n",
        example_agent(&["--work-ms", "1"])
    ));
    fleet.set_token(TOKEN);
    let daemon = fleet.start().await;
    let api = Client::new(daemon.http_address().unwrap());
    let (status, body) = api
        .post("/api/v1/chaos/kill", json!({"agent": "worker"}))
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(error_of(&body).contains("[chaos] enabled = true"), "{body}");
    // Ending faults is always allowed; a bad scope is named.
    let (status, body) = api
        .post("/api/v1/chaos/stop", json!({"pids": [1], "broker": true}))
        .await;
    assert_eq!(
        (status, &body["detail"]),
        (200, &json!("no fault was in force"))
    );
    let (status, body) = api.post("/api/v1/chaos/stop", json!({"all": true})).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        error_of(&body).contains("not a stop request") && error_of(&body).contains("\"pids\""),
        "{body}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_served_offline_and_events_stream_live() {
    let fleet = Fleet::new(&format!(
        "[agents.crashy]\ncommand = {}\nretry = {{ max_deliver = 1 }}\nbreaker = {{ enabled = false }}\n",
        example_agent(&["--work-ms", "1", "--crash-rate", "1.0"])
    ));
    let daemon = fleet.start().await;
    let address = daemon.http_address().unwrap();
    let page = reqwest::get(format!("http://{address}/ui")).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("<title>flotilla</title>") && html.contains("/api/v1/events"));
    // No address but the SVG namespace, which names and loads nothing.
    let addresses = html.replace("http://www.w3.org/2000/svg", "");
    assert!(
        !addresses.contains("https://") && !addresses.contains("http://"),
        "the page loads nothing from elsewhere"
    );
    // Follow the live events, then make a replica crash.
    let mut events = reqwest::get(format!("http://{address}/api/v1/events"))
        .await
        .unwrap();
    assert_eq!(events.status().as_u16(), 200);
    daemon
        .queue()
        .submit(numbered_tasks("crashy", 1, "boom").0)
        .await
        .unwrap();
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !seen.contains("event: replica_restarted") {
        assert!(
            std::time::Instant::now() < deadline,
            "no restart event in {seen:?}"
        );
        if let Ok(Ok(Some(chunk))) =
            tokio::time::timeout(Duration::from_secs(5), events.chunk()).await
        {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    assert!(seen.contains("crashy/0 restarting"), "{seen}");
    drop(events);
    // `flotilla top` follows the same stream through its API client.
    let client = flotilla::client::ApiClient::new(&format!("http://{address}"), None).unwrap();
    let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
    let (connected, following) = tokio::sync::oneshot::channel();
    let follower = tokio::spawn(async move {
        client
            .follow_events(
                move || {
                    let _ = connected.send(());
                },
                |event| {
                    let _ = sender.send(event);
                },
            )
            .await
    });
    tokio::time::timeout(Duration::from_secs(10), following)
        .await
        .expect("the daemon accepts the follower within 10 s")
        .unwrap();
    daemon
        .queue()
        .submit(numbered_tasks("crashy", 1, "again").0)
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let event = received.recv().await.expect("the follower runs");
            if event.event == flotilla::notify::EventKind::ReplicaRestarted {
                return event;
            }
        }
    })
    .await
    .expect("a restart event through the client within 20 s");
    assert!(event.text.contains("crashy/0 restarting"), "{event:?}");
    assert_eq!(event.agent.as_deref(), Some("crashy"));
    follower.abort();
    daemon.stop().await;
}

/// Calls with a large body (over 1 MiB) take one of 4 turns while they
/// send and parse it (bounding the memory large submits take): 4 clients
/// stalled mid-body hold a fifth large submit back, not the reads nor
/// small calls, and only while they last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_hold_back_only_writes_and_only_while_they_last() {
    use tokio::io::AsyncWriteExt;
    let fleet = Fleet::new(&format!(
        "[agents.a]\ncommand = {}\n",
        example_agent(&["--work-ms", "1"])
    ));
    fleet.set_token(TOKEN);
    let daemon = fleet.start().await;
    let address = daemon.http_address().expect("listening");
    let client = Client::new(address);
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let head = format!(
            "POST /api/v1/tasks HTTP/1.1\r\nhost: flotilla\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: 2097152\r\n\r\n{{\"agent\": "
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stalled.push(stream);
    }
    // Each stalled call takes its turn once the server has read its head:
    // a status call on each of their connections' heels shows the server
    // has caught up with them (it serves connections as they come).
    for _ in 0..2 {
        assert_eq!(client.get("/api/v1/status").await.0, 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let half = "x".repeat(600_000);
    let large = json!({"agent": "a", "tasks": [
        {"id": "large-1", "payload": {"blob": half}},
        {"id": "large-2", "payload": {"blob": half}},
    ]});
    let submit = client.post("/api/v1/tasks", large);
    tokio::pin!(submit);
    assert!(
        tokio::time::timeout(Duration::from_secs(2), &mut submit)
            .await
            .is_err(),
        "the fifth large body waits its turn"
    );
    assert_eq!(client.get("/api/v1/status").await.0, 200, "reads go on");
    let (status, body) = client
        .post(
            "/api/v1/tasks",
            json!({"agent": "a", "id": "small", "payload": {}}),
        )
        .await;
    assert_eq!(status, 200, "small calls go on: {body}");
    // A body announced over 64 MiB is refused before it is read.
    let mut huge = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /api/v1/tasks HTTP/1.1\r\nhost: flotilla\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        65 << 20
    );
    huge.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 512];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        huge.read(&mut answer).await
    })
    .await
    .expect("answered at once")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(
        answer.starts_with("HTTP/1.1 413") && answer.contains("over 64 MiB"),
        "{answer}"
    );
    drop(stalled);
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), submit)
        .await
        .expect("its turn came once the stalled calls were gone");
    assert_eq!(status, 200, "{body}");
    daemon.stop().await;
}
