//! The stand-in for external hosts, as a user's egress scenario uses it:
//! any path answers (an echo of what arrived), a certificate for whatever
//! host a client asks by SNI, an API that wants client certificates, a slow
//! path, and a CA the user already has. Real curl, real TLS.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use meshgate_identity::{CertificateAuthority, SpiffeId};
use meshgate_proxy::standin::{self, HostCert, Seen, StandinCa};
use meshgate_proxy::testing::*;
use serde_json::Value;
use tokio::net::TcpListener;

/// A stand-in answering for any host, with `config`; its address.
async fn serve(config: Arc<rustls::ServerConfig>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(standin::serve_https(listener, config, Seen::default()));
    addr
}

#[tokio::test]
async fn any_path_of_any_host_answers_with_an_echo_the_real_paths_with_their_bodies() {
    let dir = TempDir::new("standin-echo");
    let ca = Arc::new(StandinCa::new("stand-in CA").unwrap());
    let root = dir.write("ca.pem", &ca.root_pem);
    let addr = serve(ca.any_host_config("api.example.com", vec![], None).unwrap()).await;

    let todo = https_get(&root, "jsonplaceholder.typicode.com", 443, addr, "/todos/1").await;
    assert_eq!(todo.answer(), ("200", standin::TODO_1));

    // A host nobody configured: its own certificate, verified by curl.
    let got = curl(&[
        "--cacert",
        &root,
        "--connect-to",
        &format!("made-up.test:443:{}:{}", addr.ip(), addr.port()),
        "-X",
        "POST",
        "-H",
        "x-trace: 42",
        "https://made-up.test/v2/things?limit=3",
    ])
    .await;
    assert_eq!(got.code, "200", "{got:?}");
    let echo: Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/v2/things");
    assert_eq!(echo["query"], "limit=3");
    assert_eq!(echo["headers"]["x-trace"], "42");
    assert_eq!(echo["sni"], "made-up.test");
    assert_eq!(echo["clientCertificate"], Value::Null);

    let teapot = https_get(&root, "made-up.test", 443, addr, "/status/418").await;
    assert_eq!(teapot.code, "418");
}

#[tokio::test]
async fn a_delay_path_answers_late() {
    let dir = TempDir::new("standin-delay");
    let ca = Arc::new(StandinCa::new("stand-in CA").unwrap());
    let root = dir.write("ca.pem", &ca.root_pem);
    let addr = serve(ca.any_host_config("slow.test", vec![], None).unwrap()).await;
    let to = format!("slow.test:443:{}:{}", addr.ip(), addr.port());
    // Not within a second of a 5 s delay (curl gives up: exit 28)...
    let cut = curl(&[
        "--cacert",
        &root,
        "--connect-to",
        &to,
        "--max-time",
        "1",
        "https://slow.test/delay/5000",
    ])
    .await;
    assert_eq!(cut.exit, 28, "{cut:?}");
    // ... and a short delay answers with the echo.
    let got = https_get(&root, "slow.test", 443, addr, "/delay/20").await;
    assert_eq!(got.code, "200");
    assert!(got.body.contains("\"path\": \"/delay/20\""), "{got:?}");
}

#[tokio::test]
async fn an_api_that_wants_client_certificates_refuses_clients_without_one() {
    let dir = TempDir::new("standin-mtls");
    let ca = Arc::new(StandinCa::new("stand-in CA").unwrap());
    let root = dir.write("ca.pem", &ca.root_pem);
    // The clients' CA: a mesh CA, its workload certificate as the client's.
    let clients = CertificateAuthority::generate("cluster.local").unwrap();
    let id = SpiffeId::new("cluster.local", "egress", "gateway").unwrap();
    let issued = clients.issue(&id, Duration::from_secs(3600)).unwrap();
    let cert = dir.write("client.pem", &issued.cert_chain_pem);
    let key = dir.write("client-key.pem", &issued.key_pem);
    let config = ca
        .any_host_config("api.test", vec![], Some(clients.root_pem()))
        .unwrap();
    let addr = serve(config).await;
    let to = format!("api.test:443:{}:{}", addr.ip(), addr.port());

    let without = curl(&["--cacert", &root, "--connect-to", &to, "https://api.test/x"]).await;
    assert_eq!(without.code, "000", "{without:?}");
    assert_ne!(without.exit, 0);

    let with = curl(&[
        "--cacert",
        &root,
        "--cert",
        &cert,
        "--key",
        &key,
        "--connect-to",
        &to,
        "https://api.test/x",
    ])
    .await;
    assert_eq!(with.code, "200", "{with:?}");
    let echo: Value = serde_json::from_str(&with.body).unwrap();
    assert_eq!(
        echo["clientCertificate"]["uriSans"][0],
        "spiffe://cluster.local/ns/egress/sa/gateway"
    );
}

