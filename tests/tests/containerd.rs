//! The real runtime drives the plugin: Debian's containerd 1.6 with its CRI
//! plugin and runc (`sluice_tests::containerd`, everything under the
//! test's directory), Sluice installed into its CNI directories as the
//! DaemonSet installs it, with the conflist shipped in deploy/sluice.yaml
//! (only its paths rewritten), and the agent in cluster mode against the
//! test API server. The test is kubelet: it creates each Pod in the API
//! server, asks containerd for the sandbox and containers through CRI
//! (`sluice_tests::cri`), and writes the pod's IPs back into its status.
//! Probes run inside the pods' containers (busybox `wget` through
//! ExecSync), or from the test inside a pod's network namespace where
//! containerd may be down (restarts).
use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use ipnetwork::IpNetwork;
use serde::Deserialize as _;
use serde_json::{Value, json};
use sluice_test_apiserver::{ServerHandle, resource_version, store::Part};
use sluice_tests::{
    ApiNode, Node,
    containerd::{self, BUSYBOX_IMAGE, Containerd, Options},
    cri::{Cri, SandboxSpec},
    eventually,
    kubeproxy::{KubeProxy, Protocol, ServicePort},
};

const NODE: &str = "node-1";
/// The node's own `loopback` CNI plugin.
const LOOPBACK: &str = "/usr/lib/cni/loopback";
const V4_RANGE: &str = "10.123.0.0/24";
const V6_RANGE: &str = "fd00:123::/64";
const WAIT: Duration = Duration::from_secs(15);
/// busybox httpd in every pod serves its hostname (the pod's name) here.
const HTTP: u16 = 8080;
/// busybox `nc -ll -e cat` in every pod echoes here.
const ECHO: u16 = 9000;
/// Every pod's container: the two servers.
const SERVERS: &[&str] = &[
    "sh",
    "-c",
    "mkdir -p /www && hostname > /www/index.html && httpd -p 8080 -h /www && exec nc -ll -p 9000 -e cat",
];

/// A node with containerd and Sluice on it, and the API server it belongs
/// to. Fields drop in order: containerd first (its sandboxes' DELs need
/// the agent), then the node (agent, namespace), then the API server.
struct World {
    cri: Cri,
    ctrd: Containerd,
    node: Node,
    api: ServerHandle,
}

/// A pod that containerd runs.
struct CriPod {
    namespace: String,
    name: String,
    uid: String,
    sandbox: String,
    container: String,
    ipv4: IpAddr,
    ipv6: IpAddr,
    /// The pod's netns as containerd names it (/var/run/netns/cni-…).
    netns: String,
}

impl World {
    /// A node with containerd and Sluice on it, the agent ready.
    fn up(opts: Options) -> Result<Self> {
        let mut w = Self::installed(opts)?;
        w.start_agent()?;
        Ok(w)
    }

