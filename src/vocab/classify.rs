//! What an upstream answer means, decided once: the budget pauses on it, the retry
//! policy retries on it, metrics count it. Also the parsers for the headers the
//! upstream uses to say when to come back (`retry-after*`, `x-ratelimit-*`).

use std::time::Duration;

use http::{HeaderMap, Response, StatusCode};

use crate::vocab::body::Body;
use crate::vocab::error::ProxyError;
use crate::vocab::headers::retry_after;

/// The meaning of one upstream attempt's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Success,
    /// A transient rate limit (`rate_limit_exceeded`, `slow_down`, ...): retry after
    /// the upstream's delay, and hold the whole pool meanwhile.
    RateLimited,
    /// The money is gone (`insufficient_quota`, spend limits, billing hard limit):
    /// never retry.
    QuotaExhausted,
    /// 408, 500, 502, 503, 504, a dropped connection or a timed-out attempt.
    Transient,
    /// Any other 4xx: the caller's mistake.
    ClientError,
    /// Anything else (1xx/3xx, unusual 5xx): passed on as it is.
    Other,
}

impl Class {
    pub(crate) fn is_retryable(self) -> bool {
        matches!(self, Class::RateLimited | Class::Transient)
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Class::Success => "success",
            Class::RateLimited => "rate_limited",
            Class::QuotaExhausted => "quota_exhausted",
            Class::Transient => "transient",
            Class::ClientError => "client_error",
            Class::Other => "other",
        }
    }
}

/// The classification of an upstream answer, kept in its extensions so later
/// layers do not read the body again; a success carries none (see [`of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Classified {
    pub(crate) class: Class,
    /// `retry-after-ms` or `retry-after`, when the upstream sent one.
    pub(crate) retry_after: Option<Duration>,
}

/// The outcome of one attempt as the stack sees it: an upstream answer carries its
/// classification; penstock's own failures to reach the upstream are transient,
/// its refusals final. Retries decide on it, metrics count it.
pub(crate) fn attempt(result: &Result<Response<Body>, ProxyError>) -> Classified {
    let class = match result {
        Ok(resp) => {
            return of(resp).unwrap_or(Classified {
                class: Class::Other,
                retry_after: None,
            });
        }
        Err(e) if e.unanswered().is_some() => Class::Transient,
        Err(_) => Class::Other,
    };
    Classified {
        class,
        retry_after: None,
    }
}

/// An upstream answer's classification: the one in its extensions, else, for
/// a success, [`Class::Success`] (the upstream layer attaches nothing to a
/// success, sparing every answer's extensions their allocations).
pub(crate) fn of(resp: &Response<Body>) -> Option<Classified> {
    resp.extensions().get::<Classified>().copied().or_else(|| {
        resp.status().is_success().then_some(Classified {
            class: Class::Success,
            retry_after: None,
        })
    })
}

/// The metrics label of an attempt's outcome: the class of an answer, or what
/// kept penstock from getting one.
pub(crate) fn attempt_label(result: &Result<Response<Body>, ProxyError>) -> &'static str {
    match result {
        Ok(_) => attempt(result).class.label(),
        Err(e) => e.unanswered().unwrap_or("connection_error"),
    }
}

/// Codes that mean the account cannot pay; retrying them only burns attempts.
const MONEY_GONE: [&str; 4] = [
    "insufficient_quota",
    "credit_balance_exhausted",
    "billing_hard_limit_reached",
    "organization_usage_limit_exceeded",
];

fn money_gone(code: &str) -> bool {
    MONEY_GONE.contains(&code) || code.ends_with("_spend_limit_exceeded")
}

/// Classifies a response from its status, headers and (for errors) its body.
pub(crate) fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Classified {
    // Nothing waits after a success: its `retry-after`, if any, is not read.
    if status.is_success() {
        return Classified {
            class: Class::Success,
            retry_after: None,
        };
    }
    let (code, kind) = error_code(body);
    let code = code.as_deref().unwrap_or("");
    let kind = kind.as_deref().unwrap_or("");
    let class = if money_gone(code) || money_gone(kind) {
        Class::QuotaExhausted
    } else {
        match status.as_u16() {
            429 => Class::RateLimited,
            408 | 500 | 502 | 503 | 504 => Class::Transient,
            400..=499 => Class::ClientError,
            _ => Class::Other,
        }
    };
    Classified {
        class,
        retry_after: retry_after(headers),
    }
}

/// `error.code` and `error.type` of an OpenAI error body, if it is one.
fn error_code(body: &[u8]) -> (Option<String>, Option<String>) {
    #[derive(serde::Deserialize)]
    struct Envelope {
        error: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        #[serde(default)]
        code: Option<serde_json::Value>,
        #[serde(default, rename = "type")]
        kind: Option<String>,
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(e) => (
            e.error.code.and_then(|c| c.as_str().map(str::to_string)),
            e.error.kind,
        ),
        Err(_) => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_success_is_one_by_its_status_others_by_what_they_carry() {
        let answer = |status: u16| {
            let mut resp = Response::new(crate::vocab::body::full(""));
            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
            resp
        };
        assert_eq!(of(&answer(200)).map(|c| c.class), Some(Class::Success));
        assert_eq!(of(&answer(404)), None);
        let mut limited = answer(429);
        let c = classify(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), b"{}");
        limited.extensions_mut().insert(c);
        assert_eq!(of(&limited), Some(c));
        assert_eq!(attempt(&Ok(answer(404))).class, Class::Other);
    }

    fn body(code: &str, kind: &str) -> Vec<u8> {
        format!(r#"{{"error":{{"message":"m","type":"{kind}","param":null,"code":"{code}"}}}}"#)
            .into_bytes()
    }

    #[test]
    fn rate_limits_are_retryable_and_money_errors_never() {
        let h = HeaderMap::new();
        let c = |status: u16, code: &str, kind: &str| {
            classify(StatusCode::from_u16(status).unwrap(), &h, &body(code, kind)).class
        };
        assert_eq!(
            c(429, "rate_limit_exceeded", "requests"),
            Class::RateLimited
        );
        assert_eq!(c(429, "slow_down", "rate_limit_error"), Class::RateLimited);
        assert_eq!(
            c(429, "insufficient_quota", "insufficient_quota"),
            Class::QuotaExhausted
        );
        assert_eq!(c(429, "", "insufficient_quota"), Class::QuotaExhausted);
        assert_eq!(
            c(429, "monthly_spend_limit_exceeded", "x"),
            Class::QuotaExhausted
        );
        assert_eq!(
            c(400, "billing_hard_limit_reached", "x"),
            Class::QuotaExhausted
        );
        assert_eq!(
            c(503, "server_is_overloaded", "server_error"),
            Class::Transient
        );
        assert_eq!(c(408, "", ""), Class::Transient);
        assert_eq!(
            c(400, "invalid_value", "invalid_request_error"),
            Class::ClientError
        );
        assert_eq!(c(200, "", ""), Class::Success);
        assert!(Class::Transient.is_retryable() && !Class::QuotaExhausted.is_retryable());
        // A 429 whose body is not JSON is still a rate limit.
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &h, b"slow down").class,
            Class::RateLimited
        );
    }
}
