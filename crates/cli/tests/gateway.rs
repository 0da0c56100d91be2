//! The egress gateway end to end, with real parts: the seed's config
//! unchanged, a real HTTPS stand-in for jsonplaceholder.typicode.com with its
//! own CA, a real DNS server answering for it, and curl as the mesh peer with
//! certificates from `meshgate ca issue`.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use meshgate_proxy::standin::{self, DnsZone, Seen, StandinCa};
use support::*;

const HOST: &str = "jsonplaceholder.typicode.com";
const CURL_ID: &str = "spiffe://cluster.local/ns/curl-external-tst/sa/default";

/// The outside world: stand-in HTTPS on <ip>:443 and DNS pointing at it.
struct World {
    _rt: tokio::runtime::Runtime,
    seen: Seen,
    dns: SocketAddr,
    ca_file: String,
}

fn world(t: &TempDir, cert_names: &[&str]) -> World {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ca = StandinCa::new("stand-in CA").unwrap();
    let ca_file = t.path("standin-ca.pem");
    std::fs::write(&ca_file, &ca.root_pem).unwrap();
    let ip = loopback_ip();
    let names: Vec<String> = cert_names.iter().map(|s| (*s).to_owned()).collect();
    let tls = ca.server_config(&names).unwrap();
    let seen = Seen::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(SocketAddr::new(ip, 443)))
        .expect("bind :443 (as root)");
    rt.spawn(standin::serve_https(listener, tls, seen.clone()));
    let mut zone = DnsZone::default();
    zone.insert(HOST, ip);
    let dns = rt
        .block_on(standin::serve_dns("127.0.0.1:0".parse().unwrap(), zone))
        .unwrap();
    World {
        _rt: rt,
        seen,
        dns,
        ca_file,
    }
}

struct Gateway {
    proc: Proc,
    http: SocketAddr,
    admin: SocketAddr,
    prometheus: SocketAddr,
    health: SocketAddr,
}

