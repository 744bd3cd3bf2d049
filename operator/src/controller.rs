//! The reconcile loop: validate → build → server-side apply → status, wired into a kube-runtime
//! Controller that wakes on spec changes (not on its own status writes) and on changes of the
//! objects it owns.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::{future::BoxFuture, FutureExt, StreamExt};
use k8s_openapi::{
    api::{
        apps::v1::StatefulSet,
        coordination::v1::Lease,
        core::v1::{ConfigMap, Pod, Service, ServiceAccount},
        policy::v1::PodDisruptionBudget,
        rbac::v1::{Role, RoleBinding},
    },
    jiff::Timestamp,
};
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams},
    core::PartialObjectMeta,
    runtime::{
        controller::{self, Action, Controller},
        events::Recorder,
        predicates,
        reflector::{self, ObjectRef, Store},
        watcher, WatchStreamExt,
    },
    Api, Client, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use shardmesh_api::{labels, validate, ShardedService, ShardedServiceStatus};
use tracing::{info, instrument, warn};

use crate::{
    build::{build_with, template_revision, BuildOptions, Workloads},
    cache::{self, Cache},
    capabilities::Capabilities,
    collision,
    disruption::{PdbApi, PodDisruptionBudgetV1beta1},
    metrics::Metrics,
    placement, reshard, rollout,
    runtime::{self, Failures},
    scope::{self, Scope},
    status::{self, InvalidReason, Observed},
    Error, Result,
};

/// How often a ShardedService is looked at again when nothing changed (`--resync-period`): a
/// safety net only. Everything its build and status read is watched (its objects, pods, slices
/// and Leases), so readiness, rollouts and resharding move on events, not on this. Ready or
/// not, the period is the same: at 3,000 services that never became Ready a 30 s re-check
/// alone needed more reconciles per second than the API server answered here, and services not
/// yet built waited behind it (BENCHMARKS.md, issue 17).
pub const RESYNC: Duration = Duration::from_secs(300);
/// Next look at a service whose shard-map slices were caught mid-write (normally the slice
/// watch triggers one sooner).
const LAYOUT_BEING_WRITTEN: Duration = Duration::from_secs(2);
/// How long a burst of events for one ShardedService (its objects appearing one by one at
/// creation) is collected into one reconcile.
const DEBOUNCE: Duration = Duration::from_millis(500);
/// Reconciles in flight at once; the others wait their turn in the controller's queue.
const CONCURRENCY: u16 = 16;

/// State shared by all reconciles.
pub struct Context {
    /// API client.
    pub client: Client,
    /// What the server offers.
    pub caps: Capabilities,
    /// Publishes Events on ShardedServices.
    pub recorder: Recorder,
    /// What the operator's flags set: the built objects' shape and the resync period.
    pub settings: Settings,
    /// Reconcile counters and durations for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Every ShardedService (the controller's reflector), for name collisions.
    services: Store<ShardedService>,
    /// The metadata of the objects the services own, as watched: what is already applied.
    owned: Owned,
    /// Consecutive failures per object, for exponential backoff.
    failures: Failures,
}

/// Watched metadata (trimmed, see [`runtime::trim`]) of every kind a ShardedService owns
/// besides its StatefulSets (read with the reconcile's own list) and its shard map (written by
/// the shard-map controller). Stores that are never filled read as "not applied yet".
#[derive(Clone, Default)]
pub struct Owned {
    /// Shard and routing Services.
    pub services: Option<Cache<Service>>,
    /// `policy/v1` budgets.
    pub budgets: Option<Cache<PodDisruptionBudget>>,
    /// `policy/v1beta1` budgets.
    pub budgets_v1beta1: Option<Cache<PodDisruptionBudgetV1beta1>>,
    /// Member ServiceAccounts.
    pub accounts: Option<Cache<ServiceAccount>>,
    /// Member and reader Roles.
    pub roles: Option<Cache<Role>>,
    /// Member RoleBindings.
    pub bindings: Option<Cache<RoleBinding>>,
    /// Leader Leases.
    pub leases: Option<Cache<Lease>>,
}

