//! What differs between kinds: validation of obviously malformed objects,
//! the defaults the real API server fills in, and `kubectl get` columns.

use serde_json::{Value, json};

use crate::{resources::Resource, util};

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(dns_label)
}

/// Whether `name` is a valid name for this kind.
pub fn valid_name(r: &Resource, name: &str) -> bool {
    match r.kind {
        "Namespace" | "Service" => dns_label(name),
        _ => dns_subdomain(name),
    }
}

fn is_string_map(v: &Value) -> bool {
    v.is_null()
        || v.as_object()
            .is_some_and(|m| m.values().all(Value::is_string))
}

/// Checks an object about to be stored; the error is the field message of a
/// 422 Invalid.
pub fn validate(r: &Resource, obj: &Value) -> Result<(), String> {
    let meta = &obj["metadata"];
    let name = meta["name"].as_str().unwrap_or_default();
    if !valid_name(r, name) {
        let what = if matches!(r.kind, "Namespace" | "Service") {
            "a lowercase RFC 1123 label"
        } else {
            "a lowercase RFC 1123 subdomain"
        };
        return Err(format!(
            "metadata.name: Invalid value: {name:?}: must be {what}"
        ));
    }
    for field in ["labels", "annotations"] {
        if !is_string_map(&meta[field]) {
            return Err(format!(
                "metadata.{field}: Invalid value: must map strings to strings"
            ));
        }
    }
    for field in ["spec", "status"] {
        if !(obj[field].is_null() || obj[field].is_object()) {
            return Err(format!("{field}: Invalid value: must be an object"));
        }
    }
    match r.kind {
        "Pod" => {
            let containers = obj["spec"]["containers"]
                .as_array()
                .map_or(&[][..], Vec::as_slice);
            if containers.is_empty() {
                return Err("spec.containers: Required value".into());
            }
            for (i, c) in containers.iter().enumerate() {
                for field in ["name", "image"] {
                    if c[field].as_str().unwrap_or_default().is_empty() {
                        return Err(format!("spec.containers[{i}].{field}: Required value"));
                    }
                }
            }
        }
        "Service" => {
            for (i, p) in obj["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                if !p["port"].as_u64().is_some_and(|n| (1..=65535).contains(&n)) {
                    return Err(format!(
                        "spec.ports[{i}].port: Invalid value: {}: must be between 1 and 65535, inclusive",
                        p["port"]
                    ));
                }
            }
        }
        "EndpointSlice"
            if !matches!(obj["addressType"].as_str(), Some("IPv4" | "IPv6" | "FQDN")) =>
        {
            return Err("addressType: Required value".into());
        }
        _ => {}
    }
    Ok(())
}

/// The elements of the list at `v[key]`, if there is one (indexing with
/// `v[key]` on a `&mut Value` would insert a null).
fn items<'a>(v: &'a mut Value, key: &str) -> impl Iterator<Item = &'a mut Value> {
    v.get_mut(key)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
}

fn default_protocols(v: &mut Value) {
    for p in items(v, "ports") {
        if p.is_object() && p.get("protocol").is_none() {
            p["protocol"] = json!("TCP");
        }
    }
}

fn set_default(obj: &mut Value, key: &str, value: Value) {
    if obj.is_object() && obj.get(key).is_none_or(Value::is_null) {
        obj[key] = value;
    }
}

/// Fills in the defaults the real API server applies on every write (a few,
/// chosen for what consumers look at: protocols, policy types, service IPs).
pub fn apply_defaults(r: &Resource, obj: &mut Value) {
    match r.kind {
        "Namespace" => {
            let name = obj["metadata"]["name"].clone();
            set_default(&mut obj["metadata"], "labels", json!({}));
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
            set_default(obj, "spec", json!({"finalizers": ["kubernetes"]}));
        }
        "Pod" => {
            let spec = &mut obj["spec"];
            set_default(spec, "restartPolicy", json!("Always"));
            set_default(spec, "dnsPolicy", json!("ClusterFirst"));
            set_default(spec, "terminationGracePeriodSeconds", json!(30));
            for list in ["initContainers", "containers"] {
                for c in items(spec, list) {
                    default_protocols(c);
                }
            }
        }
        "Service" => {
            let spec = &mut obj["spec"];
            set_default(spec, "type", json!("ClusterIP"));
            set_default(spec, "sessionAffinity", json!("None"));
            for p in items(spec, "ports") {
                set_default(p, "protocol", json!("TCP"));
                if p.get("targetPort").is_none() {
                    p["targetPort"] = p["port"].clone();
                }
            }
        }
        "NetworkPolicy" => {
            let spec = &mut obj["spec"];
            set_default(spec, "podSelector", json!({}));
            if spec["policyTypes"].as_array().is_none_or(Vec::is_empty) {
                let mut types = vec!["Ingress"];
                if spec["egress"].as_array().is_some_and(|e| !e.is_empty()) {
                    types.push("Egress");
                }
                spec["policyTypes"] = json!(types);
            }
            for dir in ["ingress", "egress"] {
                for rule in items(spec, dir) {
                    default_protocols(rule);
                }
            }
        }
        "EndpointSlice" => default_protocols(obj),
        _ => {}
    }
}

