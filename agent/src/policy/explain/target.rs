//! The ends of `sluice explain` as typed (`ns/pod`, `svc/ns/name`, an
//! address) and the flow (`PORT/PROTO`), and a Service resolved to its
//! backends: the pods it selects, each with the target port the Service's
//! port leads to (policy sees the translated destination).
use std::net::IpAddr;

use k8s_openapi::{
    api::core::v1::{Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};
use sluice_common::proto;

use super::{Explanation, Party, why::proto_name};
use crate::{model::ObjectRef, policy::Compiler};

/// One end as typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    Pod(ObjectRef),
    Service(ObjectRef),
    Address(IpAddr),
}

impl std::fmt::Display for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Spec::Pod(o) => write!(f, "{o}"),
            Spec::Service(o) => write!(f, "svc/{o}"),
            Spec::Address(a) => write!(f, "{a}"),
        }
    }
}

/// `ns/pod`, `svc/ns/name` or an address.
pub fn parse_spec(s: &str) -> Result<Spec, String> {
    if let Ok(a) = s.parse::<IpAddr>() {
        return Ok(Spec::Address(a));
    }
    let parts: Vec<&str> = s.split('/').collect();
    match parts[..] {
        [ns, name] if !ns.is_empty() && !name.is_empty() => Ok(Spec::Pod(ObjectRef::new(ns, name))),
        ["svc" | "service", ns, name] if !ns.is_empty() && !name.is_empty() => {
            Ok(Spec::Service(ObjectRef::new(ns, name)))
        }
        _ => Err(format!(
            "{s:?} is not NAMESPACE/POD, svc/NAMESPACE/NAME or an address"
        )),
    }
}

/// `80/TCP` (or `80`, TCP; the protocol case-insensitive): (protocol, port).
pub fn parse_flow(s: &str) -> Result<(u8, u16), String> {
    let (port, p) = s.split_once('/').unwrap_or((s, "TCP"));
    let p = match p.to_ascii_uppercase().as_str() {
        "TCP" => proto::TCP,
        "UDP" => proto::UDP,
        "SCTP" => proto::SCTP,
        other => return Err(format!("unknown protocol {other:?} (TCP, UDP or SCTP)")),
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&n| n != 0)
        .ok_or_else(|| format!("{port:?} is not a port (1-65535)"))?;
    Ok((p, port))
}

fn proto_of(p: Option<&str>) -> u8 {
    match p {
        Some("UDP") => proto::UDP,
        Some("SCTP") => proto::SCTP,
        _ => proto::TCP,
    }
}

/// The pods a Service selects (its namespace, its selector; none without
/// one) with the target port its `port`/`p` leads to on each; a named
/// target port that a pod does not have leaves that pod out.
pub fn service_backends<'a>(
    svc: &Service,
    pods: impl IntoIterator<Item = &'a Pod>,
    p: u8,
    port: u16,
) -> Result<Vec<(ObjectRef, u16)>, String> {
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let name = format!("svc/{ns}/{}", svc.metadata.name.clone().unwrap_or_default());
    let spec = svc.spec.clone().unwrap_or_default();
    let sp = spec
        .ports
        .iter()
        .flatten()
        .find(|sp| i32::from(port) == sp.port && proto_of(sp.protocol.as_deref()) == p)
        .ok_or_else(|| format!("{name} has no port {}/{port}", proto_name(p)))?;
    let selector = spec
        .selector
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("{name} has no selector: its endpoints are not pods it selects"))?;
    let mut out = Vec::new();
    for pod in pods {
        if pod.metadata.namespace.as_deref() != Some(ns.as_str()) {
            continue;
        }
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            continue;
        }
        let target = match &sp.target_port {
            None => Some(port),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            Some(IntOrString::String(want)) => pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .find(|cp| {
                    cp.name.as_deref() == Some(want.as_str())
                        && proto_of(cp.protocol.as_deref()) == p
                })
                .and_then(|cp| u16::try_from(cp.container_port).ok()),
        };
        if let Some(t) = target {
            let obj = ObjectRef::new(ns.clone(), pod.metadata.name.clone().unwrap_or_default());
            out.push((obj, t));
        }
    }
    out.sort();
    Ok(out)
}

/// Explains `from` -> `to` on `p`/`port`: one explanation, or one per
/// backend when `to` is a Service (found through `service`, its backends
/// among `pods`).
pub fn explain_specs<'a>(
    c: &Compiler,
    (from, to): (&Spec, &Spec),
    (p, port): (u8, u16),
    service: impl Fn(&ObjectRef) -> Option<&'a Service>,
    pods: impl IntoIterator<Item = &'a Pod>,
) -> Result<Vec<Explanation>, String> {
    let party = |s: &Spec| match s {
        Spec::Pod(o) => Ok(Party::Pod(o.clone())),
        Spec::Address(a) => Ok(Party::Address(*a)),
        Spec::Service(o) => Err(format!("svc/{o}: a Service is no source, name a pod")),
    };
    let src = party(from)?;
    let Spec::Service(svc) = to else {
        let dst = party(to)?;
        let mut e = c.explain(&src, &dst, p, port).map_err(|e| e.to_string())?;
        if let (Party::Pod(a), Party::Pod(b)) = (&src, &dst)
            && a == b
        {
            e.notes.push(format!(
                "{a} reaching its own address never leaves the pod: no policy applies to it; \
                 the verdict is what the policies say of it reaching itself through a Service \
                 (a hairpin, judged as from {a} to itself)"
            ));
        }
        return Ok(vec![e]);
    };
    let found = service(svc).ok_or_else(|| format!("svc/{svc} is not known"))?;
    let backends = service_backends(found, pods, p, port)?;
    if backends.is_empty() {
        return Err(format!(
            "svc/{svc} selects no pod serving {}/{port}",
            proto_name(p)
        ));
    }
    backends
        .into_iter()
        .map(|(pod, target)| {
            let mut e = c
                .explain(&src, &Party::Pod(pod.clone()), p, target)
                .map_err(|e| e.to_string())?;
            e.notes.insert(
                0,
                format!(
                    "svc/{svc} {}/{port} leads to backend {pod} port {target}",
                    proto_name(p)
                ),
            );
            if src == Party::Pod(pod.clone()) {
                e.notes.insert(
                    1,
                    format!(
                        "a hairpin: {pod} reaches itself; kube-proxy masquerades it to the \
                         node's address, and it is judged as from {pod} to itself \
                         (docs/design.md, \"Hairpin\")"
                    ),
                );
            }
            Ok(e)
        })
        .collect()
}
