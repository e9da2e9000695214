//! `cargo xtask demo`: Sluice's main job on the embedded default. A node
//! (network namespace) runs the real agent in cluster mode against the test
//! API server; the nine pods of the upstream model are wired by the real
//! CNI plugin, each with a ClusterIP Service DNATed by kube-proxy-shaped
//! nftables rules. kubectl applies the policies in deploy/examples/; the
//! reachability matrix is printed before and after, then the drop log of
//! one denied probe, live. Everything is torn down at
//! the end (the guards also clean up on failure).
use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use sluice_tests::{
    bin_dir,
    cases::{Family, Protocol},
    conformance::{Cluster, ProbeTarget},
};

const PROBE_TIMEOUT: Duration = Duration::from_millis(400);

fn show(title: &str, cluster: &Cluster) -> Result<()> {
    let m = cluster.probe(
        &cluster.pod_names(),
        Family::Ipv4,
        ProbeTarget::Service,
        Protocol::Tcp,
        80,
        PROBE_TIMEOUT,
    )?;
    println!("{title}\n{}", m.render());
    Ok(())
}

pub fn run() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = std::fs::read_to_string(root.join("tests/conformance/model-default.yaml"))?;
    println!("== Sluice demo: one node, the 9-pod model, two NetworkPolicies ==\n");
    let started = Instant::now();
    let cluster = Cluster::start(1, &model)?;
    let node = cluster.node(0).context("node")?;
    let kubeconfig = cluster.kubeconfig().context("kubeconfig")?;
    println!(
        "node {} up in {:.1}s: agent in cluster mode, 9 pods, 9 Services (kubectl --kubeconfig {})\n",
        node.ns.name,
        started.elapsed().as_secs_f64(),
        kubeconfig.display()
    );
    show(
        "TCP/80 through each pod's Service, no policy (rows: from, columns: to; . connects, X blocked):",
        &cluster,
    )?;

    let examples = root.join("deploy/examples");
    println!("$ kubectl apply -f deploy/examples/");
    let out = node
        .ns
        .command("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["apply", "-f"])
        .arg(&examples)
        .output()
        .context("running kubectl (installed on these machines)")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!(
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let t0 = Instant::now();
    for name in ["default-deny-ingress", "allow-web-from-y"] {
        let rv = cluster
            .resource_version("networkpolicies", "x", name)
            .context("policy in the API")?;
        node.wait_programmed(
            &format!("NetworkPolicy/x/{name}"),
            Some(&rv),
            Duration::from_secs(20),
        )?;
    }
    println!(
        "agent reports both policies programmed after {} ms\n",
        t0.elapsed().as_millis()
    );

    show(
        "TCP/80 with the policies: x accepts only y -> x/a:",
        &cluster,
    )?;

    // One denied probe, with the drop log followed live: each line is
    // printed as `sluice observe` receives it from the agent.
    let (from, to) = ("z/a", "x/b");
    let to_ip = cluster.ip_of(to, Family::Ipv4).context("x/b's address")?;
    let from_ns = cluster.pod_netns(from).context("z/a's namespace")?;
    let mut observe = node
        .ns
        .command(bin_dir().join("sluice"))
        .args(["observe", "--pod", to, "--socket"])
        .arg(node.socket())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("sluice observe")?;
    let stdout = observe.stdout.take().context("observe output")?;
    let follow = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(|l| l.ok())
            .inspect(|l| println!("  {l}"))
            .count()
    });
    // Give the subscription a moment to reach the agent.
    std::thread::sleep(Duration::from_millis(200));
    println!("$ sluice observe --pod {to}   (live, while {from} connects to {to_ip}:80 for 2.5 s)");
    let connected = sluice_tests::tcp_ok(from_ns, to_ip, 80, Duration::from_millis(2500));
    std::thread::sleep(Duration::from_millis(200));
    observe.kill()?;
    observe.wait()?;
    let drops = follow
        .join()
        .map_err(|_| anyhow::anyhow!("observe reader panicked"))?;
    println!(
        "{from} -> {to}:80 {}: {drops} drop event(s) (the SYN and its retransmissions, at most one event per flow per second)",
        if connected {
            "connected"
        } else {
            "denied by policy"
        }
    );
    if connected || drops == 0 {
        bail!("expected the probe to be denied and its drops reported");
    }
    println!("\nTearing down the node, its pods and the API server.");
    drop(cluster);
    Ok(())
}
