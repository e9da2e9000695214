//! The CNI plugin on the real kernel, against a fake agent.
//!
//! Each test builds its own world: a "node" network namespace (the plugin
//! runs inside it through `ip netns exec`, as a runtime on that node would
//! run it), pod namespaces, an IPAM directory and a fake agent serving the
//! `sluice_proto` socket protocol from a thread. Guards delete all of it on
//! drop, also when a test fails; nothing touches the machine's own
//! namespace. Assertions look at both the plugin's output and the kernel
//! (`ip -j` in the namespaces), and packets really flow: ICMP echo over raw
//! sockets, TCP between pods.
//!
//! Run: `cargo build --bins && cargo test -p sluice-tests --test cni`
//! (root; SLUICE_BIN_DIR overrides where the `sluice` binary is taken from).
#![expect(
    clippy::expect_used,
    reason = "the fake agent (outside #[test] fns, which clippy.toml covers): a panic is the failure report"
)]
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use sluice_proto::{Attachment, EndpointSpec, Request, Response};
use sluice_tests::{NetNs, Server, TempDir, bin_dir, tcp_ok, unique};

const NETWORK: &str = "sluice-cni-test";
const NODE_V4: &str = "10.99.0.1";
const NODE_V6: &str = "fd99::1";
const V4_RANGE: &str = "10.244.1.0/24";
const V6_RANGE: &str = "fd00:10:244:1::/64";
const HOST_PREFIX: &str = "sl";

// ---------------------------------------------------------------------------
// Fake agent

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Answers like a healthy agent and keeps a registry of endpoints.
    Ready,
    /// Answers every request with error 11.
    NotReady,
    /// Reads the request and never answers (the plugin must time out).
    Silent,
    /// Ready, except CheckEndpoint fails with this code.
    CheckFails(u32),
}

#[derive(Default)]
struct AgentState {
    mode: Option<Mode>,
    requests: Vec<Request>,
    endpoints: HashMap<Attachment, EndpointSpec>,
    /// The answer to `PodCidrs`; `None` answers with an agent error.
    pod_cidrs: Option<Vec<String>>,
    /// DelEndpoint answers `RemovalDeferred` (the real agent's answer when
    /// the queue names a veth) and, unlike the real agent, never deletes
    /// the veth: the test does, when it chooses.
    defer_removals: bool,
}

