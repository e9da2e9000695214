//! Messages between the CNI plugin and the node agent.
//!
//! Wire format: the client connects to the agent's unix socket (mode 0600,
//! root only), writes one JSON `Request` followed by `\n`, reads one JSON
//! `Response` line, and closes. One request per connection keeps both sides
//! trivially correct under 50 parallel ADDs.
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

pub mod queue;

/// Default path of the agent socket.
pub const DEFAULT_SOCKET: &str = "/run/sluice/agent.sock";

/// One pod attachment as CNI names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSpec {
    pub attachment: Attachment,
    /// Path of the pod's network namespace (CNI_NETNS).
    pub netns: String,
    /// Host end of the veth pair.
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// From CNI_ARGS (K8S_POD_NAMESPACE / K8S_POD_NAME), when the runtime set them.
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    /// From CNI_ARGS (K8S_POD_UID): which incarnation of that name the
    /// endpoint is for (a pod re-created under its name has a new one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the agent ready to take endpoints?
    Status,
    /// Register the endpoint, write its map entries and attach the programs
    /// to `host_ifname`. Answers only once all of that is done.
    AddEndpoint { endpoint: EndpointSpec },
    /// Forget the endpoint: detach, delete its map entries. Unknown is `Ok`.
    /// When the deletion queue holds a pending removal of the attachment
    /// that names a host veth (the plugin's DEL set it down and queued
    /// it), the agent answers `RemovalDeferred` and deletes that veth after
    /// answering, then marks the removal done (`queue`).
    DelEndpoint { attachment: Attachment },
    /// Verify the endpoint is registered and its programs attached.
    CheckEndpoint { attachment: Attachment },
    /// Forget every endpoint not in `valid`.
    Gc { valid: Vec<Attachment> },
    /// Replace the policy of an endpoint (the agent's `EndpointPolicy` as
    /// JSON): how a standalone agent (no API server) gets policy, used by
    /// tests, the demo and the benches. In cluster mode the NetworkPolicy
    /// compiler writes every endpoint's policy and its next change to that
    /// endpoint replaces what this wrote. A policy that does not parse is
    /// rejected with code 7 and changes nothing.
    SetPolicy {
        attachment: Attachment,
        policy: serde_json::Value,
    },
    /// Which objects' effects are in the maps (cluster mode).
    Programmed,
    /// `Programmed` for these `Kind/namespace/name` (or `Kind/name`) keys
    /// only: an object absent from the answer is not programmed (or not
    /// known). What a wait for a few objects asks on a cluster of 100,000.
    ProgrammedOf { keys: Vec<String> },
    /// How the agent runs (standalone or against an API server), for
    /// `sluice status`.
    Info,
    /// This node's pod CIDRs, from its Node object (cluster mode): the IPAM
    /// ranges when the plugin's config names none.
    PodCidrs,
    /// Why a flow passes or not (`sluice explain`), answered from the
    /// compiler state the agent programmed (cluster mode). `from`/`to`:
    /// `ns/pod`, `svc/ns/name` (`to` only) or an address; `flow`:
    /// `PORT/PROTO`.
    Explain {
        from: String,
        to: String,
        flow: String,
    },
    /// Every object the agent watches (Namespaces, Pods, NetworkPolicies,
    /// ClusterNetworkPolicies, Services, Nodes) as it knows them, without
    /// managed fields and annotations (cluster mode): what `sluice lint
    /// --live` checks. Answered with `Response::Objects`.
    Objects,
    /// The pods in `namespace` whose labels include every one of `labels`
    /// (all of the namespace's when empty), cluster-wide, as the agent
    /// knows them (cluster mode): the sources of a `sluice assert` test
    /// given by selector. Answered with `Response::Pods`.
    Pods {
        namespace: String,
        #[serde(default)]
        labels: std::collections::BTreeMap<String, String>,
    },
    /// Connect from inside the network namespace of `from` (`ns/pod`, a
    /// pod on this node) to `to` (`ns/pod`, `svc/ns/name` or an address)
    /// on `port`/`protocol` (`TCP` or `UDP`), within `timeout_ms`
    /// (`sluice assert`). Answered with `Response::Probe`; a pod that is
    /// not on this node is refused with code 3 (`CONTAINER_UNKNOWN`), so a
    /// client asking every node's agent knows to ask the next.
    Probe {
        from: String,
        to: String,
        port: u16,
        protocol: String,
        timeout_ms: u64,
    },
    /// Stream events as they happen (drops; with `filter.verdict`
    /// forwarded flows and would-drops too), one JSON object per line,
    /// until the client closes the connection (or its sending side: the
    /// agent reads it to notice an observer gone); first the kept ones
    /// that `replay` asks for.
    Observe {
        #[serde(default)]
        filter: ObserveFilter,
        #[serde(default, skip_serializing_if = "Replay::is_none")]
        replay: Replay,
    },
}

/// Which past records `Observe` sends before the live ones (from the
/// agent's bounded history; both fields: the last `last` of those since).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replay {
    /// Records of the last this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// The last this many matching records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<usize>,
}

impl Replay {
    pub fn is_none(&self) -> bool {
        self.since_ms.is_none() && self.last.is_none()
    }
}