/// A proxy's `--ready-file`, written (atomically) right after it logs that
/// it runs.
fn read_ready(path: &str) -> serde_json::Value {
    for _ in 0..100 {
        if let Ok(text) = std::fs::read_to_string(path) {
            return serde_json::from_str(&text).unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no ready file {path}");
}

impl World {
    /// A gateway that resolves the external host with this world's DNS and
    /// trusts its CA.
    fn gateway(&self, t: &TempDir, config: &[&str], extra: &[&str]) -> Gateway {
        let dns = self.dns.to_string();
        let mut args = vec!["--dns-server", &dns, "--extra-roots", &self.ca_file];
        args.extend_from_slice(extra);
        start_gateway(t, config, &args)
    }
}

fn start_gateway(t: &TempDir, config: &[&str], extra: &[&str]) -> Gateway {
    let ready = t.path("gw-ready.json");
    let _ = std::fs::remove_file(&ready);
    let mut args = vec!["gateway"];
    for c in config {
        args.extend(["--config", c]);
    }
    let ca = t.path("ca");
    args.extend([
        "--workload",
        "curl-egress-tst/curl-egress-tst-gateway",
        "--ca-dir",
        &ca,
        "--bind-address",
        "127.0.0.1",
        "--port",
        "80=0",
        "--admin-address",
        "127.0.0.1",
        "--admin-port",
        "0",
        "--prometheus-port",
        "0",
        "--health-port",
        "0",
        "--ready-file",
        &ready,
    ]);
    args.extend(extra);
    let proc = Proc::spawn(&args);
    proc.wait_for("egress gateway running", Duration::from_secs(20));
    let json = read_ready(&ready);
    let addr = |v: &serde_json::Value| {
        v["address"]
            .as_str()
            .unwrap()
            .parse::<SocketAddr>()
            .unwrap()
    };
    let admin = |role: &str| {
        addr(
            json["admin"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["role"] == role)
                .unwrap(),
        )
    };
    Gateway {
        http: addr(&json["listeners"][0]),
        admin: admin("agent"),
        prometheus: admin("prometheus"),
        health: admin("health"),
        proc,
    }
}

fn issue(t: &TempDir, id: &str, out: &str) {
    let o = meshgate(&[
        "ca",
        "issue",
        "--dir",
        &t.path("ca"),
        "--spiffe-id",
        id,
        "--out",
        &t.path(out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn setup(name: &str) -> TempDir {
    let t = TempDir::new(name);
    assert!(
        meshgate(&["ca", "init", "--dir", &t.path("ca")])
            .status
            .success()
    );
    issue(&t, CURL_ID, "curl");
    issue(&t, "spiffe://cluster.local/ns/other/sa/default", "other");
    t
}

/// curl as a mesh peer: mutual TLS with a workload certificate. `-k`: curl
/// cannot check SPIFFE IDs; the gateway's check of curl is what is tested.
fn mtls_get(t: &TempDir, who: &str, gw: &Gateway, path: &str) -> (String, String, i32) {
    let port = gw.http.port();
    curl(&[
        "-k",
        "--cert",
        &t.path(&format!("{who}/cert-chain.pem")),
        "--key",
        &t.path(&format!("{who}/key.pem")),
        "--resolve",
        &format!("{HOST}:{port}:127.0.0.1"),
        &format!("https://{HOST}:{port}{path}"),
    ])
}

fn plain_get(gw: &Gateway, path: &str) -> (String, String, i32) {
    let port = gw.http.port();
    curl(&[
        "--resolve",
        &format!("{HOST}:{port}:127.0.0.1"),
        &format!("http://{HOST}:{port}{path}"),
    ])
}

#[test]
fn seed_gateway_serves_authorizes_and_reports() {
    require_root!();
    let t = setup("gw-seed");
    let w = world(&t, &[HOST]);
    let gw = w.gateway(&t, &[&seed()], &[]);

    assert_eq!(
        curl(&[&format!("http://{}/healthz/ready", gw.health)]).1,
        "200"
    );
    assert_eq!(
        curl(&[&format!("http://{}/healthz/ready", gw.admin)]).1,
        "200"
    );

    // The allowed namespace gets the stand-in's JSON, over TLS the gateway originated.
    let (body, code, _) = mtls_get(&t, "curl", &gw, "/todos/1");
    assert_eq!(
        code,
        "200",
        "{body}\n{}",
        gw.proc.log.lock().unwrap().join("\n")
    );
    assert_eq!(body, standin::TODO_1);
    let seen = w.seen.all();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].sni.as_deref(),
        Some(HOST),
        "the stand-in saw SNI {HOST}"
    );
    assert_eq!(seen[0].path, "/todos/1");

    // Another namespace is denied by the AuthorizationPolicy.
    let (body, code, _) = mtls_get(&t, "other", &gw, "/todos/1");
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("403", "RBAC: access denied")
    );
    // Plaintext (PERMISSIVE): accepted, but there is no namespace to allow.
    let (body, code, _) = plain_get(&gw, "/todos/1");
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("403", "RBAC: access denied")
    );
    assert_eq!(
        w.seen.all().len(),
        1,
        "denied requests never reach the upstream"
    );

    // Metrics: Istio's labels from the gateway, and who made each call.
    let text = scrape_until(
        &format!("http://{}/stats/prometheus", gw.prometheus),
        "istio_requests_total",
        &[("response_code", "403")],
        2.0,
    );
    let (ok, report) = promtool_check(&text);
    assert!(ok, "promtool: {report}\n{text}");
    assert_eq!(
        text,
        http_get(gw.admin, "/stats/prometheus").replace("\r", ""),
        "15020 serves the same metrics"
    );
    assert_eq!(
        metric_value(
            &text,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("source_workload", "curl-egress-tst-gateway"),
                ("source_workload_namespace", "curl-egress-tst"),
                ("destination_service_name", HOST),
                ("destination_service_namespace", "curl-external-tst"),
                ("response_code", "200"),
                ("response_flags", "-"),
                ("connection_security_policy", "unknown"),
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "istio_requests_total", &[("response_code", "403")]),
        Some(2.0),
        "{text}"
    );
    let egress =
        |labels: &[(&str, &str)]| metric_value(&text, "meshgate_egress_requests_total", labels);
    assert_eq!(
        egress(&[
            ("source_principal", CURL_ID),
            ("source_workload_namespace", "curl-external-tst"),
            ("connection_security_policy", "mutual_tls"),
            ("destination_service_name", HOST),
            ("response_code", "200"),
            ("decision", "allow"),
        ]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        egress(&[
            (
                "source_principal",
                "spiffe://cluster.local/ns/other/sa/default"
            ),
            ("connection_security_policy", "mutual_tls"),
            ("response_code", "403"),
            ("decision", "deny"),
        ]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        egress(&[
            ("source_principal", "unknown"),
            ("connection_security_policy", "none"),
            ("decision", "deny")
        ]),
        Some(1.0),
        "{text}"
    );

    // Access log: Istio's format, plus the caller's SPIFFE ID.
    let lines = gw.proc.stdout_lines();
    // curl negotiates HTTP/2 over TLS (ALPN).
    let ok_line = lines
        .iter()
        .find(|l| l.contains("\"GET /todos/1 HTTP/2\" 200 - via_upstream"))
        .unwrap_or_else(|| panic!("access log line in:\n{}", lines.join("\n")));
    assert!(
        ok_line.contains("outbound|443||jsonplaceholder.typicode.com"),
        "{ok_line}"
    );
    assert!(ok_line.ends_with(CURL_ID), "{ok_line}");
    let denied = lines
        .iter()
        .find(|l| l.contains("\" 403 "))
        .expect("denied line");
    assert!(
        denied.contains("rbac_access_denied_matched_policy[none]"),
        "{denied}"
    );
}

#[test]
fn strict_peer_authentication_refuses_plaintext() {
    require_root!();
    let t = setup("gw-strict");
    std::fs::write(
        t.path("strict.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: curl-egress-tst}\nspec:\n  mtls: {mode: STRICT}\n",
    )
    .unwrap();
    let w = world(&t, &[HOST]);
    let gw = w.gateway(
        &t,
        &[&seed(), &t.path("strict.yaml")],
        &["--access-log-format", "json"],
    );
    let (_, code, exit) = plain_get(&gw, "/todos/1");
    assert_eq!(code, "000", "no HTTP answer at all");
    assert!(
        exit == 52 || exit == 56,
        "curl: empty reply or reset, got exit {exit}"
    );
    let (body, code, _) = mtls_get(&t, "curl", &gw, "/todos/1");
    assert_eq!((code.as_str(), body.as_str()), ("200", standin::TODO_1));
    // --access-log-format json: one JSON object per request (written when
    // the response ends, so wait for it).
    gw.proc
        .wait_for("\"response_code\":200", Duration::from_secs(10));
    let lines = gw.proc.stdout_lines();
    let entry: serde_json::Value = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|v: &serde_json::Value| v["response_code"] == 200)
        .unwrap_or_else(|| panic!("a JSON access log entry in {lines:?}"));
    assert_eq!(entry["downstream_peer_uri_san"], CURL_ID);
    assert_eq!(
        entry["upstream_cluster"],
        "outbound|443||jsonplaceholder.typicode.com"
    );
    assert_eq!(entry["path"], "/todos/1");
}

#[test]
fn untrusted_or_misnamed_upstream_fails_with_uf() {
    require_root!();
    // Without the stand-in's CA: the certificate is not trusted.
    let t = setup("gw-untrusted");
    let w = world(&t, &[HOST]);
    let gw = start_gateway(&t, &[&seed()], &["--dns-server", &w.dns.to_string()]);
    let (body, code, _) = mtls_get(&t, "curl", &gw, "/todos/1");
    assert_eq!(code, "503", "{body}");
    assert!(
        body.starts_with("upstream connect error or disconnect/reset before headers"),
        "{body}"
    );
    assert!(
        !body.contains("delectus"),
        "nothing from the untrusted upstream"
    );
    assert!(w.seen.all().is_empty(), "no request reached the stand-in");
    let text = scrape_until(
        &format!("http://{}/stats/prometheus", gw.prometheus),
        "istio_requests_total",
        &[("response_code", "503"), ("response_flags", "UF,URX")],
        1.0,
    );
    assert_eq!(
        metric_value(
            &text,
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "UF,URX")]
        ),
        Some(1.0),
        "{text}"
    );
    drop(gw);

    // Trusted CA, but the certificate is for another name.
    let t = setup("gw-misnamed");
    let w = world(&t, &["other.example.com"]);
    let gw = w.gateway(&t, &[&seed()], &[]);
    let (body, code, _) = mtls_get(&t, "curl", &gw, "/todos/1");
    assert_eq!(code, "503", "{body}");
    assert!(body.contains("TLS_error"), "{body}");
    assert!(!body.contains("delectus"));
    let text = scrape_until(
        &format!("http://{}/stats/prometheus", gw.prometheus),
        "istio_requests_total",
        &[("response_code", "503")],
        1.0,
    );
    assert!(
        metric_value(&text, "istio_requests_total", &[("response_code", "503")]).is_some(),
        "{text}"
    );
}

#[test]
fn dns_failure_is_503_uh_with_a_log_line() {
    require_root!();
    let t = setup("gw-dns");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A DNS server that knows nothing: NXDOMAIN for the external host.
    let dns = rt
        .block_on(standin::serve_dns(
            "127.0.0.1:0".parse().unwrap(),
            DnsZone::default(),
        ))
        .unwrap();
    let handle = std::thread::spawn(move || rt.block_on(std::future::pending::<()>()));
    let gw = start_gateway(&t, &[&seed()], &["--dns-server", &dns.to_string()]);
    let (body, code, _) = mtls_get(&t, "curl", &gw, "/todos/1");
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("503", "no healthy upstream")
    );
    gw.proc
        .wait_for("DNS resolution failed", Duration::from_secs(5));
    assert!(
        gw.proc
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("jsonplaceholder.typicode.com"))
    );
    let text = scrape_until(
        &format!("http://{}/stats/prometheus", gw.prometheus),
        "istio_requests_total",
        &[("response_flags", "UH")],
        1.0,
    );
    assert_eq!(
        metric_value(&text, "istio_requests_total", &[("response_flags", "UH")]),
        Some(1.0),
        "{text}"
    );
    drop(handle);
}

