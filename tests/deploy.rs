//! The files in deploy/: the Prometheus alert rules pass `promtool check
//! rules` and their unit tests (`promtool test rules`), and a live scrape
//! of `/metrics` passes `promtool check metrics` except for the gauges
//! documented to keep their `_total` names.
//!
//! promtool is `$FLOTILLA_PROMTOOL`, else `.tools/bin/promtool` (installed
//! by `scripts/install-promtool.sh`), else `promtool` on PATH. Without one
//! these tests skip loudly, except under `CI=true`, where they fail.

mod support;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn promtool(test: &str) -> Option<PathBuf> {
    tool(
        test,
        "promtool",
        "FLOTILLA_PROMTOOL",
        "scripts/install-promtool.sh",
    )
}

#[test]
fn the_alert_rules_are_valid_and_their_unit_tests_pass() {
    let Some(promtool) = promtool("the_alert_rules_are_valid_and_their_unit_tests_pass") else {
        return;
    };
    let dir = repo_root().join("deploy/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let output = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The gauges that keep their `_total` names (see src/metrics.rs).
const TOTAL_GAUGES: [&str; 3] = [
    "fleet_agents_healthy_total",
    "fleet_agents_unhealthy_total",
    "fleet_circuit_breakers_open_total",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_scrape_passes_promtool_check_metrics() {
    let Some(promtool) = promtool("a_live_scrape_passes_promtool_check_metrics") else {
        return;
    };
    let fleet = Fleet::new(&format!(
        "[agents.worker]\ncommand = {}\n",
        example_agent(&["--work-ms", "1", "--error-rate", "0.3"])
    ));
    let daemon = fleet.start().await;
    let queue = daemon.queue().clone();
    queue
        .submit(numbered_tasks("worker", 20, "scraped").0)
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "the tasks", || async {
        finished(queue.as_ref()).await >= 20
    })
    .await;
    let address = daemon.http_address().unwrap();
    let text = reqwest::get(format!("http://{address}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    daemon.stop().await;
    assert!(text.contains("agent_tasks_completed_total{"), "{text}");
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = check.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let problems: Vec<&str> = report
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    for problem in &problems {
        assert!(
            TOTAL_GAUGES.iter().any(|name| problem.starts_with(&format!(
                "{name} non-counter metrics should not have \"_total\" suffix"
            ))),
            "unexpected promtool finding: {problem}\n{text}"
        );
    }
    assert_eq!(problems.len(), TOTAL_GAUGES.len(), "{report}");
}
