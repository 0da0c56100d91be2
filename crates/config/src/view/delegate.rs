//! VirtualService delegation, as Istio merges it: an `http` rule with
//! `delegate` is replaced by the delegate VirtualService's rules (one that
//! has no `hosts`), each rule's matches merged with the root rule's. A
//! delegate rule whose matches are not within the root's (a prefix outside
//! the root's prefix, another method, ...) is dropped, as Istio drops it.
//! A delegate that is missing, not exported to the root's namespace or
//! itself a root is skipped with the root rule. Fields the delegate rule
//! leaves unset (timeout, retries, rewrite, headers, fault, ...) come from
//! the root rule.

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::model::Resource;
use crate::model::networking::{HttpMatchRequest, HttpRoute, StringMatch, VirtualService};
use crate::registry::exported_to;

/// `vses` with every root VirtualService's delegated rules merged in.
/// Borrowed unchanged when no rule delegates (the common case).
pub fn merged(vses: &[Resource<VirtualService>]) -> Cow<'_, [Resource<VirtualService>]> {
    if !vses.iter().any(is_root) {
        return Cow::Borrowed(vses);
    }
    let out = vses
        .iter()
        .map(|vs| {
            if !is_root(vs) {
                return vs.clone();
            }
            let mut root = vs.clone();
            root.spec.http = vs
                .spec
                .http
                .iter()
                .flat_map(|rule| expand(vses, vs, rule))
                .collect();
            root
        })
        .collect();
    Cow::Owned(out)
}

/// A delegate VirtualService: no hosts; only reachable through a root.
pub fn is_delegate(vs: &VirtualService) -> bool {
    vs.hosts.is_empty()
}

fn is_root(vs: &Resource<VirtualService>) -> bool {
    !is_delegate(&vs.spec) && vs.spec.http.iter().any(|r| r.delegate.is_some())
}

/// The rules one root rule stands for: itself, or its delegate's merged rules.
fn expand(
    vses: &[Resource<VirtualService>],
    root: &Resource<VirtualService>,
    rule: &HttpRoute,
) -> Vec<HttpRoute> {
    let Some(d) = &rule.delegate else {
        return vec![rule.clone()];
    };
    let ns = if d.namespace.is_empty() {
        &root.meta.namespace
    } else {
        &d.namespace
    };
    let Some(delegate) = vses
        .iter()
        .find(|v| v.meta.name == d.name && &v.meta.namespace == ns && is_delegate(&v.spec))
    else {
        return Vec::new();
    };
    if !exported_to(&delegate.spec.export_to, ns, &root.meta.namespace) {
        return Vec::new();
    }
    delegate
        .spec
        .http
        .iter()
        .enumerate()
        .filter(|(_, child)| child.delegate.is_none())
        .filter_map(|(i, child)| {
            let mut merged = merge_rule(rule, child)?;
            // An unnamed rule is named by where it was written, so logs
            // and `explain` point at the delegate's file, not the merge.
            if merged.name.is_empty() {
                merged.name = format!("{ns}/{}#{i}", d.name);
            }
            Some(merged)
        })
        .collect()
}

/// One delegate rule under its root rule; `None` when their matches conflict.
fn merge_rule(root: &HttpRoute, child: &HttpRoute) -> Option<HttpRoute> {
    let mut out = child.clone();
    out.matches = merge_matches(&root.matches, &child.matches)?;
    out.name = joined_name(&root.name, &child.name);
    macro_rules! inherit {
        ($($field:ident),*) => {$(
            if out.$field.is_none() {
                out.$field = root.$field.clone();
            }
        )*};
    }
    inherit!(
        rewrite,
        direct_response,
        timeout,
        retries,
        fault,
        mirror,
        mirror_percent,
        mirror_percentage,
        cors_policy,
        headers
    );
    if out.mirrors.is_empty() {
        out.mirrors = root.mirrors.clone();
    }
    Some(out)
}

/// Every delegate match must fall within at least one root match; the
/// result is each compatible (root, delegate) pair merged.
fn merge_matches(
    root: &[HttpMatchRequest],
    child: &[HttpMatchRequest],
) -> Option<Vec<HttpMatchRequest>> {
    if root.is_empty() {
        return Some(child.to_vec());
    }
    if child.is_empty() {
        return Some(root.to_vec());
    }
    let mut out = Vec::new();
    for c in child {
        let before = out.len();
        out.extend(
            root.iter()
                .filter(|r| !conflicts(r, c))
                .map(|r| merge_match(r, c)),
        );
        if out.len() == before {
            return None;
        }
    }
    Some(out)
}

fn merge_match(root: &HttpMatchRequest, child: &HttpMatchRequest) -> HttpMatchRequest {
    let mut out = child.clone();
    out.name = joined_name(&root.name, &child.name);
    for (mine, theirs) in [
        (&mut out.uri, &root.uri),
        (&mut out.scheme, &root.scheme),
        (&mut out.method, &root.method),
        (&mut out.authority, &root.authority),
    ] {
        if mine.is_none() {
            mine.clone_from(theirs);
        }
    }
    union(&mut out.headers, &root.headers);
    union(&mut out.without_headers, &root.without_headers);
    union(&mut out.query_params, &root.query_params);
    union(&mut out.source_labels, &root.source_labels);
    if out.port.is_none() {
        out.port = root.port;
    }
    if out.source_namespace.is_empty() {
        out.source_namespace.clone_from(&root.source_namespace);
    }
    if out.gateways.is_empty() {
        out.gateways.clone_from(&root.gateways);
    }
    if out.stat_prefix.is_empty() {
        out.stat_prefix.clone_from(&root.stat_prefix);
    }
    out
}

