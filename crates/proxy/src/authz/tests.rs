//! Table-driven cases for `authorize`: each is policies (YAML), a request,
//! and the decision Istio makes.

use std::net::IpAddr;

use meshgate_config::load::{Loaded, load_str};

use super::*;

fn policies(yaml: &str) -> Vec<CompiledPolicy> {
    let mut loaded = Loaded::default();
    load_str("p.yaml", yaml, &mut loaded).expect("valid YAML");
    let errors: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
    assert!(errors.is_empty(), "{errors:?}");
    let mesh = meshgate_config::MeshSettings::default();
    loaded
        .config
        .authorization_policies
        .iter()
        .map(|p| CompiledPolicy::compile(&PolicyView::of(p, &mesh)))
        .collect()
}

fn ap(name: &str, action: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: egress}}\nspec:\n  action: {action}\n{rules}"
    )
}

/// host, method, path, headers
type Http = (
    &'static str,
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
);

#[derive(Clone)]
struct Req {
    principal: Option<&'static str>,
    source_ip: &'static str,
    port: u16,
    sni: Option<&'static str>,
    http: Option<Http>,
}

const CURL: &str = "spiffe://cluster.local/ns/curl-external-tst/sa/default";
const OTHER: &str = "spiffe://cluster.local/ns/other/sa/app";

fn get(principal: Option<&'static str>) -> Req {
    Req {
        principal,
        source_ip: "10.1.2.3",
        port: 80,
        sni: None,
        http: Some(("jsonplaceholder.typicode.com", "GET", "/todos/1", vec![])),
    }
}

fn tcp(principal: Option<&'static str>) -> Req {
    Req {
        http: None,
        port: 443,
        sni: Some("api.example.com"),
        ..get(principal)
    }
}

fn with_http(mut r: Req, host: &'static str, method: &'static str, path: &'static str) -> Req {
    let headers = r.http.take().map(|h| h.3).unwrap_or_default();
    r.http = Some((host, method, path, headers));
    r
}

fn with_header(mut r: Req, k: &'static str, v: &'static str) -> Req {
    if let Some(h) = r.http.as_mut() {
        h.3.push((k, v));
    }
    r
}

fn decide(pols: &[CompiledPolicy], r: &Req) -> Decision {
    with_request(r, |req| authorize(pols, req))
}

