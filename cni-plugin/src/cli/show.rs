//! What the CLI prints, and when `wait` is done: pure functions of the
//! agent's answers.
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};
use sluice_proto::{AgentMode, Response};

use super::args::Target;

/// An agent answer, or why there is none (the error already rendered).
pub type Answer = Result<Response, String>;

/// Ready means the agent answered `Status` with anything but an error.
pub fn is_ready(status: &Answer) -> bool {
    matches!(status, Ok(r) if !matches!(r, Response::Error { .. }))
}

/// What `sluice status` concludes, and its exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Exit 0: the agent takes endpoints (standalone: it answers; cluster
    /// mode: it has also listed and programmed every kind).
    Ready,
    /// Exit 1: the agent answered, and is not ready (refused, or in
    /// cluster mode not synced yet).
    NotReady,
    /// Exit 3: no answer at all (not running, wrong socket, hung).
    Unreachable,
}

impl Verdict {
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Ready => 0,
            Self::NotReady => 1,
            Self::Unreachable => 3,
        }
    }
}

pub fn verdict(status: &Answer, info: &Answer) -> Verdict {
    match (status, info) {
        (Err(_), _) => Verdict::Unreachable,
        (Ok(Response::Error { .. }), _) => Verdict::NotReady,
        (
            Ok(_),
            Ok(Response::Info {
                mode: AgentMode::Cluster,
                synced: false,
                ..
            }),
        ) => Verdict::NotReady,
        // Standalone, synced, or an agent too old to say: its word.
        (Ok(_), _) => Verdict::Ready,
    }
}

/// The `mode:` line and, standalone, what stands in for `synced:`.
fn mode_lines(info: &Answer) -> (String, Option<String>) {
    match info {
        Ok(Response::Info {
            mode: AgentMode::Standalone,
            ..
        }) => (
            "mode: standalone (no API server: policy only through SetPolicy)".into(),
            Some("synced: n/a (standalone: no API server, nothing to sync)".into()),
        ),
        Ok(Response::Info {
            mode: AgentMode::Cluster,
            node,
            ..
        }) => (
            format!("mode: cluster (node {})", node.as_deref().unwrap_or("?")),
            None,
        ),
        Ok(Response::Error { code, msg, details }) => (
            format!("mode: unknown ({})", agent_error(*code, msg, details)),
            None,
        ),
        Ok(other) => (format!("mode: unknown (unexpected answer {other:?})"), None),
        Err(e) => (format!("mode: unknown ({e})"), None),
    }
}

fn agent_error(code: u32, msg: &str, details: &str) -> String {
    if details.is_empty() {
        format!("agent error {code}: {msg}")
    } else {
        format!("agent error {code}: {msg}: {details}")
    }
}

/// `KIND NAMESPACE/NAME RESOURCEVERSION` (`KIND NAME RV` when cluster-scoped).
pub fn object_line(key: &str, rv: &str) -> String {
    match key.split_once('/') {
        Some((kind, rest)) => format!("{kind} {rest} {rv}"),
        None => format!("{key} - {rv}"),
    }
}

