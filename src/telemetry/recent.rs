//! What the admin page shows of the last minutes: running totals, sampled
//! every [`SAMPLE_EVERY`] for [`KEPT`] samples (fifteen minutes), and the last
//! [`MAX_REFUSALS`] refusals penstock answered itself.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::{Value, json};

/// How often the totals are sampled.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Samples kept: fifteen minutes.
const KEPT: usize = 90;
/// Refusals kept, newest first.
pub(crate) const MAX_REFUSALS: usize = 50;
/// The longest refusal message kept, in characters.
const MAX_MESSAGE: usize = 300;

/// Running totals since the start.
#[derive(Default)]
struct Totals {
    requests: AtomicU64,
    upstream_calls: AtomicU64,
    upstream_429: AtomicU64,
    upstream_errors: AtomicU64,
    refused: AtomicU64,
    /// Requests that waited for budget, and their waits.
    waited: AtomicU64,
    wait_ms: AtomicU64,
    cache_hits: AtomicU64,
    coalesced: AtomicU64,
    /// Millionths of a dollar.
    spend: AtomicU64,
    saved: AtomicU64,
}

/// The totals at one time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Sample {
    /// Seconds since the Unix epoch.
    pub(crate) at: u64,
    pub(crate) requests: u64,
    pub(crate) upstream_calls: u64,
    pub(crate) upstream_429: u64,
    pub(crate) upstream_errors: u64,
    pub(crate) refused: u64,
    pub(crate) waited: u64,
    pub(crate) wait_ms: u64,
    /// The longest wait since the sample before (not a total).
    pub(crate) wait_max_ms: u64,
    pub(crate) cache_hits: u64,
    pub(crate) coalesced: u64,
    pub(crate) spend_usd: f64,
    pub(crate) saved_usd: f64,
}

/// A refusal penstock answered itself.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Refusal {
    pub(crate) at: String,
    pub(crate) status: u16,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) route: &'static str,
    pub(crate) model: Option<String>,
    /// The client's id (`key:…` or its sidecar name), never a key.
    pub(crate) client: Option<String>,
}

/// The last upstream failure seen.
#[derive(Debug, Clone, Serialize)]
struct Failure {
    at: String,
    outcome: &'static str,
}

#[derive(Default)]
pub(crate) struct Recent {
    totals: Totals,
    /// The longest wait since the last sample.
    wait_max_ms: AtomicU64,
    samples: Mutex<VecDeque<Sample>>,
    refusals: Mutex<VecDeque<Refusal>>,
    last_failure: Mutex<Option<Failure>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn add(counter: &AtomicU64, n: u64) {
    // Saturating: the numbers come from clients and the upstream.
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_add(n))
    });
}

