//! Services end to end: the real agent in cluster mode watches Services in
//! the test API server (ClusterIPs into SERVICES), the test writes
//! kube-proxy's nftables DNAT for them in the node namespace
//! (`sluice_tests::kubeproxy`), and pods wired by the real plugin talk
//! through the ClusterIPs. Egress through a ClusterIP must be judged exactly
//! as egress to the pod behind it (docs/design.md, "Services"); every check
//! waits for the agent to report the object programmed.
use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use sluice_test_apiserver::{ServerHandle, resource_version, store::Part};
use sluice_tests::{
    ApiNode, NetNs, Node, Pod, Server, eventually,
    kubeproxy::{KubeProxy, Protocol, ServicePort},
    tcp_ok, udp_ok,
};

const NODE: &str = "node-1";
const SHORT: Duration = Duration::from_millis(400);
/// A single try that should connect: room for a loaded 2-core machine.
const OPEN: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(10);

fn pod(api: &ServerHandle, ns: &str, name: &str, labels: &Value) -> Result<()> {
    api.create(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "none"}]}
    }))
    .map(drop)
}

/// A ClusterIP Service (the API server allocates its IPv4 ClusterIP).
/// `ports`: (name, protocol, port, targetPort).
fn service(
    api: &ServerHandle,
    ns: &str,
    name: &str,
    selector: &Value,
    ports: &[(&str, &str, u16, u16)],
) -> Result<Value> {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, port, target)| {
            json!({"name": n, "protocol": p, "port": port, "targetPort": target})
        })
        .collect();
    api.create(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": selector, "ports": ports}}))
}

fn cluster_ips(svc: &Value) -> Vec<IpAddr> {
    svc["spec"]["clusterIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.parse().ok())
        .collect()
}

/// Makes `svc` dual-stack with `v6` as its IPv6 ClusterIP (the test API
/// server allocates IPv4 only); the Service as stored.
fn dual_stack(api: &ServerHandle, mut svc: Value, v6: IpAddr) -> Result<Value> {
    let v4 = cluster_ips(&svc)[0];
    svc["spec"]["clusterIPs"] = json!([v4.to_string(), v6.to_string()]);
    svc["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
    svc["spec"]["ipFamilyPolicy"] = json!("RequireDualStack");
    api.update(svc, Part::Main)
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

fn policy(api: &ServerHandle, ns: &str, name: &str, spec: &Value) -> Result<String> {
    let created = api.create(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}),
    )?;
    Ok(resource_version(&created))
}

/// A node whose agent watches a fresh test API server: (node, server,
/// the plugin config for its pods).
fn cluster() -> Result<(Node, ServerHandle, String)> {
    let ApiNode { node, api, config } = ApiNode::new(NODE, "10.121.0.0/24", "fd00:121::/64")?;
    Ok((node, api, config))
}

fn v4(p: &Pod) -> Result<IpAddr> {
    p.ipv4.context("pod without IPv4")
}

fn v6(p: &Pod) -> Result<IpAddr> {
    p.ipv6.context("pod without IPv6")
}

/// The Service addresses in the agent's pinned SERVICES map.
fn programmed_service_ips(node: &Node) -> Result<BTreeSet<IpAddr>> {
    Ok(node.maps()?.service_ips()?)
}

#[test]
fn the_agent_keeps_the_cluster_ips_of_every_service_in_its_services_map() -> Result<()> {
    let (mut node, api, _) = cluster()?;
    api.create_namespace("s")?;
    let plain = service(
        &api,
        "s",
        "plain",
        &json!({"app": "x"}),
        &[("p", "TCP", 80, 80)],
    )?;
    let plain_ip = cluster_ips(&plain);
    assert_eq!(plain_ip.len(), 1);
    assert!(plain_ip[0].to_string().starts_with("10.9"), "{plain_ip:?}");
    // Headless: clusterIP "None" is no address.
    api.create(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "headless", "namespace": "s"},
            "spec": {"clusterIP": "None", "selector": {"app": "x"},
                     "ports": [{"port": 80}]}}))?;
    api.create(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "external", "namespace": "s"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}}))?;
    node.start_agent()?;
    node.wait_programmed("Service/s/plain", Some(&resource_version(&plain)), WAIT)?;
    assert_eq!(
        programmed_service_ips(&node)?,
        plain_ip.iter().copied().collect()
    );

    // Dual-stack: the server allocates IPv4 only; the IPv6 ClusterIP is
    // given, as a dual-stack API server would have allocated it.
    let dual = service(
        &api,
        "s",
        "dual",
        &json!({"app": "y"}),
        &[("p", "TCP", 80, 80)],
    )?;
    let v4ip = cluster_ips(&dual)[0];
    let dual = dual_stack(&api, dual, "fd00:96::20".parse()?)?;
    node.wait_programmed("Service/s/dual", Some(&resource_version(&dual)), WAIT)?;
    let want: BTreeSet<IpAddr> = [plain_ip[0], v4ip, "fd00:96::20".parse()?].into();
    assert_eq!(programmed_service_ips(&node)?, want);

    api.delete("services", "s", "plain")?;
    node.wait_programmed("Service/s/plain", None, WAIT)?;
    let want: BTreeSet<IpAddr> = [v4ip, "fd00:96::20".parse()?].into();
    assert_eq!(programmed_service_ips(&node)?, want);

    // Deleted while the agent is down: gone after the restart's re-list
    // (the agent reads back what the pinned map holds).
    node.kill_agent()?;
    api.delete("services", "s", "dual")?;
    node.start_agent()?;
    node.wait_programmed("Service/s/dual", None, WAIT)?;
    assert_eq!(programmed_service_ips(&node)?, BTreeSet::new());
    Ok(())
}

