//! `kubectl shardmesh route NAME KEY`: where a sidecar sends `KEY` right now. The owner comes
//! from the published map's own `owner` (jump hash over its routing count, the function the
//! sidecars use), so the answer is theirs, including mid-change.

use serde::Serialize;
use shardmesh_api::{
    routing::shard_for_key,
    shardmap::{Assembled, Leader, Member},
    ShardedService,
};

use crate::output::{Report, Table};

/// What `route` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteReport {
    /// Service name.
    pub service: String,
    /// Namespace.
    pub namespace: String,
    /// The key.
    pub key: String,
    /// Request header carrying the key.
    pub header: String,
    /// The shard owning the key.
    pub shard: u32,
    /// The shard count keys are routed by.
    pub routing_shards: u32,
    /// Epoch of the map the answer comes from.
    pub map_epoch: i64,
    /// The owning shard's live members: any of them serves the key.
    pub pods: Vec<Member>,
    /// The owning shard's leader (writes go there), when leader election is on.
    pub leader: Option<Leader>,
    /// During a handoff window: the key's previous owner, which serves its reads that miss.
    pub previous_owner: Option<u32>,
    /// When that window closes.
    pub handoff_until: Option<String>,
    /// The owner once a pending change of `spec.shards` moves keys, when that is another shard.
    pub owner_after_change: Option<u32>,
}

impl RouteReport {
    /// Whether someone can serve the key now (the exit code follows it).
    pub fn servable(&self) -> bool {
        !self.pods.is_empty()
    }
}

/// The route of `key` through the assembled map of `svc`.
pub fn build(svc: &ShardedService, assembled: &Assembled, key: &str) -> RouteReport {
    let map = &assembled.map;
    let shard = map.owner(key.as_bytes());
    let owner = map.shards.get(shard as usize);
    let spec = u32::try_from(svc.spec.shards).unwrap_or(0);
    let after = (spec >= 1 && spec != map.count())
        .then(|| shard_for_key(key.as_bytes(), spec))
        .filter(|&s| s != shard);
    RouteReport {
        service: svc.metadata.name.clone().unwrap_or_default(),
        namespace: svc.metadata.namespace.clone().unwrap_or_default(),
        key: key.to_string(),
        header: assembled.layout.shard_key.clone(),
        shard,
        routing_shards: map.count(),
        map_epoch: map.epoch,
        pods: owner.map(|s| s.members.clone()).unwrap_or_default(),
        leader: owner.and_then(|s| s.leader.clone()),
        previous_owner: map.previous_owner(key.as_bytes()),
        handoff_until: map
            .previous_owner(key.as_bytes())
            .and(map.previous.as_ref())
            .map(|p| p.until.clone()),
        owner_after_change: after,
    }
}

impl Report for RouteReport {
    fn text(&self) -> String {
        let mut out = format!(
            "Key {:?} (header {}) -> shard {} of {} (map epoch {})\n",
            self.key, self.header, self.shard, self.routing_shards, self.map_epoch
        );
        if let (Some(p), Some(until)) = (self.previous_owner, &self.handoff_until) {
            out.push_str(&format!(
                "Handoff: until {until}, reads that miss on shard {} are served by shard {p}\n",
                self.shard
            ));
        }
        if let Some(a) = self.owner_after_change {
            out.push_str(&format!(
                "Pending: once the change of spec.shards moves keys, shard {a} owns the key\n"
            ));
        }
        if self.pods.is_empty() {
            out.push_str(&format!(
                "No live member: shard {} has no ready pod, requests for this key fail\n",
                self.shard
            ));
            return out;
        }
        out.push('\n');
        let mut t = Table::new(&["shard", "pod", "address", "leader"]);
        for m in &self.pods {
            let leader = self
                .leader
                .as_ref()
                .filter(|l| l.pod == m.pod)
                .map_or(String::new(), |l| format!("yes (epoch {})", l.epoch));
            t.row(vec![
                self.shard.to_string(),
                m.pod.clone(),
                m.address.clone(),
                leader,
            ]);
        }
        out.push_str(&t.render());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::{map, service};
    use shardmesh_api::shardmap::assemble;

    #[test]
    fn the_owner_is_the_sidecars_jump_hash_and_its_members() {
        let svc = service(3, serde_json::Value::Null);
        let slices = map(3, 3, None);
        let a = assemble(&slices).expect("complete");
        for key in ["alice", "bob", "carol", "dave", "k-17", ""] {
            let r = build(&svc, &a, key);
            assert_eq!(r.shard, shard_for_key(key.as_bytes(), 3), "{key}");
            assert_eq!(r.pods.len(), 2);
            assert!(r
                .pods
                .iter()
                .all(|p| p.pod.starts_with(&format!("orders-{}-", r.shard))));
            assert_eq!(r.leader.is_some(), r.shard == 0);
            assert_eq!((r.previous_owner, r.owner_after_change), (None, None));
            assert!(r.servable());
        }
        let text = build(&svc, &a, "alice").text();
        assert!(
            text.starts_with("Key \"alice\" (header x-shard-key) -> shard "),
            "{text}"
        );
    }

    #[test]
    fn mid_change_the_answer_is_the_published_one() {
        // spec says 4, the map still routes by 3 (new shard joining): route by 3, say where
        // the key goes afterwards.
        let svc = service(4, serde_json::Value::Null);
        let a = assemble(&map(3, 4, None)).expect("complete");
        let moved = (0..200)
            .map(|i| format!("k{i}"))
            .find(|k| shard_for_key(k.as_bytes(), 4) == 3)
            .expect("some key moves to shard 3");
        let r = build(&svc, &a, &moved);
        assert_eq!(r.shard, shard_for_key(moved.as_bytes(), 3));
        assert_eq!(r.owner_after_change, Some(3));
        // In the handoff window after 3 -> 4, the previous owner is named.
        let svc = service(4, serde_json::Value::Null);
        let a = assemble(&map(4, 4, Some(3))).expect("complete");
        let r = build(&svc, &a, &moved);
        assert_eq!(r.shard, 3);
        assert_eq!(r.previous_owner, Some(shard_for_key(moved.as_bytes(), 3)));
        assert!(r.handoff_until.is_some());
        assert!(r.text().contains("Handoff: until"));
    }
}
