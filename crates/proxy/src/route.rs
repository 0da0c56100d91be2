//! HTTP routing: VirtualService `http` rules compiled once per config
//! snapshot, and a pure `route()` that picks the first matching rule for a
//! request, as Envoy does with Istio's generated route tables.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use foldhash::fast::RandomState as FastHash;
use http::{HeaderMap, HeaderName, HeaderValue};
use meshgate_config::model::networking::{
    HeaderOperations, HttpMatchRequest, RedirectPortSelection, StringMatch,
};
use meshgate_config::view::{RouteAction, RouteView};
use regex::Regex;

/// One string matcher: exact, prefix, or a regex that must match the whole value.
#[derive(Debug, Clone)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl StrMatch {
    /// `None` for an empty StringMatch (`{}`), which tests presence only.
    pub fn compile(m: &StringMatch, ignore_case: bool) -> Option<StrMatch> {
        let lower = |s: &String| {
            if ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.clone()
            }
        };
        match (&m.exact, &m.prefix, &m.regex) {
            (Some(e), _, _) => Some(StrMatch::Exact(lower(e))),
            (_, Some(p), _) => Some(StrMatch::Prefix(lower(p))),
            // Validation rejected bad regexes; anchoring makes RE2 full-match semantics.
            (_, _, Some(r)) => Regex::new(&format!("^(?:{r})$")).ok().map(StrMatch::Regex),
            _ => None,
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == e,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Regex(r) => r.is_match(v),
        }
    }
}

/// One `match` block: every present condition must hold.
#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    uri: Option<StrMatch>,
    ignore_uri_case: bool,
    scheme: Option<StrMatch>,
    method: Option<StrMatch>,
    authority: Option<StrMatch>,
    headers: Vec<(Option<HeaderName>, Option<StrMatch>)>,
    without_headers: Vec<(Option<HeaderName>, Option<StrMatch>)>,
    query_params: Vec<(String, Option<StrMatch>)>,
}

/// Header conditions. A key no request header can have (a JWT claim,
/// `@request.auth.claims.*`, which needs a RequestAuthentication meshgate
/// does not implement, or a name HTTP does not allow) is `None`: never
/// present, as Envoy sees a claim without a validated token. Dropping it
/// would make the condition match every request.
fn header_matchers(
    map: &std::collections::BTreeMap<String, StringMatch>,
) -> Vec<(Option<HeaderName>, Option<StrMatch>)> {
    map.iter()
        // Istio ignores these pseudo-header keys under `headers`.
        .filter(|(k, _)| !matches!(k.as_str(), "uri" | "scheme" | "method" | "authority"))
        .map(|(k, m)| {
            (
                HeaderName::from_bytes(k.as_bytes()).ok(),
                StrMatch::compile(m, false),
            )
        })
        .collect()
}

impl RouteMatch {
    pub fn compile(m: &HttpMatchRequest) -> RouteMatch {
        RouteMatch {
            uri: m
                .uri
                .as_ref()
                .and_then(|u| StrMatch::compile(u, m.ignore_uri_case)),
            ignore_uri_case: m.ignore_uri_case,
            scheme: m.scheme.as_ref().and_then(|s| StrMatch::compile(s, false)),
            method: m.method.as_ref().and_then(|s| StrMatch::compile(s, false)),
            authority: m
                .authority
                .as_ref()
                .and_then(|s| StrMatch::compile(s, false)),
            headers: header_matchers(&m.headers),
            without_headers: header_matchers(&m.without_headers),
            query_params: m
                .query_params
                .iter()
                .map(|(k, v)| (k.clone(), StrMatch::compile(v, false)))
                .collect(),
        }
    }

