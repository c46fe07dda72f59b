//! The fault proxy (`[chaos] proxy = true`): the daemon reaches its broker
//! through a TCP proxy of its own on loopback, so that `flotilla chaos
//! partition` and `latency` can cut or slow the daemon's broker connection
//! without touching the network. A partition stalls every connection (no
//! byte moves either way, new connections wait) until it ends, like a
//! network that drops packets and recovers: the client notices through its
//! pings, and TCP loses nothing. Latency delays every chunk forwarded.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::redact_url;

/// Bytes read at once.
const CHUNK: usize = 16 * 1024;
/// Longest fault.
pub const MAX_FAULT: Duration = Duration::from_secs(3600);

/// Longest delay `latency` adds.
pub const MAX_ADD: Duration = Duration::from_secs(60);

/// The fault in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Bytes flow.
    #[default]
    None,
    /// Nothing flows until then.
    Partition {
        /// When it ends.
        until: Instant,
    },
    /// Each chunk waits `add` until then.
    Latency {
        /// The delay.
        add: Duration,
        /// When it ends.
        until: Instant,
    },
}

/// Proxies in front of each broker URL.
#[derive(Debug)]
pub struct FaultProxy {
    fault: watch::Sender<Fault>,
    urls: Vec<String>,
}

impl FaultProxy {
    /// Starts one proxy per URL of `urls`; [`Self::urls`] are the URLs to
    /// connect to instead.
    ///
    /// # Errors
    /// When a URL has no host and port, or a loopback port cannot be
    /// bound.
    pub async fn start(urls: &[String]) -> anyhow::Result<Self> {
        let (fault, _) = watch::channel(Fault::None);
        let mut proxied = Vec::new();
        for url in urls {
            let with_scheme = if url.contains("://") {
                url.clone()
            } else {
                format!("nats://{url}")
            };
            let mut parsed = reqwest::Url::parse(&with_scheme)
                .map_err(|error| anyhow::anyhow!("broker url {:?}: {error}", redact_url(url)))?;
            let host = parsed
                .host_str()
                .ok_or_else(|| anyhow::anyhow!("broker url {:?} has no host", redact_url(url)))?
                .to_string();
            let port = parsed.port().unwrap_or(4222);
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let local = listener.local_addr()?;
            tokio::spawn(serve(listener, format!("{host}:{port}"), fault.subscribe()));
            parsed
                .set_host(Some("127.0.0.1"))
                .map_err(|error| anyhow::anyhow!("broker url {:?}: {error}", redact_url(url)))?;
            parsed.set_port(Some(local.port())).map_err(|()| {
                anyhow::anyhow!("broker url {:?}: cannot set the port", redact_url(url))
            })?;
            tracing::warn!(broker = %redact_url(url), proxy = %local, "chaos: the broker is reached through the fault proxy");
            proxied.push(parsed.to_string().trim_end_matches('/').to_string());
        }
        Ok(Self {
            fault,
            urls: proxied,
        })
    }

    /// The URLs to connect to.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Cuts the broker connection for `duration`.
    pub fn partition(&self, duration: Duration) {
        let until = Instant::now() + duration.min(MAX_FAULT);
        self.fault.send_replace(Fault::Partition { until });
    }

    /// Ends the fault in force now; whether one was.
    pub fn heal(&self) -> bool {
        let was = self.fault.send_replace(Fault::None);
        let now = Instant::now();
        match was {
            Fault::None => false,
            Fault::Partition { until } | Fault::Latency { until, .. } => until > now,
        }
    }

    /// Delays every chunk by `add` for `duration`.
    pub fn latency(&self, add: Duration, duration: Duration) {
        let until = Instant::now() + duration.min(MAX_FAULT);
        self.fault.send_replace(Fault::Latency {
            add: add.min(MAX_ADD),
            until,
        });
    }
}

/// Waits out a partition; returns the latency to add now.
async fn clearance(fault: &mut watch::Receiver<Fault>) -> Duration {
    loop {
        let now = Instant::now();
        let current = *fault.borrow_and_update();
        match current {
            Fault::Partition { until } if now < until => {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => {}
                    changed = fault.changed() => if changed.is_err() { return Duration::ZERO },
                }
            }
            Fault::Latency { add, until } if now < until => return add,
            _ => return Duration::ZERO,
        }
    }
}

async fn serve(listener: TcpListener, upstream: String, fault: watch::Receiver<Fault>) {
    loop {
        // An accept that fails (out of file descriptors, a connection
        // reset before it was taken) ends no proxy: the daemon would never
        // reach its broker again.
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "fault proxy: could not accept a connection; trying again");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let upstream = upstream.clone();
        let fault = fault.clone();
        tokio::spawn(async move {
            if let Err(error) = connect(client, &upstream, fault).await {
                tracing::debug!(%peer, %upstream, %error, "fault proxy connection ended");
            }
        });
    }
}

async fn connect(
    client: TcpStream,
    upstream: &str,
    mut fault: watch::Receiver<Fault>,
) -> std::io::Result<()> {
    // A new connection waits out a partition too, unless its client gives
    // up first (it reconnects every few seconds: each attempt held would
    // keep a file descriptor until the partition ends).
    let mut probe = [0u8; 1];
    tokio::select! {
        _ = clearance(&mut fault) => {}
        peeked = client.peek(&mut probe) => match peeked {
            Ok(0) | Err(_) => return Ok(()),
            // It wrote first (NATS clients wait for the server's INFO):
            // held until the partition ends, as before.
            Ok(_) => {
                clearance(&mut fault).await;
            }
        },
    }
    let server = TcpStream::connect(upstream).await?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        result = pump(client_read, server_write, fault.clone()) => result,
        result = pump(server_read, client_write, fault) => result,
    }
}

async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    mut fault: watch::Receiver<Fault>,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(read) => read,
            Err(error) => {
                clearance(&mut fault).await;
                return Err(error);
            }
        };
        if read == 0 {
            // A close crosses no partition either.
            clearance(&mut fault).await;
            return to.shutdown().await;
        }
        let delay = clearance(&mut fault).await;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        to.write_all(&buffer[..read]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that connects during a partition and gives up before it
    /// ends is let go: its connection is not carried to the broker once
    /// the partition is over (a reconnecting client would otherwise leave
    /// one held per attempt).
    #[tokio::test]
    async fn a_client_gone_during_a_partition_is_let_go() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = upstream.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = upstream.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(socket);
            }
        });
        let proxy = FaultProxy::start(&[format!("nats://{address}")])
            .await
            .unwrap();
        let local = reqwest::Url::parse(&proxy.urls()[0]).unwrap();
        let local = format!("127.0.0.1:{}", local.port().unwrap());
        proxy.partition(Duration::from_millis(500));
        drop(TcpStream::connect(&local).await.unwrap());
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
        // A client that stays is carried once the partition is over.
        let _kept = TcpStream::connect(&local).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
