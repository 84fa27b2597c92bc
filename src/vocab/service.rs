//! What every service of the stack is: a request with its body buffered in,
//! a response or penstock's own error out; and how one calls the next.

use crate::vocab::body::Body;
use crate::vocab::context::Payload;
use crate::vocab::error::ProxyError;

/// What a call through the stack gives.
pub(crate) type Called = Result<http::Response<Body>, ProxyError>;

/// A boxed call: what a layer that waits or loops inside a call returns.
pub(crate) type BoxCall = futures_util::future::BoxFuture<'static, Called>;

/// A service inside the stack, below the edge: a request with its body buffered
/// in, a response or penstock's own error out. Every layer asks this of the one
/// it wraps; cloned into each request's future, so cheap to clone.
pub(crate) trait Inner:
    tower::Service<
        http::Request<Payload>,
        Response = http::Response<Body>,
        Error = ProxyError,
        Future: Send,
    > + Clone
    + Send
    + 'static
{
}

impl<S> Inner for S where
    S: tower::Service<
            http::Request<Payload>,
            Response = http::Response<Body>,
            Error = ProxyError,
            Future: Send,
        > + Clone
        + Send
        + 'static
{
}

/// Calls an inner service at once. Every layer of this stack is ready at once
/// (waiting happens inside calls, never in `poll_ready`), so a future need not
/// keep the service and the request aside while readiness is awaited, as
/// `oneshot` does: a queued request then carries one pointer per layer, not a
/// service and a request per layer.
pub(crate) fn call_now<S: tower::Service<R>, R>(service: &mut S, req: R) -> S::Future {
    let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
    let ready = service.poll_ready(&mut cx);
    debug_assert!(
        matches!(ready, std::task::Poll::Ready(Ok(()))),
        "penstock's layers are ready at once"
    );
    service.call(req)
}

/// What admission asks of the upstreams as it picks one: how many there
/// are, which would be answered by its breaker now, and how busy each is.
/// The upstream layer answers it; the stack hands it to admission.
pub(crate) trait Upstreams: Send + Sync + 'static {
    /// How many upstreams, in the config's order.
    fn count(&self) -> usize;
    /// Whether a call to upstream `i` now would be answered by its breaker.
    fn unavailable(&self, i: usize) -> bool;
    /// Attempts out to upstream `i` and not answered yet.
    fn in_flight(&self, i: usize) -> usize;
}
