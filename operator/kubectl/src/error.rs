//! Errors of the plugin and the exit code each maps to, so a script can tell "not healthy" from
//! "not there" from "cannot ask".

/// Exit codes, documented in `--help` and the README.
pub mod exit {
    /// The command ran and what it looked at is healthy (or would be admitted).
    pub const OK: i32 = 0;
    /// The command ran and the answer is "no": a check failed, the service is not Ready, a plan
    /// would be refused, the key's shard has no live member, the shard map is mid-change.
    pub const NOT_OK: i32 = 1;
    /// Bad command line (clap's own code for usage errors).
    pub const USAGE: i32 = 2;
    /// Something named does not exist: the CRD, the ShardedService, its shard map.
    pub const NOT_FOUND: i32 = 3;
    /// The API server could not be asked: kubeconfig, connection, authentication, permission.
    pub const API: i32 = 4;
}

/// Name of the ShardedService CRD, for messages.
pub const SERVICE_CRD: &str = "shardedservices.shardmesh.io";
/// Name of the ShardMapSlice CRD, for messages.
pub const SLICE_CRD: &str = "shardmapslices.shardmesh.io";

/// How to install what is missing, appended to not-found messages.
pub const INSTALL_HINT: &str = "install the chart (helm install shardmesh charts/shardmesh -n \
                                shardmesh-system --create-namespace) or run `kubectl apply -f crds/`";

/// Everything that ends a command without an answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server does not serve a shardmesh resource.
    #[error("the CustomResourceDefinition {crd} is not installed on this cluster: {INSTALL_HINT}")]
    CrdMissing {
        /// `<plural>.<group>` of the missing CRD.
        crd: &'static str,
    },
    /// No ShardedService of that name.
    #[error(
        "ShardedService {namespace}/{name} not found (`kubectl get shardedservices -n {namespace}` \
         lists the namespace's; -n picks another namespace)"
    )]
    ServiceNotFound {
        /// Namespace looked in.
        namespace: String,
        /// Name asked for.
        name: String,
    },
    /// The operator has published no shard map for the service (yet).
    #[error(
        "ShardedService {namespace}/{name} has no shard map published: the operator writes one \
         ShardMapSlice per shard once it reconciles the service; is it running? \
         (`kubectl shardmesh check`)"
    )]
    NoShardMap {
        /// Namespace.
        namespace: String,
        /// Service name.
        name: String,
    },
    /// The shard map exists but cannot be combined right now (a layout is being written).
    #[error("the shard map of {namespace}/{name} cannot be read right now: {reason}; try again")]
    MapIncomplete {
        /// Namespace.
        namespace: String,
        /// Service name.
        name: String,
        /// What `assemble` said.
        reason: String,
    },
    /// No usable kubeconfig or in-cluster configuration.
    #[error("cannot load a Kubernetes configuration: {0}")]
    Config(String),
    /// The request never got an answer.
    #[error(
        "cannot reach the API server while {what}: {source} (is the cluster up and KUBECONFIG or \
         --context right?)"
    )]
    Unreachable {
        /// What was being done.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The API server answered with an error this command cannot handle.
    #[error("the API server refused {what}: {message}")]
    Api {
        /// What was being done.
        what: String,
        /// The server's message (with its code).
        message: String,
    },
    /// Output could not be encoded (a bug, reported rather than hidden).
    #[error("cannot encode the output: {0}")]
    Encode(String),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::CrdMissing { .. } | Error::ServiceNotFound { .. } | Error::NoShardMap { .. } => {
                exit::NOT_FOUND
            }
            Error::MapIncomplete { .. } => exit::NOT_OK,
            Error::Config(_) | Error::Unreachable { .. } | Error::Api { .. } => exit::API,
            Error::Encode(_) => exit::NOT_OK,
        }
    }

    /// Classifies a client error of `what`: an answer from the server is [`Error::Api`], no
    /// answer is [`Error::Unreachable`].
    pub fn from_kube(what: impl Into<String>, e: kube::Error) -> Error {
        let what = what.into();
        match e {
            kube::Error::Api(s) => Error::Api {
                what,
                message: format!("{} ({} {})", s.message, s.code, s.reason),
            },
            other => Error::Unreachable {
                what,
                source: other,
            },
        }
    }
}

/// The server's status code of a client error, when the server answered.
pub fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_separate_missing_from_unreachable_from_unhealthy() {
        let nf = Error::ServiceNotFound {
            namespace: "shop".into(),
            name: "orders".into(),
        };
        assert_eq!(nf.exit_code(), exit::NOT_FOUND);
        assert!(nf.to_string().contains("shop/orders"));
        let crd = Error::CrdMissing { crd: SERVICE_CRD };
        assert_eq!(crd.exit_code(), exit::NOT_FOUND);
        assert!(crd.to_string().contains("shardedservices.shardmesh.io"));
        assert!(crd.to_string().contains("kubectl apply -f crds/"));
        let incomplete = Error::MapIncomplete {
            namespace: "a".into(),
            name: "b".into(),
            reason: "layout 4: 1 of 3 shard(s) not yet published".into(),
        };
        assert_eq!(incomplete.exit_code(), exit::NOT_OK);
        assert_eq!(Error::Config("no file".into()).exit_code(), exit::API);
        let forbidden = Error::from_kube(
            "reading x",
            kube::Error::Api(
                kube::core::Status::failure("no", "Forbidden")
                    .with_code(403)
                    .boxed(),
            ),
        );
        assert_eq!(forbidden.exit_code(), exit::API);
        assert!(forbidden.to_string().contains("403"));
        // clap exits with 2 on usage errors; ours must agree.
        let usage: clap::error::Error =
            clap::error::Error::new(clap::error::ErrorKind::InvalidValue);
        assert_eq!(exit::USAGE, usage.exit_code());
    }
}
