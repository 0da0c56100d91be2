use super::*;
use crate::Loaded;

/// The seed plus extra documents (as `extra.yaml`), analyzed.
fn seed_plus(extra: &str) -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/seed");
    let mut loaded: Loaded = crate::load_paths(&[dir]).expect("seed loads");
    crate::load::load_str("extra.yaml", extra, &mut loaded).expect("valid YAML");
    let schema: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
    assert!(schema.is_empty(), "{schema:?}");
    analyze(&loaded.config, &MeshSettings::default())
        .iter()
        .map(ToString::to_string)
        .collect()
}

const SEED_IST0128: &str = "Warning [IST0128] (DestinationRule curl-egress-tst/jsonplaceholder-tls-origination destintionrule.yaml:1) DestinationRule curl-egress-tst/jsonplaceholder-tls-origination in namespace curl-egress-tst has TLS mode set to SIMPLE but no caCertificates are set to validate server identity for host: jsonplaceholder.typicode.com";

#[test]
fn seed_has_only_the_ca_certificates_warning() {
    assert_eq!(seed_plus(""), vec![SEED_IST0128]);
}

fn vs(name: &str, ns: &str, body: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}"
    )
}

/// Each case: extra YAML, and the exact diagnostics it adds to the seed's.
#[test]
fn each_code_with_its_exact_message() {
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "IST0101 gateway",
            vs("v", "curl-egress-tst", "  hosts: [jsonplaceholder.typicode.com]\n  gateways: [no-such-gateway]\n  http:\n  - route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]\n"),
            // As istioctl: a gateway that does not exist has none of the hosts.
            vec![
                "Error [IST0101] (VirtualService curl-egress-tst/v extra.yaml:6) Referenced gateway not found: \"no-such-gateway\"",
                "Warning [IST0132] (VirtualService curl-egress-tst/v extra.yaml:6) one or more host [jsonplaceholder.typicode.com] defined in VirtualService curl-egress-tst/v not found in Gateway curl-egress-tst/no-such-gateway.",
            ],
        ),
        (
            "IST0101 host",
            vs("v", "curl-external-tst", "  hosts: [other.example.com]\n  http:\n  - route: [{destination: {host: nowhere.example.com}}]\n"),
            vec!["Error [IST0101] (VirtualService curl-external-tst/v extra.yaml:7) Referenced host not found: \"nowhere.example.com\""],
        ),
        (
            "IST0101 host:port",
            vs("v", "curl-external-tst", "  hosts: [other.example.com]\n  http:\n  - route:\n    - destination:\n        host: jsonplaceholder.typicode.com\n        port: {number: 8443}\n"),
            vec!["Error [IST0101] (VirtualService curl-external-tst/v extra.yaml:10) Referenced host:port not found: \"jsonplaceholder.typicode.com:8443\""],
        ),
        (
            "IST0101 subset",
            vs("v", "curl-egress-tst", "  hosts: [other.example.com]\n  http:\n  - route:\n    - destination:\n        host: jsonplaceholder.typicode.com\n        port: {number: 443}\n        subset: v9\n"),
            vec!["Error [IST0101] (VirtualService curl-egress-tst/v extra.yaml:11) Referenced host+subset in destinationrule not found: \"jsonplaceholder.typicode.com+v9\""],
        ),
        (
            "IST0101 selector (Gateway)",
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g2, namespace: curl-egress-tst}\nspec:\n  selector: {istio: nothing}\n  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: [a.example.com]}]\n".to_owned(),
            vec!["Error [IST0101] (Gateway curl-egress-tst/g2 extra.yaml:5) Referenced selector not found: \"istio=nothing\""],
        ),
        (
            "IST0101 selector (Sidecar)",
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s2, namespace: curl-external-tst}\nspec:\n  workloadSelector: {labels: {app: ghost}}\n".to_owned(),
            vec!["Error [IST0101] (Sidecar curl-external-tst/s2 extra.yaml:5) Referenced selector not found: \"app=ghost\""],
        ),
        (
            "IST0101 namespace",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a2, namespace: curl-egress-tst}\nspec:\n  rules:\n  - from:\n    - source:\n        namespaces: [curl-externl-tst]\n".to_owned(),
            vec!["Error [IST0101] (AuthorizationPolicy curl-egress-tst/a2 extra.yaml:8) Referenced namespace not found: \"curl-externl-tst\""],
        ),
        (
            "IST0109",
            vs("dup", "curl-external-tst", "  hosts: [jsonplaceholder.typicode.com]\n  http:\n  - route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 80}}}]\n"),
            vec![
                "Error [IST0109] (VirtualService curl-external-tst/dup extra.yaml:3) The VirtualServices curl-external-tst/dup,curl-external-tst/jsonplaceholder-egress associated with mesh gateway define the same host */jsonplaceholder.typicode.com which can lead to undefined behavior. This can be fixed by merging the conflicting VirtualServices into a single resource.",
                "Error [IST0109] (VirtualService curl-external-tst/jsonplaceholder-egress virtualservice-workload.yaml:4) The VirtualServices curl-external-tst/dup,curl-external-tst/jsonplaceholder-egress associated with mesh gateway define the same host */jsonplaceholder.typicode.com which can lead to undefined behavior. This can be fixed by merging the conflicting VirtualServices into a single resource.",
            ],
        ),
        (
            "IST0110",
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: second, namespace: curl-external-tst}\nspec:\n  workloadSelector: {labels: {app: curl-test}}\n".to_owned(),
            vec![
                "Error [IST0110] (Sidecar curl-external-tst/second extra.yaml:1) The Sidecars [restrict-outbound-traffic second] in namespace \"curl-external-tst\" select the same workload pod \"curl-test\", which can lead to undefined behavior.",
                "Error [IST0110] (Sidecar curl-external-tst/restrict-outbound-traffic sidecar.yaml:1) The Sidecars [restrict-outbound-traffic second] in namespace \"curl-external-tst\" select the same workload pod \"curl-test\", which can lead to undefined behavior.",
            ],
        ),
        (
            "IST0111",
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: a, namespace: curl-external-tst}\nspec: {}\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: b, namespace: curl-external-tst}\nspec: {}\n".to_owned(),
            vec![
                "Error [IST0111] (Sidecar curl-external-tst/a extra.yaml:1) The Sidecars [a b] in namespace \"curl-external-tst\" have no workload selector, which can lead to undefined behavior.",
                "Error [IST0111] (Sidecar curl-external-tst/b extra.yaml:6) The Sidecars [a b] in namespace \"curl-external-tst\" have no workload selector, which can lead to undefined behavior.",
            ],
        ),
        (
            "IST0112",
            vs("v", "curl-external-tst", "  hosts: [other.example.com]\n  http:\n  - route:\n    - destination: {host: jsonplaceholder.typicode.com}\n"),
            vec!["Error [IST0112] (VirtualService curl-external-tst/v extra.yaml:8) This VirtualService routes to a service \"jsonplaceholder.typicode.com\" that exposes multiple ports [80 443]. Specifying a port in the destination is required to disambiguate."],
        ),
        (
            "IST0127",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a2, namespace: curl-egress-tst}\nspec:\n  selector: {matchLabels: {istio: ingressgateway}}\n  rules: [{}]\n".to_owned(),
            vec!["Warning [IST0127] (AuthorizationPolicy curl-egress-tst/a2 extra.yaml:5) No matching workloads for this resource with the following labels: istio=ingressgateway"],
        ),
        (
            "IST0129",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d2, namespace: curl-external-tst}\nspec:\n  host: jsonplaceholder.typicode.com\n  trafficPolicy:\n    portLevelSettings:\n    - port: {number: 443}\n      tls: {mode: SIMPLE}\n".to_owned(),
            vec!["Warning [IST0129] (DestinationRule curl-external-tst/d2 extra.yaml:8) DestinationRule curl-external-tst/d2 in namespace curl-external-tst has TLS mode set to SIMPLE but no caCertificates are set to validate server identity for host: jsonplaceholder.typicode.com at port number:443"],
        ),
        (
            "IST0130 + IST0131",
            vs("v", "curl-external-tst", "  hosts: [other.example.com]\n  http:\n  - match: [{uri: {prefix: /a}}]\n    route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 80}}}]\n  - match: [{uri: {prefix: /a}}]\n    route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 80}}}]\n  - route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 80}}}]\n  - name: late\n    route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 80}}}]\n"),
            vec![
                "Warning [IST0130] (VirtualService curl-external-tst/v extra.yaml:9) VirtualService rule #1 not used (all matches used by prior rules).",
                "Info [IST0131] (VirtualService curl-external-tst/v extra.yaml:9) VirtualService rule #1 match #0 is not used (duplicate/overlapping match in rule #0).",
                "Warning [IST0130] (VirtualService curl-external-tst/v extra.yaml:12) VirtualService rule \"late\" not used (only the last rule can have no matches).",
            ],
        ),
        (
            "IST0132",
            vs("v", "curl-egress-tst", "  hosts: [api.other.com]\n  gateways: [egress-gateway]\n  http:\n  - route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]\n"),
            vec!["Warning [IST0132] (VirtualService curl-egress-tst/v extra.yaml:6) one or more host [api.other.com] defined in VirtualService curl-egress-tst/v not found in Gateway curl-egress-tst/egress-gateway."],
        ),
        (
            "IST0145",
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g2, namespace: curl-egress-tst}\nspec:\n  selector: {istio: egressgateway}\n  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [jsonplaceholder.typicode.com, api.example.com]}]\n".to_owned(),
            // As istioctl: the same host (a wildcard covering it is no conflict).
            vec![
                "Error [IST0145] (Gateway curl-egress-tst/g2 extra.yaml:1) Conflict with gateways curl-egress-tst/egress-gateway (workload selector istio=egressgateway, port 80, hosts jsonplaceholder.typicode.com,api.example.com).",
                "Error [IST0145] (Gateway curl-egress-tst/egress-gateway gateway.yaml:1) Conflict with gateways curl-egress-tst/g2 (workload selector istio=egressgateway, port 80, hosts jsonplaceholder.typicode.com).",
            ],
        ),
        (
            "IST0118",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: curl-external-tst}\nspec:\n  ports:\n  - {name: web, port: 8080, targetPort: 80}\n  - {port: 9090}\n  - {name: mysql, port: 3306}\n".to_owned(),
            vec![
                "Info [IST0118] (Service curl-external-tst/s extra.yaml:6) Port name web (port: 8080, targetPort: 80) doesn't follow the naming convention of Istio port.",
                "Info [IST0118] (Service curl-external-tst/s extra.yaml:7) Port name  (port: 9090, targetPort: 0) doesn't follow the naming convention of Istio port.",
            ],
        ),
        (
            "IST0150",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: curl-external-tst}\nspec:\n  type: ExternalName\n  externalName: db.example.com\n  ports:\n  - {name: tcp, port: 5432}\n".to_owned(),
            vec!["Warning [IST0150] (Service curl-external-tst/s extra.yaml:8) Port name for ExternalName service is invalid. Proxy may prevent tcp named ports and unmatched traffic for ports serving TCP protocol from being forwarded correctly"],
        ),
        (
            "IST0177",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: tls, namespace: curl-egress-tst}\nspec:\n  hosts: [jsonplaceholder.typicode.com]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: DNS\n".to_owned(),
            vec![
                "Warning [IST0177] (ServiceEntry curl-egress-tst/tls extra.yaml:3) Multiple ServiceEntries (curl-egress-tst/tls, curl-external-tst/jsonplaceholder) define the same host \"jsonplaceholder.typicode.com\" and port 443 with conflicting protocols (HTTP, TLS).",
                "Warning [IST0177] (ServiceEntry curl-external-tst/jsonplaceholder serviceentry.yaml:4) Multiple ServiceEntries (curl-egress-tst/tls, curl-external-tst/jsonplaceholder) define the same host \"jsonplaceholder.typicode.com\" and port 443 with conflicting protocols (HTTP, TLS).",
            ],
        ),
        (
            "IST0138",
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: a, namespace: curl-egress-tst}\nspec:\n  selector: {istio: egressgateway}\n  servers: [{port: {number: 80, name: https, protocol: HTTPS}, hosts: [a.example.com], tls: {mode: SIMPLE, serverCertificate: /c.pem, privateKey: /k.pem}}]\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: b, namespace: curl-egress-tst}\nspec:\n  selector: {istio: egressgateway}\n  servers: [{port: {number: 80, name: https, protocol: HTTPS}, hosts: [b.example.com], tls: {mode: SIMPLE, serverCertificate: /c.pem, privateKey: /k.pem}}]\n".to_owned(),
            vec![
                "Warning [IST0138] (Gateway curl-egress-tst/a extra.yaml:3) Duplicate certificate in multiple gateways [curl-egress-tst/a curl-egress-tst/b] may cause 404s if clients re-use HTTP2 connections.",
                "Warning [IST0138] (Gateway curl-egress-tst/b extra.yaml:10) Duplicate certificate in multiple gateways [curl-egress-tst/b curl-egress-tst/a] may cause 404s if clients re-use HTTP2 connections.",
            ],
        ),
        (
            "IST0162",
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g2, namespace: curl-egress-tst}\nspec:\n  selector: {istio: egressgateway}\n  servers:\n  - port: {number: 8443, name: tls, protocol: TLS}\n    hosts: [b.example.com]\n    tls: {mode: PASSTHROUGH}\n".to_owned(),
            vec!["Warning [IST0162] (Gateway curl-egress-tst/g2 extra.yaml:7) The gateway is listening on a target port (port 8443) that is not defined in the Service associated with its workload instances (Pod selector istio=egressgateway). If you need to access the gateway port through the gateway Service, it will not be available."],
        ),
        (
            "IST0174",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d2, namespace: curl-egress-tst}\nspec:\n  host: unknown.example.com\n".to_owned(),
            vec!["Warning [IST0174] (DestinationRule curl-egress-tst/d2 extra.yaml:5) The host unknown.example.com defined in the DestinationRule does not match any services in the mesh."],
        ),
        (
            "IST0174 wildcards either way, names in any case",
            [
                ("se-wild", "ServiceEntry", "  hosts: ['*.wild.example']\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: NONE\n"),
                ("se-a", "ServiceEntry", "  hosts: [a.example.org]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: DNS\n"),
                ("covered", "DestinationRule", "  host: API.Wild.example\n"),
                ("covering", "DestinationRule", "  host: '*.example.org'\n"),
                ("upper", "DestinationRule", "  host: JSONPLACEHOLDER.typicode.com\n"),
                ("wild-unknown", "DestinationRule", "  host: '*.nothing.example'\n"),
                ("unknown", "DestinationRule", "  host: other.example.org\n"),
            ]
            .iter()
            .map(|(name, kind, spec)| {
                format!("apiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: curl-egress-tst}}\nspec:\n{spec}")
            })
            .collect::<Vec<_>>()
            .join("---\n"),
            vec![
                "Warning [IST0174] (DestinationRule curl-egress-tst/wild-unknown extra.yaml:39) The host *.nothing.example defined in the DestinationRule does not match any services in the mesh.",
                "Warning [IST0174] (DestinationRule curl-egress-tst/unknown extra.yaml:45) The host other.example.org defined in the DestinationRule does not match any services in the mesh.",
            ],
        ),
        (
            "IST0109 a namespace's hosts against those exported everywhere: names in any case, wildcards",
            [
                ("upper", "  hosts: [JSONPLACEHOLDER.typicode.com]\n  exportTo: ['.']\n"),
                ("wild", "  hosts: ['*.typicode.com']\n  exportTo: ['.']\n"),
                ("apart", "  hosts: [other.typicode.org]\n  exportTo: ['.']\n"),
            ]
            .iter()
            .map(|(name, spec)| vs(name, "curl-egress-tst", &format!("{spec}  http:\n  - route: [{{destination: {{host: jsonplaceholder.typicode.com, port: {{number: 443}}}}}}]\n")))
            .collect::<Vec<_>>()
            .join("---\n"),
            // As a scan in host order: `*.typicode.com` comes first and
            // reports the seed's VirtualService.
            vec![
                "Error [IST0109] (VirtualService curl-egress-tst/upper extra.yaml:3) The VirtualServices curl-egress-tst/upper,curl-external-tst/jsonplaceholder-egress associated with mesh gateway define the same host curl-egress-tst/JSONPLACEHOLDER.typicode.com which can lead to undefined behavior. This can be fixed by merging the conflicting VirtualServices into a single resource.",
                "Error [IST0109] (VirtualService curl-egress-tst/wild extra.yaml:12) The VirtualServices curl-egress-tst/wild,curl-external-tst/jsonplaceholder-egress associated with mesh gateway define the same host curl-egress-tst/*.typicode.com which can lead to undefined behavior. This can be fixed by merging the conflicting VirtualServices into a single resource.",
                "Error [IST0109] (VirtualService curl-external-tst/jsonplaceholder-egress virtualservice-workload.yaml:4) The VirtualServices curl-egress-tst/wild,curl-external-tst/jsonplaceholder-egress associated with mesh gateway define the same host curl-egress-tst/*.typicode.com which can lead to undefined behavior. This can be fixed by merging the conflicting VirtualServices into a single resource.",
            ],
        ),
        (
            "MG0001 CUSTOM",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: curl-egress-tst}\nspec:\n  action: CUSTOM\n  provider: {name: opa}\n  rules: [{}]\n".to_owned(),
            vec!["Warning [MG0001] (AuthorizationPolicy curl-egress-tst/ext extra.yaml:5) CUSTOM authorization (provider opa) is not supported by meshgate: requests this policy selects are denied so that nothing passes unchecked"],
        ),
        (
            "MG0002 gateway to resolution NONE",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: none, namespace: curl-egress-tst}\nspec:\n  hosts: [none.example.com]\n  ports: [{number: 443, name: https, protocol: HTTP}]\n---\n".to_owned()
                + &vs("v", "curl-egress-tst", "  hosts: [none.example.com]\n  gateways: [g3]\n  http:\n  - route: [{destination: {host: none.example.com, port: {number: 443}}}]\n")
                + "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g3, namespace: curl-egress-tst}\nspec:\n  selector: {istio: egressgateway}\n  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [none.example.com]}]\n",
            vec!["Error [MG0002] (VirtualService curl-egress-tst/v extra.yaml:8) gateway curl-egress-tst/curl-egress-tst-gateway routes to none.example.com but ServiceEntry curl-egress-tst/none has resolution NONE, which gives a gateway no endpoints; use resolution DNS or STATIC"],
        ),
        (
            "delegation: a delegate without hosts is valid, a missing or hosted one is MG0004",
            vs("root", "curl-egress-tst", "  hosts: [r.example.com]\n  http:\n  - match: [{uri: {prefix: /a}}]\n    delegate: {name: team, namespace: team-a}\n  - match: [{uri: {prefix: /b}}]\n    delegate: {name: gone}\n  - match: [{uri: {prefix: /c}}]\n    delegate: {name: root}\n")
                + "---\n"
                + &vs("team", "team-a", "  http:\n  - route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]\n"),
            vec![
                "Warning [MG0004] (VirtualService curl-egress-tst/root extra.yaml:10) delegate VirtualService curl-egress-tst/gone does not exist: this rule routes nothing",
                "Warning [MG0004] (VirtualService curl-egress-tst/root extra.yaml:12) delegate VirtualService curl-egress-tst/root has hosts, so it is not a delegate: this rule routes nothing",
            ],
        ),
        (
            "IST0149 routes on a JWT claim at a gateway no RequestAuthentication covers",
            vs("claims", "curl-egress-tst", "  hosts: [jsonplaceholder.typicode.com]\n  gateways: [egress-gateway]\n  http:\n  - match: [{headers: {'@request.auth.claims.group': {exact: admin}}}]\n    route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]\n"),
            vec!["Error [IST0149] (VirtualService curl-egress-tst/claims extra.yaml:1) The virtual service uses the JWT claim based routing (key: @request.auth.claims.group) but found no request authentication for the gateway (curl-egress-tst/egress-gateway) pod (curl-egress-tst-gateway). The request authentication must first be applied for the gateway pods to validate the JWT token and make the claims available for routing."],
        ),
        (
            "a RequestAuthentication in the root namespace covers the gateway: no IST0149, MG0005 for it",
            vs("claims", "curl-egress-tst", "  hosts: [jsonplaceholder.typicode.com]\n  gateways: [egress-gateway]\n  http:\n  - match: [{headers: {'@request.auth.claims.group': {exact: admin}}}]\n    route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]\n")
                + "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: istio-system}\nspec:\n  jwtRules: [{issuer: 'https://issuer.example'}]\n",
            vec!["Warning [MG0005] (RequestAuthentication istio-system/jwt extra.yaml:11) RequestAuthentication: meshgate does not implement JWT authentication: no token is validated or rejected, requestPrincipals and request.auth conditions match no request, and routes on JWT claims match none"],
        ),
        (
            "MG0005 fields meshgate does not act on yet",
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: bound, namespace: curl-egress-tst}\nspec:\n  egress:\n  - bind: 127.0.0.2\n    hosts: ['./*']\n".to_owned(),
            vec![
                "Warning [MG0005] (Sidecar curl-egress-tst/bound extra.yaml:6) spec.egress[0]: meshgate does not implement bind or captureMode NONE on an egress listener without a port: it binds nothing, and captured traffic is routed by its port",
            ],
        ),
        (
            "MG0005 DestinationRule fields meshgate does not act on",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: gaps, namespace: curl-external-tst}\nspec:\n  host: jsonplaceholder.typicode.com\n  trafficPolicy:\n    proxyProtocol: {version: V2}\n    connectionPool:\n      tcp: {maxConnections: 4, tcpKeepalive: {time: 60s}}\n      http: {maxRetries: 3, maxConcurrentStreams: 10}\n  subsets:\n  - name: slow\n    trafficPolicy:\n      portLevelSettings:\n      - port: {number: 443}\n        loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 60s}\n".to_owned(),
            vec![
                "Warning [MG0005] (DestinationRule curl-external-tst/gaps extra.yaml:7) spec.trafficPolicy.proxyProtocol: meshgate does not implement the PROXY protocol: no PROXY header is sent upstream",
                "Warning [MG0005] (DestinationRule curl-external-tst/gaps extra.yaml:9) spec.trafficPolicy.connectionPool.tcp.maxConnections: meshgate does not implement a limit on connections: with http1MaxPendingRequests it limits HTTP/1.1 requests in flight (503 UO beyond), but more connections than this may be open",
                "Warning [MG0005] (DestinationRule curl-external-tst/gaps extra.yaml:10) spec.trafficPolicy.connectionPool.http.maxConcurrentStreams: meshgate does not implement a stream limit of its own: an HTTP/2 connection takes as many streams as the upstream's SETTINGS allow",
                "Warning [MG0005] (DestinationRule curl-external-tst/gaps extra.yaml:16) spec.subsets[0].trafficPolicy.portLevelSettings[0].loadBalancer: meshgate does not implement warmup (slow start): a new endpoint gets its full share of requests at once",
            ],
        ),
        (
            "IST0173 a subset selecting no pod (Deployments count by their template)",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: gw, namespace: curl-egress-tst}\nspec:\n  host: curl-egress-tst.curl-egress-tst.svc.cluster.local\n  subsets:\n  - name: all\n  - name: v9\n    labels: {version: v9}\n".to_owned(),
            vec!["Error [IST0173] (DestinationRule curl-egress-tst/gw extra.yaml:1) The Subset v9 defined in the DestinationRule does not select any pods. Which may lead to 503 UH (NoHealthyUpstream)."],
        ),
        (
            "MG0006 a host in two ServiceEntries of one namespace",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: again, namespace: curl-external-tst}\nspec:\n  hosts: [jsonplaceholder.typicode.com]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: DNS\n".to_owned(),
            vec!["Warning [MG0006] (ServiceEntry curl-external-tst/again extra.yaml:5) host jsonplaceholder.typicode.com is already defined by ServiceEntry curl-external-tst/jsonplaceholder: meshgate uses that one for it; merge them into one ServiceEntry"],
        ),
        (
            "IST0130/IST0131 overlapping prefixes and TCP rules",
            vs("ov", "curl-external-tst", "  hosts: [jsonplaceholder.typicode.com]\n  gateways: [curl-egress-tst/egress-gateway]\n  http:\n  - match: [{uri: {prefix: /api}}]\n    route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]\n  - match: [{uri: {prefix: /api/v1}}]\n    route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]\n  tcp:\n  - match: [{port: 9000}]\n    route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]\n  - match: [{port: 9000}]\n    route: [{destination: {host: jsonplaceholder.typicode.com, port: {number: 443}}}]\n"),
            vec![
                "Info [IST0131] (VirtualService curl-external-tst/ov extra.yaml:10) VirtualService rule #1 match #0 of prefix /api/v1 is not used (duplicate/overlapping match in rule #0 of prefix /api on #0).",
                "Warning [IST0130] (VirtualService curl-external-tst/ov extra.yaml:15) VirtualService rule #1 not used (all matches used by prior rules).",
                "Info [IST0131] (VirtualService curl-external-tst/ov extra.yaml:15) VirtualService rule #1 match #0 is not used (duplicate/overlapping match in rule #0).",
            ],
        ),
    ];
    let mut failures = Vec::new();
    for (name, extra, want) in cases {
        let mut got = seed_plus(&extra);
        got.retain(|m| m != SEED_IST0128);
        if got != want {
            failures.push(format!("case {name}:\n  got:  {got:?}\n  want: {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn json_shape_matches_istioctl() {
    let d = crate::diag::Diagnostic::new(
        Level::Warning,
        "IST0128",
        crate::diag::Origin {
            kind: "DestinationRule".into(),
            name: "a/b".into(),
            file: "f.yaml".into(),
            line: 3,
        },
        "msg",
    );
    let json = serde_json::to_value(crate::diag::DiagnosticJson::from(&d)).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "code": "IST0128",
            "level": "Warning",
            "origin": "DestinationRule a/b",
            "reference": "f.yaml:3",
            "message": "msg",
            "documentationUrl": "https://istio.io/latest/docs/reference/config/analysis/ist0128/"
        })
    );
}
