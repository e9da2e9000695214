//! `sluice explain` against the live agent: the ends resolved against the
//! objects the agent watches (a Service to the pods it selects), then the
//! same explanation as offline, from the compiler that programmed the maps.
use crate::{
    model::{Kind, ObjKey, ObjectRef},
    policy::explain::{Explanation, Spec, explain_specs, parse_flow, parse_spec},
};

use super::{Cluster, watch::Object};

impl Cluster {
    /// Explains `from` -> `to` on `flow` (`PORT/PROTO`); the error says
    /// what is wrong with the question.
    pub fn explain(&self, from: &str, to: &str, flow: &str) -> Result<Vec<Explanation>, String> {
        // Until every kind is listed the compiler holds nothing (changes
        // are only kept): any answer would be about an empty cluster.
        let unlisted = self.unlisted();
        if !unlisted.is_empty() {
            let kinds: Vec<&str> = unlisted.into_iter().map(Kind::name).collect();
            return Err(format!(
                "the agent has not listed the cluster yet (waiting for: {}); \
                 ask again once `sluice wait` returns",
                kinds.join(", ")
            ));
        }
        let (from, to) = (parse_spec(from)?, parse_spec(to)?);
        let flow = parse_flow(flow)?;
        let service = |o: &ObjectRef| match self.known.get_other(&ObjKey::new(
            Kind::Service,
            o.namespace.clone(),
            o.name.clone(),
        )) {
            Some(Object::Service(s)) => Some(s.as_ref()),
            _ => None,
        };
        // Pods are kept encoded (`known.rs`): only a Service's namespace's
        // are decoded, to find its backends.
        let pods: Vec<_> = match &to {
            Spec::Service(svc) => self.known.pods_in(&svc.namespace).collect(),
            Spec::Pod(_) | Spec::Address(_) => Vec::new(),
        };
        explain_specs(&self.compiler, (&from, &to), flow, service, pods.iter())
    }
}
