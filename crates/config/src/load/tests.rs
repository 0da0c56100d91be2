use super::*;
use crate::model::networking::{ClientTlsMode, OutboundMode, Resolution};
use crate::model::security::{AuthzAction, MtlsMode};

fn load(text: &str) -> Loaded {
    let mut loaded = Loaded::default();
    load_str("test.yaml", text, &mut loaded).expect("valid YAML");
    loaded
}

fn messages(l: &Loaded) -> Vec<String> {
    l.diagnostics.iter().map(ToString::to_string).collect()
}

const SPECS: &[(&str, &str, &str)] = &[
    (
        "networking.istio.io",
        "ServiceEntry",
        "hosts: [a.example.com]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: DNS",
    ),
    (
        "networking.istio.io",
        "VirtualService",
        "hosts: [a.example.com]\n  http:\n  - route:\n    - destination: {host: a.example.com}",
    ),
    (
        "networking.istio.io",
        "DestinationRule",
        "host: a.example.com\n  trafficPolicy: {tls: {mode: SIMPLE, caCertificates: /ca.pem}}",
    ),
    (
        "networking.istio.io",
        "Gateway",
        "selector: {istio: egressgateway}\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [a.example.com]",
    ),
    (
        "networking.istio.io",
        "Sidecar",
        "outboundTrafficPolicy: {mode: ALLOW_ANY}",
    ),
    (
        "security.istio.io",
        "AuthorizationPolicy",
        "action: DENY\n  rules: [{}]",
    ),
    (
        "security.istio.io",
        "PeerAuthentication",
        "mtls: {mode: STRICT}",
    ),
    (
        "security.istio.io",
        "RequestAuthentication",
        "selector: {matchLabels: {app: a}}\n  jwtRules:\n  - issuer: https://issuer.example\n    jwksUri: https://issuer.example/jwks\n    fromHeaders: [{name: authorization, prefix: 'Bearer '}]\n    outputClaimToHeaders: [{header: x-group, claim: group}]",
    ),
];

#[test]
fn every_istio_kind_in_every_api_version() {
    for (group, kind, spec) in SPECS {
        let versions: &[&str] = if *group == "security.istio.io" {
            &["v1beta1", "v1"]
        } else {
            &["v1alpha3", "v1beta1", "v1"]
        };
        for version in versions {
            let text = format!(
                "apiVersion: {group}/{version}\nkind: {kind}\nmetadata:\n  name: x\n  namespace: ns\nspec:\n  {spec}\n"
            );
            let l = load(&text);
            assert!(
                l.diagnostics.is_empty(),
                "{kind} {version}: {:?}",
                messages(&l)
            );
            let m = l
                .config
                .metas()
                .next()
                .unwrap_or_else(|| panic!("{kind} {version} loaded"));
            assert_eq!(
                (m.kind.as_str(), m.api_version.as_str()),
                (*kind, format!("{group}/{version}").as_str())
            );
            assert_eq!(m.full_name(), "ns/x");
        }
    }
}

#[test]
fn every_kubernetes_kind() {
    let text = "\
apiVersion: v1
kind: Namespace
metadata: {name: ns, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: sa, namespace: ns}
automountServiceAccountToken: false
---
apiVersion: v1
kind: Service
metadata: {name: svc, namespace: ns}
spec:
  selector: {app: a}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: grpc, port: 90, targetPort: grpc}]
---
apiVersion: v1
kind: Pod
metadata: {name: pod, namespace: ns, labels: {app: b}}
spec:
  serviceAccountName: sa
  containers: [{name: c, image: busybox, command: [sleep, '1']}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: dep, namespace: ns}
spec:
  replicas: 2
  selector: {matchLabels: {app: a}}
  strategy: {type: RollingUpdate}
  template:
    metadata: {labels: {app: a}, annotations: {sidecar.istio.io/inject: 'true'}}
    spec:
      volumes: [{name: v, emptyDir: {}}]
      containers:
      - name: c
        image: curl
        ports: [{containerPort: 8080, name: http}]
        securityContext: {runAsUser: 1000}
        volumeMounts: [{name: v, mountPath: /v}]
