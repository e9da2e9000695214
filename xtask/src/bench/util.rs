//! What the kernel benches share: the header (machine, versions), release
//! statistics, processes stopped on drop, a plugin exec'd as a
//! runtime execs it, and the two-pod topologies of `throughput` and `rules`.
//!
//! Every namespace, bpffs mount and directory made here belongs to a guard
//! from `sluice_tests` (or is inside one), so it is removed on failure too.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use sluice_proto::{Request, Response};
use sluice_tests::{NetNs, Node, Pod, TempDir, conflist_config};

pub const SHARED_NOTE: &str = "NOTE: a shared machine (other work runs on the same cores): \
figures are noisy; runs alternate and medians are shown.";

/// Prints the title, the machine (cores, CPU, kernel), the versions of
/// Sluice and of `packages`, and the shared-machine note.
pub fn header(title: &str, packages: &[&str]) {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = sluice_tests::sh("uname", &["-r"]).unwrap_or_default();
    println!("== {title} ==");
    println!("machine: {cores} cores ({cpu}), kernel {}", kernel.trim());
    let rev = sluice_tests::sh("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_default();
    let dirty = sluice_tests::sh("git", &["status", "--porcelain", "--untracked-files=no"])
        .map(|s| {
            if s.trim().is_empty() {
                ""
            } else {
                "+local changes"
            }
        })
        .unwrap_or_default();
    let mut versions = vec![format!(
        "sluice {} (git {}{dirty}, release build)",
        env!("CARGO_PKG_VERSION"),
        rev.trim()
    )];
    for p in packages {
        let v = sluice_tests::sh("dpkg-query", &["-W", "-f=${Version}", p])
            .unwrap_or_else(|_| "not installed".into());
        versions.push(format!("{p} {v}"));
    }
    println!("versions: {}", versions.join(", "));
    println!("{SHARED_NOTE}");
    println!();
}

/// Nearest-rank percentile (`p` in 0..=100) of unsorted samples; NaN if none.
pub fn pct(samples: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub fn median(samples: &[f64]) -> f64 {
    pct(samples, 50.0)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// "met" / "NOT met" for a target line.
pub fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// A child process killed (by its own pid) and reaped on drop.
pub struct Proc(Child);

impl Proc {
    /// `program args` inside `ns`, output discarded.
    pub fn spawn_in(ns: &NetNs, program: &str, args: &[&str]) -> Result<Self> {
        let child = ns
            .command(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {program}"))?;
        Ok(Self(child))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ignored = self.0.kill();
        let _ignored = self.0.wait();
    }
}

/// `program args` inside `ns`; its stdout, or an error with its stderr.
pub fn output_in(ns: &NetNs, program: &str, args: &[&str]) -> Result<String> {
    let out = ns.command(program).args(args).output()?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until something listens on TCP `port` in `ns`.
pub fn wait_listening(ns: &NetNs, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = output_in(ns, "ss", &["-Hltn", &format!("sport = :{port}")])?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on {port} in {}", ns.name)
}

/// Runs `program` as a container runtime runs a CNI plugin: exec'd directly
/// in the namespace at `netns_path` (from a thread that entered it, no
/// `ip netns exec`), with exactly `env` and `stdin`. Returns the output and
/// the wall time from spawn to exit.
pub fn exec_plugin(
    netns_path: &Path,
    program: &Path,
    env: &[(String, String)],
    stdin: &str,
) -> Result<(Output, Duration)> {
    let (path, program, env, stdin) = (
        netns_path.to_owned(),
        program.to_owned(),
        env.to_vec(),
        stdin.to_owned(),
    );
    std::thread::spawn(move || -> Result<(Output, Duration)> {
        sluice_tests::enter(&path)?;
        let t0 = Instant::now();
        let mut child = Command::new(&program)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", program.display()))?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        Ok((out, t0.elapsed()))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("plugin thread panicked"))?
}

/// The CNI environment of one call.
pub fn cni_env(cmd: &str, id: &str, netns: &Path, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = vec![
        ("CNI_COMMAND".to_owned(), cmd.to_owned()),
        ("CNI_CONTAINERID".to_owned(), id.to_owned()),
        ("CNI_NETNS".to_owned(), netns.to_string_lossy().into_owned()),
        ("CNI_IFNAME".to_owned(), "eth0".to_owned()),
        ("CNI_PATH".to_owned(), REFERENCE_PLUGINS.to_owned()),
    ];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    env
}

/// Debian's containernetworking-plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The reference `bridge` plugin's config: one bridge, the gateway on it,
/// no masquerading, `host-local` IPAM keeping its state in `data_dir`.
pub fn bridge_config(subnet: &str, data_dir: &Path) -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": "bench-bridge",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipMasq": false,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": data_dir},
    })
    .to_string()
}

/// The first IPv4 address of a CNI result.
pub fn result_ipv4(result: &Value) -> Option<IpAddr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let addr: ipnetwork::IpNetwork = ip["address"].as_str()?.parse().ok()?;
        addr.ip().is_ipv4().then(|| addr.ip())
    })
}

/// Which data path a two-pod topology has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The plugin's routed veth layout with the programs detached.
    Bare,
    /// Sluice, no policy selecting either pod.
    Sluice,
    /// Sluice, both pods isolated (server ingress, client egress), allows in force.
    Policy,
    /// The reference bridge plugin with host-local.
    Bridge,
}

