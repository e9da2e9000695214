//! Test harness: every test makes its own namespaces, bpffs mount and state
//! directory, named uniquely, and guards remove them on drop even when the
//! test fails. Nothing here touches the machine's own namespace beyond
//! creating and deleting those objects; traffic only flows between test
//! namespaces. Tests may shell out to `ip`; product code never does.
//!
//! Tests run on a loaded 2-core machine, so they wait for states, never
//! for time: `eventually` on the state the next assertion reads (not on
//! one that merely comes before it), `Node::start_agent` returns once the
//! agent serves (and, in cluster mode, has listed and programmed every
//! kind), `Node::wait_programmed` once a change is in the maps. A single
//! probe that should connect gets seconds (`OPEN`); one that should be
//! denied waits its whole timeout, so it gets a short one (`SHORT`).
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::{fd::AsRawFd as _, unix::net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

pub mod cases;
pub mod conformance;
pub mod containerd;
pub mod cri;
pub mod differential;
pub mod kubeproxy;
pub mod oracle;
pub mod pipeline;
pub mod rng;
use sluice_proto::{Request, Response};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique name: prefix, pid, counter (short enough for interface names).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where the workspace's binaries are (SLUICE_BIN_DIR overrides).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SLUICE_BIN_DIR") {
        return PathBuf::from(d);
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(profile)
}

/// A named network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique(prefix);
        sh("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip <args>` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let out = self
            .command("sysctl")
            .args(["-qw", &format!("{key}={value}")])
            .output()?;
        if !out.status.success() {
            bail!("sysctl {key}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// The names of the veths in this namespace.
    pub fn veths(&self) -> Result<Vec<String>> {
        let links: serde_json::Value =
            serde_json::from_str(&self.ip(&["-j", "link", "show", "type", "veth"])?)?;
        Ok(links
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect())
    }

    /// Runs `f` on a fresh thread that has entered this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = self.path();
        std::thread::spawn(move || -> Result<T> {
            enter(&path)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = sh("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
    Ok(())
}

/// A private bpffs mount on a fresh directory, unmounted and removed on drop.
pub struct Bpffs {
    pub dir: PathBuf,
}

impl Bpffs {
    pub fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("sluice-bpffs-"));
        std::fs::create_dir_all(&dir)?;
        sh("mount", &["-t", "bpf", "bpf", &dir.to_string_lossy()])?;
        Ok(Self { dir })
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Err(e) = sh("umount", &["-l", &self.dir.to_string_lossy()]) {
            eprintln!("cleanup: {e}");
        }
        let _ignored = std::fs::remove_dir(&self.dir);
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let d = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&d)?;
        Ok(Self(d))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ignored = std::fs::remove_dir_all(&self.0);
    }
}

/// A cgroup (v2) of its own: a test node's agent attaches `to_host` here
/// (never to the machine's root), and a test puts the processes it wants
/// judged as the node's host network in it. The hierarchy is mounted again
/// under /tmp, because `ip netns exec` (how agents start) remounts /sys and
/// hides /sys/fs/cgroup. Removed on drop.
pub struct Cgroup {
    mount: PathBuf,
    /// The cgroup's directory.
    pub dir: PathBuf,
}

impl Cgroup {
    pub fn new(prefix: &str) -> Result<Self> {
        let mount = std::env::temp_dir().join(unique("sluice-cgroup2-"));
        std::fs::create_dir_all(&mount)?;
        sh(
            "mount",
            &["-t", "cgroup2", "none", &mount.to_string_lossy()],
        )?;
        let cg = Self {
            dir: mount.join(unique(prefix)),
            mount,
        };
        std::fs::create_dir(&cg.dir).with_context(|| format!("creating {}", cg.dir.display()))?;
        Ok(cg)
    }

    /// Moves process `pid` into this cgroup.
    pub fn add(&self, pid: u32) -> Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", self.dir.display()))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Its processes may take a moment to be gone.
        for _ in 0..50 {
            match std::fs::remove_dir(&self.dir) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => break,
            }
        }
        if let Err(e) = sh("umount", &["-l", &self.mount.to_string_lossy()]) {
            eprintln!("cleanup: {e}");
        }
        let _ignored = std::fs::remove_dir(&self.mount);
    }
}

pub const NODE_IPV4: &str = "10.255.255.1/32";
pub const NODE_IPV6: &str = "fd00:ffff::1/128";