#[test]
fn tls_passthrough_routes_by_sni_and_counts_tcp() {
    require_root!();
    let t = setup("gw-passthrough");
    std::fs::write(
        t.path("passthrough.yaml"),
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: curl-egress-tst}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
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
",
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ca = StandinCa::new("stand-in CA").unwrap();
    std::fs::write(t.path("standin-ca.pem"), &ca.root_pem).unwrap();
    let ip = loopback_ip();
    let tls = ca.server_config(&["api.example.com".to_owned()]).unwrap();
    let seen = Seen::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(SocketAddr::new(ip, 443)))
        .unwrap();
    rt.spawn(standin::serve_https(listener, tls, seen.clone()));
    let mut zone = DnsZone::default();
    zone.insert("api.example.com", ip);
    let dns = rt
        .block_on(standin::serve_dns("127.0.0.1:0".parse().unwrap(), zone))
        .unwrap();

    let gw = start_gateway(
        &t,
        &[&seed(), &t.path("passthrough.yaml")],
        &["--dns-server", &dns.to_string(), "--port", "443=0"],
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("gw-ready.json")).unwrap()).unwrap();
    let tls_port = json["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["port"] == 443)
        .map(|l| {
            l["address"]
                .as_str()
                .unwrap()
                .parse::<SocketAddr>()
                .unwrap()
                .port()
        })
        .unwrap();
    // The client's own TLS goes through the gateway to the stand-in, end to end.
    let (body, code, _) = curl(&[
        "--cacert",
        &t.path("standin-ca.pem"),
        "--resolve",
        &format!("api.example.com:{tls_port}:127.0.0.1"),
        &format!("https://api.example.com:{tls_port}/todos/1"),
    ]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", standin::TODO_1),
        "{}",
        gw.proc.log.lock().unwrap().join("\n")
    );
    assert_eq!(seen.all()[0].sni.as_deref(), Some("api.example.com"));
    // An SNI without a tls route gets no connection.
    let (_, code, _) = curl(&[
        "-k",
        "--resolve",
        &format!("other.example.com:{tls_port}:127.0.0.1"),
        &format!("https://other.example.com:{tls_port}/"),
    ]);
    assert_eq!(code, "000");

    let text = scrape_until(
        &format!("http://{}/stats/prometheus", gw.prometheus),
        "istio_tcp_connections_closed_total",
        &[("destination_service_name", "api.example.com")],
        1.0,
    );
    let (ok, report) = promtool_check(&text);
    assert!(ok, "{report}");
    assert_eq!(
        metric_value(
            &text,
            "istio_tcp_connections_opened_total",
            &[
                ("destination_service_name", "api.example.com"),
                ("request_protocol", "tcp")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        metric_value(
            &text,
            "istio_tcp_sent_bytes_total",
            &[("destination_service_name", "api.example.com")]
        )
        .unwrap()
            > 0.0
    );
    let lines = gw.proc.stdout_lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"- - -\" 0 - ") && l.contains("api.example.com")),
        "{lines:?}"
    );
    drop(rt);
}

