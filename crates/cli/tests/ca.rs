//! `meshgate ca` as an operator uses it, checked with openssl.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use meshgate_identity::caserver::request_certificate;
use meshgate_identity::{CertificateAuthority, SpiffeId};

fn meshgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(args)
        .output()
        .expect("meshgate runs")
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("meshgate-ca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    fn join(&self, p: &str) -> String {
        self.0.join(p).to_str().unwrap().to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mode(p: &str) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn openssl(args: &[&str]) -> (bool, String) {
    let o = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn init_protects_the_key_and_refuses_to_overwrite() {
    let t = TempDir::new("init");
    let dir = t.join("ca");
    let o = meshgate(&[
        "ca",
        "init",
        "--dir",
        &dir,
        "--trust-domain",
        "corp.example",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(mode(&t.join("ca/root-key.pem")), 0o600);
    let (ok, text) = openssl(&[
        "x509",
        "-in",
        &t.join("ca/root-cert.pem"),
        "-noout",
        "-text",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("CA:TRUE"), "{text}");
    assert!(text.contains("Subject: O = corp.example"), "{text}");
    assert!(text.contains("ASN1 OID: prime256v1"), "ECDSA P-256: {text}");

    let first = std::fs::read(t.join("ca/root-cert.pem")).unwrap();
    let o = meshgate(&["ca", "init", "--dir", &dir]);
    assert_eq!(o.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("a CA already exists here; pass --force"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        std::fs::read(t.join("ca/root-cert.pem")).unwrap(),
        first,
        "nothing was replaced"
    );
    let o = meshgate(&["ca", "init", "--dir", &dir, "--force"]);
    assert!(o.status.success());
    assert_ne!(std::fs::read(t.join("ca/root-cert.pem")).unwrap(), first);
}

#[test]
fn issued_certificates_verify_with_openssl() {
    let t = TempDir::new("issue");
    let ca = t.join("ca");
    assert!(meshgate(&["ca", "init", "--dir", &ca]).status.success());
    let out = t.join("curl");
    let o = meshgate(&[
        "ca",
        "issue",
        "--dir",
        &ca,
        "--spiffe-id",
        "spiffe://cluster.local/ns/curl-external-tst/sa/default",
        "--out",
        &out,
        "--ttl",
        "2h",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
        assert!(Path::new(&out).join(f).exists(), "{f}");
    }
    assert_eq!(mode(&t.join("curl/key.pem")), 0o600);

    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        &t.join("curl/root-cert.pem"),
        &t.join("curl/cert-chain.pem"),
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("cert-chain.pem: OK"), "{text}");

    let (ok, text) = openssl(&[
        "x509",
        "-in",
        &t.join("curl/cert-chain.pem"),
        "-noout",
        "-text",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("X509v3 Subject Alternative Name: critical"),
        "{text}"
    );
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/curl-external-tst/sa/default"),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");

    let (ok, text) = openssl(&[
        "x509",
        "-in",
        &t.join("curl/cert-chain.pem"),
        "-noout",
        "-checkend",
        "7000",
    ]);
    assert!(ok, "valid for the next 7000s: {text}");
    let (ok, _) = openssl(&[
        "x509",
        "-in",
        &t.join("curl/cert-chain.pem"),
        "-noout",
        "-checkend",
        "7500",
    ]);
    assert!(!ok, "expires within 2h (plus nothing more)");

    let o = meshgate(&[
        "ca",
        "issue",
        "--dir",
        &ca,
        "--spiffe-id",
        "spiffe://other.local/ns/a/sa/b",
        "--out",
        &out,
    ]);
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("this CA issues for \"cluster.local\""));
    let o = meshgate(&[
        "ca",
        "issue",
        "--dir",
        &ca,
        "--spiffe-id",
        "cluster.local/ns/a/sa/b",
        "--out",
        &out,
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("must start with spiffe://"));
}

/// A `meshgate ca serve` process, killed on drop.
struct Server(Child, String);

impl Server {
    fn start(dir: &str, tokens: &str) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
            .args([
                "ca",
                "serve",
                "--dir",
                dir,
                "--listen",
                "127.0.0.1:0",
                "--tokens",
                tokens,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().rsplit(' ').next().unwrap().to_owned();
        Server(child, addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn serve_issues_only_the_identity_a_token_grants() {
    let t = TempDir::new("serve");
    let dir = t.join("ca");
    assert!(meshgate(&["ca", "init", "--dir", &dir]).status.success());
    std::fs::write(
        t.join("tokens"),
        "secret-curl curl-external-tst/default\nsecret-gw curl-egress-tst/curl-egress-tst\n",
    )
    .unwrap();
    let server = Server::start(&dir, &t.join("tokens"));
    let root = std::fs::read_to_string(t.join("ca/root-cert.pem")).unwrap();
    let curl: SpiffeId = "spiffe://cluster.local/ns/curl-external-tst/sa/default"
        .parse()
        .unwrap();
    let ttl = Duration::from_secs(3600);

    let (csr, _key) = CertificateAuthority::csr_for(&curl).unwrap();
    let issued = request_certificate(&server.1, "secret-curl", &root, &csr, ttl)
        .await
        .unwrap();
    std::fs::write(t.join("issued.pem"), &issued.cert_chain).unwrap();
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        &t.join("ca/root-cert.pem"),
        &t.join("issued.pem"),
    ]);
    assert!(ok, "{text}");

    let err = request_certificate(&server.1, "secret-gw", &root, &csr, ttl)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("403 Forbidden"),
        "a token for another identity is refused: {err}"
    );

    let (other_csr, _) = CertificateAuthority::csr_for(
        &"spiffe://cluster.local/ns/curl-external-tst/sa/admin"
            .parse()
            .unwrap(),
    )
    .unwrap();
    let err = request_certificate(&server.1, "secret-curl", &root, &other_csr, ttl)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("403 Forbidden") && err.contains("CSR asks for"),
        "a CSR whose SAN does not match is refused: {err}"
    );
    // Not a CSR at all: the request is bad, as docs/ca-protocol.md says.
    let err = request_certificate(&server.1, "secret-curl", &root, "not a CSR", ttl)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("400 Bad Request") && err.contains("bad CSR"),
        "{err}"
    );
}

#[test]
fn ca_errors_say_what_to_do() {
    let t = TempDir::new("ca-hints");
    let (missing, out, ca) = (t.join("no-ca"), t.join("out"), t.join("ca"));
    let id = "spiffe://cluster.local/ns/a/sa/b";
    let o = meshgate(&[
        "ca",
        "issue",
        "--dir",
        &missing,
        "--spiffe-id",
        id,
        "--out",
        &out,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains(&format!(
                "no CA here (make one with `meshgate ca init --dir {missing}`)"
            )),
        "{err}"
    );

    assert!(meshgate(&["ca", "init", "--dir", &ca]).status.success());
    let o = meshgate(&[
        "ca",
        "issue",
        "--dir",
        &ca,
        "--spiffe-id",
        id,
        "--out",
        &out,
        "--ttl",
        "2400h",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("ttl 2400h must be between 1s and 90 days (2160h)"),
        "{err}"
    );

    // Issuing over a certificate (how a mounted folder rotates) says so.
    let issue = || {
        let o = meshgate(&[
            "ca",
            "issue",
            "--dir",
            &ca,
            "--spiffe-id",
            id,
            "--out",
            &out,
        ]);
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(issue().starts_with("issued spiffe://"));
    let again = issue();
    assert!(
        again.starts_with(&format!("replaced the certificate of {id} in {out}")),
        "{again}"
    );
}
