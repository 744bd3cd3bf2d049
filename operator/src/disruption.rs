//! PodDisruptionBudgets on every API a supported server serves: `policy/v1` (1.21+) and
//! `policy/v1beta1` (up to 1.24; the only one on 1.20). Without a budget, `kubectl drain` may
//! evict every replica of a shard at once. [`crate::build`] makes one `policy/v1` object per
//! shard; [`PodDisruptionBudgetV1beta1`] carries the same metadata and spec under the older
//! apiVersion, which k8s-openapi no longer ships. The fields shardmesh sets (`maxUnavailable`
//! and a non-empty `selector`) mean the same in both versions.

use k8s_openapi::{
    api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{ser::SerializeStruct, Deserialize, Serialize, Serializer};

/// The PodDisruptionBudget API the server serves, the newest one when it serves both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PdbApi {
    /// `policy/v1`.
    V1,
    /// `policy/v1beta1`.
    V1beta1,
}

impl PdbApi {
    /// Its group/version, e.g. `policy/v1`.
    pub fn api_version(self) -> &'static str {
        match self {
            PdbApi::V1 => <PodDisruptionBudget as k8s_openapi::Resource>::API_VERSION,
            PdbApi::V1beta1 => <PodDisruptionBudgetV1beta1 as k8s_openapi::Resource>::API_VERSION,
        }
    }
}

/// A `policy/v1beta1` PodDisruptionBudget: what the operator applies, owns and deletes on a
/// server without `policy/v1`. Its status is not read, so it is not kept.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PodDisruptionBudgetV1beta1 {
    /// Standard object metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The budget, in the `policy/v1` shape (the same fields).
    #[serde(default)]
    pub spec: Option<PodDisruptionBudgetSpec>,
}

impl From<&PodDisruptionBudget> for PodDisruptionBudgetV1beta1 {
    fn from(pdb: &PodDisruptionBudget) -> Self {
        PodDisruptionBudgetV1beta1 {
            metadata: pdb.metadata.clone(),
            spec: pdb.spec.clone(),
        }
    }
}

impl k8s_openapi::Resource for PodDisruptionBudgetV1beta1 {
    const API_VERSION: &'static str = "policy/v1beta1";
    const GROUP: &'static str = "policy";
    const KIND: &'static str = "PodDisruptionBudget";
    const VERSION: &'static str = "v1beta1";
    const URL_PATH_SEGMENT: &'static str = "poddisruptionbudgets";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for PodDisruptionBudgetV1beta1 {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Written with its `apiVersion` and `kind`, as server-side apply needs them in the body.
impl Serialize for PodDisruptionBudgetV1beta1 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use k8s_openapi::Resource;
        let mut s = serializer.serialize_struct(Self::KIND, 4)?;
        s.serialize_field("apiVersion", Self::API_VERSION)?;
        s.serialize_field("kind", Self::KIND)?;
        s.serialize_field("metadata", &self.metadata)?;
        match &self.spec {
            Some(spec) => s.serialize_field("spec", spec)?,
            None => s.skip_field("spec")?,
        }
        s.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_same_budget_serializes_for_either_api() {
        let v1: PodDisruptionBudget = serde_json::from_value(json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": "orders-0", "namespace": "shop", "labels": {"a": "b"}},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"shardmesh.io/shard": "0"}}}
        }))
        .expect("fixture");
        let beta = serde_json::to_value(PodDisruptionBudgetV1beta1::from(&v1)).expect("json");
        let mut expected = serde_json::to_value(&v1).expect("json");
        expected["apiVersion"] = json!("policy/v1beta1");
        assert_eq!(beta, expected);
        assert_eq!(beta["spec"]["maxUnavailable"], 1);
        // And what the server returns reads back (status and unknown fields ignored).
        let mut from_server = beta.clone();
        from_server["status"] = json!({"disruptionsAllowed": 1, "currentHealthy": 2});
        let back: PodDisruptionBudgetV1beta1 =
            serde_json::from_value(from_server).expect("decodes");
        assert_eq!(back, PodDisruptionBudgetV1beta1::from(&v1));
        assert_eq!(PdbApi::V1beta1.api_version(), "policy/v1beta1");
        assert_eq!(PdbApi::V1.api_version(), "policy/v1");
    }

    #[test]
    fn no_spec_no_field() {
        let v = serde_json::to_value(PodDisruptionBudgetV1beta1::default()).expect("json");
        assert!(v.get("spec").is_none(), "{v}");
        assert_eq!(v["kind"], "PodDisruptionBudget");
    }
}
