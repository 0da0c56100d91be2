//! The sidecar in process, in front of the egress gateway: what it does
//! with captured traffic (a capture listener stands in for iptables: every
//! connection arrives as if redirected on its way to a given address) and
//! with explicit-proxy clients, over real mutual TLS to the gateway and
//! real TLS to a stand-in external host. Runs as any user; the capture
//! itself (iptables, SO_ORIGINAL_DST, uid 1337) is tested in network
//! namespaces by the `meshgate` crate's tests.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use meshgate_proxy::standin;
use meshgate_proxy::testing::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the application thought it was going (TEST-NET-3: nothing there;
/// the sidecar routes HTTP by Host and TLS by SNI).
fn elsewhere(port: u16) -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 10], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_http_reaches_the_gateway_over_mutual_tls() {
    let mut chain = SeedChain::start(&[]).await;
    let captured = chain.sidecar.capture(elsewhere(80)).await;
    let host = format!("Host: {HOST}");
    let got = curl(&["-H", &host, &format!("http://{captured}/todos/1")]).await;
    assert_eq!(got.answer(), ("200", standin::TODO_1));

    // The sidecar routed by the mesh VirtualService to the gateway's
    // Service; the gateway saw the request on HTTP/2 inside mutual TLS
    // (meshgate peers multiplex by default) and the caller's identity.
    let sidecar = chain.sidecar.next_log().await;
    assert_eq!(
        sidecar["upstream_cluster"],
        "outbound|80||curl-egress-tst.curl-egress-tst.svc.cluster.local"
    );
    assert_eq!(sidecar["route_name"], "#0");
    assert_eq!(sidecar["downstream_local_address"], "203.0.113.10:80");
    let gateway = chain.gateway.next_log().await;
    assert_eq!(gateway["protocol"], "HTTP/2");
    assert_eq!(gateway["downstream_peer_uri_san"], CURL_ID);
    let gm = chain.gateway.metrics_text();
    assert_eq!(
        metric_value(
            &gm,
            "meshgate_egress_requests_total",
            &[
                ("source_principal", CURL_ID),
                ("source_workload_namespace", "curl-external-tst"),
                ("connection_security_policy", "mutual_tls"),
                ("destination_service_name", HOST),
                ("decision", "allow"),
            ]
        ),
        Some(1.0),
        "{gm}"
    );
    // The sidecar reports as Istio's sidecars do.
    let sm = chain.sidecar.metrics_text();
    let (ok, report) = promtool_check(&sm);
    assert!(ok, "{report}");
    assert_eq!(
        metric_value(
            &sm,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("source_workload", "curl-test"),
                ("source_workload_namespace", "curl-external-tst"),
                ("source_principal", CURL_ID),
                (
                    "destination_service",
                    "curl-egress-tst.curl-egress-tst.svc.cluster.local"
                ),
                ("destination_service_name", "curl-egress-tst"),
                ("destination_workload", "curl-egress-tst-gateway"),
                ("response_code", "200"),
            ]
        ),
        Some(1.0),
        "{sm}"
    );
    // As Envoy's do, the answer says how long the upstream took, in
    // milliseconds (`x-envoy-upstream-service-time`, the sidecar's wait).
    let again = curl(&["-i", "-H", &host, &format!("http://{captured}/todos/1")]).await;
    let waited = again
        .body
        .lines()
        .find_map(|l| l.strip_prefix("x-envoy-upstream-service-time: "))
        .map(str::trim);
    assert!(
        waited.is_some_and(|ms| ms.parse::<u64>().is_ok()),
        "{again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_only_answers_502_and_closes_unknown_tcp() {
    let mut chain = SeedChain::start(&[]).await;
    let http = chain.sidecar.capture(elsewhere(80)).await;
    let got = curl(&[
        "-H",
        "Host: unregistered.example.com",
        &format!("http://{http}/"),
    ])
    .await;
    assert_eq!(got.code, "502");
    let entry = chain.sidecar.next_log().await;
    assert_eq!(entry["route_name"], "block_all");
    assert_eq!(entry["response_code_details"], "direct_response");

    // A port no service has: accepted, then closed with nothing sent back.
    let raw = chain.sidecar.capture(elsewhere(9999)).await;
    let mut s = tokio::net::TcpStream::connect(raw).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut back = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut back));
    assert!(read.await.is_ok(), "the connection was left open");
    assert!(back.is_empty());
    let entry = chain.sidecar.next_log().await;
    assert_eq!(entry["response_flags"], "UH");
    assert_eq!(entry["upstream_cluster"], "BlackHoleCluster");

    let sm = chain.sidecar.metrics_text();
    for (name, labels) in [
        (
            "istio_tcp_connections_closed_total",
            &[("destination_service_name", "BlackHoleCluster")][..],
        ),
        (
            "istio_requests_total",
            &[
                ("response_code", "502"),
                ("destination_service_name", "BlackHoleCluster"),
            ][..],
        ),
    ] {
        assert_eq!(metric_value(&sm, name, labels), Some(1.0), "{name}:\n{sm}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_any_passes_unknown_hosts_through() {
    let plain = plain_http().await;
    // A registered HTTP port where the plain server listens, for a host
    // that has nothing to do with the unknown one below.
    let registered = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: known, namespace: curl-external-tst}}\nspec:\n  hosts: [known.example.com]\n  ports: [{{number: {}, name: http, protocol: HTTP}}]\n  resolution: DNS\n",
        plain.port()
    );
    // No Sidecar resource: the mesh default, ALLOW_ANY.
    let mut chain = SeedChain::with(seed_config_except(&["sidecar.yaml"], &[&registered])).await;

    // A port with HTTP routes: Istio's `allow_any` route, as HTTP.
    let http = chain.sidecar.capture(plain).await;
    let got = curl(&[
        "-H",
        "Host: unknown.example.com",
        &format!("http://{http}/todos/1"),
    ])
    .await;
    assert_eq!(got.answer(), ("200", standin::TODO_1));
    let entry = chain.sidecar.next_log().await;
    assert_eq!(entry["route_name"], "allow_any");
    assert_eq!(entry["upstream_cluster"], "PassthroughCluster");

    // A port nothing is registered on: the whole connection goes through.
    let other = plain_http().await;
    let tcp = chain.sidecar.capture(other).await;
    let got = curl(&[&format!("http://{tcp}/todos/1")]).await;
    assert_eq!(got.answer(), ("200", standin::TODO_1));
    let entry = chain.sidecar.next_log().await;
    assert_eq!(entry["method"], serde_json::Value::Null, "a TCP entry");
    assert_eq!(entry["upstream_cluster"], "PassthroughCluster");
    assert_eq!(entry["upstream_host"], other.to_string());

    // The mesh route still goes through the gateway.
    let mesh = chain.sidecar.capture(elsewhere(80)).await;
    let host = format!("Host: {HOST}");
    let got = curl(&["-H", &host, &format!("http://{mesh}/todos/1")]).await;
    assert_eq!(got.answer(), ("200", standin::TODO_1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_refuses_a_gateway_with_another_identity() {
    // The gateway's config has another workload behind its Service,
    // running with service account `impostor`; the sidecar's config says
    // the Service is backed by `curl-egress-tst` only.
    let impostor = "apiVersion: apps/v1
kind: Deployment
metadata: {name: impostor, namespace: curl-egress-tst}
spec:
  selector: {matchLabels: {istio: egressgateway}}
  template:
    metadata:
      labels: {istio: egressgateway}
      annotations: {inject.istio.io/templates: gateway}
    spec:
      serviceAccountName: impostor
      containers: [{name: istio-proxy, image: auto}]
";
    let mesh = Mesh::default();
    let external = External::start(&[HOST]).await;
    let mut spec = SeedChain::gateway_spec(seed_config(&[impostor]), &external);
    spec.workload = "curl-egress-tst/impostor".to_owned();
    let gateway = TestProxy::start(&mesh, spec).await;
    let sidecar = Spec::new(seed_config(&[]), WORKLOAD).endpoint(GATEWAY_SERVICE, gateway.addr(80));
    let sidecar = TestProxy::start(&mesh, sidecar).await;
    let proxy = format!("http://{}", sidecar.addr(15001));
    let got = curl(&["-x", &proxy, &format!("http://{HOST}/todos/1")]).await;
    assert_eq!(got.code, "503", "{got:?}");
    assert!(
        got.body.contains(
            "is not the expected spiffe://cluster.local/ns/curl-egress-tst/sa/curl-egress-tst"
        ),
        "{got:?}"
    );
    assert!(external.seen.all().is_empty(), "nothing got through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_from_the_app_is_routed_by_sni_and_registered_tcp_passes() {
    let api = External::start(&["api.example.com"]).await;
    let plain = plain_http().await;
    let extra = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: curl-external-tst}}\nspec:\n  hosts: [api.example.com]\n  ports: [{{number: 443, name: tls, protocol: TLS}}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: plain-tcp, namespace: curl-external-tst}}\nspec:\n  hosts: [plain.example.com]\n  ports: [{{number: {}, name: tcp, protocol: TCP}}]\n  resolution: NONE\n",
        plain.port()
    );
    let mesh = Mesh::default();
    let spec =
        Spec::new(seed_config(&[&extra]), WORKLOAD).endpoint("api.example.com:443", api.addr);
    let mut sidecar = TestProxy::start(&mesh, spec).await;
    let dir = TempDir::new("sidecar-tls");
    let ca = dir.write("api-ca.pem", &api.ca.root_pem);

    // The application's own TLS, end to end through the sidecar.
    let tls = sidecar.capture(elsewhere(443)).await;
    let got = https_get(&ca, "api.example.com", 443, tls, "/todos/1").await;
    assert_eq!(got.answer(), ("200", standin::TODO_1));
    assert_eq!(api.seen.all()[0].sni.as_deref(), Some("api.example.com"));
    let entry = sidecar.next_log().await;
    assert_eq!(entry["requested_server_name"], "api.example.com");
    assert_eq!(entry["upstream_cluster"], "outbound|443||api.example.com");

    // REGISTRY_ONLY: TLS to a host that is not registered gets no connection.
    let got = https_get(&ca, "unregistered.example.com", 443, tls, "/").await;
    assert_eq!(got.code, "000");
    let entry = sidecar.next_log().await;
    assert_eq!(entry["response_flags"], "UH");
    assert_eq!(entry["requested_server_name"], "unregistered.example.com");

    // A TCP port of a registered service: to the original destination,
    // whatever the outbound policy.
    let tcp = sidecar.capture(plain).await;
    let got = curl(&[&format!("http://{tcp}/todos/1")]).await;
    assert_eq!(got.answer(), ("200", standin::TODO_1));
    let entry = sidecar.next_log().await;
    assert_eq!(entry["upstream_cluster"], "PassthroughCluster");
}