";
    let l = load(text);
    assert!(l.diagnostics.is_empty(), "{:?}", messages(&l));
    let c = &l.config;
    assert_eq!(
        (
            c.namespaces.len(),
            c.service_accounts.len(),
            c.services.len(),
            c.workloads.len()
        ),
        (1, 1, 1, 2)
    );
    assert_eq!(
        c.namespaces[0].meta.full_name(),
        "ns",
        "Namespace is cluster-scoped"
    );
    assert_eq!(
        c.services[0].spec.ports[1].target_port,
        Some(IntOrStringExt::s("grpc"))
    );
    let dep = &c.workloads[1];
    assert_eq!(dep.meta.kind, Kind::Deployment);
    assert_eq!(dep.spec.selector.get("app").map(String::as_str), Some("a"));
    assert_eq!(dep.spec.pod.containers[0].ports[0].container_port, 8080);
    let pod = &c.workloads[0];
    assert_eq!(pod.spec.pod.service_account_name.as_deref(), Some("sa"));
}

struct IntOrStringExt;
impl IntOrStringExt {
    fn s(v: &str) -> crate::model::common::IntOrString {
        crate::model::common::IntOrString::String(v.to_owned())
    }
}

#[test]
fn fields_beyond_the_seed_are_modelled() {
    let text = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: ns}
spec:
  hosts: [a.example.com]
  gateways: [mesh, ns/gw]
  exportTo: ['.']
  http:
  - name: r1
    match:
    - uri: {prefix: /api}
      ignoreUriCase: true
      headers: {x-user: {exact: bob}}
      withoutHeaders: {x-debug: {}}
      queryParams: {v: {regex: '[0-9]+'}}
      method: {exact: GET}
      authority: {prefix: a.example}
      port: 80
      gateways: [mesh]
    rewrite: {uri: /v2, authority: b.example.com}
    timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: 5xx}
    fault: {delay: {fixedDelay: 2s, percentage: {value: 10}}, abort: {httpStatus: 503, percentage: {value: 1.5}}}
    headers: {request: {set: {x-a: b}, remove: [x-c]}, response: {add: {x-d: e}}}
    corsPolicy: {allowOrigins: [{exact: 'https://x'}], allowMethods: [GET], maxAge: 24h}
    mirror: {host: m.example.com}
    mirrorPercentage: {value: 5}
    route:
    - destination: {host: a.example.com, subset: v1, port: {number: 80}}
      weight: 90
      headers: {request: {set: {x-w: '1'}}}
    - destination: {host: a.example.com, subset: v2, port: {number: 80}}
      weight: 10
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, authority: c.example.com, redirectCode: 302, scheme: https, port: 8443}
  - match: [{uri: {regex: '/gone.*'}}]
    directResponse: {status: 410, body: {string: gone}}
  - uriRegexRewrite: null
    route: [{destination: {host: a.example.com}}]
  tls:
  - match: [{sniHosts: [a.example.com], port: 443}]
    route: [{destination: {host: a.example.com, port: {number: 443}}}]
  tcp:
  - match: [{port: 9000, destinationSubnets: [10.0.0.0/8]}]
    route: [{destination: {host: a.example.com, port: {number: 9000}}}]
";
    let l = load(text);
    // `uriRegexRewrite` is a field of `rewrite`, not of a route: strict
    // validation catches the misplaced key.
    let msgs = messages(&l);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(
        msgs[0],
        "Error [IST0106] (VirtualService ns/vs test.yaml:38) Schema validation error: spec.http[3].uriRegexRewrite: unknown field \"uriRegexRewrite\" (column 5)"
    );

    let fixed = text.replace(
        "  - uriRegexRewrite: null\n",
        "  - rewrite: {uriRegexRewrite: {match: '^/a/(.*)', rewrite: '/b/\\1'}}\n",
    );
    let l = load(&fixed);
    assert!(l.diagnostics.is_empty(), "{:?}", messages(&l));
    let vs = &l.config.virtual_services[0].spec;
    let r = &vs.http[0];
    assert_eq!(r.timeout.map(|t| t.as_std().as_millis()), Some(1500));
    assert_eq!(r.retries.as_ref().map(|x| x.attempts), Some(3));
    assert_eq!(r.matches[0].headers["x-user"].exact.as_deref(), Some("bob"));
    assert_eq!(r.matches[0].without_headers["x-debug"], Default::default());
    assert_eq!(r.route[1].weight, Some(10));
    assert_eq!(
        vs.http[1].redirect.as_ref().and_then(|x| x.redirect_code),
        Some(302)
    );
    assert_eq!(
        vs.http[2].direct_response.as_ref().map(|d| d.status),
        Some(410)
    );
    assert_eq!(vs.tls[0].matches[0].sni_hosts, vec!["a.example.com"]);
    assert_eq!(vs.tcp[0].matches[0].port, Some(9000));
}

