//! `bench propagation`: from the API write of one NetworkPolicy change to
//! (1) the first new connection that sees the new verdict and (2) the agent
//! reporting the change programmed. The agent runs in cluster mode against
//! the test API server; one policy ("toggled") selecting the server pod is
//! updated back and forth between allowing the client on TCP 80 and
//! allowing nothing, so every change flips the verdict.
//!
//! Two clusters, one after the other:
//! - the 9-pod model (namespaces x, y, z; pods a, b, c; all on this node):
//!   z/a -> x/b:80;
//! - 100 namespaces of 10 pods, one of each on this node (100 local pods,
//!   900 on nine other nodes), 1,000 NetworkPolicies (ten per namespace,
//!   the toggled one among them): ns-1/p0 -> ns-0/p0:80.
//!
//! Probes: new TCP connections one after the other from the client pod,
//! each with a short timeout (5 ms while waiting for an allow, so that is
//! the resolution; while waiting for a deny every connect takes well under
//! a millisecond, and a deny is a 50 ms timeout confirmed by a second one).
//! The time is that of the probe's start. The agent is asked `Programmed`
//! every 5 ms. Times start just before the API server's store is written.
//!
//! Then, on the 9-pod model, apply-to-cut (`cut`): established flows (a
//! long-lived TCP connection and a UDP flow) that a change denies, from
//! the API write to their first dropped packet.
//!
//! `cargo xtask bench propagation [--changes 60]`
use std::{
    net::SocketAddr,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use sluice_proto::{Request, Response};
use sluice_test_apiserver::{Config, Server as ApiServer, resource_version, store::Part};
use sluice_tests::{NetNs, Node, Pod, conflist_config};

use super::{
    cut::{self, CUT_PORT},
    util::{self as u, Acceptor},
};

const NODE: &str = "node-1";
const PORT: u16 = 80;
const GIVE_UP: Duration = Duration::from_secs(10);

/// What a cluster holds before the measurement.
struct Spec {
    title: String,
    namespaces: Vec<String>,
    /// (namespace, name, labels, Some(address) for a pod on another node)
    pods: Vec<(String, String, Value, Option<String>)>,
    /// Every policy but the toggled one.
    policies: Vec<Value>,
    client: (String, String),
    /// The server pod; the toggled policy lives in its namespace.
    server: (String, String),
    target_ms: f64,
    /// Also measure apply-to-cut on this cluster.
    cut: bool,
}

#[derive(clap::Args)]
pub struct Args {
    /// Policy changes per cluster, alternating allow and deny.
    #[arg(long, default_value_t = 60)]
    changes: usize,
}

pub fn run(args: &Args) -> Result<()> {
    let &Args { changes } = args;
    u::header(
        "Sluice bench propagation: policy change to enforcement",
        &[],
    );
    println!(
        "{} changes per cluster, alternating allow and deny; probe resolution 5 ms (allow) / ~1 ms (deny), Programmed polled every 5 ms",
        changes
    );
    let mut verdicts = Vec::new();
    for spec in [model(), large()] {
        let (r, cuts) = measure(&spec, changes)?;
        verdicts.push(report(&spec, &r));
        if let Some(cuts) = cuts {
            verdicts.push(report_cut(&spec, &cuts));
        }
    }
    println!();
    println!("targets:");
    for v in verdicts {
        println!("  {v}");
    }
    println!("  {}", u::SHARED_NOTE);
    Ok(())
}

fn model() -> Spec {
    let namespaces: Vec<String> = ["x", "y", "z"].map(String::from).to_vec();
    let mut pods = Vec::new();
    for ns in &namespaces {
        for p in ["a", "b", "c"] {
            pods.push((ns.clone(), p.to_owned(), json!({"pod": p}), None));
        }
    }
    Spec {
        title: "the 9-pod model (3 namespaces x 3 pods, all local), 1 policy".into(),
        namespaces,
        pods,
        policies: Vec::new(),
        client: ("z".into(), "a".into()),
        server: ("x".into(), "b".into()),
        target_ms: 100.0,
        cut: true,
    }
}

fn large() -> Spec {
    const APPS: [&str; 5] = ["web", "api", "db", "cache", "worker"];
    let namespaces: Vec<String> = (0..100).map(|i| format!("ns-{i}")).collect();
    let mut pods = Vec::new();
    let mut policies = Vec::new();
    for (n, ns) in namespaces.iter().enumerate() {
        for j in 0..10 {
            let app = if j == 0 {
                "probe"
            } else {
                APPS[j % APPS.len()]
            };
            let remote = (j > 0).then(|| format!("10.245.{n}.{j}"));
            pods.push((
                ns.clone(),
                format!("p{j}"),
                json!({"app": app, "pod": format!("p{j}")}),
                remote,
            ));
        }
        let np = |k: usize, spec: Value| {
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": format!("np-{k}"), "namespace": ns}, "spec": spec})
        };
        let sel = |app: &str| json!({"matchLabels": {"app": app}});
        let tcp = |port: u16| json!([{"port": port, "protocol": "TCP"}]);
        let mut list = vec![
            np(0, json!({"podSelector": {}, "policyTypes": ["Ingress"]})),
            np(
                1,
                json!({"podSelector": sel("api"), "ingress": [{"from": [{"podSelector": sel("web")}], "ports": tcp(8080)}]}),
            ),
            np(
                2,
                json!({"podSelector": sel("db"), "ingress": [{"from": [{"podSelector": sel("api")}], "ports": tcp(5432)}]}),
            ),
            np(
                3,
                json!({"podSelector": sel("web"), "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", n % 10)}}}], "ports": tcp(80)}]}),
            ),
            np(
                4,
                json!({"podSelector": sel("cache"), "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.96.0.0/12"]}}], "ports": tcp(6379)}]}),
            ),
            np(
                5,
                json!({"podSelector": sel("web"), "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": sel("api")}], "ports": tcp(8080)}]}),
            ),
            np(
                6,
                json!({"podSelector": sel("worker"), "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}], "ports": [{"port": 9000, "endPort": 9100, "protocol": "TCP"}]}]}),
            ),
            np(
                7,
                json!({"podSelector": sel("api"), "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": "http"}]}]}),
            ),
            np(
                8,
                json!({"podSelector": sel("worker"), "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 53, "protocol": "UDP"}]}]}),
            ),
            np(
                9,
                json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": sel("monitoring")}], "ports": tcp(9090)}]}),
            ),
        ];
        if n == 0 {
            list.pop(); // ns-0's tenth policy is the toggled one
        }
        policies.extend(list);
    }
    Spec {
        title: "100 local pods of 1,000 (100 namespaces), 1,000 policies".into(),
        namespaces,
        pods,
        policies,
        client: ("ns-1".into(), "p0".into()),
        server: ("ns-0".into(), "p0".into()),
        target_ms: 500.0,
        cut: false,
    }
}

