//! Spend caps per client (`[[client]] usd_per_day` / `usd_per_month`, or
//! `[spend]`'s for everyone): a call's price is reserved at admission from
//! the price tables (its estimate, at the dearer of the input and output
//! prices), and settled with what the answer cost. Past a cap the client is
//! answered 429 `penstock_spend_limit` with `retry-after` at the period's
//! end, and nothing goes upstream. Below the cache (a hit is free) and above
//! retries (a request reserves once; its retries are settled with it).

pub mod ledger;
mod shared;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tower::Service;

use crate::config::Config;
use crate::telemetry::metrics::Metrics;
use crate::vocab::body::{Body, BoxError};
use crate::vocab::context::{Payload, RequestContext};
use crate::vocab::error::{Problem, ProxyError};
use crate::vocab::usage::Usage;

pub(crate) use ledger::{Ledger, Period};

/// Caps in millionths of a dollar, per day and month.
type Caps = (Option<u64>, Option<u64>);

/// Everyone's caps: `[spend]`'s, and each `[[client]]`'s.
#[derive(Default)]
struct Table {
    default: Caps,
    clients: HashMap<String, Caps>,
}

fn micros(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * 1e6).round() as u64
    } else {
        0
    }
}

fn signed(usd: f64) -> i64 {
    i64::try_from(micros(usd)).unwrap_or(i64::MAX)
}

impl Table {
    fn of(config: &Config) -> Table {
        let cap = |u: Option<f64>| u.map(micros);
        let default = (
            cap(config.spend.usd_per_day),
            cap(config.spend.usd_per_month),
        );
        let clients = config
            .clients
            .iter()
            .filter(|c| c.usd_per_day.is_some() || c.usd_per_month.is_some())
            .map(|c| {
                (
                    c.tenant(),
                    (
                        cap(c.usd_per_day).or(default.0),
                        cap(c.usd_per_month).or(default.1),
                    ),
                )
            })
            .collect();
        Table { default, clients }
    }

    fn caps(&self, tenant: &str) -> Option<Caps> {
        let caps = self.clients.get(tenant).copied().unwrap_or(self.default);
        (caps.0.is_some() || caps.1.is_some()).then_some(caps)
    }
}

/// The spend caps and their ledger.
#[derive(Clone)]
pub(crate) struct Layer {
    table: Arc<ArcSwap<Table>>,
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
}

impl Layer {
    pub(crate) fn new(config: &Config, ledger: Ledger, metrics: Arc<Metrics>) -> Layer {
        Layer {
            table: Arc::new(ArcSwap::from_pointee(Table::of(config))),
            ledger: Arc::new(ledger),
            metrics,
        }
    }

    /// Writes what was spent (the file is written every second anyway).
    pub(crate) fn flush(&self) {
        if let Ledger::Local(local) = &*self.ledger {
            local.flush();
        }
    }

    /// New caps from a reloaded config; what was spent stays.
    pub(crate) fn reload(&self, config: &Config) {
        self.table.store(Arc::new(Table::of(config)));
    }

    /// What each capped `[[client]]` has spent this day and month, with
    /// its caps (USD), for `/status`.
    pub(crate) async fn status(&self) -> serde_json::Value {
        let table = self.table.load_full();
        let p = Period::at(SystemTime::now());
        let usd = |m: i64| m as f64 / 1e6;
        let cap = |c: Option<u64>| c.map(|c| c as f64 / 1e6);
        let mut clients = Vec::new();
        let mut ids: Vec<&String> = table.clients.keys().collect();
        ids.sort();
        for id in ids.into_iter().take(1000) {
            let caps = table.clients[id];
            let spent = self.ledger.spent(id, &p).await;
            clients.push(serde_json::json!({
                "client": id,
                "day": p.day, "month": p.month,
                "spent_today_usd": spent.map(|s| usd(s.0)),
                "spent_this_month_usd": spent.map(|s| usd(s.1)),
                "usd_per_day": cap(caps.0), "usd_per_month": cap(caps.1),
            }));
        }
        serde_json::json!({
            "default": {"usd_per_day": cap(table.default.0), "usd_per_month": cap(table.default.1)},
            "clients": clients,
        })
    }
}

impl<S> tower::Layer<S> for Layer {
    type Service = Spend<S>;
    fn layer(&self, inner: S) -> Spend<S> {
        Spend {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Spend<S> {
    inner: S,
    layer: Layer,
}

/// A client past its spend cap.
#[derive(Debug, thiserror::Error)]
#[error(
    "client {client:?} has spent ${spent:.4} of its ${cap:.2} {period} cap; it resets in {}",
    humantime::format_duration(Duration::from_secs(resets_in.as_secs()))
)]
pub(crate) struct SpendLimit {
    pub(crate) client: String,
    pub(crate) period: &'static str,
    pub(crate) spent: f64,
    pub(crate) cap: f64,
    pub(crate) resets_in: Duration,
}

impl Problem for SpendLimit {
    fn status(&self) -> http::StatusCode {
        http::StatusCode::TOO_MANY_REQUESTS
    }

