//! Istio's MeshConfig: the mesh-wide settings of `istiod` (the `mesh` key of
//! the `istio` ConfigMap, or `meshConfig` of an install). meshgate reads the
//! fields that change what its proxies do: `trustDomain`, `rootNamespace`,
//! `outboundTrafficPolicy` (the default where no Sidecar sets one) and
//! `pathNormalization` and `protocolDetectionTimeout`. Other MeshConfig
//! fields are accepted and reported
//! as not read; a wrong value in a field meshgate reads is an error naming
//! the file, line and field.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::common::Duration;
use crate::model::networking::OutboundMode;
use crate::yaml::{self, Node, Value};

/// Istio's defaults that meshgate assumes unless a MeshConfig says
/// otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshSettings {
    pub trust_domain: String,
    /// Other trust domains the mesh's identities also go by (a migration):
    /// policies and secure naming accept each.
    pub trust_domain_aliases: Vec<String>,
    /// `defaultConfig.proxyMetadata` turns on DNS capture with address
    /// auto-allocation: ServiceEntries without addresses get one.
    pub dns_auto_allocate: bool,
    pub root_namespace: String,
    /// DNS suffix of Kubernetes Services.
    pub cluster_domain: String,
    /// Where no Sidecar resource says: Istio's default is ALLOW_ANY.
    pub outbound_traffic_policy: OutboundMode,
    pub path_normalization: PathNormalization,
    /// `protocolDetectionTimeout`: how long a proxy that tells mesh mTLS
    /// from plaintext by the client's first bytes waits for them before it
    /// takes a silent client (a server-first protocol: MySQL, SMTP) as
    /// plaintext TCP. None: Istio's default, `0s`, no such timeout.
    pub protocol_detection_timeout: Option<std::time::Duration>,
}

impl MeshSettings {
    /// The trust domain and its aliases, the local one first.
    pub fn trust_domains(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.trust_domain.as_str())
            .chain(self.trust_domain_aliases.iter().map(String::as_str))
    }

    /// A policy principal (`td/ns/x/sa/y`) as Istio expands it: one of
    /// the mesh's trust domains, or `cluster.local` (Istio's name for the
    /// local one), stands for each of them; a principal that starts with
    /// `*` or names another trust domain stays as it is.
    pub fn expand_principal(&self, principal: &str) -> Vec<String> {
        let bare = principal.trim_start_matches("spiffe://");
        let Some((td, rest)) = bare.split_once('/') else {
            return vec![principal.to_owned()];
        };
        let ours = td == "cluster.local" || self.trust_domains().any(|t| t == td);
        if bare.starts_with('*') || !ours {
            return vec![principal.to_owned()];
        }
        self.trust_domains()
            .map(|t| format!("{t}/{rest}"))
            .collect()
    }

    /// A SPIFFE ID of the local trust domain and the same ID in each alias
    /// (secure naming accepts a peer of any of them).
    pub fn expand_spiffe_id(&self, id: &str) -> Vec<String> {
        let local = format!("spiffe://{}/", self.trust_domain);
        match id.strip_prefix(&local) {
            Some(rest) => self
                .trust_domains()
                .map(|t| format!("spiffe://{t}/{rest}"))
                .collect(),
            None => vec![id.to_owned()],
        }
    }
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings {
            trust_domain: "cluster.local".to_owned(),
            trust_domain_aliases: Vec::new(),
            dns_auto_allocate: false,
            root_namespace: "istio-system".to_owned(),
            cluster_domain: "cluster.local".to_owned(),
            outbound_traffic_policy: OutboundMode::AllowAny,
            path_normalization: PathNormalization::Base,
            protocol_detection_timeout: None,
        }
    }
}

/// MeshConfig `pathNormalization.normalization`: what the proxies do to a
/// request's path before routing and authorization (and forward).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    /// As received (only `%00` is refused).
    None,
    /// RFC 3986: dot segments resolved, unreserved `%XX` decoded, `\` to
    /// `/`. Istio's default.
    #[default]
    Base,
    /// BASE, then `//` merged.
    MergeSlashes,
    /// `%2F` and `%5C` decoded first, then MERGE_SLASHES.
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    pub fn as_str(self) -> &'static str {
        match self {
            PathNormalization::None => "NONE",
            PathNormalization::Base => "BASE",
            PathNormalization::MergeSlashes => "MERGE_SLASHES",
            PathNormalization::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        }
    }
}

