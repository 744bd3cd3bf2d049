//! Pure builders of what a ShardedService's pods are allowed and contend for: the member
//! ServiceAccount with a Role allowing exactly their Lease writes and the shard-map read, a
//! reader Role client pods can be bound to, and (when the service elects leaders) one leader
//! Lease per shard. [`crate::build`] returns them with everything else the service owns; the
//! operator applies them (not the chart) because each Role names its shard's pods, which
//! change with `shards`/`replicasPerShard`, and the account must exist in every namespace a
//! ShardedService is created in.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::ServiceAccount,
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use shardmesh_api::{labels, ShardedService};

/// `app.kubernetes.io/component` of the access objects.
const COMPONENT_ACCESS: &str = "access";
/// `app.kubernetes.io/component` of the leader Leases.
const COMPONENT_LEADER: &str = "leader";

/// The access objects of one service: per shard, an account for its pods with a Role naming
/// only that shard's pods and leader Lease (so no object grows with the service's pod count,
/// and a pod cannot touch another shard's Leases), and one reader Role.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Access {
    /// Per shard (by index): the member ServiceAccount, its Role and the RoleBinding.
    pub shards: Vec<ShardAccess>,
    /// What client pods bound to it may do: read the map.
    pub reader_role: Role,
}

/// What the pods of one shard run as and may do.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardAccess {
    /// The shard's pods' ServiceAccount.
    pub account: ServiceAccount,
    /// Their own Leases, their shard's leader Lease, the map.
    pub role: Role,
    /// Binds the Role to the ServiceAccount.
    pub binding: RoleBinding,
}

/// Metadata of an object the operator owns for `service`, labelled with its component.
pub(crate) fn meta(
    name: String,
    ns: &str,
    service: &str,
    owner: &OwnerReference,
    component: &str,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(ns.to_string()),
        labels: Some(BTreeMap::from([
            (labels::SERVICE.to_string(), service.to_string()),
            (
                labels::MANAGED_BY.to_string(),
                labels::MANAGED_BY_VALUE.to_string(),
            ),
            (labels::COMPONENT.to_string(), component.to_string()),
        ])),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// The per-shard leader Leases of a service that elects leaders (none otherwise). The operator
/// creates them, owned by the ShardedService, so they outlive every pod: their transition count
/// is the fencing epoch and must never restart. Only metadata is applied; the sidecars write
/// the spec.
pub fn leader_leases(
    svc: &ShardedService,
    name: &str,
    ns: &str,
    owner: &OwnerReference,
    shards: u32,
) -> Vec<Lease> {
    if !svc.spec.leader_election.enabled {
        return Vec::new();
    }
    (0..shards)
        .map(|i| {
            let mut m = meta(
                labels::leader_lease_name(name, i),
                ns,
                name,
                owner,
                COMPONENT_LEADER,
            );
            let l = m.labels.get_or_insert_with(BTreeMap::new);
            l.insert(labels::SHARD.to_string(), i.to_string());
            l.insert(
                labels::LEASE_ROLE.to_string(),
                labels::LEASE_ROLE_LEADER.to_string(),
            );
            Lease {
                metadata: m,
                spec: None,
            }
        })
        .collect()
}

fn rule(group: &str, resource: &str, verbs: &[&str], names: Option<Vec<String>>) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_string()]),
        resources: Some(vec![resource.to_string()]),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        resource_names: names,
        ..PolicyRule::default()
    }
}

