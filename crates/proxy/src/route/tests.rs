use meshgate_config::load::{Loaded, load_str};

use super::*;

/// A table with one virtual host per VirtualService host; each rule routes
/// to a cluster numbered after the rule.
fn table(vs_spec: &str) -> RouteTable {
    let text = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs, namespace: ns}}\nspec:\n{vs_spec}"
    );
    let mut loaded = Loaded::default();
    load_str("vs.yaml", &text, &mut loaded).unwrap();
    let errors: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
    assert!(errors.is_empty(), "{errors:?}");
    let vs = &loaded.config.virtual_services[0].spec;
    let routes = vs
        .http
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let dests = r
                .route
                .iter()
                .enumerate()
                .map(|(j, d)| WeightedCluster {
                    cluster: i * 10 + j,
                    weight: d.weight.unwrap_or(if r.route.len() == 1 { 100 } else { 0 }),
                    request_headers: HeaderOps::default(),
                    response_headers: HeaderOps::default(),
                })
                .collect();
            Route::compile(&route_view(i, r), dests)
        })
        .collect();
    RouteTable::new(vec![VirtualHost {
        domains: vs.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        routes,
    }])
}

/// The view's form of a rule, as `meshgate_config::view` builds it.
fn route_view(i: usize, r: &meshgate_config::model::networking::HttpRoute) -> RouteView {
    let action = match (&r.redirect, &r.direct_response) {
        (Some(rd), _) => RouteAction::Redirect(rd.clone()),
        (_, Some(d)) => RouteAction::DirectResponse(d.clone()),
        _ => RouteAction::Route(Vec::new()),
    };
    RouteView {
        listener_port: 80,
        host: "h".into(),
        matches: r.matches.clone(),
        action,
        virtual_service: Some("ns/vs".into()),
        rule: format!("#{i}"),
        rule_index: Some(i),
        sni_hosts: Vec::new(),
        tcp_subnets: None,
        rewrite: r.rewrite.clone(),
        headers: r.headers.clone(),
        timeout: r.timeout,
        retries: r.retries.clone(),
        fault: r.fault.clone(),
        cors_policy: r.cors_policy.clone(),
        mirrors: Vec::new(),
    }
}

struct R {
    authority: &'static str,
    method: &'static str,
    path: &'static str,
    query: &'static str,
    headers: HeaderMap,
}

fn req(authority: &'static str, method: &'static str, path: &'static str) -> R {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    R {
        authority,
        method,
        path,
        query,
        headers: HeaderMap::new(),
    }
}

impl R {
    fn header(mut self, k: &'static str, v: &'static str) -> R {
        self.headers
            .insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        self
    }

    fn view(&self) -> RequestView<'_> {
        RequestView {
            authority: self.authority,
            method: self.method,
            scheme: "http",
            path: self.path,
            query: self.query,
            headers: &self.headers,
        }
    }
}

/// The name of the route a request takes, or `NR` / `no vhost`.
fn which(t: &RouteTable, r: &R) -> String {
    match t.route(&r.view()) {
        Routed::Matched { route, .. } => route.name.to_string(),
        Routed::NoRoute => "NR".into(),
        Routed::NoVirtualHost => "no vhost".into(),
    }
}

const SPEC: &str = "  hosts: [api.example.com, '*.wild.com']
  http:
  - match: [{uri: {exact: /exact}}]
    route: [{destination: {host: a}}]
  - match: [{uri: {prefix: /Pre, }, ignoreUriCase: true}]
    route: [{destination: {host: a}}]
  - match: [{uri: {regex: '/items/[0-9]+'}}]
    route: [{destination: {host: a}}]
  - match: [{method: {exact: POST}, headers: {x-user: {prefix: admin}}}]
    route: [{destination: {host: a}}]
  - match: [{headers: {x-flag: {}}}]
    route: [{destination: {host: a}}]
  - match: [{queryParams: {v: {exact: '2'}}}, {authority: {prefix: beta.}}]
    route: [{destination: {host: a}}]
  - match: [{uri: {prefix: /guarded}, withoutHeaders: {x-debug: {}}}]
    route: [{destination: {host: a}}]
  - match: [{uri: {prefix: /api}}]
    route: [{destination: {host: a}}]
";

