//! Pure builders: a validated `ShardedService` → the objects that should exist. No client, no
//! I/O, so every shape is unit-tested without a cluster.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{
            RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetSpec,
            StatefulSetUpdateStrategy,
        },
        coordination::v1::Lease,
        core::v1::{
            EnvVar, EnvVarSource, ObjectFieldSelector, PodTemplateSpec, Service, ServicePort,
            ServiceSpec,
        },
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::{Resource, ResourceExt};
use shardmesh_api::{labels, ports, ShardedService};

use crate::{
    access::{self, Access},
    capabilities::Capabilities,
    placement, rollout,
    webhook::annotations,
    Error, Result,
};

/// Env vars the operator sets on every application container so the app knows its place.
pub mod env {
    /// Name of the ShardedService.
    pub const SERVICE: &str = "SHARDMESH_SERVICE";
    /// Shard index of the pod.
    pub const SHARD: &str = "SHARDMESH_SHARD";
    /// Number of shards when the pod's StatefulSet was created: the initial view only. It
    /// never changes afterwards (changing it would restart the shard), so an app decides key
    /// ownership per request from `x-shardmesh-shards`, which the sidecar sets.
    pub const SHARDS: &str = "SHARDMESH_SHARDS";
    /// Pod name (downward API).
    pub const POD_NAME: &str = "POD_NAME";
    /// Pod namespace (downward API).
    pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
    /// Pod IP (downward API).
    pub const POD_IP: &str = "POD_IP";
    /// Pod UID (downward API): owner of the sidecar's registry Lease.
    pub const POD_UID: &str = "POD_UID";
}

/// Everything one ShardedService owns, but for the content of its shard map (membership, which
/// [`crate::shardmap`] publishes).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    /// One StatefulSet per shard, index order.
    pub stateful_sets: Vec<StatefulSet>,
    /// One headless Service per shard (stable pod DNS, per-shard discovery).
    pub shard_services: Vec<Service>,
    /// The Service spanning every shard.
    pub routing_service: Service,
    /// One PodDisruptionBudget per shard, in the `policy/v1` shape whichever API the server
    /// serves (see [`crate::disruption`]); empty when it serves none.
    pub disruption_budgets: Vec<PodDisruptionBudget>,
    /// The pods' ServiceAccount and Roles (see [`crate::access`]).
    pub access: Access,
    /// One leader Lease per shard when the service elects leaders.
    pub leader_leases: Vec<Lease>,
}

/// Operator settings that change the built objects (as opposed to what the server offers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildOptions {
    /// The sidecar is injected into every shard pod (the chart enables the webhook): Services
    /// then target the sidecar's inbound port so traffic gets its bulkhead and access log. Off,
    /// they target the application port directly, which also keeps clusters without the
    /// webhook working.
    pub sidecar_injection: bool,
}

/// Which shards have workloads, and what their pods were first told.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workloads {
    /// Shards with workloads: `spec.shards`, or more while removed shards serve handoff reads
    /// (see `reshard::workload_shards`).
    pub shards: u32,
    /// `SHARDMESH_SHARDS` of existing StatefulSets by shard index, kept as they are so that a
    /// change of the shard count never restarts a shard; new ones get `spec.shards`.
    pub initial_shards: BTreeMap<u32, String>,
    /// Shards held back by the rollout (see [`crate::rollout`]), with the revision each was
    /// last released for. The others are released for the current template.
    pub held: BTreeMap<u32, Option<String>>,
}

impl Workloads {
    /// The workloads of a spec with no existing StatefulSets.
    pub fn of(svc: &ShardedService) -> Self {
        Workloads {
            shards: u32::try_from(svc.spec.shards).unwrap_or(0),
            initial_shards: BTreeMap::new(),
            held: BTreeMap::new(),
        }
    }

    /// `SHARDMESH_SHARDS` of an existing StatefulSet's first container, if set.
    pub fn initial_of(sts: &StatefulSet) -> Option<String> {
        sts.spec
            .as_ref()?
            .template
            .spec
            .as_ref()?
            .containers
            .first()?
            .env
            .as_ref()?
            .iter()
            .find(|e| e.name == env::SHARDS)?
            .value
            .clone()
    }
}

