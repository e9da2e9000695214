//! The plugin configuration (stdin), parsed and validated without I/O.
//!
//! ```json
//! {
//!   "cniVersion": "1.1.0",
//!   "name": "sluice",
//!   "type": "sluice",
//!   "ranges": [["10.244.1.0/24"], ["fd00:10:244:1::/64"]],
//!   "dataDir": "/var/lib/cni/sluice",
//!   "agentSocket": "/run/sluice/agent.sock",
//!   "agentTimeoutMs": 10000,
//!   "mtu": 1500,
//!   "deleteQueueDir": "/var/lib/sluice/delete-queue"
//! }
//! ```
//!
//! `deleteQueueDir` is where DEL queues an endpoint's removal when the
//! agent is unreachable (`sluice_proto::queue`); it must be the agent's
//! `<state-dir>/delete-queue`.
//!
//! What runtimes add and this plugin does not use is accepted and ignored,
//! by name: `runtimeConfig` (any key: the plugin declares no capabilities,
//! so a runtime sends none; containerd and CRI-O would send `portMappings`,
//! `bandwidth`, `ipRanges`, `ips`, `mac`, `dns`, `aliases`, `cgroupPath`,
//! `io.kubernetes.cri.pod-annotations` only for declared ones),
//! `capabilities` and `args`; they are named in [`NetConf::ignored`], which
//! the verbs print on stderr. Any other unknown key is ignored by serde.
//!
//! Without `ranges` (key absent or null) ADD takes them from the Node's
//! podCIDRs, which the agent knows ([`node_ranges`]); `"ranges": []` is an
//! error.
//!
//! Malformed JSON is error 6; JSON that parses but is not a valid
//! configuration (wrong type, bad CIDR, empty ranges, ...) is error 7.
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use sluice_proto::{Attachment, Response};

use crate::agent::AgentError;
use crate::ipam::RangeSet;
use crate::result::CniResult;
use crate::version::{self, Version};
use crate::{Error, Result};

pub const PLUGIN_TYPE: &str = "sluice";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/sluice";
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    pub version: Version,
    pub name: String,
    /// One range set per address family, at most two. `None`: not
    /// configured, ADD asks the agent for the Node's podCIDRs.
    pub ranges: Option<Vec<RangeSet>>,
    pub data_dir: PathBuf,
    pub agent_socket: PathBuf,
    pub agent_timeout: Duration,
    pub mtu: Option<u32>,
    pub prev_result: Option<CniResult>,
    /// `cni.dev/valid-attachments`, set by the runtime for GC only.
    pub valid_attachments: Option<Vec<Attachment>>,
    /// Where DEL queues removals the agent could not take.
    pub delete_queue_dir: PathBuf,
    /// What the runtime passed that this plugin ignores on purpose:
    /// `runtimeConfig.<key>`, `capabilities.<key>`, `args`.
    pub ignored: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    ranges: Option<Vec<Vec<String>>>,
    data_dir: Option<String>,
    agent_socket: Option<String>,
    agent_timeout_ms: Option<u64>,
    mtu: Option<u32>,
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<ValidAttachment>>,
    delete_queue_dir: Option<String>,
    runtime_config: Option<serde_json::Map<String, Value>>,
    capabilities: Option<serde_json::Map<String, Value>>,
    args: Option<Value>,
}

#[derive(Deserialize)]
struct ValidAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// Step 1: stdin must be JSON (error 6 otherwise).
pub fn parse_json(stdin: &[u8]) -> Result<Value> {
    serde_json::from_slice(stdin).map_err(Error::Decode)
}

/// Step 2: the version to serve, from `cniVersion`/`cniVersions`.
pub fn negotiate(v: &Value) -> Result<Version> {
    let obj = v
        .as_object()
        .ok_or_else(|| Error::InvalidConfig("the configuration must be a JSON object".into()))?;
    let cni_version = match obj.get("cniVersion") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(Error::InvalidConfig("cniVersion must be a string".into())),
    };
    let cni_versions: Vec<String> = match obj.get("cniVersions") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|_| Error::InvalidConfig("cniVersions must be a list of strings".into()))?,
    };
    version::negotiate(cni_version, &cni_versions)
}

