//! The edge of the stack. It enforces the body limit (413 before reading when
//! `content-length` says so), buffers the body once so later layers can price, key
//! and replay it, parses it once ([`parse`]) into the request's
//! [`RequestContext`], turns penstock's errors into responses ([`respond`]), and
//! writes the one log line per request ([`log`]).

pub mod estimate;
pub mod log;
pub mod parse;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, header};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use tower::Service;

use crate::config::{CacheScope, Config, ProjectConfig};
use crate::telemetry::metrics::Metrics;
use crate::vocab::body::{Body, BoxError};
use crate::vocab::context::{CacheKey, CacheMode, Payload, RequestContext, Tally, Tenant};
use crate::vocab::cost::Cost;
use crate::vocab::error::ProxyError;
use crate::vocab::headers::{first_of, name, seconds};
use crate::vocab::route::Route;
use crate::vocab::scope::OwnOrgs;
use estimate::Estimator;
use futures_util::future::{Either, ready};
use log::{Line, Logged};
use parse::{Parsed, RequestError, hash_json, parse_body};

/// A stable, non-reversible name for the credential a request carries.
fn key_id(headers: &HeaderMap) -> Arc<str> {
    let credential = headers
        .get(header::AUTHORIZATION)
        .or_else(|| headers.get(name::API_KEY))
        .map(HeaderValue::as_bytes);
    let Some(credential) = credential else {
        return "anonymous".into();
    };
    // A client sends the same key again and again: each thread remembers the
    // ids of the last keys it hashed (the keys themselves stay in memory, as
    // they do in the request's headers; they are never logged).
    thread_local! {
        static KNOWN: std::cell::RefCell<foldhash::HashMap<Box<[u8]>, Arc<str>>> =
            std::cell::RefCell::new(foldhash::HashMap::default());
    }
    // Bounded in bytes: at most this many keys, each at most this long (a
    // longer one is hashed every time, never kept): 1 MiB a thread.
    const MOST_KNOWN: usize = 4096;
    const LONGEST_KNOWN: usize = 256;
    if credential.len() > LONGEST_KNOWN {
        return key_id_of(credential).into();
    }
    KNOWN.with_borrow_mut(|known| {
        if let Some(id) = known.get(credential) {
            return id.clone();
        }
        let id: Arc<str> = key_id_of(credential).into();
        if known.len() >= MOST_KNOWN {
            known.clear();
        }
        known.insert(credential.into(), id.clone());
        id
    })
}

/// The id of a credential header's value (`Bearer sk-...`, or Azure's key).
pub fn key_id_of(credential: &[u8]) -> String {
    format!("key:{}", &blake3::hash(credential).to_hex()[..16])
}

/// The longest organization or project name kept from a request's headers.
const MAX_SCOPE: usize = 64;

/// `@org/project` when the request names the organization or project whose
/// limits (and bill) it spends, else "". Naming the key's own organization
/// (as its answers name it) is naming none: the same limits.
fn org_project(headers: &HeaderMap, key: &str, own: &OwnOrgs) -> String {
    fn text(v: Option<&HeaderValue>) -> &str {
        let v = v.and_then(|v| v.to_str().ok()).unwrap_or("").trim();
        &v[..v.floor_char_boundary(MAX_SCOPE)]
    }
    let [org, project] = first_of(headers, [&name::OPENAI_ORGANIZATION, &name::OPENAI_PROJECT]);
    let (mut org, project) = (text(org), text(project));
    if !org.is_empty() && own.is_own(key, org) {
        org = "";
    }
    if org.is_empty() && project.is_empty() {
        String::new()
    } else {
        format!("@{org}/{project}")
    }
}

/// The longest client id kept from the client id header.
const MAX_CLIENT_ID: usize = 64;

/// Bodies up to this size are priced on the async worker; larger ones (long
/// prompts take milliseconds to tokenize) on the blocking pool.
const TOKENIZE_INLINE: usize = 64 * 1024;

