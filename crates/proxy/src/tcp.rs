//! TLS passthrough: read the ClientHello, route by its SNI with `tls`
//! routes, authorize the connection (TCP attributes only), and splice bytes
//! to the upstream. Reports Istio's TCP metrics and a `"- - -"` access log
//! line when the connection closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use meshgate_config::model::networking::OutboundMode;
use meshgate_telemetry::LogEntry;
use meshgate_telemetry::metrics::TcpLabels;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::authz::{AuthzRequest, Decision, authorize};
use crate::proxy::{ConnInfo, Proxy};
use crate::state::{BLACKHOLE_CLUSTER, ClusterEntry, Snapshot};

/// A TLS record is at most 16 KiB plus its 5-byte header.
const MAX_HELLO: usize = 16 * 1024 + 5;

#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A complete ClientHello; the SNI if it carries one.
    Complete(Option<String>),
    /// More bytes are needed.
    Partial,
    /// Not a TLS ClientHello.
    NotTls,
}

/// Parses the SNI out of the first TLS record (RFC 8446 4.1.2, RFC 6066 3).
pub fn parse_client_hello(buf: &[u8]) -> Hello {
    if buf.is_empty() {
        return Hello::Partial;
    }
    if buf[0] != 0x16 {
        return Hello::NotTls;
    }
    if buf.len() < 5 {
        return Hello::Partial;
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < 5 + record_len {
        return Hello::Partial;
    }
    let hs = &buf[5..5 + record_len];
    parse_handshake(hs).map_or(Hello::NotTls, Hello::Complete)
}

fn parse_handshake(hs: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(hs);
    if r.u8()? != 1 {
        return None; // not ClientHello
    }
    let len = r.u24()?;
    let mut r = Reader(r.take(len)?);
    r.take(2 + 32)?; // version, random
    let sid = usize::from(r.u8()?);
    r.take(sid)?;
    let suites = usize::from(r.u16()?);
    r.take(suites)?;
    let comp = usize::from(r.u8()?);
    r.take(comp)?;
    if r.0.is_empty() {
        return Some(None); // no extensions
    }
    let ext_len = usize::from(r.u16()?);
    let mut exts = Reader(r.take(ext_len)?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let len = usize::from(exts.u16()?);
        let data = exts.take(len)?;
        if ty == 0 {
            let mut d = Reader(data);
            let list = usize::from(d.u16()?);
            let mut names = Reader(d.take(list)?);
            while !names.0.is_empty() {
                let kind = names.u8()?;
                let n = usize::from(names.u16()?);
                let name = names.take(n)?;
                if kind == 0 {
                    return Some(
                        std::str::from_utf8(name)
                            .ok()
                            .map(|s| s.to_ascii_lowercase()),
                    );
                }
            }
        }
    }
    Some(None)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
}

/// Reads until the ClientHello is complete (bounded), returning the bytes
/// read and the SNI.
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    s: &mut S,
) -> Result<(Vec<u8>, Option<String>), String> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        match parse_client_hello(&buf) {
            Hello::Complete(sni) => return Ok((buf, sni)),
            Hello::NotTls => return Err("not a TLS ClientHello".into()),
            Hello::Partial if buf.len() >= MAX_HELLO => return Err("ClientHello too large".into()),
            Hello::Partial => {}
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(crate::proxy::FIRST_BYTE_TIMEOUT, s.read(&mut chunk))
            .await
            .map_err(|_| "timed out waiting for the ClientHello")?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the ClientHello".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn tcp_labels(
    snap: &Snapshot,
    cluster: Option<&ClusterEntry>,
    host: &str,
    flags: &'static str,
) -> TcpLabels {
    TcpLabels::from(&snap.istio_labels(cluster, host, 0, flags, "tcp"))
}

/// Where a TCP connection goes.
enum Target {
    Cluster(Arc<ClusterEntry>),
    /// PassthroughCluster: the original destination (ALLOW_ANY).
    Original(Arc<ClusterEntry>, SocketAddr),
}

/// Reports one TCP connection when it ends.
struct TcpReport<'a> {
    proxy: &'a Proxy,
    start: Instant,
    log: LogEntry,
}