/// Step 3: the typed configuration (error 7 for anything invalid).
pub fn from_value(v: Value, version: Version) -> Result<NetConf> {
    let raw: RawConf = serde_json::from_value(v)
        .map_err(|e| Error::InvalidConfig(format!("bad field type: {e}")))?;
    match raw.kind.as_deref() {
        Some(PLUGIN_TYPE) => {}
        Some(other) => {
            return Err(Error::InvalidConfig(format!(
                "type is {other:?}, this plugin is {PLUGIN_TYPE:?}"
            )));
        }
        None => return Err(Error::InvalidConfig("type is missing".into())),
    }
    let name = raw
        .name
        .ok_or_else(|| Error::InvalidConfig("name is missing".into()))?;
    validate_network_name(&name)?;
    let ranges = raw.ranges.as_deref().map(RangeSet::parse_all).transpose()?;
    let agent_timeout = match raw.agent_timeout_ms {
        None => DEFAULT_AGENT_TIMEOUT,
        Some(0) => return Err(Error::InvalidConfig("agentTimeoutMs must be > 0".into())),
        Some(ms) => Duration::from_millis(ms),
    };
    // Checked again by ADD once ranges from the Node are known.
    validate_mtu(raw.mtu, ranges.as_deref().unwrap_or_default())?;
    let prev_result = match raw.prev_result {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value(v)
                .map_err(|e| Error::InvalidConfig(format!("prevResult: {e}")))?,
        ),
    };
    let ignored = ignored_keys(
        raw.runtime_config.as_ref(),
        raw.capabilities.as_ref(),
        raw.args.as_ref(),
    );
    Ok(NetConf {
        version,
        name,
        ranges,
        data_dir: non_empty_path(raw.data_dir, "dataDir", DEFAULT_DATA_DIR)?,
        agent_socket: non_empty_path(
            raw.agent_socket,
            "agentSocket",
            sluice_proto::DEFAULT_SOCKET,
        )?,
        agent_timeout,
        mtu: raw.mtu,
        prev_result,
        valid_attachments: raw.valid_attachments.map(|v| {
            v.into_iter()
                .map(|a| Attachment {
                    container_id: a.container_id,
                    ifname: a.ifname,
                })
                .collect()
        }),
        delete_queue_dir: non_empty_path(
            raw.delete_queue_dir,
            "deleteQueueDir",
            sluice_proto::queue::DEFAULT_DIR,
        )?,
        ignored,
    })
}

/// Names what the runtime passed that this plugin does not use: every
/// `runtimeConfig` key (no capability is declared), every declared
/// `capabilities` key (a conflist mistake: nothing here implements one),
/// and `args`.
fn ignored_keys(
    runtime_config: Option<&serde_json::Map<String, Value>>,
    capabilities: Option<&serde_json::Map<String, Value>>,
    args: Option<&Value>,
) -> Vec<String> {
    let rc = runtime_config
        .into_iter()
        .flat_map(|m| m.keys())
        .map(|k| format!("runtimeConfig.{k}"));
    let caps = capabilities
        .into_iter()
        .flat_map(|m| m.iter())
        .filter(|(_, on)| on.as_bool() != Some(false))
        .map(|(k, _)| format!("capabilities.{k}"));
    let args = args
        .filter(|a| !a.is_null() && a.as_object().is_none_or(|o| !o.is_empty()))
        .map(|_| "args".to_string());
    rc.chain(caps).chain(args).collect()
}

/// All three steps, for callers that do not need the version on failure.
pub fn parse(stdin: &[u8]) -> Result<NetConf> {
    let v = parse_json(stdin)?;
    let version = negotiate(&v)?;
    from_value(v, version)
}

