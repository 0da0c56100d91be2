//! One proxy's view of the mesh: which Sidecar, VirtualServices,
//! DestinationRules, Gateways and policies apply to one workload, and the
//! listeners, routes and upstream clusters that follow. This is what
//! `meshgate config-dump` prints and what the data path is built from, so
//! every decision here is a pure function of (config, registry, workload).

use std::collections::BTreeSet;

use serde::Serialize;

use crate::MeshSettings;
use crate::model::common::IntOrString;
use crate::model::networking::{
    ClientTlsMode, ClientTlsSettings, ConnectionPoolSettings, DestinationRule, Gateway,
    HttpMatchRequest, HttpRoute, LoadBalancerSettings, OutboundMode, OutlierDetection, Resolution,
    Server, ServerTlsMode, Sidecar, Subset, TrafficPolicy, VirtualService,
};
use crate::model::security::{AuthorizationPolicy, MtlsMode, PeerAuthentication, Rule};
use crate::model::{Config, Resource, labels_match};
use crate::registry::{
    Protocol, ProxyKind, Registry, Service, Workload, exported_to, host_matches, hosts_overlap,
    resolve_host,
};

/// Port of the sidecar's outbound capture listener (Envoy's `virtualOutbound`).
pub const OUTBOUND_CAPTURE_PORT: u32 = 15001;

// === Selection: which resources apply to a workload ===

/// The Sidecar resource that applies: one selecting the workload in its
/// namespace, else the namespace's selector-less one, else the root
/// namespace's selector-less one.
pub fn sidecar_for<'a>(
    config: &'a Config,
    w: &'a Workload,
    mesh: &'a MeshSettings,
) -> Option<&'a Resource<Sidecar>> {
    let in_ns = |ns: &'a str| {
        config
            .sidecars
            .iter()
            .filter(move |s| s.meta.namespace == ns)
    };
    let selects = |s: &&Resource<Sidecar>| {
        s.spec
            .workload_selector
            .as_ref()
            .is_some_and(|sel| !sel.labels.is_empty() && labels_match(&sel.labels, &w.labels))
    };
    let no_selector = |s: &&Resource<Sidecar>| {
        s.spec
            .workload_selector
            .as_ref()
            .is_none_or(|sel| sel.labels.is_empty())
    };
    in_ns(&w.namespace)
        .find(selects)
        .or_else(|| in_ns(&w.namespace).find(no_selector))
        .or_else(|| in_ns(&mesh.root_namespace).find(no_selector))
}

/// The outbound traffic policy and where it comes from. Mesh default:
/// ALLOW_ANY.
pub fn outbound_policy(sidecar: Option<&Resource<Sidecar>>) -> OutboundPolicy {
    match sidecar.and_then(|s| s.spec.outbound_traffic_policy.as_ref().map(|p| (s, p))) {
        Some((s, p)) => OutboundPolicy {
            mode: p.mode,
            source: format!("Sidecar {}", s.meta.full_name()),
        },
        None => OutboundPolicy {
            mode: OutboundMode::AllowAny,
            source: "mesh default".to_owned(),
        },
    }
}

/// Does the Sidecar's egress section import this service? No Sidecar (or no
/// egress) imports everything visible.
pub fn sidecar_imports(
    sidecar: Option<&Resource<Sidecar>>,
    service: &Service,
    workload_ns: &str,
) -> bool {
    let Some(sc) = sidecar.filter(|s| !s.spec.egress.is_empty()) else {
        return true;
    };
    let hosts = sc.spec.egress.iter().flat_map(|e| e.hosts.iter());
    let mut imported = false;
    for h in hosts {
        let Some((ns, host)) = h.split_once('/') else {
            continue;
        };
        let (negated, ns) = match ns.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, ns),
        };
        let ns_ok = match ns {
            "*" => true,
            "." => service.namespace == workload_ns,
            "~" => false,
            other => service.namespace == other,
        };
        if ns_ok && host_matches(host, &service.hostname) {
            if negated {
                return false;
            }
            imported = true;
        }
    }
    imported
}

/// Is the VirtualService bound to the mesh (sidecars)? Omitted `gateways`
/// means `[mesh]`.
pub fn vs_bound_to_mesh(vs: &VirtualService) -> bool {
    vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh")
}

/// Does a `gateways` entry (in a VS of `vs_ns`) name this Gateway?
pub fn gateway_ref_matches(entry: &str, vs_ns: &str, gw: &Resource<Gateway>) -> bool {
    match entry.split_once('/') {
        Some((ns, name)) => ns == gw.meta.namespace && name == gw.meta.name,
        None => entry != "mesh" && vs_ns == gw.meta.namespace && entry == gw.meta.name,
    }
}

pub fn vs_bound_to_gateway(vs: &Resource<VirtualService>, gw: &Resource<Gateway>) -> bool {
    vs.spec
        .gateways
        .iter()
        .any(|g| gateway_ref_matches(g, &vs.meta.namespace, gw))
}

