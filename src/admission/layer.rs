//! Admission against RPM/TPM/IPM budgets. Each attempt upstream waits here, in a
//! fair queue, until its pool can pay its estimated cost, so penstock never sends
//! a call the budget cannot pay for; the response's `usage` then settles the
//! estimate, its `x-ratelimit-*` headers pull the pool down when someone else
//! spends the same key, and an upstream rate-limit 429 pauses the whole pool.

use foldhash::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tower::Service;
use wildmatch::WildMatch;

use crate::admission::learn::Learner;
use crate::admission::ledger::Limits;
use crate::admission::pool::{Permit, Places, Pool, Refusal, Remote, Settings, Tripped};
use crate::config::{Config, LearnConfig, Refund};
use crate::state::Redis;
use crate::telemetry::metrics::Metrics;
use crate::vocab::body::{Body, BoxError};
use crate::vocab::classify::{self, Class};
use crate::vocab::context::{Payload, RequestContext};
use crate::vocab::cost::{Cost, Priority};
use crate::vocab::encoding::{Encoding, Tail};
use crate::vocab::error::ProxyError;
use crate::vocab::headers::{RateLimitHeaders, name, number};
use crate::vocab::scope::OwnOrgs;
use crate::vocab::service::Upstreams;
use crate::vocab::status::PoolStatus;
use crate::vocab::usage::Usage;

/// The most of an answer decoded to find its `usage`; a body that inflates past
/// it is passed on, settled on its estimate.
const MAX_DECODED: u64 = 256 << 20;

/// A pause after an upstream rate limit that named no delay.
const DEFAULT_PAUSE: Duration = Duration::from_secs(1);

struct Spec {
    name: Arc<str>,
    globs: Vec<WildMatch>,
    limits: Limits,
    max_in_flight: Option<usize>,
    /// One pool for every credential.
    shared: bool,
    /// The one upstream it applies to (else each on its own).
    upstream: Option<usize>,
}

/// An upstream as admission sees it: the models it serves and the
/// credentials its pools are counted under.
struct UpRoute {
    globs: Vec<WildMatch>,
    /// Its key's pools (penstock's own key: `sidecar`, `sidecar@name`).
    credential: Arc<str>,
    /// Its budgets' pools shared by every credential.
    shared: Arc<str>,
    /// It takes requests shaped for Azure (`/openai/...`).
    azure: bool,
    /// Its share when several could take a request at once.
    weight: u64,
}

/// The credential of a shared budget's one pool, as `/status` shows it.
const SHARED: &str = "shared";

/// The index of learned pools in a [`PoolKey`].
const LEARNED: usize = usize::MAX;

/// Learned pools at most: model names come from clients.
const MAX_LEARNED_POOLS: usize = 1000;

/// How often idle pools are looked for.
const EVICT_EVERY: Duration = Duration::from_secs(60);

/// Where a request may go, best first: an upstream's index and the
/// credential its pools count. One, the usual case, is kept inline.
type Candidates = smallvec::SmallVec<[(usize, Arc<str>); 1]>;

/// A pool's identity: which budget, and which upstream credential pays.
type PoolKey = (usize, Arc<str>);

/// All pools: one per (budget, upstream credential), made on first use.
pub struct Registry {
    /// The budgets, swapped whole by a reload (under the pools' lock).
    specs: ArcSwap<Vec<Spec>>,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    depth: Arc<AtomicUsize>,
    max_depth: AtomicUsize,
    /// `queue.max_wait`, in microseconds.
    max_wait: AtomicU64,
    /// Each `[[client]]`'s class and whether its requests may choose theirs.
    priorities: ArcSwap<HashMap<String, (Option<Priority>, bool)>>,
    /// `queue.batch_min_share`, as the bits of an `f64`.
    batch_min_share: AtomicU64,
    quota_cooldown: Duration,
    refund: Refund,
    probe_grace: Duration,
    /// `[learn]`, when on.
    learn: Option<LearnConfig>,
    /// With the Redis backend: every pool's ledger and breaker are shared.
    redis: Option<Arc<Redis>>,
    /// Models the upstream has answered for: only they get learned pools.
    heard: Mutex<foldhash::HashSet<Box<str>>>,
    /// For pools shared by every key: the credentials whose money is gone,
    /// each answered with its own upstream error until its cool-down ends.
    breakers: Mutex<HashMap<Arc<str>, Arc<Tripped>>>,
    /// The upstreams, in the config's order (not reloaded).
    ups: Vec<UpRoute>,
    /// `[[fallback]]`s, swapped whole by a reload.
    fallbacks: ArcSwap<Vec<Fallback>>,
}

/// A `[[fallback]]`: the models to use instead of those its globs match.
pub(crate) struct Fallback {
    globs: Vec<WildMatch>,
    pub(crate) to: Vec<Arc<str>>,
    pub(crate) after: Duration,
}

fn fallbacks_of(config: &Config) -> Vec<Fallback> {
    config
        .fallbacks
        .iter()
        .map(|f| Fallback {
            globs: f.models.iter().map(|g| WildMatch::new(g)).collect(),
            to: f.to.iter().map(|m| Arc::from(m.as_str())).collect(),
            after: f.after,
        })
        .collect()
}

/// Whether `pool` is a budget's one pool for every credential.
fn is_shared(pool: &Pool) -> bool {
    pool.credential.as_ref() == SHARED || pool.credential.starts_with("shared@")
}

/// The budgets of a config, in its order.
fn specs_of(config: &Config) -> Vec<Spec> {
    config
        .budgets
        .iter()
        .map(|b| Spec {
            name: b.display_name().into(),
            globs: b.models.iter().map(|g| WildMatch::new(g)).collect(),
            limits: Limits {
                per_minute: [b.rpm, b.tpm, b.ipm],
                burst: b.burst,
                margin: b.safety_margin,
                safety: 1.0,
            },
            max_in_flight: b.max_in_flight,
            shared: b.shared,
            upstream: b.upstream.as_ref().and_then(|u| {
                (0..config.upstream.all().len()).find(|&i| config.upstream.name_of(i) == *u)
            }),
        })
        .collect()
}

