//! The Kubernetes kinds meshgate reads: Namespace, ServiceAccount, Service,
//! Pod and Deployment. We model what the mesh needs and accept every other
//! documented field as opaque, so real manifests load while a misspelt field
//! is still an error (as `kubectl apply --validate=strict` would say).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{IntOrString, Labels, Opaque};

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    pub annotations: Labels,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generate_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<Opaque>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<Opaque>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletion_grace_period_seconds: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_references: Option<Opaque>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finalizers: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub managed_fields: Option<Opaque>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub self_link: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct NamespaceSpec {
    pub finalizers: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ServiceAccountFields {
    pub secrets: Option<Opaque>,
    pub image_pull_secrets: Option<Opaque>,
    pub automount_service_account_token: Option<bool>,
}

// === Service ===

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ServiceSpec {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub ports: Vec<KubeServicePort>,
    pub selector: Option<Labels>,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    pub external_name: Option<String>,
    #[serde(rename = "externalIPs")]
    pub external_ips: Vec<String>,
    pub external_traffic_policy: Option<String>,
    pub internal_traffic_policy: Option<String>,
    pub health_check_node_port: Option<u32>,
    pub ip_families: Vec<String>,
    pub ip_family_policy: Option<String>,
    pub load_balancer_class: Option<String>,
    #[serde(rename = "loadBalancerIP")]
    pub load_balancer_ip: Option<String>,
    pub load_balancer_source_ranges: Vec<String>,
    pub allocate_load_balancer_node_ports: Option<bool>,
    pub publish_not_ready_addresses: Option<bool>,
    pub session_affinity: Option<String>,
    pub session_affinity_config: Option<Opaque>,
    pub traffic_distribution: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct KubeServicePort {
    pub name: String,
    pub port: u32,
    pub target_port: Option<IntOrString>,
    /// TCP (default), UDP or SCTP.
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
    pub node_port: Option<u32>,
}

// === EndpointSlice (discovery.k8s.io/v1) ===

/// An EndpointSlice's own fields (it has no `spec`): which addresses serve
/// its Service (label `kubernetes.io/service-name`) on which ports.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct EndpointSliceFields {
    pub address_type: String,
    pub endpoints: Vec<SliceEndpoint>,
    pub ports: Vec<SlicePort>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SliceEndpoint {
    pub addresses: Vec<String>,
    pub conditions: Option<SliceConditions>,
    pub hostname: Option<String>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub target_ref: Option<Opaque>,
    pub hints: Option<Opaque>,
    pub deprecated_topology: Option<Opaque>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SliceConditions {
    /// Absent means ready (Kubernetes' rule).
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: Option<u32>,
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
}

// === Pods and Deployments ===

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DeploymentSpec {
    pub replicas: Option<u32>,
    pub selector: Option<KubeLabelSelector>,
    pub template: PodTemplateSpec,
    pub strategy: Option<Opaque>,
    pub min_ready_seconds: Option<u32>,
    pub revision_history_limit: Option<u32>,
    pub progress_deadline_seconds: Option<u32>,
    pub paused: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct KubeLabelSelector {
    pub match_labels: Labels,
    pub match_expressions: Option<Opaque>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PodTemplateSpec {
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PodSpec {
    pub containers: Vec<Container>,
    pub init_containers: Vec<Container>,
    pub service_account_name: Option<String>,
    /// Deprecated alias of serviceAccountName.
    pub service_account: Option<String>,
    pub security_context: Option<PodSecurityContext>,
    pub host_network: Option<bool>,
    pub active_deadline_seconds: Option<Opaque>,
    pub affinity: Option<Opaque>,
    pub automount_service_account_token: Option<bool>,
    pub dns_config: Option<Opaque>,
    pub dns_policy: Option<String>,
    pub enable_service_links: Option<bool>,
    pub ephemeral_containers: Option<Opaque>,
    pub host_aliases: Option<Opaque>,
    #[serde(rename = "hostIPC")]
    pub host_ipc: Option<bool>,
    #[serde(rename = "hostPID")]
    pub host_pid: Option<bool>,
    pub host_users: Option<bool>,
    pub hostname: Option<String>,
    pub image_pull_secrets: Option<Opaque>,
    pub node_name: Option<String>,
    pub node_selector: Option<Labels>,
    pub os: Option<Opaque>,
    pub overhead: Option<Opaque>,
    pub preemption_policy: Option<String>,
    pub priority: Option<i64>,
    pub priority_class_name: Option<String>,
    pub readiness_gates: Option<Opaque>,
    pub resource_claims: Option<Opaque>,
    pub resources: Option<Opaque>,
    pub restart_policy: Option<String>,
    pub runtime_class_name: Option<String>,
    pub scheduler_name: Option<String>,
    pub scheduling_gates: Option<Opaque>,
    pub set_hostname_as_fqdn: Option<bool>,
    pub share_process_namespace: Option<bool>,
    pub subdomain: Option<String>,
    pub termination_grace_period_seconds: Option<i64>,
    pub tolerations: Option<Opaque>,
    pub topology_spread_constraints: Option<Opaque>,
    pub volumes: Option<Opaque>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PodSecurityContext {
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub run_as_non_root: Option<bool>,
    pub fs_group: Option<i64>,
    pub fs_group_change_policy: Option<String>,
    pub supplemental_groups: Option<Vec<i64>>,
    pub supplemental_groups_policy: Option<String>,
    pub seccomp_profile: Option<Opaque>,
    pub se_linux_options: Option<Opaque>,
    pub se_linux_change_policy: Option<String>,
    pub app_armor_profile: Option<Opaque>,
    pub sysctls: Option<Opaque>,
    pub windows_options: Option<Opaque>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Container {
    pub name: String,
    pub image: Option<String>,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub ports: Vec<ContainerPort>,
    pub env: Vec<EnvVar>,
    pub security_context: Option<SecurityContext>,
    pub env_from: Option<Opaque>,
    pub image_pull_policy: Option<String>,
    pub lifecycle: Option<Opaque>,
    pub liveness_probe: Option<Opaque>,
    pub readiness_probe: Option<Opaque>,
    pub startup_probe: Option<Opaque>,
    pub resize_policy: Option<Opaque>,
    pub resources: Option<Opaque>,
    pub restart_policy: Option<String>,
    pub stdin: Option<bool>,
    pub stdin_once: Option<bool>,
    pub termination_message_path: Option<String>,
    pub termination_message_policy: Option<String>,
    pub tty: Option<bool>,
    pub volume_devices: Option<Opaque>,
    pub volume_mounts: Option<Opaque>,
    pub working_dir: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ContainerPort {
    pub container_port: u32,
    pub name: Option<String>,
    pub protocol: Option<String>,
    #[serde(rename = "hostIP")]
    pub host_ip: Option<String>,
    pub host_port: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct EnvVar {
    pub name: String,
    pub value: Option<String>,
    pub value_from: Option<Opaque>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SecurityContext {
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub run_as_non_root: Option<bool>,
    pub allow_privilege_escalation: Option<bool>,
    pub capabilities: Option<Opaque>,
    pub privileged: Option<bool>,
    pub read_only_root_filesystem: Option<bool>,
    pub proc_mount: Option<String>,
    pub seccomp_profile: Option<Opaque>,
    pub se_linux_options: Option<Opaque>,
    pub app_armor_profile: Option<Opaque>,
    pub windows_options: Option<Opaque>,
}
