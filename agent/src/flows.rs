//! Flows, not just drops (docs/design.md, "Flows"): the switch that makes
//! the data path report every allowed new flow, and the bounded history of
//! records that `sluice observe --since/--last` replays.
//!
//! The switch (`FLOW_EVENTS`) is on while anything wants flows: an
//! observer whose verdict includes forwarded flows (held by an
//! [`ObserverGuard`]), an audit-mode policy (would-drop records are made
//! from forwarded ones), or `--flow-events`. Nobody wanting them: off, and
//! the data path pays one array lookup per new flow.
use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use crate::{datapath::FlowEventsMap, events::DropRecord};

/// Records kept for replay.
pub const HISTORY: usize = 10_000;

#[derive(Default)]
struct SwitchInner {
    map: Option<Mutex<FlowEventsMap>>,
    always: bool,
    observers: AtomicUsize,
    audit: AtomicBool,
    /// What was last written (None: nothing yet).
    written: Mutex<Option<bool>>,
}

/// The flow-event switch; cheap to clone.
#[derive(Clone, Default)]
pub struct FlowSwitch(Arc<SwitchInner>);

impl FlowSwitch {
    /// `map` None (tests, or the pin could not be opened): only counts.
    /// `always`: `--flow-events`. Writes the initial value at once (an
    /// earlier agent may have left the pinned switch on).
    pub fn new(map: Option<FlowEventsMap>, always: bool) -> Self {
        let s = Self(Arc::new(SwitchInner {
            map: map.map(Mutex::new),
            always,
            ..SwitchInner::default()
        }));
        s.update();
        s
    }

    /// Should the data path report flows now?
    pub fn wanted(&self) -> bool {
        self.0.always
            || self.0.observers.load(Ordering::SeqCst) > 0
            || self.0.audit.load(Ordering::SeqCst)
    }

    /// Holds the switch on for an observer until the guard is dropped.
    pub fn observe(&self) -> ObserverGuard {
        self.0.observers.fetch_add(1, Ordering::SeqCst);
        self.update();
        ObserverGuard(self.clone())
    }

    /// Some policy is in audit mode (its would-drops are judged on
    /// forwarded flows).
    pub fn set_audit(&self, on: bool) {
        self.0.audit.store(on, Ordering::SeqCst);
        self.update();
    }

    /// Writes the wanted value when it differs from the last one written.
    fn update(&self) {
        let mut written = match self.0.written.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        let want = self.wanted();
        if *written == Some(want) {
            return;
        }
        let Some(map) = &self.0.map else {
            *written = Some(want);
            return;
        };
        let mut map = match map.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        match map.set(want) {
            Ok(()) => {
                tracing::info!(on = want, "flow events switched");
                *written = Some(want);
            }
            Err(e) => tracing::warn!(error = %e, on = want, "cannot switch flow events"),
        }
    }
}

/// One observer wanting flows; dropping it lets the switch go off.
pub struct ObserverGuard(FlowSwitch);

impl Drop for ObserverGuard {
    fn drop(&mut self) {
        self.0.0.observers.fetch_sub(1, Ordering::SeqCst);
        self.0.update();
    }
}

/// A record with its place in the agent's sequence (replays and the live
/// stream meet without gaps or repeats).
#[derive(Clone, Debug)]
pub struct Numbered {
    pub seq: u64,
    pub rec: DropRecord,
}

struct Ring {
    next: u64,
    records: VecDeque<Numbered>,
}

/// The last `cap` records (drops, forwarded flows, would-drops), for
/// `--since` and `--last`.
pub struct History {
    cap: usize,
    ring: Mutex<Ring>,
}

impl History {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            ring: Mutex::new(Ring {
                next: 1,
                records: VecDeque::with_capacity(cap.min(HISTORY)),
            }),
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        match self.ring.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Keeps `rec` (the oldest goes when full); its number.
    pub fn push(&self, rec: DropRecord) -> Numbered {
        let mut ring = self.ring();
        let seq = ring.next;
        ring.next += 1;
        if ring.records.len() == self.cap {
            ring.records.pop_front();
        }
        let n = Numbered { seq, rec };
        ring.records.push_back(n.clone());
        n
    }

