//! The daemon's JSON API, under `/api/v1`: the fleet's status, its agents,
//! tasks, dead letters and escalations, and the operations on them.
//!
//! | Method and path | What |
//! |---|---|
//! | `GET /api/v1/status` | what `flotilla status --json` shows, live for this daemon |
//! | `GET /api/v1/agents`, `GET /api/v1/agents/{name}` | agents with replicas, breaker, readiness |
//! | `GET /api/v1/events` | live events (Server-Sent Events): breakers, restarts, levels, watchdog, chaos |
//! | `GET /api/v1/tasks?state=&agent=&limit=`, `GET /api/v1/tasks/{id}` | tasks; one with its attempts |
//! | `POST /api/v1/tasks` | submit one task or a batch |
//! | `POST /api/v1/tasks/{id}/rollback` | undo the changes its result declared |
//! | `GET /api/v1/tasks/{id}/tree` | its parent and children (delegation) |
//! | `POST /api/v1/tasks/{id}/cancel` | cancel a queued, running or escalated task `{"reason": "..."}` |
//! | `GET /api/v1/dlq?agent=&limit=` | dead letters |
//! | `POST /api/v1/dlq/replay`, `POST /api/v1/dlq/purge` | `{"ids": [...]}` or `{"all": true}` |
//! | `GET /api/v1/escalations?agent=&limit=`, `GET /api/v1/escalations/{id}` | escalated tasks |
//! | `POST /api/v1/escalations/{id}/resolve` | `{"retry": true}`, `{"complete": RESULT}` or `{"drop": true}` |
//! | `PUT /api/v1/degrade`, `DELETE /api/v1/degrade` | force a level `{"level": 2, "for": "30m"}`, or clear it (answers `null`) |
//! | `GET /api/v1/chaos` | which faults this daemon can inject: `{"enabled", "proxy", "agents"}` |
//! | `POST /api/v1/chaos/kill`, `/pause`, `/partition`, `/latency` | inject faults (with `[chaos] enabled = true` only; the last two with `proxy = true`) |
//! | `POST /api/v1/chaos/stop` | end pauses and the broker fault: all, or `{"pids": [...], "broker": true}` (allowed with chaos off) |
//! | `GET /api/v1/chaos/last` | each scheduled experiment's last report |
//!
//! **Authorization.** With a token configured (`http.token`,
//! `http.token_file` or `FLOTILLA_HTTP_TOKEN`) every API call needs
//! `Authorization: Bearer TOKEN`: task payloads and results are as
//! sensitive as the operations. Without one (only allowed on a loopback
//! address) reads are open and every mutating call is refused: whoever can
//! reach the port could otherwise make the agents run anything. The
//! health endpoints and `/metrics` never need the token. Errors are
//! `{"error": "..."}` with a 4xx or 5xx status; the token is never logged.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::SharedClock;
use crate::config::Config;
use crate::degrade::Forced;
use crate::queue::{
    ListFilter, MAX_SUBMIT_BATCH, NewTask, Priority, QueueError, Resolution, Selection, TaskState,
    new_task_id, validate_task_id,
};
use crate::status::{DaemonSnapshot, StatusReport};
use crate::store::Store;

/// Largest request body accepted (a submitted batch).
pub const MAX_BODY_BYTES: usize = 64 << 20;
/// Most tasks one listing returns.
pub const MAX_LIST: usize = 10_000;
/// Tasks a listing returns when `limit` is not given.
const DEFAULT_LIST: usize = 100;

/// What the handlers use.
pub struct Api {
    /// The fleet's whole config (every agent, also those other daemons
    /// run).
    pub config: Arc<Config>,
    /// The store.
    pub store: Store,
    /// The clock.
    pub clock: SharedClock,
    /// The bearer token, if configured.
    pub token: Option<String>,
    /// This daemon's status now.
    pub live: Box<dyn Fn() -> DaemonSnapshot + Send + Sync>,
    /// This daemon's agents (chaos actions).
    pub agents: Vec<Arc<crate::dispatch::AgentRuntime>>,
    /// Where events go (chaos actions).
    pub notifier: crate::notify::Notifier,
    /// The metrics (chaos actions).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The fault proxy in front of the broker, with `[chaos] proxy`.
    pub proxy: Option<Arc<crate::fault_proxy::FaultProxy>>,
    /// Calls refused for their token, for the log.
    pub refusals: Refusals,
}

