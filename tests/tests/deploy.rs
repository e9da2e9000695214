//! `deploy/sluice.yaml` against what the agent and plugin need: the RBAC
//! rules cover every kind the agent watches and the Events it posts, the
//! agent learns its node name, and the shipped conflist is one the plugin
//! accepts (ranges from the Node's podCIDRs). No kernel, no cluster.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside #[test] fns (clippy.toml covers only those): a panic is the failure report"
)]

use serde::Deserialize as _;
use serde_json::Value;
use sluice_agent::model::Kind;

fn documents() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/sluice.yaml");
    let text = std::fs::read_to_string(path).expect("deploy/sluice.yaml");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("a YAML document"))
        .collect()
}

fn of_kind(docs: &[Value], kind: &str) -> Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0].clone()
}

/// Does a rule of `role` grant `verb` on `group`/`resource`?
fn grants(role: &Value, group: &str, resource: &str, verb: &str) -> bool {
    let has = |v: &Value, x: &str| {
        v.as_array()
            .is_some_and(|a| a.iter().any(|e| e == x || e == "*"))
    };
    role["rules"].as_array().unwrap().iter().any(|r| {
        has(&r["apiGroups"], group) && has(&r["resources"], resource) && has(&r["verbs"], verb)
    })
}

#[test]
fn the_cluster_role_lets_the_agent_watch_every_kind_it_watches_and_post_events() {
    let docs = documents();
    let role = of_kind(&docs, "ClusterRole");
    for kind in Kind::ALL {
        let (group, resource) = match kind {
            Kind::Pod => ("", "pods"),
            Kind::Namespace => ("", "namespaces"),
            Kind::Node => ("", "nodes"),
            Kind::Service => ("", "services"),
            Kind::NetworkPolicy => ("networking.k8s.io", "networkpolicies"),
            Kind::ClusterNetworkPolicy => ("policy.networking.k8s.io", "clusternetworkpolicies"),
        };
        for verb in ["get", "list", "watch"] {
            assert!(grants(&role, group, resource, verb), "{verb} {resource}");
        }
    }
    // kube's event Recorder creates, then patches a series.
    for verb in ["create", "patch"] {
        assert!(
            grants(&role, "events.k8s.io", "events", verb),
            "{verb} events"
        );
    }
    let binding = of_kind(&docs, "ClusterRoleBinding");
    let account = of_kind(&docs, "ServiceAccount");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], account["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0]["namespace"],
        account["metadata"]["namespace"]
    );
    let ds = of_kind(&docs, "DaemonSet");
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        account["metadata"]["name"]
    );
}

#[test]
fn the_agent_knows_its_node_and_the_shipped_conflist_takes_ranges_from_it() {
    let docs = documents();
    let ds = of_kind(&docs, "DaemonSet");
    let agent = &ds["spec"]["template"]["spec"]["containers"][0];
    let env = agent["env"].as_array().expect("env");
    assert!(
        env.iter().any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
        "NODE_NAME from spec.nodeName"
    );
    let cm = of_kind(&docs, "ConfigMap");
    let conflist: Value =
        serde_json::from_str(cm["data"]["10-sluice.conflist"].as_str().expect("conflist"))
            .expect("conflist JSON");
    // What a runtime hands the plugin: the list's name and version, and
    // the plugin's own keys.
    let mut conf = conflist["plugins"][0].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    conf["name"] = conflist["name"].clone();
    assert_eq!(conf["type"], "sluice");
    let parsed =
        sluice_cni::config::parse(conf.to_string().as_bytes()).expect("the plugin accepts it");
    assert_eq!(parsed.ranges, None, "addresses from the Node's podCIDRs");
    let socket = agent["command"]
        .as_array()
        .unwrap()
        .windows(2)
        .find(|w| w[0] == "--socket")
        .map(|w| w[1].as_str().unwrap().to_owned())
        .expect("--socket");
    assert_eq!(parsed.agent_socket.to_string_lossy(), socket);
}

#[test]
fn the_agent_attaches_to_host_to_the_host_cgroup_root_not_its_own() {
    let docs = documents();
    let ds = of_kind(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let agent = &pod["containers"][0];
    let arg = |name: &str| {
        agent["command"]
            .as_array()
            .unwrap()
            .windows(2)
            .find(|w| w[0] == name)
            .map(|w| w[1].as_str().unwrap().to_owned())
    };
    let cgroup = arg("--host-cgroup").expect("--host-cgroup");
    let mount = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == cgroup.as_str())
        .expect("a volume mounted at --host-cgroup");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("its volume");
    assert_eq!(volume["hostPath"]["path"], "/sys/fs/cgroup");
}
