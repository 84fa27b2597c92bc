//! What penstock does and what it saves, in Prometheus form: requests, upstream
//! attempts, cache events, queue waits, upstream latency, tokens, images, and cost
//! in USD from a price table, with what coalescing and the cache avoided. Labels
//! stay low in cardinality: routes, a capped set of model names, budget names.
//! No key, prompt or image byte ever becomes a label. Each penstock instance has a
//! registry of its own, so tests can assert exact values.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::pool::PoolStatus;
use super::prices::Prices;
use crate::config::PriceConfig;
use crate::vocab::cost::ImageAsk;
use crate::vocab::usage::Usage;

/// Seconds, up to ten minutes: image calls and queue waits are slow.
const BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 600.0,
];

/// Distinct model names given a label of their own; later ones count as "other".
const MAX_MODELS: usize = 64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    model: Arc<str>,
    status: u16,
    cache: Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    route: &'static str,
    model: Arc<str>,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AfterSendLabels {
    route: &'static str,
    retried: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Event {
    event: Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Pool {
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolDim {
    pool: String,
    dimension: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Model {
    model: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelKind {
    model: Arc<str>,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobState {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

type Usd = Counter<f64, AtomicU64>;

/// Seconds from a job's submission to its end: images take a minute or more.
const JOB_BUCKETS: [f64; 10] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    attempts: Family<AttemptLabels, Counter>,
    cache_events: Family<Event, Counter>,
    queue_wait: Histograms<Pool>,
    upstream_duration: Histograms<Route>,
    queue_depth: Family<Pool, Gauge>,
    remaining: Family<PoolDim, Gauge>,
    tokens: Family<ModelKind, Counter>,
    images: Family<Model, Counter>,
    cost: Family<Model, Usd>,
    saved: Family<Reason, Usd>,
    after_send: Family<AfterSendLabels, Counter>,
    degraded: Gauge,
    jobs: Family<JobState, Gauge>,
    job_seconds: Histogram,
    webhooks: Family<Outcome, Counter>,
    /// Model labels seen, shared by every series that names them.
    models: Mutex<HashSet<Arc<str>>>,
    pub prices: Prices,
}

/// A cache outcome as a label: the known ones without an allocation.
fn cache_label(cache: &str) -> Cow<'static, str> {
    match cache {
        "" => Cow::Borrowed(""),
        "hit" => Cow::Borrowed("hit"),
        "miss" => Cow::Borrowed("miss"),
        "coalesced" => Cow::Borrowed("coalesced"),
        "bypass" => Cow::Borrowed("bypass"),
        "stale" => Cow::Borrowed("stale"),
        other => Cow::Owned(other.to_string()),
    }
}

impl Metrics {
    pub fn new(prices: &BTreeMap<String, PriceConfig>) -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            attempts: Family::default(),
            cache_events: Family::default(),
            queue_wait: Family::new_with_constructor(histogram),
            upstream_duration: Family::new_with_constructor(histogram),
            queue_depth: Family::default(),
            remaining: Family::default(),
            tokens: Family::default(),
            images: Family::default(),
            cost: Family::default(),
            saved: Family::default(),
            after_send: Family::default(),
            degraded: Gauge::default(),
            jobs: Family::default(),
            job_seconds: Histogram::new(JOB_BUCKETS),
            webhooks: Family::default(),
            models: Mutex::new(HashSet::new()),
            prices: Prices::new(prices),
        };
        let r = &mut m.registry;
        r.register(
            "penstock_requests",
            "Client requests, each counted once",
            m.requests.clone(),
        );
        r.register(
            "penstock_upstream_attempts",
            "Calls sent upstream, retries included",
            m.attempts.clone(),
        );
        r.register(
            "penstock_cache_events",
            "Cache outcomes of client requests",
            m.cache_events.clone(),
        );
        r.register(
            "penstock_queue_wait_seconds",
            "Time waited for budget per attempt",
            m.queue_wait.clone(),
        );
        r.register(
            "penstock_upstream_duration_seconds",
            "Time from sending an attempt to its response head",
            m.upstream_duration.clone(),
        );
        r.register("penstock_jobs", "Async jobs by state", m.jobs.clone());
        r.register(
            "penstock_job_seconds",
            "Time from a job's submission to its end",
            m.job_seconds.clone(),
        );
        r.register(
            "penstock_webhook_deliveries",
            "Webhook delivery attempts by outcome",
            m.webhooks.clone(),
        );
        r.register(
            "penstock_state_degraded",
            "1 while the shared state (Redis) is unavailable and each pool keeps a local share of its limits",
            m.degraded.clone(),
        );
        r.register(
            "penstock_queue_depth",
            "Requests waiting for budget",
            m.queue_depth.clone(),
        );
        r.register(
            "penstock_budget_remaining",
            "Least budget left in the burst window across a budget's pools",
            m.remaining.clone(),
        );
        r.register(
            "penstock_tokens",
            "Tokens of upstream calls, estimated before and reported after",
            m.tokens.clone(),
        );
        r.register(
            "penstock_images",
            "Images generated upstream",
            m.images.clone(),
        );
        r.register(
            "penstock_cost_usd",
            "Spent upstream, by the price table",
            m.cost.clone(),
        );
        r.register(
            "penstock_saved_usd",
            "Not spent thanks to coalescing and the cache",
            m.saved.clone(),
        );
        r.register(
            "penstock_failed_after_send",
            "Attempts that failed once sent, so may have been processed, and whether they were retried",
            m.after_send.clone(),
        );
        m
    }

    /// An attempt that failed after it was sent, and whether it is retried.
    pub fn failed_after_send(&self, route: &'static str, retried: bool) {
        self.after_send
            .get_or_create(&AfterSendLabels {
                route,
                retried: if retried { "true" } else { "false" },
            })
            .inc();
    }

    /// The model as a label: itself for the first models seen (up to a cap, and
    /// only plain names), "other" after.
    pub fn model_label(&self, model: Option<&str>) -> Arc<str> {
        static NONE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "none".into());
        static OTHER: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "other".into());
        let Some(model) = model else {
            return NONE.clone();
        };
        let plain = model.len() <= 64
            && model
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
        if !plain {
            return OTHER.clone();
        }
        let mut seen = self.models.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(label) = seen.get(model) {
            return label.clone();
        }
        if seen.len() < MAX_MODELS {
            let label: Arc<str> = model.into();
            seen.insert(label.clone());
            return label;
        }
        OTHER.clone()
    }

    /// The model label of a request: the one its context found at the edge,
    /// or "none" without a context.
    pub fn label_of(&self, ctx: Option<&crate::vocab::context::RequestContext>) -> Arc<str> {
        match ctx {
            Some(c) => c.model_label.clone(),
            None => self.model_label(None),
        }
    }

    /// A request's answer; `model` is its label ([`Metrics::model_label`]),
    /// found once per request.
    pub fn request(&self, route: &'static str, model: &Arc<str>, status: u16, cache: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                model: model.clone(),
                status,
                cache: cache_label(cache),
            })
            .inc();
        if !cache.is_empty() {
            self.cache_events
                .get_or_create(&Event {
                    event: cache_label(cache),
                })
                .inc();
        }
    }

    pub fn attempt(
        &self,
        route: &'static str,
        model: &Arc<str>,
        outcome: &'static str,
        seconds: f64,
    ) {
        self.attempts
            .get_or_create(&AttemptLabels {
                route,
                model: model.clone(),
                outcome,
            })
            .inc();
        self.upstream_duration
            .get_or_create(&Route { route })
            .observe(seconds);
    }

    pub fn queue_wait(&self, pool: &str, seconds: f64) {
        self.queue_wait
            .get_or_create(&Pool {
                pool: pool.to_string(),
            })
            .observe(seconds);
    }

    /// A finished upstream answer: tokens estimated and reported, images, cost.
    /// Returns the cost in USD.
    pub fn answered(
        &self,
        model: Option<&str>,
        label: &Arc<str>,
        estimated_tokens: u64,
        usage: Option<&Usage>,
        image: Option<&ImageAsk>,
    ) -> f64 {
        let tokens = |kind| ModelKind {
            model: label.clone(),
            kind,
        };
        self.tokens
            .get_or_create(&tokens("estimated"))
            .inc_by(estimated_tokens);
        if let Some(u) = usage {
            self.tokens.get_or_create(&tokens("actual")).inc_by(u.total);
        }
        if let Some(ask) = image {
            self.images
                .get_or_create(&Model {
                    model: label.clone(),
                })
                .inc_by(ask.n);
        }
        let usd = self.prices.cost(model.unwrap_or(""), usage, image);
        self.cost
            .get_or_create(&Model {
                model: label.clone(),
            })
            .inc_by(usd);
        usd
    }

    /// A job left `from` for `to` (`None`: it was created, or forgotten).
    pub fn job_moved(&self, from: Option<&'static str>, to: Option<&'static str>) {
        if let Some(state) = from {
            self.jobs.get_or_create(&JobState { state }).dec();
        }
        if let Some(state) = to {
            self.jobs.get_or_create(&JobState { state }).inc();
        }
    }

    /// Jobs queued and running across replicas, as the shared store counts them.
    pub fn jobs_shared(&self, queued: u64, running: u64) {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.jobs
            .get_or_create(&JobState { state: "queued" })
            .set(gauge(queued));
        self.jobs
            .get_or_create(&JobState { state: "running" })
            .set(gauge(running));
    }

    /// A job ended, `seconds` after it was submitted.
    pub fn job_done(&self, seconds: f64) {
        self.job_seconds.observe(seconds);
    }

    /// A webhook delivery attempt: `delivered`, `failed` (will be retried) or
    /// `gave_up`.
    pub fn webhook(&self, outcome: &'static str) {
        self.webhooks.get_or_create(&Outcome { outcome }).inc();
    }

    pub fn saved(&self, reason: &'static str, usd: f64) {
        self.saved.get_or_create(&Reason { reason }).inc_by(usd);
    }

    /// The Prometheus text, with pool gauges read now.
    /// `degraded`: the shared state is configured and unavailable.
    pub fn encode(&self, pools: &[PoolStatus], degraded: bool) -> String {
        self.degraded.set(i64::from(degraded));
        let mut depth: BTreeMap<&str, i64> = BTreeMap::new();
        let mut remaining: BTreeMap<(&str, &'static str), i64> = BTreeMap::new();
        for p in pools {
            *depth.entry(&p.name).or_default() += p.queue_depth as i64;
            for (dim, s) in &p.remaining {
                let r = remaining.entry((&p.name, dim)).or_insert(i64::MAX);
                *r = (*r).min(s.burst_remaining as i64);
            }
        }
        for (pool, d) in depth {
            self.queue_depth
                .get_or_create(&Pool {
                    pool: pool.to_string(),
                })
                .set(d);
        }
        for ((pool, dimension), r) in remaining {
            self.remaining
                .get_or_create(&PoolDim {
                    pool: pool.to_string(),
                    dimension,
                })
                .set(r);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_labels_are_capped_and_plain() {
        let m = Metrics::new(&BTreeMap::new());
        assert_eq!(&*m.model_label(Some("gpt-image-1")), "gpt-image-1");
        assert_eq!(&*m.model_label(Some("a model {with} junk")), "other");
        assert_eq!(&*m.model_label(None), "none");
        for i in 0..200 {
            m.model_label(Some(&format!("m{i}")));
        }
        assert_eq!(&*m.model_label(Some("m199")), "other");
        assert_eq!(
            &*m.model_label(Some("gpt-image-1")),
            "gpt-image-1",
            "already seen"
        );
    }

    #[test]
    fn text_comes_out_in_prometheus_form() {
        let m = Metrics::new(&BTreeMap::new());
        let label = m.model_label(Some("gpt-image-1"));
        m.request("images.generations", &label, 200, "miss");
        m.attempt("images.generations", &label, "success", 0.3);
        let text = m.encode(&[], false);
        assert!(text.contains(
            "penstock_requests_total{route=\"images.generations\",model=\"gpt-image-1\",status=\"200\",cache=\"miss\"} 1"
        ), "{text}");
        assert!(text.contains("penstock_cache_events_total{event=\"miss\"} 1"));
        assert!(text.contains("penstock_upstream_duration_seconds_bucket{le=\"0.5\",route=\"images.generations\"} 1"), "{text}");
    }
}
