//! A real nats-server for tests: started on a free loopback port with a
//! temporary JetStream store, stopped and cleaned on drop.
//!
//! The binary is `$FLOTILLA_NATS_SERVER`, else `.tools/bin/nats-server`
//! (installed by `scripts/install-nats-server.sh`), else `nats-server` on
//! PATH. Without one, tests skip loudly, except under `CI=true`, where
//! they fail.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nats-server.
pub struct NatsServer {
    child: Option<Child>,
    binary: PathBuf,
    args: Vec<String>,
    /// Its client port on 127.0.0.1.
    pub port: u16,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    _store: tempfile::TempDir,
}

fn find_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FLOTILLA_NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/nats-server");
    if local.exists() {
        return Some(local);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free loopback port")
}

/// The nats-server binary, or `None` (after saying so loudly) when none is
/// installed and CI is not set.
///
/// # Panics
/// Under `CI=true` without a nats-server.
fn binary_for(test: &str) -> Option<PathBuf> {
    let binary = find_binary();
    if binary.is_none() {
        let message = format!(
            "{test}: no nats-server found (set FLOTILLA_NATS_SERVER, or run scripts/install-nats-server.sh)"
        );
        if std::env::var("CI").is_ok_and(|value| value == "true") {
            panic!("{message}; CI=true requires it");
        }
        eprintln!("\n!!! SKIPPED {message}\n");
    }
    binary
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
        let port = free_port();
        let mut args = vec![
            "-a".to_string(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-js".into(),
            "-sd".into(),
            store.path().display().to_string(),
        ];
        args.extend(extra.iter().map(ToString::to_string));
        Some(Self::spawn(binary, args, port, store))
    }

    /// Starts `count` servers on loopback, routed into one JetStream
    /// cluster, or `None` like [`Self::start`].
    pub fn cluster(test: &str, count: usize) -> Option<Vec<Self>> {
        let binary = binary_for(test)?;
        let ports: Vec<(u16, u16)> = (0..count).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, cluster)| format!("nats://127.0.0.1:{cluster}"))
            .collect();
        let servers = ports
            .iter()
            .enumerate()
            .map(|(index, (port, cluster))| {
                let store = tempfile::tempdir().expect("temp store dir");
                let config = store.path().join("nats.conf");
                let text = format!(
                    "server_name: n{index}\nlisten: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\" }}\ncluster {{\n  name: flotilla\n  listen: \"127.0.0.1:{cluster}\"\n  routes: [{}]\n}}\n",
                    store.path().join("js").display(),
                    routes
                        .iter()
                        .map(|route| format!("\"{route}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                std::fs::write(&config, text).expect("config written");
                let args = vec!["-c".to_string(), config.display().to_string()];
                Self::spawn(binary.clone(), args, *port, store)
            })
            .collect();
        Some(servers)
    }

    fn spawn(binary: PathBuf, args: Vec<String>, port: u16, store: tempfile::TempDir) -> Self {
        let mut server = Self {
            child: None,
            binary,
            args,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            _store: store,
        };
        server.restart();
        server
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
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nats-server did not listen on {}",
                self.port
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
