//! The sidecar end to end, in network namespaces the test creates: real curl
//! in a workload namespace that knows nothing of the proxy, `meshgate
//! iptables` capture, the sidecar running as uid 1337, and the egress
//! gateway with a stand-in external host in a second namespace.
#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use support::netns::Net;
use support::*;

const HOST: &str = "jsonplaceholder.typicode.com";
const CURL_ID: &str = "spiffe://cluster.local/ns/curl-external-tst/sa/default";
const TODO_1: &str = "{\n  \"userId\": 1,\n  \"id\": 1,\n  \"title\": \"delectus aut autem\",\n  \"completed\": false\n}";

/// A copy of the binary and the config that uid 1337 can read.
struct Setup {
    t: TempDir,
    bin: String,
    config: String,
}

fn setup(name: &str, drop_sidecar_resource: bool) -> Setup {
    setup_with(name, drop_sidecar_resource, &[])
}

fn setup_with(name: &str, drop_sidecar_resource: bool, extra: &[(&str, &str)]) -> Setup {
    let t = TempDir::new(name);
    std::fs::set_permissions(&t.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = t.path("meshgate");
    std::fs::copy(support::bin(), &bin).unwrap();
    let config = t.path("config");
    std::fs::create_dir_all(&config).unwrap();
    for e in std::fs::read_dir(repo_root().join("examples/seed")).unwrap() {
        let p = e.unwrap().path();
        let keep = p.extension().is_some_and(|x| x == "yaml")
            && !(drop_sidecar_resource && p.ends_with("sidecar.yaml"));
        if keep {
            std::fs::copy(
                &p,
                std::path::Path::new(&config).join(p.file_name().unwrap()),
            )
            .unwrap();
        }
    }
    for (file, text) in extra {
        std::fs::write(std::path::Path::new(&config).join(file), text).unwrap();
    }
    assert!(
        meshgate(&["ca", "init", "--dir", &t.path("ca")])
            .status
            .success()
    );
    // The sidecar's certificate, readable by uid 1337 (Istio's mounted layout).
    let o = meshgate(&[
        "ca",
        "issue",
        "--dir",
        &t.path("ca"),
        "--spiffe-id",
        CURL_ID,
        "--out",
        &t.path("curl-certs"),
    ]);
    assert!(o.status.success());
    let o = std::process::Command::new("chown")
        .args(["-R", "1337:1337", &t.path("curl-certs")])
        .output()
        .unwrap();
    assert!(o.status.success());
    Setup { t, bin, config }
}

struct World {
    net: Net,
    _standin: Proc,
    gateway: Proc,
    sidecar: Proc,
    nat_before: String,
}

/// Starts the stand-in and a gateway in the gw namespace and the sidecar in
/// the app namespace; `gateway_args` picks the gateway workload.
fn world(s: &Setup, gateway_args: &[&str]) -> World {
    let net = Net::new();
    let (gw_ip, world_ip, http_ip) = (net.ip(2), net.ip(3), net.ip(101));
    net.hosts_file(
        &net.app,
        &format!(
            "127.0.0.1 localhost\n{} {HOST}\n{} unregistered.example.com\n{http_ip} plain.example.com\n{} api.example.com\n",
            net.ip(100),
            net.ip(102),
            net.ip(103)
        ),
    );
    let standin_ca = s.t.path("standin-ca.pem");
    let standin = Proc::spawn_argv(&[
        "ip",
        "netns",
        "exec",
        &net.gw,
        &s.bin,
        "stand-in",
        "--host",
        HOST,
        "--host",
        "api.example.com",
        "--https-listen",
        &format!("{world_ip}:443"),
        "--dns-listen",
        &format!("{world_ip}:53"),
        "--http-listen",
        &format!("{http_ip}:80"),
        "--http-listen",
        &format!("{http_ip}:8080"),
        "--ca-out",
        &standin_ca,
    ]);
    standin.wait_for("stand-in running", Duration::from_secs(10));

    let ca_dir = s.t.path("ca");
    let dns = format!("{world_ip}:53");
    let mut gw_argv = vec![
        "ip",
        "netns",
        "exec",
        &net.gw,
        &s.bin,
        "gateway",
        "--config",
        &s.config,
        "--ca-dir",
        &ca_dir,
        "--dns-server",
        &dns,
        "--extra-roots",
        &standin_ca,
        "--bind-address",
        &gw_ip,
        "--admin-address",
        &gw_ip,
    ];
    gw_argv.extend_from_slice(gateway_args);
    let gateway = Proc::spawn_argv(&gw_argv);
    gateway.wait_for("egress gateway running", Duration::from_secs(20));

    // The gateway Service's endpoint, as Kubernetes would give it.
    let endpoints = s.t.path("endpoints");
    std::fs::write(
        &endpoints,
        format!("curl-egress-tst.curl-egress-tst.svc.cluster.local:80 {gw_ip}:80\n"),
    )
    .unwrap();

    let nat_before = net.nat_table(&net.app);
    net.exec_ok(&net.app, &[&s.bin, "iptables"]);
    // Idempotent: a second install leaves the same rules.
    let installed = net.nat_table(&net.app);
    net.exec_ok(&net.app, &[&s.bin, "iptables"]);
    assert_eq!(net.nat_table(&net.app), installed);
    let sidecar = start_sidecar(
        s,
        &net.app,
        &["--endpoints", &endpoints, "--dns-server", &dns],
    );
    sidecar.wait_for("sidecar running", Duration::from_secs(20));
    World {
        net,
        _standin: standin,
        gateway,
        sidecar,
        nat_before,
    }
}

impl World {
    /// curl inside the app namespace, as root (not uid 1337: captured).
    fn curl(&self, args: &[&str]) -> (String, String, i32) {
        let mut argv = vec!["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}"];
        argv.extend_from_slice(args);
        let o = self.net.exec(&self.net.app, &argv);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
        (
            body.to_owned(),
            code.to_owned(),
            o.status.code().unwrap_or(-1),
        )
    }

    /// Scrapes from inside a namespace until a metric reaches `want`
    /// (reports are written as a response or connection ends). Bounded.
    fn metrics_until(
        &self,
        ns: &str,
        url: &str,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
    ) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.net.exec_ok(ns, &["curl", "-sS", url]);
            if metric_value(&text, name, labels) == Some(want) {
                return text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name}{labels:?} never reached {want}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn sidecar_metrics_until(&self, name: &str, labels: &[(&str, &str)], want: f64) -> String {
        self.metrics_until(
            &self.net.app,
            "http://127.0.0.1:15090/stats/prometheus",
            name,
            labels,
            want,
        )
    }

    fn gateway_metrics(&self) -> String {
        self.net.exec_ok(
            &self.net.gw,
            &[
                "curl",
                "-sS",
                &format!("http://{}:15020/stats/prometheus", self.net.ip(2)),
            ],
        )
    }

    fn logs(&self) -> String {
        format!(
            "sidecar:\n{}\ngateway:\n{}",
            self.sidecar.log.lock().unwrap().join("\n"),
            self.gateway.log.lock().unwrap().join("\n")
        )
    }
}

#[test]
#[cfg_attr(
    not_root,
    ignore = "needs root: network namespaces and iptables (CI runs as root)"
)]
fn captured_curl_reaches_the_gateway_over_mtls() {
    let s = setup("sidecar-seed", false);
    let w = world(
        &s,
        &["--workload", "curl-egress-tst/curl-egress-tst-gateway"],
    );

    // The workload knows nothing of the proxy: plain HTTP to the external host.
    let (body, code, _) = w.curl(&[&format!("http://{HOST}/todos/1")]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", TODO_1),
        "{}",
        w.logs()
    );

    // Sidecar to gateway is HTTP/2 inside mutual TLS (meshgate peers
    // multiplex by default, see the README); the gateway's access log
    // names the caller.
    w.gateway
        .wait_for("\"GET /todos/1 HTTP/2\" 200", Duration::from_secs(10));
    let gw_log = w.gateway.stdout_lines();
    assert!(
        gw_log
            .iter()
            .any(|l| l.contains("\"GET /todos/1 HTTP/2\" 200") && l.ends_with(CURL_ID)),
        "{gw_log:?}"
    );
    // REGISTRY_ONLY: an unregistered host gets 502, a raw TCP port is closed.
    let (_, code, _) = w.curl(&["http://unregistered.example.com/"]);
    assert_eq!(code, "502");
    let raw = w.net.exec(
        &w.net.app,
        &[
            "bash",
            "-c",
            &format!(
                "exec 3<>/dev/tcp/{}/9999 && echo connected; (echo hello >&3) 2>/dev/null; data=$(timeout 5 cat <&3 2>/dev/null); echo \"received=[$data] rc=$?\"",
                w.net.ip(102)
            ),
        ],
    );
    let out = String::from_utf8_lossy(&raw.stdout);
    // Accepted (the redirect reached the sidecar), then closed with nothing
    // sent back; `timeout` would exit 124 if the connection stayed open.
    assert!(out.starts_with("connected\nreceived=[] rc="), "{out}");
    assert!(
        !out.contains("rc=124"),
        "the connection was left open: {out}"
    );
    // Cleanup leaves the nat table as it was.
    drop(w.sidecar);
    w.net
        .exec_ok(&w.net.app, &[&s.bin, "iptables", "--cleanup"]);
    assert_eq!(w.net.nat_table(&w.net.app), w.nat_before);
}

