//! A oneshot replica slot: one process per task. The task JSON goes to
//! stdin, every output line counts as progress, exit 0 with stdout is the
//! result.

use serde_json::Value;
use std::collections::VecDeque;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use std::sync::Arc;

use super::persistent::describe;
use super::{AgentRuntime, Exit, Failure, Phase, SlotRequest, Tracked, over_memory};
use crate::lines::{Line, LineReader};
use crate::protocol;
use tracing::Instrument as _;

use crate::queue::{AttemptOutcome, Lease};
use crate::status::ReplicaState;
use crate::supervisor::process;
use crate::template::TaskContext;

/// Bytes of stderr kept for the failure report.
const STDERR_TAIL_BYTES: usize = 2048;

/// Runs tasks one process at a time until shutdown; returns a crash when a
/// process cannot be started (so the slot backs off like a crashed replica).
pub(super) async fn run(
    agent: &Arc<AgentRuntime>,
    index: u32,
    shutdown: &mut watch::Receiver<Phase>,
) -> Exit {
    let name = agent.replica_name(index);
    let mut gate = agent.watch_gate();
    let mut orders = agent.watch_orders();
    // A process started since the slot (re)started: a later start failure
    // is a crash, not one more failed start in a row.
    let mut started_one = false;
    loop {
        agent.update_replica(index, |replica| replica.without_process(ReplicaState::Idle));
        if orders.borrow_and_update().retire.contains(&index) {
            return Exit::Retired;
        }
        // Ask for a task only while ready; a slot held back so can still
        // be retired (a scale-down must not wait for readiness).
        while gate.borrow_and_update().blocks(index).is_some() {
            tokio::select! {
                _ = shutdown.changed() => return Exit::Shutdown,
                changed = gate.changed() => if changed.is_err() { return Exit::Shutdown },
                changed = orders.changed() => {
                    if changed.is_err() {
                        return Exit::Shutdown;
                    }
                    if orders.borrow_and_update().retire.contains(&index) {
                        return Exit::Retired;
                    }
                }
            }
        }
        let (reply, mut receiver) = oneshot::channel();
        if agent.slots.send(SlotRequest { reply }).await.is_err() {
            return Exit::Shutdown;
        }
        let lease = loop {
            tokio::select! {
                _ = shutdown.changed() => return Exit::Shutdown,
                lease = &mut receiver => match lease {
                    Ok(handed) => break Some(handed.take()),
                    Err(_) => return Exit::Shutdown,
                },
                changed = orders.changed() => {
                    if changed.is_err() {
                        return Exit::Shutdown;
                    }
                    if orders.borrow_and_update().retire.contains(&index) {
                        receiver.close();
                        if let Ok(handed) = receiver.try_recv() {
                            agent.release(handed.take(), &name, "the replica is being removed").await;
                        }
                        return Exit::Retired;
                    }
                }
                changed = gate.changed() => {
                    if changed.is_err() {
                        return Exit::Shutdown;
                    }
                    let blocked = gate.borrow_and_update().blocks(index).map(str::to_string);
                    if let Some(why) = blocked {
                        // Not ready any more: withdraw the request.
                        receiver.close();
                        if let Ok(handed) = receiver.try_recv() {
                            agent.release(handed.take(), &name, &why).await;
                        }
                        break None;
                    }
                }
            }
        };
        let Some(lease) = lease else {
            continue;
        };
        let span = agent.attempt_span(&lease.key);
        match run_task(agent, index, &name, lease, shutdown)
            .instrument(span)
            .await
        {
            Some(Exit::NotStarted(reason)) if started_one => return Exit::Crashed(reason),
            Some(exit) => return exit,
            None => started_one = true,
        }
        if shutdown.borrow().stopping() {
            return Exit::Shutdown;
        }
    }
}

/// What the process produced.
struct Output {
    stdout: Vec<u8>,
    stderr_tail: VecDeque<String>,
    stderr_bytes: usize,
}

impl Output {
    fn push_stderr(&mut self, line: String) {
        self.stderr_bytes += line.len();
        self.stderr_tail.push_back(line);
        while self.stderr_bytes > STDERR_TAIL_BYTES && self.stderr_tail.len() > 1 {
            let dropped = self.stderr_tail.pop_front().expect("len > 1");
            self.stderr_bytes -= dropped.len();
        }
    }

    fn stderr(&self) -> String {
        let text: Vec<&str> = self.stderr_tail.iter().map(String::as_str).collect();
        text.join("\n")
    }
}

