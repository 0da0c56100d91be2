// Included by the build scripts of the crates with tests against a real
// kube-apiserver: without the binaries `tests/kube/build` makes, those
// tests are marked `#[cfg_attr(no_kube, ignore = "...")]` and reported as
// ignored, never as passed.
fn set_no_kube_cfg() {
    println!("cargo::rustc-check-cfg=cfg(no_kube)");
    println!("cargo::rerun-if-env-changed=MESHGATE_KUBE_BIN");
    let dir = std::env::var("MESHGATE_KUBE_BIN")
        .unwrap_or_else(|_| "/var/cache/meshgate/kube/v1.34.4".to_owned());
    // Built later: the next build looks again.
    println!("cargo::rerun-if-changed={dir}");
    let found = ["kube-apiserver", "etcd", "kubectl"]
        .iter()
        .all(|b| std::path::Path::new(&dir).join(b).is_file());
    if !found {
        println!("cargo::rustc-cfg=no_kube");
    }
}
