//! Agent-to-agent messages: a `send` from an agent working on a task
//! becomes a child task of that task, durable on either backend and routed
//! like any task (the target's breaker, fallback and degradation rules).
//!
//! **Crash-safe, duplicate-free.** The child's id derives from the
//! parent's id and the sender's `key`, so a parent retried after its
//! replica crashed re-sends onto the same children (the queue dedups them
//! by id), and a child that already ended answers at once from its stored
//! result: no child runs twice because its parent was retried.
//!
//! **Links.** Each child's link to its parent (depth, sender, the agents
//! waiting up the chain) and each parent's list of children are kept in
//! the store's control entries, so `flotilla tasks show` draws the tree
//! from any daemon or CLI.
//!
//! **Waiting.** A waiting send starts a waiter that follows the child
//! (every [`POLL`]) until it ends or the send's timeout passes, keeps the
//! parent's lease alive meanwhile, and hands the `reply` to the parent's
//! replica.
//!
//! **Limits.** `[delegation] max_fan_out` children per task, `max_depth`
//! levels, `max_wait` per wait; a waiting send to an agent that is itself
//! waiting further up the chain is refused (it could wait on itself).

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::clock::UnixMillis;
use crate::protocol::{ReplyStatus, ToAgent};
use crate::queue::{MAX_TASK_ID_BYTES, NewTask, Priority, TaskState};
use crate::store::Store;

/// How often a waiter looks at its child.
pub const POLL: Duration = Duration::from_millis(200);
/// Longest a `send`'s key.
const MAX_KEY: usize = 64;

/// A child task's link to its parent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Link {
    /// The parent task.
    pub parent: String,
    /// The agent that sent it.
    pub from: String,
    /// The send's key.
    pub key: String,
    /// Levels below the root (its children are one deeper).
    pub depth: u32,
    /// Whether the sender waits for it.
    pub wait: bool,
    /// The agents waiting up the chain, the sender first when it waits.
    pub waiting: Vec<String>,
    /// When it was first sent.
    pub sent_ms: UnixMillis,
}

/// A task's place in its tree, for `tasks show`: its parent, and the
/// tree of tasks below it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Tree {
    /// Its link to its parent, if it is a child.
    pub parent: Option<Link>,
    /// The parent's state, if it is a child and the parent still exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_state: Option<TaskState>,
    /// Its children, in the order sent, with their states and their own
    /// children.
    pub children: Vec<Child>,
    /// Tasks below it left out, at least (their own children are not
    /// counted): a tree is shown up to [`MAX_TREE_NODES`] tasks, level by
    /// level.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted: u64,
}

/// One child in a [`Tree`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Child {
    /// Its task id.
    pub id: String,
    /// Its agent.
    pub agent: String,
    /// Its state, if it still exists.
    pub state: Option<TaskState>,
    /// Whether its sender waits for it.
    pub wait: bool,
    /// Its own children.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Child>,
}

/// Most tasks one [`Tree`] lists below its task.
pub const MAX_TREE_NODES: usize = 200;

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's signature
fn is_zero(count: &u64) -> bool {
    *count == 0
}

fn link_key(task: &str) -> String {
    format!("link.{task}")
}

fn children_key(task: &str) -> String {
    format!("children.{task}")
}

/// FNV-1a, 64 bits: stable across versions and machines (unlike std's
/// hasher), for ids derived from ids.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The id of `parent`'s child sent with `key`: `PARENT/KEY`, or a hash of
/// the parent when that would be too long.
pub fn child_id(parent: &str, key: &str) -> String {
    let plain = format!("{parent}/{key}");
    if plain.len() <= MAX_TASK_ID_BYTES {
        return plain;
    }
    format!("d-{:016x}/{key}", fnv(parent))
}

/// What a send asks for.
#[derive(Debug, Clone)]
pub struct Send {
    /// The parent task.
    pub parent: String,
    /// Its priority (the child's, unless the send gives one).
    pub parent_priority: Priority,
    /// The sending agent.
    pub from: String,
    /// The target agent.
    pub to: String,
    /// The key.
    pub key: String,
    /// The child's payload.
    pub payload: Value,
    /// The child's priority, if given.
    pub priority: Option<Priority>,
    /// Whether the sender waits.
    pub wait: bool,
    /// How long it waits.
    pub timeout: Option<Duration>,
}

/// A send that was carried out.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The child task.
    pub child: String,
    /// Whether it existed already (the parent was retried).
    pub existed: bool,
}

