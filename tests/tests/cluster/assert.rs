//! `sluice assert` against the real agent: probes run from inside the
//! source pods' network namespaces; assertions that hold and one that does
//! not, the exact TAP text, and the exit status.
use std::process::Output;

use sluice_tests::{cases::Family, conformance::Cluster};

use super::*;

fn labelled(ns: &str, name: &str, labels: &Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "none",
            "ports": [{"containerPort": 80, "name": "serve-80-tcp", "protocol": "TCP"}]}]}
    })
}

/// `sluice assert -f <file>` with `args`, the file written into the
/// node's directory.
fn assert_cli(node: &Node, file: &str, text: &str, args: &[&str]) -> Result<Output> {
    assert_in(&node.tmp.0, file, text, args)
}

fn assert_in(dir: &std::path::Path, file: &str, text: &str, args: &[&str]) -> Result<Output> {
    let path = dir.join(file);
    std::fs::write(&path, text)?;
    Ok(
        std::process::Command::new(sluice_tests::bin_dir().join("sluice"))
            .arg("assert")
            .arg("-f")
            .arg(&path)
            .args(args)
            .output()?,
    )
}

#[test]
fn assertions_run_in_the_source_pods_and_report_tap_with_the_exit_status() -> Result<()> {
    let (mut node, api, config) = cluster()?;
    api.create_namespace("as")?;
    create(
        &api,
        labelled("as", "a", &json!({"pod": "a", "role": "client"})),
    )?;
    create(&api, labelled("as", "b", &json!({"pod": "b"})))?;
    create(
        &api,
        labelled("as", "c", &json!({"pod": "c", "role": "client"})),
    )?;
    let ([a, b, c], _srv_b) = only_a_reaches_b(&mut node, &api, &config, "as")?;
    let _srv_a = Server::start(&a.ns, 80)?;
    let b4 = b.ipv4.context("v4")?;

    // Every assertion holds: exit 0. The first socket has no agent: each
    // question goes on to the next (the routing of a multi-node run).
    let socket = node.socket().to_string_lossy().into_owned();
    let good = format!(
        "tests:\n\
         - {{from: as/a, to: as/b, port: 80, expect: open}}\n\
         - {{from: as/c, to: as/b, port: 80, expect: closed, timeout: 500ms}}\n\
         - from: {{namespace: as, selector: {{role: client}}}}\n\
         \x20 to: {b4}\n\
         \x20 port: 81\n\
         \x20 expect: closed\n\
         \x20 timeout: 300ms\n\
         - {{from: as/b, to: as/a, port: 80, protocol: UDP, expect: open}}\n"
    );
    let out = assert_cli(
        &node,
        "good.yaml",
        &good,
        &["--socket", "/nonexistent/agent.sock", "--socket", &socket],
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        format!(
            "TAP version 13\n\
             1..5\n\
             ok 1 - as/a -> as/b:80 open\n\
             ok 2 - as/c -> as/b:80 closed\n\
             ok 3 - as/a -> {b4}:81 closed\n\
             ok 4 - as/c -> {b4}:81 closed\n\
             ok 5 - as/b -> as/a:80/UDP open\n\
             # 5 tests, 5 passed, 0 failed\n"
        ),
        "{out:?}"
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // A wrong expectation: not ok, why, and exit 1.
    let bad = "tests:\n\
               - {from: as/a, to: as/b, port: 80, expect: open, name: allowed}\n\
               - {from: as/c, to: as/b, port: 80, expect: open, timeout: 500ms}\n";
    let out = assert_cli(&node, "bad.yaml", bad, &["--socket", &socket])?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "TAP version 13\n\
             1..2\n\
             ok 1 - as/a -> as/b:80 open (allowed)\n\
             not ok 2 - as/c -> as/b:80 open # expected open, got closed\n\
             \x20 ---\n\
             \x20 address: \"{b4}\"\n\
             \x20 detail: \"timed out\"\n\
             \x20 ...\n\
             # 2 tests, 1 passed, 1 failed\n"
        ),
        "{out:?}"
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = assert_cli(&node, "bad.yaml", bad, &["--socket", &socket, "-o", "json"])?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!((&v["passed"], &v["failed"]), (&json!(1), &json!(1)), "{v}");
    assert_eq!(v["tests"][1]["got"], "closed");
    assert_eq!(out.status.code(), Some(1));

    // The packets agree with what assert said.
    assert!(tcp_ok(&a.ns, b4, 80, SHORT));
    assert!(!tcp_ok(&c.ns, b4, 80, SHORT));

    // A pod on no node asked, and a selector that matches nothing, are
    // failures, not passes.
    let out = assert_cli(
        &node,
        "missing.yaml",
        "tests:\n\
         - {from: as/nobody, to: as/b, port: 80, expect: closed}\n\
         - {from: {namespace: as, selector: {role: none}}, to: as/b, port: 80, expect: closed}\n",
        &["--socket", &socket],
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("not ok 1 - as/nobody -> as/b:80 closed # expected closed, got an error")
            && stdout.contains("is on the node of no agent asked")
            && stdout.contains("not ok 2 - as/{role=none} -> as/b:80 closed")
            && stdout.contains("no pod matches as/{role=none}"),
        "{stdout}"
    );
    assert_eq!(out.status.code(), Some(1));
    Ok(())
}

