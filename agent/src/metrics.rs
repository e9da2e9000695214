//! Prometheus metrics through `prometheus-client`: what the agent measures
//! itself (a cheap `Metrics` handle of atomic metrics), plus, at scrape
//! time, what the data path counts (`counters::read` on the pinned maps)
//! and the per-endpoint state the agent hands over through a provider.
//! Served by hyper with `/metrics`, `/healthz` and `/readyz`.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    fmt,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONNECTION, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
        prometheus_text,
    },
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};
use sluice_common::{DIR_EGRESS, DIR_INGRESS, reason, stat};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::{
    datapath::{
        DatapathError,
        counters::{self, Counters},
    },
    model::{EpId, Kind},
};

mod pressure;
mod ready;
mod rules;
pub use ready::{Readiness, Ready};

/// Bucket bounds (seconds) of both duration histograms.
const BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

impl EncodeLabelValue for Kind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.name())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: Kind,
}

/// The metrics the agent updates itself: atomics (the histograms' own short
/// lock aside), so updating one never waits for a scrape or another task.
#[derive(Debug)]
struct Own {
    compile: Histogram,
    apply_to_programmed: Histogram,
    watch_up: Family<KindLabels, Gauge>,
    watch_errors: Family<KindLabels, Counter>,
    failed_closed: Counter,
    /// Flows audit-mode policies would drop, by policy (bounded).
    would_drop: Family<WouldDropLabels, Counter>,
    would_drop_series: std::sync::Mutex<std::collections::BTreeSet<WouldDropLabels>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct WouldDropLabels {
    kind: String,
    policy: String,
}

/// The handle the rest of the agent holds (cheap to clone).
#[derive(Clone, Debug)]
pub struct Metrics(Arc<Own>);

impl Default for Metrics {
    fn default() -> Self {
        Self(Arc::new(Own {
            compile: Histogram::new(BUCKETS),
            apply_to_programmed: Histogram::new(BUCKETS),
            watch_up: Family::default(),
            watch_errors: Family::default(),
            failed_closed: Counter::default(),
            would_drop: Family::default(),
            would_drop_series: std::sync::Mutex::default(),
        }))
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Watch health of one kind: up once listed, down while failing.
    pub fn watch_up(&self, kind: Kind, up: bool) {
        self.0
            .watch_up
            .get_or_create(&KindLabels { kind })
            .set(i64::from(up));
    }

    pub fn watch_error(&self, kind: Kind) {
        self.0
            .watch_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// Times a compile until dropped.
    pub fn compile_timer(&self) -> Timer {
        Timer::new(self.0.compile.clone())
    }

    pub fn observe_compile(&self, d: Duration) {
        self.0.compile.observe(d.as_secs_f64());
    }

    /// Times from an object change seen by a watch to its entries in the
    /// maps, until dropped.
    pub fn apply_to_programmed_timer(&self) -> Timer {
        Timer::new(self.0.apply_to_programmed.clone())
    }

    pub fn observe_apply_to_programmed(&self, d: Duration) {
        self.0.apply_to_programmed.observe(d.as_secs_f64());
    }

    /// An endpoint was made to fail closed (its policy does not fit).
    pub fn endpoint_failed_closed(&self) {
        self.0.failed_closed.inc();
    }

    /// A flow that the audit-mode policy `policy` (`ns/name` or a
    /// ClusterNetworkPolicy's name) of `kind` would drop. At most
    /// `rules::MAX_RULE_SERIES` series; the rest count as policy `other`.
    pub fn would_drop(&self, kind: &str, policy: &str) {
        let mut labels = WouldDropLabels {
            kind: kind.to_owned(),
            policy: policy.to_owned(),
        };
        if let Ok(mut seen) = self.0.would_drop_series.lock() {
            if !seen.contains(&labels) && seen.len() >= rules::MAX_RULE_SERIES {
                labels.policy = "other".into();
            }
            seen.insert(labels.clone());
        }
        self.0.would_drop.get_or_create(&labels).inc();
    }

    /// `(up, errors)` of one kind's watch: `up` is `None` before its watch
    /// started.
    pub fn watch_health(&self, kind: Kind) -> (Option<bool>, u64) {
        let labels = KindLabels { kind };
        let up = self.0.watch_up.get(&labels).map(|g| g.get() != 0);
        let errors = self.0.watch_errors.get(&labels).map_or(0, |c| c.get());
        (up, errors)
    }

    fn register(&self, registry: &mut Registry) {
        let own = &self.0;
        registry.register(
            "sluice_compile_duration_seconds",
            "Time to compile the cluster's policy in a reconcile pass.",
            own.compile.clone(),
        );
        registry.register(
            "sluice_apply_to_programmed_seconds",
            "Time from an object change seen by the watch to its entries in the maps.",
            own.apply_to_programmed.clone(),
        );
        registry.register(
            "sluice_watch_up",
            "Watch health per kind: 1 = synced, 0 = not (yet) or failing.",
            own.watch_up.clone(),
        );
        // Counters are registered without `_total`: the encoder adds it.
        registry.register(
            "sluice_watch_errors",
            "Watch failures per kind.",
            own.watch_errors.clone(),
        );
        registry.register(
            "sluice_endpoints_failed_closed",
            "Times an endpoint was made to fail closed since the agent started.",
            own.failed_closed.clone(),
        );
        registry.register(
            "sluice_would_drop_flows",
            "New flows that a policy in audit mode would drop, by policy.",
            own.would_drop.clone(),
        );
    }
}

/// Observes the time from its creation to its drop into a histogram.
#[must_use = "a timer observes when dropped"]
#[derive(Debug)]
pub struct Timer {
    start: Instant,
    hist: Histogram,
}

impl Timer {
    fn new(hist: Histogram) -> Self {
        Self {
            start: Instant::now(),
            hist,
        }
    }

    /// Time since the timer started (it keeps running).
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.hist.observe(self.start.elapsed().as_secs_f64());
    }
}

/// One node-local endpoint, as the agent's state sees it at scrape time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointStat {
    pub ep_id: EpId,
    pub namespace: String,
    pub pod: String,
    /// Policy and CIDR entries the agent wrote for it.
    pub entries: usize,
}

/// Map capacities (entries), for the fill ratios.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacities {
    pub policy: u32,
    pub endpoints: u32,
}

