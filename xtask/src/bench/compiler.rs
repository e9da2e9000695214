//! `bench compiler`: the NetworkPolicy compiler on a synthetic cluster
//! (default 10,000 pods in 500 namespaces, 2,000 policies mixing pod and
//! namespace selectors, numeric and named ports, port ranges, ipBlocks with
//! excepts, egress and ingress). Prints the full compile time, the peak
//! memory (VmHWM), the entries produced, and the time of incremental
//! updates: pod relabels and policy changes. Then the same with
//! ClusterNetworkPolicies on top (`--cluster-policies N`, default 500;
//! compiler_cnp.rs).
//!
//! Numbers only mean something in release mode:
//! `cargo run --release -p xtask -- bench compiler [--pods N] [--namespaces N]
//! [--policies N] [--cluster-policies N] [--local-every K] [--rounds N]`. Every pod is a local
//! endpoint by default (the worst case: a real node holds a few hundred);
//! `--local-every K` makes one pod in K local. The targets of issue 15 (a
//! node of 100,000 pods: `--local-every 910`) and `--curve` (1k to 100k
//! pods, a node and every pod local) are compiler_scale.rs's.
use std::time::{Duration, Instant};

use super::compiler_scale::{Part, Report};
use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use sluice_agent::policy::{
    Changes, Compiler, Locality, Resync, entry_count,
    k8s_openapi::api::{
        core::v1::{Namespace, Pod},
        networking::v1::NetworkPolicy,
    },
};

#[derive(clap::Args, Clone, Copy)]
pub struct Args {
    /// Pods in the synthetic cluster.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Namespaces the pods are spread over (at most one per pod).
    #[arg(long, default_value_t = 500)]
    namespaces: usize,
    /// NetworkPolicies.
    #[arg(long, default_value_t = 2_000)]
    policies: usize,
    /// One pod in K is a local endpoint (0 counts as 1).
    #[arg(long = "local-every", default_value_t = 1)]
    local_every: usize,
    /// ClusterNetworkPolicies added on top, measured as their own rows
    /// after the NetworkPolicy-only ones (0 skips them).
    #[arg(long = "cluster-policies", default_value_t = 500)]
    cluster_policies: usize,
    /// Rounds of each incremental update (0 counts as 1).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Print the curve instead: 1k, 10k, 50k and 100k pods (namespaces and
    /// policies in the same proportion), each size run in its own process,
    /// as a node of such a cluster (110 local pods) and with every pod
    /// local (the stress rows).
    #[arg(long)]
    curve: bool,
    /// Also print the results as one `bench-row:` JSON line (used by
    /// `--curve` to read its child runs).
    #[arg(long, hide = true)]
    row: bool,
}

impl Args {
    /// 0 raised to 1 where only that makes sense; an error if the cluster
    /// cannot be built.
    fn checked(&self) -> Result<Self> {
        if self.namespaces == 0 || self.pods < self.namespaces {
            bail!("need at least one pod per namespace");
        }
        Ok(Self {
            local_every: self.local_every.max(1),
            rounds: self.rounds.max(1),
            ..*self
        })
    }
}

pub(super) const APPS: usize = 5;
pub(super) const TEAMS: usize = 25;

/// Namespace `i`'s labels: a team of `TEAMS`, one in three is prod.
pub(super) fn namespace_labels(i: usize) -> Value {
    json!({
        "kubernetes.io/metadata.name": format!("ns-{i}"),
        "team": format!("t{}", i % TEAMS),
        "env": if i.is_multiple_of(3) { "prod" } else { "dev" },
    })
}

fn namespace(i: usize, extra: Option<(&str, &str)>) -> Result<Namespace> {
    let name = format!("ns-{i}");
    let mut labels = namespace_labels(i);
    if let Some((k, v)) = extra {
        labels[k] = json!(v);
    }
    Ok(serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}}),
    )?)
}

/// Named ports by app: the tables differ, so named ports resolve to
/// different numbers (or not at all) across identities.
pub(super) fn ports_of(app: usize) -> Value {
    match app {
        0 => {
            json!([{"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090}])
        }
        1 => json!([{"name": "http", "containerPort": 80}]),
        2 => {
            json!([{"name": "grpc", "containerPort": 50051}, {"name": "metrics", "containerPort": 9102}])
        }
        3 => json!([{"name": "db", "containerPort": 5432}]),
        _ => json!([{"name": "dns", "containerPort": 53, "protocol": "UDP"}]),
    }
}

/// Pods a kubelet runs at most by default (`maxPods`): a node's endpoints.
pub(super) const NODE_PODS: usize = 110;

pub(super) struct PodSpec {
    ns: usize,
    name: String,
    pub(super) app: usize,
    labels: Value,
    ip: String,
    node: &'static str,
}

fn pod(p: &PodSpec) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"namespace": format!("ns-{}", p.ns), "name": p.name, "labels": p.labels},
        "spec": {"nodeName": p.node, "containers": [{"name": "main", "ports": ports_of(p.app)}]},
        "status": {"phase": "Running", "podIP": p.ip, "podIPs": [{"ip": p.ip}]},
    }))?)
}