#[test]
fn destination_rule_and_security_fields() {
    let text = "\
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: dr, namespace: ns}
spec:
  host: a.example.com
  exportTo: ['*']
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool:
      tcp: {maxConnections: 10, connectTimeout: 250ms, idleTimeout: 30s}
      http: {http1MaxPendingRequests: 5, maxRequestsPerConnection: 100, idleTimeout: 10s}
    outlierDetection: {consecutive5xxErrors: 3, consecutiveGatewayErrors: 2, interval: 5s, baseEjectionTime: 30s, maxEjectionPercent: 50}
    tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, caCertificates: /ca.pem, sni: a.example.com, subjectAltNames: [a.example.com]}
    portLevelSettings:
    - port: {number: 443}
      tls: {mode: SIMPLE, insecureSkipVerify: true}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ap, namespace: ns}
spec:
  selector: {matchLabels: {app: a}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/a/sa/b], notNamespaces: [x], ipBlocks: [10.0.0.0/8], remoteIpBlocks: [1.2.3.4]}
    to:
    - operation: {hosts: [a.example.com], ports: ['443'], methods: [GET], paths: ['/api/{*}'], notPaths: [/admin]}
    when:
    - {key: 'request.headers[x-env]', values: [prod]}
    - {key: source.namespace, notValues: [evil]}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: pa, namespace: ns}
spec:
  selector: {matchLabels: {app: a}}
  mtls: {mode: STRICT}
  portLevelMtls: {8080: {mode: PERMISSIVE}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: sc, namespace: ns}
spec:
  workloadSelector: {labels: {app: a}}
  egress: [{hosts: ['./*', 'istio-system/*'], port: {number: 80, protocol: HTTP, name: http}}]
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
";
    let l = load(text);
    assert!(l.diagnostics.is_empty(), "{:?}", messages(&l));
    let dr = &l.config.destination_rules[0].spec;
    let tp = dr.traffic_policy.as_ref().unwrap();
    assert_eq!(tp.tls.as_ref().map(|t| t.mode), Some(ClientTlsMode::Mutual));
    assert_eq!(
        tp.port_level_settings[0]
            .tls
            .as_ref()
            .and_then(|t| t.insecure_skip_verify),
        Some(true)
    );
    assert_eq!(
        tp.outlier_detection
            .as_ref()
            .and_then(|o| o.consecutive_5xx_errors),
        Some(3)
    );
    let ap = &l.config.authorization_policies[0].spec;
    assert_eq!(ap.action, AuthzAction::Allow);
    assert_eq!(ap.rules.as_ref().map(Vec::len), Some(1));
    let pa = &l.config.peer_authentications[0].spec;
    assert_eq!(pa.port_level_mtls[&8080].mode, MtlsMode::Permissive);
    let sc = &l.config.sidecars[0].spec;
    assert_eq!(
        sc.outbound_traffic_policy.as_ref().map(|p| p.mode),
        Some(OutboundMode::RegistryOnly)
    );
}

#[test]
fn absent_rules_differ_from_a_list_with_an_empty_rule() {
    let l = load(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: b}\nspec: {rules: [{}]}\n",
    );
    assert_eq!(l.config.authorization_policies[0].spec.rules, None);
    assert_eq!(
        l.config.authorization_policies[1]
            .spec
            .rules
            .as_ref()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        l.config.authorization_policies[0].meta.namespace, "default",
        "no namespace means default"
    );
}

