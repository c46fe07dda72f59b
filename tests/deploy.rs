//! The files in deploy/: the Prometheus alert rules pass `promtool check
//! rules` and their unit tests (`promtool test rules`), and a live scrape
//! of `/metrics` passes `promtool check metrics` except for the gauges
//! documented to keep their `_total` names. Every YAML and JSON file
//! parses; the Kubernetes manifests probe the endpoints the daemon serves
//! and carry a valid flotilla config; the dashboard and the alert rules
//! query only metrics the daemon exports; the Dockerfile is multi-stage
//! and runs as a non-root user.
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
    // 30% errors, so that the scrape has failed attempts too. Neither the
    // watchdog's error rate nor the breaker may hold the tasks back (five
    // errors in a row happen often enough at 30% to make the test flaky),
    // and retries come at once.
    let fleet = Fleet::new(&format!(
        "[agents.worker]\ncommand = {}\nwatchdog = {{ error_rate = 0.9 }}\n\
         breaker = {{ enabled = false }}\n\
         retry = {{ max_deliver = 20, backoff = [\"10ms\"] }}\n",
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

/// Every pod `selector` of a Chaos Mesh object (the fault's and a
/// partition's `target`, inside a `Schedule` too).
fn chaos_selectors(value: &serde_json::Value, found: &mut Vec<serde_json::Value>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                if key == "selector" {
                    found.push(value.clone());
                } else {
                    chaos_selectors(value, found);
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                chaos_selectors(item, found);
            }
        }
        _ => {}
    }
}

/// Every YAML document in `path`, as JSON values.
fn yaml_documents(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            serde::Deserialize::deserialize(document)
                .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        })
        .filter(|value: &serde_json::Value| !value.is_null())
        .collect()
}

/// Every file under `dir` whose name ends in one of `extensions`.
fn files(dir: &std::path::Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files(&path, extensions));
        } else if extensions
            .iter()
            .any(|extension| path.extension().is_some_and(|e| e == *extension))
        {
            found.push(path);
        }
    }
    found.sort();
    found
}

/// The flotilla metric names in a PromQL expression.
fn metric_names(expression: &str) -> Vec<String> {
    expression
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| {
            ["agent_", "fleet_", "flotilla_"]
                .iter()
                .any(|p| word.starts_with(p))
        })
        .map(str::to_string)
        .collect()
}

/// Every `"expr"` string in a JSON value.
fn expressions(value: &serde_json::Value, found: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match value {
                    serde_json::Value::String(text) if key == "expr" => found.push(text.clone()),
                    other => expressions(other, found),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                expressions(item, found);
            }
        }
        _ => {}
    }
}