/// An API error: a status and a message for `{"error": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, and what would be valid.
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> Self {
        let status = match &error {
            QueueError::Invalid(_) => StatusCode::BAD_REQUEST,
            QueueError::NotFound { .. } => StatusCode::NOT_FOUND,
            QueueError::WrongState { .. } | QueueError::StaleLease { .. } => StatusCode::CONFLICT,
            QueueError::Storage(_) | QueueError::Closed => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self::new(status, error.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self::new(rejection.status(), rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::new(
            rejection.status(),
            format!(
                "{}; valid: state (queued, running, completed, dead_lettered, escalated), agent (a configured agent), limit (1 to {MAX_LIST})",
                rejection.body_text()
            ),
        )
    }
}

type Answer<T> = Result<Json<T>, ApiError>;

/// A route's one path parameter (a task id, an agent's name); one that
/// cannot be read (bad percent-encoding) is refused as the API's other
/// errors are, in JSON.
struct Param(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Param {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| Self(value))
            .map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))
    }
}

/// The API's routes, behind the token check.
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/agents/{name}", get(agent))
        .route("/api/v1/tasks", get(tasks).post(submit))
        .route("/api/v1/tasks/{id}", get(task))
        .route("/api/v1/tasks/{id}/rollback", post(rollback))
        .route("/api/v1/tasks/{id}/tree", get(tree))
        .route("/api/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/api/v1/dlq", get(dead_letters))
        .route("/api/v1/dlq/replay", post(replay))
        .route("/api/v1/dlq/purge", post(purge))
        .route("/api/v1/escalations", get(escalations))
        .route("/api/v1/escalations/{id}", get(escalation))
        .route("/api/v1/escalations/{id}/resolve", post(resolve))
        .route("/api/v1/degrade", put(force_level).delete(clear_level))
        .route("/api/v1/events", get(events))
        .route("/api/v1/chaos", get(chaos_info))
        .route("/api/v1/chaos/kill", post(chaos_kill))
        .route("/api/v1/chaos/pause", post(chaos_pause))
        .route("/api/v1/chaos/partition", post(chaos_partition))
        .route("/api/v1/chaos/latency", post(chaos_latency))
        .route("/api/v1/chaos/stop", post(chaos_stop))
        .route("/api/v1/chaos/last", get(chaos_last))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(tokio::sync::Semaphore::new(WRITES_AT_ONCE)),
            few_writes_at_once,
        ))
        .layer(axum::middleware::from_fn_with_state(api.clone(), authorize))
        .with_state(api)
}

async fn no_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!(
        "no API route {method} {}; the routes are listed in docs/operations.md (The API: /api/v1)",
        uri.path()
    ))
}

async fn wrong_method(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} does not take {method}; the routes and their methods are listed in docs/operations.md (The API: /api/v1)",
            uri.path()
        ),
    )
}

/// Calls with a large body (over [`SMALL_BODY_BYTES`], or of unknown
/// length) handled at once; more wait their turn. A body of up to
/// [`MAX_BODY_BYTES`] is read and parsed whole, several times its size in
/// memory: without this bound, clients with the token could take the
/// daemon's memory with concurrent large submits. Small calls (a cancel,
/// a rollback, a small submit) never wait for large ones.
const WRITES_AT_ONCE: usize = 4;

/// A body up to this size takes no turn.
const SMALL_BODY_BYTES: u64 = 1 << 20;

/// Longest a call may take to send its body (64 MiB at about 0.5 MB/s).
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Reads the body of each call that has one within [`BODY_TIMEOUT`] and
/// at most [`MAX_BODY_BYTES`], holding one of the [`WRITES_AT_ONCE`] turns
/// for a large one until its call is answered.
async fn few_writes_at_once(
    State(writes): State<Arc<tokio::sync::Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    use axum::body::HttpBody as _;
    let size = request.body().size_hint();
    if size.upper() == Some(0) {
        return next.run(request).await;
    }
    if size.lower() > MAX_BODY_BYTES as u64 {
        return too_large().into_response();
    }
    let _turn = if size.upper().is_none_or(|upper| upper > SMALL_BODY_BYTES) {
        writes.acquire().await.ok()
    } else {
        None
    };
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES)).await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(error)) => {
            let over = std::error::Error::source(&error)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>())
                || error.into_inner().is::<http_body_util::LengthLimitError>();
            return if over {
                too_large()
            } else {
                ApiError::bad_request("the request body could not be read (the connection broke?)")
            }
            .into_response();
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            )
            .into_response();
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the request body is over {} MiB; submit large batches in parts",
            MAX_BODY_BYTES >> 20
        ),
    )
}

