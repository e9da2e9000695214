//! The CNI socket: one JSON request line in, one JSON response line out.
//! The socket is created mode 0600 and every peer's uid is checked, so only
//! root (the container runtime running the plugin) can change endpoints.
use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use sluice_common::not_found_ok;
use sluice_proto::{Request, Response, code};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use crate::{
    cluster::Change,
    endpoints::pod_of,
    events::wants_flows,
    flows::{FlowSwitch, History, Numbered, monotonic_ns},
    reconcile::Reconciler,
};

/// Longest request accepted: a policy for one endpoint fits easily.
const MAX_REQUEST: u64 = 4 << 20;

pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    not_found_ok(std::fs::remove_file(path))?;
    // Bind under a restrictive umask so the socket is never world-writable,
    // not even for the moment before chmod.
    // SAFETY: umask only swaps the process mask.
    let old = unsafe { libc::umask(0o077) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// What request handlers share.
pub struct Ctx {
    pub reconciler: Reconciler,
    /// Every record (drops, forwarded flows, would-drops), enriched and
    /// numbered, for `Observe` streams.
    pub drops: tokio::sync::broadcast::Sender<Numbered>,
    /// The last records, for `Observe` replays.
    pub history: Arc<History>,
    /// On while an observer wants forwarded flows.
    pub flows: FlowSwitch,
    /// The API client in cluster mode, to fetch a pod the watch has not
    /// delivered yet when its CNI ADD arrives.
    pub client: Option<kube::Client>,
}

/// How long ADD may wait for a pod from the API server.
const POD_FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// In cluster mode, makes sure the compiler knows the pod of an ADD.
async fn ensure_pod_known(ctx: &Ctx, spec: &sluice_proto::EndpointSpec) -> Result<(), Response> {
    let Some(client) = &ctx.client else {
        return Ok(());
    };
    let Some(pod) = pod_of(spec) else {
        return Ok(());
    };
    let uid = spec.pod_uid.clone();
    if ctx
        .reconciler
        .knows_pod(pod.clone(), uid)
        .await
        .unwrap_or(false)
    {
        return Ok(());
    }
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(client.clone(), &pod.namespace);
    let fetched = tokio::time::timeout(POD_FETCH_TIMEOUT, api.get(&pod.name)).await;
    let p = match fetched {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            // The API server's own words when it answered, else the error.
            let details = match &e {
                kube::Error::Api(s) => format!("{} ({})", s.message, s.reason),
                other => other.to_string(),
            };
            return Err(Response::error(
                code::TRY_AGAIN_LATER,
                format!("fetching pod {pod}"),
                details,
            ));
        }
        Err(_) => {
            return Err(Response::error(
                code::TRY_AGAIN_LATER,
                format!("fetching pod {pod}"),
                "timed out",
            ));
        }
    };
    ctx.reconciler
        .apply(vec![Change::Applied(crate::cluster::Object::Pod(
            Box::new(p),
        ))])
        .await
        .map_err(|e| e.to_response())
}

pub async fn serve(listener: UnixListener, ctx: Arc<Ctx>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, ctx).await {
                warn!(error = %e, "agent socket connection failed");
            }
        });
    }
}

async fn handle(stream: UnixStream, ctx: Arc<Ctx>) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (rd, mut wr) = stream.into_split();
    let response = if uid != 0 {
        Response::error(
            code::NOT_AVAILABLE,
            "permission denied",
            format!("peer uid {uid} is not root"),
        )
    } else {
        let mut line = String::new();
        let mut rd = BufReader::new(rd);
        (&mut rd).take(MAX_REQUEST).read_line(&mut line).await?;
        match serde_json::from_str::<Request>(line.trim_end()) {
            Ok(Request::Observe { filter, replay }) => {
                return observe(rd, wr, &ctx, &filter, &replay).await;
            }
            Ok(req) => {
                debug!(?req, "request");
                let fetched = match &req {
                    Request::AddEndpoint { endpoint } => ensure_pod_known(&ctx, endpoint).await,
                    _ => Ok(()),
                };
                match fetched {
                    Err(resp) => resp,
                    Ok(()) => dispatch(&ctx.reconciler, req).await,
                }
            }
            Err(e) => Response::error(
                code::INVALID_CONFIG,
                "request is not valid JSON",
                e.to_string(),
            ),
        }
    };
    let line = response.to_line().unwrap_or_else(|_| {
        "{\"result\":\"error\",\"code\":5,\"msg\":\"encoding\",\"details\":\"\"}\n".into()
    });
    wr.write_all(line.as_bytes()).await?;
    wr.shutdown().await
}