#[test]
fn the_deploy_files_parse_and_match_the_daemon() {
    let root = repo_root();
    let deploy = root.join("deploy");
    let exported = flotilla::metrics::Metrics::new(true).families().to_vec();

    // Every YAML document parses; every JSON file parses.
    let mut documents = Vec::new();
    for path in files(&deploy, &["yml", "yaml"]) {
        let parsed = yaml_documents(&path);
        assert!(!parsed.is_empty(), "{} holds no document", path.display());
        documents.extend(parsed.into_iter().map(|document| (path.clone(), document)));
    }
    let dashboards = files(&deploy, &["json"]);
    assert!(!dashboards.is_empty(), "no Grafana dashboard in deploy/");
    let mut queries = Vec::new();
    for path in &dashboards {
        let text = std::fs::read_to_string(path).unwrap();
        let dashboard: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        expressions(&dashboard, &mut queries);
    }
    assert!(
        queries.len() >= 10,
        "the dashboard has {} queries",
        queries.len()
    );
    // The dashboard shows every metric the daemon exports (a histogram
    // by any of its series).
    let family = |name: &str| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name)
            .to_string()
    };
    let shown: std::collections::HashSet<String> = queries
        .iter()
        .flat_map(|query| metric_names(query))
        .map(|name| family(&name))
        .collect();
    let mut missing: Vec<String> = exported
        .iter()
        .map(|name| family(name))
        .filter(|name| !shown.contains(name))
        .collect();
    missing.sort();
    missing.dedup();
    assert!(missing.is_empty(), "no dashboard panel shows {missing:?}");

    // The dashboard and the alert rules query only exported metrics.
    for (path, document) in &documents {
        if path.ends_with("alerts.yml") {
            expressions(document, &mut queries);
        }
    }
    for query in &queries {
        for name in metric_names(query) {
            assert!(
                exported.contains(&name),
                "{name} (in {query:?}) is not a metric the daemon exports; it exports {exported:?}"
            );
        }
    }

    // The kustomization names files that exist.
    let kustomization = &yaml_documents(&deploy.join("k8s/kustomization.yaml"))[0];
    for resource in kustomization["resources"].as_array().unwrap() {
        let resource = resource.as_str().unwrap();
        assert!(
            deploy.join("k8s").join(resource).is_file(),
            "kustomization.yaml names {resource}, which does not exist"
        );
    }

    // Every Chaos Mesh selector picks pods the manifests create: its
    // namespace is the kustomization's, its labels those of a Deployment's
    // or StatefulSet's pod template.
    let namespace = kustomization["namespace"].as_str().unwrap();
    let pod_labels: Vec<(String, &serde_json::Map<String, serde_json::Value>)> = documents
        .iter()
        .filter(|(_, document)| {
            ["Deployment", "StatefulSet"].contains(&document["kind"].as_str().unwrap_or(""))
        })
        .map(|(_, document)| {
            (
                document["metadata"]["name"].as_str().unwrap().to_string(),
                document["spec"]["template"]["metadata"]["labels"]
                    .as_object()
                    .unwrap(),
            )
        })
        .collect();
    let mut selectors = Vec::new();
    for (path, document) in &documents {
        if path.parent().is_some_and(|dir| dir.ends_with("chaos-mesh")) {
            chaos_selectors(document, &mut selectors);
            assert_eq!(
                document["metadata"]["namespace"],
                namespace,
                "{}: the chaos object's namespace",
                path.display()
            );
        }
    }
    assert!(selectors.len() >= 3, "{selectors:?}");
    let mut picked = std::collections::HashSet::new();
    for selector in &selectors {
        let namespaces: Vec<&str> = selector["namespaces"]
            .as_array()
            .unwrap_or_else(|| panic!("a selector without namespaces: {selector}"))
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        assert_eq!(namespaces, [namespace], "{selector}");
        let wanted = selector["labelSelectors"].as_object().unwrap();
        let matches: Vec<&str> = pod_labels
            .iter()
            .filter(|(_, labels)| {
                wanted
                    .iter()
                    .all(|(key, value)| labels.get(key) == Some(value))
            })
            .map(|(name, _)| name.as_str())
            .collect();
        assert!(
            !matches.is_empty(),
            "{selector} picks no pod of the manifests"
        );
        picked.extend(matches);
    }
    // Between them: the daemons and the NATS servers.
    assert!(
        picked.contains("flotilla") && picked.contains("nats"),
        "{picked:?}"
    );

    // The Deployment probes the daemon's endpoints on the port its config
    // listens on, with limits, as a non-root user.
    let kind = |wanted: &str| {
        documents
            .iter()
            .filter(|(_, document)| document["kind"] == wanted)
            .map(|(_, document)| document)
            .collect::<Vec<_>>()
    };
    let deployment = kind("Deployment")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"],
        "/health/live"
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"],
        "/health/ready"
    );
    assert_eq!(pod["restartPolicy"], "Always");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    for resource in ["cpu", "memory"] {
        assert!(
            container["resources"]["limits"][resource].is_string(),
            "no {resource} limit"
        );
    }
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(
        kind("PodDisruptionBudget").len(),
        2,
        "one for the daemons, one for NATS"
    );
    assert!(
        kind("Service")
            .iter()
            .any(|service| service["metadata"]["name"] == "flotilla")
    );
    let nats = kind("StatefulSet")[0];
    assert_eq!(nats["spec"]["replicas"], 3);

    // The ConfigMap's flotilla.toml is a valid config that listens on that
    // port and reads the token where the Secret is mounted.
    let config_map = kind("ConfigMap")
        .into_iter()
        .find(|map| map["metadata"]["name"] == "flotilla-config")
        .expect("the flotilla ConfigMap");
    let text = config_map["data"]["flotilla.toml"].as_str().unwrap();
    let config = flotilla::config::parse(
        text,
        "deploy/k8s/configmap.yaml",
        PathBuf::from("/etc/flotilla"),
    )
    .unwrap_or_else(|error| panic!("the ConfigMap's flotilla.toml: {error}"));
    let address = config.http.address().expect("the config listens");
    assert_eq!(u64::from(address.port()), port);
    assert!(config.broker.is_some(), "the fleet shares the NATS cluster");
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|mount| mount["name"] == "api-token")
        .expect("the token is mounted");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|volume| volume["name"] == "api-token")
        .unwrap();
    let token_path = format!(
        "{}/{}",
        mount["mountPath"].as_str().unwrap(),
        volume["secret"]["items"][0]["path"].as_str().unwrap()
    );
    assert_eq!(config.http.token_file, Some(PathBuf::from(token_path)));

    // The image: built in one stage, run from another as a non-root user.
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).collect();
    assert!(
        lines
            .iter()
            .filter(|line| line.starts_with("FROM "))
            .count()
            >= 2
    );
    let user = lines
        .iter()
        .rev()
        .find_map(|line| line.strip_prefix("USER "))
        .expect("the image sets a USER");
    assert!(!["root", "0", "0:0"].contains(&user.trim()), "USER {user}");
    assert!(lines.contains(&format!("EXPOSE {port}").as_str()));
}
