//! Identities, the ipcache, and which endpoints each event reports.
use super::*;

// ----- identities, ipcache, changes -----

#[test]
fn pods_alike_share_one_identity_so_a_rule_over_many_pods_is_one_entry() {
    let mut w = World::new();
    for i in 0..50 {
        w.c.upsert_pod(&pod(
            "y",
            &format!("web-{i}"),
            json!({"app": "web"}),
            &format!("10.0.3.{i}"),
        ));
    }
    let ids: BTreeSet<u32> = (0..50)
        .map(|i| w.c.identity_of(&obj(&format!("y/web-{i}"))).unwrap().0)
        .collect();
    assert_eq!(ids.len(), 1);
    let id = *ids.first().unwrap();
    assert!(id >= IDENTITY_FIRST_USER && id & IDENTITY_CIDR_FLAG == 0);
    w.apply(
        "x",
        "from-web",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [
            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 80}]}]}),
    );
    assert_eq!(
        w.ep("x/a").rules,
        vec![Rule {
            dir: DIR_INGRESS,
            identity: id,
            l4: L4::Ports {
                proto: TCP,
                first: 80,
                last: 80
            },
            rule_id: w.ep("x/a").rules[0].rule_id,
        }]
    );
    // Different named-port tables make different identities.
    w.c.upsert_pod(&pod_with(
        "y",
        "web-x",
        json!({"app": "web"}),
        "10.0.3.200",
        &[("http", "TCP", 8080)],
    ));
    assert_ne!(w.c.identity_of(&obj("y/web-x")), Some(Identity(id)));
}

#[test]
fn identities_are_released_when_their_last_pod_goes() {
    let mut w = World::new();
    let before = w.c.stats().identities;
    w.c.upsert_pod(&pod("x", "new", json!({"app": "new"}), "10.0.1.50"));
    assert_eq!(w.c.stats().identities, before + 1);
    w.c.delete_pod("x", "new");
    assert_eq!(w.c.stats().identities, before);
    for p in ["x/a", "x/b", "y/a", "y/b"] {
        let o = obj(p);
        w.c.delete_pod(&o.namespace, &o.name);
    }
    assert_eq!(w.c.stats().identities, 0);
    assert!(w.c.ipcache().is_empty());
}

#[test]
fn the_ipcache_maps_pod_addresses_and_reports_each_change() {
    let mut w = World::new();
    let ip = w.ip("x/a");
    let id = w.c.identity_of(&obj("x/a")).unwrap();
    assert_eq!(w.c.ipcache().get(&ip), Some(&id));
    assert_eq!(w.c.ip_identity(ip), Some(id));
    let ch =
        w.c.upsert_pod(&pod("x", "a", json!({"app": "a", "v": "2"}), "10.0.1.1"));
    let new_id = w.c.identity_of(&obj("x/a")).unwrap();
    assert_ne!(new_id, id);
    assert_eq!(ch.ipcache, BTreeMap::from([(ip, Some(new_id))]));
    let ch = w.c.delete_pod("x", "a");
    assert_eq!(ch.ipcache, BTreeMap::from([(ip, None)]));
    assert!(ch.endpoints.contains(&obj("x/a")));
    assert!(w.c.endpoint_policy(&obj("x/a")).is_none());
}

#[test]
fn an_address_taken_over_by_a_new_pod_stays_with_it_when_the_old_pod_goes() {
    let mut w = World::new();
    let ip = w.ip("x/a");
    w.c.upsert_pod(&pod("y", "new", json!({"app": "new"}), "10.0.1.1"));
    let new_id = w.c.identity_of(&obj("y/new")).unwrap();
    assert_eq!(w.c.ip_identity(ip), Some(new_id));
    let ch = w.c.delete_pod("x", "a");
    assert!(ch.ipcache.is_empty(), "{:?}", ch.ipcache);
    assert_eq!(w.c.ip_identity(ip), Some(new_id));
}

