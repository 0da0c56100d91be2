//! The proxy's config snapshot: everything the data path reads, compiled
//! once from the workload's `ProxyView` (and nothing else from the YAML)
//! and swapped atomically on reload. Nothing in here is built per request.

mod server_tls;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use meshgate_config::model::networking::{ClientTlsMode, OutboundMode, SimpleLb};
use meshgate_config::model::security::MtlsMode;
use meshgate_config::registry::{Protocol, ProxyKind};
use meshgate_config::view::{
    self, ClusterEndpoints, ClusterResolution, ClusterView, DownstreamTls, ProxyView, RouteAction,
    RouteView,
};
use meshgate_identity::WorkloadIdentity;

pub use self::server_tls::ListenerTls;
use crate::authz::CompiledPolicy;
use crate::labels::{DestinationLabels, WorkloadLabels, unknown};
use crate::route::{DomainIndex, HeaderOps, Route, RouteTable, VirtualHost, WeightedCluster};
use crate::upstream::dns::Resolver;
use crate::upstream::tls::{self as upstream_tls, DefaultRoots};
use crate::upstream::{
    Cluster, ClusterSettings, DnsName, Endpoints, HashOn, Keepalive, Outlier, RetryLimit,
};

/// Envoy's name for the cluster that forwards to the original destination.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// Envoy's name for the cluster that drops unmatched traffic.
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "cluster {cluster}: {origin} has resolution NONE, which gives a gateway no endpoints (as in Istio); use resolution DNS or STATIC"
    )]
    ResolutionNone { cluster: String, origin: String },
    #[error("cluster {cluster}: {reason}")]
    Tls { cluster: String, reason: String },
    #[error("{origin}: {reason}")]
    ListenerTls { origin: String, reason: String },
    #[error("workload {0} has no proxy: it is neither injected with a sidecar nor a gateway")]
    NoProxy(String),
}

/// Inputs that are not part of the YAML.
#[derive(Debug, Clone)]
pub struct BuildContext {
    pub resolver: Resolver,
    pub roots: DefaultRoots,
    pub identity: Option<Arc<WorkloadIdentity>>,
    /// Local endpoints for hosts (`host:port` → addresses), used instead of
    /// DNS (Kubernetes Services outside a cluster).
    pub endpoints: HashMap<String, Vec<SocketAddr>>,
}

/// Which proxy a snapshot is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Outbound capture and explicit proxy for one workload.
    Sidecar,
    /// Gateway servers, with authorization on the way in.
    Gateway,
}

/// A cluster with what the request path reports about it.
#[derive(Debug)]
pub struct ClusterEntry {
    pub cluster: Cluster,
    pub host: Arc<str>,
    pub labels: DestinationLabels,
    /// Everything the cluster was built from: a reload keeps the cluster
    /// (and its pooled connections and outlier state) when this is equal.
    fingerprint: u64,
}

/// A `tls` route: SNI names to destinations (passthrough).
#[derive(Debug, Clone)]
pub struct TlsRoute {
    /// A `tcp` route's destination subnets (empty: any destination).
    pub subnets: Vec<ipnet::IpNet>,
    pub destinations: Vec<WeightedCluster>,
    pub name: Arc<str>,
}

impl TlsRoute {
    /// The first `tcp` route whose subnets hold `destination`.
    pub fn find_tcp(routes: &[TlsRoute], destination: std::net::IpAddr) -> Option<&TlsRoute> {
        routes
            .iter()
            .find(|r| r.subnets.is_empty() || r.subnets.iter().any(|n| n.contains(&destination)))
    }
}

/// A listener's `tls` routes, found by SNI as Envoy picks a filter chain
/// by server name: the exact name, then the longest wildcard, then `*`;
/// among routes naming the same pattern, the first. In time independent
/// of how many there are.
#[derive(Debug, Clone, Default)]
pub struct TlsRoutes {
    routes: Vec<TlsRoute>,
    index: DomainIndex,
}

impl TlsRoutes {
    /// Each route with its lowercase SNI patterns (`a.com`, `*.a.com`),
    /// which only the index keeps.
    pub fn new(by_sni: Vec<(Vec<String>, TlsRoute)>) -> TlsRoutes {
        let mut routes = Vec::with_capacity(by_sni.len());
        let mut patterns = Vec::new();
        for (sni, route) in by_sni {
            patterns.extend(sni.into_iter().map(|p| (p, routes.len())));
            routes.push(route);
        }
        let index = DomainIndex::new(patterns);
        TlsRoutes { routes, index }
    }

