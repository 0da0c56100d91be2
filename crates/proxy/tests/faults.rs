//! The proxies when the world around them fails: an upstream that dies
//! mid-response, a DNS server that stops answering, a CA that cannot be
//! reached when the certificate is due. (A stalled upstream: the route
//! timeout and stream idle tests in gateway.rs and hardening.rs; a gateway
//! restart under a sidecar's pooled connections: crates/cli/tests/gateway.rs,
//! which needs processes to kill.)
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use meshgate_identity::caserver::{self, TokenTable};
use meshgate_identity::{CertificateAuthority, Source, WorkloadIdentity};
use meshgate_proxy::admin::{self, AdminRole, Readiness};
use meshgate_proxy::listener::Timeouts;
use meshgate_proxy::standin::{self, DnsServer, DnsZone};
use meshgate_proxy::testing::*;
use meshgate_telemetry::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A ServiceEntry for `host` on `port` (plain HTTP, resolved by DNS) whose
/// connections carry one request each, so that every request needs an
/// address, and whose connect timeout (which bounds the lookup) is 1 s.
fn registered(host: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc, namespace: curl-external-tst}}
spec:
  hosts: [{host}]
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc, namespace: curl-external-tst}}
spec:
  host: {host}
  trafficPolicy:
    connectionPool:
      tcp: {{connectTimeout: 1s}}
      http: {{maxRequestsPerConnection: 1}}
"
    )
}

/// A sidecar with ALLOW_ANY (no Sidecar resource) and `extra` config,
/// resolving with `dns`.
async fn sidecar(mesh: &Mesh, extra: &[&str], dns: SocketAddr) -> TestProxy {
    sidecar_with(mesh, extra, dns, Timeouts::default()).await
}

async fn sidecar_with(
    mesh: &Mesh,
    extra: &[&str],
    dns: SocketAddr,
    timeouts: Timeouts,
) -> TestProxy {
    let config = seed_config_except(&["sidecar.yaml"], extra);
    let mut spec = Spec::new(config, WORKLOAD).dns(dns);
    spec.timeouts = timeouts;
    TestProxy::start(mesh, spec).await
}

/// Given what a connection has sent so far: the bytes of a whole request
/// in it, and the answer to write.
type Answer = fn(&[u8]) -> Option<(usize, &'static [u8])>;

/// An HTTP server that reads what it gets and, when `answer` finds a
/// whole request in it, writes the answer and forgets that many bytes (an
/// empty answer: hangs up without a word).
async fn raw_server(answer: Answer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut chunk = [0u8; 1024];
                while let Ok(n) = s.read(&mut chunk).await {
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&chunk[..n]);
                    if let Some((used, bytes)) = answer(&got) {
                        if bytes.is_empty() {
                            return;
                        }
                        let _ = s.write_all(bytes).await;
                        got.drain(..used);
                    }
                }
            });
        }
    });
    addr
}

/// The end of a request's head in `got`, if it has come.
fn head_end(got: &[u8]) -> Option<usize> {
    got.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// An HTTP server that, for `GET /stall`, answers the head and 4 of 100
/// bytes, then nothing more; it never answers anything else.
async fn stalls() -> SocketAddr {
    raw_server(|got| {
        let end = head_end(got).filter(|_| got.starts_with(b"GET /stall "))?;
        Some((end, b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf"))
    })
    .await
}

/// The end of a whole request in `got`, its body (by Content-Length)
/// included, if it has come.
fn whole_request(got: &[u8]) -> Option<usize> {
    let end = head_end(got)?;
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (got.len() >= end + length).then_some(end + length)
}

/// An HTTP server that answers `200 ok` once it has read a request's
/// whole body (its Content-Length), and not before.
async fn answers_after_the_body() -> SocketAddr {
    raw_server(|got| {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".as_slice();
        Some((whole_request(got)?, ok))
    })
    .await
}

/// An HTTP server that reads a whole request, body and all, and hangs up
/// without a word.
async fn hangs_up_after_the_body() -> SocketAddr {
    raw_server(|got| Some((whole_request(got)?, b""))).await
}

/// An HTTP server that promises 100 bytes, sends 4 and hangs up.
async fn dies_mid_response() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut chunk = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf")
                .await;
        }
    });
    addr
}

/// The status is already sent: the client sees a cut response, the access
/// log says 200 with UC, as Envoy reports a reset after the response
/// started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_dies_mid_response_is_reported_uc() {
    let mesh = Mesh::default();
    let upstream = dies_mid_response().await;
    let dns = dns_for("cut.example.com", 30).await;
    let reg = registered("cut.example.com", upstream.port());
    let sc = sidecar(&mesh, &[&reg], dns.addr).await;

    let proxy = format!("http://{}", sc.addr(15001));
    let url = format!("http://cut.example.com:{}/todos/1", upstream.port());
    let got = curl(&["-x", &proxy, &url]).await;
    assert_eq!(got.code, "200", "{got:?}");
    assert_eq!(got.exit, 18, "curl saw a partial body: {got:?}");
    let entry = sc.next_log().await;
    assert_eq!(entry["response_code"], 200);
    assert_eq!(entry["response_flags"], "UC");
    assert_eq!(
        entry["response_code_details"],
        "upstream_reset_after_response_started{connection_termination}"
    );
    // The proxy is fine: the next request gets its answer too.
    let again = curl(&["-x", &proxy, &url]).await;
    assert_eq!(again.code, "200");
}

/// A VirtualService sending `host` to itself on `port` within `timeout`.
fn timed_route(host: &str, port: u16, timeout: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: timed, namespace: curl-external-tst}}
spec:
  hosts: [{host}]
  http: [{{timeout: {timeout}, route: [{{destination: {{host: {host}, port: {{number: {port}}}}}}}]}}]
"
    )
}

/// A sidecar (default timeouts) sending `host` to `upstream` under a
/// route `timeout`, and the DNS server that answers `host`.
async fn timed_sidecar(
    mesh: &Mesh,
    host: &str,
    upstream: SocketAddr,
    timeout: &str,
) -> (TestProxy, DnsServer) {
    let dns = dns_for(host, 30).await;
    let reg = registered(host, upstream.port());
    let route = timed_route(host, upstream.port(), timeout);
    (sidecar(mesh, &[&reg, &route], dns.addr).await, dns)
}

/// A POST to `authority` through the sidecar's explicit proxy that
/// promises `length` bytes of body and sends the first 10.
async fn upload(sc: &TestProxy, authority: &str, length: usize) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(sc.addr(15001))
        .await
        .unwrap();
    let head = format!(
        "POST http://{authority}/upload HTTP/1.1\r\nhost: {authority}\r\ncontent-length: {length}\r\n\r\n0123456789"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// The first bytes the proxy answers on `s`, within 10 s.
async fn first_answer(s: &mut tokio::net::TcpStream) -> String {
    let mut back = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut back))
        .await
        .expect("an answer within the bound")
        .unwrap();
    String::from_utf8_lossy(&back[..n]).into_owned()
}

/// A DNS server answering `name` with 127.0.0.1 for `ttl` seconds, until
/// dropped.
async fn dns_for(name: &str, ttl: u32) -> DnsServer {
    let mut zone = DnsZone::default().with_ttl(ttl);
    zone.insert(name, "127.0.0.1".parse().unwrap());
    DnsServer::start("127.0.0.1:0".parse().unwrap(), zone)
        .await
        .unwrap()
}

/// A sidecar resolving `host` (registered on `port`) with `dns`, and how
/// a client asks it for the host: (proxy, url).
async fn resolving(
    mesh: &Mesh,
    host: &str,
    port: u16,
    dns: &DnsServer,
) -> (TestProxy, [String; 2]) {
    let reg = registered(host, port);
    let sc = sidecar(mesh, &[&reg], dns.addr).await;
    let proxy = format!("http://{}", sc.addr(15001));
    (sc, [proxy, format!("http://{host}:{port}/todos/1")])
}

