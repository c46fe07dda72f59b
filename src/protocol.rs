//! The agent protocol: the JSON Lines messages exchanged with persistent
//! agents over stdio, and their parsing with size limits.
//!
//! This module owns the wire format only. It never talks to processes or the
//! queue; the dispatcher does that. `docs/protocol.md` documents it for agent
//! authors and `flotilla protocol schema` prints its JSON Schema.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this build speaks. An agent may announce the version
/// it speaks in its `ready` message; any other version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// A message from flotilla to a persistent agent (one JSON object per line on
/// the agent's stdin).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToAgent {
    /// Work to do. Answer with `progress` (optional, repeated), then exactly
    /// one `result` or `error` carrying the same `id`.
    Task(TaskMessage),
    /// Stop working on task `id`: its result is no longer wanted. The agent
    /// should abandon it and stay ready for the next task.
    Cancel {
        /// The task to abandon.
        id: String,
    },
    /// The answer to a `send` that waits: the child task ended (or the
    /// wait timed out, or the send was refused).
    Reply {
        /// The task that sent the message (the parent).
        id: String,
        /// The `key` of the send.
        key: String,
        /// The child task's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        task: Option<String>,
        /// `completed`, `failed` (dead-lettered), `timeout` or `refused`.
        status: ReplyStatus,
        /// The child's result, when completed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
        /// Why it failed, timed out or was refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The replica is being stopped: exit within `grace_ms`. A `result`
    /// sent within `grace_ms` is stored; unanswered tasks are handed back,
    /// uncharged, once the process is gone. After `grace_ms` the process
    /// group gets SIGTERM, and SIGKILL another `grace_ms` later.
    Shutdown {
        /// Milliseconds before the process group receives SIGTERM.
        grace_ms: u64,
    },
}

/// How a delegated child task ended, for its `reply`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReplyStatus {
    /// It completed; `result` holds its result.
    Completed,
    /// It was dead-lettered; `error` says why.
    Failed,
    /// No answer within the send's `timeout_ms` (the child goes on).
    Timeout,
    /// The send was refused (unknown agent, limits, a cycle).
    Refused,
}

/// The `task` message.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct TaskMessage {
    /// The task id; echo it in every `progress`, `result` and `error`.
    pub id: String,
    /// Delivery attempt, starting at 1. Above 1 means an earlier attempt
    /// crashed, timed out or failed with a retryable error.
    pub attempt: u32,
    /// The agent this task was submitted to.
    pub agent: String,
    /// The payload given at submit time, unchanged.
    pub payload: Value,
    /// The checkpoint of the last `progress` of an earlier attempt, if any:
    /// resume from it instead of starting over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Value>,
    /// Why the previous attempt did not count, for this one to do better:
    /// the report of the validation gate its result failed, or why the
    /// task was handed over from another agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<String>,
    /// Unix time in milliseconds after which the attempt is killed
    /// (`timeouts.max_duration`).
    pub deadline_ms: u64,
    /// Milliseconds without a `progress` message after which the attempt is
    /// killed (`timeouts.progress_timeout`).
    pub progress_timeout_ms: u64,
}