/// The revision of the pod template every shard gets, shard identity left out: what a rollout
/// rolls. A stable hash (the routing hash) of the template's JSON, 10 hex digits.
pub fn template_revision(svc: &ShardedService) -> String {
    let name = svc.name_any();
    let tpl = pod_template(svc, &name, 0, "", labels::shard_selector(&name, 0));
    // Serializing plain data structs cannot fail.
    let bytes = serde_json::to_vec(&tpl).unwrap_or_default();
    let mut hex = format!("{:016x}", shardmesh_api::routing::key_hash(&bytes));
    hex.truncate(10);
    hex
}

/// Builds the desired objects with default options. The spec must have passed validation.
pub fn build(svc: &ShardedService, caps: &Capabilities) -> Result<Desired> {
    build_with(svc, caps, BuildOptions::default(), &Workloads::of(svc))
}

/// Builds the desired objects. The spec must have passed validation.
pub fn build_with(
    svc: &ShardedService,
    caps: &Capabilities,
    opts: BuildOptions,
    workloads: &Workloads,
) -> Result<Desired> {
    let owner = svc
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    let ns = svc
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = svc.name_any();
    let shards = workloads.shards;
    let revision = template_revision(svc);
    let mut desired = Desired {
        routing_service: routing_service(svc, &name, &ns, &owner, opts),
        access: access::access(svc, &name, &ns, &owner, shards),
        leader_leases: access::leader_leases(svc, &name, &ns, &owner, shards),
        ..Desired::default()
    };
    for i in 0..shards {
        desired.stateful_sets.push(stateful_set(
            svc, &name, &ns, &owner, i, workloads, &revision,
        ));
        desired
            .shard_services
            .push(shard_service(svc, &name, &ns, &owner, i, opts));
        if caps.pdb.is_some() {
            desired
                .disruption_budgets
                .push(disruption_budget(svc, &name, &ns, &owner, i));
        }
    }
    Ok(desired)
}

