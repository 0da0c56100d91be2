//! The plan as a table: a connection (or request) and what was read from
//! it, in; the step or decision, out. And the property `explain` rests on:
//! facts given one by one (as the listeners read them) or all at once (as
//! `explain` gives them) end in the same plan.

use std::collections::HashMap;
use std::net::SocketAddr;

use http::HeaderMap;
use meshgate_config::MeshSettings;
use meshgate_config::view;

use super::*;
use crate::conn::{Peer, Terminated};
use crate::testing::{CURL_ID, GATEWAY, Mesh, WORKLOAD, seed_config, seed_config_except};
use crate::upstream::dns::Resolver;
use crate::upstream::tls::DefaultRoots;

const EXTRA: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: curl-external-tst}\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db, namespace: curl-external-tst}\nspec:\n  hosts: [db.example.com]\n  ports: [{number: 5432, name: tcp, protocol: TCP}]\n  resolution: NONE\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict-8081, namespace: curl-egress-tst}\nspec:\n  selector: {matchLabels: {istio: egressgateway}}\n  portLevelMtls: {8081: {mode: STRICT}}\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: more, namespace: curl-egress-tst}\nspec:\n  selector: {istio: egressgateway}\n  servers:\n  - port: {number: 8081, name: http-strict, protocol: HTTP}\n    hosts: ['*']\n  - port: {number: 8443, name: tls, protocol: TLS}\n    hosts: [api.example.com]\n    tls: {mode: PASSTHROUGH}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api-pass, namespace: curl-egress-tst}\nspec:\n  hosts: [api.example.com]\n  gateways: [more]\n  tls:\n  - match: [{sniHosts: [api.example.com], port: 8443}]\n    route: [{destination: {host: gone.example.com, port: {number: 443}}}]\n";

const BLACK_HOLE: &str = "tcp Close(UH) BlackHoleCluster outbound traffic policy REGISTRY_ONLY and no route (BlackHoleCluster)";
const ALLOW_ANY: &str = "tcp OriginalDst PassthroughCluster outbound traffic policy ALLOW_ANY";

async fn snapshot(config: &meshgate_config::Config, workload: &str) -> Snapshot {
    snapshot_in(config, &MeshSettings::default(), workload).await
}

async fn snapshot_in(
    config: &meshgate_config::Config,
    mesh: &MeshSettings,
    workload: &str,
) -> Snapshot {
    let view = view::build(config, mesh, workload).unwrap();
    let identity = Mesh::default().identity(&view.workload.spiffe_id).await;
    let root = crate::standin::StandinCa::new("test roots")
        .unwrap()
        .root_pem;
    let ctx = crate::snapshot::BuildContext {
        resolver: Resolver::new(Some("127.0.0.1:9".parse().unwrap())).unwrap(),
        roots: DefaultRoots::only(meshgate_identity::cert::parse_certs(&root).unwrap()).unwrap(),
        identity: Some(identity),
        endpoints: HashMap::new(),
    };
    Snapshot::build(view, &ctx).unwrap()
}

/// A connection captured on its way to `port` (sidecars) or accepted on
/// server port `port` (gateways).
fn conn(snap: &Snapshot, port: u16) -> Conn {
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let mut c = Conn::accepted(SocketAddr::from(([127, 0, 0, 2], 40000)), local, port);
    if snap.role == Role::Sidecar {
        c.original_dst = Some(SocketAddr::from(([203, 0, 113, 10], port)));
    }
    c
}

/// An explicit-proxy client of a sidecar.
fn explicit(snap: &Snapshot) -> Conn {
    Conn {
        original_dst: None,
        explicit: true,
        ..conn(snap, 15001)
    }
}

/// The plan before anything is read.
fn first_step(snap: &Snapshot, conn: &Conn) -> String {
    step(&plan(snap, conn, Peeked::Nothing, 0.0))
}

