//! Prometheus metrics: a few counters and histograms kept by the agent, plus
//! what the data path counts, rendered in the text exposition format. The
//! HTTP side is deliberately tiny (GET anything -> the metrics).
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sluice_common::{DIR_EGRESS, DIR_INGRESS, EP_FAIL_CLOSED, reason};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::reconcile::{Reconciler, State};

/// Appends one line to a String (which cannot fail, unlike `writeln!`).
macro_rules! put {
    ($out:expr, $($arg:tt)*) => {{
        $out.push_str(&format!($($arg)*));
        $out.push('\n');
    }};
}

/// Bucket bounds (seconds) for durations.
const BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

#[derive(Clone, Debug, Default)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += s;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str) {
        for (i, b) in BUCKETS.iter().enumerate() {
            put!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts[i]);
        }
        put!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        put!(out, "{name}_sum {}", self.sum);
        put!(out, "{name}_count {}", self.count);
    }
}

/// What the agent itself measures.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    pub compile_seconds: Histogram,
    /// From an object change seen by the watch to its entries in the maps.
    pub apply_to_programmed_seconds: Histogram,
    /// Watch health per resource kind: 1 = synced, 0 = not (yet) or failing.
    pub watch_up: BTreeMap<&'static str, u8>,
    pub watch_errors: BTreeMap<&'static str, u64>,
}

pub type Shared = Arc<Mutex<AgentMetrics>>;

/// Measures the time from its creation to its drop into a histogram.
pub struct Timer<'a> {
    start: Instant,
    hist: &'a mut Histogram,
}

impl<'a> Timer<'a> {
    pub fn new(hist: &'a mut Histogram) -> Self {
        Self {
            start: Instant::now(),
            hist,
        }
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.hist.observe(self.start.elapsed());
    }
}

/// Entries counted by walking kernel maps: a syscall per entry, so done
/// on maps opened from their pins, without holding the node's lock.
#[derive(Clone, Copy, Debug, Default)]
pub struct Walked {
    pub ipcache: usize,
    pub services: usize,
}

impl Walked {
    pub fn count(pin_dir: &std::path::Path) -> Option<Self> {
        let maps = crate::datapath::Maps::open_pinned(pin_dir).ok()?;
        Some(Self {
            ipcache: maps.ipcache_len(),
            services: maps.service_ips().map_or(0, |s| s.len()),
        })
    }
}

