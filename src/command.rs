//! One-off commands the daemon runs beside its agents: readiness checks,
//! validation gates and their fixes, watch checks, rollbacks, notification
//! commands. Each runs in its own process group, is judged by its own
//! exit, has that group killed once it exits or at its time limit, and
//! keeps only the first bytes of its output.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};

use crate::supervisor::process::{self, SpawnSpec};

/// How a command ended.
#[derive(Debug)]
pub struct Ran {
    /// Its exit status; `None` when it was killed at the time limit.
    pub status: Option<std::process::ExitStatus>,
    /// The first bytes of its stderr and stdout (stderr first), trimmed.
    pub output: String,
    /// The whole of its stdout, up to the cap.
    pub stdout: String,
}

impl Ran {
    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.status.is_some_and(|status| status.success())
    }

    /// One line for reports: how it ended, and its output.
    pub fn describe(&self, program: &str, limit: Duration) -> String {
        let how = match self.status {
            Some(status) if status.success() => format!("{program:?} exited 0"),
            Some(status) => format!("{program:?} {status}"),
            None => format!(
                "{program:?} did not finish within {}",
                humantime::format_duration(limit)
            ),
        };
        if self.output.is_empty() {
            how
        } else {
            format!("{how}: {}", self.output)
        }
    }
}

/// Runs `spec` for at most `limit`, keeping `cap` bytes of each output.
///
/// # Errors
/// When the program cannot be started, saying why.
pub async fn run(spec: SpawnSpec, limit: Duration, cap: usize) -> Result<Ran, String> {
    run_with_input(spec, None, limit, cap).await
}

/// How long, once a command (or an agent told to shut down) has exited,
/// its output is still read: a process it started in the background may
/// hold the pipes open, and it is judged by its own exit, not by that
/// process.
pub(crate) const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);

/// [`run`], writing `input` to the command's stdin first (then closing
/// it; a command that does not read it is its own business).
///
/// # Errors
/// When the program cannot be started, saying why.
pub async fn run_with_input(
    spec: SpawnSpec,
    input: Option<Vec<u8>>,
    limit: Duration,
    cap: usize,
) -> Result<Ran, String> {
    use tokio::io::AsyncWriteExt as _;
    let program = spec.argv.first().cloned().unwrap_or_default();
    let mut child = process::spawn(spec)
        .await
        .map_err(|error| format!("{program:?} could not start: {error}"))?;
    let pgid = child.id().unwrap_or(0);
    // A run dropped midway (a readiness round cut short by a stop) takes
    // the whole group with it, not only its leader (`kill_on_drop`).
    let mut group = KillGroupOnDrop { pgid, armed: true };
    // Written beside the run: the command is judged by its exit, not by
    // whether it (or a process it left behind) read all of its input. The
    // write ends with the group at the latest.
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        tokio::spawn(async move {
            let _ = stdin.write_all(&input).await;
        });
    } else {
        drop(child.stdin.take());
    }
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = {
        let reading = async {
            tokio::join!(
                capped_into(stdout, cap, &mut out),
                capped_into(stderr, cap, &mut err)
            )
        };
        tokio::pin!(reading);
        let exited = child.wait();
        tokio::pin!(exited);
        tokio::time::timeout(limit, async {
            tokio::select! {
                status = &mut exited => {
                    let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, &mut reading).await;
                    status
                }
                _ = &mut reading => exited.await,
            }
        })
        .await
    };
    // Whatever happened, nothing of the command outlives it.
    group.armed = false;
    process::finish(&mut child, pgid).await;
    // What it wrote is kept at a timeout too: it may say where it hung.
    let status = match status {
        Ok(status) => Some(status.map_err(|error| format!("waiting for {program:?}: {error}"))?),
        Err(_) => None,
    };
    let (out, err) = (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    );
    let output = [&err, &out]
        .into_iter()
        .map(|text| text.trim())
        .find(|text| !text.is_empty())
        .unwrap_or_default()
        .to_string();
    Ok(Ran {
        status,
        output,
        stdout: out,
    })
}

/// Kills a command's process group if its run is dropped before it ends.
struct KillGroupOnDrop {
    pgid: u32,
    armed: bool,
}

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if self.armed {
            process::signal_group(self.pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Reads `reader` to its end into `kept`, keeping the first `cap` bytes;
/// what was read stays in `kept` if the read is cut off.
async fn capped_into(reader: Option<impl AsyncRead + Unpin>, cap: usize, kept: &mut Vec<u8>) {
    let Some(mut reader) = reader else {
        return;
    };
    let mut buffer = [0u8; 4096];
    while let Ok(read) = reader.read(&mut buffer).await {
        if read == 0 {
            break;
        }
        let room = cap.saturating_sub(kept.len());
        kept.extend_from_slice(&buffer[..read.min(room)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> SpawnSpec {
        SpawnSpec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            workdir: std::env::temp_dir(),
        }
    }

    #[tokio::test]
    async fn a_command_is_judged_by_its_own_exit_not_by_what_it_left_running() {
        // The background sleep holds stdout and stderr open: the command
        // exited 0 all the same, and the sleep goes with its group.
        let ran = run(sh("sleep 30 & echo started"), Duration::from_secs(20), 1024)
            .await
            .unwrap();
        assert!(ran.success(), "{ran:?}");
        assert_eq!(ran.stdout.trim(), "started");
    }

    #[tokio::test]
    async fn a_command_killed_at_its_limit_keeps_what_it_said() {
        let limit = Duration::from_secs(2);
        let ran = run(sh("echo 'stuck at step 2' >&2; sleep 30"), limit, 1024)
            .await
            .unwrap();
        assert!(ran.status.is_none());
        assert_eq!(
            ran.describe("check", limit),
            "\"check\" did not finish within 2s: stuck at step 2"
        );
    }

    #[tokio::test]
    async fn input_reaches_stdin_and_a_failure_keeps_its_output() {
        let ran = run_with_input(
            sh("read line; echo \"got $line\" >&2; exit 3"),
            Some(b"hello\n".to_vec()),
            Duration::from_secs(20),
            1024,
        )
        .await
        .unwrap();
        assert_eq!(ran.status.and_then(|status| status.code()), Some(3));
        assert_eq!(ran.output, "got hello");
        let slow = run(sh("sleep 5"), Duration::from_millis(100), 1024)
            .await
            .unwrap();
        assert!(slow.status.is_none(), "killed at its limit: {slow:?}");
    }
}
