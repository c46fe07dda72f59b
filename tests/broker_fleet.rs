//! Many daemons on one JetStream broker, as real processes against a real
//! nats-server: a daemon killed with `kill -9`, the server killed and
//! restarted, a node of a 3-node cluster killed. Each run: 2,000 tasks, all
//! end completed, none lost, none completed twice.

mod support;

use std::process::Child;
use std::time::Duration;

use flotilla::clock;
use flotilla::queue::TaskQueue;
use flotilla::queue::TaskState;
use nix::sys::signal::Signal;
use support::nats::NatsServer;
use support::*;

const TASKS: usize = 2_000;

fn broker_fleet(url: &str, replicas: u32) -> Fleet {
    Fleet::new(&format!(
        r#"
[broker]
url = "{url}"
replicas = {replicas}
ack_wait = "2s"
request_timeout = "2s"
reconnect_max_delay = "500ms"
fleet_ttl = "3s"

[agents.worker]
command = {}
replicas = {{ min = 4 }}
prefetch = 8
timeouts = {{ progress_timeout = "5s", stop_grace = "1s" }}
retry = {{ max_deliver = 20, backoff = ["20ms"] }}
"#,
        example_agent(&["--work-ms", "5"])
    ))
}

/// A daemon process, killed if the test ends without stopping it (a
/// failed assertion must not leave daemons behind).
struct Running(Option<Child>);

