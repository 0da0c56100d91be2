//! The control plane at scale, against a real kube-apiserver (tests/kube/build):
//! how long a change takes from `kubectl` to every watching proxy, and the
//! control plane's memory, with 100 proxy streams and 10,000 ServiceEntries.
//!
//!   cargo bench -p meshgate --bench control
//!   MESHGATE_BENCH_PROXIES=20 MESHGATE_BENCH_ENTRIES=1000 cargo bench -p meshgate --bench control
//!
//! The streams are the proxies' own client (`ConfigClient`), in this
//! process, each with its own certificate (a real proxy then loads and
//! applies the version; crates/cli/tests/kube.rs shows that end to end).
//! Numbers, never assertions: see bench/README.md.
#![allow(clippy::unwrap_used, unreachable_pub)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshgate_control::client::ConfigClient;
use meshgate_identity::{CertificateAuthority, Source, SpiffeId, WorkloadIdentity};
use serde_json::{Value, json};
use support::kube::*;
use support::{TempDir, curl};

const NS: &str = "curl-external-tst";

fn main() {
    // `cargo test --all-targets` builds benches and runs them without
    // `--bench`: nothing to do then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let proxies: usize = env_or("MESHGATE_BENCH_PROXIES", 100);
    let entries: usize = env_or("MESHGATE_BENCH_ENTRIES", 10_000);
    let cluster = cluster();
    let dir = TempDir::new("bench-control");
    let (ca_dir, _) = mesh_ca(&dir);
    let seed = support::seed();
    cluster.kubectl_ok(&["apply", "-f", &format!("{seed}/namespaces.yaml")], "");
    cluster.kubectl_ok(&["apply", "-f", &seed], "");
    cluster.kubectl_ok(&["-n", NS, "create", "serviceaccount", "default"], "");
    let pods: Vec<Value> = (0..proxies)
        .map(|i| {
            json!({ "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": format!("bench-{i}"), "namespace": NS, "labels": { "app": "bench" },
                              "annotations": { "sidecar.istio.io/inject": "true" } },
                "spec": { "nodeName": "node-1", "containers": [{ "name": "app", "image": "x" }] } })
        })
        .collect();
    cluster.kubectl_ok(
        &["create", "-f", "-"],
        &json!({ "apiVersion": "v1", "kind": "List", "items": pods }).to_string(),
    );

    let (control, ready) = start_control(
        &cluster,
        &dir,
        &[
            "--ca-dir",
            &ca_dir,
            "--ca-address",
            "127.0.0.1:0",
            "--webhook-address",
            "127.0.0.1:0",
        ],
    );
    let pid = control.child.id();
    let (monitoring, addr) = (
        ready["monitoring"].as_str().unwrap().to_owned(),
        ready["ca"].as_str().unwrap().to_owned(),
    );
    let mut rows = vec![(
        "control plane RSS, seed only, no streams".to_owned(),
        format!("{:.1} MiB", support::rss_mib(pid)),
    )];

    // The streams.
    eprintln!("bench: control plane up; starting {proxies} streams");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ca = Arc::new(CertificateAuthority::load(std::path::Path::new(&ca_dir)).unwrap());
    let latest: Arc<Vec<std::sync::atomic::AtomicU64>> =
        Arc::new((0..proxies).map(|_| Default::default()).collect());
    for i in 0..proxies {
        let (ca, addr, latest) = (ca.clone(), addr.clone(), latest.clone());
        rt.spawn(async move {
            let id = SpiffeId::new("cluster.local", NS, "default").unwrap();
            let identity = WorkloadIdentity::start(
                id,
                Source::InProcess {
                    ca,
                    ttl: Duration::from_secs(3600),
                },
            )
            .await
            .unwrap();
            let client = ConfigClient::new(&addr, &format!("{NS}/bench-{i}"), &identity).unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(client.run(tx));
            while let Some(v) = rx.recv().await {
                latest[i].store(v.version, std::sync::atomic::Ordering::SeqCst);
            }
        });
    }
    let version = |v: &Value| v["version"].as_u64().unwrap_or(0);
    let current = version(&configz_until(&monitoring, "a version", |_| true));
    let all_have = |v: u64, within: Duration| wait_all(&latest, v, within);
    rows.push((
        "streams connected and served".to_owned(),
        format!(
            "{:.2} s",
            all_have(current, Duration::from_secs(120)).as_secs_f64()
        ),
    ));
    rows.push((
        format!("control plane RSS, {proxies} streams"),
        format!("{:.1} MiB", support::rss_mib(pid)),
    ));

    // Every patch flips the seed Sidecar's mode: always a change.
    let flips = std::cell::Cell::new(0);
    let push = |label: &str, rows: &mut Vec<(String, String)>| {
        let mut times = Vec::new();
        for _ in 0..5 {
            let before = version(&configz_until(&monitoring, "a version", |_| true));
            flips.set(flips.get() + 1);
            let mode = if flips.get() % 2 == 1 {
                "ALLOW_ANY"
            } else {
                "REGISTRY_ONLY"
            };
            let t0 = Instant::now();
            cluster.kubectl_ok(
                &[
                    "-n",
                    NS,
                    "patch",
                    "sidecar",
                    "restrict-outbound-traffic",
                    "--type=merge",
                    "-p",
                    &format!(r#"{{"spec":{{"outboundTrafficPolicy":{{"mode":"{mode}"}}}}}}"#),
                ],
                "",
            );
            eprintln!("bench: patched to {mode} after version {before}");
            wait_all(&latest, before + 1, Duration::from_secs(300));
            times.push(t0.elapsed());
        }
        times.sort();
        rows.push((
            format!("kubectl patch → all {proxies} streams have it ({label}; median, max of 5)"),
            format!(
                "{:.0} ms, {:.0} ms",
                times[2].as_secs_f64() * 1e3,
                times[4].as_secs_f64() * 1e3
            ),
        ));
    };
    eprintln!("bench: streams served; patching");
    push("seed", &mut rows);
    eprintln!("bench: creating {entries} ServiceEntries");

    // 10,000 external hosts, each a ServiceEntry.
    cluster.kubectl_ok(&["create", "namespace", "bench-hosts"], "");
    let before = version(&configz_until(&monitoring, "a version", |_| true));
    let t0 = Instant::now();
    for chunk in (0..entries).collect::<Vec<_>>().chunks(1000) {
        let items: Vec<Value> = chunk.iter().map(|i| json!({
            "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": { "name": format!("host-{i}"), "namespace": "bench-hosts" },
            "spec": { "hosts": [format!("host-{i}.example.com")], "location": "MESH_EXTERNAL", "resolution": "DNS",
                      "ports": [{ "number": 443, "name": "tls", "protocol": "TLS" }] } })).collect();
        cluster.kubectl_ok(
            &["create", "-f", "-"],
            &json!({ "apiVersion": "v1", "kind": "List", "items": items }).to_string(),
        );
    }
    let created = t0.elapsed();
    eprintln!("bench: created in {created:?}; waiting for the version");
    let v = configz_until(&monitoring, "every ServiceEntry", |v| {
        count(v, "service_entries") > entries
    });
    let published = t0.elapsed();
    wait_all(
        &latest,
        version(&v).max(before + 1),
        Duration::from_secs(600),
    );
    rows.push((
        format!("{entries} ServiceEntries: created with kubectl / published / at all streams"),
        format!(
            "{:.1} s / {:.1} s / {:.1} s",
            created.as_secs_f64(),
            published.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        ),
    ));
    rows.push((
        format!("control plane RSS, {proxies} streams, {entries} ServiceEntries"),
        format!("{:.1} MiB", support::rss_mib(pid)),
    ));
    push(&format!("{entries} ServiceEntries"), &mut rows);

    let (_, _, _) = curl(&[&format!("http://{monitoring}/ready")]);
    println!("\n| measure | value |\n|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    drop(rt);
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Waits (bounded) until every stream has `version` or later.
fn wait_all(latest: &[std::sync::atomic::AtomicU64], version: u64, within: Duration) -> Duration {
    let t0 = Instant::now();
    while latest
        .iter()
        .any(|l| l.load(std::sync::atomic::Ordering::SeqCst) < version)
    {
        assert!(
            t0.elapsed() < within,
            "streams did not get version {version} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    t0.elapsed()
}