/// Refuses calls without the right token (see the module's text).
async fn authorize(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let mutating = !matches!(*request.method(), Method::GET | Method::HEAD);
    match &api.token {
        Some(token) => {
            let given = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                // The scheme is case-insensitive (RFC 9110).
                .and_then(|value| value.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token);
            if !given.is_some_and(|given| same(given.trim().as_bytes(), token.as_bytes())) {
                if let Some(refused) = api.refusals.logged(api.clock.steady_ms()) {
                    tracing::warn!(method = %request.method(), path = %request.uri().path(), refused, "API call without the right bearer token refused (counting those refused since the last such line, which comes at most every 10 s)");
                }
                let mut response = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token: send `Authorization: Bearer TOKEN` with the daemon's token (http.token, http.token_file or FLOTILLA_HTTP_TOKEN)",
                )
                .into_response();
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
        }
        None if mutating => {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "this daemon has no API token, so its API is read-only: set http.token_file (or http.token, or FLOTILLA_HTTP_TOKEN) to submit, replay, purge, resolve or degrade through it",
            )
            .into_response();
        }
        None => {
            // Without a token the daemon listens on loopback only; a web
            // page that points its own name at 127.0.0.1 (DNS rebinding)
            // must not read tasks through the visitor's browser. Its
            // requests name that page's host.
            let host = request
                .headers()
                .get(header::HOST)
                .map(|host| host.to_str().unwrap_or("?"));
            if let Some(host) = host.filter(|host| !loopback_host(host)) {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "this daemon has no API token, so its API answers only requests addressed to localhost, 127.0.0.1 or [::1], not to {host:?}: use one of those, or set http.token_file (or http.token, or FLOTILLA_HTTP_TOKEN)"
                    ),
                )
                .into_response();
            }
        }
    }
    next.run(request).await
}

/// Whether a `Host` header names this machine's loopback: `localhost`,
/// or a loopback address, with or without a port.
pub(crate) fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // [::1]:9750
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Refused calls, logged at most once per [`Refusals::EVERY_MS`]: whoever
/// reaches the port must not fill the log at the rate of their calls.
#[derive(Debug, Default)]
pub struct Refusals {
    /// When the last refusal was logged (the Clock's steady time), and
    /// those refused since.
    since: std::sync::Mutex<Option<(crate::clock::UnixMillis, u64)>>,
}

impl Refusals {
    const EVERY_MS: crate::clock::UnixMillis = 10_000;

    /// Counts a refusal at `now` (steady): `Some(refused)` (this one
    /// included, since the last logged) when it is to be logged.
    fn logged(&self, now: crate::clock::UnixMillis) -> Option<u64> {
        let mut since = self
            .since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match since.as_mut() {
            Some((at, refused)) if now.saturating_sub(*at) < Self::EVERY_MS => {
                *refused += 1;
                None
            }
            Some((at, refused)) => {
                let logged = *refused + 1;
                (*at, *refused) = (now, 0);
                Some(logged)
            }
            None => {
                *since = Some((now, 0));
                Some(1)
            }
        }
    }
}

/// Compares in time independent of where the inputs differ.
fn same(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The status, with this daemon's live part; with the store unreachable,
/// that part and `store_error`.
async fn report(api: &Api) -> Result<StatusReport, ApiError> {
    let live = (api.live)();
    Ok(StatusReport::build(&api.config, &api.store, api.clock.now_ms(), Some(live)).await?)
}

/// [`report`], refused (503) when the store could not be read: for
/// answers that would show its counts as zeros without saying so.
async fn full_report(api: &Api) -> Result<StatusReport, ApiError> {
    let report = report(api).await?;
    match &report.store_error {
        Some(error) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            error.clone(),
        )),
        None => Ok(report),
    }
}

async fn status(State(api): State<Arc<Api>>) -> Answer<StatusReport> {
    Ok(Json(report(&api).await?))
}

async fn agents(State(api): State<Arc<Api>>) -> Answer<Vec<crate::status::AgentStatus>> {
    Ok(Json(full_report(&api).await?.agents))
}

async fn agent(
    State(api): State<Arc<Api>>,
    Param(name): Param,
) -> Answer<crate::status::AgentStatus> {
    full_report(&api)
        .await?
        .agents
        .into_iter()
        .find(|agent| agent.name == name)
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no agent {name:?}; configured agents: {}",
                api.config.agent_names()
            ))
        })
}

/// `?state=&agent=&limit=` of the listings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only tasks in this state.
    #[serde(default)]
    pub state: Option<TaskState>,
    /// Only this agent's tasks.
    #[serde(default)]
    pub agent: Option<String>,
    /// Most tasks returned, newest first (1 to 10000, default 100).
    #[serde(default)]
    pub limit: Option<usize>,
}

impl ListQuery {
    fn filter(self, state: Option<TaskState>) -> Result<ListFilter, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIST);
        if !(1..=MAX_LIST).contains(&limit) {
            return Err(ApiError::bad_request(format!(
                "limit {limit} is out of range; valid: 1 to {MAX_LIST}"
            )));
        }
        Ok(ListFilter {
            state: state.or(self.state),
            agent: self.agent,
            limit,
        })
    }
}

/// Listings built and sent at once: each can hold up to
/// [`crate::queue::MAX_LIST_BYTES`] of records and as much again as JSON,
/// so many at once could exhaust the daemon's memory (and take its agents
/// down with it). More wait their turn.
static LISTINGS: std::sync::LazyLock<Arc<tokio::sync::Semaphore>> =
    std::sync::LazyLock::new(|| Arc::new(tokio::sync::Semaphore::new(2)));

