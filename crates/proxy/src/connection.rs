//! A downstream connection from accept to close, the same for sidecars and
//! gateways: ask the plan, read what it needs (the first byte, the
//! ClientHello), then terminate TLS and serve HTTP, or pass the bytes
//! through, as the plan says.

use std::convert::Infallible;
use std::sync::Arc;

use meshgate_identity::tls::{handshake_error_reason, peer_identity};
use meshgate_telemetry::Refused;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;

use crate::conn::{Conn, Peer, Terminated};
use crate::error::ConnError;
use crate::listener::Sniffed;
use crate::plan::{Need, Peeked, Plan, Termination, plan};
use crate::proxy::Proxy;

/// What has been read from a connection, owned.
enum Read {
    Nothing,
    FirstByte(bool),
    ClientHello(Option<String>),
    Silent,
}

impl Read {
    fn peeked(&self) -> Peeked<'_> {
        match self {
            Read::Nothing => Peeked::Nothing,
            Read::FirstByte(tls) => Peeked::FirstByte { tls: *tls },
            Read::ClientHello(sni) => Peeked::ClientHello {
                sni: sni.as_deref(),
            },
            Read::Silent => Peeked::Silent,
        }
    }
}

/// Serves one connection until it ends; counted for the drain. Beyond the
/// proxy's connection limit it is closed unread, as Envoy's overload
/// manager closes it.
pub async fn serve<S>(proxy: Arc<Proxy>, conn: Conn, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let remote = conn.remote;
    let Some(_open) = proxy.drain.admit(proxy.max_connections) else {
        proxy
            .metrics
            .refused(Refused::downstream_global_cx_overflow);
        tracing::debug!(%remote, "connection closed: the proxy's connection limit is reached");
        return;
    };
    let metrics = proxy.metrics.clone();
    if let Err(e) = drive(proxy, conn, io).await {
        match e {
            ConnError::Idle(_) => metrics.refused(Refused::downstream_pre_cx_timeout),
            ConnError::HandshakeTimeout(_) => {
                metrics.refused(Refused::downstream_cx_transport_socket_connect_timeout);
            }
            _ => {}
        }
        tracing::debug!(%remote, fault = e.fault().as_str(), error = %e, "connection closed");
    }
}

async fn drive<S>(proxy: Arc<Proxy>, mut conn: Conn, io: S) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let snap = proxy.state.load_full();
    let mut io = Sniffed::new(io);
    let mut read = Read::Nothing;
    // Each step reads more, and there are two things to read.
    for _ in 0..3 {
        match plan(&snap, &conn, read.peeked(), fastrand::f64()) {
            Plan::Read(Need::FirstByte) => {
                match io.starts_with_tls(proxy.timeouts.first_byte).await? {
                    Some(tls) => read = Read::FirstByte(tls),
                    None => return Ok(()),
                }
            }
            Plan::Read(Need::FirstByteOrSilence(wait)) => {
                read = match io.starts_with_tls(wait).await {
                    Ok(Some(tls)) => Read::FirstByte(tls),
                    Ok(None) => return Ok(()),
                    Err(ConnError::Idle(_)) => Read::Silent,
                    Err(e) => return Err(e),
                };
            }
            Plan::Read(Need::ClientHello) => {
                read = Read::ClientHello(io.client_hello(proxy.timeouts.first_byte).await?);
            }
            Plan::ServeHttp => return serve_http(proxy, conn, io).await,
            Plan::Terminate(t) => {
                let tls = terminate(&proxy, &mut conn, io, t).await?;
                // What was inside the TLS: a TCP server's bytes go by its
                // `tcp` routes, everything else is HTTP.
                if let Plan::Tcp(p) = plan(&snap, &conn, Peeked::Nothing, fastrand::f64()) {
                    let io = Sniffed::new(tls);
                    return crate::tcp::forward(&proxy, &snap, &conn, &p, io, None).await;
                }
                return serve_http(proxy, conn, tls).await;
            }
            Plan::Tcp(p) => {
                let sni = match &read {
                    Read::ClientHello(sni) => sni.as_deref(),
                    _ => None,
                };
                return crate::tcp::forward(&proxy, &snap, &conn, &p, io, sni).await;
            }
            Plan::Close(refusal) => return Err(refusal.into()),
            // Requests are planned from their heads, on connections
            // served as HTTP.
            Plan::Request(_) => return Ok(()),
        }
    }
    Ok(())
}

/// Terminates TLS (bounded by the handshake timeout) and records what the
/// handshake says: the SNI and the peer's SPIFFE identity.
async fn terminate<S>(
    proxy: &Proxy,
    conn: &mut Conn,
    io: Sniffed<S>,
    how: Termination,
) -> Result<tokio_rustls::server::TlsStream<Sniffed<S>>, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = match how {
        Termination::Mesh => TlsAcceptor::from(proxy.mesh_tls.clone()),
        Termination::Server(config) => TlsAcceptor::from(config),
    };
    let limit = proxy.timeouts.handshake;
    let stream = tokio::time::timeout(limit, acceptor.accept(io))
        .await
        .map_err(|_| ConnError::HandshakeTimeout(limit))?
        .map_err(|e| ConnError::Handshake(handshake_error_reason(&e)))?;
    let session = stream.get_ref().1;
    let peer = peer_identity(session.peer_certificates())
        .map(|id| Arc::new(Peer::new(id, &proxy.trust_domain)));
    // Who called, for the application behind (a gateway's upstreams, a
    // sidecar's workload on the way in).
    let tells_caller = proxy.is_gateway() || conn.inbound;
    let client_cert = match (tells_caller, session.peer_certificates(), &peer) {
        (true, Some([leaf, ..]), Some(peer)) => client_cert_header(&proxy.identity, leaf, peer),
        _ => None,
    };
    conn.tls = Some(Terminated {
        sni: session.server_name().map(Arc::from),
        peer,
        client_cert,
    });
    Ok(stream)
}

/// Envoy's `x-forwarded-client-cert` for a verified client certificate:
/// who received it (`By`), its SHA-256 (`Hash`) and its SPIFFE ID (`URI`).
fn client_cert_header(
    by: &str,
    leaf: &rustls_pki_types::CertificateDer<'_>,
    peer: &Peer,
) -> Option<http::HeaderValue> {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref());
    let hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let value = format!("By={by};Hash={hash};URI={}", peer.uri);
    http::HeaderValue::from_str(&value).ok()
}

async fn serve_http<I>(proxy: Arc<Proxy>, conn: Conn, io: I) -> Result<(), ConnError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let drain = proxy.drain.clone();
    let timeouts = proxy.timeouts;
    let metrics = proxy.metrics.clone();
    let conn = Arc::new(conn);
    let svc = hyper::service::service_fn(move |req| {
        let (proxy, conn) = (proxy.clone(), conn.clone());
        // Not boxed: HTTP/1.1 keeps it in the connection's state (one
        // allocation per connection, not per request); HTTP/2 boxes each
        // stream's task as it is spawned (`BoxingExecutor`).
        async move { Ok::<_, Infallible>(proxy.handle(&conn, req).await) }
    });
    crate::listener::serve_http(io, svc, &drain, &timeouts, &metrics).await
}