/// The status an object starts with, for kinds whose create ignores the
/// status sent (pods, services, namespaces), like the real API server.
pub fn initial_status(r: &Resource) -> Option<Value> {
    match r.kind {
        "Namespace" => Some(json!({"phase": "Active"})),
        "Pod" => Some(json!({"phase": "Pending"})),
        "Service" => Some(json!({"loadBalancer": {}})),
        _ => None,
    }
}

fn col(name: &str, priority: u8) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": "string", "format": format, "description": "", "priority": priority})
}

/// The `kubectl get` columns of a kind.
pub fn columns(r: &Resource) -> Value {
    let cols: &[(&str, u8)] = match r.kind {
        "Namespace" => &[("Name", 0), ("Status", 0), ("Age", 0)],
        "Pod" => &[
            ("Name", 0),
            ("Ready", 0),
            ("Status", 0),
            ("Restarts", 0),
            ("Age", 0),
            ("IP", 1),
            ("Node", 1),
        ],
        "Node" => &[
            ("Name", 0),
            ("Status", 0),
            ("Roles", 0),
            ("Age", 0),
            ("Version", 0),
        ],
        "Service" => &[
            ("Name", 0),
            ("Type", 0),
            ("Cluster-IP", 0),
            ("External-IP", 0),
            ("Port(s)", 0),
            ("Age", 0),
            ("Selector", 1),
        ],
        "NetworkPolicy" => &[("Name", 0), ("Pod-Selector", 0), ("Age", 0)],
        // The CRD's additionalPrinterColumns.
        "ClusterNetworkPolicy" => &[("Name", 0), ("Tier", 0), ("Priority", 0), ("Age", 0)],
        "EndpointSlice" => &[
            ("Name", 0),
            ("AddressType", 0),
            ("Ports", 0),
            ("Endpoints", 0),
            ("Age", 0),
        ],
        "Event" => &[
            ("Name", 0),
            ("Type", 0),
            ("Reason", 0),
            ("Object", 0),
            ("Note", 0),
        ],
        _ => &[("Name", 0), ("Age", 0)],
    };
    Value::Array(cols.iter().map(|(n, p)| col(n, *p)).collect())
}

fn str_or<'a>(v: &'a Value, default: &'a str) -> &'a str {
    v.as_str().filter(|s| !s.is_empty()).unwrap_or(default)
}

fn selector_text(v: &Value) -> String {
    let parts: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    if parts.is_empty() {
        "<none>".into()
    } else {
        parts.join(",")
    }
}

