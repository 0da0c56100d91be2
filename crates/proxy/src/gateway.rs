//! The egress gateway's listeners: one accept loop per Gateway server port,
//! following reloads. What a connection is (mesh mutual TLS or plaintext on
//! an HTTP server, TLS terminated or passed through) is the plan's decision
//! (`plan.rs`).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::conn::Conn;
use crate::listener::accept_loop;
use crate::proxy::Proxy;
use crate::snapshot::Snapshot;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr} (Gateway server port {port})")]
    Bind {
        addr: SocketAddr,
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

/// A bound listener, ready to serve.
#[derive(Debug)]
pub struct BoundListener {
    pub listener: TcpListener,
    /// The Gateway server port routes match on.
    pub port: u16,
    pub local: SocketAddr,
}

/// The gateway's running listeners, one accept task per Gateway server port.
/// A reload binds the ports the new config adds before the config is
/// swapped in (a port that cannot be bound refuses the reload), then stops
/// accepting on ports it removed; connections already accepted finish.
#[derive(Debug)]
pub struct ListenerSet {
    ip: IpAddr,
    /// Server port -> port to bind instead (0 = any free port), so several
    /// proxies can share one host.
    overrides: HashMap<u16, u16>,
    /// Ports not overridden bind any free port.
    any_free_port: bool,
    running: BTreeMap<(u16, u16), Running>,
}

#[derive(Debug)]
struct Running {
    local: SocketAddr,
    task: tokio::task::AbortHandle,
}

/// Listeners bound for a snapshot that is not serving yet.
#[derive(Debug)]
pub struct Prepared(Vec<((u16, u16), BoundListener)>);

impl ListenerSet {
    pub fn new(ip: IpAddr, overrides: HashMap<u16, u16>, any_free_port: bool) -> Self {
        ListenerSet {
            ip,
            overrides,
            any_free_port,
            running: BTreeMap::new(),
        }
    }

    fn wanted(&self, snap: &Snapshot) -> Vec<(u16, u16)> {
        snap.listeners
            .iter()
            .map(|l| {
                (
                    l.port,
                    match self.overrides.get(&l.port) {
                        Some(p) => *p,
                        None if self.any_free_port => 0,
                        None => l.bind_port,
                    },
                )
            })
            .collect()
    }

    /// Binds the listeners `snap` has and this set does not run yet.
    pub async fn prepare(&self, snap: &Snapshot) -> Result<Prepared, GatewayError> {
        let mut out = Vec::new();
        for key in self.wanted(snap) {
            if !self.running.contains_key(&key) {
                out.push((key, bind_one(self.ip, key.0, key.1).await?));
            }
        }
        Ok(Prepared(out))
    }

    /// Serves what `prepare` bound and stops the listeners `snap` no longer
    /// has. Call after `snap` is the proxy's state.
    pub fn apply(&mut self, proxy: &Arc<Proxy>, snap: &Snapshot, prepared: Prepared) {
        let wanted = self.wanted(snap);
        self.running.retain(|key, r| {
            let keep = wanted.contains(key);
            if !keep {
                tracing::info!(address = %r.local, server_port = key.0, "listener removed");
                r.task.abort();
            }
            keep
        });
        for (key, bound) in prepared.0 {
            let local = bound.local;
            let task = tokio::spawn(serve(proxy.clone(), bound));
            self.running.insert(
                key,
                Running {
                    local,
                    task: task.abort_handle(),
                },
            );
        }
    }

    /// (server port, bound address) of every running listener.
    pub fn addresses(&self) -> Vec<(u16, SocketAddr)> {
        self.running
            .iter()
            .map(|(key, r)| (key.0, r.local))
            .collect()
    }
}

impl Drop for ListenerSet {
    fn drop(&mut self) {
        for r in self.running.values() {
            r.task.abort();
        }
    }
}

async fn bind_one(ip: IpAddr, port: u16, bind_port: u16) -> Result<BoundListener, GatewayError> {
    let addr = SocketAddr::new(ip, bind_port);
    let err = |source| GatewayError::Bind { addr, port, source };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    tracing::info!(address = %local, server_port = port, "listener bound");
    Ok(BoundListener {
        listener,
        port,
        local,
    })
}

/// Serves one bound listener until the task is dropped.
pub async fn serve(proxy: Arc<Proxy>, bound: BoundListener) {
    let (port, local) = (bound.port, bound.local);
    accept_loop(bound.listener, |tcp, remote| {
        let conn = Conn::accepted(remote, local, port);
        tokio::spawn(crate::connection::serve(proxy.clone(), conn, tcp));
    })
    .await;
}
