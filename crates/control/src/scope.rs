//! Sidecar scoping: a sidecar proxy whose Sidecar resource lists
//! `egress.hosts` is sent only the ServiceEntries those hosts import, the
//! mesh VirtualServices for them, the services those routes lead to and
//! the DestinationRules of all of these, as Istio's SidecarScope trims what
//! istiod pushes.
//!
//! The rule that keeps it honest: what a proxy is sent builds the same
//! proxy view as the whole config (the test compares them), so a proxy
//! under `meshgate control` behaves as `meshgate explain` says for the
//! files. Gateways, and sidecars without an egress section, see everything
//! exported to their namespace.

use std::collections::HashSet;

use meshgate_config::MeshSettings;
use meshgate_config::model::networking::{Sidecar, VirtualService};
use meshgate_config::model::{Config, Kind, Resource};
use meshgate_config::registry::{
    ProxyKind, Workload, exported_to, host_matches, hosts_overlap, resolve_host,
};
use meshgate_config::view::{sidecar_for, sidecar_imports_host, vs_bound_to_mesh};

/// An object a trimmed proxy is sent: kind, namespace, name.
pub type Trimmed = (&'static str, String, String);

/// The kinds trimming leaves out when not imported; every other kind is sent.
pub const TRIMMED_KINDS: [Kind; 3] = [
    Kind::ServiceEntry,
    Kind::VirtualService,
    Kind::DestinationRule,
];

/// The Sidecar that trims what `workload` is sent: `None` when it sees
/// everything (a gateway, no Sidecar, or a Sidecar without egress hosts).
pub fn trimming_sidecar<'a>(
    config: &'a Config,
    mesh: &'a MeshSettings,
    workload: &'a Workload,
) -> Option<&'a Resource<Sidecar>> {
    if workload.proxy != ProxyKind::Sidecar {
        return None;
    }
    sidecar_for(config, workload, mesh).filter(|s| !s.spec.egress.is_empty())
}

/// The ServiceEntries, VirtualServices and DestinationRules a sidecar in
/// `namespace` under `sidecar` is sent, as (kind, namespace, name). Other
/// kinds are not trimmed.
pub fn kept(
    config: &Config,
    mesh: &MeshSettings,
    sidecar: &Resource<Sidecar>,
    namespace: &str,
) -> HashSet<Trimmed> {
    let mut keep = HashSet::new();
    let mut hosts = Hosts::default();
    let visible_entries = || {
        config
            .service_entries
            .iter()
            .filter(|se| exported_to(&se.spec.export_to, &se.meta.namespace, namespace))
    };
    for se in visible_entries() {
        let imported = se
            .spec
            .hosts
            .iter()
            .any(|h| sidecar_imports_host(Some(sidecar), &se.meta.namespace, h, namespace));
        if imported {
            keep.insert(key(se));
            hosts.extend(&se.spec.hosts);
        }
    }
    for svc in &config.services {
        let name = format!(
            "{}.{}.svc.{}",
            svc.meta.name, svc.meta.namespace, mesh.cluster_domain
        );
        if sidecar_imports_host(Some(sidecar), &svc.meta.namespace, &name, namespace) {
            hosts.insert(&name);
        }
    }
    // Routes of imported hosts, and where they lead: a destination outside
    // the imports is still a cluster the proxy builds.
    let mut destinations = Hosts::default();
    // A delegate's exportTo is about its root's namespace, not this one.
    for vs in config.virtual_services.iter().filter(|vs| {
        vs.spec.hosts.is_empty()
            || (vs_bound_to_mesh(&vs.spec)
                && exported_to(&vs.spec.export_to, &vs.meta.namespace, namespace))
    }) {
        let ns = &vs.meta.namespace;
        // A VirtualService without hosts is a delegate: kept, it is small.
        let routes_imported = vs.spec.hosts.is_empty()
            || vs
                .spec
                .hosts
                .iter()
                .any(|h| hosts.overlaps(&resolve_host(h, ns, mesh)));
        if routes_imported {
            keep.insert(key(vs));
            for d in destination_hosts(&vs.spec) {
                destinations.insert(&resolve_host(d, ns, mesh));
            }
        }
    }
    for se in visible_entries() {
        if se.spec.hosts.iter().any(|h| destinations.overlaps(h)) {
            keep.insert(key(se));
            hosts.extend(&se.spec.hosts);
        }
    }
    hosts.extend_from(&destinations);
    for dr in config.destination_rules.iter().filter(|dr| {
        exported_to(&dr.spec.export_to, &dr.meta.namespace, namespace)
            && hosts.overlaps(&resolve_host(&dr.spec.host, &dr.meta.namespace, mesh))
    }) {
        keep.insert(key(dr));
    }
    keep
}

fn key<T>(r: &Resource<T>) -> Trimmed {
    (
        r.meta.kind.as_str(),
        r.meta.namespace.clone(),
        r.meta.name.clone(),
    )
}

/// Every host a VirtualService's rules send to (routes and mirrors).
fn destination_hosts(vs: &VirtualService) -> impl Iterator<Item = &str> {
    let http = vs.http.iter().flat_map(|r| {
        r.route
            .iter()
            .map(|d| &d.destination)
            .chain(r.mirror.iter())
            .chain(r.mirrors.iter().map(|m| &m.destination))
    });
    let l4 = vs
        .tls
        .iter()
        .flat_map(|r| r.route.iter())
        .chain(vs.tcp.iter().flat_map(|r| r.route.iter()))
        .map(|d| &d.destination);
    http.chain(l4).map(|d| d.host.as_str())
}

/// A set of hostnames, some wildcards, asked "does any overlap this one?"
/// in constant time for exact names (10,000 ServiceEntries stay cheap).
#[derive(Default)]
struct Hosts {
    exact: HashSet<String>,
    wildcards: Vec<String>,
}

impl Hosts {
    fn insert(&mut self, host: &str) {
        if host.starts_with('*') {
            self.wildcards.push(host.to_owned());
        } else {
            self.exact.insert(host.to_ascii_lowercase());
        }
    }

    fn extend(&mut self, hosts: &[String]) {
        for h in hosts {
            self.insert(h);
        }
    }

    fn extend_from(&mut self, other: &Hosts) {
        self.exact.extend(other.exact.iter().cloned());
        self.wildcards.extend(other.wildcards.iter().cloned());
    }

    fn overlaps(&self, host: &str) -> bool {
        if host.starts_with('*') {
            return self.exact.iter().any(|e| host_matches(host, e))
                || self.wildcards.iter().any(|w| hosts_overlap(w, host));
        }
        self.exact.contains(&host.to_ascii_lowercase())
            || self.wildcards.iter().any(|w| host_matches(w, host))
    }
}

#[cfg(test)]
mod tests;
