//! Bad input, fuzzed (proptest, a bounded number of cases per run; a
//! failure prints the seed and shrinks to a minimal input, which then
//! becomes a regression case below): the agent-protocol parser, the config
//! loader and the submit path never panic, and what they refuse comes with
//! a message.

use std::path::PathBuf;

use proptest::prelude::*;
use serde_json::{Value, json};

/// JSON values of bounded size and depth.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// Agent-protocol lines: arbitrary text, JSON of any shape, and messages
/// with a known type and mangled fields.
fn protocol_line() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,200}",
        json_value().prop_map(|value| value.to_string()),
        (
            prop::sample::select(vec![
                "ready",
                "heartbeat",
                "progress",
                "result",
                "error",
                "send",
                "task",
                "reply",
                "",
            ]),
            prop::collection::btree_map("[a-z_]{1,14}", json_value(), 0..6),
        )
            .prop_map(|(kind, fields)| {
                let mut object: serde_json::Map<String, Value> = fields.into_iter().collect();
                object.insert("type".into(), json!(kind));
                Value::Object(object).to_string()
            }),
    ]
}

/// Config files: arbitrary text, and a valid config with one line
/// replaced by arbitrary `key = value` text.
fn config_text() -> impl Strategy<Value = String> {
    let base = r#"[store]
path = "fleet.db"

[daemon]
shutdown_grace = "5s"

[watchdog]
interval = "5s"

[agents.coder]
command = ["python3", "coder.py"]
replicas = { min = 1, max = 3 }
timeouts = { progress_timeout = "1m", max_duration = "10m" }
retry = { max_deliver = 3, backoff = ["1s", "10s"] }
breaker = { failure_threshold = 3 }
readiness = { checks = [{ tcp = "127.0.0.1:9" }] }
validation = { checks = [{ name = "t", command = ["true"] }] }
fallback = []
"#;
    let lines: Vec<String> = base.lines().map(str::to_string).collect();
    let count = lines.len();
    prop_oneof![
        ".{0,300}",
        (0..count, "[a-z_.]{1,20}", ".{0,40}").prop_map(move |(index, key, value)| {
            let mut lines = lines.clone();
            lines[index] = format!("{key} = {value}");
            lines.join("\n")
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_protocol_parser_never_panics(line in protocol_line()) {
        match flotilla::protocol::parse_line(&line) {
            Ok(message) => {
                // What parses encodes back to JSON.
                serde_json::to_string(&message).unwrap();
            }
            Err(error) => prop_assert!(!error.to_string().is_empty()),
        }
    }

    #[test]
    fn the_config_loader_never_panics_and_names_what_is_wrong(text in config_text()) {
        match flotilla::config::parse(&text, "fuzz.toml", PathBuf::from("/nonexistent")) {
            Ok(config) => {
                // A config that loads lints without panicking too.
                let _ = flotilla::lint::check(&config, None);
            }
            Err(flotilla::config::ConfigError::Invalid { problems, .. }) => {
                prop_assert!(!problems.is_empty());
                for problem in problems {
                    prop_assert!(!problem.message.is_empty(), "{problem:?}");
                }
            }
            Err(other) => prop_assert!(!other.to_string().is_empty()),
        }
    }

    #[test]
    fn the_submit_path_never_panics_and_refuses_whole(body in json_value(), agent in "[a-z]{0,8}") {
        let config = flotilla::config::parse(
            "[agents.coder]\ncommand = [\"true\"]\n",
            "fuzz.toml",
            PathBuf::from("/nonexistent"),
        )
        .unwrap();
        let mut body = body;
        if let Value::Object(map) = &mut body {
            map.insert("agent".into(), json!(agent));
        }
        if let Ok(submit) = serde_json::from_value::<flotilla::api::SubmitBody>(body) {
            match submit.into_tasks(&config) {
                Ok(tasks) => {
                    prop_assert!(!tasks.is_empty());
                    for task in &tasks {
                        prop_assert_eq!(task.agent.as_str(), "coder");
                        flotilla::queue::validate_task_id(&task.id).unwrap();
                    }
                }
                Err(message) => prop_assert!(!message.is_empty()),
            }
        }
    }
}

/// Inputs the fuzzers found or that sit on an edge, kept as regressions.
#[test]
fn known_edge_cases() {
    for line in [
        "",
        "{}",
        "null",
        r#"{"type":"send"}"#,
        r#"{"type":"result","changes":7}"#,
        r#"{"type":"progress","context_window_usage_pct":1e400}"#,
        "\u{0}",
    ] {
        let _ = flotilla::protocol::parse_line(line);
    }
    for text in ["agents = 1", "[agents.a]\ncommand = []", "[[notify]]"] {
        assert!(
            flotilla::config::parse(text, "edge.toml", PathBuf::from("/nonexistent")).is_err(),
            "{text:?} should be refused"
        );
    }
}
