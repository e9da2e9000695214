//! Policy changes reach established flows (issue 10; docs/design.md,
//! "Policy changes reach established flows"), end to end: the real agent in
//! cluster mode, pods wired by the real plugin, kube-proxy's nftables DNAT
//! for a ClusterIP. A long-lived TCP connection and a UDP flow, each
//! directly to the pod and through the ClusterIP, carry traffic; then a
//! NetworkPolicy denies them (the sender's egress, or the receiver's
//! ingress). Once the agent reports the policy programmed, the next packet
//! on each tuple is dropped as `revoked` (event and counter).
//!
//! Every body runs twice: with the default `--established revalidate` and
//! with `--established keep`, where the same flows must live on, and no
//! `revoked` drop may appear: the same checks, the opposite answer.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};
use sluice_test_apiserver::{ServerHandle, resource_version};
use sluice_tests::{
    ApiNode, NetNs, Node, Pod, Server, eventually,
    kubeproxy::{KubeProxy, Protocol, ServicePort},
    tcp_ok,
};

const NODE: &str = "node-1";
const SHORT: Duration = Duration::from_millis(400);
const WAIT: Duration = Duration::from_secs(10);

/// What the new policy denies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Deny {
    /// The sender's egress (through the ClusterIP: judged after DNAT, at
    /// the backend's `to_pod`).
    SenderEgress,
    /// The receiver's ingress.
    ReceiverIngress,
}

/// One open flow of the client pod.
enum Socket {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

struct Flow {
    what: String,
    socket: Socket,
}

impl Flow {
    /// A TCP connection opened from inside `ns` (the socket stays in that
    /// namespace when used from this thread).
    fn tcp(ns: &NetNs, to: IpAddr, port: u16, what: &str) -> Result<Self> {
        let s = ns.run(move || TcpStream::connect_timeout(&SocketAddr::new(to, port), SHORT))??;
        s.set_read_timeout(Some(SHORT))?;
        Ok(Self {
            what: format!("TCP {what}"),
            socket: Socket::Tcp(s),
        })
    }

    /// A connected UDP socket: every datagram on the same 5-tuple.
    fn udp(ns: &NetNs, to: IpAddr, port: u16, what: &str) -> Result<Self> {
        let s = ns.run(move || -> std::io::Result<UdpSocket> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(SocketAddr::new(to, port))?;
            Ok(s)
        })??;
        s.set_read_timeout(Some(SHORT))?;
        Ok(Self {
            what: format!("UDP {what}"),
            socket: Socket::Udp(s),
        })
    }

    fn protocol(&self) -> &'static str {
        match self.socket {
            Socket::Tcp(_) => "TCP",
            Socket::Udp(_) => "UDP",
        }
    }

    fn local_port(&self) -> Result<u16> {
        Ok(match &self.socket {
            Socket::Tcp(s) => s.local_addr()?.port(),
            Socket::Udp(s) => s.local_addr()?.port(),
        })
    }

    /// One message out and its echo back, on the flow's tuple.
    fn echo(&mut self) -> bool {
        match &mut self.socket {
            Socket::Tcp(s) => {
                let mut b = [0u8; 1];
                s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"x"
            }
            Socket::Udp(s) => {
                let mut b = [0u8; 16];
                s.send(b"ping").is_ok() && s.recv(&mut b).is_ok_and(|n| &b[..n] == b"ping")
            }
        }
    }
}

fn pod(api: &ServerHandle, ns: &str, name: &str) -> Result<()> {
    api.create(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "none"}]}
    }))
    .map(drop)
}

fn revoked_events(node: &Node) -> Vec<Value> {
    node.events_matching(|e| e["reason"] == "revoked")
}