fn pod_specs(params: &Args) -> Vec<PodSpec> {
    (0..params.pods)
        .map(|i| {
            let ns = i % params.namespaces;
            let j = i / params.namespaces;
            let app = j % APPS;
            // Two versions per app: about 10 identities per namespace.
            let labels =
                json!({"app": format!("app{app}"), "version": format!("v{}", (j / APPS) % 2)});
            let n = i + 1;
            PodSpec {
                ns,
                name: format!("pod-{j}"),
                app,
                labels,
                ip: format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255),
                node: if i.is_multiple_of(params.local_every) {
                    "bench"
                } else {
                    "other"
                },
            }
        })
        .collect()
}

/// Policy `k` of namespace `i`: the first is a default deny, the others
/// cycle through six shapes across namespaces.
pub(super) fn policy_spec(i: usize, k: usize, variant: usize) -> Value {
    let app = |n: usize| json!({"matchLabels": {"app": format!("app{}", n % APPS)}});
    let shape = if k == 0 { 0 } else { 1 + (i * 3 + k) % 6 };
    match shape {
        // Default deny ingress for the namespace.
        0 => json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        // Same namespace, numeric port and a named port.
        1 => json!({"podSelector": app(k), "ingress": [{
            "from": [{"podSelector": app(k + 1)}],
            "ports": [{"port": 8080 + variant as i32}, {"port": "http"}]}]}),
        // From the pods of one team, a port range.
        2 => json!({"podSelector": app(k + 2), "ingress": [{
            "from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", (i + variant) % TEAMS)}},
                      "podSelector": app(0)}],
            "ports": [{"port": 9000, "endPort": 9100 + variant as i32}]}]}),
        // Cluster-wide monitoring on a named port.
        3 => json!({"podSelector": {}, "ingress": [{
            "from": [{"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]},
                      "podSelector": {"matchLabels": {"app": "app4"}}}],
            "ports": [{"port": "metrics"}]}]}),
        // Egress: DNS in one namespace, an ipBlock with an except on 443.
        4 => json!({"podSelector": app(k), "policyTypes": ["Egress"], "egress": [
            {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-0"}}}],
             "ports": [{"port": 53, "protocol": "UDP"}]},
            {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("10.{}.0.0/16", (i + variant) % 200)]}},
                    {"ipBlock": {"cidr": "192.168.0.0/16"}}],
             "ports": [{"port": 443}]}]}),
        // Egress on a named port to the pods of prod namespaces.
        5 => json!({"podSelector": app(k + 3), "policyTypes": ["Egress"], "egress": [{
            "to": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}, "podSelector": app(k + variant)}],
            "ports": [{"port": "http"}, {"port": "grpc"}]}]}),
        // Ingress from outside the cluster through an ipBlock, and from a
        // NotIn selector.
        _ => json!({"podSelector": app(k + 4), "ingress": [
            {"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", format!("172.{}.0.0/16", 16 + variant % 16)]}}],
             "ports": [{"port": 443}]},
            {"from": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["app1", "app2"]}]}}],
             "ports": [{"protocol": "SCTP"}]}]}),
    }
}

fn policy(i: usize, k: usize, variant: usize) -> Result<NetworkPolicy> {
    Ok(serde_json::from_value(json!({
        "metadata": {"namespace": format!("ns-{i}"), "name": format!("pol-{k}")},
        "spec": policy_spec(i, k, variant),
    }))?)
}

pub(super) fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub(super) struct Totals {
    pub(super) endpoints: usize,
    pub(super) policy_entries: usize,
    pub(super) cidr_entries: usize,
    rules: usize,
}

/// Materializes every local endpoint's policy (what the writer would read)
/// and counts what it takes in the maps.
pub(super) fn totals(c: &Compiler) -> Totals {
    let mut t = Totals {
        endpoints: 0,
        policy_entries: 0,
        cidr_entries: 0,
        rules: 0,
    };
    for ep in c.endpoints() {
        if let Some(p) = c.endpoint_policy(ep) {
            let n = entry_count(&p);
            t.endpoints += 1;
            t.policy_entries += n.policy;
            t.cidr_entries += n.cidr;
            t.rules += p.rules.len();
        }
    }
    t
}

