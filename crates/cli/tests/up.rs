//! `meshgate up` end to end, as a user runs it: the seed system (plus a test
//! overlay with a workload in another namespace) with stand-ins for the
//! external host, checked through its own output, metrics and namespaces,
//! then stopped with SIGTERM.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::*;

const CURL_ID: &str = "spiffe://cluster.local/ns/curl-external-tst/sa/default";

/// Another namespace's curl loop: the gateway's policy must refuse it.
const OVERLAY: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: other-tst
  labels: {istio-injection: enabled}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: other-curl, namespace: other-tst}
spec:
  selector: {matchLabels: {app: other-curl}}
  template:
    metadata: {labels: {app: other-curl}}
    spec:
      containers:
      - name: curl
        image: curlimages/curl
        command: [/bin/sh]
        args: [-c, 'while true; do curl -s http://jsonplaceholder.typicode.com/todos/1; echo; sleep 5; done']
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: plain-curl, namespace: other-tst}
spec:
  selector: {matchLabels: {app: plain-curl}}
  template:
    metadata:
      labels: {app: plain-curl}
      annotations: {sidecar.istio.io/inject: 'false'}
    spec:
      containers:
      - name: curl
        image: curlimages/curl
        command: [/bin/sh]
        args: [-c, 'while true; do echo \"plain-by-name $(curl -s -H \"Host: jsonplaceholder.typicode.com\" http://curl-egress-tst.curl-egress-tst/todos/1)\"; sleep 5; done']
";

/// The parts table `up` prints: part → (address, metrics URL, ready URL).
fn parts_table(lines: &[String]) -> HashMap<String, (String, String, String)> {
    let mut out = HashMap::new();
    for l in lines {
        let Some(rest) = l.strip_prefix("meshgate up") else {
            continue;
        };
        let cols: Vec<&str> = rest
            .trim_start_matches([' ', '|'])
            .split_whitespace()
            .collect();
        if cols.len() == 5 && cols[3].starts_with("http://") {
            out.insert(
                cols[0].to_owned(),
                (cols[1].to_owned(), cols[3].to_owned(), cols[4].to_owned()),
            );
        }
    }
    out
}

fn netns_of(lines: &[String], key: &str) -> Option<String> {
    lines.iter().find_map(|l| {
        let rest = l.split(" | netns ").nth(1)?;
        let (ns, k) = rest.split_once(": ")?;
        (k == key).then(|| ns.to_owned())
    })
}

fn count(lines: &[String], prefix: &str, needle: &str) -> usize {
    lines
        .iter()
        .filter(|l| l.starts_with(prefix) && l.contains(needle))
        .count()
}

fn get(url: &str) -> (String, String) {
    let (body, code, _) = curl(&[url]);
    (code, body)
}

