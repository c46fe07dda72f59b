//! The daemon as a real process: `kill -9` mid-run and restart, graceful
//! shutdown, a second daemon on the same store, no orphaned agents, and
//! JSON logs.

mod support;

use std::time::Duration;

use flotilla::queue::{AttemptOutcome, TaskQueue, TaskState};
use nix::sys::signal::Signal;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_daemon_mid_run_loses_nothing_and_leaves_no_orphans() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.worker]
command = {}
replicas = {{ min = 3 }}
timeouts = {{ progress_timeout = "2s", stop_grace = "1s" }}
retry = {{ max_deliver = 10, backoff = ["10ms"] }}
restart = {{ initial_backoff = "10ms", max_backoff = "100ms", max_restarts = 10000 }}
"#,
        // A shell wrapper gives every agent a grandchild too: the orphan
        // sweep must find both.
        toml_array(&[
            "sh".into(),
            "-c".into(),
            format!(
                "sleep 600 & exec {} example-agent --work-ms 20 --crash-rate 0.1 --seed 5",
                flotilla_bin()
            ),
        ])
    ));
    // Submitted while the daemon is down: the tasks wait in the queue.
    let ids = fleet.submit_numbered("worker", 400, "crash");
    let client = fleet.client();
    let instance = client.store_id().to_string();

    for round in 0..2 {
        let mut daemon = fleet.spawn_daemon();
        let target = 100 * (round + 1);
        wait_until(Duration::from_secs(60), "some tasks to finish", || async {
            finished(&client).await >= target
        })
        .await;
        let running = client.counts().await.unwrap()[0].1.running;
        signal(&daemon, Signal::SIGKILL);
        wait_exit(&mut daemon, Duration::from_secs(5));
        assert!(
            running > 0 || round > 0,
            "the daemon was killed while tasks ran"
        );
        // PDEATHSIG takes the agents down with the daemon; their shell's
        // background sleep is left for the next daemon's sweep.
        wait_until(
            Duration::from_secs(5),
            "agents to die with the daemon",
            || async {
                processes_of(&instance).iter().all(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| c.starts_with("sleep"))
                })
            },
        )
        .await;
    }

    let mut daemon = fleet.spawn_daemon();
    wait_until(Duration::from_secs(120), "every task to finish", || async {
        finished(&client).await >= 400
    })
    .await;
    // The restarted daemon swept the orphaned grandchildren: every `sleep`
    // left belongs to an agent of the live daemon.
    let live = daemon.id();
    let orphans: Vec<u32> = processes_of(&instance)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with("sleep"))
        })
        .filter(|pid| parent_of(parent_of(*pid)) != live)
        .collect();
    assert!(
        orphans.is_empty(),
        "orphans of killed daemons left: {orphans:?}"
    );
    signal(&daemon, Signal::SIGTERM);
    let status = wait_exit(&mut daemon, Duration::from_secs(30));
    assert!(status.success(), "clean shutdown: {status:?}");
    assert!(
        processes_of(&instance).is_empty(),
        "no agent outlives the daemon"
    );

    let records = records(&client, &ids).await;
    let mut restarted = 0;
    for task in &records {
        assert!(task.state.is_terminal(), "{} is {}", task.id, task.state);
        assert!(completions(task) <= 1, "{} completed twice", task.id);
        restarted += task
            .history
            .iter()
            .filter(|attempt| attempt.outcome == Some(AttemptOutcome::DaemonRestart))
            .count();
    }
    assert!(restarted > 0, "tasks interrupted by kill -9 were recovered");
    let completed = records
        .iter()
        .filter(|t| t.state == TaskState::Completed)
        .count();
    assert!(completed >= 390, "{completed} of 400 completed");
}

fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command: state, ppid, ...
    stat.rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// Gives `fleet` a 300 ms `daemon.shutdown_grace` (2 s by default).