fn routes_of(config: &Config) -> Vec<UpRoute> {
    (0..config.upstream.all().len())
        .map(|i| {
            let u = &config.upstream.all()[i];
            UpRoute {
                globs: u.models.iter().map(|g| WildMatch::new(g)).collect(),
                credential: config.upstream.credential(i).into(),
                shared: match i {
                    0 => SHARED.into(),
                    i => format!("{SHARED}@{}", config.upstream.name_of(i)).into(),
                },
                azure: u.kind == crate::config::UpstreamKind::Azure,
                weight: u64::from(u.weight.max(1)),
            }
        })
        .collect()
}

/// Each `[[client]]`'s class and whether its requests may choose theirs.
fn priorities_of(config: &Config) -> HashMap<String, (Option<Priority>, bool)> {
    config
        .clients
        .iter()
        .map(|c| (c.tenant(), (c.priority, c.priority_header)))
        .collect()
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Registry {
    pub fn new(config: &Config, redis: Option<Arc<Redis>>) -> Registry {
        Registry {
            specs: ArcSwap::from_pointee(specs_of(config)),
            pools: Mutex::new(HashMap::default()),
            depth: Arc::new(AtomicUsize::new(0)),
            max_depth: AtomicUsize::new(config.queue.max_depth),
            max_wait: AtomicU64::new(micros(config.queue.max_wait)),
            priorities: ArcSwap::from_pointee(priorities_of(config)),
            batch_min_share: AtomicU64::new(config.queue.batch_min_share.to_bits()),
            quota_cooldown: config.retry.quota_cooldown,
            refund: config.estimate.refund,
            probe_grace: config.queue.probe_grace,
            learn: config.learn.enabled.then(|| config.learn.clone()),
            redis,
            heard: Mutex::new(foldhash::HashSet::default()),
            breakers: Mutex::new(HashMap::default()),
            ups: routes_of(config),
            fallbacks: ArcSwap::from_pointee(fallbacks_of(config)),
        }
    }

    /// The fallbacks of `model` and how long it is waited for first.
    fn fallback_for(&self, model: &str) -> Option<(Vec<Arc<str>>, Duration)> {
        let all = self.fallbacks.load();
        let f = all
            .iter()
            .find(|f| f.globs.iter().any(|g| g.matches(model)))?;
        Some((f.to.clone(), f.after))
    }

    /// Where a request may go, best first: with several upstreams, a
    /// request of penstock's own key that makes no object goes to any
    /// upstream serving its model whose breaker lets calls through (all
    /// of them, should every one be out); an Azure-shaped one to the Azure
    /// upstreams. Anything else goes to the first, on its own credential.
    fn candidates(
        &self,
        ctx: &RequestContext,
        model: Option<&str>,
        azure_shaped: bool,
        upstream: &dyn Upstreams,
    ) -> Candidates {
        let alone = || smallvec::smallvec![(0, ctx.credential.clone())];
        if self.ups.len() <= 1 || ctx.credential.as_ref() != "sidecar" {
            return alone();
        }
        let Some(model) = model else {
            return alone();
        };
        let serving: Vec<usize> = (0..self.ups.len())
            .filter(|&i| {
                let u = &self.ups[i];
                (u.globs.is_empty() || u.globs.iter().any(|g| g.matches(model)))
                    && (!azure_shaped || u.azure)
            })
            .collect();
        let first = serving.first().copied().unwrap_or(0);
        let failed = ctx.failed_upstreams.load(Ordering::Relaxed);
        let failed_here = |i: usize| i < 64 && failed & (1 << i) != 0;
        let mut open: Vec<usize> = match ctx.spread {
            true => serving
                .iter()
                .copied()
                .filter(|&i| !upstream.unavailable(i) && !failed_here(i))
                .collect(),
            false => vec![first],
        };
        if open.is_empty() {
            open = serving
                .iter()
                .copied()
                .filter(|&i| !upstream.unavailable(i))
                .collect();
        }
        if open.is_empty() {
            open = serving;
        }
        if open.is_empty() {
            open.push(first);
        }
        // Where several could take it at once, the least busy for its
        // weight goes first (a stable sort: equals keep the config's order).
        open.sort_by_key(|&i| {
            (upstream.in_flight(i) as u64).saturating_mul(1_000_000) / self.ups[i].weight
        });
        open.into_iter()
            .map(|i| (i, self.ups[i].credential.clone()))
            .collect()
    }

    /// A request's class: what its `x-penstock-priority` asks, unless its
    /// `[[client]]` forbids choosing; else its `[[client]]`'s; else batch
    /// for an async job and interactive for the rest.
    pub(crate) fn class_of(
        &self,
        tenant: &str,
        asked: Option<&http::HeaderValue>,
        job: bool,
    ) -> Priority {
        let priorities = self.priorities.load();
        let (configured, may_choose) = priorities.get(tenant).copied().unwrap_or((None, true));
        let asked = asked
            .filter(|_| may_choose)
            .and_then(|v| v.to_str().ok())
            .and_then(Priority::parse);
        asked.or(configured).unwrap_or(match job {
            true => Priority::Batch,
            false => Priority::Interactive,
        })
    }

    fn batch_min_share(&self) -> f64 {
        f64::from_bits(self.batch_min_share.load(Ordering::Relaxed))
    }

    /// How long a request may wait for budget (`queue.max_wait`).
    pub(crate) fn max_wait(&self) -> Duration {
        Duration::from_micros(self.max_wait.load(Ordering::Relaxed))
    }

    /// A reloaded config's budgets and queue, for requests from now on. A
    /// budget still there by name (and as shared or not as before) keeps its
    /// pools, their ledgers, queues and calls in flight, with the new limits
    /// in place; a new budget starts empty; a removed budget's waiters look
    /// again for the pool that covers their model now. Learned pools keep
    /// what they learned. Returns the names of the budgets removed.
    pub(crate) fn reconfigure(&self, config: &Config) -> Vec<Arc<str>> {
        let new = specs_of(config);
        let max_depth = config.queue.max_depth;
        let mut retired = Vec::new();
        let kept: Vec<Arc<Pool>> = {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            let old = self.specs.load_full();
            let mut next = HashMap::default();
            for ((idx, credential), pool) in pools.drain() {
                if idx == LEARNED {
                    next.insert((idx, credential), pool);
                    continue;
                }
                let was = &old[idx];
                match new.iter().position(|s| {
                    s.name == was.name && s.shared == was.shared && s.upstream == was.upstream
                }) {
                    Some(j) => {
                        pool.reconfigure(new[j].limits, new[j].max_in_flight);
                        next.insert((j, credential), pool);
                    }
                    None => retired.push(pool),
                }
            }
            *pools = next;
            // Swapped under the pools' lock: a request finds its pool with
            // the specs its key was made from.
            self.specs.store(Arc::new(new));
            self.max_depth.store(max_depth, Ordering::Relaxed);
            self.max_wait
                .store(micros(config.queue.max_wait), Ordering::Relaxed);
            self.priorities.store(Arc::new(priorities_of(config)));
            self.fallbacks.store(Arc::new(fallbacks_of(config)));
            self.batch_min_share
                .store(config.queue.batch_min_share.to_bits(), Ordering::Relaxed);
            pools.values().cloned().collect()
        };
        for pool in kept {
            pool.set_max_depth(max_depth);
            pool.set_batch_min_share(config.queue.batch_min_share);
        }
        let mut removed: Vec<Arc<str>> = Vec::new();
        for pool in retired {
            if !removed.contains(&pool.name) {
                removed.push(pool.name.clone());
            }
            pool.retire();
        }
        removed
    }

    fn remote(&self, name: &str, credential: &str) -> Option<Remote> {
        let redis = self.redis.as_ref()?;
        Some(Remote {
            redis: redis.clone(),
            key: redis.pool_key(name, credential),
        })
    }

    /// The pool that pays for `model` with `credential`: its configured
    /// budget's, else one that learns the upstream's limits for that model.
    pub fn pool(&self, model: &str, credential: &Arc<str>) -> Option<Arc<Pool>> {
        self.pool_at(model, credential, 0)
    }

    /// [`Registry::pool`] on upstream `up`: a budget naming another
    /// upstream does not count.
    pub(crate) fn pool_at(
        &self,
        model: &str,
        credential: &Arc<str>,
        up: usize,
    ) -> Option<Arc<Pool>> {
        // Idle pools are swept by [`Registry::evict_periodically`], not here:
        // a request takes this lock and nothing else.
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let specs = self.specs.load();
        let idx = specs.iter().position(|s| {
            s.upstream.is_none_or(|u| u == up) && s.globs.iter().any(|g| g.matches(model))
        });
        let Some(idx) = idx else {
            return self.learned_pool(&mut pools, model, credential);
        };
        let credential = match specs[idx].shared {
            true => self
                .ups
                .get(up)
                .map_or_else(|| SHARED.into(), |u| u.shared.clone()),
            false => credential.clone(),
        };
        let pool = pools.entry((idx, credential.clone())).or_insert_with(|| {
            let spec = &specs[idx];
            let pool = Pool::start(
                spec.name.clone(),
                credential.clone(),
                Settings {
                    limits: spec.limits,
                    max_in_flight: spec.max_in_flight,
                    probe_grace: self.probe_grace,
                    learner: None,
                    remote: self.remote(&spec.name, &credential),
                },
                self.depth.clone(),
                self.max_depth.load(Ordering::Relaxed),
            );
            pool.set_batch_min_share(self.batch_min_share());
            pool
        });
        Some(pool.clone())
    }

    /// A pool for a model no budget covers, per credential and model (OpenAI's
    /// limits are per model), while `[learn]` is on. Model names come from
    /// clients: only plain ones, and only so many pools.
    fn learned_pool(
        &self,
        pools: &mut HashMap<PoolKey, Arc<Pool>>,
        model: &str,
        credential: &Arc<str>,
    ) -> Option<Arc<Pool>> {
        let learn = self.learn.as_ref()?;
        let plain = model.len() <= 64
            && model
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
        if !plain {
            return None;
        }
        let key: PoolKey = (LEARNED, format!("{credential}#{model}").into());
        if let Some(pool) = pools.get(&key) {
            return Some(pool.clone());
        }
        // Model names come from clients: pools of models the upstream has
        // answered for (a success, a rate limit) count against one bound,
        // pools of models not yet answered for against another, so junk
        // names can never take the room real models need. (A model without
        // a pool passes unbudgeted, as an open learned pool would.)
        let heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        let known = heard.contains(model);
        let (mut answered, mut unanswered) = (0usize, 0usize);
        for (_, name) in pools.keys().filter(|(i, _)| *i == LEARNED) {
            let of = name.rsplit_once('#').map_or("", |(_, m)| m);
            match heard.contains(of) {
                true => answered += 1,
                false => unanswered += 1,
            }
        }
        drop(heard);
        let full = match known {
            true => answered >= MAX_LEARNED_POOLS,
            false => unanswered >= MAX_LEARNED_POOLS,
        };
        if full {
            return None;
        }
        let name: Arc<str> = format!("learned:{model}").into();
        let pool = Pool::start(
            name.clone(),
            credential.clone(),
            Settings {
                limits: Limits {
                    per_minute: [None; 3],
                    burst: learn.burst,
                    margin: learn.safety_margin,
                    safety: learn.safety,
                },
                max_in_flight: None,
                probe_grace: self.probe_grace,
                learner: Some(Learner::new(learn.max_in_flight)),
                remote: self.remote(&name, credential),
            },
            self.depth.clone(),
            self.max_depth.load(Ordering::Relaxed),
        );
        pool.set_batch_min_share(self.batch_min_share());
        pools.insert(key, pool.clone());
        Some(pool)
    }

    /// A credential's money is gone (its organization/project's): its calls
    /// through a shared pool are answered with `tripped` until it ends.
    pub(crate) fn trip(&self, credential: &Arc<str>, tripped: Tripped) {
        let mut breakers = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        breakers.retain(|_, t| t.until > now);
        breakers.insert(credential.clone(), Arc::new(tripped));
    }

    /// Every open breaker: its credential and how long it stays open.
    pub(crate) fn breakers(&self) -> Vec<(Arc<str>, Duration)> {
        let breakers = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        breakers
            .iter()
            .filter(|(_, t)| t.until > now)
            .map(|(c, t)| (c.clone(), t.until.saturating_duration_since(now)))
            .collect()
    }

    /// The open breaker of `credential`, if any.
    pub(crate) fn tripped(&self, credential: &Arc<str>) -> Option<Arc<Tripped>> {
        let breakers = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        breakers
            .get(credential)
            .filter(|t| t.until > tokio::time::Instant::now())
            .cloned()
    }

    /// The upstream answered a call for `model` that no pool paid for: a
    /// success, or a refusal for its rate limit (with what it announced and
    /// how long to hold). The model gets a learned pool from now on, paused
    /// by the refusal. Bounded as learned pools are.
    pub(crate) fn heard(
        &self,
        model: &str,
        credential: &Arc<str>,
        up: usize,
        refused: Option<(&RateLimitHeaders, Duration)>,
    ) {
        if self.learn.is_none() {
            return;
        }
        {
            let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
            if !heard.contains(model) {
                if heard.len() >= MAX_LEARNED_POOLS {
                    return;
                }
                heard.insert(model.into());
            }
        }
        let pool = self.pool_at(model, credential, up);
        if let (Some((headers, delay)), Some(pool)) = (refused, pool) {
            pool.hear(headers);
            pool.pause(tokio::time::Instant::now() + delay);
        }
    }

    /// Drops pools nobody uses any more (in pass-through mode every API key has
    /// its own). Under the map's lock, a pool held only by the map and its own
    /// admission task cannot be picked up by a request meanwhile.
    fn evict_idle(pools: &mut HashMap<PoolKey, Arc<Pool>>) {
        pools.retain(|_, pool| {
            let unused = Arc::strong_count(pool) <= 2 && pool.is_idle();
            if unused {
                pool.close();
            }
            !unused
        });
    }

    /// Every pool now, taken out of the lock.
    fn all_pools(&self) -> Vec<Arc<Pool>> {
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Shutting down: every pool answers what still waits (it could not go
    /// in time) and admits nothing more.
    pub(crate) fn close_queues(&self) {
        let pools = self.all_pools();
        for pool in pools {
            pool.close_queue();
        }
    }

    /// How many pools exist.
    pub fn len(&self) -> usize {
        self.pools.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn status(&self) -> Vec<PoolStatus> {
        let pools = self.all_pools();
        let mut out: Vec<PoolStatus> = pools.iter().map(|p| p.status()).collect();
        out.sort_by(|a, b| (&a.name, &a.credential).cmp(&(&b.name, &b.credential)));
        out
    }

    /// The busiest pools (waiting, then in flight), at most `n`, for `/status`:
    /// in pass-through mode every key has pools, and a page must stay small.
    /// With `filter`, only pools whose name or credential contains it
    /// (ignoring case).
    pub(crate) fn busiest(&self, n: usize, filter: Option<&str>) -> Vec<PoolStatus> {
        let mut all = self.status();
        if let Some(f) = filter.map(str::to_lowercase).filter(|f| !f.is_empty()) {
            all.retain(|p| {
                p.name.to_lowercase().contains(&f) || p.credential.to_lowercase().contains(&f)
            });
        }
        all.sort_by_key(|p| std::cmp::Reverse((p.queue_depth, p.in_flight)));
        all.truncate(n);
        all.sort_by(|a, b| (&a.name, &a.credential).cmp(&(&b.name, &b.credential)));
        all
    }

    /// Evicts idle pools every [`EVICT_EVERY`], so departed keys' pools go
    /// even when no request comes to trigger it. Ends with the registry.
    pub fn evict_periodically(self: &Arc<Self>) {
        let registry = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(EVICT_EVERY).await;
                let Some(registry) = registry.upgrade() else {
                    return;
                };
                let mut pools = registry.pools.lock().unwrap_or_else(|e| e.into_inner());
                Registry::evict_idle(&mut pools);
            }
        });
    }
}

#[derive(Clone)]
pub(crate) struct Layer {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    own_orgs: Arc<OwnOrgs>,
    upstream: Arc<dyn Upstreams>,
}

impl Layer {
    /// `own_orgs` learns each key's own organization from the answers (the
    /// edge reads it to tell pools apart); `upstream` says which upstreams'
    /// breakers let calls through.
    pub(crate) fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        own_orgs: Arc<OwnOrgs>,
        upstream: Arc<dyn Upstreams>,
    ) -> Layer {
        Layer {
            registry,
            metrics,
            own_orgs,
            upstream,
        }
    }
}

