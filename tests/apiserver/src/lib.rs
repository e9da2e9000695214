//! A small in-memory Kubernetes API server for Sluice's tests and demo.
//! Never installed on a cluster: plain HTTP on loopback, no authentication.
//!
//! It serves Namespaces, Pods, Nodes, Services (core v1), NetworkPolicies
//! (networking.k8s.io/v1), EndpointSlices (discovery.k8s.io/v1), Events
//! (events.k8s.io/v1) and ClusterNetworkPolicies
//! (policy.networking.k8s.io/v1alpha2, a custom resource) well enough for `kubectl` 1.32 (apply, create,
//! replace, delete, get, get -w) and for watch-based clients such as kube-rs.
//!
//! ```no_run
//! let server = sluice_test_apiserver::Server::start("127.0.0.1:0".parse()?)?;
//! println!("{}", server.url());
//! server.write_kubeconfig(std::path::Path::new("/tmp/kubeconfig"))?;
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod http;
pub mod kinds;
pub mod patch;
pub mod resources;
pub mod selector;
pub mod store;
pub mod util;

use std::{net::SocketAddr, path::Path, sync::Arc, thread::JoinHandle, time::Duration};

use anyhow::{Context as _, Result, bail};
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub use store::{ApiError, Store};

/// The resourceVersion of an object (empty when it has none).
pub fn resource_version(obj: &Value) -> String {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The resource, namespace and name an object addresses.
fn target(obj: &Value) -> Result<(&'static resources::Resource, Option<String>, String)> {
    let (api_version, kind) = (
        obj["apiVersion"].as_str().unwrap_or_default(),
        obj["kind"].as_str().unwrap_or_default(),
    );
    let r = resources::by_kind(api_version, kind)
        .with_context(|| format!("no resource for {api_version} {kind}"))?;
    let m = &obj["metadata"];
    Ok((
        r,
        m["namespace"].as_str().map(String::from),
        m["name"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// How to run the server.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Must be a loopback address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// How many events the watch history keeps; watches from an older
    /// resourceVersion get 410 Gone.
    pub history_limit: usize,
    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK.
    pub bookmark_interval: Duration,
    /// Print one line per request on stderr.
    pub log_requests: bool,
    /// Allow a non-loopback address: only for an address of a test network
    /// namespace (the two-node conformance cluster serves its nodes over
    /// their link).
    pub allow_non_loopback: bool,
    /// Serve the custom resources (ClusterNetworkPolicy) as if their CRDs
    /// were installed; off, the server answers like a cluster without them
    /// (404, absent from discovery).
    pub custom_resources: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            history_limit: 1000,
            bookmark_interval: Duration::from_secs(60),
            log_requests: false,
            allow_non_loopback: false,
            custom_resources: true,
        }
    }
}

/// Starts servers; see [`ServerHandle`].
pub struct Server;

impl Server {
    /// Starts a server on `listen` (loopback only) with default settings.
    pub fn start(listen: SocketAddr) -> Result<ServerHandle> {
        Self::start_with(Config {
            listen,
            ..Config::default()
        })
    }

    /// Starts a server on its own thread and Tokio runtime, so it works
    /// from synchronous and asynchronous tests alike.
    pub fn start_with(config: Config) -> Result<ServerHandle> {
        let store = Store::new(config.history_limit);
        Self::start_with_store(config, store)
    }

    /// Starts a server that serves `store` (e.g. one taken from a stopped
    /// server by [`ServerHandle::stop`]): an API server outage, with the
    /// state and its resourceVersions kept across it, as etcd keeps them.
    pub fn start_with_store(config: Config, store: Store) -> Result<ServerHandle> {
        if !config.listen.ip().is_loopback() && !config.allow_non_loopback {
            bail!(
                "the test API server listens on loopback only, not {}",
                config.listen
            );
        }
        let listener = std::net::TcpListener::bind(config.listen)
            .with_context(|| format!("binding {}", config.listen))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(http::State::new(
            store,
            config.bookmark_interval,
            addr.to_string(),
            config.log_requests,
            resources::Catalog {
                custom_resources: config.custom_resources,
            },
        ));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the server's runtime")?;
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = state.clone();
        let thread = std::thread::Builder::new()
            .name("test-apiserver".into())
            .spawn(move || runtime.block_on(serve(listener, serving, stopped)))
            .context("spawning the server thread")?;
        Ok(ServerHandle {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<http::State>,
    mut stopped: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("test apiserver: {e}");
            return;
        }
    };
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // As Go's net/http (kube-apiserver) does: a watch event
                    // is a small write that must not wait, behind Nagle,
                    // for the client's delayed ACK of the one before (40 ms).
                    if let Err(e) = stream.set_nodelay(true) {
                        eprintln!("test apiserver: nodelay: {e}");
                    }
                    stream
                }
                Err(e) => {
                    eprintln!("test apiserver: accept: {e}");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| http::handle(state.clone(), req));
            // Errors here are clients going away mid-response; nothing to do.
            let _ignored = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A running server; dropping it stops the server (open watches end).
pub struct ServerHandle {
    addr: SocketAddr,
    state: Arc<http::State>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig whose current context points at this server (no
    /// credentials; plain HTTP; default namespace `default`).
    pub fn kubeconfig(&self) -> String {
        kubeconfig(&self.url())
    }

    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.kubeconfig())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Runs `f` on the store directly (watchers are woken afterwards).
    pub fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        self.state.mutate(f)
    }

    /// Creates `obj` as a client's POST would (its `apiVersion` and `kind`
    /// name the resource, `metadata.namespace` the namespace); the object
    /// as stored.
    pub fn create(&self, obj: Value) -> Result<Value> {
        let (r, ns, _) = target(&obj)?;
        self.with_store(|s| s.create(r, ns.as_deref(), obj))
            .map_err(|e| anyhow::anyhow!("create {}: {e:?}", r.kind))
    }

    /// Creates `obj` as `create` does, but wakes no watch: GET and LIST see
    /// it at once, watches only with the next change or bookmark (as a
    /// watch running behind would).
    pub fn create_unwatched(&self, obj: Value) -> Result<Value> {
        let (r, ns, _) = target(&obj)?;
        let mut store = self.state.lock();
        store
            .create(r, ns.as_deref(), obj)
            .map_err(|e| anyhow::anyhow!("create {}: {e:?}", r.kind))
    }

    /// Replaces `obj` (`part`: main or status) as a client's PUT would; the
    /// object as stored.
    pub fn update(&self, obj: Value, part: store::Part) -> Result<Value> {
        let (r, ns, name) = target(&obj)?;
        self.with_store(|s| s.update(r, ns.as_deref(), &name, obj, part))
            .map_err(|e| anyhow::anyhow!("update {} {name}: {e:?}", r.kind))
    }

    /// Creates Namespace `name` (the server adds its
    /// `kubernetes.io/metadata.name` label, as the real one does).
    pub fn create_namespace(&self, name: &str) -> Result<Value> {
        self.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))
    }

    /// Deletes an object, by plural resource name, namespace (ignored for
    /// cluster-scoped kinds) and name.
    pub fn delete(&self, plural: &str, namespace: &str, name: &str) -> Result<()> {
        let r = resources::by_plural(plural).with_context(|| format!("no resource {plural}"))?;
        self.with_store(|s| s.delete(r, Some(namespace), name, (None, None)))
            .map(drop)
            .map_err(|e| anyhow::anyhow!("delete {plural} {namespace}/{name}: {e:?}"))
    }

    /// An object, by plural resource name (`pods`, `networkpolicies`, ...),
    /// namespace (ignored for cluster-scoped kinds) and name.
    pub fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let r = resources::by_plural(plural)?;
        self.state.lock().get(r, Some(namespace), name).ok()
    }

    /// The names (`namespace/name`, or `name` for cluster-scoped kinds) of
    /// all objects of a resource, sorted.
    pub fn names(&self, plural: &str) -> Vec<String> {
        let Some(r) = resources::by_plural(plural) else {
            return Vec::new();
        };
        self.state
            .lock()
            .list(r, &store::Filter::default())
            .iter()
            .map(|o| {
                let m = &o["metadata"];
                let name = m["name"].as_str().unwrap_or_default();
                match m["namespace"].as_str() {
                    Some(ns) if r.namespaced => format!("{ns}/{name}"),
                    _ => name.to_string(),
                }
            })
            .collect()
    }
}

impl ServerHandle {
    /// Stops serving (every connection is closed) and hands back the store.
    pub fn stop(mut self) -> Store {
        self.shutdown();
        self.state.mutate(|s| std::mem::replace(s, Store::new(1)))
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ignored = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ignored = thread.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A kubeconfig pointing at `url` with no credentials.
pub fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: sluice-test
  cluster:
    server: {url}
contexts:
- name: sluice-test
  context:
    cluster: sluice-test
    user: sluice-test
    namespace: default
current-context: sluice-test
users:
- name: sluice-test
  user: {{}}
preferences: {{}}
"
    )
}