pub fn status_text(status: &Answer, programmed: &Answer, info: &Answer) -> String {
    let ready = match (status, verdict(status, info)) {
        (Ok(Response::Error { code, msg, details }), _) => {
            format!("no ({})", agent_error(*code, msg, details))
        }
        (Err(e), _) => format!("no ({e})"),
        (_, Verdict::NotReady) => "no (not synced with the API server yet)".into(),
        _ => "yes".into(),
    };
    let (mode, standalone_sync) = mode_lines(info);
    let mut lines = vec![format!("ready: {ready}"), mode];
    match programmed {
        Ok(Response::Programmed { synced, objects }) => {
            lines.push(standalone_sync.unwrap_or_else(|| {
                if *synced {
                    "synced: yes".into()
                } else {
                    "synced: no (not every kind listed and programmed yet)".into()
                }
            }));
            lines.push(format!("programmed objects: {}", objects.len()));
            lines.extend(objects.iter().map(|(key, rv)| object_line(key, rv)));
        }
        Ok(Response::Error { code, msg, details }) => {
            lines.push(format!(
                "synced: unknown ({})",
                agent_error(*code, msg, details)
            ));
        }
        Ok(other) => lines.push(format!("synced: unknown (unexpected answer {other:?})")),
        Err(e) => lines.push(format!("synced: unknown ({e})")),
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// `-o json`: both raw answers, `null` where the agent did not answer (the
/// reason in `error`).
pub fn status_json(status: &Answer, programmed: &Answer, info: &Answer) -> Value {
    let raw = |a: &Answer| match a {
        Ok(r) => serde_json::to_value(r).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let mut v = json!({
        "ready": verdict(status, info) == Verdict::Ready,
        "status": raw(status),
        "programmed": raw(programmed),
        "info": raw(info),
    });
    let errors: Vec<&String> = [status, programmed]
        .into_iter()
        .filter_map(|a| a.as_ref().err())
        .collect();
    if let Some(e) = errors.first() {
        v["error"] = json!(e);
    }
    v
}

/// `Kind/rest` keys are equal with the kind compared case-insensitively.
fn same_key(a: &str, b: &str) -> bool {
    match (a.split_once('/'), b.split_once('/')) {
        (Some((ka, ra)), Some((kb, rb))) => ka.eq_ignore_ascii_case(kb) && ra == rb,
        _ => a == b,
    }
}

fn lookup<'a>(objects: &'a BTreeMap<String, String>, key: &str) -> Option<&'a String> {
    objects.get(key).or_else(|| {
        objects
            .iter()
            .find(|(k, _)| same_key(k, key))
            .map(|(_, v)| v)
    })
}

fn name(t: &Target) -> String {
    match t.min_rv {
        Some(rv) => format!("{}@{rv}", t.key),
        None => t.key.clone(),
    }
}

/// What `wait` still waits for, one line each; empty when done. Absence
/// (`gone`) counts only once the agent has synced the cluster: before, it
/// has not listed anything yet.
pub fn unmet(
    targets: &[Target],
    gone: bool,
    synced: bool,
    objects: &BTreeMap<String, String>,
) -> Vec<String> {
    targets
        .iter()
        .filter_map(|t| {
            let have = lookup(objects, &t.key);
            let why = match (gone, have, t.min_rv) {
                (true, Some(rv), _) => format!("still programmed at {rv}"),
                (true, None, _) if !synced => "the agent has not synced the cluster".into(),
                (true, None, _) => return None,
                (false, None, _) => "not programmed".into(),
                (false, Some(_), None) => return None,
                (false, Some(rv), Some(want)) => match rv.parse::<u64>() {
                    Ok(n) if n >= want => return None,
                    Ok(_) => format!("programmed at {rv}"),
                    Err(_) => format!("programmed at {rv:?}, not a number"),
                },
            };
            Some(format!("{}: {why}", name(t)))
        })
        .collect()
}

/// What `wait` still waits for when the agent did not answer.
pub fn unanswered(targets: &[Target], why: &str) -> Vec<String> {
    std::iter::once(format!("(the agent did not answer: {why})"))
        .chain(targets.iter().map(|t| format!("{}: unknown", name(t))))
        .collect()
}

/// What `wait` prints once done: one line per object.
pub fn met(targets: &[Target], gone: bool, objects: &BTreeMap<String, String>) -> Vec<String> {
    targets
        .iter()
        .map(|t| match (gone, lookup(objects, &t.key)) {
            (false, Some(rv)) => format!("{}: programmed at {rv}", t.key),
            _ => format!("{}: gone", t.key),
        })
        .collect()
}

/// A drop (or flow) record as the agent streams it; every field optional
/// so that older or newer agents still print.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Record {
    ktime_ns: Option<u64>,
    verdict: Option<String>,
    reason: Option<String>,
    direction: Option<String>,
    protocol: Option<String>,
    src: Option<String>,
    dst: Option<String>,
    src_port: Option<u16>,
    dst_port: Option<u16>,
    icmp_type: Option<u8>,
    icmp_code: Option<u8>,
    icmp_id: Option<u16>,
    /// `denied by ClusterNetworkPolicy NAME, rule RULE (TIER, priority N)`,
    /// or `denied by default: isolated (DIRECTION) by NetworkPolicy NS/NAME,
    /// ...` for a NetworkPolicy default deny.
    detail: Option<String>,
    src_namespace: Option<String>,
    src_pod: Option<String>,
    dst_namespace: Option<String>,
    dst_pod: Option<String>,
}

