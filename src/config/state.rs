//! `[state]`: where shared state lives (this process, or Redis).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{Bad, ConfigError, HOUR, MINUTE, durations};

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

pub(super) fn default_redis_url() -> String {
    "redis://127.0.0.1:6379".to_string()
}

pub(super) fn default_key_prefix() -> String {
    "penstock".to_string()
}

pub(super) fn default_redis_connect_timeout() -> Duration {
    Duration::from_secs(1)
}

pub(super) fn default_redis_command_timeout() -> Duration {
    Duration::from_millis(250)
}

pub(super) fn default_heartbeat() -> Duration {
    Duration::from_secs(1)
}

pub(super) fn default_lease() -> Duration {
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

impl StateConfig {
    /// Checks what the types cannot; `bad` takes whole key names.
    pub fn validate(&self, bad: Bad) -> Result<(), ConfigError> {
        durations(
            bad,
            &[
                ("state.connect_timeout", self.connect_timeout, true, MINUTE),
                ("state.command_timeout", self.command_timeout, true, MINUTE),
                ("state.heartbeat", self.heartbeat, true, MINUTE),
                ("state.lease", self.lease, true, HOUR),
            ],
        )?;
        if self.backend != Backend::Redis {
            return Ok(());
        }
        let url = &self.redis_url;
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(bad(
                "state.redis_url",
                "expected redis://host:port or rediss://host:port".into(),
            ));
        }
        if !self.sentinels.is_empty() && !self.cluster_nodes.is_empty() {
            return Err(bad(
                "state.cluster_nodes",
                "expected either state.sentinels or state.cluster_nodes, not both".into(),
            ));
        }
        if !self.sentinels.is_empty() && self.sentinel_master.is_none() {
            return Err(bad(
                "state.sentinel_master",
                "expected the name the sentinels monitor the primary by".into(),
            ));
        }
        if self.sentinel_master.is_some() && self.sentinels.is_empty() {
            return Err(bad(
                "state.sentinels",
                "expected the sentinels' addresses (host:port)".into(),
            ));
        }
        for (i, node) in self.cluster_nodes.iter().enumerate() {
            if !(node.starts_with("redis://") || node.starts_with("rediss://")) {
                return Err(bad(
                    &format!("state.cluster_nodes[{i}]"),
                    "expected redis://host:port or rediss://host:port".into(),
                ));
            }
        }
        if self.key_prefix.is_empty()
            || self.key_prefix.len() > 64
            || !self
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
        {
            return Err(bad(
                "state.key_prefix",
                "expected 1 to 64 printable characters without braces".into(),
            ));
        }
        if self.replicas == Some(0) {
            return Err(bad("state.replicas", "expected at least 1".into()));
        }
        Ok(())
    }
}
