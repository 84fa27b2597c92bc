//! A fake OpenAI API on loopback: image generations (JSON and streamed partials),
//! edits (multipart and JSON), chat completions (plain and streamed), embeddings and
//! models, with `usage` and `x-ratelimit-*` headers like the real one. It can enforce
//! per-key, per-model request and token limits over short windows, add latency, fail
//! calls, reset connections or run out of money, and it records every call so tests
//! can assert what reached it.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::Instant;

pub type Body = BoxBody<Bytes, std::io::Error>;

/// Request, token and image limits, enforced as a sliding window per
/// organization/project (the `OpenAI-Organization` and `OpenAI-Project` headers,
/// else the key's own) and model, as OpenAI does.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Requests allowed in any `window`.
    pub requests: u32,
    /// Tokens allowed in any `window`, charged at arrival as OpenAI's limiter
    /// does: the request's characters at four a token plus the most the answer
    /// may take (`max_tokens` × `n`, the image output table); `None` for no limit.
    pub tokens: Option<u64>,
    /// Images allowed in any `window`; `None` for no limit.
    pub images: Option<u64>,
    pub window: Duration,
}

impl Limits {
    /// `n` a window as OpenAI announces it: per minute.
    fn per_minute(&self, n: u64) -> u64 {
        let per = u128::from(n) * 60_000 / self.window.as_millis().max(1);
        u64::try_from(per).unwrap_or(u64::MAX)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            requests: 10_000,
            tokens: None,
            images: None,
            window: Duration::from_secs(60),
        }
    }
}

/// How the fake behaves; can be changed while it runs with [`Fake::set_behaviour`].
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// Latency of each call, drawn uniformly from this range.
    pub latency: (Duration, Duration),
    /// Pause between SSE events of a streamed response.
    pub stream_interval: Duration,
    /// Fraction of calls answered with 500/502/503 (in turn).
    pub fail_rate: f64,
    /// Fraction of calls whose connection is reset without an answer.
    pub reset_rate: f64,
    /// The first N calls fail with 503 (deterministic failures for tests).
    pub fail_first: u32,
    /// Every Nth call fails with 500/502/503 (deterministic).
    pub fail_every: Option<u64>,
    /// Every Nth call has its connection reset (deterministic).
    pub reset_every: Option<u64>,
    /// Answer every call with 429 `insufficient_quota`.
    pub insufficient_quota: bool,
    /// Keys (`Authorization` or `api-key` values, as sent) OpenAI does not
    /// know: answered 401 `invalid_api_key`, before anything else.
    pub invalid_keys: Vec<String>,
    /// Keys (their `Authorization` value) whose organization's money is
    /// gone: their calls alone are answered `insufficient_quota`, as OpenAI
    /// answers per organization/project.
    pub quota_exhausted_keys: Vec<String>,
    /// Enforce these limits; `None` serves everything.
    pub limits: Option<Limits>,
    /// Streams break (connection error) after this many events.
    pub cut_stream_after: Option<u32>,
    /// Bytes of fake image data per generated image (before base64).
    pub image_bytes: usize,
    /// Keep request bodies in the call log.
    pub record_bodies: bool,
    /// Answer bodies stop after this many bytes and never finish (a stalled
    /// upstream, the connection still open).
    pub stall_after_bytes: Option<usize>,
    /// Announce the limits in `x-ratelimit-*`, per minute as OpenAI does (an
    /// upstream without limits announces ones too high to matter); off,
    /// answers carry no rate-limit headers at all, refusals included (a quiet
    /// upstream: only `retry-after` says anything).
    pub announce_limits: bool,
    /// Image answers carry `x-ratelimit-*` as text answers do. OpenAI's images
    /// endpoints announce nothing on a success (openai-php/client#288, still
    /// so): off by default.
    pub image_answer_limits: bool,
    /// Responses API answers carry `x-ratelimit-*` as chat answers do (they
    /// did not until mid-2026, openai-go#326); on by default.
    pub responses_answer_limits: bool,
    /// A refused image call carries `x-ratelimit-limit-images`,
    /// `-remaining-images` and `-reset-images` (a Go-style duration), as
    /// OpenAI's 429s for images do; on by default.
    pub image_refusal_limits: bool,
    /// Keys that belong to one project: (`Authorization` value, project). Calls
    /// with these keys spend their project's limits, shared by its keys.
    pub key_projects: Vec<(String, String)>,
    /// Compress answers (JSON, errors and streams) when the request's
    /// `Accept-Encoding` allows, brotli before gzip before deflate, as OpenAI's
    /// edge does.
    pub compress: bool,
    /// Close a keep-alive connection idle this long, as OpenAI's edge closes
    /// idle connections (a client must not send on one it just closed).
    pub idle_close: Option<Duration>,
    /// How long a new HTTPS connection's TLS handshake takes (over a real
    /// network, a few round trips: tens to hundreds of milliseconds). A
    /// client can send nothing on the connection before it ends. Served
    /// over plain HTTP, there is no handshake to wait for.
    pub handshake_delay: Duration,
    /// Act as an Azure OpenAI resource instead (see [`Azure`]).
    pub azure: Option<Azure>,
}

/// An Azure OpenAI resource, as far as we know it (`openai-contract.md`):
/// the v1 API at `/openai/v1/...` (the deployment as `model`) and
/// deployment paths `/openai/deployments/{deployment}/...?api-version=`;
/// an `api-key` header (or an Entra bearer token); answers carry
/// `x-ratelimit-remaining-requests/-tokens` without limits or resets; a
/// 429 comes in Azure's shape with `retry-after` and `retry-after-ms`; a
/// filtered prompt is refused with 400 `content_filter`. Limits apply per
/// deployment, as Azure's quota does.
#[derive(Clone, Debug, Default)]
pub struct Azure {
    /// Deployments that exist (none listed: any name is one).
    pub deployments: Vec<String>,
    /// A prompt containing this is refused by the content filter.
    pub filtered_word: Option<String>,
}

/// The path an Azure request came with, kept for the call log.
#[derive(Clone, Debug)]
struct AzureOriginal {
    path: String,
    query: Option<String>,
    deployment: Option<String>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            latency: (Duration::ZERO, Duration::ZERO),
            stream_interval: Duration::from_millis(10),
            fail_rate: 0.0,
            reset_rate: 0.0,
            fail_first: 0,
            fail_every: None,
            reset_every: None,
            insufficient_quota: false,
            invalid_keys: Vec::new(),
            quota_exhausted_keys: Vec::new(),
            limits: None,
            cut_stream_after: None,
            image_bytes: 64,
            record_bodies: true,
            stall_after_bytes: None,
            azure: None,
            key_projects: Vec::new(),
            announce_limits: true,
            image_answer_limits: false,
            responses_answer_limits: true,
            image_refusal_limits: true,
            compress: true,
            idle_close: None,
            handshake_delay: Duration::ZERO,
        }
    }
}

