//! The shard map: per shard, the live members a sidecar may route to, and the epoch that
//! increases on every change. Published by the operator, read by sidecars (or loaded from a
//! static file for standalone use).
//!
//! **Layout.** Keys are routed by `count` (jump hash over `0..count`), which may be lower than
//! the number of listed shards: shards being added are listed (their members visible) before
//! they own keys, and shards being removed stay listed while they serve handoff reads. While a
//! change of the shard count is in its handoff window the map also carries `previous`, the
//! count keys were routed by before: a read that misses on a key's new owner is served by its
//! previous owner.
//!
//! **Publication: one object per shard.** The operator publishes a map as one
//! [`ShardMapSlice`] per listed shard (like EndpointSlices for Endpoints), so a membership
//! change rewrites the slice of the shard that changed and a watching sidecar receives that
//! slice only: the bytes of a change grow with one shard, not with the service, and every
//! object stays far below the API server's size limits at the CRD's maximum. Every slice
//! carries its [`Layout`] (routing count, listed shards, handoff window, routing settings)
//! under a layout `id`; [`assemble`] combines slices into a map only when every listed shard has
//! a slice of the same layout, so a reader never mixes two layouts (while a layout change is
//! being written it keeps routing by the last complete map). The assembled epoch is the highest
//! slice epoch: the operator writes each changed slice with the service's next epoch, and an
//! epoch at or above the one a layout was published at implies that layout or a newer one.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Live membership of one ShardedService.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardMap {
    /// Increases on every membership change; carried on routed requests as `x-shardmesh-epoch`.
    pub epoch: i64,
    /// The shard count keys are routed by. Absent in maps of earlier releases, where it is
    /// `shards.len()`; see [`ShardMap::count`].
    #[serde(default, rename = "count", skip_serializing_if = "Option::is_none")]
    pub routing_count: Option<u32>,
    /// One entry per listed shard index, in index order (at least `count` of them).
    pub shards: Vec<Shard>,
    /// The layout before the last change of the shard count, while its handoff window is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Previous>,
}

/// The previous layout of a map whose shard count changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Previous {
    /// The shard count keys were routed by before the change.
    pub count: u32,
    /// When the operator closes the window (RFC 3339). Informational for sidecars: the window
    /// is open exactly while a map carries `previous`, so their clocks do not matter.
    pub until: String,
}

/// Members of one shard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// Pod name.
    pub pod: String,
    /// `ip:port` of the pod's sidecar inbound listener.
    pub address: String,
}

impl ShardMap {
    /// The shard count keys are routed by.
    pub fn count(&self) -> u32 {
        self.routing_count
            .unwrap_or_else(|| u32::try_from(self.shards.len()).unwrap_or(u32::MAX))
    }

    /// The shard owning `key` under this map.
    pub fn owner(&self, key: &[u8]) -> u32 {
        crate::routing::shard_for_key(key, self.count())
    }

    /// The shard that owned `key` before the last change of the shard count, while the handoff
    /// window is open and only when that is another shard than its owner now.
    pub fn previous_owner(&self, key: &[u8]) -> Option<u32> {
        let prev = self.previous.as_ref()?;
        let before = crate::routing::shard_for_key(key, prev.count);
        (before != self.owner(key)).then_some(before)
    }