/// A message from a persistent agent to flotilla (one JSON object per line
/// on the agent's stdout; stderr is free-form and logged).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromAgent {
    /// The agent started and takes tasks. Must be the first message.
    Ready {
        /// Protocol version the agent speaks (default 1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protocol: Option<u32>,
    },
    /// The agent is alive. Does not count as progress on a task.
    Heartbeat {},
    /// The agent made progress on task `id`: resets the progress watchdog and
    /// extends the lease.
    Progress {
        /// The task this progress belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// Free-form description of the step, for humans.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<String>,
        /// State to resume from if this attempt fails; handed to the next
        /// attempt as `checkpoint`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        checkpoint: Option<Value>,
        /// How full the agent's model context window is, 0 to 100.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        context_window_usage_pct: Option<f64>,
    },
    /// Task `id` succeeded with `output`.
    Result {
        /// The task this result belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The result, stored with the task.
        #[serde(default)]
        output: Value,
        /// Changes the agent made, with the commands that undo them
        /// (used by validation gates and rollback).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        changes: Option<Value>,
    },
    /// While working on task `id`, hand work to another agent: a child
    /// task, durable and routed like any task. With `wait`, a `reply`
    /// comes back on stdin when it ends.
    Send {
        /// The task being worked on (the parent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The agent that gets the child task.
        to: String,
        /// Unique among this task's sends (1 to 64 letters, digits, `-`,
        /// `_`, `.`): a retried parent that sends the same key reaches the
        /// same child.
        key: String,
        /// The child task's payload.
        #[serde(default)]
        payload: Value,
        /// Its priority (default: the parent's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        priority: Option<crate::queue::Priority>,
        /// Whether the sender waits for a `reply` (default false: fire
        /// and forget).
        #[serde(default)]
        wait: bool,
        /// How long to wait for the reply, in milliseconds (required with
        /// `wait`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Task `id` failed.
    Error {
        /// The task this error belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// What went wrong, for humans and the dead-letter record.
        message: String,
        /// Whether another attempt may succeed (default true). `false` sends
        /// the task straight to the dead-letter queue.
        #[serde(default = "default_true")]
        retryable: bool,
        /// Wait at least this long before the next attempt (for example a
        /// rate limit's Retry-After).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

fn default_true() -> bool {
    true
}

/// Why a line from an agent was rejected.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LineError {
    /// The line is not a JSON object of a known message type.
    #[error("malformed message: {reason}; line starts with {excerpt:?}")]
    Malformed {
        /// The parser's explanation.
        reason: String,
        /// The first bytes of the line.
        excerpt: String,
    },
    /// The line is longer than the agent's `max_line_bytes`.
    #[error("line longer than max_line_bytes = {max_line_bytes}")]
    TooLong {
        /// The configured limit.
        max_line_bytes: usize,
    },
}

/// How many characters of a bad line are kept for logs and status.
pub const EXCERPT_CHARS: usize = 120;

/// Parses one line of agent output.
///
/// # Errors
/// [`LineError::Malformed`] if the line is not one JSON object of a known
/// message type with valid fields.
pub fn parse_line(line: &str) -> Result<FromAgent, LineError> {
    let line = line.trim_end_matches('\r');
    let malformed = |reason: String| LineError::Malformed {
        reason,
        excerpt: excerpt(line),
    };
    let message =
        serde_json::from_str::<FromAgent>(line).map_err(|error| malformed(error.to_string()))?;
    // A result whose output went under another name would complete the
    // task with `null` and lose it. Unknown fields are otherwise ignored
    // (forward compatibility), but not one that looks like `output`.
    if let FromAgent::Result {
        output: Value::Null,
        ..
    } = &message
        && let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line)
        && !fields.contains_key("output")
        && let Some(key) = fields.keys().find(|key| misnamed_output(key))
    {
        return Err(malformed(format!(
            "a result without `output` but with `{}`: the result goes in `output` (leave out `output` only for a null result)",
            excerpt(key)
        )));
    }
    Ok(message)
}

/// Whether `key` of a result is most likely its `output` under another
/// name: `result`, `data`, `outputs`, a misspelling of `output`...
fn misnamed_output(key: &str) -> bool {
    // Few, so that a field of a later protocol version is not taken for
    // one (docs/protocol.md lists them).
    const NAMES: [&str; 4] = ["result", "results", "outputs", "data"];
    let key = key.to_ascii_lowercase();
    // Within 2 edits of `output` means 4 to 8 characters.
    NAMES.contains(&key.as_str()) || (key.len() <= 8 && strsim::levenshtein(&key, "output") <= 2)
}

/// The type (`result` or `error`) and task id of a line that
/// [`parse_line`] refused but that is clearly an outcome of a task: the
/// attempt it names can be failed at once with the reason, rather than
/// wait for its progress timeout.
pub fn outcome_of_malformed(line: &str) -> Option<MalformedOutcome> {
    let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line.trim_end_matches('\r'))
    else {
        return None;
    };
    let kind = match fields.get("type").and_then(Value::as_str) {
        Some("result") => "result",
        Some("error") => "error",
        _ => return None,
    };
    let id = match fields.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(_) => return None,
    };
    // What an `error` said, where it can be read.
    let is_error = kind == "error";
    Some(MalformedOutcome {
        kind,
        id,
        message: fields
            .get("message")
            .and_then(Value::as_str)
            .filter(|_| is_error)
            .map(excerpt),
        retryable: fields
            .get("retryable")
            .and_then(Value::as_bool)
            .filter(|_| is_error),
    })
}

