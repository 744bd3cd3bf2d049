//! `shardmesh.io/v1alpha1` `ShardedService`.
//!
//! Every field carries a doc comment: they become the CRD's `description`s, which is what
//! `kubectl explain shardedservice.spec...` prints.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{duration::DurationString, template::Template};

/// A service whose key space is split into `shards`, each served by `replicasPerShard` pods of
/// `template`, with the shardmesh sidecar routing requests to the shard owning their key.
// clippy mistakes the repeated `printcolumn(type_ = ...)` keys for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "shardmesh.io",
    version = "v1alpha1",
    kind = "ShardedService",
    namespaced,
    status = "ShardedServiceStatus",
    derive = "PartialEq",
    shortname = "shsvc",
    category = "shardmesh",
    doc = "A sharded, replicated service: `shards` key ranges, each served by `replicasPerShard` pods of `template`, with the shardmesh sidecar doing routing, retries, timeouts and circuit breaking.",
    scale(
        spec_replicas_path = ".spec.replicasPerShard",
        status_replicas_path = ".status.replicasPerShard",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Shards",
        type_ = "integer",
        json_path = ".spec.shards",
        description = "Number of shards"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.replicasPerShard",
        description = "Desired replicas per shard"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.ready",
        description = "Ready pods / desired pods"
    ),
    printcolumn(
        name = "Epoch",
        type_ = "integer",
        json_path = ".status.epoch",
        description = "Shard-map generation"
    ),
    printcolumn(
        name = "Updated",
        type_ = "string",
        json_path = ".status.rollout.updated",
        description = "Shards running the current pod template / shards"
    ),
    printcolumn(
        name = "Rollout",
        type_ = "string",
        json_path = ".status.rollout.phase",
        description = "Phase of the pod-template rollout"
    ),
    printcolumn(
        name = "Resharding",
        type_ = "string",
        json_path = ".status.resharding.phase",
        description = "Phase of a change of the shard count in progress"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ShardedServiceSpec {
    /// Number of shards the key space is split into (1-1024). Raising it adds shards. Lowering it
    /// is refused (the removed shards' data would be orphaned) unless
    /// `rollout.allowShardRemoval` is true.
    #[schemars(range(min = 1, max = 1024))]
    pub shards: i32,

    /// Pods serving each shard (1-100). Any replica of a shard may serve the shard's keys.
    /// Changing it scales every shard in place. Also set by `kubectl scale`.
    #[schemars(range(min = 1, max = 100))]
    pub replicas_per_shard: i32,

    /// Port the application listens on inside the pod (1-65535). The sidecar forwards to
    /// 127.0.0.1:`port`; the ports 4140, 4143 and 4191 are reserved for the sidecar.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Where the shard key of a request comes from.
    #[serde(default)]
    pub shard_key: ShardKey,

    /// Pod template of the application, as in a Deployment. Must have at least one container.
    /// shardmesh adds the labels `shardmesh.io/service` and `shardmesh.io/shard`.
    pub template: Template,

    /// Timeouts, retries, circuit breaking and concurrency limits the sidecar applies.
    /// Every field has a safe default; nothing is unlimited.
    #[serde(default)]
    pub resilience: Resilience,

    /// How changes are rolled out to the shards.
    #[serde(default)]
    pub rollout: Rollout,

    /// Per-shard leader election (opt-in): one pod of each shard holds a leader Lease, writes go
    /// to it with a fencing epoch, and every pod is told its role.
    #[serde(default)]
    pub leader_election: LeaderElection,

    /// How a change of `shards` hands keys over to their new owners while traffic continues.
    #[serde(default)]
    pub resharding: Resharding,

    /// Which failure domains the pods of each shard are spread over, so that losing one node
    /// (or zone) takes at most one replica of a shard when there are enough of them.
    #[serde(default)]
    pub placement: Placement,
}

/// Where the pods of each shard are placed. Replicas only survive the loss of a machine when
/// they are not on the same machine: each shard's StatefulSet gets topology spread constraints
/// selecting exactly that shard's pods. A topology spread constraint that the template's
/// `spec.topologySpreadConstraints` already sets for the same `topologyKey` takes precedence
/// (the status notes it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// How a shard's pods are spread over nodes (`kubernetes.io/hostname`): `Hard` (default;
    /// `whenUnsatisfiable: DoNotSchedule`, a pod stays Pending rather than join a node holding
    /// more of its shard's pods than another), `Soft` (`ScheduleAnyway`, the scheduler prefers
    /// spreading but places the pod anyway) or `None` (no spreading).
    #[serde(default)]
    pub spread: Spread,
    /// Also spread each shard's pods over zones (`topology.kubernetes.io/zone`) the same way
    /// (default false). Opt-in because the operator does not read nodes: with `Hard`, pods on
    /// nodes without the zone label stay Pending, and with `Soft` such nodes would switch off
    /// the scheduler's preference for spreading over nodes too.
    #[serde(default)]
    pub zones: bool,
    /// Further topology spread constraints for each shard's pods (at most 8), e.g. over a rack
    /// label. One for `kubernetes.io/hostname` (or the zone label) replaces the built-in one,
    /// e.g. to allow a larger skew.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub constraints: Vec<SpreadConstraint>,
}