impl<S> tower::Layer<S> for Layer {
    type Service = Budget<S>;
    fn layer(&self, inner: S) -> Budget<S> {
        Budget {
            inner,
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            own_orgs: self.own_orgs.clone(),
            upstream: self.upstream.clone(),
        }
    }
}

/// A call that named no organization was billed to the one its answer
/// names: the key's own.
fn learn_own_org(own: &OwnOrgs, ctx: &RequestContext, answer: &http::HeaderMap) {
    if ctx.headers.contains_key(name::OPENAI_ORGANIZATION) {
        return;
    }
    if let Some(org) = answer
        .get(name::OPENAI_ORGANIZATION)
        .and_then(|v| v.to_str().ok())
    {
        own.learn(&ctx.tenant.0, org);
    }
}

/// Admission, and the accounting of every successful answer (budgeted or not):
/// the tokens it reported, its images and its cost.
#[derive(Clone)]
pub(crate) struct Budget<S> {
    inner: S,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    own_orgs: Arc<OwnOrgs>,
    upstream: Arc<dyn Upstreams>,
}

impl<S: crate::vocab::service::Inner> Service<Request<Payload>> for Budget<S> {
    type Response = Response<Body>;
    type Error = ProxyError;
    // Boxed: admission is a wait of its own before the inner call.
    type Future = crate::vocab::service::BoxCall;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        // Waiting happens inside the call, with a deadline, never here.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Payload>) -> Self::Future {
        let mut inner = self.inner.clone();
        let ctx = req.body().ctx.clone();
        // Where it may go: one upstream, or several it waits for at once.
        let azure_shaped = req.uri().path().starts_with("/openai/");
        let candidates = ctx.as_ref().map(|c| {
            self.registry
                .candidates(c, c.model.as_deref(), azure_shaped, &*self.upstream)
        });
        let several = self.upstream.count() > 1;
        // Fallback models: configured for its model, a JSON or multipart
        // body naming it, and not refused by the request.
        let fallback = ctx.as_ref().and_then(|c| {
            let refused = c
                .headers
                .get(name::FALLBACK)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"none"));
            let rewritable = c.headers.get(http::header::CONTENT_TYPE).is_some_and(|v| {
                let v = v.as_bytes();
                v.starts_with(b"application/json") || v.starts_with(b"multipart/form-data")
            });
            if refused || !rewritable || azure_shaped {
                return None;
            }
            self.registry.fallback_for(c.model.as_deref()?)
        });
        // Fallbacks look for upstreams again.
        let fallback = fallback.map(|(to, after)| (to, after, self.upstream.clone()));
        let max_wait = self.registry.max_wait();
        let quota_cooldown = self.registry.quota_cooldown;
        let refund = self.registry.refund;
        let account = Account {
            metrics: self.metrics.clone(),
            ctx: ctx.clone(),
            model: None,
        };
        // A Responses request's image tool spends the image model's pool
        // (a Responses request stays with the first upstream).
        let tool = ctx.as_ref().and_then(|c| {
            let (model, cost) = c.image_tool.as_deref()?;
            Some((self.registry.pool(model, &c.credential)?, *cost))
        });
        let registry = self.registry.clone();
        let own_orgs = self.own_orgs.clone();
        // Async jobs wait as batch unless they say otherwise.
        let class = ctx.as_ref().map_or(Priority::Interactive, |c| {
            registry.class_of(
                &c.tenant.0,
                c.headers.get(name::PRIORITY),
                req.body().gate.is_some(),
            )
        });
        Box::pin(async move {
            let tool = match (tool, &account.ctx) {
                (Some((tool_pool, cost)), Some(ctx)) => {
                    let left = ctx
                        .deadline
                        .saturating_duration_since(tokio::time::Instant::now());
                    let max_wait = ctx.max_wait.map_or(max_wait, |m| m.min(max_wait)).min(left);
                    let permit = tool_pool
                        .acquire_as(&ctx.tenant.0, class, cost, max_wait, &Places::default())
                        .await
                        .map_err(ProxyError::from)?;
                    // Counted from when the call leaves, as the call's own.
                    req.body_mut().departure = Some(permit.departure(None));
                    Some(ToolPermit {
                        pool: tool_pool,
                        permit,
                    })
                }
                _ => None,
            };
            let Some((candidates, ctx)) = candidates.zip(account.ctx.clone()) else {
                let resp = crate::vocab::service::call_now(&mut inner, req).await?;
                let tool = ToolPermit::after(tool, &resp);
                return Ok(if resp.status().is_success() {
                    Settle::wrap(resp, None, tool, refund, account)
                } else {
                    resp
                });
            };
            // The client's own limit, and what is left of the request's deadline.
            let left = ctx
                .deadline
                .saturating_duration_since(tokio::time::Instant::now());
            let max_wait = ctx.max_wait.map_or(max_wait, |m| m.min(max_wait)).min(left);
            let alternatives = candidates.len() > 1 || fallback.is_some();
            let began = tokio::time::Instant::now();
            let (admitted, chosen) = match fallback {
                None => (
                    admit(
                        &registry,
                        &ctx,
                        ctx.model.as_deref(),
                        class,
                        max_wait,
                        candidates,
                    )
                    .await?,
                    None,
                ),
                Some((to, after, upstream)) => {
                    let spent = ctx.spent_upstreams.load(Ordering::Relaxed);
                    let out = |c: &[(usize, Arc<str>)]| {
                        c.iter().all(|(i, _)| {
                            upstream.unavailable(*i) || (*i < 64 && spent & (1 << i) != 0)
                        })
                    };
                    // Every upstream of the model out (spent, refusing,
                    // down): straight to the fallbacks.
                    let first = match out(&candidates) {
                        true => None,
                        false => Some(
                            admit(
                                &registry,
                                &ctx,
                                ctx.model.as_deref(),
                                class,
                                after.min(max_wait),
                                candidates.clone(),
                            )
                            .await,
                        ),
                    };
                    match first {
                        Some(Ok(admitted)) => (admitted, None),
                        Some(Err(e)) if !e.model_unavailable() => return Err(e),
                        first => {
                            let mut last = first.and_then(Result::err);
                            let mut found = None;
                            for model in &to {
                                let c = registry.candidates(&ctx, Some(model), false, &*upstream);
                                if out(&c) {
                                    continue;
                                }
                                let left = max_wait.saturating_sub(began.elapsed());
                                match admit(&registry, &ctx, Some(model), class, left, c).await {
                                    Ok(admitted) => {
                                        found = Some((admitted, model.clone()));
                                        break;
                                    }
                                    Err(e) => last = Some(e),
                                }
                            }
                            match (found, last) {
                                (Some((admitted, model)), _) => (admitted, Some(model)),
                                (None, Some(e)) => return Err(e),
                                // Nothing could be tried: the asked model, as
                                // without fallbacks.
                                (None, None) => (
                                    admit(
                                        &registry,
                                        &ctx,
                                        ctx.model.as_deref(),
                                        class,
                                        max_wait.saturating_sub(began.elapsed()),
                                        candidates,
                                    )
                                    .await?,
                                    None,
                                ),
                            }
                        }
                    }
                }
            };
            let Admitted {
                up,
                credential,
                pool,
            } = admitted;
            if several {
                req.body_mut().upstream = u8::try_from(up).ok();
            }
            // A fallback: the body names it, and everything after counts it.
            if let Some(model) = &chosen {
                let body = req.body_mut();
                let content_type = ctx
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok());
                if let Some(renamed) =
                    crate::vocab::fields::with_model(&body.bytes, content_type, model)
                {
                    body.bytes = Bytes::from(renamed);
                }
                body.model = Some(model.clone());
            }
            let account = Account {
                model: chosen.clone(),
                ..account
            };
            let model_now: Option<Arc<str>> = chosen
                .clone()
                .or_else(|| ctx.model.as_deref().map(Arc::from));
            let Some((pool, permit)) = pool else {
                let result = crate::vocab::service::call_now(&mut inner, req).await;
                if alternatives {
                    note_failure(&ctx, up, &result);
                }
                let mut resp = result?;
                if alternatives {
                    mark_failover(&mut resp);
                }
                announce_model(&mut resp, chosen.as_deref());
                let tool = ToolPermit::after(tool, &resp);
                learn_own_org(&own_orgs, &ctx, resp.headers());
                // A model the upstream answers for gets its learned pool from
                // now on (refused for its rate limit: paused at once).
                if let Some(model) = model_now.as_deref() {
                    match classify::of(&resp) {
                        Some(c) if c.class == Class::Success => {
                            registry.heard(model, &credential, up, None)
                        }
                        Some(c) if c.class == Class::RateLimited => {
                            let hints = RateLimitHeaders::parse(resp.headers());
                            let delay = c
                                .retry_after
                                .or_else(|| hints.exhausted_until())
                                .unwrap_or(DEFAULT_PAUSE);
                            registry.heard(model, &credential, up, Some((&hints, delay)));
                        }
                        _ => {}
                    }
                }
                return Ok(if resp.status().is_success() {
                    Settle::wrap(resp, None, tool, refund, account)
                } else {
                    resp
                });
            };
            pool.queue_wait
                .get_or_init(|| account.metrics.queue_wait(&pool.name))
                .observe(permit.queued.as_secs_f64());
            req.body_mut().departure = Some(permit.departure(tool.as_ref().map(|t| &t.permit)));
            let result = crate::vocab::service::call_now(&mut inner, req).await;
            if alternatives {
                note_failure(&ctx, up, &result);
            }
            let mut resp = match result {
                Ok(resp) => resp,
                Err(e) => {
                    // Nothing went (the upstream's breaker): nothing is charged.
                    if e.unsent() {
                        permit.settle(&Cost::default());
                    }
                    return Err(e);
                }
            };
            if alternatives {
                mark_failover(&mut resp);
            }
            announce_model(&mut resp, chosen.as_deref());
            learn_own_org(&own_orgs, &ctx, resp.headers());
            let tool = ToolPermit::after(tool, &resp);
            let classified = classify::of(&resp);
            {
                // Scoped: nothing of it is kept across the awaits below, so it
                // does not grow every queued request's future.
                let hints = RateLimitHeaders::parse(resp.headers());
                permit.observe(&hints);
                if let Some(c) = classified {
                    let rate_limited = c.class == Class::RateLimited;
                    permit.learn(&hints, rate_limited);
                    if rate_limited {
                        // How long to hold the pool: the upstream's retry-after,
                        // else the reset of what it says is used up.
                        let delay = c
                            .retry_after
                            .or_else(|| hints.exhausted_until())
                            .unwrap_or(DEFAULT_PAUSE);
                        pool.pause(tokio::time::Instant::now() + delay);
                    }
                }
            }
            if classified.is_some_and(|c| c.class != Class::RateLimited) {
                permit.recovered();
            }
            // Over all attempts of the request: what the client waited in all.
            let mut queued = permit.queued;
            if let Some(ctx) = &account.ctx {
                ctx.tally.update(|t| t.queued += permit.queued);
                queued = ctx.tally.get().queued;
            }
            let queued = number(u64::try_from(queued.as_millis()).unwrap_or(u64::MAX));
            resp.headers_mut().insert(name::QUEUE_MS, queued);
            match classified.map(|c| c.class) {
                Some(Class::Success) => Ok(Settle::wrap(resp, Some(permit), tool, refund, account)),
                Some(Class::QuotaExhausted) if !quota_cooldown.is_zero() => {
                    // Error bodies arrive buffered from the upstream layer.
                    let (parts, body) = resp.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let tripped = Tripped {
                        until: tokio::time::Instant::now() + quota_cooldown,
                        status: parts.status,
                        headers: parts.headers.clone(),
                        body: body.clone(),
                    };
                    // The money of the organization/project that paid: a
                    // pool one credential pays for stops; in a pool shared
                    // by every key, only this credential's calls do.
                    if is_shared(&pool) {
                        tracing::warn!(pool = %pool.name, %credential, cooldown = %humantime::format_duration(quota_cooldown), "upstream quota exhausted: answering this credential's requests with it");
                        registry.trip(&credential, tripped);
                    } else {
                        tracing::warn!(pool = %pool.name, cooldown = %humantime::format_duration(quota_cooldown), "upstream quota exhausted: answering this pool's requests with it");
                        pool.trip(tripped);
                    }
                    Ok(Response::from_parts(parts, crate::vocab::body::full(body)))
                }
                class => {
                    // A call the upstream's limiter refused was not charged its
                    // tokens or images, only counted as a request; what a failed
                    // call was charged is kept unless configured otherwise.
                    if class == Some(Class::RateLimited) || refund >= Refund::Failed {
                        permit.settle(&Cost {
                            requests: permit.estimate().requests,
                            ..Cost::default()
                        });
                    }
                    Ok(resp)
                }
            }
        })
    }
}

