//! `bench cni`: CNI ADD and DEL latency as a runtime sees it: the plugin
//! binary exec'd in the node namespace with the CNI environment and config
//! on stdin, timed from spawn to exit. The agent runs in cluster mode
//! against the test API server, with NetworkPolicies selecting the pods, so
//! every ADD includes the agent computing and writing the pod's policy
//! (the plugin returns only after that). 100 pods one after the other
//! (ADD each, then DEL each), then batches of 50 and 100 at once (ADD,
//! then DEL), `--rounds` times; the reference `bridge` plugin with
//! `host-local` is measured the same way, interleaved pod by pod
//! (sequential) or batch by batch (parallel). IPv4 only for both. To
//! show where Sluice's time goes, the same plugin also runs (sequential
//! only) against a stub agent that answers at once.
//!
//! Where the time goes: every Sluice ADD reports its phases (the plugin's
//! steps and the agent's split of its answer, `SLUICE_CNI_PHASES=1`), and
//! the kernel's floor is measured alone: the TCX attaches of a pod on
//! fresh veths, one after the other and in batches (`cni_attach`).
//!
//! `cargo xtask bench cni [--rounds 3] [--sequential 100] [--parallel 50,100] [--rcu-expedited]`
//!
//! `--rcu-expedited` sets the kernel's `/sys/kernel/rcu_expedited` to 1 for
//! the run and puts the old value back after it (even when the run fails):
//! it shows how much of the TCX floor is the length of a normal RCU grace
//! period. A node-wide setting of the operator's, never of Sluice's;
//! docs/performance.md says what it costs.
//!
//! `SLUICE_BENCH_AGENT_ARGS` (split at whitespace) is appended to the
//! agent's command line, e.g. `--tc-attach clsact` to time clsact filters
//! instead of TCX links.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::{UnixListener, UnixStream},
    path::PathBuf,
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use sluice_proto::{Request, Response};
use sluice_test_apiserver::{Server as ApiServer, resource_version};
use sluice_tests::{NetNs, Node, TempDir, conflist_config};

use super::{
    cni_attach, cni_report,
    util::{self as u},
};

const NS: &str = "bench";
const NODE: &str = "node-1";

#[derive(clap::Args)]
pub struct Args {
    /// Rounds of the whole measurement.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Pods added (then deleted) one after the other.
    #[arg(long = "sequential", default_value_t = 100)]
    seq: usize,
    /// Batch sizes: pods added (then deleted) at once, one batch per size.
    #[arg(long = "parallel", value_delimiter = ',', default_value = "50,100")]
    par: Vec<usize>,
    /// Expedited RCU grace periods for the run (node-wide; restored after).
    #[arg(long)]
    rcu_expedited: bool,
}

const RCU_EXPEDITED: &str = "/sys/kernel/rcu_expedited";

/// `rcu_expedited` set for as long as it lives; the old value put back on
/// drop.
struct Expedited(String);

impl Expedited {
    fn set() -> Result<Self> {
        let old = std::fs::read_to_string(RCU_EXPEDITED)
            .with_context(|| format!("reading {RCU_EXPEDITED}"))?;
        std::fs::write(RCU_EXPEDITED, "1").with_context(|| format!("writing {RCU_EXPEDITED}"))?;
        Ok(Self(old.trim().to_owned()))
    }
}

impl Drop for Expedited {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(RCU_EXPEDITED, &self.0) {
            eprintln!("putting {RCU_EXPEDITED} back to {}: {e}", self.0);
        }
    }
}

/// Latencies of one plugin, ms: [ADD, DEL].
pub type Verbs = [Vec<f64>; 2];

/// Phase name -> durations (ms) of ADDs that reported phases.
pub type PhaseSamples = BTreeMap<String, Vec<f64>>;

/// One batch size: per plugin (sluice, bridge), each call's latency and
/// each round's wall time, and sluice's ADD phases.
pub struct Batch {
    pub n: usize,
    pub each: [Verbs; 2],
    pub walls: [Verbs; 2],
    pub phases: PhaseSamples,
}

