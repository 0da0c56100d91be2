//! The `meshgate gateway` and `meshgate sidecar` processes: what only a
//! running binary shows (flags, admin ports, the ready file, live reload of
//! files, SIGTERM). Routing, policy, TLS and metrics are tested in process
//! (crates/proxy/tests). Real parts: the seed's config unchanged, a real
//! HTTPS stand-in for jsonplaceholder.typicode.com with its own CA (reached
//! through `--endpoints`, so no port below 1024 and no root is needed), curl
//! as the mesh peer with certificates from `meshgate ca issue`.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use meshgate_proxy::standin::{self, Seen, StandinCa};
use support::*;

const HOST: &str = "jsonplaceholder.typicode.com";
const CURL_ID: &str = "spiffe://cluster.local/ns/curl-external-tst/sa/default";

/// The outside world: the HTTPS stand-in on 127.0.0.1 and an endpoints
/// file that sends the external host there.
struct World {
    _rt: tokio::runtime::Runtime,
    seen: Seen,
    ca_file: String,
    endpoints: String,
}

fn world(t: &TempDir) -> World {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ca = StandinCa::new("stand-in CA").unwrap();
    let ca_file = t.path("standin-ca.pem");
    std::fs::write(&ca_file, &ca.root_pem).unwrap();
    let tls = ca.server_config(&[HOST.to_owned()]).unwrap();
    let seen = Seen::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(standin::serve_https(listener, tls, seen.clone()));
    let endpoints = t.path("gw-endpoints");
    std::fs::write(&endpoints, format!("{HOST}:443 {addr}\n")).unwrap();
    World {
        _rt: rt,
        seen,
        ca_file,
        endpoints,
    }
}

struct Gateway {
    proc: Proc,
    http: SocketAddr,
    admin: SocketAddr,
    prometheus: SocketAddr,
    health: SocketAddr,
    /// 127.0.0.1 only: /config_dump, /clusters, /certs, /server_info.
    inspect: SocketAddr,
}

