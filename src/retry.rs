//! Retries that absorb routine failures without multiplying cost. tower's retry
//! runs a per-request [`Policy`] around the budget and the upstream, so every
//! retry waits for and pays its budget again; what is retryable comes from the
//! one classifier (`crate::vocab::classify`); a shared `TpsBudget` keeps retries a small
//! fraction of traffic when the upstream fails everything. When penstock gives up,
//! the client gets the last upstream answer unchanged with `x-should-retry: false`,
//! so the SDK's own retries do not multiply penstock's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use tokio::time::Instant;
use tower::Service;
use tower::retry::budget::{Budget as _, TpsBudget};

use crate::vocab::body::Body;

use crate::config::{AfterSend, RetryConfig};
use crate::telemetry::metrics::Metrics;
use crate::vocab::context::Payload;
use crate::vocab::error::ProxyError;
use crate::vocab::route::Route;

/// What all requests share: the settings and the retry budget.
struct Shared {
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    deadline: Duration,
    after_send: AfterSend,
    budget: TpsBudget,
    metrics: Arc<Metrics>,
}

#[derive(Clone)]
pub(crate) struct Layer {
    shared: Arc<Shared>,
}

impl Layer {
    pub(crate) fn new(config: &RetryConfig, metrics: Arc<Metrics>) -> Layer {
        Layer {
            shared: Arc::new(Shared {
                max_attempts: config.max_attempts,
                initial_backoff: config.initial_backoff,
                max_backoff: config.max_backoff,
                deadline: config.deadline,
                after_send: config.after_send,
                metrics,
                // Validated: percent in 0..=1000, min_per_second small.
                budget: TpsBudget::new(
                    Duration::from_secs(10),
                    config.min_retries_per_second,
                    config.budget_percent / 100.0,
                ),
            }),
        }
    }
}

impl<S> tower::Layer<S> for Layer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: crate::vocab::service::Inner> Service<Request<Payload>> for Retry<S> {
    type Response = Response<Body>;
    type Error = ProxyError;
    // Boxed: a retried call is a sequence of attempts and sleeps.
    type Future = crate::vocab::service::BoxCall;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Payload>) -> Self::Future {
        let deadline = req
            .body()
            .ctx
            .as_ref()
            .map_or_else(|| Instant::now() + self.shared.deadline, |c| c.deadline);
        let policy = Policy {
            shared: self.shared.clone(),
            attempts: Arc::new(AtomicU32::new(1)),
            deadline,
        };
        let attempts = policy.attempts.clone();
        let ctx = req.body().ctx.clone();
        let mut retrying = tower::retry::Retry::new(policy, self.inner.clone());
        self.shared.budget.deposit();
        // Mapped, not awaited in an async block: a block would keep the future
        // twice (captured, and again where it is awaited), per waiting request.
        // What it did is told in the request's tally; an error stays an error
        // (penstock's own refusals keep their own advice: retry after ...).
        Box::pin(
            crate::vocab::service::call_now(&mut retrying, req).map(move |result| {
                let gave_up = match &result {
                    Ok(resp) => !resp.status().is_success(),
                    Err(e) => !e.is_refusal(),
                };
                if let Some(ctx) = ctx {
                    let attempts = attempts.load(Ordering::Relaxed);
                    ctx.tally.update(|t| {
                        t.attempts = Some(attempts);
                        t.gave_up = gave_up;
                    });
                }
                result
            }),
        )
    }
}

/// One request's retry state; tower clones it into the request's future.
#[derive(Clone)]
pub(crate) struct Policy {
    shared: Arc<Shared>,
    /// Attempts made so far (read back for `x-penstock-attempts`).
    attempts: Arc<AtomicU32>,
    deadline: Instant,
}

impl Policy {
    /// The wait before attempt `attempt + 1`: the upstream's own delay when it gave
    /// one, else exponential backoff with full jitter.
    fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        retry_after.unwrap_or_else(|| {
            let exp = self
                .shared
                .initial_backoff
                .saturating_mul(1u32 << (attempt - 1).min(20))
                .min(self.shared.max_backoff);
            exp.mul_f64(fastrand::f64())
        })
    }
}