#[test]
#[cfg_attr(
    not_root,
    ignore = "needs root: network namespaces and iptables (CI runs as root)"
)]
fn allow_any_passes_unknown_hosts_through() {
    let s = setup("sidecar-allow-any", true);
    let w = world(
        &s,
        &["--workload", "curl-egress-tst/curl-egress-tst-gateway"],
    );
    // Port 80 has HTTP services in the registry: Istio's `allow_any` route.
    let (body, code, _) = w.curl(&["http://plain.example.com/todos/1"]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", TODO_1),
        "{}",
        w.logs()
    );
    // Port 8080 has nothing: the whole connection goes through, as TCP.
    let (body, code, _) = w.curl(&["http://plain.example.com:8080/todos/1"]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", TODO_1),
        "{}",
        w.logs()
    );
    let sm = w.sidecar_metrics_until(
        "istio_tcp_connections_opened_total",
        &[("destination_service_name", "PassthroughCluster")],
        1.0,
    );
    assert_eq!(
        metric_value(
            &sm,
            "istio_requests_total",
            &[
                ("destination_service_name", "PassthroughCluster"),
                ("response_code", "200")
            ]
        ),
        Some(1.0),
        "{sm}"
    );
    assert_eq!(
        metric_value(
            &sm,
            "istio_tcp_connections_opened_total",
            &[("destination_service_name", "PassthroughCluster")]
        ),
        Some(1.0),
        "{sm}"
    );
    // The mesh route still goes through the gateway.
    let (body, code, _) = w.curl(&[&format!("http://{HOST}/todos/1")]);
    assert_eq!((code.as_str(), body.as_str()), ("200", TODO_1));
}

