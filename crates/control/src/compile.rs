//! From the watched objects to the config model: each object goes through
//! the same loader and validation as a file, so the cluster and
//! `meshgate check` agree on what is valid.
//!
//! An object is loaded as the YAML `kubectl get KIND NAME -o yaml` prints
//! (keys sorted, no managedFields), so the line in a message is the line
//! there; its file is shown as `cluster`.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use meshgate_config::{Config, Diagnostic, Level, Loaded};

use crate::watch::Objects;

/// The name diagnostics give as the file of a watched object.
pub const CLUSTER_FILE: &str = "cluster";

/// A good config, as published to the proxies.
#[derive(Debug)]
pub struct Snapshot {
    /// Counts up from 1 with every published change.
    pub version: u64,
    /// What the objects hash to: unchanged objects publish nothing.
    pub hash: u64,
    pub config: Arc<Config>,
    /// Warnings found while loading (errors keep a config from being
    /// published at all).
    pub warnings: Vec<Diagnostic>,
}

/// Loads every object; `Err` holds the errors when any object is invalid,
/// and then nothing of this state may be published.
pub fn compile(objects: &Objects) -> Result<(Config, Vec<Diagnostic>), Vec<Diagnostic>> {
    let mut loaded = Loaded::default();
    for value in objects.objects.values() {
        // Serializing a JSON value to YAML and reading it back cannot fail
        // short of a bug; such an object is an error, never skipped.
        let text = serde_saphyr::to_string(value.as_ref()).unwrap_or_default();
        if let Err(e) = meshgate_config::load::load_str(CLUSTER_FILE, &text, &mut loaded) {
            tracing::error!(error = %e, "a watched object does not read back");
        }
    }
    let (errors, warnings): (Vec<_>, Vec<_>) = loaded
        .diagnostics
        .into_iter()
        .partition(|d| d.level == Level::Error);
    if errors.is_empty() {
        Ok((loaded.config, warnings))
    } else {
        Err(errors)
    }
}

/// A hash of what the config says: a Pod's status or an object's
/// resourceVersion changing is not a new config.
pub fn hash(config: &Config) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(config)
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}