#[test]
fn a_relabel_reports_exactly_the_endpoints_whose_policy_changed() {
    let mut w = World::new();
    w.apply(
        "x",
        "from-canary",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [
            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"canary": "yes"}}}]}]}),
    );
    assert!(!w.allows("y/b", "x/a", TCP, 80));
    let ch = w.c.upsert_pod(&pod(
        "y",
        "b",
        json!({"app": "b", "canary": "yes"}),
        "10.0.2.2",
    ));
    assert_eq!(
        ch.endpoints.iter().cloned().collect::<Vec<_>>(),
        vec![obj("x/a"), obj("y/b")]
    );
    assert!(w.allows("y/b", "x/a", TCP, 80));
    // Same labels again: nothing to do.
    let ch = w.c.upsert_pod(&pod(
        "y",
        "b",
        json!({"app": "b", "canary": "yes"}),
        "10.0.2.2",
    ));
    assert!(ch.is_empty(), "{ch:?}");
}

#[test]
fn a_namespace_relabel_moves_its_pods_to_new_identities_and_updates_selectors() {
    let mut w = World::new();
    w.apply(
        "x",
        "from-green",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"colour": "green"}}}]}]}),
    );
    assert!(!w.allows("y/a", "x/a", TCP, 80));
    let old = w.c.identity_of(&obj("y/a"));
    let ch =
        w.c.upsert_namespace(&namespace("y", &[("team", "b"), ("colour", "green")]));
    assert_ne!(w.c.identity_of(&obj("y/a")), old);
    assert!(ch.endpoints.contains(&obj("x/a")) && ch.endpoints.contains(&obj("y/a")));
    assert_eq!(ch.ipcache.len(), 2);
    assert!(w.allows("y/a", "x/a", TCP, 80) && w.allows("y/b", "x/a", TCP, 80));
    w.c.delete_namespace("y");
    assert!(!w.allows("y/a", "x/a", TCP, 80));
}

#[test]
fn a_policy_update_that_changes_no_output_reports_nothing_and_keeps_rule_ids() {
    let mut w = World::new();
    let spec = json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"ports": [{"port": 80}]}]});
    w.apply("x", "p", spec.clone());
    let rules = w.ep("x/a").rules.clone();
    let ch = w.apply("x", "p", spec);
    assert!(ch.endpoints.is_empty(), "{ch:?}");
    assert_eq!(w.ep("x/a").rules, rules);
    let origin = w.c.rule_origin(rules[0].rule_id).unwrap();
    assert_eq!(
        origin,
        RuleOrigin {
            policy: obj("x/p"),
            dir: DIR_INGRESS,
            index: 0
        }
    );
    w.c.delete_policy("x", "p");
    assert_eq!(w.c.rule_origin(rules[0].rule_id), None);
}

#[test]
fn host_network_and_finished_pods_are_not_endpoints_nor_peers() {
    let mut w = World::new();
    let mut host = pod("x", "h", json!({"app": "h"}), "192.168.0.10");
    if let Some(s) = host.spec.as_mut() {
        s.host_network = Some(true);
    }
    w.c.upsert_pod(&host);
    assert!(w.c.endpoint_policy(&obj("x/h")).is_none());
    assert_eq!(w.c.ip_identity("192.168.0.10".parse().unwrap()), None);
    let mut done = pod("x", "a", json!({"app": "a"}), "10.0.1.1");
    if let Some(s) = done.status.as_mut() {
        s.phase = Some("Succeeded".into());
    }
    let ch = w.c.upsert_pod(&done);
    assert!(ch.endpoints.contains(&obj("x/a")));
    assert!(w.c.endpoint_policy(&obj("x/a")).is_none());
    assert_eq!(w.c.ip_identity("10.0.1.1".parse().unwrap()), None);
}