/// What the edge needs to know to build a request's context.
pub struct EdgeConfig {
    pub(crate) max_body: u64,
    /// Sidecar mode: one upstream credential; clients are told apart by header.
    pub(crate) sidecar: bool,
    pub(crate) client_id_header: HeaderName,
    pub(crate) estimator: Estimator,
    /// Paths whose POSTs get a cache key; `None` when the cache is off.
    pub(crate) cache_paths: Option<foldhash::HashSet<String>>,
    /// Everyone shares cache entries, not only each tenant.
    pub(crate) cache_global: bool,
    /// The longest a request may take (`retry.deadline`).
    pub(crate) deadline: Duration,
    /// The longest gap between a request body's bytes.
    pub(crate) body_read_timeout: Duration,
    /// How a refused body is read off: until silent this long, or this
    /// long in all.
    pub(crate) lingering: (Duration, Duration),
    /// Bytes of request bodies held at once, in [`HELD_UNIT`]s.
    pub(crate) buffered: Arc<tokio::sync::Semaphore>,
    pub(crate) max_buffered: u64,
    /// Route label -> the model the upstream uses when a request names none.
    pub(crate) default_models: std::collections::BTreeMap<String, String>,
    /// Key id -> the configured project whose pool it pays into.
    pub(crate) projects: foldhash::HashMap<Arc<str>, Arc<str>>,
    /// Each key's own organization, as the upstream's answers name it.
    pub(crate) own_orgs: Arc<OwnOrgs>,
    pub(crate) metrics: Arc<Metrics>,
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
            cache_global: config.cache.scope == CacheScope::Global,
            projects: Default::default(),
            own_orgs: Default::default(),
            default_models: config.estimate.default_model.clone(),
            deadline: config.retry.deadline,
            body_read_timeout: config.server.body_read_timeout,
            lingering: (
                config.server.lingering_timeout,
                config.server.lingering_time,
            ),
            buffered: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(config.server.max_buffered.as_u64().div_ceil(HELD_UNIT))
                    .unwrap_or(usize::MAX)
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            max_buffered: config.server.max_buffered.as_u64(),
            metrics,
        }
    }

    /// The cache key, for a cacheable, non-streamed POST.
    fn cache_key(
        &self,
        parts: &http::request::Parts,
        owner: &str,
        parsed: &Parsed,
        body: &Bytes,
    ) -> Option<CacheKey> {
        let paths = self.cache_paths.as_ref()?;
        if parts.method != Method::POST || !paths.contains(parts.uri.path()) || parsed.stream() {
            return None;
        }
        // A stored response (the Responses API's `store`, true unless set
        // false) is an object of its owner's: its id is handed only within
        // the tenant, even where the cache is global.
        let stored = Route::from_path(parts.uri.path()) == Route::Responses
            && match parsed {
                Parsed::Json(v) => {
                    v.get("store").and_then(crate::vocab::json::Json::as_bool) != Some(false)
                }
                _ => true,
            };
        let mut h = blake3::Hasher::new();
        h.update(b"penstock-cache-v1\0");
        h.update(if self.cache_global && !stored {
            b"*"
        } else {
            owner.as_bytes()
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
        // A request that refuses fallback models never shares an answer
        // one of them gave.
        if parts
            .headers
            .get(crate::vocab::headers::name::FALLBACK)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"none"))
        {
            h.update(b"no-fallback\0");
        }
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
    /// The client (its key, or its client id in sidecar mode), the pool's
    /// credential (the key, or its project, with the organization/project
    /// the request names), and whose cache entries it may share: the key with
    /// that organization/project (one organization never gets what another
    /// paid for).
    fn identify(&self, headers: &HeaderMap) -> (Tenant, Arc<str>, Arc<str>) {
        if self.sidecar {
            let client = headers
                .get(&self.client_id_header)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim())
                .filter(|v| !v.is_empty());
            let tenant: Arc<str> = match client {
                Some(c) => Tenant::client(&c[..c.floor_char_boundary(MAX_CLIENT_ID)]).0,
                None => "anonymous".into(),
            };
            (Tenant(tenant.clone()), "sidecar".into(), tenant)
        } else {
            // The client is its key, whatever headers it adds: its caps, its
            // turns, its jobs and its cache entries follow the key. OpenAI's
            // limits belong to an organization/project: the headers that
            // choose one are part of the pool, and keys of one configured
            // project share its pool.
            let key = key_id(headers);
            let scope = org_project(headers, &key, &self.own_orgs);
            let owner: Arc<str> = match scope.is_empty() {
                true => key.clone(),
                false => format!("{key}{scope}").into(),
            };
            let credential = match self.projects.get(&key) {
                Some(project) => format!("project:{project}{scope}").into(),
                None => owner.clone(),
            };
            (Tenant(key), credential, owner)
        }
    }

    pub(crate) fn buffered(&self) -> Buffered {
        Buffered {
            permits: self.buffered.clone(),
            max: self.max_buffered,
        }
    }

    /// Adds the keys of `[[project]]`s, by id or by the variable holding them.
    pub(crate) fn add_projects(
        &mut self,
        projects: &[ProjectConfig],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), String> {
        for p in projects {
            for id in &p.key_ids {
                self.projects
                    .insert(id.as_str().into(), p.name.as_str().into());
            }
            for var in &p.key_envs {
                let key = env(var)
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| format!("environment variable {var} is not set"))?;
                let id = key_id_of(format!("Bearer {key}").as_bytes());
                self.projects.insert(id.into(), p.name.as_str().into());
            }
        }
        Ok(())
    }
}

