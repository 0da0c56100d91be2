//! The proxy's config snapshot: everything the request path reads, compiled
//! once from (config, workload) and swapped atomically on reload. Nothing in
//! here is built per request.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshgate_config::model::Config;
use meshgate_config::model::networking::{ClientTlsMode, OutboundMode, Resolution, SimpleLb};
use meshgate_config::model::security::MtlsMode;
use meshgate_config::registry::{Protocol, Registry, Service, ServiceSource, Workload};
use meshgate_config::view::{self, ClusterView, ProxyView, RouteAction};
use meshgate_config::{MeshSettings, registry};
use meshgate_identity::WorkloadIdentity;
use meshgate_telemetry::metrics::Lv;

use crate::authz::CompiledPolicy;
use crate::route::{HeaderOps, Route, RouteTable, VirtualHost, WeightedCluster};
use crate::upstream::dns::Resolver;
use crate::upstream::tls::{self as upstream_tls, DefaultRoots};
use crate::upstream::{Cluster, ClusterSettings, Endpoints, Outlier};

/// Istio's default cluster name for metrics (`CLUSTER_ID`).
pub const CLUSTER_ID: &str = "Kubernetes";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Workload(#[from] view::ViewError),
    #[error(
        "cluster {cluster}: ServiceEntry {service_entry} has resolution NONE, which gives a gateway no endpoints (as in Istio); use resolution DNS or STATIC"
    )]
    ResolutionNone {
        cluster: String,
        service_entry: String,
    },
    #[error("cluster {cluster}: {reason}")]
    Tls { cluster: String, reason: String },
    #[error("workload {0} has no proxy: it is neither injected with a sidecar nor a gateway")]
    NoProxy(String),
}

/// Inputs that are not part of the YAML.
#[derive(Debug, Clone)]
pub struct BuildContext {
    pub mesh: MeshSettings,
    pub resolver: Resolver,
    pub roots: DefaultRoots,
    pub identity: Option<Arc<WorkloadIdentity>>,
    /// Local endpoints for hosts (`host:port` → addresses), used instead of
    /// DNS (Kubernetes Services outside a cluster).
    pub endpoints: HashMap<String, Vec<SocketAddr>>,
}

/// Istio's `source_*` / `destination_*` values for one workload.
#[derive(Debug, Clone)]
pub struct WorkloadLabels {
    pub workload: Lv,
    pub namespace: Lv,
    pub principal: Lv,
    pub app: Lv,
    pub version: Lv,
    pub canonical_service: Lv,
    pub canonical_revision: Lv,
    pub cluster: Lv,
}

pub fn unknown() -> Lv {
    Arc::from("unknown")
}

impl WorkloadLabels {
    pub fn unknown() -> Self {
        WorkloadLabels {
            workload: unknown(),
            namespace: unknown(),
            principal: unknown(),
            app: unknown(),
            version: unknown(),
            canonical_service: unknown(),
            canonical_revision: Arc::from("latest"),
            cluster: unknown(),
        }
    }

    /// Istio's canonical service/revision rules over the pod labels.
    pub fn of(w: &Workload) -> Self {
        let l = &w.labels;
        let get = |keys: &[&str]| keys.iter().find_map(|k| l.get(*k)).cloned();
        WorkloadLabels {
            workload: Arc::from(w.name.as_str()),
            namespace: Arc::from(w.namespace.as_str()),
            principal: Arc::from(w.spiffe_id.as_str()),
            app: Arc::from(get(&["app"]).unwrap_or_else(|| "unknown".into())),
            version: Arc::from(get(&["version"]).unwrap_or_else(|| "unknown".into())),
            canonical_service: Arc::from(
                get(&[
                    "service.istio.io/canonical-name",
                    "app.kubernetes.io/name",
                    "app",
                ])
                .unwrap_or_else(|| w.name.clone()),
            ),
            canonical_revision: Arc::from(
                get(&[
                    "service.istio.io/canonical-revision",
                    "app.kubernetes.io/version",
                    "version",
                ])
                .unwrap_or_else(|| "latest".into()),
            ),
            cluster: Arc::from(CLUSTER_ID),
        }
    }
}