async fn get([proxy, url]: &[String; 2]) -> Curl {
    curl(&["-x", proxy, url]).await
}

/// DNS stops answering: the addresses it last gave stay in use past their
/// TTL (Envoy keeps a STRICT_DNS cluster's hosts when resolution fails),
/// and no request waits for the failing lookups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_that_stops_answering_leaves_the_last_addresses_in_use() {
    let mesh = Mesh::default();
    let plain = plain_http().await;
    let dns = dns_for("known.example.com", 1).await;
    let (_sc, client) = resolving(&mesh, "known.example.com", plain.port(), &dns).await;
    assert_eq!(get(&client).await.answer(), ("200", standin::TODO_1));

    drop(dns);
    // Three times the TTL: requests after it need a lookup that gets no
    // answer (before, they waited for the resolver's timeouts, then got
    // 503 UH).
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut after_ttl = 0;
    while tokio::time::Instant::now() < until {
        assert_eq!(get(&client).await.answer(), ("200", standin::TODO_1));
        after_ttl += 1;
    }
    assert!(after_ttl > 1, "{after_ttl} requests");
}

/// DNS answering that the name has no address (NXDOMAIN) is an answer:
/// the kept addresses go, and requests get 503 UH; the sidecar keeps
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_saying_a_name_has_no_address_drops_its_addresses() {
    let mesh = Mesh::default();
    let plain = plain_http().await;
    let dns = dns_for("gone.example.com", 1).await;
    let (sc, client) = resolving(&mesh, "gone.example.com", plain.port(), &dns).await;
    assert_eq!(get(&client).await.answer(), ("200", standin::TODO_1));

    dns.set_zone(DnsZone::default().with_ttl(1));
    // Bounded: the answer's TTL is 1 s, and the lookup that finds the name
    // gone runs with the next request after it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let failed = loop {
        let got = get(&client).await;
        if got.code != "200" {
            break got;
        }
        assert!(tokio::time::Instant::now() < deadline, "still resolved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(failed.answer(), ("503", "no healthy upstream"));
    let entry = sc.log_of_status(503).await;
    assert_eq!(entry["response_flags"], "UH");
    assert_eq!(entry["response_code_details"], "no_healthy_upstream");
}

/// `NAME.example.com` on `port`, plain HTTP, resolved by DNS.
fn by_dns(name: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: curl-external-tst}}
spec:
  hosts: [{name}.example.com]
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  resolution: DNS
"
    )
}

/// A DNS cluster follows DNS while its connections are kept: once the
/// name's TTL has passed and DNS gives a new address, requests go there
/// (Envoy resolves a STRICT_DNS cluster again in the background and picks
/// a host per request), though the pool still holds a connection to the
/// old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_follow_a_new_address_from_dns() {
    let mesh = Mesh::default();
    let old = plain_http().await;
    let new = SocketAddr::from(([127, 0, 0, 2], old.port()));
    tokio::spawn(standin::serve_http(TcpListener::bind(new).await.unwrap()));
    let dns = dns_for("moving.example.com", 1).await;
    let sc = sidecar(&mesh, &[&by_dns("moving", old.port())], dns.addr).await;
    let proxy = format!("http://{}", sc.addr(15001));
    let url = format!("http://moving.example.com:{}/todos/1", old.port());
    let client = [proxy, url];
    assert_eq!(get(&client).await.answer(), ("200", standin::TODO_1));
    assert_eq!(sc.next_log().await["upstream_host"], old.to_string());

    let mut zone = DnsZone::default().with_ttl(1);
    zone.insert("moving.example.com", new.ip());
    dns.set_zone(zone);
    // Bounded: a second for the TTL, a second for the next lookup.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert_eq!(get(&client).await.answer(), ("200", standin::TODO_1));
        if sc.next_log().await["upstream_host"] == new.to_string() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {old}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The CA goes away before the certificate is due: the proxy keeps the
/// certificate it has, stays ready while it is valid and says renewal is
/// failing, and is unready, saying why, once it has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_ca_keeps_the_certificate_until_expiry() {
    let ca = Arc::new(CertificateAuthority::generate("cluster.local").unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ca_addr = listener.local_addr().unwrap();
    let tokens = TokenTable::parse("tok curl-external-tst/default\n", "tokens").unwrap();
    let ca_server = tokio::spawn(caserver::serve(ca.clone(), tokens, listener));

    let dir = TempDir::new("ca-gone");
    let token_file = dir.write("token", "tok\n");
    let root_cert = dir.write("root.pem", ca.root_pem());
    let source = Source::CaServer {
        addr: ca_addr.to_string(),
        token_file: token_file.into(),
        root_cert: root_cert.into(),
        ttl: Duration::from_secs(4),
    };
    let identity = WorkloadIdentity::start(CURL_ID.parse().unwrap(), source)
        .await
        .unwrap();
    let first = identity.certified().unwrap().cert[0].clone();

    let readiness = Readiness::default();
    readiness.watch_certificate(identity.clone());
    let health = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/healthz/ready", health.local_addr().unwrap());
    let metrics = Arc::new(Metrics::new());
    tokio::spawn(admin::serve(health, AdminRole::Health, metrics, readiness));
    let ready = curl(&[&url]).await;
    assert_eq!((ready.code.as_str(), ready.body.trim()), ("200", "ready"));

    // The CA goes away; the renewal (due at about half the 4 s) fails.
    ca_server.abort();
    let _ = ca_server.await;
    let mut renewal = identity.watch_renewal();
    tokio::time::timeout(Duration::from_secs(10), renewal.wait_for(Option::is_some))
        .await
        .expect("a renewal was tried within 10 s")
        .unwrap();
    assert_eq!(identity.certified().unwrap().cert[0], first, "kept");
    if !identity.expired() {
        let still = curl(&[&url]).await;
        assert_eq!(still.code, "200", "{still:?}");
        assert!(
            still
                .body
                .starts_with("ready; certificate renewal failing: "),
            "{still:?}"
        );
    }

    // Past NotAfter: not ready, and the answer says why.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let unready = loop {
        let got = curl(&[&url]).await;
        if got.code != "200" {
            break got;
        }
        assert!(tokio::time::Instant::now() < deadline, "still ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(unready.code, "503");
    assert!(
        unready
            .body
            .starts_with("not ready, pending: certificate expired: renewal failing: "),
        "{unready:?}"
    );
    assert!(identity.expired());
}

/// The mesh hop is HTTP/2 (meshgate's own client there): a request body
/// larger than the gateway's receive window goes through whole, and one
/// that stops on the way is the client's fault (408, SI), as on a direct
/// hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_cross_the_http2_mesh_hop() {
    let chain = SeedChain::with_sidecar(seed_config(&[]), |mut spec| {
        spec.timeouts = Timeouts {
            stream_idle: Duration::from_millis(300),
            ..Timeouts::default()
        };
        spec
    })
    .await;
    let (sc, gateway) = (&chain.sidecar, &chain.gateway);

    let dir = TempDir::new("mesh-body");
    let file = format!("@{}", dir.write("body", &"z".repeat(3_000_000)));
    let proxy = format!("http://{}", sc.addr(15001));
    let url = format!("http://{HOST}/posts");
    let got = curl(&["-x", &proxy, "--data-binary", &file, &url]).await;
    assert_eq!(got.code, "200", "{got:?}");
    assert_eq!(chain.external.seen.all()[0].body, 3_000_000);
    let entry = gateway.next_log().await;
    assert_eq!(entry["bytes_received"], 3_000_000, "{entry}");

    let mut s = upload(sc, HOST, 100).await;
    let status_line = first_answer(&mut s).await;
    assert!(status_line.starts_with("HTTP/1.1 408 "), "{status_line}");
    let entry = sc.log_of_status(408).await;
    assert_eq!(entry["response_flags"], "SI");
}

