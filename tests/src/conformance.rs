//! The conformance runner: reachability cases (shared/conformance/FORMAT.md)
//! against a real cluster on this machine — the test API server, one or two
//! nodes (network namespaces) each running the real agent in cluster mode,
//! the nine model pods wired by the real plugin and serving TCP and UDP on
//! 80 and 81, and per-pod ClusterIP Services DNATed by kube-proxy-shaped
//! nftables rules. Everything goes through the API server, as the upstream
//! e2e suite does; before probing, the runner waits until every agent
//! reports the objects it changed programmed (no sleeps).
//!
//! Beyond shared/conformance/FORMAT.md the runner knows what
//! `docs/conformance.md` documents: the `cnp` model (network-policy-api's
//! conformance cluster, with host-network pods and labelled Nodes),
//! ClusterNetworkPolicies, `probe` steps (single pairs by pod address) and
//! `subtest` steps (each named part of a case reported on its own line).
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use sluice_test_apiserver::{Config, Server as ApiServer, ServerHandle, resources, store::Part};

use crate::{
    NetNs, Node, Pod, Server,
    cases::{self, Family, Matrix, Protocol},
    conflist_config, tcp_ok, udp_ok,
};

/// Which probes a variant makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProbeTarget {
    Pod,
    Service,
}

/// How two nodes are joined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Topology {
    /// One link between them (one L2 segment): direct routes.
    #[default]
    Link,
    /// Each in its own subnet (10.253.1.0/24, 10.253.2.0/24 and
    /// fd00:253:1::/64, fd00:253:2::/64) behind a router namespace that
    /// forwards between them; the agents run with `--tunnel auto` and so
    /// reach each other through VXLAN.
    Routed,
}

/// The pod MTU on the routed topology: the 1500 of its veths less VXLAN's
/// 50 bytes over IPv4 (docs/design.md, "Nodes on different subnets").
pub const ROUTED_POD_MTU: u32 = 1450;

#[derive(Clone, Debug)]
pub struct Options {
    pub case_dirs: Vec<PathBuf>,
    pub families: Vec<Family>,
    pub targets: Vec<ProbeTarget>,
    pub nodes: usize,
    pub topology: Topology,
    pub filter: Option<String>,
    pub json: Option<PathBuf>,
    /// Retry a mismatching matrix for a while, as upstream does.
    pub eventual: bool,
    /// How long a blocked probe waits.
    pub probe_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            // The repo's cases: the 48 upstream ones, Sluice's own and the
            // ported network-policy-api suite (its own model and cluster).
            case_dirs: [
                "conformance/upstream",
                "conformance/sluice",
                "conformance/cnp",
            ]
            .iter()
            .map(|d| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(d))
            .collect(),
            families: vec![Family::Ipv4, Family::Ipv6],
            targets: vec![ProbeTarget::Pod, ProbeTarget::Service],
            nodes: 1,
            topology: Topology::Link,
            filter: None,
            json: None,
            eventual: false,
            probe_timeout: Duration::from_millis(500),
        }
    }
}

const PORTS: [u16; 2] = [80, 81];
const WAIT: Duration = Duration::from_secs(20);

fn res(plural: &str) -> Result<&'static resources::Resource> {
    resources::by_plural(plural).with_context(|| format!("resource {plural}"))
}

fn plural(kind: cases::Kind) -> &'static str {
    match kind {
        cases::Kind::Namespace => "namespaces",
        cases::Kind::Pod => "pods",
        cases::Kind::NetworkPolicy => "networkpolicies",
        cases::Kind::ClusterNetworkPolicy => "clusternetworkpolicies",
    }
}

fn kind_name(kind: cases::Kind) -> &'static str {
    match kind {
        cases::Kind::Namespace => "Namespace",
        cases::Kind::Pod => "Pod",
        cases::Kind::NetworkPolicy => "NetworkPolicy",
        cases::Kind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
    }
}

/// The key the agents report in `Programmed`.
fn programmed_key(k: &cases::ObjectKey) -> String {
    if k.namespace.is_empty() {
        format!("{}/{}", kind_name(k.kind), k.name)
    } else {
        format!("{}/{}/{}", kind_name(k.kind), k.namespace, k.name)
    }
}

