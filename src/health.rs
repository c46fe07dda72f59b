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
                    // Failed fewer rounds in a row than its threshold: it
                    // stops no replica, so the daemon is still ready (its
                    // detail says so).
                    ok: check.ok || check.tolerated,
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
                // A oneshot task's process that exited leaves its slot busy
                // while its result is validated (gates may take minutes):
                // that is no silent process, as the fleet watchdog holds
                // too.
                if replica.state != ReplicaState::Busy
                    || replica.tasks.is_empty()
                    || replica.pid.is_none()
                {
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
    stop: watch::Receiver<bool>,
) {
    let routes = router(health).merge(crate::api::router(api));
    serve_routes(listener, routes, stop, Limits::default()).await;
}

/// What the server allows a connection.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Most connections served at once: the rest wait in the kernel's
    /// queue, so that clients (or an attacker) holding connections open
    /// cannot take the file descriptors the agents' processes need.
    connections: usize,
    /// Most connections served at once from one address other than
    /// loopback: one peer cannot take every slot from the health probes
    /// and Prometheus.
    per_peer: usize,
    /// A request's head (its line and headers) must arrive within this
    /// time of the connection opening, or of the previous response: a
    /// client trickling bytes (a slow loris), or a keep-alive connection
    /// left idle, does not hold a slot for good. A request being handled,
    /// however long, is not cut off.
    head: std::time::Duration,
    /// A response whose client reads nothing of it for this long is
    /// abandoned (the event feed writes a keep-alive every 15 s).
    stalled_write: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 256,
            per_peer: 64,
            head: std::time::Duration::from_secs(10),
            stalled_write: std::time::Duration::from_secs(120),
        }
    }
}

/// How long open connections may take to finish once the daemon stops.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves `routes` on `listener` within `limits` until `stop` changes;
/// then each connection finishes its request in hand, for at most
/// [`SHUTDOWN_GRACE`].
async fn serve_routes(
    listener: tokio::net::TcpListener,
    routes: Router,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
) {
    let mut listener = Capped::new(listener, limits);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (io, _) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(routes.clone());
        let mut stopping = stop.clone();
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.head)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = stopping.changed() => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
        });
        // Those that ended are reaped as others come.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    // A client that stalls mid-request cannot hold up the daemon's
    // shutdown: what is left then is dropped (aborted) with the set.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// The HTTP server's listener: at most `connections` connections, and
/// `per_peer` from one address other than loopback.
struct Capped {
    inner: tokio::net::TcpListener,
    permits: Arc<tokio::sync::Semaphore>,
    peers: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    limits: Limits,
}

impl Capped {
    fn new(inner: tokio::net::TcpListener, limits: Limits) -> Self {
        Self {
            inner,
            permits: Arc::new(tokio::sync::Semaphore::new(limits.connections)),
            peers: Arc::default(),
            limits,
        }
    }

    /// The next connection within the limits; one from a peer over its
    /// share is closed at once.
    async fn accept(&mut self) -> (CappedIo, SocketAddr) {
        loop {
            let permit = self
                .permits
                .clone()
                .acquire_owned()
                .await
                .expect("the connection semaphore is never closed");
            let (io, address) = axum::serve::Listener::accept(&mut self.inner).await;
            let Some(peer) = self.admit(address.ip()) else {
                tracing::debug!(%address, per_peer = self.limits.per_peer, "connection refused: its address holds its share of the server's connections");
                continue;
            };
            return (
                CappedIo {
                    io,
                    _permit: permit,
                    _peer: peer,
                    stalled: None,
                    stalled_write: self.limits.stalled_write,
                },
                address,
            );
        }
    }

    /// A share of the connections for a peer at `ip`, unless it holds
    /// its `per_peer` already (loopback peers are not counted).
    fn admit(&self, ip: std::net::IpAddr) -> Option<PeerShare> {
        // An IPv4 peer of a dual-stack listener comes as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        if ip.is_loopback() {
            return Some(PeerShare { ip, peers: None });
        }
        let mut peers = self.peers.lock().expect("not poisoned");
        let held = peers.entry(ip).or_default();
        if *held >= self.limits.per_peer {
            return None;
        }
        *held += 1;
        Some(PeerShare {
            ip,
            peers: Some(self.peers.clone()),
        })
    }
}

/// One connection of a peer, counted until dropped.
struct PeerShare {
    ip: std::net::IpAddr,
    peers: Option<Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>>,
}

