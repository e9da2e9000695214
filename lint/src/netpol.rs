//! The NetworkPolicy rules: each looks at one policy (and, for DNS, at what
//! else allows DNS to the same pods).
use k8s_openapi::{
    api::networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use sluice_api::files::{DEFAULT_NAMESPACE, ObjectRef, Objects};

use crate::{
    Sink,
    cidr::Cidr,
    cnp,
    selector::Selector,
    world::{NsScope, PodInfo, World},
};

/// One direction's rule of a NetworkPolicy.
pub(crate) struct NpRule<'a> {
    pub path: String,
    /// Empty: every peer.
    pub peers: &'a [NetworkPolicyPeer],
    /// Empty: every port.
    pub ports: &'a [NetworkPolicyPort],
}

/// A NetworkPolicy with its selector parsed and its policyTypes resolved.
pub(crate) struct Np<'a> {
    pub obj: ObjectRef,
    pub ns: &'a str,
    pub pods: Selector,
    pub isolates_ingress: bool,
    pub isolates_egress: bool,
    pub ingress: Vec<NpRule<'a>>,
    pub egress: Vec<NpRule<'a>>,
    pub np: &'a NetworkPolicy,
}

impl<'a> Np<'a> {
    /// `None` if the pod selector is invalid (reported by [`check`]).
    pub fn new(np: &'a NetworkPolicy) -> Option<Self> {
        let ns = np
            .metadata
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE);
        let name = np.metadata.name.as_deref().unwrap_or_default();
        let spec = np.spec.as_ref();
        let pods = Selector::parse(
            &spec
                .and_then(|s| s.pod_selector.clone())
                .unwrap_or_default(),
        )
        .ok()?;
        let ingress: Vec<NpRule<'a>> = spec
            .and_then(|s| s.ingress.as_deref())
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, r)| NpRule {
                path: format!("spec.ingress[{i}]"),
                peers: r.from.as_deref().unwrap_or_default(),
                ports: r.ports.as_deref().unwrap_or_default(),
            })
            .collect();
        let egress: Vec<NpRule<'a>> = spec
            .and_then(|s| s.egress.as_deref())
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, r)| NpRule {
                path: format!("spec.egress[{i}]"),
                peers: r.to.as_deref().unwrap_or_default(),
                ports: r.ports.as_deref().unwrap_or_default(),
            })
            .collect();
        let (isolates_ingress, isolates_egress) = match spec.and_then(|s| s.policy_types.as_ref()) {
            Some(t) => (
                t.iter().any(|t| t == "Ingress"),
                t.iter().any(|t| t == "Egress"),
            ),
            // The API server's defaulting: Egress only with egress rules.
            None => (true, !egress.is_empty()),
        };
        Some(Self {
            obj: ObjectRef::new("NetworkPolicy", ns, name),
            ns,
            pods,
            isolates_ingress,
            isolates_egress,
            ingress,
            egress,
            np,
        })
    }

    /// The pods of the files the policy selects.
    pub fn selected<'w>(&'w self, world: &'w World) -> impl Iterator<Item = &'w PodInfo> + 'w {
        world.pods(NsScope::Own(self.ns), &self.pods)
    }
}

/// A peer's selectors, parsed: `None` for an ipBlock peer or an invalid
/// selector.
pub(crate) fn peer_selectors(p: &NetworkPolicyPeer) -> Option<(Option<Selector>, Selector)> {
    if p.ip_block.is_some() {
        return None;
    }
    let ns = match &p.namespace_selector {
        Some(s) => Some(Selector::parse(s).ok()?),
        None => None,
    };
    let pod = Selector::parse(&p.pod_selector.clone().unwrap_or_default()).ok()?;
    Some((ns, pod))
}

pub(crate) fn check(sink: &mut Sink<'_>, world: &World, objects: &Objects) {
    let all: Vec<Np<'_>> = objects
        .network_policies
        .iter()
        .filter_map(Np::new)
        .collect();
    for np in &objects.network_policies {
        invalid_selectors(sink, np);
    }
    for p in &all {
        policy_types(sink, p);
        for (dir, rules) in [("from", &p.ingress), ("to", &p.egress)] {
            for r in rules.iter() {
                rule_checks(sink, world, p, r, dir);
            }
        }
        if world.has_pods_in(p.ns) && p.selected(world).next().is_none() {
            sink.push(
                "policy-selects-nothing",
                p.obj.clone(),
                "spec.podSelector".into(),
                format!(
                    "podSelector matches no pod of namespace {} in the files",
                    p.ns
                ),
                "check the labels against the pods' (kubectl get pods --show-labels)".into(),
            );
        }
        if p.isolates_egress && !allows_dns(p) && !dns_elsewhere(p, &all, objects, world) {
            sink.push(
                "egress-without-dns",
                p.obj.clone(),
                "spec.egress".into(),
                "egress is isolated and no egress rule (of this or another policy for these pods, or an Admin ClusterNetworkPolicy) allows DNS: name lookups will time out".into(),
                "add an egress rule to the cluster DNS on UDP and TCP port 53".into(),
            );
        }
    }
}