/// Two nodes (the conformance harness's cluster: one API server, an agent
/// per node, the 9-pod model spread over them, ClusterIP Services DNATed):
/// each probe goes to the agent of its source pod's node, Service targets
/// resolve to their ClusterIP, and a selector spans both nodes.
#[test]
fn on_two_nodes_each_probe_runs_at_the_agent_of_its_source_pod() -> Result<()> {
    let model = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/model-default.yaml"),
    )?;
    let mut cluster = Cluster::start(2, &model)?;
    let policies = [
        include_str!("../../../deploy/examples/default-deny-ingress.yaml"),
        include_str!("../../../deploy/examples/allow-web-from-y.yaml"),
    ];
    for p in policies {
        let keys = cluster.apply_text(p, Family::Ipv4)?;
        cluster.wait_programmed(&keys)?;
    }
    let sockets: Vec<String> = (0..2)
        .map(|i| {
            cluster
                .node(i)
                .map(|n| n.socket().to_string_lossy().into_owned())
                .context("node")
        })
        .collect::<Result<_>>()?;
    let xa = cluster.ip_of("x/a", Family::Ipv4).context("x/a")?;
    let dir = cluster.node(0).context("node 0")?.tmp.0.clone();
    let text = "tests:\n\
         - {from: y/a, to: svc/x/s-x-a, port: 80, expect: open}\n\
         - {from: z/a, to: svc/x/s-x-a, port: 80, expect: closed, timeout: 500ms}\n\
         - {from: {namespace: y}, to: x/a, port: 80, expect: open}\n\
         - {from: x/b, to: z/c, port: 81, protocol: UDP, expect: open}\n\
         - {from: z/b, to: x/a, port: 80, expect: open, timeout: 500ms}\n";
    let args = ["--socket", &sockets[0], "--socket", &sockets[1]];
    let out = assert_in(&dir, "two-nodes.yaml", text, &args)?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "TAP version 13\n\
             1..7\n\
             ok 1 - y/a -> svc/x/s-x-a:80 open\n\
             ok 2 - z/a -> svc/x/s-x-a:80 closed\n\
             ok 3 - y/a -> x/a:80 open\n\
             ok 4 - y/b -> x/a:80 open\n\
             ok 5 - y/c -> x/a:80 open\n\
             ok 6 - x/b -> z/c:81/UDP open\n\
             not ok 7 - z/b -> x/a:80 open # expected open, got closed\n\
             \x20 ---\n\
             \x20 address: \"{xa}\"\n\
             \x20 detail: \"timed out\"\n\
             \x20 ...\n\
             # 7 tests, 6 passed, 1 failed\n"
        ),
        "{out:?}"
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // One agent alone has only its node's pods: the others are errors.
    let out = assert_in(&dir, "two-nodes.yaml", text, &["--socket", &sockets[0]])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Pods go to the nodes in turn in model order: x/b, y/a, y/c and z/b
    // are on node 1 (y/a is the source of two tests).
    assert_eq!(
        stdout.matches("is on the node of no agent asked").count(),
        5,
        "{stdout}"
    );
    assert!(
        stdout.contains("ok 2 - z/a -> svc/x/s-x-a:80 closed"),
        "{stdout}"
    );
    assert_eq!(out.status.code(), Some(1));
    Ok(())
}
