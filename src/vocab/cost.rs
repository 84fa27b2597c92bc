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

    pub(crate) fn add(&mut self, other: &Cost) {
        self.requests = self.requests.saturating_add(other.requests);
        self.tokens = self.tokens.saturating_add(other.tokens);
        self.images = self.images.saturating_add(other.images);
    }
}

/// Per-minute limits of a pool and how they are enforced: a sliding burst
/// window that holds no more than its share of the minute (rounded up), a
/// sliding minute, and a sustained rate of the limit times the safety
/// fraction. The in-process ledger and the shared one in Redis read the same.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// requests, tokens, images per minute; `None` is unlimited.
    pub per_minute: [Option<u64>; 3],
    pub burst: std::time::Duration,
    pub margin: std::time::Duration,
    /// The fraction of `per_minute` used on average: 1 for a configured
    /// budget, `learn.safety` for an announced limit.
    pub safety: f64,
}

impl Limits {
    /// What the pool admits a minute on average, per dimension.
    pub(crate) fn sustained(&self) -> [Option<u64>; 3] {
        let s = self.safety_fraction();
        self.per_minute
            .map(|l| l.map(|l| ((l as f64 * s).floor() as u64).max(1)))
    }

    /// The safety fraction, within (0, 1].
    pub(crate) fn safety_fraction(&self) -> f64 {
        if self.safety.is_finite() {
            self.safety.clamp(0.01, 1.0)
        } else {
            1.0
        }
    }

    /// What one burst window admits of each limit: its share of the minute,
    /// rounded up (the sustained rate keeps the average at the share), at
    /// least one; `u64::MAX` where unlimited.
    pub(crate) fn burst_caps(&self) -> [u64; 3] {
        let burst_ms = self.burst.as_millis().max(1);
        self.per_minute.map(|l| {
            l.map_or(u64::MAX, |l| {
                let share = (u128::from(l) * burst_ms).div_ceil(60_000);
                u64::try_from(share).unwrap_or(u64::MAX).max(1)
            })
        })
    }

    /// How much a dimension's bucket holds before it paces calls at the
    /// sustained rate: a minute's worth at that rate, at least a burst
    /// window's (0: unlimited). After a quiet spell so much may go at the
    /// burst windows' pace: a bucket only a window deep would pace a limit
    /// of 5 a minute at one every 12 s from the first call.
    pub(crate) fn depths(&self) -> [f64; 3] {
        let caps = self.burst_caps();
        let minute = self.sustained();
        std::array::from_fn(|d| match (caps[d], minute[d]) {
            (u64::MAX, _) | (_, None) => 0.0,
            (cap, Some(m)) => cap.max(m) as f64,
        })
    }

    /// The sustained rate of each dimension, in units a second (0: unlimited).
    pub(crate) fn rates(&self) -> [f64; 3] {
        let s = self.safety_fraction();
        self.per_minute
            .map(|l| l.map_or(0.0, |l| l as f64 * s / 60.0))
    }
}

/// What an image request asked for, to price it by the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageAsk {
    pub(crate) n: u64,
    pub(crate) quality: Option<String>,
    pub(crate) size: Option<String>,
}

/// An image size as OpenAI writes it: `"1024x1536"` is (1024, 1536).
pub(crate) fn parse_image_size(s: &str) -> Option<(u64, u64)> {
    let (w, h) = s.split_once('x')?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}

/// Image output tokens by quality, then size: `{"high": {"1024x1024": 4160}}`.
pub(crate) type ImageTable = BTreeMap<String, BTreeMap<String, u64>>;

/// Checks that every size in the tables (model glob -> table) is a size: the
/// first that is not, as its key below `image_output_tokens`, and what was
/// expected.
pub(crate) fn check_image_tables(
    tables: &BTreeMap<String, ImageTable>,
) -> Result<(), (String, String)> {
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

/// Batch's share of turns when `queue.batch_min_share` is not set.
pub(crate) const DEFAULT_BATCH_SHARE: f64 = 0.1;

/// Who goes first when a pool is short: interactive waiters, then batch
/// (which keeps a minimum share so it never starves).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

impl Priority {
    /// `x-penstock-priority`'s value, if it names a class.
    pub(crate) fn parse(text: &str) -> Option<Priority> {
        match text.trim().to_ascii_lowercase().as_str() {
            "interactive" => Some(Priority::Interactive),
            "batch" => Some(Priority::Batch),
            _ => None,
        }
    }
}
