//! A client of the daemon's API (`flotilla --api URL ...`): for operators
//! who reach a daemon over the network but not its store (a pod, another
//! machine).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{ErrorBody, ResolveBody, SelectionBody, SubmitBody};
use crate::degrade::Forced;
use crate::queue::{ListFilter, SubmitReceipt, TaskRecord, TaskState};
use crate::status::StatusReport;

/// Longest wait for one answer.
const TIMEOUT: Duration = Duration::from_secs(60);

/// How long the event stream may stay silent: the daemon sends a
/// keep-alive every 15 s.
pub const EVENTS_SILENCE: Duration = Duration::from_secs(45);

/// The largest event block accepted from the event stream.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// The event in one Server-Sent Events block (its `data:` lines), if it
/// is a flotilla event; keep-alives and other blocks give `None`.
fn sse_event(block: &[u8]) -> Option<crate::notify::Event> {
    let text = std::str::from_utf8(block).ok()?;
    let data: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(str::trim_start)
        .collect();
    if data.is_empty() {
        return None;
    }
    serde_json::from_str(&data.join("\n")).ok()
}
/// Longest wait for a rollback (its commands run while the call waits).
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(3600);

/// What went wrong talking to the API.
#[derive(Debug)]
pub enum ClientError {
    /// The daemon refused the call as invalid (4xx other than 401/403):
    /// the status and its message.
    Refused(StatusCode, String),
    /// The call did nothing: no daemon was reached, or it refused the
    /// call as not authorized.
    Unreached(String),
    /// Anything else: a server error, an answer lost.
    Failed(String),
}

impl ClientError {
    /// What it says.
    pub fn message(&self) -> &str {
        match self {
            Self::Refused(_, message) | Self::Unreached(message) | Self::Failed(message) => message,
        }
    }
}

/// A daemon's API at one base URL.
#[derive(Clone)]
pub struct ApiClient {
    base: reqwest::Url,
    token: Option<String>,
    http: reqwest::Client,
}

