//! Admission: `[[budget]]`, `[queue]`, `[learn]`, `[[project]]`, `[[fallback]]`.

use std::time::Duration;

use super::error::{Bad, HOUR, MINUTE, durations};
use serde::{Deserialize, Serialize};

use super::error::{ConfigError, default_true};

/// `[[fallback]]`: when a model cannot be had in time (every upstream
/// serving it out of quota or down, or its wait longer than `after`), a
/// request that allows it goes with the first of `to` that can be had.
/// Opt in: none is configured by default, and a request with
/// `x-penstock-fallback: none` never falls back.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// Model globs this applies to.
    pub models: Vec<String>,
    /// The models to use instead, in order.
    pub to: Vec<String>,
    /// The longest wait for the asked model before a fallback is used.
    #[serde(default = "default_fallback_after", with = "humantime_serde")]
    pub after: Duration,
}

pub(super) fn default_fallback_after() -> Duration {
    Duration::from_secs(30)
}

/// Pools for models no `[[budget]]` covers, with limits learned from the
/// upstream: its `x-ratelimit-limit-*` headers, else its 429s.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LearnConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The fraction of an announced limit penstock uses.
    #[serde(default = "default_learn_safety")]
    pub safety: f64,
    /// Where nothing is announced, the most calls in flight learning from 429s
    /// may reach.
    #[serde(default = "default_learn_max_in_flight")]
    pub max_in_flight: usize,
    /// As `[[budget]] burst`: the window a minute's limit is enforced over.
    #[serde(default = "default_burst", with = "humantime_serde")]
    pub burst: Duration,
    #[serde(default = "default_safety_margin", with = "humantime_serde")]
    pub safety_margin: Duration,
}

pub(super) fn default_learn_safety() -> f64 {
    0.95
}

pub(super) fn default_learn_max_in_flight() -> usize {
    256
}

impl Default for LearnConfig {
    fn default() -> Self {
        LearnConfig {
            enabled: true,
            safety: default_learn_safety(),
            max_in_flight: default_learn_max_in_flight(),
            burst: default_burst(),
            safety_margin: default_safety_margin(),
        }
    }
}

/// API keys that belong to one OpenAI project, so their requests share one pool.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    /// Shown in `/status` and logs as `project:NAME`.
    pub name: String,
    /// Keys by the `key:...` id `/status` shows for them (never the key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_ids: Vec<String>,
    /// Keys by the environment variables that hold them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_envs: Vec<String>,
}

/// One pool of upstream capacity, counted per upstream credential.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Name in `/status`, logs and metrics; defaults to the first glob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Model globs (`*`, `?`); models sharing one budget share one pool.
    pub models: Vec<String>,
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens per minute (prompt plus the most the response may take).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Images per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipm: Option<u64>,
    /// The upstream enforces a minute's limit over short windows: never send more
    /// than this window's share at once.
    #[serde(default = "default_burst", with = "humantime_serde")]
    pub burst: Duration,
    /// Added to every window, so that network jitter between penstock and the
    /// upstream cannot make two windows' worth look like one.
    #[serde(default = "default_safety_margin", with = "humantime_serde")]
    pub safety_margin: Duration,
    /// Cap on concurrent upstream calls of this pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<usize>,
    /// One pool for every key and organization/project: the budget is the
    /// whole of one organization's limit, whoever sends.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// With several upstreams: the one whose limits these are (by name).
    /// Unset, the budget applies to each upstream on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            name: None,
            models: Vec::new(),
            rpm: None,
            tpm: None,
            ipm: None,
            burst: default_burst(),
            safety_margin: default_safety_margin(),
            max_in_flight: None,
            shared: false,
            upstream: None,
        }
    }
}

impl BudgetConfig {
    pub fn display_name(&self) -> &str {
        self.name
            .as_deref()
            .or(self.models.first().map(String::as_str))
            .unwrap_or("budget")
    }
}

/// The wait for budget.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Longest a request may wait for budget; a request that would wait longer is
    /// refused at once. Clients may ask for less with `x-penstock-max-wait-ms`.
    #[serde(default = "default_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
    /// Requests waiting across all pools; beyond it, new ones are refused at once.
    #[serde(default = "default_max_depth")]
    pub max_depth: usize,
    /// After an upstream rate limit, one call probes before the rest: once it
    /// has been out this long without being refused, the upstream took it (a
    /// 429 comes back at once; an image takes 15-60 s) and the rest follow.
    #[serde(default = "default_probe_grace", with = "humantime_serde")]
    pub probe_grace: Duration,
    /// While interactive and batch requests both wait for a pool, batch
    /// keeps this share of its turns (0 to 1).
    #[serde(default = "default_batch_min_share")]
    pub batch_min_share: f64,
}