fn shorten_shutdown_grace(fleet: &Fleet) {
    std::fs::write(
        &fleet.config_path,
        std::fs::read_to_string(&fleet.config_path)
            .unwrap()
            .replace("shutdown_grace = \"2s\"", "shutdown_grace = \"300ms\""),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_unfinished_tasks_without_charging_them() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.slow]
command = {}
replicas = {{ min = 2 }}
timeouts = {{ progress_timeout = "60s", stop_grace = "1s" }}
"#,
        example_agent(&["--work-ms", "30000"])
    ));
    shorten_shutdown_grace(&fleet);
    let ids = fleet.submit_numbered("slow", 3, "slow");
    let client = fleet.client();
    let instance = client.store_id().to_string();
    let mut daemon = fleet.spawn_daemon();
    wait_until(Duration::from_secs(20), "two tasks to run", || async {
        client.counts().await.unwrap()[0].1.running == 2
    })
    .await;
    // A second daemon on the same store is refused.
    let second = fleet.cli(&["up"]);
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("another flotilla daemon"));

    signal(&daemon, Signal::SIGTERM);
    let status = wait_exit(&mut daemon, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(processes_of(&instance).is_empty(), "replicas stopped");
    for task in records(&client, &ids).await {
        assert_eq!(task.state, TaskState::Queued, "{task:?}");
        assert_eq!(
            task.charged_attempts, 0,
            "a shutdown is not the task's fault"
        );
        assert!(
            task.history
                .iter()
                .all(|a| a.outcome == Some(AttemptOutcome::Released))
        );
    }
    let shown = fleet.cli(&["status", "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["daemon"]["running"], false);
    assert_eq!(shown["queue_depth"], 3);
}

/// A second SIGTERM cuts `daemon.shutdown_grace` short: the daemon stops
/// its replicas at once, and their tasks go back uncharged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_cuts_the_grace_short() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.slow]
command = {}
timeouts = {{ progress_timeout = "60s", stop_grace = "1s" }}
"#,
        example_agent(&["--work-ms", "30000"])
    ));
    std::fs::write(
        &fleet.config_path,
        std::fs::read_to_string(&fleet.config_path)
            .unwrap()
            .replace("shutdown_grace = \"2s\"", "shutdown_grace = \"60s\""),
    )
    .unwrap();
    let ids = fleet.submit_numbered("slow", 1, "slow");
    let client = fleet.client();
    let mut daemon = fleet.spawn_daemon();
    wait_until(Duration::from_secs(20), "the task to run", || async {
        client.counts().await.unwrap()[0].1.running == 1
    })
    .await;
    signal(&daemon, Signal::SIGTERM);
    // Still waiting for the task, within its minute of grace.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(daemon.try_wait().unwrap().is_none(), "exited at once");
    signal(&daemon, Signal::SIGTERM);
    let status = wait_exit(&mut daemon, Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
    let task = &records(&client, &ids).await[0];
    assert_eq!(task.state, TaskState::Queued, "{task:?}");
    assert_eq!(task.charged_attempts, 0, "{task:?}");
}

/// A persistent agent that holds its task until `shutdown` arrives, then
/// answers it and exits: an agent that wraps up when told to stop.
const WRAPS_UP_ON_SHUTDOWN: &str = r#"echo '{"type":"ready","protocol":1}'
while IFS= read -r line; do
  case "$line" in
    *'"type":"task"'*) id=$(printf '%s' "$line" | sed 's/^{"type":"task","id":"\([^"]*\)".*/\1/') ;;
    *'"type":"shutdown"'*) sleep 0.3; echo "{\"type\":\"result\",\"id\":\"$id\",\"output\":{\"wrapped_up\":true}}"; exit 0 ;;
  esac
