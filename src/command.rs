//! One-off commands the daemon runs beside its agents: readiness checks,
//! validation gates and their fixes, watch checks, rollbacks. Each runs in
//! its own process group, is killed with that group at its time limit,
//! and keeps only the first bytes of its output.

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
    let program = spec.argv.first().cloned().unwrap_or_default();
    let mut child = process::spawn(spec)
        .await
        .map_err(|error| format!("{program:?} could not start: {error}"))?;
    let pgid = child.id().unwrap_or(0);
    drop(child.stdin.take());
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let waited = tokio::time::timeout(limit, async {
        tokio::join!(capped(stdout, cap), capped(stderr, cap), child.wait())
    })
    .await;
    // Whatever happened, nothing of the command outlives it.
    process::finish(&mut child, pgid).await;
    let Ok((out, err, status)) = waited else {
        return Ok(Ran {
            status: None,
            output: String::new(),
            stdout: String::new(),
        });
    };
    let status = status.map_err(|error| format!("waiting for {program:?}: {error}"))?;
    let output = [&err, &out]
        .into_iter()
        .map(|text| text.trim())
        .find(|text| !text.is_empty())
        .unwrap_or_default()
        .to_string();
    Ok(Ran {
        status: Some(status),
        output,
        stdout: out,
    })
}

/// Reads `reader` to its end, keeping the first `cap` bytes.
async fn capped(reader: Option<impl AsyncRead + Unpin>, cap: usize) -> String {
    let Some(mut reader) = reader else {
        return String::new();
    };
    let mut kept = Vec::new();
    let mut buffer = [0u8; 4096];
    while let Ok(read) = reader.read(&mut buffer).await {
        if read == 0 {
            break;
        }
        let room = cap.saturating_sub(kept.len());
        kept.extend_from_slice(&buffer[..read.min(room)]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}
