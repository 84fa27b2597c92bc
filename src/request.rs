//! The edge of the stack and the per-request context. The edge enforces the body
//! limit (413 before reading when `content-length` says so), buffers the body once
//! so later layers can price, key and replay it, parses it once into a
//! [`RequestContext`] in the request's extensions, turns penstock's errors into
//! responses, and writes the one log line per request.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use http_body::Body as HttpBody;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use tower::{Service, ServiceExt};

use crate::body::{Body, BoxError};
use crate::error::ProxyError;

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

/// Who a request belongs to, for fairness and cache separation; never the key
/// itself, only a stable hash of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tenant(pub String);

impl Tenant {
    fn from_headers(headers: &HeaderMap) -> Tenant {
        let credential = headers
            .get(header::AUTHORIZATION)
            .or_else(|| headers.get("api-key"))
            .map(HeaderValue::as_bytes);
        match credential {
            Some(c) => {
                let hash = blake3::hash(c);
                Tenant(format!("key:{}", &hash.to_hex()[..16]))
            }
            None => Tenant("anonymous".into()),
        }
    }
}

/// Everything later layers need to know about a request, parsed once.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// penstock's id for the request, returned as `x-penstock-request-id`.
    pub id: String,
    pub route: Route,
    /// The `model` field of a JSON or multipart body, when there is one.
    pub model: Option<String>,
    /// The client asked for a streamed response.
    pub stream: bool,
    pub tenant: Tenant,
    pub received: Instant,
}

/// The fields of a request body penstock reads; all else is carried untouched.
#[derive(Debug, Default, Deserialize)]
struct BodyFields {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
}

fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Reads the fields penstock needs. Malformed JSON, or malformed multipart on an
/// image route, is refused here rather than spent upstream.
async fn parse_fields(
    route: Route,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<BodyFields, ProxyError> {
    let ct = content_type(headers);
    let mime = ct.split(';').next().unwrap_or("").trim();
    if body.is_empty() {
        return Ok(BodyFields::default());
    }
    if mime.eq_ignore_ascii_case("application/json") {
        return match serde_json::from_slice::<BodyFields>(body) {
            Ok(f) => Ok(f),
            // Valid JSON of an unexpected shape is the upstream's to judge.
            Err(e) if e.is_data() => Ok(BodyFields::default()),
            Err(e) => Err(ProxyError::InvalidRequest {
                message: format!("the request body is not valid JSON: {e}"),
                code: "penstock_invalid_json",
                param: None,
            }),
        };
    }
    if mime.eq_ignore_ascii_case("multipart/form-data") && route.is_image() {
        return multipart_fields(ct, body)
            .await
            .map_err(|e| ProxyError::InvalidRequest {
                message: format!("the request body is not valid multipart/form-data: {e}"),
                code: "penstock_invalid_multipart",
                param: None,
            });
    }
    Ok(BodyFields::default())
}

async fn multipart_fields(content_type: &str, body: &Bytes) -> Result<BodyFields, multer::Error> {
    let boundary = multer::parse_boundary(content_type)?;
    let chunk = body.clone();
    let stream = futures_util::stream::once(async move { Ok::<_, Infallible>(chunk) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut fields = BodyFields::default();
    while let Some(field) = multipart.next_field().await? {
        match field.name() {
            Some("model") => fields.model = Some(field.text().await?),
            Some("stream") => fields.stream = Some(field.text().await?.trim() == "true"),
            // Files and other fields are walked over (which checks the framing).
            _ => {
                field.bytes().await?;
            }
        }
    }
    Ok(fields)
}

/// Builds the [`Edge`] service around the rest of the stack.
#[derive(Clone, Debug)]
pub struct Layer {
    max_body: u64,
}

impl Layer {
    pub fn new(max_body: u64) -> Layer {
        Layer { max_body }
    }
}

impl<S> tower::Layer<S> for Layer {
    type Service = Edge<S>;
    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            max_body: self.max_body,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Edge<S> {
    inner: S,
    max_body: u64,
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
    S: Service<Request<Bytes>, Response = Response<Body>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
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
        let inner = self.inner.clone();
        let max_body = self.max_body;
        Box::pin(async move {
            let received = Instant::now();
            let id = next_request_id();
            let method = req.method().clone();
            let path = req.uri().path().to_string();
            let route = Route::from_path(&path);
            let (ctx, result) = match buffer(req, max_body, route, id.clone(), received).await {
                Ok(req) => {
                    let ctx = req.extensions().get::<Arc<RequestContext>>().cloned();
                    (ctx, inner.oneshot(req).await)
                }
                Err(e) => (None, Err(e)),
            };
            let mut resp = result.unwrap_or_else(ProxyError::into_response);
            if let Ok(v) = HeaderValue::try_from(id.as_str()) {
                resp.headers_mut().insert("x-penstock-request-id", v);
            }
            log_line(&method, &path, route, ctx.as_deref(), &id, &resp, received);
            Ok(resp)
        })
    }
}

/// Buffers the body within the limit and attaches the context.
async fn buffer<B>(
    req: Request<B>,
    max_body: u64,
    route: Route,
    id: String,
    received: Instant,
) -> Result<Request<Bytes>, ProxyError>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
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
    let fields = if parts.method == Method::GET || parts.method == Method::HEAD {
        BodyFields::default()
    } else {
        parse_fields(route, &parts.headers, &bytes).await?
    };
    let ctx = RequestContext {
        id,
        route,
        model: fields.model,
        stream: fields.stream.unwrap_or(false),
        tenant: Tenant::from_headers(&parts.headers),
        received,
    };
    parts.extensions.insert(Arc::new(ctx));
    Ok(Request::from_parts(parts, bytes))
}

fn log_line(
    method: &Method,
    path: &str,
    route: Route,
    ctx: Option<&RequestContext>,
    id: &str,
    resp: &Response<Body>,
    received: Instant,
) {
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
    tracing::info!(
        target: "penstock::access",
        request_id = id,
        method = %method,
        path,
        route = route.label(),
        model = ctx.and_then(|c| c.model.as_deref()),
        stream = ctx.is_some_and(|c| c.stream),
        status = resp.status().as_u16(),
        // Time to the response head; a streamed body may flow for longer.
        latency_ms = received.elapsed().as_millis() as u64,
        upstream_request_id = header("x-request-id"),
        queue_ms = header("x-penstock-queue-ms"),
        attempts = header("x-penstock-attempts"),
        cache = header("x-penstock-cache"),
        "request"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn tenant_is_a_hash_never_the_key() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-secret"),
        );
        let t = Tenant::from_headers(&h);
        assert!(t.0.starts_with("key:") && !t.0.contains("secret"));
        assert_eq!(t, Tenant::from_headers(&h));
        assert_eq!(Tenant::from_headers(&HeaderMap::new()).0, "anonymous");
    }

    #[tokio::test]
    async fn json_fields_are_read_and_bad_json_refused() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let body = Bytes::from_static(br#"{"prompt":"x","stream":true,"model":"gpt-image-1"}"#);
        let f = parse_fields(Route::ImagesGenerations, &h, &body)
            .await
            .unwrap();
        assert_eq!(f.model.as_deref(), Some("gpt-image-1"));
        assert_eq!(f.stream, Some(true));
        // Valid JSON of another shape passes on.
        let f = parse_fields(Route::Other, &h, &Bytes::from_static(b"[1,2]"))
            .await
            .unwrap();
        assert!(f.model.is_none());
        let e = parse_fields(Route::Other, &h, &Bytes::from_static(b"{\"model\":"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "penstock_invalid_json");
    }

    #[tokio::test]
    async fn multipart_fields_are_read_and_broken_framing_refused() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=XyZ"),
        );
        let body = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-image-1\r\n--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n--XyZ--\r\n",
        );
        let f = parse_fields(Route::ImagesEdits, &h, &body).await.unwrap();
        assert_eq!(f.model.as_deref(), Some("gpt-image-1"));
        let broken = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt",
        );
        let e = parse_fields(Route::ImagesEdits, &h, &broken)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "penstock_invalid_multipart");
    }
}