/// Gateways whose selector matches the workload (searched in all namespaces,
/// Istio's default). Only gateway workloads open gateway listeners.
pub fn gateways_for<'a>(config: &'a Config, w: &Workload) -> Vec<&'a Resource<Gateway>> {
    if w.proxy != ProxyKind::Gateway {
        return Vec::new();
    }
    config
        .gateways
        .iter()
        .filter(|g| labels_match(&g.spec.selector, &w.labels))
        .collect()
}

/// The port a gateway server actually listens on: the targetPort of the
/// Service port with the server's number, for a Service selecting the
/// gateway pods; otherwise the number itself (IST0162 warns about that).
pub fn gateway_listen_port(registry: &Registry, w: &Workload, server_port: u32) -> (u32, bool) {
    for svc in registry.services_of(w) {
        if let Some(p) = svc.port(server_port) {
            let target = match &p.target_port {
                Some(IntOrString::Int(n)) => *n,
                Some(IntOrString::String(name)) => container_port(w, name).unwrap_or(server_port),
                None => server_port,
            };
            return (target, true);
        }
    }
    (server_port, false)
}

fn container_port(_w: &Workload, _name: &str) -> Option<u32> {
    // Named targetPorts need the pod's container ports; the registry keeps
    // only labels, so resolve through the config when it matters.
    None
}

/// DestinationRule lookup as Istio does it for a client proxy in namespace
/// `client_ns`: the client's namespace, then the service's namespace (rules
/// exported to the client), then the root namespace. The most specific host
/// wins within a namespace.
pub fn destination_rule_for<'a>(
    config: &'a Config,
    client_ns: &str,
    w: Option<&Workload>,
    service_host: &str,
    service_ns: &str,
    mesh: &MeshSettings,
) -> Option<&'a Resource<DestinationRule>> {
    let candidates = |ns: &str, require_export: bool| {
        let mut best: Option<&'a Resource<DestinationRule>> = None;
        for dr in config
            .destination_rules
            .iter()
            .filter(|d| d.meta.namespace == ns)
        {
            let host = resolve_host(&dr.spec.host, &dr.meta.namespace, mesh);
            if !host_matches(&host, service_host) {
                continue;
            }
            if require_export && !exported_to(&dr.spec.export_to, &dr.meta.namespace, client_ns) {
                continue;
            }
            if let Some(sel) = &dr.spec.workload_selector {
                let selected = w.is_some_and(|w| {
                    w.namespace == dr.meta.namespace && labels_match(&sel.labels, &w.labels)
                });
                if !selected {
                    continue;
                }
            }
            let specificity = |d: &Resource<DestinationRule>| {
                !d.spec.host.starts_with('*') as usize * 1000 + d.spec.host.len()
            };
            if best.is_none_or(|b| specificity(dr) > specificity(b)) {
                best = Some(dr);
            }
        }
        best
    };
    if client_ns != mesh.root_namespace
        && let Some(dr) = candidates(client_ns, false)
    {
        return Some(dr);
    }
    if service_ns != mesh.root_namespace
        && let Some(dr) = candidates(service_ns, true)
    {
        return Some(dr);
    }
    candidates(&mesh.root_namespace, true)
}

/// The traffic policy that applies to one (port, subset) of a destination:
/// the subset's policy overrides the top level, and a port-level entry
/// overrides its whole group of settings (omitted fields are not inherited).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EffectivePolicy {
    pub tls: Option<ClientTlsSettings>,
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
}

pub fn effective_policy(dr: &DestinationRule, port: u32, subset: &str) -> EffectivePolicy {
    let mut out = EffectivePolicy::default();
    let apply = |out: &mut EffectivePolicy, tp: &TrafficPolicy| {
        if tp.tls.is_some() {
            out.tls = tp.tls.clone();
        }
        if tp.load_balancer.is_some() {
            out.load_balancer = tp.load_balancer.clone();
        }
        if tp.connection_pool.is_some() {
            out.connection_pool = tp.connection_pool.clone();
        }
        if tp.outlier_detection.is_some() {
            out.outlier_detection = tp.outlier_detection.clone();
        }
        if let Some(pl) = tp
            .port_level_settings
            .iter()
            .find(|pl| pl.port.is_some_and(|p| p.number == port))
        {
            out.tls = pl.tls.clone().or(out.tls.take());
            out.load_balancer = pl.load_balancer.clone().or(out.load_balancer.take());
            out.connection_pool = pl.connection_pool.clone().or(out.connection_pool.take());
            out.outlier_detection = pl
                .outlier_detection
                .clone()
                .or(out.outlier_detection.take());
        }
    };
    if let Some(tp) = &dr.traffic_policy {
        apply(&mut out, tp);
    }
    if let Some(tp) = subset_of(dr, subset).and_then(|s| s.traffic_policy.as_ref()) {
        apply(&mut out, tp);
    }
    out
}

fn subset_of<'a>(dr: &'a DestinationRule, name: &str) -> Option<&'a Subset> {
    if name.is_empty() {
        return None;
    }
    dr.subsets.iter().find(|s| s.name == name)
}

