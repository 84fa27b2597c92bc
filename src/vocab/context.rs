//! What travels with a request through the stack: its context, parsed once at
//! the edge (route, model, tenant, credential, estimated cost, cache key), and
//! the body type that carries it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, header};
use tokio::time::Instant;

use super::cost::{Cost, ImageAsk};
use super::route::Route;

/// On an answer: another upstream could serve the request now (this one
/// refused penstock's key, has no money left, is rate-limited or failing),
/// so its retry goes at once, to where admission sends it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Failover;

/// Who a request belongs to, for fair queueing and cache separation: the client's
/// API key (as a hash, never the key) or, in sidecar mode, its client id header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Tenant(pub Arc<str>);

impl Tenant {
    /// A sidecar's client, by the id its header gives.
    pub(crate) fn client(id: &str) -> Tenant {
        Tenant(format!("client:{id}").into())
    }

    /// The tenant an id in the config names: a `key:…` id (as `/status`
    /// shows a key) or `anonymous` as it is, else a sidecar's client id.
    pub(crate) fn configured(id: &str) -> String {
        if id.starts_with("key:") || id == "anonymous" {
            id.to_string()
        } else {
            Tenant::client(id).0.to_string()
        }
    }
}

/// A model as metrics name it: a plain name among the first seen, else
/// "other" (or "none"), and the slot where that label's series are kept, so
/// counting a request looks nothing up by name.
#[derive(Debug, Clone)]
pub(crate) struct ModelLabel {
    pub(crate) name: Arc<str>,
    pub(crate) slot: usize,
}

/// Everything later layers need to know about a request, parsed once.
#[derive(Debug)]
pub struct RequestContext {
    pub(crate) route: Route,
    /// The `model` field of a JSON or multipart body, when there is one.
    pub(crate) model: Option<String>,
    /// The model as metrics name it (capped, plain), found once.
    pub(crate) model_label: ModelLabel,
    /// The client asked for a streamed response.
    pub(crate) stream: bool,
    pub(crate) tenant: Tenant,
    /// The upstream credential whose budget pays: a key hash, or "sidecar".
    pub(crate) credential: Arc<str>,
    /// Estimated cost, before the call.
    pub(crate) cost: Cost,
    /// The client's own limit on waiting for budget (`x-penstock-max-wait-ms`).
    pub(crate) max_wait: Option<Duration>,
    /// Identical requests share this key (tenant unless the cache is global,
    /// method, path and the body's meaning); `None` when not cacheable.
    pub cache_key: Option<CacheKey>,
    pub(crate) cache_mode: CacheMode,
    /// For image requests: what was asked, to price by the image. Boxed: a
    /// context lives as long as its request waits, and most are not images.
    pub(crate) image: Option<Box<ImageAsk>>,
    /// A Responses request's image tool: the image model whose limits it
    /// spends, and what it costs there.
    pub(crate) image_tool: Option<Box<(String, Cost)>>,
    /// What the request turned out to cost, filled in as it is learned.
    pub(crate) tally: Tally,
    /// The client's headers. They travel here, shared, rather than in the
    /// request, so the copy the retry layer keeps for a replay costs nothing;
    /// the upstream layer builds each attempt's headers from them.
    pub(crate) headers: HeaderMap,
    /// It may go to any upstream serving its model: it neither makes nor
    /// names an object that lives with one organization (a file, a batch, a
    /// stored response or completion).
    pub(crate) spread: bool,
    /// Upstreams (bits by index) that failed this request: its retries go
    /// elsewhere while anywhere else serves its model.
    pub(crate) failed_upstreams: std::sync::atomic::AtomicU64,
    /// Of them, those whose money is gone or that refused penstock's key:
    /// a model no upstream can serve so goes to its fallback.
    pub(crate) spent_upstreams: std::sync::atomic::AtomicU64,
    /// When the whole request must be over (`retry.deadline` after it came):
    /// every wait for budget and every attempt ends by then.
    pub(crate) deadline: Instant,
}

/// What a request turned out to cost, filled in by the layers that learn it and
/// read for the log line when the response ends.
#[derive(Debug, Default)]
pub(crate) struct Tally(std::sync::Mutex<Accounted>);

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Accounted {
    /// Tokens the upstream reported, if it did.
    pub(crate) tokens: Option<u64>,
    pub(crate) cost_usd: f64,
    pub(crate) saved_usd: f64,
    /// Time waited for budget, over all attempts.
    pub(crate) queued: Duration,
    /// An attempt has gone to the upstream: from here the request may cost money.
    pub(crate) sent: bool,
    /// Attempts made upstream, as the retry layer counted them (0 for a
    /// cached or shared answer): `x-penstock-attempts`.
    pub(crate) attempts: Option<u32>,
    /// What the cache did: `miss`, `hit`, `coalesced` or `bypass`:
    /// `x-penstock-cache`.
    pub(crate) cache: Option<&'static str>,
    /// Its retries gave up on a failure: `x-should-retry: false`.
    pub(crate) gave_up: bool,
}