#[test]
fn schema_errors_name_field_line_and_what_cannot_be_read_is_not_loaded() {
    let cases: &[(&str, &str)] = &[
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: ns}\nspec:\n  hosts: [a.com]\n  resolution: DNZ\n",
            "Error [IST0106] (ServiceEntry ns/se test.yaml:6) Schema validation error: spec.resolution: unsupported value \"DNZ\": supported values: \"NONE\", \"STATIC\", \"DNS\", \"DNS_ROUND_ROBIN\", \"DYNAMIC_DNS\" (column 15)",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: ns}\nspec:\n  hosts: [a.com]\n  ports:\n  - number: http\n    name: http\n",
            "Error [IST0106] (ServiceEntry ns/se test.yaml:7) Schema validation error: spec.ports[0].number: invalid type: expected integer, found string (column 13)",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: ns}\nspec:\n  selector: {istio: x}\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    host: [a.com]\n",
            "Error [IST0106] (Gateway ns/gw test.yaml:8) Schema validation error: spec.servers[0].host: unknown field \"host\" (column 5)",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: ns}\nspec:\n  hosts: [a.com]\n  http:\n  - route: [{destination: {host: a.com}}]\n    redirect: {uri: /x}\n",
            "Error [IST0106] (VirtualService ns/vs test.yaml:7) Schema validation error: spec.http[0]: only one of route, redirect, directResponse or delegate may be set",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: ns}\nspec:\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: a.com}}]\n",
            "Error [IST0106] (VirtualService ns/vs test.yaml:5) Schema validation error: spec.gateways: a delegate VirtualService (one without hosts) cannot have gateways",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: ns}\nspec:\n  hosts: [a.com]\n  http:\n  - route: [{destination: {host: a.com}}]\n    corsPolicy: {allowMethods: [GET, FETCH]}\n",
            "Error [IST0106] (VirtualService ns/vs test.yaml:8) Schema validation error: spec.http[0].corsPolicy.allowMethods[1]: \"FETCH\" is not a supported HTTP method",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr, namespace: ns}\nspec:\n  host: a.com\n  trafficPolicy:\n    outlierDetection: {consecutiveLocalOriginFailures: 3}\n",
            "Error [IST0106] (DestinationRule ns/dr test.yaml:7) Schema validation error: spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures: consecutiveLocalOriginFailures is set but splitExternalLocalOriginErrors is not true",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr, namespace: ns}\nspec:\n  host: a.com\n  trafficPolicy:\n    tunnel: {protocol: UDP, targetHost: b.com, targetPort: 443}\n",
            "Error [IST0106] (DestinationRule ns/dr test.yaml:7) Schema validation error: spec.trafficPolicy.tunnel.protocol: tunnel protocol must be \"CONNECT\" or \"POST\"",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr, namespace: ns}\nspec:\n  host: a.com\n  trafficPolicy:\n    outlierDetection: {interval: 0s}\n",
            "Error [IST0106] (DestinationRule ns/dr test.yaml:7) Schema validation error: spec.trafficPolicy.outlierDetection.interval: interval must be at least 1ms",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr, namespace: ns}\nspec:\n  host: a.com\n  trafficPolicy:\n    tls: {mode: ISTIO_MUTUAL, caCertificates: /x.pem}\n",
            "Error [IST0106] (DestinationRule ns/dr test.yaml:7) Schema validation error: spec.trafficPolicy.tls: ISTIO_MUTUAL uses the mesh certificates: clientCertificate, privateKey, caCertificates, caCrl and credentialName must be empty",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ap, namespace: ns}\nspec:\n  rules:\n  - when: [{key: source.nmespace, values: [a]}]\n",
            "Error [IST0106] (AuthorizationPolicy ns/ap test.yaml:6) Schema validation error: spec.rules[0].when[0].key: unknown condition key \"source.nmespace\"",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: Bad_Name, namespace: ns}\nspec: {}\n",
            "Error [IST0106] (Sidecar ns/Bad_Name test.yaml:3) Schema validation error: metadata.name: invalid name \"Bad_Name\": must be lowercase letters, digits, '-' or '.'",
        ),
        (
            "apiVersion: networking.istio.io/v2\nkind: Sidecar\nmetadata: {name: s}\nspec: {}\n",
            "Error [IST0106] (Sidecar s test.yaml:1) Schema validation error: apiVersion \"networking.istio.io/v2\" is not supported for Sidecar; use one of: networking.istio.io/v1alpha3, networking.istio.io/v1beta1, networking.istio.io/v1",
        ),
        (
            "kind: Sidecar\nmetadata: {name: s}\n",
            "Error [IST0106] (Sidecar s test.yaml:1) Schema validation error: not a Kubernetes object: required field \"apiVersion\" is missing",
        ),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: ns}\nspec:\n  template:\n    spec:\n      containers:\n      - name: c\n        imagee: x\n",
            "Error [IST0106] (Deployment ns/d test.yaml:9) Schema validation error: spec.template.spec.containers[0].imagee: unknown field \"imagee\" (column 9)",
        ),
    ];
    // What reads but breaks a rule stays for the analyzers (as istioctl
    // analyze keeps analysing it); what cannot be read is not loaded.
    let readable = [
        "only one of route",
        "a delegate VirtualService",
        "supported HTTP method",
        "ISTIO_MUTUAL uses",
        "splitExternalLocalOriginErrors is not true",
        "must be at least 1ms",
        "tunnel protocol must be",
        "unknown condition key",
        "invalid name",
    ];
    for (text, want) in cases {
        let l = load(text);
        assert_eq!(messages(&l), vec![(*want).to_owned()], "for:\n{text}");
        let kept = usize::from(readable.iter().any(|r| want.contains(r)));
        assert_eq!(l.config.metas().count(), kept, "{want}");
        assert!(l.has_errors());
    }
}