/// AuthorizationPolicies enforced on the workload's inbound side: those in
/// the root namespace (mesh-wide, selector matched in every namespace) and
/// those in its own namespace whose selector matches (or that have none).
pub fn authorization_policies_for<'a>(
    config: &'a Config,
    w: &Workload,
    mesh: &MeshSettings,
) -> Vec<&'a Resource<AuthorizationPolicy>> {
    config
        .authorization_policies
        .iter()
        .filter(|p| p.meta.namespace == mesh.root_namespace || p.meta.namespace == w.namespace)
        .filter(|p| {
            p.spec
                .selector
                .as_ref()
                .is_none_or(|s| labels_match(&s.match_labels, &w.labels))
        })
        // targetRefs are for waypoints and Gateway API gateways, not for
        // sidecars and classic gateways.
        .filter(|p| p.spec.target_ref.is_none() && p.spec.target_refs.is_empty())
        .collect()
}

/// The effective peer-authentication mode for a workload (and a port):
/// workload-selector policy in its namespace, then the namespace-wide one,
/// then the root namespace's; UNSET inherits; nothing set is PERMISSIVE.
pub fn peer_authentication_for(
    config: &Config,
    w: &Workload,
    port: Option<u32>,
    mesh: &MeshSettings,
) -> PeerAuthnView {
    let ns_wide = |ns: &str| {
        config.peer_authentications.iter().find(|p| {
            p.meta.namespace == ns
                && p.spec
                    .selector
                    .as_ref()
                    .is_none_or(|s| s.match_labels.is_empty())
        })
    };
    let selecting = config.peer_authentications.iter().find(|p| {
        p.meta.namespace == w.namespace
            && p.spec.selector.as_ref().is_some_and(|s| {
                !s.match_labels.is_empty() && labels_match(&s.match_labels, &w.labels)
            })
    });
    let chain: Vec<&Resource<PeerAuthentication>> = [
        selecting,
        ns_wide(&w.namespace),
        ns_wide(&mesh.root_namespace),
    ]
    .into_iter()
    .flatten()
    .collect();
    for pa in chain {
        let port_mode = port
            .and_then(|p| pa.spec.port_level_mtls.get(&p))
            .map(|m| m.mode)
            .filter(|m| *m != MtlsMode::Unset);
        let mode = port_mode.or_else(|| {
            pa.spec
                .mtls
                .as_ref()
                .map(|m| m.mode)
                .filter(|m| *m != MtlsMode::Unset)
        });
        if let Some(mode) = mode {
            return PeerAuthnView {
                mode,
                source: format!("PeerAuthentication {}", pa.meta.full_name()),
            };
        }
    }
    PeerAuthnView {
        mode: MtlsMode::Permissive,
        source: "mesh default".to_owned(),
    }
}

