//! `flotilla top`: the fleet in the terminal, refreshed every second.
//! Keys: `a` agents and replicas, `t` recent tasks, `e` events (the
//! daemon's live events, as the dashboard's feed, and the breaker
//! transitions and watchdog actions from before), `q` or Esc to quit.

use std::collections::VecDeque;
use std::time::Duration;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table, Tabs};

use crate::queue::TaskRecord;
use crate::status::{ReplicaStatus, StatusReport};

/// The view shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum View {
    /// Agents and their replicas.
    #[default]
    Agents,
    /// Recent tasks.
    Tasks,
    /// Live events, then breaker transitions and watchdog actions.
    Events,
}

impl View {
    /// The view a key switches to: `a` agents, `t` tasks, `e` events.
    pub fn for_key(key: char) -> Option<Self> {
        match key {
            'a' => Some(Self::Agents),
            't' => Some(Self::Tasks),
            'e' => Some(Self::Events),
            _ => None,
        }
    }
}

/// The most live events `top` keeps.
pub const FEED_LEN: usize = 200;

/// The daemon's live events as `top` follows them.
#[derive(Debug, Clone, Default)]
pub struct Feed {
    /// Newest first, at most [`FEED_LEN`].
    pub events: VecDeque<crate::notify::Event>,
    /// When following first began; older history comes from the status.
    pub since_ms: Option<u64>,
    /// What the feed is doing, for the operator.
    pub note: String,
}

impl Feed {
    /// Adds `event` as the newest, dropping the oldest past [`FEED_LEN`].
    pub fn push(&mut self, event: crate::notify::Event) {
        self.events.push_front(event);
        self.events.truncate(FEED_LEN);
    }
}

/// What `top` shows.
#[derive(Debug, Clone)]
pub struct Screen {
    /// The fleet.
    pub report: StatusReport,
    /// Recent tasks, newest first.
    pub tasks: Vec<TaskRecord>,
    /// The daemon's live events.
    pub feed: Feed,
    /// The view.
    pub view: View,
    /// Now, for "ago" columns.
    pub now_ms: u64,
}

fn ago(now: u64, then: Option<u64>) -> String {
    then.map_or_else(String::new, |then| {
        humantime::format_duration(Duration::from_secs(now.saturating_sub(then) / 1000)).to_string()
    })
}

/// Draws `screen` on `frame`.
pub fn render(frame: &mut Frame<'_>, screen: &Screen) {
    let report = &screen.report;
    let t = &report.tasks;
    let level = report.degradation.level;
    let mut lines = vec![Line::from(format!(
        "{}  ·  queue {}  ·  {} running  ·  {} completed  ·  {} dead-lettered  ·  {} escalated{}",
        if report.daemon.running {
            format!(
                "daemon {}",
                report.daemon.name.as_deref().unwrap_or("running")
            )
        } else {
            "daemon not running".into()
        },
        report.queue_depth,
        t.running,
        t.completed,
        t.dead_lettered,
        t.escalated,
        report
            .counted_by
            .as_ref()
            .map(|by| format!("  ·  counted by daemon {}", by.daemon))
            .unwrap_or_default()
    ))];
    if level != crate::degrade::Level::Nominal {
        lines.push(Line::from(Span::styled(
            format!(
                "DEGRADED: level {level}{}",
                report
                    .degradation
                    .reason
                    .as_deref()
                    .map(|reason| format!(": {reason}"))
                    .unwrap_or_default()
            ),
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        )));
    }
    if let Some(error) = &report.store_error {
        lines.push(Line::from(Span::styled(
            format!("STORE UNREACHABLE: {error}"),
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        )));
    }
    // The title, the summary and a line for each warning, and the border.
    let height = u16::try_from(lines.len() + 2).unwrap_or(u16::MAX);
    let [head, tabs, body] = Layout::vertical([
        Constraint::Length(height),
        Constraint::Length(1),
        Constraint::Min(3),
    ])
    .areas(frame.area());
    frame.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::BOTTOM).title("flotilla")),
        head,
    );
    let selected = match screen.view {
        View::Agents => 0,
        View::Tasks => 1,
        View::Events => 2,
    };
    frame.render_widget(
        Tabs::new(["[a]gents", "[t]asks", "[e]vents"]).select(selected),
        tabs,
    );
    match screen.view {
        View::Agents => agents(frame, body, screen),
        View::Tasks => tasks(frame, body, screen),
        View::Events => events(frame, body, screen),
    }
}

