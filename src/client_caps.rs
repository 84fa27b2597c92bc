//! Simple per-client request caps (`[[client]]`), with governor's GCRA. A client
//! over its cap is refused at once with `retry-after-ms`: unlike the budgets, this
//! is a policy limit, not upstream capacity worth waiting for. It sits below the
//! cache (a hit costs no quota) and above retries (a request counts once).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::{Either, Ready, ready};
use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::{Request, Response};
use tower::Service;

use crate::config::ClientConfig;
use crate::vocab::body::Body;
use crate::vocab::context::Payload;
use crate::vocab::error::{Problem, ProxyError};

/// Each capped client's cap: its requests per minute and burst, and its
/// limiter (kept across a reload that leaves the cap as it was).
type Caps = HashMap<String, (u32, u32, Arc<DefaultDirectRateLimiter>)>;

#[derive(Clone)]
pub(crate) struct Layer {
    limits: Arc<ArcSwap<Caps>>,
}

impl Layer {
    pub(crate) fn new(clients: &[ClientConfig]) -> Layer {
        let layer = Layer {
            limits: Arc::new(ArcSwap::from_pointee(HashMap::new())),
        };
        layer.reload(clients);
        layer
    }

    /// New caps for requests from now on: a client whose cap is unchanged
    /// keeps what it has spent of it; a changed or new cap starts full.
    pub(crate) fn reload(&self, clients: &[ClientConfig]) {
        let old = self.limits.load();
        let limits = clients
            .iter()
            .filter_map(|c| {
                let rpm = NonZeroU32::new(u32::try_from(c.rpm?).ok()?)?;
                // By default a second's share at once, like the budgets.
                let burst = c.burst.unwrap_or_else(|| u64::from(rpm.get()).div_ceil(60));
                let burst = NonZeroU32::new(u32::try_from(burst).ok()?)?;
                let id = c.tenant();
                let limiter = match old.get(&id) {
                    Some((r, b, limiter)) if *r == rpm.get() && *b == burst.get() => {
                        limiter.clone()
                    }
                    _ => Arc::new(RateLimiter::direct(
                        Quota::per_minute(rpm).allow_burst(burst),
                    )),
                };
                Some((id, (rpm.get(), burst.get(), limiter)))
            })
            .collect();
        self.limits.store(Arc::new(limits));
    }
}

impl<S> tower::Layer<S> for Layer {
    type Service = ClientLimit<S>;
    fn layer(&self, inner: S) -> ClientLimit<S> {
        ClientLimit {
            inner,
            limits: self.limits.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct ClientLimit<S> {
    inner: S,
    limits: Arc<ArcSwap<Caps>>,
}

#[derive(Debug, thiserror::Error)]
#[error("client {client:?} is over its limit of {rpm} requests per minute")]
pub(crate) struct OverLimit {
    pub(crate) client: String,
    pub(crate) rpm: u32,
    pub(crate) retry_after: Duration,
}

impl Problem for OverLimit {
    fn status(&self) -> http::StatusCode {
        http::StatusCode::TOO_MANY_REQUESTS
    }

    fn code(&self) -> &'static str {
        "penstock_client_rate_limited"
    }

    fn retry_after(&self) -> Option<Duration> {
        Some(self.retry_after)
    }

    fn is_personal(&self) -> bool {
        true
    }

    fn may_wait_out(&self) -> bool {
        true
    }
}

impl<S> Service<Request<Payload>> for ClientLimit<S>
where
    S: Service<Request<Payload>, Response = Response<Body>, Error = ProxyError>,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    // A refusal is answered at once, without boxing.
    type Future = Either<S::Future, Ready<Result<Response<Body>, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Payload>) -> Self::Future {
        let tenant = req.body().ctx.as_ref().map(|c| c.tenant.0.clone());
        let limits = self.limits.load();
        let limited = tenant.and_then(|t| Some((limits.get(t.as_ref())?, t)));
        if let Some(((rpm, _, limiter), tenant)) = limited
            && let Err(not_until) = limiter.check()
        {
            return Either::Right(ready(Err(ProxyError::from(OverLimit {
                client: tenant.to_string(),
                rpm: *rpm,
                retry_after: not_until.wait_time_from(limiter.clock().now()),
            }))));
        }
        Either::Left(self.inner.call(req))
    }
}