const API_TLS: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: curl-external-tst}\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: DNS\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_proxy_and_connect() {
    let mesh = Mesh::default();
    let config = seed_config(&[API_TLS]);
    let external = External::start(&[HOST, "api.example.com"]).await;
    let gateway = TestProxy::start(&mesh, SeedChain::gateway_spec(config.clone(), &external)).await;
    let spec = Spec::new(config, WORKLOAD)
        .endpoint(GATEWAY_SERVICE, gateway.addr(80))
        .endpoint("api.example.com:443", external.addr);
    let sidecar = TestProxy::start(&mesh, spec).await;
    let proxy = format!("http://{}", sidecar.addr(15001));
    let dir = TempDir::new("explicit");
    let ca = dir.write("standin-ca.pem", &external.ca.root_pem);

    // Absolute-form HTTP through the sidecar, then mTLS to the gateway.
    let got = curl(&["-x", &proxy, &format!("http://{HOST}/todos/1")]).await;
    assert_eq!(got.answer(), ("200", standin::TODO_1));
    sidecar.next_log().await;
    // REGISTRY_ONLY answers 502 for unknown hosts, without resolving them.
    let got = curl(&["-x", &proxy, "http://unregistered.example.com/"]).await;
    assert_eq!(got.code, "502");
    assert_eq!(sidecar.next_log().await["route_name"], "block_all");
    // CONNECT to a registered TLS host: the tunnel goes out by SNI.
    let got = curl(&[
        "-x",
        &proxy,
        "--cacert",
        &ca,
        "https://api.example.com/todos/1",
    ])
    .await;
    assert_eq!(got.answer(), ("200", standin::TODO_1));
    assert!(
        external
            .seen
            .all()
            .iter()
            .any(|r| r.sni.as_deref() == Some("api.example.com"))
    );
    let tunnel = sidecar.next_log().await;
    assert_eq!(tunnel["upstream_cluster"], "outbound|443||api.example.com");
    // CONNECT to an unregistered host is refused (and reported).
    let got = curl(&["-x", &proxy, "https://unregistered.example.com/"]).await;
    assert_ne!(got.exit, 0, "no tunnel");
    let entry = sidecar.next_log().await;
    assert_eq!(entry["method"], "CONNECT");
    assert_eq!(entry["response_code"], 502);
}

