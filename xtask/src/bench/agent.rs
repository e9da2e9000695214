//! `bench agent`: the agent on one node of a large cluster, against the test
//! API server. The cluster is the compiler bench's synthetic one (default
//! 100,000 pods in 5,000 namespaces, 20,000 NetworkPolicies); `--local-pods`
//! of its pods (default 110, kubelet's maxPods) are scheduled to this node
//! and added through the real plugin, all at once, after the agent is
//! ready (a node booting into a big cluster). The other pods run on other
//! nodes (no Node objects for those: routes to them are the network's part,
//! not the policy's). Prints:
//!
//! - start to ready (`/readyz` 200: every kind listed in pages of 500, the
//!   whole cluster compiled, every endpoint programmed) and the agent's RSS
//!   (VmRSS, VmHWM) when ready and after the ADDs;
//! - the ADDs' batch time; the map fills (`sluice_map_pressure` and the
//!   POLICY entries per endpoint);
//! - changes one at a time, from the API write to the agent reporting the
//!   object programmed (`ProgrammedOf`, polled every 0.5 ms): pod relabel,
//!   wide-peer pod relabel, namespace relabel, policy change;
//! - a burst of pod relabels written at once: time until the last is
//!   programmed (the watch keeping up);
//! - fail closed at this scale: the agent restarted with
//!   `--max-entries-per-endpoint` at the median endpoint's entries; the
//!   endpoints over it must be exactly those the kernel marks failed closed.
//!
//! `cargo xtask bench agent [--pods N] [--local-pods N] [--namespaces N]
//! [--policies N] [--changes N] [--burst N]` (root; release binaries).
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use sluice_test_apiserver::{Config, Server as ApiServer, ServerHandle, store::Part};
use sluice_tests::{Node, Pod, conflist_config};

use super::{compiler, util as u};

const NODE: &str = "node-1";
const LOCAL_V4: &str = "10.200.0.0/16";
const PATIENCE: Duration = Duration::from_secs(900);

#[derive(clap::Args)]
pub struct Args {
    /// Pods in the cluster.
    #[arg(long, default_value_t = 100_000)]
    pods: usize,
    /// Of which on this node (added through the plugin, all at once).
    #[arg(long = "local-pods", default_value_t = 110)]
    local_pods: usize,
    /// Namespaces the pods are spread over.
    #[arg(long, default_value_t = 5_000)]
    namespaces: usize,
    /// NetworkPolicies.
    #[arg(long, default_value_t = 20_000)]
    policies: usize,
    /// Changes of each kind timed one at a time.
    #[arg(long, default_value_t = 40)]
    changes: usize,
    /// Pod relabels written at once.
    #[arg(long, default_value_t = 2_000)]
    burst: usize,
}

/// A pod of the synthetic cluster: where it lives and what it is.
struct PodRow {
    ns: usize,
    name: String,
    app: usize,
    local: bool,
}

fn cluster(a: &Args) -> Vec<PodRow> {
    let every = (a.pods / a.local_pods.max(1)).max(1);
    let mut locals = 0;
    (0..a.pods)
        .map(|i| {
            let j = i / a.namespaces;
            let local = locals < a.local_pods && i.is_multiple_of(every);
            locals += usize::from(local);
            PodRow {
                ns: i % a.namespaces,
                name: format!("pod-{j}"),
                app: j % compiler::APPS,
                local,
            }
        })
        .collect()
}

fn pod_object(i: usize, p: &PodRow, version: usize) -> Value {
    let labels = json!({"app": format!("app{}", p.app), "version": format!("v{version}")});
    let mut o = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": format!("ns-{}", p.ns), "name": p.name, "labels": labels},
        "spec": {"containers": [{"name": "main", "image": "busybox", "ports": compiler::ports_of(p.app)}]}});
    if p.local {
        o["spec"]["nodeName"] = json!(NODE);
        o["status"] = json!({"phase": "Pending"});
    } else {
        // 10.0.0.1 onwards; the local pods' range is 10.200.0.0/16.
        let n = i + 1;
        let ip = format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255);
        o["spec"]["nodeName"] = json!(format!("node-{}", 2 + i % 999));
        o["status"] = json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]});
    }
    o
}