/// The two clocks at one moment, to turn the kernel's monotonic
/// timestamps (bpf_ktime_get_ns) into wall-clock time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    pub mono_ns: u64,
    pub unix_ns: u128,
}

/// `HH:MM:SS.mmm` (UTC) of a monotonic timestamp.
pub fn wall_time(ktime_ns: u64, clock: Clock) -> String {
    let ago = u128::from(clock.mono_ns.saturating_sub(ktime_ns));
    let unix_ms = clock.unix_ns.saturating_sub(ago) / 1_000_000;
    let ms = unix_ms % 1000;
    let secs = unix_ms / 1000 % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{ms:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn end(ip: Option<&str>, ns: Option<&str>, pod: Option<&str>) -> String {
    let ip = ip.unwrap_or("?");
    match (ns, pod) {
        (Some(ns), Some(pod)) => format!("{ip}({ns}/{pod})"),
        (None, Some(pod)) => format!("{ip}({pod})"),
        _ => ip.to_string(),
    }
}

/// The human line of one streamed record: time, verdict, direction,
/// src(ns/pod) -> dst(ns/pod), protocol, ports, reason. `None` when the
/// value is not a record.
pub fn observe_line(v: &Value, clock: Clock) -> Option<String> {
    if !v.is_object() {
        return None;
    }
    let r: Record = serde_json::from_value(v.clone()).ok()?;
    let time = r
        .ktime_ns
        .map_or_else(|| "-".to_string(), |t| wall_time(t, clock));
    let v6 = r.protocol.as_deref() == Some("ICMPv6");
    let ports = match (
        r.icmp_type,
        r.src_port.unwrap_or(0),
        r.dst_port.unwrap_or(0),
    ) {
        (Some(t), _, _) => icmp_text(v6, t, r.icmp_code.unwrap_or(0), r.icmp_id),
        (None, 0, 0) => "-".to_string(),
        (None, s, d) => format!("{s}->{d}"),
    };
    let dash = |s: Option<String>| s.filter(|s| !s.is_empty()).unwrap_or_else(|| "-".into());
    // A named ClusterNetworkPolicy rule says more than the reason code.
    let reason = match (r.reason, r.detail.filter(|d| !d.is_empty())) {
        (Some(code), Some(d)) if code == "revoked" => format!("revoked, {d}"),
        (_, Some(d)) => d,
        (code, None) => dash(code),
    };
    Some(format!(
        "{time} {} {} {} -> {} {} {ports} {}",
        dash(r.verdict),
        dash(r.direction),
        end(
            r.src.as_deref(),
            r.src_namespace.as_deref(),
            r.src_pod.as_deref()
        ),
        end(
            r.dst.as_deref(),
            r.dst_namespace.as_deref(),
            r.dst_pod.as_deref()
        ),
        dash(r.protocol),
        reason,
    ))
}

/// `echo-request id=45`, `dest-unreachable(3/1)`: the ICMP (`v6`: ICMPv6)
/// type by name where it has a common one, type/code in numbers otherwise
/// and whenever the code is not 0.
pub fn icmp_text(v6: bool, t: u8, code: u8, id: Option<u16>) -> String {
    let name = match (v6, t) {
        (false, 0) | (true, 129) => Some("echo-reply"),
        (false, 8) | (true, 128) => Some("echo-request"),
        (false, 3) | (true, 1) => Some("dest-unreachable"),
        (false, 11) | (true, 3) => Some("time-exceeded"),
        (false, 12) | (true, 4) => Some("parameter-problem"),
        (false, 5) => Some("redirect"),
        (true, 2) => Some("packet-too-big"),
        (true, 133) => Some("router-solicitation"),
        (true, 134) => Some("router-advertisement"),
        (true, 135) => Some("neighbor-solicitation"),
        (true, 136) => Some("neighbor-advertisement"),
        _ => None,
    };
    let mut s = match name {
        Some(n) if code == 0 => n.to_string(),
        Some(n) => format!("{n}({t}/{code})"),
        None => format!("type={t}/code={code}"),
    };
    if let Some(id) = id {
        s.push_str(&format!(" id={id}"));
    }
    s
}

/// An `Error` response in the stream (the agent refused the request).
pub fn stream_error(v: &Value) -> Option<String> {
    match serde_json::from_value::<Response>(v.clone()) {
        Ok(Response::Error { code, msg, details }) => Some(agent_error(code, &msg, &details)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn target(key: &str, rv: Option<u64>) -> Target {
        Target {
            key: key.into(),
            min_rv: rv,
        }
    }

    fn info(mode: AgentMode, synced: bool) -> Answer {
        Ok(Response::Info {
            mode,
            node: (mode == AgentMode::Cluster).then(|| "node-1".into()),
            synced,
        })
    }

    #[test]
    fn status_lists_readiness_mode_sync_and_objects() {
        let programmed = Ok(Response::Programmed {
            synced: true,
            objects: objects(&[("NetworkPolicy/x/allow-a", "42"), ("Namespace/x", "7")]),
        });
        let cluster = info(AgentMode::Cluster, true);
        let text = status_text(&Ok(Response::Ok), &programmed, &cluster);
        assert_eq!(
            text,
            "ready: yes\nmode: cluster (node node-1)\nsynced: yes\nprogrammed objects: 2\nNamespace x 7\nNetworkPolicy x/allow-a 42\n"
        );
        assert!(is_ready(&Ok(Response::Ok)));
        assert_eq!(verdict(&Ok(Response::Ok), &cluster), Verdict::Ready);

        let refused = Ok(Response::error(50, "permission denied", "uid 1000"));
        let text = status_text(
            &refused,
            &Err("cannot connect".into()),
            &Err("cannot connect".into()),
        );
        assert!(!is_ready(&refused));
        assert_eq!(
            text,
            "ready: no (agent error 50: permission denied: uid 1000)\nmode: unknown (cannot connect)\nsynced: unknown (cannot connect)\n"
        );
        assert_eq!(verdict(&refused, &cluster).exit_code(), 1);

        let gone: Answer = Err("gone".into());
        let v = status_json(&gone, &gone, &gone);
        assert_eq!(
            v,
            json!({"ready": false, "status": null, "programmed": null, "info": null, "error": "gone"})
        );
        assert_eq!(verdict(&gone, &gone).exit_code(), 3);
        let v = status_json(&Ok(Response::Ok), &programmed, &cluster);
        assert_eq!(v["ready"], true);
        assert_eq!(v["status"], json!({"result": "ok"}));
        assert_eq!(v["info"]["mode"], "cluster");
        assert_eq!(v["programmed"]["objects"]["Namespace/x"], "7");
    }

    #[test]
    fn standalone_says_why_there_is_no_sync_and_an_unsynced_cluster_is_not_ready() {
        let nothing = Ok(Response::Programmed {
            synced: false,
            objects: BTreeMap::new(),
        });
        let standalone = info(AgentMode::Standalone, false);
        let text = status_text(&Ok(Response::Ok), &nothing, &standalone);
        assert_eq!(
            text,
            "ready: yes\nmode: standalone (no API server: policy only through SetPolicy)\n\
             synced: n/a (standalone: no API server, nothing to sync)\nprogrammed objects: 0\n"
        );
        assert_eq!(verdict(&Ok(Response::Ok), &standalone).exit_code(), 0);

        let listing = info(AgentMode::Cluster, false);
        let text = status_text(&Ok(Response::Ok), &nothing, &listing);
        assert!(
            text.starts_with("ready: no (not synced with the API server yet)\n"),
            "{text}"
        );
        assert!(text.contains("synced: no (not every kind listed"), "{text}");
        assert_eq!(verdict(&Ok(Response::Ok), &listing).exit_code(), 1);
        // An agent that does not know Info: readiness as it says.
        let old = Ok(Response::error(7, "request is not valid JSON", ""));
        assert_eq!(verdict(&Ok(Response::Ok), &old), Verdict::Ready);
    }

    #[test]
    fn wait_compares_versions_numerically_and_kinds_case_insensitively() {
        let have = objects(&[("NetworkPolicy/x/a", "10"), ("Namespace/x", "9")]);
        let t = |k, rv| vec![target(k, rv)];
        assert!(unmet(&t("NetworkPolicy/x/a", Some(9)), false, true, &have).is_empty());
        assert!(unmet(&t("NetworkPolicy/x/a", Some(10)), false, true, &have).is_empty());
        assert!(unmet(&t("networkpolicy/x/a", None), false, false, &have).is_empty());
        assert!(unmet(&t("Namespace/x", Some(2)), false, true, &have).is_empty());
        assert_eq!(
            unmet(&t("NetworkPolicy/x/a", Some(11)), false, true, &have),
            ["NetworkPolicy/x/a@11: programmed at 10"]
        );
        assert_eq!(
            unmet(&t("Pod/x/p", None), false, true, &have),
            ["Pod/x/p: not programmed"]
        );
        // Several: only the unmet ones are listed.
        let both = vec![target("Namespace/x", None), target("Pod/x/p", Some(3))];
        assert_eq!(
            unmet(&both, false, true, &have),
            ["Pod/x/p@3: not programmed"]
        );
        let odd = objects(&[("Pod/x/p", "abc")]);
        assert_eq!(
            unmet(&t("Pod/x/p", Some(1)), false, true, &odd),
            ["Pod/x/p@1: programmed at \"abc\", not a number"]
        );
        assert_eq!(
            met(&both[..1], false, &have),
            ["Namespace/x: programmed at 9"]
        );
    }

    #[test]
    fn gone_needs_absence_after_the_sync() {
        let have = objects(&[("NetworkPolicy/x/a", "10")]);
        let t = vec![target("Pod/x/p", None)];
        assert!(unmet(&t, true, true, &have).is_empty());
        assert_eq!(
            unmet(&t, true, false, &have),
            ["Pod/x/p: the agent has not synced the cluster"]
        );
        assert_eq!(
            unmet(&[target("NetworkPolicy/x/a", None)], true, true, &have),
            ["NetworkPolicy/x/a: still programmed at 10"]
        );
        assert_eq!(met(&t, true, &have), ["Pod/x/p: gone"]);
        assert_eq!(
            unanswered(&[target("Pod/x/p", Some(2))], "refused"),
            ["(the agent did not answer: refused)", "Pod/x/p@2: unknown"]
        );
    }

    const CLOCK: Clock = Clock {
        // 1000 s after boot at 2024-01-01T12:34:56.789Z.
        mono_ns: 1_000_000_000_000,
        unix_ns: 1_704_112_496_789_000_000,
    };

    #[test]
    fn monotonic_timestamps_become_utc_time_of_day() {
        assert_eq!(wall_time(CLOCK.mono_ns, CLOCK), "12:34:56.789");
        assert_eq!(
            wall_time(CLOCK.mono_ns - 61_500_000_000, CLOCK),
            "12:33:55.289"
        );
        // A timestamp from the future (another clock) is "now".
        assert_eq!(wall_time(u64::MAX, CLOCK), "12:34:56.789");
    }

    #[test]
    fn forwarded_and_would_drop_records_print_their_policy() {
        let rec = json!({
            "verdict": "FORWARDED", "reason": "forwarded", "direction": "ingress",
            "protocol": "TCP", "src": "10.244.1.5", "dst": "10.244.1.9",
            "src_port": 34567, "dst_port": 80,
            "detail": "allowed by NetworkPolicy x/allow-a, rule ingress[0]"
        });
        assert_eq!(
            observe_line(&rec, CLOCK).as_deref(),
            Some(
                "- FORWARDED ingress 10.244.1.5 -> 10.244.1.9 TCP 34567->80 allowed by NetworkPolicy x/allow-a, rule ingress[0]"
            )
        );
        // Forwarded by no rule (not isolated): the reason code.
        let rec = json!({"verdict": "FORWARDED", "reason": "forwarded"});
        assert!(observe_line(&rec, CLOCK).unwrap().ends_with(" forwarded"));
        let rec = json!({"verdict": "WOULD-DROP", "reason": "policy-denied",
            "detail": "would be denied: isolated for ingress by NetworkPolicy x/deny (audit mode)"});
        assert!(
            observe_line(&rec, CLOCK)
                .unwrap()
                .starts_with("- WOULD-DROP - ? -> ? - - would be denied")
        );
    }

    #[test]
    fn records_print_as_one_compact_line() {
        let rec = json!({
            "ktime_ns": CLOCK.mono_ns, "verdict": "DROPPED", "reason": "policy",
            "direction": "ingress", "ep_id": 3, "peer_identity": 9, "protocol": "TCP",
            "src": "10.244.1.5", "dst": "10.244.1.9", "src_port": 34567, "dst_port": 80,
            "length": 60, "src_namespace": "x", "src_pod": "client",
            "dst_namespace": "x", "dst_pod": "web"
        });
        assert_eq!(
            observe_line(&rec, CLOCK).as_deref(),
            Some(
                "12:34:56.789 DROPPED ingress 10.244.1.5(x/client) -> 10.244.1.9(x/web) TCP 34567->80 policy"
            )
        );
        // Unknown ends and ICMP without ports; unknown fields are ignored.
        let rec = json!({"verdict": "DROPPED", "direction": "egress", "protocol": "ICMP",
            "src": "10.244.1.5", "src_namespace": "x", "src_pod": "client",
            "dst": "192.0.2.1", "src_port": 0, "dst_port": 0, "future": [1]});
        assert_eq!(
            observe_line(&rec, CLOCK).as_deref(),
            Some("- DROPPED egress 10.244.1.5(x/client) -> 192.0.2.1 ICMP - -")
        );
        // A named ClusterNetworkPolicy rule replaces the reason code.
        let d =
            "denied by ClusterNetworkPolicy block-metadata, rule deny-imds (Admin, priority 10)";
        let rec = json!({"reason": "admin-denied", "detail": d});
        assert!(
            observe_line(&rec, CLOCK)
                .unwrap()
                .ends_with(&format!(" - {d}"))
        );
        let rec = json!({"reason": "revoked", "detail": d});
        assert!(
            observe_line(&rec, CLOCK)
                .unwrap()
                .ends_with(&format!(" revoked, {d}"))
        );
        // A NetworkPolicy default deny names the policies isolating the
        // endpoint.
        let d = "denied by default: isolated (ingress) by NetworkPolicy x/deny-all, x/web";
        let rec = json!({"verdict": "DROPPED", "direction": "ingress", "protocol": "TCP",
            "src": "10.244.1.5", "dst": "10.244.1.9", "src_port": 34567, "dst_port": 80,
            "dst_namespace": "x", "dst_pod": "web", "reason": "policy-denied", "detail": d,
            "isolated_by": {"kind": "NetworkPolicy", "policies": ["x/deny-all", "x/web"],
                            "more": 0}});
        assert_eq!(
            observe_line(&rec, CLOCK).as_deref(),
            Some(
                "- DROPPED ingress 10.244.1.5 -> 10.244.1.9(x/web) TCP 34567->80 denied by default: isolated (ingress) by NetworkPolicy x/deny-all, x/web"
            )
        );
        assert_eq!(observe_line(&json!([1]), CLOCK), None);
        assert_eq!(observe_line(&json!({"src_port": "x"}), CLOCK), None);
    }

    #[test]
    fn icmp_prints_type_code_and_echo_id_not_ports() {
        let line = |v: Value| observe_line(&v, CLOCK).unwrap();
        let rec = json!({"verdict": "DROPPED", "direction": "ingress", "protocol": "ICMP",
            "src": "10.244.1.5", "dst": "10.244.1.9", "src_port": 0, "dst_port": 0,
            "icmp_type": 8, "icmp_code": 0, "icmp_id": 45, "reason": "policy-denied"});
        assert_eq!(
            line(rec),
            "- DROPPED ingress 10.244.1.5 -> 10.244.1.9 ICMP echo-request id=45 policy-denied"
        );
        let rec = json!({"protocol": "ICMPv6", "src": "fd00::5", "dst": "fd00::9",
            "icmp_type": 129, "icmp_code": 0, "icmp_id": 7});
        assert!(line(rec).contains("ICMPv6 echo-reply id=7"));
        let rec = json!({"protocol": "ICMP", "icmp_type": 3, "icmp_code": 13});
        assert!(line(rec).contains("ICMP dest-unreachable(3/13) -"));
        let rec = json!({"protocol": "ICMPv6", "icmp_type": 200, "icmp_code": 1});
        assert!(line(rec).contains("ICMPv6 type=200/code=1 -"));
        // v4 type 0 is an echo reply, v6 type 1 unreachable: the family
        // decides the name.
        assert_eq!(icmp_text(true, 1, 0, None), "dest-unreachable");
        assert_eq!(icmp_text(false, 1, 0, None), "type=1/code=0");
    }

    #[test]
    fn an_error_in_the_stream_is_recognised() {
        let e = serde_json::to_value(Response::error(50, "permission denied", "")).unwrap();
        assert_eq!(
            stream_error(&e).as_deref(),
            Some("agent error 50: permission denied")
        );
        assert_eq!(stream_error(&json!({"verdict": "DROPPED"})), None);
    }
}
