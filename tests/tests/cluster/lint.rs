//! `sluice lint --live` against the real agent: the objects it watches are
//! linted as files would be; a NetworkPolicy with the two-item `from` trap
//! is found, and goes with the policy.
use super::*;

fn lint_live(node: &Node) -> Result<(Option<i32>, String)> {
    let out = std::process::Command::new(sluice_tests::bin_dir().join("sluice"))
        .args(["lint", "--live", "-o", "json", "--socket"])
        .arg(node.socket())
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

#[test]
fn lint_live_reads_the_agents_objects() -> Result<()> {
    let (mut node, api, _config) = cluster()?;
    api.create_namespace("li")?;
    create(&api, pod("li", "web", "web"))?;
    node.start_agent()?;
    let rv = create(
        &api,
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "trap", "namespace": "li"},
            "spec": {"podSelector": {"matchLabels": {"pod": "web"}},
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "x"}}},
                                           {"podSelector": {"matchLabels": {"pod": "client"}}}]}]}
        }),
    )?;
    node.wait_programmed("NetworkPolicy/li/trap", Some(&rv), WAIT)?;
    let (code, out) = lint_live(&node)?;
    assert_eq!(code, Some(1), "warnings: {out}");
    let report: serde_json::Value = serde_json::from_str(&out)?;
    let text = report.to_string();
    assert!(
        text.contains("two-item-peer") && text.contains("li/trap"),
        "{out}"
    );
    // Gone from the API, gone from the findings.
    api.delete("networkpolicies", "li", "trap")?;
    assert!(eventually(WAIT, || lint_live(&node)
        .is_ok_and(|(_, out)| !out.contains("two-item-peer"))));
    Ok(())
}