/// Egress through a ClusterIP and to the pod behind it must agree. One
/// try each, given `OPEN` when it should connect (a denied one waits for
/// its whole timeout, so it gets `SHORT`).
fn both_ways(
    what: &str,
    check: impl Fn(IpAddr, u16, Duration) -> bool,
    via_service: (IpAddr, u16),
    direct: (IpAddr, u16),
    want: bool,
) {
    let t = if want { OPEN } else { SHORT };
    assert_eq!(
        check(via_service.0, via_service.1, t),
        want,
        "{what} through {}:{}",
        via_service.0,
        via_service.1
    );
    assert_eq!(
        check(direct.0, direct.1, t),
        want,
        "{what} directly to {}:{}",
        direct.0,
        direct.1
    );
}

#[test]
fn egress_through_a_cluster_ip_is_allowed_and_denied_exactly_as_egress_to_the_pod_behind_it()
-> Result<()> {
    let (mut node, api, config) = cluster()?;
    api.create_namespace("x")?;
    for name in ["a", "b", "c", "d"] {
        pod(&api, "x", name, &json!({"pod": name}))?;
    }
    // web-b: TCP and UDP 80 to b:8080, TCP 81 to b:8081; web-c: 80 to c:8080.
    let web_b = service(
        &api,
        "x",
        "web-b",
        &json!({"pod": "b"}),
        &[
            ("http", "TCP", 80, 8080),
            ("echo", "UDP", 80, 8080),
            ("other", "TCP", 81, 8081),
        ],
    )?;
    let web_c = service(
        &api,
        "x",
        "web-c",
        &json!({"pod": "c"}),
        &[("http", "TCP", 80, 8080), ("echo", "UDP", 80, 8080)],
    )?;
    node.start_agent()?;
    let a = Pod::add_as(&node, &config, Some(("x", "a")))?;
    let b = Pod::add_as(&node, &config, Some(("x", "b")))?;
    let c = Pod::add_as(&node, &config, Some(("x", "c")))?;
    let d = Pod::add_as(&node, &config, Some(("x", "d")))?;
    let _servers = [
        Server::start(&b.ns, 8080)?,
        Server::start(&b.ns, 8081)?,
        Server::start(&c.ns, 8080)?,
    ];
    // web-b is dual-stack.
    let b_ip4 = cluster_ips(&web_b)[0];
    let b_ip6: IpAddr = "fd00:96::b".parse()?;
    let web_b = dual_stack(&api, web_b, b_ip6)?;
    let c_ip4 = cluster_ips(&web_c)[0];
    node.wait_programmed("Service/x/web-b", Some(&resource_version(&web_b)), WAIT)?;
    node.wait_programmed("Service/x/web-c", Some(&resource_version(&web_c)), WAIT)?;
    let (b4, b6, c4) = (v4(&b)?, v6(&b)?, v4(&c)?);
    let ports = vec![
        ServicePort::new("x/web-b", b_ip4, Protocol::Tcp, 80, &[(b4, 8080)]),
        ServicePort::new("x/web-b", b_ip4, Protocol::Udp, 80, &[(b4, 8080)]),
        ServicePort::new("x/web-b", b_ip4, Protocol::Tcp, 81, &[(b4, 8081)]),
        ServicePort::new("x/web-b", b_ip6, Protocol::Tcp, 80, &[(b6, 8080)]),
        ServicePort::new("x/web-b", b_ip6, Protocol::Tcp, 81, &[(b6, 8081)]),
        ServicePort::new("x/web-c", c_ip4, Protocol::Tcp, 80, &[(c4, 8080)]),
        ServicePort::new("x/web-c", c_ip4, Protocol::Udp, 80, &[(c4, 8080)]),
    ];
    let kp = KubeProxy::apply(&node.ns, &ports)?;

    // No policy: everything reaches its backend through the ClusterIPs.
    assert!(
        eventually(WAIT, || tcp_ok(&a.ns, b_ip4, 80, SHORT)),
        "a -> web-b before any policy; kube-proxy's tables:\n{}",
        kp.list()
    );
    assert!(udp_ok(&a.ns, b_ip4, 80, SHORT), "UDP a -> web-b");
    assert!(tcp_ok(&a.ns, b_ip6, 80, SHORT), "a -> web-b over IPv6");
    assert!(tcp_ok(&a.ns, c_ip4, 80, SHORT), "a -> web-c");

    // a may open TCP and UDP 8080 to b, nothing else.
    let rv_egress = policy(
        &api,
        "x",
        "a-egress",
        &json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                           "ports": [{"protocol": "TCP", "port": 8080},
                                     {"protocol": "UDP", "port": 8080}]}]}),
    )?;
    node.wait_programmed("NetworkPolicy/x/a-egress", Some(&rv_egress), WAIT)?;
    let tcp = |ip, port, t| tcp_ok(&a.ns, ip, port, t);
    let udp = |ip, port, t| udp_ok(&a.ns, ip, port, t);
    // The ClusterIP's port is not what is judged: the backend's is.
    both_ways("TCP to b:8080", tcp, (b_ip4, 80), (b4, 8080), true);
    both_ways("UDP to b:8080", udp, (b_ip4, 80), (b4, 8080), true);
    both_ways("TCP to b:8080 (IPv6)", tcp, (b_ip6, 80), (b6, 8080), true);
    both_ways("TCP to b:8081", tcp, (b_ip4, 81), (b4, 8081), false);
    both_ways("TCP to b:8081 (IPv6)", tcp, (b_ip6, 81), (b6, 8081), false);
    both_ways("TCP to c:8080", tcp, (c_ip4, 80), (c4, 8080), false);
    both_ways("UDP to c:8080", udp, (c_ip4, 80), (c4, 8080), false);
    // d has no egress policy.
    assert!(tcp_ok(&d.ns, c_ip4, 80, SHORT), "d -> web-c is not a's");

    // The drop through web-c is a's egress drop, of the translated packet.
    let (a4s, c4s) = (v4(&a)?.to_string(), c4.to_string());
    for proto in ["TCP", "UDP"] {
        assert_drop_event(
            &node,
            &json!({"direction": "egress", "reason": "policy-denied", "src": a4s, "dst": c4s,
                    "dst_port": 8080, "protocol": proto, "src_namespace": "x", "src_pod": "a",
                    "dst_pod": "c"}),
        );
    }
    let counters = node.maps()?.drop_counters()?;
    assert!(
        counters
            .iter()
            .any(|(k, v)| k.reason == sluice_common::reason::POLICY_DENIED
                && k.dir == sluice_common::DIR_EGRESS
                && v.packets > 0),
        "egress drops counted: {counters:?}"
    );

    // b admits only d: a's egress still allows, b's ingress does not.
    let rv_ingress = policy(
        &api,
        "x",
        "b-ingress",
        &json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "d"}}}]}]}),
    )?;
    node.wait_programmed("NetworkPolicy/x/b-ingress", Some(&rv_ingress), WAIT)?;
    both_ways(
        "TCP a -> b under b's ingress policy",
        tcp,
        (b_ip4, 80),
        (b4, 8080),
        false,
    );
    both_ways(
        "UDP a -> b under b's ingress policy",
        udp,
        (b_ip4, 80),
        (b4, 8080),
        false,
    );
    let d_tcp = |ip, port, t| tcp_ok(&d.ns, ip, port, t);
    let d_udp = |ip, port, t| udp_ok(&d.ns, ip, port, t);
    both_ways("TCP d -> b", d_tcp, (b_ip4, 80), (b4, 8080), true);
    both_ways("UDP d -> b", d_udp, (b_ip4, 80), (b4, 8080), true);
    both_ways("TCP d -> b (IPv6)", d_tcp, (b_ip6, 80), (b6, 8080), true);
    assert_drop_event(
        &node,
        &json!({"direction": "ingress", "reason": "policy-denied", "src": a4s,
                "dst": b4.to_string(), "dst_port": 8080, "dst_pod": "b"}),
    );
    drop(kp);
    Ok(())
}