/// How strictly pods are spread: `Hard` (`whenUnsatisfiable: DoNotSchedule`), `Soft`
/// (`ScheduleAnyway`) or `None` (only in `placement.spread`). Unset on an entry of
/// `placement.constraints`: as `placement.spread`, or `Hard` when that is `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Spread {
    /// `whenUnsatisfiable: DoNotSchedule`: a pod waits rather than be placed unevenly.
    #[default]
    Hard,
    /// `whenUnsatisfiable: ScheduleAnyway`: spreading is a preference.
    Soft,
    /// No spreading constraint is added. Spelled `None`, not `Off`: YAML 1.1, which kubectl
    /// and helm parse manifests with, reads an unquoted `Off` as the boolean false.
    #[serde(rename = "None")]
    Disabled,
}

impl Spread {
    /// The topology spread constraint's `whenUnsatisfiable`, `None` for `Off`.
    pub fn when_unsatisfiable(self) -> Option<&'static str> {
        match self {
            Spread::Hard => Some("DoNotSchedule"),
            Spread::Soft => Some("ScheduleAnyway"),
            Spread::Disabled => None,
        }
    }
}

/// One extra topology spread constraint over the pods of each shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpreadConstraint {
    /// Node label whose values are the domains to spread over, e.g.
    /// `topology.example.com/rack` (a label key: optional DNS prefix and `/`, then at most 63
    /// characters).
    #[schemars(length(min = 1, max = 317))]
    pub topology_key: String,
    /// Most pods of a shard one domain may hold beyond the emptiest domain (1-100; default 1).
    #[serde(default = "d_one")]
    #[schemars(range(min = 1, max = 100))]
    pub max_skew: i32,
    /// `Hard` or `Soft` for this constraint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<Spread>,
}

/// Live resharding. Changing `shards` never restarts the pods of the shards that stay: new
/// shards get keys only once each has a ready member, then a new shard map moves about
/// 1/(N+1) of the keys per added shard at once. For `handoffWindow` after that, a read (GET or
/// HEAD) that the new owner answers with a miss is served by the key's previous owner, and a
/// DELETE of a moved key is applied on the previous owner first, so a deleted value cannot
/// come back. Removed shards serve those reads until the window closes, then their workloads
/// are deleted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resharding {
    /// How long the previous owner of a moved key keeps serving its reads after the shard count
    /// changed (default 2m; 0s disables the handoff; at most 24h). Size it to how long your
    /// application takes to copy or rebuild a moved key's data on its new owner.
    #[serde(default = "d_handoff_window")]
    pub handoff_window: DurationString,
    /// Status codes of the new owner's answer to a GET or HEAD that mean "not here" and send
    /// the read to the previous owner (default [404]; 400-599 except 410 and 421). An
    /// application answers 410 for a key it deleted, which is never handed off.
    #[serde(default = "d_miss_statuses")]
    #[schemars(length(min = 1, max = 8))]
    pub miss_statuses: Vec<i32>,
}

