//! What penstock does to a request: `[[client]]` caps, `[spend]`, `[cache]`, `[retry]`.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::error::{Bad, ConfigError, HOUR, durations};

use super::error::default_true;

/// A cap on one client's requests, whatever the budgets allow.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The client: its id header value in sidecar mode, or the `key:...` id that
    /// `/status` shows for an API key.
    pub id: String,
    /// Requests per minute (none: no cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Requests allowed at once; by default a second's share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    /// Its class when waiting for budget: `"interactive"` (the default) or
    /// `"batch"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<crate::vocab::cost::Priority>,
    /// Whether its requests may choose their class with `x-penstock-priority`.
    #[serde(default = "default_true")]
    pub priority_header: bool,
    /// What it may spend upstream, in USD, per UTC day and calendar month
    /// (by the price tables); unset, `[spend]`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd_per_day: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd_per_month: Option<f64>,
}

/// `[spend]`: what every client may spend upstream unless its `[[client]]`
/// says otherwise.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SpendConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd_per_day: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd_per_month: Option<f64>,
    /// Where spend is kept with the in-process state (redb); unset,
    /// `spend.redb` in `data_dir`. With Redis it is kept there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

impl ClientConfig {
    /// The tenant this entry names, as the edge names tenants: a `key:...`
    /// id as it is, a sidecar's client id as `client:<id>`.
    pub fn tenant(&self) -> String {
        crate::vocab::context::Tenant::configured(&self.id)
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            id: String::new(),
            rpm: None,
            burst: None,
            priority: None,
            priority_header: true,
            usd_per_day: None,
            usd_per_month: None,
        }
    }
}

/// Identical requests cost one upstream call: while one is in flight the others
/// wait for it, and its successful answer is kept for a while after.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// `false` turns both coalescing and the cache off.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How long a successful response is kept.
    #[serde(default = "default_cache_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// Bytes the cache may hold in all.
    #[serde(default = "default_cache_max_size")]
    pub max_size: ByteSize,
    /// Larger responses are shared with those waiting but not kept.
    #[serde(default = "default_cache_max_entry_size")]
    pub max_entry_size: ByteSize,
    /// `"tenant"`: clients (API keys, or client ids in sidecar mode) never share an
    /// entry; `"global"`: everyone does.
    #[serde(default)]
    pub scope: CacheScope,
    /// Paths whose POSTs are coalesced and cached.
    #[serde(default = "default_cache_paths")]
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    #[default]
    Tenant,
    Global,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            ttl: default_cache_ttl(),
            max_size: default_cache_max_size(),
            max_entry_size: default_cache_max_entry_size(),
            scope: CacheScope::Tenant,
            paths: default_cache_paths(),
        }
    }
}

pub(super) fn default_cache_ttl() -> Duration {
    Duration::from_secs(3600)
}

pub(super) fn default_cache_max_size() -> ByteSize {
    ByteSize::mib(512)
}

pub(super) fn default_cache_max_entry_size() -> ByteSize {
    ByteSize::mib(64)
}

pub(super) fn default_cache_paths() -> Vec<String> {
    [
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/embeddings",
    ]
    .map(String::from)
    .to_vec()
}

/// Retries of transient upstream failures (connection errors, timeouts, 408, 5xx,
/// rate-limit 429s); never of money errors or other 4xx.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per request, the first included; 1 turns retries off.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First backoff when the upstream names no delay; doubles per attempt, with
    /// full jitter.
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Retries allowed as a percentage of requests (over a 10 s window), so a
    /// failing upstream sees a fraction more calls, not `max_attempts` times more.
    #[serde(default = "default_budget_percent")]
    pub budget_percent: f32,
    /// Retries allowed per second regardless of traffic.
    #[serde(default = "default_min_retries_per_second")]
    pub min_retries_per_second: u32,
    /// Total time a request may take, queue waits and retries included.
    #[serde(default = "default_deadline", with = "humantime_serde")]
    pub deadline: Duration,
    /// After `insufficient_quota` (or another money error), the pool answers with
    /// that error at once for this long instead of sending calls that cannot succeed.
    #[serde(default = "default_quota_cooldown", with = "humantime_serde")]
    pub quota_cooldown: Duration,
    /// An attempt that failed after its request was sent (a reset, a timeout
    /// waiting for the answer) may have been processed and paid for: `"never"`
    /// retries none, `"text"` all but image calls (each a paid image), `"always"`
    /// all. A failed connect is always retried: nothing was sent.
    #[serde(default)]
    pub after_send: AfterSend,
}

/// See [`RetryConfig::after_send`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterSend {
    Never,
    #[default]
    Text,
    Always,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            budget_percent: default_budget_percent(),
            min_retries_per_second: default_min_retries_per_second(),
            deadline: default_deadline(),
            quota_cooldown: default_quota_cooldown(),
            after_send: AfterSend::default(),
        }
    }
}

