//! validate(): one table row per schema rule of the ClusterNetworkPolicy
//! CRD (deploy/crds/), each a change to a valid policy and the errors it
//! must produce, by field path.
#![expect(clippy::unwrap_used, reason = "tests: a panic is the failure report")]
use serde_json::{Value, json};
use sluice_api::{ClusterNetworkPolicy, FieldError, FieldErrorKind as K, validate};

/// A valid policy touching every part the rows change.
fn base() -> Value {
    json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "base"},
        "spec": {
            "tier": "Admin",
            "priority": 10,
            "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
            "ingress": [{
                "name": "from-b",
                "action": "Accept",
                "from": [{"namespaces": {"matchLabels": {"team": "b"}}}],
                "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]
            }],
            "egress": [{
                "name": "to-pods",
                "action": "Deny",
                "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "db"}}}}]
            }]
        }
    })
}

/// Sets the value at a JSON pointer, creating the last key if needed.
fn set(v: &mut Value, pointer: &str, value: Value) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let parent = v.pointer_mut(parent).unwrap_or_else(|| panic!("{parent}"));
    match parent {
        Value::Object(m) => {
            m.insert(key.to_owned(), value);
        }
        Value::Array(a) => a[key.parse::<usize>().unwrap()] = value,
        _ => panic!("{pointer}"),
    }
}

fn check(v: &Value) -> Result<(), Vec<FieldError>> {
    let cnp: ClusterNetworkPolicy = serde_json::from_value(v.clone()).unwrap();
    validate(&cnp.spec)
}

fn err(path: &str, kind: K) -> FieldError {
    FieldError {
        path: path.to_owned(),
        kind,
    }
}

fn range(value: i64, min: i64, max: i64) -> K {
    K::OutOfRange { value, min, max }
}

fn one_of(allowed: &'static str, set: &[&str]) -> K {
    K::OneOf {
        allowed,
        set: set.iter().map(|s| (*s).to_owned()).collect(),
    }
}

const EGRESS_PEER: &str = "namespaces, pods, nodes, networks, domainNames";
const INGRESS_PEER: &str = "namespaces, pods";
const PROTOCOL: &str = "tcp, udp, sctp, destinationNamedPort";

fn n_rules(n: usize, rule: &Value) -> Value {
    Value::Array(vec![rule.clone(); n])
}

fn cidr(c: &str) -> Value {
    json!([{"networks": [c]}])
}

type Row = (&'static str, Vec<(&'static str, Value)>, Vec<FieldError>);