/// A sidecar on loopback, used as an explicit HTTP proxy (`curl -x`).
fn start_sidecar(t: &TempDir, config: &[&str], gw: &Gateway, extra: &[&str]) -> (Proc, u16) {
    let ready = t.path("sc-ready.json");
    let _ = std::fs::remove_file(&ready);
    std::fs::write(
        t.path("endpoints"),
        format!(
            "curl-egress-tst.curl-egress-tst.svc.cluster.local:80 {}\n",
            gw.http
        ),
    )
    .unwrap();
    let o = meshgate(&[
        "ca",
        "issue",
        "--dir",
        &t.path("ca"),
        "--spiffe-id",
        CURL_ID,
        "--out",
        &t.path("sc-certs"),
    ]);
    assert!(o.status.success());
    let mut args = vec!["sidecar"];
    for c in config {
        args.extend(["--config", c]);
    }
    let (certs, endpoints) = (t.path("sc-certs"), t.path("endpoints"));
    args.extend([
        "--workload",
        "curl-external-tst/curl-test",
        "--cert-dir",
        &certs,
        "--endpoints",
        &endpoints,
        "--outbound-address",
        "127.0.0.1",
        "--outbound-port",
        "0",
        "--admin-address",
        "127.0.0.1",
        "--admin-port",
        "0",
        "--prometheus-port",
        "0",
        "--health-port",
        "0",
        "--ready-file",
        &ready,
    ]);
    args.extend(extra);
    let proc = Proc::spawn(&args);
    proc.wait_for("sidecar running", Duration::from_secs(20));
    let port = read_ready(&ready)["listeners"][0]["address"]
        .as_str()
        .map(|a| a.parse::<SocketAddr>().unwrap().port());
    (proc, port.expect("sidecar ready file"))
}

