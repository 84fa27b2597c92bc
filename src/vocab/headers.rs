//! What the upstream's headers say about when to come back: `retry-after-ms`,
//! `retry-after` (seconds or a date) and `x-ratelimit-*` (Go-style durations).

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

/// Header names penstock reads or writes on every request, made once: a name
/// given as text is parsed and hashed again on each lookup.
pub mod name {
    use http::HeaderName;

    pub(crate) const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
    pub(crate) const API_KEY: HeaderName = HeaderName::from_static("api-key");
    pub(crate) const OPENAI_ORGANIZATION: HeaderName =
        HeaderName::from_static("openai-organization");
    pub(crate) const OPENAI_PROJECT: HeaderName = HeaderName::from_static("openai-project");
    pub(crate) const SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
    pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-penstock-request-id");
    pub(crate) const QUEUE_MS: HeaderName = HeaderName::from_static("x-penstock-queue-ms");
    pub(crate) const ATTEMPTS: HeaderName = HeaderName::from_static("x-penstock-attempts");
    pub(crate) const CACHE: HeaderName = HeaderName::from_static("x-penstock-cache");
    pub(crate) const CIRCUIT: HeaderName = HeaderName::from_static("x-penstock-circuit");
    pub(crate) const MAX_WAIT_MS: HeaderName = HeaderName::from_static("x-penstock-max-wait-ms");
    pub(crate) const FALLBACK: HeaderName = HeaderName::from_static("x-penstock-fallback");
    pub(crate) const MODEL: HeaderName = HeaderName::from_static("x-penstock-model");
    pub(crate) const UPSTREAM: HeaderName = HeaderName::from_static("x-penstock-upstream");
    pub(crate) const PRIORITY: HeaderName = HeaderName::from_static("x-penstock-priority");
    pub(crate) const STAINLESS_TIMEOUT: HeaderName = HeaderName::from_static("x-stainless-timeout");
    pub(crate) const UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    pub(crate) const PREFER: HeaderName = HeaderName::from_static("prefer");
}

/// The longest delay penstock takes from a number it was sent: a day. Beyond
/// it a client's or an upstream's figure means "a long time", and arithmetic
/// on instants stays far from overflowing.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(24 * 3600);

/// Removes every header whose name `doomed` picks: the names are found in one
/// pass, and only those present are looked up to be removed.
pub(crate) fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    // Most maps hold one such name at most (an answer's `connection`): found
    // in one pass, removed without another search.
    let mut found = headers.keys().filter(|k| doomed(k));
    let (first, more) = (found.next().cloned(), found.next().is_some());
    let Some(first) = first else {
        return;
    };
    headers.remove(first);
    // Otherwise found and removed one at a time: there are few, and no list is made.
    while more && let Some(name) = headers.keys().find(|k| doomed(k)).cloned() {
        headers.remove(name);
    }
}

/// The first value of each of `names` in `headers`, found in one walk over
/// the headers. A hashed lookup hashes a custom name byte by byte; a request's
/// few headers are compared faster, most of them standard names that differ
/// from a custom one at the first test.
pub(crate) fn first_of<'a, const N: usize>(
    headers: &'a HeaderMap,
    names: [&HeaderName; N],
) -> [Option<&'a HeaderValue>; N] {
    let mut found = [None; N];
    for (k, v) in headers {
        for (name, slot) in names.iter().zip(found.iter_mut()) {
            if slot.is_none() && k == *name {
                *slot = Some(v);
            }
        }
    }
    found
}

/// A number as a header value. The small ones penstock sends on most answers
/// (no wait, one attempt) are static text: nothing allocated.
pub(crate) fn number(n: u64) -> HeaderValue {
    const SMALL: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match usize::try_from(n).ok().and_then(|i| SMALL.get(i)) {
        Some(text) => HeaderValue::from_static(text),
        None => HeaderValue::from(n),
    }
}

/// Seconds as a duration: `None` for NaN or negative, at most [`MAX_DELAY`].
pub(crate) fn seconds(secs: f64) -> Option<Duration> {
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).map_or(MAX_DELAY, |d| d.min(MAX_DELAY)))
}

/// `retry-after-ms`, else `retry-after` as seconds or an HTTP date.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let get = |name: HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let ms = get(name::RETRY_AFTER_MS).and_then(|v| v.parse::<f64>().ok());
    if let Some(ms) = ms.filter(|ms| ms.is_finite() && *ms >= 0.0) {
        return seconds(ms / 1000.0);
    }
    let v = get(http::header::RETRY_AFTER)?;
    if let Ok(secs) = v.parse::<f64>() {
        return seconds(secs);
    }
    let at = httpdate_parse(v)?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(MAX_DELAY),
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
pub(crate) fn parse_go_duration(s: &str) -> Option<Duration> {
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
    seconds(total)
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
    /// `x-ratelimit-limit-{requests,tokens,images}`: the per-minute limits
    /// the upstream announces.
    pub limits: [Option<u64>; 3],
}