impl TcpReport<'_> {
    fn finish(mut self, labels: &TcpLabels, sent: u64, received: u64) {
        let m = &self.proxy.metrics;
        m.tcp_opened.get_or_create(labels).inc();
        m.tcp_received_bytes.get_or_create(labels).inc_by(received);
        m.tcp_sent_bytes.get_or_create(labels).inc_by(sent);
        m.tcp_closed.get_or_create(labels).inc();
        self.log.bytes_received = received;
        self.log.bytes_sent = sent;
        self.log.duration = self.start.elapsed().as_millis() as u64;
        self.proxy.access_log.write(&self.log);
    }
}

/// Serves one TLS connection by its SNI: `tls` routes first; with no route
/// a gateway closes the connection (NR) and a sidecar applies its outbound
/// traffic policy.
pub async fn passthrough<S>(proxy: Arc<Proxy>, info: ConnInfo, mut stream: S) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (hello, sni) = read_client_hello(&mut stream).await?;
    let sni = sni.unwrap_or_default();
    let snap = proxy.state.load_full();
    let d = crate::decide::decide_tls(&snap, info.listener_port, &sni, fastrand::f64());
    let target = d
        .cluster
        .and_then(|(i, _)| snap.clusters.get(i).cloned().flatten())
        .map(Target::Cluster);
    let route_name = d.route.map(|r| r.name.to_string());
    forward(
        proxy.clone(),
        &snap,
        info,
        stream,
        hello,
        &sni,
        target,
        route_name,
    )
    .await
}

/// A plain TCP connection to a port the registry does not know (sidecars):
/// ALLOW_ANY passes it to the original destination, REGISTRY_ONLY closes it
/// (BlackHoleCluster).
pub async fn unmatched<S>(proxy: Arc<Proxy>, info: ConnInfo, stream: S) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let snap = proxy.state.load_full();
    forward(
        proxy.clone(),
        &snap,
        info,
        stream,
        Vec::new(),
        "",
        None,
        None,
    )
    .await
}

