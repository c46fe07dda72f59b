//! Validation gates, the rollback journal and the post-accept watch, end
//! to end with real commands: a failing gate retries the task with the
//! report as feedback until it passes; a fix repairs the result; gates
//! escalate to a human or another agent; `auto_rollback` and a watch
//! breach undo what the result declared, observably; `flotilla rollback`
//! does it by hand, idempotently.

mod support;

use std::time::Duration;

use flotilla::queue::{AttemptOutcome, NewTask, Priority, TaskState};
use serde_json::{Value, json};
use support::*;

/// A persistent agent: creates the file `payload.create` (declaring the
/// change with its rollback), and answers `ok: true` from attempt
/// `payload.ok_from` on, echoing the feedback it got. `payload.slow_undo`
/// adds that many changes whose rollback takes a second each;
/// `payload.held_undo`, one whose rollback waits while `hold.flag` exists.
const AGENT: &str = r#"
import json, sys
print(json.dumps({"type": "ready", "protocol": 1}), flush=True)
for line in sys.stdin:
    m = json.loads(line)
    if m.get("type") == "shutdown":
        break
    if m.get("type") != "task":
        continue
    p = m["payload"]
    changes = []
    if "create" in p:
        with open(p["create"], "a") as f:
            f.write("attempt %d\n" % m["attempt"])
        changes.append({"description": "created " + p["create"], "rollback": ["rm", "-f", p["create"]]})
    for n in range(p.get("slow_undo", 0)):
        changes.append({"description": "step %d" % n, "rollback": ["sh", "-c", "sleep 1; echo %d >> undo.log" % n]})
    if p.get("held_undo"):
        changes.append({"description": "held", "rollback": ["sh", "-c", "while [ -e hold.flag ]; do sleep 0.05; done; echo held >> undo.log"]})
    out = {"ok": m["attempt"] >= p.get("ok_from", 1), "attempt": m["attempt"], "feedback": m.get("feedback")}
    print(json.dumps({"type": "result", "id": m["id"], "output": out, "changes": changes}), flush=True)
"#;

fn task(id: &str, agent: &str, payload: Value) -> NewTask {
    NewTask {
        id: id.into(),
        agent: agent.into(),
        priority: Priority::Normal,
        payload,
    }
}

