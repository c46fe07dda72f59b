//! Placeholders in an agent's argv and env: `${NAME}` (a variable of the
//! daemon's environment, passed on explicitly) and, in oneshot mode,
//! `{payload.field}`, `{task.id}`, `{task.attempt}`, `{task.agent}`.
//!
//! Rendering is a single pass: inserted text is never scanned again, so a
//! payload cannot smuggle in `${SECRET}` and a secret containing braces is
//! kept as it is. `{{` and `}}` are literal braces; `$${NAME}` is passed on
//! literally as `${NAME}` (for a shell to expand); any other `$` is left
//! alone.

use serde_json::Value;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// `${NAME}`
    Env(String),
    /// `{payload.a.b}`: the path after `payload`.
    Payload(Vec<String>),
    /// `{task.id}`, `{task.attempt}`, `{task.agent}`
    Task(TaskField),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskField {
    Id,
    Attempt,
    Agent,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

/// What a task placeholder is filled from.
#[derive(Debug, Clone, Copy)]
pub struct TaskContext<'a> {
    /// Task id.
    pub id: &'a str,
    /// Delivery number.
    pub attempt: u32,
    /// Agent name.
    pub agent: &'a str,
    /// Payload.
    pub payload: &'a Value,
}

/// A template could not be parsed or filled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// Bad syntax.
    #[error("{0}")]
    Syntax(String),
    /// `${NAME}` is not set in the daemon's environment.
    #[error("environment variable {0} is not set in the daemon's environment")]
    MissingEnv(String),
    /// `{payload.x}` names a field the payload does not have.
    #[error("the payload has no field {0}")]
    MissingField(String),
    /// A payload value would become an option of the program.
    #[error(
        "argument {index} of the command, {value:?}, comes from the payload and starts with '-', so the program would read it as an option; put \"--\" before it in the command (to end the program's options), or give a value that does not start with '-'"
    )]
    OptionLike {
        /// Its place in the command.
        index: usize,
        /// The value (cut to 80 characters).
        value: String,
    },
    /// A task placeholder outside oneshot mode.
    #[error("placeholder {0} is only available in oneshot mode")]
    NeedsTask(String),
}

impl Template {
    /// Parses `text`.
    ///
    /// # Errors
    /// [`TemplateError::Syntax`] for an unclosed or unknown placeholder.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((index, c)) = chars.next() {
            match c {
                '$' if text[index..].starts_with("$${") => {
                    chars.next();
                    chars.next();
                    let name = take_until_close(&mut chars, text, index)?;
                    literal.push_str("${");
                    literal.push_str(&name);
                    literal.push('}');
                }
                '$' if chars.peek().map(|(_, next)| *next) == Some('{') => {
                    chars.next();
                    let name = take_until_close(&mut chars, text, index)?;
                    if name.is_empty()
                        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    {
                        return Err(TemplateError::Syntax(format!(
                            "invalid variable name in ${{{name}}} in {text:?}: use letters, digits and _"
                        )));
                    }
                    push_text(&mut pieces, &mut literal);
                    pieces.push(Piece::Env(name));
                }
                '{' if chars.peek().map(|(_, next)| *next) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|(_, next)| *next) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let name = take_until_close(&mut chars, text, index)?;
                    push_text(&mut pieces, &mut literal);
                    pieces.push(placeholder(&name, text)?);
                }
                '}' => {
                    return Err(TemplateError::Syntax(format!(
                        "unmatched '}}' at byte {index} of {text:?}; write '}}}}' for a literal brace"
                    )));
                }
                other => literal.push(other),
            }
        }
        push_text(&mut pieces, &mut literal);
        Ok(Self { pieces })
    }

    /// The daemon variables it reads (`${NAME}`).
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|piece| match piece {
            Piece::Env(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// Whether it begins with a payload placeholder: filled by the task,
    /// its value could begin with `-`.
    pub fn starts_with_payload(&self) -> bool {
        matches!(self.pieces.first(), Some(Piece::Payload(_)))
    }

    /// Whether it is `text` and nothing else.
    pub fn is_literal(&self, text: &str) -> bool {
        matches!(&self.pieces[..], [Piece::Text(literal)] if literal == text)
    }

    /// Whether the template uses task placeholders.
    pub fn needs_task(&self) -> bool {
        self.pieces
            .iter()
            .any(|piece| matches!(piece, Piece::Payload(_) | Piece::Task(_)))
    }

    /// Fills the template. `env` looks up daemon variables; `task` is
    /// `None` outside oneshot mode.
    ///
    /// # Errors
    /// A missing variable or payload field, or a task placeholder without a
    /// task.
    pub fn render(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        task: Option<&TaskContext<'_>>,
    ) -> Result<String, TemplateError> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Env(name) => {
                    out.push_str(
                        &env(name).ok_or_else(|| TemplateError::MissingEnv(name.clone()))?,
                    );
                }
                Piece::Payload(path) => {
                    let dotted = format!("payload.{}", path.join("."));
                    let task =
                        task.ok_or_else(|| TemplateError::NeedsTask(format!("{{{dotted}}}")))?;
                    let mut value = task.payload;
                    for key in path {
                        value = match value {
                            Value::Object(map) => map.get(key),
                            Value::Array(items) => {
                                key.parse::<usize>().ok().and_then(|i| items.get(i))
                            }
                            _ => None,
                        }
                        .ok_or_else(|| TemplateError::MissingField(dotted.clone()))?;
                    }
                    match value {
                        Value::String(text) => out.push_str(text),
                        other => out.push_str(&other.to_string()),
                    }
                }
                Piece::Task(field) => {
                    let name = match field {
                        TaskField::Id => "task.id",
                        TaskField::Attempt => "task.attempt",
                        TaskField::Agent => "task.agent",
                    };
                    let task =
                        task.ok_or_else(|| TemplateError::NeedsTask(format!("{{{name}}}")))?;
                    match field {
                        TaskField::Id => out.push_str(task.id),
                        TaskField::Attempt => out.push_str(&task.attempt.to_string()),
                        TaskField::Agent => out.push_str(task.agent),
                    }
                }
            }
        }
        Ok(out)
    }
}

