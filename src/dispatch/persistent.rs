//! One process of a persistent replica: spawn, wait for `ready`, exchange
//! JSON Lines, enforce timeouts and the memory limit, and settle every task
//! in flight when the process ends.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::Instrument as _;

use super::{
    AgentRuntime, Exit, Failure, Phase, STDIN_TIMEOUT, SlotRequest, Tracked, log_stderr,
    over_memory,
};
use crate::lines::{Line, LineReader};
use crate::protocol::{self, FromAgent, LineError, PROTOCOL_VERSION, ToAgent};
use crate::queue::{AttemptOutcome, Lease};
use crate::status::ReplicaState;
use crate::supervisor::process;

/// Far enough to mean "no timer".
const IDLE_TICK: Duration = Duration::from_secs(3600);
/// How soon a replica that took no task because completions were pending
/// looks again.
const OUTCOMES_RECHECK: Duration = Duration::from_millis(100);

struct Replica<'a> {
    agent: &'a Arc<AgentRuntime>,
    index: u32,
    name: String,
    child: Child,
    pgid: u32,
    stdin: Option<ChildStdin>,
    lines: Stdout,
    in_flight: HashMap<String, Tracked>,
    /// Replies to waiting sends, from their waiters.
    news: mpsc::Receiver<crate::delegate::News>,
    news_to: mpsc::Sender<crate::delegate::News>,
    /// Why the agent's stdin can take no more lines (a write failed or
    /// timed out, perhaps halfway through a line): the replica is then
    /// stopped and its tasks go back uncharged.
    broken: Option<String>,
}

/// Which of a killed replica's tasks failed.
enum Blame {
    /// This one; the others go back uncharged.
    Task(String),
    /// Every one, as when the replica crashes.
    All,
    /// None: they all go back uncharged.
    Nobody,
}

impl Blame {
    fn of(culprit: Option<String>) -> Self {
        culprit.map_or(Self::Nobody, Self::Task)
    }
}

/// Why a task could not be handed to the agent.
enum StartFailure {
    /// The replica is broken: stop it, failing the culprit task if any.
    Broken(Option<String>, Failure),
    /// The agent had exited already: handle it as a crash.
    Exited,
}

/// Bytes a pipe to the agent holds before a writer waits (Linux's default
/// pipe buffer).
const PIPE_CAPACITY: usize = 64 * 1024;

/// Replies waiting to be written to one replica.
const NEWS: usize = 256;

/// Lines, and bytes, read ahead from the agent's stdout while a write to
/// its stdin waits (see [`Replica::send`]); a line longer than the bytes
/// left is still read whole (up to `max_line_bytes`).
const READ_AHEAD_LINES: usize = 256;
const READ_AHEAD_BYTES: usize = 8 << 20;

/// The agent's stdout: the lines read ahead while a write to its stdin
/// waited come first.
struct Stdout {
    reader: LineReader<BufReader<tokio::process::ChildStdout>>,
    ahead: VecDeque<std::io::Result<Option<Line>>>,
    ahead_bytes: usize,
}

impl Stdout {
    fn new(reader: LineReader<BufReader<tokio::process::ChildStdout>>) -> Self {
        Self {
            reader,
            ahead: VecDeque::new(),
            ahead_bytes: 0,
        }
    }

    /// The next line, as [`LineReader::next_line`]. Cancel safe.
    async fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        match self.ahead.pop_front() {
            Some(line) => {
                self.ahead_bytes = self.ahead_bytes.saturating_sub(line_bytes(&line));
                line
            }
            None => self.reader.next_line().await,
        }
    }

    /// Whether another line may be read ahead: room is left, and the pipe
    /// has not ended (its end, read ahead, is the last thing to read).
    fn may_read_ahead(&self) -> bool {
        self.ahead.len() < READ_AHEAD_LINES
            && self.ahead_bytes < READ_AHEAD_BYTES
            && !matches!(self.ahead.back(), Some(Ok(None) | Err(_)))
    }

    fn push_ahead(&mut self, line: std::io::Result<Option<Line>>) {
        self.ahead_bytes = self.ahead_bytes.saturating_add(line_bytes(&line));
        self.ahead.push_back(line);
    }
}

fn line_bytes(line: &std::io::Result<Option<Line>>) -> usize {
    match line {
        Ok(Some(Line::Text(text) | Line::NotUtf8(text))) => text.len(),
        _ => 0,
    }
}