async fn wait_state(queue: &dyn flotilla::queue::TaskQueue, id: &str, state: TaskState) {
    wait_until(
        Duration::from_secs(30),
        &format!("{id} to be {state}"),
        || async {
            queue
                .get(id)
                .await
                .unwrap()
                .is_some_and(|task| task.state == state)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gates_retry_with_feedback_fix_escalate_and_roll_back() {
    let ok = r#"grep -q '"ok":true' "$FLOTILLA_RESULT_FILE" || { echo 'ok is false: make it true' >&2; exit 1; }"#;
    let fleet = Fleet::new(&format!(
        r#"
[agents.coder]
command = ["python3", "agent.py"]
retry = {{ max_deliver = 3, backoff = ["10ms"] }}
breaker = {{ enabled = false }}

[agents.coder.validation]
checks = [
  {{ name = "tests", types = ["code"], command = ["sh", "-c", {ok:?}] }},
  {{ name = "lint", types = ["code"], command = ["sh", "-c", "echo style nits >&2; exit 1"], required = false }},
  {{ name = "format", types = ["fmt"], command = ["sh", "-c", "grep -q fixed \"$FLOTILLA_RESULT_FILE\""], on_failure = "auto_fix_and_revalidate", fix = ["sh", "-c", "echo '{{\"fixed\": true}}' > \"$FLOTILLA_RESULT_FILE\""] }},
  {{ name = "security", types = ["deploy"], command = ["sh", "-c", "echo secret in diff >&2; exit 1"], on_failure = "escalate" }},
  {{ name = "review", types = ["review"], command = ["false"], on_failure = "escalate", escalate_to = "senior" }},
  {{ name = "smoke", types = ["risky"], command = ["sh", "-c", {ok:?}], on_failure = "auto_rollback" }},
]

[agents.senior]
command = ["python3", "agent.py"]
"#
    ));
    std::fs::write(fleet.path("agent.py"), AGENT).unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    queue
        .submit(vec![
            task("code", "coder", json!({"type": "code", "ok_from": 2})),
            task("fmt", "coder", json!({"type": "fmt"})),
            task("deploy", "coder", json!({"type": "deploy"})),
            task("review", "coder", json!({"type": "review"})),
            task(
                "risky",
                "coder",
                json!({"type": "risky", "create": "risky.txt", "ok_from": 2}),
            ),
        ])
        .await
        .unwrap();

    // Rejected, retried with the report as feedback, then accepted; the
    // optional check's failure is only noted.
    wait_state(queue.as_ref(), "code", TaskState::Completed).await;
    let code = queue.get("code").await.unwrap().unwrap();
    assert_eq!(
        code.history[0].outcome,
        Some(AttemptOutcome::ValidationFailed)
    );
    let report = code.history[0].detail.clone().unwrap();
    assert!(
        report.contains("check \"tests\" failed") && report.contains("ok is false"),
        "{report}"
    );
    let result = code.result.clone().unwrap();
    assert_eq!(result["ok"], true);
    assert_eq!(
        result["feedback"],
        report.as_str(),
        "the next attempt got the report"
    );
    let noted = code.history.last().unwrap().detail.clone().unwrap();
    assert!(
        noted.contains("optional checks failed") && noted.contains("style nits"),
        "{noted}"
    );

    // The fix rewrote the result, which passed on the next round.
    wait_state(queue.as_ref(), "fmt", TaskState::Completed).await;
    let fmt = queue.get("fmt").await.unwrap().unwrap();
    assert_eq!(fmt.result, Some(json!({"fixed": true})));
    assert_eq!(fmt.history.len(), 1, "fixed within the attempt");

    // Escalated to a human with the report.
    wait_state(queue.as_ref(), "deploy", TaskState::Escalated).await;
    let deploy = queue.get("deploy").await.unwrap().unwrap();
    let reason = deploy.reason.clone().unwrap();
    assert!(
        reason.contains("security") && reason.contains("secret in diff"),
        "{reason}"
    );

    // Escalated to another agent, whose attempt got the report.
    wait_state(queue.as_ref(), "review", TaskState::Completed).await;
    let review = queue.get("review").await.unwrap().unwrap();
    assert_eq!(review.agent, "senior");
    let feedback = review.result.clone().unwrap()["feedback"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(feedback.contains("escalated to agent senior"), "{feedback}");

    // auto_rollback undid the first attempt's file, then the retry passed.
    wait_state(queue.as_ref(), "risky", TaskState::Completed).await;
    let risky = queue.get("risky").await.unwrap().unwrap();
    let first = risky.history[0].detail.clone().unwrap();
    assert!(
        first.contains("auto_rollback: 1 change(s) rolled back"),
        "{first}"
    );
    let file = fleet.path("risky.txt");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "attempt 2\n");

    // By hand: undone, and a second run changes nothing.
    let undone = fleet.cli(&["rollback", "risky", "--json"]);
    assert!(undone.status.success(), "{undone:?}");
    assert!(!file.exists());
    let journal: Value = serde_json::from_slice(&undone.stdout).unwrap();
    assert_eq!(journal["changes"][0]["state"], "rolled_back");
    assert_eq!(journal["changes"][0]["runs"], 1);
    std::fs::write(&file, "recreated by someone else\n").unwrap();
    let again = fleet.cli(&["rollback", "risky", "--json"]);
    assert!(again.status.success(), "{again:?}");
    let journal: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(journal["changes"][0]["runs"], 1, "not run twice");
    assert!(
        file.exists(),
        "a change already rolled back is not undone again"
    );
    let none = fleet.cli(&["rollback", "code"]);
    assert_eq!(none.status.code(), Some(2), "{none:?}");
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("no rollback journal"),
        "{none:?}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_breach_rolls_the_accepted_task_back() {
    let fleet = Fleet::new(
        r#"
[agents.deployer]
command = ["python3", "agent.py"]

[agents.deployer.watch]
duration = "30s"
interval = "1s"
checks = [ { name = "health", command = ["sh", "-c", "if [ -e slow.flag ]; then sleep 30; fi; test ! -e broken.flag"], timeout = "500ms" } ]
"#,
    );
    std::fs::write(fleet.path("agent.py"), AGENT).unwrap();
    let daemon = fleet.start().await;
    let store = fleet.store().await;
    accept_watched_release(&store).await;
    let deployed = fleet.path("deployed.txt");
    assert!(deployed.exists());
    // Healthy for a while, then a check that times out once or twice (a
    // slow monitoring host: no answer, not a failure): nothing happens.
    // (A round is the 1 s interval and the 500 ms timeout: at most two
    // in 2.2 s.)
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(deployed.exists());
    std::fs::write(fleet.path("slow.flag"), "").unwrap();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    std::fs::remove_file(fleet.path("slow.flag")).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(deployed.exists(), "rolled back on a check that timed out");
    // Timing out again and again (a wedged service) is a breach.
    std::fs::write(fleet.path("slow.flag"), "").unwrap();
    // The journal is saved just after the command ran; until then the
    // CLI would find the daemon's rollback still holding its claim.
    wait_until(Duration::from_secs(20), "the rollback", || async {
        !deployed.exists()
            && flotilla::rollback::load(&store, "release")
                .await
                .unwrap()
                .is_some_and(|journal| journal.is_rolled_back())
    })
    .await;
    let shown = fleet.cli(&["rollback", "release", "--json"]);
    assert!(shown.status.success(), "{shown:?}");
    let journal: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(journal["changes"][0]["state"], "rolled_back", "{journal}");
    assert!(
        journal["rolled_back_because"]
            .as_str()
            .unwrap()
            .contains("watch check \"health\" breached: the check timed out 3 times in a row"),
        "{journal}"
    );
    daemon.stop().await;
}

/// A watch samples every interval and once more at its window's end, never
/// after it: with `duration = "3s"` and `interval = "2s"`, the baseline
/// and samples at 2 s and 3 s (none at 4 s); with `interval` equal to
/// `duration`, the baseline and one sample at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_samples_up_to_its_windows_end_and_not_after() {
    let watch = |agent: &str, duration: &str, interval: &str| {
        format!(
            r#"
[agents.{agent}]
command = ["python3", "agent.py"]

[agents.{agent}.watch]
duration = "{duration}"
interval = "{interval}"
checks = [ {{ name = "health", command = ["sh", "-c", "date +%s%N >> {agent}.log"] }} ]
"#
        )
    };
    let fleet = Fleet::new(&format!(
        "{}{}",
        watch("deployer", "3s", "2s"),
        watch("edge", "2s", "2s")
    ));
    std::fs::write(fleet.path("agent.py"), AGENT).unwrap();
    let daemon = fleet.start().await;
    let store = fleet.store().await;
    store
        .queue()
        .submit(vec![
            task("release", "deployer", json!({})),
            task("edge-release", "edge", json!({})),
        ])
        .await
        .unwrap();
    for agent in ["deployer", "edge"] {
        wait_until(Duration::from_secs(20), "the watch to end", || async {
            std::fs::read_to_string(fleet.path(&format!("{agent}.log")))
                .is_ok_and(|log| !log.is_empty())
                && store
                    .get_control(&format!("watches.{agent}"))
                    .await
                    .is_ok_and(|list| list.is_none())
        })
        .await;
    }
    // Past where a sample after the window would have come.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let times = |agent: &str| -> Vec<f64> {
        std::fs::read_to_string(fleet.path(&format!("{agent}.log")))
            .unwrap()
            .lines()
            .map(|line| line.parse::<f64>().unwrap() / 1e9)
            .collect()
    };
    let deployer = times("deployer");
    assert_eq!(deployer.len(), 3, "{deployer:?}");
    let last = deployer[2] - deployer[0];
    assert!((2.5..3.8).contains(&last), "last sample {last} s in");
    let edge = times("edge");
    assert_eq!(edge.len(), 2, "{edge:?}");
    daemon.stop().await;
}

/// A watch outlives its daemon: `kill -9` it while it watches an accepted
/// task, start it again, and a breach still rolls the task back.
/// A fleet of one watched agent, `deployer`, on `broker` if given.
fn watched_fleet(broker: Option<&support::nats::NatsServer>) -> Fleet {
    let broker = broker.map_or_else(String::new, |server| {
        format!(
            "[broker]\nurl = \"{}\"\nack_wait = \"2s\"\nfleet_ttl = \"3s\"\n\n",
            server.url
        )
    });
    let fleet = Fleet::new(&format!(
        r#"{broker}
[agents.deployer]
command = ["python3", "agent.py"]

[agents.deployer.watch]
duration = "2m"
interval = "1s"
checks = [ {{ name = "health", command = ["sh", "-c", "test ! -e broken.flag"] }} ]
"#
    ));
    std::fs::write(fleet.path("agent.py"), AGENT).unwrap();
    fleet
}

/// Accepts the task `release` (which creates deployed.txt) on the running
/// daemon, and waits until its watch is kept in the store.
async fn accept_watched_release(store: &flotilla::store::Store) {
    accept_watched(store, json!({"create": "deployed.txt"})).await;
}

/// Accepts the task `release` with `payload` on the running daemon, and
/// waits until its watch is kept in the store.
async fn accept_watched(store: &flotilla::store::Store, payload: Value) {
    store
        .queue()
        .submit(vec![task("release", "deployer", payload)])
        .await
        .unwrap();
    wait_state(store.queue().as_ref(), "release", TaskState::Completed).await;
    wait_until(Duration::from_secs(10), "the watch kept", || async {
        store
            .get_control("watches.deployer")
            .await
            .is_ok_and(|list| list.is_some_and(|list| list.to_string().contains("release")))
    })
    .await;
}

/// Breaks the deployment and waits for the watch to roll `release` back
/// and end.
async fn breach_and_see_the_rollback(fleet: &Fleet, store: &flotilla::store::Store) {
    let deployed = fleet.path("deployed.txt");
    assert!(deployed.exists());
    std::fs::write(fleet.path("broken.flag"), "").unwrap();
    wait_until(Duration::from_secs(30), "the rollback", || async {
        !deployed.exists()
    })
    .await;
    let journal = flotilla::rollback::load(store, "release")
        .await
        .unwrap()
        .expect("a journal");
    assert!(
        journal
            .rolled_back_because
            .as_deref()
            .is_some_and(|why| why.contains("watch check \"health\" breached")),
        "{journal:?}"
    );
    // The watch ended: nothing left for the next daemon.
    wait_until(Duration::from_secs(10), "the watch forgotten", || async {
        store
            .get_control("watches.deployer")
            .await
            .is_ok_and(|list| list.is_none())
    })
    .await;
}

async fn a_watch_goes_on_after_its_daemon_is_killed(broker: Option<&support::nats::NatsServer>) {
    let fleet = watched_fleet(broker);
    let store = fleet.store().await;
    let mut first = fleet.spawn_daemon();
    accept_watched_release(&store).await;
    signal(&first, nix::sys::signal::Signal::SIGKILL);
    wait_exit(&mut first, Duration::from_secs(10));
    let daemon = fleet.start().await;
    breach_and_see_the_rollback(&fleet, &store).await;
    daemon.stop().await;
}

/// On a broker, the watch of a daemon that died is taken over by a daemon
/// of another name once the dead one's fleet entry lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_daemons_watch_is_taken_over_on_jetstream() {
    let Some(server) =
        support::nats::NatsServer::start("a_dead_daemons_watch_is_taken_over_on_jetstream")
    else {
        return;
    };
    let fleet = watched_fleet(Some(&server));
    let store = fleet.store().await;
    let mut first = fleet.spawn_named("a");
    accept_watched_release(&store).await;
    let mut second = fleet.spawn_named("b");
    // b runs, and leaves a's watch to a while a runs.
    wait_until(Duration::from_secs(20), "daemon b in the fleet", || async {
        store
            .snapshots()
            .await
            .is_ok_and(|all| all.iter().any(|snapshot| snapshot.name == "b"))
    })
    .await;
    signal(&first, nix::sys::signal::Signal::SIGKILL);
    wait_exit(&mut first, Duration::from_secs(10));
    breach_and_see_the_rollback(&fleet, &store).await;
    let _ = second.kill();
    let _ = second.wait();
}