fn push_text(pieces: &mut Vec<Piece>, literal: &mut String) {
    if !literal.is_empty() {
        pieces.push(Piece::Text(std::mem::take(literal)));
    }
}

fn take_until_close(
    chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>,
    text: &str,
    start: usize,
) -> Result<String, TemplateError> {
    let mut name = String::new();
    for (_, c) in chars.by_ref() {
        if c == '}' {
            return Ok(name.trim().to_string());
        }
        if c == '{' {
            break;
        }
        name.push(c);
    }
    Err(TemplateError::Syntax(format!(
        "unclosed placeholder at byte {start} of {text:?}; write '{{{{' for a literal brace"
    )))
}

fn placeholder(name: &str, text: &str) -> Result<Piece, TemplateError> {
    match name {
        "task.id" => return Ok(Piece::Task(TaskField::Id)),
        "task.attempt" => return Ok(Piece::Task(TaskField::Attempt)),
        "task.agent" => return Ok(Piece::Task(TaskField::Agent)),
        _ => {}
    }
    if let Some(path) = name.strip_prefix("payload.") {
        let parts: Vec<String> = path.split('.').map(str::to_string).collect();
        if parts.iter().all(|part| !part.is_empty()) {
            return Ok(Piece::Payload(parts));
        }
    }
    Err(TemplateError::Syntax(format!(
        "unknown placeholder {{{name}}} in {text:?}; valid: {{payload.FIELD}}, {{task.id}}, {{task.attempt}}, {{task.agent}}, ${{VAR}}, or '{{{{' for a literal brace"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn fills_payload_task_and_env() {
        let payload = json!({"prompt": "fix it", "n": 3, "deep": {"list": ["a", "b"]}});
        let task = TaskContext {
            id: "t1",
            attempt: 2,
            agent: "coder",
            payload: &payload,
        };
        let env = |name: &str| (name == "KEY").then(|| "s{e}cret".to_string());
        let rendered = Template::parse("{payload.prompt}|{payload.n}|{payload.deep.list.1}|{task.id}#{task.attempt}@{task.agent}|${KEY}|{{x}}|$${HOME}|$$|$X")
            .unwrap()
            .render(&env, Some(&task))
            .unwrap();
        assert_eq!(rendered, "fix it|3|b|t1#2@coder|s{e}cret|{x}|${HOME}|$$|$X");
    }

    #[test]
    fn inserted_text_is_not_rescanned() {
        let payload = json!({"p": "${KEY} {task.id}"});
        let task = TaskContext {
            id: "t",
            attempt: 1,
            agent: "a",
            payload: &payload,
        };
        let env = |_: &str| Some("SECRET".to_string());
        let rendered = Template::parse("{payload.p}")
            .unwrap()
            .render(&env, Some(&task))
            .unwrap();
        assert_eq!(rendered, "${KEY} {task.id}");
    }

    #[test]
    fn errors_name_the_problem() {
        for bad in ["{payload.}", "{oops}", "{payload.x", "a}b", "${}", "${A-B}"] {
            assert!(
                matches!(Template::parse(bad), Err(TemplateError::Syntax(_))),
                "{bad}"
            );
        }
        let payload = json!({});
        let task = TaskContext {
            id: "t",
            attempt: 1,
            agent: "a",
            payload: &payload,
        };
        let template = Template::parse("{payload.missing}").unwrap();
        assert_eq!(
            template.render(&no_env, Some(&task)),
            Err(TemplateError::MissingField("payload.missing".into()))
        );
        assert!(matches!(
            template.render(&no_env, None),
            Err(TemplateError::NeedsTask(_))
        ));
        assert_eq!(
            Template::parse("${NOPE}").unwrap().render(&no_env, None),
            Err(TemplateError::MissingEnv("NOPE".into()))
        );
    }
}