/// A WebSocket-style upgrade from the workload goes through the whole chain
/// (sidecar, mTLS to the gateway, TLS origination) and becomes a byte
/// tunnel once the external host answers 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_tunnel_through_sidecar_and_gateway() {
    let chain = SeedChain::start(&[]).await;
    let mut s = tokio::net::TcpStream::connect(chain.sidecar.addr(15001))
        .await
        .unwrap();
    s.write_all(
        format!(
            "GET http://{HOST}/upgrade HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "head so far: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    // Bytes both ways, several times, on the same tunnel.
    for msg in ["ping", "a longer message through three hops"] {
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    assert!(
        chain
            .external
            .seen
            .all()
            .iter()
            .any(|r| r.path == "/upgrade" && r.sni.as_deref() == Some(HOST)),
        "the stand-in answered the upgrade over TLS with SNI"
    );
}

/// Istio speaks the application's protocol between mesh peers unless a
/// DestinationRule says `h2UpgradePolicy: UPGRADE`; meshgate peers speak
/// HTTP/2 (ALPN inside mutual TLS) unless it says `DO_NOT_UPGRADE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn do_not_upgrade_keeps_http1_between_meshgate_peers() {
    let chain = SeedChain::start(&[
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: gateway-h1, namespace: curl-external-tst}\nspec:\n  host: curl-egress-tst.curl-egress-tst.svc.cluster.local\n  trafficPolicy:\n    connectionPool:\n      http: {h2UpgradePolicy: DO_NOT_UPGRADE}\n",
    ])
    .await;
    for _ in 0..2 {
        let got = chain
            .via_sidecar(&format!("http://{HOST}/todos/1"), &[])
            .await;
        assert_eq!(got.answer(), ("200", standin::TODO_1));
        let entry = chain.gateway.next_log().await;
        assert_eq!(entry["protocol"], "HTTP/1.1");
        assert_eq!(entry["downstream_peer_uri_san"], CURL_ID);
    }
}

