//! Where tasks and fleet state live: the embedded SQLite store (the
//! default) or a NATS JetStream broker (`[broker]`). The daemon and the CLI
//! go through [`Store`]; task operations through its [`TaskQueue`].

use std::sync::Arc;

use crate::clock::{SharedClock, UnixMillis};
use crate::config::Config;
use crate::queue::jetstream::{self, BrokerStatus, ConnectionStats, JetStreamQueue};
use crate::queue::sqlite::{Role, SqliteQueue};
use crate::queue::{QueueError, TaskQueue};
use crate::status::{DaemonSnapshot, SNAPSHOT_KEY};

/// An open store.
#[derive(Clone)]
pub enum Store {
    /// The embedded SQLite file.
    Embedded(Arc<SqliteQueue>),
    /// A JetStream broker shared by many daemons.
    Broker(Arc<JetStreamQueue>),
}

/// The largest operator setting the embedded store keeps.
pub const MAX_EMBEDDED_CONTROL_BYTES: usize = 16 * 1024 * 1024;

/// This machine's name, as a daemon name (letters, digits, `-`, `_`).
pub fn host_name() -> String {
    let raw = nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_default();
    let name: String = raw
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() {
        "flotilla".into()
    } else {
        name
    }
}

/// The daemon's name in the fleet: `[daemon] name`, else the host name.
pub fn daemon_name(config: &Config) -> String {
    config.daemon.name.clone().unwrap_or_else(host_name)
}

/// How old the counts a broker daemon's watchdog and metrics read may be.
pub const BROKER_COUNT_AGE: std::time::Duration = std::time::Duration::from_secs(25);

/// Records a broker's stream holds beyond which `status` without a
/// daemon's API shows the counts a live daemon took (see
/// [`SHARED_COUNTS_MAX_AGE_MS`]) rather than counting every record itself
/// (about 7.5 µs a record).
pub const SHARED_COUNTS_ABOVE: u64 = 50_000;

/// How long before a daemon's snapshot its shared count may have been
/// taken for `status` to show it (the snapshot itself is at most a few
/// `status_interval`s old).
///
/// A daemon counts every 30 s (and whenever its API is asked for status).
pub const SHARED_COUNTS_MAX_AGE_MS: crate::clock::UnixMillis = 60_000;

impl Store {
    /// A client of a fresh embedded store in `dir`, for unit tests.
    #[cfg(test)]
    pub(crate) fn embedded_in(dir: &std::path::Path) -> Self {
        Self::Embedded(Arc::new(
            SqliteQueue::open(
                &dir.join("q.db"),
                crate::queue::sqlite::Settings::from_config(
                    &crate::config::StoreConfig::default(),
                    Role::Client,
                ),
                crate::clock::system(),
            )
            .unwrap(),
        ))
    }

    /// Opens the store of `config`: the broker when `[broker]` is set,
    /// else the embedded file. `owner` names the daemon (or client).
    ///
    /// # Errors
    /// When the file cannot be opened or the broker reached.
    pub async fn open(
        config: &Config,
        role: Role,
        clock: SharedClock,
        owner: &str,
    ) -> Result<Self, QueueError> {
        match &config.broker {
            None => {
                let settings = crate::queue::sqlite::Settings::from_config(&config.store, role);
                Ok(Self::Embedded(Arc::new(SqliteQueue::open(
                    &config.store_path(),
                    settings,
                    clock,
                )?)))
            }
            Some(broker) => {
                let stats = Arc::new(ConnectionStats::default());
                let client =
                    jetstream::connect(broker, &config.base_dir, owner, stats.clone()).await?;
                let settings = jetstream::Settings {
                    limits: crate::queue::Limits::from_config(&config.store),
                    owner: owner.to_string(),
                };
                let queue = JetStreamQueue::open(client, stats, broker, settings, clock).await?;
                Ok(Self::Broker(Arc::new(queue)))
            }
        }
    }

    /// Task counts per agent for periodic readers (the watchdog, the
    /// metrics): on a broker, taken at most [`BROKER_COUNT_AGE`] ago and
    /// shared; on the embedded store,
    /// counted now, without the completed tasks (left at 0: counting them
    /// would read every task the retention keeps).
    ///
    /// # Errors
    /// As [`TaskQueue::counts`].
    pub async fn periodic_counts(
        &self,
    ) -> Result<Vec<(String, crate::queue::StateCounts)>, crate::queue::QueueError> {
        match self {
            Self::Embedded(queue) => queue.counts_without_completed().await,
            Self::Broker(queue) => queue.recent_counts(BROKER_COUNT_AGE).await,
        }
    }