impl Owned {
    /// Waits until every store has its first complete listing.
    async fn wait_until_ready(&self) -> Result<()> {
        async fn ready<K>(cache: &Option<Cache<K>>) -> Result<()>
        where
            K: Resource<DynamicType = ()> + Clone + 'static,
        {
            match cache {
                Some(c) => c
                    .wait_until_ready()
                    .await
                    .map_err(|_| Error::CacheUnavailable("owned objects")),
                None => Ok(()),
            }
        }
        ready(&self.services).await?;
        ready(&self.budgets).await?;
        ready(&self.budgets_v1beta1).await?;
        ready(&self.accounts).await?;
        ready(&self.roles).await?;
        ready(&self.bindings).await?;
        ready(&self.leases).await
    }
}

impl Context {
    /// A context reporting Events as `instance` (usually the pod name).
    pub fn new(client: Client, caps: Capabilities, instance: Option<String>) -> Self {
        let reporter = runtime::reporter(instance);
        // Until `with_services`: a store known to be empty, so a reconcile need not wait.
        let (services, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::InitDone);
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            caps,
            settings: Settings::default(),
            metrics: Arc::default(),
            services,
            owned: Owned::default(),
            failures: Failures::default(),
        }
    }

    /// The same context skipping applies the watched objects in `owned` already hold.
    pub fn with_owned(mut self, owned: Owned) -> Self {
        self.owned = owned;
        self
    }

    /// The same context judging name collisions against `services`.
    pub fn with_services(mut self, services: Store<ShardedService>) -> Self {
        self.services = services;
        self
    }

    /// The same context recording into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The same context building objects and resyncing as `settings` say.
    pub fn with_settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }
}

/// What the operator's flags set for the controller.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// What shapes the built objects.
    pub options: BuildOptions,
    /// How often each ShardedService is looked at again when nothing changed (see [`RESYNC`]).
    pub resync: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            options: BuildOptions::default(),
            resync: RESYNC,
        }
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    instance: Option<String>,
    settings: Settings,
    metrics: Arc<Metrics>,
    scope: Scope,
    shutdown: runtime::Shutdown,
) -> anyhow::Result<()> {
    let caps = Capabilities::detect(&client).await?;
    for root in scope.roots() {
        let svcs: Api<ShardedService> = scope::api(&client, &root);
        let slices: Api<shardmesh_api::shardmap::ShardMapSlice> = scope::api(&client, &root);
        let probes = [
            (
                "shardedservices",
                svcs.list_metadata(&ListParams::default().limit(1))
                    .await
                    .err(),
            ),
            (
                "shardmapslices",
                slices
                    .list_metadata(&ListParams::default().limit(1))
                    .await
                    .err(),
            ),
        ];
        for (resource, err) in probes {
            let Some(e) = err else { continue };
            let hint = match &root {
                None => "install the CRDs first: kubectl apply -f crds/".to_string(),
                Some(ns) => format!(
                    "install the CRDs first (kubectl apply -f crds/), and check the operator's \
                     Role in namespace {ns}"
                ),
            };
            anyhow::bail!("cannot list {resource}.shardmesh.io ({e}); {hint}");
        }
    }
    info!(scope = %scope.describe(), "controller started");
    // Beside it: membership Leases → one shard-map ConfigMap per service (shardmap.rs).
    let shard_maps = tokio::spawn(crate::shardmap::run(
        client.clone(),
        scope.clone(),
        instance.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    futures::future::join_all(scope.roots().into_iter().map(|root| {
        run_in(
            client.clone(),
            root,
            caps.clone(),
            instance.clone(),
            settings,
            metrics.clone(),
            shutdown.clone(),
        )
    }))
    .await;
    match shard_maps.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "shard-map controller failed"),
        Err(e) => warn!(error = %e, "shard-map controller task failed"),
    }
    info!("controller stopped");
    Ok(())
}

