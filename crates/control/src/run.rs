//! The control plane's loop: changes from the watches, debounced, compiled,
//! and published as a new version when the config is good and different.

use std::sync::Arc;
use std::time::Duration;

use meshgate_config::Diagnostic;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::compile::{Compiled, Snapshot, compile, hash};
use crate::events::Reporter;
use crate::watch::{Change, Objects};

/// Istio's debounce: publish 100 ms after the last change, and at least
/// every 10 s while changes keep coming.
const QUIET: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(10);

/// What the control plane has: the published config, and the errors that
/// keep the newest state of the cluster from being published.
#[derive(Debug, Default)]
pub struct State {
    pub snapshot: Option<Arc<Snapshot>>,
    pub rejected: Vec<Diagnostic>,
}

/// Runs until the watches end (never, while the client lives).
pub async fn run(
    mut changes: mpsc::Receiver<Change>,
    state: watch::Sender<Arc<State>>,
    mut reporter: Reporter,
) {
    let mut objects = Objects::default();
    // Something changed since the last publish (or nothing was published).
    let mut dirty = true;
    while let Some(change) = changes.recv().await {
        dirty |= objects.apply(change);
        dirty |= debounce(&mut changes, &mut objects).await;
        if objects.synced() && dirty {
            dirty = false;
            publish(&objects, &state);
            let rejected = state.borrow().rejected.clone();
            reporter.refused(&rejected, &objects).await;
        }
    }
}

/// Takes changes until none came for [`QUIET`] or [`MAX_DELAY`] passed;
/// true when one of them changed something.
async fn debounce(changes: &mut mpsc::Receiver<Change>, objects: &mut Objects) -> bool {
    let deadline = Instant::now() + MAX_DELAY;
    let mut changed = false;
    loop {
        let quiet = (Instant::now() + QUIET).min(deadline);
        match tokio::time::timeout_at(quiet, changes.recv()).await {
            Ok(Some(change)) => changed |= objects.apply(change),
            Ok(None) | Err(_) => return changed,
        }
    }
}

fn publish(objects: &Objects, state: &watch::Sender<Arc<State>>) {
    let current = state.borrow().snapshot.clone();
    match compile(objects) {
        Err(errors) => {
            for e in &errors {
                tracing::error!(diagnostic = %e, "invalid config in the cluster; keeping the last good config");
            }
            state.send_replace(Arc::new(State {
                snapshot: current,
                rejected: errors,
            }));
        }
        Ok(Compiled {
            config,
            documents,
            warnings,
        }) => {
            let hash = hash(&config);
            let rejected = Vec::new();
            if current.as_ref().is_some_and(|s| s.hash == hash) {
                if !state.borrow().rejected.is_empty() {
                    state.send_replace(Arc::new(State {
                        snapshot: current,
                        rejected,
                    }));
                }
                return;
            }
            let version = current.as_ref().map_or(1, |s| s.version + 1);
            tracing::info!(version, summary = %config.summary(), "config version published");
            let snapshot = Snapshot {
                version,
                hash,
                config: Arc::new(config),
                documents: Arc::new(documents),
                warnings,
                pushes: Default::default(),
                workloads: Default::default(),
            };
            state.send_replace(Arc::new(State {
                snapshot: Some(Arc::new(snapshot)),
                rejected,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::{Key, WATCHED};
    use serde_json::json;

    fn vs(name: &str, uri: serde_json::Value) -> (Key, serde_json::Value) {
        let key = Key {
            kind: "VirtualService",
            namespace: "default".into(),
            name: name.into(),
        };
        let value = json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": { "name": name, "namespace": "default", "uid": "u1", "resourceVersion": "7" },
            "spec": { "hosts": ["a.example.com"], "http": [{ "match": [{ "uri": uri }],
                "route": [{ "destination": { "host": "a.example.com" } }] }] }
        });
        (key, value)
    }

    /// Feeds changes into a running loop and waits for the state to move.
    struct Loop {
        tx: mpsc::Sender<Change>,
        state: watch::Receiver<Arc<State>>,
    }

    impl Loop {
        fn start() -> Loop {
            let (tx, rx) = mpsc::channel(16);
            let (state_tx, state) = watch::channel(Arc::new(State::default()));
            tokio::spawn(run(rx, state_tx, Reporter::none()));
            Loop { tx, state }
        }

        async fn send(&mut self, change: Change) -> Arc<State> {
            self.state.mark_unchanged();
            self.tx.send(change).await.unwrap();
            tokio::time::timeout(Duration::from_secs(5), self.state.changed())
                .await
                .unwrap()
                .unwrap();
            self.state.borrow().clone()
        }
    }

    #[tokio::test]
    async fn nothing_is_published_before_every_kind_is_listed_then_only_good_changes() {
        let mut l = Loop::start();
        for w in &WATCHED[1..] {
            l.tx.send(Change::Listed(w.kind, Vec::new())).await.unwrap();
        }
        assert!(
            l.state.borrow().snapshot.is_none(),
            "published before the first list of every kind"
        );

        let s = l.send(Change::Listed(WATCHED[0].kind, Vec::new())).await;
        assert_eq!(s.snapshot.as_ref().unwrap().version, 1);

        let (key, good) = vs("a", json!({ "prefix": "/a" }));
        let s = l.send(Change::Applied(key.clone(), good)).await;
        let snap = s.snapshot.as_ref().unwrap();
        assert_eq!((snap.version, snap.config.virtual_services.len()), (2, 1));

        // Invalid for meshgate: refused, version 2 stays.
        let (_, bad) = vs("a", json!({ "prefix": "/a", "exact": "/b" }));
        let s = l.send(Change::Applied(key.clone(), bad)).await;
        assert_eq!(s.snapshot.as_ref().unwrap().version, 2);
        assert_eq!(s.rejected.len(), 1);
        assert!(
            s.rejected[0]
                .to_string()
                .contains("(VirtualService default/a cluster:"),
            "{}",
            s.rejected[0]
        );

        // Deleted: the config changed (no VirtualService), a new version.
        let s = l.send(Change::Deleted(key)).await;
        assert_eq!(
            (s.snapshot.as_ref().unwrap().version, s.rejected.len()),
            (3, 0)
        );
    }
}
