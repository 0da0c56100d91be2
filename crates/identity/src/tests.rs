//! Real TLS handshakes on loopback for every acceptance and rejection case.

use std::sync::Arc;
use std::time::Duration;

use rcgen::SanType;
use rustls_pki_types::ServerName;
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::SpiffeId;
use crate::ca::testing::custom;
use crate::ca::{CertificateAuthority, DEFAULT_WORKLOAD_TTL};
use crate::caserver::{self, TokenTable};
use crate::source::{Source, WorkloadIdentity};
use crate::tls::{handshake_error_reason, mesh_client_config, mesh_server_config, peer_identity};

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

fn ca() -> Arc<CertificateAuthority> {
    Arc::new(CertificateAuthority::generate("cluster.local").unwrap())
}

fn issued(ca: &CertificateAuthority, who: &SpiffeId) -> Arc<WorkloadIdentity> {
    WorkloadIdentity::fixed(who.clone(), &ca.issue(who, DEFAULT_WORKLOAD_TTL).unwrap())
}

/// Outcome of one handshake plus one echoed line, as each side saw it.
#[derive(Debug)]
struct Outcome {
    server: Result<Option<SpiffeId>, String>,
    client: Result<Option<SpiffeId>, String>,
}

async fn handshake(
    server: &Arc<WorkloadIdentity>,
    client: &Arc<WorkloadIdentity>,
    expect_server: Vec<SpiffeId>,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(mesh_server_config(server, &[]).unwrap());
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| handshake_error_reason(&e))?;
        let peer = peer_identity(tls.get_ref().1.peer_certificates());
        let mut line = String::new();
        BufReader::new(&mut tls)
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(line.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let connector =
        tokio_rustls::TlsConnector::from(mesh_client_config(client, expect_server, &[]).unwrap());
    let client_side = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("outbound_.80_._.svc.ns.svc.cluster.local").unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| handshake_error_reason(&e))?;
        let peer = peer_identity(tls.get_ref().1.peer_certificates());
        tls.write_all(b"ping\n").await.map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&mut tls)
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        if line != "ping\n" {
            return Err(format!("echo broken: {line:?}"));
        }
        Ok(peer)
    };
    let client = tokio::time::timeout(Duration::from_secs(10), client_side)
        .await
        .expect("client finishes");
    let server = tokio::time::timeout(Duration::from_secs(10), server_side)
        .await
        .expect("server finishes")
        .unwrap();
    Outcome { server, client }
}

#[tokio::test]
async fn mutual_tls_exposes_both_identities() {
    let ca = ca();
    let (gw, curl) = (
        id("curl-egress-tst", "curl-egress-tst"),
        id("curl-external-tst", "default"),
    );
    let o = handshake(&issued(&ca, &gw), &issued(&ca, &curl), vec![gw.clone()]).await;
    assert_eq!(o.server, Ok(Some(curl)));
    assert_eq!(o.client, Ok(Some(gw)));
}

