//! Bad input, fuzzed (proptest, a bounded number of cases per run; a
//! failure prints the seed and shrinks to a minimal input, which then
//! becomes a regression case below): the agent-protocol parser, the config
//! loader and the submit path never panic, and what they refuse comes with
//! a message.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use flotilla::queue::TaskQueue as _;
use proptest::prelude::*;
use serde_json::{Value, json};

/// Longest one case may run before the run is declared hung.
const CASE_LIMIT: Duration = Duration::from_secs(20);

/// The cases running now, per test thread: when each began and its input.
static RUNNING: Mutex<Option<HashMap<std::thread::ThreadId, (Instant, String)>>> = Mutex::new(None);

/// Marks a case as running until dropped. A watchdog thread aborts the
/// whole run, naming the input, when a case runs past [`CASE_LIMIT`]: a
/// hang fails the run instead of stalling CI.
struct Case;

impl Case {
    fn new(input: &dyn std::fmt::Debug) -> Self {
        static WATCHDOG: Once = Once::new();
        WATCHDOG.call_once(|| {
            std::thread::spawn(|| {
                loop {
                    std::thread::sleep(Duration::from_millis(500));
                    let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
                    for (started, input) in running.iter().flat_map(|cases| cases.values()) {
                        if started.elapsed() > CASE_LIMIT {
                            eprintln!(
                                "fuzz: a case ran over {CASE_LIMIT:?} (a hang); its input: {input}"
                            );
                            std::process::abort();
                        }
                    }
                }
            });
        });
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        running.get_or_insert_with(HashMap::new).insert(
            std::thread::current().id(),
            (Instant::now(), format!("{input:?}")),
        );
        Self
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cases) = running.as_mut() {
            cases.remove(&std::thread::current().id());
        }
    }
}

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

/// Submit bodies shaped like the API's (known and unknown agents, ids
/// good and bad, priorities valid and not, payloads or batches of any
/// shape), now and then with an unknown field.
fn submit_body() -> impl Strategy<Value = Value> {
    let id = prop_oneof![
        3 => Just(None),
        3 => "[a-z0-9-]{1,12}".prop_map(Some),
        // Few enough to repeat within a batch.
        2 => "t-[0-2]".prop_map(Some),
        1 => ".{0,300}".prop_map(Some),
    ];
    let priority = prop_oneof![
        3 => Just(None),
        3 => prop::sample::select(vec!["low", "normal", "high", "critical", "urgent", ""])
            .prop_map(|p| Some(json!(p))),
        1 => json_value().prop_map(Some),
    ];
    let task = (id.clone(), json_value(), priority.clone()).prop_map(|(id, payload, priority)| {
        let mut task = json!({ "payload": payload });
        if let Some(id) = id {
            task["id"] = json!(id);
        }
        if let Some(priority) = priority {
            task["priority"] = priority;
        }
        task
    });
    // A payload or a batch, now and then both or neither.
    let work = prop_oneof![
        4 => json_value().prop_map(|payload| (Some(payload), None)),
        4 => prop::collection::vec(task, 0..6).prop_map(|tasks| (None, Some(tasks))),
        1 => (
            prop::option::of(json_value()),
            prop::option::of(prop::collection::vec(Just(json!({"payload": 1})), 0..3)),
        ),
    ];
    (
        prop::sample::select(
            vec!["coder"; 8]
                .into_iter()
                .chain(["nobody", ""])
                .collect::<Vec<_>>(),
        ),
        id,
        priority,
        work,
        prop::option::weighted(0.05, "[a-z]{1,8}"),
    )
        .prop_map(|(agent, id, priority, (payload, tasks), extra)| {
            let mut body = json!({ "agent": agent });
            // A batch's id and priority go in its tasks (the mixed branch
            // above still tries them at the top).
            let single = payload.is_some() || tasks.is_none();
            if let Some(id) = id.filter(|_| single) {
                body["id"] = json!(id);
            }
            if let Some(priority) = priority.filter(|_| single) {
                body["priority"] = priority;
            }
            if let Some(payload) = payload {
                body["payload"] = payload;
            }
            if let Some(tasks) = tasks {
                body["tasks"] = json!(tasks);
            }
            if let Some(extra) = extra {
                body[extra] = json!(1);
            }
            body
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_protocol_parser_never_panics(line in protocol_line()) {
        let _case = Case::new(&line);
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
        let _case = Case::new(&text);
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
        let _case = Case::new(&(&body, &agent));
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Shaped bodies go the whole way: parsed, checked against the config,
    /// and submitted to a real embedded queue, which takes the whole batch
    /// or none of it.
    #[test]
    fn a_submit_is_stored_whole_or_refused_whole(body in submit_body()) {
        let _case = Case::new(&body);
        let config = flotilla::config::parse(
            "[agents.coder]\ncommand = [\"true\"]\n",
            "fuzz.toml",
            PathBuf::from("/nonexistent"),
        )
        .unwrap();
        let tasks = match serde_json::from_value::<flotilla::api::SubmitBody>(body.clone()) {
            Err(error) => {
                prop_assert!(!error.to_string().is_empty());
                return Ok(());
            }
            Ok(submit) => match submit.into_tasks(&config) {
                Err(message) => {
                    prop_assert!(!message.is_empty());
                    return Ok(());
                }
                Ok(tasks) => tasks,
            },
        };
        prop_assert!(!tasks.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _entered = runtime.enter();
        let queue = flotilla::queue::sqlite::SqliteQueue::open(
            &dir.path().join("fuzz.db"),
            flotilla::queue::sqlite::Settings::from_config(
                &config.store,
                flotilla::queue::sqlite::Role::Client,
            ),
            flotilla::clock::system(),
        )
        .unwrap();
        let count = tasks.len();
        let submitted = runtime.block_on(queue.submit(tasks));
        let stored: u64 = runtime
            .block_on(queue.counts())
            .unwrap()
            .iter()
            .map(|(_, counts)| counts.queued)
            .sum();
        match submitted {
            Ok(receipts) => {
                prop_assert_eq!(receipts.len(), count);
                let fresh = receipts.iter().filter(|receipt| !receipt.duplicate).count();
                prop_assert_eq!(stored, fresh as u64, "{:?}", receipts);
            }
            Err(error) => {
                prop_assert!(!error.to_string().is_empty());
                prop_assert_eq!(stored, 0, "a refused batch left tasks behind: {}", error);
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
        r#"{"type":"progress","context_window_usage_pct":1e400}"#,
        "\u{0}",
    ] {
        let parsed = flotilla::protocol::parse_line(line);
        assert!(
            parsed
                .as_ref()
                .is_err_and(|error| !error.to_string().is_empty()),
            "{line:?} should be refused with a reason: {parsed:?}"
        );
    }
    // A result whose `changes` is not a list parses as a message; its
    // changes are refused when the rollback journal reads them.
    let parsed = flotilla::protocol::parse_line(r#"{"type":"result","changes":7}"#).unwrap();
    let flotilla::protocol::FromAgent::Result {
        changes: Some(changes),
        ..
    } = parsed
    else {
        panic!("not a result with changes: {parsed:?}");
    };
    let refused = flotilla::rollback::parse_changes(&changes).unwrap_err();
    assert!(refused.contains("`changes` is not a list"), "{refused}");
    for text in ["agents = 1", "[agents.a]\ncommand = []", "[[notify]]"] {
        assert!(
            flotilla::config::parse(text, "edge.toml", PathBuf::from("/nonexistent")).is_err(),
            "{text:?} should be refused"
        );
    }
}