    /// containerd running with the images imported and the plugin
    /// installed (the DaemonSet's init container), the agent not started.
    fn installed(opts: Options) -> Result<Self> {
        let ApiNode { mut node, api, .. } = ApiNode::new(NODE, V4_RANGE, V6_RANGE)?;
        api.create(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE},
            "spec": {"podCIDR": V4_RANGE, "podCIDRs": [V4_RANGE, V6_RANGE]}}))?;
        let ctrd = Containerd::start(&node.ns.path(), opts)?;
        for (_, archive) in containerd::build_images(&ctrd.dir.0.join("images"))? {
            ctrd.import(&archive)?;
        }
        let cri = ctrd.cri()?;
        ensure!(cri.has_image(BUSYBOX_IMAGE)?, "{BUSYBOX_IMAGE} imported");
        // containerd 1.6 (and 1.7) bring a pod's `lo` up with the CNI
        // `loopback` plugin from the same bin_dir: a node has it (kubeadm's
        // kubernetes-cni, Debian's containernetworking-plugins); Sluice's
        // install does not ship it.
        std::fs::copy(LOOPBACK, ctrd.cni_bin_dir().join("loopback"))
            .with_context(|| format!("{LOOPBACK} (Debian's containernetworking-plugins)"))?;
        // The DaemonSet's init container: the plugin binary only.
        sluice_tests::sh(
            &sluice_tests::bin_dir()
                .join("sluice-agent")
                .to_string_lossy(),
            &[
                "install-cni",
                "--cni-bin-dir",
                &ctrd.cni_bin_dir().to_string_lossy(),
            ],
        )?;
        // The agent container: the conflist (the ConfigMap's, as mounted)
        // is written by the agent into the conf dir once it is ready.
        let conflist = node.tmp.0.join("10-sluice.conflist");
        std::fs::write(&conflist, shipped_conflist(&node)?)?;
        node.agent_args.extend([
            "--cni-conf-dir".to_owned(),
            ctrd.cni_conf_dir().to_string_lossy().into_owned(),
            "--cni-conflist".to_owned(),
            conflist.to_string_lossy().into_owned(),
        ]);
        Ok(Self {
            cri,
            ctrd,
            node,
            api,
        })
    }

    /// Starts the agent and waits until containerd reports the network
    /// ready (the agent has written the conflist).
    fn start_agent(&mut self) -> Result<()> {
        self.node.start_agent()?;
        ensure!(
            eventually(WAIT, || network_ready(&self.cri)),
            "containerd reports the network ready: {:?}",
            self.cri.conditions()
        );
        Ok(())
    }

    /// What kubelet does for a pod bound to this node: the Pod in the API
    /// server, then its sandbox, one container running `command`, and the
    /// pod's IPs into its status.
    fn run_pod(&self, namespace: &str, name: &str, labels: &Value) -> Result<CriPod> {
        if self.api.get("namespaces", "", namespace).is_none() {
            self.api.create_namespace(namespace)?;
        }
        let created = self.api.create(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": BUSYBOX_IMAGE}]}
        }))?;
        let uid = created["metadata"]["uid"]
            .as_str()
            .context("the API server gives pods a uid")?
            .to_owned();
        let spec = SandboxSpec {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.clone(),
            log_directory: self.ctrd.pod_log_dir(&uid).to_string_lossy().into_owned(),
            cgroup_parent: self.ctrd.cgroup_parent.clone(),
            labels: labels
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect(),
        };
        let config = spec.config();
        let sandbox = self
            .cri
            .run_pod_sandbox(&config)
            .with_context(|| format!("RunPodSandbox {namespace}/{name}"))?;
        let container =
            self.cri
                .create_container(&sandbox, &config, "c", BUSYBOX_IMAGE, SERVERS)?;
        self.cri.start_container(&container)?;
        let status = self.cri.pod_sandbox_status(&sandbox)?;
        ensure!(status.ready, "sandbox of {name} ready");
        let v4 = status.ips.iter().copied().find(IpAddr::is_ipv4);
        let v6 = status.ips.iter().copied().find(IpAddr::is_ipv6);
        let (Some(ipv4), Some(ipv6)) = (v4, v6) else {
            bail!("{name}: containerd reports IPs {:?}", status.ips);
        };
        let netns = status.netns.context("the sandbox's netns path")?;
        // kubelet's status update.
        let mut pod = self
            .api
            .get("pods", namespace, name)
            .context("the pod, just created")?;
        pod["status"] = json!({"phase": "Running",
            "podIP": status.ips[0].to_string(),
            "podIPs": status.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>()});
        self.api.update(pod, Part::Status)?;
        let pod = CriPod {
            namespace: namespace.into(),
            name: name.into(),
            uid,
            sandbox,
            container,
            ipv4,
            ipv6,
            netns,
        };
        // The servers are up once the pod answers itself.
        if !eventually(WAIT, || self.get(&pod, pod.ipv4, HTTP).is_some()) {
            let url = format!("http://{}/", SocketAddr::new(pod.ipv4, HTTP));
            let wget = self.cri.exec_sync(
                &pod.container,
                &["timeout", "2", "wget", "-O", "-", &url],
                WAIT,
            );
            let log = std::fs::read_to_string(self.ctrd.pod_log_dir(&pod.uid).join("c/0.log"));
            bail!("{name}'s httpd does not answer: wget {wget:?}; container log {log:?}");
        }
        Ok(pod)
    }

    /// `wget http://to:port/` inside `from`'s container: the body, or None
    /// when nothing answered within 2 s.
    fn get(&self, from: &CriPod, to: IpAddr, port: u16) -> Option<String> {
        let url = format!("http://{}/", SocketAddr::new(to, port));
        let out = self
            .cri
            .exec_sync(
                &from.container,
                // Not wget's -T: Debian's busybox-static 1.35 segfaults on it.
                &["timeout", "2", "wget", "-q", "-O", "-", &url],
                Duration::from_secs(10),
            )
            .ok()?;
        (out.exit_code == 0).then(|| out.stdout.trim().to_owned())
    }

    /// Runs `kubectl` (the real one) against the API server, from the node.
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = self
            .node
            .ns
            .command("kubectl")
            .arg("--kubeconfig")
            .arg(self.node.tmp.0.join("kubeconfig"))
            .arg("--cache-dir")
            .arg(self.node.tmp.0.join("kubectl-cache"))
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The host-side veths in the node's namespace.
    fn host_veths(&self) -> Result<BTreeSet<String>> {
        Ok(self.node.ns.veths()?.into_iter().collect())
    }

    /// The addresses the plugin's IPAM holds (one file each).
    fn held_addresses(&self) -> Result<BTreeSet<IpAddr>> {
        let mut out = BTreeSet::new();
        for net in std::fs::read_dir(self.node.ipam_dir())
            .into_iter()
            .flatten()
        {
            for f in std::fs::read_dir(net?.path())? {
                if let Some(ip) = f?.file_name().to_str().and_then(|n| n.parse().ok()) {
                    out.insert(ip);
                }
            }
        }
        Ok(out)
    }

    /// The links the agent pinned for pod veths (`links/<veth>-from|to`).
    fn pinned_links(&self) -> Result<BTreeSet<String>> {
        Ok(std::fs::read_dir(self.node.bpffs.dir.join("links"))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| !n.starts_with("cgroup-"))
            .collect())
    }
}