done"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_sent_after_shutdown_is_stored() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.wrapper]
command = {}
timeouts = {{ progress_timeout = "60s", stop_grace = "5s" }}
"#,
        // Braces doubled: flotilla's templates take `{{` for a literal one.
        toml_array(&[
            "sh".into(),
            "-c".into(),
            WRAPS_UP_ON_SHUTDOWN.replace('{', "{{").replace('}', "}}"),
        ])
    ));
    shorten_shutdown_grace(&fleet);
    let ids = fleet.submit_numbered("wrapper", 2, "wrap");
    let client = fleet.client();
    let mut daemon = fleet.spawn_daemon();
    wait_until(Duration::from_secs(20), "one task to run", || async {
        client.counts().await.unwrap()[0].1.running == 1
    })
    .await;
    signal(&daemon, Signal::SIGTERM);
    let status = wait_exit(&mut daemon, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    let tasks = records(&client, &ids).await;
    let (done, waiting): (Vec<_>, Vec<_>) = tasks
        .iter()
        .partition(|task| task.state == TaskState::Completed);
    // The running task was still this replica's when the agent answered
    // it during its stop_grace: stored, not released to run again.
    assert_eq!(done.len(), 1, "{tasks:?}");
    assert_eq!(
        done[0].result,
        Some(serde_json::json!({"wrapped_up": true}))
    );
    assert_eq!(waiting[0].state, TaskState::Queued, "{tasks:?}");
    assert_eq!(waiting[0].attempts, 0, "never started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_see_only_their_declared_environment() {
    let fleet = Fleet::new(
        r#"
[agents.env]
mode = "oneshot"
command = ["sh", "-c", "env"]
env = { DECLARED = "yes", PASSED = "${FLOTILLA_TEST_PASSED}" }
"#,
    );
    assert!(
        fleet
            .cli(&[
                "submit",
                "--agent",
                "env",
                "--id",
                "env-1",
                "--payload",
                "{}"
            ])
            .status
            .success()
    );
    let client = fleet.client();
    let mut daemon = std::process::Command::new(flotilla_bin())
        .args(["-c", fleet.config_path.to_str().unwrap(), "up"])
        .env("FLOTILLA_LOG", "warn")
        .env("DAEMON_SECRET", "hunter2")
        .env("FLOTILLA_TEST_PASSED", "explicitly")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "the env task to finish",
        || async { finished(&client).await >= 1 },
    )
    .await;
    signal(&daemon, Signal::SIGTERM);
    wait_exit(&mut daemon, Duration::from_secs(20));
    let task = client.get("env-1").await.unwrap().unwrap();
    let output = task.result.unwrap().as_str().unwrap().to_string();
    let names: Vec<&str> = output
        .lines()
        .filter_map(|line| line.split('=').next())
        .collect();
    assert!(
        !output.contains("hunter2"),
        "a daemon secret leaked: {output}"
    );
    assert!(
        output.contains("DECLARED=yes") && output.contains("PASSED=explicitly"),
        "{output}"
    );
    assert!(
        names.contains(&"PATH") && names.contains(&"FLOTILLA_AGENT"),
        "{output}"
    );
    for name in &names {
        assert!(
            [
                "DECLARED",
                "PASSED",
                "PATH",
                "HOME",
                "LANG",
                "PWD",
                "SHLVL",
                "_",
                "FLOTILLA_AGENT",
                "FLOTILLA_REPLICA",
                "FLOTILLA_INSTANCE"
            ]
            .contains(name),
            "unexpected variable {name} reached the agent: {output}"
        );
    }
}