#[tokio::test]
async fn a_users_ca_and_certificates_are_presented() {
    let dir = TempDir::new("standin-given");
    // The user's CA (made here by another stand-in CA, as files).
    let users = StandinCa::new("user's CA").unwrap();
    let (cert_pem, key_pem) = users.server_cert_pem(&["own.test".to_owned()]).unwrap();
    let users_root = dir.write("users.pem", &users.root_pem);
    let ca = Arc::new(StandinCa::new("stand-in CA").unwrap());
    let root = dir.write("ca.pem", &ca.root_pem);
    let given = HostCert::from_pem(vec!["own.test".to_owned()], &cert_pem, &key_pem).unwrap();
    let addr = serve(ca.any_host_config("own.test", vec![given], None).unwrap()).await;

    // own.test presents the given certificate: the user's root verifies it,
    // the stand-in's does not.
    let by_user = https_get(&users_root, "own.test", 443, addr, "/").await;
    assert_eq!(by_user.code, "200", "{by_user:?}");
    let by_standin = https_get(&root, "own.test", 443, addr, "/").await;
    assert_eq!(by_standin.code, "000");
    // Other hosts: the stand-in CA's.
    assert_eq!(
        https_get(&root, "other.test", 443, addr, "/").await.code,
        "200"
    );

    // A stand-in CA from the user's CA files issues what that root trusts.
    let key = issuer_key(&dir);
    let loaded = Arc::new(StandinCa::from_pem(&key.0, &key.1).unwrap());
    let addr = serve(loaded.any_host_config("x.test", vec![], None).unwrap()).await;
    let loaded_root = dir.write("loaded.pem", &key.0);
    assert_eq!(
        https_get(&loaded_root, "x.test", 443, addr, "/").await.code,
        "200"
    );
}

/// A CA certificate and key as PEM, as a user would have them.
fn issuer_key(dir: &TempDir) -> (String, String) {
    let ca = CertificateAuthority::init(
        std::path::Path::new(&dir.path("user-ca")),
        "corp.test",
        false,
    )
    .unwrap();
    let key = std::fs::read_to_string(dir.path("user-ca/root-key.pem")).unwrap();
    (ca.root_pem().to_owned(), key)
}

/// `meshgate stand-in` runs as long as `up` or a benchmark: it answers as
/// any stand-in does and keeps none of the requests (what tests read from
/// `Seen::default`).
#[tokio::test]
async fn an_unrecorded_stand_in_answers_and_keeps_no_request() {
    let dir = TempDir::new("standin-unrecorded");
    let ca = Arc::new(StandinCa::new("stand-in CA").unwrap());
    let root = dir.write("ca.pem", &ca.root_pem);
    let config = ca.any_host_config("api.example.com", vec![], None).unwrap();
    let (kept, unrecorded) = (Seen::default(), Seen::unrecorded());
    let mut addrs = Vec::new();
    for seen in [kept.clone(), unrecorded.clone()] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        tokio::spawn(standin::serve_https(listener, config.clone(), seen));
    }
    for addr in addrs {
        let todo = https_get(&root, "api.example.com", 443, addr, "/todos/1").await;
        assert_eq!(todo.answer(), ("200", standin::TODO_1));
        let echo = https_get(&root, "api.example.com", 443, addr, "/anything").await;
        let echo: Value = serde_json::from_str(echo.answer().1).unwrap();
        assert_eq!(echo["path"], "/anything");
    }
    let paths: Vec<String> = kept.all().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/todos/1", "/anything"]);
    assert_eq!(unrecorded.all(), []);
}