/// CRI says the pod network is ready.
fn network_ready(cri: &Cri) -> bool {
    cri.conditions()
        .is_ok_and(|c| c.iter().any(|(t, ok, ..)| t == "NetworkReady" && *ok))
}

/// The conflist of deploy/sluice.yaml's ConfigMap, with only its paths
/// moved to the test node's (`dataDir`, `agentSocket`, `deleteQueueDir`).
fn shipped_conflist(node: &Node) -> Result<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/sluice.yaml");
    let text = std::fs::read_to_string(path)?;
    let cm = serde_yaml_ng::Deserializer::from_str(&text)
        .map(Value::deserialize)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|d| d["kind"] == "ConfigMap")
        .context("deploy/sluice.yaml has a ConfigMap")?;
    let mut conflist: Value = serde_json::from_str(
        cm["data"]["10-sluice.conflist"]
            .as_str()
            .context("the ConfigMap's 10-sluice.conflist")?,
    )?;
    let plugin = conflist["plugins"][0]
        .as_object_mut()
        .context("the conflist's plugin")?;
    ensure!(plugin.get("type") == Some(&json!("sluice")));
    for (key, test_path) in [
        ("dataDir", node.ipam_dir()),
        ("agentSocket", node.socket()),
        ("deleteQueueDir", node.delete_queue_dir()),
    ] {
        if let Some(v) = plugin.get_mut(key) {
            *v = json!(test_path);
        }
    }
    // No other path of the machine's: each is moved above or the test
    // would share it with the machine.
    let tmp = std::env::temp_dir();
    for (key, v) in plugin.iter() {
        if let Some(p) = v.as_str().filter(|p| p.starts_with('/')) {
            ensure!(
                Path::new(p).starts_with(&tmp),
                "{key}: {p} is not moved to the test's"
            );
        }
    }
    Ok(serde_json::to_string_pretty(&conflist)?)
}

fn in_range(ip: IpAddr, range: &str) -> Result<bool> {
    Ok(range.parse::<IpNetwork>()?.contains(ip))
}

/// Runs `f` on a thread inside the network namespace at `path`.
fn in_netns<T: Send + 'static>(path: PathBuf, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    std::thread::spawn(move || -> Result<T> {
        sluice_tests::enter(&path)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in a pod's netns panicked"))?
}

/// An HTTP GET over a new TCP connection answered with 200, within `timeout`.
fn http_ok(to: SocketAddr, timeout: Duration) -> bool {
    TcpStream::connect_timeout(&to, timeout).is_ok_and(|s| answers_200(s, timeout))
}