/// What the agent's state contributes to a scrape (plain data, copied out).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    pub endpoints: Vec<EndpointStat>,
    pub capacity: Capacities,
    /// ClusterNetworkPolicy rule names, for the per-rule drop counters.
    pub rule_names: Arc<crate::events::RuleNames>,
}

/// Called at each scrape (on a blocking thread) for the agent's state.
pub type EndpointsProvider = Arc<dyn Fn() -> EndpointStats + Send + Sync>;

type CountersReader = Box<dyn Fn() -> Result<Counters, DatapathError> + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: u32,
    namespace: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

const DIRECTIONS: [(&str, u8); 2] = [("ingress", DIR_INGRESS), ("egress", DIR_EGRESS)];

fn direction(dir: u8) -> &'static str {
    if dir == DIR_EGRESS {
        "egress"
    } else {
        "ingress"
    }
}

/// Encodes one family: its HELP and TYPE, then each labelled sample in the
/// given order (a `Family` would iterate its hash map in no fixed order).
fn family<S: EncodeLabelSet, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: prometheus_client::metrics::MetricType,
    samples: impl IntoIterator<Item = (S, M)>,
) -> fmt::Result {
    let mut me = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in samples {
        metric.encode(me.encode_family(&labels)?)?;
    }
    Ok(())
}

fn one<M: EncodeMetric>(enc: &mut DescriptorEncoder, name: &str, help: &str, m: &M) -> fmt::Result {
    m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)
}

/// The scrape-time families: the data path's counters (read from the pins)
/// and the agent's endpoint state (from the provider).
struct Scrape {
    counters: CountersReader,
    endpoints: EndpointsProvider,
}

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scrape")
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        use prometheus_client::metrics::MetricType::{Counter, Gauge};
        // The map reads first, holding no lock of the agent's; then the
        // provider, which copies the agent's state out under its lock.
        let counters = match (self.counters)() {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(error = %e, "reading the data path's counters failed; their metrics are left out");
                None
            }
        };
        let state = (self.endpoints)();
        if let Some(c) = &counters {
            let mut by: BTreeMap<DropLabels, counters::Count> = BTreeMap::new();
            for (&(r, d), v) in &c.drops {
                let e = by
                    .entry(DropLabels {
                        reason: reason::name(r),
                        direction: direction(d),
                    })
                    .or_default();
                e.packets += v.packets;
                e.bytes += v.bytes;
            }
            family(
                &mut enc,
                "sluice_dropped_packets",
                "Packets dropped by the data path.",
                Counter,
                by.iter()
                    .map(|(l, v)| (l.clone(), ConstCounter::new(v.packets))),
            )?;
            family(
                &mut enc,
                "sluice_dropped_bytes",
                "Bytes dropped by the data path.",
                Counter,
                by.iter()
                    .map(|(l, v)| (l.clone(), ConstCounter::new(v.bytes))),
            )?;
            family(
                &mut enc,
                "sluice_forwarded_packets",
                "Packets the data path passed.",
                Counter,
                DIRECTIONS.map(|(direction, dir)| {
                    let v = c.stat(stat::FORWARDED + u32::from(dir));
                    (DirectionLabels { direction }, ConstCounter::new(v))
                }),
            )?;
            family(
                &mut enc,
                "sluice_datapath_events",
                "Data path events: conntrack entries, drop events sent or not.",
                Counter,
                [
                    ("ct_created", stat::CT_CREATED),
                    ("ct_insert_failed", stat::CT_INSERT_FAILED),
                    ("drop_events_sent", stat::EVENTS_SENT),
                    ("drop_events_rate_limited", stat::EVENTS_RATE_LIMITED),
                    ("drop_events_lost", stat::EVENTS_LOST),
                ]
                .map(|(event, idx)| (EventLabels { event }, ConstCounter::new(c.stat(idx)))),
            )?;
            rules::encode(&mut enc, &c.rule_drops, &state.rule_names)?;
        }
        family(
            &mut enc,
            "sluice_policy_entries",
            "Policy map entries per endpoint.",
            Gauge,
            state.endpoints.iter().map(|ep| {
                let labels = EndpointLabels {
                    endpoint: ep.ep_id.0,
                    namespace: ep.namespace.clone(),
                    pod: ep.pod.clone(),
                };
                (
                    labels,
                    ConstGauge::new(i64::try_from(ep.entries).unwrap_or(i64::MAX)),
                )
            }),
        )?;
        family(
            &mut enc,
            "sluice_map_pressure",
            "Entries used over the map's capacity (1 is full).",
            Gauge,
            pressure::pressures(&state, counters.as_ref())
                .into_iter()
                .map(|(map, r)| (MapLabels { map }, ConstGauge::new(r))),
        )?;
        one(
            &mut enc,
            "sluice_endpoints",
            "Endpoints on this node.",
            &ConstGauge::new(i64::try_from(state.endpoints.len()).unwrap_or(i64::MAX)),
        )?;
        if let Some(c) = &counters {
            one(
                &mut enc,
                "sluice_endpoints_failed_closed",
                "Endpoints dropping everything because their policy does not fit.",
                &ConstGauge::new(i64::try_from(c.failed_closed).unwrap_or(i64::MAX)),
            )?;
        }
        Ok(())
    }
}