    fn header_ok(headers: &HeaderMap, name: &Option<HeaderName>, m: &Option<StrMatch>) -> bool {
        let Some(v) = name.as_ref().and_then(|n| headers.get(n)) else {
            return false;
        };
        match m {
            None => true,
            Some(m) => v.to_str().is_ok_and(|v| m.matches(v)),
        }
    }

    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let uri_ok = self.uri.as_ref().is_none_or(|m| {
            if self.ignore_uri_case {
                m.matches(&req.path.to_ascii_lowercase())
            } else {
                m.matches(req.path)
            }
        });
        uri_ok
            && self.scheme.as_ref().is_none_or(|m| m.matches(req.scheme))
            && self.method.as_ref().is_none_or(|m| m.matches(req.method))
            && self
                .authority
                .as_ref()
                .is_none_or(|m| m.matches(req.authority))
            && self
                .headers
                .iter()
                .all(|(n, m)| Self::header_ok(req.headers, n, m))
            && !self
                .without_headers
                .iter()
                .any(|(n, m)| Self::header_ok(req.headers, n, m))
            && self.query_params.iter().all(|(k, m)| {
                query_value(req.query, k).is_some_and(|v| m.as_ref().is_none_or(|m| m.matches(v)))
            })
    }

    /// The literal prefix this match consumed, for `rewrite.uri`.
    fn prefix(&self) -> Option<&str> {
        match &self.uri {
            Some(StrMatch::Prefix(p)) => Some(p),
            _ => None,
        }
    }
}

fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// What `route()` looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Host / `:authority`, as sent (may carry a port).
    pub authority: &'a str,
    pub method: &'a str,
    pub scheme: &'a str,
    /// Path without the query.
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a HeaderMap,
}

/// Header changes from `headers.request` / `headers.response`: none for
/// most routes, so a pointer until there are some (a gateway with
/// thousands of hosts holds four per route).
#[derive(Debug, Clone, Default)]
pub struct HeaderOps(Option<Box<HeaderChanges>>);