pub(super) struct Sample {
    event: Duration,
    /// Endpoints to be rewritten.
    endpoints: usize,
}

/// Applies one event. The time is the compiler's alone: the writer then
/// rewrites the endpoints it reports.
pub(super) fn timed(c: &mut Compiler, f: impl FnOnce(&mut Compiler) -> Changes) -> Sample {
    let started = Instant::now();
    let ch = f(c);
    Sample {
        event: started.elapsed(),
        endpoints: ch.endpoints.len(),
    }
}

/// Median, p99 (nearest rank) and maximum of one kind of event.
#[derive(Clone, Debug)]
pub(super) struct Dist {
    pub(super) name: String,
    pub(super) median: Duration,
    pub(super) p99: Duration,
    pub(super) max: Duration,
}

pub(super) fn summary(name: &str, samples: &mut [Sample]) -> Dist {
    samples.sort_by_key(|s| s.event);
    let n = samples.len();
    let (med, max) = (&samples[n / 2], &samples[n - 1]);
    let p99 = &samples[(n * 99).div_ceil(100).clamp(1, n) - 1];
    println!(
        "  {name:<24} median {:>9.3?}  p99 {:>9.3?}  max {:>9.3?}  | median event: {} endpoints to rewrite",
        med.event, p99.event, max.event, med.endpoints
    );
    Dist {
        name: name.to_owned(),
        median: med.event,
        p99: p99.event,
        max: max.event,
    }
}

/// A pod moved to other labels and back: two events.
pub(super) fn relabel_and_back(
    c: &mut Compiler,
    s: &PodSpec,
    labels: Value,
    out: &mut Vec<Sample>,
) -> Result<()> {
    let mut moved = PodSpec {
        ns: s.ns,
        name: s.name.clone(),
        app: s.app,
        labels,
        ip: s.ip.clone(),
        node: s.node,
    };
    let relabelled = pod(&moved)?;
    out.push(timed(c, |c| c.upsert_pod(&relabelled)));
    moved.labels = s.labels.clone();
    let back = pod(&moved)?;
    out.push(timed(c, |c| c.upsert_pod(&back)));
    Ok(())
}

pub fn run(args: &Args) -> Result<()> {
    let params = args.checked()?;
    if params.curve {
        return super::compiler_scale::curve(&super::compiler_scale::Shape {
            pods: params.pods,
            namespaces: params.namespaces,
            policies: params.policies,
            cluster_policies: params.cluster_policies,
            rounds: params.rounds,
        });
    }
    let report = measure(&params)?;
    super::compiler_scale::targets(&report);
    if params.row {
        println!("bench-row: {}", report.to_json());
    }
    Ok(())
}

