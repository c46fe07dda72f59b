//! Operating-system side of replicas: spawning agents in their own process
//! groups with a clean environment, stopping whole groups, reaping, finding
//! orphans of a dead daemon, and reading resident memory.
//!
//! This is the one place with `unsafe` (the `pre_exec` hook that asks the
//! kernel to kill the agent when the daemon dies).

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// Environment variable naming the store whose daemon spawned a process;
/// used to find orphans after the daemon was killed.
pub const INSTANCE_ENV: &str = "FLOTILLA_INSTANCE";

/// Variables passed through from the daemon to every agent.
pub const PASSED_THROUGH: [&str; 3] = ["PATH", "HOME", "LANG"];

/// How to start one agent process.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// argv; the first element is the program.
    pub argv: Vec<String>,
    /// The complete environment (nothing else is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub workdir: PathBuf,
}

struct SpawnRequest {
    spec: SpawnSpec,
    /// The runtime of the caller: the child is registered with its process
    /// driver.
    runtime: tokio::runtime::Handle,
    reply: oneshot::Sender<io::Result<Child>>,
}

/// Pids of the agent processes this daemon spawned and has not reaped yet.
/// Their exit status belongs to their `Child`; any other zombie child of
/// the daemon is an orphaned grandchild and is reaped by the sampler.
static CHILDREN: std::sync::Mutex<Option<std::collections::HashSet<u32>>> =
    std::sync::Mutex::new(None);

fn children() -> std::sync::MutexGuard<'static, Option<std::collections::HashSet<u32>>> {
    CHILDREN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Children are spawned from one long-lived thread: `PR_SET_PDEATHSIG` fires
/// when the spawning *thread* exits, so it must live as long as the daemon.
static SPAWNER: OnceLock<std_mpsc::Sender<SpawnRequest>> = OnceLock::new();

fn spawner() -> &'static std_mpsc::Sender<SpawnRequest> {
    SPAWNER.get_or_init(|| {
        let (sender, receiver) = std_mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("flotilla-spawner".into())
            .spawn(move || {
                while let Ok(request) = receiver.recv() {
                    let _entered = request.runtime.enter();
                    let _ = request.reply.send(spawn_now(&request.spec));
                }
            })
            .expect("the spawner thread starts");
        sender
    })
}

/// Spawns `spec` in its own process group with piped stdio.
///
/// # Errors
/// The OS error, e.g. the program does not exist.
pub async fn spawn(spec: SpawnSpec) -> io::Result<Child> {
    let (reply, answer) = oneshot::channel();
    let request = SpawnRequest {
        spec,
        runtime: tokio::runtime::Handle::current(),
        reply,
    };
    spawner()
        .send(request)
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    answer
        .await
        .map_err(|_| io::Error::other("the spawner thread dropped the request"))?
}

fn spawn_now(spec: &SpawnSpec) -> io::Result<Child> {
    let (program, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.workdir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    set_parent_death_signal(&mut command);
    // Registered under the lock the zombie reaper takes, so that it never
    // mistakes a child that exits at once for an orphan.
    let mut known = children();
    let child = command.spawn()?;
    if let Some(pid) = child.id() {
        known.get_or_insert_default().insert(pid);
    }
    Ok(child)
}

#[allow(unsafe_code)]
fn set_parent_death_signal(command: &mut Command) {
    // SAFETY: the closure runs between fork and exec in the child and only
    // calls prctl(2), which is async-signal-safe; it allocates nothing.
    unsafe {
        command
            .pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from));
    }
}

/// Makes this process the reaper of its orphaned descendants, so that an
/// agent's grandchildren are reaped by the daemon, not left as zombies.
pub fn become_subreaper() {
    if let Err(error) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(%error, "could not become a child subreaper; grandchildren of agents may linger as zombies");
    }
}

/// Sends `signal` to the process group `pgid`; a group that is gone is fine.
pub fn signal_group(pgid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pgid) else {
        return;
    };
    if raw <= 1 {
        return;
    }
    match killpg(Pid::from_raw(raw), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(error) => tracing::warn!(%error, pgid, ?signal, "could not signal process group"),
    }
}

