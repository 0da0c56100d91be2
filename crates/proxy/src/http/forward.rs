//! A request on its way to the planned destination, in the order it
//! happens: faults, the upstream request head (rewrites, hop-by-hop
//! headers, `x-forwarded-*`, header operations), the attempts (retries,
//! per-try and route timeouts), and the response (hop-by-hop headers,
//! upgrades, header operations, flags).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as _, Incoming};
use hyper::upgrade::OnUpgrade;
use meshgate_telemetry::ResponseFlags;

use super::{GRPC_STATUS, Outcome};
use crate::body::{Body, Progress, text};
use crate::conn::Conn;
use crate::proxy::Proxy;
use crate::route::{Route, WeightedCluster};
use crate::snapshot::{ClusterEntry, InboundTarget, Snapshot};
use crate::upstream::{
    Answer, Avoid, Cluster, DownstreamAddr, Failure, GeneratedCookie, RetryPermit, UpstreamError,
};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
const X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");

/// Envoy's hop-by-hop headers, never forwarded.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    // An h2c upgrade's settings go with the upgrade.
    HeaderName::from_static("http2-settings"),
];

/// The request as it arrived, where it is read again.
#[derive(Debug, Clone, Copy)]
pub(super) struct Head<'a> {
    pub authority: &'a str,
    /// The normalized path.
    pub path: &'a str,
    pub query: &'a str,
    /// Normalization changed the path: the request's URI is not what goes
    /// upstream.
    pub normalized: bool,
}

/// One request to forward, and where to.
pub(super) struct Upstream<'a> {
    pub proxy: &'a Proxy,
    pub snap: &'a Snapshot,
    pub conn: &'a Conn,
    pub route: &'a Route,
    pub matched: Option<usize>,
    pub destination: &'a WeightedCluster,
    pub cluster: &'a Arc<ClusterEntry>,
    pub start: Instant,
}