/// A breach's rollback cut short by the daemon's death is finished by the
/// next daemon, though the check passes by then (the part undone fixed
/// it): not left half done until another breach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_rollback_cut_short_is_finished_by_the_next_daemon() {
    watch_rollback_cut_short(false).await;
}

/// The same, with the dead daemon's claim looking live for a while (as one
/// of another machine, or another pid namespace, does until it lapses):
/// the next daemon waits for it to lapse and then finishes the rollback,
/// rather than leaving it to a rollback that no longer runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_rollback_cut_short_under_a_live_looking_claim_is_finished_once_it_lapses() {
    watch_rollback_cut_short(true).await;
}

async fn watch_rollback_cut_short(foreign_claim: bool) {
    let fleet = watched_fleet(None);
    let store = fleet.store().await;
    let mut first = fleet.spawn_daemon();
    accept_watched(&store, json!({"create": "deployed.txt", "slow_undo": 3})).await;
    std::fs::write(fleet.path("broken.flag"), "").unwrap();
    // The last change is undone first; then the daemon dies.
    let log = fleet.path("undo.log");
    wait_until(Duration::from_secs(30), "the first undo", || async {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains('2'))
    })
    .await;
    signal(&first, nix::sys::signal::Signal::SIGKILL);
    wait_exit(&mut first, Duration::from_secs(10));
    std::fs::remove_file(fleet.path("broken.flag")).unwrap();
    if foreign_claim {
        let mut claim = store
            .get_control("rollback.release")
            .await
            .unwrap()
            .expect("the dead daemon's claim");
        claim["holder"]["boot"] = json!("another-machine");
        claim["until_ms"] = json!(flotilla::clock::system().now_ms() + 3_000);
        store.put_control("rollback.release", &claim).await.unwrap();
    }
    let daemon = fleet.start().await;
    wait_until(Duration::from_secs(30), "the rollback finished", || async {
        flotilla::rollback::load(&store, "release")
            .await
            .unwrap()
            .is_some_and(|journal| journal.is_rolled_back())
    })
    .await;
    assert!(!fleet.path("deployed.txt").exists());
    let undone = std::fs::read_to_string(&log).unwrap();
    for n in ["0", "1", "2"] {
        assert!(undone.lines().any(|line| line == n), "{undone}");
    }
    wait_until(Duration::from_secs(10), "the watch forgotten", || async {
        store
            .get_control("watches.deployer")
            .await
            .is_ok_and(|list| list.is_none())
    })
    .await;
    daemon.stop().await;
}

