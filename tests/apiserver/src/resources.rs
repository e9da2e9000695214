//! The kinds this server knows, and the discovery and OpenAPI documents
//! describing them (pure data; no I/O).

use serde_json::{Value, json};

/// One REST resource (e.g. `pods`) the server serves.
#[derive(Debug, PartialEq, Eq)]
pub struct Resource {
    /// API group; `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// The URL segment, e.g. `pods`.
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Whether `.../NAME/status` exists; the main resource then ignores status
    /// changes, like the real API server.
    pub has_status: bool,
    pub categories: &'static [&'static str],
    /// A custom resource (its CRD may be missing on a real cluster): served
    /// only when [`Catalog::custom_resources`] is on.
    pub custom: bool,
}

impl Resource {
    /// `v1` or `networking.k8s.io/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `networkpolicies.networking.k8s.io`, as in error messages.
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

pub static RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        namespaced: false,
        short_names: &["ns"],
        has_status: true,
        categories: &[],
        custom: false,
    },
    Resource {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        singular: "pod",
        namespaced: true,
        short_names: &["po"],
        has_status: true,
        categories: &["all"],
        custom: false,
    },
    Resource {
        group: "",
        version: "v1",
        kind: "Node",
        plural: "nodes",
        singular: "node",
        namespaced: false,
        short_names: &["no"],
        has_status: true,
        categories: &[],
        custom: false,
    },
    Resource {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        singular: "service",
        namespaced: true,
        short_names: &["svc"],
        has_status: true,
        categories: &["all"],
        custom: false,
    },
    Resource {
        group: "networking.k8s.io",
        version: "v1",
        kind: "NetworkPolicy",
        plural: "networkpolicies",
        singular: "networkpolicy",
        namespaced: true,
        short_names: &["netpol"],
        has_status: false,
        categories: &[],
        custom: false,
    },
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        singular: "endpointslice",
        namespaced: true,
        short_names: &[],
        has_status: false,
        categories: &[],
        custom: false,
    },
    // ClusterNetworkPolicy (network-policy-api v0.2.0), a custom resource on
    // a real cluster (deploy/crds/); served as if its CRD were installed.
    Resource {
        group: "policy.networking.k8s.io",
        version: "v1alpha2",
        kind: "ClusterNetworkPolicy",
        plural: "clusternetworkpolicies",
        singular: "clusternetworkpolicy",
        namespaced: false,
        short_names: &["cnp"],
        has_status: true,
        categories: &[],
        custom: true,
    },
    // What the agent posts about objects it could not use as written.
    Resource {
        group: "events.k8s.io",
        version: "v1",
        kind: "Event",
        plural: "events",
        singular: "event",
        namespaced: true,
        short_names: &["ev"],
        has_status: false,
        categories: &[],
        custom: false,
    },
];

/// Which of [`RESOURCES`] a server serves: all of them, or all but the
/// custom resources (a cluster whose CRDs are not installed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Catalog {
    pub custom_resources: bool,
}

impl Default for Catalog {
    fn default() -> Self {
        Self::ALL
    }
}

/// The resource served at `group/version/plural` (by a server serving
/// everything).
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    Catalog::ALL.find(group, version, plural)
}

/// The resource with this plural name (`pods`, `networkpolicies`, ...):
/// unique across the groups this server serves.
pub fn by_plural(plural: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.plural == plural)
}

/// The resource of objects with this `apiVersion` and `kind`.
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.kind == kind && r.api_version() == api_version)
}

/// The namespace resource (namespace deletion cascades over namespaced kinds).
pub fn namespaces() -> &'static Resource {
    &RESOURCES[0]
}

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// The version kubectl's dispatcher sees; it picks the kubectl matching this minor.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-sluice-test",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

/// `/api` (legacy, non-aggregated).
pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]
    })
}

/// The content type of aggregated discovery (`apidiscovery.k8s.io/v2`).
pub const AGGREGATED_DISCOVERY_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

impl Catalog {
    /// Every resource.
    pub const ALL: Catalog = Catalog {
        custom_resources: true,
    };