impl Upstream<'_> {
    /// An async block, not an async fn, as `send` and `Cluster::send`: the
    /// request head is kept once in the future's state, not twice.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn's state holds its arguments twice"
    )]
    pub(super) fn forward(
        &self,
        head: &Head<'_>,
        mut parts: Parts,
        body: Incoming,
        counter: Option<Arc<Progress>>,
    ) -> impl Future<Output = Outcome> {
        async move {
            // Boxed, as rare paths are below: their code and state stay out
            // of every request's future.
            let delayed = if self.route.fault.is_some() {
                match Box::pin(self.inject_faults()).await {
                    Ok(delayed) => delayed,
                    Err(aborted) => return aborted,
                }
            } else {
                false
            };
            let Some((uri, downstream_upgrade)) = self.prepare(head, &mut parts) else {
                return invalid_authority();
            };
            let cookie = self.cluster.cluster.cookie_to_make(&parts.headers);
            if let Some((value, _)) = &cookie {
                parts.extensions.insert(GeneratedCookie(value.clone()));
            }
            // Only a streamed body has one: when it ended, the request had
            // been received.
            let progress = counter.clone();
            match self.send(parts, uri, body, counter).await {
                Ok((resp, tries)) => {
                    let received = match &progress {
                        Some(p) => p.ended_at(),
                        None => Some(tokio::time::Instant::from_std(self.start)),
                    };
                    let mut outcome =
                        self.respond(resp, tries, delayed, downstream_upgrade, received);
                    if let Some((_, set)) = cookie {
                        outcome
                            .response
                            .headers_mut()
                            .append(header::SET_COOKIE, set);
                    }
                    outcome
                }
                Err((e, tries, upstream)) => self.failed(&e, tries, upstream),
            }
        }
    }

    /// The route's fault injection: `Ok(true)` after an injected delay,
    /// `Err` with the response of an injected abort.
    async fn inject_faults(&self) -> Result<bool, Outcome> {
        let Some(f) = &self.route.fault else {
            return Ok(false);
        };
        let mut delayed = false;
        if let Some((delay, pct)) = f.delay
            && fastrand::f64() * 100.0 < pct
        {
            tokio::time::sleep(delay).await;
            delayed = true;
        }
        if let Some((status, pct)) = f.abort
            && fastrand::f64() * 100.0 < pct
        {
            let resp = text(
                StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                "fault filter abort",
            );
            let flags = if delayed {
                ResponseFlags::FAULT_INJECTED.with(ResponseFlags::DELAY_INJECTED)
            } else {
                ResponseFlags::FAULT_INJECTED
            };
            return Err(Outcome::local(
                resp,
                flags,
                Cow::Borrowed("fault_filter_abort"),
            ));
        }
        Ok(delayed)
    }

    /// The upstream request head, made of the downstream's in place:
    /// rewrites, hop-by-hop headers removed (kept for an upgrade), `Host`,
    /// `x-forwarded-*`, header operations. Returns the URI to send to and
    /// the downstream's side of an HTTP/1.1 upgrade (WebSocket); `None`
    /// when the rewritten URI is not valid.
    fn prepare(&self, head: &Head<'_>, parts: &mut Parts) -> Option<(Uri, Option<OnUpgrade>)> {
        let route = self.route;
        let new_path = route.rewrite_path(self.matched, head.path);
        let authority = route.authority_rewrite.as_deref().unwrap_or(head.authority);
        let path = new_path.as_deref().or(head.normalized.then_some(head.path));
        let uri = self.upstream_uri(parts, path, head.query, authority)?;
        let cluster = &self.cluster.cluster;
        // An HTTP/1.1 upgrade (WebSocket and the like) keeps its Upgrade and
        // Connection headers and, once the upstream answers 101, becomes a
        // byte tunnel through every hop, as Envoy's upgrade_configs do;
        // toward a meshgate peer it goes on HTTP/1.1 (`upgrades_on_h1`).
        let upgrade =
            upgrade_protocol(parts).filter(|_| !cluster.is_h2() || cluster.upgrades_on_h1());
        let h2 = cluster.is_h2() && upgrade.is_none();
        let downstream_upgrade = upgrade
            .as_ref()
            .and_then(|_| parts.extensions.remove::<OnUpgrade>());
        let headers = &mut parts.headers;
        remove_hop_by_hop(headers);
        if let Some(proto) = upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, proto);
        }
        if h2 {
            headers.remove(header::HOST);
        } else if headers.get(header::HOST).map(HeaderValue::as_bytes) != Some(authority.as_bytes())
            && let Ok(v) = HeaderValue::from_str(authority)
        {
            headers.insert(header::HOST, v);
        }
        if new_path.is_some()
            && let Ok(v) = HeaderValue::from_str(head.path)
        {
            headers.insert(X_ENVOY_ORIGINAL_PATH, v);
        }
        headers.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if self.conn.tls.is_some() {
                "https"
            } else {
                "http"
            }),
        );
        // No client vouches for a certificate: sidecars drop the header on
        // the way out (SANITIZE); gateways, and sidecars on the way in, set
        // it from the verified one (SANITIZE_SET; made at the handshake
        // only where it is set, connection.rs), replacing any sent.
        match self.conn.tls.as_ref().and_then(|t| t.client_cert.clone()) {
            Some(v) => headers.insert(X_FORWARDED_CLIENT_CERT, v),
            None => headers.remove(&X_FORWARDED_CLIENT_CERT),
        };
        if self.proxy.is_gateway() {
            append_forwarded_for(headers, self.conn.remote);
        }
        route.request_headers.apply(headers);
        self.destination.request_headers.apply(headers);
        parts.version = if h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        Some((uri, downstream_upgrade))
    }

    /// The URI's authority picks the connection (pool key, HTTP/2
    /// `:authority`); for the PassthroughCluster it is where the
    /// application was connecting.
    fn upstream_uri(
        &self,
        parts: &Parts,
        path: Option<&str>,
        query: &str,
        authority: &str,
    ) -> Option<Uri> {
        let path_and_query = match (path, query) {
            (Some(p), "") => http::uri::PathAndQuery::try_from(p).ok()?,
            (Some(p), q) => http::uri::PathAndQuery::try_from(format!("{p}?{q}")).ok()?,
            (None, _) => parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        };
        let to_original =
            self.conn.inbound || self.snap.passthrough == Some(self.destination.cluster);
        let authority = match (to_original, self.conn.original_dst) {
            (true, Some(orig)) => {
                // A unix socket is its cluster's own (`Endpoints::Unix`).
                let orig = match self.snap.inbound_target(self.conn, orig) {
                    InboundTarget::Addr(a) => a,
                    InboundTarget::Unix(_) => orig,
                };
                http::uri::Authority::try_from(orig.to_string()).ok()?
            }
            _ => {
                let named = http::uri::Authority::try_from(authority).ok()?;
                match self.cluster.cluster.pool_authority() {
                    // CONNECT's request line is its authority.
                    Some(pooled) if parts.method != Method::CONNECT => pooled,
                    _ => named,
                }
            }
        };
        let mut p = http::uri::Parts::default();
        p.scheme = Some(http::uri::Scheme::HTTP);
        p.authority = Some(authority);
        p.path_and_query = Some(path_and_query);
        Uri::from_parts(p).ok()
    }

    /// Sends the request, retrying as the route's policy (and the
    /// cluster's retry limit) says, within the route's timeout. Returns the
    /// response (or the last error) and how many attempts were made.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn's state holds its arguments twice"
    )]
    fn send(
        &self,
        mut parts: Parts,
        uri: Uri,
        body: Incoming,
        counter: Option<Arc<Progress>>,
    ) -> impl Future<Output = Result<(Answer, Tries), (UpstreamError, Tries, Option<SocketAddr>)>>
    {
        async move {
            let retry = &self.route.retry;
            let cluster = &self.cluster.cluster;
            // Bodyless requests can be retried; streamed bodies cannot be
            // replayed. hyper knows a body is empty from the request head (no
            // Content-Length, no chunked Transfer-Encoding): a GET with a body
            // keeps it.
            let bodyless = body.is_end_stream();
            if !bodyless
                && parts.version == Version::HTTP_11
                && !parts.headers.contains_key(header::CONTENT_LENGTH)
            {
                // Said explicitly: hyper's client sends no body on a GET unless
                // the request says it is chunked.
                parts.headers.insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            }
            // A request that reached the upstream went with its head and
            // body: where the policy may retry it (after its response, a
            // reset, a per-try timeout, a refused stream where the upstream
            // may refuse one, a gRPC request's status) the head is copied
            // for each attempt but the last, and a streamed body is kept as
            // it goes, up to `RETRY_BODY_LIMIT` (a larger one is not
            // retried once sent); a request that never left (Istio's
            // default retries: connect failures) comes back whole. gRPC
            // conditions are asked of a gRPC request's answer only (only a
            // gRPC server answers with a grpc-status).
            let grpc = retry.grpc_statuses != 0 && crate::http::is_grpc(&parts.headers);
            let copy_headers = retry.retries_sent(cluster.may_refuse_streams(), grpc);
            let kept = counter.clone().filter(|_| copy_headers);
            if let Some(progress) = &kept {
                progress.keep(RETRY_BODY_LIMIT);
            }
            let idle = self.proxy.timeouts.stream_idle;
            let received = counter.clone();
            let mut streaming = (!bodyless).then(|| {
                let b = Body::incoming(body, idle);
                match counter {
                    Some(c) => b.counted(c),
                    None => b,
                }
            });
            if !self.route.mirrors.is_empty() {
                self.mirror(&parts, &uri, streaming.as_mut());
            }
            let max_attempts = 1 + retry.attempts;
            // Where earlier attempts went, for a retry to go elsewhere.
            let avoid_previous = retry.avoids_previous_hosts(cluster.hashes());
            let mut tried: Vec<SocketAddr> = Vec::new();
            let mut attempt = 0;
            let mut latest = Latest::default();
            let mut overflowed = false;
            let attempts = async {
                // A retry in flight, counted against the cluster's limit.
                let mut _retrying = RetryPermit::default();
                loop {
                    attempt += 1;
                    let mut req = Request::new(streaming.take().unwrap_or_else(Body::empty));
                    *req.method_mut() = parts.method.clone();
                    *req.uri_mut() = uri.clone();
                    *req.version_mut() = parts.version;
                    if cluster.hashes_source_ip() {
                        req.extensions_mut()
                            .insert(DownstreamAddr(self.conn.remote));
                    }
                    if let Some(c) = parts.extensions.get::<GeneratedCookie>() {
                        req.extensions_mut().insert(c.clone());
                    }
                    let copied = copy_headers && attempt < max_attempts;
                    *req.headers_mut() = if copied {
                        parts.headers.clone()
                    } else {
                        std::mem::take(&mut parts.headers)
                    };
                    let avoid = Avoid {
                        hosts: if avoid_previous { &tried } else { &[] },
                        priorities_of: &tried[..retry.tried_priorities(attempt).min(tried.len())],
                    };
                    let endpoint = cluster.endpoint(&req, avoid).await?;
                    latest = Latest {
                        at: endpoint,
                        waiting: true,
                    };
                    let sent = match retry.per_try_timeout {
                        Some(t) => tokio::time::timeout(t, cluster.send_to(req, endpoint))
                            .await
                            .unwrap_or_else(|_| {
                                if let Some(addr) = endpoint {
                                    cluster.timed_out(addr);
                                }
                                Err(UpstreamError::PerTryTimeout.into())
                            }),
                        None => cluster.send_to(req, endpoint).await,
                    };
                    latest = Latest {
                        at: sent.as_ref().err().and_then(|f| f.upstream).or(endpoint),
                        waiting: false,
                    };
                    let more = attempt < max_attempts;
                    match sent {
                        Ok(answer)
                            if copied
                                && (retry.retry_status(answer.response.status().as_u16())
                                    || (grpc
                                        && retry.retry_grpc_status(
                                            answer.response.headers().get(GRPC_STATUS),
                                        ))) =>
                        {
                            // Envoy's retry circuit breaker: over it, the
                            // request ends with what it has (UO). Its own
                            // retry before this one counts no more.
                            _retrying = RetryPermit::default();
                            let Some(permit) = cluster.retry_permit() else {
                                overflowed = true;
                                return Ok(answer);
                            };
                            if !bodyless {
                                match kept.as_deref().and_then(Progress::replay) {
                                    Some(body) => streaming = Some(body),
                                    None => return Ok(answer),
                                }
                            }
                            _retrying = permit;
                            retrying_status(cluster, answer.response.status(), attempt);
                        }
                        Ok(resp) => return Ok(resp),
                        Err(Failure { error, unsent, .. })
                            if more
                                && retry.retry_unanswered(error.unanswered())
                                && (copied || unsent.is_some()) =>
                        {
                            _retrying = RetryPermit::default();
                            let Some(permit) = cluster.retry_permit() else {
                                overflowed = true;
                                return Err(error);
                            };
                            if let Some(unsent) = unsent {
                                let (head, body) = (*unsent).into_parts();
                                parts.headers = head.headers;
                                streaming = Some(body);
                            } else if !bodyless {
                                match kept.as_deref().and_then(Progress::replay) {
                                    Some(body) => streaming = Some(body),
                                    None => return Err(error),
                                }
                            }
                            _retrying = permit;
                            retrying_failure(cluster, &error, attempt);
                        }
                        Err(f) => return Err(f.error),
                    }
                    if let Some(addr) =
                        endpoint.filter(|_| avoid_previous || retry.remote_localities)
                    {
                        tried.push(addr);
                    }
                    // Boxed, as the fault delay.
                    Box::pin(tokio::time::sleep(retry.backoff * attempt)).await;
                }
            };
            let (limit, timed_out) = match self.route.timeout {
                Some(t) => (t, UpstreamError::Timeout),
                None => (self.proxy.timeouts.stream_idle, UpstreamError::StreamIdle),
            };
            // Envoy's clock starts when the request has been received: a
            // streamed body's end.
            let start = tokio::time::Instant::from_std(self.start);
            let clock = async move {
                let from = match &received {
                    Some(p) => p.ended().await,
                    None => start,
                };
                tokio::time::sleep_until(from + limit).await;
            };
            let result = tokio::select! {
                biased;
                result = attempts => result,
                () = clock => Err(timed_out),
            };
            if let (Err(UpstreamError::Timeout), Some(addr), true) =
                (&result, latest.at, latest.waiting)
            {
                cluster.timed_out(addr);
            }
            let tries = Tries {
                attempts: attempt,
                overflowed,
            };
            result
                .map(|r| (r, tries))
                .map_err(|e| (e, tries, latest.at))
        }
    }

    /// Copies of the request for the route's mirrors (Envoy's shadows):
    /// the authority gets `-shadow`, the body is copied as it goes up, the
    /// answer is dropped. A mirror never delays, fails or changes the
    /// request; its wait is bounded by the route's timeout (or the stream
    /// idle timeout).
    #[cold]
    #[inline(never)]
    fn mirror(&self, parts: &Parts, uri: &Uri, mut body: Option<&mut Body>) {
        for &(index, percent) in &self.route.mirrors {
            if fastrand::f64() * 100.0 >= percent {
                continue;
            }
            let Some(entry) = self.snap.cluster(index).cloned() else {
                continue;
            };
            let copy = body.as_deref_mut().map_or_else(Body::empty, Body::copy);
            let mut req = Request::new(copy);
            *req.method_mut() = parts.method.clone();
            // The URI's authority may be the pool's (`pool_authority`):
            // Host has the request's.
            let host = parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok());
            *req.uri_mut() = shadow_uri(uri, host);
            *req.version_mut() = parts.version;
            *req.headers_mut() = parts.headers.clone();
            if let Some(host) = parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                && let Ok(v) = HeaderValue::from_str(&shadow_authority(host))
            {
                req.headers_mut().insert(header::HOST, v);
            }
            let limit = self
                .route
                .timeout
                .unwrap_or(self.proxy.timeouts.stream_idle);
            tokio::spawn(async move {
                let sent = tokio::time::timeout(limit, async {
                    let answer = entry.cluster.send(req).await.map_err(|f| f.error)?;
                    // Read to its end, unkept: the connection goes back to
                    // the pool instead of being closed.
                    let mut body =
                        Body::incoming(answer.response.into_body(), limit).leased(answer.lease);
                    while let Some(Ok(_)) = http_body_util::BodyExt::frame(&mut body).await {}
                    Ok::<(), UpstreamError>(())
                })
                .await;
                if let Ok(Err(e)) = sent {
                    tracing::debug!(cluster = %entry.cluster.name(), error = %e, "mirror request failed");
                }
            });
        }
    }

    /// The upstream's response on its way back.
    fn respond(
        &self,
        answer: Answer,
        tries: Tries,
        delayed: bool,
        downstream_upgrade: Option<OnUpgrade>,
        received: Option<tokio::time::Instant>,
    ) -> Outcome {
        let Answer {
            response: mut resp,
            upstream,
            lease,
        } = answer;
        let upstream_upgrade = (resp.status() == StatusCode::SWITCHING_PROTOCOLS)
            .then(|| resp.extensions_mut().remove::<OnUpgrade>())
            .flatten();
        let (mut parts, body) = resp.into_parts();
        let upgraded_to = parts.headers.get(header::UPGRADE).cloned();
        remove_hop_by_hop(&mut parts.headers);
        if let (Some(down), Some(up), Some(proto)) =
            (downstream_upgrade, upstream_upgrade, upgraded_to)
        {
            self.upgraded(&mut parts.headers, proto, down, up);
        }
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        parts
            .headers
            .insert(X_ENVOY_UPSTREAM_SERVICE_TIME, millis_value(ms));
        self.route.response_headers.apply(&mut parts.headers);
        self.destination.response_headers.apply(&mut parts.headers);
        let retry = &self.route.retry;
        let retried_out = tries.attempts > 1
            && !tries.overflowed
            && (retry.retry_status(parts.status.as_u16())
                || retry.retry_grpc_status(parts.headers.get(GRPC_STATUS)));
        let flags = match (retried_out, tries.overflowed, delayed) {
            (true, _, _) => ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED,
            (false, true, _) => ResponseFlags::UPSTREAM_OVERFLOW,
            (false, false, true) => ResponseFlags::DELAY_INJECTED,
            (false, false, false) => ResponseFlags::NONE,
        };
        Outcome {
            response: Response::from_parts(
                parts,
                Body::incoming(body, self.proxy.timeouts.stream_idle)
                    .until(self.route.timeout.zip(received).map(|(t, from)| from + t))
                    .leased(lease),
            ),
            flags,
            details: Cow::Borrowed("via_upstream"),
            upstream,
            answered: true,
            transport_failure: None,
        }
    }

    /// Both sides switched protocols: the response says so and the
    /// connections become a tunnel.
    #[cold]
    #[inline(never)]
    fn upgraded(
        &self,
        headers: &mut HeaderMap,
        proto: HeaderValue,
        down: OnUpgrade,
        up: OnUpgrade,
    ) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto);
        // Counted as a connection: the drain waits for it.
        let open = self.proxy.drain.connection();
        tokio::spawn(async move {
            tunnel(down, up).await;
            drop(open);
        });
    }

    /// The local reply for a request that got no response; the endpoint
    /// its last attempt went to, if any, is logged as Envoy does.
    #[cold]
    #[inline(never)]
    fn failed(&self, e: &UpstreamError, tries: Tries, upstream: Option<SocketAddr>) -> Outcome {
        let mut flags = e.flag();
        if tries.overflowed {
            flags = flags.with(ResponseFlags::UPSTREAM_OVERFLOW);
        } else if tries.attempts > 1 && self.route.retry.retry_unanswered(e.unanswered()) {
            flags = flags.with(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
        }
        tracing::warn!(
            cluster = %self.cluster.cluster.name(),
            host = %self.cluster.host,
            error = %e,
            flags = %flags,
            fault = e.fault().as_str(),
            "upstream request failed"
        );
        let mut out = Outcome::local(
            text(e.status(), e.body()),
            flags,
            Cow::Borrowed(e.details()),
        );
        out.transport_failure = e.transport_failure().map(str::to_owned);
        out.upstream = upstream;
        out
    }
}