impl Drop for PeerShare {
    fn drop(&mut self) {
        let Some(peers) = &self.peers else {
            return;
        };
        let mut peers = peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(held) = peers.get_mut(&self.ip) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                peers.remove(&self.ip);
            }
        }
    }
}

/// A connection of [`Capped`], holding its slot until dropped.
struct CappedIo {
    io: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _peer: PeerShare,
    /// Since when a write waits for the client to read: it fails once
    /// that lasts `stalled_write`.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    stalled_write: std::time::Duration,
}

impl CappedIo {
    /// `polled`, a write or flush, unless it waited too long.
    fn judge<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let stalled_write = self.stalled_write;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stalled_write)));
        if stalled.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing of the response within the server's write timeout",
            )));
        }
        polled
    }
}

impl tokio::io::AsyncRead for CappedIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CappedIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.judge(cx, written)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.judge(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let flushed = std::pin::Pin::new(&mut self.io).poll_flush(cx);
        self.judge(cx, flushed)
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

    /// Serves `routes` within `limits` on a free loopback port; the
    /// server stops when the returned sender is dropped.
    async fn start(routes: Router, limits: Limits) -> (SocketAddr, watch::Sender<bool>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve_routes(listener, routes, stopped, limits));
        (address, stop)
    }

    fn short_limits() -> Limits {
        Limits {
            head: Duration::from_secs(1),
            stalled_write: Duration::from_millis(300),
            ..Limits::default()
        }
    }

    /// Reads until the server closes the connection; what it sent.
    async fn read_to_close(client: &mut tokio::net::TcpStream) -> String {
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer))
            .await
            .expect("the server closes the connection");
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn a_slow_head_is_cut_off_but_a_slow_handler_is_not() {
        let routes = Router::new()
            .route("/fast", get(|| async { "fast" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    "slow"
                }),
            );
        let (address, _stop) = start(routes, short_limits()).await;
        // A slow loris: a header every 100 ms, never the end of the head.
        let mut loris = tokio::net::TcpStream::connect(address).await.unwrap();
        let started = tokio::time::Instant::now();
        loris.write_all(b"GET /fast HTTP/1.1\r\n").await.unwrap();
        let trickle = async {
            for n in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if loris
                    .write_all(format!("x-{n}: y\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), trickle)
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "cut off at its head timeout: {:?}",
            started.elapsed()
        );
        // A handler longer than the head timeout and eight times the write
        // timeout answers in full.
        let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
        client
            .write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let mut answer = vec![0u8; 1024];
        let read = tokio::time::timeout(Duration::from_secs(10), client.read(&mut answer))
            .await
            .unwrap()
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..read]).into_owned();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("slow"), "{answer}");
        assert!(started.elapsed() >= Duration::from_millis(2400));
        // Kept alive after it, then closed once idle past the head timeout.
        let started = tokio::time::Instant::now();
        assert_eq!(read_to_close(&mut client).await, "");
        assert!(started.elapsed() >= Duration::from_millis(500));
    }

    #[tokio::test]
    async fn a_response_nobody_reads_is_abandoned() {
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        /// Sets its flag when the response body is dropped.
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let flag = dropped.clone();
        let routes = Router::new().route(
            "/endless",
            get(move || {
                let flag = Flag(flag.clone());
                async move {
                    let chunks = futures_util::stream::repeat_with(move || {
                        let _alive = &flag;
                        Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![b'x'; 65536]))
                    });
                    axum::body::Body::from_stream(chunks)
                }
            }),
        );
        let (address, _stop) = start(routes, short_limits()).await;
        let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
        client
            .write_all(b"GET /endless HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        // The client reads nothing: once the socket's buffers are full,
        // the server's writes wait, and give up after 300 ms.
        let started = tokio::time::Instant::now();
        while !dropped.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the stalled response was not abandoned"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn one_peer_gets_its_share_of_the_connections() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let capped = Capped::new(
            listener,
            Limits {
                per_peer: 2,
                ..Limits::default()
            },
        );
        let (a, b): (std::net::IpAddr, std::net::IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = capped.admit(a).unwrap();
        let _second = capped.admit(a).unwrap();
        assert!(capped.admit(a).is_none(), "over its share");
        assert!(capped.admit(b).is_some(), "another peer's share is its own");
        drop(first);
        assert!(
            capped.admit(a).is_some(),
            "a closed connection frees its share"
        );
        // Loopback (the CLI, a local Prometheus) is not counted.
        let local: Vec<_> = (0..10)
            .map(|_| capped.admit("127.0.0.1".parse().unwrap()))
            .collect();
        assert!(local.iter().all(Option::is_some));
    }
}
