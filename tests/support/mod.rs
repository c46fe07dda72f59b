//! Shared helpers of the integration tests: temporary fleets with real
//! agent processes, the daemon in-process or as a real `flotilla up`
//! process, and polling with bounded waits.

#![allow(dead_code)]

pub mod nats;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use flotilla::clock;
use flotilla::config::{self, Config};
use flotilla::daemon::Daemon;
use flotilla::queue::sqlite::{Role, Settings, SqliteQueue};
use flotilla::queue::{NewTask, Priority, TaskQueue, TaskRecord};
use serde_json::json;

/// The flotilla binary built for these tests.
pub fn flotilla_bin() -> &'static str {
    env!("CARGO_BIN_EXE_flotilla")
}

/// The repository root (for example agents).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An external tool the tests need: `$ENV_VAR`, else `.tools/bin/NAME`
/// (from the repo's installer script), else NAME on PATH. Without it,
/// `None` after saying so loudly, except under `CI=true`, where it panics.
pub fn tool(test: &str, name: &str, env_var: &str, installer: &str) -> Option<PathBuf> {
    let found = std::env::var_os(env_var)
        .map(PathBuf::from)
        .or_else(|| {
            let local = repo_root().join(".tools/bin").join(name);
            local.exists().then_some(local)
        })
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|candidate| candidate.is_file())
            })
        });
    if found.is_none() {
        let message = format!("{test}: no {name} found (set {env_var}, or run {installer})");
        if std::env::var("CI").is_ok_and(|value| value == "true") {
            panic!("{message}; CI=true requires it");
        }
        eprintln!("\n!!! SKIPPED {message}\n");
    }
    found
}

/// A TOML array running the built-in example agent with `args`.
pub fn example_agent(args: &[&str]) -> String {
    let mut argv = vec![flotilla_bin().to_string(), "example-agent".to_string()];
    argv.extend(args.iter().map(|arg| arg.to_string()));
    toml_array(&argv)
}

/// A TOML array of strings.
pub fn toml_array(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|item| format!("{item:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Makes the process `command` starts die with the thread that starts it
/// (SIGKILL), so that a test binary killed mid-run (a timeout, a closed
/// pipe) leaves no daemon or server behind. Tests start processes from the
/// test's own thread, which outlives them.
pub fn die_with_parent(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure only makes one
    // async-signal-safe system call.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    command
}

/// A fleet in a temporary directory.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl Fleet {
    /// Writes `agents` (TOML `[agents.*]` tables) after a default store
    /// section.
    pub fn new(agents: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("flotilla.toml");
        let text = format!(
            "[store]\npath = \"fleet.db\"\n\n[daemon]\nshutdown_grace = \"2s\"\nstatus_interval = \"200ms\"\n\n[http]\nlisten = \"127.0.0.1:0\"\n\n{agents}"
        );
        std::fs::write(&config_path, text).expect("config written");
        Self { dir, config_path }
    }

    pub fn config(&self) -> Config {
        config::load(&self.config_path).expect("valid config")
    }

    /// The daemon in this process.
    pub async fn start(&self) -> Daemon {
        self.start_with_clock(clock::system()).await
    }

    /// The daemon in this process, reading `clock`.
    pub async fn start_with_clock(&self, clock: clock::SharedClock) -> Daemon {
        Daemon::start(self.config(), clock)
            .await
            .expect("daemon starts")
    }

    /// A client connection to the store (like the CLI's).
    pub fn client(&self) -> SqliteQueue {
        let config = self.config();
        SqliteQueue::open(
            &config.store_path(),
            Settings::from_config(&config.store, Role::Client),
            clock::system(),
        )
        .expect("store opens")
    }

    /// A client of the fleet's store, on either backend, as the CLI opens
    /// it.
    pub async fn store(&self) -> flotilla::store::Store {
        flotilla::store::Store::open(&self.config(), Role::Client, clock::system(), "test-client")
            .await
            .expect("store opens")
    }

    /// `flotilla up` as a real process.
    pub fn spawn_daemon(&self) -> Child {
        self.spawn_up(&[])
    }

    /// `flotilla up --name NAME` as a real process.
    pub fn spawn_named(&self, name: &str) -> Child {
        self.spawn_up(&["--name", name])
    }

    fn spawn_up(&self, extra: &[&str]) -> Child {
        die_with_parent(&mut Command::new(flotilla_bin()))
            .args(["-c", self.config_path.to_str().unwrap(), "up"])
            .args(extra)
            .env("FLOTILLA_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("daemon spawns")
    }

    /// Runs the CLI with `args` against this fleet.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_stdin(args, None)
    }

    pub fn cli_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = Command::new(flotilla_bin());
        command
            .args(["-c", self.config_path.to_str().unwrap()])
            .args(args)
            .env("FLOTILLA_LOG", "warn")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("cli spawns");
        if let Some(text) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        child.wait_with_output().expect("cli runs")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The events a `cat >> FILE` notification sink has written to
    /// `file` so far (a line still being written is read next time).
    pub fn sink_events(&self, file: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path(file))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Gives the daemon's API `token` (in a token file beside the config,
    /// as an operator would).
    pub fn set_token(&self, token: &str) {
        std::fs::write(self.path("api-token"), format!("{token}\n")).unwrap();
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        std::fs::write(
            &self.config_path,
            text.replace(
                "listen = \"127.0.0.1:0\"",
                "listen = \"127.0.0.1:0\"\ntoken_file = \"api-token\"",
            ),
        )
        .unwrap();
    }

    /// Submits `count` tasks with ids `PREFIX-00000`... and payloads
    /// `{"n": N}` to `agent` through `flotilla submit --file`, as a user
    /// would; returns their ids.
    pub fn submit_numbered(&self, agent: &str, count: usize, prefix: &str) -> Vec<String> {
        let (tasks, ids) = numbered_tasks(agent, count, prefix);
        let lines: Vec<String> = tasks
            .iter()
            .map(|task| json!({"id": task.id, "payload": task.payload}).to_string())
            .collect();
        let file = self.path(&format!("{prefix}.jsonl"));
        std::fs::write(&file, lines.join("\n")).unwrap();
        let submitted = self.cli(&["submit", "--agent", agent, "--file", file.to_str().unwrap()]);
        assert!(
            submitted.status.success(),
            "{}",
            String::from_utf8_lossy(&submitted.stderr)
        );
        ids
    }
}

/// Polls `check` every 50 ms until it returns true or `limit` passes.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// `count` tasks for `agent` with ids `PREFIX-00000`... and payloads
/// `{"n": N}`, and their ids.
pub fn numbered_tasks(agent: &str, count: usize, prefix: &str) -> (Vec<NewTask>, Vec<String>) {
    let ids: Vec<String> = (0..count).map(|n| format!("{prefix}-{n:05}")).collect();
    let tasks = ids
        .iter()
        .enumerate()
        .map(|(n, id)| NewTask {
            id: id.clone(),
            agent: agent.to_string(),
            priority: Priority::Normal,
            payload: json!({"n": n}),
        })
        .collect();
    (tasks, ids)
}

/// The runtime of agent `name` in the in-process daemon.
pub fn agent<'a>(
    daemon: &'a flotilla::daemon::Daemon,
    name: &str,
) -> &'a std::sync::Arc<flotilla::dispatch::AgentRuntime> {
    daemon
        .agents()
        .iter()
        .find(|agent| agent.name == name)
        .expect("agent runs")
}