#[test]
#[cfg_attr(
    not_root,
    ignore = "needs root: network namespaces and iptables (CI runs as root)"
)]
fn up_runs_the_seed_system_and_cleans_up() {
    let t = TempDir::new("up");
    std::fs::write(t.path("overlay.yaml"), OVERLAY).unwrap();
    let up = Proc::spawn(&["up", &seed(), &t.path("overlay.yaml"), "--stand-in"]);
    up.wait_for("namespace mode", Duration::from_secs(10));
    up.wait_for("all parts running", Duration::from_secs(60));
    let pid = up.child.id();

    // The curl loop prints the JSON within seconds, through the whole chain.
    up.wait_for("\"title\": \"delectus aut autem\"", Duration::from_secs(15));
    // An uninjected workload resolves the gateway's Service by its short
    // name, as in a pod; without a mesh identity the gateway refuses it.
    let plain = up.wait_for("plain-by-name", Duration::from_secs(15));
    assert!(
        plain.starts_with("plain-curl") && plain.ends_with("plain-by-name RBAC: access denied"),
        "{plain}"
    );
    up.wait_for("RBAC: access denied", Duration::from_secs(15));
    let lines = up.stdout_lines();
    assert!(
        lines.iter().any(|l| l.starts_with("stand-in")
            && l.contains("stand-in request sni=jsonplaceholder.typicode.com ")),
        "the stand-in saw TLS with SNI jsonplaceholder.typicode.com from the gateway"
    );
    let table = parts_table(&lines);
    let (_, gw_metrics, gw_ready) = table
        .get("curl-egress-tst-gateway")
        .expect("gateway row")
        .clone();
    let (_, sc_metrics, sc_ready) = table.get("curl-test-sidecar").expect("sidecar row").clone();
    for url in [&gw_ready, &sc_ready] {
        assert_eq!(get(url).0, "200", "{url}");
    }
    proxy_config_reads_the_parts(pid);

    // Counts match the curl runs: poll (bounded) until the metrics have
    // caught up with the runs printed so far.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (runs, sidecar_200, egress_allow, gateway_200) = loop {
        let lines = up.stdout_lines();
        let runs = count(&lines, "curl-test ", "\"title\": \"delectus aut autem\"");
        let sm = get(&sc_metrics).1;
        let gm = get(&gw_metrics).1;
        let sidecar_200 = metric_value(
            &sm,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("source_workload", "curl-test"),
                ("source_principal", CURL_ID),
                ("response_code", "200"),
            ],
        )
        .unwrap_or(0.0) as usize;
        let egress_allow = metric_value(
            &gm,
            "meshgate_egress_requests_total",
            &[
                ("source_principal", CURL_ID),
                ("connection_security_policy", "mutual_tls"),
                ("decision", "allow"),
                ("response_code", "200"),
            ],
        )
        .unwrap_or(0.0) as usize;
        let gateway_200 = metric_value(
            &gm,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("source_workload", "curl-egress-tst-gateway"),
                ("destination_service_name", "jsonplaceholder.typicode.com"),
                ("response_code", "200"),
            ],
        )
        .unwrap_or(0.0) as usize;
        if runs >= 1 && runs == sidecar_200 && runs == egress_allow && runs == gateway_200 {
            break (runs, sidecar_200, egress_allow, gateway_200);
        }
        assert!(
            Instant::now() < deadline,
            "runs {runs}, sidecar {sidecar_200}, gateway egress {egress_allow}, gateway requests {gateway_200}\n{sm}\n{gm}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(runs >= 1 && sidecar_200 == runs && egress_allow == runs && gateway_200 == runs);

    // `up` says how to send one's own request as the workload; it works.
    let lines = up.stdout_lines();
    let hint = lines
        .iter()
        .find_map(|l| {
            l.split_once("try, as curl-external-tst/curl-test: sudo ")
                .map(|(_, c)| c.to_owned())
        })
        .expect("a try line");
    let argv: Vec<&str> = hint.split_whitespace().collect();
    assert_eq!(argv[..3], ["ip", "netns", "exec"], "{hint}");
    let o = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .args(["-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "200", "{hint}");

    // The other namespace's calls are attributed and denied.
    let gm = get(&gw_metrics).1;
    assert!(
        metric_value(
            &gm,
            "meshgate_egress_requests_total",
            &[
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/other-tst/sa/default"
                ),
                ("decision", "deny"),
                ("response_code", "403")
            ]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{gm}"
    );
    // Both proxies' metrics pass promtool.
    for url in [&gw_metrics, &sc_metrics] {
        let (ok, report) = promtool_check(&get(url).1);
        assert!(ok, "{url}: {report}");
    }

    // REGISTRY_ONLY: curl-test to an unregistered host gets 502 (offline,
    // `up`'s DNS resolves any name, so the name needs no --resolve).
    let ns = netns_of(&lines, "curl-external-tst/curl-test").expect("curl-test's namespace");
    let o = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .arg("http://unregistered.example.com/")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "502");
    exec_runs_as_the_workload(pid);

    // SIGTERM: everything `up` created goes away.
    stop(up);
    let tag = format!("mgup-{pid:x}");
    let netns = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(!netns.contains(&tag), "namespaces left: {netns}");
    assert!(!std::path::Path::new(&format!("/etc/netns/{tag}-3")).exists());
    let links = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["link"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        !links.contains(&format!("mgh{pid:x}")),
        "host veth left: {links}"
    );
    let run_dir = std::env::temp_dir().join(format!("meshgate-up-{pid}"));
    assert!(!run_dir.exists(), "run folder left");
    // Every process `up` starts carries MESHGATE_UP=<its pid>.
    let marker = format!("MESHGATE_UP={pid}\0");
    let mut leftovers = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(env) = std::fs::read(e.path().join("environ"))
            && String::from_utf8_lossy(&env).contains(&marker)
        {
            leftovers.push(
                std::fs::read_to_string(e.path().join("cmdline"))
                    .unwrap_or_default()
                    .replace('\0', " "),
            );
        }
    }
    assert!(leftovers.is_empty(), "processes left: {leftovers:?}");
}