impl Running {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("running")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_named(fleet: &Fleet, name: &str) -> Running {
    Running(Some(fleet.spawn_named(name)))
}

async fn client(fleet: &Fleet) -> std::sync::Arc<dyn TaskQueue> {
    fleet.store().await.queue()
}

/// Waits until at least `count` tasks finished, polling the broker gently
/// (a failed poll during a broker fault counts as not yet).
async fn wait_finished(queue: &dyn TaskQueue, count: u64, limit: Duration, what: &str) {
    let started = std::time::Instant::now();
    loop {
        if let Ok(counts) = queue.counts().await {
            let done: u64 = counts
                .iter()
                .map(|(_, c)| c.completed + c.dead_lettered)
                .sum();
            if done >= count {
                return;
            }
        }
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Every task completed exactly once.
async fn check_all_completed_once(queue: &dyn TaskQueue, ids: &[String]) {
    let tasks = records(queue, ids).await;
    for task in &tasks {
        assert_eq!(task.state, TaskState::Completed, "{task:?}");
        assert_eq!(completions(task), 1, "completed once: {task:?}");
    }
    eprintln!(
        "{} tasks completed once each; {} needed more than one delivery",
        tasks.len(),
        tasks.iter().filter(|task| task.attempts > 1).count()
    );
}

/// A graceful stop is prompt, whatever the broker went through.
fn stop(mut daemon: Running) {
    signal(daemon.child(), Signal::SIGTERM);
    let status = wait_exit(daemon.child(), Duration::from_secs(10));
    daemon.0 = None;
    assert!(status.success(), "{status:?}");
}

fn status_json(fleet: &Fleet) -> serde_json::Value {
    let shown = fleet.cli(&["status", "--json"]);
    serde_json::from_slice(&shown.stdout).unwrap_or_else(|error| {
        panic!(
            "status --json: {error}: {}",
            String::from_utf8_lossy(&shown.stderr)
        )
    })
}

/// The scenario every fault test shares: 2,000 tasks, daemons `a` and `b`,
/// `fault` applied once 400 are done (it may kill `a`), then every task
/// must complete exactly once. Returns the daemons to stop.
async fn two_daemons_through(
    fleet: &Fleet,
    prefix: &str,
    fault: impl AsyncFnOnce(&mut Running),
) -> (Running, Running) {
    let ids = fleet.submit_numbered("worker", TASKS, prefix);
    let queue = client(fleet).await;
    let mut a = spawn_named(fleet, "a");
    let b = spawn_named(fleet, "b");
    wait_finished(queue.as_ref(), 400, Duration::from_secs(60), "400 tasks").await;
    fault(&mut a).await;
    wait_finished(
        queue.as_ref(),
        TASKS as u64,
        Duration::from_secs(180),
        "all tasks",
    )
    .await;
    check_all_completed_once(queue.as_ref(), &ids).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_share_the_work_and_survive_a_kill_9() {
    let Some(server) = NatsServer::start("two_daemons_share_the_work_and_survive_a_kill_9") else {
        return;
    };
    let fleet = broker_fleet(&server.url, 1);
    let (_, b) = two_daemons_through(&fleet, "kill", async |a: &mut Running| {
        // Both daemons are in the fleet table, with their replicas (b's
        // first snapshot may be a moment behind its start).
        wait_until(
            Duration::from_secs(20),
            "both daemons in the fleet table",
            || async {
                let status = status_json(&fleet);
                let names: Vec<&str> = status["daemons"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|d| d["running"] == true)
                    .map(|d| d["name"].as_str().unwrap())
                    .collect();
                names == ["a", "b"]
                    && status["agents"][0]["replicas"].as_array().unwrap().len() == 8
            },
        )
        .await;
        signal(a.child(), Signal::SIGKILL);
        wait_exit(a.child(), Duration::from_secs(5));
    })
    .await;
    // The dead daemon drops out of the fleet after broker.fleet_ttl.
    wait_until(
        Duration::from_secs(15),
        "daemon a to leave the fleet",
        || async { status_json(&fleet)["daemons"].as_array().unwrap().len() == 1 },
    )
    .await;
    stop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_resumes_after_nats_server_is_killed_and_restarted() {
    let Some(mut server) =
        NatsServer::start("the_fleet_resumes_after_nats_server_is_killed_and_restarted")
    else {
        return;
    };
    let fleet = broker_fleet(&server.url, 1);
    let (a, b) = two_daemons_through(&fleet, "restart", async |_: &mut Running| {
        server.kill();
        tokio::time::sleep(Duration::from_secs(2)).await;
        server.restart();
    })
    .await;
    for daemon in status_json(&fleet)["daemons"].as_array().unwrap() {
        assert!(
            daemon["broker"]["reconnects"].as_u64().unwrap() >= 1,
            "{daemon}"
        );
        assert_eq!(daemon["broker"]["connected"], true, "{daemon}");
    }
    stop(a);
    stop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_a_node_and_no_task() {
    let Some(mut nodes) = NatsServer::cluster("a_three_node_cluster_loses_a_node_and_no_task", 3)
    else {
        return;
    };
    let urls: Vec<String> = nodes.iter().map(|node| node.url.clone()).collect();
    let fleet = broker_fleet(&urls.join(","), 3);
    // The cluster elects its meta leader and learns its peers before it
    // places replicated streams; on a loaded machine that takes a while.
    let logs = |nodes: &[NatsServer]| {
        nodes
            .iter()
            .map(NatsServer::log_tail)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let started = std::time::Instant::now();
    while !nodes.iter().all(NatsServer::healthy) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the cluster never became healthy\n{}",
            logs(&nodes)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    loop {
        let probe = fleet.cli(&["status", "--json"]);
        if probe.status.success() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the cluster never accepted flotilla's streams: {}\n{}",
            String::from_utf8_lossy(&probe.stderr),
            logs(&nodes)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (a, b) = two_daemons_through(&fleet, "cluster", async |_: &mut Running| {
        nodes[0].kill();
    })
    .await;
    stop(a);
    stop(b);
}

/// A daemon runs only the agents it is given; another daemon runs the
/// rest, and `status` shows which daemon runs which replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_can_split_the_agents_between_them() {
    let Some(server) = NatsServer::start("daemons_can_split_the_agents_between_them") else {
        return;
    };
    let fleet = Fleet::new(&format!(
        r#"
[broker]
url = "{}"

[agents.alpha]
command = {agent}

[agents.beta]
command = {agent}
"#,
        server.url,
        agent = example_agent(&["--work-ms", "1"])
    ));
    for agent in ["alpha", "beta"] {
        let id = format!("{agent}-1");
        let submitted = fleet.cli(&["submit", "--agent", agent, "--id", &id, "--payload", "{}"]);
        assert!(
            submitted.status.success(),
            "{}",
            String::from_utf8_lossy(&submitted.stderr)
        );
    }
    let queue = client(&fleet).await;
    let a = die_with_parent(&mut std::process::Command::new(flotilla_bin()))
        .args([
            "-c",
            fleet.config_path.to_str().unwrap(),
            "up",
            "--name",
            "a",
            "--agents",
            "alpha",
        ])
        .env("FLOTILLA_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .map(|child| Running(Some(child)))
        .unwrap();
    wait_finished(queue.as_ref(), 1, Duration::from_secs(30), "alpha's task").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let beta = queue.get("beta-1").await.unwrap().unwrap();
    assert_eq!(beta.state, TaskState::Queued, "no daemon runs beta yet");
    let b = spawn_named(&fleet, "b");
    // `b` runs every agent: both daemons now serve alpha, only b serves beta.
    wait_finished(queue.as_ref(), 2, Duration::from_secs(30), "beta's task").await;
    let status = status_json(&fleet);
    let daemons_of = |agent: &str| -> Vec<String> {
        let agent = status["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == agent)
            .unwrap();
        let mut names: Vec<String> = agent["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["daemon"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(daemons_of("alpha"), ["a", "b"], "{status}");
    assert_eq!(daemons_of("beta"), ["b"], "{status}");
    stop(a);
    stop(b);
}

/// Token and user/password auth, and a clear error for a wrong secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_connection_authenticates() {
    let Some(token_server) =
        NatsServer::start_with("the_broker_connection_authenticates", &["--auth", "s3cret"])
    else {
        return;
    };
    let Some(user_server) = NatsServer::start_with(
        "the_broker_connection_authenticates",
        &["--user", "fleet", "--pass", "hunter@2"],
    ) else {
        return;
    };
    let cases = [
        (
            format!("url = \"{}\"\ntoken = \"s3cret\"", token_server.url),
            true,
        ),
        (
            format!("url = \"{}\"\ntoken = \"wrong\"", token_server.url),
            false,
        ),
        (
            format!(
                "url = \"{}\"\nuser = \"fleet\"\npassword = \"hunter@2\"",
                user_server.url
            ),
            true,
        ),
        (
            format!(
                "url = \"{}\"\nuser = \"fleet\"\npassword = \"nope\"",
                user_server.url
            ),
            false,
        ),
        // Credentials in the URL itself.
        (
            format!(
                "url = \"{}\"",
                // Percent-encoded, as a URL must write `@`.
                user_server
                    .url
                    .replace("nats://", "nats://fleet:hunter%402@")
            ),
            true,
        ),
        (
            format!(
                "url = \"{}\"",
                token_server.url.replace("nats://", "nats://s3cret@")
            ),
            true,
        ),
        (
            format!(
                "url = \"{}\"",
                user_server.url.replace("nats://", "nats://fleet:nope@")
            ),
            false,
        ),
    ];
    for (broker, ok) in cases {
        let fleet = Fleet::new(&format!(
            "[broker]\n{broker}\nconnect_timeout = \"2s\"\n\n[agents.worker]\ncommand = [\"true\"]\n"
        ));
        let shown = fleet.cli(&["status"]);
        let stderr = String::from_utf8_lossy(&shown.stderr);
        assert_eq!(shown.status.success(), ok, "{broker}: {stderr}");
        let stdout = String::from_utf8_lossy(&shown.stdout);
        for secret in ["hunter@2", "hunter%402", "s3cret"] {
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "{secret} shown: {stdout}{stderr}"
            );
        }
        if !ok {
            assert!(stderr.contains("cannot connect to"), "{stderr}");
            assert!(
                !stderr.contains("nope") && !stderr.contains("wrong"),
                "no secret in errors: {stderr}"
            );
        }
    }
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let output = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Mutual TLS: the server verifies the client's certificate, flotilla
/// verifies the server's against the given CA; without a client
/// certificate the connection is refused with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_connection_speaks_mutual_tls() {
    let test = "the_broker_connection_speaks_mutual_tls";
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        let message = format!("{test}: openssl not found (it makes the test certificates)");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{message}; CI=true requires it"
        );
        eprintln!("\n!!! SKIPPED {message}\n");
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let days = ["-days", "2"];
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=flotilla test CA",
            days[0],
            days[1],
        ],
    );
    // Extensions make version 3 certificates, the only kind rustls takes.
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage = clientAuth\n").unwrap();
    for name in ["server", "client"] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        let subject = format!("/CN={name}");
        openssl(
            dir,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
                &subject,
            ],
        );
        let mut sign = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            days[0],
            days[1],
        ];
        let ext = format!("{name}.ext");
        sign.extend(["-extfile", &ext]);
        openssl(dir, &sign);
    }
    let path = |name: &str| dir.join(name).display().to_string();
    let Some(server) = NatsServer::start_with(
        test,
        &[
            "--tlsverify",
            "--tlscert",
            &path("server.pem"),
            "--tlskey",
            &path("server.key"),
            "--tlscacert",
            &path("ca.pem"),
        ],
    ) else {
        return;
    };
    let url = server.url.replace("nats://", "tls://");
    let with_cert = format!(
        "url = \"{url}\"\ntls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_required = true",
        path("ca.pem"),
        path("client.pem"),
        path("client.key")
    );
    let without_cert = format!(
        "url = \"{url}\"\ntls_ca = \"{}\"\ntls_required = true",
        path("ca.pem")
    );
    for (broker, ok) in [(with_cert, true), (without_cert, false)] {
        let fleet = Fleet::new(&format!(
            "[broker]\n{broker}\nconnect_timeout = \"2s\"\n\n[agents.worker]\ncommand = [\"true\"]\n"
        ));
        let submitted = fleet.cli(&[
            "submit",
            "--agent",
            "worker",
            "--id",
            "tls-1",
            "--payload",
            "{}",
        ]);
        let stderr = String::from_utf8_lossy(&submitted.stderr);
        assert_eq!(submitted.status.success(), ok, "{broker}: {stderr}");
        if !ok {
            assert!(stderr.contains("cannot connect to"), "{stderr}");
        }
    }
}

/// Breakers and fallbacks on the broker: a failing agent's tasks go to its
/// fallback agent through the task stream, and escalated tasks wait in the
/// records bucket for a human.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallbacks_and_escalations_work_on_the_broker() {
    let Some(server) = NatsServer::start("fallbacks_and_escalations_work_on_the_broker") else {
        return;
    };
    let failing = toml_array(&["sh".into(), "-c".into(), "exit 3".into()]);
    let fleet = Fleet::new(&format!(
        r#"
[broker]
url = "{}"

[agents.specialist]
command = {failing}
mode = "oneshot"
retry = {{ max_deliver = 10, backoff = ["10ms"] }}
breaker = {{ failure_threshold = 2, recovery_timeout = "1h" }}
fallback = ["manager"]

[agents.manager]
command = {}
mode = "oneshot"

[agents.gate]
command = {failing}
mode = "oneshot"
retry = {{ max_deliver = 10, backoff = ["10ms"] }}
breaker = {{ failure_threshold = 1, recovery_timeout = "1h" }}
fallback_policy = "escalate_to_human"
"#,
        server.url,
        toml_array(&["sh".into(), "-c".into(), "echo managed".into()]),
    ));
    let queue = client(&fleet).await;
    let (specialist, specialist_ids) = numbered_tasks("specialist", 6, "spec");
    let (gate, gate_ids) = numbered_tasks("gate", 2, "gate");
    queue.submit(specialist).await.unwrap();
    queue.submit(gate).await.unwrap();
    let daemon = spawn_named(&fleet, "a");
    wait_until(
        Duration::from_secs(30),
        "rerouted and escalated tasks",
        || {
            let queue = queue.clone();
            let ids: Vec<String> = specialist_ids.iter().chain(&gate_ids).cloned().collect();
            async move {
                let Ok(tasks) = try_records(queue.as_ref(), &ids).await else {
                    return false;
                };
                tasks.iter().all(|task| match task.agent.as_str() {
                    "gate" => task.state == TaskState::Escalated,
                    _ => task.state == TaskState::Completed,
                })
            }
        },
    )
    .await;
    for task in records(queue.as_ref(), &specialist_ids).await {
        assert_eq!(task.agent, "manager", "{task:?}");
        assert_eq!(task.result, Some(serde_json::json!("managed")));
    }
    let resolved = fleet.cli(&["escalations", "resolve", &gate_ids[0], "--complete", "1"]);
    assert!(resolved.status.success(), "{resolved:?}");
    let resolved = fleet.cli(&["escalations", "resolve", &gate_ids[1], "--drop"]);
    assert!(resolved.status.success(), "{resolved:?}");
    let gates = records(queue.as_ref(), &gate_ids).await;
    assert_eq!(
        (gates[0].state, gates[0].result.clone()),
        (TaskState::Completed, Some(serde_json::json!(1)))
    );
    assert_eq!(gates[1].state, TaskState::DeadLettered);
    let status = status_json(&fleet);
    let breaker = |name: &str| {
        status["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap()["breaker"]["state"]
            .clone()
    };
    assert_eq!(breaker("specialist"), "open", "{status}");
    assert_eq!(breaker("manager"), "closed", "{status}");
    stop(daemon);
}

/// Every task by id, or the first error (the broker may be busy).
async fn try_records(
    queue: &dyn TaskQueue,
    ids: &[String],
) -> Result<Vec<flotilla::queue::TaskRecord>, flotilla::queue::QueueError> {
    let mut out = Vec::new();
    for id in ids {
        if let Some(task) = queue.get(id).await? {
            out.push(task);
        }
    }
    Ok(out)
}

/// A daemon on which an agent is broken (say its binary is missing on that
/// machine) leaves the agent's tasks to a daemon where it works, instead
/// of diverting the shared queue to its fallback policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_with_a_broken_agent_leaves_its_tasks_to_a_healthy_daemon() {
    let Some(server) =
        NatsServer::start("a_daemon_with_a_broken_agent_leaves_its_tasks_to_a_healthy_daemon")
    else {
        return;
    };
    // Fails on the daemon named `bad` only.
    let worker = toml_array(&[
        "sh".into(),
        "-c".into(),
        r#"case "$FLOTILLA_INSTANCE" in *#bad) exit 3 ;; esac; echo ran"#.into(),
    ]);
    let fleet = Fleet::new(&format!(
        r#"
[broker]
url = "{}"

[agents.worker]
command = {worker}
mode = "oneshot"
retry = {{ max_deliver = 50, backoff = ["10ms"] }}
breaker = {{ failure_threshold = 1, recovery_timeout = "1h" }}
fallback_policy = "proceed_with_warning"
"#,
        server.url,
    ));
    let queue = client(&fleet).await;
    let running = |name: &'static str| {
        let fleet = &fleet;
        async move {
            status_json(fleet)["daemons"]
                .as_array()
                .is_some_and(|daemons| {
                    daemons
                        .iter()
                        .any(|d| d["name"] == name && d["running"] == true)
                })
        }
    };
    let good = spawn_named(&fleet, "good");
    wait_until(
        Duration::from_secs(30),
        "the good daemon's snapshot",
        || running("good"),
    )
    .await;
    // Both taking tasks before any is submitted, so that the bad one
    // meets its broken agent.
    let bad = spawn_named(&fleet, "bad");
    wait_until(Duration::from_secs(30), "the bad daemon's snapshot", || {
        running("bad")
    })
    .await;
    let (tasks, ids) = numbered_tasks("worker", 40, "job");
    queue.submit(tasks).await.unwrap();
    wait_finished(queue.as_ref(), 40, Duration::from_secs(60), "all jobs").await;
    let tasks = records(queue.as_ref(), &ids).await;
    for task in &tasks {
        assert_eq!(
            task.result,
            Some(serde_json::json!("ran")),
            "a job completed without running: {task:?}"
        );
    }
    // The bad daemon took some, failed them, and left the rest.
    assert!(
        tasks
            .iter()
            .any(|task| task.history.iter().any(|attempt| attempt
                .detail
                .as_deref()
                .is_some_and(|d| d.contains("exit code 3")))),
        "the bad daemon never met its broken agent"
    );
    stop(bad);
    stop(good);
}

/// Two rollbacks of one task through two clients of the broker (an
/// operator's `flotilla rollback` and a gate's `auto_rollback` on another
/// daemon, say): one runs, the other is told, and no change's command
/// runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollbacks_of_one_task_take_turns_across_the_fleet() {
    let Some(server) = NatsServer::start("rollbacks_of_one_task_take_turns_across_the_fleet")
    else {
        return;
    };
    let fleet = broker_fleet(&server.url, 1);
    let config = fleet.config();
    let (one, two) = (fleet.store().await, fleet.store().await);
    let log = fleet.path("undo.log");
    let changes = (0..3)
        .map(|n| flotilla::rollback::Change {
            description: format!("change {n}"),
            rollback: vec![
                "sh".into(),
                "-c".into(),
                format!("echo {n} >> '{}'; sleep 0.3", log.display()),
            ],
        })
        .collect();
    flotilla::rollback::record(&one, "deploy-1", "worker", 1, changes)
        .await
        .expect("recorded");
    let now = || clock::system().now_ms();
    let (a, b) = tokio::join!(
        flotilla::rollback::roll_back_task(&one, &config, "deploy-1", "operator", now),
        flotilla::rollback::roll_back_task(&two, &config, "deploy-1", "gate", now),
    );
    let (journal, busy) = match (a, b) {
        (Ok(journal), Err(busy)) | (Err(busy), Ok(journal)) => (journal, busy),
        other => panic!("one rollback runs and the other is told: {other:?}"),
    };
    assert!(journal.is_rolled_back(), "{journal:?}");
    assert!(busy.to_string().contains("already running"), "{busy}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "2\n1\n0\n");
    // Freed when it ended: running again finds nothing left to undo.
    let again = flotilla::rollback::roll_back_task(&two, &config, "deploy-1", "again", now)
        .await
        .expect("runs");
    assert!(again.is_rolled_back());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "2\n1\n0\n");
}

