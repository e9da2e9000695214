//! Watching the cluster: kube-rs watchers on Pods, Namespaces,
//! NetworkPolicies, Nodes, Services and ClusterNetworkPolicies, turned into
//! one ordered stream of `Change`s for the reconciler. Re-lists, watch restarts, 410 Gone and
//! bookmarks are kube's watcher's job; a (re)list arrives here as one
//! `Resync` holding every object of that kind, so the consumer can drop what
//! disappeared while the watch was down. During an outage nothing arrives and
//! the last programmed state stays enforced.
//!
//! ClusterNetworkPolicy is a custom resource: a cluster without its CRD
//! answers 404. That counts as an empty list (said once in the log), so
//! NetworkPolicy keeps working; the watch keeps retrying with its backoff
//! and picks the kind up once the CRD is installed.
use std::fmt::Debug;

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, ObjectReference, Pod, Service},
        networking::v1::NetworkPolicy,
    },
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use sluice_api::ClusterNetworkPolicy;
use tokio::sync::mpsc;
use tracing::{info, warn};

pub use super::known::Kept;
use crate::{
    metrics::Metrics,
    model::{Kind, ObjKey},
};

/// One object of any watched kind.
#[derive(Clone, Debug)]
pub enum Object {
    Pod(Box<Pod>),
    Namespace(Box<Namespace>),
    NetworkPolicy(Box<NetworkPolicy>),
    Node(Box<Node>),
    Service(Box<Service>),
    ClusterNetworkPolicy(Box<ClusterNetworkPolicy>),
}

impl Object {
    /// As the API server would serve it (apiVersion and kind included).
    pub fn to_json(&self) -> serde_json::Result<serde_json::Value> {
        match self {
            Self::Pod(o) => serde_json::to_value(o),
            Self::Namespace(o) => serde_json::to_value(o),
            Self::NetworkPolicy(o) => serde_json::to_value(o),
            Self::Node(o) => serde_json::to_value(o),
            Self::Service(o) => serde_json::to_value(o),
            Self::ClusterNetworkPolicy(o) => serde_json::to_value(o),
        }
    }

    /// Its kind, namespace and name.
    pub fn key(&self) -> ObjKey {
        let (ns, name) = match self {
            Object::Pod(p) => (p.namespace(), p.name_any()),
            Object::Namespace(n) => (None, n.name_any()),
            Object::NetworkPolicy(p) => (p.namespace(), p.name_any()),
            Object::Node(n) => (None, n.name_any()),
            Object::Service(s) => (s.namespace(), s.name_any()),
            Object::ClusterNetworkPolicy(c) => (None, c.name_any()),
        };
        ObjKey::new(self.kind(), ns.unwrap_or_default(), name)
    }

    pub fn resource_version(&self) -> String {
        match self {
            Object::Pod(p) => p.resource_version(),
            Object::Namespace(n) => n.resource_version(),
            Object::NetworkPolicy(p) => p.resource_version(),
            Object::Node(n) => n.resource_version(),
            Object::Service(s) => s.resource_version(),
            Object::ClusterNetworkPolicy(c) => c.resource_version(),
        }
        .unwrap_or_default()
    }

    /// Its UID: which incarnation of the name it is.
    pub fn uid(&self) -> Option<String> {
        match self {
            Object::Pod(p) => p.uid(),
            Object::Namespace(n) => n.uid(),
            Object::NetworkPolicy(p) => p.uid(),
            Object::Node(n) => n.uid(),
            Object::Service(s) => s.uid(),
            Object::ClusterNetworkPolicy(c) => c.uid(),
        }
    }

