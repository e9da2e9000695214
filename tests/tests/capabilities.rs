//! The agent runs with exactly the capabilities deploy/sluice.yaml gives
//! its container, and needs each of them. The list is read from the
//! manifest, and the agent is started under `setpriv` as a container
//! runtime starts it: uid 0, the bounding set cut to that list (so the
//! permitted and effective sets are that list), no inheritable or ambient
//! capabilities, no_new_privs (`allowPrivilegeEscalation: false`). Root.
use std::{collections::BTreeSet, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Deserialize as _;
use serde_json::{Value, json};
use sluice_tests::{ApiNode, Node, Pod, Server, TempDir, eventually, tcp_ok};

const NODE: &str = "node-1";
const SHORT: Duration = Duration::from_millis(400);
/// A single try that should connect: room for a loaded 2-core machine
/// (a denied one waits for its whole timeout, so it gets `SHORT`).
const OPEN: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(10);

/// The agent container of the DaemonSet.
fn agent_container() -> Result<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/sluice.yaml");
    let text = std::fs::read_to_string(path)?;
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc)?;
        if v["kind"] == "DaemonSet" {
            return Ok(v["spec"]["template"]["spec"]["containers"][0].clone());
        }
    }
    bail!("no DaemonSet in {path}")
}

/// `securityContext.capabilities.add`, after a `drop: [ALL]`.
fn manifest_caps() -> Result<Vec<String>> {
    let agent = agent_container()?;
    let caps = &agent["securityContext"]["capabilities"];
    ensure!(caps["drop"] == json!(["ALL"]), "drop: [ALL] first: {caps}");
    ensure!(
        agent["securityContext"]["privileged"].is_null(),
        "not privileged"
    );
    caps["add"]
        .as_array()
        .context("capabilities.add")?
        .iter()
        .map(|c| c.as_str().map(str::to_owned).context("a name"))
        .collect()
}

/// Bit numbers of the capabilities a manifest might name (capabilities(7)).
fn cap_bit(name: &str) -> Result<u32> {
    Ok(match name {
        "CHOWN" => 0,
        "DAC_OVERRIDE" => 1,
        "FOWNER" => 3,
        "NET_BIND_SERVICE" => 10,
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => bail!("capability {other}: add it to cap_bit"),
    })
}

/// `setpriv` as a runtime sets the container up, with `caps` only.
fn under_caps(caps: &[String]) -> Vec<String> {
    let bounding: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    vec![
        "setpriv".into(),
        "--no-new-privs".into(),
        "--inh-caps=-all".into(),
        "--ambient-caps=-all".into(),
        format!("--bounding-set=-all,{}", bounding.join(",")),
        "--".into(),
    ]
}

/// `CapEff` of a process, as a bit mask.
fn effective_caps(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("CapEff")?;
    Ok(u64::from_str_radix(hex.trim(), 16)?)
}

fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "x", "labels": {"pod": name}},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "none"}]}
    })
}

#[test]
fn with_only_the_daemonsets_capabilities_the_agent_gets_ready_writes_the_conflist_and_enforces()
-> Result<()> {
    let caps = manifest_caps()?;
    let ApiNode {
        mut node,
        api,
        config,
    } = ApiNode::new(NODE, "10.121.0.0/24", "fd00:121::/64")?;
    api.create_namespace("x")?;
    for name in ["a", "b", "c"] {
        api.create(pod(name))?;
    }
    let conf = TempDir::new("sluice-caps-conf-")?;
    let conflist = conf.0.join("src/10-sluice.conflist");
    std::fs::create_dir_all(conf.0.join("src"))?;
    std::fs::write(
        &conflist,
        r#"{"cniVersion":"1.0.0","name":"sluice","plugins":[{"type":"sluice"}]}"#,
    )?;
    let net_d = conf.0.join("net.d");
    node.agent_args.extend([
        "--cni-conf-dir".into(),
        net_d.to_string_lossy().into_owned(),
        "--cni-conflist".into(),
        conflist.to_string_lossy().into_owned(),
    ]);
    node.agent_wrapper = under_caps(&caps);
    node.start_agent()?;

    // The agent runs with exactly those capabilities.
    let mut want = 0u64;
    for c in &caps {
        want |= 1 << cap_bit(c)?;
    }
    let pid = node.agent_pid().context("agent pid")?;
    assert_eq!(
        effective_caps(pid)?,
        want,
        "effective capabilities are {caps:?}"
    );

    // Ready (synced, attached, serving), healthy, and the conflist written.
    assert!(
        eventually(Duration::from_secs(60), || node
            .http_get("/readyz")
            .is_ok_and(|(head, _)| head.starts_with("HTTP/1.1 200"))),
        "/readyz"
    );
    let (head, body) = node.http_get("/healthz")?;
    assert!(head.starts_with("HTTP/1.1 200"), "/healthz: {head} {body}");
    assert!(
        eventually(WAIT, || net_d.join("10-sluice.conflist").exists()),
        "conflist written once ready"
    );

    // Pods get endpoints (TCX or clsact attach, map writes) and a policy
    // is enforced.
    let a = Pod::add_as(&node, &config, Some(("x", "a")))?;
    let b = Pod::add_as(&node, &config, Some(("x", "b")))?;
    let c = Pod::add_as(&node, &config, Some(("x", "c")))?;
    let _srv = Server::start(&b.ns, 80)?;
    let b4 = b.ipv4.context("v4")?;
    let rv = sluice_test_apiserver::resource_version(&api.create(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-a", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}
    }))?);
    node.wait_programmed("NetworkPolicy/x/allow-a", Some(&rv), WAIT)?;
    assert!(tcp_ok(&a.ns, b4, 80, OPEN), "a -> b allowed");
    assert!(!tcp_ok(&c.ns, b4, 80, SHORT), "c -> b denied");
    // Drop events (the ring buffer read) name the pods.
    assert!(
        eventually(WAIT, || !node
            .events_matching(|e| e["src_pod"] == "c" && e["dst_pod"] == "b")
            .is_empty()),
        "a drop event naming c and b"
    );
    for p in [&a, &b, &c] {
        let out = p.del(&node, &config)?;
        ensure!(out.code == 0, "DEL: {out:?}");
    }
    Ok(())
}

#[test]
fn without_any_one_of_the_daemonsets_capabilities_the_agent_does_not_start() -> Result<()> {
    let caps = manifest_caps()?;
    let set: BTreeSet<&String> = caps.iter().collect();
    ensure!(set.len() == caps.len(), "no capability twice: {caps:?}");
    for dropped in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        let mut node = Node::new()?;
        node.agent_wrapper = under_caps(&fewer);
        match node.start_agent() {
            Ok(()) => bail!("the agent started without {dropped}: {fewer:?} would do"),
            Err(e) => assert!(
                e.to_string().contains("exited during start-up"),
                "without {dropped}: {e}"
            ),
        }
    }
    Ok(())
}
