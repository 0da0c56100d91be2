//! The HTTP request path of both proxies: plan the request, act on the
//! plan (forward it, redirect, or answer locally), and report it. Every
//! decision comes from `plan::plan_request`; this module only acts.

mod forward;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use meshgate_telemetry::{EgressLabels, LogEntry, ResponseFlags};

use crate::body::{Body, text};
use crate::conn::Conn;
use crate::cors;
use crate::labels::{DestinationLabels, unknown};
use crate::plan::{Local, RequestAction, RequestHead, RequestPlan, plan_request};
use crate::proxy::Proxy;
use crate::report::HttpReport;
use crate::route::{Redirect, RequestView};
use crate::snapshot::Snapshot;

// Header names the request path sets, built once: inserting by `&str`
// copies a custom name on every request.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// A gRPC answer's status (in the headers of a trailers-only answer).
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// What acting on a plan came to, before it is reported.
#[derive(Debug)]
struct Outcome {
    response: Response<Body>,
    flags: ResponseFlags,
    details: Cow<'static, str>,
    /// The endpoint that answered, or where the last attempt went.
    upstream: Option<SocketAddr>,
    /// The upstream answered (its service time is reported).
    answered: bool,
    transport_failure: Option<String>,
}

impl Outcome {
    fn local(response: Response<Body>, flags: ResponseFlags, details: Cow<'static, str>) -> Self {
        Outcome {
            response,
            flags,
            details,
            upstream: None,
            answered: false,
            transport_failure: None,
        }
    }
}

impl Proxy {
    /// Handles one downstream request on a connection served as HTTP.
    pub async fn handle(self: &Arc<Self>, conn: &Conn, req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let snap = self.state.load_full();
        let (mut parts, body) = req.into_parts();
        // Unique per request: HPACK sends it as a never-indexed literal
        // (`set_sensitive`) rather than adding each one to the connection's
        // table, where it would evict useful entries and make every later
        // `x-request-id` search a growing chain of them. (The first on each
        // HTTP/2 connection is added, for its name: `pool::name_request_id`.)
        match parts.headers.entry(X_REQUEST_ID) {
            header::Entry::Occupied(mut id) => id.get_mut().set_sensitive(true),
            header::Entry::Vacant(slot) => {
                slot.insert(new_request_id());
            }
        }
        // Cheap clones (shared buffers), so the request can move on while
        // these are borrowed.
        let uri = parts.uri.clone();
        let host_header = parts.headers.get(header::HOST).cloned();
        let authority = request_authority(&uri, host_header.as_ref());
        let scheme = if conn.tls.is_some() { "https" } else { "http" };
        let head = RequestHead {
            view: RequestView {
                authority,
                method: parts.method.as_str(),
                scheme,
                path: uri.path(),
                query: uri.query().unwrap_or(""),
                headers: &parts.headers,
            },
            uri_port: uri.port_u16().or(match uri.scheme_str() {
                Some("https") => Some(443),
                Some("http") => Some(80),
                _ => None,
            }),
        };
        let plan = plan_request(&snap, conn, &head, fastrand::f64());
        let target = forward::Head {
            authority,
            path: plan.normalized_path.as_deref().unwrap_or(uri.path()),
            query: uri.query().unwrap_or(""),
            normalized: plan.normalized_path.is_some(),
        };
        let entry = self
            .access_log
            .enabled()
            // The wall clock only when a line is written, as of `start`.
            .then(|| {
                let now = SystemTime::now();
                let start_time = now.checked_sub(start.elapsed()).unwrap_or(now);
                log_entry(conn, &parts, authority, start_time, &plan)
            });
        // Body (from Content-Length) and header bytes.
        let request_bytes = (content_length(&parts.headers), header_size(&parts.headers));
        // A body's bytes are counted as they go (chunked ones have no length).
        let body_counter = (!hyper::body::Body::is_end_stream(&body))
            .then(|| Arc::new(crate::body::Progress::default()));
        let outcome = match &plan.action {
            RequestAction::Connect { host, port } => {
                return self.connect(conn, &mut parts, host, *port);
            }
            RequestAction::Forward {
                route,
                matched,
                destination,
                cluster,
            } => {
                let upstream = forward::Upstream {
                    proxy: self,
                    snap: &snap,
                    conn,
                    route,
                    matched: *matched,
                    destination,
                    cluster,
                    start,
                };
                upstream
                    .forward(&target, parts, body, body_counter.clone())
                    .await
            }
            RequestAction::Redirect { redirect, .. } => redirected(redirect, &head.view, plan.port),
            RequestAction::Direct { status, body } => direct(*status, body),
            RequestAction::CorsPreflight(h) => preflight(h),
            RequestAction::Local(l) => self.local(l),
        };
        let mut outcome = outcome;
        if let Some((c, origin)) = &plan.cors {
            c.respond(origin, outcome.response.headers_mut());
        }
        let forwarded = matches!(plan.action, RequestAction::Forward { .. });
        let counter = body_counter.filter(|_| forwarded);
        self.report(
            &snap,
            conn,
            &plan,
            outcome,
            entry,
            (request_bytes, counter),
            start,
        )
    }