#[derive(Default)]
pub struct Results {
    /// [sluice, bridge, plugin only]
    pub seq: [Verbs; 3],
    pub seq_phases: PhaseSamples,
    pub seq_del_phases: PhaseSamples,
    /// The same plugin's DEL against the stub agent (no links on its veths).
    pub stub_del_phases: PhaseSamples,
    pub par: Vec<Batch>,
    pub floor: cni_attach::Floor,
}

pub fn run(args: &Args) -> Result<()> {
    let Args {
        rounds,
        seq,
        par,
        rcu_expedited,
    } = args;
    let (rounds, seq) = (*rounds, *seq);
    let _expedited = rcu_expedited.then(Expedited::set).transpose()?;
    let max_par = par.iter().copied().max().unwrap_or(0);
    u::header(
        "Sluice bench cni: ADD and DEL latency",
        &["containernetworking-plugins"],
    );

    let mut node = Node::new()?;
    let api = node
        .ns
        .run(|| ApiServer::start("127.0.0.1:0".parse().map_err(anyhow::Error::from)?))??;
    let mut last = (String::new(), String::new());
    for obj in objects(seq.max(max_par)) {
        let stored = api.create(obj)?;
        let m = &stored["metadata"];
        last = (
            format!(
                "{}/{NS}/{}",
                stored["kind"].as_str().unwrap_or_default(),
                m["name"].as_str().unwrap_or_default()
            ),
            resource_version(&stored),
        );
    }
    node.use_api(&api, NODE)?;
    if let Ok(extra) = std::env::var("SLUICE_BENCH_AGENT_ARGS") {
        node.agent_args
            .extend(extra.split_whitespace().map(String::from));
    }
    node.start_agent()?;
    node.wait_programmed(&last.0, Some(&last.1), Duration::from_secs(30))?;
    let sluice = Plugin {
        node_ns: node.ns.path(),
        binary: sluice_tests::bin_dir().join("sluice"),
        config: conflist_config(&node, Some("10.79.0.0/16"), None),
    };
    let br_node = NetNs::new("sl-brnode")?;
    let br_state = TempDir::new("sluice-bench-bridge-")?;
    let bridge = Plugin {
        node_ns: br_node.path(),
        binary: PathBuf::from(u::REFERENCE_PLUGINS).join("bridge"),
        config: u::bridge_config("10.80.0.0/16", &br_state.0),
    };
    // The plugin alone: the same binary against an agent that answers at
    // once and does nothing (no programs, no maps).
    let stub_node = NetNs::new("sl-stubnode")?;
    let stub_dir = TempDir::new("sluice-bench-stub-")?;
    let stub = StubAgent::start(&stub_dir.0.join("agent.sock"))?;
    let plugin_only = Plugin {
        node_ns: stub_node.path(),
        binary: sluice.binary.clone(),
        config: json!({"cniVersion": "1.1.0", "name": "sluice-stub", "type": "sluice",
            "ranges": [["10.81.0.0/16"]], "dataDir": stub_dir.0.join("ipam"),
            "agentSocket": stub.path, "deleteQueueDir": stub_dir.0.join("delete-queue")})
        .to_string(),
    };
    println!(
        "{seq} pods in sequence and batches of {par:?} in parallel, {rounds} rounds; agent in cluster mode, 4 NetworkPolicies select the pods; latency from exec to exit"
    );
    let rcu = std::fs::read_to_string(RCU_EXPEDITED).unwrap_or_default();
    println!(
        "RCU grace periods: {} ({RCU_EXPEDITED} = {})",
        if rcu.trim() == "1" {
            "expedited"
        } else {
            "normal"
        },
        rcu.trim()
    );

    let mut res = Results {
        par: par
            .iter()
            .map(|&n| Batch {
                n,
                each: Default::default(),
                walls: Default::default(),
                phases: PhaseSamples::new(),
            })
            .collect(),
        ..Results::default()
    };
    for round in 0..rounds {
        let pods: Vec<[NetNs; 3]> = (0..seq)
            .map(|_| {
                Ok([
                    NetNs::new("sl-pod")?,
                    NetNs::new("sl-brpod")?,
                    NetNs::new("sl-pod")?,
                ])
            })
            .collect::<Result<_>>()?;
        let plugins = [&sluice, &bridge, &plugin_only];
        for (i, netns) in pods.iter().enumerate() {
            for (k, plugin) in plugins.iter().enumerate() {
                let (took, phases) = plugin.call("ADD", i, round, &netns[k])?;
                res.seq[k][0].push(took);
                if k == 0 {
                    record_phases(&mut res.seq_phases, phases.as_ref());
                }
            }
            if i == 1 && round == 0 {
                check_isolated(&pods[0][0], &pods[1][0], &node)?;
            }
        }
        for (i, netns) in pods.iter().enumerate() {
            for (k, plugin) in plugins.iter().enumerate() {
                let (took, phases) = plugin.call("DEL", i, round, &netns[k])?;
                res.seq[k][1].push(took);
                match k {
                    0 => record_phases(&mut res.seq_del_phases, phases.as_ref()),
                    2 => record_phases(&mut res.stub_del_phases, phases.as_ref()),
                    _ => {}
                }
            }
        }
        drop(pods);
        for batch in &mut res.par {
            for (k, plugin) in [&sluice, &bridge].into_iter().enumerate() {
                let pods: Vec<NetNs> = (0..batch.n)
                    .map(|_| NetNs::new("sl-pod"))
                    .collect::<Result<_>>()?;
                for (v, verb) in ["ADD", "DEL"].into_iter().enumerate() {
                    let id_round = 1000 * (round + 1) + batch.n;
                    let (each, wall) = parallel(plugin, verb, id_round, &pods)?;
                    for (took, phases) in each {
                        batch.each[k][v].push(took);
                        if k == 0 && v == 0 {
                            record_phases(&mut batch.phases, phases.as_ref());
                        }
                    }
                    batch.walls[k][v].push(wall);
                }
            }
        }
        cni_attach::measure(&mut res.floor, seq, par)?;
        eprintln!(
            "round {}: sluice sequential ADD p50 {:.1} ms p99 {:.1} ms",
            round + 1,
            u::pct(&res.seq[0][0], 50.0),
            u::pct(&res.seq[0][0], 99.0)
        );
    }
    cni_report::report(&res, seq);
    // The agent goes before the API server does (no reconnect noise).
    node.kill_agent()
}