/// As Istio configures Envoy: the gateway (use_remote_address) appends its
/// downstream's address to x-forwarded-for; the sidecar passes it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_appended_by_the_gateway_only() {
    let chain = SeedChain::start(&[]).await;
    let url = format!("http://{HOST}/todos/1");
    assert_eq!(chain.via_sidecar(&url, &[]).await.code, "200");
    assert_eq!(
        chain
            .via_sidecar(&url, &["-H", "X-Forwarded-For: 203.0.113.7"])
            .await
            .code,
        "200"
    );
    let seen: Vec<Option<String>> = chain
        .external
        .seen
        .all()
        .into_iter()
        .map(|r| r.forwarded_for)
        .collect();
    assert_eq!(
        seen,
        [
            Some("127.0.0.1".to_owned()),
            Some("203.0.113.7,127.0.0.1".to_owned())
        ],
        "one address added, by the gateway (the sidecar's)"
    );
}

/// A forward proxy standing in for a corporate one: it opens a CONNECT
/// tunnel to `target` when asked for `allowed` (answering 200) and refuses
/// anything else with 403; each request line it got is sent on `asked`.
async fn connect_proxy(
    allowed: &'static str,
    target: SocketAddr,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, asked) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let Ok(b) = s.read_u8().await else { return };
                    head.push(b);
                }
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned();
                let _ = tx.send(line.clone());
                if line != format!("CONNECT {allowed} HTTP/1.1") {
                    let _ = s
                        .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let Ok(mut to) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let _ = s
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut s, &mut to).await;
            });
        }
    });
    (addr, asked)
}

/// `what`, or a failed test after 10 s.
async fn within<F: std::future::Future>(what: F) -> F::Output {
    tokio::time::timeout(std::time::Duration::from_secs(10), what)
        .await
        .expect("done within 10 s")
}

/// DestinationRule `tunnel` (egress through a corporate forward proxy):
/// TCP routed to the proxy's host goes through an HTTP CONNECT tunnel the
/// proxy opens to `targetHost:targetPort`, and the bytes arrive; a proxy
/// that refuses the tunnel closes the client's connection, logged UF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_goes_through_the_connect_tunnel_a_destination_rule_asks_for() {
    let echo_addr = tcp_echo().await;
    let (proxy, mut asked) = connect_proxy("echo.example.com:7000", echo_addr).await;
    let tunneled = |name: &str, address: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: curl-external-tst}}
spec:
  {{hosts: [{name}.example.com], addresses: [{address}], resolution: DNS,
   ports: [{{number: 7000, name: tcp, protocol: TCP}}]}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: curl-external-tst}}
