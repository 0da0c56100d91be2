//! The `meshgate` binary as a user runs it: `check` and `config-dump` on the
//! seed example and on broken input, with exit codes and exact output lines.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn meshgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("meshgate runs")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A scratch folder with the seed files and extra files, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn with_seed(name: &str, extra: &[(&str, &str)]) -> Scratch {
        let dir = std::env::temp_dir().join(format!("meshgate-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(repo_root().join("examples/seed")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
            }
        }
        for (file, text) in extra {
            std::fs::write(dir.join(file), text).unwrap();
        }
        Scratch(dir)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn check_seed_reports_ca_warning_summary_and_exits_zero() {
    let o = meshgate(&["check", "examples/seed"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "Warning [IST0128] (DestinationRule curl-egress-tst/jsonplaceholder-tls-origination destintionrule.yaml:1) DestinationRule curl-egress-tst/jsonplaceholder-tls-origination in namespace curl-egress-tst has TLS mode set to SIMPLE but no caCertificates are set to validate server identity for host: jsonplaceholder.typicode.com"
    );
    assert_eq!(lines.len(), 2, "{out}");
    for part in [
        "2 namespaces",
        "2 workloads",
        "1 ServiceEntry",
        "2 VirtualServices",
        "1 DestinationRule",
        "1 Gateway",
        "1 Sidecar",
        "1 AuthorizationPolicy",
    ] {
        assert!(
            lines[1].contains(part),
            "summary lacks {part}: {}",
            lines[1]
        );
    }
}

#[test]
fn check_json_output() {
    let o = meshgate(&["check", "examples/seed", "--output", "json"]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    let arr = v.as_array().expect("an array of messages");
    assert_eq!(arr.len(), 1);
    assert_eq!(arr[0]["code"], "IST0128");
    assert_eq!(arr[0]["level"], "Warning");
    assert_eq!(
        arr[0]["origin"],
        "DestinationRule curl-egress-tst/jsonplaceholder-tls-origination"
    );
    assert_eq!(arr[0]["reference"], "destintionrule.yaml:1");
    assert!(
        stderr(&o).contains("2 namespaces"),
        "summary on stderr keeps stdout pure JSON"
    );
}

#[test]
fn check_single_files_names_them_as_given() {
    let o = meshgate(&[
        "check",
        "examples/seed/destintionrule.yaml",
        "examples/seed/serviceentry.yaml",
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("(DestinationRule curl-egress-tst/jsonplaceholder-tls-origination examples/seed/destintionrule.yaml:1)"));
}

#[test]
fn malformed_yaml_exits_three_with_file_line_column() {
    let s = Scratch::with_seed(
        "malformed",
        &[(
            "broken.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: [oops\n",
        )],
    );
    let o = meshgate(&["check", s.path()]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(
        stderr(&o).trim(),
        "error: broken.yaml:4:9: YAML syntax error: unclosed bracket '['"
    );
}

#[test]
fn unreadable_path_exits_three() {
    let o = meshgate(&["check", "does/not/exist"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).starts_with("error: does/not/exist: "),
        "{}",
        stderr(&o)
    );
    // Nothing to check is the same whether the folder or the file is empty.
    let o = meshgate(&["check", "/dev/null"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("/dev/null: no objects to check"),
        "{}",
        stderr(&o)
    );
    // The same from a proxy, and the cause said once.
    let o = meshgate(&[
        "gateway",
        "--config",
        "does/not/exist",
        "--workload",
        "a/b",
        "--ca-dir",
        "nope",
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(
        stderr(&o).matches("No such file or directory").count(),
        1,
        "{}",
        stderr(&o)
    );
}

#[test]
fn unknown_field_is_a_schema_error_exit_79() {
    let s = Scratch::with_seed(
        "unknown-field",
        &[(
            "typo.yaml",
            "apiVersion: networking.istio.io/v1beta1\nkind: Sidecar\nmetadata:\n  name: typo\n  namespace: curl-egress-tst\nspec:\n  outboundTrafficPolicy:\n    mod: REGISTRY_ONLY\n",
        )],
    );
    let o = meshgate(&["check", s.path()]);
    assert_eq!(o.status.code(), Some(79), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("Error [IST0106] (Sidecar curl-egress-tst/typo typo.yaml:8) Schema validation error: spec.outboundTrafficPolicy.mod: unknown field \"mod\" (column 5)"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_mistyped_kind_fails_check_exit_79_with_the_kind_it_meant() {
    // The seed's own workload VirtualService with one letter missing from
    // its kind: skipped, it would send the workload past the gateway.
    let seed_vs =
        std::fs::read_to_string(repo_root().join("examples/seed/virtualservice-workload.yaml"))
            .unwrap();
    let typo = seed_vs.replace("kind: VirtualService", "kind: VirtualServce");
    assert_ne!(typo, seed_vs);
    let s = Scratch::with_seed("kind-typo", &[("virtualservice-workload.yaml", &typo)]);
    let o = meshgate(&["check", s.path()]);
    assert_eq!(o.status.code(), Some(79), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("Error [IST0106] (VirtualServce curl-external-tst/jsonplaceholder-egress virtualservice-workload.yaml:2) Schema validation error: no kind \"VirtualServce\" in API group networking.istio.io (networking.istio.io/v1alpha3); did you mean VirtualService?"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn analysis_error_exits_79() {
    let s = Scratch::with_seed(
        "ist0101",
        &[(
            "vs.yaml",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v, namespace: curl-external-tst}\nspec:\n  hosts: [a.example.com]\n  http:\n  - route: [{destination: {host: b.example.com}}]\n",
        )],
    );
    let o = meshgate(&["check", s.path()]);
    assert_eq!(o.status.code(), Some(79));
    assert!(stdout(&o).contains("Error [IST0101] (VirtualService curl-external-tst/v vs.yaml:7) Referenced host not found: \"b.example.com\""));
}

#[test]
fn config_dump_sidecar() {
    let o = meshgate(&[
        "config-dump",
        "--config",
        "examples/seed",
        "--workload",
        "curl-external-tst/curl-test",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains(
            "Outbound policy:   REGISTRY_ONLY (Sidecar curl-external-tst/restrict-outbound-traffic)"
        ),
        "{out}"
    );
    let route = out
        .lines()
        .find(|l| l.starts_with("jsonplaceholder.typicode.com:80 "))
        .expect("route line for jsonplaceholder.typicode.com:80");
    assert!(
        route.contains("-> curl-egress-tst.curl-egress-tst.svc.cluster.local:80"),
        "{route}"
    );
    assert!(
        route.contains("curl-external-tst/jsonplaceholder-egress"),
        "{route}"
    );
    let cluster = out
        .lines()
        .find(|l| l.starts_with("outbound|80||curl-egress-tst.curl-egress-tst.svc.cluster.local"))
        .expect("cluster line");
    assert!(cluster.contains("ISTIO_MUTUAL (auto mTLS)"), "{cluster}");
    assert!(
        cluster.contains("spiffe://cluster.local/ns/curl-egress-tst/sa/curl-egress-tst"),
        "{cluster}"
    );
}

#[test]
fn config_dump_gateway() {
    let o = meshgate(&[
        "config-dump",
        "-c",
        "examples/seed",
        "-w",
        "curl-egress-tst/curl-egress-tst-gateway",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let listener = out
        .lines()
        .find(|l| l.starts_with("80 "))
        .expect("listener 80");
    assert!(
        listener.contains("HTTP") && listener.contains("jsonplaceholder.typicode.com"),
        "{listener}"
    );
    assert!(out.contains("-> jsonplaceholder.typicode.com:443"), "{out}");
    let cluster = out
        .lines()
        .find(|l| l.starts_with("outbound|443||jsonplaceholder.typicode.com"))
        .expect("cluster");
    for want in [
        "DNS",
        "SIMPLE",
        "jsonplaceholder.typicode.com",
        "system roots",
    ] {
        assert!(cluster.contains(want), "{want} missing in {cluster}");
    }
    let policy = out
        .lines()
        .find(|l| l.starts_with("curl-egress-tst/allow-curl-external-to-egress"))
        .expect("policy");
    assert!(
        policy.contains("ALLOW") && policy.contains("from namespaces=[curl-external-tst]"),
        "{policy}"
    );
}

#[test]
fn config_dump_json() {
    let o = meshgate(&[
        "config-dump",
        "-c",
        "examples/seed",
        "-w",
        "curl-egress-tst/curl-egress-tst-gateway",
        "-o",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["clusters"][0]["tls"]["mode"], "SIMPLE");
    assert_eq!(
        v["clusters"][0]["tls"]["sni"],
        "jsonplaceholder.typicode.com"
    );
    assert_eq!(v["clusters"][0]["resolution"], "DNS");
    assert_eq!(v["listeners"][0]["port"], 80);
    assert_eq!(
        v["workload"]["spiffeId"],
        "spiffe://cluster.local/ns/curl-egress-tst/sa/curl-egress-tst"
    );
}

#[test]
fn config_dump_unknown_workload() {
    let o = meshgate(&[
        "config-dump",
        "-c",
        "examples/seed",
        "-w",
        "curl-external-tst/nope",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("workload curl-external-tst/nope not found"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn help_on_every_subcommand() {
    for sub in [
        &["--help"][..],
        &["check", "--help"],
        &["config-dump", "--help"],
        &["ca", "--help"],
        &["ca", "init", "--help"],
        &["ca", "issue", "--help"],
        &["ca", "serve", "--help"],
        &["gateway", "--help"],
        &["sidecar", "--help"],
        &["iptables", "--help"],
        &["stand-in", "--help"],
        &["up", "--help"],
    ] {
        let o = meshgate(sub);
        assert_eq!(o.status.code(), Some(0), "{sub:?}");
        assert!(stdout(&o).contains("Usage: meshgate"), "{sub:?}");
    }
}

#[test]
fn gateway_refuses_a_route_to_resolution_none() {
    let s = Scratch::with_seed(
        "gw-none",
        &[(
            "none.yaml",
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: none, namespace: curl-egress-tst}
spec:
  hosts: [none.example.com]
  ports: [{number: 443, name: https, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: g3, namespace: curl-egress-tst}
spec:
  selector: {istio: egressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [none.example.com]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: v, namespace: curl-egress-tst}
spec:
  hosts: [none.example.com]
  gateways: [g3]
  http: [{route: [{destination: {host: none.example.com, port: {number: 443}}}]}]
",
        )],
    );
    let ca = std::env::temp_dir().join(format!("meshgate-cli-none-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&ca);
    assert!(
        meshgate(&["ca", "init", "--dir", ca.to_str().unwrap()])
            .status
            .success()
    );
    let o = meshgate(&[
        "gateway",
        "--config",
        s.path(),
        "--workload",
        "curl-egress-tst/curl-egress-tst-gateway",
        "--ca-dir",
        ca.to_str().unwrap(),
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
    ]);
    let _ = std::fs::remove_dir_all(&ca);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("ServiceEntry curl-egress-tst/none has resolution NONE, which gives a gateway no endpoints"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn iptables_missing_is_a_clear_error() {
    let empty = std::env::temp_dir().join(format!("meshgate-empty-path-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .arg("iptables")
        .env("PATH", &empty)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&empty);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o).trim(),
        "error: iptables-restore not found: install the iptables package (Debian: apt-get install iptables)"
    );
}

#[test]
fn iptables_dry_run_prints_istio_init_rules() {
    let o = meshgate(&[
        "iptables",
        "--dry-run",
        "--exclude-outbound-cidrs",
        "10.0.0.0/8",
    ]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(
        out.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
        "{out}"
    );
    assert!(
        out.contains("-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN"),
        "{out}"
    );
    assert!(
        out.contains("-A ISTIO_OUTPUT -d 10.0.0.0/8 -j RETURN"),
        "{out}"
    );
}

const GW: &str = "curl-egress-tst/curl-egress-tst-gateway";
const WORKLOAD: &str = "curl-external-tst/curl-test";
const TODO: &str = "http://jsonplaceholder.typicode.com/todos/1";

/// `explain`'s report; its exit code says whether the proxy refuses (80)
/// or sends the request on (0), as the report's result line does.
fn explain(args: &[&str]) -> String {
    let mut all = vec!["explain", "--config", "examples/seed"];
    all.extend_from_slice(args);
    let o = meshgate(&all);
    assert_eq!(stderr(&o), "", "a report, not a log");
    let out = stdout(&o);
    let refused = if out.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        matches!(
            v["result"]["action"].as_str(),
            Some("local-reply" | "close" | "refused")
        )
    } else {
        let result = line(&out, "result");
        ["result     4", "result     5", "result     connection"]
            .iter()
            .any(|p| result.starts_with(p))
    };
    // 0 sent on; 80-83 the kinds of the proxy's own answer.
    let code = o.status.code().unwrap();
    assert!(
        if refused {
            (80..=83).contains(&code)
        } else {
            code == 0
        },
        "{code}: {out}"
    );
    out
}

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{out}"))
}

#[test]
fn explain_follows_the_seed_request_through_both_proxies() {
    // The workload's sidecar: the mesh VirtualService sends it to the
    // gateway's Service over auto mTLS, expecting the gateway's identity.
    let out = explain(&["--workload", WORKLOAD, TODO]);
    assert_eq!(
        line(&out, "2 route"),
        "2 route    VirtualService curl-external-tst/jsonplaceholder-egress, rule #0, match #0"
    );
    let cluster = line(&out, "3 cluster");
    assert!(
        cluster.contains("TLS ISTIO_MUTUAL (auto mTLS)")
            && cluster
                .contains("expects spiffe://cluster.local/ns/curl-egress-tst/sa/curl-egress-tst"),
        "{out}"
    );
    assert_eq!(
        line(&out, "result"),
        "result     forwarded to outbound|80||curl-egress-tst.curl-egress-tst.svc.cluster.local"
    );

    // The gateway: allowed for the curl namespace, TLS origination with SNI.
    let out = explain(&[
        "--workload",
        GW,
        "--from",
        "spiffe://cluster.local/ns/curl-external-tst/sa/default",
        TODO,
    ]);
    assert_eq!(
        line(&out, "1 listener"),
        "1 listener Gateway curl-egress-tst/egress-gateway server #0"
    );
    let cluster = line(&out, "3 cluster");
    assert!(
        cluster.contains("resolution DNS")
            && cluster.contains("TLS SIMPLE, SNI jsonplaceholder.typicode.com")
            && cluster.contains("DestinationRule curl-egress-tst/jsonplaceholder-tls-origination"),
        "{out}"
    );
    assert!(
        line(&out, "4 authz").contains(
            "allowed by the ALLOW policies (curl-egress-tst/allow-curl-external-to-egress)"
        ),
        "{out}"
    );
    assert_eq!(
        line(&out, "result"),
        "result     forwarded to outbound|443||jsonplaceholder.typicode.com"
    );
}

#[test]
fn explain_shows_why_a_request_is_refused() {
    let result = |args: &[&str]| line(&explain(args), "result").to_owned();
    // Another namespace, and plaintext (no identity): the policy denies.
    for from in [
        &["--from", "spiffe://cluster.local/ns/other/sa/default"][..],
        &[][..],
    ] {
        let mut args = vec!["--workload", GW];
        args.extend_from_slice(from);
        args.push(TODO);
        assert_eq!(result(&args), "result     403 RBAC: access denied");
    }
    // REGISTRY_ONLY in the sidecar, naming the Sidecar resource.
    assert_eq!(
        result(&["--workload", WORKLOAD, "http://example.com/"]),
        "result     502: outbound traffic policy REGISTRY_ONLY (Sidecar curl-external-tst/restrict-outbound-traffic) and example.com is not in the registry (route block_all)"
    );
    // The workload's own TLS: the sidecar reads only SNI; with no tls route
    // (443 is declared HTTP here) REGISTRY_ONLY closes the connection.
    assert_eq!(
        result(&[
            "--workload",
            WORKLOAD,
            "https://jsonplaceholder.typicode.com/"
        ]),
        "result     connection closed: outbound traffic policy REGISTRY_ONLY (Sidecar curl-external-tst/restrict-outbound-traffic) and no route for SNI jsonplaceholder.typicode.com (BlackHoleCluster); jsonplaceholder.typicode.com:443 is registered, but its port is declared HTTP: TLS to it is not routed (declare the port TLS or HTTPS to pass TLS through, or send plain HTTP and let a gateway originate TLS)"
    );
    // Plain HTTP to 443: the service's default route, no VirtualService.
    let out = explain(&[
        "--workload",
        WORKLOAD,
        "http://jsonplaceholder.typicode.com:443/",
    ]);
    assert_eq!(
        line(&out, "2 route"),
        "2 route    default route of the service (no VirtualService for this host and port), rule default"
    );
    // A port no Gateway server has.
    assert_eq!(
        result(&[
            "--workload",
            GW,
            "http://jsonplaceholder.typicode.com:8080/"
        ]),
        "result     connection refused: no Gateway server listens on port 8080"
    );
    // JSON carries the same result.
    let json: serde_json::Value = serde_json::from_str(&explain(&[
        "--workload",
        WORKLOAD,
        "--output",
        "json",
        "http://example.com/",
    ]))
    .unwrap();
    assert_eq!(json["result"]["status"], 502, "{json}");
    assert_eq!(json["result"]["route"], "block_all", "{json}");
    assert_eq!(json["result"]["action"], "local-reply", "{json}");
}

#[test]
fn explain_rejects_bad_input_clearly() {
    let o = meshgate(&["explain", "-c", "examples/seed", "-w", GW, "not-a-url"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("URL \"not-a-url\""), "{}", stderr(&o));
    let o = meshgate(&["explain", "-c", "examples/seed", "-w", "nope/nope", TODO]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("workload nope/nope not found"),
        "{}",
        stderr(&o)
    );
    let o = meshgate(&[
        "explain",
        "-c",
        "examples/seed",
        "-w",
        GW,
        "-H",
        "no-colon",
        TODO,
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("expected `Name: value`"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn mesh_config_sets_path_normalization_and_bad_values_name_the_line() {
    let dir = std::env::temp_dir().join(format!("meshgate-meshcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("mesh.yaml");
    std::fs::write(
        &good,
        "pathNormalization:\n  normalization: MERGE_SLASHES\n",
    )
    .unwrap();
    let out = explain(&[
        "--workload",
        GW,
        "--mesh-config",
        good.to_str().unwrap(),
        "--from",
        "spiffe://cluster.local/ns/curl-external-tst/sa/default",
        "http://jsonplaceholder.typicode.com//todos//1",
    ]);
    assert!(
        out.contains("path normalized to /todos/1 (pathNormalization MERGE_SLASHES)"),
        "{out}"
    );
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "trustDomain: x\npathNormalization:\n  normalization: MERGE\n",
    )
    .unwrap();
    let o = meshgate(&[
        "check",
        "examples/seed",
        "--mesh-config",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("bad.yaml:3: MeshConfig field pathNormalization.normalization"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The exit codes the README documents, one failure of each kind.
#[test]
fn exit_codes_tell_failures_apart() {
    let dir = std::env::temp_dir().join(format!("meshgate-cli-exit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca");
    let ca = ca.to_str().unwrap();
    let seed = repo_root().join("examples/seed");
    let seed = seed.to_str().unwrap();
    // 2: usage.
    assert_eq!(
        meshgate(&["check", "--no-such-flag"]).status.code(),
        Some(2)
    );
    // 3: the config cannot be read.
    assert_eq!(
        meshgate(&["check", "does/not/exist"]).status.code(),
        Some(3)
    );
    // 4: identity (no CA in that folder).
    let gateway = |ca: &str, port: &str| {
        meshgate(&[
            "gateway",
            "--config",
            seed,
            "--workload",
            "curl-egress-tst/curl-egress-tst-gateway",
            "--ca-dir",
            ca,
            "--bind-address",
            "127.0.0.1",
            "--port",
            port,
            "--admin-address",
            "127.0.0.1",
            "--admin-port",
            "0",
            "--prometheus-port",
            "0",
            "--health-port",
            "0",
        ])
    };
    let o = gateway(ca, "80=0");
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    // 5: the Gateway server's port is taken.
    assert!(meshgate(&["ca", "init", "--dir", ca]).status.success());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = format!("80={}", taken.local_addr().unwrap().port());
    let o = gateway(ca, &port);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot listen on"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn log_level_takes_a_level_or_a_filter_and_refuses_nonsense() {
    let seed = repo_root().join("examples/seed");
    let seed = seed.to_str().unwrap();
    for ok in ["warn", "info,meshgate_proxy=debug"] {
        let o = meshgate(&["--log-level", ok, "check", seed]);
        assert_eq!(o.status.code(), Some(0), "{ok}: {}", stderr(&o));
    }
    let o = meshgate(&["check", seed, "--log-level", "info,[bad"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).starts_with("error: --log-level: "),
        "{}",
        stderr(&o)
    );

    // --log-format json: one JSON object per log line.
    let o = meshgate(&[
        "--log-format",
        "json",
        "gateway",
        "--config",
        seed,
        "--workload",
        "curl-egress-tst/curl-egress-tst-gateway",
        "--ca-dir",
        "no/such/ca",
        "--admin-address",
        "127.0.0.1",
        "--admin-port",
        "0",
        "--prometheus-port",
        "0",
        "--health-port",
        "0",
        "--inspect-port",
        "0",
    ]);
    let first = stderr(&o).lines().next().unwrap_or("").to_owned();
    let line: serde_json::Value =
        serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert_eq!(line["level"], "INFO", "{first}");
}

#[test]
fn check_reads_stdin_names_files_of_several_folders_and_takes_a_failure_threshold() {
    let seed = repo_root().join("examples/seed");
    let seed = seed.to_str().unwrap();
    // `-`: standard input, shown as `stdin`.
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["check", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sidecar = std::fs::read_to_string(repo_root().join("examples/seed/sidecar.yaml")).unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), sidecar.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(79));
    assert!(stdout(&o).contains("(Sidecar curl-external-tst/restrict-outbound-traffic stdin:10) Referenced selector not found"), "{}", stdout(&o));

    // Two folders: each file named with its folder.
    let other = repo_root().join("examples/istio-mutual-egress");
    let o = meshgate(&["check", seed, other.to_str().unwrap()]);
    assert!(
        stdout(&o).contains("examples/istio-mutual-egress/egress.yaml:")
            && stdout(&o).contains("examples/seed/destintionrule.yaml:"),
        "{}",
        stdout(&o)
    );

    // The seed has a Warning only: it fails from `warning` down.
    assert_eq!(meshgate(&["check", seed]).status.code(), Some(0));
    for (threshold, code) in [("error", 0), ("warning", 79), ("info", 79)] {
        let o = meshgate(&["check", seed, "--failure-threshold", threshold]);
        assert_eq!(o.status.code(), Some(code), "{threshold}");
    }
}

#[test]
fn explain_says_which_rule_and_field_refuse_a_caller() {
    let seed = repo_root().join("examples/seed");
    let o = meshgate(&[
        "explain",
        "-c",
        seed.to_str().unwrap(),
        "-w",
        "curl-egress-tst/curl-egress-tst-gateway",
        "--from",
        "spiffe://cluster.local/ns/other/sa/default",
        "http://jsonplaceholder.typicode.com/todos/1",
    ]);
    assert!(
        stdout(&o).contains(
            "denied: ALLOW policies apply and no rule matches (curl-egress-tst/allow-curl-external-to-egress rule[0]: namespaces \"other\" not in [curl-external-tst])"
        ),
        "{}",
        stdout(&o)
    );
}

#[test]
fn explain_says_why_tls_to_a_registered_host_is_closed() {
    let seed = repo_root().join("examples/seed");
    let o = meshgate(&[
        "explain",
        "-c",
        seed.to_str().unwrap(),
        "-w",
        "curl-external-tst/curl-test",
        "https://jsonplaceholder.typicode.com/todos/1",
    ]);
    assert!(
        stdout(&o).contains(
            "jsonplaceholder.typicode.com:443 is registered, but its port is declared HTTP: TLS to it is not routed"
        ),
        "{}",
        stdout(&o)
    );
}

#[test]
fn config_dump_filters_by_port_and_fqdn_and_writes_yaml() {
    let seed = repo_root().join("examples/seed");
    let dump = |extra: &[&str]| {
        let mut args = vec![
            "config-dump",
            "-c",
            seed.to_str().unwrap(),
            "-w",
            "curl-external-tst/curl-test",
            "-o",
            "json",
        ];
        args.extend_from_slice(extra);
        let o = meshgate(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()
    };
    let names = |v: &serde_json::Value, what: &str, key: &str| -> Vec<String> {
        v[what]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x[key].to_string())
            .collect()
    };
    let v = dump(&["--port", "443"]);
    assert_eq!(
        names(&v, "clusters", "name"),
        ["\"outbound|443||jsonplaceholder.typicode.com\""]
    );
    assert_eq!(names(&v, "listeners", "port"), ["443"]);
    let v = dump(&["--fqdn", "curl-egress"]);
    assert_eq!(
        names(&v, "clusters", "name"),
        ["\"outbound|80||curl-egress-tst.curl-egress-tst.svc.cluster.local\""]
    );
    // YAML: the same view.
    let o = meshgate(&[
        "config-dump",
        "-c",
        seed.to_str().unwrap(),
        "-w",
        "curl-external-tst/curl-test",
        "-o",
        "yaml",
        "--port",
        "443",
    ]);
    assert!(
        stdout(&o).contains("name: outbound|443||jsonplaceholder.typicode.com"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn explain_follows_the_request_from_the_sidecar_to_the_gateway() {
    let seed = repo_root().join("examples/seed");
    let args = |output: &'static str| {
        vec![
            "explain".to_owned(),
            "-c".to_owned(),
            seed.to_str().unwrap().to_owned(),
            "-w".to_owned(),
            "curl-external-tst/curl-test".to_owned(),
            "--follow".to_owned(),
            "-o".to_owned(),
            output.to_owned(),
            "http://jsonplaceholder.typicode.com/todos/1".to_owned(),
        ]
    };
    let run = |output| {
        let a = args(output);
        meshgate(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let o = run("text");
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(
        out.contains("proxy      gateway of curl-egress-tst/curl-egress-tst-gateway")
            && out.contains("request    GET http://jsonplaceholder.typicode.com/todos/1 from spiffe://cluster.local/ns/curl-external-tst/sa/default (mutual TLS)")
            && out.contains("result     forwarded to outbound|443||jsonplaceholder.typicode.com"),
        "{out}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&run("json"))).unwrap();
    let hops = v["hops"].as_array().unwrap();
    assert_eq!(hops.len(), 2);
    assert_eq!(hops[1]["proxy"]["kind"], "gateway");
}

#[test]
fn explain_exit_codes_say_what_the_proxy_does() {
    let cases: [(&[&str], i32); 5] = [
        (
            &[
                "-w",
                GW,
                "--from",
                "spiffe://cluster.local/ns/curl-external-tst/sa/default",
                TODO,
            ],
            0,
        ),
        (
            &[
                "-w",
                GW,
                "--from",
                "spiffe://cluster.local/ns/other/sa/default",
                TODO,
            ],
            80,
        ),
        (&["-w", WORKLOAD, "http://example.com/"], 81),
        (
            &["-w", WORKLOAD, "https://jsonplaceholder.typicode.com/"],
            81,
        ),
        (
            &[
                "-w",
                GW,
                "--from",
                "spiffe://cluster.local/ns/curl-external-tst/sa/default",
                "http://unrouted.example.com/",
            ],
            82,
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["explain", "--config", "examples/seed"];
        all.extend_from_slice(args);
        let o = meshgate(&all);
        assert_eq!(o.status.code(), Some(want), "{args:?}: {}", stdout(&o));
    }
}

/// The scale benchmark's generated configs are what they say: each shape
/// passes `check` with what it adds, and where its VirtualServices bind
/// the hosts to the egress gateway (one Gateway for all, or one each), the
/// gateway routes the last host with TLS origination. A shape that no
/// longer loads or routes would time something else, and so would files
/// the YAML fast path no longer reads.
#[test]
fn every_scale_shape_checks_and_the_gateway_routes_its_hosts() {
    use meshgate_proxy::testing::{ScaleShape, scale_files, scale_host};
    const N: usize = 12;
    for shape in ScaleShape::ALL {
        let files = scale_files(N, shape);
        for (name, text) in &files {
            let fast = meshgate_config::yaml::fast_path_reads(text);
            assert!(fast, "{shape:?}: {name} is left to the event parser");
        }
        let extra: Vec<(&str, &str)> = files
            .iter()
            .map(|(name, text)| (name.as_str(), text.as_str()))
            .collect();
        let s = Scratch::with_seed(&format!("scale-{shape:?}"), &extra);
        let o = meshgate(&["check", s.path()]);
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(0), "{shape:?}: {out}{}", stderr(&o));
        let (entries, gateways) = match shape {
            ScaleShape::OneEntry => (2, 2),
            ScaleShape::GatewayPerHost => (N + 1, N + 1),
            _ => (N + 1, 2),
        };
        let summary = out.lines().last().unwrap();
        for part in [
            format!("{entries} ServiceEntries"),
            format!("{gateways} Gateways"),
        ] {
            assert!(summary.contains(&part), "{shape:?}: {summary}");
        }
        if matches!(shape, ScaleShape::PerHost | ScaleShape::GatewayPerHost) {
            let host = scale_host(N - 1);
            let o = meshgate(&[
                "explain",
                "--config",
                s.path(),
                "--workload",
                GW,
                "--from",
                "spiffe://cluster.local/ns/curl-external-tst/sa/default",
                &format!("http://{host}/"),
            ]);
            let out = stdout(&o);
            assert_eq!(
                line(&out, "result"),
                format!("result     forwarded to outbound|443||{host}"),
                "{shape:?}: {out}"
            );
            assert!(
                line(&out, "3 cluster").contains(&format!("TLS SIMPLE, SNI {host}")),
                "{shape:?}: {out}"
            );
        }
    }
}

/// A client of a server-first protocol (SMTP, MySQL) sends nothing until
/// the server greets it (`--silent`): a gateway's plain TCP server takes
/// the silence for plaintext after its protocol detection timeout and
/// applies its policies (the seed's admits only the curl namespace's
/// mesh peers: 80); a sidecar passes a registered TCP port on without
/// waiting, and on an HTTP port waits for a first byte that never comes.
#[test]
fn explain_follows_a_silent_client_as_the_listener_does() {
    use meshgate_proxy::testing::SMTP_BEHIND_GATEWAY;
    let s = Scratch::with_seed("silent", &[("smtp.yaml", SMTP_BEHIND_GATEWAY)]);
    let run = |args: &[&str]| {
        let mut all = vec!["explain", "--config", s.path(), "--silent"];
        all.extend_from_slice(args);
        let o = meshgate(&all);
        (o.status.code(), stdout(&o), stderr(&o))
    };

    let (code, out, _) = run(&["-w", GW, "tcp://smtp.example.com:2525"]);
    assert_eq!(code, Some(80), "{out}");
    assert_eq!(
        line(&out, "           nothing"),
        "           nothing from the client in 1 s: a server-first protocol, taken for plaintext (protocol detection timeout)"
    );
    assert_eq!(
        line(&out, "2 route"),
        "2 route    tcp route #0 (destination port 2525)"
    );
    assert!(
        line(&out, "4 authz").starts_with("4 authz    denied"),
        "{out}"
    );

    let (code, out, _) = run(&["-w", WORKLOAD, "tcp://smtp.example.com:25"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("nothing from the client"), "{out}");
    assert_eq!(
        line(&out, "result"),
        "result     passed through to the original destination (PassthroughCluster): a TCP port of a registered service"
    );

    let (code, out, _) = run(&["-w", WORKLOAD, "tcp://jsonplaceholder.typicode.com:80"]);
    assert_eq!(code, Some(83), "{out}");
    assert!(
        line(&out, "result").starts_with(
            "result     connection closed after 15 s: the proxy waits for the client's first byte"
        ),
        "{out}"
    );

    let (code, out, err) = run(&["-w", WORKLOAD, "http://smtp.example.com:25/"]);
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(
        err.trim(),
        "error: --silent goes with tcp://: a client that sends a request or a ClientHello is not silent"
    );
}