/// The pieces a listing's JSON is sent in.
const LISTING_CHUNK: usize = 1 << 20;

async fn list(
    api: &Api,
    query: Result<Query<ListQuery>, QueryRejection>,
    state: Option<TaskState>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    if state.is_some() && query.state.is_some() {
        return Err(ApiError::bad_request(
            "`state` is fixed by this path; use /api/v1/tasks?state=... to choose it",
        ));
    }
    let filter = query.filter(state)?;
    if let Some(agent) = &filter.agent
        && api.config.agent(agent).is_none()
    {
        return Err(ApiError::not_found(format!(
            "no agent {agent:?}; configured agents: {}",
            api.config.agent_names()
        )));
    }
    let turn = LISTINGS
        .clone()
        .acquire_owned()
        .await
        .expect("the listings' semaphore is never closed");
    let records = api.store.queue().list(&filter).await?;
    let json = axum::body::Bytes::from(serde_json::to_vec(&records).expect("records serialize"));
    drop(records);
    // Sent a piece at a time by a stream that holds the turn: the next
    // piece is taken once the last is written, so the turn passes on only
    // when the whole listing is (nearly) sent, or the client is gone.
    let pieces = (0..json.len()).step_by(LISTING_CHUNK).map(move |start| {
        let _turn = &turn;
        Ok::<_, std::convert::Infallible>(json.slice(start..json.len().min(start + LISTING_CHUNK)))
    });
    let body = futures_util::stream::iter(pieces);
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

async fn tasks(
    State(api): State<Arc<Api>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    list(&api, query, None).await
}

async fn dead_letters(
    State(api): State<Arc<Api>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    list(&api, query, Some(TaskState::DeadLettered)).await
}

async fn escalations(
    State(api): State<Arc<Api>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    list(&api, query, Some(TaskState::Escalated)).await
}

async fn find(api: &Api, id: &str) -> Result<crate::queue::TaskRecord, ApiError> {
    api.store
        .queue()
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no task with id {id:?}")))
}

async fn task(State(api): State<Arc<Api>>, Param(id): Param) -> Answer<crate::queue::TaskRecord> {
    Ok(Json(find(&api, &id).await?))
}

async fn escalation(
    State(api): State<Arc<Api>>,
    Param(id): Param,
) -> Answer<crate::queue::TaskRecord> {
    let task = find(&api, &id).await?;
    if task.state != TaskState::Escalated {
        return Err(ApiError::not_found(format!(
            "task {id:?} is {}, not escalated",
            task.state
        )));
    }
    Ok(Json(task))
}

/// `POST /api/v1/tasks`: one task (`payload`, optional `id` and
/// `priority`) or a batch (`tasks`), for `agent`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    /// The agent that runs the tasks.
    pub agent: String,
    /// One task's id (idempotency key); generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// One task's priority (default normal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// One task's payload (`null` is a payload too).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub payload: Option<Value>,
    /// A batch of tasks, in place of `payload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<Vec<TaskBody>>,
}

/// A field that is there, `null` included (an `Option<Value>` would read
/// `null` as missing).
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// One task of a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskBody {
    /// Its id (idempotency key); generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Its payload.
    pub payload: Value,
    /// Its priority (default normal).
    #[serde(default)]
    pub priority: Priority,
}

impl SubmitBody {
    /// The tasks it asks for, checked.
    ///
    /// # Errors
    /// What is wrong, naming the field.
    pub fn into_tasks(self, config: &Config) -> Result<Vec<NewTask>, String> {
        if config.agent(&self.agent).is_none() {
            return Err(format!(
                "unknown agent {:?}; configured agents: {}",
                self.agent,
                config.agent_names()
            ));
        }
        let bodies = match (self.payload, self.tasks) {
            (Some(payload), None) => vec![TaskBody {
                id: self.id,
                payload,
                priority: self.priority.unwrap_or_default(),
            }],
            (None, Some(tasks)) if self.id.is_some() || self.priority.is_some() => {
                let _ = tasks;
                return Err(
                    "`id` and `priority` belong to each task of `tasks`, not to the batch".into(),
                );
            }
            (None, Some(tasks)) => tasks,
            _ => {
                return Err(
                    "give either `payload` (one task) or `tasks` (a batch), e.g. {\"agent\": \"coder\", \"payload\": {\"prompt\": \"hello\"}}"
                        .into(),
                );
            }
        };
        if bodies.is_empty() || bodies.len() > MAX_SUBMIT_BATCH {
            return Err(format!(
                "`tasks` has {} tasks; valid: 1 to {MAX_SUBMIT_BATCH}",
                bodies.len()
            ));
        }
        bodies
            .into_iter()
            .enumerate()
            .map(|(index, body)| {
                let id = body.id.unwrap_or_else(new_task_id);
                validate_task_id(&id).map_err(|error| format!("tasks[{index}].id: {error}"))?;
                Ok(NewTask {
                    id,
                    agent: self.agent.clone(),
                    priority: body.priority,
                    payload: body.payload,
                })
            })
            .collect()
    }
}

