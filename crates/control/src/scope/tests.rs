use super::*;
use meshgate_config::Loaded;
use meshgate_config::registry;
use meshgate_config::view;

const SEED: [&str; 10] = [
    include_str!("../../../../examples/seed/namespaces.yaml"),
    include_str!("../../../../examples/seed/deployment-workload.yaml"),
    include_str!("../../../../examples/seed/deployment-egress-gw.yaml"),
    include_str!("../../../../examples/seed/serviceentry.yaml"),
    include_str!("../../../../examples/seed/virtualservice-workload.yaml"),
    include_str!("../../../../examples/seed/virtualservice-egress-gw.yaml"),
    include_str!("../../../../examples/seed/destintionrule.yaml"),
    include_str!("../../../../examples/seed/gateway.yaml"),
    include_str!("../../../../examples/seed/authorization-policy.yaml"),
    include_str!("../../../../examples/seed/sidecar.yaml"),
];

/// More than the sidecar imports: a host it imports whose route leads to a
/// host it does not, and hosts it has nothing to do with.
const MORE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ext}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: curl-external-tst}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-to-backup, namespace: curl-external-tst}
spec:
  hosts: [api.example.com]
  http: [{route: [{destination: {host: backup.example.com}}]}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: backup, namespace: ext}
spec:
  hosts: [backup.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backup, namespace: ext}
spec:
  host: backup.example.com
  trafficPolicy: {connectionPool: {http: {maxRequestsPerConnection: 1}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: all-example, namespace: ext}
spec:
  host: "*.example.com"
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: unrelated, namespace: ext}
spec:
  hosts: [unrelated.test, "*.wild.test"]
  location: MESH_EXTERNAL
  resolution: NONE
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: unrelated, namespace: ext}
spec:
  hosts: [unrelated.test]
  tls: [{match: [{sniHosts: [unrelated.test]}], route: [{destination: {host: unrelated.test}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: unrelated, namespace: ext}
spec:
  host: unrelated.test
"#;

const WORKLOAD: &str = "curl-external-tst/curl-test";
const GATEWAY: &str = "curl-egress-tst/curl-egress-tst-gateway";

/// The seed and MORE, with the seed's Sidecar given `egress` hosts.
fn config(egress: &str) -> Config {
    load(SEED.iter().chain([&MORE]).map(|text| {
        text.replace(
            "  workloadSelector:",
            &format!("  egress: [{{hosts: {egress}}}]\n  workloadSelector:"),
        )
    }))
}

fn load(files: impl Iterator<Item = String>) -> Config {
    let mut loaded = Loaded::default();
    for (i, text) in files.enumerate() {
        meshgate_config::load::load_str(&format!("{i}.yaml"), &text, &mut loaded).unwrap();
    }
    let errors = loaded.error_messages();
    assert!(errors.is_empty(), "{errors:?}");
    loaded.config
}

fn workload(config: &Config, name: &str) -> Workload {
    registry::workloads(config, &MeshSettings::default())
        .into_iter()
        .find(|w| format!("{}/{}", w.namespace, w.name) == name)
        .unwrap()
}

/// The config as a trimmed proxy receives it.
fn trimmed(config: &Config, keep: &HashSet<Trimmed>) -> Config {
    let mut c = config.clone();
    let kept = |m: &meshgate_config::model::Meta| {
        keep.contains(&(m.kind.as_str(), m.namespace.clone(), m.name.clone()))
    };
    c.service_entries.retain(|r| kept(&r.meta));
    c.virtual_services.retain(|r| kept(&r.meta));
    c.destination_rules.retain(|r| kept(&r.meta));
    c
}

/// What the seed's workload is sent under its (egress-listing) Sidecar.
fn kept_for_workload(c: &Config) -> HashSet<Trimmed> {
    let mesh = MeshSettings::default();
    let w = workload(c, WORKLOAD);
    let sidecar = trimming_sidecar(c, &mesh, &w).expect("the seed's Sidecar, with egress");
    kept(c, &mesh, sidecar, &w.namespace)
}

/// The trimmed config builds the same proxy as the whole one.
fn assert_same_view(c: &Config, keep: &HashSet<Trimmed>) {
    assert_eq!(
        view_json(&trimmed(c, keep), WORKLOAD),
        view_json(c, WORKLOAD)
    );
}

fn view_json(config: &Config, name: &str) -> String {
    let v = view::build(config, &MeshSettings::default(), name).unwrap();
    serde_json::to_string_pretty(&v).unwrap()
}

fn names(keep: &HashSet<Trimmed>) -> Vec<String> {
    let mut v: Vec<String> = keep
        .iter()
        .map(|(k, ns, n)| format!("{k} {ns}/{n}"))
        .collect();
    v.sort();
    v
}

#[test]
fn a_sidecar_is_sent_its_imports_where_their_routes_lead_and_their_rules() {
    let c = config("['./jsonplaceholder.typicode.com', './api.example.com']");
    let keep = kept_for_workload(&c);
    assert_eq!(
        names(&keep),
        [
            "DestinationRule curl-egress-tst/jsonplaceholder-tls-origination",
            "DestinationRule ext/all-example",
            "DestinationRule ext/backup",
            "ServiceEntry curl-external-tst/api",
            "ServiceEntry curl-external-tst/jsonplaceholder",
            "ServiceEntry ext/backup",
            "VirtualService curl-external-tst/api-to-backup",
            "VirtualService curl-external-tst/jsonplaceholder-egress",
        ]
    );
    // What it is sent builds exactly what the whole config builds for it.
    assert_same_view(&c, &keep);
}

#[test]
fn what_a_sidecar_does_not_import_stays_unknown_to_it() {
    // Only the seed's host: api.example.com is now outside, so under
    // REGISTRY_ONLY it is refused in both configs alike.
    let c = config("['./jsonplaceholder.typicode.com']");
    let keep = kept_for_workload(&c);
    assert!(!names(&keep).iter().any(|n| n.contains("api")), "{keep:?}");
    let full = view_json(&c, WORKLOAD);
    assert!(!full.contains("api.example.com"), "{full}");
    assert_same_view(&c, &keep);
}

#[test]
fn gateways_and_sidecars_without_egress_hosts_see_everything() {
    let mesh = MeshSettings::default();
    let c = config("['./*']");
    let gw = workload(&c, GATEWAY);
    assert!(trimming_sidecar(&c, &mesh, &gw).is_none());

    // The seed as it is: its Sidecar has no egress section.
    let seed = load(SEED.iter().map(|t| (*t).to_owned()));
    let w = workload(&seed, WORKLOAD);
    assert!(
        trimming_sidecar(&seed, &mesh, &w).is_none(),
        "no egress section"
    );
}

#[test]
fn wildcard_imports_and_wildcard_hosts_overlap_both_ways() {
    let c = config("['ext/*.wild.test', './jsonplaceholder.typicode.com']");
    let keep = kept_for_workload(&c);
    // `*.wild.test` is imported only as the wildcard itself: `ext/*.wild.test`
    // covers that service's hostname.
    assert!(names(&keep).contains(&"ServiceEntry ext/unrelated".to_owned()));
    assert_same_view(&c, &keep);
}
