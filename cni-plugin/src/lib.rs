//! The Sluice CNI plugin: a routed (L3, no bridge) veth plugin with its own
//! host-local style IPAM, which registers every endpoint with the node agent
//! before the pod can send a packet.
//!
//! Pure logic lives in modules without I/O (`config`, `version`, `env`,
//! `result`, `names`, `ipam::alloc`); the I/O edges (`netlink`, `netns`,
//! `agent`, `sysctl`, `ipam::disk`) are thin, and the verbs in `cmd` read top
//! to bottom: parse, IPAM, namespace work, agent, print.
//!
//! Without CNI_COMMAND the binary is a small client of the agent instead
//! (`sluice status|wait|observe`, module `cli`), and `sluice lint`, which
//! reads policy files instead.
pub mod agent;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod env;
pub mod error;
pub mod ipam;
pub mod names;
pub mod netlink;
pub mod netns;
pub mod result;
pub mod sysctl;
pub mod topology;
pub mod undo;
pub mod version;

pub use error::{Error, Result};