fn invalid_selectors(sink: &mut Sink<'_>, np: &NetworkPolicy) {
    let obj = ObjectRef::new(
        "NetworkPolicy",
        np.metadata
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE),
        np.metadata.name.as_deref().unwrap_or_default(),
    );
    let Some(spec) = &np.spec else { return };
    let mut sels: Vec<(String, &LabelSelector)> = Vec::new();
    sels.extend(
        spec.pod_selector
            .iter()
            .map(|s| ("spec.podSelector".to_owned(), s)),
    );
    let dirs = [
        (
            "ingress",
            "from",
            spec.ingress
                .iter()
                .flatten()
                .map(|r| r.from.as_deref())
                .collect::<Vec<_>>(),
        ),
        (
            "egress",
            "to",
            spec.egress
                .iter()
                .flatten()
                .map(|r| r.to.as_deref())
                .collect(),
        ),
    ];
    for (dir, field, rules) in &dirs {
        for (i, peers) in rules.iter().enumerate() {
            for (j, p) in peers.iter().copied().flatten().enumerate() {
                let at = format!("spec.{dir}[{i}].{field}[{j}]");
                sels.extend(
                    p.namespace_selector
                        .iter()
                        .map(|s| (format!("{at}.namespaceSelector"), s)),
                );
                sels.extend(
                    p.pod_selector
                        .iter()
                        .map(|s| (format!("{at}.podSelector"), s)),
                );
            }
        }
    }
    for (path, s) in sels {
        if let Err(e) = Selector::parse(s) {
            sink.push(
                "invalid-object",
                obj.clone(),
                path,
                format!("invalid label selector: {e}"),
                "use In/NotIn with values, or Exists/DoesNotExist without".into(),
            );
        }
    }
}

fn policy_types(sink: &mut Sink<'_>, p: &Np<'_>) {
    let spec = p.np.spec.as_ref();
    let written = spec.and_then(|s| s.policy_types.as_ref());
    let egress_field = spec.and_then(|s| s.egress.as_ref());
    let mut push = |path: &str, message: String, fix: &str| {
        sink.push(
            "policy-types-surprise",
            p.obj.clone(),
            path.into(),
            message,
            fix.into(),
        );
    };
    match written {
        Some(_) => {
            if !p.isolates_egress && !p.egress.is_empty() {
                push(
                    "spec.policyTypes",
                    "policyTypes does not list Egress, so the egress rules are ignored".into(),
                    "add Egress to policyTypes, or delete the egress rules",
                );
            }
            if !p.isolates_ingress && !p.ingress.is_empty() {
                push(
                    "spec.policyTypes",
                    "policyTypes does not list Ingress, so the ingress rules are ignored".into(),
                    "add Ingress to policyTypes, or delete the ingress rules",
                );
            }
        }
        None => {
            if !p.egress.is_empty() && p.ingress.is_empty() {
                push(
                    "spec.policyTypes",
                    "no policyTypes and egress rules present: inferred [Ingress, Egress], so all ingress to the selected pods is denied too".into(),
                    "write policyTypes: [Egress] if only egress was meant (or [Ingress, Egress] to keep the ingress deny)",
                );
            }
            if egress_field.is_some_and(Vec::is_empty) {
                push(
                    "spec.egress",
                    "`egress: []` without policyTypes does not isolate egress (inferred [Ingress]): no egress is denied".into(),
                    "write policyTypes: [Ingress, Egress] to deny all egress",
                );
            }
        }
    }
}

