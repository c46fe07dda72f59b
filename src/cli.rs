//! The command line: parses arguments, loads the config, opens the store and
//! runs one command. Data goes to stdout, logs and messages to stderr.
//!
//! Exit codes: 0 success; 1 the operation failed (store, daemon, lost
//! tasks in the demo); 2 bad usage, config or input.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::api::{ResolveBody, SelectionBody, SubmitBody, TaskBody};
use crate::breaker::BreakerState;
use crate::client::{ApiClient, ClientError};
use crate::clock::{self, UnixMillis};
use crate::config::{self, Config};
use crate::degrade::{Forced, Level};
use crate::queue::sqlite::Role;
use crate::queue::{
    ListFilter, NewTask, Priority, QueueError, Selection, SubmitReceipt, TaskQueue, TaskRecord,
    TaskState, new_task_id, validate_task_id,
};
use crate::status::{AgentState, StatusReport};
use crate::store::Store;

const NO_AGENTS: &str = "the config defines no agents; add an [agents.NAME] table with a command";

/// Most lines read from one `submit --file`.
const MAX_FILE_TASKS: usize = crate::queue::MAX_SUBMIT_BATCH;
/// Most lines of a `submit --file` input, blank and bad ones included.
const MAX_FILE_LINES: usize = 2 * MAX_FILE_TASKS;
/// Most bytes of a `submit --file` input: a batch is sent (and stored) at
/// once, so it is held in memory whole.
const MAX_FILE_BYTES: usize = 256 << 20;
/// Bad lines named before reading stops.
const MAX_FILE_PROBLEMS: usize = 1000;

/// flotilla keeps a fleet of AI agents working when parts of it fail.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about, long_about = None)]
pub struct Cli {
    /// The fleet's config file.
    #[arg(
        short,
        long,
        global = true,
        env = "FLOTILLA_CONFIG",
        default_value = "flotilla.toml"
    )]
    pub config: PathBuf,
    /// Log lines on stderr as text, or as one JSON object per line (for
    /// log shippers).
    #[arg(long, global = true, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Talk to a running daemon's API at this URL (e.g.
    /// http://10.0.0.5:9750) instead of opening the store: for status,
    /// top, submit, tasks, dlq, escalations, degrade, rollback and chaos.
    /// No config file is read.
    #[arg(long, global = true, env = "FLOTILLA_API", value_name = "URL")]
    pub api: Option<String>,
    /// A file holding the API token for --api (default: the
    /// FLOTILLA_HTTP_TOKEN environment variable).
    #[arg(long, global = true, env = "FLOTILLA_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For humans.
    Text,
    /// One JSON object per line, with the fields of the enclosing spans
    /// (an attempt's task, agent and attempt number).
    Json,
}

/// Options of `up`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct UpArgs {
    /// This daemon's name in the fleet (overrides `[daemon] name`; default
    /// the host name). Daemons sharing a broker need distinct names.
    #[arg(long, env = "FLOTILLA_DAEMON_NAME")]
    pub name: Option<String>,
    /// Run only these agents, comma-separated (overrides `[daemon] agents`).
    #[arg(long, value_delimiter = ',')]
    pub agents: Option<Vec<String>>,
    /// Where the HTTP server listens (overrides `[http] listen`):
    /// ADDRESS:PORT (port 0 picks a free one), or off. For two daemons on
    /// one machine sharing a config.
    #[arg(long, env = "FLOTILLA_HTTP_LISTEN", value_name = "ADDRESS:PORT")]
    pub listen: Option<String>,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the fleet (the daemon) in the foreground until SIGTERM or Ctrl-C.
    Up(UpArgs),
    /// Queue tasks for an agent (works while the daemon is down).
    Submit(SubmitArgs),
    /// The fleet live in the terminal (keys: a agents, t tasks, e
    /// events, q quit).
    Top,
    /// Show agents, replicas, queue depth and task counts.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Inspect tasks.
    #[command(subcommand)]
    Tasks(TasksCommand),
    /// Inspect, replay or purge dead-lettered tasks.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Tasks handed to a human (from an unavailable agent, or after failed
    /// validation): list, show, resolve.
    #[command(subcommand)]
    Escalations(EscalationsCommand),
    /// Force the fleet's degradation level for a while, or clear it.
    #[command(subcommand)]
    Degrade(DegradeCommand),
    /// Inject faults into a running daemon through its API (needs
    /// `[chaos] enabled = true` there, and its token).
    #[command(subcommand)]
    Chaos(ChaosCommand),
    /// Undo the changes a task's result declared, in reverse order
    /// (changes already rolled back are skipped).
    Rollback {
        /// Task id.
        id: String,
        /// Print the journal as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the config or print its JSON Schema.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Lint a config against the resilience checklist: a scorecard, each
    /// failing item with how to fix it; exit 1 when a required item fails.
    Check {
        /// The config (default: -c/--config).
        #[arg(value_name = "CONFIG")]
        file: Option<PathBuf>,
        /// The alert rules file (default: deploy/prometheus/alerts.yml or
        /// alerts.yml beside the config, else deploy/prometheus/alerts.yml
        /// up to three directories above it).
        #[arg(long)]
        alerts: Option<PathBuf>,
        /// Print the scorecard as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The agent protocol.
    #[command(subcommand)]
    Protocol(ProtocolCommand),
    /// Run the built-in example agent (speaks the protocol on stdio).
    ExampleAgent(crate::example_agent::Options),
    /// Run a demo fleet with failures in a temporary directory and report.
    Demo(crate::demo::Options),
}

/// `submit`.
#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The agent that runs the tasks.
    #[arg(long)]
    pub agent: String,
    /// Task id (idempotency key); generated when absent.
    #[arg(long, conflicts_with = "file")]
    pub id: Option<String>,
    /// Priority (with --file: of the lines that give none).
    #[arg(long, value_enum, default_value_t = Priority::Normal)]
    pub priority: Priority,
    /// The payload, a JSON value.
    #[arg(long, required_unless_present = "file", conflicts_with = "file")]
    pub payload: Option<String>,
    /// JSON Lines file of tasks (`-` for stdin): one payload, or one
    /// `{"id", "payload", "priority"}` object, per line.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Print receipts as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `tasks`.
#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// List tasks, newest first.
    List {
        /// Only tasks in this state: queued, running, completed, dead_lettered,
        /// escalated.
        #[arg(long)]
        state: Option<TaskState>,
        /// Only this agent's tasks.
        #[arg(long)]
        agent: Option<String>,
        /// Most tasks shown.
        #[arg(long, default_value_t = 100, value_parser = parse_limit)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one task with its attempts.
    Show {
        /// Task id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued, running or escalated task (it becomes a dead
    /// letter), and the children it waits for.
    Cancel {
        /// Task id.
        id: String,
        /// Why, kept as the dead letter's reason.
        #[arg(long, default_value = "cancelled by an operator")]
        reason: String,
    },
}

/// `dlq`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters with their reasons.
    List {
        /// Only this agent's dead letters.
        #[arg(long)]
        agent: Option<String>,
        /// Most shown.
        #[arg(long, default_value_t = 100, value_parser = parse_limit)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back in the queue with a fresh attempt budget.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["ids", "all"])))]
    Replay {
        /// Task ids.
        ids: Vec<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters for good: the given ids, or all of them.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["ids", "all"])))]
    Purge {
        /// Task ids.
        ids: Vec<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

/// `escalations`.
#[derive(Debug, Subcommand)]
pub enum EscalationsCommand {
    /// List escalated tasks, newest first, with their reasons.
    List {
        /// Only this agent's tasks.
        #[arg(long)]
        agent: Option<String>,
        /// Most shown.
        #[arg(long, default_value_t = 100, value_parser = parse_limit)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one escalated task with its attempts.
    Show {
        /// Task id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resolve an escalated task: exactly one of --retry, --complete,
    /// --drop.
    Resolve {
        /// Task id.
        id: String,
        /// Queue it again with a fresh attempt budget.
        #[arg(long, group = "resolution")]
        retry: bool,
        /// Complete it with this result (a JSON value).
        #[arg(long, value_name = "JSON", group = "resolution")]
        complete: Option<String>,
        /// Give it up: it becomes a dead letter (replayable later).
        #[arg(long, group = "resolution")]
        drop: bool,
    },
}

/// `chaos`.
#[derive(Debug, Subcommand)]
pub enum ChaosCommand {
    /// Kill replicas of an agent (their whole process groups).
    Kill {
        /// The agent.
        #[arg(long)]
        agent: String,
        /// How many of its running replicas: one, all, or percent:N.
        #[arg(long, default_value = "one")]
        mode: String,
        /// KILL or TERM.
        #[arg(long, default_value = "KILL")]
        signal: String,
    },
    /// Pause every running replica of an agent (SIGSTOP), and resume them
    /// (SIGCONT) after a while.
    Pause {
        /// The agent.
        #[arg(long)]
        agent: String,
        /// How long, e.g. 30s (up to 1h).
        #[arg(long = "for", value_name = "DURATION")]
        duration: String,
    },
    /// Run an experiment file: a steady-state hypothesis checked before
    /// and after a timed list of faults; exit 1 when it fails.
    Run {
        /// The experiment (TOML).
        experiment: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The last report of each experiment `[[chaos.schedule]]` runs
    /// (stored by the daemon; readable while it is down).
    Last {
        /// Print the reports as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cut the daemon's broker connection for a while (needs `[chaos]
    /// proxy = true`).
    Partition {
        /// How long, e.g. 20s (up to 1h).
        #[arg(long = "for", value_name = "DURATION")]
        duration: String,
    },
    /// End every pause and broker fault now (the halt button; also done
    /// by an experiment that fails to inject a fault).
    Stop,
    /// Slow the daemon's broker connection for a while (needs `[chaos]
    /// proxy = true`).
    Latency {
        /// The delay added to everything sent either way, e.g. 200ms.
        #[arg(long, value_name = "DURATION")]
        add: String,
        /// How long, e.g. 1m (up to 1h).
        #[arg(long = "for", value_name = "DURATION")]
        duration: String,
    },
}

/// `degrade`.
#[derive(Debug, Subcommand)]
pub enum DegradeCommand {
    /// Force LEVEL (0 nominal, 1 reduced, 2 essential, 3 emergency, or
    /// the name) on every daemon of the fleet, in place of the triggers.
    Set {
        /// The level: 0-3 or nominal, reduced, essential, emergency.
        level: String,
        /// How long (at most 7d), e.g. 30m.
        #[arg(long = "for", value_name = "DURATION")]
        duration: String,
    },
    /// End a forced level: the triggers decide again.
    Clear,
}

/// `config`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the config and print the fleet it defines.
    Check {
        /// The config (default: -c/--config).
        #[arg(value_name = "CONFIG")]
        file: Option<PathBuf>,
    },
    /// Print the config's JSON Schema.
    Schema,
}

/// `protocol`.
#[derive(Debug, Subcommand)]
pub enum ProtocolCommand {
    /// Print the JSON Schema of the agent protocol's messages.
    Schema,
}

/// An error with its exit code.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    message: String,
    /// Sure to have changed nothing: the call reached no daemon, or was
    /// refused as not authorized.
    untouched: bool,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
            untouched: false,
        }
    }

    fn failed(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
            untouched: false,
        }
    }
}