fn rv_of(v: &Value) -> String {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// How a model pod is on the network.
enum Endpoint {
    /// Its own network namespace, wired by the plugin.
    Wired(Pod),
    /// `hostNetwork: true`: the node's namespace and addresses.
    Host,
}

/// One pod as placed on a node.
struct ModelPod {
    ep: Endpoint,
    node: usize,
    _servers: Vec<Server>,
}

/// The running cluster.
pub struct Cluster {
    nodes: Vec<Node>,
    topology: Topology,
    /// The router namespace of the routed topology.
    _router: Option<NetNs>,
    api: ServerHandle,
    /// Each node's plugin config.
    configs: Vec<String>,
    pods: BTreeMap<String, ModelPod>,
    /// ns/pod -> ClusterIPs of its Service.
    services: BTreeMap<String, Vec<IpAddr>>,
    /// The model's objects as applied at the start of every case.
    model: Vec<cases::Object>,
    /// Pods created so far (spreads pods over nodes, numbers Service IPs).
    created: usize,
    /// Whether pods get ClusterIP Services (the default model's do).
    with_services: bool,
    /// Servers of host-network pods, one per (node, port): two such pods
    /// on one node share its addresses.
    host_servers: BTreeMap<(usize, u16), Server>,
    pub sctp: bool,
    kube_proxy: Vec<crate::kubeproxy::KubeProxy>,
}

fn node_name(i: usize) -> String {
    format!("node-{}", i + 1)
}

fn node_ranges(i: usize) -> (String, String) {
    (
        format!("10.244.{}.0/24", i + 1),
        format!("fd00:244:{}::/64", i + 1),
    )
}

/// Pod `index`'s Service ClusterIPs are chosen here (the API server honours
/// a requested clusterIP), one IPv4 and one IPv6 per pod.
fn service_ips(index: usize) -> [IpAddr; 2] {
    let (hi, lo) = ((index / 200) as u8, (10 + index % 200) as u8);
    [
        IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 1 + hi, lo)),
        IpAddr::V6(std::net::Ipv6Addr::new(
            0xfd00,
            0x96,
            0,
            0,
            0,
            0,
            1 + u16::from(hi),
            u16::from(lo),
        )),
    ]
}

/// Node `i`'s address of each family: on the shared link, or in its own
/// subnet behind the router (whose address there ends in 1).
/// A veth pair with one end in namespace `a` and the other in `b`, both
/// named `prefix` and a unique suffix; returns their names.
fn veth_between(a: &str, b: &str, prefix: &str) -> Result<(String, String)> {
    let (x, y) = (crate::unique(prefix), crate::unique(prefix));
    crate::sh(
        "ip",
        &[
            "link", "add", &x, "netns", a, "type", "veth", "peer", "name", &y, "netns", b,
        ],
    )?;
    Ok((x, y))
}

fn link_ips(top: Topology, i: usize) -> (String, String) {
    match top {
        Topology::Link => (
            format!("10.255.0.{}", i + 1),
            format!("fd00:255:0::{}", i + 1),
        ),
        Topology::Routed => (
            format!("10.253.{}.2", i + 1),
            format!("fd00:253:{}::2", i + 1),
        ),
    }
}

/// A node's addresses (the Node object's InternalIPs; host-network pods
/// have them).
fn node_ips(top: Topology, i: usize) -> [IpAddr; 2] {
    let (v4, v6) = link_ips(top, i);
    [
        v4.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        v6.parse()
            .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
    ]
}

/// The distinct port numbers of a pod's containers: what its servers
/// listen on (TCP and UDP each).
fn container_ports(p: &k8s_openapi::api::core::v1::Pod) -> std::collections::BTreeSet<u16> {
    p.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|cp| u16::try_from(cp.container_port).ok())
        .collect()
}

