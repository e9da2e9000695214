//! What the ClusterNetworkPolicy CRD schema enforces, as a pure function:
//! enums, ranges, list limits, one-of objects (`minProperties` /
//! `maxProperties: 1`), required fields, and each `x-kubernetes-validations`
//! (CEL) rule. An API server with the CRD installed rejects such objects;
//! the agent checks again because it must not trust that (an older or newer
//! CRD, a hand-made server) and because it reports what it refuses.
//!
//! Not checked here: label selector syntax (the CRD schema leaves
//! `operator` a free string; the compiler's selector parser rejects what it
//! cannot evaluate, as for NetworkPolicy).
use std::{collections::BTreeSet, fmt, net::IpAddr};

use crate::v1alpha2::{
    Action, ClusterNetworkPolicySpec, EgressPeer, IngressPeer, NamespacedPod, Port, PortMatch,
    Protocol, Subject, Tier, UnknownFields, valid_port,
};

/// Rules per direction, peers per rule, protocols per rule, CIDRs per peer.
pub const MAX_ITEMS: usize = 25;
/// Characters in a rule name.
pub const MAX_RULE_NAME: usize = 100;
/// Characters in a CIDR string (`maxLength: 43`).
pub const MAX_CIDR_LEN: usize = 43;
/// Largest `priority`.
pub const MAX_PRIORITY: i32 = 1000;

/// One thing wrong, and where: `path` is a field path in the object such as
/// `spec.egress[0].to[1].networks[0]`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {kind}")]
pub struct FieldError {
    pub path: String,
    pub kind: FieldErrorKind,
}

/// What is wrong with a field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FieldErrorKind {
    /// A value outside an enum (`tier`, `action`).
    #[error("unsupported value {value:?}, must be one of {allowed}")]
    NotSupported {
        value: String,
        allowed: &'static str,
    },
    /// A number outside its bounds (`priority`, ports).
    #[error("{value} is out of range {min}..={max}")]
    OutOfRange { value: i64, min: i64, max: i64 },
    /// More than [`MAX_ITEMS`] entries.
    #[error("{len} items, at most {max} allowed")]
    TooMany { len: usize, max: usize },
    /// A list that must have at least one entry is empty or absent
    /// (`from`, `to`, `networks`, `protocols`).
    #[error("must have at least one item")]
    Empty,
    /// A required field is absent (`pods.podSelector`, a port's
    /// `destinationPort` being the only field of tcp/udp/sctp).
    #[error("required")]
    Required,
    /// A one-of object with zero or several fields set; `set` lists the ones
    /// that are (empty: none).
    #[error("exactly one of {allowed} must be set, found {}", Set(set))]
    OneOf {
        allowed: &'static str,
        set: Vec<String>,
    },
    /// A string longer than the schema allows.
    #[error("{len} characters, at most {max} allowed")]
    TooLong { len: usize, max: usize },
    /// A port range whose start is not below its end.
    #[error("start port {start} must be less than end port {end}")]
    RangeOrder { start: i32, end: i32 },
    /// `isCIDR` fails.
    #[error("invalid CIDR {value:?}: {reason}")]
    InvalidCidr { value: String, reason: &'static str },
    /// A repeated entry in a list the schema declares a set.
    #[error("duplicate value {value:?}")]
    Duplicate { value: String },
    /// A named port in an egress rule that also has a `networks` or `nodes`
    /// (or `domainNames`) peer: those have no named ports.
    #[error("networks/nodes/domainNames peer cannot be set with namedPorts")]
    NamedPortWithAddressPeer,
    /// A field the schema does not define (a newer CRD's field Sluice cannot
    /// honour; failing closed is what the API asks for).
    #[error("unknown field")]
    UnknownField,
    /// Valid in the API, not implemented by Sluice (`domainNames`).
    #[error("{what} is not supported by Sluice")]
    Unsupported { what: &'static str },
}

/// "a, b" or "none".
struct Set<'a>(&'a [String]);

impl fmt::Display for Set<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&self.0.join(", "))
        }
    }
}

