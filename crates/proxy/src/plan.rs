//! The connection plan: every decision about a connection and its requests,
//! as one pure function of the snapshot, the connection, and what has been
//! read from it. The listeners act on the plan and `meshgate explain` prints
//! it; nothing else decides.
//!
//! A connection is planned in steps. Before anything is read the plan may
//! already be final (a registered TCP port goes to its original
//! destination), or it asks for the first byte (TLS or not) or for the
//! whole ClientHello (its SNI). A connection served as HTTP plans each
//! request from its head. `explain` passes everything at once and gets the
//! final plan: `plan` answers the same whether the facts come one by one or
//! together.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use meshgate_config::model::networking::OutboundMode;
use meshgate_telemetry::{Refused, ResponseFlags};

use crate::authz::{AuthzRequest, Decision, HttpAttributes, authorize};
use crate::conn::Conn;
use crate::cors::{Cors, CorsDecision};
use crate::normalize::normalize_path;
use crate::route::{Action, Redirect, RequestView, Route, Routed, WeightedCluster, pick_weighted};
use crate::snapshot::{
    BLACKHOLE_CLUSTER, ClusterEntry, ListenerState, ListenerTls, Role, Snapshot, TlsRoute,
};

/// What has been read from a connection so far.
#[derive(Debug, Clone, Copy)]
pub enum Peeked<'a> {
    Nothing,
    /// The first byte: a TLS handshake record, or not.
    FirstByte {
        tls: bool,
    },
    /// A whole ClientHello, and the SNI it carries.
    ClientHello {
        sni: Option<&'a str>,
    },
    /// An HTTP request head (on a connection served as HTTP).
    Request(&'a RequestHead<'a>),
    /// Nothing within the protocol detection timeout: the client waits
    /// for the server to speak first (MySQL, SMTP), so it is plaintext.
    Silent,
}

/// An HTTP request as the plan sees it.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub view: RequestView<'a>,
    /// The port an absolute-form or authority-form URI names (explicit
    /// proxy clients, CONNECT).
    pub uri_port: Option<u16>,
}

/// What to read before the plan can go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    FirstByte,
    /// The first byte, or that the client stays silent this long
    /// (`Peeked::Silent`).
    FirstByteOrSilence(Duration),
    ClientHello,
}

/// How a listener terminates TLS.
#[derive(Debug, Clone)]
pub enum Termination {
    /// Mutual TLS with the mesh's SPIFFE certificates.
    Mesh,
    /// A Gateway server's TLS.
    Server(std::sync::Arc<rustls::ServerConfig>),
}

/// Why a connection is closed before anything is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no Gateway server listens on port {0}")]
    NoListener(u16),
    #[error("plaintext refused: PeerAuthentication STRICT")]
    StrictMtls,
    #[error("plaintext on a TLS server")]
    PlaintextOnTls,
    #[error("not TLS on a PASSTHROUGH server")]
    NotTls,
}

