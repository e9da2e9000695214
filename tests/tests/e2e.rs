//! End to end on the real kernel: a node namespace running the real agent,
//! pods wired by the real plugin binary, policy written through the agent,
//! and real TCP, UDP and ICMP over IPv4 and IPv6.
use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::json;
use sluice_common::{DIR_EGRESS, DIR_INGRESS, proto, reason};
use sluice_proto::{Request, Response};
use sluice_tests::{
    NODE_IPV4, NODE_IPV6, NetNs, Node, Pod, Server, conflist_config, eventually, ping_ok, tcp_ok,
    udp_ok,
};

const PORT: u16 = 80;
const SHORT: Duration = Duration::from_millis(400);
/// A single try that should connect: room for a loaded 2-core machine
/// (a denied one waits for its whole timeout, so it gets `SHORT`).
const OPEN: Duration = Duration::from_secs(3);
/// How long a wait for something that will happen may take (it returns
/// as soon as it does): room for a loaded 2-core machine.
const LONG: Duration = Duration::from_secs(10);

fn node_with_agent() -> Result<(Node, String)> {
    let mut node = Node::new()?;
    node.start_agent()?;
    let n = sluice_tests::unique("").replace('-', "");
    let n: u32 = n.parse::<u32>().context("unique() is digits and dashes")? % 200;
    let config = conflist_config(
        &node,
        Some(&format!("10.{}.0.0/24", 100 + n % 50)),
        Some(&format!("fd00:{n:x}::/64")),
    );
    Ok((node, config))
}

fn identity_of(node: &Node, ip: IpAddr) -> Result<u32> {
    let maps = node.maps()?;
    Ok(maps
        .ipcache_get(ip)
        .context("address not in the ipcache")?
        .identity)
}

fn set_policy(node: &Node, pod: &Pod, policy: serde_json::Value) -> Result<()> {
    match node.request(&Request::SetPolicy {
        attachment: pod.attachment(),
        policy,
    })? {
        Response::Ok => Ok(()),
        other => bail!("policy refused: {other:?}"),
    }
}

fn allow_tcp_from(identity: u32, port: u16) -> serde_json::Value {
    json!({"dir": DIR_INGRESS, "identity": identity, "l4": {"ports": {"proto": proto::TCP, "first": port, "last": port}}, "rule_id": 7})
}

fn node_ip(s: &str) -> Result<IpAddr> {
    Ok(s.split('/').next().context("an empty address")?.parse()?)
}

#[test]
fn pods_reach_each_other_and_the_node_over_tcp_udp_and_icmp_in_both_families() -> Result<()> {
    let (node, config) = node_with_agent()?;
    let a = Pod::add(&node, &config)?;
    let b = Pod::add(&node, &config)?;
    let _srv = Server::start(&b.ns, PORT)?;
    let node_srv = Server::start(&node.ns, PORT)?;
    for ip in [b.ipv4.context("v4")?, b.ipv6.context("v6")?] {
        assert!(
            eventually(LONG, || tcp_ok(&a.ns, ip, PORT, SHORT)),
            "TCP a->b {ip}"
        );
        assert!(udp_ok(&a.ns, ip, PORT, SHORT), "UDP a->b {ip}");
        assert!(ping_ok(&a.ns, ip), "ICMP a->b {ip}");
    }
    for ip in [node_ip(NODE_IPV4)?, node_ip(NODE_IPV6)?] {
        assert!(tcp_ok(&a.ns, ip, PORT, SHORT), "TCP pod->node {ip}");
        assert!(ping_ok(&a.ns, ip), "ICMP pod->node {ip}");
    }
    drop(node_srv);
    for ip in [a.ipv4.context("v4")?, a.ipv6.context("v6")?] {
        assert!(ping_ok(&node.ns, ip), "ICMP node->pod {ip}");
    }
    for p in [&a, &b] {
        assert_eq!(p.del(&node, &config)?.code, 0);
    }
    Ok(())
}

