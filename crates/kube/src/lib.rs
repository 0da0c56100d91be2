//! meshgate on Kubernetes: what the cluster needs to take the Istio kinds
//! meshgate reads (CustomResourceDefinitions generated from the config
//! model), and the sidecar injection that `meshgate kube-inject` and the
//! control plane's webhook share.

pub mod crds;
pub mod inject;
pub mod schema;
#[cfg(feature = "testing")]
pub mod testing;

pub use crds::{crds, crds_yaml};