    /// A reply the plan decided (denied, no route, registry only). Out of
    /// line, as the other answers that forward nothing: the forwarded
    /// request's code stays together.
    #[cold]
    #[inline(never)]
    fn local(&self, l: &Local) -> Outcome {
        if let Some(reason) = l.refused {
            self.metrics.refused(reason);
        }
        Outcome::local(text(l.status, l.body), l.flags, l.details.clone())
    }

    /// Attaches the report to the response: written when its body ends.
    #[allow(clippy::too_many_arguments)]
    fn report(
        self: &Arc<Self>,
        snap: &Snapshot,
        conn: &Conn,
        plan: &RequestPlan<'_>,
        outcome: Outcome,
        mut entry: Option<Box<LogEntry>>,
        (request_bytes, request_counter): ((u64, u64), Option<Arc<crate::body::Progress>>),
        start: Instant,
    ) -> Response<Body> {
        let status = outcome.response.status().as_u16();
        let cluster = plan.destination.and_then(|d| snap.cluster(d.cluster));
        // Borrowed from the cluster, the common case: no clone to drop.
        let destination = match (&plan.action, cluster) {
            (_, Some(c)) => Cow::Borrowed(&c.labels),
            (RequestAction::Local(l), None) if l.destination.is_some() => Cow::Owned(
                DestinationLabels::named(Arc::from(l.destination.unwrap_or_default())),
            ),
            // No cluster: the client's Host must not become a label value
            // (Istio reports `unknown`, not `request.host`, without one: a
            // label per made-up host would be a memory attack).
            _ => Cow::Owned(DestinationLabels::named(unknown())),
        };
        if let Some(e) = entry.as_mut() {
            e.response_code = status;
            e.response_flags = outcome.flags;
            e.response_code_details = Some(outcome.details.into_owned());
            e.upstream_host = outcome.upstream;
            e.upstream_cluster = plan.cluster_name(snap).map(str::to_owned);
            e.upstream_transport_failure_reason = outcome.transport_failure;
            e.upstream_service_time = outcome.answered.then(|| start.elapsed().as_millis() as u64);
        }
        let protocol = protocol(outcome.response.headers());
        let labels = if conn.inbound {
            let to =
                cluster.map_or_else(|| snap.inbound_destination(conn.port), |c| c.labels.clone());
            snap.inbound_labels(conn.peer(), &to, (status, outcome.flags, protocol))
        } else {
            snap.istio_labels(&destination, status, outcome.flags, protocol)
        };
        let egress = self.is_gateway().then(|| EgressLabels {
            source_principal: conn.peer().map_or_else(unknown, |p| p.uri.clone()),
            source_workload_namespace: conn
                .peer()
                .and_then(|p| p.namespace.clone())
                .unwrap_or_else(unknown),
            connection_security_policy: if conn.peer().is_some() {
                "mutual_tls"
            } else {
                "none"
            },
            destination_service_name: cluster.map_or_else(unknown, |c| c.host.clone()),
            response_code: status,
            decision: plan.authz.label(),
        });
        let (parts, body) = outcome.response.into_parts();
        let report = HttpReport {
            proxy: self.clone(),
            start,
            labels,
            egress,
            entry,
            request_bytes: request_bytes.0,
            request_counter,
            response_bytes: 0,
            header_bytes: (request_bytes.1, header_size(&parts.headers)),
        };
        Response::from_parts(parts, body.reported(report))
    }

