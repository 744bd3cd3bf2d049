//! Label and annotation keys. One place so the operator, webhook and sidecar can never disagree.

/// API group of every shardmesh resource.
pub const GROUP: &str = "shardmesh.io";

/// Pod/object label: name of the owning ShardedService.
pub const SERVICE: &str = "shardmesh.io/service";
/// Pod/object label: shard index (decimal) of a per-shard object.
pub const SHARD: &str = "shardmesh.io/shard";
/// Label on every object the operator manages.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY`].
pub const MANAGED_BY_VALUE: &str = "shardmesh-operator";
/// Label `app.kubernetes.io/component` value per object kind.
pub const COMPONENT: &str = "app.kubernetes.io/component";
/// Pod label opting a pod into sidecar injection (`enabled`).
pub const INJECT: &str = "shardmesh.io/inject";
/// Pod annotation recording the injected sidecar version.
pub const INJECTED_VERSION: &str = "shardmesh.io/injected-version";

/// Field manager used for every server-side apply by the operator.
pub const FIELD_MANAGER: &str = "shardmesh-operator";

/// Namespace the chart's README installs the operator into (the plugin's and tests' default).
pub const OPERATOR_NAMESPACE: &str = "shardmesh-system";

/// Default name of the controller's leader Lease (`--leader-lease-name`).
pub const OPERATOR_LEADER_LEASE: &str = "shardmesh-operator-leader";

/// Name of the StatefulSet / headless Service of shard `index` of service `name`.
pub fn shard_object_name(name: &str, index: u32) -> String {
    format!("{name}-{index}")
}

/// Labels selecting all pods of a service (routing Service selector).
pub fn service_selector(name: &str) -> std::collections::BTreeMap<String, String> {
    [(SERVICE.to_string(), name.to_string())].into()
}

/// Labels selecting the pods of one shard.
pub fn shard_selector(name: &str, index: u32) -> std::collections::BTreeMap<String, String> {
    [
        (SERVICE.to_string(), name.to_string()),
        (SHARD.to_string(), index.to_string()),
    ]
    .into()
}

/// The label selector string for all pods of a service (`status.selector`, scale subresource).
pub fn service_selector_string(name: &str) -> String {
    format!("{SERVICE}={name}")
}

/// Lease annotation: `ip:port` of the member's sidecar inbound listener (what callers dial).
pub const LEASE_ADDRESS: &str = "shardmesh.io/address";
/// Lease annotation: the inbound port alone, for tools that only want the port.
pub const LEASE_PORT: &str = "shardmesh.io/port";
/// Data key of the shard-map index ConfigMap holding the highest epoch published.
pub const SHARDMAP_INDEX_EPOCH_KEY: &str = "epoch";

/// Name of the index ConfigMap of the shard map of service `name` (the map itself is published
/// as one `ShardMapSlice` per shard, named like the shard's StatefulSet).
pub fn shardmap_name(name: &str) -> String {
    format!("{name}-shardmap")
}

/// Name of the ServiceAccount (and of its Role/RoleBinding) the pods of shard `shard` of
/// service `name` run as: it may write exactly their own Leases and their shard's leader Lease,
/// and read the shard map. Pod names end in a numeric ordinal, so this never names a pod.
pub fn member_account_name(name: &str, shard: u32) -> String {
    format!("{name}-{shard}-member")
}

/// Name of the Role granting read access to the shard map of service `name`; bind it to the
/// ServiceAccount of any client pod whose sidecar routes to the service. Slices are read by
/// label, which RBAC cannot restrict by name: a bound account may read the shard maps (pod
/// names and addresses) of every ShardedService in the namespace, as with EndpointSlices.
pub fn shardmap_reader_name(name: &str) -> String {
    format!("{name}-shardmap-reader")
}

/// Lease label telling the operator's membership view which Leases are not member Leases.
pub const LEASE_ROLE: &str = "shardmesh.io/lease-role";
/// Value of [`LEASE_ROLE`] on the per-shard leader Leases (member Leases carry no such label).
pub const LEASE_ROLE_LEADER: &str = "leader";

/// Name of the leader Lease of shard `index` of service `name`. Pod names of the shard are
/// `<name>-<index>-<ordinal>` with a numeric ordinal, so this never names a member Lease.
pub fn leader_lease_name(name: &str, index: u32) -> String {
    format!("{name}-{index}-leader")
}

/// Leader-Lease holder identity: the pod name, `_`, and a per-process suffix, so a restarted
/// sidecar is a new candidate rather than a continuation of the crashed leader. Pod names
/// cannot contain `_`.
pub fn leader_holder(pod: &str, incarnation: &str) -> String {
    format!("{pod}_{incarnation}")
}

/// The pod of a leader-Lease holder identity.
pub fn leader_holder_pod(holder: &str) -> &str {
    holder.split_once('_').map_or(holder, |(pod, _)| pod)
}
