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
    rerun_if_created(std::path::Path::new(&dir));
    let found = ["kube-apiserver", "etcd", "kubectl"]
        .iter()
        .all(|b| std::path::Path::new(&dir).join(b).is_file());
    if !found {
        println!("cargo::rustc-cfg=no_kube");
    }
}

/// Reruns the build script when `path` changes or comes to be. Cargo
/// takes a missing path as changed, so every build would run the script
/// again and rebuild the crate: watch the nearest ancestor that exists.
fn rerun_if_created(path: &std::path::Path) {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(path);
    println!("cargo::rerun-if-changed={}", existing.display());
}

/// Where `tests/istio/build` puts istiod's `pilot-discovery`.
#[allow(dead_code)]
const ISTIOD_DEFAULT: &str =
    "/var/cache/meshgate/istio/v0.0.0-20260827124520-eed52ebb66ad/pilot-discovery";

// The Istio interop tests need istiod, istio-csr and analyzers-testdata
// beside it (`tests/istio/build`); without them they are ignored
// (`no_istiod`). The path is passed to the tests.
#[allow(dead_code)]
fn set_no_istiod_cfg() {
    println!("cargo::rustc-check-cfg=cfg(no_istiod)");
    println!("cargo::rerun-if-env-changed=MESHGATE_ISTIOD_BIN");
    let bin = std::env::var("MESHGATE_ISTIOD_BIN").unwrap_or_else(|_| ISTIOD_DEFAULT.to_owned());
    println!("cargo::rustc-env=MESHGATE_ISTIOD_BIN={bin}");
    let bin = std::path::Path::new(&bin);
    // Built later: the next build looks again.
    if let Some(dir) = bin.parent() {
        rerun_if_created(dir);
    }
    if !bin.is_file()
        || !bin.with_file_name("istio-csr").is_file()
        || !bin.with_file_name("analyzers-testdata").is_dir()
    {
        println!("cargo::rustc-cfg=no_istiod");
    }
}