/// An answer another upstream could do better than: penstock's key refused,
/// the money gone, a rate limit. Its retry goes at once (a failure, a 5xx,
/// is retried as ever, after a backoff and within the retry budget, so a
/// failing upstream is not hammered before its breaker opens).
fn mark_failover(resp: &mut Response<Body>) {
    let refused = matches!(
        resp.status(),
        http::StatusCode::UNAUTHORIZED | http::StatusCode::FORBIDDEN
    );
    let other_could = classify::of(resp)
        .is_some_and(|c| matches!(c.class, Class::QuotaExhausted | Class::RateLimited));
    if refused || other_could {
        resp.extensions_mut()
            .insert(crate::vocab::context::Failover);
    }
}

/// An answer of a fallback model says which (`x-penstock-model`).
fn announce_model(resp: &mut Response<Body>, model: Option<&str>) {
    if let Some(v) = model.and_then(|m| http::HeaderValue::try_from(m).ok()) {
        resp.headers_mut().insert(name::MODEL, v);
    }
}

/// Upstream `up` failed this request (no answer, a 5xx, its key refused,
/// its money gone): the request's retries go elsewhere while they can.
fn note_failure(ctx: &RequestContext, up: usize, result: &Result<Response<Body>, ProxyError>) {
    let failed = match result {
        Err(e) => e.unanswered().is_some() || e.unsent(),
        Ok(resp) => {
            matches!(
                resp.status(),
                http::StatusCode::UNAUTHORIZED | http::StatusCode::FORBIDDEN
            ) || classify::of(resp)
                .is_some_and(|c| matches!(c.class, Class::Transient | Class::QuotaExhausted))
        }
    };
    let spent = match result {
        Ok(resp) => {
            matches!(
                resp.status(),
                http::StatusCode::UNAUTHORIZED | http::StatusCode::FORBIDDEN
            ) || classify::of(resp).is_some_and(|c| c.class == Class::QuotaExhausted)
        }
        Err(_) => false,
    };
    if failed && up < 64 {
        ctx.failed_upstreams.fetch_or(1 << up, Ordering::Relaxed);
    }
    if spent && up < 64 {
        ctx.spent_upstreams.fetch_or(1 << up, Ordering::Relaxed);
    }
}

