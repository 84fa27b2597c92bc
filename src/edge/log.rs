//! The one log line of a request, and the request metrics counted with it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Method};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::telemetry::logline::JsonFields;
use crate::telemetry::metrics::Metrics;
use crate::vocab::body::{Body, BoxError};
use crate::vocab::context::{Accounted, RequestContext};
use crate::vocab::route::Route;

/// The one log line of a request, written when its response body ends (or the
/// client leaves): by then the tokens and cost the upstream reported are known.
pub(crate) struct Line {
    pub(crate) id: String,
    pub(crate) method: Method,
    /// The request's target, shared with it (its text is not copied): the
    /// line shows its path.
    pub(crate) uri: http::Uri,
    pub(crate) route: Route,
    pub(crate) status: u16,
    pub(crate) head_ms: u64,
    /// Answer headers, kept as they are (a clone of a header value copies
    /// no bytes) and read as text only when the line is written.
    pub(crate) upstream_request_id: Option<HeaderValue>,
    pub(crate) queue_ms: Option<HeaderValue>,
    pub(crate) attempts: Option<HeaderValue>,
    pub(crate) cache: Option<HeaderValue>,
    pub(crate) received: Instant,
    pub(crate) ctx: Option<Arc<RequestContext>>,
    pub(crate) metrics: Arc<Metrics>,
}

/// A kept header value as text, if it is text.
fn text(v: &Option<HeaderValue>) -> Option<&str> {
    v.as_ref().and_then(|v| v.to_str().ok())
}

/// The target of the request lines.
const TARGET: &str = "penstock::access";

impl Line {
    fn emit(&self, complete: bool) {
        let ctx = self.ctx.as_deref();
        let label = self.metrics.label_of(ctx);
        self.metrics.request(
            self.route.label(),
            &label,
            self.status,
            text(&self.cache).unwrap_or(""),
        );
        let tally = ctx.map(|c| c.tally.get()).unwrap_or_default();
        self.metrics.recent.answered(
            text(&self.cache).unwrap_or(""),
            tally.queued,
            tally.cost_usd,
            tally.saved_usd,
        );
        if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
            return;
        }
        let fields = Fields::of(self, complete);
        if !crate::telemetry::logline::write_info(TARGET, "request", |f| fields.write(f)) {
            fields.trace();
        }
    }
}

/// A line's values, written straight into the JSON log when it is one,
/// else logged through `tracing`: the same fields, by the same names, either way.
struct Fields<'a> {
    line: &'a Line,
    model: Option<&'a str>,
    stream: bool,
    duration_ms: u64,
    complete: bool,
    estimated_tokens: Option<u64>,
    tally: Accounted,
}

impl<'a> Fields<'a> {
    fn of(line: &'a Line, complete: bool) -> Self {
        let ctx = line.ctx.as_deref();
        Fields {
            line,
            model: ctx.and_then(|c| c.model.as_deref()),
            stream: ctx.is_some_and(|c| c.stream),
            duration_ms: line.received.elapsed().as_millis() as u64,
            complete,
            estimated_tokens: ctx.map(|c| c.cost.tokens),
            tally: ctx.map(|c| c.tally.get()).unwrap_or_default(),
        }
    }

    fn write(&self, f: &mut JsonFields<'_>) {
        use crate::field;
        let l = self.line;
        // Penstock's own text (its id, the method, the route) needs no escape.
        f.plain(field!("request_id"), &l.id);
        f.plain(field!("method"), l.method.as_str());
        f.str(field!("path"), l.uri.path());
        f.plain(field!("route"), l.route.label());
        f.opt_str(field!("model"), self.model);
        f.bool(field!("stream"), self.stream);
        f.u64(field!("status"), u64::from(l.status));
        // Time to the response head, and to its end.
        f.u64(field!("latency_ms"), l.head_ms);
        f.u64(field!("duration_ms"), self.duration_ms);
        f.bool(field!("complete"), self.complete);
        f.opt_str(field!("upstream_request_id"), text(&l.upstream_request_id));
        f.opt_str(field!("queue_ms"), text(&l.queue_ms));
        f.opt_str(field!("attempts"), text(&l.attempts));
        f.opt_str(field!("cache"), text(&l.cache));
        f.opt_u64(field!("estimated_tokens"), self.estimated_tokens);
        f.opt_u64(field!("tokens"), self.tally.tokens);
        f.f64(field!("cost_usd"), self.tally.cost_usd);
        f.f64(field!("saved_usd"), self.tally.saved_usd);
    }

