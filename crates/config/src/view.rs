//! One proxy's view of the mesh: which Sidecar, VirtualServices,
//! DestinationRules, Gateways and policies apply to one workload, and the
//! listeners, routes, upstream clusters and policies that follow. The view
//! holds everything a proxy runs on (the data path compiles it and reads
//! nothing else), so `meshgate config-dump` prints exactly what a proxy
//! runs. Every decision here is a pure function of (config, registry,
//! workload).
//!
//! - `select`: which resources apply to a workload;
//! - `routes`: listeners and routes (sidecar outbound, gateway servers);
//! - `delegate`: VirtualService delegation merged into root rules;
//! - `clusters`: upstream clusters (endpoints, DestinationRule, TLS);
//! - `summary`: one-line summaries for people (config-dump, explain).

mod clusters;
mod delegate;
mod routes;
mod select;
mod summary;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::MeshSettings;
use crate::model::common::{Duration, Labels};
use crate::model::networking::{
    ClientTlsMode, CorsPolicy, Headers, HttpDirectResponse, HttpFaultInjection, HttpMatchRequest,
    HttpRedirect, HttpRetry, HttpRewrite, OutboundMode, ServerTlsMode, ServerTlsSettings,
};
use crate::model::security::{AuthorizationPolicy, AuthzAction, MtlsMode, Rule};
use crate::model::{Config, Resource};
use crate::registry::{self, Protocol, ProxyKind, Registry, Workload};

pub use clusters::cluster_tls;
pub use delegate::{is_delegate, merged as with_delegates_merged};
pub use routes::{
    destination_port, gateway_server_is_http, gateway_server_is_passthrough, server_hosts_cover,
};
pub use select::{
    DrIndex, EffectivePolicy, authorization_policies_for, destination_rule_for, effective_policy,
    gateway_listen_port, gateway_ref_matches, gateways_for, outbound_policy,
    peer_authentication_for, sidecar_for, sidecar_imports, sidecar_imports_host,
    sidecar_imports_port, vs_bound_to_gateway, vs_bound_to_mesh,
};
pub use summary::{match_summary, rule_summary};

/// Port of the sidecar's outbound capture listener (Envoy's `virtualOutbound`).
pub const OUTBOUND_CAPTURE_PORT: u32 = 15001;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyView {
    pub workload: WorkloadInfo,
    pub sidecar: Option<String>,
    /// The Sidecar's `ingress` listeners: a port of the workload and where
    /// connections to it go instead (`127.0.0.1:PORT`, or `0.0.0.0:PORT`
    /// for the workload's own address).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inbound_endpoints: BTreeMap<u32, String>,
    /// Ports the workload serves, by number (its Services' target ports
    /// and its Sidecar's ingress ports) and what they speak: HTTP ones are
    /// served as HTTP on the way in, with request-level policy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inbound_ports: BTreeMap<u32, InboundPort>,
    /// Sidecar ingress ports that terminate TLS from outside the mesh
    /// with their own certificate (`ingress[].tls`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inbound_tls: BTreeMap<u32, ServerTlsSettings>,
    /// Listeners the Sidecar has the proxy bind itself (captureMode NONE,
    /// or a unix socket): the application calls them, nothing redirects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bound_listeners: Vec<BoundListener>,
    pub outbound_traffic_policy: OutboundPolicy,
    pub listeners: Vec<Listener>,
    pub routes: Vec<RouteView>,
    pub clusters: Vec<ClusterView>,
    pub authorization_policies: Vec<PolicyView>,
    pub peer_authentication: PeerAuthnView,
    /// MeshConfig pathNormalization: applied before routing and
    /// authorization.
    pub path_normalization: crate::PathNormalization,
    /// MeshConfig protocolDetectionTimeout (none: Istio's 0s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_detection_timeout: Option<crate::model::common::Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadInfo {
    pub namespace: String,
    pub name: String,
    pub proxy: ProxyKind,
    pub service_account: String,
    pub spiffe_id: String,
    /// Pod labels (Istio's canonical service and revision come from them).
    pub labels: Labels,
}

impl WorkloadInfo {
    pub fn of(w: &Workload) -> Self {
        WorkloadInfo {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            proxy: w.proxy,
            service_account: w.service_account.clone(),
            spiffe_id: w.spiffe_id.clone(),
            labels: w.labels.clone(),
        }
    }
}

