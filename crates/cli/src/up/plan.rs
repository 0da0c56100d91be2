//! What `up` runs for a config, decided before anything starts: the
//! gateways and sidecars with their identities, the workloads' own
//! commands, the external hosts to stand in for, and the Services that
//! select gateways.

use meshgate_config::model::networking::Location;
use meshgate_config::registry::{self, ProxyKind, ServiceSource};
use meshgate_config::{Config, MeshSettings};

use super::HTTP_PORT;

/// The plan: which parts run, with what identity and where.
pub(super) struct Plan {
    /// (ns/name, name, SPIFFE ID) of each gateway workload.
    pub(super) gateways: Vec<(String, String, String)>,
    /// The same for each workload with a sidecar.
    pub(super) sidecars: Vec<(String, String, String)>,
    /// Workloads with a command to run: (ns/name, command line).
    pub(super) commands: Vec<(String, Vec<String>)>,
    pub(super) external_hosts: Vec<String>,
    /// Kubernetes Service FQDN → workloads (ns/name) it selects, and its
    /// first port.
    pub(super) services: Vec<(String, Vec<String>, u16)>,
}

pub(super) fn plan(config: &Config, mesh: &MeshSettings) -> Plan {
    let reg = registry::build(config, mesh);
    let mut p = Plan {
        gateways: Vec::new(),
        sidecars: Vec::new(),
        commands: Vec::new(),
        external_hosts: Vec::new(),
        services: Vec::new(),
    };
    for w in &reg.workloads {
        let key = format!("{}/{}", w.namespace, w.name);
        match w.proxy {
            ProxyKind::Gateway => {
                p.gateways
                    .push((key.clone(), w.name.clone(), w.spiffe_id.clone()))
            }
            ProxyKind::Sidecar => {
                p.sidecars
                    .push((key.clone(), w.name.clone(), w.spiffe_id.clone()))
            }
            ProxyKind::None => {}
        }
        if w.proxy != ProxyKind::Gateway {
            let template = config
                .workloads
                .iter()
                .find(|r| r.meta.namespace == w.namespace && r.meta.name == w.name);
            if let Some(c) = template.and_then(|t| t.spec.pod.containers.first()) {
                let argv: Vec<String> = c.command.iter().chain(&c.args).cloned().collect();
                if !argv.is_empty() {
                    p.commands.push((key, argv));
                }
            }
        }
    }
    for s in &reg.services {
        match &s.source {
            // Wildcard hosts too: the stand-in's DNS answers every name
            // under them, its TLS any name asked.
            ServiceSource::ServiceEntry { .. } if s.location == Location::MeshExternal => {
                if !p.external_hosts.contains(&s.hostname) {
                    p.external_hosts.push(s.hostname.clone());
                }
            }
            ServiceSource::Kubernetes { .. } => {
                let selected: Vec<String> = reg
                    .workloads
                    .iter()
                    .filter(|w| {
                        w.namespace == s.namespace
                            && s.selector.as_ref().is_some_and(|sel| {
                                !sel.is_empty()
                                    && meshgate_config::model::labels_match(sel, &w.labels)
                            })
                    })
                    .map(|w| format!("{}/{}", w.namespace, w.name))
                    .collect();
                let port = s
                    .ports
                    .first()
                    .map_or(HTTP_PORT, |p| u16::try_from(p.number).unwrap_or(HTTP_PORT));
                p.services.push((s.hostname.clone(), selected, port));
            }
            ServiceSource::ServiceEntry { .. } => {}
        }
    }
    p
}
