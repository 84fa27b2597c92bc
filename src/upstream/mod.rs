//! The call to the upstream: pooled connections ([`conns`]) over rustls (HTTP/1.1
//! and HTTP/2 by ALPN), the URL rewrite, hop-by-hop header removal, sidecar credentials
//! and the per-attempt timeout. Response bodies are handed on as they stream in.

pub mod conns;
pub mod health;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::config::{UpstreamConfig, UpstreamKind, Upstreams};
use crate::telemetry::metrics::Metrics;
use crate::vocab::body::{Body, full};
use crate::vocab::classify::classify;
use crate::vocab::context::{Departure, Payload};
use crate::vocab::encoding::{self, Accept, Encoding};
use crate::vocab::error::{Problem, ProxyError};
use crate::vocab::headers::{name, remove_where};
use crate::vocab::route::Route;
use crate::vocab::url::BaseUrl;

/// Why an attempt got no answer from the upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    #[error("the upstream could not be reached: {0}")]
    Unreachable(String),
    #[error("the connection to the upstream failed: {0}")]
    Connection(String),
    #[error("the upstream did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("the request path cannot be forwarded: {0}")]
    InvalidPath(String),
    /// The breaker is open: the upstream kept failing; nothing was sent.
    #[error("the upstream keeps failing; penstock sends nothing until a probe gets an answer (in {})", humantime::format_duration(Duration::from_millis(.0.as_millis() as u64)))]
    Down(Duration),
}

impl Problem for Failure {
    fn status(&self) -> http::StatusCode {
        match self {
            Failure::Unreachable(_) | Failure::Connection(_) => http::StatusCode::BAD_GATEWAY,
            Failure::Timeout(_) => http::StatusCode::GATEWAY_TIMEOUT,
            Failure::InvalidPath(_) => http::StatusCode::BAD_REQUEST,
            Failure::Down(_) => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Failure::Unreachable(_) => "penstock_upstream_unreachable",
            Failure::Connection(_) => "penstock_upstream_connection_error",
            Failure::Timeout(_) => "penstock_upstream_timeout",
            Failure::InvalidPath(_) => "penstock_invalid_path",
            Failure::Down(_) => "penstock_upstream_down",
        }
    }

    fn unanswered(&self) -> Option<&'static str> {
        match self {
            Failure::Unreachable(_) => Some("unreachable"),
            Failure::Connection(_) => Some("connection_error"),
            Failure::Timeout(_) => Some("timeout"),
            Failure::InvalidPath(_) | Failure::Down(_) => None,
        }
    }

    fn maybe_processed(&self) -> bool {
        matches!(self, Failure::Connection(_) | Failure::Timeout(_))
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Down(wait) => Some(*wait),
            _ => None,
        }
    }

    fn unsent(&self) -> bool {
        matches!(self, Failure::Down(_) | Failure::InvalidPath(_))
    }

    fn may_wait_out(&self) -> bool {
        matches!(self, Failure::Down(_))
    }

    fn model_unavailable(&self) -> bool {
        matches!(self, Failure::Down(_))
    }
}

/// Credentials penstock sends in sidecar mode, replacing the client's.
#[derive(Clone)]
struct SidecarAuth {
    /// `authorization` (OpenAI) or `api-key` (Azure).
    header: HeaderName,
    authorization: HeaderValue,
    organization: Option<HeaderValue>,
    project: Option<HeaderValue>,
}

/// What keeps an upstream from being built: `key` names the config key
/// (`upstream.x`, or `upstream[i].x` with several).
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct BuildError {
    key: String,
    message: String,
}

/// An Azure OpenAI upstream: how an OpenAI-shaped request is put to it.
struct Azure {
    /// Model -> deployment (a model not named is its own deployment).
    deployments: std::collections::BTreeMap<String, String>,
    /// Deployment paths with this `api-version`; else the v1 API.
    api_version: Option<String>,
}

