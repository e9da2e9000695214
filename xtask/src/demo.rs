//! `cargo xtask demo`: Sluice's main job on the embedded default. A node
//! (network namespace) runs the real agent in cluster mode against the test
//! API server; the nine pods of the upstream model are wired by the real
//! CNI plugin, each with a ClusterIP Service DNATed by kube-proxy-shaped
//! nftables rules. kubectl applies the policies in deploy/examples/; the
//! reachability matrix is printed before and after, then the drop log of
//! one denied probe, live, and `sluice explain` of it; `sluice lint` on a
//! policy with the two-item `from` trap; `sluice assert` on
//! deploy/examples/assert/demo.yaml (TAP); last, deploy/examples/cluster/'s
//! block-metadata ClusterNetworkPolicy wins over a NetworkPolicy that allows
//! all egress, and the drop line names its rule. Everything is torn down at
//! the end (the guards also clean up on failure).
use std::{
    io::{BufRead as _, BufReader, Write as _},
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

#[derive(Clone, Copy)]
enum Apply<'a> {
    Path(&'a Path),
    Stdin(&'a str),
}

/// `kubectl apply` on the node, its output printed.
fn kubectl_apply(cluster: &Cluster, what: Apply<'_>) -> Result<()> {
    let node = cluster.node(0).context("node")?;
    let kubeconfig = cluster.kubeconfig().context("kubeconfig")?;
    let mut cmd = node.ns.command("kubectl");
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["apply", "-f"]);
    let out = match what {
        Apply::Path(p) => cmd.arg(p).output(),
        Apply::Stdin(text) => {
            let mut child = cmd
                .arg("-")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("running kubectl (installed on these machines)")?;
            child
                .stdin
                .take()
                .context("kubectl stdin")?
                .write_all(text.as_bytes())?;
            child.wait_with_output()
        }
    }
    .context("running kubectl (installed on these machines)")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!(
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs `probe` while `sluice observe --pod <pod>` follows the pod's drops
/// live, each line printed as the agent sends it; returns the probe's
/// result and the number of lines.
fn observe_while<T>(
    node: &sluice_tests::Node,
    pod: &str,
    probe: impl FnOnce() -> T,
) -> Result<(T, usize)> {
    let mut observe = node
        .ns
        .command(bin_dir().join("sluice"))
        .args(["observe", "--pod", pod, "--socket"])
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
    let result = probe();
    std::thread::sleep(Duration::from_millis(200));
    observe.kill()?;
    observe.wait()?;
    let lines = follow
        .join()
        .map_err(|_| anyhow::anyhow!("observe reader panicked"))?;
    Ok((result, lines))
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
    kubectl_apply(&cluster, Apply::Path(&examples))?;
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
    println!("$ sluice observe --pod {to}   (live, while {from} connects to {to_ip}:80 for 2.5 s)");
    let (connected, drops) = observe_while(node, to, || {
        sluice_tests::tcp_ok(from_ns, to_ip, 80, Duration::from_millis(2500))
    })?;
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
    explain_step(node, from, to)?;
    lint_step(&root)?;
    assert_step(node, &root)?;
    cluster_policy_step(&cluster, &root)?;
    println!("\nTearing down the node, its pods and the API server.");
    drop(cluster);
    Ok(())
}

/// Why was it denied? `sluice explain`, answered by the agent from the
/// compiler state it programmed.
fn explain_step(node: &sluice_tests::Node, from: &str, to: &str) -> Result<()> {
    println!("\n$ sluice explain {from} {to} 80/TCP");
    let out = node
        .ns
        .command(bin_dir().join("sluice"))
        .args(["explain", from, to, "80/TCP", "--socket"])
        .arg(node.socket())
        .output()
        .context("sluice explain")?;
    let text = String::from_utf8_lossy(&out.stdout);
    for l in text.lines() {
        println!("  {l}");
    }
    if !out.status.success() || !text.to_lowercase().contains("denied") {
        bail!(
            "sluice explain did not explain the denied probe: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `sluice lint` on a policy with the two-item `from` trap (offline, on
/// the file): it warns, and says how to write the AND it likely meant.
fn lint_step(root: &Path) -> Result<()> {
    println!("\n$ sluice lint -f deploy/examples/lint/");
    let out = std::process::Command::new(bin_dir().join("sluice"))
        .args(["lint", "-f", "deploy/examples/lint/"])
        .current_dir(root)
        .output()
        .context("sluice lint")?;
    let text = String::from_utf8_lossy(&out.stdout);
    for l in text.lines() {
        println!("  {l}");
    }
    if out.status.code() != Some(1) || !text.contains("two-item-peer") {
        bail!("sluice lint did not warn about the two-item trap");
    }
    Ok(())
}

/// `sluice assert` on deploy/examples/assert/demo.yaml: each probe from
/// inside its source pod, TAP printed; every assertion must hold.
fn assert_step(node: &sluice_tests::Node, root: &Path) -> Result<()> {
    let file = "deploy/examples/assert/demo.yaml";
    println!("\n$ sluice assert -f {file}");
    let out = std::process::Command::new(bin_dir().join("sluice"))
        .args(["assert", "-f"])
        .arg(root.join(file))
        .arg("--socket")
        .arg(node.socket())
        .output()
        .context("sluice assert")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("sluice assert: an assertion did not hold ({})", out.status);
    }
    Ok(())
}

/// The last step: deploy/examples/cluster/block-cloud-metadata.yaml (an
/// Admin Deny) against z/a, whose NetworkPolicy allows all egress. Nothing
/// answers at 169.254.169.254 on this node, so the demo's copy of the
/// policy also denies y/a's address, standing in for the metadata service:
/// that probe connects before and is blocked after. Both probes' drops are
/// shown as `sluice observe` prints them, naming the rule.
fn cluster_policy_step(cluster: &Cluster, root: &Path) -> Result<()> {
    let node = cluster.node(0).context("node")?;
    let (from, stand_in) = ("z/a", "y/a");
    let from_ns = cluster.pod_netns(from).context("z/a's namespace")?;
    let ip = cluster
        .ip_of(stand_in, Family::Ipv4)
        .context("y/a's address")?;
    let metadata: std::net::IpAddr = [169, 254, 169, 254].into();
    let probe = |to| sluice_tests::tcp_ok(from_ns, to, 80, PROBE_TIMEOUT);
    println!("\n== ClusterNetworkPolicy: the Admin tier wins over NetworkPolicy ==\n");
    let allow_all = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all-egress, namespace: z}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress: [{}]
";
    println!("$ kubectl apply -f -   (z/a: a NetworkPolicy allowing all egress)");
    kubectl_apply(cluster, Apply::Stdin(allow_all))?;
    let rv = cluster
        .resource_version("networkpolicies", "z", "allow-all-egress")
        .context("policy in the API")?;
    node.wait_programmed(
        "NetworkPolicy/z/allow-all-egress",
        Some(&rv),
        Duration::from_secs(20),
    )?;
    let before = probe(ip);
    println!(
        "{from} -> {stand_in} ({ip}):80 {}",
        if before { "connects" } else { "is blocked" }
    );
    if !before {
        bail!("expected {from} to reach {stand_in} before the cluster policy");
    }

    let example = "deploy/examples/cluster/block-cloud-metadata.yaml";
    let text = std::fs::read_to_string(root.join(example))?;
    let line = "      - 169.254.169.254/32\n";
    if !text.contains(line) {
        bail!("{example} no longer lists 169.254.169.254/32 as this demo expects");
    }
    let text = text.replacen(
        line,
        &format!("{line}      - {ip}/32   # the demo's stand-in for the metadata service\n"),
        1,
    );
    println!(
        "$ kubectl apply -f -   ({example}, plus {ip}/32: nothing answers at 169.254.169.254 here)"
    );
    kubectl_apply(cluster, Apply::Stdin(&text))?;
    let rv = cluster
        .resource_version("clusternetworkpolicies", "", "block-metadata")
        .context("cluster policy in the API")?;
    node.wait_programmed(
        "ClusterNetworkPolicy/block-metadata",
        Some(&rv),
        Duration::from_secs(20),
    )?;
    println!(
        "$ sluice observe --pod {from}   (live, while {from} connects to {ip}:80 and {metadata}:80)"
    );
    let (reached, drops) = observe_while(node, from, || {
        [ip, metadata].map(|to| sluice_tests::tcp_ok(from_ns, to, 80, Duration::from_millis(1500)))
    })?;
    for (to, ok) in [ip, metadata].iter().zip(reached) {
        println!(
            "{from} -> {to}:80 {}",
            if ok { "connects" } else { "is blocked" }
        );
    }
    if reached[0] || drops == 0 {
        bail!("expected the metadata block to stop {from} -> {ip} and name its rule");
    }
    Ok(())
}