/// Destination labels of one cluster.
#[derive(Debug, Clone)]
pub struct DestinationLabels {
    pub workload: WorkloadLabels,
    pub service: Lv,
    pub service_name: Lv,
    pub service_namespace: Lv,
}

/// A cluster with what the request path reports about it.
#[derive(Debug)]
pub struct ClusterEntry {
    pub cluster: Cluster,
    pub host: Lv,
    pub labels: DestinationLabels,
    /// Everything the cluster was built from: a reload keeps the cluster
    /// (and its pooled connections and outlier state) when this is equal.
    fingerprint: String,
}

/// How a listener treats TLS from clients.
#[derive(Debug, Clone)]
pub enum ListenerTls {
    /// Plain HTTP that also accepts mutual TLS from mesh peers (detected on
    /// the first byte), as meshgate's gateways do.
    MeshAuto,
    /// TLS terminated with this config (SIMPLE, MUTUAL, ISTIO_MUTUAL).
    Terminate(Arc<rustls::ServerConfig>),
    /// TLS passed through by SNI (not terminated).
    Passthrough,
}

/// A `tls` route: SNI names to destinations (passthrough).
#[derive(Debug, Clone)]
pub struct TlsRoute {
    /// Lowercase SNI patterns (`a.com`, `*.a.com`).
    pub sni: Vec<String>,
    pub destinations: Vec<WeightedCluster>,
    pub name: Arc<str>,
}

impl TlsRoute {
    /// The first route whose SNI patterns cover `sni`.
    pub fn find<'a>(routes: &'a [TlsRoute], sni: &str) -> Option<&'a TlsRoute> {
        let sni = sni.to_ascii_lowercase();
        routes.iter().find(|r| {
            r.sni
                .iter()
                .any(|p| meshgate_config::registry::host_matches(p, &sni))
        })
    }
}

/// One port the proxy listens on.
#[derive(Debug)]
pub struct ListenerState {
    pub tls_routes: Vec<TlsRoute>,
    pub tls: ListenerTls,
    /// The port routes match on (Gateway server port).
    pub port: u16,
    /// The port bound (Service targetPort).
    pub bind_port: u16,
    pub protocol: Protocol,
    /// Plaintext refused (PeerAuthentication STRICT).
    pub strict_mtls: bool,
    pub routes: RouteTable,
    /// `Gateway ns/name server #i`, for logs.
    pub origin: String,
}

/// Everything the request path needs, for one workload.
#[derive(Debug)]
pub struct Snapshot {
    pub view: ProxyView,
    pub source: WorkloadLabels,
    pub listeners: Vec<ListenerState>,
    /// Indexed by the route tables; `None` for a destination missing from
    /// the registry (503 NC).
    pub clusters: Vec<Option<Arc<ClusterEntry>>>,
    pub cluster_names: Vec<Arc<str>>,
    /// Enforced on inbound only: empty for a sidecar's outbound path.
    pub policies: Vec<CompiledPolicy>,
    /// Sidecars: what unmatched traffic gets (REGISTRY_ONLY or ALLOW_ANY).
    pub outbound: Option<OutboundMode>,
    /// Sidecars: index of the PassthroughCluster (original destination).
    pub passthrough: Option<usize>,
    /// Sidecars with ALLOW_ANY: the `allow_any` route to PassthroughCluster.
    pub allow_any: Option<Route>,
}

/// Envoy's name for the cluster that forwards to the original destination.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// Envoy's name for the cluster that drops unmatched traffic.
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";

fn passthrough_cluster(ctx: &BuildContext) -> Arc<ClusterEntry> {
    let name: Lv = Arc::from(PASSTHROUGH_CLUSTER);
    Arc::new(ClusterEntry {
        cluster: Cluster::new(
            ClusterSettings {
                name: name.clone(),
                endpoints: Endpoints::FromUri,
                tls: None,
                h2: false,
                connect_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(3600),
                max_requests_per_connection: None,
                max_in_flight: usize::MAX,
                lb: SimpleLb::RoundRobin,
                outlier: None,
            },
            ctx.resolver.clone(),
        ),
        host: name.clone(),
        labels: DestinationLabels {
            workload: WorkloadLabels::unknown(),
            service: name.clone(),
            service_name: name,
            service_namespace: unknown(),
        },
        fingerprint: PASSTHROUGH_CLUSTER.to_owned(),
    })
}