/// Runs one process of replica `index` until it exits or the daemon shuts
/// down; `ready_at` is set when it said `ready`.
pub(super) async fn run(
    agent: &Arc<AgentRuntime>,
    index: u32,
    shutdown: &mut watch::Receiver<Phase>,
    ready_at: &mut Option<Instant>,
) -> Exit {
    let spec = match agent.spawn_spec(index, None) {
        Ok(spec) => spec,
        Err(error) => return Exit::NotStarted(format!("cannot build the command: {error}")),
    };
    let program = spec.argv.first().cloned().unwrap_or_default();
    agent.update_replica(index, |replica| {
        replica.state = ReplicaState::Starting;
        replica.started_ms = Some(agent.clock.steady_ms());
        replica.last_progress_ms = None;
        replica.last_seen_ms = None;
        replica.context_window_usage_pct = None;
    });
    let mut child = match process::spawn(spec).await {
        Ok(child) => child,
        Err(error) => return Exit::NotStarted(format!("cannot start {program:?}: {error}")),
    };
    let pgid = child.id().unwrap_or(0);
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        process::finish(&mut child, pgid).await;
        return Exit::NotStarted("the agent's stdio pipes were not available".into());
    };
    log_stderr(agent, index, stderr);
    agent.update_replica(index, |replica| replica.pid = Some(pgid));
    let (news_to, news) = mpsc::channel(NEWS);
    let mut replica = Replica {
        agent,
        index,
        name: agent.replica_name(index),
        child,
        pgid,
        stdin: Some(stdin),
        lines: Stdout::new(LineReader::new(
            BufReader::new(stdout),
            agent.config.max_line_bytes.as_usize(),
        )),
        in_flight: HashMap::new(),
        news,
        news_to,
        broken: None,
    };
    if let Err(reason) = replica.wait_ready(shutdown).await {
        replica.stop().await;
        return reason;
    }
    *ready_at = Some(Instant::now());
    agent.update_replica(index, |replica| replica.state = ReplicaState::Idle);
    replica.serve(shutdown).await
}