impl From<QueueError> for Failure {
    fn from(error: QueueError) -> Self {
        match error {
            QueueError::Invalid(_)
            | QueueError::NotFound { .. }
            | QueueError::WrongState { .. } => Self::usage(error.to_string()),
            other => Self::failed(other.to_string()),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self::failed(format!("{error:#}"))
    }
}

impl From<config::ConfigError> for Failure {
    fn from(error: config::ConfigError) -> Self {
        Self::usage(error.to_string())
    }
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::ExampleAgent(options) = &cli.command {
        // A child process of the daemon: no runtime, no logging setup.
        if let Err(message) = options.validate() {
            eprintln!("flotilla example-agent: {message}");
            return ExitCode::from(2);
        }
        return match crate::example_agent::run(options) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(1),
        };
    }
    if !matches!(cli.command, Command::Up(_) | Command::Demo(_)) {
        restore_sigpipe();
    }
    if matches!(cli.command, Command::Up(_)) {
        HANGUP_IGNORED.store(hangup_ignored(), std::sync::atomic::Ordering::Relaxed);
    }
    // The demo draws a progress bar; its fleet's warnings would tear it.
    // async-nats narrates every connection at info; its warnings matter.
    init_logging(
        match cli.command {
            Command::Demo(_) => "error",
            Command::Up(_) => "info,async_nats=warn",
            _ => "warn,async_nats=error",
        },
        cli.log_format,
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("flotilla: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("flotilla: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// Whether SIGHUP was ignored when flotilla started (`nohup flotilla up`):
/// then a hang-up must not stop the daemon.
static HANGUP_IGNORED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether SIGHUP is ignored now.
#[allow(unsafe_code)]
fn hangup_ignored() -> bool {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: called at start-up before any thread is spawned; SIG_IGN
    // runs no handler code, and the previous action is put back at once.
    let Ok(previous) = (unsafe { sigaction(Signal::SIGHUP, &ignore) }) else {
        return false;
    };
    // SAFETY: as above; this restores what was there.
    let _ = unsafe { sigaction(Signal::SIGHUP, &previous) };
    matches!(previous.handler(), SigHandler::SigIgn)
}

/// Lets a command whose output is piped into `head` end quietly, like other
/// Unix tools, instead of failing on EPIPE. Only for commands that print
/// data: the daemon must see EPIPE from a dead agent's stdin as an error.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: called at start-up before any thread is spawned; SIG_DFL
    // installs no handler code.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

fn init_logging(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
}

async fn run(cli: Cli) -> Result<ExitCode, Failure> {
    match cli.command {
        Command::Config(ConfigCommand::Schema) => {
            print_json(&Config::schema());
            Ok(ExitCode::SUCCESS)
        }
        Command::Protocol(ProtocolCommand::Schema) => {
            print_json(&crate::protocol::schema());
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(options) => crate::demo::run(&options).await.map_err(Failure::from),
        Command::Check { file, alerts, json } => {
            let config = load_config(file.as_deref().unwrap_or(&cli.config))?;
            let card = crate::lint::check(&config, alerts.as_deref());
            if json {
                print_json(&serde_json::to_value(&card).expect("scorecard serializes"));
            } else {
                print!("{}", crate::lint::render(&card));
            }
            Ok(if card.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::ExampleAgent(_) => unreachable!("handled before the runtime starts"),
        command if cli.api.is_some() => {
            let api = cli.api.as_deref().expect("checked");
            if !command.works_remotely() {
                return Err(Failure::usage(
                    "--api works with status, top, submit, tasks, dlq, escalations, degrade, rollback and chaos; run other commands beside the config",
                ));
            }
            let token = match &cli.token_file {
                Some(path) => Some(read_token(path)?),
                None => std::env::var("FLOTILLA_HTTP_TOKEN")
                    .ok()
                    .filter(|token| !token.is_empty()),
            };
            let client = ApiClient::new(api, token).map_err(Failure::usage)?;
            if client.sends_token_in_clear() {
                eprintln!(
                    "flotilla: warning: the API token goes to {} unencrypted (plain http to another machine); \
                     reach the daemon through TLS (https:// via a proxy) or an SSH tunnel or `kubectl port-forward` to 127.0.0.1",
                    client.base()
                );
            }
            run_target(command, &Target::Remote(client)).await
        }
        command => {
            let path = match &command {
                Command::Config(ConfigCommand::Check { file: Some(file) }) => file,
                _ => &cli.config,
            };
            let config = load_config(path)?;
            run_with_config(command, config).await
        }
    }
}

/// The token in `path`, trimmed.
fn read_token(path: &Path) -> Result<String, Failure> {
    let text = crate::config::read_capped(path, crate::config::MAX_TOKEN_BYTES)
        .map_err(|error| Failure::usage(format!("--token-file {}: {error}", path.display())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(Failure::usage(format!(
            "--token-file {} is empty",
            path.display()
        )));
    }
    Ok(token.to_string())
}

impl Command {
    /// Whether the command can run against a daemon's API.
    fn works_remotely(&self) -> bool {
        matches!(
            self,
            Self::Submit(_)
                | Self::Status { .. }
                | Self::Tasks(_)
                | Self::Dlq(_)
                | Self::Escalations(_)
                | Self::Degrade(_)
                | Self::Rollback { .. }
                | Self::Chaos(_)
                | Self::Top
        )
    }
}

/// Where the fleet is reached: its store (beside the config), or a
/// daemon's API.
enum Target {
    Local(Box<Config>),
    Remote(ApiClient),
}

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Self {
        match error {
            ClientError::Refused(_, message) => Self::usage(message),
            ClientError::Unreached(message) => Self {
                untouched: true,
                ..Self::failed(message)
            },
            ClientError::Failed(message) => Self::failed(message),
        }
    }
}

impl Target {
    async fn chaos_last(&self) -> Result<Vec<crate::experiment::LastRun>, Failure> {
        match self {
            Self::Local(config) => {
                let store = open_store(config).await?;
                Ok(crate::experiment::last_runs(config, &store).await?)
            }
            Self::Remote(client) => Ok(client.chaos_last().await?),
        }
    }

    async fn report(&self) -> Result<StatusReport, Failure> {
        match self {
            Self::Local(config) => {
                let store = open_store(config).await?;
                let now = clock::system().now_ms();
                Ok(StatusReport::build(config, &store, now, None).await?)
            }
            Self::Remote(client) => Ok(client.status().await?),
        }
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>, Failure> {
        match self {
            Self::Local(config) => {
                if let Some(agent) = &filter.agent
                    && config.agent(agent).is_none()
                {
                    return Err(Failure::usage(format!(
                        "no agent {agent:?}; configured agents: {}",
                        config.agent_names()
                    )));
                }
                Ok(open_queue(config).await?.list(filter).await?)
            }
            Self::Remote(client) => Ok(client.list(filter).await?),
        }
    }

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, Failure> {
        match self {
            Self::Local(config) => Ok(open_queue(config).await?.get(id).await?),
            Self::Remote(client) => Ok(client.get_task(id).await?),
        }
    }

    async fn submit(&self, body: &SubmitBody) -> Result<Vec<SubmitReceipt>, Failure> {
        match self {
            Self::Local(config) => {
                let tasks = body.clone().into_tasks(config).map_err(Failure::usage)?;
                Ok(open_queue(config).await?.submit(tasks).await?)
            }
            Self::Remote(client) => Ok(client.submit(body).await?),
        }
    }

    async fn dead_letters(&self, purge: bool, selection: SelectionBody) -> Result<u64, Failure> {
        match self {
            Self::Local(config) => {
                let queue = open_queue(config).await?;
                let selection = if selection.all {
                    Selection::All
                } else {
                    Selection::Ids(selection.ids)
                };
                Ok(if purge {
                    queue.purge(&selection).await?
                } else {
                    queue.replay(&selection).await?
                })
            }
            Self::Remote(client) => Ok(client.dead_letters(purge, &selection).await?),
        }
    }

    async fn resolve(&self, id: &str, body: ResolveBody) -> Result<(), Failure> {
        match self {
            Self::Local(config) => {
                let resolution = body.resolution().map_err(Failure::usage)?;
                let store = open_store(config).await?;
                Ok(crate::api::resolve_escalation(&store, id, &resolution).await?)
            }
            Self::Remote(client) => client
                .resolve(id, &body)
                .await
                .map(drop)
                .map_err(Into::into),
        }
    }

    async fn cancel(&self, id: &str, reason: &str) -> Result<crate::api::Cancelled, Failure> {
        match self {
            Self::Local(config) => {
                let store = open_store(config).await?;
                crate::api::cancel(&store, id, reason)
                    .await
                    .map_err(Failure::from)
            }
            Self::Remote(client) => Ok(client.cancel(id, reason).await?),
        }
    }

    async fn tree(&self, id: &str) -> Result<crate::delegate::Tree, Failure> {
        match self {
            Self::Local(config) => {
                let store = open_store(config).await?;
                Ok(crate::delegate::tree(&store, id).await?)
            }
            Self::Remote(client) => Ok(client.tree(id).await?),
        }
    }

    /// A client of the daemon's API: the one given with --api, or the
    /// running daemon of the local store (its advertised address, the
    /// token from the config or FLOTILLA_HTTP_TOKEN).
    async fn daemon_api(&self) -> Result<std::borrow::Cow<'_, ApiClient>, Failure> {
        match self {
            Self::Remote(client) => Ok(std::borrow::Cow::Borrowed(client)),
            Self::Local(config) => {
                let store = open_store(config).await?;
                let now = clock::system().now_ms();
                let fresh = crate::store::fresh_within(config);
                // A daemon of this machine first (on a shared broker the
                // store lists every daemon of the fleet).
                let here = crate::store::host_name();
                let (_, address) = store
                    .snapshots()
                    .await?
                    .into_iter()
                    .filter(|snapshot| crate::store::is_fresh(snapshot, now, fresh))
                    .filter_map(|snapshot| Some((snapshot.host != here, snapshot.http?)))
                    .min_by_key(|(elsewhere, _)| *elsewhere)
                    .ok_or_else(|| {
                    Failure::failed(
                        "no running daemon with an HTTP server on this store; start one (flotilla up), or give --api URL",
                    )
                })?;
                // Listening on every address (0.0.0.0) is reached here.
                let address = match address.parse::<std::net::SocketAddr>() {
                    Ok(socket) if socket.ip().is_unspecified() => {
                        format!("127.0.0.1:{}", socket.port())
                    }
                    _ => address,
                };
                let token = config
                    .http
                    .token(&config.base_dir)
                    .map_err(Failure::usage)?;
                let client =
                    ApiClient::new(&format!("http://{address}"), token).map_err(Failure::usage)?;
                if client.sends_token_in_clear() {
                    eprintln!(
                        "flotilla: warning: the API token goes to {} unencrypted (plain http to another machine, the daemon found in the store); \
                         give --api with an https:// URL, an SSH tunnel or `kubectl port-forward` to 127.0.0.1",
                        client.base()
                    );
                }
                Ok(std::borrow::Cow::Owned(client))
            }
        }
    }

    async fn rollback(&self, id: &str) -> Result<crate::rollback::Journal, Failure> {
        match self {
            Self::Local(config) => {
                let store = open_store(config).await?;
                crate::rollback::roll_back_task(&store, config, id, "flotilla rollback", || {
                    clock::system().now_ms()
                })
                .await
                .map_err(|error| match error {
                    crate::rollback::RollbackError::Store(error) => error.into(),
                    failed @ (crate::rollback::RollbackError::Busy { .. }
                    | crate::rollback::RollbackError::Replaced(_)) => {
                        Failure::failed(failed.to_string())
                    }
                    other => Failure::usage(other.to_string()),
                })
            }
            // Busy or replaced: a failure worth retrying (exit 1), as
            // locally, not bad input.
            Self::Remote(client) => client.rollback(id).await.map_err(|error| match error {
                ClientError::Refused(reqwest::StatusCode::CONFLICT, message) => {
                    Failure::failed(message)
                }
                other => other.into(),
            }),
        }
    }

    async fn degrade(&self, force: Option<(&str, &str)>) -> Result<Option<Forced>, Failure> {
        match self {
            Self::Local(config) => {
                let store = open_store(config).await?;
                let forced = force
                    .map(|(level, duration)| {
                        Forced::parse(level, duration, clock::system().now_ms())
                    })
                    .transpose()
                    .map_err(|error| Failure::usage(format!("degrade set: {error}")))?;
                let value = forced.map_or(Value::Null, |forced| {
                    serde_json::to_value(forced).expect("serializes")
                });
                store
                    .put_control(crate::daemon::FORCED_LEVEL_KEY, &value)
                    .await?;
                Ok(forced)
            }
            Self::Remote(client) => Ok(client.degrade(force).await?),
        }
    }
}

/// `--limit` of the listings: 1 to the API's most.
fn parse_limit(text: &str) -> Result<usize, String> {
    let max = crate::api::MAX_LIST;
    match text.parse::<usize>() {
        Ok(limit) if (1..=max).contains(&limit) => Ok(limit),
        _ => Err(format!("{text:?} is out of range; valid: 1 to {max}")),
    }
}

fn load_config(path: &Path) -> Result<Config, Failure> {
    match config::load(path) {
        Ok(config) => Ok(config),
        Err(config::ConfigError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Err(Failure::usage(format!(
                "config file {} not found; pass -c/--config PATH or set FLOTILLA_CONFIG (see `flotilla config schema` and docs/configuration.md)",
                path.display()
            )))
        }
        Err(error) => Err(error.into()),
    }
}

async fn open_store(config: &Config) -> Result<Store, Failure> {
    let owner = format!("cli-{}-{}", crate::store::host_name(), std::process::id());
    Ok(Store::open(config, Role::Client, clock::system(), &owner).await?)
}

async fn open_queue(config: &Config) -> Result<Arc<dyn TaskQueue>, Failure> {
    Ok(open_store(config).await?.queue())
}

async fn run_with_config(command: Command, config: Config) -> Result<ExitCode, Failure> {
    match command {
        Command::Up(args) => up(config, args).await,
        Command::Config(ConfigCommand::Check { .. }) => {
            let mut problems = crate::dispatch::check_fleet(&config);
            if config.agents.is_empty() {
                problems.push(NO_AGENTS.to_string());
            }
            if !problems.is_empty() {
                return Err(Failure::usage(format!(
                    "the fleet cannot start:\n  {}",
                    problems.join("\n  ")
                )));
            }
            println!(
                "config: valid; {} {}; agents: {}",
                if config.broker.is_some() {
                    "broker"
                } else {
                    "store"
                },
                Store::describe(&config),
                config.agent_names()
            );
            Ok(ExitCode::SUCCESS)
        }
        command @ (Command::Submit(_)
        | Command::Status { .. }
        | Command::Tasks(_)
        | Command::Dlq(_)
        | Command::Escalations(_)
        | Command::Degrade(_)
        | Command::Rollback { .. }
        | Command::Chaos(_)
        | Command::Top) => run_target(command, &Target::Local(Box::new(config))).await,
        Command::Config(ConfigCommand::Schema)
        | Command::Protocol(_)
        | Command::ExampleAgent(_)
        | Command::Check { .. }
        | Command::Demo(_) => unreachable!("handled without a config"),
    }
}

/// Runs a command that reads or changes the fleet's tasks, on its store
/// or through a daemon's API.
async fn run_target(command: Command, target: &Target) -> Result<ExitCode, Failure> {
    match command {
        Command::Submit(args) => submit(target, args).await,
        Command::Status { json } => {
            let report = target.report().await?;
            if json {
                print_json(&serde_json::to_value(&report).expect("report serializes"));
            } else {
                print_status(&report, clock::system().now_ms());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Tasks(TasksCommand::List {
            state,
            agent,
            limit,
            json,
        }) => {
            let filter = ListFilter {
                state,
                agent,
                limit,
            };
            print_tasks(&target.list(&filter).await?, json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Tasks(TasksCommand::Show { id, json }) => show(target, &id, json, None).await,
        Command::Tasks(TasksCommand::Cancel { id, reason }) => {
            let cancelled = target.cancel(&id, &reason).await?;
            eprintln!(
                "task {id}: cancelled{}",
                if cancelled.children > 0 {
                    format!(", with {} child task(s) it waited for", cancelled.children)
                } else {
                    String::new()
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq(DlqCommand::List { agent, limit, json }) => {
            let filter = ListFilter {
                state: Some(TaskState::DeadLettered),
                agent,
                limit,
            };
            print_tasks(&target.list(&filter).await?, json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq(DlqCommand::Replay { ids, all }) => {
            let count = target
                .dead_letters(false, SelectionBody { ids, all })
                .await?;
            eprintln!("replayed {count} dead-lettered task(s)");
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq(DlqCommand::Purge { ids, all }) => {
            let count = target
                .dead_letters(true, SelectionBody { ids, all })
                .await?;
            eprintln!("purged {count} dead-lettered task(s)");
            Ok(ExitCode::SUCCESS)
        }
        Command::Escalations(command) => escalations(target, command).await,
        Command::Degrade(DegradeCommand::Set { level, duration }) => {
            let forced = target.degrade(Some((&level, &duration))).await?;
            let level = forced.map_or_else(|| level.clone(), |forced| forced.level.to_string());
            eprintln!(
                "degradation level forced to {level} for {duration}; running daemons apply it within degradation.check_interval"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Degrade(DegradeCommand::Clear) => {
            target.degrade(None).await?;
            eprintln!("forced degradation level cleared; the triggers decide again");
            Ok(ExitCode::SUCCESS)
        }
        Command::Top => top(target).await,
        Command::Chaos(ChaosCommand::Run { experiment, json }) => {
            let experiment =
                crate::experiment::Experiment::load(&experiment).map_err(Failure::usage)?;
            let client = target.daemon_api().await?;
            let report = crate::experiment::run(&client, &experiment, clock::system().now_ms())
                .await
                .map_err(Failure::failed)?;
            if json {
                print_json(&serde_json::to_value(&report).expect("report serializes"));
            } else {
                print!("{}", crate::experiment::render(&report));
            }
            Ok(if report.verdict == "passed" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Chaos(ChaosCommand::Last { json }) => {
            let runs = target.chaos_last().await?;
            if json {
                print_json(&serde_json::to_value(&runs).expect("reports serialize"));
            } else if runs.is_empty() {
                println!("no scheduled experiment ([[chaos.schedule]] in the config)");
            } else {
                for run in &runs {
                    if let Some(problem) = &run.problem {
                        println!("experiment {}: {problem}", run.experiment);
                    }
                    match &run.report {
                        None if run.problem.is_none() => {
                            println!("experiment {}: not run yet", run.experiment);
                        }
                        None => {}
                        Some(report) => {
                            println!(
                                "last run {}:",
                                humantime::format_rfc3339_seconds(
                                    std::time::UNIX_EPOCH
                                        + std::time::Duration::from_millis(report.started_ms)
                                )
                            );
                            print!("{}", crate::experiment::render(report));
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Chaos(command) => {
            let client = target.daemon_api().await?;
            let done = match command {
                ChaosCommand::Kill {
                    agent,
                    mode,
                    signal,
                } => {
                    client
                        .chaos_kill(&crate::chaos::KillRequest {
                            agent,
                            mode,
                            signal,
                        })
                        .await?
                }
                ChaosCommand::Pause { agent, duration } => {
                    client
                        .chaos_pause(&crate::chaos::PauseRequest { agent, duration })
                        .await?
                }
                ChaosCommand::Partition { duration } => {
                    client.chaos_broker(&duration, None).await?
                }
                ChaosCommand::Latency { add, duration } => {
                    client.chaos_broker(&duration, Some(&add)).await?
                }
                ChaosCommand::Stop => client.chaos_stop(None).await?,
                ChaosCommand::Run { .. } | ChaosCommand::Last { .. } => {
                    unreachable!("handled above")
                }
            };
            println!("{}", done.detail);
            Ok(ExitCode::SUCCESS)
        }
        Command::Rollback { id, json } => {
            let journal = target.rollback(&id).await?;
            if json {
                print_json(&serde_json::to_value(&journal).expect("journal serializes"));
            } else {
                println!("{}", crate::rollback::describe(&journal));
            }
            match journal.failed() {
                None => {
                    eprintln!("task {id}: {}", journal.summary());
                    Ok(ExitCode::SUCCESS)
                }
                Some(failed) => Err(Failure::failed(format!(
                    "task {id}: the rollback stopped at change {:?}, which could not be undone ({}); fix the cause and run `flotilla rollback {id}` again",
                    failed.change.description,
                    failed.outcome.as_deref().unwrap_or("no outcome recorded"),
                ))),
            }
        }
        Command::Up(_)
        | Command::Config(_)
        | Command::Protocol(_)
        | Command::ExampleAgent(_)
        | Command::Check { .. }
        | Command::Demo(_) => unreachable!("not a command on tasks"),
    }
}

/// `flotilla top`: redraws every second until q, Esc or Ctrl-C, while
/// following the daemon's live events.
async fn top(target: &Target) -> Result<ExitCode, Failure> {
    let feed = std::sync::Mutex::new(crate::top::Feed {
        note: "connecting to the daemon's live events…".into(),
        ..crate::top::Feed::default()
    });
    tokio::select! {
        outcome = draw_top(target, &feed) => outcome,
        never = follow_top(target, &feed) => match never {},
    }
}

/// Follows the daemon's live events into `feed`, reconnecting every 5 s
/// while the daemon (or its API) is away.
async fn follow_top(
    target: &Target,
    feed: &std::sync::Mutex<crate::top::Feed>,
) -> std::convert::Infallible {
    let set_note = |note: String| feed.lock().expect("feed lock").note = note;
    loop {
        let why = match target.daemon_api().await {
            Ok(client) => {
                let connected = || {
                    let mut feed = feed.lock().expect("feed lock");
                    feed.note = format!("following live events from {}", client.base());
                    feed.since_ms.get_or_insert(clock::system().now_ms());
                };
                match client
                    .follow_events(connected, |event| {
                        feed.lock().expect("feed lock").push(event);
                    })
                    .await
                {
                    Ok(()) => "the daemon ended the event stream".to_string(),
                    Err(error) => error.message().to_string(),
                }
            }
            Err(failure) => failure.message,
        };
        set_note(format!(
            "not following live events ({why}); trying again every 5 s"
        ));
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

async fn draw_top(
    target: &Target,
    feed: &std::sync::Mutex<crate::top::Feed>,
) -> Result<ExitCode, Failure> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(Failure::usage(
            "flotilla top needs a terminal (stdin and stdout); for a snapshot use `flotilla status`, or `flotilla status --json` in scripts",
        ));
    }
    let mut terminal = ratatui::try_init()
        .map_err(|error| Failure::failed(format!("cannot set up the terminal: {error}")))?;
    let mut view = crate::top::View::Agents;
    let outcome = loop {
        let report = match target.report().await {
            Ok(report) => report,
            Err(failure) => break Err(failure),
        };
        let tasks = if view == crate::top::View::Tasks {
            let filter = ListFilter {
                state: None,
                agent: None,
                limit: 50,
            };
            target.list(&filter).await.unwrap_or_default()
        } else {
            Vec::new()
        };
        let screen = crate::top::Screen {
            report,
            tasks,
            feed: feed.lock().expect("feed lock").clone(),
            view,
            now_ms: clock::system().now_ms(),
        };
        if let Err(error) = terminal.draw(|frame| crate::top::render(frame, &screen)) {
            break Err(Failure::failed(format!("cannot draw: {error}")));
        }
        // Keys for up to a second (polling blocks: off the runtime).
        let key = tokio::task::spawn_blocking(|| {
            event::poll(Duration::from_secs(1))
                .ok()
                .filter(|ready| *ready)
                .and_then(|_| event::read().ok())
        })
        .await
        .ok()
        .flatten();
        if let Some(Event::Key(key)) = key {
            match key.code {
                KeyCode::Char('q') | KeyCode::Esc => break Ok(ExitCode::SUCCESS),
                KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                    break Ok(ExitCode::SUCCESS);
                }
                KeyCode::Char(key) => {
                    if let Some(chosen) = crate::top::View::for_key(key) {
                        view = chosen;
                    }
                }
                _ => {}
            }
        }
    };
    ratatui::restore();
    outcome
}

/// Prints task `id` with its attempts; with `expected`, only a task in
/// that state.
async fn show(
    target: &Target,
    id: &str,
    json: bool,
    expected: Option<TaskState>,
) -> Result<ExitCode, Failure> {
    let Some(task) = target.get(id).await? else {
        return Err(Failure::usage(format!("no task with id {id:?}")));
    };
    if let Some(expected) = expected
        && task.state != expected
    {
        return Err(Failure::usage(format!(
            "task {id:?} is {}, not {expected}; see `flotilla tasks show {id}`",
            task.state
        )));
    }
    let tree = target.tree(id).await?;
    if json {
        let mut value = serde_json::to_value(&task).expect("record serializes");
        if tree != crate::delegate::Tree::default() {
            value["tree"] = serde_json::to_value(&tree).expect("tree serializes");
        }
        print_json(&value);
    } else {
        print_task(&task);
        print_tree(&tree);
    }
    Ok(ExitCode::SUCCESS)
}

/// A task's parent and children, if it has any.
fn print_tree(tree: &crate::delegate::Tree) {
    for line in tree_lines(tree) {
        println!("{line}");
    }
}

/// The lines `tasks show` prints for `tree`: the parent, then the tasks
/// below, indented by level.
fn tree_lines(tree: &crate::delegate::Tree) -> Vec<String> {
    fn below(lines: &mut Vec<String>, children: &[crate::delegate::Child], level: usize) {
        for child in children {
            let id = format!("{}{}", "  ".repeat(level), child.id);
            lines.push(format!(
                "  {id:<40} {:<16} {:<14}{}",
                child.agent,
                child
                    .state
                    .map_or_else(|| "gone".to_string(), |state| state.to_string()),
                if child.wait { " waited for" } else { "" }
            ));
            below(lines, &child.children, level + 1);
        }
    }
    let mut lines = Vec::new();
    if let Some(link) = &tree.parent {
        lines.push(format!(
            "parent:   {} ({}; sent by {} with key {:?}{}, depth {})",
            link.parent,
            tree.parent_state
                .map_or_else(|| "gone".to_string(), |state| state.to_string()),
            link.from,
            link.key,
            if link.wait { ", waited for" } else { "" },
            link.depth
        ));
    }
    if !tree.children.is_empty() {
        lines.push("children:".into());
        below(&mut lines, &tree.children, 0);
    }
    if tree.omitted > 0 {
        lines.push(format!(
            "  ... and at least {} more (a tree shows up to {} tasks; `tasks show` a child for its own)",
            tree.omitted,
            crate::delegate::MAX_TREE_NODES
        ));
    }
    lines
}

async fn escalations(target: &Target, command: EscalationsCommand) -> Result<ExitCode, Failure> {
    match command {
        EscalationsCommand::List { agent, limit, json } => {
            let filter = ListFilter {
                state: Some(TaskState::Escalated),
                agent,
                limit,
            };
            print_tasks(&target.list(&filter).await?, json);
            Ok(ExitCode::SUCCESS)
        }
        EscalationsCommand::Show { id, json } => {
            show(target, &id, json, Some(TaskState::Escalated)).await
        }
        EscalationsCommand::Resolve {
            id,
            retry,
            complete,
            drop,
        } => {
            let complete = complete
                .map(|result| {
                    serde_json::from_str::<Value>(&result).map_err(|error| {
                        Failure::usage(format!(
                            "--complete is not valid JSON ({error}); e.g. --complete '{{\"approved\": true}}'"
                        ))
                    })
                })
                .transpose()?;
            let done = match (retry, &complete, drop) {
                (true, None, false) => "queued again",
                (false, Some(_), false) => "completed",
                (false, None, true) => "dropped to the dead letters",
                _ => {
                    return Err(Failure::usage(
                        "give exactly one of --retry, --complete JSON or --drop",
                    ));
                }
            };
            let body = ResolveBody {
                retry,
                complete,
                drop,
            };
            target.resolve(&id, body).await?;
            eprintln!("task {id}: {done}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn up(mut config: Config, args: UpArgs) -> Result<ExitCode, Failure> {
    if let Some(name) = args.name {
        if !config::valid_token(&name, 64) {
            return Err(Failure::usage(format!(
                "invalid --name {name:?}: use 1 to 64 letters, digits, '-' or '_'"
            )));
        }
        config.daemon.name = Some(name);
    }
    if let Some(agents) = args.agents {
        if let Some(unknown) = agents
            .iter()
            .find(|name| !config.agents.contains_key(*name))
        {
            return Err(Failure::usage(format!(
                "--agents names unknown agent {unknown:?}; configured agents: {}",
                config.agent_names()
            )));
        }
        config.daemon.agents = Some(agents);
    }
    if let Some(listen) = args.listen {
        if listen != "off" && listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(Failure::usage(format!(
                "invalid --listen {listen:?}: use ADDRESS:PORT, e.g. 127.0.0.1:9751 (port 0 picks a free one), or off"
            )));
        }
        config.http.listen = listen;
    }
    if config.agents.is_empty() {
        return Err(Failure::usage(NO_AGENTS));
    }
    let problems = crate::dispatch::check_fleet(&config);
    if !problems.is_empty() {
        return Err(Failure::usage(format!(
            "the fleet cannot start:\n  {}",
            problems.join("\n  ")
        )));
    }
    raise_open_file_limit(&config);
    let daemon = crate::daemon::Daemon::start(config, clock::system()).await?;
    let failure = tokio::select! {
        () = shutdown_signal() => None,
        reason = daemon.failed() => Some(reason),
    };
    daemon.stop_unless(shutdown_signal()).await;
    match failure {
        None => Ok(ExitCode::SUCCESS),
        Some(reason) => Err(Failure::failed(reason)),
    }
}

/// Raises the soft limit of open files to the hard one, as a daemon with
/// many replicas needs (three pipes each, plus the store, sockets and
/// readiness checks), and warns when even that is short of what the
/// fleet may need.
fn raise_open_file_limit(config: &Config) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let replicas: u64 = config
        .agents
        .values()
        .map(|agent| u64::from(agent.replicas.max()))
        .sum();
    let needed = replicas * 4 + 256;
    if limit < needed {
        tracing::warn!(
            limit,
            needed,
            "the open-file limit is below what this fleet may need (4 per replica plus 256): raise it (ulimit -n, or LimitNOFILE= in the systemd unit)"
        );
    }
}

/// Resolves on SIGTERM, SIGINT or SIGHUP. A hang-up (the terminal or SSH
/// session of a daemon run in the foreground closed) stops the daemon
/// gracefully: its default action would kill it at once, like `kill -9`.
/// Started with SIGHUP ignored (`nohup`), it goes on ignoring it.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    let mut hangup = (!HANGUP_IGNORED.load(std::sync::atomic::Ordering::Relaxed))
        .then(|| signal(SignalKind::hangup()).expect("SIGHUP handler installs"));
    let hung_up = async {
        match hangup.as_mut() {
            Some(hangup) => hangup.recv().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
        _ = hung_up => tracing::info!("SIGHUP received"),
    }
}

/// Parses one line of a `submit --file` input; `priority` is that of a
/// line that gives none.
fn parse_task_line(line: &str, agent: &str, priority: Priority) -> Result<NewTask, String> {
    const ENVELOPE: [&str; 3] = ["id", "payload", "priority"];
    let value: Value = serde_json::from_str(line).map_err(|error| format!("not JSON: {error}"))?;
    let envelope = match &value {
        Value::Object(map) if map.contains_key("payload") => {
            let unknown: Vec<&String> = map
                .keys()
                .filter(|key| !ENVELOPE.contains(&key.as_str()))
                .collect();
            let has_envelope_key = map.contains_key("id") || map.contains_key("priority");
            match (unknown.first(), has_envelope_key) {
                (None, _) => Some(map),
                // `payload` with `id` or `priority` is an envelope: a
                // misspelt key must not turn it into a payload (and its
                // id into a generated one).
                (Some(key), true) => {
                    return Err(format!(
                        "unknown field {key:?} in a task envelope; valid: id, payload, priority (to submit such an object as the payload, wrap it: {{\"payload\": ...}})"
                    ));
                }
                (Some(_), false) => None,
            }
        }
        _ => None,
    };
    let Some(map) = envelope else {
        return Ok(NewTask {
            id: new_task_id(),
            agent: agent.to_string(),
            priority,
            payload: value,
        });
    };
    let id = match map.get("id") {
        None | Some(Value::Null) => new_task_id(),
        Some(Value::String(id)) => {
            validate_task_id(id).map_err(|error| error.to_string())?;
            id.clone()
        }
        Some(other) => return Err(format!("\"id\" must be a string, found {other}")),
    };
    let priority = match map.get("priority") {
        None | Some(Value::Null) => priority,
        Some(Value::String(text)) => {
            serde_json::from_value(Value::String(text.clone())).map_err(|_| {
                format!("unknown priority {text:?}; valid: critical, high, normal, low")
            })?
        }
        Some(other) => return Err(format!("\"priority\" must be a string, found {other}")),
    };
    Ok(NewTask {
        id,
        agent: agent.to_string(),
        priority,
        payload: map["payload"].clone(),
    })
}

/// Reads the tasks of a `submit --file` input; with `max_payload` (the
/// store's limit, known beside the config) an oversized payload is named
/// by its line, with the other bad lines.
async fn read_task_file(
    path: &Path,
    agent: &str,
    priority: Priority,
    max_payload: Option<usize>,
    max_total: usize,
) -> Result<Vec<NewTask>, Failure> {
    let reader: Box<dyn tokio::io::AsyncBufRead + Unpin + Send> = if path == Path::new("-") {
        Box::new(tokio::io::BufReader::new(tokio::io::stdin()))
    } else {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|error| Failure::usage(format!("cannot read {}: {error}", path.display())))?;
        Box::new(tokio::io::BufReader::new(file))
    };
    // Each line read up to the API's largest body: a longer one is a bad
    // line, not memory without end.
    let name = path.display().to_string();
    read_tasks(
        reader,
        &name,
        agent,
        priority,
        max_payload,
        crate::api::MAX_BODY_BYTES,
        max_total,
    )
    .await
}

/// The tasks of the lines of `reader` (named `name` in messages), each line
/// at most `max_line` bytes; every bad line is named at once, and nothing
/// is returned unless all are good.
async fn read_tasks(
    reader: impl tokio::io::AsyncBufRead + Unpin,
    name: &str,
    agent: &str,
    priority: Priority,
    max_payload: Option<usize>,
    max_line: usize,
    max_total: usize,
) -> Result<Vec<NewTask>, Failure> {
    let mut lines = crate::lines::LineReader::new(reader, max_line);
    let mut tasks = Vec::new();
    let mut problems = Vec::new();
    let mut number = 0;
    let mut bytes = 0;
    let mut stopped = false;
    loop {
        let line = lines.next_line().await.map_err(|error| {
            Failure::usage(format!("cannot read {name} line {}: {error}", number + 1))
        })?;
        number += 1;
        if line.is_some() && number > MAX_FILE_LINES {
            return Err(Failure::usage(format!(
                "{name} has more than {MAX_FILE_LINES} lines; split it into several submits"
            )));
        }
        if problems.len() >= MAX_FILE_PROBLEMS {
            stopped = line.is_some();
            break;
        }
        let line = match line {
            None => break,
            Some(crate::lines::Line::Text(line)) => {
                bytes += line.len() + 1;
                if bytes > max_total {
                    return Err(Failure::usage(format!(
                        "{name} holds more than {max_total} bytes of tasks; split it into several submits"
                    )));
                }
                line
            }
            Some(crate::lines::Line::TooLong(_)) => {
                problems.push(format!("line {number}: longer than {max_line} bytes"));
                continue;
            }
            Some(crate::lines::Line::NotUtf8(_)) => {
                problems.push(format!("line {number}: not UTF-8"));
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        if tasks.len() + problems.len() >= MAX_FILE_TASKS {
            return Err(Failure::usage(format!(
                "{name} has more than {MAX_FILE_TASKS} tasks; split it into several submits"
            )));
        }
        match parse_task_line(&line, agent, priority) {
            Ok(task) => match max_payload.map(|max| (task.payload.to_string().len(), max)) {
                Some((size, max)) if size > max => problems.push(format!(
                    "line {number}: payload of {size} bytes exceeds store.max_payload_bytes = {max}"
                )),
                _ => tasks.push(task),
            },
            Err(problem) => problems.push(format!("line {number}: {problem}")),
        }
    }
    if !problems.is_empty() {
        let shown: Vec<&String> = problems.iter().take(20).collect();
        let more = problems.len().saturating_sub(shown.len());
        let mut message = format!(
            "{name} has {} bad line(s); nothing was submitted:\n  {}",
            problems.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        );
        if more > 0 {
            message.push_str(&format!("\n  … and {more} more"));
        }
        if stopped {
            message.push_str(&format!("\n  (reading stopped at line {number})"));
        }
        return Err(Failure::usage(message));
    }
    Ok(tasks)
}

async fn submit(target: &Target, args: SubmitArgs) -> Result<ExitCode, Failure> {
    // What to do about a submit that failed partway: a broker stores a
    // batch task by task, and a lost answer may hide a stored task.
    let mut retry_hint: Option<String> = None;
    let body = match (&args.payload, &args.file) {
        (Some(payload), None) => {
            let payload: Value = serde_json::from_str(payload).map_err(|error| {
                Failure::usage(format!("--payload is not valid JSON ({error}); e.g. --payload '{{\"prompt\": \"hello\"}}'"))
            })?;
            let id = args.id.clone().unwrap_or_else(new_task_id);
            validate_task_id(&id)?;
            if args.id.is_none() {
                retry_hint = Some(format!(
                    "its id was {id}: submit it again with --id {id}, so that it is stored once even if this attempt stored it"
                ));
            }
            SubmitBody {
                agent: args.agent.clone(),
                id: Some(id),
                priority: Some(args.priority),
                payload: Some(payload),
                tasks: None,
            }
        }
        (None, Some(path)) => {
            // Sent to a daemon, the whole batch is one request body.
            let (max_payload, max_total) = match target {
                Target::Local(config) => (
                    Some(config.store.max_payload_bytes.as_usize()),
                    MAX_FILE_BYTES,
                ),
                Target::Remote(_) => (None, crate::api::MAX_BODY_BYTES),
            };
            let tasks =
                read_task_file(path, &args.agent, args.priority, max_payload, max_total).await?;
            if tasks.is_empty() {
                return Err(Failure::usage("no tasks to submit: the file is empty"));
            }
            SubmitBody {
                agent: args.agent.clone(),
                id: None,
                priority: None,
                payload: None,
                tasks: Some(
                    tasks
                        .into_iter()
                        .map(|task| TaskBody {
                            id: Some(task.id),
                            payload: task.payload,
                            priority: task.priority,
                        })
                        .collect(),
                ),
            }
        }
        _ => return Err(Failure::usage("give either --payload JSON or --file PATH")),
    };
    let receipts = match target.submit(&body).await {
        Ok(receipts) => receipts,
        Err(mut failure) => {
            // Not a refusal, nor a call that reached no daemon (nothing
            // stored then): part of it may be.
            if failure.code != 2 && !failure.untouched {
                let hint = match (&args.file, &body.tasks) {
                    (Some(path), Some(tasks)) => Some(save_batch(path, tasks)),
                    _ => retry_hint,
                };
                if let Some(hint) = hint {
                    failure
                        .message
                        .push_str(&format!("\nsome of it may have been stored; {hint}"));
                }
            }
            return Err(failure);
        }
    };
    let duplicates = receipts.iter().filter(|receipt| receipt.duplicate).count();
    if args.json {
        print_json(&serde_json::to_value(&receipts).expect("receipts serialize"));
    } else {
        for receipt in &receipts {
            if receipt.duplicate {
                println!("{}\tduplicate ({})", receipt.id, receipt.state);
            } else {
                println!("{}", receipt.id);
            }
        }
    }
    eprintln!(
        "submitted {} task(s) to {}{}",
        receipts.len() - duplicates,
        args.agent,
        if duplicates > 0 {
            format!(", {duplicates} duplicate(s) ignored")
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes `tasks`, each with its id (generated for lines without one),
/// beside `path` (the current directory for stdin), ready to be
/// submitted again should this submit fail partway; says how, or that
/// the file is safe to submit again as it is.
fn save_batch(path: &Path, tasks: &[crate::api::TaskBody]) -> String {
    let target = if path == Path::new("-") {
        PathBuf::from(format!(
            "flotilla-submit-{}.jsonl",
            uuid::Uuid::now_v7().simple()
        ))
    } else {
        let mut name = path.as_os_str().to_owned();
        name.push(".ids.jsonl");
        PathBuf::from(name)
    };
    let lines: String = tasks
        .iter()
        .map(|task| {
            let mut line = serde_json::json!({
                "id": task.id,
                "payload": task.payload,
                "priority": task.priority,
            })
            .to_string();
            line.push('\n');
            line
        })
        .collect();
    match std::fs::write(&target, lines) {
        Ok(()) => format!(
            "each task's id is in {}: submit that file (--file {}) to finish the batch, storing each task once",
            target.display(),
            target.display()
        ),
        Err(error) => format!(
            "tasks without an id in the file got new ones, and saving them to {} failed ({error}): add ids to the file's lines before submitting it again",
            target.display()
        ),
    }
}

fn ago(now: UnixMillis, then: UnixMillis) -> String {
    let seconds = now.saturating_sub(then) / 1000;
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}

fn print_status(report: &StatusReport, now: UnixMillis) {
    if report.daemons.is_empty() {
        println!("daemon: not running");
    }
    for daemon in &report.daemons {
        let name = match (&daemon.name, &daemon.host, report.daemons.len() > 1) {
            (Some(name), Some(host), true) => format!(" {name} on {host}"),
            _ => String::new(),
        };
        let mut line = match (
            daemon.running,
            daemon.pid,
            daemon.started_ms,
            daemon.last_seen_ms,
        ) {
            (true, Some(pid), Some(started), _) => {
                format!(
                    "daemon{name}: running (pid {pid}, up {})",
                    ago(now, started)
                )
            }
            (false, _, _, Some(seen)) => {
                format!(
                    "daemon{name}: not running (last seen {} ago)",
                    ago(now, seen)
                )
            }
            _ => format!("daemon{name}: not running"),
        };
        if let Some(http) = daemon.http.as_ref().filter(|_| daemon.running) {
            line.push_str(&format!("; http {http}"));
        }
        if let Some(broker) = daemon.broker.as_ref().filter(|_| daemon.running) {
            line.push_str(&format!(
                "; broker {} ({} disconnects, {} reconnects)",
                if broker.connected {
                    "connected"
                } else {
                    "DISCONNECTED"
                },
                broker.disconnects,
                broker.reconnects
            ));
        }
        println!("{line}");
    }
    println!("store:  {}", report.store);
    if let Some(error) = &report.store_error {
        println!("STORE UNREACHABLE: {error} (task counts and other daemons not shown)");
    }
    let degradation = &report.degradation;
    if degradation.level != Level::Nominal || degradation.forced.is_some() {
        let mut line = format!(
            "DEGRADED: level {} for {}",
            degradation.level,
            ago(now, degradation.since_ms)
        );
        if let Some(reason) = &degradation.reason {
            line.push_str(&format!(": {reason}"));
        }
        match degradation.level {
            Level::Essential => line.push_str("; only high and critical tasks run"),
            Level::Emergency => line.push_str("; only critical tasks run"),
            _ => {}
        }
        if let Some(at) = degradation.lower_at_ms
            && degradation.forced.is_none()
        {
            line.push_str(&format!(
                "; the triggers are clear now: a lower level in {} unless they return",
                humantime::format_duration(Duration::from_secs(
                    at.saturating_sub(now).div_ceil(1000)
                ))
            ));
        }
        println!("{line}");
    }
    let t = &report.tasks;
    if report.store_error.is_none() {
        let by = report.counted_by.as_ref().map_or(String::new(), |by| {
            format!(
                " (counted by daemon {} {} ago)",
                by.daemon,
                ago(now, by.taken_ms)
            )
        });
        println!(
            "tasks:  {} queued, {} running, {} completed, {} dead-lettered, {} escalated{by}",
            t.queued, t.running, t.completed, t.dead_lettered, t.escalated
        );
    }
    println!();
    println!(
        "{:<20} {:<9} {:<9} {:>8} {:>7} {:>8} {:>10} {:>6} {:>9} {:>10}",
        "AGENT",
        "STATE",
        "BREAKER",
        "REPLICAS",
        "QUEUED",
        "RUNNING",
        "COMPLETED",
        "DEAD",
        "RESTARTS",
        "MALFORMED"
    );
    for agent in &report.agents {
        let up = agent.replicas.iter().filter(|r| r.is_ready()).count();
        println!(
            "{:<20} {:<9} {:<9} {:>8} {:>7} {:>8} {:>10} {:>6} {:>9} {:>10}",
            agent.name,
            json_name(&agent.state),
            match (agent.breaker.state, agent.state) {
                (Some(state), _) => state.as_str(),
                (None, AgentState::Stopped) => "-",
                (None, _) => "off",
            },
            format!("{up}/{}", agent.replicas.len()),
            agent.tasks.queued,
            agent.tasks.running,
            agent.tasks.completed,
            agent.tasks.dead_lettered,
            agent.restarts,
            agent.malformed_lines,
        );
        if let Some(failure) = &agent.failure {
            println!("  failed: {failure}");
        }
        if let Some(transition) = &agent.breaker.last_transition
            && agent.breaker.state != Some(BreakerState::Closed)
        {
            let mut line = format!(
                "  breaker {} {} ago: {}",
                transition.to,
                ago(now, transition.at_ms),
                transition.reason
            );
            if let Some(until) = agent.breaker.open_until_ms {
                line.push_str(&format!(
                    "; probes in {}",
                    humantime::format_duration(Duration::from_secs(
                        until.saturating_sub(now).div_ceil(1000)
                    ))
                ));
            }
            println!("{line}");
        }
        let diverted = &agent.diverted;
        if *diverted != crate::status::Diverted::default() {
            println!(
                "  while unavailable: {} rerouted, {} escalated, {} proceeded with warning",
                diverted.rerouted, diverted.escalated, diverted.proceeded_with_warning
            );
        }
        if let Some(event) = agent.watchdog.last() {
            println!(
                "  watchdog {} ago: {}: {}",
                ago(now, event.at_ms),
                event.action,
                event.detail
            );
        }
        for check in agent.readiness.iter().filter(|check| !check.ok) {
            println!(
                "  {}readiness check {:?} failing: {}",
                if check.required && !check.tolerated {
                    "NOT READY: "
                } else {
                    ""
                },
                check.name,
                check.detail
            );
        }
        if let Some(malformed) = &agent.last_malformed {
            println!("  last malformed line: {malformed}");
        }
        if report.daemons.iter().any(|daemon| daemon.running) {
            for replica in &agent.replicas {
                let mut line = format!(
                    "  {}/{:<3} {:<8}",
                    agent.name,
                    replica.index,
                    json_name(&replica.state)
                );
                if let Some(daemon) = &replica.daemon {
                    line.push_str(&format!(" on {daemon}"));
                }
                if let Some(pid) = replica.pid {
                    line.push_str(&format!(" pid {pid}"));
                }
                if !replica.tasks.is_empty() {
                    line.push_str(&format!(" task {}", replica.tasks.join(",")));
                }
                if let Some(progress) = replica.last_progress_ms {
                    line.push_str(&format!(" progress {} ago", ago(now, progress)));
                }
                if let Some(rss) = replica.rss_bytes {
                    line.push_str(&format!(" rss {}", approximate_size(rss)));
                }
                if replica.restarts > 0 {
                    line.push_str(&format!(" restarts {}", replica.restarts));
                }
                if let Some(exit) = &replica.last_exit {
                    line.push_str(&format!(" (last exit: {exit})"));
                }
                if let Some(why) = &replica.not_ready {
                    line.push_str(&format!(" NOT READY: {why}"));
                }
                println!("{line}");
            }
        }
    }
}

/// A size for humans, to one decimal: `13.6MiB`.
fn approximate_size(bytes: u64) -> String {
    let units = [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in units {
        if bytes >= size {
            return format!("{:.1}{unit}", bytes as f64 / size as f64);
        }
    }
    format!("{bytes}B")
}

fn json_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(text)) => text,
        _ => String::from("?"),
    }
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON serializes")
    );
}

fn time(ms: UnixMillis) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(time).to_string()
}

fn print_tasks(tasks: &[TaskRecord], json: bool) {
    if json {
        print_json(&serde_json::to_value(tasks).expect("records serialize"));
        return;
    }
    println!(
        "{:<38} {:<16} {:<14} {:<8} {:>8}  REASON",
        "ID", "AGENT", "STATE", "PRIORITY", "ATTEMPTS"
    );
    for task in tasks {
        println!(
            "{:<38} {:<16} {:<14} {:<8} {:>8}  {}",
            task.id,
            task.agent,
            task.state.as_str(),
            task.priority.as_str(),
            task.attempts,
            task.reason
                .as_deref()
                .map(crate::protocol::excerpt)
                .unwrap_or_default()
        );
    }
}

fn print_task(task: &TaskRecord) {
    println!("id:         {}", task.id);
    println!("agent:      {}", task.agent);
    println!("state:      {}", task.state);
    println!("priority:   {}", task.priority.as_str());
    println!(
        "attempts:   {} ({} counted against max_deliver, {} replays)",
        task.attempts, task.charged_attempts, task.replays
    );
    println!("created:    {}", time(task.created_ms));
    if let Some(finished) = task.finished_ms {
        println!("finished:   {}", time(finished));
    }
    if let Some(reason) = &task.reason {
        println!("reason:     {reason}");
    }
    if let Some(result) = &task.result {
        println!("result:     {result}");
    }
    if let Some(checkpoint) = &task.checkpoint {
        println!("checkpoint: {checkpoint}");
    }
    println!("payload:    {}", task.payload);
    if !task.history.is_empty() {
        println!("history:");
        for attempt in &task.history {
            let took = attempt
                .ended_ms
                .map(|end| format!("{}ms", end.saturating_sub(attempt.started_ms)))
                .unwrap_or_else(|| "running".into());
            println!(
                "  #{:<3} {:<17} {:<16} {} ({took}) {}",
                attempt.number,
                attempt.outcome.map(|o| o.as_str()).unwrap_or("-"),
                attempt.replica.as_deref().unwrap_or("-"),
                time(attempt.started_ms),
                attempt.detail.as_deref().unwrap_or("")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_tree_prints_every_level_indented() {
        use crate::delegate::{Child, Link, Tree};
        let child = |id: &str, state, children| Child {
            id: id.into(),
            agent: "worker".into(),
            state,
            wait: true,
            children,
        };
        let tree = Tree {
            parent: Some(Link {
                parent: "root".into(),
                from: "manager".into(),
                key: "a".into(),
                depth: 1,
                wait: true,
                waiting: vec!["manager".into()],
                sent_ms: 0,
            }),
            parent_state: Some(TaskState::Running),
            children: vec![child(
                "root/a/x",
                Some(TaskState::Completed),
                vec![child("root/a/x/y", None, Vec::new())],
            )],
            omitted: 3,
        };
        let lines = tree_lines(&tree);
        assert_eq!(
            lines[0],
            "parent:   root (running; sent by manager with key \"a\", waited for, depth 1)"
        );
        assert_eq!(lines[1], "children:");
        assert!(
            lines[2].starts_with("  root/a/x ") && lines[2].contains("completed"),
            "{lines:#?}"
        );
        assert!(
            lines[3].starts_with("    root/a/x/y ") && lines[3].contains("gone"),
            "{lines:#?}"
        );
        assert!(lines[4].contains("... and at least 3 more"), "{lines:#?}");
    }

    #[test]
    fn task_lines_are_payloads_or_envelopes() {
        let parse_task_line = |line, agent| parse_task_line(line, agent, Priority::Normal);
        let plain = parse_task_line(r#"{"prompt": "x"}"#, "a").unwrap();
        assert_eq!(plain.payload, json!({"prompt": "x"}));
        let envelope = parse_task_line(
            r#"{"id": "t-1", "payload": {"p": 1}, "priority": "high"}"#,
            "a",
        )
        .unwrap();
        assert_eq!(
            (envelope.id.as_str(), envelope.priority),
            ("t-1", Priority::High)
        );
        assert_eq!(envelope.payload, json!({"p": 1}));
        // An object with other keys besides payload is a payload itself.
        let other = parse_task_line(r#"{"payload": 1, "extra": 2}"#, "a").unwrap();
        assert_eq!(other.payload, json!({"payload": 1, "extra": 2}));
        assert!(
            parse_task_line(r#"{"payload": 1, "priority": "urgent"}"#, "a")
                .unwrap_err()
                .contains("valid: critical")
        );
        assert!(
            parse_task_line("{nope", "a")
                .unwrap_err()
                .contains("not JSON")
        );
        assert!(parse_task_line(r#"{"id": "bad id", "payload": 1}"#, "a").is_err());
        // A misspelt key of an envelope is named, not taken as a payload.
        let typo =
            parse_task_line(r#"{"id": "t1", "payload": 1, "priorty": "high"}"#, "a").unwrap_err();
        assert!(
            typo.contains("unknown field \"priorty\" in a task envelope"),
            "{typo}"
        );
        // --priority is the default of the lines that give none.
        let high = super::parse_task_line(r#"{"payload": 1}"#, "a", Priority::High).unwrap();
        assert_eq!(high.priority, Priority::High);
        let own =
            super::parse_task_line(r#"{"payload": 1, "priority": "low"}"#, "a", Priority::High)
                .unwrap();
        assert_eq!(own.priority, Priority::Low);
    }

    #[tokio::test]
    async fn file_lines_are_bounded() {
        let text = "{\"n\": 1}\r\n[\"much too long\"]\n\n2\n";
        let problem = read_file("t.jsonl", text, 10, 1000).await.unwrap_err();
        assert!(
            problem.contains("t.jsonl has 1 bad line(s)")
                && problem.contains("line 2: longer than 10 bytes"),
            "{problem}"
        );
        assert_eq!(read_file("t", "1\n\n2\n", 10, 1000).await, Ok(2));
    }

    /// How many tasks [`read_tasks`] finds in `text` (named `name`), or
    /// what it says is wrong.
    async fn read_file(
        name: &str,
        text: &str,
        max_line: usize,
        max_total: usize,
    ) -> Result<usize, String> {
        read_tasks(
            text.as_bytes(),
            name,
            "a",
            Priority::Normal,
            None,
            max_line,
            max_total,
        )
        .await
        .map(|tasks| tasks.len())
        .map_err(|failure| failure.message)
    }

    #[tokio::test]
    async fn task_files_are_bounded_in_lines_bytes_and_problems() {
        let read = |text: String, max_total: usize| async move {
            read_file("t", &text, 100, max_total).await
        };
        // Blank lines count: endless input ends.
        let blank = read("\n".repeat(MAX_FILE_LINES + 1), usize::MAX).await;
        assert!(
            blank
                .unwrap_err()
                .contains(&format!("more than {MAX_FILE_LINES} lines"))
        );
        assert_eq!(read("\n".repeat(MAX_FILE_LINES), usize::MAX).await, Ok(0));
        // Bytes: the whole batch is held at once.
        let big = read("{}\n".repeat(10), 25).await.unwrap_err();
        assert!(big.contains("more than 25 bytes of tasks"), "{big}");
        // Bad lines: named up to a point, then reading stops.
        let bad = read("x\n".repeat(5000), usize::MAX).await.unwrap_err();
        assert!(
            bad.contains("1000 bad line(s)") && bad.contains("reading stopped at line 1001"),
            "{bad}"
        );
    }

    #[test]
    fn the_command_line_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "flotilla",
            "submit",
            "--agent",
            "a",
            "--priority",
            "critical",
            "--payload",
            "{}",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Submit(SubmitArgs {
                priority: Priority::Critical,
                ..
            })
        ));
        assert!(Cli::try_parse_from(["flotilla", "dlq", "replay"]).is_err());
        assert!(Cli::try_parse_from(["flotilla", "dlq", "purge"]).is_err());
        assert!(Cli::try_parse_from(["flotilla", "dlq", "purge", "--all"]).is_ok());
        assert!(Cli::try_parse_from(["flotilla", "dlq", "purge", "a", "--all"]).is_err());
    }
}
