//! The egress gateway in process, with real parts: the seed's config, a
//! real HTTPS stand-in for jsonplaceholder.typicode.com with its own CA,
//! curl as the mesh peer with certificates from the mesh CA, promtool for
//! the metrics. Runs as any user.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use meshgate_proxy::standin;
use meshgate_proxy::testing::*;

const OTHER_ID: &str = "spiffe://cluster.local/ns/other/sa/default";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_gateway_serves_authorizes_and_reports() {
    let chain = SeedChain::start(&[]).await;
    let gw = &chain.gateway;

    // The allowed namespace gets the stand-in's JSON, over TLS the gateway
    // originated with SNI.
    let ok = chain.mtls_get(CURL_ID, "/todos/1").await;
    assert_eq!(ok.answer(), ("200", standin::TODO_1));
    let seen = chain.external.seen.all();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].sni.as_deref(), Some(HOST));
    assert_eq!(seen[0].path, "/todos/1");
    let entry = gw.next_log().await;
    // curl negotiates HTTP/2 over TLS (ALPN).
    assert_eq!(entry["protocol"], "HTTP/2");
    assert_eq!(entry["response_code"], 200);
    assert_eq!(entry["response_flags"], "-");
    assert_eq!(entry["response_code_details"], "via_upstream");
    assert_eq!(
        entry["upstream_cluster"],
        "outbound|443||jsonplaceholder.typicode.com"
    );
    assert_eq!(entry["downstream_peer_uri_san"], CURL_ID);

    // Another namespace is denied by the AuthorizationPolicy, and so is
    // plaintext (PERMISSIVE accepts it, but it has no namespace to allow).
    let denied = chain.mtls_get(OTHER_ID, "/todos/1").await;
    assert_eq!(denied.answer(), ("403", "RBAC: access denied"));
    let entry = gw.next_log().await;
    assert_eq!(
        entry["response_code_details"],
        "rbac_access_denied_matched_policy[none]"
    );
    assert_eq!(entry["downstream_peer_uri_san"], OTHER_ID);
    let plain = chain.plain_get("/todos/1").await;
    assert_eq!(plain.answer(), ("403", "RBAC: access denied"));
    gw.next_log().await;
    assert_eq!(
        chain.external.seen.all().len(),
        1,
        "denied requests never reach the upstream"
    );

    // Metrics: valid exposition, Istio's labels, and who made each call.
    let text = gw.metrics_text();
    let (ok, report) = promtool_check(&text);
    assert!(ok, "promtool: {report}\n{text}");
    let requests = |labels: &[(&str, &str)]| metric_value(&text, "istio_requests_total", labels);
    assert_eq!(
        requests(&[
            ("reporter", "source"),
            ("source_workload", "curl-egress-tst-gateway"),
            ("source_workload_namespace", "curl-egress-tst"),
            ("destination_service_name", HOST),
            ("destination_service_namespace", "curl-external-tst"),
            ("response_code", "200"),
            ("response_flags", "-"),
            ("connection_security_policy", "unknown"),
        ]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(requests(&[("response_code", "403")]), Some(2.0), "{text}");
    let egress =
        |labels: &[(&str, &str)]| metric_value(&text, "meshgate_egress_requests_total", labels);
    for (labels, what) in [
        (
            &[
                ("source_principal", CURL_ID),
                ("source_workload_namespace", "curl-external-tst"),
                ("connection_security_policy", "mutual_tls"),
                ("destination_service_name", HOST),
                ("response_code", "200"),
                ("decision", "allow"),
            ][..],
            "the allowed call",
        ),
        (
            &[
                ("source_principal", OTHER_ID),
                ("connection_security_policy", "mutual_tls"),
                ("response_code", "403"),
                ("decision", "deny"),
            ][..],
            "the other namespace's denied call",
        ),
        (
            &[
                ("source_principal", "unknown"),
                ("connection_security_policy", "none"),
                ("decision", "deny"),
            ][..],
            "the plaintext call",
        ),
    ] {
        assert_eq!(egress(labels), Some(1.0), "{what}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_peer_authentication_refuses_plaintext() {
    let chain = SeedChain::start(&[
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: curl-egress-tst}\nspec:\n  mtls: {mode: STRICT}\n",
    ])
    .await;
    let plain = chain.plain_get("/todos/1").await;
    assert_eq!(plain.code, "000", "no HTTP answer at all");
    assert!(
        plain.exit == 52 || plain.exit == 56,
        "curl: empty reply or reset, got {plain:?}"
    );
    let ok = chain.mtls_get(CURL_ID, "/todos/1").await;
    assert_eq!(ok.answer(), ("200", standin::TODO_1));
    let entry = chain.gateway.next_log().await;
    assert_eq!(
        entry["response_code"], 200,
        "the refused connection has no log line"
    );
    assert_eq!(entry["path"], "/todos/1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_or_misnamed_upstream_fails_with_uf_after_retries() {
    let mesh = Mesh::default();
    let dir = TempDir::new("gw-untrusted");
    let client = mesh.client(CURL_ID, &dir);
    let get = |gw: &TestProxy| {
        let port = gw.addr(80).port();
        let client = client.clone();
        async move { client.get(HOST, port, "/todos/1", &[]).await }
    };

    // The stand-in's CA is not trusted: the handshake fails, is retried
    // (Istio's default: connect-failure), and the caller gets 503 UF,URX.
    let external = External::start(&[HOST]).await;
    let spec = Spec::new(seed_config(&[]), GATEWAY).endpoint(&format!("{HOST}:443"), external.addr);
    let gw = TestProxy::start(&mesh, spec).await;
    let failed = get(&gw).await;
    assert_eq!(failed.code, "503", "{failed:?}");
    assert!(
        failed
            .body
            .starts_with("upstream connect error or disconnect/reset before headers"),
        "{failed:?}"
    );
    assert!(failed.body.contains("TLS_error"), "{failed:?}");
    assert!(
        external.seen.all().is_empty(),
        "no request reached the stand-in"
    );
    let entry = gw.next_log().await;
    assert_eq!(entry["response_flags"], "UF,URX");
    assert_eq!(
        entry["response_code_details"],
        "upstream_reset_before_response_started{connection_failure}"
    );
    assert!(failure_reason_mentions(&entry, "TLS_error"), "{entry}");
    assert_eq!(
        metric_value(
            &gw.metrics_text(),
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "UF,URX")]
        ),
        Some(1.0)
    );

    // Trusted CA, but the certificate is for another name.
    let other = External::start(&["other.example.com"]).await;
    let spec = SeedChain::gateway_spec(seed_config(&[]), &other);
    let gw = TestProxy::start(&mesh, spec).await;
    let failed = get(&gw).await;
    assert_eq!(failed.code, "503", "{failed:?}");
    assert!(failed.body.contains("TLS_error"), "{failed:?}");
    assert!(other.seen.all().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_failure_is_503_uh() {
    let mesh = Mesh::default();
    let dir = TempDir::new("gw-dns");
    // The DNS server knows nothing: NXDOMAIN for the external host.
    let spec = Spec::new(seed_config(&[]), GATEWAY).dns(dns(&[]).await);
    let gw = TestProxy::start(&mesh, spec).await;
    let got = mesh
        .client(CURL_ID, &dir)
        .get(HOST, gw.addr(80).port(), "/todos/1", &[])
        .await;
    assert_eq!(got.answer(), ("503", "no healthy upstream"));
    let entry = gw.next_log().await;
    assert_eq!(entry["response_flags"], "UH");
    assert_eq!(entry["response_code_details"], "no_healthy_upstream");
}

/// api.example.com:443, a TLS service.
macro_rules! api_service_entry {
    () => {
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: curl-egress-tst}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
"
    };
}

const PASSTHROUGH: &str = concat!(
    api_service_entry!(),
    "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: tls-passthrough, namespace: curl-egress-tst}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: [api.example.com]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-passthrough, namespace: curl-egress-tst}
spec:
  hosts: [api.example.com]
  gateways: [tls-passthrough]
  tls:
  - match: [{sniHosts: [api.example.com], port: 443}]
    route: [{destination: {host: api.example.com, port: {number: 443}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-passthrough, namespace: curl-egress-tst}
spec:
  selector: {matchLabels: {istio: egressgateway}}
  rules: [{to: [{operation: {ports: ['443']}}], when: [{key: connection.sni, values: [api.example.com]}]}]
"
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passthrough_routes_by_sni_and_counts_tcp() {
    let mesh = Mesh::default();
    let dir = TempDir::new("gw-passthrough");
    let api = External::start(&["api.example.com"]).await;
    let ca = dir.write("api-ca.pem", &api.ca.root_pem);
    let spec =
        Spec::new(seed_config(&[PASSTHROUGH]), GATEWAY).endpoint("api.example.com:443", api.addr);
    let gw = TestProxy::start(&mesh, spec).await;
    let port = gw.addr(443).port();

    // The client's own TLS goes through the gateway to the stand-in.
    let got = https_get(&ca, "api.example.com", port, gw.addr(443), "/todos/1").await;
    assert_eq!(got.answer(), ("200", standin::TODO_1));
    assert_eq!(api.seen.all()[0].sni.as_deref(), Some("api.example.com"));
    let entry = gw.next_log().await;
    assert_eq!(entry["method"], serde_json::Value::Null, "a TCP entry");
    assert_eq!(entry["requested_server_name"], "api.example.com");
    assert_eq!(entry["upstream_cluster"], "outbound|443||api.example.com");
    assert!(entry["bytes_sent"].as_u64().unwrap() > 0, "{entry}");

    // An SNI without a tls route gets no connection (NR).
    let other = curl(&[
        "-k",
        "--resolve",
        &format!("other.example.com:{port}:127.0.0.1"),
        &format!("https://other.example.com:{port}/"),
    ])
    .await;
    assert_eq!(other.code, "000");
    let entry = gw.next_log().await;
    assert_eq!(entry["response_flags"], "NR");
    assert_eq!(entry["requested_server_name"], "other.example.com");

    let text = gw.metrics_text();
    let (ok, report) = promtool_check(&text);
    assert!(ok, "{report}");
    let tcp = |name: &str, labels: &[(&str, &str)]| metric_value(&text, name, labels);
    assert_eq!(
        tcp(
            "istio_tcp_connections_opened_total",
            &[
                ("destination_service_name", "api.example.com"),
                ("request_protocol", "tcp"),
                ("response_flags", "-"),
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        tcp(
            "istio_tcp_sent_bytes_total",
            &[("destination_service_name", "api.example.com")]
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(
        tcp(
            "istio_tcp_connections_closed_total",
            &[
                ("destination_service_name", "unknown"),
                ("response_flags", "NR")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        !text.contains("other.example.com"),
        "a client's SNI is no label value: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_routing_features_and_https_termination() {
    let mesh = Mesh::default();
    let dir = TempDir::new("gw-routing");
    // A server certificate for an HTTPS Gateway server (SIMPLE termination).
    let (cert, key, tools_ca) = server_cert_files(&dir, "tools.example.com");
    let tools = format!(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: tools, namespace: curl-egress-tst}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: 80, name: http-tools, protocol: HTTP}}
    hosts: [tools.example.com]
  - port: {{number: 8443, name: https-tools, protocol: HTTPS}}
    hosts: [tools.example.com]
    tls: {{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: tools, namespace: curl-egress-tst}}
spec:
  hosts: [tools.example.com]
  gateways: [tools]
  http:
  - match: [{{uri: {{exact: /old}}}}]
    redirect: {{uri: /new, redirectCode: 302}}
  - match: [{{uri: {{prefix: /teapot}}}}]
    directResponse: {{status: 418, body: {{string: short and stout}}}}
    headers: {{response: {{set: {{x-tools: teapot}}}}}}
  - match: [{{uri: {{prefix: /fault}}}}]
    fault: {{abort: {{httpStatus: 503, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: jsonplaceholder.typicode.com, port: {{number: 443}}}}}}]
  - match: [{{uri: {{prefix: /slow}}}}]
    timeout: 0.2s
    rewrite: {{uri: /hold}}
    route: [{{destination: {{host: jsonplaceholder.typicode.com, port: {{number: 443}}}}}}]
  - match: [{{uri: {{prefix: /api}}}}]
    rewrite: {{uri: /todos}}
    route: [{{destination: {{host: jsonplaceholder.typicode.com, port: {{number: 443}}}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: tools-open, namespace: curl-egress-tst}}
spec:
  selector: {{matchLabels: {{istio: egressgateway}}}}
  rules: [{{to: [{{operation: {{hosts: ['tools.example.com*']}}}}]}}]
"
    );
    let (external, gw) = gateway_with(&mesh, &tools).await;
    let port = gw.addr(80).port();
    let get = |path: &'static str| tools_get(port, path);
    let redirect = get("/old").await;
    assert_eq!(redirect.code, "302");
    assert!(
        redirect
            .body
            .contains(&format!("location: http://tools.example.com:{port}/new")),
        "{redirect:?}"
    );
    assert_eq!(
        gw.next_log().await["response_code_details"],
        "via_route_redirect"
    );
    let teapot = get("/teapot").await;
    assert_eq!(teapot.code, "418");
    assert!(teapot.body.ends_with("short and stout"), "{teapot:?}");
    gw.next_log().await;
    let fault = get("/fault").await;
    assert_eq!(fault.code, "503");
    assert!(fault.body.ends_with("fault filter abort"), "{fault:?}");
    assert_eq!(gw.next_log().await["response_flags"], "FI");
    let api = get("/api/1").await;
    assert_eq!(api.code, "200", "rewrite /api → /todos: {api:?}");
    assert_eq!(external.seen.all().last().unwrap().path, "/todos/1");
    gw.next_log().await;
    // The route's timeout: the stand-in holds /hold.
    let slow = get("/slow").await;
    assert_eq!(slow.code, "504", "{slow:?}");
    assert!(slow.body.ends_with("upstream request timeout"), "{slow:?}");
    let entry = gw.next_log().await;
    assert_eq!(entry["response_flags"], "UT");
    assert_eq!(entry["response_code_details"], "response_timeout");
    external.seen.release_held(1);
    assert_eq!(get("/nothing").await.code, "404", "no rule matches");
    assert_eq!(gw.next_log().await["response_flags"], "NR");

    // The HTTPS server terminates TLS with its own certificate.
    let https = gw.addr(8443);
    let got = https_get(
        &tools_ca,
        "tools.example.com",
        https.port(),
        https,
        "/teapot",
    )
    .await;
    assert_eq!(got.answer(), ("418", "short and stout"));
    let entry = gw.next_log().await;
    assert_eq!(entry["requested_server_name"], "tools.example.com");
    assert_eq!(entry["downstream_peer_uri_san"], serde_json::Value::Null);
}

/// VirtualService delegation: the root rule's `/api` is handed to a
/// delegate VirtualService in the team's namespace; its rules are merged
/// under the root's match, a rule outside `/api` is dropped, and a root's
/// response headers apply to the delegated rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegated_rules_route_only_within_the_roots_match() {
    let tools = &with_tools_gateway(&tools_routes(
        "  - match: [{uri: {prefix: /api}}]
    headers: {response: {set: {x-root: 'yes'}}}
    delegate: {name: api, namespace: team-a}
  - match: [{uri: {prefix: /missing}}]
    delegate: {name: nowhere}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: team-a}
spec:
  http:
  - match: [{uri: {prefix: /api/todos}}]
    rewrite: {uri: /todos}
    route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]
  - match: [{uri: {prefix: /elsewhere}}]
    directResponse: {status: 200, body: {string: leaked past the root}}
  - directResponse: {status: 418, body: {string: api teapot}}
",
    ));
    let mesh = Mesh::default();
    let (external, gw) = gateway_with(&mesh, tools).await;
    let port = gw.addr(80).port();
    let get = |path: &'static str| tools_get(port, path);
    let todo = get("/api/todos/1").await;
    assert_eq!(todo.code, "200", "{todo:?}");
    assert!(todo.body.contains("x-root: yes"), "{todo:?}");
    assert_eq!(external.seen.all().last().unwrap().path, "/todos/1");
    assert_eq!(
        gw.next_log().await["route_name"],
        "team-a/api#0",
        "an unnamed delegated rule is named where it was written"
    );
    let teapot = get("/api/anything").await;
    assert_eq!(
        teapot.code, "418",
        "a delegate rule without match takes the root's"
    );
    assert!(teapot.body.ends_with("api teapot"), "{teapot:?}");
    gw.next_log().await;
    for outside in ["/elsewhere", "/missing/1"] {
        assert_eq!(get(outside).await.code, "404", "{outside}");
        assert_eq!(gw.next_log().await["response_flags"], "NR");
    }
}

/// A route's corsPolicy: preflights from allowed origins are answered by
/// the gateway, other origins' go upstream; responses to allowed origins
/// name the origin and the exposed headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_are_answered_and_allowed_origins_named() {
    let tools = &with_tools_gateway(&tools_routes(
        "  - corsPolicy:
      allowOrigins: [{exact: 'https://app.example'}, {regex: 'https://.*[.]team[.]example'}]
      allowMethods: [GET, POST]
      allowHeaders: [x-token]
      exposeHeaders: [x-request-id]
      maxAge: 1h
      allowCredentials: true
    route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]
",
    ));
    let mesh = Mesh::default();
    let (external, gw) = gateway_with(&mesh, tools).await;
    let port = gw.addr(80).port();
    let url = format!("http://tools.example.com:{port}/todos/1");
    let resolve = format!("tools.example.com:{port}:127.0.0.1");
    let send = |origin: &'static str, preflight: bool| {
        let (url, resolve) = (url.clone(), resolve.clone());
        async move {
            let origin = format!("origin: {origin}");
            let mut args = vec!["-i", "--resolve", &resolve, "-H", &origin];
            if preflight {
                args.extend(["-X", "OPTIONS", "-H", "access-control-request-method: POST"]);
            }
            args.push(&url);
            curl(&args).await
        }
    };
    let pre = send("https://app.example", true).await;
    assert_eq!(pre.code, "200", "{pre:?}");
    for h in [
        "access-control-allow-origin: https://app.example",
        "access-control-allow-methods: GET,POST",
        "access-control-allow-headers: x-token",
        "access-control-max-age: 3600",
        "access-control-allow-credentials: true",
    ] {
        assert!(pre.body.contains(h), "{h} missing: {pre:?}");
    }
    assert!(
        external.seen.all().is_empty(),
        "the gateway answered the preflight"
    );
    assert_eq!(
        gw.next_log().await["response_code_details"],
        "cors_response"
    );

    let get = send("https://a.team.example", false).await;
    assert_eq!(get.code, "200", "{get:?}");
    assert!(
        get.body
            .contains("access-control-allow-origin: https://a.team.example"),
        "{get:?}"
    );
    assert!(
        get.body
            .contains("access-control-expose-headers: x-request-id"),
        "{get:?}"
    );
    gw.next_log().await;

    // Another origin: its preflight goes upstream, its response names no origin.
    let other = send("https://evil.example", true).await;
    assert!(
        !other.body.contains("access-control-allow-origin"),
        "{other:?}"
    );
    assert_eq!(external.seen.all().len(), 2, "the preflight went upstream");
    assert_eq!(gw.next_log().await["response_code_details"], "via_upstream");
    let other = send("https://evil.example", false).await;
    assert_eq!(other.code, "200");
    assert!(
        !other.body.contains("access-control-allow-origin"),
        "{other:?}"
    );
}

/// `mirror`: a copy of each request, body included, goes to the mirror
/// with `-shadow` after the host; the answer the client gets is the
/// route's. `mirrorPercentage: 0` sends no copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_requests_reach_the_mirror_with_their_body() {
    let tools = &with_tools_gateway(&tools_routes(
        "  - match: [{uri: {prefix: /quiet}}]
    mirror: {host: jsonplaceholder.typicode.com, port: {number: 443}}
    mirrorPercentage: {value: 0}
    route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]
  - mirror: {host: jsonplaceholder.typicode.com, port: {number: 443}}
    route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]
",
    ));
    let mesh = Mesh::default();
    let (external, gw) = gateway_with(&mesh, tools).await;
    let port = gw.addr(80).port();
    let resolve = format!("tools.example.com:{port}:127.0.0.1");
    let body = "x".repeat(200_000);
    let dir = TempDir::new("gw-mirror");
    let file = format!("@{}", dir.write("body", &body));
    let url = format!("http://tools.example.com:{port}/posts");
    let post = curl(&["-i", "--resolve", &resolve, "--data-binary", &file, &url]).await;
    assert_eq!(post.code, "200", "{post:?}");
    let seen = external.seen.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 2, "the request and its copy: {seen:?}");
    let hosts: Vec<_> = seen
        .iter()
        .map(|r| r.host.as_deref().unwrap_or(""))
        .collect();
    let (host, shadow) = (
        format!("tools.example.com:{port}"),
        format!("tools.example.com-shadow:{port}"),
    );
    assert!(hosts.contains(&host.as_str()), "{hosts:?}");
    assert!(hosts.contains(&shadow.as_str()), "{hosts:?}");
    assert!(
        seen.iter()
            .all(|r| r.body == body.len() && r.path == "/posts"),
        "{seen:?}"
    );
    assert_eq!(
        gw.next_log().await["response_code"],
        200,
        "one request logged"
    );

    let quiet = tools_get(port, "/quiet").await;
    assert_eq!(quiet.code, "200");
    gw.next_log().await;
    // The copy of /posts and /quiet itself: a copy of /quiet would be a
    // third request before the next one is seen.
    assert_eq!(tools_get(port, "/posts").await.code, "200");
    let seen = external.seen.wait_for(5, Duration::from_secs(10)).await;
    let quiet_copies = seen.iter().filter(|r| r.path == "/quiet").count();
    assert_eq!(quiet_copies, 1, "{seen:?}");
}

