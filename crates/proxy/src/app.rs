//! A whole proxy, running: its traffic listeners (a sidecar's outbound
//! port, a gateway's servers, which follow reloads) over one `Proxy`. The
//! `meshgate` binary and the tests build proxies the same way (ztunnel's
//! `app::build`): nothing here reads files or flags.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::bound::BoundSet;
use crate::gateway::{GatewayError, ListenerSet};
use crate::proxy::Proxy;
use crate::sidecar::OriginalDst;
use crate::snapshot::{Role, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error(transparent)]
    Bound(#[from] crate::bound::BoundError),
    #[error("cannot listen on {addr} (outbound capture)")]
    Outbound {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where a proxy listens.
#[derive(Debug, Clone)]
pub struct Options {
    /// The address a gateway's server ports bind.
    pub bind: IpAddr,
    /// A gateway's server port → the port to bind instead (0: any free
    /// port), so several proxies can share one host.
    pub port_overrides: HashMap<u16, u16>,
    /// Every Gateway server port not overridden binds any free port.
    pub any_free_port: bool,
    /// A sidecar's outbound listener (istio's 15001).
    pub outbound: SocketAddr,
    pub original_dst: OriginalDst,
    /// A sidecar serves connections made to its outbound listener itself
    /// as an explicit HTTP proxy (`curl -x`); without it they are closed.
    pub explicit_proxy: bool,
    /// A sidecar's inbound capture listener (Istio's 15006), when inbound
    /// traffic is captured.
    pub inbound: Option<SocketAddr>,
}

/// A running proxy.
#[derive(Debug)]
pub struct App {
    pub proxy: Arc<Proxy>,
    listeners: Listeners,
}

#[derive(Debug)]
enum Listeners {
    Gateway(ListenerSet),
    Sidecar {
        port: u16,
        local: SocketAddr,
        task: tokio::task::AbortHandle,
        /// `capture_for` listeners.
        captures: Vec<tokio::task::AbortHandle>,
        /// The listeners its Sidecar has it bind (captureMode NONE).
        bound: BoundSet,
    },
}

impl App {
    /// Binds the proxy's listeners and serves them.
    pub async fn start(proxy: Arc<Proxy>, options: &Options) -> Result<App, AppError> {
        let listeners = match proxy.role {
            Role::Gateway => {
                let mut set = ListenerSet::new(
                    options.bind,
                    options.port_overrides.clone(),
                    options.any_free_port,
                );
                let snap = proxy.state.load_full();
                let prepared = set.prepare(&snap).await?;
                set.apply(&proxy, &snap, prepared);
                Listeners::Gateway(set)
            }
            Role::Sidecar => {
                let addr = options.outbound;
                let (l, local) = bind_outbound(addr).await?;
                tracing::info!(address = %local, "outbound listener bound");
                let task = tokio::spawn(crate::sidecar::serve(
                    proxy.clone(),
                    l,
                    options.original_dst,
                    options.explicit_proxy,
                ));
                let mut bound = BoundSet::default();
                let snap = proxy.state.load_full();
                let prepared = bound.prepare(&snap).await?;
                bound.apply(&proxy, &snap, prepared);
                let mut captures = Vec::new();
                if let Some(addr) = options.inbound {
                    let (l, local) = bind_outbound(addr).await?;
                    tracing::info!(address = %local, "inbound listener bound");
                    let inbound = tokio::spawn(crate::sidecar::serve_inbound(
                        proxy.clone(),
                        l,
                        options.original_dst,
                    ));
                    captures.push(inbound.abort_handle());
                }
                Listeners::Sidecar {
                    port: addr.port(),
                    local,
                    task: task.abort_handle(),
                    captures,
                    bound,
                }
            }
        };
        Ok(App { proxy, listeners })
    }

    /// (port, bound address) of every traffic listener: a gateway's by
    /// server port, a sidecar's outbound one by the port asked for.
    pub fn addresses(&self) -> Vec<(u16, SocketAddr)> {
        match &self.listeners {
            Listeners::Gateway(set) => set.addresses(),
            Listeners::Sidecar { port, local, .. } => vec![(*port, *local)],
        }
    }

    /// A sidecar's listeners its Sidecar has it bind, and where each
    /// listens.
    pub fn bound_addresses(&self) -> Vec<(meshgate_config::view::BoundListener, String)> {
        match &self.listeners {
            Listeners::Sidecar { bound, .. } => bound.addresses(),
            Listeners::Gateway(_) => Vec::new(),
        }
    }

    /// A sidecar listener on `ip` (any free port) that takes every
    /// connection as captured on its way to `original`: the sidecar's
    /// decisions after capture, where nothing redirects (tests run as any
    /// user). Its address; `None` for a gateway.
    pub async fn capture_for(
        &mut self,
        ip: IpAddr,
        original: SocketAddr,
    ) -> Result<Option<SocketAddr>, AppError> {
        self.capture(ip, original, false).await
    }

    /// The same for connections on their way in to the workload (as
    /// iptables redirects them to 15006).
    pub async fn capture_inbound_for(
        &mut self,
        ip: IpAddr,
        original: SocketAddr,
    ) -> Result<Option<SocketAddr>, AppError> {
        self.capture(ip, original, true).await
    }

    async fn capture(
        &mut self,
        ip: IpAddr,
        original: SocketAddr,
        inbound: bool,
    ) -> Result<Option<SocketAddr>, AppError> {
        let Listeners::Sidecar { captures, .. } = &mut self.listeners else {
            return Ok(None);
        };
        let (l, local) = bind_outbound(SocketAddr::new(ip, 0)).await?;
        let (proxy, how) = (self.proxy.clone(), OriginalDst::Fixed(original));
        let task = if inbound {
            tokio::spawn(crate::sidecar::serve_inbound(proxy, l, how))
        } else {
            tokio::spawn(crate::sidecar::serve(proxy, l, how, false))
        };
        captures.push(task.abort_handle());
        Ok(Some(local))
    }

    /// Applies a new snapshot: a gateway binds the ports it adds first (a
    /// port that cannot be bound refuses the whole snapshot), then it is
    /// swapped in, then removed ports stop accepting.
    pub async fn reload(&mut self, snap: Snapshot) -> Result<(), AppError> {
        let snap = Arc::new(snap);
        match &mut self.listeners {
            Listeners::Gateway(set) => {
                let prepared = set.prepare(&snap).await?;
                self.proxy.state.store(snap.clone());
                set.apply(&self.proxy, &snap, prepared);
            }
            Listeners::Sidecar { bound, .. } => {
                let prepared = bound.prepare(&snap).await?;
                self.proxy.state.store(snap.clone());
                bound.apply(&self.proxy, &snap, prepared);
            }
        }
        Ok(())
    }

    /// Stops accepting, lets connections finish within `limit`, and
    /// returns how many were still open.
    pub async fn drain(self, limit: Duration) -> usize {
        let App { proxy, listeners } = self;
        // Dropped listeners stop accepting (their tasks are aborted).
        drop(listeners);
        proxy.drain.drain(limit).await
    }
}

async fn bind_outbound(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), AppError> {
    let err = |source| AppError::Outbound { addr, source };
    let l = TcpListener::bind(addr).await.map_err(err)?;
    let local = l.local_addr().map_err(err)?;
    Ok((l, local))
}

impl Drop for Listeners {
    fn drop(&mut self) {
        if let Listeners::Sidecar { task, captures, .. } = self {
            task.abort();
            for c in captures {
                c.abort();
            }
        }
    }
}