/// Sends a GET on `s`; was it answered 200 within `timeout`?
fn answers_200(mut s: TcpStream, timeout: Duration) -> bool {
    let _ignored = s.set_read_timeout(Some(timeout));
    let mut answer = String::new();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_ok()
        && s.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

/// Waits for a drop event the agent printed that has every field of `want`.
fn assert_drop_event(node: &Node, want: &Value) {
    let matches = |e: &Value| {
        want.as_object()
            .is_some_and(|w| w.iter().all(|(k, v)| e.get(k) == Some(v)))
    };
    assert!(
        eventually(WAIT, || !node.events_matching(matches).is_empty()),
        "a drop event with {want}; saw {:?}",
        node.events_matching(|_| true)
    );
}

#[test]
fn containerd_gives_pods_addresses_from_the_nodes_pod_cidrs_and_they_reach_pods_and_services()
-> Result<()> {
    let mut w = World::installed(Options::default())?;
    // No agent yet, so no conflist: containerd reports the network not
    // ready and runs no pod (kubelet would not even try).
    assert!(!network_ready(&w.cri), "{:?}", w.cri.conditions());
    let early = w.run_pod("x", "early", &json!({}));
    let err = format!("{:#}", early.err().context("a pod before the agent")?);
    assert!(err.contains("cni"), "{err}");
    // Sluice was never called: no veth, no address held. (containerd 1.6
    // keeps the netns it made for the sandbox when tearing down a network
    // it never set up fails; kubelet does not get here, it waits for
    // NetworkReady.)
    assert!(w.host_veths()?.is_empty(), "no veth");
    assert!(w.held_addresses()?.is_empty(), "no address held");
    w.start_agent()?;
    let a = w.run_pod("x", "a", &json!({"app": "a"}))?;
    let b = w.run_pod("x", "b", &json!({"app": "b"}))?;
    for p in [&a, &b] {
        assert!(in_range(p.ipv4, V4_RANGE)?, "{} has {}", p.name, p.ipv4);
        assert!(in_range(p.ipv6, V6_RANGE)?, "{} has {}", p.name, p.ipv6);
        // What containerd reports is what the pod has.
        let addrs = w
            .cri
            .exec_sync(
                &p.container,
                &["ip", "-o", "addr", "show", "dev", "eth0"],
                WAIT,
            )?
            .stdout;
        for ip in [p.ipv4, p.ipv6] {
            assert!(addrs.contains(&format!(" {ip}/")), "{ip} on eth0: {addrs}");
        }
        assert!(p.netns.starts_with("/var/run/netns/cni-"), "{}", p.netns);
    }
    assert_ne!(a.ipv4, b.ipv4);
    // Pod to pod, both families, both ways.
    for (from, to) in [(&a, &b), (&b, &a)] {
        for ip in [to.ipv4, to.ipv6] {
            assert_eq!(
                w.get(from, ip, HTTP).as_deref(),
                Some(to.name.as_str()),
                "{} -> {} at {ip}",
                from.name,
                to.name
            );
        }
    }

    // Pod to Service: a ClusterIP for b, kube-proxy's DNAT on the node.
    let svc = w.api.create(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web-b", "namespace": "x"},
        "spec": {"selector": {"app": "b"},
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": HTTP}]}}))?;
    let cluster_ip: IpAddr = svc["spec"]["clusterIP"]
        .as_str()
        .context("a ClusterIP")?
        .parse()?;
    w.node
        .wait_programmed("Service/x/web-b", Some(&resource_version(&svc)), WAIT)?;
    let _kp = KubeProxy::apply(
        &w.node.ns,
        &[ServicePort::new(
            "x/web-b",
            cluster_ip,
            Protocol::Tcp,
            80,
            &[(b.ipv4, HTTP)],
        )],
    )?;
    assert_eq!(
        w.get(&a, cluster_ip, 80).as_deref(),
        Some("b"),
        "a -> web-b ({cluster_ip}:80)"
    );
    Ok(())
}

#[test]
fn a_networkpolicy_applied_with_kubectl_is_enforced_between_containerd_pods_and_drops_name_them()
-> Result<()> {
    let w = World::up(Options::default())?;
    let web = w.run_pod("shop", "web", &json!({"app": "web"}))?;
    let client = w.run_pod("shop", "client", &json!({"role": "client"}))?;
    let intruder = w.run_pod("shop", "intruder", &json!({"role": "intruder"}))?;
    assert_eq!(w.get(&intruder, web.ipv4, HTTP).as_deref(), Some("web"));

    let file = w.node.tmp.0.join("policy.yaml");
    std::fs::write(
        &file,
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-from-clients
  namespace: shop
spec:
  podSelector:
    matchLabels: {app: web}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels: {role: client}
    ports:
    - {protocol: TCP, port: 8080}
",
    )?;
    let said = w.kubectl(&["apply", "-f", &file.to_string_lossy()])?;
    assert!(said.contains("created"), "{said}");
    let rv = resource_version(
        &w.api
            .get("networkpolicies", "shop", "web-from-clients")
            .context("the applied policy")?,
    );
    w.node
        .wait_programmed("NetworkPolicy/shop/web-from-clients", Some(&rv), WAIT)?;

    for ip in [web.ipv4, web.ipv6] {
        assert_eq!(w.get(&client, ip, HTTP).as_deref(), Some("web"), "{ip}");
        assert_eq!(w.get(&intruder, ip, HTTP), None, "intruder -> {ip}");
    }
    assert_drop_event(
        &w.node,
        &json!({"direction": "ingress", "reason": "policy-denied",
                "src": intruder.ipv4.to_string(), "dst": web.ipv4.to_string(),
                "dst_port": HTTP, "protocol": "TCP",
                "src_namespace": "shop", "src_pod": "intruder", "dst_pod": "web"}),
    );
    // Egress is not isolated: web still reaches the intruder.
    assert_eq!(
        w.get(&web, intruder.ipv4, HTTP).as_deref(),
        Some("intruder")
    );

    // kubectl delete: open again.
    w.kubectl(&["delete", "-f", &file.to_string_lossy()])?;
    w.node
        .wait_programmed("NetworkPolicy/shop/web-from-clients", None, WAIT)?;
    assert_eq!(w.get(&intruder, web.ipv4, HTTP).as_deref(), Some("web"));
    Ok(())
}

/// One exec of the plugin that strace saw: its CNI_* environment.
#[derive(Debug)]
struct CniCall {
    command: String,
    container_id: String,
    netns: String,
    ifname: String,
    args: String,
    path: String,
}

/// The plugin's execs in containerd's exec trace (`strace -v` lines of
/// `execve("<bin>/sluice", [...], [env...])`).
fn cni_calls(trace: &str, plugin: &Path) -> Vec<CniCall> {
    let prefix = format!("execve(\"{}\"", plugin.display());
    trace
        .lines()
        .filter(|l| l.contains(&prefix) && !l.contains("= -1 "))
        .map(|l| {
            let env = strace_strings(l.rsplit_once("], [").map_or("", |(_, e)| e));
            let var = |k: &str| {
                env.iter()
                    .find_map(|e| e.strip_prefix(&format!("{k}=")))
                    .unwrap_or_default()
                    .to_owned()
            };
            CniCall {
                command: var("CNI_COMMAND"),
                container_id: var("CNI_CONTAINERID"),
                netns: var("CNI_NETNS"),
                ifname: var("CNI_IFNAME"),
                args: var("CNI_ARGS"),
                path: var("CNI_PATH"),
            }
        })
        .collect()
}

/// The C string literals at the start of `s` (`"a", "b\"c"]...`).
fn strace_strings(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let mut cur = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => cur.extend(chars.next()),
                        '"' => break,
                        c => cur.push(c),
                    }
                }
                out.push(cur);
            }
            ']' => break,
            _ => {}
        }
    }
    out
}

