//! The typed config model: every resource kind meshgate reads, with the file
//! and line it came from.

pub mod common;
pub mod kube;
pub mod networking;
pub mod security;

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::yaml::Node;
pub use common::{Duration, Labels, labels_match};

/// The resource kinds meshgate understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Namespace,
    ServiceAccount,
    Service,
    EndpointSlice,
    Pod,
    Deployment,
    ServiceEntry,
    VirtualService,
    DestinationRule,
    Gateway,
    Sidecar,
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
}

impl Kind {
    /// Every kind, in the order above.
    pub const ALL: [Kind; 14] = [
        Kind::Namespace,
        Kind::ServiceAccount,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::Deployment,
        Kind::ServiceEntry,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::Gateway,
        Kind::Sidecar,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::RequestAuthentication,
    ];

    /// Finds the kind for an `apiVersion`/`kind` pair. `Ok(None)` means a kind
    /// we do not read (skipped with a warning); `Err` names the supported
    /// versions when the group is ours but the version is not.
    pub fn resolve(api_version: &str, kind: &str) -> Result<Option<Kind>, String> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let Some(k) = Kind::ALL
            .into_iter()
            .find(|k| k.group() == group && k.as_str() == kind)
        else {
            return Ok(None);
        };
        if k.versions().contains(&version) {
            Ok(Some(k))
        } else {
            Err(format!(
                "apiVersion \"{api_version}\" is not supported for {kind}; use one of: {}",
                k.versions()
                    .iter()
                    .map(|v| if group.is_empty() {
                        (*v).to_owned()
                    } else {
                        format!("{group}/{v}")
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }

    /// For a kind meshgate does not read: the error when `kind` is not a
    /// kind of its API group at all, though the group is one meshgate
    /// knows (Istio's, or the Kubernetes groups it reads), as kubectl would
    /// refuse it, with the nearest real kind. `None` for a real kind that
    /// is merely not read, or a group meshgate does not know.
    pub fn unknown_in_known_group(api_version: &str, kind: &str) -> Option<String> {
        let (group, _) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let (_, kinds) = KNOWN_GROUPS.iter().find(|(g, _)| *g == group)?;
        if kinds.contains(&kind) {
            return None;
        }
        let group_name = if group.is_empty() { "core" } else { group };
        let mut message = format!("no kind \"{kind}\" in API group {group_name} ({api_version})");
        if let Some(near) = nearest(kind, kinds) {
            message.push_str(&format!("; did you mean {near}?"));
        }
        Some(message)
    }

    /// The API group (`""` for the core group).
    pub fn group(self) -> &'static str {
        match self {
            Kind::ServiceEntry
            | Kind::VirtualService
            | Kind::DestinationRule
            | Kind::Gateway
            | Kind::Sidecar => "networking.istio.io",
            Kind::AuthorizationPolicy | Kind::PeerAuthentication | Kind::RequestAuthentication => {
                "security.istio.io"
            }
            Kind::Deployment => "apps",
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::Namespace | Kind::ServiceAccount | Kind::Service | Kind::Pod => "",
        }
    }

    /// The API versions meshgate reads, oldest first; all share one schema.
    pub fn versions(self) -> &'static [&'static str] {
        match self.group() {
            "networking.istio.io" => &["v1alpha3", "v1beta1", "v1"],
            "security.istio.io" => &["v1beta1", "v1"],
            _ => &["v1"],
        }
    }

    /// Istio's own kinds, which a cluster knows only by CustomResourceDefinition.
    pub fn is_istio(self) -> bool {
        self.group().ends_with(".istio.io")
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Deployment => "Deployment",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::Gateway => "Gateway",
            Kind::Sidecar => "Sidecar",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::RequestAuthentication => "RequestAuthentication",
        }
    }

    /// Cluster-scoped kinds have no namespace.
    pub fn namespaced(self) -> bool {
        self != Kind::Namespace
    }
}

/// The API groups meshgate knows, each with every kind it has (read by
/// meshgate or not), as the API server serves them.
const KNOWN_GROUPS: &[(&str, &[&str])] = &[
    (
        "networking.istio.io",
        &[
            "DestinationRule",
            "EnvoyFilter",
            "Gateway",
            "ProxyConfig",
            "ServiceEntry",
            "Sidecar",
            "VirtualService",
            "WorkloadEntry",
            "WorkloadGroup",
        ],
    ),
    (
        "security.istio.io",
        &[
            "AuthorizationPolicy",
            "PeerAuthentication",
            "RequestAuthentication",
        ],
    ),
    ("telemetry.istio.io", &["Telemetry"]),
    ("extensions.istio.io", &["WasmPlugin"]),
    (
        "",
        &[
            "Binding",
            "ComponentStatus",
            "ConfigMap",
            "Endpoints",
            "Event",
            "LimitRange",
            "List",
            "Namespace",
            "Node",
            "PersistentVolume",
            "PersistentVolumeClaim",
            "Pod",
            "PodTemplate",
            "ReplicationController",
            "ResourceQuota",
            "Secret",
            "Service",
            "ServiceAccount",
        ],
    ),
    (
        "apps",
        &[
            "ControllerRevision",
            "DaemonSet",
            "Deployment",
            "ReplicaSet",
            "StatefulSet",
        ],
    ),
    ("discovery.k8s.io", &["EndpointSlice"]),
];

/// The kind in `kinds` closest to `kind` (case aside, or a few letters
/// off), if one is close enough to be a typo.
fn nearest(kind: &str, kinds: &[&'static str]) -> Option<&'static str> {
    let lower = kind.to_ascii_lowercase();
    kinds
        .iter()
        .map(|k| (edit_distance(&lower, &k.to_ascii_lowercase()), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over bytes (kinds are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != cb);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a resource was read from. The parsed tree is kept so that analyzers
/// can point at the line of the exact field they report.
#[derive(Clone)]
pub struct SourceRef {
    /// The file name as shown to the user (relative to the folder given).
    pub file: Arc<str>,
    pub line: u32,
    pub node: Arc<Node>,
}

impl SourceRef {
    /// The line of a field path such as `spec.http[0].route`, or of its
    /// closest existing parent.
    pub fn line_of(&self, path: &str) -> u32 {
        self.node.locate(path).pos.line
    }
}

impl fmt::Debug for SourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

impl Serialize for SourceRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}:{}", self.file, self.line))
    }
}

/// Identity and origin of one resource.
#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    pub kind: Kind,
    pub api_version: String,
    pub name: String,
    /// Empty only for cluster-scoped kinds; `default` when the file omits it.
    pub namespace: String,
    pub labels: Labels,
    pub annotations: Labels,
    pub source: SourceRef,
}

impl Meta {
    /// `namespace/name`, or `name` for cluster-scoped kinds.
    pub fn full_name(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

/// A resource of one kind: its metadata and typed spec.
#[derive(Debug, Clone, Serialize)]
pub struct Resource<T> {
    pub meta: Meta,
    pub spec: T,
}

/// A Kubernetes workload template, from a Deployment or a bare Pod.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadTemplate {
    pub pod_labels: Labels,
    pub pod_annotations: Labels,
    pub selector: Labels,
    pub pod: kube::PodSpec,
}

/// Everything loaded from a set of files: the input to every pure function
/// in this crate (registry, proxy view, analyzers).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Config {
    pub namespaces: Vec<Resource<()>>,
    pub service_accounts: Vec<Resource<()>>,
    pub services: Vec<Resource<kube::ServiceSpec>>,
    /// Where Services' pods are (an endpoints controller writes them).
    pub endpoint_slices: Vec<Resource<kube::EndpointSliceFields>>,
    /// Deployments and bare Pods, in file order.
    pub workloads: Vec<Resource<WorkloadTemplate>>,
    pub service_entries: Vec<Resource<networking::ServiceEntry>>,
    pub virtual_services: Vec<Resource<networking::VirtualService>>,
    pub destination_rules: Vec<Resource<networking::DestinationRule>>,
    pub gateways: Vec<Resource<networking::Gateway>>,
    pub sidecars: Vec<Resource<networking::Sidecar>>,
    pub authorization_policies: Vec<Resource<security::AuthorizationPolicy>>,
    pub peer_authentications: Vec<Resource<security::PeerAuthentication>>,
    pub request_authentications: Vec<Resource<security::RequestAuthentication>>,
}

impl Config {
    /// One line per kind that is present, e.g. `2 namespaces, 2 workloads, ...`.
    pub fn summary(&self) -> String {
        let counts = [
            (self.namespaces.len(), "namespace", "namespaces"),
            (self.workloads.len(), "workload", "workloads"),
            (self.services.len(), "Service", "Services"),
            (
                self.endpoint_slices.len(),
                "EndpointSlice",
                "EndpointSlices",
            ),
            (
                self.service_accounts.len(),
                "ServiceAccount",
                "ServiceAccounts",
            ),
            (self.service_entries.len(), "ServiceEntry", "ServiceEntries"),
            (
                self.virtual_services.len(),
                "VirtualService",
                "VirtualServices",
            ),
            (
                self.destination_rules.len(),
                "DestinationRule",
                "DestinationRules",
            ),
            (self.gateways.len(), "Gateway", "Gateways"),
            (self.sidecars.len(), "Sidecar", "Sidecars"),
            (
                self.authorization_policies.len(),
                "AuthorizationPolicy",
                "AuthorizationPolicies",
            ),
            (
                self.peer_authentications.len(),
                "PeerAuthentication",
                "PeerAuthentications",
            ),
            (
                self.request_authentications.len(),
                "RequestAuthentication",
                "RequestAuthentications",
            ),
        ];
        let parts: Vec<String> = counts
            .iter()
            .filter(|(n, _, _)| *n > 0)
            .map(|(n, one, many)| format!("{n} {}", if *n == 1 { one } else { many }))
            .collect();
        if parts.is_empty() {
            "nothing".to_owned()
        } else {
            parts.join(", ")
        }
    }

    /// All resource metas, for analyzers that look across kinds.
    pub fn metas(&self) -> impl Iterator<Item = &Meta> {
        self.namespaces
            .iter()
            .map(|r| &r.meta)
            .chain(self.service_accounts.iter().map(|r| &r.meta))
            .chain(self.services.iter().map(|r| &r.meta))
            .chain(self.endpoint_slices.iter().map(|r| &r.meta))
            .chain(self.workloads.iter().map(|r| &r.meta))
            .chain(self.service_entries.iter().map(|r| &r.meta))
            .chain(self.virtual_services.iter().map(|r| &r.meta))
            .chain(self.destination_rules.iter().map(|r| &r.meta))
            .chain(self.gateways.iter().map(|r| &r.meta))
            .chain(self.sidecars.iter().map(|r| &r.meta))
            .chain(self.authorization_policies.iter().map(|r| &r.meta))
            .chain(self.peer_authentications.iter().map(|r| &r.meta))
            .chain(self.request_authentications.iter().map(|r| &r.meta))
    }

    /// Every resource's meta and its spec as JSON, one resource at a time
    /// (a running proxy tells what a reload changed by them). The same
    /// kinds as `metas`, in the same order.
    pub fn spec_texts(&self) -> impl Iterator<Item = (&Meta, String)> {
        fn text<T: Serialize>(r: &Resource<T>) -> (&Meta, String) {
            (&r.meta, serde_json::to_string(&r.spec).unwrap_or_default())
        }
        self.namespaces
            .iter()
            .map(text)
            .chain(self.service_accounts.iter().map(text))
            .chain(self.services.iter().map(text))
            .chain(self.endpoint_slices.iter().map(text))
            .chain(self.workloads.iter().map(text))
            .chain(self.service_entries.iter().map(text))
            .chain(self.virtual_services.iter().map(text))
            .chain(self.destination_rules.iter().map(text))
            .chain(self.gateways.iter().map(text))
            .chain(self.sidecars.iter().map(text))
            .chain(self.authorization_policies.iter().map(text))
            .chain(self.peer_authentications.iter().map(text))
            .chain(self.request_authentications.iter().map(text))
    }
}
