//! CustomResourceDefinitions for the Istio kinds meshgate reads, generated
//! from the config model, so that a cluster without Istio takes the same
//! files (`meshgate crds | kubectl apply -f -`).
//!
//! Every version meshgate reads is served with one schema (Istio's
//! versions share theirs); `v1` is stored. The spec's schema is the
//! model's, so the API server refuses what `meshgate check` cannot read:
//! unknown fields (kubectl's strict field validation), wrong types and
//! unknown enum values.

use meshgate_config::Kind;
use meshgate_config::model::{networking, security};
use schemars::{JsonSchema, schema_for};
use serde_json::{Value, json};

use crate::schema::structural;

/// Names Kubernetes knows a kind by.
struct Names {
    plural: &'static str,
    short: &'static [&'static str],
    category: &'static str,
}

fn names(kind: Kind) -> Option<Names> {
    let (plural, short): (&str, &[&str]) = match kind {
        Kind::ServiceEntry => ("serviceentries", &["se"]),
        Kind::VirtualService => ("virtualservices", &["vs"]),
        Kind::DestinationRule => ("destinationrules", &["dr"]),
        Kind::Gateway => ("gateways", &["gw"]),
        Kind::Sidecar => ("sidecars", &[]),
        Kind::AuthorizationPolicy => ("authorizationpolicies", &["ap"]),
        Kind::PeerAuthentication => ("peerauthentications", &["pa"]),
        Kind::RequestAuthentication => ("requestauthentications", &["ra"]),
        _ => return None,
    };
    let category = match kind.group() {
        "networking.istio.io" => "networking-istio-io",
        _ => "security-istio-io",
    };
    Some(Names {
        plural,
        short,
        category,
    })
}

/// The spec's schema, as the model deserializes it.
fn spec_schema(kind: Kind) -> Option<Value> {
    fn of<T: JsonSchema>() -> Value {
        schema_for!(T).to_value()
    }
    Some(match kind {
        Kind::ServiceEntry => of::<networking::ServiceEntry>(),
        Kind::VirtualService => of::<networking::VirtualService>(),
        Kind::DestinationRule => of::<networking::DestinationRule>(),
        Kind::Gateway => of::<networking::Gateway>(),
        Kind::Sidecar => of::<networking::Sidecar>(),
        Kind::AuthorizationPolicy => of::<security::AuthorizationPolicy>(),
        Kind::PeerAuthentication => of::<security::PeerAuthentication>(),
        Kind::RequestAuthentication => of::<security::RequestAuthentication>(),
        _ => return None,
    })
}

/// One CustomResourceDefinition per Istio kind, as JSON objects.
pub fn crds() -> Result<Vec<Value>, String> {
    Kind::ALL
        .into_iter()
        .filter(|k| k.is_istio())
        .map(crd)
        .collect()
}

/// All of them as one multi-document YAML stream for `kubectl apply -f`.
pub fn crds_yaml() -> Result<String, String> {
    let mut out = String::new();
    for crd in crds()? {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

fn crd(kind: Kind) -> Result<Value, String> {
    let (Some(names), Some(spec)) = (names(kind), spec_schema(kind)) else {
        return Err(format!("{kind} is not a custom resource"));
    };
    let spec = structural(&spec).map_err(|e| format!("{kind}: {e}"))?;
    let schema = json!({
        "type": "object",
        "properties": {
            "spec": spec,
            // Written by controllers, never read by meshgate.
            "status": { "type": "object", "x-kubernetes-preserve-unknown-fields": true }
        }
    });
    let versions: Vec<Value> = kind
        .versions()
        .iter()
        .map(|v| {
            json!({
                "name": v,
                "served": true,
                "storage": *v == "v1",
                "schema": { "openAPIV3Schema": schema },
                "subresources": { "status": {} }
            })
        })
        .collect();
    let singular = kind.as_str().to_ascii_lowercase();
    Ok(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{}.{}", names.plural, kind.group()),
            "labels": { "app.kubernetes.io/part-of": "meshgate" }
        },
        "spec": {
            "group": kind.group(),
            "names": {
                "kind": kind.as_str(),
                "listKind": format!("{kind}List"),
                "plural": names.plural,
                "singular": singular,
                "shortNames": names.short,
                "categories": ["istio-io", names.category]
            },
            "scope": "Namespaced",
            "versions": versions
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_crd_per_istio_kind_with_every_version_served_and_v1_stored() {
        let crds = crds().unwrap();
        let names: Vec<&str> = crds
            .iter()
            .map(|c| c["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "serviceentries.networking.istio.io",
                "virtualservices.networking.istio.io",
                "destinationrules.networking.istio.io",
                "gateways.networking.istio.io",
                "sidecars.networking.istio.io",
                "authorizationpolicies.security.istio.io",
                "peerauthentications.security.istio.io",
                "requestauthentications.security.istio.io",
            ]
        );
        for crd in &crds {
            let versions = crd["spec"]["versions"].as_array().unwrap();
            let stored: Vec<&Value> = versions.iter().filter(|v| v["storage"] == true).collect();
            assert_eq!(stored.len(), 1);
            assert_eq!(stored[0]["name"], "v1");
        }
    }

    #[test]
    fn the_spec_schema_is_the_models() {
        let crds = crds().unwrap();
        let se = &crds[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(se["properties"]["hosts"]["items"]["type"], "string");
        assert_eq!(
            se["properties"]["resolution"]["enum"],
            json!(["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS"])
        );
        let text = serde_json::to_string(&crds).unwrap();
        for forbidden in ["$ref", "\"default\"", "anyOf", "oneOf", "uint32"] {
            assert!(!text.contains(forbidden), "{forbidden} in a CRD schema");
        }
    }
}
