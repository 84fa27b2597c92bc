//! What a request costs: per rate-limit dimension, and what an image request
//! asks for (to price it by the image).

use std::collections::BTreeMap;

/// What one call costs, per dimension.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    pub requests: u64,
    pub tokens: u64,
    pub images: u64,
}

impl Cost {
    /// requests, tokens, images, in the ledger's order.
    pub fn dims(&self) -> [u64; 3] {
        [self.requests, self.tokens, self.images]
    }

    pub fn add(&mut self, other: &Cost) {
        self.requests = self.requests.saturating_add(other.requests);
        self.tokens = self.tokens.saturating_add(other.tokens);
        self.images = self.images.saturating_add(other.images);
    }
}

/// What an image request asked for, to price it by the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageAsk {
    pub n: u64,
    pub quality: Option<String>,
    pub size: Option<String>,
}

/// An image size as OpenAI writes it: `"1024x1536"` is (1024, 1536).
pub fn parse_image_size(s: &str) -> Option<(u64, u64)> {
    let (w, h) = s.split_once('x')?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}

/// Image output tokens by quality, then size: `{"high": {"1024x1024": 4160}}`.
pub type ImageTable = BTreeMap<String, BTreeMap<String, u64>>;

/// Checks that every size in the tables (model glob -> table) is a size: the
/// first that is not, as its key below `image_output_tokens`, and what was
/// expected.
pub fn check_image_tables(tables: &BTreeMap<String, ImageTable>) -> Result<(), (String, String)> {
    for (glob, table) in tables {
        for (quality, sizes) in table {
            if let Some(size) = sizes.keys().find(|s| parse_image_size(s).is_none()) {
                return Err((
                    format!("image_output_tokens.{glob:?}.{quality}.{size:?}"),
                    "expected a size like \"1024x1024\"".into(),
                ));
            }
        }
    }
    Ok(())
}