/// How many attempts a request took, and whether the cluster's retry
/// limit stopped another.
#[derive(Debug, Clone, Copy)]
struct Tries {
    attempts: u32,
    overflowed: bool,
}

/// Where the latest attempt went (chosen, or where its connection was),
/// and whether it is still waiting for its answer: what the route
/// timeout ends, for outlier detection and the access log.
#[derive(Debug, Clone, Copy, Default)]
struct Latest {
    at: Option<SocketAddr>,
    waiting: bool,
}

/// A rewritten URI that is not valid.
#[cold]
#[inline(never)]
fn invalid_authority() -> Outcome {
    Outcome::local(
        text(StatusCode::BAD_REQUEST, "bad request"),
        ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR,
        Cow::Borrowed("invalid_authority"),
    )
}

/// The largest request body kept for a retry once sent (Envoy's edge
/// buffer limit; a larger one goes once).
const RETRY_BODY_LIMIT: usize = 32 * 1024;

/// An attempt is retried after a status the policy retries on.
#[cold]
#[inline(never)]
fn retrying_status(cluster: &Cluster, status: StatusCode, attempt: u32) {
    tracing::debug!(cluster = %cluster.name(), %status, attempt, "retrying");
}

/// An attempt is retried after a failure the policy retries on.
#[cold]
#[inline(never)]
fn retrying_failure(cluster: &Cluster, error: &UpstreamError, attempt: u32) {
    tracing::debug!(cluster = %cluster.name(), %error, attempt, "retrying after no response");
}

