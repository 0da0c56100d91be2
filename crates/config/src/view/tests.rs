use super::*;
use crate::model::networking::ClientTlsMode;
use crate::registry;
use crate::testutil::{config, seed};

fn mesh() -> MeshSettings {
    MeshSettings::default()
}

fn workload_yaml(ns: &str, name: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  template:\n    metadata: {{labels: {{{labels}}}, annotations: {{sidecar.istio.io/inject: 'true'}}}}\n    spec:\n      containers: [{{name: app, image: x}}]\n"
    )
}

fn sidecar_yaml(ns: &str, name: &str, selector: &str, mode: &str) -> String {
    let sel = if selector.is_empty() {
        String::new()
    } else {
        format!("  workloadSelector: {{labels: {{{selector}}}}}\n")
    };
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{sel}  outboundTrafficPolicy: {{mode: {mode}}}\n"
    )
}

#[test]
fn sidecar_selection_order() {
    // (sidecars present, expected winner)
    let cases: Vec<(Vec<String>, Option<&str>)> = vec![
        (vec![], None),
        (
            vec![sidecar_yaml("app", "ns-wide", "", "ALLOW_ANY")],
            Some("app/ns-wide"),
        ),
        (
            vec![
                sidecar_yaml("app", "ns-wide", "", "ALLOW_ANY"),
                sidecar_yaml("app", "selected", "app: curl", "REGISTRY_ONLY"),
            ],
            Some("app/selected"),
        ),
        (
            vec![sidecar_yaml("app", "other", "app: nope", "REGISTRY_ONLY")],
            None,
        ),
        (
            vec![sidecar_yaml("istio-system", "global", "", "REGISTRY_ONLY")],
            Some("istio-system/global"),
        ),
        (
            vec![
                sidecar_yaml("istio-system", "global", "", "REGISTRY_ONLY"),
                sidecar_yaml("app", "ns-wide", "", "ALLOW_ANY"),
            ],
            Some("app/ns-wide"),
        ),
        (
            vec![sidecar_yaml("elsewhere", "x", "", "REGISTRY_ONLY")],
            None,
        ),
    ];
    for (sidecars, want) in cases {
        let text = format!(
            "{}{}",
            workload_yaml("app", "curl", "app: curl"),
            sidecars.concat()
        );
        let c = config(&text);
        let r = registry::build(&c, &mesh());
        let w = &r.workloads[0];
        let got = sidecar_for(&c, w, &mesh()).map(|s| s.meta.full_name());
        assert_eq!(got.as_deref(), want, "{sidecars:?}");
    }
}

#[test]
fn outbound_policy_defaults_to_allow_any() {
    let c = config(&workload_yaml("app", "curl", "app: curl"));
    let p = outbound_policy(None, &mesh());
    assert_eq!(
        (p.mode, p.source.as_str()),
        (OutboundMode::AllowAny, "mesh default")
    );
    let c2 = config(&format!(
        "{}{}",
        workload_yaml("app", "curl", "app: curl"),
        sidecar_yaml("app", "s", "", "REGISTRY_ONLY")
    ));
    assert_eq!(
        outbound_policy(c2.sidecars.first(), &mesh()).mode,
        OutboundMode::RegistryOnly
    );
    assert!(c.sidecars.is_empty());
}

fn dr_yaml(ns: &str, name: &str, host: &str, export: &str) -> String {
    let export = if export.is_empty() {
        String::new()
    } else {
        format!("  exportTo: [{export}]\n")
    };
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  host: {host}\n{export}  trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: /ca.pem}}}}\n"
    )
}

