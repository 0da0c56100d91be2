//! Pieces of the tests against a real kube-apiserver (crates/cli/tests/kube.rs)
//! and of the control-plane benchmark (crates/cli/benches/control.rs).

use std::time::{Duration, Instant};

use meshgate_kube::testing::TestCluster;
use serde_json::Value;

use super::{Proc, TempDir, curl};

/// Starts the cluster with meshgate's CRDs established.
pub fn cluster() -> TestCluster {
    let cluster = TestCluster::start();
    install_crds(&cluster);
    cluster
}

/// `meshgate crds | kubectl apply -f -`, then waits until they serve.
pub fn install_crds(cluster: &TestCluster) {
    let crds = meshgate_kube::crds_yaml().unwrap();
    cluster.kubectl_ok(&["apply", "-f", "-"], &crds);
    // A CRD read before the API server wrote its first status has no
    // conditions, and `kubectl wait` gives up on it at once: ask again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "-l",
            "app.kubernetes.io/part-of=meshgate",
        ]);
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(".status.conditions accessor error") && Instant::now() < deadline,
            "kubectl wait for the CRDs: {err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The seed as its README applies it (namespaces first), then what the
/// missing controllers and kubelet would make: the workload's service
/// account and one Pod per Deployment (`gateway-0`, `curl-test-0`).
pub fn apply_seed_with_pods(cluster: &TestCluster) {
    let seed = super::seed();
    cluster.kubectl_ok(&["apply", "-f", &format!("{seed}/namespaces.yaml")], "");
    cluster.kubectl_ok(&["apply", "-f", &seed], "");
    cluster.kubectl_ok(
        &[
            "-n",
            "curl-external-tst",
            "create",
            "serviceaccount",
            "default",
        ],
        "",
    );
    pod_from_deployment(
        cluster,
        "curl-egress-tst",
        "curl-egress-tst-gateway",
        "gateway-0",
    );
    pod_from_deployment(cluster, "curl-external-tst", "curl-test", "curl-test-0");
}

/// Runs `meshgate control` against the cluster (as admin) with `extra`
/// flags; returns it and its ready file once the first version is published.
pub fn start_control(cluster: &TestCluster, dir: &TempDir, extra: &[&str]) -> (Proc, Value) {
    start_control_as(cluster.kubeconfig(), dir, extra)
}

