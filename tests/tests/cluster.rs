//! Cluster mode end to end: the real agent watches the test API server
//! through a kubeconfig, compiles NetworkPolicies and enforces them on pods
//! wired by the real plugin; every check waits for the agent to report the
//! object's resourceVersion programmed instead of sleeping.
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::{Value, json};
use sluice_test_apiserver::{
    Config, Server as ApiServer, ServerHandle, resource_version, resources,
};
use sluice_tests::{ApiNode, NetNs, Node, Pod, Server, cni_env, eventually, tcp_ok};

const NODE: &str = "node-1";
const SHORT: Duration = Duration::from_millis(400);
/// A single try that should connect: room for a loaded 2-core machine
/// (a denied one waits for its whole timeout, so it gets `SHORT`).
const OPEN: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(10);

fn res(plural: &str) -> Result<&'static resources::Resource> {
    resources::by_plural(plural).context("resource")
}

fn create(api: &ServerHandle, obj: Value) -> Result<String> {
    Ok(resource_version(&api.create(obj)?))
}

fn pod(ns: &str, name: &str, label: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"pod": label}},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "none",
            "ports": [{"containerPort": 80, "name": "serve-80-tcp", "protocol": "TCP"}]}]}
    })
}

/// A node whose agent watches a fresh test API server: (node, server,
/// the plugin config for its pods).
/// Pods a, b and c of namespace `ns` (in the API already) wired on `node`
/// (agent started), a server on b's port 80 that c reaches, then the
/// NetworkPolicy `only-a` admitting only a to b's `serve-80-tcp`,
/// programmed. The explain and assert tests' common start.
fn only_a_reaches_b(
    node: &mut Node,
    api: &ServerHandle,
    config: &str,
    ns: &str,
) -> Result<([Pod; 3], Server)> {
    node.start_agent()?;
    let a = Pod::add_as(node, config, Some((ns, "a")))?;
    let b = Pod::add_as(node, config, Some((ns, "b")))?;
    let c = Pod::add_as(node, config, Some((ns, "c")))?;
    let srv = Server::start(&b.ns, 80)?;
    let b4 = b.ipv4.context("v4")?;
    assert!(eventually(WAIT, || tcp_ok(&c.ns, b4, 80, SHORT)));
    let rv = create(
        api,
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "only-a", "namespace": ns},
            "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}],
                                  "ports": [{"port": "serve-80-tcp"}]}]}
        }),
    )?;
    node.wait_programmed(&format!("NetworkPolicy/{ns}/only-a"), Some(&rv), WAIT)?;
    Ok(([a, b, c], srv))
}

fn cluster() -> Result<(Node, ServerHandle, String)> {
    let ApiNode { node, api, config } = ApiNode::new(NODE, "10.120.0.0/24", "fd00:120::/64")?;
    Ok((node, api, config))
}

