//! Incremental == recompute == fresh build, on random event sequences.
use super::*;

// ----- incremental == recompute == fresh build -----

/// xorshift64*: deterministic, no dependency.
pub(in crate::policy) struct Rng(pub(in crate::policy) u64);

impl Rng {
    pub(in crate::policy) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(in crate::policy) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub(super) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

pub(super) const NAMESPACES: [&str; 3] = ["n0", "n1", "n2"];

pub(super) fn random_namespace(rng: &mut Rng, name: &str) -> Namespace {
    let team = *rng.pick(&["a", "b"]);
    let mut labels = vec![("team", team)];
    if rng.below(3) == 0 {
        labels.push(("env", "prod"));
    }
    namespace(name, &labels)
}

pub(super) fn random_pod(rng: &mut Rng, ns: &str, i: usize) -> Pod {
    let app = *rng.pick(&["web", "db", "cache"]);
    let labels = if rng.below(4) == 0 {
        json!({"app": app, "canary": "yes"})
    } else {
        json!({"app": app})
    };
    let ports: &[(&str, &str, u16)] = match rng.below(3) {
        0 => &[("http", "TCP", 80), ("dns", "UDP", 53)],
        1 => &[("http", "TCP", 8080)],
        _ => &[],
    };
    // Sometimes another address, so that a pod moves in and out of
    // ipBlocks (never one of another pod: the last claimant would win, and
    // a fresh build claims in another order).
    let subnet = if rng.below(4) == 0 { 1 } else { 0 };
    let mut p = pod_with(
        ns,
        &format!("p{i}"),
        labels,
        &format!("10.0.{subnet}.{}", i + 1),
        ports,
    );
    if rng.below(5) == 0
        && let Some(s) = p.spec.as_mut()
    {
        s.node_name = Some("elsewhere".into());
    }
    p
}

pub(super) fn random_policy(rng: &mut Rng, ns: &str, name: &str) -> NetworkPolicy {
    let target = rng
        .pick(&[
            json!({}),
            json!({"matchLabels": {"app": "web"}}),
            json!({"matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}]}),
        ])
        .clone();
    let peers = rng
        .pick(&[
            json!(null),
            json!([{"podSelector": {"matchLabels": {"app": "db"}}}]),
            json!([{"namespaceSelector": {"matchLabels": {"team": "a"}}}]),
            json!([{"namespaceSelector": {}, "podSelector": {"matchLabels": {"canary": "yes"}}}]),
            json!([{"ipBlock": {"cidr": "10.0.0.0/29", "except": ["10.0.0.4/30"]}}]),
            json!([{"ipBlock": {"cidr": "10.0.0.0/28"}}, {"podSelector": {}}]),
            json!([{"ipBlock": {"cidr": "10.0.0.0/23", "except": ["10.0.1.0/30"]}}]),
            json!([{"namespaceSelector": {"matchLabels": {"env": "prod"}}, "podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}}]),
        ])
        .clone();
    let ports = rng
        .pick(&[
            json!(null),
            json!([{"port": 80}]),
            json!([{"port": "http"}]),
            json!([{"port": "dns", "protocol": "UDP"}, {"port": 1000, "endPort": 1100}]),
            json!([{"protocol": "SCTP"}]),
            json!([{"port": "dns"}, {"port": "http"}, {"port": 53, "protocol": "UDP"}]),
        ])
        .clone();
    let mut rule = serde_json::Map::new();
    if !ports.is_null() {
        rule.insert("ports".into(), ports);
    }
    let dir = rng.below(3);
    if !peers.is_null() {
        rule.insert(if dir == 1 { "to" } else { "from" }.into(), peers);
    }
    let rules = if rng.below(5) == 0 {
        json!([])
    } else {
        json!([Value::Object(rule)])
    };
    let spec = match dir {
        0 => json!({"podSelector": target, "ingress": rules}),
        1 => json!({"podSelector": target, "egress": rules, "policyTypes": ["Egress"]}),
        _ => {
            json!({"podSelector": target, "ingress": rules, "egress": rules, "policyTypes": ["Ingress", "Egress"]})
        }
    };
    policy(ns, name, spec)
}

/// An endpoint's policy with identities and CIDR groups replaced by what
/// they stand for (the pods of an identity, the L4s of a group), so that
/// two compilers that numbered them differently can be compared. Rule ids
/// are left out: with several contributing rules, the lowest id depends on
/// allocation order.
fn normalize(c: &Compiler, p: &EndpointPolicy) -> String {
    let mut pods_of: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (o, p) in c.pods.iter() {
        pods_of.entry(p.identity).or_default().push(o.to_string());
    }
    let group_l4s = |g: u32| -> Vec<(u8, L4)> {
        let mut v: Vec<(u8, L4)> = p
            .rules
            .iter()
            .filter(|r| r.identity == g)
            .map(|r| (r.dir, r.l4))
            .collect();
        v.sort();
        v
    };
    let peer = |id: u32| -> String {
        if id == IDENTITY_ANY {
            "any".into()
        } else if id & IDENTITY_CIDR_FLAG != 0 {
            format!("cidr{:?}", group_l4s(id))
        } else {
            let mut v = pods_of.get(&id).cloned().unwrap_or_default();
            v.sort();
            format!("{v:?}")
        }
    };
    let mut rules: Vec<String> = p
        .rules
        .iter()
        .map(|r| format!("{} {} {:?}", r.dir, peer(r.identity), r.l4))
        .collect();
    rules.sort();
    let mut cidrs: Vec<String> = p
        .cidrs
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e.dir,
                e.net,
                if e.group == 0 {
                    "hole".into()
                } else {
                    peer(e.group)
                }
            )
        })
        .collect();
    cidrs.sort();
    format!(
        "in={} out={}\n{}\n{}",
        p.ingress_isolated,
        p.egress_isolated,
        rules.join("\n"),
        cidrs.join("\n")
    )
}

/// What a map writer holds for one endpoint.
#[derive(Debug, Default, PartialEq, Eq)]
struct Written {
    isolation: (bool, bool),
    rules: BTreeMap<(u8, u32, L4), u32>,
    cidrs: BTreeMap<(u8, ipnetwork::IpNetwork), u32>,
}

impl Written {
    fn of(p: &EndpointPolicy) -> Self {
        Self {
            isolation: (p.ingress_isolated, p.egress_isolated),
            rules: p
                .rules
                .iter()
                .map(|r| ((r.dir, r.identity, r.l4), r.rule_id))
                .collect(),
            cidrs: p.cidrs.iter().map(|c| ((c.dir, c.net), c.group)).collect(),
        }
    }
}

/// Rewrites the reported endpoints, the way the agent's writer does.
fn write(c: &Compiler, written: &mut BTreeMap<ObjectRef, Written>, ch: &Changes) {
    for ep in &ch.endpoints {
        match c.endpoint_policy(ep) {
            Some(p) => {
                written.insert(ep.clone(), Written::of(&p));
            }
            None => {
                written.remove(ep);
            }
        }
    }
}

fn snapshot(c: &Compiler) -> BTreeMap<ObjectRef, Arc<EndpointPolicy>> {
    c.endpoints()
        .filter_map(|o| c.endpoint_policy(o).map(|p| (o.clone(), p)))
        .collect()
}

#[test]
fn incremental_updates_equal_a_full_recompute_and_a_fresh_build_on_random_event_sequences() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut c = Compiler::new(Locality::Node("n1".into()));
    let mut namespaces: BTreeMap<String, Namespace> = BTreeMap::new();
    let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
    let mut policies: BTreeMap<String, NetworkPolicy> = BTreeMap::new();
    let mut checked_changes = 0;
    let mut written: BTreeMap<ObjectRef, Written> = BTreeMap::new();
    let mut rewrites = 0;
    for step in 0..600 {
        let before = snapshot(&c);
        let identities_before: BTreeMap<ObjectRef, Option<Identity>> = before
            .keys()
            .map(|o| (o.clone(), c.identity_of(o)))
            .collect();
        let ips_before = c.ipcache();
        let ns = *rng.pick(&NAMESPACES);
        let ch = match rng.below(10) {
            0 => {
                let n = random_namespace(&mut rng, ns);
                namespaces.insert(ns.into(), n.clone());
                c.upsert_namespace(&n)
            }
            1..=3 => {
                let i = rng.below(10);
                let key = format!("p{i}");
                // A pod keeps its namespace: delete it first if it moves.
                if let Some(old) = pods.get(&key)
                    && old.metadata.namespace.as_deref() != Some(ns)
                {
                    let old_ns = old.metadata.namespace.clone().unwrap();
                    pods.remove(&key);
                    c.delete_pod(&old_ns, &key)
                } else {
                    let p = random_pod(&mut rng, ns, i);
                    pods.insert(key, p.clone());
                    c.upsert_pod(&p)
                }
            }
            4 => {
                let i = rng.below(10);
                match pods.remove(&format!("p{i}")) {
                    Some(p) => {
                        c.delete_pod(p.metadata.namespace.as_deref().unwrap(), &format!("p{i}"))
                    }
                    None => Changes::default(),
                }
            }
            5..=8 => {
                let name = format!("pol{}", rng.below(4));
                let p = random_policy(&mut rng, ns, &name);
                policies.insert(format!("{ns}/{name}"), p.clone());
                c.upsert_policy(&p)
            }
            _ => {
                let key = format!("{ns}/pol{}", rng.below(4));
                match policies.remove(&key) {
                    Some(_) => c.delete_policy(ns, key.split_once('/').unwrap().1),
                    None => Changes::default(),
                }
            }
        };

        // Every endpoint whose output changed is reported.
        let after = snapshot(&c);
        for (o, p) in &after {
            if before.get(o) != Some(p) {
                assert!(
                    ch.endpoints.contains(o),
                    "step {step}: {o} changed unreported"
                );
                checked_changes += 1;
            }
        }
        for o in before.keys() {
            if !after.contains_key(o) {
                assert!(
                    ch.endpoints.contains(o),
                    "step {step}: {o} vanished unreported"
                );
            }
        }
        // And nothing else: a reported endpoint kept on the same identity
        // has a different policy.
        for o in &ch.endpoints {
            if let Some(id) = identities_before.get(o)
                && *id == c.identity_of(o)
                && after.contains_key(o)
            {
                assert_ne!(
                    before.get(o),
                    after.get(o),
                    "step {step}: {o} reported unchanged"
                );
                rewrites += 1;
            }
        }
        // And the ipcache changes are exactly the difference.
        let ips_after = c.ipcache();
        let mut diff = BTreeMap::new();
        for ip in ips_before.keys().chain(ips_after.keys()) {
            if ips_before.get(ip) != ips_after.get(ip) {
                diff.insert(*ip, ips_after.get(ip).copied());
            }
        }
        assert_eq!(ch.ipcache, diff, "step {step}");

        // A writer that applies only the reported changes holds exactly
        // the compiled policies.
        write(&c, &mut written, &ch);
        let expected: BTreeMap<ObjectRef, Written> = after
            .iter()
            .map(|(o, p)| (o.clone(), Written::of(p)))
            .collect();
        assert_eq!(written, expected, "step {step}");

        // A recompute on the same state finds nothing to change.
        let re = c.recompute_all();
        assert!(
            re.endpoints.is_empty() && re.ipcache.is_empty(),
            "step {step}: {re:?}"
        );
        assert_eq!(snapshot(&c), after, "step {step}");

        // A compiler fed only the final objects agrees.
        if step % 10 == 9 {
            let mut fresh = Compiler::new(Locality::Node("n1".into()));
            if step % 20 == 9 {
                // One event per object, policies first, namespaces last.
                for p in policies.values() {
                    fresh.upsert_policy(p);
                }
                for p in pods.values() {
                    fresh.upsert_pod(p);
                }
                for n in namespaces.values() {
                    fresh.upsert_namespace(n);
                }
            } else {
                let ns: Vec<Namespace> = namespaces.values().cloned().collect();
                let ps: Vec<Pod> = pods.values().cloned().collect();
                let nps: Vec<NetworkPolicy> = policies.values().cloned().collect();
                let ch = fresh.resync(Resync {
                    namespaces: Some(&ns),
                    pods: Some(&ps),
                    policies: Some(&nps),
                    ..Resync::default()
                });
                let all: BTreeSet<&ObjectRef> = fresh.endpoints().collect();
                assert_eq!(
                    ch.endpoints.iter().collect::<BTreeSet<_>>(),
                    all,
                    "step {step}"
                );
            }
            let mine: BTreeMap<_, _> = after
                .iter()
                .map(|(o, p)| (o.clone(), normalize(&c, p)))
                .collect();
            let theirs: BTreeMap<_, _> = snapshot(&fresh)
                .iter()
                .map(|(o, p)| (o.clone(), normalize(&fresh, p)))
                .collect();
            assert_eq!(mine, theirs, "step {step}");
            assert_eq!(
                c.stats().identities,
                fresh.stats().identities,
                "step {step}"
            );
        }
    }
    assert!(
        checked_changes > 100,
        "the sequence exercised {checked_changes} changes"
    );
    assert!(
        rewrites > 100,
        "the sequence exercised {rewrites} rewrites of endpoints that kept their identity"
    );
}
