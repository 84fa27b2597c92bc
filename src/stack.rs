//! The one place the layer order lives. Reading [`build`] top to bottom is reading
//! a request's path through penstock.

use bytes::Bytes;
use http::{Request, Response};
use tower::ServiceBuilder;

use crate::body::{Body, BoxError};
use crate::config::Config;
use crate::request;
use crate::upstream::{self, Upstream};

/// Builds the proxy service; `env` reads environment variables (the sidecar key).
pub fn build<B>(
    config: &Config,
    env: impl Fn(&str) -> Option<String>,
) -> Result<
    impl tower::Service<
        Request<B>,
        Response = Response<Body>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send
    + 'static,
    upstream::BuildError,
>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let upstream = Upstream::new(&config.upstream, env)?;
    Ok(ServiceBuilder::new()
        // Edge: body limit and one buffered copy, the parsed context, errors turned
        // into OpenAI-shaped responses, and the log line; outermost so it sees all.
        .layer(request::Layer::new(config.server.max_body_size.as_u64()))
        // One attempt upstream, bounded by the per-attempt timeout.
        .service(upstream))
}