/// Where admission sent a request: which upstream, on which credential,
/// and the pool that paid (none: no pool limits its model there).
struct Admitted {
    up: usize,
    credential: Arc<str>,
    pool: Option<(Arc<Pool>, Permit)>,
}

/// Waits for a turn on one of `candidates`. With several, the request waits
/// in each one's queue at once and goes with the first to admit it (ties go
/// by the config's order: futures are polled in it); its places in the
/// others are given up as it goes, so it is tied to no upstream until sent.
async fn admit(
    registry: &Registry,
    ctx: &RequestContext,
    model: Option<&str>,
    class: Priority,
    max_wait: Duration,
    mut candidates: Candidates,
) -> Result<Admitted, ProxyError> {
    if candidates.len() <= 1 {
        let only = candidates.pop().unwrap_or((0, ctx.credential.clone()));
        let places = Places::default();
        return admit_at(registry, ctx, model, class, max_wait, only, &places).await;
    }
    // One place against `queue.max_depth`, however many queues it waits in.
    let places = Places::several();
    let races: Vec<_> = candidates
        .into_iter()
        .map(|candidate| {
            Box::pin(admit_at(
                registry, ctx, model, class, max_wait, candidate, &places,
            ))
        })
        .collect();
    futures_util::future::select_ok(races)
        .await
        .map(|(admitted, _others)| admitted)
}