#[derive(Debug, Clone, Default)]
struct HeaderChanges {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn compile(ops: Option<&HeaderOperations>) -> HeaderOps {
        let Some(ops) = ops else {
            return HeaderOps::default();
        };
        let pairs = |m: &std::collections::BTreeMap<String, String>| {
            m.iter()
                .filter_map(|(k, v)| {
                    Some((
                        HeaderName::from_bytes(k.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect()
        };
        let changes = HeaderChanges {
            set: pairs(&ops.set),
            add: pairs(&ops.add),
            remove: ops
                .remove
                .iter()
                .filter_map(|k| HeaderName::from_bytes(k.as_bytes()).ok())
                .collect(),
        };
        let none = changes.set.is_empty() && changes.add.is_empty() && changes.remove.is_empty();
        HeaderOps((!none).then(|| Box::new(changes)))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Inline only the check: most routes have no operations, and four
    /// places per request apply them.
    #[inline]
    pub fn apply(&self, headers: &mut HeaderMap) {
        if let Some(c) = &self.0 {
            c.apply(headers);
        }
    }
}

impl HeaderChanges {
    #[inline(never)]
    fn apply(&self, headers: &mut HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
    }
}

/// A destination of a `route` action, by index into the snapshot's clusters.
#[derive(Debug, Clone)]
pub struct WeightedCluster {
    pub cluster: usize,
    pub weight: u32,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

#[derive(Debug, Clone)]
pub struct Redirect {
    uri: Option<String>,
    authority: Option<String>,
    scheme: Option<String>,
    port: Option<u32>,
    derive_port: Option<RedirectPortSelection>,
    pub code: u16,
}

#[derive(Debug, Clone)]
pub enum Action {
    Forward(Vec<WeightedCluster>),
    Redirect(Box<Redirect>),
    Direct { status: u16, body: Bytes },
}

#[derive(Debug, Clone)]
pub enum UriRewrite {
    Prefix(String),
    Regex(Regex, String),
}

/// Istio's retry policy for a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries (not counting the first attempt).
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on_connect_failure: bool,
    pub on_refused_stream: bool,
    pub on_5xx: bool,
    pub on_gateway_error: bool,
    pub on_reset: bool,
    pub on_reset_before_request: bool,
    pub status_codes: Vec<u16>,
    /// gRPC statuses retried (`cancelled`, `unavailable`, ...), one bit
    /// per code.
    pub grpc_statuses: u32,
    pub backoff: Duration,
    /// `retryIgnorePreviousHosts` as set (see `avoids_previous_hosts`).
    pub ignore_previous_hosts: Option<bool>,
    /// `retryRemoteLocalities` (see `tried_priorities`).
    pub remote_localities: bool,
}

/// gRPC's CANCELLED and UNAVAILABLE, as `RetryPolicy::grpc_statuses` bits.
const GRPC_CANCELLED: u32 = 1 << 1;
const GRPC_UNAVAILABLE: u32 = 1 << 14;

/// How an attempt that got no response ended, as a retry policy sees it
/// (Envoy's reset reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// No connection could be made: nothing was sent.
    ConnectFailure,
    /// The connection or stream ended before a response, or the attempt's
    /// per-try timeout reset it: the request may have been acted on.
    Reset,
    /// The upstream refused the stream (HTTP/2 REFUSED_STREAM): it did
    /// not act on the request.
    RefusedStream,
    /// Never retried: the circuit breaker, no healthy endpoint, the
    /// route's or the stream's own timeout, the downstream's fault.
    Final,
}

impl RetryPolicy {
    /// Istio's default when a route sets no `retries`: 2 attempts on
    /// connect-failure, refused-stream, unavailable, cancelled. The last two
    /// are gRPC status conditions (Envoy's `retry_grpc_on`), so a plain
    /// HTTP 503 is not retried.
    pub fn istio_default() -> Self {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            on_connect_failure: true,
            on_refused_stream: true,
            on_5xx: false,
            on_gateway_error: false,
            on_reset: false,
            on_reset_before_request: false,
            status_codes: Vec::new(),
            grpc_statuses: GRPC_CANCELLED | GRPC_UNAVAILABLE,
            backoff: Duration::from_millis(25),
            ignore_previous_hosts: None,
            remote_localities: false,
        }
    }

    /// Whether a retry goes to an endpoint no earlier attempt went to,
    /// while the cluster has one (Envoy's previous-hosts predicate): as
    /// `retryIgnorePreviousHosts` says, by default unless the cluster
    /// hashes (Istio leaves a hashed request on its endpoint).
    pub fn avoids_previous_hosts(&self, hashed: bool) -> bool {
        self.ignore_previous_hosts.unwrap_or(!hashed)
    }

    /// How many of the earlier attempts' endpoints an attempt (the first
    /// is 1) passes the priorities (localities) of. With
    /// `retryRemoteLocalities`: Envoy's previous priorities as Istio sets
    /// them, updated every two attempts (the first retry stays in the
    /// first's priority; the third attempt leaves the first two's).
    pub fn tried_priorities(&self, attempt: u32) -> usize {
        if self.remote_localities {
            (2 * (attempt.saturating_sub(1) / 2)) as usize
        } else {
            0
        }
    }

    /// Istio's default, one allocation shared by every route that takes it.
    pub fn shared_default() -> Arc<Self> {
        static DEFAULT: std::sync::LazyLock<Arc<RetryPolicy>> =
            std::sync::LazyLock::new(|| Arc::new(RetryPolicy::istio_default()));
        DEFAULT.clone()
    }

    /// No retries (a route with a fault, Istio's `allow_any` and inbound
    /// routes).
    pub fn none() -> Arc<Self> {
        static NONE: std::sync::LazyLock<Arc<RetryPolicy>> = std::sync::LazyLock::new(|| {
            Arc::new(RetryPolicy {
                attempts: 0,
                ..RetryPolicy::istio_default()
            })
        });
        NONE.clone()
    }

    pub fn compile(r: Option<&meshgate_config::model::networking::HttpRetry>) -> Self {
        let Some(r) = r else {
            return Self::istio_default();
        };
        let mut p = RetryPolicy {
            attempts: r.attempts,
            per_try_timeout: r.per_try_timeout.map(|d| d.as_std()),
            on_connect_failure: false,
            on_refused_stream: false,
            on_5xx: false,
            on_gateway_error: false,
            on_reset: false,
            on_reset_before_request: false,
            status_codes: Vec::new(),
            grpc_statuses: 0,
            backoff: r.backoff.map_or(Duration::from_millis(25), |d| d.as_std()),
            ignore_previous_hosts: r.retry_ignore_previous_hosts,
            remote_localities: r.retry_remote_localities == Some(true),
        };
        let retry_on = if r.retry_on.is_empty() {
            "connect-failure,refused-stream,unavailable,cancelled"
        } else {
            &r.retry_on
        };
        for cond in retry_on.split(',').map(str::trim) {
            match cond {
                "connect-failure" => p.on_connect_failure = true,
                "refused-stream" => p.on_refused_stream = true,
                "5xx" => p.on_5xx = true,
                // Envoy's one retriable 4xx: 409 Conflict.
                "retriable-4xx" => p.status_codes.push(409),
                "gateway-error" => p.on_gateway_error = true,
                "reset" => p.on_reset = true,
                "reset-before-request" => p.on_reset_before_request = true,
                "cancelled" => p.grpc_statuses |= GRPC_CANCELLED,
                "deadline-exceeded" => p.grpc_statuses |= 1 << 4,
                "resource-exhausted" => p.grpc_statuses |= 1 << 8,
                "internal" => p.grpc_statuses |= 1 << 13,
                "unavailable" => p.grpc_statuses |= GRPC_UNAVAILABLE,
                n => {
                    if let Ok(code) = n.parse::<u16>() {
                        p.status_codes.push(code);
                    }
                }
            }
        }
        p
    }

    /// Whether a request that reached the upstream can be retried: after
    /// its response, a reset, a per-try timeout, a refused stream
    /// (`refused_streams`: toward an upstream that may refuse one), or a
    /// gRPC status (`grpc`: a gRPC request). Then each attempt but the
    /// last sends a copy of the request.
    pub fn retries_sent(&self, refused_streams: bool, grpc: bool) -> bool {
        self.on_5xx
            || self.on_gateway_error
            || self.on_reset
            || !self.status_codes.is_empty()
            || (refused_streams && self.on_refused_stream)
            || (grpc && self.grpc_statuses != 0)
    }

    /// Whether a gRPC response's status (its `grpc-status` header: a
    /// trailers-only response's) is retried.
    pub fn retry_grpc_status(&self, grpc_status: Option<&http::HeaderValue>) -> bool {
        grpc_status
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok()?.parse::<u32>().ok())
            .is_some_and(|code| code < 32 && self.grpc_statuses & (1 << code) != 0)
    }

    /// Envoy's retry on reset: `reset`, `5xx` and `gateway-error` retry
    /// every attempt that got no response (a per-try timeout is one),
    /// `connect-failure` and `reset-before-request` only one that sent
    /// nothing, `refused-stream` one whose stream the upstream refused.
    pub fn retry_unanswered(&self, how: Unanswered) -> bool {
        match how {
            Unanswered::Final => false,
            _ if self.on_reset || self.on_5xx || self.on_gateway_error => true,
            Unanswered::ConnectFailure => self.on_connect_failure || self.on_reset_before_request,
            Unanswered::RefusedStream => self.on_refused_stream,
            Unanswered::Reset => false,
        }
    }

    /// Should a response with this status be retried?
    pub fn retry_status(&self, status: u16) -> bool {
        (self.on_5xx && status >= 500)
            || (self.on_gateway_error && matches!(status, 502..=504))
            || self.status_codes.contains(&status)
    }
}

#[derive(Debug, Clone)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(u16, f64)>,
}

/// One compiled VirtualService rule (or a default route).
#[derive(Debug, Clone)]
pub struct Route {
    /// `#0`, the rule's name, or `default`.
    pub name: Arc<str>,
    pub virtual_service: Option<Arc<str>>,
    matches: Vec<RouteMatch>,
    pub action: Action,
    // What few routes set is boxed (a gateway keeps a route per host).
    pub uri_rewrite: Option<Box<UriRewrite>>,
    pub authority_rewrite: Option<Box<str>>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub timeout: Option<Duration>,
    /// Shared by the routes that set no `retries` (most).
    pub retry: Arc<RetryPolicy>,
    pub fault: Option<Box<Fault>>,
    pub cors: Option<Box<crate::cors::Cors>>,
    /// Clusters that get a copy of a share of the requests (percent).
    pub mirrors: Vec<(usize, f64)>,
}

fn percent(p: Option<meshgate_config::model::common::Percent>, legacy: Option<u32>) -> f64 {
    p.map(|p| p.value).or(legacy.map(f64::from)).unwrap_or(0.0)
}

impl Route {
    /// Compiles one route of the view (a VirtualService rule, or a
    /// service's default route) with its destinations resolved to cluster
    /// indices.
    pub fn compile(r: &RouteView, destinations: Vec<WeightedCluster>) -> Route {
        let action = match &r.action {
            RouteAction::Redirect(r) => Action::Redirect(Box::new(Redirect {
                uri: (!r.uri.is_empty()).then(|| r.uri.clone()),
                authority: (!r.authority.is_empty()).then(|| r.authority.clone()),
                scheme: (!r.scheme.is_empty()).then(|| r.scheme.clone()),
                port: r.port,
                derive_port: r.derive_port,
                code: r
                    .redirect_code
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(301),
            })),
            RouteAction::DirectResponse(d) => Action::Direct {
                status: u16::try_from(d.status).unwrap_or(500),
                body: Bytes::from(
                    d.body
                        .as_ref()
                        .and_then(|b| b.string.clone())
                        .unwrap_or_default(),
                ),
            },
            RouteAction::Route(_) => Action::Forward(destinations),
        };
        let uri_rewrite = r
            .rewrite
            .as_ref()
            .and_then(|rw| -> Option<Box<UriRewrite>> {
                if let Some(rr) = &rw.uri_regex_rewrite {
                    // Istio/RE2 writes capture groups as \1; Rust's regex uses ${1}.
                    let replacement = Regex::new(r"\\(\d)")
                        .map(|re| re.replace_all(&rr.rewrite, "$${$1}").into_owned())
                        .unwrap_or_else(|_| rr.rewrite.clone());
                    Regex::new(&rr.pattern)
                        .ok()
                        .map(|re| Box::new(UriRewrite::Regex(re, replacement)))
                } else if !rw.uri.is_empty() {
                    Some(Box::new(UriRewrite::Prefix(rw.uri.clone())))
                } else {
                    None
                }
            });
        let fault = r.fault.as_ref().map(|f| {
            Box::new(Fault {
                delay: f.delay.as_ref().and_then(|d| {
                    d.fixed_delay
                        .map(|fd| (fd.as_std(), percent(d.percentage, d.percent)))
                }),
                abort: f.abort.as_ref().and_then(|a| {
                    a.http_status
                        .and_then(|s| u16::try_from(s).ok())
                        .map(|s| (s, percent(a.percentage, None)))
                }),
            })
        });
        let headers = r.headers.as_ref();
        Route {
            name: Arc::from(r.rule.as_str()),
            virtual_service: r.virtual_service.as_deref().map(Arc::from),
            matches: r.matches.iter().map(RouteMatch::compile).collect(),
            action,
            uri_rewrite,
            authority_rewrite: r
                .rewrite
                .as_ref()
                .and_then(|rw| (!rw.authority.is_empty()).then(|| rw.authority.as_str().into())),
            request_headers: HeaderOps::compile(headers.and_then(|h| h.request.as_ref())),
            response_headers: HeaderOps::compile(headers.and_then(|h| h.response.as_ref())),
            timeout: r.timeout.map(|t| t.as_std()).filter(|t| !t.is_zero()),
            // Client-side faults disable retries, as in Istio.
            retry: match (&r.fault, &r.retries) {
                (Some(_), _) => RetryPolicy::none(),
                (None, None) => RetryPolicy::shared_default(),
                (None, Some(retries)) => Arc::new(RetryPolicy::compile(Some(retries))),
            },
            fault,
            cors: r
                .cors_policy
                .as_ref()
                .map(|c| Box::new(crate::cors::Cors::compile(c))),
            mirrors: Vec::new(),
        }
    }

