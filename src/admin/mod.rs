//! The admin listener: health, readiness, status, metrics and a live page,
//! kept off the proxy port so they are never exposed where API traffic is.
//! Read-only: it answers `GET` (and `HEAD`) alone. With `admin.token_env`
//! everything but `/healthz` and `/readyz` wants that bearer token.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode, header};
use serde_json::json;

use crate::config::Config;
use crate::stack::Shared;
use crate::vocab::body::{Body, full};

/// What the admin endpoints report on.
pub(crate) struct State {
    /// Config loaded and the proxy listener accepting; false again while draining.
    pub(crate) ready: AtomicBool,
    started: Instant,
    shared: Shared,
    /// The config in effect, without secrets (a reload changes it).
    summary: Mutex<serde_json::Value>,
    /// How the last reload went, if there was one.
    reload: Mutex<Option<serde_json::Value>>,
    /// The bearer token asked for, hashed (compared in constant time).
    token: Option<blake3::Hash>,
}

/// The page: HTML, style and script in one file, built into the binary.
const PAGE: &str = include_str!("page.html");

/// What `/status` shows of a config: no secrets, and its hash, to compare
/// replicas' configs.
fn summary(config: &Config) -> serde_json::Value {
    json!({
        "hash": config.hash(),
        "listen": config.listen.to_string(),
        "upstream": crate::vocab::url::BaseUrl::redact(&config.upstream.base_url),
        "upstreams": config.upstream.all().iter().enumerate().map(|(i, u)| json!({
            "name": config.upstream.name_of(i),
            "base_url": crate::vocab::url::BaseUrl::redact(&u.base_url),
            "kind": u.kind,
            "models": u.models,
        })).collect::<Vec<_>>(),
        "sidecar": config.upstream.api_key_env.is_some(),
        "budgets": config.budgets.iter().map(|b| json!({
            "name": b.display_name(),
            "models": b.models,
            "rpm": b.rpm, "tpm": b.tpm, "ipm": b.ipm,
            "burst_ms": b.burst.as_millis() as u64,
            "max_in_flight": b.max_in_flight,
        })).collect::<Vec<_>>(),
        "clients": config.clients.iter().map(|c| json!({
            "id": c.id, "rpm": c.rpm, "burst": c.burst,
        })).collect::<Vec<_>>(),
        "queue": {
            "max_wait_ms": config.queue.max_wait.as_millis() as u64,
            "max_depth": config.queue.max_depth,
        },
        "cache": {
            "enabled": config.cache.enabled,
            "ttl_secs": config.cache.ttl.as_secs(),
            "max_size": config.cache.max_size.as_u64(),
            "max_entry_size": config.cache.max_entry_size.as_u64(),
            "scope": config.cache.scope,
            "paths": config.cache.paths,
        },
    })
}

impl State {
    /// `token`: the bearer token `admin.token_env` names, read at start.
    pub(crate) fn new(config: &Config, shared: Shared, token: Option<&str>) -> State {
        State {
            ready: AtomicBool::new(false),
            token: token.map(|t| blake3::hash(t.as_bytes())),
            started: Instant::now(),
            shared,
            summary: Mutex::new(summary(config)),
            reload: Mutex::new(None),
        }
    }

    /// What the stack shares with the admin endpoints.
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// A reload: the config now in effect (none: it failed, nothing
    /// changed), and how it went.
    pub(crate) fn reloaded(&self, config: Option<&Config>, outcome: serde_json::Value) {
        let mut shown = self.summary.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(config) = config {
            *shown = summary(config);
            // The file's hash, to compare with other replicas' files.
            shown["hash"] = outcome["hash"].clone();
        }
        drop(shown);
        *self.reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    }