async fn submit(
    State(api): State<Arc<Api>>,
    body: Result<Json<SubmitBody>, JsonRejection>,
) -> Answer<Vec<crate::queue::SubmitReceipt>> {
    let Json(body) = body?;
    let tasks = body
        .into_tasks(&api.config)
        .map_err(ApiError::bad_request)?;
    Ok(Json(api.store.queue().submit(tasks).await?))
}

/// Which dead letters: `{"ids": [...]}` or `{"all": true}`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectionBody {
    /// These task ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
    /// Every dead letter.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

impl SelectionBody {
    fn selection(self) -> Result<Selection, ApiError> {
        match (self.ids.is_empty(), self.all) {
            (false, false) => Ok(Selection::Ids(self.ids)),
            (true, true) => Ok(Selection::All),
            _ => Err(ApiError::bad_request(
                "give either `ids` (a non-empty list) or `\"all\": true`",
            )),
        }
    }
}

/// How many tasks an operation changed.
#[derive(Debug, Serialize, Deserialize)]
pub struct Count {
    /// Tasks changed.
    pub count: u64,
}

async fn replay(
    State(api): State<Arc<Api>>,
    body: Result<Json<SelectionBody>, JsonRejection>,
) -> Answer<Count> {
    let Json(body) = body?;
    let count = api.store.queue().replay(&body.selection()?).await?;
    tracing::info!(count, "dead letters replayed through the API");
    Ok(Json(Count { count }))
}

async fn purge(
    State(api): State<Arc<Api>>,
    body: Result<Json<SelectionBody>, JsonRejection>,
) -> Answer<Count> {
    let Json(body) = body?;
    let count = api.store.queue().purge(&body.selection()?).await?;
    tracing::info!(count, "dead letters purged through the API");
    Ok(Json(Count { count }))
}

/// How to resolve an escalation: exactly one of the fields.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    /// Queue it again with a fresh attempt budget.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry: bool,
    /// Complete it with this result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete: Option<Value>,
    /// Give it up: it becomes a dead letter.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drop: bool,
}

impl ResolveBody {
    /// The resolution it names.
    ///
    /// # Errors
    /// When it names none or several.
    pub fn resolution(self) -> Result<Resolution, String> {
        match (self.retry, self.complete, self.drop) {
            (true, None, false) => Ok(Resolution::Retry),
            (false, Some(result), false) => Ok(Resolution::Complete(result)),
            (false, None, true) => Ok(Resolution::Drop),
            _ => Err(
                "give exactly one of {\"retry\": true}, {\"complete\": RESULT} or {\"drop\": true}"
                    .into(),
            ),
        }
    }
}

async fn resolve(
    State(api): State<Arc<Api>>,
    Param(id): Param,
    body: Result<Json<ResolveBody>, JsonRejection>,
) -> Answer<crate::queue::TaskRecord> {
    let Json(body) = body?;
    let resolution = body.resolution().map_err(ApiError::bad_request)?;
    resolve_escalation(&api.store, &id, &resolution).await?;
    tracing::info!(task = %id, "escalation resolved through the API");
    Ok(Json(find(&api, &id).await?))
}

/// Resolves escalated task `id`; dropped, it ends as a dead letter, and
/// the children it waited for are cancelled with it (as when it is
/// cancelled).
///
/// # Errors
/// As [`crate::queue::TaskQueue::resolve`].
pub async fn resolve_escalation(
    store: &Store,
    id: &str,
    resolution: &Resolution,
) -> Result<(), QueueError> {
    store.queue().resolve(id, resolution).await?;
    if *resolution == Resolution::Drop {
        let children = crate::delegate::cancel_children(
            store,
            id,
            &format!("cancelled: its parent {id} was dropped by a human"),
        )
        .await;
        if children > 0 {
            tracing::warn!(task = %id, children, "the children a dropped task waited for were cancelled");
        }
    }
    Ok(())
}

/// What a cancel did.
#[derive(Debug, Serialize, Deserialize)]
pub struct Cancelled {
    /// The task.
    pub id: String,
    /// Children it waited for, cancelled with it.
    pub children: u64,
}

