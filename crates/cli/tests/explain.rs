//! `meshgate explain` and the running proxies agree: the same requests and
//! connections (HTTP, TLS, TCP, a silent client of a server-first
//! protocol; REGISTRY_ONLY and ALLOW_ANY; a missing cluster; denied
//! callers) are sent to in-process proxies and explained
//! from the same YAML files, and the status, response flags, route and
//! cluster must match what the proxy logged. Runs as any user.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use meshgate_proxy::testing::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OTHER_ID: &str = "spiffe://cluster.local/ns/other/sa/default";

/// Where an application thought it was going when nothing listens there
/// (TEST-NET-3; the sidecar routes by Host or SNI, or closes).
fn elsewhere(port: u16) -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 10], port))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Sidecar,
    Gateway,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    RegistryOnly,
    AllowAny,
}

struct Case {
    who: Who,
    policy: Policy,
    /// What the client sends: http://, https:// or tcp://.
    url: String,
    /// Sidecars: where the connection was going (its port is the URL's).
    original: SocketAddr,
    /// Gateways: the caller's identity over mutual TLS.
    from: Option<&'static str>,
    /// A tcp:// client that waits for the server to speak (`--silent`).
    silent: bool,
}

/// One mesh (both proxies) per outbound policy, and the files explain reads.
struct Mesh {
    chain: SeedChain,
    files: String,
}

async fn mesh(policy: Policy, extra: &[&str], dir: &TempDir, api: &External) -> Mesh {
    let skip: &[&str] = match policy {
        Policy::RegistryOnly => &[],
        // No Sidecar resource: the mesh default, ALLOW_ANY.
        Policy::AllowAny => &["sidecar.yaml"],
    };
    let files = seed_files(dir, &format!("{policy:?}"), skip, extra);
    let config = seed_config_except(skip, extra);
    let chain = SeedChain::with_endpoints(config, &[("api.example.com:443", api.addr)]).await;
    Mesh { chain, files }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_says_what_the_proxies_do() {
    let dir = TempDir::new("explain-table");
    let known = plain_http().await;
    let registered_tcp = plain_http().await;
    let unregistered_tcp = plain_http().await;
    let greeter = server_first().await;
    let tls_elsewhere = External::start(&["unregistered.example.com"]).await;
    let extra = [
        // A registered TLS host (routed by SNI).
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: curl-external-tst}\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: DNS\n".to_owned(),
        // An HTTP port with a service on it, and a registered TCP port.
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: known, namespace: curl-external-tst}}\nspec:\n  hosts: [known.example.com]\n  ports: [{{number: {}, name: http, protocol: HTTP}}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: plain-tcp, namespace: curl-external-tst}}\nspec:\n  hosts: [plain.example.com]\n  ports: [{{number: {}, name: tcp, protocol: TCP}}]\n  resolution: NONE\n",
            known.port(),
            registered_tcp.port()
        ),
        // A server-first protocol on a registered TCP port.
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: greeter, namespace: curl-external-tst}}\nspec:\n  hosts: [greeter.example.com]\n  ports: [{{number: {}, name: tcp-smtp, protocol: TCP}}]\n  resolution: NONE\n",
            greeter.port()
        ),
        // A route to a host the registry does not have (503 NC).
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: nc, namespace: curl-external-tst}\nspec:\n  hosts: [nc.example.com]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: nc, namespace: curl-external-tst}\nspec:\n  hosts: [nc.example.com]\n  http: [{route: [{destination: {host: missing.example.com}}]}]\n".to_owned(),
    ];
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let api = External::start(&["api.example.com"]).await;
    let mut registry_only = mesh(Policy::RegistryOnly, &extra, &dir, &api).await;
    let mut allow_any = mesh(Policy::AllowAny, &extra, &dir, &api).await;

    let sidecar = |policy, url: String, original| Case {
        who: Who::Sidecar,
        policy,
        url,
        original,
        from: None,
        silent: false,
    };
    let gateway = |url: &str, from| Case {
        who: Who::Gateway,
        policy: Policy::RegistryOnly,
        url: url.to_owned(),
        original: elsewhere(80),
        from,
        silent: false,
    };
    use Policy::*;
    let cases = [
        // HTTP at the sidecar.
        sidecar(
            RegistryOnly,
            format!("http://{HOST}/todos/1"),
            elsewhere(80),
        ),
        sidecar(
            RegistryOnly,
            "http://unregistered.example.com/".into(),
            elsewhere(80),
        ),
        sidecar(RegistryOnly, "http://nc.example.com/".into(), elsewhere(80)),
        sidecar(
            AllowAny,
            format!("http://unknown.example.com:{}/todos/1", known.port()),
            known,
        ),
        // TLS at the sidecar.
        sidecar(
            RegistryOnly,
            "https://api.example.com/todos/1".into(),
            elsewhere(443),
        ),
        sidecar(
            RegistryOnly,
            "https://unregistered.example.com/".into(),
            elsewhere(443),
        ),
        sidecar(
            AllowAny,
            format!(
                "https://unregistered.example.com:{}/todos/1",
                tls_elsewhere.addr.port()
            ),
            tls_elsewhere.addr,
        ),
        // Opaque TCP at the sidecar.
        sidecar(
            RegistryOnly,
            "tcp://anything.example.com:9999".into(),
            elsewhere(9999),
        ),
        sidecar(
            RegistryOnly,
            format!("tcp://plain.example.com:{}", registered_tcp.port()),
            registered_tcp,
        ),
        sidecar(
            AllowAny,
            format!("tcp://anything.example.com:{}", unregistered_tcp.port()),
            unregistered_tcp,
        ),
        Case {
            silent: true,
            ..sidecar(
                RegistryOnly,
                format!("tcp://greeter.example.com:{}", greeter.port()),
                greeter,
            )
        },
        // The gateway: allowed, denied, plaintext, no route.
        gateway(&format!("http://{HOST}/todos/1"), Some(CURL_ID)),
        gateway(&format!("http://{HOST}/todos/1"), Some(OTHER_ID)),
        gateway(&format!("http://{HOST}/todos/1"), None),
        gateway("http://unrouted.example.com/", Some(CURL_ID)),
    ];
    let mut checked = 0;
    for case in &cases {
        let mesh = match case.policy {
            RegistryOnly => &mut registry_only,
            AllowAny => &mut allow_any,
        };
        let explained = explain(&mesh.files, case).await;
        let logged = observe(mesh, case, &api, &dir).await;
        compare(case, &explained, &logged);
        checked += 1;
    }
    assert_eq!(checked, cases.len());
}

