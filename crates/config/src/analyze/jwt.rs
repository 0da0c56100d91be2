//! What depends on JWT authentication, which meshgate does not implement:
//! IST0149 (routes on JWT claims at a gateway no RequestAuthentication
//! covers, as istioctl analyze reports them) and MG0005 for each
//! RequestAuthentication (read, not enforced).

use crate::MeshSettings;
use crate::diag::{Diagnostic, Level, Origin};
use crate::model::networking::VirtualService;
use crate::model::{Config, Labels, Resource, labels_match};

/// Istio's prefix of a header match key that is a JWT claim.
const CLAIM_PREFIX: &str = "@request.auth.claims";

pub(super) fn analyze(config: &Config, mesh: &MeshSettings, out: &mut Vec<Diagnostic>) {
    for ra in &config.request_authentications {
        out.push(Diagnostic::new(
            Level::Warning,
            "MG0005",
            Origin::of(&ra.meta),
            "RequestAuthentication: meshgate does not implement JWT authentication: no token is validated or rejected, requestPrincipals and request.auth conditions match no request, and routes on JWT claims match none".to_owned(),
        ));
    }
    for vs in &config.virtual_services {
        claim_routes_without_authentication(config, mesh, vs, out);
    }
}

/// IST0149: a VirtualService routing on a claim, bound to a Gateway whose
/// pods no RequestAuthentication selects (in the root namespace or the
/// pod's own): one message per such pod.
fn claim_routes_without_authentication(
    config: &Config,
    mesh: &MeshSettings,
    vs: &Resource<VirtualService>,
    out: &mut Vec<Diagnostic>,
) {
    let Some(key) = claim_key(&vs.spec) else {
        return;
    };
    for gw_name in vs.spec.gateways.iter().filter(|g| *g != "mesh") {
        let full = match gw_name.split_once('/') {
            Some(_) => gw_name.clone(),
            None => format!("{}/{gw_name}", vs.meta.namespace),
        };
        let Some(gw) = config.gateways.iter().find(|g| g.meta.full_name() == full) else {
            // A missing Gateway is IST0101's to report.
            continue;
        };
        for pod in config
            .workloads
            .iter()
            .filter(|w| labels_match(&gw.spec.selector, &w.spec.pod_labels))
        {
            if !authenticated(config, mesh, &pod.meta.namespace, &pod.spec.pod_labels) {
                out.push(Diagnostic::new(
                    Level::Error,
                    "IST0149",
                    Origin::of(&vs.meta),
                    format!(
                        "The virtual service uses the JWT claim based routing (key: {key}) but found no request authentication for the gateway ({full}) pod ({}). The request authentication must first be applied for the gateway pods to validate the JWT token and make the claims available for routing.",
                        pod.meta.name
                    ),
                ));
            }
        }
    }
}

/// The first claim a rule's matches name (`headers`, then
/// `withoutHeaders`).
fn claim_key(vs: &VirtualService) -> Option<&str> {
    vs.http.iter().flat_map(|r| r.matches.iter()).find_map(|m| {
        let claim = |k: &&String| k.starts_with(CLAIM_PREFIX);
        m.headers
            .keys()
            .find(claim)
            .or_else(|| m.without_headers.keys().find(claim))
            .map(String::as_str)
    })
}

/// A RequestAuthentication in the root namespace or `namespace` selects
/// these pod labels (no selector: every pod).
fn authenticated(config: &Config, mesh: &MeshSettings, namespace: &str, labels: &Labels) -> bool {
    config.request_authentications.iter().any(|ra| {
        let ns = ra.meta.namespace.as_str();
        (ns == mesh.root_namespace || ns == namespace)
            && ra
                .spec
                .selector
                .as_ref()
                .is_none_or(|s| labels_match(&s.match_labels, labels))
    })
}