// ---- Host-network backends ------------------------------------------------

/// A TCP echo server of the node's host network: `socat` on the node's
/// address, started inside the node's cgroup (before its socket exists:
/// a socket belongs to the cgroup it was created in).
struct HostServer(std::process::Child);

impl HostServer {
    fn start(node: &Node, ip: IpAddr, port: u16) -> Result<Self> {
        let procs = node.cgroup.dir.join("cgroup.procs");
        let listen = match ip {
            IpAddr::V4(_) => format!("TCP4-LISTEN:{port},bind={ip}"),
            IpAddr::V6(_) => format!("TCP6-LISTEN:{port},bind=[{ip}]"),
        };
        let script = format!(
            "echo $$ > {} && exec ip netns exec {} socat {listen},fork,reuseaddr EXEC:cat",
            procs.display(),
            node.ns.name
        );
        let child = std::process::Command::new("sh")
            .args(["-c", &script])
            .spawn()
            .context("socat (installed by scripts/setup.sh)")?;
        let server = Self(child);
        if !eventually(WAIT, || tcp_ok(&node.ns, ip, port, SHORT)) {
            bail!("the host-network server on {ip}:{port} did not come up");
        }
        Ok(server)
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        let _ignored = self.0.kill();
        let _ignored = self.0.wait();
    }
}

