//! The egress gateway's listeners: one plain accept loop per Gateway server
//! port. A plain HTTP server also accepts mutual TLS from mesh peers (TLS is
//! detected on the first byte), unless PeerAuthentication is STRICT, which
//! refuses plaintext. The caller's SPIFFE ID comes from the handshake.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use meshgate_identity::WorkloadIdentity;
use meshgate_identity::tls::{handshake_error_reason, mesh_server_config, peer_identity};
use tokio::net::{TcpListener, TcpStream};

use crate::proxy::{ConnInfo, FIRST_BYTE_TIMEOUT, Proxy};
use crate::state::{ListenerTls, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr} (Gateway server port {port}): {source}")]
    Bind {
        addr: SocketAddr,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
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
    identity: Arc<WorkloadIdentity>,
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
    pub fn new(ip: IpAddr, overrides: HashMap<u16, u16>, identity: Arc<WorkloadIdentity>) -> Self {
        ListenerSet {
            ip,
            overrides,
            identity,
            running: BTreeMap::new(),
        }
    }

    fn wanted(&self, snap: &Snapshot) -> Vec<(u16, u16)> {
        snap.listeners
            .iter()
            .map(|l| {
                (
                    l.port,
                    self.overrides.get(&l.port).copied().unwrap_or(l.bind_port),
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
            let (proxy, identity) = (proxy.clone(), self.identity.clone());
            let task = tokio::spawn(async move {
                if let Err(e) = serve(proxy, identity, bound).await {
                    tracing::error!(error = %e, "listener stopped");
                }
            });
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
pub async fn serve(
    proxy: Arc<Proxy>,
    identity: Arc<WorkloadIdentity>,
    bound: BoundListener,
) -> Result<(), GatewayError> {
    // Built once: the certificate inside is read per handshake from the
    // live identity, so rotation needs no rebuild.
    let mesh = tokio_rustls::TlsAcceptor::from(
        mesh_server_config(&identity, &[b"h2", b"http/1.1"])
            .map_err(|e| GatewayError::Tls(e.to_string()))?,
    );
    let trust_domain: Arc<str> = Arc::from(identity.id().trust_domain());
    loop {
        let (tcp, remote) = match bound.listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (proxy, mesh, port, local, td) = (
            proxy.clone(),
            mesh.clone(),
            bound.port,
            bound.local,
            trust_domain.clone(),
        );
        tokio::spawn(async move {
            let _open = proxy.drain.connection();
            if let Err(reason) = connection(proxy, mesh, tcp, remote, local, port, &td).await {
                tracing::debug!(%remote, reason, "connection closed");
            }
        });
    }
}

async fn connection(
    proxy: Arc<Proxy>,
    mesh: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    port: u16,
    trust_domain: &str,
) -> Result<(), String> {
    let (tls_mode, strict) = {
        let snap = proxy.state.load();
        let l = snap.listener(port).ok_or("listener no longer configured")?;
        (l.tls.clone(), l.strict_mtls)
    };
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(FIRST_BYTE_TIMEOUT, tcp.peek(&mut first))
        .await
        .map_err(|_| "no data from client")?
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Ok(());
    }
    let is_tls = first[0] == 0x16;
    let mut info = ConnInfo {
        remote,
        local,
        listener_port: port,
        peer: None,
        peer_namespace: None,
        tls: false,
        sni: None,
        original_dst: None,
        explicit: false,
    };
    match (tls_mode, is_tls) {
        (ListenerTls::MeshAuto, true) => {
            let stream = mesh
                .accept(tcp)
                .await
                .map_err(|e| format!("mTLS handshake failed: {}", handshake_error_reason(&e)))?;
            fill_peer(&mut info, stream.get_ref().1, trust_domain);
            serve_http(proxy, info, TokioIo::new(stream)).await
        }
        (ListenerTls::MeshAuto, false) if strict => {
            Err("plaintext refused: PeerAuthentication STRICT".into())
        }
        (ListenerTls::MeshAuto, false) => serve_http(proxy, info, TokioIo::new(tcp)).await,
        (ListenerTls::Terminate(cfg), true) => {
            let stream = tokio_rustls::TlsAcceptor::from(cfg)
                .accept(tcp)
                .await
                .map_err(|e| format!("TLS handshake failed: {}", handshake_error_reason(&e)))?;
            fill_peer(&mut info, stream.get_ref().1, trust_domain);
            serve_http(proxy, info, TokioIo::new(stream)).await
        }
        (ListenerTls::Terminate(_), false) => Err("plaintext on a TLS server".into()),
        (ListenerTls::Passthrough, _) => crate::tcp::passthrough(proxy, info, tcp).await,
    }
}

fn fill_peer(info: &mut ConnInfo, conn: &rustls::ServerConnection, trust_domain: &str) {
    info.tls = true;
    info.sni = conn.server_name().map(Arc::from);
    if let Some(id) = peer_identity(conn.peer_certificates()) {
        if id.trust_domain() == trust_domain {
            info.peer_namespace = Some(Arc::from(id.namespace()));
        }
        info.peer = Some(Arc::from(id.to_string().as_str()));
    }
}

async fn serve_http<I>(proxy: Arc<Proxy>, info: ConnInfo, io: TokioIo<I>) -> Result<(), String>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let drain = proxy.drain.clone();
    let info = Arc::new(info);
    let svc = hyper::service::service_fn(move |req| {
        let (proxy, info) = (proxy.clone(), info.clone());
        async move { Ok::<_, Infallible>(proxy.handle(&info, req).await) }
    });
    let server = crate::proxy::http_server();
    crate::drain::serve_until_drained(
        &drain,
        server.serve_connection_with_upgrades(io, svc),
        |c| c.graceful_shutdown(),
    )
    .await
    .map_err(|e| e.to_string())
}
