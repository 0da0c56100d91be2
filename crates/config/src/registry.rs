//! The service registry and the workload list, as Istio's control plane
//! derives them from the config: ServiceEntry hosts and Kubernetes Services
//! on one side, Deployments and Pods (with their identity and proxy kind) on
//! the other. Pure functions of [`Config`].

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde::Serialize;

use crate::MeshSettings;
use crate::model::common::IntOrString;
use crate::model::networking::{Location, Resolution, WorkloadEntry};
use crate::model::{Config, Kind, Labels, Meta, labels_match};

/// Port protocols as Istio parses them (case-insensitive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    GrpcWeb,
    Https,
    Tls,
    Tcp,
    Mongo,
    Redis,
    Mysql,
    Udp,
    /// Empty or unknown: Istio sniffs the protocol.
    Unsupported,
}

impl Protocol {
    pub fn parse(s: &str) -> Protocol {
        match s.to_ascii_uppercase().as_str() {
            "HTTP" => Protocol::Http,
            "HTTP2" => Protocol::Http2,
            "GRPC" => Protocol::Grpc,
            "GRPC-WEB" => Protocol::GrpcWeb,
            "HTTPS" => Protocol::Https,
            "TLS" => Protocol::Tls,
            "TCP" => Protocol::Tcp,
            "MONGO" => Protocol::Mongo,
            "REDIS" => Protocol::Redis,
            "MYSQL" => Protocol::Mysql,
            "UDP" => Protocol::Udp,
            _ => Protocol::Unsupported,
        }
    }

    /// Protocol of a Kubernetes Service port: `appProtocol`, else the port
    /// name's prefix (`http`, `http-web`, `grpc-x`), Istio's naming convention.
    pub fn from_kube_port(name: &str, app_protocol: Option<&str>) -> Protocol {
        if let Some(app) = app_protocol {
            let p = match app {
                "kubernetes.io/h2c" => Protocol::Http2,
                "kubernetes.io/ws" | "kubernetes.io/wss" => Protocol::Http,
                other => Protocol::parse(other),
            };
            if p != Protocol::Unsupported {
                return p;
            }
        }
        let prefix = name.split_once('-').map_or(name, |(p, _)| p);
        Protocol::parse(prefix)
    }

    /// Routed by HTTP route tables (Host header).
    pub fn is_http(self) -> bool {
        matches!(
            self,
            Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb
        )
    }

    /// Routed by SNI (`tls` routes), not terminated.
    pub fn is_tls(self) -> bool {
        matches!(self, Protocol::Https | Protocol::Tls)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Http2 => "HTTP2",
            Protocol::Grpc => "GRPC",
            Protocol::GrpcWeb => "GRPC-WEB",
            Protocol::Https => "HTTPS",
            Protocol::Tls => "TLS",
            Protocol::Tcp => "TCP",
            Protocol::Mongo => "MONGO",
            Protocol::Redis => "REDIS",
            Protocol::Mysql => "MYSQL",
            Protocol::Udp => "UDP",
            Protocol::Unsupported => "UnsupportedProtocol",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a registry service came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ServiceSource {
    ServiceEntry { name: String },
    Kubernetes { name: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub number: u32,
    pub name: String,
    pub protocol: Protocol,
    /// Kubernetes targetPort (number or container port name), or SE targetPort.
    pub target_port: Option<IntOrString>,
}

/// One host in the registry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Service {
    /// FQDN (`name.ns.svc.cluster.local`) or ServiceEntry host (may be `*.x`).
    pub hostname: String,
    pub namespace: String,
    pub source: ServiceSource,
    pub ports: Vec<ServicePort>,
    pub location: Location,
    pub resolution: Resolution,
    pub addresses: Vec<String>,
    pub endpoints: Vec<WorkloadEntry>,
    /// Pod selector (Kubernetes) or workloadSelector (ServiceEntry).
    pub selector: Option<Labels>,
    pub export_to: Vec<String>,
    /// SPIFFE IDs the server may present (secure naming): service accounts of
    /// the selected workloads plus the ServiceEntry's subjectAltNames.
    pub service_accounts: Vec<String>,
    /// True when the endpoints are mesh workloads (sidecar or gateway) and so
    /// speak Istio mTLS.
    pub mesh_endpoints: bool,
}

impl Service {
    pub fn port(&self, number: u32) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.number == number)
    }
}

