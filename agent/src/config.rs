//! The agent's command line, and what it says about the node: sizes, the
//! cgroup of `to_host`, the API client and the node's name.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;

use crate::{
    cluster::Cluster,
    datapath::{AttachMode, Datapath, DropEvents, Established, Sizes},
    endpoints::{Endpoints, Registry},
    metrics::Metrics,
    reconcile::{
        State,
        vxlan::{TunnelConfig, TunnelMode},
    },
};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Sluice node agent",
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    /// Without a subcommand: run the agent.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Directory on a bpffs where maps and links are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/sluice")]
    pub bpffs: PathBuf,
    /// Unix socket the CNI plugin talks to.
    #[arg(long, default_value = sluice_proto::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Where the endpoint registry is kept.
    #[arg(long, default_value = "/var/lib/sluice")]
    pub state_dir: PathBuf,
    /// Conntrack table size (entries). An existing pinned table keeps its size.
    #[arg(long, default_value_t = sluice_common::sizes::CONNTRACK)]
    pub conntrack_size: u32,
    /// Policy map size (entries).
    #[arg(long, default_value_t = sluice_common::sizes::POLICY)]
    pub policy_size: u32,
    /// The most pods the cluster is sized for: IPCACHE gets two addresses
    /// per pod plus the nodes', PEER_CLASSES one class per pod, both with a
    /// quarter of headroom (never below 262,144 and 65,536). A map pinned
    /// by an earlier agent keeps its size; `sluice_map_pressure` reports
    /// the kernel's.
    #[arg(long, default_value_t = 100_000)]
    pub cluster_pods: u32,
    /// Most policy entries one endpoint may hold; past it that endpoint
    /// fails closed (drops everything) and the others are unaffected.
    #[arg(long, default_value_t = crate::endpoints::DEFAULT_MAX_ENTRIES_PER_ENDPOINT)]
    pub max_entries_per_endpoint: usize,
    /// Where to serve Prometheus metrics (empty: nowhere).
    #[arg(long, default_value = "127.0.0.1:9962")]
    pub metrics_addr: String,
    /// Watch this API server through a kubeconfig (cluster mode). Without it,
    /// and outside a cluster, the agent runs standalone: policy only through
    /// the socket's SetPolicy.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (its pods are the endpoints). Default: $NODE_NAME,
    /// else the host name.
    #[arg(long)]
    pub node_name: Option<String>,
    /// How programs are attached: auto (TCX where the kernel has it, clsact
    /// otherwise), tcx or clsact.
    #[arg(long, value_enum, default_value = "auto")]
    pub tc_attach: AttachMode,
    /// The cgroup (v2) whose sockets' incoming packets `to_host` sees, to
    /// judge Service traffic that kube-proxy delivers to the node itself
    /// (host-network backends). Default: the root of the cgroup2 mount.
    /// "none": not attached (such traffic is then not judged).
    #[arg(long)]
    pub host_cgroup: Option<String>,
    /// What a policy change does to flows established before it:
    /// revalidate (judged again on their next packet, dropped as `revoked`
    /// when denied) or keep (they live on until they end, as with
    /// netfilter's conntrack).
    #[arg(long, value_enum, default_value = "revalidate")]
    pub established: Established,
    /// Report every allowed new flow (one event per flow, `verdict:
    /// FORWARDED`) on stdout and to observers, always. Without it the data
    /// path reports flows only while an observer asks for them or a policy
    /// is in audit mode.
    #[arg(long)]
    pub flow_events: bool,
    /// Seconds between retries of what failed (programming, routes,
    /// uplinks) when no watch event comes first.
    #[arg(long, default_value_t = 10)]
    pub resync_seconds: u64,
    /// Where the CNI plugin queues endpoint removals while the agent is
    /// unreachable (its `deleteQueueDir`). Default: <state-dir>/delete-queue.
    #[arg(long)]
    pub delete_queue_dir: Option<PathBuf>,
    /// Log format on stderr: text or json.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Once the agent is ready (synced, programs attached, CNI socket
    /// answering), write --cni-conflist into this directory (atomically;
    /// again if it vanishes). Not before: containerd 1.6/1.7 report the
    /// node's network ready as soon as a conflist exists.
    #[arg(long, requires = "cni_conflist")]
    pub cni_conf_dir: Option<PathBuf>,
    /// The conflist to write into --cni-conf-dir (its file name is kept).
    #[arg(long, requires = "cni_conf_dir")]
    pub cni_conflist: Option<PathBuf>,
    /// How other nodes' pods are reached: none (routes via the nodes'
    /// InternalIPs: one L2 segment), vxlan (every node through the VXLAN
    /// device `sluice-vxlan`) or auto (direct to nodes on a connected
    /// subnet, VXLAN to the rest). See docs/design.md for the pod MTU.
    #[arg(long, value_enum, default_value = "none")]
    pub tunnel: TunnelMode,
    /// The VXLAN network identifier of `sluice-vxlan`.
    #[arg(long, default_value_t = crate::reconcile::vxlan::DEFAULT_VNI)]
    pub vxlan_vni: u32,
    /// The UDP port VXLAN uses (IANA's 4789; flannel uses 8472).
    #[arg(long, default_value_t = crate::reconcile::vxlan::DEFAULT_PORT)]
    pub vxlan_port: u16,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Install the CNI plugin binary (and a conflist) on the node: what the
    /// DaemonSet's init container runs. Atomic and idempotent.
    InstallCni(InstallCniArgs),
    /// Take Sluice off the node, the agent stopped first: detach its
    /// programs, remove its pins, the conflist and (if given) the plugin
    /// and the endpoint registry. Pod and node interfaces stay.
    Uninstall(UninstallArgs),
}

