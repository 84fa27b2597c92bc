//! The one log line of a request, and the request metrics counted with it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Method};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::logic::metrics::Metrics;
use crate::vocab::body::{Body, BoxError};
use crate::vocab::context::RequestContext;
use crate::vocab::route::Route;

/// The one log line of a request, written when its response body ends (or the
/// client leaves): by then the tokens and cost the upstream reported are known.
pub struct Line {
    pub id: String,
    pub method: Method,
    pub path: String,
    pub route: Route,
    pub status: u16,
    pub head_ms: u64,
    /// Answer headers, kept as they are (a clone of a header value copies
    /// no bytes) and read as text only when the line is written.
    pub upstream_request_id: Option<HeaderValue>,
    pub queue_ms: Option<HeaderValue>,
    pub attempts: Option<HeaderValue>,
    pub cache: Option<HeaderValue>,
    pub received: Instant,
    pub ctx: Option<Arc<RequestContext>>,
    pub metrics: Arc<Metrics>,
}

/// A kept header value as text, if it is text.
fn text(v: &Option<HeaderValue>) -> Option<&str> {
    v.as_ref().and_then(|v| v.to_str().ok())
}

impl Line {
    fn emit(&self, complete: bool) {
        let ctx = self.ctx.as_deref();
        let model = ctx.and_then(|c| c.model.as_deref());
        let cache = text(&self.cache);
        let label = self.metrics.label_of(ctx);
        self.metrics
            .request(self.route.label(), &label, self.status, cache.unwrap_or(""));
        let acc = ctx.map(|c| c.tally.get()).unwrap_or_default();
        tracing::info!(
            target: "penstock::access",
            request_id = self.id,
            method = self.method.as_str(),
            path = self.path,
            route = self.route.label(),
            model,
            stream = ctx.is_some_and(|c| c.stream),
            status = self.status,
            // Time to the response head, and to its end.
            latency_ms = self.head_ms,
            duration_ms = self.received.elapsed().as_millis() as u64,
            complete,
            upstream_request_id = text(&self.upstream_request_id),
            queue_ms = text(&self.queue_ms),
            attempts = text(&self.attempts),
            cache,
            estimated_tokens = ctx.map(|c| c.cost.tokens),
            tokens = acc.tokens,
            cost_usd = acc.cost_usd,
            saved_usd = acc.saved_usd,
            "request"
        );
    }
}

pin_project_lite::pin_project! {
    /// Passes the response body on; when it ends or is dropped, writes the line.
    pub struct Logged {
        #[pin]
        inner: Body,
        line: Option<Line>,
        complete: bool,
    }

    impl PinnedDrop for Logged {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(line) = this.line.take() {
                line.emit(*this.complete);
            }
        }
    }
}

impl Logged {
    pub fn wrap(inner: Body, line: Line) -> Body {
        Logged {
            inner,
            line: Some(line),
            complete: false,
        }
        .boxed()
    }
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        if frame.is_none() || this.inner.is_end_stream() {
            *this.complete = true;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
