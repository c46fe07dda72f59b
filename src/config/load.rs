//! Reading `flotilla.toml`: syntax, types and cross-field rules, every
//! problem collected at once with its key and position.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};

use super::Config;

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The dotted key, e.g. `agents.worker.replicas.min`.
    pub key: String,
    /// What is wrong and what would be valid.
    pub message: String,
    /// 1-based line, where the file gives one.
    pub line: Option<usize>,
    /// 1-based column, where the file gives one.
    pub column: Option<usize>,
}

impl Problem {
    pub(crate) fn new(key: String, message: String) -> Self {
        Self {
            key,
            message,
            line: None,
            column: None,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, "line {line}, column {column}: ")?;
        }
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// The configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file was read but has problems.
    #[error("{}", render(source_name, problems))]
    Invalid {
        /// The file's name, for messages.
        source_name: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// Every problem found (empty for a read error).
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid { problems, .. } => problems,
        }
    }
}

fn render(source_name: &str, problems: &[Problem]) -> String {
    let count = problems.len();
    let noun = if count == 1 { "problem" } else { "problems" };
    let mut out = format!("{source_name} has {count} {noun}:");
    for problem in problems {
        out.push_str("\n  ");
        out.push_str(&problem.to_string());
    }
    out
}

/// Most bytes read of a config, experiment or alert rules file.
pub const MAX_FILE_BYTES: u64 = 4 << 20;
/// Most bytes read of a token file.
pub const MAX_TOKEN_BYTES: u64 = 64 << 10;

/// The text of the file at `path`, of at most `limit` bytes: a larger
/// one (or `/dev/zero`) is refused, not read into memory.
///
/// # Errors
/// The file cannot be read, is larger than `limit`, or is not UTF-8.
pub fn read_capped(path: &Path, limit: u64) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("it is larger than {limit} bytes, the most read of such a file"),
        ));
    }
    String::from_utf8(bytes).map_err(|error| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "it is not UTF-8 text (at byte {})",
                error.utf8_error().valid_up_to()
            ),
        )
    })
}

/// Reads and validates the configuration at `path`.
///
/// # Errors
/// [`ConfigError::Read`] if the file cannot be read, [`ConfigError::Invalid`]
/// with every problem found otherwise.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read_capped(path, MAX_FILE_BYTES).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let base_dir = absolute
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    parse(&text, &path.display().to_string(), base_dir)
}

/// Parses and validates configuration text. `source_name` names it in
/// messages; relative paths resolve against `base_dir`.
///
/// # Errors
/// [`ConfigError::Invalid`] with every problem found.
pub fn parse(text: &str, source_name: &str, base_dir: PathBuf) -> Result<Config, ConfigError> {
    let invalid = |problems| ConfigError::Invalid {
        source_name: source_name.to_string(),
        problems,
    };
    let lines = LineIndex::new(text);
    let (document, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        let problems = syntax_errors
            .iter()
            .map(|error| {
                let mut problem = Problem::new(String::new(), error.message().trim().to_string());
                if let Some(span) = error.span() {
                    (problem.line, problem.column) = lines.position(span.start);
                }
                problem
            })
            .collect();
        return Err(invalid(problems));
    }
    let root: toml::Table = match toml::from_str(text) {
        Ok(root) => root,
        Err(error) => {
            let mut problem = Problem::new(String::new(), error.message().trim().to_string());
            if let Some(span) = error.span() {
                (problem.line, problem.column) = lines.position(span.start);
            }
            return Err(invalid(vec![problem]));
        }
    };

    let mut problems = Vec::new();
    let mut mistyped = Vec::new();
    let mut unreadable: Vec<String> = Vec::new();
    let mut config = Config {
        base_dir,
        ..Config::default()
    };
    for (key, value) in root {
        match key.as_str() {
            "store" => {
                if let Some(store) = collect(value, "store", &mut problems) {
                    config.store = store;
                }
            }
            "daemon" => {
                if let Some(daemon) = collect(value, "daemon", &mut problems) {
                    config.daemon = daemon;
                }
            }
            "broker" => {
                if let Some(broker) = collect(value, "broker", &mut problems) {
                    config.broker = Some(broker);
                }
            }
            "http" => {
                if let Some(http) = collect(value, "http", &mut problems) {
                    config.http = http;
                }
            }
            "notify" => {
                if let Some(notify) = collect(value, "notify", &mut problems) {
                    config.notify = notify;
                }
            }
            "degradation" => {
                if let Some(degradation) = collect(value, "degradation", &mut problems) {
                    config.degradation = degradation;
                }
            }
            "watchdog" => {
                if let Some(watchdog) = collect(value, "watchdog", &mut problems) {
                    config.watchdog = watchdog;
                }
            }
            "delegation" => {
                if let Some(delegation) = collect(value, "delegation", &mut problems) {
                    config.delegation = delegation;
                }
            }
            "chaos" => {
                if let Some(chaos) = collect(value, "chaos", &mut problems) {
                    config.chaos = chaos;
                }
            }
            "agents" => match value {
                toml::Value::Table(agents) => {
                    for (name, agent) in agents {
                        let prefix = format!("agents.{name}");
                        let before = problems.len();
                        if let Some(agent) = collect(agent, &prefix, &mut problems) {
                            let mode_key = format!("{prefix}.mode");
                            if problems[before..].iter().any(|p| p.key == mode_key) {
                                // The rules that depend on the mode would
                                // judge the default standing in for it.
                                mistyped.push(name.clone());
                            }
                            config.agents.insert(name, agent);
                        } else {
                            unreadable.push(name);
                        }
                    }
                }
                other => problems.push(Problem::new(
                    "agents".into(),
                    format!(
                        "expected a table of agents like [agents.worker], found {}",
                        other.type_str()
                    ),
                )),
            },
            _ => problems.push(Problem::new(
                key.clone(),
                format!("unknown section `{key}`; valid sections: store, broker, daemon, agents, degradation, notify, http, watchdog, delegation, chaos"),
            )),
        }
    }
    // An agent whose table could not be read (its problems are listed)
    // is still defined: references to it are not "unknown agent" too.
    problems.extend(config.validate(&mistyped).into_iter().filter(|problem| {
        !unreadable.iter().any(|name| {
            problem
                .message
                .starts_with(&format!("unknown agent {name:?}"))
        })
    }));
    if problems.is_empty() {
        return Ok(config);
    }
    for problem in &mut problems {
        if let Some(offset) = locate(document.get_ref(), &problem.key) {
            (problem.line, problem.column) = lines.position(offset);
        }
    }
    problems.sort_by_key(|problem| (problem.line.unwrap_or(usize::MAX), problem.key.clone()));
    Err(invalid(problems))
}