/// The next step for a connection.
#[derive(Debug)]
pub enum Plan<'s> {
    Read(Need),
    /// Terminate TLS, then serve HTTP.
    Terminate(Termination),
    /// Serve HTTP: each request is planned from its head.
    ServeHttp,
    Request(RequestPlan<'s>),
    Tcp(TcpPlan<'s>),
    Close(Refusal),
}

/// Plans the next step for a connection, given what has been read from it.
/// `pick` in [0, 1) chooses among weighted destinations.
pub fn plan<'s>(snap: &'s Snapshot, conn: &Conn, peeked: Peeked<'_>, pick: f64) -> Plan<'s> {
    if conn.inbound {
        return inbound(snap, conn, peeked);
    }
    match snap.role {
        Role::Gateway => gateway(snap, conn, peeked, pick),
        Role::Sidecar => match sidecar(snap, conn, peeked, pick) {
            // Called directly, it was going nowhere else: the black hole.
            Plan::Tcp(t) if conn.bound && t.action == TcpAction::OriginalDst => {
                let flags = ResponseFlags::NO_HEALTHY_UPSTREAM;
                Plan::Tcp(TcpPlan::closed(t.listener, flags, TcpReason::BlackHole))
            }
            p => p,
        },
    }
}

/// TLS or not, from whatever was read.
fn first_byte_is_tls(peeked: Peeked<'_>) -> Option<bool> {
    match peeked {
        Peeked::Nothing => None,
        Peeked::FirstByte { tls } => Some(tls),
        Peeked::ClientHello { .. } => Some(true),
        Peeked::Request(_) | Peeked::Silent => Some(false),
    }
}

/// A gateway listens on its servers' ports: TLS is terminated (mesh
/// mutual TLS on plain HTTP servers, the server's own on HTTPS servers) or
/// passed through by SNI.
fn gateway<'s>(snap: &'s Snapshot, conn: &Conn, peeked: Peeked<'_>, pick: f64) -> Plan<'s> {
    let Some(listener) = snap.listener(conn.port) else {
        return Plan::Close(Refusal::NoListener(conn.port));
    };
    let tcp_server = serves_tcp(listener);
    if conn.tls.is_some() {
        if tcp_server {
            return Plan::Tcp(tcp(snap, conn, listener, pick));
        }
        return http(snap, conn, peeked, pick);
    }
    if let ListenerTls::Passthrough = listener.tls {
        return match (peeked, first_byte_is_tls(peeked)) {
            (Peeked::ClientHello { sni }, _) => {
                Plan::Tcp(tls(snap, conn, Some(listener), sni, pick))
            }
            (_, Some(false)) => Plan::Close(Refusal::NotTls),
            _ => Plan::Read(Need::ClientHello),
        };
    }
    match (&listener.tls, first_byte_is_tls(peeked)) {
        // A plain TCP server also proxies server-first protocols, as
        // Istio's (which detects nothing there) does.
        (ListenerTls::MeshAuto, None) if tcp_server && !listener.strict_mtls => {
            let wait = snap.view.protocol_detection_timeout;
            Plan::Read(Need::FirstByteOrSilence(
                wait.map_or(GATEWAY_PROTOCOL_DETECTION, |d| d.as_std()),
            ))
        }
        (_, None) => Plan::Read(Need::FirstByte),
        (ListenerTls::Terminate(cfg), Some(true)) => {
            Plan::Terminate(Termination::Server(cfg.clone()))
        }
        (ListenerTls::Terminate(_), Some(false)) => Plan::Close(Refusal::PlaintextOnTls),
        (_, Some(true)) => Plan::Terminate(Termination::Mesh),
        (_, Some(false)) if listener.strict_mtls => Plan::Close(Refusal::StrictMtls),
        (_, Some(false)) if tcp_server => Plan::Tcp(tcp(snap, conn, listener, pick)),
        (_, Some(false)) => http(snap, conn, peeked, pick),
    }
}

/// How long a gateway's plain TCP server waits for a client's first byte
/// (mesh mTLS or not) before it takes the client for one of a server-first
/// protocol, where MeshConfig sets no protocolDetectionTimeout. A mesh
/// peer's ClientHello comes at once; a second keeps a slow one from being
/// taken for plaintext.
pub const GATEWAY_PROTOCOL_DETECTION: Duration = Duration::from_secs(1);

/// A gateway server whose connections go by `tcp` routes: TCP (and the
/// like), or TLS it terminates (neither HTTP nor passed through).
fn serves_tcp(listener: &ListenerState) -> bool {
    use meshgate_config::registry::Protocol;
    !listener.protocol.is_http()
        && listener.protocol != Protocol::Https
        && !matches!(listener.tls, ListenerTls::Passthrough)
}

/// A connection on its way in to the workload (a sidecar's 15006): the
/// PeerAuthentication mode decides what TLS is (STRICT: mesh mTLS only;
/// PERMISSIVE: mesh mTLS or plaintext, told by the first byte; DISABLE:
/// the bytes are the application's, TLS or not), unless the port has a
/// Sidecar ingress `tls` of its own. A port the workload
/// serves as HTTP is then served as HTTP, each request meeting the
/// workload's AuthorizationPolicies; any other port meets them at L4
/// (HTTP-only fields as Istio's TCP filter treats them) and goes on to
/// where it was going.
fn inbound<'s>(snap: &'s Snapshot, conn: &Conn, peeked: Peeked<'_>) -> Plan<'s> {
    use meshgate_config::model::security::MtlsMode;
    // The application's port decides (`portLevelMtls`), else the workload's.
    let mode = snap
        .inbound_mtls_ports
        .get(&conn.port)
        .copied()
        .unwrap_or(snap.inbound_mtls);
    let http_port = snap.inbound_http.contains_key(&conn.port);
    let plaintext = |snap: &'s Snapshot| match peeked {
        Peeked::Request(head) => Plan::Request(plan_request(snap, conn, head, 0.0)),
        _ if http_port => Plan::ServeHttp,
        _ => Plan::Tcp(inbound_tcp(snap, conn)),
    };
    if conn.tls.is_some() {
        return plaintext(snap);
    }
    // A Sidecar ingress port with its own TLS serves clients outside the
    // mesh: its certificate, TLS only.
    if let Some(server) = snap.inbound_tls.get(&conn.port) {
        return match first_byte_is_tls(peeked) {
            None => Plan::Read(Need::FirstByte),
            Some(true) => Plan::Terminate(Termination::Server(server.clone())),
            Some(false) => Plan::Close(Refusal::PlaintextOnTls),
        };
    }
    if mode == MtlsMode::Disable && !http_port {
        return plaintext(snap);
    }
    let detection = snap.view.protocol_detection_timeout;
    match first_byte_is_tls(peeked) {
        // Istio's protocolDetectionTimeout: silence is plaintext after it;
        // without one (Istio's default) the first byte's timeout closes.
        None => match detection {
            Some(d) if matches!(mode, MtlsMode::Permissive | MtlsMode::Unset) => {
                Plan::Read(Need::FirstByteOrSilence(d.as_std()))
            }
            _ => Plan::Read(Need::FirstByte),
        },
        // The application's own TLS: its bytes, not HTTP to serve.
        Some(true) if mode == MtlsMode::Disable => Plan::Tcp(inbound_tcp(snap, conn)),
        Some(true) => Plan::Terminate(Termination::Mesh),
        Some(false) if mode == MtlsMode::Strict => Plan::Close(Refusal::StrictMtls),
        Some(false) => plaintext(snap),
    }
}