pub(super) fn default_batch_min_share() -> f64 {
    crate::vocab::cost::DEFAULT_BATCH_SHARE
}

pub(super) fn default_probe_grace() -> Duration {
    Duration::from_secs(2)
}

pub(super) fn default_burst() -> Duration {
    Duration::from_secs(1)
}

/// The longest margin a window may add: the shared ledger keeps a pool's
/// keys a while past the minute window and its margin.
pub(super) const MAX_MARGIN: Duration = Duration::from_secs(10);

pub(super) fn default_safety_margin() -> Duration {
    Duration::from_millis(50)
}

pub(super) fn default_max_wait() -> Duration {
    Duration::from_secs(120)
}

pub(super) fn default_max_depth() -> usize {
    10_000
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_wait: default_max_wait(),
            max_depth: default_max_depth(),
            probe_grace: default_probe_grace(),
            batch_min_share: default_batch_min_share(),
        }
    }
}

impl FallbackConfig {
    /// Checks what the types cannot; `bad` names the key (`models`, `to`, `after`).
    pub fn validate(&self, bad: &dyn Fn(&str, String) -> ConfigError) -> Result<(), ConfigError> {
        if self.models.is_empty() || self.models.iter().any(String::is_empty) {
            return Err(bad(
                "models",
                "expected at least one model glob, like \"gpt-image-1\"".into(),
            ));
        }
        if self.to.is_empty()
            || self
                .to
                .iter()
                .any(|m| m.is_empty() || m.contains(['*', '?']))
        {
            return Err(bad(
                "to",
                "expected at least one model name (not a glob), like \"gpt-image-1-mini\"".into(),
            ));
        }
        if self.after > Duration::from_secs(24 * 3600) {
            return Err(bad("after", "expected at most a day, like \"30s\"".into()));
        }
        Ok(())
    }
}

impl BudgetConfig {
    /// Checks what the types cannot; `bad` names the key (`rpm`, `burst`, ...).
    pub fn validate(&self, bad: &dyn Fn(&str, String) -> ConfigError) -> Result<(), ConfigError> {
        if self.models.is_empty() || self.models.iter().any(String::is_empty) {
            return Err(bad(
                "models",
                "expected at least one model glob, like \"gpt-image-*\"".into(),
            ));
        }
        if self.rpm.is_none() && self.tpm.is_none() && self.ipm.is_none() {
            return Err(bad(
                "rpm",
                "a budget needs at least one of rpm, tpm, ipm".into(),
            ));
        }
        for (field, v) in [("rpm", self.rpm), ("tpm", self.tpm), ("ipm", self.ipm)] {
            if v == Some(0) {
                return Err(bad(field, "expected a number above zero".into()));
            }
        }
        if self.burst.is_zero() || self.burst > Duration::from_secs(60) {
            return Err(bad(
                "burst",
                "expected a duration from above zero to \"60s\"".into(),
            ));
        }
        if self.safety_margin > MAX_MARGIN {
            return Err(bad(
                "safety_margin",
                "expected a duration of at most \"10s\"".into(),
            ));
        }
        if self.max_in_flight == Some(0) {
            return Err(bad("max_in_flight", "expected a number above zero".into()));
        }
        Ok(())
    }
}

impl QueueConfig {
    /// Checks what the types cannot; `bad` takes whole key names.
    pub fn validate(&self, bad: Bad) -> Result<(), ConfigError> {
        durations(
            bad,
            &[
                ("queue.max_wait", self.max_wait, false, 24 * HOUR),
                ("queue.probe_grace", self.probe_grace, false, 5 * MINUTE),
            ],
        )?;
        if !(0.0..=1.0).contains(&self.batch_min_share) {
            return Err(bad(
                "queue.batch_min_share",
                "expected a share from 0 to 1".into(),
            ));
        }
        if self.max_depth == 0 {
            return Err(bad(
                "queue.max_depth",
                "expected a number above zero".into(),
            ));
        }
        Ok(())
    }
}

impl LearnConfig {
    /// Checks what the types cannot; `bad` takes whole key names.
    pub fn validate(&self, bad: Bad) -> Result<(), ConfigError> {
        if !(0.05..=1.0).contains(&self.safety) {
            return Err(bad(
                "learn.safety",
                "expected a fraction from 0.05 to 1".into(),
            ));
        }
        if self.max_in_flight == 0 {
            return Err(bad(
                "learn.max_in_flight",
                "expected a number above zero".into(),
            ));
        }
        if self.burst.is_zero() || self.burst > Duration::from_secs(60) {
            return Err(bad(
                "learn.burst",
                "expected a duration from above zero to \"60s\"".into(),
            ));
        }
        if self.safety_margin > MAX_MARGIN {
            return Err(bad(
                "learn.safety_margin",
                "expected a duration of at most \"10s\"".into(),
            ));
        }
        Ok(())
    }
}
