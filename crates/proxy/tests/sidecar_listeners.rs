//! Listeners a Sidecar resource has the sidecar bind itself (captureMode
//! NONE, unix sockets) and the ingress options that go with them
//! (`defaultEndpoint` on a unix socket, `tls` for clients outside the
//! mesh): the application calls them directly, nothing redirects. Runs as
//! any user on 127.0.0.1 and unix sockets in a temporary folder.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use meshgate_proxy::testing::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A port nothing listens on now (the listener that picked it is closed).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// An HTTP/1.1 server on a unix socket answering `body` to any request
/// (and closing: one request per connection).
fn unix_http(path: &str, body: &'static str) {
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(response.as_bytes()).await;
            });
        }
    });
}

/// What a user reads on the proxy's inspection port at `/listeners`
/// (served in process on 127.0.0.1, as `meshgate sidecar` serves it).
async fn inspect_listeners(mesh: &Mesh, sc: &TestProxy) -> Vec<serde_json::Value> {
    use meshgate_proxy::inspect::{Inspect, serve};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spiffe = sc.app.proxy.state.load().view.workload.spiffe_id.clone();
    let inspect = Inspect {
        proxy: sc.app.proxy.clone(),
        identity: mesh.identity(&spiffe).await,
        workload: WORKLOAD.to_owned(),
        started: std::time::Instant::now(),
        config: Default::default(),
        log_filter: None,
    };
    let task = tokio::spawn(serve(listener, inspect));
    let got = curl(&[&format!("http://{addr}/listeners")]).await;
    task.abort();
    assert_eq!(got.code, "200", "{got:?}");
    serde_json::from_str::<serde_json::Value>(&got.body)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// A ServiceEntry for `echo.internal` on `port`, served by `app`.
fn echo_entry(port: u16, app: SocketAddr) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: curl-external-tst}}
spec:
  hosts: [echo.internal]
  location: MESH_EXTERNAL
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {}}}}}]
",
        app.port()
    )
}

