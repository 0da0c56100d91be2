#![allow(clippy::unwrap_used)]

use meshgate_config::model::Config;

use super::*;

const GATEWAY: &str = "curl-egress-tst/curl-egress-tst-gateway";
const CLUSTER: &str = "outbound|443||jsonplaceholder.typicode.com";

/// The gateway's view of the seed with this DestinationRule.
fn seed(destination_rule: &str) -> ProxyView {
    let mesh = meshgate_config::MeshSettings::default();
    view::build(&seed_config(destination_rule), &mesh, GATEWAY).unwrap()
}

fn seed_config(destination_rule: &str) -> Config {
    let mut loaded = meshgate_config::Loaded::default();
    for (name, text) in [
        (
            "namespaces.yaml",
            include_str!("../../../../examples/seed/namespaces.yaml"),
        ),
        (
            "deployment-egress-gw.yaml",
            include_str!("../../../../examples/seed/deployment-egress-gw.yaml"),
        ),
        (
            "gateway.yaml",
            include_str!("../../../../examples/seed/gateway.yaml"),
        ),
        (
            "serviceentry.yaml",
            include_str!("../../../../examples/seed/serviceentry.yaml"),
        ),
        (
            "virtualservice-egress-gw.yaml",
            include_str!("../../../../examples/seed/virtualservice-egress-gw.yaml"),
        ),
        ("destintionrule.yaml", destination_rule),
    ] {
        meshgate_config::load::load_str(name, text, &mut loaded).unwrap();
    }
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    loaded.config
}

fn ctx() -> BuildContext {
    BuildContext {
        resolver: Resolver::new(Some("127.0.0.1:53".parse().unwrap())).unwrap(),
        roots: DefaultRoots::load(&[]).unwrap(),
        identity: None,
        endpoints: HashMap::new(),
    }
}

fn cluster(s: &Snapshot) -> Arc<ClusterEntry> {
    let i = s
        .cluster_names
        .iter()
        .position(|n| &**n == CLUSTER)
        .unwrap();
    s.clusters[i].clone().unwrap()
}

#[test]
fn h2_for_h2_ports_an_explicit_upgrade_or_meshgate_peers() {
    use UpstreamHttp::{Http1, Http2, Http2Peers};
    use meshgate_config::model::networking::{
        ConnectionPoolSettings, H2UpgradePolicy, HttpSettings,
    };
    let policy = |p: Option<H2UpgradePolicy>| view::EffectivePolicy {
        connection_pool: Some(ConnectionPoolSettings {
            http: Some(HttpSettings {
                h2_upgrade_policy: p,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let none = view::EffectivePolicy::default();
    let default = policy(Some(H2UpgradePolicy::Default));
    let up = policy(Some(H2UpgradePolicy::Upgrade));
    let keep = policy(Some(H2UpgradePolicy::DoNotUpgrade));
    let (plain, simple, mesh) = (
        ClientTlsMode::Disable,
        ClientTlsMode::Simple,
        ClientTlsMode::IstioMutual,
    );
    for (protocol, policy, tls, want) in [
        (Protocol::Http, &none, plain, Http1),
        (Protocol::Http, &none, simple, Http1),
        (Protocol::Http, &keep, plain, Http1),
        (Protocol::Http, &up, plain, Http2),
        (Protocol::Http2, &none, plain, Http2),
        (Protocol::Grpc, &none, simple, Http2),
        (Protocol::Tcp, &up, plain, Http1),
        // Between meshgate peers, unless the DestinationRule keeps HTTP/1.1.
        (Protocol::Http, &none, mesh, Http2Peers),
        (Protocol::Http, &default, mesh, Http2Peers),
        (Protocol::Http, &keep, mesh, Http1),
        (Protocol::Http, &up, mesh, Http2),
        (Protocol::Tcp, &none, mesh, Http1),
    ] {
        assert_eq!(
            upstream_http(protocol, policy, tls),
            want,
            "{protocol:?} {policy:?} {tls:?}"
        );
    }
}

#[test]
fn rebuild_keeps_unchanged_clusters_and_replaces_changed_ones() {
    let dr = include_str!("../../../../examples/seed/destintionrule.yaml");
    let ctx = ctx();
    let first = Snapshot::build(seed(dr), &ctx).unwrap();
    let same = Snapshot::rebuild(seed(dr), &ctx, Some(&first)).unwrap();
    assert!(
        Arc::ptr_eq(&cluster(&first), &cluster(&same)),
        "same config: same cluster, pools and outlier state kept"
    );
    let changed = dr.replace("mode: SIMPLE", "mode: DISABLE");
    let other = Snapshot::rebuild(seed(&changed), &ctx, Some(&same)).unwrap();
    assert!(!Arc::ptr_eq(&cluster(&same), &cluster(&other)));
}

/// A rotated certificate file (same path) or a changed set of default
/// roots rebuilds the clusters built from them on reload.
#[test]
fn rebuild_replaces_clusters_whose_certificate_files_or_roots_changed() {
    let dir = std::env::temp_dir().join(format!("meshgate-stamp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    let first_ca = crate::standin::StandinCa::new("first").unwrap();
    std::fs::write(&ca_file, &first_ca.root_pem).unwrap();
    let with_file = include_str!("../../../../examples/seed/destintionrule.yaml").replace(
        "mode: SIMPLE #TLS origination",
        &format!("mode: SIMPLE\n      caCertificates: {}", ca_file.display()),
    );
    let ctx = ctx();
    let first = Snapshot::build(seed(&with_file), &ctx).unwrap();
    let same = Snapshot::rebuild(seed(&with_file), &ctx, Some(&first)).unwrap();
    assert!(Arc::ptr_eq(&cluster(&first), &cluster(&same)));
    let second_ca = crate::standin::StandinCa::new("second").unwrap();
    std::fs::write(&ca_file, &second_ca.root_pem).unwrap();
    let rotated = Snapshot::rebuild(seed(&with_file), &ctx, Some(&same)).unwrap();
    assert!(
        !Arc::ptr_eq(&cluster(&same), &cluster(&rotated)),
        "the CA file changed"
    );
    std::fs::remove_dir_all(&dir).unwrap();

    // The seed's DestinationRule trusts the default roots.
    let dr = include_str!("../../../../examples/seed/destintionrule.yaml");
    let roots = |ca: &crate::standin::StandinCa| BuildContext {
        roots: DefaultRoots::only(meshgate_identity::cert::parse_certs(&ca.root_pem).unwrap())
            .unwrap(),
        ..ctx.clone()
    };
    let before = Snapshot::build(seed(dr), &roots(&first_ca)).unwrap();
    let kept = Snapshot::rebuild(seed(dr), &roots(&first_ca), Some(&before)).unwrap();
    assert!(Arc::ptr_eq(&cluster(&before), &cluster(&kept)));
    let after = Snapshot::rebuild(seed(dr), &roots(&second_ca), Some(&kept)).unwrap();
    assert!(
        !Arc::ptr_eq(&cluster(&kept), &cluster(&after)),
        "other roots"
    );
}
