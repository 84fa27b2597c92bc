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

use foldhash::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Either, Shared};
use http::{HeaderMap, HeaderName, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use tower::Service;

use crate::config::CacheConfig;
use crate::state::{Answer, Kind, Lease, Redis};
use crate::telemetry::metrics::Metrics;
use crate::vocab::body::{Body, full};
use crate::vocab::context::{CacheKey, CacheMode, Interest, Payload, RequestContext, Watch};
use crate::vocab::encoding::{self, Encoding, Tail};
use crate::vocab::error::{Problem, ProxyError};
use crate::vocab::headers::{name, remove_where};

/// The most of a response penstock buffers to share it with waiting callers.
const MAX_SHARED: usize = 512 * 1024 * 1024;

/// A shared call that ended without an answer to share; its followers are
/// told as the upstream layer tells of a broken connection.
#[derive(Debug, thiserror::Error)]
#[error("the connection to the upstream failed: {0}")]
pub(crate) struct SharedCallFailed(String);

impl SharedCallFailed {
    fn too_long(deadline: Duration) -> SharedCallFailed {
        SharedCallFailed(format!(
            "the shared call did not finish within {}",
            humantime::format_duration(deadline)
        ))
    }
}

impl From<&str> for SharedCallFailed {
    fn from(why: &str) -> SharedCallFailed {
        SharedCallFailed(why.to_string())
    }
}

impl Problem for SharedCallFailed {
    fn status(&self) -> StatusCode {
        StatusCode::BAD_GATEWAY
    }

    fn code(&self) -> &'static str {
        "penstock_upstream_connection_error"
    }
}

/// A complete response: kept in the cache, or shared with those who waited.
#[derive(Debug)]
pub(crate) struct Stored {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// penstock's own error instead of an answer: each who waited gets it
    /// as an error, rendered by its own edge. Never shared with other
    /// replicas: it speaks of this one.
    pub(crate) error: Option<ProxyError>,
    /// The leader's own refusal (its deadline, its client cap): not an answer
    /// for those who waited with it; they carry the call on themselves.
    pub(crate) personal: bool,
    /// Made by another replica: found in the shared cache (`hit`) or shared by
    /// its leader (`coalesced`).
    pub(crate) elsewhere: Option<&'static str>,
}

impl Stored {
    async fn from_result(result: Result<Response<Body>, ProxyError>) -> Stored {
        let resp = match result {
            Ok(resp) => resp,
            Err(e) => return Stored::from_error(e),
        };
        let (parts, mut body) = resp.into_parts();
        let mut buf = bytes::BytesMut::new();
        let mut first: Option<Bytes> = None;
        while let Some(frame) = body.frame().await {
            let data = match frame {
                Ok(f) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
                Err(e) => return Stored::from_error(SharedCallFailed(e.to_string())),
            };
            if buf.len() + first.as_ref().map_or(0, Bytes::len) + data.len() > MAX_SHARED {
                return Stored::from_error(SharedCallFailed::from(
                    "the response is too large to share",
                ));
            }
            // A body in one frame (the usual case) is kept without a copy.
            match first.take() {
                None if buf.is_empty() => first = Some(data),
                Some(f) => {
                    buf.extend_from_slice(&f);
                    buf.extend_from_slice(&data);
                }
                None => buf.extend_from_slice(&data),
            }
        }
        Stored {
            status: parts.status,
            headers: parts.headers,
            body: first.unwrap_or_else(|| buf.freeze()),
            error: None,
            personal: false,
            elsewhere: None,
        }
    }

    fn from_error(e: impl Into<ProxyError>) -> Stored {
        let e = e.into();
        Stored {
            status: e.status(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            personal: e.is_personal(),
            error: Some(e),
            elsewhere: None,
        }
    }

    fn from_answer(answer: Answer, elsewhere: &'static str) -> Stored {
        Stored {
            status: answer.status,
            headers: answer.headers,
            body: answer.body,
            error: None,
            personal: false,
            elsewhere: Some(elsewhere),
        }
    }

    fn answer(&self) -> Answer {
        Answer {
            status: self.status,
            headers: self.headers.clone(),
            body: self.body.clone(),
        }
    }

    /// What this response weighs in the cache.
    fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        (self.body.len() + headers + 128).min(u32::MAX as usize) as u32
    }

    /// A response for one caller, in a coding it accepts, or the error all
    /// who waited get. Hits and coalesced callers made no attempt and waited
    /// for no budget of their own, and the headers that belonged to the one
    /// call (cookies, the rate-limit state of that moment, its date) are not
    /// theirs. What the cache did is told in the caller's tally.
    fn response(
        &self,
        outcome: &'static str,
        ctx: Option<&RequestContext>,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(ctx) = ctx {
            ctx.tally.update(|t| {
                t.cache = Some(outcome);
                if outcome != "miss" {
                    t.attempts = Some(0);
                }
            });
        }
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let mut resp = Response::new(full(self.body.clone()));
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.clone();
        let coding = Encoding::of(&self.headers);
        let empty = HeaderMap::new();
        let caller = ctx.map_or(&empty, |c| &c.headers);
        if coding != Some(Encoding::Identity)
            && !coding.is_some_and(|c| encoding::accepts(caller, c))
            && let Some(plain) = encoding::decode_all(coding, &self.body, MAX_SHARED)
        {
            *resp.body_mut() = full(plain);
            resp.headers_mut().remove(header::CONTENT_ENCODING);
            resp.headers_mut().remove(header::CONTENT_LENGTH);
        }
        if outcome != "miss" {
            let h = resp.headers_mut();
            h.remove(name::QUEUE_MS);
            for name in PER_CALL {
                h.remove(name);
            }
            remove_where(h, |k| k.as_str().starts_with("x-ratelimit-"));
        }
        Ok(resp)
    }