/// Client a, server b behind ClusterIP service web-b (TCP and UDP 80 to
/// 8080); four flows open and echoing; then the policy `deny`; then each
/// flow's next message, under `--established mode`.
fn policy_change_meets_established_flows(mode: &str, deny: Deny) -> Result<()> {
    let ApiNode {
        mut node,
        api,
        config,
    } = ApiNode::new(NODE, "10.122.0.0/24", "fd00:122::/64")?;
    node.agent_args
        .extend(["--established".to_owned(), mode.to_owned()]);
    api.create_namespace("r")?;
    pod(&api, "r", "a")?;
    pod(&api, "r", "b")?;
    let svc = api.create(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web-b", "namespace": "r"},
        "spec": {"selector": {"pod": "b"}, "ports": [
            {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
            {"name": "echo", "protocol": "UDP", "port": 80, "targetPort": 8080}]}}))?;
    let cluster_ip: IpAddr = svc["spec"]["clusterIP"]
        .as_str()
        .context("a ClusterIP")?
        .parse()?;
    node.start_agent()?;
    let a = Pod::add_as(&node, &config, Some(("r", "a")))?;
    let b = Pod::add_as(&node, &config, Some(("r", "b")))?;
    let _server = Server::start(&b.ns, 8080)?;
    node.wait_programmed("Service/r/web-b", Some(&resource_version(&svc)), WAIT)?;
    let b4 = b.ipv4.context("b without IPv4")?;
    let kp = KubeProxy::apply(
        &node.ns,
        &[
            ServicePort::new("r/web-b", cluster_ip, Protocol::Tcp, 80, &[(b4, 8080)]),
            ServicePort::new("r/web-b", cluster_ip, Protocol::Udp, 80, &[(b4, 8080)]),
        ],
    )?;
    assert!(
        eventually(WAIT, || tcp_ok(&a.ns, cluster_ip, 80, SHORT)),
        "a -> web-b before any policy; kube-proxy's tables:\n{}",
        kp.list()
    );
    let mut flows = vec![
        Flow::tcp(&a.ns, b4, 8080, "directly")?,
        Flow::tcp(&a.ns, cluster_ip, 80, "through the ClusterIP")?,
        Flow::udp(&a.ns, b4, 8080, "directly")?,
        Flow::udp(&a.ns, cluster_ip, 80, "through the ClusterIP")?,
    ];
    for f in &mut flows {
        assert!(f.echo(), "{} before the policy", f.what);
    }

    let (name, spec, direction) = match deny {
        Deny::SenderEgress => (
            "a-no-egress",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"]}),
            "egress",
        ),
        Deny::ReceiverIngress => (
            "b-no-ingress",
            json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}),
            "ingress",
        ),
    };
    let epoch_before = node.maps()?.epoch()?;
    let created = api.create(json!({"apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": "r"}, "spec": spec}))?;
    node.wait_programmed(
        &format!("NetworkPolicy/r/{name}"),
        Some(&resource_version(&created)),
        WAIT,
    )?;
    // Reported programmed: the epoch has moved already (never with keep).
    let epoch_after = node.maps()?.epoch()?;
    if mode == "keep" {
        assert_eq!((epoch_before, epoch_after), (0, 0));
    } else {
        assert!(
            epoch_after > epoch_before,
            "{epoch_before} -> {epoch_after}"
        );
    }

    let a4 = a.ipv4.context("a without IPv4")?.to_string();
    for f in &mut flows {
        let passed = f.echo();
        if mode == "keep" {
            assert!(passed, "{}: kept under --established keep", f.what);
            continue;
        }
        assert!(!passed, "{}: its next message is cut", f.what);
        let want = json!({"reason": "revoked", "direction": direction, "src": a4,
            "src_port": f.local_port()?, "dst": b4.to_string(), "dst_port": 8080,
            "protocol": f.protocol()});
        let matches = |e: &Value| {
            want.as_object()
                .is_some_and(|w| w.iter().all(|(k, v)| e.get(k) == Some(v)))
        };
        assert!(
            eventually(WAIT, || !node.events_matching(matches).is_empty()),
            "{}: a drop event with {want}; saw {:?}",
            f.what,
            node.events_matching(|_| true)
        );
    }
    let revoked: u64 = node
        .maps()?
        .drop_counters()?
        .iter()
        .filter(|(k, _)| k.reason == sluice_common::reason::REVOKED)
        .map(|(_, v)| v.packets)
        .sum();
    if mode == "keep" {
        assert_eq!(revoked, 0, "no revoked drop under keep");
        assert!(
            revoked_events(&node).is_empty(),
            "{:?}",
            revoked_events(&node)
        );
    } else {
        assert!(revoked >= 4, "revoked drops counted: {revoked}");
    }
    // New flows meet the policy either way.
    assert!(
        !tcp_ok(&a.ns, b4, 8080, SHORT),
        "a new connection is denied"
    );
    Ok(())
}

#[test]
fn established_flows_that_a_new_egress_policy_denies_are_cut_as_revoked() -> Result<()> {
    policy_change_meets_established_flows("revalidate", Deny::SenderEgress)
}

#[test]
fn established_flows_that_a_new_ingress_policy_denies_are_cut_as_revoked() -> Result<()> {
    policy_change_meets_established_flows("revalidate", Deny::ReceiverIngress)
}

#[test]
fn with_established_keep_flows_that_a_new_egress_policy_denies_live_on() -> Result<()> {
    policy_change_meets_established_flows("keep", Deny::SenderEgress)
}

#[test]
fn with_established_keep_flows_that_a_new_ingress_policy_denies_live_on() -> Result<()> {
    policy_change_meets_established_flows("keep", Deny::ReceiverIngress)
}