/// A task's `result` or `error` that [`parse_line`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedOutcome {
    /// `result` or `error`.
    pub kind: &'static str,
    /// The task it names, if any.
    pub id: Option<String>,
    /// An error's message, where it is a string.
    pub message: Option<String>,
    /// An error's `retryable`, where it is a boolean.
    pub retryable: Option<bool>,
}

/// The type (`result` or `error`) and task id of a line too long to be
/// read whole, from its head (see [`crate::lines::HEAD_BYTES`]): both come
/// first in a message written as the protocol shows it.
pub fn outcome_of_too_long(head: &str) -> Option<MalformedOutcome> {
    if !head.trim_start().starts_with('{') {
        return None;
    }
    let kind = match string_field(head, "type")? {
        "result" => "result",
        "error" => "error",
        _ => return None,
    };
    Some(MalformedOutcome {
        kind,
        id: string_field(head, "id").map(str::to_string),
        message: None,
        retryable: None,
    })
}

/// The value of the first `"name": "value"` pair in `text`, a string
/// without escapes; `None` when there is none (or it is cut off).
fn string_field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("\"{name}\"");
    let mut rest = text;
    while let Some(at) = rest.find(&key) {
        rest = &rest[at + key.len()..];
        let Some(value) = rest
            .trim_start()
            .strip_prefix(':')
            .and_then(|value| value.trim_start().strip_prefix('"'))
        else {
            continue;
        };
        let end = value.find(['"', '\\'])?;
        return value[end..].starts_with('"').then(|| &value[..end]);
    }
    None
}

/// How many characters of an agent's stderr line are logged.
pub const STDERR_LOG_CHARS: usize = 2000;

/// The first [`EXCERPT_CHARS`] characters of `text`, for logs.
pub fn excerpt(text: &str) -> String {
    truncate(text, EXCERPT_CHARS)
}

