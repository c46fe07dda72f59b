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
    child: Child,
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

impl NatsServer {
    /// Starts a server with JetStream, or returns `None` (after saying so
    /// loudly) when no nats-server is installed and CI is not set.
    ///
    /// # Panics
    /// Under `CI=true` without a nats-server, or when the server does not
    /// come up within 10 s.
    pub fn start(test: &str) -> Option<Self> {
        let Some(binary) = find_binary() else {
            let message = format!(
                "{test}: no nats-server found (set FLOTILLA_NATS_SERVER, or run scripts/install-nats-server.sh)"
            );
            if std::env::var("CI").is_ok_and(|value| value == "true") {
                panic!("{message}; CI=true requires it");
            }
            eprintln!("\n!!! SKIPPED {message}\n");
            return None;
        };
        let store = tempfile::tempdir().expect("temp store dir");
        let port = free_port();
        let child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()));
        let server = Self {
            child,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            _store: store,
        };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nats-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