/// SIGTERM, then waits (bounded) for `up` to exit 0.
fn stop(mut up: Proc) {
    let pid = up.child.id();
    let o = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match up.child.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success(), "up exits 0 on SIGTERM: {status}");
                return;
            }
            None => {
                assert!(Instant::now() < deadline, "up did not stop");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
#[cfg_attr(
    not_root,
    ignore = "needs root: network namespaces and iptables (CI runs as root)"
)]
fn up_runs_istios_mutual_tls_egress_recipe_through_the_gateway_services_target_ports() {
    // examples/istio-mutual-egress: the gateway's Service maps 443 to the
    // container port named https (8443); the sidecar reaches it there with
    // ISTIO_MUTUAL and SNI, the gateway originates TLS to the stand-in.
    let example = support::repo_root().join("examples/istio-mutual-egress");
    let up = Proc::spawn(&["up", example.to_str().unwrap(), "--stand-in"]);
    up.wait_for("namespace mode", Duration::from_secs(10));
    up.wait_for("all parts running", Duration::from_secs(60));
    up.wait_for("\"title\": \"delectus aut autem\"", Duration::from_secs(15));
    let gateway_log = up.wait_for(
        "outbound|443||jsonplaceholder.typicode.com",
        Duration::from_secs(15),
    );
    // The gateway took it on 8443 from the workload's mesh identity.
    assert!(
        gateway_log.starts_with("egressgateway")
            && gateway_log.contains(":8443 ")
            && gateway_log.contains("spiffe://cluster.local/ns/app/sa/default"),
        "{gateway_log}"
    );
    stop(up);
}

#[test]
fn up_in_loopback_mode_uses_the_sidecar_as_an_explicit_proxy() {
    let up = Proc::spawn(&["up", &seed(), "--stand-in", "--loopback"]);
    up.wait_for(
        "loopback mode (--loopback was given)",
        Duration::from_secs(10),
    );
    up.wait_for("all parts running", Duration::from_secs(60));
    let pid = up.child.id();
    up.wait_for("\"title\": \"delectus aut autem\"", Duration::from_secs(15));
    let lines = up.stdout_lines();
    let table = parts_table(&lines);
    let (addr, sc_metrics, _) = table.get("curl-test-sidecar").expect("sidecar row").clone();
    assert!(
        addr.starts_with("127.0.0.1:"),
        "the explicit proxy's port: {addr}"
    );
    proxy_config_reads_the_parts(pid);
    exec_runs_as_the_workload(pid);
    // `up`'s own CA logs with the same prefix as every part.
    assert!(
        up.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("meshgate up") && l.contains("certificate issued")),
        "{:?}",
        up.log.lock().unwrap()
    );
    // On loopback the hint is the sidecar as an explicit proxy.
    assert!(
        lines.iter().any(|l| l
            .contains("try, as curl-external-tst/curl-test: curl -sS -x http://127.0.0.1:")
            && l.ends_with(" http://jsonplaceholder.typicode.com/")),
        "{lines:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sm = get(&sc_metrics).1;
        let n = metric_value(
            &sm,
            "istio_requests_total",
            &[("source_workload", "curl-test"), ("response_code", "200")],
        );
        if n.is_some_and(|n| n >= 1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "{sm}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let mut up = up;
    let status = up.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        !std::env::temp_dir()
            .join(format!("meshgate-up-{pid}"))
            .exists()
    );
}

