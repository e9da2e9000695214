//! ClusterNetworkPolicy through a Service: pods reach a backend through its
//! ClusterIP (kube-proxy's DNAT in the node namespace), in IPv4 and IPv6,
//! and each tier action decides the flow as it does for the backend's own
//! address: egress is judged after DNAT (docs/design.md, "Services"), so a
//! rule naming the backend pod and its targetPort matches a flow sent to
//! the ClusterIP and its port. Every denial is preceded by the same flow
//! allowed, so a broken Service or a policy that drops everything fails.
use super::*;

/// The ClusterIP's port and the backend's (targetPort): the rules below
/// name the backend's, which only the translated packet carries.
pub(super) const SVC_PORT: u16 = 80;
pub(super) const BACKEND_PORT: u16 = 8080;

/// A node running the agent, with pods `client`, `other` and `server` in
/// namespace `t`, a dual-stack Service `web` (80 -> server:8080) and
/// kube-proxy's rules for it.
pub(super) struct Scene {
    /// ClusterIPs: IPv4, IPv6.
    pub(super) svc: [IpAddr; 2],
    /// The backend's addresses: IPv4, IPv6.
    pub(super) backend: [IpAddr; 2],
    pub(super) kp: KubeProxy,
    _srv: Server,
    pub(super) client: Pod,
    pub(super) other: Pod,
    pub(super) server: Pod,
    api: ServerHandle,
    pub(super) node: Node,
}

impl Scene {
    pub(super) fn new(svc6: &str) -> Result<Self> {
        let (mut node, api, config) = cluster()?;
        api.create_namespace("t")?;
        for name in ["client", "other", "server"] {
            pod(&api, "t", name, &json!({"pod": name}))?;
        }
        let web = service(
            &api,
            "t",
            "web",
            &json!({"pod": "server"}),
            &[("http", "TCP", SVC_PORT, BACKEND_PORT)],
        )?;
        node.start_agent()?;
        let client = Pod::add_as(&node, &config, Some(("t", "client")))?;
        let other = Pod::add_as(&node, &config, Some(("t", "other")))?;
        let server = Pod::add_as(&node, &config, Some(("t", "server")))?;
        let srv = Server::start(&server.ns, BACKEND_PORT)?;
        let ip4 = cluster_ips(&web)[0];
        let ip6: IpAddr = svc6.parse()?;
        let web = dual_stack(&api, web, ip6)?;
        node.wait_programmed("Service/t/web", Some(&resource_version(&web)), WAIT)?;
        let backend = [v4(&server)?, v6(&server)?];
        let kp = KubeProxy::apply(
            &node.ns,
            &[
                ServicePort::new(
                    "t/web",
                    ip4,
                    Protocol::Tcp,
                    SVC_PORT,
                    &[(backend[0], BACKEND_PORT)],
                ),
                ServicePort::new(
                    "t/web",
                    ip6,
                    Protocol::Tcp,
                    SVC_PORT,
                    &[(backend[1], BACKEND_PORT)],
                ),
            ],
        )?;
        let scene = Self {
            svc: [ip4, ip6],
            backend,
            kp,
            _srv: srv,
            client,
            other,
            server,
            api,
            node,
        };
        for ip in scene.svc {
            assert!(
                eventually(WAIT, || tcp_ok(&scene.client.ns, ip, SVC_PORT, SHORT)),
                "client -> web ({ip}) before any policy; kube-proxy's tables:\n{}",
                scene.kp.list()
            );
        }
        Ok(scene)
    }

    /// Whether `from` reaches the backend through each ClusterIP, and
    /// directly on its targetPort, as `want` says (both families).
    fn expect(&self, from: &Pod, who: &str, want: bool, why: &str) {
        for (svc, backend) in self.svc.into_iter().zip(self.backend) {
            both_ways(
                &format!("{who}: {why}"),
                |ip, port, t| tcp_ok(&from.ns, ip, port, t),
                (svc, SVC_PORT),
                (backend, BACKEND_PORT),
                want,
            );
        }
    }

    pub(super) fn network_policy(&self, name: &str, spec: &Value) -> Result<()> {
        let rv = policy(&self.api, "t", name, spec)?;
        self.node
            .wait_programmed(&format!("NetworkPolicy/t/{name}"), Some(&rv), WAIT)
    }

    pub(super) fn cluster_policy(&self, name: &str, spec: Value) -> Result<()> {
        let mut obj = json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name}});
        obj["spec"] = spec;
        let created = self.api.create(obj)?;
        self.node.wait_programmed(
            &format!("ClusterNetworkPolicy/{name}"),
            Some(&resource_version(&created)),
            WAIT,
        )
    }

    pub(super) fn delete_cluster_policy(&self, name: &str) -> Result<()> {
        self.api.delete("clusternetworkpolicies", "", name)?;
        self.node
            .wait_programmed(&format!("ClusterNetworkPolicy/{name}"), None, WAIT)
    }
}

/// A `pods` peer or subject: pods labelled `pod=<name>` in any namespace.
pub(super) fn pods(name: &str) -> Value {
    json!({"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": name}}}})
}

/// TCP to the backend's port (the ClusterIP's port is another).
pub(super) fn to_backend_port() -> Value {
    json!([{"tcp": {"destinationPort": {"number": BACKEND_PORT}}}])
}

