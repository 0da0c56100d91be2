//! Types shared by several resource kinds.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Kubernetes-style label map (sorted, so output is stable).
pub type Labels = BTreeMap<String, String>;

/// `workloadSelector` of Sidecar, ServiceEntry and DestinationRule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: Labels,
}

/// `selector` of AuthorizationPolicy and PeerAuthentication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: Labels,
}

/// True when every selector label is present on the workload with that value.
/// An empty selector selects everything.
pub fn labels_match(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `port: {number: N}` as used by destinations and port-level settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSelector {
    #[serde(default)]
    pub number: u32,
}

/// A percentage as `{value: 12.5}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Percent {
    #[serde(default)]
    pub value: f64,
}

/// By the float's bits (for fingerprints: the same text hashes alike).
impl std::hash::Hash for Percent {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.value.to_bits().hash(state);
    }
}

/// A duration as Istio's CRDs accept it: Go duration syntax (`10s`, `1.5s`,
/// `30ms`, `1h30m`). Kept with its text so output shows what the user wrote.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub fn parse(s: &str) -> Result<Self, String> {
        let err =
            || format!("invalid duration \"{s}\" (expected e.g. \"10s\", \"1.5s\", \"250ms\")");
        let mut rest = s.trim();
        if rest.is_empty() {
            return Err(err());
        }
        if rest == "0" {
            return Ok(Duration(std::time::Duration::ZERO));
        }
        let mut total = 0f64;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(err)?;
            let value: f64 = rest[..num_len].parse().map_err(|_| err())?;
            rest = &rest[num_len..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let scale = match &rest[..unit_len] {
                "ns" => 1e-9,
                "us" | "µs" => 1e-6,
                "ms" => 1e-3,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return Err(err()),
            };
            total += value * scale;
            rest = &rest[unit_len..];
        }
        std::time::Duration::try_from_secs_f64(total)
            .map(Duration)
            .map_err(|_| err())
    }

    pub fn as_std(self) -> std::time::Duration {
        self.0
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            match d.as_secs() {
                s if s != 0 && s % 3600 == 0 => write!(f, "{}h", s / 3600),
                s if s != 0 && s % 60 == 0 => write!(f, "{}m", s / 60),
                s => write!(f, "{s}s"),
            }
        } else if d.as_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{}s", d.as_secs_f64())
        }
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Duration::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A protobuf Duration in its JSON form: `10s`, `1.5s`, `250ms`, `1h30m`.
impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string" })
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Kubernetes IntOrString (Service `targetPort`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum IntOrString {
    Int(u32),
    String(String),
}

impl fmt::Display for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrString::Int(n) => write!(f, "{n}"),
            IntOrString::String(s) => f.write_str(s),
        }
    }
}

/// Opaque content we accept (so real manifests load) but do not interpret.
pub type Opaque = serde_json::Value;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases = [
            ("10s", Some(10_000u32)),
            ("1.5s", Some(1_500)),
            ("250ms", Some(250)),
            ("1h30m", Some(5_400_000)),
            ("0", Some(0)),
            ("0s", Some(0)),
            ("10", None),
            ("", None),
            ("5 s", None),
            ("-1s", None),
            ("1d", None),
        ];
        for (input, want) in cases {
            let got = Duration::parse(input).ok().map(|d| d.0.as_millis());
            assert_eq!(got, want.map(u128::from), "{input}");
        }
        assert_eq!(Duration::parse("1.5s").unwrap().to_string(), "1500ms");
        assert_eq!(Duration::parse("1m").unwrap().to_string(), "1m");
        assert_eq!(Duration::parse("86400s").unwrap().to_string(), "24h");
        assert_eq!(Duration::parse("90s").unwrap().to_string(), "90s");
    }

    #[test]
    fn selectors() {
        let labels: Labels = [("app".into(), "a".into()), ("v".into(), "1".into())].into();
        assert!(labels_match(&Labels::new(), &labels));
        assert!(labels_match(&[("app".into(), "a".into())].into(), &labels));
        assert!(!labels_match(&[("app".into(), "b".into())].into(), &labels));
        assert!(!labels_match(&[("x".into(), "a".into())].into(), &labels));
    }
}