/// The MTU fits the families served (IPv6 needs 1280).
pub fn validate_mtu(mtu: Option<u32>, ranges: &[RangeSet]) -> Result<()> {
    let Some(mtu) = mtu else { return Ok(()) };
    let min = if ranges.iter().any(RangeSet::is_v6) {
        1280
    } else {
        68
    };
    if !(min..=65535).contains(&mtu) {
        return Err(Error::InvalidConfig(format!(
            "mtu {mtu} is outside {min}..=65535"
        )));
    }
    Ok(())
}

/// The ranges of a configuration without `ranges`, from the agent's answer
/// to `PodCidrs`: each CIDR one range set, validated like configured ranges
/// (so at most one IPv4 and one IPv6). An unreachable agent is 11; an
/// agent error, an empty list or any other answer is 7.
pub fn node_ranges(answer: Result<Response, AgentError>) -> Result<Vec<RangeSet>> {
    const NONE: &str = "no ranges configured and the agent knows no podCIDRs";
    let cidrs = match answer.map_err(Error::AgentUnavailable)? {
        Response::PodCidrs { cidrs } if !cidrs.is_empty() => cidrs,
        Response::PodCidrs { .. } => return Err(Error::InvalidConfig(NONE.into())),
        Response::Error { code, msg, details } => {
            let details = if details.is_empty() {
                String::new()
            } else {
                format!(": {details}")
            };
            return Err(Error::InvalidConfig(format!(
                "{NONE} (agent error {code}: {msg}{details})"
            )));
        }
        other => {
            return Err(Error::InvalidConfig(format!(
                "{NONE} (unexpected answer {other:?})"
            )));
        }
    };
    let sets: Vec<Vec<String>> = cidrs.iter().map(|c| vec![c.clone()]).collect();
    RangeSet::parse_all(&sets).map_err(|e| match e {
        Error::InvalidConfig(m) => {
            Error::InvalidConfig(format!("the Node's podCIDRs {cidrs:?}: {m}"))
        }
        other => other,
    })
}

fn non_empty_path(v: Option<String>, field: &str, default: &str) -> Result<PathBuf> {
    match v {
        None => Ok(PathBuf::from(default)),
        Some(s) if s.is_empty() => Err(Error::InvalidConfig(format!("{field} is empty"))),
        Some(s) => Ok(PathBuf::from(s)),
    }
}

