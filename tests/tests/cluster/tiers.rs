//! ClusterNetworkPolicy end to end: created on the test API server, watched
//! and compiled by the real agent, enforced in the kernel between pods
//! wired by the real plugin; drops name their tier, policy and rule in the
//! agent's drop events and in the per-rule Prometheus counters.
use super::*;

fn cnp(mut obj: Value) -> Value {
    obj["apiVersion"] = json!("policy.networking.k8s.io/v1alpha2");
    obj["kind"] = json!("ClusterNetworkPolicy");
    obj
}

#[test]
fn an_admin_deny_wins_over_a_networkpolicy_allow_and_the_drop_names_its_rule() -> Result<()> {
    let (mut node, api, config) = cluster()?;
    api.create_namespace("t")?;
    api.create_namespace("u")?;
    create(&api, pod("t", "client", "client"))?;
    create(&api, pod("t", "server", "server"))?;
    create(&api, pod("u", "other", "other"))?;
    node.start_agent()?;
    let client = Pod::add_as(&node, &config, Some(("t", "client")))?;
    let server = Pod::add_as(&node, &config, Some(("t", "server")))?;
    let other = Pod::add_as(&node, &config, Some(("u", "other")))?;
    let _srv = Server::start(&server.ns, 80)?;
    let s4 = server.ipv4.context("v4")?;
    let s6 = server.ipv6.context("v6")?;
    assert!(eventually(WAIT, || tcp_ok(&client.ns, s4, 80, SHORT)));

    // The client's NetworkPolicy allows all egress; the cluster operator
    // denies the server's addresses to every pod (as block-metadata does
    // for 169.254.169.254, deploy/examples/cluster/).
    let rv = create(
        &api,
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "allow-all-egress", "namespace": "t"},
            "spec": {"podSelector": {"matchLabels": {"pod": "client"}},
                     "policyTypes": ["Egress"], "egress": [{}]}
        }),
    )?;
    node.wait_programmed("NetworkPolicy/t/allow-all-egress", Some(&rv), WAIT)?;
    let rv = create(
        &api,
        cnp(json!({
            "metadata": {"name": "block-server"},
            "spec": {"tier": "Admin", "priority": 10, "subject": {"namespaces": {}},
                     "egress": [{"name": "deny-server", "action": "Deny",
                                 "to": [{"networks": [format!("{s4}/32"), format!("{s6}/128")]}]}]}
        })),
    )?;
    node.wait_programmed("ClusterNetworkPolicy/block-server", Some(&rv), WAIT)?;
    for ip in [s4, s6] {
        assert!(!tcp_ok(&client.ns, ip, 80, SHORT), "client -> {ip} denied");
        assert!(!tcp_ok(&other.ns, ip, 80, SHORT), "other -> {ip} denied");
    }
    let detail =
        "denied by ClusterNetworkPolicy block-server, rule deny-server (Admin, priority 10)";
    assert!(
        eventually(WAIT, || {
            node.events_matching(|e| {
                e["reason"] == "admin-denied" && e["detail"] == detail && e["src_pod"] == "client"
            })
            .len()
                >= 2
        }),
        "drop events name the rule: {:?}",
        node.events_matching(|e| e["reason"] == "admin-denied")
    );
    let m = node.metrics()?;
    let series = r#"sluice_cnp_rule_dropped_packets_total{tier="Admin",policy="block-server",rule="deny-server"}"#;
    assert!(
        m.get(series).copied().unwrap_or(0.0) >= 4.0,
        "{series} in {m:?}"
    );

    // The Admin Deny gone, the server isolated by a NetworkPolicy that
    // allows nothing; an Admin Accept lets `other` in all the same, and
    // nobody else.
    api.delete("clusternetworkpolicies", "", "block-server")?;
    node.wait_programmed("ClusterNetworkPolicy/block-server", None, WAIT)?;
    let rv = create(
        &api,
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "isolate-server", "namespace": "t"},
            "spec": {"podSelector": {"matchLabels": {"pod": "server"}},
                     "policyTypes": ["Ingress"]}
        }),
    )?;
    node.wait_programmed("NetworkPolicy/t/isolate-server", Some(&rv), WAIT)?;
    assert!(!tcp_ok(&other.ns, s4, 80, SHORT), "isolated: denied");
    let rv = create(
        &api,
        cnp(json!({
            "metadata": {"name": "let-other-in"},
            "spec": {"tier": "Admin", "priority": 5,
                     "subject": {"pods": {"namespaceSelector": {},
                                          "podSelector": {"matchLabels": {"pod": "server"}}}},
                     "ingress": [{"name": "accept-other", "action": "Accept",
                                  "from": [{"pods": {"namespaceSelector": {},
                                                     "podSelector": {"matchLabels": {"pod": "other"}}}}]}]}
        })),
    )?;
    node.wait_programmed("ClusterNetworkPolicy/let-other-in", Some(&rv), WAIT)?;
    for ip in [s4, s6] {
        assert!(
            tcp_ok(&other.ns, ip, 80, OPEN),
            "other -> {ip}: Admin Accept"
        );
        assert!(
            !tcp_ok(&client.ns, ip, 80, SHORT),
            "client -> {ip}: NP deny"
        );
    }

    // Baseline: a default deny of the server's ingress is overridden by
    // no one but the NetworkPolicy isolating it; with that gone, the
    // Baseline decides (and the Admin Accept still comes first).
    api.delete("networkpolicies", "t", "isolate-server")?;
    node.wait_programmed("NetworkPolicy/t/isolate-server", None, WAIT)?;
    let rv = create(
        &api,
        cnp(json!({
            "metadata": {"name": "default-deny"},
            "spec": {"tier": "Baseline", "priority": 0,
                     "subject": {"namespaces": {}},
                     "ingress": [{"name": "deny-all", "action": "Deny",
                                  "from": [{"namespaces": {}}]}]}
        })),
    )?;
    node.wait_programmed("ClusterNetworkPolicy/default-deny", Some(&rv), WAIT)?;
    assert!(
        tcp_ok(&other.ns, s4, 80, OPEN),
        "Admin Accept before Baseline"
    );
    assert!(!tcp_ok(&client.ns, s4, 80, SHORT), "Baseline Deny");
    assert!(
        eventually(WAIT, || {
            !node
            .events_matching(|e| e["reason"] == "baseline-denied"
                && e["detail"]
                    == "denied by ClusterNetworkPolicy default-deny, rule deny-all (Baseline, priority 0)")
            .is_empty()
        }),
        "baseline drop named"
    );
    Ok(())
}
