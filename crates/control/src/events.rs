//! Kubernetes Events for objects the control plane refuses, so that
//! `kubectl describe` and `kubectl get events` show why a change did not
//! reach the proxies. One Event per object version and message.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, PostParams};
use meshgate_config::Diagnostic;

use crate::watch::Objects;

/// The Event `reason` for a refused object.
pub const REASON: &str = "InvalidConfig";
const COMPONENT: &str = "meshgate-control";
const EVENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes Events through the API server; remembers what it reported.
pub struct Reporter {
    client: Option<kube::Client>,
    /// (uid, resourceVersion, message) already reported.
    reported: BTreeSet<(String, String, String)>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("reported", &self.reported.len())
            .finish()
    }
}

impl Reporter {
    pub fn new(client: kube::Client) -> Reporter {
        Reporter {
            client: Some(client),
            reported: BTreeSet::new(),
        }
    }

    /// Reports nothing (tests of the loop without an API server).
    pub fn none() -> Reporter {
        Reporter {
            client: None,
            reported: BTreeSet::new(),
        }
    }

    /// One Warning Event per refused object, on that object.
    pub async fn refused(&mut self, errors: &[Diagnostic], objects: &Objects) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let mut still_refused = BTreeSet::new();
        for diagnostic in errors {
            let origin = &diagnostic.origin;
            let (namespace, name) = origin.name.split_once('/').unwrap_or(("", &origin.name));
            let Some((key, object)) = objects
                .objects
                .iter()
                .find(|(k, _)| k.kind == origin.kind && k.namespace == namespace && k.name == name)
            else {
                continue;
            };
            let meta = &object["metadata"];
            let text = |f: &str| meta[f].as_str().unwrap_or_default().to_owned();
            let message = diagnostic.to_string();
            still_refused.insert(text("uid"));
            if !self
                .reported
                .insert((text("uid"), text("resourceVersion"), message.clone()))
            {
                continue;
            }
            let event = event(key.kind, object, &message);
            // Events live in the object's namespace (`default` for
            // cluster-scoped objects, as kubectl shows them).
            let ns = if key.namespace.is_empty() {
                "default"
            } else {
                &key.namespace
            };
            let api: Api<Event> = Api::namespaced(client.clone(), ns);
            // The loop waits on this: bounded, and a lost Event is only logged.
            let created =
                tokio::time::timeout(EVENT_TIMEOUT, api.create(&PostParams::default(), &event))
                    .await;
            match created {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(object = %origin.name, error = %e, "cannot write an Event")
                }
                Err(_) => tracing::warn!(object = %origin.name, "writing an Event timed out"),
            }
        }
        // Forget objects no longer refused, so the memory stays bounded.
        self.reported
            .retain(|(uid, _, _)| still_refused.contains(uid));
    }
}

fn event(kind: &str, object: &serde_json::Value, message: &str) -> Event {
    let meta = &object["metadata"];
    let text = |f: &str| meta[f].as_str().map(str::to_owned);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    Event {
        metadata: ObjectMeta {
            name: Some(format!(
                "{}.{:016x}",
                text("name").unwrap_or_default(),
                fastrand::u64(..)
            )),
            namespace: text("namespace"),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: object["apiVersion"].as_str().map(str::to_owned),
            kind: Some(kind.to_owned()),
            name: text("name"),
            namespace: text("namespace"),
            uid: text("uid"),
            resource_version: text("resourceVersion"),
            ..ObjectReference::default()
        },
        reason: Some(REASON.to_owned()),
        message: Some(message.to_owned()),
        type_: Some("Warning".to_owned()),
        source: Some(EventSource {
            component: Some(COMPONENT.to_owned()),
            host: None,
        }),
        reporting_component: Some(COMPONENT.to_owned()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Event::default()
    }
}