/// The toggled policy: selects the server pod; allows the client on TCP
/// 80 (and TCP and UDP `CUT_PORT`, for apply-to-cut), or nothing.
fn toggled(spec: &Spec, allow: bool) -> Value {
    let (cns, cname) = &spec.client;
    let (sns, sname) = &spec.server;
    let server_pod = spec.pods.iter().find(|p| &p.0 == sns && &p.1 == sname);
    let client_pod = spec.pods.iter().find(|p| &p.0 == cns && &p.1 == cname);
    let labels = |p: Option<&(String, String, Value, Option<String>)>| {
        p.map(|p| p.2.clone()).unwrap_or_default()
    };
    let ingress = if allow {
        json!([{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": cns}},
                          "podSelector": {"matchLabels": labels(client_pod)}}],
                "ports": [{"port": PORT, "protocol": "TCP"},
                          {"port": CUT_PORT, "protocol": "TCP"},
                          {"port": CUT_PORT, "protocol": "UDP"}]}])
    } else {
        json!([])
    };
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "toggled", "namespace": sns},
           "spec": {"podSelector": {"matchLabels": labels(server_pod)}, "policyTypes": ["Ingress"], "ingress": ingress}})
}

/// Per change: (allow?, probe ms, programmed ms); `None` when not seen
/// within GIVE_UP.
type Samples = Vec<(bool, Option<f64>, Option<f64>)>;