/// How many bytes of request bodies penstock holds, for `/status`.
#[derive(Clone)]
pub(crate) struct Buffered {
    permits: Arc<tokio::sync::Semaphore>,
    max: u64,
}

impl Buffered {
    pub(crate) fn bytes(&self) -> u64 {
        let free = self.permits.available_permits() as u64;
        self.max
            .div_ceil(HELD_UNIT)
            .saturating_sub(free)
            .saturating_mul(HELD_UNIT)
    }
}

/// Builds the [`Edge`] service around the rest of the stack.
#[derive(Clone)]
pub(crate) struct Layer {
    config: Arc<EdgeConfig>,
}

impl Layer {
    /// With a config also used elsewhere (the jobs runner parses stored
    /// requests as the edge parses live ones).
    pub(crate) fn shared(config: Arc<EdgeConfig>) -> Layer {
        Layer { config }
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
pub(crate) struct Edge<S> {
    inner: S,
    config: Arc<EdgeConfig>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn next_request_id() -> String {
    // Unique within a process run; the start time keeps restarts apart in logs.
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let prefix = PREFIX.get_or_init(|| {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() & 0xff_ffff)
            .unwrap_or(0);
        format!("ps-{epoch:06x}-")
    });
    // Each thread takes its numbers in blocks: no counter shared between
    // cores is written per request. Numbers stay unique; across threads they
    // are not in the order requests came.
    const BLOCK: u64 = 1024;
    thread_local! {
        static TAKEN: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
    }
    let n = TAKEN.with(|taken| {
        let (mut next, mut end) = taken.get();
        if next == end {
            next = NEXT_ID.fetch_add(BLOCK, Ordering::Relaxed);
            end = next.saturating_add(BLOCK);
        }
        taken.set((next.saturating_add(1), end));
        next
    });
    let mut id = String::with_capacity(prefix.len() + 16);
    id.push_str(prefix);
    push_hex(&mut id, n);
    id
}

/// `n` in lowercase hex without leading zeros, as `{:x}` writes it.
fn push_hex(out: &mut String, n: u64) {
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(char::from(
            b"0123456789abcdef"[((n >> (i * 4)) & 0xf) as usize],
        ));
    }
}

impl<S, B> Service<Request<B>> for Edge<S>
where
    S: crate::vocab::service::Inner,
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
        let uri = req.uri().clone();
        let route = Route::from_path(uri.path());
        // Started here, outside the future below, and boxed apart: parsing's
        // state (the request, a multipart parser) is large and done before the
        // wait for budget; inside, every queued request would carry it. It
        // ends by calling the rest of the stack, so what waits below is the
        // context and that call's future, one pointer.
        let buffer_config = config.clone();
        let started = Box::pin(async move {
            match buffer(req, buffer_config, route, received).await {
                Ok(req) => {
                    let ctx = req.body().ctx.clone();
                    (
                        ctx,
                        Either::Left(crate::vocab::service::call_now(&mut inner, req)),
                    )
                }
                Err(e) => (None, Either::Right(Box::pin(ready(Err(e))))),
            }
        });
        Box::pin(async move {
            let (ctx, call) = started.await;
            let result = call.await;
            // What penstock did for the request, told by the layers in its
            // tally, and its error if it ended in one: both written here, once.
            let tally = ctx.as_deref().map(|c| c.tally.get()).unwrap_or_default();
            let mut resp = match result {
                Ok(resp) => resp,
                Err(e) => {
                    let c = ctx.as_deref();
                    config
                        .metrics
                        .recent
                        .refused(crate::telemetry::recent::Refusal {
                            at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                                .to_string(),
                            status: e.status().as_u16(),
                            code: e.code(),
                            message: e.to_string(),
                            route: route.label(),
                            model: c.and_then(|c| c.model.clone()),
                            client: c.map(|c| c.tenant.0.to_string()),
                        });
                    crate::vocab::render::into_response(e)
                }
            };
            let (attempts, cache) = crate::vocab::render::tally_headers(resp.headers_mut(), &tally);
            if let Ok(v) = HeaderValue::try_from(id.as_str()) {
                resp.headers_mut().insert(name::REQUEST_ID, v);
            }
            // One pass over the answer's names: compared, not hashed.
            let [mut upstream_request_id, mut queue_ms] = [None, None];
            for (name, value) in resp.headers() {
                let slot = match name {
                    n if *n == name::UPSTREAM_REQUEST_ID => &mut upstream_request_id,
                    n if *n == name::QUEUE_MS => &mut queue_ms,
                    _ => continue,
                };
                slot.get_or_insert_with(|| value.clone());
            }
            let line = Line {
                upstream_request_id,
                queue_ms,
                attempts,
                cache,
                id,
                method,
                uri,
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
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let route = Route::from_path(req.uri().path());
    buffer(req, config, route, Instant::now()).await
}

/// Buffers the body within the limit and attaches the context.
pub(crate) async fn buffer<B>(
    req: Request<B>,
    config: Arc<EdgeConfig>,
    route: Route,
    received: Instant,
) -> Result<Request<Payload>, ProxyError>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (mut parts, body) = req.into_parts();
    // A tunnel or a trace is not an API call; their answers would not reach
    // the client as HTTP/1.1 expects.
    if parts.method == Method::CONNECT || parts.method == Method::TRACE {
        drain(Box::pin(body), config.lingering);
        return Err(RequestError::MethodNotAllowed(parts.method).into());
    }
    let (bytes, held) = read_body(body, declared, &config).await?;
    let parsed = if parts.method == Method::GET || parts.method == Method::HEAD {
        Parsed::None
    } else {
        parse_body(route, &parts.headers, &bytes).await?
    };
    // Azure names the deployment in the path rather than the model in the body;
    // without either, the upstream picks its default, which spends that model's
    // limits.
    let model = parsed
        .model()
        .map(str::to_string)
        .or_else(|| azure_deployment(parts.uri.path()))
        .or_else(|| config.default_models.get(route.label()).cloned());
    // Pricing a large body takes milliseconds: off the async workers. It is
    // never a reason to refuse: should it fail, the body's size prices it.
    let cost = if bytes.len() > TOKENIZE_INLINE {
        // The blocking thread reads the same bytes (shared, not copied: a
        // copy of a 50 MiB prompt is 50 MiB more per request while it is
        // priced) and parses a JSON body again, borrowing from them.
        let (priced, model, shared) = (config.clone(), model.clone(), bytes.clone());
        let size = bytes.len() as u64;
        let multipart = match &parsed {
            Parsed::Multipart(m) => Some(m.clone()),
            _ => None,
        };
        let json = matches!(parsed, Parsed::Json(_));
        tokio::task::spawn_blocking(move || {
            let again = match (multipart, json) {
                (Some(m), _) => Parsed::Multipart(m),
                (None, true) => parse::json_of(&shared).map_or(Parsed::None, Parsed::Json),
                (None, false) => Parsed::None,
            };
            priced
                .estimator
                .estimate(route, model.as_deref(), again.view())
        })
        .await
        .unwrap_or_else(|_| Cost {
            requests: 1,
            tokens: size
                .div_ceil(4)
                .saturating_add(config.estimator.default_output()),
            images: u64::from(route.is_image()),
        })
    } else {
        config
            .estimator
            .estimate(route, model.as_deref(), parsed.view())
    };
    let (tenant, credential, owner) = config.identify(&parts.headers);
    let cache_key = config.cache_key(&parts, &owner, &parsed, &bytes);
    let image = estimate::image_ask(route, parsed.view());
    let image_tool = match (&parsed, route) {
        (Parsed::Json(v), Route::Responses) => {
            let default = config
                .default_models
                .get(Route::ImagesGenerations.label())
                .map_or("gpt-image-1", String::as_str);
            config
                .estimator
                .responses_image_tool(v, default)
                .map(Box::new)
        }
        _ => None,
    };
    let spread = spreads(route, &parsed);
    let ctx = RequestContext {
        spread,
        failed_upstreams: Default::default(),
        spent_upstreams: Default::default(),
        route,
        stream: parsed.stream(),
        model_label: config.metrics.model_label(model.as_deref()),
        model,
        tenant,
        credential,
        cost,
        max_wait: client_max_wait(&parts.headers),
        cache_key,
        cache_mode: CacheMode::from_headers(&parts.headers),
        image: image.map(Box::new),
        image_tool,
        tally: Tally::default(),
        headers: credentials_marked_sensitive(std::mem::take(&mut parts.headers)),
        deadline: received + config.deadline,
    };
    let payload = Payload {
        bytes,
        ctx: Some(Arc::new(ctx)),
        interest: None,
        held,
        gate: None,
        upstream: None,
        model: None,
        departure: None,
    };
    Ok(Request::from_parts(parts, payload))
}

/// Reads the rest of a refused body in the background and throws it away,
/// so the client, still sending, reads the refusal instead of a reset
/// (nginx's lingering close). Bounded by time, not bytes: until the client
/// is silent for `idle`, or `total` in all, whatever it sends meanwhile.
/// Nothing is kept: each frame is dropped as it comes.
fn drain<B>(mut body: B, (idle, total): (Duration, Duration))
where
    B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let until = Instant::now() + total;
        loop {
            let next = (Instant::now() + idle).min(until);
            match tokio::time::timeout_at(next, body.frame()).await {
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
    });
}

/// The bytes of memory one permit of the body budget stands for.
const HELD_UNIT: u64 = 1024;

fn units(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(HELD_UNIT)).unwrap_or(u32::MAX)
}