/// The controller over one root of the scope (every namespace, or one), with its own caches.
async fn run_in(
    client: Client,
    root: Option<String>,
    caps: Capabilities,
    instance: Option<String>,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: runtime::Shutdown,
) {
    let svcs: Api<ShardedService> = scope::api(&client, &root);
    let (reader, writer) = reflector::store();
    // Only generation changes of the ShardedService itself trigger: our status writes do not.
    let trigger = watcher(svcs, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(runtime::slim)
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    let managed = watcher::Config::default()
        .labels(&format!(
            "{}={}",
            labels::MANAGED_BY,
            labels::MANAGED_BY_VALUE
        ))
        .any_semantic();
    let services = reader.clone();
    // Owned objects wake their service; only metadata is watched (status changes included),
    // which is all the skip-unchanged check and the trigger need.
    let sts = watcher(
        scope::api::<PartialObjectMeta<StatefulSet>>(&client, &root),
        managed.clone(),
    )
    .default_backoff()
    .touched_objects();
    // The published shard map: its epoch and members are mirrored into the status.
    let maps = watcher(
        scope::api::<PartialObjectMeta<ConfigMap>>(&client, &root),
        managed.clone(),
    )
    .default_backoff()
    .touched_objects();
    let (svc_store, svc_events) =
        cache::watch::<Service>(&client, &root, managed.clone(), metrics.clone());
    let (sa_store, sa_events) =
        cache::watch::<ServiceAccount>(&client, &root, managed.clone(), metrics.clone());
    let (role_store, role_events) =
        cache::watch::<Role>(&client, &root, managed.clone(), metrics.clone());
    let (rb_store, rb_events) =
        cache::watch::<RoleBinding>(&client, &root, managed.clone(), metrics.clone());
    let leader_leases = watcher::Config::default()
        .labels(&format!(
            "{}={},{}={}",
            labels::MANAGED_BY,
            labels::MANAGED_BY_VALUE,
            labels::LEASE_ROLE,
            labels::LEASE_ROLE_LEADER
        ))
        .any_semantic();
    let (lease_store, lease_events) =
        cache::watch::<Lease>(&client, &root, leader_leases, metrics.clone());
    let mut owned = Owned {
        services: Some(svc_store),
        accounts: Some(sa_store),
        roles: Some(role_store),
        bindings: Some(rb_store),
        leases: Some(lease_store),
        ..Owned::default()
    };
    // Pods of every service (metadata only: a change of any pod's status is an event): a
    // rollout moves on, or halts, when its pods do, without polling.
    let pods = watcher(
        scope::api::<PartialObjectMeta<Pod>>(&client, &root),
        watcher::Config::default()
            .labels(labels::SERVICE)
            .any_semantic(),
    )
    .default_backoff()
    .touched_objects();
    let mut controller = Controller::for_stream(trigger, reader)
        .watches_stream(pods, |pod| {
            let svc = pod.labels().get(labels::SERVICE)?.clone();
            Some(ObjectRef::<ShardedService>::new(&svc).within(&pod.namespace()?))
        })
        .owns_stream(sts)
        .owns_stream(maps)
        .reconcile_on(svc_events)
        .reconcile_on(sa_events)
        .reconcile_on(role_events)
        .reconcile_on(rb_events)
        .reconcile_on(lease_events);
    controller = match caps.pdb {
        Some(PdbApi::V1) => {
            let (store, events) =
                cache::watch::<PodDisruptionBudget>(&client, &root, managed, metrics.clone());
            owned.budgets = Some(store);
            controller.reconcile_on(events)
        }
        Some(PdbApi::V1beta1) => {
            let (store, events) = cache::watch::<PodDisruptionBudgetV1beta1>(
                &client,
                &root,
                managed,
                metrics.clone(),
            );
            owned.budgets_v1beta1 = Some(store);
            controller.reconcile_on(events)
        }
        None => controller,
    };

    let ctx = Arc::new(
        Context::new(client, caps, instance)
            .with_settings(settings)
            .with_metrics(metrics)
            .with_services(services)
            .with_owned(owned),
    );
    controller
        .with_config(
            controller::Config::default()
                .debounce(DEBOUNCE)
                .concurrency(CONCURRENCY),
        )
        .graceful_shutdown_on(shutdown)
        .run(
            |svc, ctx: Arc<Context>| async move {
                let started = std::time::Instant::now();
                let res = reconcile(svc, ctx.clone()).await;
                let label = res.as_ref().err().map(Error::metric_label);
                ctx.metrics.reconciled("main", started.elapsed(), label);
                res
            },
            error_policy,
            ctx,
        )
        .for_each(|res| async move {
            if let Err(e) = res {
                runtime::report_failure("main", &e);
            }
        })
        .await;
}

fn error_policy(svc: Arc<ShardedService>, err: &Error, ctx: Arc<Context>) -> Action {
    let (n, delay) = ctx.failures.failed(&svc);
    warn!(name = %svc.name_any(), namespace = svc.namespace().unwrap_or_default(),
          error = %err, reason = err.metric_label(), failures = n, retry_in_s = delay.as_secs(),
          "reconcile error");
    Action::requeue(delay)
}

/// One reconcile of one ShardedService.
#[instrument(skip_all, fields(namespace = svc.namespace().unwrap_or_default(), name = %svc.name_any(), generation = svc.metadata.generation))]
pub async fn reconcile(svc: Arc<ShardedService>, ctx: Arc<Context>) -> Result<Action> {
    let ns = svc
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = svc.name_any();
    let uid = svc.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let client = &ctx.client;
    let mut notes = ctx.caps.notes();
    notes.extend(placement::notes(&svc));
    let selector = labels::service_selector_string(&name);

    let existing = owned_by_shard::<StatefulSet>(client, &ns, &selector, &uid).await?;
    let current_shards = existing.keys().next_back().map_or(0, |i| i + 1) as i32;

    // 1. validate; a complete view of the ShardedServices is needed to judge collisions (while
    // the first list is still arriving, a younger object would take an older one's names).
    ctx.services
        .wait_until_ready()
        .await
        .map_err(|_| Error::CacheUnavailable("shardedservices"))?;
    let mut errors = validate::validate(&svc);
    let mut reason = InvalidReason::InvalidSpec;
    if errors.is_empty() {
        let all = ctx.services.state();
        errors = collision::collisions(&svc, all.iter().map(|s| &**s));
        reason = InvalidReason::NameCollision;
    }
    if errors.is_empty() {
        if let Some(e) = validate::shard_removal(current_shards, &svc.spec) {
            errors.push(e);
            reason = InvalidReason::ShardRemovalRefused;
        }
    }
    if !errors.is_empty() {
        warn!(errors = %validate::summarize(&errors), "spec refused; existing objects left untouched");
        let st = status::invalid(&svc, reason, &errors, notes, Timestamp::now());
        write_status(&ctx, &svc, st).await?;
        ctx.failures.succeeded(&svc);
        // A spec change triggers a reconcile; the older ShardedService going away does not.
        return Ok(if reason == InvalidReason::NameCollision {
            Action::requeue(collision::RECHECK)
        } else {
            Action::await_change()
        });
    }

    // 2. build (pure). Removed shards keep their workloads while the published map lists
    // them (they serve handoff reads); existing shards keep what their pods were first told.
    let published = crate::shardmap::published(client, &svc).await?;
    let map_listed = published.map_listed();
    let crate::shardmap::Published { map, listed } = published;
    let spec_shards = u32::try_from(svc.spec.shards).unwrap_or(0);
    let built = reshard::workload_shards(map_listed, spec_shards);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod_list = pods
        .list(&ListParams::default().labels(&selector).match_any())
        .await?
        .items;
    let now = Timestamp::now();
    let plan = plan_rollout(&svc, &existing, &pod_list, spec_shards, now);
    let workloads = Workloads {
        shards: built,
        initial_shards: existing
            .iter()
            .filter_map(|(i, sts)| Some((*i, Workloads::initial_of(sts)?)))
            .collect(),
        // Shards being removed by a reshard are never rolled.
        held: (0..built)
            .filter(|i| !plan.released.contains(i))
            .map(|i| {
                let marker = existing.get(&i).and_then(|s| {
                    s.metadata
                        .annotations
                        .as_ref()?
                        .get(rollout::RELEASED)
                        .cloned()
                });
                (i, marker)
            })
            .collect(),
    };
    let desired = build_with(&svc, &ctx.caps, ctx.settings.options, &workloads)?;

    // 3. apply: one field manager, forced, so the operator owns exactly the fields it sets.
    // An object whose watched copy already holds what would be applied is not written, so a
    // resync of an unchanged service writes nothing. The pods' access objects go first: the
    // StatefulSets' pods run under that ServiceAccount.
    let owned = &ctx.owned;
    // Before the first listing of the owned objects arrived, everything would look unapplied.
    owned.wait_until_ready().await?;
    let compared = 1
        + 3 * desired.access.shards.len()
        + desired.leader_leases.len()
        + desired.stateful_sets.len()
        + desired.shard_services.len()
        + 1
        + desired.disruption_budgets.len();
    // Within a reconcile the applies go out together (bounded): a reconcile costs two round
    // trips of the API server's latency, not one per object.
    let access = desired.access;
    let mut first = vec![put(client, &ns, access.reader_role, &owned.roles).boxed()];
    let mut bindings = Vec::with_capacity(access.shards.len());
    for shard in access.shards {
        first.push(put(client, &ns, shard.account, &owned.accounts).boxed());
        first.push(put(client, &ns, shard.role, &owned.roles).boxed());
        bindings.push(put(client, &ns, shard.binding, &owned.bindings).boxed());
    }
    for lease in desired.leader_leases {
        first.push(put(client, &ns, lease, &owned.leases).boxed());
    }
    let mut writes = runtime::together(first).await?.into_iter().sum::<u32>();
    // A RoleBinding after its Role: the API server resolves the Role to check that the operator
    // holds every right it grants, and refuses a binding to a Role it cannot find yet. (Bindings
    // already in place cost nothing here: they are compared, not written.)
    writes += runtime::together(bindings).await?.into_iter().sum::<u32>();
    let ns_ref = ns.as_str();
    let sets = desired
        .stateful_sets
        .into_iter()
        .enumerate()
        .map(|(i, sts)| {
            let i = i as u32;
            let current = existing.get(&i);
            async move {
                let written =
                    runtime::apply_unless_held(client, ns_ref, sts, current.map(|c| &c.metadata))
                        .await?;
                // Not written means the current copy holds it.
                Ok(match written {
                    Some(new) => (i, new, 1),
                    None => (i, current.cloned().unwrap_or_default(), 0),
                })
            }
            .boxed()
        });
    let mut rest: Vec<BoxFuture<'_, Result<u32>>> = desired
        .shard_services
        .into_iter()
        .chain([desired.routing_service])
        .map(|s| put(client, &ns, s, &owned.services).boxed())
        .collect();
    for p in desired.disruption_budgets {
        rest.push(match ctx.caps.pdb {
            Some(PdbApi::V1beta1) => {
                let p = PodDisruptionBudgetV1beta1::from(&p);
                put(client, &ns, p, &owned.budgets_v1beta1).boxed()
            }
            _ => put(client, &ns, p, &owned.budgets).boxed(),
        });
    }
    let (sets, rest) =
        futures::try_join!(runtime::together(sets.collect()), runtime::together(rest))?;
    let mut observed = Observed::default();
    for (i, sts, wrote) in sets {
        writes += wrote;
        observed.stateful_sets.insert(i, sts);
    }
    writes += rest.into_iter().sum::<u32>();
    let unchanged = u32::try_from(compared)
        .unwrap_or(u32::MAX)
        .saturating_sub(writes);
    ctx.metrics.applied(writes, unchanged);
    tracing::debug!(writes, unchanged, "applied");
    // A shard any published slice still lists keeps its workloads: while the shard-map
    // controller writes a new layout no map is complete, and a shrink's removed shards must
    // serve handoff reads through the window.
    let keep = workloads.shards.max(listed);
    if current_shards as u32 > keep {
        remove_shards(&ctx, &ns, &selector, &uid, keep).await?;
    }

    // 4. status. While the shard-map controller is writing a new layout no map is complete:
    // the status keeps what it said (resharding phase, members) until the slices agree again,
    // which the slice watch reports.
    if map.is_none() && listed > 0 {
        tracing::debug!(
            listed,
            "a shard-map layout is being written; status left as it is"
        );
        ctx.failures.succeeded(&svc);
        return Ok(Action::requeue(LAYOUT_BEING_WRITTEN));
    }
    observed.pods = pod_list;
    observed.map = map;
    observed.rollout = Some(plan.status);
    let st = status::applied(&svc, &observed, notes, now);
    write_status(&ctx, &svc, st).await?;
    ctx.failures.succeeded(&svc);
    let resync = resync_after(ctx.settings.resync, &uid);
    Ok(Action::requeue(
        plan.requeue.map_or(resync, |d| d.min(resync)),
    ))
}

/// When to look at the service with `uid` again: `period` plus up to a fifth of it, the same
/// offset for a service every time and different across services, so services created (or an
/// operator restarted) together do not all resync in the same second.
pub fn resync_after(period: Duration, uid: &str) -> Duration {
    // The routing hash: stable across releases and processes, unlike std's keyed hasher.
    let hash = shardmesh_api::routing::key_hash(uid.as_bytes());
    let spread = u64::try_from((period / 5).as_millis()).unwrap_or(u64::MAX);
    period + Duration::from_millis(hash.checked_rem(spread).unwrap_or(0))
}

/// The rollout decision from the StatefulSets as they were before this reconcile's apply.
fn plan_rollout(
    svc: &ShardedService,
    existing: &BTreeMap<u32, StatefulSet>,
    pods: &[Pod],
    spec_shards: u32,
    now: Timestamp,
) -> rollout::Plan {
    let target = template_revision(svc);
    let desired = svc.spec.replicas_per_shard;
    let obs: Vec<rollout::ShardObs> = (0..spec_shards)
        .map(|i| {
            let Some(sts) = existing.get(&i) else {
                return rollout::ShardObs::default();
            };
            let shard = i.to_string();
            let mine: Vec<&Pod> = pods
                .iter()
                .filter(|p| p.labels().get(labels::SHARD) == Some(&shard))
                .collect();
            rollout::ShardObs::of(sts, &mine, &target, desired)
        })
        .collect();
    rollout::plan(
        &rollout::Policy::of(&svc.spec.rollout),
        &target,
        &obs,
        svc.status.as_ref().and_then(|s| s.rollout.as_ref()),
        now,
    )
}

/// Applies `obj` unless the watched copy in `cache` already holds it (no cache: always);
/// returns how many writes that took (0 or 1).
async fn put<K>(client: &Client, ns: &str, obj: K, cache: &Option<Cache<K>>) -> Result<u32>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + 'static,
{
    let current = cache.as_ref().and_then(|c| c.get(ns, &obj.name_any()));
    let written =
        runtime::apply_unless_held(client, ns, obj, current.as_ref().map(|c| &c.metadata)).await?;
    if let (Some(cache), Some(w)) = (cache, &written) {
        cache.wrote(w);
    }
    Ok(u32::from(written.is_some()))
}

/// Objects of kind `K` labelled for the service and owned by this very ShardedService, by shard.
async fn owned_by_shard<K>(
    client: &Client,
    ns: &str,
    selector: &str,
    uid: &str,
) -> Result<BTreeMap<u32, K>>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    // From the API server's watch cache (resourceVersion=0): a quorum list reads every object
    // of the kind in the namespace from etcd before filtering by label, which made reconciles
    // quadratic in the services per namespace. A list a moment stale is fine here: the next
    // event reconciles again.
    let list = api
        .list(
            &ListParams::default()
                .labels(&format!("{selector},{}", labels::SHARD))
                .match_any(),
        )
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|o| o.owner_references().iter().any(|r| r.uid == uid))
        .filter_map(|o| {
            let shard = o.labels().get(labels::SHARD)?.parse().ok()?;
            Some((shard, o))
        })
        .collect())
}

