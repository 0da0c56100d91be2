//! From the watched objects to the config model: each object goes through
//! the same loader and validation as a file, so the cluster and
//! `meshgate check` agree on what is valid.
//!
//! An object is loaded as the YAML `kubectl get KIND NAME -o yaml` prints
//! (keys sorted, no managedFields), so the line in a message is the line
//! there; its file is shown as `cluster`.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use meshgate_config::model::Resource;
use meshgate_config::model::networking::Sidecar;
use meshgate_config::registry::{self, Workload};
use meshgate_config::{Config, Diagnostic, Level, Loaded, MeshSettings};

use crate::scope::{self, TRIMMED_KINDS, Trimmed};
use crate::watch::Objects;

/// The name diagnostics give as the file of a watched object.
pub const CLUSTER_FILE: &str = "cluster";

/// Control and proxies share Istio's defaults for the root namespace and
/// the cluster domain.
static MESH: std::sync::LazyLock<MeshSettings> = std::sync::LazyLock::new(MeshSettings::default);

/// A good config, as published to the proxies.
#[derive(Debug)]
pub struct Snapshot {
    /// Counts up from 1 with every published change.
    pub version: u64,
    /// What the objects hash to: unchanged objects publish nothing.
    pub hash: u64,
    pub config: Arc<Config>,
    /// Every object as loaded, for the proxies (each gets those it sees).
    pub documents: Arc<Vec<Document>>,
    /// Warnings found while loading (errors keep a config from being
    /// published at all).
    pub warnings: Vec<Diagnostic>,
    /// What each namespace's proxies are sent, made once per namespace
    /// (push.rs fills it): the hash of the scoped YAML and the encoded line.
    pub pushes: std::sync::Mutex<std::collections::HashMap<String, Arc<ScopedPush>>>,
    /// The workloads by `namespace/name`, made on first use.
    pub workloads: std::sync::OnceLock<std::collections::HashMap<String, Workload>>,
}

impl Snapshot {
    /// Workload `namespace/name`, if its Pod is in this version.
    pub fn workload(&self, name: &str) -> Option<&Workload> {
        self.workloads
            .get_or_init(|| {
                registry::workloads(&self.config, &MESH)
                    .into_iter()
                    .map(|w| (format!("{}/{}", w.namespace, w.name), w))
                    .collect()
            })
            .get(name)
    }

    /// Who is sent the same as `workload`: the proxies of its namespace
    /// under the same trimming Sidecar (scope.rs), if any.
    pub fn scope_key(&self, workload: &str) -> String {
        match self.trimming(workload) {
            (ns, Some(s)) => format!("{ns} {}", s.meta.full_name()),
            (ns, None) => ns.to_owned(),
        }
    }

    /// The documents `workload` is sent, as one YAML stream.
    pub fn yaml_for(&self, workload: &str) -> String {
        let (ns, sidecar) = self.trimming(workload);
        let trimmed = sidecar.map(|s| scope::kept(&self.config, &MESH, s, ns));
        scoped_yaml(&self.documents, ns, trimmed.as_ref())
    }

    fn trimming<'a>(&'a self, workload: &'a str) -> (&'a str, Option<&'a Resource<Sidecar>>) {
        let ns = workload.split_once('/').map_or("", |(ns, _)| ns);
        // Control and proxies share Istio's defaults for the root
        // namespace and cluster domain.
        static MESH: std::sync::LazyLock<MeshSettings> =
            std::sync::LazyLock::new(MeshSettings::default);
        let sidecar = self
            .workload(workload)
            .and_then(|w| scope::trimming_sidecar(&self.config, &MESH, w));
        (ns, sidecar)
    }
}

/// One namespace's view of a version, ready to send.
#[derive(Debug)]
pub struct ScopedPush {
    /// Tells a change for this namespace from a version that changed only
    /// what it does not see.
    pub hash: u64,
    pub line: bytes::Bytes,
}

/// One object as YAML, with what decides who sees it.
#[derive(Debug, Clone)]
pub struct Document {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// `spec.exportTo` (ServiceEntry, VirtualService, DestinationRule).
    pub export_to: Vec<String>,
    pub yaml: String,
}

/// What a compiled state publishes.
#[derive(Debug)]
pub struct Compiled {
    pub config: Config,
    pub documents: Vec<Document>,
    pub warnings: Vec<Diagnostic>,
}

