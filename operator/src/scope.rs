//! Which namespaces the operator manages. Cluster-wide is the default and needs a ClusterRole;
//! a fixed list of namespaces needs Roles in those namespaces only (the chart's
//! `operator.watchNamespaces`), so a stolen operator token cannot write anywhere else.
//!
//! Each namespace gets its own watches and caches: a reflector's store is replaced wholesale
//! when its watch restarts, so one store cannot be fed by the watches of several namespaces.

use kube::{Api, Client, Resource};

/// The namespaces the controllers watch and write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace.
    Cluster,
    /// These namespaces only (sorted, distinct, at least one).
    Namespaces(Vec<String>),
}

impl Scope {
    /// The scope given by `--watch-namespaces`: empty means every namespace. Names must be
    /// namespace names (DNS-1123 labels).
    pub fn parse(list: &[String]) -> Result<Scope, String> {
        let mut names: Vec<String> = Vec::new();
        for raw in list {
            let name = raw.trim();
            if name.is_empty() {
                continue;
            }
            let valid = name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !name.starts_with('-')
                && !name.ends_with('-');
            if !valid {
                return Err(format!(
                    "{name:?} is not a namespace name (lower-case letters, digits and '-', at most \
                     63, starting and ending with a letter or digit); list namespaces separated by \
                     commas, or leave it empty to watch every namespace"
                ));
            }
            names.push(name.to_string());
        }
        names.sort();
        names.dedup();
        Ok(if names.is_empty() {
            Scope::Cluster
        } else {
            Scope::Namespaces(names)
        })
    }

    /// One root per watch: `None` for every namespace, else each namespace.
    pub fn roots(&self) -> Vec<Option<String>> {
        match self {
            Scope::Cluster => vec![None],
            Scope::Namespaces(ns) => ns.iter().cloned().map(Some).collect(),
        }
    }

    /// Whether objects of `namespace` are managed.
    pub fn covers(&self, namespace: &str) -> bool {
        match self {
            Scope::Cluster => true,
            Scope::Namespaces(ns) => ns.iter().any(|n| n == namespace),
        }
    }

    /// For logs: `all namespaces` or the list.
    pub fn describe(&self) -> String {
        match self {
            Scope::Cluster => "all namespaces".to_string(),
            Scope::Namespaces(ns) => format!("namespaces {}", ns.join(", ")),
        }
    }
}

/// The API of `K` under one root of a [`Scope`].
pub fn api<K>(client: &Client, root: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match root {
        None => Api::all(client.clone()),
        Some(ns) => Api::namespaced(client.clone(), ns),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn empty_means_every_namespace_and_lists_are_normalised() {
        assert_eq!(Scope::parse(&[]).unwrap(), Scope::Cluster);
        assert_eq!(Scope::parse(&s(&["", " "])).unwrap(), Scope::Cluster);
        let sc = Scope::parse(&s(&["shop", " apps", "shop"])).unwrap();
        assert_eq!(sc, Scope::Namespaces(s(&["apps", "shop"])));
        assert_eq!(sc.roots(), vec![Some("apps".into()), Some("shop".into())]);
        assert!(sc.covers("shop") && !sc.covers("kube-system"));
        assert!(Scope::Cluster.covers("anything"));
        assert_eq!(Scope::Cluster.roots(), vec![None]);
    }

    #[test]
    fn bad_names_are_refused_with_the_rule() {
        for bad in ["Shop", "-a", "a-", "a_b", &"x".repeat(64)] {
            let e = Scope::parse(&s(&[bad])).unwrap_err();
            assert!(e.contains("not a namespace name"), "{bad}: {e}");
        }
    }
}
