use super::*;
use crate::testutil::{config, seed};

#[test]
fn host_matching() {
    let cases = [
        ("a.example.com", "a.example.com", true),
        ("A.example.com", "a.EXAMPLE.com", true),
        ("*.example.com", "a.example.com", true),
        ("*.example.com", "a.b.example.com", true),
        ("*.example.com", "example.com", false),
        ("*.example.com", "aexample.com", false),
        ("*", "anything.at.all", true),
        ("a.example.com", "b.example.com", false),
    ];
    for (pattern, name, want) in cases {
        assert_eq!(host_matches(pattern, name), want, "{pattern} vs {name}");
    }
    assert!(hosts_overlap("a.example.com", "*.example.com"));
    assert!(!hosts_overlap("a.example.com", "*.other.com"));
}

#[test]
fn export_to_table() {
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    let cases = [
        (s(&[]), "a", "b", true),
        (s(&["*"]), "a", "b", true),
        (s(&["."]), "a", "a", true),
        (s(&["."]), "a", "b", false),
        (s(&["~"]), "a", "a", false),
        (s(&["b", "c"]), "a", "c", true),
        (s(&["b", "c"]), "a", "a", false),
    ];
    for (export, own, target, want) in cases {
        assert_eq!(
            exported_to(&export, own, target),
            want,
            "{export:?} {own}->{target}"
        );
    }
}

#[test]
fn short_hosts_resolve_in_the_rule_namespace() {
    let mesh = MeshSettings::default();
    assert_eq!(
        resolve_host("reviews", "foo", &mesh),
        "reviews.foo.svc.cluster.local"
    );
    assert_eq!(resolve_host("reviews.bar", "foo", &mesh), "reviews.bar");
    assert_eq!(resolve_host("*", "foo", &mesh), "*");
}

#[test]
fn protocols() {
    let cases = [
        ("http", None, Protocol::Http),
        ("http-web", None, Protocol::Http),
        ("grpc-api", None, Protocol::Grpc),
        ("https", None, Protocol::Https),
        ("web", None, Protocol::Unsupported),
        ("web", Some("http"), Protocol::Http),
        ("x", Some("kubernetes.io/h2c"), Protocol::Http2),
        ("tcp-db", None, Protocol::Tcp),
    ];
    for (name, app, want) in cases {
        assert_eq!(Protocol::from_kube_port(name, app), want, "{name} {app:?}");
    }
    assert_eq!(Protocol::parse("hTTp"), Protocol::Http);
    assert_eq!(Protocol::parse(""), Protocol::Unsupported);
}