    /// The `usage` the answer reported, whatever its coding.
    fn usage(&self) -> Option<crate::vocab::usage::Usage> {
        let mut tail = Tail::new(Encoding::of(&self.headers), MAX_SHARED as u64);
        tail.push(&self.body);
        tail.usage()
    }
}

/// Headers that describe one upstream call and are not repeated to callers who
/// did not make it; hyper gives each answer its own `date`.
const PER_CALL: [HeaderName; 3] = [header::SET_COOKIE, header::DATE, header::AGE];

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
    // A call that is not looked up goes on as the inner future, only marked;
    // a cache lookup and a wait on a shared call are boxed.
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
                    if stored.personal {
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
                    if stored.personal {
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

/// A cache key as Redis keys carry it.
fn hex(key: &CacheKey) -> String {
    use std::fmt::Write;
    key.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What the other replicas have to say about a call about to be made.
enum Step {
    /// An answer: cached, or made by another replica's leader meanwhile.
    Answer(Stored),
    /// No replica makes it: this one does, holding the lease.
    Lead(Lease),
    /// Redis is unavailable: this replica alone decides.
    Alone,
}

/// The shared cache first; then the lease on the call, or, while another
/// replica holds it, waiting for its answer. A leader that dies stops renewing
/// its lease: when it lapses, a follower takes the call over.
async fn across_replicas(redis: &Redis, hex: &str) -> Step {
    loop {
        match redis.get(Kind::Cache, hex).await {
            Ok(Some(answer)) => return Step::Answer(Stored::from_answer(answer, "hit")),
            Ok(None) => {}
            Err(_) => return Step::Alone,
        }
        match redis.take_lease(hex).await {
            Ok(Some(lease)) => return Step::Lead(lease),
            Ok(None) => {}
            Err(_) => return Step::Alone,
        }
        let mut delay = Duration::from_millis(25);
        loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(400));
            for kind in [Kind::Result, Kind::Cache] {
                match redis.get(kind, hex).await {
                    Ok(Some(answer)) => {
                        return Step::Answer(Stored::from_answer(answer, "coalesced"));
                    }
                    Ok(None) => {}
                    Err(_) => return Step::Alone,
                }
            }
            match redis.leased(hex).await {
                Ok(true) => {}
                // Ended without an answer for others, or its leader died.
                Ok(false) => break,
                Err(_) => return Step::Alone,
            }
        }
    }
}

/// A held lease, renewed while the call runs and given up when it ends. A
/// renewal that fails for Redis's sake (a timeout, a moment unavailable) is
/// tried again, sooner, until the lease would have lapsed: only a lease
/// another replica now holds, or one that lapsed, ends the renewing.
struct Held {
    redis: Arc<Redis>,
    lease: Lease,
    renewing: tokio::task::JoinHandle<()>,
}

impl Held {
    fn new(redis: Arc<Redis>, lease: Lease) -> Held {
        let (r, l) = (redis.clone(), lease.clone());
        let renewing = tokio::spawn(async move {
            let mut renewed = tokio::time::Instant::now();
            let mut pause = r.lease / 3;
            loop {
                tokio::time::sleep(pause).await;
                match r.renew(&l).await {
                    Ok(true) => {
                        renewed = tokio::time::Instant::now();
                        pause = r.lease / 3;
                    }
                    Ok(false) => return,
                    Err(_) if renewed.elapsed() >= r.lease => return,
                    Err(_) => pause = (r.lease / 10).max(Duration::from_millis(50)),
                }
            }
        });
        Held {
            redis,
            lease,
            renewing,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renewing.abort();
        let (redis, lease) = (self.redis.clone(), self.lease.clone());
        tokio::spawn(async move {
            let _ = redis.release(&lease).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::route::Route;
    use http::HeaderValue;
    use std::io::{Read, Write};

    /// A caller that sends `headers`.
    fn caller(headers: HeaderMap) -> RequestContext {
        let mut ctx = RequestContext::plain(Route::ImagesGenerations, tokio::time::Instant::now());
        ctx.headers = headers;
        ctx
    }

    #[tokio::test]
    async fn an_answer_stored_compressed_reaches_a_caller_without_gzip_decoded() {
        let plain = br#"{"data":[{"b64_json":"AAAA"}],"usage":{"input_tokens":1,"output_tokens":2,"total_tokens":3}}"#;
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(plain).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let stored = Stored {
            status: StatusCode::OK,
            headers,
            body: Bytes::from(z.finish().unwrap()),
            error: None,
            personal: false,
            elsewhere: None,
        };
        assert_eq!(stored.usage().map(|u| u.total), Some(3));
        let mut gzip_caller = HeaderMap::new();
        gzip_caller.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        let as_is = stored.response("hit", Some(&caller(gzip_caller))).unwrap();
        assert_eq!(as_is.headers()[header::CONTENT_ENCODING], "gzip");
        let body = as_is.into_body().collect().await.unwrap().to_bytes();
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, plain);
        let decoded = stored
            .response("hit", Some(&caller(HeaderMap::new())))
            .unwrap();
        assert!(!decoded.headers().contains_key(header::CONTENT_ENCODING));
        let body = decoded.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], plain);
    }
}
