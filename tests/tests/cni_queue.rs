//! DEL with the agent unreachable, on the real kernel with the real agent:
//! the pod is disconnected at once and DEL returns 0; the endpoint's
//! removal waits in the deletion queue with its addresses held; the agent
//! finishes it (at start-up, or on its tick when it was only hung), and
//! only then do the addresses go back to the pool. ADD with the agent down
//! still fails with 11 and leaves nothing behind.
//!
//! Run (root): `cargo build --bins && cargo test -p sluice-tests --test cni_queue`
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use sluice_tests::{NetNs, Node, Pod, cni_env, conflist_config, eventually};

const V4: &str = "10.77.0.0/24";
const V6: &str = "fd00:77::/120";

/// Names in a directory (none when it does not exist).
fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Addresses the plugin's IPAM holds.
fn held(node: &Node) -> BTreeSet<IpAddr> {
    names(&node.ipam_dir().join("sluice-test"))
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn pod_ips(pod: &Pod) -> BTreeSet<IpAddr> {
    pod.ipv4.into_iter().chain(pod.ipv6).collect()
}

/// The agent's registry holds a record for the pod.
fn registered(node: &Node, pod: &Pod) -> bool {
    names(&node.state_dir().join("endpoints"))
        .iter()
        .any(|n| n.contains(&pod.container_id))
}

fn host_veths(node: &Node) -> Result<Vec<String>> {
    node.ns.veths()
}

#[test]
fn del_with_the_agent_down_is_0_and_the_restarted_agent_finishes_it_before_addresses_are_reused()
-> Result<()> {
    let mut node = Node::new()?;
    node.start_agent()?;
    let config = conflist_config(&node, Some(V4), Some(V6));
    let pod = Pod::add_as(&node, &config, Some(("shop", "cart-0")))?;
    let ips = pod_ips(&pod);
    ensure!(ips.len() == 2 && held(&node) == ips);
    ensure!(registered(&node, &pod));
    ensure!(node.maps()?.endpoint_records().len() == 1);

    node.kill_agent()?;
    let started = Instant::now();
    let out = pod.del(&node, &config)?;
    ensure!(
        out.code == 0 && out.stdout.trim().is_empty(),
        "DEL: {out:?}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    ensure!(out.stderr.contains("queued"), "{}", out.stderr);
    // containerd's second DEL, without netns: 0, and nothing changes.
    let netns_less = cni_env("DEL", &pod.container_id, "");
    let again = node.plugin(&netns_less, &config)?;
    ensure!(again.code == 0, "second DEL: {again:?}");

    // Disconnected: no veth on either side. Held: the addresses, and the
    // endpoint in the (stopped) agent's registry and maps.
    ensure!(host_veths(&node)?.is_empty(), "{:?}", host_veths(&node)?);
    ensure!(pod.ns.veths()?.is_empty());
    ensure!(held(&node) == ips, "{:?}", held(&node));
    let entry = format!("{}@eth0", pod.container_id);
    ensure!(
        names(&node.delete_queue_dir()) == BTreeSet::from([format!("{entry}.json")]),
        "{:?}",
        names(&node.delete_queue_dir())
    );
    ensure!(registered(&node, &pod));

    // ADD while the agent is down: 11, rolled back.
    let blocked = NetNs::new("sl-pod")?;
    let path = blocked.path().to_string_lossy().into_owned();
    let out = node.plugin(&cni_env("ADD", "ctrblocked", &path), &config)?;
    let err: Value = serde_json::from_str(&out.stdout).context("an error object")?;
    ensure!(out.code != 0 && err["code"] == 11, "{out:?}");
    ensure!(host_veths(&node)?.is_empty() && blocked.veths()?.is_empty());
    ensure!(held(&node) == ips, "rolled back: {:?}", held(&node));

    // The agent comes back: it forgets the endpoint (registry, maps) and
    // marks the removal done, before it serves.
    node.start_agent()?;
    ensure!(
        names(&node.delete_queue_dir()) == BTreeSet::from([format!("{entry}.done")]),
        "{:?}",
        names(&node.delete_queue_dir())
    );
    ensure!(!registered(&node, &pod), "registry still has the endpoint");
    let maps = node.maps()?;
    ensure!(maps.endpoint_records().is_empty());
    for ip in &ips {
        ensure!(maps.ipcache_get(*ip).is_none(), "{ip} still in the ipcache");
    }
    // Not yet released: the plugin does that on its next run.
    ensure!(held(&node) == ips);

    // The next ADD releases them, then allocates; it works.
    let next = Pod::add_as(&node, &config, Some(("shop", "cart-1")))?;
    ensure!(
        held(&node) == pod_ips(&next),
        "held {:?}, new pod {:?}",
        held(&node),
        pod_ips(&next)
    );
    ensure!(names(&node.delete_queue_dir()).is_empty());
    ensure!(node.maps()?.endpoint_records().len() == 1);
    ensure!(next.del(&node, &config)?.code == 0);
    // The agent deletes its veth after DEL's answer, then marks it done.
    let done = BTreeSet::from([format!("{}@eth0.done", next.container_id)]);
    ensure!(
        eventually(Duration::from_secs(10), || names(&node.delete_queue_dir())
            == done),
        "{:?}",
        names(&node.delete_queue_dir())
    );
    ensure!(host_veths(&node)?.is_empty());
    // A DEL for the first pod now (kubelet retrying) is harmless, and
    // releases what the agent finished.
    ensure!(pod.del(&node, &config)?.code == 0);
    ensure!(held(&node).is_empty(), "{:?}", held(&node));
    ensure!(names(&node.delete_queue_dir()).is_empty());
    Ok(())
}

#[test]
fn a_del_that_times_out_on_a_hung_agent_is_finished_by_its_tick() -> Result<()> {
    let mut node = Node::new()?;
    node.agent_args = vec!["--resync-seconds".into(), "1".into()];
    node.start_agent()?;
    let plain = conflist_config(&node, Some(V4), None);
    // ADD with the default timeout (its attaches wait for RTNL); the short
    // one is for the DEL to the hung agent and the runs after it.
    let pod = Pod::add_as(&node, &plain, Some(("shop", "cart-0")))?;
    let mut conf: Value = serde_json::from_str(&plain)?;
    conf["agentTimeoutMs"] = json!(500);
    let config = conf.to_string();
    let ips = pod_ips(&pod);
    let pid = node.agent_pid().context("agent pid")?.to_string();

    // Hung, not dead: the socket accepts and nothing answers.
    sluice_tests::sh("kill", &["-STOP", &pid])?;
    let out = pod.del(&node, &config);
    let resumed = sluice_tests::sh("kill", &["-CONT", &pid]);
    let out = out?;
    resumed?;
    ensure!(out.code == 0, "DEL: {out:?}");
    ensure!(host_veths(&node)?.is_empty() && held(&node) == ips);

    // The running agent's tick forgets the endpoint and marks it done.
    let entry = format!("{}@eth0.done", pod.container_id);
    ensure!(
        eventually(Duration::from_secs(10), || names(&node.delete_queue_dir())
            == BTreeSet::from([entry.clone()])),
        "{:?}",
        names(&node.delete_queue_dir())
    );
    ensure!(!registered(&node, &pod));
    ensure!(node.maps()?.endpoint_records().is_empty());
    for ip in &ips {
        ensure!(
            node.maps()?.ipcache_get(*ip).is_none(),
            "{ip} in the ipcache"
        );
    }
    // The next plugin run (a DEL of anything) releases the addresses.
    let out = node.plugin(&cni_env("DEL", "ctrnothing", ""), &config)?;
    ensure!(out.code == 0, "{out:?}");
    ensure!(held(&node).is_empty(), "{:?}", held(&node));
    ensure!(names(&node.delete_queue_dir()).is_empty());
    Ok(())
}

/// The host end's index and whether it is administratively up, or `None`
/// when there is no such link in the node's namespace.
fn host_link(node: &Node, name: &str) -> Result<Option<(u64, bool)>> {
    if !host_veths(node)?.iter().any(|v| v == name) {
        return Ok(None);
    }
    // Gone since it was listed (the agent deleting it) is gone.
    let Ok(shown) = node.ns.ip(&["-j", "link", "show", "dev", name]) else {
        return Ok(None);
    };
    let v: Value = serde_json::from_str(&shown)?;
    let up = v[0]["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f == "UP"));
    Ok(Some((v[0]["ifindex"].as_u64().context("ifindex")?, up)))
}

#[test]
fn del_answers_before_the_veth_is_deleted_and_the_agent_deletes_it_before_addresses_are_reused()
-> Result<()> {
    let mut node = Node::new()?;
    node.start_agent()?;
    let config = conflist_config(&node, Some(V4), Some(V6));
    let pod = Pod::add_as(&node, &config, Some(("shop", "cart-0")))?;
    let peer = Pod::add_as(&node, &config, Some(("shop", "cart-1")))?;
    let ips = pod_ips(&pod);
    let v4 = pod.ipv4.context("no IPv4")?;
    ensure!(sluice_tests::ping_ok(&peer.ns, v4), "reachable before DEL");

    let netns = pod.ns.path().to_string_lossy().into_owned();
    let mut env = cni_env("DEL", &pod.container_id, &netns);
    env.push(("SLUICE_CNI_PHASES", "1"));
    let out = node.plugin(&env, &config)?;
    ensure!(
        out.code == 0 && out.stdout.trim().is_empty(),
        "DEL: {out:?}"
    );
    // The deferred path: the veth set down, not deleted, by the plugin.
    ensure!(
        out.stderr.contains("\"down\"") && !out.stderr.contains("\"veth\""),
        "{}",
        out.stderr
    );
    // Disconnected at once: the veth is down or already gone, and no
    // packet passes.
    let link = host_link(&node, &pod.host_ifname)?;
    ensure!(link.is_none_or(|(_, up)| !up), "{link:?}");
    ensure!(
        !sluice_tests::ping_ok(&peer.ns, v4),
        "the pod still answers"
    );
    // Held until the agent has deleted the veth, and only released by a
    // plugin run after that.
    ensure!(held(&node).is_superset(&ips), "{:?}", held(&node));
    let done = format!("{}@eth0.done", pod.container_id);
    ensure!(
        eventually(Duration::from_secs(10), || names(&node.delete_queue_dir())
            == BTreeSet::from([done.clone()])),
        "{:?}",
        names(&node.delete_queue_dir())
    );
    ensure!(
        host_link(&node, &pod.host_ifname)?.is_none(),
        "the agent left the veth"
    );
    ensure!(pod.ns.veths()?.is_empty());
    ensure!(!registered(&node, &pod));
    ensure!(
        node.maps()?.endpoint_records().len() == 1,
        "only the peer's"
    );
    ensure!(held(&node).is_superset(&ips));
    // containerd's second DEL (no netns) releases them.
    let again = node.plugin(&cni_env("DEL", &pod.container_id, ""), &config)?;
    ensure!(again.code == 0, "{again:?}");
    ensure!(held(&node) == pod_ips(&peer), "{:?}", held(&node));
    ensure!(names(&node.delete_queue_dir()).is_empty());
    ensure!(peer.del(&node, &config)?.code == 0);
    ensure!(eventually(Duration::from_secs(10), || host_veths(&node)
        .is_ok_and(|v| v.is_empty())));
    Ok(())
}

#[test]
fn add_of_the_same_attachment_right_after_del_works_while_the_agent_deletes_the_old_veth()
-> Result<()> {
    let mut node = Node::new()?;
    node.start_agent()?;
    let config = conflist_config(&node, Some(V4), None);
    let peer = Pod::add_as(&node, &config, Some(("shop", "peer")))?;
    let pod = Pod::add_as(&node, &config, Some(("shop", "cart-0")))?;
    let netns = pod.ns.path().to_string_lossy().into_owned();
    // Several rounds: the ADD meets the agent's deletion at different
    // points (not started, under way, done).
    for round in 0..5 {
        let out = node.plugin(&cni_env("DEL", &pod.container_id, &netns), &config)?;
        ensure!(out.code == 0, "round {round} DEL: {out:?}");
        let out = node.plugin(&cni_env("ADD", &pod.container_id, &netns), &config)?;
        ensure!(out.code == 0, "round {round} ADD: {out:?}");
        let ip: IpAddr = out.json()?["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .context("no address")?
            .parse()?;
        ensure!(
            host_link(&node, &pod.host_ifname)?.is_some_and(|(_, up)| up),
            "round {round}: no live veth"
        );
        ensure!(
            sluice_tests::ping_ok(&peer.ns, ip),
            "round {round}: {ip} unreachable"
        );
        ensure!(registered(&node, &pod));
        // One address for the attachment: the old one is released or
        // still held by a removal not finished, never given to it twice.
        let mut others = held(&node);
        others.remove(&ip);
        others.remove(&peer.ipv4.context("peer address")?);
        let queued = names(&node.delete_queue_dir());
        ensure!(
            others.is_empty() || !queued.is_empty(),
            "round {round}: {others:?} held for nothing ({queued:?})"
        );
    }
    ensure!(pod.del(&node, &config)?.code == 0);
    ensure!(peer.del(&node, &config)?.code == 0);
    // Every removal finished: the agent marks an entry done only after it
    // deleted the veth, so an empty link list alone is not enough (the
    // entry may still be pending for a moment after it).
    ensure!(
        eventually(Duration::from_secs(10), || names(&node.delete_queue_dir())
            .iter()
            .all(|n| n.ends_with(".done"))),
        "{:?}",
        names(&node.delete_queue_dir())
    );
    ensure!(host_veths(&node)?.is_empty(), "{:?}", host_veths(&node)?);
    let out = node.plugin(&cni_env("DEL", "ctrnothing", ""), &config)?;
    ensure!(out.code == 0, "{out:?}");
    ensure!(held(&node).is_empty(), "{:?}", held(&node));
    ensure!(names(&node.delete_queue_dir()).is_empty());
    Ok(())
}

#[test]
fn a_restarted_agent_deletes_the_veth_of_a_removal_it_had_deferred_before_it_serves() -> Result<()>
{
    let mut node = Node::new()?;
    node.start_agent()?;
    let config = conflist_config(&node, Some(V4), None);
    let pod = Pod::add_as(&node, &config, Some(("shop", "cart-0")))?;
    let ips = pod_ips(&pod);
    let (index, _) = host_link(&node, &pod.host_ifname)?.context("no veth")?;

    // Where a DEL leaves things when the agent stops right after it: the
    // host end down, the removal pending with the veth named. (The agent
    // here stopped before it even forgot the endpoint.)
    node.kill_agent()?;
    node.ns
        .ip(&["link", "set", "dev", &pod.host_ifname, "down"])?;
    let entry = json!({
        "attachment": {"container_id": pod.container_id, "ifname": "eth0"},
        "network": "sluice-test",
        "data_dir": node.ipam_dir(),
        "ips": ips,
        "host_ifname": pod.host_ifname,
        "host_ifindex": index,
    });
    let base = node
        .delete_queue_dir()
        .join(format!("{}@eth0", pod.container_id));
    std::fs::create_dir_all(node.delete_queue_dir())?;
    std::fs::write(base.with_extension("json"), entry.to_string())?;

    node.start_agent()?;
    ensure!(host_link(&node, &pod.host_ifname)?.is_none(), "veth left");
    ensure!(
        names(&node.delete_queue_dir())
            == BTreeSet::from([format!("{}@eth0.done", pod.container_id)]),
        "{:?}",
        names(&node.delete_queue_dir())
    );
    ensure!(!registered(&node, &pod));
    ensure!(node.maps()?.endpoint_records().is_empty());
    ensure!(held(&node) == ips);
    let next = Pod::add_as(&node, &config, Some(("shop", "cart-1")))?;
    ensure!(held(&node) == pod_ips(&next), "{:?}", held(&node));
    ensure!(next.del(&node, &config)?.code == 0);
    Ok(())
}
