//! The daemon's HTTP server: health endpoints for Kubernetes probes, load
//! balancers and humans, and Prometheus metrics.
//!
//! - `GET /health/live`: 200 while the process and its event loop answer.
//! - `GET /health/ready`: each check with its result; 503 when a required
//!   check fails (the broker connection). Agents' replicas are reported.
//! - `GET /health/progress`: 503 naming the agents with a task that made no
//!   progress for half its `progress_timeout` (the watchdog kills it at the
//!   full timeout).
//! - `GET /metrics`: Prometheus metrics (see [`crate::metrics`]).
//!
//! The server binds `[http] listen` (loopback by default) before the
//! agents start, so a port in use stops the daemon at once with a clear
//! error. Every handler only reads in-memory state: none waits on the
//! store or an agent.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde::Serialize;
use tokio::sync::watch;

use crate::clock::SharedClock;
use crate::dispatch::AgentRuntime;
use crate::status::{ReplicaState, ReplicaStatus};
use crate::store::Store;

/// What the handlers read.
#[derive(Clone)]
pub struct Health {
    /// The daemon's agents.
    pub agents: Vec<Arc<AgentRuntime>>,
    /// The store (for the broker connection).
    pub store: Store,
    /// The clock.
    pub clock: SharedClock,
    /// The metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// One readiness check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked, e.g. `broker` or `agent:coder`.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// Whether a failure makes the daemon not ready.
    pub required: bool,
    /// What was seen.
    pub detail: String,
}

/// The answer of `/health/ready`.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    /// Every check.
    pub checks: Vec<Check>,
}

/// An agent whose task makes no progress.
#[derive(Debug, Clone, Serialize)]
pub struct Stuck {
    /// The agent.
    pub agent: String,
    /// The replica, e.g. `coder/1`.
    pub replica: String,
    /// Its tasks.
    pub tasks: Vec<String>,
    /// Milliseconds since its last progress.
    pub silent_ms: u64,
    /// The threshold it passed.
    pub threshold_ms: u64,
}

/// The answer of `/health/progress`.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// `ok` or `stuck`.
    pub status: &'static str,
    /// The agents with a stuck replica, by name.
    pub stuck_agents: Vec<String>,
    /// Each stuck replica.
    pub stuck: Vec<Stuck>,
}

impl Health {
    /// The readiness checks now.
    pub fn readiness(&self) -> Readiness {
        let mut checks = Vec::new();
        if let Some(broker) = self.store.broker_status() {
            checks.push(Check {
                name: "broker".into(),
                ok: broker.connected,
                required: true,
                detail: if broker.connected {
                    format!("connected to {}", broker.url)
                } else {
                    format!(
                        "not connected ({} disconnects); last event: {}",
                        broker.disconnects,
                        broker.last_event.as_deref().unwrap_or("none")
                    )
                },
            });
        }
        for agent in &self.agents {
            let status = agent.status();
            let ready = status
                .replicas
                .iter()
                .filter(|replica| replica.is_ready())
                .count();
            checks.push(Check {
                name: format!("agent:{}", status.name),
                ok: ready > 0,
                required: false,
                detail: format!("{ready} of {} replicas ready", status.replicas.len()),
            });
            for check in &status.readiness {
                checks.push(Check {
                    name: format!("agent:{}:{}", status.name, check.name),
                    ok: check.ok,
                    required: check.required,
                    detail: check.detail.clone(),
                });
            }
            // Checks configured but not run yet (the first round can take
            // its checks' timeout): not ready until they have, or a new
            // pod would be taken as ready while its endpoint hangs.
            if status.readiness.is_empty() && !agent.config.readiness.checks.is_empty() {
                checks.push(Check {
                    name: format!("agent:{}:readiness", status.name),
                    ok: false,
                    required: true,
                    detail: "readiness checks have not run yet".into(),
                });
            }
        }
        let ready = checks.iter().all(|check| check.ok || !check.required);
        Readiness {
            status: if ready { "ready" } else { "not_ready" },
            checks,
        }
    }

    /// The replicas whose task made no progress for half their agent's
    /// `progress_timeout`.
    pub fn progress(&self) -> Progress {
        // Replicas' times are steady (see `Clock::steady_ms`).
        let now = self.clock.steady_ms();
        let mut stuck = Vec::new();
        for agent in &self.agents {
            let threshold = agent.config.timeouts.progress_timeout.as_millis() / 2;
            let status = agent.status();
            for replica in &status.replicas {
                if replica.state != ReplicaState::Busy || replica.tasks.is_empty() {
                    continue;
                }
                // Per task: a replica's other tasks neither hide nor
                // cause a silent one.
                let Some(last) = replica.task_progress_ms else {
                    continue;
                };
                let silent = now.saturating_sub(last);
                if silent >= threshold {
                    stuck.push(Stuck {
                        agent: status.name.clone(),
                        replica: format!("{}/{}", status.name, replica.index),
                        tasks: replica.tasks.clone(),
                        silent_ms: silent,
                        threshold_ms: threshold,
                    });
                }
            }
        }
        let mut stuck_agents: Vec<String> = stuck.iter().map(|s| s.agent.clone()).collect();
        stuck_agents.dedup();
        Progress {
            status: if stuck.is_empty() { "ok" } else { "stuck" },
            stuck_agents,
            stuck,
        }
    }
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    let agents: Vec<_> = health
        .agents
        .iter()
        .map(|agent| {
            // Exported as Unix time (`agent_last_activity_timestamp`).
            let status = agent.status().on_wall(health.clock.as_ref());
            let available = agent.availability().is_available(&status.name)
                && status.replicas.iter().any(ReplicaStatus::is_ready);
            (status, available)
        })
        .collect();
    let level = health
        .agents
        .first()
        .map_or(0, |agent| agent.availability().level().number());
    let broker = health
        .store
        .broker_status()
        .map(|broker| (broker.connected, broker.disconnects, broker.reconnects));
    let text = health.metrics.scrape(&agents, level, broker);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        text,
    )
}