/// Envoy's stream idle timeout inside a body: a response body that stops
/// is cut (the status already sent, logged with SI), and a request body
/// that stops gets 408 (the client's fault), even under a longer route
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_cut_by_the_stream_idle_timeout() {
    let mesh = Mesh::default();
    let upstream = stalls().await;
    let dns = dns_for("stall.example.com", 30).await;
    let reg = registered("stall.example.com", upstream.port());
    let route = timed_route("stall.example.com", upstream.port(), "30s");
    let quick = Timeouts {
        stream_idle: Duration::from_millis(300),
        ..Timeouts::default()
    };
    let sc = sidecar_with(&mesh, &[&reg, &route], dns.addr, quick).await;
    let proxy = format!("http://{}", sc.addr(15001));
    let authority = format!("stall.example.com:{}", upstream.port());

    let got = curl(&["-x", &proxy, &format!("http://{authority}/stall")]).await;
    assert_eq!((got.code.as_str(), got.exit), ("200", 18), "{got:?}");
    let entry = sc.log_of_status(200).await;
    assert_eq!(entry["response_flags"], "SI");
    assert_eq!(entry["response_code_details"], "stream_idle_timeout");

    // A request body that stops after 10 of 100 bytes.
    let mut s = upload(&sc, &authority, 100).await;
    let status_line = first_answer(&mut s).await;
    assert!(status_line.starts_with("HTTP/1.1 408 "), "{status_line}");
    let entry = sc.log_of_status(408).await;
    assert_eq!(entry["response_flags"], "SI");
    sc.refused_reaches("downstream_rq_idle_timeout", 2.0).await;
}

/// A route's timeout bounds the whole response, as Envoy's does: a body
/// that stops is cut when it passes (the status already sent, logged UT
/// `response_timeout`), long before the stream idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_cuts_a_response_body_that_does_not_end() {
    let mesh = Mesh::default();
    let upstream = stalls().await;
    // The default stream idle timeout (5 min): only the route's can end it.
    let (sc, _dns) = timed_sidecar(&mesh, "slow.example.com", upstream, "1s").await;
    let proxy = format!("http://{}", sc.addr(15001));
    let url = format!("http://slow.example.com:{}/stall", upstream.port());

    let got = curl(&["-x", &proxy, &url]).await;
    assert_eq!((got.code.as_str(), got.exit), ("200", 18), "{got:?}");
    let entry = sc.log_of_status(200).await;
    assert_eq!(entry["response_flags"], "UT");
    assert_eq!(entry["response_code_details"], "response_timeout");
}

/// A route's timeout starts when the request has been received, as
/// Envoy's: an upload slower than the timeout is answered, since its
/// answer comes in time after its last byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_starts_when_the_request_has_been_received() {
    let mesh = Mesh::default();
    let upstream = answers_after_the_body().await;
    let (sc, _dns) = timed_sidecar(&mesh, "upload.example.com", upstream, "1s").await;
    let authority = format!("upload.example.com:{}", upstream.port());

    let mut s = upload(&sc, &authority, 20).await;
    // The client's pace: the rest of the body after more than the route's
    // timeout (well within the stream idle timeout, 5 min).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(b"0123456789").await.unwrap();
    let status_line = first_answer(&mut s).await;
    assert!(status_line.starts_with("HTTP/1.1 200 "), "{status_line}");
    let entry = sc.log_of_status(200).await;
    assert_eq!(entry["response_flags"], "-");
    assert_eq!(entry["bytes_received"], 20);
}

/// DYNAMIC_DNS on a wildcard ServiceEntry: each request's host is
/// resolved when it is sent (Envoy's dynamic forward proxy); a name DNS
/// does not know gets 503 UH, and the next known one still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_dns_resolves_each_requests_host() {
    let mesh = Mesh::default();
    let plain = plain_http().await;
    let dns = dns_for("a.dyn.example", 30).await;
    let wildcard = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: dyn, namespace: curl-external-tst}}
spec:
  hosts: ['*.dyn.example']
  ports: [{{number: {}, name: http, protocol: HTTP}}]
  resolution: DYNAMIC_DNS
",
        plain.port()
    );
    let sc = sidecar(&mesh, &[&wildcard], dns.addr).await;
    let proxy = format!("http://{}", sc.addr(15001));
    let url = |host: &str| format!("http://{host}:{}/hello", plain.port());

    let got = curl(&["-x", &proxy, &url("a.dyn.example")]).await;
    assert_eq!(got.code, "200", "{got:?}");
    assert!(
        got.body.contains("a.dyn.example"),
        "the echo names the host: {got:?}"
    );
    let entry = sc.next_log().await;
    assert_eq!(
        entry["upstream_cluster"],
        format!("outbound|{}||*.dyn.example", plain.port())
    );
    assert_eq!(entry["upstream_host"], plain.to_string());

    let unknown = curl(&["-x", &proxy, &url("b.dyn.example")]).await;
    assert_eq!(unknown.code, "503", "{unknown:?}");
    assert_eq!(sc.next_log().await["response_flags"], "UH");
    assert_eq!(
        curl(&["-x", &proxy, &url("a.dyn.example")]).await.code,
        "200"
    );
}

/// TLS origination to a wildcard DYNAMIC_DNS host: the SNI and the name
/// verified are the request's host (Envoy's auto SNI and SAN validation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_dns_originates_tls_with_the_requests_host() {
    let mesh = Mesh::default();
    let external = External::start(&["x.tls.example"]).await;
    let dir = TempDir::new("dyn-tls");
    let ca = dir.write("ca.pem", &external.ca.root_pem);
    let port = external.addr.port();
    let config = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: dyn-tls, namespace: curl-external-tst}}
spec:
  hosts: ['*.tls.example']
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  resolution: DYNAMIC_DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: dyn-tls, namespace: curl-external-tst}}
spec:
  host: '*.tls.example'
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {ca}}}
"
    );
    let mut zone = DnsZone::default();
    zone.insert("x.tls.example", "127.0.0.1".parse().unwrap());
    zone.insert("y.tls.example", "127.0.0.1".parse().unwrap());
    let dns = DnsServer::start("127.0.0.1:0".parse().unwrap(), zone)
        .await
        .unwrap();
    let sc = sidecar(&mesh, &[&config], dns.addr).await;
    let proxy = format!("http://{}", sc.addr(15001));
    let got = curl(&[
        "-x",
        &proxy,
        &format!("http://x.tls.example:{port}/todos/1"),
    ])
    .await;
    assert_eq!(got.answer(), ("200", standin::TODO_1));
    assert_eq!(
        external.seen.all().last().unwrap().sni.as_deref(),
        Some("x.tls.example")
    );
    sc.next_log().await;
    // The stand-in's certificate does not name y.tls.example: refused.
    let wrong = curl(&[
        "-x",
        &proxy,
        &format!("http://y.tls.example:{port}/todos/1"),
    ])
    .await;
    assert_eq!(wrong.code, "503", "{wrong:?}");
    let entry = sc.next_log().await;
    assert_eq!(entry["response_flags"], "UF,URX", "retried, then failed");
    assert!(failure_reason_mentions(&entry, "TLS_error"), "{entry}");
}

/// DestinationRule `maxRequestsPerConnection: 2`: a pooled connection
/// carries two requests, then a new one is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_carries_at_most_max_requests_per_connection() {
    let mesh = Mesh::default();
    let KeepAliveServer {
        addr: upstream,
        accepted,
        ..
    } = keepalive_server("ok").await;
    let dns = dns_for("pooled.example.com", 30).await;
    let config = pooled(
        "pooled",
        upstream.port(),
        "{http: {maxRequestsPerConnection: 2}}",
    );
    let sc = sidecar(&mesh, &[&config], dns.addr).await;
    let proxy = format!("http://{}", sc.addr(15001));
    let url = format!("http://pooled.example.com:{}/", upstream.port());
    for _ in 0..4 {
        assert_eq!(curl(&["-x", &proxy, &url]).await.answer(), ("200", "ok"));
        sc.next_log().await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "two requests per connection"
    );
}