// === The view ===

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyView {
    pub workload: WorkloadInfo,
    pub sidecar: Option<String>,
    pub outbound_traffic_policy: OutboundPolicy,
    pub listeners: Vec<Listener>,
    pub routes: Vec<RouteView>,
    pub clusters: Vec<ClusterView>,
    pub authorization_policies: Vec<PolicyView>,
    pub peer_authentication: PeerAuthnView,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadInfo {
    pub namespace: String,
    pub name: String,
    pub proxy: ProxyKind,
    pub service_account: String,
    pub spiffe_id: String,
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
    /// Downstream TLS: for gateways the server mode; `ISTIO_MUTUAL (auto)`
    /// on plain ports that also accept mesh mTLS.
    pub tls: String,
    pub origin: String,
    /// The Gateway server's TLS settings (gateways only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_tls: Option<crate::model::networking::ServerTlsSettings>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteView {
    pub listener_port: u32,
    pub host: String,
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
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RouteAction {
    Route(Vec<RouteDestination>),
    Redirect { location: String, code: u32 },
    DirectResponse { status: u32 },
    Delegate { virtual_service: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteDestination {
    pub host: String,
    pub port: u32,
    pub subset: String,
    pub weight: u32,
}

impl RouteDestination {
    pub fn cluster_name(&self) -> String {
        format!("outbound|{}|{}|{}", self.port, self.subset, self.host)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub name: String,
    pub host: String,
    pub port: u32,
    pub subset: String,
    /// False when the host is not in the registry (traffic would be dropped).
    pub in_registry: bool,
    pub service_namespace: String,
    pub resolution: String,
    pub protocol: Protocol,
    pub tls: ClusterTls,
    pub destination_rule: Option<String>,
    pub policy: EffectivePolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    pub client_certificate: String,
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyView {
    pub name: String,
    pub action: String,
    pub scope: String,
    pub rules: Vec<String>,
}

/// Errors that make a view impossible.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(
        "workload {0} not found: give the namespace/name of a Deployment or Pod in the config (found: {1})"
    )]
    UnknownWorkload(String, String),
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
    if w.proxy == ProxyKind::Gateway {
        gateway_routes(config, registry, mesh, w, &mut listeners, &mut routes);
    } else {
        sidecar_routes(
            config,
            registry,
            mesh,
            w,
            sidecar,
            &mut listeners,
            &mut routes,
        );
    }
    let mut seen = BTreeSet::new();
    let clusters = routes
        .iter()
        .filter_map(|r| match &r.action {
            RouteAction::Route(dests) => Some(dests),
            _ => None,
        })
        .flatten()
        .filter(|d| seen.insert(d.cluster_name()))
        .map(|d| cluster_view(config, registry, mesh, w, d))
        .collect();
    ProxyView {
        workload: WorkloadInfo {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            proxy: w.proxy,
            service_account: w.service_account.clone(),
            spiffe_id: w.spiffe_id.clone(),
        },
        sidecar: sidecar.map(|s| s.meta.full_name()),
        outbound_traffic_policy: outbound_policy(sidecar),
        listeners,
        routes,
        clusters,
        authorization_policies: authorization_policies_for(config, w, mesh)
            .into_iter()
            .map(|p| policy_view(p, mesh))
            .collect(),
        peer_authentication: peer_authentication_for(config, w, None, mesh),
    }
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

fn sidecar_routes(
    config: &Config,
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    sidecar: Option<&Resource<Sidecar>>,
    listeners: &mut Vec<Listener>,
    routes: &mut Vec<RouteView>,
) {
    listeners.push(Listener {
        port: OUTBOUND_CAPTURE_PORT,
        bind_port: OUTBOUND_CAPTURE_PORT,
        protocol: Protocol::Unsupported,
        hosts: vec!["*".to_owned()],
        tls: "none".to_owned(),
        origin: "virtualOutbound (captured and explicit-proxy traffic)".to_owned(),
        server_tls: None,
    });
    let services: Vec<&Service> = registry
        .visible_from(&w.namespace)
        .filter(|s| sidecar_imports(sidecar, s, &w.namespace))
        .collect();
    let mut ports: BTreeSet<u32> = BTreeSet::new();
    for s in &services {
        ports.extend(
            s.ports
                .iter()
                .filter(|p| p.protocol.is_http())
                .map(|p| p.number),
        );
    }
    let mesh_vs: Vec<&Resource<VirtualService>> = config
        .virtual_services
        .iter()
        .filter(|vs| {
            vs_bound_to_mesh(&vs.spec)
                && exported_to(&vs.spec.export_to, &vs.meta.namespace, &w.namespace)
        })
        .collect();
    for port in ports {
        let mut hosts = Vec::new();
        for s in services
            .iter()
            .filter(|s| s.port(port).is_some_and(|p| p.protocol.is_http()))
        {
            hosts.push(s.hostname.clone());
            let vs = mesh_vs.iter().find(|vs| {
                vs.spec
                    .hosts
                    .iter()
                    .any(|h| host_matches(&resolve_host(h, &vs.meta.namespace, mesh), &s.hostname))
            });
            let before = routes.len();
            if let Some(vs) = vs {
                vs_http_routes(
                    registry,
                    mesh,
                    w,
                    vs,
                    port,
                    &s.hostname,
                    |m| m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh"),
                    routes,
                );
            }
            if routes.len() == before {
                routes.push(default_route(port, s));
            }
        }
        listeners.push(Listener {
            port,
            bind_port: OUTBOUND_CAPTURE_PORT,
            protocol: Protocol::Http,
            hosts,
            tls: "none".to_owned(),
            origin: format!("0.0.0.0_{port} (via virtualOutbound)"),
            server_tls: None,
        });
    }
    sidecar_tls_routes(registry, mesh, w, &services, &mesh_vs, listeners, routes);
    // Plain TCP ports of registered services: known to the mesh, so
    // REGISTRY_ONLY lets them through (to the original destination).
    let mut tcp_ports: BTreeSet<u32> = BTreeSet::new();
    for s in &services {
        tcp_ports.extend(
            s.ports
                .iter()
                .filter(|p| {
                    !p.protocol.is_http() && !p.protocol.is_tls() && p.protocol != Protocol::Udp
                })
                .map(|p| p.number),
        );
    }
    for port in tcp_ports {
        if listeners.iter().any(|l| l.port == port) {
            continue;
        }
        let hosts = services
            .iter()
            .filter(|s| s.port(port).is_some())
            .map(|s| s.hostname.clone())
            .collect();
        listeners.push(Listener {
            port,
            bind_port: OUTBOUND_CAPTURE_PORT,
            protocol: Protocol::Tcp,
            hosts,
            tls: "none".to_owned(),
            origin: format!(
                "0.0.0.0_{port} TCP (via virtualOutbound, to the original destination)"
            ),
            server_tls: None,
        });
    }
}

/// TLS ports (HTTPS/TLS service ports): VirtualService `tls` rules bound to
/// the mesh first, then one SNI route per service host to itself.
fn sidecar_tls_routes(
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    services: &[&Service],
    mesh_vs: &[&Resource<VirtualService>],
    listeners: &mut Vec<Listener>,
    routes: &mut Vec<RouteView>,
) {
    let mut ports: BTreeSet<u32> = BTreeSet::new();
    for s in services {
        ports.extend(
            s.ports
                .iter()
                .filter(|p| p.protocol.is_tls())
                .map(|p| p.number),
        );
    }
    for port in ports {
        let mut hosts = Vec::new();
        for vs in mesh_vs {
            for (i, rule) in vs.spec.tls.iter().enumerate() {
                let sni: Vec<String> = rule
                    .matches
                    .iter()
                    .filter(|m| m.port.is_none_or(|p| p == port))
                    .filter(|m| m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh"))
                    .flat_map(|m| m.sni_hosts.iter().cloned())
                    .collect();
                if sni.is_empty() {
                    continue;
                }
                let dests = route_destinations(
                    registry,
                    mesh,
                    w,
                    &vs.meta.namespace,
                    rule.route.iter().map(|rd| (&rd.destination, rd.weight)),
                    port,
                );
                hosts.extend(sni.iter().cloned());
                routes.push(RouteView {
                    listener_port: port,
                    host: sni[0].clone(),
                    matches: Vec::new(),
                    action: RouteAction::Route(dests),
                    virtual_service: Some(vs.meta.full_name()),
                    rule: format!("#{i}"),
                    rule_index: Some(i),
                    sni_hosts: sni,
                });
            }
        }
        for s in services
            .iter()
            .filter(|s| s.port(port).is_some_and(|p| p.protocol.is_tls()))
        {
            hosts.push(s.hostname.clone());
            routes.push(RouteView {
                sni_hosts: vec![s.hostname.clone()],
                ..default_route(port, s)
            });
        }
        listeners.push(Listener {
            port,
            bind_port: OUTBOUND_CAPTURE_PORT,
            protocol: Protocol::Tls,
            hosts,
            tls: "passthrough (SNI)".to_owned(),
            origin: format!("0.0.0.0_{port} (via virtualOutbound)"),
            server_tls: None,
        });
    }
}

fn default_route(port: u32, s: &Service) -> RouteView {
    RouteView {
        listener_port: port,
        host: s.hostname.clone(),
        matches: Vec::new(),
        action: RouteAction::Route(vec![RouteDestination {
            host: s.hostname.clone(),
            port,
            subset: String::new(),
            weight: 100,
        }]),
        virtual_service: None,
        rule: "default".to_owned(),
        rule_index: None,
        sni_hosts: Vec::new(),
    }
}

/// Adds the routes of one VirtualService's `http` rules that apply on
/// `port` for this proxy (`applies` filters per-match `gateways`).
#[allow(clippy::too_many_arguments)]
fn vs_http_routes(
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    vs: &Resource<VirtualService>,
    port: u32,
    host: &str,
    applies: impl Fn(&HttpMatchRequest) -> bool,
    routes: &mut Vec<RouteView>,
) {
    for (i, rule) in vs.spec.http.iter().enumerate() {
        let matches: Vec<HttpMatchRequest> = rule
            .matches
            .iter()
            .filter(|m| m.port.is_none_or(|p| p == port) && applies(m))
            .cloned()
            .collect();
        if !rule.matches.is_empty() && matches.is_empty() {
            continue;
        }
        routes.push(RouteView {
            listener_port: port,
            host: host.to_owned(),
            matches,
            action: route_action(registry, mesh, w, vs, rule, port),
            virtual_service: Some(vs.meta.full_name()),
            rule: if rule.name.is_empty() {
                format!("#{i}")
            } else {
                rule.name.clone()
            },
            rule_index: Some(i),
            sni_hosts: Vec::new(),
        });
    }
}

fn route_action(
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    vs: &Resource<VirtualService>,
    rule: &HttpRoute,
    listener_port: u32,
) -> RouteAction {
    if let Some(r) = &rule.redirect {
        let location = format!(
            "{}{}{}",
            if r.scheme.is_empty() {
                String::new()
            } else {
                format!("{}://", r.scheme)
            },
            r.authority,
            r.uri
        );
        return RouteAction::Redirect {
            location,
            code: r.redirect_code.unwrap_or(301),
        };
    }
    if let Some(d) = &rule.direct_response {
        return RouteAction::DirectResponse { status: d.status };
    }
    if let Some(d) = &rule.delegate {
        let ns = if d.namespace.is_empty() {
            &vs.meta.namespace
        } else {
            &d.namespace
        };
        return RouteAction::Delegate {
            virtual_service: format!("{ns}/{}", d.name),
        };
    }
    RouteAction::Route(route_destinations(
        registry,
        mesh,
        w,
        &vs.meta.namespace,
        rule.route.iter().map(|rd| (&rd.destination, rd.weight)),
        listener_port,
    ))
}

/// A rule's destinations with hosts resolved (short names relative to the
/// VirtualService's namespace), ports chosen, and weights normalised (a
/// single destination gets all the traffic).
fn route_destinations<'a>(
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    vs_namespace: &str,
    route: impl ExactSizeIterator<Item = (&'a crate::model::networking::Destination, Option<u32>)>,
    listener_port: u32,
) -> Vec<RouteDestination> {
    let single = route.len() == 1;
    route
        .map(|(d, weight)| {
            let host = resolve_host(&d.host, vs_namespace, mesh);
            let port = destination_port(
                registry,
                &w.namespace,
                &host,
                d.port.map(|p| p.number),
                listener_port,
            );
            RouteDestination {
                host,
                port,
                subset: d.subset.clone(),
                weight: if single { 100 } else { weight.unwrap_or(0) },
            }
        })
        .collect()
}

/// Destination port: the explicit one, else the service's only port, else
/// the port the request arrived on.
pub fn destination_port(
    registry: &Registry,
    from_ns: &str,
    host: &str,
    explicit: Option<u32>,
    listener_port: u32,
) -> u32 {
    if let Some(p) = explicit.filter(|p| *p != 0) {
        return p;
    }
    match registry.lookup(host, from_ns).map(|s| s.ports.as_slice()) {
        Some([only]) => only.number,
        _ => listener_port,
    }
}

fn gateway_routes(
    config: &Config,
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    listeners: &mut Vec<Listener>,
    routes: &mut Vec<RouteView>,
) {
    for gw in gateways_for(config, w) {
        for (si, server) in gw.spec.servers.iter().enumerate() {
            let protocol = Protocol::parse(&server.port.protocol);
            let (bind_port, _) = gateway_listen_port(registry, w, server.port.number);
            let tls = match &server.tls {
                Some(t) if protocol.is_tls() || t.https_redirect => t.mode.as_str().to_owned(),
                _ if protocol.is_http() => "none; ISTIO_MUTUAL from mesh peers (auto)".to_owned(),
                _ => "none".to_owned(),
            };
            listeners.push(Listener {
                port: server.port.number,
                bind_port,
                protocol,
                hosts: server.hosts.clone(),
                tls,
                server_tls: server.tls.clone(),
                origin: format!(
                    "Gateway {} server {}",
                    gw.meta.full_name(),
                    if server.name.is_empty() {
                        format!("#{si}")
                    } else {
                        server.name.clone()
                    }
                ),
            });
            if gateway_server_is_passthrough(server) {
                gateway_tls_routes(config, registry, mesh, w, gw, server, routes);
                continue;
            }
            if !gateway_server_is_http(server) {
                continue;
            }
            for vs in config.virtual_services.iter().filter(|vs| {
                vs_bound_to_gateway(vs, gw)
                    && exported_to(&vs.spec.export_to, &vs.meta.namespace, &gw.meta.namespace)
            }) {
                for host in &vs.spec.hosts {
                    let host = resolve_host(host, &vs.meta.namespace, mesh);
                    if !server_hosts_cover(server, &gw.meta.namespace, &vs.meta.namespace, &host) {
                        continue;
                    }
                    let applies = |m: &HttpMatchRequest| {
                        m.gateways.is_empty()
                            || m.gateways
                                .iter()
                                .any(|g| gateway_ref_matches(g, &vs.meta.namespace, gw))
                    };
                    vs_http_routes(
                        registry,
                        mesh,
                        w,
                        vs,
                        server.port.number,
                        &host,
                        applies,
                        routes,
                    );
                }
            }
        }
    }
}

/// HTTPS/TLS servers in PASSTHROUGH mode route by SNI with `tls` routes.
pub fn gateway_server_is_passthrough(server: &Server) -> bool {
    Protocol::parse(&server.port.protocol).is_tls()
        && server.tls.as_ref().is_none_or(|t| {
            matches!(
                t.mode,
                ServerTlsMode::Passthrough | ServerTlsMode::AutoPassthrough
            )
        })
}

/// `tls` rules of VirtualServices bound to a passthrough Gateway server.
fn gateway_tls_routes(
    config: &Config,
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    gw: &Resource<Gateway>,
    server: &Server,
    routes: &mut Vec<RouteView>,
) {
    let port = server.port.number;
    for vs in config.virtual_services.iter().filter(|vs| {
        vs_bound_to_gateway(vs, gw)
            && exported_to(&vs.spec.export_to, &vs.meta.namespace, &gw.meta.namespace)
    }) {
        for (i, rule) in vs.spec.tls.iter().enumerate() {
            let sni: Vec<String> = rule
                .matches
                .iter()
                .filter(|m| m.port.is_none_or(|p| p == port))
                .filter(|m| {
                    m.gateways.is_empty()
                        || m.gateways
                            .iter()
                            .any(|g| gateway_ref_matches(g, &vs.meta.namespace, gw))
                })
                .flat_map(|m| m.sni_hosts.iter())
                .filter(|h| server_hosts_cover(server, &gw.meta.namespace, &vs.meta.namespace, h))
                .cloned()
                .collect();
            if sni.is_empty() {
                continue;
            }
            let dests = route_destinations(
                registry,
                mesh,
                w,
                &vs.meta.namespace,
                rule.route.iter().map(|rd| (&rd.destination, rd.weight)),
                port,
            );
            routes.push(RouteView {
                listener_port: port,
                host: sni[0].clone(),
                matches: Vec::new(),
                action: RouteAction::Route(dests),
                virtual_service: Some(vs.meta.full_name()),
                rule: format!("#{i}"),
                rule_index: Some(i),
                sni_hosts: sni,
            });
        }
    }
}

/// HTTP routes apply to HTTP servers and to TLS-terminating HTTPS servers.
pub fn gateway_server_is_http(server: &Server) -> bool {
    let protocol = Protocol::parse(&server.port.protocol);
    protocol.is_http()
        || (protocol == Protocol::Https
            && server.tls.as_ref().is_some_and(|t| {
                !matches!(
                    t.mode,
                    ServerTlsMode::Passthrough | ServerTlsMode::AutoPassthrough
                )
            }))
}

/// Does a Gateway server's `hosts` (`[ns/]host`) admit a VirtualService host
/// from `vs_ns`?
pub fn server_hosts_cover(server: &Server, gw_ns: &str, vs_ns: &str, host: &str) -> bool {
    server.hosts.iter().any(|h| {
        let (ns, pattern) = h.split_once('/').unwrap_or(("*", h));
        let ns_ok = match ns {
            "*" => true,
            "." => vs_ns == gw_ns,
            other => other == vs_ns,
        };
        ns_ok && hosts_overlap(pattern, host)
    })
}

fn cluster_view(
    config: &Config,
    registry: &Registry,
    mesh: &MeshSettings,
    w: &Workload,
    d: &RouteDestination,
) -> ClusterView {
    let service = registry.lookup(&d.host, &w.namespace);
    let dr = service.and_then(|s| {
        destination_rule_for(
            config,
            &w.namespace,
            Some(w),
            &s.hostname,
            &s.namespace,
            mesh,
        )
    });
    let policy = dr
        .map(|dr| effective_policy(&dr.spec, d.port, &d.subset))
        .unwrap_or_default();
    let tls = cluster_tls(policy.tls.as_ref(), service, d);
    ClusterView {
        name: d.cluster_name(),
        host: d.host.clone(),
        port: d.port,
        subset: d.subset.clone(),
        in_registry: service.is_some(),
        service_namespace: service.map(|s| s.namespace.clone()).unwrap_or_default(),
        resolution: match service {
            None => "none (not in registry)".to_owned(),
            Some(s) if matches!(s.source, crate::registry::ServiceSource::Kubernetes { .. }) => {
                "EDS (Kubernetes endpoints)".to_owned()
            }
            Some(s) => match s.resolution {
                Resolution::None => "ORIGINAL_DST (NONE)",
                Resolution::Static => "STATIC",
                Resolution::Dns => "DNS",
                Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
                Resolution::DynamicDns => "DYNAMIC_DNS",
            }
            .to_owned(),
        },
        protocol: service
            .and_then(|s| s.port(d.port))
            .map_or(Protocol::Unsupported, |p| p.protocol),
        tls,
        destination_rule: dr.map(|d| d.meta.full_name()),
        policy,
    }
}

/// Upstream TLS for a cluster: the DestinationRule's settings when it has
/// any, else auto mutual TLS toward mesh endpoints, else plaintext.
pub fn cluster_tls(
    dr_tls: Option<&ClientTlsSettings>,
    service: Option<&Service>,
    d: &RouteDestination,
) -> ClusterTls {
    let istio_sni = format!("outbound_.{}_.{}_.{}", d.port, d.subset, d.host);
    let accounts = service
        .map(|s| s.service_accounts.clone())
        .unwrap_or_default();
    match dr_tls {
        Some(t) => {
            let (sni, expected, trust) = match t.mode {
                ClientTlsMode::IstioMutual => (
                    if t.sni.is_empty() {
                        istio_sni
                    } else {
                        t.sni.clone()
                    },
                    if t.subject_alt_names.is_empty() {
                        accounts
                    } else {
                        t.subject_alt_names.clone()
                    },
                    "mesh CA".to_owned(),
                ),
                ClientTlsMode::Simple | ClientTlsMode::Mutual => (
                    if t.sni.is_empty() {
                        d.host.clone()
                    } else {
                        t.sni.clone()
                    },
                    if t.subject_alt_names.is_empty() {
                        vec![d.host.clone()]
                    } else {
                        t.subject_alt_names.clone()
                    },
                    if t.ca_certificates.is_empty() {
                        "system roots".to_owned()
                    } else {
                        t.ca_certificates.clone()
                    },
                ),
                ClientTlsMode::Disable => (String::new(), Vec::new(), String::new()),
            };
            ClusterTls {
                mode: t.mode,
                auto: false,
                sni,
                expected_identities: expected,
                trust,
                client_certificate: match t.mode {
                    ClientTlsMode::Mutual => t.client_certificate.clone(),
                    ClientTlsMode::IstioMutual => "workload certificate".to_owned(),
                    _ => String::new(),
                },
                insecure_skip_verify: t.insecure_skip_verify == Some(true),
            }
        }
        None if service.is_some_and(|s| s.mesh_endpoints) => ClusterTls {
            mode: ClientTlsMode::IstioMutual,
            auto: true,
            sni: istio_sni,
            expected_identities: accounts,
            trust: "mesh CA".to_owned(),
            client_certificate: "workload certificate".to_owned(),
            insecure_skip_verify: false,
        },
        None => ClusterTls {
            mode: ClientTlsMode::Disable,
            auto: false,
            sni: String::new(),
            expected_identities: Vec::new(),
            trust: String::new(),
            client_certificate: String::new(),
            insecure_skip_verify: false,
        },
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
    let rules = match &p.spec.rules {
        None => vec!["(no rules: matches nothing)".to_owned()],
        Some(rules) => rules.iter().map(rule_summary).collect(),
    };
    PolicyView {
        name: p.meta.full_name(),
        action: match &p.spec.provider {
            Some(pr) => format!("{} ({})", p.spec.action.as_str(), pr.name),
            None => p.spec.action.as_str().to_owned(),
        },
        scope,
        rules,
    }
}

/// A one-line summary of a rule, e.g. `from namespaces=[a] to methods=[GET]`.
pub fn rule_summary(rule: &Rule) -> String {
    fn field(out: &mut Vec<String>, name: &str, values: &[String]) {
        if !values.is_empty() {
            out.push(format!("{name}=[{}]", values.join(",")));
        }
    }
    let mut parts = Vec::new();
    for f in &rule.from {
        let s = &f.source;
        let mut o = Vec::new();
        field(&mut o, "principals", &s.principals);
        field(&mut o, "notPrincipals", &s.not_principals);
        field(&mut o, "requestPrincipals", &s.request_principals);
        field(&mut o, "notRequestPrincipals", &s.not_request_principals);
        field(&mut o, "namespaces", &s.namespaces);
        field(&mut o, "notNamespaces", &s.not_namespaces);
        field(&mut o, "serviceAccounts", &s.service_accounts);
        field(&mut o, "notServiceAccounts", &s.not_service_accounts);
        field(&mut o, "ipBlocks", &s.ip_blocks);
        field(&mut o, "notIpBlocks", &s.not_ip_blocks);
        field(&mut o, "remoteIpBlocks", &s.remote_ip_blocks);
        field(&mut o, "notRemoteIpBlocks", &s.not_remote_ip_blocks);
        parts.push(format!("from {}", o.join(" ")));
    }
    for t in &rule.to {
        let op = &t.operation;
        let mut o = Vec::new();
        field(&mut o, "hosts", &op.hosts);
        field(&mut o, "notHosts", &op.not_hosts);
        field(&mut o, "ports", &op.ports);
        field(&mut o, "notPorts", &op.not_ports);
        field(&mut o, "methods", &op.methods);
        field(&mut o, "notMethods", &op.not_methods);
        field(&mut o, "paths", &op.paths);
        field(&mut o, "notPaths", &op.not_paths);
        parts.push(format!("to {}", o.join(" ")));
    }
    for c in &rule.when {
        let mut o = Vec::new();
        field(&mut o, "values", &c.values);
        field(&mut o, "notValues", &c.not_values);
        parts.push(format!("when {} {}", c.key, o.join(" ")));
    }
    if parts.is_empty() {
        "(empty rule: matches everything)".to_owned()
    } else {
        parts.join("; ")
    }
}

/// A one-line summary of an HTTP match block.
pub fn match_summary(m: &HttpMatchRequest) -> String {
    use crate::model::networking::StringMatch;
    fn sm(s: &StringMatch) -> String {
        match (&s.exact, &s.prefix, &s.regex) {
            (Some(e), _, _) => format!("={e}"),
            (_, Some(p), _) => format!(" prefix {p}"),
            (_, _, Some(r)) => format!(" ~{r}"),
            _ => " present".to_owned(),
        }
    }
    let mut parts = Vec::new();
    if let Some(p) = m.port {
        parts.push(format!("port={p}"));
    }
    for (name, v) in [
        ("uri", &m.uri),
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(v) = v {
            parts.push(format!("{name}{}", sm(v)));
        }
    }
    for (k, v) in &m.headers {
        parts.push(format!("header {k}{}", sm(v)));
    }
    for (k, v) in &m.without_headers {
        parts.push(format!("!header {k}{}", sm(v)));
    }
    for (k, v) in &m.query_params {
        parts.push(format!("query {k}{}", sm(v)));
    }
    if !m.gateways.is_empty() {
        parts.push(format!("gateways={}", m.gateways.join(",")));
    }
    if m.ignore_uri_case {
        parts.push("ignoreUriCase".to_owned());
    }
    if parts.is_empty() {
        "*".to_owned()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests;
