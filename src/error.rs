//! penstock's own errors and the one place they become responses. Every error a
//! client sees from penstock is OpenAI-shaped JSON whose `code` starts with
//! `penstock_`, so it can be told apart from an error OpenAI sent.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

use crate::body::{Body, full};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("the request body could not be read: {0}")]
    BodyRead(String),
    #[error("{message}")]
    InvalidRequest {
        message: String,
        code: &'static str,
        param: Option<&'static str>,
    },
    #[error("the upstream could not be reached: {0}")]
    UpstreamUnreachable(String),
    #[error("the connection to the upstream failed: {0}")]
    UpstreamConnection(String),
    #[error("the upstream did not answer within {}", humantime::format_duration(*.0))]
    UpstreamTimeout(Duration),
    #[error(transparent)]
    Refused(#[from] crate::budget::Refusal),
    #[error(transparent)]
    ClientLimited(#[from] crate::client_limit::OverLimit),
}

/// The most `retry-after-ms` penstock sends: both official SDKs obey up to 60 s.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyRead(_) | ProxyError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ProxyError::UpstreamUnreachable(_) | ProxyError::UpstreamConnection(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Refused(_) | ProxyError::ClientLimited(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The `code` field: always `penstock_*`.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BodyTooLarge { .. } => "penstock_body_too_large",
            ProxyError::BodyRead(_) => "penstock_body_unreadable",
            ProxyError::InvalidRequest { code, .. } => code,
            ProxyError::UpstreamUnreachable(_) => "penstock_upstream_unreachable",
            ProxyError::UpstreamConnection(_) => "penstock_upstream_connection_error",
            ProxyError::UpstreamTimeout(_) => "penstock_upstream_timeout",
            ProxyError::Refused(r) => r.code(),
            ProxyError::ClientLimited(_) => "penstock_client_rate_limited",
        }
    }

    fn kind(&self) -> &'static str {
        if self.retry_after().is_some() {
            "rate_limit_error"
        } else if self.status().is_client_error() {
            "invalid_request_error"
        } else {
            "penstock_error"
        }
    }

    /// For penstock's own 429s: when trying again has a chance.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::Refused(r) => Some(r.retry_after()),
            ProxyError::ClientLimited(l) => Some(l.retry_after),
            _ => None,
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            ProxyError::InvalidRequest { param, .. } => *param,
            _ => None,
        }
    }

    /// The response a client sees.
    pub fn into_response(self) -> Response<Body> {
        let (parts, body) = self.into_parts();
        Response::from_parts(parts, full(body))
    }

    /// The response as its head and its body's bytes, for those that keep it
    /// (a shared call's answer).
    pub fn into_parts(self) -> (http::response::Parts, Bytes) {
        if let ProxyError::Refused(crate::budget::Refusal::CircuitOpen(tripped)) = &self {
            return tripped.parts();
        }
        let status = self.status();
        let body = json!({"error": {
            "message": self.to_string(),
            "type": self.kind(),
            "param": self.param(),
            "code": self.code(),
        }});
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(wait) = self.retry_after() {
            // Capacity returns at a known time: say when, within what SDKs obey.
            let wait = wait.clamp(Duration::from_millis(1), MAX_RETRY_AFTER);
            h.insert("retry-after-ms", HeaderValue::from(wait.as_millis() as u64));
            h.insert(
                "retry-after",
                HeaderValue::from(wait.as_secs_f64().ceil() as u64),
            );
            h.insert("x-should-retry", HeaderValue::from_static("true"));
        } else if status.is_client_error() {
            // A client-side mistake will not get better by sending it again.
            h.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        (resp.into_parts().0, Bytes::from(body.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn errors_are_openai_shaped_and_name_penstock() {
        let resp = ProxyError::UpstreamTimeout(Duration::from_secs(300)).into_response();
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