/// Streams matching records until the client goes away: first the kept
/// ones `replay` asks for, then live ones (none twice, none skipped). An
/// observer of forwarded flows holds the flow switch on meanwhile.
async fn observe(
    mut rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut wr: tokio::net::unix::OwnedWriteHalf,
    ctx: &Ctx,
    filter: &sluice_proto::ObserveFilter,
    replay: &sluice_proto::Replay,
) -> std::io::Result<()> {
    let _flows = wants_flows(filter.verdict.as_deref()).then(|| ctx.flows.observe());
    // Subscribed before the history is read: a record pushed in between
    // is in both, and skipped live by its number.
    let mut rx = ctx.drops.subscribe();
    let mut seen = 0;
    if !replay.is_none() {
        let since = replay
            .since_ms
            .map(|ms| monotonic_ns().saturating_sub(ms.saturating_mul(1_000_000)));
        let (past, last_seq) = ctx
            .history
            .replay(|r| r.matches(filter), since, replay.last);
        seen = last_seq;
        for rec in past {
            let mut line = serde_json::to_string(&rec).unwrap_or_default();
            line.push('\n');
            wr.write_all(line.as_bytes()).await?;
        }
    }
    let mut scratch = [0u8; 64];
    loop {
        let received = tokio::select! {
            r = rx.recv() => r,
            // The client sends nothing more: EOF (or an error) means it
            // went away, and its hold on the flow switch goes with it now,
            // not at the next record.
            r = rd.read(&mut scratch) => match r {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => continue,
            },
        };
        match received {
            Ok(n) if n.seq > seen && n.rec.matches(filter) => {
                let mut line = serde_json::to_string(&n.rec).unwrap_or_default();
                line.push('\n');
                wr.write_all(line.as_bytes()).await?;
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                warn!(missed = n, "observer too slow; records skipped");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

/// Longest probe timeout accepted.
const MAX_PROBE_TIMEOUT_MS: u64 = 60_000;

/// One `sluice assert` probe from inside the local pod `from`.
async fn probe(
    r: &Reconciler,
    from: &str,
    to: String,
    port: u16,
    protocol: &str,
    timeout_ms: u64,
) -> Response {
    let bad = |why: String| Response::error(code::INVALID_CONFIG, "cannot probe", why);
    let Some(proto) = crate::probe::Protocol::parse(protocol) else {
        return bad(format!("protocol {protocol:?}: TCP or UDP"));
    };
    let pod = match from.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            crate::model::ObjectRef::new(ns, name)
        }
        _ => return bad(format!("from {from:?}: expected NAMESPACE/POD")),
    };
    if port == 0 || timeout_ms == 0 || timeout_ms > MAX_PROBE_TIMEOUT_MS {
        return bad(format!(
            "port {port} and timeout {timeout_ms}ms: a port, and 1..={MAX_PROBE_TIMEOUT_MS}ms"
        ));
    }
    let (netns, ip) = match r.probe_plan(pod, to).await {
        Ok(Ok(plan)) => plan,
        Ok(Err((c, why))) => return Response::error(c, "cannot probe", why),
        Err(e) => return e.to_response(),
    };
    let to = std::net::SocketAddr::new(ip, port);
    let timeout = std::time::Duration::from_millis(timeout_ms);
    match crate::probe::run(netns, to, proto, timeout).await {
        Ok(o) => Response::Probe {
            address: ip.to_string(),
            open: o.open,
            detail: o.detail,
        },
        Err(e) => {
            warn!(error = %e, %to, "probe failed to run");
            Response::error(code::IO_FAILURE, "probe failed", e.to_string())
        }
    }
}

async fn dispatch(r: &Reconciler, req: Request) -> Response {
    let result = match req {
        Request::Status => Ok(Response::Ok),
        Request::AddEndpoint { endpoint } => {
            r.add_endpoint(endpoint)
                .await
                .map(|(ep_id, phases)| Response::Endpoint {
                    ep_id: ep_id.0,
                    phases: Some(phases),
                })
        }
        Request::DelEndpoint { attachment } => r.del_endpoint(attachment).await.map(|deferred| {
            if deferred {
                Response::RemovalDeferred
            } else {
                Response::Ok
            }
        }),
        Request::CheckEndpoint { attachment } => {
            r.check_endpoint(attachment)
                .await
                .map(|ep_id| Response::Endpoint {
                    ep_id: ep_id.0,
                    phases: None,
                })
        }
        Request::Gc { valid } => r.gc(valid).await.map(|_| Response::Ok),
        Request::SetPolicy { attachment, policy } => r
            .set_policy(attachment, policy)
            .await
            .map(|()| Response::Ok),
        // Handled before dispatch: it streams instead of answering once.
        Request::Observe { .. } => Ok(Response::error(
            code::INVALID_CONFIG,
            "observe is a stream",
            "",
        )),
        Request::Programmed => r
            .programmed(None)
            .await
            .map(|(synced, objects)| Response::Programmed { synced, objects }),
        Request::ProgrammedOf { keys } => r
            .programmed(Some(keys))
            .await
            .map(|(synced, objects)| Response::Programmed { synced, objects }),
        Request::Info => {
            r.info()
                .await
                .map(|(mode, node, synced)| Response::Info { mode, node, synced })
        }
        Request::Explain { from, to, flow } => r.explain(from, to, flow).await.map(|e| match e {
            Ok(list) => Response::Explain {
                explanations: list
                    .iter()
                    .filter_map(|e| serde_json::to_value(e).ok())
                    .collect(),
            },
            Err(why) => Response::error(code::INVALID_CONFIG, "cannot explain", why),
        }),
        Request::Objects => r.objects().await.map(|list| match list {
            Some(list) => Response::Objects { list },
            None => Response::error(
                code::INVALID_CONFIG,
                "no objects",
                "the agent runs standalone: it watches no API server",
            ),
        }),
        Request::Pods { namespace, labels } => r
            .pods_matching(namespace, labels)
            .await
            .map(|pods| Response::Pods { pods }),
        Request::Probe {
            from,
            to,
            port,
            protocol,
            timeout_ms,
        } => Ok(probe(r, &from, to, port, &protocol, timeout_ms).await),
        Request::PodCidrs => r
            .pod_cidrs()
            .await
            .map(|cidrs| Response::PodCidrs { cidrs }),
    };
    result.unwrap_or_else(|e| {
        warn!(error = %e, code = e.cni_code(), "request failed");
        e.to_response()
    })
}
