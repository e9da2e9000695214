//! Watching the cluster: kube-rs watchers on Pods, Namespaces,
//! NetworkPolicies, Nodes and Services, turned into one ordered stream of
//! `Change`s for the reconciler. Re-lists, watch restarts, 410 Gone and
//! bookmarks are kube's watcher's job; a (re)list arrives here as one
//! `Resync` holding every object of that kind, so the consumer can drop what
//! disappeared while the watch was down. During an outage nothing arrives and
//! the last programmed state stays enforced.
use std::fmt::Debug;

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        networking::v1::NetworkPolicy,
    },
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        events::{Event, EventType, Recorder, Reporter},
        watcher,
    },
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{cluster::Notice, metrics};

/// The kinds the agent watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pod,
    Namespace,
    NetworkPolicy,
    Node,
    Service,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Pod,
        Kind::Namespace,
        Kind::NetworkPolicy,
        Kind::Node,
        Kind::Service,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Node => "Node",
            Kind::Service => "Service",
        }
    }
}

/// One object of any watched kind.
#[derive(Clone, Debug)]
pub enum Object {
    Pod(Box<Pod>),
    Namespace(Box<Namespace>),
    NetworkPolicy(Box<NetworkPolicy>),
    Node(Box<Node>),
    Service(Box<Service>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Pod(_) => Kind::Pod,
            Object::Namespace(_) => Kind::Namespace,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
            Object::Node(_) => Kind::Node,
            Object::Service(_) => Kind::Service,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Change {
    Applied(Object),
    Deleted(Object),
    /// Every object of `kind` after a (re)list.
    Resync(Kind, Vec<Object>),
}

/// Drops what the agent never reads, so the stores stay small.
fn slim<K: Resource>(mut o: K) -> K {
    o.meta_mut().managed_fields = None;
    o.meta_mut().annotations = None;
    o
}

/// Watches one kind and forwards its changes. Runs until `tx` closes.
async fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    wrap: fn(K) -> Object,
    tx: mpsc::Sender<Change>,
    metrics: metrics::Shared,
) where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let set_up = |up: u8| {
        if let Ok(mut m) = metrics.lock() {
            m.watch_up.insert(kind.name(), up);
        }
    };
    set_up(0);
    let start = || {
        watcher(api.clone(), config.clone())
            .default_backoff()
            .boxed()
    };
    let mut stream = start();
    let mut listing: Vec<Object> = Vec::new();
    loop {
        let change = match stream.try_next().await {
            Ok(Some(watcher::Event::Init)) => {
                listing.clear();
                continue;
            }
            Ok(Some(watcher::Event::InitApply(o))) => {
                listing.push(wrap(slim(o)));
                continue;
            }
            Ok(Some(watcher::Event::InitDone)) => {
                info!(kind = kind.name(), objects = listing.len(), "listed");
                set_up(1);
                Change::Resync(kind, std::mem::take(&mut listing))
            }
            Ok(Some(watcher::Event::Apply(o))) => Change::Applied(wrap(slim(o))),
            Ok(Some(watcher::Event::Delete(o))) => Change::Deleted(wrap(slim(o))),
            Ok(None) => return,
            Err(e) => {
                // The backoff retries; until the re-list completes the maps
                // keep what they have (never opened).
                warn!(kind = kind.name(), error = %e, "watch failed; retrying");
                if matches!(&e, watcher::Error::WatchError(s) if s.code == 410) {
                    // Gone: our resourceVersion is older than the server's
                    // history. Start over with a fresh list right away (the
                    // watcher, seen here, otherwise kept re-watching from
                    // the stale version for a minute).
                    listing.clear();
                    stream = start();
                }
                set_up(0);
                if let Ok(mut m) = metrics.lock() {
                    *m.watch_errors.entry(kind.name()).or_default() += 1;
                }
                continue;
            }
        };
        if tx.send(change).await.is_err() {
            return;
        }
    }
}