    /// Its reference, for an Event.
    pub fn reference(&self) -> ObjectReference {
        match self {
            Object::Pod(p) => p.object_ref(&()),
            Object::Namespace(n) => n.object_ref(&()),
            Object::NetworkPolicy(p) => p.object_ref(&()),
            Object::Node(n) => n.object_ref(&()),
            Object::Service(s) => s.object_ref(&()),
            Object::ClusterNetworkPolicy(c) => c.object_ref(&()),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Object::Pod(_) => Kind::Pod,
            Object::Namespace(_) => Kind::Namespace,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
            Object::Node(_) => Kind::Node,
            Object::Service(_) => Kind::Service,
            Object::ClusterNetworkPolicy(_) => Kind::ClusterNetworkPolicy,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Change {
    Applied(Object),
    Deleted(Object),
    /// Every object of `kind` after a (re)list (pods kept compact, see
    /// `Kept`).
    Resync(Kind, Vec<Kept>),
}

impl Change {
    /// A (re)list of these objects.
    pub fn resync(kind: Kind, objects: Vec<Object>) -> Self {
        Change::Resync(kind, objects.into_iter().map(Kept::from).collect())
    }
}

/// Drops what the agent never reads, so the stores stay small: managed
/// fields, and every annotation but the audit-mode one
/// (`policy::audit::ENFORCEMENT`).
fn slim<K: Resource>(mut o: K) -> K {
    let meta = o.meta_mut();
    meta.managed_fields = None;
    meta.annotations = meta
        .annotations
        .take()
        .map(|mut a| {
            a.retain(|k, _| k == crate::policy::audit::ENFORCEMENT);
            a
        })
        .filter(|a| !a.is_empty());
    o
}

/// Whether a kind's CRD may be missing (a 404 then means "none").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Crd {
    /// A built-in kind: a 404 is an error like any other.
    BuiltIn,
    /// A custom resource: a 404 is an empty list.
    MayBeMissing,
}

/// Watches one kind and forwards its changes. Runs until `tx` closes.
async fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    (kind, crd): (Kind, Crd),
    wrap: fn(K) -> Object,
    tx: mpsc::Sender<Change>,
    metrics: Metrics,
) where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let set_up = |up: bool| metrics.watch_up(kind, up);
    set_up(false);
    let start = || {
        watcher(api.clone(), config.clone())
            .default_backoff()
            .boxed()
    };
    let mut stream = start();
    let mut listing: Vec<Kept> = Vec::new();
    // The CRD is known to be missing (reported as an empty list).
    let mut missing = false;
    loop {
        let change = match stream.try_next().await {
            Ok(Some(watcher::Event::Init)) => {
                listing.clear();
                continue;
            }
            Ok(Some(watcher::Event::InitApply(o))) => {
                listing.push(Kept::from(wrap(slim(o))));
                continue;
            }
            Ok(Some(watcher::Event::InitDone)) => {
                info!(kind = kind.name(), objects = listing.len(), "listed");
                missing = false;
                set_up(true);
                Change::Resync(kind, std::mem::take(&mut listing))
            }
            Ok(Some(watcher::Event::Apply(o))) => {
                set_up(true);
                Change::Applied(wrap(slim(o)))
            }
            Ok(Some(watcher::Event::Delete(o))) => {
                set_up(true);
                Change::Deleted(wrap(slim(o)))
            }
            Ok(None) => return,
            Err(e) if crd == Crd::MayBeMissing && is_not_found(&e) => {
                // The backoff retries quietly; only the change is news.
                if missing {
                    continue;
                }
                missing = true;
                warn!(
                    kind = kind.name(),
                    "the API server does not serve this kind (its CRD is not installed); \
                     treating it as empty and retrying in the background"
                );
                listing.clear();
                set_up(true);
                Change::Resync(kind, Vec::new())
            }
            Err(e) => {
                // The backoff retries; until the re-list completes the maps
                // keep what they have (never opened).
                warn!(kind = kind.name(), error = %e, "watch failed; retrying");
                if is_gone(&e) {
                    // Gone: our resourceVersion is older than the server's
                    // history. Start over with a fresh list right away (the
                    // watcher re-lists after a 410 event, but keeps
                    // re-watching from the stale version when the watch
                    // request itself is answered 410).
                    listing.clear();
                    stream = start();
                }
                set_up(false);
                metrics.watch_error(kind);
                continue;
            }
        };
        if tx.send(change).await.is_err() {
            return;
        }
    }
}