fn rows() -> Vec<Row> {
    let ns_peer = json!({"namespaces": {}});
    let in_rule = base()["spec"]["ingress"][0].clone();
    let out_rule = base()["spec"]["egress"][0].clone();
    let to_net = "/spec/egress/0/to";
    let port = "/spec/ingress/0/protocols/0/tcp/destinationPort";
    let p0 = "spec.ingress[0].protocols[0]";
    vec![
        ("the base policy", vec![], vec![]),
        // tier: enum Admin | Baseline.
        (
            "an unknown tier",
            vec![("/spec/tier", json!("Cluster"))],
            vec![err(
                "spec.tier",
                K::NotSupported {
                    value: "Cluster".into(),
                    allowed: "Admin, Baseline",
                },
            )],
        ),
        ("the Baseline tier", vec![("/spec/tier", json!("Baseline"))], vec![]),
        // priority: minimum 0, maximum 1000.
        ("priority 0", vec![("/spec/priority", json!(0))], vec![]),
        ("priority 1000", vec![("/spec/priority", json!(1000))], vec![]),
        (
            "priority 1001",
            vec![("/spec/priority", json!(1001))],
            vec![err("spec.priority", range(1001, 0, 1000))],
        ),
        (
            "priority -1",
            vec![("/spec/priority", json!(-1))],
            vec![err("spec.priority", range(-1, 0, 1000))],
        ),
        // action: enum Accept | Deny | Pass.
        (
            "an unknown action",
            vec![("/spec/ingress/0/action", json!("Allow"))],
            vec![err(
                "spec.ingress[0].action",
                K::NotSupported {
                    value: "Allow".into(),
                    allowed: "Accept, Deny, Pass",
                },
            )],
        ),
        ("Pass in the Admin tier", vec![("/spec/egress/0/action", json!("Pass"))], vec![]),
        // The schema allows Pass in Baseline (it skips the rest of the
        // Baseline tier, leaving the default allow); so do we.
        (
            "Pass in the Baseline tier",
            vec![
                ("/spec/tier", json!("Baseline")),
                ("/spec/egress/0/action", json!("Pass")),
            ],
            vec![],
        ),
        // ingress, egress: maxItems 25.
        ("25 ingress rules", vec![("/spec/ingress", n_rules(25, &in_rule))], vec![]),
        (
            "26 ingress rules",
            vec![("/spec/ingress", n_rules(26, &in_rule))],
            vec![err("spec.ingress", K::TooMany { len: 26, max: 25 })],
        ),
        (
            "26 egress rules",
            vec![("/spec/egress", n_rules(26, &out_rule))],
            vec![err("spec.egress", K::TooMany { len: 26, max: 25 })],
        ),
        // from, to: minItems 1, maxItems 25.
        ("25 ingress peers", vec![("/spec/ingress/0/from", n_rules(25, &ns_peer))], vec![]),
        (
            "26 ingress peers",
            vec![("/spec/ingress/0/from", n_rules(26, &ns_peer))],
            vec![err("spec.ingress[0].from", K::TooMany { len: 26, max: 25 })],
        ),
        (
            "26 egress peers",
            vec![(to_net, n_rules(26, &ns_peer))],
            vec![err("spec.egress[0].to", K::TooMany { len: 26, max: 25 })],
        ),
        (
            "no ingress peer",
            vec![("/spec/ingress/0/from", json!([]))],
            vec![err("spec.ingress[0].from", K::Empty)],
        ),
        (
            "no egress peer list at all",
            vec![("/spec/egress/0", json!({"action": "Deny"}))],
            vec![err("spec.egress[0].to", K::Empty)],
        ),
        // Peers: minProperties 1, maxProperties 1.
        (
            "an ingress peer with nothing set",
            vec![("/spec/ingress/0/from/0", json!({}))],
            vec![err("spec.ingress[0].from[0]", one_of(INGRESS_PEER, &[]))],
        ),
        (
            "an ingress peer with namespaces and pods",
            vec![(
                "/spec/ingress/0/from/0",
                json!({"namespaces": {}, "pods": {"podSelector": {}}}),
            )],
            vec![err("spec.ingress[0].from[0]", one_of(INGRESS_PEER, &["namespaces", "pods"]))],
        ),
        (
            "nodes as an ingress peer (an egress-only kind)",
            vec![("/spec/ingress/0/from/0", json!({"nodes": {}}))],
            vec![err("spec.ingress[0].from[0].nodes", K::UnknownField)],
        ),
        (
            "an egress peer with networks and nodes",
            vec![(to_net, json!([{"networks": ["10.0.0.0/8"], "nodes": {}}]))],
            vec![err("spec.egress[0].to[0]", one_of(EGRESS_PEER, &["nodes", "networks"]))],
        ),
        (
            "an egress peer of a kind this version does not know",
            vec![(to_net, json!([{"services": {"name": "x"}}]))],
            vec![err("spec.egress[0].to[0].services", K::UnknownField)],
        ),
        ("a nodes egress peer", vec![(to_net, json!([{"nodes": {}}]))], vec![]),
        // pods: required podSelector.
        (
            "a pods peer without podSelector",
            vec![("/spec/egress/0/to/0/pods", json!({"namespaceSelector": {}}))],
            vec![err("spec.egress[0].to[0].pods.podSelector", K::Required)],
        ),
        (
            "a pods peer without namespaceSelector (optional)",
            vec![("/spec/egress/0/to/0/pods", json!({"podSelector": {}}))],
            vec![],
        ),
        // subject: minProperties 1, maxProperties 1; pods needs podSelector.
        (
            "a subject with nothing set",
            vec![("/spec/subject", json!({}))],
            vec![err("spec.subject", one_of(INGRESS_PEER, &[]))],
        ),
        (
            "a subject with namespaces and pods",
            vec![("/spec/subject/pods", json!({"podSelector": {}}))],
            vec![err("spec.subject", one_of(INGRESS_PEER, &["namespaces", "pods"]))],
        ),
        (
            "a pods subject without podSelector",
            vec![("/spec/subject", json!({"pods": {"namespaceSelector": {}}}))],
            vec![err("spec.subject.pods.podSelector", K::Required)],
        ),
        // name: maxLength 100.
        ("a 100-character rule name", vec![("/spec/egress/0/name", json!("x".repeat(100)))], vec![]),
        (
            "a 101-character rule name",
            vec![("/spec/egress/0/name", json!("x".repeat(101)))],
            vec![err("spec.egress[0].name", K::TooLong { len: 101, max: 100 })],
        ),
        // protocols: minItems 1, maxItems 25; each exactly one field.
        (
            "an empty protocol list",
            vec![("/spec/ingress/0/protocols", json!([]))],
            vec![err("spec.ingress[0].protocols", K::Empty)],
        ),
        (
            "26 protocols",
            vec![(
                "/spec/ingress/0/protocols",
                n_rules(26, &json!({"udp": {"destinationPort": {"number": 53}}})),
            )],
            vec![err("spec.ingress[0].protocols", K::TooMany { len: 26, max: 25 })],
        ),
        (
            "a protocol entry with tcp and udp",
            vec![(
                "/spec/ingress/0/protocols/0/udp",
                json!({"destinationPort": {"number": 53}}),
            )],
            vec![err(p0, one_of(PROTOCOL, &["tcp", "udp"]))],
        ),
        (
            "an empty protocol entry",
            vec![("/spec/ingress/0/protocols/0", json!({}))],
            vec![err(p0, one_of(PROTOCOL, &[]))],
        ),
        (
            "tcp without destinationPort (minProperties 1)",
            vec![("/spec/ingress/0/protocols/0/tcp", json!({}))],
            vec![err("spec.ingress[0].protocols[0].tcp.destinationPort", K::Required)],
        ),
        (
            "an empty named port",
            vec![("/spec/ingress/0/protocols/0", json!({"destinationNamedPort": ""}))],
            vec![err("spec.ingress[0].protocols[0].destinationNamedPort", K::Empty)],
        ),
        // destinationPort: number 1..65535, or range; exactly one.
        ("port 1", vec![(port, json!({"number": 1}))], vec![]),
        ("port 65535", vec![(port, json!({"number": 65535}))], vec![]),
        (
            "port 0",
            vec![(port, json!({"number": 0}))],
            vec![err(&format!("{p0}.tcp.destinationPort.number")[..], range(0, 1, 65535))],
        ),
        (
            "port 65536",
            vec![(port, json!({"number": 65536}))],
            vec![err(&format!("{p0}.tcp.destinationPort.number")[..], range(65536, 1, 65535))],
        ),
        ("a port range", vec![(port, json!({"range": {"start": 1, "end": 65535}}))], vec![]),
        // CEL on range: self.start < self.end.
        (
            "a port range with start == end",
            vec![(port, json!({"range": {"start": 80, "end": 80}}))],
            vec![err(
                &format!("{p0}.tcp.destinationPort.range")[..],
                K::RangeOrder { start: 80, end: 80 },
            )],
        ),
        (
            "a port range with start > end",
            vec![(port, json!({"range": {"start": 90, "end": 80}}))],
            vec![err(
                &format!("{p0}.tcp.destinationPort.range")[..],
                K::RangeOrder { start: 90, end: 80 },
            )],
        ),
        (
            "a port range ending past 65535",
            vec![(port, json!({"range": {"start": 80, "end": 70000}}))],
            vec![err(&format!("{p0}.tcp.destinationPort.range.end")[..], range(70000, 1, 65535))],
        ),
        (
            "a port with number and range",
            vec![(port, json!({"number": 80, "range": {"start": 80, "end": 90}}))],
            vec![err(
                &format!("{p0}.tcp.destinationPort")[..],
                one_of("number, range", &["number", "range"]),
            )],
        ),
        // networks: minItems 1, maxItems 25, a set, maxLength 43, isCIDR.
        ("an IPv4 CIDR", vec![(to_net, cidr("169.254.169.254/32"))], vec![]),
        ("an IPv6 CIDR", vec![(to_net, cidr("fd00:ec2::254/128"))], vec![]),
        ("all of IPv6", vec![(to_net, cidr("::/0"))], vec![]),
        ("host bits set (isCIDR allows it)", vec![(to_net, cidr("10.0.0.1/8"))], vec![]),
        ("an IPv4-mapped IPv6 CIDR", vec![(to_net, cidr("::ffff:10.0.0.0/104"))], vec![]),
        (
            "an empty networks list",
            vec![(to_net, json!([{"networks": []}]))],
            vec![err("spec.egress[0].to[0].networks", K::Empty)],
        ),
        (
            "26 CIDRs",
            vec![(
                to_net,
                json!([{"networks": (0..26).map(|i| format!("10.{i}.0.0/16")).collect::<Vec<_>>()}]),
            )],
            vec![err("spec.egress[0].to[0].networks", K::TooMany { len: 26, max: 25 })],
        ),
        (
            "a repeated CIDR",
            vec![(to_net, json!([{"networks": ["10.0.0.0/8", "10.0.0.0/8"]}]))],
            vec![err(
                "spec.egress[0].to[0].networks[1]",
                K::Duplicate {
                    value: "10.0.0.0/8".into(),
                },
            )],
        ),
        (
            "a CIDR longer than 43 characters",
            vec![(to_net, cidr("0000:0000:0000:0000:0000:0000:255.255.255.255/128"))],
            vec![err("spec.egress[0].to[0].networks[0]", K::TooLong { len: 49, max: 43 })],
        ),
    ]
    .into_iter()
    .chain(bad_cidrs())
    .chain(named_port_rows())
    .chain(other_rows())
    .collect()
}

