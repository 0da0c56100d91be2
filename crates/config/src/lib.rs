//! meshgate's config model: the user's Istio and Kubernetes YAML, loaded with
//! file and line for every resource, and the pure functions that turn it into
//! what one proxy needs (registry, proxy view) or what an operator needs to
//! fix (analyzers).

pub mod analyze;
pub mod diag;
pub mod load;
pub mod mesh;
pub mod model;
pub mod registry;
mod validate;
pub mod view;
pub mod yaml;

pub use diag::{Diagnostic, Level};
pub use load::{LoadError, Loaded, fingerprint, load_paths};
pub use mesh::{MeshSettings, PathNormalization, load_mesh_config};
pub use model::{Config, Kind};

#[cfg(test)]
pub(crate) mod testutil {
    use crate::{Config, Loaded};

    /// Loads YAML text that must be free of schema errors.
    pub(crate) fn config(text: &str) -> Config {
        let mut loaded = Loaded::default();
        crate::load::load_str("test.yaml", text, &mut loaded).expect("valid YAML");
        let errors: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
        assert!(errors.is_empty(), "{errors:?}");
        loaded.config
    }

    /// The seed example, as shipped in examples/seed.
    pub(crate) fn seed() -> Config {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/seed");
        crate::load_paths(&[dir]).expect("seed loads").config
    }
}