/// Most distinct errors reported for one section before giving up on it.
const MAX_PROBLEMS_PER_SECTION: usize = 64;

/// Deserializes `value` as `T`, collecting every field error: after each
/// error, the offending key is removed (so its default applies) and the
/// section is read again, until it reads or an error cannot be attributed
/// to a key.
fn collect<T: DeserializeOwned>(
    mut value: toml::Value,
    prefix: &str,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    for _ in 0..MAX_PROBLEMS_PER_SECTION {
        match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(parsed) => return Some(parsed),
            Err(error) => {
                let path = error.path().to_string();
                let key = if path == "." || path.is_empty() {
                    prefix.to_string()
                } else if path.starts_with('[') {
                    // A list's element: `notify[0]`, not `notify.[0]`.
                    format!("{prefix}{path}")
                } else {
                    format!("{prefix}.{path}")
                };
                let message = plain_message(&key, error.inner().message().trim());
                let removed = remove_path(&mut value, &path);
                // A required key already reported as invalid (and removed
                // to read on) is not missing.
                let reported = message
                    .strip_prefix("missing field `")
                    .and_then(|rest| rest.strip_suffix('`'))
                    .is_some_and(|field| {
                        let full = format!("{key}.{field}");
                        problems.iter().any(|problem| problem.key == full)
                    });
                if !reported {
                    problems.push(Problem::new(key, message));
                }
                if !removed {
                    return None;
                }
            }
        }
    }
    None
}