#[tokio::test]
async fn server_rejects_bad_client_certificates() {
    let ca = ca();
    let other_ca = CertificateAuthority::generate("cluster.local").unwrap();
    let server_id = id("gw", "gw");
    let server = issued(&ca, &server_id);
    let now = OffsetDateTime::now_utc();
    let uri = |s: &str| SanType::URI(s.try_into().unwrap());
    let hour = time::Duration::hours(1);
    // Signed by another CA, while trusting ours (so only the server objects).
    let mut foreign = other_ca.issue(&id("a", "b"), DEFAULT_WORKLOAD_TTL).unwrap();
    foreign.root_pem = ca.root_pem().to_owned();
    let from_other_ca = WorkloadIdentity::fixed(id("a", "b"), &foreign);
    let cases: Vec<(&str, Arc<WorkloadIdentity>, &str)> = vec![
        ("unknown CA", from_other_ca, "UnknownIssuer"),
        (
            "expired",
            WorkloadIdentity::fixed(
                id("a", "b"),
                &custom(
                    &ca,
                    vec![uri("spiffe://cluster.local/ns/a/sa/b")],
                    now - hour * 3,
                    now - hour,
                ),
            ),
            "Expired",
        ),
        (
            "not yet valid",
            WorkloadIdentity::fixed(
                id("a", "b"),
                &custom(
                    &ca,
                    vec![uri("spiffe://cluster.local/ns/a/sa/b")],
                    now + hour,
                    now + hour * 3,
                ),
            ),
            "NotValidYet",
        ),
        (
            "no URI SAN",
            WorkloadIdentity::fixed(
                id("a", "b"),
                &custom(
                    &ca,
                    vec![SanType::DnsName("a.example.com".try_into().unwrap())],
                    now - hour,
                    now + hour,
                ),
            ),
            "peer certificate has no URI SAN, so no SPIFFE identity",
        ),
        (
            "several URI SANs",
            WorkloadIdentity::fixed(
                id("a", "b"),
                &custom(
                    &ca,
                    vec![
                        uri("spiffe://cluster.local/ns/a/sa/b"),
                        uri("spiffe://cluster.local/ns/c/sa/d"),
                    ],
                    now - hour,
                    now + hour,
                ),
            ),
            "peer certificate has 2 URI SANs (spiffe://cluster.local/ns/a/sa/b, spiffe://cluster.local/ns/c/sa/d); a mesh identity has exactly one",
        ),
        (
            "another trust domain",
            WorkloadIdentity::fixed(
                id("a", "b"),
                &custom(
                    &ca,
                    vec![uri("spiffe://evil.example/ns/a/sa/b")],
                    now - hour,
                    now + hour,
                ),
            ),
            "peer spiffe://evil.example/ns/a/sa/b is in trust domain \"evil.example\", expected \"cluster.local\"",
        ),
    ];
    for (name, client, want) in cases {
        let o = handshake(&server, &client, vec![server_id.clone()]).await;
        let err = o.server.expect_err(name);
        assert!(err.contains(want), "{name}: server said {err}");
        assert!(
            o.client.is_err(),
            "{name}: the client must not get an answer"
        );
    }
}

#[tokio::test]
async fn client_rejects_bad_server_certificates() {
    let ca = ca();
    let other_ca = CertificateAuthority::generate("cluster.local").unwrap();
    let client = issued(&ca, &id("curl-external-tst", "default"));
    let want_id = id("curl-egress-tst", "curl-egress-tst");
    let now = OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let cases: Vec<(&str, Arc<WorkloadIdentity>, &str)> = vec![
        (
            "another identity (secure naming)",
            issued(&ca, &id("curl-egress-tst", "impostor")),
            "peer identity spiffe://cluster.local/ns/curl-egress-tst/sa/impostor is not the expected spiffe://cluster.local/ns/curl-egress-tst/sa/curl-egress-tst",
        ),
        ("unknown CA", issued(&other_ca, &want_id), "UnknownIssuer"),
        (
            "expired",
            WorkloadIdentity::fixed(
                want_id.clone(),
                &custom(
                    &ca,
                    vec![SanType::URI(want_id.to_string().try_into().unwrap())],
                    now - hour * 3,
                    now - hour,
                ),
            ),
            "Expired",
        ),
    ];
    for (name, server, want) in cases {
        let o = handshake(&server, &client, vec![want_id.clone()]).await;
        let err = o.client.expect_err(name);
        assert!(err.contains(want), "{name}: client said {err}");
    }
}

