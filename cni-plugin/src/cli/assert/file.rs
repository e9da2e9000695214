//! The assertion file of `sluice assert` (docs/assert.md): a list of
//! tests, each a source, a target, a port and protocol and the expected
//! result. Pure: text in, tests or the first problem out.
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

/// Probe timeout when a test gives none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    tests: Vec<RawTest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    #[serde(default)]
    name: Option<String>,
    from: RawFrom,
    to: String,
    port: u16,
    #[serde(default)]
    protocol: Option<String>,
    expect: String,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawFrom {
    Pod(String),
    Selector(RawSelector),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelector {
    namespace: String,
    /// matchLabels: every pod carrying all of them.
    #[serde(default)]
    selector: BTreeMap<String, String>,
    /// Only the first N matching pods (by namespace/name).
    #[serde(default)]
    first: Option<usize>,
}

/// Where a test's probes start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum From {
    /// One pod, `namespace/name`.
    Pod(String),
    /// Every pod of `namespace` carrying all of `labels` (or the first
    /// `first` of them by name), wherever it runs.
    Selector {
        namespace: String,
        labels: BTreeMap<String, String>,
        first: Option<usize>,
    },
}

impl fmt::Display for From {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            From::Pod(p) => f.write_str(p),
            From::Selector {
                namespace, labels, ..
            } => {
                let sel: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "{namespace}/{{{}}}", sel.join(","))
            }
        }
    }
}

/// What a test connects to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum To {
    /// `namespace/name`: the pod's address.
    Pod(String),
    /// `svc/namespace/name`: its ClusterIP.
    Service(String),
    Address(IpAddr),
    /// Resolved where `sluice assert` runs.
    Dns(String),
}

impl To {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self::Address(ip));
        }
        let two = |rest: &str| matches!(rest.split_once('/'), Some((ns, n)) if !ns.is_empty() && !n.is_empty() && !n.contains('/'));
        if let Some(rest) = s.strip_prefix("svc/") {
            return if two(rest) {
                Ok(Self::Service(s.to_owned()))
            } else {
                Err(format!("to: {s:?}: expected svc/NAMESPACE/NAME"))
            };
        }
        if s.contains('/') {
            return if two(s) {
                Ok(Self::Pod(s.to_owned()))
            } else {
                Err(format!("to: {s:?}: expected NAMESPACE/POD"))
            };
        }
        let dns_ok = !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if dns_ok {
            Ok(Self::Dns(s.to_owned()))
        } else {
            Err(format!(
                "to: {s:?}: not NAMESPACE/POD, svc/NAMESPACE/NAME, a DNS name or an address"
            ))
        }
    }
}

