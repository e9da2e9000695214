//! The in-memory object store: objects as JSON, one global resourceVersion
//! counter, and an event log with a bounded history for watches. Pure and
//! synchronous; the HTTP layer wraps it in a mutex.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Value, json};

use crate::{
    kinds,
    resources::{self, RESOURCES, Resource},
    selector::{FieldSelector, LabelSelector},
    util,
};

/// An API error, rendered as a `Status` object with the matching HTTP code.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, r: &Resource, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": r.group, "kind": r.plural}));
        self
    }

    pub fn not_found(r: &Resource, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} {name:?} not found", r.qualified_plural()),
        )
        .with_details(r, name)
    }

    /// A URL that names nothing this server serves.
    pub fn no_route() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    pub fn already_exists(r: &Resource, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} {name:?} already exists", r.qualified_plural()),
        )
        .with_details(r, name)
    }

    pub fn conflict(r: &Resource, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {name:?}: {why}",
                r.qualified_plural()
            ),
        )
        .with_details(r, name)
    }

    pub fn invalid(r: &Resource, name: &str, field_message: &str) -> Self {
        let mut e = Self::new(
            422,
            "Invalid",
            format!("{} {name:?} is invalid: {field_message}", r.kind),
        );
        let mut details = json!({"name": name, "group": r.group, "kind": r.kind});
        // "spec.x: Required value" names a field; kubectl prints causes as
        // "field: message".
        if let Some((field, message)) = field_message
            .split_once(": ")
            .filter(|(f, _)| !f.contains(' '))
        {
            let reason = if message.starts_with("Required value") {
                "FieldValueRequired"
            } else {
                "FieldValueInvalid"
            };
            details["causes"] = json!([{"reason": reason, "message": message, "field": field}]);
        }
        e.details = Some(details);
        e
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {content_type:?})"
            ),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// The `Status` object the real API server sends.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, as recorded in the event log.
#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    pub kind: EventType,
    pub resource: &'static Resource,
    /// The object after the change (for deletions: as deleted, carrying the
    /// deletion's resourceVersion).
    pub object: Value,
    /// The object before a modification, to tell watchers with selectors
    /// when an object starts or stops matching.
    pub previous: Option<Value>,
}

/// Which objects a list or watch wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// `None`: all namespaces (and cluster-scoped kinds).
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, obj: &Value) -> bool {
        let ns_ok = self
            .namespace
            .as_deref()
            .is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns));
        ns_ok && self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// What a watcher with this filter sees of `event`: an object that
    /// starts matching is ADDED, one that stops matching is DELETED, like the
    /// real API server does.
    pub fn translate<'a>(&self, event: &'a Event) -> Option<(EventType, &'a Value)> {
        let now = self.matches(&event.object);
        let before = event.previous.as_ref().is_some_and(|p| self.matches(p));
        match (event.kind, before, now) {
            (EventType::Modified, false, true) => Some((EventType::Added, &event.object)),
            (EventType::Modified, true, false) => Some((EventType::Deleted, &event.object)),
            (EventType::Modified, false, false) => None,
            (kind, _, true) => Some((kind, &event.object)),
            (_, _, false) => None,
        }
    }
}

/// Whether an update replaces the object or only its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
}

type Key = (String, String);

#[derive(Clone)]
pub struct Store {
    rv: u64,
    objects: BTreeMap<TableKey, BTreeMap<Key, Value>>,
    events: VecDeque<Event>,
    history_limit: usize,
    /// Events up to and including this resourceVersion are forgotten.
    compacted: u64,
    next_cluster_ip: u32,
    /// Objects removed by a namespace deletion, with when: a DELETE of one
    /// of them soon after still answers 200, as a real server does while the
    /// namespace terminates (so `kubectl delete -f` of a file listing the
    /// namespace first works).
    tombstones: BTreeMap<(TableKey, Key), (i64, Value)>,
}

type TableKey = (&'static str, &'static str);

/// How long a namespace deletion's tombstones last, in seconds.
const TOMBSTONE_SECONDS: i64 = 60;

fn table_key(r: &Resource) -> TableKey {
    (r.group, r.plural)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or_default()
}