fn populate(api: &ServerHandle, a: &Args, pods: &[PodRow]) -> Result<()> {
    for i in 0..a.namespaces {
        api.create(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns-{i}"), "labels": compiler::namespace_labels(i)}}))?;
    }
    for (i, p) in pods.iter().enumerate() {
        let obj = pod_object(i, p, (i / a.namespaces / compiler::APPS) % 2);
        // A create drops the status, as the real server's does: written
        // after, as kubelet does.
        let mut stored = api.create(obj.clone())?;
        stored["status"] = obj["status"].clone();
        api.update(stored, Part::Status)?;
    }
    for n in 0..a.policies {
        api.create(policy_object(n, a.namespaces, 0))?;
    }
    Ok(())
}

fn policy_object(n: usize, namespaces: usize, variant: usize) -> Value {
    let (i, k) = (n % namespaces, n / namespaces);
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": format!("ns-{i}"), "name": format!("pol-{k}")},
        "spec": compiler::policy_spec(i, k, variant)})
}

/// `VmRSS` and `VmHWM` of a process, MiB.
fn rss_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().trim_end_matches("kB").trim())
            .context("no such field")?
            .parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn agent_rss(node: &Node) -> Result<(f64, f64)> {
    rss_mib(node.agent_pid().context("no agent")?)
}

/// Waits (polling every 0.5 ms) until the agent reports `key` programmed at
/// `rv` or later; the time it took.
fn programmed_after(node: &Node, key: &str, rv: &str) -> Result<Duration> {
    node.wait_programmed_polling(key, Some(rv), PATIENCE, Duration::from_micros(500))
}

