//! HTTP: routing, discovery, CRUD, patch and watch over hyper 1.

use std::{
    collections::VecDeque,
    convert::Infallible,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    header::{ACCEPT, CONTENT_TYPE, HeaderValue},
};
use serde_json::{Value, json};
use tokio::{sync::watch, time::Instant};

use crate::{
    kinds,
    patch::{self, PatchError},
    resources::{self, Catalog, Resource},
    selector::{FieldSelector, LabelSelector},
    store::{ApiError, EventType, Filter, Part, Store},
    util,
};

pub type Body = BoxBody<Bytes, Infallible>;

/// What every request handler shares.
pub struct State {
    pub store: Mutex<Store>,
    /// The latest resourceVersion, so watches wake up on changes.
    pub changed: watch::Sender<u64>,
    pub bookmark_interval: Duration,
    /// `host:port`, for `/api`'s serverAddressByClientCIDRs.
    pub address: String,
    pub log_requests: bool,
    /// The resources served.
    pub catalog: Catalog,
}

impl State {
    pub fn new(
        store: Store,
        bookmark_interval: Duration,
        address: String,
        log_requests: bool,
        catalog: Catalog,
    ) -> Self {
        let (changed, _) = watch::channel(store.resource_version());
        Self {
            store: Mutex::new(store),
            changed,
            bookmark_interval,
            address,
            log_requests,
            catalog,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the store, then wakes watchers.
    pub fn mutate<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let mut store = self.lock();
        let out = f(&mut store);
        self.changed.send_replace(store.resource_version());
        out
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

/// The parts of a request the handlers look at.
struct Req {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    accept: String,
    content_type: String,
    body: Bytes,
}

impl Req {
    fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.param(key), Some("1" | "true"))
    }

    fn include_object(&self) -> &str {
        self.param("includeObject").unwrap_or("Metadata")
    }

    fn json_body(&self) -> Result<Value, ApiError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
    }

    /// The Table version asked for (`v1` or `v1beta1`), if a Table is wanted.
    fn table_version(&self) -> Option<&'static str> {
        self.accept.split(',').find_map(|range| {
            let params: Vec<&str> = range.split(';').map(str::trim).collect();
            if !params.contains(&"as=Table") || !params.contains(&"g=meta.k8s.io") {
                return None;
            }
            if params.contains(&"v=v1beta1") {
                Some("v1beta1")
            } else {
                Some("v1")
            }
        })
    }

    fn wants_aggregated_discovery(&self) -> bool {
        self.accept.split(',').any(|range| {
            range.contains("as=APIGroupDiscoveryList")
                && range.contains("g=apidiscovery.k8s.io")
                && range.contains("v=v2")
                && !range.contains("v=v2beta1")
        })
    }
}

/// The hyper service entry point.
pub async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let header = |name| {
        parts
            .headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(error_response(&ApiError::bad_request(format!(
                "reading the body: {e}"
            ))));
        }
    };
    let req = Req {
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        query: util::parse_query(parts.uri.query().unwrap_or_default()),
        accept: header(ACCEPT),
        content_type: header(CONTENT_TYPE),
        body,
    };
    let resp = route(&state, &req).unwrap_or_else(|e| error_response(&e));
    if state.log_requests {
        eprintln!(
            "{} {}{} -> {}",
            req.method,
            req.path,
            parts
                .uri
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default(),
            resp.status().as_u16()
        );
    }
    Ok(resp)
}