impl ApiClient {
    /// A client of the API at `base` (e.g. `http://127.0.0.1:9750`).
    ///
    /// # Errors
    /// When `base` is not an `http://` or `https://` URL.
    pub fn new(base: &str, token: Option<String>) -> Result<Self, String> {
        let parsed = reqwest::Url::parse(base)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && url.has_host())
            .ok_or_else(|| {
                format!("--api {base:?} is not an http:// or https:// URL; e.g. --api http://127.0.0.1:9750")
            })?;
        let http = reqwest::Client::builder()
            .build()
            .map_err(|error| format!("the HTTP client could not be built: {error}"))?;
        Ok(Self {
            base: parsed,
            token,
            http,
        })
    }

    /// The API's base URL.
    pub fn base(&self) -> &str {
        self.base.as_str()
    }

    /// Whether the token would cross a network unencrypted: plain
    /// `http://` to an address other than this machine's loopback (the
    /// daemon serves plain HTTP; across machines, put TLS in front of it).
    pub fn sends_token_in_clear(&self) -> bool {
        let host = self.base.host_str().unwrap_or("localhost");
        let loopback = crate::api::loopback_host(host);
        self.token.is_some() && self.base.scheme() == "http" && !loopback
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&(impl Serialize + Sync)>,
    ) -> Result<T, ClientError> {
        self.call_with(method, path, query, body, TIMEOUT).await
    }

    async fn call_with<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&(impl Serialize + Sync)>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let url = self
            .base
            .join(path)
            .map_err(|error| ClientError::Failed(format!("{path}: {error}")))?;
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .query(query)
            .timeout(timeout);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            let bytes = serde_json::to_vec(body)
                .map_err(|error| ClientError::Failed(format!("{path}: {error}")))?;
            // Refused here rather than by the daemon after the upload.
            if bytes.len() > crate::api::MAX_BODY_BYTES {
                return Err(ClientError::Refused(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the request is {} bytes, over the {} a daemon takes; split it (a batch: into several submits)",
                        bytes.len(),
                        crate::api::MAX_BODY_BYTES
                    ),
                ));
            }
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bytes);
        }
        let response = request.send().await.map_err(|error| {
            if error.is_connect() {
                ClientError::Unreached(format!(
                    "{method} {url}: the daemon did not answer: {error}"
                ))
            } else if error.is_timeout() && method != Method::GET {
                // The call reached the daemon, which may still carry it
                // out (a rollback's commands) or have done so.
                ClientError::Failed(format!(
                    "{method} {url}: no answer within {}; the daemon may still be carrying it out, or have done so: look before trying again (a rollback goes on by itself: `flotilla rollback ID` shows its journal)",
                    humantime::format_duration(timeout)
                ))
            } else {
                ClientError::Failed(format!(
                    "{method} {url}: the daemon did not answer: {error}"
                ))
            }
        })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|error| {
            ClientError::Failed(format!("{method} {url}: the answer broke off: {error}"))
        })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|error| {
                ClientError::Failed(format!(
                    "{method} {url}: unexpected answer ({error}); is this a flotilla daemon of the same version?"
                ))
            });
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes).map_or_else(
            |_| String::from_utf8_lossy(&bytes).chars().take(500).collect(),
            |body| body.error,
        );
        let message = match status {
            StatusCode::UNAUTHORIZED if self.token.is_none() => {
                format!("{message} (give the token in FLOTILLA_HTTP_TOKEN or --token-file)")
            }
            _ => message,
        };
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            Err(ClientError::Unreached(format!(
                "the daemon answered {status}: {message}"
            )))
        } else if status.is_client_error() {
            Err(ClientError::Refused(status, message))
        } else {
            Err(ClientError::Failed(format!(
                "the daemon answered {status}: {message}"
            )))
        }
    }

    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ClientError> {
        self.call(Method::GET, path, query, None::<&()>).await
    }

    /// Follows the daemon's live events (`GET /api/v1/events`, Server-Sent
    /// Events): calls `connected` once the daemon accepted (from then on no
    /// event is missed), then `each` for every event, until the stream
    /// ends (`Ok`) or breaks. A stream silent for longer than [`EVENTS_SILENCE`] (the
    /// daemon sends a keep-alive every 15 s) counts as broken; so does an
    /// event block over [`MAX_EVENT_BYTES`].
    ///
    /// # Errors
    /// When the daemon does not answer, refuses (a wrong token), or the
    /// stream breaks.
    pub async fn follow_events(
        &self,
        connected: impl FnOnce(),
        mut each: impl FnMut(crate::notify::Event),
    ) -> Result<(), ClientError> {
        let url = self
            .base
            .join("/api/v1/events")
            .map_err(|error| ClientError::Failed(format!("/api/v1/events: {error}")))?;
        let mut request = self.http.get(url.clone());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let mut response = tokio::time::timeout(EVENTS_SILENCE, request.send())
            .await
            .map_err(|_| {
                ClientError::Failed(format!("GET {url}: no answer in {EVENTS_SILENCE:?}"))
            })?
            .map_err(|error| {
                ClientError::Failed(format!("GET {url}: the daemon did not answer: {error}"))
            })?;
        if !response.status().is_success() {
            return Err(ClientError::Failed(format!(
                "GET {url}: the daemon answered {}",
                response.status()
            )));
        }
        connected();
        let mut buffer: Vec<u8> = Vec::new();
        loop {
            let chunk = tokio::time::timeout(EVENTS_SILENCE, response.chunk())
                .await
                .map_err(|_| {
                    ClientError::Failed(format!("GET {url}: silent for {EVENTS_SILENCE:?}"))
                })?
                .map_err(|error| {
                    ClientError::Failed(format!("GET {url}: the stream broke: {error}"))
                })?;
            let Some(chunk) = chunk else {
                return Ok(());
            };
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.windows(2).position(|pair| pair == b"\n\n") {
                let block: Vec<u8> = buffer.drain(..end + 2).collect();
                if let Some(event) = sse_event(&block) {
                    each(event);
                }
            }
            if buffer.len() > MAX_EVENT_BYTES {
                return Err(ClientError::Failed(format!(
                    "GET {url}: an event over {MAX_EVENT_BYTES} bytes; is this a flotilla daemon?"
                )));
            }
        }
    }

    /// The fleet's status.
    pub async fn status(&self) -> Result<StatusReport, ClientError> {
        self.get("/api/v1/status", &[]).await
    }

    /// Tasks matching `filter`.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>, ClientError> {
        let (path, state) = match filter.state {
            Some(TaskState::DeadLettered) => ("/api/v1/dlq", None),
            Some(TaskState::Escalated) => ("/api/v1/escalations", None),
            state => ("/api/v1/tasks", state),
        };
        let mut query = vec![("limit", filter.limit.to_string())];
        if let Some(agent) = &filter.agent {
            query.push(("agent", agent.clone()));
        }
        if let Some(state) = state {
            query.push(("state", state.to_string()));
        }
        self.get(path, &query).await
    }

    /// One task, or `None`.
    pub async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>, ClientError> {
        let path = format!("/api/v1/tasks/{}", encode(id));
        match self.get(&path, &[]).await {
            Ok(task) => Ok(Some(task)),
            Err(ClientError::Refused(StatusCode::NOT_FOUND, _)) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Submits tasks.
    pub async fn submit(&self, body: &SubmitBody) -> Result<Vec<SubmitReceipt>, ClientError> {
        // A batch of 100,000 tasks takes a broker tens of seconds: a
        // millisecond more per task, so that a slow store is not taken
        // for a failed submit (which a rerun would repeat).
        let tasks = body.tasks.as_ref().map_or(1, Vec::len);
        let timeout = TIMEOUT + Duration::from_millis(u64::try_from(tasks).unwrap_or(u64::MAX));
        self.call_with(Method::POST, "/api/v1/tasks", &[], Some(body), timeout)
            .await
    }

    /// Replays (`purge` false) or purges dead letters; returns how many.
    pub async fn dead_letters(
        &self,
        purge: bool,
        selection: &SelectionBody,
    ) -> Result<u64, ClientError> {
        let path = if purge {
            "/api/v1/dlq/purge"
        } else {
            "/api/v1/dlq/replay"
        };
        let count: crate::api::Count = self.call(Method::POST, path, &[], Some(selection)).await?;
        Ok(count.count)
    }

    /// Kills replicas (chaos).
    pub async fn chaos_kill(
        &self,
        request: &crate::chaos::KillRequest,
    ) -> Result<crate::chaos::Done, ClientError> {
        self.call(Method::POST, "/api/v1/chaos/kill", &[], Some(request))
            .await
    }

    /// Which faults the daemon can inject.
    pub async fn chaos_info(&self) -> Result<crate::chaos::Info, ClientError> {
        self.get("/api/v1/chaos", &[]).await
    }

    /// Pauses replicas (chaos).
    pub async fn chaos_pause(
        &self,
        request: &crate::chaos::PauseRequest,
    ) -> Result<crate::chaos::Done, ClientError> {
        self.call(Method::POST, "/api/v1/chaos/pause", &[], Some(request))
            .await
    }

    /// Cuts (`add` none) or slows the daemon's broker connection (chaos).
    pub async fn chaos_broker(
        &self,
        duration: &str,
        add: Option<&str>,
    ) -> Result<crate::chaos::Done, ClientError> {
        let body = crate::api::FaultBody {
            duration: duration.to_string(),
            add: add.map(str::to_string),
        };
        let path = if add.is_some() {
            "/api/v1/chaos/latency"
        } else {
            "/api/v1/chaos/partition"
        };
        self.call(Method::POST, path, &[], Some(&body)).await
    }

    /// Ends pauses and the broker fault now (chaos): every one, or those
    /// of `scope`.
    pub async fn chaos_stop(
        &self,
        scope: Option<&crate::chaos::StopRequest>,
    ) -> Result<crate::chaos::Done, ClientError> {
        self.call(Method::POST, "/api/v1/chaos/stop", &[], scope)
            .await
    }

    /// Cancels task `id`.
    pub async fn cancel(
        &self,
        id: &str,
        reason: &str,
    ) -> Result<crate::api::Cancelled, ClientError> {
        let body = crate::api::CancelBody {
            reason: Some(reason.to_string()),
        };
        self.call(
            Method::POST,
            &format!("/api/v1/tasks/{}/cancel", encode(id)),
            &[],
            Some(&body),
        )
        .await
    }

    /// The last report of each scheduled chaos experiment.
    pub async fn chaos_last(&self) -> Result<Vec<crate::experiment::LastRun>, ClientError> {
        self.get("/api/v1/chaos/last", &[]).await
    }

    /// Task `id`'s place in its delegation tree.
    pub async fn tree(&self, id: &str) -> Result<crate::delegate::Tree, ClientError> {
        self.get(&format!("/api/v1/tasks/{}/tree", encode(id)), &[])
            .await
    }

    /// Rolls back the changes task `id` declared.
    pub async fn rollback(&self, id: &str) -> Result<crate::rollback::Journal, ClientError> {
        let path = format!("/api/v1/tasks/{}/rollback", encode(id));
        self.call_with(Method::POST, &path, &[], None::<&()>, ROLLBACK_TIMEOUT)
            .await
    }

    /// Resolves an escalated task.
    pub async fn resolve(&self, id: &str, body: &ResolveBody) -> Result<TaskRecord, ClientError> {
        let path = format!("/api/v1/escalations/{}/resolve", encode(id));
        self.call(Method::POST, &path, &[], Some(body)).await
    }

    /// Forces a degradation level (`Some((level, duration))`) or clears it.
    pub async fn degrade(
        &self,
        force: Option<(&str, &str)>,
    ) -> Result<Option<Forced>, ClientError> {
        match force {
            Some((level, duration)) => {
                let body = crate::api::ForceBody {
                    level: serde_json::Value::String(level.to_string()),
                    duration: duration.to_string(),
                };
                self.call(Method::PUT, "/api/v1/degrade", &[], Some(&body))
                    .await
                    .map(Some)
            }
            None => {
                let _: serde_json::Value = self
                    .call(Method::DELETE, "/api/v1/degrade", &[], None::<&()>)
                    .await?;
                Ok(None)
            }
        }
    }
}

/// `id` as one path segment (task ids are letters, digits and `-_.:`, but
/// a user may type anything).
fn encode(id: &str) -> String {
    id.bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
                (byte as char).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call the daemon took but does not answer in time may have been
    /// carried out: the error says to look before trying again.
    #[tokio::test]
    async fn a_call_unanswered_in_time_may_have_been_carried_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(socket);
        });
        let client = ApiClient::new(&format!("http://{address}"), None).unwrap();
        let error = client
            .call_with::<serde_json::Value>(
                Method::POST,
                "/api/v1/tasks/t/rollback",
                &[],
                None::<&()>,
                Duration::from_millis(300),
            )
            .await
            .unwrap_err();
        let ClientError::Failed(message) = error else {
            panic!("{error:?}");
        };
        assert!(
            message.contains("no answer within 300ms")
                && message.contains("may still be carrying it out"),
            "{message}"
        );
        held.abort();
    }

    #[test]
    fn event_blocks_are_read_and_everything_else_is_skipped() {
        let event = sse_event(
            b"event: chaos\ndata: {\"event\":\"chaos\",\"at_ms\":5,\"daemon\":\"d\",\"urgent\":false,\"text\":\"chaos kill\"}\n\n",
        )
        .expect("an event");
        assert_eq!(event.event, crate::notify::EventKind::Chaos);
        assert_eq!((event.at_ms, event.text.as_str()), (5, "chaos kill"));
        // A keep-alive comment, a block without data, data that is not an
        // event, bytes that are not UTF-8.
        for block in [
            &b":\n\n"[..],
            b"event: x\n\n",
            b"data: [1, 2]\n\n",
            b"data: \xff\n\n",
        ] {
            assert!(sse_event(block).is_none(), "{block:?}");
        }
    }

    #[test]
    fn a_token_in_clear_across_a_network_is_noticed() {
        let token = || Some("secret".to_string());
        for (base, token, clear) in [
            ("http://10.0.0.5:9750", token(), true),
            ("http://flotilla.example.com:9750", token(), true),
            ("http://10.0.0.5:9750", None, false),
            ("https://flotilla.example.com", token(), false),
            ("http://127.0.0.1:9750", token(), false),
            ("http://localhost:9750", token(), false),
            ("http://[::1]:9750", token(), false),
        ] {
            let client = ApiClient::new(base, token).unwrap();
            assert_eq!(client.sends_token_in_clear(), clear, "{base}");
        }
    }
}
