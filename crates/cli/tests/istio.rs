//! Interop with Istio's CA: istiod's own `pilot-discovery` (built from the
//! Go module istio.io/istio by tests/istio/build) runs against a real
//! kube-apiserver, and meshgate's sidecar and gateway take their
//! certificates from it with their service accounts' tokens
//! (`--ca-protocol istio`). The seed's request then crosses the mesh hop
//! on istiod's certificates, and the gateway's AuthorizationPolicy reads
//! the caller's namespace from them: meshgate proxies in an Istio mesh's
//! trust. And the other way: istio-agent's own CA client (tests/istio/
//! istio-csr) takes its certificate from `meshgate control`.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshgate_kube::testing::TestCluster;
use support::kube::{cluster, external_host, mesh_ca, start_control, token};
use support::{Proc, TempDir, curl};

const HOST: &str = "jsonplaceholder.typicode.com";

/// istiod as a process; killed when dropped, its log kept in a file.
struct Istiod {
    child: Child,
    log: String,
}

impl Drop for Istiod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Istiod {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts istiod (its CA self-signed, as a default install) and returns it
/// with its CA port once it is ready.
fn start_istiod(cluster: &TestCluster, dir: &TempDir) -> (Istiod, String) {
    let [http, grpc, secure, monitoring, webhooks] = [(); 5].map(|()| support::free_port());
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let log = dir.path("istiod.log");
    let child = Command::new(env!("MESHGATE_ISTIOD_BIN"))
        .args(["discovery", "--kubeconfig"])
        .arg(cluster.kubeconfig())
        .args(["--httpAddr", &addr(http), "--grpcAddr", &addr(grpc)])
        .args(["--secureGRPCAddr", &addr(secure)])
        .args(["--monitoringAddr", &addr(monitoring)])
        .args(["--httpsAddr", &addr(webhooks)])
        .args(["--meshConfig", &dir.path("no-mesh-config")])
        .env("POD_NAMESPACE", "istio-system")
        .env("POD_NAME", "istiod-0")
        .env("REVISION", "default")
        .current_dir(dir.path(""))
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .expect("pilot-discovery starts");
    let istiod = Istiod { child, log };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, code, _) = curl(&[&format!("http://{}/ready", addr(http))]);
        if code == "200" {
            return (istiod, addr(secure));
        }
        assert!(
            Instant::now() < deadline,
            "istiod not ready:\n{}",
            istiod.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The root istiod publishes into `ns` (ConfigMap istio-ca-root-cert).
fn istiod_root(cluster: &TestCluster, ns: &str, istiod: &Istiod) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cluster.kubectl(&[
            "-n",
            ns,
            "get",
            "configmap",
            "istio-ca-root-cert",
            "-o",
            "jsonpath={.data.root-cert\\.pem}",
        ]);
        let root = String::from_utf8_lossy(&out.stdout).into_owned();
        if root.contains("BEGIN CERTIFICATE") {
            return root;
        }
        assert!(
            Instant::now() < deadline,
            "no istio-ca-root-cert in {ns}:\n{}",
            istiod.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A meshgate proxy of `kind` with its certificate from istiod.
fn proxy(
    dir: &TempDir,
    kind: &str,
    workload: &str,
    ca: (&str, &str, &str),
    extra: &[&str],
) -> Proc {
    let (addr, token, root) = ca;
    let name = workload.replace('/', "-");
    let token_file = dir.path(&format!("{name}.token"));
    std::fs::write(&token_file, token).unwrap();
    let root_file = dir.path(&format!("{name}.root.pem"));
    std::fs::write(&root_file, root).unwrap();
    let seed = support::seed();
    let mut args = vec![
        kind,
        "--config",
        &seed,
        "--workload",
        workload,
        "--ca-addr",
        addr,
        "--ca-protocol",
        "istio",
        "--ca-token-file",
        &token_file,
        "--ca-root-cert",
        &root_file,
        "--admin-address",
        "127.0.0.1",
        "--admin-port",
        "0",
        "--prometheus-port",
        "0",
        "--health-port",
        "0",
    ];
    args.extend_from_slice(extra);
    Proc::spawn(&args)
}

#[test]
// One attribute: two `ignore`s on a machine with neither is an error.
#[cfg_attr(
    any(no_kube, no_istiod),
    ignore = "needs kube-apiserver, etcd, kubectl and istiod's pilot-discovery: run tests/kube/build and tests/istio/build"
)]
fn meshgate_proxies_take_istiods_certificates_and_the_seed_runs_on_them() {
    let cluster = TestCluster::start();
    let dir = TempDir::new("istiod");
    for ns in ["istio-system", "curl-external-tst", "curl-egress-tst"] {
        cluster.kubectl_ok(&["create", "namespace", ns], "");
    }
    for (ns, sa) in [
        ("curl-external-tst", "default"),
        ("curl-egress-tst", "curl-egress-tst"),
    ] {
        cluster.kubectl_ok(&["-n", ns, "create", "serviceaccount", sa], "");
    }
    let (istiod, ca_addr) = start_istiod(&cluster, &dir);
    let root = istiod_root(&cluster, "curl-egress-tst", &istiod);

    let external = external_host(&dir, HOST);
    let (external_addr, standin_ca_file) = (external.addr, external.ca_file.clone());

    let gw_token = token(
        &cluster,
        "curl-egress-tst",
        "curl-egress-tst",
        Some("istio-ca"),
    );
    let gw_endpoints = dir.path("gw-endpoints");
    std::fs::write(&gw_endpoints, format!("{HOST}:443 {external_addr}\n")).unwrap();
    let gw_port = support::free_port().to_string();
    let gw_ports = format!("80={gw_port}");
    let gateway = proxy(
        &dir,
        "gateway",
        "curl-egress-tst/curl-egress-tst-gateway",
        (&ca_addr, &gw_token, &root),
        &[
            "--bind-address",
            "127.0.0.1",
            "--port",
            &gw_ports,
            "--endpoints",
            &gw_endpoints,
            "--extra-roots",
            &standin_ca_file,
        ],
    );
    gateway.wait_for("egress gateway running", Duration::from_secs(30));

    let sc_token = token(&cluster, "curl-external-tst", "default", Some("istio-ca"));
    let sc_endpoints = dir.path("sc-endpoints");
    std::fs::write(
        &sc_endpoints,
        format!("curl-egress-tst.curl-egress-tst.svc.cluster.local:80 127.0.0.1:{gw_port}\n"),
    )
    .unwrap();
    let sc_port = support::free_port().to_string();
    let sidecar = proxy(
        &dir,
        "sidecar",
        "curl-external-tst/curl-test",
        (&ca_addr, &sc_token, &root),
        &[
            "--outbound-address",
            "127.0.0.1",
            "--outbound-port",
            &sc_port,
            "--explicit-proxy",
            "--endpoints",
            &sc_endpoints,
        ],
    );
    sidecar.wait_for("sidecar running", Duration::from_secs(30));

    // The workload's request crosses the mesh hop on istiod's certificates;
    // the gateway's policy admits the caller's namespace from them.
    let (body, code, _) = curl(&[
        "-x",
        &format!("http://127.0.0.1:{sc_port}"),
        &format!("http://{HOST}/todos/1"),
    ]);
    assert_eq!(
        code,
        "200",
        "{body}\ngateway:\n{}\nsidecar:\n{}",
        gateway.log.lock().unwrap().join("\n"),
        sidecar.log.lock().unwrap().join("\n")
    );
    assert!(body.contains("delectus aut autem"), "{body}");

    // A token for another service account gets that account's certificate
    // from istiod, which is not the proxy's identity: it does not start.
    let wrong = proxy(
        &dir,
        "sidecar",
        "curl-external-tst/curl-test",
        (&ca_addr, &gw_token, &root),
        &["--outbound-address", "127.0.0.1", "--outbound-port", "0"],
    );
    let line = wrong.wait_for("curl-egress-tst", Duration::from_secs(30));
    assert!(
        line.contains(
            "certificate is for spiffe://cluster.local/ns/curl-egress-tst/sa/curl-egress-tst, \
             expected spiffe://cluster.local/ns/curl-external-tst/sa/default"
        ),
        "{line}"
    );
}

#[test]
// One attribute: two `ignore`s on a machine with neither is an error.
#[cfg_attr(
    any(no_kube, no_istiod),
    ignore = "needs kube-apiserver, etcd, kubectl and istio-csr (Istio's CA client): run tests/kube/build and tests/istio/build"
)]
fn istio_agents_own_ca_client_takes_its_certificate_from_meshgate_control() {
    let cluster = cluster();
    let dir = TempDir::new("istio-agent");
    let (ca_dir, root) = mesh_ca(&dir);
    cluster.kubectl_ok(&["create", "namespace", "curl-external-tst"], "");
    for sa in ["default", "other"] {
        cluster.kubectl_ok(
            &["-n", "curl-external-tst", "create", "serviceaccount", sa],
            "",
        );
    }
    let (_control, ready) = start_control(
        &cluster,
        &dir,
        &["--ca-dir", &ca_dir, "--ca-address", "127.0.0.1:0"],
    );
    let ca_addr = ready["ca"].as_str().unwrap().to_owned();
    let root_file = dir.path("ca/root-cert.pem");
    let id = "spiffe://cluster.local/ns/curl-external-tst/sa/default";
    // Istio's citadel client, as istio-agent runs it: RSA key, token from
    // a file, the server verified by the Service's name.
    let istio_csr = |sa: &str| {
        let token_file = dir.path(&format!("{sa}.token"));
        let t = token(&cluster, "curl-external-tst", sa, Some("istio-ca"));
        std::fs::write(&token_file, t).unwrap();
        let bin = std::path::Path::new(env!("MESHGATE_ISTIOD_BIN")).with_file_name("istio-csr");
        Command::new(bin)
            .args([
                &ca_addr,
                "meshgate-control.meshgate-system.svc",
                &root_file,
                &token_file,
                id,
            ])
            .output()
            .unwrap()
    };

    let out = istio_csr("default");
    let chain = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let certs = meshgate_identity::cert::parse_certs(&chain).unwrap();
    assert_eq!(
        meshgate_identity::tls::spiffe_id_of(&certs[0])
            .unwrap()
            .to_string(),
        id
    );
    assert!(chain.ends_with(&root), "the root comes last:\n{chain}");

    // Another service account's token: refused, and Istio's client says why.
    let out = istio_csr("other");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("InvalidArgument") && err.contains("the token authorizes only"),
        "{err}"
    );
}
