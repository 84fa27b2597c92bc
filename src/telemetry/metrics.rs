//! What penstock does and what it saves, in Prometheus form: requests, upstream
//! attempts, cache events, queue waits, upstream latency, tokens, images, and cost
//! in USD from a price table, with what coalescing and the cache avoided. Labels
//! stay low in cardinality: routes, a capped set of model names, budget names.
//! No key, prompt or image byte ever becomes a label. Each penstock instance has a
//! registry of its own, so tests can assert exact values.

use std::borrow::Cow;
use std::collections::BTreeMap;

use foldhash::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::prices::Prices;
use crate::config::PriceConfig;
use crate::vocab::context::{ModelLabel, RequestContext};
use crate::vocab::cost::ImageAsk;
use crate::vocab::status::PoolStatus;
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
struct UpstreamOutcome {
    upstream: Arc<str>,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientPeriod {
    client: String,
    period: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadResult {
    result: &'static str,
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
    late_departures: Family<Pool, Gauge>,
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
    reloads: Family<ReloadResult, Counter>,
    client_spend: Family<ClientPeriod, Gauge<f64, AtomicU64>>,
    upstream_calls: Family<UpstreamOutcome, Counter>,
    /// Plain model names seen, by their slot in `series`.
    models: Mutex<HashMap<Arc<str>, usize>>,
    /// Each model label's series, resolved once: "none", "other", then the
    /// plain names in the order seen.
    series: Box<[OnceLock<Series>]>,
    pub(crate) prices: Prices,
    /// The last minutes, for the admin page.
    pub(crate) recent: super::recent::Recent,
}

const SLOT_NONE: usize = 0;
const SLOT_OTHER: usize = 1;
const FIRST_NAMED: usize = 2;

/// Label sets a model's series have met, each with its counter: a handful
/// (routes, statuses, cache outcomes), found without hashing. Past the cap,
/// the family is asked.
const MAX_REMEMBERED: usize = 32;

/// The counters of one model label, resolved when the label is first used.
struct Series {
    estimated: Counter,
    actual: Counter,
    images: Counter,
    cost: Usd,
    price: Priced,
    /// (route, status, cache) -> requests, and the cache event.
    requests: Remembered<RequestKey, (Counter, Option<Counter>)>,
    /// (route, outcome) -> attempts, and the route's upstream duration.
    attempts: Remembered<AttemptKey, (Counter, Histogram)>,
}

/// How a label's answers are priced.
enum Priced {
    /// A plain name: its price entry, found once.
    Entry(Option<usize>),
    /// "none" and "other" stand for many models: each answer by its own name.
    ByName,
}

/// Label sets met, each with its handles, searched in order.
type Remembered<K, V> = Mutex<Vec<(K, V)>>;
type RequestKey = (&'static str, u16, Cow<'static, str>);
type AttemptKey = (&'static str, &'static str);

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `counted` on the handles remembered for `key`, made by `make` from the
/// families the first time and remembered up to [`MAX_REMEMBERED`] keys.
fn remembered<K: PartialEq, V>(
    known: &Remembered<K, V>,
    key: K,
    make: impl FnOnce(&K) -> V,
    counted: impl FnOnce(&V),
) {
    let mut known = locked(known);
    if let Some((_, handles)) = known.iter().find(|(k, _)| *k == key) {
        return counted(handles);
    }
    let handles = make(&key);
    counted(&handles);
    if known.len() < MAX_REMEMBERED {
        known.push((key, handles));
    }
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
            late_departures: Family::default(),
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
            reloads: Family::default(),
            client_spend: Family::default(),
            upstream_calls: Family::default(),
            models: Mutex::new(HashMap::default()),
            series: (0..FIRST_NAMED + MAX_MODELS)
                .map(|_| OnceLock::new())
                .collect(),
            prices: Prices::new(prices),
            recent: super::recent::Recent::default(),
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
            "penstock_client_spend_usd",
            "What each [[client]] with a spend cap has spent this UTC day and month",
            m.client_spend.clone(),
        );
        r.register(
            "penstock_upstream_calls",
            "Attempts sent to each of several upstreams, by outcome",
            m.upstream_calls.clone(),
        );
        r.register(
            "penstock_config_reload",
            "Config reloads (SIGHUP or the file changed) by result",
            m.reloads.clone(),
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
            "penstock_late_departures",
            "Calls that left later than their admission allowed for (a task run late, or a wait for a new connection), each counted from when it left, since the budget's pools began",
            m.late_departures.clone(),
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
    pub(crate) fn failed_after_send(&self, route: &'static str, retried: bool) {
        self.after_send
            .get_or_create(&AfterSendLabels {
                route,
                retried: if retried { "true" } else { "false" },
            })
            .inc();
    }

    /// The model as a label: itself for the first models seen (up to a cap, and
    /// only plain names), "other" after.
    pub(crate) fn model_label(&self, model: Option<&str>) -> ModelLabel {
        static NONE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "none".into());
        static OTHER: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "other".into());
        let other = || ModelLabel {
            name: OTHER.clone(),
            slot: SLOT_OTHER,
        };
        let Some(model) = model else {
            return ModelLabel {
                name: NONE.clone(),
                slot: SLOT_NONE,
            };
        };
        let plain = model.len() <= 64
            && model
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
        if !plain {
            return other();
        }
        let mut seen = locked(&self.models);
        if let Some((name, slot)) = seen.get_key_value(model) {
            return ModelLabel {
                name: name.clone(),
                slot: *slot,
            };
        }
        // A model penstock has a price for is named at once; any other only
        // once the upstream has answered for it (`confirm_model`): model
        // names come from clients, and junk must not take the labels real
        // models need.
        if seen.len() < MAX_MODELS && self.prices.find(model).is_some() {
            let name: Arc<str> = model.into();
            let slot = FIRST_NAMED + seen.len();
            seen.insert(name.clone(), slot);
            return ModelLabel { name, slot };
        }
        other()
    }

