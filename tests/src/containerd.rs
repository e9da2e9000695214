//! A real containerd (Debian's, with its CRI plugin and runc) of a test's
//! own: root, state, sockets, runc state and CNI directories under the
//! test's temporary directory, never the machine's defaults.
//!
//! containerd 1.6 still writes to fixed paths: shim sockets under
//! /run/containerd/s, pod network namespaces under /var/run/netns and
//! libcni's result cache under /var/lib/cni. So the daemon runs in a mount
//! namespace of its own, held by a `holder` process, in which the test's
//! `run/` and `varlib/` directories are bind-mounted over /run and
//! /var/lib (private propagation: nothing shows on the machine). What
//! containerd writes there is visible to the test as plain files in those
//! directories; a pod's netns is entered through /proc/<holder>/root.
//! Restarting containerd enters the same mount namespace, so the new
//! daemon finds its shims and netns mounts as a restarted node's would.
//!
//! The daemon runs in the node's network namespace (as containerd runs in
//! a node's host namespace), so the CNI plugin it execs puts the pods'
//! host-side veths there.
//!
//! Drop stops and removes every sandbox through CRI (the plugin's DEL),
//! then kills whatever still runs in the mount namespace (containerd,
//! shims, containers), which releases every mount it holds, removes the
//! pods' cgroups and the directory.
use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{TempDir, cri::Cri, sh, unique};

/// How the daemon is started.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Run containerd under `strace -f -e trace=execve` and keep the log,
    /// to see every CNI call it makes (verb, environment, timing).
    pub trace_execs: bool,
}

/// The sandbox (pause) image every pod's sandbox runs.
pub const PAUSE_IMAGE: &str = "docker.io/library/sluice-test-pause:1";
/// The image the tests' containers run (busybox).
pub const BUSYBOX_IMAGE: &str = "docker.io/library/sluice-test-busybox:1";

pub struct Containerd {
    pub dir: TempDir,
    /// The process holding the daemon's mount namespace.
    holder: Child,
    /// containerd (or strace running it).
    daemon: Option<Child>,
    /// The node's network namespace the daemon runs in.
    netns: PathBuf,
    /// cgroupfs parent of every pod of this daemon.
    pub cgroup_parent: String,
    opts: Options,
    /// How many times the daemon was started (each start logs to its own file).
    starts: u32,
}

impl Containerd {
    /// Starts containerd in the network namespace at `netns` and waits
    /// until its CRI service answers.
    pub fn start(netns: &Path, opts: Options) -> Result<Self> {
        let dir = TempDir::new("sluice-containerd-")?;
        for d in [
            "root",
            "state",
            "run",
            "varlib",
            "runc",
            "cni/bin",
            "cni/net.d",
            "pods",
            "logs",
        ] {
            fs::create_dir_all(dir.0.join(d))?;
        }
        let cgroup_parent = format!("/{}", unique("sluice-pods-"));
        fs::write(dir.0.join("config.toml"), config(&dir.0))?;
        let holder = hold_mount_namespace(&dir.0)?;
        let mut c = Self {
            dir,
            holder,
            daemon: None,
            netns: netns.to_path_buf(),
            cgroup_parent,
            opts,
            starts: 0,
        };
        c.start_daemon()?;
        Ok(c)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.0.join("containerd.sock")
    }