/// One call as the fake received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub version: http::Version,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The HTTP status the fake answered (0 for a reset connection).
    pub status: u16,
    /// When the fake answered (its head; with no latency, when it arrived).
    pub answered_at: std::time::Instant,
}

#[derive(Default)]
struct Window {
    /// (time, tokens, images) of each admitted call.
    calls: VecDeque<(Instant, u64, u64)>,
}

impl Window {
    /// Forgets the calls older than `window`.
    fn prune(&mut self, now: Instant, window: Duration) {
        while self
            .calls
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) >= window)
        {
            self.calls.pop_front();
        }
    }
}

/// What OpenAI's image 429s say: the image limit per minute, nothing left,
/// and when it resets (a Go duration).
fn image_refusal_headers(h: &mut HeaderMap, per_minute: u64, wait: Duration) {
    h.insert("x-ratelimit-limit-images", per_minute.into());
    h.insert("x-ratelimit-remaining-images", 0u64.into());
    h.insert(
        "x-ratelimit-reset-images",
        HeaderValue::from_str(&go_duration(wait)).unwrap(),
    );
}

struct State {
    behaviour: Mutex<Behaviour>,
    /// Stored responses (`store` not false): id -> the key that made it.
    responses: Mutex<HashMap<String, String>>,
    log: Mutex<Vec<Recorded>>,
    windows: Mutex<HashMap<(String, String), Window>>,
    rng: Mutex<u64>,
    seq: AtomicU64,
    /// Calls that arrived, answered or not (a caller may give up first).
    arrived: AtomicUsize,
    connections: AtomicUsize,
    /// Connections accepted and not yet closed.
    open: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// A running fake; it stops when dropped.
pub struct Fake {
    addr: SocketAddr,
    scheme: &'static str,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fake {
    /// Serves plain HTTP (HTTP/1.1 and h2c) on `127.0.0.1:0`.
    pub async fn start(behaviour: Behaviour) -> Fake {
        Self::serve("127.0.0.1:0".parse().unwrap(), behaviour, None)
            .await
            .expect("bind fake upstream")
    }

    /// Serves HTTPS with the given rustls config on `127.0.0.1:0`.
    pub async fn start_tls(behaviour: Behaviour, tls: Arc<rustls::ServerConfig>) -> Fake {
        Self::serve("127.0.0.1:0".parse().unwrap(), behaviour, Some(tls))
            .await
            .expect("bind fake upstream")
    }

    pub async fn serve(
        addr: SocketAddr,
        behaviour: Behaviour,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Fake> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            behaviour: Mutex::new(behaviour),
            log: Mutex::new(Vec::new()),
            windows: Mutex::new(HashMap::new()),
            rng: Mutex::new(0x9E37_79B9_7F4A_7C15),
            seq: AtomicU64::new(0),
            arrived: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            responses: Mutex::new(HashMap::new()),
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                st.connections.fetch_add(1, Ordering::Relaxed);
                st.open.fetch_add(1, Ordering::Relaxed);
                let (idle_close, handshake_delay) = {
                    let b = st.behaviour.lock().unwrap();
                    (b.idle_close, b.handshake_delay)
                };
                let st = st.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let closed = st.clone();
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    if let Some(idle) = idle_close {
                        // hyper's header-read timeout also ends a keep-alive
                        // connection idle that long.
                        builder
                            .http1()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(idle);
                    }
                    match acceptor {
                        Some(acceptor) => {
                            // The round trips of the handshake, before the
                            // server's answer to the client's hello.
                            tokio::time::sleep(handshake_delay).await;
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                    closed.open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Ok(Fake {
            addr,
            scheme,
            state,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (or https), without a trailing slash.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn set_behaviour(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.state.behaviour.lock().unwrap());
    }

    /// Every call received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.log.lock().unwrap().clone()
    }

    /// How many calls reached the fake, including ones whose caller gave up
    /// before the answer ([`Fake::requests`] holds the answered ones).
    pub fn calls(&self) -> usize {
        self.state.arrived.load(Ordering::Relaxed)
    }

    /// How many of its connections are open now.
    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::Relaxed)
    }

    /// How many connections the fake has accepted.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::Relaxed)
    }

    /// How many calls reached the fake on `path`.
    pub fn calls_to(&self, path: &str) -> usize {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .count()
    }

    /// How many calls were answered with this status.
    pub fn answered(&self, status: u16) -> usize {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.status == status)
            .count()
    }

    /// The most calls that were in progress at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::Relaxed)
    }

    pub fn clear(&self) {
        self.state.log.lock().unwrap().clear();
        self.state.arrived.store(0, Ordering::Relaxed);
        self.state.windows.lock().unwrap().clear();
        self.state.max_in_flight.store(0, Ordering::Relaxed);
    }
}

struct InFlight<'a>(&'a State);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl State {
    fn random(&self) -> f64 {
        let mut x = self.rng.lock().unwrap();
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x >> 11) as f64 / (1u64 << 53) as f64
    }

    fn record(&self, parts: &http::request::Parts, body: &Bytes, status: u16, keep_body: bool) {
        let original = parts.extensions.get::<AzureOriginal>();
        self.log.lock().unwrap().push(Recorded {
            method: parts.method.clone(),
            version: parts.version,
            path: original.map_or_else(|| parts.uri.path().to_string(), |o| o.path.clone()),
            query: match original {
                Some(o) => o.query.clone(),
                None => parts.uri.query().map(str::to_string),
            },
            headers: parts.headers.clone(),
            body: if keep_body {
                body.clone()
            } else {
                Bytes::new()
            },
            status,
            answered_at: std::time::Instant::now(),
        });
    }
}

/// What the fake understood of a request: enough to price it and answer it.
struct Call {
    model: String,
    n: u64,
    /// What OpenAI's limiter charges at arrival: characters at four a token,
    /// plus the most the answer may take.
    charged_tokens: u64,
    stream: bool,
    partial_images: u64,
    input_tokens: u64,
    output_tokens: u64,
    include_usage: bool,
    prompt: String,
    /// A Responses call: what it asked of its image tool, when the tool is
    /// called (forced by `tool_choice`, or the input asks for a picture).
    image_tool: Option<ImageTool>,
    /// A Responses call: the stored response it continues, and whether this
    /// one is stored.
    previous_response_id: Option<String>,
    store: bool,
    instructions: String,
}

/// The `image_generation` tool of a Responses call, as it is called.
#[derive(Clone, Debug)]
struct ImageTool {
    model: String,
    quality: String,
    size: String,
    partial_images: u64,
    /// Output tokens of the image, by the table.
    tokens: u64,
}

fn image_output_tokens(size: &str, quality: &str) -> u64 {
    let col = match size {
        "1024x1536" => 1,
        "1536x1024" => 2,
        _ => 0,
    };
    let row: [u64; 3] = match quality {
        "low" => [272, 408, 400],
        "high" => [4160, 6240, 6208],
        _ => [1056, 1584, 1568],
    };
    row[col]
}

