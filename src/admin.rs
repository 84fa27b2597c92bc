//! The admin listener: health, readiness and status, kept off the proxy port so
//! they are never exposed where API traffic is.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode, header};
use serde_json::json;

use crate::config::Config;
use crate::stack::Shared;
use crate::vocab::body::{Body, full};

/// What the admin endpoints report on.
pub struct State {
    /// Config loaded and the proxy listener accepting; false again while draining.
    pub ready: AtomicBool,
    started: Instant,
    shared: Shared,
    summary: serde_json::Value,
}

impl State {
    pub fn new(config: &Config, shared: Shared) -> State {
        State {
            ready: AtomicBool::new(false),
            started: Instant::now(),
            shared,
            summary: json!({
                "listen": config.listen.to_string(),
                "upstream": crate::vocab::url::BaseUrl::redact(&config.upstream.base_url),
                "sidecar": config.upstream.api_key_env.is_some(),
                "budgets": config.budgets.iter().map(|b| json!({
                    "name": b.display_name(),
                    "models": b.models,
                    "rpm": b.rpm, "tpm": b.tpm, "ipm": b.ipm,
                    "burst_ms": b.burst.as_millis() as u64,
                    "max_in_flight": b.max_in_flight,
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
            }),
        }
    }

    async fn status(&self) -> serde_json::Value {
        let (entries, bytes) = self.shared.cache.usage().await;
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.started.elapsed().as_secs(),
            "ready": self.ready.load(Ordering::Acquire),
            "config": self.summary,
            "pools": self.shared.budgets.busiest(MAX_POOLS_SHOWN),
            "pools_total": self.shared.budgets.len(),
            "cache": {"entries": entries, "bytes": bytes},
            "buffered_bytes": self.shared.buffered.bytes(),
            "jobs": self.shared.jobs.as_ref().map(|j| j.status()),
            "state": match &self.shared.redis {
                Some(redis) => json!(redis.status()),
                None => json!({"backend": "memory", "healthy": true}),
            },
        })
    }
}

/// Pools `/status` lists: the busiest, so the page stays small with many keys.
const MAX_POOLS_SHOWN: usize = 100;

pub async fn handle<B>(state: Arc<State>, req: Request<B>) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/metrics" {
        let degraded = state.shared.redis.as_ref().is_some_and(|r| !r.healthy());
        let text = state
            .shared
            .metrics
            .encode(&state.shared.budgets.status(), degraded);
        let mut resp = Response::new(full(text));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        return Ok(resp);
    }
    let (status, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, json!({"status": "ok"})),
        "/readyz" if state.ready.load(Ordering::Acquire) => {
            (StatusCode::OK, json!({"status": "ready"}))
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "not ready"}),
        ),
        "/status" => (StatusCode::OK, state.status().await),
        _ => (StatusCode::NOT_FOUND, json!({"error": "not found"})),
    };
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