/// Dollars as millionths, saturating (and nothing for what is not a cost).
fn micros(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * 1e6).round() as u64
    } else {
        0
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Recent {
    /// A request's answer, when it is over.
    pub(crate) fn answered(&self, cache: &str, queued: Duration, cost_usd: f64, saved_usd: f64) {
        let t = &self.totals;
        add(&t.requests, 1);
        match cache {
            "hit" => add(&t.cache_hits, 1),
            "coalesced" => add(&t.coalesced, 1),
            _ => {}
        }
        if !queued.is_zero() {
            let ms = u64::try_from(queued.as_millis()).unwrap_or(u64::MAX);
            add(&t.waited, 1);
            add(&t.wait_ms, ms);
            self.wait_max_ms.fetch_max(ms, Ordering::Relaxed);
        }
        add(&t.spend, micros(cost_usd));
        add(&t.saved, micros(saved_usd));
    }

    /// An attempt's outcome, as `classify::attempt_label` names it.
    pub(crate) fn attempt(&self, outcome: &'static str) {
        let t = &self.totals;
        add(&t.upstream_calls, 1);
        match outcome {
            "success" | "client_error" => return,
            "rate_limited" => add(&t.upstream_429, 1),
            _ => add(&t.upstream_errors, 1),
        }
        *locked(&self.last_failure) = Some(Failure {
            at: now_rfc3339(),
            outcome,
        });
    }

    /// A refusal penstock answered itself.
    pub(crate) fn refused(&self, mut refusal: Refusal) {
        add(&self.totals.refused, 1);
        if let Some((cut, _)) = refusal.message.char_indices().nth(MAX_MESSAGE) {
            refusal.message.truncate(cut);
        }
        let mut kept = locked(&self.refusals);
        if kept.len() == MAX_REFUSALS {
            kept.pop_back();
        }
        kept.push_front(refusal);
    }

    /// The totals now; `reset` starts the next interval's longest wait.
    fn now(&self, reset: bool) -> Sample {
        let t = &self.totals;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Sample {
            at: unix_now(),
            requests: get(&t.requests),
            upstream_calls: get(&t.upstream_calls),
            upstream_429: get(&t.upstream_429),
            upstream_errors: get(&t.upstream_errors),
            refused: get(&t.refused),
            waited: get(&t.waited),
            wait_ms: get(&t.wait_ms),
            wait_max_ms: if reset {
                self.wait_max_ms.swap(0, Ordering::Relaxed)
            } else {
                get(&self.wait_max_ms)
            },
            cache_hits: get(&t.cache_hits),
            coalesced: get(&t.coalesced),
            spend_usd: get(&t.spend) as f64 / 1e6,
            saved_usd: get(&t.saved) as f64 / 1e6,
        }
    }

    /// Takes a sample (every [`SAMPLE_EVERY`]).
    pub(crate) fn sample(&self) {
        let now = self.now(true);
        let mut samples = locked(&self.samples);
        if samples.len() > KEPT {
            samples.pop_front();
        }
        samples.push_back(now);
    }

    /// The totals, what happened in each interval of the last fifteen
    /// minutes (the last one still running), the last failure upstream and
    /// the last refusals, newest first.
    pub(crate) fn view(&self) -> Value {
        let now = self.now(false);
        let samples = locked(&self.samples);
        let mut history = Vec::with_capacity(samples.len() + 1);
        let mut before: Option<&Sample> = None;
        for s in samples.iter().chain(std::iter::once(&now)) {
            if let Some(b) = before {
                history.push(delta(b, s));
            }
            before = Some(s);
        }
        json!({
            "sample_secs": SAMPLE_EVERY.as_secs(),
            "totals": now,
            "history": history,
            "last_upstream_failure": *locked(&self.last_failure),
            "refusals": *locked(&self.refusals),
        })
    }
}

/// What happened between two samples.
fn delta(a: &Sample, b: &Sample) -> Sample {
    Sample {
        at: b.at,
        requests: b.requests.saturating_sub(a.requests),
        upstream_calls: b.upstream_calls.saturating_sub(a.upstream_calls),
        upstream_429: b.upstream_429.saturating_sub(a.upstream_429),
        upstream_errors: b.upstream_errors.saturating_sub(a.upstream_errors),
        refused: b.refused.saturating_sub(a.refused),
        waited: b.waited.saturating_sub(a.waited),
        wait_ms: b.wait_ms.saturating_sub(a.wait_ms),
        wait_max_ms: b.wait_max_ms,
        cache_hits: b.cache_hits.saturating_sub(a.cache_hits),
        coalesced: b.coalesced.saturating_sub(a.coalesced),
        spend_usd: (b.spend_usd - a.spend_usd).max(0.0),
        saved_usd: (b.saved_usd - a.saved_usd).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(i: usize) -> Refusal {
        Refusal {
            at: now_rfc3339(),
            status: 429,
            code: "penstock_queue_timeout",
            message: format!("refusal {i} {}", "é".repeat(1000)),
            route: "images.generations",
            model: None,
            client: Some("key:abc".into()),
        }
    }

    #[test]
    fn intervals_are_differences_and_the_last_one_is_running() {
        let r = Recent::default();
        r.sample();
        r.answered("", Duration::from_millis(300), 0.04, 0.0);
        r.answered("hit", Duration::ZERO, 0.0, 0.04);
        r.attempt("success");
        r.attempt("rate_limited");
        r.sample();
        r.answered("coalesced", Duration::from_millis(100), 0.0, 0.04);
        let v = r.view();
        let history = v["history"].as_array().unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[0]["requests"], 2);
        assert_eq!(history[0]["upstream_calls"], 2);
        assert_eq!(history[0]["upstream_429"], 1);
        assert_eq!(history[0]["wait_max_ms"], 300);
        assert_eq!(history[0]["spend_usd"], 0.04);
        assert_eq!(history[1]["requests"], 1);
        assert_eq!(history[1]["coalesced"], 1);
        assert_eq!(history[1]["wait_max_ms"], 100);
        assert_eq!(v["totals"]["requests"], 3);
        assert_eq!(v["totals"]["saved_usd"], 0.08);
        assert_eq!(v["last_upstream_failure"]["outcome"], "rate_limited");
    }

    #[test]
    fn fifteen_minutes_and_fifty_refusals_are_kept() {
        let r = Recent::default();
        for _ in 0..500 {
            r.sample();
        }
        for i in 0..120 {
            r.refused(refusal(i));
        }
        let v = r.view();
        assert_eq!(v["history"].as_array().unwrap().len(), KEPT + 1);
        let refusals = v["refusals"].as_array().unwrap();
        assert_eq!(refusals.len(), MAX_REFUSALS);
        assert!(
            refusals[0]["message"]
                .as_str()
                .unwrap()
                .starts_with("refusal 119")
        );
        assert_eq!(
            refusals[0]["message"].as_str().unwrap().chars().count(),
            MAX_MESSAGE
        );
        assert_eq!(v["totals"]["refused"], 120);
    }

    #[test]
    fn numbers_from_outside_saturate() {
        let r = Recent::default();
        r.answered("", Duration::MAX, f64::MAX, f64::NAN);
        r.answered("", Duration::MAX, 1e300, -1.0);
        let v = r.view();
        assert_eq!(v["totals"]["wait_ms"], u64::MAX);
        assert_eq!(v["totals"]["saved_usd"], 0.0);
        assert!(v["totals"]["spend_usd"].as_f64().unwrap() > 1e12);
    }
}