/// A key's own organization: where its calls are billed when they name
/// none (OpenAI echoes it in `openai-organization` on every answer).
pub fn own_org(key: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("org-{:012x}", h & 0xffff_ffff_ffff)
}

/// Whose limits a call spends: the organization/project it names, else its
/// key's own organization, or its project (OpenAI: a project's keys share
/// the project's limits). Naming the key's own organization is the same as
/// naming none.
fn limit_scope(headers: &HeaderMap, key: &str, projects: &[(String, String)]) -> String {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let (org, project) = (get("openai-organization"), get("openai-project"));
    let mapped = projects.iter().find(|(k, _)| k == key).map(|(_, p)| p);
    match (org.is_empty() && project.is_empty(), mapped) {
        (true, Some(p)) => format!("org:/project:{p}"),
        (true, None) => format!("org:{}/project:", own_org(key)),
        (false, _) => {
            let org = if org.is_empty() {
                own_org(key)
            } else {
                org.to_string()
            };
            format!("org:{org}/project:{project}")
        }
    }
}

/// The text of a Responses `input`: a string, or items whose `content` is a
/// string or parts (`input_text`); other parts (images, files) add nothing.
fn input_text(input: &Value) -> String {
    match input {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .filter_map(|item| match item {
                Value::String(s) => Some(s.clone()),
                Value::Object(_) => match item.get("content") {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Array(parts)) => Some(
                        parts
                            .iter()
                            .filter_map(|p| p.get("text").and_then(Value::as_str))
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                    _ => item.get("text").and_then(Value::as_str).map(str::to_string),
                },
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// What a Responses call asks besides its input: instructions, storage, the
/// response it continues, and its image tool.
fn responses_call(v: &Value, call: &mut Call) -> Result<(), String> {
    call.instructions = v
        .get("instructions")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    call.store = v.get("store").and_then(Value::as_bool).unwrap_or(true);
    call.previous_response_id = v
        .get("previous_response_id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let Some(tool) = v.get("tools").and_then(Value::as_array).and_then(|t| {
        t.iter()
            .find(|t| t.get("type").and_then(Value::as_str) == Some("image_generation"))
    }) else {
        return Ok(());
    };
    let choice = v.get("tool_choice");
    let forced = choice.and_then(|c| c.get("type")).and_then(Value::as_str)
        == Some("image_generation")
        || choice.and_then(Value::as_str) == Some("required");
    let none = choice.and_then(Value::as_str) == Some("none");
    // The model calls the tool when told to, or when the input asks for a
    // picture (the fake's stand-in for the model's own choice).
    let lower = call.prompt.to_lowercase();
    let asked = ["image", "picture", "draw", "photo"]
        .iter()
        .any(|w| lower.contains(w));
    if none || !(forced || asked) {
        return Ok(());
    }
    let text = |k: &str, d: &str| tool.get(k).and_then(Value::as_str).unwrap_or(d).to_string();
    let quality = text("quality", "auto");
    let size = text("size", "auto");
    let partial_images = tool
        .get("partial_images")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .min(3);
    let table_quality = if quality == "auto" {
        "medium"
    } else {
        quality.as_str()
    };
    let tokens = image_output_tokens(&size, table_quality) + partial_images * 100;
    call.image_tool = Some(ImageTool {
        model: text("model", "gpt-image-1"),
        quality,
        size,
        partial_images,
        tokens,
    });
    Ok(())
}

fn text_tokens(s: &str) -> u64 {
    (s.chars().count() as u64).div_ceil(4)
}

async fn parse_call(parts: &http::request::Parts, body: &Bytes) -> Result<Call, String> {
    let path = parts.uri.path();
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut call = Call {
        model: "unknown".into(),
        n: 1,
        charged_tokens: 0,
        stream: false,
        partial_images: 0,
        input_tokens: 0,
        output_tokens: 0,
        include_usage: false,
        prompt: String::new(),
        image_tool: None,
        previous_response_id: None,
        store: true,
        instructions: String::new(),
    };
    if parts.method != Method::POST {
        return Ok(call);
    }
    let mut fields: HashMap<String, String> = HashMap::new();
    let mut images = 0u64;
    if content_type.starts_with("multipart/form-data") {
        let boundary = multer::parse_boundary(content_type).map_err(|e| e.to_string())?;
        let stream = futures_util::stream::once({
            let b = body.clone();
            async move { Ok::<_, Infallible>(b) }
        });
        let mut mp = multer::Multipart::new(stream, boundary);
        while let Some(field) = mp.next_field().await.map_err(|e| e.to_string())? {
            let name = field.name().unwrap_or("").to_string();
            if field.file_name().is_some() || name.starts_with("image") || name == "mask" {
                field.bytes().await.map_err(|e| e.to_string())?;
                if name.starts_with("image") {
                    images += 1;
                }
            } else {
                let text = field.text().await.map_err(|e| e.to_string())?;
                fields.insert(name, text);
            }
        }
        if let Some(m) = fields.get("model") {
            call.model = m.clone();
        }
    } else if !body.is_empty() {
        // OpenAI reads a JSON body whatever its content type says.
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| format!("We could not parse the JSON body of your request: {e}"))?;
        if let Some(m) = v.get("model").and_then(Value::as_str) {
            call.model = m.to_string();
        }
        for key in ["prompt", "size", "quality"] {
            if let Some(s) = v.get(key).and_then(Value::as_str) {
                fields.insert(key.into(), s.into());
            }
        }
        for key in [
            "n",
            "partial_images",
            "max_tokens",
            "max_completion_tokens",
            "max_output_tokens",
        ] {
            if let Some(x) = v.get(key).and_then(Value::as_u64) {
                fields.insert(key.into(), x.to_string());
            }
        }
        if v.get("stream").and_then(Value::as_bool) == Some(true) {
            fields.insert("stream".into(), "true".into());
        }
        call.include_usage = v
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if let Some(imgs) = v.get("images").and_then(Value::as_array) {
            images = imgs.len() as u64;
        }
        if let Some(msgs) = v.get("messages").and_then(Value::as_array) {
            let text: String = msgs
                .iter()
                .filter_map(|m| m.get("content").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" ");
            call.input_tokens = text_tokens(&text) + 4 * msgs.len() as u64 + 2;
            call.prompt = text;
        }
        if let Some(input) = v.get("input") {
            let text = input_text(input);
            call.input_tokens = text_tokens(&text);
            if path == "/v1/responses" {
                call.prompt = text;
            }
        }
        if path == "/v1/responses" {
            responses_call(&v, &mut call)?;
        }
    }
    if call.model == "unknown" {
        // The model OpenAI picks when a request names none (or not as a string).
        call.model = match path {
            "/v1/images/variations" => "dall-e-2".into(),
            p if p.starts_with("/v1/images/") => "gpt-image-1".into(),
            _ => call.model,
        };
    }
    call.n = fields
        .get("n")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    call.stream = fields.get("stream").map(String::as_str) == Some("true");
    call.partial_images = fields
        .get("partial_images")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if path.starts_with("/v1/images/") {
        call.prompt = fields.get("prompt").cloned().unwrap_or_default();
        call.input_tokens = text_tokens(&call.prompt) + images * 323;
        let per_image = image_output_tokens(
            fields.get("size").map_or("1024x1024", String::as_str),
            fields.get("quality").map_or("medium", String::as_str),
        );
        call.output_tokens = call.n * per_image
            + if call.stream {
                call.partial_images * 100
            } else {
                0
            };
        call.charged_tokens = text_tokens(&call.prompt) + images * 323 + call.output_tokens;
    } else if path == "/v1/responses" {
        let max = fields.get("max_output_tokens").and_then(|s| s.parse().ok());
        call.input_tokens = text_tokens(&call.prompt) + text_tokens(&call.instructions);
        call.output_tokens = (text_tokens(&call.prompt) + 2).min(max.unwrap_or(16));
        call.charged_tokens = call.input_tokens + max.unwrap_or(4096);
    } else if path == "/v1/chat/completions" {
        let max = fields
            .get("max_completion_tokens")
            .or(fields.get("max_tokens"))
            .and_then(|s| s.parse().ok());
        call.output_tokens = (text_tokens(&call.prompt) + 2).min(max.unwrap_or(16));
        call.charged_tokens = call.input_tokens + call.n * max.unwrap_or(4096);
    } else {
        call.charged_tokens = call.input_tokens;
    }
    Ok(call)
}

fn error_body(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response<Body> {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    json_response(status, &body)
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut resp = Response::new(full(serde_json::to_vec(v).unwrap()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// Go-style duration, as OpenAI writes `x-ratelimit-reset-*`.
fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{:.3}s", d.as_secs_f64())
    }
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, std::io::Error> {
    let accept = req
        .headers()
        .get_all(http::header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let azure = st.behaviour.lock().unwrap().azure.clone();
    let resp = match azure {
        Some(azure) => match azure_request(req) {
            Ok(req) => azure_answer(answer(st.clone(), req).await?, &azure).await,
            Err(refused) => {
                let (parts, _) = refused.0.into_parts();
                st.record(&parts, &Bytes::new(), refused.1.status().as_u16(), false);
                refused.1
            }
        },
        None => answer(st.clone(), req).await?,
    };
    let (compress, stall) = {
        let b = st.behaviour.lock().unwrap();
        (b.compress, b.stall_after_bytes)
    };
    let resp = match stall {
        Some(n) => stalled(resp, n),
        None => resp,
    };
    Ok(match chosen_coding(&accept).filter(|_| compress) {
        Some(coding) => compressed(resp, coding),
        None => resp,
    })
}

/// An Azure error: `{"error": {"code", "message"}}`.
fn azure_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}

/// An Azure request as the OpenAI handler reads it: its path put as
/// `/v1/...` (the original kept for the log), the deployment its model; or
/// Azure's refusal of it (no key, no such path, no `api-version`).
#[allow(clippy::result_large_err)]
fn azure_request(
    req: Request<Incoming>,
) -> Result<Request<Incoming>, (Request<Incoming>, Response<Body>)> {
    let has_key = req.headers().contains_key("api-key")
        || req
            .headers()
            .get(http::header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes().starts_with(b"Bearer "));
    if !has_key {
        return Err((
            req,
            azure_error(
                StatusCode::UNAUTHORIZED,
                "401",
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.",
            ),
        ));
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let api_version = query.as_deref().is_some_and(|q| {
        q.split('&')
            .any(|p| p.starts_with("api-version=") && p.len() > 12)
    });
    let (rest, deployment) = if let Some(rest) = path.strip_prefix("/openai/v1/") {
        (rest.to_string(), None)
    } else if let Some(rest) = path.strip_prefix("/openai/deployments/") {
        let Some((dep, op)) = rest.split_once('/') else {
            return Err((
                req,
                azure_error(StatusCode::NOT_FOUND, "404", "Resource not found"),
            ));
        };
        if !api_version {
            return Err((
                req,
                azure_error(StatusCode::NOT_FOUND, "404", "Resource not found"),
            ));
        }
        (op.to_string(), Some(dep.to_string()))
    } else if let Some(rest) = path.strip_prefix("/openai/").filter(|_| api_version) {
        (rest.to_string(), None)
    } else {
        return Err((
            req,
            azure_error(StatusCode::NOT_FOUND, "404", "Resource not found"),
        ));
    };
    let (mut parts, body) = req.into_parts();
    // The client's other query parameters go on; api-version is Azure's.
    let kept: Vec<&str> = query
        .as_deref()
        .map(|q| {
            q.split('&')
                .filter(|p| !p.starts_with("api-version="))
                .collect()
        })
        .unwrap_or_default();
    let uri = match kept.is_empty() {
        true => format!("/v1/{rest}"),
        false => format!("/v1/{rest}?{}", kept.join("&")),
    };
    parts.uri = uri.parse().expect("a path the fake built");
    parts.extensions.insert(AzureOriginal {
        path,
        query,
        deployment,
    });
    Ok(Request::from_parts(parts, body))
}

/// An OpenAI answer as Azure gives it: rate-limit headers of what remains
/// only; a 429 in Azure's shape with `retry-after-ms`.
async fn azure_answer(resp: Response<Body>, _azure: &Azure) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    let gone: Vec<http::HeaderName> = parts
        .headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            k.starts_with("x-ratelimit-limit-") || k.starts_with("x-ratelimit-reset-")
        })
        .cloned()
        .collect();
    for k in gone {
        parts.headers.remove(k);
    }
    parts.headers.remove("openai-organization");
    parts
        .headers
        .insert("x-ms-region", HeaderValue::from_static("Fake Region"));
    if parts.status != StatusCode::TOO_MANY_REQUESTS {
        return Response::from_parts(parts, body);
    }
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if v["error"]["code"] == "insufficient_quota" {
        return Response::from_parts(parts, full(bytes));
    }
    let secs: u64 = parts
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut resp = azure_error(
        StatusCode::TOO_MANY_REQUESTS,
        "429",
        &format!(
            "Requests to the Images_Generations Operation under Azure OpenAI API version 2025-04-01-preview have exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after {secs} second. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."
        ),
    );
    let h = resp.headers_mut();
    let ms = parts
        .headers
        .get("retry-after-ms")
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(secs * 1000));
    h.insert("retry-after", HeaderValue::from(secs));
    h.insert("retry-after-ms", ms);
    for (k, v) in parts.headers.iter() {
        if k.as_str().starts_with("x-ratelimit-remaining-") || k == "x-request-id" {
            h.insert(k.clone(), v.clone());
        }
    }
    resp
}

/// The answer's first `n` bytes, then nothing, for ever.
fn stalled(resp: Response<Body>, n: usize) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove(http::header::CONTENT_LENGTH);
    let mut left = n;
    let frames = http_body_util::BodyStream::new(body)
        .map(move |frame| {
            let frame = frame?;
            Ok(match frame.into_data() {
                Ok(mut data) => {
                    let keep = left.min(data.len());
                    left -= keep;
                    Frame::data(data.split_to(keep))
                }
                Err(frame) => frame,
            })
        })
        .chain(futures_util::stream::pending());
    Response::from_parts(parts, BodyExt::boxed(StreamBody::new(frames)))
}

/// The coding OpenAI's edge would pick from an `Accept-Encoding`.
fn chosen_coding(accept: &str) -> Option<Coding> {
    let offered: Vec<String> = accept
        .split(',')
        .filter(|item| {
            !item.split(';').skip(1).any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
            })
        })
        .map(|item| {
            item.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .collect();
    let has = |c: &str| offered.iter().any(|o| o == c);
    if has("br") {
        Some(Coding::Brotli)
    } else if has("gzip") {
        Some(Coding::Gzip)
    } else if has("deflate") {
        Some(Coding::Deflate)
    } else {
        None
    }
}

#[derive(Clone, Copy)]
enum Coding {
    Gzip,
    Deflate,
    Brotli,
}

enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Deflate(flate2::write::ZlibEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
}

impl Encoder {
    fn new(coding: Coding) -> Encoder {
        match coding {
            Coding::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::fast(),
            )),
            Coding::Deflate => Encoder::Deflate(flate2::write::ZlibEncoder::new(
                Vec::new(),
                flate2::Compression::fast(),
            )),
            Coding::Brotli => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                4,
                22,
            ))),
        }
    }

    /// Compresses a chunk and flushes, so a streamed event leaves at once.
    fn chunk(&mut self, data: &[u8]) -> Bytes {
        use std::io::Write;
        let out = match self {
            Encoder::Gzip(e) => {
                let _ = e.write_all(data);
                let _ = e.flush();
                e.get_mut()
            }
            Encoder::Deflate(e) => {
                let _ = e.write_all(data);
                let _ = e.flush();
                e.get_mut()
            }
            Encoder::Brotli(e) => {
                let _ = e.write_all(data);
                let _ = e.flush();
                e.get_mut()
            }
        };
        Bytes::from(std::mem::take(out))
    }

    fn finish(self) -> Bytes {
        Bytes::from(match self {
            Encoder::Gzip(e) => e.finish().unwrap_or_default(),
            Encoder::Deflate(e) => e.finish().unwrap_or_default(),
            Encoder::Brotli(e) => e.into_inner(),
        })
    }
}