/// A proxy's `--ready-file`, written (atomically) before it logs that it
/// runs.
fn read_ready(path: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

impl World {
    /// A gateway that reaches the external host at the stand-in and trusts
    /// its CA.
    fn gateway(&self, t: &TempDir, config: &[&str], extra: &[&str]) -> Gateway {
        let mut args = vec![
            "--endpoints",
            &self.endpoints,
            "--extra-roots",
            &self.ca_file,
        ];
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
        "--ready-file",
        &ready,
    ]);
    if !extra.iter().any(|a| a.starts_with("80=")) {
        args.extend(["--port", "80=0"]);
    }
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
        inspect: admin("inspect"),
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
        "--explicit-proxy",
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
fn admin_ports_ready_file_and_json_access_log() {
    let t = setup("gw-admin");
    let w = world(&t);
    let gw = w.gateway(&t, &[&seed()], &["--access-log-format", "json"]);
    for ready in [gw.health, gw.admin] {
        assert_eq!(curl(&[&format!("http://{ready}/healthz/ready")]).1, "200");
    }
    let (body, code, _) = mtls_get(&t, "curl", &gw, "/todos/1");
    assert_eq!((code.as_str(), body.as_str()), ("200", standin::TODO_1));
    // One JSON object per request on stdout, written when the response ends.
    let line = gw
        .proc
        .wait_for("\"response_code\":200", Duration::from_secs(10));
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["downstream_peer_uri_san"], CURL_ID);
    assert_eq!(
        entry["upstream_cluster"],
        "outbound|443||jsonplaceholder.typicode.com"
    );
    assert_eq!(w.seen.all()[0].sni.as_deref(), Some(HOST));
    // 15090 and 15020 serve the same metrics, valid for Prometheus.
    let text = http_get(gw.prometheus, "/stats/prometheus").replace('\r', "");
    let (ok, report) = promtool_check(&text);
    assert!(ok, "promtool: {report}\n{text}");
    assert_eq!(
        text,
        http_get(gw.admin, "/stats/prometheus").replace('\r', ""),
        "15020 serves the same metrics"
    );
    assert_eq!(
        metric_value(&text, "istio_requests_total", &[("response_code", "200")]),
        Some(1.0),
        "{text}"
    );
    // Sizes as Istio counts them: headers and body (a GET has no body).
    let sum = |name| metric_value(&text, name, &[("response_code", "200")]).unwrap_or(0.0);
    assert!(sum("istio_request_bytes_sum") > 0.0, "{text}");
    assert!(
        sum("istio_response_bytes_sum") > standin::TODO_1.len() as f64,
        "{text}"
    );

    // The inspection port: what the running gateway runs.
    assert!(gw.inspect.ip().is_loopback());
    let get = |path: &str| -> serde_json::Value {
        serde_json::from_str(&http_get(gw.inspect, path)).unwrap()
    };
    let info = get("/server_info");
    assert_eq!(info["state"], "LIVE");
    assert_eq!(info["config"], "files");
    assert_eq!(
        info["identity"],
        "spiffe://cluster.local/ns/curl-egress-tst/sa/curl-egress-tst"
    );
    let dump = get("/config_dump");
    assert_eq!(
        dump["view"]["clusters"][0]["name"], "outbound|443||jsonplaceholder.typicode.com",
        "{dump:#}"
    );
    assert!(dump["certificate"]["expiresInSeconds"].as_u64().unwrap() > 3600);
    // The cluster's endpoint now: the stand-in, which served one request.
    let clusters = get("/clusters");
    let cluster = &clusters[0];
    assert_eq!(
        cluster["name"],
        "outbound|443||jsonplaceholder.typicode.com"
    );
    assert_eq!(cluster["hosts"][0]["ejected"], false, "{clusters:#}");
    let standin = std::fs::read_to_string(&w.endpoints).unwrap();
    let standin = standin.split_whitespace().nth(1).unwrap();
    assert_eq!(cluster["hosts"][0]["address"], standin, "{clusters:#}");
    assert_eq!(get("/listeners")[0]["port"], 80);
    // Envoy's /stats form: one `name{labels}: value` line per sample.
    let stats = http_get(gw.inspect, "/stats?filter=istio_requests_total");
    assert!(
        stats.lines().count() >= 1
            && stats
                .lines()
                .all(|l| l.starts_with("istio_requests_total{") && l.contains("}: ")),
        "{stats}"
    );
    // The log filter, changed while running.
    let logging = |method: &str, query: &str| {
        curl(&[
            "-X",
            method,
            &format!("http://{}/logging{query}", gw.inspect),
        ])
    };
    assert_eq!(logging("GET", "").0.trim(), "info");
    let (body, code, _) = logging("POST", "?level=debug");
    assert_eq!((code.as_str(), body.trim()), ("200", "debug"));
    gw.proc
        .wait_for("log filter changed", Duration::from_secs(5));
    assert_eq!(logging("GET", "").0.trim(), "debug");
    assert_eq!(logging("POST", "?level=info,%5Bbad").1, "400");

    // `meshgate proxy-config` reads the same port, as istioctl does.
    let addr = gw.inspect.to_string();
    let pc = |args: &[&str]| {
        let out = meshgate(&[&["proxy-config"], args, &[&addr]].concat());
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let endpoints = pc(&["endpoint"]);
    assert!(
        endpoints.contains(standin) && endpoints.contains("OK"),
        "{endpoints}"
    );
    let secret = pc(&["secret"]);
    let serial = dump["certificate"]["serialNumber"].as_str().unwrap();
    assert!(
        secret.contains(serial) && secret.contains("ACTIVE"),
        "{secret}"
    );
    assert!(pc(&["listener"]).contains("egress-gateway"));
    assert_eq!(pc(&["log", "--level", "warn"]).trim(), "warn");
    let json: serde_json::Value = serde_json::from_str(&pc(&["cluster", "-o", "json"])).unwrap();
    assert_eq!(
        json[0]["name"],
        "outbound|443||jsonplaceholder.typicode.com"
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
    let t = setup("gw-reload");
    let w = world(&t);
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

        // If an assertion below fails, the traffic stops too.
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop_on_panic = StopOnDrop(&stop);

        // 1. A new Gateway server port: bound, announced, served.
        let gateway_yaml = std::fs::read_to_string(format!("{dir}/gateway.yaml")).unwrap();
        let two_ports = format!(
            "{gateway_yaml}  - port:\n      number: 8081\n      name: http-alt\n      protocol: HTTP\n    hosts:\n    - \"{HOST}\"\n"
        );
        write_config(&dir, "gateway.yaml", &two_ports);
        let reloaded = gw.proc.wait_for("config reloaded", Duration::from_secs(10));
        // The log says what changed.
        assert!(
            reloaded.contains(
                "changes=added 0 (), changed 1 (Gateway curl-egress-tst/egress-gateway), removed 0 ()"
            ),
            "{reloaded}"
        );
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
    let reloaded = gw.proc.wait_for("config reloaded", Duration::from_secs(10));
    assert!(
        reloaded.contains("changed 2 (AuthorizationPolicy curl-egress-tst/"),
        "{reloaded}"
    );
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
    let t = setup("gw-drain");
    let w = world(&t);
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

/// The --endpoints file is watched like the config: pointing a Service at
/// its gateway's address takes effect without a restart.
#[test]
fn live_reload_follows_the_endpoints_file() {
    let t = setup("gw-reload-ep");
    let w = world(&t);
    let gw = w.gateway(&t, &[&seed()], &[]);
    let (sidecar, port) = start_sidecar(&t, &[&seed()], &gw, &["--reload-interval", "50ms"]);
    let get = || seed_request_via(port);
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

/// The gateway dies and comes back on the same port while the sidecar
/// holds pooled connections to it: the request in flight fails (503, not a
/// hang), every request after the restart succeeds.
#[test]
fn a_gateway_restart_fails_only_requests_in_flight() {
    let t = setup("gw-restart");
    let w = world(&t);
    let gw = w.gateway(&t, &[&seed()], &[]);
    let (_sidecar, port) = start_sidecar(&t, &[&seed()], &gw, &[]);
    let proxy = format!("http://127.0.0.1:{port}");
    let get = |path: &str| curl(&["-x", &proxy, &format!("http://{HOST}{path}")]);
    for _ in 0..3 {
        assert_eq!(get("/todos/1").1, "200", "warming the sidecar's pool");
    }
    let gw_port = format!("80={}", gw.http.port());

    let in_flight = std::thread::scope(|s| {
        let held = s.spawn(|| get("/hold"));
        let mut arrived = false;
        for _ in 0..1000 {
            if w.seen.all().iter().any(|r| r.path == "/hold") {
                arrived = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(arrived, "the held request reached the stand-in");
        drop(gw); // SIGKILL: no drain, connections cut.
        held.join().unwrap()
    });
    assert_eq!(in_flight.1, "503", "{in_flight:?}");
    assert!(
        in_flight
            .0
            .starts_with("upstream connect error or disconnect/reset before headers"),
        "{in_flight:?}"
    );

    let gw = w.gateway(&t, &[&seed()], &["--port", &gw_port]);
    assert_eq!(gw.http.to_string(), format!("127.0.0.1:{}", &gw_port[3..]));
    for i in 0..10 {
        let (body, code, _) = get("/todos/1");
        assert_eq!(
            (code.as_str(), body.as_str()),
            ("200", standin::TODO_1),
            "request {i} after the restart"
        );
    }
}

/// `--extra-roots` and DestinationRule certificate files are watched too:
/// the external host moves to a server with another CA (503 UF: not
/// trusted), then the roots file is rotated in place and the gateway
/// trusts the new CA without a restart.
#[test]
fn rotated_roots_are_read_again() {
    let t = setup("gw-reload-roots");
    let w = world(&t);
    let gw = w.gateway(&t, &[&seed()], &["--reload-interval", "50ms"]);
    let (_sidecar, port) = start_sidecar(&t, &[&seed()], &gw, &[]);
    let get = || seed_request_via(port);
    assert_eq!(get().1, "200");

    // Another server for the host, with a certificate from another CA.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let other = StandinCa::new("rotated CA").unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = other.server_config(&[HOST.to_owned()]).unwrap();
    rt.spawn(standin::serve_https(listener, tls, Seen::default()));
    std::fs::write(
        format!("{}.tmp", w.endpoints),
        format!("{HOST}:443 {addr}\n"),
    )
    .unwrap();
    std::fs::rename(format!("{}.tmp", w.endpoints), &w.endpoints).unwrap();
    gw.proc.wait_for("config reloaded", Duration::from_secs(10));
    assert_eq!(get().1, "503", "the new server's CA is not trusted yet");
    // The inspection port says what the last reload did.
    let info: serde_json::Value =
        serde_json::from_str(&http_get(gw.inspect, "/server_info")).unwrap();
    let config = info["config"].as_str().unwrap();
    assert!(config.starts_with("files, reloaded at "), "{config}");

    // The roots file, rotated in place: no config file changed.
    std::fs::write(format!("{}.tmp", w.ca_file), &other.root_pem).unwrap();
    std::fs::rename(format!("{}.tmp", w.ca_file), &w.ca_file).unwrap();
    gw.proc.wait_for("config reloaded", Duration::from_secs(10));
    assert_eq!(get().1, "200");
}

/// The seed's request through the sidecar's explicit proxy on `port`.
fn seed_request_via(port: u16) -> (String, String, i32) {
    curl(&[
        "-x",
        &format!("http://127.0.0.1:{port}"),
        &format!("http://{HOST}/todos/1"),
    ])
}

/// A real Prometheus server (Debian's package, as CI installs it) scrapes
/// the sidecar and the gateway, and queries of Istio's standard dashboards
/// (mesh volume and success rate, proxy versions, workload latency,
/// request sizes, a service's callers) answer with data.
#[test]
fn a_real_prometheus_answers_istios_dashboard_queries() {
    let t = setup("prometheus");
    let w = world(&t);
    let gw = w.gateway(&t, &[&seed()], &[]);
    let (_sidecar, port) = start_sidecar(&t, &[&seed()], &gw, &[]);
    let sc_prometheus = read_ready(&t.path("sc-ready.json"))["admin"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["role"] == "prometheus")
        .and_then(|a| a["address"].as_str())
        .unwrap()
        .to_owned();
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::write(
        t.path("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s}}\nscrape_configs:\n- job_name: envoy-stats\n  metrics_path: /stats/prometheus\n  static_configs: [{{targets: ['{}', '{sc_prometheus}']}}]\n",
            gw.prometheus
        ),
    )
    .unwrap();
    let (config, tsdb, web) = (
        format!("--config.file={}", t.path("prometheus.yml")),
        format!("--storage.tsdb.path={}", t.path("tsdb")),
        format!("--web.listen-address={listen}"),
    );
    let prometheus = Proc::spawn_argv(&["prometheus", &config, &tsdb, &web]);
    prometheus.wait_for(
        "Server is ready to receive web requests",
        Duration::from_secs(30),
    );
    let query = |q: &str| -> Vec<serde_json::Value> {
        let (body, code, _) = curl(&[
            "-G",
            &format!("http://{listen}/api/v1/query"),
            "--data-urlencode",
            &format!("query={q}"),
        ]);
        assert_eq!(code, "200", "{q}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    };
    let dashboards = [
        r#"round(sum(irate(istio_requests_total{reporter=~"source|destination"}[1m])), 0.001)"#,
        r#"sum(rate(istio_requests_total{reporter=~"source|destination", response_code!~"5.*"}[1m])) / sum(rate(istio_requests_total{reporter=~"source|destination"}[1m]))"#,
        r#"sum(istio_build{component="proxy"}) by (tag)"#,
        r#"histogram_quantile(0.50, sum(irate(istio_request_duration_milliseconds_bucket{reporter="source", source_workload="curl-test"}[1m])) by (le))"#,
        r#"histogram_quantile(0.90, sum(irate(istio_request_bytes_bucket{reporter="source"}[1m])) by (le))"#,
        r#"sum(irate(istio_requests_total{reporter="source", destination_service=~"curl-egress-tst.curl-egress-tst.svc.cluster.local"}[1m])) by (source_workload, source_workload_namespace)"#,
    ];
    // Traffic goes on until every panel has data from at least two scrapes
    // of each proxy (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        assert_eq!(seed_request_via(port).1, "200");
        let empty: Vec<&str> = dashboards
            .iter()
            .copied()
            .filter(|q| {
                let got = query(q);
                got.is_empty()
                    || got.iter().any(|r| {
                        r["value"][1]
                            .as_str()
                            .and_then(|v| v.parse::<f64>().ok())
                            .is_none_or(|v| v.is_nan() || v <= 0.0)
                    })
            })
            .collect();
        if empty.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "panels without data: {empty:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