/// AUTO_PASSTHROUGH: the client names the cluster in its SNI
/// (`outbound_.443_._.api.example.com`) and its own TLS goes through to
/// that service's endpoints untouched; no VirtualService is involved, and
/// an SNI naming no cluster is closed (NR).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_passthrough_routes_by_the_cluster_the_sni_names() {
    let config = seed_config(&[concat!(
        api_service_entry!(),
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: cross, namespace: curl-egress-tst}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 15443, name: tls, protocol: TLS}
    tls: {mode: AUTO_PASSTHROUGH}
    hosts: ['*.example.com']
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cross-open, namespace: curl-egress-tst}
spec:
  selector: {matchLabels: {istio: egressgateway}}
  rules: [{to: [{operation: {ports: ['15443']}}]}]
"
    )]);
    let sni = "outbound_.443_._.api.example.com";
    let mesh = Mesh::default();
    let external = External::start(&[sni]).await;
    let spec =
        SeedChain::gateway_spec(config, &external).endpoint("api.example.com:443", external.addr);
    let gw = TestProxy::start(&mesh, spec).await;
    let port = gw.addr(15443).port();
    let dir = TempDir::new("auto-passthrough");
    let ca = dir.write("ca.pem", &external.ca.root_pem);
    let get = |host: &str| {
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("https://{host}:{port}/todos/1");
        let ca = ca.clone();
        async move { curl(&["--cacert", &ca, "--resolve", &resolve, &url]).await }
    };
    let got = get(sni).await;
    assert_eq!(got.answer(), ("200", standin::TODO_1));
    assert_eq!(
        external.seen.all()[0].sni.as_deref(),
        Some(sni),
        "the client's TLS, end to end"
    );
    let entry = gw.next_log().await;
    assert_eq!(entry["upstream_cluster"], "outbound|443||api.example.com");
    assert_eq!(entry["route_name"], "auto-passthrough");

    let nowhere = get("outbound_.443_._.nowhere.example.com").await;
    assert_ne!(nowhere.exit, 0, "closed: {nowhere:?}");
    assert_eq!(gw.next_log().await["response_flags"], "NR");
}