/// A simulated node: its own netns, bpffs, state, and a real agent process.
pub struct Node {
    pub ns: NetNs,
    pub bpffs: Bpffs,
    pub tmp: TempDir,
    /// The node's "host" processes: where its agent attaches `to_host`.
    pub cgroup: Cgroup,
    agent: Option<Child>,
    /// Drop events (JSON lines) the agent printed so far.
    pub events: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Extra command-line arguments for the agent.
    pub agent_args: Vec<String>,
    /// RUST_LOG of the agent (default: $SLUICE_AGENT_LOG, else info).
    pub agent_log: String,
    /// A command the agent runs under, e.g. `setpriv` with the
    /// capabilities of the DaemonSet (tests/tests/capabilities.rs).
    pub agent_wrapper: Vec<String>,
}

impl Node {
    /// Points this node's agent (cluster mode) at `api` as node `name`:
    /// writes a kubeconfig into the node's directory and sets the agent's
    /// arguments (before `start_agent`).
    pub fn use_api(&mut self, api: &sluice_test_apiserver::ServerHandle, name: &str) -> Result<()> {
        let kubeconfig = self.tmp.0.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        self.agent_args = vec![
            "--kubeconfig".into(),
            kubeconfig.to_string_lossy().into_owned(),
            "--node-name".into(),
            name.into(),
        ];
        Ok(())
    }