    /// The counts this daemon's periodic readers took last, to share in
    /// its snapshot: on a broker only (elsewhere counting is cheap).
    pub fn shared_counts(&self) -> Option<crate::status::SharedCounts> {
        match self {
            Self::Embedded(_) => None,
            Self::Broker(queue) => {
                let (taken_ms, counts) = queue.last_counts()?;
                Some(crate::status::SharedCounts {
                    taken_ms,
                    agents: counts.into_iter().collect(),
                })
            }
        }
    }

    /// Whether `status` should show a daemon's shared counts rather than
    /// count itself: on a broker holding more than
    /// [`SHARED_COUNTS_ABOVE`] records.
    ///
    /// # Errors
    /// When the broker cannot be asked.
    pub async fn counting_is_slow(&self) -> Result<bool, QueueError> {
        match self {
            Self::Embedded(_) => Ok(false),
            Self::Broker(queue) => Ok(queue.records_held().await? > SHARED_COUNTS_ABOVE),
        }
    }

    /// The task queue.
    pub fn queue(&self) -> Arc<dyn TaskQueue> {
        match self {
            Self::Embedded(queue) => queue.clone(),
            Self::Broker(queue) => queue.clone(),
        }
    }

    /// Where the tasks are, for humans: the file or the broker URL.
    pub fn describe(config: &Config) -> String {
        match &config.broker {
            None => config.store_path().display().to_string(),
            Some(broker) => format!(
                "{} (namespace {})",
                crate::config::redact_urls(&broker.url),
                broker.namespace
            ),
        }
    }

    /// The broker connection, when there is a broker.
    pub fn broker_status(&self) -> Option<BrokerStatus> {
        match self {
            Self::Embedded(_) => None,
            Self::Broker(queue) => Some(queue.broker_status()),
        }
    }

    /// Why the store cannot go on, if it cannot (a failed fsync).
    pub fn fatal(&self) -> Option<String> {
        match self {
            Self::Embedded(queue) if queue.is_poisoned() => Some(format!(
                "the store {} failed to fsync and refuses writes; the daemon must restart",
                queue.path().display()
            )),
            _ => None,
        }
    }

    /// Stores the snapshot of daemon `snapshot.name`.
    ///
    /// # Errors
    /// When the store refuses the write.
    pub async fn put_snapshot(&self, snapshot: &DaemonSnapshot) -> Result<(), QueueError> {
        let value = serde_json::to_value(snapshot).expect("snapshot serializes");
        match self {
            Self::Embedded(queue) => queue.put_status(SNAPSHOT_KEY, &value).await,
            Self::Broker(queue) => queue.put_fleet(&snapshot.name, &value).await,
        }
    }

    /// The snapshots of every daemon known: the one of the embedded store,
    /// or each daemon in the broker's fleet table (dead ones expire).
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn snapshots(&self) -> Result<Vec<DaemonSnapshot>, QueueError> {
        match self {
            Self::Embedded(queue) => Ok(queue
                .get_status(SNAPSHOT_KEY)
                .await?
                .and_then(|(value, _)| serde_json::from_value(value).ok())
                .into_iter()
                .collect()),
            Self::Broker(queue) => Ok(queue
                .fleet()
                .await?
                .into_values()
                .filter_map(|value| serde_json::from_value(value).ok())
                .collect()),
        }
    }