/// Egress: a captureMode NONE listener (127.0.0.1 by default) serves the
/// hosts its egress listener imports on its port, REGISTRY_ONLY blocks the
/// rest; a unix socket listener serves requests that name their host.
/// Ingress: a captureMode NONE listener takes the port itself and forwards
/// to its `defaultEndpoint`, here a unix socket, reported as the
/// destination. A reload that drops a listener closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_binds_the_listeners_its_sidecar_declares() {
    let mesh = Mesh::default();
    let dir = TempDir::new("bound-listeners");
    let app = plain_http().await;
    let (direct, inbound) = (free_port(), free_port());
    let egress_sock = dir.path("egress.sock");
    let app_sock = dir.path("app.sock");
    unix_http(&app_sock, "hello from a unix socket");
    let sidecar = |with_direct: bool| {
        let direct_listener = format!(
            "  - port: {{number: {direct}, protocol: HTTP, name: http-direct}}
    captureMode: NONE
    hosts: ['./*']
"
        );
        format!(
            "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: bound, namespace: curl-external-tst}}
spec:
  workloadSelector: {{labels: {{app: curl-test}}}}
  outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}
  egress:
{}  - port: {{number: 0, protocol: HTTP, name: http-uds}}
    bind: unix://{egress_sock}
    hosts: ['./*']
  - hosts: ['*/*']
  ingress:
  - port: {{number: {inbound}, protocol: HTTP, name: http-in}}
    bind: 127.0.0.1
    captureMode: NONE
    defaultEndpoint: unix://{app_sock}
",
            if with_direct {
                direct_listener.as_str()
            } else {
                ""
            }
        )
    };
    let entry = echo_entry(direct, app);
    let config =
        |with_direct| seed_config_except(&["sidecar.yaml"], &[&entry, &sidecar(with_direct)]);
    let mut sc = TestProxy::start(&mesh, Spec::new(config(true), WORKLOAD)).await;
    let mut bound: Vec<String> = sc
        .app
        .bound_addresses()
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    bound.sort();
    let mut want = vec![
        format!("127.0.0.1:{direct}"),
        format!("127.0.0.1:{inbound}"),
        format!("unix://{egress_sock}"),
    ];
    want.sort();
    assert_eq!(bound, want);
    // The inspection port's /listeners names them after the mesh's ports.
    let listeners = inspect_listeners(&mesh, &sc).await;
    let named: Vec<String> = listeners
        .iter()
        .filter(|l| l["origin"].as_str().unwrap_or("").starts_with("Sidecar "))
        .map(|l| {
            format!(
                "{} {} {} {}",
                l["direction"].as_str().unwrap(),
                l["port"],
                l["bind"].as_str().unwrap(),
                l["origin"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        named,
        [
            format!("outbound {direct} 127.0.0.1 Sidecar curl-external-tst/bound egress"),
            format!("outbound 0 unix://{egress_sock} Sidecar curl-external-tst/bound egress"),
            format!("inbound {inbound} 127.0.0.1 Sidecar curl-external-tst/bound ingress"),
        ],
        "{listeners:#?}"
    );
    assert!(
        listeners.len() > named.len(),
        "the mesh's ports first: {listeners:#?}"
    );

    let url = format!("http://127.0.0.1:{direct}/direct");
    let got = curl(&["-H", "Host: echo.internal", &url]).await;
    assert_eq!(got.code, "200", "{got:?}");
    assert!(got.body.contains("\"path\": \"/direct\""), "{got:?}");
    let entry = sc.next_log().await;
    assert_eq!(
        entry["upstream_cluster"],
        format!("outbound|{direct}||echo.internal")
    );
    assert_eq!(entry["upstream_host"], app.to_string());
    let blocked = curl(&["-H", "Host: elsewhere.example", &url]).await;
    assert_eq!(blocked.code, "502", "REGISTRY_ONLY: {blocked:?}");
    assert_eq!(sc.next_log().await["route_name"], "block_all");

    let uds_url = format!("http://echo.internal:{direct}/uds");
    let got = curl(&["--unix-socket", &egress_sock, &uds_url]).await;
    assert_eq!(got.code, "200", "{got:?}");
    assert!(got.body.contains("\"path\": \"/uds\""), "{got:?}");
    sc.next_log().await;

    let got = curl(&[&format!("http://127.0.0.1:{inbound}/in")]).await;
    assert_eq!(got.answer(), ("200", "hello from a unix socket"));
    let entry = sc.next_log().await;
    assert_eq!(entry["upstream_cluster"], format!("inbound|{inbound}||"));
    let text = sc.metrics_text();
    let reported = metric_value(
        &text,
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("destination_workload", "curl-test"),
            ("response_code", "200"),
            ("connection_security_policy", "none"),
        ],
    );
    assert_eq!(reported, Some(1.0), "{text}");

    // The direct listener goes with the reload that removes it; the
    // others stay.
    sc.reload(config(false)).await;
    let gone = curl(&["-H", "Host: echo.internal", &url]).await;
    assert_eq!(gone.exit, 7, "connection refused: {gone:?}");
    let got = curl(&[&format!("http://127.0.0.1:{inbound}/in")]).await;
    assert_eq!(got.code, "200", "{got:?}");
}

/// An ingress listener's `tls` terminates TLS from clients outside the
/// mesh with its own certificate; inside is HTTP (an HTTPS port), served
/// with request-level policy; plaintext on that port is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_ingress_tls_port_terminates_with_its_certificate() {
    let mesh = Mesh::default();
    let dir = TempDir::new("ingress-tls");
    let app = plain_http().await;
    let (cert, key, root) = server_cert_files(&dir, "curl-test.example");
    let sidecar = format!(
        "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: tls-in, namespace: curl-external-tst}}
spec:
  workloadSelector: {{labels: {{app: curl-test}}}}
  ingress:
  - port: {{number: {}, protocol: HTTPS, name: https-in}}
    tls: {{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: curl-external-tst}}
spec:
  selector: {{matchLabels: {{app: curl-test}}}}
  action: DENY
  rules: [{{to: [{{operation: {{paths: [/admin*]}}}}]}}]
",
        app.port()
    );
    let config = seed_config_except(&["sidecar.yaml"], &[&sidecar]);
    let mut sc = TestProxy::start(&mesh, Spec::new(config, WORKLOAD)).await;
    let inbound = sc.capture_inbound(app).await;

    let got = https_get(
        &root,
        "curl-test.example",
        inbound.port(),
        inbound,
        "/hello",
    )
    .await;
    assert_eq!(got.code, "200", "{got:?}");
    let echo: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
    let entry = sc.next_log().await;
    assert_eq!(entry["requested_server_name"], "curl-test.example");
    assert_eq!(entry["upstream_host"], app.to_string());

    let denied = https_get(
        &root,
        "curl-test.example",
        inbound.port(),
        inbound,
        "/admin",
    )
    .await;
    assert_eq!(denied.answer(), ("403", "RBAC: access denied"));
    sc.next_log().await;

    let plain = curl(&[&format!("http://{inbound}/hello")]).await;
    assert_ne!(plain.exit, 0, "plaintext refused: {plain:?}");
}