#[test]
fn only_pods_of_this_node_are_endpoints_but_every_pod_is_a_peer() {
    let mut c = Compiler::new(Locality::Node("n1".into()));
    c.upsert_namespace(&namespace("x", &[]));
    c.upsert_pod(&pod("x", "a", json!({"app": "a"}), "10.0.0.1"));
    let mut remote = pod("x", "b", json!({"app": "b"}), "10.0.0.2");
    if let Some(s) = remote.spec.as_mut() {
        s.node_name = Some("n2".into());
    }
    let ch = c.upsert_pod(&remote);
    assert!(ch.endpoints.is_empty());
    assert!(c.endpoint_policy(&obj("x/b")).is_none());
    assert_eq!(c.endpoints().cloned().collect::<Vec<_>>(), vec![obj("x/a")]);
    c.upsert_policy(&policy(
        "x",
        "p",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]}),
    ));
    let b_id = c.identity_of(&obj("x/b")).unwrap().0;
    let p = c.endpoint_policy(&obj("x/a")).unwrap();
    assert!(p.rules.iter().any(|r| r.identity == b_id));
}

#[test]
fn ingress_from_the_host_is_always_allowed_and_unknown_sources_are_world() {
    let p = EndpointPolicy {
        ingress_isolated: true,
        egress_isolated: true,
        ..Default::default()
    };
    let addr: IpAddr = "192.168.0.1".parse().unwrap();
    assert!(direction_allows(
        &p,
        DIR_INGRESS,
        IDENTITY_HOST,
        addr,
        TCP,
        10250
    ));
    assert!(!direction_allows(
        &p,
        DIR_EGRESS,
        IDENTITY_HOST,
        addr,
        TCP,
        10250
    ));
    assert!(!direction_allows(
        &p,
        DIR_INGRESS,
        IDENTITY_WORLD,
        addr,
        TCP,
        80
    ));
}

#[test]
fn entry_counts_include_port_blocks_and_cidr_prefixes() {
    let mut w = World::new();
    w.apply(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"app": "b"}}}], "ports": [{"port": 1000, "endPort": 2000}]},
            {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}]}),
    );
    let n = w.c.entry_count(&obj("x/a")).unwrap();
    // 1000..=2000 takes 8 aligned blocks; the CIDR group one any-protocol key.
    assert_eq!(crate::policy::port_blocks(1000, 2000).len(), 8);
    assert_eq!(n, EntryCount { policy: 9, cidr: 2 });
}

#[test]
fn a_resync_deletes_what_its_lists_lack_and_reports_every_endpoint_it_touches() {
    let mut w = World::new();
    w.apply(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": []}),
    );
    assert!(w.ep("x/a").ingress_isolated);
    let gone_ip = w.ip("y/b");
    let pods = [
        pod("x", "a", json!({"app": "a"}), "10.0.1.1"),
        pod("x", "b", json!({"app": "b"}), "10.0.1.2"),
        pod("y", "a", json!({"app": "a"}), "10.0.2.1"),
    ];
    let ch = w.c.resync(Resync {
        namespaces: None,
        pods: Some(&pods),
        policies: Some(&[]),
        ..Resync::default()
    });
    assert!(w.c.endpoint_policy(&obj("y/b")).is_none());
    assert_eq!(w.c.ip_identity(gone_ip), None);
    assert_eq!(ch.ipcache.get(&gone_ip), Some(&None));
    assert!(!w.ep("x/a").ingress_isolated);
    assert!(ch.endpoints.contains(&obj("y/b")) && ch.endpoints.contains(&obj("x/a")));
    assert_eq!(w.c.stats().policies, 0);
    // Namespaces were not given: their labels still select.
    w.apply(
        "x",
        "from-team-b",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]}),
    );
    assert!(w.allows("y/a", "x/a", TCP, 80));
}

#[test]
fn a_resync_of_namespaces_alone_moves_pods_of_deleted_namespaces_off_their_labels() {
    let mut w = World::new();
    w.apply(
        "x",
        "from-team-b",
        json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]}),
    );
    assert!(w.allows("y/a", "x/a", TCP, 80));
    let ch = w.c.resync(Resync {
        namespaces: Some(&[namespace("x", &[("team", "a")])]),
        ..Resync::default()
    });
    assert!(!w.allows("y/a", "x/a", TCP, 80));
    assert!(ch.endpoints.contains(&obj("x/a")));
    // The pods of `y` are still known, with other identities.
    assert!(w.c.identity_of(&obj("y/a")).is_some());
    assert_eq!(ch.ipcache.len(), 2);
}

