//! What a pool reports of itself: for `/status`, the metrics and the admin
//! page.

use std::sync::Arc;

/// `/status` view of a pool.
#[derive(Debug, serde::Serialize)]
pub struct PoolStatus {
    pub(crate) name: Arc<str>,
    pub(crate) credential: Arc<str>,
    /// Configured, or learned (and how).
    pub limits: &'static str,
    /// For a learned pool: when its limits last changed (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) limits_since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_in_flight: Option<usize>,
    pub queue_depth: usize,
    /// Of them, batch requests.
    pub(crate) queue_batch: usize,
    /// How long the longest-waiting request in the queue has waited.
    pub(crate) longest_wait_ms: u64,
    pub(crate) in_flight: usize,
    /// Calls that left later than their admission allowed for (a task run
    /// late on a busy host, or a wait for a new connection), each counted
    /// from when it left.
    pub(crate) late_departures: u64,
    pub(crate) paused_for_ms: u64,
    pub(crate) remaining: std::collections::BTreeMap<&'static str, DimStatus>,
}

/// Remaining capacity of one dimension, for `/status`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct DimStatus {
    /// What the pool admits a minute on average (the limit times the safety
    /// fraction).
    pub(crate) per_minute: u64,
    /// The limit, as configured or announced.
    pub(crate) limit: u64,
    pub(crate) burst_capacity: u64,
    pub(crate) burst_remaining: u64,
    pub(crate) minute_remaining: u64,
}
