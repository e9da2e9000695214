//! A policy change is in force as soon as the agent reports it programmed:
//! 100 changes while a long-lived allowed connection and a probe run, on
//! the one-node model cluster. Prints apply-to-programmed latency (p50,
//! p99); the time itself is for `cargo xtask bench propagation` to judge,
//! this test asserts the verdicts.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use sluice_tests::{cases::Family, conformance::Cluster, tcp_ok};

fn policy(allow: bool) -> String {
    let ingress = if allow {
        "  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels:\n          kubernetes.io/metadata.name: z\n      podSelector:\n        matchLabels:\n          pod: a\n    ports:\n    - port: 81\n"
    } else {
        "  ingress: []\n"
    };
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: toggled\n  namespace: x\nspec:\n  podSelector:\n    matchLabels:\n      pod: b\n  policyTypes:\n  - Ingress\n{ingress}"
    )
}

#[test]
fn each_of_a_hundred_policy_changes_is_in_force_once_programmed_and_a_long_lived_connection_survives()
-> Result<()> {
    let model = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/conformance/model-default.yaml"
    ))?;
    let mut c = Cluster::start(1, &model)?;
    let xa = c.ip_of("x/a", Family::Ipv4).context("x/a")?;
    let xb = c.ip_of("x/b", Family::Ipv4).context("x/b")?;

    // A long-lived connection y/a -> x/a:80, which no change touches: one
    // byte each way every 10 ms for the whole run.
    let (stop, rounds, failures) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let stream = c.pod_netns("y/a").context("y/a")?.run(move || {
        TcpStream::connect_timeout(&SocketAddr::new(xa, 80), Duration::from_secs(2))
    })??;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let keeper = {
        let (stop, rounds, failures) = (stop.clone(), rounds.clone(), failures.clone());
        let mut s = stream;
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            while !stop.load(Ordering::Relaxed) {
                if s.write_all(b"k").is_ok() && s.read_exact(&mut b).is_ok() {
                    rounds.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let mut latencies = Vec::new();
    let za = c.pod_netns("z/a").context("z/a")?.name.clone();
    for i in 0..100 {
        let allow = i % 2 == 0;
        let t0 = Instant::now();
        let keys = c.apply_text(&policy(allow), Family::Ipv4)?;
        c.wait_programmed(&keys)?;
        latencies.push(t0.elapsed());
        let ns = sluice_tests::NetNs { name: za.clone() };
        // One try: in force once reported programmed. A denied probe
        // waits its whole timeout, so only the allowed one gets room for
        // a loaded machine.
        let timeout = Duration::from_millis(if allow { 3000 } else { 300 });
        let ok = tcp_ok(&ns, xb, 81, timeout);
        std::mem::forget(ns); // borrowed: the cluster owns the namespace
        assert_eq!(
            ok,
            allow,
            "change {i}: z/a -> x/b:81 should be {}",
            if allow { "allowed" } else { "denied" }
        );
    }
    stop.store(true, Ordering::Relaxed);
    let _joined = keeper.join();
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    eprintln!(
        "apply-to-programmed over {} changes: p50 {:?}, p99 {:?}, max {:?}; long-lived connection: {} round trips, {} failures",
        latencies.len(),
        pct(50),
        pct(99),
        latencies.last().copied().expect("at least one change"),
        rounds.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed)
    );
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "the long-lived allowed connection never broke"
    );
    assert!(
        rounds.load(Ordering::Relaxed) > 10,
        "it carried traffic throughout"
    );
    Ok(())
}