#[test]
fn unknown_kinds_are_skipped_with_a_warning() {
    let l = load(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm, namespace: ns}\ndata: {a: b}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {}\n",
    );
    assert_eq!(
        messages(&l),
        vec![
            "Warning [MG0003] (ConfigMap cm test.yaml:1) skipped: meshgate does not read ConfigMap (v1)",
            "Warning [MG0003] (Gateway g test.yaml:6) skipped: meshgate does not read Gateway (gateway.networking.k8s.io/v1)",
        ]
    );
    assert!(!l.has_errors());
    assert_eq!(l.config.gateways.len(), 0);
}

#[test]
fn a_mistyped_kind_in_a_known_group_is_an_error_with_the_nearest_kind() {
    let cases = [
        (
            "networking.istio.io/v1",
            "VirtualServce",
            "no kind \"VirtualServce\" in API group networking.istio.io (networking.istio.io/v1); did you mean VirtualService?",
        ),
        (
            "networking.istio.io/v1beta1",
            "virtualservice",
            "no kind \"virtualservice\" in API group networking.istio.io (networking.istio.io/v1beta1); did you mean VirtualService?",
        ),
        (
            "security.istio.io/v1",
            "AuthorisationPolicy",
            "no kind \"AuthorisationPolicy\" in API group security.istio.io (security.istio.io/v1); did you mean AuthorizationPolicy?",
        ),
        (
            "apps/v1",
            "Deploymnet",
            "no kind \"Deploymnet\" in API group apps (apps/v1); did you mean Deployment?",
        ),
        (
            "v1",
            "Servcie",
            "no kind \"Servcie\" in API group core (v1); did you mean Service?",
        ),
        (
            "networking.istio.io/v1",
            "Route",
            "no kind \"Route\" in API group networking.istio.io (networking.istio.io/v1)",
        ),
    ];
    for (api_version, kind, want) in cases {
        let text = format!(
            "apiVersion: {api_version}\nkind: {kind}\nmetadata: {{name: x, namespace: ns}}\nspec: {{}}\n"
        );
        let l = load(&text);
        assert_eq!(
            messages(&l),
            vec![format!(
                "Error [IST0106] ({kind} ns/x test.yaml:2) Schema validation error: {want}"
            )],
        );
        assert!(l.has_errors());
    }
    // Real kinds meshgate does not read stay warnings.
    for (api_version, kind) in [
        ("networking.istio.io/v1", "WorkloadEntry"),
        ("v1", "List"),
        ("apps/v1", "StatefulSet"),
        ("networking.k8s.io/v1", "Ingres"),
    ] {
        let l = load(&format!(
            "apiVersion: {api_version}\nkind: {kind}\nmetadata: {{name: x}}\n"
        ));
        assert!(!l.has_errors(), "{kind}: {:?}", messages(&l));
    }
}