#[test]
fn egress_through_a_cluster_ip_to_a_host_network_backend_is_judged_as_egress_to_the_node()
-> Result<()> {
    let (mut node, api, config) = cluster()?;
    api.create_namespace("x")?;
    pod(&api, "x", "a", &json!({"pod": "a"}))?;
    // A Service whose backend is the node itself (as the API server's
    // `kubernetes` Service, or a hostNetwork pod): 443 -> node:6443.
    let svc = service(
        &api,
        "x",
        "apiserver",
        &json!({}),
        &[("https", "TCP", 443, 6443)],
    )?;
    node.start_agent()?;
    let a = Pod::add_as(&node, &config, Some(("x", "a")))?;
    let addr = |cidr: &str| cidr.split('/').next().unwrap_or_default().parse::<IpAddr>();
    let (node4, node6) = (
        addr(sluice_tests::NODE_IPV4)?,
        addr(sluice_tests::NODE_IPV6)?,
    );
    let _backends = [
        HostServer::start(&node, node4, 6443)?,
        HostServer::start(&node, node6, 6443)?,
    ];
    let svc4 = cluster_ips(&svc)[0];
    let svc6: IpAddr = "fd00:96::443".parse()?;
    let svc = dual_stack(&api, svc, svc6)?;
    node.wait_programmed("Service/x/apiserver", Some(&resource_version(&svc)), WAIT)?;
    let port =
        |ip, backend| ServicePort::new("x/apiserver", ip, Protocol::Tcp, 443, &[(backend, 6443)]);
    let kp = KubeProxy::apply(&node.ns, &[port(svc4, node4), port(svc6, node6)])?;
    let tcp = |ip, port, t| tcp_ok(&a.ns, ip, port, t);
    // Through the ClusterIP and straight to the node, in both families.
    let to_the_node = |what: &str, want: bool| {
        for (svc, node) in [(svc4, node4), (svc6, node6)] {
            both_ways(what, tcp, (svc, 443), (node, 6443), want);
        }
    };

    // No policy: the node is reached both ways.
    assert!(
        eventually(WAIT, || tcp(svc4, 443, SHORT)),
        "a -> the Service before any policy; kube-proxy's tables:\n{}",
        kp.list()
    );
    to_the_node("TCP to the node", true);

    // Egress only to pods labelled b: the node is not one, through the
    // ClusterIP as directly.
    let mut spec = json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                          "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                                      "ports": [{"protocol": "TCP", "port": 6443}]}]});
    let rv = policy(&api, "x", "a-egress", &spec)?;
    node.wait_programmed("NetworkPolicy/x/a-egress", Some(&rv), WAIT)?;
    to_the_node("TCP to the node, egress to pods only", false);
    assert_drop_event(
        &node,
        &json!({"direction": "egress", "reason": "policy-denied", "src": v4(&a)?.to_string(),
                "dst": node4.to_string(), "dst_port": 6443, "src_pod": "a"}),
    );
    // The link outlives the agent, and a restarted agent puts its to_host
    // in before it takes the old one out (two pins used in turn): one link
    // remains, still judging.
    let pins = |node: &Node| -> Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(node.bpffs.dir.join("links"))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("cgroup-to_host"))
            .collect();
        v.sort();
        Ok(v)
    };
    let before = pins(&node)?;
    assert_eq!(before.len(), 1, "{before:?}");
    node.kill_agent()?;
    // While no agent runs, the pinned link keeps judging.
    both_ways(
        "TCP to the node, no agent",
        tcp,
        (svc4, 443),
        (node4, 6443),
        false,
    );
    node.start_agent()?;
    let after = pins(&node)?;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(before, after, "the new agent's link replaced the old one");
    to_the_node("TCP to the node after a restart", false);

    // The node's addresses by ipBlock: allowed both ways again.
    spec["egress"][0]["to"] = json!([{"ipBlock": {"cidr": format!("{node4}/32")}},
                                     {"ipBlock": {"cidr": format!("{node6}/128")}}]);
    let mut np = api
        .get("networkpolicies", "x", "a-egress")
        .context("the policy")?;
    np["spec"] = spec;
    let rv = resource_version(&api.update(np, Part::Main)?);
    node.wait_programmed("NetworkPolicy/x/a-egress", Some(&rv), WAIT)?;
    to_the_node("TCP to the node by ipBlock", true);
    drop(kp);
    Ok(())
}