impl Store {
    /// A store holding the namespaces every cluster has.
    pub fn new(history_limit: usize) -> Self {
        let mut s = Self {
            rv: 0,
            objects: BTreeMap::new(),
            events: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: 0,
            next_cluster_ip: u32::from_be_bytes([10, 96, 0, 10]),
            tombstones: BTreeMap::new(),
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let created = s.create(
                resources::namespaces(),
                None,
                json!({"metadata": {"name": ns}}),
            );
            debug_assert!(created.is_ok());
        }
        s
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Forgets the whole event history, as an etcd compaction does: watches
    /// from any older resourceVersion now get 410 Gone.
    pub fn compact(&mut self) {
        self.events.clear();
        self.compacted = self.rv;
    }

    fn bucket(&self, r: &Resource) -> Option<&BTreeMap<Key, Value>> {
        self.objects.get(&table_key(r))
    }

    fn key(r: &Resource, ns: Option<&str>, name: &str) -> Key {
        let ns = if r.namespaced {
            ns.unwrap_or_default()
        } else {
            ""
        };
        (ns.to_string(), name.to_string())
    }

    pub fn get(&self, r: &Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.bucket(r)
            .and_then(|b| b.get(&Self::key(r, ns, name)))
            .cloned()
            .ok_or_else(|| ApiError::not_found(r, name))
    }

    pub fn list(&self, r: &Resource, filter: &Filter) -> Vec<Value> {
        let Some(b) = self.bucket(r) else {
            return Vec::new();
        };
        if let Some(name) = filter.fields.pinned("metadata.name") {
            let ns = filter
                .namespace
                .as_deref()
                .or(filter.fields.pinned("metadata.namespace"));
            if r.namespaced && ns.is_none() {
                return b.values().filter(|o| filter.matches(o)).cloned().collect();
            }
            return b
                .get(&Self::key(r, ns, name))
                .filter(|o| filter.matches(o))
                .cloned()
                .into_iter()
                .collect();
        }
        b.values().filter(|o| filter.matches(o)).cloned().collect()
    }

    /// One page of a list: at most `limit` objects that `filter` matches,
    /// in key order (namespace, name), after the object whose key is
    /// `after`; and the key of the page's last object when more may follow.
    pub fn list_page(
        &self,
        r: &Resource,
        filter: &Filter,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> (Vec<Value>, Option<(String, String)>) {
        use std::ops::Bound;
        let Some(b) = self.bucket(r) else {
            return (Vec::new(), None);
        };
        let from = match after {
            Some((ns, name)) => Bound::Excluded((ns.to_string(), name.to_string())),
            None => Bound::Unbounded,
        };
        let mut items = Vec::new();
        let mut last: Option<&Key> = None;
        for (key, obj) in b.range((from, Bound::Unbounded)) {
            if !filter.matches(obj) {
                continue;
            }
            if items.len() == limit {
                return (items, last.cloned());
            }
            items.push(obj.clone());
            last = Some(key);
        }
        (items, None)
    }

    /// The newest resourceVersion whose events are forgotten (a watch or
    /// a continued list from it or older is 410 Expired).
    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// Events after `rv`, or 410 Expired if some of them are forgotten.
    pub fn events_after(&self, rv: u64) -> Result<Vec<Event>, ApiError> {
        if rv < self.compacted {
            return Err(ApiError::expired(format!(
                "too old resource version: {rv} ({})",
                self.compacted + 1
            )));
        }
        Ok(self.events.iter().filter(|e| e.rv > rv).cloned().collect())
    }

    fn record(
        &mut self,
        kind: EventType,
        r: &'static Resource,
        object: Value,
        previous: Option<Value>,
    ) {
        self.events.push_back(Event {
            rv: self.rv,
            kind,
            resource: r,
            object,
            previous,
        });
        while self.events.len() > self.history_limit {
            if let Some(e) = self.events.pop_front() {
                self.compacted = e.rv;
            }
        }
    }

    fn bump(&mut self, obj: &mut Value) {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
    }

    /// Checks the body's shape, kind and namespace against the URL, and
    /// fills in what the URL implies.
    fn normalize(r: &Resource, ns: Option<&str>, obj: &mut Value) -> Result<(), ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        for (field, want) in [
            ("apiVersion", r.api_version()),
            ("kind", r.kind.to_string()),
        ] {
            match obj.get(field) {
                None | Some(Value::Null) => obj[field] = json!(want),
                Some(Value::String(s)) if *s == want => {}
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "the {field} in the data ({other}) does not match the expected {field} ({want})"
                    )));
                }
            }
        }
        match obj.get("metadata") {
            None | Some(Value::Null) => obj["metadata"] = json!({}),
            Some(Value::Object(_)) => {}
            Some(_) => return Err(ApiError::bad_request("metadata must be an object")),
        }
        let meta = &mut obj["metadata"];
        if r.namespaced {
            let url_ns = ns.unwrap_or_default();
            match meta.get("namespace").and_then(Value::as_str) {
                None | Some("") => meta["namespace"] = json!(url_ns),
                Some(body_ns) if body_ns == url_ns => {}
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
            }
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        Ok(())
    }

    fn check_namespace(&self, r: &Resource, ns: Option<&str>) -> Result<(), ApiError> {
        match ns {
            Some(ns) if r.namespaced => self.get(resources::namespaces(), None, ns).map(drop),
            _ => Ok(()),
        }
    }

    fn finish(
        &mut self,
        r: &Resource,
        obj: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        kinds::apply_defaults(r, obj);
        if r.kind == "Service" {
            self.service_ips(obj, old);
        }
        let name = meta_str(obj, "name").to_string();
        kinds::validate(r, obj).map_err(|m| ApiError::invalid(r, &name, &m))
    }

    /// Allocates a cluster IP (from 10.96.0.0/12) as the real server does,
    /// keeping the one already allocated across updates.
    fn service_ips(&mut self, obj: &mut Value, old: Option<&Value>) {
        let spec = &mut obj["spec"];
        if spec["type"] == "ExternalName" {
            return;
        }
        let missing = |v: &Value| v.as_str().is_none_or(str::is_empty);
        if missing(&spec["clusterIP"]) {
            if let Some(old_ip) = old.map(|o| &o["spec"]["clusterIP"]).filter(|v| !missing(v)) {
                spec["clusterIP"] = old_ip.clone();
            } else {
                let ip = std::net::Ipv4Addr::from(self.next_cluster_ip);
                self.next_cluster_ip += 1;
                spec["clusterIP"] = json!(ip.to_string());
            }
        }
        if spec["clusterIPs"].as_array().is_none_or(Vec::is_empty) {
            spec["clusterIPs"] = json!([spec["clusterIP"].clone()]);
        }
        if spec.get("ipFamilies").is_none() {
            let v6 = spec["clusterIP"].as_str().is_some_and(|s| s.contains(':'));
            spec["ipFamilies"] = json!([if v6 { "IPv6" } else { "IPv4" }]);
        }
        if spec.get("ipFamilyPolicy").is_none() {
            spec["ipFamilyPolicy"] = json!("SingleStack");
        }
    }

    pub fn create(
        &mut self,
        r: &'static Resource,
        ns: Option<&str>,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        Self::normalize(r, ns, &mut obj)?;
        let ns = if r.namespaced { ns } else { None };
        if !meta_str(&obj, "resourceVersion").is_empty() {
            return Err(ApiError::internal(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let mut name = meta_str(&obj, "name").to_string();
        if name.is_empty() {
            let prefix = meta_str(&obj, "generateName").to_string();
            if prefix.is_empty() {
                return Err(ApiError::invalid(
                    r,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
            for _ in 0..16 {
                name = format!("{prefix}{}", util::name_suffix());
                if self.get(r, ns, &name).is_err() {
                    break;
                }
            }
            obj["metadata"]["name"] = json!(name);
        }
        self.check_namespace(r, ns)?;
        if let Some(status) = kinds::initial_status(r) {
            obj["status"] = status;
        }
        let meta = &mut obj["metadata"];
        meta["uid"] = json!(util::uuid());
        meta["creationTimestamp"] = json!(util::rfc3339(util::unix_now()));
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
        }
        self.finish(r, &mut obj, None)?;
        let key = Self::key(r, ns, &name);
        if self.bucket(r).is_some_and(|b| b.contains_key(&key)) {
            return Err(ApiError::already_exists(r, &name));
        }
        self.tombstones.remove(&(table_key(r), key.clone()));
        self.bump(&mut obj);
        self.objects
            .entry(table_key(r))
            .or_default()
            .insert(key, obj.clone());
        self.record(EventType::Added, r, obj.clone(), None);
        Ok(obj)
    }

    /// PUT: replaces the object (or only its status). A resourceVersion in
    /// the body must be the current one (optimistic concurrency).
    pub fn update(
        &mut self,
        r: &'static Resource,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
        part: Part,
    ) -> Result<Value, ApiError> {
        Self::normalize(r, ns, &mut obj)?;
        match meta_str(&obj, "name") {
            "" => obj["metadata"]["name"] = json!(name),
            body if body == name => {}
            body => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({body}) does not match the name on the URL ({name})"
                )));
            }
        }
        let old = self.get(r, ns, name)?;
        let old_rv = meta_str(&old, "resourceVersion");
        let want_rv = meta_str(&obj, "resourceVersion");
        if !want_rv.is_empty() && want_rv != old_rv {
            return Err(ApiError::conflict(
                r,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        let mut new = match part {
            Part::Status => {
                let mut n = old.clone();
                n["status"] = obj["status"].take();
                n
            }
            Part::Main if r.has_status => {
                obj["status"] = old["status"].clone();
                obj
            }
            Part::Main => obj,
        };
        if let Some(m) = new
            .as_object_mut()
            .filter(|m| m.get("status") == Some(&Value::Null))
        {
            m.remove("status");
        }
        for field in ["uid", "creationTimestamp", "resourceVersion"] {
            new["metadata"][field] = old["metadata"][field].clone();
        }
        self.finish(r, &mut new, Some(&old))?;
        if new == old {
            return Ok(old);
        }
        self.bump(&mut new);
        let key = Self::key(r, ns, name);
        self.objects
            .entry(table_key(r))
            .or_default()
            .insert(key, new.clone());
        self.record(EventType::Modified, r, new.clone(), Some(old));
        Ok(new)
    }

    fn remove(&mut self, r: &'static Resource, key: &Key) -> Option<Value> {
        let mut obj = self.objects.get_mut(&table_key(r))?.remove(key)?;
        self.bump(&mut obj);
        self.record(EventType::Deleted, r, obj.clone(), None);
        Some(obj)
    }

    /// DELETE, immediately (no finalizers, no grace period). Deleting a
    /// namespace deletes everything in it first. `preconditions` are the uid
    /// and resourceVersion of DeleteOptions.preconditions.
    pub fn delete(
        &mut self,
        r: &'static Resource,
        ns: Option<&str>,
        name: &str,
        preconditions: (Option<&str>, Option<&str>),
    ) -> Result<Value, ApiError> {
        let now = util::unix_now();
        self.tombstones
            .retain(|_, (t, _)| now - *t <= TOMBSTONE_SECONDS);
        let old = match self.get(r, ns, name) {
            Ok(old) => old,
            Err(e) => {
                let tomb = self
                    .tombstones
                    .remove(&(table_key(r), Self::key(r, ns, name)));
                return tomb.map(|(_, obj)| obj).ok_or(e);
            }
        };
        for (field, want) in [
            ("uid", preconditions.0),
            ("resourceVersion", preconditions.1),
        ] {
            if let Some(want) = want.filter(|w| *w != meta_str(&old, field)) {
                return Err(ApiError::conflict(
                    r,
                    name,
                    &format!(
                        "Precondition failed: {field} in precondition: {want}, {field} in object meta: {}",
                        meta_str(&old, field)
                    ),
                ));
            }
        }
        if r.kind == "Namespace" {
            for nr in RESOURCES.iter().filter(|x| x.namespaced) {
                let keys: Vec<Key> = self
                    .bucket(nr)
                    .into_iter()
                    .flat_map(|b| b.keys())
                    .filter(|(ons, _)| ons == name)
                    .cloned()
                    .collect();
                for k in keys {
                    if let Some(gone) = self.remove(nr, &k) {
                        self.tombstones.insert((table_key(nr), k), (now, gone));
                    }
                }
            }
        }
        self.remove(r, &Self::key(r, ns, name))
            .ok_or_else(|| ApiError::not_found(r, name))
    }

    /// DELETE on a collection: deletes every object the filter matches.
    pub fn delete_collection(&mut self, r: &'static Resource, filter: &Filter) -> Vec<Value> {
        let mut out = Vec::new();
        for obj in self.list(r, filter) {
            let (ns, name) = (meta_str(&obj, "namespace"), meta_str(&obj, "name"));
            if let Ok(gone) = self.delete(r, Some(ns), name, (None, None)) {
                out.push(gone);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    fn pods() -> &'static Resource {
        find("", "v1", "pods").unwrap()
    }

    fn pod(name: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}})
    }

    fn rv(obj: &Value) -> u64 {
        meta_str(obj, "resourceVersion").parse().unwrap()
    }

    #[test]
    fn a_new_store_has_the_four_standard_namespaces() {
        let s = Store::new(100);
        let names: Vec<String> = s
            .list(resources::namespaces(), &Filter::default())
            .iter()
            .map(|n| meta_str(n, "name").to_string())
            .collect();
        assert_eq!(
            names,
            ["default", "kube-node-lease", "kube-public", "kube-system"]
        );
        assert_eq!(s.resource_version(), 4);
    }

    #[test]
    fn create_fills_uid_timestamp_kind_namespace_and_a_fresh_resource_version() {
        let mut s = Store::new(100);
        let p = s.create(pods(), Some("default"), pod("a")).unwrap();
        assert_eq!(p["kind"], "Pod");
        assert_eq!(p["apiVersion"], "v1");
        assert_eq!(p["metadata"]["namespace"], "default");
        assert_eq!(meta_str(&p, "uid").len(), 36);
        assert!(util::parse_rfc3339(meta_str(&p, "creationTimestamp")).is_some());
        assert_eq!(rv(&p), 5);
        assert_eq!(p["status"], json!({"phase": "Pending"}));
        assert_eq!(s.get(pods(), Some("default"), "a").unwrap(), p);
    }

    #[test]
    fn create_rejects_duplicates_missing_namespaces_and_bad_names() {
        let mut s = Store::new(100);
        s.create(pods(), Some("default"), pod("a")).unwrap();
        assert_eq!(
            s.create(pods(), Some("default"), pod("a"))
                .unwrap_err()
                .code,
            409
        );
        assert_eq!(
            s.create(pods(), Some("nope"), pod("a")).unwrap_err().code,
            404
        );
        assert_eq!(
            s.create(pods(), Some("default"), pod("A_b"))
                .unwrap_err()
                .code,
            422
        );
        let mut other_ns = pod("b");
        other_ns["metadata"]["namespace"] = json!("kube-system");
        assert_eq!(
            s.create(pods(), Some("default"), other_ns)
                .unwrap_err()
                .code,
            400
        );
        let mut wrong_kind = pod("c");
        wrong_kind["kind"] = json!("Service");
        assert_eq!(
            s.create(pods(), Some("default"), wrong_kind)
                .unwrap_err()
                .code,
            400
        );
    }

    #[test]
    fn generate_name_appends_a_random_suffix() {
        let mut s = Store::new(100);
        let a = s
            .create(
                pods(),
                Some("default"),
                json!({"metadata": {"generateName": "web-"}, "spec": pod("x")["spec"]}),
            )
            .unwrap();
        let name = meta_str(&a, "name");
        assert!(name.starts_with("web-") && name.len() == 9, "{name}");
    }

    #[test]
    fn update_with_a_stale_resource_version_conflicts_and_without_one_wins() {
        let mut s = Store::new(100);
        let p = s.create(pods(), Some("default"), pod("a")).unwrap();
        let mut v2 = p.clone();
        v2["metadata"]["labels"]["app"] = json!("api");
        let v2 = s
            .update(pods(), Some("default"), "a", v2, Part::Main)
            .unwrap();
        assert!(rv(&v2) > rv(&p));
        let mut stale = p.clone();
        stale["metadata"]["labels"]["app"] = json!("db");
        assert_eq!(
            s.update(pods(), Some("default"), "a", stale.clone(), Part::Main)
                .unwrap_err()
                .code,
            409
        );
        stale["metadata"]["resourceVersion"] = json!("");
        let v3 = s
            .update(pods(), Some("default"), "a", stale, Part::Main)
            .unwrap();
        assert_eq!(v3["metadata"]["labels"]["app"], "db");
        assert_eq!(v3["metadata"]["uid"], p["metadata"]["uid"]);
    }

    #[test]
    fn pod_status_changes_only_through_the_status_part() {
        let mut s = Store::new(100);
        let p = s.create(pods(), Some("default"), pod("a")).unwrap();
        let mut with_ip = p.clone();
        with_ip["status"] =
            json!({"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]});
        let main = s
            .update(pods(), Some("default"), "a", with_ip.clone(), Part::Main)
            .unwrap();
        assert_eq!(main["status"], json!({"phase": "Pending"}));
        assert_eq!(
            rv(&main),
            rv(&p),
            "an update that changes nothing is not a new version"
        );
        with_ip["metadata"]["labels"]["app"] = json!("ignored");
        let st = s
            .update(pods(), Some("default"), "a", with_ip, Part::Status)
            .unwrap();
        assert_eq!(st["status"]["podIP"], "10.0.0.1");
        assert_eq!(st["metadata"]["labels"]["app"], "web");
    }

    #[test]
    fn deleting_a_namespace_deletes_its_objects_first() {
        let mut s = Store::new(100);
        let ns = resources::namespaces();
        s.create(ns, None, json!({"metadata": {"name": "demo"}}))
            .unwrap();
        s.create(pods(), Some("demo"), pod("a")).unwrap();
        s.create(pods(), Some("default"), pod("a")).unwrap();
        let before = s.resource_version();
        s.delete(ns, None, "demo", (None, None)).unwrap();
        assert_eq!(s.get(pods(), Some("demo"), "a").unwrap_err().code, 404);
        assert!(s.get(pods(), Some("default"), "a").is_ok());
        let events = s.events_after(before).unwrap();
        let kinds: Vec<(&str, EventType)> =
            events.iter().map(|e| (e.resource.kind, e.kind)).collect();
        assert_eq!(
            kinds,
            [
                ("Pod", EventType::Deleted),
                ("Namespace", EventType::Deleted)
            ]
        );
        assert_eq!(events[1].rv, s.resource_version());
        assert_eq!(rv(&events[1].object), s.resource_version());
    }

    #[test]
    fn deleting_an_object_just_removed_with_its_namespace_still_succeeds_once() {
        let mut s = Store::new(100);
        let ns = resources::namespaces();
        s.create(ns, None, json!({"metadata": {"name": "demo"}}))
            .unwrap();
        s.create(pods(), Some("demo"), pod("a")).unwrap();
        s.delete(ns, None, "demo", (None, None)).unwrap();
        let rv_after = s.resource_version();
        let gone = s.delete(pods(), Some("demo"), "a", (None, None)).unwrap();
        assert_eq!(gone["metadata"]["name"], "a");
        assert_eq!(s.resource_version(), rv_after, "no second deletion event");
        assert_eq!(
            s.delete(pods(), Some("demo"), "a", (None, None))
                .unwrap_err()
                .code,
            404
        );
        assert_eq!(
            s.delete(ns, None, "demo", (None, None)).unwrap_err().code,
            404
        );
    }

    #[test]
    fn delete_checks_preconditions() {
        let mut s = Store::new(100);
        s.create(pods(), Some("default"), pod("a")).unwrap();
        let err = s
            .delete(pods(), Some("default"), "a", (Some("other-uid"), None))
            .unwrap_err();
        assert_eq!(err.code, 409);
        assert!(s.delete(pods(), Some("default"), "a", (None, None)).is_ok());
        assert_eq!(
            s.delete(pods(), Some("default"), "a", (None, None))
                .unwrap_err()
                .code,
            404
        );
    }

    #[test]
    fn lists_filter_by_namespace_labels_and_fields() {
        let mut s = Store::new(100);
        s.create(pods(), Some("default"), pod("a")).unwrap();
        let mut b = pod("b");
        b["metadata"]["labels"]["app"] = json!("db");
        s.create(pods(), Some("default"), b).unwrap();
        s.create(pods(), Some("kube-system"), pod("a")).unwrap();
        let names = |f: Filter| -> Vec<String> {
            s.list(pods(), &f)
                .iter()
                .map(|o| format!("{}/{}", meta_str(o, "namespace"), meta_str(o, "name")))
                .collect()
        };
        assert_eq!(
            names(Filter::default()),
            ["default/a", "default/b", "kube-system/a"]
        );
        let web = Filter {
            labels: LabelSelector::parse("app=web").unwrap(),
            ..Filter::default()
        };
        assert_eq!(names(web), ["default/a", "kube-system/a"]);
        let by_name = Filter {
            fields: FieldSelector::parse("metadata.name=a").unwrap(),
            ..Filter::default()
        };
        assert_eq!(names(by_name), ["default/a", "kube-system/a"]);
        let by_ns = Filter {
            fields: FieldSelector::parse("metadata.namespace=kube-system").unwrap(),
            ..Filter::default()
        };
        assert_eq!(names(by_ns), ["kube-system/a"]);
        let one = Filter {
            namespace: Some("default".into()),
            fields: FieldSelector::parse("metadata.name=b").unwrap(),
            ..Filter::default()
        };
        assert_eq!(names(one), ["default/b"]);
    }

    #[test]
    fn the_event_log_keeps_a_bounded_history_and_expires_older_versions() {
        let mut s = Store::new(3);
        for i in 0..5 {
            s.create(pods(), Some("default"), pod(&format!("p{i}")))
                .unwrap();
        }
        let now = s.resource_version();
        assert_eq!(s.events_after(now - 3).unwrap().len(), 3);
        assert_eq!(s.events_after(now - 4).unwrap_err().code, 410);
        assert!(s.events_after(now).unwrap().is_empty());
        s.compact();
        assert_eq!(s.events_after(now - 1).unwrap_err().reason, "Expired");
        assert!(s.events_after(now).unwrap().is_empty());
    }

    #[test]
    fn watchers_with_selectors_see_objects_enter_and_leave_as_added_and_deleted() {
        let mut s = Store::new(100);
        let p = s.create(pods(), Some("default"), pod("a")).unwrap();
        let f = Filter {
            labels: LabelSelector::parse("app=db").unwrap(),
            ..Filter::default()
        };
        let start = s.resource_version();
        let mut db = p;
        db["metadata"]["labels"]["app"] = json!("db");
        let db = s
            .update(pods(), Some("default"), "a", db, Part::Main)
            .unwrap();
        let mut web = db;
        web["metadata"]["labels"]["app"] = json!("web");
        s.update(pods(), Some("default"), "a", web, Part::Main)
            .unwrap();
        let seen: Vec<EventType> = s
            .events_after(start)
            .unwrap()
            .iter()
            .filter_map(|e| f.translate(e).map(|(t, _)| t))
            .collect();
        assert_eq!(seen, [EventType::Added, EventType::Deleted]);
    }

    #[test]
    fn services_get_a_cluster_ip_that_survives_replacement() {
        let mut s = Store::new(100);
        let svcs = find("", "v1", "services").unwrap();
        let svc = json!({"metadata": {"name": "web"}, "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}});
        let created = s.create(svcs, Some("default"), svc.clone()).unwrap();
        let ip = created["spec"]["clusterIP"].as_str().unwrap().to_string();
        assert!(ip.starts_with("10.96."), "{ip}");
        assert_eq!(created["spec"]["ports"][0]["targetPort"], 80);
        let replaced = s
            .update(svcs, Some("default"), "web", svc, Part::Main)
            .unwrap();
        assert_eq!(replaced["spec"]["clusterIP"], json!(ip));
    }
}