/// The WebSocket upgrade an HTTP/1.1 request asks for (the plan refused
/// other protocols; `h2c` is dropped with the hop-by-hop headers).
fn upgrade_protocol(parts: &Parts) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 || parts.method == Method::CONNECT {
        return None;
    }
    crate::plan::upgrade(&parts.headers)
        .filter(|u| u.eq_ignore_ascii_case("websocket"))
        .and_then(|_| parts.headers.get(header::UPGRADE).cloned())
}

/// Copies bytes both ways between an upgraded downstream and upstream
/// connection until either side closes.
async fn tunnel(down: OnUpgrade, up: OnUpgrade) {
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

/// Removes the hop-by-hop headers. Most messages carry none: one pass over
/// their few headers decides, instead of a hashed lookup per name.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        for h in &HOP_BY_HOP {
            headers.remove(h);
        }
    }
}

/// Every number below 1000, written one after another: "0123…9899100…999".
static MILLIS: [u8; 2890] = {
    let mut out = [0u8; 2890];
    let (mut n, mut i) = (0u32, 0);
    while n < 1000 {
        if n >= 100 {
            out[i] = b'0' + (n / 100) as u8;
            i += 1;
        }
        if n >= 10 {
            out[i] = b'0' + (n / 10 % 10) as u8;
            i += 1;
        }
        out[i] = b'0' + (n % 10) as u8;
        i += 1;
        n += 1;
    }
    out
};