// ---- DNS -------------------------------------------------------------------

const DNS_TYPE_A: u16 = 1;
const DNS_CLASS_IN: u16 = 1;

/// A standard query for `name` (type A, recursion desired).
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QD 1, AN/NS/AR 0
    for label in name.trim_end_matches('.').split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&DNS_TYPE_A.to_be_bytes());
    m.extend_from_slice(&DNS_CLASS_IN.to_be_bytes());
    m
}

/// Reads a (possibly compressed) name at `at`; the name and the offset
/// after it in the message.
fn dns_name(m: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    let mut end = None;
    for _ in 0..64 {
        let len = *m.get(at)? as usize;
        if len == 0 {
            return Some((labels.join("."), end.unwrap_or(at + 1)));
        }
        if len & 0xc0 == 0xc0 {
            let ptr = (len & 0x3f) << 8 | *m.get(at + 1)? as usize;
            end.get_or_insert(at + 2);
            at = ptr;
            continue;
        }
        labels.push(String::from_utf8_lossy(m.get(at + 1..at + 1 + len)?).into_owned());
        at += 1 + len;
    }
    None
}

fn be16(m: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*m.get(at)?, *m.get(at + 1)?]))
}

/// The answer to a query: `records` maps names to addresses; others get
/// NXDOMAIN.
fn dns_answer(query: &[u8], records: &[(String, Ipv4Addr)]) -> Option<Vec<u8>> {
    let (name, after) = dns_name(query, 12)?;
    let (qtype, qclass) = (be16(query, after)?, be16(query, after + 2)?);
    let question = query.get(12..after + 4)?;
    let found = records
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(&name))
        .filter(|_| qtype == DNS_TYPE_A && qclass == DNS_CLASS_IN);
    let mut m = Vec::new();
    m.extend_from_slice(query.get(0..2)?);
    let flags: u16 = 0x8180 | if found.is_some() { 0 } else { 3 }; // QR RD RA, NXDOMAIN
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&[0, 1, 0, u8::from(found.is_some()), 0, 0, 0, 0]);
    m.extend_from_slice(question);
    if let Some((_, ip)) = found {
        m.extend_from_slice(&[0xc0, 12]); // the name in the question
        m.extend_from_slice(&DNS_TYPE_A.to_be_bytes());
        m.extend_from_slice(&DNS_CLASS_IN.to_be_bytes());
        m.extend_from_slice(&30u32.to_be_bytes());
        m.extend_from_slice(&4u16.to_be_bytes());
        m.extend_from_slice(&ip.octets());
    }
    Some(m)
}

