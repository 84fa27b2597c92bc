//! The second floor. The configuration tree: serde structs with defaults, one
//! file per part, parsed from TOML and checked by [`Config::validate`] (each
//! part's own rules in its file) before anything binds. Every error names the
//! file, the key and what was expected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
        if self.admin.token_env.as_ref().is_some_and(String::is_empty) {
            return Err(bad(
                "admin.token_env",
                "expected the name of an environment variable".into(),
            ));
        }
        // Each part its own rules, in the order of the file.
        let up_names = self.upstream.validate(&bad)?;
        self.server.validate(&bad)?;
        self.state.validate(&bad)?;
        self.jobs.validate(&bad)?;
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
            if let Some(u) = b.upstream.as_ref().filter(|u| !up_names.contains(*u)) {
                return Err(bad("upstream", format!("{u:?} names no upstream")));
            }
        }
        self.retry.validate(&bad)?;
        self.cache.validate(&bad)?;
        for (i, c) in self.clients.iter().enumerate() {
            c.validate(&|field, m| bad(&format!("client[{i}].{field}"), m))?;
        }
        self.spend.validate(&bad)?;
        self.queue.validate(&bad)?;
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
        self.learn.validate(&bad)?;
        self.estimate.validate(&bad)
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
    use std::time::Duration;

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