/// A plan, in words a table can hold.
fn step(p: &Plan<'_>) -> String {
    match p {
        Plan::Read(need) => format!("read {need:?}"),
        Plan::Terminate(Termination::Mesh) => "terminate mesh TLS".into(),
        Plan::Terminate(Termination::Server(_)) => "terminate server TLS".into(),
        Plan::ServeHttp => "serve HTTP".into(),
        Plan::Close(r) => format!("close: {r}"),
        Plan::Tcp(t) => format!(
            "tcp {:?} {} {}",
            t.action,
            t.cluster_name().unwrap_or("-"),
            t.reason
        ),
        Plan::Request(r) => request(r),
    }
}

fn request(r: &RequestPlan<'_>) -> String {
    let what = match &r.action {
        RequestAction::Forward { cluster, .. } => format!("forward {}", cluster.cluster.name()),
        RequestAction::Local(l) => format!("{} {}", l.status.as_u16(), l.flags),
        RequestAction::Connect { host, port } => format!("connect {host}:{port}"),
        RequestAction::Redirect { redirect, .. } => format!("redirect {}", redirect.code),
        RequestAction::Direct { status, .. } => format!("direct {status}"),
        RequestAction::CorsPreflight(_) => "cors preflight".to_owned(),
    };
    format!("{what} route={}", r.route_name().unwrap_or("-"))
}

fn head<'a>(authority: &'a str, method: &'a str, headers: &'a HeaderMap) -> RequestHead<'a> {
    RequestHead {
        view: RequestView {
            authority,
            method,
            scheme: "http",
            path: "/",
            query: "",
            headers,
        },
        uri_port: None,
    }
}