fn inbound_tcp<'s>(snap: &'s Snapshot, conn: &Conn) -> TcpPlan<'s> {
    let authz = authorize(&snap.inbound_policies, &authz_request(conn, None, None));
    if !authz.is_allowed() {
        return TcpPlan {
            authz,
            ..TcpPlan::closed(None, ResponseFlags::NONE, TcpReason::Denied)
        };
    }
    TcpPlan::original_dst(snap, None, TcpReason::Inbound)
}

/// A sidecar decides by the port the application was connecting to, as
/// Envoy's virtualOutbound does: a registered TCP port goes to the original
/// destination; a port with HTTP routes is served as HTTP; TLS on a port
/// with routes is routed by SNI; anything else gets the outbound traffic
/// policy.
fn sidecar<'s>(snap: &'s Snapshot, conn: &Conn, peeked: Peeked<'_>, pick: f64) -> Plan<'s> {
    if conn.explicit {
        // An explicit-proxy client: each request names its destination.
        return http(snap, conn, peeked, pick);
    }
    if conn.original_dst.is_none() && conn.connect_host.is_none() && !conn.bound {
        // Made to the capture port itself, and no explicit proxy: nowhere
        // to go (Istio's virtualOutbound sends it to a black hole).
        let flags = ResponseFlags::NO_HEALTHY_UPSTREAM;
        return Plan::Tcp(TcpPlan::closed(None, flags, TcpReason::ToCapturePort));
    }
    let listener = snap.listener(conn.port);
    let (http_port, tls_port) =
        listener.map_or((false, false), |l| (l.serves_http(), l.serves_tls()));
    if let Some(l) = listener.filter(|l| l.protocol == meshgate_config::registry::Protocol::Tcp) {
        return Plan::Tcp(tcp(snap, conn, l, pick));
    }
    if !http_port && !tls_port {
        return Plan::Tcp(unmatched(snap, listener));
    }
    match (peeked, first_byte_is_tls(peeked)) {
        (_, None) => Plan::Read(Need::FirstByte),
        (Peeked::ClientHello { sni }, _) => Plan::Tcp(tls(snap, conn, listener, sni, pick)),
        (_, Some(true)) => Plan::Read(Need::ClientHello),
        (_, Some(false)) if http_port => http(snap, conn, peeked, pick),
        (_, Some(false)) => Plan::Tcp(unmatched(snap, listener)),
    }
}