    /// The route for a client's SNI.
    pub fn find(&self, sni: &str) -> Option<&TlsRoute> {
        let sni = if sni.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(sni.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(sni)
        };
        self.index.find(&sni).map(|i| &self.routes[i])
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// One port the proxy serves.
#[derive(Debug)]
pub struct ListenerState {
    /// The port routes match on (Gateway server port, or a sidecar's
    /// destination port).
    pub port: u16,
    /// The port bound (Service targetPort); a sidecar's are all 15001.
    pub bind_port: u16,
    pub protocol: Protocol,
    pub tls: ListenerTls,
    /// Plaintext refused (PeerAuthentication STRICT).
    pub strict_mtls: bool,
    pub routes: RouteTable,
    pub tls_routes: TlsRoutes,
    /// `tcp` routes, by destination address.
    pub tcp_routes: Vec<TlsRoute>,
    /// `Gateway ns/name server #i`, for logs and `explain`.
    pub origin: String,
}

impl ListenerState {
    /// A sidecar port whose requests are routed by Host.
    pub fn serves_http(&self) -> bool {
        !self.routes.vhosts.is_empty()
    }

    /// A sidecar port whose TLS is routed by SNI.
    pub fn serves_tls(&self) -> bool {
        !self.tls_routes.is_empty()
    }
}

/// Everything the request path needs, for one workload.
#[derive(Debug)]
pub struct Snapshot {
    /// What this snapshot was compiled from, without its clusters and
    /// routes: at thousands of hosts they are most of a proxy's memory, and
    /// once compiled only the inspection port reads them (`full_view`).
    pub view: ProxyView,
    /// The whole view as deflated JSON: a host's clusters and routes are
    /// ~1 KB of JSON, ~70 bytes deflated (most of it repeats from host to
    /// host), and only the inspection port reads it.
    view_deflated: Box<[u8]>,
    /// The certificate files the view names (DestinationRule, Gateway
    /// server and Sidecar ingress TLS): a reload watches them.
    pub certificate_files: Vec<String>,
    pub role: Role,
    pub source: Arc<WorkloadLabels>,
    pub listeners: Vec<ListenerState>,
    /// Indexed by the route tables; `None` for a destination missing from
    /// the registry (503 NC).
    pub clusters: Vec<Option<Arc<ClusterEntry>>>,
    pub cluster_names: Vec<Arc<str>>,
    /// Enforced on inbound only: empty for a sidecar's outbound path.
    pub policies: Vec<CompiledPolicy>,
    /// Sidecars: the workload's AuthorizationPolicies and PeerAuthentication
    /// mode, for connections on their way in (15006).
    pub inbound_policies: Vec<CompiledPolicy>,
    pub inbound_mtls: meshgate_config::model::security::MtlsMode,
    /// Ports with their own mode (`portLevelMtls`).
    pub inbound_mtls_ports: HashMap<u16, meshgate_config::model::security::MtlsMode>,
    /// Sidecar `ingress` listeners: where connections to a port go instead
    /// (no address: the workload's own).
    pub inbound_endpoints: HashMap<u16, InboundEndpoint>,
    /// Sidecar ingress ports that terminate TLS from outside the mesh
    /// with their own certificate (`ingress[].tls`).
    pub inbound_tls: HashMap<u16, Arc<rustls::ServerConfig>>,
    /// Sidecars: ports the workload serves as HTTP, each with its route to
    /// its `inbound|PORT||` cluster (the workload, from 127.0.0.6).
    pub inbound_http: HashMap<u16, Route>,
    /// Sidecars: what unmatched traffic gets (REGISTRY_ONLY or ALLOW_ANY).
    pub outbound: Option<OutboundMode>,
    /// Sidecars: index of the PassthroughCluster (original destination).
    pub passthrough: Option<usize>,
    /// Sidecars with ALLOW_ANY: the `allow_any` route to PassthroughCluster.
    pub allow_any: Option<Route>,
}

impl Snapshot {
    /// Compiles the snapshot of a proxy view.
    pub fn build(view: ProxyView, ctx: &BuildContext) -> Result<Snapshot, BuildError> {
        Self::rebuild(view, ctx, None)
    }

    /// Compiles a new snapshot, keeping the clusters of `previous` that did
    /// not change (a reload does not drop pooled connections).
    pub fn rebuild(
        view: ProxyView,
        ctx: &BuildContext,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, BuildError> {
        let role = match view.workload.proxy {
            ProxyKind::Gateway => Role::Gateway,
            ProxyKind::Sidecar => Role::Sidecar,
            ProxyKind::None => {
                let w = &view.workload;
                return Err(BuildError::NoProxy(format!("{}/{}", w.namespace, w.name)));
            }
        };
        let previous: HashMap<&str, Arc<ClusterEntry>> = previous
            .map(|p| {
                p.cluster_names
                    .iter()
                    .zip(&p.clusters)
                    .filter_map(|(n, c)| c.clone().map(|c| (&**n, c)))
                    .collect()
            })
            .unwrap_or_default();

        // What only the inspection port reads is taken first: then each
        // cluster's view is freed as it is compiled, and the compiled
        // clusters fill the memory the views leave instead of leaving holes
        // around them once the view is gone (freed heap goes back to the
        // system only in whole pages).
        let view_deflated = deflated_json(&view);
        let certificate_files = certificate_files(&view);
        let mut view = view;
        let mut clusters = Vec::with_capacity(view.clusters.len() + 1);
        let mut cluster_names: Vec<Arc<str>> = Vec::with_capacity(view.clusters.len() + 1);
        let mut shared = Shared::default();
        for c in std::mem::take(&mut view.clusters) {
            let cluster = build_cluster(&c, ctx, role, &previous, &mut shared)?;
            cluster_names.push(
                cluster
                    .as_ref()
                    .map_or_else(|| Arc::from(c.name.as_str()), |e| e.cluster.name().clone()),
            );
            clusters.push(cluster);
        }
        let listeners = {
            let index: HashMap<&str, usize> = cluster_names
                .iter()
                .enumerate()
                .map(|(i, n)| (&**n, i))
                .collect();
            listeners(&view, role, ctx, &index)?
        };
        view.routes = Vec::new();
        let passthrough = (role == Role::Sidecar).then(|| {
            let pt = previous
                .get(PASSTHROUGH_CLUSTER)
                .cloned()
                .unwrap_or_else(|| passthrough_cluster(ctx));
            clusters.push(Some(pt));
            cluster_names.push(Arc::from(PASSTHROUGH_CLUSTER));
            clusters.len() - 1
        });
        let inbound_endpoints = view
            .inbound_endpoints
            .iter()
            .filter_map(|(port, to)| {
                Some((u16::try_from(*port).ok()?, InboundEndpoint::parse(to)?))
            })
            .collect();
        let inbound_http = if role == Role::Sidecar {
            let built = (&mut clusters, &mut cluster_names);
            inbound_http(&view, &inbound_endpoints, ctx, &previous, built)
        } else {
            HashMap::new()
        };
        let policies = view
            .authorization_policies
            .iter()
            .filter(|_| role == Role::Gateway)
            .map(CompiledPolicy::compile)
            .collect();
        let inbound_policies = view
            .authorization_policies
            .iter()
            .filter(|_| role == Role::Sidecar)
            .map(CompiledPolicy::compile)
            .collect();
        let inbound_mtls = view.peer_authentication.mode;
        let inbound_tls = inbound_tls(&view, role, ctx)?;
        let inbound_mtls_ports = view
            .peer_authentication
            .ports
            .iter()
            .filter_map(|(p, m)| Some((u16::try_from(*p).ok()?, *m)))
            .collect();
        let outbound = (role == Role::Sidecar).then_some(view.outbound_traffic_policy.mode);
        let allow_any = match (outbound, passthrough) {
            (Some(OutboundMode::AllowAny), Some(i)) => Some(Route::allow_any(i)),
            _ => None,
        };
        Ok(Snapshot {
            role,
            source: Arc::new(crate::labels::workload_labels(&view.workload)),
            listeners,
            clusters,
            cluster_names,
            policies,
            inbound_policies,
            inbound_mtls,
            inbound_mtls_ports,
            inbound_endpoints,
            inbound_tls,
            inbound_http,
            outbound,
            passthrough,
            allow_any,
            view,
            view_deflated,
            certificate_files,
        })
    }

    /// Where a connection goes that was going to `to`: there, or, on its
    /// way in, its port's Sidecar ingress `defaultEndpoint`.
    pub fn inbound_target(&self, conn: &crate::conn::Conn, to: SocketAddr) -> InboundTarget<'_> {
        match self.inbound_endpoints.get(&to.port()) {
            Some(InboundEndpoint::Addr(ip, port)) if conn.inbound => {
                InboundTarget::Addr(SocketAddr::new(ip.unwrap_or(to.ip()), *port))
            }
            Some(InboundEndpoint::Unix(name)) if conn.inbound => InboundTarget::Unix(name),
            _ => InboundTarget::Addr(to),
        }
    }

    /// The whole view this snapshot was compiled from (`/config_dump`).
    pub fn full_view(&self) -> serde_json::Value {
        let json = flate2::read::DeflateDecoder::new(&self.view_deflated[..]);
        serde_json::from_reader(json).unwrap_or_default()
    }

    pub fn listener(&self, port: u16) -> Option<&ListenerState> {
        self.listeners.iter().find(|l| l.port == port)
    }

    /// The cluster at `index`, when the registry has it.
    pub fn cluster(&self, index: usize) -> Option<&Arc<ClusterEntry>> {
        self.clusters.get(index).and_then(Option::as_ref)
    }

    pub fn cluster_name(&self, index: usize) -> Option<&Arc<str>> {
        self.cluster_names.get(index)
    }
}

/// Every certificate, key and CA file the view's TLS settings name.
fn certificate_files(v: &ProxyView) -> Vec<String> {
    let clusters = v.clusters.iter().flat_map(|c| {
        let t = &c.tls;
        [&t.ca_certificates, &t.client_certificate, &t.private_key]
    });
    let servers = v
        .listeners
        .iter()
        .filter_map(|l| match &l.tls {
            DownstreamTls::Server(t) => Some(&**t),
            _ => None,
        })
        .chain(v.inbound_tls.values())
        .flat_map(|t| [&t.server_certificate, &t.private_key, &t.ca_certificates]);
    let mut files: Vec<String> = clusters
        .chain(servers)
        .filter(|p| !p.is_empty())
        .cloned()
        .collect();
    files.sort();
    files.dedup();
    files
}

/// Where a Sidecar ingress port's connections go instead of where they
/// were going (`defaultEndpoint`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum InboundEndpoint {
    /// An address (none: the workload's own, for `0.0.0.0:PORT`), a port.
    Addr(Option<IpAddr>, u16),
    /// A unix socket by name (`/path`, `@abstract`).
    Unix(Arc<str>),
}

/// Where one connection goes (`Snapshot::inbound_target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundTarget<'a> {
    Addr(SocketAddr),
    /// A unix socket by name.
    Unix(&'a str),
}

impl InboundEndpoint {
    fn parse(to: &str) -> Option<InboundEndpoint> {
        if let Some(name) = crate::unix::socket_name(to) {
            return Some(InboundEndpoint::Unix(Arc::from(name)));
        }
        let to: SocketAddr = to.parse().ok()?;
        let ip = (!to.ip().is_unspecified()).then_some(to.ip());
        Some(InboundEndpoint::Addr(ip, to.port()))
    }
}

/// The server TLS of each Sidecar ingress port that has its own.
fn inbound_tls(
    view: &ProxyView,
    role: Role,
    ctx: &BuildContext,
) -> Result<HashMap<u16, Arc<rustls::ServerConfig>>, BuildError> {
    let mut out = HashMap::new();
    for (port, tls) in &view.inbound_tls {
        let origin = format!("Sidecar ingress port {port}");
        let server = DownstreamTls::Server(Box::new(tls.clone()));
        match ListenerTls::build(&server, role, ctx) {
            Ok(ListenerTls::Terminate(config)) => {
                out.insert(u16::try_from(*port).unwrap_or(0), config);
            }
            Ok(_) => {}
            Err(reason) => return Err(BuildError::ListenerTls { origin, reason }),
        }
    }
    Ok(out)
}

/// One listener per port of the view (a sidecar's capture port itself is
/// not one: every connection to it is routed by its original port).
fn listeners(
    v: &ProxyView,
    role: Role,
    ctx: &BuildContext,
    index: &HashMap<&str, usize>,
) -> Result<Vec<ListenerState>, BuildError> {
    let mut out: Vec<ListenerState> = Vec::new();
    for l in v
        .listeners
        .iter()
        .filter(|l| l.port != view::OUTBOUND_CAPTURE_PORT)
    {
        let port = u16::try_from(l.port).unwrap_or(0);
        if let Some(existing) = out.iter_mut().find(|x| x.port == port) {
            existing.origin.push_str(&format!(", {}", l.origin));
            continue;
        }
        let tls =
            ListenerTls::build(&l.tls, role, ctx).map_err(|reason| BuildError::ListenerTls {
                origin: l.origin.clone(),
                reason,
            })?;
        out.push(ListenerState {
            port,
            bind_port: u16::try_from(l.bind_port).unwrap_or(port),
            protocol: l.protocol,
            tls,
            strict_mtls: l
                .peer_authentication
                .as_ref()
                .is_some_and(|pa| pa.mode == MtlsMode::Strict),
            routes: route_table(v, port, index),
            tls_routes: TlsRoutes::new(tls_route_table(v, port, index)),
            tcp_routes: tcp_route_table(v, port, index),
            origin: l.origin.clone(),
        });
    }
    Ok(out)
}

/// A route's destinations as cluster indices, with their header changes.
fn weighted(r: &RouteView, index: &HashMap<&str, usize>) -> Vec<WeightedCluster> {
    let RouteAction::Route(dests) = &r.action else {
        return Vec::new();
    };
    // Sized to fit: `collect` on a filter keeps room for four (a route per
    // host at a gateway of thousands).
    let mut out = Vec::with_capacity(dests.len());
    out.extend(dests.iter().filter_map(|d| {
        let cluster = *index.get(d.cluster_name().as_str())?;
        let headers = d.headers.as_ref();
        Some(WeightedCluster {
            cluster,
            weight: d.weight,
            request_headers: HeaderOps::compile(headers.and_then(|h| h.request.as_ref())),
            response_headers: HeaderOps::compile(headers.and_then(|h| h.response.as_ref())),
        })
    }));
    out
}

/// The HTTP route table of one listener port.
fn route_table(v: &ProxyView, port: u16, index: &HashMap<&str, usize>) -> RouteTable {
    let mut vhosts: Vec<VirtualHost> = Vec::new();
    let mut by_host: HashMap<String, usize> = HashMap::new();
    // Rule names (`#0`, `default`) repeat from host to host: one each.
    let mut names: std::collections::HashSet<Arc<str>> = std::collections::HashSet::new();
    for r in v
        .routes
        .iter()
        .filter(|r| r.listener_port == u32::from(port) && r.sni_hosts.is_empty() && !r.is_tcp())
    {
        let mut route = Route::compile(r, weighted(r, index));
        match names.get(&route.name) {
            Some(name) => route.name = name.clone(),
            None => {
                names.insert(route.name.clone());
            }
        }
        route.mirrors = r
            .mirrors
            .iter()
            .filter_map(|m| {
                Some((
                    *index.get(m.destination.cluster_name().as_str())?,
                    m.percent,
                ))
            })
            .collect();
        let host = r.host.to_ascii_lowercase();
        match by_host.get(&host) {
            Some(&i) => vhosts[i].routes.push(route),
            None => {
                by_host.insert(host.clone(), vhosts.len());
                vhosts.push(VirtualHost {
                    domains: vec![host],
                    routes: vec![route],
                });
            }
        }
    }
    RouteTable::new(vhosts)
}

/// The SNI routes of one listener port, each with its SNI patterns.
fn tls_route_table(
    v: &ProxyView,
    port: u16,
    index: &HashMap<&str, usize>,
) -> Vec<(Vec<String>, TlsRoute)> {
    v.routes
        .iter()
        .filter(|r| r.listener_port == u32::from(port) && !r.sni_hosts.is_empty())
        .map(|r| {
            let sni = r.sni_hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
            let route = TlsRoute {
                subnets: Vec::new(),
                destinations: weighted(r, index),
                name: Arc::from(r.rule.as_str()),
            };
            (sni, route)
        })
        .collect()
}

/// A listener's `tcp` routes; an address without a prefix is one host.
fn tcp_route_table(v: &ProxyView, port: u16, index: &HashMap<&str, usize>) -> Vec<TlsRoute> {
    v.routes
        .iter()
        .filter(|r| r.listener_port == u32::from(port))
        .filter_map(|r| {
            // Validation refused bad subnets; were one here, the route
            // would match nothing rather than everything.
            let subnets = r
                .tcp_subnets
                .as_ref()?
                .iter()
                .map(|n| {
                    n.parse::<ipnet::IpNet>()
                        .ok()
                        .or_else(|| n.parse::<std::net::IpAddr>().ok().map(Into::into))
                })
                .collect::<Option<Vec<_>>>()?;
            Some(TlsRoute {
                subnets,
                destinations: weighted(r, index),
                name: Arc::from(r.rule.as_str()),
            })
        })
        .collect()
}

/// A route and an `inbound|PORT||` cluster for each port the workload
/// serves as HTTP; the cluster's labels name the Service the port serves
/// (Istio's destination reporter).
fn inbound_http(
    view: &ProxyView,
    inbound_endpoints: &HashMap<u16, InboundEndpoint>,
    ctx: &BuildContext,
    previous: &HashMap<&str, Arc<ClusterEntry>>,
    (clusters, names): (&mut Vec<Option<Arc<ClusterEntry>>>, &mut Vec<Arc<str>>),
) -> HashMap<u16, Route> {
    let source = Arc::new(crate::labels::workload_labels(&view.workload));
    let mut routes = HashMap::new();
    for (port, p) in &view.inbound_ports {
        let Ok(port) = u16::try_from(*port) else {
            continue;
        };
        // HTTPS the sidecar terminates (`ingress[].tls`) is HTTP inside.
        let terminated =
            p.protocol == Protocol::Https && view.inbound_tls.contains_key(&u32::from(port));
        if !p.protocol.is_http() && !terminated {
            continue;
        }
        let name = format!("inbound|{port}||");
        let endpoint = inbound_endpoints.get(&port);
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (endpoint, &p.service, &view.workload).hash(&mut h);
            h.finish()
        };
        let kept = previous
            .get(name.as_str())
            .filter(|c| c.fingerprint == fingerprint);
        let entry = kept.cloned().unwrap_or_else(|| {
            let endpoints = match endpoint {
                Some(InboundEndpoint::Unix(socket)) => Endpoints::Unix(socket.clone()),
                _ => Endpoints::Inbound,
            };
            let name: Arc<str> = Arc::from(name.as_str());
            Arc::new(ClusterEntry {
                cluster: Cluster::new(
                    ClusterSettings {
                        endpoints,
                        ..local_settings(name)
                    },
                    ctx.resolver.clone(),
                ),
                host: p.service.as_deref().map_or_else(unknown, Arc::from),
                labels: DestinationLabels::inbound(&source, p.service.as_deref()),
                fingerprint,
            })
        });
        clusters.push(Some(entry));
        names.push(Arc::from(name.as_str()));
        routes.insert(port, Route::inbound(clusters.len() - 1));
    }
    routes
}