#[test]
fn explicit_proxy_and_connect_through_the_sidecar() {
    require_root!();
    let t = setup("gw-explicit");
    std::fs::write(
        t.path("api.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: curl-external-tst}\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: DNS\n",
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ca = StandinCa::new("stand-in CA").unwrap();
    std::fs::write(t.path("standin-ca.pem"), &ca.root_pem).unwrap();
    let ip = loopback_ip();
    let tls = ca
        .server_config(&[HOST.to_owned(), "api.example.com".to_owned()])
        .unwrap();
    let seen = Seen::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(SocketAddr::new(ip, 443)))
        .unwrap();
    rt.spawn(standin::serve_https(listener, tls, seen.clone()));
    let mut zone = DnsZone::default();
    zone.insert(HOST, ip);
    zone.insert("api.example.com", ip);
    let dns = rt
        .block_on(standin::serve_dns("127.0.0.1:0".parse().unwrap(), zone))
        .unwrap()
        .to_string();
    let (seed_dir, api) = (seed(), t.path("api.yaml"));
    let config = [seed_dir.as_str(), api.as_str()];
    let gw = start_gateway(
        &t,
        &config,
        &[
            "--dns-server",
            &dns,
            "--extra-roots",
            &t.path("standin-ca.pem"),
        ],
    );
    let (sidecar, port) = start_sidecar(&t, &config, &gw, &["--dns-server", &dns]);
    let proxy = format!("http://127.0.0.1:{port}");

    // Absolute-form HTTP through the sidecar, then mTLS to the gateway.
    let (body, code, _) = curl(&["-x", &proxy, &format!("http://{HOST}/todos/1")]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", standin::TODO_1),
        "{}",
        sidecar.log.lock().unwrap().join("\n")
    );
    // REGISTRY_ONLY answers 502 for unknown hosts, without resolving them.
    let (_, code, _) = curl(&["-x", &proxy, "http://unregistered.example.com/"]);
    assert_eq!(code, "502");
    // CONNECT to a registered TLS host: the tunnel goes out by SNI.
    let (body, code, _) = curl(&[
        "-x",
        &proxy,
        "--cacert",
        &t.path("standin-ca.pem"),
        "https://api.example.com/todos/1",
    ]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", standin::TODO_1),
        "{}",
        sidecar.log.lock().unwrap().join("\n")
    );
    assert!(
        seen.all()
            .iter()
            .any(|r| r.sni.as_deref() == Some("api.example.com"))
    );
    // CONNECT to an unregistered host is refused.
    let (_, code, exit) = curl(&["-x", &proxy, "https://unregistered.example.com/"]);
    assert_ne!(exit, 0, "no tunnel");
    assert!(code == "000" || code == "502", "{code}");
    drop(rt);
}

#[test]
fn gateway_routing_features_and_https_termination() {
    require_root!();
    let t = setup("gw-routing");
    // A server certificate for an HTTPS Gateway server (SIMPLE termination).
    let server_ca = StandinCa::new("gateway server CA").unwrap();
    let (cert_pem, key_pem) = server_ca
        .server_cert_pem(&["tools.example.com".to_owned()])
        .unwrap();
    std::fs::write(t.path("tools-cert.pem"), cert_pem).unwrap();
    std::fs::write(t.path("tools-key.pem"), key_pem).unwrap();
    std::fs::write(t.path("tools-ca.pem"), &server_ca.root_pem).unwrap();
    std::fs::write(
        t.path("tools.yaml"),
        format!(
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
",
            cert = t.path("tools-cert.pem"),
            key = t.path("tools-key.pem")
        ),
    )
    .unwrap();
    let w = world(&t, &[HOST]);
    let gw = w.gateway(&t, &[&seed(), &t.path("tools.yaml")], &["--port", "8443=0"]);
    let port = gw.http.port();
    let get = |path: &str, extra: &[&str]| {
        let mut args = vec![
            "--resolve".to_owned(),
            format!("tools.example.com:{port}:127.0.0.1"),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.push(format!("http://tools.example.com:{port}{path}"));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&refs)
    };
    let (_, code, _) = get("/old", &[]);
    assert_eq!(code, "302");
    let (body, code, _) = get("/teapot", &[]);
    assert_eq!((code.as_str(), body.as_str()), ("418", "short and stout"));
    let (body, code, _) = get("/fault", &[]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("503", "fault filter abort")
    );
    let (body, code, _) = get("/api/1", &[]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", standin::TODO_1),
        "rewrite /api → /todos"
    );
    assert_eq!(w.seen.all().last().unwrap().path, "/todos/1");
    let (_, code, _) = get("/nothing", &[]);
    assert_eq!(code, "404", "no rule matches: NR");

    // The HTTPS server terminates TLS with its own certificate.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("gw-ready.json")).unwrap()).unwrap();
    let https_port = json["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["port"] == 8443)
        .unwrap()["address"]
        .as_str()
        .unwrap()
        .parse::<SocketAddr>()
        .unwrap()
        .port();
    let (body, code, _) = curl(&[
        "--cacert",
        &t.path("tools-ca.pem"),
        "--resolve",
        &format!("tools.example.com:{https_port}:127.0.0.1"),
        &format!("https://tools.example.com:{https_port}/teapot"),
    ]);
    assert_eq!((code.as_str(), body.as_str()), ("418", "short and stout"));

    let text = scrape_until(
        &format!("http://{}/stats/prometheus", gw.prometheus),
        "istio_requests_total",
        &[("response_code", "404"), ("response_flags", "NR")],
        1.0,
    );
    assert_eq!(
        metric_value(
            &text,
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "FI")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "istio_requests_total",
            &[("response_code", "404"), ("response_flags", "NR")]
        ),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn bad_traffic_never_takes_the_gateway_down() {
    require_root!();
    use std::io::{Read, Write};
    let t = setup("gw-bad");
    let w = world(&t, &[HOST]);
    let gw = w.gateway(&t, &[&seed()], &[]);
    let junk: Vec<Vec<u8>> = vec![
        b"\x16\x03\x01\x00\x05hello".to_vec(),                       // a truncated TLS record
        b"\x16\x03\x01\xff\xff".iter().copied().chain(std::iter::repeat_n(0u8, 4096)).collect(), // garbage ClientHello
        b"GET / HTTP/1.1\r\nHost: \x00\x01\r\n\r\n".to_vec(),        // invalid header bytes
        b"NOT-HTTP at all\r\n\r\n".to_vec(),
        format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "x".repeat(200_000)).into_bytes(), // huge request line
        b"GET / HTTP/1.1\r\nHost: jsonplaceholder.typicode.com\r\nContent-Length: 999999\r\n\r\nshort".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x99".to_vec(), // h2c preface then a broken frame
    ];
    for bytes in &junk {
        if let Ok(mut s) = std::net::TcpStream::connect(gw.http) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(bytes);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }
    }
    // Connections that send nothing and go away.
    for _ in 0..20 {
        drop(std::net::TcpStream::connect(gw.http));
    }
    // Still serving, and still healthy.
    let (body, code, _) = mtls_get(&t, "curl", &gw, "/todos/1");
    assert_eq!((code.as_str(), body.as_str()), ("200", standin::TODO_1));
    assert_eq!(
        curl(&[&format!("http://{}/healthz/ready", gw.health)]).1,
        "200"
    );
}

/// Writes a config file the way a ConfigMap update does: a complete new
/// file renamed into place, so a poll never reads half of it.
fn write_config(dir: &str, name: &str, text: &str) {
    let tmp = format!("{dir}/.{name}.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, format!("{dir}/{name}")).unwrap();
}

#[test]
fn live_reload_applies_changes_without_dropping_requests() {
    require_root!();
    let t = setup("gw-reload");
    let w = world(&t, &[HOST]);
    let dir = t.path("config");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(seed()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            std::fs::copy(
                &p,
                format!("{dir}/{}", p.file_name().unwrap().to_string_lossy()),
            )
            .unwrap();
        }
    }
    let gw = w.gateway(
        &t,
        &[&dir],
        &["--reload-interval", "50ms", "--port", "8081=0"],
    );
    let get = |who: &str, port: u16| {
        curl(&[
            "-k",
            "--cert",
            &t.path(&format!("{who}/cert-chain.pem")),
            "--key",
            &t.path(&format!("{who}/key.pem")),
            "--resolve",
            &format!("{HOST}:{port}:127.0.0.1"),
            &format!("https://{HOST}:{port}/todos/1"),
        ])
    };
    let port = gw.http.port();

    // Traffic runs through every reload below until it is stopped.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (codes, alt) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let mut codes = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && codes.len() < 10_000 {
                let (body, code, _) = get("curl", port);
                codes.push(if code == "200" {
                    code
                } else {
                    format!("{code} {body}")
                });
            }
            codes
        });

        // 1. A new Gateway server port: bound, announced, served.
        let gateway_yaml = std::fs::read_to_string(format!("{dir}/gateway.yaml")).unwrap();
        let two_ports = format!(
            "{gateway_yaml}  - port:\n      number: 8081\n      name: http-alt\n      protocol: HTTP\n    hosts:\n    - \"{HOST}\"\n"
        );
        write_config(&dir, "gateway.yaml", &two_ports);
        gw.proc.wait_for("config reloaded", Duration::from_secs(10));
        let ready: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(t.path("gw-ready.json")).unwrap())
                .unwrap();
        let alt: SocketAddr = ready["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["port"] == 8081)
            .unwrap_or_else(|| panic!("port 8081 in {ready}"))["address"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(get("curl", alt.port()).1, "200");

        // 2. A bad file is refused with its name, line and field; the
        //    running config stays.
        write_config(
            &dir,
            "zz-broken.yaml",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: bad\n  namespace: curl-egress-tst\nspec:\n  hosts: [example.org]\n  resolutoin: DNS\n",
        );
        let failed = gw
            .proc
            .wait_for("config reload failed", Duration::from_secs(10));
        assert!(failed.contains("zz-broken.yaml:8"), "{failed}");
        assert!(failed.contains("resolutoin"), "{failed}");
        assert_eq!(get("curl", alt.port()).1, "200", "still the old config");

        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (load.join().unwrap(), alt)
    });
    assert!(!codes.is_empty());
    assert!(
        codes.iter().all(|c| c == "200"),
        "every request during the reloads succeeded: {codes:?}\n{}",
        gw.proc.log.lock().unwrap().join("\n")
    );

    // 3. The policy now allows another namespace, and port 8081 is gone.
    //    Both edits land while the broken file is still there (refused),
    //    then its removal applies them together.
    let policy = std::fs::read_to_string(format!("{dir}/authorization-policy.yaml")).unwrap();
    write_config(
        &dir,
        "authorization-policy.yaml",
        &policy.replace("- curl-external-tst", "- other"),
    );
    write_config(
        &dir,
        "gateway.yaml",
        &std::fs::read_to_string(format!("{}/gateway.yaml", seed())).unwrap(),
    );
    std::fs::remove_file(format!("{dir}/zz-broken.yaml")).unwrap();
    gw.proc.wait_for("config reloaded", Duration::from_secs(10));
    let (body, code, _) = get("curl", port);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("403", "RBAC: access denied")
    );
    assert_eq!(get("other", port).1, "200");
    let ready = std::fs::read_to_string(t.path("gw-ready.json")).unwrap();
    assert!(!ready.contains("8081"), "{ready}");
    assert_eq!(get("other", alt.port()).2, 7, "8081 no longer listens");
}

