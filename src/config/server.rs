//! `[server]` and `[admin]`: how penstock serves its clients and operators.

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::error::{Bad, ConfigError, HOUR, MINUTE, durations};

/// `[admin]`: who may read the admin listener.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The environment variable holding a bearer token that the page,
    /// `/status` and `/metrics` require (`/healthz` and `/readyz` stay open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
}

/// How penstock serves its clients.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Largest request body accepted; larger ones get 413 before being read.
    #[serde(default = "default_max_body_size")]
    pub max_body_size: ByteSize,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// In sidecar mode, the header that names the client (for fair queueing).
    #[serde(default = "default_client_id_header")]
    pub client_id_header: String,
    /// A client must send a request's head within this long, and an idle
    /// keep-alive connection is closed after it.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// The longest gap between a request body's bytes.
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// A refused body (413, and the other refusals before it is read) is read
    /// and thrown away so its client, still sending, hears the answer rather
    /// than a reset: until the client is silent this long (nginx's
    /// `lingering_timeout`) ...
    #[serde(default = "default_lingering_timeout", with = "humantime_serde")]
    pub lingering_timeout: Duration,
    /// ... or this long in all (nginx's `lingering_time`), whatever its size.
    #[serde(default = "default_lingering_time", with = "humantime_serde")]
    pub lingering_time: Duration,
    /// Open client connections at most; more wait in the kernel's backlog. It
    /// is lowered to fit the open-file limit, so the admin port keeps answering.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Request bodies held in memory at once, across all requests (queued,
    /// in flight, kept for a retry); beyond it, 503 with `retry-after-ms`.
    #[serde(default = "default_max_buffered")]
    pub max_buffered: ByteSize,
    /// Threads serving the proxy port, each with a runtime and a listener of
    /// its own (`SO_REUSEPORT`: the kernel spreads connections over them) and
    /// its own upstream connections; budgets, cache, breaker and metrics are
    /// one for all. 0: one per core. 1: serve on the caller's runtime.
    #[serde(default)]
    pub threads: usize,
}

pub(super) fn default_header_read_timeout() -> Duration {
    Duration::from_secs(30)
}

pub(super) fn default_body_read_timeout() -> Duration {
    Duration::from_secs(30)
}

pub(super) fn default_lingering_timeout() -> Duration {
    Duration::from_secs(5)
}

pub(super) fn default_lingering_time() -> Duration {
    Duration::from_secs(30)
}

pub(super) fn default_max_connections() -> usize {
    4096
}

pub(super) fn default_max_buffered() -> ByteSize {
    ByteSize::mib(512)
}

pub(super) fn default_max_body_size() -> ByteSize {
    ByteSize::mib(64)
}

pub(super) fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}

pub(super) fn default_client_id_header() -> String {
    "x-penstock-client".into()
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_size: default_max_body_size(),
            shutdown_grace: default_shutdown_grace(),
            client_id_header: default_client_id_header(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            lingering_timeout: default_lingering_timeout(),
            lingering_time: default_lingering_time(),
            max_connections: default_max_connections(),
            max_buffered: default_max_buffered(),
            threads: 0,
        }
    }
}

impl ServerConfig {
    /// Checks what the types cannot; `bad` takes whole key names.
    pub fn validate(&self, bad: Bad) -> Result<(), ConfigError> {
        durations(
            bad,
            &[
                (
                    "server.header_read_timeout",
                    self.header_read_timeout,
                    true,
                    10 * MINUTE,
                ),
                (
                    "server.body_read_timeout",
                    self.body_read_timeout,
                    true,
                    10 * MINUTE,
                ),
                ("server.shutdown_grace", self.shutdown_grace, false, HOUR),
                (
                    "server.lingering_timeout",
                    self.lingering_timeout,
                    false,
                    10 * MINUTE,
                ),
                ("server.lingering_time", self.lingering_time, false, HOUR),
            ],
        )?;
        if http::HeaderName::try_from(self.client_id_header.as_str()).is_err() {
            return Err(bad(
                "server.client_id_header",
                "expected a valid HTTP header name".into(),
            ));
        }
        if self.threads > 1024 {
            return Err(bad(
                "server.threads",
                format!(
                    "{} threads: expected at most 1024 (0 is one per core)",
                    self.threads
                ),
            ));
        }
        if self.max_connections == 0 {
            return Err(bad(
                "server.max_connections",
                "expected a number above zero".into(),
            ));
        }
        if self.max_buffered < self.max_body_size {
            return Err(bad(
                "server.max_buffered",
                "must be at least `server.max_body_size`".into(),
            ));
        }
        if self.max_body_size.as_u64() == 0 {
            return Err(bad(
                "server.max_body_size",
                "expected a size above zero, like \"64MiB\"".into(),
            ));
        }
        Ok(())
    }
}
