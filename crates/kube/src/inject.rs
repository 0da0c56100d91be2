//! Sidecar injection, as Istio's injector does it, for `meshgate
//! kube-inject` and the control plane's admission webhook: an init
//! container that installs the capture rules (`meshgate iptables`), the
//! proxy container running as uid 1337 with its config and certificate from
//! the control plane, the token and root volumes, and Istio's labels and
//! annotations. Gateways (`inject.istio.io/templates: gateway`) get the
//! proxy filled into their own `istio-proxy` container and no capture.
//!
//! Manifests are handled as JSON values, so every field meshgate does not
//! touch passes through unchanged.

use meshgate_config::model::Labels;
use meshgate_config::registry::{ProxyKind, proxy_kind};
use serde_json::{Value, json};

/// Marks an injected pod (Istio's annotation; injection skips such pods).
pub const STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
const ROOT_DIR: &str = "/var/run/secrets/istio";

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("not YAML: {0}")]
    Yaml(String),
    #[error("document {0}: {1}")]
    Document(usize, String),
}

/// What an injected proxy is told.
#[derive(Debug, Clone)]
pub struct Injector {
    /// The meshgate image for the init and proxy containers.
    pub image: String,
    /// `meshgate control`'s port 15012, as the pods reach it.
    pub control_plane: String,
}

impl Default for Injector {
    fn default() -> Self {
        Injector {
            image: concat!("meshgate:", env!("CARGO_PKG_VERSION")).to_owned(),
            control_plane: "meshgate-control.meshgate-system.svc:15012".to_owned(),
        }
    }
}

/// Kinds with a pod template at `spec.template`.
const TEMPLATED: &[&str] = &[
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
];

impl Injector {
    /// `meshgate kube-inject`: every workload in a YAML stream, as
    /// `istioctl kube-inject` does (namespace labels are not consulted: the
    /// user asked for injection; a pod's `sidecar.istio.io/inject: "false"`
    /// still wins).
    pub fn inject_yaml(&self, input: &str) -> Result<String, InjectError> {
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(input).map_err(|e| InjectError::Yaml(e.to_string()))?;
        let enabled: Labels = [("istio-injection".to_owned(), "enabled".to_owned())].into();
        let mut out = String::new();
        for (i, mut doc) in docs.into_iter().enumerate() {
            if doc.is_null() {
                continue;
            }
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            if kind == "Pod" {
                self.inject_pod(&mut doc, Some(&enabled));
            } else if TEMPLATED.contains(&kind.as_str()) && doc["spec"]["template"].is_object() {
                self.inject_pod(&mut doc["spec"]["template"], Some(&enabled));
            }
            out.push_str("---\n");
            out.push_str(
                &serde_saphyr::to_string(&doc)
                    .map_err(|e| InjectError::Document(i + 1, e.to_string()))?,
            );
        }
        Ok(out)
    }

    /// Injects one pod (or pod template: `metadata` and `spec`) in a
    /// namespace labelled `ns_labels`. Returns what it injected.
    pub fn inject_pod(&self, pod: &mut Value, ns_labels: Option<&Labels>) -> ProxyKind {
        let labels = string_map(&pod["metadata"]["labels"]);
        let annotations = string_map(&pod["metadata"]["annotations"]);
        if annotations.contains_key(STATUS_ANNOTATION) {
            return ProxyKind::None;
        }
        let containers: Vec<&str> = pod["spec"]["containers"]
            .as_array()
            .map(|c| c.iter().filter_map(|c| c["name"].as_str()).collect())
            .unwrap_or_default();
        let kind = proxy_kind(ns_labels, &labels, &annotations, &containers);
        let template = match kind {
            ProxyKind::None => return kind,
            ProxyKind::Sidecar => "sidecar",
            ProxyKind::Gateway => "gateway",
        };
        let spec = &mut pod["spec"];
        if kind == ProxyKind::Sidecar {
            push(spec, "initContainers", self.init_container());
        }
        self.proxy_container(spec, template);
        if kind == ProxyKind::Gateway {
            // Gateway servers bind ports below 1024 as uid 1337.
            let sysctls = &mut spec["securityContext"]["sysctls"];
            if !sysctls.is_array() {
                *sysctls = json!([]);
            }
            push_unique(
                sysctls,
                json!({ "name": "net.ipv4.ip_unprivileged_port_start", "value": "0" }),
                "name",
            );
        }
        push_unique(&mut spec["volumes"], token_volume(), "name");
        push_unique(&mut spec["volumes"], root_volume(), "name");
        self.mark(pod, kind, &labels);
        kind
    }