/// The `kubectl get` cells of an object, matching [`columns`].
pub fn cells(r: &Resource, obj: &Value, now: i64) -> Value {
    let name = obj["metadata"]["name"].clone();
    let age = obj["metadata"]["creationTimestamp"]
        .as_str()
        .and_then(util::parse_rfc3339)
        .map_or_else(|| "<unknown>".to_string(), |t| util::short_age(now - t));
    let (spec, status) = (&obj["spec"], &obj["status"]);
    match r.kind {
        "Namespace" => json!([name, str_or(&status["phase"], "Active"), age]),
        "Pod" => {
            let total = spec["containers"].as_array().map_or(0, Vec::len);
            let statuses = status["containerStatuses"]
                .as_array()
                .map_or(&[][..], Vec::as_slice);
            let ready = statuses.iter().filter(|s| s["ready"] == true).count();
            let restarts: u64 = statuses
                .iter()
                .filter_map(|s| s["restartCount"].as_u64())
                .sum();
            json!([
                name,
                format!("{ready}/{total}"),
                str_or(&status["reason"], str_or(&status["phase"], "Unknown")),
                restarts,
                age,
                str_or(&status["podIP"], "<none>"),
                str_or(&spec["nodeName"], "<none>"),
            ])
        }
        "Node" => {
            let ready = status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready")
                .map_or("Unknown", |c| {
                    if c["status"] == "True" {
                        "Ready"
                    } else {
                        "NotReady"
                    }
                });
            json!([
                name,
                ready,
                "<none>",
                age,
                str_or(&status["nodeInfo"]["kubeletVersion"], "")
            ])
        }
        "Service" => {
            let ports: Vec<String> = spec["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("{}/{}", p["port"], str_or(&p["protocol"], "TCP")))
                .collect();
            let ports = if ports.is_empty() {
                "<none>".into()
            } else {
                ports.join(",")
            };
            json!([
                name,
                str_or(&spec["type"], "ClusterIP"),
                str_or(&spec["clusterIP"], "<none>"),
                "<none>",
                ports,
                age,
                selector_text(&spec["selector"]),
            ])
        }
        "NetworkPolicy" => json!([
            name,
            selector_text(&spec["podSelector"]["matchLabels"]),
            age
        ]),
        "ClusterNetworkPolicy" => json!([
            name,
            str_or(&spec["tier"], "<none>"),
            spec["priority"]
                .as_i64()
                .map_or_else(|| "<none>".into(), |p| p.to_string()),
            age
        ]),
        "EndpointSlice" => {
            let join = |items: Vec<String>| {
                if items.is_empty() {
                    "<unset>".to_string()
                } else {
                    items.join(",")
                }
            };
            let ports = obj["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| p["port"].to_string())
                .collect();
            let addrs = obj["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|e| e["addresses"].as_array().into_iter().flatten())
                .filter_map(|a| a.as_str().map(String::from))
                .collect();
            json!([
                name,
                str_or(&obj["addressType"], ""),
                join(ports),
                join(addrs),
                age
            ])
        }
        "Event" => {
            let regarding = &obj["regarding"];
            json!([
                name,
                str_or(&obj["type"], ""),
                str_or(&obj["reason"], ""),
                format!(
                    "{}/{}",
                    str_or(&regarding["kind"], "").to_lowercase(),
                    str_or(&regarding["name"], "")
                ),
                str_or(&obj["note"], "")
            ])
        }
        _ => json!([name, age]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    #[test]
    fn names_must_be_lowercase_dns_names() {
        let pods = find("", "v1", "pods").unwrap();
        let ns = find("", "v1", "namespaces").unwrap();
        assert!(valid_name(pods, "web-1.example"));
        assert!(!valid_name(pods, "Web"));
        assert!(!valid_name(pods, "-web"));
        assert!(!valid_name(pods, ""));
        assert!(!valid_name(ns, "a.b"));
        assert!(valid_name(ns, "demo"));
    }

    #[test]
    fn pods_without_containers_or_images_are_invalid() {
        let pods = find("", "v1", "pods").unwrap();
        let ok = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
        assert_eq!(validate(pods, &ok), Ok(()));
        let no_image = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}});
        assert_eq!(
            validate(pods, &no_image),
            Err("spec.containers[0].image: Required value".into())
        );
        let none = json!({"metadata": {"name": "p"}, "spec": {}});
        assert!(validate(pods, &none).is_err());
        let bad_labels =
            json!({"metadata": {"name": "p", "labels": {"a": 1}}, "spec": ok["spec"].clone()});
        assert!(validate(pods, &bad_labels).is_err());
    }

    #[test]
    fn network_policies_default_policy_types_and_protocols_like_the_real_server() {
        let np = find("networking.k8s.io", "v1", "networkpolicies").unwrap();
        let mut obj = json!({"metadata": {"name": "n"}, "spec": {
            "podSelector": {}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}, {"port": 443}]}]
        }});
        apply_defaults(np, &mut obj);
        assert_eq!(obj["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        assert_eq!(obj["spec"]["egress"][0]["ports"][0]["protocol"], "UDP");
        assert_eq!(obj["spec"]["egress"][0]["ports"][1]["protocol"], "TCP");
        assert!(obj["spec"].get("ingress").is_none(), "no null lists appear");
        let mut ingress_only = json!({"metadata": {"name": "n"}, "spec": {"podSelector": {}}});
        apply_defaults(np, &mut ingress_only);
        assert_eq!(ingress_only["spec"]["policyTypes"], json!(["Ingress"]));
    }

    #[test]
    fn namespaces_get_their_name_label() {
        let ns = find("", "v1", "namespaces").unwrap();
        let mut obj = json!({"metadata": {"name": "demo"}});
        apply_defaults(ns, &mut obj);
        assert_eq!(
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"],
            "demo"
        );
    }

    #[test]
    fn pod_defaults_fill_port_protocols_without_inventing_fields() {
        let pods = find("", "v1", "pods").unwrap();
        let mut obj = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "a", "image": "i", "ports": [{"containerPort": 53, "protocol": "UDP"}, {"containerPort": 80}]},
            {"name": "b", "image": "i"}
        ]}});
        apply_defaults(pods, &mut obj);
        let c = &obj["spec"]["containers"];
        assert_eq!(c[0]["ports"][0]["protocol"], "UDP");
        assert_eq!(c[0]["ports"][1]["protocol"], "TCP");
        assert!(c[1].get("ports").is_none());
        assert!(obj["spec"].get("initContainers").is_none());
        assert_eq!(obj["spec"]["restartPolicy"], "Always");
    }

    #[test]
    fn pod_cells_show_phase_ip_and_node() {
        let pods = find("", "v1", "pods").unwrap();
        let obj = json!({
            "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "c"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.0.0.5"}
        });
        let now = util::parse_rfc3339("2026-01-01T00:00:30Z").unwrap();
        assert_eq!(
            cells(pods, &obj, now),
            json!(["p", "0/1", "Running", 0, "30s", "10.0.0.5", "n1"])
        );
        assert_eq!(columns(pods).as_array().unwrap().len(), 7);
    }
}
