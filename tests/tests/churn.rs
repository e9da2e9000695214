//! Churn on a real node: flows that must stay allowed and flows that must
//! stay denied are probed without pause (TCP and UDP, a fresh source port
//! per probe, IPv4 and IPv6) while 1,000 random changes that concern none of
//! them go through the test API server: relabels of other pods and
//! namespaces, pods of another node coming and going, updates that change
//! nothing, the policy in force replaced by equivalent ones, other policies
//! added and removed. Each change is waited for (`Programmed`), so the agent
//! really recompiles and rewrites while the probes run. A single denied
//! probe that connects, or a single allowed probe that is blocked, fails.
use std::{
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use sluice_test_apiserver::{ServerHandle, resource_version, store::Part};
use sluice_tests::{ApiNode, NetNs, Pod, Server, eventually, rng::Rng, tcp_ok, udp_ok};

const NODE: &str = "node-1";
const CHANGES: usize = 1_000;
const WAIT: Duration = Duration::from_secs(20);
/// An allowed probe gets time for a SYN retransmit before it counts as
/// blocked; a denied one only needs to not connect.
const ALLOWED_TIMEOUT: Duration = Duration::from_secs(3);
const DENIED_TIMEOUT: Duration = Duration::from_millis(300);
const NOISE_NAMESPACES: usize = 4;
const NOISE_PODS: usize = 12;
const NOISE_POLICIES: usize = 8;

fn pod(ns: &str, name: &str, node: &str, labels: Value) -> Value {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none",
            "ports": [{"containerPort": 80, "name": "http", "protocol": "TCP"}]}]}
    });
    p["metadata"]["labels"] = labels;
    p
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    let mut p = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
    });
    p["spec"] = spec;
    p
}