/// Adds one ADD's phases (`sluice phases` line of the plugin) in ms:
/// `plugin: <step>` and `agent: <phase>`.
fn record_phases(into: &mut PhaseSamples, phases: Option<&Value>) {
    let Some(p) = phases else { return };
    let steps = p["steps_us"].as_object().into_iter().flatten();
    let agent = p["agent"].as_object().into_iter().flatten();
    for (prefix, (k, v)) in steps
        .map(|kv| ("plugin", kv))
        .chain(agent.map(|kv| ("agent", kv)))
    {
        if let Some(us) = v.as_u64() {
            let name = format!("{prefix}: {}", k.trim_end_matches("_us"));
            into.entry(name).or_default().push(us as f64 / 1e3);
        }
    }
}

struct Plugin {
    node_ns: PathBuf,
    binary: PathBuf,
    config: String,
}

impl Plugin {
    /// One call for pod `i`; its latency in ms, and the phases a Sluice
    /// ADD reports (`SLUICE_CNI_PHASES`). The container id is the same
    /// for ADD and DEL of one pod in one round.
    fn call(
        &self,
        verb: &str,
        i: usize,
        round: usize,
        pod: &NetNs,
    ) -> Result<(f64, Option<Value>)> {
        let id = format!("bench{round}x{i}");
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={NS};K8S_POD_NAME=p{i}");
        let env = u::cni_env(
            verb,
            &id,
            &pod.path(),
            &[("CNI_ARGS", &args), ("SLUICE_CNI_PHASES", "1")],
        );
        let (out, took) = u::exec_plugin(&self.node_ns, &self.binary, &env, &self.config)?;
        if !out.status.success() {
            bail!(
                "{} {verb} {id}: {}{}",
                self.binary.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let phases = String::from_utf8_lossy(&out.stderr)
            .lines()
            .find_map(|l| l.strip_prefix("sluice phases "))
            .and_then(|j| serde_json::from_str(j).ok());
        Ok((u::ms(took), phases))
    }
}

type Timed = (f64, Option<Value>);

/// Every pod's `verb` at once (released together by a barrier): each
/// call's latency and phases, and the wall time of the batch, in ms.
fn parallel(
    plugin: &Plugin,
    verb: &str,
    round: usize,
    pods: &[NetNs],
) -> Result<(Vec<Timed>, f64)> {
    let barrier = Barrier::new(pods.len() + 1);
    let (each, wall) = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    plugin.call(verb, i, round, pod)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let each = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("plugin thread panicked"))?
            })
            .collect::<Result<Vec<Timed>>>();
        (each, u::ms(t0.elapsed()))
    });
    Ok((each?, wall))
}