impl RequestContext {
    /// A context with nothing learned of the request: for tests of one layer.
    #[cfg(test)]
    pub(crate) fn plain(route: Route, deadline: Instant) -> RequestContext {
        RequestContext {
            route,
            model: None,
            model_label: ModelLabel {
                name: "none".into(),
                slot: 0,
            },
            stream: false,
            tenant: Tenant("none".into()),
            credential: "none".into(),
            cost: Cost::default(),
            max_wait: None,
            cache_key: None,
            cache_mode: CacheMode::Normal,
            image: None,
            image_tool: None,
            tally: Tally::default(),
            headers: HeaderMap::new(),
            spread: false,
            failed_upstreams: Default::default(),
            spent_upstreams: Default::default(),
            deadline,
        }
    }
}

impl Tally {
    pub(crate) fn update(&self, f: impl FnOnce(&mut Accounted)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub(crate) fn get(&self) -> Accounted {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) type CacheKey = [u8; 32];

/// A request's body inside the stack, with what travels with it: its context and,
/// for a shared call, who waits for it. Carried here rather than in the
/// extensions map, so a copy of the request (the retry layer's replay) costs
/// reference counts, not allocations.
#[derive(Clone, Debug, Default)]
pub struct Payload {
    pub(crate) bytes: Bytes,
    /// Set by the edge for every request that reaches the stack.
    pub ctx: Option<Arc<RequestContext>>,
    pub interest: Option<Arc<Interest>>,
    /// The body's share of the bound on bytes held by all requests, given
    /// back when the last copy of the request is dropped.
    pub held: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
    /// Asked before each attempt goes upstream (an async job records, first,
    /// that its call may be paid for).
    pub(crate) gate: Option<Arc<dyn SendGate>>,
    /// Which upstream this attempt goes to (its index in the config), when
    /// admission chose one; else the first.
    pub(crate) upstream: Option<u8>,
    /// The model this attempt asks for, when admission chose a fallback
    /// (its body already says so).
    pub(crate) model: Option<Arc<str>>,
    /// Told when this attempt leaves for the upstream, on a connection
    /// ready for it: admission counts the call from then.
    pub(crate) departure: Option<Arc<dyn Departure>>,
}

/// Turns a request of penstock's own making into one the stack takes (its
/// body buffered, its context attached): the edge's parsing, handed by the
/// stack to whoever makes requests (the async jobs' runner), so that none of
/// them needs the edge.
pub(crate) type Prepare = Arc<
    dyn Fn(
            http::Request<http_body_util::Full<Bytes>>,
        ) -> futures_util::future::BoxFuture<
            'static,
            Result<http::Request<Payload>, super::error::ProxyError>,
        > + Send
        + Sync,
>;

/// Asked before an attempt goes upstream: an error keeps it from going, and
/// is what the request answers.
pub(crate) trait SendGate: Send + Sync + std::fmt::Debug {
    fn before_send(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), super::error::ProxyError>> + Send>>;
}

/// Told the moment an attempt is handed to a connection ready for it, after
/// any wait for one (a new connection's TLS handshake): the ledgers count a
/// call from when it leaves, not from when it was admitted.
pub(crate) trait Departure: Send + Sync {
    fn departed(&self);
}

impl std::fmt::Debug for dyn Departure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Departure")
    }
}

impl From<Bytes> for Payload {
    fn from(bytes: Bytes) -> Payload {
        Payload {
            bytes,
            ..Payload::default()
        }
    }
}

/// Who still waits for a shared call, and whether it has been sent. A call nobody
/// waits for any more is dropped while it is still queued; once sent, it costs
/// money and is finished (and stored) even if everyone left.
#[derive(Debug, Default)]
pub struct Interest {
    watchers: std::sync::atomic::AtomicUsize,
    sent: std::sync::atomic::AtomicBool,
    changed: tokio::sync::Notify,
}

impl Interest {
    /// Called by the upstream layer as the call goes out.
    pub(crate) fn mark_sent(&self) {
        if !self.sent.swap(true, Ordering::AcqRel) {
            self.changed.notify_waiters();
        }
    }

    pub(crate) fn is_sent(&self) -> bool {
        self.sent.load(Ordering::Acquire)
    }

    pub(crate) fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Acquire)
    }

    /// Registers a caller that waits for the answer, until the guard drops.
    pub(crate) fn watch(self: &Arc<Self>) -> Watch {
        self.watchers.fetch_add(1, Ordering::AcqRel);
        Watch(self.clone())
    }

    /// Resolves when every caller has left before the call was sent; never once
    /// it has been sent.
    pub(crate) async fn abandoned(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.is_sent() {
                std::future::pending::<()>().await;
            }
            if self.watchers() == 0 {
                return;
            }
            changed.await;
        }
    }
}

/// One caller waiting for a shared call.
pub(crate) struct Watch(Arc<Interest>);

impl Drop for Watch {
    fn drop(&mut self) {
        if self.0.watchers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}

/// What the client asked of the cache with `Cache-Control`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheMode {
    /// Use a stored or in-flight answer when there is one.
    Normal,
    /// `no-cache`: a fresh call, whose answer is stored.
    Refresh,
    /// `no-store`: neither looked up nor stored.
    Bypass,
}

impl CacheMode {
    pub(crate) fn from_headers(headers: &HeaderMap) -> CacheMode {
        let mut mode = CacheMode::Normal;
        for v in headers.get_all(header::CACHE_CONTROL) {
            for directive in v.to_str().unwrap_or("").split(',') {
                match directive.trim().to_ascii_lowercase().as_str() {
                    "no-store" => return CacheMode::Bypass,
                    "no-cache" => mode = CacheMode::Refresh,
                    _ => {}
                }
            }
        }
        mode
    }
}