/// Runs one task in its own process. Returns an exit for the slot when the
/// process could not be started, `None` otherwise.
async fn run_task(
    agent: &Arc<AgentRuntime>,
    index: u32,
    name: &str,
    lease: Lease,
    shutdown: &mut watch::Receiver<Phase>,
) -> Option<Exit> {
    let context = TaskContext {
        id: &lease.key.task_id,
        attempt: lease.key.attempt,
        agent: &agent.name,
        payload: &lease.payload,
    };
    let spec = match agent.spawn_spec(index, Some(&context)) {
        Ok(spec) => spec,
        Err(error) => {
            agent
                .fail_attempt(
                    lease,
                    Failure::rejected(format!("cannot build the command: {error}")),
                    name,
                )
                .await;
            return None;
        }
    };
    let program = spec.argv.first().cloned().unwrap_or_default();
    let mut child = match process::spawn(spec).await {
        Ok(child) => child,
        // Arguments too long, or with a NUL byte, come from this task's
        // payload: the task cannot run, the agent is fine.
        Err(error)
            if error.kind() == std::io::ErrorKind::InvalidInput
                || error.raw_os_error() == Some(nix::libc::E2BIG) =>
        {
            agent
                .fail_attempt(
                    lease,
                    Failure::rejected(format!(
                        "cannot start {program:?} with this task's arguments: {error}"
                    )),
                    name,
                )
                .await;
            return None;
        }
        // Anything else (missing program, no permission) is the agent's
        // problem: the task goes back uncharged and the slot backs off.
        Err(error) => {
            let reason = format!("cannot start {program:?}: {error}");
            agent.release(lease, name, &reason).await;
            return Some(Exit::NotStarted(reason));
        }
    };
    let pgid = child.id().unwrap_or(0);
    let now_ms = agent.clock.steady_ms();
    agent.update_replica(index, |replica| {
        replica.state = ReplicaState::Busy;
        replica.pid = Some(pgid);
        replica.started_ms = Some(now_ms);
        replica.task_progress_ms = Some(now_ms);
        replica.tasks = vec![lease.key.task_id.clone()];
    });
    let message = agent.task_message(&lease);
    // Written from its own task: a large payload must not block the loop
    // when the program never reads stdin.
    if let Some(mut stdin) = child.stdin.take() {
        let line = protocol::encode(&message);
        tokio::spawn(async move {
            let _ = stdin.write_all(line.as_bytes()).await;
        });
    }
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        process::finish(&mut child, pgid).await;
        agent
            .release(lease, name, "the process's pipes were not available")
            .await;
        return Some(Exit::Crashed(
            "the process's pipes were not available".into(),
        ));
    };
    let max_result = agent.config.max_line_bytes.as_usize().max(1);
    // Bytes read from either pipe: output without a newline (a progress
    // bar redrawn with `\r`) is progress too, looked at every
    // OUTPUT_CHECK (so that the fleet watchdog sees it) and when the
    // progress timeout comes.
    let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut out_lines = LineReader::new(BufReader::new(Counted::new(stdout, &bytes)), max_result);
    let mut err_lines = LineReader::new(
        BufReader::new(Counted::new(stderr, &bytes)),
        agent.config.max_line_bytes.as_usize(),
    );
    let mut bytes_seen = 0;
    let mut output = Output {
        stdout: Vec::new(),
        stderr_tail: VecDeque::new(),
        stderr_bytes: 0,
    };
    let mut tracked = Tracked::new(lease, agent);
    let mut memory = agent.memory.clone();
    let (mut out_open, mut err_open) = (true, true);
    let mut draining: Option<Instant> = None;
    let mut shutdown_closed = false;
    let mut memory_closed = false;
    let mut orders = agent.watch_orders();
    let mut orders_closed = false;
    // The exit, once seen, and until when the pipes are read after it: a
    // process it left behind (`helper &`) can hold them open for ever.
    let mut exited: Option<(Option<std::process::ExitStatus>, Instant)> = None;
    let mut output_check = tokio::time::interval(OUTPUT_CHECK);
    output_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let status = loop {
        if let Some((status, _)) = exited
            && !out_open
            && !err_open
        {
            break status;
        }
        // Once it exited, only the end of the drain counts (a timeout
        // already past would otherwise fire again and again until then).
        let timer = match exited {
            Some((_, drained)) => drained,
            None => {
                let timer = tracked.next_timeout(agent);
                draining.map_or(timer, |deadline| timer.min(deadline))
            }
        };
        tokio::select! {
            line = out_lines.next_line(), if out_open => match line {
                Ok(Some(Line::Text(text) | Line::NotUtf8(text))) => {
                    if output.stdout.len() + text.len() + 1 > max_result {
                        { kill_for(agent, name, &mut child, pgid, tracked, too_long(max_result)).await; return None; }
                    }
                    if !output.stdout.is_empty() {
                        output.stdout.push(b'\n');
                    }
                    output.stdout.extend_from_slice(text.as_bytes());
                    bytes_seen = bytes.load(std::sync::atomic::Ordering::Relaxed);
                    if !progressed(agent, index, &mut tracked).await {
                        abandon(agent, &mut child, pgid, tracked).await;
                        return None;
                    }
                }
                Ok(Some(Line::TooLong(_))) => { kill_for(agent, name, &mut child, pgid, tracked, too_long(max_result)).await; return None; }
                Ok(None) | Err(_) => out_open = false,
            },
            line = err_lines.next_line(), if err_open => match line {
                Ok(Some(Line::Text(text))) => {
                    tracing::info!(agent = %agent.name, replica = index, "stderr: {}", protocol::truncate(&text, protocol::STDERR_LOG_CHARS));
                    output.push_stderr(text);
                    bytes_seen = bytes.load(std::sync::atomic::Ordering::Relaxed);
                    if !progressed(agent, index, &mut tracked).await {
                        abandon(agent, &mut child, pgid, tracked).await;
                        return None;
                    }
                }
                Ok(Some(_)) => {
                    bytes_seen = bytes.load(std::sync::atomic::Ordering::Relaxed);
                    if !progressed(agent, index, &mut tracked).await {
                        abandon(agent, &mut child, pgid, tracked).await;
                        return None;
                    }
                }
                Ok(None) | Err(_) => err_open = false,
            },
            _ = output_check.tick(), if exited.is_none() => {
                let read = bytes.load(std::sync::atomic::Ordering::Relaxed);
                if read != bytes_seen {
                    // Output came that ended no line.
                    bytes_seen = read;
                    if !progressed(agent, index, &mut tracked).await {
                        abandon(agent, &mut child, pgid, tracked).await;
                        return None;
                    }
                }
            }
            status = child.wait(), if exited.is_none() => {
                exited = Some((status.ok(), Instant::now() + crate::command::DRAIN_AFTER_EXIT));
            }
            changed = orders.changed(), if !orders_closed => {
                orders_closed = changed.is_err();
                if let Some(why) = agent.take_abandon(&tracked.lease.key) {
                    tracing::warn!(agent = %agent.name, task = %tracked.lease.key, %why, "lease lost; stopping the task's process");
                    abandon(agent, &mut child, pgid, tracked).await;
                    return None;
                }
                if let Some(reason) = agent.take_restart(index, pgid)
                    && exited.is_none()
                {
                    // The slot goes on (only its task's process is ended),
                    // so no replica is lost: the task's failed attempt
                    // speaks for it.
                    let failure = Failure::new(AttemptOutcome::ProgressTimeout, reason);
                    kill_for(agent, name, &mut child, pgid, tracked, failure).await;
                    return None;
                }
            }
            changed = shutdown.changed(), if !shutdown_closed => {
                shutdown_closed = changed.is_err();
                let phase = if shutdown_closed { Phase::Hurry } else { *shutdown.borrow() };
                if phase.stopping() && draining.is_none() {
                    draining = Some(Instant::now() + agent.shutdown_grace);
                }
                if phase == Phase::Hurry {
                    draining = Some(Instant::now());
                }
            }
            () = tokio::time::sleep_until(timer) => {
                if let Some((status, drained)) = exited {
                    // Judged by its exit, not by a timeout or a shutdown
                    // that came after it; what it left behind is ended
                    // with its group below.
                    if Instant::now() >= drained {
                        break status;
                    }
                    continue;
                }
                if let Some(deadline) = draining && Instant::now() >= deadline {
                    let renewing = agent.keep_lease(&tracked.lease.key);
                    process::stop(&mut child, pgid, agent.config.timeouts.stop_grace.get()).await;
                    drop(renewing);
                    agent.release(tracked.lease, name, "the daemon shut down before the task finished").await;
                    return Some(Exit::Shutdown);
                }
                if let Some(failure) = tracked.expired(agent, Instant::now()) {
                    let read = bytes.load(std::sync::atomic::Ordering::Relaxed);
                    if failure.outcome == AttemptOutcome::ProgressTimeout && read != bytes_seen {
                        // Output came that ended no line.
                        bytes_seen = read;
                        if !progressed(agent, index, &mut tracked).await {
                            abandon(agent, &mut child, pgid, tracked).await;
                            return None;
                        }
                        continue;
                    }
                    { kill_for(agent, name, &mut child, pgid, tracked, failure).await; return None; }
                }
            }
            changed = memory.changed(), if !memory_closed => {
                memory_closed = changed.is_err();
                if let Some(failure) = over_memory(agent, &memory, pgid, index) {
                    { kill_for(agent, name, &mut child, pgid, tracked, failure).await; return None; }
                }
            }
        }
    };
    process::finish(&mut child, pgid).await;
    // Reaped: its pid may be reused by any process from now on, and
    // settling (validation gates, a rollback) can take minutes. Chaos and
    // the watchdog signal only the pids that status shows.
    agent.update_replica(index, |replica| replica.pid = None);
    settle_exit(agent, name, tracked.lease, status, &output).await;
    None
}