/// `by_dns(name, port)` with a DestinationRule whose `connectionPool` is
/// `pool`.
fn pooled(name: &str, port: u16, pool: &str) -> String {
    by_dns(name, port) + "---\n" + &traffic_policy(name, &format!("connectionPool: {pool}"))
}

/// A DestinationRule for `NAME.example.com` whose trafficPolicy has the
/// field `policy`.
fn traffic_policy(name: &str, policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: curl-external-tst}}
spec:
  host: {name}.example.com
  trafficPolicy:
    {policy}
"
    )
}

/// `maxConnectionDuration`: a connection takes no request after it, and
/// one with none in flight is closed (Envoy's `max_connection_duration`);
/// the next request opens another. Over HTTP/1.1 and HTTP/2 upstreams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_let_go_after_max_connection_duration() {
    let mesh = Mesh::default();
    let h1 = keepalive_server("ok").await;
    let h2 = h2_server_counting(ok).await;
    let dns = dns(&["aging.example.com", "aging-h2.example.com"]).await;
    let pool = "{tcp: {maxConnectionDuration: 0.3s}}";
    let aging = pooled("aging", h1.addr.port(), pool);
    let aging_h2 = over_h2(&pooled("aging-h2", h2.addr.port(), pool));
    let sc = sidecar(&mesh, &[&aging, &aging_h2], dns).await;
    let proxy = format!("http://{}", sc.addr(15001));
    for (name, mut server) in [("aging", h1), ("aging-h2", h2)] {
        let url = format!("http://{name}.example.com:{}/", server.addr.port());
        assert_eq!(curl(&["-x", &proxy, &url]).await.code, "200");
        sc.next_log().await;
        tokio::time::timeout(Duration::from_secs(5), server.closed.recv())
            .await
            .expect("the proxy closes the connection once it is 0.3 s old");
        assert_eq!(curl(&["-x", &proxy, &url]).await.code, "200");
        sc.next_log().await;
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2, "{url}");
    }
}

/// Seconds until the keepalive probe of each open connection to `port`,
/// as the kernel shows it in /proc/net/tcp (`ss -o` prints the same as
/// `timer:(keepalive,...)`); `None` for one without keepalive.
fn keepalive_timers(port: u16) -> Vec<Option<f64>> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let to = u16::from_str_radix(f.get(2)?.rsplit(':').next()?, 16).ok()?;
            // State 01: established. Timer 2: the socket timer, keepalive's.
            (to == port && f.get(3) == Some(&"01")).then(|| {
                let (timer, when) = f.get(5)?.split_once(':')?;
                let ticks = i64::from_str_radix(when, 16).ok()?;
                (timer == "02").then_some(ticks as f64 / 100.0)
            })
        })
        .collect()
}

/// `tcpKeepalive`: the proxy's connections to the upstream have
/// SO_KEEPALIVE with the DestinationRule's idle time (7 s here, where the
/// kernel's default is 2 h); those of a cluster without it have none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_keepalive_is_set_on_upstream_connections() {
    let mesh = Mesh::default();
    let (alive, plain) = (keepalive_server("ok").await, keepalive_server("ok").await);
    let dns = dns(&["alive.example.com", "plain.example.com"]).await;
    let kept = pooled(
        "alive",
        alive.addr.port(),
        "{tcp: {tcpKeepalive: {time: 7s, interval: 3s, probes: 4}}}",
    );
    let sc = sidecar(&mesh, &[&kept, &by_dns("plain", plain.addr.port())], dns).await;
    let proxy = format!("http://{}", sc.addr(15001));
    for (host, server) in [("alive", &alive), ("plain", &plain)] {
        let url = format!("http://{host}.example.com:{}/", server.addr.port());
        assert_eq!(curl(&["-x", &proxy, &url]).await.code, "200");
        sc.next_log().await;
    }
    let timers = keepalive_timers(alive.addr.port());
    assert_eq!(timers.len(), 1, "one pooled connection: {timers:?}");
    assert!(
        timers[0].is_some_and(|t| t > 0.0 && t <= 7.0),
        "a probe within 7 s: {timers:?}"
    );
    assert_eq!(keepalive_timers(plain.addr.port()), [None]);
}

/// DestinationRule `consistentHash` on a header: each user's requests go
/// to one endpoint, and the users spread over the endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_a_key_on_one_endpoint() {
    let mesh = Mesh::default();
    let (a, b) = (plain_http().await, plain_http().await);
    let config = two_endpoints(
        "hashed",
        [a, b],
        "{consistentHash: {httpHeaderName: x-user}}",
    );
    let dns = dns_for("unused.example.com", 30).await;
    let sc = sidecar(&mesh, &[&config], dns.addr).await;
    let proxy = format!("http://{}", sc.addr(15001));
    let mut endpoint_of = std::collections::HashMap::new();
    for round in 0..2 {
        for user in 0..20 {
            let header = format!("x-user: user-{user}");
            let got = curl(&[
                "-x",
                &proxy,
                "-H",
                &header,
                "http://hashed.example.com:8080/",
            ])
            .await;
            assert_eq!(got.code, "200", "{got:?}");
            let host = sc.next_log().await["upstream_host"].clone();
            let first = endpoint_of.entry(user).or_insert_with(|| host.clone());
            assert_eq!(*first, host, "user-{user}, round {round}");
        }
    }
    let used: std::collections::HashSet<String> =
        endpoint_of.values().map(ToString::to_string).collect();
    assert_eq!(used.len(), 2, "the users spread over both endpoints");
}

/// Locality failover (a DestinationRule with outlier detection): a client
/// in us-east/zone-a sends to the endpoint of its own locality; once that
/// one is ejected, to the other region's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_failover_prefers_the_clients_locality_until_it_is_ejected() {
    let mesh = Mesh::default();
    let (local, remote) = (plain_http().await, plain_http().await);
    let config = located(local, remote, "");
    let spec = Spec::new(
        seed_config_except(&["sidecar.yaml"], &[&config]),
        "curl-external-tst/east-client",
    );
    let sc = TestProxy::start(&mesh, spec).await;
    let proxy = format!("http://{}", sc.addr(15001));
    let get = |path: &'static str| {
        let proxy = proxy.clone();
        async move {
            curl(&[
                "-x",
                &proxy,
                &format!("http://located.example.com:8080{path}"),
            ])
            .await
        }
    };
    for _ in 0..8 {
        assert_eq!(get("/").await.code, "200");
        assert_eq!(
            sc.next_log().await["upstream_host"],
            local.to_string(),
            "own locality first"
        );
    }
    // The local endpoint answers 503 once: ejected.
    assert_eq!(get("/status/503").await.code, "503");
    sc.next_log().await;
    for _ in 0..3 {
        assert_eq!(get("/").await.code, "200");
        assert_eq!(
            sc.next_log().await["upstream_host"],
            remote.to_string(),
            "failed over"
        );
    }
}

/// `consistentHash.httpCookie` with a ttl: a client without the cookie
/// gets one (Set-Cookie) and keeps its endpoint with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_hash_cookie_keeps_a_client_on_its_endpoint() {
    let mesh = Mesh::default();
    let (a, b) = (plain_http().await, plain_http().await);
    let config = two_endpoints(
        "sticky",
        [a, b],
        "{consistentHash: {httpCookie: {name: affinity, path: /, ttl: 60s}}}",
    );
    let dns = dns_for("unused.example.com", 30).await;
    let sc = sidecar(&mesh, &[&config], dns.addr).await;
    let proxy = format!("http://{}", sc.addr(15001));
    let dir = TempDir::new("sticky");
    let mut used = std::collections::HashSet::new();
    for client in 0..12 {
        let jar = dir.path(&format!("jar-{client}"));
        let first = curl(&[
            "-i",
            "-x",
            &proxy,
            "-c",
            &jar,
            "http://sticky.example.com:8080/",
        ])
        .await;
        assert!(first.body.contains("set-cookie: affinity=\""), "{first:?}");
        let host = sc.next_log().await["upstream_host"].clone();
        for _ in 0..3 {
            let again = curl(&[
                "-i",
                "-x",
                &proxy,
                "-b",
                &jar,
                "http://sticky.example.com:8080/",
            ])
            .await;
            assert!(
                !again.body.contains("set-cookie"),
                "the cookie was sent: {again:?}"
            );
            assert_eq!(
                sc.next_log().await["upstream_host"],
                host,
                "client {client}"
            );
        }
        used.insert(host.to_string());
    }
    assert_eq!(used.len(), 2, "clients spread over both endpoints");
}