#[test]
fn first_match_wins_table() {
    const API: &str = "api.example.com";
    let t = table(SPEC);
    let cases = [
        (req(API, "GET", "/exact"), "#0"),
        (req(API, "GET", "/exact/more"), "NR"),
        (req(API, "GET", "/PREFIX/x"), "#1"),
        (req(API, "GET", "/prefix"), "#1"),
        (req(API, "GET", "/items/42"), "#2"),
        (req(API, "GET", "/items/42x"), "NR"),
        (req(API, "POST", "/x").header("x-user", "admin-1"), "#3"),
        (req(API, "GET", "/x").header("x-user", "admin-1"), "NR"),
        (req(API, "GET", "/x").header("x-flag", ""), "#4"),
        (req(API, "GET", "/x?a=1&v=2"), "#5"),
        (req(API, "GET", "/x?v=3"), "NR"),
        (req("beta.wild.com", "GET", "/x"), "#5"),
        (req(API, "GET", "/guarded"), "#6"),
        (req(API, "GET", "/guarded").header("x-debug", "1"), "NR"),
        (req(API, "GET", "/api/v1"), "#7"),
        (req("API.example.com:80", "GET", "/api/v1"), "#7"),
        (req("x.wild.com", "GET", "/api"), "#7"),
        (req("wild.com", "GET", "/api"), "no vhost"),
        (req("other.com", "GET", "/api"), "no vhost"),
    ];
    for (r, want) in cases {
        assert_eq!(
            which(&t, &r),
            want,
            "{} {} {}?{}",
            r.authority,
            r.method,
            r.path,
            r.query
        );
    }
}

#[test]
fn catch_all_and_weights() {
    let t = table(
        "  hosts: [a.com]\n  http:\n  - route:\n    - destination: {host: a}\n      weight: 90\n    - destination: {host: b}\n      weight: 10\n",
    );
    let Routed::Matched { route, .. } = t.route(&req("a.com", "GET", "/anything").view()) else {
        panic!("no match")
    };
    let Action::Forward(dests) = &route.action else {
        panic!("not forward")
    };
    assert_eq!(pick_weighted(dests, 0.0).unwrap().cluster, 0);
    assert_eq!(pick_weighted(dests, 0.899).unwrap().cluster, 0);
    assert_eq!(pick_weighted(dests, 0.9).unwrap().cluster, 1);
    assert_eq!(pick_weighted(dests, 0.999).unwrap().cluster, 1);
}

#[test]
fn rewrites() {
    let t = table(
        "  hosts: [a.com]\n  http:\n  - match: [{uri: {prefix: /v1/}}]\n    rewrite: {uri: /api/v2/, authority: b.com}\n    route: [{destination: {host: a}}]\n  - match: [{uri: {exact: /old}}]\n    rewrite: {uri: /new}\n    route: [{destination: {host: a}}]\n  - match: [{uri: {prefix: /r/}}]\n    rewrite: {uriRegexRewrite: {match: '^/r/(.*)/x$', rewrite: '/s/\\1'}}\n    route: [{destination: {host: a}}]\n",
    );
    let check = |path: &'static str, want: &str| {
        let r = req("a.com", "GET", path);
        let Routed::Matched { route, matched } = t.route(&r.view()) else {
            panic!("{path}: no match")
        };
        assert_eq!(
            route.rewrite_path(matched, path).as_deref(),
            Some(want),
            "{path}"
        );
        route.authority_rewrite.clone()
    };
    assert_eq!(
        check("/v1/users/1", "/api/v2/users/1").as_deref(),
        Some("b.com")
    );
    assert_eq!(check("/old", "/new"), None);
    check("/r/abc/x", "/s/abc");
}

#[test]
fn redirect_and_direct_response() {
    let t = table(
        "  hosts: [a.com]\n  http:\n  - match: [{uri: {exact: /old}}]\n    redirect: {uri: /new, authority: b.com, redirectCode: 302}\n  - match: [{uri: {exact: /s}}]\n    redirect: {scheme: https}\n  - directResponse: {status: 418, body: {string: teapot}}\n",
    );
    let redirect = |r: &R, port| match t.route(&r.view()) {
        Routed::Matched { route, .. } => match &route.action {
            Action::Redirect(red) => (red.code, red.location(&r.view(), port)),
            other => panic!("{other:?}"),
        },
        _ => panic!("no route"),
    };
    let r = req("a.com:8080", "GET", "/old");
    assert_eq!(
        redirect(&r, 8080),
        (302, "http://b.com:8080/new".to_owned())
    );
    let r = req("a.com", "GET", "/s?x=1");
    assert_eq!(redirect(&r, 80), (301, "https://a.com/s?x=1".to_owned()));
    let r = req("a.com", "GET", "/other");
    let Routed::Matched { route, .. } = t.route(&r.view()) else {
        panic!()
    };
    let Action::Direct { status, body } = &route.action else {
        panic!()
    };
    assert_eq!((*status, body.as_ref()), (418, b"teapot".as_ref()));
}