impl Policy {
    /// The wait before the next attempt, or `None` to give up.
    fn decide(
        &mut self,
        route: Route,
        after_send: bool,
        result: &Result<Response<Body>, ProxyError>,
    ) -> Option<Duration> {
        let outcome = crate::vocab::classify::attempt(result);
        // Another upstream can take it now: it goes at once, whatever the
        // answer was (each upstream is tried at most once per attempt left,
        // the one that refused being out or paused).
        let failover = result.as_ref().is_ok_and(|r| {
            r.extensions()
                .get::<crate::vocab::context::Failover>()
                .is_some()
        });
        if failover {
            let attempt = self.attempts.load(Ordering::Relaxed);
            if attempt >= self.shared.max_attempts || Instant::now() >= self.deadline {
                return None;
            }
            self.attempts.fetch_add(1, Ordering::Relaxed);
            return Some(Duration::ZERO);
        }
        if !outcome.class.is_retryable() {
            return None;
        }
        let allowed = match self.shared.after_send {
            _ if !after_send => true,
            AfterSend::Never => false,
            AfterSend::Text => !route.is_image(),
            AfterSend::Always => true,
        };
        if !allowed {
            return None;
        }
        let attempt = self.attempts.load(Ordering::Relaxed);
        if attempt >= self.shared.max_attempts {
            return None;
        }
        let delay = self.delay(attempt, outcome.retry_after);
        if Instant::now() + delay > self.deadline {
            return None;
        }
        // Last: a withdrawal is spent only on a retry that will happen. A
        // rate-limited call's retry draws nothing: it waits for its pool's
        // pause and probe, which already keep the upstream from a storm, and
        // a burst refused at once (an open learned pool's first) must not
        // leave its callers with the upstream's 429.
        if outcome.class != crate::vocab::classify::Class::RateLimited
            && !self.shared.budget.withdraw()
        {
            tracing::debug!(attempt, "retry budget exhausted; giving up");
            return None;
        }
        self.attempts.fetch_add(1, Ordering::Relaxed);
        Some(delay)
    }
}

impl tower::retry::Policy<Request<Payload>, Response<Body>, ProxyError> for Policy {
    /// Boxed: the backoff lives inline in every call's retry state, and most
    /// calls never back off (a timer is some 100 bytes per waiting request).
    type Future = std::pin::Pin<Box<tokio::time::Sleep>>;

    fn retry(
        &mut self,
        req: &mut Request<Payload>,
        result: &mut Result<Response<Body>, ProxyError>,
    ) -> Option<Self::Future> {
        let route = req.body().ctx.as_ref().map_or(Route::Other, |c| c.route);
        let after_send = result.as_ref().err().is_some_and(|e| e.maybe_processed());
        let delay = self.decide(route, after_send, result);
        if after_send {
            // Counted either way: each may have bought something.
            self.shared
                .metrics
                .failed_after_send(route.label(), delay.is_some());
        }
        Some(Box::pin(tokio::time::sleep(delay?)))
    }