/// What kind of proxy runs with a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ProxyKind {
    Sidecar,
    Gateway,
    /// No proxy: not part of the mesh.
    None,
}

#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub kind: Kind,
    /// Pod template labels.
    pub labels: Labels,
    pub annotations: Labels,
    pub service_account: String,
    pub spiffe_id: String,
    pub proxy: ProxyKind,
    #[serde(skip)]
    pub meta: Meta,
}

/// The registry and workloads derived from one config.
#[derive(Debug, Clone, Serialize)]
pub struct Registry {
    pub services: Vec<Service>,
    pub workloads: Vec<Workload>,
    /// Lowercase hostname → indices into `services`, in order: lookups stay
    /// constant-time at 10,000 hosts.
    #[serde(skip)]
    by_host: HashMap<String, Vec<usize>>,
    /// Indices of the services with a wildcard hostname (`*`, `*.a.com`),
    /// in order: what a name not in `by_host` may still match.
    #[serde(skip)]
    wildcards: Vec<usize>,
}

/// Builds `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// Expands a short host name relative to the namespace of the rule that
/// names it: `reviews` in namespace `foo` is `reviews.foo.svc.cluster.local`.
pub fn resolve_host(host: &str, rule_namespace: &str, mesh: &MeshSettings) -> String {
    if host.contains('.') || host == "*" || host.is_empty() {
        host.to_owned()
    } else {
        format!("{host}.{rule_namespace}.svc.{}", mesh.cluster_domain)
    }
}

/// `exportTo` semantics: empty means everywhere; `.` the own namespace; `*`
/// everywhere; `~` nowhere; otherwise the named namespaces.
pub fn exported_to(export_to: &[String], own_namespace: &str, target: &str) -> bool {
    export_to.is_empty()
        || export_to.iter().any(|e| match e.as_str() {
            "*" => true,
            "." => own_namespace == target,
            "~" => false,
            ns => ns == target,
        })
}

/// Does `host` (possibly `*.x`) cover `name`? `*.example.com` covers
/// `a.example.com` but not `example.com`; `*` covers everything.
pub fn host_matches(pattern: &str, name: &str) -> bool {
    if pattern == "*" || pattern.eq_ignore_ascii_case(name) {
        return true;
    }
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            name.len() > suffix.len() + 1
                && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
        }
        None => false,
    }
}

/// Do two host patterns overlap (either covers the other)?
pub fn hosts_overlap(a: &str, b: &str) -> bool {
    host_matches(a, b) || host_matches(b, a)
}

/// Which proxy Istio's injector gives a pod template in a namespace
/// labelled `ns_labels`: the gateway template (`inject.istio.io/templates:
/// gateway`, or a hand-written gateway running only an `istio-proxy`
/// container), a sidecar, or none. `meshgate kube-inject`, the injection
/// webhook and the registry all ask this.
pub fn proxy_kind(
    ns_labels: Option<&Labels>,
    labels: &Labels,
    annotations: &Labels,
    containers: &[&str],
) -> ProxyKind {
    if is_gateway(annotations, containers) {
        ProxyKind::Gateway
    } else if injected(ns_labels, labels, annotations) {
        ProxyKind::Sidecar
    } else {
        ProxyKind::None
    }
}

/// Istio's injection decision: the pod's `sidecar.istio.io/inject`, then the
/// namespace's `istio-injection` or `istio.io/rev`.
fn injected(ns_labels: Option<&Labels>, labels: &Labels, annotations: &Labels) -> bool {
    let pod_says = labels
        .get("sidecar.istio.io/inject")
        .or_else(|| annotations.get("sidecar.istio.io/inject"))
        .map(String::as_str);
    if pod_says == Some("false") {
        return false;
    }
    let ns_says = ns_labels
        .and_then(|l| l.get("istio-injection"))
        .map(String::as_str);
    if ns_says == Some("disabled") {
        return false;
    }
    ns_says == Some("enabled")
        || ns_labels.is_some_and(|l| l.contains_key("istio.io/rev"))
        || pod_says == Some("true")
}