/// Checks `spec` against the schema; every error found, in field order.
pub fn validate(spec: &ClusterNetworkPolicySpec) -> Result<(), Vec<FieldError>> {
    let mut v = Errors::default();
    if let Tier::Unknown(t) = &spec.tier {
        v.push("spec.tier", not_supported(t, "Admin, Baseline"));
    }
    if !(0..=MAX_PRIORITY).contains(&spec.priority) {
        v.push(
            "spec.priority",
            FieldErrorKind::OutOfRange {
                value: spec.priority.into(),
                min: 0,
                max: MAX_PRIORITY.into(),
            },
        );
    }
    subject(&mut v, "spec.subject", &spec.subject);
    v.max_items("spec.ingress", spec.ingress.len());
    for (i, r) in spec.ingress.iter().enumerate() {
        let p = format!("spec.ingress[{i}]");
        rule_common(
            &mut v,
            &p,
            &r.name,
            &r.action,
            r.protocols.as_deref(),
            &r.unknown,
        );
        v.items(&format!("{p}.from"), r.from.len());
        for (j, peer) in r.from.iter().enumerate() {
            ingress_peer(&mut v, &format!("{p}.from[{j}]"), peer);
        }
    }
    v.max_items("spec.egress", spec.egress.len());
    for (i, r) in spec.egress.iter().enumerate() {
        let p = format!("spec.egress[{i}]");
        rule_common(
            &mut v,
            &p,
            &r.name,
            &r.action,
            r.protocols.as_deref(),
            &r.unknown,
        );
        v.items(&format!("{p}.to"), r.to.len());
        for (j, peer) in r.to.iter().enumerate() {
            egress_peer(&mut v, &format!("{p}.to[{j}]"), peer);
        }
        // CEL on the egress rule: no named port beside an address peer.
        let address_peer =
            r.to.iter()
                .any(|p| p.networks.is_some() || p.nodes.is_some() || p.domain_names.is_some());
        let named_port = r
            .protocols
            .iter()
            .flatten()
            .any(|p| p.destination_named_port.is_some());
        if address_peer && named_port {
            v.push(&p, FieldErrorKind::NamedPortWithAddressPeer);
        }
    }
    v.unknown("spec", &spec.unknown);
    if v.0.is_empty() { Ok(()) } else { Err(v.0) }
}

fn not_supported(value: &str, allowed: &'static str) -> FieldErrorKind {
    FieldErrorKind::NotSupported {
        value: value.to_owned(),
        allowed,
    }
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: &str, kind: FieldErrorKind) {
        self.0.push(FieldError {
            path: path.to_owned(),
            kind,
        });
    }

    fn max_items(&mut self, path: &str, len: usize) {
        if len > MAX_ITEMS {
            self.push(
                path,
                FieldErrorKind::TooMany {
                    len,
                    max: MAX_ITEMS,
                },
            );
        }
    }

    /// `minItems: 1`, `maxItems: 25`.
    fn items(&mut self, path: &str, len: usize) {
        if len == 0 {
            self.push(path, FieldErrorKind::Empty);
        }
        self.max_items(path, len);
    }

    fn unknown(&mut self, path: &str, unknown: &UnknownFields) {
        for name in unknown.keys() {
            self.push(&format!("{path}.{name}"), FieldErrorKind::UnknownField);
        }
    }

    /// Exactly one of `fields` (name, set?) plus nothing unknown.
    fn one_of(
        &mut self,
        path: &str,
        allowed: &'static str,
        fields: &[(&str, bool)],
        unknown: &UnknownFields,
    ) {
        let set: Vec<String> = fields
            .iter()
            .filter(|(_, set)| *set)
            .map(|(name, _)| (*name).to_owned())
            .chain(unknown.keys().cloned())
            .collect();
        if set.len() != 1 {
            self.push(path, FieldErrorKind::OneOf { allowed, set });
        } else {
            self.unknown(path, unknown);
        }
    }
}

fn subject(v: &mut Errors, path: &str, s: &Subject) {
    v.one_of(
        path,
        "namespaces, pods",
        &[
            ("namespaces", s.namespaces.is_some()),
            ("pods", s.pods.is_some()),
        ],
        &s.unknown,
    );
    if let Some(p) = &s.pods {
        namespaced_pod(v, &format!("{path}.pods"), p);
    }
}

fn namespaced_pod(v: &mut Errors, path: &str, p: &NamespacedPod) {
    if p.pod_selector.is_none() {
        v.push(&format!("{path}.podSelector"), FieldErrorKind::Required);
    }
    v.unknown(path, &p.unknown);
}

fn rule_common(
    v: &mut Errors,
    path: &str,
    name: &str,
    action: &Action,
    protocols: Option<&[Protocol]>,
    unknown: &UnknownFields,
) {
    let len = name.chars().count();
    if len > MAX_RULE_NAME {
        v.push(
            &format!("{path}.name"),
            FieldErrorKind::TooLong {
                len,
                max: MAX_RULE_NAME,
            },
        );
    }
    if let Action::Unknown(a) = action {
        v.push(
            &format!("{path}.action"),
            not_supported(a, "Accept, Deny, Pass"),
        );
    }
    if let Some(protocols) = protocols {
        let p = format!("{path}.protocols");
        v.items(&p, protocols.len());
        for (i, proto) in protocols.iter().enumerate() {
            protocol(v, &format!("{p}[{i}]"), proto);
        }
    }
    v.unknown(path, unknown);
}

fn ingress_peer(v: &mut Errors, path: &str, p: &IngressPeer) {
    v.one_of(
        path,
        "namespaces, pods",
        &[
            ("namespaces", p.namespaces.is_some()),
            ("pods", p.pods.is_some()),
        ],
        &p.unknown,
    );
    if let Some(pods) = &p.pods {
        namespaced_pod(v, &format!("{path}.pods"), pods);
    }
}