impl Kind {
    /// For table columns.
    pub fn short(self) -> &'static str {
        match self {
            Kind::Bare => "(a) bare veth",
            Kind::Sluice => "(b) sluice",
            Kind::Policy => "(c) sluice+policy",
            Kind::Bridge => "(d) bridge",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Bare => "(a) veth, no program",
            Kind::Sluice => "(b) sluice, no policy",
            Kind::Policy => "(c) sluice, deny + allow",
            Kind::Bridge => "(d) bridge + host-local",
        }
    }
}

/// Two pods (client, server) on one simulated node.
pub struct Pair {
    pub client: NetNs,
    pub server: NetNs,
    pub client_ip: IpAddr,
    pub server_ip: IpAddr,
    /// The host end of the server's veth in the node namespace.
    pub server_host_if: String,
    /// Sluice kinds: the node (agent killed for `Bare`).
    pub node: Option<Node>,
    /// Sluice kinds: the pods' attachments (client, server).
    pub attachments: Option<(sluice_proto::Attachment, sluice_proto::Attachment)>,
    /// `Bridge`: the node namespace and the IPAM state.
    bridge_node: Option<(NetNs, TempDir)>,
}

impl Pair {
    pub fn new(kind: Kind) -> Result<Self> {
        if kind == Kind::Bridge {
            return Self::bridge();
        }
        let mut node = Node::new()?;
        node.start_agent()?;
        let config = conflist_config(&node, Some("10.77.0.0/24"), None);
        let client = Pod::add(&node, &config)?;
        let server = Pod::add(&node, &config)?;
        let (client_ip, server_ip) = (
            client.ipv4.context("client address")?,
            server.ipv4.context("server address")?,
        );
        let attachments = (client.attachment(), server.attachment());
        if kind == Kind::Bare {
            detach(&mut node)?;
        }
        Ok(Self {
            client: client.ns,
            server: server.ns,
            client_ip,
            server_ip,
            server_host_if: server.host_ifname,
            node: Some(node),
            attachments: Some(attachments),
            bridge_node: None,
        })
    }

    fn bridge() -> Result<Self> {
        let node_ns = NetNs::new("sl-brnode")?;
        let state = TempDir::new("sluice-bench-bridge-")?;
        let config = bridge_config("10.78.0.0/24", &state.0);
        let plugin = PathBuf::from(REFERENCE_PLUGINS).join("bridge");
        let mut pods = Vec::new();
        for _ in 0..2 {
            let ns = NetNs::new("sl-brpod")?;
            let id = format!("br{}", sluice_tests::unique("").replace('-', ""));
            let (out, _) = exec_plugin(
                &node_ns.path(),
                &plugin,
                &cni_env("ADD", &id, &ns.path(), &[]),
                &config,
            )?;
            if !out.status.success() {
                bail!("bridge ADD: {}", String::from_utf8_lossy(&out.stdout));
            }
            let result: Value = serde_json::from_slice(&out.stdout)?;
            pods.push((
                ns,
                result_ipv4(&result).context("bridge result has no IPv4")?,
            ));
        }
        let (server, server_ip) = pods.pop().context("server")?;
        let (client, client_ip) = pods.pop().context("client")?;
        Ok(Self {
            client,
            server,
            client_ip,
            server_ip,
            server_host_if: String::new(),
            node: None,
            attachments: None,
            bridge_node: Some((node_ns, state)),
        })
    }

