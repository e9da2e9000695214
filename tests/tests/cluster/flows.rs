//! Flows, not just drops, against the real agent: an observer of
//! forwarded flows turns the data path's flow switch on (and nobody else
//! does), an allowed connection is one forwarded event per endpoint naming
//! the policy that allowed it, a denied one is still a drop, and the kept
//! records replay (`--last`, `--since`).
use serde_json::Value;
use sluice_proto::{ObserveFilter, Replay};

use super::*;

fn filter(verdict: Option<&str>, pod: Option<&str>) -> ObserveFilter {
    ObserveFilter {
        verdict: verdict.map(Into::into),
        pod: pod.map(Into::into),
        ..ObserveFilter::default()
    }
}

fn is(r: &Value, verdict: &str, dir: &str, src: IpAddr, dst: IpAddr) -> bool {
    r["verdict"] == verdict
        && r["direction"] == dir
        && r["src"] == src.to_string()
        && r["dst"] == dst.to_string()
        && r["dst_port"] == 80
}

use std::net::IpAddr;

#[test]
fn an_allowed_connection_is_one_forwarded_event_naming_its_policy_only_while_observed() -> Result<()>
{
    let (mut node, api, config) = cluster()?;
    api.create_namespace("fl")?;
    for (name, label) in [("a", "a"), ("b", "b"), ("c", "c")] {
        create(&api, pod("fl", name, label))?;
    }
    node.start_agent()?;
    let a = Pod::add_as(&node, &config, Some(("fl", "a")))?;
    let b = Pod::add_as(&node, &config, Some(("fl", "b")))?;
    let c = Pod::add_as(&node, &config, Some(("fl", "c")))?;
    let _srv = Server::start(&b.ns, 80)?;
    let (a4, b4, c4) = (
        a.ipv4.context("v4")?,
        b.ipv4.context("v4")?,
        c.ipv4.context("v4")?,
    );
    let rv = create(
        &api,
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "allow-a", "namespace": "fl"},
            "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}],
                                  "ports": [{"port": 80}]}]}
        }),
    )?;
    node.wait_programmed("NetworkPolicy/fl/allow-a", Some(&rv), WAIT)?;

    // Nobody observes, or only drops: the switch stays off.
    assert!(!node.flow_events_on()?, "off with no observer");
    let drops_only = node.observe(filter(None, None), Replay::default())?;
    std::thread::sleep(SHORT);
    assert!(!node.flow_events_on()?, "a drop observer wants no flows");
    assert!(tcp_ok(&a.ns, b4, 80, SHORT), "a -> b allowed");
    std::thread::sleep(SHORT);
    assert!(
        drops_only
            .records()
            .iter()
            .all(|r| r["verdict"] == "DROPPED"),
        "{:?}",
        drops_only.records()
    );
    drop(drops_only);

    let all = node.observe(filter(Some("all"), None), Replay::default())?;
    assert!(
        eventually(WAIT, || node.flow_events_on().unwrap_or(false)),
        "an observer of every verdict turns flows on"
    );
    assert!(tcp_ok(&a.ns, b4, 80, SHORT), "a -> b allowed");
    assert!(!tcp_ok(&c.ns, b4, 80, SHORT), "c -> b denied");
    let seen = |pred: &dyn Fn(&Value) -> bool| all.records().iter().filter(|r| pred(r)).count();
    let allowed_in = |r: &Value| is(r, "FORWARDED", "ingress", a4, b4);
    let denied_in = |r: &Value| is(r, "DROPPED", "ingress", c4, b4);
    assert!(
        eventually(WAIT, || seen(&allowed_in) >= 1 && seen(&denied_in) >= 1),
        "{:?}",
        all.records()
    );
    // Exactly one per new flow and endpoint, not per packet.
    std::thread::sleep(SHORT);
    let records = all.records();
    let fwd: Vec<&Value> = records.iter().filter(|r| allowed_in(r)).collect();
    let [fwd] = fwd[..] else {
        anyhow::bail!("one forwarded ingress event expected: {records:?}");
    };
    assert_eq!(
        fwd["policy"],
        json!({"kind": "NetworkPolicy", "namespace": "fl", "name": "allow-a",
               "rule": "ingress[0]", "tier": "NetworkPolicy"}),
        "{fwd}"
    );
    assert_eq!(fwd["reason"], "forwarded");
    assert_eq!(fwd["src_pod"], "a");
    assert_eq!(fwd["dst_pod"], "b");
    assert_eq!(
        fwd["detail"],
        "allowed by NetworkPolicy fl/allow-a, rule ingress[0]"
    );
    // a's egress is not isolated: forwarded too, by no rule.
    let egress: Vec<&Value> = records
        .iter()
        .filter(|r| is(r, "FORWARDED", "egress", a4, b4))
        .collect();
    assert_eq!(egress.len(), 1, "{records:?}");
    assert!(egress[0].get("policy").is_none(), "{}", egress[0]);
    assert_eq!(seen(&denied_in), 1, "{records:?}");
    assert_eq!(seen(&|r| is(r, "FORWARDED", "ingress", c4, b4)), 0);

    // The last observer gone: off again.
    drop(all);
    assert!(
        eventually(WAIT, || !node.flow_events_on().unwrap_or(true)),
        "off once nobody observes flows"
    );

    // Replays: the last two forwarded records with a at either end (its
    // egress, then b's ingress), and everything of the last minute.
    let last = node.observe(
        filter(Some("forwarded"), Some("fl/a")),
        Replay {
            last: Some(2),
            since_ms: None,
        },
    )?;
    assert!(eventually(WAIT, || last.records().len() >= 2));
    std::thread::sleep(SHORT);
    let got = last.records();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(is(&got[0], "FORWARDED", "egress", a4, b4), "{got:?}");
    assert!(is(&got[1], "FORWARDED", "ingress", a4, b4), "{got:?}");
    drop(last);
    let since = node.observe(
        filter(Some("all"), None),
        Replay {
            last: None,
            since_ms: Some(60_000),
        },
    )?;
    assert!(eventually(WAIT, || since
        .records()
        .iter()
        .any(|r| is(r, "DROPPED", "ingress", c4, b4))));
    assert!(since.records().iter().any(allowed_in));
    Ok(())
}