    fn init_container(&self) -> Value {
        json!({
            "name": "istio-init",
            "image": self.image,
            "args": ["iptables"],
            "securityContext": {
                "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": false,
                "privileged": false, "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": false,
                "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] }
            }
        })
    }

    /// Adds the proxy container, or fills a gateway's own `istio-proxy`.
    fn proxy_container(&self, spec: &mut Value, template: &str) {
        let containers = spec["containers"].as_array_mut();
        let existing = containers.and_then(|c| c.iter_mut().find(|c| c["name"] == "istio-proxy"));
        let proxy = match existing {
            Some(c) => c,
            None => {
                push(spec, "containers", json!({ "name": "istio-proxy" }));
                let last = spec["containers"].as_array_mut().and_then(|c| c.last_mut());
                last.expect("just pushed")
            }
        };
        proxy["image"] = json!(self.image);
        proxy["args"] = json!([
            template,
            "--control-plane",
            self.control_plane,
            "--workload",
            "$(POD_NAMESPACE)/$(POD_NAME)",
            "--service-account",
            "$(SERVICE_ACCOUNT)",
            "--ca-addr",
            self.control_plane,
            "--ca-token-file",
            format!("{TOKEN_DIR}/istio-token"),
            "--ca-root-cert",
            format!("{ROOT_DIR}/root-cert.pem"),
        ]);
        for (name, path) in [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
            ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ] {
            push_unique(
                &mut proxy["env"],
                json!({ "name": name, "valueFrom": { "fieldRef": { "fieldPath": path } } }),
                "name",
            );
        }
        push_unique(
            &mut proxy["ports"],
            json!({ "containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP" }),
            "containerPort",
        );
        push_unique(
            &mut proxy["volumeMounts"],
            json!({ "name": "istio-token", "mountPath": TOKEN_DIR, "readOnly": true }),
            "name",
        );
        push_unique(
            &mut proxy["volumeMounts"],
            json!({ "name": "istiod-ca-cert", "mountPath": ROOT_DIR, "readOnly": true }),
            "name",
        );
        set_default(
            proxy,
            "readinessProbe",
            json!({
                "httpGet": { "path": "/healthz/ready", "port": 15021, "scheme": "HTTP" },
                "initialDelaySeconds": 1, "periodSeconds": 2, "failureThreshold": 30, "timeoutSeconds": 3
            }),
        );
        set_default(
            proxy,
            "securityContext",
            json!({
                "runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": true, "privileged": false,
                "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": { "drop": ["ALL"] }
            }),
        );
        set_default(
            proxy,
            "resources",
            json!({ "requests": { "cpu": "100m", "memory": "128Mi" } }),
        );
    }

