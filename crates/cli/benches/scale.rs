//! meshgate at scale: the seed plus 1, 1,000 and 10,000 generated external
//! hosts (a ServiceEntry, a VirtualService on the gateway and a
//! DestinationRule each, in ten files), and the largest number in the
//! other shapes of `ScaleShape` (one ServiceEntry with every host; a
//! Gateway per host; mesh-bound resources exported to their namespace;
//! routes to subsets), each of which once made a part of loading or
//! analysis quadratic, and the per-host shape in one file (parsed in parts
//! of whole documents on several threads). Per case: load + compile in process, `meshgate
//! check`, the gateway's time to ready and RSS, and a reload's time; then a
//! reload of the largest config on both proxies of the seed chain under
//! load (wrk), counting failed requests.
//!
//!   cargo bench -p meshgate --bench scale
//!   MESHGATE_BENCH_HOSTS=1,1000 cargo bench -p meshgate --bench scale
//!
//! Routing cost per request by size is crates/proxy/benches/route.rs
//! (criterion). Numbers, never assertions: see bench/README.md.
#![allow(clippy::unwrap_used, unreachable_pub)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use meshgate_proxy::testing::{ScaleShape, scale_files, snapshot};
use support::{Proc, TempDir};

const GATEWAY: &str = "curl-egress-tst/curl-egress-tst-gateway";
const SEED_HOST: &str = "jsonplaceholder.typicode.com";