fn http<'s>(snap: &'s Snapshot, conn: &Conn, peeked: Peeked<'_>, pick: f64) -> Plan<'s> {
    match peeked {
        Peeked::Request(head) => Plan::Request(plan_request(snap, conn, head, pick)),
        _ => Plan::ServeHttp,
    }
}

// === HTTP requests ===

/// Every decision for one HTTP request.
#[derive(Debug)]
pub struct RequestPlan<'s> {
    /// The port routes were looked up on.
    pub port: u16,
    pub listener: Option<&'s ListenerState>,
    pub routed: Routed<'s>,
    /// The destination picked, by index into the snapshot's clusters.
    pub destination: Option<&'s WeightedCluster>,
    pub authz: Decision,
    pub action: RequestAction<'s>,
    /// The path after MeshConfig pathNormalization, when it differs from
    /// the request's: what routing and authorization saw, and what goes
    /// upstream.
    pub normalized_path: Option<String>,
    /// The route's CORS policy and the allowed origin its response names.
    pub cors: Option<(&'s Cors, HeaderValue)>,
}

/// What the proxy does with a request.
#[derive(Debug)]
pub enum RequestAction<'s> {
    /// To the picked destination's cluster.
    Forward {
        route: &'s Route,
        /// The index of the match block that matched.
        matched: Option<usize>,
        destination: &'s WeightedCluster,
        cluster: &'s std::sync::Arc<ClusterEntry>,
    },
    /// The route's redirect.
    Redirect {
        route: &'s Route,
        redirect: &'s Redirect,
    },
    /// The route's direct response.
    Direct { status: u16, body: &'s Bytes },
    /// A CORS preflight the route's policy answers: 200 with these headers.
    CorsPreflight(HeaderMap),
    /// A CONNECT request the sidecar accepts: 200, then the tunnel is a
    /// connection to the named host and port.
    Connect { host: String, port: u16 },
    /// Answered by the proxy.
    Local(Local),
}

/// A response the proxy makes itself, and how it is reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub status: StatusCode,
    pub body: &'static str,
    pub flags: ResponseFlags,
    /// Envoy's `%RESPONSE_CODE_DETAILS%`.
    pub details: Cow<'static, str>,
    /// The route name to log when it is not a route of the table
    /// (`block_all`).
    pub route_name: Option<&'static str>,
    /// The destination metrics name when no cluster was picked
    /// (`BlackHoleCluster`).
    pub destination: Option<&'static str>,
    /// The request was refused before any decision, counted as Envoy
    /// counts it.
    pub refused: Option<Refused>,
}

impl Local {
    fn new(
        status: StatusCode,
        body: &'static str,
        flags: ResponseFlags,
        details: &'static str,
    ) -> Local {
        Local {
            status,
            body,
            flags,
            details: Cow::Borrowed(details),
            route_name: None,
            destination: None,
            refused: None,
        }
    }

    /// 403: an AuthorizationPolicy denies the request.
    #[cold]
    pub fn denied(decision: &Decision) -> Local {
        Local {
            details: Cow::Owned(decision.response_code_details().unwrap_or_default()),
            ..Local::new(
                StatusCode::FORBIDDEN,
                "RBAC: access denied",
                ResponseFlags::NONE,
                "",
            )
        }
    }

    /// 502: REGISTRY_ONLY and the host is not in the registry (Istio's
    /// `block_all` route).
    #[cold]
    fn blocked() -> Local {
        Local {
            route_name: Some("block_all"),
            destination: Some(BLACKHOLE_CLUSTER),
            ..Local::new(
                StatusCode::BAD_GATEWAY,
                "",
                ResponseFlags::NONE,
                "direct_response",
            )
        }
    }

    /// 404 NR: no route for this host or request.
    #[cold]
    fn no_route() -> Local {
        Local::new(
            StatusCode::NOT_FOUND,
            "",
            ResponseFlags::NO_ROUTE_FOUND,
            "route_not_found",
        )
    }

    /// 400: a request no proxy should act on.
    #[cold]
    fn bad_request(details: &'static str, refused: Refused) -> Local {
        Local {
            refused: Some(refused),
            ..Local::new(
                StatusCode::BAD_REQUEST,
                "Bad Request",
                ResponseFlags::NONE,
                details,
            )
        }
    }