/// 404 Not Found on the list or watch request: the server does not serve
/// the kind.
fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// 410 Gone, as a watch event or as the answer to the watch request.
fn is_gone(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(s) => s.code == 410,
        watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 410,
        _ => false,
    }
}

/// Starts the watchers; changes arrive on the returned channel.
pub fn start(client: Client, metrics: Metrics) -> mpsc::Receiver<Change> {
    let (tx, rx) = mpsc::channel(1024);
    let cfg = watcher::Config::default;
    tokio::spawn(watch_kind(
        Api::<Pod>::all(client.clone()),
        cfg(),
        (Kind::Pod, Crd::BuiltIn),
        |o| Object::Pod(Box::new(o)),
        tx.clone(),
        metrics.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<Namespace>::all(client.clone()),
        cfg(),
        (Kind::Namespace, Crd::BuiltIn),
        |o| Object::Namespace(Box::new(o)),
        tx.clone(),
        metrics.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<NetworkPolicy>::all(client.clone()),
        cfg(),
        (Kind::NetworkPolicy, Crd::BuiltIn),
        |o| Object::NetworkPolicy(Box::new(o)),
        tx.clone(),
        metrics.clone(),
    ));
    // Every Node: ours gives the IPAM ranges, the others the routes to
    // their pod CIDRs.
    tokio::spawn(watch_kind(
        Api::<Node>::all(client.clone()),
        cfg(),
        (Kind::Node, Crd::BuiltIn),
        |o| Object::Node(Box::new(o)),
        tx.clone(),
        metrics.clone(),
    ));
    // Services: their ClusterIPs, whose new flows have their egress judged
    // after kube-proxy's DNAT.
    tokio::spawn(watch_kind(
        Api::<Service>::all(client.clone()),
        cfg(),
        (Kind::Service, Crd::BuiltIn),
        |o| Object::Service(Box::new(o)),
        tx.clone(),
        metrics.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<ClusterNetworkPolicy>::all(client),
        cfg(),
        (Kind::ClusterNetworkPolicy, Crd::MayBeMissing),
        |o| Object::ClusterNetworkPolicy(Box::new(o)),
        tx,
        metrics,
    ));
    rx
}

#[cfg(test)]
mod tests {
    //! The watch path against a scripted API server (tower-test's mock
    //! service under a real kube `Client`): each step answers the request
    //! the watcher makes and checks what it asked for and what came out.
    use std::collections::BTreeMap;

    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock;

    use super::*;

    type Handle = mock::Handle<Request<Body>, Response<Body>>;

