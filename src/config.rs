//! The configuration tree: serde structs with defaults, parsed from TOML and checked
//! by [`Config::validate`] before anything binds. Every error names the file, the key
//! and what was expected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::vocab::cost::{ImageTable, check_image_tables};
use crate::vocab::route::ROUTE_LABELS;

/// Environment variables that override the file, for containers and tests.
pub const ENV_LISTEN: &str = "PENSTOCK_LISTEN";
pub const ENV_ADMIN_LISTEN: &str = "PENSTOCK_ADMIN_LISTEN";
pub const ENV_UPSTREAM_URL: &str = "PENSTOCK_UPSTREAM_BASE_URL";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {}{message}{}", key_prefix(.key), line_suffix(*.line))]
    Invalid {
        file: String,
        /// Dotted path of the offending key, when known.
        key: Option<String>,
        message: String,
        line: Option<usize>,
    },
}

fn key_prefix(key: &Option<String>) -> String {
    key.as_ref()
        .map(|k| format!("key `{k}`: "))
        .unwrap_or_default()
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(" (line {l})")).unwrap_or_default()
}

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

fn default_fallback_after() -> Duration {
    Duration::from_secs(30)
}

/// `[admin]`: who may read the admin listener.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The environment variable holding a bearer token that the page,
    /// `/status` and `/metrics` require (`/healthz` and `/readyz` stay open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
}

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

fn default_jobs_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_jobs_max_bytes() -> ByteSize {
    ByteSize::gib(1)
}
fn default_jobs_max_per_tenant() -> usize {
    1000
}
fn default_jobs_max_total() -> usize {
    10_000
}
fn default_jobs_max_running() -> usize {
    256
}
fn default_webhook_attempts() -> u32 {
    5
}
fn default_webhook_backoff() -> Duration {
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

/// Which state backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process: one binary, nothing else to start.
    #[default]
    Memory,
    /// In Redis: several replicas share one budget, cache and breaker.
    Redis,
}

/// `[state]`: shared state for several replicas.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    #[serde(default)]
    pub backend: Backend,
    /// `redis://[user:password@]host:port[/db]` or `rediss://` (TLS).
    #[serde(default = "default_redis_url")]
    pub redis_url: String,
    /// Every key penstock writes starts with it, so deployments can share a Redis.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    #[serde(default = "default_redis_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The longest one Redis command may take before penstock treats Redis as
    /// unavailable for that request.
    #[serde(default = "default_redis_command_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How often a replica says it is alive (and checks Redis's health).
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Replicas sharing the limits, for the share each keeps while Redis is
    /// unavailable (`1/replicas` of each limit). Unset: the most replicas seen
    /// alive in Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// How long a replica leading a shared call holds its lease without renewing
    /// it; a dead leader's call is taken over after it.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// Redis Sentinel: the sentinels' addresses (`host:port` or
    /// `redis://host:port`); the primary of `sentinel_master` is found
    /// through them and followed on failover. `redis_url`'s password, user,
    /// database and TLS apply to the primary.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentinel_master: Option<String>,
    /// Redis Cluster: some of its nodes (`redis://host:port`); the rest are
    /// found from them. Every key of one pool, job queue or answer shares a
    /// hash tag.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_nodes: Vec<String>,
}

fn default_redis_url() -> String {
    "redis://127.0.0.1:6379".to_string()
}
fn default_key_prefix() -> String {
    "penstock".to_string()
}
fn default_redis_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_redis_command_timeout() -> Duration {
    Duration::from_millis(250)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(1)
}
fn default_lease() -> Duration {
    Duration::from_secs(10)
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            backend: Backend::Memory,
            redis_url: default_redis_url(),
            key_prefix: default_key_prefix(),
            connect_timeout: default_redis_connect_timeout(),
            command_timeout: default_redis_command_timeout(),
            heartbeat: default_heartbeat(),
            replicas: None,
            lease: default_lease(),
            sentinels: Vec::new(),
            sentinel_master: None,
            cluster_nodes: Vec::new(),
        }
    }
}

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