/// The policy in force on the server, in forms that all mean: clients may
/// reach it on TCP 80 and UDP 80, nothing else may reach it.
fn server_policy(form: usize) -> Value {
    let spec = match form % 4 {
        0 => json!({"podSelector": {"matchLabels": {"role": "server"}}, "ingress": [{
            "from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
            "ports": [{"port": 80, "protocol": "TCP"}, {"port": 80, "protocol": "UDP"}]}]}),
        1 => {
            json!({"podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["server"]}]},
            "policyTypes": ["Ingress"], "ingress": [{
            "from": [{"podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["client"]}]}}],
            "ports": [{"port": 80, "protocol": "UDP"}, {"port": 80}]}]})
        }
        2 => json!({"podSelector": {"matchLabels": {"role": "server"}}, "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"port": 80}]},
            {"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"port": 80, "protocol": "UDP"}]}]}),
        _ => json!({"podSelector": {"matchLabels": {"role": "server"}}, "ingress": [{
            "from": [{"podSelector": {"matchLabels": {"role": "client"}}},
                     {"podSelector": {"matchLabels": {"role": "nobody-has-this"}}}],
            "ports": [{"port": 80, "protocol": "TCP"}, {"port": 80, "protocol": "UDP"}, {"port": 80, "protocol": "TCP"}]}]}),
    };
    policy("app", "server-in", spec)
}

/// Noise policy `k`: the first ones live in the noise namespaces, the last
/// two in `app`, where they select nobody. Either way they concern none of
/// the probed flows; a policy keeps its namespace across updates.
fn noise_policy(rng: &mut Rng, k: usize) -> Value {
    let name = format!("noise-{k}");
    if k >= NOISE_POLICIES - 2 {
        let spec = if rng.below(2) == 0 {
            json!({"podSelector": {"matchLabels": {"role": "nobody-has-this"}},
                "policyTypes": ["Ingress", "Egress"]})
        } else {
            json!({"podSelector": {"matchLabels": {"role": "nobody-has-this"}}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": "10.121.0.0/24"}}], "ports": [{"port": "http"}]}]})
        };
        return policy("app", &name, spec);
    }
    let ns = format!("n{}", k % NOISE_NAMESPACES);
    let spec = match rng.below(3) {
        0 => json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        1 => json!({"podSelector": {"matchLabels": {"tier": "a"}}, "ingress": [{
            "from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}], "ports": [{"port": "http"}]}]}),
        _ => json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
            "to": [{"ipBlock": {"cidr": "10.121.0.0/16", "except": ["10.121.0.0/24"]}}],
            "ports": [{"port": "http"}, {"port": 53, "protocol": "UDP"}]}]}),
    };
    policy(&ns, &name, spec)
}

/// One probed flow.
struct Flow {
    from: &'static str,
    to: IpAddr,
    udp: bool,
    port: u16,
    allowed: bool,
}

#[derive(Default)]
struct Tally {
    allowed_ok: AtomicU64,
    allowed_blocked: AtomicU64,
    denied_blocked: AtomicU64,
    denied_connected: AtomicU64,
    failures: Mutex<Vec<String>>,
}

fn probe(ns: &NetNs, f: &Flow) -> bool {
    let timeout = if f.allowed {
        ALLOWED_TIMEOUT
    } else {
        DENIED_TIMEOUT
    };
    if f.udp {
        udp_ok(ns, f.to, f.port, timeout)
    } else {
        tcp_ok(ns, f.to, f.port, timeout)
    }
}

/// Creates or updates `obj` and waits until the agent has it programmed.
fn apply_and_wait(api: &ServerHandle, node: &sluice_tests::Node, obj: Value) -> Result<()> {
    let (plural, key) = key_of(&obj);
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let stored = if api.get(plural, ns, name).is_some() {
        api.update(obj, Part::Main)?
    } else {
        api.create(obj)?
    };
    node.wait_programmed(&key, Some(&resource_version(&stored)), WAIT)
}

fn delete_and_wait(
    api: &ServerHandle,
    node: &sluice_tests::Node,
    plural: &str,
    ns: &str,
    name: &str,
) -> Result<()> {
    api.delete(plural, ns, name)?;
    let kind = if plural == "pods" {
        "Pod"
    } else {
        "NetworkPolicy"
    };
    node.wait_programmed(&format!("{kind}/{ns}/{name}"), None, WAIT)
}

fn key_of(obj: &Value) -> (&'static str, String) {
    let kind = obj["kind"].as_str().unwrap_or_default();
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    match kind {
        "Namespace" => ("namespaces", format!("Namespace/{name}")),
        "Pod" => ("pods", format!("Pod/{ns}/{name}")),
        _ => ("networkpolicies", format!("NetworkPolicy/{ns}/{name}")),
    }
}

#[test]
fn a_thousand_unrelated_changes_never_let_a_denied_probe_through_nor_block_an_allowed_one()
-> Result<()> {
    let ApiNode {
        mut node,
        api,
        config,
    } = ApiNode::new(NODE, "10.121.0.0/24", "fd00:121::/64")?;
    api.create_namespace("app")?;
    for i in 0..NOISE_NAMESPACES {
        api.create_namespace(&format!("n{i}"))?;
    }
    for (name, role) in [("c", "client"), ("s", "server"), ("d", "intruder")] {
        api.create(pod("app", name, NODE, json!({"role": role})))?;
    }
    node.start_agent()?;
    let c = Pod::add_as(&node, &config, Some(("app", "c")))?;
    let s = Pod::add_as(&node, &config, Some(("app", "s")))?;
    let d = Pod::add_as(&node, &config, Some(("app", "d")))?;
    let _servers = [Server::start(&s.ns, 80)?, Server::start(&s.ns, 81)?];
    apply_and_wait(&api, &node, server_policy(0))?;

    let mut flows = Vec::new();
    for to in [s.ipv4.context("s v4")?, s.ipv6.context("s v6")?] {
        for udp in [false, true] {
            flows.push(Flow {
                from: "c",
                to,
                udp,
                port: 80,
                allowed: true,
            });
            flows.push(Flow {
                from: "c",
                to,
                udp,
                port: 81,
                allowed: false,
            });
            flows.push(Flow {
                from: "d",
                to,
                udp,
                port: 80,
                allowed: false,
            });
        }
    }
    let ns_of = |from: &str| if from == "c" { &c.ns } else { &d.ns };
    // Every flow is as expected before the churn starts (the pods' first
    // packets can race their routes, hence `eventually`).
    for f in &flows {
        ensure!(
            eventually(WAIT, || probe(ns_of(f.from), f) == f.allowed),
            "{} -> {}:{} {} before the churn",
            f.from,
            f.to,
            f.port,
            if f.udp { "udp" } else { "tcp" }
        );
    }

    let tally = Tally::default();
    let per_flow: Vec<AtomicU64> = flows.iter().map(|_| AtomicU64::new(0)).collect();
    let stop = AtomicBool::new(false);
    let mut rng = Rng::new(0xc4a7_11ee_5eed_0001);
    let mut noise_pods: Vec<Option<Value>> = vec![None; NOISE_PODS];
    let mut noise_policies: Vec<Option<Value>> = vec![None; NOISE_POLICIES];
    let started = Instant::now();
    let churn = std::thread::scope(|scope| -> Result<()> {
        for (f, probes) in flows.iter().zip(&per_flow) {
            let (tally, stop, ns) = (&tally, &stop, ns_of(f.from));
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let ok = probe(ns, f);
                    probes.fetch_add(1, Ordering::Relaxed);
                    let counter = match (f.allowed, ok) {
                        (true, true) => &tally.allowed_ok,
                        (true, false) => &tally.allowed_blocked,
                        (false, false) => &tally.denied_blocked,
                        (false, true) => &tally.denied_connected,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if ok != f.allowed
                        && let Ok(mut v) = tally.failures.lock()
                    {
                        v.push(format!(
                            "{:.1}s: {} -> {}:{} {} {}",
                            started.elapsed().as_secs_f64(),
                            f.from,
                            f.to,
                            f.port,
                            if f.udp { "udp" } else { "tcp" },
                            if f.allowed { "blocked" } else { "connected" }
                        ));
                    }
                }
            });
        }
        let result = (|| -> Result<()> {
            for step in 0..CHANGES {
                churn_step(
                    &api,
                    &node,
                    &mut rng,
                    step,
                    &mut noise_pods,
                    &mut noise_policies,
                )
                .with_context(|| format!("change {step}"))?;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    });
    churn?;
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "churn: {CHANGES} changes in {:.1}s; allowed probes: {} passed, {} blocked; denied probes: {} blocked, {} connected",
        started.elapsed().as_secs_f64(),
        n(&tally.allowed_ok),
        n(&tally.allowed_blocked),
        n(&tally.denied_blocked),
        n(&tally.denied_connected),
    );
    let failures = tally.failures.lock().map(|v| v.clone()).unwrap_or_default();
    assert!(
        failures.is_empty(),
        "wrong verdicts:\n{}",
        failures.join("\n")
    );
    // Each flow was probed during the churn, not once (a denied probe takes
    // its whole timeout; the churn takes seconds).
    let fewest = per_flow.iter().map(n).min().unwrap_or(0);
    assert!(fewest >= 3, "a flow was probed only {fewest} times");
    Ok(())
}

/// One random change that concerns none of the probed flows.
fn churn_step(
    api: &ServerHandle,
    node: &sluice_tests::Node,
    rng: &mut Rng,
    step: usize,
    noise_pods: &mut [Option<Value>],
    noise_policies: &mut [Option<Value>],
) -> Result<()> {
    match rng.below(6) {
        // A namespace of noise relabelled.
        0 => {
            let name = format!("n{}", rng.below(NOISE_NAMESPACES));
            let mut ns = api
                .get("namespaces", "", &name)
                .context("noise namespace")?;
            let env = if rng.below(2) == 0 { "prod" } else { "dev" };
            ns["metadata"]["labels"]["env"] = json!(env);
            apply_and_wait(api, node, ns)
        }
        // A pod of another node created, relabelled or deleted.
        1 => {
            let i = rng.below(noise_pods.len());
            let ns = format!("n{}", i % NOISE_NAMESPACES);
            let name = format!("p{i}");
            match (&noise_pods[i], rng.below(3)) {
                (Some(_), 0) => {
                    noise_pods[i] = None;
                    delete_and_wait(api, node, "pods", &ns, &name)
                }
                _ => {
                    let tier = ["a", "b", "c"][rng.below(3)];
                    let p = pod(
                        &ns,
                        &name,
                        "node-2",
                        json!({"tier": tier, "step": step.to_string()}),
                    );
                    let new = noise_pods[i].is_none();
                    noise_pods[i] = Some(p.clone());
                    apply_and_wait(api, node, p)?;
                    if !new {
                        return Ok(());
                    }
                    // Addresses on the other node, as its kubelet reports them.
                    let mut with_status = api.get("pods", &ns, &name).context("noise pod")?;
                    with_status["status"] = json!({"phase": "Running",
                        "podIP": format!("10.122.0.{}", i + 1),
                        "podIPs": [{"ip": format!("10.122.0.{}", i + 1)}, {"ip": format!("fd00:122::{:x}", i + 1)}]});
                    let stored = api.update(with_status, Part::Status)?;
                    node.wait_programmed(
                        &format!("Pod/{ns}/{name}"),
                        Some(&resource_version(&stored)),
                        WAIT,
                    )
                }
            }
        }
        // An update of a probed pod or namespace that changes nothing.
        2 => {
            let obj = match rng.below(3) {
                0 => api.get("pods", "app", "s"),
                1 => api.get("pods", "app", "c"),
                _ => api.get("namespaces", "", "app"),
            }
            .context("probed object")?;
            apply_and_wait(api, node, obj)
        }
        // The policy in force replaced by an equivalent one.
        3 => apply_and_wait(api, node, server_policy(rng.below(4))),
        // A policy that concerns nothing probed added, changed or removed.
        _ => {
            let k = rng.below(noise_policies.len());
            match noise_policies[k].take() {
                Some(old) if rng.below(2) == 0 => {
                    let ns = old["metadata"]["namespace"].as_str().unwrap_or_default();
                    delete_and_wait(api, node, "networkpolicies", ns, &format!("noise-{k}"))
                }
                _ => {
                    let p = noise_policy(rng, k);
                    noise_policies[k] = Some(p.clone());
                    apply_and_wait(api, node, p)
                }
            }
        }
    }
}
