//! What the API server offers, detected once at start-up so the operator degrades (with a log
//! line and a status note) instead of failing on older clusters.

use kube::Client;
use tracing::{info, warn};

use crate::disruption::PdbApi;

/// Features that vary between the Kubernetes versions shardmesh supports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Server version as `major.minor`, e.g. `1.20`.
    pub version: String,
    /// The PodDisruptionBudget API served: `policy/v1` on 1.21+, `policy/v1beta1` before
    /// (removed in 1.25); `None` on a server with neither.
    pub pdb: Option<PdbApi>,
    /// Native sidecars (`initContainers[].restartPolicy: Always`, 1.29+ by default).
    pub native_sidecars: bool,
}

impl Capabilities {
    /// Everything a current cluster has; what builders assume when not told otherwise.
    pub fn latest() -> Self {
        Capabilities {
            version: "1.33".into(),
            pdb: Some(PdbApi::V1),
            native_sidecars: true,
        }
    }

    /// Asks the server. An unreachable server is an error (the operator cannot work); a missing
    /// API group is a capability that is absent.
    pub async fn detect(client: &Client) -> kube::Result<Self> {
        let info = client.apiserver_version().await?;
        let (major, minor) = parse_version(&info.major, &info.minor);
        let pdb = if serves_pdb(client, PdbApi::V1).await? {
            Some(PdbApi::V1)
        } else if serves_pdb(client, PdbApi::V1beta1).await? {
            Some(PdbApi::V1beta1)
        } else {
            None
        };
        let caps = Capabilities {
            version: format!("{major}.{minor}"),
            pdb,
            native_sidecars: (major, minor) >= (1, 29),
        };
        info!(version = %caps.version, pdb = caps.pdb.map(PdbApi::api_version), native_sidecars = caps.native_sidecars, "detected API server capabilities");
        for note in caps.notes() {
            warn!("{note}");
        }
        Ok(caps)
    }

    /// Human-readable notes about missing capabilities, mirrored into every status.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.pdb.is_none() {
            notes.push(format!(
                "API server {} serves neither policy/v1 nor policy/v1beta1: PodDisruptionBudgets \
                 are not created, so voluntary evictions (kubectl drain) are not limited per shard",
                self.version
            ));
        }
        notes
    }
}

/// Whether the server serves PodDisruptionBudgets under `api`; a missing group/version is a
/// no, any other error is the server's.
async fn serves_pdb(client: &Client, api: PdbApi) -> kube::Result<bool> {
    match client.list_api_group_resources(api.api_version()).await {
        Ok(list) => Ok(list
            .resources
            .iter()
            .any(|r| r.name == "poddisruptionbudgets")),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// `major`/`minor` as numbers; providers append `+` (e.g. `"27+"`), which is ignored.
fn parse_version(major: &str, minor: &str) -> (u32, u32) {
    let num = |s: &str| {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .unwrap_or(0)
    };
    (num(major), num(minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_with_provider_suffix() {
        assert_eq!(parse_version("1", "20"), (1, 20));
        assert_eq!(parse_version("1", "27+"), (1, 27));
        assert_eq!(parse_version("", ""), (0, 0));
    }

    #[test]
    fn notes_only_for_missing_features() {
        assert!(Capabilities::latest().notes().is_empty());
        let v120 = Capabilities {
            version: "1.20".into(),
            pdb: Some(PdbApi::V1beta1),
            native_sidecars: false,
        };
        assert!(v120.notes().is_empty(), "1.20 gets policy/v1beta1 budgets");
        let none = Capabilities { pdb: None, ..v120 };
        assert!(none.notes()[0].contains("policy/v1beta1"));
    }
}
