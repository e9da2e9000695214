//! The peer selector of a NetworkPolicy (namespace part AND pod part),
//! evaluated against an identity's labels rather than against pods; label
//! selectors themselves are `sluice_api::selector`'s.
pub use sluice_api::selector::{Labels, Op, Requirement, Selector};

/// Which namespaces a peer selector covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NsMatch {
    /// No `namespaceSelector`: the policy's own namespace.
    Own(String),
    /// A `namespaceSelector` (`{}` = every namespace).
    Labels(Selector),
}

/// One `podSelector`/`namespaceSelector` peer: both parts must match.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerSelector {
    pub ns: NsMatch,
    pub pod: Selector,
}

impl PeerSelector {
    /// Every pod of the cluster (`namespaceSelector: {}`).
    pub fn all_pods() -> Self {
        Self {
            ns: NsMatch::Labels(Selector::everything()),
            pod: Selector::everything(),
        }
    }
}