/// Envoy's retry circuit breaker as Istio sets it: a `retryBudget`
/// (20 % of the requests in flight, at least 3, unless it says), else
/// `maxRetries` where above 0 (Istio's default has no limit).
fn retry_limit(
    budget: Option<&meshgate_config::model::networking::RetryBudget>,
    http: Option<&meshgate_config::model::networking::HttpSettings>,
) -> Option<RetryLimit> {
    if let Some(b) = budget {
        return Some(RetryLimit::Budget {
            percent: b.percent.map_or(20.0, |p| p.value),
            min: b.min_retry_concurrency.filter(|n| *n > 0).unwrap_or(3) as usize,
        });
    }
    http.and_then(|h| h.max_retries)
        .filter(|n| *n > 0)
        .map(|n| RetryLimit::Max(n as usize))
}

/// A cluster of the proxy's own making (no DestinationRule applies).
fn local_settings(name: Arc<str>) -> ClusterSettings {
    ClusterSettings {
        name,
        endpoints: Endpoints::FromUri,
        tls: None,
        h2: false,
        h1_upgrades: None,
        connect_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(3600),
        max_requests_per_connection: None,
        max_connection_duration: None,
        keepalive: None,
        retry_limit: None,
        tunnel: None,
        max_in_flight: usize::MAX,
        lb: SimpleLb::RoundRobin,
        hash: None,
        outlier: None,
        priorities: Default::default(),
    }
}