/// Reaps exited members of the group `pgid` that were re-parented to this
/// process (after the group's leader was reaped by its `Child`). Returns
/// true while members that are not yet reaped remain.
pub fn reap_group(pgid: u32) -> bool {
    // 0 would mean the daemon's own group (stealing the exit status of
    // children it waits for itself), 1 init's: as in `signal_group`.
    let Ok(raw) = i32::try_from(pgid) else {
        return false;
    };
    if raw <= 1 {
        return false;
    }
    for _ in 0..1024 {
        match waitid(
            Id::PGid(Pid::from_raw(raw)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
        ) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Stops a replica: SIGTERM to its group, up to `grace` for the leader to
/// exit, then SIGKILL to the group; reaps everything.
///
/// Returns the leader's exit status.
pub async fn stop(
    child: &mut Child,
    pgid: u32,
    grace: Duration,
) -> Option<std::process::ExitStatus> {
    signal_group(pgid, Signal::SIGTERM);
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => None,
    };
    finish(child, pgid).await.or(status)
}

/// After the leader exited on its own or was stopped: SIGKILL whatever is
/// left of the group and reap it all.
pub async fn finish(child: &mut Child, pgid: u32) -> Option<std::process::ExitStatus> {
    signal_group(pgid, Signal::SIGKILL);
    let status = match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            tracing::error!(pgid, "agent did not exit 10s after SIGKILL");
            None
        }
    };
    if status.is_some() {
        children().get_or_insert_default().remove(&pgid);
    }
    // Killed grandchildren take a moment to exit; reap them as they do.
    for _ in 0..100 {
        if !reap_group(pgid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    status
}

/// Kills every process (other than this one) whose environment marks it as
/// spawned for the store `instance` (orphans of a daemon that was killed),
/// with their process groups. Returns the pids found.
pub fn kill_orphans(instance: &str) -> Vec<u32> {
    let marker = format!("{INSTANCE_ENV}={instance}");
    let own = std::process::id();
    let mut found = Vec::new();
    for pid in pids() {
        if pid == own {
            continue;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if environ
            .split(|byte| *byte == 0)
            .any(|entry| entry == marker.as_bytes())
        {
            found.push(pid);
        }
    }
    // Read the groups before killing anything: once a process is reaped its
    // pid, and so what `group_of` says, may belong to someone else. Never
    // signal our own group.
    let own_group = group_of(own);
    let groups: Vec<Option<u32>> = found.iter().map(|pid| group_of(*pid)).collect();
    for (pid, group) in found.iter().zip(groups) {
        if let Ok(raw) = i32::try_from(*pid) {
            let _ = nix::sys::signal::kill(Pid::from_raw(raw), Signal::SIGKILL);
        }
        if let Some(group) = group
            && Some(group) != own_group
        {
            signal_group(group, Signal::SIGKILL);
        }
    }
    found
}

/// The kernel's page size (RSS in /proc is counted in pages).
fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|size| u64::try_from(size).ok())
            .unwrap_or(4096)
    })
}

/// Every process id in /proc.
fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse().ok())
        })
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the
    // last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

fn group_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(2)?.parse().ok()
}

/// Resident memory in bytes per process group, over all processes. Reaps,
/// on the way, zombies re-parented to this process (an agent's children
/// that exited while the agent runs on); never a zombie of this process's
/// own group, which its own code waits for.
pub fn rss_by_group() -> HashMap<u32, u64> {
    let own = std::process::id();
    let own_group = u32::try_from(nix::unistd::getpgrp().as_raw()).unwrap_or(0);
    let mut orphans = Vec::new();
    let page = page_size();
    let mut groups = HashMap::new();
    for pid in pids() {
        let Some(fields) = stat_fields(pid) else {
            continue;
        };
        // After the command: state(0) ppid(1) pgrp(2) ... rss(21), in pages.
        // A zombie in this process's own group is a child it started
        // itself (and will wait for), not an agent's orphan: agents run in
        // their own groups.
        if fields.first().is_some_and(|state| state == "Z")
            && fields.get(1).and_then(|f| f.parse::<u32>().ok()) == Some(own)
            && fields.get(2).and_then(|f| f.parse::<u32>().ok()) != Some(own_group)
        {
            orphans.push(pid);
            continue;
        }
        let (Some(pgid), Some(rss)) = (
            fields.get(2).and_then(|f| f.parse::<u32>().ok()),
            fields.get(21).and_then(|f| f.parse::<u64>().ok()),
        ) else {
            continue;
        };
        *groups.entry(pgid).or_insert(0) += rss * page;
    }
    let known = children();
    for pid in orphans {
        if known.as_ref().is_some_and(|known| known.contains(&pid)) {
            continue;
        }
        if let Ok(raw) = i32::try_from(pid) {
            let _ = nix::sys::wait::waitpid(Pid::from_raw(raw), Some(WaitPidFlag::WNOHANG));
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawns_in_own_group_with_clean_env_and_stops_the_group() {
        // As in the daemon: orphaned grandchildren come back to be reaped.
        become_subreaper();
        let spec = SpawnSpec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo \"$ONLY:${HOME:-none}\"; sleep 30 & sleep 30".into(),
            ],
            env: vec![
                ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
                ("ONLY".into(), "visible".into()),
            ],
            workdir: std::env::temp_dir(),
        };
        let mut child = spawn(spec).await.unwrap();
        let pid = child.id().unwrap();
        assert_eq!(group_of(pid), Some(pid), "leader of its own group");
        let mut stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        use tokio::io::AsyncReadExt;
        let mut buffer = [0u8; 64];
        let read = stdout.read(&mut buffer).await.unwrap();
        line.push_str(std::str::from_utf8(&buffer[..read]).unwrap());
        assert_eq!(line.trim(), "visible:none", "only the given environment");
        assert!(rss_by_group().get(&pid).copied().unwrap_or(0) > 0);
        let status = stop(&mut child, pid, Duration::from_secs(2)).await;
        assert!(status.is_some());
        // The background `sleep` of the group is gone too.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let left: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .filter(|p: &u32| group_of(*p) == Some(pid))
            .collect();
        assert!(left.is_empty(), "group members left: {left:?}");
    }

    #[tokio::test]
    async fn a_missing_program_is_an_error() {
        let spec = SpawnSpec {
            argv: vec!["/nonexistent/agent".into()],
            env: Vec::new(),
            workdir: std::env::temp_dir(),
        };
        assert!(spawn(spec).await.is_err());
    }
}