/// Adds the root's entries the delegate does not set (the delegate's win).
fn union<V: Clone>(mine: &mut BTreeMap<String, V>, root: &BTreeMap<String, V>) {
    for (k, v) in root {
        mine.entry(k.clone()).or_insert_with(|| v.clone());
    }
}

fn joined_name(root: &str, child: &str) -> String {
    match (root.is_empty(), child.is_empty()) {
        (_, true) => root.to_owned(),
        (true, false) => child.to_owned(),
        (false, false) => format!("{root}-{child}"),
    }
}

/// Is the delegate match `leaf` outside the root match `root`?
fn conflicts(root: &HttpMatchRequest, leaf: &HttpMatchRequest) -> bool {
    let pairs = [
        (&root.uri, &leaf.uri),
        (&root.scheme, &leaf.scheme),
        (&root.method, &leaf.method),
        (&root.authority, &leaf.authority),
    ];
    if pairs
        .iter()
        .any(|(r, l)| string_conflict(r.as_ref(), l.as_ref()))
    {
        return true;
    }
    let maps_conflict = |r: &BTreeMap<String, StringMatch>, l: &BTreeMap<String, StringMatch>| {
        l.iter().any(|(k, lv)| string_conflict(r.get(k), Some(lv)))
    };
    maps_conflict(&root.headers, &leaf.headers)
        || maps_conflict(&root.without_headers, &leaf.without_headers)
        || maps_conflict(&root.query_params, &leaf.query_params)
        || root.ignore_uri_case != leaf.ignore_uri_case
        || matches!((root.port, leaf.port), (Some(r), Some(l)) if r != l)
        || (!root.source_namespace.is_empty() && leaf.source_namespace != root.source_namespace)
        || leaf
            .source_labels
            .iter()
            .any(|(k, v)| root.source_labels.get(k).is_some_and(|rv| rv != v))
        || (!root.gateways.is_empty()
            && !leaf.gateways.is_empty()
            && !leaf.gateways.iter().all(|g| root.gateways.contains(g)))
}

/// A delegate string match must be a subset of the root's: an exact value
/// equal to the root's exact, or a prefix/exact under the root's prefix.
/// Regular expressions cannot be compared, so regex on either side with
/// anything on the other conflicts.
fn string_conflict(root: Option<&StringMatch>, leaf: Option<&StringMatch>) -> bool {
    let (Some(root), Some(leaf)) = (root, leaf) else {
        return false;
    };
    if root.regex.is_some() || leaf.regex.is_some() {
        return true;
    }
    if let Some(exact) = &root.exact {
        return leaf.exact.as_ref() != Some(exact);
    }
    if let Some(prefix) = &root.prefix {
        let value = leaf.prefix.as_ref().or(leaf.exact.as_ref());
        return !value.is_some_and(|v| v.starts_with(prefix.as_str()));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri_prefix(p: &str) -> HttpMatchRequest {
        HttpMatchRequest {
            uri: Some(StringMatch {
                prefix: Some(p.to_owned()),
                ..StringMatch::default()
            }),
            ..HttpMatchRequest::default()
        }
    }

    #[test]
    fn a_delegate_prefix_must_lie_within_the_roots() {
        let root = [uri_prefix("/api")];
        let inside = merge_matches(&root, &[uri_prefix("/api/v1")]).unwrap();
        assert_eq!(
            inside[0].uri.as_ref().unwrap().prefix.as_deref(),
            Some("/api/v1")
        );
        assert!(merge_matches(&root, &[uri_prefix("/other")]).is_none());
    }

    #[test]
    fn root_conditions_the_delegate_leaves_open_are_kept() {
        let mut root = uri_prefix("/api");
        root.headers.insert(
            "x-team".to_owned(),
            StringMatch {
                exact: Some("a".to_owned()),
                ..StringMatch::default()
            },
        );
        let child = HttpMatchRequest {
            method: Some(StringMatch {
                exact: Some("GET".to_owned()),
                ..StringMatch::default()
            }),
            ..HttpMatchRequest::default()
        };
        let m = merge_matches(&[root], &[child]).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].uri.as_ref().unwrap().prefix.as_deref(), Some("/api"));
        assert_eq!(m[0].method.as_ref().unwrap().exact.as_deref(), Some("GET"));
        assert!(m[0].headers.contains_key("x-team"));
    }

    #[test]
    fn regex_on_either_side_conflicts_and_exact_must_be_equal() {
        let re = StringMatch {
            regex: Some("/a.*".to_owned()),
            ..StringMatch::default()
        };
        let exact = |v: &str| StringMatch {
            exact: Some(v.to_owned()),
            ..StringMatch::default()
        };
        assert!(string_conflict(Some(&re), Some(&exact("/a"))));
        assert!(string_conflict(Some(&exact("/a")), Some(&re)));
        assert!(!string_conflict(Some(&exact("/a")), Some(&exact("/a"))));
        assert!(string_conflict(Some(&exact("/a")), Some(&exact("/b"))));
        assert!(!string_conflict(None, Some(&re)));
    }
}