#[tokio::test]
async fn sidecar_connection_steps() {
    let snap = snapshot(&seed_config(&[EXTRA]), WORKLOAD).await;
    let h = HeaderMap::new();
    let req = head("jsonplaceholder.typicode.com", "GET", &h);
    let cases: [(u16, Peeked<'_>, &str); 10] = [
        // A registered TCP port: decided before anything is read.
        (
            5432,
            Peeked::Nothing,
            "tcp OriginalDst PassthroughCluster a TCP port of a registered service",
        ),
        // A port the mesh does not know, under REGISTRY_ONLY: closed unread.
        (9999, Peeked::Nothing, BLACK_HOLE),
        // An HTTP port: TLS or not decides.
        (80, Peeked::Nothing, "read FirstByte"),
        (80, Peeked::FirstByte { tls: false }, "serve HTTP"),
        (80, Peeked::FirstByte { tls: true }, "read ClientHello"),
        (
            80,
            Peeked::Request(&req),
            "forward outbound|80||curl-egress-tst.curl-egress-tst.svc.cluster.local route=#0",
        ),
        // The application's TLS: by SNI.
        (
            443,
            Peeked::ClientHello {
                sni: Some("api.example.com"),
            },
            "tcp Forward outbound|443||api.example.com a tls route matched the SNI",
        ),
        (
            443,
            Peeked::ClientHello {
                sni: Some("nope.example.com"),
            },
            BLACK_HOLE,
        ),
        (443, Peeked::ClientHello { sni: None }, BLACK_HOLE),
        // The seed declares 443 as HTTP too: plaintext there is HTTP.
        (443, Peeked::FirstByte { tls: false }, "serve HTTP"),
    ];
    for (port, peeked, want) in cases {
        let got = step(&plan(&snap, &conn(&snap, port), peeked, 0.0));
        assert_eq!(got, want, "port {port}, {peeked:?}");
    }
    // An explicit-proxy client is served as HTTP at once.
    assert_eq!(first_step(&snap, &explicit(&snap)), "serve HTTP");
}

#[tokio::test]
async fn allow_any_sends_what_the_mesh_does_not_know_to_its_destination() {
    let snap = snapshot(&seed_config_except(&["sidecar.yaml"], &[EXTRA]), WORKLOAD).await;
    let h = HeaderMap::new();
    let unknown = head("unknown.example.com", "GET", &h);
    for (port, peeked, want) in [
        (9999, Peeked::Nothing, ALLOW_ANY),
        (
            443,
            Peeked::ClientHello {
                sni: Some("nope.example.com"),
            },
            ALLOW_ANY,
        ),
        (
            80,
            Peeked::Request(&unknown),
            "forward PassthroughCluster route=allow_any",
        ),
    ] {
        assert_eq!(
            step(&plan(&snap, &conn(&snap, port), peeked, 0.0)),
            want,
            "port {port}"
        );
    }
}

#[tokio::test]
async fn gateway_connection_steps() {
    let snap = snapshot(&seed_config(&[EXTRA]), GATEWAY).await;
    let cases: [(u16, Peeked<'_>, &str); 8] = [
        (
            9999,
            Peeked::Nothing,
            "close: no Gateway server listens on port 9999",
        ),
        (80, Peeked::Nothing, "read FirstByte"),
        (80, Peeked::FirstByte { tls: true }, "terminate mesh TLS"),
        (80, Peeked::FirstByte { tls: false }, "serve HTTP"),
        // PeerAuthentication STRICT on this port refuses plaintext.
        (
            8081,
            Peeked::FirstByte { tls: false },
            "close: plaintext refused: PeerAuthentication STRICT",
        ),
        (8081, Peeked::FirstByte { tls: true }, "terminate mesh TLS"),
        // PASSTHROUGH: the ClientHello decides; plaintext is not TLS.
        (8443, Peeked::Nothing, "read ClientHello"),
        (
            8443,
            Peeked::FirstByte { tls: false },
            "close: not TLS on a PASSTHROUGH server",
        ),
    ];
    for (port, peeked, want) in cases {
        assert_eq!(
            step(&plan(&snap, &conn(&snap, port), peeked, 0.0)),
            want,
            "port {port}, {peeked:?}"
        );
    }
    let hello = |sni| {
        step(&plan(
            &snap,
            &conn(&snap, 8443),
            Peeked::ClientHello { sni },
            0.0,
        ))
    };
    let no_cluster = "tcp Close(NC) - the route's destination is not in the registry";
    assert_eq!(hello(Some("api.example.com")), no_cluster);
    assert_eq!(
        hello(Some("x.example.com")),
        "tcp Close(NR) - no route for this SNI"
    );
    // Once TLS is terminated, the connection is served as HTTP.
    let terminated = Conn {
        tls: Some(Terminated::default()),
        ..conn(&snap, 80)
    };
    assert_eq!(first_step(&snap, &terminated), "serve HTTP");
}

/// Two `tls` routes on a PASSTHROUGH server, the wildcard's first.
const SNI_ROUTES: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: tls-hosts, namespace: curl-external-tst}\nspec:\n  hosts: [api.example.com, other.example.com]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: pass, namespace: curl-egress-tst}\nspec:\n  selector: {istio: egressgateway}\n  servers: [{port: {number: 8443, name: tls, protocol: TLS}, hosts: ['*.example.com'], tls: {mode: PASSTHROUGH}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a-wide, namespace: curl-egress-tst}\nspec:\n  hosts: ['*.example.com']\n  gateways: [pass]\n  tls: [{match: [{sniHosts: ['*.example.com']}], route: [{destination: {host: other.example.com, port: {number: 443}}}]}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: b-api, namespace: curl-egress-tst}\nspec:\n  hosts: [api.example.com]\n  gateways: [pass]\n  tls: [{match: [{sniHosts: [api.example.com]}], route: [{destination: {host: api.example.com, port: {number: 443}}}]}]\n";

/// An SNI goes to the most specific route that covers it, as Envoy picks
/// a filter chain by server name (exact, then the longest wildcard), not
/// to the first route that covers it.
#[tokio::test]
async fn an_sni_takes_its_most_specific_route() {
    let snap = snapshot(&seed_config(&[SNI_ROUTES]), GATEWAY).await;
    let hello = |sni| {
        step(&plan(
            &snap,
            &conn(&snap, 8443),
            Peeked::ClientHello { sni: Some(sni) },
            0.0,
        ))
    };
    assert!(
        hello("api.example.com").contains("outbound|443||api.example.com"),
        "{}",
        hello("api.example.com")
    );
    assert!(
        hello("API.example.COM").contains("outbound|443||api.example.com"),
        "{}",
        hello("API.example.COM")
    );
    assert!(
        hello("www.example.com").contains("outbound|443||other.example.com"),
        "{}",
        hello("www.example.com")
    );
    assert_eq!(
        hello("example.com"),
        "tcp Close(NR) - no route for this SNI"
    );
}

const TCP_SERVER: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db, namespace: curl-external-tst}\nspec:\n  hosts: [db.example.com]\n  ports: [{number: 3306, name: tcp, protocol: TCP}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: tcp-gw, namespace: curl-egress-tst}\nspec:\n  selector: {istio: egressgateway}\n  servers: [{port: {number: 7777, name: tcp, protocol: TCP}, hosts: [db.example.com]}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: db, namespace: curl-egress-tst}\nspec:\n  hosts: [db.example.com]\n  gateways: [tcp-gw]\n  tcp: [{route: [{destination: {host: db.example.com, port: {number: 3306}}}]}]\n";