/// A gate whose program cannot be started says nothing of the result: the
/// attempt fails as an error, and its `auto_rollback` does not undo the
/// agent's work. One missing at startup keeps the fleet from starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_that_cannot_run_rolls_nothing_back() {
    let fleet = Fleet::new(
        r#"
[agents.deployer]
command = ["python3", "agent.py"]
retry = { max_deliver = 2, backoff = ["10ms"] }

[agents.deployer.validation]
checks = [
  { name = "lint", command = ["./lint.sh"], required = false },
  { name = "smoke", command = ["./smoke.sh"], on_failure = "auto_rollback" },
]
"#,
    );
    std::fs::write(fleet.path("agent.py"), AGENT).unwrap();
    let refused = flotilla::daemon::Daemon::start(fleet.config(), flotilla::clock::system())
        .await
        .err()
        .expect("a missing gate program is refused at startup")
        .to_string();
    assert!(
        refused.contains("agents.deployer.validation.checks[1].command[0]")
            && refused.contains("smoke.sh")
            && refused.contains("agents.deployer.validation.checks[0].command[0]"),
        "{refused}"
    );
    for script in ["smoke.sh", "lint.sh"] {
        let path = fleet.path(script);
        std::fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    // An optional check that cannot run is only reported: the result is
    // accepted.
    std::fs::remove_file(fleet.path("lint.sh")).unwrap();
    queue
        .submit(vec![task("linted", "deployer", json!({}))])
        .await
        .unwrap();
    wait_state(queue.as_ref(), "linted", TaskState::Completed).await;
    let linted = queue.get("linted").await.unwrap().unwrap();
    let detail = linted.history[0].detail.as_deref().unwrap_or_default();
    assert!(
        detail.contains("check \"lint\" could not be run"),
        "{linted:?}"
    );
    // A required one gone after startup.
    std::fs::remove_file(fleet.path("smoke.sh")).unwrap();
    queue
        .submit(vec![task(
            "deploy",
            "deployer",
            json!({"create": "deployed.txt"}),
        )])
        .await
        .unwrap();
    wait_state(queue.as_ref(), "deploy", TaskState::DeadLettered).await;
    let record = queue.get("deploy").await.unwrap().unwrap();
    assert_eq!(record.history.len(), 2, "{record:?}");
    for attempt in &record.history {
        assert_eq!(attempt.outcome, Some(AttemptOutcome::Error), "{record:?}");
        let detail = attempt.detail.as_deref().unwrap_or_default();
        assert!(
            detail.contains("validation could not run")
                && detail.contains("check \"smoke\" could not be run"),
            "{detail}"
        );
    }
    assert!(
        fleet.path("deployed.txt").exists(),
        "the agent's work was rolled back"
    );
    daemon.stop().await;
}