/// `meshgate explain -o json` for the case.
async fn explain(files: &str, case: &Case) -> Value {
    let workload = match case.who {
        Who::Sidecar => WORKLOAD,
        Who::Gateway => GATEWAY,
    };
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshgate"));
    cmd.args(["explain", "-c", files, "-w", workload, "-o", "json"]);
    if let Some(from) = case.from {
        cmd.args(["--from", from]);
    }
    if case.silent {
        cmd.arg("--silent");
    }
    let o = cmd.arg(&case.url).output().await.unwrap();
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("{}: {}", case.url, String::from_utf8_lossy(&o.stderr)));
    // 0 when the proxy sends it on, 80-83 when it answers itself.
    let refused = matches!(
        v["result"]["action"].as_str(),
        Some("local-reply" | "close" | "refused")
    );
    let code = o.status.code().unwrap();
    assert!(
        if refused {
            (80..=83).contains(&code)
        } else {
            code == 0
        },
        "{}: {code} {v:#}",
        case.url
    );
    v
}

/// Sends the case's traffic to the running proxy; its access-log entry.
async fn observe(mesh: &mut Mesh, case: &Case, api: &External, dir: &TempDir) -> Value {
    let chain = &mut mesh.chain;
    let uri: http::Uri = case.url.parse().unwrap();
    let host = uri.host().unwrap();
    let path = uri.path();
    if case.who == Who::Gateway {
        // Sidecar cases left entries in the gateway's log too: find ours.
        let id = format!("case-{:08x}", next_id());
        let port = chain.gateway.addr(80).port();
        let resolve = format!("{host}:{port}:127.0.0.1");
        let header = format!("x-request-id: {id}");
        let _ = match case.from {
            Some(from) => {
                let client = chain.mesh.client(from, dir);
                client.get(host, port, path, &["-H", &header]).await
            }
            None => {
                let url = format!("http://{host}:{port}{path}");
                curl(&["--resolve", &resolve, "-H", &header, &url]).await
            }
        };
        return chain.gateway.log_of(&id).await;
    }
    let captured = chain.sidecar.capture(case.original).await;
    match uri.scheme_str() {
        Some("http") => {
            let _ = curl(&[
                "-H",
                &format!("Host: {}", uri.authority().unwrap()),
                &format!("http://{captured}{path}"),
            ])
            .await;
        }
        Some("https") => {
            let ca = dir.write("api-ca.pem", &api.ca.root_pem);
            let port = uri.port_u16().unwrap_or(443);
            let _ = curl(&[
                "-k",
                "--cacert",
                &ca,
                "--connect-to",
                &format!("{host}:{port}:{}:{}", captured.ip(), captured.port()),
                &format!("https://{host}:{port}{path}"),
            ])
            .await;
        }
        _ if case.silent => {
            // Sends nothing: done once the server's greeting comes through.
            let mut s = tokio::net::TcpStream::connect(captured).await.unwrap();
            let mut greeting = [0u8; GREETING.len()];
            let read = s.read_exact(&mut greeting);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), read).await;
        }
        _ => {
            let mut s = tokio::net::TcpStream::connect(captured).await.unwrap();
            let _ = s.write_all(b"GET /todos/1 HTTP/1.0\r\n\r\n").await;
            let mut back = Vec::new();
            let read = s.read_to_end(&mut back);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), read).await;
        }
    }
    chain.sidecar.next_log().await
}