fn rule_checks(sink: &mut Sink<'_>, world: &World, p: &Np<'_>, r: &NpRule<'_>, dir: &str) {
    let ingress = dir == "from";
    let direction = if ingress { "ingress" } else { "egress" };
    if r.peers.is_empty() && r.ports.is_empty() {
        let active = if ingress {
            p.isolates_ingress
        } else {
            p.isolates_egress
        };
        if active {
            sink.push(
                "allow-all-rule",
                p.obj.clone(),
                r.path.clone(),
                format!("this rule has no peers and no ports: it allows all {direction} of the selected pods, so the policy denies no {direction}"),
                format!("list `{dir}` peers or ports in the rule, or delete it for a default deny"),
            );
        }
    }
    two_item_peer(sink, p, r, dir);
    for (j, peer) in r.peers.iter().enumerate() {
        let at = format!("{}.{dir}[{j}]", r.path);
        if let Some(b) = &peer.ip_block {
            ip_block(sink, world, p, b, &at);
        } else if world.has_pods()
            && let Some((ns, pod)) = peer_selectors(peer)
        {
            let scope = ns.as_ref().map_or(NsScope::Own(p.ns), NsScope::Selected);
            // A namespace without a pod in the files is unknown ground (the
            // files may hold the pods of some namespaces only): speak only
            // when no namespace matches, or a matching one has pods.
            let why = match &ns {
                Some(s) if !world.any_namespace(s) => {
                    Some("namespaceSelector matches no namespace".to_owned())
                }
                Some(s) if !world.namespaces_with_pods(s) => None,
                Some(_) => Some(
                    "no pod of the namespaces namespaceSelector matches has the podSelector's labels"
                        .to_owned(),
                ),
                None if !world.has_pods_in(p.ns) => None,
                None => Some(format!("podSelector matches no pod of namespace {}", p.ns)),
            };
            if let Some(why) = why
                && world.pods(scope, &pod).next().is_none()
            {
                sink.push(
                    "peer-selects-nothing",
                    p.obj.clone(),
                    at,
                    format!("this peer matches no pod in the files: {why}"),
                    "check the labels against the pods' and namespaces' (kubectl get pods,ns --show-labels)".into(),
                );
            }
        }
    }
    named_ports(sink, world, p, r, ingress);
}

/// The peer with only a namespaceSelector next to one with only a
/// podSelector: `- namespaceSelector` and `- podSelector` as two items.
fn two_item_peer(sink: &mut Sink<'_>, p: &Np<'_>, r: &NpRule<'_>, dir: &str) {
    let ns_only = |x: &NetworkPolicyPeer| {
        x.ip_block.is_none() && x.pod_selector.is_none() && x.namespace_selector.is_some()
    };
    let pod_only = |x: &NetworkPolicyPeer| {
        x.ip_block.is_none()
            && x.namespace_selector.is_none()
            && x.pod_selector
                .as_ref()
                .is_some_and(|s| !Selector::parse(s).is_ok_and(|s| s.is_everything()))
    };
    for (i, pair) in r.peers.windows(2).enumerate() {
        let (a, b) = (&pair[0], &pair[1]);
        let (nsi, podi) = if ns_only(a) && pod_only(b) {
            (i, i + 1)
        } else if pod_only(a) && ns_only(b) {
            (i + 1, i)
        } else {
            continue;
        };
        sink.push(
            "two-item-peer",
            p.obj.clone(),
            format!("{}.{dir}[{i}]", r.path),
            format!(
                "{dir}[{nsi}] (namespaceSelector) and {dir}[{podi}] (podSelector) are two peers: every pod of the selected namespaces OR the matching pods of namespace {}; one peer with both selectors (AND) is usually meant",
                p.ns
            ),
            "put namespaceSelector and podSelector in one item (no `-` before podSelector)".into(),
        );
    }
}

fn ip_block(sink: &mut Sink<'_>, world: &World, p: &Np<'_>, b: &IPBlock, at: &str) {
    let cidr = match Cidr::parse(&b.cidr) {
        Ok(c) => c,
        Err(e) => {
            sink.push(
                "except-outside-cidr",
                p.obj.clone(),
                format!("{at}.ipBlock.cidr"),
                format!("cidr {:?} does not parse: {e}", b.cidr),
                "write an address, `/` and a prefix length (10.0.0.0/8)".into(),
            );
            return;
        }
    };
    let mut excepts = Vec::new();
    for (k, e) in b.except.iter().flatten().enumerate() {
        let path = format!("{at}.ipBlock.except[{k}]");
        match Cidr::parse(e) {
            Ok(x) if cidr.contains(&x) => excepts.push(x),
            Ok(_) => sink.push(
                "except-outside-cidr",
                p.obj.clone(),
                path,
                format!(
                    "except {e} is not inside cidr {}: the API server rejects the policy",
                    b.cidr
                ),
                format!("make the except a sub-range of {}, or drop it", b.cidr),
            ),
            Err(err) => sink.push(
                "except-outside-cidr",
                p.obj.clone(),
                path,
                format!("except {e:?} does not parse: {err}"),
                "write an address, `/` and a prefix length".into(),
            ),
        }
    }
    // 0.0.0.0/0 ("anywhere") covering pods is what it says; narrower
    // blocks that happen to hold pod addresses are the suspicious ones.
    if cidr.len() == 0 {
        return;
    }
    let pods: Vec<String> = world
        .pods
        .iter()
        .filter(|pod| {
            pod.ips
                .iter()
                .any(|ip| cidr.contains_ip(*ip) && !excepts.iter().any(|x| x.contains_ip(*ip)))
        })
        .map(|pod| format!("{}/{}", pod.namespace, pod.name))
        .collect();
    if !pods.is_empty() {
        sink.push(
            "ipblock-covers-pods",
            p.obj.clone(),
            format!("{at}.ipBlock"),
            format!(
                "ipBlock {} holds the addresses of pods {}: pod addresses change on restart, so an ipBlock is a poor way to name pods",
                b.cidr,
                list(&pods)
            ),
            "select those pods with podSelector/namespaceSelector, and add the pod CIDR to except".into(),
        );
    }
}