/// A rollback asked for while another runs is refused as busy with exit 1
/// (worth retrying), through a daemon's API as locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_rollback_exits_1_through_the_api_too() {
    let fleet = Fleet::new(
        r#"
[agents.deployer]
command = ["python3", "agent.py"]
"#,
    );
    std::fs::write(fleet.path("agent.py"), AGENT).unwrap();
    fleet.set_token("validation-token-3b9d");
    let daemon = fleet.start().await;
    let store = fleet.store().await;
    store
        .queue()
        .submit(vec![task(
            "release",
            "deployer",
            json!({"create": "deployed.txt", "held_undo": true}),
        )])
        .await
        .unwrap();
    wait_state(store.queue().as_ref(), "release", TaskState::Completed).await;
    // The first rollback holds the task until the flag goes.
    std::fs::write(fleet.path("hold.flag"), "").unwrap();
    let first = {
        let (store, config) = (store.clone(), fleet.config());
        tokio::spawn(async move {
            flotilla::rollback::roll_back_task(&store, &config, "release", "test", || {
                flotilla::clock::system().now_ms()
            })
            .await
        })
    };
    wait_until(
        Duration::from_secs(10),
        "the first rollback's claim",
        || async {
            store
                .get_control("rollback.release")
                .await
                .is_ok_and(|claim| claim.is_some())
        },
    )
    .await;
    let api = format!("http://{}", daemon.http_address().unwrap());
    let token = fleet.path("api-token");
    let token = token.to_str().unwrap();
    for args in [
        vec!["rollback", "release"],
        vec!["--api", &api, "--token-file", token, "rollback", "release"],
    ] {
        let busy = fleet.cli(&args);
        assert_eq!(busy.status.code(), Some(1), "{args:?}: {busy:?}");
        assert!(
            String::from_utf8_lossy(&busy.stderr).contains("already"),
            "{args:?}: {busy:?}"
        );
    }
    std::fs::remove_file(fleet.path("hold.flag")).unwrap();
    first.await.unwrap().unwrap();
    assert!(!fleet.path("deployed.txt").exists());
    daemon.stop().await;
}

