//! The edge of the stack and the per-request context. The edge enforces the body
//! limit (413 before reading when `content-length` says so), buffers the body once
//! so later layers can price, key and replay it, parses it once into a
//! [`RequestContext`] in the request's extensions, turns penstock's errors into
//! responses, and writes the one log line per request.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, header};
use http_body::Body as HttpBody;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;
use tower::Service;

use crate::body::{Body, BoxError};
use crate::budget::estimate::{self, Estimator, InputImage, MultipartSummary};
use crate::budget::ledger::Cost;
use crate::config::Config;
use crate::error::ProxyError;
use crate::metrics::{ImageAsk, Metrics};

/// The API operation a path names; Azure's `/openai/deployments/{d}/...` paths map
/// to the same operations as `/v1/...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    ImagesGenerations,
    ImagesEdits,
    ImagesVariations,
    ChatCompletions,
    Completions,
    Responses,
    Embeddings,
    Models,
    Other,
}

impl Route {
    pub fn from_path(path: &str) -> Route {
        let path = path.trim_end_matches('/');
        let ends = |s: &str| path.ends_with(s);
        if ends("/images/generations") {
            Route::ImagesGenerations
        } else if ends("/images/edits") {
            Route::ImagesEdits
        } else if ends("/images/variations") {
            Route::ImagesVariations
        } else if ends("/chat/completions") {
            Route::ChatCompletions
        } else if ends("/completions") {
            Route::Completions
        } else if ends("/responses") {
            Route::Responses
        } else if ends("/embeddings") {
            Route::Embeddings
        } else if path.starts_with("/v1/models") {
            Route::Models
        } else {
            Route::Other
        }
    }

    /// A low-cardinality label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Route::ImagesGenerations => "images.generations",
            Route::ImagesEdits => "images.edits",
            Route::ImagesVariations => "images.variations",
            Route::ChatCompletions => "chat.completions",
            Route::Completions => "completions",
            Route::Responses => "responses",
            Route::Embeddings => "embeddings",
            Route::Models => "models",
            Route::Other => "other",
        }
    }

    pub fn is_image(self) -> bool {
        matches!(
            self,
            Route::ImagesGenerations | Route::ImagesEdits | Route::ImagesVariations
        )
    }
}

/// Who a request belongs to, for fair queueing and cache separation: the client's
/// API key (as a hash, never the key) or, in sidecar mode, its client id header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tenant(pub Arc<str>);

/// A stable, non-reversible name for the credential a request carries.
fn key_id(headers: &HeaderMap) -> Arc<str> {
    let credential = headers
        .get(header::AUTHORIZATION)
        .or_else(|| headers.get("api-key"))
        .map(HeaderValue::as_bytes);
    match credential {
        Some(c) => format!("key:{}", &blake3::hash(c).to_hex()[..16]).into(),
        None => "anonymous".into(),
    }
}

/// The longest client id kept from the client id header.
const MAX_CLIENT_ID: usize = 64;

/// Everything later layers need to know about a request, parsed once.
#[derive(Debug)]
pub struct RequestContext {
    /// penstock's id for the request, returned as `x-penstock-request-id`.
    pub id: String,
    pub route: Route,
    /// The `model` field of a JSON or multipart body, when there is one.
    pub model: Option<String>,
    /// The client asked for a streamed response.
    pub stream: bool,
    pub tenant: Tenant,
    /// The upstream credential whose budget pays: a key hash, or "sidecar".
    pub credential: Arc<str>,
    /// Estimated cost, before the call.
    pub cost: Cost,
    /// The client's own limit on waiting for budget (`x-penstock-max-wait-ms`).
    pub max_wait: Option<Duration>,
    /// Identical requests share this key (tenant unless the cache is global,
    /// method, path and the body's meaning); `None` when not cacheable.
    pub cache_key: Option<CacheKey>,
    pub cache_mode: CacheMode,
    /// For image requests: what was asked, to price by the image.
    pub image: Option<ImageAsk>,
    /// What the request turned out to cost, filled in as it is learned.
    pub tally: Tally,
    /// The client's headers. They travel here, shared, rather than in the
    /// request, so the copy the retry layer keeps for a replay costs nothing;
    /// the upstream layer builds each attempt's headers from them.
    pub headers: HeaderMap,
    pub received: Instant,
}

