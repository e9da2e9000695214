//! One error type for the plugin; every variant knows the CNI error code the
//! runtime sees (SPEC.md, "Well-known Error Codes").
use std::io;
use std::path::PathBuf;

use serde::Serialize;

use crate::agent::AgentError;
use crate::ipam::IpamError;

/// CNI error codes. The spec's well-known codes plus the ones this plugin
/// (and the agent, through `sluice_proto::code`) defines.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const CONTAINER_UNKNOWN: u32 = sluice_proto::code::CONTAINER_UNKNOWN;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = sluice_proto::code::IO_FAILURE;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = sluice_proto::code::INVALID_CONFIG;
    pub const TRY_AGAIN_LATER: u32 = sluice_proto::code::TRY_AGAIN_LATER;
    pub const NOT_AVAILABLE: u32 = sluice_proto::code::NOT_AVAILABLE;
    /// STATUS: not available, and existing pods may be cut off.
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    pub const ENDPOINT_DRIFT: u32 = sluice_proto::code::ENDPOINT_DRIFT;
    /// libcni's `ErrInternal`: no better code applies (netlink, disk, ...).
    pub const INTERNAL: u32 = 999;
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("incompatible CNI version: {0}")]
    IncompatibleVersion(String),

    #[error("invalid environment variable {name}: {reason}")]
    InvalidEnv { name: &'static str, reason: String },

    #[error("failed to read the network configuration from stdin")]
    Stdin(#[source] io::Error),

    #[error("failed to decode the network configuration")]
    Decode(#[source] serde_json::Error),

    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),

    #[error("container unknown: {0}")]
    ContainerUnknown(String),

    #[error("endpoint drifted from its ADD: {0}")]
    Drift(String),

    /// The agent could not be reached or did not answer in time. ADD and
    /// CHECK report "try again later"; STATUS reports "not available".
    #[error("the Sluice agent is not available")]
    AgentUnavailable(#[source] AgentError),

    /// The agent answered with an error; its code is passed on.
    #[error("agent: {msg}")]
    Agent {
        code: u32,
        msg: String,
        details: String,
    },

    #[error("the Sluice agent is not ready: {0}")]
    NotAvailable(String),

    #[error("netlink: {op}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },

    #[error("IPAM: {0}")]
    Ipam(#[from] IpamError),

    #[error("network namespace {}", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("deletion queue {}", path.display())]
    Queue {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("sysctl {}", path.display())]
    Sysctl {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn code(&self) -> u32 {
        match self {
            Self::IncompatibleVersion(_) => code::INCOMPATIBLE_VERSION,
            Self::InvalidEnv { .. } => code::INVALID_ENV,
            Self::Stdin(_) => code::IO_FAILURE,
            Self::Decode(_) => code::DECODING_FAILURE,
            Self::InvalidConfig(_) => code::INVALID_CONFIG,
            Self::ContainerUnknown(_) => code::CONTAINER_UNKNOWN,
            Self::Drift(_) => code::ENDPOINT_DRIFT,
            Self::AgentUnavailable(_) => code::TRY_AGAIN_LATER,
            Self::Agent { code, .. } => *code,
            Self::NotAvailable(_) => code::NOT_AVAILABLE,
            Self::Ipam(e) => e.code(),
            Self::Queue { .. } => code::IO_FAILURE,
            // A namespace path that does not exist is a container that does
            // not exist (any more).
            Self::Netns { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                code::CONTAINER_UNKNOWN
            }
            Self::Netlink { .. } | Self::Netns { .. } | Self::Sysctl { .. } | Self::Internal(_) => {
                code::INTERNAL
            }
        }
    }

    pub fn netlink(op: impl Into<String>, source: rtnetlink::Error) -> Self {
        Self::Netlink {
            op: op.into(),
            source,
        }
    }

    /// The spec's error object, printed on stdout.
    pub fn to_cni(&self, cni_version: &str) -> CniError {
        let (msg, details) = match self {
            Self::Agent { msg, details, .. } => (format!("agent: {msg}"), details.clone()),
            _ => (self.to_string(), chain(self)),
        };
        CniError {
            cni_version: cni_version.to_string(),
            code: self.code(),
            msg,
            details,
        }
    }
}

/// The sources of `e`, outermost first, joined by ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    pub details: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_object_carries_code_message_and_source_chain() {
        let e = Error::Netns {
            path: PathBuf::from("/run/netns/gone"),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        let cni = e.to_cni("1.1.0");
        assert_eq!(cni.code, 3);
        assert_eq!(cni.msg, "network namespace /run/netns/gone");
        assert!(!cni.details.is_empty());
    }

    #[test]
    fn agent_errors_keep_the_agents_code() {
        let e = Error::Agent {
            code: 101,
            msg: "drift".into(),
            details: "no programs".into(),
        };
        let cni = e.to_cni("1.0.0");
        assert_eq!((cni.code, cni.details.as_str()), (101, "no programs"));
    }
}