fn egress_peer(v: &mut Errors, path: &str, p: &EgressPeer) {
    v.one_of(
        path,
        "namespaces, pods, nodes, networks, domainNames",
        &[
            ("namespaces", p.namespaces.is_some()),
            ("pods", p.pods.is_some()),
            ("nodes", p.nodes.is_some()),
            ("networks", p.networks.is_some()),
            ("domainNames", p.domain_names.is_some()),
        ],
        &p.unknown,
    );
    if let Some(pods) = &p.pods {
        namespaced_pod(v, &format!("{path}.pods"), pods);
    }
    if let Some(networks) = &p.networks {
        let np = format!("{path}.networks");
        v.items(&np, networks.len());
        let mut seen = BTreeSet::new();
        for (i, c) in networks.iter().enumerate() {
            let ip = format!("{np}[{i}]");
            if c.len() > MAX_CIDR_LEN {
                let max = MAX_CIDR_LEN;
                v.push(&ip, FieldErrorKind::TooLong { len: c.len(), max });
            } else if let Err(reason) = parse_cidr(c) {
                let value = c.clone();
                v.push(&ip, FieldErrorKind::InvalidCidr { value, reason });
            }
            if !seen.insert(c) {
                v.push(&ip, FieldErrorKind::Duplicate { value: c.clone() });
            }
        }
    }
    if p.domain_names.is_some() {
        let what = "domainNames (experimental)";
        v.push(
            &format!("{path}.domainNames"),
            FieldErrorKind::Unsupported { what },
        );
    }
}

fn protocol(v: &mut Errors, path: &str, p: &Protocol) {
    v.one_of(
        path,
        "tcp, udp, sctp, destinationNamedPort",
        &[
            ("tcp", p.tcp.is_some()),
            ("udp", p.udp.is_some()),
            ("sctp", p.sctp.is_some()),
            ("destinationNamedPort", p.destination_named_port.is_some()),
        ],
        &p.unknown,
    );
    for (name, m) in [("tcp", &p.tcp), ("udp", &p.udp), ("sctp", &p.sctp)] {
        if let Some(m) = m {
            port_match(v, &format!("{path}.{name}"), m);
        }
    }
    if p.destination_named_port.as_deref() == Some("") {
        v.push(
            &format!("{path}.destinationNamedPort"),
            FieldErrorKind::Empty,
        );
    }
}

fn port_match(v: &mut Errors, path: &str, m: &PortMatch) {
    // `minProperties: 1`: `destinationPort` is the only known property.
    match &m.destination_port {
        Some(p) => port(v, &format!("{path}.destinationPort"), p),
        None if m.unknown.is_empty() => {
            v.push(&format!("{path}.destinationPort"), FieldErrorKind::Required);
        }
        None => {}
    }
    v.unknown(path, &m.unknown);
}

fn port(v: &mut Errors, path: &str, p: &Port) {
    v.one_of(
        path,
        "number, range",
        &[("number", p.number.is_some()), ("range", p.range.is_some())],
        &p.unknown,
    );
    let mut number = |path: String, n: i32| {
        if valid_port(n).is_none() {
            let (min, max) = (1, 65535);
            v.push(
                &path,
                FieldErrorKind::OutOfRange {
                    value: n.into(),
                    min,
                    max,
                },
            );
            false
        } else {
            true
        }
    };
    if let Some(n) = p.number {
        number(format!("{path}.number"), n);
    }
    if let Some(r) = p.range {
        let start_ok = number(format!("{path}.range.start"), r.start);
        let end_ok = number(format!("{path}.range.end"), r.end);
        if start_ok && end_ok && r.start >= r.end {
            let (start, end) = (r.start, r.end);
            v.push(
                &format!("{path}.range"),
                FieldErrorKind::RangeOrder { start, end },
            );
        }
    }
}

/// Parses a CIDR as the Kubernetes CEL library's `isCIDR` does (Go's
/// `netip.ParsePrefix`): an address, `/`, a decimal prefix length without
/// sign or leading zero, no zone. Host bits may be set ("10.0.0.1/8" is
/// valid and means 10.0.0.0/8).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), &'static str> {
    let (addr, len) = s.split_once('/').ok_or("no prefix length")?;
    let addr: IpAddr = addr.parse().map_err(|_| "bad address")?;
    let valid_digits = !len.is_empty()
        && len.bytes().all(|b| b.is_ascii_digit())
        && (len == "0" || !len.starts_with('0'));
    if !valid_digits {
        return Err("bad prefix length");
    }
    let len: u8 = len.parse().map_err(|_| "prefix length too long")?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err("prefix length too long");
    }
    Ok((addr, len))
}