/// Reads a request body within the size limit, the idle timeout between its
/// bytes and the bound on bytes held by all requests. A refused body is
/// drained in the background so its client reads the answer.
async fn read_body<B>(
    body: B,
    declared: Option<u64>,
    config: &EdgeConfig,
) -> Result<(Bytes, Option<Arc<tokio::sync::OwnedSemaphorePermit>>), ProxyError>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut body = Box::pin(body);
    let max_body = config.max_body;
    let too_large = RequestError::BodyTooLarge { limit: max_body };
    if declared.is_some_and(|n| n > max_body) {
        drain(body, config.lingering);
        return Err(too_large.into());
    }
    let overloaded = || RequestError::Overloaded {
        limit: config.max_buffered,
    };
    // Reserved up front when the length is known, else as bytes arrive.
    let mut held = match declared.filter(|n| *n > 0) {
        Some(n) => match config.buffered.clone().try_acquire_many_owned(units(n)) {
            Ok(permit) => Some(permit),
            Err(_) => {
                drain(body, config.lingering);
                return Err(overloaded().into());
            }
        },
        None => None,
    };
    let mut buf = bytes::BytesMut::new();
    let mut first: Option<Bytes> = None;
    loop {
        let frame = match tokio::time::timeout(config.body_read_timeout, body.frame()).await {
            Err(_) => return Err(RequestError::BodyStalled(config.body_read_timeout).into()),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(RequestError::BodyRead(e.into().to_string()).into()),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let len = (buf.len() + first.as_ref().map_or(0, Bytes::len)) as u64 + data.len() as u64;
        if len > max_body {
            drain(body, config.lingering);
            return Err(too_large.into());
        }
        let need = units(len);
        let have = held.as_ref().map_or(0, |p| p.num_permits() as u32);
        if need > have {
            match config.buffered.clone().try_acquire_many_owned(need - have) {
                Ok(more) => match held.as_mut() {
                    Some(p) => p.merge(more),
                    None => held = Some(more),
                },
                Err(_) => {
                    drain(body, config.lingering);
                    return Err(overloaded().into());
                }
            }
        }
        // A body in one frame (the usual case) is kept without a copy; one
        // in several is gathered in one buffer of its declared length,
        // reserved once (grown by doubling, a 50 MiB body would hold 64 MiB
        // and copy itself on the way).
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            Some(f) => {
                let whole = declared.unwrap_or(0).min(max_body);
                buf.reserve(
                    usize::try_from(whole)
                        .unwrap_or(0)
                        .max(f.len() + data.len()),
                );
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&data);
            }
            None => buf.extend_from_slice(&data),
        }
    }
    let bytes = first.unwrap_or_else(|| buf.freeze());
    Ok((bytes, held.map(Arc::new)))
}