fn measure(params: &Args) -> Result<Report> {
    if cfg!(debug_assertions) {
        println!(
            "warning: a debug build; measure with cargo run --release -p xtask -- bench compiler"
        );
    }
    println!(
        "synthetic cluster: {} pods, {} namespaces, {} policies, one pod in {} local",
        params.pods, params.namespaces, params.policies, params.local_every
    );
    let namespaces: Vec<Namespace> = (0..params.namespaces)
        .map(|i| namespace(i, None))
        .collect::<Result<_>>()?;
    let specs = pod_specs(params);
    let pods: Vec<Pod> = specs.iter().map(pod).collect::<Result<_>>()?;
    let policies: Vec<NetworkPolicy> = (0..params.policies)
        .map(|n| policy(n % params.namespaces, n / params.namespaces, 0))
        .collect::<Result<_>>()?;
    let hwm_inputs = vm_hwm_kib().unwrap_or(0);

    // Full compile: the initial sync (`resync`), then every endpoint's policy
    // materialized, as the writer reads it.
    let started = Instant::now();
    let mut c = Compiler::new(Locality::Node("bench".into()));
    let loaded = c.resync(Resync {
        namespaces: Some(&namespaces),
        pods: Some(&pods),
        policies: Some(&policies),
        ..Resync::default()
    });
    let load = started.elapsed();
    let started = Instant::now();
    let t = totals(&c);
    let materialize = started.elapsed();
    let stats = c.stats();
    let hwm = vm_hwm_kib().unwrap_or(0);
    println!(
        "full compile: {:.3?} (load {load:.3?} + materializing {} endpoint policies {materialize:.3?})",
        load + materialize,
        t.endpoints
    );
    println!(
        "peak memory (VmHWM): {:.1} MiB, of which {:.1} MiB were the input objects before the compiler ran",
        hwm as f64 / 1024.0,
        hwm_inputs as f64 / 1024.0
    );
    println!(
        "state: {} identities ({} local), {} interned selectors, {} policies, {} CIDR groups, {} diagnostics",
        stats.identities,
        stats.local_identities,
        stats.selectors,
        stats.policies,
        stats.cidr_groups,
        loaded.diagnostics.len()
    );
    println!(
        "entries produced: {} policy map keys, {} CIDR prefixes ({} rules; {:.1} keys per endpoint), {} ipcache entries",
        t.policy_entries,
        t.cidr_entries,
        t.rules,
        t.policy_entries as f64 / t.endpoints.max(1) as f64,
        c.ipcache().len()
    );

    println!("incremental ({} rounds of there and back):", params.rounds);
    let mut events = Vec::new();
    let mut samples = Vec::new();
    for r in 0..params.rounds {
        let s = &specs[(r * 7919) % specs.len()];
        let labels = json!({"app": format!("app{}", (s.app + 1) % APPS), "version": "canary"});
        relabel_and_back(&mut c, s, labels, &mut samples)?;
    }
    events.push(summary("pod relabel", &mut samples));

    // Monitoring pods (app4 in prod namespaces) are peers of a policy in
    // many namespaces: relabelling one touches thousands of endpoints.
    let mut samples = Vec::new();
    let monitoring: Vec<&PodSpec> = specs
        .iter()
        .filter(|s| s.app == 4 && s.ns.is_multiple_of(3))
        .collect();
    for r in 0..params.rounds {
        let s = monitoring
            .get(r % monitoring.len().max(1))
            .context("no monitoring pod")?;
        let labels = json!({"app": "app4", "version": format!("canary-{r}")});
        relabel_and_back(&mut c, s, labels, &mut samples)?;
    }
    events.push(summary("pod relabel (wide peer)", &mut samples));

    let mut samples = Vec::new();
    for r in 0..params.rounds {
        let n = (r * 104_729) % params.policies;
        let (i, k) = (n % params.namespaces, n / params.namespaces);
        let changed = policy(i, k, r + 1)?;
        samples.push(timed(&mut c, |c| c.upsert_policy(&changed)));
        let back = policy(i, k, 0)?;
        samples.push(timed(&mut c, |c| c.upsert_policy(&back)));
    }
    events.push(summary("policy change", &mut samples));

    let mut samples = Vec::new();
    for r in 0..params.rounds.min(5) {
        let i = (r * 37) % params.namespaces;
        let flipped = namespace(
            i,
            Some(("env", if i.is_multiple_of(3) { "dev" } else { "prod" })),
        )?;
        samples.push(timed(&mut c, |c| c.upsert_namespace(&flipped)));
        let back = namespace(i, None)?;
        samples.push(timed(&mut c, |c| c.upsert_namespace(&back)));
    }
    events.push(summary("namespace relabel", &mut samples));

    // The same cluster built one event per object, for comparison.
    let started = Instant::now();
    let mut by_events = Compiler::new(Locality::Node("bench".into()));
    for n in &namespaces {
        by_events.upsert_namespace(n);
    }
    for p in &policies {
        by_events.upsert_policy(p);
    }
    for p in &pods {
        by_events.upsert_pod(p);
    }
    println!(
        "the same cluster as one event per object (policies first): {:.3?}",
        started.elapsed()
    );
    drop(by_events);

    let started = Instant::now();
    let re = c.recompute_all();
    println!(
        "full recompute (fallback) on the same state: {:.3?}, {} endpoints changed (0 expected)",
        started.elapsed(),
        re.endpoints.len()
    );
    if !re.endpoints.is_empty() {
        bail!("incremental state differs from a recompute");
    }
    println!(
        "peak memory at the end: {:.1} MiB",
        vm_hwm_kib().unwrap_or(0) as f64 / 1024.0
    );
    drop(c);
    let mut report = Report {
        pods: params.pods,
        namespaces: params.namespaces,
        policies: params.policies,
        cluster_policies: params.cluster_policies,
        np: Part {
            full: load + materialize,
            peak_mib: hwm as f64 / 1024.0,
            inputs_mib: hwm_inputs as f64 / 1024.0,
            endpoints: t.endpoints,
            keys: t.policy_entries,
            shared_keys: 0,
            events,
        },
        cnp: None,
    };
    if params.cluster_policies > 0 {
        report.cnp = Some(super::compiler_cnp::run(&super::compiler_cnp::Input {
            namespaces: &namespaces,
            specs: &specs,
            pods: &pods,
            policies: &policies,
            count: params.cluster_policies,
            rounds: params.rounds,
        })?);
    }
    Ok(report)
}