fn main() {
    // `cargo test --all-targets` builds benches and runs them without
    // `--bench`: nothing to do then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("MESHGATE_BENCH_HOSTS")
        .unwrap_or_else(|_| "1,1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let largest = sizes.iter().copied().max().unwrap_or(1);
    // (hosts, shape, all in one file).
    let mut cases: Vec<(usize, ScaleShape, bool)> = sizes
        .iter()
        .map(|&n| (n, ScaleShape::PerHost, false))
        .collect();
    cases.extend(
        ScaleShape::ALL
            .into_iter()
            .filter(|&s| s != ScaleShape::PerHost)
            .map(|s| (largest, s, false)),
    );
    cases.push((largest, ScaleShape::PerHost, true));

    let dir = TempDir::new("bench-scale");
    let ca = dir.path("ca");
    run_ok(&["ca", "init", "--dir", &ca]);
    let standin = Proc::spawn(&[
        "stand-in",
        "--host",
        SEED_HOST,
        "--https-listen",
        "127.0.0.1:0",
        "--dns-listen",
        "127.0.0.1:0",
        "--ca-out",
        &dir.path("standin-ca.pem"),
    ]);
    let line = standin.wait_for("stand-in running", Duration::from_secs(10));
    let standin_addr = field(&line, "https=").to_owned();
    let chain = Chain {
        ca,
        extra_roots: dir.path("standin-ca.pem"),
        standin: standin_addr,
    };

    println!(
        "\n| external hosts | load + compile | `check` | gateway ready | gateway RSS | reload |\n|---|---|---|---|---|---|"
    );
    let mut rss_of = Vec::new();
    for (i, &(n, shape, one_file)) in cases.iter().enumerate() {
        let config = dir.path(&format!("config-{i}"));
        write_config(Path::new(&config), n, shape, one_file);
        let load = median3(|| load_and_compile(&config));
        let check = median3(|| {
            let t0 = Instant::now();
            run_ok(&["check", &config]);
            t0.elapsed()
        });
        let gateway = chain.gateway(&dir, &config, &format!("gw-{i}"));
        let rss = support::rss_mib(gateway.proc.child.id());
        let reload = reload_once(&gateway.proc, &config, 0);
        rss_of.push((n, shape, rss));
        let label = match shape {
            _ if one_file => format!("{n}, in one file"),
            ScaleShape::PerHost => n.to_string(),
            other => format!("{n}, {}", other.describe()),
        };
        println!(
            "| {label} | {} | {} | {} | {rss:.1} MiB | {} |",
            ms(load),
            ms(check),
            ms(gateway.ready_after),
            ms(reload)
        );
    }
    if let (Some(small), Some(big)) = (
        rss_of
            .iter()
            .find(|r| r.1 == ScaleShape::PerHost && r.0 == 1),
        rss_of
            .iter()
            .find(|r| r.1 == ScaleShape::PerHost && r.0 == largest),
    ) && largest > 1
    {
        println!(
            "\ngateway RSS per external host (1 to {largest}): {:.2} KiB",
            (big.2 - small.2) * 1024.0 / (largest - 1) as f64
        );
    }
    under_load(&dir, &chain, largest);
}

/// Seed files (unchanged) and the generated ones, in one folder; with
/// `one_file`, the generated documents all in `scale-0.yaml`.
fn write_config(dir: &Path, n: usize, shape: ScaleShape, one_file: bool) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(support::seed()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    let files = scale_files(n, shape);
    if one_file {
        let all: String = files.into_iter().map(|(_, text)| text).collect();
        std::fs::write(dir.join("scale-0.yaml"), all).unwrap();
        return;
    }
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

/// What a proxy does before it can serve: read and validate the files,
/// then build the gateway's view and compiled snapshot.
fn load_and_compile(config: &str) -> Duration {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t0 = Instant::now();
    let loaded = meshgate_config::load_paths(&[config]).unwrap();
    assert!(!loaded.has_errors(), "{:?}", loaded.error_messages());
    let snap = rt.block_on(snapshot(&loaded.config, GATEWAY));
    let took = t0.elapsed();
    drop(snap);
    took
}

/// What the seed chain's proxies need to run on loopback.
struct Chain {
    ca: String,
    extra_roots: String,
    standin: String,
}

struct Running {
    proc: Proc,
    ready_after: Duration,
    ready: serde_json::Value,
}

impl Chain {
    fn gateway(&self, dir: &TempDir, config: &str, name: &str) -> Running {
        let endpoints = dir.path(&format!("{name}-endpoints"));
        std::fs::write(&endpoints, format!("{SEED_HOST}:443 {}\n", self.standin)).unwrap();
        self.start(
            dir,
            name,
            &[
                "gateway",
                "--config",
                config,
                "--workload",
                GATEWAY,
                "--bind-address",
                "127.0.0.1",
                "--port",
                "80=0",
                "--extra-roots",
                &self.extra_roots,
                "--endpoints",
                &endpoints,
            ],
        )
    }

    fn sidecar(&self, dir: &TempDir, config: &str, gateway: &str, port: u16) -> Running {
        let endpoints = dir.path("sc-endpoints");
        std::fs::write(
            &endpoints,
            format!("curl-egress-tst.curl-egress-tst.svc.cluster.local:80 {gateway}\n"),
        )
        .unwrap();
        self.start(
            dir,
            "sc",
            &[
                "sidecar",
                "--config",
                config,
                "--workload",
                "curl-external-tst/curl-test",
                "--outbound-address",
                "127.0.0.1",
                "--outbound-port",
                &port.to_string(),
                "--explicit-proxy",
                "--endpoints",
                &endpoints,
            ],
        )
    }

    /// Starts a proxy with one worker, no access log, every port but its
    /// listener on a free port; times it from spawn to its ready file.
    fn start(&self, dir: &TempDir, name: &str, args: &[&str]) -> Running {
        let ready_file = dir.path(&format!("{name}.json"));
        let mut argv = args.to_vec();
        argv.extend_from_slice(&["--admin-address", "127.0.0.1"]);
        for port in [
            "--admin-port",
            "--prometheus-port",
            "--health-port",
            "--inspect-port",
        ] {
            argv.extend_from_slice(&[port, "0"]);
        }
        argv.extend_from_slice(&[
            "--ca-dir",
            &self.ca,
            "--access-log-format",
            "off",
            "--concurrency",
            "1",
            "--reload-interval",
            "1s",
            "--ready-file",
            &ready_file,
        ]);
        let t0 = Instant::now();
        let proc = Proc::spawn(&argv);
        // Written (atomically) once every listener is bound.
        let text = loop {
            if let Ok(text) = std::fs::read_to_string(&ready_file) {
                break text;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "{name} not ready within 120 s:\n{}",
                proc.log.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        let ready_after = t0.elapsed();
        let ready = serde_json::from_str(&text).unwrap();
        Running {
            proc,
            ready_after,
            ready,
        }
    }
}

/// Adds a ServiceEntry to the config and waits for the proxy to apply it;
/// the proxy's own measure (`elapsed_ms` of its "config reloaded" line).
fn reload_once(proxy: &Proc, config: &str, k: usize) -> Duration {
    let file = Path::new(config).join("scale-0.yaml");
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str(&format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  \
         name: reload-{k}\n  namespace: curl-egress-tst\nspec:\n  hosts:\n  \
         - reload-{k}.scale.example\n  ports:\n  - number: 80\n    name: http\n    \
         protocol: HTTP\n  location: MESH_EXTERNAL\n  resolution: DNS\n"
    ));
    std::fs::write(&file, text).unwrap();
    let line = proxy.wait_for("config reloaded", Duration::from_secs(120));
    Duration::from_millis(field(&line, "elapsed_ms=").parse().unwrap())
}

/// The seed chain (sidecar, gateway, stand-in) with the largest config,
/// under wrk for 15 s, while both proxies reload it three times.
fn under_load(dir: &TempDir, chain: &Chain, n: usize) {
    if Command::new("wrk").arg("--version").output().is_err() {
        println!("\nreload under load: skipped (wrk is not installed)");
        return;
    }
    let config = dir.path("config-load");
    write_config(Path::new(&config), n, ScaleShape::PerHost, false);
    let gateway = chain.gateway(dir, &config, "gw-load");
    let gw_addr = gateway.ready["listeners"][0]["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let port = support::free_port();
    let sidecar = chain.sidecar(dir, &config, &gw_addr, port);
    let script = dir.path("proxy.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.path = \"http://{SEED_HOST}/todos/1\"\nwrk.headers[\"Host\"] = \"{SEED_HOST}\"\n"
        ),
    )
    .unwrap();
    let (body, code, _) = support::curl(&[
        "-x",
        &format!("http://127.0.0.1:{port}"),
        &format!("http://{SEED_HOST}/todos/1"),
    ]);
    assert_eq!(code, "200", "the chain answers before the load: {body}");
    let wrk = std::process::Command::new("wrk")
        .args(["-t1", "-c8", "-d15s", "--latency", "-s", &script])
        .arg(format!("http://127.0.0.1:{port}"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut reloads = Vec::new();
    for k in 0..3 {
        std::thread::sleep(Duration::from_secs(3));
        let t = reload_once(&gateway.proc, &config, k + 1);
        sidecar
            .proc
            .wait_for("config reloaded", Duration::from_secs(120));
        reloads.push(ms(t));
    }
    let out = wrk.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let requests = report
        .lines()
        .find(|l| l.contains("requests in"))
        .unwrap_or("?");
    let failed: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .collect();
    println!(
        "\nreload of {n} hosts under load (wrk -c8, 15 s; gateway reloads took {}): {}; failed: {}",
        reloads.join(", "),
        requests.trim(),
        if failed.is_empty() {
            "none".to_owned()
        } else {
            failed.join("; ")
        }
    );
}

fn run_ok(args: &[&str]) {
    let out = support::meshgate(args);
    assert!(
        out.status.success(),
        "meshgate {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn median3(mut f: impl FnMut() -> Duration) -> Duration {
    let mut t = [f(), f(), f()];
    t.sort();
    t[1]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// The value of `key` in a log line (`key=value`, up to the next space).
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let at = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + key.len();
    line[at..].split_whitespace().next().unwrap_or("")
}
