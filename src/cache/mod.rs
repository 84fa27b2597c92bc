//! Identical requests cost one upstream call. While a call is in flight, identical
//! requests wait for it (single flight); its successful answer is then kept in a
//! moka cache, bounded in bytes and time. The call runs in a task of its own: if
//! the client that started it leaves, it still finishes for the others and, being
//! paid for, is still stored. It sits above retries and budgets, so a hit or a
//! coalesced request costs no budget and no attempt.
//!
//! moka's own `get_with` coalesces too, but when its first caller is dropped a
//! waiter runs the init again, which here would be a second paid call; so the
//! in-flight calls live in a small map of shared futures, and moka only stores.
//! That is the local tier; with Redis, a shared tier ([`shared`]) spans every
//! replica. What both keep is a [`stored::Stored`].

mod shared;
mod stored;

use foldhash::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Either, Shared};
use http::{Request, Response};
use tower::Service;

use shared::{Held, Step, across_replicas, hex};
use stored::{SharedCallFailed, Stored};

use crate::config::CacheConfig;
use crate::state::{Kind, Redis};
use crate::telemetry::metrics::Metrics;
use crate::vocab::body::Body;
use crate::vocab::context::{CacheKey, CacheMode, Interest, Payload, RequestContext, Watch};
use crate::vocab::error::ProxyError;

/// A call in flight: its shared answer, and who waits for it.
#[derive(Clone)]
struct InFlight {
    answer: Shared<BoxFuture<'static, Arc<Stored>>>,
    interest: Arc<Interest>,
}

/// A registered call's place in the in-flight map, given up when its task
/// ends however it ends (a panic included), so its key never hangs.
struct Registered {
    inner: Arc<Inner>,
    key: CacheKey,
    interest: Arc<Interest>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut in_flight = self.inner.lock();
        if in_flight
            .get(&self.key)
            .is_some_and(|c| Arc::ptr_eq(&c.interest, &self.interest))
        {
            in_flight.remove(&self.key);
        }
    }
}

struct Inner {
    /// The longest a shared call may take, its body included.
    deadline: Duration,
    cache: moka::future::Cache<CacheKey, Arc<Stored>>,
    in_flight: Mutex<HashMap<CacheKey, InFlight>>,
    max_entry_size: u64,
    ttl: Duration,
    /// `cache.max_size`: the in-process tier's bound, and the shared tier's
    /// across every replica.
    max_size: u64,
    /// With the Redis backend: the cache and the in-flight calls are shared
    /// by every replica.
    redis: Option<Arc<Redis>>,
}

/// The cache's size, for `/status` and metrics.
#[derive(Clone)]
pub struct Handle(Option<Arc<Inner>>);

