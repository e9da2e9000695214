//! An [`Explanation`] as text: the verdict on the first line, then per
//! direction the tiers in order with every rule that selects the pod, what
//! matched, or why not.

use super::{CnpRuleCheck, DecidedBy, End, Explanation, Side};

fn line(out: &mut String, text: String) {
    out.extend([text, "\n".to_owned()]);
}

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
        line(
            out,
            format!("    {tier}: no rule of this direction selects {pod}"),
        );
        return;
    }
    line(out, format!("    {tier}:"));
    for r in rules {
        let mark = if r.decides { "=> " } else { "- " };
        out.push_str(&format!(
            "      {mark}{} (priority {}) rule {} [{}]: ",
            r.policy, r.priority, r.rule, r.action
        ));
        match &r.matched {
            Some(m) => {
                line(out, format!("matches {} on {}", m.peer, m.port));
            }
            None => {
                line(out, "no match".into());
                for w in &r.why_not {
                    line(out, format!("          {w}"));
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
    line(
        out,
        format!(
            "  {dir} at {}{here}: {}, {}",
            s.pod,
            verdict(s.allowed),
            decided(s, dir)
        ),
    );
    cnp_rules(out, "Admin", &s.admin, &s.pod);
    let np = &s.network_policy;
    if np.isolated {
        line(
            out,
            format!("    NetworkPolicy: {} is isolated for {dir} by:", s.pod),
        );
        for p in &np.policies {
            if p.rules.is_empty() {
                line(
                    out,
                    format!("      - {} (no {dir} rules: allows nothing)", p.policy),
                );
            }
            for r in &p.rules {
                match &r.matched {
                    Some(m) => {
                        line(
                            out,
                            format!(
                                "      - {} {}: allows {} on {}",
                                p.policy, r.rule, m.peer, m.port
                            ),
                        );
                    }
                    None => {
                        line(out, format!("      - {} {}: no match", p.policy, r.rule));
                        for w in &r.why_not {
                            line(out, format!("          {w}"));
                        }
                    }
                }
            }
        }
    } else {
        line(
            out,
            format!(
                "    NetworkPolicy: no policy selects {} for {dir} (not isolated)",
                s.pod
            ),
        );
    }
    cnp_rules(out, "Baseline", &s.baseline, &s.pod);
}

/// The explanation as readable text, ending with a newline.
pub fn render(e: &Explanation) -> String {
    let mut out = String::new();
    line(
        &mut out,
        format!(
            "{} -> {} {}/{}: {}",
            end(&e.from),
            end(&e.to),
            e.protocol,
            e.port,
            verdict(e.allowed).to_uppercase()
        ),
    );
    match &e.egress {
        Some(s) => side(&mut out, "egress", s),
        None => {
            line(
                &mut out,
                "  egress: the source is no pod, nothing to judge".into(),
            );
        }
    }
    match &e.ingress {
        Some(s) => side(&mut out, "ingress", s),
        None => {
            line(
                &mut out,
                "  ingress: the destination is no pod, nothing to judge".into(),
            );
        }
    }
    for n in &e.notes {
        line(&mut out, format!("  note: {n}"));
    }
    out
}
