//! HTTP headers the sidecars add to requests, shared with applications (the demo app reads
//! them) so the names are defined once.

/// Set by the calling sidecar: the shard a request was routed to.
pub const SHARD: &str = "x-shardmesh-shard";
/// Set by the calling sidecar: the shard-map epoch the route was computed from.
pub const EPOCH: &str = "x-shardmesh-epoch";
/// Set by the calling sidecar on writes to a shard leader: the leader epoch the caller routed
/// by. The application accepts a write only when it equals the epoch it holds as leader.
pub const FENCING_EPOCH: &str = "x-shardmesh-fencing-epoch";
/// Set by the receiving sidecar when its service elects leaders: `leader` or `follower`.
pub const ROLE: &str = "x-shardmesh-role";
/// Set by the receiving sidecar when its service elects leaders: the shard's leader epoch as
/// this pod knows it (its own when it leads).
pub const LEADER_EPOCH: &str = "x-shardmesh-leader-epoch";

/// Value of [`ROLE`] on the leader.
pub const ROLE_LEADER: &str = "leader";
/// Value of [`ROLE`] on the other members.
pub const ROLE_FOLLOWER: &str = "follower";