impl Handle {
    /// Entries and bytes held, after pending evictions have run.
    pub(crate) async fn usage(&self) -> (u64, u64) {
        match &self.0 {
            Some(inner) => {
                inner.cache.run_pending_tasks().await;
                (inner.cache.entry_count(), inner.cache.weighted_size())
            }
            None => (0, 0),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Layer {
    inner: Option<Arc<Inner>>,
    metrics: Arc<Metrics>,
}

impl Layer {
    /// `deadline` bounds a shared call, its body included.
    pub(crate) fn new(
        config: &CacheConfig,
        deadline: Duration,
        metrics: Arc<Metrics>,
        redis: Option<Arc<Redis>>,
    ) -> Layer {
        let inner = config.enabled.then(|| {
            Arc::new(Inner {
                deadline,
                cache: moka::future::Cache::builder()
                    .max_capacity(config.max_size.as_u64())
                    .weigher(|_key: &CacheKey, v: &Arc<Stored>| v.weight())
                    .time_to_live(config.ttl)
                    .build(),
                in_flight: Mutex::new(HashMap::default()),
                max_entry_size: config.max_entry_size.as_u64(),
                ttl: config.ttl,
                max_size: config.max_size.as_u64(),
                redis,
            })
        });
        Layer { inner, metrics }
    }

    pub(crate) fn handle(&self) -> Handle {
        Handle(self.inner.clone())
    }
}

impl<S> tower::Layer<S> for Layer {
    type Service = Coalesce<S>;
    fn layer(&self, service: S) -> Coalesce<S> {
        Coalesce {
            service,
            inner: self.inner.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Coalesce<S> {
    service: S,
    inner: Option<Arc<Inner>>,
    metrics: Arc<Metrics>,
}

/// Counts what a hit or a coalesced request did not spend: what its answer cost
/// the one call that made it.
fn record_saving(
    metrics: &Metrics,
    ctx: Option<&RequestContext>,
    stored: &Stored,
    reason: &'static str,
) {
    if !stored.status.is_success() {
        return;
    }
    let usage = stored.usage();
    let usd = metrics.prices.cost(
        ctx.and_then(|c| c.model.as_deref()).unwrap_or(""),
        usage.as_ref(),
        ctx.and_then(|c| c.image.as_deref()),
    );
    metrics.saved(reason, usd);
    if let Some(c) = ctx {
        c.tally.update(|t| {
            t.tokens = usage.map(|u| u.total);
            t.saved_usd += usd;
        });
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, InFlight>> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the one upstream call for `key` in a task of its own, which stores a
    /// storable answer and (when `register`ed) leaves the in-flight map. If every
    /// caller leaves before the call is sent, the task drops it unsent. The caller
    /// is its first watcher, registered before the task can look.
    fn spawn_call<S>(
        self: &Arc<Self>,
        service: S,
        mut req: Request<Payload>,
        key: CacheKey,
        register: bool,
    ) -> (InFlight, Watch)
    where
        S: crate::vocab::service::Inner,
    {
        let interest = Arc::new(Interest::default());
        let first = interest.watch();
        req.body_mut().interest = Some(interest.clone());
        let inner = self.clone();
        let watching = interest.clone();
        let mut service = service;
        let registered = register.then(|| Registered {
            inner: self.clone(),
            key,
            interest: interest.clone(),
        });
        let deadline = self.deadline;
        let redis = self.redis.clone();
        let task = tokio::spawn(async move {
            let _registered = registered;
            // A moment past the request deadline, so the call's own timeouts,
            // which say more, come first.
            let ends = tokio::time::Instant::now() + deadline + Duration::from_secs(1);
            let hex = redis.as_ref().map(|_| hex(&key));
            // Set when this replica leads the call across replicas.
            let lease: Mutex<Option<Held>> = Mutex::new(None);
            let call = async {
                // Another replica may have the answer, or be making it.
                if let (Some(redis), Some(hex), true) = (&redis, &hex, register) {
                    match across_replicas(redis, hex).await {
                        Step::Answer(stored) => return Ok(stored),
                        Step::Lead(held) => {
                            *lease.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(Held::new(redis.clone(), held));
                        }
                        Step::Alone => {}
                    }
                }
                Err(crate::vocab::service::call_now(&mut service, req).await)
            };
            tokio::pin!(call);
            let result = loop {
                tokio::select! {
                    result = &mut call => break Some(result),
                    _ = tokio::time::sleep_until(ends) => {
                        break Some(Err(Err(SharedCallFailed::too_long(deadline).into())));
                    }
                    _ = watching.abandoned() => {
                        // Re-checked under the lock callers join under.
                        let mut in_flight = inner.lock();
                        if watching.watchers() == 0 && !watching.is_sent() {
                            if register {
                                in_flight.remove(&key);
                            }
                            break None;
                        }
                    }
                }
            };
            let Some(result) = result else {
                return Arc::new(Stored::from_error(SharedCallFailed::from(
                    "every caller left before the call was sent",
                )));
            };
            let result = match result {
                Ok(stored) => {
                    let stored = Arc::new(stored);
                    if stored.status.is_success() {
                        inner.cache.insert(key, stored.clone()).await;
                    }
                    return stored;
                }
                Err(result) => result,
            };
            // The whole call, its body read to the end included, within the
            // request deadline: a stalled upstream ends for every follower.
            let stored = match tokio::time::timeout_at(ends, Stored::from_result(result)).await {
                Ok(stored) => Arc::new(stored),
                Err(_) => Arc::new(Stored::from_error(SharedCallFailed::too_long(deadline))),
            };
            let storable =
                stored.status.is_success() && stored.body.len() as u64 <= inner.max_entry_size;
            if storable {
                inner.cache.insert(key, stored.clone()).await;
            }
            let lease = lease.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let (Some(redis), Some(hex)) = (&redis, &hex) {
                // For other replicas: the cache, or the followers of this call.
                // A personal refusal is nobody else's answer: its lease goes
                // and another replica carries the call.
                if storable {
                    let _ = redis
                        .put_cached(hex, &stored.answer(), inner.ttl, inner.max_size)
                        .await;
                } else if lease.is_some() && stored.error.is_none() {
                    let _ = redis
                        .put(Kind::Result, hex, &stored.answer(), redis.lease)
                        .await;
                }
            }
            drop(lease);
            // `_registered` leaves the in-flight map after the insert: a request
            // that no longer finds the call in flight finds its answer cached.
            stored
        });
        let answer = async move {
            task.await.unwrap_or_else(|_| {
                Arc::new(Stored::from_error(SharedCallFailed::from(
                    "the shared upstream call was aborted",
                )))
            })
        }
        .boxed()
        .shared();
        (InFlight { answer, interest }, first)
    }
}

impl<S: crate::vocab::service::Inner> Service<Request<Payload>> for Coalesce<S> {
    type Response = Response<Body>;
    type Error = ProxyError;
    // A call that is not looked up goes on as the inner future (its tally
    // says `bypass`); a cache lookup and a wait on a shared call are boxed.
    type Future = Either<S::Future, crate::vocab::service::BoxCall>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Payload>) -> Self::Future {
        let mut service = self.service.clone();
        let metrics = self.metrics.clone();
        let ctx = req.body().ctx.clone();
        let key = ctx.as_ref().and_then(|c| c.cache_key);
        let mode = ctx.as_ref().map_or(CacheMode::Bypass, |c| c.cache_mode);
        let Some((inner, key)) = self
            .inner
            .clone()
            .zip(key)
            .filter(|_| mode != CacheMode::Bypass)
        else {
            if let Some(ctx) = &ctx {
                ctx.tally.update(|t| t.cache = Some("bypass"));
            }
            return Either::Left(crate::vocab::service::call_now(&mut service, req));
        };
        Either::Right(Box::pin(async move {
            let caller = ctx.as_deref();
            if mode == CacheMode::Refresh {
                // A fresh call, stored for the next ones; it joins nothing.
                let (call, _watch) = inner.spawn_call(service, req, key, false);
                return call.answer.await.response("miss", caller);
            }
            let saved = |stored: &Stored, reason| {
                record_saving(&metrics, ctx.as_deref(), stored, reason);
            };
            let mut req = Some(req);
            loop {
                let joined = {
                    let in_flight = inner.lock();
                    in_flight
                        .get(&key)
                        .map(|c| (c.answer.clone(), c.interest.watch()))
                };
                if let Some((answer, _watch)) = joined {
                    let stored = answer.await;
                    if stored.personal() {
                        // The leader's own refusal: this caller goes on.
                        continue;
                    }
                    saved(&stored, "coalesced");
                    return stored.response("coalesced", caller);
                }
                if let Some(stored) = inner.cache.get(&key).await {
                    saved(&stored, "cache");
                    return stored.response("hit", caller);
                }
                let (answer, _watch, outcome) = {
                    let mut in_flight = inner.lock();
                    match (in_flight.get(&key), req.take()) {
                        (Some(call), unsent) => {
                            req = unsent;
                            (call.answer.clone(), call.interest.watch(), "coalesced")
                        }
                        (None, Some(req)) => {
                            // Inserted under the lock the task needs to remove it,
                            // so the removal cannot come first.
                            let (call, watch) = inner.spawn_call(service.clone(), req, key, true);
                            in_flight.insert(key, call.clone());
                            (call.answer, watch, "miss")
                        }
                        // Only a caller that has not sent its request loops.
                        (None, None) => {
                            return Err(SharedCallFailed::from("the shared call was lost").into());
                        }
                    }
                };
                let stored = answer.await;
                let outcome = stored.elsewhere.unwrap_or(outcome);
                if outcome != "miss" {
                    if stored.personal() {
                        continue;
                    }
                    saved(
                        &stored,
                        if outcome == "hit" {
                            "cache"
                        } else {
                            "coalesced"
                        },
                    );
                }
                return stored.response(outcome, caller);
            }
        }))
    }
}
