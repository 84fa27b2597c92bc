//! `[upstream]`, or several `[[upstream]]`s: where requests go.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{Bad, ConfigError, HOUR, MINUTE, durations};

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
    /// With several: its share of calls when more than one could take a
    /// request at once (calls out are kept in proportion to weights).
    #[serde(default = "default_weight")]
    pub weight: u32,
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

pub(super) fn default_weight() -> u32 {
    1
}

pub(super) fn default_breaker_failures() -> u32 {
    // An upstream failing one call in five fails ten in a row once in ten
    // million: only an outage opens it.
    10
}

pub(super) fn default_breaker_cooldown() -> Duration {
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

pub(super) fn default_read_timeout() -> Duration {
    Duration::from_secs(60)
}

pub(super) fn default_keep_alive_interval() -> Duration {
    Duration::from_secs(30)
}

pub(super) fn default_base_url() -> String {
    "https://api.openai.com".into()
}

pub(super) fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

pub(super) fn default_attempt_timeout() -> Duration {
    Duration::from_secs(300)
}

pub(super) fn default_pool_idle_timeout() -> Duration {
    Duration::from_secs(90)
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            name: None,
            models: Vec::new(),
            weight: default_weight(),
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

impl Upstreams {
    /// Checks what the types cannot, naming `upstream.key` (one) or
    /// `upstream[i].key` (several); the upstreams' names.
    pub fn validate(&self, bad: Bad) -> Result<std::collections::HashSet<String>, ConfigError> {
        // Several upstreams: each is checked as the first is, has a name of
        // its own and penstock's own key (requests are spread over them).
        let ups = self.all();
        if ups.len() > 64 {
            return Err(bad(
                "upstream",
                format!("{} upstreams: at most 64", ups.len()),
            ));
        }
        let mut up_names = std::collections::HashSet::new();
        for (i, u) in ups.iter().enumerate() {
            let key = |field: &str| self.key(i, field);
            crate::vocab::url::BaseUrl::parse(&u.base_url).map_err(|m| bad(&key("base_url"), m))?;
            if let Some(ca) = u.ca_file.as_ref().filter(|ca| !ca.is_file()) {
                return Err(bad(
                    &key("ca_file"),
                    format!("{} is not a readable file", ca.display()),
                ));
            }
            let (connect, attempt, idle, read, ping) = (
                key("connect_timeout"),
                key("attempt_timeout"),
                key("pool_idle_timeout"),
                key("read_timeout"),
                key("keep_alive_interval"),
            );
            durations(
                bad,
                &[
                    (&connect, u.connect_timeout, true, 5 * MINUTE),
                    (&attempt, u.attempt_timeout, true, HOUR),
                    (&idle, u.pool_idle_timeout, false, HOUR),
                    (&read, u.read_timeout, true, HOUR),
                    (&ping, u.keep_alive_interval, true, HOUR),
                ],
            )?;
            let name = self.name_of(i);
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
            if u.weight == 0 || u.weight > 1000 {
                return Err(bad(&key("weight"), "expected 1 to 1000".into()));
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
        Ok(up_names)
    }
}
