//! `meshgate control` against a real kube-apiserver (tests/kube/build):
//! the seed applied with kubectl becomes a published config version; a
//! change is a new version; an object only meshgate's validation refuses is
//! reported and never published, and the last good config stays.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use meshgate_kube::testing::TestCluster;
use serde_json::Value;
use support::kube::*;
use support::{TempDir, curl};

/// Valid for the CRD's schema, invalid for meshgate (`match` with both
/// `exact` and `prefix`).
const INVALID_VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: bad\n  namespace: default\n\
    spec:\n  hosts: [a.example.com]\n  http:\n  - match:\n    - uri:\n        exact: /a\n        prefix: /b\n    \
    route:\n    - destination:\n        host: a.example.com\n";

#[test]
#[cfg_attr(
    no_kube,
    ignore = "needs kube-apiserver, etcd and kubectl: run tests/kube/build"
)]
fn the_control_plane_publishes_the_clusters_config_and_keeps_the_last_good_one() {
    let cluster = cluster();
    let dir = TempDir::new("control");
    let (control, ready) = start_control(&cluster, &dir, &[]);
    let addr = ready["monitoring"].as_str().unwrap().to_owned();
    let (body, code, _) = curl(&[&format!("http://{addr}/ready")]);
    assert_eq!(
        code,
        "200",
        "{addr}: {body}\n{}",
        control.log.lock().unwrap().join("\n")
    );

    // The seed, applied as its README says.
    let seed = support::seed();
    cluster.kubectl_ok(&["apply", "-f", &format!("{seed}/namespaces.yaml")], "");
    cluster.kubectl_ok(&["apply", "-f", &seed], "");
    // One apply, but its objects may reach the control plane in more than
    // one debounce window: wait for all of them.
    let v = configz_until(&addr, "the seed's objects", has_the_seed);
    let seeded = v["version"].as_u64().unwrap();
    let ap = &v["config"]["authorization_policies"][0];
    assert_eq!(ap["meta"]["source"], "cluster:1", "{ap:#}");

    // A change is a new version.
    patch_seed_policy(&cluster, "merge", r#"{"spec":{"action":"DENY"}}"#);
    let v = configz_until(&addr, "the patched policy", |v| {
        v["config"]["authorization_policies"][0]["spec"]["action"] == "DENY"
    });
    let patched = v["version"].as_u64().unwrap();
    assert!(patched > seeded);

    // Valid for the API server's schema, invalid for meshgate: reported,
    // never published.
    cluster.kubectl_ok(&["apply", "-f", "-"], INVALID_VS);
    let v = configz_until(&addr, "the invalid VirtualService reported", |v| {
        v["rejected"].as_array().is_some_and(|r| !r.is_empty())
    });
    let rejected = v["rejected"][0].as_str().unwrap();
    assert!(
        rejected.contains("(VirtualService default/bad cluster:")
            && rejected.contains("only one of exact, prefix or regex may be set"),
        "{rejected}"
    );
    assert_eq!(
        v["version"].as_u64().unwrap(),
        patched,
        "an invalid state was published"
    );
    assert_eq!(count(&v, "virtual_services"), 2);
    control.wait_for("keeping the last good config", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = cluster.kubectl_ok(
            &[
                "-n",
                "default",
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=bad",
                "-o",
                "jsonpath={range .items[*]}{.type} {.reason} {.message}{\"\\n\"}{end}",
            ],
            "",
        );
        if events
            .contains("Warning InvalidConfig Error [IST0106] (VirtualService default/bad cluster:")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no Event for the invalid VirtualService: {events}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Removed again: nothing rejected, and no new version (the config is
    // what it was).
    cluster.kubectl_ok(&["-n", "default", "delete", "virtualservice", "bad"], "");
    let v = configz_until(&addr, "the rejection cleared", |v| {
        v["rejected"].as_array().is_some_and(Vec::is_empty)
    });
    assert_eq!(v["version"].as_u64().unwrap(), patched);
}

#[test]
#[cfg_attr(
    no_kube,
    ignore = "needs kube-apiserver, etcd and kubectl: run tests/kube/build"
)]
fn a_sidecar_is_sent_only_what_its_sidecar_resource_imports() {
    let cluster = cluster();
    let dir = TempDir::new("control");
    let (_control, ready) = start_control(&cluster, &dir, &[]);
    let addr = ready["monitoring"].as_str().unwrap().to_owned();
    apply_seed_with_pods(&cluster);
    cluster.kubectl_ok(&["apply", "-f", "-"], OTHER_SE);
    configz_until(&addr, "the seed and another ServiceEntry", |v| {
        has_the_seed_and(v, 2)
    });
    let dump = |proxy: &str| {
        let (body, code, _) = curl(&[&format!("http://{addr}/debug/config_dump?proxyID={proxy}")]);
        assert_eq!(code, "200", "{body}");
        body
    };
    // The seed's Sidecar has no egress hosts: everything exported.
    assert!(dump("curl-external-tst/curl-test-0").contains("other.example.com"));

    cluster.kubectl_ok(
        &[
            "-n",
            "curl-external-tst",
            "patch",
            "sidecar",
            "restrict-outbound-traffic",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"egress":[{"hosts":["./jsonplaceholder.typicode.com"]}]}}"#,
        ],
        "",
    );
    configz_until(&addr, "the Sidecar's egress hosts", |v| {
        v["config"]["sidecars"][0]["spec"]["egress"]
            .as_array()
            .is_some_and(|e| !e.is_empty())
    });
    let workload = dump("curl-external-tst/curl-test-0");
    assert!(!workload.contains("other.example.com"), "{workload}");
    for kept in [
        "jsonplaceholder-egress",
        "jsonplaceholder-tls-origination",
        "kind: Sidecar",
        "kind: Gateway",
    ] {
        assert!(workload.contains(kept), "{kept} missing:\n{workload}");
    }
    // A gateway is not trimmed by a Sidecar.
    assert!(dump("curl-egress-tst/gateway-0").contains("other.example.com"));
}