/// A sidecar for `NAME.example.com:8080`, whose endpoints are one that
/// refuses connections and `live`, round robin (two of every four
/// requests try the first first): the sidecar, its proxy URL, and the DNS
/// server it asks (kept while it runs).
async fn after_a_refusal(
    mesh: &Mesh,
    name: &str,
    live: SocketAddr,
) -> (TestProxy, String, DnsServer) {
    // Bound, then closed: connections to it are refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = two_endpoints(name, [dead, live], "{simple: ROUND_ROBIN}");
    let dns = dns_for("unused.example.com", 30).await;
    let sc = sidecar(mesh, &[&config], dns.addr).await;
    let proxy = format!("http://{}", sc.addr(15001));
    (sc, proxy, dns)
}

/// Istio's default retry policy retries a connect failure: a request whose
/// endpoint refuses the connection goes to the other endpoint whole (the
/// pool hands back the request it could not send; the headers are not
/// copied for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_with_the_whole_request() {
    let mesh = Mesh::default();
    let live = plain_http().await;
    let (sc, proxy, _dns) = after_a_refusal(&mesh, "retried", live).await;
    for _ in 0..4 {
        let got = curl(&[
            "-x",
            &proxy,
            "-H",
            "x-probe: kept",
            "http://retried.example.com:8080/echo",
        ])
        .await;
        assert_eq!(got.code, "200", "{got:?}");
        assert!(got.body.contains("\"x-probe\": \"kept\""), "{got:?}");
        let entry = sc.next_log().await;
        assert_eq!(entry["upstream_host"], live.to_string(), "{entry}");
        assert_eq!(entry["response_flags"], "-", "{entry}");
    }
}

/// A request with a body is retried when it never left (a refused
/// connection, under Istio's default policy), body and all: the pool
/// hands the request back untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_body_is_retried_when_it_never_left() {
    let mesh = Mesh::default();
    let live = answers_after_the_body().await;
    let (sc, proxy, _dns) = after_a_refusal(&mesh, "posted", live).await;
    for _ in 0..4 {
        let body = "a body the upstream reads whole before it answers";
        let url = "http://posted.example.com:8080/upload";
        let got = curl(&["-x", &proxy, "--data-binary", body, url]).await;
        assert_eq!(got.answer(), ("200", "ok"));
        let entry = sc.next_log().await;
        assert_eq!(entry["upstream_host"], live.to_string(), "{entry}");
        assert_eq!(entry["response_flags"], "-", "{entry}");
    }
}

/// A request whose body went out is retried with the body kept as it
/// went (Envoy buffers a request it may retry), up to 32 KiB: a larger
/// one goes once, and its failure is the client's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_body_is_sent_again_when_the_policy_retries() {
    let mesh = Mesh::default();
    let (dies, live) = (
        hangs_up_after_the_body().await,
        answers_after_the_body().await,
    );
    let config = retried("replayed", [dies, live], "{attempts: 1, retryOn: reset}");
    let dns = dns_for("unused.example.com", 30).await;
    let sc = sidecar(&mesh, &[&config], dns.addr).await;
    let proxy = format!("http://{}", sc.addr(15001));
    let sc = &sc;
    let post = |body: String| {
        let proxy = proxy.clone();
        async move {
            let url = "http://replayed.example.com:8080/upload";
            let got = curl(&["-x", &proxy, "--data-binary", &body, url]).await;
            (got, sc.next_log().await)
        }
    };
    // Round robin: two of four go to `dies` first.
    for _ in 0..4 {
        let (got, entry) = post("x".repeat(20_000)).await;
        assert_eq!(got.answer(), ("200", "ok"));
        assert_eq!(entry["upstream_host"], live.to_string(), "{entry}");
    }
    let mut cut = 0;
    for _ in 0..4 {
        let (got, entry) = post("x".repeat(40_000)).await;
        if got.code == "503" {
            assert_eq!(entry["response_flags"], "UC", "{entry}");
            cut += 1;
        } else {
            assert_eq!(got.answer(), ("200", "ok"));
        }
    }
    assert!(cut > 0, "a body over the limit is not sent again");
}

/// An HTTP server that reads a request's head and hangs up without a word.
async fn hangs_up() -> SocketAddr {
    raw_server(|got| Some((head_end(got)?, b""))).await
}

/// `NAME.example.com:8080` (two endpoints, round robin) under a
/// VirtualService with these `retries`.
fn retried(name: &str, endpoints: [SocketAddr; 2], retries: &str) -> String {
    retried_with(name, endpoints, "{simple: ROUND_ROBIN}", retries)
}

/// The same with this `loadBalancer`.
fn retried_with(
    name: &str,
    endpoints: [SocketAddr; 2],
    load_balancer: &str,
    retries: &str,
) -> String {
    let config = two_endpoints(name, endpoints, load_balancer);
    under_route(name, &format!("retries: {retries}"), config)
}

/// `config` (`NAME.example.com`'s ServiceEntry and DestinationRule) and a
/// VirtualService whose one route to it, port 8080, has `rule`.
fn under_route(name: &str, rule: &str, config: String) -> String {
    format!(
        "{config}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: curl-external-tst}}
spec:
  hosts: [{name}.example.com]
  http:
  - {rule}
    route: [{{destination: {{host: {name}.example.com, port: {{number: 8080}}}}}}]
"
    )
}

/// Four requests through the sidecar to `host`: each one's answer and
/// access-log entry.
async fn four(sc: &TestProxy, host: &str) -> Vec<(Curl, serde_json::Value)> {
    let proxy = format!("http://{}", sc.addr(15001));
    let mut out = Vec::new();
    for _ in 0..4 {
        let url = format!("http://{host}:8080/echo");
        let got = curl(&["-x", &proxy, "-H", "x-probe: kept", &url]).await;
        out.push((got, sc.next_log().await));
    }
    out
}

/// Four requests to `retried` all reach `live`, headers and all; of four
/// to `unretried`, round robin sends some to the failing endpoint first:
/// the log entries of those, which answered `status`.
async fn only_retried_ones_recover(
    sc: &TestProxy,
    live: SocketAddr,
    [retried, unretried]: [&str; 2],
    status: &str,
) -> Vec<serde_json::Value> {
    for (got, entry) in four(sc, retried).await {
        assert_eq!(got.code, "200", "{got:?}");
        assert!(got.body.contains("\"x-probe\": \"kept\""), "{got:?}");
        assert_eq!(entry["upstream_host"], live.to_string(), "{entry}");
    }
    let failed: Vec<_> = four(sc, unretried)
        .await
        .into_iter()
        .filter(|(got, _)| got.code == status)
        .map(|(_, entry)| entry)
        .collect();
    assert!(!failed.is_empty(), "no {status} from {unretried}");
    failed
}

