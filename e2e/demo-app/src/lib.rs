//! `shardmesh-demo`: a small key-value HTTP server that knows its shard.
//!
//! It serves `GET/PUT/DELETE /kv/{key}` only for keys its shard owns
//! (`shardmesh_api::routing::shard_for_key`) and answers `421 Misdirected Request` for the
//! others, so any routing mistake of the sidecar (or its absence) is visible. Every response
//! names the pod and shard that produced it (`x-demo-pod`, `x-demo-shard`).

pub mod app;
pub mod config;
pub mod server;

pub use app::App;
pub use config::{Config, ConfigError, RawConfig};