    /// A route to one cluster with Istio's defaults (no VirtualService).
    pub fn default_to(cluster: usize) -> Route {
        Route {
            name: Arc::from("default"),
            virtual_service: None,
            matches: Vec::new(),
            action: Action::Forward(vec![WeightedCluster {
                cluster,
                weight: 100,
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
            }]),
            uri_rewrite: None,
            authority_rewrite: None,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
            timeout: None,
            retry: RetryPolicy::shared_default(),
            fault: None,
            cors: None,
            mirrors: Vec::new(),
        }
    }

    /// Istio's `allow_any` route (ALLOW_ANY): to PassthroughCluster, with
    /// no timeout and no retries.
    pub fn allow_any(passthrough: usize) -> Route {
        let mut r = Route::default_to(passthrough);
        r.name = Arc::from("allow_any");
        r.retry = RetryPolicy::none();
        r
    }

    /// The route of a port the workload serves as HTTP (Istio's inbound
    /// `default` route): to the workload, with no timeout and no retries.
    pub fn inbound(cluster: usize) -> Route {
        let mut r = Route::default_to(cluster);
        r.retry = RetryPolicy::none();
        r
    }

    /// Index of the first matching `match` block (`Some(None)` when the rule
    /// has none and so matches everything).
    fn matching(&self, req: &RequestView<'_>) -> Option<Option<usize>> {
        if self.matches.is_empty() {
            return Some(None);
        }
        self.matches.iter().position(|m| m.matches(req)).map(Some)
    }