fn d_handoff_window() -> DurationString {
    "2m".into()
}

fn d_miss_statuses() -> Vec<i32> {
    vec![404]
}

impl Default for Resharding {
    fn default() -> Self {
        Resharding {
            handoff_window: d_handoff_window(),
            miss_statuses: d_miss_statuses(),
        }
    }
}

/// Where the shard key of a request is read from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardKey {
    /// HTTP header carrying the key (case-insensitive, a valid header name).
    /// Requests to a sharded destination without it get HTTP 400 naming the header.
    #[serde(default = "default_shard_header")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    )]
    pub header: String,
}

fn default_shard_header() -> String {
    "x-shard-key".to_string()
}

impl Default for ShardKey {
    fn default() -> Self {
        ShardKey {
            header: default_shard_header(),
        }
    }
}

/// Resilience policy of the sidecar for requests to this service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resilience {
    /// Connect, per-try and overall timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Retries with exponential backoff, full jitter and a retry budget.
    #[serde(default)]
    pub retries: Retries,
    /// Per-endpoint circuit breaker.
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    /// Concurrency limit (bulkhead) of the inbound side; excess requests are shed with 503.
    #[serde(default)]
    pub concurrency: Concurrency,
}

/// Timeouts. The overall deadline bounds every retry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// Time to establish a TCP connection to an endpoint (default 1s; at most 1m).
    #[serde(default = "d_connect")]
    pub connect: DurationString,
    /// Time one attempt may take until the response headers arrive (default 2s; at most 10m).
    #[serde(default = "d_per_try")]
    pub per_try: DurationString,
    /// Deadline for the whole request, all retries and backoff included (default 10s; at most
    /// 10m; must be at least `perTry`). Exceeded: HTTP 504.
    #[serde(default = "d_overall")]
    pub overall: DurationString,
}

fn d_connect() -> DurationString {
    "1s".into()
}
fn d_per_try() -> DurationString {
    "2s".into()
}
fn d_overall() -> DurationString {
    "10s".into()
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: d_connect(),
            per_try: d_per_try(),
            overall: d_overall(),
        }
    }
}

/// Failure classes that may be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum RetryOn {
    /// The connection could not be established (the request never left).
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The connection was reset or closed before a response arrived.
    #[serde(rename = "reset")]
    Reset,
    /// HTTP 429 Too Many Requests (`Retry-After` is honoured).
    #[serde(rename = "429")]
    TooManyRequests,
    /// HTTP 502 Bad Gateway.
    #[serde(rename = "502")]
    BadGateway,
    /// HTTP 503 Service Unavailable (`Retry-After` is honoured).
    #[serde(rename = "503")]
    ServiceUnavailable,
    /// HTTP 504 Gateway Timeout, or the per-try timeout expired.
    #[serde(rename = "504")]
    GatewayTimeout,
}

impl RetryOn {
    /// The default retry conditions.
    pub const DEFAULT: [RetryOn; 6] = [
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::TooManyRequests,
        RetryOn::BadGateway,
        RetryOn::ServiceUnavailable,
        RetryOn::GatewayTimeout,
    ];
}