    /// 503 NC: the route's destination is not a cluster this proxy has.
    #[cold]
    fn no_cluster() -> Local {
        Local::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no cluster",
            ResponseFlags::NO_CLUSTER_FOUND,
            "cluster_not_found",
        )
    }
}

/// Plans one request on a connection served as HTTP.
pub fn plan_request<'s>(
    snap: &'s Snapshot,
    conn: &Conn,
    head: &RequestHead<'_>,
    pick: f64,
) -> RequestPlan<'s> {
    // An explicit-proxy request names its port in the URI (or, in origin
    // form on a unix socket listener, its Host).
    let port = if conn.explicit {
        let host_port = || crate::route::split_host_port(head.view.authority).1;
        head.uri_port.or_else(host_port).unwrap_or(80)
    } else {
        conn.port
    };
    // On the way in there is one route per port, to the workload.
    let listener = snap.listener(port).filter(|_| !conn.inbound);
    let refused = |local| refused(port, listener, local);
    if let Some(local) = malformed(&head.view) {
        return refused(local);
    }
    // Normalized before anything is decided: what is authorized is what
    // is routed and forwarded.
    let Ok(path) = normalize_path(head.view.path, snap.view.path_normalization) else {
        return refused(Local::bad_request(
            "path_normalization_failed",
            Refused::downstream_rq_failed_path_normalization,
        ));
    };
    let req = RequestView {
        path: &path,
        ..head.view
    };
    let req = &req;
    // Route first: the chosen cluster names the destination in every
    // report, denied requests included (as Envoy's stats do).
    let routed = match (
        listener.map_or(Routed::NoVirtualHost, |l| l.routes.route(req)),
        &snap.allow_any,
    ) {
        _ if conn.inbound => snap
            .inbound_http
            .get(&port)
            .map_or(Routed::NoRoute, |route| Routed::Matched {
                route,
                matched: None,
            }),
        // ALLOW_ANY: unknown hosts go to the original destination.
        (Routed::NoVirtualHost, Some(route)) => Routed::Matched {
            route,
            matched: None,
        },
        (r, _) => r,
    };
    let destination = match &routed {
        Routed::Matched { route, .. } => match &route.action {
            Action::Forward(d) => pick_weighted(d, pick),
            _ => None,
        },
        _ => None,
    };
    let http = HttpAttributes {
        host: req.authority,
        method: req.method,
        path: req.path,
        headers: req.headers,
    };
    // A sidecar's own policies are the workload's, on the way in.
    let policies = if conn.inbound {
        &snap.inbound_policies
    } else {
        &snap.policies
    };
    let authz = authorize(policies, &authz_request(conn, conn.sni(), Some(http)));
    // CORS comes after authorization (and faults), as Envoy's filter order.
    let cors = match (&routed, authz.is_allowed()) {
        (Routed::Matched { route, .. }, true) => route
            .cors
            .as_deref()
            .map(|c| (c, c.decide(req.method, req.headers))),
        _ => None,
    };
    let (action, cors) = match cors {
        _ if snap.role == Role::Sidecar && !conn.inbound && req.method == "CONNECT" => {
            (connect(snap, head), None)
        }
        Some((_, CorsDecision::Preflight(h))) => (RequestAction::CorsPreflight(h), None),
        Some((c, CorsDecision::Allowed(origin))) => (
            request_action(snap, &routed, destination, &authz),
            Some((c, origin)),
        ),
        _ => (request_action(snap, &routed, destination, &authz), None),
    };
    let normalized_path = match path {
        Cow::Owned(p) => Some(p),
        Cow::Borrowed(_) => None,
    };
    RequestPlan {
        port,
        listener,
        routed,
        destination,
        authz,
        action,
        normalized_path,
        cors,
    }
}

/// The plan of a request refused before anything is decided.
#[cold]
#[inline(never)]
fn refused<'s>(port: u16, listener: Option<&'s ListenerState>, local: Local) -> RequestPlan<'s> {
    RequestPlan {
        port,
        listener,
        routed: Routed::NoVirtualHost,
        destination: None,
        authz: Decision::Allow { audited: false },
        action: RequestAction::Local(local),
        normalized_path: None,
        cors: None,
    }
}