fn bad_cidrs() -> Vec<Row> {
    [
        ("10.0.0.0", "no prefix length"),
        ("10.0.0.0/33", "prefix length too long"),
        ("fd00::/129", "prefix length too long"),
        ("10.0.0.0/08", "bad prefix length"),
        ("10.0.0.0/", "bad prefix length"),
        ("10.0.0.0/+8", "bad prefix length"),
        ("010.0.0.0/8", "bad address"),
        ("example.com/8", "bad address"),
        ("fe80::1%eth0/64", "bad address"),
        ("10.0.0.0/8/8", "bad prefix length"),
    ]
    .into_iter()
    .map(|(c, reason)| {
        (
            "an invalid CIDR",
            vec![("/spec/egress/0/to", cidr(c))],
            vec![err(
                "spec.egress[0].to[0].networks[0]",
                K::InvalidCidr {
                    value: c.into(),
                    reason,
                },
            )],
        )
    })
    .collect()
}

/// CEL on the egress rule: no destinationNamedPort beside a networks, nodes
/// or domainNames peer.
fn named_port_rows() -> Vec<Row> {
    let named = json!([{"destinationNamedPort": "web"}]);
    let with = |peers: Value| {
        vec![
            ("/spec/egress/0/to", peers),
            ("/spec/egress/0/protocols", named.clone()),
        ]
    };
    vec![
        (
            "a named port to pods",
            with(json!([{"pods": {"podSelector": {}}}])),
            vec![],
        ),
        (
            "a named port to networks",
            with(json!([{"namespaces": {}}, {"networks": ["10.0.0.0/8"]}])),
            vec![err("spec.egress[0]", K::NamedPortWithAddressPeer)],
        ),
        (
            "a named port to nodes",
            with(json!([{"nodes": {}}])),
            vec![err("spec.egress[0]", K::NamedPortWithAddressPeer)],
        ),
        (
            "a named port in an ingress rule",
            vec![("/spec/ingress/0/protocols", named.clone())],
            vec![],
        ),
    ]
}