fn route(state: &Arc<State>, req: &Req) -> Result<Response<Body>, ApiError> {
    let segs: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
    let get = req.method == Method::GET;
    let catalog = state.catalog;
    match segs.as_slice() {
        ["version"] if get => Ok(json_response(200, &resources::version())),
        ["healthz" | "livez" | "readyz"] if get => {
            let mut r = Response::new(full("ok"));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            Ok(r)
        }
        [root @ ("api" | "apis")] if get => {
            if req.wants_aggregated_discovery() {
                let mut r = json_response(200, &catalog.aggregated_discovery(*root == "api"));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(resources::AGGREGATED_DISCOVERY_CONTENT_TYPE),
                );
                Ok(r)
            } else if *root == "api" {
                Ok(json_response(200, &resources::api_versions(&state.address)))
            } else {
                Ok(json_response(200, &catalog.api_group_list()))
            }
        }
        ["api", v] if get => catalog
            .api_resource_list("", v)
            .map(|b| json_response(200, &b))
            .ok_or_else(ApiError::no_route),
        ["apis", g] if get => catalog
            .api_group(g)
            .map(|b| json_response(200, &b))
            .ok_or_else(ApiError::no_route),
        ["apis", g, v] if get => catalog
            .api_resource_list(g, v)
            .map(|b| json_response(200, &b))
            .ok_or_else(ApiError::no_route),
        ["openapi", "v3"] if get => Ok(json_response(200, &catalog.openapi_v3_index())),
        ["openapi", "v3", "api", v] if get => catalog
            .openapi_v3_group_version("", v)
            .map(|b| json_response(200, &b))
            .ok_or_else(ApiError::no_route),
        ["openapi", "v3", "apis", g, v] if get => catalog
            .openapi_v3_group_version(g, v)
            .map(|b| json_response(200, &b))
            .ok_or_else(ApiError::no_route),
        ["api", v, rest @ ..] => resource_request(state, req, "", v, rest),
        ["apis", g, v, rest @ ..] => resource_request(state, req, g, v, rest),
        _ => Err(ApiError::no_route()),
    }
}

/// A resource URL, parsed.
struct Target {
    r: &'static Resource,
    ns: Option<String>,
    name: Option<String>,
    part: Part,
    watch: bool,
}

fn parse_target(
    catalog: Catalog,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<Target, ApiError> {
    let (watch, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        _ => (false, rest),
    };
    let find = |plural: &str| {
        catalog
            .find(group, version, plural)
            .ok_or_else(ApiError::no_route)
    };
    let (r, ns, name, sub) = match rest {
        ["namespaces", ns, plural, tail @ ..] if !matches!(*plural, "status" | "finalize") => {
            let r = find(plural)?;
            if !r.namespaced {
                return Err(ApiError::no_route());
            }
            match tail {
                [] => (r, Some(*ns), None, None),
                [name] => (r, Some(*ns), Some(*name), None),
                [name, sub] => (r, Some(*ns), Some(*name), Some(*sub)),
                _ => return Err(ApiError::no_route()),
            }
        }
        [plural] => (find(plural)?, None, None, None),
        [plural, name] => (find(plural)?, None, Some(*name), None),
        [plural, name, sub] => (find(plural)?, None, Some(*name), Some(*sub)),
        _ => return Err(ApiError::no_route()),
    };
    if name.is_some() && r.namespaced && ns.is_none() {
        return Err(ApiError::no_route());
    }
    let part = match sub {
        None => Part::Main,
        Some("status") if r.has_status => Part::Status,
        Some(_) => return Err(ApiError::no_route()),
    };
    Ok(Target {
        r,
        ns: ns.map(String::from),
        name: name.map(util::percent_decode),
        part,
        watch,
    })
}

fn filter_from(req: &Req, ns: Option<&str>) -> Result<Filter, ApiError> {
    Ok(Filter {
        namespace: ns.map(String::from),
        labels: LabelSelector::parse(req.param("labelSelector").unwrap_or_default())
            .map_err(ApiError::bad_request)?,
        fields: FieldSelector::parse(req.param("fieldSelector").unwrap_or_default())
            .map_err(ApiError::bad_request)?,
    })
}

/// A list, whole or (with `limit`, then `continue`) by pages: the items,
/// the resourceVersion the list is at, and the token for the next page.
/// Every page of one list reports the first page's resourceVersion; pages
/// are read from the store as it is when each is asked for (not from a
/// snapshot), so an object changed in between shows its newer version and
/// the watch from that resourceVersion replays the change, which a client
/// applies idempotently. A token older than the watch history is 410.
fn list_paged(
    state: &Arc<State>,
    req: &Req,
    r: &'static Resource,
    filter: &Filter,
) -> Result<(Vec<Value>, u64, Option<String>), ApiError> {
    let limit = match req.param("limit") {
        None | Some("" | "0") => None,
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("limit: {l:?} is not a number")))?,
        ),
    };
    let token = req
        .param("continue")
        .filter(|t| !t.is_empty())
        .map(ContinueToken::parse)
        .transpose()?;
    let store = state.lock();
    if limit.is_none() && token.is_none() {
        return Ok((store.list(r, filter), store.resource_version(), None));
    }
    let rv = match &token {
        Some(t) if t.rv < store.compacted() => {
            return Err(ApiError::expired(
                "the continue token is too old; list again from the start",
            ));
        }
        Some(t) => t.rv,
        None => store.resource_version(),
    };
    let after = token.as_ref().map(|t| (t.ns.as_str(), t.name.as_str()));
    let (items, last) = store.list_page(r, filter, after, limit.unwrap_or(usize::MAX));
    let next = last.map(|(ns, name)| ContinueToken { rv, ns, name }.encode());
    Ok((items, rv, next))
}