spec:
  hosts: [{name}.example.com]
  tcp:
  - match: [{{port: 7000}}]
    route: [{{destination: {{host: corp-proxy.example.com, port: {{number: 3128}}, subset: {name}}}}}]
"
        )
    };
    let config = seed_config(&[
        &tunneled("echo", "192.0.2.78"),
        &tunneled("denied", "192.0.2.79"),
        &format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: corp-proxy, namespace: curl-external-tst}}
spec:
  hosts: [corp-proxy.example.com]
  ports: [{{number: 3128, name: tcp, protocol: TCP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: corp-proxy, namespace: curl-external-tst}}
spec:
  host: corp-proxy.example.com
  subsets:
  - name: echo
    trafficPolicy: {{tunnel: {{protocol: CONNECT, targetHost: echo.example.com, targetPort: 7000}}}}
  - name: denied
    trafficPolicy: {{tunnel: {{targetHost: denied.example.com, targetPort: 7000}}}}
",
            proxy.port()
        ),
    ]);
    let mesh = Mesh::default();
    let mut sidecar = TestProxy::start(&mesh, Spec::new(config, WORKLOAD)).await;

    let captured = sidecar
        .capture(SocketAddr::from(([192, 0, 2, 78], 7000)))
        .await;
    let mut app = tokio::net::TcpStream::connect(captured).await.unwrap();
    app.write_all(b"through the tunnel\n").await.unwrap();
    let mut back = [0u8; 19];
    within(app.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"through the tunnel\n");
    drop(app);
    assert_eq!(
        within(asked.recv()).await.unwrap(),
        "CONNECT echo.example.com:7000 HTTP/1.1"
    );
    let entry = sidecar.next_log().await;
    assert_eq!(entry["upstream_host"], proxy.to_string(), "{entry}");
    assert_eq!(entry["response_flags"], "-", "{entry}");

    let captured = sidecar
        .capture(SocketAddr::from(([192, 0, 2, 79], 7000)))
        .await;
    let mut app = tokio::net::TcpStream::connect(captured).await.unwrap();
    let _ = app.write_all(b"hello").await;
    let mut sink = Vec::new();
    let _ = within(app.read_to_end(&mut sink)).await;
    assert!(sink.is_empty(), "refused: {sink:?}");
    assert_eq!(
        within(asked.recv()).await.unwrap(),
        "CONNECT denied.example.com:7000 HTTP/1.1"
    );
    let entry = sidecar.next_log().await;
    assert_eq!(entry["response_flags"], "UF", "{entry}");
    assert!(failure_reason_mentions(&entry, "403"), "{entry}");
}

/// Istio's TCP egress recipe: a `tcp` rule bound to the mesh sends the
/// ServiceEntry's address and port to the egress gateway's TCP server
/// (over mesh mutual TLS, so the gateway's policy knows the caller), and a
/// `tcp` rule bound to the gateway sends it on to the external host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_routes_carry_opaque_tcp_through_the_egress_gateway() {
    let config = seed_config(&[
        "apiVersion: v1
kind: Service
metadata: {name: egress-tcp, namespace: curl-egress-tst}
spec:
  ports: [{name: tcp, port: 7777, targetPort: 7777}]
  selector: {istio: egressgateway}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo, namespace: curl-external-tst}
spec:
  hosts: [echo.example.com]
  addresses: [192.0.2.77]
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  location: MESH_EXTERNAL
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: tcp-gw, namespace: curl-egress-tst}
spec:
  selector: {istio: egressgateway}
  servers: [{port: {number: 7777, name: tcp, protocol: TCP}, hosts: [echo.example.com]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: curl-egress-tst}
spec:
  hosts: [echo.example.com]
  gateways: [mesh, tcp-gw]
  tcp:
  - match: [{gateways: [mesh], port: 7000}]
    route: [{destination: {host: egress-tcp.curl-egress-tst.svc.cluster.local, port: {number: 7777}}}]
  - match: [{gateways: [tcp-gw], port: 7777}]
    route: [{destination: {host: echo.example.com, port: {number: 7000}}}]
",
    ]);
    // A real TCP echo server stands in for the external host.
    let echo_addr = tcp_echo().await;
    let mesh = Mesh::default();
    let external = External::start(&[HOST]).await;
    let gateway = TestProxy::start(
        &mesh,
        SeedChain::gateway_spec(config.clone(), &external)
            .endpoint("echo.example.com:7000", echo_addr),
    )
    .await;
    let spec = Spec::new(config, WORKLOAD).endpoint(
        "egress-tcp.curl-egress-tst.svc.cluster.local:7777",
        gateway.addr(7777),
    );
    let mut sidecar = TestProxy::start(&mesh, spec).await;
    let captured = sidecar
        .capture(SocketAddr::from(([192, 0, 2, 77], 7000)))
        .await;

    let mut app = tokio::net::TcpStream::connect(captured).await.unwrap();
    app.write_all(b"opaque bytes, not HTTP\n").await.unwrap();
    let mut back = [0u8; 23];
    app.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"opaque bytes, not HTTP\n");
    drop(app);

    let at_sidecar = sidecar.next_log().await;
    assert_eq!(
        at_sidecar["upstream_cluster"],
        "outbound|7777||egress-tcp.curl-egress-tst.svc.cluster.local"
    );
    let at_gateway = gateway.next_log().await;
    assert_eq!(
        at_gateway["upstream_cluster"],
        "outbound|7000||echo.example.com"
    );
    assert_eq!(
        at_gateway["downstream_peer_uri_san"],
        "spiffe://cluster.local/ns/curl-external-tst/sa/default",
        "mesh mTLS from the sidecar"
    );

    // Plaintext straight to the gateway's TCP server has no identity: the
    // seed's policy (namespace curl-external-tst only) closes it.
    let mut direct = tokio::net::TcpStream::connect(gateway.addr(7777))
        .await
        .unwrap();
    direct.write_all(b"hello").await.unwrap();
    let mut sink = Vec::new();
    let _ = direct.read_to_end(&mut sink).await;
    assert!(sink.is_empty(), "denied: {sink:?}");
    let denied = gateway.next_log().await;
    assert_eq!(denied["upstream_host"], serde_json::Value::Null);
}

