//! `[agents.NAME.readiness]`: checks that decide whether an agent's
//! replicas may take tasks, and whether the daemon reports itself ready.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::HumanDuration;

/// `[agents.NAME.readiness]`: what must hold before the agent's replicas
/// take tasks. Every check runs every `interval`; a replica takes tasks
/// only while every required check passes for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ReadinessConfig {
    /// How often the checks run (1s to 1h).
    pub interval: HumanDuration,
    /// Longest one check may take; a check still running then fails
    /// (10ms to 5m, and at most `interval`; default 2s, or `interval` when
    /// shorter).
    pub timeout: Option<HumanDuration>,
    /// The checks, up to 32; each names exactly one of `http`, `tcp`,
    /// `command`, `workspace_writable`, `memory_below_pct`.
    pub checks: Vec<CheckConfig>,
    /// Rounds in a row a required check that passed before must fail
    /// before it stops the replicas (1 to 100, default 3): one failed
    /// probe (a pause, a blip) does not take an agent out. A check that
    /// has not passed yet since the daemon started stops them at once.
    pub failure_threshold: u32,
}

impl Default for ReadinessConfig {
    fn default() -> Self {
        Self {
            interval: HumanDuration::secs(10),
            timeout: None,
            checks: Vec::new(),
            failure_threshold: 3,
        }
    }
}

/// One readiness check: exactly one of `http`, `tcp`, `command`,
/// `workspace_writable` and `memory_below_pct`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    /// A name for status and `/health/ready` (default: the check itself,
    /// e.g. `tcp 127.0.0.1:5432`).
    #[serde(default)]
    pub name: Option<String>,
    /// GET this `http://` or `https://` URL; passes on the `expect` status.
    #[serde(default)]
    pub http: Option<String>,
    /// The HTTP status that passes (default: any 2xx). Redirects are
    /// followed unless this is a 3xx.
    #[serde(default)]
    pub expect: Option<u16>,
    /// Connect to this `HOST:PORT` (an IPv6 host in brackets); passes when
    /// the connection opens.
    #[serde(default)]
    pub tcp: Option<String>,
    /// Run this program with its arguments (argv) in the agent's working
    /// directory with the agent's environment; passes on exit status 0.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// `true`: a file can be created in the agent's working directory.
    #[serde(default)]
    pub workspace_writable: Option<bool>,
    /// Each replica's resident memory must stay below this percentage of
    /// the agent's `memory_limit` (of the machine's memory without one);
    /// checked per replica (above 0, up to 100).
    #[serde(default)]
    pub memory_below_pct: Option<f64>,
    /// Whether a failure stops the replicas from taking tasks and makes
    /// the daemon not ready (default true). `false`: only reported.
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
}

/// What a check probes, once validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// GET `url`, expecting `expect` (any 2xx when `None`).
    Http {
        /// The URL.
        url: String,
        /// The status that passes.
        expect: Option<u16>,
    },
    /// Open a TCP connection.
    Tcp(String),
    /// Run a program; exit 0 passes.
    Command(Vec<String>),
    /// Create and remove a file in the working directory.
    WorkspaceWritable,
    /// Each replica's memory below this percentage.
    MemoryBelowPct(f64),
}

impl CheckConfig {
    /// What the check probes; `None` when it is invalid (see validation).
    pub fn probe(&self) -> Option<Probe> {
        let probes = self.probes();
        match probes.as_slice() {
            [probe] => Some(probe.clone()),
            _ => None,
        }
    }

    fn probes(&self) -> Vec<Probe> {
        let mut probes = Vec::new();
        if let Some(url) = &self.http {
            probes.push(Probe::Http {
                url: url.clone(),
                expect: self.expect,
            });
        }
        if let Some(address) = &self.tcp {
            probes.push(Probe::Tcp(address.clone()));
        }
        if let Some(argv) = &self.command {
            probes.push(Probe::Command(argv.clone()));
        }
        if self.workspace_writable.is_some() {
            probes.push(Probe::WorkspaceWritable);
        }
        if let Some(pct) = self.memory_below_pct {
            probes.push(Probe::MemoryBelowPct(pct));
        }
        probes
    }

    /// The name shown for the check.
    pub fn display_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        match self.probe() {
            Some(Probe::Http { url, .. }) => format!("http {}", super::redact_url(&url)),
            Some(Probe::Tcp(address)) => format!("tcp {address}"),
            Some(Probe::Command(argv)) => {
                format!("command {}", argv.first().map_or("", String::as_str))
            }
            Some(Probe::WorkspaceWritable) => "workspace_writable".into(),
            Some(Probe::MemoryBelowPct(pct)) => format!("memory_below_pct {pct}"),
            None => "invalid".into(),
        }
    }
}

impl ReadinessConfig {
    /// The time limit of one check.
    pub fn timeout(&self) -> HumanDuration {
        self.timeout
            .unwrap_or_else(|| HumanDuration::secs(2).min(self.interval))
    }