/// The A record of a response to query `id`, if it has one.
fn dns_parse_a(m: &[u8], id: u16) -> Option<Ipv4Addr> {
    if be16(m, 0)? != id || be16(m, 2)? & 0x8000 == 0 || be16(m, 2)? & 0xf != 0 {
        return None;
    }
    let (qd, an) = (be16(m, 4)?, be16(m, 6)?);
    let mut at = 12;
    for _ in 0..qd {
        at = dns_name(m, at)?.1 + 4;
    }
    for _ in 0..an {
        at = dns_name(m, at)?.1;
        let (ty, class, len) = (be16(m, at)?, be16(m, at + 2)?, be16(m, at + 8)? as usize);
        let data = m.get(at + 10..at + 10 + len)?;
        if ty == DNS_TYPE_A && class == DNS_CLASS_IN && len == 4 {
            return Some(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + len;
    }
    None
}

/// A DNS server on port 53 (UDP and TCP, IPv4) in a namespace, answering A
/// queries from `records`; stopped on drop.
struct DnsServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DnsServer {
    fn start(ns: &NetNs, records: Vec<(String, Ipv4Addr)>) -> Result<Self> {
        let (udp, tcp) = ns.run(|| -> Result<(UdpSocket, TcpListener)> {
            Ok((
                UdpSocket::bind("0.0.0.0:53")?,
                TcpListener::bind("0.0.0.0:53")?,
            ))
        })??;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        tcp.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(records);
        let mut threads = Vec::new();
        let (s, r) = (stop.clone(), records.clone());
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf)
                    && let Some(answer) = dns_answer(&buf[..n], &r)
                {
                    let _ignored = udp.send_to(&answer, from);
                }
            }
        }));
        let (s, r) = (stop.clone(), records);
        threads.push(std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = tcp.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ignored = c.set_nonblocking(false);
                let _ignored = c.set_read_timeout(Some(Duration::from_secs(2)));
                let mut len = [0u8; 2];
                if c.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if c.read_exact(&mut q).is_err() {
                    continue;
                }
                if let Some(answer) = dns_answer(&q, &r) {
                    let mut out = (answer.len() as u16).to_be_bytes().to_vec();
                    out.extend_from_slice(&answer);
                    let _ignored = c.write_all(&out);
                }
            }
        }));
        Ok(Self { stop, threads })
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ignored = t.join();
        }
    }
}

/// Resolves `name` (type A) with one query over UDP to `server`:53 from
/// inside `ns`.
fn resolve_udp(ns: &NetNs, server: IpAddr, name: &str, id: u16) -> Option<Ipv4Addr> {
    let name = name.to_owned();
    ns.run(move || -> Option<Ipv4Addr> {
        let s = UdpSocket::bind("0.0.0.0:0").ok()?;
        s.set_read_timeout(Some(SHORT)).ok()?;
        s.send_to(&dns_query(id, &name), SocketAddr::new(server, 53))
            .ok()?;
        let mut buf = [0u8; 512];
        let (n, _) = s.recv_from(&mut buf).ok()?;
        dns_parse_a(&buf[..n], id)
    })
    .ok()
    .flatten()
}

/// The same over TCP (length-prefixed messages).
fn resolve_tcp(ns: &NetNs, server: IpAddr, name: &str, id: u16) -> Option<Ipv4Addr> {
    let name = name.to_owned();
    ns.run(move || -> Option<Ipv4Addr> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(server, 53), SHORT).ok()?;
        s.set_read_timeout(Some(SHORT)).ok()?;
        let q = dns_query(id, &name);
        let mut out = (q.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&q);
        s.write_all(&out).ok()?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).ok()?;
        let mut m = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut m).ok()?;
        dns_parse_a(&m, id)
    })
    .ok()
    .flatten()
}

