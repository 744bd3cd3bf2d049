//! The thin shell: one client, and the reads every command shares, with "not there" told apart
//! from "cannot ask" so the exit code says which.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client, Config,
};
use shardmesh_api::{
    labels,
    shardmap::{ShardMapSlice, ShardMapSliceSpec},
    ShardedService,
};

use crate::error::{api_code, Error, SERVICE_CRD, SLICE_CRD};

/// The API group/version of the shardmesh resources, as discovery names it.
pub const GROUP_VERSION: &str = "shardmesh.io/v1alpha1";

/// A client and the namespace commands act in.
#[derive(Clone)]
pub struct Ctx {
    /// The client.
    pub client: Client,
    /// `-n`, else the kubeconfig context's namespace, else `default`.
    pub namespace: String,
}

/// Connects as kubectl would: `--context` of the kubeconfig, else KUBECONFIG / ~/.kube/config
/// (current context), else the in-cluster service account. Short timeouts: a CLI that hangs
/// on a dead API server is worse than one that says so.
pub async fn connect(context: Option<&str>, namespace: Option<&str>) -> Result<Ctx, Error> {
    let mut config = match context {
        Some(ctx) => {
            let options = KubeConfigOptions {
                context: Some(ctx.to_string()),
                ..KubeConfigOptions::default()
            };
            let kubeconfig = Kubeconfig::read().map_err(|e| Error::Config(e.to_string()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| Error::Config(format!("context {ctx:?}: {e}")))?
        }
        None => Config::infer()
            .await
            .map_err(|e| Error::Config(e.to_string()))?,
    };
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(30));
    let namespace = namespace
        .map(str::to_string)
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| Error::Config(e.to_string()))?;
    Ok(Ctx { client, namespace })
}

/// The resources of `shardmesh.io/v1alpha1` the server serves; empty when the group is unknown.
pub async fn served_resources(client: &Client) -> Result<Vec<String>, Error> {
    match client.list_api_group_resources(GROUP_VERSION).await {
        Ok(list) => Ok(list.resources.into_iter().map(|r| r.name).collect()),
        Err(e) if api_code(&e) == Some(404) => Ok(Vec::new()),
        Err(e) => Err(Error::from_kube(format!("discovering {GROUP_VERSION}"), e)),
    }
}

/// ShardedService `name` in the context's namespace. A 404 is told apart: a missing CRD (the
/// fix is an install) or a missing object (the fix is the name or namespace).
pub async fn service(ctx: &Ctx, name: &str) -> Result<ShardedService, Error> {
    let api: Api<ShardedService> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    match api.get_opt(name).await {
        Ok(Some(svc)) => Ok(svc),
        Ok(None) => {
            let served = served_resources(&ctx.client).await?;
            if served.iter().any(|r| r == "shardedservices") {
                Err(Error::ServiceNotFound {
                    namespace: ctx.namespace.clone(),
                    name: name.to_string(),
                })
            } else {
                Err(Error::CrdMissing { crd: SERVICE_CRD })
            }
        }
        Err(e) => Err(Error::from_kube(
            format!("reading ShardedService {}/{name}", ctx.namespace),
            e,
        )),
    }
}

/// The ShardMapSlices of service `name` (any layout; `assemble` picks).
pub async fn slices(ctx: &Ctx, name: &str) -> Result<Vec<ShardMapSliceSpec>, Error> {
    let api: Api<ShardMapSlice> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let lp = ListParams::default().labels(&labels::service_selector_string(name));
    match api.list(&lp).await {
        Ok(list) => Ok(list.items.into_iter().map(|s| s.spec).collect()),
        Err(e) if api_code(&e) == Some(404) => Err(Error::CrdMissing { crd: SLICE_CRD }),
        Err(e) => Err(Error::from_kube(
            format!("listing the ShardMapSlices of {}/{name}", ctx.namespace),
            e,
        )),
    }
}

/// The operator's leader Lease: `Ok(None)` when it does not exist, `Err` with the reason when
/// it cannot be read (e.g. forbidden to this user), so callers can still answer without it.
pub async fn leader_lease(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<Lease>, String> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    api.get_opt(name)
        .await
        .map_err(|e| Error::from_kube(format!("reading Lease {namespace}/{name}"), e).to_string())
}