fn default_true() -> bool {
    true
}
fn default_cache_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_cache_max_size() -> ByteSize {
    ByteSize::mib(512)
}
fn default_cache_max_entry_size() -> ByteSize {
    ByteSize::mib(64)
}
fn default_cache_paths() -> Vec<String> {
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

fn default_max_attempts() -> u32 {
    4
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(250)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(20)
}
fn default_budget_percent() -> f32 {
    30.0
}
fn default_min_retries_per_second() -> u32 {
    1
}
fn default_deadline() -> Duration {
    Duration::from_secs(600)
}
fn default_quota_cooldown() -> Duration {
    Duration::from_secs(60)
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

fn default_learn_safety() -> f64 {
    0.95
}
fn default_learn_max_in_flight() -> usize {
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

fn default_batch_min_share() -> f64 {
    crate::vocab::cost::DEFAULT_BATCH_SHARE
}

fn default_probe_grace() -> Duration {
    Duration::from_secs(2)
}

/// How a request's cost is estimated before it is sent; the response's `usage`
/// corrects it afterwards.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EstimateConfig {
    /// Output tokens assumed for a text request that sets no `max_tokens`.
    #[serde(default = "default_max_output_tokens")]
    pub default_max_output_tokens: u64,
    /// Characters per token in OpenAI's rate-limit estimate of a request's
    /// text; fewer is more cautious.
    #[serde(default = "default_chars_per_token")]
    pub chars_per_token: f64,
    /// What penstock gives back to a budget after a call: `"refused"` (only a
    /// call the upstream refused for its rate limit), `"failed"` (also calls
    /// that failed) or `"unused"` (also the unused tokens of a call, once its
    /// `usage` is known). OpenAI's limiter keeps what it charged at arrival, so
    /// anything past `"refused"` may over-admit.
    #[serde(default)]
    pub refund: Refund,
    /// Route -> the model OpenAI uses when a request names none (no `model`,
    /// `null`, or not a string), so that request spends, and is budgeted as,
    /// that model. Routes: `images.generations`, `images.edits`,
    /// `images.variations`, `chat.completions`, `completions`, `responses`,
    /// `embeddings`.
    #[serde(default = "default_models")]
    pub default_model: std::collections::BTreeMap<String, String>,
    /// Model glob -> quality -> size -> output tokens per image, before the
    /// built-in gpt-image-1 table.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub image_output_tokens: std::collections::BTreeMap<String, ImageTable>,
}

/// See [`EstimateConfig::refund`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Refund {
    #[default]
    Refused,
    Failed,
    Unused,
}

/// USD prices of one model (or glob of models).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// USD per million input text tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_per_mtok: Option<f64>,
    /// USD per million input image tokens (edits); text price when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_input_per_mtok: Option<f64>,
    /// USD per million output tokens (image tokens, for image models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_per_mtok: Option<f64>,
    /// USD per 1024x1024 image by quality, when there are no token prices or no
    /// `usage`; other sizes scale by area.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub per_image: std::collections::BTreeMap<String, f64>,
}

/// The OpenAI-compatible upstream.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// How `/status`, logs and `x-penstock-upstream` name it (with several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Model globs it serves (none: every model).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// What it speaks: OpenAI's API, or Azure OpenAI's.
    #[serde(default)]
    pub kind: UpstreamKind,
    /// Azure: the deployment serving each model (a model not named goes by
    /// its own name).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub deployments: std::collections::BTreeMap<String, String>,
    /// Azure: with an `api_version`, calls go to deployment paths
    /// (`/openai/deployments/{deployment}/...?api-version=`); without, to
    /// the v1 API (`/openai/v1/...`, the deployment as `model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// Scheme, host and optional path prefix; request paths are appended as they come.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Sidecar mode: the name of an environment variable holding the API key penstock
    /// sends upstream in place of whatever the client sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Sidecar mode: `OpenAI-Organization` sent upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    /// Sidecar mode: `OpenAI-Project` sent upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// PEM file of extra root certificates (a private CA), trusted besides webpki roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Time allowed to open a TCP+TLS connection.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time one upstream attempt may take until its response head arrives; image
    /// generations take a minute, so this is minutes, not seconds.
    #[serde(default = "default_attempt_timeout", with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// How long an idle pooled connection is kept.
    #[serde(default = "default_pool_idle_timeout", with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Once an answer's head has come, the longest gap between its body's
    /// bytes (or a stream's events) before the call counts as broken.
    #[serde(default = "default_read_timeout", with = "humantime_serde")]
    pub read_timeout: Duration,
    /// HTTP/2 pings to the upstream this often, so a dead connection is found
    /// even while no bytes are due.
    #[serde(default = "default_keep_alive_interval", with = "humantime_serde")]
    pub keep_alive_interval: Duration,
    /// Failures in a row (no answer, a timeout, a 5xx) that open the
    /// upstream's breaker: calls are answered at once (503) until a probe
    /// gets an answer. 0 turns it off.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// The first cool-down of an open breaker; each failed probe doubles it
    /// (up to a minute).
    #[serde(default = "default_breaker_cooldown", with = "humantime_serde")]
    pub breaker_cooldown: Duration,
}

