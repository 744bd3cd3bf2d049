//! The shard map: per shard, the live members a sidecar may route to, and the epoch that
//! increases on every membership change. Published by the operator, read by sidecars (or loaded
//! from a static file for standalone use).

use serde::{Deserialize, Serialize};

/// Live membership of one ShardedService.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardMap {
    /// Increases on every membership change; carried on routed requests as `x-shardmesh-epoch`.
    pub epoch: i64,
    /// One entry per shard index, in index order; `shards.len()` is the shard count.
    pub shards: Vec<Shard>,
}

/// Members of one shard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Shard {
    /// Shard index (0-based), equal to its position in [`ShardMap::shards`].
    pub index: u32,
    /// Ready members, sorted by pod name.
    #[serde(default)]
    pub members: Vec<Member>,
    /// The live leader, when the service elects leaders and the holder is a live member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<Leader>,
}

/// The leader of one shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Leader {
    /// Pod name (a member of the same shard).
    pub pod: String,
    /// `ip:port` of the leader's sidecar inbound listener.
    pub address: String,
    /// Leader epoch: transitions of the shard's leader Lease; sent as the fencing epoch.
    pub epoch: i64,
}

/// One live replica.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// Pod name.
    pub pod: String,
    /// `ip:port` of the pod's sidecar inbound listener.
    pub address: String,
}

impl ShardMap {
    /// Checks the invariants a consumer relies on; the error names the offending entry.
    pub fn check(&self) -> Result<(), String> {
        if self.shards.is_empty() {
            return Err("shards: empty; a shard map needs at least one shard".into());
        }
        for (i, s) in self.shards.iter().enumerate() {
            if s.index as usize != i {
                return Err(format!(
                    "shards[{i}].index: is {} but must equal its position {i}",
                    s.index
                ));
            }
            for (j, m) in s.members.iter().enumerate() {
                if m.address.parse::<std::net::SocketAddr>().is_err() {
                    return Err(format!(
                        "shards[{i}].members[{j}].address: {:?} is not ip:port",
                        m.address
                    ));
                }
            }
            if let Some(l) = &s.leader {
                if l.address.parse::<std::net::SocketAddr>().is_err() {
                    return Err(format!(
                        "shards[{i}].leader.address: {:?} is not ip:port",
                        l.address
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_the_bad_entry() {
        let mut m = ShardMap {
            epoch: 1,
            shards: vec![Shard {
                index: 0,
                members: vec![Member {
                    pod: "a-0-0".into(),
                    address: "10.0.0.1:4143".into(),
                }],
                leader: None,
            }],
        };
        assert_eq!(m.check(), Ok(()));
        m.shards[0].leader = Some(Leader {
            pod: "a-0-0".into(),
            address: "10.0.0.1:4143".into(),
            epoch: 2,
        });
        assert_eq!(m.check(), Ok(()));
        m.shards[0].leader.as_mut().unwrap().address = "x".into();
        assert!(m
            .check()
            .unwrap_err()
            .starts_with("shards[0].leader.address"));
        m.shards[0].leader = None;
        m.shards[0].members[0].address = "nowhere".into();
        assert!(m
            .check()
            .unwrap_err()
            .starts_with("shards[0].members[0].address"));
        m.shards[0].index = 3;
        assert!(m.check().unwrap_err().starts_with("shards[0].index"));
    }
}