/// serde's message, in the config's words where serde's name a Rust type.
fn plain_message(key: &str, message: &str) -> String {
    // An integer its setting's type cannot hold (negative, too big, or 0
    // for a nonzero type) never reaches the validators, so the setting's
    // range is named here.
    if let Some((found, rust)) = message
        .strip_prefix("invalid value: integer `")
        .and_then(|rest| rest.split_once("`, expected "))
        && let Some(valid) = integer_range(key).or_else(|| type_range(rust))
    {
        return format!("{found} is out of range; valid: {valid}");
    }
    if let Some(valid) = integer_range(key) {
        for rust in ["u16", "u32", "u64", "usize", "i32", "a nonzero u32"] {
            if let Some(found) = message.strip_suffix(&format!("expected {rust}")) {
                return format!("{found}expected a whole number, {valid}");
            }
        }
    }
    // Rust's type names, in words.
    for (rust, words) in [
        ("expected u16", "expected a whole number, 0 or more"),
        ("expected u32", "expected a whole number, 0 or more"),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected usize", "expected a whole number, 0 or more"),
        (
            "expected a nonzero u32",
            "expected a whole number, 1 or more",
        ),
        ("expected i32", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ] {
        if let Some(found) = message.strip_suffix(rust) {
            return format!("{found}{words}");
        }
    }
    if let Some(found) = message.strip_suffix(", expected struct Replicas") {
        let example = found
            .strip_prefix("invalid type: integer `")
            .and_then(|rest| rest.strip_suffix('`'))
            .unwrap_or("2");
        return format!("{found}, expected a table such as {{ min = {example} }}");
    }
    if let Some(found) = message.strip_suffix(", expected a sequence") {
        if key.ends_with(".command") {
            return format!(
                "{found}, expected a list: the program and its arguments, e.g. [\"python3\", \"agent.py\"]"
            );
        }
        return format!("{found}, expected a list [...]");
    }
    message.to_string()
}

/// The valid range of an integer setting, by its key, as its validator
/// names it. Kept in step with the validators by the test
/// `integer_ranges_are_the_validators_ranges`.
fn integer_range(key: &str) -> Option<String> {
    let shape = key_shape(key);
    integer_ranges()
        .into_iter()
        .find(|(known, _)| *known == shape)
        .map(|(_, valid)| valid)
}

/// Every integer setting's range, by key shape (see [`key_shape`]).
fn integer_ranges() -> Vec<(&'static str, String)> {
    use super::{MAX_CONCURRENCY, MAX_DELIVER, MAX_PREFETCH, MAX_REPLICAS};
    vec![
        ("agents.*.replicas.min", format!("1 to {MAX_REPLICAS}")),
        (
            "agents.*.replicas.max",
            format!("replicas.min to {MAX_REPLICAS}"),
        ),
        ("agents.*.concurrency", format!("1 to {MAX_CONCURRENCY}")),
        ("agents.*.prefetch", format!("0 to {MAX_PREFETCH}")),
        ("agents.*.retry.max_deliver", format!("1 to {MAX_DELIVER}")),
        ("agents.*.restart.max_restarts", "0 to 100000".into()),
        ("agents.*.breaker.failure_threshold", "1 to 10000".into()),
        ("agents.*.breaker.min_calls", "1 to 100000".into()),
        ("agents.*.breaker.half_open_probes", "1 to 100".into()),
        ("agents.*.fatal_exit_codes[]", "1 to 255".into()),
        ("agents.*.validation.max_fix_rounds", "0 to 10".into()),
        ("agents.*.readiness.checks[].expect", "100 to 599".into()),
        ("agents.*.readiness.failure_threshold", "1 to 100".into()),
        ("agents.*.watchdog.queue_depth", "1 to 1000000".into()),
        ("agents.*.watchdog.min_calls", "1 to 100000".into()),
        ("watchdog.queue_depth", "1 to 1000000".into()),
        ("watchdog.min_calls", "1 to 100000".into()),
        ("delegation.max_fan_out", "1 to 1000".into()),
        ("delegation.max_depth", "1 to 16".into()),
        ("notify[].retries", "0 to 10".into()),
        ("broker.replicas", "1, 3 or 5".into()),
        ("degradation.*.triggers[].nodes", "2 to 5".into()),
        (
            "degradation.*.triggers[].at_least",
            "1 to the number of agents".into(),
        ),
    ]
}

/// A key with its names and indexes left out: `agents.api.prefetch` is
/// `agents.*.prefetch`, `notify[2].retries` is `notify[].retries`.
fn key_shape(key: &str) -> String {
    let mut shape = String::with_capacity(key.len());
    let mut in_index = false;
    for c in key.chars() {
        match c {
            '[' => {
                in_index = true;
                shape.push(c);
            }
            ']' => {
                in_index = false;
                shape.push(c);
            }
            _ if in_index => {}
            _ => shape.push(c),
        }
    }
    for named in ["agents.", "degradation."] {
        if let Some((_, after)) = shape
            .strip_prefix(named)
            .and_then(|rest| rest.split_once('.'))
        {
            return format!("{named}*.{after}");
        }
    }
    shape
}

/// The range of a Rust integer type, by serde's name for it.
fn type_range(rust: &str) -> Option<String> {
    Some(match rust {
        "u16" => format!("0 to {}", u16::MAX),
        "u32" => format!("0 to {}", u32::MAX),
        // TOML's integers are 64-bit signed.
        "u64" | "usize" => format!("0 to {}", i64::MAX),
        "i32" => format!("{} to {}", i32::MIN, i32::MAX),
        "a nonzero u32" => format!("1 to {}", u32::MAX),
        _ => return None,
    })
}

/// Splits a serde path like `retry.backoff[1]` into segments.
fn segments(path: &str) -> Vec<String> {
    path.split('.')
        .flat_map(|part| {
            let mut out = Vec::new();
            let mut rest = part;
            if let Some(open) = rest.find('[') {
                out.push(rest[..open].to_string());
                rest = &rest[open..];
                while let Some(close) = rest.find(']') {
                    out.push(rest[..=close].to_string());
                    rest = &rest[close + 1..];
                }
            } else {
                out.push(rest.to_string());
            }
            out
        })
        .filter(|segment| !segment.is_empty() && segment != "?")
        .collect()
}

/// Removes the value at `path`; a list element removes its whole list.
fn remove_path(value: &mut toml::Value, path: &str) -> bool {
    let segments: Vec<String> = segments(path)
        .into_iter()
        .take_while(|segment| !segment.starts_with('['))
        .collect();
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut current = value;
    for segment in parents {
        match current.get_mut(segment.as_str()) {
            Some(next) => current = next,
            None => return false,
        }
    }
    match current.as_table_mut() {
        Some(table) => table.remove(last.as_str()).is_some(),
        None => false,
    }
}

/// Byte offset of the key at dotted path `key` (deepest part that exists).
fn locate(root: &DeTable<'_>, key: &str) -> Option<usize> {
    let mut table = root;
    let mut found = None;
    for segment in segments(key) {
        if segment.starts_with('[') {
            break;
        }
        let (name, value) = table
            .iter()
            .find(|(name, _)| name.get_ref().as_ref() == segment.as_str())?;
        found = Some(name.span().start);
        match value.get_ref() {
            DeValue::Table(inner) => table = inner,
            _ => break,
        }
    }
    found
}

/// Converts byte offsets to 1-based line and column.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(index, _)| index + 1));
        Self { starts }
    }

    fn position(&self, offset: usize) -> (Option<usize>, Option<usize>) {
        let line = self.starts.partition_point(|start| *start <= offset);
        let column = offset - self.starts[line - 1] + 1;
        (Some(line), Some(column))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backoff, Mode};

    fn parse_ok(text: &str) -> Config {
        parse(text, "test.toml", PathBuf::from("/base")).unwrap()
    }

    fn problems(text: &str) -> Vec<Problem> {
        parse(text, "test.toml", PathBuf::from("/base"))
            .unwrap_err()
            .problems()
            .to_vec()
    }

    #[test]
    fn the_store_window_covers_the_brokers() {
        let found = problems(
            "[store]\ndedup_window = \"30s\"\n[broker]\nurl = \"nats://127.0.0.1:4222\"\n[agents.a]\ncommand = [\"a\"]\n",
        );
        assert!(
            found.iter().any(|p| p.key == "store.dedup_window"
                && p.message
                    .contains("shorter than broker.duplicate_window = 2m")),
            "{found:?}"
        );
    }

    #[test]
    fn a_restart_policy_without_pause_or_limit_is_refused() {
        let found = problems(
            "[agents.a]\ncommand = [\"a\"]\nrestart = { initial_backoff = \"0s\", max_backoff = \"0s\", max_restarts = 4294967295, window = \"1ns\" }\n",
        );
        names(
            &found,
            &[
                ("agents.a.restart.initial_backoff", "valid: 1ms or more"),
                ("agents.a.restart.max_restarts", "valid: 0 to 100000"),
                ("agents.a.restart.window", "valid: 10ms or more"),
            ],
        );
    }

    /// Asserts that `found` has, for each key, a problem saying the text.
    fn names(found: &[Problem], expected: &[(&str, &str)]) {
        for (key, message) in expected {
            assert!(
                found
                    .iter()
                    .any(|p| p.key == *key && p.message.contains(message)),
                "{key}: {found:?}"
            );
        }
    }

    #[test]
    fn waits_are_bounded_both_ways() {
        let found = problems(
            "[daemon]\nstatus_interval = \"1ns\"\nshutdown_grace = \"3650d\"\n[broker]\nurl = \"nats://127.0.0.1:4222\"\nconnect_timeout = \"3650d\"\nping_interval = \"1ns\"\n[agents.a]\ncommand = [\"a\"]\ntimeouts = { stop_grace = \"3650d\" }\n",
        );
        names(
            &found,
            &[
                (
                    "daemon.status_interval",
                    "1ns is out of range; valid: 100ms to 1m",
                ),
                ("daemon.shutdown_grace", "valid: 0s to 1h"),
                ("broker.connect_timeout", "valid: 100ms to 5m"),
                ("broker.ping_interval", "valid: 1s to 10m"),
                ("agents.a.timeouts.stop_grace", "valid: 0s to 10m"),
            ],
        );
    }

    #[test]
    fn a_dedup_window_too_short_to_dedup_is_refused() {
        let found = problems("[store]\ndedup_window = \"0s\"\n[agents.a]\ncommand = [\"a\"]\n");
        assert!(
            found.iter().any(|p| p.key == "store.dedup_window"
                && p.message.contains("0s is too short; valid: 1m or more")),
            "{found:?}"
        );
    }

    #[test]
    fn a_watch_outlasting_the_retention_is_refused() {
        let found = problems(
            "[store]\ndedup_window = \"1h\"\nretention = \"1h\"\n[agents.a]\ncommand = [\"a\"]\n[agents.a.watch]\nduration = \"2h\"\ninterval = \"1m\"\nchecks = [{ name = \"ok\", command = [\"true\"] }]\n",
        );
        assert!(
            found.iter().any(|p| p.key == "agents.a.watch.duration"
                && p.message.contains("longer than store.retention = 1h")),
            "{found:?}"
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse_ok("[agents.worker]\ncommand = [\"python3\", \"agent.py\"]\n");
        let worker = config.agent("worker").unwrap();
        assert_eq!(worker.mode, Mode::Persistent);
        assert_eq!(worker.replicas.min, 1);
        assert_eq!(worker.retry.max_deliver.get(), 5);
        assert_eq!(config.store_path(), PathBuf::from("/base/flotilla.db"));
    }

    #[test]
    fn backoff_takes_a_list_or_a_table() {
        let config = parse_ok(
            r#"
            [agents.a]
            command = ["a"]
            retry = { backoff = ["1s", "5s"] }
            [agents.b]
            command = ["b"]
            retry = { backoff = { initial = "2s", max = "1m" } }
            "#,
        );
        assert!(
            matches!(&config.agents["a"].retry.backoff, Backoff::List(list) if list.len() == 2)
        );
        assert!(
            matches!(&config.agents["b"].retry.backoff, Backoff::Exponential(e) if e.initial.get().as_secs() == 2)
        );
    }

    #[test]
    fn reports_every_problem_with_key_value_and_position() {
        let found = problems(
            r#"[store]
dedup_window = "forever"

[agents.worker]
command = ["x"]
mode = "fast"
replicas = { min = 0 }
comand = ["typo"]

[agents.other]
command = ["y"]
timeouts = { progress_timeout = "5 parsecs" }
retry = { max_deliver = 0 }
replicas = 3

[agents.broken]
command = "x y"
"#,
        );
        let text: Vec<String> = found.iter().map(ToString::to_string).collect();
        let all = text.join("\n");
        assert!(
            all.contains("store.dedup_window") && all.contains("\"forever\""),
            "{all}"
        );
        assert!(
            all.contains("agents.worker.mode") && all.contains("fast") && all.contains("oneshot"),
            "{all}"
        );
        assert!(
            all.contains("agents.worker.comand") || all.contains("unknown field `comand`"),
            "{all}"
        );
        assert!(
            all.contains("agents.worker.replicas.min") && all.contains("1 to 1024"),
            "{all}"
        );
        assert!(
            all.contains("agents.other.timeouts.progress_timeout") && all.contains("parsecs"),
            "{all}"
        );
        assert!(
            all.contains("agents.other.retry.max_deliver: 0 is out of range; valid: 1 to 1000"),
            "{all}"
        );
        assert!(
            all.contains("agents.other.replicas: invalid type: integer `3`, expected a table such as { min = 3 }"),
            "{all}"
        );
        assert!(
            all.contains("agents.broken.command: invalid type: string \"x y\", expected a list: the program and its arguments"),
            "{all}"
        );
        // Reported as invalid, not also as missing.
        assert!(!all.contains("agents.broken: missing field"), "{all}");
        let mode = found
            .iter()
            .find(|p| p.key == "agents.worker.mode")
            .unwrap();
        assert_eq!((mode.line, mode.column), (Some(6), Some(1)), "{all}");
        assert!(found.len() >= 6, "{all}");
    }

    #[test]
    fn syntax_errors_have_positions() {
        let found = problems("[agents.worker\ncommand = 1\n");
        assert!(!found.is_empty());
        assert_eq!(found[0].line, Some(1));
    }

    #[test]
    fn unknown_section_and_bad_agent_name() {
        let found = problems("[stroe]\npath = \"x\"\n[agents.\"bad name\"]\ncommand = [\"x\"]\n");
        let all: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert!(
            all.iter().any(|p| p.contains("unknown section `stroe`")),
            "{all:?}"
        );
        assert!(
            all.iter().any(|p| p.contains("invalid agent name")),
            "{all:?}"
        );
    }

    #[test]
    fn cross_field_rules() {
        let found = problems(
            r#"
            [store]
            dedup_window = "10d"
            retention = "1d"
            [agents.a]
            command = []
            mode = "oneshot"
            concurrency = 4
            replicas = { min = 3, max = 2 }
            restart = { initial_backoff = "10s", max_backoff = "1s" }
            retry = { backoff = { multiplier = 0.5, jitter = 2.0 } }
            "#,
        );
        let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "store.retention",
            "agents.a.command",
            "agents.a.concurrency",
            "agents.a.replicas.max",
            "agents.a.restart.max_backoff",
            "agents.a.retry.backoff.multiplier",
            "agents.a.retry.backoff.jitter",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
    }

    #[test]
    fn broker_section_and_its_rules() {
        let config = parse_ok(
            "[broker]\nurl = \"nats://10.0.0.1:4222, nats://10.0.0.2:4222\"\nreplicas = 3\n\n[agents.a]\ncommand = [\"a\"]\n",
        );
        let broker = config.broker.unwrap();
        assert_eq!(
            broker.urls(),
            ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]
        );
        assert_eq!(
            (broker.replicas, broker.namespace.as_str()),
            (3, "flotilla")
        );
        assert!(parse_ok("[agents.a]\ncommand = [\"a\"]\n").broker.is_none());

        let found = problems(
            r#"
            [daemon]
            name = "bad name"
            agents = ["a", "ghost"]

            [broker]
            url = ""
            namespace = "Fleet"
            replicas = 2
            request_timeout = "30s"
            duplicate_window = "1m"
            token = "t"
            creds_file = "x.creds"
            tls_cert = "c.pem"

            [agents.a]
            command = ["a"]
            "#,
        );
        let all: Vec<String> = found.iter().map(ToString::to_string).collect();
        for expected in [
            "daemon.name",
            "unknown agent \"ghost\"",
            "broker.url",
            "broker.namespace",
            "broker.replicas",
            "broker.duplicate_window",
            "not several",
            "tls_cert and tls_key",
        ] {
            assert!(
                all.iter().any(|p| p.contains(expected)),
                "{expected} missing from {all:#?}"
            );
        }
    }

    #[test]
    fn a_bad_mode_does_not_cause_knock_on_errors() {
        let found = problems(
            "[agents.a]\ncommand = [\"x\"]\nmode = \"oneshott\"\nfatal_exit_codes = [3]\n",
        );
        let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["agents.a.mode"]);
    }

    #[test]
    fn schema_describes_agents() {
        let schema = Config::schema().to_string();
        assert!(schema.contains("progress_timeout") && schema.contains("max_deliver"));
    }

    #[test]
    fn fallback_chains_and_breakers_are_checked() {
        let found = problems(
            r#"
[agents.a]
command = ["a"]
fallback = ["b", "ghost", "a"]
breaker = { failure_threshold = 0, failure_rate = 1.5, half_open_probes = 0, recovery_timeout = "0s", failures = [] }

[agents.b]
command = ["b"]
fallback = ["c"]

[agents.c]
command = ["c"]
fallback = ["a", "c"]
fallback_policy = "escalate_to_human"
"#,
        );
        let all: Vec<String> = found.iter().map(ToString::to_string).collect();
        for expected in [
            "agents.a.fallback[1]: unknown agent \"ghost\"; configured agents: a, b, c",
            "agents.a.fallback[2]: \"a\" cannot fall back to itself",
            "agents.c.fallback[1]: \"c\" cannot fall back to itself",
            "agents.a.fallback: fallback chains form a cycle: a → b → c → a",
            "agents.a.breaker.failure_threshold: 0 is out of range; valid: 1 to 10000",
            "agents.a.breaker.failure_rate: 1.5 is out of range",
            "agents.a.breaker.half_open_probes: 0 is out of range; valid: 1 to 100",
            "agents.a.breaker.recovery_timeout: 0s is out of range; valid: 1ms to 7d",
            "agents.a.breaker.failures: is empty",
        ] {
            assert!(
                all.iter().any(|p| p.contains(expected)),
                "{expected} missing from {all:#?}"
            );
        }
        // One cycle, reported once.
        assert_eq!(all.iter().filter(|p| p.contains("cycle")).count(), 1);
        let bad_policy = problems("[agents.a]\ncommand = [\"a\"]\nfallback_policy = \"panic\"\n");
        assert_eq!(
            bad_policy[0].key, "agents.a.fallback_policy",
            "{bad_policy:?}"
        );
        assert!(
            bad_policy[0].message.contains("queue_for_retry"),
            "{bad_policy:?}"
        );
    }

    #[test]
    fn gates_watches_and_the_watchdog_are_checked() {
        let found = problems(
            r#"
[watchdog]
interval = "0s"
error_rate = 2.0

[agents.a]
command = ["a"]
manager = "ghost"
watchdog = { queue_depth = 0 }

[agents.a.validation]
max_fix_rounds = 11
checks = [
  { name = "fmt", command = ["fmt"], on_failure = "auto_fix_and_revalidate" },
  { name = "fmt", command = [], fix = ["x"] },
  { name = "sec", command = ["s"], on_failure = "escalate", escalate_to = "nobody" },
  { name = "opt", command = ["o"], required = false, on_failure = "auto_rollback" },
]

[agents.a.watch]
interval = "1s"
checks = [
  { name = "p", prometheus = "http://prom:9090" },
  { name = "both", command = ["c"], prometheus = "http://prom:9090", query = "up" },
]
"#,
        );
        let all: Vec<String> = found.iter().map(ToString::to_string).collect();
        for expected in [
            "watchdog.interval: 0s is out of range; valid: 1s to 10m",
            "watchdog.error_rate: 2 is out of range",
            "agents.a.manager: unknown agent \"ghost\"",
            "agents.a.watchdog.queue_depth: 0 is out of range",
            "agents.a.validation.max_fix_rounds: 11 is out of range; valid: 0 to 10",
            "agents.a.validation.checks[0].fix: on_failure = \"auto_fix_and_revalidate\" needs `fix`",
            "agents.a.validation.checks[1].name: \"fmt\" names two checks",
            "agents.a.validation.checks[1].command: is empty",
            "agents.a.validation.checks[1].fix: only on_failure = \"auto_fix_and_revalidate\" runs `fix`",
            "agents.a.validation.checks[2].escalate_to: unknown agent \"nobody\"",
            "agents.a.validation.checks[3].on_failure: an optional check",
            "agents.a.watch.checks[0].query: a `prometheus` check needs `query`",
            "agents.a.watch.checks[0].max_increase: a `prometheus` check needs max_increase",
            "agents.a.watch.checks[1]: give exactly one of `command` and `prometheus`",
        ] {
            assert!(
                all.iter().any(|p| p.contains(expected)),
                "{expected} missing from {all:#?}"
            );
        }
    }

    #[test]
    fn scheduled_experiments_run_every_period_or_by_cron() {
        let config = parse(
            "[chaos]\nenabled = true\nschedule = [{ experiment = \"a.toml\", cron = \"0 10 * * MON\" }, { experiment = \"b.toml\", every = \"1h\" }]\n[agents.a]\ncommand = [\"a\"]\n",
            "test.toml",
            PathBuf::from("."),
        )
        .expect("valid");
        // Tuesday 2023-11-14 22:13:20 UTC: the next Monday 10:00 UTC is
        // 5 days 11:46:40 away.
        let now = 1_700_000_000_000;
        assert_eq!(
            config.chaos.schedule[0].next_in(now),
            Ok(std::time::Duration::from_secs(474_400))
        );
        assert_eq!(
            config.chaos.schedule[1].next_in(now),
            Ok(std::time::Duration::from_secs(3600))
        );
        // The period between runs: a week for the cron, `every` otherwise.
        assert_eq!(
            config.chaos.schedule[0].period(now),
            Ok(std::time::Duration::from_secs(7 * 86_400))
        );
        assert_eq!(
            config.chaos.schedule[1].period(now),
            Ok(std::time::Duration::from_secs(3600))
        );
        let found = problems(
            "[chaos]\nenabled = true\nschedule = [{ experiment = \"a.toml\", cron = \"every monday\" }, { experiment = \"b.toml\" }]\n",
        );
        let all: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert!(
            all.iter()
                .any(|p| p.contains("chaos.schedule[0].cron: cron \"every monday\"")),
            "{all:#?}"
        );
        assert!(
            all.iter()
                .any(|p| p.contains("chaos.schedule[1]: give exactly one of `every` and `cron`")),
            "{all:#?}"
        );
    }

    #[test]
    fn the_token_is_not_in_debug_output() {
        let config = parse(
            "[http]\ntoken = \"very-secret-token\"\n[agents.a]\ncommand = [\"a\"]\n",
            "test.toml",
            PathBuf::from("."),
        )
        .expect("valid");
        let debug = format!("{config:?}");
        assert!(!debug.contains("very-secret-token"), "{debug}");
        assert!(debug.contains("<hidden>"), "{debug}");
        for auth in [
            "user = \"bob\"\npassword = \"broker-secret\"",
            "token = \"broker-secret\"",
        ] {
            let config = parse(
                &format!(
                    "[broker]\nurl = \"nats://ann:pass-in-url@127.0.0.1:4222\"\n{auth}\n[agents.a]\ncommand = [\"a\"]\n"
                ),
                "test.toml",
                PathBuf::from("."),
            )
            .expect("valid");
            let debug = format!("{config:?}");
            for secret in ["pass-in-url", "ann", "broker-secret"] {
                assert!(!debug.contains(secret), "{secret} in {debug}");
            }
            assert!(debug.contains("nats://***@127.0.0.1:4222"), "{debug}");
        }
    }

    #[test]
    fn urls_are_shown_without_their_secrets() {
        use super::super::{redact_url, redact_urls};
        assert_eq!(
            redact_urls("nats://ann:secret@10.0.0.1:4222, nats://tok@10.0.0.2:4222"),
            "nats://***@10.0.0.1:4222,nats://***@10.0.0.2:4222"
        );
        assert_eq!(redact_urls("nats://10.0.0.1:4222"), "nats://10.0.0.1:4222");
        assert_eq!(redact_urls("ann:secret@10.0.0.1:4222"), "***@10.0.0.1:4222");
        assert_eq!(redact_urls("10.0.0.1:4222"), "10.0.0.1:4222");
        assert_eq!(redact_url("tls://[::1]:4222"), "tls://[::1]:4222");
        assert_eq!(
            redact_url("ws://u:p@[::1]:443/nats"),
            "ws://***@[::1]:443/nats"
        );
        // Tokens that do not parse as a user: all before the last `@` goes.
        assert_eq!(
            redact_url("nats://abc/def@host:4222"),
            "nats://***@host:4222"
        );
        assert_eq!(
            redact_url("nats://to#ken@host:4222"),
            "nats://***@host:4222"
        );
        assert_eq!(
            redact_url("nats://u:p@ss@host:4222"),
            "nats://***@host:4222"
        );
        // One http URL: a comma belongs to it.
        assert_eq!(
            redact_url("http://u:pa,ss@model:8080/health?key=abc,def"),
            "http://***@model:8080/health?***"
        );
        assert_eq!(
            redact_url("http://model:8080/health#key=secret"),
            "http://model:8080/health?***"
        );
        assert_eq!(redact_url("not a url@all"), "***@all");
    }

    #[test]
    fn a_daemon_runs_something_and_exit_codes_can_happen() {
        let found = problems(
            "[daemon]\nagents = []\n[agents.a]\ncommand = [\"a\"]\nmode = \"oneshot\"\nfatal_exit_codes = [3, 0, 256]\n",
        );
        let all: Vec<String> = found.iter().map(ToString::to_string).collect();
        for expected in [
            "daemon.agents: is empty, so this daemon would run nothing",
            "agents.a.fatal_exit_codes: 0 can never be an exit code that fails a task; valid: 1 to 255",
            "agents.a.fatal_exit_codes: 256 can never",
        ] {
            assert!(
                all.iter().any(|p| p.contains(expected)),
                "{expected} missing from {all:#?}"
            );
        }
        assert!(!all.iter().any(|p| p.contains(" 3 can never")), "{all:#?}");
    }

    #[test]
    fn type_errors_are_in_words() {
        let found = problems(
            "[agents.a]\ncommand = [\"a\"]\nconcurrency = 0\nprefetch = -1\nbreaker = { failure_rate = \"0.5\" }\n",
        );
        let all: Vec<String> = found.iter().map(ToString::to_string).collect();
        for expected in [
            "agents.a.concurrency: 0 is out of range; valid: 1 to 256",
            "agents.a.prefetch: -1 is out of range; valid: 0 to 1024",
            "agents.a.breaker.failure_rate: invalid type: string \"0.5\", expected a number",
        ] {
            assert!(
                all.iter().any(|p| p.contains(expected)),
                "{expected} missing from {all:#?}"
            );
        }
    }

    #[test]
    fn integers_a_setting_cannot_hold_name_its_range() {
        let found = problems(
            "[delegation]\nmax_fan_out = 5000000000\n[agents.a]\ncommand = [\"a\"]\nconcurrency = \"4\"\nfatal_exit_codes = [3000000000]\nretry = { max_deliver = -2 }\n",
        );
        let all: Vec<String> = found.iter().map(ToString::to_string).collect();
        for expected in [
            "delegation.max_fan_out: 5000000000 is out of range; valid: 1 to 1000",
            "agents.a.concurrency: invalid type: string \"4\", expected a whole number, 1 to 256",
            "agents.a.fatal_exit_codes[0]: 3000000000 is out of range; valid: 1 to 255",
            "agents.a.retry.max_deliver: -2 is out of range; valid: 1 to 1000",
        ] {
            assert!(
                all.iter().any(|p| p.contains(expected)),
                "{expected} missing from {all:#?}"
            );
        }
        // A setting the table does not know gets its type's range.
        assert_eq!(
            plain_message("x.y", "invalid value: integer `-5`, expected u32"),
            "-5 is out of range; valid: 0 to 4294967295"
        );
    }

    /// Each range named for an integer its type cannot hold is the range
    /// the setting's validator names for one it can.
    #[test]
    fn integer_ranges_are_the_validators_ranges() {
        const AGENT: &str = "[agents.a]\ncommand = [\"a\"]\n";
        const BIG: &str = "4000000000";
        for (shape, valid) in integer_ranges() {
            let (text, key) = match shape {
                "agents.*.replicas.min" => (format!("{AGENT}replicas = {{ min = {BIG} }}"), shape),
                "agents.*.replicas.max" => (
                    format!("{AGENT}replicas = {{ min = 1, max = {BIG} }}"),
                    shape,
                ),
                "agents.*.concurrency" | "agents.*.prefetch" => {
                    let field = shape.rsplit('.').next().unwrap();
                    (format!("{AGENT}{field} = {BIG}"), shape)
                }
                "agents.*.retry.max_deliver" => {
                    (format!("{AGENT}retry = {{ max_deliver = {BIG} }}"), shape)
                }
                "agents.*.restart.max_restarts" => (
                    format!("{AGENT}restart = {{ max_restarts = {BIG} }}"),
                    shape,
                ),
                "agents.*.breaker.failure_threshold"
                | "agents.*.breaker.min_calls"
                | "agents.*.breaker.half_open_probes" => {
                    let field = shape.rsplit('.').next().unwrap();
                    (format!("{AGENT}breaker = {{ {field} = {BIG} }}"), shape)
                }
                "agents.*.fatal_exit_codes[]" => (
                    format!("{AGENT}fatal_exit_codes = [2000000000]"),
                    "agents.*.fatal_exit_codes",
                ),
                "agents.*.validation.max_fix_rounds" => (
                    format!("{AGENT}validation = {{ max_fix_rounds = {BIG} }}"),
                    shape,
                ),
                "agents.*.readiness.failure_threshold" => (
                    format!("{AGENT}readiness = {{ failure_threshold = {BIG} }}"),
                    shape,
                ),
                "agents.*.readiness.checks[].expect" => (
                    format!(
                        "{AGENT}readiness = {{ checks = [{{ http = \"http://127.0.0.1:1/\", expect = 65535 }}] }}"
                    ),
                    "agents.*.readiness.checks[0].expect",
                ),
                "agents.*.watchdog.queue_depth" | "agents.*.watchdog.min_calls" => {
                    let field = shape.rsplit('.').next().unwrap();
                    (format!("{AGENT}watchdog = {{ {field} = {BIG} }}"), shape)
                }
                "watchdog.queue_depth"
                | "watchdog.min_calls"
                | "delegation.max_fan_out"
                | "delegation.max_depth" => {
                    let (table, field) = shape.split_once('.').unwrap();
                    (format!("{AGENT}[{table}]\n{field} = {BIG}"), shape)
                }
                "notify[].retries" => (
                    format!("{AGENT}[[notify]]\nkind = \"log\"\nretries = {BIG}"),
                    "notify[0].retries",
                ),
                "broker.replicas" => (
                    format!("{AGENT}[broker]\nurl = \"nats://127.0.0.1:4222\"\nreplicas = {BIG}"),
                    shape,
                ),
                "degradation.*.triggers[].nodes" => (
                    format!(
                        "{AGENT}[broker]\nurl = \"nats://127.0.0.1:4222\"\n[degradation]\nreduced = {{ triggers = [{{ when = \"broker_nodes_below\", nodes = {BIG} }}] }}"
                    ),
                    "degradation.reduced.triggers[0].nodes",
                ),
                // Its validator names the fleet's agent count.
                "degradation.*.triggers[].at_least" => continue,
                other => panic!("no example for {other}: add one to this test"),
            };
            let key = key.replace('*', "a");
            let found = problems(&text);
            let messages: Vec<String> = found
                .iter()
                .filter(|problem| problem.key == key)
                .map(|problem| without_parentheses(&problem.message))
                .collect();
            assert!(
                messages
                    .iter()
                    .any(|message| message.contains(&format!("valid: {valid}"))),
                "{shape}: the table says {valid:?}, the validator {messages:?} ({found:#?})"
            );
        }
    }

    /// `text` without its ` (...)` asides.
    fn without_parentheses(text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(open) = rest.find(" (") {
            out.push_str(&rest[..open]);
            match rest[open..].find(')') {
                Some(close) => rest = &rest[open + close + 1..],
                None => {
                    rest = "";
                }
            }
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn an_unreadable_agent_is_not_also_unknown() {
        let found = problems(
            "[daemon]\nagents = [\"a\", \"b\"]\n[agents.a]\ncomand = [\"a\"]\n[agents.b]\ncommand = [\"b\"]\nmanager = \"a\"\nfallback = [\"a\"]\n",
        );
        let all: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert!(
            all.iter().any(|p| p.contains("agents.a.comand")),
            "the typo is named: {all:#?}"
        );
        assert!(!all.iter().any(|p| p.contains("unknown agent")), "{all:#?}");
    }

    #[test]
    fn a_store_needs_a_path() {
        let found = problems("[store]\npath = \"\"\n[agents.a]\ncommand = [\"a\"]\n");
        assert!(
            found
                .iter()
                .any(|p| p.key == "store.path" && p.message.contains("is empty")),
            "{found:?}"
        );
    }

    #[test]
    fn an_api_token_comes_from_one_place() {
        let found = problems(
            "[http]\ntoken = \"secret\"\ntoken_file = \"token.txt\"\n[agents.a]\ncommand = [\"a\"]\n",
        );
        assert!(
            found
                .iter()
                .any(|p| p.key == "http.token"
                    && p.message.contains("so is http.token_file; keep one")),
            "{found:?}"
        );
        parse_ok("[http]\ntoken_file = \"token.txt\"\n[agents.a]\ncommand = [\"a\"]\n");
    }

    #[test]
    fn readiness_checks_are_checked() {
        let found = problems(
            r#"
[agents.a]
command = ["a"]

[agents.a.readiness]
interval = "500ms"
checks = [
  { http = "ftp://model", expect = 200 },
  { tcp = "no-port" },
  { command = [] },
  { tcp = "127.0.0.1:1", command = ["true"] },
  { memory_below_pct = 120.0 },
  { workspace_writable = false },
  { expect = 204 },
  { name = "x", tcp = "127.0.0.1:2" },
  { name = "x", tcp = "127.0.0.1:3" },
  { tcp = "::1:5432" },
  { tcp = "127.0.0.1:0" },
  { tcp = "[::1]:5432" },
  { tcp = "[db]:5432" },
]
"#,
        );
        let all: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert!(
            !all.iter().any(|p| p.contains("checks[11]")),
            "a bracketed IPv6 address is valid: {all:#?}"
        );
        for expected in [
            "agents.a.readiness.interval: 500ms is out of range; valid: 1s to 1h",
            "agents.a.readiness.checks[0].http: \"ftp://model\" has scheme \"ftp\"; valid: http or https",
            "agents.a.readiness.checks[1].tcp: \"no-port\" has no port; give HOST:PORT",
            "agents.a.readiness.checks[2].command: is empty",
            "agents.a.readiness.checks[3]: names 2 kinds of check; give exactly one of http, tcp, command, workspace_writable, memory_below_pct",
            "agents.a.readiness.checks[4].memory_below_pct: 120 is out of range; valid: above 0, up to 100",
            "agents.a.readiness.checks[5].workspace_writable: false checks nothing",
            "agents.a.readiness.checks[6].expect: only an `http` check has an expected status",
            "agents.a.readiness.checks[8].name: \"x\" names two checks",
            "agents.a.readiness.checks[9].tcp: \"::1:5432\" has an IPv6 host without brackets; give HOST:PORT, e.g. \"127.0.0.1:5432\", \"[::1]:5432\"",
            "agents.a.readiness.checks[10].tcp: \"127.0.0.1:0\" has port 0",
            "agents.a.readiness.checks[12].tcp: \"[db]:5432\" has a bracketed host that is not an IPv6 address",
        ] {
            assert!(
                all.iter().any(|p| p.contains(expected)),
                "{expected} missing from {all:#?}"
            );
        }
    }

    #[test]
    fn notify_sinks_and_degradation_triggers_are_checked() {
        let found = problems(
            r#"
[agents.a]
command = ["a"]

[degradation]
check_interval = "10ms"
reduced = { triggers = [{ when = "breaker_open", agent = "ghost" }, { when = "agents_unavailable", at_least = 0 }] }
essential = { triggers = [{ when = "broker_unreachable" }, { when = "critical_agent_unavailable" }] }
emergency = { triggers = [{ when = "replicas_failing", above = 1.5 }] }

[[notify]]
kind = "webhook"
url = "ftp://secret@example"

[[notify]]
kind = "command"
timeout = "1h"

[[notify]]
kind = "log"
events = []

[[notify]]
name = "2"
kind = "log"

[[notify]]
name = "on call"
kind = "log"

[[notify]]
kind = "webhook"
url = "https://"
events = ["replica_restarted"]
"#,
        );
        let all: Vec<String> = found.iter().map(ToString::to_string).collect();
        for expected in [
            "degradation.check_interval: 10ms is out of range; valid: 100ms to 1m",
            "degradation.reduced.triggers[0].agent: unknown agent \"ghost\"",
            "degradation.reduced.triggers[1].at_least: 0 is out of range",
            "degradation.essential.triggers[0]: a broker trigger needs a [broker]",
            "degradation.essential.triggers[1]: no agent has critical = true",
            "degradation.emergency.triggers[0].above: 1.5 is out of range",
            "notify[0].url: is not an http:// or https:// URL with a host",
            "notify[1].command: a command sink needs a command",
            "notify[1].timeout: 1h is out of range; valid: 100ms to 5m",
            "notify[2].events: is empty",
            "notify[3].name: \"2\" also names notify[2] (an unnamed sink is named by its place)",
            "notify[4].name: \"on call\" is not valid; give 1 to 64 letters, digits, `_` or `-`",
            "notify[5].url: is not an http:// or https:// URL with a host",
            "notify[5].events: replica_restarted goes only to the live event feed",
        ] {
            assert!(
                all.iter().any(|p| p.contains(expected)),
                "{expected} missing from {all:#?}"
            );
        }
        assert!(
            !all.iter().any(|p| p.contains("secret")),
            "no URL echoed: {all:#?}"
        );
        let unknown = problems(
            "[agents.a]\ncommand = [\"a\"]\n[degradation]\nreduced = { triggers = [{ when = \"sunspots\" }] }\n",
        );
        assert!(
            unknown[0].key.starts_with("degradation.reduced.triggers")
                && unknown[0].message.contains("breaker_open"),
            "{unknown:?}"
        );
        // Triggers that could never hold.
        let never = problems(
            "[agents.a]\ncommand = [\"a\"]\nbreaker = { enabled = false }\n[degradation]\nreduced = { triggers = [{ when = \"agents_unavailable\", at_least = 2 }, { when = \"breaker_open\", agent = \"a\" }] }\n",
        );
        let all: Vec<String> = never.iter().map(ToString::to_string).collect();
        for expected in [
            "degradation.reduced.triggers[0].at_least: 2 is more than the 1 agent(s) of the fleet",
            "degradation.reduced.triggers[1].agent: agent \"a\" has its breaker disabled",
        ] {
            assert!(
                all.iter().any(|p| p.contains(expected)),
                "{expected} missing from {all:#?}"
            );
        }
        // A field the trigger does not have is refused, not ignored.
        let extra = problems(
            "[agents.a]\ncommand = [\"a\"]\n[broker]\nurl = \"nats://127.0.0.1:4222\"\n[degradation]\nreduced = { triggers = [{ when = \"broker_unreachable\", for = \"5m\" }] }\n",
        );
        assert!(
            extra[0].key.starts_with("degradation.reduced.triggers")
                && extra[0].message.contains("unknown field `for`"),
            "{extra:?}"
        );
        parse_ok(
            "[agents.a]\ncommand = [\"a\"]\ncritical = true\n[broker]\nurl = \"nats://127.0.0.1:4222\"\n[degradation]\nreduced = { triggers = [{ when = \"broker_unreachable\" }, { when = \"critical_agent_unavailable\" }] }\n",
        );
    }
}