const NAMESPACES: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: rev, labels: {istio.io/rev: stable}}
---
apiVersion: v1
kind: Namespace
metadata: {name: on, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: off, labels: {istio-injection: disabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
";

fn deployment(ns: &str, name: &str, labels: &str, annotations: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  template:\n    metadata: {{labels: {{{labels}}}, annotations: {{{annotations}}}}}\n    spec:\n{extra}      containers: [{{name: app, image: x}}]\n"
    )
}

#[test]
fn injection_and_gateway_detection() {
    let cases = [
        ("rev", "", "", ProxyKind::Sidecar),
        ("on", "", "", ProxyKind::Sidecar),
        ("plain", "", "", ProxyKind::None),
        (
            "plain",
            "",
            "sidecar.istio.io/inject: 'true'",
            ProxyKind::Sidecar,
        ),
        (
            "plain",
            "sidecar.istio.io/inject: 'true'",
            "",
            ProxyKind::Sidecar,
        ),
        (
            "on",
            "sidecar.istio.io/inject: 'false'",
            "",
            ProxyKind::None,
        ),
        (
            "on",
            "",
            "sidecar.istio.io/inject: 'false'",
            ProxyKind::None,
        ),
        (
            "off",
            "",
            "sidecar.istio.io/inject: 'true'",
            ProxyKind::None,
        ),
        (
            "plain",
            "",
            "inject.istio.io/templates: gateway",
            ProxyKind::Gateway,
        ),
        (
            "on",
            "",
            "inject.istio.io/templates: 'sidecar,gateway'",
            ProxyKind::Gateway,
        ),
    ];
    for (ns, labels, annotations, want) in cases {
        let text = format!(
            "{NAMESPACES}{}",
            deployment(ns, "w", labels, annotations, "")
        );
        let c = config(&text);
        let ws = workloads(&c, &MeshSettings::default());
        assert_eq!(
            ws[0].proxy, want,
            "ns={ns} labels={labels} annotations={annotations}"
        );
    }
}

#[test]
fn identity_defaults_to_the_default_service_account() {
    let text = format!(
        "{}{}",
        deployment("a", "one", "app: x", "", ""),
        deployment(
            "b",
            "two",
            "app: y",
            "",
            "      serviceAccountName: robot\n"
        )
    );
    let ws = workloads(&config(&text), &MeshSettings::default());
    assert_eq!(ws[0].service_account, "default");
    assert_eq!(ws[0].spiffe_id, "spiffe://cluster.local/ns/a/sa/default");
    assert_eq!(ws[1].spiffe_id, "spiffe://cluster.local/ns/b/sa/robot");
    let td = MeshSettings {
        trust_domain: "corp.example".into(),
        ..MeshSettings::default()
    };
    assert_eq!(
        workloads(&config(&text), &td)[1].spiffe_id,
        "spiffe://corp.example/ns/b/sa/robot"
    );
}

#[test]
fn seed_registry() {
    let c = seed();
    let r = build(&c, &MeshSettings::default());
    let hosts: Vec<&str> = r.services.iter().map(|s| s.hostname.as_str()).collect();
    assert_eq!(
        hosts,
        vec![
            "curl-egress-tst.curl-egress-tst.svc.cluster.local",
            "jsonplaceholder.typicode.com"
        ]
    );
    let gw_svc = &r.services[0];
    assert!(gw_svc.mesh_endpoints, "the gateway is a mesh endpoint");
    assert_eq!(
        gw_svc.service_accounts,
        vec!["spiffe://cluster.local/ns/curl-egress-tst/sa/curl-egress-tst"]
    );
    assert_eq!(gw_svc.ports[0].protocol, Protocol::Http);
    let se = &r.services[1];
    assert_eq!(
        (se.namespace.as_str(), se.location, se.resolution),
        ("curl-external-tst", Location::MeshExternal, Resolution::Dns)
    );
    assert_eq!(
        se.ports.iter().map(|p| p.number).collect::<Vec<_>>(),
        vec![80, 443]
    );
    assert!(!se.mesh_endpoints);

    let curl = r.workload("curl-external-tst", "curl-test").unwrap();
    assert_eq!(curl.proxy, ProxyKind::Sidecar);
    assert_eq!(
        curl.spiffe_id,
        "spiffe://cluster.local/ns/curl-external-tst/sa/default"
    );
    let gw = r
        .workload("curl-egress-tst", "curl-egress-tst-gateway")
        .unwrap();
    assert_eq!(gw.proxy, ProxyKind::Gateway);
    assert_eq!(r.services_of(gw).count(), 1);
}

#[test]
fn lookup_respects_export_and_prefers_own_namespace() {
    let se = |ns: &str, export: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: se, namespace: {ns}}}\nspec:\n  hosts: [x.example.com]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  exportTo: [{export}]\n"
        )
    };
    let c = config(&format!("{}{}", se("a", "'*'"), se("b", "'.'")));
    let r = build(&c, &MeshSettings::default());
    assert_eq!(
        r.lookup("x.example.com", "b").map(|s| s.namespace.as_str()),
        Some("b")
    );
    assert_eq!(
        r.lookup("x.example.com", "c").map(|s| s.namespace.as_str()),
        Some("a")
    );
    let c = config(&se("a", "'.'"));
    let r = build(&c, &MeshSettings::default());
    assert!(r.lookup("x.example.com", "c").is_none());
    assert!(r.lookup_any("x.example.com").is_some());
}

#[test]
fn endpoint_slices_give_each_service_port_its_ready_pods_on_the_target_port() {
    let c = config(
        "apiVersion: v1\nkind: Service\nmetadata: {name: gw, namespace: egress}\n\
         spec:\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n  - {name: https, port: 443}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: gw-abc, namespace: egress, labels: {kubernetes.io/service-name: gw}}\n\
         addressType: IPv4\nports:\n- {name: http, port: 8080, protocol: TCP}\nendpoints:\n\
         - addresses: [10.0.0.5]\n  conditions: {ready: true}\n\
         - addresses: [10.0.0.6]\n  conditions: {ready: false}\n\
         - addresses: [10.0.0.7]\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: egress}\nspec:\n  ports:\n  - {name: http, port: 80}\n",
    );
    let got = service_endpoints(&c, &MeshSettings::default());
    let addrs = |v: &[&str]| {
        v.iter()
            .map(|a| a.parse().unwrap())
            .collect::<Vec<std::net::SocketAddr>>()
    };
    assert_eq!(
        got["gw.egress.svc.cluster.local:80"],
        addrs(&["10.0.0.5:8080", "10.0.0.7:8080"])
    );
    // No slice port of that name: no endpoints (not DNS: the slices speak).
    assert_eq!(got["gw.egress.svc.cluster.local:443"], addrs(&[]));
    // No slices at all: left to DNS.
    assert!(!got.contains_key("other.egress.svc.cluster.local:80"));
}
