//! A pod reaching itself through a Service IP (the "hairpin"): subject to
//! ClusterNetworkPolicy (the API says so) and to NetworkPolicy, as
//! kube-network-policies judges it; reaching its own pod IP is not (it
//! never leaves the pod). kube-proxy masquerades the hairpin to the node's
//! address: the data path knows the sender by the hairpin tag its
//! `from_pod` put in the mark (docs/design.md, "Hairpin"). The scene is
//! the `tiers` group's: the server is the Service's only backend. Every
//! denial is preceded by the same flow allowed and followed by an allow
//! case, in IPv4 and IPv6.
use super::{
    tiers::{BACKEND_PORT, SVC_PORT, Scene, pods, to_backend_port},
    *,
};

impl Scene {
    /// Whether the server reaches itself through each ClusterIP as `want`
    /// says, while its own address always answers (both families).
    fn expect_hairpin(&self, want: bool, why: &str) {
        let ns = &self.server.ns;
        for (svc, own) in self.svc.into_iter().zip(self.backend) {
            assert_eq!(
                tcp_ok(ns, svc, SVC_PORT, SHORT),
                want,
                "server -> itself through {svc}:{SVC_PORT}: {why}; kube-proxy's tables:\n{}",
                self.kp.list()
            );
            assert!(
                tcp_ok(ns, own, BACKEND_PORT, SHORT),
                "server -> its own address {own}:{BACKEND_PORT}: never subject ({why})"
            );
        }
    }

    /// A drop event of the server's hairpin, in `direction`, for each
    /// family, reported from the server to itself with `extra` fields.
    fn expect_hairpin_drop(&self, direction: &str, extra: &Value) {
        for own in self.backend {
            let mut want = json!({"direction": direction, "src": own.to_string(),
                "src_pod": "server", "dst": own.to_string(), "dst_pod": "server",
                "dst_port": BACKEND_PORT});
            if let (Some(w), Some(e)) = (want.as_object_mut(), extra.as_object()) {
                w.extend(e.clone());
            }
            assert_drop_event(&self.node, &want);
        }
    }
}

#[test]
fn an_admin_deny_of_egress_to_itself_blocks_a_pod_reaching_itself_through_its_cluster_ip()
-> Result<()> {
    let s = Scene::new("fd00:96::d1")?;
    s.expect_hairpin(true, "no policy");
    // A Deny of egress to pods labelled like the server, on the backend's
    // port: the rule names neither the ClusterIP nor its port.
    s.cluster_policy(
        "no-self",
        json!({"tier": "Admin", "priority": 20, "subject": pods("server"),
               "egress": [{"name": "deny-self", "action": "Deny",
                           "to": [pods("server")], "protocols": to_backend_port()}]}),
    )?;
    s.expect_hairpin(false, "Admin Deny of egress to itself");
    s.expect_hairpin_drop(
        "egress",
        &json!({"reason": "admin-denied",
                "detail": "denied by ClusterNetworkPolicy no-self, rule deny-self (Admin, priority 20)"}),
    );
    // Others still reach the server through the ClusterIP: the subject is
    // the server's egress only.
    for svc in s.svc {
        assert!(
            tcp_ok(&s.client.ns, svc, SVC_PORT, SHORT),
            "client -> {svc}"
        );
    }
    s.delete_cluster_policy("no-self")?;
    s.expect_hairpin(true, "the Admin Deny gone");

    // An Admin Deny of egress to other pods leaves the hairpin alone.
    s.cluster_policy(
        "no-client",
        json!({"tier": "Admin", "priority": 21, "subject": pods("server"),
               "egress": [{"name": "deny-client", "action": "Deny", "to": [pods("client")]}]}),
    )?;
    s.expect_hairpin(true, "a Deny of another peer");
    Ok(())
}

#[test]
fn an_admin_deny_of_ingress_from_its_own_labels_blocks_a_pod_reaching_itself_through_a_service()
-> Result<()> {
    let s = Scene::new("fd00:96::d2")?;
    s.expect_hairpin(true, "no policy");
    s.cluster_policy(
        "not-from-self",
        json!({"tier": "Admin", "priority": 30, "subject": pods("server"),
               "ingress": [{"name": "deny-self-in", "action": "Deny",
                            "from": [pods("server")]}]}),
    )?;
    // Judged as from the server, not from the node the masquerade names
    // (the node is always admitted).
    s.expect_hairpin(false, "Admin Deny of ingress from itself");
    s.expect_hairpin_drop(
        "ingress",
        &json!({"reason": "admin-denied",
                "detail": "denied by ClusterNetworkPolicy not-from-self, rule deny-self-in (Admin, priority 30)"}),
    );
    for svc in s.svc {
        assert!(
            tcp_ok(&s.client.ns, svc, SVC_PORT, SHORT),
            "client -> {svc}"
        );
    }
    // An Admin Accept of higher priority lets it in again.
    s.cluster_policy(
        "self-ok",
        json!({"tier": "Admin", "priority": 29, "subject": pods("server"),
               "ingress": [{"name": "accept-self", "action": "Accept",
                            "from": [pods("server")], "protocols": to_backend_port()}]}),
    )?;
    s.expect_hairpin(true, "an earlier Admin Accept");
    Ok(())
}

#[test]
fn a_networkpolicy_isolated_pod_reaches_itself_through_a_service_only_if_its_policy_admits_it()
-> Result<()> {
    let s = Scene::new("fd00:96::d3")?;
    s.expect_hairpin(true, "no policy");
    // The server admits the client only.
    s.network_policy(
        "server-from-client",
        &json!({"podSelector": {"matchLabels": {"pod": "server"}}, "policyTypes": ["Ingress"],
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "client"}}}]}]}),
    )?;
    s.expect_hairpin(false, "its ingress policy does not admit itself");
    s.expect_hairpin_drop("ingress", &json!({"reason": "policy-denied"}));
    for svc in s.svc {
        assert!(
            tcp_ok(&s.client.ns, svc, SVC_PORT, SHORT),
            "client -> {svc}"
        );
    }
    // A policy that admits the server itself: the hairpin passes.
    s.network_policy(
        "server-from-itself",
        &json!({"podSelector": {"matchLabels": {"pod": "server"}}, "policyTypes": ["Ingress"],
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "server"}}}],
                            "ports": [{"protocol": "TCP", "port": BACKEND_PORT}]}]}),
    )?;
    s.expect_hairpin(true, "its ingress policy admits itself");
    // Egress too: isolated with egress to the client only, the hairpin is
    // the server's egress to itself, denied.
    s.network_policy(
        "server-to-client",
        &json!({"podSelector": {"matchLabels": {"pod": "server"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "client"}}}]}]}),
    )?;
    s.expect_hairpin(false, "its egress policy does not allow itself");
    s.expect_hairpin_drop("egress", &json!({"reason": "policy-denied"}));
    Ok(())
}