#[test]
fn a_pod_allowed_only_dns_egress_resolves_through_the_dns_service_and_reaches_nothing_else()
-> Result<()> {
    let (mut node, api, config) = cluster()?;
    api.create_namespace("dns")?;
    api.create_namespace("y")?;
    pod(&api, "dns", "coredns", &json!({"k8s-app": "kube-dns"}))?;
    pod(&api, "y", "client", &json!({"app": "client"}))?;
    pod(&api, "y", "web", &json!({"app": "web"}))?;
    let kube_dns = service(
        &api,
        "dns",
        "kube-dns",
        &json!({"k8s-app": "kube-dns"}),
        &[("dns", "UDP", 53, 53), ("dns-tcp", "TCP", 53, 53)],
    )?;
    let web_svc = service(
        &api,
        "y",
        "web",
        &json!({"app": "web"}),
        &[("http", "TCP", 80, 8080)],
    )?;
    let (dns_ip, web_ip) = (cluster_ips(&kube_dns)[0], cluster_ips(&web_svc)[0]);
    let web_ip4 = match web_ip {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => bail!("the test server allocates IPv4 ClusterIPs"),
    };
    node.start_agent()?;
    let coredns = Pod::add_as(&node, &config, Some(("dns", "coredns")))?;
    let client = Pod::add_as(&node, &config, Some(("y", "client")))?;
    let web = Pod::add_as(&node, &config, Some(("y", "web")))?;
    let _dns = DnsServer::start(
        &coredns.ns,
        vec![("web.y.svc.cluster.local".into(), web_ip4)],
    )?;
    let _web = Server::start(&web.ns, 8080)?;
    let _other = Server::start(&coredns.ns, 8080)?;
    node.wait_programmed(
        "Service/dns/kube-dns",
        Some(&resource_version(&kube_dns)),
        WAIT,
    )?;
    node.wait_programmed("Service/y/web", Some(&resource_version(&web_svc)), WAIT)?;
    let (dns4, web4) = (v4(&coredns)?, v4(&web)?);
    let _kp = KubeProxy::apply(
        &node.ns,
        &[
            ServicePort::new("dns/kube-dns", dns_ip, Protocol::Udp, 53, &[(dns4, 53)]),
            ServicePort::new("dns/kube-dns", dns_ip, Protocol::Tcp, 53, &[(dns4, 53)]),
            ServicePort::new("y/web", web_ip, Protocol::Tcp, 80, &[(web4, 8080)]),
        ],
    )?;
    let name = "web.y.svc.cluster.local";
    // The first query through the Service: retried as any first probe
    // through one (each try waits SHORT for its answer).
    assert!(
        eventually(WAIT, || resolve_udp(&client.ns, dns_ip, name, 1)
            == Some(web_ip4)),
        "resolves before any policy"
    );
    assert!(
        tcp_ok(&client.ns, web_ip, 80, SHORT),
        "web before any policy"
    );

    let rv = policy(
        &api,
        "y",
        "client-dns-only",
        &json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "dns"}},
                                   "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                           "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}),
    )?;
    node.wait_programmed("NetworkPolicy/y/client-dns-only", Some(&rv), WAIT)?;
    // A real query, answered, through the DNS Service, over UDP and TCP.
    for id in 2..5 {
        assert_eq!(
            resolve_udp(&client.ns, dns_ip, name, id),
            Some(web_ip4),
            "UDP query {id}"
        );
    }
    assert_eq!(
        resolve_tcp(&client.ns, dns_ip, name, 5),
        Some(web_ip4),
        "TCP query"
    );
    assert_eq!(
        resolve_udp(&client.ns, dns_ip, "nope.y.svc.cluster.local", 6),
        None
    );
    assert_eq!(
        resolve_udp(&client.ns, dns4, name, 7),
        Some(web_ip4),
        "the DNS pod itself"
    );
    // Nothing else: the resolved Service, its pod, another port of the DNS
    // pod, DNS to a pod that is not a DNS pod.
    assert!(
        !tcp_ok(&client.ns, web_ip, 80, SHORT),
        "web through its ClusterIP"
    );
    assert!(!tcp_ok(&client.ns, web4, 8080, SHORT), "web directly");
    assert!(
        !tcp_ok(&client.ns, dns4, 8080, SHORT),
        "the DNS pod on 8080"
    );
    assert_eq!(
        resolve_udp(&client.ns, web4, name, 8),
        None,
        "port 53 of the web pod"
    );
    // The web Service's drop is the client's egress drop at web's pod.
    assert_drop_event(
        &node,
        &json!({"direction": "egress", "src": v4(&client)?.to_string(),
                "dst": web4.to_string(), "dst_port": 8080, "src_pod": "client"}),
    );
    Ok(())
}

#[path = "services/hairpin.rs"]
mod hairpin;
#[path = "services/tiers.rs"]
mod tiers;