/// `x-envoy-upstream-service-time`'s value. Under a second, the usual case,
/// a slice of `MILLIS`: no allocation (http's integer conversion makes two,
/// a buffer and its shared header, and frees both with the response).
fn millis_value(ms: u64) -> HeaderValue {
    let (at, len) = match ms {
        0..=9 => (ms, 1),
        10..=99 => (10 + (ms - 10) * 2, 2),
        100..=999 => (190 + (ms - 100) * 3, 3),
        _ => return HeaderValue::from(ms),
    };
    let at = at as usize;
    HeaderValue::from_maybe_shared(bytes::Bytes::from_static(&MILLIS[at..at + len]))
        .unwrap_or_else(|_| HeaderValue::from(ms))
}

fn append_forwarded_for(headers: &mut HeaderMap, remote: std::net::SocketAddr) {
    let mut value = Vec::with_capacity(64);
    if let Some(prev) = headers.get(&X_FORWARDED_FOR) {
        value.extend_from_slice(prev.as_bytes());
        value.push(b',');
    }
    write_ip(&mut value, remote.ip());
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

/// An address as `Display` writes it; IPv4 without the formatting
/// machinery (every gateway request writes one).
fn write_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        std::net::IpAddr::V6(v6) => out.extend_from_slice(v6.to_string().as_bytes()),
    }
}