    /// The path to send upstream after `rewrite.uri` / `uriRegexRewrite`.
    pub fn rewrite_path(&self, matched: Option<usize>, path: &str) -> Option<String> {
        match self.uri_rewrite.as_deref()? {
            UriRewrite::Regex(re, rep) => Some(re.replace_all(path, rep.as_str()).into_owned()),
            UriRewrite::Prefix(new) => {
                let prefix = matched
                    .and_then(|i| self.matches.get(i))
                    .and_then(RouteMatch::prefix);
                Some(match prefix {
                    Some(p) if path.len() >= p.len() => format!("{new}{}", &path[p.len()..]),
                    _ => new.clone(),
                })
            }
        }
    }
}

impl Redirect {
    /// The `Location` for a request.
    pub fn location(&self, req: &RequestView<'_>, listener_port: u16) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(req.scheme);
        let (req_host, req_port) = split_host_port(req.authority);
        let host = self.authority.as_deref().unwrap_or(req_host);
        let port = match (self.port, self.derive_port) {
            (Some(p), _) => Some(p),
            (None, Some(RedirectPortSelection::FromRequestPort)) => {
                req_port.map(u32::from).or(Some(u32::from(listener_port)))
            }
            (None, Some(RedirectPortSelection::FromProtocolDefault)) => None,
            (None, None) => req_port.map(u32::from),
        };
        let default_port = if scheme == "https" { 443 } else { 80 };
        let authority = match port {
            Some(p) if p != default_port => format!("{host}:{p}"),
            _ => host.to_owned(),
        };
        let path = self.uri.as_deref().unwrap_or(req.path);
        let query = if req.query.is_empty() || self.uri.is_some() {
            String::new()
        } else {
            format!("?{}", req.query)
        };
        format!("{scheme}://{authority}{path}{query}")
    }
}

/// `host:port` → (`host`, port); IPv6 literals in brackets are kept whole.
pub fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once("]:") {
            return (&authority[..h.len() + 2], p.parse().ok());
        }
        return (authority, None);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

/// Routes for one host (or wildcard).
#[derive(Debug, Clone)]
pub struct VirtualHost {
    /// Lowercase host patterns (`a.com`, `*.a.com`, `*`); `RouteTable::new`
    /// moves them into its index (a gateway has thousands).
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
}

/// Every virtual host of one listener port, indexed by domain.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    pub vhosts: Vec<VirtualHost>,
    index: DomainIndex,
}

/// Host patterns to what they name, found in time independent of how many
/// there are, as Envoy matches virtual host domains and SNI filter
/// chains: the exact name, then the longest wildcard suffix, then `*`.
/// Among equal patterns, the first.
#[derive(Debug, Clone, Default)]
pub(crate) struct DomainIndex {
    // Boxed: a gateway of thousands of hosts keeps a key each. foldhash,
    // not SipHash: every request looks its host up, and the keys are the
    // config's, not the client's.
    exact: HashMap<Box<str>, usize, FastHash>,
    /// `*.a.com` as `.a.com`.
    suffixes: HashMap<Box<str>, usize, FastHash>,
    /// The suffix lengths present, longest first.
    suffix_lens: Vec<usize>,
    any: Option<usize>,
}

impl DomainIndex {
    /// Lowercase patterns (`a.com`, `*.a.com`, `*`) and what each names.
    pub(crate) fn new(patterns: impl IntoIterator<Item = (String, usize)>) -> DomainIndex {
        let mut index = DomainIndex::default();
        for (d, i) in patterns {
            if d == "*" {
                index.any.get_or_insert(i);
            } else if d.starts_with("*.") {
                index.suffixes.entry(d[1..].into()).or_insert(i);
            } else {
                index.exact.entry(d.into_boxed_str()).or_insert(i);
            }
        }
        index.suffix_lens = index.suffixes.keys().map(|s| s.len()).collect();
        index.suffix_lens.sort_unstable_by(|a, b| b.cmp(a));
        index.suffix_lens.dedup();
        index
    }