#[tokio::test]
async fn rotation_keeps_open_connections_and_serves_new_certificate() {
    let ca = ca();
    let server_id = id("gw", "gw");
    // A 4s lifetime renews after about 2s.
    let server = WorkloadIdentity::start(
        server_id.clone(),
        Source::InProcess {
            ca: ca.clone(),
            ttl: Duration::from_secs(4),
        },
    )
    .await
    .unwrap();
    let client = issued(&ca, &id("app", "default"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(mesh_server_config(&server, &[]).unwrap());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (r, mut w) = tokio::io::split(tls);
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    // A fresh client config per connection: no TLS session resumption, so
    // every handshake shows the certificate the server presents now.
    let connect = || async {
        let connector = tokio_rustls::TlsConnector::from(
            mesh_client_config(&client, vec![server_id.clone()], &[]).unwrap(),
        );
        let tcp = TcpStream::connect(addr).await.unwrap();
        connector
            .connect(ServerName::try_from("gw").unwrap(), tcp)
            .await
            .unwrap()
    };
    async fn echo(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, msg: &str) -> String {
        tls.write_all(format!("{msg}\n").as_bytes()).await.unwrap();
        let mut line = String::new();
        BufReader::new(tls).read_line(&mut line).await.unwrap();
        line
    }
    let mut long_lived = connect().await;
    let first_cert = long_lived.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(echo(&mut long_lived, "before").await, "before\n");

    let mut generation = server.subscribe();
    let start = *generation.borrow_and_update();
    tokio::time::timeout(Duration::from_secs(10), generation.wait_for(|g| *g > start))
        .await
        .expect("certificate rotated within 10s")
        .unwrap();

    assert_eq!(
        echo(&mut long_lived, "after").await,
        "after\n",
        "the open connection survives rotation"
    );
    let fresh = connect().await;
    let new_cert = fresh.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(
        first_cert, new_cert,
        "a new handshake gets the new certificate"
    );
    assert_eq!(
        peer_identity(Some(&[new_cert])).unwrap().to_string(),
        "spiffe://cluster.local/ns/gw/sa/gw"
    );
}

#[tokio::test]
async fn mounted_files_are_reloaded_when_they_change() {
    let ca = ca();
    let who = id("app", "web");
    let dir = std::env::temp_dir().join(format!("meshgate-files-{}", std::process::id()));
    let first = ca.issue(&who, DEFAULT_WORKLOAD_TTL).unwrap();
    first.write_to(&dir).unwrap();
    let identity = WorkloadIdentity::from_files(dir.clone(), Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(identity.id(), &who);
    let before = identity.certified().unwrap().cert[0].clone();
    let mut generation = identity.subscribe();
    generation.borrow_and_update();
    ca.issue(&who, DEFAULT_WORKLOAD_TTL)
        .unwrap()
        .write_to(&dir)
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), generation.changed())
        .await
        .expect("reloaded")
        .unwrap();
    assert_ne!(identity.certified().unwrap().cert[0], before);
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn ca_server(ca: &Arc<CertificateAuthority>, tokens: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(caserver::serve(
        ca.clone(),
        TokenTable::parse(tokens, "tokens").unwrap(),
        listener,
    ));
    addr
}

#[tokio::test]
async fn ca_server_issues_for_the_token_identity_only() {
    let ca = ca();
    let addr = ca_server(&ca, "# token file\ntok-curl curl-external-tst/default\ntok-gw curl-egress-tst/curl-egress-tst\n").await;
    let curl = id("curl-external-tst", "default");

    let (csr, _key) = CertificateAuthority::csr_for(&curl).unwrap();
    let ok = caserver::request_certificate(
        &addr,
        "tok-curl",
        ca.root_pem(),
        &csr,
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let chain = crate::cert::parse_certs(&ok.cert_chain).unwrap();
    assert_eq!(crate::tls::spiffe_id_of(&chain[0]).unwrap(), curl);
    assert_eq!(ok.root_cert, ca.root_pem());

    // A token for another identity: the gateway's token cannot get curl's certificate.
    let err = caserver::request_certificate(
        &addr,
        "tok-gw",
        ca.root_pem(),
        &csr,
        Duration::from_secs(3600),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("403 Forbidden") && err.contains("the token authorizes only spiffe://cluster.local/ns/curl-egress-tst/sa/curl-egress-tst"), "{err}");

    // A CSR whose SAN does not match the token.
    let (other_csr, _) = CertificateAuthority::csr_for(&id("curl-external-tst", "admin")).unwrap();
    let err = caserver::request_certificate(
        &addr,
        "tok-curl",
        ca.root_pem(),
        &other_csr,
        Duration::from_secs(3600),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("CSR asks for [\"spiffe://cluster.local/ns/curl-external-tst/sa/admin\"]"),
        "{err}"
    );

    let err = caserver::request_certificate(
        &addr,
        "nope",
        ca.root_pem(),
        &csr,
        Duration::from_secs(3600),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("401 Unauthorized") && err.contains("unknown bootstrap token"),
        "{err}"
    );

    // A client trusting another root refuses to talk to this CA at all.
    let other = CertificateAuthority::generate("cluster.local").unwrap();
    let err = caserver::request_certificate(
        &addr,
        "tok-curl",
        other.root_pem(),
        &csr,
        Duration::from_secs(3600),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn proxy_identity_from_ca_server() {
    let ca = ca();
    let addr = ca_server(&ca, "tok curl-external-tst/default\n").await;
    let dir = std::env::temp_dir().join(format!("meshgate-caclient-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), "tok\n").unwrap();
    std::fs::write(dir.join("root.pem"), ca.root_pem()).unwrap();
    let who = id("curl-external-tst", "default");
    let identity = WorkloadIdentity::start(
        who.clone(),
        Source::CaServer {
            addr,
            token_file: dir.join("token"),
            root_cert: dir.join("root.pem"),
            ttl: Duration::from_secs(3600),
        },
    )
    .await
    .unwrap();
    let info = identity.info().unwrap();
    assert_eq!(info.uri_sans, vec![who.to_string()]);
    let life = info.not_after.duration_since(info.not_before).unwrap();
    assert!(
        life >= Duration::from_secs(3600) && life <= Duration::from_secs(3600 + 180),
        "{life:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn workload_certificates_look_like_istiod_ones() {
    let ca = ca();
    let who = id("ns", "sa");
    let issued = ca.issue(&who, DEFAULT_WORKLOAD_TTL).unwrap();
    let der = crate::cert::parse_certs(&issued.cert_chain_pem)
        .unwrap()
        .remove(0);
    let (_, cert) =
        <x509_parser::certificate::X509Certificate<'_> as x509_parser::prelude::FromDer<
            '_,
            x509_parser::error::X509Error,
        >>::from_der(&der)
        .unwrap();
    assert_eq!(cert.subject().iter().count(), 0, "empty subject");
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "SAN is critical");
    assert_eq!(san.value.general_names.len(), 1);
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(life, 24 * 3600 + 120, "24h plus the 2 minute backdate");
    let now = OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        cert.validity().not_before.timestamp() < now - 60,
        "NotBefore is backdated"
    );
    assert!(
        ca.issue(
            &SpiffeId::new("other.local", "ns", "sa").unwrap(),
            DEFAULT_WORKLOAD_TTL
        )
        .is_err()
    );
}

#[test]
fn token_table_errors_name_the_line() {
    let err = TokenTable::parse("good a/b\nbad-line\n", "tokens.txt")
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "tokens.txt:2: wrong number of fields: expected \"<token> <namespace>/<serviceaccount>\""
    );
    let err = TokenTable::parse("t a/b\nt c/d\n", "tokens.txt")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("tokens.txt:2: duplicate token"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_dns_serving_certificate_is_renewed_in_place_at_half_its_lifetime() {
    use crate::source::DnsCert;
    let ca = Arc::new(CertificateAuthority::generate("cluster.local").unwrap());
    let names = vec!["meshgate-control.meshgate-system.svc".to_owned()];
    let ttl = Duration::from_secs(100);
    let cert = DnsCert::start(ca, names.clone(), ttl).unwrap();
    let first = cert.certified();
    assert_eq!(cert.names(), names);

    // Just before half its lifetime: still the first.
    tokio::time::sleep(Duration::from_secs(49)).await;
    assert!(Arc::ptr_eq(&first, &cert.certified()));
    // After it: a new certificate for the same names.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let renewed = cert.certified();
    assert!(!Arc::ptr_eq(&first, &renewed));
    assert_ne!(first.cert[0], renewed.cert[0]);
    let info = crate::cert::CertInfo::parse(&renewed.cert[0]).unwrap();
    assert_eq!(info.dns_sans, names);
}