fn default_breaker_failures() -> u32 {
    // An upstream failing one call in five fails ten in a row once in ten
    // million: only an outage opens it.
    10
}

fn default_breaker_cooldown() -> Duration {
    Duration::from_secs(2)
}

/// What an upstream speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    #[default]
    Openai,
    Azure,
}

/// One upstream (`[upstream]`) or several (`[[upstream]]`); never none.
#[derive(Debug, Clone)]
pub struct Upstreams(Vec<UpstreamConfig>);

impl Default for Upstreams {
    fn default() -> Self {
        Upstreams(vec![UpstreamConfig::default()])
    }
}

impl std::ops::Deref for Upstreams {
    type Target = UpstreamConfig;
    /// The first: the default upstream.
    fn deref(&self) -> &UpstreamConfig {
        &self.0[0]
    }
}

impl std::ops::DerefMut for Upstreams {
    fn deref_mut(&mut self) -> &mut UpstreamConfig {
        &mut self.0[0]
    }
}

impl Upstreams {
    pub fn all(&self) -> &[UpstreamConfig] {
        &self.0
    }

    pub fn all_mut(&mut self) -> &mut Vec<UpstreamConfig> {
        &mut self.0
    }

    /// Several upstreams from a list (the first is the default); none is the
    /// default upstream alone.
    pub fn from_list(list: Vec<UpstreamConfig>) -> Upstreams {
        match list.is_empty() {
            true => Upstreams::default(),
            false => Upstreams(list),
        }
    }

    /// An upstream's name: its own, else `default` for the first and
    /// `upstream-N` for the others.
    pub fn name_of(&self, i: usize) -> String {
        match (self.0.get(i).and_then(|u| u.name.clone()), i) {
            (Some(n), _) => n,
            (None, 0) => "default".to_string(),
            (None, i) => format!("upstream-{i}"),
        }
    }

    /// The credential whose pools penstock's own key for upstream `i` pays:
    /// `sidecar` for the first (as with one upstream), `sidecar@name` for
    /// the others.
    pub fn credential(&self, i: usize) -> String {
        match i {
            0 => "sidecar".to_string(),
            i => format!("sidecar@{}", self.name_of(i)),
        }
    }

    /// The config key of upstream `i`'s field `key`: `upstream.key` with one,
    /// `upstream[i].key` with several.
    pub fn key(&self, i: usize, key: &str) -> String {
        match self.0.len() {
            1 => format!("upstream.{key}"),
            _ => format!("upstream[{i}].{key}"),
        }
    }
}

