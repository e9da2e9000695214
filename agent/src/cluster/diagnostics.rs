//! Policy input the compiler could not use as written, told to the people
//! who wrote it: a Warning Event on the object (`kubectl describe` shows
//! it), once per problem and per node whose pods it concerns.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    model::{Kind, ObjKey},
    policy::{Compiler, Diagnostic},
};

/// A Warning Event about an object the compiler could not use as written
/// (the rule concerned denies).
#[derive(Clone, Debug, PartialEq)]
pub struct Notice {
    pub regarding: ObjectReference,
    pub note: String,
}

/// The most an Event's note may hold (the API allows 1 kB).
const NOTE_MAX: usize = 1000;

/// What was reported, and what is still to post.
#[derive(Default)]
pub struct Diagnostics {
    /// Object -> the problems last reported for it as an Event.
    reported: BTreeMap<ObjKey, BTreeSet<String>>,
    /// Events to post (taken by the caller, which owns the API client).
    notices: Vec<Notice>,
}

impl Diagnostics {
    /// Queues a Notice for each object of this node's concern (below) whose
    /// problems differ from those last reported; objects in `fed` (applied
    /// or deleted in this batch) without problems now are forgotten, so a
    /// problem that comes back is reported again. `endpoints_changed`: local
    /// endpoints changed in this batch, so a policy compiled earlier (and
    /// then of no concern here) may now select one of them.
    pub fn note(
        &mut self,
        compiler: &Compiler,
        found: &[Diagnostic],
        endpoints_changed: bool,
        fed: &[ObjKey],
        reference: impl Fn(&ObjKey) -> Option<ObjectReference>,
    ) {
        let mut now: BTreeMap<ObjKey, BTreeSet<String>> = BTreeMap::new();
        // Every node sees every object: each reports only what concerns its
        // own pods, so a bad policy makes one Event per node it affects, not
        // one per node of the cluster.
        let concerns_this_node = |d: &&Diagnostic| match d.object.kind {
            Kind::NetworkPolicy => compiler.selects_local(&d.object.object_ref()),
            Kind::ClusterNetworkPolicy => compiler.cnp_selects_local(&d.object.name),
            Kind::Pod => compiler.is_local(&d.object.object_ref()),
            Kind::Namespace => true,
            Kind::Node | Kind::Service => false,
        };
        let earlier = if endpoints_changed {
            compiler.diagnostics()
        } else {
            Vec::new()
        };
        let unreported = |d: &&Diagnostic| !self.reported.contains_key(&d.object);
        let earlier = earlier.iter().filter(unreported);
        for d in found.iter().chain(earlier).filter(concerns_this_node) {
            now.entry(d.object.clone())
                .or_default()
                .insert(d.reason.clone());
        }
        for key in fed {
            if !now.contains_key(key) {
                self.reported.remove(key);
            }
        }
        for (key, reasons) in now {
            if self.reported.get(&key) == Some(&reasons) {
                continue;
            }
            let Some(regarding) = reference(&key) else {
                continue;
            };
            let mut note = reasons.iter().cloned().collect::<Vec<_>>().join("; ");
            if note.len() > NOTE_MAX {
                let mut end = NOTE_MAX;
                while !note.is_char_boundary(end) {
                    end -= 1;
                }
                note.truncate(end);
            }
            self.notices.push(Notice { regarding, note });
            self.reported.insert(key, reasons);
        }
    }

    /// The notices queued since the last call.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }
}

/// Posts the Warning Events the reconciler queues, as `sluice-agent` on
/// `node_name`, so that `kubectl describe` shows why a rule is not in
/// force. Reason `Invalid<Kind>` (e.g. InvalidNetworkPolicy). Events about
/// cluster-scoped objects (Namespaces, ClusterNetworkPolicies) go to
/// namespace `default`, as kube's Recorder does. A failed post
/// is logged and not retried: the agent's log already has the problem, and
/// a full queue drops notices rather than slow programming.
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