/// The answer compressed as it streams, with `Content-Encoding` set.
fn compressed(resp: Response<Body>, coding: Coding) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts.headers.insert(
        http::header::CONTENT_ENCODING,
        HeaderValue::from_static(match coding {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
            Coding::Brotli => "br",
        }),
    );
    parts.headers.insert(
        http::header::VARY,
        HeaderValue::from_static("Accept-Encoding"),
    );
    let encoder = Arc::new(Mutex::new(Some(Encoder::new(coding))));
    let tail = encoder.clone();
    let frames = http_body_util::BodyStream::new(body).map(move |frame| {
        let frame = frame?;
        Ok(match frame.into_data() {
            Ok(data) => match encoder.lock().unwrap().as_mut() {
                Some(e) => Frame::data(e.chunk(&data)),
                None => Frame::data(data),
            },
            Err(frame) => frame,
        })
    });
    let end = futures_util::stream::once(async move {
        let last = tail
            .lock()
            .unwrap()
            .take()
            .map(Encoder::finish)
            .unwrap_or_default();
        Ok::<_, std::io::Error>(Frame::data(last))
    });
    Response::from_parts(parts, BodyExt::boxed(StreamBody::new(frames.chain(end))))
}

async fn answer(st: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, std::io::Error> {
    st.arrived.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Err(std::io::Error::other(e)),
    };
    let seq = st.seq.fetch_add(1, Ordering::Relaxed) + 1;
    let now_in = st.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    st.max_in_flight.fetch_max(now_in, Ordering::Relaxed);
    let _guard = InFlight(&st);
    let b = st.behaviour.lock().unwrap().clone();

    let key = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .or(parts.headers.get("api-key"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();

    if b.invalid_keys.contains(&key) {
        st.record(&parts, &body, 401, b.record_bodies);
        return Ok(error_body(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            Some("invalid_api_key"),
        ));
    }

    let call = match parse_call(&parts, &body).await {
        Ok(c) => c,
        Err(msg) => {
            st.record(&parts, &body, 400, b.record_bodies);
            return Ok(error_body(
                StatusCode::BAD_REQUEST,
                &msg,
                "invalid_request_error",
                None,
            ));
        }
    };

    // Azure: a deployment path names the model; unknown deployments and
    // filtered prompts are refused.
    let mut call = call;
    if let Some(azure) = &b.azure {
        let original = parts.extensions.get::<AzureOriginal>().cloned();
        let deployment = original
            .as_ref()
            .and_then(|o| o.deployment.clone())
            .unwrap_or_else(|| call.model.clone());
        if !azure.deployments.is_empty() && !azure.deployments.contains(&deployment) {
            st.record(&parts, &body, 404, b.record_bodies);
            return Ok(azure_error(
                StatusCode::NOT_FOUND,
                "DeploymentNotFound",
                "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again.",
            ));
        }
        call.model = deployment;
        if azure
            .filtered_word
            .as_deref()
            .is_some_and(|w| call.prompt.contains(w))
        {
            st.record(&parts, &body, 400, b.record_bodies);
            return Ok(json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": {
                    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please modify your prompt and retry. To learn more about our content filtering policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766",
                    "type": null, "param": "prompt", "code": "content_filter", "status": 400,
                    "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
                        "hate": {"filtered": false, "severity": "safe"},
                        "self_harm": {"filtered": false, "severity": "safe"},
                        "sexual": {"filtered": false, "severity": "safe"},
                        "violence": {"filtered": true, "severity": "medium"}}}}}),
            ));
        }
    }

    // A response continues only one its key stored.
    if let Some(prev) = &call.previous_response_id {
        let known = st.responses.lock().unwrap().get(prev) == Some(&key);
        if !known {
            st.record(&parts, &body, 400, b.record_bodies);
            let body = json!({"error": {"message": format!("Previous response with id '{prev}' not found."),
                "type": "invalid_request_error", "param": "previous_response_id", "code": "previous_response_not_found"}});
            return Ok(json_response(StatusCode::BAD_REQUEST, &body));
        }
    }

    // Admission against the limits happens when the call arrives, as OpenAI does,
    // for the organization/project the call is made for.
    let tokens = call.charged_tokens;
    let is_image = parts.uri.path().starts_with("/v1/images/");
    let images = if is_image { call.n } else { 0 };
    let mut rl_headers = HeaderMap::new();
    // Without limits, OpenAI's headers still come, with limits never reached.
    let limits = b.limits.clone().unwrap_or(Limits {
        requests: 1_000_000_000,
        tokens: Some(1_000_000_000_000),
        ..Limits::default()
    });
    let scope = limit_scope(&parts.headers, &key, &b.key_projects);
    // A Responses call's image tool spends the image model's limits: an
    // image, and its tokens (how OpenAI counts it is not documented; this
    // is the cautious reading).
    if let (Some(tool), Some(limit)) = (&call.image_tool, b.limits.as_ref()) {
        let now = Instant::now();
        let mut windows = st.windows.lock().unwrap();
        let w = windows
            .entry((scope.clone(), tool.model.clone()))
            .or_default();
        w.prune(now, limit.window);
        let used: u64 = w.calls.iter().map(|(_, _, i)| i).sum();
        let cap = limit.images.unwrap_or(u64::from(limit.requests));
        if used + 1 > cap {
            let wait = w
                .calls
                .front()
                .map(|(t, _, _)| limit.window.saturating_sub(now.duration_since(*t)))
                .unwrap_or(Duration::ZERO);
            drop(windows);
            st.record(&parts, &body, 429, b.record_bodies);
            let mut resp = error_body(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "Rate limit reached for {} in organization org-fake on images per min. Please try again in {}.",
                    tool.model,
                    go_duration(wait)
                ),
                "images",
                Some("rate_limit_exceeded"),
            );
            let h = resp.headers_mut();
            if b.announce_limits && b.image_refusal_limits {
                image_refusal_headers(h, limit.per_minute(cap), wait);
            }
            h.insert(
                "retry-after",
                HeaderValue::from(wait.as_secs_f64().ceil() as u64),
            );
            return Ok(resp);
        }
        w.calls.push_back((now, tool.tokens, 1));
    }
    {
        let now = Instant::now();
        let mut windows = st.windows.lock().unwrap();
        let w = windows.entry((scope, call.model.clone())).or_default();
        w.prune(now, limits.window);
        let used_tokens: u64 = w.calls.iter().map(|(_, t, _)| t).sum();
        let used_images: u64 = w.calls.iter().map(|(_, _, i)| i).sum();
        // A request larger than a whole limit can never pass.
        let too_large = [
            ("tokens", limits.tokens, tokens),
            ("images", limits.images, images),
        ]
        .into_iter()
        .find(|(_, limit, asked)| limit.is_some_and(|l| *asked > l));
        if let (Some((what, Some(limit), asked)), true) = (too_large, b.limits.is_some()) {
            drop(windows);
            st.record(&parts, &body, 429, b.record_bodies);
            let mut resp = error_body(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "Request too large for {} in organization org-fake on {what} per min: Limit {limit}, Requested {asked}. The input or output tokens must be reduced in order to run successfully.",
                    call.model
                ),
                what,
                Some("rate_limit_exceeded"),
            );
            resp.headers_mut().insert(
                "x-request-id",
                HeaderValue::from_str(&format!("req_{seq}")).unwrap(),
            );
            return Ok(resp);
        }
        let over_requests = w.calls.len() as u32 >= limits.requests;
        let over_tokens = limits.tokens.is_some_and(|max| used_tokens + tokens > max);
        let over_images = limits.images.is_some_and(|max| used_images + images > max);
        let reset_requests = w
            .calls
            .front()
            .map(|(t, _, _)| limits.window.saturating_sub(now.duration_since(*t)))
            .unwrap_or(Duration::ZERO);
        if b.limits.is_some() && (over_requests || over_tokens || over_images) {
            // Wait until enough of the window has passed.
            let freed_after = |need: u64, of: fn(&(Instant, u64, u64)) -> u64| {
                let mut freed = 0;
                let mut at = Duration::ZERO;
                for c in &w.calls {
                    freed += of(c);
                    at = limits.window.saturating_sub(now.duration_since(c.0));
                    if freed >= need {
                        break;
                    }
                }
                at
            };
            let (what, wait) = if over_requests {
                ("requests", reset_requests)
            } else if over_tokens {
                let need = used_tokens + tokens - limits.tokens.unwrap_or(0);
                ("tokens", freed_after(need, |c| c.1))
            } else {
                let need = used_images + images - limits.images.unwrap_or(0);
                ("images", freed_after(need, |c| c.2))
            };
            drop(windows);
            st.record(&parts, &body, 429, b.record_bodies);
            let mut resp = error_body(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "Rate limit reached for {} in organization org-fake on {what} per min. Please try again in {}.",
                    call.model,
                    go_duration(wait)
                ),
                what,
                Some("rate_limit_exceeded"),
            );
            let h = resp.headers_mut();
            let per_minute = |n| limits.per_minute(n);
            if is_image {
                // OpenAI's image 429s: the image limit (per minute, as the
                // others; its window is not documented), nothing left, when
                // it resets, and `retry-after` in whole seconds.
                if b.announce_limits && b.image_refusal_limits {
                    let images_limit = limits.images.unwrap_or(u64::from(limits.requests));
                    image_refusal_headers(h, per_minute(images_limit), wait);
                }
            } else {
                // A refusal announces the limits too (the contract: "on
                // successful responses too"), with nothing remaining.
                if b.announce_limits {
                    h.insert(
                        "x-ratelimit-limit-requests",
                        per_minute(u64::from(limits.requests)).into(),
                    );
                    if let Some(max) = limits.tokens {
                        h.insert("x-ratelimit-limit-tokens", per_minute(max).into());
                    }
                    h.insert("x-ratelimit-remaining-requests", 0u64.into());
                    h.insert(
                        "x-ratelimit-reset-requests",
                        HeaderValue::from_str(&go_duration(wait)).unwrap(),
                    );
                }
                h.insert(
                    "retry-after-ms",
                    HeaderValue::from(wait.as_millis().max(1) as u64),
                );
            }
            h.insert(
                "retry-after",
                HeaderValue::from(wait.as_secs_f64().ceil() as u64),
            );
            h.insert(
                "x-request-id",
                HeaderValue::from_str(&format!("req_{seq}")).unwrap(),
            );
            return Ok(resp);
        }
        w.calls.push_back((now, tokens, images));
        // Limits are announced per minute, whatever window enforces them.
        let per_minute = |n| limits.per_minute(n);
        rl_headers.insert(
            "x-ratelimit-limit-requests",
            per_minute(u64::from(limits.requests)).into(),
        );
        rl_headers.insert(
            "x-ratelimit-remaining-requests",
            (limits.requests - w.calls.len() as u32).into(),
        );
        rl_headers.insert(
            "x-ratelimit-reset-requests",
            HeaderValue::from_str(&go_duration(reset_requests)).unwrap(),
        );
        if let Some(max) = limits.tokens {
            rl_headers.insert("x-ratelimit-limit-tokens", per_minute(max).into());
            rl_headers.insert(
                "x-ratelimit-remaining-tokens",
                max.saturating_sub(used_tokens + tokens).into(),
            );
            rl_headers.insert(
                "x-ratelimit-reset-tokens",
                HeaderValue::from_str(&go_duration(reset_requests)).unwrap(),
            );
        }
    }

    let (lo, hi) = b.latency;
    let latency = lo + (hi.saturating_sub(lo)).mul_f64(st.random());
    let stream_total = if call.stream { latency } else { Duration::ZERO };
    // A zero sleep still waits for the timer's next tick (a millisecond).
    if latency > stream_total {
        tokio::time::sleep(latency - stream_total).await;
    }

    let every = |n: Option<u64>| n.is_some_and(|n| n > 0 && seq.is_multiple_of(n));
    if every(b.reset_every) || (b.reset_rate > 0.0 && st.random() < b.reset_rate) {
        st.record(&parts, &body, 0, b.record_bodies);
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "fake reset",
        ));
    }
    if seq <= b.fail_first as u64
        || every(b.fail_every)
        || (b.fail_rate > 0.0 && st.random() < b.fail_rate)
    {
        let status = [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
        ][(seq % 3) as usize];
        st.record(&parts, &body, status.as_u16(), b.record_bodies);
        let code = (status == StatusCode::SERVICE_UNAVAILABLE).then_some("server_is_overloaded");
        return Ok(error_body(
            status,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            code,
        ));
    }
    if b.insufficient_quota || b.quota_exhausted_keys.contains(&key) {
        st.record(&parts, &body, 429, b.record_bodies);
        return Ok(error_body(
            StatusCode::TOO_MANY_REQUESTS,
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            Some("insufficient_quota"),
        ));
    }

    let mut resp = route(&st, &parts, &call, seq, &b, stream_total);
    st.record(&parts, &body, resp.status().as_u16(), b.record_bodies);
    if parts.uri.path() == "/v1/responses" && call.store && resp.status().is_success() {
        let mut stored = st.responses.lock().unwrap();
        if stored.len() >= 100_000 {
            stored.clear();
        }
        stored.insert(response_id(seq), key.clone());
    }
    let h = resp.headers_mut();
    // OpenAI's image answers announce no limits; its text answers do.
    let is_responses = parts.uri.path() == "/v1/responses";
    if b.announce_limits
        && (!is_image || b.image_answer_limits)
        && (!is_responses || b.responses_answer_limits)
    {
        h.extend(rl_headers);
    }
    h.insert(
        "x-request-id",
        HeaderValue::from_str(&format!("req_{seq}")).unwrap(),
    );
    h.insert("openai-processing-ms", (latency.as_millis() as u64).into());
    h.insert("openai-version", HeaderValue::from_static("2020-10-01"));
    // The organization the call was billed to: the one it named, else the
    // key's own.
    let billed = parts
        .headers
        .get("openai-organization")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map_or_else(|| own_org(&key), str::to_string);
    h.insert(
        "openai-organization",
        HeaderValue::from_str(&billed).unwrap_or(HeaderValue::from_static("org-fake")),
    );
    h.insert("x-fake-call", seq.into());
    // Cloudflare in front of OpenAI sets a bot-management cookie per answer.
    h.insert(
        http::header::SET_COOKIE,
        HeaderValue::from_str(&format!("__cf_bm=fake{seq}; path=/; HttpOnly; Secure")).unwrap(),
    );
    Ok(resp)
}

