//! `meshgate stand-in` as a user runs it for their own egress scenario:
//! a wildcard host, a certificate the user gives for one name, and an API
//! that wants client certificates.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{Proc, TempDir, curl};

#[test]
fn the_stand_in_answers_any_name_under_a_wildcard_host_and_can_want_client_certificates() {
    use meshgate_identity::{CertificateAuthority, SpiffeId};
    let dir = TempDir::new("standin-cli");
    let root = dir.path("standin-ca.pem");
    // The user's certificate for one name, from their own CA.
    let users = meshgate_proxy::standin::StandinCa::new("user's CA").unwrap();
    let (cert, key) = users
        .server_cert_pem(&["own.example.test".to_owned()])
        .unwrap();
    let (cert_file, key_file, users_root) = (
        dir.path("own.pem"),
        dir.path("own-key.pem"),
        dir.path("users-root.pem"),
    );
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    std::fs::write(&users_root, &users.root_pem).unwrap();
    // Clients must show a certificate of this CA.
    let clients = CertificateAuthority::generate("cluster.local").unwrap();
    let id = SpiffeId::new("cluster.local", "egress", "gateway").unwrap();
    let issued = clients.issue(&id, Duration::from_secs(3600)).unwrap();
    let (client_ca, client_cert, client_key) = (
        dir.path("clients.pem"),
        dir.path("client.pem"),
        dir.path("client-key.pem"),
    );
    std::fs::write(&client_ca, clients.root_pem()).unwrap();
    std::fs::write(&client_cert, &issued.cert_chain_pem).unwrap();
    std::fs::write(&client_key, &issued.key_pem).unwrap();

    let host_cert = format!("own.example.test={cert_file}:{key_file}");
    let standin = Proc::spawn(&[
        "stand-in",
        "--host",
        "*.example.test",
        "--https-listen",
        "127.0.0.1:0",
        "--dns-listen",
        "127.0.0.1:0",
        "--ca-out",
        &root,
        "--host-cert",
        &host_cert,
        "--client-ca",
        &client_ca,
    ]);
    let line = standin.wait_for("stand-in running", Duration::from_secs(10));
    let https = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("https="))
        .unwrap()
        .to_owned();
    let get = |host: &str, ca: &str, with_cert: bool| {
        let to = format!("{host}:443:{https}");
        let url = format!("https://{host}/anything");
        let mut args = vec!["--cacert", ca, "--connect-to", &to];
        if with_cert {
            args.extend(["--cert", &client_cert, "--key", &client_key]);
        }
        args.push(&url);
        curl(&args)
    };
    // Any name under the wildcard, with the client certificate.
    let (body, code, _) = get("a.example.test", &root, true);
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("\"sni\": \"a.example.test\""), "{body}");
    assert!(
        body.contains("spiffe://cluster.local/ns/egress/sa/gateway"),
        "{body}"
    );
    // Without one: refused in the handshake, and logged.
    let (_, code, _) = get("a.example.test", &root, false);
    assert_eq!(code, "000");
    standin.wait_for("refused in the TLS handshake", Duration::from_secs(5));
    // The user's certificate for its name.
    let (body, code, _) = get("own.example.test", &users_root, true);
    assert_eq!(code, "200", "{body}");
    standin.wait_for(
        "stand-in connection sni=own.example.test",
        Duration::from_secs(5),
    );
}
