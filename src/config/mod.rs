//! The configuration tree: serde structs with defaults, parsed from TOML and checked
//! by [`Config::validate`] before anything binds. Every error names the file, the key
//! and what was expected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::vocab::cost::check_image_tables;
use crate::vocab::route::ROUTE_LABELS;

mod budget;
mod error;
mod estimate;
mod jobs;
mod proxying;
mod server;
mod state;
mod upstream;
pub use budget::*;
pub use error::ConfigError;
pub use estimate::*;
pub use jobs::*;
pub use proxying::*;
pub use server::*;
pub use state::*;
pub use upstream::*;

/// Environment variables that override the file, for containers and tests.
pub const ENV_LISTEN: &str = "PENSTOCK_LISTEN";
pub const ENV_ADMIN_LISTEN: &str = "PENSTOCK_ADMIN_LISTEN";
pub const ENV_UPSTREAM_URL: &str = "PENSTOCK_UPSTREAM_BASE_URL";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the proxy listener.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address of the admin listener (health, metrics, status); never the proxy port.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// The admin listener's access.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Where penstock keeps what must survive a restart (async jobs).
    /// Unset: `$STATE_DIRECTORY` when systemd sets it, else `penstock-data`
    /// beside the config file. Created readable by its owner alone (0700).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Where requests go: `[upstream]`, or several `[[upstream]]`s (the
    /// first is the default; `config.upstream.x` is the first's).
    #[serde(default)]
    pub upstream: Upstreams,
    /// How penstock serves its clients.
    #[serde(default)]
    pub server: ServerConfig,
    /// Rate budgets: a request's model picks the first budget whose globs match it.
    #[serde(default, rename = "budget", skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<BudgetConfig>,
    /// Models to use instead of others when those cannot be had in time.
    #[serde(default, rename = "fallback", skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<FallbackConfig>,
    /// The wait for budget.
    #[serde(default)]
    pub queue: QueueConfig,
    /// How a request's cost is estimated before it is sent.
    #[serde(default)]
    pub estimate: EstimateConfig,
    /// Retries of transient upstream failures.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Coalescing of identical requests and the response cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Per-client request caps.
    #[serde(default, rename = "client", skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientConfig>,
    /// What clients may spend upstream.
    #[serde(default)]
    pub spend: SpendConfig,
    /// Limits learned from the upstream for models no budget covers.
    #[serde(default)]
    pub learn: LearnConfig,
    /// Keys that spend one project's limits: OpenAI counts limits per
    /// organization/project, shared by all keys of the project.
    #[serde(default, rename = "project", skip_serializing_if = "Vec::is_empty")]
    pub projects: Vec<ProjectConfig>,
    /// Model glob -> USD prices, before the built-in list prices.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub prices: std::collections::BTreeMap<String, PriceConfig>,
    /// Requests submitted with `Prefer: respond-async`, answered later.
    #[serde(default)]
    pub jobs: JobsConfig,
    /// Where budgets, the cache and the quota breaker live: in this process, or
    /// in Redis, shared by every replica that names the same Redis and prefix.
    #[serde(default)]
    pub state: StateConfig,
}

/// What a reload applies while serving (SIGHUP, or the file changed): the
/// budgets, the client caps and the queue's limits. Every other key takes
/// effect at the next start.
pub const LIVE_KEYS: &[&str] = &[
    "budget",
    "fallback",
    "client",
    "queue.max_wait",
    "queue.max_depth",
    "queue.batch_min_share",
    "spend.usd_per_day",
    "spend.usd_per_month",
];

impl Config {
    /// Whether any client has a spend cap.
    pub fn caps_spend(&self) -> bool {
        self.spend.usd_per_day.is_some()
            || self.spend.usd_per_month.is_some()
            || self
                .clients
                .iter()
                .any(|c| c.usd_per_day.is_some() || c.usd_per_month.is_some())
    }
}