#[derive(clap::Args, Debug)]
pub struct InstallCniArgs {
    /// The CNI bin directory the plugin is copied into (as `sluice`).
    #[arg(long)]
    pub cni_bin_dir: PathBuf,
    /// The plugin binary. Default: `sluice` next to this executable.
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// Also write --conflist into this directory. The DaemonSet leaves
    /// that to the agent, once it is ready.
    #[arg(long, requires = "conflist")]
    pub cni_conf_dir: Option<PathBuf>,
    #[arg(long, requires = "cni_conf_dir")]
    pub conflist: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct UninstallArgs {
    /// The agent's pin directory (its --bpffs).
    #[arg(long, default_value = "/sys/fs/bpf/sluice")]
    pub bpffs: PathBuf,
    /// Remove every conflist here that uses the plugin.
    #[arg(long)]
    pub cni_conf_dir: Option<PathBuf>,
    /// Remove the plugin binary from here.
    #[arg(long)]
    pub cni_bin_dir: Option<PathBuf>,
    /// Remove the endpoint registry (the agent's --state-dir).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Args {
    /// Logs to stderr (drop events own stdout), filtered by RUST_LOG.
    pub fn init_tracing(&self) {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let fmt = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        match self.log_format {
            LogFormat::Json => fmt.json().init(),
            LogFormat::Text => fmt.init(),
        }
    }

    pub fn tunnel(&self) -> TunnelConfig {
        TunnelConfig {
            mode: self.tunnel,
            vni: self.vxlan_vni,
            port: self.vxlan_port,
        }
    }

    pub fn sizes(&self) -> Sizes {
        Sizes {
            conntrack: self.conntrack_size,
            policy: self.policy_size,
            ..Sizes::for_cluster(self.cluster_pods)
        }
    }

    /// The cgroup `to_host` attaches to; `None` for "none".
    pub fn host_cgroup(&self) -> anyhow::Result<Option<PathBuf>> {
        match self.host_cgroup.as_deref() {
            Some("none") => Ok(None),
            Some(p) => Ok(Some(PathBuf::from(p))),
            None => Ok(Some(
                crate::cgroup2_root().context("finding the cgroup2 mount")?,
            )),
        }
    }

    /// A client for cluster mode: from --kubeconfig, or in-cluster service
    /// account; `None` means standalone.
    pub async fn kube_client(&self) -> anyhow::Result<Option<kube::Client>> {
        let config = if let Some(path) = &self.kubeconfig {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            kube::Config::incluster()?
        } else {
            return Ok(None);
        };
        Ok(Some(kube::Client::try_from(config)?))
    }

    /// Takes over the node: loads the data path (reusing its pins),
    /// attaches `to_host`, re-attaches the registered endpoints and marks
    /// the node's own addresses.
    pub fn take_over(
        &self,
        metrics: &Metrics,
        mut cluster: Option<Cluster>,
    ) -> anyhow::Result<(State, DropEvents)> {
        crate::ensure_bpffs(&self.bpffs)?;
        let (mut dp, drops) = Datapath::load(&self.bpffs, &self.sizes(), self.tc_attach)
            .context("loading the data path")?;
        dp.writer.set_established(self.established);
        let registry = Registry::open(&self.state_dir).context("opening the endpoint registry")?;
        let endpoints = Endpoints::start(
            &mut dp,
            registry,
            self.max_entries_per_endpoint,
            metrics.clone(),
        )
        .context("taking over the node's endpoints")?;
        if let Some(c) = &mut cluster {
            c.restore(restored_numbers(dp.writer.maps()));
            // The addresses the CNI gave each pod, in case its status has
            // none yet (kept until the first list; nothing to program).
            for ep in endpoints.all() {
                if let Some(pod) = ep.pod() {
                    let _before_sync = c.learn_cni_ips(&pod, ep.ips().collect());
                }
            }
        }
        // After the endpoints' records are refreshed: the new to_host reads
        // them as soon as it is attached.
        match self.host_cgroup()? {
            Some(cgroup) => {
                dp.programs
                    .attach_host(&cgroup)
                    .with_context(|| format!("attaching to_host to {}", cgroup.display()))?;
                tracing::info!(cgroup = %cgroup.display(), "to_host attached");
            }
            None => tracing::warn!(
                "--host-cgroup none: Service traffic to host-network backends is not judged"
            ),
        }
        let mut state = State::new(dp, endpoints, cluster);
        state.program_host_addresses()?;
        Ok((state, drops))
    }

    /// The CNI plugin's deletion queue (`sluice_proto::queue`).
    pub fn delete_queue(&self) -> sluice_proto::queue::DeleteQueue {
        sluice_proto::queue::DeleteQueue::new(
            self.delete_queue_dir
                .clone()
                .unwrap_or_else(|| self.state_dir.join("delete-queue")),
        )
    }

    /// --node-name, else $NODE_NAME, else the host name.
    pub fn node_name(&self) -> String {
        self.node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .unwrap_or_default()
    }
}

/// The numbers a previous run left in the pinned maps: each address's
/// identity, each identity's peer class, each local identity's profile
/// and each prefix's CIDR group (an endpoint's, by the endpoint's
/// identity).
fn restored_numbers(maps: &crate::datapath::Maps) -> crate::policy::Restored {
    let identity_of: std::collections::HashMap<u32, u32> = maps
        .endpoint_records()
        .into_iter()
        .map(|(_, e)| (e.ep_id, e.identity))
        .collect();
    crate::policy::Restored {
        identities: maps.ipcache_identities(),
        classes: maps.peer_classes(),
        profiles: maps
            .tier_profiles()
            .into_iter()
            .filter_map(|(ep, profile)| Some((*identity_of.get(&ep)?, profile)))
            .collect(),
        cidr_groups: maps
            .cidr_groups()
            .into_iter()
            .filter_map(|(ep, dir, net, group)| Some((*identity_of.get(&ep)?, dir, net, group)))
            .collect(),
    }
}