impl fmt::Display for To {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            To::Pod(s) | To::Service(s) | To::Dns(s) => f.write_str(s),
            To::Address(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            To::Address(ip) => write!(f, "{ip}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

/// One test of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Test {
    pub name: Option<String>,
    pub from: From,
    pub to: To,
    pub port: u16,
    pub protocol: Proto,
    /// Expected open (true) or closed.
    pub expect_open: bool,
    pub timeout: Duration,
}

/// Parses an assertion file; the error names the test (1-based) and what
/// is wrong with it.
pub fn parse(text: &str) -> Result<Vec<Test>, String> {
    let raw: Raw = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    if raw.tests.is_empty() {
        return Err("tests: the file holds no test".into());
    }
    raw.tests
        .into_iter()
        .enumerate()
        .map(|(i, t)| test(t).map_err(|e| format!("test {}: {e}", i + 1)))
        .collect()
}

fn test(t: RawTest) -> Result<Test, String> {
    let from = match t.from {
        RawFrom::Pod(p) => match p.split_once('/') {
            Some((ns, n)) if !ns.is_empty() && !n.is_empty() && !n.contains('/') => From::Pod(p),
            _ => {
                return Err(format!(
                    "from: {p:?}: expected NAMESPACE/POD or {{namespace, selector}}"
                ));
            }
        },
        RawFrom::Selector(s) => {
            if s.namespace.is_empty() {
                return Err("from: namespace must not be empty".into());
            }
            if s.first == Some(0) {
                return Err("from: first must be at least 1".into());
            }
            From::Selector {
                namespace: s.namespace,
                labels: s.selector,
                first: s.first,
            }
        }
    };
    if t.port == 0 {
        return Err("port: must be 1-65535".into());
    }
    let protocol = match t
        .protocol
        .as_deref()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        None | Some("TCP") => Proto::Tcp,
        Some("UDP") => Proto::Udp,
        Some(other) => return Err(format!("protocol: {other:?}: TCP or UDP")),
    };
    let expect_open = match t.expect.to_ascii_lowercase().as_str() {
        "open" => true,
        "closed" => false,
        other => return Err(format!("expect: {other:?}: open or closed")),
    };
    let timeout = match t.timeout.as_deref() {
        None => DEFAULT_TIMEOUT,
        Some(s) => {
            super::super::args::parse_duration(s).map_err(|e| format!("timeout: {s:?}: {e}"))?
        }
    };
    if timeout.is_zero() || timeout > Duration::from_secs(60) {
        return Err("timeout: between 1ms and 60s".into());
    }
    Ok(Test {
        name: t.name.filter(|n| !n.is_empty()),
        from,
        to: To::parse(&t.to)?,
        port: t.port,
        protocol,
        expect_open,
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_source_and_target_parses() {
        let text = r#"
tests:
  - name: front reaches web
    from: x/a
    to: svc/y/web
    port: 80
    expect: open
  - from: {namespace: x, selector: {app: front, tier: web}, first: 2}
    to: y/db
    port: 5432
    protocol: tcp
    expect: closed
    timeout: 250ms
  - from: x/a
    to: kube-dns.kube-system.svc.cluster.local
    port: 53
    protocol: UDP
    expect: open
  - from: x/a
    to: fd00::1
    port: 443
    expect: CLOSED
"#;
        let t = parse(text).unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(
            t[0],
            Test {
                name: Some("front reaches web".into()),
                from: From::Pod("x/a".into()),
                to: To::Service("svc/y/web".into()),
                port: 80,
                protocol: Proto::Tcp,
                expect_open: true,
                timeout: DEFAULT_TIMEOUT,
            }
        );
        assert_eq!(
            t[1].from,
            From::Selector {
                namespace: "x".into(),
                labels: [
                    ("app".into(), "front".into()),
                    ("tier".into(), "web".into())
                ]
                .into(),
                first: Some(2),
            }
        );
        assert_eq!(t[1].from.to_string(), "x/{app=front,tier=web}");
        assert_eq!(t[1].to, To::Pod("y/db".into()));
        assert_eq!(t[1].timeout, Duration::from_millis(250));
        assert!(!t[1].expect_open);
        assert_eq!(
            t[2].to,
            To::Dns("kube-dns.kube-system.svc.cluster.local".into())
        );
        assert_eq!(t[2].protocol, Proto::Udp);
        assert_eq!(t[3].to.to_string(), "[fd00::1]");
        assert!(!t[3].expect_open);
    }

    #[test]
    fn mistakes_name_the_test_and_the_field() {
        let one = |body: &str| parse(&format!("tests:\n  - {body}\n")).unwrap_err();
        let base = "from: x/a\n    to: x/b\n    port: 80\n    expect: open";
        assert!(parse(&format!("tests:\n  - {base}\n")).is_ok());
        for (body, want) in [
            (base.replace("open", "maybe"), "test 1: expect: \"maybe\""),
            (base.replace("80", "0"), "test 1: port"),
            (base.replace("x/a", "a"), "test 1: from: \"a\""),
            (base.replace("x/b", "x/b/c"), "test 1: to: \"x/b/c\""),
            (
                base.replace("x/b", "svc/web"),
                "expected svc/NAMESPACE/NAME",
            ),
            (
                base.replace("x/b", "not a name"),
                "a DNS name or an address",
            ),
            (format!("{base}\n    protocol: SCTP"), "protocol: \"SCTP\""),
            (format!("{base}\n    timeout: soon"), "timeout: \"soon\""),
            (format!("{base}\n    timeout: 2m"), "between 1ms and 60s"),
            (
                format!("{base}\n    expected: open"),
                "unknown field `expected`",
            ),
            (
                base.replace("x/a", "{namespace: x, first: 0}"),
                "first must be at least 1",
            ),
        ] {
            let e = one(&body);
            assert!(e.contains(want), "{body}: {e}");
        }
        assert!(parse("tests: []").unwrap_err().contains("no test"));
        assert!(parse("test: []").is_err());
    }
}