    /// `host` is lowercase, without its port.
    pub(crate) fn find(&self, host: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(host) {
            return Some(i);
        }
        // A wildcard covers at least one more character than its suffix.
        self.suffix_lens
            .iter()
            .filter(|&&len| len < host.len())
            .find_map(|&len| {
                let suffix = host.get(host.len() - len..)?;
                self.suffixes.get(suffix).copied()
            })
            .or(self.any)
    }
}

/// Result of routing one request.
#[derive(Debug)]
pub enum Routed<'a> {
    Matched {
        route: &'a Route,
        matched: Option<usize>,
    },
    /// A virtual host exists but no rule matched (404, flag NR).
    NoRoute,
    /// No virtual host for this authority.
    NoVirtualHost,
}

impl RouteTable {
    pub fn new(mut vhosts: Vec<VirtualHost>) -> RouteTable {
        let index = DomainIndex::new(vhosts.iter_mut().enumerate().flat_map(|(i, vh)| {
            std::mem::take(&mut vh.domains)
                .into_iter()
                .map(move |d| (d, i))
        }));
        // Kept as long as the config: without the room pushing left.
        vhosts.shrink_to_fit();
        RouteTable { vhosts, index }
    }

    pub fn vhost(&self, authority: &str) -> Option<&VirtualHost> {
        let host = split_host_port(authority).0;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(host.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(host)
        };
        self.index.find(&host).map(|i| &self.vhosts[i])
    }

    /// First matching rule wins.
    pub fn route(&self, req: &RequestView<'_>) -> Routed<'_> {
        let Some(vh) = self.vhost(req.authority) else {
            return Routed::NoVirtualHost;
        };
        vh.routes
            .iter()
            .find_map(|route| {
                route
                    .matching(req)
                    .map(|matched| Routed::Matched { route, matched })
            })
            .unwrap_or(Routed::NoRoute)
    }
}

/// Picks a destination by weight (`r` uniform in [0, 1)).
pub fn pick_weighted(dests: &[WeightedCluster], r: f64) -> Option<&WeightedCluster> {
    let total: u64 = dests.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 {
        return dests.first();
    }
    let mut point = (r * total as f64) as u64;
    for d in dests {
        let w = u64::from(d.weight);
        if point < w {
            return Some(d);
        }
        point -= w;
    }
    dests.last()
}

#[cfg(test)]
mod tests;