fn passthrough_cluster(ctx: &BuildContext) -> Arc<ClusterEntry> {
    let name: Arc<str> = Arc::from(PASSTHROUGH_CLUSTER);
    Arc::new(ClusterEntry {
        cluster: Cluster::new(local_settings(name.clone()), ctx.resolver.clone()),
        host: name.clone(),
        labels: DestinationLabels::named(name),
        fingerprint: 0,
    })
}

/// The cluster's endpoints: the `--endpoints` map first, then the view's.
fn endpoints(c: &ClusterView, ctx: &BuildContext, shared: &mut Shared) -> Endpoints {
    if let Some(addrs) = ctx.endpoints.get(&format!("{}:{}", c.host, c.port)) {
        return Endpoints::Static(addrs.clone());
    }
    match &c.endpoints {
        ClusterEndpoints::Dns { names, first_only } => Endpoints::Dns {
            names: names
                .iter()
                .map(|n| DnsName::new(shared.string(&n.host), n.port))
                .collect(),
            first_only: *first_only,
        },
        ClusterEndpoints::Static(addrs) => Endpoints::Static(
            addrs
                .iter()
                .filter_map(|a| {
                    let ip: IpAddr = a.host.parse().ok()?;
                    Some(SocketAddr::new(ip, a.port))
                })
                .collect(),
        ),
        ClusterEndpoints::RequestHost { port } => Endpoints::RequestHost { port: *port },
        ClusterEndpoints::None => Endpoints::Static(Vec::new()),
    }
}