/// Everything a scrape answers, in the Prometheus text format.
#[derive(Debug)]
pub struct Exporter {
    registry: Registry,
    /// Where the maps are pinned, for `/healthz` (`None` in unit tests).
    pin_dir: Option<PathBuf>,
}

impl Exporter {
    /// `pin_dir`: where the data path's maps are pinned.
    pub fn new(metrics: &Metrics, pin_dir: PathBuf, endpoints: EndpointsProvider) -> Self {
        let pins = pin_dir.clone();
        let mut exporter =
            Self::with_counters(metrics, Box::new(move || counters::read(&pins)), endpoints);
        exporter.pin_dir = Some(pin_dir);
        exporter
    }

    /// `/healthz`: the maps the data path runs on can still be opened from
    /// their pins (a restart would otherwise start on new, empty ones).
    /// Blocking (a few bpf(2) calls).
    pub fn health(&self) -> Result<(), DatapathError> {
        match &self.pin_dir {
            Some(dir) => crate::datapath::Maps::open_pinned(dir).map(drop),
            None => Ok(()),
        }
    }

    fn with_counters(
        metrics: &Metrics,
        counters: CountersReader,
        endpoints: EndpointsProvider,
    ) -> Self {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        registry.register_collector(Box::new(Scrape {
            counters,
            endpoints,
        }));
        Self {
            registry,
            pin_dir: None,
        }
    }

    /// The text of one scrape. Reads the pinned maps and calls the
    /// provider: run it on a blocking thread.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// A client that connects and sends nothing does not hold a task for long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // One request per connection: scrapers that read to EOF (the test
    // harness) see the end of the answer.
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

const PLAIN: &str = "text/plain; charset=utf-8";

async fn answer(
    req: &Request<Incoming>,
    exporter: &Arc<Exporter>,
    ready: &Ready,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::NOT_FOUND, PLAIN, "not found\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let exporter = exporter.clone();
            match tokio::task::spawn_blocking(move || exporter.encode()).await {
                Ok(Ok(body)) => text(StatusCode::OK, prometheus_text::CONTENT_TYPE, body),
                Ok(Err(e)) => {
                    warn!(error = %e, "encoding the metrics failed");
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        PLAIN,
                        "encoding failed\n",
                    )
                }
                Err(e) => {
                    warn!(error = %e, "the metrics task failed");
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        PLAIN,
                        "encoding failed\n",
                    )
                }
            }
        }
        "/healthz" => {
            let exporter = exporter.clone();
            match tokio::task::spawn_blocking(move || exporter.health()).await {
                Ok(Ok(())) => text(StatusCode::OK, PLAIN, "ok\n"),
                Ok(Err(e)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    format!("maps not open: {e}\n"),
                ),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    PLAIN,
                    format!("health task failed: {e}\n"),
                ),
            }
        }
        "/readyz" => match ready.get() {
            r if r.is_ready() => text(StatusCode::OK, PLAIN, "ready\n"),
            r => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("not ready: {}\n", r.missing()),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n"),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` over HTTP/1.1, one request
/// per connection. Ends only if accepting fails.
pub async fn serve(
    listener: TcpListener,
    exporter: Arc<Exporter>,
    ready: Ready,
) -> std::io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let (exporter, ready) = (exporter.clone(), ready.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (exporter, ready) = (exporter.clone(), ready.clone());
                async move { Ok::<_, Infallible>(answer(&req, &exporter, &ready).await) }
            });
            let served = http1::Builder::new()
                .keep_alive(false)
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            if let Err(e) = served {
                debug!(%peer, error = %e, "metrics connection failed");
            }
        });
    }
}

#[cfg(test)]
mod tests;
