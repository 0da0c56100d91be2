//! The CA's side of Kubernetes: a proxy authenticates its certificate
//! request with its projected service-account token (audience `istio-ca`),
//! checked by the TokenReview API, and gets only that service account's
//! SPIFFE ID; the root is published as ConfigMap `istio-ca-root-cert` in
//! every namespace, as istiod does.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use meshgate_identity::caserver::Authenticator;

/// The audience a proxy's token must be for, as Istio's.
pub const AUDIENCE: &str = "istio-ca";
/// The ConfigMap with the mesh's root certificate, and its key.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
pub const ROOT_KEY: &str = "root-cert.pem";
const FIELD_MANAGER: &str = "meshgate-control";
/// A TokenReview that takes longer fails the request (503, retry-safe).
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Authenticates tokens with the API server's TokenReview.
#[derive(Clone)]
pub struct TokenReviewer {
    client: kube::Client,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenReviewer")
    }
}

impl TokenReviewer {
    pub fn new(client: kube::Client) -> TokenReviewer {
        TokenReviewer { client }
    }
}

impl Authenticator for TokenReviewer {
    async fn authenticate(&self, token: &str) -> Result<Option<(String, String)>, String> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| format!("TokenReview took more than {REVIEW_TIMEOUT:?}"))?
                .map_err(|e| format!("TokenReview: {e}"))?;
        Ok(reviewed.status.and_then(|status| {
            // Valid, for our audience, and a service account's.
            let for_us = status
                .audiences
                .unwrap_or_default()
                .iter()
                .any(|a| a == AUDIENCE);
            if status.authenticated != Some(true) || !for_us {
                return None;
            }
            service_account(&status.user?.username?)
        }))
    }
}

/// `system:serviceaccount:NS:NAME` → (NS, NAME).
fn service_account(username: &str) -> Option<(String, String)> {
    let (ns, name) = username
        .strip_prefix("system:serviceaccount:")?
        .split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':'))
        .then(|| (ns.to_owned(), name.to_owned()))
}

/// Writes `istio-ca-root-cert` into every namespace it has not yet written
/// to (server-side apply); a copy that is deleted or changed is forgotten
/// ([`RootPublisher::forget`], from [`tampered_roots`]) and written again.
#[derive(Debug, Default)]
pub struct RootPublisher {
    done: BTreeSet<String>,
}

impl RootPublisher {
    pub async fn publish(&mut self, client: &kube::Client, root_pem: &str, namespaces: &[String]) {
        for ns in namespaces {
            if self.done.contains(ns) {
                continue;
            }
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(ROOT_CONFIGMAP.to_owned()),
                    namespace: Some(ns.clone()),
                    labels: Some([("istio.io/config".to_owned(), "true".to_owned())].into()),
                    ..ObjectMeta::default()
                },
                data: Some([(ROOT_KEY.to_owned(), root_pem.to_owned())].into()),
                ..ConfigMap::default()
            };
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match api.patch(ROOT_CONFIGMAP, &params, &Patch::Apply(&cm)).await {
                Ok(_) => {
                    tracing::info!(namespace = %ns, "root certificate published");
                    self.done.insert(ns.clone());
                }
                // A namespace being deleted refuses new objects.
                Err(e) => {
                    tracing::warn!(namespace = %ns, error = %e, "cannot publish the root certificate")
                }
            }
        }
        self.done.retain(|ns| namespaces.contains(ns));
    }

    /// The namespace's copy is gone or wrong: the next publish writes it.
    pub fn forget(&mut self, namespace: &str) {
        self.done.remove(namespace);
    }
}

/// Watches every `istio-ca-root-cert` ConfigMap and sends the namespace of
/// each one deleted or holding anything but `root_pem`, as istiod's
/// namespace controller restores them.
pub fn tampered_roots(
    client: kube::Client,
    root_pem: String,
) -> tokio::sync::mpsc::Receiver<String> {
    use futures_util::StreamExt;
    use kube::runtime::WatchStreamExt;
    use kube::runtime::watcher::{self, Event};
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let api: Api<ConfigMap> = Api::all(client);
        let config = watcher::Config::default().fields(&format!("metadata.name={ROOT_CONFIGMAP}"));
        let mut events = watcher::watcher(api, config).default_backoff().boxed();
        while let Some(event) = events.next().await {
            let (cm, deleted) = match event {
                Ok(Event::Apply(cm) | Event::InitApply(cm)) => (cm, false),
                Ok(Event::Delete(cm)) => (cm, true),
                Ok(Event::Init | Event::InitDone) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "watching the root ConfigMaps failed; retrying");
                    continue;
                }
            };
            let holds_root = cm.data.as_ref().and_then(|d| d.get(ROOT_KEY)) == Some(&root_pem);
            if deleted || !holds_root {
                let ns = cm.metadata.namespace.unwrap_or_default();
                tracing::info!(namespace = %ns, deleted, "root certificate ConfigMap to restore");
                if tx.send(ns).await.is_err() {
                    return;
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_service_account_users_are_identities() {
        let sa = |n: &str, s: &str| Some((n.to_owned(), s.to_owned()));
        assert_eq!(
            service_account("system:serviceaccount:curl-external-tst:default"),
            sa("curl-external-tst", "default")
        );
        for other in [
            "admin",
            "system:serviceaccount:ns",
            "system:serviceaccount::x",
            "system:serviceaccount:a:b:c",
            "system:node:n1",
        ] {
            assert_eq!(service_account(other), None, "{other}");
        }
    }
}