    /// The records passing `keep`, at or after kernel time `since_ktime`
    /// (if given), the last `last` of them (if given), oldest first; and
    /// the number of the last record pushed so far (live records up to it
    /// are in the history already).
    pub fn replay(
        &self,
        keep: impl Fn(&DropRecord) -> bool,
        since_ktime: Option<u64>,
        last: Option<usize>,
    ) -> (Vec<DropRecord>, u64) {
        let ring = self.ring();
        let mut out: Vec<DropRecord> = ring
            .records
            .iter()
            .filter(|n| since_ktime.is_none_or(|t| n.rec.ktime_ns >= t))
            .filter(|n| keep(&n.rec))
            .map(|n| n.rec.clone())
            .collect();
        if let Some(n) = last {
            let skip = out.len().saturating_sub(n);
            out.drain(..skip);
        }
        (out, ring.next - 1)
    }

    pub fn len(&self) -> usize {
        self.ring().records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `ktime_ns`
/// (bpf_ktime_get_ns).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{DROPPED, FORWARDED, verdict_matches, wants_flows};
    use sluice_common::{DropEvent, reason};

    fn rec(t: u64, forwarded: bool) -> DropRecord {
        DropRecord::from(&DropEvent {
            ts_ns: t,
            family: 4,
            reason: if forwarded {
                reason::FORWARDED
            } else {
                reason::POLICY_DENIED
            },
            ..Default::default()
        })
    }

    #[test]
    fn the_history_keeps_the_last_records_and_replays_by_time_count_and_filter() {
        let h = History::new(3);
        for t in 1..=5 {
            h.push(rec(t * 10, t % 2 == 0));
        }
        assert_eq!(h.len(), 3);
        let (all, last_seq) = h.replay(|_| true, None, None);
        assert_eq!(
            all.iter().map(|r| r.ktime_ns).collect::<Vec<_>>(),
            [30, 40, 50]
        );
        assert_eq!(last_seq, 5);
        let (since, _) = h.replay(|_| true, Some(40), None);
        assert_eq!(since.len(), 2);
        let (last, _) = h.replay(|_| true, None, Some(1));
        assert_eq!(last[0].ktime_ns, 50);
        let (fwd, _) = h.replay(|r| r.verdict == FORWARDED, None, Some(5));
        assert_eq!(fwd.iter().map(|r| r.ktime_ns).collect::<Vec<_>>(), [40]);
        let (none, _) = h.replay(|_| true, None, Some(0));
        assert!(none.is_empty());
        assert_eq!(h.push(rec(60, false)).seq, 6);
    }

    #[test]
    fn verdict_filters_default_to_dropped_and_all_takes_every_verdict() {
        assert!(verdict_matches(None, DROPPED));
        assert!(!verdict_matches(None, FORWARDED));
        assert!(verdict_matches(Some("forwarded"), FORWARDED));
        assert!(!verdict_matches(Some("forwarded"), DROPPED));
        assert!(verdict_matches(Some("would-drop"), "WOULD-DROP"));
        for v in [DROPPED, FORWARDED, "WOULD-DROP"] {
            assert!(verdict_matches(Some("all"), v));
        }
        assert!(!wants_flows(None));
        assert!(!wants_flows(Some("dropped")));
        for w in ["forwarded", "would-drop", "all"] {
            assert!(wants_flows(Some(w)), "{w}");
        }
    }

    #[test]
    fn the_switch_is_on_while_an_observer_audit_or_the_flag_wants_flows() {
        let s = FlowSwitch::new(None, false);
        assert!(!s.wanted());
        let a = s.observe();
        let b = s.observe();
        assert!(s.wanted());
        drop(a);
        assert!(s.wanted());
        drop(b);
        assert!(!s.wanted());
        s.set_audit(true);
        assert!(s.wanted());
        s.set_audit(false);
        assert!(!s.wanted());
        assert!(FlowSwitch::new(None, true).wanted());
    }
}