impl Azure {
    /// The Azure path and body of an OpenAI-shaped request (`/v1/...`):
    /// the v1 API (`/openai/v1/...`) or a deployment path with its
    /// `api-version`; the body's `model` (JSON or a form's) names the
    /// deployment.
    fn rewrite(
        &self,
        path: &str,
        query: Option<&str>,
        route: Option<Route>,
        model: Option<&str>,
        content_type: Option<&str>,
        body: Bytes,
    ) -> (String, Bytes) {
        let rest = path.strip_prefix("/v1").unwrap_or(path);
        let deployment = model.map(|m| self.deployments.get(m).map_or(m, String::as_str));
        let q = |sep: char| query.map_or(String::new(), |q| format!("{sep}{q}"));
        let path = match &self.api_version {
            None => format!("/openai/v1{rest}{}", q('?')),
            Some(v) => {
                let scoped = route.is_some_and(|r| {
                    matches!(
                        r,
                        Route::ImagesGenerations
                            | Route::ImagesEdits
                            | Route::ImagesVariations
                            | Route::ChatCompletions
                            | Route::Completions
                            | Route::Embeddings
                    )
                }) || rest.starts_with("/audio/");
                match deployment.filter(|_| scoped) {
                    Some(d) => format!("/openai/deployments/{d}{rest}?api-version={v}{}", q('&')),
                    None => format!("/openai{rest}?api-version={v}{}", q('&')),
                }
            }
        };
        let body = match (model, deployment) {
            (Some(m), Some(d)) if m != d => rename_model(body, content_type, d),
            _ => body,
        };
        (path, body)
    }
}

/// A body with its `model` (a JSON body's top-level member, a form's text
/// part) replaced by `to`; a body without one as it is.
fn rename_model(body: Bytes, content_type: Option<&str>, to: &str) -> Bytes {
    match crate::vocab::fields::with_model(&body, content_type, to) {
        Some(renamed) => Bytes::from(renamed),
        None => body,
    }
}

/// Whether `name` (lowercase) describes one hop and is never forwarded (RFC
/// 9110 7.6.1). A `match`: the name's length picks the one candidate compared.
fn hop_by_hop_name(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

fn hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop_name(name.as_str())
}

/// Further names the `Connection` header lists as hop-by-hop (most messages
/// list none, or only `keep-alive` or `close`): nothing is allocated unless
/// one is, or a token is written in capitals.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            let lower = match t.bytes().any(|b| b.is_ascii_uppercase()) {
                true => std::borrow::Cow::Owned(t.to_ascii_lowercase()),
                false => std::borrow::Cow::Borrowed(*t),
            };
            lower != "close" && !hop_by_hop_name(&lower)
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect()
}

/// Drops hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed = connection_listed(headers);
    remove_where(headers, |k| hop_by_hop(k) || listed.contains(k));
}

/// The client's headers as they go upstream, copied in one pass: without
/// hop-by-hop headers, `host` (set for the upstream's authority),
/// `content-length` (derived from the buffered body) and penstock's own
/// `x-penstock-*`, which are for penstock, not for OpenAI.
fn forwarded(client: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(client);
    let mut out = HeaderMap::with_capacity(client.len());
    for (k, v) in client {
        let dropped = hop_by_hop(k)
            || k == header::HOST
            || k == header::CONTENT_LENGTH
            || k.as_str().starts_with("x-penstock-")
            || listed.contains(k);
        if !dropped {
            out.append(k.clone(), v.clone());
        }
    }
    out
}

/// The innermost service: one attempt against the upstream the request was
/// given to (the first unless the budget layer chose another). Cloned into
/// every request's futures, so it is one pointer.
#[derive(Clone)]
pub struct Upstream {
    all: Arc<[Arc<Inner>]>,
}

struct Inner {
    name: Arc<str>,
    /// Attempts sent and not yet answered (their heads).
    in_flight: std::sync::atomic::AtomicUsize,
    /// With several upstreams: `x-penstock-upstream` on its answers, and a
    /// refusal of penstock's key takes it out.
    announce: Option<HeaderValue>,
    azure: Option<Azure>,
    /// Connections, pooled per thread: a proxy thread's requests use the
    /// connections its own runtime drives.
    conns: conns::Conns,
    base: BaseUrl,
    sidecar: Option<SidecarAuth>,
    attempt_timeout: Duration,
    read_timeout: Duration,
    metrics: Option<Arc<Metrics>>,
    health: health::Health,
}

impl crate::vocab::service::Upstreams for Upstream {
    fn count(&self) -> usize {
        self.all.len()
    }

    fn unavailable(&self, i: usize) -> bool {
        self.all.get(i).is_some_and(|u| u.health.unavailable())
    }

    fn in_flight(&self, i: usize) -> usize {
        self.all.get(i).map_or(0, |u| {
            u.in_flight.load(std::sync::atomic::Ordering::Relaxed)
        })
    }
}