#[test]
fn an_admin_deny_of_the_backend_blocks_the_flow_through_its_cluster_ip_that_a_networkpolicy_allows()
-> Result<()> {
    let s = Scene::new("fd00:96::c1")?;
    // The namespace's own policies allow the flow at both ends.
    s.network_policy(
        "client-egress",
        &json!({"podSelector": {"matchLabels": {"pod": "client"}},
               "policyTypes": ["Egress"], "egress": [{}]}),
    )?;
    s.network_policy(
        "server-ingress",
        &json!({"podSelector": {"matchLabels": {"pod": "server"}},
               "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {}}]}]}),
    )?;
    s.expect(&s.client, "client", true, "allowed by NetworkPolicy");

    // The operator denies the client TCP 8080 of the server: the rule
    // names neither the ClusterIP nor its port.
    s.cluster_policy(
        "block-backend",
        json!({"tier": "Admin", "priority": 10, "subject": pods("client"),
               "egress": [{"name": "deny-backend", "action": "Deny",
                           "to": [pods("server")], "protocols": to_backend_port()}]}),
    )?;
    s.expect(&s.client, "client", false, "Admin Deny over the NP allow");
    s.expect(&s.other, "other", true, "not the Admin Deny's subject");
    // The drop is the client's egress drop of the translated packet.
    for backend in s.backend {
        assert_drop_event(
            &s.node,
            &json!({"direction": "egress", "reason": "admin-denied", "src_pod": "client",
                    "dst": backend.to_string(), "dst_port": BACKEND_PORT, "dst_pod": "server",
                    "detail": "denied by ClusterNetworkPolicy block-backend, rule deny-backend (Admin, priority 10)"}),
        );
    }

    s.delete_cluster_policy("block-backend")?;
    s.expect(&s.client, "client", true, "the Admin Deny gone");
    Ok(())
}

#[test]
fn an_admin_accept_lets_a_flow_through_a_cluster_ip_into_a_networkpolicy_isolated_backend()
-> Result<()> {
    let s = Scene::new("fd00:96::c2")?;
    // The server admits nobody.
    s.network_policy(
        "isolate-server",
        &json!({"podSelector": {"matchLabels": {"pod": "server"}}, "policyTypes": ["Ingress"]}),
    )?;
    s.expect(&s.client, "client", false, "the backend is isolated");
    assert_drop_event(
        &s.node,
        &json!({"direction": "ingress", "reason": "policy-denied", "src_pod": "client",
                "dst": s.backend[0].to_string(), "dst_port": BACKEND_PORT, "dst_pod": "server"}),
    );

    s.cluster_policy(
        "let-client-in",
        json!({"tier": "Admin", "priority": 5, "subject": pods("server"),
               "ingress": [{"name": "accept-client", "action": "Accept",
                            "from": [pods("client")], "protocols": to_backend_port()}]}),
    )?;
    s.expect(
        &s.client,
        "client",
        true,
        "Admin Accept into the isolated backend",
    );
    s.expect(&s.other, "other", false, "still isolated for the rest");

    // The same on the client's side: its egress isolated, an Admin Accept
    // of the backend (after DNAT) lets it out to the ClusterIP.
    s.network_policy(
        "isolate-client",
        &json!({"podSelector": {"matchLabels": {"pod": "client"}}, "policyTypes": ["Egress"]}),
    )?;
    s.expect(
        &s.client,
        "client",
        false,
        "the client's egress is isolated",
    );
    s.cluster_policy(
        "let-client-out",
        json!({"tier": "Admin", "priority": 6, "subject": pods("client"),
               "egress": [{"name": "accept-backend", "action": "Accept",
                           "to": [pods("server")], "protocols": to_backend_port()}]}),
    )?;
    s.expect(&s.client, "client", true, "Admin Accept at both ends");
    Ok(())
}

#[test]
fn a_baseline_deny_blocks_a_flow_through_a_cluster_ip_to_a_backend_no_networkpolicy_isolates()
-> Result<()> {
    let s = Scene::new("fd00:96::c3")?;
    s.cluster_policy(
        "default-deny-server",
        json!({"tier": "Baseline", "priority": 0, "subject": pods("server"),
               "ingress": [{"name": "deny-client", "action": "Deny",
                            "from": [pods("client")], "protocols": to_backend_port()}]}),
    )?;
    s.expect(
        &s.client,
        "client",
        false,
        "Baseline Deny, no NP isolates the backend",
    );
    s.expect(&s.other, "other", true, "not the Baseline Deny's peer");
    for backend in s.backend {
        assert_drop_event(
            &s.node,
            &json!({"direction": "ingress", "reason": "baseline-denied", "src_pod": "client",
                    "dst": backend.to_string(), "dst_port": BACKEND_PORT, "dst_pod": "server",
                    "detail": "denied by ClusterNetworkPolicy default-deny-server, rule deny-client (Baseline, priority 0)"}),
        );
    }

    // Egress too: a Baseline Deny of the backend for `other`, judged
    // after DNAT.
    s.cluster_policy(
        "default-deny-other",
        json!({"tier": "Baseline", "priority": 1, "subject": pods("other"),
               "egress": [{"name": "deny-backend", "action": "Deny",
                           "to": [pods("server")], "protocols": to_backend_port()}]}),
    )?;
    s.expect(&s.other, "other", false, "Baseline Deny of its egress");

    // A NetworkPolicy isolating the backend decides before the Baseline.
    s.network_policy(
        "server-ingress",
        &json!({"podSelector": {"matchLabels": {"pod": "server"}},
               "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {}}]}]}),
    )?;
    s.expect(
        &s.client,
        "client",
        true,
        "the NP isolating the backend allows",
    );
    Ok(())
}