impl RateLimitHeaders {
    /// When what the upstream says is used up (nothing remaining) is back:
    /// the latest reset among such dimensions.
    pub(crate) fn exhausted_until(&self) -> Option<Duration> {
        [self.requests, self.tokens, self.images]
            .into_iter()
            .flatten()
            .filter(|r| r.remaining == 0)
            .map(|r| r.reset)
            .max()
    }

    /// One pass over the answer's headers: names are compared, never hashed,
    /// and an answer without rate-limit headers costs a prefix test per name.
    /// A name sent twice counts by its first value.
    pub(crate) fn parse(headers: &HeaderMap) -> RateLimitHeaders {
        // [dimension][remaining, reset, limit]
        let mut found: [[Option<&str>; 3]; 3] = Default::default();
        for (name, value) in headers {
            let Some(rest) = name.as_str().strip_prefix("x-ratelimit-") else {
                continue;
            };
            let Some((what, dim)) = rest.split_once('-') else {
                continue;
            };
            let what = match what {
                "remaining" => 0,
                "reset" => 1,
                "limit" => 2,
                _ => continue,
            };
            let dim = match dim {
                "requests" => 0,
                "tokens" => 1,
                "images" => 2,
                _ => continue,
            };
            let slot = &mut found[dim][what];
            if slot.is_none() {
                *slot = Some(value.to_str().unwrap_or(""));
            }
        }
        let dim = |[remaining, reset, _]: [Option<&str>; 3]| {
            let remaining = remaining?.trim().parse::<i64>().ok()?;
            let reset = parse_go_duration(reset?)?;
            (remaining >= 0).then_some(Remaining {
                remaining: remaining as u64,
                reset,
            })
        };
        let limit = |[_, _, limit]: [Option<&str>; 3]| limit?.trim().parse::<u64>().ok();
        RateLimitHeaders {
            requests: dim(found[0]),
            tokens: dim(found[1]),
            images: dim(found[2]),
            limits: [limit(found[0]), limit(found[1]), limit(found[2])],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn numbers_are_their_decimal_text_small_or_large() {
        for n in [0u64, 1, 9, 10, 99, 12_345, u64::MAX] {
            assert_eq!(number(n).to_str().unwrap(), n.to_string());
        }
    }

    #[test]
    fn first_of_finds_each_names_first_value_as_get_does() {
        let mut h = HeaderMap::new();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("a/b"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        h.append("x-b", HeaderValue::from_static("3"));
        let (a, b, c) = (
            HeaderName::from_static("x-a"),
            HeaderName::from_static("x-b"),
            HeaderName::from_static("x-c"),
        );
        let found = first_of(&h, [&a, &b, &c, &http::header::CONTENT_TYPE]);
        assert_eq!(
            found,
            [
                h.get(&a),
                h.get(&b),
                None,
                h.get(http::header::CONTENT_TYPE)
            ]
        );
        assert_eq!(found[0].map(|v| v.as_bytes()), Some(&b"1"[..]));
        assert_eq!(first_of(&HeaderMap::new(), [&a]), [None]);
    }

    #[test]
    fn remove_where_removes_every_matching_name_and_its_values() {
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        h.append("x-b", HeaderValue::from_static("3"));
        h.append("y", HeaderValue::from_static("4"));
        remove_where(&mut h, |k| k.as_str().starts_with("x-"));
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("y"));
        // One name (all its values), or none.
        h.append("x-c", HeaderValue::from_static("5"));
        h.append("x-c", HeaderValue::from_static("6"));
        remove_where(&mut h, |k| k.as_str().starts_with("x-"));
        assert_eq!(h.keys().collect::<Vec<_>>(), ["y"]);
        assert_eq!(h.len(), 1);
        remove_where(&mut h, |k| k.as_str().starts_with("x-"));
        assert_eq!(h.len(), 1);
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
        // Numbers no duration holds are a long time, never a panic.
        h.insert("retry-after-ms", HeaderValue::from_static("1e30"));
        assert_eq!(retry_after(&h), Some(MAX_DELAY));
        h.insert("retry-after-ms", HeaderValue::from_static("NaN"));
        h.insert("retry-after", HeaderValue::from_static("inf"));
        assert_eq!(retry_after(&h), Some(MAX_DELAY));
        assert_eq!(parse_go_duration("99999999999999999999h"), Some(MAX_DELAY));
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