    fn policy(name: &str, rv: &str) -> Value {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": name, "namespace": "x", "resourceVersion": rv},
               "spec": {"podSelector": {}}})
    }

    fn list(items: &[Value], rv: &str) -> (StatusCode, String) {
        let list = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicyList",
                          "metadata": {"resourceVersion": rv}, "items": items});
        (StatusCode::OK, list.to_string())
    }

    /// A watch response: one JSON event per line, then the server closes it.
    fn events(events: &[(&str, Value)]) -> (StatusCode, String) {
        let lines: Vec<String> = events
            .iter()
            .map(|(t, o)| json!({"type": t, "object": o}).to_string() + "\n")
            .collect();
        (StatusCode::OK, lines.concat())
    }

    fn status(code: u16, reason: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
               "message": reason, "reason": reason, "code": code})
    }

    fn bookmark(rv: &str) -> Value {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"resourceVersion": rv}})
    }

    /// Answers the watcher's next request; returns its query parameters.
    async fn serve(
        handle: &mut Handle,
        (code, body): (StatusCode, String),
    ) -> BTreeMap<String, String> {
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(
            req.uri().path(),
            "/apis/networking.k8s.io/v1/networkpolicies"
        );
        let query = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let resp = Response::builder()
            .status(code)
            .body(Body::from(body.into_bytes()))
            .unwrap();
        send.send_response(resp);
        query
    }

    fn is_watch(q: &BTreeMap<String, String>, rv: &str) -> bool {
        q.get("watch").map(String::as_str) == Some("true")
            && q.get("resourceVersion").map(String::as_str) == Some(rv)
    }

    /// `(change, name@resourceVersion...)` of the next change.
    async fn next(rx: &mut mpsc::Receiver<Change>) -> (&'static str, Vec<String>) {
        let at = |o: &Object| match o {
            Object::NetworkPolicy(p) => {
                format!(
                    "{}@{}",
                    p.name_any(),
                    p.resource_version().unwrap_or_default()
                )
            }
            other => panic!("not a policy: {other:?}"),
        };
        match rx.recv().await.unwrap() {
            Change::Applied(o) => ("applied", vec![at(&o)]),
            Change::Deleted(o) => ("deleted", vec![at(&o)]),
            Change::Resync(kind, objs) => {
                assert_eq!(kind, Kind::NetworkPolicy);
                let objs: Vec<Object> = objs.iter().filter_map(Kept::decode).collect();
                ("resync", objs.iter().map(at).collect())
            }
        }
    }

    fn health(m: &Metrics) -> (u8, u64) {
        let (up, errors) = m.watch_health(Kind::NetworkPolicy);
        (up.map_or(9, u8::from), errors)
    }

    #[tokio::test(start_paused = true)]
    async fn the_watch_lists_follows_resumes_relists_on_410_and_reconnects_after_failures() {
        let (service, mut api) = mock::pair::<Request<Body>, Response<Body>>();
        let (tx, mut rx) = mpsc::channel(16);
        let m = Metrics::new();
        let task = tokio::spawn(watch_kind(
            Api::<NetworkPolicy>::all(Client::new(service, "default")),
            watcher::Config::default(),
            (Kind::NetworkPolicy, Crd::BuiltIn),
            |o| Object::NetworkPolicy(Box::new(o)),
            tx,
            m.clone(),
        ));
        let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

        // List: every object arrives as one resync.
        let q = serve(&mut api, list(&[policy("a", "3"), policy("b", "5")], "10")).await;
        assert!(!q.contains_key("watch"), "{q:?}");
        assert_eq!(next(&mut rx).await, ("resync", s(&["a@3", "b@5"])));
        assert_eq!(health(&m), (1, 0));

        // Watch from the list's version: each event in order; a bookmark
        // moves the version on and says nothing.
        let q = serve(
            &mut api,
            events(&[
                ("ADDED", policy("c", "11")),
                ("MODIFIED", policy("a", "12")),
                ("DELETED", policy("b", "13")),
                ("BOOKMARK", bookmark("15")),
            ]),
        )
        .await;
        assert!(is_watch(&q, "10"), "{q:?}");
        assert_eq!(
            q.get("allowWatchBookmarks").map(String::as_str),
            Some("true")
        );
        assert_eq!(next(&mut rx).await, ("applied", s(&["c@11"])));
        assert_eq!(next(&mut rx).await, ("applied", s(&["a@12"])));
        assert_eq!(next(&mut rx).await, ("deleted", s(&["b@13"])));

        // The server closed the watch: it resumes from the bookmark, no re-list.
        let q = serve(&mut api, events(&[("ERROR", status(410, "Expired"))])).await;
        assert!(is_watch(&q, "15"), "{q:?}");

        // 410 Gone as an event: a fresh list, whose resync lets the consumer
        // drop what is gone (c).
        let q = serve(
            &mut api,
            list(&[policy("a", "12"), policy("d", "19")], "20"),
        )
        .await;
        assert!(!q.contains_key("watch"), "{q:?}");
        assert_eq!(next(&mut rx).await, ("resync", s(&["a@12", "d@19"])));
        assert_eq!(health(&m), (1, 1));

        // The API server fails (an outage): reported, and the watch is
        // retried from the same version after a backoff, not re-listed.
        let q = serve(
            &mut api,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                status(503, "ServiceUnavailable").to_string(),
            ),
        )
        .await;
        assert!(is_watch(&q, "20"), "{q:?}");
        let q = serve(&mut api, events(&[("ADDED", policy("e", "21"))])).await;
        assert!(is_watch(&q, "20"), "{q:?}");
        assert_eq!(next(&mut rx).await, ("applied", s(&["e@21"])));
        assert_eq!(health(&m), (1, 2));

        // 410 Gone as the answer to the watch request: a fresh list too.
        let q = serve(
            &mut api,
            (StatusCode::GONE, status(410, "Expired").to_string()),
        )
        .await;
        assert!(is_watch(&q, "21"), "{q:?}");
        let q = serve(&mut api, list(&[policy("e", "21")], "30")).await;
        assert!(!q.contains_key("watch"), "{q:?}");
        assert_eq!(next(&mut rx).await, ("resync", s(&["e@21"])));
        assert_eq!(health(&m), (1, 3));

        task.abort();
    }

    async fn recv(rx: &mut mpsc::Receiver<Change>) -> Change {
        tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("a change within 10 s")
            .expect("the watches run")
    }

    /// A cluster without the ClusterNetworkPolicy CRD (the test API server
    /// not serving the kind): every watch lists, the missing kind as empty,
    /// so the agent syncs and NetworkPolicies keep flowing.
    #[tokio::test]
    async fn without_the_crd_cluster_network_policies_list_as_empty_and_the_rest_works() {
        use sluice_test_apiserver::{Config, Server};
        let server = Server::start_with(Config {
            custom_resources: false,
            ..Config::default()
        })
        .unwrap();
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&server.kubeconfig()).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        let m = Metrics::new();
        let mut rx = start(Client::try_from(config).unwrap(), m.clone());
        let mut cluster = crate::cluster::Cluster::new("n1");
        let mut listed = std::collections::BTreeSet::new();
        while listed.len() < Kind::ALL.len() {
            let change = recv(&mut rx).await;
            if let Change::Resync(kind, objects) = &change {
                if *kind == Kind::ClusterNetworkPolicy {
                    assert!(objects.is_empty());
                }
                listed.insert(*kind);
            }
            cluster.apply(vec![change]);
        }
        assert!(cluster.is_synced());
        let (up, errors) = m.watch_health(Kind::ClusterNetworkPolicy);
        assert_eq!((up, errors), (Some(true), 0), "absent, not failing");

        server
            .create(
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                           "metadata": {"name": "deny", "namespace": "default"},
                           "spec": {"podSelector": {}}}),
            )
            .unwrap();
        loop {
            let change = recv(&mut rx).await;
            let programming = cluster.apply(vec![change.clone()]);
            if let Change::Applied(Object::NetworkPolicy(np)) = change {
                assert_eq!(np.name_any(), "deny");
                let p = programming.expect("synced: something to program");
                assert!(
                    p.versions
                        .iter()
                        .any(|(k, _)| k.to_string() == "NetworkPolicy/default/deny")
                );
                break;
            }
        }
        // The CRD stays missing: no second empty list, no error counted.
        if let Ok(Some(c)) =
            tokio::time::timeout(std::time::Duration::from_millis(1500), rx.recv()).await
        {
            assert!(
                !matches!(c, Change::Resync(Kind::ClusterNetworkPolicy, _)),
                "{c:?}"
            );
        }
        assert_eq!(m.watch_health(Kind::ClusterNetworkPolicy).1, 0);
    }
}