/// Requests refused before anything is decided (Envoy's and Istio's
/// 400s): a method not in upper case (a lowercase `delete` is not
/// `DELETE` to a policy, but may be to an upstream), or two `Host`
/// headers (which one would be routed and authorized?).
fn malformed(req: &RequestView<'_>) -> Option<Local> {
    if !req
        .method
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
    {
        return Some(Local::bad_request(
            "method_not_upper_case",
            Refused::downstream_cx_protocol_error,
        ));
    }
    if req
        .headers
        .get_all(http::header::HOST)
        .iter()
        .nth(1)
        .is_some()
    {
        return Some(Local::bad_request(
            "duplicate_host_header",
            Refused::downstream_cx_protocol_error,
        ));
    }
    match upgrade(req.headers) {
        // Istio configures WebSocket upgrades only; `h2c` is dropped (the
        // request goes on as HTTP/1.1); any other is refused, as Envoy
        // refuses an upgrade it has no config for.
        Some(u) if u.eq_ignore_ascii_case("websocket") || u.eq_ignore_ascii_case("h2c") => None,
        Some(_) => Some(Local::new(
            StatusCode::FORBIDDEN,
            "",
            ResponseFlags::NONE,
            "upgrade_failed",
        )),
        None => None,
    }
}

/// The protocol a request asks to upgrade to (`Connection: upgrade` and
/// `Upgrade`): the first one it names, without a version.
pub fn upgrade(headers: &http::HeaderMap) -> Option<&str> {
    // `Upgrade` first: most requests have none, and one lookup says so.
    let value = headers.get(http::header::UPGRADE)?.to_str().ok()?;
    let asks = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let first = value.split(',').next()?.trim();
    asks.then(|| first.split('/').next().unwrap_or(first))
}

impl RequestPlan<'_> {
    /// The route name Envoy logs (`%ROUTE_NAME%`): the matched rule, or
    /// `block_all`.
    pub fn route_name(&self) -> Option<&str> {
        match (&self.routed, &self.action) {
            (_, RequestAction::Local(l)) if l.route_name.is_some() => l.route_name,
            (Routed::Matched { route, .. }, _) => Some(&route.name),
            _ => None,
        }
    }

    /// The cluster the request goes to (or would, when it is refused).
    pub fn cluster_name<'a>(&self, snap: &'a Snapshot) -> Option<&'a str> {
        self.destination
            .and_then(|d| snap.cluster_name(d.cluster))
            .map(|n| &**n)
    }
}

fn request_action<'s>(
    snap: &'s Snapshot,
    routed: &Routed<'s>,
    destination: Option<&'s WeightedCluster>,
    authz: &Decision,
) -> RequestAction<'s> {
    if !authz.is_allowed() {
        return RequestAction::Local(Local::denied(authz));
    }
    let (route, matched) = match routed {
        Routed::Matched { route, matched } => (*route, *matched),
        Routed::NoVirtualHost if snap.outbound == Some(OutboundMode::RegistryOnly) => {
            return RequestAction::Local(Local::blocked());
        }
        Routed::NoVirtualHost | Routed::NoRoute => {
            return RequestAction::Local(Local::no_route());
        }
    };
    match &route.action {
        Action::Redirect(redirect) => RequestAction::Redirect { route, redirect },
        Action::Direct { status, body } => RequestAction::Direct {
            status: *status,
            body,
        },
        Action::Forward(_) => match destination.and_then(|d| Some((d, snap.cluster(d.cluster)?))) {
            Some((destination, cluster)) => RequestAction::Forward {
                route,
                matched,
                destination,
                cluster,
            },
            None => RequestAction::Local(Local::no_cluster()),
        },
    }
}

/// CONNECT host:port from an explicit-proxy client: allowed for hosts the
/// mesh knows on that port (or any host with ALLOW_ANY); the tunnel is then
/// planned like captured traffic to that port.
fn connect<'s>(snap: &'s Snapshot, head: &RequestHead<'_>) -> RequestAction<'s> {
    let (host, port) = crate::route::split_host_port(head.view.authority);
    let port = head.uri_port.or(port).unwrap_or(443);
    let host = host.to_ascii_lowercase();
    if host.is_empty() {
        return RequestAction::Local(Local::new(
            StatusCode::BAD_REQUEST,
            "CONNECT needs host:port",
            ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR,
            "invalid_authority",
        ));
    }
    let known = snap
        .listener(port)
        .is_some_and(|l| l.tls_routes.find(&host).is_some() || l.routes.vhost(&host).is_some());
    if known || snap.outbound == Some(OutboundMode::AllowAny) {
        RequestAction::Connect { host, port }
    } else {
        RequestAction::Local(Local::blocked())
    }
}