/// A thread serving the agent socket; stopped and removed on drop.
struct FakeAgent {
    dir: TempDir,
    state: Arc<Mutex<AgentState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeAgent {
    fn start() -> Result<Self> {
        let dir = TempDir::new("sluice-cni-agent-")?;
        let listener = UnixListener::bind(dir.0.join("agent.sock"))?;
        listener.set_nonblocking(true)?;
        let state = Arc::new(Mutex::new(AgentState {
            mode: Some(Mode::Ready),
            pod_cidrs: Some(Vec::new()),
            ..AgentState::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (st, sp) = (st.clone(), sp.clone());
                        std::thread::spawn(move || serve(&conn, &st, &sp));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(Self {
            dir,
            state,
            stop,
            thread: Some(thread),
        })
    }

    fn socket(&self) -> PathBuf {
        self.dir.0.join("agent.sock")
    }

    fn set_mode(&self, mode: Mode) {
        if let Ok(mut s) = self.state.lock() {
            s.mode = Some(mode);
        }
    }

    fn set_pod_cidrs(&self, cidrs: Option<&[&str]>) {
        if let Ok(mut s) = self.state.lock() {
            s.pod_cidrs = cidrs.map(|c| c.iter().map(|c| c.to_string()).collect());
        }
    }

    fn set_defer_removals(&self, on: bool) {
        if let Ok(mut s) = self.state.lock() {
            s.defer_removals = on;
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.state
            .lock()
            .expect("a fake agent handler panicked")
            .requests
            .clone()
    }

    fn endpoints(&self) -> HashMap<Attachment, EndpointSpec> {
        self.state
            .lock()
            .expect("a fake agent handler panicked")
            .endpoints
            .clone()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _joined = t.join();
        }
    }
}

fn serve(conn: &UnixStream, state: &Mutex<AgentState>, stop: &AtomicBool) {
    let _timeout = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    if BufReader::new(conn).read_line(&mut line).is_err() {
        return;
    }
    let Ok(req) = serde_json::from_str::<Request>(line.trim_end()) else {
        return;
    };
    let answer = {
        let Ok(mut s) = state.lock() else { return };
        s.requests.push(req.clone());
        let mode = s.mode.unwrap_or(Mode::Ready);
        match (mode, req) {
            (Mode::Silent, _) => None,
            (Mode::NotReady, _) => Some(Response::error(11, "not ready", "still syncing")),
            (Mode::CheckFails(code), Request::CheckEndpoint { .. }) => Some(Response::error(
                code,
                "programs detached",
                "tc filter missing",
            )),
            (_, Request::AddEndpoint { endpoint }) => {
                s.endpoints.insert(endpoint.attachment.clone(), endpoint);
                Some(Response::Endpoint {
                    ep_id: u32::try_from(s.endpoints.len()).expect("a few endpoints"),
                    phases: None,
                })
            }
            (_, Request::DelEndpoint { attachment }) => {
                s.endpoints.remove(&attachment);
                Some(if s.defer_removals {
                    Response::RemovalDeferred
                } else {
                    Response::Ok
                })
            }
            (_, Request::CheckEndpoint { attachment }) => {
                Some(if s.endpoints.contains_key(&attachment) {
                    Response::Ok
                } else {
                    Response::error(101, "unknown endpoint", "")
                })
            }
            (_, Request::Gc { valid }) => {
                s.endpoints.retain(|a, _| valid.contains(a));
                Some(Response::Ok)
            }
            (_, Request::PodCidrs) => Some(match &s.pod_cidrs {
                Some(cidrs) => Response::PodCidrs {
                    cidrs: cidrs.clone(),
                },
                None => Response::error(50, "not in cluster mode", "the agent watches no Node"),
            }),
            (_, _) => Some(Response::Ok),
        }
    };
    match answer {
        Some(resp) => {
            if let Ok(l) = resp.to_line() {
                let mut out = conn;
                let _sent = out.write_all(l.as_bytes());
            }
        }
        None => {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The world of one test

struct Plugin {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Plugin {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("stdout {:?}, stderr {:?}", self.stdout, self.stderr))
    }

    /// The spec's error object, with the expected code.
    fn expect_error(&self, code: u64) -> Result<Value> {
        ensure!(
            self.code != 0,
            "expected error {code}, got success: {}",
            self.stdout
        );
        let v = self.json()?;
        ensure!(
            v["code"] == code,
            "expected code {code}, got {v} (stderr {})",
            self.stderr
        );
        for k in ["cniVersion", "msg", "details"] {
            ensure!(v[k].is_string(), "error object lacks {k}: {v}");
        }
        Ok(v)
    }

    fn expect_silent_success(&self) -> Result<()> {
        ensure!(
            self.code == 0 && self.stdout.trim().is_empty(),
            "expected silent success, got {}: {} / {}",
            self.code,
            self.stdout,
            self.stderr
        );
        Ok(())
    }
}

struct World {
    node: NetNs,
    agent: FakeAgent,
    data: TempDir,
    /// Empty: the configuration has no `ranges` (the Node's podCIDRs).
    ranges: Vec<Vec<String>>,
}

impl World {
    fn new(ranges: &[&str]) -> Result<Self> {
        ensure!(
            nix::unistd::geteuid().is_root(),
            "the CNI tests need root (namespaces, veths)"
        );
        let bin = bin_dir().join("sluice");
        ensure!(
            bin.exists(),
            "{} is missing: run `cargo build --bins` first (or set SLUICE_BIN_DIR)",
            bin.display()
        );
        let node = NetNs::new("sluice-cni-")?;
        // The node's own addresses, on lo: this kernel has no dummy links,
        // and the node needs a source address to talk to pods.
        node.ip(&["addr", "add", &format!("{NODE_V4}/32"), "dev", "lo"])?;
        node.ip(&["addr", "add", &format!("{NODE_V6}/128"), "dev", "lo"])?;
        Ok(Self {
            node,
            agent: FakeAgent::start()?,
            data: TempDir::new("sluice-cni-ipam-")?,
            ranges: ranges.iter().map(|r| vec![r.to_string()]).collect(),
        })
    }

    fn config(&self) -> Value {
        let mut c = json!({
            "cniVersion": "1.1.0",
            "name": NETWORK,
            "type": "sluice",
            "dataDir": self.data.0,
            "agentSocket": self.agent.socket(),
            "agentTimeoutMs": 2000,
            "deleteQueueDir": self.queue_dir(),
        });
        if !self.ranges.is_empty() {
            c["ranges"] = json!(self.ranges);
        }
        c
    }

    /// Where DEL queues removals the agent could not take.
    fn queue_dir(&self) -> PathBuf {
        self.data.0.join("delete-queue")
    }

    /// Asserts that `ip` is still reserved and that `entry` is the one
    /// pending deletion; returns that entry.
    fn held_in_queue(&self, ip: IpAddr, entry: &str) -> Result<Value> {
        ensure!(self.ip_files()? == BTreeSet::from([ip]));
        let queued = self.queued()?;
        ensure!(queued == BTreeSet::from([entry.to_string()]), "{queued:?}");
        Ok(serde_json::from_slice(&std::fs::read(
            self.queue_dir().join(entry),
        )?)?)
    }

    /// Files in the deletion queue (none when it does not exist).
    fn queued(&self) -> Result<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        if let Ok(d) = std::fs::read_dir(self.queue_dir()) {
            for e in d {
                out.insert(e?.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(out)
    }

    /// Runs the plugin inside the node namespace, with exactly `env` (plus
    /// PATH) and `stdin`, like a runtime.
    fn run(&self, env: &[(&str, &str)], stdin: &str) -> Result<Plugin> {
        let mut cmd = self.node.command(bin_dir().join("sluice"));
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = sluice_tests::run_with_stdin(&mut cmd, stdin)?;
        Ok(Plugin {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn verb(&self, verb: &str, id: &str, netns: &str, conf: &Value) -> Result<Plugin> {
        self.run(
            &[
                ("CNI_COMMAND", verb),
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", "eth0"),
                (
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-0",
                ),
                ("CNI_PATH", "/opt/cni/bin"),
            ],
            &conf.to_string(),
        )
    }

    fn add(&self, pod: &Pod, conf: &Value) -> Result<Value> {
        let out = self.verb("ADD", &pod.id, &pod.path(), conf)?;
        ensure!(out.code == 0, "ADD failed: {} / {}", out.stdout, out.stderr);
        out.json()
    }

    /// DEL as containerd sends it: once with everything, once without
    /// netns and prevResult.
    fn del_twice(&self, pod: &Pod, prev: Option<&Value>) -> Result<()> {
        let mut conf = self.config();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        self.verb("DEL", &pod.id, &pod.path(), &conf)?
            .expect_silent_success()?;
        self.verb("DEL", &pod.id, "", &self.config())?
            .expect_silent_success()
    }

    /// Addresses with an IPAM file.
    fn ip_files(&self) -> Result<BTreeSet<IpAddr>> {
        let dir = self.data.0.join(NETWORK);
        let mut out = BTreeSet::new();
        if !dir.exists() {
            return Ok(out);
        }
        for e in std::fs::read_dir(dir)? {
            if let Some(ip) = e?.file_name().to_str().and_then(|n| n.parse().ok()) {
                out.insert(ip);
            }
        }
        Ok(out)
    }

    fn host_veths(&self) -> Result<Vec<String>> {
        self.node.veths()
    }

    /// Nothing of the plugin is left: no veth, no address file, no endpoint.
    fn assert_clean(&self) -> Result<()> {
        ensure!(
            self.host_veths()?.is_empty(),
            "veths left: {:?}",
            self.host_veths()?
        );
        ensure!(
            self.ip_files()?.is_empty(),
            "address files left: {:?}",
            self.ip_files()?
        );
        ensure!(
            self.agent.endpoints().is_empty(),
            "endpoints left: {:?}",
            self.agent.endpoints().keys()
        );
        ensure!(
            self.queued()?.is_empty(),
            "queued removals left: {:?}",
            self.queued()?
        );
        Ok(())
    }
}

struct Pod {
    ns: NetNs,
    id: String,
}

impl Pod {
    fn new() -> Result<Self> {
        let ns = NetNs::new("sluice-cni-pod-")?;
        let id = format!("ctr{}", unique("").replace('-', "x"));
        Ok(Self { ns, id })
    }

    fn path(&self) -> String {
        self.ns.path().display().to_string()
    }

    fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.id.clone(),
            ifname: "eth0".into(),
        }
    }
}

/// Addresses of `ifname` in `ns` as "ip/prefix" strings (global scope only).
fn addrs(ns: &NetNs, ifname: &str) -> Result<Vec<String>> {
    let v: Value = serde_json::from_str(&ns.ip(&["-j", "addr", "show", "dev", ifname])?)?;
    Ok(v[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["scope"] == "global" || a["local"] == "fe80::1")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"]))
        .collect())
}

/// `ip -j route` of one family in `ns`, as "dst via gw dev scope" lines.
fn routes(ns: &NetNs, v6: bool) -> Result<Vec<String>> {
    let fam = if v6 { "-6" } else { "-4" };
    let v: Value = serde_json::from_str(&ns.ip(&[fam, "-j", "route", "show"])?)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            format!(
                "{} via {} dev {} scope {}",
                r["dst"].as_str().unwrap_or("?"),
                r["gateway"].as_str().unwrap_or("-"),
                r["dev"].as_str().unwrap_or("?"),
                r["scope"].as_str().unwrap_or("global")
            )
        })
        .collect())
}

fn link_json(ns: &NetNs, ifname: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(&ns.ip(&["-j", "link", "show", "dev", ifname])?)?;
    Ok(v[0].clone())
}

fn result_ip(result: &Value, v6: bool) -> Result<IpAddr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse::<IpAddr>().ok())
        .find(|ip| ip.is_ipv6() == v6)
        .context("no address of that family in the result")
}

fn host_ifname(result: &Value) -> Result<String> {
    result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i.get("sandbox").is_none())
        .and_then(|i| i["name"].as_str())
        .map(str::to_string)
        .context("no host interface in the result")
}

// ---------------------------------------------------------------------------
// ICMP echo over a raw socket (no ping(8) needed)

static ECHO_ID: AtomicU16 = AtomicU16::new(1);

fn ping(ns: &NetNs, to: IpAddr) -> bool {
    ping_addr(ns, SocketAddr::new(to, 0))
}

fn ping_addr(ns: &NetNs, to: SocketAddr) -> bool {
    (0..3).any(|_| {
        ns.run(move || echo(to, Duration::from_secs(1)))
            .unwrap_or(false)
    })
}

/// One ICMP echo request and its reply, on a raw socket connected to `to`
/// (so that the kernel only hands us packets from `to`).
fn echo(to: SocketAddr, timeout: Duration) -> bool {
    use socket2::{Domain, Protocol, Socket, Type};
    let v6 = to.is_ipv6();
    let (domain, proto, request, reply) = if v6 {
        (Domain::IPV6, Protocol::ICMPV6, 128u8, 129u8)
    } else {
        (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8)
    };
    let Ok(mut sock) = Socket::new(domain, Type::RAW, Some(proto)) else {
        return false;
    };
    if sock.connect(&to.into()).is_err() {
        return false;
    }
    let id = (std::process::id() as u16) ^ ECHO_ID.fetch_add(1, Ordering::Relaxed).rotate_left(7);
    let mut pkt = vec![request, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&1u16.to_be_bytes());
    pkt.extend_from_slice(b"sluice-cni-echo");
    if !v6 {
        // The kernel fills in the ICMPv6 checksum, not the ICMPv4 one.
        let sum = checksum(&pkt);
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    if sock.send(&pkt).is_err() {
        return false;
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        let Ok(n) = sock.read(&mut buf) else {
            return false;
        };
        // Raw IPv4 sockets deliver the IP header too; IPv6 ones do not.
        let icmp = if v6 {
            &buf[..n]
        } else {
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            buf.get(ihl..n).unwrap_or(&[])
        };
        if icmp.len() >= 8 && icmp[0] == reply && icmp[4..6] == id.to_be_bytes() {
            return true;
        }
    }
    false
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn version_prints_the_supported_versions_and_echoes_the_input() -> Result<()> {
    let w = World::new(&[V4_RANGE])?;
    let out = w.run(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#)?;
    ensure!(out.code == 0, "{}", out.stderr);
    ensure!(
        out.json()?
            == json!({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}),
        "{}",
        out.stdout
    );
    let out = w.run(&[("CNI_COMMAND", "VERSION")], "")?;
    ensure!(out.json()?["cniVersion"] == "1.1.0", "{}", out.stdout);
    Ok(())
}

#[test]
fn an_ipv4_pod_is_wired_checked_reachable_and_deleted_twice() -> Result<()> {
    let w = World::new(&[V4_RANGE])?;
    let pod = Pod::new()?;
    let mut conf = w.config();
    conf["mtu"] = json!(1400);
    let r = w.add(&pod, &conf)?;

    // The result.
    let host = host_ifname(&r)?;
    ensure!(
        host.starts_with(HOST_PREFIX) && host.len() <= 15,
        "host end {host}"
    );
    ensure!(r["cniVersion"] == "1.1.0");
    ensure!(r["interfaces"][1]["name"] == "eth0" && r["interfaces"][1]["sandbox"] == pod.path());
    ensure!(r["interfaces"][0]["mtu"] == 1400 && r["interfaces"][1]["mtu"] == 1400);
    ensure!(r["ips"][0]["address"] == "10.244.1.1/32", "{r}");
    ensure!(r["ips"][0]["gateway"] == "169.254.1.1" && r["ips"][0]["interface"] == 1);
    ensure!(r["ips"][0].get("version").is_none());
    ensure!(
        r["routes"]
            == json!([{"dst": "169.254.1.1/32", "scope": 253}, {"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]),
        "{r}"
    );

    // The kernel, pod side.
    let eth0 = link_json(&pod.ns, "eth0")?;
    ensure!(eth0["address"] == r["interfaces"][1]["mac"], "{eth0}");
    ensure!(
        eth0["mtu"] == 1400 && eth0["flags"].to_string().contains("\"UP\""),
        "{eth0}"
    );
    ensure!(
        addrs(&pod.ns, "eth0")? == ["10.244.1.1/32"],
        "{:?}",
        addrs(&pod.ns, "eth0")?
    );
    let pr = routes(&pod.ns, false)?;
    ensure!(
        pr.contains(&"default via 169.254.1.1 dev eth0 scope global".into()),
        "{pr:?}"
    );
    ensure!(
        pr.contains(&"169.254.1.1 via - dev eth0 scope link".into()),
        "{pr:?}"
    );
    let neigh = pod.ns.ip(&["neigh", "show", "dev", "eth0"])?;
    let host_mac = r["interfaces"][0]["mac"].as_str().unwrap_or("?");
    ensure!(
        neigh.contains(&format!("169.254.1.1 lladdr {host_mac} PERMANENT")),
        "{neigh}"
    );

    // The kernel, node side.
    ensure!(w.host_veths()? == [host.as_str()]);
    ensure!(link_json(&w.node, &host)?["address"] == host_mac);
    let nr = routes(&w.node, false)?;
    ensure!(
        nr.contains(&format!("10.244.1.1 via - dev {host} scope link")),
        "{nr:?}"
    );
    let fwd = w
        .node
        .command("cat")
        .arg("/proc/sys/net/ipv4/ip_forward")
        .output()?;
    ensure!(String::from_utf8_lossy(&fwd.stdout).trim() == "1");
    ensure!(w.ip_files()? == BTreeSet::from(["10.244.1.1".parse()?]));

    // The agent saw the endpoint, with the host ifindex and pod identity.
    let ep = w
        .agent
        .endpoints()
        .remove(&pod.attachment())
        .context("no endpoint")?;
    ensure!(ep.host_ifname == host && ep.ipv4 == Some("10.244.1.1".parse()?) && ep.ipv6.is_none());
    ensure!(
        Some(ep.host_ifindex)
            == link_json(&w.node, &host)?["ifindex"]
                .as_u64()
                .map(|i| i as u32)
    );
    ensure!(ep.pod_namespace.as_deref() == Some("ns1") && ep.pod_name.as_deref() == Some("web-0"));
    ensure!(ep.netns == pod.path());

    // Packets: node -> pod and pod -> node.
    ensure!(
        ping(&w.node, "10.244.1.1".parse()?),
        "node cannot ping the pod"
    );
    ensure!(ping(&pod.ns, NODE_V4.parse()?), "pod cannot ping the node");
    let _server = Server::start(&pod.ns, 8080)?;
    ensure!(tcp_ok(
        &w.node,
        "10.244.1.1".parse()?,
        8080,
        Duration::from_secs(2)
    ));

    // CHECK right after ADD.
    let mut checked = w.config();
    checked["prevResult"] = r.clone();
    w.verb("CHECK", &pod.id, &pod.path(), &checked)?
        .expect_silent_success()?;

    w.del_twice(&pod, Some(&r))?;
    w.assert_clean()?;
    ensure!(pod.ns.veths()?.is_empty());
    ensure!(
        !ping(&w.node, "10.244.1.1".parse()?),
        "the pod still answers after DEL"
    );
    let dels = w
        .agent
        .requests()
        .iter()
        .filter(|q| matches!(q, Request::DelEndpoint { .. }))
        .count();
    ensure!(dels == 2, "{dels} DelEndpoint requests");
    Ok(())
}

#[test]
fn an_ipv6_pod_routes_through_fe80_1_owned_by_the_host_end() -> Result<()> {
    let w = World::new(&[V6_RANGE])?;
    let pod = Pod::new()?;
    let r = w.add(&pod, &w.config())?;
    let host = host_ifname(&r)?;
    // The first pod of a fresh node: its host end and its eth0 get the same
    // ifindex (each namespace numbers its own), which makes the kernel
    // delay eth0's carrier-on by up to a second. ADD returns with eth0
    // running all the same: IPv6 works at once.
    let eth0 = link_json(&pod.ns, "eth0")?;
    ensure!(
        eth0["ifindex"] == link_json(&w.node, &host)?["ifindex"],
        "the case this test is for: same ifindex on both ends"
    );
    ensure!(
        eth0["operstate"] == "UP",
        "eth0 not running after ADD: {eth0}"
    );
    ensure!(
        r["ips"]
            == json!([{"address": "fd00:10:244:1::1/128", "gateway": "fe80::1", "interface": 1}]),
        "{r}"
    );
    ensure!(
        r["routes"] == json!([{"dst": "::/0", "gw": "fe80::1"}]),
        "{r}"
    );

    ensure!(
        addrs(&pod.ns, "eth0")? == ["fd00:10:244:1::1/128"],
        "{:?}",
        addrs(&pod.ns, "eth0")?
    );
    let pr = routes(&pod.ns, true)?;
    ensure!(
        pr.iter()
            .any(|l| l.starts_with("default via fe80::1 dev eth0")),
        "{pr:?}"
    );
    let neigh = pod.ns.ip(&["-6", "neigh", "show", "dev", "eth0"])?;
    ensure!(
        neigh.contains("fe80::1 lladdr") && neigh.contains("PERMANENT"),
        "{neigh}"
    );
    ensure!(
        addrs(&w.node, &host)? == ["fe80::1/64"],
        "{:?}",
        addrs(&w.node, &host)?
    );
    let nr = routes(&w.node, true)?;
    ensure!(
        nr.iter()
            .any(|l| l.starts_with(&format!("fd00:10:244:1::1 via - dev {host}"))),
        "{nr:?}"
    );
    // No IPv4 anything for an IPv6-only pod.
    ensure!(routes(&pod.ns, false)?.is_empty());
    ensure!(
        w.agent
            .endpoints()
            .get(&pod.attachment())
            .and_then(|e| e.ipv6)
            == Some("fd00:10:244:1::1".parse()?)
    );

    ensure!(
        ping(&w.node, "fd00:10:244:1::1".parse()?),
        "node cannot ping the pod"
    );
    ensure!(ping(&pod.ns, NODE_V6.parse()?), "pod cannot ping the node");
    // The host end owns the gateway address and answers on it.
    let scope = link_json(&pod.ns, "eth0")?["ifindex"]
        .as_u64()
        .context("ifindex")? as u32;
    let gw = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse()?, 0, 0, scope));
    ensure!(ping_addr(&pod.ns, gw), "pod cannot ping fe80::1");

    let mut checked = w.config();
    checked["prevResult"] = r.clone();
    w.verb("CHECK", &pod.id, &pod.path(), &checked)?
        .expect_silent_success()?;
    w.del_twice(&pod, Some(&r))?;
    w.assert_clean()
}

#[test]
fn dual_stack_pods_reach_each_other_and_the_node_over_icmp_and_tcp() -> Result<()> {
    let w = World::new(&[V4_RANGE, V6_RANGE])?;
    let (a, b) = (Pod::new()?, Pod::new()?);
    let ra = w.add(&a, &w.config())?;
    let rb = w.add(&b, &w.config())?;
    let (a4, a6) = (result_ip(&ra, false)?, result_ip(&ra, true)?);
    let (b4, b6) = (result_ip(&rb, false)?, result_ip(&rb, true)?);
    ensure!(a4 != b4 && a6 != b6);
    ensure!(ra["routes"].as_array().map(Vec::len) == Some(3), "{ra}");
    ensure!(w.ip_files()? == BTreeSet::from([a4, a6, b4, b6]));
    ensure!(w.host_veths()?.len() == 2);

    for (from, to) in [
        (&a.ns, b4),
        (&a.ns, b6),
        (&b.ns, a4),
        (&b.ns, a6),
        (&w.node, a4),
        (&w.node, b6),
    ] {
        ensure!(ping(from, to), "{} cannot ping {to}", from.name);
    }
    let _server = Server::start(&b.ns, 8080)?;
    for to in [b4, b6] {
        ensure!(
            tcp_ok(&a.ns, to, 8080, Duration::from_secs(2)),
            "TCP a -> {to}"
        );
    }

    for (pod, r) in [(&a, &ra), (&b, &rb)] {
        let mut checked = w.config();
        checked["prevResult"] = r.clone();
        w.verb("CHECK", &pod.id, &pod.path(), &checked)?
            .expect_silent_success()?;
        w.del_twice(pod, Some(r))?;
    }
    w.assert_clean()
}

#[test]
fn results_follow_the_negotiated_cni_version() -> Result<()> {
    let w = World::new(&[V4_RANGE, V6_RANGE])?;

    let pod = Pod::new()?;
    let mut conf = w.config();
    conf["cniVersion"] = json!("0.4.0");
    let r = w.add(&pod, &conf)?;
    ensure!(r["cniVersion"] == "0.4.0");
    ensure!(
        r["ips"][0]["version"] == "4" && r["ips"][1]["version"] == "6",
        "{r}"
    );
    ensure!(r["interfaces"][0].get("mtu").is_none());
    ensure!(
        r["routes"].as_array().map(Vec::len) == Some(2),
        "no scope-link route before 1.1.0: {r}"
    );
    let mut checked = conf.clone();
    checked["prevResult"] = r.clone();
    w.verb("CHECK", &pod.id, &pod.path(), &checked)?
        .expect_silent_success()?;
    w.del_twice(&pod, Some(&r))?;

    // 1.0.0, as the shipped conflist says (containerd 1.6/1.7): only what
    // a 1.0.0 parser knows, and the error objects in 1.0.0 too.
    let pod = Pod::new()?;
    let mut conf = w.config();
    conf["cniVersion"] = json!("1.0.0");
    conf["cniVersions"] = json!(["1.0.0", "1.1.0"]);
    let r = w.add(&pod, &conf)?;
    ensure!(r["cniVersion"] == "1.0.0", "{r}");
    let keys = |v: &Value| -> BTreeSet<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let allowed = |v: &Value, ok: &[&str]| keys(v).iter().all(|k| ok.contains(&k.as_str()));
    ensure!(
        allowed(&r, &["cniVersion", "interfaces", "ips", "routes", "dns"]),
        "{r}"
    );
    for (list, ok) in [
        ("interfaces", &["name", "mac", "sandbox"][..]),
        ("ips", &["address", "gateway", "interface"]),
        ("routes", &["dst", "gw"]),
    ] {
        for item in r[list].as_array().into_iter().flatten() {
            ensure!(allowed(item, ok), "{list}: {item}");
        }
    }
    ensure!(r["ips"].as_array().map(Vec::len) == Some(2), "{r}");
    let mut checked = conf.clone();
    checked["prevResult"] = r.clone();
    w.verb("CHECK", &pod.id, &pod.path(), &checked)?
        .expect_silent_success()?;
    let e = w
        .verb("ADD", &pod.id, &pod.path(), &conf)?
        .expect_error(999)?;
    ensure!(e["cniVersion"] == "1.0.0", "{e}");
    w.del_twice(&pod, Some(&r))?;

    // 1.1.0, as containerd 2.x and CRI-O pick from cniVersions.
    let pod = Pod::new()?;
    let mut conf = w.config();
    if let Some(o) = conf.as_object_mut() {
        o.remove("cniVersion");
    }
    conf["cniVersions"] = json!(["1.0.0", "1.1.0"]);
    let r = w.add(&pod, &conf)?;
    ensure!(r["cniVersion"] == "1.1.0", "{r}");
    ensure!(r["interfaces"][0]["mtu"].is_u64(), "{r}");
    ensure!(
        r["routes"].as_array().map(Vec::len) == Some(3),
        "scope-link route: {r}"
    );
    w.del_twice(&pod, Some(&r))?;

    // No cniVersion: the highest supported entry of cniVersions.
    let pod = Pod::new()?;
    let mut conf = w.config();
    if let Some(o) = conf.as_object_mut() {
        o.remove("cniVersion");
    }
    conf["cniVersions"] = json!(["0.3.1", "1.0.0", "0.4.0", "9.0.0"]);
    let r = w.add(&pod, &conf)?;
    ensure!(r["cniVersion"] == "1.0.0", "{r}");
    ensure!(r["ips"][0].get("version").is_none(), "{r}");
    w.del_twice(&pod, None)?;
    w.assert_clean()
}

#[test]
fn a_chained_prev_result_is_passed_through_and_extended() -> Result<()> {
    let w = World::new(&[V4_RANGE])?;
    let pod = Pod::new()?;
    let prev = json!({
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "net0", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/other"}],
        "ips": [{"address": "192.0.2.10/24", "gateway": "192.0.2.1", "interface": 0}],
        "routes": [{"dst": "198.51.100.0/24", "gw": "192.0.2.1"}],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}
    });
    let mut conf = w.config();
    conf["prevResult"] = prev.clone();
    let r = w.add(&pod, &conf)?;
    ensure!(r["interfaces"][0] == prev["interfaces"][0], "{r}");
    ensure!(r["interfaces"][2]["name"] == "eth0", "{r}");
    ensure!(r["ips"][0] == prev["ips"][0], "{r}");
    ensure!(
        r["ips"][1]["address"] == "10.244.1.1/32" && r["ips"][1]["interface"] == 2,
        "{r}"
    );
    ensure!(r["routes"][0] == prev["routes"][0], "{r}");
    ensure!(r["routes"].as_array().map(Vec::len) == Some(3), "{r}");
    ensure!(r["dns"] == prev["dns"], "{r}");
    ensure!(ping(&w.node, "10.244.1.1".parse()?));

    // CHECK with the chained result only checks what is ours.
    let mut checked = w.config();
    checked["prevResult"] = r.clone();
    w.verb("CHECK", &pod.id, &pod.path(), &checked)?
        .expect_silent_success()?;
    w.del_twice(&pod, Some(&r))?;
    w.assert_clean()
}

#[test]
fn invalid_input_yields_the_spec_error_codes() -> Result<()> {
    let w = World::new(&[V4_RANGE])?;
    let pod = Pod::new()?;
    let good = w.config();
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let netns = pod.path();
    // The environment of a good ADD with `key` set to `value` (None: unset).
    let env_with = |key: &str, value: Option<&str>| -> Vec<(String, String)> {
        let base = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ];
        base.iter()
            .filter(|(k, _)| *k != key)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain(value.map(|v| (key.to_string(), v.to_string())))
            .collect()
    };
    let run = |env: &[(String, String)], stdin: &str| -> Result<Plugin> {
        let pairs: Vec<(&str, &str)> = env.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        w.run(&pairs, stdin)
    };
    let good_s = good.to_string();

    // 1: versions we do not speak.
    run(
        &env_with("", None),
        &with("cniVersion", json!("0.3.1")).to_string(),
    )?
    .expect_error(1)?;
    let mut no_v = good.clone();
    if let Some(o) = no_v.as_object_mut() {
        o.remove("cniVersion");
    }
    no_v["cniVersions"] = json!(["0.2.0", "0.3.1"]);
    run(&env_with("", None), &no_v.to_string())?.expect_error(1)?;
    // STATUS and GC need 1.1.0.
    let v100 = with("cniVersion", json!("1.0.0")).to_string();
    run(&env_with("CNI_COMMAND", Some("STATUS")), &v100)?.expect_error(1)?;
    // 4: missing or bad environment variables, named in the message.
    for (k, v) in [
        ("CNI_COMMAND", Some("FROB")),
        ("CNI_COMMAND", Some("")),
        ("CNI_CONTAINERID", None),
        ("CNI_CONTAINERID", Some("-bad")),
        ("CNI_IFNAME", None),
        ("CNI_IFNAME", Some("this-is-far-too-long")),
        ("CNI_NETNS", None),
        ("CNI_NETNS", Some("relative/path")),
        ("CNI_NETNS", Some("/etc/passwd")),
        ("CNI_ARGS", Some("K8S_POD_NAME")),
    ] {
        let e = run(&env_with(k, v), &good_s)?.expect_error(4)?;
        ensure!(
            e["msg"]
                .as_str()
                .expect("an error object has a msg")
                .contains(k),
            "{k}: {e}"
        );
    }
    // No CNI_COMMAND at all is a user at a shell: usage, exit 2.
    let out = run(&env_with("CNI_COMMAND", None), &good_s)?;
    ensure!(
        out.code == 2 && out.stdout.is_empty() && out.stderr.contains("Usage: sluice"),
        "{} / {} / {}",
        out.code,
        out.stdout,
        out.stderr
    );
    // CNI_NETNS naming the node's own namespace would give the node away.
    let own = w.node.path().display().to_string();
    run(&env_with("CNI_NETNS", Some(&own)), &good_s)?.expect_error(4)?;
    // 3: the namespace is gone.
    run(
        &env_with("CNI_NETNS", Some("/run/netns/sluice-cni-no-such-ns")),
        &good_s,
    )?
    .expect_error(3)?;
    // 6: not JSON.
    for bad in ["{", "", "{\"cniVersion\": }"] {
        run(&env_with("", None), bad)?.expect_error(6)?;
    }
    // 7: JSON, but not a valid configuration.
    for bad in [
        with("ranges", json!([["10.244.1.0/33"]])),
        with("ranges", json!([["10.244.1.7/24"]])),
        with("ranges", json!([])),
        with("ranges", json!("10.244.1.0/24")),
        with("type", json!("bridge")),
        with("mtu", json!("big")),
        with("name", json!("../etc")),
    ] {
        let e = run(&env_with("", None), &bad.to_string())?.expect_error(7)?;
        ensure!(e["cniVersion"] == "1.1.0", "{e}");
    }
    // Errors are reported in the version of the request.
    let mut old = with("cniVersion", json!("0.4.0"));
    old["ranges"] = json!([]);
    let e = run(&env_with("", None), &old.to_string())?.expect_error(7)?;
    ensure!(e["cniVersion"] == "0.4.0", "{e}");

    // None of it left anything behind.
    w.assert_clean()?;
    ensure!(pod.ns.veths()?.is_empty());
    Ok(())
}

#[test]
fn an_agent_that_is_unreachable_not_ready_or_silent_fails_add_with_11_and_rolls_back() -> Result<()>
{
    let w = World::new(&[V4_RANGE, V6_RANGE])?;
    let cases: [(&str, Option<Mode>, Value); 3] = [
        (
            "unreachable",
            None,
            json!(w.data.0.join("nobody-listens.sock")),
        ),
        ("not ready", Some(Mode::NotReady), json!(w.agent.socket())),
        ("silent", Some(Mode::Silent), json!(w.agent.socket())),
    ];
    for (what, mode, socket) in cases {
        if let Some(m) = mode {
            w.agent.set_mode(m);
        }
        let pod = Pod::new()?;
        let mut conf = w.config();
        conf["agentSocket"] = socket;
        conf["agentTimeoutMs"] = json!(300);
        let started = Instant::now();
        let out = w.verb("ADD", &pod.id, &pod.path(), &conf)?;
        out.expect_error(11).with_context(|| what.to_string())?;
        ensure!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: took {:?}",
            started.elapsed()
        );
        // Rolled back: no veth on either side, no address reserved.
        ensure!(
            w.host_veths()?.is_empty(),
            "{what}: veths {:?}",
            w.host_veths()?
        );
        ensure!(
            pod.ns.veths()?.is_empty(),
            "{what}: pod veths {:?}",
            pod.ns.veths()?
        );
        ensure!(
            w.ip_files()?.is_empty(),
            "{what}: files {:?}",
            w.ip_files()?
        );
        // The runtime still sends DEL after a failed ADD; that must work.
        w.agent.set_mode(Mode::Ready);
        w.verb("DEL", &pod.id, &pod.path(), &w.config())?
            .expect_silent_success()?;
    }
    // A not-ready agent was asked to forget what it may have half-done.
    let reqs = w.agent.requests();
    ensure!(
        reqs.iter()
            .any(|r| matches!(r, Request::AddEndpoint { .. }))
    );
    w.assert_clean()
}

#[test]
fn del_succeeds_with_the_agent_unreachable_queues_the_removal_and_keeps_the_addresses() -> Result<()>
{
    let w = World::new(&[V4_RANGE])?;
    let pod = Pod::new()?;
    let r = w.add(&pod, &w.config())?;
    let ip = result_ip(&r, false)?;
    let entry = format!("{}@eth0.json", pod.id);
    let mut away = w.config();
    away["agentSocket"] = json!(w.data.0.join("nobody-listens.sock"));
    // containerd's pair of DELs, both while the agent is away: 0 each.
    w.verb("DEL", &pod.id, &pod.path(), &away)?
        .expect_silent_success()?;
    w.verb("DEL", &pod.id, "", &away)?.expect_silent_success()?;
    // Disconnected already, but the address stays reserved until the agent
    // has forgotten the endpoint; the removal waits in the queue.
    ensure!(w.host_veths()?.is_empty());
    ensure!(pod.ns.veths()?.is_empty());
    let queued = w.held_in_queue(ip, &entry)?;
    ensure!(
        queued["attachment"] == json!({"container_id": pod.id, "ifname": "eth0"})
            && queued["ips"] == json!([ip.to_string()])
            && queued["network"] == NETWORK
            && queued["pod_name"] == "web-0",
        "{queued}"
    );
    // An ADD meanwhile does not get the held address.
    let other = Pod::new()?;
    let ro = w.add(&other, &w.config())?;
    ensure!(result_ip(&ro, false)? != ip);
    w.del_twice(&other, Some(&ro))?;

    // A later DEL that reaches the agent finishes it: forgotten, released,
    // dequeued.
    w.del_twice(&pod, None)?;
    w.assert_clean()
}

#[test]
fn addresses_of_a_removal_the_agent_finished_are_released_by_the_next_run() -> Result<()> {
    let w = World::new(&[V4_RANGE])?;
    let pod = Pod::new()?;
    let r = w.add(&pod, &w.config())?;
    let ip = result_ip(&r, false)?;
    let mut away = w.config();
    away["agentSocket"] = json!(w.data.0.join("nobody-listens.sock"));
    w.verb("DEL", &pod.id, &pod.path(), &away)?
        .expect_silent_success()?;
    // What the agent does when it drains the queue: forget, then mark done.
    // (The real agent does it in tests/tests/cni_queue.rs.)
    w.agent
        .state
        .lock()
        .expect("a fake agent handler panicked")
        .endpoints
        .remove(&pod.attachment());
    let base = w.queue_dir().join(format!("{}@eth0", pod.id));
    std::fs::rename(base.with_extension("json"), base.with_extension("done"))?;
    ensure!(w.ip_files()? == BTreeSet::from([ip]));
    // Any ADD, DEL or GC of the network releases it.
    let other = Pod::new()?;
    let ro = w.add(&other, &w.config())?;
    ensure!(!w.ip_files()?.contains(&ip), "{:?}", w.ip_files()?);
    ensure!(w.queued()?.is_empty(), "{:?}", w.queued()?);
    w.del_twice(&other, Some(&ro))?;
    w.assert_clean()
}

/// The host end's index and whether it is administratively up, or `None`
/// when there is no such link.
fn host_link(w: &World, name: &str) -> Result<Option<(u64, bool)>> {
    if !w.host_veths()?.iter().any(|v| v == name) {
        return Ok(None);
    }
    let l = link_json(&w.node, name)?;
    let up = l["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f == "UP"));
    Ok(Some((l["ifindex"].as_u64().context("ifindex")?, up)))
}

#[test]
fn a_deferred_del_disconnects_the_pod_at_once_and_holds_its_address_until_the_veth_is_gone()
-> Result<()> {
    let w = World::new(&[V4_RANGE])?;
    w.agent.set_defer_removals(true);
    let pod = Pod::new()?;
    let r = w.add(&pod, &w.config())?;
    let ip = result_ip(&r, false)?;
    let host = host_ifname(&r)?;
    let node_ip: IpAddr = NODE_V4.parse()?;
    ensure!(
        ping(&w.node, ip) && ping(&pod.ns, node_ip),
        "reachable before DEL"
    );

    // The agent takes the veth's deletion: DEL answers with the veth still
    // there, down, and nothing passes either way.
    w.verb("DEL", &pod.id, &pod.path(), &w.config())?
        .expect_silent_success()?;
    let (index, up) = host_link(&w, &host)?.context("the veth is the agent's to delete")?;
    ensure!(!up, "{host} still up after DEL");
    ensure!(!ping(&w.node, ip), "the node still reaches the pod");
    ensure!(!ping(&pod.ns, node_ip), "the pod still reaches the node");
    // Held: the address, in a pending entry that names this veth.
    let entry = format!("{}@eth0.json", pod.id);
    let queued = w.held_in_queue(ip, &entry)?;
    ensure!(
        queued["host_ifindex"] == json!(index) && queued["ips"] == json!([ip.to_string()]),
        "{queued}"
    );
    ensure!(w.agent.endpoints().is_empty(), "the endpoint is forgotten");
    // containerd's second DEL changes nothing; an ADD meanwhile gets
    // another address, and does not release the held one.
    w.verb("DEL", &pod.id, "", &w.config())?
        .expect_silent_success()?;
    ensure!(host_link(&w, &host)? == Some((index, false)));
    w.agent.set_defer_removals(false);
    let other = Pod::new()?;
    let ro = w.add(&other, &w.config())?;
    ensure!(result_ip(&ro, false)? != ip);
    w.del_twice(&other, Some(&ro))?;
    ensure!(w.ip_files()? == BTreeSet::from([ip]), "{:?}", w.ip_files()?);

    // What the agent does after answering: delete the veth, mark it done.
    w.node.ip(&["link", "del", &host])?;
    let base = w.queue_dir().join(format!("{}@eth0", pod.id));
    std::fs::rename(base.with_extension("json"), base.with_extension("done"))?;
    ensure!(
        w.ip_files()? == BTreeSet::from([ip]),
        "released only by a run"
    );
    w.verb("DEL", "ctrnothing", "", &w.config())?
        .expect_silent_success()?;
    w.assert_clean()
}

#[test]
fn add_of_an_attachment_whose_veth_deletion_is_pending_deletes_it_first_and_works() -> Result<()> {
    let w = World::new(&[V4_RANGE])?;
    w.agent.set_defer_removals(true);
    let pod = Pod::new()?;
    let r = w.add(&pod, &w.config())?;
    let host = host_ifname(&r)?;
    w.verb("DEL", &pod.id, &pod.path(), &w.config())?
        .expect_silent_success()?;
    let (old, _) = host_link(&w, &host)?.context("pending veth")?;
    // The runtime sets the same attachment up again (same container,
    // ifname and namespace, whose eth0 is still the old veth's end).
    let again = w.add(&pod, &w.config())?;
    let (new, up) = host_link(&w, &host)?.context("no veth after ADD")?;
    ensure!(new != old && up, "old {old}, new {new} up {up}");
    ensure!(
        ping(&w.node, result_ip(&again, false)?),
        "the new pod is reachable"
    );
    ensure!(w.queued()?.is_empty(), "{:?}", w.queued()?);
    ensure!(
        w.ip_files()? == BTreeSet::from([result_ip(&again, false)?]),
        "the old address is released: {:?}",
        w.ip_files()?
    );
    w.agent.set_defer_removals(false);
    w.del_twice(&pod, Some(&again))?;
    w.assert_clean()
}

#[test]
fn status_is_silent_when_the_agent_is_ready_and_50_otherwise() -> Result<()> {
    let w = World::new(&[V4_RANGE])?;
    let status = |conf: &Value| {
        w.run(
            &[("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/opt/cni/bin")],
            &conf.to_string(),
        )
    };
    status(&w.config())?.expect_silent_success()?;
    ensure!(w.agent.requests() == [Request::Status]);
    w.agent.set_mode(Mode::NotReady);
    let e = status(&w.config())?.expect_error(50)?;
    ensure!(
        e["msg"]
            .as_str()
            .expect("an error object has a msg")
            .contains("not ready"),
        "{e}"
    );
    let mut away = w.config();
    away["agentSocket"] = json!(w.data.0.join("nobody-listens.sock"));
    w.agent.set_mode(Mode::Ready);
    status(&away)?.expect_error(50)?;
    Ok(())
}

#[test]
fn check_reports_drift_agent_errors_and_gone_containers() -> Result<()> {
    let w = World::new(&[V4_RANGE, V6_RANGE])?;
    let pod = Pod::new()?;
    let r = w.add(&pod, &w.config())?;
    let mut checked = w.config();
    checked["prevResult"] = r.clone();
    let check = |c: &Value| w.verb("CHECK", &pod.id, &pod.path(), c);
    check(&checked)?.expect_silent_success()?;

    // CHECK without prevResult is a configuration error.
    check(&w.config())?.expect_error(7)?;

    // The agent lost the programs: its code comes through.
    w.agent.set_mode(Mode::CheckFails(101));
    let e = check(&checked)?.expect_error(101)?;
    ensure!(
        e["msg"]
            .as_str()
            .expect("an error object has a msg")
            .contains("programs detached"),
        "{e}"
    );
    w.agent.set_mode(Mode::Ready);
    check(&checked)?.expect_silent_success()?;

    // Someone deleted the pod's default route.
    pod.ns.ip(&["-4", "route", "del", "default"])?;
    let e = check(&checked)?.expect_error(101)?;
    ensure!(
        e["msg"]
            .as_str()
            .expect("an error object has a msg")
            .contains("0.0.0.0/0"),
        "{e}"
    );
    pod.ns.ip(&[
        "-4",
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ])?;
    check(&checked)?.expect_silent_success()?;

    // Someone deleted a host route.
    let host = host_ifname(&r)?;
    let ip6 = result_ip(&r, true)?.to_string();
    w.node.ip(&["-6", "route", "del", &ip6, "dev", &host])?;
    check(&checked)?.expect_error(101)?;

    // The container is gone: 3 (and DEL still succeeds).
    let path = pod.path();
    let id = pod.id.clone();
    drop(pod);
    w.verb("CHECK", &id, &path, &checked)?.expect_error(3)?;
    w.verb("DEL", &id, &path, &checked)?
        .expect_silent_success()?;
    w.verb("DEL", &id, "", &w.config())?
        .expect_silent_success()?;
    w.assert_clean()
}

#[test]
fn add_refuses_an_interface_name_already_taken_in_the_pod_and_rolls_back() -> Result<()> {
    let w = World::new(&[V4_RANGE])?;
    let pod = Pod::new()?;
    pod.ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
    ])?;
    let out = w.verb("ADD", &pod.id, &pod.path(), &w.config())?;
    ensure!(out.code != 0, "ADD over an existing eth0 succeeded");
    ensure!(
        out.json()?["msg"]
            .as_str()
            .expect("an error object has a msg")
            .contains("eth0"),
        "{}",
        out.stdout
    );
    ensure!(w.host_veths()?.is_empty() && w.ip_files()?.is_empty());
    ensure!(
        pod.ns.veths()?.len() == 2,
        "the pod's own eth0 must survive"
    );
    w.verb("DEL", &pod.id, "", &w.config())?
        .expect_silent_success()?;
    w.assert_clean()
}

#[test]
fn gc_releases_every_attachment_not_in_the_valid_list() -> Result<()> {
    let w = World::new(&[V4_RANGE, V6_RANGE])?;
    let (keep, stale) = (Pod::new()?, Pod::new()?);
    let rk = w.add(&keep, &w.config())?;
    let rs = w.add(&stale, &w.config())?;
    let keep_host = host_ifname(&rk)?;
    let gc = |conf: &Value| {
        w.run(
            &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
            &conf.to_string(),
        )
    };

    // Without the list GC would release everything: refused.
    gc(&w.config())?.expect_error(7)?;
    ensure!(w.ip_files()?.len() == 4);

    let mut conf = w.config();
    conf["cni.dev/valid-attachments"] = json!([{"containerID": keep.id, "ifname": "eth0"}]);
    gc(&conf)?.expect_silent_success()?;
    ensure!(
        w.ip_files()? == BTreeSet::from([result_ip(&rk, false)?, result_ip(&rk, true)?]),
        "{:?}",
        w.ip_files()?
    );
    ensure!(
        w.host_veths()? == [keep_host.as_str()],
        "{:?}",
        w.host_veths()?
    );
    ensure!(stale.ns.veths()?.is_empty());
    ensure!(w.agent.endpoints().keys().cloned().collect::<Vec<_>>() == [keep.attachment()]);
    ensure!(w.agent.requests().contains(&Request::Gc {
        valid: vec![keep.attachment()]
    }));
    ensure!(
        ping(&w.node, result_ip(&rk, false)?),
        "GC broke the valid pod"
    );
    ensure!(result_ip(&rs, false)? != result_ip(&rk, false)?);

    w.del_twice(&keep, Some(&rk))?;
    // DEL of the collected attachment is still fine.
    w.verb("DEL", &stale.id, "", &w.config())?
        .expect_silent_success()?;
    w.assert_clean()
}

#[test]
fn fifty_parallel_adds_get_fifty_distinct_addresses_and_fifty_working_pods() -> Result<()> {
    const N: usize = 50;
    let w = Arc::new(World::new(&[V4_RANGE, V6_RANGE])?);
    let pods: Vec<Arc<Pod>> = (0..N)
        .map(|_| Pod::new().map(Arc::new))
        .collect::<Result<_>>()?;

    let handles: Vec<JoinHandle<Result<Value>>> = pods
        .iter()
        .map(|p| {
            let (w, p) = (w.clone(), p.clone());
            std::thread::spawn(move || w.add(&p, &w.config()))
        })
        .collect();
    let mut results = Vec::new();
    for h in handles {
        results.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("ADD thread panicked"))??,
        );
    }

    let v4: BTreeSet<IpAddr> = results
        .iter()
        .map(|r| result_ip(r, false))
        .collect::<Result<_>>()?;
    let v6: BTreeSet<IpAddr> = results
        .iter()
        .map(|r| result_ip(r, true))
        .collect::<Result<_>>()?;
    ensure!(
        v4.len() == N && v6.len() == N,
        "{} v4 / {} v6 distinct addresses",
        v4.len(),
        v6.len()
    );
    ensure!(w.ip_files()?.len() == 2 * N);
    ensure!(w.host_veths()?.len() == N);
    ensure!(w.agent.endpoints().len() == N);
    for ip in v4.iter().chain(&v6) {
        ensure!(ping(&w.node, *ip), "pod {ip} does not answer");
    }
    // And pods reach each other, not only the node.
    ensure!(ping(&pods[0].ns, result_ip(&results[N - 1], false)?));
    ensure!(ping(&pods[N - 1].ns, result_ip(&results[0], true)?));

    let handles: Vec<JoinHandle<Result<()>>> = pods
        .iter()
        .map(|p| {
            let (w, p) = (w.clone(), p.clone());
            std::thread::spawn(move || {
                w.verb("DEL", &p.id, &p.path(), &w.config())?
                    .expect_silent_success()
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("DEL thread panicked"))??;
    }
    w.assert_clean()
}

#[test]
fn without_ranges_add_takes_the_nodes_pod_cidrs_from_the_agent() -> Result<()> {
    let w = World::new(&[])?;
    ensure!(w.config().get("ranges").is_none());
    w.agent.set_pod_cidrs(Some(&[V4_RANGE, V6_RANGE]));
    let pod = Pod::new()?;
    let r = w.add(&pod, &w.config())?;
    ensure!(
        r["ips"][0]["address"] == "10.244.1.1/32"
            && r["ips"][1]["address"] == "fd00:10:244:1::1/128",
        "{r}"
    );
    ensure!(
        addrs(&pod.ns, "eth0")? == ["10.244.1.1/32", "fd00:10:244:1::1/128"],
        "{:?}",
        addrs(&pod.ns, "eth0")?
    );
    ensure!(ping(&w.node, "10.244.1.1".parse()?));
    ensure!(ping(&w.node, "fd00:10:244:1::1".parse()?));
    // Asked first, once.
    let reqs = w.agent.requests();
    ensure!(reqs.first() == Some(&Request::PodCidrs), "{reqs:?}");
    ensure!(
        reqs.iter().filter(|q| **q == Request::PodCidrs).count() == 1,
        "{reqs:?}"
    );

    // CHECK and DEL do not need the ranges: they work while the agent has
    // forgotten the podCIDRs.
    w.agent.set_pod_cidrs(None);
    let mut checked = w.config();
    checked["prevResult"] = r.clone();
    w.verb("CHECK", &pod.id, &pod.path(), &checked)?
        .expect_silent_success()?;
    w.del_twice(&pod, Some(&r))?;
    w.assert_clean()?;

    // An IPv4-only Node: an IPv4-only pod.
    w.agent.set_pod_cidrs(Some(&["10.244.7.0/24"]));
    let pod = Pod::new()?;
    let r = w.add(&pod, &w.config())?;
    ensure!(
        r["ips"] == json!([{"address": "10.244.7.1/32", "gateway": "169.254.1.1", "interface": 1}]),
        "{r}"
    );
    ensure!(addrs(&pod.ns, "eth0")? == ["10.244.7.1/32"]);
    w.del_twice(&pod, Some(&r))?;
    w.assert_clean()
}

#[test]
fn without_ranges_and_without_usable_pod_cidrs_add_fails_7_or_11_and_leaves_nothing() -> Result<()>
{
    struct Case<'a> {
        what: &'a str,
        cidrs: Option<&'a [&'a str]>,
        mode: Mode,
        reachable: bool,
        extra: Value,
        code: u64,
        msg: &'a str,
    }
    let w = World::new(&[])?;
    const NONE: &str = "no ranges configured and the agent knows no podCIDRs";
    let case = |what, cidrs, code, msg| Case {
        what,
        cidrs,
        mode: Mode::Ready,
        reachable: true,
        extra: json!({}),
        code,
        msg,
    };
    let cases = [
        case("empty answer", Some(&[]), 7, NONE),
        case("agent error", None, 7, "not in cluster mode"),
        Case {
            mode: Mode::NotReady,
            ..case("not ready", Some(&[V4_RANGE]), 7, NONE)
        },
        case(
            "two IPv4 CIDRs",
            Some(&[V4_RANGE, "10.244.2.0/24"]),
            7,
            "podCIDRs",
        ),
        case("host bits", Some(&["10.244.1.9/24"]), 7, "host bits"),
        Case {
            extra: json!({"mtu": 1000}),
            ..case("mtu too small for IPv6", Some(&[V6_RANGE]), 7, "mtu")
        },
        Case {
            reachable: false,
            ..case("unreachable", Some(&[V4_RANGE]), 11, "not available")
        },
        Case {
            mode: Mode::Silent,
            ..case("silent", Some(&[V4_RANGE]), 11, "not available")
        },
        Case {
            extra: json!({"ranges": []}),
            ..case("explicitly empty", Some(&[V4_RANGE]), 7, "ranges is empty")
        },
    ];
    for c in cases {
        let what = c.what;
        w.agent.set_pod_cidrs(c.cidrs);
        w.agent.set_mode(c.mode);
        let pod = Pod::new()?;
        let mut conf = w.config();
        if !c.reachable {
            conf["agentSocket"] = json!(w.data.0.join("nobody-listens.sock"));
        }
        conf["agentTimeoutMs"] = json!(300);
        for (k, v) in c.extra.as_object().into_iter().flatten() {
            conf[k] = v.clone();
        }
        let before = w.agent.requests().len();
        let e = w
            .verb("ADD", &pod.id, &pod.path(), &conf)?
            .expect_error(c.code)
            .with_context(|| what.to_string())?;
        ensure!(
            e["msg"]
                .as_str()
                .expect("an error object has a msg")
                .contains(c.msg),
            "{what}: {e}"
        );
        let asked = w.agent.requests().split_off(before);
        // Configured ranges are not asked for; the unreachable agent is
        // another socket.
        let want: &[Request] = match what {
            "explicitly empty" | "unreachable" => &[],
            _ => &[Request::PodCidrs],
        };
        ensure!(asked == want, "{what}: asked {asked:?}");
        w.agent.set_mode(Mode::Ready);
        ensure!(
            w.host_veths()?.is_empty(),
            "{what}: veths {:?}",
            w.host_veths()?
        );
        ensure!(pod.ns.veths()?.is_empty(), "{what}: pod veths");
        ensure!(
            w.ip_files()?.is_empty(),
            "{what}: files {:?}",
            w.ip_files()?
        );
        w.verb("DEL", &pod.id, &pod.path(), &w.config())?
            .expect_silent_success()
            .with_context(|| what.to_string())?;
    }
    w.assert_clean()
}

#[test]
fn the_fake_agent_speaks_the_protocol() -> Result<()> {
    // Guards the other tests' assumptions about the fake itself.
    let agent = FakeAgent::start()?;
    let mut s = UnixStream::connect(agent.socket())?;
    s.write_all(Request::Status.to_line()?.as_bytes())?;
    let mut line = String::new();
    s.read_to_string(&mut line)?;
    ensure!(serde_json::from_str::<Response>(line.trim_end())? == Response::Ok);
    ensure!(Path::new(&agent.socket()).exists());
    Ok(())
}

/// What containerd and CRI-O pass that the other tests do not: the full
/// CNI_ARGS, a netns under /var/run/netns/cni-<uuid>, `runtimeConfig` and
/// `capabilities` (the plugin declares none: ignored, and said so), a
/// prevResult on DEL, and DEL after the runtime removed the netns.
#[test]
fn what_a_container_runtime_passes_is_handled_or_explicitly_ignored() -> Result<()> {
    let w = World::new(&[V4_RANGE, V6_RANGE])?;
    // containerd names sandboxes' namespaces cni-<uuid> and passes the
    // path under /var/run (a symlink to /run).
    let ns = NetNs::new("cni-")?;
    let netns = format!("/var/run/netns/{}", ns.name);
    let id = format!("ctr{}", unique("").replace('-', "x"));
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-5d78c9869d-x7x2q;\
         K8S_POD_INFRA_CONTAINER_ID={id};K8S_POD_UID=0c9d8a3e-7f61-4a0b-9d1e-2b3c4d5e6f70"
    );
    let env = |verb: &'static str, netns: &str| -> Vec<(String, String)> {
        [
            ("CNI_COMMAND", verb),
            ("CNI_CONTAINERID", &id),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", &args),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };
    let run = |verb: &'static str, netns: &str, conf: &Value| {
        let e = env(verb, netns);
        let refs: Vec<(&str, &str)> = e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        w.run(&refs, &conf.to_string())
    };
    let mut conf = w.config();
    conf["cniVersion"] = json!("1.0.0");
    conf["runtimeConfig"] = json!({
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 1000000, "ingressBurst": 100000},
    });
    conf["capabilities"] = json!({"portMappings": true});

    let out = run("ADD", &netns, &conf)?;
    ensure!(out.code == 0, "ADD: {} / {}", out.stdout, out.stderr);
    ensure!(
        out.stderr.contains(
            "ignoring runtimeConfig.bandwidth, runtimeConfig.portMappings, capabilities.portMappings"
        ),
        "{}",
        out.stderr
    );
    let r = out.json()?;
    ensure!(r["interfaces"][1]["sandbox"] == netns.as_str(), "{r}");
    // The pod's identity reached the agent; the sandbox id and UID did not
    // change the attachment.
    let eps = w.agent.endpoints();
    let spec = eps
        .get(&Attachment {
            container_id: id.clone(),
            ifname: "eth0".into(),
        })
        .context("endpoint registered")?;
    ensure!(
        spec.pod_namespace.as_deref() == Some("kube-system")
            && spec.pod_name.as_deref() == Some("coredns-5d78c9869d-x7x2q")
            && spec.netns == netns,
        "{spec:?}"
    );
    ensure!(ping(&ns, NODE_V4.parse()?), "the pod reaches the node");

    // CHECK and DEL with the cached result as prevResult (as containerd
    // sends them), the runtimeConfig still there.
    conf["prevResult"] = r;
    run("CHECK", &netns, &conf)?.expect_silent_success()?;
    // The runtime removed the namespace before DEL (a stopped sandbox):
    // the veth went with it, DEL still succeeds and releases everything.
    drop(ns);
    run("DEL", &netns, &conf)?.expect_silent_success()?;
    run("DEL", "", &w.config())?.expect_silent_success()?;
    w.assert_clean()
}