fn measure(spec: &Spec, changes: usize) -> Result<(Samples, Option<Vec<cut::Sample>>)> {
    eprintln!("setting up {}", spec.title);
    let started = Instant::now();
    let mut node = Node::new()?;
    let api = node.ns.run(|| {
        ApiServer::start_with(Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            history_limit: 1_000_000,
            ..Config::default()
        })
    })??;
    for (i, ns) in spec.namespaces.iter().enumerate() {
        api.create(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns,
                "team": format!("t{}", i % 10), "env": if i % 3 == 0 { "prod" } else { "dev" }}}}),
        )?;
    }
    for (i, (ns, name, labels, remote)) in spec.pods.iter().enumerate() {
        let node_name = if remote.is_some() {
            format!("node-{}", 2 + i % 9)
        } else {
            NODE.into()
        };
        let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node_name, "containers": [{"name": "c", "image": "none",
                "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}]}]}});
        pod = api.create(pod)?;
        if let Some(ip) = remote {
            pod["status"] = json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]});
            api.update(pod, Part::Status)?;
        }
    }
    for p in &spec.policies {
        api.create(p.clone())?;
    }
    let mut current = api.create(toggled(spec, false))?;
    let key = format!("NetworkPolicy/{}/toggled", spec.server.0);

    node.use_api(&api, NODE)?;
    node.start_agent()?;
    node.wait_programmed(
        &key,
        Some(&resource_version(&current)),
        Duration::from_secs(120),
    )?;
    let config = conflist_config(&node, Some("10.244.0.0/24"), None);
    let mut wired = Vec::new();
    for (ns, name, _, remote) in &spec.pods {
        if remote.is_some() {
            continue;
        }
        let pod = Pod::add_as(&node, &config, Some((ns, name)))?;
        // What kubelet does once the sandbox is up: report the address.
        let mut obj = api.get("pods", ns, name).context("pod")?;
        let ip = pod.ipv4.context("pod address")?.to_string();
        obj["status"] = json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]});
        api.update(obj, Part::Status)?;
        wired.push(((ns.clone(), name.clone()), pod));
    }
    let find = |k: &(String, String)| wired.iter().find(|(w, _)| w == k).map(|(_, p)| p);
    let client = find(&spec.client).context("client pod")?;
    let server = find(&spec.server).context("server pod")?;
    let _acceptor = Acceptor::start(&server.ns, PORT, false)?;
    let to = SocketAddr::new(server.ipv4.context("server address")?, PORT);
    // Settled: the last pod status is programmed and the deny holds.
    let last = spec
        .pods
        .iter()
        .rev()
        .find(|p| p.3.is_none())
        .context("a local pod")?;
    let last_obj = api.get("pods", &last.0, &last.1).context("pod")?;
    node.wait_programmed(
        &format!("Pod/{}/{}", last.0, last.1),
        Some(&resource_version(&last_obj)),
        Duration::from_secs(60),
    )?;
    if probe_until(
        &client.ns,
        to,
        true,
        Instant::now(),
        Duration::from_millis(500),
    )
    .is_some()
    {
        bail!("{}: the client gets through before any allow", spec.title);
    }
    eprintln!(
        "  up in {:.1} s ({} local pods wired); measuring",
        started.elapsed().as_secs_f64(),
        wired.len()
    );

    let mut samples = Vec::new();
    for i in 0..changes {
        let allow = i % 2 == 0;
        let mut next = toggled(spec, allow);
        next["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        let (tx_probe, rx_probe) = mpsc::channel::<Instant>();
        let (tx_prog, rx_prog) = mpsc::channel::<(Instant, String)>();
        let client_path = client.ns.path();
        let prober = std::thread::spawn(move || -> Result<Option<f64>> {
            sluice_tests::enter(&client_path)?;
            let t0 = rx_probe.recv()?;
            Ok(probe_in_thread(to, allow, t0, GIVE_UP))
        });
        let socket = node.socket();
        let key = key.clone();
        let poller = std::thread::spawn(move || -> Result<Option<f64>> {
            let (t0, rv) = rx_prog.recv()?;
            programmed(&socket, &key, &rv, t0)
        });
        let t0 = Instant::now();
        tx_probe.send(t0)?;
        current = api.update(next, Part::Main)?;
        tx_prog.send((t0, resource_version(&current)))?;
        let probe = prober
            .join()
            .map_err(|_| anyhow::anyhow!("prober panicked"))??;
        let prog = poller
            .join()
            .map_err(|_| anyhow::anyhow!("poller panicked"))??;
        samples.push((allow, probe, prog));
        std::thread::sleep(Duration::from_millis(100));
    }
    let cuts = if spec.cut {
        eprintln!("  measuring apply-to-cut");
        let mut set_policy = |allow: bool| -> Result<String> {
            let mut next = toggled(spec, allow);
            next["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
            current = api.update(next, Part::Main)?;
            Ok(resource_version(&current))
        };
        let flows = (&client.ns, &server.ns);
        let rounds = changes.div_ceil(2);
        Some(cut::measure(
            &node,
            &key,
            flows,
            to.ip(),
            rounds,
            &mut set_policy,
        )?)
    } else {
        None
    };
    drop(wired);
    // The agent goes before the API server does (no reconnect noise).
    node.kill_agent()?;
    drop(api);
    Ok((samples, cuts))
}

/// From a thread in `ns`: see `probe_in_thread`.
fn probe_until(
    ns: &NetNs,
    to: SocketAddr,
    allow: bool,
    t0: Instant,
    give_up: Duration,
) -> Option<f64> {
    ns.run(move || probe_in_thread(to, allow, t0, give_up))
        .ok()
        .flatten()
}

/// New connections one after the other until one sees the wanted verdict;
/// ms from `t0` to that probe's start.
fn probe_in_thread(to: SocketAddr, allow: bool, t0: Instant, give_up: Duration) -> Option<f64> {
    let attempt =
        |timeout_ms: u64| u::connect_once(to, false, Duration::from_millis(timeout_ms)).is_some();
    while t0.elapsed() < give_up {
        let start = Instant::now();
        if allow {
            if attempt(5) {
                return Some(u::ms(start - t0));
            }
        } else if !attempt(50) && !attempt(50) {
            return Some(u::ms(start - t0));
        }
    }
    None
}

/// Polls the agent until `key` is programmed at `rv` or later; ms from `t0`.
fn programmed(socket: &std::path::Path, key: &str, rv: &str, t0: Instant) -> Result<Option<f64>> {
    let want: u64 = rv.parse()?;
    while t0.elapsed() < GIVE_UP {
        let mut s = std::os::unix::net::UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        std::io::Write::write_all(&mut s, Request::Programmed.to_line()?.as_bytes())?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line)?;
        if let Response::Programmed { objects, .. } = serde_json::from_str(line.trim_end())?
            && objects
                .get(key)
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|h| h >= want)
        {
            return Ok(Some(u::ms(t0.elapsed())));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(None)
}

/// Prints the scenario's table; returns its target line.
fn report(spec: &Spec, samples: &Samples) -> String {
    println!();
    println!("{}: {} changes", spec.title, samples.len());
    println!(
        "  {:<40} {:>8} {:>8} {:>8} {:>6}",
        "ms from the API write", "p50", "p99", "max", "lost"
    );
    let mut worst: f64 = 0.0;
    let mut lost_any = false;
    for (what, col) in [
        ("first probe with the new verdict", 1),
        ("agent reports it programmed", 2),
    ] {
        for (label, filter) in [("allow", Some(true)), ("deny", Some(false)), ("all", None)] {
            let picked: Vec<Option<f64>> = samples
                .iter()
                .filter(|s| filter.is_none_or(|f| s.0 == f))
                .map(|s| if col == 1 { s.1 } else { s.2 })
                .collect();
            let seen: Vec<f64> = picked.iter().flatten().copied().collect();
            let lost = picked.len() - seen.len();
            println!(
                "  {:<40} {:>8.1} {:>8.1} {:>8.1} {:>6}",
                format!("{what}, {label}"),
                u::pct(&seen, 50.0),
                u::pct(&seen, 99.0),
                u::pct(&seen, 100.0),
                lost
            );
            if filter.is_none() {
                worst = worst.max(u::pct(&seen, 99.0));
                lost_any |= lost > 0;
            }
        }
    }
    format!(
        "{}: p99 < {:.0} ms: worst p99 {worst:.1} ms{}: {}",
        spec.title,
        spec.target_ms,
        if lost_any {
            " (some changes never seen)"
        } else {
            ""
        },
        u::verdict(worst < spec.target_ms && !lost_any)
    )
}

/// Prints apply-to-cut; returns its target line.
fn report_cut(spec: &Spec, cuts: &[cut::Sample]) -> String {
    println!();
    println!("{}: apply-to-cut, {} rounds", spec.title, cuts.len());
    println!(
        "  {:<40} {:>8} {:>8} {:>8} {:>6}",
        "ms from the API write", "p50", "p99", "max", "lost"
    );
    let tcp: Vec<Option<f64>> = cuts.iter().map(|c| c.0).collect();
    let udp: Vec<Option<f64>> = cuts.iter().map(|c| c.1).collect();
    let all: Vec<Option<f64>> = tcp.iter().chain(&udp).copied().collect();
    let mut p99_all = 0.0;
    let mut lost_any = false;
    for (label, picked) in [
        ("first dropped packet, TCP connection", &tcp),
        ("first dropped packet, UDP flow", &udp),
        ("first dropped packet, all", &all),
    ] {
        let seen: Vec<f64> = picked.iter().flatten().copied().collect();
        let lost = picked.len() - seen.len();
        println!(
            "  {:<40} {:>8.1} {:>8.1} {:>8.1} {:>6}",
            label,
            u::pct(&seen, 50.0),
            u::pct(&seen, 99.0),
            u::pct(&seen, 100.0),
            lost
        );
        p99_all = u::pct(&seen, 99.0);
        lost_any |= lost > 0;
    }
    format!(
        "{}: apply-to-cut p99 < {:.0} ms: p99 {p99_all:.1} ms{}: {}",
        spec.title,
        spec.target_ms,
        if lost_any {
            " (some flows never cut)"
        } else {
            ""
        },
        u::verdict(p99_all < spec.target_ms && !lost_any)
    )
}