    /// The node namespace.
    pub fn node_ns(&self) -> Option<&NetNs> {
        self.node
            .as_ref()
            .map(|n| &n.ns)
            .or(self.bridge_node.as_ref().map(|(ns, _)| ns))
    }

    /// Sluice's identity of `ip` (from the pinned ipcache).
    pub fn identity_of(&self, ip: IpAddr) -> Result<u32> {
        let node = self.node.as_ref().context("not a Sluice node")?;
        Ok(node
            .maps()?
            .ipcache_get(ip)
            .context("address not in the ipcache")?
            .identity)
    }

    /// SetPolicy for the client (`server == false`) or the server pod.
    pub fn set_policy(&self, server: bool, policy: Value) -> Result<()> {
        let node = self.node.as_ref().context("not a Sluice node")?;
        let (c, s) = self.attachments.clone().context("no attachments")?;
        let attachment = if server { s } else { c };
        match node.request(&Request::SetPolicy { attachment, policy })? {
            Response::Ok => Ok(()),
            other => bail!("policy refused: {other:?}"),
        }
    }
}

/// Kills the agent and unpins the TCX links: the veths stay exactly as the
/// plugin built them, with no program attached. Checked with bpftool.
fn detach(node: &mut Node) -> Result<()> {
    node.kill_agent()?;
    let links = node.bpffs.dir.join("links");
    for entry in std::fs::read_dir(&links).with_context(|| format!("{}", links.display()))? {
        std::fs::remove_file(entry?.path())?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let shown = output_in(&node.ns, "bpftool", &["net", "show"])?;
        if !shown.contains("tcx") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("programs still attached after unpinning: {shown}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A rule of the agent's `EndpointPolicy` allowing TCP `port` to or from
/// `identity`.
pub fn allow_tcp(dir: u8, identity: u32, port: u16, rule_id: u32) -> Value {
    json!({"dir": dir, "identity": identity,
           "l4": {"ports": {"proto": sluice_common::proto::TCP, "first": port, "last": port}},
           "rule_id": rule_id})
}

/// A TCP server in `ns`: accepts, optionally echoes one byte, and drops the
/// connection once the client closes. One connection at a time (the
/// clients here are sequential). Stopped on drop.
pub struct Acceptor {
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Acceptor {
    pub fn start(ns: &NetNs, port: u16, echo: bool) -> Result<Self> {
        let listener = ns.run(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            s.listen(1024)?;
            Ok::<TcpListener, std::io::Error>(s.into())
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let (s, l) = (stop.clone(), listener.try_clone()?);
        // A blocking accept: no polling delay in the measured path. Drop
        // wakes it by shutting the listener down.
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                if echo {
                    let _ignored = c.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut b = [0u8; 1];
                    if c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() {
                        // Until the client's RST or FIN.
                        let _ignored = c.read(&mut b);
                    }
                }
            }
        });
        Ok(Self {
            listener,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // On Linux this makes a blocked accept() return (EINVAL).
        let _ignored = socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ignored = t.join();
        }
    }
}

/// One new connection: connect (timed), optionally one byte each way, then
/// close with RST (SO_LINGER 0, so no TIME_WAIT piles up on the client).
/// `None` if it did not complete within `timeout`.
pub fn connect_once(to: SocketAddr, echo: bool, timeout: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let s = TcpStream::connect_timeout(&to, timeout).ok()?;
    let connected = t0.elapsed();
    let _ignored = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    if echo {
        let mut s = s;
        let _ignored = s.set_read_timeout(Some(timeout));
        let mut b = [7u8; 1];
        s.write_all(&b).ok()?;
        s.read_exact(&mut b).ok()?;
    }
    Some(connected)
}

/// Writes `rows` (the first one is the header) as CSV to
/// `bench-results/<name>`; returns the path.
pub fn write_csv(name: &str, rows: &[Vec<String>]) -> Result<PathBuf> {
    let dir = results_dir()?;
    let path = dir.join(name);
    let text: String = rows.iter().map(|r| r.join(",") + "\n").collect();
    std::fs::write(&path, text)?;
    Ok(path)
}

/// `bench-results/` at the repository root, ignored by git through a
/// .gitignore of its own (written here).
pub fn results_dir() -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-results");
    std::fs::create_dir_all(&dir)?;
    let ignore = dir.join(".gitignore");
    if !ignore.exists() {
        std::fs::write(
            &ignore,
            "# Written by cargo xtask bench: results stay out of git.\n*\n",
        )?;
    }
    Ok(dir.canonicalize()?)
}