#[test]
fn destination_rule_lookup_order() {
    let host = "svc.server.svc.cluster.local";
    // client in `client`, service in `server`.
    let cases: Vec<(Vec<String>, Option<&str>)> = vec![
        (vec![], None),
        (vec![dr_yaml("client", "c", host, "")], Some("client/c")),
        (vec![dr_yaml("client", "c", host, "'.'")], Some("client/c")),
        (vec![dr_yaml("server", "s", host, "")], Some("server/s")),
        (vec![dr_yaml("server", "s", host, "'.'")], None),
        (
            vec![dr_yaml("server", "s", host, "client")],
            Some("server/s"),
        ),
        (
            vec![dr_yaml("istio-system", "root", host, "")],
            Some("istio-system/root"),
        ),
        (
            vec![
                dr_yaml("server", "s", host, ""),
                dr_yaml("client", "c", host, ""),
            ],
            Some("client/c"),
        ),
        (
            vec![
                dr_yaml("istio-system", "root", host, ""),
                dr_yaml("server", "s", host, ""),
            ],
            Some("server/s"),
        ),
        (vec![dr_yaml("third", "t", host, "")], None),
        (
            vec![
                dr_yaml("client", "wild", "'*.server.svc.cluster.local'", ""),
                dr_yaml("client", "exact", host, ""),
            ],
            Some("client/exact"),
        ),
        (
            vec![dr_yaml("server", "short", "svc", "")],
            Some("server/short"),
        ),
    ];
    for (drs, want) in cases {
        let c = config(&drs.concat());
        let got = destination_rule_for(&c, "client", None, host, "server", &mesh())
            .map(|d| d.meta.full_name());
        assert_eq!(got.as_deref(), want, "{drs:?}");
    }
}

#[test]
fn port_level_settings_override_without_inheriting() {
    let c = config(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d, namespace: n}\nspec:\n  host: x.com\n  trafficPolicy:\n    tls: {mode: SIMPLE, sni: top.x.com}\n    loadBalancer: {simple: RANDOM}\n    portLevelSettings:\n    - port: {number: 443}\n      tls: {mode: MUTUAL, clientCertificate: /c, privateKey: /k}\n  subsets:\n  - name: v2\n    trafficPolicy: {tls: {mode: DISABLE}}\n",
    );
    let dr = &c.destination_rules[0].spec;
    let p80 = effective_policy(dr, 80, "");
    assert_eq!(
        p80.tls.as_ref().map(|t| (t.mode, t.sni.as_str())),
        Some((ClientTlsMode::Simple, "top.x.com"))
    );
    let p443 = effective_policy(dr, 443, "");
    assert_eq!(
        p443.tls.as_ref().map(|t| (t.mode, t.sni.as_str())),
        Some((ClientTlsMode::Mutual, ""))
    );
    assert!(
        p443.load_balancer.is_some(),
        "a port entry without loadBalancer keeps the top-level one"
    );
    let v2 = effective_policy(dr, 80, "v2");
    assert_eq!(v2.tls.map(|t| t.mode), Some(ClientTlsMode::Disable));
}

fn ap_yaml(ns: &str, name: &str, selector: &str) -> String {
    let sel = if selector.is_empty() {
        String::new()
    } else {
        format!("  selector: {{matchLabels: {{{selector}}}}}\n")
    };
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{sel}  rules: [{{}}]\n"
    )
}

#[test]
fn authorization_policy_scope() {
    let text = [
        workload_yaml("app", "curl", "app: curl"),
        ap_yaml("app", "ns-wide", ""),
        ap_yaml("app", "selected", "app: curl"),
        ap_yaml("app", "other", "app: nope"),
        ap_yaml("istio-system", "mesh-wide", ""),
        ap_yaml("istio-system", "mesh-selected", "app: curl"),
        ap_yaml("elsewhere", "elsewhere", ""),
    ]
    .concat();
    let c = config(&text);
    let r = registry::build(&c, &mesh());
    let got: Vec<String> = authorization_policies_for(&c, &r.workloads[0], &mesh())
        .iter()
        .map(|p| p.meta.full_name())
        .collect();
    assert_eq!(
        got,
        vec![
            "app/ns-wide",
            "app/selected",
            "istio-system/mesh-wide",
            "istio-system/mesh-selected"
        ]
    );
}

