//! The request path's decisions as one pure function of the snapshot and
//! the request: which listener, which route, which cluster, what
//! authorization says, and so what happens. The data path (`proxy.rs`) acts
//! on it; `meshgate explain` prints it.

use meshgate_config::model::networking::OutboundMode;
use meshgate_config::registry::Protocol;

use crate::authz::{AuthzRequest, Decision, HttpAttributes, authorize};
use crate::proxy::ConnInfo;
use crate::route::{Action, RequestView, Routed, WeightedCluster, pick_weighted};
use crate::state::{ListenerState, Snapshot, TlsRoute};

/// What the proxy does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 403 `RBAC: access denied`.
    Deny,
    /// The matched route's action: forward, redirect or a direct response.
    Route,
    /// 502: REGISTRY_ONLY and the host is not in the registry (`block_all`).
    Blocked,
    /// 404 `NR`: no route for this host or request.
    NoRoute,
}

/// Every decision for one request.
#[derive(Debug)]
pub struct Decided<'s> {
    /// The port routes were looked up on (Gateway server port, or the
    /// destination port for a sidecar).
    pub listener_port: u16,
    pub listener: Option<&'s ListenerState>,
    pub routed: Routed<'s>,
    /// The destination picked (index into the snapshot's clusters).
    pub cluster: Option<(usize, &'s WeightedCluster)>,
    pub authz: Decision,
    pub verdict: Verdict,
}

/// Decides a request. `pick` in [0, 1) chooses among weighted destinations.
pub fn decide<'s>(
    snap: &'s Snapshot,
    conn: &ConnInfo,
    uri_port: Option<u16>,
    req: &RequestView<'_>,
    pick: f64,
) -> Decided<'s> {
    // An explicit-proxy request names its port in the URI.
    let listener_port = if conn.explicit {
        uri_port.unwrap_or(80)
    } else {
        conn.listener_port
    };
    let listener = snap.listener(listener_port);
    // Route first: the chosen cluster names the destination in every
    // report, denied requests included (as Envoy's stats do).
    let routed = match (
        listener.map_or(Routed::NoVirtualHost, |l| l.routes.route(req)),
        &snap.allow_any,
    ) {
        // ALLOW_ANY: unknown hosts go to the original destination.
        (Routed::NoVirtualHost, Some(route)) => Routed::Matched {
            route,
            matched: None,
        },
        (r, _) => r,
    };
    let cluster = match &routed {
        Routed::Matched { route, .. } => match &route.action {
            Action::Forward(d) => pick_weighted(d, pick).map(|w| (w.cluster, w)),
            _ => None,
        },
        _ => None,
    };
    let authz = authorize(
        &snap.policies,
        &AuthzRequest {
            principal: conn.peer.as_deref(),
            source_ip: conn.remote.ip(),
            remote_ip: conn.remote.ip(),
            destination_ip: conn.local.ip(),
            destination_port: conn.listener_port,
            sni: conn.sni.as_deref(),
            http: Some(HttpAttributes {
                host: req.authority,
                method: req.method,
                path: req.path,
                headers: req.headers,
            }),
        },
    );
    let verdict = match (&authz, &routed) {
        (Decision::Deny { .. }, _) => Verdict::Deny,
        (_, Routed::Matched { .. }) => Verdict::Route,
        (_, Routed::NoVirtualHost) if snap.outbound == Some(OutboundMode::RegistryOnly) => {
            Verdict::Blocked
        }
        _ => Verdict::NoRoute,
    };
    Decided {
        listener_port,
        listener,
        routed,
        cluster,
        authz,
        verdict,
    }
}

/// What happens to a TLS connection the proxy does not terminate: it reads
/// only the SNI and passes the bytes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVerdict {
    /// A `tls` route matched the SNI: to its destination.
    Route,
    /// To where the application was connecting: ALLOW_ANY
    /// (PassthroughCluster), or a TCP port of a registered service.
    OriginalDestination,
    /// REGISTRY_ONLY and no route: closed (BlackHoleCluster).
    Blocked,
    /// A gateway with no route for this SNI: closed (NR).
    NoRoute,
}

#[derive(Debug)]
pub struct TlsDecided<'s> {
    pub listener: Option<&'s ListenerState>,
    pub route: Option<&'s TlsRoute>,
    pub cluster: Option<(usize, &'s WeightedCluster)>,
    pub verdict: TlsVerdict,
}

/// Decides a passed-through TLS connection by its SNI. `pick` in [0, 1)
/// chooses among weighted destinations.
pub fn decide_tls<'s>(
    snap: &'s Snapshot,
    listener_port: u16,
    sni: &str,
    pick: f64,
) -> TlsDecided<'s> {
    let listener = snap.listener(listener_port);
    let route = listener.and_then(|l| TlsRoute::find(&l.tls_routes, sni));
    let cluster = route
        .and_then(|r| pick_weighted(&r.destinations, pick))
        .map(|w| (w.cluster, w));
    let registered_tcp = listener.is_some_and(|l| l.protocol == Protocol::Tcp);
    let verdict = match (cluster, snap.outbound) {
        (Some(_), _) => TlsVerdict::Route,
        (None, Some(_)) if registered_tcp => TlsVerdict::OriginalDestination,
        (None, Some(OutboundMode::AllowAny)) => TlsVerdict::OriginalDestination,
        (None, Some(OutboundMode::RegistryOnly)) => TlsVerdict::Blocked,
        (None, None) => TlsVerdict::NoRoute,
    };
    TlsDecided {
        listener,
        route,
        cluster,
        verdict,
    }
}
