//! Kubernetes API types Sluice reads that k8s-openapi does not have.
//!
//! - [`v1alpha2`]: `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy
//!   (network-policy-api v0.2.0, standard and experimental channels), with a
//!   `kube::CustomResource` derive so kube-rs can list and watch it.
//! - [`validate()`]: what the CRD schema enforces, as typed errors with field
//!   paths.
//! - [`files`]: Kubernetes objects (Namespaces, Pods, Services, Nodes,
//!   NetworkPolicies, ClusterNetworkPolicies) read from manifest files and
//!   directories, multi-document YAML and Lists, with per-document errors.
pub mod files;
pub mod selector;
pub mod v1alpha2;
pub mod validate;

pub use v1alpha2::{
    Action, ClusterNetworkPolicy, ClusterNetworkPolicySpec, ClusterNetworkPolicyStatus, EgressPeer,
    EgressPeerKind, EgressRule, IngressPeer, IngressPeerKind, IngressRule, NamespacedPod, Port,
    PortKind, PortMatch, PortRange, Protocol, ProtocolKind, Subject, SubjectKind, Tier,
};
pub use validate::{FieldError, FieldErrorKind, parse_cidr, validate};
