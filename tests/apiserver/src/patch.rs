//! Patches: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and
//! Kubernetes strategic merge patch, the last with the merge keys of the
//! kinds this server serves (what `kubectl apply` relies on).

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchError {
    /// The patch document itself is not valid (HTTP 400).
    Malformed(String),
    /// The patch is valid but cannot be applied to this object (HTTP 422).
    Failed(String),
}

/// RFC 7386: maps merge, `null` deletes, everything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn pointer_tokens(path: &str) -> Result<Vec<String>, PatchError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| PatchError::Malformed(format!("JSON pointer {path:?} must start with /")))?;
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn array_index(tok: &str, len: usize, allow_end: bool) -> Result<usize, PatchError> {
    if allow_end && tok == "-" {
        return Ok(len);
    }
    let i: usize = tok
        .parse()
        .map_err(|_| PatchError::Failed(format!("invalid array index {tok:?}")))?;
    let max = if allow_end {
        len
    } else {
        len.saturating_sub(1)
    };
    if i > max || (!allow_end && len == 0) {
        return Err(PatchError::Failed(format!("array index {i} out of bounds")));
    }
    Ok(i)
}

fn pointer_get<'a>(doc: &'a Value, path: &str) -> Result<&'a Value, PatchError> {
    let mut v = doc;
    for tok in pointer_tokens(path)? {
        v = match v {
            Value::Object(m) => m.get(&tok),
            Value::Array(a) => a.get(array_index(&tok, a.len(), false)?),
            _ => None,
        }
        .ok_or_else(|| PatchError::Failed(format!("path {path:?} does not exist")))?;
    }
    Ok(v)
}

/// The container holding `path`'s last token, and that token.
fn parent_mut<'a>(doc: &'a mut Value, path: &str) -> Result<(&'a mut Value, String), PatchError> {
    let mut toks = pointer_tokens(path)?;
    let last = toks
        .pop()
        .ok_or_else(|| PatchError::Failed("cannot operate on the whole document".into()))?;
    let mut v = doc;
    for tok in toks {
        v = match v {
            Value::Object(m) => m.get_mut(&tok),
            Value::Array(a) => {
                let i = array_index(&tok, a.len(), false)?;
                a.get_mut(i)
            }
            _ => None,
        }
        .ok_or_else(|| PatchError::Failed(format!("path {path:?} does not exist")))?;
    }
    Ok((v, last))
}

fn pointer_add(doc: &mut Value, path: &str, value: Value) -> Result<(), PatchError> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    match parent_mut(doc, path)? {
        (Value::Object(m), last) => {
            m.insert(last, value);
        }
        (Value::Array(a), last) => {
            let i = array_index(&last, a.len(), true)?;
            a.insert(i, value);
        }
        _ => return Err(PatchError::Failed(format!("path {path:?} does not exist"))),
    }
    Ok(())
}

fn pointer_remove(doc: &mut Value, path: &str) -> Result<Value, PatchError> {
    match parent_mut(doc, path)? {
        (Value::Object(m), last) => m
            .remove(&last)
            .ok_or_else(|| PatchError::Failed(format!("path {path:?} does not exist"))),
        (Value::Array(a), last) => {
            let i = array_index(&last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => Err(PatchError::Failed(format!("path {path:?} does not exist"))),
    }
}

/// RFC 6902.
pub fn json_patch(doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| PatchError::Malformed("a JSON patch must be an array".into()))?;
    let mut doc = doc.clone();
    for op in ops {
        let field = |name: &str| -> Result<&str, PatchError> {
            op.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| PatchError::Malformed(format!("operation {op} lacks {name:?}")))
        };
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| PatchError::Malformed(format!("operation {op} lacks \"value\"")))
        };
        let path = field("path")?;
        match field("op")? {
            "add" => pointer_add(&mut doc, path, value()?)?,
            "remove" => {
                pointer_remove(&mut doc, path)?;
            }
            "replace" => {
                pointer_get(&doc, path)?;
                if path.is_empty() {
                    doc = value()?;
                } else {
                    pointer_remove(&mut doc, path)?;
                    pointer_add(&mut doc, path, value()?)?;
                }
            }
            "move" => {
                let from = field("from")?;
                let v = pointer_remove(&mut doc, from)?;
                pointer_add(&mut doc, path, v)?;
            }
            "copy" => {
                let v = pointer_get(&doc, field("from")?)?.clone();
                pointer_add(&mut doc, path, v)?;
            }
            "test" => {
                if *pointer_get(&doc, path)? != value()? {
                    return Err(PatchError::Failed(format!("test failed at {path:?}")));
                }
            }
            other => {
                return Err(PatchError::Malformed(format!(
                    "unknown operation {other:?}"
                )));
            }
        }
    }
    Ok(doc)
}