    /// Istio's labels and annotations on an injected pod.
    fn mark(&self, pod: &mut Value, kind: ProxyKind, labels: &Labels) {
        let meta = &mut pod["metadata"];
        let name = labels
            .get("service.istio.io/canonical-name")
            .or_else(|| labels.get("app.kubernetes.io/name"))
            .or_else(|| labels.get("app"))
            .cloned()
            .or_else(|| meta["name"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let new_labels = [
            ("security.istio.io/tlsMode", "istio".to_owned()),
            ("service.istio.io/canonical-name", name),
            ("service.istio.io/canonical-revision", "latest".to_owned()),
        ];
        for (k, v) in new_labels {
            set_default(&mut meta["labels"], k, json!(v));
        }
        let init: &[&str] = if kind == ProxyKind::Sidecar {
            &["istio-init"]
        } else {
            &[]
        };
        let status = json!({
            "initContainers": init, "containers": ["istio-proxy"],
            "volumes": ["istio-token", "istiod-ca-cert"], "revision": "meshgate"
        });
        let annotations = [
            ("prometheus.io/scrape", "true".to_owned()),
            ("prometheus.io/port", "15020".to_owned()),
            ("prometheus.io/path", "/stats/prometheus".to_owned()),
            (STATUS_ANNOTATION, status.to_string()),
        ];
        for (k, v) in annotations {
            set_default(&mut meta["annotations"], k, json!(v));
        }
    }
}

/// The projected token a proxy authenticates to the CA with.
fn token_volume() -> Value {
    json!({
        "name": "istio-token",
        "projected": { "sources": [{ "serviceAccountToken": {
            "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token" } }] }
    })
}

/// The mesh's root certificate, published by the control plane.
fn root_volume() -> Value {
    json!({ "name": "istiod-ca-cert", "configMap": { "name": "istio-ca-root-cert" } })
}

fn string_map(v: &Value) -> Labels {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn push(parent: &mut Value, field: &str, item: Value) {
    if !parent[field].is_array() {
        parent[field] = json!([]);
    }
    if let Some(a) = parent[field].as_array_mut() {
        a.push(item);
    }
}

/// Appends `item` to the array `list` unless an entry has the same `key`.
fn push_unique(list: &mut Value, item: Value, key: &str) {
    if !list.is_array() {
        *list = json!([]);
    }
    if let Some(a) = list.as_array_mut()
        && !a.iter().any(|e| e[key] == item[key])
    {
        a.push(item);
    }
}

/// Sets `obj[key]` unless the manifest already says something there.
fn set_default(obj: &mut Value, key: &str, value: Value) {
    if !obj.is_object() {
        *obj = json!({});
    }
    if obj[key].is_null() {
        obj[key] = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/seed");

    fn seed(file: &str) -> String {
        std::fs::read_to_string(format!("{SEED}/{file}")).unwrap()
    }

    fn docs(yaml: &str) -> Vec<Value> {
        serde_saphyr::from_multiple(yaml).unwrap()
    }

    fn names(list: &Value) -> Vec<&str> {
        list.as_array()
            .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn the_seeds_workload_gets_capture_and_a_sidecar() {
        let out = Injector::default()
            .inject_yaml(&seed("deployment-workload.yaml"))
            .unwrap();
        let pod = &docs(&out)[0]["spec"]["template"];
        assert_eq!(names(&pod["spec"]["initContainers"]), ["istio-init"]);
        assert_eq!(
            names(&pod["spec"]["containers"]),
            ["curl-container", "istio-proxy"]
        );
        let proxy = &pod["spec"]["containers"][1];
        assert_eq!(proxy["args"][0], "sidecar");
        assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
        assert_eq!(proxy["readinessProbe"]["httpGet"]["port"], 15021);
        assert_eq!(
            pod["spec"]["initContainers"][0]["securityContext"]["capabilities"]["add"],
            json!(["NET_ADMIN", "NET_RAW"])
        );
        assert_eq!(
            names(&pod["spec"]["volumes"]),
            ["istio-token", "istiod-ca-cert"]
        );
        assert_eq!(
            pod["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "istio-ca"
        );
        assert_eq!(
            pod["metadata"]["annotations"]["prometheus.io/port"],
            "15020"
        );
        assert_eq!(
            pod["metadata"]["labels"]["service.istio.io/canonical-name"],
            "curl-test"
        );
        // The workload's own container is untouched.
        let original = &docs(&seed("deployment-workload.yaml"))[0]["spec"]["template"]["spec"]["containers"]
            [0];
        assert_eq!(&pod["spec"]["containers"][0], original);
    }

    #[test]
    fn the_seeds_gateway_gets_its_proxy_filled_in_and_no_capture() {
        let out = Injector::default()
            .inject_yaml(&seed("deployment-egress-gw.yaml"))
            .unwrap();
        let all = docs(&out);
        let deployment = all.iter().find(|d| d["kind"] == "Deployment").unwrap();
        let pod = &deployment["spec"]["template"];
        assert!(pod["spec"]["initContainers"].is_null());
        assert_eq!(names(&pod["spec"]["containers"]), ["istio-proxy"]);
        let proxy = &pod["spec"]["containers"][0];
        assert_eq!(proxy["args"][0], "gateway");
        assert_eq!(proxy["image"], Injector::default().image);
        // What the manifest says stays (ports, limits, its own probe).
        assert_eq!(proxy["ports"][0]["containerPort"], 80);
        assert_eq!(proxy["resources"]["limits"]["cpu"], "200m");
        assert_eq!(
            pod["spec"]["securityContext"]["sysctls"][0]["name"],
            "net.ipv4.ip_unprivileged_port_start"
        );
        // The ServiceAccount and Service pass through.
        assert!(
            all.iter().any(|d| d["kind"] == "Service")
                && all.iter().any(|d| d["kind"] == "ServiceAccount")
        );
    }

    #[test]
    fn opted_out_and_injected_pods_are_left_alone() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    sidecar.istio.io/inject: \"false\"\nspec:\n  containers:\n  - name: app\n    image: x\n";
        let out = Injector::default().inject_yaml(pod).unwrap();
        assert_eq!(docs(&out), docs(pod));
        let once = Injector::default()
            .inject_yaml(&seed("deployment-workload.yaml"))
            .unwrap();
        let twice = Injector::default().inject_yaml(&once).unwrap();
        assert_eq!(docs(&once), docs(&twice));
    }
}
