//! The request path shared by the gateway's listeners: authorize, route,
//! forward (with retries and timeouts), and report (Istio metrics, egress
//! attribution, access log). Decisions come from the pure functions in
//! `authz` and `route` over the current snapshot.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use meshgate_telemetry::metrics::Lv;
use meshgate_telemetry::{AccessLog, EgressLabels, IstioLabels, LogEntry, Metrics};

use crate::decide::{Decided, Verdict, decide};
use crate::route::{Action, RequestView, Routed};
use crate::state::{Snapshot, unknown};
use crate::upstream::{UpstreamBody, UpstreamError};

/// What a listener knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// The listener's (Gateway server's) port, which routes match on.
    pub listener_port: u16,
    /// Verified peer SPIFFE ID (mutual TLS) as a metric label value.
    pub peer: Option<Lv>,
    /// Peer namespace, from the SPIFFE ID.
    pub peer_namespace: Option<Lv>,
    /// TLS was terminated on this connection.
    pub tls: bool,
    pub sni: Option<Arc<str>>,
    /// Sidecars: where the application was connecting (SO_ORIGINAL_DST).
    pub original_dst: Option<SocketAddr>,
    /// Sidecars: the application uses us as an explicit HTTP proxy, so the
    /// port comes from each request's absolute URI.
    pub explicit: bool,
}

/// Shared by every listener of one proxy.
#[derive(Debug)]
pub struct Proxy {
    pub state: ArcSwap<Snapshot>,
    /// Graceful shutdown: listeners and connections watch it.
    pub drain: crate::drain::Drain,
    pub metrics: Arc<Metrics>,
    pub access_log: Arc<AccessLog>,
    /// Report `meshgate_egress_requests_total` (gateways).
    pub egress_metric: bool,
    /// Envoy's `use_remote_address`: append the downstream address to
    /// `x-forwarded-for`. Istio sets it on gateways; sidecars pass the
    /// header through unchanged.
    pub use_remote_address: bool,
}

/// Response bodies: an upstream's, or one we made.
#[derive(Debug)]
pub enum ProxyBody {
    Upstream(Incoming),
    Local(Option<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// Reports a request once its response body is done (or abandoned).
#[derive(Debug)]
struct Report {
    proxy: Arc<Proxy>,
    start: Instant,
    labels: IstioLabels,
    egress: Option<EgressLabels>,
    entry: Option<Box<LogEntry>>,
    request_bytes: u64,
    response_bytes: u64,
}

impl Drop for Report {
    fn drop(&mut self) {
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let m = &self.proxy.metrics;
        m.record_request(&self.labels, ms, self.request_bytes, self.response_bytes);
        if let Some(e) = &self.egress {
            m.egress_requests.get_or_create(e).inc();
        }
        if let Some(mut entry) = self.entry.take() {
            entry.bytes_sent = self.response_bytes;
            entry.bytes_received = self.request_bytes;
            entry.duration = self.start.elapsed().as_millis() as u64;
            self.proxy.access_log.write(&entry);
        }
    }
}

/// The body we hand to hyper: counts bytes and reports at the end.
#[derive(Debug)]
pub struct ReportedBody {
    inner: ProxyBody,
    report: Option<Report>,
}

impl ReportedBody {
    /// A body that reports nothing (CONNECT answers).
    pub fn unreported(inner: ProxyBody) -> Self {
        ReportedBody {
            inner,
            report: None,
        }
    }
}

impl Body for ReportedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(r)) = (frame.data_ref(), this.report.as_mut()) {
                    r.response_bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => drop(this.report.take()),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Envoy's hop-by-hop headers, never forwarded.
// Header names the request path sets, built once: inserting by `&str`
// copies a custom name on every request.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
const X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");

const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection:
/// upgrade` plus `Upgrade`); CONNECT is handled by the sidecar itself.
fn upgrade_protocol(parts: &http::request::Parts) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 || parts.method == Method::CONNECT {
        return None;
    }
    let asks = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| parts.headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// Copies bytes both ways between an upgraded downstream and upstream
/// connection until either side closes.
async fn tunnel(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (down, up) = match tokio::join!(down, up) {
        (Ok(d), Ok(u)) => (d, u),
        (d, u) => {
            tracing::debug!(
                downstream = d.is_ok(),
                upstream = u.is_ok(),
                "upgrade failed"
            );
            return;
        }
    };
    let mut down = hyper_util::rt::TokioIo::new(down);
    let mut up = hyper_util::rt::TokioIo::new(up);
    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(error = %e, "upgraded connection closed");
    }
}

/// A random UUID v4 for `x-request-id`, formatted without allocating
/// (the header value is the one copy).
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let v = fastrand::u128(..);
    let mut out = [0u8; 36];
    let mut nibble = 0;
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = match i {
            8 | 13 | 18 | 23 => b'-',
            14 => b'4',
            19 => b'a',
            _ => {
                let d = ((v >> (4 * nibble)) & 0xf) as usize;
                nibble += 1;
                HEX[d]
            }
        };
    }
    // Hex digits and dashes are always a valid header value.
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// A locally generated response (`server: meshgate`).
fn local(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    local_owned(status, Bytes::from_static(body.as_bytes()))
}