#[test]
fn stop_then_remove_sandbox_runs_del_twice_the_second_without_netns_and_leaves_nothing()
-> Result<()> {
    let w = World::up(Options { trace_execs: true })?;
    let veths_before = w.host_veths()?;
    let links_before = w.pinned_links()?;
    let pod = w.run_pod("x", "a", &json!({"app": "a"}))?;

    // What a pod holds while it runs.
    let veths: BTreeSet<String> = w.host_veths()?.difference(&veths_before).cloned().collect();
    assert_eq!(veths.len(), 1, "one host veth: {veths:?}");
    let veth = veths.first().context("the pod's veth")?.clone();
    let netns_name = pod.netns.rsplit('/').next().unwrap_or_default().to_owned();
    assert_eq!(w.ctrd.netns_names()?, [netns_name]);
    assert_eq!(w.held_addresses()?, [pod.ipv4, pod.ipv6].into());
    let maps = w.node.maps()?;
    assert_eq!(maps.endpoint_records().len(), 1);
    assert!(maps.ipcache_get(pod.ipv4).is_some() && maps.ipcache_get(pod.ipv6).is_some());
    let links: BTreeSet<String> = w
        .pinned_links()?
        .difference(&links_before)
        .cloned()
        .collect();
    assert!(
        !links.is_empty() && links.iter().all(|l| l.starts_with(&veth)),
        "links of {veth}: {links:?}"
    );
    let cache = w.ctrd.cni_cache_dir().join("results");
    let cached = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("sluice-"))
            .collect()
    };
    assert_eq!(
        cached(&cache),
        [format!("sluice-{}-eth0", pod.sandbox)],
        "libcni's cache"
    );
    // What libcni kept of the ADD: the result in the conflist's version
    // (1.0.0: containerd 1.6 cannot parse 1.1.0), and the capability
    // arguments containerd had, none of which reaches the plugin: the
    // conflist declares no capabilities, so no `runtimeConfig` is sent.
    let entry: Value = serde_json::from_slice(&std::fs::read(
        cache.join(format!("sluice-{}-eth0", pod.sandbox)),
    )?)?;
    assert_eq!(entry["result"]["cniVersion"], "1.0.0", "{entry}");
    let capability_args: Vec<&String> = entry["capabilityArgs"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.keys())
        .collect();
    assert_eq!(
        capability_args,
        ["io.kubernetes.cri.pod-annotations"],
        "{entry}"
    );
    assert!(
        !w.ctrd.log().contains("sluice: ignoring"),
        "the plugin was sent nothing to ignore"
    );

    // StopPodSandbox: the first DEL, with the netns; everything goes (the
    // veth after DEL's answer: the agent deletes it, or the netns's
    // removal does). The addresses stay held until then, and the next
    // plugin run releases them.
    let stop = Instant::now();
    w.cri.stop_pod_sandbox(&pod.sandbox)?;
    let stop_took = stop.elapsed();
    assert!(!w.cri.pod_sandbox_status(&pod.sandbox)?.ready);
    assert!(
        eventually(WAIT, || w.host_veths().is_ok_and(|v| v == veths_before)),
        "veth removed"
    );
    assert!(w.ctrd.netns_names()?.is_empty(), "netns removed");
    let maps = w.node.maps()?;
    assert!(maps.endpoint_records().is_empty(), "endpoint entry removed");
    assert!(maps.ipcache_get(pod.ipv4).is_none() && maps.ipcache_get(pod.ipv6).is_none());
    assert_eq!(maps.policy_len(), 0, "no policy entries");
    assert_eq!(w.pinned_links()?, links_before, "links unpinned");

    // RemovePodSandbox: the second DEL.
    w.cri.remove_pod_sandbox(&pod.sandbox)?;
    assert!(w.cri.list_pod_sandboxes()?.is_empty());
    assert!(cached(&cache).is_empty(), "libcni's cache entry removed");
    assert_eq!(w.host_veths()?, veths_before);
    assert!(w.held_addresses()?.is_empty());

    // What containerd called, in order: ADD at RunPodSandbox, DEL at
    // StopPodSandbox (netns still there), DEL at RemovePodSandbox (no
    // netns: it went with the stop). No CHECK, STATUS or GC: containerd
    // 1.6 never calls them.
    let plugin = w.ctrd.cni_bin_dir().join("sluice");
    let calls = cni_calls(&w.ctrd.exec_trace(), &plugin);
    let verbs: Vec<&str> = calls.iter().map(|c| c.command.as_str()).collect();
    assert_eq!(verbs, ["ADD", "DEL", "DEL"], "{calls:#?}");
    assert_eq!(calls[0].netns, pod.netns);
    assert_eq!(calls[1].netns, pod.netns);
    assert_eq!(calls[2].netns, "", "the second DEL has no netns");
    for c in &calls {
        assert_eq!(c.container_id, pod.sandbox);
        assert_eq!(c.ifname, "eth0");
        assert_eq!(c.path, w.ctrd.cni_bin_dir().to_string_lossy());
        // CNI_ARGS as kubelet's runtime passes them: the plugin reads the
        // pod's namespace and name and ignores the rest.
        let args: BTreeSet<&str> = c.args.split(';').collect();
        let want: BTreeSet<String> = [
            "IgnoreUnknown=1".to_owned(),
            format!("K8S_POD_NAMESPACE={}", pod.namespace),
            format!("K8S_POD_NAME={}", pod.name),
            format!("K8S_POD_INFRA_CONTAINER_ID={}", pod.sandbox),
            format!("K8S_POD_UID={}", pod.uid),
        ]
        .into();
        assert_eq!(
            args,
            want.iter().map(String::as_str).collect(),
            "{}",
            c.args
        );
    }
    eprintln!("StopPodSandbox took {stop_took:?}");
    Ok(())
}