/// A MeshConfig that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MeshConfigError {
    // The I/O error is part of the message, not a separate cause.
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{file}:{line}: {message}")]
    Invalid {
        file: String,
        line: u32,
        message: String,
    },
}

/// The fields meshgate reads; the rest of MeshConfig is kept as opaque.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MeshConfigDoc {
    trust_domain: Option<String>,
    trust_domain_aliases: Option<Vec<String>>,
    default_config: Option<DefaultConfigDoc>,
    root_namespace: Option<String>,
    outbound_traffic_policy: Option<OutboundTrafficPolicyDoc>,
    path_normalization: Option<PathNormalizationDoc>,
    protocol_detection_timeout: Option<Duration>,
}

/// ProxyConfig: only `proxyMetadata` is read, and only its DNS flags.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DefaultConfigDoc {
    #[serde(default)]
    proxy_metadata: std::collections::BTreeMap<String, MetadataValue>,
}

/// A proxyMetadata value: a string, or anything else (not read).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MetadataValue {
    Text(String),
    Other(serde::de::IgnoredAny),
}

impl DefaultConfigDoc {
    /// Istio's analyzers: DNS capture on, and auto-allocation on by either
    /// flag.
    fn dns_auto_allocate(&self) -> bool {
        let on = |k: &str| matches!(self.proxy_metadata.get(k), Some(MetadataValue::Text(v)) if v == "true");
        on("ISTIO_META_DNS_CAPTURE")
            && (on("ISTIO_META_DNS_AUTO_ALLOCATE") || on("PILOT_ENABLE_IP_AUTOALLOCATE"))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboundTrafficPolicyDoc {
    #[serde(default)]
    mode: Option<OutboundMode>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathNormalizationDoc {
    #[serde(default)]
    normalization: Option<PathNormalization>,
}

/// The MeshConfig fields meshgate reads (the others are accepted, not read).
const READ: [&str; 6] = [
    "trustDomain",
    "trustDomainAliases",
    "rootNamespace",
    "outboundTrafficPolicy",
    "pathNormalization",
    "protocolDetectionTimeout",
];

/// Reads a MeshConfig file: a MeshConfig document, or the `istio`
/// ConfigMap with it under `data.mesh`. Returns the settings and the
/// MeshConfig fields present but not read by meshgate.
pub fn load_mesh_config(path: &Path) -> Result<(MeshSettings, Vec<String>), MeshConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| MeshConfigError::Io {
        path: shown.clone(),
        error,
    })?;
    parse_mesh_config(&shown, &text)
}

/// `load_mesh_config` on text; `file` names it in errors.
pub fn parse_mesh_config(
    file: &str,
    text: &str,
) -> Result<(MeshSettings, Vec<String>), MeshConfigError> {
    let invalid = |line: u32, message: String| MeshConfigError::Invalid {
        file: file.to_owned(),
        line,
        message,
    };
    let docs = yaml::parse_documents(text).map_err(|e| invalid(e.pos.line, e.message))?;
    let Some(root) = docs
        .into_iter()
        .map(|d| d.root)
        .find(|r| r.value != Value::Null)
    else {
        return Ok((MeshSettings::default(), Vec::new()));
    };
    // The istio ConfigMap: MeshConfig is the YAML text under data.mesh.
    if root.get("kind").and_then(Node::as_str) == Some("ConfigMap") {
        let mesh = root.locate("data.mesh");
        let Some(inner) = mesh.as_str() else {
            return Err(invalid(
                root.pos.line,
                "ConfigMap has no data.mesh".to_owned(),
            ));
        };
        // Lines inside `data.mesh` are counted from where its text starts.
        return parse_mesh_config(
            &format!("{file} (data.mesh at line {})", mesh.pos.line),
            inner,
        );
    }
    let doc: MeshConfigDoc = yaml::from_node(&root).map_err(|e| {
        let line = e.pos.map_or(root.pos.line, |p| p.line);
        invalid(
            line,
            format!("MeshConfig field {}: {}", e.path(), e.message),
        )
    })?;
    let ignored = match &root.value {
        Value::Map(entries) => entries
            .iter()
            .filter_map(|(k, _)| k.as_str())
            .filter(|k| !READ.contains(k))
            .map(str::to_owned)
            .collect(),
        _ => {
            return Err(invalid(
                root.pos.line,
                "MeshConfig must be a map".to_owned(),
            ));
        }
    };
    let detection = doc.protocol_detection_timeout.map(Duration::as_std);
    // Istio's validation: at least 1ms, or 0s for none.
    if detection.is_some_and(|d| !d.is_zero() && d < std::time::Duration::from_millis(1)) {
        let line = root
            .get("protocolDetectionTimeout")
            .map_or(root.pos.line, |n| n.pos.line);
        return Err(invalid(
            line,
            "MeshConfig field protocolDetectionTimeout: must be at least 1ms, or 0s for none"
                .to_owned(),
        ));
    }
    let defaults = MeshSettings::default();
    let settings = MeshSettings {
        trust_domain: doc.trust_domain.unwrap_or(defaults.trust_domain),
        trust_domain_aliases: doc.trust_domain_aliases.unwrap_or_default(),
        dns_auto_allocate: doc
            .default_config
            .as_ref()
            .is_some_and(DefaultConfigDoc::dns_auto_allocate),
        root_namespace: doc.root_namespace.unwrap_or(defaults.root_namespace),
        cluster_domain: defaults.cluster_domain,
        outbound_traffic_policy: doc
            .outbound_traffic_policy
            .and_then(|p| p.mode)
            // MeshConfig's enum starts at REGISTRY_ONLY too, but an absent
            // mode in an install means Istio's default.
            .unwrap_or(defaults.outbound_traffic_policy),
        path_normalization: doc
            .path_normalization
            .and_then(|p| p.normalization)
            .unwrap_or_default(),
        protocol_detection_timeout: detection.filter(|d| !d.is_zero()),
    };
    Ok((settings, ignored))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fields_that_matter_and_names_the_rest() {
        let (m, ignored) = parse_mesh_config(
            "mesh.yaml",
            "accessLogFile: /dev/stdout\npathNormalization:\n  normalization: MERGE_SLASHES\noutboundTrafficPolicy: {mode: REGISTRY_ONLY}\ntrustDomain: example.org\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.path_normalization, PathNormalization::MergeSlashes);
        assert_eq!(m.outbound_traffic_policy, OutboundMode::RegistryOnly);
        assert_eq!(m.trust_domain, "example.org");
        assert_eq!(m.root_namespace, "istio-system");
        assert_eq!(ignored, ["accessLogFile"]);
    }

    #[test]
    fn trust_domain_aliases_expand_principals_and_identities() {
        let (m, _) = parse_mesh_config(
            "mesh.yaml",
            "trustDomain: new.example\ntrustDomainAliases: [old.example]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let both = ["new.example/ns/a/sa/b", "old.example/ns/a/sa/b"];
        assert_eq!(m.expand_principal("old.example/ns/a/sa/b"), both);
        assert_eq!(m.expand_principal("cluster.local/ns/a/sa/b"), both);
        assert_eq!(m.expand_principal("*/ns/a/sa/b"), ["*/ns/a/sa/b"]);
        assert_eq!(
            m.expand_principal("other.example/ns/a/sa/b"),
            ["other.example/ns/a/sa/b"]
        );
        assert_eq!(
            m.expand_spiffe_id("spiffe://new.example/ns/a/sa/b"),
            [
                "spiffe://new.example/ns/a/sa/b",
                "spiffe://old.example/ns/a/sa/b"
            ]
        );
    }

    #[test]
    fn protocol_detection_timeout_is_read_and_checked() {
        let read = |text: &str| parse_mesh_config("mesh.yaml", text).map(|(m, _)| m);
        let m = read("protocolDetectionTimeout: 250ms\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            m.protocol_detection_timeout,
            Some(std::time::Duration::from_millis(250))
        );
        let off = read("protocolDetectionTimeout: 0s\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(off.protocol_detection_timeout, None);
        let err = read("trustDomain: x\nprotocolDetectionTimeout: 100us\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with(
                "mesh.yaml:2: MeshConfig field protocolDetectionTimeout: must be at least 1ms"
            ),
            "{err}"
        );
    }

    #[test]
    fn reads_the_istio_configmap() {
        let (m, _) = parse_mesh_config(
            "cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |-\n    pathNormalization:\n      normalization: NONE\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.path_normalization, PathNormalization::None);
    }

    #[test]
    fn a_bad_value_names_file_and_line() {
        let err = parse_mesh_config(
            "mesh.yaml",
            "trustDomain: x\npathNormalization:\n  normalization: MERGE\n",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.starts_with("mesh.yaml:3: MeshConfig field pathNormalization.normalization:"),
            "{err}"
        );
        assert!(err.contains("MERGE"), "{err}");
        assert_eq!(
            parse_mesh_config("empty.yaml", "").ok(),
            Some((MeshSettings::default(), Vec::new()))
        );
    }
}
