//! The `shardmesh.io` API: the `ShardedService` custom resource, the label and annotation keys
//! every component agrees on, the shard-map types the sidecar consumes, and spec validation.
//!
//! This crate has no client and no runtime so the sidecar can depend on it cheaply.

pub mod backoff;
pub mod duration;
pub mod headers;
pub mod labels;
pub mod lease;
pub mod ports;
pub mod routing;
pub mod shardmap;
pub mod template;
pub mod v1alpha1;
pub mod validate;

pub use duration::DurationString;
pub use v1alpha1::{ShardedService, ShardedServiceSpec, ShardedServiceStatus};