async fn live() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

async fn ready(State(health): State<Health>) -> impl IntoResponse {
    let readiness = health.readiness();
    let code = if readiness.status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(readiness))
}

async fn progress(State(health): State<Health>) -> impl IntoResponse {
    let progress = health.progress();
    let code = if progress.stuck.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(progress))
}

/// The routes.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/health/progress", get(progress))
        .route("/metrics", get(metrics))
        .route("/ui", get(crate::api::dashboard))
        .with_state(health)
}

/// Binds `address`.
///
/// # Errors
/// When the address cannot be bound (in use, not ours), with the key to
/// change.
pub async fn bind(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await.map_err(|error| {
        anyhow::anyhow!(
            "cannot listen on http.listen = {address}: {error}; choose another address in [http] listen (port 0 picks a free one), or set it to \"off\""
        )
    })
}

/// Serves `health` and `api` on `listener` until `stop` changes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Health,
    api: Arc<crate::api::Api>,
    mut stop: watch::Receiver<bool>,
) {
    let mut stopped = stop.clone();
    let routes = router(health).merge(crate::api::router(api));
    let listener = Capped {
        inner: listener,
        permits: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        first_byte: FIRST_BYTE_TIMEOUT,
        idle: IDLE_TIMEOUT,
    };
    let server = axum::serve(listener, routes).with_graceful_shutdown(async move {
        let _ = stop.changed().await;
    });
    // Connections get a moment to finish after the stop; a client that
    // stalls mid-request cannot hold up the daemon's shutdown.
    let deadline = async move {
        let _ = stopped.changed().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = server => {
            if let Err(error) = served {
                tracing::error!(%error, "the HTTP server stopped");
            }
        }
        () = deadline => {}
    }
}

/// How long open connections may take to finish once the daemon stops.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Most connections served at once: the rest wait in the kernel's queue, so
/// that clients (or an attacker) holding connections open cannot take the
/// file descriptors the agents' processes need.
const MAX_CONNECTIONS: usize = 256;

/// A connection that sends nothing within this time is closed, so that
/// idle connections cannot hold every slot.
const FIRST_BYTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection on which nothing moves either way for this long is closed:
/// a client that stalls after its first byte, or a keep-alive connection
/// left idle, must not hold a slot for good (the event feed writes a
/// keep-alive every 15 s, so it stays).
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The HTTP server's listener: at most [`MAX_CONNECTIONS`] connections,
/// each closed if its first byte does not come within `first_byte`, or
/// once nothing was read or written for `idle`.
struct Capped {
    inner: tokio::net::TcpListener,
    permits: Arc<tokio::sync::Semaphore>,
    first_byte: std::time::Duration,
    idle: std::time::Duration,
}

impl axum::serve::Listener for Capped {
    type Io = CappedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed");
        let (io, address) = axum::serve::Listener::accept(&mut self.inner).await;
        (
            CappedIo {
                io,
                _permit: permit,
                quiet: Box::pin(tokio::time::sleep(self.first_byte)),
                idle: self.idle,
            },
            address,
        )
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection of [`Capped`], holding its slot until dropped.
struct CappedIo {
    io: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// When the connection is closed unless something moves: the
    /// first-byte timeout, then `idle` after each read or write.
    quiet: std::pin::Pin<Box<tokio::time::Sleep>>,
    idle: std::time::Duration,
}

impl CappedIo {
    fn moved(&mut self) {
        let until = tokio::time::Instant::now() + self.idle;
        self.quiet.as_mut().reset(until);
    }
}

impl tokio::io::AsyncRead for CappedIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved();
        } else if read.is_pending() && self.quiet.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "nothing read or written within the connection's idle timeout",
            )));
        }
        read
    }
}

impl tokio::io::AsyncWrite for CappedIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(written, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        written
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn a_connection_on_which_nothing_moves_is_closed_and_frees_its_slot() {
        let inner = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = inner.local_addr().unwrap();
        let mut listener = Capped {
            inner,
            permits: Arc::new(tokio::sync::Semaphore::new(1)),
            first_byte: Duration::from_secs(5),
            idle: Duration::from_millis(1000),
        };
        let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
        let (mut io, _) = axum::serve::Listener::accept(&mut listener).await;
        // One byte, then a stall (a slow-loris client).
        client.write_all(b"G").await.unwrap();
        let mut buffer = [0u8; 8];
        assert_eq!(io.read(&mut buffer).await.unwrap(), 1);
        // A write counts as movement too (well within the idle time, on
        // a loaded machine as well).
        tokio::time::sleep(Duration::from_millis(400)).await;
        io.write_all(b"x").await.unwrap();
        let started = tokio::time::Instant::now();
        let error = io.read(&mut buffer).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(
            started.elapsed() >= Duration::from_millis(800),
            "the write reset the idle timer: {:?}",
            started.elapsed()
        );
        // Closed, its slot serves the next connection.
        drop(io);
        let _next = tokio::net::TcpStream::connect(address).await.unwrap();
        let accepted = tokio::time::timeout(
            Duration::from_secs(5),
            axum::serve::Listener::accept(&mut listener),
        )
        .await;
        assert!(accepted.is_ok(), "the slot was freed");
    }
}