/// Marks credential headers sensitive: their `Debug` prints nothing, and HTTP/2
/// never indexes them. Nothing logs them; this keeps it so.
fn credentials_marked_sensitive(mut headers: HeaderMap) -> HeaderMap {
    // One pass over the few headers a request has, names compared, not hashed.
    for (key, value) in headers.iter_mut() {
        if key == header::AUTHORIZATION || key == name::API_KEY {
            value.set_sensitive(true);
        }
    }
    headers
}

/// Whether a request may go to any upstream serving its model: a call that
/// makes nothing kept (an image, a completion or embedding not stored). A
/// file, a batch, an upload, a stored response or completion, or any call
/// that names one, belongs to the organization that made it.
fn spreads(route: Route, parsed: &Parsed) -> bool {
    // Looked up for chat alone, the one route where it decides.
    let stored = || match parsed {
        Parsed::Json(v) => v.get("store").and_then(crate::vocab::json::Json::as_bool) == Some(true),
        _ => false,
    };
    match route {
        Route::ImagesGenerations
        | Route::ImagesEdits
        | Route::ImagesVariations
        | Route::Completions
        | Route::Embeddings => true,
        Route::ChatCompletions => !stored(),
        Route::Responses | Route::Models | Route::Other => false,
    }
}

fn azure_deployment(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/openai/deployments/")?;
    let name = rest.split('/').next()?;
    (!name.is_empty()).then(|| name.to_string())
}