fn is_gateway(annotations: &Labels, containers: &[&str]) -> bool {
    let template = annotations
        .get("inject.istio.io/templates")
        .is_some_and(|t| t.split(',').any(|t| t.trim() == "gateway"));
    // A hand-written gateway Deployment runs only the proxy container.
    template || containers == ["istio-proxy"]
}

/// Derives workloads from Deployments and bare Pods.
pub fn workloads(config: &Config, mesh: &MeshSettings) -> Vec<Workload> {
    config
        .workloads
        .iter()
        .map(|w| {
            let t = &w.spec;
            let sa = t
                .pod
                .service_account_name
                .clone()
                .or_else(|| t.pod.service_account.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_owned());
            let ns_labels = config
                .namespaces
                .iter()
                .find(|n| n.meta.name == w.meta.namespace)
                .map(|n| &n.meta.labels);
            let containers: Vec<&str> = t.pod.containers.iter().map(|c| c.name.as_str()).collect();
            let proxy = proxy_kind(ns_labels, &t.pod_labels, &t.pod_annotations, &containers);
            Workload {
                name: w.meta.name.clone(),
                namespace: w.meta.namespace.clone(),
                kind: w.meta.kind,
                labels: t.pod_labels.clone(),
                annotations: t.pod_annotations.clone(),
                spiffe_id: spiffe_id(&mesh.trust_domain, &w.meta.namespace, &sa),
                service_account: sa,
                proxy,
                meta: w.meta.clone(),
            }
        })
        .collect()
}