/// A Sidecar egress listener with a `port` imports its hosts on that port
/// only: the seed host on 80 goes through the gateway; on 443 it is not
/// imported, so REGISTRY_ONLY blocks it (502, block_all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_egress_port_imports_hosts_on_that_port_only() {
    let config = seed_config_except(
        &["sidecar.yaml"],
        &["apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: port-80-only, namespace: curl-external-tst}
spec:
  workloadSelector: {labels: {app: curl-test}}
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
  egress:
  - port: {number: 80, protocol: HTTP, name: http}
    hosts: ['*/*']
"],
    );
    let chain = SeedChain::with(config).await;
    let proxy = format!("http://{}", chain.sidecar.addr(15001));
    let on_80 = curl(&["-x", &proxy, &format!("http://{HOST}/todos/1")]).await;
    assert_eq!(on_80.answer(), ("200", standin::TODO_1));
    chain.sidecar.next_log().await;
    let on_443 = curl(&["-x", &proxy, &format!("http://{HOST}:443/todos/1")]).await;
    assert_eq!(on_443.code, "502", "{on_443:?}");
    assert_eq!(chain.sidecar.next_log().await["route_name"], "block_all");
}

/// Inbound capture (15006): connections on their way in to the workload
/// meet its PeerAuthentication and AuthorizationPolicies. A mesh peer the
/// policy allows reaches the application over mutual TLS; another peer,
/// and plaintext without an identity, are closed; with STRICT, plaintext
/// is refused even where no policy applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_traffic_meets_the_workloads_policies() {
    const FRIEND: &str = "spiffe://cluster.local/ns/friends/sa/default";
    let mesh = Mesh::default();
    let dir = TempDir::new("inbound");
    let app = plain_http().await;
    let allow_friends = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: friends-only, namespace: curl-external-tst}
spec:
  selector: {matchLabels: {app: curl-test}}
  rules: [{from: [{source: {principals: [cluster.local/ns/friends/sa/default]}}]}]