#[test]
#[cfg_attr(
    not_root,
    ignore = "needs root: network namespaces and iptables (CI runs as root)"
)]
fn sidecar_refuses_a_gateway_with_another_identity() {
    let s = setup("sidecar-impostor", false);
    // A gateway workload the config does not describe, with another service
    // account: it presents spiffe://cluster.local/ns/curl-egress-tst/sa/impostor.
    let w = world(
        &s,
        &[
            "--workload",
            "curl-egress-tst/impostor",
            "--labels",
            "istio=egressgateway",
            "--service-account",
            "impostor",
        ],
    );
    let (body, code, _) = w.curl(&[&format!("http://{HOST}/todos/1")]);
    assert_eq!(code, "503", "{body}");
    assert!(
        body.contains(
            "is not the expected spiffe://cluster.local/ns/curl-egress-tst/sa/curl-egress-tst"
        ),
        "{body}"
    );
    assert!(!body.contains("delectus"));
    let gm = w.gateway_metrics();
    assert!(
        metric_value(
            &gm,
            "meshgate_egress_requests_total",
            &[("response_code", "200")]
        )
        .is_none(),
        "nothing got through: {gm}"
    );
}

#[test]
#[cfg_attr(
    not_root,
    ignore = "needs root: network namespaces and iptables (CI runs as root)"
)]
fn tls_from_the_app_is_routed_by_sni() {
    let s = setup_with(
        "sidecar-tls",
        false,
        &[(
            "api-serviceentry.yaml",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: curl-external-tst}\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: plain-tcp, namespace: curl-external-tst}\nspec:\n  hosts: [plain.example.com]\n  ports: [{number: 8080, name: tcp, protocol: TCP}]\n  resolution: NONE\n",
        )],
    );
    let w = world(
        &s,
        &["--workload", "curl-egress-tst/curl-egress-tst-gateway"],
    );
    let ca = s.t.path("standin-ca.pem");
    // The application's own TLS, end to end through the sidecar (passthrough).
    let (body, code, _) = w.curl(&["--cacert", &ca, "https://api.example.com/todos/1"]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", TODO_1),
        "{}",
        w.logs()
    );
    // REGISTRY_ONLY: TLS to a host that is not registered gets no connection.
    let (_, code, exit) = w.curl(&["--cacert", &ca, "https://unregistered.example.com/"]);
    assert_eq!(code, "000");
    assert!(
        exit == 35 || exit == 56,
        "TLS handshake failed or reset: curl exit {exit}"
    );
    let sm = w.sidecar_metrics_until(
        "istio_tcp_connections_closed_total",
        &[("destination_service_name", "api.example.com")],
        1.0,
    );
    assert_eq!(
        metric_value(
            &sm,
            "istio_tcp_connections_opened_total",
            &[("destination_service_name", "api.example.com")]
        ),
        Some(1.0),
        "{sm}"
    );
}