/// Builds the registry: Kubernetes Services first, then ServiceEntry hosts.
/// A ServiceEntry host equal to a Kubernetes Service host only adds its
/// subjectAltNames, as in Istio.
pub fn build(config: &Config, mesh: &MeshSettings) -> Registry {
    let workloads = workloads(config, mesh);
    let mut services: Vec<Service> = Vec::new();
    for svc in &config.services {
        let ns = &svc.meta.namespace;
        let selector = svc.spec.selector.clone();
        let selected: Vec<&Workload> = workloads
            .iter()
            .filter(|w| {
                &w.namespace == ns
                    && selector
                        .as_ref()
                        .is_some_and(|s| !s.is_empty() && labels_match(s, &w.labels))
            })
            .collect();
        let accounts: BTreeSet<String> = selected.iter().map(|w| w.spiffe_id.clone()).collect();
        // A named targetPort is the selected pods' container port of that
        // name (Istio's endpoints are pod address:target port).
        let container_port = |name: &str| {
            config
                .workloads
                .iter()
                .filter(|r| {
                    selected
                        .iter()
                        .any(|w| w.namespace == r.meta.namespace && w.name == r.meta.name)
                })
                .flat_map(|r| r.spec.pod.containers.iter().flat_map(|c| c.ports.iter()))
                .find(|p| p.name.as_deref() == Some(name))
                .map(|p| IntOrString::Int(p.container_port))
        };
        services.push(Service {
            hostname: format!("{}.{ns}.svc.{}", svc.meta.name, mesh.cluster_domain),
            namespace: ns.clone(),
            source: ServiceSource::Kubernetes {
                name: svc.meta.name.clone(),
            },
            ports: svc
                .spec
                .ports
                .iter()
                .map(|p| ServicePort {
                    number: p.port,
                    name: p.name.clone(),
                    protocol: Protocol::from_kube_port(&p.name, p.app_protocol.as_deref()),
                    target_port: match &p.target_port {
                        Some(IntOrString::String(name)) => {
                            container_port(name).or_else(|| p.target_port.clone())
                        }
                        other => other.clone(),
                    },
                })
                .collect(),
            location: Location::MeshInternal,
            resolution: Resolution::Static,
            addresses: svc
                .spec
                .cluster_ip
                .iter()
                .filter(|ip| ip.as_str() != "None")
                .cloned()
                .collect(),
            endpoints: Vec::new(),
            selector,
            export_to: svc
                .meta
                .annotations
                .get("networking.istio.io/exportTo")
                .map(|s| s.split(',').map(|e| e.trim().to_owned()).collect())
                .unwrap_or_default(),
            service_accounts: accounts.into_iter().collect(),
            mesh_endpoints: !selected.is_empty()
                && selected.iter().all(|w| w.proxy != ProxyKind::None),
        });
    }
    // Kubernetes Services by host name (the first of each): a ServiceEntry
    // for one adds to it. A map, not a scan per host (10,000 ServiceEntry
    // hosts made the scan quadratic: 0.3 s of every load).
    let mut kube_services: HashMap<String, usize> = HashMap::new();
    for (i, s) in services.iter().enumerate() {
        kube_services.entry(s.hostname.clone()).or_insert(i);
    }
    for se in &config.service_entries {
        let ns = &se.meta.namespace;
        for host in &se.spec.hosts {
            if let Some(&i) = kube_services.get(host.as_str()) {
                services[i]
                    .service_accounts
                    .extend(se.spec.subject_alt_names.iter().cloned());
                continue;
            }
            let selector = se.spec.workload_selector.as_ref().map(|s| s.labels.clone());
            let mut accounts: BTreeSet<String> =
                se.spec.subject_alt_names.iter().cloned().collect();
            let mut mesh_endpoints = false;
            if let Some(sel) = &selector {
                let selected: Vec<&Workload> = workloads
                    .iter()
                    .filter(|w| &w.namespace == ns && labels_match(sel, &w.labels))
                    .collect();
                accounts.extend(selected.iter().map(|w| w.spiffe_id.clone()));
                mesh_endpoints =
                    !selected.is_empty() && selected.iter().all(|w| w.proxy != ProxyKind::None);
            }
            for ep in &se.spec.endpoints {
                if !ep.service_account.is_empty() {
                    accounts.insert(spiffe_id(&mesh.trust_domain, ns, &ep.service_account));
                }
            }
            services.push(Service {
                hostname: host.clone(),
                namespace: ns.clone(),
                source: ServiceSource::ServiceEntry {
                    name: se.meta.name.clone(),
                },
                ports: se
                    .spec
                    .ports
                    .iter()
                    .map(|p| ServicePort {
                        number: p.number,
                        name: p.name.clone(),
                        protocol: Protocol::parse(&p.protocol),
                        target_port: p.target_port.map(IntOrString::Int),
                    })
                    .collect(),
                location: se.spec.location,
                resolution: se.spec.resolution,
                addresses: se.spec.addresses.clone(),
                endpoints: se.spec.endpoints.clone(),
                selector,
                export_to: se.spec.export_to.clone(),
                service_accounts: accounts.into_iter().collect(),
                mesh_endpoints: mesh_endpoints && se.spec.location == Location::MeshInternal,
            });
        }
    }
    if !mesh.trust_domain_aliases.is_empty() {
        for s in &mut services {
            s.service_accounts = s
                .service_accounts
                .iter()
                .flat_map(|id| mesh.expand_spiffe_id(id))
                .collect();
        }
    }
    let mut by_host: HashMap<String, Vec<usize>> = HashMap::new();
    let mut wildcards = Vec::new();
    for (i, s) in services.iter().enumerate() {
        if s.hostname.starts_with('*') {
            wildcards.push(i);
        }
        by_host
            .entry(s.hostname.to_ascii_lowercase())
            .or_default()
            .push(i);
    }
    Registry {
        services,
        workloads,
        by_host,
        wildcards,
    }
}