/// What the clusters of one build share: TLS client configs, and strings
/// (a host's name is in both its clusters, their labels and endpoints).
#[derive(Default)]
struct Shared {
    tls_configs: upstream_tls::ClientConfigs,
    strings: std::collections::HashSet<Arc<str>, foldhash::fast::RandomState>,
}

impl Shared {
    fn string(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(s) {
            return shared.clone();
        }
        let new: Arc<str> = Arc::from(s);
        self.strings.insert(new.clone());
        new
    }
}

fn build_cluster(
    c: &ClusterView,
    ctx: &BuildContext,
    role: Role,
    previous: &HashMap<&str, Arc<ClusterEntry>>,
    shared: &mut Shared,
) -> Result<Option<Arc<ClusterEntry>>, BuildError> {
    if !c.in_registry {
        return Ok(None);
    }
    if role == Role::Gateway && c.resolution == ClusterResolution::OriginalDst {
        return Err(BuildError::ResolutionNone {
            cluster: c.name.clone(),
            origin: c.origin.clone(),
        });
    }
    let settings = cluster_settings(c, ctx, shared)?;
    let labels = DestinationLabels::of(c, &mut |s| shared.string(s));
    let fingerprint = cluster_fingerprint(c, &settings.endpoints, &ctx.roots);
    if let Some(prev) = previous.get(c.name.as_str())
        && prev.fingerprint == fingerprint
    {
        return Ok(Some(prev.clone()));
    }
    Ok(Some(Arc::new(ClusterEntry {
        cluster: Cluster::new(settings, ctx.resolver.clone()),
        host: labels.service.clone(),
        labels,
        fingerprint,
    })))
}