/// `host[:port]` with `-shadow` after the host, as Envoy names a shadow.
fn shadow_authority(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    }
}

fn shadow_uri(uri: &Uri, host: Option<&str>) -> Uri {
    let mut parts = uri.clone().into_parts();
    if let Some(a) = host.or(parts.authority.as_ref().map(|a| a.as_str()))
        && let Ok(shadow) = shadow_authority(a).parse()
    {
        parts.authority = Some(shadow);
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_times_read_as_their_numbers() {
        for ms in (0..=1200).chain([9_999, u64::MAX]) {
            assert_eq!(millis_value(ms).to_str().unwrap(), ms.to_string(), "{ms}");
        }
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        let ips = [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.100.255",
            "127.0.0.1",
            "99.9.109.200",
            "::1",
            "fe80::1:2",
        ];
        for ip in ips {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            write_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
    }

    #[test]
    fn hop_by_hop_headers_are_removed_and_others_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        for h in &HOP_BY_HOP {
            headers.insert(h.clone(), HeaderValue::from_static("x"));
        }
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), [header::ACCEPT]);
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let remote: std::net::SocketAddr = "10.1.2.3:5555".parse().unwrap();
        let mut headers = HeaderMap::new();
        append_forwarded_for(&mut headers, remote);
        assert_eq!(headers[&X_FORWARDED_FOR], "10.1.2.3");
        append_forwarded_for(&mut headers, remote);
        assert_eq!(headers[&X_FORWARDED_FOR], "10.1.2.3,10.1.2.3");
    }
}