/// Retry policy. Non-idempotent requests (POST, PATCH) are retried only when they provably never
/// reached the application, or carry an `Idempotency-Key` header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Total attempts including the first (1-10; default 3; 1 disables retries).
    #[serde(default = "d_max_attempts")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: i32,
    /// First backoff before a retry; the n-th waits a random time in [0, min(maxBackoff,
    /// baseBackoff * 2^n)] (full jitter). Default 25ms.
    #[serde(default = "d_base_backoff")]
    pub base_backoff: DurationString,
    /// Cap of the backoff (default 1s; at least `baseBackoff`).
    #[serde(default = "d_max_backoff")]
    pub max_backoff: DurationString,
    /// Failure classes that are retried (default: all of connect-failure, reset, 429, 502, 503,
    /// 504).
    #[serde(default = "d_retry_on")]
    pub retry_on: Vec<RetryOn>,
    /// Retry budget: retries may add at most this percentage of the request rate (0-100;
    /// default 20). Keeps retries from multiplying load during an outage.
    #[serde(default = "d_budget_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub budget_percent: i32,
    /// Retries per second always allowed regardless of the budget, so low-traffic clients can
    /// still retry (0-1000; default 10).
    #[serde(default = "d_min_retries_per_second")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_retries_per_second: i32,
    /// Largest request body buffered for replay (0-16777216 bytes; default 65536); requests with
    /// larger bodies are not retried.
    #[serde(default = "d_max_replay_body_bytes")]
    #[schemars(range(min = 0, max = 16777216))]
    pub max_replay_body_bytes: i32,
}

fn d_max_attempts() -> i32 {
    3
}
fn d_base_backoff() -> DurationString {
    "25ms".into()
}
fn d_max_backoff() -> DurationString {
    "1s".into()
}
fn d_retry_on() -> Vec<RetryOn> {
    RetryOn::DEFAULT.to_vec()
}
fn d_budget_percent() -> i32 {
    20
}
fn d_min_retries_per_second() -> i32 {
    10
}
fn d_max_replay_body_bytes() -> i32 {
    64 * 1024
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            max_attempts: d_max_attempts(),
            base_backoff: d_base_backoff(),
            max_backoff: d_max_backoff(),
            retry_on: d_retry_on(),
            budget_percent: d_budget_percent(),
            min_retries_per_second: d_min_retries_per_second(),
            max_replay_body_bytes: d_max_replay_body_bytes(),
        }
    }
}

/// Per-endpoint circuit breaker: closed counts failures; past a threshold it opens (the endpoint
/// gets no traffic); after `openDuration` it goes half-open and admits `halfOpenProbes`
/// requests; success closes it, failure re-opens it for longer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Open after this many consecutive failures (1-1000; default 5).
    #[serde(default = "d_consecutive_failures")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_failures: i32,
    /// Or open when the failure rate over `window` reaches this percentage (1-100; default 50)...
    #[serde(default = "d_failure_rate_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_rate_percent: i32,
    /// ...with at least this many requests in the window (1-100000; default 20).
    #[serde(default = "d_min_requests")]
    #[schemars(range(min = 1, max = 100000))]
    pub min_requests: i32,
    /// Sliding window for the failure rate (default 10s; 1s-10m).
    #[serde(default = "d_window")]
    pub window: DurationString,
    /// How long an endpoint stays open the first time (default 5s); doubled on each re-opening.
    #[serde(default = "d_open_duration")]
    pub open_duration: DurationString,
    /// Cap of the growing open duration (default 1m; at least `openDuration`).
    #[serde(default = "d_max_open_duration")]
    pub max_open_duration: DurationString,
    /// Requests admitted while half-open (1-100; default 3).
    #[serde(default = "d_half_open_probes")]
    #[schemars(range(min = 1, max = 100))]
    pub half_open_probes: i32,
    /// Never open the breakers of more than this percentage of a destination's endpoints
    /// (0-100; default 50), so a shared cause cannot eject every replica.
    #[serde(default = "d_max_ejection_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: i32,
}