fn endpoints_for(service: &Service, port: u16, ctx: &BuildContext) -> Endpoints {
    let key = format!("{}:{port}", service.hostname);
    if let Some(addrs) = ctx.endpoints.get(&key) {
        return Endpoints::Static(addrs.clone());
    }
    let target = service
        .port(u32::from(port))
        .and_then(|p| match &p.target_port {
            Some(meshgate_config::model::common::IntOrString::Int(n)) => u16::try_from(*n).ok(),
            _ => None,
        });
    let port_name = service
        .port(u32::from(port))
        .map(|p| p.name.clone())
        .unwrap_or_default();
    let ep_port = |ports: &BTreeMap<String, u32>| {
        ports
            .get(&port_name)
            .and_then(|p| u16::try_from(*p).ok())
            .or(target)
            .unwrap_or(port)
    };
    match (&service.source, service.resolution) {
        (ServiceSource::Kubernetes { .. }, _) => Endpoints::Dns {
            names: vec![(service.hostname.clone(), port)],
            first_only: false,
        },
        (_, Resolution::Static) => Endpoints::Static(
            service
                .endpoints
                .iter()
                .filter_map(|e| {
                    e.address
                        .parse()
                        .ok()
                        .map(|ip| SocketAddr::new(ip, ep_port(&e.ports)))
                })
                .collect(),
        ),
        (_, res) => {
            let first_only = res == Resolution::DnsRoundRobin;
            let names = if service.endpoints.is_empty() {
                vec![(service.hostname.clone(), target.unwrap_or(port))]
            } else {
                service
                    .endpoints
                    .iter()
                    .map(|e| (e.address.clone(), ep_port(&e.ports)))
                    .collect()
            };
            Endpoints::Dns { names, first_only }
        }
    }
}

fn destination_labels(
    service: Option<&Service>,
    registry: &Registry,
    host: &str,
) -> DestinationLabels {
    let mut workload = WorkloadLabels::unknown();
    if let Some(s) = service {
        // A mesh service backed by exactly one workload: name it.
        let selected: Vec<&Workload> = registry
            .workloads
            .iter()
            .filter(|w| {
                w.namespace == s.namespace
                    && s.selector.as_ref().is_some_and(|sel| {
                        !sel.is_empty() && meshgate_config::model::labels_match(sel, &w.labels)
                    })
            })
            .collect();
        if let [one] = selected.as_slice() {
            workload = WorkloadLabels::of(one);
        }
    }
    DestinationLabels {
        workload,
        service: Arc::from(host),
        service_name: Arc::from(match service.map(|s| &s.source) {
            Some(ServiceSource::Kubernetes { name }) => name.as_str(),
            _ => host,
        }),
        service_namespace: service.map_or_else(unknown, |s| Arc::from(s.namespace.as_str())),
    }
}

fn build_cluster(
    c: &ClusterView,
    registry: &Registry,
    w: &Workload,
    ctx: &BuildContext,
    is_gateway: bool,
    previous: &HashMap<&str, Arc<ClusterEntry>>,
) -> Result<Option<Arc<ClusterEntry>>, BuildError> {
    let Some(service) = registry.lookup(&c.host, &w.namespace) else {
        return Ok(None);
    };
    let port = u16::try_from(c.port).unwrap_or(0);
    if is_gateway
        && service.resolution == Resolution::None
        && matches!(service.source, ServiceSource::ServiceEntry { .. })
    {
        let se = match &service.source {
            ServiceSource::ServiceEntry { name } => format!("{}/{name}", service.namespace),
            ServiceSource::Kubernetes { name } => name.clone(),
        };
        return Err(BuildError::ResolutionNone {
            cluster: c.name.clone(),
            service_entry: se,
        });
    }
    let policy = &c.policy;
    let h2 = speaks_h2(c.protocol, policy);
    let client_cert = policy
        .tls
        .as_ref()
        .filter(|t| t.mode == ClientTlsMode::Mutual && !t.client_certificate.is_empty())
        .map(|t| (t.client_certificate.as_str(), t.private_key.as_str()));
    let tls = upstream_tls::build(
        &c.tls,
        client_cert,
        h2,
        &ctx.roots,
        ctx.identity.as_ref(),
        &c.host,
    )
    .map_err(|e| BuildError::Tls {
        cluster: c.name.clone(),
        reason: e.to_string(),
    })?;
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
    let settings = ClusterSettings {
        name: Arc::from(c.name.as_str()),
        endpoints: endpoints_for(service, port, ctx),
        tls,
        h2,
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
        max_in_flight,
        lb: policy
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.simple)
            .unwrap_or(SimpleLb::LeastRequest),
        outlier: policy.outlier_detection.as_ref().map(Outlier::compile),
    };
    let labels = destination_labels(Some(service), registry, &c.host);
    let fingerprint = format!("{c:?}|{:?}|{labels:?}", settings.endpoints);
    if let Some(prev) = previous.get(c.name.as_str())
        && prev.fingerprint == fingerprint
    {
        return Ok(Some(prev.clone()));
    }
    Ok(Some(Arc::new(ClusterEntry {
        cluster: Cluster::new(settings, ctx.resolver.clone()),
        host: Arc::from(c.host.as_str()),
        labels,
        fingerprint,
    })))
}