/// How a list field is merged by a strategic merge patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListStrategy {
    /// Atomic: the patch's list replaces the object's.
    Replace,
    /// A list of maps merged element-wise by this key.
    MergeByKey(&'static str),
    /// A list of scalars merged as a set union.
    MergeScalars,
}

/// The `patchStrategy`/`patchMergeKey` of a list field of `kind`, addressed
/// by its dotted path from the object root (list indices left out).
pub fn list_strategy(kind: &str, path: &str) -> ListStrategy {
    use ListStrategy::*;
    match path {
        "metadata.ownerReferences" => return MergeByKey("uid"),
        "metadata.finalizers" => return MergeScalars,
        "status.conditions" => return MergeByKey("type"),
        _ => {}
    }
    match kind {
        "Pod" => {
            // The three container lists share the Container type.
            let path = ["spec.initContainers", "spec.ephemeralContainers"]
                .iter()
                .find_map(|p| path.strip_prefix(p))
                .map_or_else(|| path.to_string(), |rest| format!("spec.containers{rest}"));
            match path.as_str() {
                "spec.containers" => MergeByKey("name"),
                "spec.containers.ports" => MergeByKey("containerPort"),
                "spec.containers.env" => MergeByKey("name"),
                "spec.containers.volumeMounts" => MergeByKey("mountPath"),
                "spec.containers.volumeDevices" => MergeByKey("devicePath"),
                "spec.volumes" => MergeByKey("name"),
                "spec.imagePullSecrets" => MergeByKey("name"),
                "spec.hostAliases" => MergeByKey("ip"),
                "spec.topologySpreadConstraints" => MergeByKey("topologyKey"),
                "spec.resourceClaims" => MergeByKey("name"),
                "spec.schedulingGates" => MergeByKey("name"),
                "status.podIPs" => MergeByKey("ip"),
                "status.hostIPs" => MergeByKey("ip"),
                _ => Replace,
            }
        }
        "Service" if path == "spec.ports" => MergeByKey("port"),
        "Node" => match path {
            "spec.podCIDRs" => MergeScalars,
            "status.addresses" => MergeByKey("type"),
            _ => Replace,
        },
        _ => Replace,
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Applies a strategic merge patch to `doc`, an object of `kind`.
pub fn strategic_merge_patch(doc: &Value, patch: &Value, kind: &str) -> Result<Value, PatchError> {
    let Value::Object(patch) = patch else {
        return Err(PatchError::Malformed(
            "a strategic merge patch must be an object".into(),
        ));
    };
    let mut out = match doc {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    merge_map(&mut out, patch, kind, "")?;
    Ok(Value::Object(out))
}

fn directive(v: &Value) -> Option<&str> {
    v.get("$patch").and_then(Value::as_str)
}

/// A map patch applied to nothing: its content with directives resolved.
fn fresh_map(
    patch: &Map<String, Value>,
    kind: &str,
    path: &str,
) -> Result<Map<String, Value>, PatchError> {
    let mut m = Map::new();
    merge_map(&mut m, patch, kind, path)?;
    Ok(m)
}

fn merge_map(
    orig: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    kind: &str,
    path: &str,
) -> Result<(), PatchError> {
    match patch.get("$patch").map(|v| v.as_str()) {
        None | Some(Some("merge")) => {}
        Some(Some("replace")) => {
            let mut rest = patch.clone();
            rest.remove("$patch");
            *orig = fresh_map(&rest, kind, path)?;
            return Ok(());
        }
        Some(Some("delete")) => {
            orig.clear();
            return Ok(());
        }
        Some(other) => {
            return Err(PatchError::Malformed(format!(
                "unknown $patch directive {other:?}"
            )));
        }
    }
    let mut orders: Vec<(&str, &Vec<Value>)> = Vec::new();
    for (k, pv) in patch {
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            let list = pv
                .as_array()
                .ok_or_else(|| PatchError::Malformed(format!("{k} must be a list")))?;
            orders.push((field, list));
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let gone = pv
                .as_array()
                .ok_or_else(|| PatchError::Malformed(format!("{k} must be a list")))?;
            if let Some(Value::Array(list)) = orig.get_mut(field) {
                list.retain(|x| !gone.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        let sub = join(path, k);
        match (orig.get_mut(k), pv) {
            (_, Value::Null) => {
                orig.remove(k);
            }
            (_, Value::Object(_)) if directive(pv) == Some("delete") => {
                orig.remove(k);
            }
            (Some(Value::Object(om)), Value::Object(pm)) => merge_map(om, pm, kind, &sub)?,
            (Some(Value::Array(ol)), Value::Array(pl)) => {
                let merged = merge_list(ol, pl, kind, &sub)?;
                *ol = merged;
            }
            (_, Value::Object(pm)) => {
                orig.insert(k.clone(), Value::Object(fresh_map(pm, kind, &sub)?));
            }
            (_, Value::Array(pl)) => {
                orig.insert(k.clone(), Value::Array(merge_list(&[], pl, kind, &sub)?));
            }
            (_, scalar) => {
                orig.insert(k.clone(), scalar.clone());
            }
        }
    }
    for (field, order) in orders {
        let strategy = list_strategy(kind, &join(path, field));
        if let Some(Value::Array(list)) = orig.get_mut(field) {
            reorder(list, order, strategy);
        }
    }
    if let Some(retain) = patch.get("$retainKeys") {
        let retain = retain
            .as_array()
            .ok_or_else(|| PatchError::Malformed("$retainKeys must be a list".into()))?;
        orig.retain(|k, _| retain.iter().any(|r| r.as_str() == Some(k)));
    }
    Ok(())
}

fn merge_list(
    orig: &[Value],
    patch: &[Value],
    kind: &str,
    path: &str,
) -> Result<Vec<Value>, PatchError> {
    let strategy = list_strategy(kind, path);
    let replace = patch.iter().any(|v| directive(v) == Some("replace"));
    let items: Vec<&Value> = patch
        .iter()
        .filter(|v| directive(v) != Some("replace"))
        .collect();
    let base: &[Value] = if replace { &[] } else { orig };
    match strategy {
        ListStrategy::Replace => items
            .into_iter()
            .map(|v| match v {
                Value::Object(m) => fresh_map(m, kind, path).map(Value::Object),
                other => Ok(other.clone()),
            })
            .collect(),
        ListStrategy::MergeScalars => {
            let mut out = base.to_vec();
            for v in items {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
            Ok(out)
        }
        ListStrategy::MergeByKey(key) => {
            let mut out = base.to_vec();
            for v in items {
                let Value::Object(pm) = v else {
                    return Err(PatchError::Malformed(format!(
                        "{path}: expected a list of maps"
                    )));
                };
                let id = pm.get(key).ok_or_else(|| {
                    PatchError::Failed(format!("{path}: element lacks merge key {key:?}"))
                })?;
                let pos = out.iter().position(|o| o.get(key) == Some(id));
                match (directive(v), pos) {
                    (Some("delete"), Some(i)) => {
                        out.remove(i);
                    }
                    (Some("delete"), None) => {}
                    (_, Some(i)) => {
                        if let Value::Object(om) = &mut out[i] {
                            merge_map(om, pm, kind, path)?;
                        }
                    }
                    (_, None) => out.push(Value::Object(fresh_map(pm, kind, path)?)),
                }
            }
            Ok(out)
        }
    }
}

/// `$setElementOrder`: elements named by `order` come first, in that order;
/// the rest keep their relative order after them.
fn reorder(list: &mut Vec<Value>, order: &[Value], strategy: ListStrategy) {
    let rank = |v: &Value| {
        order.iter().position(|o| match strategy {
            ListStrategy::MergeByKey(key) => o.get(key).is_some() && o.get(key) == v.get(key),
            _ => o == v,
        })
    };
    let mut ranked: Vec<(usize, Value)> = list
        .drain(..)
        .enumerate()
        .map(|(i, v)| (rank(&v).unwrap_or(order.len() + i), v))
        .collect();
    ranked.sort_by_key(|(r, _)| *r);
    list.extend(ranked.into_iter().map(|(_, v)| v));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_merges_maps_deletes_nulls_and_replaces_lists() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2], "x": "y"});
        merge_patch(
            &mut doc,
            &json!({"a": {"b": null, "d": 4}, "l": [3], "x": {"z": 1}}),
        );
        assert_eq!(doc, json!({"a": {"c": 2, "d": 4}, "l": [3], "x": {"z": 1}}));
    }

    #[test]
    fn json_patch_applies_all_six_operations_in_order() {
        let doc = json!({"a": [1, 2], "b": {"c~/": 1}});
        let patch = json!([
            {"op": "add", "path": "/a/-", "value": 3},
            {"op": "add", "path": "/a/0", "value": 0},
            {"op": "remove", "path": "/a/1"},
            {"op": "replace", "path": "/b/c~0~1", "value": 5},
            {"op": "copy", "from": "/b", "path": "/d"},
            {"op": "move", "from": "/b", "path": "/e"},
            {"op": "test", "path": "/e/c~0~1", "value": 5},
        ]);
        assert_eq!(
            json_patch(&doc, &patch).unwrap(),
            json!({"a": [0, 2, 3], "d": {"c~/": 5}, "e": {"c~/": 5}})
        );
    }

    #[test]
    fn json_patch_reports_failed_tests_and_missing_paths_and_malformed_documents() {
        let doc = json!({"a": 1});
        assert!(matches!(
            json_patch(&doc, &json!([{"op": "test", "path": "/a", "value": 2}])),
            Err(PatchError::Failed(_))
        ));
        assert!(matches!(
            json_patch(&doc, &json!([{"op": "remove", "path": "/b"}])),
            Err(PatchError::Failed(_))
        ));
        assert!(matches!(
            json_patch(&doc, &json!([{"op": "replace", "path": "/b", "value": 1}])),
            Err(PatchError::Failed(_))
        ));
        assert!(matches!(
            json_patch(&doc, &json!({"op": "add"})),
            Err(PatchError::Malformed(_))
        ));
        assert!(matches!(
            json_patch(&doc, &json!([{"op": "frob", "path": "/a"}])),
            Err(PatchError::Malformed(_))
        ));
    }

    fn pod() -> Value {
        json!({
            "kind": "Pod",
            "metadata": {"name": "p", "labels": {"app": "web"}, "finalizers": ["a"]},
            "spec": {
                "containers": [
                    {"name": "web", "image": "nginx:1", "ports": [{"containerPort": 80, "protocol": "TCP"}],
                     "terminationMessagePath": "/dev/termination-log"},
                    {"name": "side", "image": "busybox", "args": ["sleep", "1"]}
                ],
                "tolerations": [{"key": "a"}]
            }
        })
    }

    #[test]
    fn strategic_patch_merges_containers_by_name_and_ports_by_container_port() {
        let patch = json!({"spec": {
            "$setElementOrder/containers": [{"name": "web"}, {"name": "side"}],
            "containers": [{
                "name": "web",
                "image": "nginx:2",
                "$setElementOrder/ports": [{"containerPort": 80}, {"containerPort": 443}],
                "ports": [{"containerPort": 443}]
            }]
        }});
        let out = strategic_merge_patch(&pod(), &patch, "Pod").unwrap();
        let web = &out["spec"]["containers"][0];
        assert_eq!(web["image"], "nginx:2");
        assert_eq!(web["terminationMessagePath"], "/dev/termination-log");
        assert_eq!(
            web["ports"],
            json!([{"containerPort": 80, "protocol": "TCP"}, {"containerPort": 443}])
        );
        assert_eq!(out["spec"]["containers"][1]["name"], "side");
    }

    #[test]
    fn strategic_patch_deletes_list_elements_by_key_and_replaces_atomic_lists() {
        let patch = json!({"spec": {
            "containers": [{"name": "side", "$patch": "delete"}],
            "tolerations": [{"key": "b"}]
        }});
        let out = strategic_merge_patch(&pod(), &patch, "Pod").unwrap();
        let names: Vec<&str> = out["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["web"]);
        assert_eq!(out["spec"]["tolerations"], json!([{"key": "b"}]));
    }

    #[test]
    fn strategic_patch_handles_nulls_primitive_lists_and_replace_directives() {
        let patch = json!({
            "metadata": {
                "labels": {"app": null, "tier": "fe"},
                "finalizers": ["b"],
                "$deleteFromPrimitiveList/finalizers": ["a"]
            },
            "spec": {"containers": [{"name": "web", "args": ["x"]}, {"$patch": "replace"}]}
        });
        let out = strategic_merge_patch(&pod(), &patch, "Pod").unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"tier": "fe"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
        assert_eq!(
            out["spec"]["containers"],
            json!([{"name": "web", "args": ["x"]}])
        );

        let out = strategic_merge_patch(
            &pod(),
            &json!({"metadata": {"$patch": "replace", "name": "q"}}),
            "Pod",
        )
        .unwrap();
        assert_eq!(out["metadata"], json!({"name": "q"}));
    }

    #[test]
    fn strategic_patch_set_element_order_reorders_merged_lists() {
        let patch =
            json!({"spec": {"$setElementOrder/containers": [{"name": "side"}, {"name": "web"}]}});
        let out = strategic_merge_patch(&pod(), &patch, "Pod").unwrap();
        assert_eq!(out["spec"]["containers"][0]["name"], "side");
        assert_eq!(out["spec"]["containers"][1]["name"], "web");
    }

    #[test]
    fn strategic_patch_retain_keys_drops_unlisted_fields() {
        let doc = json!({"spec": {"volumes": [{"name": "v", "emptyDir": {}}]}});
        let patch = json!({"spec": {"volumes": [
            {"name": "v", "$retainKeys": ["configMap", "name"], "configMap": {"name": "c"}}
        ]}});
        let out = strategic_merge_patch(&doc, &patch, "Pod").unwrap();
        assert_eq!(
            out["spec"]["volumes"],
            json!([{"name": "v", "configMap": {"name": "c"}}])
        );
    }

    #[test]
    fn network_policy_rules_are_atomic_and_service_ports_merge_by_port() {
        let np = json!({"spec": {"ingress": [{"from": [{"podSelector": {}}]}, {"ports": [{"port": 80}]}]}});
        let out = strategic_merge_patch(
            &np,
            &json!({"spec": {"ingress": [{"ports": [{"port": 81}]}]}}),
            "NetworkPolicy",
        )
        .unwrap();
        assert_eq!(out["spec"]["ingress"], json!([{"ports": [{"port": 81}]}]));

        let svc = json!({"spec": {"ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}});
        let out = strategic_merge_patch(
            &svc,
            &json!({"spec": {"ports": [{"port": 80, "targetPort": 9090}]}}),
            "Service",
        )
        .unwrap();
        assert_eq!(
            out["spec"]["ports"],
            json!([{"port": 80, "targetPort": 9090, "protocol": "TCP"}])
        );
    }

    #[test]
    fn strategic_patch_rejects_list_elements_without_their_merge_key() {
        let patch = json!({"spec": {"containers": [{"image": "x"}]}});
        assert!(matches!(
            strategic_merge_patch(&pod(), &patch, "Pod"),
            Err(PatchError::Failed(_))
        ));
    }
}