/// A client that waits for the server to speak first (MySQL, SMTP) is
/// plaintext TCP once it has been silent for the protocol detection
/// timeout: on a gateway's plain TCP server always (a second by default),
/// on the way in to a workload only where MeshConfig sets one.
#[tokio::test]
async fn silent_clients_are_plaintext_after_the_detection_timeout() {
    let config = seed_config(&[TCP_SERVER]);
    let snap = snapshot(&config, GATEWAY).await;
    let tcp = conn(&snap, 7777);
    assert_eq!(first_step(&snap, &tcp), "read FirstByteOrSilence(1s)");
    // The seed's policy admits one namespace only: no identity, denied.
    assert_eq!(
        step(&plan(&snap, &tcp, Peeked::Silent, 0.0)),
        "tcp Close(-) outbound|3306||db.example.com denied by authorization policy"
    );
    assert_eq!(first_step(&snap, &conn(&snap, 80)), "read FirstByte");
    let mesh = MeshSettings {
        protocol_detection_timeout: Some(std::time::Duration::from_millis(250)),
        ..MeshSettings::default()
    };
    let snap = snapshot_in(&config, &mesh, GATEWAY).await;
    assert_eq!(
        first_step(&snap, &conn(&snap, 7777)),
        "read FirstByteOrSilence(250ms)"
    );

    // On the way in: only with a timeout, and not where mTLS is STRICT.
    let inbound = |snap: &Snapshot| Conn {
        inbound: true,
        ..conn(snap, 9000)
    };
    let snap = snapshot(&config, WORKLOAD).await;
    assert_eq!(first_step(&snap, &inbound(&snap)), "read FirstByte");
    let snap = snapshot_in(&config, &mesh, WORKLOAD).await;
    assert_eq!(
        first_step(&snap, &inbound(&snap)),
        "read FirstByteOrSilence(250ms)"
    );
    let strict = seed_config(&[
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: curl-external-tst}\nspec:\n  mtls: {mode: STRICT}\n",
    ]);
    let snap = snapshot_in(&strict, &mesh, WORKLOAD).await;
    assert_eq!(first_step(&snap, &inbound(&snap)), "read FirstByte");
}

