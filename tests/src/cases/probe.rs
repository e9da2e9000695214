//! `probe` steps (docs/conformance.md): single (from, to, protocol, port)
//! probes, one a line.
use anyhow::{Context as _, Result, bail, ensure};

use super::Protocol;

/// One probe of a `probe` step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// `ns/pod` of the client.
    pub from: String,
    /// `ns/pod` of the server; the probe connects to its address (a
    /// host-network pod's address is its node's).
    pub to: String,
    pub protocol: Protocol,
    pub port: u16,
    /// `true` = the connection must succeed.
    pub connects: bool,
}

impl Probe {
    /// The text form: one probe per line, `<from> <to> <PROTOCOL> <port>
    /// <. or X>`; blank lines and `#` comments are skipped.
    pub fn parse_lines(text: &str) -> Result<Vec<Self>> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let t: Vec<&str> = line.split_whitespace().collect();
            let [from, to, protocol, port, result] = t[..] else {
                bail!(
                    "probe line {}: want <from> <to> <protocol> <port> <.|X>, got {line:?}",
                    i + 1
                );
            };
            for p in [from, to] {
                ensure!(
                    p.split_once('/')
                        .is_some_and(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/')),
                    "probe line {}: {p:?} is not ns/pod",
                    i + 1
                );
            }
            ensure!(
                from != to,
                "probe line {}: a pod to itself is outside policy",
                i + 1
            );
            let protocol = match protocol {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                "SCTP" => Protocol::Sctp,
                other => bail!(
                    "probe line {}: protocol {other:?} is not TCP, UDP or SCTP",
                    i + 1
                ),
            };
            let port: u16 = port
                .parse()
                .ok()
                .filter(|&p| p != 0)
                .with_context(|| format!("probe line {}: port {port:?}", i + 1))?;
            let connects = match result {
                "." => true,
                "X" => false,
                other => bail!(
                    "probe line {}: result {other:?} is neither '.' nor 'X'",
                    i + 1
                ),
            };
            out.push(Self {
                from: from.to_owned(),
                to: to.to_owned(),
                protocol,
                port,
                connects,
            });
        }
        ensure!(!out.is_empty(), "a probe step needs at least one probe");
        Ok(out)
    }

    /// The text form of one probe with its actual result: the line as the
    /// case writes it, then `got .` or `got X`.
    pub fn describe(&self, actual: bool) -> String {
        let mark = |b: bool| if b { "." } else { "X" };
        format!(
            "{} -> {} {} {}: expected {}, got {}",
            self.from,
            self.to,
            self.protocol.name(),
            self.port,
            mark(self.connects),
            mark(actual)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cases::{Model, Step, Target, parse_case};

    #[test]
    fn probe_lines_parse_with_comments_and_blank_lines() {
        let p = Probe::parse_lines(
            "# a comment\n\nns-a/p-0 ns-b/p-1 TCP 80 .   # trailing\n  ns-a/p-1 ns-b/p-1 UDP 53 X\nns-a/p-0 ns-b/p-1 SCTP 9003 X\n",
        )
        .unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(
            p[0],
            Probe {
                from: "ns-a/p-0".into(),
                to: "ns-b/p-1".into(),
                protocol: Protocol::Tcp,
                port: 80,
                connects: true,
            }
        );
        assert_eq!(
            (p[1].protocol, p[1].port, p[1].connects),
            (Protocol::Udp, 53, false)
        );
        assert_eq!(p[2].protocol, Protocol::Sctp);
        assert_eq!(
            p[1].describe(true),
            "ns-a/p-1 -> ns-b/p-1 UDP 53: expected X, got ."
        );
    }

    #[test]
    fn bad_probe_lines_are_errors_that_name_the_line() {
        for (text, want) in [
            ("a/b c/d TCP 80", "line 1"),
            ("a/b c/d TCP 80 . extra", "line 1"),
            ("a/b\nc/d TCP 80 .", "line 1"),
            (
                "a/b c/d TCP 80 .\nab c/d TCP 80 .",
                "line 2: \"ab\" is not ns/pod",
            ),
            ("a/b a/b TCP 80 .", "itself"),
            ("a/b c/d ICMP 80 .", "protocol"),
            ("a/b c/d TCP 0 .", "port"),
            ("a/b c/d TCP 65536 .", "port"),
            ("a/b c/d TCP 80 ok", "neither"),
            ("# only a comment", "at least one probe"),
        ] {
            let e = format!("{:#}", Probe::parse_lines(text).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    const CNP_CASE: &str = r#"
name: "cnp"
model: cnp
target: pod
steps:
  - apply: |
      apiVersion: policy.networking.k8s.io/v1alpha2
      kind: ClusterNetworkPolicy
      metadata:
        name: deny
      spec:
        tier: Admin
        priority: 5
        subject:
          namespaces: {}
        ingress:
        - action: Deny
          from:
          - namespaces: {}
  - subtest: "first"
  - probe: |
      n/a m/b TCP 80 X
  - subtest: "second"
  - delete: |
      apiVersion: policy.networking.k8s.io/v1alpha2
      kind: ClusterNetworkPolicy
      metadata:
        name: deny
  - probe: |
      n/a m/b TCP 80 .
"#;

    #[test]
    fn a_cnp_case_has_subtests_probes_and_cluster_scoped_policies() {
        let c = parse_case(CNP_CASE).unwrap();
        assert_eq!((c.model, c.target), (Model::Cnp, Target::Pod));
        assert!(matches!(&c.steps[1], Step::Subtest(n) if n == "first"));
        assert!(matches!(&c.steps[2], Step::Probe(p) if !p[0].connects));
        let Step::Apply(text) = &c.steps[0] else {
            panic!("not apply")
        };
        let objs = crate::cases::parse_objects(text).unwrap();
        let key = objs[0].key();
        assert_eq!(key.kind, crate::cases::Kind::ClusterNetworkPolicy);
        assert_eq!((key.namespace.as_str(), key.name.as_str()), ("", "deny"));
        let Step::Delete(text) = &c.steps[4] else {
            panic!("not delete")
        };
        assert_eq!(crate::cases::parse_refs(text).unwrap(), vec![key]);
    }

    #[test]
    fn a_cnp_case_must_probe_pods_and_a_step_has_exactly_one_key() {
        // The cnp model has no Services.
        let any = CNP_CASE.replace("target: pod\n", "");
        let e = format!("{:#}", parse_case(&any).unwrap_err());
        assert!(e.contains("target: pod"), "{e}");
        let two = CNP_CASE.replace(
            "  - subtest: \"first\"\n",
            "  - subtest: \"first\"\n    probe: \"n/a m/b TCP 80 X\"\n",
        );
        let e = format!("{:#}", parse_case(&two).unwrap_err());
        assert!(e.contains("exactly one of"), "{e}");
        let empty = CNP_CASE.replace("subtest: \"first\"", "subtest: \" \"");
        assert!(parse_case(&empty).is_err());
        // A cluster-scoped object names no namespace.
        let namespaced = CNP_CASE.replace(
            "  name: deny\n      spec",
            "  name: deny\n        namespace: n\n      spec",
        );
        let c = parse_case(&namespaced).unwrap();
        let Step::Apply(text) = &c.steps[0] else {
            panic!("not apply")
        };
        assert!(crate::cases::parse_objects(text).is_err());
    }
}