/// Envoy's retry on reset: `5xx` (and `gateway-error`, `reset`) retries
/// an attempt whose connection ended before the response, with a copy of
/// the request; Istio's default policy (connect failures, refused
/// streams) does not, and the client gets the 503 (UC). Retries spent on
/// resets add URX.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_is_retried_when_the_policy_retries_5xx() {
    let mesh = Mesh::default();
    let (bad, worse, live) = (hangs_up().await, hangs_up().await, plain_http().await);
    let with = retried("resets", [bad, live], "{attempts: 2, retryOn: 5xx}");
    let without = two_endpoints("plain", [bad, live], "{simple: ROUND_ROBIN}");
    let spent = retried("spent", [bad, worse], "{attempts: 1, retryOn: reset}");
    let dns = dns_for("unused.example.com", 30).await;
    let sc = sidecar(&mesh, &[&with, &without, &spent], dns.addr).await;
    let hosts = ["resets.example.com", "plain.example.com"];
    for entry in only_retried_ones_recover(&sc, live, hosts, "503").await {
        assert_eq!(entry["response_flags"], "UC", "{entry}");
        // As Envoy's log: the endpoint the failed attempt went to.
        assert_eq!(entry["upstream_host"], bad.to_string(), "{entry}");
    }
    for (got, entry) in four(&sc, "spent.example.com").await {
        assert_eq!(got.code, "503", "{got:?}");
        assert_eq!(entry["response_flags"], "UC,URX", "{entry}");
    }
}

/// A retry goes to an endpoint no attempt went to before (Envoy's
/// previous-hosts predicate, `retryIgnorePreviousHosts`): each user whose
/// hash picks the endpoint that hangs up is answered by the other when the
/// route says so. Without it a hashed request stays on its endpoint, as
/// Istio leaves it (by default only unhashed requests move), and those
/// users get 503 UC,URX.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_goes_to_an_endpoint_not_tried_before() {
    let mesh = Mesh::default();
    let (bad, live) = (hangs_up().await, plain_http().await);
    let hashed = "{consistentHash: {httpHeaderName: x-user}}";
    let elsewhere = "{attempts: 1, retryOn: reset, retryIgnorePreviousHosts: true}";
    let moved = retried_with("moved", [bad, live], hashed, elsewhere);
    let kept = retried_with("kept", [bad, live], hashed, "{attempts: 1, retryOn: reset}");
    let dns = dns_for("unused.example.com", 30).await;
    let sc = sidecar(&mesh, &[&moved, &kept], dns.addr).await;
    let proxy = format!("http://{}", sc.addr(15001));
    let mut stuck = 0;
    for user in 0..16 {
        let header = format!("x-user: user-{user}");
        let ask = |host: &str| {
            let url = format!("http://{host}:8080/echo");
            let args = [
                "-x".to_owned(),
                proxy.clone(),
                "-H".to_owned(),
                header.clone(),
                url,
            ];
            async move { curl(&args.each_ref().map(String::as_str)).await }
        };
        let got = ask("moved.example.com").await;
        assert_eq!(got.code, "200", "user-{user}: {got:?}");
        assert_eq!(sc.next_log().await["upstream_host"], live.to_string());
        let got = ask("kept.example.com").await;
        let entry = sc.next_log().await;
        if got.code == "503" {
            assert_eq!(entry["response_flags"], "UC,URX", "{entry}");
            stuck += 1;
        } else {
            assert_eq!(got.code, "200", "user-{user}: {got:?}");
        }
    }
    // (Every user hashed to `live`: one run in 65,536.)
    assert!(
        stuck > 0,
        "no user was hashed to the endpoint that hangs up"
    );
}

/// An HTTP/2 server that does `answer` to every stream once it has read
/// the request's body.
async fn h2_server(answer: fn(h2::server::SendResponse<bytes::Bytes>)) -> SocketAddr {
    h2_server_counting(answer).await.addr
}

/// The same, counting the connections it accepts and telling each one
/// the client closes.
async fn h2_server_counting(answer: fn(h2::server::SendResponse<bytes::Bytes>)) -> KeepAliveServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (tx, closed) = tokio::sync::mpsc::unbounded_channel();
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        while let Some(Ok(_)) = body.data().await {}
                        answer(respond);
                    });
                }
                let _ = tx.send(());
            });
        }
    });
    KeepAliveServer {
        addr,
        accepted,
        closed,
    }
}

/// Answers 200 with no body.
fn ok(mut respond: h2::server::SendResponse<bytes::Bytes>) {
    let _ = respond.send_response(http::Response::new(()), true);
}

/// An HTTP/2 server that refuses every stream (RST_STREAM REFUSED_STREAM).
async fn refuses_streams() -> SocketAddr {
    h2_server(|mut respond| respond.send_reset(h2::Reason::REFUSED_STREAM)).await
}

/// An HTTP/2 server answering every request with gRPC's UNAVAILABLE
/// (14), trailers-only: the status in the response's headers.
async fn grpc_unavailable() -> SocketAddr {
    h2_server(|mut respond| {
        let answer = http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "14")
            .body(())
            .unwrap();
        let _ = respond.send_response(answer, true);
    })
    .await
}

/// A gRPC answer's status is retried as `retryOn` names it (Envoy's
/// `retry_grpc_on`): Istio's default has `unavailable`, so a gRPC request
/// answered UNAVAILABLE goes to the other endpoint, its message kept for
/// it; under `5xx` alone the client gets the UNAVAILABLE (HTTP 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_status_is_retried_as_the_policy_names_it() {
    let mesh = Mesh::default();
    let (unavailable, live) = (grpc_unavailable().await, plain_http().await);
    let by_default = over_h2(&two_endpoints(
        "grpc",
        [unavailable, live],
        "{simple: ROUND_ROBIN}",
    ));
    let http_only = over_h2(&retried(
        "httponly",
        [unavailable, live],
        "{attempts: 1, retryOn: 5xx}",
    ));
    let dns = dns_for("unused.example.com", 30).await;
    let sc = sidecar(&mesh, &[&by_default, &http_only], dns.addr).await;
    let proxy = format!("http://{}", sc.addr(15001));
    let ask = |host: &str| {
        let url = format!("http://{host}:8080/echo");
        let args = [
            "-x",
            &proxy,
            "--data-binary",
            "a message",
            "-H",
            "content-type: application/grpc",
            "-o",
            "/dev/null",
            "-D",
            "-",
            &url,
        ]
        .map(str::to_owned);
        async move { curl(&args.each_ref().map(String::as_str)).await }
    };
    for _ in 0..4 {
        let got = ask("grpc.example.com").await;
        assert_eq!(got.code, "200", "{got:?}");
        assert!(!got.body.contains("grpc-status"), "{got:?}");
        assert_eq!(sc.next_log().await["upstream_host"], live.to_string());
    }
    let mut unretried = 0;
    for _ in 0..4 {
        let got = ask("httponly.example.com").await;
        sc.next_log().await;
        unretried += usize::from(got.body.contains("grpc-status: 14"));
    }
    assert!(
        unretried > 0,
        "round robin sends some to `unavailable` first"
    );
}

/// The same config with its port speaking HTTP/2 (HTTP2).
fn over_h2(config: &str) -> String {
    config.replace("protocol: HTTP}", "protocol: HTTP2}")
}

/// Outlier detection counts a gRPC answer by its `grpc-status`, as Envoy
/// maps it to HTTP: UNAVAILABLE (an HTTP 200) is a 503 to it, so the
/// endpoint answering it is ejected at `consecutive5xxErrors: 1` and the
/// rest go to the other (no retries here, so the client sees each answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_status_counts_for_outlier_detection() {
    let mesh = Mesh::default();
    let (unavailable, live) = (grpc_unavailable().await, plain_http().await);
    let od = "{consecutive5xxErrors: 1, baseEjectionTime: 60s, maxEjectionPercent: 100}";
    let config = over_h2(&ejecting("rpc", [unavailable, live], od));
    let config = under_route("rpc", "retries: {attempts: 0}", config);
    let dns = dns_for("unused.example.com", 30).await;
    let sc = sidecar(&mesh, &[&config], dns.addr).await;
    let proxy = format!("http://{}", sc.addr(15001));
    let mut unavailable_answers = 0;
    for _ in 0..6 {
        let got = curl(&[
            "-x",
            &proxy,
            "-H",
            "content-type: application/grpc",
            "--data-binary",
            "a message",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "http://rpc.example.com:8080/echo",
        ])
        .await;
        sc.next_log().await;
        unavailable_answers += usize::from(got.body.contains("grpc-status: 14"));
    }
    assert_eq!(
        unavailable_answers, 1,
        "ejected after its first UNAVAILABLE"
    );
}