/// `view` as JSON, deflated as it is written (fast level: the 10 MB of a
/// 10,000-host gateway take ~15 ms and keep ~0.7 MB).
fn deflated_json(view: &ProxyView) -> Box<[u8]> {
    use std::io::Write as _;
    let out = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    // serde_json writes a few bytes at a time: deflate 64 KiB at once.
    let mut out = std::io::BufWriter::with_capacity(1 << 16, out);
    // Writing into memory fails only when memory does (which aborts).
    let _ = serde_json::to_writer(&mut out, view);
    let _ = out.flush();
    let deflated = out.into_inner().ok().and_then(|o| o.finish().ok());
    deflated.unwrap_or_default().into_boxed_slice()
}

/// What a reload compares to keep a cluster (and its pool): its view, the
/// endpoints it was built with (an `--endpoints` map may set them) and its
/// TLS inputs. A derived hash, not the Debug text: 10,000 clusters' ~1 KiB
/// of text each took ~30 ms to write.
fn cluster_fingerprint(c: &ClusterView, endpoints: &Endpoints, roots: &DefaultRoots) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    // Fixed: fingerprints are compared across builds in one process.
    let mut h = foldhash::quality::FixedState::with_seed(0x6d65_7368).build_hasher();
    c.hash(&mut h);
    std::mem::discriminant(endpoints).hash(&mut h);
    match endpoints {
        Endpoints::Dns { names, first_only } => {
            first_only.hash(&mut h);
            for n in names {
                (&n.name, n.port).hash(&mut h);
            }
        }
        Endpoints::Static(addrs) => addrs.hash(&mut h),
        Endpoints::RequestHost { port } => port.hash(&mut h),
        Endpoints::Unix(name) => name.hash(&mut h),
        Endpoints::FromUri | Endpoints::Inbound => {}
    }
    tls_inputs_stamp(&c.tls, roots, &mut h);
    h.finish()
}