/// Which flows `Observe` streams; every field that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObserveFilter {
    /// Either end is in this namespace.
    pub namespace: Option<String>,
    /// Either end is this pod (`name` or `namespace/name`).
    pub pod: Option<String>,
    /// `dropped` (the default, also when absent), `forwarded` (allowed new
    /// flows), `would-drop` (flows an audit-mode policy would drop), or
    /// `all`.
    pub verdict: Option<String>,
    /// `ingress` or `egress`.
    pub direction: Option<String>,
}

/// How the agent gets policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentMode {
    /// No API server: policy only through `SetPolicy`; nothing to sync.
    Standalone,
    /// Watching an API server: ready once every kind is listed and
    /// programmed.
    Cluster,
}

/// The agent's side of one AddEndpoint, in microseconds: waiting for
/// its state lock, the endpoint's record and addresses written to the maps,
/// the pod's policy computed and written, and the two program hooks
/// attached (TCX links: each waits for an RCU grace period under the
/// kernel's RTNL lock). `bench cni` prints them; `SLUICE_CNI_PHASES=1`
/// makes the plugin print them to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddPhases {
    pub queued_us: u64,
    pub maps_us: u64,
    pub policy_us: u64,
    pub attach_wait_us: u64,
    pub attach_us: u64,
}

/// CNI error codes the agent may ask the plugin to report.
pub mod code {
    pub const CONTAINER_UNKNOWN: u32 = 3;
    pub const IO_FAILURE: u32 = 5;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific: the endpoint drifted from what was registered.
    pub const ENDPOINT_DRIFT: u32 = 101;
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok,
    /// `DelEndpoint`: the endpoint is forgotten, and the agent deletes the
    /// host veth of its queued removal after this answer, then marks it
    /// done (`queue`). The addresses stay held until then.
    RemovalDeferred,
    Endpoint {
        ep_id: u32,
        /// Where the agent's time went (AddEndpoint); older agents send
        /// none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        phases: Option<AddPhases>,
    },
    Programmed {
        /// Pods, Namespaces and NetworkPolicies have all been listed and
        /// programmed at least once.
        synced: bool,
        /// `Kind/namespace/name` (or `Kind/name`) -> resourceVersion whose
        /// effect is in the maps.
        objects: std::collections::BTreeMap<String, String>,
    },
    PodCidrs {
        cidrs: Vec<String>,
    },
    Info {
        mode: AgentMode,
        /// The Node the agent serves (cluster mode).
        #[serde(default)]
        node: Option<String>,
        /// Every kind listed and programmed (always false standalone:
        /// there is nothing to sync).
        synced: bool,
    },
    /// One explanation (the agent's `policy::explain::Explanation`), or
    /// one per backend when `to` is a Service.
    Explain {
        explanations: Vec<serde_json::Value>,
    },
    /// The answer to `Request::Objects`: a `kind: List` (`items`).
    Objects {
        list: serde_json::Value,
    },
    /// `ns/name` of each pod matching `Request::Pods`, sorted.
    Pods {
        pods: Vec<String>,
    },
    /// What one `Request::Probe` saw: `open` (TCP: connected; UDP: a reply
    /// came), the address it tried and, in words, what happened
    /// (`connected`, `refused`, `timed out`, `reply`, an error).
    Probe {
        address: String,
        open: bool,
        detail: String,
    },
    Error {
        code: u32,
        msg: String,
        details: String,
    },
}

impl Request {
    pub fn to_line(&self) -> serde_json::Result<String> {
        let mut s = serde_json::to_string(self)?;
        s.push('\n');
        Ok(s)
    }
}

impl Response {
    pub fn to_line(&self) -> serde_json::Result<String> {
        let mut s = serde_json::to_string(self)?;
        s.push('\n');
        Ok(s)
    }

    pub fn error(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::Error {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_one_json_line() {
        let req = Request::DelEndpoint {
            attachment: Attachment {
                container_id: "abc".into(),
                ifname: "eth0".into(),
            },
        };
        let line = req.to_line().unwrap();
        assert!(line.ends_with('\n'));
        assert!(line.contains(r#""op":"del_endpoint""#));
        let back: Request = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn probe_and_pods_round_trip() {
        let req = Request::Probe {
            from: "x/a".into(),
            to: "svc/y/web".into(),
            port: 80,
            protocol: "TCP".into(),
            timeout_ms: 500,
        };
        let line = req.to_line().unwrap();
        assert!(line.contains(r#""op":"probe""#), "{line}");
        assert_eq!(
            serde_json::from_str::<Request>(line.trim_end()).unwrap(),
            req
        );
        // Labels may be left out.
        let pods: Request = serde_json::from_str(r#"{"op":"pods","namespace":"x"}"#).unwrap();
        assert_eq!(
            pods,
            Request::Pods {
                namespace: "x".into(),
                labels: Default::default()
            }
        );
        let resp = Response::Probe {
            address: "10.0.0.2".into(),
            open: false,
            detail: "timed out".into(),
        };
        let back: Response = serde_json::from_str(resp.to_line().unwrap().trim_end()).unwrap();
        assert_eq!(back, resp);
    }
}