impl Registry {
    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.workloads
            .iter()
            .find(|w| w.namespace == namespace && w.name == name)
    }

    /// Services visible from `namespace` (exportTo), in registry order.
    pub fn visible_from<'a>(
        &'a self,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a Service> + 'a {
        self.services
            .iter()
            .filter(move |s| exported_to(&s.export_to, &s.namespace, namespace))
    }

    /// The visible service for an exact host name. When several namespaces
    /// define the host, the client's own namespace wins, then the oldest.
    pub fn lookup(&self, host: &str, from_namespace: &str) -> Option<&Service> {
        let mut candidates = self
            .named(host)
            .filter(|s| exported_to(&s.export_to, &s.namespace, from_namespace));
        let first = candidates.next()?;
        if first.namespace == from_namespace {
            return Some(first);
        }
        Some(
            candidates
                .find(|s| s.namespace == from_namespace)
                .unwrap_or(first),
        )
    }

    /// Any service with this host, whether or not it is visible.
    pub fn lookup_any(&self, host: &str) -> Option<&Service> {
        self.named(host).next()
    }

    /// The services with a wildcard hostname, in order.
    pub fn wildcard_services(&self) -> impl Iterator<Item = &Service> + '_ {
        self.wildcards.iter().map(|i| &self.services[*i])
    }

    /// The services with exactly this hostname (any case), in order.
    pub fn named<'a>(&'a self, host: &str) -> impl Iterator<Item = &'a Service> + 'a {
        self.by_host
            .get(&host.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .map(|i| &self.services[*i])
    }

    /// Services whose pod selector selects this workload.
    pub fn services_of<'a>(&'a self, w: &'a Workload) -> impl Iterator<Item = &'a Service> + 'a {
        // Kubernetes Services come first (`build`): the ServiceEntry hosts
        // after them, thousands at scale, are never walked.
        let kubernetes = |s: &&Service| matches!(s.source, ServiceSource::Kubernetes { .. });
        self.services
            .iter()
            .take_while(kubernetes)
            .filter(move |s| {
                s.namespace == w.namespace
                    && s.selector
                        .as_ref()
                        .is_some_and(|sel| !sel.is_empty() && labels_match(sel, &w.labels))
            })
    }
}

#[cfg(test)]
mod tests;

/// Each Kubernetes Service port's ready endpoints from its EndpointSlices,
/// as `name.ns.svc.<cluster domain>:<service port>` → pod `ip:port` (the
/// slice's port of the same name: the targetPort, resolved by the endpoints
/// controller). A Service without slices is not in the map (it resolves by
/// DNS). What the proxies dial for mesh Services, as Envoy's EDS.
pub fn service_endpoints(
    config: &Config,
    mesh: &MeshSettings,
) -> std::collections::HashMap<String, Vec<std::net::SocketAddr>> {
    let mut out = std::collections::HashMap::new();
    for svc in &config.services {
        let ns = &svc.meta.namespace;
        let slices: Vec<_> = config
            .endpoint_slices
            .iter()
            .filter(|s| {
                s.meta.namespace == *ns
                    && s.meta.labels.get("kubernetes.io/service-name") == Some(&svc.meta.name)
            })
            .collect();
        if slices.is_empty() {
            continue;
        }
        let host = format!("{}.{ns}.svc.{}", svc.meta.name, mesh.cluster_domain);
        for sp in &svc.spec.ports {
            let mut addrs = Vec::new();
            for slice in &slices {
                let port = slice.spec.ports.iter().find(|p| {
                    p.name.as_deref().unwrap_or("") == sp.name.as_str() && p.port.is_some()
                });
                let Some(port) = port
                    .and_then(|p| p.port)
                    .and_then(|p| u16::try_from(p).ok())
                else {
                    continue;
                };
                let ready = slice
                    .spec
                    .endpoints
                    .iter()
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false));
                for e in ready {
                    addrs.extend(
                        e.addresses
                            .iter()
                            .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
                            .map(|ip| std::net::SocketAddr::new(ip, port)),
                    );
                }
            }
            out.insert(format!("{host}:{}", sp.port), addrs);
        }
    }
    out
}