    fn clone_request(&mut self, req: &Request<Payload>) -> Option<Request<Payload>> {
        let mut copy = Request::new(req.body().clone());
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        *copy.extensions_mut() = req.extensions().clone();
        Some(copy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::body::full;
    use crate::vocab::classify::classify;
    use http::{HeaderValue, StatusCode};
    use std::sync::atomic::AtomicUsize;
    use tower::ServiceExt;

    fn config() -> RetryConfig {
        RetryConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            ..RetryConfig::default()
        }
    }

    /// A fake inner service answering from a script of statuses (and headers).
    fn scripted(
        script: Vec<(u16, Option<&'static str>)>,
    ) -> (
        impl Service<Request<Payload>, Response = Response<Body>, Error = ProxyError, Future: Send>
        + Clone
        + Send
        + 'static,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let script = Arc::new(script);
        let c = calls.clone();
        let svc = tower::service_fn(move |_req: Request<Payload>| {
            let n = c.fetch_add(1, Ordering::Relaxed);
            let (status, retry_after_ms) = script[n.min(script.len() - 1)];
            async move {
                let status = StatusCode::from_u16(status).unwrap();
                let mut resp = Response::new(full("{}"));
                *resp.status_mut() = status;
                if let Some(ms) = retry_after_ms {
                    resp.headers_mut()
                        .insert("retry-after-ms", HeaderValue::from_static(ms));
                }
                let classified = classify(status, resp.headers(), b"{}");
                resp.extensions_mut().insert(classified);
                Ok::<_, ProxyError>(resp)
            }
        });
        (svc, calls)
    }

    fn request() -> Request<Payload> {
        Request::new(Payload::from(bytes::Bytes::from_static(b"{}")))
    }

    /// The answer to a request whose deadline is `retry.deadline` from now,
    /// with the headers the edge writes from its tally.
    async fn told(
        deadline: Duration,
        retry: impl Service<Request<Payload>, Response = Response<Body>, Error = ProxyError>,
    ) -> Response<Body> {
        let ctx = Arc::new(crate::vocab::context::RequestContext::plain(
            Route::ChatCompletions,
            Instant::now() + deadline,
        ));
        let mut req = request();
        req.body_mut().ctx = Some(ctx.clone());
        let mut resp = retry.oneshot(req).await.unwrap();
        let _ = crate::vocab::render::tally_headers(resp.headers_mut(), &ctx.tally.get());
        resp
    }

    #[tokio::test(start_paused = true)]
    async fn the_upstreams_retry_after_is_honoured_to_the_millisecond() {
        let (svc, calls) = scripted(vec![(429, Some("1500")), (200, None)]);
        let retry = tower::Layer::layer(
            &Layer::new(&config(), Arc::new(Metrics::new(&Default::default()))),
            svc,
        );
        let start = Instant::now();
        let resp = told(config().deadline, retry).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(Instant::now() - start, Duration::from_millis(1500));
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        assert_eq!(resp.headers()["x-penstock-attempts"], "2");
        assert!(!resp.headers().contains_key("x-should-retry"));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_with_full_jitter_within_the_cap() {
        let (svc, calls) = scripted(vec![(503, None)]);
        let retry = tower::Layer::layer(
            &Layer::new(&config(), Arc::new(Metrics::new(&Default::default()))),
            svc,
        );
        let start = Instant::now();
        let resp = told(config().deadline, retry).await;
        assert_eq!(resp.status(), 503);
        assert_eq!(calls.load(Ordering::Relaxed), 4, "max_attempts");
        // Jittered waits of at most 100 + 200 + 400 ms.
        assert!(Instant::now() - start <= Duration::from_millis(700));
        assert_eq!(resp.headers()["x-penstock-attempts"], "4");
        assert_eq!(resp.headers()["x-should-retry"], "false");
    }

    #[tokio::test(start_paused = true)]
    async fn money_errors_and_client_errors_are_never_retried() {
        for status in [400u16, 401, 404] {
            let (svc, calls) = scripted(vec![(status, None)]);
            let retry = tower::Layer::layer(
                &Layer::new(&config(), Arc::new(Metrics::new(&Default::default()))),
                svc,
            );
            let resp = told(config().deadline, retry).await;
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(calls.load(Ordering::Relaxed), 1);
            assert_eq!(resp.headers()["x-should-retry"], "false");
        }
        let h = http::HeaderMap::new();
        let body = br#"{"error":{"message":"m","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        let c = classify(StatusCode::TOO_MANY_REQUESTS, &h, body);
        assert!(!c.class.is_retryable());
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_would_outlive_the_deadline() {
        let (svc, calls) = scripted(vec![(429, Some("5000")), (200, None)]);
        let retry = tower::Layer::layer(
            &Layer::new(
                &RetryConfig {
                    deadline: Duration::from_secs(2),
                    ..config()
                },
                Arc::new(Metrics::new(&Default::default())),
            ),
            svc,
        );
        let resp = told(Duration::from_secs(2), retry).await;
        assert_eq!(resp.status(), 429, "a 5 s wait does not fit a 2 s deadline");
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!(resp.headers()["x-should-retry"], "false");
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_budget_caps_retries_when_everything_fails() {
        let (svc, calls) = scripted(vec![(500, None)]);
        let layer = Layer::new(
            &RetryConfig {
                budget_percent: 20.0,
                min_retries_per_second: 0,
                ..config()
            },
            Arc::new(Metrics::new(&Default::default())),
        );
        let retry = tower::Layer::layer(&layer, svc);
        for _ in 0..100 {
            retry.clone().oneshot(request()).await.unwrap();
        }
        let calls = calls.load(Ordering::Relaxed);
        assert!(calls <= 121, "{calls} upstream calls for 100 requests");
    }
}