#[test]
fn peer_authentication_precedence() {
    let pa = |ns: &str, name: &str, sel: &str, mode: &str, port: &str| {
        let sel = if sel.is_empty() {
            String::new()
        } else {
            format!("  selector: {{matchLabels: {{{sel}}}}}\n")
        };
        let port = if port.is_empty() {
            String::new()
        } else {
            format!("  portLevelMtls: {{{port}}}\n")
        };
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{sel}  mtls: {{mode: {mode}}}\n{port}"
        )
    };
    let cases: Vec<(Vec<String>, Option<u32>, MtlsMode)> = vec![
        (vec![], None, MtlsMode::Permissive),
        (
            vec![pa("istio-system", "m", "", "STRICT", "")],
            None,
            MtlsMode::Strict,
        ),
        (
            vec![
                pa("istio-system", "m", "", "STRICT", ""),
                pa("app", "n", "", "PERMISSIVE", ""),
            ],
            None,
            MtlsMode::Permissive,
        ),
        (
            vec![
                pa("app", "n", "", "STRICT", ""),
                pa("app", "w", "app: curl", "UNSET", ""),
            ],
            None,
            MtlsMode::Strict,
        ),
        (
            vec![pa(
                "app",
                "w",
                "app: curl",
                "STRICT",
                "8080: {mode: DISABLE}",
            )],
            Some(8080),
            MtlsMode::Disable,
        ),
        (
            vec![pa(
                "app",
                "w",
                "app: curl",
                "STRICT",
                "8080: {mode: DISABLE}",
            )],
            Some(80),
            MtlsMode::Strict,
        ),
    ];
    for (pas, port, want) in cases {
        let c = config(&format!(
            "{}{}",
            workload_yaml("app", "curl", "app: curl"),
            pas.concat()
        ));
        let r = registry::build(&c, &mesh());
        assert_eq!(
            peer_authentication_for(&c, &r.workloads[0], port, &mesh()).mode,
            want,
            "{pas:?} {port:?}"
        );
    }
}

#[test]
fn sidecar_egress_imports() {
    let c = config(&format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: s, namespace: app}}\nspec:\n  egress: [{{hosts: ['./*', 'ext/*.example.com', '~ext/bad.example.com']}}]\n",
        workload_yaml("app", "curl", "app: curl")
    ));
    let sc = c.sidecars.first();
    let svc = |ns: &str, host: &str| registry::Service {
        hostname: host.to_owned(),
        namespace: ns.to_owned(),
        source: registry::ServiceSource::ServiceEntry { name: "x".into() },
        ports: vec![],
        location: Default::default(),
        resolution: Default::default(),
        addresses: vec![],
        endpoints: vec![],
        selector: None,
        export_to: vec![],
        service_accounts: vec![],
        mesh_endpoints: false,
    };
    let cases = [
        ("app", "a.app.svc.cluster.local", true),
        ("ext", "api.example.com", true),
        ("ext", "bad.example.com", false),
        ("ext", "other.com", false),
        ("third", "api.example.com", false),
    ];
    for (ns, host, want) in cases {
        assert_eq!(
            sidecar_imports(sc, &svc(ns, host), "app"),
            want,
            "{ns}/{host}"
        );
    }
    assert!(sidecar_imports(None, &svc("x", "y.com"), "app"));
}

#[test]
fn seed_sidecar_view() {
    let c = seed();
    let r = registry::build(&c, &mesh());
    let w = view_workload(&r, "curl-external-tst/curl-test");
    let v = proxy_view(&c, &r, &mesh(), w);
    assert_eq!(v.outbound_traffic_policy.mode, OutboundMode::RegistryOnly);
    assert_eq!(
        v.sidecar.as_deref(),
        Some("curl-external-tst/restrict-outbound-traffic")
    );
    let route = v
        .routes
        .iter()
        .find(|r| r.host == "jsonplaceholder.typicode.com" && r.listener_port == 80)
        .expect("route for jsonplaceholder:80");
    assert_eq!(
        route.virtual_service.as_deref(),
        Some("curl-external-tst/jsonplaceholder-egress")
    );
    let RouteAction::Route(dests) = &route.action else {
        panic!("not a route")
    };
    assert_eq!(
        dests[0].cluster_name(),
        "outbound|80||curl-egress-tst.curl-egress-tst.svc.cluster.local"
    );
    let cluster = v
        .clusters
        .iter()
        .find(|c| c.name == dests[0].cluster_name())
        .unwrap();
    assert_eq!(cluster.tls.mode, ClientTlsMode::IstioMutual);
    assert!(cluster.tls.auto);
    assert_eq!(
        cluster.tls.expected_identities,
        vec!["spiffe://cluster.local/ns/curl-egress-tst/sa/curl-egress-tst"]
    );
    assert_eq!(
        cluster.tls.sni,
        "outbound_.80_._.curl-egress-tst.curl-egress-tst.svc.cluster.local"
    );
}

