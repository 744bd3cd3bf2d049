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

/// Set by the receiving sidecar (caller values replaced): the shard count the application must
/// judge key ownership by for this request (`shard_for_key(key, shards) == x-shardmesh-shard`).
/// During a handoff read it is the previous layout's count. `x-shardmesh-shard` and
/// `x-shardmesh-epoch` are likewise overwritten by the receiving sidecar with its own shard
/// index and map epoch.
pub const SHARDS: &str = "x-shardmesh-shards";
/// Set by the receiving sidecar while a handoff window is open (absent otherwise): the shard
/// count keys were routed by before the change. An application that keeps data drops the keys
/// its shard no longer owns once this header is gone (they are stale from then on, and a later
/// change could route them back here); during the window it keeps them to answer handoff
/// requests.
pub const PREVIOUS_SHARDS: &str = "x-shardmesh-previous-shards";
/// On a 421 from a sidecar: the shard owning the key under the answering sidecar's map (whose
/// epoch is in `x-shardmesh-epoch`).
pub const OWNER: &str = "x-shardmesh-owner";
/// On a request a key's new owner forwards to its previous owner during a handoff window (a
/// read that missed, or a delete of a moved key): the forwarding shard's index. The previous
/// owner serves it under the previous layout; the application sees it too.
pub const HANDOFF: &str = "x-shardmesh-handoff";
/// On a response: the previous owner's shard index, when a read that missed on the new owner
/// was served by the previous owner during a handoff window.
pub const HANDOFF_FROM: &str = "x-shardmesh-handoff-from";
/// Value of `x-shardmesh-error` on a sidecar's 421: the key belongs to another shard.
pub const MISDIRECTED: &str = "misdirected";