impl Replica<'_> {
    /// Waits for the `ready` message within `timeouts.startup`.
    async fn wait_ready(&mut self, shutdown: &mut watch::Receiver<Phase>) -> Result<(), Exit> {
        let startup = self.agent.config.timeouts.startup;
        let deadline = Instant::now() + startup.get();
        // What came instead of a ready message, to say why none did.
        let mut instead: Option<String> = None;
        loop {
            let line = tokio::select! {
                _ = shutdown.changed() => return Err(Exit::Shutdown),
                () = tokio::time::sleep_until(deadline) => {
                    let instead = instead.map_or_else(String::new, |instead| format!("; the last line it wrote instead: {instead}"));
                    return Err(Exit::NotStarted(format!("no ready message within timeouts.startup = {startup}{instead}")));
                }
                line = self.lines.next_line() => line,
            };
            match line {
                Ok(Some(Line::Text(text))) => match protocol::parse_line(&text) {
                    Ok(FromAgent::Ready { protocol }) => {
                        let version = protocol.unwrap_or(PROTOCOL_VERSION);
                        if version != PROTOCOL_VERSION {
                            return Err(Exit::NotStarted(format!(
                                "the agent speaks protocol {version}; this flotilla speaks {PROTOCOL_VERSION}"
                            )));
                        }
                        self.seen();
                        return Ok(());
                    }
                    Ok(FromAgent::Heartbeat {}) => self.seen(),
                    Ok(_) => {
                        self.agent.record_stale(self.index, "message before ready");
                        instead = Some(format!(
                            "{:?}, a message before ready",
                            protocol::excerpt(&text)
                        ));
                    }
                    Err(error) => {
                        instead = Some(error.to_string());
                        self.agent.record_malformed(self.index, &error);
                    }
                },
                Ok(Some(other)) => {
                    instead = Some(self.malformed_line(&other).0.to_string());
                }
                Ok(None) | Err(_) => {
                    let status = process::finish(&mut self.child, self.pgid).await;
                    return Err(Exit::NotStarted(format!(
                        "exited before ready ({})",
                        describe(status)
                    )));
                }
            }
        }
    }

    fn seen(&self) {
        let now = self.agent.clock.steady_ms();
        self.agent
            .update_replica(self.index, |replica| replica.last_seen_ms = Some(now));
    }

    /// Counts a line that is not UTF-8, or too long to read; returns why,
    /// and what it was if it looks like a task's result or error.
    fn malformed_line(&self, line: &Line) -> (LineError, Option<protocol::MalformedOutcome>) {
        let max_line_bytes = self.agent.config.max_line_bytes.as_usize();
        let (error, outcome) = match line {
            Line::TooLong(head) => (
                LineError::TooLong { max_line_bytes },
                protocol::outcome_of_too_long(head),
            ),
            Line::NotUtf8(text) | Line::Text(text) => (
                LineError::Malformed {
                    reason: "not UTF-8".into(),
                    excerpt: protocol::excerpt(text),
                },
                protocol::outcome_of_malformed(text),
            ),
        };
        self.agent.record_malformed(self.index, &error);
        (error, outcome)
    }

    /// Fails the attempt whose result or error message (`outcome`) could
    /// not be read, because of `error`; a message about no task held here
    /// is left alone.
    async fn fail_malformed(&mut self, outcome: protocol::MalformedOutcome, error: &LineError) {
        if self.task_for(outcome.id.as_deref()).is_none() {
            return;
        }
        let (message, retryable) = match error {
            // A result that does not fit will not fit next time either;
            // one that named no task may not be this one's (a stale
            // answer), so it is retried.
            LineError::TooLong { max_line_bytes } => (
                format!(
                    "the agent's {} message was longer than max_line_bytes = {max_line_bytes} bytes, so it was not read; raise the agent's max_line_bytes (above store.max_result_bytes, with room for the message around the result), or write large outputs to files",
                    outcome.kind
                ),
                outcome.kind != "result" || outcome.id.is_none(),
            ),
            LineError::Malformed { reason, .. } => {
                let said = outcome
                    .message
                    .map_or_else(String::new, |message| format!(" (it said: {message})"));
                (
                    format!(
                        "the agent's {} message was malformed: {reason}{said}",
                        outcome.kind
                    ),
                    // An error that said it cannot succeed is taken at
                    // its word.
                    outcome.retryable.unwrap_or(true),
                )
            }
        };
        self.handle_message(FromAgent::Error {
            id: outcome.id,
            message,
            retryable,
            retry_after_ms: None,
        })
        .await;
    }

    /// The process is gone: status must not show its pid or tasks while
    /// they are settled (they may already run elsewhere).
    fn gone(&self) {
        self.agent.update_replica(self.index, |replica| {
            replica.without_process(ReplicaState::Backoff)
        });
    }

    fn publish_tasks(&self) {
        let tasks: Vec<String> = self.in_flight.keys().cloned().collect();
        let state = if tasks.is_empty() {
            ReplicaState::Idle
        } else {
            ReplicaState::Busy
        };
        let silent_since = self.silent_since();
        self.agent.update_replica(self.index, |replica| {
            replica.tasks = tasks;
            replica.state = state;
            replica.task_progress_ms = silent_since;
        });
    }

    /// A waiter's news: a reply to write, or a child still on its way
    /// (which keeps its parent alive).
    async fn handle_news(&mut self, news: crate::delegate::News) {
        match news {
            crate::delegate::News::Reply {
                reply,
                after: latency,
                attempt,
            } => {
                let crate::protocol::ToAgent::Reply { id, key, .. } = &reply else {
                    return;
                };
                let Some(tracked) = self.in_flight.get_mut(id) else {
                    // The parent ended meanwhile: nobody to tell.
                    return;
                };
                if tracked.lease.key.attempt != attempt || tracked.waited.remove(key).is_none() {
                    // A wait of an earlier attempt of the same task: this
                    // attempt did not ask.
                    return;
                }
                tracked.last_progress = Instant::now();
                self.publish_tasks();
                self.agent
                    .metrics()
                    .message_answered(&self.agent.name, latency.as_secs_f64());
                self.tell(&reply, "a reply").await;
            }
            crate::delegate::News::Alive { parent, attempt } => {
                let Some(tracked) = self
                    .in_flight
                    .get_mut(&parent)
                    .filter(|tracked| tracked.lease.key.attempt == attempt)
                else {
                    return;
                };
                // Renewed when due: one waiter's news or many, one write.
                let result = self.agent.progress(tracked, None).await;
                self.publish_tasks();
                if let Err(error) = result {
                    self.lost_lease(&parent, &error).await;
                }
            }
        }
    }

    /// The task in flight that progressed least recently.
    fn most_silent(&self) -> Option<String> {
        self.in_flight
            .iter()
            .min_by_key(|(_, tracked)| tracked.last_progress)
            .map(|(id, _)| id.clone())
    }

    /// The last progress (or start) of the most silent task in flight.
    fn silent_since(&self) -> Option<crate::clock::UnixMillis> {
        let now = Instant::now();
        let now_ms = self.agent.clock.steady_ms();
        self.in_flight
            .values()
            .map(|tracked| {
                // A task waiting for its children is not silent: its wait
                // is bounded by its own timeout.
                let silent = if !tracked.waited.is_empty() {
                    Duration::ZERO
                } else {
                    now.saturating_duration_since(tracked.last_progress)
                };
                now_ms.saturating_sub(u64::try_from(silent.as_millis()).unwrap_or(u64::MAX))
            })
            .min()
    }

    /// The main loop: ask for tasks while there is room, hand them over,
    /// read messages, enforce timeouts.
    async fn serve(mut self, shutdown: &mut watch::Receiver<Phase>) -> Exit {
        let concurrency = self.agent.config.concurrency.get() as usize;
        let mut memory = self.agent.memory.clone();
        let mut slot: Option<oneshot::Receiver<super::Handed>> = None;
        let mut draining: Option<Instant> = None;
        let mut shutdown_closed = false;
        let mut memory_closed = false;
        let mut gate = self.agent.watch_gate();
        let mut gate_closed = false;
        let mut orders = self.agent.watch_orders();
        let mut orders_closed = false;
        // An order given while this process was starting counts too.
        let mut retiring = orders.borrow_and_update().retire.contains(&self.index);
        // When the process exited, plus the time its last lines get to be
        // read: a process it left behind may hold stdout open for ever, so
        // the exit, not the end of stdout, is the crash.
        let mut exited: Option<Instant> = None;
        loop {
            if let Some(reason) = self.broken.take() {
                let failure = Failure {
                    immediate: true,
                    ..Failure::new(AttemptOutcome::Crashed, reason)
                };
                return self.kill_for(Blame::Nobody, failure, true).await;
            }
            if retiring && draining.is_none() && self.in_flight.is_empty() {
                self.shut_down().await;
                return Exit::Retired;
            }
            if draining.is_none()
                && !retiring
                && exited.is_none()
                && slot.is_none()
                && self.in_flight.len() < concurrency
                && !self.agent.outcomes_pending()
                && gate.borrow_and_update().blocks(self.index).is_none()
            {
                let (reply, receiver) = oneshot::channel();
                if self.agent.slots.try_send(SlotRequest { reply }).is_ok() {
                    slot = Some(receiver);
                }
            }
            if let Some(deadline) = draining
                && (self.in_flight.is_empty() || Instant::now() >= deadline)
            {
                return self.shut_down().await;
            }
            // Checked here too: output that never stops would keep the
            // timer below from firing.
            if exited.is_some_and(|deadline| Instant::now() >= deadline) {
                return self.crashed().await;
            }
            let timer = self
                .in_flight
                .values()
                .map(|tracked| tracked.next_timeout(self.agent))
                .min()
                .unwrap_or_else(|| Instant::now() + IDLE_TICK);
            let timer = draining.map_or(timer, |deadline| timer.min(deadline));
            let timer = exited.map_or(timer, |deadline| timer.min(deadline));
            // Waiting for pending completions to be stored: look again soon.
            let timer = if self.agent.outcomes_pending() {
                timer.min(Instant::now() + OUTCOMES_RECHECK)
            } else {
                timer
            };
            tokio::select! {
                biased;
                changed = shutdown.changed(), if !shutdown_closed => {
                    shutdown_closed = changed.is_err();
                    let phase = if shutdown_closed { Phase::Hurry } else { *shutdown.borrow() };
                    if phase.stopping() && draining.is_none() {
                        // Stop taking tasks, and hand back a lease that
                        // reached the slot meanwhile.
                        if let Some(mut receiver) = slot.take() {
                            receiver.close();
                            if let Ok(handed) = receiver.try_recv() {
                                self.agent.release(handed.take(), &self.name, "the daemon shut down").await;
                            }
                        }
                        draining = Some(Instant::now() + self.agent.shutdown_grace);
                        self.agent.update_replica(self.index, |replica| replica.state = ReplicaState::Stopping);
                    }
                    if phase == Phase::Hurry {
                        draining = Some(Instant::now());
                    }
                }
                line = self.lines.next_line() => match line {
                    Ok(Some(Line::Text(text))) => self.handle_line(&text).await,
                    Ok(Some(other)) => {
                        // The result or error of a task held here fails
                        // that attempt now, saying why, instead of at its
                        // progress timeout.
                        if let (error, Some(outcome)) = self.malformed_line(&other) {
                            self.fail_malformed(outcome, &error).await;
                        }
                    }
                    Ok(None) | Err(_) => return self.crashed().await,
                },
                _ = self.child.wait(), if exited.is_none() => {
                    exited = Some(Instant::now() + crate::command::DRAIN_AFTER_EXIT);
                    // Take no task after the exit; hand back one that
                    // reached the slot meanwhile (it never reached the
                    // agent).
                    if let Some(mut receiver) = slot.take() {
                        receiver.close();
                        if let Ok(handed) = receiver.try_recv() {
                            self.agent.release(handed.take(), &self.name, "the replica exited").await;
                        }
                    }
                }
                lease = async { slot.as_mut().expect("guarded by is_some").await }, if slot.is_some() => {
                    slot = None;
                    if let Ok(handed) = lease {
                        match self.start_task(handed.take()).await {
                            Ok(()) => {}
                            Err(StartFailure::Broken(culprit, failure)) => {
                                return self.kill_for(Blame::of(culprit), failure, true).await;
                            }
                            Err(StartFailure::Exited) => return self.crashed().await,
                        }
                    }
                }
                () = tokio::time::sleep_until(timer) => {
                    let now = Instant::now();
                    if exited.is_some_and(|deadline| now >= deadline) {
                        return self.crashed().await;
                    }
                    let expired = self
                        .in_flight
                        .iter()
                        .find_map(|(id, tracked)| tracked.expired(self.agent, now).map(|failure| (id.clone(), failure)));
                    if let Some((id, failure)) = expired {
                        return self.kill_for(Blame::Task(id), failure, false).await;
                    }
                }
                changed = gate.changed(), if !gate_closed => {
                    gate_closed = changed.is_err();
                    let blocked = gate.borrow_and_update().blocks(self.index).map(str::to_string);
                    if let Some(why) = blocked
                        && let Some(mut receiver) = slot.take()
                    {
                        // Not ready any more: withdraw the request, and
                        // hand back a lease that reached the slot meanwhile.
                        receiver.close();
                        if let Ok(handed) = receiver.try_recv() {
                            self.agent.release(handed.take(), &self.name, &why).await;
                        }
                    }
                }
                Some(news) = self.news.recv() => self.handle_news(news).await,
                changed = orders.changed(), if !orders_closed => {
                    orders_closed = changed.is_err();
                    let retire = orders.borrow_and_update().retire.contains(&self.index);
                    let abandoned: Vec<(String, String)> = self
                        .in_flight
                        .iter()
                        .filter_map(|(id, tracked)| {
                            self.agent
                                .take_abandon(&tracked.lease.key)
                                .map(|why| (id.clone(), why))
                        })
                        .collect();
                    for (id, why) in abandoned {
                        self.lost_lease(&id, &why).await;
                    }
                    if let Some(reason) = self.agent.take_restart(self.index, self.pgid) {
                        // The fleet watchdog: no progress for too long.
                        let culprit = self.most_silent();
                        let failure = Failure::new(AttemptOutcome::ProgressTimeout, reason);
                        return self.kill_for(Blame::of(culprit), failure, false).await;
                    }
                    if retire && !retiring {
                        retiring = true;
                        if let Some(mut receiver) = slot.take() {
                            receiver.close();
                            if let Ok(handed) = receiver.try_recv() {
                                self.agent.release(handed.take(), &self.name, "the replica is being removed").await;
                            }
                        }
                    }
                }
                changed = memory.changed(), if !memory_closed => {
                    memory_closed = changed.is_err();
                    if let Some(failure) = over_memory(self.agent, &memory, self.pgid, self.index) {
                        // With one task, that task. Idle, the agent itself
                        // leaks: a crash. With several, no one task can be
                        // blamed: a crash that charges every task it held,
                        // as an exit does (uncharged, a task that needs
                        // too much memory would come back for ever).
                        let blame = match self.in_flight.len() {
                            0 => Blame::Nobody,
                            1 => Blame::of(self.in_flight.keys().next().cloned()),
                            _ => Blame::All,
                        };
                        let crash = !matches!(blame, Blame::Task(_));
                        return self.kill_for(blame, failure, crash).await;
                    }
                }
            }
        }
    }

    /// Sends `lease` to the agent; a replica that cannot take it is broken.
    async fn start_task(&mut self, lease: Lease) -> Result<(), StartFailure> {
        let message = self.agent.task_message(&lease);
        let id = lease.key.task_id.clone();
        let id_for_error = id.clone();
        self.in_flight.insert(id, Tracked::new(lease, self.agent));
        self.publish_tasks();
        if let (Err(error), taken) = self.send_counted(&message).await {
            let reason = format!("could not write to the agent's stdin: {error}");
            let broken_pipe = error.kind() == std::io::ErrorKind::BrokenPipe;
            if broken_pipe && taken <= PIPE_CAPACITY {
                // The pipe took no more than it holds: the agent may have
                // read none of the line (and a line the pipe holds whole
                // is refused only when the agent was gone before it was
                // written). This task did not kill it; the tasks it held
                // may have. It goes back uncharged, and the exit is
                // handled as a crash (which charges the tasks held).
                if let Some(tracked) = self.in_flight.remove(&id_for_error) {
                    self.agent
                        .release(
                            tracked.lease,
                            &self.name,
                            "the agent exited before it read the task",
                        )
                        .await;
                }
                return Err(StartFailure::Exited);
            }
            // The agent closed its stdin partway through reading the line:
            // charge the task, so that a payload that kills the agent as
            // it is read ends in the dead-letter queue instead of looping
            // forever. An agent that merely stopped reading (timeout) is
            // broken on its own: the task goes back uncharged.
            let culprit = broken_pipe.then_some(id_for_error);
            let failure = Failure {
                immediate: true,
                ..Failure::new(AttemptOutcome::Crashed, reason)
            };
            return Err(StartFailure::Broken(culprit, failure));
        }
        Ok(())
    }

    /// Writes `message` (`what`, for the log); a failed write breaks the
    /// replica (see [`Self::broken`]): the message is lost, and a line cut
    /// off by a timeout would garble the next one.
    async fn tell(&mut self, message: &ToAgent, what: &str) {
        if self.broken.is_some() || self.stdin.is_none() {
            // Stopping already: nothing more reaches the agent.
            return;
        }
        if let Err(error) = self.send(message).await {
            tracing::warn!(agent = %self.agent.name, replica = self.index, %error, "could not write {what} to the agent; stopping the replica");
            self.stdin = None;
            self.broken = Some(format!(
                "could not write {what} to the agent's stdin: {error}"
            ));
        }
    }

    /// Writes `message` to the agent's stdin, within [`STDIN_TIMEOUT`].
    /// Its stdout is read meanwhile (the lines are kept for the replica's
    /// loop): an agent that writes a long line while the daemon writes one
    /// to it would otherwise wait for the daemon as the daemon waits for
    /// it, until the timeout broke the replica.
    async fn send(&mut self, message: &ToAgent) -> std::io::Result<()> {
        self.send_counted(message).await.0
    }

    /// [`Self::send`], also saying how many bytes of the line the pipe
    /// took: past what the pipe holds, the agent was reading it.
    async fn send_counted(&mut self, message: &ToAgent) -> (std::io::Result<()>, usize) {
        let Some(stdin) = self.stdin.as_mut() else {
            return (Err(std::io::Error::other("stdin is closed")), 0);
        };
        let stdout = &mut self.lines;
        let line = protocol::encode(message);
        let mut taken = 0;
        let result = Self::write_reading(stdin, stdout, line.as_bytes(), &mut taken).await;
        (result, taken)
    }

    async fn write_reading(
        stdin: &mut ChildStdin,
        stdout: &mut Stdout,
        line: &[u8],
        taken: &mut usize,
    ) -> std::io::Result<()> {
        let write = async {
            while *taken < line.len() {
                match stdin.write(&line[*taken..]).await? {
                    0 => return Err(std::io::ErrorKind::WriteZero.into()),
                    written => *taken += written,
                }
            }
            stdin.flush().await
        };
        tokio::pin!(write);
        let deadline = tokio::time::sleep(STDIN_TIMEOUT);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                written = &mut write => return written,
                () = &mut deadline => {
                    return Err(std::io::Error::other(format!(
                        "the agent read nothing for {}s",
                        STDIN_TIMEOUT.as_secs()
                    )));
                }
                read = stdout.reader.next_line(), if stdout.may_read_ahead() => stdout.push_ahead(read),
            }
        }
    }

    /// The task a message is about: its id, or the only task in flight.
    fn task_for(&self, id: Option<&str>) -> Option<String> {
        match id {
            Some(id) => self.in_flight.contains_key(id).then(|| id.to_string()),
            None if self.in_flight.len() == 1 => self.in_flight.keys().next().cloned(),
            None => None,
        }
    }

    /// Removes the task an answer is about from the tasks in flight; an
    /// answer about a task this replica does not hold is counted as stale.
    fn take_task(&mut self, id: Option<&str>, what: &str) -> Option<Tracked> {
        let Some(id) = self.task_for(id) else {
            self.agent.record_stale(self.index, what);
            return None;
        };
        let tracked = self.in_flight.remove(&id);
        self.publish_tasks();
        tracked
    }

    async fn handle_line(&mut self, text: &str) {
        match protocol::parse_line(text) {
            Ok(message) => self.handle_message(message).await,
            Err(error) => {
                self.agent.record_malformed(self.index, &error);
                // A malformed result or error of a task this replica
                // holds fails the attempt now, saying why, instead of
                // leaving it to its progress timeout.
                if let Some(outcome) = protocol::outcome_of_malformed(text) {
                    self.fail_malformed(outcome, &error).await;
                }
            }
        }
    }

    async fn handle_message(&mut self, message: FromAgent) {
        self.seen();
        match message {
            FromAgent::Ready { .. } | FromAgent::Heartbeat {} => {}
            FromAgent::Progress {
                id,
                checkpoint,
                context_window_usage_pct,
                ..
            } => {
                let Some(id) = self.task_for(id.as_deref()) else {
                    self.agent.record_stale(self.index, "progress");
                    return;
                };
                let now = self.agent.clock.steady_ms();
                self.agent.update_replica(self.index, |replica| {
                    replica.last_progress_ms = Some(now);
                    if context_window_usage_pct.is_some() {
                        replica.context_window_usage_pct = context_window_usage_pct;
                    }
                });
                let tracked = self.in_flight.get_mut(&id).expect("task_for found it");
                let span = self.agent.attempt_span(&tracked.lease.key);
                let progressed = self
                    .agent
                    .progress(tracked, checkpoint.as_ref())
                    .instrument(span)
                    .await;
                let silent_since = self.silent_since();
                self.agent.update_replica(self.index, |replica| {
                    replica.task_progress_ms = silent_since;
                });
                if let Err(error) = progressed {
                    self.lost_lease(&id, &error).await;
                }
            }
            FromAgent::Result {
                id,
                output,
                changes,
            } => {
                let Some(tracked) = self.take_task(id.as_deref(), "result") else {
                    return;
                };
                self.agent
                    .complete(tracked.lease, output, changes, self.name.clone())
                    .await;
            }
            FromAgent::Send {
                id,
                to,
                key,
                payload,
                priority,
                wait,
                timeout_ms,
            } => {
                let Some(parent) = self.task_for(id.as_deref()) else {
                    self.agent.record_stale(self.index, "send");
                    return;
                };
                let tracked = self.in_flight.get(&parent).expect("task_for found it");
                let send = crate::delegate::Send {
                    parent: parent.clone(),
                    parent_priority: tracked.lease.priority,
                    from: self.agent.name.clone(),
                    to,
                    key: key.clone(),
                    payload,
                    priority,
                    wait,
                    timeout: timeout_ms.map(Duration::from_millis),
                };
                let span = self.agent.attempt_span(&tracked.lease.key);
                let sent = self.agent.delegate(&send).instrument(span).await;
                match sent {
                    Err(why) => {
                        tracing::warn!(agent = %self.agent.name, task = %parent, %key, %why, "send refused");
                        self.tell(&crate::delegate::refused(&parent, &key, why), "a refusal")
                            .await;
                    }
                    Ok(sent) => {
                        tracing::info!(agent = %self.agent.name, task = %parent, child = %sent.child, to = %send.to, existed = sent.existed, wait, "child task sent");
                        if let (true, Some(timeout)) = (wait, send.timeout) {
                            let tracked = self.in_flight.get_mut(&parent).expect("held");
                            if tracked.waited.contains_key(&key) {
                                // Sent again while its wait runs: that
                                // wait's one reply answers both.
                                return;
                            }
                            // Aborted with the attempt (its entry dropped
                            // with it): a wait never outlives what asked.
                            let waiter = tokio::spawn(crate::delegate::wait(
                                self.agent.store().clone(),
                                parent,
                                tracked.lease.key.attempt,
                                key.clone(),
                                sent.child,
                                timeout,
                                super::renew_after(
                                    self.agent.config.timeouts.progress_timeout.get(),
                                ) / 2,
                                self.news_to.clone(),
                            ));
                            tracked.waited.insert(key, super::AbortOnDrop(waiter));
                            tracked.last_progress = Instant::now();
                            self.publish_tasks();
                        }
                    }
                }
            }
            FromAgent::Error {
                id,
                message,
                retryable,
                retry_after_ms,
            } => {
                let Some(tracked) = self.take_task(id.as_deref(), "error") else {
                    return;
                };
                let failure = Failure {
                    retryable,
                    retry_after: retry_after_ms.map(Duration::from_millis),
                    ..Failure::new(AttemptOutcome::Error, message)
                };
                self.agent
                    .fail_attempt(tracked.lease, failure, &self.name)
                    .await;
            }
        }
    }

    /// The queue says this replica no longer holds task `id`.
    async fn lost_lease(&mut self, id: &str, error: &(dyn std::fmt::Display + Sync)) {
        if let Some(mut tracked) = self.in_flight.remove(id) {
            tracing::warn!(agent = %self.agent.name, task = %tracked.lease.key, %error, "lease lost; abandoning the task");
            self.agent
                .finish_call(&tracked.lease.key, AttemptOutcome::Released);
            tracked.lease.settle();
            self.publish_tasks();
            // The task is no longer this replica's (cancelled, or taken
            // over): the agent may stop working on it.
            self.tell(&ToAgent::Cancel { id: id.to_string() }, "a cancel")
                .await;
        }
    }

    /// The process exited (or closed stdout): settle its tasks at once so
    /// other replicas take them, and report the exit.
    async fn crashed(mut self) -> Exit {
        self.drain_results().await;
        self.agent
            .note_lost(self.index, self.in_flight.keys().cloned().collect());
        let status = process::finish(&mut self.child, self.pgid).await;
        self.gone();
        let reason = format!("replica exited ({})", describe(status));
        for (n, (_, tracked)) in self.in_flight.drain().enumerate() {
            // One exit is one failure for the breaker, however many tasks
            // the replica held.
            if n > 0 {
                self.agent
                    .finish_call_uncounted(&tracked.lease.key, AttemptOutcome::Crashed);
            }
            let failure = Failure {
                immediate: true,
                ..Failure::new(AttemptOutcome::Crashed, reason.clone())
            };
            self.agent
                .fail_attempt(tracked.lease, failure, &self.name)
                .await;
        }
        Exit::Crashed(reason)
    }

    /// Stops the process because of `failure`, failing the tasks `blame`
    /// names (retried per policy) and releasing the others. `crash` says
    /// whether the replica itself is broken (counted towards the restart
    /// intensity) rather than killed for a task's behaviour.
    async fn kill_for(mut self, blame: Blame, failure: Failure, crash: bool) -> Exit {
        let reason = format!("killed: {}: {}", failure.outcome.as_str(), failure.detail);
        tracing::warn!(agent = %self.agent.name, replica = self.index, %reason, "stopping replica");
        self.agent
            .note_lost(self.index, self.in_flight.keys().cloned().collect());
        self.agent
            .update_replica(self.index, |replica| replica.state = ReplicaState::Stopping);
        let renewing = self.keep_leases();
        self.stop().await;
        self.drain_results().await;
        drop(renewing);
        self.gone();
        let mut charged = 0;
        for (id, tracked) in self.in_flight.drain() {
            let failed = match &blame {
                Blame::Task(culprit) => *culprit == id,
                Blame::All => true,
                Blame::Nobody => false,
            };
            if failed {
                // One kill is one failure for the breaker, however many
                // tasks it charges.
                if charged > 0 {
                    self.agent
                        .finish_call_uncounted(&tracked.lease.key, failure.outcome);
                }
                charged += 1;
                self.agent
                    .fail_attempt(tracked.lease, failure.clone(), &self.name)
                    .await;
            } else {
                self.agent
                    .release(
                        tracked.lease,
                        &self.name,
                        "the replica was killed because of another task",
                    )
                    .await;
            }
        }
        if crash {
            Exit::Crashed(reason)
        } else {
            Exit::Killed(reason)
        }
    }

    /// Graceful end: ask the agent to exit, store the results it sends
    /// until it does (within `stop_grace`), then release what is still
    /// unanswered once the process is gone. Released earlier, a task could
    /// start elsewhere (another daemon) while this process still works on
    /// it. The leases are kept alive until then.
    async fn shut_down(mut self) -> Exit {
        let mut renewing = self.keep_leases();
        let grace = self.agent.config.timeouts.stop_grace.get();
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        let _ = self.send(&ToAgent::Shutdown { grace_ms }).await;
        self.stdin = None;
        let mut deadline = Instant::now() + grace;
        let (mut reading, mut exited) = (true, false);
        while reading || !exited {
            tokio::select! {
                line = self.lines.next_line(), if reading => match line {
                    Ok(Some(Line::Text(text))) => {
                        self.wind_down_line(&text).await;
                        renewing.retain(|id, _| self.in_flight.contains_key(id));
                    }
                    Ok(Some(other)) => {
                        self.malformed_line(&other);
                    }
                    Ok(None) | Err(_) => reading = false,
                },
                _ = self.child.wait(), if !exited => {
                    // What it wrote before it exited is still in the pipe;
                    // a descendant holding the pipe open is not waited
                    // for long.
                    exited = true;
                    deadline = deadline.min(Instant::now() + crate::command::DRAIN_AFTER_EXIT);
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if exited {
            process::finish(&mut self.child, self.pgid).await;
        } else {
            process::stop(&mut self.child, self.pgid, grace).await;
        }
        drop(renewing);
        for (_, tracked) in self.in_flight.drain() {
            self.agent
                .release(
                    tracked.lease,
                    &self.name,
                    "the daemon shut down before the task finished",
                )
                .await;
        }
        Exit::Shutdown
    }

    /// Reads what a process that is gone (or stopped) wrote before it
    /// went: its results count. They may wait in the pipe, or among the
    /// lines read ahead while a task was written; a process it left
    /// behind holding the pipe is not waited for long.
    async fn drain_results(&mut self) {
        let deadline = Instant::now() + crate::command::DRAIN_AFTER_EXIT;
        loop {
            tokio::select! {
                line = self.lines.next_line() => match line {
                    Ok(Some(Line::Text(text))) => self.wind_down_line(&text).await,
                    Ok(Some(other)) => {
                        self.malformed_line(&other);
                    }
                    Ok(None) | Err(_) => return,
                },
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// A line from an agent told to shut down: its results and progress
    /// still count; an error or a send is ignored (an agent may answer
    /// `shutdown` by failing what it abandons), and the task is released
    /// uncharged.
    async fn wind_down_line(&mut self, text: &str) {
        match protocol::parse_line(text) {
            Ok(message @ (FromAgent::Result { .. } | FromAgent::Progress { .. })) => {
                self.handle_message(message).await;
            }
            Ok(_) => self.seen(),
            Err(error) => self.agent.record_malformed(self.index, &error),
        }
    }

    /// Keeps every lease this replica holds alive, by task, until the
    /// guards are dropped: stopping its process takes up to `stop_grace`
    /// and more, and the leases must outlast it, or the tasks come back as
    /// `lease_expired` (without their backoff, and the innocent ones
    /// charged), or start elsewhere, while the process still runs.
    fn keep_leases(&self) -> HashMap<String, super::AbortOnDrop> {
        self.in_flight
            .iter()
            .map(|(id, tracked)| (id.clone(), self.agent.keep_lease(&tracked.lease.key)))
            .collect()
    }

    async fn stop(&mut self) {
        self.stdin = None;
        process::stop(
            &mut self.child,
            self.pgid,
            self.agent.config.timeouts.stop_grace.get(),
        )
        .await;
    }
}

/// An exit status in words.
pub(super) fn describe(status: Option<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        None => "exit status unknown".into(),
        Some(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => {
                let name = nix::sys::signal::Signal::try_from(signal)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| signal.to_string());
                format!("killed by {name}")
            }
            (None, None) => "exit status unknown".into(),
        },
    }
}