fn d_consecutive_failures() -> i32 {
    5
}
fn d_failure_rate_percent() -> i32 {
    50
}
fn d_min_requests() -> i32 {
    20
}
fn d_window() -> DurationString {
    "10s".into()
}
fn d_open_duration() -> DurationString {
    "5s".into()
}
fn d_max_open_duration() -> DurationString {
    "1m".into()
}
fn d_half_open_probes() -> i32 {
    3
}
fn d_max_ejection_percent() -> i32 {
    50
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            consecutive_failures: d_consecutive_failures(),
            failure_rate_percent: d_failure_rate_percent(),
            min_requests: d_min_requests(),
            window: d_window(),
            open_duration: d_open_duration(),
            max_open_duration: d_max_open_duration(),
            half_open_probes: d_half_open_probes(),
            max_ejection_percent: d_max_ejection_percent(),
        }
    }
}

/// Bulkhead for the inbound side of each pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Concurrency {
    /// Requests in flight to the application at once (1-100000; default 1000). Beyond it the
    /// sidecar answers 503 with `Retry-After` instead of queueing.
    #[serde(default = "d_max_in_flight")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_in_flight: i32,
}

fn d_max_in_flight() -> i32 {
    1000
}

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency {
            max_in_flight: d_max_in_flight(),
        }
    }
}

/// How pods of each shard are created and replaced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// Pods of a shard that may be unavailable at once during voluntary disruptions and
    /// rolling updates (1-100; default 1). Becomes the shard's PodDisruptionBudget.
    #[serde(default = "d_max_unavailable")]
    #[schemars(range(min = 1, max = 100))]
    pub max_unavailable: i32,
    /// `Parallel` (default) starts and stops a shard's pods together; `OrderedReady` one by one.
    #[serde(default)]
    pub pod_management_policy: PodManagementPolicy,
    /// Lowering `shards` deletes the workloads of the removed shards, orphaning their keys'
    /// data. The operator refuses it (condition Invalid, reason ShardRemovalRefused) unless this
    /// is true. Default false.
    #[serde(default)]
    pub allow_shard_removal: bool,
    /// How a change of the pod template reaches the shards. `ShardByShard` (default): a canary
    /// wave of `canaryShards`, then waves of `maxShardsInFlight`; each wave's shards must be
    /// fully updated and Ready for `bakeTime` before the next wave starts, and a failing new
    /// revision halts the rollout with the untouched shards on the old revision. `AllAtOnce`:
    /// every shard rolls at the same time.
    #[serde(default)]
    pub strategy: RolloutStrategy,
    /// Shards in the first (canary) wave of a `ShardByShard` rollout (default 1; 1-1024).
    #[serde(default = "d_one")]
    #[schemars(range(min = 1, max = 1024))]
    pub canary_shards: i32,
    /// Shards rolling at once in the waves after the canary (default 1; 1-1024).
    #[serde(default = "d_one")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_shards_in_flight: i32,
    /// How long every shard of a wave must stay fully updated and Ready before the next wave
    /// starts (default 30s; 0s to 1h).
    #[serde(default = "d_bake_time")]
    pub bake_time: DurationString,
    /// How long a wave may take to get all its shards updated and Ready before the rollout
    /// halts (default 10m; 10s to 24h). A new pod that crash-loops or cannot start halts it
    /// at once.
    #[serde(default = "d_progress_deadline")]
    pub progress_deadline: DurationString,
    /// Pause a `ShardByShard` rollout between waves: the wave in progress finishes, no new
    /// wave starts until this is false again (default false).
    #[serde(default)]
    pub paused: bool,
}

fn d_one() -> i32 {
    1
}

fn d_bake_time() -> DurationString {
    "30s".into()
}

fn d_progress_deadline() -> DurationString {
    "10m".into()
}

/// How a template change reaches the shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RolloutStrategy {
    /// Wave by wave, halting on a failing revision.
    #[default]
    ShardByShard,
    /// Every shard at once (each shard still replaces its pods one by one).
    AllAtOnce,
}