    /// The upstream answered a call for `model`: from now on it is a label
    /// of its own (the first [`MAX_MODELS`] plain names so answered).
    pub(crate) fn confirm_model(&self, model: &str) {
        let plain = model.len() <= 64
            && model
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
        if !plain {
            return;
        }
        let mut seen = locked(&self.models);
        if seen.len() < MAX_MODELS && !seen.contains_key(model) {
            let slot = FIRST_NAMED + seen.len();
            seen.insert(model.into(), slot);
        }
    }

    /// The model label of a request: the one its context found at the edge
    /// (looked up again if that was "other": the upstream may have answered
    /// for the model since), or "none" without a context.
    pub(crate) fn label_of(&self, ctx: Option<&RequestContext>) -> ModelLabel {
        match ctx {
            Some(c) if c.model_label.slot == SLOT_OTHER && c.model.is_some() => {
                self.model_label(c.model.as_deref())
            }
            Some(c) => c.model_label.clone(),
            None => self.model_label(None),
        }
    }

    /// The series of a label, made on its first use.
    fn series(&self, label: &ModelLabel) -> &Series {
        let slot = match label.slot < self.series.len() {
            true => label.slot,
            false => SLOT_OTHER,
        };
        self.series[slot].get_or_init(|| {
            let model = |model: &Arc<str>| Model {
                model: model.clone(),
            };
            let kind = |kind| ModelKind {
                model: label.name.clone(),
                kind,
            };
            // One statement each: a family's guard lives to the end of its
            // statement, and the next `get_or_create` of the same family
            // may need to write.
            let estimated = self.tokens.get_or_create(&kind("estimated")).clone();
            let actual = self.tokens.get_or_create(&kind("actual")).clone();
            let images = self.images.get_or_create(&model(&label.name)).clone();
            let cost = self.cost.get_or_create(&model(&label.name)).clone();
            Series {
                estimated,
                actual,
                images,
                cost,
                price: match slot >= FIRST_NAMED {
                    true => Priced::Entry(self.prices.find(&label.name)),
                    false => Priced::ByName,
                },
                requests: Mutex::new(Vec::new()),
                attempts: Mutex::new(Vec::new()),
            }
        })
    }

    /// A request's answer; `model` is its label ([`Metrics::model_label`]),
    /// found once per request.
    pub(crate) fn request(
        &self,
        route: &'static str,
        model: &ModelLabel,
        status: u16,
        cache: &str,
    ) {
        let key: RequestKey = (route, status, cache_label(cache));
        let make = |(route, status, cache): &RequestKey| {
            let requests = self
                .requests
                .get_or_create(&RequestLabels {
                    route,
                    model: model.name.clone(),
                    status: *status,
                    cache: cache.clone(),
                })
                .clone();
            let event = (!cache.is_empty()).then(|| {
                self.cache_events
                    .get_or_create(&Event {
                        event: cache.clone(),
                    })
                    .clone()
            });
            (requests, event)
        };
        remembered(
            &self.series(model).requests,
            key,
            make,
            |(requests, event)| {
                requests.inc();
                if let Some(event) = event {
                    event.inc();
                }
            },
        );
    }

