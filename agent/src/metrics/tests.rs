use std::collections::BTreeSet;

use sluice_common::reason;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::datapath::counters::{Count, Fill};

fn counters() -> Counters {
    let mut c = Counters::default();
    c.drops.insert(
        (reason::POLICY_DENIED, DIR_INGRESS),
        Count {
            packets: 2,
            bytes: 120,
        },
    );
    c.drops.insert(
        (reason::POLICY_DENIED, DIR_EGRESS),
        Count {
            packets: 1,
            bytes: 60,
        },
    );
    // Two codes the agent has no name for: one series, summed.
    c.drops.insert(
        (200, DIR_INGRESS),
        Count {
            packets: 3,
            bytes: 30,
        },
    );
    c.drops.insert(
        (201, DIR_INGRESS),
        Count {
            packets: 4,
            bytes: 40,
        },
    );
    c.stats[stat::FORWARDED as usize + usize::from(DIR_INGRESS)] = 10;
    c.stats[stat::FORWARDED as usize + usize::from(DIR_EGRESS)] = 11;
    c.stats[stat::CT_CREATED as usize] = 5;
    c.stats[stat::EVENTS_LOST as usize] = 7;
    for (name, entries, capacity) in [
        ("IPCACHE", 1, 4),
        ("SERVICES", 2, 8),
        ("CIDRS", 3, 4),
        ("POLICY", 0, 16),
        ("ENDPOINTS", 2, 4),
    ] {
        c.fills.insert(name, Fill { entries, capacity });
    }
    c.failed_closed = 1;
    c.rule_drops.insert(
        sluice_common::RULE_CNP_FLAG | 3,
        Count {
            packets: 6,
            bytes: 360,
        },
    );
    c
}

fn state() -> EndpointStats {
    EndpointStats {
        endpoints: vec![
            EndpointStat {
                ep_id: EpId(7),
                namespace: "x".into(),
                pod: "a".into(),
                entries: 3,
            },
            EndpointStat {
                ep_id: EpId(9),
                namespace: "x".into(),
                pod: "b\"q".into(),
                entries: 1,
            },
        ],
        capacity: Capacities {
            policy: 8,
            endpoints: 4,
        },
        rule_names: std::sync::Arc::new(crate::events::RuleNames::from_origins(vec![(
            sluice_common::RULE_CNP_FLAG | 3,
            crate::policy::CnpRuleOrigin {
                policy: "block-metadata".into(),
                rule: "deny-imds".into(),
                tier: crate::policy::Tier::Admin,
                priority: 10,
                dir: DIR_EGRESS,
                index: 0,
                action: sluice_common::action::DENY,
            },
        )])),
    }
}

fn exporter(metrics: &Metrics, read: Result<Counters, ()>) -> Exporter {
    Exporter::with_counters(
        metrics,
        Box::new(move || {
            read.clone()
                .map_err(|()| DatapathError::MissingMap("DROP_COUNTERS"))
        }),
        Arc::new(state),
    )
}

/// `(series, value)` per sample line; checks that each family is typed
/// once and its samples follow its TYPE line (what Prometheus requires).
fn samples(text: &str) -> BTreeMap<String, f64> {
    let mut typed = BTreeSet::new();
    let mut family = String::new();
    let mut out = BTreeMap::new();
    for l in text.lines() {
        if let Some(t) = l.strip_prefix("# TYPE ") {
            family = t.split(' ').next().unwrap().to_owned();
            assert!(
                typed.insert(family.clone()),
                "{family} typed twice in\n{text}"
            );
            continue;
        }
        if l.starts_with('#') {
            continue;
        }
        let (series, v) = l.rsplit_once(' ').unwrap();
        let name = series.split('{').next().unwrap();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| *b == family))
            .unwrap_or(name);
        assert_eq!(base, family, "{series} outside its family in\n{text}");
        assert!(out.insert(series.to_owned(), v.parse().unwrap()).is_none());
    }
    out
}