/// The first `chars` characters of `text`, with `…` when cut.
pub fn truncate(text: &str, chars: usize) -> String {
    let mut out: String = text.chars().take(chars).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

/// Serializes a message as one line, newline included.
pub fn encode(message: &ToAgent) -> String {
    let mut line = serde_json::to_string(message).expect("protocol messages always serialize");
    line.push('\n');
    line
}

/// The JSON Schema of both message directions, for agent authors:
/// `#/$defs/ToAgent` (stdin) and `#/$defs/FromAgent` (stdout).
pub fn schema() -> Value {
    let mut generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
    let to_agent = generator.subschema_for::<ToAgent>();
    let from_agent = generator.subschema_for::<FromAgent>();
    let definitions = generator.take_definitions(true);
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": format!("flotilla agent protocol v{PROTOCOL_VERSION}"),
        "description": "One JSON object per line. ToAgent arrives on the agent's stdin; FromAgent is written to its stdout.",
        "anyOf": [to_agent, from_agent],
        "$defs": definitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_over_long_outcome_is_told_by_its_head() {
        let told =
            outcome_of_too_long(r#"{"type": "result", "id": "t-1", "output": "xxxx"#).unwrap();
        assert_eq!((told.kind, told.id.as_deref()), ("result", Some("t-1")));
        // No id: the only task in flight is meant.
        let told = outcome_of_too_long(r#"{"type":"error","message":"#).unwrap();
        assert_eq!((told.kind, told.id), ("error", None));
        // An id cut off, or escaped, is not guessed at.
        let told = outcome_of_too_long(r#"{"type":"result","id":"t-"#).unwrap();
        assert_eq!(told.id, None);
        for other in [
            r#"{"type": "progress", "id": "t-1""#,
            r#"{"output": "xxxx"#,
            "not json",
            r#"{"type": "result\"x", "id": "t-1""#,
        ] {
            assert!(outcome_of_too_long(other).is_none(), "{other}");
        }
    }
    use serde_json::json;

    #[test]
    fn a_result_under_another_name_is_refused_and_named() {
        for (line, named) in [
            (r#"{"type":"result","id":"t","result":{"n":1}}"#, "`result`"),
            (r#"{"type":"result","id":"t","Data":1}"#, "`Data`"),
            (r#"{"type":"result","id":"t","ouptut":1}"#, "`ouptut`"),
        ] {
            let error = parse_line(line).unwrap_err().to_string();
            assert!(
                error.contains(&format!("a result without `output` but with {named}")),
                "{error}"
            );
        }
        // A null result, changes alone, and fields of later versions
        // (ignored) are fine.
        for line in [
            r#"{"type":"result","id":"t"}"#,
            r#"{"type":"result","id":"t","changes":[]}"#,
            r#"{"type":"result","id":"t","output":null,"extra":1}"#,
            r#"{"type":"result","id":"t","usage":{"tokens":5}}"#,
        ] {
            assert!(parse_line(line).is_ok(), "{line}");
        }
        assert_eq!(
            outcome_of_malformed(
                r#"{"type":"error","id":"t","message":"x","retryable":false,"retry_after_ms":1.5}"#
            ),
            Some(MalformedOutcome {
                kind: "error",
                id: Some("t".to_string()),
                message: Some("x".to_string()),
                retryable: Some(false),
            })
        );
        assert_eq!(
            outcome_of_malformed(r#"{"type":"result","output":1,"changes":7}"#),
            Some(MalformedOutcome {
                kind: "result",
                id: None,
                message: None,
                retryable: None,
            })
        );
        for line in [
            r#"{"type":"progress","id":"t","step":7}"#,
            r#"{"type":"error","id":7}"#,
            "not json",
        ] {
            assert_eq!(outcome_of_malformed(line), None, "{line}");
        }
    }

    #[test]
    fn parses_every_agent_message() {
        assert_eq!(
            parse_line(r#"{"type":"ready"}"#),
            Ok(FromAgent::Ready { protocol: None })
        );
        assert_eq!(
            parse_line(r#"{"type":"heartbeat"}"#),
            Ok(FromAgent::Heartbeat {})
        );
        let progress =
            parse_line(r#"{"type":"progress","id":"t1","step":"x","checkpoint":{"n":3}}"#);
        assert!(matches!(
            progress,
            Ok(FromAgent::Progress {
                checkpoint: Some(_),
                ..
            })
        ));
        assert_eq!(
            parse_line(r#"{"type":"result","id":"t1","output":{"ok":true}}"#),
            Ok(FromAgent::Result {
                id: Some("t1".into()),
                output: json!({"ok": true}),
                changes: None
            })
        );
        assert_eq!(
            parse_line(r#"{"type":"error","id":"t1","message":"boom"}"#),
            Ok(FromAgent::Error {
                id: Some("t1".into()),
                message: "boom".into(),
                retryable: true,
                retry_after_ms: None
            })
        );
    }

    #[test]
    fn rejects_bad_lines_with_an_excerpt() {
        for line in [
            "not json",
            "{}",
            r#"{"type":"dance"}"#,
            r#"{"type":"error"}"#,
            r#"{"type":"progress","checkpoint":"#,
            "[1,2]",
        ] {
            match parse_line(line) {
                Err(LineError::Malformed { excerpt, .. }) => assert!(line.starts_with(&excerpt)),
                other => panic!("{line:?} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn excerpt_is_bounded() {
        let long = "x".repeat(10_000);
        assert_eq!(excerpt(&long).chars().count(), EXCERPT_CHARS + 1);
    }

    #[test]
    fn schema_references_resolve() {
        let schema = schema();
        let text = schema.to_string();
        for reference in text.split("\"$ref\":\"#/$defs/").skip(1) {
            let name = &reference[..reference.find('"').unwrap()];
            assert!(
                schema["$defs"].get(name).is_some(),
                "dangling $ref to {name}"
            );
        }
        assert!(schema["$defs"]["FromAgent"].is_object());
        assert!(schema["$defs"]["ToAgent"].is_object());
    }

    #[test]
    fn task_message_round_trips() {
        let message = ToAgent::Task(TaskMessage {
            id: "t".into(),
            attempt: 2,
            agent: "a".into(),
            payload: json!({"x": 1}),
            checkpoint: Some(json!(5)),
            feedback: Some("tests failed".into()),
            deadline_ms: 10,
            progress_timeout_ms: 20,
        });
        let line = encode(&message);
        assert!(line.ends_with('\n'));
        assert_eq!(serde_json::from_str::<ToAgent>(&line).unwrap(), message);
    }
}
