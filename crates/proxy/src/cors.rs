//! A route's `corsPolicy`, as Envoy's CORS filter applies it (after
//! authorization and faults, before the router): a preflight from an
//! allowed origin is answered by the proxy, 200 with the allowed methods,
//! headers and max age; other requests from an allowed origin go on and
//! their responses carry `access-control-allow-origin` (and credentials,
//! exposed headers). A preflight from another origin goes on upstream
//! (`unmatchedPreflights: FORWARD`, the default) or is answered without
//! CORS headers (`IGNORE`), so the browser refuses it.

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};
use meshgate_config::model::networking::{CorsPolicy, StringMatch, UnmatchedPreflights};

use crate::route::StrMatch;

/// Envoy's `%RESPONSE_CODE_DETAILS%` for a preflight it answers.
pub const DETAILS: &str = "cors_response";

#[derive(Debug, Clone)]
pub struct Cors {
    origins: Vec<StrMatch>,
    methods: Option<HeaderValue>,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    credentials: bool,
    forward_unmatched: bool,
}

/// What the policy makes of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsDecision {
    /// Not a CORS request for this policy: nothing changes.
    None,
    /// A preflight the proxy answers itself with these headers.
    Preflight(HeaderMap),
    /// Goes on; the response carries the allowed origin.
    Allowed(HeaderValue),
}

impl Cors {
    pub fn compile(p: &CorsPolicy) -> Cors {
        // `allowOrigin` (deprecated) lists exact origins.
        let legacy = p.allow_origin.iter().map(|o| StringMatch {
            exact: Some(o.clone()),
            ..StringMatch::default()
        });
        let origins = p
            .allow_origins
            .iter()
            .cloned()
            .chain(legacy)
            .filter_map(|m| StrMatch::compile(&m, false))
            .collect();
        let joined = |v: &[String]| {
            (!v.is_empty())
                .then(|| HeaderValue::from_str(&v.join(",")).ok())
                .flatten()
        };
        Cors {
            origins,
            methods: joined(&p.allow_methods),
            headers: joined(&p.allow_headers),
            expose: joined(&p.expose_headers),
            max_age: p.max_age.map(|d| HeaderValue::from(d.as_std().as_secs())),
            credentials: p.allow_credentials == Some(true),
            forward_unmatched: p.unmatched_preflights != Some(UnmatchedPreflights::Ignore),
        }
    }

    /// An allowed origin is one a matcher takes, or any when a matcher
    /// takes `*` (an exact `*` allows every origin, as in Envoy).
    fn allows(&self, origin: &str) -> bool {
        self.origins
            .iter()
            .any(|m| m.matches("*") || m.matches(origin))
    }

    pub fn decide(&self, method: &str, headers: &HeaderMap) -> CorsDecision {
        let Some(origin) = headers.get(header::ORIGIN).filter(|o| !o.is_empty()) else {
            return CorsDecision::None;
        };
        let allowed = origin.to_str().is_ok_and(|o| self.allows(o));
        let requested = headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .filter(|m| !m.is_empty());
        let (true, Some(requested)) = (method == "OPTIONS", requested) else {
            return if allowed {
                CorsDecision::Allowed(origin.clone())
            } else {
                CorsDecision::None
            };
        };
        if !allowed && self.forward_unmatched {
            return CorsDecision::None;
        }
        let mut out = HeaderMap::new();
        if allowed {
            out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        }
        if self.credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        // `*` echoes what the browser asked for.
        let echo = |v: &Option<HeaderValue>, asked: Option<&HeaderValue>| match v {
            Some(v) if v == "*" => asked.cloned(),
            v => v.clone(),
        };
        let mut set = |name: HeaderName, v: Option<HeaderValue>| {
            if let Some(v) = v {
                out.insert(name, v);
            }
        };
        set(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            echo(&self.methods, Some(requested)),
        );
        set(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            echo(
                &self.headers,
                headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS),
            ),
        );
        set(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        CorsDecision::Preflight(out)
    }

    /// The headers a response to an allowed origin carries.
    pub fn respond(&self, origin: &HeaderValue, headers: &mut HeaderMap) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if self.credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &self.expose {
            headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: &str) -> Cors {
        Cors::compile(&serde_json::from_str(json).unwrap())
    }

    fn request(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_static(k),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn preflight_from_an_allowed_origin_is_answered_with_the_policy() {
        let c = policy(
            r#"{"allowOrigins": [{"exact": "https://app.example"}], "allowMethods": ["GET", "POST"], "allowHeaders": ["*"], "maxAge": "24h", "allowCredentials": true}"#,
        );
        let h = request(&[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "x-a"),
        ]);
        let CorsDecision::Preflight(out) = c.decide("OPTIONS", &h) else {
            panic!("not a preflight answer");
        };
        assert_eq!(out["access-control-allow-origin"], "https://app.example");
        assert_eq!(out["access-control-allow-methods"], "GET,POST");
        assert_eq!(out["access-control-allow-headers"], "x-a");
        assert_eq!(out["access-control-max-age"], "86400");
        assert_eq!(out["access-control-allow-credentials"], "true");
    }

    #[test]
    fn other_origins_are_forwarded_or_ignored_as_configured() {
        let h = request(&[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "GET"),
        ]);
        let forward = policy(r#"{"allowOrigins": [{"prefix": "https://app"}]}"#);
        assert_eq!(forward.decide("OPTIONS", &h), CorsDecision::None);
        assert_eq!(forward.decide("GET", &h), CorsDecision::None);
        let ignore = policy(
            r#"{"allowOrigins": [{"prefix": "https://app"}], "unmatchedPreflights": "IGNORE"}"#,
        );
        assert_eq!(
            ignore.decide("OPTIONS", &h),
            CorsDecision::Preflight(HeaderMap::new())
        );
        let any = policy(r#"{"allowOrigin": ["*"]}"#);
        assert!(matches!(any.decide("GET", &h), CorsDecision::Allowed(_)));
    }
}