/// Waits for a turn on upstream `up`'s pool for the request's model.
async fn admit_at(
    registry: &Registry,
    ctx: &RequestContext,
    model: Option<&str>,
    class: Priority,
    max_wait: Duration,
    (up, credential): (usize, Arc<str>),
    places: &Places,
) -> Result<Admitted, ProxyError> {
    let pool = model.and_then(|m| registry.pool_at(m, &credential, up));
    let model = model.unwrap_or_default();
    let Some(mut pool) = pool else {
        return Ok(Admitted {
            up,
            credential,
            pool: None,
        });
    };
    if is_shared(&pool)
        && let Some(t) = registry.tripped(&credential)
    {
        return Err(Refusal::CircuitOpen(t).into());
    }
    let began = tokio::time::Instant::now();
    let mut moved = false;
    let mut permit = loop {
        let left = max_wait.saturating_sub(began.elapsed());
        match pool
            .acquire_as(&ctx.tenant.0, class, ctx.cost, left, places)
            .await
        {
            // A reload removed its budget while it waited: it waits on
            // (within the same limit) for the pool covering its model now.
            Err(Refusal::Moved { pool: gone }) => match registry.pool_at(model, &credential, up) {
                Some(next) if !Arc::ptr_eq(&next, &pool) => {
                    pool = next;
                    moved = true;
                }
                _ => return Err(Refusal::Moved { pool: gone }.into()),
            },
            other => break other.map_err(ProxyError::from)?,
        }
    };
    if moved {
        // Its wait in all, in both pools.
        permit.queued = began.elapsed();
    }
    // Its credential's money ran out while it waited: it is not sent, and
    // charged nothing.
    if is_shared(&pool)
        && let Some(t) = registry.tripped(&credential)
    {
        permit.settle(&Cost::default());
        return Err(Refusal::CircuitOpen(t).into());
    }
    Ok(Admitted {
        up,
        credential,
        pool: Some((pool, permit)),
    })
}