#[test]
fn up_sends_an_external_host_to_the_users_own_server() {
    // The user's server for jsonplaceholder: a stand-in of its own, with
    // its own CA, on a loopback port.
    let t = TempDir::new("up-external");
    let own_ca = t.path("own-ca.pem");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let https = format!("127.0.0.1:{port}");
    let own = Proc::spawn(&[
        "stand-in",
        "--host",
        "jsonplaceholder.typicode.com",
        "--https-listen",
        &https,
        "--dns-listen",
        "127.0.0.1:0",
        "--ca-out",
        &own_ca,
    ]);
    own.wait_for("stand-in running", Duration::from_secs(10));

    let external = format!("jsonplaceholder.typicode.com:443={https}");
    let up = Proc::spawn(&[
        "up",
        &seed(),
        "--stand-in",
        "--loopback",
        "--external",
        &external,
        "--external-ca",
        &own_ca,
    ]);
    up.wait_for("all parts running", Duration::from_secs(60));
    up.wait_for("\"title\": \"delectus aut autem\"", Duration::from_secs(15));
    // The user's server answered it.
    own.wait_for(
        "stand-in request sni=jsonplaceholder.typicode.com",
        Duration::from_secs(5),
    );
    stop(up);
}

/// `meshgate proxy-config` finds the parts of the running `up` by name
/// (in their network namespaces, or on loopback) and reads what they run:
/// the gateway's upstream endpoint (the stand-in, after requests went
/// through), the sidecar's cluster to the gateway and its certificate.
fn proxy_config_reads_the_parts(pid: u32) {
    let up = pid.to_string();
    let text = |args: &[&str]| {
        let out = meshgate(&[args, &["--up", &up]].concat());
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let endpoints = text(&["proxy-config", "endpoint", "curl-egress-tst-gateway"]);
    assert!(
        endpoints.contains("outbound|443||jsonplaceholder.typicode.com")
            && endpoints.contains("HEALTHY"),
        "{endpoints}"
    );
    let clusters = text(&["proxy-config", "cluster", "curl-test-sidecar"]);
    assert!(
        clusters.contains("outbound|80||curl-egress-tst.curl-egress-tst.svc.cluster.local"),
        "{clusters}"
    );
    let secret = text(&["proxy-config", "secret", "curl-test-sidecar"]);
    assert!(
        secret.contains("Cert Chain") && secret.contains("ACTIVE") && secret.contains("true"),
        "{secret}"
    );
    let unknown = meshgate(&["proxy-config", "cluster", "no-such-part", "--up", &up]);
    assert!(!unknown.status.success());
}

/// `meshgate exec` sends a request as the workload, through its sidecar
/// and the gateway, and exits with the command's code.
fn exec_runs_as_the_workload(pid: u32) {
    let up = pid.to_string();
    let out = meshgate(&[
        "exec",
        "--up",
        &up,
        "curl-test",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "10",
        "http://jsonplaceholder.typicode.com/todos/1",
    ]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.contains("delectus aut autem"),
        "{out:?}"
    );
    let failed = meshgate(&["exec", "--up", &up, "curl-test", "--", "sh", "-c", "exit 7"]);
    assert_eq!(failed.status.code(), Some(7));
}