#[test]
fn malformed_yaml_is_a_load_error_with_line_and_column() {
    let mut l = Loaded::default();
    let err = load_str(
        "bad.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: [a\n",
        &mut l,
    )
    .unwrap_err();
    let text = err.to_string();
    assert_eq!(
        text,
        "bad.yaml:4:9: YAML syntax error: unclosed bracket '['"
    );
    let err = load_str("dup.yaml", "a: 1\nb: 2\na: 3\n", &mut l).unwrap_err();
    assert_eq!(
        err.to_string(),
        "dup.yaml:3:1: YAML syntax error: duplicate key `a`"
    );
}

#[test]
fn duplicate_resources_are_refused() {
    let doc = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s, namespace: ns}\nspec: {}\n";
    let l = load(&format!("{doc}---\n{doc}"));
    assert_eq!(
        messages(&l),
        vec![
            "Error [IST0106] (Sidecar ns/s test.yaml:6) Schema validation error: duplicate Sidecar ns/s: also defined at test.yaml:1"
        ]
    );
    assert_eq!(l.config.sidecars.len(), 1);
}

#[test]
fn kubectl_list_output_is_read() {
    let l = load(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: a}\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: b}\n",
    );
    assert_eq!(l.config.namespaces.len(), 2);
    assert_eq!(l.config.namespaces[1].meta.source.line, 7);
}

#[test]
fn seed_examples_load_cleanly() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/seed");
    let l = load_paths(&[dir]).expect("seed loads");
    assert!(l.diagnostics.is_empty(), "{:?}", messages(&l));
    assert_eq!(
        l.config.summary(),
        "2 namespaces, 2 workloads, 1 Service, 1 ServiceAccount, 1 ServiceEntry, 2 VirtualServices, 1 DestinationRule, 1 Gateway, 1 Sidecar, 1 AuthorizationPolicy"
    );
    let se = &l.config.service_entries[0];
    assert_eq!(se.spec.resolution, Resolution::Dns);
    assert_eq!(&*se.meta.source.file, "serviceentry.yaml");
    let svc = &l.config.services[0];
    assert_eq!(
        (&*svc.meta.source.file, svc.meta.source.line),
        ("deployment-egress-gw.yaml", 68)
    );
}

