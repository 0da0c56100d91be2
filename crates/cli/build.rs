//! Tests that need root (network namespaces, iptables, `meshgate up` with
//! namespaces) are reported as ignored, with the reason, when the tests
//! are built by another user: they are marked `#[cfg_attr(not_root,
//! ignore = "...")]`. Tests against a real Kubernetes API server need
//! the binaries `tests/kube/build` makes; without them they are ignored the
//! same way (`no_kube`).

include!("../../tests/kube/cfg.rs");

fn main() {
    println!("cargo::rustc-check-cfg=cfg(not_root)");
    // Who builds: a different user builds again.
    println!("cargo::rerun-if-env-changed=USER");
    println!("cargo::rerun-if-env-changed=SUDO_UID");
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !root {
        println!("cargo::rustc-cfg=not_root");
    }

    set_no_kube_cfg();
    set_no_istiod_cfg();
}