fn with_request<T>(r: &Req, f: impl FnOnce(&AuthzRequest<'_>) -> T) -> T {
    let mut headers = http::HeaderMap::new();
    if let Some((_, _, _, hs)) = &r.http {
        for (k, v) in hs {
            headers.append(
                http::HeaderName::from_static(k),
                http::HeaderValue::from_static(v),
            );
        }
    }
    let ip: IpAddr = r.source_ip.parse().unwrap();
    let peer = r
        .principal
        .map(|p| Peer::new(p.parse().unwrap(), "cluster.local"));
    let req = AuthzRequest {
        peer: peer.as_ref(),
        source_ip: ip,
        remote_ip: ip,
        destination_ip: "10.0.0.10".parse().unwrap(),
        destination_port: r.port,
        sni: r.sni,
        http: r
            .http
            .as_ref()
            .map(|(host, method, path, _)| HttpAttributes {
                host,
                method,
                path,
                headers: &headers,
            }),
    };
    f(&req)
}

const ALLOW: Decision = Decision::Allow { audited: false };
const AUDITED: Decision = Decision::Allow { audited: true };

fn deny(policy: &str) -> Decision {
    Decision::Deny {
        policy: policy.to_owned(),
    }
}

fn none() -> Decision {
    deny("none")
}

#[test]
fn decision_table() {
    let seed = ap(
        "allow-curl",
        "ALLOW",
        "  rules:\n  - from:\n    - source:\n        namespaces: [curl-external-tst]\n",
    );
    let cases: Vec<(&str, String, Req, Decision)> = vec![
        // Scope and emptiness.
        (
            "no policies allows everything",
            String::new(),
            get(None),
            ALLOW,
        ),
        (
            "seed: caller from the allowed namespace",
            seed.clone(),
            get(Some(CURL)),
            ALLOW,
        ),
        (
            "seed: caller from another namespace",
            seed.clone(),
            get(Some(OTHER)),
            none(),
        ),
        (
            "seed: plaintext caller has no namespace",
            seed.clone(),
            get(None),
            none(),
        ),
        (
            "ALLOW without rules allows nothing",
            ap("a", "ALLOW", ""),
            get(Some(CURL)),
            none(),
        ),
        (
            "ALLOW with rules: [] allows nothing",
            ap("a", "ALLOW", "  rules: []\n"),
            get(Some(CURL)),
            none(),
        ),
        (
            "ALLOW with rules: [{}] allows all",
            ap("a", "ALLOW", "  rules: [{}]\n"),
            get(None),
            ALLOW,
        ),
        (
            "DENY with rules: [{}] denies all",
            ap("d", "DENY", "  rules: [{}]\n"),
            get(Some(CURL)),
            deny("ns[egress]-policy[d]-rule[0]"),
        ),
        (
            "DENY without rules denies nothing",
            ap("d", "DENY", ""),
            get(Some(CURL)),
            ALLOW,
        ),
        // Order: DENY before ALLOW, CUSTOM first.
        (
            "DENY wins over a matching ALLOW",
            format!(
                "{seed}{}",
                ap(
                    "d",
                    "DENY",
                    "  rules:\n  - to:\n    - operation:\n        paths: [/todos/*]\n"
                )
            ),
            get(Some(CURL)),
            deny("ns[egress]-policy[d]-rule[0]"),
        ),
        (
            "the matching DENY rule index is reported",
            ap(
                "d",
                "DENY",
                "  rules:\n  - to: [{operation: {methods: [POST]}}]\n  - to: [{operation: {methods: [GET]}}]\n",
            ),
            get(Some(CURL)),
            deny("ns[egress]-policy[d]-rule[1]"),
        ),
        (
            "CUSTOM that matches denies (no external authorizer)",
            ap("ext", "CUSTOM", "  provider: {name: opa}\n  rules: [{}]\n"),
            get(Some(CURL)),
            deny("ns[egress]-policy[ext]-rule[0]"),
        ),
        (
            "CUSTOM that does not match has no effect",
            ap(
                "ext",
                "CUSTOM",
                "  provider: {name: opa}\n  rules: [{to: [{operation: {paths: [/admin]}}]}]\n",
            ),
            get(Some(CURL)),
            ALLOW,
        ),
        (
            "AUDIT never denies, but is reported",
            ap("au", "AUDIT", "  rules: [{}]\n"),
            get(None),
            AUDITED,
        ),
        (
            "AUDIT with a failing ALLOW still denies",
            format!("{seed}{}", ap("au", "AUDIT", "  rules: [{}]\n")),
            get(Some(OTHER)),
            none(),
        ),
        // Source fields.
        (
            "principals exact",
            ap(
                "a",
                "ALLOW",
                "  rules: [{from: [{source: {principals: [cluster.local/ns/curl-external-tst/sa/default]}}]}]\n",
            ),
            get(Some(CURL)),
            ALLOW,
        ),
        (
            "principals prefix",
            ap(
                "a",
                "ALLOW",
                "  rules: [{from: [{source: {principals: ['cluster.local/ns/curl-external-tst/*']}}]}]\n",
            ),
            get(Some(OTHER)),
            none(),
        ),
        (
            "principals suffix",
            ap(
                "a",
                "ALLOW",
                "  rules: [{from: [{source: {principals: ['*/sa/app']}}]}]\n",
            ),
            get(Some(OTHER)),
            ALLOW,
        ),
        (
            "principals presence needs an identity",
            ap(
                "a",
                "ALLOW",
                "  rules: [{from: [{source: {principals: ['*']}}]}]\n",
            ),
            get(None),
            none(),
        ),
        (
            "principals presence with mTLS",
            ap(
                "a",
                "ALLOW",
                "  rules: [{from: [{source: {principals: ['*']}}]}]\n",
            ),
            get(Some(OTHER)),
            ALLOW,
        ),
        (
            "notPrincipals excludes one caller",
            ap(
                "d",
                "DENY",
                "  rules: [{from: [{source: {notPrincipals: [cluster.local/ns/curl-external-tst/sa/default]}}]}]\n",
            ),
            get(Some(OTHER)),
            deny("ns[egress]-policy[d]-rule[0]"),
        ),
        (
            "notPrincipals: the excluded caller passes",
            ap(
                "d",
                "DENY",
                "  rules: [{from: [{source: {notPrincipals: [cluster.local/ns/curl-external-tst/sa/default]}}]}]\n",
            ),
            get(Some(CURL)),
            ALLOW,
        ),
        (
            "notPrincipals ['*'] denies plaintext",
            ap(
                "d",
                "DENY",
                "  rules: [{from: [{source: {notPrincipals: ['*']}}]}]\n",
            ),
            get(None),
            deny("ns[egress]-policy[d]-rule[0]"),
        ),
        (
            "namespaces prefix",
            ap(
                "a",
                "ALLOW",
                "  rules: [{from: [{source: {namespaces: ['curl-*']}}]}]\n",
            ),
            get(Some(CURL)),
            ALLOW,
        ),
        (
            "notNamespaces",
            ap(
                "d",
                "DENY",
                "  rules: [{from: [{source: {notNamespaces: [curl-external-tst]}}]}]\n",
            ),
            get(Some(OTHER)),
            deny("ns[egress]-policy[d]-rule[0]"),
        ),
        (
            "serviceAccounts ns/sa",
            ap(
                "a",
                "ALLOW",
                "  rules: [{from: [{source: {serviceAccounts: [curl-external-tst/default]}}]}]\n",
            ),
            get(Some(CURL)),
            ALLOW,
        ),
        (
            "ipBlocks CIDR",
            ap(
                "a",
                "ALLOW",
                "  rules: [{from: [{source: {ipBlocks: [10.1.0.0/16]}}]}]\n",
            ),
            get(None),
            ALLOW,
        ),
        (
            "ipBlocks single IP that is not the source",
            ap(
                "a",
                "ALLOW",
                "  rules: [{from: [{source: {ipBlocks: [10.9.9.9]}}]}]\n",
            ),
            get(None),
            none(),
        ),
        (
            "notIpBlocks",
            ap(
                "d",
                "DENY",
                "  rules: [{from: [{source: {notIpBlocks: [10.0.0.0/8]}}]}]\n",
            ),
            get(None),
            ALLOW,
        ),
        (
            "remoteIpBlocks",
            ap(
                "d",
                "DENY",
                "  rules: [{from: [{source: {remoteIpBlocks: [10.1.2.3]}}]}]\n",
            ),
            get(None),
            deny("ns[egress]-policy[d]-rule[0]"),
        ),
        (
            "notRemoteIpBlocks",
            ap(
                "a",
                "ALLOW",
                "  rules: [{from: [{source: {notRemoteIpBlocks: [192.168.0.0/16]}}]}]\n",
            ),
            get(None),
            ALLOW,
        ),
        (
            "fields in one source are ANDed",
            ap(
                "a",
                "ALLOW",
                "  rules: [{from: [{source: {namespaces: [curl-external-tst], ipBlocks: [192.168.0.0/16]}}]}]\n",
            ),
            get(Some(CURL)),
            none(),
        ),
        (
            "sources in one from are ORed",
            ap(
                "a",
                "ALLOW",
                "  rules: [{from: [{source: {namespaces: [nope]}}, {source: {ipBlocks: [10.1.2.3/32]}}]}]\n",
            ),
            get(None),
            ALLOW,
        ),
        // Operation fields.
        (
            "hosts exact, case-insensitive",
            ap(
                "a",
                "ALLOW",
                "  rules: [{to: [{operation: {hosts: [JSONPlaceholder.typicode.com]}}]}]\n",
            ),
            get(None),
            ALLOW,
        ),
        (
            "hosts is exact: host:port does not match",
            ap(
                "a",
                "ALLOW",
                "  rules: [{to: [{operation: {hosts: [jsonplaceholder.typicode.com]}}]}]\n",
            ),
            with_http(get(None), "jsonplaceholder.typicode.com:80", "GET", "/"),
            none(),
        ),
        (
            "hosts suffix",
            ap(
                "a",
                "ALLOW",
                "  rules: [{to: [{operation: {hosts: ['*.typicode.com']}}]}]\n",
            ),
            get(None),
            ALLOW,
        ),
        (
            "notHosts",
            ap(
                "d",
                "DENY",
                "  rules: [{to: [{operation: {notHosts: ['*.typicode.com']}}]}]\n",
            ),
            with_http(get(None), "evil.example.com", "GET", "/"),
            deny("ns[egress]-policy[d]-rule[0]"),
        ),
        (
            "ports",
            ap(
                "a",
                "ALLOW",
                "  rules: [{to: [{operation: {ports: ['80']}}]}]\n",
            ),
            get(None),
            ALLOW,
        ),
        (
            "notPorts",
            ap(
                "d",
                "DENY",
                "  rules: [{to: [{operation: {notPorts: ['80']}}]}]\n",
            ),
            get(None),
            ALLOW,
        ),
        (
            "methods",
            ap(
                "a",
                "ALLOW",
                "  rules: [{to: [{operation: {methods: [GET, HEAD]}}]}]\n",
            ),
            with_http(get(None), "x", "POST", "/"),
            none(),
        ),
        (
            "notMethods",
            ap(
                "d",
                "DENY",
                "  rules: [{to: [{operation: {notMethods: [GET]}}]}]\n",
            ),
            with_http(get(None), "x", "DELETE", "/"),
            deny("ns[egress]-policy[d]-rule[0]"),
        ),
        (
            "paths prefix",
            ap(
                "a",
                "ALLOW",
                "  rules: [{to: [{operation: {paths: ['/todos/*']}}]}]\n",
            ),
            get(None),
            ALLOW,
        ),
        (
            "notPaths",
            ap(
                "d",
                "DENY",
                "  rules: [{to: [{operation: {notPaths: ['/todos/*']}}]}]\n",
            ),
            with_http(get(None), "x", "GET", "/users/1"),
            deny("ns[egress]-policy[d]-rule[0]"),
        ),
        (
            "paths {*} matches one segment",
            ap(
                "a",
                "ALLOW",
                "  rules: [{to: [{operation: {paths: ['/todos/{*}']}}]}]\n",
            ),
            get(None),
            ALLOW,
        ),
        (
            "paths {*} does not match two segments",
            ap(
                "a",
                "ALLOW",
                "  rules: [{to: [{operation: {paths: ['/todos/{*}']}}]}]\n",
            ),
            with_http(get(None), "x", "GET", "/todos/1/comments"),
            none(),
        ),
        (
            "paths {**} matches several segments",
            ap(
                "a",
                "ALLOW",
                "  rules: [{to: [{operation: {paths: ['/todos/{**}']}}]}]\n",
            ),
            with_http(get(None), "x", "GET", "/todos/1/comments"),
            ALLOW,
        ),
        (
            "paths {**} needs at least one character",
            ap(
                "a",
                "ALLOW",
                "  rules: [{to: [{operation: {paths: ['/todos/{**}']}}]}]\n",
            ),
            with_http(get(None), "x", "GET", "/todos/"),
            none(),
        ),
        (
            "from AND to",
            ap(
                "a",
                "ALLOW",
                "  rules: [{from: [{source: {namespaces: [curl-external-tst]}}], to: [{operation: {methods: [POST]}}]}]\n",
            ),
            get(Some(CURL)),
            none(),
        ),
        // Conditions.
        (
            "when request.headers",
            ap(
                "a",
                "ALLOW",
                "  rules: [{when: [{key: 'request.headers[x-team]', values: [payments]}]}]\n",
            ),
            with_header(get(None), "x-team", "payments"),
            ALLOW,
        ),
        (
            "when request.headers missing",
            ap(
                "a",
                "ALLOW",
                "  rules: [{when: [{key: 'request.headers[x-team]', values: [payments]}]}]\n",
            ),
            get(None),
            none(),
        ),
        (
            "when notValues",
            ap(
                "d",
                "DENY",
                "  rules: [{when: [{key: source.namespace, notValues: [curl-external-tst]}]}]\n",
            ),
            get(Some(OTHER)),
            deny("ns[egress]-policy[d]-rule[0]"),
        ),
        (
            "when source.principal",
            ap(
                "a",
                "ALLOW",
                "  rules: [{when: [{key: source.principal, values: ['cluster.local/ns/curl-external-tst/*']}]}]\n",
            ),
            get(Some(CURL)),
            ALLOW,
        ),
        (
            "when source.ip CIDR",
            ap(
                "a",
                "ALLOW",
                "  rules: [{when: [{key: source.ip, values: [10.1.0.0/16]}]}]\n",
            ),
            get(None),
            ALLOW,
        ),
        (
            "when destination.port",
            ap(
                "a",
                "ALLOW",
                "  rules: [{when: [{key: destination.port, values: ['443']}]}]\n",
            ),
            get(None),
            none(),
        ),
        (
            "when connection.sni (TCP)",
            ap(
                "a",
                "ALLOW",
                "  rules: [{when: [{key: connection.sni, values: ['*.example.com']}]}]\n",
            ),
            tcp(None),
            ALLOW,
        ),
        (
            "all when conditions must hold",
            ap(
                "a",
                "ALLOW",
                "  rules: [{when: [{key: source.namespace, values: [curl-external-tst]}, {key: source.trustDomain, values: [other.td]}]}]\n",
            ),
            get(Some(CURL)),
            none(),
        ),
        (
            "request.auth.principal never matches without JWT support",
            ap(
                "a",
                "ALLOW",
                "  rules: [{when: [{key: request.auth.principal, values: ['*']}]}]\n",
            ),
            get(Some(CURL)),
            none(),
        ),
        // HTTP-only attributes on TCP traffic.
        (
            "TCP: an ALLOW rule with methods is dropped",
            ap(
                "a",
                "ALLOW",
                "  rules: [{to: [{operation: {methods: [GET]}}]}]\n",
            ),
            tcp(Some(CURL)),
            none(),
        ),
        (
            "TCP: a DENY rule ignores its HTTP-only part and denies",
            ap(
                "d",
                "DENY",
                "  rules: [{from: [{source: {namespaces: [curl-external-tst]}}], to: [{operation: {paths: [/admin]}}]}]\n",
            ),
            tcp(Some(CURL)),
            deny("ns[egress]-policy[d]-rule[0]"),
        ),
        (
            "TCP: ports still apply",
            ap(
                "a",
                "ALLOW",
                "  rules: [{to: [{operation: {ports: ['443']}}]}]\n",
            ),
            tcp(None),
            ALLOW,
        ),
        (
            "TCP: header condition in DENY is ignored (denies more)",
            ap(
                "d",
                "DENY",
                "  rules: [{when: [{key: 'request.headers[x-a]', values: [b]}]}]\n",
            ),
            tcp(None),
            deny("ns[egress]-policy[d]-rule[0]"),
        ),
    ];
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = Vec::new();
    for (name, yaml, req, want) in &cases {
        let got = decide(&policies(yaml), req);
        if &got != want {
            failures.push(format!("{name}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn decision_labels_and_details() {
    assert_eq!(ALLOW.label(), "allow");
    assert_eq!(AUDITED.label(), "audit");
    assert_eq!(none().label(), "deny");
    assert_eq!(
        deny("ns[a]-policy[b]-rule[0]")
            .response_code_details()
            .as_deref(),
        Some("rbac_access_denied_matched_policy[ns[a]-policy[b]-rule[0]]")
    );
    assert_eq!(
        none().response_code_details().as_deref(),
        Some("rbac_access_denied_matched_policy[none]")
    );
}

#[test]
fn why_no_allow_rule_admits_names_the_rule_and_the_field() {
    let cases: Vec<(String, Req, Vec<&str>)> = vec![
        (
            ap(
                "p",
                "ALLOW",
                "  rules:\n  - from: [{source: {namespaces: [curl-external-tst]}}]\n",
            ),
            get(Some(OTHER)),
            vec!["egress/p rule[0]: namespaces \"other\" not in [curl-external-tst]"],
        ),
        (
            ap(
                "p",
                "ALLOW",
                "  rules:\n  - to: [{operation: {methods: [POST], paths: [/admin*]}}]\n  - to: [{operation: {notPaths: ['/todos/*']}}]\n",
            ),
            get(Some(CURL)),
            vec![
                "egress/p rule[0]: methods \"GET\" not in [POST]",
                "egress/p rule[1]: paths \"/todos/1\" matches not_paths /todos/*",
            ],
        ),
        (
            ap(
                "p",
                "ALLOW",
                "  rules:\n  - when: [{key: 'request.headers[x-user]', values: [alice]}]\n",
            ),
            get(Some(CURL)),
            vec!["egress/p rule[0]: when request.headers[x-user]: not satisfied"],
        ),
        (
            ap(
                "p",
                "ALLOW",
                "  rules:\n  - to: [{operation: {methods: [GET]}}]\n",
            ),
            tcp(Some(CURL)),
            vec!["egress/p rule[0]: uses HTTP fields, and this is TCP"],
        ),
        (
            ap("p", "ALLOW", ""),
            get(Some(CURL)),
            vec!["egress/p: no rules (it allows nothing)"],
        ),
    ];
    for (yaml, req, want) in cases {
        let pols = policies(&yaml);
        assert_eq!(decide(&pols, &req), none(), "{yaml}");
        let got = with_request(&req, |r| why_not_allowed(&pols, r));
        assert_eq!(got, want, "{yaml}");
    }
}