/// An HTTP/2 upstream's REFUSED_STREAM says it did not act on the
/// request: Istio's default policy (`refused-stream` among its
/// conditions) retries it on the other endpoint, headers and all; without
/// retries the client gets 503 UR (`remote_refused_stream_reset`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_retried_on_another_endpoint() {
    let mesh = Mesh::default();
    let (refuser, live) = (refuses_streams().await, plain_http().await);
    let by_default = over_h2(&two_endpoints(
        "refused",
        [refuser, live],
        "{simple: ROUND_ROBIN}",
    ));
    let never = over_h2(&retried("unretried", [refuser, live], "{attempts: 0}"));
    let dns = dns_for("unused.example.com", 30).await;
    let sc = sidecar(&mesh, &[&by_default, &never], dns.addr).await;
    let hosts = ["refused.example.com", "unretried.example.com"];
    for entry in only_retried_ones_recover(&sc, live, hosts, "503").await {
        assert_eq!(entry["response_flags"], "UR", "{entry}");
        assert_eq!(
            entry["response_code_details"],
            "upstream_reset_before_response_started{remote_refused_stream_reset}"
        );
    }
}

/// A per-try timeout is a reset too: `gateway-error` retries it on the
/// other endpoint; `connect-failure` alone answers 504 (UT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_is_retried_when_the_policy_retries_gateway_errors() {
    let mesh = Mesh::default();
    let (silent, live) = (raw_server(|_| None).await, plain_http().await);
    let policy = |on: &str| format!("{{attempts: 2, perTryTimeout: 0.3s, retryOn: {on}}}");
    let with = retried("slow", [silent, live], &policy("gateway-error"));
    let without = retried("stuck", [silent, live], &policy("connect-failure"));
    let dns = dns_for("unused.example.com", 30).await;
    let sc = sidecar(&mesh, &[&with, &without], dns.addr).await;
    let hosts = ["slow.example.com", "stuck.example.com"];
    for entry in only_retried_ones_recover(&sc, live, hosts, "504").await {
        assert_eq!(entry["response_flags"], "UT", "{entry}");
        assert_eq!(entry["response_code_details"], "upstream_per_try_timeout");
    }
}

/// `NAME.example.com:8080` (two endpoints, round robin) whose
/// DestinationRule has this `outlierDetection`.
fn ejecting(name: &str, endpoints: [SocketAddr; 2], outlier: &str) -> String {
    two_endpoints(name, endpoints, "{simple: ROUND_ROBIN}")
        + &format!("    outlierDetection: {outlier}\n")
}

/// `n` requests through the sidecar to `host`: each one's status and the
/// endpoint its log entry names.
async fn statuses(sc: &TestProxy, host: &str, n: usize) -> Vec<(String, String)> {
    let proxy = format!("http://{}", sc.addr(15001));
    let mut out = Vec::new();
    for _ in 0..n {
        let got = curl(&["-x", &proxy, &format!("http://{host}:8080/")]).await;
        let entry = sc.next_log().await;
        out.push((
            got.code,
            entry["upstream_host"].as_str().unwrap_or("-").to_owned(),
        ));
    }
    out
}

/// Outlier detection counts an endpoint that hangs up before answering,
/// as Envoy does by default (a locally originated error is a 503 to it,
/// `split_external_local_origin_errors` being false): after two in a row
/// it is ejected, and the rest go to the other endpoint. (Istio's default
/// retries leave a reset to the client.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_an_endpoint_that_hangs_up() {
    let mesh = Mesh::default();
    let (bad, live) = (hangs_up().await, plain_http().await);
    let od = "{consecutive5xxErrors: 2, baseEjectionTime: 60s, maxEjectionPercent: 100}";
    let config = ejecting("flaky", [bad, live], od);
    let dns = dns_for("unused.example.com", 30).await;
    let sc = sidecar(&mesh, &[&config], dns.addr).await;
    let got = statuses(&sc, "flaky.example.com", 8).await;
    let failed: Vec<_> = got.iter().filter(|(code, _)| code == "503").collect();
    assert_eq!(failed.len(), 2, "ejected after two resets: {got:?}");
    for (_, at) in failed {
        assert_eq!(
            at,
            &bad.to_string(),
            "the log names the endpoint that hung up"
        );
    }
    for (code, host) in &got[4..] {
        assert_eq!(
            (code.as_str(), host.as_str()),
            ("200", live.to_string().as_str())
        );
    }
}

/// With every endpoint ejected, Istio's default (`minHealthPercent` 0
/// turns Envoy's panic threshold off) leaves no healthy upstream: 503 UH.
/// With `minHealthPercent: 50`, fewer healthy than that sends requests to
/// all of them again, ejected or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_endpoint_ejected_there_is_no_healthy_upstream() {
    let mesh = Mesh::default();
    let (one, two) = (hangs_up().await, hangs_up().await);
    let od = |min: u32| {
        format!(
            "{{consecutive5xxErrors: 1, baseEjectionTime: 60s, maxEjectionPercent: 100, minHealthPercent: {min}}}"
        )
    };
    let off = ejecting("off", [one, two], &od(0));
    let half = ejecting("half", [one, two], &od(50));
    let dns = dns_for("unused.example.com", 30).await;
    let sc = sidecar(&mesh, &[&off, &half], dns.addr).await;
    let proxy = format!("http://{}", sc.addr(15001));
    for (host, third) in [("off", "UH"), ("half", "UC")] {
        let mut flags = Vec::new();
        for _ in 0..3 {
            let got = curl(&["-x", &proxy, &format!("http://{host}.example.com:8080/")]).await;
            assert_eq!(got.code, "503", "{host}: {got:?}");
            flags.push(sc.next_log().await["response_flags"].clone());
        }
        assert_eq!(flags, ["UC", "UC", third], "{host}");
    }
}

/// A timeout is a gateway error to outlier detection (a 504, as Envoy's
/// router reports a local timeout): an endpoint that never answers is
/// ejected by `consecutiveGatewayErrors: 1` at its first route timeout,
/// or its first per-try timeout, and the rest go to the other endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_an_endpoint_that_times_out() {
    let mesh = Mesh::default();
    let (silent, live) = (raw_server(|_| None).await, plain_http().await);
    let od = "{consecutive5xxErrors: 0, consecutiveGatewayErrors: 1, baseEjectionTime: 60s, maxEjectionPercent: 100}";
    let routed =
        |name: &str, rule: &str| under_route(name, rule, ejecting(name, [silent, live], od));
    let by_route = routed("late", "timeout: 0.3s");
    let by_try = routed(
        "tardy",
        "retries: {attempts: 1, perTryTimeout: 0.3s, retryOn: connect-failure}",
    );
    let dns = dns_for("unused.example.com", 30).await;
    let sc = sidecar(&mesh, &[&by_route, &by_try], dns.addr).await;
    for host in ["late.example.com", "tardy.example.com"] {
        let got = statuses(&sc, host, 6).await;
        let timed_out: Vec<_> = got.iter().filter(|(code, _)| code == "504").collect();
        assert_eq!(
            timed_out.len(),
            1,
            "{host}: ejected at the first timeout: {got:?}"
        );
        assert_eq!(
            timed_out[0].1,
            silent.to_string(),
            "{host}: the log names it"
        );
        for (code, at) in &got[2..] {
            assert_eq!(
                (code.as_str(), at.as_str()),
                ("200", live.to_string().as_str()),
                "{host}"
            );
        }
    }
}