/// The default deny is in force from ADD: p1 gets nothing from p0 on a
/// port no policy allows (a timeout, not a refusal).
fn check_isolated(p0: &NetNs, p1: &NetNs, node: &Node) -> Result<()> {
    let ip = p1.run(|| sluice_tests::sh("ip", &["-4", "-o", "addr", "show", "dev", "eth0"]))??;
    let ip: std::net::IpAddr = ip
        .split_whitespace()
        .nth(3)
        .and_then(|a| a.split('/').next())
        .context("p1 address")?
        .parse()?;
    let to = std::net::SocketAddr::new(ip, 9);
    let timed_out = p0.run(move || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_millis(300))
            .err()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
    })?;
    if !timed_out {
        bail!(
            "the default deny was not in force after ADD; agent reports {:?}",
            node.request(&sluice_proto::Request::Programmed)?
        );
    }
    Ok(())
}

/// A stand-in agent on a unix socket: answers every request at once
/// (AddEndpoint with a fresh id, anything else Ok) and does nothing.
struct StubAgent {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StubAgent {
    fn start(path: &std::path::Path) -> Result<Self> {
        let listener = UnixListener::bind(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut ep_id = 0;
            while !s.load(Ordering::Relaxed) {
                let Ok((conn, _)) = listener.accept() else {
                    continue;
                };
                let _ignored = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                let mut reader = BufReader::new(&conn);
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let answer = match serde_json::from_str::<Request>(line.trim_end()) {
                    Ok(Request::AddEndpoint { .. }) => {
                        ep_id += 1;
                        Response::Endpoint {
                            ep_id,
                            phases: None,
                        }
                    }
                    _ => Response::Ok,
                };
                if let Ok(text) = answer.to_line() {
                    let _ignored = (&conn).write_all(text.as_bytes());
                }
            }
        });
        Ok(Self {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for StubAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept (closed at once, so the read sees EOF).
        drop(UnixStream::connect(&self.path));
        if let Some(t) = self.thread.take() {
            let _ignored = t.join();
        }
    }
}

/// The namespace, `pods` Pod objects on this node (app: web, db, batch in
/// turn) and four NetworkPolicies selecting them.
fn objects(pods: usize) -> Vec<Value> {
    let mut out = vec![json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NS, "labels": {"kubernetes.io/metadata.name": NS}}})];
    for i in 0..pods {
        let app = ["web", "db", "batch"][i % 3];
        out.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p{i}"), "namespace": NS, "labels": {"app": app}},
            "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "none",
                "ports": [{"containerPort": 80, "name": "http", "protocol": "TCP"}]}]}}));
    }
    let np = |name: &str, spec: Value| {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": name, "namespace": NS}, "spec": spec})
    };
    out.push(np(
        "default-deny",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    ));
    out.push(np(
        "web-from-anywhere",
        json!({"podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"ports": [{"port": "http"}]}]}),
    ));
    out.push(np(
        "db-from-web",
        json!({"podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                     "ports": [{"port": 5432, "protocol": "TCP"}]}]}),
    ));
    out.push(np(
        "web-egress",
        json!({"podSelector": {"matchLabels": {"app": "web"}},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}]},
                   {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.96.0.0/12"]}}],
                    "ports": [{"port": 53, "protocol": "UDP"}]}]}),
    ));
    out
}
