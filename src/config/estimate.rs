//! `[estimate]` and `[prices]`: what a request is taken to cost.

use serde::{Deserialize, Serialize};

use super::error::{Bad, ConfigError};
use crate::vocab::cost::check_image_tables;
use crate::vocab::route::ROUTE_LABELS;

use crate::vocab::cost::ImageTable;

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

pub(super) fn default_max_output_tokens() -> u64 {
    4096
}

/// OpenAI's defaults when `model` is left out. Its images reference named
/// dall-e-2 for generations and edits before retiring dall-e-2 and -3; the GPT
/// image model is the cautious guess now (it is what image budgets cover).
pub(super) fn default_models() -> std::collections::BTreeMap<String, String> {
    [
        ("images.generations", "gpt-image-1"),
        ("images.edits", "gpt-image-1"),
        ("images.variations", "dall-e-2"),
    ]
    .into_iter()
    .map(|(r, m)| (r.to_string(), m.to_string()))
    .collect()
}

pub(super) fn default_chars_per_token() -> f64 {
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

impl EstimateConfig {
    /// Checks what the types cannot; `bad` takes whole key names.
    pub fn validate(&self, bad: Bad) -> Result<(), ConfigError> {
        let cpt = self.chars_per_token;
        if !(0.5..=100.0).contains(&cpt) {
            return Err(bad(
                "estimate.chars_per_token",
                "expected a number from 0.5 to 100".into(),
            ));
        }
        if let Some(route) = self
            .default_model
            .keys()
            .find(|r| !ROUTE_LABELS.contains(&r.as_str()))
        {
            return Err(bad(
                "estimate.default_model",
                format!("{route:?} is not a route; expected one of {ROUTE_LABELS:?}"),
            ));
        }
        check_image_tables(&self.image_output_tokens)
            .map_err(|(k, m)| bad(&format!("estimate.{k}"), m))?;
        Ok(())
    }
}
