//! The control plane's admission webhooks (istiod's port 15017), called by
//! the API server over TLS with a certificate from the mesh CA for the
//! control plane's Service name:
//!
//! - `/inject`: Pods get the proxy, as `meshgate kube-inject` would give
//!   them, by the namespace's labels and the pod's own;
//! - `/validate`: Istio objects are loaded as `meshgate check` loads a file;
//!   an error refuses the object with check's message, warnings are passed
//!   back as admission warnings.
//!
//! Whether the API server admits objects when the webhook is away is the
//! webhook configuration's `failurePolicy` (Istio: Fail for validation).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use meshgate_kube::inject::Injector;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::run::State;

pub const INJECT_PATH: &str = "/inject";
pub const VALIDATE_PATH: &str = "/validate";
/// The API server sends objects up to its own request limit (3 MiB).
const MAX_BODY: usize = 4 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the webhooks until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    injector: Injector,
    state: watch::Receiver<Arc<State>>,
) {
    let tls = tokio_rustls::TlsAcceptor::from(tls);
    let injector = Arc::new(injector);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (tls, injector, state) = (tls.clone(), injector.clone(), state.clone());
        tokio::spawn(async move {
            let Ok(Ok(stream)) = tokio::time::timeout(TIMEOUT, tls.accept(tcp)).await else {
                return;
            };
            let svc = hyper::service::service_fn(move |req| {
                let (injector, state) = (injector.clone(), state.clone());
                async move { Ok::<_, Infallible>(handle(&injector, &state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    injector: &Injector,
    state: &watch::Receiver<Arc<State>>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    if req.method() != Method::POST || (path != INJECT_PATH && path != VALIDATE_PATH) {
        return reply(
            StatusCode::NOT_FOUND,
            json!({ "error": "POST /inject or /validate" }),
        );
    }
    let review: Value = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => match serde_json::from_slice(&body.to_bytes()) {
            Ok(v) => v,
            Err(e) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({ "error": format!("not an AdmissionReview: {e}") }),
                );
            }
        },
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({ "error": format!("cannot read the body: {e}") }),
            );
        }
    };
    let request = &review["request"];
    let response = if path == INJECT_PATH {
        inject(injector, &state.borrow(), request)
    } else {
        validate(request)
    };
    let mut response = response;
    response["uid"] = request["uid"].clone();
    reply(
        StatusCode::OK,
        json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response }),
    )
}

/// A Pod with the proxy injected, as a JSON patch. Never refuses a pod.
fn inject(injector: &Injector, state: &State, request: &Value) -> Value {
    let mut pod = request["object"].clone();
    let namespace = request["namespace"].as_str().unwrap_or_default();
    let ns_labels = state.snapshot.as_ref().and_then(|s| {
        s.config
            .namespaces
            .iter()
            .find(|n| n.meta.name == namespace)
            .map(|n| n.meta.labels.clone())
    });
    let kind = injector.inject_pod(&mut pod, ns_labels.as_ref());
    if kind == meshgate_config::registry::ProxyKind::None {
        return json!({ "allowed": true });
    }
    tracing::info!(%namespace, pod = pod["metadata"]["generateName"].as_str().or(pod["metadata"]["name"].as_str()).unwrap_or(""), ?kind, "injected");
    // `add` replaces a member that exists (RFC 6902).
    let patch = json!([
        { "op": "add", "path": "/metadata/labels", "value": pod["metadata"]["labels"] },
        { "op": "add", "path": "/metadata/annotations", "value": pod["metadata"]["annotations"] },
        { "op": "replace", "path": "/spec", "value": pod["spec"] },
    ]);
    json!({
        "allowed": true,
        "patchType": "JSONPatch",
        "patch": meshgate_identity::cert::base64_encode(patch.to_string().as_bytes()),
    })
}

/// Refuses an Istio object `meshgate check` would refuse, with its message.
fn validate(request: &Value) -> Value {
    if request["operation"] == "DELETE" {
        return json!({ "allowed": true });
    }
    let text = serde_saphyr::to_string(&request["object"]).unwrap_or_default();
    let mut loaded = meshgate_config::Loaded::default();
    if let Err(e) =
        meshgate_config::load::load_str(crate::compile::CLUSTER_FILE, &text, &mut loaded)
    {
        return denied(&e.to_string());
    }
    let errors = loaded.error_messages();
    if !errors.is_empty() {
        return denied(&errors.join("; "));
    }
    let warnings: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
    json!({ "allowed": true, "warnings": warnings })
}

fn denied(message: &str) -> Value {
    json!({ "allowed": false, "status": { "code": 400, "reason": "Invalid", "message": message } })
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The webhook configurations deploy/ installs: the control plane writes
/// the mesh root into their `caBundle` at start, as istiod does, so the
/// manifests need no certificate.
pub const CONFIGURATIONS: [(&str, bool); 2] = [
    ("meshgate-sidecar-injector", true),
    ("meshgate-validator", false),
];

/// Writes `root_pem` as the caBundle of every webhook of the named
/// configurations (`true`: mutating). A configuration that does not exist
/// is skipped: webhooks are optional.
pub async fn patch_ca_bundles(
    client: &kube::Client,
    root_pem: &str,
    configurations: &[(&str, bool)],
) {
    use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
    let bundle = meshgate_identity::cert::base64_encode(root_pem.as_bytes());
    for (name, mutating) in configurations {
        let kind = if *mutating {
            "MutatingWebhookConfiguration"
        } else {
            "ValidatingWebhookConfiguration"
        };
        let gvk = GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::from_gvk(&gvk));
        let mut config = match api.get_opt(name).await {
            Ok(Some(c)) => c,
            Ok(None) => {
                tracing::info!(%kind, %name, "no webhook configuration to update");
                continue;
            }
            Err(e) => {
                tracing::warn!(%kind, %name, error = %e, "cannot read the webhook configuration");
                continue;
            }
        };
        for webhook in config.data["webhooks"].as_array_mut().into_iter().flatten() {
            webhook["clientConfig"]["caBundle"] = json!(bundle);
        }
        match api.replace(name, &PostParams::default(), &config).await {
            Ok(_) => tracing::info!(%kind, %name, "webhook caBundle set to the mesh root"),
            Err(e) => {
                tracing::warn!(%kind, %name, error = %e, "cannot update the webhook configuration")
            }
        }
    }
}