/// How often output that ended no line is looked for, to count it as
/// progress.
const OUTPUT_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// A pipe that counts the bytes read from it into a shared counter.
struct Counted<R> {
    inner: R,
    read: Arc<std::sync::atomic::AtomicU64>,
}

impl<R> Counted<R> {
    fn new(inner: R, read: &Arc<std::sync::atomic::AtomicU64>) -> Self {
        Self {
            inner,
            read: read.clone(),
        }
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            self.read
                .fetch_add(read, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }
}

fn too_long(max: usize) -> Failure {
    Failure::rejected(format!(
        "stdout exceeded {max} bytes (max_line_bytes); a oneshot result must fit in it"
    ))
}

/// Counts progress; false when the task is no longer this slot's (its
/// lease was lost, or it was cancelled).
async fn progressed(agent: &AgentRuntime, index: u32, tracked: &mut Tracked) -> bool {
    let now = agent.clock.steady_ms();
    agent.update_replica(index, |replica| {
        replica.last_progress_ms = Some(now);
        replica.task_progress_ms = Some(now);
    });
    match agent.progress(tracked, None).await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(agent = %agent.name, task = %tracked.lease.key, %error, "lease lost; stopping the task's process");
            false
        }
    }
}

/// Stops the process of a task that is no longer this slot's.
async fn abandon(
    agent: &AgentRuntime,
    child: &mut tokio::process::Child,
    pgid: u32,
    mut tracked: Tracked,
) {
    process::stop(child, pgid, agent.config.timeouts.stop_grace.get()).await;
    agent.finish_call(&tracked.lease.key, AttemptOutcome::Released);
    tracked.lease.settle();
}

