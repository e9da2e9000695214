//! Audit mode against the real agent: a default-deny NetworkPolicy
//! annotated `policy.sluice.dev/enforcement: audit` drops nothing, keeps
//! the flow switch on, and reports a would-drop for exactly the flows it
//! would drop; annotated `enforce`, it drops exactly those flows.
use serde_json::Value;
use sluice_proto::{ObserveFilter, Replay};

use super::*;

fn deny_b(mode: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny-b", "namespace": "au",
                     "annotations": {"policy.sluice.dev/enforcement": mode}},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}
    })
}

#[test]
fn an_audit_mode_default_deny_reports_exactly_the_flows_enforce_then_drops() -> Result<()> {
    let (mut node, api, config) = cluster()?;
    api.create_namespace("au")?;
    for (name, label) in [("a", "a"), ("b", "b")] {
        create(&api, pod("au", name, label))?;
    }
    node.start_agent()?;
    let a = Pod::add_as(&node, &config, Some(("au", "a")))?;
    let b = Pod::add_as(&node, &config, Some(("au", "b")))?;
    let _srv_a = Server::start(&a.ns, 80)?;
    let _srv_b = Server::start(&b.ns, 80)?;
    let (a4, b4) = (a.ipv4.context("v4")?, b.ipv4.context("v4")?);
    let (a6, b6) = (a.ipv6.context("v6")?, b.ipv6.context("v6")?);
    assert!(eventually(WAIT, || tcp_ok(&a.ns, b4, 80, SHORT)));
    assert!(!node.flow_events_on()?, "nothing in audit mode yet");

    let rv = create(&api, deny_b("audit"))?;
    node.wait_programmed("NetworkPolicy/au/deny-b", Some(&rv), WAIT)?;
    assert!(node.flow_events_on()?, "audit mode keeps flows reported");
    let obs = node.observe(
        ObserveFilter {
            verdict: Some("would-drop".into()),
            ..ObserveFilter::default()
        },
        // The stream starts when the agent reads the request; a replay of
        // the last minute covers what came before (no gap, no repeat).
        Replay {
            since_ms: Some(60_000),
            last: None,
        },
    )?;
    // Nothing is dropped.
    let probes = [(&a, b4), (&a, b6), (&b, a4), (&b, a6)];
    for (from, to) in probes {
        assert!(
            tcp_ok(&from.ns, to, 80, OPEN),
            "audit drops nothing: -> {to}"
        );
    }
    let would = |src: IpAddr, dst: IpAddr| {
        move |r: &Value| {
            r["verdict"] == "WOULD-DROP"
                && r["direction"] == "ingress"
                && r["src"] == src.to_string()
                && r["dst"] == dst.to_string()
                && r["dst_port"] == 80
        }
    };
    assert!(
        eventually(WAIT, || {
            let rs = obs.records();
            rs.iter().any(would(a4, b4)) && rs.iter().any(would(a6, b6))
        }),
        "{:?}",
        obs.records()
    );
    std::thread::sleep(SHORT);
    let rs = obs.records();
    // Exactly the two flows to b, each once; none to a.
    assert_eq!(rs.len(), 2, "{rs:?}");
    for r in &rs {
        assert_eq!(r["policy"]["kind"], "NetworkPolicy", "{r}");
        assert_eq!(r["policy"]["namespace"], "au", "{r}");
        assert_eq!(r["policy"]["name"], "deny-b", "{r}");
        assert_eq!(r["reason"], "policy-denied", "{r}");
    }
    let m = node.metrics()?;
    assert_eq!(
        m.get(r#"sluice_would_drop_flows_total{kind="NetworkPolicy",policy="au/deny-b"}"#)
            .copied(),
        Some(2.0),
        "{m:?}"
    );
    drop(obs);

    // Enforced: exactly those flows are dropped, the others still pass.
    let mut p = api
        .get("networkpolicies", "au", "deny-b")
        .context("deny-b")?;
    p["metadata"]["annotations"]["policy.sluice.dev/enforcement"] = json!("enforce");
    let rv = resource_version(&api.update(p, sluice_test_apiserver::store::Part::Main)?);
    node.wait_programmed("NetworkPolicy/au/deny-b", Some(&rv), WAIT)?;
    for (from, to) in probes {
        let expect = to != b4 && to != b6;
        assert_eq!(tcp_ok(&from.ns, to, 80, SHORT), expect, "enforced: -> {to}");
    }
    assert!(
        eventually(WAIT, || !node.flow_events_on().unwrap_or(true)),
        "no policy in audit mode and no observer: flows off"
    );
    Ok(())
}

use std::net::IpAddr;