/// Cancels task `id` (queued, running or escalated) and the children it
/// waits for.
///
/// # Errors
/// [`QueueError::WrongState`] when the task already ended;
/// [`QueueError::NotFound`].
pub async fn cancel(store: &Store, id: &str, reason: &str) -> Result<Cancelled, QueueError> {
    if reason.is_empty() || reason.len() > 1000 {
        return Err(QueueError::Invalid(
            "the reason must be 1 to 1000 characters".into(),
        ));
    }
    if !store.queue().cancel(id, reason).await? {
        let state = store
            .queue()
            .get(id)
            .await?
            .ok_or_else(|| QueueError::NotFound { id: id.to_string() })?
            .state;
        return Err(QueueError::WrongState {
            id: id.to_string(),
            state,
            expected: &[TaskState::Queued, TaskState::Running, TaskState::Escalated],
            done: "cancelled",
        });
    }
    let children = crate::delegate::cancel_children(
        store,
        id,
        &format!("cancelled: its parent {id} was cancelled ({reason})"),
    )
    .await;
    tracing::warn!(task = %id, %reason, children, "task cancelled");
    Ok(Cancelled {
        id: id.to_string(),
        children,
    })
}

/// `POST /api/v1/tasks/{id}/cancel`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    /// Why (default "cancelled by an operator").
    #[serde(default)]
    pub reason: Option<String>,
}

async fn cancel_task(
    State(api): State<Arc<Api>>,
    Param(id): Param,
    body: Result<Json<CancelBody>, JsonRejection>,
) -> Answer<Cancelled> {
    let Json(body) = body?;
    let reason = body
        .reason
        .unwrap_or_else(|| "cancelled by an operator".into());
    Ok(Json(cancel(&api.store, &id, &reason).await?))
}

/// `GET /api/v1/chaos`: which faults this daemon can inject (an
/// experiment asks before it submits its load).
async fn chaos_info(State(api): State<Arc<Api>>) -> Answer<crate::chaos::Info> {
    Ok(Json(crate::chaos::Info {
        enabled: api.config.chaos.enabled,
        proxy: api.proxy.is_some(),
        agents: api.agents.iter().map(|agent| agent.name.clone()).collect(),
    }))
}

async fn chaos_last(State(api): State<Arc<Api>>) -> Answer<Vec<crate::experiment::LastRun>> {
    Ok(Json(
        crate::experiment::last_runs(&api.config, &api.store).await?,
    ))
}

async fn tree(State(api): State<Arc<Api>>, Param(id): Param) -> Answer<crate::delegate::Tree> {
    find(&api, &id).await?;
    Ok(Json(crate::delegate::tree(&api.store, &id).await?))
}

async fn rollback(
    State(api): State<Arc<Api>>,
    Param(id): Param,
) -> Answer<crate::rollback::Journal> {
    // Run apart from the request: a client that goes away (Ctrl-C, its
    // own timeout) must not cut a rollback off halfway, between a command
    // and the record of its outcome.
    let running = {
        let (api, id) = (api.clone(), id.clone());
        tokio::spawn(async move {
            let clock = api.clock.clone();
            crate::rollback::roll_back_task(
                &api.store,
                &api.config,
                &id,
                "flotilla rollback (API)",
                move || clock.now_ms(),
            )
            .await
        })
    };
    let journal = running
        .await
        .map_err(|error| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the rollback failed: {error}"),
            )
        })?
        .map_err(|error| match error {
            crate::rollback::RollbackError::NoJournal(_) => ApiError::not_found(error.to_string()),
            crate::rollback::RollbackError::UnknownAgent { .. } => {
                ApiError::bad_request(error.to_string())
            }
            crate::rollback::RollbackError::Busy { .. }
            | crate::rollback::RollbackError::Replaced(_) => {
                ApiError::new(StatusCode::CONFLICT, error.to_string())
            }
            crate::rollback::RollbackError::Store(error) => error.into(),
        })?;
    tracing::warn!(task = %id, failed = journal.failed().is_some(), "task rolled back through the API: {}", journal.summary());
    Ok(Json(journal))
}

/// Most live event followers at once.
const MAX_FOLLOWERS: usize = 32;

static FOLLOWERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts a follower while it is connected.
struct Follower;

impl Drop for Follower {
    fn drop(&mut self) {
        FOLLOWERS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// `GET /api/v1/events`: every event from now on, as Server-Sent Events
/// (`event:` its kind, `data:` its JSON); a follower that falls behind
/// misses events rather than holding anything up.
async fn events(
    State(api): State<Arc<Api>>,
) -> Result<
    axum::response::sse::Sse<
        impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
    ApiError,
> {
    let receiver = api.notifier.follow().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this daemon has no event feed",
        )
    })?;
    if FOLLOWERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= MAX_FOLLOWERS {
        FOLLOWERS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_FOLLOWERS} followers already; try again later"),
        ));
    }
    let stream = futures_util::stream::unfold(
        (receiver, Follower),
        |(mut receiver, follower)| async move {
            loop {
                match receiver.recv().await {
                    Ok(event) => {
                        let sse = axum::response::sse::Event::default()
                            .event(event.event.as_str())
                            .json_data(&event)
                            .unwrap_or_default();
                        return Some((Ok(sse), (receiver, follower)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Ok(axum::response::sse::Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default()))
}

/// `GET /ui`: the dashboard, one page embedded in the binary (no CDN, so
/// it works offline); its data come from this API.
pub async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("ui/index.html"))
}

/// Refuses faults while the daemon stops: a replica killed while it
/// drains would have its task charged as crashed instead of released.
fn not_stopping(api: &Api) -> Result<(), ApiError> {
    if api
        .agents
        .first()
        .is_some_and(|agent| agent.phase().borrow().stopping())
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "the daemon is stopping: no fault is injected while it drains",
        ));
    }
    Ok(())
}