#[test]
fn missing_path_and_empty_folder() {
    let err = load_paths(&["/nonexistent/meshgate"]).unwrap_err();
    assert!(
        err.to_string().starts_with("/nonexistent/meshgate: "),
        "{err}"
    );
    let dir = std::env::temp_dir().join(format!("meshgate-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = load_paths(&[&dir]).unwrap_err();
    assert!(
        err.to_string().ends_with("no .yaml or .yml files found"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Files are parsed in parallel and loaded in name order: resources keep
/// that order, a duplicate names the earlier file, and of two broken files
/// the first in order is the error.
#[test]
fn a_folder_loads_in_file_order_whatever_parses_first() {
    let dir = std::env::temp_dir().join(format!("meshgate-order-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let ns = |name: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n");
    // A large first file, so that the small ones are parsed before it ends.
    let big: String = (0..2000)
        .map(|i| format!("---\n{}", ns(&format!("big-{i}"))))
        .collect();
    std::fs::write(dir.join("a.yaml"), big).unwrap();
    for (i, name) in ["b.yaml", "c.yml", "sub/d.yaml", "e.yaml"]
        .iter()
        .enumerate()
    {
        std::fs::write(dir.join(name), ns(&format!("n-{i}"))).unwrap();
    }
    std::fs::write(dir.join("f.yaml"), ns("n-1")).unwrap();
    std::fs::write(dir.join("notes.txt"), "not: [yaml").unwrap();
    let l = load_paths(&[&dir]).expect("loads");
    let names: Vec<&str> = l
        .config
        .namespaces
        .iter()
        .map(|n| n.meta.name.as_str())
        .collect();
    assert_eq!(names.len(), 2004, "{:?}", messages(&l));
    assert_eq!((names[0], names[1999]), ("big-0", "big-1999"));
    // A folder's entries in name order: `sub/` after `f.yaml`.
    assert_eq!(&names[2000..], ["n-0", "n-1", "n-3", "n-2"]);
    assert_eq!(&*l.config.namespaces[2003].meta.source.file, "sub/d.yaml");
    assert_eq!(
        messages(&l),
        [
            "Error [IST0106] (Namespace n-1 f.yaml:1) Schema validation error: duplicate Namespace n-1: also defined at c.yml:1"
        ]
    );

    std::fs::write(dir.join("e.yaml"), "a: [1\n").unwrap();
    std::fs::write(dir.join("c.yml"), "b: {\n").unwrap();
    let err = load_paths(&[&dir]).unwrap_err();
    assert!(err.to_string().starts_with("c.yml:"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sidecar_listeners_are_validated_as_istio_validates_them() {
    let sidecar = |spec: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: s, namespace: ns}}\nspec:\n{spec}"
        )
    };
    let error = |line: u32, field: &str, msg: &str| {
        format!(
            "Error [IST0106] (Sidecar ns/s test.yaml:{line}) Schema validation error: {field}: {msg}"
        )
    };
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            sidecar(
                "  egress:\n  - port: {number: 0, protocol: HTTP, name: http-uds}\n    bind: 127.0.0.1\n    hosts: ['./*']\n",
            ),
            vec![error(
                7,
                "spec.egress[0].bind",
                "sidecar: ports with 0 value must have a unix domain socket bind address",
            )],
        ),
        (
            sidecar(
                "  egress:\n  - port: {number: 0, protocol: HTTP, name: http-uds}\n    bind: unix:///a.sock\n    captureMode: IPTABLES\n    hosts: ['./*']\n  - port: {number: 0, protocol: HTTP, name: http-uds2}\n    bind: unix:///a.sock\n    hosts: ['./*']\n",
            ),
            vec![
                error(
                    8,
                    "spec.egress[0].captureMode",
                    "sidecar: captureMode must be DEFAULT/NONE for unix domain socket listeners",
                ),
                error(
                    10,
                    "spec.egress[1].port",
                    "sidecar: unix domain socket values for listeners must be unique",
                ),
            ],
        ),
        (
            sidecar(
                "  egress:\n  - port: {number: 9000, protocol: HTTP, name: http}\n    bind: localhost\n    captureMode: NONE\n    hosts: ['./*']\n",
            ),
            vec![error(
                7,
                "spec.egress[0].bind",
                "localhost is not a valid IP",
            )],
        ),
        (
            sidecar(
                "  ingress:\n  - port: {number: 9080, protocol: HTTP, name: http}\n    defaultEndpoint: 10.0.0.1:8080\n",
            ),
            vec![error(
                7,
                "spec.ingress[0].defaultEndpoint",
                "sidecar: defaultEndpoint must be of form 127.0.0.1:<port>,0.0.0.0:<port>,[::1]:port,[::]:port,unix://filepath or unset",
            )],
        ),
        (
            sidecar(
                "  ingress:\n  - port: {number: 9080, protocol: HTTP, name: http}\n    tls: {mode: ISTIO_MUTUAL, credentialName: c}\n",
            ),
            vec![
                error(
                    6,
                    "spec.ingress[0].port.protocol",
                    "server cannot have TLS settings for non HTTPS/TLS ports",
                ),
                error(
                    7,
                    "spec.ingress[0].tls",
                    "sidecar: credentialName is not currently supported",
                ),
                error(
                    7,
                    "spec.ingress[0].tls.mode",
                    "configuration is invalid: cannot set mode to ISTIO_MUTUAL in sidecar ingress tls",
                ),
            ],
        ),
        (
            sidecar(
                "  ingress:\n  - port: {number: 9443, protocol: HTTPS, name: https}\n    tls: {mode: MUTUAL, serverCertificate: /c.pem, privateKey: /k.pem}\n",
            ),
            vec![error(
                7,
                "spec.ingress[0].tls",
                "MUTUAL requires caCertificates",
            )],
        ),
    ];
    for (text, want) in cases {
        let l = load(&text);
        let mut got = messages(&l);
        got.sort();
        let mut want = want;
        want.sort();
        assert_eq!(got, want, "for:\n{text}");
    }
    let valid = sidecar(
        "  egress:\n  - port: {number: 0, protocol: HTTP, name: http-uds}\n    bind: unix://@egress\n    hosts: ['./*']\n  - port: {number: 9000, protocol: HTTP, name: http}\n    captureMode: NONE\n    hosts: ['./*']\n  ingress:\n  - port: {number: 9443, protocol: HTTPS, name: https}\n    bind: 0.0.0.0\n    captureMode: NONE\n    defaultEndpoint: unix:///var/run/app.sock\n    tls: {mode: SIMPLE, serverCertificate: /c.pem, privateKey: /k.pem}\n",
    );
    assert_eq!(messages(&load(&valid)), Vec::<String>::new());
}

/// A file larger than a part is parsed in parts on several threads
/// (`document_parts`); what it loads, the lines it names and its first
/// syntax error are those of the file parsed whole (`load_str`).
#[test]
fn a_large_file_loads_in_parts_as_it_loads_whole() {
    let dir = std::env::temp_dir().join(format!("meshgate-parts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ns =
        |i: usize| format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: n-{i}}}\n");
    let mut text: String = (0..10_000).map(ns).collect();
    text.push_str(&ns(10));
    assert!(yaml::document_parts(&text, PART_BYTES).len() > 1);
    let file = dir.join("big.yaml");
    std::fs::write(&file, &text).unwrap();
    let in_parts = load_paths(&[&dir]).expect("loads");
    let mut whole = Loaded::default();
    load_str("big.yaml", &text, &mut whole).unwrap();
    let seen = |l: &Loaded| -> Vec<(String, u32)> {
        l.config
            .namespaces
            .iter()
            .map(|n| (n.meta.name.clone(), n.meta.source.line))
            .collect()
    };
    assert_eq!(seen(&in_parts).len(), 10_000);
    assert_eq!(seen(&in_parts), seen(&whole));
    assert_eq!(
        messages(&in_parts),
        [
            "Error [IST0106] (Namespace n-10 big.yaml:40002) Schema validation error: duplicate Namespace n-10: also defined at big.yaml:42"
        ]
    );
    assert_eq!(messages(&in_parts), messages(&whole));

    // A syntax error in the last part names its line in the file.
    text.push_str("---\nkind: [Namespace\n");
    std::fs::write(&file, &text).unwrap();
    let err = load_paths(&[&dir]).unwrap_err().to_string();
    let mut whole = Loaded::default();
    let want = load_str("big.yaml", &text, &mut whole)
        .unwrap_err()
        .to_string();
    assert_eq!(err, want);
    assert!(err.starts_with("big.yaml:40006:7: "), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `---` line inside a quoted scalar or a flow collection is not YAML
/// (the spec forbids it there); a file that has one loads as it does
/// parsed whole, whatever the parser makes of it, parts or not.
#[test]
fn a_large_file_with_a_misplaced_marker_loads_as_it_does_whole() {
    let dir = std::env::temp_dir().join(format!("meshgate-marker-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ns =
        |i: usize| format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: n-{i}}}\n");
    let bulk: String = (0..6_000).map(ns).collect();
    for odd in [
        "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: quoted\n  labels: {a: \"x\n---\ny\"}\n",
        "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: flow\n  labels: {a: b,\n---\n  c: d}\n",
    ] {
        let text = format!("{bulk}{odd}{bulk}");
        assert!(yaml::document_parts(&text, PART_BYTES).len() > 2);
        std::fs::write(dir.join("big.yaml"), &text).unwrap();
        let mut whole = Loaded::default();
        let want = load_str("big.yaml", &text, &mut whole).map(|()| messages(&whole));
        let got = load_paths(&[&dir]).map(|l| messages(&l));
        assert_eq!(
            format!("{got:?}"),
            format!("{want:?}"),
            "{}",
            odd.escape_debug()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn retry_conditions_are_validated_as_istio_validates_them() {
    let l = load(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v, namespace: ns}\nspec:\n  hosts: [a.example.com]\n  http:\n  - retries: {attempts: 2, retryOn: '5xx,reset,retriable-4xx,503,bogus,599, gateway-error'}\n    route: [{destination: {host: a.example.com}}]\n",
    );
    let error = |piece: &str| {
        format!(
            "Error [IST0106] (VirtualService ns/v test.yaml:7) Schema validation error: spec.http[0].retries.retryOn: \"{piece}\" is not a valid retryOn policy"
        )
    };
    // 599 is no registered status; a space is part of the piece, as Istio
    // reads it.
    assert_eq!(
        messages(&l),
        vec![error("bogus"), error("599"), error(" gateway-error")]
    );
}
