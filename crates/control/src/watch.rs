//! Watches of every kind the control plane reads, with kube-runtime's
//! relist and restart handling, turned into changes of one object map.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::Value;
use tokio::sync::mpsc;

/// One kind the control plane watches.
#[derive(Debug, Clone, Copy)]
pub struct Watched {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
}

const fn w(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
) -> Watched {
    Watched {
        group,
        version,
        kind,
        plural,
    }
}

/// The Istio kinds of the config model, and the Kubernetes objects that say
/// which workloads, identities and services exist.
pub const WATCHED: &[Watched] = &[
    w(
        "networking.istio.io",
        "v1",
        "ServiceEntry",
        "serviceentries",
    ),
    w(
        "networking.istio.io",
        "v1",
        "VirtualService",
        "virtualservices",
    ),
    w(
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
    ),
    w("networking.istio.io", "v1", "Gateway", "gateways"),
    w("networking.istio.io", "v1", "Sidecar", "sidecars"),
    w(
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    w(
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
    ),
    w("", "v1", "Namespace", "namespaces"),
    w("", "v1", "ServiceAccount", "serviceaccounts"),
    w("", "v1", "Service", "services"),
    w("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    w("", "v1", "Pod", "pods"),
];

impl Watched {
    fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }
}

/// Where an object lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

/// A change one watch saw.
#[derive(Debug)]
pub enum Change {
    /// The watch listed everything of its kind (at start and after every
    /// restart): these objects replace all of that kind.
    Listed(&'static str, Vec<(Key, Value)>),
    Applied(Key, Value),
    Deleted(Key),
}

/// Every object the watches have seen, by key, and which kinds have been
/// listed at least once (the control plane is ready when all have).
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub objects: BTreeMap<Key, Arc<Value>>,
    pub listed: Vec<&'static str>,
}

impl Objects {
    /// Applies one change; false when nothing meshgate reads changed (an
    /// update that only bumped the resourceVersion, as a status write does).
    pub fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Listed(kind, objects) => {
                self.objects.retain(|k, _| k.kind != kind);
                for (key, value) in objects {
                    self.objects.insert(key, Arc::new(value));
                }
                if !self.listed.contains(&kind) {
                    self.listed.push(kind);
                }
                true
            }
            Change::Applied(key, value) => {
                let same = self
                    .objects
                    .get(&key)
                    .is_some_and(|old| same_but_version(old, &value));
                self.objects.insert(key, Arc::new(value));
                !same
            }
            Change::Deleted(key) => self.objects.remove(&key).is_some(),
        }
    }

    /// True once every watched kind has been listed.
    pub fn synced(&self) -> bool {
        WATCHED.iter().all(|w| self.listed.contains(&w.kind))
    }
}

/// Equal but for `metadata.resourceVersion`.
fn same_but_version(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        v
    };
    strip(a) == strip(b)
}

/// Starts one watch per kind; their changes arrive on the returned channel.
/// A watch that fails (API server away, RBAC) retries with backoff and
/// relists, so the channel never ends while the client lives.
pub fn watch_all(client: kube::Client) -> mpsc::Receiver<Change> {
    let (tx, rx) = mpsc::channel(1024);
    for watched in WATCHED {
        tokio::spawn(watch_one(client.clone(), *watched, tx.clone()));
    }
    rx
}

async fn watch_one(client: kube::Client, watched: Watched, tx: mpsc::Sender<Change>) {
    let api: Api<DynamicObject> = Api::all_with(client, &watched.api_resource());
    let mut events = watcher(api, watched).boxed();
    let mut listing: Vec<(Key, Value)> = Vec::new();
    while let Some(event) = events.next().await {
        let change = match event {
            Ok(Event::Init) => {
                listing.clear();
                continue;
            }
            Ok(Event::InitApply(obj)) => {
                listing.extend(keyed(&watched, obj));
                continue;
            }
            Ok(Event::InitDone) => Change::Listed(watched.kind, std::mem::take(&mut listing)),
            Ok(Event::Apply(obj)) => match keyed(&watched, obj) {
                Some((key, value)) => Change::Applied(key, value),
                None => continue,
            },
            Ok(Event::Delete(obj)) => match keyed(&watched, obj) {
                Some((key, _)) => Change::Deleted(key),
                None => continue,
            },
            Err(e) => {
                tracing::warn!(kind = watched.kind, error = %e, "watch failed; retrying");
                continue;
            }
        };
        if tx.send(change).await.is_err() {
            return;
        }
    }
}

fn watcher(
    api: Api<DynamicObject>,
    _: Watched,
) -> impl futures_util::Stream<Item = Result<Event<DynamicObject>, watcher::Error>> {
    watcher::watcher(api, watcher::Config::default()).default_backoff()
}

/// The object as the API server holds it, with the type fields set (list
/// items lack them), without managedFields (noise for every reader) and
/// without status (written by controllers and kubelets, read by no one
/// here).
fn keyed(watched: &Watched, obj: DynamicObject) -> Option<(Key, Value)> {
    let key = Key {
        kind: watched.kind,
        namespace: obj.metadata.namespace.clone().unwrap_or_default(),
        name: obj.metadata.name.clone()?,
    };
    let mut value = serde_json::to_value(&obj).ok()?;
    let map = value.as_object_mut()?;
    let api_version = if watched.group.is_empty() {
        watched.version.to_owned()
    } else {
        format!("{}/{}", watched.group, watched.version)
    };
    map.insert("apiVersion".into(), Value::String(api_version));
    map.insert("kind".into(), Value::String(watched.kind.into()));
    map.remove("status");
    if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    Some((key, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_update_that_only_bumps_the_resource_version_changes_nothing() {
        let key = Key {
            kind: "Pod",
            namespace: "a".into(),
            name: "p".into(),
        };
        let pod = |rv: &str, sa: &str| json!({ "metadata": { "name": "p", "resourceVersion": rv }, "spec": { "serviceAccountName": sa } });
        let mut objects = Objects::default();
        assert!(objects.apply(Change::Applied(key.clone(), pod("1", "x"))));
        assert!(!objects.apply(Change::Applied(key.clone(), pod("2", "x"))));
        assert_eq!(objects.objects[&key]["metadata"]["resourceVersion"], "2");
        assert!(objects.apply(Change::Applied(key.clone(), pod("3", "y"))));
        assert!(objects.apply(Change::Deleted(key.clone())));
        assert!(!objects.apply(Change::Deleted(key)));
    }
}