/// What the in-process daemon's `/metrics` answers now.
pub async fn metrics_of(daemon: &flotilla::daemon::Daemon) -> String {
    let address = daemon.http_address().expect("the daemon listens");
    reqwest::get(format!("http://{address}/metrics"))
        .await
        .expect("the daemon answers")
        .text()
        .await
        .expect("a text body")
}

/// Number of tasks in a terminal state.
pub async fn finished(queue: &dyn TaskQueue) -> u64 {
    queue
        .counts()
        .await
        .unwrap()
        .iter()
        .map(|(_, c)| c.completed + c.dead_lettered)
        .sum()
}

/// Every task by id, failing on a lost one.
pub async fn records(queue: &dyn TaskQueue, ids: &[String]) -> Vec<TaskRecord> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(
            queue
                .get(id)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("task {id} was lost")),
        );
    }
    out
}

/// Completions recorded in a task's history.
pub fn completions(task: &TaskRecord) -> usize {
    task.history
        .iter()
        .filter(|attempt| attempt.outcome == Some(flotilla::queue::AttemptOutcome::Completed))
        .count()
}

/// Pids of processes spawned for the store `instance` (see
/// `FLOTILLA_INSTANCE`).
pub fn processes_of(instance: &str) -> Vec<u32> {
    // The marker is the store id, '@', and the store's path.
    let marker = format!("FLOTILLA_INSTANCE={instance}@");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Zombies have an empty environ; they are not running agents.
        if let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ"))
            && environ
                .split(|b| *b == 0)
                .any(|e| e.starts_with(marker.as_bytes()))
        {
            found.push(pid);
        }
    }
    found
}

/// The store id of the store at `path`.
pub fn store_id(queue: &SqliteQueue) -> String {
    queue.store_id().to_string()
}

/// Sends `signal` to `child`.
pub fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
}

/// Waits for `child` to exit, up to `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < limit,
            "process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn exists(path: &Path) -> bool {
    path.exists()
}

/// A tiny HTTP server on loopback standing in for a model endpoint or a
/// Prometheus: each request (its request line) gets `answer`'s status and
/// JSON body. Runs until the test's runtime ends.
pub async fn http_stand_in(
    answer: impl Fn(&str) -> (u16, String) + Send + Sync + 'static,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => request.extend_from_slice(&buffer[..read]),
                    }
                }
                let text = String::from_utf8_lossy(&request);
                let line = text.lines().next().unwrap_or_default();
                let (status, body) = answer(line);
                // A redirect goes to /redirected.
                let location = if (300..400).contains(&status) {
                    "location: /redirected\r\n"
                } else {
                    ""
                };
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{location}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    address
}

/// The system's clock, whose wall reading a test can set as an operator
/// (or NTP) would: the steady reading goes on undisturbed. A test can
/// also move the steady reading on, to pass a long in-memory timer.
#[derive(Debug, Default)]
pub struct SettableClock {
    skew_ms: std::sync::atomic::AtomicI64,
    steady_ahead_ms: std::sync::atomic::AtomicU64,
}

impl SettableClock {
    /// Sets the wall clock `millis` forward (back when negative).
    pub fn set_wall(&self, millis: i64) {
        self.skew_ms
            .fetch_add(millis, std::sync::atomic::Ordering::SeqCst);
    }

    /// Moves the steady reading `millis` on (the wall clock stays).
    pub fn pass_steady(&self, millis: u64) {
        self.steady_ahead_ms
            .fetch_add(millis, std::sync::atomic::Ordering::SeqCst);
    }
}

impl clock::Clock for SettableClock {
    fn now_ms(&self) -> clock::UnixMillis {
        clock::SystemClock
            .now_ms()
            .saturating_add_signed(self.skew_ms.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn steady_ms(&self) -> clock::UnixMillis {
        clock::SystemClock.steady_ms().saturating_add(
            self.steady_ahead_ms
                .load(std::sync::atomic::Ordering::SeqCst),
        )
    }
}