/// A journal that an earlier gate's auto_rollback used (its reason kept)
/// is no cut-short breach: a daemon that goes on with the accepted task's
/// watch after a restart leaves the accepted changes alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_undo_work_accepted_after_a_gate_rollback() {
    let ok = r#"grep -q '"ok":true' "$FLOTILLA_RESULT_FILE""#;
    let fleet = Fleet::new(&format!(
        r#"
[agents.deployer]
command = ["python3", "agent.py"]
retry = {{ max_deliver = 3, backoff = ["10ms"] }}
breaker = {{ enabled = false }}

[agents.deployer.validation]
checks = [ {{ name = "smoke", command = ["sh", "-c", {ok:?}], on_failure = "auto_rollback" }} ]

[agents.deployer.watch]
duration = "2m"
interval = "1s"
checks = [ {{ name = "health", command = ["sh", "-c", "test ! -e broken.flag"] }} ]
"#
    ));
    std::fs::write(fleet.path("agent.py"), AGENT).unwrap();
    let store = fleet.store().await;
    let mut first = fleet.spawn_daemon();
    // Attempt 1 fails its gate and is rolled back; attempt 2 is accepted.
    accept_watched(&store, json!({"create": "deployed.txt", "ok_from": 2})).await;
    let journal = flotilla::rollback::load(&store, "release")
        .await
        .unwrap()
        .unwrap();
    assert!(journal.rolled_back_because.is_some(), "{journal:?}");
    assert!(fleet.path("deployed.txt").exists());
    signal(&first, nix::sys::signal::Signal::SIGKILL);
    wait_exit(&mut first, Duration::from_secs(10));
    let daemon = fleet.start().await;
    // It goes on with the watch (a few rounds), and undoes nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(fleet.path("deployed.txt").exists(), "accepted work undone");
    assert!(
        store
            .get_control("watches.deployer")
            .await
            .unwrap()
            .is_some_and(|list| list.to_string().contains("release")),
        "the watch goes on"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_outlives_its_daemon() {
    a_watch_goes_on_after_its_daemon_is_killed(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_outlives_its_daemon_on_jetstream() {
    let Some(server) = support::nats::NatsServer::start("a_watch_outlives_its_daemon_on_jetstream")
    else {
        return;
    };
    a_watch_goes_on_after_its_daemon_is_killed(Some(&server)).await;
}

/// A Prometheus stand-in: answers every query with the value in `value`
/// (an f64's bits).
async fn prometheus(value: std::sync::Arc<std::sync::atomic::AtomicU64>) -> std::net::SocketAddr {
    http_stand_in(move |line| {
        assert!(line.starts_with("GET /api/v1/query?query="), "{line}");
        let now = f64::from_bits(value.load(std::sync::atomic::Ordering::SeqCst));
        let body = json!({"status": "success", "data": {"resultType": "vector",
            "result": [{"metric": {}, "value": [1_700_000_000.0, now.to_string()]}]}});
        (200, body.to_string())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_error_rate_over_the_baseline_rolls_back() {
    let rate = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0.02f64.to_bits()));
    let address = prometheus(rate.clone()).await;
    let fleet = Fleet::new(&format!(
        r#"
[agents.deployer]
command = ["python3", "agent.py"]

[agents.deployer.watch]
duration = "30s"
interval = "1s"
checks = [ {{ name = "errors", prometheus = "http://{address}", query = "sum(rate(errors[1m]))", max_increase = 0.01 }} ]
"#
    ));
    std::fs::write(fleet.path("agent.py"), AGENT).unwrap();
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    queue
        .submit(vec![task(
            "canary",
            "deployer",
            json!({"create": "canary.txt"}),
        )])
        .await
        .unwrap();
    wait_state(queue.as_ref(), "canary", TaskState::Completed).await;
    let canary = fleet.path("canary.txt");
    // Within the threshold: kept.
    rate.store(0.025f64.to_bits(), std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(canary.exists());
    // Over it: rolled back.
    rate.store(0.05f64.to_bits(), std::sync::atomic::Ordering::SeqCst);
    wait_until(Duration::from_secs(20), "the rollback", || async {
        !canary.exists()
    })
    .await;
    daemon.stop().await;
}

/// An agent whose result declares one change, undone by `undo.sh`, and is
/// good from attempt 2 on; each attempt is written to `events.log`.
const LOGGING_AGENT: &str = r#"
import json, sys
print(json.dumps({"type": "ready", "protocol": 1}), flush=True)
for line in sys.stdin:
    m = json.loads(line)
    if m.get("type") == "shutdown":
        break
    if m.get("type") != "task":
        continue
    with open("events.log", "a") as f:
        f.write("attempt %d\n" % m["attempt"])
    change = {"description": "deployed", "rollback": ["sh", "undo.sh"]}
    out = {"ok": m["attempt"] >= 2}
    print(json.dumps({"type": "result", "id": m["id"], "output": out, "changes": [change]}), flush=True)
"#;

/// The rollback command: its first run hangs (as `undo.pid`) until the
/// test kills it; later runs log `undone`.
const SLOW_FIRST_UNDO: &str = r#"if [ ! -e undo.once ]; then
  touch undo.once
  echo $$ > undo.pid
  exec sleep 60
fi
echo undone >> events.log
"#;

/// A gate's `auto_rollback` cut off by the daemon's death (`kill -9`,
/// the rollback command killed too, as when the machine dies) is
/// finished before the task's next attempt runs: the next attempt must
/// not run on top of the changes that were being undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_rollback_cut_off_by_a_crash_is_finished_before_the_next_attempt() {
    a_cut_off_rollback_is_finished_first(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_rollback_cut_off_by_a_crash_is_finished_first_on_jetstream() {
    let Some(server) = support::nats::NatsServer::start(
        "an_auto_rollback_cut_off_by_a_crash_is_finished_first_on_jetstream",
    ) else {
        return;
    };
    a_cut_off_rollback_is_finished_first(Some(&server)).await;
}

async fn a_cut_off_rollback_is_finished_first(broker: Option<&support::nats::NatsServer>) {
    let broker = broker.map_or_else(String::new, |server| {
        format!(
            "[broker]\nurl = \"{}\"\nack_wait = \"2s\"\nfleet_ttl = \"3s\"\n\n",
            server.url
        )
    });
    let ok = r#"grep -q '"ok":true' "$FLOTILLA_RESULT_FILE""#;
    let fleet = Fleet::new(&format!(
        r#"{broker}
[agents.deployer]
command = ["python3", "agent.py"]
retry = {{ max_deliver = 6, backoff = ["10ms"] }}
breaker = {{ enabled = false }}

[agents.deployer.validation]
checks = [ {{ name = "smoke", command = ["sh", "-c", {ok:?}], on_failure = "auto_rollback" }} ]
"#
    ));
    std::fs::write(fleet.path("agent.py"), LOGGING_AGENT).unwrap();
    std::fs::write(fleet.path("undo.sh"), SLOW_FIRST_UNDO).unwrap();
    let store = fleet.store().await;
    let mut first = fleet.spawn_daemon();
    store
        .queue()
        .submit(vec![task("deploy", "deployer", json!({}))])
        .await
        .unwrap();
    let pid_file = fleet.path("undo.pid");
    wait_until(Duration::from_secs(30), "the rollback to start", || async {
        std::fs::read_to_string(&pid_file).is_ok_and(|pid| pid.ends_with('\n'))
    })
    .await;
    signal(&first, nix::sys::signal::Signal::SIGKILL);
    wait_exit(&mut first, Duration::from_secs(10));
    let undo: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(undo),
        nix::sys::signal::Signal::SIGKILL,
    );
    let daemon = fleet.start().await;
    wait_state(store.queue().as_ref(), "deploy", TaskState::Completed).await;
    let events = std::fs::read_to_string(fleet.path("events.log")).unwrap();
    let events: Vec<&str> = events.lines().collect();
    // Attempt 2 was held while the rollback was finished, then released
    // uncharged; attempt 3 ran on a clean slate.
    assert_eq!(events, ["attempt 1", "undone", "attempt 3"], "{events:?}");
    let journal = flotilla::rollback::load(&store, "deploy")
        .await
        .unwrap()
        .expect("a journal");
    let states: Vec<(u32, flotilla::rollback::ChangeState)> = journal
        .changes
        .iter()
        .map(|entry| (entry.attempt, entry.state))
        .collect();
    assert_eq!(
        states,
        [
            (1, flotilla::rollback::ChangeState::RolledBack),
            (3, flotilla::rollback::ChangeState::Applied)
        ],
        "{journal:?}"
    );
    let task = store.queue().get("deploy").await.unwrap().unwrap();
    assert_eq!(
        task.history[1].outcome,
        Some(AttemptOutcome::Released),
        "{:?}",
        task.history
    );
    daemon.stop().await;
}
