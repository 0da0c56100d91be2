//! The sidecar's outbound listener (15001): connections redirected by
//! iptables (the original destination from SO_ORIGINAL_DST) and explicit
//! proxy clients (`curl -x`: absolute-form requests and CONNECT) on one port.
//!
//! The original port decides what the connection is, as Envoy's
//! virtualOutbound does: a port with HTTP services is served as HTTP (routed
//! by Host), a port with TLS services by SNI; any other port gets the
//! outbound traffic policy (REGISTRY_ONLY closes it, ALLOW_ANY passes it to
//! the original destination).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::proxy::{ConnInfo, FIRST_BYTE_TIMEOUT, Proxy, ProxyBody, ReportedBody};

/// The address the application was connecting to, when iptables redirected
/// the connection (`None` when it was made to us directly).
pub fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    let sock = socket2::SockRef::from(tcp);
    let orig = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    let orig = orig.ok()?.as_socket()?;
    // Not redirected: the kernel reports our own address.
    (orig != local).then_some(orig)
}

/// Serves the outbound listener until the task is dropped.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let _open = proxy.drain.connection();
            if let Err(reason) = connection(proxy, tcp, remote).await {
                tracing::debug!(%remote, reason, "outbound connection closed");
            }
        });
    }
}

async fn connection(proxy: Arc<Proxy>, tcp: TcpStream, remote: SocketAddr) -> Result<(), String> {
    let local = tcp.local_addr().map_err(|e| e.to_string())?;
    let orig = original_dst(&tcp);
    let info = ConnInfo {
        remote,
        local,
        listener_port: orig.map_or(local.port(), |o| o.port()),
        peer: None,
        peer_namespace: None,
        tls: false,
        sni: None,
        original_dst: orig,
        explicit: orig.is_none(),
    };
    if info.explicit {
        return serve_http(proxy, info, tcp).await;
    }
    let (http_port, tls_port, tcp_port) = {
        let snap = proxy.state.load();
        match snap.listener(info.listener_port) {
            Some(l) => (
                !l.routes.vhosts.is_empty(),
                !l.tls_routes.is_empty(),
                l.protocol == meshgate_config::registry::Protocol::Tcp,
            ),
            None => (false, false, false),
        }
    };
    if tcp_port {
        // A TCP port of a registered service: to the original destination.
        return crate::tcp::registered(proxy, info, tcp).await;
    }
    if !http_port && !tls_port {
        // No listener for this port in the mesh config.
        return crate::tcp::unmatched(proxy, info, tcp).await;
    }
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(FIRST_BYTE_TIMEOUT, tcp.peek(&mut first))
        .await
        .map_err(|_| "no data from the application")?
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Ok(());
    }
    if first[0] == 0x16 {
        crate::tcp::passthrough(proxy, info, tcp).await
    } else if http_port {
        serve_http(proxy, info, tcp).await
    } else {
        crate::tcp::unmatched(proxy, info, tcp).await
    }
}

async fn serve_http(proxy: Arc<Proxy>, info: ConnInfo, tcp: TcpStream) -> Result<(), String> {
    let drain = proxy.drain.clone();
    let info = Arc::new(info);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (proxy, info) = (proxy.clone(), info.clone());
        async move {
            if req.method() == Method::CONNECT {
                return Ok::<_, Infallible>(connect(proxy, &info, req));
            }
            Ok(proxy.handle(&info, req).await)
        }
    });
    let server = crate::proxy::http_server();
    crate::drain::serve_until_drained(
        &drain,
        server.serve_connection_with_upgrades(TokioIo::new(tcp), svc),
        |c| c.graceful_shutdown(),
    )
    .await
    .map_err(|e| e.to_string())
}

fn plain(status: StatusCode, body: &'static str) -> Response<ReportedBody> {
    let mut r = Response::new(ReportedBody::unreported(ProxyBody::Local(
        (!body.is_empty()).then(|| Bytes::from_static(body.as_bytes())),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::SERVER,
        http::HeaderValue::from_static("meshgate"),
    );
    r
}

/// CONNECT host:port from an explicit-proxy client: allowed for hosts the
/// mesh knows on that port (or any host with ALLOW_ANY); the tunnel is then
/// routed like captured traffic to that port.
fn connect(proxy: Arc<Proxy>, conn: &ConnInfo, req: Request<Incoming>) -> Response<ReportedBody> {
    let Some(authority) = req.uri().authority().cloned() else {
        return plain(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
    };
    let port = authority.port_u16().unwrap_or(443);
    let host = authority.host().to_ascii_lowercase();
    let snap = proxy.state.load_full();
    let known = snap.listener(port).is_some_and(|l| {
        crate::state::TlsRoute::find(&l.tls_routes, &host).is_some()
            || l.routes.vhost(&host).is_some()
    });
    let allow_any =
        snap.outbound == Some(meshgate_config::model::networking::OutboundMode::AllowAny);
    if !known && !allow_any {
        // REGISTRY_ONLY, as Istio's block_all.
        return plain(StatusCode::BAD_GATEWAY, "");
    }
    let mut info = conn.clone();
    info.listener_port = port;
    info.explicit = false;
    // ALLOW_ANY to an unknown host: the destination is the one named.
    info.original_dst = None;
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        let io = TokioIo::new(upgraded);
        let result = if known {
            crate::tcp::passthrough(proxy, info, io).await
        } else {
            match tokio::net::lookup_host((host.as_str(), port))
                .await
                .ok()
                .and_then(|mut a| a.next())
            {
                Some(addr) => {
                    info.original_dst = Some(addr);
                    crate::tcp::unmatched(proxy, info, io).await
                }
                None => Err(format!("cannot resolve {host}")),
            }
        };
        if let Err(reason) = result {
            tracing::debug!(reason, "CONNECT tunnel closed");
        }
    });
    plain(StatusCode::OK, "")
}
