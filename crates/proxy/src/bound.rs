//! Listeners a Sidecar has the proxy bind itself (Istio's captureMode
//! NONE, and unix sockets): the application calls them, nothing
//! redirects. Like the gateway's, they follow reloads: a reload binds what
//! it adds before it is swapped in (a listener that cannot be bound
//! refuses the reload) and then stops accepting on what it removed.
//!
//! An egress listener serves connections as if captured on their way to
//! its port; one on a unix socket serves HTTP whose requests name their
//! host, as the explicit proxy does. An ingress listener serves
//! connections on their way in to its port, on to its `defaultEndpoint`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use meshgate_config::view::BoundListener;
use tokio::net::{TcpListener, UnixListener};

use crate::conn::Conn;
use crate::listener::accept_loop;
use crate::proxy::Proxy;
use crate::snapshot::Snapshot;

#[derive(Debug, thiserror::Error)]
pub enum BoundError {
    #[error("cannot listen on {bind} (Sidecar {direction} listener, port {port})")]
    Bind {
        bind: String,
        direction: &'static str,
        port: u32,
        #[source]
        source: std::io::Error,
    },
}

/// The running listeners, by what the Sidecar says.
#[derive(Debug, Default)]
pub struct BoundSet {
    running: HashMap<BoundListener, Running>,
}

#[derive(Debug)]
struct Running {
    local: String,
    task: tokio::task::AbortHandle,
}

enum Socket {
    Tcp(TcpListener, SocketAddr),
    Unix(UnixListener),
}

/// Listeners bound for a snapshot that is not serving yet.
pub struct Prepared(Vec<(BoundListener, Socket)>);

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(l, _)| l))
            .finish()
    }
}

impl BoundSet {
    /// Binds the listeners `snap` has and this set does not run yet.
    pub async fn prepare(&self, snap: &Snapshot) -> Result<Prepared, BoundError> {
        let mut out = Vec::new();
        for l in &snap.view.bound_listeners {
            if !self.running.contains_key(l) {
                out.push((l.clone(), bind(l).await?));
            }
        }
        Ok(Prepared(out))
    }

    /// Serves what `prepare` bound and stops the listeners `snap` no longer
    /// has. Call after `snap` is the proxy's state.
    pub fn apply(&mut self, proxy: &Arc<Proxy>, snap: &Snapshot, prepared: Prepared) {
        let wanted = &snap.view.bound_listeners;
        self.running.retain(|l, r| {
            let keep = wanted.contains(l);
            if !keep {
                tracing::info!(address = %r.local, port = l.port, "sidecar listener removed");
                r.task.abort();
            }
            keep
        });
        for (l, socket) in prepared.0 {
            let (local, task) = match socket {
                Socket::Tcp(listener, local) => (
                    local.to_string(),
                    tokio::spawn(serve_tcp(proxy.clone(), listener, local, l.clone())),
                ),
                Socket::Unix(listener) => (
                    l.bind.clone(),
                    tokio::spawn(serve_unix(proxy.clone(), listener)),
                ),
            };
            tracing::info!(address = %local, port = l.port, inbound = l.inbound, "sidecar listener bound");
            let task = task.abort_handle();
            self.running.insert(l, Running { local, task });
        }
    }

    /// Each running listener and where it listens (`ip:port`, or the
    /// `unix://` name).
    pub fn addresses(&self) -> Vec<(BoundListener, String)> {
        self.running
            .iter()
            .map(|(l, r)| (l.clone(), r.local.clone()))
            .collect()
    }
}

impl Drop for BoundSet {
    fn drop(&mut self) {
        for r in self.running.values() {
            r.task.abort();
        }
    }
}

async fn bind(l: &BoundListener) -> Result<Socket, BoundError> {
    let err = |source| BoundError::Bind {
        bind: l.bind.clone(),
        direction: if l.inbound { "ingress" } else { "egress" },
        port: l.port,
        source,
    };
    if let Some(name) = crate::unix::socket_name(&l.bind) {
        return crate::unix::bind(name).map(Socket::Unix).map_err(err);
    }
    let ip: IpAddr = l.bind.parse().map_err(|_| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not an IP address",
        ))
    })?;
    let port = u16::try_from(l.port).unwrap_or(0);
    let listener = TcpListener::bind((ip, port)).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok(Socket::Tcp(listener, local))
}

/// An egress listener's connections go as if captured on their way to its
/// port; an ingress listener's come in to its port.
async fn serve_tcp(proxy: Arc<Proxy>, listener: TcpListener, local: SocketAddr, l: BoundListener) {
    let port = u16::try_from(l.port).unwrap_or(local.port());
    accept_loop(listener, |tcp, remote| {
        let mut conn = Conn::accepted(remote, local, port);
        if l.inbound {
            conn.inbound = true;
            conn.original_dst = Some(local);
        } else {
            conn.bound = true;
        }
        tokio::spawn(crate::connection::serve(proxy.clone(), conn, tcp));
    })
    .await;
}

/// A unix socket has no port: its requests name their host (and port).
async fn serve_unix(proxy: Arc<Proxy>, listener: UnixListener) {
    let nowhere = SocketAddr::from(([0, 0, 0, 0], 0));
    accept_loop(listener, |stream, ()| {
        let mut conn = Conn::accepted(nowhere, nowhere, 0);
        conn.explicit = true;
        tokio::spawn(crate::connection::serve(proxy.clone(), conn, stream));
    })
    .await;
}