/// The client's own bound on waiting: `x-penstock-max-wait-ms`, or the SDK's
/// whole-request timeout (`x-stainless-timeout`, seconds), whichever is shorter.
fn client_max_wait(headers: &HeaderMap) -> Option<Duration> {
    let [ms, sdk] = first_of(headers, [&name::MAX_WAIT_MS, &name::STAINLESS_TIMEOUT]);
    let num = |v: Option<&HeaderValue>| {
        v.and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    let ms = num(ms).and_then(|ms| seconds(ms / 1000.0));
    let sdk = num(sdk).and_then(seconds);
    match (ms, sdk) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::json::Json;

    #[test]
    fn request_ids_are_hex_counters_after_the_start_time() {
        for n in [0u64, 9, 15, 16, 255, 0xdead_beef, u64::MAX] {
            let mut out = String::new();
            push_hex(&mut out, n);
            assert_eq!(out, format!("{n:x}"));
        }
        let (a, b) = (next_request_id(), next_request_id());
        assert_ne!(a, b);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(parts.len(), 3, "{a}");
        assert_eq!((parts[0], parts[1].len()), ("ps", 6), "{a}");
        assert!(
            parts[1..]
                .iter()
                .all(|p| u64::from_str_radix(p, 16).is_ok()),
            "{a}"
        );
    }

    #[test]
    fn request_ids_are_unique_across_threads() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..3000).map(|_| next_request_id()).collect::<Vec<_>>())
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        for t in threads {
            for id in t.join().unwrap() {
                assert!(seen.insert(id.clone()), "{id} twice");
            }
        }
        assert_eq!(seen.len(), 12_000);
    }

    #[test]
    fn a_credential_has_the_same_id_each_time_and_ids_differ_by_key() {
        let headers = |key: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(key).unwrap());
            h
        };
        let a = key_id(&headers("Bearer sk-a"));
        assert_eq!(&*a, key_id_of(b"Bearer sk-a"));
        assert_eq!(key_id(&headers("Bearer sk-a")), a, "the same id again");
        assert!(
            Arc::ptr_eq(&key_id(&headers("Bearer sk-a")), &a),
            "remembered, not hashed again"
        );
        assert_ne!(key_id(&headers("Bearer sk-b")), a);
        assert_eq!(&*key_id(&HeaderMap::new()), "anonymous");
    }

    fn test_metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(&Default::default()))
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
        let (t, cred, _) = config.identify(&h);
        assert!(t.0.starts_with("key:") && !t.0.contains("secret"));
        assert_eq!(t.0, cred, "pass-through: the key is both tenant and pool");
        assert_eq!(config.identify(&HeaderMap::new()).0.0.as_ref(), "anonymous");
        config.sidecar = true;
        let (t, cred, _) = config.identify(&h);
        assert_eq!((t.0.as_ref(), cred.as_ref()), ("client:web", "sidecar"));
    }

    #[tokio::test]
    async fn cache_keys_follow_meaning_not_bytes() {
        let config = EdgeConfig::new(&Config::default(), test_metrics());
        let tenant = Tenant("key:a".into());
        let key = |body: &'static str, path: &str| {
            let parts = Request::post(path).body(()).unwrap().into_parts().0;
            let v: Json = serde_json::from_str(body).unwrap();
            config.cache_key(
                &parts,
                &tenant.0,
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
        assert_eq!(
            a,
            key(
                r#"{"n":3,"model":"gpt-image-1","prompt":"a \u0066ox","n":1}"#,
                "/v1/images/generations"
            ),
            "a key sent twice counts by its last value, escapes by what they mean"
        );
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
        let v: Json =
            serde_json::from_str(r#"{"model":"gpt-image-1","prompt":"a fox","n":1}"#).unwrap();
        assert_ne!(
            a,
            config.cache_key(&parts, &other.0, &Parsed::Json(v), &Bytes::new()),
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
        h.insert("x-penstock-max-wait-ms", HeaderValue::from_static("1e30"));
        h.insert("x-stainless-timeout", HeaderValue::from_static("1e20"));
        assert_eq!(
            client_max_wait(&h),
            Some(crate::vocab::headers::MAX_DELAY),
            "no panic"
        );
        assert_eq!(
            azure_deployment("/openai/deployments/img/images/generations").as_deref(),
            Some("img")
        );
    }
}