/// `NAME.example.com:8080` with two STATIC endpoints and a
/// DestinationRule with this `loadBalancer`.
fn two_endpoints(name: &str, endpoints: [SocketAddr; 2], load_balancer: &str) -> String {
    let [a, b] = endpoints.map(|e| e.port());
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: curl-external-tst}}
spec:
  hosts: [{name}.example.com]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {a}}}}}
  - {{address: 127.0.0.1, ports: {{http: {b}}}}}
---
{}",
        traffic_policy(name, &format!("loadBalancer: {load_balancer}"))
    )
}

/// An HTTP server answering each path's first request 503 (the first two
/// under `/twice/`) and the next 200; the second request of a path under
/// `/held/` waits until `release` is notified, and `held` tells when one
/// waits.
async fn answers_the_retry() -> (
    SocketAddr,
    Arc<tokio::sync::Notify>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    use http_body_util::Empty;
    use hyper::service::service_fn;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let release = Arc::new(tokio::sync::Notify::new());
    let (tx, held) = tokio::sync::mpsc::unbounded_channel();
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        u32,
    >::new()));
    let releases = release.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (seen, release, tx) = (seen.clone(), releases.clone(), tx.clone());
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (seen, release, tx) = (seen.clone(), release.clone(), tx.clone());
                async move {
                    let path = req.uri().path().to_owned();
                    let asked = {
                        let mut seen = seen.lock().unwrap();
                        let n = seen.entry(path.clone()).or_default();
                        *n += 1;
                        *n
                    };
                    let failures = if path.starts_with("/twice/") { 2 } else { 1 };
                    let status = if asked <= failures {
                        503
                    } else {
                        if path.starts_with("/held/") {
                            let _ = tx.send(());
                            release.notified().await;
                        }
                        200
                    };
                    let mut resp = http::Response::new(Empty::<bytes::Bytes>::new());
                    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
            );
        }
    });
    (addr, release, held)
}

/// Envoy's retry circuit breaker (`maxRetries`, or a `retryBudget` whose
/// floor is one): while one retry to the cluster is in flight, another
/// request's retry is not made, and it gets its first answer (503)
/// flagged UO; without a limit it would be retried and answered 200. A
/// request's own retry gives its place back when it is retried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_over_the_clusters_limit_is_not_made() {
    let mesh = Mesh::default();
    let (server, release, mut held) = answers_the_retry().await;
    let limits = [
        ("capped", "connectionPool: {http: {maxRetries: 1}}"),
        (
            "budgeted",
            "retryBudget: {percent: {value: 0}, minRetryConcurrency: 1}",
        ),
    ];
    let configs: Vec<String> = limits
        .iter()
        .map(|(name, limit)| {
            let endpoints = two_endpoints(name, [server, server], "{simple: ROUND_ROBIN}");
            let config = endpoints + &format!("    {limit}\n");
            under_route(name, "retries: {attempts: 2, retryOn: 5xx}", config)
        })
        .collect();
    let dns = dns_for("unused.example.com", 30).await;
    let extra: Vec<&str> = configs.iter().map(String::as_str).collect();
    let sc = sidecar(&mesh, &extra, dns.addr).await;
    let proxy = format!("http://{}", sc.addr(15001));
    for (name, _) in limits {
        let (proxy_a, url) = (
            proxy.clone(),
            format!("http://{name}.example.com:8080/held/{name}"),
        );
        let first = tokio::spawn(async move { curl(&["-x", &proxy_a, &url]).await });
        tokio::time::timeout(Duration::from_secs(10), held.recv())
            .await
            .expect("the first request's retry reaches the server");
        let url = format!("http://{name}.example.com:8080/other/{name}");
        assert_eq!(curl(&["-x", &proxy, &url]).await.code, "503", "{name}");
        assert_eq!(sc.next_log().await["response_flags"], "UO", "{name}");
        release.notify_one();
        assert_eq!(first.await.unwrap().code, "200", "{name}: retried");
        assert_eq!(sc.next_log().await["response_flags"], "-", "{name}");
        let url = format!("http://{name}.example.com:8080/twice/{name}");
        assert_eq!(curl(&["-x", &proxy, &url]).await.code, "200", "{name}");
        assert_eq!(sc.next_log().await["response_flags"], "-", "{name}");
    }
}

/// `retryRemoteLocalities` (Envoy's previous priorities, as Istio sets
/// them: updated every two attempts): a request whose own locality's
/// endpoint hangs up is retried there once, then in the other locality;
/// without it every attempt stays in the client's locality (its one
/// endpoint tried again; three hang-ups do not eject it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_goes_to_another_locality_when_the_policy_says_so() {
    let mesh = Mesh::default();
    let (local, remote) = (hangs_up().await, plain_http().await);
    for (remote_localities, code, flags) in [(true, "200", "-"), (false, "503", "UC,URX")] {
        let retries = format!(
            "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: located, namespace: curl-external-tst}}
spec:
  hosts: [located.example.com]
  http:
  - retries: {{attempts: 2, retryOn: reset, retryRemoteLocalities: {remote_localities}}}
    route: [{{destination: {{host: located.example.com, port: {{number: 8080}}}}}}]
"
        );
        let config = located_ejecting_after(5, local, remote, "") + &retries;
        let spec = Spec::new(
            seed_config_except(&["sidecar.yaml"], &[&config]),
            "curl-external-tst/east-client",
        );
        let sc = TestProxy::start(&mesh, spec).await;
        let proxy = format!("http://{}", sc.addr(15001));
        let got = curl(&["-x", &proxy, "http://located.example.com:8080/"]).await;
        assert_eq!(got.code, code, "retryRemoteLocalities: {remote_localities}");
        let entry = sc.next_log().await;
        assert_eq!(entry["response_flags"], flags, "{entry}");
    }
}

/// `localityLbSetting.distribute`: a client in us-east sends everything
/// to us-west when the DestinationRule says so, its own locality's
/// endpoint notwithstanding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_distribute_sends_traffic_where_the_weights_say() {
    let mesh = Mesh::default();
    let (local, remote) = (plain_http().await, plain_http().await);
    let config = located(
        local,
        remote,
        "loadBalancer: {localityLbSetting: {distribute: [{from: us-east/*, to: {us-west/*: 100}}]}}",
    );
    let spec = Spec::new(
        seed_config_except(&["sidecar.yaml"], &[&config]),
        "curl-external-tst/east-client",
    );
    let sc = TestProxy::start(&mesh, spec).await;
    let proxy = format!("http://{}", sc.addr(15001));
    for _ in 0..6 {
        let got = curl(&["-x", &proxy, "http://located.example.com:8080/"]).await;
        assert_eq!(got.code, "200");
        assert_eq!(sc.next_log().await["upstream_host"], remote.to_string());
    }
}

/// A client pod in us-east/zone-a, and `located.example.com:8080` with an
/// endpoint there (`local`) and one in us-west (`remote`), whose
/// DestinationRule has outlier detection (an endpoint ejected at its
/// first error) and the trafficPolicy line `policy`.
fn located(local: SocketAddr, remote: SocketAddr, policy: &str) -> String {
    located_ejecting_after(1, local, remote, policy)
}

/// The same, ejecting an endpoint after `errors` consecutive errors.
fn located_ejecting_after(
    errors: u32,
    local: SocketAddr,
    remote: SocketAddr,
    policy: &str,
) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: east-client
  namespace: curl-external-tst
  labels: {{app: east-client, istio-locality: us-east.zone-a}}
  annotations: {{sidecar.istio.io/inject: 'true'}}
spec:
  containers: [{{name: app, image: curl}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: located, namespace: curl-external-tst}}
spec:
  hosts: [located.example.com]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {}}}, locality: us-west/zone-b}}
  - {{address: 127.0.0.1, ports: {{http: {}}}, locality: us-east/zone-a}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: located, namespace: curl-external-tst}}
spec:
  host: located.example.com
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: {errors}, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}}
    {policy}
",
        remote.port(),
        local.port()
    )
}
