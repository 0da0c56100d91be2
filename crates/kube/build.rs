//! Tests against a real Kubernetes API server need kube-apiserver, etcd and
//! kubectl (built by `tests/kube/build`); without them they are ignored.

include!("../../tests/kube/cfg.rs");

fn main() {
    set_no_kube_cfg();
}