/// Whether a cluster speaks HTTP/2 upstream: HTTP2/GRPC ports do; HTTP
/// ports only with `h2UpgradePolicy: UPGRADE` (Istio's default is
/// DO_NOT_UPGRADE, also between sidecars and gateways).
fn speaks_h2(protocol: Protocol, policy: &view::EffectivePolicy) -> bool {
    use meshgate_config::model::networking::H2UpgradePolicy;
    let upgrade = policy
        .connection_pool
        .as_ref()
        .and_then(|p| p.http.as_ref())
        .and_then(|h| h.h2_upgrade_policy)
        == Some(H2UpgradePolicy::Upgrade);
    match protocol {
        Protocol::Http2 | Protocol::Grpc => true,
        Protocol::Http => upgrade,
        _ => false,
    }
}

impl Snapshot {
    /// Compiles the snapshot for `workload` (`namespace/name`).
    pub fn build(
        config: &Config,
        workload: &str,
        ctx: &BuildContext,
    ) -> Result<Snapshot, BuildError> {
        Self::rebuild(config, workload, ctx, None)
    }

    /// Compiles a new snapshot, keeping the clusters of `previous` that did
    /// not change (a reload does not drop pooled connections).
    pub fn rebuild(
        config: &Config,
        workload: &str,
        ctx: &BuildContext,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, BuildError> {
        let previous: HashMap<&str, Arc<ClusterEntry>> = previous
            .map(|p| {
                p.cluster_names
                    .iter()
                    .zip(&p.clusters)
                    .filter_map(|(n, c)| c.clone().map(|c| (&**n, c)))
                    .collect()
            })
            .unwrap_or_default();
        let registry = registry::build(config, &ctx.mesh);
        let w = view::find_workload(&registry, workload)?;
        let is_gateway = w.proxy == registry::ProxyKind::Gateway;
        if w.proxy == registry::ProxyKind::None {
            return Err(BuildError::NoProxy(workload.to_owned()));
        }
        let v = view::proxy_view(config, &registry, &ctx.mesh, w);

        let mut clusters = Vec::with_capacity(v.clusters.len());
        let mut index: HashMap<&str, usize> = HashMap::new();
        for c in &v.clusters {
            index.insert(c.name.as_str(), clusters.len());
            clusters.push(build_cluster(c, &registry, w, ctx, is_gateway, &previous)?);
        }
        let mut cluster_names: Vec<Arc<str>> = v
            .clusters
            .iter()
            .map(|c| Arc::from(c.name.as_str()))
            .collect();
        let passthrough = (!is_gateway).then(|| {
            let pt = previous
                .get(PASSTHROUGH_CLUSTER)
                .cloned()
                .unwrap_or_else(|| passthrough_cluster(ctx));
            clusters.push(Some(pt));
            cluster_names.push(Arc::from(PASSTHROUGH_CLUSTER));
            clusters.len() - 1
        });

        let mut listeners: Vec<ListenerState> = Vec::new();
        for l in v
            .listeners
            .iter()
            .filter(|l| l.port != view::OUTBOUND_CAPTURE_PORT)
        {
            let port = u16::try_from(l.port).unwrap_or(0);
            if let Some(existing) = listeners.iter_mut().find(|x| x.port == port) {
                existing.origin.push_str(&format!(", {}", l.origin));
                continue;
            }
            let routes = route_table(config, &v, port, &index);
            let pa = view::peer_authentication_for(config, w, Some(l.port), &ctx.mesh);
            let tls = listener_tls(l, ctx).map_err(|reason| BuildError::Tls {
                cluster: l.origin.clone(),
                reason,
            })?;
            let tls_routes = tls_route_table(&v, port, &index);
            listeners.push(ListenerState {
                tls_routes,
                tls,
                port,
                bind_port: u16::try_from(l.bind_port).unwrap_or(port),
                protocol: l.protocol,
                strict_mtls: pa.mode == MtlsMode::Strict,
                routes,
                origin: l.origin.clone(),
            });
        }
        // Policies are enforced where traffic comes in: at a gateway's
        // listeners. A sidecar's outbound path has none.
        let policies = if is_gateway {
            view::authorization_policies_for(config, w, &ctx.mesh)
                .into_iter()
                .map(CompiledPolicy::compile)
                .collect()
        } else {
            Vec::new()
        };
        let outbound = (!is_gateway).then_some(v.outbound_traffic_policy.mode);
        let allow_any = match (outbound, passthrough) {
            (Some(OutboundMode::AllowAny), Some(i)) => {
                let mut r = Route::default_to(i);
                r.name = Arc::from("allow_any");
                // Istio's allow_any route has no timeout and no retries.
                r.retry.attempts = 0;
                Some(r)
            }
            _ => None,
        };
        Ok(Snapshot {
            allow_any,
            outbound,
            passthrough,
            source: WorkloadLabels::of(w),
            view: v,
            listeners,
            clusters,
            cluster_names,
            policies,
        })
    }

    /// Istio's labels for one request or connection this proxy reports
    /// (`reporter="source"`: the proxy's workload is the source). Without a
    /// cluster the destination is named after `host` (or `unknown`).
    pub fn istio_labels(
        &self,
        cluster: Option<&ClusterEntry>,
        host: &str,
        code: u16,
        flags: &'static str,
        protocol: &'static str,
    ) -> meshgate_telemetry::IstioLabels {
        let s = &self.source;
        let (dw, service, service_name, service_ns) = match cluster {
            Some(c) => (
                c.labels.workload.clone(),
                c.labels.service.clone(),
                c.labels.service_name.clone(),
                c.labels.service_namespace.clone(),
            ),
            None => {
                let host = crate::route::split_host_port(host).0;
                let host: Lv = if host.is_empty() {
                    unknown()
                } else {
                    Arc::from(host)
                };
                (WorkloadLabels::unknown(), host.clone(), host, unknown())
            }
        };
        meshgate_telemetry::IstioLabels {
            reporter: "source",
            source_workload: s.workload.clone(),
            source_canonical_service: s.canonical_service.clone(),
            source_canonical_revision: s.canonical_revision.clone(),
            source_workload_namespace: s.namespace.clone(),
            source_principal: s.principal.clone(),
            source_app: s.app.clone(),
            source_version: s.version.clone(),
            source_cluster: s.cluster.clone(),
            destination_workload: dw.workload,
            destination_workload_namespace: dw.namespace,
            destination_principal: dw.principal,
            destination_app: dw.app,
            destination_version: dw.version,
            destination_service: service,
            destination_canonical_service: dw.canonical_service,
            destination_canonical_revision: dw.canonical_revision,
            destination_service_name: service_name,
            destination_service_namespace: service_ns,
            destination_cluster: dw.cluster,
            request_protocol: protocol,
            response_code: code,
            grpc_response_status: "",
            response_flags: flags,
            connection_security_policy: "unknown",
        }
    }

    pub fn listener(&self, port: u16) -> Option<&ListenerState> {
        self.listeners.iter().find(|l| l.port == port)
    }
}

fn listener_tls(l: &view::Listener, ctx: &BuildContext) -> Result<ListenerTls, String> {
    use meshgate_config::model::networking::ServerTlsMode as M;
    let Some(t) = l.server_tls.as_ref().filter(|_| l.protocol.is_tls()) else {
        return Ok(ListenerTls::MeshAuto);
    };
    let provider = meshgate_identity::tls::provider();
    let alpn = |mut c: rustls::ServerConfig| {
        c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(c)
    };
    match t.mode {
        M::Passthrough | M::AutoPassthrough => Ok(ListenerTls::Passthrough),
        M::IstioMutual => {
            let id = ctx
                .identity
                .as_ref()
                .ok_or("ISTIO_MUTUAL needs a workload identity")?;
            meshgate_identity::tls::mesh_server_config(id, &[b"h2", b"http/1.1"])
                .map(ListenerTls::Terminate)
                .map_err(|e| e.to_string())
        }
        M::Simple | M::Mutual | M::OptionalMutual => {
            let chain =
                meshgate_identity::cert::read_certs(std::path::Path::new(&t.server_certificate))
                    .map_err(|e| e.to_string())?;
            let key = meshgate_identity::cert::read_key(std::path::Path::new(&t.private_key))
                .map_err(|e| e.to_string())?;
            let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|e| e.to_string())?;
            let builder = if t.mode == M::Simple {
                builder.with_no_client_auth()
            } else {
                let mut roots = rustls::RootCertStore::empty();
                for c in
                    meshgate_identity::cert::read_certs(std::path::Path::new(&t.ca_certificates))
                        .map_err(|e| e.to_string())?
                {
                    roots.add(c).map_err(|e| e.to_string())?;
                }
                let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                );
                let v = if t.mode == M::OptionalMutual {
                    v.allow_unauthenticated()
                } else {
                    v
                };
                builder.with_client_cert_verifier(v.build().map_err(|e| e.to_string())?)
            };
            builder
                .with_single_cert(chain, key)
                .map(|c| ListenerTls::Terminate(alpn(c)))
                .map_err(|e| e.to_string())
        }
    }
}