    fn code(&self) -> &'static str {
        "penstock_spend_limit"
    }

    fn retry_after(&self) -> Option<Duration> {
        Some(self.resets_in)
    }

    fn is_personal(&self) -> bool {
        true
    }
}

/// The shared state is away: no spend is known, so nothing capped goes.
#[derive(Debug, thiserror::Error)]
#[error("the shared state is unavailable: spend caps cannot be checked")]
pub(crate) struct SpendUnknown;

impl Problem for SpendUnknown {
    fn status(&self) -> http::StatusCode {
        http::StatusCode::SERVICE_UNAVAILABLE
    }

    fn code(&self) -> &'static str {
        "penstock_state_unavailable"
    }

    fn retry_after(&self) -> Option<Duration> {
        Some(Duration::from_secs(1))
    }
}

/// A call's price before it is sent: its estimated tokens at the dearer of
/// the model's token prices (else its image by the image), 0 for a model the
/// tables do not price.
fn estimate(metrics: &Metrics, ctx: &RequestContext) -> u64 {
    let model = ctx.model.as_deref().unwrap_or("");
    let tokens = ctx.cost.tokens;
    let as_output = Usage {
        input: 0,
        input_images: 0,
        output: tokens,
        total: tokens,
    };
    let as_input = Usage {
        input: tokens,
        input_images: 0,
        output: 0,
        total: tokens,
    };
    let image = ctx.image.as_deref();
    let usd = metrics
        .prices
        .cost(model, Some(&as_output), image)
        .max(metrics.prices.cost(model, Some(&as_input), image));
    micros(usd)
}

impl<S: crate::vocab::service::Inner> Service<Request<Payload>> for Spend<S> {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = crate::vocab::service::BoxCall;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Payload>) -> Self::Future {
        let mut inner = self.inner.clone();
        let layer = self.layer.clone();
        Box::pin(async move {
            let ctx = req.body().ctx.clone();
            let capped = ctx.as_ref().and_then(|c| {
                let caps = layer.table.load().caps(&c.tenant.0)?;
                Some((c.clone(), caps))
            });
            let Some((ctx, caps)) = capped else {
                return crate::vocab::service::call_now(&mut inner, req).await;
            };
            let p = Period::at(SystemTime::now());
            let reserved = estimate(&layer.metrics, &ctx);
            let client = ctx.tenant.0.to_string();
            let as_signed = i64::try_from(reserved).unwrap_or(i64::MAX);
            match layer.ledger.reserve(&client, &p, as_signed, caps).await {
                Ok(()) => {}
                Err(Some(over)) => {
                    let (period, cap, resets_in) = match over.month {
                        true => ("monthly", caps.1, p.month_left),
                        false => ("daily", caps.0, p.day_left),
                    };
                    return Err(SpendLimit {
                        client,
                        period,
                        spent: over.spent as f64 / 1e6,
                        cap: cap.unwrap_or(0) as f64 / 1e6,
                        resets_in: resets_in.max(Duration::from_secs(1)),
                    }
                    .into());
                }
                Err(None) => return Err(SpendUnknown.into()),
            }
            let settle = Settlement {
                ledger: layer.ledger.clone(),
                client,
                period: p,
                reserved: as_signed,
                ctx,
                done: false,
            };
            match crate::vocab::service::call_now(&mut inner, req).await {
                Ok(resp) => Ok(resp.map(|body| {
                    BodyExt::boxed(Settled {
                        inner: body,
                        settle: Some(settle),
                    })
                })),
                Err(e) => {
                    drop(settle);
                    Err(e)
                }
            }
        })
    }
}

/// A reservation, settled with what the call cost when its answer ends (or
/// is dropped).
struct Settlement {
    ledger: Arc<Ledger>,
    client: String,
    period: Period,
    reserved: i64,
    ctx: Arc<RequestContext>,
    done: bool,
}

impl Drop for Settlement {
    fn drop(&mut self) {
        let tally = self.ctx.tally.get();
        // Cut short after a call went: it may be paid for; the estimate stays.
        let cost = match (self.done, tally.sent) {
            (false, true) => signed(tally.cost_usd).max(self.reserved),
            _ => signed(tally.cost_usd),
        };
        let delta = cost.saturating_sub(self.reserved);
        if delta == 0 {
            return;
        }
        let (ledger, client, period) = (
            self.ledger.clone(),
            std::mem::take(&mut self.client),
            self.period.clone(),
        );
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { ledger.settle(&client, &period, delta).await });
            }
            Err(_) => tracing::warn!("no runtime: a call's spend was not settled"),
        }
    }
}

pin_project_lite::pin_project! {
    struct Settled {
        #[pin]
        inner: Body,
        settle: Option<Settlement>,
    }
}

impl HttpBody for Settled {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        // A body of known length is not polled past its last byte.
        if (frame.is_none() || this.inner.is_end_stream())
            && let Some(mut s) = this.settle.take()
        {
            s.done = true;
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
