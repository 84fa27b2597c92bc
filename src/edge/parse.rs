//! The edge's reading of a request body: JSON parsed once, multipart walked once
//! (text fields, image sizes, a digest of every part), the canonical hash of a
//! body's meaning that cache keys are made of, and what is wrong with a request
//! that cannot be taken as it came.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderMap, header};

use crate::edge::estimate::{self, InputImage, MultipartSummary};
use crate::vocab::error::Problem;
use crate::vocab::json::Json;
use crate::vocab::route::Route;

/// A request penstock cannot take as it came.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("the request body could not be read: {0}")]
    BodyRead(String),
    #[error("the request body sent nothing for {}", humantime::format_duration(*.0))]
    BodyStalled(std::time::Duration),
    #[error("{0} is not forwarded")]
    MethodNotAllowed(http::Method),
    #[error("penstock holds as many request bodies as it may ({limit} bytes); try again shortly")]
    Overloaded { limit: u64 },
    #[error("{message}")]
    Invalid {
        message: String,
        code: &'static str,
        param: Option<&'static str>,
    },
}

impl Problem for RequestError {
    fn status(&self) -> http::StatusCode {
        match self {
            RequestError::BodyTooLarge { .. } => http::StatusCode::PAYLOAD_TOO_LARGE,
            RequestError::BodyRead(_) | RequestError::Invalid { .. } => {
                http::StatusCode::BAD_REQUEST
            }
            RequestError::BodyStalled(_) => http::StatusCode::REQUEST_TIMEOUT,
            RequestError::MethodNotAllowed(_) => http::StatusCode::METHOD_NOT_ALLOWED,
            RequestError::Overloaded { .. } => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            RequestError::BodyTooLarge { .. } => "penstock_body_too_large",
            RequestError::BodyRead(_) => "penstock_body_unreadable",
            RequestError::BodyStalled(_) => "penstock_body_timeout",
            RequestError::MethodNotAllowed(_) => "penstock_method_not_allowed",
            RequestError::Overloaded { .. } => "penstock_overloaded",
            RequestError::Invalid { code, .. } => code,
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            RequestError::Invalid { param, .. } => *param,
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<std::time::Duration> {
        // Bodies leave memory as their requests end: soon worth another try.
        matches!(self, RequestError::Overloaded { .. }).then(|| std::time::Duration::from_secs(1))
    }
}

/// Hashes a JSON value by meaning: object keys sorted, whitespace gone, a key
/// sent twice counted by its last value (as it is read).
pub fn hash_json(h: &mut blake3::Hasher, v: &Json<'_>) {
    match v {
        Json::Null => {
            h.update(b"n");
        }
        Json::Bool(b) => {
            h.update(if *b { b"t" } else { b"f" });
        }
        Json::Number(n) => {
            h.update(b"#");
            h.update(n.to_string().as_bytes());
            h.update(b";");
        }
        Json::String(s) => {
            h.update(b"s");
            h.update(&(s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        Json::Array(a) => {
            h.update(b"[");
            h.update(&(a.len() as u64).to_le_bytes());
            for x in a {
                hash_json(h, x);
            }
        }
        Json::Object(o) => {
            // Last sent first, sorted stably by key: of equal keys, the first
            // kept is the last sent.
            let mut entries: Vec<_> = o.iter().rev().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            entries.dedup_by(|later, kept| later.0 == kept.0);
            h.update(b"{");
            h.update(&(entries.len() as u64).to_le_bytes());
            for (k, x) in entries {
                h.update(&(k.len() as u64).to_le_bytes());
                h.update(k.as_bytes());
                hash_json(h, x);
            }
        }
    }
}

/// A body as penstock understood it; dropped once the context is built. Its
/// JSON borrows the body's bytes.
pub(crate) enum Parsed<'a> {
    Json(Json<'a>),
    Multipart(MultipartSummary),
    None,
}

impl<'a> Parsed<'a> {
    pub(crate) fn view(&self) -> estimate::Body<'_> {
        match self {
            Parsed::Json(v) => estimate::Body::Json(v),
            Parsed::Multipart(m) => estimate::Body::Multipart(m),
            Parsed::None => estimate::Body::None,
        }
    }

    pub(crate) fn model(&self) -> Option<&str> {
        match self {
            Parsed::Json(v) => v.get("model").and_then(Json::as_str),
            Parsed::Multipart(m) => m.fields.get("model").map(|s| s.trim()),
            Parsed::None => None,
        }
    }

    pub(crate) fn stream(&self) -> bool {
        match self {
            Parsed::Json(v) => v.get("stream").and_then(Json::as_bool).unwrap_or(false),
            Parsed::Multipart(m) => m.fields.get("stream").is_some_and(|s| s.trim() == "true"),
            Parsed::None => false,
        }
    }
}

fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Parses the body once. Malformed JSON, or malformed multipart on an image
/// route, is refused here rather than spent upstream.
pub(crate) async fn parse_body<'a>(
    route: Route,
    headers: &HeaderMap,
    body: &'a Bytes,
) -> Result<Parsed<'a>, RequestError> {
    let ct = content_type(headers);
    let mime = ct.split(';').next().unwrap_or("").trim();
    if body.is_empty() {
        return Ok(Parsed::None);
    }
    if mime.eq_ignore_ascii_case("application/json") {
        return json(body)
            .map(Parsed::Json)
            .map_err(|e| RequestError::Invalid {
                message: format!("the request body is not valid JSON: {e}"),
                code: "penstock_invalid_json",
                param: None,
            });
    }
    if mime.eq_ignore_ascii_case("multipart/form-data") && route.is_image() {
        // Boxed: the multipart parser's state is kilobytes, and without the
        // box every request's future would have room for it (and be copied
        // whole into its own box).
        return Box::pin(multipart_summary(ct, body))
            .await
            .map(Parsed::Multipart)
            .map_err(|e| RequestError::Invalid {
                message: format!("the request body is not valid multipart/form-data: {e}"),
                code: "penstock_invalid_multipart",
                param: None,
            });
    }
    // JSON sent under another content type still spends the same limits; what
    // does not parse is passed on as it is.
    if !mime.to_ascii_lowercase().starts_with("multipart/")
        && body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && let Ok(v) = json(body)
    {
        return Ok(Parsed::Json(v));
    }
    Ok(Parsed::None)
}

/// A JSON body as [`parse_body`] reads it, for a second reading elsewhere.
pub(crate) fn json_of(body: &[u8]) -> Option<Json<'_>> {
    json(body).ok()
}

/// A JSON body, its text checked as UTF-8 once: parsed from a slice,
/// `serde_json` checks every string again.
fn json(body: &[u8]) -> Result<Json<'_>, String> {
    let text = std::str::from_utf8(body)
        .map_err(|e| format!("it is not UTF-8 (at byte {})", e.valid_up_to()))?;
    serde_json::from_str::<Json>(text).map_err(|e| e.to_string())
}

