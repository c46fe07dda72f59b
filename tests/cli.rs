//! The command line as users run it: config errors, submitting while the
//! daemon is down, bad input, listings and schemas.

mod support;

use support::*;

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_bad_config_lists_every_problem_and_exits_2() {
    let fleet = Fleet::new(
        r#"
[agents.worker]
command = ["x"]
mode = "fast"
replicas = { min = 0 }
timeouts = { progress_timeout = "soon" }
"#,
    );
    let output = fleet.cli(&["status"]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains("3 problems"), "{message}");
    assert!(
        message.contains("agents.worker.mode") && message.contains("`fast`"),
        "{message}"
    );
    assert!(
        message.contains("agents.worker.timeouts.progress_timeout") && message.contains("\"soon\""),
        "{message}"
    );
    assert!(message.contains("agents.worker.replicas.min"), "{message}");
    assert!(message.contains("line "), "positions are given: {message}");
}

#[test]
fn a_missing_config_says_how_to_give_one() {
    let output = std::process::Command::new(flotilla_bin())
        .args(["-c", "/nonexistent/flotilla.toml", "status"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("FLOTILLA_CONFIG"));
}

/// Files flotilla reads whole are bounded: an endless or huge one is
/// refused, naming the limit, not read until memory runs out.
#[test]
fn endless_input_files_are_refused_not_read() {
    let fleet = Fleet::new("[agents.worker]\ncommand = [\"true\"]\n");
    let config = fleet.config_path.to_str().unwrap();
    let huge = fleet.path("huge.yml");
    std::fs::write(&huge, vec![b'#'; 5 << 20]).unwrap();
    for (args, expected) in [
        (
            vec!["-c", "/dev/zero", "config", "check"],
            "cannot read config file /dev/zero: it is larger than 4194304 bytes",
        ),
        (
            vec![
                "--api",
                "http://127.0.0.1:9",
                "--token-file",
                "/dev/zero",
                "status",
            ],
            "--token-file /dev/zero: it is larger than 65536 bytes",
        ),
        (
            vec!["check", config, "--alerts", huge.to_str().unwrap()],
            "larger than 4194304 bytes",
        ),
    ] {
        let output = std::process::Command::new(flotilla_bin())
            .args(&args)
            .output()
            .unwrap();
        assert!(
            matches!(output.status.code(), Some(1 | 2)),
            "{args:?}: {output:?}"
        );
        let said = format!("{}{}", stderr(&output), stdout(&output));
        assert!(said.contains(expected), "{args:?}: {said}");
    }
}

/// Submits the batch in `file` to agent `worker` through the API at `api`.
fn submit_file_to(fleet: &Fleet, api: &str, file: &str) -> std::process::Output {
    fleet.cli(&["--api", api, "submit", "--agent", "worker", "--file", file])
}

/// A batch whose request would be over what a daemon takes is refused
/// before it is sent, though the file itself is under that size.
#[test]
fn a_batch_too_big_for_one_request_is_refused_before_it_is_sent() {
    let fleet = Fleet::new("[agents.worker]\ncommand = [\"true\"]\n");
    let batch = fleet.path("batch.jsonl");
    let line = format!("{{\"text\": \"{}\"}}\n", "x".repeat(640));
    std::fs::write(&batch, line.repeat(100_000)).unwrap();
    assert!(std::fs::metadata(&batch).unwrap().len() < 64 << 20);
    let refused = submit_file_to(&fleet, "http://127.0.0.1:9", batch.to_str().unwrap());
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        stderr(&refused).contains("over the 67108864 a daemon takes"),
        "{refused:?}"
    );
}