/// Named ports no pod they apply to declares with that protocol: ingress,
/// the selected pods; egress, the pods the rule's peers match.
fn named_ports(sink: &mut Sink<'_>, world: &World, p: &Np<'_>, r: &NpRule<'_>, ingress: bool) {
    let targets: Vec<&PodInfo> = if ingress {
        p.selected(world).collect()
    } else {
        world
            .pods
            .iter()
            .filter(|pod| egress_peer_pod(p, r.peers, pod, world))
            .collect()
    };
    if targets.is_empty() {
        return;
    }
    for (k, port) in r.ports.iter().enumerate() {
        let Some(IntOrString::String(name)) = &port.port else {
            continue;
        };
        let proto = port.protocol.as_deref().unwrap_or("TCP");
        let has = |pr: Option<&str>| {
            targets.iter().any(|t| {
                t.ports
                    .iter()
                    .any(|np| &np.name == name && pr.is_none_or(|pr| np.protocol == pr))
            })
        };
        if has(Some(proto)) {
            continue;
        }
        let other = if has(None) {
            format!(" (it is declared, but not for {proto})")
        } else {
            String::new()
        };
        let whose = if ingress {
            "selected pod"
        } else {
            "destination pod"
        };
        sink.push(
            "named-port-unexposed",
            p.obj.clone(),
            format!("{}.ports[{k}]", r.path),
            format!("no {whose} in the files declares a containerPort named {name:?} with protocol {proto}{other}: the rule matches nothing on it"),
            format!("name the container port {name:?} ({proto}) in the pods, or use the port number"),
        );
    }
}

/// Whether `pod` is a destination of an egress rule with `peers`.
fn egress_peer_pod(p: &Np<'_>, peers: &[NetworkPolicyPeer], pod: &PodInfo, world: &World) -> bool {
    if peers.is_empty() {
        return true;
    }
    peers.iter().any(|peer| {
        if let Some(b) = &peer.ip_block {
            return Cidr::parse(&b.cidr).is_ok_and(|c| pod.ips.iter().any(|ip| c.contains_ip(*ip)));
        }
        let Some((ns, sel)) = peer_selectors(peer) else {
            return false;
        };
        let ns_ok = match &ns {
            Some(s) => s.matches(&world.ns_labels(&pod.namespace)),
            None => pod.namespace == p.ns,
        };
        ns_ok && sel.matches(&pod.labels)
    })
}

/// Whether a port list allows DNS: no ports (all), 53 on UDP or TCP, or a
/// named port that says dns.
pub(crate) fn ports_allow_dns(ports: &[NetworkPolicyPort]) -> bool {
    ports.is_empty()
        || ports.iter().any(|pt| {
            let proto_ok = matches!(pt.protocol.as_deref(), None | Some("TCP" | "UDP"));
            proto_ok
                && match &pt.port {
                    None => true,
                    Some(IntOrString::Int(n)) => {
                        *n == 53 || (*n < 53 && pt.end_port.is_some_and(|e| e >= 53))
                    }
                    Some(IntOrString::String(s)) => s.to_ascii_lowercase().contains("dns"),
                }
        })
}

fn allows_dns(p: &Np<'_>) -> bool {
    p.egress.iter().any(|r| ports_allow_dns(r.ports))
}

/// Another policy of the namespace with a selector at least as wide that
/// allows DNS, or an Admin ClusterNetworkPolicy Accept on port 53 for the
/// namespace.
fn dns_elsewhere(p: &Np<'_>, all: &[Np<'_>], objects: &Objects, world: &World) -> bool {
    all.iter()
        .any(|o| o.ns == p.ns && o.isolates_egress && o.pods.covers(&p.pods) && allows_dns(o))
        || cnp::admin_accepts_dns(objects, world, p.ns, &p.pods)
}

/// "a, b, c" or "a, b, c and N more".
pub(crate) fn list(items: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut s = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        s.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    s
}
