//! Per-request decision cost against the number of external hosts (issue:
//! performance, "routing cost within 10 % of the 1-host case"): the egress
//! gateway's `plan_request` (normalize, route, authorize, pick the cluster)
//! for a mesh caller's request, with the seed plus 1, 1,000 and 10,000
//! generated hosts (ServiceEntry + VirtualService + DestinationRule each).
//! And a listener's `tls` routes found by SNI (PASSTHROUGH servers and
//! sidecars' TLS ports), with 1, 1,000 and 10,000 routes: the first and
//! the last route's name, and one a wildcard route covers.
//!
//!   cargo bench -p meshgate-proxy --bench route
#![allow(clippy::unwrap_used, unreachable_pub, missing_docs)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion};
use http::HeaderMap;
use meshgate_proxy::conn::{Conn, Peer, Terminated};
use meshgate_proxy::plan::{RequestAction, RequestHead, plan_request};
use meshgate_proxy::route::RequestView;
use meshgate_proxy::snapshot::{TlsRoute, TlsRoutes};
use meshgate_proxy::testing::{
    CURL_ID, GATEWAY, HOST, ScaleShape, scale_config, scale_host, snapshot,
};

fn routing(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("gateway plan_request");
    for hosts in [1, 1_000, 10_000] {
        let snap = rt.block_on(snapshot(&scale_config(hosts, ScaleShape::PerHost), GATEWAY));
        let conn = Conn {
            tls: Some(Terminated {
                sni: None,
                peer: Some(Arc::new(Peer::new(
                    CURL_ID.parse().unwrap(),
                    "cluster.local",
                ))),
                client_cert: None,
            }),
            ..Conn::accepted(
                SocketAddr::from(([127, 0, 0, 2], 40000)),
                SocketAddr::from(([127, 0, 0, 1], 80)),
                80,
            )
        };
        let headers = HeaderMap::new();
        // The seed's host and the last generated one: both forwarded.
        for host in [HOST.to_owned(), scale_host(hosts - 1)] {
            let head = RequestHead {
                view: RequestView {
                    authority: &host,
                    method: "GET",
                    scheme: "http",
                    path: "/todos/1",
                    query: "",
                    headers: &headers,
                },
                uri_port: None,
            };
            let plan = plan_request(&snap, &conn, &head, 0.5);
            assert!(
                matches!(plan.action, RequestAction::Forward { .. }),
                "{host} with {hosts} hosts is not forwarded"
            );
            let name = if host == HOST {
                "seed host"
            } else {
                "generated host"
            };
            group.bench_with_input(BenchmarkId::new(name, hosts), &head, |b, head| {
                b.iter(|| black_box(plan_request(&snap, &conn, black_box(head), 0.5)).port);
            });
        }
    }
    group.finish();
}

fn sni_routing(c: &mut Criterion) {
    let mut group = c.benchmark_group("tls route by SNI");
    for n in [1, 1_000, 10_000] {
        let route = |name: &str| TlsRoute {
            subnets: Vec::new(),
            destinations: Vec::new(),
            name: Arc::from(name),
        };
        let mut routes: Vec<(Vec<String>, TlsRoute)> = (0..n)
            .map(|i| {
                let sni = vec![format!("host-{i}.example.com")];
                (sni, route(&format!("route-{i}")))
            })
            .collect();
        routes.push((vec!["*.wild.example.org".to_owned()], route("wildcard")));
        let table = TlsRoutes::new(routes);
        for (name, sni) in [
            ("first route", "host-0.example.com".to_owned()),
            ("last route", format!("host-{}.example.com", n - 1)),
            ("wildcard", "api.wild.example.org".to_owned()),
        ] {
            assert!(table.find(&sni).is_some(), "{sni} with {n} routes");
            group.bench_with_input(BenchmarkId::new(name, n), &sni, |b, sni| {
                b.iter(|| black_box(table.find(black_box(sni))).is_some());
            });
        }
    }
    group.finish();
}

fn main() {
    // `cargo test --all-targets` runs benches without `--bench`: nothing
    // to do then (the config of 10,000 hosts is slow to build unoptimized).
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    routing(&mut c);
    sni_routing(&mut c);
    c.final_summary();
}