    /// The CNI plugin directory (CRI's `bin_dir`).
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.0.join("cni/bin")
    }

    /// The CNI configuration directory (CRI's `conf_dir`).
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.0.join("cni/net.d")
    }

    /// Where pods' container logs go.
    pub fn pod_log_dir(&self, uid: &str) -> PathBuf {
        self.dir.0.join("pods").join(uid)
    }

    /// What the daemon's /var/lib/cni holds (libcni's result cache).
    pub fn cni_cache_dir(&self) -> PathBuf {
        self.dir.0.join("varlib/cni")
    }

    /// The names in the daemon's /var/run/netns (one per pod network
    /// namespace containerd made and has not removed).
    pub fn netns_names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = match fs::read_dir(self.dir.0.join("run/netns")) {
            Ok(d) => d
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        names.sort();
        Ok(names)
    }

    /// A path under which the test opens `path` as the daemon sees it
    /// (e.g. a pod's netns, /var/run/netns/cni-…).
    pub fn seen_by_daemon(&self, path: &str) -> PathBuf {
        // An absolute symlink met under /proc/<pid>/root resolves against
        // the test's root, not the holder's: /var/run (-> /run) is
        // resolved here.
        let path = match path.strip_prefix("/var/run/") {
            Some(rest) => format!("run/{rest}"),
            None => path.trim_start_matches('/').to_owned(),
        };
        PathBuf::from(format!("/proc/{}/root", self.holder.id())).join(path)
    }

    /// Everything every daemon start logged so far.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .filter_map(|n| fs::read_to_string(self.log_path(n)).ok())
            .collect::<Vec<_>>()
            .join("")
    }

    fn log_path(&self, start: u32) -> PathBuf {
        self.dir.0.join(format!("logs/containerd-{start}.log"))
    }

    /// The strace log of the daemon's execs (with `trace_execs`), all starts.
    pub fn exec_trace(&self) -> String {
        (1..=self.starts)
            .filter_map(|n| fs::read_to_string(self.dir.0.join(format!("logs/execs-{n}"))).ok())
            .collect::<Vec<_>>()
            .join("")
    }

    /// A CRI client on the daemon's socket.
    pub fn cri(&self) -> Result<Cri> {
        Cri::connect(&self.socket())
    }

    /// `ctr images import` of an OCI or docker archive into CRI's
    /// namespace (`k8s.io`), unpacked for the CRI snapshotter.
    pub fn import(&self, archive: &Path) -> Result<String> {
        sh(
            "ctr",
            &[
                "--address",
                &self.socket().to_string_lossy(),
                "--namespace",
                "k8s.io",
                "images",
                "import",
                "--snapshotter",
                SNAPSHOTTER,
                &archive.to_string_lossy(),
            ],
        )
    }

    /// Stops the daemon (SIGTERM, as a service manager restarting it
    /// would) and starts it again in the same mount namespace; shims and
    /// containers keep running meanwhile.
    pub fn restart(&mut self) -> Result<()> {
        self.stop_daemon()?;
        self.start_daemon()
    }

    fn start_daemon(&mut self) -> Result<()> {
        self.starts += 1;
        let log = fs::File::create(self.log_path(self.starts))?;
        let mut nsenter = vec![
            format!("--mount=/proc/{}/ns/mnt", self.holder.id()),
            format!("--net={}", self.netns.display()),
            "--".into(),
            "containerd".into(),
            "--config".into(),
            self.dir
                .0
                .join("config.toml")
                .to_string_lossy()
                .into_owned(),
        ];
        let mut cmd = if self.opts.trace_execs {
            let mut c = Command::new("strace");
            // Only execve stops (seccomp-bpf), with every argument and
            // environment variable in full; followed into the shims.
            c.args([
                "-f",
                "-qq",
                "--seccomp-bpf",
                "-e",
                "trace=execve",
                "-e",
                "signal=none",
            ])
            .args(["-v", "-s", "4096", "-ttt", "-o"])
            .arg(self.dir.0.join(format!("logs/execs-{}", self.starts)))
            .arg("nsenter");
            c
        } else {
            Command::new("nsenter")
        };
        cmd.args(nsenter.drain(..))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.daemon = Some(cmd.spawn().context("starting containerd")?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.socket().exists()
                && let Ok(cri) = self.cri()
                && cri.version().is_ok()
            {
                return Ok(());
            }
            if let Some(d) = self.daemon.as_mut()
                && let Some(status) = d.try_wait()?
            {
                bail!(
                    "containerd exited during start-up ({status}):\n{}",
                    self.log()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "containerd did not answer CRI:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM to containerd, SIGKILL if it has not gone in 10 s.
    fn stop_daemon(&mut self) -> Result<()> {
        let Some(mut child) = self.daemon.take() else {
            return Ok(());
        };
        for pid in self.pids_named("containerd")? {
            signal(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                child.kill()?;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait()?;
        // The socket file stays behind; a fresh start must not find it.
        let _ignored = fs::remove_file(self.socket());
        Ok(())
    }

    /// Processes in the daemon's mount namespace (all started by it or by
    /// this handle), except the holder.
    fn pids_in_namespace(&self) -> Result<Vec<i32>> {
        let ns = fs::metadata(format!("/proc/{}/ns/mnt", self.holder.id()))?.ino();
        let holder = i32::try_from(self.holder.id())?;
        let mut pids = Vec::new();
        for e in fs::read_dir("/proc")?.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid != holder
                && fs::metadata(format!("/proc/{pid}/ns/mnt")).is_ok_and(|m| m.ino() == ns)
            {
                pids.push(pid);
            }
        }
        Ok(pids)
    }

    fn pids_named(&self, comm: &str) -> Result<Vec<i32>> {
        Ok(self
            .pids_in_namespace()?
            .into_iter()
            .filter(|p| {
                fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim_end() == comm)
            })
            .collect())
    }

    /// Stops and removes every sandbox (CNI DEL through the plugin).
    fn remove_sandboxes(&self) -> Result<()> {
        let cri = self.cri()?;
        for id in cri.list_pod_sandboxes()? {
            if let Err(e) = cri
                .stop_pod_sandbox(&id)
                .and_then(|()| cri.remove_pod_sandbox(&id))
            {
                eprintln!("cleanup: sandbox {id}: {e:#}");
            }
        }
        Ok(())
    }

    /// Removes the pods' cgroups (cgroupfs driver, v1 or v2), deepest first.
    fn remove_cgroups(&self) {
        let Ok(roots) = fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        let rel = self.cgroup_parent.trim_start_matches('/');
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut candidates: Vec<PathBuf> = roots.flatten().map(|e| e.path().join(rel)).collect();
        // The v2 root itself (a pure v2 host).
        candidates.push(Path::new("/sys/fs/cgroup").join(rel));
        for top in candidates.into_iter().filter(|p| p.is_dir()) {
            collect_dirs(&top, &mut dirs);
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            if let Err(e) = fs::remove_dir(&d) {
                eprintln!("cleanup: {}: {e}", d.display());
            }
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&e.path(), out);
        }
    }
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ignored = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.daemon.is_some()
            && let Err(e) = self.remove_sandboxes()
        {
            eprintln!("cleanup: removing sandboxes: {e:#}");
        }
        if let Err(e) = self.stop_daemon() {
            eprintln!("cleanup: stopping containerd: {e:#}");
        }
        // Shims and whatever containers are left; their exit releases the
        // namespace's mounts (rootfs, netns bind mounts) with it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.pids_in_namespace().unwrap_or_default();
            if left.is_empty() || Instant::now() > deadline {
                if !left.is_empty() {
                    eprintln!("cleanup: processes still in containerd's namespace: {left:?}");
                }
                break;
            }
            for pid in left {
                signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Err(e) = self
            .holder
            .kill()
            .and_then(|()| self.holder.wait().map(drop))
        {
            eprintln!("cleanup: mount namespace holder: {e}");
        }
        self.remove_cgroups();
        // TempDir removes the directory.
    }
}

/// containerd's snapshotter here: overlayfs (the test directory is on
/// ext4, where it works).
const SNAPSHOTTER: &str = "overlayfs";

/// containerd 1.6's configuration (version 2): everything under `dir`, CRI
/// with runc, Sluice's CNI directories, no OOM score changes (this
/// sandbox's root lacks CAP_SYS_RESOURCE) and no plugins a node here does
/// not use.
fn config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  level = "debug"

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{SNAPSHOTTER}"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "runc"
        Root = "{d}/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/net.d"
    max_conf_num = 1
"#
    )
}