impl Upstream {
    /// The first upstream's breaker, for `/status`.
    pub(crate) fn health(&self) -> health::Status {
        self.all[0].health.status()
    }

    /// Every upstream's breaker, in the config's order.
    pub(crate) fn healths(&self) -> Vec<health::Status> {
        self.all.iter().map(|u| u.health.status()).collect()
    }

    /// One upstream: builds the client; `env` reads the sidecar key's
    /// variable; `metrics`, when given, counts every attempt and its time
    /// to the response head.
    pub fn new(
        config: &UpstreamConfig,
        env: impl Fn(&str) -> Option<String>,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Upstream, BuildError> {
        Upstream::several(&Upstreams::from_list(vec![config.clone()]), env, metrics)
    }

    /// Every configured upstream, the first the default.
    pub fn several(
        config: &Upstreams,
        env: impl Fn(&str) -> Option<String>,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Upstream, BuildError> {
        let several = config.all().len() > 1;
        let mut all = Vec::with_capacity(config.all().len());
        for (i, one) in config.all().iter().enumerate() {
            let name: Arc<str> = config.name_of(i).into();
            let key = |field: &str| config.key(i, field);
            let announce = match several {
                true => Some(
                    HeaderValue::try_from(name.as_ref()).map_err(|_| BuildError {
                        key: key("name"),
                        message: "not a valid header value".into(),
                    })?,
                ),
                false => None,
            };
            all.push(Arc::new(Inner::build(
                one,
                name,
                announce,
                &key,
                &env,
                metrics.clone(),
            )?));
        }
        Ok(Upstream { all: all.into() })
    }
}

impl Inner {
    fn build(
        config: &UpstreamConfig,
        name: Arc<str>,
        announce: Option<HeaderValue>,
        key: &dyn Fn(&str) -> String,
        env: &dyn Fn(&str) -> Option<String>,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Inner, BuildError> {
        let err = |field: &str, message: String| BuildError {
            key: key(field),
            message,
        };
        let base = BaseUrl::parse(&config.base_url).map_err(|m| err("base_url", m))?;
        if base.credentials {
            tracing::warn!(
                "{}: names a user or password: it is not sent upstream",
                key("base_url")
            );
        }
        let azure = config.kind == UpstreamKind::Azure;
        let sidecar = match &config.api_key_env {
            Some(var) => {
                let secret = env(var).filter(|k| !k.is_empty());
                let secret = secret.ok_or_else(|| {
                    err(
                        "api_key_env",
                        format!("environment variable {var} is not set"),
                    )
                })?;
                let header = |field: &str, v: &str| {
                    let mut v = HeaderValue::try_from(v)
                        .map_err(|_| err(field, "not a valid header value".into()))?;
                    v.set_sensitive(true);
                    Ok::<_, BuildError>(v)
                };
                Some(SidecarAuth {
                    header: match azure {
                        true => name::API_KEY,
                        false => header::AUTHORIZATION,
                    },
                    authorization: match azure {
                        true => header("api_key_env", &secret)?,
                        false => header("api_key_env", &format!("Bearer {secret}"))?,
                    },
                    organization: config
                        .organization
                        .as_deref()
                        .map(|o| header("organization", o))
                        .transpose()?,
                    project: config
                        .project
                        .as_deref()
                        .map(|p| header("project", p))
                        .transpose()?,
                })
            }
            None => None,
        };

        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &config.ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| err("ca_file", format!("{}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(err(
                    "ca_file",
                    format!("{}: no PEM certificate found", path.display()),
                ));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| err("ca_file", format!("{}: {e}", path.display())))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| BuildError {
            key: "TLS setup".into(),
            message: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        Ok(Inner {
            conns: conns::Conns::new(
                https,
                base.clone(),
                config.pool_idle_timeout,
                config.keep_alive_interval,
            ),
            base,
            sidecar,
            attempt_timeout: config.attempt_timeout,
            read_timeout: config.read_timeout,
            metrics,
            health: health::Health::named(
                name.clone(),
                config.breaker_failures,
                config.breaker_cooldown,
            ),
            in_flight: Default::default(),
            name,
            announce,
            azure: azure.then(|| Azure {
                deployments: config.deployments.clone(),
                api_version: config.api_version.clone(),
            }),
        })
    }

    fn request(&self, req: Request<Payload>) -> Result<Request<Full<Bytes>>, ProxyError> {
        let (mut parts, mut body) = req.into_parts();
        // An OpenAI-shaped request to Azure takes Azure's path and names
        // the deployment; an Azure-shaped one goes as it came.
        let azure_path = match &self.azure {
            Some(az) if parts.uri.path().starts_with("/v1/") => {
                let model = body
                    .model
                    .clone()
                    .or_else(|| body.ctx.as_ref()?.model.as_deref().map(Arc::from));
                let (path, bytes) = az.rewrite(
                    parts.uri.path(),
                    parts.uri.query(),
                    body.ctx.as_ref().map(|c| c.route),
                    model.as_deref(),
                    body.ctx
                        .as_ref()
                        .and_then(|c| c.headers.get(header::CONTENT_TYPE))
                        .and_then(|v| v.to_str().ok()),
                    std::mem::take(&mut body.bytes),
                );
                body.bytes = bytes;
                Some(
                    http::uri::PathAndQuery::try_from(path)
                        .map_err(|e| Failure::InvalidPath(e.to_string()))?,
                )
            }
            _ => None,
        };
        // Origin form: the connection sets what HTTP/1.1 or HTTP/2 needs.
        parts.uri = self
            .base
            .path(azure_path.as_ref().or(parts.uri.path_and_query()))
            .map(Uri::from)
            .map_err(|e| Failure::InvalidPath(e.to_string()))?;
        // The upstream connection picks its own protocol version.
        parts.version = http::Version::HTTP_11;
        // The client's headers come from the request's context, where they are
        // shared by every attempt.
        parts.headers = forwarded(match &body.ctx {
            Some(ctx) => &ctx.headers,
            None => &parts.headers,
        });
        let h = &mut parts.headers;
        // penstock reads what it must of every answer, so it lets the upstream
        // compress only in codings it can decode. A shared call's answer goes to
        // many callers, whatever they accept: it is asked for uncompressed.
        // A header of readable codings only goes as it came.
        let accept = match body.interest.is_some() {
            true => Accept::Identity,
            false => encoding::upstream_accept(h),
        };
        let identity = || HeaderValue::from_static("identity");
        let replaced = match accept {
            Accept::AsSent => None,
            Accept::Only(codings) => {
                Some(HeaderValue::try_from(codings).unwrap_or_else(|_| identity()))
            }
            Accept::Identity => Some(identity()),
        };
        if let Some(value) = replaced {
            h.insert(header::ACCEPT_ENCODING, value);
        }
        if let Some(auth) = &self.sidecar {
            // The client's own credentials never go upstream in sidecar mode.
            for name in [
                header::AUTHORIZATION,
                name::API_KEY,
                name::OPENAI_ORGANIZATION,
                name::OPENAI_PROJECT,
            ] {
                h.remove(name);
            }
            h.insert(auth.header.clone(), auth.authorization.clone());
            if let Some(org) = &auth.organization {
                h.insert(name::OPENAI_ORGANIZATION, org.clone());
            }
            if let Some(project) = &auth.project {
                h.insert(name::OPENAI_PROJECT, project.clone());
            }
        }
        Ok(Request::from_parts(parts, Full::new(body.bytes)))
    }
}

/// Error bodies are small JSON; they are read whole so they can be classified
/// once. One larger than this is treated as a broken answer.
const MAX_ERROR_BODY: usize = 64 * 1024;

impl tower::Service<Request<Payload>> for Upstream {
    type Response = Response<Body>;
    type Error = ProxyError;
    // Boxed once per attempt: an attempt is a network round trip, and the error
    // path reads the body before answering.
    type Future = crate::vocab::service::BoxCall;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        // The connection pool has no readiness of its own: connections are taken per call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Payload>) -> Self::Future {
        if let Some(gate) = req.body().gate.clone() {
            // Asked first: only then may the call go (and cost money).
            let mut me = self.clone();
            let mut req = req;
            req.body_mut().gate = None;
            return Box::pin(async move {
                gate.before_send().await?;
                me.call(req).await
            });
        }
        let inner = match req.body().upstream {
            Some(i) => self.all.get(usize::from(i)).unwrap_or(&self.all[0]),
            None => &self.all[0],
        }
        .clone();
        // The upstream keeps failing: nothing is sent until a probe answers.
        let probe = match inner.health.admit() {
            health::Admit::Go { probe } => probe,
            health::Admit::Down(wait) => {
                return Box::pin(std::future::ready(Err(Failure::Down(wait).into())));
            }
        };
        // From here the call costs money: a shared call is finished even if its
        // callers leave.
        if let Some(interest) = &req.body().interest {
            interest.mark_sent();
        }
        let ctx = req.body().ctx.clone();
        if let Some(ctx) = &ctx {
            ctx.tally.update(|t| t.sent = true);
        }
        let mut req = req;
        let departure = req.body_mut().departure.take();
        let req = inner.request(req);
        Box::pin(async move {
            // A probe whose caller leaves gives its turn back.
            let mut out = ProbeOut {
                inner: probe.then(|| inner.clone()),
            };
            let _out = Out::count(&inner);
            let sent = tokio::time::Instant::now();
            // No attempt outlives the request's deadline.
            let timeout = ctx.as_ref().map_or(inner.attempt_timeout, |c| {
                inner
                    .attempt_timeout
                    .min(c.deadline.saturating_duration_since(sent))
            });
            let result = match req {
                Ok(req) => inner.attempt(req, timeout, departure.as_deref()).await,
                Err(e) => {
                    inner.health.record(false, probe);
                    out.inner = None;
                    return Err(e);
                }
            };
            let failed = crate::vocab::classify::attempt(&result).class
                == crate::vocab::classify::Class::Transient;
            // One of several upstreams refused penstock's own key, or its
            // money is gone: its traffic goes to the others until a probe
            // is accepted.
            let refused = inner.announce.is_some()
                && inner.sidecar.is_some()
                && result.as_ref().is_ok_and(|r| {
                    matches!(
                        r.status(),
                        http::StatusCode::UNAUTHORIZED | http::StatusCode::FORBIDDEN
                    ) || crate::vocab::classify::of(r)
                        .is_some_and(|c| c.class == crate::vocab::classify::Class::QuotaExhausted)
                });
            match refused {
                true => inner.health.trip(probe),
                false => inner.health.record(failed, probe),
            }
            out.inner = None;
            if let Some(m) = &inner.metrics {
                let outcome = crate::vocab::classify::attempt_label(&result);
                let route = ctx.as_ref().map_or("other", |c| c.route.label());
                let model = m.label_of(ctx.as_deref());
                m.attempt(route, &model, outcome, sent.elapsed().as_secs_f64());
                if inner.announce.is_some() {
                    m.upstream_call(&inner.name, outcome);
                }
            }
            let mut result = result;
            if let (Some(name), Ok(resp)) = (&inner.announce, &mut result) {
                resp.headers_mut().insert(name::UPSTREAM, name.clone());
            }
            result
        })
    }
}

/// An attempt out, counted until its answer's head (or its failure).
struct Out<'a>(&'a Inner);

impl<'a> Out<'a> {
    fn count(inner: &'a Inner) -> Out<'a> {
        inner
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Out(inner)
    }
}

impl Drop for Out<'_> {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A probe still out: dropped before it reported, its turn is given back.
struct ProbeOut {
    inner: Option<Arc<Inner>>,
}

impl Drop for ProbeOut {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.health.abandon_probe();
        }
    }
}