fn d_max_unavailable() -> i32 {
    1
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            max_unavailable: d_max_unavailable(),
            pod_management_policy: PodManagementPolicy::default(),
            allow_shard_removal: false,
            strategy: RolloutStrategy::default(),
            canary_shards: d_one(),
            max_shards_in_flight: d_one(),
            bake_time: d_bake_time(),
            progress_deadline: d_progress_deadline(),
            paused: false,
        }
    }
}

/// StatefulSet pod management policy of each shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PodManagementPolicy {
    /// Create and delete a shard's pods in parallel.
    #[default]
    Parallel,
    /// Create pods one at a time, each after the previous is Ready.
    OrderedReady,
}

impl PodManagementPolicy {
    /// The StatefulSet field value.
    pub fn as_str(self) -> &'static str {
        match self {
            PodManagementPolicy::Parallel => "Parallel",
            PodManagementPolicy::OrderedReady => "OrderedReady",
        }
    }
}

/// Per-shard leader election. The sidecars of a shard contend for the Lease
/// `<name>-<shard>-leader`; its transition count is the shard's leader epoch, which increases
/// with every new leader. Calling sidecars send requests classified as writes to the leader of
/// the key's shard with `x-shardmesh-fencing-epoch`; the receiving sidecar tells the application
/// its role and the epoch it knows (`x-shardmesh-role`, `x-shardmesh-leader-epoch`) so the
/// application can refuse a write fenced with another epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeaderElection {
    /// Elect a leader per shard (default false).
    #[serde(default)]
    pub enabled: bool,
    /// How long a leader stays leader without renewing (default 15s; 3s-5m). A crashed leader
    /// is replaced after about this long; a leader that cannot renew for two thirds of it steps
    /// down on its own first, so two pods never both claim the role.
    #[serde(default = "d_leader_lease")]
    pub lease_duration: DurationString,
    /// Which requests are writes: without this, every request whose method is not safe (not
    /// GET, HEAD, OPTIONS or TRACE); with it, exactly the requests carrying this header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    )]
    pub write_header: Option<String>,
}

fn d_leader_lease() -> DurationString {
    "15s".into()
}

impl Default for LeaderElection {
    fn default() -> Self {
        LeaderElection {
            enabled: false,
            lease_duration: d_leader_lease(),
            write_header: None,
        }
    }
}

/// Observed state, written only by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardedServiceStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Shard-map generation: increases on every membership change of any shard.
    #[serde(default)]
    pub epoch: i64,
    /// Ready pods / desired pods across all shards, e.g. `5/6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// The smallest number of ready replicas of any shard (the scale subresource's view).
    #[serde(default)]
    pub replicas_per_shard: i32,
    /// Label selector of all pods of the service (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Per-shard state, one entry per shard index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStatus>,
    /// Capabilities the API server lacks, and parts of the spec not applied as written (e.g. a
    /// `spec.placement` constraint the template overrides), with what shardmesh does instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// A change of the shard count in progress (absent when none is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resharding: Option<ReshardingStatus>,
    /// The rollout of the current pod template (absent before the first reconcile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// `Ready`, `Progressing`, `Degraded`, `Invalid` and `Resharding`, each with a reason and
    /// message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A change of the shard count in progress.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReshardingStatus {
    /// `AddingShards` (new shards start; keys stay where they are until each new shard has a
    /// ready member), `Handoff` (keys moved; previous owners serve reads that miss until the
    /// window closes) or `Draining` (as Handoff, and the removed shards are deleted when it
    /// closes).
    pub phase: String,
    /// Shard count keys were routed by before the change.
    pub from: i32,
    /// Shard count of the change.
    pub to: i32,
    /// When the handoff window closes (RFC 3339), in the Handoff and Draining phases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

