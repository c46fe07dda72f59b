//! A real nats-server for tests: started on a free loopback port with a
//! temporary JetStream store, stopped and cleaned on drop.
//!
//! The binary is `$FLOTILLA_NATS_SERVER`, else `.tools/bin/nats-server`
//! (installed by `scripts/install-nats-server.sh`), else `nats-server` on
//! PATH. Without one, tests skip loudly, except under `CI=true`, where
//! they fail.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nats-server.
pub struct NatsServer {
    child: Option<Child>,
    binary: PathBuf,
    args: Vec<String>,
    /// Its client port on 127.0.0.1.
    pub port: u16,
    /// Its monitoring port on 127.0.0.1, when it has one.
    monitor: Option<u16>,
    log: PathBuf,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    _store: tempfile::TempDir,
}

/// `count` distinct free loopback ports (all held until all are found, so
/// none repeats). They are picked at random below the kernel's range of
/// ephemeral ports (`ip_local_port_range`), where no `bind(0)` of another
/// test and no outgoing connection lands: only another test picking the
/// same port could take it before the server binds it (a restart on the
/// same port relies on that).
fn free_ports(count: usize) -> Vec<u16> {
    use rand::{Rng as _, SeedableRng as _};
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral);
    let mut rng = rand::rngs::SmallRng::from_os_rng();
    let mut listeners: Vec<TcpListener> = Vec::with_capacity(count);
    for _ in 0..10_000 {
        if listeners.len() == count {
            break;
        }
        // A host whose ephemeral range starts low: any free port.
        let port = if high > low + 1_000 {
            rng.random_range(low..high)
        } else {
            0
        };
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(listener);
        }
    }
    assert_eq!(listeners.len(), count, "no free loopback ports");
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("a bound port").port())
        .collect()
}

/// The last `lines` lines of the file at `path`, for failure messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The nats-server binary, or `None` (after saying so loudly) when none is
/// installed and CI is not set.
///
/// # Panics
/// Under `CI=true` without a nats-server.
fn binary_for(test: &str) -> Option<PathBuf> {
    super::tool(
        test,
        "nats-server",
        "FLOTILLA_NATS_SERVER",
        "scripts/install-nats-server.sh",
    )
}

impl NatsServer {
    /// Starts a server with JetStream, or returns `None` (after saying so
    /// loudly) when no nats-server is installed and CI is not set.
    ///
    /// # Panics
    /// Under `CI=true` without a nats-server, or when the server does not
    /// come up within 10 s.
    pub fn start(test: &str) -> Option<Self> {
        Self::start_with(test, &[])
    }

    /// [`Self::start`] with extra command-line arguments (e.g. auth).
    pub fn start_with(test: &str, extra: &[&str]) -> Option<Self> {
        let binary = binary_for(test)?;
        let store = tempfile::tempdir().expect("temp store dir");
        let port = free_ports(1)[0];
        let log = store.path().join("nats.log");
        let mut args = vec![
            "-l".to_string(),
            log.display().to_string(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-js".into(),
            "-sd".into(),
            store.path().display().to_string(),
        ];
        args.extend(extra.iter().map(ToString::to_string));
        Some(Self::spawn(binary, args, port, None, log, store))
    }

    /// Starts `count` servers on loopback, routed into one JetStream
    /// cluster, or `None` like [`Self::start`].
    pub fn cluster(test: &str, count: usize) -> Option<Vec<Self>> {
        let binary = binary_for(test)?;
        let ports = free_ports(3 * count);
        let ports: Vec<&[u16]> = ports.chunks(3).collect();
        // Its own cluster name: a node of another test's cluster that got
        // one of these ports (free ports are only free when looked at)
        // cannot join it.
        let name = format!("flotilla-{}-{}", std::process::id(), ports[0][1]);
        let routes: Vec<String> = ports
            .iter()
            .map(|node| format!("nats://127.0.0.1:{}", node[1]))
            .collect();
        let servers = ports
            .iter()
            .enumerate()
            .map(|(index, node)| {
                let [port, cluster, monitor] = [node[0], node[1], node[2]];
                let store = tempfile::tempdir().expect("temp store dir");
                let config = store.path().join("nats.conf");
                let log = store.path().join("nats.log");
                let text = format!(
                    "server_name: n{index}\nlisten: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{monitor}\"\nlog_file: \"{}\"\njetstream {{ store_dir: \"{}\" }}\ncluster {{\n  name: {name}\n  listen: \"127.0.0.1:{cluster}\"\n  routes: [{}]\n}}\n",
                    log.display(),
                    store.path().join("js").display(),
                    routes
                        .iter()
                        .map(|route| format!("\"{route}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                std::fs::write(&config, text).expect("config written");
                let args = vec!["-c".to_string(), config.display().to_string()];
                Self::spawn(binary.clone(), args, port, Some(monitor), log, store)
            })
            .collect();
        Some(servers)
    }

    fn spawn(
        binary: PathBuf,
        args: Vec<String>,
        port: u16,
        monitor: Option<u16>,
        log: PathBuf,
        store: tempfile::TempDir,
    ) -> Self {
        let mut server = Self {
            child: None,
            binary,
            args,
            port,
            monitor,
            log,
            url: format!("nats://127.0.0.1:{port}"),
            _store: store,
        };
        server.restart();
        server
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        format!("--- {} log:\n{}", self.url, tail(&self.log, 30))
    }

    /// Whether the server's `/healthz` answers 200: in a cluster, JetStream
    /// knows its meta leader and is current with it. `false` for a server
    /// without a monitoring port.
    pub fn healthy(&self) -> bool {
        let Some(monitor) = self.monitor else {
            return false;
        };
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", monitor)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let request = "GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
        let mut response = String::new();
        stream.write_all(request.as_bytes()).is_ok()
            && stream.read_to_string(&mut response).is_ok()
            && response.starts_with("HTTP/1.0 200")
    }

    /// Kills the server with SIGKILL (its store stays).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    ///
    /// # Panics
    /// When it does not listen within 10 s.
    pub fn restart(&mut self) {
        self.kill();
        let child = super::die_with_parent(&mut Command::new(&self.binary))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", self.binary.display()));
        self.child = Some(child);
        let started = Instant::now();
        loop {
            // A server that could not bind a port exits; another process
            // may then be the one listening on it.
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                panic!(
                    "nats-server on {} exited with {status}\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nats-server did not listen on {}\n{}",
                self.port,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