/// How much of an image file is kept to read its size (JPEG may put EXIF first).
const IMAGE_HEAD: usize = 256 * 1024;

/// Text fields and image sizes of a multipart body. Walking every part also
/// checks the framing.
pub(crate) async fn multipart_summary(
    content_type: &str,
    body: &Bytes,
) -> Result<MultipartSummary, multer::Error> {
    let boundary = multer::parse_boundary(content_type)?;
    let chunk = body.clone();
    let stream = futures_util::stream::once(async move { Ok::<_, Infallible>(chunk) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut summary = MultipartSummary::default();
    // (name, content hash) of every part; sorted by name below (stable, so the
    // order of repeated names like `image[]` still counts).
    let mut parts: Vec<(String, blake3::Hash)> = Vec::new();
    while let Some(mut field) = multipart.next_field().await? {
        let name = field.name().unwrap_or("").to_string();
        if field.file_name().is_some() || name.starts_with("image") || name == "mask" {
            // Streamed chunk by chunk: a file is hashed where it lies, and only its
            // head (where formats keep their size) is kept.
            let mut hash = blake3::Hasher::new();
            let mut head = Vec::new();
            while let Some(chunk) = field.chunk().await? {
                hash.update(&chunk);
                let room = IMAGE_HEAD.saturating_sub(head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..room]);
            }
            parts.push((name.clone(), hash.finalize()));
            if name == "image" || name == "image[]" {
                let size = imagesize::blob_size(&head)
                    .ok()
                    .map(|s| (s.width as u32, s.height as u32));
                summary.images.push(InputImage { size });
            }
        } else {
            let text = field.text().await?;
            parts.push((name.clone(), blake3::hash(text.as_bytes())));
            summary.fields.insert(name, text);
        }
    }
    parts.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = blake3::Hasher::new();
    for (name, hash) in &parts {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(hash.as_bytes());
    }
    summary.digest = h.finalize().into();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[tokio::test]
    async fn multipart_digests_ignore_the_boundary_and_field_order() {
        let body = |boundary: &str, swap: bool| {
            let prompt = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nblue\r\n"
            );
            let image = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\nPNGDATA\r\n"
            );
            let (a, b) = if swap {
                (image, prompt)
            } else {
                (prompt, image)
            };
            Bytes::from(format!("{a}{b}--{boundary}--\r\n"))
        };
        let summary = |boundary: &str, swap| {
            let ct = format!("multipart/form-data; boundary={boundary}");
            let b = body(boundary, swap);
            async move { multipart_summary(&ct, &b).await.unwrap().digest }
        };
        assert_eq!(summary("aaa", false).await, summary("zzz", true).await);
    }

    #[tokio::test]
    async fn json_is_parsed_once_and_bad_json_refused() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let body = Bytes::from_static(br#"{"prompt":"x","stream":true,"model":"gpt-image-1"}"#);
        let p = parse_body(Route::ImagesGenerations, &h, &body)
            .await
            .unwrap();
        assert_eq!(p.model(), Some("gpt-image-1"));
        assert!(p.stream());
        // Valid JSON of another shape passes on.
        let array = Bytes::from_static(b"[1,2]");
        let p = parse_body(Route::Other, &h, &array).await.unwrap();
        assert!(p.model().is_none());
        let e = parse_body(Route::Other, &h, &Bytes::from_static(b"{\"model\":"))
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), "penstock_invalid_json");
    }

    #[tokio::test]
    async fn multipart_fields_and_image_sizes_are_read_and_broken_framing_refused() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=XyZ"),
        );
        // A PNG header declaring 640x480.
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend_from_slice(&640u32.to_be_bytes());
        png.extend_from_slice(&480u32.to_be_bytes());
        png.extend_from_slice(&[8, 6, 0, 0, 0]);
        let mut body = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-image-1\r\n--XyZ\r\nContent-Disposition: form-data; name=\"image[]\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n".to_vec();
        body.extend_from_slice(&png);
        body.extend_from_slice(b"\r\n--XyZ--\r\n");
        let body = Bytes::from(body);
        let p = parse_body(Route::ImagesEdits, &h, &body).await.unwrap();
        assert_eq!(p.model(), Some("gpt-image-1"));
        let Parsed::Multipart(m) = p else {
            panic!("multipart")
        };
        assert_eq!(
            m.images,
            vec![InputImage {
                size: Some((640, 480))
            }]
        );
        let broken = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt",
        );
        let e = parse_body(Route::ImagesEdits, &h, &broken)
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), "penstock_invalid_multipart");
    }
}