/// What a request turned out to cost, filled in by the layers that learn it and
/// read for the log line when the response ends.
#[derive(Debug, Default)]
pub struct Tally(std::sync::Mutex<Accounted>);

#[derive(Debug, Default, Clone, Copy)]
pub struct Accounted {
    /// Tokens the upstream reported, if it did.
    pub tokens: Option<u64>,
    pub cost_usd: f64,
    pub saved_usd: f64,
    /// Time waited for budget, over all attempts.
    pub queued: Duration,
}

impl Tally {
    pub fn update(&self, f: impl FnOnce(&mut Accounted)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn get(&self) -> Accounted {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub type CacheKey = [u8; 32];

/// A request's body inside the stack, with what travels with it: its context and,
/// for a shared call, who waits for it. Carried here rather than in the
/// extensions map, so a copy of the request (the retry layer's replay) costs
/// reference counts, not allocations.
#[derive(Clone, Debug, Default)]
pub struct Payload {
    pub bytes: Bytes,
    /// Set by the edge for every request that reaches the stack.
    pub ctx: Option<Arc<RequestContext>>,
    pub interest: Option<Arc<Interest>>,
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
    pub fn mark_sent(&self) {
        if !self.sent.swap(true, Ordering::AcqRel) {
            self.changed.notify_waiters();
        }
    }

    pub fn is_sent(&self) -> bool {
        self.sent.load(Ordering::Acquire)
    }

    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Acquire)
    }

    /// Registers a caller that waits for the answer, until the guard drops.
    pub fn watch(self: &Arc<Self>) -> Watch {
        self.watchers.fetch_add(1, Ordering::AcqRel);
        Watch(self.clone())
    }

    /// Resolves when every caller has left before the call was sent; never once
    /// it has been sent.
    pub async fn abandoned(&self) {
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
pub struct Watch(Arc<Interest>);

impl Drop for Watch {
    fn drop(&mut self) {
        if self.0.watchers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}

/// What the client asked of the cache with `Cache-Control`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Use a stored or in-flight answer when there is one.
    Normal,
    /// `no-cache`: a fresh call, whose answer is stored.
    Refresh,
    /// `no-store`: neither looked up nor stored.
    Bypass,
}

impl CacheMode {
    fn from_headers(headers: &HeaderMap) -> CacheMode {
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

/// Hashes a JSON value by meaning: object keys sorted, whitespace gone.
fn hash_json(h: &mut blake3::Hasher, v: &Value) {
    match v {
        Value::Null => {
            h.update(b"n");
        }
        Value::Bool(b) => {
            h.update(if *b { b"t" } else { b"f" });
        }
        Value::Number(n) => {
            h.update(b"#");
            h.update(n.to_string().as_bytes());
            h.update(b";");
        }
        Value::String(s) => {
            h.update(b"s");
            h.update(&(s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        Value::Array(a) => {
            h.update(b"[");
            h.update(&(a.len() as u64).to_le_bytes());
            for x in a {
                hash_json(h, x);
            }
        }
        Value::Object(o) => {
            h.update(b"{");
            h.update(&(o.len() as u64).to_le_bytes());
            let mut entries: Vec<_> = o.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (k, x) in entries {
                h.update(&(k.len() as u64).to_le_bytes());
                h.update(k.as_bytes());
                hash_json(h, x);
            }
        }
    }
}

/// A body as penstock understood it; dropped once the context is built.
enum Parsed {
    Json(Value),
    Multipart(MultipartSummary),
    None,
}

impl Parsed {
    fn view(&self) -> estimate::Body<'_> {
        match self {
            Parsed::Json(v) => estimate::Body::Json(v),
            Parsed::Multipart(m) => estimate::Body::Multipart(m),
            Parsed::None => estimate::Body::None,
        }
    }

    fn model(&self) -> Option<&str> {
        match self {
            Parsed::Json(v) => v.get("model").and_then(Value::as_str),
            Parsed::Multipart(m) => m.fields.get("model").map(|s| s.trim()),
            Parsed::None => None,
        }
    }

    fn stream(&self) -> bool {
        match self {
            Parsed::Json(v) => v.get("stream").and_then(Value::as_bool).unwrap_or(false),
            Parsed::Multipart(m) => m.fields.get("stream").is_some_and(|s| s.trim() == "true"),
            Parsed::None => false,
        }
    }
}

fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Parses the body once. Malformed JSON, or malformed multipart on an image
/// route, is refused here rather than spent upstream.
async fn parse_body(route: Route, headers: &HeaderMap, body: &Bytes) -> Result<Parsed, ProxyError> {
    let ct = content_type(headers);
    let mime = ct.split(';').next().unwrap_or("").trim();
    if body.is_empty() {
        return Ok(Parsed::None);
    }
    if mime.eq_ignore_ascii_case("application/json") {
        return serde_json::from_slice::<Value>(body)
            .map(Parsed::Json)
            .map_err(|e| ProxyError::InvalidRequest {
                message: format!("the request body is not valid JSON: {e}"),
                code: "penstock_invalid_json",
                param: None,
            });
    }
    if mime.eq_ignore_ascii_case("multipart/form-data") && route.is_image() {
        return multipart_summary(ct, body)
            .await
            .map(Parsed::Multipart)
            .map_err(|e| ProxyError::InvalidRequest {
                message: format!("the request body is not valid multipart/form-data: {e}"),
                code: "penstock_invalid_multipart",
                param: None,
            });
    }
    Ok(Parsed::None)
}

/// Bodies up to this size are priced on the async worker; larger ones (long
/// prompts take milliseconds to tokenize) on the blocking pool.
const TOKENIZE_INLINE: usize = 64 * 1024;

/// How much of an image file is kept to read its size (JPEG may put EXIF first).
const IMAGE_HEAD: usize = 256 * 1024;

/// Text fields and image sizes of a multipart body. Walking every part also
/// checks the framing.
async fn multipart_summary(
    content_type: &str,
    body: &Bytes,
) -> Result<MultipartSummary, multer::Error> {
    let boundary = multer::parse_boundary(content_type)?;
    let chunk = body.clone();
    let stream = futures_util::stream::once(async move { Ok::<_, Infallible>(chunk) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut summary = MultipartSummary::default();
    // (name, content hash) of every part; sorted by name below (stable, so the
    // order of repeated names like `image[]` still counts).
    let mut parts: Vec<(String, blake3::Hash)> = Vec::new();
    while let Some(mut field) = multipart.next_field().await? {
        let name = field.name().unwrap_or("").to_string();
        if field.file_name().is_some() || name.starts_with("image") || name == "mask" {
            // Streamed chunk by chunk: a file is hashed where it lies, and only its
            // head (where formats keep their size) is kept.
            let mut hash = blake3::Hasher::new();
            let mut head = Vec::new();
            while let Some(chunk) = field.chunk().await? {
                hash.update(&chunk);
                let room = IMAGE_HEAD.saturating_sub(head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..room]);
            }
            parts.push((name.clone(), hash.finalize()));
            if name == "image" || name == "image[]" {
                let size = imagesize::blob_size(&head)
                    .ok()
                    .map(|s| (s.width as u32, s.height as u32));
                summary.images.push(InputImage { size });
            }
        } else {
            let text = field.text().await?;
            parts.push((name.clone(), blake3::hash(text.as_bytes())));
            summary.fields.insert(name, text);
        }
    }
    parts.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = blake3::Hasher::new();
    for (name, hash) in &parts {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(hash.as_bytes());
    }
    summary.digest = h.finalize().into();
    Ok(summary)
}

/// What the edge needs to know to build a request's context.
pub struct EdgeConfig {
    pub max_body: u64,
    /// Sidecar mode: one upstream credential; clients are told apart by header.
    pub sidecar: bool,
    pub client_id_header: HeaderName,
    pub estimator: Estimator,
    /// Paths whose POSTs get a cache key; `None` when the cache is off.
    pub cache_paths: Option<std::collections::HashSet<String>>,
    /// Everyone shares cache entries, not only each tenant.
    pub cache_global: bool,
    pub metrics: Arc<Metrics>,
}

impl EdgeConfig {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> EdgeConfig {
        EdgeConfig {
            max_body: config.server.max_body_size.as_u64(),
            sidecar: config.upstream.api_key_env.is_some(),
            client_id_header: HeaderName::try_from(config.server.client_id_header.as_str())
                .unwrap_or_else(|_| HeaderName::from_static("x-penstock-client")),
            // Validated with the config; an invalid table cannot get here.
            estimator: Estimator::new(&config.estimate).unwrap_or_else(|_| {
                Estimator::new(&crate::config::EstimateConfig::default())
                    .expect("default estimator")
            }),
            cache_paths: config
                .cache
                .enabled
                .then(|| config.cache.paths.iter().cloned().collect()),
            cache_global: config.cache.scope == crate::config::CacheScope::Global,
            metrics,
        }
    }

    /// The cache key, for a cacheable, non-streamed POST.
    fn cache_key(
        &self,
        parts: &http::request::Parts,
        tenant: &Tenant,
        parsed: &Parsed,
        body: &Bytes,
    ) -> Option<CacheKey> {
        let paths = self.cache_paths.as_ref()?;
        if parts.method != Method::POST || !paths.contains(parts.uri.path()) || parsed.stream() {
            return None;
        }
        let mut h = blake3::Hasher::new();
        h.update(b"penstock-cache-v1\0");
        h.update(if self.cache_global {
            b"*"
        } else {
            tenant.0.as_bytes()
        });
        h.update(b"\0");
        h.update(
            parts
                .uri
                .path_and_query()
                .map_or("", |pq| pq.as_str())
                .as_bytes(),
        );
        h.update(b"\0");
        match parsed {
            Parsed::Json(v) => hash_json(&mut h, v),
            Parsed::Multipart(m) => {
                h.update(&m.digest);
            }
            Parsed::None => {
                h.update(body);
            }
        }
        Some(h.finalize().into())
    }

    /// Who the request belongs to, and whose budget pays for it.
    fn identify(&self, headers: &HeaderMap) -> (Tenant, Arc<str>) {
        if self.sidecar {
            let client = headers
                .get(&self.client_id_header)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim())
                .filter(|v| !v.is_empty());
            let tenant = match client {
                Some(c) => format!("client:{}", &c[..c.floor_char_boundary(MAX_CLIENT_ID)]).into(),
                None => "anonymous".into(),
            };
            (Tenant(tenant), "sidecar".into())
        } else {
            let key = key_id(headers);
            (Tenant(key.clone()), key)
        }
    }
}

/// Builds the [`Edge`] service around the rest of the stack.
#[derive(Clone)]
pub struct Layer {
    config: Arc<EdgeConfig>,
}

impl Layer {
    pub fn new(config: EdgeConfig) -> Layer {
        Layer {
            config: Arc::new(config),
        }
    }
}

impl<S> tower::Layer<S> for Layer {
    type Service = Edge<S>;
    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            config: self.config.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    config: Arc<EdgeConfig>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn next_request_id() -> String {
    // Unique within a process run; the start time keeps restarts apart in logs.
    static EPOCH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let epoch = EPOCH.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() & 0xff_ffff)
            .unwrap_or(0)
    });
    format!(
        "ps-{epoch:06x}-{:x}",
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

impl<S, B> Service<Request<B>> for Edge<S>
where
    S: crate::Inner,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    // Boxed: reading the body is a chain of awaits; one box per request is small
    // next to the buffered body.
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The stack waits inside calls, never in poll_ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let mut inner = self.inner.clone();
        let config = self.config.clone();
        let received = Instant::now();
        let id = next_request_id();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let route = Route::from_path(&path);
        // Started here, outside the future below, and boxed apart: parsing's
        // state (the request, a multipart parser) is large and done before the
        // wait for budget; inside, every queued request would carry it.
        let buffered = Box::pin(buffer(req, config.clone(), route, id.clone(), received));
        Box::pin(async move {
            let (ctx, result) = match buffered.await {
                Ok(req) => {
                    let ctx = req.body().ctx.clone();
                    (ctx, crate::call_now(&mut inner, req).await)
                }
                Err(e) => (None, Err(e)),
            };
            let mut resp = result.unwrap_or_else(ProxyError::into_response);
            if let Ok(v) = HeaderValue::try_from(id.as_str()) {
                resp.headers_mut().insert("x-penstock-request-id", v);
            }
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let line = Line {
                upstream_request_id: header("x-request-id"),
                queue_ms: header("x-penstock-queue-ms"),
                attempts: header("x-penstock-attempts"),
                cache: header("x-penstock-cache"),
                id,
                method,
                path,
                route,
                status: resp.status().as_u16(),
                head_ms: received.elapsed().as_millis() as u64,
                received,
                ctx,
                metrics: config.metrics.clone(),
            };
            Ok(resp.map(|body| Logged::wrap(body, line)))
        })
    }
}

/// What the edge does before the rest of the stack sees a request: buffer the
/// body within the limit, parse it once, and attach the [`RequestContext`] (its
/// cost estimate and cache key included). Public for benchmarks.
pub async fn prepare<B>(
    req: Request<B>,
    config: Arc<EdgeConfig>,
) -> Result<Request<Payload>, ProxyError>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let route = Route::from_path(req.uri().path());
    buffer(req, config, route, next_request_id(), Instant::now()).await
}

/// Buffers the body within the limit and attaches the context.
async fn buffer<B>(
    req: Request<B>,
    config: Arc<EdgeConfig>,
    route: Route,
    id: String,
    received: Instant,
) -> Result<Request<Payload>, ProxyError>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let max_body = config.max_body;
    if declared.is_some_and(|n| n > max_body) {
        return Err(ProxyError::BodyTooLarge { limit: max_body });
    }
    let (mut parts, body) = req.into_parts();
    let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return Err(ProxyError::BodyTooLarge { limit: max_body });
        }
        Err(e) => return Err(ProxyError::BodyRead(e.to_string())),
    };
    let parsed = if parts.method == Method::GET || parts.method == Method::HEAD {
        Parsed::None
    } else {
        parse_body(route, &parts.headers, &bytes).await?
    };
    // Azure names the deployment in the path rather than the model in the body.
    let model = parsed
        .model()
        .map(str::to_string)
        .or_else(|| azure_deployment(parts.uri.path()));
    // Counting tokens of a large body takes milliseconds: off the async workers.
    let (cost, parsed) = if bytes.len() > TOKENIZE_INLINE {
        let (config, model) = (config.clone(), model.clone());
        tokio::task::spawn_blocking(move || {
            let cost = config
                .estimator
                .estimate(route, model.as_deref(), parsed.view());
            (cost, parsed)
        })
        .await
        .map_err(|e| ProxyError::BodyRead(format!("the cost estimate failed: {e}")))?
    } else {
        let cost = config
            .estimator
            .estimate(route, model.as_deref(), parsed.view());
        (cost, parsed)
    };
    let (tenant, credential) = config.identify(&parts.headers);
    let cache_key = config.cache_key(&parts, &tenant, &parsed, &bytes);
    let image = estimate::image_ask(route, parsed.view());
    let ctx = RequestContext {
        id,
        route,
        stream: parsed.stream(),
        model,
        tenant,
        credential,
        cost,
        max_wait: client_max_wait(&parts.headers),
        cache_key,
        cache_mode: CacheMode::from_headers(&parts.headers),
        image,
        tally: Tally::default(),
        headers: credentials_marked_sensitive(std::mem::take(&mut parts.headers)),
        received,
    };
    let payload = Payload {
        bytes,
        ctx: Some(Arc::new(ctx)),
        interest: None,
    };
    Ok(Request::from_parts(parts, payload))
}

/// Marks credential headers sensitive: their `Debug` prints nothing, and HTTP/2
/// never indexes them. Nothing logs them; this keeps it so.
fn credentials_marked_sensitive(mut headers: HeaderMap) -> HeaderMap {
    for name in [header::AUTHORIZATION, HeaderName::from_static("api-key")] {
        if let http::header::Entry::Occupied(mut values) = headers.entry(name) {
            values.iter_mut().for_each(|v| v.set_sensitive(true));
        }
    }
    headers
}

fn azure_deployment(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/openai/deployments/")?;
    let name = rest.split('/').next()?;
    (!name.is_empty()).then(|| name.to_string())
}

/// The client's own bound on waiting: `x-penstock-max-wait-ms`, or the SDK's
/// whole-request timeout (`x-stainless-timeout`, seconds), whichever is shorter.
fn client_max_wait(headers: &HeaderMap) -> Option<Duration> {
    let num = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    let ms = num("x-penstock-max-wait-ms").map(|ms| Duration::from_secs_f64(ms / 1000.0));
    let sdk = num("x-stainless-timeout").map(Duration::from_secs_f64);
    match (ms, sdk) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The one log line of a request, written when its response body ends (or the
/// client leaves): by then the tokens and cost the upstream reported are known.
struct Line {
    id: String,
    method: Method,
    path: String,
    route: Route,
    status: u16,
    head_ms: u64,
    upstream_request_id: Option<String>,
    queue_ms: Option<String>,
    attempts: Option<String>,
    cache: Option<String>,
    received: Instant,
    ctx: Option<Arc<RequestContext>>,
    metrics: Arc<Metrics>,
}

impl Line {
    fn emit(&self, complete: bool) {
        let ctx = self.ctx.as_deref();
        let model = ctx.and_then(|c| c.model.as_deref());
        self.metrics.request(
            self.route.label(),
            model,
            self.status,
            self.cache.as_deref().unwrap_or(""),
        );
        let acc = ctx.map(|c| c.tally.get()).unwrap_or_default();
        tracing::info!(
            target: "penstock::access",
            request_id = self.id,
            method = %self.method,
            path = self.path,
            route = self.route.label(),
            model,
            stream = ctx.is_some_and(|c| c.stream),
            status = self.status,
            // Time to the response head, and to its end.
            latency_ms = self.head_ms,
            duration_ms = self.received.elapsed().as_millis() as u64,
            complete,
            upstream_request_id = self.upstream_request_id.as_deref(),
            queue_ms = self.queue_ms.as_deref(),
            attempts = self.attempts.as_deref(),
            cache = self.cache.as_deref(),
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
    struct Logged {
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
    fn wrap(inner: Body, line: Line) -> Body {
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

    fn test_metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(&Default::default()))
    }

    #[test]
    fn routes_from_openai_and_azure_paths() {
        assert_eq!(
            Route::from_path("/v1/images/generations"),
            Route::ImagesGenerations
        );
        assert_eq!(
            Route::from_path("/openai/deployments/img/images/generations"),
            Route::ImagesGenerations
        );
        assert_eq!(
            Route::from_path("/v1/chat/completions"),
            Route::ChatCompletions
        );
        assert_eq!(Route::from_path("/v1/completions"), Route::Completions);
        assert_eq!(Route::from_path("/v1/models/gpt-4o"), Route::Models);
        assert_eq!(Route::from_path("/v1/files"), Route::Other);
    }

    #[test]
    fn tenants_are_key_hashes_or_client_ids_never_keys() {
        let mut config = EdgeConfig::new(&Config::default(), test_metrics());
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-secret"),
        );
        h.insert("x-penstock-client", HeaderValue::from_static("web"));
        let (t, cred) = config.identify(&h);
        assert!(t.0.starts_with("key:") && !t.0.contains("secret"));
        assert_eq!(t.0, cred, "pass-through: the key is both tenant and pool");
        assert_eq!(config.identify(&HeaderMap::new()).0.0.as_ref(), "anonymous");
        config.sidecar = true;
        let (t, cred) = config.identify(&h);
        assert_eq!((t.0.as_ref(), cred.as_ref()), ("client:web", "sidecar"));
    }

    #[tokio::test]
    async fn cache_keys_follow_meaning_not_bytes() {
        let config = EdgeConfig::new(&Config::default(), test_metrics());
        let tenant = Tenant("key:a".into());
        let key = |body: &'static str, path: &str| {
            let parts = Request::post(path).body(()).unwrap().into_parts().0;
            let v: Value = serde_json::from_str(body).unwrap();
            config.cache_key(
                &parts,
                &tenant,
                &Parsed::Json(v),
                &Bytes::from_static(body.as_bytes()),
            )
        };
        let a = key(
            r#"{"model":"gpt-image-1","prompt":"a fox","n":1}"#,
            "/v1/images/generations",
        );
        let b = key(
            r#"{ "n": 1, "prompt": "a fox",  "model": "gpt-image-1" }"#,
            "/v1/images/generations",
        );
        assert!(a.is_some());
        assert_eq!(a, b, "key order and whitespace do not matter");
        assert_ne!(
            a,
            key(
                r#"{"model":"gpt-image-1","prompt":"a fox","n":2}"#,
                "/v1/images/generations"
            )
        );
        assert_eq!(
            key(r#"{"input":"x"}"#, "/v1/chat/completions"),
            None,
            "not a cached path"
        );
        assert_eq!(
            key(r#"{"prompt":"x","stream":true}"#, "/v1/images/generations"),
            None
        );
        let other = Tenant("key:b".into());
        let parts = Request::post("/v1/images/generations")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let v: Value =
            serde_json::from_str(r#"{"model":"gpt-image-1","prompt":"a fox","n":1}"#).unwrap();
        assert_ne!(
            a,
            config.cache_key(&parts, &other, &Parsed::Json(v), &Bytes::new()),
            "tenants apart"
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=0, No-Cache"),
        );
        assert_eq!(CacheMode::from_headers(&h), CacheMode::Refresh);
        h.append(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        assert_eq!(CacheMode::from_headers(&h), CacheMode::Bypass);
    }

    #[tokio::test]
    async fn multipart_digests_ignore_the_boundary_and_field_order() {
        let body = |boundary: &str, swap: bool| {
            let prompt = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nblue\r\n"
            );
            let image = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\nPNGDATA\r\n"
            );
            let (a, b) = if swap {
                (image, prompt)
            } else {
                (prompt, image)
            };
            Bytes::from(format!("{a}{b}--{boundary}--\r\n"))
        };
        let summary = |boundary: &str, swap| {
            let ct = format!("multipart/form-data; boundary={boundary}");
            let b = body(boundary, swap);
            async move { multipart_summary(&ct, &b).await.unwrap().digest }
        };
        assert_eq!(summary("aaa", false).await, summary("zzz", true).await);
    }

    #[test]
    fn credentials_never_show_in_debug_output() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-secret"),
        );
        h.insert("api-key", HeaderValue::from_static("azure-secret"));
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-other-secret"),
        );
        let h = credentials_marked_sensitive(h);
        let shown = format!("{h:?}");
        assert_eq!(
            h.get_all(header::AUTHORIZATION).iter().count(),
            2,
            "every value kept"
        );
        assert!(!shown.contains("secret"), "{shown}");
        assert_eq!(
            h[header::AUTHORIZATION],
            "Bearer sk-secret",
            "still sent as it came"
        );
    }

    #[test]
    fn client_deadlines_take_the_shorter() {
        let mut h = HeaderMap::new();
        assert_eq!(client_max_wait(&h), None);
        h.insert("x-stainless-timeout", HeaderValue::from_static("600"));
        assert_eq!(client_max_wait(&h), Some(Duration::from_secs(600)));
        h.insert("x-penstock-max-wait-ms", HeaderValue::from_static("1500"));
        assert_eq!(client_max_wait(&h), Some(Duration::from_millis(1500)));
        assert_eq!(
            azure_deployment("/openai/deployments/img/images/generations").as_deref(),
            Some("img")
        );
    }

    #[tokio::test]
    async fn json_is_parsed_once_and_bad_json_refused() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let body = Bytes::from_static(br#"{"prompt":"x","stream":true,"model":"gpt-image-1"}"#);
        let p = parse_body(Route::ImagesGenerations, &h, &body)
            .await
            .unwrap();
        assert_eq!(p.model(), Some("gpt-image-1"));
        assert!(p.stream());
        // Valid JSON of another shape passes on.
        let p = parse_body(Route::Other, &h, &Bytes::from_static(b"[1,2]"))
            .await
            .unwrap();
        assert!(p.model().is_none());
        let e = parse_body(Route::Other, &h, &Bytes::from_static(b"{\"model\":"))
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), "penstock_invalid_json");
    }

    #[tokio::test]
    async fn multipart_fields_and_image_sizes_are_read_and_broken_framing_refused() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=XyZ"),
        );
        // A PNG header declaring 640x480.
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend_from_slice(&640u32.to_be_bytes());
        png.extend_from_slice(&480u32.to_be_bytes());
        png.extend_from_slice(&[8, 6, 0, 0, 0]);
        let mut body = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-image-1\r\n--XyZ\r\nContent-Disposition: form-data; name=\"image[]\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n".to_vec();
        body.extend_from_slice(&png);
        body.extend_from_slice(b"\r\n--XyZ--\r\n");
        let p = parse_body(Route::ImagesEdits, &h, &Bytes::from(body))
            .await
            .unwrap();
        assert_eq!(p.model(), Some("gpt-image-1"));
        let Parsed::Multipart(m) = p else {
            panic!("multipart")
        };
        assert_eq!(
            m.images,
            vec![InputImage {
                size: Some((640, 480))
            }]
        );
        let broken = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt",
        );
        let e = parse_body(Route::ImagesEdits, &h, &broken)
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), "penstock_invalid_multipart");
    }
}
