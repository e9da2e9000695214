//! Kubernetes objects read from files, as `kubectl apply -f` would take them:
//! a FILE, or a DIR walked recursively for `*.yaml`, `*.yml` and `*.json`
//! (sorted by path, so that the order is the same on every run).
//!
//! A file holds one or more YAML documents (`---`), or JSON values; a
//! document is one object or a `kind: List` (also `PodList` and the like) of
//! objects in `items`, as `kubectl get -o yaml` prints. Objects of the kinds
//! Sluice reads land in [`Objects`]; any other kind is skipped and counted in
//! [`Loaded::skipped`]. A document that does not parse, or an object of a
//! known kind that does not fit its type, is a [`DocError`] naming the file
//! and the document; the rest of the files are still read.
//!
//! A namespaced object without `metadata.namespace` is put in `default`, as
//! `kubectl apply` does with the default context.
use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    networking::v1::NetworkPolicy,
};
use serde::Deserialize;
use serde_json::Value;

use crate::v1alpha2::ClusterNetworkPolicy;

/// The namespace of a namespaced object that does not name one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The objects read, by kind, in the order they were read.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub network_policies: Vec<NetworkPolicy>,
    pub cluster_network_policies: Vec<ClusterNetworkPolicy>,
    pub services: Vec<Service>,
    pub nodes: Vec<Node>,
    /// Where each object came from (the first place, if several define it).
    pub origins: BTreeMap<ObjectRef, Origin>,
}

/// An object by kind, namespace (empty for cluster-scoped kinds) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: &str, namespace: &str, name: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

/// `Kind/namespace/name`, or `Kind/name` for a cluster-scoped object.
impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Where a document or object is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based number of the document in the file.
    pub document: usize,
    /// 1-based line where the document starts, when it could be told (a
    /// line-based scan for `---` that agrees with the parser's count).
    pub line: Option<usize>,
    /// 0-based index in `items` when the object came from a List.
    pub item: Option<usize>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file.display(), self.document)?;
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        if let Some(i) = self.item {
            write!(f, ", items[{i}]")?;
        }
        Ok(())
    }
}

/// A document (or file) that could not be read; the others still were.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct DocError {
    pub origin: Origin,
    pub message: String,
}

/// The path given cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: no *.yaml, *.yml or *.json file found")]
    NoFiles(PathBuf),
}

/// What [`load`] read.
#[derive(Debug, Default)]
pub struct Loaded {
    pub objects: Objects,
    /// Documents that did not parse or did not fit their kind's type.
    pub errors: Vec<DocError>,
    /// Objects of other kinds, counted by `apiVersion kind`.
    pub skipped: BTreeMap<String, usize>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
}

/// Reads `path`: a file (whatever its extension), or a directory walked
/// recursively for `*.yaml`, `*.yml` and `*.json`.
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    load_all(std::slice::from_ref(&path))
}

/// Reads each of `paths` as [`load`] does, into one [`Loaded`] (as
/// `kubectl apply -f A -f B`). Any path that cannot be read is the error.
pub fn load_all<P: AsRef<Path>>(paths: &[P]) -> Result<Loaded, LoadError> {
    let mut files = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let io = |source| LoadError::Io {
            path: path.to_owned(),
            source,
        };
        if fs::metadata(path).map_err(io)?.is_dir() {
            let before = files.len();
            walk(path, &mut files)?;
            if files.len() == before {
                return Err(LoadError::NoFiles(path.to_owned()));
            }
        } else {
            files.push(path.to_owned());
        }
    }
    let mut loaded = Loaded::default();
    for file in files {
        match fs::read_to_string(&file) {
            Ok(text) => load_text(&mut loaded, &file, &text),
            Err(e) => loaded.errors.push(DocError {
                origin: Origin {
                    file: file.clone(),
                    document: 0,
                    line: None,
                    item: None,
                },
                message: format!("cannot read: {e}"),
            }),
        }
        loaded.files.push(file);
    }
    Ok(loaded)
}

/// Reads the documents of one file's text into `loaded`; `file` names it in
/// origins and errors. JSON if the name ends in `.json`, else YAML.
pub fn load_text(loaded: &mut Loaded, file: &Path, text: &str) {
    let is_json = file.extension().is_some_and(|e| e == "json");
    let docs = if is_json {
        json_docs(text)
    } else {
        yaml_docs(text)
    };
    let lines = if is_json {
        Vec::new()
    } else {
        document_lines(text)
    };
    // Line numbers only when the scan agrees with the parser.
    let agree = lines.len() == docs.len();
    for (i, doc) in docs.into_iter().enumerate() {
        let origin = Origin {
            file: file.to_owned(),
            document: i + 1,
            line: if agree { lines.get(i).copied() } else { None },
            item: None,
        };
        match doc {
            Ok(Value::Null) => {} // an empty document (a trailing `---`)
            Ok(value) => load_value(loaded, origin, value),
            Err(message) => loaded.errors.push(DocError { origin, message }),
        }
    }
}

