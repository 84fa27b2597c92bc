//! How penstock's errors read as responses: OpenAI-shaped JSON
//! (`{"error":{"message","type","param","code"}}`) whose `code` starts with
//! `penstock_`, so it can be told apart from an error OpenAI sent; and the
//! headers that tell a client what penstock did for its request (attempts,
//! the cache, whether to retry). The edge renders them, once per request; an
//! async job's runner, for the job's result.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, header};
use serde_json::json;

use crate::vocab::body::{Body, full};
use crate::vocab::context::Accounted;
use crate::vocab::error::ProxyError;
use crate::vocab::headers::{name, number};

/// The most `retry-after-ms` penstock sends: both official SDKs obey up to 60 s.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The response a client sees.
pub(crate) fn into_response(error: ProxyError) -> Response<Body> {
    let (parts, body) = into_parts(error);
    Response::from_parts(parts, full(body))
}

/// The `type` field.
fn kind(error: &ProxyError) -> &'static str {
    if error.retry_after().is_some() {
        "rate_limit_error"
    } else if error.status().is_client_error() {
        "invalid_request_error"
    } else {
        "penstock_error"
    }
}

/// What penstock did for a request, as headers: `x-penstock-attempts`,
/// `x-penstock-cache`, and `x-should-retry: false` when its retries gave up.
/// Gives the first two back, for the log line.
pub(crate) fn tally_headers(
    h: &mut HeaderMap,
    t: &Accounted,
) -> (Option<HeaderValue>, Option<HeaderValue>) {
    let attempts = t.attempts.map(|n| number(u64::from(n)));
    let cache = t.cache.map(HeaderValue::from_static);
    if let Some(v) = &attempts {
        h.insert(name::ATTEMPTS, v.clone());
    }
    if let Some(v) = &cache {
        h.insert(name::CACHE, v.clone());
    }
    if t.gave_up {
        h.insert(name::SHOULD_RETRY, HeaderValue::from_static("false"));
    }
    (attempts, cache)
}

/// The response as its head and its body's bytes.
pub(crate) fn into_parts(error: ProxyError) -> (http::response::Parts, Bytes) {
    let problem = error.problem();
    if let Some(answer) = problem.answer() {
        // The upstream's own answer, repeated (a spent quota's breaker).
        return answer;
    }
    let status = problem.status();
    let message = error.to_string();
    let body = json!({"error": {
        "message": message,
        "type": kind(&error),
        "param": problem.param(),
        "code": problem.code(),
    }});
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(wait) = problem.retry_after() {
        // Capacity returns at a known time: say when, within what SDKs obey.
        let wait = wait.clamp(Duration::from_millis(1), MAX_RETRY_AFTER);
        h.insert(
            name::RETRY_AFTER_MS,
            HeaderValue::from(wait.as_millis() as u64),
        );
        h.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(wait.as_secs_f64().ceil() as u64),
        );
        h.insert(name::SHOULD_RETRY, HeaderValue::from_static("true"));
    } else if status.is_client_error() {
        // A client-side mistake will not get better by sending it again.
        h.insert(name::SHOULD_RETRY, HeaderValue::from_static("false"));
    }
    (resp.into_parts().0, Bytes::from(body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::error::Problem;
    use http_body_util::BodyExt;

    #[derive(Debug, thiserror::Error)]
    #[error("the upstream did not answer within 5m")]
    struct Timeout;

    impl Problem for Timeout {
        fn status(&self) -> http::StatusCode {
            http::StatusCode::GATEWAY_TIMEOUT
        }
        fn code(&self) -> &'static str {
            "penstock_upstream_timeout"
        }
    }

    #[tokio::test]
    async fn errors_are_openai_shaped_and_name_penstock() {
        let resp = into_response(Timeout.into());
        assert_eq!(resp.status(), 504);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "penstock_upstream_timeout");
        assert_eq!(v["error"]["type"], "penstock_error");
        assert_eq!(
            v["error"]["message"],
            "the upstream did not answer within 5m"
        );
        assert!(v["error"]["param"].is_null());
    }
}