/// A submit that fails where part of it may be stored says how to finish
/// it without storing a task twice: for a batch, a copy of it with every
/// task's id; for one task, the id it was given.
#[test]
fn a_failed_submit_leaves_the_ids_to_submit_again_with() {
    let fleet = Fleet::new("[agents.worker]\ncommand = [\"true\"]\n");
    let batch = fleet.path("batch.jsonl");
    std::fs::write(
        &batch,
        "{\"n\": 1}\n{\"id\": \"mine\", \"payload\": {\"n\": 2}}\n",
    )
    .unwrap();
    let batch = batch.to_str().unwrap();
    let saved = format!("{batch}.ids.jsonl");
    // No daemon there: nothing can have been stored, nothing to say.
    let unreached = submit_file_to(&fleet, "http://127.0.0.1:9", batch);
    assert_eq!(unreached.status.code(), Some(1), "{unreached:?}");
    assert!(!stderr(&unreached).contains("may have been stored"));
    assert!(!std::path::Path::new(&saved).exists());
    // A daemon that takes the call and never answers: it may have stored
    // some of it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api = format!("http://{}", silent.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in silent.incoming() {
            let mut stream = stream.unwrap();
            let mut buffer = [0u8; 4096];
            let _ = std::io::Read::read(&mut stream, &mut buffer);
        }
    });
    let failed = submit_file_to(&fleet, &api, batch);
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    let said = stderr(&failed);
    assert!(
        said.contains("some of it may have been stored") && said.contains(&saved),
        "{said}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&saved)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["id"].is_string(), "an id given: {lines:?}");
    assert_eq!(lines[1]["id"], "mine");
    assert_eq!(lines[1]["payload"], serde_json::json!({"n": 2}));
    // Submitted twice, as after a partial failure: each task stored once.
    for _ in 0..2 {
        let done = fleet.cli(&["submit", "--agent", "worker", "--file", &saved]);
        assert!(done.status.success(), "{done:?}");
    }
    let listed = fleet.cli(&["tasks", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    // One task: its generated id, to give again.
    let failed = fleet.cli(&[
        "--api",
        &api,
        "submit",
        "--agent",
        "worker",
        "--payload",
        "{}",
    ]);
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    assert!(
        stderr(&failed).contains("submit it again with --id "),
        "{failed:?}"
    );
    // A refusal stores nothing: no copy, no hint.
    std::fs::remove_file(&saved).unwrap();
    let refused = fleet.cli(&["submit", "--agent", "nobody", "--file", batch]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(!std::path::Path::new(&saved).exists());
}

#[test]
fn both_checks_take_the_config_by_flag_or_by_argument() {
    let fleet = Fleet::new("[agents.worker]\ncommand = [\"true\"]\n");
    let path = fleet.config_path.to_str().unwrap();
    for args in [
        vec!["config", "check", path],
        vec!["-c", path, "config", "check"],
        vec!["check", "-c", path],
        vec!["check", path],
    ] {
        let output = std::process::Command::new(flotilla_bin())
            .args(&args)
            .current_dir("/")
            .output()
            .unwrap();
        // `check` exits 1 when required checklist items fail; either way
        // it read the file.
        assert!(
            matches!(output.status.code(), Some(0 | 1)),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stdout(&output).contains("worker"),
            "{args:?}: {}",
            stdout(&output)
        );
    }
}

#[test]
fn a_store_path_that_is_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.toml");
    std::fs::write(
        &path,
        "[store]\npath = \".\"\n[agents.worker]\ncommand = [\"true\"]\n",
    )
    .unwrap();
    let output = std::process::Command::new(flotilla_bin())
        .args(["config", "check", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ne!(output.status.code(), Some(0));
    assert!(
        stderr(&output).contains("is a directory; give a file in it"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn listings_refuse_an_unknown_agent_and_a_zero_limit() {
    let fleet = Fleet::new("[agents.worker]\ncommand = [\"true\"]\n");
    let unknown = fleet.cli(&["tasks", "list", "--agent", "nosuch"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        stderr(&unknown).contains("no agent \"nosuch\"; configured agents: worker"),
        "{}",
        stderr(&unknown)
    );
    let zero = fleet.cli(&["dlq", "list", "--limit", "0"]);
    assert_eq!(zero.status.code(), Some(2));
    assert!(
        stderr(&zero).contains("valid: 1 to 10000"),
        "{}",
        stderr(&zero)
    );
}

#[test]
fn up_listen_overrides_the_config_and_is_checked_like_it() {
    let fleet = Fleet::new("[agents.worker]\ncommand = [\"true\"]\n");
    let bad = fleet.cli(&["up", "--listen", "nope"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("invalid --listen \"nope\": use ADDRESS:PORT"),
        "{}",
        stderr(&bad)
    );
    let open = fleet.cli(&["up", "--listen", "0.0.0.0:0"]);
    assert_eq!(open.status.code(), Some(2));
    assert!(
        stderr(&open).contains("http.listen: 0.0.0.0:0 is reachable from other machines"),
        "{}",
        stderr(&open)
    );
}

#[test]
fn top_without_a_terminal_says_so() {
    let fleet = Fleet::new("[agents.worker]\ncommand = [\"true\"]\n");
    let output = fleet.cli(&["top"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("flotilla top needs a terminal"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn submit_while_the_daemon_is_down_then_list_and_show() {
    let fleet = Fleet::new("[agents.worker]\ncommand = [\"true\"]\n");
    let output = fleet.cli(&[
        "submit",
        "--agent",
        "worker",
        "--id",
        "first",
        "--priority",
        "high",
        "--payload",
        r#"{"prompt": "hi"}"#,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output).trim(), "first");
    let again = fleet.cli(&[
        "submit",
        "--agent",
        "worker",
        "--id",
        "first",
        "--payload",
        "{}",
    ]);
    assert!(again.status.success());
    assert!(stdout(&again).contains("duplicate"));
    let file =
        "{\"id\": \"f1\", \"payload\": 1, \"priority\": \"low\"}\n\n[1, 2]\n\"plain string\"\n";
    let from_stdin = fleet.cli_with_stdin(
        &["submit", "--agent", "worker", "--file", "-", "--json"],
        Some(file),
    );
    assert!(from_stdin.status.success(), "{}", stderr(&from_stdin));
    let receipts: serde_json::Value = serde_json::from_slice(&from_stdin.stdout).unwrap();
    assert_eq!(receipts.as_array().unwrap().len(), 3);

    let listed = fleet.cli(&["tasks", "list", "--state", "queued", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 4);
    let shown = fleet.cli(&["tasks", "show", "first", "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["state"], "queued");
    assert_eq!(shown["priority"], "high");
    assert_eq!(shown["payload"]["prompt"], "hi");
    let text = fleet.cli(&["tasks", "show", "first"]);
    assert!(stdout(&text).contains("state:      queued"));

    let status = fleet.cli(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["daemon"]["running"], false);
    assert_eq!(status["queue_depth"], 4);
    assert_eq!(status["agents"][0]["state"], "stopped");
    let text = fleet.cli(&["status"]);
    assert!(
        stdout(&text).contains("daemon: not running"),
        "{}",
        stdout(&text)
    );
}

#[test]
fn bad_input_is_refused_whole_with_a_clear_message() {
    let fleet = Fleet::new("[agents.worker]\ncommand = [\"true\"]\n");
    let cases: [(&[&str], &str); 4] = [
        (
            &["submit", "--agent", "nobody", "--payload", "{}"],
            "unknown agent \"nobody\"; configured agents: worker",
        ),
        (
            &["submit", "--agent", "worker", "--payload", "{not json"],
            "--payload is not valid JSON",
        ),
        (
            &[
                "submit",
                "--agent",
                "worker",
                "--id",
                "has space",
                "--payload",
                "{}",
            ],
            "invalid task id",
        ),
        (&["tasks", "show", "nope"], "no task with id \"nope\""),
    ];
    for (args, expected) in cases {
        let output = fleet.cli(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&output).contains(expected),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let file =
        "{\"id\": \"ok\", \"payload\": 1}\n{broken\n{\"payload\": 1, \"priority\": \"urgent\"}\n";
    let output = fleet.cli_with_stdin(&["submit", "--agent", "worker", "--file", "-"], Some(file));
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("2 bad line(s); nothing was submitted"),
        "{message}"
    );
    assert!(
        message.contains("line 2: not JSON") && message.contains("line 3: unknown priority"),
        "{message}"
    );
    let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(2 * 1024 * 1024));
    std::fs::write(fleet.path("big.json"), format!("{big}\n")).unwrap();
    let output = fleet.cli(&[
        "submit",
        "--agent",
        "worker",
        "--file",
        fleet.path("big.json").to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("line 1: payload of")
            && stderr(&output).contains("exceeds store.max_payload_bytes"),
        "{}",
        stderr(&output)
    );
    let listed = fleet.cli(&["tasks", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(
        listed.as_array().unwrap().is_empty(),
        "nothing half-applied"
    );
}

#[test]
fn the_schemas_in_docs_match_the_binary() {
    let fleet = Fleet::new("");
    for (args, file) in [
        (["config", "schema"], "docs/config.schema.json"),
        (["protocol", "schema"], "docs/protocol.schema.json"),
    ] {
        let output = fleet.cli(&args);
        assert!(output.status.success());
        let schema: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert!(schema.is_object());
        let stored = std::fs::read_to_string(repo_root().join(file)).unwrap();
        assert!(
            stored == stdout(&output),
            "{file} is stale: regenerate it with `flotilla {} > {file}`",
            args.join(" ")
        );
    }
}

#[test]
fn dlq_replay_and_purge_need_dead_letters() {
    let fleet = Fleet::new("[agents.worker]\ncommand = [\"true\"]\n");
    assert!(
        fleet
            .cli(&["submit", "--agent", "worker", "--id", "q", "--payload", "1"])
            .status
            .success()
    );
    let replay = fleet.cli(&["dlq", "replay", "q"]);
    assert_eq!(replay.status.code(), Some(2));
    assert!(
        stderr(&replay)
            .contains("is queued; only a task that is dead_lettered can be replayed or purged"),
        "{}",
        stderr(&replay)
    );
    // Deleting every dead letter takes --all, as replaying them does.
    let purge = fleet.cli(&["dlq", "purge"]);
    assert_eq!(purge.status.code(), Some(2), "{}", stderr(&purge));
    assert!(stderr(&purge).contains("--all"), "{}", stderr(&purge));
    let purge = fleet.cli(&["dlq", "purge", "--all"]);
    assert!(purge.status.success());
    assert!(stderr(&purge).contains("purged 0"));
}

#[test]
fn the_documented_example_configs_load() {
    for file in [
        "examples/claude-code.toml",
        "examples/fleet.toml",
        "examples/org.toml",
    ] {
        let path = repo_root().join(file);
        if let Err(error) = flotilla::config::load(&path) {
            panic!("{file} does not load: {error}");
        }
    }
    // The runnable one passes the start-up checks too.
    let output = std::process::Command::new(flotilla_bin())
        .args([
            "-c",
            repo_root().join("examples/fleet.toml").to_str().unwrap(),
            "config",
            "check",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn the_example_fleet_passes_the_resilience_checklist() {
    let output = std::process::Command::new(flotilla_bin())
        .args(["check", "--json"])
        .arg(repo_root().join("examples/fleet.toml"))
        .output()
        .unwrap();
    let card: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(0), "{card:#}");
    let items = card["items"].as_array().unwrap();
    let not_passed: Vec<&serde_json::Value> = items
        .iter()
        .filter(|item| item["status"] != "pass")
        .collect();
    assert!(not_passed.is_empty(), "{not_passed:#?}");
}

#[test]
fn check_scores_a_config_against_the_resilience_checklist() {
    let alerts = repo_root().join("deploy/prometheus/alerts.yml");
    let alerts = alerts.to_str().unwrap();
    // A config that follows the checklist passes every required item.
    let fleet = Fleet::new(
        r#"
[degradation]
reduced = { triggers = [{ when = "agents_unavailable", at_least = 1 }] }

[agents.coder]
command = ["true"]
readiness = { checks = [{ workspace_writable = true }] }
"#,
    );
    let config = fleet.config_path.to_str().unwrap();
    let good = fleet.cli(&["check", config, "--alerts", alerts, "--json"]);
    assert_eq!(good.status.code(), Some(0), "{good:?}");
    let card: serde_json::Value = serde_json::from_slice(&good.stdout).unwrap();
    assert_eq!(card["ok"], true, "{card}");
    let status = |card: &serde_json::Value, id: &str| {
        card["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|item| item["id"] == id)
            .map(|item| item["status"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(status(&card, "alert_rules"), "pass");
    assert_eq!(status(&card, "readiness"), "pass");
    // Breakers off, no watchdog, no levels, no alert rules: each named,
    // with its fix, and exit 1.
    let fleet = Fleet::new(
        r#"
[watchdog]
enabled = false

[agents.coder]
command = ["true"]
breaker = { enabled = false }
timeouts = { progress_timeout = "2h", max_duration = "1h" }
"#,
    );
    let bad = fleet.cli(&["check"]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    let text = stdout(&bad);
    for expected in [
        "FAIL  every agent has a circuit breaker\n      coder: breaker disabled\n      fix: ",
        "FAIL  the fleet watchdog runs",
        "FAIL  degradation levels are defined",
        "FAIL  alert rules are present and valid",
        "coder: progress_timeout = 2h is not below max_duration = 1h",
        "WARN  agents check what they depend on before taking tasks (recommended)",
        "score: ",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from\n{text}");
    }
    // A progress timeout longer than the watchdog's stuck_after (15m by
    // default) is cut short by it; the agent's own stuck_after mends it.
    let timeouts = |agent: &str| {
        let fleet = Fleet::new(&format!(
            "[agents.quiet]\ncommand = [\"true\"]\ntimeouts = {{ progress_timeout = \"20m\", max_duration = \"1h\" }}\n{agent}"
        ));
        let config = fleet.config_path.to_str().unwrap().to_string();
        let card = fleet.cli(&["check", &config, "--alerts", alerts, "--json"]);
        let card: serde_json::Value = serde_json::from_slice(&card.stdout).unwrap();
        card["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|item| item["id"] == "timeouts")
            .unwrap()
            .clone()
    };
    let cut_short = timeouts("");
    assert_eq!(cut_short["status"], "fail", "{cut_short}");
    assert!(
        cut_short.to_string().contains(
            "quiet: progress_timeout = 20m is longer than the fleet watchdog's stuck_after = 15m"
        ),
        "{cut_short}"
    );
    let mended = timeouts("watchdog = { stuck_after = \"30m\" }\n");
    assert_eq!(mended["status"], "pass", "{mended}");
    // A config with no agents fails, as `config check` refuses it; what
    // `up` would refuse on this machine is named, as a warning.
    let fleet = Fleet::new("[agents.gone]\ncommand = [\"no-such-program-here\"]\n");
    std::fs::write(&fleet.config_path, "[store]\npath = \"x.db\"\n").unwrap();
    let empty = fleet.cli(&["check", "--alerts", alerts]);
    assert_eq!(empty.status.code(), Some(1), "{empty:?}");
    assert!(
        stdout(&empty).contains("the config defines no agents"),
        "{empty:?}"
    );
    std::fs::write(
        &fleet.config_path,
        "[agents.gone]\ncommand = [\"no-such-program-here\"]\n",
    )
    .unwrap();
    let missing = fleet.cli(&["check", "--alerts", alerts]);
    let text = stdout(&missing);
    assert!(
        text.contains("WARN  the fleet can start on this machine (recommended)")
            && text.contains("no-such-program-here"),
        "{text}"
    );
}