    pub(super) fn validate(&self, key: &str, problem: &mut impl FnMut(String, String)) {
        let interval = self.interval.get();
        if interval < std::time::Duration::from_secs(1)
            || interval > std::time::Duration::from_secs(3600)
        {
            problem(
                format!("{key}.interval"),
                format!("{} is out of range; valid: 1s to 1h", self.interval),
            );
        }
        let timeout = self.timeout().get();
        if timeout < std::time::Duration::from_millis(10)
            || timeout > std::time::Duration::from_secs(300)
            || timeout > interval
        {
            problem(
                format!("{key}.timeout"),
                format!(
                    "{} is out of range; valid: 10ms to 5m, and at most interval = {}",
                    self.timeout(),
                    self.interval
                ),
            );
        }
        if self.checks.len() > 32 {
            problem(
                format!("{key}.checks"),
                format!("{} checks; valid: at most 32", self.checks.len()),
            );
        }
        if !(1..=100).contains(&self.failure_threshold) {
            problem(
                format!("{key}.failure_threshold"),
                format!(
                    "{} is out of range; valid: 1 to 100",
                    self.failure_threshold
                ),
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for (index, check) in self.checks.iter().enumerate() {
            let key = format!("{key}.checks[{index}]");
            check.validate(&key, problem);
            if check.probe().is_some() && !names.insert(check.display_name()) {
                problem(
                    format!("{key}.name"),
                    format!(
                        "{:?} names two checks; give each a distinct `name`",
                        check.display_name()
                    ),
                );
            }
        }
    }
}

impl CheckConfig {
    fn validate(&self, key: &str, problem: &mut impl FnMut(String, String)) {
        const KINDS: &str = "http, tcp, command, workspace_writable, memory_below_pct";
        let probes = self.probes();
        if probes.len() != 1 {
            problem(
                key.to_string(),
                format!(
                    "names {} kinds of check; give exactly one of {KINDS}, e.g. {{ tcp = \"127.0.0.1:5432\" }}",
                    probes.len()
                ),
            );
        }
        if let Some(name) = &self.name
            && (name.is_empty() || name.len() > 64)
        {
            problem(
                format!("{key}.name"),
                format!("{name:?} is not valid; give 1 to 64 characters"),
            );
        }
        if self.expect.is_some() && self.http.is_none() {
            problem(
                format!("{key}.expect"),
                "only an `http` check has an expected status".into(),
            );
        }
        if let Some(status) = self.expect
            && !(100..=599).contains(&status)
        {
            problem(
                format!("{key}.expect"),
                format!("{status} is not an HTTP status; valid: 100 to 599"),
            );
        }
        if let Some(url) = &self.http {
            match reqwest::Url::parse(url) {
                Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
                Ok(parsed) => problem(
                    format!("{key}.http"),
                    format!(
                        "{:?} has scheme {:?}; valid: http or https",
                        super::redact_url(url),
                        parsed.scheme()
                    ),
                ),
                Err(error) => problem(
                    format!("{key}.http"),
                    format!(
                        "{:?} is not a URL ({error}); e.g. \"http://127.0.0.1:8080/health\"",
                        super::redact_url(url)
                    ),
                ),
            }
        }
        if let Some(address) = &self.tcp
            && let Err(why) = tcp_address(address)
        {
            problem(
                format!("{key}.tcp"),
                format!(
                    "{address:?} {why}; give HOST:PORT, e.g. \"127.0.0.1:5432\", \"[::1]:5432\" or \"db.internal:5432\""
                ),
            );
        }
        if let Some(argv) = &self.command
            && argv.first().is_none_or(String::is_empty)
        {
            problem(
                format!("{key}.command"),
                "is empty; give the program and its arguments, e.g. [\"./check.sh\"]".into(),
            );
        }
        if self.workspace_writable == Some(false) {
            problem(
                format!("{key}.workspace_writable"),
                "false checks nothing; write `workspace_writable = true` or leave the check out"
                    .into(),
            );
        }
        if let Some(pct) = self.memory_below_pct
            && !(pct > 0.0 && pct <= 100.0)
        {
            problem(
                format!("{key}.memory_below_pct"),
                format!("{pct} is out of range; valid: above 0, up to 100"),
            );
        }
    }
}

/// Whether `address` is HOST:PORT with a port that can be connected to;
/// an IPv6 host goes in brackets.
fn tcp_address(address: &str) -> Result<(), &'static str> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err("has no port");
    };
    match port.parse::<u16>() {
        Ok(0) => return Err("has port 0, which cannot be connected to"),
        Ok(_) => {}
        Err(_) => return Err("has no valid port (1 to 65535)"),
    }
    if host.is_empty() || host == "[]" {
        return Err("has no host");
    }
    if let Some(inner) = host.strip_prefix('[') {
        let valid = inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
        return if valid {
            Ok(())
        } else {
            Err("has a bracketed host that is not an IPv6 address")
        };
    }
    if host.contains(':') {
        return Err("has an IPv6 host without brackets");
    }
    Ok(())
}