/// Envoy's `wouldRetryFromReset`: which attempts with no response each
/// `retryOn` retries.
#[test]
fn unanswered_attempts_are_retried_as_envoy_does() {
    use Unanswered::{ConnectFailure, Final, RefusedStream, Reset};
    let policy = |retry_on: &str| {
        table(&format!(
            "  hosts: [a.com]\n  http:\n  - retries: {{attempts: 2, retryOn: '{retry_on}'}}\n    route: [{{destination: {{host: a}}}}]\n"
        ))
        .vhosts[0]
            .routes[0]
            .retry
            .clone()
    };
    let cases = [
        ("5xx", [true, true, true, false]),
        ("gateway-error", [true, true, true, false]),
        ("reset", [true, true, true, false]),
        ("connect-failure", [true, false, false, false]),
        ("reset-before-request", [true, false, false, false]),
        ("refused-stream", [false, false, true, false]),
        ("retriable-status-codes,503", [false, false, false, false]),
    ];
    for (retry_on, [connect, reset, refused, fin]) in cases {
        let p = policy(retry_on);
        assert_eq!(p.retry_unanswered(ConnectFailure), connect, "{retry_on}");
        assert_eq!(p.retry_unanswered(Reset), reset, "{retry_on}");
        assert_eq!(p.retry_unanswered(RefusedStream), refused, "{retry_on}");
        assert_eq!(p.retry_unanswered(Final), fin, "{retry_on}");
    }
    // What reached the upstream is replayed from a copy: only a policy that
    // retries it makes one (a refused stream's, only toward an upstream
    // that may refuse one; a gRPC status's, only for a gRPC request).
    let sent = |p: &RetryPolicy, refusable, grpc| p.retries_sent(refusable, grpc);
    assert!(sent(&policy("reset"), false, false) && !sent(&policy("connect-failure"), true, true));
    let default = RetryPolicy::istio_default();
    assert!(default.retry_unanswered(ConnectFailure) && !default.retry_unanswered(Reset));
    assert!(default.retry_unanswered(RefusedStream));
    assert!(sent(&default, true, false) && sent(&default, false, true));
    assert!(!sent(&default, false, false));
    let conflict = policy("retriable-4xx");
    assert!(conflict.retry_status(409) && !conflict.retry_status(404));
    assert!(sent(&conflict, false, false));
}

/// `retryRemoteLocalities`: the third attempt leaves the first two's
/// localities, the fifth the first four's (Istio's update frequency 2).
#[test]
fn remote_localities_are_tried_every_two_attempts() {
    let route = |remote: &str| {
        table(&format!(
            "  hosts: [a.com]\n  http:\n  - retries: {{attempts: 4, retryOn: reset, retryRemoteLocalities: {remote}}}\n    route: [{{destination: {{host: a}}}}]\n"
        ))
        .vhosts[0]
            .routes[0]
            .retry
            .clone()
    };
    let remote = route("true");
    let passed: Vec<usize> = (1..=5).map(|n| remote.tried_priorities(n)).collect();
    assert_eq!(passed, [0, 0, 2, 2, 4]);
    assert_eq!(route("false").tried_priorities(3), 0);
    assert_eq!(RetryPolicy::istio_default().tried_priorities(3), 0);
}

/// `retryOn`'s gRPC conditions retry a response whose `grpc-status`
/// header names one (Envoy's `retry_grpc_on`); Istio's default has
/// `unavailable` (14) and `cancelled` (1).
#[test]
fn grpc_statuses_are_retried_as_named() {
    let named = table(
        "  hosts: [a.com]\n  http:\n  - retries: {attempts: 2, retryOn: 'deadline-exceeded,internal,resource-exhausted'}\n    route: [{destination: {host: a}}]\n",
    )
    .vhosts[0]
        .routes[0]
        .retry
        .clone();
    let status = |code: &'static str| Some(http::HeaderValue::from_static(code));
    let default = RetryPolicy::istio_default();
    for (code, want) in [
        ("14", true),
        ("1", true),
        ("4", false),
        ("0", false),
        ("x", false),
    ] {
        assert_eq!(
            default.retry_grpc_status(status(code).as_ref()),
            want,
            "{code}"
        );
    }
    assert!(!default.retry_grpc_status(None));
    for (code, want) in [
        ("4", true),
        ("13", true),
        ("8", true),
        ("14", false),
        ("99", false),
    ] {
        assert_eq!(
            named.retry_grpc_status(status(code).as_ref()),
            want,
            "{code}"
        );
    }
}