    /// Checks the invariants a consumer relies on; the error names the offending entry.
    pub fn check(&self) -> Result<(), String> {
        if self.shards.is_empty() {
            return Err("shards: empty; a shard map needs at least one shard".into());
        }
        let listed = self.shards.len();
        let in_range = |field: &str, n: u32| {
            if n == 0 || n as usize > listed {
                Err(format!(
                    "{field}: {n} must be between 1 and the number of entries in shards ({listed})"
                ))
            } else {
                Ok(())
            }
        };
        in_range("count", self.count())?;
        if let Some(p) = &self.previous {
            in_range("previous.count", p.count)?;
            if p.count == self.count() {
                return Err(format!(
                    "previous.count: {} equals count; a previous layout has another shard count",
                    p.count
                ));
            }
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

/// Most shards a service may have (`spec.shards`' maximum): bounds what a reader accepts.
pub const MAX_SHARDS: u32 = 1024;

/// One shard of a service's published shard map, with the layout it belongs to. Named like the
/// shard's StatefulSet (`<service>-<shard>`), labelled with the service and the shard, owned by
/// the ShardedService; written by the operator only.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "shardmesh.io",
    version = "v1alpha1",
    kind = "ShardMapSlice",
    namespaced,
    derive = "PartialEq",
    shortname = "shmap",
    category = "shardmesh",
    doc = "One shard of a ShardedService's live shard map (its members, leader and the layout it belongs to), published by the shardmesh operator for the sidecars. List a service's with `-l shardmesh.io/service=NAME`.",
    printcolumn(
        name = "Shard",
        type_ = "integer",
        json_path = ".spec.shard.index",
        description = "Shard index"
    ),
    printcolumn(
        name = "Epoch",
        type_ = "integer",
        json_path = ".spec.epoch",
        description = "Map epoch at which this slice last changed"
    ),
    printcolumn(
        name = "Leader",
        type_ = "string",
        json_path = ".spec.shard.leader.pod",
        description = "The shard's live leader, when the service elects leaders"
    ),
    printcolumn(
        name = "Layout",
        type_ = "integer",
        json_path = ".spec.layout.id",
        description = "Layout the slice belongs to"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ShardMapSliceSpec {
    /// The service's map epoch at which this slice last changed.
    pub epoch: i64,
    /// The layout this slice belongs to; every slice of a complete map carries the same.
    pub layout: Layout,
    /// The shard: index, ready members, live leader.
    pub shard: Shard,
}

/// What every slice of one map shares: how keys are routed and how requests are recognised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Layout {
    /// The map epoch this layout was published at; a reader combines only slices of one id.
    pub id: i64,
    /// The shard count keys are routed by.
    pub count: u32,
    /// How many shards are listed (one slice each): `count`, or more while shards are added
    /// or drained.
    pub listed: u32,
    /// The layout before the last change of the shard count, while its handoff window is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Previous>,
    /// Request header carrying the shard key (lower case).
    pub shard_key: String,
    /// How writes are recognised when the service elects leaders: `methods` or
    /// `header:<name>`; absent when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writes: Option<String>,
    /// Statuses of a read that mean a miss during a handoff window, comma-separated.
    pub handoff_miss: String,
}

impl Layout {
    /// Whether `other` is the same layout but for its id.
    pub fn same_as(&self, other: &Layout) -> bool {
        Layout {
            id: 0,
            ..self.clone()
        } == Layout {
            id: 0,
            ..other.clone()
        }
    }
}

/// A map combined from its slices, with the layout they share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assembled {
    /// The map, its epoch the highest of its slices'.
    pub map: ShardMap,
    /// The layout every slice carries.
    pub layout: Layout,
}

/// The slices publishing `map` under `layout` (its `count`, `listed` and `previous` are taken
/// from the map), each at the map's epoch.
pub fn slices(map: &ShardMap, layout: &Layout) -> Vec<ShardMapSliceSpec> {
    let layout = Layout {
        count: map.count(),
        listed: u32::try_from(map.shards.len()).unwrap_or(u32::MAX),
        previous: map.previous.clone(),
        ..layout.clone()
    };
    map.shards
        .iter()
        .map(|shard| ShardMapSliceSpec {
            epoch: map.epoch,
            layout: layout.clone(),
            shard: shard.clone(),
        })
        .collect()
}

/// The most shards any of `slices` lists, whatever its layout: while a new layout is being
/// written the slices mix two layouts and [`assemble`] finds no complete map, but every shard
/// either layout lists still has a slice, and its workloads must not be taken for removed.
pub fn listed_by_any<'a>(slices: impl IntoIterator<Item = &'a ShardMapSliceSpec>) -> u32 {
    slices
        .into_iter()
        .map(|s| s.layout.listed.max(s.shard.index.saturating_add(1)))
        .max()
        .unwrap_or(0)
        .min(MAX_SHARDS)
}

/// Combines the slices of one service into its map: the newest layout among them, one slice of
/// it per listed shard (slices of shards past `listed` are leftovers and ignored). Fails, saying
/// what is missing, while a layout is incomplete or when slices disagree; the map is then
/// [`ShardMap::check`]ed.
pub fn assemble<'a>(
    slices: impl IntoIterator<Item = &'a ShardMapSliceSpec>,
) -> Result<Assembled, String> {
    let slices: Vec<&ShardMapSliceSpec> = slices.into_iter().collect();
    let newest = slices
        .iter()
        .max_by_key(|s| s.layout.id)
        .ok_or("no slices published")?;
    let layout = newest.layout.clone();
    if layout.listed == 0 || layout.listed > MAX_SHARDS {
        return Err(format!(
            "layout {}: listed {} must be between 1 and {MAX_SHARDS}",
            layout.id, layout.listed
        ));
    }
    let mut shards: Vec<Option<&ShardMapSliceSpec>> = vec![None; layout.listed as usize];
    for s in slices.iter().filter(|s| s.layout.id == layout.id) {
        if s.layout != layout {
            return Err(format!(
                "layout {}: slices of shard {} and {} disagree on it",
                layout.id, newest.shard.index, s.shard.index
            ));
        }
        let Some(slot) = shards.get_mut(s.shard.index as usize) else {
            return Err(format!(
                "layout {}: shard {} is past the {} listed",
                layout.id, s.shard.index, layout.listed
            ));
        };
        if slot.replace(s).is_some() {
            return Err(format!(
                "layout {}: shard {} is published twice",
                layout.id, s.shard.index
            ));
        }
    }
    let missing: Vec<usize> = (0..shards.len()).filter(|&i| shards[i].is_none()).collect();
    if let Some(first) = missing.first() {
        return Err(format!(
            "layout {}: {} of {} shard(s) not yet published in it (first: shard {first})",
            layout.id,
            missing.len(),
            layout.listed
        ));
    }
    let shards: Vec<&ShardMapSliceSpec> = shards.into_iter().flatten().collect();
    let map = ShardMap {
        epoch: shards.iter().map(|s| s.epoch).max().unwrap_or(0),
        routing_count: Some(layout.count),
        shards: shards.iter().map(|s| s.shard.clone()).collect(),
        previous: layout.previous.clone(),
    };
    map.check()?;
    Ok(Assembled { map, layout })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_the_bad_entry() {
        let mut m = ShardMap {
            epoch: 1,
            routing_count: None,
            previous: None,
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
        m.shards[0].index = 0;
        m.shards[0].members.clear();
        m.routing_count = Some(2);
        assert!(m.check().unwrap_err().starts_with("count: 2"));
        m.routing_count = Some(1);
        m.previous = Some(Previous {
            count: 1,
            until: "2026-01-01T00:00:00Z".into(),
        });
        assert!(m
            .check()
            .unwrap_err()
            .starts_with("previous.count: 1 equals"));
    }

    #[test]
    fn a_layout_half_written_still_counts_every_listed_shard() {
        let map = |n: u32| ShardMap {
            epoch: 5,
            routing_count: Some(n),
            previous: None,
            shards: listed(n),
        };
        // Settled on 4 shards; then 4 -> 3 is being written: slices 0-2 carry the new layout
        // (routes by 3, still lists 4), slice 3 the old one.
        let old = Layout {
            id: 4,
            count: 4,
            listed: 4,
            ..Layout::default()
        };
        let new = Layout {
            id: 6,
            count: 3,
            listed: 4,
            ..Layout::default()
        };
        let mut mixed = slices(&map(4), &new);
        mixed.truncate(3);
        mixed.push(slices(&map(4), &old).remove(3));
        assert!(assemble(&mixed).is_err(), "no complete layout");
        assert_eq!(listed_by_any(&mixed), 4);
        // After the window: the new layout lists 3; the removed shard's slice is being deleted.
        let done = Layout {
            id: 8,
            count: 3,
            listed: 3,
            ..Layout::default()
        };
        let mut closing = slices(&map(3), &done);
        assert_eq!(listed_by_any(&closing), 3);
        closing.push(slices(&map(4), &new).remove(3));
        assert_eq!(listed_by_any(&closing), 4, "its slice still exists");
        assert_eq!(listed_by_any(&[]), 0);
    }

    fn listed(n: u32) -> Vec<Shard> {
        (0..n)
            .map(|index| Shard {
                index,
                members: Vec::new(),
                leader: None,
            })
            .collect()
    }

    #[test]
    fn count_defaults_to_the_listed_shards_and_old_maps_still_parse() {
        let old: ShardMap =
            serde_json::from_str(r#"{"epoch":4,"shards":[{"index":0},{"index":1}]}"#).unwrap();
        assert_eq!((old.count(), old.previous.clone()), (2, None));
        assert_eq!(old.check(), Ok(()));
        // An unchanged map serializes as before (no new keys), so old readers still read it.
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"epoch":4,"shards":[{"index":0,"members":[]},{"index":1,"members":[]}]}"#
        );
    }

    #[test]
    fn previous_owner_only_for_moved_keys_while_the_window_is_open() {
        let mut m = ShardMap {
            epoch: 9,
            routing_count: Some(4),
            shards: listed(4),
            previous: None,
        };
        let keys: Vec<String> = (0..2000).map(|i| format!("k{i}")).collect();
        assert!(keys
            .iter()
            .all(|k| m.previous_owner(k.as_bytes()).is_none()));
        m.previous = Some(Previous {
            count: 3,
            until: "2026-01-01T00:00:00Z".into(),
        });
        let moved: Vec<&String> = keys
            .iter()
            .filter(|k| m.previous_owner(k.as_bytes()).is_some())
            .collect();
        // Growing 3 -> 4 moves about a quarter of the keys, every one of them to shard 3.
        let share = moved.len() as f64 / keys.len() as f64;
        assert!((0.22..0.28).contains(&share), "{share}");
        assert!(moved.iter().all(|k| m.owner(k.as_bytes()) == 3));
        // Shrinking 4 -> 3: exactly the keys of shard 3 move, each to one of the others.
        m.routing_count = Some(3);
        m.previous.as_mut().unwrap().count = 4;
        for k in &keys {
            let before = crate::routing::shard_for_key(k.as_bytes(), 4);
            assert_eq!(m.previous_owner(k.as_bytes()).is_some(), before == 3, "{k}");
            assert!(m.owner(k.as_bytes()) < 3);
        }
    }
}
