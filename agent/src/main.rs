//! `sluice-agent`: wiring only. Logs go to stderr (tracing); drop events go
//! to stdout, one JSON object per line, so `sluice-agent | jq` follows them.
use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use sluice_agent::{
    cluster::{self, Cluster},
    config::{Args, Command},
    datapath::FlowEventsMap,
    flows::{self, FlowSwitch, History},
    install,
    metrics::{self, EndpointsProvider, Exporter, Metrics, Ready},
    reconcile::Reconciler,
    server,
};
use tracing::info;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.init_tracing();
    match &args.command {
        Some(Command::InstallCni(a)) => return Ok(install::install_cni(a)?),
        Some(Command::Uninstall(a)) => {
            install::uninstall_cmd(a)?;
            return sluice_agent::reconcile::vxlan::uninstall().await;
        }
        None => {}
    }
    let metrics = Metrics::new();
    let client = args.kube_client().await?;
    let node_name = args.node_name();
    let cluster = client.as_ref().map(|_| Cluster::new(&node_name));
    let (state, drops) = args.take_over(&metrics, cluster)?;
    let pin_dir = state.dp.pin_dir().to_owned();
    let reconciler = Reconciler::new(state, metrics.clone(), args.delete_queue());
    // Removals queued while the agent was down are finished before the
    // socket serves.
    reconciler.drain_delete_queue_at_start().await;

    let listener =
        server::bind(&args.socket).with_context(|| format!("binding {}", args.socket.display()))?;
    info!(socket = %args.socket.display(), bpffs = %args.bpffs.display(), "agent started");
    // Programs are attached by now. Standalone: synced now. Cluster mode:
    // once every kind is listed and programmed (the reconciler says so).
    let ready = Ready::default();
    ready.set_synced(client.is_none());
    let (drops_tx, _) = tokio::sync::broadcast::channel(1024);
    let history = Arc::new(History::new(flows::HISTORY));
    let flow_map = FlowEventsMap::open(&pin_dir)
        .map_err(|e| tracing::warn!(error = %e, "no flow-event switch; flows are not reported"))
        .ok();
    let flow_switch = FlowSwitch::new(flow_map, args.flow_events);
    // A policy in audit mode keeps flows reported (would-drops are judged
    // on them).
    let audit = reconciler.audit_view();
    if let Some(a) = &audit {
        let switch = flow_switch.clone();
        a.set_listener(move |on| switch.set_audit(on));
    }
    let ctx = Arc::new(server::Ctx {
        reconciler: reconciler.clone(),
        drops: drops_tx.clone(),
        history: history.clone(),
        flows: flow_switch.clone(),
        client: client.clone(),
    });
    let serving = async {
        ready.set_serving(true);
        server::serve(listener, ctx).await
    };
    let resync = Duration::from_secs(args.resync_seconds.max(1));
    let watch = async {
        let Some(client) = client.clone() else {
            return std::future::pending().await;
        };
        info!(node = %node_name, "cluster mode: watching the API server");
        let notices = cluster::start_notices(client.clone(), &node_name);
        let changes = cluster::watch::start(client, metrics.clone());
        reconciler
            .clone()
            .run(changes, notices, resync, ready.clone(), args.tunnel())
            .await
    };
    let conflist = async {
        let (Some(dir), Some(file)) = (&args.cni_conf_dir, &args.cni_conflist) else {
            return std::future::pending().await;
        };
        let (socket, file, dir) = (args.socket.clone(), file.clone(), dir.clone());
        install::write_conflist_when_ready(ready.clone(), socket, file, dir, resync).await
    };
    let events = drops.follow(|mut rec| {
        rec.enrich(|ip| reconciler.pod_of(ip).map(|p| (p.namespace, p.name)));
        rec.name_rule(&reconciler.rule_names());
        rec.name_isolators(&reconciler.isolators());
        // Forwarded flows go to stdout only with --flow-events (observers
        // and audit mode turn them on for their own use).
        if !rec.is_forwarded() || args.flow_events {
            rec.print();
        }
        let judged = match (&audit, rec.is_forwarded()) {
            (Some(a), true) => rec
                .flow()
                .and_then(|(me, peer, dir, port)| a.judge(me, dir, peer, rec.l4, port))
                .map(|w| {
                    for p in &w.policies {
                        metrics.would_drop(w.kind, p);
                    }
                    rec.would_drop(&w)
                }),
            _ => None,
        };
        // No observer is fine.
        let _no_receivers = drops_tx.send(history.push(rec));
        if let Some(w) = judged {
            w.print();
            let _no_receivers = drops_tx.send(history.push(w));
        }
    });
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
    let resync = Duration::from_secs(args.resync_seconds.max(1));
    let drain = reconciler.drain_delete_queue_every(resync);
    tokio::select! {
        r = serving => r.context("agent socket")?,
        r = drain => r.context("deletion queue")?,
        r = metrics_server => r.context("metrics")?,
        r = events => r.context("drop events")?,
        r = watch => r.context("cluster watch")?,
        r = conflist => r.context("CNI conflist")?,
        _ = tokio::signal::ctrl_c() => info!("interrupted; programs stay attached through their pins"),
    }
    Ok(())
}
