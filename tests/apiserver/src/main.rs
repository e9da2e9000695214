//! `sluice-test-apiserver --listen 127.0.0.1:0 --kubeconfig-out PATH`: runs
//! the in-memory test API server until interrupted. The first line on
//! stdout is its URL.

use std::{io::Write as _, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Result;
use clap::Parser;
use sluice_test_apiserver::{Config, Server};

/// A small in-memory Kubernetes API server for tests and demos (plain HTTP on
/// loopback, no authentication; never for a real cluster).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; loopback only. Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write a kubeconfig pointing at the server here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Events kept for watches; older resourceVersions get 410 Gone.
    #[arg(long, default_value_t = 1000)]
    history: usize,
    /// Seconds between BOOKMARK events on watches that allow them.
    #[arg(long, default_value_t = 60.0)]
    bookmark_interval: f64,
    /// Log each request on stderr.
    #[arg(long, short)]
    verbose: bool,
    /// Do not serve ClusterNetworkPolicies: answer like a cluster whose CRD
    /// is not installed.
    #[arg(long)]
    no_custom_resources: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let server = Server::start_with(Config {
        listen: args.listen,
        history_limit: args.history,
        bookmark_interval: Duration::from_secs_f64(args.bookmark_interval.max(0.01)),
        log_requests: args.verbose,
        custom_resources: !args.no_custom_resources,
        ..Config::default()
    })?;
    if let Some(path) = &args.kubeconfig_out {
        server.write_kubeconfig(path)?;
    }
    let mut out = std::io::stdout();
    writeln!(out, "{}", server.url())?;
    out.flush()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    })?;
    drop(server);
    Ok(())
}
