//! A NetworkPolicy default deny names the policies that isolate the
//! endpoint in the drop's direction: in the agent's drop events and in
//! `sluice observe` (text and `-o json`) run against the real agent, the
//! first few by namespace and name and the rest counted.
use std::{
    io::{BufRead as _, BufReader},
    net::IpAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
};

use super::*;

/// `sluice observe --socket S ARGS`, its stdout lines collected; killed on
/// drop.
struct Observe {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Observe {
    fn start(node: &Node, args: &[&str]) -> Result<Self> {
        let mut child = Command::new(sluice_tests::bin_dir().join("sluice"))
            .arg("observe")
            .arg("--socket")
            .arg(node.socket())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("sluice observe (cargo build --bins first)")?;
        let out = child.stdout.take().context("observe's stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(mut v) = sink.lock() {
                    v.push(line);
                }
            }
        });
        Ok(Self { child, lines })
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Drop for Observe {
    fn drop(&mut self) {
        let _ignored = self.child.kill();
        let _ignored = self.child.wait();
    }
}

#[test]
fn a_default_deny_drop_names_the_networkpolicies_isolating_its_endpoint_in_its_direction()
-> Result<()> {
    let (mut node, api, config) = cluster()?;
    api.create_namespace("iso")?;
    for name in ["client", "web", "other"] {
        create(&api, pod("iso", name, name))?;
    }
    node.start_agent()?;
    let client = Pod::add_as(&node, &config, Some(("iso", "client")))?;
    let web = Pod::add_as(&node, &config, Some(("iso", "web")))?;
    let other = Pod::add_as(&node, &config, Some(("iso", "other")))?;
    let _web_srv = Server::start(&web.ns, 80)?;
    let _other_srv = Server::start(&other.ns, 80)?;
    let (web4, web6, other4) = (
        web.ipv4.context("v4")?,
        web.ipv6.context("v6")?,
        other.ipv4.context("v4")?,
    );
    assert!(eventually(WAIT, || tcp_ok(&client.ns, web4, 80, SHORT)));
    let text = Observe::start(&node, &["--namespace", "iso"])?;
    let json_out = Observe::start(&node, &["--namespace", "iso", "-o", "json"])?;

    // web is isolated for ingress by two policies (one only lets `other`
    // in); the client's egress by a third, which allows web only.
    let np = |name: &str, spec: Value| -> Result<()> {
        let rv = create(
            &api,
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": name, "namespace": "iso"}, "spec": spec}),
        )?;
        node.wait_programmed(&format!("NetworkPolicy/iso/{name}"), Some(&rv), WAIT)
    };
    np(
        "web",
        json!({"podSelector": {"matchLabels": {"pod": "web"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "other"}}}]}]}),
    )?;
    np(
        "deny-all",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    )?;
    np(
        "client-out",
        json!({"podSelector": {"matchLabels": {"pod": "client"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "web"}}}]}]}),
    )?;
    // The client -> web drop (web's ingress; client's egress allows it),
    // both families; client -> other (client's egress: other's ingress is
    // isolated too, but the egress side drops first).
    let ingress = "denied by default: isolated (ingress) by NetworkPolicy iso/deny-all, iso/web";
    let egress = "denied by default: isolated (egress) by NetworkPolicy iso/client-out";
    let seen = |detail: &str, dst: IpAddr| {
        !node
            .events_matching(|e| {
                e["reason"] == "policy-denied"
                    && e["detail"] == detail
                    && e["dst"] == dst.to_string()
                    && e["src_pod"] == "client"
            })
            .is_empty()
    };
    for (dst, detail) in [(web4, ingress), (web6, ingress), (other4, egress)] {
        assert!(
            eventually(WAIT, || {
                assert!(
                    !tcp_ok(&client.ns, dst, 80, SHORT),
                    "client -> {dst} denied"
                );
                seen(detail, dst)
            }),
            "a drop event to {dst} saying {detail:?}; the last seen: {:?}",
            node.events_matching(|e| e["reason"] == "policy-denied")
                .last()
        );
    }
    let web_drop = node
        .events_matching(|e| e["detail"] == ingress)
        .pop()
        .context("the ingress drop")?;
    assert_eq!(
        web_drop["isolated_by"],
        json!({"kind": "NetworkPolicy", "policies": ["iso/deny-all", "iso/web"], "more": 0}),
    );
    assert_eq!(web_drop["direction"], "ingress");

    // `sluice observe` prints the same: the line ends with the names, the
    // JSON record carries them.
    let printed = |o: &Observe, want: &str| {
        eventually(WAIT, || {
            let _ignored = tcp_ok(&client.ns, web4, 80, SHORT);
            o.lines().iter().any(|l| l.contains(want))
        })
    };
    let line_end = format!(
        "{}(iso/client) -> {web4}(iso/web) TCP",
        client.ipv4.context("v4")?
    );
    assert!(
        printed(&text, ingress),
        "observe printed {:?}",
        text.lines()
    );
    let line = text
        .lines()
        .into_iter()
        .find(|l| l.contains(&line_end) && l.ends_with(ingress))
        .with_context(|| format!("an observe line with {line_end} ... {ingress}"))?;
    assert!(line.contains("DROPPED ingress"), "{line}");
    assert!(
        printed(&json_out, r#""isolated_by""#),
        "observe -o json printed {:?}",
        json_out.lines()
    );
    let rec: Value = json_out
        .lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["detail"] == ingress)
        .context("a JSON record naming web's isolators")?;
    assert_eq!(
        rec["isolated_by"]["policies"],
        json!(["iso/deny-all", "iso/web"])
    );

    // Bounded: with seven more isolating web, five are named and the rest
    // counted.
    for i in 1..=7 {
        np(
            &format!("extra-{i}"),
            json!({"podSelector": {"matchLabels": {"pod": "web"}}, "policyTypes": ["Ingress"]}),
        )?;
    }
    let many = "denied by default: isolated (ingress) by NetworkPolicy iso/deny-all, iso/extra-1, iso/extra-2, iso/extra-3, iso/extra-4 and 4 more";
    assert!(
        eventually(WAIT, || {
            let _ignored = tcp_ok(&client.ns, web4, 80, SHORT);
            seen(many, web4)
        }),
        "saw {:?}",
        node.events_matching(|e| e["reason"] == "policy-denied")
            .last()
    );
    // `other` is still let in by `web` (the names explain; they do not
    // change what is allowed).
    assert!(tcp_ok(&other.ns, web4, 80, SHORT), "other -> web allowed");
    Ok(())
}