#[test]
fn retry_policies() {
    let default = RetryPolicy::istio_default();
    assert_eq!(default.attempts, 2);
    assert!(default.on_connect_failure && !default.retry_status(503) && !default.retry_status(500));
    let t = table(
        "  hosts: [a.com]\n  http:\n  - retries: {attempts: 0}\n    route: [{destination: {host: a}}]\n  - retries: {attempts: 3, perTryTimeout: 2s, retryOn: '5xx,429'}\n    route: [{destination: {host: a}}]\n  - fault: {abort: {httpStatus: 503, percentage: {value: 100}}}\n    route: [{destination: {host: a}}]\n",
    );
    let routes = &t.vhosts[0].routes;
    assert_eq!(routes[0].retry.attempts, 0);
    assert_eq!(routes[1].retry.attempts, 3);
    assert_eq!(
        routes[1].retry.per_try_timeout,
        Some(Duration::from_secs(2))
    );
    assert!(
        routes[1].retry.retry_status(500)
            && routes[1].retry.retry_status(429)
            && !routes[1].retry.on_connect_failure
    );
    assert_eq!(routes[2].retry.attempts, 0, "faults disable retries");
    assert_eq!(
        routes[2].fault.as_ref().and_then(|f| f.abort),
        Some((503, 100.0))
    );
}

#[test]
fn header_operations() {
    let ops = HeaderOps::compile(Some(
        &meshgate_config::model::networking::HeaderOperations {
            set: [("x-a".to_owned(), "1".to_owned())].into(),
            add: [("x-b".to_owned(), "2".to_owned())].into(),
            remove: vec!["x-c".to_owned()],
        },
    ));
    let mut h = HeaderMap::new();
    h.insert("x-a", HeaderValue::from_static("0"));
    h.insert("x-b", HeaderValue::from_static("1"));
    h.insert("x-c", HeaderValue::from_static("gone"));
    ops.apply(&mut h);
    assert_eq!(h.get("x-a").unwrap(), "1");
    assert_eq!(h.get_all("x-b").iter().count(), 2);
    assert!(h.get("x-c").is_none());
}

#[test]
fn host_port_split() {
    assert_eq!(split_host_port("a.com:80"), ("a.com", Some(80)));
    assert_eq!(split_host_port("a.com"), ("a.com", None));
    assert_eq!(split_host_port("[::1]:8080"), ("[::1]", Some(8080)));
    assert_eq!(split_host_port("::1"), ("::1", None));
    assert_eq!(split_host_port("a.com:"), ("a.com:", None));
    assert_eq!(split_host_port("a.com:http"), ("a.com:http", None));
    assert_eq!(split_host_port("1::2:80"), ("1::2:80", None));
}

#[test]
fn virtual_hosts_are_chosen_exact_then_longest_wildcard_then_any() {
    let vh = |domains: &[&str]| VirtualHost {
        domains: domains.iter().map(|d| (*d).to_owned()).collect(),
        routes: Vec::new(),
    };
    let t = RouteTable::new(vec![
        vh(&["*"]),
        vh(&["*.com"]),
        vh(&["*.example.com"]),
        vh(&["api.example.com", "other.org"]),
    ]);
    let chosen = |authority: &str| {
        let v = t.vhost(authority).unwrap();
        t.vhosts.iter().position(|x| std::ptr::eq(x, v)).unwrap()
    };
    assert_eq!(chosen("api.example.com"), 3);
    assert_eq!(chosen("API.Example.com:8080"), 3);
    assert_eq!(chosen("other.org"), 3);
    assert_eq!(chosen("www.example.com"), 2);
    assert_eq!(
        chosen("example.com"),
        1,
        "a wildcard needs more than its suffix"
    );
    assert_eq!(chosen("x.com"), 1);
    assert_eq!(chosen("example.org"), 0);
    let none = RouteTable::new(vec![vh(&["*.example.com"])]);
    assert!(none.vhost(".example.com").is_none());
    assert!(none.vhost("example.com").is_none());
}

/// A JWT claim is never a header a client can send: without a
/// RequestAuthentication (meshgate validates no token) a claim match
/// matches nothing, and a `withoutHeaders` claim excludes nothing, as
/// Envoy sees claims of no validated token.
#[test]
fn jwt_claim_matches_never_come_from_client_headers() {
    let t = table(
        "  hosts: [api.example.com]
  http:
  - match: [{headers: {'@request.auth.claims.group': {exact: admin}}}]
    route: [{destination: {host: admin}}]
  - match: [{uri: {prefix: /x}, withoutHeaders: {'@request.auth.claims.group': {}}}]
    route: [{destination: {host: a}}]
",
    );
    let plain = req("api.example.com", "GET", "/");
    assert_eq!(which(&t, &plain), "NR");
    let claiming = req("api.example.com", "GET", "/").header("request.auth.claims.group", "admin");
    assert_eq!(which(&t, &claiming), "NR");
    assert_eq!(which(&t, &req("api.example.com", "GET", "/x")), "#1");
}