/// Inbound capture in a network namespace: istio-init's inbound rules
/// (`iptables --inbound-ports '*'`) redirect a connection from another
/// namespace to the application's port into the sidecar's 15006, which
/// sends it on to the application from 127.0.0.6 (not captured again).
#[test]
#[cfg_attr(
    not_root,
    ignore = "needs root: network namespaces and iptables (CI runs as root)"
)]
fn inbound_capture_in_a_namespace_reaches_the_application() {
    let s = setup("inbound", false);
    let net = Net::new();
    let app_ip = net.ip(1);
    let http = format!("{app_ip}:8080");
    let app = Proc::spawn_argv(&[
        "ip",
        "netns",
        "exec",
        &net.app,
        &s.bin,
        "stand-in",
        "--https-listen",
        "127.0.0.1:8443",
        "--dns-listen",
        "127.0.0.1:5353",
        "--http-listen",
        &http,
    ]);
    app.wait_for("stand-in running", Duration::from_secs(10));
    net.exec_ok(&net.app, &[&s.bin, "iptables", "--inbound-ports", "*"]);
    let sidecar = start_sidecar(&s, &net.app, &["--inbound-port", "15006"]);
    sidecar.wait_for("inbound listener bound", Duration::from_secs(20));
    sidecar.wait_for("sidecar running", Duration::from_secs(20));
    // From the other namespace, plaintext: PERMISSIVE, no policy here.
    let code = net.exec_ok(
        &net.gw,
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{http}/hello"),
        ],
    );
    assert_eq!(code, "200");
    // It went through the sidecar, on to the application's address.
    let line = sidecar.wait_for(&format!("\"{http}\""), Duration::from_secs(10));
    assert!(line.contains("- - -"), "a TCP access-log line: {line}");
}

/// curl-test's sidecar in namespace `ns`, as uid 1337 (its own traffic is
/// not captured), with its certificate and `extra` flags.
fn start_sidecar(s: &Setup, ns: &str, extra: &[&str]) -> Proc {
    let certs = s.t.path("curl-certs");
    let mut argv = vec![
        "ip",
        "netns",
        "exec",
        ns,
        "setpriv",
        "--reuid=1337",
        "--regid=1337",
        "--clear-groups",
        &s.bin,
        "sidecar",
        "--config",
        &s.config,
        "--workload",
        "curl-external-tst/curl-test",
        "--cert-dir",
        &certs,
        "--admin-address",
        "127.0.0.1",
    ];
    argv.extend_from_slice(extra);
    Proc::spawn_argv(&argv)
}
