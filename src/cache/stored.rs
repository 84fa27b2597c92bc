//! A complete response as the cache keeps it and a shared call hands it to
//! those who waited: an answer, or penstock's own error for all of them.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Response, StatusCode, header};
use http_body_util::BodyExt;

use crate::state::Answer;
use crate::vocab::body::{Body, full};
use crate::vocab::context::RequestContext;
use crate::vocab::encoding::{self, Encoding, Tail};
use crate::vocab::error::{Problem, ProxyError};
use crate::vocab::headers::{name, remove_where};

/// The most of a response penstock buffers to share it with waiting callers.
pub(super) const MAX_SHARED: usize = 512 * 1024 * 1024;

/// A shared call that ended without an answer to share; its followers are
/// told as the upstream layer tells of a broken connection.
#[derive(Debug, thiserror::Error)]
#[error("the connection to the upstream failed: {0}")]
pub(crate) struct SharedCallFailed(String);

impl SharedCallFailed {
    pub(super) fn too_long(deadline: Duration) -> SharedCallFailed {
        SharedCallFailed(format!(
            "the shared call did not finish within {}",
            humantime::format_duration(deadline)
        ))
    }
}

impl From<&str> for SharedCallFailed {
    fn from(why: &str) -> SharedCallFailed {
        SharedCallFailed(why.to_string())
    }
}

impl Problem for SharedCallFailed {
    fn status(&self) -> StatusCode {
        StatusCode::BAD_GATEWAY
    }

    fn code(&self) -> &'static str {
        "penstock_upstream_connection_error"
    }
}

/// A complete response: kept in the cache, or shared with those who waited.
#[derive(Debug)]
pub(crate) struct Stored {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// penstock's own error instead of an answer: each who waited gets it
    /// as an error, rendered by its own edge. Never shared with other
    /// replicas: it speaks of this one.
    pub(crate) error: Option<ProxyError>,
    /// Made by another replica: found in the shared cache (`hit`) or shared by
    /// its leader (`coalesced`).
    pub(crate) elsewhere: Option<&'static str>,
}

impl Stored {
    pub(super) async fn from_result(result: Result<Response<Body>, ProxyError>) -> Stored {
        let resp = match result {
            Ok(resp) => resp,
            Err(e) => return Stored::from_error(e),
        };
        let (parts, mut body) = resp.into_parts();
        let mut buf = bytes::BytesMut::new();
        let mut first: Option<Bytes> = None;
        while let Some(frame) = body.frame().await {
            let data = match frame {
                Ok(f) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
                Err(e) => return Stored::from_error(SharedCallFailed(e.to_string())),
            };
            if buf.len() + first.as_ref().map_or(0, Bytes::len) + data.len() > MAX_SHARED {
                return Stored::from_error(SharedCallFailed::from(
                    "the response is too large to share",
                ));
            }
            // A body in one frame (the usual case) is kept without a copy.
            match first.take() {
                None if buf.is_empty() => first = Some(data),
                Some(f) => {
                    buf.extend_from_slice(&f);
                    buf.extend_from_slice(&data);
                }
                None => buf.extend_from_slice(&data),
            }
        }
        Stored {
            status: parts.status,
            headers: parts.headers,
            body: first.unwrap_or_else(|| buf.freeze()),
            error: None,
            elsewhere: None,
        }
    }

    /// The leader's own refusal (its deadline, its client cap): not an
    /// answer for those who waited with it; they carry the call on themselves.
    pub(super) fn personal(&self) -> bool {
        self.error.as_ref().is_some_and(ProxyError::is_personal)
    }

    pub(super) fn from_error(e: impl Into<ProxyError>) -> Stored {
        let e = e.into();
        Stored {
            status: e.status(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            error: Some(e),
            elsewhere: None,
        }
    }

    pub(super) fn from_answer(answer: Answer, elsewhere: &'static str) -> Stored {
        Stored {
            status: answer.status,
            headers: answer.headers,
            body: answer.body,
            error: None,
            elsewhere: Some(elsewhere),
        }
    }

    pub(super) fn answer(&self) -> Answer {
        Answer {
            status: self.status,
            headers: self.headers.clone(),
            body: self.body.clone(),
        }
    }

    /// What this response weighs in the cache.
    pub(super) fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        (self.body.len() + headers + 128).min(u32::MAX as usize) as u32
    }