fn route(
    st: &State,
    parts: &http::request::Parts,
    call: &Call,
    seq: u64,
    b: &Behaviour,
    stream_total: Duration,
) -> Response<Body> {
    let path = parts.uri.path();
    let usage = json!({
        "input_tokens": call.input_tokens,
        "input_tokens_details": {"text_tokens": call.input_tokens, "image_tokens": 0},
        "output_tokens": call.output_tokens,
        "total_tokens": call.input_tokens + call.output_tokens,
    });
    match (parts.method.clone(), path) {
        (Method::POST, "/v1/images/generations" | "/v1/images/edits" | "/v1/images/variations") => {
            let image = fake_image(&call.prompt, b.image_bytes);
            if call.stream {
                let prefix = if path.ends_with("edits") {
                    "image_edit"
                } else {
                    "image_generation"
                };
                let mut events = Vec::new();
                for i in 0..call.partial_images {
                    events.push(format!(
                        "event: {prefix}.partial_image\ndata: {}\n\n",
                        json!({"type": format!("{prefix}.partial_image"), "partial_image_index": i, "b64_json": image})
                    ));
                }
                events.push(format!(
                    "event: {prefix}.completed\ndata: {}\n\n",
                    json!({"type": format!("{prefix}.completed"), "b64_json": image, "usage": usage})
                ));
                let step = stream_total / events.len() as u32;
                sse(events, step.max(b.stream_interval), b.cut_stream_after)
            } else {
                let data: Vec<Value> = (0..call.n)
                    .map(|_| json!({"b64_json": image, "revised_prompt": format!("{} (call {seq})", call.prompt)}))
                    .collect();
                let mut v = json!({"created": 1_700_000_000u64 + seq, "data": data});
                if call.model.starts_with("gpt-image") {
                    v["usage"] = usage;
                }
                json_response(StatusCode::OK, &v)
            }
        }
        (Method::POST, "/v1/chat/completions") => {
            let words: Vec<String> = call
                .prompt
                .split_whitespace()
                .take(call.output_tokens as usize)
                .map(str::to_string)
                .collect();
            // OpenAI's shape, with the breakdowns it adds after the three counts.
            let usage = json!({"prompt_tokens": call.input_tokens, "completion_tokens": call.output_tokens, "total_tokens": call.input_tokens + call.output_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}});
            let id = format!("chatcmpl-{seq}");
            if call.stream {
                let mut events = Vec::new();
                for (i, w) in words.iter().enumerate() {
                    let delta = if i == 0 {
                        json!({"role": "assistant", "content": w})
                    } else {
                        json!({"content": format!(" {w}")})
                    };
                    events.push(format!("data: {}\n\n", json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000u64, "model": call.model, "choices": [{"index": 0, "delta": delta, "finish_reason": null}]})));
                }
                events.push(format!("data: {}\n\n", json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000u64, "model": call.model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})));
                if call.include_usage {
                    events.push(format!("data: {}\n\n", json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000u64, "model": call.model, "choices": [], "usage": usage})));
                }
                events.push("data: [DONE]\n\n".into());
                let step = stream_total / events.len() as u32;
                sse(events, step.max(b.stream_interval), b.cut_stream_after)
            } else {
                json_response(
                    StatusCode::OK,
                    &json!({"id": id, "object": "chat.completion", "created": 1_700_000_000u64, "model": call.model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": words.join(" ")}, "finish_reason": "stop"}],
                        "usage": usage}),
                )
            }
        }
        (Method::POST, "/v1/responses") => responses(call, seq, b, stream_total),
        (Method::POST, "/v1/embeddings") => {
            let x = (seq % 100) as f64 / 100.0;
            json_response(
                StatusCode::OK,
                &json!({"object": "list", "model": call.model,
                    "data": [{"object": "embedding", "index": 0, "embedding": [x, 0.1, 0.2, 0.3]}],
                    "usage": {"prompt_tokens": call.input_tokens, "total_tokens": call.input_tokens}}),
            )
        }
        (Method::GET, "/v1/models") => {
            let models: Vec<Value> = ["gpt-image-1", "gpt-image-1-mini", "gpt-4o-mini", "text-embedding-3-small"]
                .iter()
                .map(|id| json!({"id": id, "object": "model", "created": 1_700_000_000u64, "owned_by": "system"}))
                .collect();
            json_response(StatusCode::OK, &json!({"object": "list", "data": models}))
        }
        _ => {
            let _ = st;
            error_body(
                StatusCode::NOT_FOUND,
                &format!("Invalid URL ({} {})", parts.method, path),
                "invalid_request_error",
                None,
            )
        }
    }
}