    pub fn new() -> Result<Self> {
        let ns = NetNs::new("sl-node")?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        // The node's own address (what kubelet probes come from). On lo:
        // this kernel has no dummy interfaces, and the kernel picks a lo
        // address as source when the outgoing interface has none.
        ns.ip(&["addr", "add", NODE_IPV4, "dev", "lo"])?;
        ns.ip(&["addr", "add", NODE_IPV6, "dev", "lo", "nodad"])?;
        Ok(Self {
            ns,
            bpffs: Bpffs::new()?,
            tmp: TempDir::new("sluice-node-")?,
            cgroup: Cgroup::new("sluice-node-")?,
            agent: None,
            events: Arc::new(Mutex::new(Vec::new())),
            agent_args: Vec::new(),
            agent_log: std::env::var("SLUICE_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            agent_wrapper: Vec::new(),
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.tmp.0.join("agent.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.tmp.0.join("state")
    }

    pub fn ipam_dir(&self) -> PathBuf {
        self.tmp.0.join("ipam")
    }

    /// Where the plugin queues removals while the agent is unreachable
    /// (the agent's default under its --state-dir).
    pub fn delete_queue_dir(&self) -> PathBuf {
        self.state_dir().join("delete-queue")
    }

    /// The agent's process id, while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// Starts the agent and waits until it answers STATUS.
    /// Starts the agent and returns once it serves; in cluster mode (a
    /// `--kubeconfig` among its arguments) only once it has listed every
    /// kind and programmed them, as a kubelet's ADD before that would be
    /// refused (code 11) and retried, which a test does not do.
    pub fn start_agent(&mut self) -> Result<()> {
        self.start_agent_unsynced()?;
        if !self.agent_args.iter().any(|a| a == "--kubeconfig") {
            return Ok(());
        }
        self.wait_agent("sync with the API server", |n| {
            matches!(
                n.request(&Request::Info),
                Ok(Response::Info { synced: true, .. })
            )
        })
    }

    /// Starts the agent and returns once its socket answers, listed or
    /// not (an agent whose API server is down).
    pub fn start_agent_unsynced(&mut self) -> Result<()> {
        let agent = bin_dir().join("sluice-agent");
        let mut cmd = match self.agent_wrapper.split_first() {
            Some((wrapper, args)) => {
                let mut c = self.ns.command(wrapper);
                c.args(args).arg(agent);
                c
            }
            None => self.ns.command(agent),
        };
        let mut child = cmd
            .arg("--bpffs")
            .arg(&self.bpffs.dir)
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--host-cgroup")
            .arg(&self.cgroup.dir)
            .args(&self.agent_args)
            .env("RUST_LOG", &self.agent_log)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning sluice-agent")?;
        let stdout = child.stdout.take().context("agent stdout")?;
        let events = self.events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if let Ok(v) = serde_json::from_str(&line)
                    && let Ok(mut e) = events.lock()
                {
                    e.push(v);
                }
            }
        });
        self.agent = Some(child);
        self.wait_agent("serve", |n| {
            matches!(n.request(&Request::Status), Ok(Response::Ok))
        })
    }

    /// Polls `done` until it holds, the agent exits or 60 s pass (loading
    /// the programs, the verifier, takes seconds, and tens of them on this
    /// 2-core machine while it also builds).
    fn wait_agent(&mut self, what: &str, done: impl Fn(&Self) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if done(self) {
                return Ok(());
            }
            if let Some(c) = self.agent.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!("agent exited during start-up (before it would {what}): {status}");
            }
            if Instant::now() > deadline {
                bail!("agent did not {what} in 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the agent (SIGKILL: the harshest restart). Pinned programs and
    /// maps stay.
    pub fn kill_agent(&mut self) -> Result<()> {
        if let Some(mut c) = self.agent.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    pub fn request(&self, req: &Request) -> Result<Response> {
        let mut s = UnixStream::connect(self.socket())?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(req.to_line()?.as_bytes())?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(serde_json::from_str(line.trim_end())?)
    }

    /// Runs the CNI plugin in the node's namespace as a runtime would.
    pub fn plugin(&self, env: &[(&str, &str)], stdin: &str) -> Result<PluginOutput> {
        let mut cmd = self.ns.command(bin_dir().join("sluice"));
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = run_with_stdin(&mut cmd, stdin)?;
        Ok(PluginOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Waits until the agent reports `key` (`Kind/ns/name`) programmed at
    /// `rv` or later (`None`: until it is gone). No sleeping-and-hoping.
    pub fn wait_programmed(&self, key: &str, rv: Option<&str>, timeout: Duration) -> Result<()> {
        self.wait_programmed_polling(key, rv, timeout, Duration::from_millis(5))
            .map(drop)
    }

    /// `wait_programmed`, asking every `every`; how long it waited.
    pub fn wait_programmed_polling(
        &self,
        key: &str,
        rv: Option<&str>,
        timeout: Duration,
        every: Duration,
    ) -> Result<Duration> {
        let want: Option<u64> = rv.map(|r| r.parse()).transpose()?;
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let only = Request::ProgrammedOf {
                keys: vec![key.to_string()],
            };
            if let Response::Programmed {
                synced: true,
                objects,
            } = self.request(&only)?
            {
                let have = objects.get(key).and_then(|v| v.parse::<u64>().ok());
                let done = match (want, have) {
                    (Some(w), Some(h)) => h >= w,
                    (None, None) => true,
                    _ => false,
                };
                if done {
                    return Ok(started.elapsed());
                }
            }
            if Instant::now() > deadline {
                let now = self.request(&Request::Programmed)?;
                bail!(
                    "{key} not programmed at {rv:?} within {timeout:?}; the agent reports {now:?}"
                );
            }
            std::thread::sleep(every);
        }
    }

    /// Is the data path's flow-event switch (`FLOW_EVENTS`) on?
    pub fn flow_events_on(&self) -> Result<bool> {
        Ok(sluice_agent::datapath::FlowEventsMap::open(&self.bpffs.dir)?.get()?)
    }

    /// Streams `Observe` records into a list, from a thread, until the
    /// returned handle is dropped.
    pub fn observe(
        &self,
        filter: sluice_proto::ObserveFilter,
        replay: sluice_proto::Replay,
    ) -> Result<Observer> {
        let mut s = UnixStream::connect(self.socket())?;
        s.write_all(Request::Observe { filter, replay }.to_line()?.as_bytes())?;
        let records = std::sync::Arc::new(Mutex::new(Vec::new()));
        let sink = records.clone();
        let reader = s.try_clone()?;
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { return };
                if let (Ok(v), Ok(mut r)) = (
                    serde_json::from_str::<serde_json::Value>(&line),
                    sink.lock(),
                ) {
                    r.push(v);
                }
            }
        });
        Ok(Observer { stream: s, records })
    }

    pub fn maps(&self) -> Result<sluice_agent::datapath::Maps> {
        Ok(sluice_agent::datapath::Maps::open_pinned(&self.bpffs.dir)?)
    }

    /// `GET path` from the agent's metrics address (its default, inside
    /// the node's namespace), read to EOF: `(status line and headers, body)`.
    pub fn http_get(&self, path: &str) -> Result<(String, String)> {
        // The namespace's thread needs what it sends to be its own.
        let request = format!("GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n");
        let text = self.ns.run(move || -> Result<String> {
            let mut s = TcpStream::connect("127.0.0.1:9962")?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(request.as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })??;
        let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
        Ok((head.to_owned(), body.to_owned()))
    }

    /// The agent's Prometheus metrics: `(series, value)` per sample line.
    pub fn metrics(&self) -> Result<BTreeMap<String, f64>> {
        let (head, body) = self.http_get("/metrics")?;
        ensure!(head.starts_with("HTTP/1.1 200"), "metrics: {head}");
        // The text format: each family's samples follow its TYPE line, all
        // together, and no family comes twice.
        let mut families = std::collections::BTreeSet::new();
        let mut family = String::new();
        let mut out = BTreeMap::new();
        for l in body.lines().filter(|l| !l.is_empty()) {
            if let Some(t) = l.strip_prefix("# TYPE ") {
                family = t.split(' ').next().unwrap_or_default().to_owned();
                ensure!(families.insert(family.clone()), "{family} typed twice");
                continue;
            }
            if l.starts_with('#') {
                continue;
            }
            let (series, v) = l.rsplit_once(' ').context("sample line")?;
            let name = series.split('{').next().unwrap_or_default();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| *b == family))
                .unwrap_or(name);
            ensure!(base == family, "{series} is not in the family {family}");
            out.insert(series.to_owned(), v.parse()?);
        }
        Ok(out)
    }

    /// Events seen so far that satisfy `pred`.
    pub fn events_matching(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        self.events
            .lock()
            .map(|e| e.iter().filter(|v| pred(v)).cloned().collect())
            .unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Err(e) = self.kill_agent() {
            eprintln!("cleanup: {e}");
        }
        // Deleting the namespace removes every veth in it (and their peers).
    }
}

#[derive(Debug)]
pub struct PluginOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl PluginOutput {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("plugin printed {:?} / {:?}", self.stdout, self.stderr))
    }
}

