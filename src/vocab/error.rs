//! The error type of the stack. Each module defines its own errors as data (the
//! budget's refusals, the client cap, the upstream's failures, the edge's bad
//! requests) and says, through [`Problem`], what a client should be told. An
//! error stays an `Err` through every layer (a shared call hands its waiters
//! the same error, cloned) until the edge renders it with
//! [`crate::vocab::render`]; an async job's runner, the edge of a request
//! answered later, renders the same way into the job's result.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;

/// An error penstock answers itself.
pub(crate) trait Problem: std::error::Error + Send + Sync + 'static {
    fn status(&self) -> StatusCode;

    /// The `code` field: always `penstock_*`.
    fn code(&self) -> &'static str;

    fn param(&self) -> Option<&'static str> {
        None
    }

    /// For penstock's own 429s: when trying again has a chance.
    fn retry_after(&self) -> Option<Duration> {
        None
    }

    /// An answer to give as it is instead of penstock's own JSON (the
    /// upstream's money error, repeated while the breaker is open).
    fn answer(&self) -> Option<(http::response::Parts, Bytes)> {
        None
    }

    /// For an attempt that got no answer from the upstream: what kept it
    /// (`timeout`, `unreachable`, `connection_error`). Such attempts are
    /// transient; every other problem is final.
    fn unanswered(&self) -> Option<&'static str> {
        None
    }

    /// For an attempt without an answer: the request may have reached the
    /// upstream whole and been processed (and paid for), as after a reset or a
    /// timeout once it was sent; a failed connect was surely not.
    fn maybe_processed(&self) -> bool {
        false
    }

    /// Belongs to this caller alone (its own deadline or cap): callers that
    /// waited for the same shared call are not given it.
    fn is_personal(&self) -> bool {
        false
    }

    /// penstock's own advice to wait (a refusal for lack of budget or a client
    /// cap) rather than a failure it gave up on.
    fn is_refusal(&self) -> bool {
        self.retry_after().is_some()
    }

    /// Nothing was sent upstream (penstock answered for it): whatever was
    /// booked for the call is given back.
    fn unsent(&self) -> bool {
        false
    }

    /// A refusal to send now that waiting out (its [`Problem::retry_after`])
    /// may cure: no turn of the budget in time, no room in the queue, a
    /// client over its cap, the upstream's breaker, a replica shutting down.
    /// An async job goes back to its queue for it instead of failing.
    fn may_wait_out(&self) -> bool {
        false
    }

    /// The asked model cannot be had now (no turn in time, no room in the
    /// queue, its money gone, a request larger than its limits, its
    /// upstream down): a `[[fallback]]` model may serve instead.
    fn model_unavailable(&self) -> bool {
        false
    }
}

/// Any [`Problem`], as the stack's services return it. Cloned, it is the
/// same error: a shared call gives each who waited for it the leader's.
#[derive(Clone)]
pub struct ProxyError(std::sync::Arc<dyn Problem>);

impl<P: Problem> From<P> for ProxyError {
    fn from(p: P) -> ProxyError {
        ProxyError(std::sync::Arc::new(p))
    }
}

impl ProxyError {
    pub(crate) fn problem(&self) -> &dyn Problem {
        self.0.as_ref()
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.0.status()
    }

    pub(crate) fn code(&self) -> &'static str {
        self.0.code()
    }

    pub(crate) fn retry_after(&self) -> Option<Duration> {
        self.0.retry_after()
    }

    pub(crate) fn unanswered(&self) -> Option<&'static str> {
        self.0.unanswered()
    }

    pub(crate) fn is_refusal(&self) -> bool {
        self.0.is_refusal()
    }

    pub(crate) fn unsent(&self) -> bool {
        self.0.unsent()
    }

    pub(crate) fn is_personal(&self) -> bool {
        self.0.is_personal()
    }

    pub(crate) fn maybe_processed(&self) -> bool {
        self.0.maybe_processed()
    }

    pub(crate) fn model_unavailable(&self) -> bool {
        self.0.model_unavailable()
    }

    /// When it may be waited out ([`Problem::may_wait_out`]): how long to
    /// wait (its `retry_after`, else a second).
    pub(crate) fn wait_out(&self) -> Option<Duration> {
        self.0
            .may_wait_out()
            .then(|| self.0.retry_after().unwrap_or(Duration::from_secs(1)))
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}