fn is_host_network(p: &k8s_openapi::api::core::v1::Pod) -> bool {
    p.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

impl Cluster {
    /// A cluster of the default model's shape (ClusterIP Services per pod).
    pub fn start(nodes: usize, model_yaml: &str) -> Result<Self> {
        Self::start_model(nodes, model_yaml, true)
    }

    /// A cluster of `model_yaml`'s namespaces and pods; `with_services`
    /// gives every pod its ClusterIP Service `s-<ns>-<pod>`.
    pub fn start_model(nodes: usize, model_yaml: &str, with_services: bool) -> Result<Self> {
        Self::start_topology(nodes, Topology::Link, model_yaml, with_services)
    }

    /// As `start_model`, the two nodes joined as `topology` says.
    pub fn start_topology(
        nodes: usize,
        topology: Topology,
        model_yaml: &str,
        with_services: bool,
    ) -> Result<Self> {
        if !(1..=2).contains(&nodes) {
            bail!("--nodes must be 1 or 2");
        }
        if topology == Topology::Routed && nodes != 2 {
            bail!("--topology routed needs --nodes 2");
        }
        let link_ips = |i| link_ips(topology, i);
        let mut ns: Vec<Node> = (0..nodes).map(|_| Node::new()).collect::<Result<_>>()?;
        let mut router = None;
        // Two nodes: a link between their namespaces, 10.255.0.0/24 and
        // fd00:255:0::/64; the agents route pod CIDRs over it from the Node
        // objects. It goes away with the namespaces. Routed: each node's
        // link goes to the router instead.
        if topology == Topology::Routed {
            let r = NetNs::new("slrt")?;
            routed::wire_routed(&r, &ns)?;
            for n in &mut ns {
                n.agent_args = vec!["--tunnel".into(), "auto".into()];
            }
            router = Some(r);
        } else if nodes == 2 {
            let (a, b) = veth_between(&ns[0].ns.name, &ns[1].ns.name, "slk")?;
            for (i, dev) in [(0, &a), (1, &b)] {
                let (v4, v6) = link_ips(i);
                ns[i]
                    .ns
                    .ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
                ns[i]
                    .ns
                    .ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
                ns[i].ns.ip(&["link", "set", dev, "up"])?;
            }
        } else {
            // One node: its Node addresses still exist (host-network pods
            // serve on them, egress `nodes` peers match them), as host
            // addresses on the loopback of the node's namespace (this
            // kernel may have no dummy devices).
            let (v4, v6) = link_ips(0);
            let n = &ns[0].ns;
            n.ip(&["link", "set", "lo", "up"])?;
            n.ip(&["addr", "add", &format!("{v4}/32"), "dev", "lo"])?;
            n.ip(&["addr", "add", &format!("{v6}/128"), "dev", "lo", "nodad"])?;
        }
        let listen: std::net::SocketAddr = if nodes == 2 {
            format!("{}:0", link_ips(0).0).parse()?
        } else {
            "127.0.0.1:0".parse()?
        };
        let api = ns[0].ns.run(move || {
            ApiServer::start_with(Config {
                listen,
                allow_non_loopback: true,
                ..Config::default()
            })
        })??;
        for i in 0..nodes {
            let (v4, v6) = node_ranges(i);
            let r = res("nodes")?;
            api.with_store(|s| {
                s.create(
                    r,
                    None,
                    json!({"apiVersion": "v1", "kind": "Node",
                    // The well-known labels kubelet sets (egress `nodes`
                    // peers select them).
                    "metadata": {"name": node_name(i), "labels": {
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": std::env::consts::ARCH,
                        "kubernetes.io/hostname": node_name(i)}},
                    "spec": {"podCIDR": v4, "podCIDRs": [v4, v6]},
                    "status": {"addresses": [
                        {"type": "InternalIP", "address": link_ips(i).0},
                        {"type": "InternalIP", "address": link_ips(i).1}]}}),
                )
            })
            .map_err(|e| anyhow::anyhow!("create node: {e:?}"))?;
        }
        let mut configs = Vec::new();
        for (i, node) in ns.iter_mut().enumerate() {
            // Quiet unless asked: the runner prints its own lines.
            if std::env::var_os("SLUICE_AGENT_LOG").is_none() {
                node.agent_log = "warn".into();
            }
            let extra = std::mem::take(&mut node.agent_args);
            node.use_api(&api, &node_name(i))?;
            node.agent_args.extend(extra);
            node.start_agent()?;
            let (v4, v6) = node_ranges(i);
            let mut conf: Value =
                serde_json::from_str(&conflist_config(node, Some(&v4), Some(&v6)))?;
            if topology == Topology::Routed {
                conf["mtu"] = json!(ROUTED_POD_MTU);
            }
            configs.push(conf.to_string());
        }
        let model = cases::parse_objects(model_yaml).context("model")?;
        let mut cluster = Self {
            nodes: ns,
            topology,
            _router: router,
            api,
            configs,
            pods: BTreeMap::new(),
            services: BTreeMap::new(),
            model: model.clone(),
            created: 0,
            with_services,
            host_servers: BTreeMap::new(),
            sctp: sctp_available(),
            kube_proxy: Vec::new(),
        };
        for o in &model {
            match o {
                cases::Object::Namespace(_) => {
                    cluster.create(o)?;
                }
                cases::Object::Pod(p) => {
                    cluster.add_pod(p)?;
                }
                cases::Object::NetworkPolicy(_) | cases::Object::ClusterNetworkPolicy(_) => {
                    bail!("the model has no policies")
                }
            }
        }
        cluster.program_services()?;
        cluster.wait_all_programmed()?;
        Ok(cluster)
    }

    fn create(&self, o: &cases::Object) -> Result<Value> {
        let key = o.key();
        let r = res(plural(key.kind))?;
        let ns = (!key.namespace.is_empty()).then_some(key.namespace.as_str());
        let v = serde_json::to_value(object_value(o))?;
        self.api
            .with_store(|s| s.create(r, ns, v))
            .map_err(|e| anyhow::anyhow!("create {:?} {}: {e:?}", key.kind, key.name))
    }

    /// A new pod: created in the API on the next node in turn, wired by the
    /// plugin there (a host-network pod is not: it is the node's
    /// namespace), its addresses reported as kubelet does, servers on TCP
    /// and UDP on each of its container ports, and, when the cluster has
    /// them, its own ClusterIP Service (`s-ns-name`). Returns the key and
    /// version to wait for. kube-proxy's rules are rewritten by the caller
    /// (`program_services`).
    fn add_pod(&mut self, p: &k8s_openapi::api::core::v1::Pod) -> Result<(String, Option<String>)> {
        let nsname = p.metadata.namespace.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        let key = format!("{nsname}/{name}");
        let (index, node) = (self.created, self.created % self.nodes.len());
        self.created += 1;
        let host = is_host_network(p);
        let mut v = serde_json::to_value(p)?;
        v["spec"]["nodeName"] = json!(node_name(node));
        let pods = res("pods")?;
        self.api
            .with_store(|s| s.create(pods, Some(&nsname), v))
            .map_err(|e| anyhow::anyhow!("create pod {key}: {e:?}"))?;
        let with_service = self.with_services && !host;
        if with_service {
            self.create_service(index, &nsname, &name)?;
        }
        let (ep, ips): (Endpoint, Vec<IpAddr>) = if host {
            (Endpoint::Host, node_ips(self.topology, node).to_vec())
        } else {
            let pod = Pod::add_as(
                &self.nodes[node],
                &self.configs[node],
                Some((&nsname, &name)),
            )?;
            let ips = pod.ipv4.iter().chain(pod.ipv6.iter()).copied().collect();
            (Endpoint::Wired(pod), ips)
        };
        // What kubelet does once the sandbox is up: report the addresses.
        let mut status = self.api.get("pods", &nsname, &name).context("pod")?;
        let ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
        status["status"]["podIP"] = ips.first().map(|v| v["ip"].clone()).unwrap_or(Value::Null);
        status["status"]["podIPs"] = json!(ips);
        status["status"]["hostIP"] = json!(link_ips(self.topology, node).0);
        status["status"]["phase"] = json!("Running");
        let updated = self
            .api
            .with_store(|s| s.update(pods, Some(&nsname), &name, status, Part::Status))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let mut servers = Vec::new();
        for port in container_ports(p) {
            match &ep {
                Endpoint::Wired(pod) => servers.push(Server::start(&pod.ns, port)?),
                Endpoint::Host => {
                    if !self.host_servers.contains_key(&(node, port)) {
                        let s = Server::start(&self.nodes[node].ns, port)?;
                        self.host_servers.insert((node, port), s);
                    }
                }
            }
        }
        if with_service {
            self.services
                .insert(key.clone(), service_ips(index).to_vec());
        }
        self.pods.insert(
            key.clone(),
            ModelPod {
                ep,
                node,
                _servers: servers,
            },
        );
        Ok((format!("Pod/{key}"), Some(rv_of(&updated))))
    }

    /// Pod `index`'s ClusterIP Service, one port per (protocol, port) of
    /// the default model.
    fn create_service(&self, index: usize, nsname: &str, name: &str) -> Result<()> {
        let [ip4, ip6] = service_ips(index);
        let mut ports = Vec::new();
        for port in PORTS {
            for proto in ["TCP", "UDP", "SCTP"] {
                ports.push(
                    json!({"name": format!("serve-{port}-{}", proto.to_lowercase()),
                    "protocol": proto, "port": port, "targetPort": port}),
                );
            }
        }
        let svc = res("services")?;
        self.api
            .with_store(|s| {
                s.create(
                    svc,
                    Some(nsname),
                    json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": format!("s-{nsname}-{name}"), "namespace": nsname},
                    "spec": {"selector": {"pod": name}, "clusterIP": ip4.to_string(),
                        "clusterIPs": [ip4.to_string(), ip6.to_string()],
                        "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                        "ports": ports}}),
                )
            })
            .map_err(|e| anyhow::anyhow!("create service of {nsname}/{name}: {e:?}"))?;
        Ok(())
    }

    /// Tears a pod down: CNI DEL on its node, then the pod and its Service
    /// leave the API.
    fn remove_pod(&mut self, key: &str) -> Result<(String, Option<String>)> {
        let (nsname, name) = key.split_once('/').context("pod key")?;
        if let Some(ModelPod {
            ep: Endpoint::Wired(pod),
            node,
            ..
        }) = self.pods.remove(key)
        {
            let out = pod.del(&self.nodes[node], &self.configs[node])?;
            if out.code != 0 {
                bail!("CNI DEL of {key}: {out:?}");
            }
        }
        self.services.remove(key);
        for (plural, obj) in [
            ("pods", name.to_owned()),
            ("services", format!("s-{nsname}-{name}")),
        ] {
            let r = res(plural)?;
            // Already gone (its namespace was deleted) is fine.
            let _gone = self
                .api
                .with_store(|s| s.delete(r, Some(nsname), &obj, (None, None)));
        }
        Ok((format!("Pod/{key}"), None))
    }

    /// kube-proxy's part: DNAT every Service ClusterIP to its pod, in every
    /// node, with nftables rules shaped as kube-proxy's nftables mode writes
    /// them. Rewritten whole whenever pods come or go.
    fn program_services(&mut self) -> Result<()> {
        use crate::kubeproxy::{KubeProxy, Protocol as P, ServicePort};
        let mut ports = Vec::new();
        for (key, ips) in &self.services {
            let (ns, name) = key.split_once('/').unwrap_or_default();
            for cluster_ip in ips {
                let backend = self.ip_of(key, Family::of(*cluster_ip));
                let Some(backend) = backend else { continue };
                for port in PORTS {
                    for proto in [P::Tcp, P::Udp] {
                        ports.push(ServicePort::new(
                            &format!("{ns}/s-{ns}-{name}"),
                            *cluster_ip,
                            proto,
                            port,
                            &[(backend, port)],
                        ));
                    }
                }
            }
        }
        if self.kube_proxy.is_empty() {
            for node in &self.nodes {
                self.kube_proxy.push(KubeProxy::apply(&node.ns, &ports)?);
            }
        } else {
            for kp in &mut self.kube_proxy {
                kp.update(&ports, None)?;
            }
        }
        Ok(())
    }

    fn wait_all_programmed(&self) -> Result<()> {
        let mut keys = Vec::new();
        self.api.with_store(|s| {
            for plural in [
                "namespaces",
                "pods",
                "networkpolicies",
                "clusternetworkpolicies",
            ] {
                if let Ok(r) = res(plural) {
                    for v in s.list(r, &Default::default()) {
                        let ns = v["metadata"]["namespace"].as_str().unwrap_or_default();
                        let name = v["metadata"]["name"].as_str().unwrap_or_default();
                        let kind = v["kind"].as_str().unwrap_or_default();
                        let key = if ns.is_empty() {
                            format!("{kind}/{name}")
                        } else {
                            format!("{kind}/{ns}/{name}")
                        };
                        keys.push((key, Some(rv_of(&v))));
                    }
                }
            }
        });
        self.wait(&keys)
    }

    fn wait(&self, keys: &[(String, Option<String>)]) -> Result<()> {
        for node in &self.nodes {
            for (key, rv) in keys {
                node.wait_programmed(key, rv.as_deref(), WAIT)?;
            }
        }
        Ok(())
    }

    /// Node `i` (its namespace, agent socket, kubeconfig in `tmp`).
    pub fn node(&self, i: usize) -> Option<&Node> {
        self.nodes.get(i)
    }

    /// The kubeconfig the agents use (in node 0's namespace the server is
    /// reachable at the address it names).
    pub fn kubeconfig(&self) -> Option<PathBuf> {
        self.nodes.first().map(|n| n.tmp.0.join("kubeconfig"))
    }

    /// Current resourceVersion of a namespaced object in the API.
    pub fn resource_version(&self, plural: &str, namespace: &str, name: &str) -> Option<String> {
        self.api.get(plural, namespace, name).map(|v| rv_of(&v))
    }

    /// The network namespace of model pod `ns/name` (a host-network pod's
    /// is its node's).
    pub fn pod_netns(&self, pod: &str) -> Option<&NetNs> {
        self.pods.get(pod).map(|p| match &p.ep {
            Endpoint::Wired(pod) => &pod.ns,
            Endpoint::Host => &self.nodes[p.node].ns,
        })
    }

    /// Applies an `apply` step's text (placeholders in `family`) through the
    /// API server; returns what to wait for.
    pub fn apply_text(
        &mut self,
        text: &str,
        family: Family,
    ) -> Result<Vec<(String, Option<String>)>> {
        let text = cases::substitute(text, family, |pod, f| self.ip_of(pod, f))?;
        let mut keys = Vec::new();
        for o in cases::parse_objects(&text)? {
            keys.extend(self.apply_object(&o)?);
        }
        Ok(keys)
    }

    /// Waits until every agent reports these keys programmed.
    pub fn wait_programmed(&self, keys: &[(String, Option<String>)]) -> Result<()> {
        self.wait(keys)
    }

    pub fn ip_of(&self, pod: &str, family: Family) -> Option<IpAddr> {
        let p = self.pods.get(pod)?;
        match (&p.ep, family) {
            (Endpoint::Wired(p), Family::Ipv4) => p.ipv4,
            (Endpoint::Wired(p), Family::Ipv6) => p.ipv6,
            (Endpoint::Host, f) => node_ips(self.topology, p.node)
                .into_iter()
                .find(|ip| Family::of(*ip) == f),
        }
    }

    /// Brings the cluster back to the model: no policies, no pods or
    /// namespaces a case added, every model object as the model has it.
    fn reset(&mut self) -> Result<()> {
        let mut keys = Vec::new();
        for kind in [
            cases::Kind::NetworkPolicy,
            cases::Kind::ClusterNetworkPolicy,
        ] {
            let r = res(plural(kind))?;
            let policies: Vec<Value> = self.api.with_store(|s| s.list(r, &Default::default()));
            for p in policies {
                let key = cases::ObjectKey {
                    kind,
                    namespace: p["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    name: p["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                };
                let ns = (!key.namespace.is_empty()).then_some(key.namespace.as_str());
                self.api
                    .with_store(|s| s.delete(r, ns, &key.name, (None, None)))
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                keys.push((programmed_key(&key), None));
            }
        }
        let model_keys: Vec<cases::ObjectKey> = self.model.iter().map(cases::Object::key).collect();
        let extra_pods: Vec<String> = self
            .pods
            .keys()
            .filter(|k| {
                !model_keys.iter().any(|m| {
                    m.kind == cases::Kind::Pod && format!("{}/{}", m.namespace, m.name) == **k
                })
            })
            .cloned()
            .collect();
        let pods_changed = !extra_pods.is_empty();
        for k in extra_pods {
            keys.push(self.remove_pod(&k)?);
        }
        let nsr = res("namespaces")?;
        let namespaces: Vec<Value> = self.api.with_store(|s| s.list(nsr, &Default::default()));
        for n in namespaces {
            let name = n["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let in_model = model_keys
                .iter()
                .any(|m| m.kind == cases::Kind::Namespace && m.name == name);
            let system = ["default", "kube-system", "kube-public", "kube-node-lease"]
                .contains(&name.as_str());
            if !in_model && !system {
                keys.push(self.delete_object(&cases::ObjectKey {
                    kind: cases::Kind::Namespace,
                    namespace: String::new(),
                    name,
                })?);
            }
        }
        let model = self.model.clone();
        for o in &model {
            // Recreates a model pod a case deleted (and its Service rules).
            keys.extend(self.apply_object(o)?);
        }
        if pods_changed {
            self.program_services()?;
        }
        self.wait(&keys)
    }

    /// Creates or updates one object as an `apply` step says; returns the
    /// key and version to wait for when something changed.
    fn apply_object(&mut self, o: &cases::Object) -> Result<Option<(String, Option<String>)>> {
        let key = o.key();
        let r = res(plural(key.kind))?;
        let ns = (!key.namespace.is_empty()).then_some(key.namespace.as_str());
        let existing = self.api.with_store(|s| s.get(r, ns, &key.name).ok());
        let mut v = serde_json::to_value(object_value(o))?;
        let updated = match (key.kind, existing) {
            (cases::Kind::Pod | cases::Kind::Namespace, Some(mut old)) => {
                // An existing pod or namespace: only its labels change.
                let labels = v["metadata"]["labels"].clone();
                if old["metadata"]["labels"] == labels {
                    return Ok(None);
                }
                old["metadata"]["labels"] = labels;
                self.api
                    .with_store(|s| s.update(r, ns, &key.name, old, Part::Main))
            }
            (cases::Kind::NetworkPolicy | cases::Kind::ClusterNetworkPolicy, Some(old)) => {
                v["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
                self.api
                    .with_store(|s| s.update(r, ns, &key.name, v, Part::Main))
            }
            (cases::Kind::Pod, None) => {
                let cases::Object::Pod(p) = o else {
                    bail!("not a pod")
                };
                let k = self.add_pod(p)?;
                self.program_services()?;
                return Ok(Some(k));
            }
            (_, None) => self.api.with_store(|s| s.create(r, ns, v)),
        }
        .map_err(|e| anyhow::anyhow!("apply {:?} {}: {e:?}", key.kind, key.name))?;
        Ok(Some((programmed_key(&key), Some(rv_of(&updated)))))
    }

    fn delete_object(&mut self, key: &cases::ObjectKey) -> Result<(String, Option<String>)> {
        match key.kind {
            cases::Kind::Pod => {
                let k = self.remove_pod(&format!("{}/{}", key.namespace, key.name))?;
                self.program_services()?;
                Ok(k)
            }
            cases::Kind::Namespace => {
                // Its pods go first, through CNI DEL, as kubelet would.
                let inside: Vec<String> = self
                    .pods
                    .keys()
                    .filter(|k| k.starts_with(&format!("{}/", key.name)))
                    .cloned()
                    .collect();
                for k in &inside {
                    self.remove_pod(k)?;
                }
                if !inside.is_empty() {
                    self.program_services()?;
                }
                let r = res("namespaces")?;
                self.api
                    .with_store(|s| s.delete(r, None, &key.name, (None, None)))
                    .map_err(|e| anyhow::anyhow!("delete namespace {}: {e:?}", key.name))?;
                Ok((programmed_key(key), None))
            }
            cases::Kind::NetworkPolicy | cases::Kind::ClusterNetworkPolicy => {
                let r = res(plural(key.kind))?;
                let ns = (!key.namespace.is_empty()).then_some(key.namespace.as_str());
                self.api
                    .with_store(|s| s.delete(r, ns, &key.name, (None, None)))
                    .map_err(|e| anyhow::anyhow!("delete {}: {e:?}", key.name))?;
                Ok((programmed_key(key), None))
            }
        }
    }

    /// Every pod of the cluster (`ns/pod`), sorted.
    pub fn pod_names(&self) -> Vec<String> {
        self.pods.keys().cloned().collect()
    }

    fn netns_name(&self, pod: &str) -> Result<String> {
        self.pod_netns(pod)
            .map(|ns| ns.name.clone())
            .with_context(|| format!("{pod} is no pod of the cluster"))
    }

    /// Probes every (from, to) pair of `names`, in parallel; the matrix is
    /// over `names` in their order. A name that is no pod of the cluster
    /// is an error.
    pub fn probe(
        &self,
        names: &[String],
        family: Family,
        target: ProbeTarget,
        protocol: Protocol,
        port: u16,
        timeout: Duration,
    ) -> Result<Matrix> {
        if let Some(missing) = names.iter().find(|n| !self.pods.contains_key(*n)) {
            bail!("the matrix names {missing}, which is no pod of the cluster");
        }
        let pairs: Vec<Pair> = names
            .iter()
            .flat_map(|f| names.iter().map(move |t| (f, t)))
            .filter(|(f, t)| f != t)
            .map(|(f, t)| (f.clone(), t.clone(), protocol, port))
            .collect();
        let results: BTreeMap<(String, String), bool> = pairs
            .iter()
            .map(|(f, t, _, _)| (f.clone(), t.clone()))
            .zip(self.probe_pairs(&pairs, family, target, timeout)?)
            .collect();
        Ok(Matrix::from_fn(names, |f, t| {
            f == t
                || results
                    .get(&(f.to_owned(), t.to_owned()))
                    .copied()
                    .unwrap_or(false)
        }))
    }

    /// Probes each (from, to, protocol, port), all at the same time; the
    /// results in the order of `pairs`. `to` is reached at its pod address
    /// (a host-network pod's is its node's) or at its Service ClusterIP. A
    /// pod that is not in the cluster, or a Service target for a pod
    /// without one, is an error. SCTP probes are never made (the caller
    /// skips them): they count as blocked.
    pub fn probe_pairs(
        &self,
        pairs: &[Pair],
        family: Family,
        target: ProbeTarget,
        timeout: Duration,
    ) -> Result<Vec<bool>> {
        let mut jobs = Vec::new();
        for (from, to, protocol, port) in pairs {
            if !self.pods.contains_key(to) {
                bail!("{to} is no pod of the cluster");
            }
            let dst = match target {
                ProbeTarget::Pod => self.ip_of(to, family),
                ProbeTarget::Service => Some(
                    self.services
                        .get(to)
                        .with_context(|| format!("{to} has no Service to probe"))?
                        .iter()
                        .find(|ip| Family::of(**ip) == family)
                        .copied()
                        .with_context(|| format!("{to}'s Service has no {family:?} address"))?,
                ),
            };
            let ns_name = self.netns_name(from)?;
            let (protocol, port) = (*protocol, *port);
            jobs.push(std::thread::spawn(move || {
                let ns = NetNs { name: ns_name };
                let ok = dst.is_some_and(|ip| match protocol {
                    Protocol::Tcp => tcp_ok(&ns, ip, port, timeout),
                    Protocol::Udp => udp_ok(&ns, ip, port, timeout),
                    Protocol::Sctp => false,
                });
                // Borrowed name: this NetNs must not delete the namespace.
                std::mem::forget(ns);
                ok
            }));
        }
        jobs.into_iter()
            .map(|j| {
                j.join()
                    .map_err(|_| anyhow::anyhow!("a probe thread panicked"))
            })
            .collect()
    }
}

/// A probe: client, server (`ns/pod`), protocol, port.
pub type Pair = (String, String, Protocol, u16);

fn object_value(o: &cases::Object) -> Value {
    match o {
        cases::Object::Namespace(n) => serde_json::to_value(n).unwrap_or_default(),
        cases::Object::Pod(p) => serde_json::to_value(p).unwrap_or_default(),
        cases::Object::NetworkPolicy(p) => serde_json::to_value(p).unwrap_or_default(),
        cases::Object::ClusterNetworkPolicy(p) => serde_json::to_value(p).unwrap_or_default(),
    }
}

/// Can this kernel open an SCTP socket? Without it, SCTP expectations are
/// skipped.
pub fn sctp_available() -> bool {
    // SAFETY: socket(2) with constant arguments; the fd is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd >= 0 {
        // SAFETY: closing the fd we just opened.
        unsafe { libc::close(fd) };
        true
    } else {
        false
    }
}

mod routed;
mod run;
pub use run::{Outcome, run, summary};

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn programmed_keys_match_what_the_agent_reports() {
        let k = cases::ObjectKey {
            kind: cases::Kind::NetworkPolicy,
            namespace: "x".into(),
            name: "p".into(),
        };
        assert_eq!(programmed_key(&k), "NetworkPolicy/x/p");
        let n = cases::ObjectKey {
            kind: cases::Kind::Namespace,
            namespace: String::new(),
            name: "x".into(),
        };
        assert_eq!(programmed_key(&n), "Namespace/x");
    }

    #[test]
    fn every_model_pod_gets_two_distinct_service_addresses() {
        let all: BTreeSet<IpAddr> = (0..9).flat_map(service_ips).collect();
        assert_eq!(all.len(), 18);
    }
}
