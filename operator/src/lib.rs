//! The shardmesh operator: reconciles `ShardedService`s into per-shard StatefulSets, headless
//! Services, PodDisruptionBudgets and a routing Service, and keeps an honest status.
//!
//! Reconcile is a pipeline: `validate` (shardmesh-api) → [`build`] (pure: CR → desired objects)
//! → apply (server-side apply, one field manager) → [`status`] (pure: observed → status).
//! The [`webhook`] module serves sidecar injection and ShardedService validation at admission.

pub mod access;
pub mod build;
pub mod cache;
pub mod capabilities;
pub mod collision;
pub mod controller;
pub mod crdgen;
pub mod disruption;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod placement;
pub mod reshard;
pub mod rollout;
pub mod runtime;
pub mod scope;
pub mod shardmap;
pub mod status;
pub mod webhook;

pub use error::{Error, Result};