/// A chunked request body has no Content-Length: its bytes are counted as
/// they go upstream, for the access log and `istio_request_bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_bodies_are_counted_as_they_pass() {
    let tools = &with_tools_gateway(&tools_routes(
        "  - route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]
",
    ));
    let mesh = Mesh::default();
    let (external, gw) = gateway_with(&mesh, tools).await;
    let port = gw.addr(80).port();
    let dir = TempDir::new("chunked");
    let file = format!("@{}", dir.write("body", &"y".repeat(70_000)));
    let resolve = format!("tools.example.com:{port}:127.0.0.1");
    let url = format!("http://tools.example.com:{port}/posts");
    let chunked = "Transfer-Encoding: chunked";
    let got = curl(&[
        "-i",
        "--resolve",
        &resolve,
        "-H",
        chunked,
        "--data-binary",
        &file,
        &url,
    ])
    .await;
    assert_eq!(got.code, "200", "{got:?}");
    assert_eq!(external.seen.all()[0].body, 70_000);
    let entry = gw.next_log().await;
    assert_eq!(entry["bytes_received"], 70_000, "{entry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_traffic_never_takes_the_gateway_down() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chain = SeedChain::start(&[]).await;
    let addr = chain.gateway.addr(80);
    let junk: Vec<Vec<u8>> = vec![
        b"\x16\x03\x01\x00\x05hello".to_vec(), // a truncated TLS record
        b"\x16\x03\x01\xff\xff"
            .iter()
            .copied()
            .chain(std::iter::repeat_n(0u8, 4096))
            .collect(), // garbage ClientHello
        b"GET / HTTP/1.1\r\nHost: \x00\x01\r\n\r\n".to_vec(), // invalid header bytes
        b"NOT-HTTP at all\r\n\r\n".to_vec(),
        format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "x".repeat(200_000)).into_bytes(), // huge request line
        b"GET / HTTP/1.1\r\nHost: jsonplaceholder.typicode.com\r\nContent-Length: 999999\r\n\r\nshort"
            .to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x99".to_vec(), // h2c preface then a broken frame
    ];
    for bytes in &junk {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(bytes).await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        let read = s.read_to_end(&mut sink);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), read).await;
    }
    // Connections that send nothing and go away.
    for _ in 0..20 {
        drop(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Still serving.
    let ok = chain.mtls_get(CURL_ID, "/todos/1").await;
    assert_eq!(ok.answer(), ("200", standin::TODO_1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_a_new_policy_and_new_ports() {
    let mut chain = SeedChain::start(&[]).await;
    assert_eq!(chain.mtls_get(OTHER_ID, "/todos/1").await.code, "403");
    let other_allowed = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-other, namespace: curl-egress-tst}
spec:
  selector: {matchLabels: {istio: egressgateway}}
  action: ALLOW
  rules: [{from: [{source: {namespaces: [other]}}]}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: alt, namespace: curl-egress-tst}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 8081, name: http-alt, protocol: HTTP}
    hosts: [tools.example.com]
";
    chain.gateway.reload(seed_config(&[other_allowed])).await;
    assert_eq!(
        chain.mtls_get(OTHER_ID, "/todos/1").await.answer(),
        ("200", standin::TODO_1)
    );
    // The new server port is bound and answers (no route there: 404 NR).
    let alt = chain.gateway.addr(8081);
    let got = curl(&[&format!("http://{alt}/")]).await;
    assert_eq!(got.code, "403", "the policies apply on every port: {got:?}");
}

/// The seed's gateway with `extra` config, and the external stand-in.
async fn gateway_with(mesh: &Mesh, extra: &str) -> (External, TestProxy) {
    let external = External::start(&[HOST]).await;
    let spec = SeedChain::gateway_spec(seed_config(&[extra]), &external);
    let gw = TestProxy::start(mesh, spec).await;
    (external, gw)
}

/// curl -i http://tools.example.com:PORT/PATH, resolved to the gateway.
async fn tools_get(port: u16, path: &str) -> Curl {
    let url = format!("http://tools.example.com:{port}{path}");
    let resolve = format!("tools.example.com:{port}:127.0.0.1");
    curl(&["-i", "--resolve", &resolve, &url]).await
}

/// `routes` (VirtualServices) behind an HTTP Gateway server for
/// tools.example.com on port 80, open to every caller.
fn with_tools_gateway(routes: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: tools, namespace: curl-egress-tst}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: 80, name: http-tools, protocol: HTTP}}
    hosts: [tools.example.com]