/// A listener the proxy binds because its Sidecar says so.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BoundListener {
    /// On the way in to the workload (an `ingress` listener), or out.
    pub inbound: bool,
    /// The port routes match on (0: a unix socket).
    pub port: u32,
    /// An IP address, or `unix:///path` (`unix://@name`: abstract).
    pub bind: String,
    pub protocol: Protocol,
}

/// A port the workload serves, and the Service it serves it for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundPort {
    pub protocol: Protocol,
    /// The Service's host (`name.ns.svc.cluster.local`); none for a
    /// Sidecar ingress port no Service names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboundPolicy {
    pub mode: OutboundMode,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerAuthnView {
    pub mode: MtlsMode,
    pub source: String,
    /// Ports whose mode differs from `mode` (`portLevelMtls`), for
    /// connections on their way in to the workload.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u32, MtlsMode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// The port routes match on (service or Gateway server port).
    pub port: u32,
    /// The port the proxy binds (a gateway server's Service targetPort).
    pub bind_port: u32,
    pub protocol: Protocol,
    pub hosts: Vec<String>,
    pub tls: DownstreamTls,
    /// Inbound mutual TLS on this port (PeerAuthentication, port-level
    /// settings first); `None` on a sidecar's outbound ports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_authentication: Option<PeerAuthnView>,
    pub origin: String,
}

/// What a listener does with TLS from its clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum DownstreamTls {
    /// Plaintext (a sidecar's HTTP and TCP ports, a gateway's TCP servers).
    None,
    /// The application's own TLS, routed by SNI and passed through (a
    /// sidecar's TLS ports).
    SniPassthrough,
    /// Plaintext that also accepts ISTIO_MUTUAL from mesh peers, detected
    /// on the first byte (a gateway's HTTP servers).
    MeshAuto,
    /// A Gateway server's TLS settings (HTTPS and TLS servers).
    Server(Box<ServerTlsSettings>),
}

impl DownstreamTls {
    /// A TLS server that passes the client's TLS through by SNI.
    pub fn is_passthrough(&self) -> bool {
        match self {
            DownstreamTls::SniPassthrough => true,
            DownstreamTls::Server(t) => matches!(
                t.mode,
                ServerTlsMode::Passthrough | ServerTlsMode::AutoPassthrough
            ),
            DownstreamTls::None | DownstreamTls::MeshAuto => false,
        }
    }
}

impl fmt::Display for DownstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DownstreamTls::None => f.write_str("none"),
            DownstreamTls::SniPassthrough => f.write_str("passthrough (SNI)"),
            DownstreamTls::MeshAuto => f.write_str("none; ISTIO_MUTUAL from mesh peers (auto)"),
            DownstreamTls::Server(t) => f.write_str(t.mode.as_str()),
        }
    }
}

/// One route: a VirtualService rule (or a service's default route) on one
/// listener port and host, with everything the proxy applies.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteView {
    pub listener_port: u32,
    pub host: String,
    /// The rule's match blocks that apply on this listener (by port and
    /// gateway); empty matches everything.
    #[serde(rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    pub action: RouteAction,
    /// `ns/name` of the VirtualService, or `None` for a default route.
    pub virtual_service: Option<String>,
    /// `#0` or the rule's name.
    pub rule: String,
    /// Index of the rule in the VirtualService's `http` (or `tls`) list.
    pub rule_index: Option<usize>,
    /// For a `tls` route (SNI passthrough): the SNI names it matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni_hosts: Vec<String>,
    /// For a `tcp` route: the destination subnets it matches (empty: any
    /// destination on the port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_subnets: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<HttpRewrite>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// `None`: Istio's default retry policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<HttpRetry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<HttpFaultInjection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors_policy: Option<CorsPolicy>,
    /// Where copies of the requests go (`mirror`, `mirrors`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<MirrorView>,
}

/// One mirror: a destination and the share of requests copied to it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MirrorView {
    pub destination: RouteDestination,
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RouteAction {
    Route(Vec<RouteDestination>),
    Redirect(HttpRedirect),
    DirectResponse(HttpDirectResponse),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteDestination {
    pub host: String,
    pub port: u32,
    pub subset: String,
    pub weight: u32,
    /// Header changes for requests to (and responses from) this destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
}

impl RouteDestination {
    pub fn cluster_name(&self) -> String {
        format!("outbound|{}|{}|{}", self.port, self.subset, self.host)
    }
}

#[derive(Debug, Clone, PartialEq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub name: String,
    pub host: String,
    pub port: u32,
    pub subset: String,
    /// False when the host is not in the registry (503 NC).
    pub in_registry: bool,
    /// Where the service comes from: `ServiceEntry ns/name` or `Service
    /// ns/name` (empty when not in the registry).
    pub origin: String,
    pub service_namespace: String,
    /// Istio's `destination_service_name`: the Kubernetes Service's name,
    /// else the host.
    pub service_name: String,
    pub resolution: ClusterResolution,
    pub endpoints: ClusterEndpoints,
    pub protocol: Protocol,
    pub tls: ClusterTls,
    pub destination_rule: Option<String>,
    pub policy: EffectivePolicy,
    /// The one workload behind the service, when exactly one backs it
    /// (Istio's `destination_workload` labels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_workload: Option<WorkloadInfo>,
}