    /// The snapshot of daemon `name`, if the store has one.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn snapshot_of(&self, name: &str) -> Result<Option<DaemonSnapshot>, QueueError> {
        match self {
            Self::Embedded(_) => Ok(self
                .snapshots()
                .await?
                .into_iter()
                .find(|snapshot| snapshot.name == name)),
            Self::Broker(queue) => Ok(queue
                .fleet_entry(name)
                .await?
                .and_then(|value| serde_json::from_value(value).ok())),
        }
    }

    /// Stores an operator's setting under `key`, seen by every daemon of
    /// the fleet; `null` clears it.
    ///
    /// # Errors
    /// When the store refuses the write.
    pub async fn put_control(
        &self,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<(), QueueError> {
        match self {
            Self::Embedded(queue) => {
                queue
                    .put_status_durably(&format!("control.{key}"), value)
                    .await
            }
            Self::Broker(queue) => queue.put_control(key, value).await,
        }
    }

    /// Stores `value` under `key` only if the setting there now is
    /// `expected` (`None`: none, or `null`), atomically for every daemon
    /// and client of the store. Returns whether it was stored.
    ///
    /// # Errors
    /// When the store cannot be read or written.
    pub async fn compare_and_put_control(
        &self,
        key: &str,
        expected: Option<&serde_json::Value>,
        value: &serde_json::Value,
    ) -> Result<bool, QueueError> {
        match self {
            Self::Embedded(queue) => {
                queue
                    .compare_and_put_status(&format!("control.{key}"), expected, value)
                    .await
            }
            Self::Broker(queue) => queue.compare_and_put_control(key, expected, value).await,
        }
    }

    /// The largest value one operator setting (a rollback journal, a
    /// watch list) may take: on a broker, what its `max_payload` lets
    /// through; on the embedded store, a bound of its own.
    pub fn max_control_bytes(&self) -> usize {
        /// Room for the message's headers on a broker.
        const HEADERS: usize = 4096;
        match self {
            Self::Embedded(_) => MAX_EMBEDDED_CONTROL_BYTES,
            Self::Broker(queue) => queue.max_message_bytes().saturating_sub(HEADERS),
        }
    }

    /// The operator's setting under `key`, if any.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn get_control(&self, key: &str) -> Result<Option<serde_json::Value>, QueueError> {
        match self {
            Self::Embedded(queue) => Ok(queue
                .get_status(&format!("control.{key}"))
                .await?
                .map(|(value, _)| value)
                .filter(|value| !value.is_null())),
            Self::Broker(queue) => queue.get_control(key).await,
        }
    }

    /// Nodes of the broker cluster that are current for the task stream
    /// (`None` without a broker, or when the broker cannot be asked).
    pub async fn broker_nodes(&self) -> Option<u32> {
        match self {
            Self::Embedded(_) => None,
            Self::Broker(queue) => queue.current_nodes().await.ok(),
        }
    }

    /// Deletes completed tasks past the retention. Returns how many.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn prune(&self) -> Result<u64, QueueError> {
        match self {
            Self::Embedded(queue) => queue.prune().await,
            Self::Broker(queue) => queue.prune().await,
        }
    }
}

/// Whether a snapshot taken at `taken_ms` still describes a live daemon:
/// taken within the bound its writer gave (from the writer's own
/// `status_interval`), else within `fresh_within` (the reader's, for a
/// snapshot of an older daemon).
pub fn is_fresh(snapshot: &DaemonSnapshot, now: UnixMillis, fresh_within: UnixMillis) -> bool {
    let within = snapshot.fresh_for_ms.unwrap_or(fresh_within);
    snapshot.running && now.saturating_sub(snapshot.taken_ms) <= within
}

/// How old a daemon's snapshot may be while the daemon still counts as
/// running: three of its `status_interval`s and 2 s for clocks that
/// disagree a little.
pub fn fresh_within(config: &crate::config::Config) -> UnixMillis {
    u64::try_from(
        (config.daemon.status_interval.get() * 3 + std::time::Duration::from_secs(2)).as_millis(),
    )
    .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon that writes its snapshot every 10 s is alive to a reader
    /// that writes its own every second: the writer's bound counts.
    #[test]
    fn a_snapshot_is_fresh_by_its_writers_bound() {
        let snapshot = |fresh_for_ms| DaemonSnapshot {
            name: "a".into(),
            host: "h".into(),
            pid: 1,
            version: "0".into(),
            started_ms: 0,
            taken_ms: 100_000,
            running: true,
            fresh_for_ms,
            agents: Vec::new(),
            broker: None,
            degradation: Default::default(),
            http: None,
            counts: None,
        };
        let reader = 5_000;
        assert!(is_fresh(&snapshot(Some(32_000)), 120_000, reader));
        assert!(!is_fresh(&snapshot(Some(32_000)), 133_000, reader));
        // An older daemon's snapshot: the reader's bound.
        assert!(!is_fresh(&snapshot(None), 120_000, reader));
        assert!(is_fresh(&snapshot(None), 104_000, reader));
    }
}