/// The documents of a YAML text, each parsed or its error.
fn yaml_docs(text: &str) -> Vec<Result<Value, String>> {
    let mut out = Vec::new();
    let mut last_error = String::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        match Value::deserialize(doc) {
            Ok(v) => out.push(Ok(v)),
            Err(e) => {
                // After a syntax error libyaml's parser stays in its error
                // state and serde_yaml_ng's iterator yields that same error
                // forever: the same message twice means the stream is over.
                // (A type error names its own line, so two differ.)
                let message = format!("invalid YAML: {e}");
                if message == last_error {
                    break;
                }
                last_error.clone_from(&message);
                out.push(Err(message));
            }
        }
    }
    out
}

/// The JSON values of a text (one, or several one after the other).
fn json_docs(text: &str) -> Vec<Result<Value, String>> {
    let mut out = Vec::new();
    for v in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
        match v {
            Ok(v) => out.push(Ok(v)),
            Err(e) => {
                out.push(Err(format!("invalid JSON: {e}")));
                break;
            }
        }
    }
    out
}

/// The 1-based line where each document of a YAML stream starts: its first
/// content line (its `---` line if it has none). A `---` before the first
/// document does not start a second one.
fn document_lines(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    // The open document: the line of its `---`, and of its first content.
    let mut open: Option<(Option<usize>, Option<usize>)> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line == "---" || line.starts_with("--- ") || line.starts_with("---\t") {
            if let Some((sep, content)) = open {
                starts.extend(content.or(sep));
            }
            open = Some((Some(n), None));
            continue;
        }
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with('%') {
            continue;
        }
        match &mut open {
            None => open = Some((None, Some(n))),
            Some((_, content @ None)) => *content = Some(n),
            Some(_) => {}
        }
    }
    if let Some((sep, content)) = open {
        starts.extend(content.or(sep));
    }
    starts
}

/// One parsed document: an object or a List of them.
fn load_value(loaded: &mut Loaded, origin: Origin, value: Value) {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind.ends_with("List")
        && let Some(Value::Array(items)) = value.get("items")
    {
        for (i, item) in items.iter().enumerate() {
            let origin = Origin {
                item: Some(i),
                ..origin.clone()
            };
            load_object(loaded, origin, item.clone());
        }
        return;
    }
    load_object(loaded, origin, value);
}

fn load_object(loaded: &mut Loaded, origin: Origin, value: Value) {
    let field = |k: &str| {
        value
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if !value.is_object() {
        let message = "not an object (a mapping with apiVersion and kind)".to_owned();
        loaded.errors.push(DocError { origin, message });
        return;
    }
    if kind.is_empty() || api_version.is_empty() {
        let message = "no apiVersion or kind".to_owned();
        loaded.errors.push(DocError { origin, message });
        return;
    }
    let o = &mut loaded.objects;
    let at = origin.clone();
    let (origins, k) = (&mut o.origins, kind.as_str());
    let result = match (api_version.as_str(), k) {
        ("v1", "Namespace") => add(&mut o.namespaces, origins, k, false, at, value),
        ("v1", "Pod") => add(&mut o.pods, origins, k, true, at, value),
        ("v1", "Service") => add(&mut o.services, origins, k, true, at, value),
        ("v1", "Node") => add(&mut o.nodes, origins, k, false, at, value),
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            add(&mut o.network_policies, origins, k, true, at, value)
        }
        ("policy.networking.k8s.io/v1alpha2", "ClusterNetworkPolicy") => add(
            &mut o.cluster_network_policies,
            origins,
            k,
            false,
            at,
            value,
        ),
        _ => {
            *loaded
                .skipped
                .entry(format!("{api_version} {kind}"))
                .or_default() += 1;
            Ok(())
        }
    };
    if let Err(message) = result {
        loaded.errors.push(DocError { origin, message });
    }
}

/// Objects whose `metadata` is a k8s-openapi `ObjectMeta`.
trait HasMeta {
    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
}

macro_rules! has_meta {
    ($($t:ty),*) => {$(
        impl HasMeta for $t {
            fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &mut self.metadata
            }
        }
    )*};
}
has_meta!(
    Namespace,
    Pod,
    Service,
    Node,
    NetworkPolicy,
    ClusterNetworkPolicy
);

/// Deserialises `value` as a `T`, defaults its namespace, and records it.
fn add<T: HasMeta + serde::de::DeserializeOwned>(
    list: &mut Vec<T>,
    origins: &mut BTreeMap<ObjectRef, Origin>,
    kind: &str,
    namespaced: bool,
    origin: Origin,
    value: Value,
) -> Result<(), String> {
    let mut obj: T = serde_json::from_value(value).map_err(|e| format!("invalid {kind}: {e}"))?;
    let meta = obj.meta_mut();
    let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
        return Err(format!("{kind} without metadata.name"));
    };
    let namespace = if namespaced {
        meta.namespace
            .get_or_insert_with(|| DEFAULT_NAMESPACE.to_owned())
            .clone()
    } else {
        String::new()
    };
    origins
        .entry(ObjectRef::new(kind, &namespace, &name))
        .or_insert(origin);
    list.push(obj);
    Ok(())
}

/// The files under `dir` to read, sorted.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let io = |source| LoadError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        {
            out.push(p);
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "files_tests.rs"]
mod tests;