#[test]
fn seed_gateway_view() {
    let c = seed();
    let r = registry::build(&c, &mesh());
    let w = view_workload(&r, "curl-egress-tst/curl-egress-tst-gateway");
    let v = proxy_view(&c, &r, &mesh(), w);
    assert_eq!(v.listeners.len(), 1);
    let l = &v.listeners[0];
    assert_eq!((l.port, l.bind_port, l.protocol), (80, 80, Protocol::Http));
    assert_eq!(l.hosts, vec!["jsonplaceholder.typicode.com"]);
    assert_eq!(v.routes.len(), 1);
    let RouteAction::Route(dests) = &v.routes[0].action else {
        panic!("not a route")
    };
    assert_eq!(
        (dests[0].host.as_str(), dests[0].port),
        ("jsonplaceholder.typicode.com", 443)
    );
    let cl = &v.clusters[0];
    assert_eq!(cl.resolution, ClusterResolution::Dns);
    assert_eq!(
        cl.endpoints,
        ClusterEndpoints::Dns {
            names: vec![HostPort {
                host: "jsonplaceholder.typicode.com".into(),
                port: 443,
                priority: 0,
                weight: None,
            }],
            first_only: false
        }
    );
    assert_eq!(cl.tls.mode, ClientTlsMode::Simple);
    assert_eq!(cl.tls.sni, "jsonplaceholder.typicode.com");
    assert_eq!(cl.tls.trust, "system roots");
    assert_eq!(
        cl.destination_rule.as_deref(),
        Some("curl-egress-tst/jsonplaceholder-tls-origination")
    );
    assert_eq!(v.authorization_policies.len(), 1);
    let policy = &v.authorization_policies[0];
    assert_eq!(policy.action, AuthzAction::Allow);
    let rules: Vec<String> = policy.rules.iter().flatten().map(rule_summary).collect();
    assert_eq!(rules, vec!["from namespaces=[curl-external-tst]"]);
}

/// A Gateway's routes come from the VirtualServices that name it, once
/// each however they name it; one naming another Gateway adds none.
#[test]
fn a_gateway_routes_each_virtual_service_that_names_it_once() {
    let mut c = seed();
    let extra = config(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: twice, namespace: curl-egress-tst}\nspec:\n  hosts: [jsonplaceholder.typicode.com]\n  gateways: [egress-gateway, curl-egress-tst/egress-gateway, mesh]\n  http:\n  - match: [{uri: {prefix: /twice}}]\n    route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: elsewhere, namespace: curl-external-tst}\nspec:\n  hosts: [jsonplaceholder.typicode.com]\n  gateways: [egress-gateway]\n  http:\n  - match: [{uri: {prefix: /elsewhere}}]\n    route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]\n",
    );
    c.virtual_services.extend(extra.virtual_services);
    let r = registry::build(&c, &mesh());
    let w = view_workload(&r, "curl-egress-tst/curl-egress-tst-gateway");
    let v = proxy_view(&c, &r, &mesh(), w);
    // The seed's route and `twice`'s; `elsewhere` names a Gateway of its
    // own namespace, which does not exist.
    assert_eq!(v.routes.len(), 2, "{:#?}", v.routes);
}

fn view_workload<'a>(r: &'a Registry, name: &str) -> &'a Workload {
    find_workload(r, name).expect("workload exists")
}