fn default_listen() -> SocketAddr {
    ([127, 0, 0, 1], 8080).into()
}
fn default_admin_listen() -> SocketAddr {
    ([127, 0, 0, 1], 9090).into()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            admin: AdminConfig::default(),
            upstream: Upstreams::default(),
            server: ServerConfig::default(),
            budgets: Vec::new(),
            fallbacks: Vec::new(),
            queue: QueueConfig::default(),
            estimate: EstimateConfig {
                default_max_output_tokens: default_max_output_tokens(),
                ..EstimateConfig::default()
            },
            retry: RetryConfig::default(),
            cache: CacheConfig::default(),
            clients: Vec::new(),
            spend: SpendConfig::default(),
            projects: Vec::new(),
            learn: LearnConfig::default(),
            prices: std::collections::BTreeMap::new(),
            state: StateConfig::default(),
            jobs: JobsConfig::default(),
            data_dir: None,
        }
    }
}

impl Config {
    /// Reads, parses, applies environment overrides and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let mut config = Config::parse(&text, &file)?;
        config.apply_env(|k| std::env::var(k).ok(), &file)?;
        config.resolve_paths(Some(path), |k| std::env::var(k).ok());
        config.validate(&file)?;
        Ok(config)
    }

    /// Fills in the data directory (`$STATE_DIRECTORY`, else `penstock-data`
    /// beside the config file `file`, or in the working directory) and the
    /// job store's file in it.
    pub fn resolve_paths(&mut self, file: Option<&Path>, var: impl Fn(&str) -> Option<String>) {
        let data_dir = self.data_dir.get_or_insert_with(|| {
            let systemd = var("STATE_DIRECTORY")
                .and_then(|v| v.split(':').next().map(PathBuf::from))
                .filter(|p| !p.as_os_str().is_empty());
            systemd.unwrap_or_else(|| {
                file.and_then(Path::parent)
                    .unwrap_or(Path::new("."))
                    .join("penstock-data")
            })
        });
        if self.jobs.store == JobStore::Redb && self.jobs.path.is_none() {
            self.jobs.path = Some(data_dir.join("jobs.redb"));
        }
        let spend = data_dir.join("spend.redb");
        if self.caps_spend() && self.spend.path.is_none() {
            self.spend.path = Some(spend);
        }
    }

    /// Where async jobs are kept, in words (for `penstock check`).
    pub fn jobs_kept(&self) -> String {
        match (
            self.jobs.enabled,
            self.state.backend,
            self.jobs.store,
            &self.jobs.path,
        ) {
            (false, ..) => "nowhere: jobs are off".into(),
            (_, Backend::Redis, ..) => "in Redis (state.backend), shared by every replica".into(),
            (_, _, JobStore::Memory, _) => {
                "in memory (jobs.store): they end with the process".into()
            }
            (_, _, JobStore::Redb, Some(path)) => {
                format!(
                    "in {} (redb: they survive a crash and a restart)",
                    path.display()
                )
            }
            (_, _, JobStore::Redb, None) => "in jobs.redb in the data directory".into(),
        }
    }

    /// Parses TOML text; `file` is only used in error messages.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let invalid = |key: Option<String>, e: &toml::de::Error| ConfigError::Invalid {
            file: file.to_string(),
            key,
            message: e.message().to_string(),
            line: e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1)),
        };
        let de = toml::Deserializer::parse(text).map_err(|e| invalid(None, &e))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let key = (path != ".").then_some(path);
            invalid(key, e.inner())
        })
    }

    /// Applies `PENSTOCK_*` overrides.
    pub fn apply_env(
        &mut self,
        var: impl Fn(&str) -> Option<String>,
        file: &str,
    ) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            file: file.to_string(),
            key: Some(key.to_string()),
            message,
            line: None,
        };
        if let Some(v) = var(ENV_LISTEN) {
            self.listen = v.parse().map_err(|_| {
                bad(
                    "listen",
                    format!("{ENV_LISTEN}={v:?} is not an address like \"127.0.0.1:8080\""),
                )
            })?;
        }
        if let Some(v) = var(ENV_ADMIN_LISTEN) {
            self.admin_listen = v.parse().map_err(|_| {
                bad(
                    "admin_listen",
                    format!("{ENV_ADMIN_LISTEN}={v:?} is not an address like \"127.0.0.1:9090\""),
                )
            })?;
        }
        if let Some(v) = var(ENV_UPSTREAM_URL) {
            self.upstream.base_url = v;
        }
        Ok(())
    }

    /// Checks what the types cannot: values that parse but make no sense together.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            file: file.to_string(),
            key: Some(key.to_string()),
            message,
            line: None,
        };
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            return Err(bad(
                "admin_listen",
                format!("must differ from `listen` ({})", self.listen),
            ));
        }
        crate::vocab::url::BaseUrl::parse(&self.upstream.base_url)
            .map_err(|m| bad("upstream.base_url", m))?;
        if self.admin.token_env.as_ref().is_some_and(String::is_empty) {
            return Err(bad(
                "admin.token_env",
                "expected the name of an environment variable".into(),
            ));
        }
        if self
            .upstream
            .api_key_env
            .as_ref()
            .is_some_and(String::is_empty)
        {
            return Err(bad(
                "upstream.api_key_env",
                "expected the name of an environment variable".into(),
            ));
        }
        if let Some(ca) = self.upstream.ca_file.as_ref().filter(|ca| !ca.is_file()) {
            return Err(bad(
                "upstream.ca_file",
                format!("{} is not a readable file", ca.display()),
            ));
        }
        for (key, d) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.attempt_timeout", self.upstream.attempt_timeout),
            ("upstream.read_timeout", self.upstream.read_timeout),
            (
                "upstream.keep_alive_interval",
                self.upstream.keep_alive_interval,
            ),
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.body_read_timeout", self.server.body_read_timeout),
            ("state.connect_timeout", self.state.connect_timeout),
            ("state.command_timeout", self.state.command_timeout),
            ("state.heartbeat", self.state.heartbeat),
            ("state.lease", self.state.lease),
        ] {
            if d.is_zero() {
                return Err(bad(
                    key,
                    "expected a duration above zero, like \"30s\"".into(),
                ));
            }
        }
        // Upper bounds: a typo of a unit ("600h") must not turn a bound off.
        const MINUTE: u64 = 60;
        const HOUR: u64 = 3600;
        for (key, d, max_secs) in [
            (
                "upstream.connect_timeout",
                self.upstream.connect_timeout,
                5 * MINUTE,
            ),
            (
                "upstream.attempt_timeout",
                self.upstream.attempt_timeout,
                HOUR,
            ),
            (
                "upstream.pool_idle_timeout",
                self.upstream.pool_idle_timeout,
                HOUR,
            ),
            ("server.shutdown_grace", self.server.shutdown_grace, HOUR),
            ("queue.max_wait", self.queue.max_wait, 24 * HOUR),
            ("queue.probe_grace", self.queue.probe_grace, 5 * MINUTE),
            ("retry.initial_backoff", self.retry.initial_backoff, HOUR),
            ("retry.max_backoff", self.retry.max_backoff, HOUR),
            ("retry.deadline", self.retry.deadline, 24 * HOUR),
            ("retry.quota_cooldown", self.retry.quota_cooldown, 24 * HOUR),
            ("cache.ttl", self.cache.ttl, 30 * 24 * HOUR),
            ("upstream.read_timeout", self.upstream.read_timeout, HOUR),
            (
                "upstream.keep_alive_interval",
                self.upstream.keep_alive_interval,
                HOUR,
            ),
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
                10 * MINUTE,
            ),
            (
                "server.body_read_timeout",
                self.server.body_read_timeout,
                10 * MINUTE,
            ),
            (
                "server.lingering_timeout",
                self.server.lingering_timeout,
                10 * MINUTE,
            ),
            ("server.lingering_time", self.server.lingering_time, HOUR),
            ("state.connect_timeout", self.state.connect_timeout, MINUTE),
            ("state.command_timeout", self.state.command_timeout, MINUTE),
            ("state.heartbeat", self.state.heartbeat, MINUTE),
            ("state.lease", self.state.lease, HOUR),
            ("jobs.ttl", self.jobs.ttl, 30 * 24 * HOUR),
            ("jobs.webhook_backoff", self.jobs.webhook_backoff, HOUR),
        ] {
            if d > Duration::from_secs(max_secs) {
                return Err(bad(
                    key,
                    format!(
                        "expected at most {}",
                        humantime::format_duration(Duration::from_secs(max_secs))
                    ),
                ));
            }
        }
        for (key, url) in self
            .jobs
            .webhook_url
            .iter()
            .map(|u| ("jobs.webhook_url", u))
            .chain(
                self.jobs
                    .webhook_prefixes
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
        for (i, prefix) in self.jobs.webhook_prefixes.iter().enumerate() {
            crate::vocab::url::UrlPrefix::parse(prefix)
                .map_err(|e| bad(&format!("jobs.webhook_prefixes[{i}]"), e))?;
        }
        if (self.jobs.webhook_url.is_some() || !self.jobs.webhook_prefixes.is_empty())
            && self.jobs.webhook_secret_env.is_none()
        {
            return Err(bad(
                "jobs.webhook_secret_env",
                "webhooks are signed: name the environment variable holding the secret".into(),
            ));
        }
        if self.jobs.max_running == 0 || self.jobs.max_total == 0 || self.jobs.max_per_tenant == 0 {
            return Err(bad("jobs.max_running", "expected limits above zero".into()));
        }
        if self.state.backend == Backend::Redis {
            let url = &self.state.redis_url;
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(bad(
                    "state.redis_url",
                    "expected redis://host:port or rediss://host:port".into(),
                ));
            }
            if !self.state.sentinels.is_empty() && !self.state.cluster_nodes.is_empty() {
                return Err(bad(
                    "state.cluster_nodes",
                    "expected either state.sentinels or state.cluster_nodes, not both".into(),
                ));
            }
            if !self.state.sentinels.is_empty() && self.state.sentinel_master.is_none() {
                return Err(bad(
                    "state.sentinel_master",
                    "expected the name the sentinels monitor the primary by".into(),
                ));
            }
            if self.state.sentinel_master.is_some() && self.state.sentinels.is_empty() {
                return Err(bad(
                    "state.sentinels",
                    "expected the sentinels' addresses (host:port)".into(),
                ));
            }
            for (i, node) in self.state.cluster_nodes.iter().enumerate() {
                if !(node.starts_with("redis://") || node.starts_with("rediss://")) {
                    return Err(bad(
                        &format!("state.cluster_nodes[{i}]"),
                        "expected redis://host:port or rediss://host:port".into(),
                    ));
                }
            }
            if self.state.key_prefix.is_empty()
                || self.state.key_prefix.len() > 64
                || !self
                    .state
                    .key_prefix
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
            {
                return Err(bad(
                    "state.key_prefix",
                    "expected 1 to 64 printable characters without braces".into(),
                ));
            }
            if self.state.replicas == Some(0) {
                return Err(bad("state.replicas", "expected at least 1".into()));
            }
        }
        if http::HeaderName::try_from(self.server.client_id_header.as_str()).is_err() {
            return Err(bad(
                "server.client_id_header",
                "expected a valid HTTP header name".into(),
            ));
        }
        let up_names = self.upstream.validate(&bad)?;
        for (i, b) in self.budgets.iter().enumerate() {
            if let Some(u) = b.upstream.as_ref().filter(|u| !up_names.contains(*u)) {
                return Err(bad(
                    &format!("budget[{i}].upstream"),
                    format!("{u:?} names no upstream"),
                ));
            }
        }
        for (i, f) in self.fallbacks.iter().enumerate() {
            f.validate(&|field, m| bad(&format!("fallback[{i}].{field}"), m))?;
        }
        let mut names = std::collections::HashSet::new();
        for (i, b) in self.budgets.iter().enumerate() {
            let bad = |field: &str, m| bad(&format!("budget[{i}].{field}"), m);
            b.validate(&bad)?;
            if !names.insert(b.display_name()) {
                return Err(bad(
                    "name",
                    format!("the name {:?} is used by another budget", b.display_name()),
                ));
            }
        }
        let r = &self.retry;
        if r.max_attempts == 0 || r.max_attempts > 20 {
            return Err(bad(
                "retry.max_attempts",
                "expected 1 (no retries) to 20".into(),
            ));
        }
        if !(0.0..=1000.0).contains(&r.budget_percent) || r.budget_percent.is_nan() {
            return Err(bad(
                "retry.budget_percent",
                "expected a percentage from 0 to 1000".into(),
            ));
        }
        if r.min_retries_per_second > 1_000_000 {
            return Err(bad(
                "retry.min_retries_per_second",
                "expected at most 1000000".into(),
            ));
        }
        if r.initial_backoff > r.max_backoff {
            return Err(bad(
                "retry.initial_backoff",
                "must not exceed `retry.max_backoff`".into(),
            ));
        }
        if r.deadline.is_zero() {
            return Err(bad(
                "retry.deadline",
                "expected a duration above zero, like \"10m\"".into(),
            ));
        }
        if self.cache.max_entry_size > self.cache.max_size {
            return Err(bad(
                "cache.max_entry_size",
                "must not exceed `cache.max_size`".into(),
            ));
        }
        if self.cache.max_entry_size.as_u64() > u32::MAX as u64 {
            return Err(bad(
                "cache.max_entry_size",
                "expected at most \"4GiB\"".into(),
            ));
        }
        if let Some(p) = self.cache.paths.iter().find(|p| !p.starts_with('/')) {
            return Err(bad(
                "cache.paths",
                format!("{p:?} is not a path; expected like \"/v1/embeddings\""),
            ));
        }
        for (i, c) in self.clients.iter().enumerate() {
            if c.id.is_empty() {
                return Err(bad(
                    &format!("client[{i}].id"),
                    "expected a client id".into(),
                ));
            }
            if c.rpm.is_some_and(|r| r == 0 || r > u32::MAX as u64) {
                return Err(bad(
                    &format!("client[{i}].rpm"),
                    "expected a number from 1 to 4294967295".into(),
                ));
            }
            if c.burst.is_some_and(|b| b == 0 || b > u32::MAX as u64) {
                return Err(bad(
                    &format!("client[{i}].burst"),
                    "expected a number from 1 to 4294967295".into(),
                ));
            }
            for (key, usd) in [
                ("usd_per_day", c.usd_per_day),
                ("usd_per_month", c.usd_per_month),
            ] {
                if usd.is_some_and(|u| !u.is_finite() || u < 0.0) {
                    return Err(bad(
                        &format!("client[{i}].{key}"),
                        "expected a number of dollars, 0 or more".into(),
                    ));
                }
            }
        }
        for (key, usd) in [
            ("spend.usd_per_day", self.spend.usd_per_day),
            ("spend.usd_per_month", self.spend.usd_per_month),
        ] {
            if usd.is_some_and(|u| !u.is_finite() || u < 0.0) {
                return Err(bad(key, "expected a number of dollars, 0 or more".into()));
            }
        }
        if !(0.0..=1.0).contains(&self.queue.batch_min_share) {
            return Err(bad(
                "queue.batch_min_share",
                "expected a share from 0 to 1".into(),
            ));
        }
        let mut projects = std::collections::HashSet::new();
        for (i, p) in self.projects.iter().enumerate() {
            if p.name.is_empty() || !projects.insert(&p.name) {
                return Err(bad(
                    &format!("project[{i}].name"),
                    "expected a name no other project has".into(),
                ));
            }
            if let Some(id) = p.key_ids.iter().find(|k| !k.starts_with("key:")) {
                return Err(bad(
                    &format!("project[{i}].key_ids"),
                    format!(
                        "{id:?} is not a key id; expected like \"key:0123456789abcdef\" as /status shows"
                    ),
                ));
            }
        }
        if !(0.05..=1.0).contains(&self.learn.safety) {
            return Err(bad(
                "learn.safety",
                "expected a fraction from 0.05 to 1".into(),
            ));
        }
        if self.learn.max_in_flight == 0 {
            return Err(bad(
                "learn.max_in_flight",
                "expected a number above zero".into(),
            ));
        }
        if self.learn.burst.is_zero() || self.learn.burst > Duration::from_secs(60) {
            return Err(bad(
                "learn.burst",
                "expected a duration from above zero to \"60s\"".into(),
            ));
        }
        if self.learn.safety_margin > MAX_MARGIN {
            return Err(bad(
                "learn.safety_margin",
                "expected a duration of at most \"10s\"".into(),
            ));
        }
        if self.queue.max_depth == 0 {
            return Err(bad(
                "queue.max_depth",
                "expected a number above zero".into(),
            ));
        }
        let cpt = self.estimate.chars_per_token;
        if !(0.5..=100.0).contains(&cpt) {
            return Err(bad(
                "estimate.chars_per_token",
                "expected a number from 0.5 to 100".into(),
            ));
        }
        if let Some(route) = self
            .estimate
            .default_model
            .keys()
            .find(|r| !ROUTE_LABELS.contains(&r.as_str()))
        {
            return Err(bad(
                "estimate.default_model",
                format!("{route:?} is not a route; expected one of {ROUTE_LABELS:?}"),
            ));
        }
        check_image_tables(&self.estimate.image_output_tokens)
            .map_err(|(k, m)| bad(&format!("estimate.{k}"), m))?;
        if self.server.threads > 1024 {
            return Err(bad(
                "server.threads",
                format!(
                    "{} threads: expected at most 1024 (0 is one per core)",
                    self.server.threads
                ),
            ));
        }
        if self.server.max_connections == 0 {
            return Err(bad(
                "server.max_connections",
                "expected a number above zero".into(),
            ));
        }
        if self.server.max_buffered < self.server.max_body_size {
            return Err(bad(
                "server.max_buffered",
                "must be at least `server.max_body_size`".into(),
            ));
        }
        if self.server.max_body_size.as_u64() == 0 {
            return Err(bad(
                "server.max_body_size",
                "expected a size above zero, like \"64MiB\"".into(),
            ));
        }
        Ok(())
    }

    /// The effective config as TOML, for `penstock check`. It holds no secret: keys
    /// are only ever named (`api_key_env`), and credentials in the URL are redacted.
    /// A short hash of the effective config, secrets redacted: replicas with
    /// equal configs show equal hashes.
    pub fn hash(&self) -> String {
        blake3::hash(self.to_redacted_toml().as_bytes()).to_hex()[..12].to_string()
    }

    /// The keys whose values differ in `other`: `section.key` (or a
    /// top-level key), and arrays of tables by their name (`budget`).
    pub fn changed_keys(&self, other: &Config) -> Vec<String> {
        let value = |c: &Config| toml::Value::try_from(c).ok();
        let (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) =
            (value(self), value(other))
        else {
            return vec!["(the whole file)".to_string()];
        };
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        let mut changed = Vec::new();
        for key in keys {
            match (a.get(key), b.get(key)) {
                (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                    let mut inner: Vec<&String> = x.keys().chain(y.keys()).collect();
                    inner.sort();
                    inner.dedup();
                    for k in inner {
                        if x.get(k) != y.get(k) {
                            changed.push(format!("{key}.{k}"));
                        }
                    }
                }
                (x, y) if x != y => changed.push(key.clone()),
                _ => {}
            }
        }
        changed
    }

    pub fn to_redacted_toml(&self) -> String {
        let mut copy = self.clone();
        for u in copy.upstream.all_mut() {
            u.base_url = crate::vocab::url::BaseUrl::redact(&u.base_url);
        }
        copy.state.redis_url = crate::vocab::url::BaseUrl::redact(&copy.state.redis_url);
        for url in copy
            .state
            .cluster_nodes
            .iter_mut()
            .chain(copy.state.sentinels.iter_mut())
        {
            *url = crate::vocab::url::BaseUrl::redact(url);
        }
        toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytesize::ByteSize;

    fn err(text: &str) -> String {
        Config::parse(text, "x.toml")
            .and_then(|c| c.validate("x.toml").map(|_| c))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn durations_have_upper_bounds() {
        let e = err("[retry]\ndeadline = \"600h\"\n");
        assert!(
            e.contains("retry.deadline") && e.contains("at most 1day"),
            "{e}"
        );
        let e = err("[queue]\nmax_wait = \"2days\"\n");
        assert!(e.contains("queue.max_wait"), "{e}");
    }

    #[test]
    fn empty_file_gives_working_defaults() {
        let c = Config::parse("", "x.toml").unwrap();
        c.validate("x.toml").unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.max_body_size, ByteSize::mib(64));
        assert_eq!(c.upstream.attempt_timeout, Duration::from_secs(300));
    }

    #[test]
    fn human_units_parse() {
        let c = Config::parse(
            "[upstream]\nconnect_timeout = \"2s\"\nattempt_timeout = \"10m\"\n[server]\nmax_body_size = \"1MiB\"\n",
            "x.toml",
        )
        .unwrap();
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.upstream.attempt_timeout, Duration::from_secs(600));
        assert_eq!(c.server.max_body_size.as_u64(), 1 << 20);
    }

    #[test]
    fn errors_name_file_key_and_expectation() {
        let e = err("[upstream]\nconnect_timeout = \"5 parsecs\"\n");
        assert!(
            e.starts_with("x.toml: key `upstream.connect_timeout`: "),
            "{e}"
        );
        let e = err("[upstream]\nbase_urll = \"http://x\"\n");
        assert!(
            e.contains("upstream.base_urll") && e.contains("unknown field"),
            "{e}"
        );
        let e = err("listen = 8080\n");
        assert!(e.contains("key `listen`"), "{e}");
        let e = err("[upstream]\nbase_url = \"ftp://x\"\n");
        assert!(
            e.contains("key `upstream.base_url`") && e.contains("http"),
            "{e}"
        );
        let e = err("[server]\nmax_body_size = \"0B\"\n");
        assert!(e.contains("server.max_body_size"), "{e}");
        let e = err("listen = \n");
        assert!(e.starts_with("x.toml: ") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn budgets_parse_and_impossible_ones_are_named() {
        let c = Config::parse(
            "[[budget]]\nmodels = [\"gpt-image-*\"]\nrpm = 50\nipm = 5\n[queue]\nmax_wait = \"30s\"\n",
            "x.toml",
        )
        .unwrap();
        c.validate("x.toml").unwrap();
        assert_eq!(c.budgets[0].burst, Duration::from_secs(1));
        assert_eq!(c.budgets[0].display_name(), "gpt-image-*");
        assert_eq!(c.queue.max_wait, Duration::from_secs(30));
        let e = err("[[budget]]\nmodels = [\"x\"]\n");
        assert!(e.contains("key `budget[0].rpm`: a budget needs"), "{e}");
        let e = err("[[budget]]\nmodels = [\"x\"]\nrpm = 5\nburst = \"2m\"\n");
        assert!(e.contains("budget[0].burst"), "{e}");
        let e =
            err("[[budget]]\nmodels = [\"x\"]\nrpm = 5\n[[budget]]\nmodels = [\"x\"]\nrpm = 5\n");
        assert!(e.contains("budget[1].name"), "{e}");
        let e = err("[[budget]]\nmodels = [\"x\"]\nrpm = -5\n");
        assert!(e.contains("budget[0].rpm"), "{e}");
        let e = err("[estimate]\nchars_per_token = 0\n");
        assert!(e.contains("estimate.chars_per_token"), "{e}");
    }

    #[test]
    fn clients_prices_cache_and_retry_parse_as_documented() {
        let c = Config::parse(
            r#"
[[client]]
id = "batch-jobs"
rpm = 60
[prices."gpt-image-2*"]
per_image = { low = 0.01, medium = 0.04, high = 0.16 }
[prices."my-finetune-*"]
input_per_mtok = 3.0
output_per_mtok = 12.0
[cache]
scope = "global"
ttl = "10m"
[retry]
max_attempts = 2
"#,
            "x.toml",
        )
        .unwrap();
        c.validate("x.toml").unwrap();
        assert_eq!(c.clients[0].rpm, Some(60));
        assert_eq!(c.prices["gpt-image-2*"].per_image["high"], 0.16);
        assert_eq!(c.cache.scope, CacheScope::Global);
        assert_eq!(c.retry.max_attempts, 2);
        let e = err("[[client]]\nid = \"x\"\nrpm = 0\n");
        assert!(e.contains("client[0].rpm"), "{e}");
        let e = err("[cache]\nscope = \"everyone\"\n");
        assert!(e.contains("cache.scope"), "{e}");
        let e = err("[retry]\nmax_attempts = 0\n");
        assert!(e.contains("retry.max_attempts"), "{e}");
        let e = err("[prices.\"x\"]\nper_imag = {}\n");
        assert!(e.contains("per_imag"), "{e}");
    }

    #[test]
    fn env_overrides_addresses_and_url() {
        let mut c = Config::default();
        c.apply_env(
            |k| match k {
                ENV_LISTEN => Some("127.0.0.1:0".into()),
                ENV_UPSTREAM_URL => Some("http://127.0.0.1:1".into()),
                _ => None,
            },
            "x.toml",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.upstream.base_url, "http://127.0.0.1:1");
        let e = c
            .apply_env(|k| (k == ENV_ADMIN_LISTEN).then(|| "nope".into()), "x.toml")
            .unwrap_err();
        assert!(e.to_string().contains("admin_listen"));
    }

    #[test]
    fn check_output_redacts_url_credentials() {
        let mut c = Config::default();
        c.upstream.base_url = "https://user:sk-secret@example.com/openai".into();
        c.state.redis_url = "rediss://default:hunter2@redis.internal:6380/0".into();
        let out = c.to_redacted_toml();
        assert!(!out.contains("sk-secret"), "{out}");
        assert!(out.contains("example.com/openai"), "{out}");
        assert!(!out.contains("hunter2"), "{out}");
        assert!(out.contains("redis.internal:6380/0"), "{out}");
    }
}