#[test]
fn an_ingress_policy_admits_only_its_peer_and_reports_each_denied_flow() -> Result<()> {
    let (node, config) = node_with_agent()?;
    let (a, b, c) = (
        Pod::add(&node, &config)?,
        Pod::add(&node, &config)?,
        Pod::add(&node, &config)?,
    );
    let _srv = Server::start(&c.ns, PORT)?;
    let _srv81 = Server::start(&c.ns, PORT + 1)?;
    let c4 = c.ipv4.context("v4")?;
    let c6 = c.ipv6.context("v6")?;
    assert!(
        eventually(LONG, || tcp_ok(&b.ns, c4, PORT, SHORT)),
        "open before any policy"
    );

    let ida = identity_of(&node, a.ipv4.context("v4")?)?;
    set_policy(
        &node,
        &c,
        json!({"ingress_isolated": true, "rules": [allow_tcp_from(ida, PORT)]}),
    )?;
    for ip in [c4, c6] {
        assert!(
            tcp_ok(&a.ns, ip, PORT, OPEN),
            "allowed peer on the allowed port {ip}"
        );
        assert!(
            !tcp_ok(&a.ns, ip, PORT + 1, SHORT),
            "allowed peer, other port {ip}"
        );
        assert!(!tcp_ok(&b.ns, ip, PORT, SHORT), "other peer {ip}");
        assert!(
            !udp_ok(&a.ns, ip, PORT, SHORT),
            "allowed peer, other protocol {ip}"
        );
        assert!(!ping_ok(&b.ns, ip), "ICMP from another peer {ip}");
    }
    // The node (kubelet probes) always reaches its pods.
    assert!(tcp_ok(&node.ns, c4, PORT, SHORT), "node -> isolated pod");

    // The denied probe from b shows up as an event with its 5-tuple.
    let b4 = b.ipv4.context("v4")?.to_string();
    let c4s = c4.to_string();
    assert!(
        eventually(LONG, || !node
            .events_matching(|e| e["src"] == json!(b4)
                && e["dst"] == json!(c4s)
                && e["dst_port"] == json!(PORT)
                && e["protocol"] == json!("TCP")
                && e["reason"] == json!("policy-denied")
                && e["direction"] == json!("ingress"))
            .is_empty()),
        "a drop event for b -> c:80; saw {:?}",
        node.events_matching(|_| true)
    );
    let counters = node.maps()?.drop_counters()?;
    assert!(
        counters
            .iter()
            .any(|(k, v)| k.reason == reason::POLICY_DENIED
                && k.dir == DIR_INGRESS
                && v.packets > 0),
        "policy drops counted: {counters:?}"
    );

    // Lifting the isolation opens it again.
    set_policy(&node, &c, json!({}))?;
    assert!(
        tcp_ok(&b.ns, c4, PORT, OPEN),
        "open again once no policy isolates c"
    );
    Ok(())
}

#[test]
fn egress_isolation_blocks_new_flows_but_replies_of_allowed_flows_pass() -> Result<()> {
    let (node, config) = node_with_agent()?;
    let (a, b) = (Pod::add(&node, &config)?, Pod::add(&node, &config)?);
    let _sa = Server::start(&a.ns, PORT)?;
    let _sb = Server::start(&b.ns, PORT)?;
    let (a4, b4) = (a.ipv4.context("v4")?, b.ipv4.context("v4")?);
    assert!(eventually(LONG, || tcp_ok(&a.ns, b4, PORT, SHORT)));
    // a may not open anything; b may still connect to a, and a's replies pass.
    set_policy(&node, &a, json!({"egress_isolated": true}))?;
    assert!(
        !tcp_ok(&a.ns, b4, PORT, SHORT),
        "a -> b is a new egress flow"
    );
    assert!(
        !udp_ok(&a.ns, b.ipv6.context("v6")?, PORT, SHORT),
        "a -> b over UDP/IPv6"
    );
    assert!(
        tcp_ok(&b.ns, a4, PORT, OPEN),
        "b -> a: a's replies are part of an allowed flow"
    );
    assert!(udp_ok(&b.ns, a4, PORT, SHORT), "UDP replies too");
    let a4s = a4.to_string();
    assert!(
        eventually(LONG, || !node
            .events_matching(|e| e["direction"] == json!("egress")
                && e["reason"] == json!("policy-denied")
                && e["src"] == json!(a4s))
            .is_empty()),
        "egress drop reported; saw {:?}",
        node.events_matching(|_| true)
    );
    Ok(())
}