/// Renders every metric (`walked`: the map fills counted beforehand).
pub fn render(st: &State, m: &AgentMetrics, walked: Option<Walked>) -> String {
    let mut out = String::new();
    // Each family's samples stay together, after its HELP and TYPE.
    let mut by: BTreeMap<(&str, &str), (u64, u64)> = BTreeMap::new();
    if let Ok(counters) = st.dp.writer.maps().drop_counters() {
        for (k, v) in counters {
            let dir = if k.dir == DIR_EGRESS {
                "egress"
            } else {
                "ingress"
            };
            let e = by.entry((reason::name(k.reason), dir)).or_default();
            e.0 += v.packets;
            e.1 += v.bytes;
        }
    }
    out.push_str("# HELP sluice_dropped_packets_total Packets dropped by the data path.\n# TYPE sluice_dropped_packets_total counter\n");
    for ((r, d), (p, _)) in &by {
        put!(
            out,
            "sluice_dropped_packets_total{{reason=\"{r}\",direction=\"{d}\"}} {p}"
        );
    }
    out.push_str("# HELP sluice_dropped_bytes_total Bytes dropped by the data path.\n# TYPE sluice_dropped_bytes_total counter\n");
    for ((r, d), (_, b)) in &by {
        put!(
            out,
            "sluice_dropped_bytes_total{{reason=\"{r}\",direction=\"{d}\"}} {b}"
        );
    }
    use sluice_common::stat;
    out.push_str("# HELP sluice_forwarded_packets_total Packets the data path passed.\n# TYPE sluice_forwarded_packets_total counter\n");
    for (d, dir) in [("ingress", DIR_INGRESS), ("egress", DIR_EGRESS)] {
        let v = st
            .dp
            .writer
            .maps()
            .stat(stat::FORWARDED + u32::from(dir))
            .unwrap_or(0);
        put!(
            out,
            "sluice_forwarded_packets_total{{direction=\"{d}\"}} {v}"
        );
    }
    out.push_str("# TYPE sluice_datapath_events_total counter\n");
    for (name, idx) in [
        ("ct_created", stat::CT_CREATED),
        ("ct_insert_failed", stat::CT_INSERT_FAILED),
        ("drop_events_sent", stat::EVENTS_SENT),
        ("drop_events_rate_limited", stat::EVENTS_RATE_LIMITED),
        ("drop_events_lost", stat::EVENTS_LOST),
    ] {
        let v = st.dp.writer.maps().stat(idx).unwrap_or(0);
        put!(out, "sluice_datapath_events_total{{event=\"{name}\"}} {v}");
    }
    out.push_str("# HELP sluice_policy_entries Policy map entries per endpoint.\n# TYPE sluice_policy_entries gauge\n");
    let mut total = 0usize;
    for ep in st.endpoints.all() {
        let n = st.endpoints.entries_of(ep.ep_id);
        total += n;
        let ns = ep.spec.pod_namespace.as_deref().unwrap_or("");
        let pod = ep.spec.pod_name.as_deref().unwrap_or("");
        put!(
            out,
            "sluice_policy_entries{{endpoint=\"{}\",namespace=\"{}\",pod=\"{}\"}} {n}",
            ep.ep_id,
            escape(ns),
            escape(pod)
        );
    }
    out.push_str("# HELP sluice_map_fill_ratio Entries used over capacity.\n# TYPE sluice_map_fill_ratio gauge\n");
    put!(
        out,
        "sluice_map_fill_ratio{{map=\"POLICY\"}} {}",
        ratio(total, st.dp.sizes.policy)
    );
    put!(
        out,
        "sluice_map_fill_ratio{{map=\"ENDPOINTS\"}} {}",
        ratio(st.endpoints.len(), st.dp.sizes.endpoints)
    );
    if let Some(w) = walked {
        put!(
            out,
            "sluice_map_fill_ratio{{map=\"IPCACHE\"}} {}",
            ratio(w.ipcache, st.dp.sizes.ipcache)
        );
        put!(
            out,
            "sluice_map_fill_ratio{{map=\"SERVICES\"}} {}",
            ratio(w.services, sluice_common::sizes::SERVICES)
        );
    }
    out.push_str("# TYPE sluice_endpoints gauge\n");
    put!(out, "sluice_endpoints {}", st.endpoints.len());
    // Read from the kernel's ENDPOINTS flags: right across agent restarts.
    let failed_closed = st
        .dp
        .writer
        .maps()
        .endpoint_records()
        .into_iter()
        .filter(|(_, info)| info.flags & EP_FAIL_CLOSED != 0)
        .count();
    out.push_str("# HELP sluice_endpoints_failed_closed Endpoints dropping everything because their policy does not fit.\n# TYPE sluice_endpoints_failed_closed gauge\n");
    put!(out, "sluice_endpoints_failed_closed {failed_closed}");
    out.push_str("# TYPE sluice_endpoints_failed_closed_total counter\n");
    put!(
        out,
        "sluice_endpoints_failed_closed_total {}",
        st.endpoints.failed_closed_total()
    );
    out.push_str("# TYPE sluice_compile_duration_seconds histogram\n");
    m.compile_seconds
        .render(&mut out, "sluice_compile_duration_seconds");
    out.push_str("# TYPE sluice_apply_to_programmed_seconds histogram\n");
    m.apply_to_programmed_seconds
        .render(&mut out, "sluice_apply_to_programmed_seconds");
    out.push_str("# TYPE sluice_watch_up gauge\n");
    for (k, v) in &m.watch_up {
        put!(out, "sluice_watch_up{{kind=\"{k}\"}} {v}");
    }
    out.push_str("# TYPE sluice_watch_errors_total counter\n");
    for (k, v) in &m.watch_errors {
        put!(out, "sluice_watch_errors_total{{kind=\"{k}\"}} {v}");
    }
    out
}

fn ratio(used: usize, cap: u32) -> f64 {
    if cap == 0 {
        0.0
    } else {
        used as f64 / f64::from(cap)
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves the metrics over plain HTTP.
pub async fn serve(
    listener: TcpListener,
    reconciler: Reconciler,
    metrics: Shared,
) -> std::io::Result<()> {
    loop {
        let (mut stream, _) = listener.accept().await?;
        let (node, metrics) = (reconciler.state().clone(), metrics.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            // The request itself does not matter; read what the client sent.
            if stream.read(&mut buf).await.is_err() {
                return;
            }
            let body = tokio::task::spawn_blocking(move || {
                // The key walks first, outside the lock (about a
                // millisecond per thousand addresses): ADD and programming
                // do not wait for a scrape.
                let pin_dir = node.lock().ok()?.dp.pin_dir().to_owned();
                let walked = Walked::count(&pin_dir);
                match (node.lock(), metrics.lock()) {
                    (Ok(n), Ok(m)) => Some(render(&n, &m, walked)),
                    _ => None,
                }
            })
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| String::from("# agent state unavailable\n"));
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ignored = stream.write_all(head.as_bytes()).await;
            let _ignored = stream.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_observation_in_every_bucket_it_fits() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_millis(30));
        let mut out = String::new();
        h.render(&mut out, "x");
        assert!(out.contains("x_bucket{le=\"0.001\"} 1"));
        assert!(out.contains("x_bucket{le=\"0.05\"} 2"));
        assert!(out.contains("x_bucket{le=\"+Inf\"} 2"));
        assert!(out.contains("x_count 2"));
    }
}