fn other_rows() -> Vec<Row> {
    vec![
        // Experimental domainNames: parsed, and refused by name.
        (
            "a domainNames peer",
            vec![(
                "/spec/egress/0",
                json!({"action": "Accept", "to": [{"domainNames": ["*.example.com"]}]}),
            )],
            vec![err(
                "spec.egress[0].to[0].domainNames",
                K::Unsupported {
                    what: "domainNames (experimental)",
                },
            )],
        ),
        // Fields the schema does not define fail closed.
        (
            "an unknown spec field",
            vec![("/spec/defaultAction", json!("Deny"))],
            vec![err("spec.defaultAction", K::UnknownField)],
        ),
        (
            "an unknown rule field",
            vec![("/spec/ingress/0/ports", json!([80]))],
            vec![err("spec.ingress[0].ports", K::UnknownField)],
        ),
        (
            "an unknown field beside a peer kind",
            vec![("/spec/egress/0/to/0/except", json!(["x"]))],
            vec![err(
                "spec.egress[0].to[0]",
                one_of(EGRESS_PEER, &["pods", "except"]),
            )],
        ),
        // Every error is reported, in field order.
        (
            "several errors at once",
            vec![
                ("/spec/priority", json!(2000)),
                ("/spec/ingress/0/action", json!("Drop")),
                ("/spec/egress/0/to", cidr("10.0.0.0/40")),
            ],
            vec![
                err("spec.priority", range(2000, 0, 1000)),
                err(
                    "spec.ingress[0].action",
                    K::NotSupported {
                        value: "Drop".into(),
                        allowed: "Accept, Deny, Pass",
                    },
                ),
                err(
                    "spec.egress[0].to[0].networks[0]",
                    K::InvalidCidr {
                        value: "10.0.0.0/40".into(),
                        reason: "prefix length too long",
                    },
                ),
            ],
        ),
    ]
}