/// An allowed connection, judged so that a loaded machine cannot fail it
/// and a dropped packet can: the answer may take seconds (the web server
/// is a process that may wait for a CPU), but the SYN must not have been
/// retransmitted, i.e. the data path passed the first one (the SYN-ACK
/// comes from the kernel's softirq, not from the server process, so a
/// retransmission at the 1 s SYN timeout means a drop, not a busy CPU).
fn http_allowed_at_once(to: SocketAddr) -> bool {
    let timeout = Duration::from_secs(5);
    TcpStream::connect_timeout(&to, timeout)
        .is_ok_and(|s| syn_retransmits(&s) == Some(0) && answers_200(s, timeout))
}

/// Segments the socket retransmitted so far (`tcpi_total_retrans`); right
/// after connect, its SYNs.
fn syn_retransmits(s: &TcpStream) -> Option<u32> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket, a buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info.tcpi_total_retrans)
}

/// Probes that run while containerd or the agent restarts: from inside
/// the pods' namespaces (ExecSync needs containerd), a long-lived allowed
/// connection echoing every 50 ms, new allowed connections and new denied
/// ones. Each counts what went against its expected verdict.
struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    wrong: Arc<[AtomicU32; 3]>,
    rounds: Arc<AtomicU32>,
}

const LONG_LIVED: usize = 0;
const NEW_ALLOWED: usize = 1;
const NEW_DENIED: usize = 2;