    /// A response for one caller, in a coding it accepts, or the error all
    /// who waited get. Hits and coalesced callers made no attempt and waited
    /// for no budget of their own, and the headers that belonged to the one
    /// call (cookies, the rate-limit state of that moment, its date) are not
    /// theirs. What the cache did is told in the caller's tally.
    pub(super) fn response(
        &self,
        outcome: &'static str,
        ctx: Option<&RequestContext>,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(ctx) = ctx {
            // A caller that waited for another's call made no attempt; what
            // that call's retries gave up on, it gives up on too.
            let gave_up = match &self.error {
                Some(e) => !e.is_refusal(),
                None => !self.status.is_success(),
            };
            ctx.tally.update(|t| {
                t.cache = Some(outcome);
                if outcome != "miss" {
                    t.attempts = Some(0);
                    t.gave_up = gave_up;
                }
            });
        }
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let mut resp = Response::new(full(self.body.clone()));
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.clone();
        let coding = Encoding::of(&self.headers);
        let empty = HeaderMap::new();
        let caller = ctx.map_or(&empty, |c| &c.headers);
        if coding != Some(Encoding::Identity)
            && !coding.is_some_and(|c| encoding::accepts(caller, c))
            && let Some(plain) = encoding::decode_all(coding, &self.body, MAX_SHARED)
        {
            *resp.body_mut() = full(plain);
            resp.headers_mut().remove(header::CONTENT_ENCODING);
            resp.headers_mut().remove(header::CONTENT_LENGTH);
        }
        if outcome != "miss" {
            let h = resp.headers_mut();
            h.remove(name::QUEUE_MS);
            for name in PER_CALL {
                h.remove(name);
            }
            remove_where(h, |k| k.as_str().starts_with("x-ratelimit-"));
        }
        Ok(resp)
    }

    /// The `usage` the answer reported, whatever its coding.
    pub(super) fn usage(&self) -> Option<crate::vocab::usage::Usage> {
        let mut tail = Tail::new(Encoding::of(&self.headers), MAX_SHARED as u64);
        tail.push(&self.body);
        tail.usage()
    }
}

/// Headers that describe one upstream call and are not repeated to callers who
/// did not make it; hyper gives each answer its own `date`.
const PER_CALL: [HeaderName; 3] = [header::SET_COOKIE, header::DATE, header::AGE];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::route::Route;
    use http::HeaderValue;
    use std::io::{Read, Write};

    /// A caller that sends `headers`.
    fn caller(headers: HeaderMap) -> RequestContext {
        let mut ctx = RequestContext::plain(Route::ImagesGenerations, tokio::time::Instant::now());
        ctx.headers = headers;
        ctx
    }

    #[tokio::test]
    async fn an_answer_stored_compressed_reaches_a_caller_without_gzip_decoded() {
        let plain = br#"{"data":[{"b64_json":"AAAA"}],"usage":{"input_tokens":1,"output_tokens":2,"total_tokens":3}}"#;
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(plain).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let stored = Stored {
            status: StatusCode::OK,
            headers,
            body: Bytes::from(z.finish().unwrap()),
            error: None,
            elsewhere: None,
        };
        assert_eq!(stored.usage().map(|u| u.total), Some(3));
        let mut gzip_caller = HeaderMap::new();
        gzip_caller.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        let as_is = stored.response("hit", Some(&caller(gzip_caller))).unwrap();
        assert_eq!(as_is.headers()[header::CONTENT_ENCODING], "gzip");
        let body = as_is.into_body().collect().await.unwrap().to_bytes();
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, plain);
        let decoded = stored
            .response("hit", Some(&caller(HeaderMap::new())))
            .unwrap();
        assert!(!decoded.headers().contains_key(header::CONTENT_ENCODING));
        let body = decoded.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], plain);
    }
}