/// One node in cluster mode: its agent (not started yet, so tests can
/// create objects first) points by kubeconfig at a test API server that
/// listens on the node namespace's loopback, where the agent is.
pub struct ApiNode {
    pub node: Node,
    pub api: sluice_test_apiserver::ServerHandle,
    /// The plugin config for this node's pods.
    pub config: String,
}

impl ApiNode {
    pub fn new(node_name: &str, v4_range: &str, v6_range: &str) -> Result<Self> {
        let mut node = Node::new()?;
        let api = node.ns.run(|| {
            sluice_test_apiserver::Server::start(
                "127.0.0.1:0".parse().map_err(anyhow::Error::from)?,
            )
        })??;
        node.use_api(&api, node_name)?;
        let config = conflist_config(&node, Some(v4_range), Some(v6_range));
        Ok(Self { node, api, config })
    }
}

/// An open `Observe` stream; dropping it closes the connection.
pub struct Observer {
    stream: UnixStream,
    records: std::sync::Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Observer {
    /// The records received so far.
    pub fn records(&self) -> Vec<serde_json::Value> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let _gone = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// A pod made by the real plugin.
pub struct Pod {
    pub ns: NetNs,
    pub container_id: String,
    pub ipv4: Option<IpAddr>,
    pub ipv6: Option<IpAddr>,
    pub host_ifname: String,
    pub result: serde_json::Value,
}

/// The plugin config the tests use.
pub fn conflist_config(node: &Node, v4: Option<&str>, v6: Option<&str>) -> String {
    let ranges: Vec<Vec<String>> = v4
        .into_iter()
        .chain(v6)
        .map(|r| vec![r.to_string()])
        .collect();
    serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "sluice-test",
        "type": "sluice",
        "ranges": ranges,
        "dataDir": node.ipam_dir(),
        "agentSocket": node.socket(),
        // The agent's default, <state-dir>/delete-queue: never the
        // machine's /var/lib/sluice.
        "deleteQueueDir": node.delete_queue_dir(),
    })
    .to_string()
}

pub fn cni_env<'a>(cmd: &'a str, id: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

impl Pod {
    /// CNI ADD through the real plugin binary.
    pub fn add(node: &Node, config: &str) -> Result<Self> {
        Self::add_as(node, config, None)
    }