/// The runtime of `name` on this daemon, when chaos is allowed.
fn chaos_target(api: &Api, name: &str) -> Result<Arc<crate::dispatch::AgentRuntime>, ApiError> {
    if !api.config.chaos.enabled {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "chaos actions are off on this daemon: set [chaos] enabled = true in its config (never on a fleet you cannot afford to hurt)",
        ));
    }
    not_stopping(api)?;
    api.agents
        .iter()
        .find(|agent| agent.name == name)
        .cloned()
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "agent {name:?} does not run on this daemon; its agents: {}",
                api.agents
                    .iter()
                    .map(|agent| agent.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

fn chaos_done(api: &Api, done: &crate::chaos::Done) {
    tracing::warn!(action = %done.action, agent = %done.agent, detail = %done.detail, "chaos");
    api.metrics.chaos_action(&done.agent, &done.action);
    api.notifier.send(
        crate::notify::Event::new(
            crate::notify::EventKind::Chaos,
            api.clock.now_ms(),
            false,
            format!(
                "chaos {} on agent {}: {}",
                done.action, done.agent, done.detail
            ),
        )
        .agent(&done.agent),
    );
}

async fn chaos_kill(
    State(api): State<Arc<Api>>,
    body: Result<Json<crate::chaos::KillRequest>, JsonRejection>,
) -> Answer<crate::chaos::Done> {
    let Json(request) = body?;
    let agent = chaos_target(&api, &request.agent)?;
    let done = crate::chaos::kill_replicas(&agent, &request).map_err(ApiError::bad_request)?;
    chaos_done(&api, &done);
    Ok(Json(done))
}

async fn chaos_pause(
    State(api): State<Arc<Api>>,
    body: Result<Json<crate::chaos::PauseRequest>, JsonRejection>,
) -> Answer<crate::chaos::Done> {
    let Json(request) = body?;
    let agent = chaos_target(&api, &request.agent)?;
    let done = crate::chaos::pause_replicas(&agent, &request).map_err(ApiError::bad_request)?;
    chaos_done(&api, &done);
    Ok(Json(done))
}

/// `POST /api/v1/chaos/partition` and `/latency`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultBody {
    /// How long (more than 0s, up to 1h).
    #[serde(rename = "for")]
    pub duration: String,
    /// `latency` only: the delay added to every chunk (up to 60s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add: Option<String>,
}

fn fault_proxy(api: &Api) -> Result<Arc<crate::fault_proxy::FaultProxy>, ApiError> {
    if !api.config.chaos.enabled {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "chaos actions are off on this daemon: set [chaos] enabled = true in its config",
        ));
    }
    not_stopping(api)?;
    api.proxy.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "this daemon reaches its broker directly: set [chaos] proxy = true (with a [broker]) to cut or slow the connection",
        )
    })
}

fn duration_of(
    text: &str,
    what: &str,
    max: std::time::Duration,
) -> Result<std::time::Duration, ApiError> {
    crate::config::HumanDuration::parse_within(text, what, max)
        .map(crate::config::HumanDuration::get)
        .map_err(ApiError::bad_request)
}

fn chaos_broker_done(api: &Api, action: &str, detail: String) -> crate::chaos::Done {
    let done = crate::chaos::Done {
        action: action.into(),
        agent: "-".into(),
        replicas: Vec::new(),
        detail,
    };
    tracing::warn!(action, detail = %done.detail, "chaos");
    api.metrics.chaos_action("-", action);
    api.notifier.send(crate::notify::Event::new(
        crate::notify::EventKind::Chaos,
        api.clock.now_ms(),
        false,
        format!("chaos {action}: {}", done.detail),
    ));
    done
}

async fn chaos_partition(
    State(api): State<Arc<Api>>,
    body: Result<Json<FaultBody>, JsonRejection>,
) -> Answer<crate::chaos::Done> {
    let Json(body) = body?;
    let proxy = fault_proxy(&api)?;
    let duration = duration_of(&body.duration, "for", crate::fault_proxy::MAX_FAULT)?;
    if body.add.is_some() {
        return Err(ApiError::bad_request("a partition has no `add`"));
    }
    proxy.partition(duration);
    let detail = format!(
        "broker connection cut for {}",
        humantime::format_duration(duration)
    );
    Ok(Json(chaos_broker_done(&api, "partition", detail)))
}

