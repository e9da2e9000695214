//! The results of `sluice assert` as TAP version 13 or JSON. Pure.
use serde::Serialize;
use serde_json::json;

use super::file::{Proto, Test, To};

/// What one probe (one source pod of one test) came to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Got {
    Open,
    Closed,
    /// The probe could not run (no such pod, on no agent asked, a target
    /// that does not resolve): a failure whatever was expected.
    Error,
}

/// One TAP test point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Point {
    /// The source pod (`ns/name`), or the test's source when it named none.
    pub from: String,
    pub test: Test,
    pub got: Got,
    /// The address probed, when there was one.
    pub address: Option<String>,
    /// What happened, in words (the agent's, or why it could not run).
    pub detail: String,
}

impl Point {
    pub fn ok(&self) -> bool {
        match self.got {
            Got::Open => self.test.expect_open,
            Got::Closed => !self.test.expect_open,
            Got::Error => false,
        }
    }

    /// `x/a -> svc/y/web:80 open`, `x/a -> y/dns:53/UDP closed`.
    pub fn description(&self) -> String {
        let t = &self.test;
        let proto = match t.protocol {
            Proto::Tcp => "",
            Proto::Udp => "/UDP",
        };
        let mut s = format!(
            "{} -> {}:{}{proto} {}",
            self.from,
            t.to,
            t.port,
            expected(t)
        );
        if let Some(n) = &t.name {
            // `#` would start a TAP directive.
            s.push_str(&format!(" ({})", n.replace('#', "")));
        }
        s
    }
}

fn expected(t: &Test) -> &'static str {
    if t.expect_open { "open" } else { "closed" }
}

fn got_word(g: &Got) -> &'static str {
    match g {
        Got::Open => "open",
        Got::Closed => "closed",
        Got::Error => "an error",
    }
}

/// `# N tests, P passed, F failed`.
pub fn summary(points: &[Point]) -> String {
    let passed = points.iter().filter(|p| p.ok()).count();
    format!(
        "{} tests, {passed} passed, {} failed",
        points.len(),
        points.len() - passed
    )
}

/// TAP version 13: the plan, one line per point (a failure followed by a
/// YAML block with the address and what happened), and a summary comment.
pub fn tap(points: &[Point]) -> String {
    let mut out = format!("TAP version 13\n1..{}\n", points.len());
    for (i, p) in points.iter().enumerate() {
        let n = i + 1;
        if p.ok() {
            out.push_str(&format!("ok {n} - {}\n", p.description()));
            continue;
        }
        out.push_str(&format!(
            "not ok {n} - {} # expected {}, got {}\n",
            p.description(),
            expected(&p.test),
            got_word(&p.got)
        ));
        out.push_str("  ---\n");
        if let Some(a) = &p.address {
            out.push_str(&format!("  address: {}\n", yaml_scalar(a)));
        }
        out.push_str(&format!("  detail: {}\n", yaml_scalar(&p.detail)));
        out.push_str("  ...\n");
    }
    out.push_str(&format!("# {}\n", summary(points)));
    out
}

/// A string as a YAML scalar on one line (JSON strings are YAML).
fn yaml_scalar(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The same as JSON: every point, and the counts.
pub fn json(points: &[Point]) -> String {
    let tests: Vec<serde_json::Value> = points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({
                "n": i + 1,
                "ok": p.ok(),
                "name": p.test.name,
                "from": p.from,
                "to": to_text(&p.test.to),
                "port": p.test.port,
                "protocol": p.test.protocol.as_str(),
                "expect": expected(&p.test),
                "got": p.got,
                "address": p.address,
                "detail": p.detail,
            })
        })
        .collect();
    let passed = points.iter().filter(|p| p.ok()).count();
    let v = json!({
        "tests": tests,
        "total": points.len(),
        "passed": passed,
        "failed": points.len() - passed,
    });
    format!("{v:#}\n")
}

fn to_text(t: &To) -> String {
    match t {
        To::Address(ip) => ip.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::file::{DEFAULT_TIMEOUT, From, parse};
    use super::*;

    fn point(test: &Test, from: &str, got: Got, address: &str, detail: &str) -> Point {
        Point {
            from: from.into(),
            test: test.clone(),
            got,
            address: Some(address.into()),
            detail: detail.into(),
        }
    }

    #[test]
    fn tap_names_each_point_and_explains_failures() {
        let t = parse(
            "tests:\n\
             - {from: x/a, to: svc/y/web, port: 80, expect: open}\n\
             - {from: x/c, to: x/b, port: 80, expect: closed, name: 'no #c'}\n\
             - {from: x/c, to: fd00::2, port: 53, protocol: UDP, expect: open}\n",
        )
        .unwrap();
        let points = vec![
            point(&t[0], "x/a", Got::Open, "10.96.0.10", "connected"),
            point(&t[1], "x/c", Got::Closed, "10.0.0.2", "timed out"),
            point(&t[1], "x/d", Got::Open, "10.0.0.2", "connected"),
            point(&t[2], "x/c", Got::Closed, "fd00::2", "timed out"),
            Point {
                from: "x/{app=gone}".into(),
                test: t[0].clone(),
                got: Got::Error,
                address: None,
                detail: "no pod matches".into(),
            },
        ];
        assert_eq!(
            tap(&points),
            "TAP version 13\n\
             1..5\n\
             ok 1 - x/a -> svc/y/web:80 open\n\
             ok 2 - x/c -> x/b:80 closed (no c)\n\
             not ok 3 - x/d -> x/b:80 closed (no c) # expected closed, got open\n\
             \x20 ---\n\
             \x20 address: \"10.0.0.2\"\n\
             \x20 detail: \"connected\"\n\
             \x20 ...\n\
             not ok 4 - x/c -> [fd00::2]:53/UDP open # expected open, got closed\n\
             \x20 ---\n\
             \x20 address: \"fd00::2\"\n\
             \x20 detail: \"timed out\"\n\
             \x20 ...\n\
             not ok 5 - x/{app=gone} -> svc/y/web:80 open # expected open, got an error\n\
             \x20 ---\n\
             \x20 detail: \"no pod matches\"\n\
             \x20 ...\n\
             # 5 tests, 2 passed, 3 failed\n"
        );
        let v: serde_json::Value = serde_json::from_str(&json(&points)).unwrap();
        assert_eq!(
            (v["total"].clone(), v["passed"].clone(), v["failed"].clone()),
            (json!(5), json!(2), json!(3))
        );
        assert_eq!(
            v["tests"][3],
            json!({"n": 4, "ok": false, "name": null, "from": "x/c", "to": "fd00::2",
                   "port": 53, "protocol": "UDP", "expect": "open", "got": "closed",
                   "address": "fd00::2", "detail": "timed out"})
        );
        assert_eq!(v["tests"][4]["got"], "error");
    }

    #[test]
    fn an_all_passing_run_says_so() {
        let test = Test {
            name: None,
            from: From::Pod("x/a".into()),
            to: To::Address("10.0.0.1".parse().unwrap()),
            port: 443,
            protocol: Proto::Tcp,
            expect_open: false,
            timeout: DEFAULT_TIMEOUT,
        };
        let p = point(&test, "x/a", Got::Closed, "10.0.0.1", "refused");
        assert_eq!(
            tap(&[p]),
            "TAP version 13\n1..1\nok 1 - x/a -> 10.0.0.1:443 closed\n# 1 tests, 1 passed, 0 failed\n"
        );
    }
}