#[test]
fn a_networkpolicy_applied_to_the_api_server_is_enforced_once_the_agent_reports_it_programmed()
-> Result<()> {
    let (mut node, api, config) = cluster()?;
    api.create_namespace("x")?;
    for (name, label) in [("a", "a"), ("b", "b"), ("c", "c")] {
        create(&api, pod("x", name, label))?;
    }
    node.start_agent()?;
    let a = Pod::add_as(&node, &config, Some(("x", "a")))?;
    let b = Pod::add_as(&node, &config, Some(("x", "b")))?;
    let c = Pod::add_as(&node, &config, Some(("x", "c")))?;
    let _srv = Server::start(&b.ns, 80)?;
    let b4 = b.ipv4.context("v4")?;
    let b6 = b.ipv6.context("v6")?;
    assert!(
        eventually(WAIT, || tcp_ok(&c.ns, b4, 80, SHORT)),
        "open before any policy"
    );

    let rv = create(
        &api,
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "allow-a-to-b", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}],
                                  "ports": [{"port": "serve-80-tcp"}]}]}
        }),
    )?;
    node.wait_programmed("NetworkPolicy/x/allow-a-to-b", Some(&rv), WAIT)?;
    for ip in [b4, b6] {
        assert!(
            tcp_ok(&a.ns, ip, 80, OPEN),
            "a -> b:80 allowed by the named port ({ip})"
        );
        assert!(!tcp_ok(&c.ns, ip, 80, SHORT), "c -> b denied ({ip})");
    }

    // The metrics say what happened: packets passed both ways, c's denied
    // SYNs at b's ingress, b's entries, every watch up, each pass timed.
    let m = node.metrics()?;
    let get = |series: &str| {
        m.get(series)
            .copied()
            .with_context(|| format!("{series} in {m:?}"))
    };
    for dir in ["ingress", "egress"] {
        assert!(
            get(&format!(
                "sluice_forwarded_packets_total{{direction=\"{dir}\"}}"
            ))? > 0.0
        );
    }
    assert!(
        get(r#"sluice_dropped_packets_total{reason="policy-denied",direction="ingress"}"#)? >= 2.0
    );
    let entries = |pod: &str| {
        m.iter()
            .find(|(k, _)| {
                k.starts_with("sluice_policy_entries{") && k.ends_with(&format!("pod=\"{pod}\"}}"))
            })
            .map(|(_, v)| *v)
            .with_context(|| format!("entries of {pod}"))
    };
    assert!(entries("b")? > 0.0);
    assert_eq!(entries("c")?, 0.0, "no policy selects c");
    assert_eq!(get("sluice_endpoints")?, 3.0);
    assert!(get(r#"sluice_map_pressure{map="POLICY"}"#)? > 0.0);
    assert!(get(r#"sluice_map_pressure{map="IPCACHE"}"#)? > 0.0);
    for kind in ["Pod", "Namespace", "NetworkPolicy", "Node", "Service"] {
        assert_eq!(
            get(&format!("sluice_watch_up{{kind=\"{kind}\"}}"))?,
            1.0,
            "{kind}"
        );
    }
    assert!(get("sluice_compile_duration_seconds_count")? > 0.0);
    assert!(get("sluice_apply_to_programmed_seconds_count")? > 0.0);
    // Beside the metrics: alive, and ready once the data path is loaded.
    for path in ["/healthz", "/readyz"] {
        let (head, _) = node.http_get(path)?;
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    }

    // Relabel a: it no longer matches the peer selector.
    let mut relabelled = api.get("pods", "x", "a").context("pod a")?;
    relabelled["metadata"]["labels"]["pod"] = json!("renamed");
    let updated = api.update(relabelled, sluice_test_apiserver::store::Part::Main)?;
    let rv = resource_version(&updated);
    node.wait_programmed("Pod/x/a", Some(&rv), WAIT)?;
    assert!(!tcp_ok(&a.ns, b4, 80, SHORT), "a relabelled: denied");

    // Delete the policy: b is open again.
    api.delete("networkpolicies", "x", "allow-a-to-b")?;
    node.wait_programmed("NetworkPolicy/x/allow-a-to-b", None, WAIT)?;
    assert!(tcp_ok(&c.ns, b4, 80, OPEN), "no policy selects b any more");
    Ok(())
}

#[test]
fn a_policy_the_agent_cannot_use_denies_and_is_reported_as_a_warning_event() -> Result<()> {
    let (mut node, api, config) = cluster()?;
    api.create_namespace("w")?;
    for name in ["client", "server"] {
        create(&api, pod("w", name, name))?;
    }
    node.start_agent()?;
    let client = Pod::add_as(&node, &config, Some(("w", "client")))?;
    let server = Pod::add_as(&node, &config, Some(("w", "server")))?;
    let _srv = Server::start(&server.ns, 80)?;
    let to = server.ipv4.context("v4")?;
    assert!(eventually(WAIT, || tcp_ok(&client.ns, to, 80, SHORT)));
    // The only peer has an operator the API does not know (this test
    // server does not validate selectors; a real one would refuse it).
    let rv = create(
        &api,
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "bad-operator", "namespace": "w"},
            "spec": {"podSelector": {"matchLabels": {"pod": "server"}},
                     "ingress": [{"from": [{"podSelector": {"matchExpressions":
                         [{"key": "pod", "operator": "Bogus", "values": ["client"]}]}}]}]}
        }),
    )?;
    node.wait_programmed("NetworkPolicy/w/bad-operator", Some(&rv), WAIT)?;
    assert!(
        !tcp_ok(&client.ns, to, 80, SHORT),
        "the unusable rule denies, never opens"
    );
    let uid = api
        .get("networkpolicies", "w", "bad-operator")
        .context("policy")?["metadata"]["uid"]
        .clone();
    let events = res("events")?;
    let mut found = None;
    let posted = eventually(WAIT, || {
        found = api
            .with_store(|s| s.list(events, &Default::default()))
            .into_iter()
            .find(|e| e["regarding"]["name"] == "bad-operator");
        found.is_some()
    });
    assert!(posted, "no Event about the policy");
    let e = found.context("event")?;
    assert_eq!(e["metadata"]["namespace"], "w");
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["reason"], "InvalidNetworkPolicy");
    assert_eq!(e["reportingController"], "sluice-agent");
    assert_eq!(e["reportingInstance"], NODE);
    assert_eq!(e["regarding"]["kind"], "NetworkPolicy");
    assert_eq!(e["regarding"]["uid"], uid);
    let note = e["note"].as_str().expect("an Event has a note");
    assert!(note.contains("Bogus"), "{note}");
    Ok(())
}