fn agents(frame: &mut Frame<'_>, area: ratatui::layout::Rect, screen: &Screen) {
    let mut rows = Vec::new();
    for agent in &screen.report.agents {
        let ready = agent.replicas.iter().filter(|r| r.is_ready()).count();
        let breaker = agent.breaker.state.map_or("off", |state| state.as_str());
        let style = if ready == 0 || breaker != "closed" && breaker != "off" {
            Style::default().fg(Color::Red)
        } else {
            Style::default()
        };
        rows.push(
            Row::new(vec![
                agent.name.clone(),
                format!("{:?}", agent.state).to_lowercase(),
                breaker.to_string(),
                format!("{ready}/{}", agent.replicas.len()),
                agent.tasks.queued.to_string(),
                agent.tasks.running.to_string(),
                agent.tasks.completed.to_string(),
                agent.tasks.dead_lettered.to_string(),
                agent.restarts.to_string(),
            ])
            .style(style.add_modifier(Modifier::BOLD)),
        );
        for replica in &agent.replicas {
            rows.push(Row::new(vec![
                format!("  {}/{}", agent.name, replica.index),
                replica_state(replica),
                replica
                    .pid
                    .map_or_else(String::new, |pid| format!("pid {pid}")),
                replica.tasks.join(","),
                ago(
                    screen.now_ms,
                    replica
                        .task_progress_ms
                        .filter(|_| !replica.tasks.is_empty()),
                ),
                String::new(),
                String::new(),
                replica
                    .rss_bytes
                    .map_or_else(String::new, |rss| format!("{}M", rss >> 20)),
                replica.restarts.to_string(),
            ]));
        }
    }
    let widths = [
        Constraint::Length(20),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(16),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(10),
        Constraint::Length(6),
        Constraint::Length(8),
    ];
    frame.render_widget(
        Table::new(rows, widths).header(
            Row::new([
                "AGENT",
                "STATE",
                "BREAKER",
                "READY/TASK",
                "QUEUED",
                "RUNNING",
                "DONE",
                "DEAD",
                "RESTARTS",
            ])
            .style(Style::default().add_modifier(Modifier::UNDERLINED)),
        ),
        area,
    );
}

fn replica_state(replica: &ReplicaStatus) -> String {
    if replica.not_ready.is_some() {
        "not ready".into()
    } else {
        format!("{:?}", replica.state).to_lowercase()
    }
}

fn tasks(frame: &mut Frame<'_>, area: ratatui::layout::Rect, screen: &Screen) {
    let rows = screen.tasks.iter().map(|task| {
        Row::new(vec![
            task.id.clone(),
            task.agent.clone(),
            task.state.to_string(),
            task.attempts.to_string(),
            task.reason.clone().unwrap_or_default(),
        ])
    });
    let widths = [
        Constraint::Length(36),
        Constraint::Length(14),
        Constraint::Length(14),
        Constraint::Length(8),
        Constraint::Min(10),
    ];
    frame.render_widget(
        Table::new(rows, widths).header(
            Row::new(["TASK", "AGENT", "STATE", "ATTEMPTS", "REASON"])
                .style(Style::default().add_modifier(Modifier::UNDERLINED)),
        ),
        area,
    );
}