/// Where the next page of a list starts: opaque to clients (hex of
/// "rv/namespace/name"; names cannot hold '/').
struct ContinueToken {
    rv: u64,
    ns: String,
    name: String,
}

impl ContinueToken {
    fn encode(&self) -> String {
        format!("{}/{}/{}", self.rv, self.ns, self.name)
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn parse(token: &str) -> Result<Self, ApiError> {
        let bad = || ApiError::bad_request(format!("continue: {token:?} is not a continue token"));
        let bytes = (0..token.len())
            .step_by(2)
            .map(|i| {
                token
                    .get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(bad)?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let mut parts = text.splitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(rv), Some(ns), Some(name)) => Ok(Self {
                rv: rv.parse().map_err(|_| bad())?,
                ns: ns.to_string(),
                name: name.to_string(),
            }),
            _ => Err(bad()),
        }
    }
}

fn resource_request(
    state: &Arc<State>,
    req: &Req,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<Response<Body>, ApiError> {
    let t = parse_target(state.catalog, group, version, rest)?;
    let (r, ns) = (t.r, t.ns.as_deref());
    let dry_run = req.param("dryRun").is_some_and(|v| !v.is_empty());
    // Dry runs work on a copy of the store that is then dropped.
    let run = |f: &dyn Fn(&mut Store) -> Result<Value, ApiError>| -> Result<Value, ApiError> {
        if dry_run {
            let mut copy = state.lock().clone();
            f(&mut copy)
        } else {
            state.mutate(|s| f(s))
        }
    };
    match (&req.method, t.name.as_deref()) {
        (&Method::GET, None) if t.watch || req.flag("watch") => {
            watch_response(state, req, r, filter_from(req, ns)?)
        }
        (&Method::GET, Some(name)) if t.watch || req.flag("watch") => {
            let mut filter = filter_from(req, ns)?;
            let by_name = format!("metadata.name={name}");
            filter.fields = FieldSelector::parse(&by_name).map_err(ApiError::bad_request)?;
            watch_response(state, req, r, filter)
        }
        (&Method::GET, None) => {
            let filter = filter_from(req, ns)?;
            let (items, rv, next) = list_paged(state, req, r, &filter)?;
            let mut body = match req.table_version() {
                Some(v) => table(req.include_object(), r, v, &items, rv, true),
                None => json!({
                    "kind": format!("{}List", r.kind),
                    "apiVersion": r.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()},
                    "items": items,
                }),
            };
            if let Some(token) = next {
                body["metadata"]["continue"] = json!(token);
            }
            Ok(json_response(200, &body))
        }
        (&Method::GET, Some(name)) => {
            let obj = state.lock().get(r, ns, name)?;
            if let Some(v) = req.table_version() {
                let rv = state.lock().resource_version();
                return Ok(json_response(
                    200,
                    &table(req.include_object(), r, v, &[obj], rv, true),
                ));
            }
            Ok(json_response(200, &obj))
        }
        (&Method::POST, None) if t.part == Part::Main && (ns.is_some() || !r.namespaced) => {
            let body = req.json_body()?;
            let created = run(&|s| s.create(r, ns, body.clone()))?;
            Ok(json_response(201, &created))
        }
        (&Method::PUT, Some(name)) => {
            let body = req.json_body()?;
            let updated = run(&|s| s.update(r, ns, name, body.clone(), t.part))?;
            Ok(json_response(200, &updated))
        }
        (&Method::PATCH, Some(name)) => {
            let kind = patch_kind(&req.content_type)?;
            let body = req.json_body()?;
            let patched = run(&|s| {
                let current = s.get(r, ns, name)?;
                let new = apply_patch(kind, &current, &body, r.kind).map_err(|e| match e {
                    PatchError::Malformed(m) => ApiError::bad_request(m),
                    PatchError::Failed(m) => ApiError::invalid(r, name, &m),
                })?;
                s.update(r, ns, name, new, t.part)
            })?;
            Ok(json_response(200, &patched))
        }
        (&Method::DELETE, Some(name)) if t.part == Part::Main => {
            let opts: Value = if req.body.is_empty() {
                json!({})
            } else {
                req.json_body()?
            };
            let pre = &opts["preconditions"];
            let deleted = run(&|s| {
                s.delete(
                    r,
                    ns,
                    name,
                    (pre["uid"].as_str(), pre["resourceVersion"].as_str()),
                )
            })?;
            Ok(json_response(200, &deleted))
        }
        (&Method::DELETE, None) if t.part == Part::Main => {
            let filter = filter_from(req, ns)?;
            let items = run(&|s| Ok(Value::Array(s.delete_collection(r, &filter))))?;
            let rv = state.lock().resource_version();
            Ok(json_response(
                200,
                &json!({
                    "kind": format!("{}List", r.kind),
                    "apiVersion": r.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()},
                    "items": items,
                }),
            ))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

#[derive(Clone, Copy)]
enum PatchKind {
    Json,
    Merge,
    Strategic,
}

fn patch_kind(content_type: &str) -> Result<PatchKind, ApiError> {
    match content_type.split(';').next().unwrap_or_default().trim() {
        "application/json-patch+json" => Ok(PatchKind::Json),
        "application/merge-patch+json" => Ok(PatchKind::Merge),
        "application/strategic-merge-patch+json" => Ok(PatchKind::Strategic),
        other => Err(ApiError::unsupported_media_type(other)),
    }
}

fn apply_patch(
    kind: PatchKind,
    current: &Value,
    body: &Value,
    obj_kind: &str,
) -> Result<Value, PatchError> {
    match kind {
        PatchKind::Json => patch::json_patch(current, body),
        PatchKind::Merge => {
            let mut out = current.clone();
            patch::merge_patch(&mut out, body);
            Ok(out)
        }
        PatchKind::Strategic => patch::strategic_merge_patch(current, body, obj_kind),
    }
}

/// A `meta.k8s.io` Table of `objs`, as `kubectl get` asks for.
fn table(
    include: &str,
    r: &Resource,
    version: &str,
    objs: &[Value],
    rv: u64,
    with_columns: bool,
) -> Value {
    let now = util::unix_now();
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            let mut row = json!({"cells": kinds::cells(r, o, now)});
            match include {
                "None" => {}
                "Object" => row["object"] = o.clone(),
                _ => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": format!("meta.k8s.io/{version}"),
                        "metadata": o["metadata"].clone(),
                    });
                }
            }
            row
        })
        .collect();
    let mut t = json!({
        "kind": "Table",
        "apiVersion": format!("meta.k8s.io/{version}"),
        "metadata": {"resourceVersion": rv.to_string()},
        "rows": rows,
    });
    t["columnDefinitions"] = if with_columns {
        kinds::columns(r)
    } else {
        json!([])
    };
    t
}

