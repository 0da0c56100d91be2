//! TCP the proxy passes through (TLS routed by SNI, opaque bytes): connect
//! where the plan says and splice bytes both ways, or close as it says.
//! Reported (Istio's TCP metrics, a `"- - -"` access-log line) when the
//! connection ends, however it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use meshgate_telemetry::LogEntry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::conn::Conn;
use crate::error::ConnError;
use crate::labels::{DestinationLabels, unknown};
use crate::listener::Sniffed;
use crate::plan::{TcpAction, TcpPlan, TcpReason};
use crate::proxy::Proxy;
use crate::report::TcpReport;
use crate::snapshot::{BLACKHOLE_CLUSTER, InboundTarget, Snapshot};
use crate::upstream::UpstreamError;

/// Acts on a TCP plan for a connection whose first bytes (`io` replays
/// them) may have carried `sni`.
pub async fn forward<S>(
    proxy: &Proxy,
    snap: &Snapshot,
    conn: &Conn,
    plan: &TcpPlan<'_>,
    mut io: Sniffed<S>,
    sni: Option<&str>,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let destination = match (plan.cluster, plan.reason) {
        _ if conn.inbound => snap.inbound_destination(conn.port),
        (Some(c), _) => c.labels.clone(),
        (None, TcpReason::BlackHole | TcpReason::ToCapturePort) => {
            DestinationLabels::named(Arc::from(BLACKHOLE_CLUSTER))
        }
        // The client's SNI is no label value (see http.rs).
        (None, _) => DestinationLabels::named(unknown()),
    };
    let log = LogEntry {
        start_time: Some(SystemTime::now()),
        downstream_local_address: Some(conn.downstream_local()),
        downstream_remote_address: Some(conn.remote),
        requested_server_name: sni.map(str::to_owned),
        route_name: plan.route.map(|r| r.name.to_string()),
        downstream_peer_uri_san: conn.peer().map(|p| p.uri.to_string()),
        upstream_cluster: plan.cluster_name().map(str::to_owned),
        ..LogEntry::default()
    };
    let mut report = TcpReport::start(proxy, snap, destination, log);
    if conn.inbound {
        report.inbound = Some(conn.tls.as_ref().and_then(|t| t.peer.clone()));
    }
    // What was read to decide counts as received until it is replayed.
    report.received = io.buffered() as u64;
    let plain = |r: Result<(TcpStream, SocketAddr), UpstreamError>| {
        r.map(|(tcp, addr)| {
            let local = tcp.local_addr().ok();
            (Upstream::Plain(tcp), addr, local)
        })
    };
    let connected = match (plan.action, plan.cluster) {
        (TcpAction::Close(flags), _) => {
            report.flags = flags;
            report.log.connection_termination_details = plan.authz.response_code_details();
            return Err(ConnError::NotForwarded(plan.reason));
        }
        // A tcp route's cluster speaks its own TLS (mesh mTLS, origination);
        // SNI-routed TLS is the client's and passes through as it is.
        (TcpAction::Forward, Some(c)) if plan.reason == TcpReason::TcpRoute => c
            .cluster
            .connect_stream()
            .await
            .map(|(s, addr, local)| (Upstream::Cluster(Box::new(s)), addr, local)),
        (TcpAction::Forward, Some(c)) => plain(c.cluster.connect_tcp().await),
        (TcpAction::OriginalDst, Some(c)) => {
            let to = original_destination(conn, &c.cluster).await?;
            match (snap.inbound_target(conn, to), plan.reason) {
                (InboundTarget::Unix(name), _) => crate::unix::connect(name)
                    .await
                    .map(|s| (Upstream::Unix(s), to, None))
                    .map_err(|e| {
                        UpstreamError::ConnectFailure(format!("delayed connect error: {e}"))
                    }),
                (InboundTarget::Addr(to), TcpReason::Inbound) => {
                    plain(c.cluster.connect_tcp_inbound(to).await)
                }
                (InboundTarget::Addr(to), _) => plain(c.cluster.connect_tcp_to(to).await),
            }
        }
        (_, None) => return Err(ConnError::NotForwarded(TcpReason::NoCluster)),
    };
    let tunneled = match (connected, plan.cluster) {
        (Ok((mut upstream, addr, local)), Some(c)) => upstream
            .open_tunnel(&c.cluster)
            .await
            .map(|()| (upstream, addr, local)),
        (connected, _) => connected,
    };
    let (upstream, addr, local) = match tunneled {
        Ok(x) => x,
        Err(e) => {
            report.flags = e.flag();
            report.log.upstream_transport_failure_reason = Some(e.to_string());
            return Err(e.into());
        }
    };
    if !matches!(upstream, Upstream::Unix(_)) {
        report.log.upstream_host = Some(addr);
    }
    report.log.upstream_local_address = local;
    let copied = match upstream {
        Upstream::Plain(mut s) => tokio::io::copy_bidirectional(&mut io, &mut s).await,
        Upstream::Cluster(mut s) => tokio::io::copy_bidirectional(&mut io, &mut *s).await,
        Upstream::Unix(mut s) => tokio::io::copy_bidirectional(&mut io, &mut s).await,
    };
    let (received, sent) = copied.unwrap_or((0, 0));
    report.received = received;
    report.sent = sent;
    Ok(())
}

/// Where the application was connecting: the original destination, or the
/// host a CONNECT request named (resolved as the cluster resolves: with
/// the proxy's DNS server).
async fn original_destination(
    conn: &Conn,
    cluster: &crate::upstream::Cluster,
) -> Result<SocketAddr, ConnError> {
    if let Some(addr) = conn.original_dst {
        return Ok(addr);
    }
    let host = conn.connect_host.as_deref().unwrap_or_default();
    let ip = cluster.resolve(host).await;
    ip.map(|ip| SocketAddr::new(ip, conn.port))
        .ok_or_else(|| ConnError::Resolve(host.to_owned()))
}

/// The upstream side of a forwarded connection.
enum Upstream {
    Plain(TcpStream),
    /// To a cluster, with its TLS if it has any.
    Cluster(Box<crate::upstream::Conn>),
    /// A Sidecar ingress `defaultEndpoint` on a unix socket.
    Unix(tokio::net::UnixStream),
}

impl Upstream {
    /// The CONNECT tunnel the cluster's DestinationRule asks for, if any.
    async fn open_tunnel(
        &mut self,
        cluster: &crate::upstream::Cluster,
    ) -> Result<(), UpstreamError> {
        match self {
            Upstream::Plain(s) => cluster.open_tunnel(s).await,
            Upstream::Cluster(s) => cluster.open_tunnel(&mut **s).await,
            Upstream::Unix(s) => cluster.open_tunnel(s).await,
        }
    }
}