#[test]
fn drops_are_counters_by_reason_and_direction_with_unknown_reasons_summed() {
    let text = exporter(&Metrics::new(), Ok(counters())).encode().unwrap();
    assert!(
        text.contains("# TYPE sluice_dropped_packets_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE sluice_dropped_bytes_total counter\n"),
        "{text}"
    );
    let m = samples(&text);
    let get = |s: &str| m.get(s).copied().unwrap_or_else(|| panic!("{s} in {m:?}"));
    assert_eq!(
        get(r#"sluice_dropped_packets_total{reason="policy-denied",direction="ingress"}"#),
        2.0
    );
    assert_eq!(
        get(r#"sluice_dropped_bytes_total{reason="policy-denied",direction="egress"}"#),
        60.0
    );
    assert_eq!(
        get(r#"sluice_dropped_packets_total{reason="unknown",direction="ingress"}"#),
        7.0
    );
    assert_eq!(
        get(r#"sluice_forwarded_packets_total{direction="ingress"}"#),
        10.0
    );
    assert_eq!(
        get(r#"sluice_forwarded_packets_total{direction="egress"}"#),
        11.0
    );
    assert_eq!(
        get(r#"sluice_datapath_events_total{event="ct_created"}"#),
        5.0
    );
    assert_eq!(
        get(r#"sluice_datapath_events_total{event="drop_events_lost"}"#),
        7.0
    );
    assert_eq!(
        get(r#"sluice_datapath_events_total{event="ct_insert_failed"}"#),
        0.0
    );
}

#[test]
fn fail_closed_endpoints_are_a_gauge_from_the_maps_and_the_times_a_counter_of_the_agent() {
    let metrics = Metrics::new();
    metrics.endpoint_failed_closed();
    metrics.endpoint_failed_closed();
    let text = exporter(&metrics, Ok(counters())).encode().unwrap();
    assert!(
        text.contains("# TYPE sluice_endpoints_failed_closed gauge\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE sluice_endpoints_failed_closed_total counter\n"),
        "{text}"
    );
    let m = samples(&text);
    assert_eq!(m["sluice_endpoints_failed_closed"], 1.0);
    assert_eq!(m["sluice_endpoints_failed_closed_total"], 2.0);
}

#[test]
fn endpoints_entries_and_map_pressure_come_from_the_provider_and_the_walks() {
    let text = exporter(&Metrics::new(), Ok(counters())).encode().unwrap();
    let m = samples(&text);
    assert_eq!(
        m[r#"sluice_policy_entries{endpoint="7",namespace="x",pod="a"}"#],
        3.0
    );
    // Label values are escaped.
    assert_eq!(
        m[r#"sluice_policy_entries{endpoint="9",namespace="x",pod="b\"q"}"#],
        1.0
    );
    assert_eq!(m["sluice_endpoints"], 2.0);
    // POLICY's entries are the agent's (4), its capacity the kernel's (16).
    assert_eq!(m[r#"sluice_map_pressure{map="POLICY"}"#], 0.25);
    assert_eq!(m[r#"sluice_map_pressure{map="ENDPOINTS"}"#], 0.5);
    assert_eq!(m[r#"sluice_map_pressure{map="IPCACHE"}"#], 0.25);
    assert_eq!(m[r#"sluice_map_pressure{map="SERVICES"}"#], 0.25);
    assert_eq!(m[r#"sluice_map_pressure{map="CIDRS"}"#], 0.75);
}

#[test]
fn without_the_maps_only_the_agents_own_families_are_answered() {
    let metrics = Metrics::new();
    metrics.watch_up(Kind::Pod, true);
    let m = samples(&exporter(&metrics, Err(())).encode().unwrap());
    assert!(
        !m.keys().any(|k| k.starts_with("sluice_dropped")
            || k.starts_with("sluice_forwarded")
            || k.starts_with("sluice_endpoints_failed_closed{")
            || k.contains("IPCACHE")),
        "{m:?}"
    );
    assert!(!m.contains_key("sluice_endpoints_failed_closed"), "{m:?}");
    assert_eq!(m["sluice_endpoints"], 2.0);
    // Without the maps, the capacity asked for at load.
    assert_eq!(m[r#"sluice_map_pressure{map="POLICY"}"#], 0.5);
    assert_eq!(m[r#"sluice_watch_up{kind="Pod"}"#], 1.0);
}

#[test]
fn durations_fall_in_every_bucket_they_fit_with_the_same_bounds_as_before() {
    let metrics = Metrics::new();
    metrics.observe_compile(Duration::from_micros(700));
    metrics.observe_compile(Duration::from_millis(30));
    drop(metrics.apply_to_programmed_timer());
    let text = exporter(&metrics, Ok(counters())).encode().unwrap();
    assert!(
        text.contains("# TYPE sluice_compile_duration_seconds histogram\n"),
        "{text}"
    );
    let m = samples(&text);
    let bucket = |le: &str| m[&format!("sluice_compile_duration_seconds_bucket{{le=\"{le}\"}}")];
    for (le, n) in [
        ("0.0005", 0.0),
        ("0.001", 1.0),
        ("0.0025", 1.0),
        ("0.005", 1.0),
        ("0.01", 1.0),
        ("0.025", 1.0),
        ("0.05", 2.0),
        ("0.1", 2.0),
        ("0.5", 2.0),
        ("2.5", 2.0),
        ("+Inf", 2.0),
    ] {
        assert_eq!(bucket(le), n, "le={le}");
    }
    let buckets = m
        .keys()
        .filter(|k| k.starts_with("sluice_compile_duration_seconds_bucket"))
        .count();
    assert_eq!(buckets, BUCKETS.len() + 1);
    assert_eq!(m["sluice_compile_duration_seconds_count"], 2.0);
    assert!((m["sluice_compile_duration_seconds_sum"] - 0.0307).abs() < 1e-9);
    // The timer observed once, when dropped.
    assert_eq!(m["sluice_apply_to_programmed_seconds_count"], 1.0);
}

#[test]
fn watch_health_is_a_gauge_and_an_error_counter_per_kind() {
    let metrics = Metrics::new();
    metrics.watch_up(Kind::NetworkPolicy, false);
    metrics.watch_error(Kind::NetworkPolicy);
    metrics.watch_up(Kind::NetworkPolicy, true);
    metrics.watch_up(Kind::Service, false);
    assert_eq!(metrics.watch_health(Kind::NetworkPolicy), (Some(true), 1));
    assert_eq!(metrics.watch_health(Kind::Node), (None, 0));
    let text = exporter(&metrics, Ok(counters())).encode().unwrap();
    assert!(
        text.contains("# TYPE sluice_watch_errors_total counter\n"),
        "{text}"
    );
    let m = samples(&text);
    assert_eq!(m[r#"sluice_watch_up{kind="NetworkPolicy"}"#], 1.0);
    assert_eq!(m[r#"sluice_watch_up{kind="Service"}"#], 0.0);
    assert_eq!(m[r#"sluice_watch_errors_total{kind="NetworkPolicy"}"#], 1.0);
}

/// One request the way the test harness sends it (no `Connection` header),
/// read to EOF: the answer must end, not hang.
async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("the server closes the connection after answering")
        .unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

#[tokio::test]
async fn the_server_answers_metrics_health_and_readiness_and_closes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Metrics::new();
    metrics.endpoint_failed_closed();
    let ready = Ready::default();
    let server = tokio::spawn(serve(
        listener,
        Arc::new(exporter(&metrics, Ok(counters()))),
        ready.clone(),
    ));

    let (head, body) = get(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(samples(&body)["sluice_endpoints_failed_closed_total"], 1.0);

    let (head, body) = get(addr, "/healthz").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "ok\n");

    let (head, body) = get(addr, "/readyz").await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(body.contains("not synced"), "{body}");
    ready.set_synced(true);
    let (head, body) = get(addr, "/readyz").await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert_eq!(body, "not ready: CNI socket not serving\n");
    ready.set_serving(true);
    let (head, _) = get(addr, "/readyz").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    let (head, _) = get(addr, "/nothing").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    server.abort();
}