// === TCP connections ===

/// Every decision for a TCP connection the proxy passes through (TLS by
/// SNI, or opaque bytes).
#[derive(Debug)]
pub struct TcpPlan<'s> {
    pub listener: Option<&'s ListenerState>,
    /// The `tls` route that matched the SNI, or the `tcp` route that
    /// matched the destination (`is_tcp_route`).
    pub route: Option<&'s TlsRoute>,
    /// The cluster the connection goes to (or would, when it is denied).
    pub cluster: Option<&'s std::sync::Arc<ClusterEntry>>,
    pub authz: Decision,
    pub action: TcpAction,
    pub reason: TcpReason,
}

/// What the proxy does with a TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpAction {
    /// To the cluster's endpoints.
    Forward,
    /// To where the application was connecting (PassthroughCluster).
    OriginalDst,
    /// Closed, reported with these flags.
    Close(ResponseFlags),
}

/// Why the plan is what it is, in words for logs and `explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TcpReason {
    #[error("a tls route matched the SNI")]
    SniRoute,
    #[error("a tcp route matched the destination")]
    TcpRoute,
    #[error("inbound to the workload, allowed by its policies")]
    Inbound,
    #[error("a TCP port of a registered service")]
    RegisteredPort,
    #[error("outbound traffic policy ALLOW_ANY")]
    AllowAny,
    #[error("outbound traffic policy REGISTRY_ONLY and no route (BlackHoleCluster)")]
    BlackHole,
    #[error("no route for this SNI")]
    NoRoute,
    #[error("no tcp route for this destination")]
    NoTcpRoute,
    #[error("the route's destination is not in the registry")]
    NoCluster,
    #[error("denied by authorization policy")]
    Denied,
    #[error("made to the capture port itself, and the sidecar is no explicit proxy")]
    ToCapturePort,
}

impl<'s> TcpPlan<'s> {
    /// Whether the route is one of the listener's `tcp` routes (matched by
    /// destination) rather than a `tls` route (matched by SNI).
    pub fn is_tcp_route(&self) -> bool {
        match (self.listener, self.route) {
            (Some(l), Some(r)) => l.tcp_routes.iter().any(|t| std::ptr::eq(t, r)),
            _ => false,
        }
    }

    fn original_dst(
        snap: &'s Snapshot,
        listener: Option<&'s ListenerState>,
        reason: TcpReason,
    ) -> Self {
        let cluster = snap.passthrough.and_then(|i| snap.cluster(i));
        TcpPlan {
            listener,
            route: None,
            cluster,
            authz: Decision::Allow { audited: false },
            action: TcpAction::OriginalDst,
            reason,
        }
    }

    fn closed(
        listener: Option<&'s ListenerState>,
        flags: ResponseFlags,
        reason: TcpReason,
    ) -> Self {
        TcpPlan {
            listener,
            route: None,
            cluster: None,
            authz: Decision::Allow { audited: false },
            action: TcpAction::Close(flags),
            reason,
        }
    }

    /// The cluster name to log (`BlackHoleCluster` for the black hole).
    pub fn cluster_name(&self) -> Option<&str> {
        match (self.cluster, self.reason) {
            (Some(c), _) => Some(c.cluster.name()),
            (None, TcpReason::BlackHole | TcpReason::ToCapturePort) => Some(BLACKHOLE_CLUSTER),
            (None, _) => None,
        }
    }
}

/// A sidecar connection the mesh has no route for: the outbound traffic
/// policy decides.
fn unmatched<'s>(snap: &'s Snapshot, listener: Option<&'s ListenerState>) -> TcpPlan<'s> {
    match snap.outbound {
        Some(OutboundMode::AllowAny) => TcpPlan::original_dst(snap, listener, TcpReason::AllowAny),
        _ => TcpPlan::closed(
            listener,
            ResponseFlags::NO_HEALTHY_UPSTREAM,
            TcpReason::BlackHole,
        ),
    }
}

