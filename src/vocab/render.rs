//! How penstock's errors read as responses: OpenAI-shaped JSON
//! (`{"error":{"message","type","param","code"}}`) whose `code` starts with
//! `penstock_`, so it can be told apart from an error OpenAI sent. The edge
//! renders a request's own errors; an answer kept for others (a shared
//! call's, a job's) is rendered by the same function.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use serde_json::json;

use crate::vocab::body::{Body, full};
use crate::vocab::error::{Personal, ProxyError, Refused};
use crate::vocab::headers::name;

/// The most `retry-after-ms` penstock sends: both official SDKs obey up to 60 s.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The response a client sees.
pub fn into_response(error: ProxyError) -> Response<Body> {
    let (parts, body) = into_parts(error);
    Response::from_parts(parts, full(body))
}

/// How long a refusal that may be waited out asks to wait.
fn wait_out(problem: &dyn crate::vocab::error::Problem) -> Option<Duration> {
    problem
        .may_wait_out()
        .then(|| problem.retry_after().unwrap_or(Duration::from_secs(1)))
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

/// The response as its head and its body's bytes, for those that keep it
/// (a shared call's answer).
pub fn into_parts(error: ProxyError) -> (http::response::Parts, Bytes) {
    let problem = error.problem();
    if let Some((mut parts, body)) = problem.answer() {
        // The upstream's own answer, repeated (a spent quota's breaker).
        parts.extensions.insert(Refused {
            code: problem.code(),
            message: error.to_string().into(),
            wait_out: wait_out(problem),
        });
        return (parts, body);
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
    if problem.is_personal() {
        resp.extensions_mut().insert(Personal);
    }
    resp.extensions_mut().insert(Refused {
        code: problem.code(),
        message: message.into(),
        wait_out: wait_out(problem),
    });
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