const GREETING: &[u8] = b"220 greeter.example.com ready\r\n";

/// A server that speaks first (as SMTP does), then waits for the client
/// to close.
async fn server_first() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(GREETING).await;
                let _ = s.read(&mut [0u8; 64]).await;
            });
        }
    });
    addr
}

/// A distinct number per call.
fn next_id() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What explain says against what the proxy logged.
fn compare(case: &Case, explained: &Value, logged: &Value) {
    let r = &explained["result"];
    let what = format!("{}: explain {r}\nproxy {logged}", case.url);
    assert_eq!(r["route"], logged["route_name"], "route of {what}");
    assert_eq!(
        r["cluster"], logged["upstream_cluster"],
        "cluster of {what}"
    );
    match r["action"].as_str().unwrap() {
        "forward" | "original-destination" => {
            assert_eq!(logged["response_flags"], "-", "{what}");
            if logged["method"].is_string() {
                assert_eq!(logged["response_code_details"], "via_upstream", "{what}");
            } else {
                assert!(logged["upstream_host"].is_string(), "connected: {what}");
            }
        }
        "local-reply" => {
            assert_eq!(r["status"], logged["response_code"], "status of {what}");
            assert_eq!(
                r["responseFlags"], logged["response_flags"],
                "flags of {what}"
            );
        }
        "close" => {
            assert_eq!(
                r["responseFlags"], logged["response_flags"],
                "flags of {what}"
            );
            assert!(logged["upstream_host"].is_null(), "not connected: {what}");
        }
        other => panic!("unexpected action {other}: {what}"),
    }
}