    /// CNI ADD for the Kubernetes pod `namespace/name` (CNI_ARGS as kubelet
    /// passes them).
    pub fn add_as(node: &Node, config: &str, pod: Option<(&str, &str)>) -> Result<Self> {
        let ns = NetNs::new("sl-pod")?;
        let container_id = format!("ctr{}", unique("").replace('-', ""));
        let netns = ns.path().to_string_lossy().into_owned();
        let mut env = cni_env("ADD", &container_id, &netns);
        let args =
            pod.map(|(n, p)| format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={n};K8S_POD_NAME={p}"));
        if let Some(a) = &args {
            env.push(("CNI_ARGS", a));
        }
        let out = node.plugin(&env, config)?;
        if out.code != 0 {
            bail!("ADD failed ({}): {} {}", out.code, out.stdout, out.stderr);
        }
        let result = out.json()?;
        let mut pod = Self {
            ns,
            container_id,
            ipv4: None,
            ipv6: None,
            host_ifname: String::new(),
            result: result.clone(),
        };
        for ip in result["ips"].as_array().into_iter().flatten() {
            let addr: ipnetwork::IpNetwork = ip["address"].as_str().unwrap_or_default().parse()?;
            match addr.ip() {
                a @ IpAddr::V4(_) => pod.ipv4 = Some(a),
                a @ IpAddr::V6(_) => pod.ipv6 = Some(a),
            }
        }
        for i in result["interfaces"].as_array().into_iter().flatten() {
            if i.get("sandbox")
                .is_none_or(|s| s.as_str().unwrap_or_default().is_empty())
            {
                pod.host_ifname = i["name"].as_str().unwrap_or_default().to_owned();
            }
        }
        Ok(pod)
    }

    pub fn attachment(&self) -> sluice_proto::Attachment {
        sluice_proto::Attachment {
            container_id: self.container_id.clone(),
            ifname: "eth0".into(),
        }
    }

    pub fn del(&self, node: &Node, config: &str) -> Result<PluginOutput> {
        let netns = self.ns.path().to_string_lossy().into_owned();
        node.plugin(&cni_env("DEL", &self.container_id, &netns), config)
    }
}

/// A TCP and UDP echo server on `port` in a namespace, stopped on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    pub fn start(ns: &NetNs, port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for v6 in [false, true] {
            let (tcp, udp) = ns.run(move || -> Result<(TcpListener, UdpSocket)> {
                let any: IpAddr = if v6 {
                    "::".parse()?
                } else {
                    "0.0.0.0".parse()?
                };
                let tcp = bind_tcp(SocketAddr::new(any, port))?;
                let udp = bind_udp(SocketAddr::new(any, port))?;
                Ok((tcp, udp))
            })??;
            tcp.set_nonblocking(true)?;
            udp.set_read_timeout(Some(Duration::from_millis(50)))?;
            let s = stop.clone();
            threads.push(std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    // Asleep until a connection comes (or 50 ms pass, to
                    // see `stop`): a conformance cluster runs dozens of
                    // these on 2 cores, so they must not spin.
                    let mut fd = libc::pollfd {
                        fd: tcp.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, for the call's duration.
                    if unsafe { libc::poll(&mut fd, 1, 50) } <= 0 {
                        continue;
                    }
                    if let Ok((mut c, _)) = tcp.accept() {
                        std::thread::spawn(move || {
                            let _ignored = c.set_nonblocking(false);
                            let _ignored = c.set_read_timeout(Some(Duration::from_secs(5)));
                            let mut buf = [0u8; 4096];
                            while let Ok(n) = c.read(&mut buf) {
                                if n == 0 || c.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                }
            }));
            let s = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let _ignored = udp.send_to(&buf[..n], from);
                    }
                }
            }));
        }
        Ok(Self { stop, threads })
    }
}

fn bind_tcp(addr: SocketAddr) -> Result<TcpListener> {
    // IPV6_V6ONLY so the v4 and v6 listeners can share the port.
    let domain = if addr.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    Ok(s.into())
}

fn bind_udp(addr: SocketAddr) -> Result<UdpSocket> {
    let domain = if addr.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ignored = t.join();
        }
    }
}

/// TCP connect + one byte each way from inside `ns`.
pub fn tcp_ok(ns: &NetNs, to: IpAddr, port: u16, timeout: Duration) -> bool {
    ns.run(move || -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::new(to, port), timeout) else {
            return false;
        };
        let _ignored = s.set_read_timeout(Some(timeout));
        let mut b = [0u8; 1];
        s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"x"
    })
    .unwrap_or(false)
}

/// A UDP datagram that the server answers, from inside `ns`.
pub fn udp_ok(ns: &NetNs, to: IpAddr, port: u16, timeout: Duration) -> bool {
    ns.run(move || -> bool {
        let any: SocketAddr = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let Ok(s) = UdpSocket::bind(any) else {
            return false;
        };
        let _ignored = s.set_read_timeout(Some(timeout));
        let mut b = [0u8; 16];
        s.send_to(b"ping", SocketAddr::new(to, port)).is_ok()
            && s.recv_from(&mut b).is_ok_and(|(n, _)| &b[..n] == b"ping")
    })
    .unwrap_or(false)
}

/// One ICMP echo from inside `ns` (uses ping(8)).
pub fn ping_ok(ns: &NetNs, to: IpAddr) -> bool {
    ns.command("ping")
        .args(["-c", "1", "-W", "1", &to.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Polls `f` until it is true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` with `stdin` written to it, as a runtime runs a CNI plugin;
/// its whole output. A plugin may answer (an error, say) without reading
/// all of its input: the write's broken pipe is then no failure, as Go's
/// os/exec (libcni) ignores it too.
pub fn run_with_stdin(cmd: &mut Command, stdin: &str) -> Result<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let written = child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes());
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other?,
    }
    Ok(child.wait_with_output()?)
}
