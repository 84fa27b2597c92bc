//! What an upstream answer means, decided once: the budget pauses on it, the retry
//! policy retries on it, metrics count it. Also the parsers for the headers the
//! upstream uses to say when to come back (`retry-after*`, `x-ratelimit-*`).

use std::time::Duration;

use http::{HeaderMap, Response, StatusCode};

use crate::body::Body;
use crate::error::ProxyError;

/// The meaning of one upstream attempt's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
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
    pub fn is_retryable(self) -> bool {
        matches!(self, Class::RateLimited | Class::Transient)
    }

    pub fn label(self) -> &'static str {
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

/// The classification of a response, kept in its extensions so later layers do
/// not read the body again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    pub class: Class,
    /// `retry-after-ms` or `retry-after`, when the upstream sent one.
    pub retry_after: Option<Duration>,
}

/// The outcome of one attempt as the stack sees it: an upstream answer carries its
/// classification; penstock's own failures to reach the upstream are transient,
/// its refusals final. Retries decide on it, metrics count it.
pub fn attempt(result: &Result<Response<Body>, ProxyError>) -> Classified {
    let class = match result {
        Ok(resp) => {
            return resp
                .extensions()
                .get::<Classified>()
                .copied()
                .unwrap_or(Classified {
                    class: Class::Other,
                    retry_after: None,
                });
        }
        Err(
            ProxyError::UpstreamUnreachable(_)
            | ProxyError::UpstreamConnection(_)
            | ProxyError::UpstreamTimeout(_),
        ) => Class::Transient,
        Err(_) => Class::Other,
    };
    Classified {
        class,
        retry_after: None,
    }
}

/// The metrics label of an attempt's outcome: the class of an answer, or what
/// kept penstock from getting one.
pub fn attempt_label(result: &Result<Response<Body>, ProxyError>) -> &'static str {
    match result {
        Ok(_) => attempt(result).class.label(),
        Err(ProxyError::UpstreamTimeout(_)) => "timeout",
        Err(ProxyError::UpstreamUnreachable(_)) => "unreachable",
        Err(_) => "connection_error",
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
pub fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Classified {
    let retry_after = retry_after(headers);
    let class = if status.is_success() {
        Class::Success
    } else {
        let (code, kind) = error_code(body);
        let code = code.as_deref().unwrap_or("");
        let kind = kind.as_deref().unwrap_or("");
        if money_gone(code) || money_gone(kind) {
            Class::QuotaExhausted
        } else {
            match status.as_u16() {
                429 => Class::RateLimited,
                408 | 500 | 502 | 503 | 504 => Class::Transient,
                400..=499 => Class::ClientError,
                _ => Class::Other,
            }
        }
    };
    Classified { class, retry_after }
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

/// `retry-after-ms`, else `retry-after` as seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let ms = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok());
    if let Some(ms) = ms.filter(|ms| ms.is_finite() && *ms >= 0.0) {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let v = get("retry-after")?;
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = httpdate_parse(v)?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn httpdate_parse(v: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(v).ok().or_else(|| {
        // IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT"
        let mut it = v.split_whitespace().skip(1);
        let day: u64 = it.next()?.parse().ok()?;
        let month = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ]
        .iter()
        .position(|m| Some(*m) == it.clone().next())?
            + 1;
        it.next();
        let year: u64 = it.next()?.parse().ok()?;
        let time = it.next()?;
        humantime::parse_rfc3339_weak(&format!("{year:04}-{month:02}-{day:02} {time}")).ok()
    })
}

/// A Go-style duration as OpenAI sends in `x-ratelimit-reset-*`: `20ms`, `1s`,
/// `6m0s`, `16m17.764s`, `1h2m`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" | "" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += value * unit;
    }
    Some(Duration::from_secs_f64(total))
}

/// One dimension of `x-ratelimit-*`: what remains, and when it is full again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Remaining {
    pub remaining: u64,
    pub reset: Duration,
}

/// `x-ratelimit-remaining-{requests,tokens,images}` with their resets. Missing,
/// negative ("unknown") or unparsable values are left out.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateLimitHeaders {
    pub requests: Option<Remaining>,
    pub tokens: Option<Remaining>,
    pub images: Option<Remaining>,
}

impl RateLimitHeaders {
    pub fn parse(headers: &HeaderMap) -> RateLimitHeaders {
        let dim = |name: &str| {
            let get = |prefix: &str| {
                headers
                    .get(format!("x-ratelimit-{prefix}-{name}"))
                    .and_then(|v| v.to_str().ok())
            };
            let remaining = get("remaining")?.trim().parse::<i64>().ok()?;
            let reset = parse_go_duration(get("reset")?)?;
            (remaining >= 0).then_some(Remaining {
                remaining: remaining as u64,
                reset,
            })
        };
        RateLimitHeaders {
            requests: dim("requests"),
            tokens: dim("tokens"),
            images: dim("images"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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

    #[test]
    fn retry_after_prefers_milliseconds() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert_eq!(
            retry_after(&h),
            Some(Duration::ZERO),
            "a past date means now"
        );
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn go_durations_parse() {
        let d = |s| parse_go_duration(s);
        assert_eq!(d("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(d("1s"), Some(Duration::from_secs(1)));
        assert_eq!(d("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(d("16m17.764s"), Some(Duration::from_millis(977_764)));
        assert_eq!(d("1h2m"), Some(Duration::from_secs(3720)));
        assert_eq!(d("0"), Some(Duration::ZERO));
        assert_eq!(d("soon"), None);
        assert_eq!(d(""), None);
    }

    #[test]
    fn rate_limit_headers_skip_unknown_values() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("7"),
        );
        h.insert(
            "x-ratelimit-reset-requests",
            HeaderValue::from_static("850ms"),
        );
        h.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("-1"),
        );
        h.insert("x-ratelimit-reset-tokens", HeaderValue::from_static("1s"));
        let r = RateLimitHeaders::parse(&h);
        assert_eq!(
            r.requests,
            Some(Remaining {
                remaining: 7,
                reset: Duration::from_millis(850)
            })
        );
        assert_eq!(r.tokens, None);
        assert_eq!(r.images, None);
    }
}