#[test]
fn a_pod_added_before_the_watch_delivers_it_starts_with_its_policy_in_force() -> Result<()> {
    let (mut node, api, config) = cluster()?;
    api.create_namespace("y")?;
    create(
        &api,
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-all", "namespace": "y"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
        }),
    )?;
    create(&api, pod("y", "client", "client"))?;
    node.start_agent()?;
    let client = Pod::add_as(&node, &config, Some(("y", "client")))?;
    // The server pod is in the API, but no watch has seen it: ADD must
    // fetch it and start it with the deny-all in force.
    api.create_unwatched(pod("y", "server", "server"))?;
    let server = Pod::add_as(&node, &config, Some(("y", "server")))?;
    let _srv = Server::start(&server.ns, 80)?;
    assert!(
        !tcp_ok(&client.ns, server.ipv4.context("v4")?, 80, SHORT),
        "deny-all holds from the first packet"
    );
    Ok(())
}

#[test]
fn add_for_a_pod_the_api_server_does_not_have_fails_with_11_and_leaves_nothing() -> Result<()> {
    let (mut node, api, config) = cluster()?;
    api.create_namespace("y")?;
    node.start_agent()?;
    let before = node.ns.veths()?;
    let ns = NetNs::new("sl-pod")?;
    let netns = ns.path().to_string_lossy().into_owned();
    let mut env = cni_env("ADD", "ctrghost", &netns);
    env.push(("CNI_ARGS", "K8S_POD_NAMESPACE=y;K8S_POD_NAME=ghost"));
    let out = node.plugin(&env, &config)?;
    let err = out.json()?;
    assert_ne!(out.code, 0);
    assert_eq!(err["code"], json!(11), "{err}");
    assert!(
        err["msg"]
            .as_str()
            .expect("an error object has a msg")
            .contains("y/ghost"),
        "{err}"
    );
    assert_eq!(err["details"], json!("pods \"ghost\" not found (NotFound)"));
    // Nothing left: no veth on either side, no address reserved.
    assert_eq!(node.ns.veths()?, before);
    assert!(ns.veths()?.is_empty());
    let reserved: Vec<_> = std::fs::read_dir(node.ipam_dir())
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|net| {
            std::fs::read_dir(net.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter(|f| {
            f.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<std::net::IpAddr>().is_ok())
        })
        .map(|f| f.path())
        .collect();
    assert!(reserved.is_empty(), "{reserved:?}");
    Ok(())
}

#[test]
fn during_an_api_server_outage_the_programmed_policy_stays_and_a_relist_catches_up() -> Result<()> {
    let (mut node, api, config) = cluster()?;
    let addr = api.addr();
    api.create_namespace("z")?;
    create(&api, pod("z", "client", "client"))?;
    create(&api, pod("z", "server", "server"))?;
    let rv = create(
        &api,
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-all", "namespace": "z"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
        }),
    )?;
    node.start_agent()?;
    let client = Pod::add_as(&node, &config, Some(("z", "client")))?;
    let server = Pod::add_as(&node, &config, Some(("z", "server")))?;
    let _srv = Server::start(&server.ns, 80)?;
    let ip = server.ipv4.context("v4")?;
    node.wait_programmed("NetworkPolicy/z/deny-all", Some(&rv), WAIT)?;
    assert!(!tcp_ok(&client.ns, ip, 80, SHORT), "deny-all in force");

    // Outage: the API server goes away. Nothing opens.
    let mut store = api.stop();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !tcp_ok(&client.ns, ip, 80, SHORT),
        "deny-all still in force during the outage"
    );

    // Meanwhile the policy is deleted and the history compacted, so the
    // agent's watches come back to a 410 Gone and must re-list.
    let np = res("networkpolicies")?;
    store
        .delete(np, Some("z"), "deny-all", (None, None))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    store.compact();
    let api = node.ns.run(move || {
        ApiServer::start_with_store(
            Config {
                listen: addr,
                ..Config::default()
            },
            store,
        )
    })??;
    node.wait_programmed("NetworkPolicy/z/deny-all", None, Duration::from_secs(60))?;
    assert!(
        tcp_ok(&client.ns, ip, 80, OPEN),
        "policy gone after the re-list"
    );
    drop(api);
    Ok(())
}