fn tls_route_table(v: &ProxyView, port: u16, index: &HashMap<&str, usize>) -> Vec<TlsRoute> {
    v.routes
        .iter()
        .filter(|r| r.listener_port == u32::from(port) && !r.sni_hosts.is_empty())
        .filter_map(|r| {
            let RouteAction::Route(dests) = &r.action else {
                return None;
            };
            Some(TlsRoute {
                sni: r.sni_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                destinations: dests
                    .iter()
                    .filter_map(|d| {
                        index
                            .get(d.cluster_name().as_str())
                            .map(|&cluster| WeightedCluster {
                                cluster,
                                weight: d.weight,
                                request_headers: HeaderOps::default(),
                                response_headers: HeaderOps::default(),
                            })
                    })
                    .collect(),
                name: Arc::from(r.rule.as_str()),
            })
        })
        .collect()
}

/// The route table of one listener port, from the view's routes.
fn route_table(
    config: &Config,
    v: &ProxyView,
    port: u16,
    index: &HashMap<&str, usize>,
) -> RouteTable {
    let mut vhosts: Vec<VirtualHost> = Vec::new();
    for r in v
        .routes
        .iter()
        .filter(|r| r.listener_port == u32::from(port))
    {
        let route = match (&r.virtual_service, r.rule_index, &r.action) {
            (Some(vs_name), Some(i), _) => {
                let Some(vs) = config
                    .virtual_services
                    .iter()
                    .find(|vs| &vs.meta.full_name() == vs_name)
                else {
                    continue;
                };
                let Some(rule) = vs.spec.http.get(i) else {
                    continue;
                };
                let weighted = match &r.action {
                    RouteAction::Route(dests) => dests
                        .iter()
                        .zip(&rule.route)
                        .filter_map(|(d, rd)| {
                            index
                                .get(d.cluster_name().as_str())
                                .map(|&cluster| WeightedCluster {
                                    cluster,
                                    weight: d.weight,
                                    request_headers: HeaderOps::compile(
                                        rd.headers.as_ref().and_then(|h| h.request.as_ref()),
                                    ),
                                    response_headers: HeaderOps::compile(
                                        rd.headers.as_ref().and_then(|h| h.response.as_ref()),
                                    ),
                                })
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                Route::compile(
                    rule,
                    Arc::from(r.rule.as_str()),
                    Some(Arc::from(vs_name.as_str())),
                    &r.matches,
                    weighted,
                )
            }
            (None, _, RouteAction::Route(dests)) => match dests
                .first()
                .and_then(|d| index.get(d.cluster_name().as_str()))
            {
                Some(&i) => Route::default_to(i),
                None => continue,
            },
            _ => continue,
        };
        let host = r.host.to_ascii_lowercase();
        match vhosts.iter_mut().find(|vh| vh.domains[0] == host) {
            Some(vh) => vh.routes.push(route),
            None => vhosts.push(VirtualHost {
                domains: vec![host],
                routes: vec![route],
            }),
        }
    }
    RouteTable { vhosts }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GATEWAY: &str = "curl-egress-tst/curl-egress-tst-gateway";
    const CLUSTER: &str = "outbound|443||jsonplaceholder.typicode.com";

    fn seed(destination_rule: &str) -> Config {
        let mut loaded = meshgate_config::Loaded::default();
        for (name, text) in [
            (
                "namespaces.yaml",
                include_str!("../../../examples/seed/namespaces.yaml"),
            ),
            (
                "deployment-egress-gw.yaml",
                include_str!("../../../examples/seed/deployment-egress-gw.yaml"),
            ),
            (
                "gateway.yaml",
                include_str!("../../../examples/seed/gateway.yaml"),
            ),
            (
                "serviceentry.yaml",
                include_str!("../../../examples/seed/serviceentry.yaml"),
            ),
            (
                "virtualservice-egress-gw.yaml",
                include_str!("../../../examples/seed/virtualservice-egress-gw.yaml"),
            ),
            ("destintionrule.yaml", destination_rule),
        ] {
            meshgate_config::load::load_str(name, text, &mut loaded).unwrap();
        }
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
        loaded.config
    }

    fn ctx() -> BuildContext {
        BuildContext {
            mesh: MeshSettings::default(),
            resolver: Resolver::new(Some("127.0.0.1:53".parse().unwrap())).unwrap(),
            roots: DefaultRoots::load(&[]).unwrap(),
            identity: None,
            endpoints: HashMap::new(),
        }
    }

    fn cluster(s: &Snapshot) -> Arc<ClusterEntry> {
        let i = s
            .cluster_names
            .iter()
            .position(|n| &**n == CLUSTER)
            .unwrap();
        s.clusters[i].clone().unwrap()
    }

    #[test]
    fn h2_only_for_h2_ports_or_an_explicit_upgrade() {
        use meshgate_config::model::networking::{
            ConnectionPoolSettings, H2UpgradePolicy, HttpSettings,
        };
        let policy = |p: Option<H2UpgradePolicy>| view::EffectivePolicy {
            connection_pool: Some(ConnectionPoolSettings {
                http: Some(HttpSettings {
                    h2_upgrade_policy: p,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let none = view::EffectivePolicy::default();
        let up = policy(Some(H2UpgradePolicy::Upgrade));
        let keep = policy(Some(H2UpgradePolicy::DoNotUpgrade));
        for (protocol, policy, want) in [
            (Protocol::Http, &none, false),
            (Protocol::Http, &keep, false),
            (Protocol::Http, &up, true),
            (Protocol::Http2, &none, true),
            (Protocol::Grpc, &none, true),
            (Protocol::Tcp, &up, false),
        ] {
            assert_eq!(speaks_h2(protocol, policy), want, "{protocol:?} {policy:?}");
        }
    }

    #[test]
    fn rebuild_keeps_unchanged_clusters_and_replaces_changed_ones() {
        let dr = include_str!("../../../examples/seed/destintionrule.yaml");
        let ctx = ctx();
        let first = Snapshot::build(&seed(dr), GATEWAY, &ctx).unwrap();
        let same = Snapshot::rebuild(&seed(dr), GATEWAY, &ctx, Some(&first)).unwrap();
        assert!(
            Arc::ptr_eq(&cluster(&first), &cluster(&same)),
            "same config: same cluster, pools and outlier state kept"
        );
        let changed = dr.replace("mode: SIMPLE", "mode: DISABLE");
        let other = Snapshot::rebuild(&seed(&changed), GATEWAY, &ctx, Some(&same)).unwrap();
        assert!(!Arc::ptr_eq(&cluster(&same), &cluster(&other)));
    }
}