/// What a cluster's TLS was built from beyond its settings: the contents
/// of its certificate files and the default roots it trusts. A reload that
/// finds a rotated file (same path) rebuilds the cluster.
fn tls_inputs_stamp(
    tls: &meshgate_config::view::ClusterTls,
    roots: &DefaultRoots,
    h: &mut impl std::hash::Hasher,
) {
    use std::hash::Hash;
    for path in [
        &tls.ca_certificates,
        &tls.client_certificate,
        &tls.private_key,
    ] {
        if !path.is_empty() {
            std::fs::read(path).ok().hash(h);
        }
    }
    let system_roots = matches!(tls.mode, ClientTlsMode::Simple | ClientTlsMode::Mutual)
        && tls.ca_certificates.is_empty()
        && !tls.insecure_skip_verify;
    if system_roots {
        roots.digest().hash(h);
    }
}

/// A cluster's settings from its DestinationRule's effective policy, with
/// Envoy's and Istio's defaults for what it leaves out.
fn cluster_settings(
    c: &ClusterView,
    ctx: &BuildContext,
    shared: &mut Shared,
) -> Result<ClusterSettings, BuildError> {
    let policy = &c.policy;
    let http = upstream_http(c.protocol, policy, c.tls.mode);
    let h2 = http != UpstreamHttp::Http1;
    let tls_error = |reason: String| BuildError::Tls {
        cluster: c.name.clone(),
        reason,
    };
    let client_cert = (c.tls.mode == ClientTlsMode::Mutual && !c.tls.client_certificate.is_empty())
        .then_some((
            c.tls.client_certificate.as_str(),
            c.tls.private_key.as_str(),
        ));
    let tls = upstream_tls::build(
        &c.tls,
        client_cert,
        h2,
        (&ctx.roots, ctx.identity.as_ref(), &mut shared.tls_configs),
        &c.host,
    )
    .map_err(|e| tls_error(e.to_string()))?;
    // The same verification and identity, offering HTTP/1.1.
    let h1_upgrades = match http {
        UpstreamHttp::Http2Peers => upstream_tls::build(
            &c.tls,
            client_cert,
            false,
            (&ctx.roots, ctx.identity.as_ref(), &mut shared.tls_configs),
            &c.host,
        )
        .map_err(|e| tls_error(e.to_string()))?
        .map(|t| t.config),
        _ => None,
    };
    let pool = policy.connection_pool.as_ref();
    let tcp = pool.and_then(|p| p.tcp.as_ref());
    let http = pool.and_then(|p| p.http.as_ref());
    let max_conn = tcp.and_then(|t| t.max_connections).unwrap_or(u32::MAX) as usize;
    let max_in_flight = if h2 {
        http.and_then(|h| h.http2_max_requests).unwrap_or(u32::MAX) as usize
    } else {
        max_conn.saturating_add(
            http.and_then(|h| h.http1_max_pending_requests)
                .unwrap_or(u32::MAX) as usize,
        )
    };
    Ok(ClusterSettings {
        name: Arc::from(c.name.as_str()),
        endpoints: endpoints(c, ctx, shared),
        tls,
        h2,
        h1_upgrades,
        connect_timeout: tcp
            .and_then(|t| t.connect_timeout)
            .map_or(Duration::from_secs(10), |d| d.as_std()),
        idle_timeout: http
            .and_then(|h| h.idle_timeout)
            .or(tcp.and_then(|t| t.idle_timeout))
            .map_or(Duration::from_secs(3600), |d| d.as_std()),
        max_requests_per_connection: http
            .and_then(|h| h.max_requests_per_connection)
            .filter(|n| *n > 0),
        max_connection_duration: tcp
            .and_then(|t| t.max_connection_duration)
            .map(|d| d.as_std()),
        keepalive: tcp
            .and_then(|t| t.tcp_keepalive.as_ref())
            .map(|k| Keepalive {
                time: k.time.map(|d| d.as_std()),
                interval: k.interval.map(|d| d.as_std()),
                probes: k.probes,
            }),
        retry_limit: retry_limit(policy.retry_budget.as_ref(), http),
        tunnel: policy
            .tunnel
            .as_ref()
            .map(|t| Arc::from(format!("{}:{}", t.target_host, t.target_port))),
        max_in_flight,
        lb: policy
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.simple)
            .unwrap_or(SimpleLb::LeastRequest),
        hash: policy
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.consistent_hash.as_ref())
            .and_then(hash_on),
        outlier: policy.outlier_detection.as_ref().map(Outlier::compile),
        priorities: priorities(c, ctx),
    })
}