/// `flotilla up` as a real process (run by `wrapper`, e.g. `nohup`, if
/// given), logging at info to `daemon.log`, in JSON lines when `json`.
fn up_logged(fleet: &Fleet, wrapper: Option<&str>, json: bool) -> std::process::Child {
    let log = std::fs::File::create(fleet.path("daemon.log")).unwrap();
    let mut command = match wrapper {
        Some(wrapper) => {
            let mut command = std::process::Command::new(wrapper);
            command.arg(flotilla_bin());
            command
        }
        None => std::process::Command::new(flotilla_bin()),
    };
    command.args(["-c", fleet.config_path.to_str().unwrap()]);
    if json {
        command.args(["--log-format", "json"]);
    }
    die_with_parent(&mut command)
        .arg("up")
        .env("FLOTILLA_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Started with SIGHUP ignored (`nohup flotilla up &`), the daemon goes on
/// ignoring it: a closed terminal does not stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_nohup_a_hang_up_does_not_stop_the_daemon() {
    let fleet = Fleet::new(&format!(
        "[agents.worker]\ncommand = {}\n",
        example_agent(&["--work-ms", "1"])
    ));
    let mut daemon = up_logged(&fleet, Some("nohup"), false);
    wait_until(Duration::from_secs(20), "the fleet to start", || async {
        std::fs::read_to_string(fleet.path("daemon.log"))
            .is_ok_and(|log| log.contains("fleet started"))
    })
    .await;
    signal(&daemon, nix::sys::signal::Signal::SIGHUP);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "stopped by SIGHUP under nohup"
    );
    signal(&daemon, nix::sys::signal::Signal::SIGTERM);
    let status = wait_exit(&mut daemon, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
}

/// A replica that takes longer than `restart.reset_after` to say `ready`
/// and then crashes at once is crashing, not stable: its restart delay
/// grows, measured from its `ready`, not from its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_starter_that_crashes_at_once_backs_off() {
    let fleet = Fleet::new(
        r#"
[agents.slow]
command = ["sh", "-c", "sleep 1.2; echo '{{\"type\": \"ready\"}}'; sleep 0.05; exit 3"]
restart = { initial_backoff = "200ms", max_backoff = "5s", reset_after = "1s" }
"#,
    );
    let mut daemon = up_logged(&fleet, None, true);
    let delays = || {
        std::fs::read_to_string(fleet.path("daemon.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["message"] == "replica exited; restarting")
            .map(|line| line["delay"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    wait_until(Duration::from_secs(20), "three restarts", || async {
        delays().len() >= 3
    })
    .await;
    signal(&daemon, nix::sys::signal::Signal::SIGTERM);
    wait_exit(&mut daemon, Duration::from_secs(20));
    let delays = delays();
    assert_eq!(&delays[..3], ["200ms", "400ms", "800ms"], "{delays:?}");
}

/// `--log-format json`: one JSON object per line, and a failed attempt's
/// line carries its task, agent and attempt from the attempt's span.
/// (Here, not beside the in-process daemons of tests/health.rs: their
/// child reaper could collect this test's daemon process.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_follow_one_task_through_its_attempts() {
    let fleet = Fleet::new(&format!(
        r#"
[agents.flaky]
command = {}
retry = {{ max_deliver = 2, backoff = ["10ms"] }}
breaker = {{ enabled = false }}
"#,
        example_agent(&["--work-ms", "1", "--error-rate", "1.0"]),
    ));
    fleet.submit_numbered("flaky", 1, "followed");
    let mut daemon = up_logged(&fleet, None, true);
    let client = fleet.client();
    wait_until(
        Duration::from_secs(30),
        "the task to be dead-lettered",
        || async { finished(&client).await == 1 },
    )
    .await;
    // A hang-up (its terminal closed) stops it gracefully, as SIGTERM does.
    signal(&daemon, nix::sys::signal::Signal::SIGHUP);
    let status = wait_exit(&mut daemon, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(fleet.path("daemon.log")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|line| line["message"] == "SIGHUP received"),
        "{text}"
    );
    let failed: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|line| line["message"] == "attempt failed")
        .collect();
    assert_eq!(failed.len(), 2, "{text}");
    for (n, line) in failed.iter().enumerate() {
        let span = &line["spans"][0];
        assert_eq!(span["name"], "attempt", "{line}");
        assert_eq!(span["task"], "followed-00000", "{line}");
        assert_eq!(span["agent"], "flaky", "{line}");
        assert_eq!(span["attempt"], n as u64 + 1, "{line}");
        assert_eq!(line["outcome"], "error", "{line}");
        assert_eq!(line["level"], "INFO", "{line}");
    }
}