/// A Responses call's admission to its image tool's pool.
struct ToolPermit {
    pool: Arc<Pool>,
    permit: Permit,
}

impl ToolPermit {
    /// What the answer does to the tool's admission: a refusal for the image
    /// model's limits (its 429 speaks of images) teaches and pauses the
    /// image pool; any failure gives the image back; a success keeps the
    /// permit until its body says whether the tool was called.
    fn after(tool: Option<ToolPermit>, resp: &Response<Body>) -> Option<Permit> {
        let tool = tool?;
        let class = classify::of(resp);
        if class.is_some_and(|c| c.class == Class::Success) {
            return Some(tool.permit);
        }
        if let Some(c) = class.filter(|c| c.class == Class::RateLimited) {
            let hints = RateLimitHeaders::parse(resp.headers());
            if hints.images.is_some() || hints.limits[2].is_some() {
                tool.permit.learn(&hints, true);
                let delay = c
                    .retry_after
                    .or_else(|| hints.exhausted_until())
                    .unwrap_or(DEFAULT_PAUSE);
                tool.pool.pause(tokio::time::Instant::now() + delay);
            }
        }
        tool.permit.settle(&Cost::default());
        None
    }
}

/// Where a finished answer is accounted.
struct Account {
    metrics: Arc<Metrics>,
    ctx: Option<Arc<RequestContext>>,
    /// The model that answered, when a fallback did (priced as itself).
    model: Option<Arc<str>>,
}