/// The view's locality priorities, unless local endpoints replace the
/// cluster's.
fn priorities(c: &ClusterView, ctx: &BuildContext) -> crate::upstream::Priorities {
    let mut out = crate::upstream::Priorities::default();
    if ctx
        .endpoints
        .contains_key(&format!("{}:{}", c.host, c.port))
    {
        return out;
    }
    let addr =
        |a: &meshgate_config::view::HostPort| Some(SocketAddr::new(a.host.parse().ok()?, a.port));
    match &c.endpoints {
        ClusterEndpoints::Static(addrs) => {
            if addrs.iter().any(|a| a.priority > 0) {
                out.by_addr = addrs
                    .iter()
                    .filter_map(|a| Some((addr(a)?, a.priority)))
                    .collect();
            }
            out.weight_by_addr = addrs
                .iter()
                .filter_map(|a| Some((addr(a)?, a.weight?)))
                .collect();
        }
        ClusterEndpoints::Dns { names, .. } => {
            if names.iter().any(|n| n.priority > 0) {
                out.by_name = names.iter().map(|n| (n.host.clone(), n.priority)).collect();
            }
            out.weight_by_name = names
                .iter()
                .filter_map(|n| Some((n.host.clone(), n.weight?)))
                .collect();
        }
        _ => {}
    }
    out
}

/// What a `consistentHash` policy hashes on.
fn hash_on(c: &meshgate_config::model::networking::ConsistentHashLb) -> Option<HashOn> {
    if let Some(h) = &c.http_header_name {
        return http::header::HeaderName::from_bytes(h.as_bytes())
            .ok()
            .map(HashOn::Header);
    }
    if let Some(cookie) = &c.http_cookie {
        return Some(HashOn::Cookie {
            name: cookie.name.clone(),
            ttl: cookie.ttl.map(|t| t.as_std()).filter(|t| !t.is_zero()),
            path: cookie.path.clone(),
        });
    }
    if c.use_source_ip == Some(true) {
        return Some(HashOn::SourceIp);
    }
    c.http_query_parameter_name
        .clone()
        .map(HashOn::QueryParameter)
}

/// How a cluster speaks HTTP upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpstreamHttp {
    Http1,
    Http2,
    /// HTTP/2 to a meshgate peer, by default; its HTTP/1.1 upgrades
    /// (WebSocket) go on HTTP/1.1.
    Http2Peers,
}

/// HTTP2/GRPC ports speak HTTP/2; HTTP ports as `h2UpgradePolicy` says.
/// Unset, Istio keeps HTTP/1.1 (DO_NOT_UPGRADE), also between mesh peers;
/// meshgate peers (mesh mutual TLS) multiplex, which halves the writes
/// per request on the mesh hop and keeps the application's HTTP semantics
/// (the README says so). Elsewhere Istio's default holds.
fn upstream_http(
    protocol: Protocol,
    policy: &view::EffectivePolicy,
    tls: ClientTlsMode,
) -> UpstreamHttp {
    use meshgate_config::model::networking::H2UpgradePolicy;
    let declared = policy
        .connection_pool
        .as_ref()
        .and_then(|p| p.http.as_ref())
        .and_then(|h| h.h2_upgrade_policy)
        .filter(|p| *p != H2UpgradePolicy::Default);
    match (protocol, declared) {
        (Protocol::Http2 | Protocol::Grpc, _) => UpstreamHttp::Http2,
        (Protocol::Http, Some(H2UpgradePolicy::Upgrade)) => UpstreamHttp::Http2,
        (Protocol::Http, None) if tls == ClientTlsMode::IstioMutual => UpstreamHttp::Http2Peers,
        _ => UpstreamHttp::Http1,
    }
}

#[cfg(test)]
mod tests;