/// Access objects of a service: per shard with workloads, the member ServiceAccount, its Role
/// and RoleBinding; and the reader Role for client pods.
///
/// A member Role allows `create` on Leases without a name restriction (Kubernetes cannot
/// restrict creation by name), `get`/`update`/`delete` only of the Leases named after its
/// shard's pods, `get`/`update` of its shard's leader Lease, and reading the shard map's slices
/// by label (see [`labels::shardmap_reader_name`]). `shards` is the number of shards with
/// workloads (see [`crate::reshard::workload_shards`]): removed shards keep renewing their
/// Leases while they serve handoff reads.
pub fn access(
    svc: &ShardedService,
    name: &str,
    ns: &str,
    owner: &OwnerReference,
    shards: u32,
) -> Access {
    let replicas = u32::try_from(svc.spec.replicas_per_shard).unwrap_or(0);
    let read_map = rule(
        labels::GROUP,
        "shardmapslices",
        &["get", "list", "watch"],
        None,
    );
    let shard_meta = |n: String, shard: u32| {
        let mut m = meta(n, ns, name, owner, COMPONENT_ACCESS);
        m.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(labels::SHARD.to_string(), shard.to_string());
        m
    };
    let per_shard = (0..shards)
        .map(|shard| {
            let account = labels::member_account_name(name, shard);
            let pods = (0..replicas)
                .map(|r| format!("{}-{r}", labels::shard_object_name(name, shard)))
                .collect();
            let mut rules = vec![
                rule("coordination.k8s.io", "leases", &["create"], None),
                rule(
                    "coordination.k8s.io",
                    "leases",
                    &["get", "update", "delete"],
                    Some(pods),
                ),
                read_map.clone(),
            ];
            if svc.spec.leader_election.enabled {
                // Contend for and renew the shard's leader Lease; never delete it (the
                // transition count is the fencing epoch).
                rules.push(rule(
                    "coordination.k8s.io",
                    "leases",
                    &["get", "update"],
                    Some(vec![labels::leader_lease_name(name, shard)]),
                ));
            }
            ShardAccess {
                account: ServiceAccount {
                    metadata: shard_meta(account.clone(), shard),
                    ..ServiceAccount::default()
                },
                role: Role {
                    metadata: shard_meta(account.clone(), shard),
                    rules: Some(rules),
                },
                binding: RoleBinding {
                    metadata: shard_meta(account.clone(), shard),
                    role_ref: RoleRef {
                        api_group: "rbac.authorization.k8s.io".into(),
                        kind: "Role".into(),
                        name: account.clone(),
                    },
                    subjects: Some(vec![Subject {
                        kind: "ServiceAccount".into(),
                        name: account,
                        namespace: Some(ns.to_string()),
                        ..Subject::default()
                    }]),
                },
            }
        })
        .collect();
    let reader_role = Role {
        metadata: meta(
            labels::shardmap_reader_name(name),
            ns,
            name,
            owner,
            COMPONENT_ACCESS,
        ),
        rules: Some(vec![read_map]),
    };
    Access {
        shards: per_shard,
        reader_role,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shardmap::tests::svc;
    use kube::{Resource, ResourceExt};

    fn access_of(s: &ShardedService, shards: u32) -> Access {
        let owner = s.controller_owner_ref(&()).unwrap();
        access(s, "orders", "shop", &owner, shards)
    }

    fn leader_leases_of(s: &ShardedService, shards: u32) -> Vec<Lease> {
        let owner = s.controller_owner_ref(&()).unwrap();
        leader_leases(s, "orders", "shop", &owner, shards)
    }

    #[test]
    fn leader_leases_and_rights_only_when_enabled() {
        assert!(leader_leases_of(&svc(), 2).is_empty());
        let member = access_of(&svc(), 2).shards[0].role.clone();
        assert_eq!(member.rules.unwrap().len(), 3);
        let mut s = svc();
        s.spec.leader_election.enabled = true;
        let leases = leader_leases_of(&s, 2);
        let names: Vec<_> = leases.iter().map(|l| l.name_any()).collect();
        assert_eq!(names, ["orders-0-leader", "orders-1-leader"]);
        assert_eq!(leases[1].labels()[labels::SHARD], "1");
        assert_eq!(leases[1].labels()[labels::LEASE_ROLE], "leader");
        assert_eq!(leases[1].labels()[labels::SERVICE], "orders");
        assert_eq!(
            leases[1].metadata.owner_references.as_ref().unwrap()[0].uid,
            "u-1"
        );
        assert!(leases[1].spec.is_none(), "the sidecars own the spec");
        // Each shard's pods contend for their own shard's leader Lease only.
        let a = access_of(&s, 2);
        for (i, shard) in a.shards.iter().enumerate() {
            let rules = shard.role.rules.clone().unwrap();
            assert_eq!(rules[3].verbs, vec!["get", "update"]);
            assert_eq!(
                rules[3].resource_names.as_deref().unwrap(),
                [format!("orders-{i}-leader")]
            );
        }
    }

    #[test]
    fn each_shard_runs_as_its_own_account_naming_only_its_pods() {
        let Access {
            shards,
            reader_role: reader,
        } = access_of(&svc(), 2);
        assert_eq!(shards.len(), 2);
        for (
            i,
            ShardAccess {
                account,
                role,
                binding,
            },
        ) in shards.into_iter().enumerate()
        {
            let name = format!("orders-{i}-member");
            assert_eq!(account.metadata.name.as_deref(), Some(name.as_str()));
            assert_eq!(account.labels()[labels::SHARD], i.to_string());
            let rules = role.rules.unwrap();
            assert_eq!(rules[0].verbs, vec!["create"]);
            assert_eq!(rules[0].resource_names, None);
            assert_eq!(
                rules[1].resource_names.as_deref().unwrap(),
                [format!("orders-{i}-0"), format!("orders-{i}-1")]
            );
            assert_eq!(rules[1].verbs, vec!["get", "update", "delete"]);
            // The map's slices: read by the service's label, so by no name.
            assert_eq!(
                (
                    rules[2].resources.as_deref().unwrap(),
                    rules[2].resource_names.as_ref()
                ),
                (&["shardmapslices".to_string()][..], None)
            );
            assert_eq!(rules[2].api_groups.as_deref().unwrap(), ["shardmesh.io"]);
            assert_eq!(reader.rules.as_deref().unwrap(), [rules[2].clone()]);
            assert_eq!(binding.role_ref.name, name);
            let subject = &binding.subjects.unwrap()[0];
            assert_eq!(
                (subject.name.as_str(), subject.namespace.as_deref()),
                (name.as_str(), Some("shop"))
            );
        }
    }

    /// Every access object of a service at the CRD's maximum (1,024 shards of 100 replicas,
    /// leaders elected, a long name) is far below the 1 MiB an object may take: none names more
    /// than one shard's pods.
    #[test]
    fn every_access_object_fits_at_the_crds_maximum() {
        let mut s = svc();
        s.spec.replicas_per_shard = 100;
        s.spec.leader_election.enabled = true;
        let owner = s.controller_owner_ref(&()).unwrap();
        let name = "a".repeat(40);
        let a = access(
            &s,
            &name,
            "shop",
            &owner,
            shardmesh_api::shardmap::MAX_SHARDS,
        );
        assert_eq!(a.shards.len(), 1024);
        let largest = a
            .shards
            .iter()
            .flat_map(|x| [bytes(&x.account), bytes(&x.role), bytes(&x.binding)])
            .chain([bytes(&a.reader_role)])
            .max()
            .unwrap();
        assert!(largest < 8 * 1024, "largest access object: {largest} bytes");
    }

    /// Serialized size of an object.
    fn bytes<T: serde::Serialize>(o: &T) -> usize {
        serde_json::to_vec(o).map_or(usize::MAX, |v| v.len())
    }
}