impl Traffic {
    fn start(ctrd: &Containerd, client: &CriPod, intruder: &CriPod, to: IpAddr) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let wrong: Arc<[AtomicU32; 3]> = Arc::new(Default::default());
        let rounds = Arc::new(AtomicU32::new(0));
        let mut threads = Vec::new();
        let echo = SocketAddr::new(to, ECHO);
        let http = SocketAddr::new(to, HTTP);
        // The long-lived connection, opened before the first restart.
        let conn = in_netns(ctrd.seen_by_daemon(&client.netns), move || {
            TcpStream::connect_timeout(&echo, Duration::from_secs(2))
        })??;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let (s, bad) = (stop.clone(), wrong.clone());
        threads.push(std::thread::spawn(move || {
            let mut conn = conn;
            let mut b = [0u8; 1];
            while !s.load(Ordering::Relaxed) {
                if conn.write_all(b"y").is_err() || conn.read_exact(&mut b).is_err() {
                    bad[LONG_LIVED].fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }));
        for (pod, want, slot) in [(client, true, NEW_ALLOWED), (intruder, false, NEW_DENIED)] {
            let (s, bad, n) = (stop.clone(), wrong.clone(), rounds.clone());
            let path = ctrd.seen_by_daemon(&pod.netns);
            threads.push(std::thread::spawn(move || {
                if sluice_tests::enter(&path).is_err() {
                    bad[slot].fetch_add(1, Ordering::Relaxed);
                    return;
                }
                while !s.load(Ordering::Relaxed) {
                    let wrong = if want {
                        !http_allowed_at_once(http)
                    } else {
                        http_ok(http, Duration::from_millis(300))
                    };
                    if wrong {
                        bad[slot].fetch_add(1, Ordering::Relaxed);
                    }
                    n.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(50));
                }
            }));
        }
        Ok(Self {
            stop,
            threads,
            wrong,
            rounds,
        })
    }