/// Progress of the current pod template across the shards.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Hash of the pod template being rolled out (the same for every shard).
    pub revision: String,
    /// `Complete`, `Rolling`, `Baking` (the wave is updated and must stay Ready for
    /// `bakeTime`), `Paused` or `Halted`.
    pub phase: String,
    /// Wave in progress (1 is the canary wave); 0 when nothing had to roll.
    #[serde(default)]
    pub wave: i32,
    /// Shards whose pods all run the current template, e.g. `2/4`.
    pub updated: String,
    /// Shards of the wave in progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards_in_flight: Vec<i32>,
    /// When the wave in progress started, or when its shards were all updated while baking
    /// (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Why the rollout halted: the shard and its pod's reason. Cleared by a new template
    /// (reverting the template, or fixing it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halted: Option<String>,
}

/// State of one shard.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// Shard index (0-based).
    pub index: i32,
    /// Desired replicas.
    pub replicas: i32,
    /// Replicas whose pods are Ready.
    pub ready_replicas: i32,
    /// How many live members the shard map lists for the shard (ready pods when no map is
    /// published yet). Their names and addresses are in the shard's ShardMapSlice
    /// (`kubectl get shardmapslices NAME-INDEX -o yaml`), so the status stays small at any size.
    #[serde(default)]
    pub live_members: i32,
    /// The shard's leader pod, when leader election is enabled and a leader is live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The shard's leader epoch (transitions of its leader Lease), when leader election is
    /// enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_epoch: Option<i64>,
    /// StatefulSet revision most of the shard's pods run (`currentRevision`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<String>,
    /// StatefulSet revision of the current pod template (`updateRevision`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_revision: Option<String>,
    /// Every pod of the shard runs the current template and is Ready.
    #[serde(default)]
    pub updated: bool,
}

/// Condition types set on a ShardedService.
pub mod condition {
    /// All shards have all replicas ready at the current generation.
    pub const READY: &str = "Ready";
    /// A change (create, scale, template update) is being rolled out.
    pub const PROGRESSING: &str = "Progressing";
    /// A shard has fewer ready replicas than desired outside a rollout.
    pub const DEGRADED: &str = "Degraded";
    /// The spec cannot be applied; the message names the field and the fix.
    pub const INVALID: &str = "Invalid";
    /// The shard count is changing (see `status.resharding`).
    pub const RESHARDING: &str = "Resharding";
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::ObjectList;
    use serde_json::{json, Value};

    fn object(name: &str, template: Value) -> Value {
        json!({
            "apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedService",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"shards": 2, "replicasPerShard": 1, "port": 8080, "template": template},
        })
    }

    fn good() -> Value {
        json!({"spec": {"containers": [{"name": "app", "image": "demo:1"}]}})
    }

    fn broken() -> Value {
        json!({"spec": {"containers": [{"name": "app", "image": "demo:1",
                                        "ports": [{"containerPort": "http"}]}]}})
    }

    #[test]
    fn a_list_with_a_broken_template_decodes_every_item() {
        // What a watcher's list returns: one object it cannot read would fail the whole list.
        let list: ObjectList<ShardedService> = serde_json::from_value(json!({
            "apiVersion": "shardmesh.io/v1alpha1", "kind": "ShardedServiceList",
            "metadata": {"resourceVersion": "7"},
            "items": [object("a", good()), object("b", broken()), object("c", good())],
        }))
        .expect("the list decodes");
        let decoded: Vec<bool> = list
            .items
            .iter()
            .map(|s| s.spec.template.decoded())
            .collect();
        assert_eq!(decoded, [true, false, true]);
        assert_eq!(
            list.items[2]
                .spec
                .template
                .spec
                .as_ref()
                .map(|s| s.containers.len()),
            Some(1)
        );
    }

    #[test]
    fn a_broken_template_serializes_back_as_stored() {
        let raw = object("b", broken());
        let svc: ShardedService = serde_json::from_value(raw.clone()).expect("decodes");
        let back = serde_json::to_value(&svc).expect("serializes");
        assert_eq!(back["spec"]["template"], raw["spec"]["template"]);
        let again: ShardedService = serde_json::from_value(back).expect("decodes again");
        assert_eq!(again, svc);
    }
}