#[test]
fn an_egress_named_port_towards_an_ip_block_reaches_the_pod_that_has_the_port_and_no_other()
-> Result<()> {
    let (mut node, api, config) = cluster()?;
    api.create_namespace("x")?;
    let with_port = |name: &str, port_name: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "x", "labels": {"pod": name}},
            "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "none",
                "ports": [{"containerPort": 80, "name": port_name, "protocol": "TCP"}]}]}
        })
    };
    create(&api, pod("x", "a", "a"))?;
    create(&api, with_port("b", "web"))?;
    create(&api, with_port("c", "other"))?;
    node.start_agent()?;
    let a = Pod::add_as(&node, &config, Some(("x", "a")))?;
    let b = Pod::add_as(&node, &config, Some(("x", "b")))?;
    let c = Pod::add_as(&node, &config, Some(("x", "c")))?;
    let _srv_b = Server::start(&b.ns, 80)?;
    let _srv_c = Server::start(&c.ns, 80)?;
    let targets = [
        (b.ipv4.context("b v4")?, true),
        (b.ipv6.context("b v6")?, true),
        (c.ipv4.context("c v4")?, false),
        (c.ipv6.context("c v6")?, false),
    ];
    for (ip, _) in targets {
        assert!(
            eventually(WAIT, || tcp_ok(&a.ns, ip, 80, SHORT)),
            "open before any policy ({ip})"
        );
    }

    // Both pods are inside the blocks and serve on 80; only b names it `web`.
    let rv = create(
        &api,
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "web-by-block", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                     "egress": [{"to": [{"ipBlock": {"cidr": "10.120.0.0/24"}},
                                        {"ipBlock": {"cidr": "fd00:120::/64"}}],
                                 "ports": [{"port": "web"}]}]}
        }),
    )?;
    node.wait_programmed("NetworkPolicy/x/web-by-block", Some(&rv), WAIT)?;
    for (ip, allowed) in targets {
        assert_eq!(
            tcp_ok(&a.ns, ip, 80, SHORT),
            allowed,
            "a -> {ip}:80 (the pod there names port 80 `web`: {allowed})"
        );
    }
    Ok(())
}

#[path = "cluster/assert.rs"]
mod assert;
#[path = "cluster/audit.rs"]
mod audit;
#[path = "cluster/explain.rs"]
mod explain;
#[path = "cluster/flows.rs"]
mod flows;
#[path = "cluster/lint.rs"]
mod lint;
#[path = "cluster/restart.rs"]
mod restart;
#[path = "cluster/tiers.rs"]
mod tiers;

#[path = "cluster/isolation.rs"]
mod isolation;