async fn kill_for(
    agent: &Arc<AgentRuntime>,
    name: &str,
    child: &mut tokio::process::Child,
    pgid: u32,
    tracked: Tracked,
    failure: Failure,
) {
    tracing::warn!(agent = %agent.name, replica = %name, outcome = failure.outcome.as_str(), detail = %failure.detail, "killing oneshot process");
    // The lease must outlast stopping the process (up to stop_grace and
    // more), or the task comes back as lease_expired while it still runs.
    let renewing = agent.keep_lease(&tracked.lease.key);
    process::stop(child, pgid, agent.config.timeouts.stop_grace.get()).await;
    drop(renewing);
    // A killed process is not a broken slot: the next task starts at once.
    agent.fail_attempt(tracked.lease, failure, name).await;
}

/// Turns the exit status into an outcome.
async fn settle_exit(
    agent: &Arc<AgentRuntime>,
    name: &str,
    lease: Lease,
    status: Option<std::process::ExitStatus>,
    output: &Output,
) {
    let code = status.and_then(|status| status.code());
    if code == Some(0) {
        let text = String::from_utf8_lossy(&output.stdout);
        let result = serde_json::from_str::<Value>(text.trim())
            .unwrap_or_else(|_| Value::String(text.into_owned()));
        agent.store_result(lease, result, None, name).await;
        return;
    }
    let stderr = output.stderr();
    let mut detail = describe(status);
    if !stderr.is_empty() {
        detail = format!("{detail}; stderr: {stderr}");
    }
    let fatal = code.is_some_and(|code| agent.config.fatal_exit_codes.contains(&code));
    // Killed by a signal not sent by flotilla (say the OOM killer) is a
    // crash: retried at once, like a persistent replica's task.
    let failure = Failure {
        retryable: !fatal,
        immediate: code.is_none(),
        ..Failure::new(
            if code.is_some() {
                AttemptOutcome::Error
            } else {
                AttemptOutcome::Crashed
            },
            detail,
        )
    };
    agent.fail_attempt(lease, failure, name).await;
}