";
    let mut sc = TestProxy::start(&mesh, Spec::new(seed_config(&[allow_friends]), WORKLOAD)).await;
    let inbound = sc.capture_inbound(app).await;
    let friend = mesh.client(FRIEND, &dir);
    let got = friend.get("curl-test", inbound.port(), "/hello", &[]).await;
    assert_eq!(got.code, "200", "{got:?}");
    let entry = sc.next_log().await;
    assert_eq!(entry["upstream_host"], app.to_string());
    assert_eq!(entry["downstream_peer_uri_san"], FRIEND);
    // Reported as Istio's destination reporter: the peer is the source.
    let text = sc.metrics_text();
    let opened = metric_value(
        &text,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", FRIEND),
            ("source_workload_namespace", "friends"),
            ("destination_workload", "curl-test"),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert_eq!(opened, Some(1.0), "{text}");

    let stranger = mesh.client("spiffe://cluster.local/ns/other/sa/default", &dir);
    let denied = stranger
        .get("curl-test", inbound.port(), "/hello", &[])
        .await;
    assert_ne!(denied.exit, 0, "closed: {denied:?}");
    assert_eq!(
        sc.next_log().await["upstream_host"],
        serde_json::Value::Null
    );
    let plain = curl(&[&format!("http://{inbound}/hello")]).await;
    assert_ne!(plain.exit, 0, "no identity, closed: {plain:?}");

    // PERMISSIVE (the default) and no policy: plaintext goes in too.
    let mut open = TestProxy::start(&mesh, Spec::new(seed_config(&[]), WORKLOAD)).await;
    let open_inbound = open.capture_inbound(app).await;
    let plain = curl(&[&format!("http://{open_inbound}/hello")]).await;
    assert_eq!(plain.code, "200", "{plain:?}");

    // STRICT: plaintext refused; any mesh peer admitted (no policy here).
    let strict = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: curl-external-tst}
spec:
  mtls: {mode: STRICT}
";
    let mut sc = TestProxy::start(&mesh, Spec::new(seed_config(&[strict]), WORKLOAD)).await;
    let inbound = sc.capture_inbound(app).await;
    let plain = curl(&[&format!("http://{inbound}/hello")]).await;
    assert_ne!(plain.exit, 0, "plaintext refused: {plain:?}");
    let got = stranger
        .get("curl-test", inbound.port(), "/hello", &[])
        .await;
    assert_eq!(got.code, "200", "{got:?}");

    // portLevelMtls: the application's port PERMISSIVE under STRICT.
    let port_level = format!(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: strict-but-app-port, namespace: curl-external-tst}}
spec:
  selector: {{matchLabels: {{app: curl-test}}}}
  mtls: {{mode: STRICT}}
  portLevelMtls: {{{}: {{mode: PERMISSIVE}}}}
",
        app.port()
    );
    let mut sc = TestProxy::start(&mesh, Spec::new(seed_config(&[&port_level]), WORKLOAD)).await;
    let inbound = sc.capture_inbound(app).await;
    let plain = curl(&[&format!("http://{inbound}/hello")]).await;
    assert_eq!(plain.code, "200", "{plain:?}");

    // A Sidecar ingress listener sends its port to its defaultEndpoint.
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let ingress = format!(
        "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: ingress, namespace: curl-external-tst}}
spec:
  workloadSelector: {{labels: {{app: curl-test}}}}
  ingress:
  - port: {{number: {}, protocol: HTTP, name: http}}
    defaultEndpoint: 127.0.0.1:{}
",
        unused.port(),
        app.port()
    );
    let config = seed_config_except(&["sidecar.yaml"], &[&ingress]);
    let mut sc = TestProxy::start(&mesh, Spec::new(config, WORKLOAD)).await;
    let inbound = sc.capture_inbound(unused).await;
    let plain = curl(&[&format!("http://{inbound}/hello")]).await;
    assert_eq!(plain.code, "200", "to the defaultEndpoint: {plain:?}");
    assert_eq!(sc.next_log().await["upstream_host"], app.to_string());
}

/// A port the workload serves as HTTP (its Service's port named `http`,
/// by targetPort) is served as HTTP on the way in: each request meets the
/// workload's AuthorizationPolicies with its method and (normalized) path,
/// a denied one gets 403 `RBAC: access denied` as Istio's inbound RBAC
/// filter answers, the application learns its caller from an
/// `x-forwarded-client-cert` the sidecar sets (a client's own is
/// dropped), and each request is reported with `reporter="destination"`
/// and the Service it was for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_http_meets_request_level_policy() {
    const FRIEND: &str = "spiffe://cluster.local/ns/friends/sa/default";
    let mesh = Mesh::default();
    let dir = TempDir::new("inbound-http");
    let app = plain_http().await;
    let service = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: curl-test, namespace: curl-external-tst}}
spec:
  selector: {{app: curl-test}}
  ports: [{{name: http, port: 80, targetPort: {}}}]
",
        app.port()
    );
    let read_public = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: friends-read-public, namespace: curl-external-tst}