    pub(crate) fn attempt(
        &self,
        route: &'static str,
        model: &ModelLabel,
        outcome: &'static str,
        seconds: f64,
    ) {
        self.recent.attempt(outcome);
        let make = |&(route, outcome): &AttemptKey| {
            let attempts = self
                .attempts
                .get_or_create(&AttemptLabels {
                    route,
                    model: model.name.clone(),
                    outcome,
                })
                .clone();
            let duration = self
                .upstream_duration
                .get_or_create(&Route { route })
                .clone();
            (attempts, duration)
        };
        remembered(
            &self.series(model).attempts,
            (route, outcome),
            make,
            |(attempts, duration)| {
                attempts.inc();
                duration.observe(seconds);
            },
        );
    }

    /// A pool's histogram of waits for budget, kept by the pool so that an
    /// observation looks nothing up.
    pub(crate) fn queue_wait(&self, pool: &str) -> Histogram {
        self.queue_wait
            .get_or_create(&Pool {
                pool: pool.to_string(),
            })
            .clone()
    }

    /// A finished upstream answer: tokens estimated and reported, images, cost.
    /// Returns the cost in USD.
    pub(crate) fn answered(
        &self,
        model: Option<&str>,
        label: &ModelLabel,
        estimated_tokens: u64,
        usage: Option<&Usage>,
        image: Option<&ImageAsk>,
    ) -> f64 {
        if let Some(model) = model {
            self.confirm_model(model);
        }
        let series = self.series(label);
        series.estimated.inc_by(estimated_tokens);
        if let Some(u) = usage {
            series.actual.inc_by(u.total);
        }
        if let Some(ask) = image {
            series.images.inc_by(ask.n);
        }
        let usd = match series.price {
            Priced::Entry(entry) => self.prices.cost_at(entry, usage, image),
            Priced::ByName => self.prices.cost(model.unwrap_or(""), usage, image),
        };
        series.cost.inc_by(usd);
        usd
    }

    /// A job left `from` for `to` (`None`: it was created, or forgotten).
    pub(crate) fn job_moved(&self, from: Option<&'static str>, to: Option<&'static str>) {
        if let Some(state) = from {
            self.jobs.get_or_create(&JobState { state }).dec();
        }
        if let Some(state) = to {
            self.jobs.get_or_create(&JobState { state }).inc();
        }
    }