    fn trace(&self) {
        let l = self.line;
        tracing::info!(
            target: TARGET,
            request_id = l.id,
            method = l.method.as_str(),
            path = l.uri.path(),
            route = l.route.label(),
            model = self.model,
            stream = self.stream,
            status = l.status,
            latency_ms = l.head_ms,
            duration_ms = self.duration_ms,
            complete = self.complete,
            upstream_request_id = text(&l.upstream_request_id),
            queue_ms = text(&l.queue_ms),
            attempts = text(&l.attempts),
            cache = text(&l.cache),
            estimated_tokens = self.estimated_tokens,
            tokens = self.tally.tokens,
            cost_usd = self.tally.cost_usd,
            saved_usd = self.tally.saved_usd,
            "request"
        );
    }
}

pin_project_lite::pin_project! {
    /// Passes the response body on; when it ends or is dropped, writes the line.
    pub(crate) struct Logged {
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
    pub(crate) fn wrap(inner: Body, line: Line) -> Body {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::logline::{info_text, traced_text};
    use crate::vocab::context::{CacheMode, ModelLabel, Tally, Tenant};
    use crate::vocab::cost::Cost;

    fn line(ctx: Option<Arc<RequestContext>>) -> Line {
        Line {
            id: "ps-00000001".into(),
            method: Method::POST,
            uri: http::Uri::from_static("/v1/chat/completions"),
            route: Route::ChatCompletions,
            status: 200,
            head_ms: 12,
            upstream_request_id: Some(HeaderValue::from_static("req_1")),
            queue_ms: Some(HeaderValue::from_static("3")),
            attempts: None,
            cache: Some(HeaderValue::from_static("miss")),
            received: Instant::now(),
            ctx,
            metrics: Arc::new(Metrics::new(&Default::default())),
        }
    }

    #[test]
    fn the_direct_line_and_the_traced_line_are_the_same() {
        let now = Instant::now();
        let ctx = RequestContext {
            spread: true,
            failed_upstreams: Default::default(),
            spent_upstreams: Default::default(),
            route: Route::ChatCompletions,
            model: Some("gpt-4o-mini".into()),
            model_label: ModelLabel {
                name: "gpt-4o-mini".into(),
                slot: 2,
            },
            stream: true,
            tenant: Tenant("key:abc".into()),
            credential: "key:abc".into(),
            cost: Cost {
                requests: 1,
                tokens: 40,
                images: 0,
            },
            max_wait: None,
            cache_key: None,
            cache_mode: CacheMode::Normal,
            image: None,
            image_tool: None,
            tally: Tally::default(),
            headers: Default::default(),
            deadline: now,
        };
        ctx.tally.update(|t| {
            t.tokens = Some(26);
            t.cost_usd = 1.5e-5;
        });
        for line in [line(Some(Arc::new(ctx))), line(None)] {
            for complete in [true, false] {
                let fields = Fields::of(&line, complete);
                let direct = info_text(TARGET, "request", |f| fields.write(f));
                let traced = traced_text(|| fields.trace());
                let after_time = |l: &str| l.split_once("\",\"level\"").unwrap().1.to_string();
                assert_eq!(after_time(&direct), after_time(&traced));
            }
        }
        let plain = line(None);
        let fields = Fields::of(&plain, true);
        let v: serde_json::Value =
            serde_json::from_str(&info_text(TARGET, "request", |f| fields.write(f))).unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["cache"], "miss");
        assert!(v.get("attempts").is_none() && v.get("model").is_none());
    }
}
