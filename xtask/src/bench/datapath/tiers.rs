//! `bench datapath`, ClusterNetworkPolicy rows (issue 12): the same
//! endpoint with its ingress tiered (`EP_INGRESS_TIERED`) and CNP entries
//! among its 1, 1,000 and 100,000 POLICY entries: every other entry but the
//! peer's carries an Admin or Baseline value, and the peer identity has an
//! any-protocol Admin Pass entry (one more entry) that every packet from it
//! hits, so the fold has work to do. Every size announces the same lookup
//! classes (port prefix lengths, any-peer, CIDR group; `Datapath::setup`),
//! so a denied new flow does the same lookups at each and only the number
//! of entries differs. Measured:
//! - a new flow, denied (Admin Pass, then the NetworkPolicy isolation
//!   denies it: the whole lookup order, folded), against `noop` in turn;
//!   the target: the three sizes within 1.2x of each other;
//! - an established flow: it must cost what the untiered one costs (the
//!   established path pays nothing more).
use std::path::Path;

use anyhow::{Result, bail};
use aya::maps::{HashMap, MapData};
use sluice_common::{
    DIR_INGRESS, POLICY_ADMIN, POLICY_ADMIN_ACTION_SHIFT, POLICY_BASELINE, POLICY_BASELINE_DENY,
    PolicyKey, PolicyValue, RULE_CNP_FLAG, action, programs,
};

use super::{Args, Datapath, Stat, reply, stat, stat_row, syn};

/// The value of the `i`th other entry at a tiered endpoint: every other one
/// a ClusterNetworkPolicy's (Admin Deny or Pass, Baseline Deny or Accept;
/// ranks spread as the compiler's are), the rest NetworkPolicy allows.
pub(super) fn value(i: u32, allow: PolicyValue) -> PolicyValue {
    let rule = RULE_CNP_FLAG | (i % 4096);
    match i % 4 {
        0 => PolicyValue {
            flags: POLICY_ADMIN | (action::DENY << POLICY_ADMIN_ACTION_SHIFT),
            admin_rank: i,
            admin_rule: rule,
            ..PolicyValue::default()
        },
        1 => allow,
        2 => PolicyValue {
            flags: allow.flags
                | POLICY_BASELINE
                | if i % 8 == 2 { POLICY_BASELINE_DENY } else { 0 },
            baseline_rank: i,
            baseline_rule: rule,
            ..allow
        },
        _ => PolicyValue {
            flags: POLICY_ADMIN | (action::PASS << POLICY_ADMIN_ACTION_SHIFT),
            admin_rank: i,
            admin_rule: rule,
            ..PolicyValue::default()
        },
    }
}

/// The peer's any-protocol Admin Pass: hit by every packet from the peer.
pub(super) fn peer_entry(
    policy: &mut HashMap<MapData, PolicyKey, PolicyValue>,
    ep_id: u32,
    peer: u32,
) -> Result<()> {
    let key = PolicyKey {
        ep_id,
        identity: peer,
        port: 0,
        proto: 0,
        dir: DIR_INGRESS,
        plen: 0,
        _pad: [0; 3],
    };
    let value = PolicyValue {
        flags: POLICY_ADMIN | (action::PASS << POLICY_ADMIN_ACTION_SHIFT),
        admin_rank: 1,
        admin_rule: RULE_CNP_FLAG | 1,
        ..PolicyValue::default()
    };
    policy.insert(&key, &value, 0)?;
    Ok(())
}

impl Datapath {
    /// (median, minimum) of `noop` and `to_pod` on `frame`, in turn within
    /// each round; `to_pod` must give `want_pass`.
    fn against_noop(&self, args: &Args, frame: &[u8], want_pass: bool) -> Result<[Stat; 2]> {
        let (mut noop, mut prog) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds.max(1) {
            noop.push(self.once("noop", frame, args.repeat)?.0.as_nanos() as f64);
            let (d, verdict) = self.once(programs::TO_POD, frame, args.repeat)?;
            if (verdict == 0) != want_pass {
                bail!(
                    "to_pod at a tiered endpoint gave verdict {verdict}, want pass = {want_pass}"
                );
            }
            prog.push(d.as_nanos() as f64);
        }
        Ok([stat(noop), stat(prog)])
    }
}

/// Measures and prints the tiered rows and judges their targets; the
/// untiered established flow (`established`) is the reference.
pub(super) fn run(args: &Args, pin_dir: &Path, established: Stat) -> Result<()> {
    println!();
    println!(
        "tiered endpoint (ClusterNetworkPolicy entries among the POLICY entries), repeat = {} per round:",
        args.repeat
    );
    let mut denied = Vec::new();
    let mut tiered_established = None;
    for entries in [1u32, 1_000, 100_000] {
        let dir = pin_dir.join(format!("t{entries}"));
        std::fs::create_dir_all(&dir)?;
        let mut dp = Datapath::load(&dir)?;
        dp.setup(entries, true)?;
        if entries == 1 {
            dp.add_established(40000, 80)?;
            let [noop, est] = dp.against_noop(args, &reply(80, 40000), true)?;
            stat_row("noop (baseline)", noop, noop);
            stat_row("established flow, tiered", est, noop);
            tiered_established = Some(est);
        }
        let [noop, d] = dp.against_noop(args, &syn(40001, 81), false)?;
        stat_row(
            &format!("new flow, denied, {entries} (+1), all classes"),
            d,
            noop,
        );
        denied.push((entries, d));
    }
    let mins = denied.iter().map(|(_, s)| s.min);
    let (lo, hi) = mins.fold((f64::MAX, 0f64), |(lo, hi), m| (lo.min(m), hi.max(m)));
    let spread = hi / lo.max(0.5);
    println!();
    println!(
        "targets: tiered new flow denied, largest / smallest over 1, 1,000, 100,000 entries = {spread:.2} (minimums; target: within 1.2x)  {}",
        super::super::util::verdict(spread <= 1.2)
    );
    if let Some(est) = tiered_established {
        let ratio = est.min / established.min.max(0.5);
        println!(
            "targets: established flow tiered / untiered = {ratio:.2} (minimums; target: equal, within 1.1x for noise)  {}",
            super::super::util::verdict(ratio <= 1.1)
        );
    }
    Ok(())
}