    /// Stops the probes: (wrong verdicts per probe, probe rounds).
    fn finish(mut self) -> ([u32; 3], u32) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ignored = t.join();
        }
        (
            [0, 1, 2].map(|i| self.wrong[i].load(Ordering::Relaxed)),
            self.rounds.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn restarting_containerd_and_the_agent_under_traffic_changes_no_verdict() -> Result<()> {
    let mut w = World::up(Options::default())?;
    let web = w.run_pod("shop", "web", &json!({"app": "web"}))?;
    let client = w.run_pod("shop", "client", &json!({"role": "client"}))?;
    let intruder = w.run_pod("shop", "intruder", &json!({"role": "intruder"}))?;
    let policy = w.api.create(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "web-from-clients", "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]}}),
    )?;
    w.node.wait_programmed(
        "NetworkPolicy/shop/web-from-clients",
        Some(&resource_version(&policy)),
        WAIT,
    )?;
    // The identity each address holds: a restarted agent that numbered
    // them afresh (in its list's order, not the pods' creation order)
    // would leave a gap while it rewrites them (a new connection dropped).
    let numbers = |w: &World| -> Result<Vec<Option<u32>>> {
        let maps = w.node.maps()?;
        Ok([&web, &client, &intruder]
            .iter()
            .flat_map(|p| [p.ipv4, p.ipv6])
            .map(|ip| maps.ipcache_get(ip).map(|v| v.identity))
            .collect())
    };
    let before = numbers(&w)?;
    assert!(before.iter().all(Option::is_some), "{before:?}");
    let traffic = Traffic::start(&w.ctrd, &client, &intruder, web.ipv4)?;
    let settle = || std::thread::sleep(Duration::from_millis(700));
    settle();

    w.ctrd.restart()?;
    w.cri = w.ctrd.cri()?;
    settle();
    // containerd found its sandboxes again, as they were.
    for p in [&web, &client, &intruder] {
        let s = w.cri.pod_sandbox_status(&p.sandbox)?;
        assert!(s.ready, "{} ready after the restart", p.name);
        assert_eq!(s.ips, [p.ipv4, p.ipv6], "{}'s IPs", p.name);
    }

    w.node.kill_agent()?;
    settle();
    w.node.start_agent()?;
    w.node.wait_programmed(
        "NetworkPolicy/shop/web-from-clients",
        Some(&resource_version(&policy)),
        WAIT,
    )?;
    settle();
    assert_eq!(
        numbers(&w)?,
        before,
        "identity numbers after the agent's restart"
    );
    // Both at once: containerd restarts while the agent is down.
    w.node.kill_agent()?;
    w.ctrd.restart()?;
    w.cri = w.ctrd.cri()?;
    w.node.start_agent()?;
    settle();
    let (wrong, rounds) = traffic.finish();
    assert!(rounds > 20, "{rounds} probe rounds");
    assert_eq!(
        wrong,
        [0, 0, 0],
        "wrong verdicts: long-lived allowed, new allowed, new denied ({rounds} rounds)"
    );
    // And through the containers, as before the restarts.
    assert_eq!(w.get(&client, web.ipv4, HTTP).as_deref(), Some("web"));
    assert_eq!(w.get(&intruder, web.ipv4, HTTP), None);
    Ok(())
}

#[test]
fn with_the_agent_down_containerd_removes_a_pod_and_the_agent_finishes_the_removal_when_back()
-> Result<()> {
    let mut w = World::up(Options::default())?;
    let veths_before = w.host_veths()?;
    let a = w.run_pod("x", "a", &json!({"app": "a"}))?;
    w.node.kill_agent()?;
    // Both DELs succeed without the agent (containerd would otherwise
    // keep the sandbox as SANDBOX_UNKNOWN, and its netns, until the agent
    // is back).
    w.cri.stop_pod_sandbox(&a.sandbox)?;
    w.cri.remove_pod_sandbox(&a.sandbox)?;
    assert!(w.cri.list_pod_sandboxes()?.is_empty());
    assert_eq!(w.host_veths()?, veths_before, "the veth goes at once");
    assert!(w.ctrd.netns_names()?.is_empty(), "the netns goes");
    // The addresses stay held until the agent has forgotten the endpoint.
    assert_eq!(w.held_addresses()?, [a.ipv4, a.ipv6].into());
    // A pod cannot start meanwhile, and its failure leaves nothing.
    let b = w.run_pod("x", "b", &json!({"app": "b"}));
    let err = format!("{:#}", b.err().context("ADD without the agent")?);
    assert!(err.contains("sluice"), "{err}");
    assert!(w.cri.list_pod_sandboxes()?.is_empty());
    assert_eq!(w.host_veths()?, veths_before);
    assert!(w.ctrd.netns_names()?.is_empty());
    assert_eq!(w.held_addresses()?, [a.ipv4, a.ipv6].into());

    // Back: the agent drains the queue (a's endpoint forgotten), and the
    // next ADD releases a's addresses. (a's Pod object stays in the API
    // server until kubelet deletes it, and with it a's IPCACHE entry: that
    // is the cluster's view, not the node's endpoint.)
    w.start_agent()?;
    assert!(
        eventually(WAIT, || w
            .node
            .maps()
            .is_ok_and(|m| m.endpoint_records().is_empty())),
        "a's endpoint forgotten"
    );
    w.api.delete("pods", "x", "a")?;
    assert!(
        eventually(WAIT, || w
            .node
            .maps()
            .is_ok_and(|m| m.ipcache_get(a.ipv4).is_none())),
        "a's address leaves the ipcache with its Pod"
    );
    let c = w.run_pod("x", "c", &json!({"app": "c"}))?;
    assert_eq!(w.held_addresses()?, [c.ipv4, c.ipv6].into());
    assert_eq!(w.node.maps()?.endpoint_records().len(), 1);
    Ok(())
}
