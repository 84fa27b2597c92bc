//! `[jobs]`: async jobs.

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::error::{Bad, ConfigError, HOUR, durations};

use super::error::default_true;

/// `[jobs]`: durable async jobs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// `"redb"` (the default): jobs live in a file and survive a crash and a
    /// restart; `"memory"`: they end with the process. With the Redis backend
    /// they live in Redis.
    #[serde(default)]
    pub store: JobStore,
    /// The file jobs live in (`"redb"`); unset, `jobs.redb` in `data_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<std::path::PathBuf>,
    /// How long a finished job and its answer are kept.
    #[serde(default = "default_jobs_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// Bytes of answers kept in all; the oldest finished jobs expire first.
    #[serde(default = "default_jobs_max_bytes")]
    pub max_bytes: ByteSize,
    /// Jobs waiting or running at once, per tenant and in all.
    #[serde(default = "default_jobs_max_per_tenant")]
    pub max_per_tenant: usize,
    #[serde(default = "default_jobs_max_total")]
    pub max_total: usize,
    /// Jobs sent into the stack at once (they wait for budget there).
    #[serde(default = "default_jobs_max_running")]
    pub max_running: usize,
    /// Where every finished job is told, unless its request names another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// URL prefixes a request's `x-penstock-webhook` may name; none: the
    /// header is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhook_prefixes: Vec<String>,
    /// The environment variable holding the webhook signing secret
    /// (`whsec_` + base64, as Standard Webhooks gives them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret_env: Option<String>,
    /// Delivery attempts of a webhook, and the first pause between them
    /// (doubled each time).
    #[serde(default = "default_webhook_attempts")]
    pub webhook_attempts: u32,
    #[serde(default = "default_webhook_backoff", with = "humantime_serde")]
    pub webhook_backoff: Duration,
}

/// Where jobs are kept without Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStore {
    /// A redb file: a 202 is a promise kept across a crash.
    #[default]
    Redb,
    /// In memory, asked for by name: jobs end with the process.
    Memory,
}

pub(super) fn default_jobs_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

pub(super) fn default_jobs_max_bytes() -> ByteSize {
    ByteSize::gib(1)
}

pub(super) fn default_jobs_max_per_tenant() -> usize {
    1000
}

pub(super) fn default_jobs_max_total() -> usize {
    10_000
}

pub(super) fn default_jobs_max_running() -> usize {
    256
}

pub(super) fn default_webhook_attempts() -> u32 {
    5
}

pub(super) fn default_webhook_backoff() -> Duration {
    Duration::from_secs(1)
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            enabled: true,
            store: JobStore::default(),
            path: None,
            ttl: default_jobs_ttl(),
            max_bytes: default_jobs_max_bytes(),
            max_per_tenant: default_jobs_max_per_tenant(),
            max_total: default_jobs_max_total(),
            max_running: default_jobs_max_running(),
            webhook_url: None,
            webhook_prefixes: Vec::new(),
            webhook_secret_env: None,
            webhook_attempts: default_webhook_attempts(),
            webhook_backoff: default_webhook_backoff(),
        }
    }
}

impl JobsConfig {
    /// Checks what the types cannot; `bad` takes whole key names.
    pub fn validate(&self, bad: Bad) -> Result<(), ConfigError> {
        durations(
            bad,
            &[
                ("jobs.ttl", self.ttl, false, 30 * 24 * HOUR),
                ("jobs.webhook_backoff", self.webhook_backoff, false, HOUR),
            ],
        )?;
        for (key, url) in self
            .webhook_url
            .iter()
            .map(|u| ("jobs.webhook_url", u))
            .chain(
                self.webhook_prefixes
                    .iter()
                    .map(|u| ("jobs.webhook_prefixes", u)),
            )
        {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(bad(
                    key,
                    format!("expected an http:// or https:// URL, not {url:?}"),
                ));
            }
        }
        for (i, prefix) in self.webhook_prefixes.iter().enumerate() {
            crate::vocab::url::UrlPrefix::parse(prefix)
                .map_err(|e| bad(&format!("jobs.webhook_prefixes[{i}]"), e))?;
        }
        if (self.webhook_url.is_some() || !self.webhook_prefixes.is_empty())
            && self.webhook_secret_env.is_none()
        {
            return Err(bad(
                "jobs.webhook_secret_env",
                "webhooks are signed: name the environment variable holding the secret".into(),
            ));
        }
        if self.max_running == 0 || self.max_total == 0 || self.max_per_tenant == 0 {
            return Err(bad("jobs.max_running", "expected limits above zero".into()));
        }
        Ok(())
    }
}