async fn chaos_latency(
    State(api): State<Arc<Api>>,
    body: Result<Json<FaultBody>, JsonRejection>,
) -> Answer<crate::chaos::Done> {
    let Json(body) = body?;
    let proxy = fault_proxy(&api)?;
    let duration = duration_of(&body.duration, "for", crate::fault_proxy::MAX_FAULT)?;
    let add = duration_of(
        body.add
            .as_deref()
            .ok_or_else(|| ApiError::bad_request("latency needs `add`, e.g. \"200ms\""))?,
        "add",
        crate::fault_proxy::MAX_ADD,
    )?;
    proxy.latency(add, duration);
    let detail = format!(
        "broker connection slowed by {} for {}",
        humantime::format_duration(add),
        humantime::format_duration(duration)
    );
    Ok(Json(chaos_broker_done(&api, "latency", detail)))
}

/// `POST /api/v1/chaos/stop`: ends every pause and broker fault now (the
/// operator's halt). Allowed with chaos off: it only ever ends faults.
/// With a body (`{"pids": [...], "broker": true}`), only those faults:
/// what a failed experiment injected itself.
async fn chaos_stop(
    State(api): State<Arc<Api>>,
    body: axum::body::Bytes,
) -> Answer<crate::chaos::Done> {
    let scope = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(
            serde_json::from_slice::<crate::chaos::StopRequest>(&body).map_err(|error| {
                ApiError::bad_request(format!(
                    "the body is not a stop request ({error}); send none to end every fault, or {{\"pids\": [PID, ...], \"broker\": true}}"
                ))
            })?,
        )
    };
    let resumed = crate::chaos::resume(
        &api.agents,
        scope.as_ref().map(|scope| scope.pids.as_slice()),
    );
    let healed = scope.as_ref().is_none_or(|scope| scope.broker)
        && api.proxy.as_ref().is_some_and(|proxy| proxy.heal());
    let mut ended = Vec::new();
    if !resumed.is_empty() {
        ended.push(format!("resumed {} paused replica(s)", resumed.len()));
    }
    if healed {
        ended.push("restored the broker connection".to_string());
    }
    let detail = if ended.is_empty() {
        "no fault was in force".to_string()
    } else {
        ended.join("; ")
    };
    let mut done = chaos_broker_done(&api, "stop", detail);
    done.replicas = resumed;
    Ok(Json(done))
}

/// `PUT /api/v1/degrade`: force `level` (0-3 or its name) for `for`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForceBody {
    /// The level: 0-3 or nominal, reduced, essential, emergency.
    pub level: Value,
    /// How long, e.g. `30m` (up to 7d).
    #[serde(rename = "for")]
    pub duration: String,
}

async fn force_level(
    State(api): State<Arc<Api>>,
    body: Result<Json<ForceBody>, JsonRejection>,
) -> Answer<Forced> {
    let Json(body) = body?;
    let level = match &body.level {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let forced =
        Forced::parse(&level, &body.duration, api.clock.now_ms()).map_err(ApiError::bad_request)?;
    api.store
        .put_control(
            crate::daemon::FORCED_LEVEL_KEY,
            &serde_json::to_value(forced).expect("serializes"),
        )
        .await?;
    tracing::warn!(level = %forced.level, "degradation level forced through the API");
    Ok(Json(forced))
}

async fn clear_level(State(api): State<Arc<Api>>) -> Answer<Value> {
    api.store
        .put_control(crate::daemon::FORCED_LEVEL_KEY, &Value::Null)
        .await?;
    tracing::info!("forced degradation level cleared through the API");
    Ok(Json(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cre", b"s3cret"));
        assert!(!same(b"s3crex", b"s3cret"));
        assert!(!same(b"", b"s3cret"));
    }

    #[test]
    fn refusals_are_logged_once_in_a_while_with_their_count() {
        let refusals = Refusals::default();
        let start = 5_000;
        assert_eq!(refusals.logged(start), Some(1));
        for n in 0..1000 {
            assert_eq!(refusals.logged(start + n), None);
        }
        // The period passed.
        let later = start + Refusals::EVERY_MS;
        assert_eq!(refusals.logged(later), Some(1001));
        assert_eq!(refusals.logged(later), None);
    }

    #[test]
    fn loopback_hosts_are_told_from_others() {
        for host in [
            "localhost",
            "LOCALHOST:9750",
            "127.0.0.1",
            "127.0.0.1:9750",
            "127.1.2.3:80",
            "[::1]:9750",
            "[::1]",
            "[::ffff:127.0.0.1]:9750",
        ] {
            assert!(loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:9750",
            "localhost.evil.example",
            "10.0.0.5:9750",
            "[::2]:9750",
            "",
            "?",
        ] {
            assert!(!loopback_host(host), "{host}");
        }
    }
}