fn local_owned(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Local((!body.is_empty()).then_some(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::SERVER, HeaderValue::from_static("meshgate"));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// The outcome of forwarding, before reporting.
struct Outcome {
    response: Response<ProxyBody>,
    flags: &'static str,
    details: String,
    upstream: Option<SocketAddr>,
    transport_failure: Option<String>,
}

impl Outcome {
    fn local(
        response: Response<ProxyBody>,
        flags: &'static str,
        details: impl Into<String>,
    ) -> Self {
        Outcome {
            response,
            flags,
            details: details.into(),
            upstream: None,
            transport_failure: None,
        }
    }
}

impl Proxy {
    /// Handles one downstream request on a listener.
    pub async fn handle(
        self: &Arc<Self>,
        conn: &ConnInfo,
        req: Request<Incoming>,
    ) -> Response<ReportedBody> {
        let start = Instant::now();
        let start_time = SystemTime::now();
        let snap = self.state.load_full();
        let (mut parts, body) = req.into_parts();
        // Cheap clones (shared buffers), so the request can move on while
        // these are borrowed.
        let uri = parts.uri.clone();
        let host_header = parts.headers.get(header::HOST).cloned();
        let authority: &str = host_header
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .or_else(|| uri.authority().map(|a| a.as_str()))
            .unwrap_or("");
        let path = uri.path();
        let query = uri.query().unwrap_or("");
        if !parts.headers.contains_key(&X_REQUEST_ID) {
            parts.headers.insert(X_REQUEST_ID, new_request_id());
        }
        let scheme = if conn.tls { "https" } else { "http" };
        let view = RequestView {
            authority,
            method: parts.method.as_str(),
            scheme,
            path,
            query,
            headers: &parts.headers,
        };
        let Decided {
            listener_port,
            routed,
            cluster,
            authz: decision,
            verdict,
            ..
        } = decide(&snap, conn, parts.uri.port_u16(), &view, fastrand::f64());
        let route_name = match &routed {
            Routed::Matched { route, .. } => Some(route.name.clone()),
            _ => None,
        };
        let entry_for = cluster.and_then(|(i, _)| snap.clusters.get(i).cloned().flatten());

        let request_bytes = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut entry = self.access_log.enabled().then(|| {
            Box::new(LogEntry {
                start_time: Some(start_time),
                method: Some(parts.method.to_string()),
                path: Some(
                    parts
                        .uri
                        .path_and_query()
                        .map_or_else(|| path.to_owned(), |p| p.as_str().to_owned()),
                ),
                protocol: Some(version_str(parts.version)),
                x_forwarded_for: header_string(&parts.headers, "x-forwarded-for"),
                user_agent: header_string(&parts.headers, "user-agent"),
                request_id: header_string(&parts.headers, "x-request-id"),
                authority: Some(authority.to_owned()),
                downstream_local_address: Some(conn.original_dst.unwrap_or(conn.local)),
                downstream_remote_address: Some(conn.remote),
                requested_server_name: conn.sni.as_deref().map(str::to_owned),
                route_name: route_name.as_deref().map(str::to_owned),
                downstream_peer_uri_san: conn.peer.as_deref().map(str::to_owned),
                ..LogEntry::default()
            })
        });

        let outcome = match (verdict, &routed) {
            (Verdict::Deny, _) => Outcome::local(
                local(StatusCode::FORBIDDEN, "RBAC: access denied"),
                "-",
                decision.response_code_details().unwrap_or_default(),
            ),
            (Verdict::Route, Routed::Matched { route, matched }) => {
                self.forward(
                    &snap,
                    listener_port,
                    conn,
                    route,
                    *matched,
                    cluster.map(|(_, w)| w),
                    authority,
                    path,
                    query,
                    parts,
                    body,
                    start,
                )
                .await
            }
            // REGISTRY_ONLY: Istio's `block_all` route answers 502.
            (Verdict::Blocked, _) => {
                if let Some(e) = entry.as_mut() {
                    e.route_name = Some("block_all".to_owned());
                }
                Outcome::local(local(StatusCode::BAD_GATEWAY, ""), "-", "direct_response")
            }
            _ => Outcome::local(local(StatusCode::NOT_FOUND, ""), "NR", "route_not_found"),
        };
        let blocked = verdict == Verdict::Blocked;

        let status = outcome.response.status().as_u16();
        if let Some(e) = entry.as_mut() {
            e.response_code = status;
            e.response_flags = outcome.flags;
            e.response_code_details = Some(outcome.details.clone());
            e.upstream_host = outcome.upstream;
            e.upstream_cluster = cluster
                .and_then(|(i, _)| snap.cluster_names.get(i))
                .map(|n| n.to_string());
            e.upstream_transport_failure_reason = outcome.transport_failure.clone();
            e.upstream_service_time = outcome.upstream.map(|_| start.elapsed().as_millis() as u64);
        }
        let labels = snap.istio_labels(
            entry_for.as_deref(),
            if blocked {
                crate::state::BLACKHOLE_CLUSTER
            } else {
                authority
            },
            status,
            outcome.flags,
            parts_protocol(&outcome),
        );
        let egress = self.egress_metric.then(|| EgressLabels {
            source_principal: conn.peer.clone().unwrap_or_else(unknown),
            source_workload_namespace: conn.peer_namespace.clone().unwrap_or_else(unknown),
            connection_security_policy: if conn.peer.is_some() {
                "mutual_tls"
            } else {
                "none"
            },
            destination_service_name: entry_for
                .as_ref()
                .map_or_else(|| Arc::from(host_only(authority)), |c| c.host.clone()),
            response_code: status,
            decision: decision.label(),
        });
        let (resp_parts, body) = outcome.response.into_parts();
        Response::from_parts(
            resp_parts,
            ReportedBody {
                inner: body,
                report: Some(Report {
                    proxy: self.clone(),
                    start,
                    labels,
                    egress,
                    entry,
                    request_bytes,
                    response_bytes: 0,
                }),
            },
        )
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        snap: &Snapshot,
        listener_port: u16,
        conn: &ConnInfo,
        route: &crate::route::Route,
        matched: Option<usize>,
        dest: Option<&crate::route::WeightedCluster>,
        authority: &str,
        path: &str,
        query: &str,
        mut parts: http::request::Parts,
        body: Incoming,
        start: Instant,
    ) -> Outcome {
        let view = RequestView {
            authority,
            method: parts.method.as_str(),
            scheme: if conn.tls { "https" } else { "http" },
            path,
            query,
            headers: &parts.headers,
        };
        match &route.action {
            Action::Redirect(r) => {
                let mut resp = local(
                    StatusCode::from_u16(r.code).unwrap_or(StatusCode::MOVED_PERMANENTLY),
                    "",
                );
                if let Ok(v) = HeaderValue::from_str(&r.location(&view, listener_port)) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                return Outcome::local(resp, "-", "via_route_redirect");
            }
            Action::Direct { status, body } => {
                let resp = local_owned(
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::OK),
                    body.clone(),
                );
                return Outcome::local(resp, "-", "direct_response");
            }
            Action::Forward(_) => {}
        }
        let Some(dest) = dest else {
            return Outcome::local(
                local(StatusCode::SERVICE_UNAVAILABLE, "no cluster"),
                "NC",
                "cluster_not_found",
            );
        };
        let Some(entry) = snap.clusters.get(dest.cluster).cloned().flatten() else {
            return Outcome::local(
                local(StatusCode::SERVICE_UNAVAILABLE, "no cluster"),
                "NC",
                "cluster_not_found",
            );
        };

        let mut fault_flag = None;
        if let Some(f) = &route.fault {
            if let Some((delay, pct)) = f.delay
                && fastrand::f64() * 100.0 < pct
            {
                tokio::time::sleep(delay).await;
                fault_flag = Some("DI");
            }
            if let Some((status, pct)) = f.abort
                && fastrand::f64() * 100.0 < pct
            {
                let resp = local(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    "fault filter abort",
                );
                return Outcome::local(resp, "FI", "fault_filter_abort");
            }
        }

        // The upstream request head.
        let new_path = route.rewrite_path(matched, path);
        let out_authority: &str = route.authority_rewrite.as_deref().unwrap_or(authority);
        let path_and_query = match (&new_path, query) {
            (Some(p), "") => http::uri::PathAndQuery::try_from(p.as_str()),
            (Some(p), q) => http::uri::PathAndQuery::try_from(format!("{p}?{q}")),
            (None, _) => Ok(parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))),
        };
        // The URI's authority picks the connection (pool key, HTTP/2
        // :authority); for the PassthroughCluster it is where the
        // application was connecting.
        let connect_authority = match (snap.passthrough == Some(dest.cluster), conn.original_dst) {
            (true, Some(orig)) => http::uri::Authority::try_from(orig.to_string()),
            _ => http::uri::Authority::try_from(out_authority),
        };
        let uri = match (connect_authority, path_and_query) {
            (Ok(a), Ok(pq)) => {
                let mut p = http::uri::Parts::default();
                p.scheme = Some(http::uri::Scheme::HTTP);
                p.authority = Some(a);
                p.path_and_query = Some(pq);
                http::Uri::from_parts(p).ok()
            }
            _ => None,
        };
        let Some(uri) = uri else {
            return Outcome::local(
                local(StatusCode::BAD_REQUEST, "bad request"),
                "DPE",
                "invalid_authority",
            );
        };
        // An HTTP/1.1 upgrade (WebSocket and the like) keeps its Upgrade and
        // Connection headers and, once the upstream answers 101, becomes a
        // byte tunnel through every hop, as Envoy's upgrade_configs do.
        let upgrade = upgrade_protocol(&parts).filter(|_| !entry.cluster.is_h2());
        let downstream_upgrade = upgrade
            .as_ref()
            .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
        for h in &HOP_BY_HOP {
            parts.headers.remove(h);
        }
        if let Some(proto) = &upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, proto.clone());
        }
        let h2 = entry.cluster.is_h2();
        if h2 {
            parts.headers.remove(header::HOST);
        } else if parts.headers.get(header::HOST).map(HeaderValue::as_bytes)
            != Some(out_authority.as_bytes())
            && let Ok(v) = HeaderValue::from_str(out_authority)
        {
            parts.headers.insert(header::HOST, v);
        }
        if new_path.is_some()
            && let Ok(v) = HeaderValue::from_str(path)
        {
            parts.headers.insert(X_ENVOY_ORIGINAL_PATH, v);
        }
        parts.headers.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
        );
        if self.use_remote_address {
            append_forwarded_for(&mut parts.headers, conn.remote);
        }
        route.request_headers.apply(&mut parts.headers);
        dest.request_headers.apply(&mut parts.headers);

        // Bodyless requests can be retried; streamed bodies cannot be replayed.
        let bodyless = body.is_end_stream()
            || matches!(
                parts.method,
                Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
            ) && !parts.headers.contains_key(header::CONTENT_LENGTH)
                && !parts.headers.contains_key(header::TRANSFER_ENCODING);
        let mut streaming = if bodyless { None } else { Some(body) };
        let retry = &route.retry;
        let max_attempts = if streaming.is_some() {
            1
        } else {
            1 + retry.attempts
        };

        let attempt_loop = async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let mut req = Request::new(match streaming.take() {
                    Some(b) => UpstreamBody::Streaming(b),
                    None => UpstreamBody::Empty,
                });
                *req.method_mut() = parts.method.clone();
                *req.uri_mut() = uri.clone();
                // The last possible attempt takes the headers; earlier ones copy.
                *req.headers_mut() = if attempt < max_attempts {
                    parts.headers.clone()
                } else {
                    std::mem::take(&mut parts.headers)
                };
                *req.version_mut() = if h2 {
                    Version::HTTP_2
                } else {
                    Version::HTTP_11
                };
                let sent = match retry.per_try_timeout {
                    Some(t) => match tokio::time::timeout(t, entry.cluster.send(req)).await {
                        Ok(r) => r.map_err(Some),
                        Err(_) => Err(None),
                    },
                    None => entry.cluster.send(req).await.map_err(Some),
                };
                let more = attempt < max_attempts;
                match sent {
                    Ok(resp) if more && retry.retry_status(resp.status().as_u16()) => {
                        tracing::debug!(cluster = %entry.cluster.name(), status = %resp.status(), attempt, "retrying");
                    }
                    Ok(resp) => return (Ok(resp), attempt),
                    Err(Some(e)) if more && e.is_connect_failure() && retry.on_connect_failure => {
                        tracing::debug!(cluster = %entry.cluster.name(), error = %e, attempt, "retrying after connect failure");
                    }
                    Err(e) => return (Err(e), attempt),
                }
                tokio::time::sleep(retry.backoff * attempt).await;
            }
        };
        let result = match route.timeout {
            Some(t) => {
                let remaining = t.saturating_sub(start.elapsed());
                match tokio::time::timeout(remaining, attempt_loop).await {
                    Ok(r) => r,
                    Err(_) => {
                        return Outcome::local(
                            local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
                            "UT",
                            "upstream_response_timeout",
                        );
                    }
                }
            }
            None => attempt_loop.await,
        };
        let retried = result.1 > 1;
        match result.0 {
            Ok(resp) => {
                let upstream = resp
                    .extensions()
                    .get::<crate::upstream::UpstreamAddr>()
                    .map(|a| a.0);
                let elapsed = start.elapsed().as_millis();
                let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                let mut resp = resp;
                let upstream_upgrade = switching
                    .then(|| resp.extensions_mut().remove::<hyper::upgrade::OnUpgrade>())
                    .flatten();
                let (mut rparts, rbody) = resp.into_parts();
                let upgraded_to = rparts.headers.get(header::UPGRADE).cloned();
                for h in &HOP_BY_HOP {
                    rparts.headers.remove(h);
                }
                if let (Some(down), Some(up), Some(proto)) =
                    (downstream_upgrade, upstream_upgrade, upgraded_to)
                {
                    rparts
                        .headers
                        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    rparts.headers.insert(header::UPGRADE, proto);
                    tokio::spawn(tunnel(down, up));
                }
                if let Ok(v) = HeaderValue::from_str(&elapsed.to_string()) {
                    rparts.headers.insert(X_ENVOY_UPSTREAM_SERVICE_TIME, v);
                }
                route.response_headers.apply(&mut rparts.headers);
                dest.response_headers.apply(&mut rparts.headers);
                let flags = match (
                    fault_flag,
                    retried && retry.retry_status(rparts.status.as_u16()),
                ) {
                    (_, true) => "URX",
                    (Some(f), _) => f,
                    (None, false) => "-",
                };
                Outcome {
                    response: Response::from_parts(rparts, ProxyBody::Upstream(rbody)),
                    flags,
                    details: "via_upstream".to_owned(),
                    upstream,
                    transport_failure: None,
                }
            }
            Err(None) => Outcome::local(
                local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
                "UT",
                "upstream_per_try_timeout",
            ),
            Err(Some(e)) => {
                let flags = match (&e, retried) {
                    (UpstreamError::ConnectFailure(_), true) => "UF,URX",
                    _ => e.flag(),
                };
                let body = e.to_string();
                tracing::warn!(cluster = %entry.cluster.name(), host = %entry.host, error = %body, flags, "upstream request failed");
                let transport = match &e {
                    UpstreamError::ConnectFailure(m) => Some(m.clone()),
                    _ => None,
                };
                let details = match &e {
                    UpstreamError::NoHealthyUpstream(_) => "no_healthy_upstream",
                    UpstreamError::ConnectFailure(_) => {
                        "upstream_reset_before_response_started{connection_failure}"
                    }
                    UpstreamError::Reset(_) => {
                        "upstream_reset_before_response_started{connection_termination}"
                    }
                    UpstreamError::Overflow => "upstream_reset_before_response_started{overflow}",
                };
                let body = match e {
                    UpstreamError::NoHealthyUpstream(_) => "no healthy upstream".to_owned(),
                    _ => body,
                };
                let mut out = Outcome::local(
                    local_owned(StatusCode::SERVICE_UNAVAILABLE, Bytes::from(body)),
                    flags,
                    details,
                );
                out.transport_failure = transport;
                out
            }
        }
    }
}

fn parts_protocol(o: &Outcome) -> &'static str {
    let grpc = o
        .response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc { "grpc" } else { "http" }
}

fn append_forwarded_for(headers: &mut HeaderMap, remote: SocketAddr) {
    let ip = remote.ip().to_string();
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev},{ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

fn header_string(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/0.9",
    }
}

fn host_only(authority: &str) -> &str {
    crate::route::split_host_port(authority).0
}

/// The downstream HTTP server (HTTP/1.1 and HTTP/2, TLS or h2c). A timer
/// makes hyper enforce its header read timeout (30s), so a client that
/// never finishes its headers cannot hold a connection forever.
pub fn http_server() -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.http1().timer(hyper_util::rt::TokioTimer::new());
    b.http2().timer(hyper_util::rt::TokioTimer::new());
    b
}

/// How long to wait for a client's first bytes before giving up.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_uuid_v4_and_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        let s = a.to_str().unwrap_or_default();
        let groups: Vec<&str> = s.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{s}"
        );
        assert!(
            groups[2].starts_with('4') && groups[3].starts_with('a'),
            "{s}"
        );
        assert!(s.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{s}");
    }
}