pub fn start_control_as(
    kubeconfig: &std::path::Path,
    dir: &TempDir,
    extra: &[&str],
) -> (Proc, Value) {
    let ready = dir.path("ready.json");
    let kubeconfig = kubeconfig.to_str().unwrap().to_owned();
    let mut args = vec![
        "control",
        "--kubeconfig",
        &kubeconfig,
        "--monitoring-address",
        "127.0.0.1:0",
        "--ready-file",
        &ready,
    ];
    args.extend_from_slice(extra);
    let control = Proc::spawn(&args);
    control.wait_for("config version published", Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Written a moment after the first version is published.
        if let Some(v) = std::fs::read_to_string(&ready)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        {
            return (control, v);
        }
        assert!(Instant::now() < deadline, "no ready file");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `/debug/configz` until `done` holds (bounded: 30 s).
pub fn configz_until(addr: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (body, code, _) = curl(&[&format!("http://{addr}/debug/configz")]);
        if code == "200" {
            let v: Value = serde_json::from_str(&body).unwrap();
            if done(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: {v:#}");
        }
        assert!(Instant::now() < deadline, "{what}: {code} {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every object of the seed is in a `/debug/configz` answer (one apply can
/// reach the control plane in more than one debounce window).
pub fn has_the_seed(v: &Value) -> bool {
    count(v, "authorization_policies") == 1
        && count(v, "virtual_services") == 2
        && count(v, "gateways") == 1
        && count(v, "service_entries") == 1
        && count(v, "sidecars") == 1
        && count(v, "destination_rules") == 1
        && count(v, "services") >= 2
        && count(v, "service_accounts") >= 1
        && count(v, "namespaces") >= 6
}

pub fn count(v: &Value, field: &str) -> usize {
    v["config"][field].as_array().map_or(0, Vec::len)
}

/// A new mesh CA in `dir/ca`: its folder and its root certificate.
pub fn mesh_ca(dir: &TempDir) -> (String, String) {
    let ca_dir = dir.path("ca");
    let made = super::meshgate(&["ca", "init", "--dir", &ca_dir]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let root = std::fs::read_to_string(format!("{ca_dir}/root-cert.pem")).unwrap();
    (ca_dir, root)
}

/// A token from the TokenRequest API, as a projected volume would hold it.
pub fn token(cluster: &TestCluster, ns: &str, sa: &str, audience: Option<&str>) -> String {
    let mut args = vec!["-n", ns, "create", "token", sa];
    if let Some(a) = audience {
        args.extend(["--audience", a]);
    }
    cluster.kubectl_ok(&args, "").trim().to_owned()
}

/// What a kubelet would do for a Deployment: a Pod from its template,
/// scheduled (nodeName set), in the Deployment's namespace.
pub fn pod_from_deployment(cluster: &TestCluster, ns: &str, deployment: &str, pod: &str) {
    let d: Value = serde_json::from_str(&cluster.kubectl_ok(
        &["-n", ns, "get", "deployment", deployment, "-o", "json"],
        "",
    ))
    .unwrap();
    let mut template = d["spec"]["template"].clone();
    template["metadata"]["name"] = pod.into();
    template["metadata"]["namespace"] = ns.into();
    template["spec"]["nodeName"] = "node-1".into();
    let manifest = serde_json::json!({ "apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"], "spec": template["spec"] });
    cluster.kubectl_ok(&["apply", "-f", "-"], &manifest.to_string());
}

/// A proxy of `kind` for `pod`, with its config from the control plane and
/// its certificate from the control plane's CA by its token.
pub fn start_proxy(
    dir: &TempDir,
    kind: &str,
    workload: &str,
    sa: &str,
    control: &str,
    token: &str,
    extra: &[&str],
) -> (Proc, Value) {
    let name = workload.replace('/', "-");
    let (token_file, ready) = (
        dir.path(&format!("{name}.token")),
        dir.path(&format!("{name}.json")),
    );
    std::fs::write(&token_file, token).unwrap();
    let root = dir.path("ca/root-cert.pem");
    let mut args = vec![
        kind,
        "--control-plane",
        control,
        "--workload",
        workload,
        "--service-account",
        sa,
        "--ca-addr",
        control,
        "--ca-token-file",
        &token_file,
        "--ca-root-cert",
        &root,
        "--admin-address",
        "127.0.0.1",
        "--admin-port",
        "0",
        "--prometheus-port",
        "0",
        "--health-port",
        "0",
        "--ready-file",
        &ready,
        "--control-plane-wait",
        "30s",
    ];
    args.extend_from_slice(extra);
    let proc = Proc::spawn(&args);
    let what = if kind == "gateway" {
        "egress gateway running"
    } else {
        "sidecar running"
    };
    proc.wait_for(what, Duration::from_secs(40));
    let ready: Value = serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    (proc, ready)
}

pub fn listener(ready: &Value) -> String {
    ready["listeners"][0]["address"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// What the endpoints controller would write for a Service: one ready
/// endpoint at `addr` (`ip:port`) for its port named `port_name`.
pub fn endpoint_slice(cluster: &TestCluster, ns: &str, service: &str, port_name: &str, addr: &str) {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let slice = serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": format!("{service}-slice"), "namespace": ns,
                      "labels": { "kubernetes.io/service-name": service } },
        "addressType": "IPv4",
        "ports": [{ "name": port_name, "port": addr.port(), "protocol": "TCP" }],
        "endpoints": [{ "addresses": [addr.ip().to_string()], "conditions": { "ready": true } }]
    });
    cluster.kubectl_ok(&["apply", "-f", "-"], &slice.to_string());
}

/// The seed's AuthorizationPolicy, patched with kubectl (`merge` or `json`).
pub fn patch_seed_policy(cluster: &TestCluster, patch_type: &str, patch: &str) {
    cluster.kubectl_ok(
        &[
            "-n",
            "curl-egress-tst",
            "patch",
            "authorizationpolicy",
            "allow-curl-external-to-egress",
            &format!("--type={patch_type}"),
            "-p",
            patch,
        ],
        "",
    );
}

/// The seed's policy, allowing callers from `namespace` only.
pub fn allow_seed_policy_from(cluster: &TestCluster, namespace: &str) {
    let patch = serde_json::json!([{ "op": "replace",
        "path": "/spec/rules/0/from/0/source/namespaces", "value": [namespace] }]);
    patch_seed_policy(cluster, "json", &patch.to_string());
}

/// The seed's external host on loopback: an HTTPS stand-in with its own CA
/// (its root in `ca_file`, for `--extra-roots`), served while this lives.
pub struct ExternalHost {
    pub addr: std::net::SocketAddr,
    pub ca_file: String,
    _rt: tokio::runtime::Runtime,
}

pub fn external_host(dir: &TempDir, host: &str) -> ExternalHost {
    use meshgate_proxy::standin::{self, Seen, StandinCa};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ca = StandinCa::new("stand-in CA").unwrap();
    let ca_file = dir.path("standin-ca.pem");
    std::fs::write(&ca_file, &ca.root_pem).unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(standin::serve_https(
        listener,
        ca.server_config(&[host.to_owned()]).unwrap(),
        Seen::default(),
    ));
    ExternalHost {
        addr,
        ca_file,
        _rt: rt,
    }
}
