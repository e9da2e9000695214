//! `sluice-agent`: wiring only. Logs go to stderr (tracing); drop events go
//! to stdout, one JSON object per line, so `sluice-agent | jq` follows them.
use std::{io::Write as _, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use sluice_agent::{
    cluster::{self, Cluster},
    config::Args,
    datapath::Datapath,
    endpoints::{Endpoints, Registry},
    events::DropRecord,
    metrics::{self, EndpointsProvider, Exporter, Metrics, Ready},
    reconcile::{Reconciler, State},
    server,
};
use tracing::info;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.init_tracing();
    sluice_agent::ensure_bpffs(&args.bpffs)?;
    let (mut dp, drops) = Datapath::load(&args.bpffs, &args.sizes(), args.tc_attach)
        .context("loading the data path")?;
    match args.host_cgroup()? {
        Some(cgroup) => {
            dp.programs
                .attach_host(&cgroup)
                .with_context(|| format!("attaching to_host to {}", cgroup.display()))?;
            info!(cgroup = %cgroup.display(), "to_host attached");
        }
        None => tracing::warn!(
            "--host-cgroup none: Service traffic to host-network backends is not judged"
        ),
    }
    let metrics = Metrics::new();
    let registry = Registry::open(&args.state_dir).context("opening the endpoint registry")?;
    let endpoints = Endpoints::start(
        &mut dp,
        registry,
        args.max_entries_per_endpoint,
        metrics.clone(),
    )
    .context("taking over the node's endpoints")?;
    let client = args.kube_client().await?;
    let node_name = args.node_name();
    let cluster = client.as_ref().map(|_| Cluster::new(&node_name));
    let pin_dir = dp.pin_dir().to_owned();
    let mut state = State::new(dp, endpoints, cluster);
    state.program_host_addresses()?;
    let reconciler = Reconciler::new(state, metrics.clone());

    let listener =
        server::bind(&args.socket).with_context(|| format!("binding {}", args.socket.display()))?;
    info!(socket = %args.socket.display(), bpffs = %args.bpffs.display(), "agent ready");
    // Standalone: ready now. Cluster mode: once every kind is listed and
    // programmed (the reconciler says so).
    let ready = Ready::default();
    ready.set(client.is_none());
    let (drops_tx, _) = tokio::sync::broadcast::channel(1024);
    let ctx = Arc::new(server::Ctx {
        reconciler: reconciler.clone(),
        drops: drops_tx.clone(),
        client: client.clone(),
    });
    let watch = async {
        let Some(client) = client.clone() else {
            return std::future::pending().await;
        };
        info!(node = %node_name, "cluster mode: watching the API server");
        let notices = cluster::start_notices(client.clone(), &node_name);
        let changes = cluster::watch::start(client, metrics.clone());
        let resync = Duration::from_secs(args.resync_seconds.max(1));
        reconciler
            .clone()
            .run(changes, notices, resync, ready.clone())
            .await
    };
    let events = drops.follow(|rec| print_drop(rec, &reconciler, &drops_tx));
    let metrics_server = async {
        if args.metrics_addr.is_empty() {
            return std::future::pending().await;
        }
        let l = tokio::net::TcpListener::bind(&args.metrics_addr).await?;
        info!(addr = %args.metrics_addr, "serving metrics");
        let r = reconciler.clone();
        let stats: EndpointsProvider = Arc::new(move || r.endpoint_stats());
        let exporter = Arc::new(Exporter::new(&metrics, pin_dir.clone(), stats));
        metrics::serve(l, exporter, ready.clone()).await
    };
    tokio::select! {
        r = server::serve(listener, ctx) => r.context("agent socket")?,
        r = metrics_server => r.context("metrics")?,
        r = events => r.context("drop events")?,
        r = watch => r.context("cluster watch")?,
        _ = tokio::signal::ctrl_c() => info!("interrupted; programs stay attached through their pins"),
    }
    Ok(())
}

/// One drop: named by its pods, printed as a JSON line, passed to observers.
fn print_drop(
    mut rec: DropRecord,
    reconciler: &Reconciler,
    observers: &tokio::sync::broadcast::Sender<DropRecord>,
) {
    rec.enrich(|ip| reconciler.pod_of(ip).map(|p| (p.namespace, p.name)));
    if let Ok(line) = serde_json::to_string(&rec) {
        let mut out = std::io::stdout().lock();
        // A closed stdout must not stop enforcement; the counters still count.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            tracing::debug!("stdout closed; drop event not printed");
        }
    }
    // No observer is fine.
    let _no_receivers = observers.send(rec);
}