/// Checks and carries out `send`: submits the child (once, whatever the
/// retries) and records the links. `agents` are the fleet's agents.
///
/// # Errors
/// Why the send is refused, for the `reply`.
pub async fn send(
    store: &Store,
    limits: &crate::config::DelegationConfig,
    agents: &[String],
    send: &Send,
    now: UnixMillis,
) -> Result<Sent, String> {
    let key_ok = !send.key.is_empty()
        && send.key.len() <= MAX_KEY
        && send
            .key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && send.key != "."
        && send.key != "..";
    if !key_ok {
        return Err(format!(
            "key {:?} is not valid: use 1 to {MAX_KEY} letters, digits, '-', '_' or '.' (not '.' or '..' alone)",
            crate::protocol::excerpt(&send.key)
        ));
    }
    if !agents.contains(&send.to) {
        return Err(format!(
            "unknown agent {:?}; the fleet's agents: {}",
            send.to,
            agents.join(", ")
        ));
    }
    if send.wait {
        let Some(timeout) = send.timeout else {
            return Err("a send that waits needs timeout_ms".into());
        };
        if timeout.is_zero() || timeout > limits.max_wait.get() {
            return Err(format!(
                "timeout_ms {} is out of range; valid: 1 to {} (delegation.max_wait)",
                timeout.as_millis(),
                limits.max_wait.as_millis()
            ));
        }
    }
    let store_error = |error: crate::queue::QueueError| format!("the store failed: {error}");
    let parent_link = load_link(store, &send.parent).await.map_err(store_error)?;
    let depth = parent_link.as_ref().map_or(0, |link| link.depth) + 1;
    if depth > limits.max_depth {
        return Err(format!(
            "task {} is {} levels deep: its children would pass delegation.max_depth = {}",
            send.parent,
            depth - 1,
            limits.max_depth
        ));
    }
    let mut waiting = parent_link
        .as_ref()
        .filter(|link| link.wait)
        .map(|link| link.waiting.clone())
        .unwrap_or_default();
    if send.wait {
        if send.to == send.from || waiting.contains(&send.to) {
            let mut chain = vec![send.from.clone()];
            chain.extend(waiting.iter().cloned());
            return Err(format!(
                "cycle: {} would wait on {}, which is already waiting further up (waiting: {}); send without wait, or to another agent",
                send.from,
                send.to,
                chain.join(" ← ")
            ));
        }
        waiting.insert(0, send.from.clone());
    }
    let child = child_id(&send.parent, &send.key);
    let mut children = load_children(store, &send.parent)
        .await
        .map_err(store_error)?;
    let known = children.contains(&child);
    if !known && children.len() >= limits.max_fan_out as usize {
        return Err(format!(
            "task {} already sent {} children (delegation.max_fan_out = {})",
            send.parent,
            children.len(),
            limits.max_fan_out
        ));
    }
    if known {
        // Sent before (the parent was retried): never submitted again, so
        // it cannot run twice, even past the queue's dedup window. A
        // child pruned since answers `failed` (gone). One cancelled with
        // its parent (dead-lettered, then replayed: it runs again and
        // sends again) is replayed too, or its wait would answer `failed`
        // at once, every time.
        let cancelled_with_parent = |record: &crate::queue::TaskRecord| {
            record.state == TaskState::DeadLettered
                && record.reason.as_deref().is_some_and(|reason| {
                    reason.starts_with(&format!("cancelled: its parent {} was", send.parent))
                })
        };
        let running = |record: &crate::queue::TaskRecord| record.state == TaskState::Running;
        // Only for a parent that runs now (the sender): a stale holder of
        // a parent cancelled since must not bring its child back.
        if let (Ok(Some(record)), Ok(Some(parent))) = (
            store.queue().get(&child).await,
            store.queue().get(&send.parent).await,
        ) && cancelled_with_parent(&record)
            && running(&parent)
        {
            match store
                .queue()
                .replay(&crate::queue::Selection::Ids(vec![child.clone()]))
                .await
            {
                Ok(_) => {
                    tracing::info!(parent = %send.parent, %child, "replayed a child cancelled with its parent, which sent it again");
                    // The parent cancelled meanwhile: its child goes
                    // with it again (as for a new child, below).
                    let parent = store.queue().get(&send.parent).await;
                    if parent.is_ok_and(|parent| parent.is_none_or(|parent| !running(&parent))) {
                        let reason = format!(
                            "cancelled: its parent {} was cancelled while sending it",
                            send.parent
                        );
                        if let Err(error) = store.queue().cancel(&child, &reason).await {
                            tracing::warn!(%child, %error, "could not cancel the child of an ended parent");
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(parent = %send.parent, %child, %error, "could not replay a child cancelled with its parent");
                }
            }
        }
        return Ok(Sent {
            child,
            existed: true,
        });
    }
    // The child first, then its links: a crash in between leaves a child
    // without links, which the retried parent's send dedups onto (within
    // the queue's dedup window) and links then.
    let receipts = store
        .queue()
        .submit(vec![NewTask {
            id: child.clone(),
            agent: send.to.clone(),
            priority: send.priority.unwrap_or(send.parent_priority),
            payload: send.payload.clone(),
        }])
        .await
        .map_err(|error| format!("the child task was refused: {error}"))?;
    if receipts.first().is_some_and(|receipt| receipt.duplicate) {
        // The id was taken already. By this child, if the parent sent it
        // before and crashed before linking it (same agent, no link, or
        // a link to this parent); otherwise by an unrelated task someone
        // submitted under that id, which must not be taken for the child
        // (its result would answer the parent, and cancelling the parent
        // would cancel it).
        let record = store
            .queue()
            .get(&child)
            .await
            .map_err(|error| format!("the child task could not be checked: {error}"))?;
        let link = load_link(store, &child)
            .await
            .map_err(|error| format!("the child task could not be checked: {error}"))?;
        let ours = record.is_some_and(|record| record.agent == send.to)
            && link.is_none_or(|link| link.parent == send.parent);
        if !ours {
            return Err(format!(
                "task id {child:?} is taken by another task, not sent by {}: give this send another key",
                send.parent
            ));
        }
    }
    let link = Link {
        parent: send.parent.clone(),
        from: send.from.clone(),
        key: send.key.clone(),
        depth,
        wait: send.wait,
        waiting,
        sent_ms: now,
    };
    // The child is queued and will run: from here a store failure is not
    // a refusal (an agent told so might send the work again under another
    // key). The links are retried a few times; without them the child is
    // not cancelled with its parent, which the log says.
    if let Err(error) = link_child(store, &send.parent, &child, &link, &mut children).await {
        tracing::error!(parent = %send.parent, %child, %error, "the child task is sent, but could not be linked to its parent: it will not be cancelled with it");
    }
    // A parent cancelled or dead-lettered while its child was being
    // linked: its `cancel_children` may have read the children before
    // this one was listed. Whoever writes the list second sees the other:
    // the canceller reads it after ending the parent, this sender reads
    // the parent after writing it.
    if send.wait {
        // The child is sent: a failed read only skips the check.
        let parent = store.queue().get(&send.parent).await.unwrap_or_else(|error| {
            tracing::warn!(parent = %send.parent, %child, %error, "could not check the parent after sending its child");
            None
        });
        if parent.is_some_and(|parent| parent.state == TaskState::DeadLettered) {
            let reason = format!(
                "cancelled: its parent {} was dead-lettered while sending it",
                send.parent
            );
            if let Err(error) = store.queue().cancel(&child, &reason).await {
                tracing::warn!(%child, %error, "could not cancel the child of an ended parent");
            }
            return Err(format!(
                "the parent was cancelled or dead-lettered while sending; its child {child} is cancelled"
            ));
        }
    }
    Ok(Sent {
        child,
        existed: receipts.first().is_some_and(|receipt| receipt.duplicate),
    })
}

/// Tries of a link write before giving up.
const LINK_TRIES: u32 = 3;

/// Stores `child`'s link and adds it to `parent`'s children (by
/// compare-and-set: two holders of the parent, one stale, may send at
/// once on a broker, and neither child may drop out of the list).
async fn link_child(
    store: &Store,
    parent: &str,
    child: &str,
    link: &Link,
    children: &mut Vec<String>,
) -> Result<(), crate::queue::QueueError> {
    let link = serde_json::to_value(link).expect("serializes");
    let mut tries = 0;
    let mut linked = false;
    loop {
        tries += 1;
        let result = async {
            if !linked {
                store.put_control(&link_key(child), &link).await?;
                linked = true;
            }
            for _ in 0..16 {
                let stored = store.get_control(&children_key(parent)).await?;
                let mut list: Vec<String> = stored
                    .clone()
                    .and_then(|value| serde_json::from_value(value).ok())
                    .unwrap_or_default();
                if list.iter().any(|known| known == child) {
                    *children = list;
                    return Ok(());
                }
                list.push(child.to_string());
                let value = serde_json::to_value(&list).expect("serializes");
                if store
                    .compare_and_put_control(&children_key(parent), stored.as_ref(), &value)
                    .await?
                {
                    *children = list;
                    return Ok(());
                }
            }
            Err(crate::queue::QueueError::Storage(format!(
                "the children of {parent} kept changing under 16 tries"
            )))
        }
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(error) if tries >= LINK_TRIES => return Err(error),
            Err(error) => {
                tracing::warn!(%parent, %child, %error, "could not link a child task; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(tries))).await;
            }
        }
    }
}

async fn load_link(store: &Store, task: &str) -> Result<Option<Link>, crate::queue::QueueError> {
    Ok(store
        .get_control(&link_key(task))
        .await?
        .and_then(|value| serde_json::from_value(value).ok()))
}

async fn load_children(store: &Store, task: &str) -> Result<Vec<String>, crate::queue::QueueError> {
    Ok(store
        .get_control(&children_key(task))
        .await?
        .and_then(|value| serde_json::from_value(value).ok())
        .unwrap_or_default())
}

/// `task`'s place in its tree.
///
/// # Errors
/// When the store cannot be read.
pub async fn tree(store: &Store, task: &str) -> Result<Tree, crate::queue::QueueError> {
    let parent = load_link(store, task).await?;
    let parent_state = match &parent {
        Some(link) => store.queue().get(&link.parent).await?.map(|r| r.state),
        None => None,
    };
    // Breadth first: every child before any grandchild, so that one
    // large subtree cannot hide its siblings.
    struct Node {
        child: Child,
        below: Vec<usize>,
    }
    fn build(nodes: &[Node], slot: usize) -> Child {
        let mut child = nodes[slot].child.clone();
        child.children = nodes[slot]
            .below
            .iter()
            .map(|&below| build(nodes, below))
            .collect();
        child
    }
    let mut nodes: Vec<Node> = Vec::new();
    let mut top = Vec::new();
    let mut omitted = 0u64;
    let mut frontier =
        std::collections::VecDeque::from([(None::<usize>, task.to_string(), 0usize)]);
    while let Some((above, id, depth)) = frontier.pop_front() {
        let ids = load_children(store, &id).await?;
        for (index, child_id) in ids.iter().enumerate() {
            if nodes.len() >= MAX_TREE_NODES || depth >= MAX_TREE_DEPTH {
                omitted += (ids.len() - index) as u64;
                break;
            }
            let record = store.queue().get(child_id).await?;
            let wait = load_link(store, child_id)
                .await?
                .is_some_and(|link| link.wait);
            let slot = nodes.len();
            nodes.push(Node {
                child: Child {
                    agent: record.as_ref().map(|r| r.agent.clone()).unwrap_or_default(),
                    state: record.map(|r| r.state),
                    id: child_id.clone(),
                    wait,
                    children: Vec::new(),
                },
                below: Vec::new(),
            });
            match above {
                None => top.push(slot),
                Some(above) => nodes[above].below.push(slot),
            }
            frontier.push_back((Some(slot), child_id.clone(), depth + 1));
        }
    }
    Ok(Tree {
        parent,
        parent_state,
        children: top.iter().map(|&slot| build(&nodes, slot)).collect(),
        omitted,
    })
}

/// Deepest level a [`Tree`] descends to, whatever `max_depth` was when
/// the tree was sent.
const MAX_TREE_DEPTH: usize = 32;

/// Cancels the unfinished children `task` waited for (fire-and-forget
/// ones go on), and theirs in turn; returns how many were cancelled. A
/// running child's attempt ends `cancelled`; its replica learns it at its
/// next lease extension and is told to abandon the task.
pub async fn cancel_children(store: &Store, task: &str, reason: &str) -> u64 {
    let mut cancelled = 0;
    let mut parents = vec![task.to_string()];
    // Bounded: max_depth levels of max_fan_out children.
    while let Some(parent) = parents.pop() {
        let Ok(children) = load_children(store, &parent).await else {
            continue;
        };
        // Each level names its own parent: a replayed parent that sends
        // again replays the children cancelled with it (see `send`).
        let reason = if parent == task {
            reason.to_string()
        } else {
            format!("cancelled: its parent {parent} was cancelled with {task}")
        };
        for child in children {
            let waited = matches!(load_link(store, &child).await, Ok(Some(link)) if link.wait);
            if !waited {
                continue;
            }
            match store.queue().cancel(&child, &reason).await {
                Ok(true) => {
                    cancelled += 1;
                    parents.push(child);
                }
                Ok(false) | Err(crate::queue::QueueError::NotFound { .. }) => {}
                Err(error) => {
                    tracing::warn!(%child, %error, "could not cancel a child task");
                }
            }
        }
    }
    cancelled
}

/// Whether `task` must not run: it is a child its parent waited for, and
/// the parent is a dead letter (the parent's end should have cancelled
/// it, but a crash or a store error cut that short). Returns the parent;
/// `None` when the task may run, or when the store cannot tell.
pub async fn orphaned(store: &Store, task: &str) -> Option<String> {
    // Child ids hold a `/`: most other tasks cost no read.
    if !task.contains('/') {
        return None;
    }
    let link = load_link(store, task).await.ok()??;
    if !link.wait {
        return None;
    }
    let parent = store.queue().get(&link.parent).await.ok()??;
    (parent.state == TaskState::DeadLettered).then_some(link.parent)
}

/// The reason an orphaned child of `parent` is cancelled with.
pub fn orphan_reason(parent: &str) -> String {
    format!("cancelled: its parent {parent} was dead-lettered")
}

/// After the orphaned child `task` of `parent` was dead-lettered: its own
/// waited-for children go with it, unless the parent was replayed
/// meanwhile (it may have sent its key again and found the child still
/// running); then the child is replayed, as `send` would have done.
/// Returns how many children were cancelled.
pub async fn orphan_cancelled(store: &Store, task: &str, parent: &str) -> u64 {
    let replayed = matches!(
        store.queue().get(parent).await,
        Ok(Some(record)) if record.state != TaskState::DeadLettered
    );
    if replayed {
        match store
            .queue()
            .replay(&crate::queue::Selection::Ids(vec![task.to_string()]))
            .await
        {
            Ok(_) => {
                tracing::info!(%parent, child = %task, "the parent was replayed while its orphaned child was being cancelled: the child is replayed too")
            }
            Err(error) => {
                tracing::warn!(%parent, child = %task, %error, "could not replay a child whose parent was replayed while it was being cancelled")
            }
        }
        return 0;
    }
    cancel_children(store, task, &orphan_reason(task)).await
}

/// Handles the dead letter `task` of `agent`, whoever dead-lettered it (a
/// replica, or the queue while leasing): counts it and cancels the
/// children it waited for. Returns how many were cancelled.
pub async fn dead_lettered(
    store: &Store,
    metrics: &crate::metrics::Metrics,
    task: &str,
    agent: &str,
) -> u64 {
    metrics.dead_lettered(agent);
    cancel_children(
        store,
        task,
        &format!("cancelled: its parent {task} was dead-lettered"),
    )
    .await
}

/// What a waiter tells the parent's replica, for the parent's attempt
/// `attempt` (news of an earlier attempt is not the current one's).
#[derive(Debug)]
pub enum News {
    /// The child ended (or the wait timed out) `after` the send: write
    /// this reply.
    Reply {
        /// The reply.
        reply: ToAgent,
        /// How long after the send.
        after: Duration,
        /// The parent's attempt that waits.
        attempt: u32,
    },
    /// The child is still on its way: the parent is alive too.
    Alive {
        /// The parent task.
        parent: String,
        /// The parent's attempt that waits.
        attempt: u32,
    },
}

/// Follows `child` for attempt `attempt` of the parent `parent` until it
/// ends or `timeout` passes; tells the replica through `news` (and stops
/// when the replica is gone; the replica aborts it when the attempt
/// ends). `alive_every` is how often the parent's lease is renewed.
#[allow(clippy::too_many_arguments)]
pub async fn wait(
    store: Store,
    parent: String,
    attempt: u32,
    key: String,
    child: String,
    timeout: Duration,
    alive_every: Duration,
    news: mpsc::Sender<News>,
) {
    let started = tokio::time::Instant::now();
    let deadline = started + timeout;
    let mut alive_at = tokio::time::Instant::now() + alive_every;
    loop {
        if news.is_closed() {
            return;
        }
        let reply = match store.queue().get(&child).await {
            Ok(Some(task)) if task.state == TaskState::Completed => {
                Some((ReplyStatus::Completed, task.result.clone(), None))
            }
            Ok(Some(task)) if task.state == TaskState::DeadLettered => Some((
                ReplyStatus::Failed,
                None,
                Some(
                    task.reason
                        .clone()
                        .unwrap_or_else(|| "dead-lettered".into()),
                ),
            )),
            Ok(None) => Some((
                ReplyStatus::Failed,
                None,
                Some("the child task is gone (purged)".into()),
            )),
            // Still on its way (or the store failed for a moment).
            _ => None,
        };
        let reply = reply.or_else(|| {
            (tokio::time::Instant::now() >= deadline).then(|| {
                (
                    ReplyStatus::Timeout,
                    None,
                    Some(format!(
                        "no answer within timeout_ms = {}; the child task goes on",
                        timeout.as_millis()
                    )),
                )
            })
        });
        if let Some((status, result, error)) = reply {
            let reply = ToAgent::Reply {
                id: parent,
                key,
                task: Some(child),
                status,
                result,
                error,
            };
            let after = started.elapsed();
            let _ = news
                .send(News::Reply {
                    reply,
                    after,
                    attempt,
                })
                .await;
            return;
        }
        if tokio::time::Instant::now() >= alive_at {
            alive_at = tokio::time::Instant::now() + alive_every;
            let alive = News::Alive {
                parent: parent.clone(),
                attempt,
            };
            if news.send(alive).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(
            POLL.min(
                deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .max(Duration::from_millis(1)),
            ),
        )
        .await;
    }
}

/// The reply to a refused send.
pub fn refused(parent: &str, key: &str, why: String) -> ToAgent {
    ToAgent::Reply {
        id: parent.to_string(),
        key: key.to_string(),
        task: None,
        status: ReplyStatus::Refused,
        result: None,
        error: Some(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_to(to: &str, key: &str, wait: bool) -> Send {
        send_from("parent", "manager", to, key, wait)
    }

    fn send_from(parent: &str, from: &str, to: &str, key: &str, wait: bool) -> Send {
        Send {
            parent: parent.into(),
            parent_priority: Priority::Normal,
            from: from.into(),
            to: to.into(),
            key: key.into(),
            payload: serde_json::json!({}),
            priority: None,
            wait,
            timeout: wait.then_some(Duration::from_secs(60)),
        }
    }

    /// A fresh embedded store (in the directory returned with it) holding
    /// the root task `parent`.
    async fn with_root() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::embedded_in(dir.path());
        store
            .queue()
            .submit(vec![NewTask {
                id: "parent".into(),
                agent: "manager".into(),
                priority: Priority::Normal,
                payload: serde_json::json!({}),
            }])
            .await
            .unwrap();
        (dir, store)
    }

    /// [`with_root`], whose root sent `parent/w` (waited for) and
    /// `parent/f` (not) to `worker`.
    async fn with_two_children() -> (tempfile::TempDir, Store) {
        let (dir, store) = with_root().await;
        let limits = crate::config::DelegationConfig::default();
        for (key, wait) in [("w", true), ("f", false)] {
            try_send(&store, &limits, &send_to("worker", key, wait))
                .await
                .unwrap();
        }
        (dir, store)
    }

    /// Carries out `what` for a fleet of [`agents`].
    async fn try_send(
        store: &Store,
        limits: &crate::config::DelegationConfig,
        what: &Send,
    ) -> Result<Sent, String> {
        send(store, limits, &agents(), what, 1).await
    }

    fn agents() -> Vec<String> {
        ["manager", "worker", "reviewer"].map(String::from).to_vec()
    }

    /// A child id already taken by an unrelated task (submitted by hand
    /// as `parent/api`) is refused, not adopted; one the parent sent
    /// before and did not link (a crash) is linked.
    #[tokio::test]
    async fn a_child_id_taken_by_another_task_is_refused() {
        let (_dir, store) = with_root().await;
        let limits = crate::config::DelegationConfig::default();
        store
            .queue()
            .submit(vec![
                NewTask {
                    id: "parent/api".into(),
                    agent: "reviewer".into(),
                    priority: Priority::Normal,
                    payload: serde_json::json!({"theirs": true}),
                },
                NewTask {
                    id: "parent/unlinked".into(),
                    agent: "worker".into(),
                    priority: Priority::Normal,
                    payload: serde_json::json!({}),
                },
            ])
            .await
            .unwrap();
        let refused = try_send(&store, &limits, &send_to("worker", "api", true))
            .await
            .unwrap_err();
        assert!(refused.contains("is taken by another task"), "{refused}");
        assert_eq!(load_link(&store, "parent/api").await.unwrap(), None);
        let sent = try_send(&store, &limits, &send_to("worker", "unlinked", false))
            .await
            .unwrap();
        assert!(sent.existed);
        assert_eq!(
            load_link(&store, "parent/unlinked")
                .await
                .unwrap()
                .map(|link| link.parent),
            Some("parent".into())
        );
    }

    /// A parent escalated to a human and dropped cancels the children it
    /// waited for, as a cancelled one does.
    #[tokio::test]
    async fn a_dropped_escalated_parent_cancels_its_waited_children() {
        let (_dir, store) = with_two_children().await;
        let request = crate::queue::LeaseRequest {
            agent: "manager".into(),
            max: 1,
            lease_for: Duration::from_secs(30),
            owner: "test".into(),
            max_deliver: 3,
            lowest: Priority::Low,
        };
        let mut leases = store.queue().lease(&request, Duration::ZERO).await.unwrap();
        let end = crate::queue::AttemptEnd::new(
            crate::queue::AttemptOutcome::Escalated,
            None,
            "a human decides",
        );
        store
            .queue()
            .escalate(&leases[0].key, "a human decides", end)
            .await
            .unwrap();
        leases[0].settle();
        crate::api::resolve_escalation(&store, "parent", &crate::queue::Resolution::Drop)
            .await
            .unwrap();
        let state = |id: &'static str| {
            let store = store.clone();
            async move { store.queue().get(id).await.unwrap().unwrap().state }
        };
        assert_eq!(state("parent").await, TaskState::DeadLettered);
        assert_eq!(state("parent/w").await, TaskState::DeadLettered);
        assert_eq!(state("parent/f").await, TaskState::Queued, "not waited for");
    }

    #[tokio::test]
    async fn a_waited_child_of_a_dead_parent_is_orphaned() {
        let (_dir, store) = with_two_children().await;
        assert_eq!(orphaned(&store, "parent/w").await, None, "the parent lives");
        // The parent ends without its children being cancelled (a crash
        // cut that short).
        assert!(store.queue().cancel("parent", "gone").await.unwrap());
        assert_eq!(
            orphaned(&store, "parent/w").await.as_deref(),
            Some("parent")
        );
        assert_eq!(orphaned(&store, "parent/f").await, None, "not waited for");
        assert_eq!(orphaned(&store, "parent").await, None, "not a child");
    }

    #[tokio::test]
    async fn fan_out_and_depth_are_bounded() {
        let (_dir, store) = with_root().await;
        let limits = crate::config::DelegationConfig {
            max_fan_out: 2,
            max_depth: 2,
            ..Default::default()
        };
        for key in ["a", "b"] {
            try_send(&store, &limits, &send_to("worker", key, false))
                .await
                .unwrap();
        }
        let refused = try_send(&store, &limits, &send_to("worker", "c", false))
            .await
            .unwrap_err();
        assert!(
            refused.contains("already sent 2 children (delegation.max_fan_out = 2)"),
            "{refused}"
        );
        assert!(store.queue().get("parent/c").await.unwrap().is_none());
        // A child sent before is not a new one: a retried parent re-sends.
        let again = try_send(&store, &limits, &send_to("worker", "a", false))
            .await
            .unwrap();
        assert!(again.existed);

        // parent (root) → parent/a (depth 1) → parent/a/x (depth 2): the
        // tree may go no deeper.
        let child = send_from("parent/a", "worker", "reviewer", "x", false);
        let grandchild = try_send(&store, &limits, &child).await.unwrap();
        assert_eq!(grandchild.child, "parent/a/x");
        let deeper = send_from("parent/a/x", "reviewer", "worker", "y", false);
        let refused = try_send(&store, &limits, &deeper).await.unwrap_err();
        assert!(
            refused.contains("is 2 levels deep") && refused.contains("delegation.max_depth = 2"),
            "{refused}"
        );
        assert!(store.queue().get("parent/a/x/y").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_tree_shows_every_level_and_the_parents_state() {
        let (_dir, store) = with_root().await;
        let limits = crate::config::DelegationConfig::default();
        for send_it in [
            send_to("worker", "a", true),
            send_to("reviewer", "b", false),
            send_from("parent/a", "worker", "reviewer", "x", true),
        ] {
            try_send(&store, &limits, &send_it).await.unwrap();
        }
        let root = tree(&store, "parent").await.unwrap();
        assert_eq!(root.parent, None);
        assert_eq!(root.parent_state, None);
        let shape: Vec<(&str, usize)> = root
            .children
            .iter()
            .map(|child| (child.id.as_str(), child.children.len()))
            .collect();
        assert_eq!(shape, [("parent/a", 1), ("parent/b", 0)]);
        let grandchild = &root.children[0].children[0];
        assert_eq!(grandchild.id, "parent/a/x");
        assert_eq!(grandchild.agent, "reviewer");
        assert_eq!(grandchild.state, Some(TaskState::Queued));
        assert!(grandchild.wait);
        assert_eq!(root.omitted, 0);

        let middle = tree(&store, "parent/a").await.unwrap();
        assert_eq!(middle.parent.unwrap().parent, "parent");
        assert_eq!(middle.parent_state, Some(TaskState::Queued));
        assert_eq!(middle.children.len(), 1);
    }

    #[tokio::test]
    async fn a_large_tree_is_cut_level_by_level() {
        let (_dir, store) = with_root().await;
        let limits = crate::config::DelegationConfig::default();
        // 30 children; the first 8 send 30 each: 270 tasks below the root.
        for n in 0..30 {
            let key = format!("c{n}");
            try_send(&store, &limits, &send_to("worker", &key, false))
                .await
                .unwrap();
            if n < 8 {
                for m in 0..30 {
                    let child = format!("parent/{key}");
                    let grandchild =
                        send_from(&child, "worker", "reviewer", &format!("g{m}"), false);
                    try_send(&store, &limits, &grandchild).await.unwrap();
                }
            }
        }
        let root = tree(&store, "parent").await.unwrap();
        // Every child shows; the grandchildren fill the rest.
        assert_eq!(root.children.len(), 30);
        let shown: usize = 30
            + root
                .children
                .iter()
                .map(|c| c.children.len())
                .sum::<usize>();
        assert_eq!(shown, MAX_TREE_NODES);
        assert_eq!(root.omitted, 270 - MAX_TREE_NODES as u64);
    }

    #[tokio::test]
    async fn a_wait_that_would_close_a_cycle_is_refused() {
        let (_dir, store) = with_root().await;
        let limits = crate::config::DelegationConfig::default();
        // manager waits on worker, which waits on reviewer.
        try_send(&store, &limits, &send_to("worker", "w", true))
            .await
            .unwrap();
        let reviewer = send_from("parent/w", "worker", "reviewer", "r", true);
        try_send(&store, &limits, &reviewer).await.unwrap();
        // reviewer waiting on manager or worker would close the circle.
        for back in ["manager", "worker"] {
            let cycle = send_from("parent/w/r", "reviewer", back, "back", true);
            let refused = try_send(&store, &limits, &cycle).await.unwrap_err();
            assert!(
                refused.starts_with(&format!("cycle: reviewer would wait on {back}")),
                "{refused}"
            );
            assert!(refused.contains("reviewer ← worker ← manager"), "{refused}");
        }
        assert!(
            store
                .queue()
                .get("parent/w/r/back")
                .await
                .unwrap()
                .is_none()
        );
        // Without waiting, nothing can deadlock: a notification goes.
        let notice = send_from("parent/w/r", "reviewer", "manager", "note", false);
        try_send(&store, &limits, &notice).await.unwrap();
    }

    #[tokio::test]
    async fn a_wait_ends_with_a_timeout_reply_while_the_child_goes_on() {
        let (_dir, store) = with_root().await;
        let limits = crate::config::DelegationConfig::default();
        let sent = try_send(&store, &limits, &send_to("worker", "w", true))
            .await
            .unwrap();
        let (news, mut heard) = mpsc::channel(8);
        tokio::spawn(wait(
            store.clone(),
            "parent".into(),
            1,
            "w".into(),
            sent.child.clone(),
            Duration::from_millis(300),
            Duration::from_millis(50),
            news,
        ));
        let mut alive = 0;
        let reply = loop {
            match tokio::time::timeout(Duration::from_secs(10), heard.recv())
                .await
                .expect("news within 10 s")
                .expect("a reply before the waiter ends")
            {
                News::Alive { parent, attempt } => {
                    assert_eq!((parent.as_str(), attempt), ("parent", 1));
                    alive += 1;
                }
                News::Reply { reply, after, .. } => {
                    assert!(after >= Duration::from_millis(300), "{after:?}");
                    break reply;
                }
            }
        };
        assert!(alive >= 1, "the parent was kept alive while it waited");
        let ToAgent::Reply {
            id,
            key,
            task,
            status,
            error,
            ..
        } = reply
        else {
            panic!("not a reply: {reply:?}");
        };
        assert_eq!((id.as_str(), key.as_str()), ("parent", "w"));
        assert_eq!(task.as_deref(), Some("parent/w"));
        assert_eq!(status, ReplyStatus::Timeout);
        assert!(
            error.unwrap().contains("no answer within timeout_ms = 300"),
            "the reason"
        );
        let child = store.queue().get("parent/w").await.unwrap().unwrap();
        assert_eq!(child.state, TaskState::Queued, "the child goes on");
    }

    /// The parent is cancelled while its replica sends: the canceller
    /// found no child to cancel, so the sender cancels the one it sent.
    #[tokio::test]
    async fn a_child_sent_after_its_parent_ended_is_cancelled() {
        let (_dir, store) = with_root().await;
        let limits = crate::config::DelegationConfig::default();
        assert!(store.queue().cancel("parent", "not needed").await.unwrap());
        assert_eq!(cancel_children(&store, "parent", "not needed").await, 0);

        let refused = try_send(&store, &limits, &send_to("worker", "w", true))
            .await
            .unwrap_err();
        assert!(refused.contains("parent was cancelled"), "{refused}");
        let child = store.queue().get("parent/w").await.unwrap().unwrap();
        assert_eq!(child.state, TaskState::DeadLettered, "{child:?}");

        // A fire-and-forget child goes on whatever its parent does.
        let sent = try_send(&store, &limits, &send_to("worker", "n", false))
            .await
            .unwrap();
        let child = store.queue().get(&sent.child).await.unwrap().unwrap();
        assert_eq!(child.state, TaskState::Queued, "{child:?}");
    }

    #[tokio::test]
    async fn a_replayed_parent_sending_again_replays_its_cancelled_child() {
        let (_dir, store) = with_root().await;
        let limits = crate::config::DelegationConfig::default();
        let sent = try_send(&store, &limits, &send_to("worker", "w", true))
            .await
            .unwrap();
        // The parent is dead-lettered: its waited child is cancelled.
        assert!(store.queue().cancel("parent", "gave up").await.unwrap());
        assert_eq!(
            cancel_children(
                &store,
                "parent",
                "cancelled: its parent parent was dead-lettered"
            )
            .await,
            1
        );
        let child = store.queue().get(&sent.child).await.unwrap().unwrap();
        assert_eq!(child.state, TaskState::DeadLettered);
        // A stale holder of the cancelled parent sending again brings
        // nothing back.
        try_send(&store, &limits, &send_to("worker", "w", true))
            .await
            .unwrap();
        let child = store.queue().get(&sent.child).await.unwrap().unwrap();
        assert_eq!(child.state, TaskState::DeadLettered, "{child:?}");
        // Replayed, the parent runs again and sends the same key: the
        // child runs again too, instead of answering `failed` at once.
        store
            .queue()
            .replay(&crate::queue::Selection::Ids(vec!["parent".into()]))
            .await
            .unwrap();
        let leased = store
            .queue()
            .lease(
                &crate::queue::LeaseRequest {
                    agent: "manager".into(),
                    max: 1,
                    lease_for: Duration::from_secs(30),
                    owner: "test".into(),
                    max_deliver: 5,
                    lowest: Priority::Low,
                },
                Duration::ZERO,
            )
            .await
            .unwrap();
        assert_eq!(leased.len(), 1, "the parent runs");
        let again = try_send(&store, &limits, &send_to("worker", "w", true))
            .await
            .unwrap();
        assert!(again.existed);
        let child = store.queue().get(&sent.child).await.unwrap().unwrap();
        assert_eq!(child.state, TaskState::Queued, "{child:?}");
        assert_eq!(child.replays, 1);
        // A child that failed on its own stays as it ended.
        let other = try_send(&store, &limits, &send_to("worker", "x", true))
            .await
            .unwrap();
        assert!(
            store
                .queue()
                .cancel(&other.child, "bad input")
                .await
                .unwrap()
        );
        try_send(&store, &limits, &send_to("worker", "x", true))
            .await
            .unwrap();
        let other = store.queue().get(&other.child).await.unwrap().unwrap();
        assert_eq!(other.state, TaskState::DeadLettered, "{other:?}");
        assert_eq!(
            load_children(&store, "parent").await.unwrap(),
            vec![sent.child.clone(), other.id.clone()]
        );
        drop(leased);
    }

    #[tokio::test]
    async fn each_level_of_a_cancelled_tree_names_its_own_parent() {
        let (_dir, store) = with_root().await;
        let limits = crate::config::DelegationConfig::default();
        let child = try_send(&store, &limits, &send_to("worker", "w", true))
            .await
            .unwrap()
            .child;
        let grandchild = try_send(
            &store,
            &limits,
            &send_from(&child, "worker", "reviewer", "r", true),
        )
        .await
        .unwrap()
        .child;
        assert_eq!(
            cancel_children(
                &store,
                "parent",
                "cancelled: its parent parent was dead-lettered"
            )
            .await,
            2
        );
        let reason = |id: &str| {
            let store = store.clone();
            let id = id.to_string();
            async move {
                store
                    .queue()
                    .get(&id)
                    .await
                    .unwrap()
                    .unwrap()
                    .reason
                    .unwrap()
            }
        };
        assert_eq!(
            reason(&child).await,
            "cancelled: its parent parent was dead-lettered"
        );
        // So that the child, replayed and sending again, replays it.
        assert_eq!(
            reason(&grandchild).await,
            format!("cancelled: its parent {child} was cancelled with parent")
        );
    }

    #[test]
    fn child_ids_derive_from_the_parent_and_key() {
        assert_eq!(child_id("feature-9", "backend"), "feature-9/backend");
        let long = "p".repeat(120);
        let id = child_id(&long, "review");
        assert!(id.len() <= MAX_TASK_ID_BYTES, "{id}");
        assert_eq!(id, child_id(&long, "review"), "stable");
        assert_ne!(id, child_id(&format!("{long}x"), "review"));
        crate::queue::validate_task_id(&id).unwrap();
        // Known value: the hash must never change between versions.
        assert_eq!(fnv("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