#[tokio::test]
async fn gateway_requests_authorized_by_the_verified_peer() {
    let snap = snapshot(&seed_config(&[]), GATEWAY).await;
    let h = HeaderMap::new();
    let peer = |id: &str| Conn {
        tls: Some(Terminated {
            sni: None,
            peer: Some(std::sync::Arc::new(Peer::new(
                id.parse().unwrap(),
                "cluster.local",
            ))),
            client_cert: None,
        }),
        ..conn(&snap, 80)
    };
    let host = "jsonplaceholder.typicode.com";
    for (conn, authority, want) in [
        (
            peer(CURL_ID),
            host,
            "forward outbound|443||jsonplaceholder.typicode.com route=#0",
        ),
        // Denied after routing: the route still names the request.
        (
            peer("spiffe://cluster.local/ns/other/sa/default"),
            host,
            "403 - route=#0",
        ),
        (conn(&snap, 80), host, "403 - route=#0"),
        (peer(CURL_ID), "other.example.com", "404 NR route=-"),
    ] {
        let req = head(authority, "GET", &h);
        assert_eq!(
            request(&plan_request(&snap, &conn, &req, 0.0)),
            want,
            "{authority}"
        );
    }
}

#[tokio::test]
async fn sidecar_requests() {
    let nc = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: nc, namespace: curl-external-tst}\nspec:\n  hosts: [nc.example.com]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: nc, namespace: curl-external-tst}\nspec:\n  hosts: [nc.example.com]\n  http: [{route: [{destination: {host: missing.example.com}}]}]\n";
    let snap = snapshot(&seed_config(&[EXTRA, nc]), WORKLOAD).await;
    let h = HeaderMap::new();
    let explicit = explicit(&snap);
    for (method, authority, uri_port, want) in [
        (
            "GET",
            "unregistered.example.com",
            None,
            "502 - route=block_all",
        ),
        ("GET", "nc.example.com", None, "503 NC route=#0"),
        (
            "CONNECT",
            "api.example.com:443",
            Some(443),
            "connect api.example.com:443 route=-",
        ),
        (
            "CONNECT",
            "unregistered.example.com:443",
            Some(443),
            "502 - route=block_all",
        ),
        ("CONNECT", ":443", Some(443), "400 DPE route=-"),
    ] {
        let mut req = head(authority, method, &h);
        req.uri_port = uri_port;
        let got = request(&plan_request(&snap, &explicit, &req, 0.0));
        assert_eq!(got, want, "{method} {authority}");
    }
}

/// The listeners learn a connection's facts one read at a time; `explain`
/// knows them all at once. Both must end in the same plan.
#[tokio::test]
async fn facts_one_by_one_or_all_at_once_end_in_the_same_plan() {
    for (config, workload) in [
        (seed_config(&[EXTRA]), WORKLOAD),
        (seed_config_except(&["sidecar.yaml"], &[EXTRA]), WORKLOAD),
        (seed_config(&[EXTRA]), GATEWAY),
    ] {
        let snap = snapshot(&config, workload).await;
        let h = HeaderMap::new();
        let req = head("jsonplaceholder.typicode.com", "GET", &h);
        for port in [80, 443, 5432, 8081, 8443, 9999] {
            for last in [
                Peeked::ClientHello {
                    sni: Some("api.example.com"),
                },
                Peeked::ClientHello { sni: None },
                Peeked::Request(&req),
            ] {
                let c = conn(&snap, port);
                let at_once = step(&plan(&snap, &c, last, 0.0));
                // One by one: read only what the plan asks for.
                let mut peeked = Peeked::Nothing;
                let one_by_one = loop {
                    match plan(&snap, &c, peeked, 0.0) {
                        Plan::Read(Need::FirstByte) => {
                            peeked = Peeked::FirstByte {
                                tls: matches!(last, Peeked::ClientHello { .. }),
                            };
                        }
                        Plan::Read(Need::ClientHello) => peeked = last,
                        Plan::ServeHttp if matches!(last, Peeked::Request(_)) => peeked = last,
                        p => break step(&p),
                    }
                };
                assert_eq!(at_once, one_by_one, "{workload} port {port}, {last:?}");
            }
        }
    }
}