spec:
  selector: {matchLabels: {app: curl-test}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/friends/sa/default]}}]
    to: [{operation: {methods: [GET], paths: [/public/*]}}]
";
    let config = seed_config(&[&service, read_public]);
    let mut sc = TestProxy::start(&mesh, Spec::new(config, WORKLOAD)).await;
    let inbound = sc.capture_inbound(app).await;
    let friend = mesh.client(FRIEND, &dir);
    let forged = "x-forwarded-client-cert: By=x;URI=spiffe://cluster.local/ns/admin/sa/root";

    let got = friend
        .get("curl-test", inbound.port(), "/public/a", &["-H", forged])
        .await;
    assert_eq!(got.code, "200", "{got:?}");
    let echo: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    let xfcc = echo["headers"]["x-forwarded-client-cert"].as_str().unwrap();
    assert!(xfcc.ends_with(&format!(";URI={FRIEND}")), "{xfcc}");
    assert!(
        !xfcc.contains("admin"),
        "the client's own is dropped: {xfcc}"
    );
    let entry = sc.next_log().await;
    assert_eq!(entry["path"], "/public/a");
    assert_eq!(entry["upstream_host"], app.to_string());
    assert_eq!(
        entry["upstream_cluster"],
        format!("inbound|{}||", app.port())
    );
    assert_eq!(entry["route_name"], "default");

    // The same peer, another path or method: denied per request, on the
    // same kind of connection; a path that only looks public is
    // normalized before the policy sees it.
    for (path, method) in [
        ("/private", "GET"),
        ("/public/a", "POST"),
        ("/public/../private", "GET"),
    ] {
        let got = friend
            .get(
                "curl-test",
                inbound.port(),
                path,
                &["-X", method, "--path-as-is"],
            )
            .await;
        assert_eq!(
            got.answer(),
            ("403", "RBAC: access denied"),
            "{method} {path}"
        );
        let entry = sc.next_log().await;
        assert_eq!(entry["response_code"], 403);
        assert_eq!(entry["upstream_host"], serde_json::Value::Null);
    }
    // Plaintext has no identity (PERMISSIVE lets it in): denied too.
    let plain = curl(&[&format!("http://{inbound}/public/a")]).await;
    assert_eq!(plain.answer(), ("403", "RBAC: access denied"));

    let text = sc.metrics_text();
    let count = |code: &str| {
        metric_value(
            &text,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("source_principal", FRIEND),
                ("destination_workload", "curl-test"),
                (
                    "destination_service",
                    "curl-test.curl-external-tst.svc.cluster.local",
                ),
                ("destination_service_name", "curl-test"),
                ("response_code", code),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
    };
    assert_eq!(count("200"), Some(1.0), "{text}");
    assert_eq!(count("403"), Some(3.0), "{text}");
}

/// Two replicas of the egress gateway behind its Service: the sidecar
/// picks one for every request, as Envoy's load balancer does (here round
/// robin, by a DestinationRule that leaves mutual TLS automatic), rather
/// than sending everything on the one HTTP/2 connection it happens to
/// have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_balances_requests_over_the_gateway_replicas() {
    let round_robin = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: gateway-lb, namespace: curl-egress-tst}
spec:
  host: curl-egress-tst.curl-egress-tst.svc.cluster.local
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
";
    let config = seed_config(&[round_robin]);
    let mesh = Mesh::default();
    let external = External::start(&[HOST]).await;
    let replicas = [
        TestProxy::start(&mesh, SeedChain::gateway_spec(config.clone(), &external)).await,
        TestProxy::start(&mesh, SeedChain::gateway_spec(config.clone(), &external)).await,
    ];
    let mut spec = Spec::new(config, WORKLOAD);
    let addrs = replicas.each_ref().map(|g| g.addr(80));
    spec.endpoints
        .insert(GATEWAY_SERVICE.to_owned(), addrs.to_vec());
    let sidecar = TestProxy::start(&mesh, spec).await;
    let proxy = format!("http://{}", sidecar.addr(15001));
    let url = format!("http://{HOST}/todos/1");
    let mut went = Vec::new();
    for _ in 0..4 {
        let got = curl(&["-x", &proxy, &url]).await;
        assert_eq!(got.answer(), ("200", standin::TODO_1));
        let entry = sidecar.next_log().await;
        went.push(entry["upstream_host"].as_str().unwrap().to_owned());
    }
    let [a, b] = addrs.map(|a| a.to_string());
    assert!(
        went == [&*a, &b, &a, &b] || went == [&*b, &a, &b, &a],
        "{went:?}"
    );
    // Each replica served two.
    for replica in &replicas {
        for _ in 0..2 {
            let entry = replica.next_log().await;
            assert_eq!(entry["response_code"], 200, "{entry}");
        }
    }
}