impl Serialize for Upstreams {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Upstreams {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Upstreams;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an [upstream] table or [[upstream]] tables")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Upstreams, A::Error> {
                let one =
                    UpstreamConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Upstreams(vec![one]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Upstreams, A::Error> {
                let many = Vec::<UpstreamConfig>::deserialize(
                    serde::de::value::SeqAccessDeserializer::new(seq),
                )?;
                if many.is_empty() {
                    return Err(serde::de::Error::custom(
                        "expected at least one [[upstream]]",
                    ));
                }
                Ok(Upstreams(many))
            }
        }
        d.deserialize_any(Visit)
    }
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

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_lingering_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_lingering_time() -> Duration {
    Duration::from_secs(30)
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_buffered() -> ByteSize {
    ByteSize::mib(512)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_keep_alive_interval() -> Duration {
    Duration::from_secs(30)
}

fn default_listen() -> SocketAddr {
    ([127, 0, 0, 1], 8080).into()
}
fn default_admin_listen() -> SocketAddr {
    ([127, 0, 0, 1], 9090).into()
}
fn default_base_url() -> String {
    "https://api.openai.com".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_attempt_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_pool_idle_timeout() -> Duration {
    Duration::from_secs(90)
}
fn default_max_body_size() -> ByteSize {
    ByteSize::mib(64)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_client_id_header() -> String {
    "x-penstock-client".into()
}
fn default_burst() -> Duration {
    Duration::from_secs(1)
}
/// The longest margin a window may add: the shared ledger keeps a pool's
/// keys a while past the minute window and its margin.
const MAX_MARGIN: Duration = Duration::from_secs(10);

fn default_safety_margin() -> Duration {
    Duration::from_millis(50)
}
fn default_max_wait() -> Duration {
    Duration::from_secs(120)
}
fn default_max_depth() -> usize {
    10_000
}
fn default_max_output_tokens() -> u64 {
    4096
}

/// OpenAI's defaults when `model` is left out. Its images reference named
/// dall-e-2 for generations and edits before retiring dall-e-2 and -3; the GPT
/// image model is the cautious guess now (it is what image budgets cover).
fn default_models() -> std::collections::BTreeMap<String, String> {
    [
        ("images.generations", "gpt-image-1"),
        ("images.edits", "gpt-image-1"),
        ("images.variations", "dall-e-2"),
    ]
    .into_iter()
    .map(|(r, m)| (r.to_string(), m.to_string()))
    .collect()
}

fn default_chars_per_token() -> f64 {
    4.0
}

impl Default for EstimateConfig {
    fn default() -> Self {
        EstimateConfig {
            default_max_output_tokens: default_max_output_tokens(),
            chars_per_token: default_chars_per_token(),
            refund: Refund::default(),
            default_model: default_models(),
            image_output_tokens: Default::default(),
        }
    }
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

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            name: None,
            models: Vec::new(),
            kind: UpstreamKind::Openai,
            deployments: Default::default(),
            api_version: None,
            base_url: default_base_url(),
            api_key_env: None,
            organization: None,
            project: None,
            ca_file: None,
            connect_timeout: default_connect_timeout(),
            attempt_timeout: default_attempt_timeout(),
            pool_idle_timeout: default_pool_idle_timeout(),
            read_timeout: default_read_timeout(),
            keep_alive_interval: default_keep_alive_interval(),
            breaker_failures: default_breaker_failures(),
            breaker_cooldown: default_breaker_cooldown(),
        }
    }
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
        // Several upstreams: each is checked as the first is, has a name of
        // its own and penstock's own key (requests are spread over them).
        let ups = self.upstream.all();
        if ups.len() > 64 {
            return Err(bad(
                "upstream",
                format!("{} upstreams: at most 64", ups.len()),
            ));
        }
        let mut up_names = std::collections::HashSet::new();
        for (i, u) in ups.iter().enumerate() {
            let key = |field: &str| self.upstream.key(i, field);
            if i > 0 {
                crate::vocab::url::BaseUrl::parse(&u.base_url)
                    .map_err(|m| bad(&key("base_url"), m))?;
                if let Some(ca) = u.ca_file.as_ref().filter(|ca| !ca.is_file()) {
                    return Err(bad(
                        &key("ca_file"),
                        format!("{} is not a readable file", ca.display()),
                    ));
                }
                for (field, d) in [
                    ("connect_timeout", u.connect_timeout),
                    ("attempt_timeout", u.attempt_timeout),
                    ("read_timeout", u.read_timeout),
                    ("keep_alive_interval", u.keep_alive_interval),
                ] {
                    if d.is_zero() || d > Duration::from_secs(3600) {
                        return Err(bad(
                            &key(field),
                            "expected a duration above zero and at most an hour, like \"30s\""
                                .into(),
                        ));
                    }
                }
            }
            let name = self.upstream.name_of(i);
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(bad(
                    &key("name"),
                    "expected 1 to 64 letters, digits, '-', '_' or '.'".into(),
                ));
            }
            if !up_names.insert(name.clone()) {
                return Err(bad(&key("name"), format!("{name:?} names two upstreams")));
            }
            if u.api_key_env.as_ref().is_some_and(String::is_empty) {
                return Err(bad(
                    &key("api_key_env"),
                    "expected the name of an environment variable".into(),
                ));
            }
            if ups.len() > 1 && u.api_key_env.is_none() {
                return Err(bad(
                    &key("api_key_env"),
                    "with several upstreams each sends penstock's own key: name the variable holding this one's".into(),
                ));
            }
            if u.kind == UpstreamKind::Azure && u.api_key_env.is_none() {
                return Err(bad(
                    &key("api_key_env"),
                    "an Azure upstream needs the variable holding its api-key".into(),
                ));
            }
            if u.models.iter().any(String::is_empty) {
                return Err(bad(
                    &key("models"),
                    "expected model globs, like \"gpt-image-*\"".into(),
                ));
            }
            if u.kind != UpstreamKind::Azure
                && (!u.deployments.is_empty() || u.api_version.is_some())
            {
                return Err(bad(
                    &key("kind"),
                    "deployments and api_version are for kind = \"azure\"".into(),
                ));
            }
            if let Some((m, d)) = u.deployments.iter().find(|(m, d)| {
                m.is_empty()
                    || d.is_empty()
                    || !d
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            }) {
                return Err(bad(
                    &key("deployments"),
                    format!(
                        "{m:?} = {d:?}: expected a deployment name of letters, digits, '-', '_' or '.'"
                    ),
                ));
            }
            if let Some(v) = u.api_version.as_ref().filter(|v| {
                v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }) {
                return Err(bad(
                    &key("api_version"),
                    format!("{v:?}: expected a version like \"2025-04-01-preview\""),
                ));
            }
        }
        for (i, b) in self.budgets.iter().enumerate() {
            if let Some(u) = b.upstream.as_ref().filter(|u| !up_names.contains(*u)) {
                return Err(bad(
                    &format!("budget[{i}].upstream"),
                    format!("{u:?} names no upstream"),
                ));
            }
        }
        for (i, f) in self.fallbacks.iter().enumerate() {
            let key = |field: &str| format!("fallback[{i}].{field}");
            if f.models.is_empty() || f.models.iter().any(String::is_empty) {
                return Err(bad(
                    &key("models"),
                    "expected at least one model glob, like \"gpt-image-1\"".into(),
                ));
            }
            if f.to.is_empty() || f.to.iter().any(|m| m.is_empty() || m.contains(['*', '?'])) {
                return Err(bad(
                    &key("to"),
                    "expected at least one model name (not a glob), like \"gpt-image-1-mini\""
                        .into(),
                ));
            }
            if f.after > Duration::from_secs(24 * 3600) {
                return Err(bad(
                    &key("after"),
                    "expected at most a day, like \"30s\"".into(),
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, b) in self.budgets.iter().enumerate() {
            let key = |field: &str| format!("budget[{i}].{field}");
            if b.models.is_empty() || b.models.iter().any(String::is_empty) {
                return Err(bad(
                    &key("models"),
                    "expected at least one model glob, like \"gpt-image-*\"".into(),
                ));
            }
            if b.rpm.is_none() && b.tpm.is_none() && b.ipm.is_none() {
                return Err(bad(
                    &key("rpm"),
                    "a budget needs at least one of rpm, tpm, ipm".into(),
                ));
            }
            for (field, v) in [("rpm", b.rpm), ("tpm", b.tpm), ("ipm", b.ipm)] {
                if v == Some(0) {
                    return Err(bad(&key(field), "expected a number above zero".into()));
                }
            }
            if b.burst.is_zero() || b.burst > Duration::from_secs(60) {
                return Err(bad(
                    &key("burst"),
                    "expected a duration from above zero to \"60s\"".into(),
                ));
            }
            if b.safety_margin > MAX_MARGIN {
                return Err(bad(
                    &key("safety_margin"),
                    "expected a duration of at most \"10s\"".into(),
                ));
            }
            if b.max_in_flight == Some(0) {
                return Err(bad(
                    &key("max_in_flight"),
                    "expected a number above zero".into(),
                ));
            }
            if !names.insert(b.display_name()) {
                return Err(bad(
                    &key("name"),
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