---
{routes}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: tools-open, namespace: curl-egress-tst}}
spec:
  selector: {{matchLabels: {{istio: egressgateway}}}}
  rules: [{{to: [{{operation: {{hosts: ['tools.example.com*']}}}}]}}]
"
    )
}

/// The `tools` VirtualService (on the tools Gateway) with these `http`
/// rules, and whatever documents follow them.
fn tools_routes(rules: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: tools, namespace: curl-egress-tst}}
spec:
  hosts: [tools.example.com]
  gateways: [tools]
  http:
{rules}"
    )
}

/// A server-first protocol (SMTP, MySQL: the server greets, the client
/// waits for it) through a plain TCP Gateway server without a sidecar:
/// the client's silence is plaintext once the protocol detection timeout
/// (a second by default) has passed, and the greeting comes back, as
/// through Istio's gateway, which detects nothing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_protocols_pass_a_plain_tcp_server() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const GREETING: &[u8] = b"220 smtp.example.com ready\r\n";
    let smtp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let smtp_addr = smtp.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = smtp.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(GREETING).await;
                let mut line = [0u8; 6];
                if s.read_exact(&mut line).await.is_ok() {
                    let _ = s.write_all(b"221 bye\r\n").await;
                }
            });
        }
    });
    let config = seed_config_except(&["authorization-policy.yaml"], &[SMTP_BEHIND_GATEWAY]);
    let spec = Spec::new(config, GATEWAY).endpoint("smtp.example.com:25", smtp_addr);
    let gw = TestProxy::start(&Mesh::default(), spec).await;

    let mut client = tokio::net::TcpStream::connect(gw.addr(2525)).await.unwrap();
    let mut greeting = [0u8; GREETING.len()];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut greeting))
        .await
        .expect("no greeting: the gateway waited for the client")
        .unwrap();
    assert_eq!(&greeting[..], GREETING);
    client.write_all(b"QUIT\r\n").await.unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"221 bye\r\n");
    drop(client);

    let entry = gw.next_log().await;
    assert_eq!(entry["upstream_cluster"], "outbound|25||smtp.example.com");
    assert_eq!(entry["response_flags"], "-");
    assert_eq!(entry["downstream_peer_uri_san"], serde_json::Value::Null);
}