#[test]
fn a_pod_sending_with_a_source_address_that_is_not_its_own_is_dropped_and_reported() -> Result<()> {
    let (node, config) = node_with_agent()?;
    let (a, b) = (Pod::add(&node, &config)?, Pod::add(&node, &config)?);
    let _sb = Server::start(&b.ns, PORT)?;
    let b4 = b.ipv4.context("v4")?;
    assert!(eventually(LONG, || udp_ok(&a.ns, b4, PORT, SHORT)));
    // Give a a second address that nobody assigned to it and send from it.
    let fake = "10.254.254.254";
    a.ns.ip(&["addr", "add", &format!("{fake}/32"), "dev", "eth0"])?;
    let sent = a.ns.run(move || -> Result<()> {
        let s = UdpSocket::bind(SocketAddr::new(fake.parse()?, 0))?;
        for _ in 0..3 {
            s.send_to(b"spoof", SocketAddr::new(b4, PORT))?;
        }
        Ok(())
    })?;
    sent?;
    assert!(
        eventually(LONG, || !node
            .events_matching(|e| e["reason"] == json!("spoofed-source") && e["src"] == json!(fake))
            .is_empty()),
        "spoof reported; saw {:?}",
        node.events_matching(|_| true)
    );
    let counters = node.maps()?.drop_counters()?;
    assert!(
        counters
            .iter()
            .any(|(k, v)| k.reason == reason::SPOOFED_SOURCE
                && k.dir == DIR_EGRESS
                && v.packets >= 3)
    );
    Ok(())
}

/// Sends `count` UDP datagrams at `interval` from `from` to `to`:`port`;
/// returns how many the receiver got, counted on the receiving side.
struct UdpStream {
    received: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl UdpStream {
    fn start(from: &NetNs, to_ns: &NetNs, to: IpAddr, port: u16) -> Result<Self> {
        let (received, sent, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let rx = to_ns.run(move || UdpSocket::bind(SocketAddr::new(to, port)))??;
        rx.set_read_timeout(Some(Duration::from_millis(50)))?;
        // Room for seconds of datagrams should this thread be starved
        // (while a restarted agent's programs are verified): a loss in
        // this socket's queue must not count as a loss by policy.
        // SO_RCVBUFFORCE: past rmem_max, which the test (root) may.
        let size: libc::c_int = 4 << 20;
        // SAFETY: a valid socket and an int option of the size given.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&rx),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        ensure!(
            set == 0,
            "SO_RCVBUFFORCE: {}",
            std::io::Error::last_os_error()
        );
        let tx =
            from.run(move || UdpSocket::bind(if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }))??;
        let mut threads = Vec::new();
        let (r, s) = (received.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let mut idle_after_stop = 0;
            while idle_after_stop < 4 {
                match rx.recv_from(&mut buf) {
                    Ok(_) => {
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) if s.load(Ordering::Relaxed) => idle_after_stop += 1,
                    Err(_) => {}
                }
            }
        }));
        let (n, s) = (sent.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if tx.send_to(b"tick", SocketAddr::new(to, port)).is_ok() {
                    n.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }));
        Ok(Self {
            received,
            sent,
            stop,
            threads,
        })
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ignored = t.join();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

