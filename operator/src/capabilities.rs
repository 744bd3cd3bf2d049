//! What the API server offers, detected once at start-up so the operator degrades (with a log
//! line and a status note) instead of failing on older clusters.

use kube::Client;
use tracing::{info, warn};

/// Features that vary between the Kubernetes versions shardmesh supports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Server version as `major.minor`, e.g. `1.20`.
    pub version: String,
    /// `policy/v1` PodDisruptionBudget is served (1.21+).
    pub pdb_v1: bool,
    /// Native sidecars (`initContainers[].restartPolicy: Always`, 1.29+ by default).
    pub native_sidecars: bool,
}

impl Capabilities {
    /// Everything a current cluster has; what builders assume when not told otherwise.
    pub fn latest() -> Self {
        Capabilities {
            version: "1.33".into(),
            pdb_v1: true,
            native_sidecars: true,
        }
    }

    /// Asks the server. An unreachable server is an error (the operator cannot work); a missing
    /// API group is a capability that is absent.
    pub async fn detect(client: &Client) -> kube::Result<Self> {
        let info = client.apiserver_version().await?;
        let (major, minor) = parse_version(&info.major, &info.minor);
        let pdb_v1 = match client.list_api_group_resources("policy/v1").await {
            Ok(list) => list
                .resources
                .iter()
                .any(|r| r.name == "poddisruptionbudgets"),
            Err(kube::Error::Api(s)) if s.code == 404 => false,
            Err(e) => return Err(e),
        };
        let caps = Capabilities {
            version: format!("{major}.{minor}"),
            pdb_v1,
            native_sidecars: (major, minor) >= (1, 29),
        };
        info!(version = %caps.version, pdb_v1, native_sidecars = caps.native_sidecars, "detected API server capabilities");
        for note in caps.notes() {
            warn!("{note}");
        }
        Ok(caps)
    }

    /// Human-readable notes about missing capabilities, mirrored into every status.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if !self.pdb_v1 {
            notes.push(format!(
                "API server {} does not serve policy/v1: PodDisruptionBudgets are not created, so \
                 voluntary evictions are not limited per shard (upgrade to Kubernetes 1.21+)",
                self.version
            ));
        }
        notes
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
        let old = Capabilities {
            version: "1.20".into(),
            pdb_v1: false,
            native_sidecars: false,
        };
        assert!(old.notes()[0].contains("policy/v1"));
    }
}