/// SPEC.md: starts with an alphanumeric, then alphanumerics, '_', '.', '-'.
/// It names the IPAM directory, so this also keeps it a single path part.
fn validate_network_name(name: &str) -> Result<()> {
    crate::env::validate_container_id(name)
        .map_err(|reason| Error::InvalidConfig(format!("name: {reason}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"cniVersion":"1.1.0","name":"net1","type":"sluice",
        "ranges":[["10.244.1.0/24"],["fd00:10:244:1::/64"]]}"#;

    fn code(s: &str) -> Option<u32> {
        parse(s.as_bytes()).err().map(|e| e.code())
    }

    #[test]
    fn a_minimal_config_gets_the_defaults() {
        let c = parse(GOOD.as_bytes());
        let c = c.as_ref().ok();
        assert_eq!(c.map(|c| c.version), Some(Version::V1_1_0));
        assert_eq!(c.and_then(|c| c.ranges.as_ref()).map(Vec::len), Some(2));
        assert_eq!(
            c.map(|c| c.data_dir.clone()),
            Some(PathBuf::from(DEFAULT_DATA_DIR))
        );
        assert_eq!(
            c.map(|c| c.agent_socket.clone()),
            Some(PathBuf::from(sluice_proto::DEFAULT_SOCKET))
        );
        assert_eq!(c.map(|c| c.agent_timeout), Some(DEFAULT_AGENT_TIMEOUT));
        assert_eq!(c.and_then(|c| c.mtu), None);
    }

    #[test]
    fn every_field_is_read() {
        let c = parse(
            br#"{"cniVersion":"0.4.0","name":"n","type":"sluice","ranges":[["10.0.0.0/30"]],
            "dataDir":"/tmp/x","agentSocket":"/tmp/a.sock","agentTimeoutMs":250,"mtu":1400,
            "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}],
            "runtimeConfig":{},"args":{}}"#,
        );
        let c = c.ok();
        assert_eq!(
            c.as_ref().map(|c| c.agent_timeout),
            Some(Duration::from_millis(250))
        );
        assert_eq!(c.as_ref().and_then(|c| c.mtu), Some(1400));
        assert_eq!(
            c.as_ref().map(|c| c.data_dir.clone()),
            Some(PathBuf::from("/tmp/x"))
        );
        assert_eq!(
            c.and_then(|c| c.valid_attachments).map(|v| v.len()),
            Some(1)
        );
    }

    #[test]
    fn runtime_config_capabilities_and_args_are_named_and_ignored() {
        let c = parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"sluice","ranges":[["10.0.0.0/30"]],
            "runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"tcp"}],
                             "bandwidth":{"ingressRate":1000},"io.kubernetes.cri.pod-annotations":{}},
            "capabilities":{"portMappings":true,"bandwidth":false},
            "args":{"cni":{"ips":["10.0.0.2"]}}}"#,
        );
        let c = c.unwrap();
        assert_eq!(
            c.ignored,
            [
                "runtimeConfig.bandwidth",
                "runtimeConfig.io.kubernetes.cri.pod-annotations",
                "runtimeConfig.portMappings",
                "capabilities.portMappings",
                "args"
            ]
        );
        // Nothing of it changes what the plugin does.
        assert_eq!(c.ranges.map(|r| r.len()), Some(1));
        assert!(parse(GOOD.as_bytes()).unwrap().ignored.is_empty());
        assert_eq!(
            parse(GOOD.as_bytes()).unwrap().delete_queue_dir,
            PathBuf::from(sluice_proto::queue::DEFAULT_DIR)
        );
    }

    #[test]
    fn malformed_json_is_error_6() {
        assert_eq!(code("{"), Some(6));
        assert_eq!(code(""), Some(6));
        assert_eq!(code("{\"name\": }"), Some(6));
    }

    #[test]
    fn valid_json_that_is_no_valid_config_is_error_7() {
        let v = r#""cniVersion":"1.1.0""#;
        for bad in [
            "[]".to_string(),
            format!(r#"{{{v},"name":"n","type":"bridge","ranges":[["10.0.0.0/24"]]}}"#),
            format!(r#"{{{v},"name":"n","ranges":[["10.0.0.0/24"]]}}"#),
            format!(r#"{{{v},"type":"sluice","ranges":[["10.0.0.0/24"]]}}"#),
            format!(r#"{{{v},"name":"../x","type":"sluice","ranges":[["10.0.0.0/24"]]}}"#),
            format!(r#"{{{v},"name":"n","type":"sluice","ranges":[]}}"#),
            format!(r#"{{{v},"name":"n","type":"sluice","ranges":[["10.0.0.300/24"]]}}"#),
            format!(r#"{{{v},"name":"n","type":"sluice","ranges":"10.0.0.0/24"}}"#),
            format!(r#"{{{v},"name":"n","type":"sluice","ranges":[["10.0.0.0/24"]],"mtu":"x"}}"#),
            format!(r#"{{{v},"name":"n","type":"sluice","ranges":[["10.0.0.0/24"]],"mtu":10}}"#),
            format!(
                r#"{{{v},"name":"n","type":"sluice","ranges":[["10.0.0.0/24"]],"agentTimeoutMs":0}}"#
            ),
            format!(
                r#"{{{v},"name":"n","type":"sluice","ranges":[["10.0.0.0/24"]],"prevResult":3}}"#
            ),
            r#"{"cniVersion":1,"name":"n","type":"sluice","ranges":[["10.0.0.0/24"]]}"#.into(),
        ] {
            assert_eq!(code(&bad), Some(7), "{bad}");
        }
    }

    #[test]
    fn unsupported_version_is_error_1_before_anything_else() {
        assert_eq!(code(r#"{"cniVersion":"0.3.1","type":"bridge"}"#), Some(1));
    }

    #[test]
    fn cni_versions_alone_pick_the_highest_supported() {
        let c = parse(
            br#"{"cniVersions":["0.3.1","1.0.0"],"name":"n","type":"sluice","ranges":[["10.0.0.0/24"]]}"#,
        );
        assert_eq!(c.ok().map(|c| c.version), Some(Version::V1_0_0));
    }

    #[test]
    fn prev_result_is_parsed() {
        let c = parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"sluice","ranges":[["10.0.0.0/24"]],
            "prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"x"}],
            "ips":[{"address":"192.0.2.1/24","interface":0}]}}"#,
        );
        let prev = c.ok().and_then(|c| c.prev_result);
        assert_eq!(prev.map(|p| p.ips.len()), Some(1));
    }

    #[test]
    fn absent_or_null_ranges_are_left_to_the_node_but_empty_ones_are_error_7() {
        for ranges in ["", r#","ranges":null"#] {
            let c = parse(
                format!(r#"{{"cniVersion":"1.1.0","name":"n","type":"sluice"{ranges}}}"#)
                    .as_bytes(),
            );
            assert!(c.is_ok_and(|c| c.ranges.is_none()), "{ranges}");
        }
        assert_eq!(
            code(r#"{"cniVersion":"1.1.0","name":"n","type":"sluice","ranges":[]}"#),
            Some(7)
        );
        // Without ranges the MTU is checked against IPv4's minimum now and
        // against the Node's families by ADD.
        assert_eq!(
            code(r#"{"cniVersion":"1.1.0","name":"n","type":"sluice","mtu":10}"#),
            Some(7)
        );
        assert!(parse(br#"{"cniVersion":"1.1.0","name":"n","type":"sluice","mtu":1000}"#).is_ok());
    }

    fn node(cidrs: &[&str]) -> Result<Vec<RangeSet>> {
        node_ranges(Ok(Response::PodCidrs {
            cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
        }))
    }

    #[test]
    fn each_pod_cidr_of_the_node_is_one_range_set() {
        let sets = node(&["10.244.1.0/24", "fd00:10:244:1::/64"]);
        assert_eq!(
            sets.as_ref()
                .ok()
                .map(|s| s.iter().map(RangeSet::is_v6).collect::<Vec<_>>()),
            Some(vec![false, true])
        );
        assert_eq!(node(&["fd00::/64"]).ok().map(|s| s.len()), Some(1));
        let Ok(sets) = sets else { return };
        assert_eq!(
            validate_mtu(Some(1000), &sets).err().map(|e| e.code()),
            Some(7)
        );
        assert!(validate_mtu(Some(1280), &sets).is_ok());
        assert!(validate_mtu(Some(1000), &sets[..1]).is_ok());
    }

    #[test]
    fn no_usable_pod_cidrs_is_error_7_and_no_agent_is_11() {
        for bad in [
            &[][..],
            &["10.244.1.0/24", "10.244.2.0/24"],
            &["10.244.1.7/24"],
            &["10.244.1.0/31"],
            &["nonsense"],
        ] {
            assert_eq!(node(bad).err().map(|e| e.code()), Some(7), "{bad:?}");
        }
        let e = node(&[]).unwrap_err().to_string();
        assert!(
            e.contains("no ranges configured and the agent knows no podCIDRs"),
            "{e}"
        );
        let e = node_ranges(Ok(Response::error(50, "not in cluster mode", "no Node")));
        let e = e.unwrap_err();
        assert_eq!(e.code(), 7);
        let msg = e.to_string();
        assert!(
            msg.contains("knows no podCIDRs") && msg.contains("not in cluster mode"),
            "{msg}"
        );
        assert_eq!(
            node_ranges(Ok(Response::Ok)).err().map(|e| e.code()),
            Some(7)
        );
        let gone = AgentError::Eof;
        assert_eq!(node_ranges(Err(gone)).err().map(|e| e.code()), Some(11));
    }
}