    /// CONNECT accepted: answer 200 and serve the tunnel as a connection to
    /// `host:port`, planned like captured traffic to that port.
    fn connect(
        self: &Arc<Self>,
        conn: &Conn,
        parts: &mut http::request::Parts,
        host: &str,
        port: u16,
    ) -> Response<Body> {
        let Some(upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return Response::new(Body::empty());
        };
        let tunnel = Conn {
            port,
            explicit: false,
            // The tunnel's destination is the host it names.
            original_dst: None,
            connect_host: Some(Arc::from(host)),
            ..conn.clone()
        };
        let proxy = self.clone();
        tokio::spawn(async move {
            match upgrade.await {
                Ok(io) => {
                    let io = hyper_util::rt::TokioIo::new(io);
                    crate::connection::serve(proxy, tunnel, io).await;
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
        // Not reported as a request: the tunnel is reported as a TCP
        // connection.
        let mut resp = text(StatusCode::OK, "");
        resp.headers_mut().remove(header::CONTENT_TYPE);
        resp
    }
}

/// The route's redirect, with its `Location`.
#[cold]
#[inline(never)]
fn redirected(redirect: &Redirect, view: &RequestView<'_>, port: u16) -> Outcome {
    let status = StatusCode::from_u16(redirect.code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let mut resp = text(status, "");
    if let Ok(v) = HeaderValue::from_str(&redirect.location(view, port)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Outcome::local(
        resp,
        ResponseFlags::NONE,
        Cow::Borrowed("via_route_redirect"),
    )
}

/// The route's direct response.
#[cold]
#[inline(never)]
fn direct(status: u16, body: &Bytes) -> Outcome {
    let resp = text(
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        body.clone(),
    );
    Outcome::local(resp, ResponseFlags::NONE, Cow::Borrowed("direct_response"))
}

/// A CORS preflight answered with the route's policy headers.
#[cold]
#[inline(never)]
fn preflight(headers: &HeaderMap) -> Outcome {
    let mut resp = text(StatusCode::OK, "");
    resp.headers_mut().remove(header::CONTENT_TYPE);
    resp.headers_mut().extend(headers.clone());
    Outcome::local(resp, ResponseFlags::NONE, Cow::Borrowed(cors::DETAILS))
}

/// The request's authority: an absolute-form request-target's (RFC 9112
/// 3.2.2: its Host header is then ignored, and rewritten upstream), else
/// the Host header's, else HTTP/2's `:authority`.
fn request_authority<'a>(uri: &'a http::Uri, host: Option<&'a HeaderValue>) -> &'a str {
    match (uri.scheme(), uri.authority()) {
        (Some(_), Some(a)) => a.as_str(),
        _ => host
            .and_then(|h| h.to_str().ok())
            .or_else(|| uri.authority().map(|a| a.as_str()))
            .unwrap_or(""),
    }
}

/// The access-log fields known before the request is acted on.
fn log_entry(
    conn: &Conn,
    parts: &http::request::Parts,
    authority: &str,
    start_time: SystemTime,
    plan: &RequestPlan<'_>,
) -> Box<LogEntry> {
    Box::new(LogEntry {
        start_time: Some(start_time),
        method: Some(parts.method.to_string()),
        // As Envoy logs `:path`: after normalization.
        path: Some(match (&plan.normalized_path, parts.uri.query()) {
            (Some(p), Some(q)) => format!("{p}?{q}"),
            (Some(p), None) => p.clone(),
            (None, _) => parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
        }),
        protocol: Some(version_str(parts.version)),
        x_forwarded_for: header_string(&parts.headers, "x-forwarded-for"),
        user_agent: header_string(&parts.headers, "user-agent"),
        request_id: header_string(&parts.headers, "x-request-id"),
        authority: Some(authority.to_owned()),
        downstream_local_address: Some(conn.downstream_local()),
        downstream_remote_address: Some(conn.remote),
        requested_server_name: conn.sni().map(str::to_owned),
        route_name: plan.route_name().map(str::to_owned),
        downstream_peer_uri_san: conn.peer().map(|p| p.uri.to_string()),
        ..LogEntry::default()
    })
}

/// Headers' size as Envoy counts it for Istio's `request.total_size` and
/// `response.total_size`: each name and value.
fn header_size(h: &HeaderMap) -> u64 {
    h.iter()
        .map(|(k, v)| (k.as_str().len() + v.len()) as u64)
        .sum()
}

fn content_length(h: &HeaderMap) -> u64 {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Istio's `request_protocol`: `grpc` for gRPC responses.
fn protocol(h: &HeaderMap) -> &'static str {
    if is_grpc(h) { "grpc" } else { "http" }
}

/// A gRPC request's or response's head (`application/grpc`, `+proto`...).
pub(crate) fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
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

/// A random UUID v4 for `x-request-id`, formatted without allocating
/// (the header value is the one copy).
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // 32 random hex digits, then UUID v4's form over them:
    // `xxxxxxxx-xxxx-4xxx-axxx-xxxxxxxxxxxx` (122 random bits).
    let mut digits = [0u8; 32];
    for (half, bits) in digits
        .chunks_exact_mut(16)
        .zip([fastrand::u64(..), fastrand::u64(..)])
    {
        for (i, d) in half.iter_mut().enumerate() {
            *d = HEX[((bits >> (4 * i)) & 0xf) as usize];
        }
    }
    let mut out = [b'-'; 36];
    out[..8].copy_from_slice(&digits[..8]);
    out[9..13].copy_from_slice(&digits[8..12]);
    out[14] = b'4';
    out[15..18].copy_from_slice(&digits[12..15]);
    out[19] = b'a';
    out[20..23].copy_from_slice(&digits[15..18]);
    out[24..].copy_from_slice(&digits[18..30]);
    // Hex digits and dashes are always a valid header value.
    let mut id = HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("-"));
    id.set_sensitive(true);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_uuid_v4_and_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert!(a.is_sensitive(), "HPACK never indexes a unique value");
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