/// Deletes the per-shard objects of shards `keep..` (only reached with allowShardRemoval).
async fn remove_shards(
    ctx: &Context,
    ns: &str,
    selector: &str,
    uid: &str,
    keep: u32,
) -> Result<()> {
    async fn delete_from<K>(
        client: &Client,
        ns: &str,
        selector: &str,
        uid: &str,
        keep: u32,
    ) -> Result<Vec<String>>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(client.clone(), ns);
        let mut gone = Vec::new();
        for (i, o) in owned_by_shard::<K>(client, ns, selector, uid).await? {
            if i >= keep {
                let name = o.name_any();
                match api.delete(&name, &DeleteParams::background()).await {
                    Ok(_) => gone.push(format!("{}/{name}", K::kind(&()))),
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(gone)
    }
    let client = &ctx.client;
    let mut gone = delete_from::<StatefulSet>(client, ns, selector, uid, keep).await?;
    gone.extend(delete_from::<Service>(client, ns, selector, uid, keep).await?);
    gone.extend(delete_from::<ServiceAccount>(client, ns, selector, uid, keep).await?);
    gone.extend(delete_from::<Role>(client, ns, selector, uid, keep).await?);
    gone.extend(delete_from::<RoleBinding>(client, ns, selector, uid, keep).await?);
    match ctx.caps.pdb {
        Some(PdbApi::V1) => {
            gone.extend(delete_from::<PodDisruptionBudget>(client, ns, selector, uid, keep).await?)
        }
        Some(PdbApi::V1beta1) => gone.extend(
            delete_from::<PodDisruptionBudgetV1beta1>(client, ns, selector, uid, keep).await?,
        ),
        None => {}
    }
    if !gone.is_empty() {
        info!(deleted = ?gone, "removed shards above spec.shards (allowShardRemoval)");
    }
    Ok(())
}

/// Writes the status if it changed and publishes Events for notable transitions.
async fn write_status(ctx: &Context, svc: &ShardedService, st: ShardedServiceStatus) -> Result<()> {
    let prev = svc.status.clone().unwrap_or_default();
    if prev == st {
        return Ok(());
    }
    let ns = svc
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<ShardedService> = Api::namespaced(ctx.client.clone(), &ns);
    let body = serde_json::json!({
        "apiVersion": "shardmesh.io/v1alpha1",
        "kind": "ShardedService",
        "status": st,
    });
    let params = PatchParams::apply(labels::FIELD_MANAGER).force();
    api.patch_status(&svc.name_any(), &params, &Patch::Apply(&body))
        .await?;
    runtime::tell(&ctx.recorder, svc, &status::transitions(&prev, &st)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resync_is_spread_over_a_fifth_of_the_period_and_stable_per_service() {
        let period = Duration::from_secs(300);
        let uids: Vec<String> = (0..1000)
            .map(|i| format!("6f1c2a9e-0000-4000-8000-{i:012}"))
            .collect();
        let after: Vec<Duration> = uids.iter().map(|u| resync_after(period, u)).collect();
        assert!(after
            .iter()
            .all(|d| *d >= period && *d < period + period / 5));
        // Spread, not bunched: every 6 s slice of the 60 s spread gets some of 1,000 services.
        let mut slices = [0u32; 10];
        for d in &after {
            slices[((*d - period).as_secs() / 6) as usize] += 1;
        }
        assert!(slices.iter().all(|n| *n >= 50), "{slices:?}");
        // The same service, the same offset: a restart does not reshuffle.
        assert_eq!(resync_after(period, &uids[7]), after[7]);
        // A period too short to spread is the period itself.
        assert_eq!(
            resync_after(Duration::from_millis(4), "x"),
            Duration::from_millis(4)
        );
    }
}
