//! Which resources apply to a workload: its Sidecar, DestinationRules,
//! Gateways, VirtualService bindings, AuthorizationPolicies and
//! PeerAuthentication, as Istio selects them.

use std::collections::HashMap;

use serde::Serialize;

use super::{OutboundPolicy, PeerAuthnView};
use crate::MeshSettings;
use crate::model::common::IntOrString;
use crate::model::networking::{
    ClientTlsSettings, ConnectionPoolSettings, DestinationRule, Gateway, LoadBalancerSettings,
    OutlierDetection, RetryBudget, Sidecar, Subset, TrafficPolicy, TunnelSettings, VirtualService,
};
use crate::model::security::{AuthorizationPolicy, MtlsMode, PeerAuthentication};
use crate::model::{Config, Resource, labels_match};
use crate::registry::{
    ProxyKind, Registry, Service, Workload, exported_to, host_matches, resolve_host,
};

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

/// The outbound traffic policy and where it comes from: the Sidecar's, else
/// MeshConfig's (Istio's default: ALLOW_ANY).
pub fn outbound_policy(sidecar: Option<&Resource<Sidecar>>, mesh: &MeshSettings) -> OutboundPolicy {
    match sidecar.and_then(|s| s.spec.outbound_traffic_policy.as_ref().map(|p| (s, p))) {
        Some((s, p)) => OutboundPolicy {
            mode: p.mode,
            source: format!("Sidecar {}", s.meta.full_name()),
        },
        None => OutboundPolicy {
            mode: mesh.outbound_traffic_policy,
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
    sidecar_imports_host(sidecar, &service.namespace, &service.hostname, workload_ns)
}

/// [`sidecar_imports`] for a service named by its namespace and hostname.
pub fn sidecar_imports_host(
    sidecar: Option<&Resource<Sidecar>>,
    service_ns: &str,
    hostname: &str,
    workload_ns: &str,
) -> bool {
    imports_on(sidecar, None, service_ns, hostname, workload_ns)
}

/// Does the Sidecar import this service on `port`? An egress listener
/// with a `port` imports its hosts on that port only.
pub fn sidecar_imports_port(
    sidecar: Option<&Resource<Sidecar>>,
    service: &Service,
    port: u32,
    workload_ns: &str,
) -> bool {
    imports_on(
        sidecar,
        Some(port),
        &service.namespace,
        &service.hostname,
        workload_ns,
    )
}

/// The egress listeners that apply on `port` (all of them for `None`).
fn imports_on(
    sidecar: Option<&Resource<Sidecar>>,
    port: Option<u32>,
    service_ns: &str,
    hostname: &str,
    workload_ns: &str,
) -> bool {
    let Some(sc) = sidecar.filter(|s| !s.spec.egress.is_empty()) else {
        return true;
    };
    let hosts = sc
        .spec
        .egress
        .iter()
        .filter(|e| match (port, &e.port) {
            (Some(p), Some(listener)) => listener.number == p,
            _ => true,
        })
        .flat_map(|e| e.hosts.iter());
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
            "." => service_ns == workload_ns,
            "~" => false,
            other => service_ns == other,
        };
        if ns_ok && host_matches(host, hostname) {
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
            // The registry resolved named targets to the pods' container
            // ports; a name no container has falls back to the port.
            let target = match &p.target_port {
                Some(IntOrString::Int(n)) => *n,
                _ => server_port,
            };
            return (target, true);
        }
    }
    (server_port, false)
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
    DrIndex::new(config, mesh).find(client_ns, w, service_host, service_ns, mesh)
}

/// DestinationRules by namespace and host, for [`destination_rule_for`]
/// many times over (a proxy's every cluster, the analyzers' every
/// destination): exact hosts in constant time, wildcard hosts tried in
/// turn, config order kept.
#[derive(Debug)]
pub struct DrIndex<'a> {
    exact: HashMap<(&'a str, String), Vec<&'a Resource<DestinationRule>>>,
    wildcard: HashMap<&'a str, Vec<(String, &'a Resource<DestinationRule>)>>,
}

impl<'a> DrIndex<'a> {
    pub fn new(config: &'a Config, mesh: &MeshSettings) -> Self {
        let mut exact: HashMap<(&'a str, String), Vec<&'a Resource<DestinationRule>>> =
            HashMap::new();
        let mut wildcard: HashMap<&'a str, Vec<(String, &'a Resource<DestinationRule>)>> =
            HashMap::new();
        for dr in &config.destination_rules {
            let ns = dr.meta.namespace.as_str();
            let host = resolve_host(&dr.spec.host, ns, mesh).to_ascii_lowercase();
            if host.starts_with('*') {
                wildcard.entry(ns).or_default().push((host, dr));
            } else {
                exact.entry((ns, host)).or_default().push(dr);
            }
        }
        DrIndex { exact, wildcard }
    }

    /// The DestinationRule for a service: the client's namespace first,
    /// then the service's, then the root namespace; in each the most
    /// specific host (exact over wildcard, then longer), first in order
    /// on a tie.
    pub fn find(
        &self,
        client_ns: &str,
        w: Option<&Workload>,
        service_host: &str,
        service_ns: &str,
        mesh: &MeshSettings,
    ) -> Option<&'a Resource<DestinationRule>> {
        let lower = service_host.to_ascii_lowercase();
        let candidates = |ns: &str, require_export: bool| {
            let exact = self
                .exact
                .get(&(ns, lower.clone()))
                .into_iter()
                .flatten()
                .copied();
            let wild = self
                .wildcard
                .get(ns)
                .into_iter()
                .flatten()
                .filter(|(pattern, _)| host_matches(pattern, service_host))
                .map(|(_, dr)| *dr);
            let mut best: Option<&'a Resource<DestinationRule>> = None;
            for dr in exact.chain(wild) {
                if require_export && !exported_to(&dr.spec.export_to, &dr.meta.namespace, client_ns)
                {
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
}

/// The traffic policy that applies to one (port, subset) of a destination:
/// the subset's policy overrides the top level, and a port-level entry
/// overrides its whole group of settings (omitted fields are not inherited).
#[derive(Debug, Clone, Default, PartialEq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EffectivePolicy {
    pub tls: Option<ClientTlsSettings>,
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    /// The policy's or its subset's (Istio has none per port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
    /// The policy's or its subset's: TCP goes through a CONNECT tunnel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelSettings>,
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
        if tp.retry_budget.is_some() {
            out.retry_budget = tp.retry_budget.clone();
        }
        if tp.tunnel.is_some() {
            out.tunnel = tp.tunnel.clone();
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
                ports: Default::default(),
            };
        }
    }
    PeerAuthnView {
        mode: MtlsMode::Permissive,
        source: "mesh default".to_owned(),
        ports: Default::default(),
    }
}
