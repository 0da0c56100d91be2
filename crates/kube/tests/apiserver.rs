//! The CustomResourceDefinitions against a real kube-apiserver: it takes
//! them as structural schemas, takes the seed's files, and refuses what
//! `meshgate check` cannot read.
#![allow(clippy::unwrap_used)]

use meshgate_kube::testing::TestCluster;

fn seed() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/seed").to_owned()
}

#[test]
#[cfg_attr(
    no_kube,
    ignore = "needs kube-apiserver, etcd and kubectl: run tests/kube/build"
)]
fn the_crds_take_the_seed_and_refuse_what_check_cannot_read() {
    let cluster = TestCluster::start();
    let crds = meshgate_kube::crds_yaml().unwrap();
    cluster.kubectl_ok(&["apply", "-f", "-"], &crds);
    for crd in [
        "serviceentries.networking.istio.io",
        "authorizationpolicies.security.istio.io",
    ] {
        cluster.kubectl_ok(
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                &format!("crd/{crd}"),
            ],
            "",
        );
    }

    // As a user would: the namespaces first (objects in a namespace created
    // a moment earlier in the same apply can be refused), then the folder.
    let seed = seed();
    cluster.kubectl_ok(&["apply", "-f", &format!("{seed}/namespaces.yaml")], "");
    let applied = cluster.kubectl_ok(&["apply", "-f", &seed], "");
    assert!(
        applied.contains("serviceentry.networking.istio.io/jsonplaceholder created"),
        "{applied}"
    );
    let got = cluster.kubectl_ok(&["get", "vs,dr,gw,se,ap,sidecar", "-A", "-o", "name"], "");
    for name in [
        "virtualservice",
        "destinationrule",
        "gateway",
        "serviceentry",
        "authorizationpolicy",
        "sidecar",
    ] {
        assert!(got.contains(&format!("{name}.")), "no {name} in {got}");
    }

    // A field the model does not know, a wrong type, an unknown enum value.
    let bad = [
        (
            "spec:\n  hosts: [a.example.com]\n  resolutoin: DNS\n",
            "unknown field \"spec.resolutoin\"",
        ),
        (
            "spec:\n  hosts: a.example.com\n",
            "spec.hosts: Invalid value: \"string\"",
        ),
        (
            "spec:\n  hosts: [a.example.com]\n  resolution: DSN\n",
            "Unsupported value: \"DSN\"",
        ),
    ];
    for (spec, want) in bad {
        let doc = format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: bad\n  namespace: default\n{spec}"
        );
        let out = cluster.kubectl_stdin(&["apply", "-f", "-"], &doc);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{spec}: {err}");
    }
}

#[test]
#[cfg_attr(
    no_kube,
    ignore = "needs kube-apiserver, etcd and kubectl: run tests/kube/build"
)]
fn kube_inject_output_is_accepted_by_the_api_server() {
    let cluster = TestCluster::start();
    let seed = seed();
    cluster.kubectl_ok(&["apply", "-f", &format!("{seed}/namespaces.yaml")], "");
    let injector = meshgate_kube::inject::Injector::default();
    for file in ["deployment-workload.yaml", "deployment-egress-gw.yaml"] {
        let injected = injector
            .inject_yaml(&std::fs::read_to_string(format!("{seed}/{file}")).unwrap())
            .unwrap();
        let out = cluster.kubectl_ok(&["apply", "--dry-run=server", "-f", "-"], &injected);
        assert!(out.contains("deployment.apps/"), "{file}: {out}");
    }
}

#[test]
fn deploy_crds_yaml_is_what_meshgate_crds_prints() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/crds.yaml");
    let on_disk = std::fs::read_to_string(file).unwrap();
    assert!(
        on_disk == meshgate_kube::crds_yaml().unwrap(),
        "deploy/crds.yaml is stale: run `cargo run -- crds > deploy/crds.yaml`"
    );
}
