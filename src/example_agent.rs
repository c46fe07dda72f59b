//! `flotilla example-agent`: a persistent agent built into the binary for
//! demos, tests and benchmarks, with switchable failure rates.
//!
//! Every decision is drawn from a random source seeded by `--seed`, the task
//! id and the attempt number, so a run is reproducible and a retried task
//! gets a fresh draw. It is plain blocking code on purpose: it is a child
//! process, not part of the daemon.

use std::hash::{Hash, Hasher};
use std::io::{self, BufRead, Write};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::protocol::ToAgent;

/// Switches of the example agent.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Milliseconds of simulated work per task.
    #[arg(long, default_value_t = 50)]
    pub work_ms: u64,
    /// Fraction of attempts on which the process exits mid-task.
    #[arg(long, default_value_t = 0.0)]
    pub crash_rate: f64,
    /// Fraction of attempts that hang without progress.
    #[arg(long, default_value_t = 0.0)]
    pub hang_rate: f64,
    /// Fraction of attempts that fail with a retryable error.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Fraction of attempts that fail with a non-retryable error.
    #[arg(long, default_value_t = 0.0)]
    pub fatal_rate: f64,
    /// Fraction of attempts that print a malformed line before the result.
    #[arg(long, default_value_t = 0.0)]
    pub bad_output_rate: f64,
    /// Seed of the random draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Options {
    /// Checks that the rates are fractions that add up to at most 1.
    ///
    /// # Errors
    /// A message naming the bad switch.
    pub fn validate(&self) -> Result<(), String> {
        let rates = [
            ("--crash-rate", self.crash_rate),
            ("--hang-rate", self.hang_rate),
            ("--error-rate", self.error_rate),
            ("--fatal-rate", self.fatal_rate),
            ("--bad-output-rate", self.bad_output_rate),
        ];
        for (name, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} {rate} is out of range; valid: 0.0 to 1.0"));
            }
        }
        let total: f64 = rates.iter().map(|(_, rate)| rate).sum();
        if total > 1.0 + 1e-9 {
            return Err(format!(
                "the rates add up to {total}; they must add up to at most 1.0"
            ));
        }
        Ok(())
    }
}

/// What one attempt does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Exit mid-task.
    Crash,
    /// Never answer.
    Hang,
    /// Retryable error.
    Error,
    /// Non-retryable error.
    Fatal,
    /// A malformed line, then a result.
    BadOutput,
    /// A result.
    Succeed,
}

/// The fate of `attempt` of task `id` under `options`.
pub fn fate(options: &Options, id: &str, attempt: u32) -> Fate {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (options.seed, id, attempt).hash(&mut hasher);
    let roll: f64 = SmallRng::seed_from_u64(hasher.finish()).random();
    let mut edge = 0.0;
    for (rate, fate) in [
        (options.crash_rate, Fate::Crash),
        (options.hang_rate, Fate::Hang),
        (options.error_rate, Fate::Error),
        (options.fatal_rate, Fate::Fatal),
        (options.bad_output_rate, Fate::BadOutput),
    ] {
        edge += rate;
        if roll < edge {
            return fate;
        }
    }
    Fate::Succeed
}

fn send(out: &mut impl Write, value: &serde_json::Value) -> io::Result<()> {
    writeln!(out, "{value}")?;
    out.flush()
}

/// Runs the agent on stdin/stdout until stdin closes or `shutdown` arrives.
///
/// # Errors
/// Only I/O errors of stdout.
pub fn run(options: &Options) -> io::Result<()> {
    let stdin = io::stdin();
    let mut out = io::BufWriter::new(io::stdout().lock());
    send(
        &mut out,
        &json!({"type": "ready", "protocol": crate::protocol::PROTOCOL_VERSION}),
    )?;
    let mut line = String::new();
    loop {
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        let task = match serde_json::from_str::<ToAgent>(&line) {
            Ok(ToAgent::Task(task)) => task,
            Ok(ToAgent::Shutdown { .. }) => return Ok(()),
            Ok(ToAgent::Cancel { .. } | ToAgent::Reply { .. }) => continue,
            Err(error) => {
                eprintln!("example-agent: ignoring a line I do not understand: {error}");
                continue;
            }
        };
        let fate = fate(options, &task.id, task.attempt);
        let half = Duration::from_millis(options.work_ms / 2);
        if options.work_ms > 0 {
            std::thread::sleep(half);
            send(
                &mut out,
                &json!({"type": "progress", "id": task.id, "step": "halfway", "checkpoint": {"step": 1}}),
            )?;
        }
        match fate {
            Fate::Crash => {
                eprintln!(
                    "example-agent: crashing on purpose (task {} attempt {})",
                    task.id, task.attempt
                );
                std::process::exit(70);
            }
            Fate::Hang => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(options.work_ms).saturating_sub(half));
        let reply = match fate {
            Fate::Error => {
                json!({"type": "error", "id": task.id, "message": "simulated retryable error", "retryable": true})
            }
            Fate::Fatal => {
                json!({"type": "error", "id": task.id, "message": "simulated fatal error", "retryable": false})
            }
            _ => {
                if fate == Fate::BadOutput {
                    writeln!(out, "this is not a protocol message {{")?;
                }
                json!({"type": "result", "id": task.id, "output": {
                    "echo": task.payload,
                    "attempt": task.attempt,
                    "resumed_from": task.checkpoint,
                }})
            }
        };
        send(&mut out, &reply)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Options {
        Options {
            work_ms: 0,
            crash_rate: 0.2,
            hang_rate: 0.05,
            error_rate: 0.1,
            fatal_rate: 0.0,
            bad_output_rate: 0.0,
            seed: 7,
        }
    }

    #[test]
    fn fates_follow_the_rates_and_the_seed() {
        let options = options();
        let fates: Vec<Fate> = (0..10_000)
            .map(|n| fate(&options, &format!("t{n}"), 1))
            .collect();
        let share = |wanted: Fate| fates.iter().filter(|f| **f == wanted).count() as f64 / 10_000.0;
        assert!((share(Fate::Crash) - 0.2).abs() < 0.02);
        assert!((share(Fate::Hang) - 0.05).abs() < 0.01);
        assert!((share(Fate::Succeed) - 0.65).abs() < 0.02);
        assert_eq!(fate(&options, "x", 1), fate(&options, "x", 1));
    }

    #[test]
    fn rates_are_checked() {
        assert!(options().validate().is_ok());
        let mut bad = options();
        bad.crash_rate = 0.9;
        assert!(bad.validate().unwrap_err().contains("add up"));
        bad.crash_rate = -0.1;
        assert!(bad.validate().unwrap_err().contains("--crash-rate"));
    }
}