/// A plain TCP connection to a port of a registered service (sidecars):
/// forwarded to the original destination whatever the outbound policy.
pub async fn registered<S>(proxy: Arc<Proxy>, info: ConnInfo, stream: S) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let snap = proxy.state.load_full();
    let target = match (snap.passthrough, info.original_dst) {
        (Some(i), Some(orig)) => snap
            .clusters
            .get(i)
            .cloned()
            .flatten()
            .map(|pt| Target::Original(pt, orig)),
        _ => None,
    };
    forward(
        proxy.clone(),
        &snap,
        info,
        stream,
        Vec::new(),
        "",
        target,
        None,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn forward<S>(
    proxy: Arc<Proxy>,
    snap: &Snapshot,
    info: ConnInfo,
    mut stream: S,
    hello: Vec<u8>,
    sni: &str,
    target: Option<Target>,
    route_name: Option<String>,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let mut report = TcpReport {
        proxy: &proxy,
        start,
        log: LogEntry {
            start_time: Some(SystemTime::now()),
            response_flags: "-",
            downstream_local_address: Some(info.original_dst.unwrap_or(info.local)),
            downstream_remote_address: Some(info.remote),
            requested_server_name: (!sni.is_empty()).then(|| sni.to_owned()),
            route_name,
            downstream_peer_uri_san: info.peer.as_deref().map(str::to_owned),
            ..LogEntry::default()
        },
    };
    let received_hello = hello.len() as u64;

    let decision = authorize(
        &snap.policies,
        &AuthzRequest {
            principal: info.peer.as_deref(),
            source_ip: info.remote.ip(),
            remote_ip: info.remote.ip(),
            destination_ip: info.local.ip(),
            destination_port: info.listener_port,
            sni: (!sni.is_empty()).then_some(sni),
            http: None,
        },
    );
    let target = match (target, snap.outbound, snap.passthrough, info.original_dst) {
        (Some(t), _, _, _) => t,
        (None, Some(OutboundMode::AllowAny), Some(i), Some(orig)) => {
            match snap.clusters.get(i).cloned().flatten() {
                Some(pt) => Target::Original(pt, orig),
                None => return Err("no PassthroughCluster".into()),
            }
        }
        (None, outbound, _, _) => {
            // Gateways: no filter chain for this SNI (NR). Sidecars with
            // REGISTRY_ONLY: BlackHoleCluster.
            let (flags, name) = match outbound {
                Some(_) => ("UH", BLACKHOLE_CLUSTER),
                None => ("NR", sni),
            };
            report.log.response_flags = flags;
            report.log.upstream_cluster = outbound.map(|_| BLACKHOLE_CLUSTER.to_owned());
            let labels = tcp_labels(snap, None, name, flags);
            report.finish(&labels, 0, received_hello);
            return Err(format!(
                "no route for port {} SNI \"{sni}\"",
                info.listener_port
            ));
        }
    };
    let entry = match &target {
        Target::Cluster(e) | Target::Original(e, _) => e.clone(),
    };
    report.log.upstream_cluster = Some(entry.cluster.name().to_string());
    if let Decision::Deny { .. } = &decision {
        report.log.connection_termination_details = decision.response_code_details();
        let labels = tcp_labels(snap, Some(&entry), sni, "-");
        report.finish(&labels, 0, received_hello);
        return Err("denied by authorization policy".into());
    }
    let connected = match &target {
        Target::Cluster(e) => e.cluster.connect_tcp().await,
        Target::Original(e, orig) => e.cluster.connect_tcp_to(*orig).await,
    };
    let (mut upstream, addr): (TcpStream, SocketAddr) = match connected {
        Ok(x) => x,
        Err(e) => {
            report.log.response_flags = e.flag();
            report.log.upstream_transport_failure_reason = Some(e.to_string());
            let labels = tcp_labels(snap, Some(&entry), sni, e.flag());
            report.finish(&labels, 0, received_hello);
            return Err(e.to_string());
        }
    };
    report.log.upstream_host = Some(addr);
    report.log.upstream_local_address = upstream.local_addr().ok();
    upstream
        .write_all(&hello)
        .await
        .map_err(|e| e.to_string())?;
    let (received, sent) = tokio::io::copy_bidirectional(&mut stream, &mut upstream)
        .await
        .unwrap_or((0, 0));
    let labels = tcp_labels(snap, Some(&entry), sni, "-");
    report.finish(&labels, sent, received + received_hello);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello, made by rustls, for `name`.
    fn hello(name: &str) -> Vec<u8> {
        let cfg = rustls::ClientConfig::builder_with_provider(meshgate_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), name.to_owned().try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn sni_from_a_real_client_hello() {
        let h = hello("API.Example.com");
        assert_eq!(
            parse_client_hello(&h),
            Hello::Complete(Some("api.example.com".into()))
        );
        for cut in [0, 1, 4, 5, 40, h.len() - 1] {
            assert_eq!(
                parse_client_hello(&h[..cut]),
                Hello::Partial,
                "cut at {cut}"
            );
        }
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        let ip = hello("10.0.0.1");
        assert_eq!(
            parse_client_hello(&ip),
            Hello::Complete(None),
            "no SNI for an IP address"
        );
        let mut garbage = h.clone();
        garbage[5] = 2; // not a ClientHello
        assert_eq!(parse_client_hello(&garbage), Hello::NotTls);
    }

    /// Hardening: every byte of a real ClientHello flipped to many values,
    /// and every length field lied about, parses to an answer, never a
    /// panic or an out-of-bounds read; an answer of `Complete` only ever
    /// carries a name that was in the input.
    #[test]
    fn mutated_client_hellos_never_panic() {
        let h = hello("api.example.com");
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for i in 0..h.len() {
            for v in [
                0u8,
                1,
                0x7f,
                0x80,
                0xff,
                h[i].wrapping_add(1),
                h[i].wrapping_sub(1),
            ] {
                let mut m = h.clone();
                m[i] = v;
                if let Hello::Complete(Some(name)) = parse_client_hello(&m) {
                    assert!(name.len() <= m.len(), "byte {i}={v:#x}");
                }
                // And truncated right after the change.
                let _ = parse_client_hello(&m[..=i]);
            }
        }
        // Random bytes behind a TLS handshake record header.
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 300) as usize;
            let mut m = vec![0x16, 3, 1, (len >> 8) as u8, len as u8, 1];
            m.extend((0..len).map(|j| (seed >> (j % 56)) as u8));
            let _ = parse_client_hello(&m);
        }
    }
}
