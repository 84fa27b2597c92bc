//! The admin listener: health and readiness, kept off the proxy port so they are
//! never exposed where API traffic is.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{HeaderValue, Request, Response, StatusCode, header};
use serde_json::json;

use crate::body::{Body, full};

/// What the admin endpoints report on.
#[derive(Debug, Default)]
pub struct State {
    /// Config loaded and the proxy listener accepting; false again while draining.
    pub ready: AtomicBool,
}

pub async fn handle<B>(state: Arc<State>, req: Request<B>) -> Result<Response<Body>, Infallible> {
    let (status, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, json!({"status": "ok"})),
        "/readyz" if state.ready.load(Ordering::Acquire) => {
            (StatusCode::OK, json!({"status": "ready"}))
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "not ready"}),
        ),
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
