//! `sluice explain` against the real agent: the live explanation of an
//! allowed and of a denied probe matches what the packets do, and names the
//! rule or the isolation that decides.
use sluice_agent::policy::explain::{DecidedBy, Explanation};
use sluice_proto::{Request, Response};

use super::*;

fn explain(node: &Node, from: &str, to: &str, flow: &str) -> Result<Vec<Explanation>> {
    match node.request(&Request::Explain {
        from: from.into(),
        to: to.into(),
        flow: flow.into(),
    })? {
        Response::Explain { explanations } => Ok(explanations
            .into_iter()
            .map(serde_json::from_value)
            .collect::<Result<_, _>>()?),
        other => anyhow::bail!("unexpected answer: {other:?}"),
    }
}

#[test]
fn the_live_explanation_of_an_allowed_and_a_denied_probe_matches_the_packets() -> Result<()> {
    let (mut node, api, config) = cluster()?;
    api.create_namespace("ex")?;
    for (name, label) in [("a", "a"), ("b", "b"), ("c", "c")] {
        create(&api, pod("ex", name, label))?;
    }
    let ([a, b, c], _srv) = only_a_reaches_b(&mut node, &api, &config, "ex")?;
    let b4 = b.ipv4.context("v4")?;

    let allowed = explain(&node, "ex/a", "ex/b", "80/TCP")?;
    let [e] = &allowed[..] else {
        anyhow::bail!("{allowed:?}");
    };
    assert!(
        e.allowed && e.allowed_here,
        "{}",
        sluice_agent::policy::explain::render(e)
    );
    assert_eq!(
        e.ingress.as_ref().map(|s| s.decided_by.clone()),
        Some(DecidedBy::NetworkPolicy {
            policy: "ex/only-a".into(),
            rule: "ingress[0]".into()
        })
    );
    assert!(
        tcp_ok(&a.ns, b4, 80, OPEN),
        "the packets agree: a -> b passes"
    );

    let denied = explain(&node, "ex/c", "ex/b", "80/TCP")?;
    let [e] = &denied[..] else {
        anyhow::bail!("{denied:?}");
    };
    let text = sluice_agent::policy::explain::render(e);
    assert!(!e.allowed && !e.allowed_here, "{text}");
    assert_eq!(
        e.ingress.as_ref().map(|s| s.decided_by.clone()),
        Some(DecidedBy::Isolation {
            policies: vec!["ex/only-a".into()]
        })
    );
    assert!(
        text.contains("pod label `pod` is `c` (wants pod=a)"),
        "{text}"
    );
    assert!(
        !tcp_ok(&c.ns, b4, 80, SHORT),
        "the packets agree: c -> b dropped"
    );

    // The CLI asks the same question through the socket and prints it.
    let out = std::process::Command::new(sluice_tests::bin_dir().join("sluice"))
        .args(["explain", "--socket"])
        .arg(node.socket())
        .args(["ex/c", "ex/b", "80/TCP"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let c4 = c.ipv4.context("v4")?;
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.starts_with(&format!("ex/c ({c4}) -> ex/b ({b4}) TCP/80: DENIED"))
            && stdout.contains("ex/b is isolated for ingress by ex/only-a"),
        "{stdout}"
    );

    // An Admin rule at the source's egress now denies what the
    // NetworkPolicy allows at the destination's ingress.
    let rv = create(
        &api,
        json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "a-not-b"},
            "spec": {"tier": "Admin", "priority": 5,
                     "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}},
                     "egress": [{"name": "no-b", "action": "Deny",
                                 "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}}],
                                 "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}]}
        }),
    )?;
    node.wait_programmed("ClusterNetworkPolicy/a-not-b", Some(&rv), WAIT)?;
    let now = explain(&node, "ex/a", "ex/b", "80/TCP")?;
    let [e] = &now[..] else {
        anyhow::bail!("{now:?}");
    };
    assert!(!e.allowed, "{}", sluice_agent::policy::explain::render(e));
    assert_eq!(
        e.egress.as_ref().map(|s| s.decided_by.clone()),
        Some(DecidedBy::Cluster {
            tier: sluice_agent::policy::Tier::Admin,
            policy: "a-not-b".into(),
            rule: "no-b".into(),
            action: "Deny".into()
        })
    );
    assert!(
        !tcp_ok(&a.ns, b4, 80, SHORT),
        "the packets agree: a -> b dropped at a's egress"
    );

    // A question the agent cannot answer is an error, not a guess.
    let bad = node.request(&Request::Explain {
        from: "ex/nobody".into(),
        to: "ex/b".into(),
        flow: "80/TCP".into(),
    })?;
    assert!(
        matches!(&bad, Response::Error { details, .. } if details.contains("ex/nobody")),
        "{bad:?}"
    );
    Ok(())
}