/// Starts the watchers; changes arrive on the returned channel.
pub fn start(client: Client, node_name: &str, metrics: metrics::Shared) -> mpsc::Receiver<Change> {
    let (tx, rx) = mpsc::channel(1024);
    let cfg = watcher::Config::default;
    tokio::spawn(watch_kind(
        Api::<Pod>::all(client.clone()),
        cfg(),
        Kind::Pod,
        |o| Object::Pod(Box::new(o)),
        tx.clone(),
        metrics.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<Namespace>::all(client.clone()),
        cfg(),
        Kind::Namespace,
        |o| Object::Namespace(Box::new(o)),
        tx.clone(),
        metrics.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<NetworkPolicy>::all(client.clone()),
        cfg(),
        Kind::NetworkPolicy,
        |o| Object::NetworkPolicy(Box::new(o)),
        tx.clone(),
        metrics.clone(),
    ));
    // Every Node: ours gives the IPAM ranges, the others the routes to
    // their pod CIDRs.
    let _ = node_name;
    tokio::spawn(watch_kind(
        Api::<Node>::all(client.clone()),
        cfg(),
        Kind::Node,
        |o| Object::Node(Box::new(o)),
        tx.clone(),
        metrics.clone(),
    ));
    // Services: their ClusterIPs, whose new flows have their egress judged
    // after kube-proxy's DNAT.
    tokio::spawn(watch_kind(
        Api::<Service>::all(client),
        cfg(),
        Kind::Service,
        |o| Object::Service(Box::new(o)),
        tx,
        metrics,
    ));
    rx
}

/// `namespace/name` (or `name`) and resourceVersion of an object, for status.
pub fn object_ref(o: &Object) -> (String, String) {
    let (ns, name, rv) = match o {
        Object::Pod(p) => (p.namespace(), p.name_any(), p.resource_version()),
        Object::Namespace(n) => (None, n.name_any(), n.resource_version()),
        Object::NetworkPolicy(p) => (p.namespace(), p.name_any(), p.resource_version()),
        Object::Node(n) => (None, n.name_any(), n.resource_version()),
        Object::Service(s) => (s.namespace(), s.name_any(), s.resource_version()),
    };
    let key = match ns {
        Some(ns) => format!("{}/{ns}/{name}", o.kind().name()),
        None => format!("{}/{name}", o.kind().name()),
    };
    (key, rv.unwrap_or_default())
}

/// Posts the Warning Events the reconciler queues (`cluster::Notice`), as
/// `sluice-agent` on `node_name`, so that `kubectl describe` shows why a
/// rule is not in force. Reason `Invalid<Kind>` (e.g. InvalidNetworkPolicy).
/// A failed post is logged and not retried: the agent's log already has the
/// problem, and a full queue drops notices rather than slow programming.
pub fn start_notices(client: Client, node_name: &str) -> mpsc::Sender<Notice> {
    let (tx, mut rx) = mpsc::channel::<Notice>(256);
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "sluice-agent".into(),
            instance: Some(node_name.to_owned()),
        },
    );
    tokio::spawn(async move {
        while let Some(n) = rx.recv().await {
            let kind = n.regarding.kind.clone().unwrap_or_default();
            let event = Event {
                type_: EventType::Warning,
                reason: format!("Invalid{kind}"),
                note: Some(format!("{} (the rule concerned denies)", n.note)),
                action: "CompilePolicy".into(),
                secondary: None,
            };
            match recorder.publish(&event, &n.regarding).await {
                Ok(()) => {
                    info!(kind = %kind, namespace = ?n.regarding.namespace, name = ?n.regarding.name, "posted a Warning Event");
                }
                Err(e) => {
                    warn!(kind = %kind, namespace = ?n.regarding.namespace, name = ?n.regarding.name, error = %e, "posting a Warning Event failed");
                }
            }
        }
    });
    tx
}
