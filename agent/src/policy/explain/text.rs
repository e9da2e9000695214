//! An [`Explanation`] as text: the verdict on the first line, then per
//! direction the tiers in order with every rule that selects the pod, what
//! matched, or why not.
use std::fmt::Write as _;

use super::{CnpRuleCheck, DecidedBy, End, Explanation, Side};

fn end(e: &End) -> String {
    match &e.pod {
        Some(p) => format!("{p} ({})", e.address),
        None => e.address.to_string(),
    }
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

fn decided(side: &Side, dir: &str) -> String {
    match &side.decided_by {
        DecidedBy::Cluster {
            tier,
            policy,
            rule,
            action,
        } => format!(
            "by {} ClusterNetworkPolicy {policy} rule {rule} ({action})",
            tier.name()
        ),
        DecidedBy::NetworkPolicy { policy, rule } => {
            format!("by NetworkPolicy {policy} {rule}")
        }
        DecidedBy::Isolation { policies } => format!(
            "{} is isolated for {dir} by {} and no rule of theirs allows this flow",
            side.pod,
            policies.join(", ")
        ),
        DecidedBy::Default => format!(
            "nothing isolates {} for {dir} and no ClusterNetworkPolicy rule decides",
            side.pod
        ),
        DecidedBy::FailClosed { reason } => {
            format!("fail closed: the endpoint's policy cannot be programmed ({reason})")
        }
    }
}

fn cnp_rules(out: &mut String, tier: &str, rules: &[CnpRuleCheck], pod: &str) {
    if rules.is_empty() {
        let _ = writeln!(out, "    {tier}: no rule of this direction selects {pod}");
        return;
    }
    let _ = writeln!(out, "    {tier}:");
    for r in rules {
        let mark = if r.decides { "=> " } else { "- " };
        let _ = write!(
            out,
            "      {mark}{} (priority {}) rule {} [{}]: ",
            r.policy, r.priority, r.rule, r.action
        );
        match &r.matched {
            Some(m) => {
                let _ = writeln!(out, "matches {} on {}", m.peer, m.port);
            }
            None => {
                let _ = writeln!(out, "no match");
                for w in &r.why_not {
                    let _ = writeln!(out, "          {w}");
                }
            }
        }
    }
}

fn side(out: &mut String, dir: &str, s: &Side) {
    let here = if s.enforced_here {
        ""
    } else {
        " (not enforced on this node)"
    };
    let _ = writeln!(
        out,
        "  {dir} at {}{here}: {}, {}",
        s.pod,
        verdict(s.allowed),
        decided(s, dir)
    );
    cnp_rules(out, "Admin", &s.admin, &s.pod);
    let np = &s.network_policy;
    if np.isolated {
        let _ = writeln!(
            out,
            "    NetworkPolicy: {} is isolated for {dir} by:",
            s.pod
        );
        for p in &np.policies {
            if p.rules.is_empty() {
                let _ = writeln!(out, "      - {} (no {dir} rules: allows nothing)", p.policy);
            }
            for r in &p.rules {
                match &r.matched {
                    Some(m) => {
                        let _ = writeln!(
                            out,
                            "      - {} {}: allows {} on {}",
                            p.policy, r.rule, m.peer, m.port
                        );
                    }
                    None => {
                        let _ = writeln!(out, "      - {} {}: no match", p.policy, r.rule);
                        for w in &r.why_not {
                            let _ = writeln!(out, "          {w}");
                        }
                    }
                }
            }
        }
    } else {
        let _ = writeln!(
            out,
            "    NetworkPolicy: no policy selects {} for {dir} (not isolated)",
            s.pod
        );
    }
    cnp_rules(out, "Baseline", &s.baseline, &s.pod);
}

/// The explanation as readable text, ending with a newline.
pub fn render(e: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} -> {} {}/{}: {}",
        end(&e.from),
        end(&e.to),
        e.protocol,
        e.port,
        verdict(e.allowed).to_uppercase()
    );
    match &e.egress {
        Some(s) => side(&mut out, "egress", s),
        None => {
            let _ = writeln!(out, "  egress: the source is no pod, nothing to judge");
        }
    }
    match &e.ingress {
        Some(s) => side(&mut out, "ingress", s),
        None => {
            let _ = writeln!(
                out,
                "  ingress: the destination is no pod, nothing to judge"
            );
        }
    }
    for n in &e.notes {
        let _ = writeln!(out, "  note: {n}");
    }
    out
}