impl Account {
    /// Records the answer once: tokens estimated and reported, images, cost.
    fn record(&self, usage: Option<&Usage>) {
        let ctx = self.ctx.as_deref();
        let usd = self.metrics.answered(
            self.model
                .as_deref()
                .or_else(|| ctx.and_then(|c| c.model.as_deref())),
            &match &self.model {
                Some(m) => self.metrics.model_label(Some(m)),
                None => self.metrics.label_of(ctx),
            },
            ctx.map_or(0, |c| c.cost.tokens),
            usage,
            ctx.and_then(|c| c.image.as_deref()),
        );
        if let Some(ctx) = ctx {
            ctx.tally.update(|t| {
                t.tokens = usage.map(|u| u.total);
                t.cost_usd += usd;
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// Passes a successful response through untouched, keeping only its last bytes.
    /// At the end it settles the call's estimate with the `usage` found there and
    /// accounts the answer; dropped early (the client left), it accounts it on
    /// the estimate. Either way the call's time in flight ends with it.
    pub(crate) struct Settle {
        #[pin]
        inner: Body,
        permit: Option<Permit>,
        // A Responses call's image tool, kept only if the answer says the
        // tool was called.
        tool: Option<Permit>,
        refund: Refund,
        account: Option<Account>,
        tail: Tail,
    }

    impl PinnedDrop for Settle {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(account) = this.account.take() {
                account.record(None);
            }
        }
    }
}

impl Settle {
    fn wrap(
        resp: Response<Body>,
        permit: Option<Permit>,
        tool: Option<Permit>,
        refund: Refund,
        account: Account,
    ) -> Response<Body> {
        let tail = Tail::new(Encoding::of(resp.headers()), MAX_DECODED);
        resp.map(|inner| {
            Settle {
                inner,
                permit,
                tool,
                refund,
                account: Some(account),
                tail,
            }
            .boxed()
        })
    }
}

impl HttpBody for Settle {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
            this.tail.push(data);
        }
        // A body of known length is not polled past its last byte: settle then.
        if this.account.is_some() && (frame.is_none() || this.inner.is_end_stream()) {
            if let Some(tool) = this.tool.take() {
                // The answer's tool usage says the image was made (more
                // tokens than estimated are a debt, as for the call itself);
                // without it the tool was not called: its image is given back.
                match crate::vocab::usage::image_tool(this.tail.decoded()) {
                    Some(used) => {
                        let estimate = tool.estimate();
                        let tokens = match this.refund {
                            Refund::Unused => used.total,
                            _ => used.total.max(estimate.tokens),
                        };
                        tool.settle(&Cost { tokens, ..estimate });
                    }
                    None => tool.settle(&Cost::default()),
                }
            }
            let usage = this.tail.usage();
            // The permit goes with the body's end: the call is over.
            // OpenAI's limiter charged its estimate at arrival and keeps it:
            // more use is a debt, less is given back only when configured.
            if let (Some(permit), Some(usage)) = (this.permit.take(), usage) {
                let estimate = permit.estimate();
                let tokens = match this.refund {
                    Refund::Unused => usage.total,
                    _ => usage.total.max(estimate.tokens),
                };
                permit.settle(&Cost { tokens, ..estimate });
            }
            if let Some(account) = this.account.take() {
                account.record(usage.as_ref());
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BudgetConfig, Config};

    #[tokio::test(start_paused = true)]
    async fn idle_pools_of_departed_keys_are_evicted_and_busy_ones_kept() {
        let config = Config {
            budgets: vec![BudgetConfig {
                name: None,
                models: vec!["m".into()],
                rpm: Some(60),
                tpm: None,
                ipm: None,
                burst: Duration::from_secs(1),
                safety_margin: Duration::ZERO,
                max_in_flight: None,
                shared: false,
                upstream: None,
            }],
            ..Config::default()
        };
        let registry = Arc::new(Registry::new(&config, None));
        registry.evict_periodically();
        let one = Cost {
            requests: 1,
            tokens: 0,
            images: 0,
        };
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) =
            ("key:a".into(), "key:b".into(), "key:c".into());
        let credentials = || {
            let mut v: Vec<String> = registry
                .status()
                .iter()
                .map(|p| p.credential.to_string())
                .collect();
            v.sort();
            v
        };
        let pool_a = registry.pool("m", &a).unwrap();
        drop(
            pool_a
                .acquire(&a, one, Duration::from_secs(1))
                .await
                .unwrap(),
        );
        let gone = Arc::downgrade(&pool_a);
        drop(pool_a);
        // b stays in use: its permit is held throughout.
        let pool_b = registry.pool("m", &b).unwrap();
        let held = pool_b
            .acquire(&b, one, Duration::from_secs(1))
            .await
            .unwrap();
        drop(pool_b);
        tokio::time::sleep(Duration::from_secs(59)).await;
        registry.pool("m", &c).unwrap();
        assert_eq!(
            credentials(),
            ["key:a", "key:b", "key:c"],
            "no sweep within a minute"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        // a's call has left its windows and nobody holds it; b's permit is held;
        // c's pool is held by the map alone, used a second ago, and idle too.
        assert_eq!(credentials(), ["key:b"]);
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert!(
            gone.upgrade().is_none(),
            "the evicted pool's task ended and freed it"
        );
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_pools_go_without_a_request_to_sweep_them() {
        let config = Config {
            budgets: vec![BudgetConfig {
                models: vec!["m".into()],
                rpm: Some(60),
                ..BudgetConfig::default()
            }],
            ..Config::default()
        };
        let registry = Arc::new(Registry::new(&config, None));
        registry.evict_periodically();
        let key: Arc<str> = "key:a".into();
        drop(registry.pool("m", &key).unwrap());
        assert_eq!(registry.len(), 1);
        // Two sweeps later, with no request in between, the pool is gone.
        for _ in 0..2 {
            tokio::time::sleep(EVICT_EVERY + Duration::from_secs(1)).await;
        }
        assert_eq!(registry.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn junk_model_names_never_take_the_room_real_models_need() {
        let registry = Registry::new(&Config::default(), None);
        let key: Arc<str> = "key:a".into();
        for i in 0..MAX_LEARNED_POOLS {
            assert!(registry.pool(&format!("junk-{i}"), &key).is_some());
        }
        assert!(
            registry.pool("junk-more", &key).is_none(),
            "junk is bounded"
        );
        registry.heard("gpt-image-1", &key, 0, None);
        assert!(
            registry.pool("gpt-image-1", &key).is_some(),
            "a model the upstream answered for still gets its pool"
        );
    }
}
