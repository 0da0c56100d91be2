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
    order_hot_code();
}

/// Release builds of `meshgate` put the functions a proxy runs per request
/// (`hot-code.order`, written by `bench/hot-code`) next to each other at
/// the start of the code. Scattered over the binary's 19 MB of code they
/// touched ~126 windows of 64 KiB (the kernel maps file pages around each
/// fault): ~8 MiB of each proxy's resident memory for ~1.1 MB of code.
/// The linker is rust-lld, rustc's default on x86_64 Linux; a listed name
/// the binary lacks is skipped (the order goes stale, the build is fine).
/// `MESHGATE_NO_CODE_ORDER=1`, or a linker set in RUSTFLAGS, leaves the
/// order to the linker.
fn order_hot_code() {
    println!("cargo::rerun-if-changed=hot-code.order");
    println!("cargo::rerun-if-env-changed=MESHGATE_NO_CODE_ORDER");
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let wanted = env("PROFILE") == "release"
        && env("TARGET") == "x86_64-unknown-linux-gnu"
        && !env("CARGO_ENCODED_RUSTFLAGS").contains("link")
        && std::env::var_os("MESHGATE_NO_CODE_ORDER").is_none();
    if wanted {
        let order = format!("{}/hot-code.order", env("CARGO_MANIFEST_DIR"));
        println!("cargo::rustc-link-arg-bin=meshgate=-Wl,--symbol-ordering-file={order}");
        println!("cargo::rustc-link-arg-bin=meshgate=-Wl,--no-warn-symbol-ordering");
    }
}