/// How a cluster finds its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Hash, Eq, Serialize)]
pub enum ClusterResolution {
    #[serde(rename = "NOT_IN_REGISTRY")]
    NotInRegistry,
    /// A Kubernetes Service (Istio: EDS).
    #[serde(rename = "EDS")]
    Kubernetes,
    /// A ServiceEntry with `resolution: NONE`.
    #[serde(rename = "ORIGINAL_DST")]
    OriginalDst,
    #[serde(rename = "STATIC")]
    Static,
    #[serde(rename = "DNS")]
    Dns,
    #[serde(rename = "DNS_ROUND_ROBIN")]
    DnsRoundRobin,
    #[serde(rename = "DYNAMIC_DNS")]
    DynamicDns,
}

impl fmt::Display for ClusterResolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClusterResolution::NotInRegistry => "none (not in registry)",
            ClusterResolution::Kubernetes => "EDS (Kubernetes endpoints)",
            ClusterResolution::OriginalDst => "ORIGINAL_DST (NONE)",
            ClusterResolution::Static => "STATIC",
            ClusterResolution::Dns => "DNS",
            ClusterResolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
            ClusterResolution::DynamicDns => "DYNAMIC_DNS",
        })
    }
}

/// Where a cluster's endpoints are.
#[derive(Debug, Clone, PartialEq, Hash, Eq, Serialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum ClusterEndpoints {
    /// Names resolved by DNS, each at its port: every address, or only the
    /// first with `first_only` (DNS_ROUND_ROBIN).
    Dns {
        names: Vec<HostPort>,
        first_only: bool,
    },
    /// Fixed addresses (STATIC).
    Static(Vec<HostPort>),
    /// DYNAMIC_DNS: each request's host, resolved when it is sent, at
    /// this port (Envoy's dynamic forward proxy).
    RequestHost { port: u16 },
    /// None: the host is not in the registry.
    None,
}

#[derive(Debug, Clone, PartialEq, Hash, Eq, Serialize)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
    /// Locality failover: 0 shares the proxy's region, zone and subzone,
    /// 1 its region and zone, 2 its region, 3 is the region `failover`
    /// names, 4 anywhere else (lower is tried first). All 0 when locality
    /// load balancing is off.
    #[serde(skip_serializing_if = "is_zero")]
    pub priority: u8,
    /// `localityLbSetting.distribute`: this endpoint's share of traffic
    /// (its locality's weight split among the locality's endpoints;
    /// `None`: the load balancer decides alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

fn is_zero(p: &u8) -> bool {
    *p == 0
}

#[derive(Debug, Clone, PartialEq, Hash, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterTls {
    pub mode: ClientTlsMode,
    /// True for auto mutual TLS (no DestinationRule tls, mesh endpoints).
    pub auto: bool,
    pub sni: String,
    /// SPIFFE IDs (ISTIO_MUTUAL) or DNS names (SIMPLE/MUTUAL) the server
    /// certificate must carry.
    pub expected_identities: Vec<String>,
    /// CA file, `mesh CA`, or `system roots`.
    pub trust: String,
    /// The CA file to verify the server with (SIMPLE/MUTUAL), if any.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ca_certificates: String,
    pub client_certificate: String,
    /// The client key file (MUTUAL with files).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub private_key: String,
    pub insecure_skip_verify: bool,
}

/// One AuthorizationPolicy that applies to the workload, as the proxy
/// enforces it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyView {
    pub namespace: String,
    pub name: String,
    pub action: AuthzAction,
    /// The CUSTOM action's provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Why it applies: mesh-wide, namespace, or selector.
    pub scope: String,
    /// `None`: no `rules` field (the policy matches nothing).
    pub rules: Option<Vec<Rule>>,
}

impl PolicyView {
    /// `ns/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Errors that make a view impossible.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(
        "workload {0} not found: give the namespace/name of a Deployment or Pod in the config (found: {1})"
    )]
    UnknownWorkload(String, String),
}