/// One watch: replays the event log after a resourceVersion, then follows it.
struct Watcher {
    state: Arc<State>,
    r: &'static Resource,
    filter: Filter,
    cursor: u64,
    rx: watch::Receiver<u64>,
    pending: VecDeque<Bytes>,
    done: bool,
    deadline: Option<Instant>,
    bookmarks: Option<tokio::time::Interval>,
    /// Table version and includeObject, when the client wants Tables.
    table: Option<(&'static str, String)>,
    sent_columns: bool,
}

fn watch_response(
    state: &Arc<State>,
    req: &Req,
    r: &'static Resource,
    filter: Filter,
) -> Result<Response<Body>, ApiError> {
    let rv_param = req.param("resourceVersion").unwrap_or_default();
    let requested: Option<u64> = match rv_param {
        "" | "0" => None,
        v => Some(v.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "resourceVersion: Invalid value: {v:?}: must be an integer"
            ))
        })?),
    };
    let initial = match req.param("sendInitialEvents") {
        Some("true") => true,
        Some(_) => false,
        None => requested.is_none(),
    };
    let timeout = match req.param("timeoutSeconds") {
        Some(s) => Some(
            s.parse::<u64>()
                .map_err(|_| ApiError::bad_request("timeoutSeconds must be an integer"))?,
        ),
        None => None,
    };
    let bookmarks = req.flag("allowWatchBookmarks").then(|| {
        let period = state.bookmark_interval.max(Duration::from_millis(10));
        let mut i = tokio::time::interval_at(Instant::now() + period, period);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let mut w = Watcher {
        state: state.clone(),
        r,
        filter,
        cursor: requested.unwrap_or(0),
        rx: state.changed.subscribe(),
        pending: VecDeque::new(),
        done: false,
        deadline: timeout.map(|s| Instant::now() + Duration::from_secs(s)),
        bookmarks,
        table: req
            .table_version()
            .map(|v| (v, req.include_object().to_string())),
        sent_columns: false,
    };
    if initial {
        let store = state.lock();
        let objs = store.list(r, &w.filter);
        w.cursor = store.resource_version();
        drop(store);
        for o in &objs {
            w.push(EventType::Added.as_str(), o);
        }
        if req.param("sendInitialEvents") == Some("true") && w.bookmarks.is_some() {
            let mut b = w.bookmark();
            b["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            w.push("BOOKMARK", &b);
        }
    }
    let stream = futures::stream::unfold(w, |mut w| async move {
        let chunk = w.next().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), w))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

enum Wake {
    Changed(bool),
    Timeout,
    Bookmark,
}

impl Watcher {
    fn bookmark(&self) -> Value {
        json!({
            "kind": self.r.kind,
            "apiVersion": self.r.api_version(),
            "metadata": {"resourceVersion": self.cursor.to_string()},
        })
    }

    fn push(&mut self, kind: &str, obj: &Value) {
        let object = match &self.table {
            Some((version, include)) if kind != "BOOKMARK" && kind != "ERROR" => {
                let rv = obj["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(self.cursor);
                let t = table(
                    include,
                    self.r,
                    version,
                    std::slice::from_ref(obj),
                    rv,
                    !self.sent_columns,
                );
                self.sent_columns = true;
                t
            }
            _ => obj.clone(),
        };
        let mut line = json!({"type": kind, "object": object}).to_string();
        line.push('\n');
        self.pending.push_back(Bytes::from(line));
    }

    /// The next chunk of the stream; `None` ends it.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Some(b);
            }
            if self.done {
                return None;
            }
            self.rx.borrow_and_update();
            let events = self.state.lock().events_after(self.cursor);
            match events {
                Err(e) => {
                    self.push("ERROR", &e.status());
                    self.done = true;
                    continue;
                }
                Ok(events) => {
                    for ev in &events {
                        self.cursor = ev.rv;
                        if ev.resource == self.r
                            && let Some((kind, obj)) = self.filter.translate(ev)
                        {
                            self.push(kind.as_str(), obj);
                        }
                    }
                }
            }
            if !self.pending.is_empty() {
                continue;
            }
            let deadline = self.deadline;
            let (rx, bookmarks) = (&mut self.rx, &mut self.bookmarks);
            let sleep = async move {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let tick = async move {
                match bookmarks.as_mut() {
                    Some(i) => {
                        i.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let wake = tokio::select! {
                changed = rx.changed() => Wake::Changed(changed.is_ok()),
                () = sleep => Wake::Timeout,
                () = tick => Wake::Bookmark,
            };
            match wake {
                Wake::Changed(true) => {}
                Wake::Changed(false) | Wake::Timeout => self.done = true,
                Wake::Bookmark => {
                    let b = self.bookmark();
                    self.push("BOOKMARK", &b);
                }
            }
        }
    }
}
