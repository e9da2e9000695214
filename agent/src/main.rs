//! `sluice-agent`: wiring only. Logs go to stderr (tracing); drop events go
//! to stdout, one JSON object per line, so `sluice-agent | jq` follows them.
use std::{
    io::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use clap::Parser;
use sluice_agent::{
    datapath, events,
    metrics::{self, Capacities, EndpointStat, EndpointStats, Exporter, Metrics, Ready},
    model::EpId,
    node::Node,
    registry::Registry,
    server,
};
use tracing::info;

#[derive(Parser, Debug)]
#[command(version, about = "Sluice node agent")]
struct Args {
    /// Directory on a bpffs where maps and links are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/sluice")]
    bpffs: PathBuf,
    /// Unix socket the CNI plugin talks to.
    #[arg(long, default_value = sluice_proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Where the endpoint registry is kept.
    #[arg(long, default_value = "/var/lib/sluice")]
    state_dir: PathBuf,
    /// Conntrack table size (entries). An existing pinned table keeps its size.
    #[arg(long, default_value_t = sluice_common::sizes::CONNTRACK)]
    conntrack_size: u32,
    /// Policy map size (entries).
    #[arg(long, default_value_t = sluice_common::sizes::POLICY)]
    policy_size: u32,
    /// Most policy entries one endpoint may hold; past it that endpoint
    /// fails closed (drops everything) and the others are unaffected.
    #[arg(long, default_value_t = sluice_agent::node::DEFAULT_MAX_ENTRIES_PER_ENDPOINT)]
    max_entries_per_endpoint: usize,
    /// Where to serve Prometheus metrics (empty: nowhere).
    #[arg(long, default_value = "127.0.0.1:9962")]
    metrics_addr: String,
    /// Watch this API server through a kubeconfig (cluster mode). Without it,
    /// and outside a cluster, the agent runs standalone: policy only through
    /// the socket's SetPolicy.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name (its pods are the endpoints). Default: $NODE_NAME,
    /// else the host name.
    #[arg(long)]
    node_name: Option<String>,
    /// How programs are attached: auto (TCX where the kernel has it, clsact
    /// otherwise), tcx or clsact.
    #[arg(long, default_value = "auto")]
    tc_attach: datapath::AttachMode,
    /// The cgroup (v2) whose sockets' incoming packets `to_host` sees, to
    /// judge Service traffic that kube-proxy delivers to the node itself
    /// (host-network backends). Default: the root of the cgroup2 mount.
    /// "none": not attached (such traffic is then not judged).
    #[arg(long)]
    host_cgroup: Option<String>,
    /// Log format on stderr: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
}

/// A client for cluster mode: from --kubeconfig, or in-cluster service
/// account; `None` means standalone.
async fn kube_client(args: &Args) -> anyhow::Result<Option<kube::Client>> {
    let config = if let Some(path) = &args.kubeconfig {
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

/// What a scrape needs of the node's state, copied out under its lock.
fn endpoint_stats(node: &Mutex<Node>) -> EndpointStats {
    let Ok(n) = node.lock() else {
        tracing::warn!("agent state poisoned; metrics without endpoints");
        return EndpointStats::default();
    };
    EndpointStats {
        endpoints: n
            .registry
            .all()
            .map(|ep| EndpointStat {
                ep_id: EpId(ep.ep_id),
                namespace: ep.spec.pod_namespace.clone().unwrap_or_default(),
                pod: ep.spec.pod_name.clone().unwrap_or_default(),
                entries: n.entries_of(ep.ep_id),
            })
            .collect(),
        capacity: Capacities {
            policy: n.dp.sizes.policy,
            endpoints: n.dp.sizes.endpoints,
            ipcache: n.dp.sizes.ipcache,
            services: sluice_common::sizes::SERVICES,
        },
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        fmt.json().init();
    } else {
        fmt.init();
    }

    sluice_agent::ensure_bpffs(&args.bpffs)?;
    let sizes = datapath::Sizes {
        conntrack: args.conntrack_size,
        policy: args.policy_size,
        ..Default::default()
    };
    let mut dp = datapath::Datapath::load(&args.bpffs, &sizes).context("loading the data path")?;
    dp.set_attach_mode(args.tc_attach);
    match args.host_cgroup.as_deref() {
        Some("none") => {
            tracing::warn!(
                "--host-cgroup none: Service traffic to host-network backends is not judged"
            );
        }
        given => {
            let cgroup = match given {
                Some(p) => PathBuf::from(p),
                None => sluice_agent::cgroup2_root().context("finding the cgroup2 mount")?,
            };
            dp.attach_host(&cgroup)
                .with_context(|| format!("attaching to_host to {}", cgroup.display()))?;
            info!(cgroup = %cgroup.display(), "to_host attached");
        }
    }
    let ring = dp.take_events().context("drop event ring buffer")?;
    let registry = Registry::open(&args.state_dir).context("opening the endpoint registry")?;
    let mut node = Node::start(dp, registry).context("taking over the node")?;
    node.max_entries_per_endpoint = args.max_entries_per_endpoint;
    let metrics = Metrics::new();
    node.metrics = metrics.clone();
    let pin_dir = node.dp.pin_dir().to_owned();
    let client = kube_client(&args).await?;
    let node_name = args
        .node_name
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_default();
    if client.is_some() {
        node.cluster = Some(sluice_agent::cluster::Cluster::new(
            &node_name,
            metrics.clone(),
        ));
    }
    let node = Arc::new(Mutex::new(node));
    let exporter = {
        let node = node.clone();
        Arc::new(Exporter::new(
            &metrics,
            pin_dir,
            Arc::new(move || endpoint_stats(&node)),
        ))
    };
    let ready = Ready::default();
    let watch_client = client.clone();
    let reconcile = async {
        let Some(client) = watch_client else {
            return std::future::pending::<anyhow::Result<()>>().await;
        };
        info!(node = %node_name, "cluster mode: watching the API server");
        let notices = sluice_agent::k8s::start_notices(client.clone(), &node_name);
        let mut rx = sluice_agent::k8s::start(client, &node_name, metrics.clone());
        let mut routes = sluice_agent::routes::Routes::new().context("netlink connection")?;
        let mut uplinks = std::collections::BTreeSet::new();
        while let Some(first) = rx.recv().await {
            // Take whatever else is queued: one programming pass per batch.
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let shared = node.clone();
            let applied = tokio::task::spawn_blocking(move || match shared.lock() {
                Ok(mut n) => n.apply_changes(batch).map_err(anyhow::Error::from),
                Err(_) => Err(anyhow::anyhow!("agent state poisoned")),
            })
            .await?;
            if let Err(e) = applied {
                tracing::error!(error = %e, "programming cluster changes failed");
            }
            let queued = node
                .lock()
                .ok()
                .and_then(|mut n| n.cluster.as_mut().map(|c| std::mem::take(&mut c.notices)))
                .unwrap_or_default();
            for notice in queued {
                if notices.try_send(notice).is_err() {
                    tracing::warn!("Event queue full: a Warning Event is dropped (the log has it)");
                }
            }
            let desired = node
                .lock()
                .ok()
                .and_then(|n| n.cluster.as_ref().map(|c| c.peer_routes()))
                .unwrap_or_default();
            routes.sync(&desired).await;
            // Deferred (Service) egress to pods on other nodes is judged
            // where it leaves the node.
            for ifname in sluice_agent::routes::uplinks(&desired).difference(&uplinks.clone()) {
                let attached = node
                    .lock()
                    .map_err(|_| anyhow::anyhow!("agent state poisoned"))?
                    .dp
                    .attach_uplink(ifname);
                match attached {
                    Ok(()) => {
                        info!(%ifname, "uplink attached");
                        uplinks.insert(ifname.clone());
                    }
                    Err(e) => {
                        tracing::error!(%ifname, error = %e, "attaching the uplink program failed");
                    }
                }
            }
        }
        Ok(())
    };

    let listener =
        server::bind(&args.socket).with_context(|| format!("binding {}", args.socket.display()))?;
    info!(socket = %args.socket.display(), bpffs = %args.bpffs.display(), "agent ready");
    ready.set(true);

    let (drops, _) = tokio::sync::broadcast::channel(1024);
    let ctx = Arc::new(server::Ctx {
        node: node.clone(),
        drops: drops.clone(),
        client,
    });
    let events = events::follow(ring, |mut rec| {
        if let Ok(n) = node.lock() {
            rec.enrich(|ip| n.pod_of(ip));
        }
        if let Ok(line) = serde_json::to_string(&rec) {
            let mut out = std::io::stdout().lock();
            // A closed stdout must not stop enforcement; the counters still count.
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                tracing::debug!("stdout closed; drop event not printed");
            }
        }
        // No observer is fine.
        let _no_receivers = drops.send(rec);
    });
    let metrics_server = async {
        if args.metrics_addr.is_empty() {
            return std::future::pending().await;
        }
        let l = tokio::net::TcpListener::bind(&args.metrics_addr).await?;
        info!(addr = %args.metrics_addr, "serving metrics");
        metrics::serve(l, exporter, ready).await
    };
    tokio::select! {
        r = server::serve(listener, ctx) => r.context("agent socket")?,
        r = metrics_server => r.context("metrics")?,
        r = events => r.context("drop events")?,
        r = reconcile => r.context("cluster watch")?,
        _ = tokio::signal::ctrl_c() => info!("interrupted; programs stay attached through their pins"),
    }
    Ok(())
}