/// `explain --inbound` and a sidecar on the way in to its workload agree:
/// a caller the workload's AuthorizationPolicy admits, the same caller on
/// a path it does not, another caller, plaintext without an identity
/// (PERMISSIVE), and opaque TCP to a port no Service names (where the
/// policy's HTTP-only rule admits nothing); with STRICT, plaintext is
/// refused by both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_inbound_says_what_the_sidecar_does_on_the_way_in() {
    const FRIEND: &str = "spiffe://cluster.local/ns/friends/sa/default";
    let mesh = meshgate_proxy::testing::Mesh::default();
    let dir = TempDir::new("explain-inbound");
    let app = plain_http().await;
    let tcp_app = plain_http().await;
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: curl-test, namespace: curl-external-tst}}\nspec:\n  selector: {{app: curl-test}}\n  ports: [{{name: http, port: 80, targetPort: {}}}]\n",
        app.port()
    );
    let read_public = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: friends-read-public, namespace: curl-external-tst}\nspec:\n  selector: {matchLabels: {app: curl-test}}\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/friends/sa/default]}}]\n    to: [{operation: {methods: [GET], paths: [/public/*]}}]\n";
    let extra = [service.as_str(), read_public];
    let files = seed_files(&dir, "inbound", &[], &extra);
    let mut sc = TestProxy::start(&mesh, Spec::new(seed_config(&extra), WORKLOAD)).await;
    let http_in = sc.capture_inbound(app).await;
    let tcp_in = sc.capture_inbound(tcp_app).await;
    let url = |path: &str| format!("http://curl-test:{}{path}", app.port());
    let cases: [(String, Option<&str>, &str); 5] = [
        (url("/public/a"), Some(FRIEND), "forward"),
        (url("/private"), Some(FRIEND), "local-reply"),
        (url("/public/a"), Some(OTHER_ID), "local-reply"),
        (url("/public/a"), None, "local-reply"),
        (
            format!("tcp://curl-test:{}", tcp_app.port()),
            Some(FRIEND),
            "close",
        ),
    ];
    for (url, from, action) in &cases {
        let (explained, code) = explain_inbound(&files, url, *from).await;
        assert_eq!(
            explained["result"]["action"], *action,
            "{url} {explained:#}"
        );
        let denied = *action != "forward";
        assert_eq!(code, if denied { 80 } else { 0 }, "{url} {explained:#}");
        let uri: http::Uri = url.parse().unwrap();
        let to = if uri.scheme_str() == Some("tcp") {
            tcp_in
        } else {
            http_in
        };
        match (uri.scheme_str(), from) {
            (Some("tcp"), Some(from)) => {
                let _ = mesh
                    .client(from, &dir)
                    .get("curl-test", to.port(), "/", &[])
                    .await;
            }
            (_, Some(from)) => {
                let _ = mesh
                    .client(from, &dir)
                    .get("curl-test", to.port(), uri.path(), &[])
                    .await;
            }
            (_, None) => {
                let _ = curl(&[&format!("http://{to}{}", uri.path())]).await;
            }
        }
        let logged = sc.next_log().await;
        let case = Case {
            who: Who::Sidecar,
            policy: Policy::RegistryOnly,
            url: url.clone(),
            original: to,
            from: *from,
            silent: false,
        };
        compare(&case, &explained, &logged);
    }
    // A denial names the rule and the field that keeps it out.
    let (denied, _) = explain_inbound(&files, &url("/private"), Some(FRIEND)).await;
    let why = denied["authorization"].as_str().unwrap();
    assert!(
        why.contains("curl-external-tst/friends-read-public") && why.contains("path"),
        "{why}"
    );

    let strict = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: curl-external-tst}\nspec:\n  mtls: {mode: STRICT}\n";
    let extra = [service.as_str(), strict];
    let files = seed_files(&dir, "inbound-strict", &[], &extra);
    let mut sc = TestProxy::start(&mesh, Spec::new(seed_config(&extra), WORKLOAD)).await;
    let http_in = sc.capture_inbound(app).await;
    let (explained, _) = explain_inbound(&files, &url("/public/a"), None).await;
    assert_eq!(explained["result"]["action"], "refused", "{explained:#}");
    assert!(
        explained["listener"]
            .as_str()
            .unwrap()
            .contains("mTLS STRICT (PeerAuthentication curl-external-tst/strict)"),
        "{explained:#}"
    );
    let plain = curl(&[&format!("http://{http_in}/public/a")]).await;
    assert_ne!(plain.exit, 0, "plaintext refused: {plain:?}");
    let (explained, _) = explain_inbound(&files, &url("/public/a"), Some(OTHER_ID)).await;
    assert_eq!(explained["result"]["action"], "forward", "{explained:#}");
    let got = mesh
        .client(OTHER_ID, &dir)
        .get("curl-test", http_in.port(), "/public/a", &[])
        .await;
    assert_eq!(got.code, "200", "{got:?}");
}

/// `meshgate explain --inbound -o json` to the seed's sidecar workload.
/// Its exit code: 0 sent on, 80 denied (the README's exit codes).
async fn explain_inbound(files: &str, url: &str, from: Option<&str>) -> (Value, i32) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshgate"));
    cmd.args([
        "explain",
        "--inbound",
        "-c",
        files,
        "-w",
        WORKLOAD,
        "-o",
        "json",
    ]);
    if let Some(from) = from {
        cmd.args(["--from", from]);
    }
    let o = cmd.arg(url).output().await.unwrap();
    let v = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("{url}: {}", String::from_utf8_lossy(&o.stderr)));
    (v, o.status.code().unwrap())
}