pub(super) fn default_max_attempts() -> u32 {
    4
}

pub(super) fn default_initial_backoff() -> Duration {
    Duration::from_millis(250)
}

pub(super) fn default_max_backoff() -> Duration {
    Duration::from_secs(20)
}

pub(super) fn default_budget_percent() -> f32 {
    30.0
}

pub(super) fn default_min_retries_per_second() -> u32 {
    1
}

pub(super) fn default_deadline() -> Duration {
    Duration::from_secs(600)
}

pub(super) fn default_quota_cooldown() -> Duration {
    Duration::from_secs(60)
}

impl RetryConfig {
    /// Checks what the types cannot; `bad` takes whole key names.
    pub fn validate(&self, bad: Bad) -> Result<(), ConfigError> {
        durations(
            bad,
            &[
                ("retry.initial_backoff", self.initial_backoff, false, HOUR),
                ("retry.max_backoff", self.max_backoff, false, HOUR),
                ("retry.deadline", self.deadline, false, 24 * HOUR),
                (
                    "retry.quota_cooldown",
                    self.quota_cooldown,
                    false,
                    24 * HOUR,
                ),
            ],
        )?;
        if self.max_attempts == 0 || self.max_attempts > 20 {
            return Err(bad(
                "retry.max_attempts",
                "expected 1 (no retries) to 20".into(),
            ));
        }
        if !(0.0..=1000.0).contains(&self.budget_percent) || self.budget_percent.is_nan() {
            return Err(bad(
                "retry.budget_percent",
                "expected a percentage from 0 to 1000".into(),
            ));
        }
        if self.min_retries_per_second > 1_000_000 {
            return Err(bad(
                "retry.min_retries_per_second",
                "expected at most 1000000".into(),
            ));
        }
        if self.initial_backoff > self.max_backoff {
            return Err(bad(
                "retry.initial_backoff",
                "must not exceed `retry.max_backoff`".into(),
            ));
        }
        if self.deadline.is_zero() {
            return Err(bad(
                "retry.deadline",
                "expected a duration above zero, like \"10m\"".into(),
            ));
        }
        Ok(())
    }
}

impl CacheConfig {
    /// Checks what the types cannot; `bad` takes whole key names.
    pub fn validate(&self, bad: Bad) -> Result<(), ConfigError> {
        durations(bad, &[("cache.ttl", self.ttl, false, 30 * 24 * HOUR)])?;
        if self.max_entry_size > self.max_size {
            return Err(bad(
                "cache.max_entry_size",
                "must not exceed `cache.max_size`".into(),
            ));
        }
        if self.max_entry_size.as_u64() > u32::MAX as u64 {
            return Err(bad(
                "cache.max_entry_size",
                "expected at most \"4GiB\"".into(),
            ));
        }
        if let Some(p) = self.paths.iter().find(|p| !p.starts_with('/')) {
            return Err(bad(
                "cache.paths",
                format!("{p:?} is not a path; expected like \"/v1/embeddings\""),
            ));
        }
        Ok(())
    }
}

impl ClientConfig {
    /// Checks what the types cannot; `bad` takes the key within the
    /// `[[client]]` (`rpm`, ...).
    pub fn validate(&self, bad: Bad) -> Result<(), ConfigError> {
        if self.id.is_empty() {
            return Err(bad("id", "expected a client id".into()));
        }
        if self.rpm.is_some_and(|r| r == 0 || r > u32::MAX as u64) {
            return Err(bad("rpm", "expected a number from 1 to 4294967295".into()));
        }
        if self.burst.is_some_and(|b| b == 0 || b > u32::MAX as u64) {
            return Err(bad(
                "burst",
                "expected a number from 1 to 4294967295".into(),
            ));
        }
        for (key, usd) in [
            ("usd_per_day", self.usd_per_day),
            ("usd_per_month", self.usd_per_month),
        ] {
            if usd.is_some_and(|u| !u.is_finite() || u < 0.0) {
                return Err(bad(key, "expected a number of dollars, 0 or more".into()));
            }
        }
        Ok(())
    }
}

impl SpendConfig {
    /// Checks what the types cannot; `bad` takes whole key names.
    pub fn validate(&self, bad: Bad) -> Result<(), ConfigError> {
        for (key, usd) in [
            ("spend.usd_per_day", self.usd_per_day),
            ("spend.usd_per_month", self.usd_per_month),
        ] {
            if usd.is_some_and(|u| !u.is_finite() || u < 0.0) {
                return Err(bad(key, "expected a number of dollars, 0 or more".into()));
            }
        }
        Ok(())
    }
}