fn meta(
    name: String,
    ns: &str,
    owner: &OwnerReference,
    labels: BTreeMap<String, String>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(ns.to_string()),
        labels: Some(labels),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

fn object_labels(selector: BTreeMap<String, String>, component: &str) -> BTreeMap<String, String> {
    let mut l = selector;
    l.insert(labels::MANAGED_BY.into(), labels::MANAGED_BY_VALUE.into());
    l.insert(labels::COMPONENT.into(), component.into());
    l
}

fn http_port(svc: &ShardedService, opts: BuildOptions) -> ServicePort {
    let target = if opts.sidecar_injection {
        i32::from(ports::SIDECAR_INBOUND)
    } else {
        svc.spec.port
    };
    ServicePort {
        name: Some("http".into()),
        port: svc.spec.port,
        target_port: Some(IntOrString::Int(target)),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

fn routing_service(
    svc: &ShardedService,
    name: &str,
    ns: &str,
    owner: &OwnerReference,
    opts: BuildOptions,
) -> Service {
    Service {
        metadata: meta(
            name.to_string(),
            ns,
            owner,
            object_labels(labels::service_selector(name), "routing"),
        ),
        spec: Some(ServiceSpec {
            selector: Some(labels::service_selector(name)),
            ports: Some(vec![http_port(svc, opts)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn shard_service(
    svc: &ShardedService,
    name: &str,
    ns: &str,
    owner: &OwnerReference,
    shard: u32,
    opts: BuildOptions,
) -> Service {
    Service {
        metadata: meta(
            labels::shard_object_name(name, shard),
            ns,
            owner,
            object_labels(labels::shard_selector(name, shard), "shard"),
        ),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(labels::shard_selector(name, shard)),
            ports: Some(vec![http_port(svc, opts)]),
            // Fields left at their API default stay unset: the server stores `false` as absent,
            // so applying it would make every apply a change (a new managedFields time, a
            // watch event, another reconcile: a loop).
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn disruption_budget(
    svc: &ShardedService,
    name: &str,
    ns: &str,
    owner: &OwnerReference,
    shard: u32,
) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(
            labels::shard_object_name(name, shard),
            ns,
            owner,
            object_labels(labels::shard_selector(name, shard), "shard"),
        ),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(svc.spec.rollout.max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(labels::shard_selector(name, shard)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

fn stateful_set(
    svc: &ShardedService,
    name: &str,
    ns: &str,
    owner: &OwnerReference,
    shard: u32,
    workloads: &Workloads,
    revision: &str,
) -> StatefulSet {
    let selector = labels::shard_selector(name, shard);
    let initial = workloads
        .initial_shards
        .get(&shard)
        .cloned()
        .unwrap_or_else(|| svc.spec.shards.to_string());
    // Held: partition = replicas keeps every pod on its current revision; released: the
    // StatefulSet replaces its pods one by one.
    let (released_for, partition) = match workloads.held.get(&shard) {
        Some(prev) => (prev.clone(), svc.spec.replicas_per_shard),
        None => (Some(revision.to_string()), 0),
    };
    let mut notes = BTreeMap::from([(rollout::TEMPLATE.to_string(), revision.to_string())]);
    if let Some(r) = released_for {
        notes.insert(rollout::RELEASED.into(), r);
    }
    StatefulSet {
        metadata: ObjectMeta {
            annotations: Some(notes),
            ..meta(
                labels::shard_object_name(name, shard),
                ns,
                owner,
                object_labels(selector.clone(), "shard"),
            )
        },
        spec: Some(StatefulSetSpec {
            replicas: Some(svc.spec.replicas_per_shard),
            service_name: Some(labels::shard_object_name(name, shard)),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            pod_management_policy: Some(svc.spec.rollout.pod_management_policy.as_str().into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateStatefulSetStrategy {
                    partition: Some(partition),
                    ..RollingUpdateStatefulSetStrategy::default()
                }),
            }),
            template: pod_template(svc, name, shard, &initial, selector),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

/// The user's template with our labels, the shard's topology spread constraints (see
/// [`placement`]), the injector's annotations (app port and resilience policy, so the webhook
/// needs no API call per pod) and the identity env vars added to every container.
fn pod_template(
    svc: &ShardedService,
    name: &str,
    shard: u32,
    initial_shards: &str,
    selector: BTreeMap<String, String>,
) -> PodTemplateSpec {
    let mut tpl = svc.spec.template.pod().clone();
    if let Some(spec) = tpl.spec.as_mut() {
        let own = spec.topology_spread_constraints.take().unwrap_or_default();
        let merged = placement::merge(&svc.spec.placement, &own, &selector);
        // A template without constraints and nothing requested stays without the field.
        spec.topology_spread_constraints =
            (!merged.constraints.is_empty()).then_some(merged.constraints);
    }
    let meta = tpl.metadata.get_or_insert_with(ObjectMeta::default);
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .extend(selector);
    let notes = meta.annotations.get_or_insert_with(BTreeMap::new);
    notes.insert(annotations::APP_PORT.into(), svc.spec.port.to_string());
    // Serializing plain data structs cannot fail; an empty policy would mean the defaults.
    let policy = serde_json::to_string(&svc.spec.resilience).unwrap_or_default();
    notes.insert(annotations::RESILIENCE.into(), policy);
    if svc.spec.leader_election.enabled {
        notes.insert(
            annotations::LEADER_LEASE.into(),
            svc.spec.leader_election.lease_duration.to_string(),
        );
    }
    let identity = [
        literal(env::SERVICE, name),
        literal(env::SHARD, &shard.to_string()),
        literal(env::SHARDS, initial_shards),
        field(env::POD_NAME, "metadata.name"),
        field(env::POD_NAMESPACE, "metadata.namespace"),
        field(env::POD_IP, "status.podIP"),
        field(env::POD_UID, "metadata.uid"),
    ];
    if let Some(spec) = tpl.spec.as_mut() {
        // The member account may write exactly this service's Leases and read its shard map
        // (see shardmap.rs); a template naming its own account keeps it (and must grant that).
        spec.service_account_name
            .get_or_insert_with(|| labels::member_account_name(name, shard));
        for c in &mut spec.containers {
            let env = c.env.get_or_insert_with(Vec::new);
            for var in &identity {
                match env.iter_mut().find(|e| e.name == var.name) {
                    // SHARDMESH_* are authoritative; the pod identity vars the user may redefine.
                    Some(existing) if var.name.starts_with("SHARDMESH_") => *existing = var.clone(),
                    Some(_) => {}
                    None => env.push(var.clone()),
                }
            }
        }
    }
    tpl
}

fn literal(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(shards: i32, replicas: i32) -> ShardedService {
        serde_json::from_value(json!({
            "apiVersion": "shardmesh.io/v1alpha1",
            "kind": "ShardedService",
            "metadata": {"name": "orders", "namespace": "shop", "uid": "u-1"},
            "spec": {
                "shards": shards, "replicasPerShard": replicas, "port": 8080,
                "template": {
                    "metadata": {"labels": {"app": "orders"}},
                    "spec": {"containers": [
                        {"name": "app", "image": "demo:1", "env": [{"name": "POD_NAME", "value": "mine"}]},
                        {"name": "helper", "image": "helper:1"}
                    ]}
                }
            }
        }))
        .expect("fixture")
    }

    #[test]
    fn four_by_three() {
        let d = build(&svc(4, 3), &Capabilities::latest()).expect("builds");
        assert_eq!(d.stateful_sets.len(), 4);
        assert_eq!(d.shard_services.len(), 4);
        assert_eq!(d.disruption_budgets.len(), 4);
        for (i, sts) in d.stateful_sets.iter().enumerate() {
            let spec = sts.spec.as_ref().expect("spec");
            assert_eq!(
                sts.metadata.name.as_deref(),
                Some(format!("orders-{i}").as_str())
            );
            assert_eq!(spec.replicas, Some(3));
            let sel = spec.selector.match_labels.as_ref().expect("selector");
            assert_eq!(sel["shardmesh.io/service"], "orders");
            assert_eq!(sel["shardmesh.io/shard"], i.to_string());
            // The template's labels are a superset of the selector (else the API rejects it).
            let tl = spec
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.as_ref())
                .expect("labels");
            assert!(sel.iter().all(|(k, v)| tl.get(k) == Some(v)));
            assert_eq!(tl["app"], "orders");
            assert_eq!(
                spec.service_name.as_deref(),
                Some(format!("orders-{i}").as_str())
            );
            let owner = &sts.metadata.owner_references.as_ref().expect("owner")[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
                ("ShardedService", "orders", "u-1")
            );
            assert_eq!(owner.controller, Some(true));
        }
        for (i, s) in d.shard_services.iter().enumerate() {
            let spec = s.spec.as_ref().expect("spec");
            assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
            assert_eq!(
                spec.publish_not_ready_addresses, None,
                "API default: leave unset"
            );
            assert_eq!(
                spec.selector.as_ref().expect("sel")["shardmesh.io/shard"],
                i.to_string()
            );
        }
        let routing = d.routing_service.spec.as_ref().expect("spec");
        assert_eq!(routing.selector, Some(labels::service_selector("orders")));
        assert_eq!(routing.ports.as_ref().expect("ports")[0].port, 8080);
        for (i, p) in d.disruption_budgets.iter().enumerate() {
            let spec = p.spec.as_ref().expect("spec");
            assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
            assert_eq!(
                spec.selector.as_ref().and_then(|s| s.match_labels.clone()),
                Some(labels::shard_selector("orders", i as u32))
            );
        }
    }

    #[test]
    fn identity_env_on_every_container() {
        let d = build(&svc(2, 1), &Capabilities::latest()).expect("builds");
        let pod = d.stateful_sets[1]
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.clone())
            .expect("pod");
        for c in &pod.containers {
            let env = c.env.as_ref().expect("env");
            let get = |n: &str| env.iter().find(|e| e.name == n).cloned().expect(n);
            assert_eq!(get(env::SHARD).value.as_deref(), Some("1"));
            assert_eq!(get(env::SHARDS).value.as_deref(), Some("2"));
            assert_eq!(get(env::SERVICE).value.as_deref(), Some("orders"));
            assert_eq!(env.iter().filter(|e| e.name == env::POD_NAME).count(), 1);
        }
        // A user-defined POD_NAME is kept.
        let app = &pod.containers[0];
        let pn = app
            .env
            .as_ref()
            .and_then(|e| e.iter().find(|e| e.name == env::POD_NAME))
            .expect("POD_NAME");
        assert_eq!(pn.value.as_deref(), Some("mine"));
    }

    #[test]
    fn replicas_change_only_changes_replicas() {
        let caps = Capabilities::latest();
        let a = build(&svc(4, 3), &caps).expect("a");
        let b = build(&svc(4, 5), &caps).expect("b");
        let mut a2 = a.clone();
        for sts in &mut a2.stateful_sets {
            sts.spec.as_mut().expect("spec").replicas = Some(5);
        }
        // Each member Role names its shard's pods, so it grows with the replicas too.
        assert_eq!(
            b.access.shards[0].role.rules.as_ref().expect("rules")[1]
                .resource_names
                .as_ref()
                .map(Vec::len),
            Some(5)
        );
        a2.access = b.access.clone();
        assert_eq!(a2, b);
    }

    #[test]
    fn services_target_the_sidecar_only_with_injection() {
        let caps = Capabilities::latest();
        let target = |d: &Desired| {
            d.shard_services
                .iter()
                .chain([&d.routing_service])
                .map(|s| {
                    s.spec
                        .as_ref()
                        .and_then(|s| s.ports.clone())
                        .expect("ports")[0]
                        .clone()
                })
                .map(|p| (p.port, p.target_port))
                .collect::<Vec<_>>()
        };
        let plain = build(&svc(2, 1), &caps).expect("builds");
        assert!(target(&plain)
            .iter()
            .all(|t| *t == (8080, Some(IntOrString::Int(8080)))));
        let opts = BuildOptions {
            sidecar_injection: true,
        };
        let s = svc(2, 1);
        let injected = build_with(&s, &caps, opts, &Workloads::of(&s)).expect("builds");
        assert!(target(&injected)
            .iter()
            .all(|t| *t == (8080, Some(IntOrString::Int(4143)))));
        // Only the Services differ: the pods are the same either way.
        assert_eq!(plain.stateful_sets, injected.stateful_sets);
    }

    #[test]
    fn template_tells_the_injector_port_and_policy() {
        let mut s = svc(1, 1);
        s.spec.resilience.retries.max_attempts = 5;
        let d = build(&s, &Capabilities::latest()).expect("builds");
        let notes = d.stateful_sets[0]
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.clone())
            .expect("annotations");
        assert_eq!(notes[annotations::APP_PORT], "8080");
        let policy: shardmesh_api::v1alpha1::Resilience =
            serde_json::from_str(&notes[annotations::RESILIENCE]).expect("policy JSON");
        assert_eq!(policy, s.spec.resilience);
        assert!(!notes.contains_key(annotations::LEADER_LEASE));
        s.spec.leader_election.enabled = true;
        s.spec.leader_election.lease_duration = "20s".into();
        let d = build(&s, &Capabilities::latest()).expect("builds");
        let notes = d.stateful_sets[0]
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.clone())
            .expect("annotations");
        assert_eq!(notes[annotations::LEADER_LEASE], "20s");
    }

    fn spread(s: &StatefulSet) -> Vec<k8s_openapi::api::core::v1::TopologySpreadConstraint> {
        s.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.topology_spread_constraints.clone())
            .unwrap_or_default()
    }

    #[test]
    fn every_shard_spreads_its_own_pods_over_nodes() {
        let d = build(&svc(3, 2), &Capabilities::latest()).expect("builds");
        for (i, sts) in d.stateful_sets.iter().enumerate() {
            let cs = spread(sts);
            assert_eq!(cs.len(), 1, "{cs:?}");
            assert_eq!(cs[0].topology_key, placement::HOSTNAME);
            assert_eq!(cs[0].when_unsatisfiable, "DoNotSchedule");
            assert_eq!(
                cs[0]
                    .label_selector
                    .as_ref()
                    .and_then(|l| l.match_labels.clone()),
                Some(labels::shard_selector("orders", i as u32))
            );
        }
        // Placement is part of the template: changing it rolls the pods (spreading only
        // applies when a pod is scheduled).
        let mut soft = svc(3, 2);
        soft.spec.placement.spread = shardmesh_api::v1alpha1::Spread::Soft;
        assert_ne!(template_revision(&soft), template_revision(&svc(3, 2)));
        let mut off = svc(3, 2);
        off.spec.placement.spread = shardmesh_api::v1alpha1::Spread::Disabled;
        let d = build(&off, &Capabilities::latest()).expect("builds");
        assert!(d.stateful_sets.iter().all(|s| spread(s).is_empty()));
    }

    #[test]
    fn the_templates_own_spread_constraint_is_kept() {
        let mut s = svc(2, 2);
        let mut pod = s.spec.template.pod().clone();
        let own = k8s_openapi::api::core::v1::TopologySpreadConstraint {
            topology_key: placement::HOSTNAME.into(),
            max_skew: 2,
            when_unsatisfiable: "ScheduleAnyway".into(),
            ..Default::default()
        };
        if let Some(p) = pod.spec.as_mut() {
            p.topology_spread_constraints = Some(vec![own.clone()]);
        }
        s.spec.template = pod.into();
        let d = build(&s, &Capabilities::latest()).expect("builds");
        for sts in &d.stateful_sets {
            assert_eq!(spread(sts), vec![own.clone()]);
        }
        assert_eq!(placement::notes(&s).len(), 1);
    }

    #[test]
    fn budgets_are_the_same_for_either_policy_api() {
        use crate::disruption::{PdbApi, PodDisruptionBudgetV1beta1};
        let v1 = build(&svc(3, 2), &Capabilities::latest()).expect("builds");
        let caps = Capabilities {
            pdb: Some(PdbApi::V1beta1),
            ..Capabilities::latest()
        };
        let beta = build(&svc(3, 2), &caps).expect("builds");
        assert_eq!(beta.disruption_budgets.len(), 3);
        assert_eq!(v1.disruption_budgets, beta.disruption_budgets);
        for (i, p) in beta.disruption_budgets.iter().enumerate() {
            let v1_json = serde_json::to_value(p).expect("json");
            let json = serde_json::to_value(PodDisruptionBudgetV1beta1::from(p)).expect("json");
            assert_eq!(v1_json["apiVersion"], "policy/v1");
            assert_eq!(json["apiVersion"], "policy/v1beta1");
            assert_eq!(json["kind"], "PodDisruptionBudget");
            assert_eq!(json["metadata"], v1_json["metadata"]);
            assert_eq!(json["spec"], v1_json["spec"]);
            assert_eq!(json["metadata"]["name"], format!("orders-{i}"));
            assert_eq!(json["metadata"]["ownerReferences"][0]["uid"], "u-1");
            assert_eq!(json["spec"]["maxUnavailable"], 1);
            assert_eq!(
                json["spec"]["selector"]["matchLabels"]["shardmesh.io/shard"],
                i.to_string()
            );
        }
    }

    #[test]
    fn no_pdb_without_a_policy_api() {
        let caps = Capabilities {
            pdb: None,
            ..Capabilities::latest()
        };
        let d = build(&svc(3, 2), &caps).expect("builds");
        assert!(d.disruption_budgets.is_empty());
        assert_eq!(d.stateful_sets.len(), 3);
    }

    #[test]
    fn shards_added_keep_existing_ones_identical() {
        let caps = Capabilities::latest();
        let a = build(&svc(3, 2), &caps).expect("a");
        // What the reconciler reads back from the existing StatefulSets.
        let grown = svc(4, 2);
        let workloads = Workloads {
            shards: 4,
            initial_shards: a
                .stateful_sets
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some((i as u32, Workloads::initial_of(s)?)))
                .collect(),
            ..Workloads::default()
        };
        assert_eq!(workloads.initial_shards.len(), 3);
        let b = build_with(&grown, &caps, BuildOptions::default(), &workloads).expect("b");
        assert_eq!(b.stateful_sets.len(), 4);
        // Existing shards are byte-for-byte the same objects: adding a shard restarts none.
        assert_eq!(&a.stateful_sets[..], &b.stateful_sets[..3]);
        assert_eq!(
            Workloads::initial_of(&b.stateful_sets[3]).as_deref(),
            Some("4")
        );
        // Removed shards keep their workloads while a published map still lists them.
        let shrunk = svc(3, 2);
        let draining = Workloads {
            shards: 4,
            initial_shards: b
                .stateful_sets
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some((i as u32, Workloads::initial_of(s)?)))
                .collect(),
            ..Workloads::default()
        };
        let c = build_with(&shrunk, &caps, BuildOptions::default(), &draining).expect("c");
        assert_eq!(c.stateful_sets.len(), 4);
        assert_eq!(&b.stateful_sets[..], &c.stateful_sets[..]);
    }

    fn partition(s: &StatefulSet) -> Option<i32> {
        s.spec
            .as_ref()?
            .update_strategy
            .as_ref()?
            .rolling_update
            .as_ref()?
            .partition
    }

    fn note<'a>(s: &'a StatefulSet, key: &str) -> Option<&'a str> {
        s.metadata
            .annotations
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }

    #[test]
    fn template_revision_follows_the_template_not_the_counts() {
        let base = svc(3, 2);
        let rev = template_revision(&base);
        assert_eq!(rev.len(), 10);
        assert_eq!(
            template_revision(&svc(5, 3)),
            rev,
            "counts are not the template"
        );
        let mut image = svc(3, 2);
        let mut pod = image.spec.template.pod().clone();
        if let Some(c) = pod.spec.as_mut().and_then(|s| s.containers.first_mut()) {
            c.image = Some("example/app:2".into());
        }
        image.spec.template = pod.into();
        assert_ne!(template_revision(&image), rev);
        let mut policy = svc(3, 2);
        policy.spec.resilience.concurrency.max_in_flight = 7;
        assert_ne!(
            template_revision(&policy),
            rev,
            "the sidecar policy restarts pods too"
        );
    }

    #[test]
    fn held_shards_keep_their_pods_and_their_release_marker() {
        let caps = Capabilities::latest();
        let s = svc(3, 2);
        let rev = template_revision(&s);
        let workloads = Workloads {
            shards: 3,
            held: BTreeMap::from([(1, Some("0123456789".to_string())), (2, None)]),
            ..Workloads::default()
        };
        let d = build_with(&s, &caps, BuildOptions::default(), &workloads).expect("build");
        let sts = &d.stateful_sets;
        assert_eq!(partition(&sts[0]), Some(0));
        assert_eq!(note(&sts[0], rollout::RELEASED), Some(rev.as_str()));
        assert_eq!(
            partition(&sts[1]),
            Some(2),
            "partition = replicas holds every pod"
        );
        assert_eq!(note(&sts[1], rollout::RELEASED), Some("0123456789"));
        assert_eq!(note(&sts[2], rollout::RELEASED), None);
        for s in sts {
            // Every shard carries the current template; only the partition differs.
            assert_eq!(note(s, rollout::TEMPLATE), Some(rev.as_str()));
            assert_eq!(
                s.spec.as_ref().map(|x| x.template.spec.is_some()),
                Some(true)
            );
        }
    }
}