/// On a broker holding many records, `status` without a daemon's API
/// shows a live daemon's recent counts rather than counting every record
/// itself; with no live daemon, it counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_a_live_daemons_counts_of_a_large_broker() {
    let Some(server) = NatsServer::start("status_shows_a_live_daemons_counts_of_a_large_broker")
    else {
        return;
    };
    let fleet = broker_fleet(&server.url, 1);
    let daemon = spawn_named(&fleet, "a");
    let started = std::time::Instant::now();
    while status_json(&fleet)["daemon"]["running"] != true {
        assert!(started.elapsed() < Duration::from_secs(20), "daemon a up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let shown = status_json(&fleet);
    assert!(shown.get("counted_by").is_none(), "few records: {shown}");
    // Completed records past the threshold, written as a daemon would.
    let filled = flotilla::store::SHARED_COUNTS_ABOVE + 1;
    let client = async_nats::connect(&server.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let now = clock::system().now_ms();
    let mut acks = Vec::new();
    for n in 0..filled {
        let record = serde_json::json!({"task": {
            "id": format!("old{n}"), "agent": "worker", "state": "completed",
            "created_ms": now, "finished_ms": now, "updated_ms": now,
        }});
        let subject = format!("$KV.FLOTILLA_RECORDS.t.old{n}");
        let body = serde_json::to_vec(&record).unwrap().into();
        acks.push(js.publish(subject, body).await.unwrap());
        if acks.len() == 1_000 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    // The daemon counts every 30 s, and whenever its API is asked for
    // status; it shares its last count in its snapshot.
    let http = format!("http://{}", shown["daemon"]["http"].as_str().unwrap());
    let asked = fleet.cli(&["--api", &http, "status", "--json"]);
    assert!(asked.status.success(), "{asked:?}");
    let started = std::time::Instant::now();
    loop {
        let shown = status_json(&fleet);
        if shown["counted_by"]["daemon"] == "a" && shown["tasks"]["completed"] == filled {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the daemon's counts shown: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let text = fleet.cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("(counted by daemon a "), "{text}");
    stop(daemon);
    let shown = status_json(&fleet);
    assert!(shown.get("counted_by").is_none(), "counted itself: {shown}");
    assert_eq!(shown["tasks"]["completed"], filled);
}
