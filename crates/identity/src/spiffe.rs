//! SPIFFE IDs as Istio uses them: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

use std::fmt;
use std::str::FromStr;

/// A workload identity in Istio's SPIFFE form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("\"{0}\" is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    #[error(
        "\"{0}\" is not an Istio SPIFFE ID: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Shape(String),
    #[error("\"{id}\": invalid {part} \"{value}\"")]
    Part {
        id: String,
        part: &'static str,
        value: String,
    },
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

/// Trust domains are DNS-like names (lowercase letters, digits, `.`, `-`, `_`).
fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// Namespace and service-account names: Kubernetes DNS-1123 subdomains.
fn valid_k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeError::Scheme(id.to_owned()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [td, "ns", ns, "sa", sa] = parts.as_slice() else {
            return Err(SpiffeError::Shape(id.to_owned()));
        };
        let part = |part, value: &str| SpiffeError::Part {
            id: id.to_owned(),
            part,
            value: value.to_owned(),
        };
        if !valid_trust_domain(td) {
            return Err(part("trust domain", td));
        }
        if !valid_k8s_name(ns) {
            return Err(part("namespace", ns));
        }
        if !valid_k8s_name(sa) {
            return Err(part("service account", sa));
        }
        Ok(SpiffeId {
            trust_domain: (*td).to_owned(),
            namespace: (*ns).to_owned(),
            service_account: (*sa).to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok = [
            "spiffe://cluster.local/ns/default/sa/sleep",
            "spiffe://corp.example.com/ns/curl-egress-tst/sa/curl-egress-tst",
            "spiffe://td_1/ns/a.b/sa/c-d",
        ];
        for id in ok {
            let parsed: SpiffeId = id.parse().unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(parsed.to_string(), id);
        }
        let bad = [
            (
                "http://cluster.local/ns/a/sa/b",
                "must start with spiffe://",
            ),
            ("spiffe://cluster.local/ns/a", "not an Istio SPIFFE ID"),
            (
                "spiffe://cluster.local/ns/a/sa/b/extra",
                "not an Istio SPIFFE ID",
            ),
            (
                "spiffe://cluster.local/namespace/a/sa/b",
                "not an Istio SPIFFE ID",
            ),
            ("spiffe:///ns/a/sa/b", "invalid trust domain"),
            ("spiffe://Cluster.Local/ns/a/sa/b", "invalid trust domain"),
            ("spiffe://cluster.local/ns/A/sa/b", "invalid namespace"),
            ("spiffe://cluster.local/ns/a/sa/", "invalid service account"),
        ];
        for (id, want) in bad {
            let err = id.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(err.contains(want), "{id}: {err}");
        }
    }

    #[test]
    fn accessors() {
        let id = SpiffeId::new("cluster.local", "ns1", "sa1").unwrap();
        assert_eq!(
            (id.trust_domain(), id.namespace(), id.service_account()),
            ("cluster.local", "ns1", "sa1")
        );
    }
}