#[test]
fn the_policies_isolating_each_local_endpoint_are_known_per_direction_and_kept_current() {
    let mut w = World::new();
    let lists = |w: &World| -> BTreeMap<String, [Vec<String>; 2]> {
        w.c.isolators()
            .into_iter()
            .map(|(pod, l)| {
                let names = |v: &Vec<ObjectRef>| v.iter().map(ToString::to_string).collect();
                (pod.to_string(), [names(&l[0]), names(&l[1])])
            })
            .collect()
    };
    assert!(lists(&w).is_empty(), "no policy isolates anyone");
    let g0 = w.c.np_generation();
    w.apply(
        "x",
        "web",
        json!({"podSelector": {"matchLabels": {"app": "a"}},
                              "ingress": [{"from": [{"podSelector": {}}]}]}),
    );
    w.apply(
        "x",
        "deny-all",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    );
    w.apply(
        "x",
        "egress",
        json!({"podSelector": {"matchLabels": {"app": "b"}},
                                 "policyTypes": ["Egress"]}),
    );
    assert_ne!(w.c.np_generation(), g0);
    let want = |i: &[&str], e: &[&str]| {
        let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        [s(i), s(e)]
    };
    assert_eq!(
        lists(&w),
        BTreeMap::from([
            ("x/a".to_owned(), want(&["x/deny-all", "x/web"], &[])),
            ("x/b".to_owned(), want(&["x/deny-all"], &["x/egress"])),
        ])
    );
    // A second deny-all changes no map entry, but it isolates too: the
    // generation moves so the names are fetched again.
    let g1 = w.c.np_generation();
    let changes = w.apply(
        "x",
        "deny-more",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    );
    assert!(changes.endpoints.is_empty(), "{changes:?}");
    assert_ne!(w.c.np_generation(), g1);
    assert_eq!(lists(&w)["x/a"][0], ["x/deny-all", "x/deny-more", "x/web"]);
    // Relabelled out of `web`'s selector; then the policies deleted.
    w.c.upsert_pod(&pod("x", "a", json!({"app": "z"}), "10.0.1.1"));
    assert_eq!(lists(&w)["x/a"][0], ["x/deny-all", "x/deny-more"]);
    for name in ["web", "deny-all", "deny-more", "egress"] {
        w.c.delete_policy("x", name);
    }
    assert!(lists(&w).is_empty());
}

/// A restarted agent's compiler is told the numbers the data path holds
/// (the pinned ipcache) and lists the pods in another order than they
/// came: every pod keeps its number, and a new identity gets a number no
/// old one had. Without the restore the list order renumbers them.
#[test]
fn identity_numbers_survive_a_restart_whatever_the_list_order() {
    let w = World::new();
    let before = w.c.ipcache();
    let mut listed: Vec<Pod> = [
        ("y", "b", "10.0.2.2"),
        ("y", "a", "10.0.2.1"),
        ("x", "b", "10.0.1.2"),
        ("x", "a", "10.0.1.1"),
    ]
    .iter()
    .map(|&(ns, n, ip)| pod(ns, n, json!({"app": n}), ip))
    .collect();
    listed.push(pod("x", "new", json!({"app": "new"}), "10.0.1.9"));
    let restart = |restore: bool| {
        let mut c = Compiler::new(Locality::All);
        if restore {
            c.restore(Restored {
                identities: before.iter().map(|(ip, id)| (*ip, id.0)).collect(),
                ..Restored::default()
            });
        }
        c.resync(Resync {
            namespaces: Some(&[
                namespace("x", &[("team", "a")]),
                namespace("y", &[("team", "b")]),
            ]),
            pods: Some(&listed),
            policies: Some(&[]),
            ..Resync::default()
        });
        c.ipcache()
    };
    let after = restart(true);
    for (ip, id) in &before {
        assert_eq!(after.get(ip), Some(id), "{ip} kept its number");
    }
    let new = after[&"10.0.1.9".parse::<IpAddr>().unwrap()];
    assert!(
        before.values().all(|id| id.0 < new.0),
        "a new identity takes a fresh number"
    );
    assert_ne!(
        restart(false).get(&before.keys().next().copied().unwrap()),
        before.values().next()
    );
}