#[test]
fn killing_and_restarting_the_agent_under_traffic_changes_no_verdict() -> Result<()> {
    let (mut node, config) = node_with_agent()?;
    let (a, b, c) = (
        Pod::add(&node, &config)?,
        Pod::add(&node, &config)?,
        Pod::add(&node, &config)?,
    );
    let c4 = c.ipv4.context("v4")?;
    let ida = identity_of(&node, a.ipv4.context("v4")?)?;
    let allow_udp = json!({"dir": DIR_INGRESS, "identity": ida, "l4": {"ports": {"proto": proto::UDP, "first": 5000, "last": 5000}}, "rule_id": 1});
    set_policy(
        &node,
        &c,
        json!({"ingress_isolated": true, "rules": [allow_udp]}),
    )?;

    let allowed = UdpStream::start(&a.ns, &c.ns, c4, 5000)?;
    let denied = UdpStream::start(&b.ns, &c.ns, c4, 5001)?;
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    node.kill_agent()?;
    std::thread::sleep(Duration::from_millis(300));
    node.start_agent()?;
    std::thread::sleep(Duration::from_millis(300));
    let (sent_ok, got_ok) = allowed.finish();
    let (sent_no, got_no) = denied.finish();
    eprintln!(
        "restart window {:?}: allowed {got_ok}/{sent_ok}, denied {got_no}/{sent_no}",
        started.elapsed()
    );
    assert!(
        sent_ok > 100 && sent_no > 100,
        "traffic flowed during the restart"
    );
    assert_eq!(
        got_ok, sent_ok,
        "every allowed datagram arrived across the restart"
    );
    assert_eq!(got_no, 0, "no denied datagram arrived across the restart");

    // The restarted agent still knows the endpoints and serves CNI.
    for p in [&a, &b, &c] {
        assert!(matches!(
            node.request(&Request::CheckEndpoint {
                attachment: p.attachment()
            })?,
            Response::Endpoint { .. }
        ));
    }
    let d = Pod::add(&node, &config)?;
    assert!(d.ipv4.is_some());
    Ok(())
}

#[test]
fn deleting_a_pod_removes_its_endpoint_entries_and_links() -> Result<()> {
    let (node, config) = node_with_agent()?;
    let a = Pod::add(&node, &config)?;
    let ifname = a.host_ifname.clone();
    assert!(
        node.bpffs
            .dir
            .join("links")
            .join(format!("{ifname}-from"))
            .exists()
    );
    let ida = identity_of(&node, a.ipv4.context("v4")?)?;
    set_policy(
        &node,
        &a,
        json!({"ingress_isolated": true, "rules": [allow_tcp_from(ida, PORT)]}),
    )?;
    assert!(node.maps()?.policy_len() > 0);
    assert_eq!(a.del(&node, &config)?.code, 0);
    let maps = node.maps()?;
    assert_eq!(maps.endpoint_records().len(), 0, "endpoint entry removed");
    assert_eq!(maps.policy_len(), 0, "policy entries removed");
    assert!(
        maps.ipcache_get(a.ipv4.context("v4")?).is_none(),
        "ipcache entry removed"
    );
    assert!(
        !node
            .bpffs
            .dir
            .join("links")
            .join(format!("{ifname}-from"))
            .exists(),
        "link unpinned"
    );
    // DEL again, and without a netns: still fine.
    assert_eq!(a.del(&node, &config)?.code, 0);
    let again = node.plugin(&sluice_tests::cni_env("DEL", &a.container_id, ""), &config)?;
    assert_eq!(again.code, 0, "{again:?}");
    Ok(())
}

