//! The proxies tried as an attacker would, in process: each test is a way
//! around the gateway's policy (or a way to hold its resources) that the
//! proxies must close, as Envoy and Istio close it.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use meshgate_config::{MeshSettings, PathNormalization};
use meshgate_proxy::listener::Timeouts;
use meshgate_proxy::standin;
use meshgate_proxy::testing::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DENY_ADMIN: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: curl-egress-tst}
spec:
  selector: {matchLabels: {istio: egressgateway}}
  action: DENY
  rules: [{to: [{operation: {paths: [/admin, /admin/*]}}]}]
";

/// What a raw HTTP/1.1 exchange got back: the status line.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut back = Vec::new();
    let status_line = async {
        let mut chunk = [0u8; 1024];
        while !back.contains(&b'\n') {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => back.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), status_line).await;
    String::from_utf8_lossy(&back)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// Istio's pathNormalization BASE: the walk-arounds of a DENY on /admin
/// are denied, and what goes upstream is the normalized path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalized_before_authorization_and_forwarded_so() {
    let chain = SeedChain::start(&[DENY_ADMIN]).await;
    let client = chain.mesh.client(CURL_ID, &chain.dir);
    let port = chain.gateway.addr(80).port();
    let get = |path: &'static str| {
        let client = client.clone();
        async move { client.get(HOST, port, path, &["--path-as-is"]).await }
    };
    for attack in [
        "/admin",
        "/public/../admin",
        "/./admin",
        "/public/%2e%2e/admin",
        "/%61dmin",
        "/public\\..\\admin",
        "/admin/x/../y",
    ] {
        assert_eq!(get(attack).await.code, "403", "{attack}");
    }
    assert_eq!(get("/a%00b").await.code, "400", "%00 is refused");
    let failed = "downstream_rq_failed_path_normalization";
    chain.gateway.refused_reaches(failed, 1.0).await;
    let ok = get("/public/./../todos/./1").await;
    assert_eq!(ok.answer(), ("200", standin::TODO_1));
    let seen: Vec<String> = chain
        .external
        .seen
        .all()
        .into_iter()
        .map(|r| r.path)
        .collect();
    assert_eq!(
        seen,
        ["/todos/1"],
        "the upstream saw only the normalized path"
    );

    // MERGE_SLASHES also merges `//`, which BASE leaves alone.
    let merge = MeshSettings {
        path_normalization: PathNormalization::MergeSlashes,
        ..MeshSettings::default()
    };
    let mut spec = SeedChain::gateway_spec(seed_config(&[DENY_ADMIN]), &chain.external);
    spec.mesh = merge;
    let merging = TestProxy::start(&chain.mesh, spec).await;
    let merged = client
        .get(HOST, merging.addr(80).port(), "//admin", &["--path-as-is"])
        .await;
    assert_eq!(merged.code, "403");
    assert_ne!(get("//admin").await.code, "403", "BASE keeps //admin");
}

/// A connection made to the sidecar's port itself is closed unless the
/// sidecar is an explicit proxy by choice (Istio: a black hole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capture_port_is_no_open_proxy() {
    let chain = SeedChain::with_sidecar(seed_config(&[]), |mut spec| {
        spec.explicit_proxy = false;
        spec
    })
    .await;
    let proxy = format!("http://{}", chain.sidecar.addr(15001));
    let got = curl(&["-x", &proxy, &format!("http://{HOST}/todos/1")]).await;
    assert_eq!(got.code, "000", "{got:?}");
    let entry = chain.sidecar.next_log().await;
    assert_eq!(entry["upstream_cluster"], "BlackHoleCluster");
    assert_eq!(entry["response_flags"], "UH");
    assert!(chain.external.seen.all().is_empty(), "nothing got out");
}

/// Istio allows WebSocket upgrades only: `h2c` is dropped (no tunnel
/// that skips authorization and logs), any other upgrade is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_websocket_is_upgraded() {
    let chain = SeedChain::start(&[]).await;
    let addr = chain.sidecar.addr(15001);
    let request = |upgrade: &str| {
        format!(
            "GET http://{HOST}/todos/1 HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        )
    };
    let h2c = raw(addr, request("h2c").as_bytes()).await;
    assert!(h2c.starts_with("HTTP/1.1 200"), "{h2c}");
    let other = raw(addr, request("foo").as_bytes()).await;
    assert!(other.starts_with("HTTP/1.1 403"), "{other}");
    let entry = chain.sidecar.log_of_status(403).await;
    assert_eq!(entry["response_code_details"], "upgrade_failed");
}

/// A client's `x-forwarded-client-cert` never reaches the upstream: the
/// sidecar drops it, the gateway sets it from the verified certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_details_come_from_the_handshake() {
    let chain = SeedChain::start(&[]).await;
    let got = chain
        .via_sidecar(
            &format!("http://{HOST}/todos/1"),
            &["-H", "X-Forwarded-Client-Cert: By=spiffe://evil;URI=spiffe://cluster.local/ns/admin/sa/root"],
        )
        .await;
    assert_eq!(got.code, "200");
    let xfcc = chain.external.seen.all()[0]
        .client_cert
        .clone()
        .unwrap_or_default();
    assert!(
        xfcc.starts_with("By=spiffe://cluster.local/ns/curl-egress-tst/sa/curl-egress-tst;Hash="),
        "{xfcc}"
    );
    assert!(xfcc.ends_with(&format!(";URI={CURL_ID}")), "{xfcc}");
    assert!(!xfcc.contains("evil"), "{xfcc}");
}

/// Requests no proxy should act on: two Host headers, a method not in
/// upper case, headers over 60 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused() {
    let chain = SeedChain::start(&[]).await;
    let addr = chain.sidecar.addr(15001);
    let two_hosts = raw(
        addr,
        format!("GET http://{HOST}/todos/1 HTTP/1.1\r\nHost: unregistered.example.com\r\nHost: {HOST}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(two_hosts.starts_with("HTTP/1.1 400"), "{two_hosts}");
    let lowercase = raw(
        addr,
        format!("delete http://{HOST}/todos/1 HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(lowercase.starts_with("HTTP/1.1 400"), "{lowercase}");
    let protocol_errors = "downstream_cx_protocol_error";
    chain.sidecar.refused_reaches(protocol_errors, 2.0).await;
    let big = format!("X-Big: {}", "a".repeat(70 * 1024));
    let oversized = chain
        .via_sidecar(&format!("http://{HOST}/todos/1"), &["-H", &big])
        .await;
    assert_eq!(oversized.code, "431");
    assert!(
        chain.external.seen.all().is_empty(),
        "none reached the upstream"
    );
}

/// A Host no URI can carry (a space in it), matched by a wildcard route:
/// 400 before anything goes upstream, flagged DPE `invalid_authority`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authority_no_uri_can_carry_is_refused() {
    let external = External::start(&[HOST]).await;
    let config = seed_config_except(
        &["authorization-policy.yaml"],
        &["apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: any-host, namespace: curl-egress-tst}
spec:
  selector: {istio: egressgateway}
  servers: [{port: {number: 8080, name: http-any, protocol: HTTP}, hosts: ['*']}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: any-host, namespace: curl-egress-tst}
spec:
  hosts: ['*']
  gateways: [any-host]
  http: [{route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]}]
"],
    );
    let gw = TestProxy::start(&Mesh::default(), SeedChain::gateway_spec(config, &external)).await;
    let answer = raw(
        gw.addr(8080),
        b"GET /todos/1 HTTP/1.1\r\nHost: bad host\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let entry = gw.next_log().await;
    assert_eq!(entry["response_flags"], "DPE");
    assert_eq!(entry["response_code_details"], "invalid_authority");
    // The same route with a Host a URI carries reaches the stand-in.
    let fine = raw(
        gw.addr(8080),
        format!("GET /todos/1 HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(fine.starts_with("HTTP/1.1 200"), "{fine}");
    assert_eq!(
        external.seen.all().len(),
        1,
        "only the good one went upstream"
    );
}

/// A repeated header is seen whole by conditions: a second `x-role`
/// cannot hide behind an allowed first one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_headers_are_joined_for_conditions() {
    let deny_non_viewers = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: viewers-only, namespace: curl-egress-tst}
spec:
  selector: {matchLabels: {istio: egressgateway}}
  action: DENY
  rules: [{when: [{key: 'request.headers[x-role]', notValues: [viewer]}]}]
";
    let chain = SeedChain::start(&[deny_non_viewers]).await;
    let client = chain.mesh.client(CURL_ID, &chain.dir);
    let port = chain.gateway.addr(80).port();
    let viewer = client
        .get(HOST, port, "/todos/1", &["-H", "x-role: viewer"])
        .await;
    assert_eq!(viewer.code, "200");
    let both = client
        .get(
            HOST,
            port,
            "/todos/1",
            &["-H", "x-role: viewer", "-H", "x-role: admin"],
        )
        .await;
    assert_eq!(both.code, "403");
}

/// An absolute-form request goes where its request-target says, not where
/// its Host header says; `https://` without a port means 443.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_routes_by_the_request_target() {
    let chain = SeedChain::start(&[]).await;
    let got = chain
        .via_sidecar(
            &format!("http://{HOST}/todos/1"),
            &["-H", "Host: unregistered.example.com"],
        )
        .await;
    assert_eq!(got.answer(), ("200", standin::TODO_1));
    assert_eq!(chain.external.seen.all()[0].host.as_deref(), Some(HOST));
    chain.sidecar.next_log().await;
    let addr = chain.sidecar.addr(15001);
    let _ = raw(
        addr,
        format!("GET https://{HOST}/todos/1 HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
    )
    .await;
    let entry = chain.sidecar.next_log().await;
    assert_eq!(
        entry["upstream_cluster"],
        "outbound|443||jsonplaceholder.typicode.com"
    );
}

/// A GET may carry a body (chunked): it is forwarded, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_with_a_chunked_body_keeps_it() {
    let chain = SeedChain::start(&[]).await;
    let got = chain
        .via_sidecar(
            &format!("http://{HOST}/todos/1"),
            &[
                "-X",
                "GET",
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                "0123456789",
            ],
        )
        .await;
    assert_eq!(got.code, "200");
    assert_eq!(chain.external.seen.all()[0].body, 10);
}

/// Every wait is bounded: a half ClientHello, a client that never
/// finishes its handshake, an upstream that never finishes its own, and a
/// response that never starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_peers_are_cut_off() {
    let quick = Timeouts {
        first_byte: Duration::from_millis(300),
        handshake: Duration::from_millis(300),
        stream_idle: Duration::from_millis(300),
        idle: Duration::from_millis(300),
        request_headers: Duration::from_millis(300),
    };
    let mesh = Mesh::default();
    let external = External::start(&[HOST]).await;
    let mut spec = SeedChain::gateway_spec(seed_config(&[]), &external);
    spec.timeouts = quick;
    let gw = TestProxy::start(&mesh, spec).await;
    let addr = gw.addr(80);

    // Nothing at all, then half a ClientHello: both closed.
    for (first, counter) in [
        (&b""[..], "downstream_pre_cx_timeout"),
        (
            b"\x16\x03\x01\x02\x00\x01",
            "downstream_cx_transport_socket_connect_timeout",
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(first).await.unwrap();
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "the connection was held open");
        gw.refused_reaches(counter, 1.0).await;
    }

    // No response within the stream idle timeout: 504 SI.
    let dir = TempDir::new("slow");
    let client = mesh.client(CURL_ID, &dir);
    let held = client.get(HOST, addr.port(), "/hold", &[]).await;
    assert_eq!(held.code, "504", "{held:?}");
    assert_eq!(gw.log_of_status(504).await["response_flags"], "SI");
    gw.refused_reaches("downstream_rq_idle_timeout", 1.0).await;
    external.seen.release_held(1);

    // An upstream that accepts and never speaks TLS: the connect timeout
    // covers the handshake (503 UF after the default retries).
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_addr = mute.local_addr().unwrap();
    let _held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = mute.accept().await {
            open.push(s);
        }
    });
    let short_connect = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: quick, namespace: curl-egress-tst}
spec:
  host: jsonplaceholder.typicode.com
  trafficPolicy:
    connectionPool: {tcp: {connectTimeout: 0.2s}}
    tls: {mode: SIMPLE, sni: jsonplaceholder.typicode.com}
";
    let config = seed_config_except(&["destintionrule.yaml"], &[short_connect]);
    let spec = Spec::new(config, GATEWAY)
        .endpoint(&format!("{HOST}:443"), mute_addr)
        .trust(external.root());
    let gw = TestProxy::start(&mesh, spec).await;
    let got = client.get(HOST, gw.addr(80).port(), "/todos/1", &[]).await;
    assert_eq!(got.code, "503", "{got:?}");
    assert!(got.body.contains("handshake timeout"), "{got:?}");
}

/// CONNECT to a host the mesh does not know (ALLOW_ANY) resolves it with
/// the proxy's DNS server, as its clusters do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_resolves_with_the_proxy_dns() {
    let plain = plain_http().await;
    let mesh = Mesh::default();
    let spec = Spec::new(seed_config_except(&["sidecar.yaml"], &[]), WORKLOAD)
        .dns(dns(&["tunnel.example.internal"]).await);
    let sidecar = TestProxy::start(&mesh, spec).await;
    let proxy = format!("http://{}", sidecar.addr(15001));
    let got = curl(&[
        "-p",
        "-x",
        &proxy,
        &format!("http://tunnel.example.internal:{}/todos/1", plain.port()),
    ])
    .await;
    assert_eq!(got.answer(), ("200", standin::TODO_1));
}

/// A WebSocket tunnel is a connection the drain waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_are_counted_by_the_drain() {
    let chain = SeedChain::start(&[]).await;
    let mut s = tokio::net::TcpStream::connect(chain.sidecar.addr(15001))
        .await
        .unwrap();
    s.write_all(
        format!("GET http://{HOST}/upgrade HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1);
        head.push(byte[0]);
    }
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.unwrap();
    let open = chain
        .gateway
        .app
        .proxy
        .drain
        .drain(Duration::from_millis(100))
        .await;
    assert!(open >= 1, "the tunnel is still open and counted");
}

/// With a connection limit (`--max-connections`, Envoy's overload
/// manager `global_downstream_max_connections`), connections beyond it are
/// closed unread and counted; once one closes, a new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_unread() {
    let mesh = Mesh::default();
    let external = External::start(&[HOST]).await;
    let mut spec = SeedChain::gateway_spec(seed_config(&[]), &external);
    spec.max_connections = Some(2);
    let gw = TestProxy::start(&mesh, spec).await;
    let addr = gw.addr(80);
    let dir = TempDir::new("limit");
    let client = mesh.client(CURL_ID, &dir);

    // Two connections that have sent nothing yet hold both places.
    let first = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let proxy = gw.app.proxy.clone();
    let open = |n: usize| {
        let proxy = proxy.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while proxy.drain.open_connections() != n {
                assert!(tokio::time::Instant::now() < deadline, "never {n} open");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    open(2).await;
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut sink)).await;
    assert!(matches!(closed, Ok(Ok(0))), "closed unread: {closed:?}");
    let refused = client.get(HOST, addr.port(), "/todos/1", &[]).await;
    assert_ne!(refused.exit, 0, "{refused:?}");
    gw.refused_reaches("downstream_global_cx_overflow", 2.0)
        .await;

    drop(first);
    open(1).await;
    let got = client.get(HOST, addr.port(), "/todos/1", &[]).await;
    assert_eq!(got.code, "200", "{got:?}");
}

/// Hosts a client makes up never become metric labels (Istio reports
/// `unknown` without a cluster): a label per host would let any caller
/// grow the gateway's memory without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_hosts_are_no_metric_labels() {
    let chain = SeedChain::start(&[]).await;
    for i in 0..3 {
        let host = format!("made-up-{i}.example");
        let got = chain.mtls_request(CURL_ID, &host, "/").await;
        assert_eq!(got.code, "404", "{got:?}");
        let logged = chain.gateway.log_of_status(404).await;
        assert!(logged["authority"].as_str().unwrap().starts_with(&host));
    }
    let text = chain.gateway.metrics_text();
    assert!(!text.contains("made-up-"), "{text}");
    let labels = [("response_code", "404"), ("destination_service", "unknown")];
    assert_eq!(
        metric_value(&text, "istio_requests_total", &labels),
        Some(3.0),
        "{text}"
    );
    let egress = [
        ("destination_service_name", "unknown"),
        ("response_code", "404"),
    ];
    assert_eq!(
        metric_value(&text, "meshgate_egress_requests_total", &egress),
        Some(3.0),
        "{text}"
    );
}

/// Envoy's connection idle timeout: an HTTP/2 connection with no request
/// in flight is closed (GOAWAY); a request in flight keeps its connection
/// for as long as it takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_busy_ones_are_not() {
    let mesh = Mesh::default();
    let external = External::start(&[HOST]).await;
    let mut spec = SeedChain::gateway_spec(seed_config(&[]), &external);
    spec.timeouts.idle = Duration::from_millis(300);
    let gw = TestProxy::start(&mesh, spec).await;
    let addr = gw.addr(80);

    // A request in flight (the stand-in holds /hold) on its own connection.
    let dir = TempDir::new("idle");
    let client = mesh.client(CURL_ID, &dir);
    let port = addr.port();
    let held = tokio::spawn(async move { client.get(HOST, port, "/hold", &[]).await });

    // An HTTP/2 connection (prior knowledge) that asks for nothing: the
    // gateway says GOAWAY and closes it.
    let h2 = tokio::net::TcpStream::connect(addr).await.unwrap();
    let frames = tokio::time::timeout(Duration::from_secs(10), h2_idle_client(h2)).await;
    let frames = frames.expect("the idle connection was held open");
    assert!(frames.contains(&GOAWAY), "a GOAWAY frame: {frames:?}");
    gw.refused_reaches("downstream_cx_idle_timeout", 1.0).await;

    // Longer than the idle timeout has passed; the held request still
    // gets its answer.
    assert!(
        external.seen.all().iter().any(|r| r.path == "/hold"),
        "the held request reached the stand-in"
    );
    external.seen.release_held(1);
    assert_eq!(held.await.unwrap().answer(), ("200", standin::TODO_1));
}

/// HTTP/1.1: a request head that never finishes (a client sending it byte
/// by byte, or stopping halfway) is cut; a kept-alive connection that
/// sends nothing between requests is not (Envoy keeps it for the idle
/// timeout), and its next request is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_heads_are_cut_quiet_keep_alives_are_not() {
    let head_limit = Duration::from_millis(300);
    let mesh = Mesh::default();
    let external = External::start(&[HOST]).await;
    let mut spec = SeedChain::gateway_spec(seed_config(&[]), &external);
    spec.timeouts.request_headers = head_limit;
    let gw = TestProxy::start(&mesh, spec).await;
    let addr = gw.addr(80);
    let request = format!("GET /todos/1 HTTP/1.1\r\nhost: {HOST}\r\n\r\n");

    // A kept-alive connection quiet for three head timeouts (longer than
    // the watcher can take to notice) still carries the next request. No
    // mesh identity here: the gateway's policy answers 403 both times.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    for round in 0..2 {
        if round == 1 {
            // Time passing is the point: nothing to wait for instead.
            tokio::time::sleep(head_limit * 3).await;
        }
        s.write_all(request.as_bytes()).await.unwrap();
        let head = tokio::time::timeout(Duration::from_secs(5), response_head(&mut s)).await;
        let head = head.expect("an answer");
        assert!(head.starts_with("HTTP/1.1 403"), "round {round}: {head:?}");
    }
    let cut = |text: &str| {
        let reason = [("reason", "downstream_rq_header_timeout")];
        metric_value(text, "meshgate_downstream_refused_total", &reason)
    };
    assert_eq!(cut(&gw.metrics_text()), None, "nothing cut yet");

    // Then half a head, and no more: closed without an answer.
    s.write_all(&request.as_bytes()[..20]).await.unwrap();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(closed.is_ok(), "the connection was held open");
    assert_eq!(
        String::from_utf8_lossy(&got),
        "",
        "no answer to half a head"
    );
    gw.refused_reaches("downstream_rq_header_timeout", 1.0)
        .await;
}

/// Reads one response's head and its `content-length` body.
async fn response_head(s: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while got.len() < end + 4 + length {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed mid-body");
                got.extend_from_slice(&chunk[..n]);
            }
            return head;
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed before an answer: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&chunk[..n]);
    }
}

const PING: u8 = 6;
const GOAWAY: u8 = 7;

/// An HTTP/2 client that opens a connection, asks for nothing, answers
/// pings, and returns the types of the frames it got once the server has
/// closed the connection.
async fn h2_idle_client(mut s: tokio::net::TcpStream) -> Vec<u8> {
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut types = Vec::new();
    loop {
        let mut head = [0u8; 9];
        if s.read_exact(&mut head).await.is_err() {
            return types;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        if s.read_exact(&mut payload).await.is_err() {
            return types;
        }
        types.push(head[3]);
        let ack = 1;
        if head[3] == PING && head[4] & ack == 0 {
            let mut pong = vec![0, 0, 8, PING, ack, 0, 0, 0, 0];
            pong.extend_from_slice(&payload);
            let _ = s.write_all(&pong).await;
        }
    }
}

/// MeshConfig `trustDomainAliases`: a policy written for the old trust
/// domain still holds for the same workloads under the new one, as Istio
/// expands principals; without the alias it names nobody here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_of_an_aliased_trust_domain_still_apply() {
    const DENY_OLD: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-old, namespace: curl-egress-tst}
spec:
  selector: {matchLabels: {istio: egressgateway}}
  action: DENY
  rules:
  - from: [{source: {principals: ['old.example/ns/curl-external-tst/sa/default']}}]
    to: [{operation: {paths: [/todos/1]}}]
";
    let chain = SeedChain::start(&[DENY_OLD]).await;
    let client = chain.mesh.client(CURL_ID, &chain.dir);
    let without = client
        .get(HOST, chain.gateway.addr(80).port(), "/todos/1", &[])
        .await;
    assert_eq!(without.code, "200", "old.example is not ours: {without:?}");

    let mut spec = SeedChain::gateway_spec(seed_config(&[DENY_OLD]), &chain.external);
    spec.mesh = MeshSettings {
        trust_domain_aliases: vec!["old.example".to_owned()],
        ..MeshSettings::default()
    };
    let aliased = TestProxy::start(&chain.mesh, spec).await;
    let with = client
        .get(HOST, aliased.addr(80).port(), "/todos/1", &[])
        .await;
    assert_eq!(with.answer(), ("403", "RBAC: access denied"));
}
