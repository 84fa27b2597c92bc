//! The one response body type. Responses come from several places (the upstream's
//! stream, penstock's own errors, later the cache), so the body is boxed: one
//! allocation per response, small next to the response itself.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type Body = BoxBody<Bytes, BoxError>;

/// A complete body from bytes already in memory.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}