/// TLS the proxy passes through, by its SNI: a `tls` route first; with none
/// a registered TCP port still goes to its destination, a sidecar applies
/// its outbound traffic policy, and a gateway closes the connection (NR).
fn tls<'s>(
    snap: &'s Snapshot,
    conn: &Conn,
    listener: Option<&'s ListenerState>,
    sni: Option<&str>,
    pick: f64,
) -> TcpPlan<'s> {
    let route = listener.and_then(|l| l.tls_routes.find(sni.unwrap_or_default()));
    let Some(route) = route else {
        return match snap.role {
            Role::Gateway => {
                TcpPlan::closed(listener, ResponseFlags::NO_ROUTE_FOUND, TcpReason::NoRoute)
            }
            Role::Sidecar => unmatched(snap, listener),
        };
    };
    to_route(snap, conn, listener, route, sni, pick, TcpReason::SniRoute)
}

/// Opaque TCP on a port with `tcp` routes, by destination address (where
/// the application was connecting; a gateway's own address). With no
/// route a sidecar sends it on to the original destination (a registered
/// port) and a gateway closes it (NR).
fn tcp<'s>(snap: &'s Snapshot, conn: &Conn, listener: &'s ListenerState, pick: f64) -> TcpPlan<'s> {
    let destination = conn.original_dst.unwrap_or(conn.local).ip();
    match TlsRoute::find_tcp(&listener.tcp_routes, destination) {
        Some(route) => to_route(
            snap,
            conn,
            Some(listener),
            route,
            conn.sni(),
            pick,
            TcpReason::TcpRoute,
        ),
        None if snap.role == Role::Sidecar => {
            TcpPlan::original_dst(snap, Some(listener), TcpReason::RegisteredPort)
        }
        None => TcpPlan::closed(
            Some(listener),
            ResponseFlags::NO_ROUTE_FOUND,
            TcpReason::NoTcpRoute,
        ),
    }
}

/// A matched `tls` or `tcp` route: on to its cluster if authorization
/// allows.
fn to_route<'s>(
    snap: &'s Snapshot,
    conn: &Conn,
    listener: Option<&'s ListenerState>,
    route: &'s TlsRoute,
    sni: Option<&str>,
    pick: f64,
    matched: TcpReason,
) -> TcpPlan<'s> {
    let cluster = pick_weighted(&route.destinations, pick).and_then(|d| snap.cluster(d.cluster));
    let authz = authorize(&snap.policies, &authz_request(conn, sni, None));
    let (action, reason) = match (cluster, authz.is_allowed()) {
        (None, _) => (
            TcpAction::Close(ResponseFlags::NO_CLUSTER_FOUND),
            TcpReason::NoCluster,
        ),
        (Some(_), false) => (TcpAction::Close(ResponseFlags::NONE), TcpReason::Denied),
        (Some(_), true) => (TcpAction::Forward, matched),
    };
    TcpPlan {
        listener,
        route: Some(route),
        cluster,
        authz,
        action,
        reason,
    }
}

/// What authorization sees of a connection (and request): the peer's
/// verified identity, addresses, SNI. Client-supplied headers never name
/// the caller.
/// Why the ALLOW policies admit no rule for this request or connection
/// (`explain`): the request as `plan` authorizes it, path normalized.
pub fn why_denied(snap: &Snapshot, conn: &Conn, head: Option<&RequestHead<'_>>) -> Vec<String> {
    // The workload's own policies on the way in, as `plan` asks them.
    let policies = if conn.inbound {
        &snap.inbound_policies
    } else {
        &snap.policies
    };
    let Some(head) = head else {
        return crate::authz::why_not_allowed(policies, &authz_request(conn, conn.sni(), None));
    };
    let path = normalize_path(head.view.path, snap.view.path_normalization)
        .unwrap_or(std::borrow::Cow::Borrowed(head.view.path));
    let http = HttpAttributes {
        host: head.view.authority,
        method: head.view.method,
        path: &path,
        headers: head.view.headers,
    };
    crate::authz::why_not_allowed(policies, &authz_request(conn, conn.sni(), Some(http)))
}

fn authz_request<'a>(
    conn: &'a Conn,
    sni: Option<&'a str>,
    http: Option<HttpAttributes<'a>>,
) -> AuthzRequest<'a> {
    AuthzRequest {
        peer: conn.peer(),
        source_ip: conn.remote.ip(),
        remote_ip: conn.remote.ip(),
        destination_ip: conn.local.ip(),
        destination_port: conn.port,
        sni,
        http,
    }
}

#[cfg(test)]
mod tests;