#[test]
fn each_schema_rule_is_checked_with_its_field_path() {
    let mut failures = Vec::new();
    let rows = rows();
    for (name, changes, want) in &rows {
        let mut v = base();
        for (pointer, value) in changes {
            set(&mut v, pointer, value.clone());
        }
        let got = check(&v).err().unwrap_or_default();
        if &got != want {
            failures.push(format!("{name}:\n  want {want:?}\n  got  {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(rows.len() > 60, "{} rows", rows.len());
}

#[test]
fn errors_read_as_field_path_and_reason() {
    let mut v = base();
    set(&mut v, "/spec/egress/0/to/0", json!({}));
    set(
        &mut v,
        "/spec/ingress/0/protocols/0/tcp/destinationPort",
        json!({"range": {"start": 9, "end": 8}}),
    );
    let errors: Vec<String> = check(&v)
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        errors,
        [
            "spec.ingress[0].protocols[0].tcp.destinationPort.range: start port 9 must be less than end port 8",
            "spec.egress[0].to[0]: exactly one of namespaces, pods, nodes, networks, domainNames must be set, found none",
        ]
    );
}

#[test]
fn kind_accessors_agree_with_validate() {
    let mut v = base();
    set(
        &mut v,
        "/spec/egress/0/to/0",
        json!({"namespaces": {}, "nodes": {}}),
    );
    set(
        &mut v,
        "/spec/ingress/0/protocols/0/tcp/destinationPort",
        json!({"number": 0}),
    );
    let cnp: ClusterNetworkPolicy = serde_json::from_value(v).unwrap();
    assert!(validate(&cnp.spec).is_err());
    assert_eq!(cnp.spec.egress[0].to[0].kind(), None);
    assert_eq!(
        cnp.spec.ingress[0].protocols.as_ref().unwrap()[0].kind(),
        None
    );
    assert!(cnp.spec.subject.kind().is_some());
}