impl Inner {
    /// Sends one attempt; classifies its answer, reading an error's body whole.
    async fn attempt(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
        departure: Option<&dyn Departure>,
    ) -> Result<Response<Body>, ProxyError> {
        let sent = self.conns.send(req, departure);
        let (resp, lent) = match tokio::time::timeout(timeout, sent).await {
            Err(_) => return Err(Failure::Timeout(timeout).into()),
            Ok(Err(conns::SendError::Connect(e))) => return Err(Failure::Unreachable(e).into()),
            Ok(Err(conns::SendError::Connection(e))) => {
                return Err(Failure::Connection(e).into());
            }
            Ok(Ok(answer)) => answer,
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if parts.status.is_success() || parts.status.is_informational() {
            // A success carries no classification: its status says it
            // (`classify::of`), and the answer's extensions stay unallocated.
            if !parts.status.is_success() {
                parts
                    .extensions
                    .insert(classify(parts.status, &parts.headers, b""));
            }
            let body = Idle::wrap(body, self.read_timeout, lent);
            return Ok(Response::from_parts(parts, body));
        }
        let read = Limited::new(body, MAX_ERROR_BODY).collect();
        let mut bytes = match tokio::time::timeout(timeout, read).await {
            Ok(Ok(b)) => {
                if let Some(lent) = lent {
                    lent.give_back();
                }
                b.to_bytes()
            }
            Ok(Err(e)) => return Err(Failure::Connection(e.to_string()).into()),
            Err(_) => return Err(Failure::Timeout(timeout).into()),
        };
        // Passed on decoded: it is small, penstock must read its code, and
        // whoever gets it later (a breaker's repeat, a coalesced caller) may
        // not accept the upstream's coding.
        let coding = Encoding::of(&parts.headers);
        if coding != Some(Encoding::Identity)
            && let Some(plain) = encoding::decode_all(coding, &bytes, MAX_ERROR_BODY)
        {
            bytes = Bytes::from(plain);
            parts.headers.remove(header::CONTENT_ENCODING);
        }
        parts
            .extensions
            .insert(classify(parts.status, &parts.headers, &bytes));
        parts.headers.remove(header::CONTENT_LENGTH);
        Ok(Response::from_parts(parts, full(bytes)))
    }
}

pin_project_lite::pin_project! {
    /// An answer's body that fails when the upstream sends nothing for
    /// `timeout`: a stalled body or stream ends instead of hanging its client
    /// (and everyone waiting on a shared call) for ever. Read to its end, it
    /// gives its connection back to the pool.
    struct Idle {
        #[pin]
        inner: hyper::body::Incoming,
        #[pin]
        sleep: tokio::time::Sleep,
        timeout: Duration,
        lent: Option<conns::Lent>,
    }
}

impl Idle {
    fn wrap(inner: hyper::body::Incoming, timeout: Duration, lent: Option<conns::Lent>) -> Body {
        let mut idle = Idle {
            inner,
            sleep: tokio::time::sleep(timeout),
            timeout,
            lent,
        };
        // An answer with no body is over already.
        if http_body::Body::is_end_stream(&idle.inner)
            && let Some(lent) = idle.lent.take()
        {
            lent.give_back();
        }
        idle.boxed()
    }
}

impl http_body::Body for Idle {
    type Data = Bytes;
    type Error = crate::vocab::body::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => {
                let ended = match &frame {
                    None => true,
                    Some(Ok(_)) => this.inner.is_end_stream(),
                    Some(Err(_)) => {
                        // A broken connection is not given back.
                        this.lent.take();
                        false
                    }
                };
                if ended {
                    if let Some(lent) = this.lent.take() {
                        lent.give_back();
                    }
                } else {
                    // The wait starts again for the next frame; after the
                    // last, nothing waits (no timer to set and take down).
                    let next = tokio::time::Instant::now() + *this.timeout;
                    this.sleep.as_mut().reset(next);
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                    "the upstream sent nothing for {}",
                    humantime::format_duration(*this.timeout)
                )
                .into()))),
                Poll::Pending => Poll::Pending,
            },
        }
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

    #[test]
    fn hop_by_hop_headers_go_including_named_ones() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-request-id", HeaderValue::from_static("req_1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-request-id"));
        // Without `connection`, a listed one still goes; others stay.
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), [header::CONTENT_TYPE]);
        // The usual answer: `connection` alone, all its values.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), [header::CONTENT_TYPE]);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn forwarded_headers_keep_the_clients_own_in_order_and_drop_the_rest() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("localhost:8080"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Close, X-Hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-penstock-max-wait", HeaderValue::from_static("5s"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.append("x-tag", HeaderValue::from_static("a"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-1"),
        );
        h.append("x-tag", HeaderValue::from_static("b"));
        let out = forwarded(&h);
        let kept: Vec<(&str, &str)> = out
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            kept,
            [
                ("x-tag", "a"),
                ("x-tag", "b"),
                ("authorization", "Bearer sk-1")
            ]
        );
        // The client's own map is untouched: the next attempt copies it again.
        assert_eq!(h.len(), 9);
    }

    #[test]
    fn sidecar_without_its_key_is_a_startup_error() {
        let config = UpstreamConfig {
            api_key_env: Some("PENSTOCK_TEST_NO_SUCH_VAR".into()),
            ..UpstreamConfig::default()
        };
        let err = Upstream::new(&config, |_| None, None).err().unwrap();
        assert_eq!(
            err.to_string(),
            "upstream.api_key_env: environment variable PENSTOCK_TEST_NO_SUCH_VAR is not set"
        );
    }
}