/// Starts the process that holds the daemon's mount namespace: private
/// propagation, `dir/run` over /run and `dir/varlib` over /var/lib.
fn hold_mount_namespace(dir: &Path) -> Result<Child> {
    let script = format!(
        "mount --bind '{0}/run' /run && mount --bind '{0}/varlib' /var/lib && echo ready && exec sleep 1000000",
        dir.display()
    );
    let mut holder = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("unshare")?;
    let mut line = String::new();
    BufReader::new(holder.stdout.take().context("holder stdout")?).read_line(&mut line)?;
    if line.trim_end() != "ready" {
        let _ignored = holder.kill();
        let status = holder.wait()?;
        bail!("mount namespace holder failed ({status})");
    }
    Ok(holder)
}

/// The images the tests run, built by `sluice-image` as `cargo xtask
/// image` builds Sluice's (busybox from Debian's busybox-static): (name,
/// OCI archive). The pause image is busybox sleeping.
pub fn build_images(out: &Path) -> Result<Vec<(String, PathBuf)>> {
    let pause = sluice_image::build(
        &sluice_image::Spec {
            name: PAUSE_IMAGE.into(),
            entries: sluice_image::busybox_entries(Path::new("/bin/busybox"))?,
            entrypoint: vec!["/bin/sleep".into()],
            cmd: vec!["1000000".into()],
            env: vec!["PATH=/bin".into()],
            ..Default::default()
        },
        out,
    )?;
    let busybox = sluice_image::busybox(BUSYBOX_IMAGE, out)?;
    Ok(vec![
        (PAUSE_IMAGE.into(), pause.archive),
        (BUSYBOX_IMAGE.into(), busybox.archive),
    ])
}