    /// Samples the totals the page charts every `SAMPLE_EVERY`, until the
    /// state is gone.
    pub(crate) fn sample_periodically(self: &Arc<Self>) {
        let state = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::telemetry::recent::SAMPLE_EVERY);
            loop {
                tick.tick().await;
                let Some(state) = state.upgrade() else {
                    return;
                };
                state.shared.metrics.recent.sample();
            }
        });
    }

    async fn status(&self, query: &Query) -> serde_json::Value {
        let (entries, bytes) = self.shared.cache.usage().await;
        let metrics = &self.shared.metrics;
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.started.elapsed().as_secs(),
            "ready": self.ready.load(Ordering::Acquire),
            "config": *self.summary.lock().unwrap_or_else(|e| e.into_inner()),
            "reload": *self.reload.lock().unwrap_or_else(|e| e.into_inner()),
            "pools": self.shared.budgets.busiest(query.limit, query.filter.as_deref()),
            "pools_total": self.shared.budgets.len(),
            "breakers": self.shared.budgets.breakers().into_iter().map(|(credential, open)| json!({
                "credential": credential,
                "open_for_ms": u64::try_from(open.as_millis()).unwrap_or(u64::MAX),
            })).collect::<Vec<_>>(),
            "cache": {"entries": entries, "bytes": bytes},
            "buffered_bytes": self.shared.buffered.bytes(),
            "jobs": self.shared.jobs.as_ref().map(|j| j.status()),
            "jobs_by_state": self.shared.jobs.as_ref().map(|_| metrics.jobs_by_state()),
            "state": match &self.shared.redis {
                Some(redis) => json!(redis.status()),
                None => json!({"backend": "memory", "healthy": true}),
            },
            "recent": metrics.recent.view(),
            "upstream": self.shared.upstream.health(),
            "upstreams": self.shared.upstream.healths(),
            "spend": self.shared.spend.status().await,
        })
    }

    /// Whether the request may read what the token guards: no token is
    /// configured, or it carries it (`Authorization: Bearer`, or `?token=`
    /// for a browser's first load of the page).
    fn allowed<B>(&self, req: &Request<B>, query: &Query) -> bool {
        let Some(want) = &self.token else {
            return true;
        };
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        // blake3's hashes compare in constant time.
        [bearer, query.token.as_deref()]
            .into_iter()
            .flatten()
            .any(|t| blake3::hash(t.as_bytes()) == *want)
    }
}

/// What `/status` and the page are asked with.
#[derive(Default)]
struct Query {
    /// Pools whose name or credential contains this.
    filter: Option<String>,
    /// Pools listed at most.
    limit: usize,
    token: Option<String>,
}

impl Query {
    fn of(uri: &http::Uri) -> Query {
        let mut q = Query {
            limit: MAX_POOLS_SHOWN,
            ..Query::default()
        };
        for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
            match &*k {
                "pools" => q.filter = Some(v.chars().take(200).collect()),
                "limit" => {
                    q.limit = v
                        .parse::<usize>()
                        .map_or(MAX_POOLS_SHOWN, |n| n.clamp(1, MAX_POOLS_LISTED))
                }
                "token" => q.token = Some(v.into_owned()),
                _ => {}
            }
        }
        q
    }
}

/// Pools `/status` lists: the busiest, so the page stays small with many keys.
const MAX_POOLS_SHOWN: usize = 100;
/// The most pools `/status?limit=` lists.
const MAX_POOLS_LISTED: usize = 1000;

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The page, with headers that keep it to itself: nothing loaded from
/// elsewhere, no framing, no referrer (a `?token=` stays here).
fn page() -> Response<Body> {
    let mut resp = Response::new(full(PAGE));
    let h = resp.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    resp
}

pub(crate) async fn handle<B>(
    state: Arc<State>,
    req: Request<B>,
) -> Result<Response<Body>, Infallible> {
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        let mut resp = json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "the admin listener is read-only"}),
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(resp);
    }
    let path = req.uri().path();
    match path {
        "/healthz" => return Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        "/readyz" if state.ready.load(Ordering::Acquire) => {
            return Ok(json_response(StatusCode::OK, &json!({"status": "ready"})));
        }
        "/readyz" => {
            return Ok(json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "not ready"}),
            ));
        }
        "/" | "/status" | "/metrics" => {}
        _ => {
            return Ok(json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "not found"}),
            ));
        }
    }
    let query = Query::of(req.uri());
    if !state.allowed(&req, &query) {
        let mut resp = json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "a bearer token is required (admin.token_env)"}),
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"penstock admin\""),
        );
        return Ok(resp);
    }
    Ok(match path {
        "/" => page(),
        "/status" => json_response(StatusCode::OK, &state.status(&query).await),
        _ => {
            let spend = state.shared.spend.status().await;
            for c in spend["clients"].as_array().into_iter().flatten() {
                let client = c["client"].as_str().unwrap_or_default();
                for (period, key) in [
                    ("day", "spent_today_usd"),
                    ("month", "spent_this_month_usd"),
                ] {
                    if let Some(usd) = c[key].as_f64() {
                        state.shared.metrics.client_spend(client, period, usd);
                    }
                }
            }
            let degraded = state.shared.redis.as_ref().is_some_and(|r| !r.healthy());
            let text = state
                .shared
                .metrics
                .encode(&state.shared.budgets.status(), degraded);
            let mut resp = Response::new(full(text));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
    })
}