    /// Jobs in each state, as the `penstock_jobs` gauge has them.
    pub(crate) fn jobs_by_state(&self) -> BTreeMap<&'static str, i64> {
        [
            "queued",
            "running",
            "succeeded",
            "failed",
            "cancelled",
            "expired",
        ]
        .into_iter()
        .map(|state| (state, self.jobs.get_or_create(&JobState { state }).get()))
        .collect()
    }

    /// Jobs queued and running across replicas, as the shared store counts them.
    pub(crate) fn jobs_shared(&self, queued: u64, running: u64) {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.jobs
            .get_or_create(&JobState { state: "queued" })
            .set(gauge(queued));
        self.jobs
            .get_or_create(&JobState { state: "running" })
            .set(gauge(running));
    }

    /// A job ended, `seconds` after it was submitted.
    pub(crate) fn job_done(&self, seconds: f64) {
        self.job_seconds.observe(seconds);
    }

    /// A webhook delivery attempt: `delivered`, `failed` (will be retried) or
    /// `gave_up`.
    pub(crate) fn webhook(&self, outcome: &'static str) {
        self.webhooks.get_or_create(&Outcome { outcome }).inc();
    }

    /// An attempt to `upstream` (one of several) came to `outcome`.
    pub(crate) fn upstream_call(&self, upstream: &Arc<str>, outcome: &'static str) {
        self.upstream_calls
            .get_or_create(&UpstreamOutcome {
                upstream: upstream.clone(),
                outcome,
            })
            .inc();
    }

    /// What a capped client has spent, this `period` (`"day"`, `"month"`).
    pub(crate) fn client_spend(&self, client: &str, period: &'static str, usd: f64) {
        self.client_spend
            .get_or_create(&ClientPeriod {
                client: client.to_string(),
                period,
            })
            .set(usd);
    }

    /// A config reload: `"ok"`, or `"error"` (nothing changed).
    pub(crate) fn reloaded(&self, result: &'static str) {
        self.reloads.get_or_create(&ReloadResult { result }).inc();
    }

    pub(crate) fn saved(&self, reason: &'static str, usd: f64) {
        self.saved.get_or_create(&Reason { reason }).inc_by(usd);
    }

    /// The Prometheus text, with pool gauges read now.
    /// `degraded`: the shared state is configured and unavailable.
    pub(crate) fn encode(&self, pools: &[PoolStatus], degraded: bool) -> String {
        self.degraded.set(i64::from(degraded));
        let mut depth: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        let mut remaining: BTreeMap<(&str, &'static str), i64> = BTreeMap::new();
        for p in pools {
            let (queued, late) = depth.entry(&p.name).or_default();
            *queued = queued.saturating_add(i64::try_from(p.queue_depth).unwrap_or(i64::MAX));
            *late = late.saturating_add(i64::try_from(p.late_departures).unwrap_or(i64::MAX));
            for (dim, s) in &p.remaining {
                let r = remaining.entry((&p.name, dim)).or_insert(i64::MAX);
                *r = (*r).min(s.burst_remaining as i64);
            }
        }
        for (pool, (queued, late)) in depth {
            let pool = Pool {
                pool: pool.to_string(),
            };
            self.queue_depth.get_or_create(&pool).set(queued);
            self.late_departures.get_or_create(&pool).set(late);
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
        let name = |model: Option<&str>| m.model_label(model).name;
        assert_eq!(&*name(Some("gpt-image-1")), "gpt-image-1");
        assert_eq!(&*name(Some("a model {with} junk")), "other");
        assert_eq!(&*name(None), "none");
        for i in 0..200 {
            m.model_label(Some(&format!("m{i}")));
        }
        assert_eq!(&*name(Some("m199")), "other");
        assert_eq!(&*name(Some("gpt-image-1")), "gpt-image-1", "already seen");
    }

    #[test]
    fn text_comes_out_in_prometheus_form() {
        let m = Metrics::new(&BTreeMap::new());
        let label = m.model_label(Some("gpt-image-1"));
        // Twice each: the second time through the series' remembered counters.
        for _ in 0..2 {
            m.request("images.generations", &label, 200, "miss");
            m.attempt("images.generations", &label, "success", 0.3);
        }
        m.request("images.generations", &label, 429, "");
        let usage = Usage {
            input: 50,
            input_images: 0,
            output: 4160,
            total: 4210,
        };
        let usd = m.answered(Some("gpt-image-1"), &label, 4000, Some(&usage), None);
        assert_eq!(usd, m.prices.cost("gpt-image-1", Some(&usage), None));
        assert!(usd > 0.0);
        // A model past the cap is "other", and still priced by its own name.
        let other = crate::vocab::context::ModelLabel {
            name: "other".into(),
            slot: SLOT_OTHER,
        };
        let other_usd = m.answered(Some("gpt-4o-mini"), &other, 10, Some(&usage), None);
        assert_eq!(other_usd, m.prices.cost("gpt-4o-mini", Some(&usage), None));
        let text = m.encode(&[], false);
        assert!(text.contains(
            "penstock_requests_total{route=\"images.generations\",model=\"gpt-image-1\",status=\"200\",cache=\"miss\"} 2"
        ), "{text}");
        assert!(text.contains(
            "penstock_requests_total{route=\"images.generations\",model=\"gpt-image-1\",status=\"429\",cache=\"\"} 1"
        ), "{text}");
        assert!(
            text.contains("penstock_cache_events_total{event=\"miss\"} 2"),
            "{text}"
        );
        assert!(text.contains(
            "penstock_upstream_attempts_total{route=\"images.generations\",model=\"gpt-image-1\",outcome=\"success\"} 2"
        ), "{text}");
        assert!(text.contains("penstock_upstream_duration_seconds_bucket{le=\"0.5\",route=\"images.generations\"} 2"), "{text}");
        assert!(
            text.contains("penstock_tokens_total{model=\"gpt-image-1\",kind=\"actual\"} 4210"),
            "{text}"
        );
        assert!(
            text.contains("penstock_tokens_total{model=\"other\",kind=\"estimated\"} 10"),
            "{text}"
        );
    }

    #[test]
    fn junk_model_names_take_no_label_a_real_model_needs() {
        let m = Metrics::new(&std::collections::BTreeMap::new());
        for i in 0..200 {
            assert_eq!(&*m.model_label(Some(&format!("junk-{i}"))).name, "other");
        }
        // Priced, so known: named at once.
        assert_eq!(&*m.model_label(Some("gpt-image-1")).name, "gpt-image-1");
        // Unknown until the upstream answers for it.
        assert_eq!(&*m.model_label(Some("my-finetune")).name, "other");
        m.confirm_model("my-finetune");
        assert_eq!(&*m.model_label(Some("my-finetune")).name, "my-finetune");
    }
}