fn events(frame: &mut Frame<'_>, area: ratatui::layout::Rect, screen: &Screen) {
    let feed = &screen.feed;
    let mut lines = vec![Line::from(Span::styled(
        feed.note.clone(),
        Style::default().add_modifier(Modifier::DIM),
    ))];
    for event in &feed.events {
        let line = format!(
            "{:>8} ago  {}: {}",
            ago(screen.now_ms, Some(event.at_ms)),
            event.event.as_str(),
            event.text
        );
        lines.push(if event.urgent {
            Line::from(Span::styled(line, Style::default().fg(Color::Red)))
        } else {
            Line::from(line)
        });
    }
    // History from the status: what happened before the feed began.
    let mut earlier: Vec<(u64, String)> = Vec::new();
    for agent in &screen.report.agents {
        if let Some(transition) = &agent.breaker.last_transition {
            earlier.push((
                transition.at_ms,
                format!(
                    "{}: breaker {} → {}: {}",
                    agent.name, transition.from, transition.to, transition.reason
                ),
            ));
        }
        for event in &agent.watchdog {
            earlier.push((
                event.at_ms,
                format!(
                    "{}: watchdog {}: {}",
                    agent.name, event.action, event.detail
                ),
            ));
        }
    }
    earlier.retain(|(at, _)| feed.since_ms.is_none_or(|since| *at < since));
    earlier.sort_by_key(|event| std::cmp::Reverse(event.0));
    if !earlier.is_empty() {
        lines.push(Line::from(Span::styled(
            "earlier (breaker transitions and watchdog actions):",
            Style::default().add_modifier(Modifier::DIM),
        )));
    }
    lines.extend(
        earlier.into_iter().map(|(at, text)| {
            Line::from(format!("{:>8} ago  {text}", ago(screen.now_ms, Some(at))))
        }),
    );
    if feed.events.is_empty() && lines.len() == 1 {
        lines.push(Line::from("no events yet"));
    }
    frame.render_widget(Paragraph::new(lines), area);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{AgentStatus, DaemonState, ReplicaState};

    fn screen(view: View) -> Screen {
        let mut coder = AgentStatus::new("coder", crate::config::Mode::Persistent, 2);
        coder.replicas[0].state = ReplicaState::Busy;
        coder.replicas[0].pid = Some(4242);
        coder.replicas[0].tasks = vec!["fix-42".into()];
        coder.replicas[0].task_progress_ms = Some(1_000);
        coder.replicas[1].state = ReplicaState::Idle;
        coder.replicas[1].not_ready = Some("model down".into());
        coder.replicas[1].rss_bytes = Some(512 << 20);
        coder.replicas[1].restarts = 2;
        coder.restarts = 3;
        coder.tasks.queued = 7;
        coder.breaker.state = Some(crate::breaker::BreakerState::Closed);
        coder.watchdog.push(crate::status::WatchdogEvent {
            at_ms: 50_000,
            action: "scale_up".into(),
            detail: "added replica 1".into(),
        });
        // After the feed began: the feed has it, so it is not repeated.
        coder.watchdog.push(crate::status::WatchdogEvent {
            at_ms: 56_000,
            action: "scale_down".into(),
            detail: "removed replica 2".into(),
        });
        let report = StatusReport {
            daemon: DaemonState {
                name: Some("gpu-1".into()),
                running: true,
                ..DaemonState::default()
            },
            daemons: Vec::new(),
            store: "test".into(),
            queue_depth: 7,
            tasks: coder.tasks.clone(),
            degradation: crate::degrade::DegradationStatus::default(),
            agents: vec![coder],
            store_error: None,
            counted_by: None,
        };
        let mut feed = Feed {
            since_ms: Some(55_000),
            note: "following live events from http://127.0.0.1:9750/".into(),
            ..Feed::default()
        };
        feed.push(crate::notify::Event::new(
            crate::notify::EventKind::ReplicaRestarted,
            59_000,
            false,
            "coder/1 restarting: replica exited (killed by SIGKILL)".into(),
        ));
        let task = |id: &str, state, attempts, reason: Option<&str>| TaskRecord {
            id: id.into(),
            agent: "coder".into(),
            priority: crate::queue::Priority::Normal,
            state,
            payload: serde_json::json!({}),
            attempts,
            charged_attempts: attempts,
            replays: 0,
            checkpoint: None,
            result: None,
            reason: reason.map(String::from),
            visible_ms: 0,
            lease_deadline_ms: None,
            created_ms: 1_000,
            updated_ms: 2_000,
            finished_ms: None,
            history: Vec::new(),
        };
        Screen {
            report,
            tasks: vec![
                task("fix-42", crate::queue::TaskState::Running, 2, None),
                task(
                    "fix-41",
                    crate::queue::TaskState::DeadLettered,
                    4,
                    Some("retry.max_deliver = 4 reached; last: crashed"),
                ),
            ],
            feed,
            view,
            now_ms: 61_000,
        }
    }

    /// Every warning shows in the header, under the summary.
    #[test]
    fn top_shows_a_degraded_fleet_and_an_unreachable_store() {
        let mut screen = screen(View::Agents);
        screen.report.degradation.level = crate::degrade::Level::Reduced;
        screen.report.store_error = Some("store error: cannot read: timed out".into());
        let shown = draw(&screen);
        assert!(shown.contains("daemon gpu-1"), "{shown}");
        assert!(shown.contains("DEGRADED: level"), "{shown}");
        assert!(
            shown.contains("STORE UNREACHABLE: store error: cannot read: timed out"),
            "{shown}"
        );
    }

    #[test]
    fn keys_switch_views() {
        assert_eq!(View::for_key('a'), Some(View::Agents));
        assert_eq!(View::for_key('t'), Some(View::Tasks));
        assert_eq!(View::for_key('e'), Some(View::Events));
        assert_eq!(View::for_key('x'), None);
    }

    #[test]
    fn top_shows_recent_tasks() {
        let tasks = draw(&screen(View::Tasks));
        let row = |id: &str| {
            tasks
                .lines()
                .find(|line| line.contains(id))
                .unwrap_or_else(|| panic!("{id} missing from\n{tasks}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert!(tasks.contains("TASK"), "{tasks}");
        assert_eq!(row("fix-42"), "fix-42 coder running 2");
        assert!(
            row("fix-41").starts_with("fix-41 coder dead_lettered 4 retry.max_deliver = 4 reached"),
            "{tasks}"
        );
    }

    fn draw(screen: &Screen) -> String {
        let backend = ratatui::backend::TestBackend::new(120, 12);
        let mut terminal = ratatui::Terminal::new(backend).unwrap();
        terminal.draw(|frame| render(frame, screen)).unwrap();
        let buffer = terminal.backend().buffer();
        let mut text = String::new();
        for y in 0..buffer.area.height {
            for x in 0..buffer.area.width {
                text.push_str(buffer[(x, y)].symbol());
            }
            text.push('\n');
        }
        text
    }

    #[test]
    fn top_shows_agents_replicas_and_events() {
        let agents = draw(&screen(View::Agents));
        for expected in [
            "daemon gpu-1",
            "queue 7",
            "coder",
            "closed",
            "1/2",
            "coder/0",
            "busy",
            "pid 4242",
            "fix-42",
            "1m",
            "coder/1",
            "not ready",
            "512M",
        ] {
            assert!(
                agents.contains(expected),
                "{expected:?} missing from\n{agents}"
            );
        }
        let events = draw(&screen(View::Events));
        for expected in [
            "following live events from http://127.0.0.1:9750/",
            "2s ago  replica_restarted: coder/1 restarting: replica exited (killed by SIGKILL)",
            "earlier (breaker transitions and watchdog actions):",
            "11s ago  coder: watchdog scale_up: added replica 1",
        ] {
            assert!(
                events.contains(expected),
                "{expected:?} missing from\n{events}"
            );
        }
        assert!(!events.contains("scale_down"), "{events}");
        // Live events come first, newest first.
        assert!(
            events.find("replica_restarted") < events.find("scale_up"),
            "{events}"
        );
    }
}