/// The id of the response a Responses call makes.
fn response_id(seq: u64) -> String {
    format!("resp_{seq:024x}")
}

/// A Responses API answer: the message (and the image the tool made, when
/// it was called), `usage` (with the image tool's own in `tool_usage`), or
/// its stream of typed events ending in `response.completed`.
fn responses(call: &Call, seq: u64, b: &Behaviour, stream_total: Duration) -> Response<Body> {
    let id = response_id(seq);
    let words: Vec<String> = call
        .prompt
        .split_whitespace()
        .take(call.output_tokens as usize)
        .map(str::to_string)
        .collect();
    let text = words.join(" ");
    let usage = json!({"input_tokens": call.input_tokens, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": call.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": call.input_tokens + call.output_tokens});
    let image = call.image_tool.as_ref().map(|tool| {
        let result = fake_image(&call.prompt, b.image_bytes);
        let item = json!({"type": "image_generation_call", "id": format!("ig_{seq}"), "status": "completed",
            "result": result, "revised_prompt": call.prompt, "size": tool.size, "quality": tool.quality,
            "output_format": "png", "background": "opaque"});
        (tool, item)
    });
    let message = json!({"type": "message", "id": format!("msg_{seq}"), "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]});
    let mut output = Vec::new();
    if let Some((_, item)) = &image {
        output.push(item.clone());
    }
    output.push(message.clone());
    let mut whole = json!({"id": id, "object": "response", "created_at": 1_700_000_000u64 + seq,
        "status": "completed", "error": null, "incomplete_details": null, "model": call.model,
        "instructions": if call.instructions.is_empty() { Value::Null } else { call.instructions.clone().into() },
        "output": output, "parallel_tool_calls": true,
        "previous_response_id": call.previous_response_id, "store": call.store,
        "text": {"format": {"type": "text"}}, "usage": usage});
    if let Some((tool, _)) = &image {
        whole["tool_usage"] = json!({"image_gen": {"input_tokens": text_tokens(&call.prompt),
            "output_tokens": tool.tokens, "total_tokens": text_tokens(&call.prompt) + tool.tokens}});
    }
    if !call.stream {
        return json_response(StatusCode::OK, &whole);
    }
    let mut n = 0u64;
    let mut events = Vec::new();
    let mut event = |kind: &str, mut data: Value| {
        data["type"] = kind.into();
        data["sequence_number"] = n.into();
        n += 1;
        events.push(format!("event: {kind}\ndata: {data}\n\n"));
    };
    let mut started = whole.clone();
    started["status"] = "in_progress".into();
    started["output"] = json!([]);
    started["usage"] = Value::Null;
    event("response.created", json!({"response": started}));
    event("response.in_progress", json!({"response": started}));
    let mut index = 0u64;
    if let Some((tool, item)) = &image {
        let item_id = format!("ig_{seq}");
        event(
            "response.output_item.added",
            json!({"output_index": index,
            "item": {"type": "image_generation_call", "id": item_id, "status": "in_progress"}}),
        );
        event(
            "response.image_generation_call.in_progress",
            json!({"output_index": index, "item_id": item_id}),
        );
        event(
            "response.image_generation_call.generating",
            json!({"output_index": index, "item_id": item_id}),
        );
        for i in 0..tool.partial_images {
            event(
                "response.image_generation_call.partial_image",
                json!({"output_index": index, "item_id": item_id,
                "partial_image_index": i, "partial_image_b64": fake_image(&format!("{} {i}", call.prompt), b.image_bytes)}),
            );
        }
        event(
            "response.image_generation_call.completed",
            json!({"output_index": index, "item_id": item_id}),
        );
        event(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        index += 1;
    }
    let msg_id = format!("msg_{seq}");
    event(
        "response.output_item.added",
        json!({"output_index": index,
        "item": {"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}}),
    );
    event(
        "response.content_part.added",
        json!({"output_index": index, "item_id": msg_id, "content_index": 0,
        "part": {"type": "output_text", "text": "", "annotations": []}}),
    );
    for (i, w) in words.iter().enumerate() {
        let delta = if i == 0 { w.clone() } else { format!(" {w}") };
        event(
            "response.output_text.delta",
            json!({"output_index": index, "item_id": msg_id, "content_index": 0, "delta": delta}),
        );
    }
    event(
        "response.output_text.done",
        json!({"output_index": index, "item_id": msg_id, "content_index": 0, "text": text}),
    );
    event(
        "response.content_part.done",
        json!({"output_index": index, "item_id": msg_id, "content_index": 0,
        "part": {"type": "output_text", "text": text, "annotations": []}}),
    );
    event(
        "response.output_item.done",
        json!({"output_index": index, "item": message}),
    );
    event("response.completed", json!({"response": whole}));
    let step = stream_total / events.len() as u32;
    sse(events, step.max(b.stream_interval), b.cut_stream_after)
}

fn fake_image(prompt: &str, len: usize) -> String {
    // Deterministic bytes from the prompt, so equal prompts give equal images.
    let mut x: u64 = 0xcbf2_9ce4_8422_2325;
    for b in prompt.bytes() {
        x = (x ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    let bytes: Vec<u8> = (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> (i % 8)) as u8
        })
        .collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn sse(events: Vec<String>, step: Duration, cut_after: Option<u32>) -> Response<Body> {
    let stream =
        futures_util::stream::iter(events.into_iter().enumerate()).then(move |(i, e)| async move {
            if i > 0 {
                tokio::time::sleep(step).await;
            }
            if cut_after.is_some_and(|n| i as u32 >= n) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "fake stream cut",
                ));
            }
            Ok(Frame::data(Bytes::from(e)))
        });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    resp
}
