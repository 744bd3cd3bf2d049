//! Errors of the reconciler, with a short label for metrics and logs.

/// Reconcile failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Serializing a desired object failed (a bug, not bad input).
    #[error("serializing {what}: {source}")]
    Serialize {
        /// What was being serialized.
        what: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// The object lacks a field the API server always sets (namespace, uid).
    #[error("object is missing {0}")]
    MissingField(&'static str),
    /// A local cache the reconcile reads is gone (the controller is shutting down).
    #[error("cache unavailable: {0}")]
    CacheUnavailable(&'static str),
}

impl Error {
    /// Bounded-cardinality label for metrics and structured logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "api_error",
            Error::Kube(_) => "kube_client",
            Error::Serialize { .. } => "serialize",
            Error::MissingField(_) => "missing_field",
            Error::CacheUnavailable(_) => "cache_unavailable",
        }
    }
}

/// Result of the reconciler.
pub type Result<T, E = Error> = std::result::Result<T, E>;