const OTHER_SE: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: other, namespace: curl-external-tst}
spec:
  hosts: [other.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP}]
";

/// The seed with `entries` ServiceEntries in all.
fn has_the_seed_and(v: &Value, entries: usize) -> bool {
    count(v, "service_entries") == entries && count(v, "workloads") >= 2 && {
        let mut seed = v.clone();
        seed["config"]["service_entries"] = serde_json::json!([{}]);
        has_the_seed(&seed)
    }
}

#[test]
#[cfg_attr(
    no_kube,
    ignore = "needs kube-apiserver, etcd and kubectl: run tests/kube/build"
)]
fn the_ca_issues_by_service_account_token_and_publishes_the_root() {
    use meshgate_identity::{CertificateAuthority, SpiffeId, caserver};

    let cluster = cluster();
    let dir = TempDir::new("control-ca");
    let (ca_dir, root) = mesh_ca(&dir);
    // No controller manager here: the test makes the service accounts.
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

    let curl = SpiffeId::new("cluster.local", "curl-external-tst", "default").unwrap();
    let (csr, _key) = CertificateAuthority::csr_for(&curl).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // meshgate's API, and Istio's gRPC API as istio-agent asks (the port
    // presents a certificate for the control plane's Service name): each
    // answers (chain, root), or the refusal.
    let ours = |token: &str| {
        rt.block_on(caserver::request_certificate(
            &ca_addr,
            token,
            &root,
            &csr,
            Duration::from_secs(3600),
        ))
        .map(|i| (i.cert_chain, i.root_cert))
        .map_err(|e| e.to_string())
    };
    let istio = |token: &str| {
        rt.block_on(meshgate_identity::istioca::request_certificate(
            &ca_addr,
            "meshgate-control.meshgate-system.svc",
            token,
            &root,
            &csr,
            Duration::from_secs(3600),
        ))
        .map(|i| (i.cert_chain, i.root_cert))
        .map_err(|e| e.to_string())
    };
    type Request<'a> = &'a dyn Fn(&str) -> Result<(String, String), String>;
    let apis: [(Request<'_>, &str, &str); 2] = [
        (&ours, "403", "401"),
        (&istio, "InvalidArgument", "Unauthenticated"),
    ];
    for (request, forbidden, unauthenticated) in apis {
        // The pod's own token: its service account's certificate.
        let (chain, issued_root) = request(&token(
            &cluster,
            "curl-external-tst",
            "default",
            Some("istio-ca"),
        ))
        .unwrap();
        let chain = meshgate_identity::cert::parse_certs(&chain).unwrap();
        assert_eq!(
            meshgate_identity::tls::spiffe_id_of(&chain[0]).unwrap(),
            curl
        );
        assert_eq!(issued_root, root);

        // Another service account's token cannot get it.
        let err = request(&token(
            &cluster,
            "curl-external-tst",
            "other",
            Some("istio-ca"),
        ))
        .unwrap_err();
        assert!(
            err.contains(forbidden)
                && err.contains(
                    "the token authorizes only spiffe://cluster.local/ns/curl-external-tst/sa/other"
                ),
            "{err}"
        );
        // A token for the API server's audience, not the CA's; and garbage.
        for bad in [
            token(&cluster, "curl-external-tst", "default", None),
            "not-a-token".to_owned(),
        ] {
            let err = request(&bad).unwrap_err();
            assert!(err.contains(unauthenticated), "{err}");
        }
    }

    // The root, in every namespace; deleted or changed, it comes back.
    let root_in_namespace = || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = cluster.kubectl(&[
                "-n",
                "curl-external-tst",
                "get",
                "configmap",
                "istio-ca-root-cert",
                "-o",
                "jsonpath={.data.root-cert\\.pem}",
            ]);
            if String::from_utf8_lossy(&out.stdout) == root {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no istio-ca-root-cert: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    root_in_namespace();
    cluster.kubectl_ok(
        &[
            "-n",
            "curl-external-tst",
            "delete",
            "configmap",
            "istio-ca-root-cert",
        ],
        "",
    );
    root_in_namespace();
    cluster.kubectl_ok(
        &[
            "-n",
            "curl-external-tst",
            "patch",
            "configmap",
            "istio-ca-root-cert",
            "--type=merge",
            "-p",
            r#"{"data":{"root-cert.pem":"not a root"}}"#,
        ],
        "",
    );
    root_in_namespace();
}

#[test]
#[cfg_attr(
    no_kube,
    ignore = "needs kube-apiserver, etcd and kubectl: run tests/kube/build"
)]
fn the_seed_applied_with_kubectl_runs_through_sidecar_and_gateway_and_follows_policy_changes() {
    const HOST: &str = "jsonplaceholder.typicode.com";

    let cluster = cluster();
    let dir = TempDir::new("control-e2e");
    let (ca_dir, _) = mesh_ca(&dir);
    let external = external_host(&dir, HOST);
    let (standin_addr, standin_ca_file) = (external.addr, external.ca_file.clone());

    apply_seed_with_pods(&cluster);

    // A fixed address: the control plane comes back on it below.
    let control_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let control_flags = ["--ca-dir", &ca_dir, "--ca-address", &control_addr];
    let (control, ready) = start_control(&cluster, &dir, &control_flags);
    let monitoring = ready["monitoring"].as_str().unwrap().to_owned();

    let gw_endpoints = dir.path("gw-endpoints");
    std::fs::write(&gw_endpoints, format!("{HOST}:443 {standin_addr}\n")).unwrap();
    let gw_token = token(
        &cluster,
        "curl-egress-tst",
        "curl-egress-tst",
        Some("istio-ca"),
    );
    let (_gateway, gw_ready) = start_proxy(
        &dir,
        "gateway",
        "curl-egress-tst/gateway-0",
        "curl-egress-tst",
        &control_addr,
        &gw_token,
        &[
            "--bind-address",
            "127.0.0.1",
            "--port",
            "80=0",
            "--endpoints",
            &gw_endpoints,
            "--extra-roots",
            &standin_ca_file,
        ],
    );
    // The API server refuses loopback addresses in EndpointSlices: on
    // loopback the sidecar takes the gateway's address from --endpoints
    // (the network-namespace test below uses an EndpointSlice).
    let sc_endpoints = dir.path("sc-endpoints");
    std::fs::write(
        &sc_endpoints,
        format!(
            "curl-egress-tst.curl-egress-tst.svc.cluster.local:80 {}\n",
            listener(&gw_ready)
        ),
    )
    .unwrap();
    let sc_token = token(&cluster, "curl-external-tst", "default", Some("istio-ca"));
    let (_sidecar, sc_ready) = start_proxy(
        &dir,
        "sidecar",
        "curl-external-tst/curl-test-0",
        "default",
        &control_addr,
        &sc_token,
        &[
            "--outbound-address",
            "127.0.0.1",
            "--outbound-port",
            "0",
            "--explicit-proxy",
            "--endpoints",
            &sc_endpoints,
        ],
    );
    let proxy = format!("http://{}", listener(&sc_ready));
    let url = format!("http://{HOST}/todos/1");

    // The workload's request: sidecar, mTLS, gateway, policy, TLS out.
    let (body, code, _) = curl(&["-x", &proxy, &url]);
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("delectus aut autem"), "{body}");

    // The policy changed with kubectl: the gateway denies once the new
    // version is applied (pushed, not polled).
    let patched = Instant::now();
    allow_seed_policy_from(&cluster, "some-other-ns");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (body, code, _) = curl(&["-x", &proxy, &url]);
        if code == "403" {
            assert_eq!(body, "RBAC: access denied");
            break;
        }
        assert_eq!(code, "200", "{body}");
        assert!(
            Instant::now() < deadline,
            "the gateway still allows the request"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("policy change to deny: {:?}", patched.elapsed());

    // Both proxies report what they applied: the gateway the new version;
    // the sidecar does not see the gateway's policy (another namespace),
    // so nothing new was pushed to it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (body, _, _) = curl(&[&format!("http://{monitoring}/debug/syncz")]);
        let v: Value = serde_json::from_str(&body).unwrap();
        let (gw, sc) = (
            &v["proxies"]["curl-egress-tst/gateway-0"],
            &v["proxies"]["curl-external-tst/curl-test-0"],
        );
        if gw["applied"] == v["version"] && sc["applied"] == sc["sent"] && sc["connected"] == true {
            assert_eq!(
                gw["identity"],
                "spiffe://cluster.local/ns/curl-egress-tst/sa/curl-egress-tst"
            );
            assert!(sc["applied"].as_u64() < v["version"].as_u64(), "{v:#}");
            break;
        }
        assert!(Instant::now() < deadline, "not applied everywhere: {v:#}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The control plane away: the proxies keep their last good config.
    drop(control);
    let (_, code, _) = curl(&["-x", &proxy, &url]);
    assert_eq!(code, "403");

    // Back: the proxies reconnect (with backoff) and follow the cluster
    // again; the policy restored with kubectl lets the request through.
    std::fs::remove_file(dir.path("ready.json")).unwrap();
    let (_control, ready) = start_control(&cluster, &dir, &control_flags);
    let monitoring = ready["monitoring"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (body, _, _) = curl(&[&format!("http://{monitoring}/debug/syncz")]);
        let v: Value = serde_json::from_str(&body).unwrap();
        let connected = |w: &str| v["proxies"][w]["connected"] == true;
        if connected("curl-egress-tst/gateway-0") && connected("curl-external-tst/curl-test-0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxies did not come back: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    allow_seed_policy_from(&cluster, "curl-external-tst");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (body, code, _) = curl(&["-x", &proxy, &url]);
        if code == "200" {
            assert!(body.contains("delectus aut autem"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "still {code}: {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Registers the control plane's webhooks with the API server, by URL
/// (no Service here) and without a caBundle: the control plane writes it.
fn register_webhooks(cluster: &TestCluster, webhooks: &str) {
    let manifest = serde_json::json!({
        "apiVersion": "v1", "kind": "List", "items": [
            {
                "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                "metadata": { "name": "meshgate-sidecar-injector" },
                "webhooks": [{
                    "name": "sidecar-injector.meshgate.dev",
                    "clientConfig": { "url": format!("https://{webhooks}/inject") },
                    "rules": [{ "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"] }],
                    "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"], "reinvocationPolicy": "Never"
                }]
            },
            {
                "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
                "metadata": { "name": "meshgate-validator" },
                "webhooks": [{
                    "name": "validation.meshgate.dev",
                    "clientConfig": { "url": format!("https://{webhooks}/validate") },
                    "rules": [{ "apiGroups": ["networking.istio.io", "security.istio.io"], "apiVersions": ["*"],
                                "operations": ["CREATE", "UPDATE"], "resources": ["*"] }],
                    "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"]
                }]
            }
        ]
    });
    cluster.kubectl_ok(&["apply", "-f", "-"], &manifest.to_string());
}

#[test]
#[cfg_attr(
    no_kube,
    ignore = "needs kube-apiserver, etcd and kubectl: run tests/kube/build"
)]
fn the_api_server_calls_the_webhooks_to_inject_pods_and_refuse_invalid_objects() {
    let cluster = cluster();
    let dir = TempDir::new("control-webhooks");
    let (ca_dir, root) = mesh_ca(&dir);
    let seed = support::seed();
    cluster.kubectl_ok(&["apply", "-f", &format!("{seed}/namespaces.yaml")], "");
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
    // Registered as deploy/ installs them, before the control plane runs
    // (so the webhook port is chosen here).
    let webhooks = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    register_webhooks(&cluster, &webhooks);
    let (_control, _) = start_control(
        &cluster,
        &dir,
        &[
            "--ca-dir",
            &ca_dir,
            "--ca-address",
            "127.0.0.1:0",
            "--webhook-address",
            &webhooks,
            "--webhook-names",
            "127.0.0.1",
        ],
    );
    let bundle = cluster.kubectl_ok(
        &[
            "get",
            "mutatingwebhookconfiguration",
            "meshgate-sidecar-injector",
            "-o",
            "jsonpath={.webhooks[0].clientConfig.caBundle}",
        ],
        "",
    );
    assert_eq!(
        bundle,
        meshgate_identity::cert::base64_encode(root.as_bytes())
    );

    // The namespace is labelled for injection (istio.io/rev): a Pod created
    // there gets capture and the proxy from the API server's call.
    let pod = |name: &str, annotations: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: curl-external-tst\n  labels:\n    app: curl-test\n{annotations}\
             spec:\n  containers:\n  - name: curl\n    image: curlimages/curl\n"
        )
    };
    cluster.kubectl_ok(&["apply", "-f", "-"], &pod("injected", ""));
    let got: Value = serde_json::from_str(&cluster.kubectl_ok(
        &[
            "-n",
            "curl-external-tst",
            "get",
            "pod",
            "injected",
            "-o",
            "json",
        ],
        "",
    ))
    .unwrap();
    let names = |list: &Value| {
        list.as_array()
            .map(|a| {
                a.iter()
                    .map(|c| c["name"].as_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert_eq!(names(&got["spec"]["initContainers"]), ["istio-init"]);
    assert_eq!(names(&got["spec"]["containers"]), ["curl", "istio-proxy"]);
    assert_eq!(
        got["spec"]["containers"][1]["securityContext"]["runAsUser"],
        1337
    );
    assert_eq!(
        got["metadata"]["labels"]["security.istio.io/tlsMode"],
        "istio"
    );

    // Opted out: untouched.
    cluster.kubectl_ok(
        &["apply", "-f", "-"],
        &pod(
            "plain",
            "  annotations:\n    sidecar.istio.io/inject: \"false\"\n",
        ),
    );
    let got: Value = serde_json::from_str(&cluster.kubectl_ok(
        &[
            "-n",
            "curl-external-tst",
            "get",
            "pod",
            "plain",
            "-o",
            "json",
        ],
        "",
    ))
    .unwrap();
    assert_eq!(names(&got["spec"]["containers"]), ["curl"]);

    // An object only meshgate's validation refuses: refused at apply, with
    // `meshgate check`'s message.
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], INVALID_VS);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the invalid VirtualService was admitted"
    );
    assert!(
        err.contains("denied the request")
            && err.contains("Error [IST0106] (VirtualService default/bad cluster:")
            && err.contains("only one of exact, prefix or regex may be set"),
        "{err}"
    );
    // The seed's own objects pass.
    cluster.kubectl_ok(&["apply", "-f", &seed], "");
}

#[test]
#[cfg_attr(
    no_kube,
    ignore = "needs kube-apiserver, etcd and kubectl: run tests/kube/build"
)]
fn the_control_plane_runs_with_only_the_rbac_deploy_gives_it() {
    let cluster = cluster();
    let dir = TempDir::new("control-rbac");
    let (ca_dir, root) = mesh_ca(&dir);
    let deploy = support::repo_root().join("deploy/control-plane.yaml");
    cluster.kubectl_ok(&["apply", "-f", deploy.to_str().unwrap()], "");

    // What the role allows, and nothing beyond it.
    let sa = "system:serviceaccount:meshgate-system:meshgate-control";
    let can = |verb: &str, what: &str| {
        let out = cluster.kubectl(&["auth", "can-i", "--as", sa, verb, what, "-A"]);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for (verb, what) in [
        ("watch", "virtualservices.networking.istio.io"),
        ("list", "authorizationpolicies.security.istio.io"),
        ("watch", "pods"),
        ("watch", "endpointslices.discovery.k8s.io"),
        ("create", "events"),
        ("create", "tokenreviews.authentication.k8s.io"),
        ("patch", "configmaps"),
        ("watch", "configmaps"),
    ] {
        assert!(can(verb, what), "cannot {verb} {what}");
    }
    for (verb, what) in [
        ("get", "secrets"),
        ("create", "pods"),
        ("delete", "virtualservices.networking.istio.io"),
        ("update", "mutatingwebhookconfigurations"),
    ] {
        assert!(!can(verb, what), "may {verb} {what}");
    }

    // Run as that service account: the watches list, the root is
    // published, the webhooks get the mesh root as their caBundle.
    let token = token(&cluster, "meshgate-system", "meshgate-control", None);
    let kubeconfig = cluster.kubeconfig_for("control.kubeconfig", &token);
    let (_control, _) = start_control_as(
        &kubeconfig,
        &dir,
        &[
            "--ca-dir",
            &ca_dir,
            "--ca-address",
            "127.0.0.1:0",
            "--webhook-address",
            "127.0.0.1:0",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let cm = cluster.kubectl(&[
            "-n",
            "meshgate-system",
            "get",
            "configmap",
            "istio-ca-root-cert",
            "-o",
            "jsonpath={.data.root-cert\\.pem}",
        ]);
        let bundle = cluster.kubectl(&[
            "get",
            "validatingwebhookconfiguration",
            "meshgate-validator",
            "-o",
            "jsonpath={.webhooks[0].clientConfig.caBundle}",
        ]);
        if String::from_utf8_lossy(&cm.stdout) == root
            && String::from_utf8_lossy(&bundle.stdout)
                == meshgate_identity::cert::base64_encode(root.as_bytes())
        {
            break;
        }
        assert!(Instant::now() < deadline, "root or caBundle not written");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[cfg_attr(
    no_kube,
    ignore = "needs kube-apiserver, etcd and kubectl: run tests/kube/build"
)]
fn the_control_plane_keeps_its_config_while_the_api_server_restarts_and_follows_it_after() {
    let mut cluster = cluster();
    let dir = TempDir::new("control-restart");
    let (control, ready) = start_control(&cluster, &dir, &[]);
    let addr = ready["monitoring"].as_str().unwrap().to_owned();
    let seed = support::seed();
    cluster.kubectl_ok(&["apply", "-f", &format!("{seed}/namespaces.yaml")], "");
    cluster.kubectl_ok(&["apply", "-f", &seed], "");
    let before = configz_until(&addr, "the seed", has_the_seed);

    cluster.restart_apiserver(|| {
        // Away: the published config stays, and so does readiness.
        let v = configz_until(&addr, "the config while the API server is down", |_| true);
        assert_eq!(v["version"], before["version"]);
        assert_eq!(curl(&[&format!("http://{addr}/ready")]).1, "200");
    });

    // Back: the watches resume and a change made now is a new version.
    patch_seed_policy(&cluster, "merge", r#"{"spec":{"action":"DENY"}}"#);
    let after = configz_until(&addr, "the change after the restart", |v| {
        v["config"]["authorization_policies"][0]["spec"]["action"] == "DENY"
    });
    assert!(after["version"].as_u64() > before["version"].as_u64());
    control.wait_for("watch failed; retrying", Duration::from_secs(1));
}

/// curl inside a network namespace: body and status code.
fn curl_in(net: &support::netns::Net, ns: &str, args: &[&str]) -> (String, String) {
    let mut argv = vec!["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}"];
    argv.extend_from_slice(args);
    let out = String::from_utf8_lossy(&net.exec(ns, &argv).stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (body.to_owned(), code.to_owned())
}

/// Waits (bounded) for a file the process writes when it is ready.
fn wait_file(path: &str, what: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(v) = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
        {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// As on a node: the cluster, the control plane, the gateway and the
/// external host in one network namespace; the workload's namespace with
/// istio-init's capture and the sidecar as uid 1337; the workload's own
/// curl (no proxy flag) captured, through sidecar and gateway to the host.
#[test]
#[cfg_attr(not_root, ignore = "needs root: network namespaces and iptables")]
#[cfg_attr(
    no_kube,
    ignore = "needs kube-apiserver, etcd and kubectl: run tests/kube/build"
)]
fn in_network_namespaces_the_workloads_own_curl_is_captured_and_follows_the_cluster() {
    use support::netns::Net;
    const HOST: &str = "jsonplaceholder.typicode.com";
    let bin = support::bin();
    let net = Net::new();
    let (gw_ip, world_ip, control_ip) = (net.ip(2), net.ip(3), net.ip(101));
    let control_addr = format!("{control_ip}:15012");
    let monitoring = format!("{control_ip}:15014");
    let dir = TempDir::new("control-netns");
    let (ca_dir, _) = mesh_ca(&dir);

    let cluster = TestCluster::start_in_netns(&net.gw);
    install_crds(&cluster);
    apply_seed_with_pods(&cluster);

    let standin_ca = dir.path("standin-ca.pem");
    let standin = support::Proc::spawn_argv(&[
        "ip",
        "netns",
        "exec",
        &net.gw,
        bin,
        "stand-in",
        "--host",
        HOST,
        "--https-listen",
        &format!("{world_ip}:443"),
        "--dns-listen",
        &format!("{world_ip}:53"),
        "--ca-out",
        &standin_ca,
    ]);
    standin.wait_for("stand-in running", Duration::from_secs(10));
    let kubeconfig = cluster.kubeconfig().to_str().unwrap().to_owned();
    let control_ready = dir.path("control.json");
    let _control = support::Proc::spawn_argv(&[
        "ip",
        "netns",
        "exec",
        &net.gw,
        bin,
        "control",
        "--kubeconfig",
        &kubeconfig,
        "--monitoring-address",
        &monitoring,
        "--ca-dir",
        &ca_dir,
        "--ca-address",
        &control_addr,
        "--webhook-address",
        "127.0.0.1:0",
        "--ready-file",
        &control_ready,
    ]);
    wait_file(&control_ready, "the control plane");
    // Its monitoring port on a pod address: readiness for all, the debug
    // endpoints for loopback only.
    let (_, code) = curl_in(&net, &net.app, &[&format!("http://{monitoring}/ready")]);
    assert_eq!(code, "200");
    let (body, code) = curl_in(
        &net,
        &net.app,
        &[&format!("http://{monitoring}/debug/configz")],
    );
    assert_eq!(
        (code.as_str(), body.trim()),
        (
            "403",
            "debug endpoints answer on loopback only (kubectl port-forward)"
        )
    );

    // Each proxy: its pod's token, the mesh root, the control plane's address.
    let root = dir.path("ca/root-cert.pem");
    let proxy = |ns: &str, sa: &str, name: &str| {
        let file = dir.path(&format!("{name}.token"));
        std::fs::write(&file, token(&cluster, ns, sa, Some("istio-ca"))).unwrap();
        file
    };
    let dns = format!("{world_ip}:53");
    let gw_token = proxy("curl-egress-tst", "curl-egress-tst", "gateway");
    let gateway = support::Proc::spawn_argv(&[
        "ip",
        "netns",
        "exec",
        &net.gw,
        bin,
        "gateway",
        "--control-plane",
        &control_addr,
        "--workload",
        "curl-egress-tst/gateway-0",
        "--service-account",
        "curl-egress-tst",
        "--ca-addr",
        &control_addr,
        "--ca-token-file",
        &gw_token,
        "--ca-root-cert",
        &root,
        "--dns-server",
        &dns,
        "--extra-roots",
        &standin_ca,
        "--bind-address",
        &gw_ip,
        "--admin-address",
        &gw_ip,
    ]);
    gateway.wait_for("egress gateway running", Duration::from_secs(40));

    // The workload's namespace: capture first (istio-init), then the
    // sidecar as uid 1337; the gateway Service's endpoint as Kubernetes
    // would give it.
    net.hosts_file(
        &net.app,
        &format!("127.0.0.1 localhost\n{} {HOST}\n", net.ip(100)),
    );
    net.exec_ok(&net.app, &[bin, "iptables"]);
    // The gateway Service's endpoint, as the endpoints controller writes
    // it: the sidecar dials the gateway pod from its EndpointSlice.
    endpoint_slice(
        &cluster,
        "curl-egress-tst",
        "curl-egress-tst",
        "http",
        &format!("{gw_ip}:80"),
    );
    let sc_token = proxy("curl-external-tst", "default", "sidecar");
    let sidecar = support::Proc::spawn_argv(&[
        "ip",
        "netns",
        "exec",
        &net.app,
        "setpriv",
        "--reuid=1337",
        "--regid=1337",
        "--clear-groups",
        bin,
        "sidecar",
        "--control-plane",
        &control_addr,
        "--workload",
        "curl-external-tst/curl-test-0",
        "--service-account",
        "default",
        "--ca-addr",
        &control_addr,
        "--ca-token-file",
        &sc_token,
        "--ca-root-cert",
        &root,
        "--dns-server",
        &dns,
        "--admin-address",
        "127.0.0.1",
    ]);
    sidecar.wait_for("sidecar running", Duration::from_secs(40));
    // The EndpointSlice may reach the sidecar in a push after its first
    // config: wait (bounded) until its live config has the gateway pod.
    let has_gateway_pod = format!("static {gw_ip}:80");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (dump, _) = curl_in(&net, &net.app, &["http://127.0.0.1:15000/clusters"]);
        if dump.contains(&has_gateway_pod) {
            break;
        }
        assert!(Instant::now() < deadline, "no gateway endpoint in {dump}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The seed's own request, as its container makes it.
    let url = format!("http://{HOST}/todos/1");
    let (body, code) = curl_in(&net, &net.app, &[&url]);
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("delectus aut autem"), "{body}");

    // The policy changed with kubectl: denied at the gateway.
    allow_seed_policy_from(&cluster, "some-other-ns");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (body, code) = curl_in(&net, &net.app, &[&url]);
        if code == "403" {
            assert_eq!(body, "RBAC: access denied");
            break;
        }
        assert!(Instant::now() < deadline, "still {code}: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