/// The view of workload `ns_name` (`namespace/name`) in `config`.
pub fn build(config: &Config, mesh: &MeshSettings, ns_name: &str) -> Result<ProxyView, ViewError> {
    build_with(config, &registry::build(config, mesh), mesh, ns_name)
}

/// As [`build`], from a registry already built for `config` (a proxy
/// builds it once per load: its workload check, identity and view share it).
pub fn build_with(
    config: &Config,
    registry: &Registry,
    mesh: &MeshSettings,
    ns_name: &str,
) -> Result<ProxyView, ViewError> {
    let w = find_workload(registry, ns_name)?;
    Ok(proxy_view(config, registry, mesh, w))
}

/// Computes the proxy view for one workload.
pub fn proxy_view(
    config: &Config,
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
) -> ProxyView {
    let sidecar = sidecar_for(config, w, mesh);
    let mut listeners = Vec::new();
    let mut routes = Vec::new();
    let vses = delegate::merged(&config.virtual_services);
    if w.proxy == ProxyKind::Gateway {
        routes::gateway_routes(
            config,
            &vses,
            registry,
            mesh,
            w,
            &mut listeners,
            &mut routes,
        );
    } else {
        routes::sidecar_routes(
            &vses,
            registry,
            mesh,
            w,
            sidecar,
            &mut listeners,
            &mut routes,
        );
    }
    let mut seen = BTreeSet::new();
    let drs = select::DrIndex::new(config, mesh);
    let clusters = routes
        .iter()
        .flat_map(|r| {
            let routed = match &r.action {
                RouteAction::Route(dests) => dests.as_slice(),
                _ => &[],
            };
            routed
                .iter()
                .chain(r.mirrors.iter().map(|m| &m.destination))
        })
        .filter(|d| seen.insert(d.cluster_name()))
        .map(|d| clusters::cluster_view(&drs, registry, mesh, w, d))
        .collect();
    ProxyView {
        workload: WorkloadInfo::of(w),
        sidecar: sidecar.map(|s| s.meta.full_name()),
        inbound_endpoints: sidecar
            .iter()
            .flat_map(|s| s.spec.ingress.iter())
            .filter(|i| !i.default_endpoint.is_empty())
            .map(|i| (i.port.number, i.default_endpoint.clone()))
            .collect(),
        inbound_ports: inbound_ports(registry, w, sidecar),
        inbound_tls: sidecar
            .iter()
            .flat_map(|s| s.spec.ingress.iter())
            .filter_map(|i| Some((i.port.number, i.tls.clone()?)))
            .collect(),
        bound_listeners: sidecar.map(bound_listeners).unwrap_or_default(),
        outbound_traffic_policy: outbound_policy(sidecar, mesh),
        path_normalization: mesh.path_normalization,
        protocol_detection_timeout: mesh
            .protocol_detection_timeout
            .map(crate::model::common::Duration),
        listeners,
        routes,
        clusters,
        authorization_policies: authorization_policies_for(config, w, mesh)
            .into_iter()
            .map(|p| policy_view(p, mesh))
            .collect(),
        peer_authentication: workload_peer_authentication(config, w, mesh),
    }
}

/// The workload's PeerAuthentication, with the ports any `portLevelMtls`
/// that could apply to it names, where their mode differs.
/// Istio binds an egress listener with captureMode NONE on 127.0.0.1 by
/// default, an ingress one on the workload's addresses; a unix socket is
/// always bound (nothing can redirect to one).
fn bound_listeners(sidecar: &Resource<crate::model::networking::Sidecar>) -> Vec<BoundListener> {
    use crate::model::networking::CaptureMode;
    let none = |m: Option<CaptureMode>| m == Some(CaptureMode::None);
    let egress = sidecar.spec.egress.iter().filter_map(|e| {
        let port = e.port.as_ref()?;
        let unix = e.bind.starts_with("unix://");
        (unix || none(e.capture_mode)).then(|| BoundListener {
            inbound: false,
            port: port.number,
            bind: if e.bind.is_empty() {
                "127.0.0.1".into()
            } else {
                e.bind.clone()
            },
            protocol: Protocol::parse(&port.protocol),
        })
    });
    // Without a defaultEndpoint it would forward to itself (check: MG0005).
    let ingress = sidecar
        .spec
        .ingress
        .iter()
        .filter(|i| none(i.capture_mode) && !i.default_endpoint.is_empty())
        .map(|i| BoundListener {
            inbound: true,
            port: i.port.number,
            bind: if i.bind.is_empty() {
                "0.0.0.0".into()
            } else {
                i.bind.clone()
            },
            protocol: Protocol::parse(&i.port.protocol),
        });
    egress.chain(ingress).collect()
}