/// Loads every object; `Err` holds the errors when any object is invalid,
/// and then nothing of this state may be published.
pub fn compile(objects: &Objects) -> Result<Compiled, Vec<Diagnostic>> {
    let mut loaded = Loaded::default();
    let mut documents = Vec::with_capacity(objects.objects.len());
    for (key, value) in &objects.objects {
        // Serializing a JSON value to YAML and reading it back cannot fail
        // short of a bug; such an object is an error, never skipped.
        let text = serde_saphyr::to_string(value.as_ref()).unwrap_or_default();
        if let Err(e) = meshgate_config::load::load_str(CLUSTER_FILE, &text, &mut loaded) {
            tracing::error!(error = %e, "a watched object does not read back");
        }
        let export_to = value["spec"]["exportTo"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        documents.push(Document {
            kind: key.kind,
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            export_to,
            yaml: text,
        });
    }
    let (errors, warnings): (Vec<_>, Vec<_>) = loaded
        .diagnostics
        .into_iter()
        .partition(|d| d.level == Level::Error);
    if errors.is_empty() {
        Ok(Compiled {
            config: loaded.config,
            documents,
            warnings,
        })
    } else {
        Err(errors)
    }
}

/// The namespace whose Sidecar, AuthorizationPolicy and PeerAuthentication
/// apply mesh-wide (Istio's root namespace).
pub const ROOT_NAMESPACE: &str = "istio-system";

/// The documents a proxy in `namespace` sees, as one YAML stream: every
/// Kubernetes object (workloads and services anywhere can be its peers),
/// Gateways (named by VirtualServices across namespaces), the services,
/// routes and policies exported to its namespace (`exportTo`: none given or
/// `*` is everyone, `.` its own namespace, `~` no one), and the namespace-
/// scoped Sidecar, AuthorizationPolicy and PeerAuthentication of its own
/// namespace and the root namespace.
pub fn scoped_yaml(
    documents: &[Document],
    namespace: &str,
    trimmed: Option<&HashSet<Trimmed>>,
) -> String {
    let mut out = String::new();
    for d in documents
        .iter()
        .filter(|d| visible(d, namespace) && trimmed.is_none_or(|keep| kept(d, keep)))
    {
        out.push_str("---\n");
        out.push_str(&d.yaml);
    }
    out
}

/// Is `d` among what a trimming Sidecar imports (scope.rs)? Kinds it does
/// not trim always are.
fn kept(d: &Document, keep: &HashSet<Trimmed>) -> bool {
    !TRIMMED_KINDS.iter().any(|k| k.as_str() == d.kind)
        || keep.contains(&(d.kind, d.namespace.clone(), d.name.clone()))
}

fn visible(d: &Document, namespace: &str) -> bool {
    match d.kind {
        "ServiceEntry" | "VirtualService" | "DestinationRule" => {
            d.export_to.is_empty()
                || d.export_to
                    .iter()
                    .any(|e| e == "*" || e == namespace || (e == "." && d.namespace == namespace))
        }
        "Sidecar" | "AuthorizationPolicy" | "PeerAuthentication" => {
            d.namespace == namespace || d.namespace == ROOT_NAMESPACE
        }
        _ => true,
    }
}

/// A hash of what the config says: a Pod's status or an object's
/// resourceVersion changing is not a new config.
pub fn hash(config: &Config) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(config)
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(kind: &'static str, namespace: &str, export_to: &[&str]) -> Document {
        Document {
            kind,
            namespace: namespace.into(),
            name: format!("{kind}-{}", export_to.len()),
            export_to: export_to.iter().map(|e| (*e).to_owned()).collect(),
            yaml: format!("{kind} {namespace} {export_to:?}\n"),
        }
    }

    #[test]
    fn a_proxy_sees_what_is_exported_to_its_namespace_and_its_own_policies() {
        let docs = [
            doc("ServiceEntry", "a", &[]),
            doc("ServiceEntry", "a", &["."]),
            doc("VirtualService", "b", &["a"]),
            doc("VirtualService", "b", &["~"]),
            doc("DestinationRule", "b", &["*"]),
            doc("AuthorizationPolicy", "b", &[]),
            doc("AuthorizationPolicy", ROOT_NAMESPACE, &[]),
            doc("Sidecar", "a", &[]),
            doc("Gateway", "b", &[]),
            doc("Pod", "b", &[]),
        ];
        let seen = |ns: &str| {
            let text = scoped_yaml(&docs, ns, None);
            docs.iter()
                .map(|d| text.contains(&d.yaml))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            seen("a"),
            [true, true, true, false, true, false, true, true, true, true]
        );
        assert_eq!(
            seen("b"),
            [
                true, false, false, false, true, true, true, false, true, true
            ]
        );
    }

    #[test]
    fn a_trimming_sidecar_leaves_out_what_it_does_not_import_of_three_kinds() {
        let docs = [
            doc("ServiceEntry", "a", &[]),
            doc("ServiceEntry", "a", &["."]),
            doc("DestinationRule", "a", &[]),
            doc("Service", "a", &[]),
        ];
        let keep: HashSet<Trimmed> =
            [("ServiceEntry", "a".to_owned(), "ServiceEntry-1".to_owned())]
                .into_iter()
                .collect();
        let text = scoped_yaml(&docs, "a", Some(&keep));
        let sent: Vec<bool> = docs.iter().map(|d| text.contains(&d.yaml)).collect();
        assert_eq!(sent, [false, true, false, true]);
    }
}