#[test]
fn unknown_workload_lists_known_ones() {
    let c = seed();
    let r = registry::build(&c, &mesh());
    let err = find_workload(&r, "nope/nothing").unwrap_err().to_string();
    assert!(
        err.ends_with(
            "(found: curl-egress-tst/curl-egress-tst-gateway, curl-external-tst/curl-test)"
        ),
        "{err}"
    );
}

#[test]
fn gateway_port_maps_through_the_service_target_port() {
    let text = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: gw, namespace: g}
spec:
  template:
    metadata: {labels: {istio: eg}}
    spec:
      containers: [{name: istio-proxy, image: proxyv2}]
---
apiVersion: v1
kind: Service
metadata: {name: gw, namespace: g}
spec:
  selector: {istio: eg}
  ports: [{name: http, port: 80, targetPort: 8080}]
";
    let c = config(text);
    let r = registry::build(&c, &mesh());
    let w = &r.workloads[0];
    assert_eq!(gateway_listen_port(&r, w, 80), (8080, true));
    assert_eq!(gateway_listen_port(&r, w, 443), (443, false));
}

#[test]
fn the_sidecar_dials_the_gateway_services_target_port_where_the_gateway_listens() {
    // The gateway's container listens on 8080 behind Service port 80, by
    // number and by the container port's name.
    let gw = include_str!("../../../../examples/seed/deployment-egress-gw.yaml")
        .replace("- containerPort: 80\n", "- containerPort: 8080\n");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/seed");
    for target in ["8080", "http"] {
        let mut loaded = crate::Loaded::default();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let mut text = std::fs::read_to_string(&path).unwrap();
            if path.ends_with("deployment-egress-gw.yaml") {
                text = gw.replace("targetPort: 80", &format!("targetPort: {target}"));
            }
            crate::load::load_str("seed.yaml", &text, &mut loaded).unwrap();
        }
        assert!(loaded.error_messages().is_empty());
        let c = loaded.config;
        let r = registry::build(&c, &mesh());
        let sc = proxy_view(
            &c,
            &r,
            &mesh(),
            view_workload(&r, "curl-external-tst/curl-test"),
        );
        let cluster = sc
            .clusters
            .iter()
            .find(|c| c.host == "curl-egress-tst.curl-egress-tst.svc.cluster.local")
            .expect("the gateway's cluster");
        assert_eq!(cluster.port, 80, "the cluster keeps the Service port");
        let ClusterEndpoints::Dns { names, .. } = &cluster.endpoints else {
            panic!("{:?}", cluster.endpoints)
        };
        assert_eq!(names[0].port, 8080, "targetPort {target}");
        let gw_view = proxy_view(
            &c,
            &r,
            &mesh(),
            view_workload(&r, "curl-egress-tst/curl-egress-tst-gateway"),
        );
        assert_eq!(
            (gw_view.listeners[0].port, gw_view.listeners[0].bind_port),
            (80, 8080),
            "targetPort {target}"
        );
    }
}

/// A Sidecar egress listener with a `port` imports its hosts on that port
/// only; without one, on all their ports.
#[test]
fn sidecar_egress_port_scopes_the_imports() {
    use crate::model::networking::{IstioEgressListener, ServicePort};
    let listener_ports = |port: Option<u32>| {
        let mut c = seed();
        c.sidecars[0].spec.egress = vec![IstioEgressListener {
            port: port.map(|number| ServicePort {
                number,
                protocol: "HTTP".to_owned(),
                name: "http".to_owned(),
                target_port: None,
            }),
            hosts: vec!["*/*".to_owned()],
            ..IstioEgressListener::default()
        }];
        let r = registry::build(&c, &mesh());
        let w = view_workload(&r, "curl-external-tst/curl-test");
        let v = proxy_view(&c, &r, &mesh(), w);
        v.listeners
            .iter()
            .filter(|l| l.hosts.iter().any(|h| h == "jsonplaceholder.typicode.com"))
            .map(|l| l.port)
            .collect::<Vec<_>>()
    };
    assert_eq!(listener_ports(None), [80, 443]);
    assert_eq!(listener_ports(Some(80)), [80]);
}