#[test]
fn an_endpoint_whose_policy_exceeds_its_share_fails_closed_and_others_are_unaffected() -> Result<()>
{
    let mut node = Node::new()?;
    node.agent_args = vec!["--max-entries-per-endpoint".into(), "4".into()];
    node.start_agent()?;
    let config = conflist_config(&node, Some("10.199.0.0/24"), None);
    let (a, b, c) = (
        Pod::add(&node, &config)?,
        Pod::add(&node, &config)?,
        Pod::add(&node, &config)?,
    );
    let _sb = Server::start(&b.ns, PORT)?;
    let _sc = Server::start(&c.ns, PORT)?;
    let ida = identity_of(&node, a.ipv4.context("v4")?)?;
    // Ten port rules for c: over its limit of four entries.
    let rules: Vec<_> = (0..10).map(|i| allow_tcp_from(ida, 1000 + i)).collect();
    let refused = node.request(&Request::SetPolicy {
        attachment: c.attachment(),
        policy: json!({"ingress_isolated": true, "rules": rules}),
    })?;
    assert!(matches!(refused, Response::Error { .. }), "{refused:?}");
    assert!(
        !tcp_ok(&a.ns, c.ipv4.context("v4")?, PORT, SHORT),
        "c fails closed"
    );
    assert!(!ping_ok(&a.ns, c.ipv4.context("v4")?), "c drops everything");
    assert!(
        tcp_ok(&a.ns, b.ipv4.context("v4")?, PORT, OPEN),
        "b is unaffected"
    );
    assert!(
        eventually(LONG, || !node
            .events_matching(|e| e["reason"] == json!("fail-closed"))
            .is_empty()),
        "fail-closed drops reported"
    );
    let failed_closed = |node: &Node| -> Result<(f64, f64)> {
        let m = node.metrics()?;
        let get = |k: &str| m.get(k).copied().with_context(|| format!("{k} in {m:?}"));
        Ok((
            get("sluice_endpoints_failed_closed")?,
            get("sluice_endpoints_failed_closed_total")?,
        ))
    };
    assert_eq!(failed_closed(&node)?, (1.0, 1.0), "the metrics say so");
    // A policy that fits lifts it.
    set_policy(
        &node,
        &c,
        json!({"ingress_isolated": true, "rules": [allow_tcp_from(ida, PORT)]}),
    )?;
    assert!(
        tcp_ok(&a.ns, c.ipv4.context("v4")?, PORT, OPEN),
        "c enforces the new policy"
    );
    assert_eq!(failed_closed(&node)?, (0.0, 1.0), "lifted");
    Ok(())
}

#[test]
fn with_clsact_filters_instead_of_tcx_policy_holds_and_a_restart_swaps_programs_in_place()
-> Result<()> {
    // Kernels without TCX get clsact filters; this kernel has TCX, so force it.
    let mut node = Node::new()?;
    node.agent_args = vec!["--tc-attach".into(), "clsact".into()];
    node.start_agent()?;
    let config = conflist_config(&node, Some("10.198.0.0/24"), None);
    let (a, b, c) = (
        Pod::add(&node, &config)?,
        Pod::add(&node, &config)?,
        Pod::add(&node, &config)?,
    );
    let filters = node
        .ns
        .command("tc")
        .args(["filter", "show", "dev", &c.host_ifname, "ingress"])
        .output()?;
    assert!(
        String::from_utf8_lossy(&filters.stdout).contains("from_pod"),
        "a clsact filter runs from_pod"
    );
    let c4 = c.ipv4.context("v4")?;
    let ida = identity_of(&node, a.ipv4.context("v4")?)?;
    let allow_udp = json!({"dir": DIR_INGRESS, "identity": ida, "l4": {"ports": {"proto": proto::UDP, "first": 5000, "last": 5000}}, "rule_id": 1});
    set_policy(
        &node,
        &c,
        json!({"ingress_isolated": true, "rules": [allow_udp]}),
    )?;
    let allowed = UdpStream::start(&a.ns, &c.ns, c4, 5000)?;
    let denied = UdpStream::start(&b.ns, &c.ns, c4, 5001)?;
    std::thread::sleep(Duration::from_millis(200));
    node.kill_agent()?;
    std::thread::sleep(Duration::from_millis(200));
    node.start_agent()?;
    std::thread::sleep(Duration::from_millis(200));
    let (sent_ok, got_ok) = allowed.finish();
    let (sent_no, got_no) = denied.finish();
    assert!(sent_ok > 50 && sent_no > 50, "traffic flowed");
    assert_eq!(
        got_ok, sent_ok,
        "every allowed datagram arrived across the restart"
    );
    assert_eq!(got_no, 0, "no denied datagram arrived across the restart");
    let filters = node
        .ns
        .command("tc")
        .args(["filter", "show", "dev", &c.host_ifname, "egress"])
        .output()?;
    let text = String::from_utf8_lossy(&filters.stdout);
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("handle 0x5c1") && l.contains("to_pod"))
            .count(),
        1,
        "one filter, replaced in place: {text}"
    );
    // DEL removes the filters with the interface; the markers go too.
    assert_eq!(c.del(&node, &config)?.code, 0);
    assert!(
        !node
            .bpffs
            .dir
            .join("links")
            .join(format!("{}-to-clsact", c.host_ifname))
            .exists()
    );
    Ok(())
}
