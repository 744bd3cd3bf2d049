//! Annotation keys of the injection contract between the operator (which writes some of them on
//! shard pod templates), users (who write the others on their pods) and the injector.

/// Pod annotation: the application's port on 127.0.0.1, where the sidecar's inbound proxy
/// forwards. Written by the operator on shard pods; optional on opt-in pods (default: the first
/// declared container port; none: the inbound proxy stays off).
pub const APP_PORT: &str = "shardmesh.io/app-port";

/// Pod annotation: the resilience policy (JSON, the shape of a ShardedService's
/// `spec.resilience`), passed to the sidecar verbatim. Written by the operator on shard pods so
/// the webhook needs no API call per pod.
pub const RESILIENCE: &str = "shardmesh.io/resilience";

/// Pod annotation: the shard leader Lease duration (e.g. `15s`) when the ShardedService elects
/// leaders. Written by the operator on shard pods; the sidecar then contends for its shard's
/// leader Lease.
pub const LEADER_LEASE: &str = "shardmesh.io/leader-lease-duration";

/// Pod label or annotation `shardmesh.io/inject: disabled` opts a pod out of injection. The
/// same key as the opt-in label, so one key says yes or no.
pub const INJECT: &str = shardmesh_api::labels::INJECT;

/// Value of [`INJECT`] that opts in.
pub const INJECT_ENABLED: &str = "enabled";

/// Value of [`INJECT`] that opts out.
pub const INJECT_DISABLED: &str = "disabled";

/// Pod annotation `shardmesh.io/outbound-proxy: "true"`: set `HTTP_PROXY`/`NO_PROXY` on the
/// application containers so their HTTP clients go through the sidecar. Off by default: an
/// explicit proxy changes how every client library in the app behaves.
pub const OUTBOUND_PROXY: &str = "shardmesh.io/outbound-proxy";

/// Pod annotation `shardmesh.io/trace-start: "false"`: the sidecar only propagates W3C trace
/// context the application sends and starts none (default `"true"`: requests without a
/// `traceparent` start a trace, so every access-log line carries a trace id).
pub const TRACE_START: &str = "shardmesh.io/trace-start";

/// Pod annotation: sidecar resources overriding the configured ones (JSON
/// `ResourceRequirements`, e.g. `{"limits":{"memory":"128Mi"}}`).
pub const SIDECAR_RESOURCES: &str = "shardmesh.io/sidecar-resources";

/// Pod annotation recording the injected sidecar version.
pub const INJECTED_VERSION: &str = shardmesh_api::labels::INJECTED_VERSION;

/// Pod annotation written by the injector when an application container kept its own `preStop`
/// hook (value [`PRESTOP_KEPT`] followed by the container names, comma-separated): that
/// container is not held until the sidecar's inbound drain, so it may stop while requests still
/// arrive; call `/var/run/shardmesh/shardmesh-hook wait-drained` from that hook to get the order.
pub const PRESTOP: &str = "shardmesh.io/prestop";

/// Prefix of the [`PRESTOP`] value.
pub const PRESTOP_KEPT: &str = "kept-user-hook:";