#[test]
fn sigterm_drains_requests_in_flight() {
    require_root!();
    let t = setup("gw-drain");
    let w = world(&t, &[HOST]);
    let mut gw = w.gateway(&t, &[&seed()], &["--drain-duration", "20s"]);
    let held = std::thread::scope(|s| {
        // A request the stand-in holds: in flight when SIGTERM comes.
        let (cert, key) = (t.path("curl/cert-chain.pem"), t.path("curl/key.pem"));
        let port = gw.http.port();
        let held = s.spawn(move || {
            curl(&[
                "-k",
                "--cert",
                &cert,
                "--key",
                &key,
                "--resolve",
                &format!("{HOST}:{port}:127.0.0.1"),
                &format!("https://{HOST}:{port}/hold"),
            ])
        });
        let mut arrived = false;
        for _ in 0..1000 {
            if w.seen.all().iter().any(|r| r.path == "/hold") {
                arrived = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(arrived, "the held request reached the stand-in");

        let pid = gw.proc.child.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        gw.proc.wait_for("draining", Duration::from_secs(10));
        // Draining: not ready for new traffic, and not accepting it.
        let (_, code, _) = curl(&[&format!("http://{}/healthz/ready", gw.health)]);
        assert_eq!(code, "503", "readiness fails while draining");
        let (_, _, exit) = plain_get(&gw, "/todos/1");
        assert_eq!(exit, 7, "new connections are refused");

        w.seen.release_held(1);
        held.join().unwrap()
    });
    assert_eq!(
        (held.1.as_str(), held.0.as_str()),
        ("200", standin::TODO_1),
        "the request in flight finished"
    );
    let last = gw.proc.wait_for("shutting down", Duration::from_secs(10));
    assert!(last.contains("connections_cut=0"), "{last}");
    let status = gw.proc.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// A WebSocket-style upgrade from the workload goes through the whole chain
/// (sidecar, mTLS to the gateway, TLS origination) and becomes a byte
/// tunnel once the external host answers 101.
#[test]
fn upgrades_tunnel_through_sidecar_and_gateway() {
    use std::io::{Read, Write};
    require_root!();
    let t = setup("gw-upgrade");
    let w = world(&t, &[HOST]);
    let gw = w.gateway(&t, &[&seed()], &[]);
    let (_sidecar, port) = start_sidecar(&t, &[&seed()], &gw, &[]);

    // The workload, with the sidecar as its explicit HTTP proxy.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET http://{HOST}/upgrade HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "head so far: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");

    // Bytes both ways, several times, on the same tunnel.
    for msg in ["ping", "a longer message through three hops"] {
        s.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    assert!(
        w.seen
            .all()
            .iter()
            .any(|r| r.path == "/upgrade" && r.sni.as_deref() == Some(HOST)),
        "the stand-in answered the upgrade over TLS with SNI"
    );
}

/// Istio does not upgrade HTTP/1.1 to h2 between mesh peers unless a
/// DestinationRule says `h2UpgradePolicy: UPGRADE`; then the sidecar speaks
/// h2 (ALPN inside mutual TLS) to the gateway.
#[test]
fn h2_upgrade_policy_makes_the_sidecar_speak_h2_to_the_gateway() {
    require_root!();
    let t = setup("gw-h2up");
    let w = world(&t, &[HOST]);
    let dr = t.path("h2.yaml");
    std::fs::write(
        &dr,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: gateway-h2, namespace: curl-external-tst}\nspec:\n  host: curl-egress-tst.curl-egress-tst.svc.cluster.local\n  trafficPolicy:\n    connectionPool:\n      http: {h2UpgradePolicy: UPGRADE}\n",
    )
    .unwrap();
    let gw = w.gateway(&t, &[&seed()], &[]);
    let (_sidecar, port) = start_sidecar(&t, &[&seed(), &dr], &gw, &[]);
    for _ in 0..2 {
        let (body, code, _) = curl(&[
            "-x",
            &format!("http://127.0.0.1:{port}"),
            &format!("http://{HOST}/todos/1"),
        ]);
        assert_eq!((code.as_str(), body.as_str()), ("200", standin::TODO_1));
    }
    let line = gw
        .proc
        .wait_for("\"GET /todos/1 HTTP/2\" 200", Duration::from_secs(10));
    assert!(line.ends_with(CURL_ID), "{line}");
}

/// The --endpoints file is watched like the config: pointing a Service at
/// its gateway's address takes effect without a restart.
#[test]
fn live_reload_follows_the_endpoints_file() {
    require_root!();
    let t = setup("gw-reload-ep");
    let w = world(&t, &[HOST]);
    let gw = w.gateway(&t, &[&seed()], &[]);
    let (sidecar, port) = start_sidecar(&t, &[&seed()], &gw, &["--reload-interval", "50ms"]);
    let get = || {
        curl(&[
            "-x",
            &format!("http://127.0.0.1:{port}"),
            &format!("http://{HOST}/todos/1"),
        ])
    };
    assert_eq!(get().1, "200");

    // The gateway's Service now points at a port nothing listens on
    // (bound and closed here, so it is free and refuses).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let endpoints = t.path("endpoints");
    std::fs::write(
        format!("{endpoints}.tmp"),
        format!("curl-egress-tst.curl-egress-tst.svc.cluster.local:80 {closed}\n"),
    )
    .unwrap();
    std::fs::rename(format!("{endpoints}.tmp"), &endpoints).unwrap();
    sidecar.wait_for("config reloaded", Duration::from_secs(10));
    let (body, code, _) = get();
    assert_eq!(code, "503", "{body}");

    // And back.
    std::fs::write(
        format!("{endpoints}.tmp"),
        format!(
            "curl-egress-tst.curl-egress-tst.svc.cluster.local:80 {}\n",
            gw.http
        ),
    )
    .unwrap();
    std::fs::rename(format!("{endpoints}.tmp"), &endpoints).unwrap();
    sidecar.wait_for("config reloaded", Duration::from_secs(10));
    assert_eq!(get().1, "200");
}

/// As Istio configures Envoy: the gateway (use_remote_address) appends its
/// downstream's address to x-forwarded-for; the sidecar passes it through.
#[test]
fn x_forwarded_for_is_appended_by_the_gateway_only() {
    require_root!();
    let t = setup("gw-xff");
    let w = world(&t, &[HOST]);
    let gw = w.gateway(&t, &[&seed()], &[]);
    let (_sidecar, port) = start_sidecar(&t, &[&seed()], &gw, &[]);
    let proxy = format!("http://127.0.0.1:{port}");
    let url = format!("http://{HOST}/todos/1");
    assert_eq!(curl(&["-x", &proxy, &url]).1, "200");
    assert_eq!(
        curl(&["-x", &proxy, "-H", "X-Forwarded-For: 203.0.113.7", &url]).1,
        "200"
    );
    let seen: Vec<Option<String>> = w.seen.all().into_iter().map(|r| r.forwarded_for).collect();
    assert_eq!(
        seen,
        [
            Some("127.0.0.1".to_owned()),
            Some("203.0.113.7,127.0.0.1".to_owned())
        ],
        "one address added, by the gateway (the sidecar's)"
    );
}