/// The ports the workload serves: each Service port selecting it, by its
/// target port (a name its pods do not declare serves nothing), then the
/// Sidecar's ingress ports, whose protocol says how they are served.
fn inbound_ports(
    registry: &Registry,
    w: &Workload,
    sidecar: Option<&Resource<crate::model::networking::Sidecar>>,
) -> BTreeMap<u32, InboundPort> {
    use crate::model::common::IntOrString;
    let mut ports = BTreeMap::new();
    for s in registry.services_of(w) {
        for p in &s.ports {
            let target = match &p.target_port {
                None => p.number,
                Some(IntOrString::Int(n)) => *n,
                Some(IntOrString::String(_)) => continue,
            };
            ports.entry(target).or_insert_with(|| InboundPort {
                protocol: p.protocol,
                service: Some(s.hostname.clone()),
            });
        }
    }
    for i in sidecar.iter().flat_map(|s| s.spec.ingress.iter()) {
        let protocol = Protocol::parse(&i.port.protocol);
        let port = ports.entry(i.port.number).or_insert(InboundPort {
            protocol,
            service: None,
        });
        port.protocol = protocol;
    }
    ports
}

fn workload_peer_authentication(
    config: &Config,
    w: &Workload,
    mesh: &MeshSettings,
) -> PeerAuthnView {
    let mut view = peer_authentication_for(config, w, None, mesh);
    let ports: BTreeSet<u32> = config
        .peer_authentications
        .iter()
        .filter(|p| p.meta.namespace == w.namespace || p.meta.namespace == mesh.root_namespace)
        .flat_map(|p| p.spec.port_level_mtls.keys().copied())
        .collect();
    for port in ports {
        let mode = peer_authentication_for(config, w, Some(port), mesh).mode;
        if mode != view.mode {
            view.ports.insert(port, mode);
        }
    }
    view
}

/// Finds a workload by `namespace/name`.
pub fn find_workload<'a>(registry: &'a Registry, ns_name: &str) -> Result<&'a Workload, ViewError> {
    let (ns, name) = ns_name.split_once('/').unwrap_or(("default", ns_name));
    registry.workload(ns, name).ok_or_else(|| {
        let known: Vec<String> = registry
            .workloads
            .iter()
            .map(|w| format!("{}/{}", w.namespace, w.name))
            .collect();
        ViewError::UnknownWorkload(
            ns_name.to_owned(),
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            },
        )
    })
}

impl PolicyView {
    /// How the proxy enforces `p`.
    pub fn of(p: &Resource<AuthorizationPolicy>, mesh: &MeshSettings) -> PolicyView {
        policy_view(p, mesh)
    }
}

fn policy_view(p: &Resource<AuthorizationPolicy>, mesh: &MeshSettings) -> PolicyView {
    let scope = match (&p.spec.selector, p.meta.namespace == mesh.root_namespace) {
        (Some(s), root) if !s.match_labels.is_empty() => format!(
            "{}selector {}",
            if root { "mesh-wide, " } else { "" },
            s.match_labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        ),
        (_, true) => "mesh-wide".to_owned(),
        (_, false) => format!("namespace {}", p.meta.namespace),
    };
    PolicyView {
        namespace: p.meta.namespace.clone(),
        name: p.meta.name.clone(),
        action: p.spec.action,
        provider: p.spec.provider.as_ref().map(|pr| pr.name.clone()),
        scope,
        rules: p.spec.rules.as_ref().map(|rules| {
            rules
                .iter()
                .map(|r| with_trust_domains(r.clone(), mesh))
                .collect()
        }),
    }
}

/// A rule's principals (and `source.principal` conditions) for every trust
/// domain of the mesh, as Istio expands them.
fn with_trust_domains(mut rule: Rule, mesh: &MeshSettings) -> Rule {
    let expand = |v: &mut Vec<String>| {
        *v = v.iter().flat_map(|p| mesh.expand_principal(p)).collect();
    };
    for from in &mut rule.from {
        expand(&mut from.source.principals);
        expand(&mut from.source.not_principals);
    }
    for c in rule.when.iter_mut().filter(|c| c.key == "source.principal") {
        expand(&mut c.values);
        expand(&mut c.not_values);
    }
    rule
}

#[cfg(test)]
mod tests;