fn wait_ready(node: &Node) -> Result<()> {
    let started = Instant::now();
    loop {
        if node
            .http_get("/readyz")
            .is_ok_and(|(head, _)| head.starts_with("HTTP/1.1 200"))
        {
            return Ok(());
        }
        ensure!(
            started.elapsed() < PATIENCE,
            "the agent was not ready in {PATIENCE:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes `obj` back with `edit` applied; its new resourceVersion.
fn edit(api: &ServerHandle, obj: &Value, edit: impl FnOnce(&mut Value)) -> Result<String> {
    let mut o = obj.clone();
    edit(&mut o);
    let stored = api.update(o, Part::Main)?;
    Ok(sluice_test_apiserver::resource_version(&stored))
}

fn get(api: &ServerHandle, plural: &str, ns: &str, name: &str) -> Result<Value> {
    api.get(plural, ns, name)
        .with_context(|| format!("{plural} {ns}/{name}"))
}

struct Row {
    name: &'static str,
    ms: Vec<f64>,
}

fn print_rows(rows: &[Row]) {
    println!("| change, API write to programmed | n | p50 ms | p99 ms | max ms |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for r in rows {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} |",
            r.name,
            r.ms.len(),
            u::median(&r.ms),
            u::pct(&r.ms, 99.0),
            r.ms.iter().copied().fold(0.0, f64::max)
        );
    }
}

/// One change of each kind at a time, `n` times, each timed.
fn changes(node: &Node, api: &ServerHandle, a: &Args, pods: &[PodRow]) -> Result<Vec<Row>> {
    let remote: Vec<usize> = (0..pods.len()).filter(|&i| !pods[i].local).collect();
    // Wide peers: app4 pods of prod namespaces are the peers of every
    // namespace's monitoring policy (compiler.rs, shape 3).
    let wide: Vec<usize> = remote
        .iter()
        .copied()
        .filter(|&i| pods[i].app == 4 && pods[i].ns.is_multiple_of(3))
        .collect();
    ensure!(
        !remote.is_empty() && !wide.is_empty(),
        "the cluster is too small"
    );
    let mut rows = vec![
        Row {
            name: "pod relabel",
            ms: Vec::new(),
        },
        Row {
            name: "wide-peer pod relabel",
            ms: Vec::new(),
        },
        Row {
            name: "namespace relabel",
            ms: Vec::new(),
        },
        Row {
            name: "policy change",
            ms: Vec::new(),
        },
    ];
    for k in 0..a.changes {
        for (slot, list, app) in [(0, &remote, false), (1, &wide, true)] {
            let p = &pods[list[(k * 7919) % list.len()]];
            let ns = format!("ns-{}", p.ns);
            let obj = get(api, "pods", &ns, &p.name)?;
            let rv = edit(api, &obj, |o| {
                let l = &mut o["metadata"]["labels"];
                if app {
                    l["app"] = json!(if l["app"] == "app4" {
                        "app4-off"
                    } else {
                        "app4"
                    });
                } else {
                    l["version"] = json!(if l["version"] == "v0" { "v1" } else { "v0" });
                }
            })?;
            let key = format!("Pod/{ns}/{}", p.name);
            rows[slot]
                .ms
                .push(u::ms(programmed_after(node, &key, &rv)?));
        }
        let ns = format!("ns-{}", (k * 13) % a.namespaces);
        let obj = get(api, "namespaces", "", &ns)?;
        let rv = edit(api, &obj, |o| {
            let l = &mut o["metadata"]["labels"];
            l["env"] = json!(if l["env"] == "prod" { "dev" } else { "prod" });
        })?;
        rows[2].ms.push(u::ms(programmed_after(
            node,
            &format!("Namespace/{ns}"),
            &rv,
        )?));
        let n = (k * 31) % a.policies;
        let changed = policy_object(n, a.namespaces, k % 2 + 1);
        let (ns, name) = (
            changed["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            changed["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        let obj = get(api, "networkpolicies", &ns, &name)?;
        let rv = edit(api, &obj, |o| o["spec"] = changed["spec"].clone())?;
        let key = format!("NetworkPolicy/{ns}/{name}");
        rows[3].ms.push(u::ms(programmed_after(node, &key, &rv)?));
    }
    Ok(rows)
}

/// Relabels `n` pods as fast as the API takes them; the time until the
/// last is programmed.
fn burst(
    node: &Node,
    api: &ServerHandle,
    n: usize,
    pods: &[PodRow],
) -> Result<(Duration, Duration)> {
    let remote: Vec<&PodRow> = pods.iter().filter(|p| !p.local).collect();
    let started = Instant::now();
    let mut last = None;
    for k in 0..n.min(remote.len()) {
        let p = remote[(k * 104_729) % remote.len()];
        let ns = format!("ns-{}", p.ns);
        let obj = get(api, "pods", &ns, &p.name)?;
        let rv = edit(api, &obj, |o| {
            o["metadata"]["labels"]["burst"] = json!(k.to_string());
        })?;
        last = Some((format!("Pod/{ns}/{}", p.name), rv));
    }
    let written = started.elapsed();
    let (key, rv) = last.context("no pods to relabel")?;
    programmed_after(node, &key, &rv)?;
    Ok((written, started.elapsed()))
}

/// Each map's pressure, by map name.
type Pressures = Vec<(String, f64)>;

/// POLICY entries per endpoint and each map's pressure, from the metrics.
fn fills(node: &Node) -> Result<(Vec<f64>, Pressures)> {
    let m = node.metrics()?;
    let entries = m
        .iter()
        .filter(|(k, _)| k.starts_with("sluice_policy_entries{"))
        .map(|(_, v)| *v)
        .collect();
    let pressure = m
        .iter()
        .filter_map(|(k, v)| {
            let map = k
                .strip_prefix("sluice_map_pressure{map=\"")?
                .strip_suffix("\"}")?;
            Some((map.to_string(), *v))
        })
        .collect();
    Ok((entries, pressure))
}

pub fn run(a: &Args) -> Result<()> {
    ensure!(
        a.namespaces > 0 && a.pods >= a.namespaces && a.policies > 0 && a.local_pods > 0,
        "need pods >= namespaces > 0, policies > 0, local pods > 0"
    );
    u::header("Sluice bench agent: one node of a large cluster", &[]);
    let mut node = Node::new()?;
    let history = a.burst + 10_000;
    let api = node.ns.run(move || {
        let listen: SocketAddr = "127.0.0.1:0".parse().map_err(anyhow::Error::from)?;
        ApiServer::start_with(Config {
            listen,
            history_limit: history,
            ..Config::default()
        })
    })??;
    let pods = cluster(a);
    let started = Instant::now();
    populate(&api, a, &pods)?;
    println!(
        "cluster: {} pods ({} on this node), {} namespaces, {} NetworkPolicies; stored in the test API server in {:.1?}",
        a.pods,
        a.local_pods,
        a.namespaces,
        a.policies,
        started.elapsed()
    );

    node.use_api(&api, NODE)?;
    node.agent_args
        .extend(["--cluster-pods".to_string(), a.pods.to_string()]);
    let started = Instant::now();
    node.start_agent()?;
    wait_ready(&node)?;
    let ready = started.elapsed();
    let (rss_ready, _) = agent_rss(&node)?;
    println!(
        "agent: ready {:.2?} after its start; RSS {rss_ready:.1} MiB",
        ready
    );

    // The node's pods, all at once.
    let config = conflist_config(&node, Some(LOCAL_V4), None);
    let locals: Vec<&PodRow> = pods.iter().filter(|p| p.local).collect();
    let started = Instant::now();
    let added: Vec<Result<Pod>> = std::thread::scope(|s| {
        let handles: Vec<_> = locals
            .iter()
            .map(|p| {
                let (node, config) = (&node, &config);
                let ns = format!("ns-{}", p.ns);
                s.spawn(move || Pod::add_as(node, config, Some((&ns, &p.name))))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("ADD thread panicked")))
            })
            .collect()
    });
    let batch = started.elapsed();
    let added: Vec<Pod> = added.into_iter().collect::<Result<_>>()?;
    // What kubelet then does: the pods' addresses into their status.
    let mut last = None;
    for (p, cni) in locals.iter().zip(&added) {
        let ns = format!("ns-{}", p.ns);
        let mut obj = get(&api, "pods", &ns, &p.name)?;
        let ip = cni.ipv4.context("no IPv4 from ADD")?.to_string();
        obj["status"] = json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]});
        let stored = api.update(obj, Part::Status)?;
        last = Some((
            format!("Pod/{ns}/{}", p.name),
            sluice_test_apiserver::resource_version(&stored),
        ));
    }
    if let Some((key, rv)) = &last {
        programmed_after(&node, key, rv)?;
    }
    let (rss_added, hwm) = agent_rss(&node)?;
    println!(
        "{} pods started at once (each a new netns and a CNI ADD, as a runtime does): {:.2?} as a batch; RSS {rss_added:.1} MiB (peak {hwm:.1} MiB)",
        added.len(),
        batch
    );
    let (entries, pressure) = fills(&node)?;
    ensure!(
        entries.len() == added.len(),
        "{} endpoints in the metrics",
        entries.len()
    );
    println!(
        "POLICY entries per endpoint: min {:.0}, median {:.0}, max {:.0}, total {:.0}",
        entries.iter().copied().fold(f64::INFINITY, f64::min),
        u::median(&entries),
        entries.iter().copied().fold(0.0, f64::max),
        entries.iter().sum::<f64>()
    );
    let shown: Vec<String> = pressure
        .iter()
        .map(|(m, v)| format!("{m} {:.2}%", v * 100.0))
        .collect();
    println!("map pressure: {}", shown.join(", "));

    let rows = changes(&node, &api, a, &pods)?;
    print_rows(&rows);
    let (written, programmed) = burst(&node, &api, a.burst, &pods)?;
    println!(
        "burst: {} pod relabels written in {:.2?}, the last programmed {:.2?} after the first write ({:.0} changes/s)",
        a.burst,
        written,
        programmed,
        a.burst as f64 / programmed.as_secs_f64()
    );

    // Fail closed at this scale: a per-endpoint limit at the median of the
    // entries as the changes above left them (the restart compiles the same
    // cluster). Its warnings, one per endpoint, are not shown.
    let (entries_now, _) = fills(&node)?;
    let limit = u::median(&entries_now) as usize;
    let over = entries_now.iter().filter(|&&e| e as usize > limit).count();
    node.kill_agent()?;
    node.agent_log = "error".into();
    node.agent_args
        .extend(["--max-entries-per-endpoint".to_string(), limit.to_string()]);
    node.start_agent()?;
    wait_ready(&node)?;
    let failed = node
        .metrics()?
        .get("sluice_endpoints_failed_closed")
        .copied()
        .unwrap_or(-1.0);
    println!(
        "fail closed: restarted with --max-entries-per-endpoint {limit}: {over} endpoints hold more, the kernel marks {failed} failed closed"
    );

    let max_pressure = pressure.iter().map(|(_, v)| *v).fold(0.0, f64::max);
    println!("targets:");
    println!(
        "  every map under 80% full with the sizes --cluster-pods {} derives: {} (fullest {:.1}%)",
        a.pods,
        u::verdict(max_pressure < 0.8),
        max_pressure * 100.0
    );
    println!(
        "  the endpoints over the limit, exactly, fail closed: {}",
        u::verdict(failed == over as f64)
    );
    println!(
        "  agent RSS under 1 GiB: {} ({hwm:.1} MiB peak)",
        u::verdict(hwm < 1024.0)
    );
    for r in &rows {
        println!(
            "  {}: median under 1 ms: {}, p99 under 20 ms: {} (end to end through the watch; the 1/20 ms targets are the compiler's, `bench compiler`)",
            r.name,
            u::verdict(u::median(&r.ms) < 1.0),
            u::verdict(u::pct(&r.ms, 99.0) < 20.0)
        );
    }
    drop(added);
    node.kill_agent()?;
    Ok(())
}