    /// The resources served.
    pub fn resources(self) -> impl Iterator<Item = &'static Resource> {
        RESOURCES
            .iter()
            .filter(move |r| self.custom_resources || !r.custom)
    }

    /// The resource served at `group/version/plural`.
    pub fn find(self, group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
        self.resources()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    /// Groups other than core with their (one) version, in discovery order.
    fn groups(self) -> Vec<(&'static str, &'static str)> {
        let mut out: Vec<(&'static str, &'static str)> = Vec::new();
        for r in self.resources() {
            if !r.group.is_empty() && !out.iter().any(|(g, _)| *g == r.group) {
                out.push((r.group, r.version));
            }
        }
        out
    }

    /// `/apis` (legacy, non-aggregated).
    pub fn api_group_list(self) -> Value {
        let groups: Vec<Value> = self
            .groups()
            .into_iter()
            .map(|(g, v)| {
                let mut v = group_json(g, v);
                if let Some(o) = v.as_object_mut() {
                    o.remove("kind");
                    o.remove("apiVersion");
                }
                v
            })
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    /// `/apis/<group>`.
    pub fn api_group(self, group: &str) -> Option<Value> {
        self.groups()
            .into_iter()
            .find(|(g, _)| *g == group)
            .map(|(g, v)| group_json(g, v))
    }

    /// `/api/v1` or `/apis/<group>/<version>`.
    pub fn api_resource_list(self, group: &str, version: &str) -> Option<Value> {
        let mut resources = Vec::new();
        for r in self
            .resources()
            .filter(|r| r.group == group && r.version == version)
        {
            resources.push(json!({
                "name": r.plural,
                "singularName": r.singular,
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": VERBS,
                "shortNames": r.short_names,
                "categories": r.categories,
            }));
            if r.has_status {
                resources.push(json!({
                    "name": format!("{}/status", r.plural),
                    "singularName": "",
                    "namespaced": r.namespaced,
                    "kind": r.kind,
                    "verbs": ["get", "patch", "update"],
                }));
            }
        }
        if resources.is_empty() {
            return None;
        }
        let group_version = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        Some(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources
        }))
    }

    fn discovery_group(self, group: &str, version: &str) -> Value {
        let resources: Vec<Value> = self
            .resources()
            .filter(|r| r.group == group)
            .map(|r| {
                let kind = json!({"group": r.group, "version": r.version, "kind": r.kind});
                let mut res = json!({
                    "resource": r.plural,
                    "responseKind": kind,
                    "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                    "singularResource": r.singular,
                    "verbs": VERBS,
                    "shortNames": r.short_names,
                    "categories": r.categories,
                });
                if r.has_status {
                    res["subresources"] = json!([{
                        "subresource": "status",
                        "responseKind": kind,
                        "verbs": ["get", "patch", "update"],
                    }]);
                }
                res
            })
            .collect();
        json!({
            "metadata": {"name": group, "creationTimestamp": null},
            "versions": [{"version": version, "resources": resources, "freshness": "Current"}]
        })
    }

    /// Aggregated discovery for `/api` (core only) or `/apis` (all named groups).
    pub fn aggregated_discovery(self, core: bool) -> Value {
        let items: Vec<Value> = if core {
            vec![self.discovery_group("", "v1")]
        } else {
            self.groups()
                .into_iter()
                .map(|(g, v)| self.discovery_group(g, v))
                .collect()
        };
        json!({
            "kind": "APIGroupDiscoveryList",
            "apiVersion": "apidiscovery.k8s.io/v2",
            "metadata": {},
            "items": items
        })
    }

    /// `/openapi/v3`: one entry per group-version.
    pub fn openapi_v3_index(self) -> Value {
        let mut paths = serde_json::Map::new();
        paths.insert(
            "api/v1".into(),
            json!({"serverRelativeURL": "/openapi/v3/api/v1?hash=sluice"}),
        );
        for (g, v) in self.groups() {
            paths.insert(
                format!("apis/{g}/{v}"),
                json!({"serverRelativeURL": format!("/openapi/v3/apis/{g}/{v}?hash=sluice")}),
            );
        }
        json!({ "paths": paths })
    }

    /// `/openapi/v3/<api/v1 | apis/group/version>`: a minimal document. It
    /// only tells kubectl, per kind, that PATCH accepts `fieldValidation` (so
    /// kubectl validates on the server instead of downloading the OpenAPI v2
    /// protobuf) and which patch types exist. It carries no schemas, so
    /// `kubectl apply` computes strategic merge patches from the Go types
    /// compiled into kubectl, and JSON merge patches for the kinds it does not
    /// compile in (ClusterNetworkPolicy), as it does for any custom resource.
    pub fn openapi_v3_group_version(self, group: &str, version: &str) -> Option<Value> {
        let mut paths = serde_json::Map::new();
        let prefix = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let patch_body = json!({"content": {
            "application/json-patch+json": {"schema": {"type": "object"}},
            "application/merge-patch+json": {"schema": {"type": "object"}},
            "application/strategic-merge-patch+json": {"schema": {"type": "object"}},
        }});
        let mut any = false;
        for r in self
            .resources()
            .filter(|r| r.group == group && r.version == version)
        {
            any = true;
            let path = if r.namespaced {
                format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
            } else {
                format!("{prefix}/{}/{{name}}", r.plural)
            };
            let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
            paths.insert(
                path,
                json!({"patch": {
                    "operationId": format!("patch{}", r.kind),
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": gvk,
                    "parameters": [
                        {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                        {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                    ],
                    "requestBody": patch_body,
                    "responses": {"200": {"description": "OK"}},
                }}),
            );
        }
        any.then(|| {
            json!({
                "openapi": "3.0.0",
                "info": {"title": "Kubernetes (sluice-test-apiserver)", "version": "v1.32.0"},
                "paths": paths,
                "components": {"schemas": {}},
            })
        })
    }
}

fn group_json(group: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "preferredVersion": gv, "versions": [gv]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_found_by_its_group_version_and_plural() {
        for r in RESOURCES {
            assert_eq!(find(r.group, r.version, r.plural), Some(r));
        }
        assert_eq!(find("", "v1", "networkpolicies"), None);
    }

    #[test]
    fn aggregated_discovery_lists_core_kinds_under_the_unnamed_group() {
        let d = Catalog::ALL.aggregated_discovery(true);
        let items = d["items"].as_array().unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["metadata"]["name"], "");
        let names: Vec<&str> = items[0]["versions"][0]["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["resource"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["namespaces", "pods", "nodes", "services"]);
    }

    #[test]
    fn without_custom_resources_the_cluster_network_policy_group_is_not_served() {
        let bare = Catalog {
            custom_resources: false,
        };
        let g = "policy.networking.k8s.io";
        assert!(
            Catalog::ALL
                .find(g, "v1alpha2", "clusternetworkpolicies")
                .is_some()
        );
        assert_eq!(bare.find(g, "v1alpha2", "clusternetworkpolicies"), None);
        assert_eq!(bare.api_group(g), None);
        assert_eq!(bare.api_resource_list(g, "v1alpha2"), None);
        assert_eq!(bare.openapi_v3_group_version(g, "v1alpha2"), None);
        let listed = bare.api_group_list().to_string();
        assert!(!listed.contains(g) && listed.contains("networking.k8s.io"));
        assert!(!bare.aggregated_discovery(false).to_string().contains(g));
        assert!(
            Catalog::ALL
                .aggregated_discovery(false)
                .to_string()
                .contains(g)
        );
    }

    #[test]
    fn openapi_declares_field_validation_for_patch_of_every_kind() {
        for r in RESOURCES {
            let doc = Catalog::ALL
                .openapi_v3_group_version(r.group, r.version)
                .unwrap();
            let found = doc["paths"].as_object().unwrap().values().any(|p| {
                p["patch"]["x-kubernetes-group-version-kind"]["kind"] == r.kind
                    && p["patch"]["parameters"][0]["name"] == "fieldValidation"
            });
            assert!(found, "{}", r.kind);
        }
    }
}
