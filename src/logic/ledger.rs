//! A pool's ledger. Each admitted call is an entry (when, what it cost); the pool's
//! use is the sum of entries inside a sliding window, checked twice per dimension:
//! over the burst window (a minute's limit as the upstream enforces it, over short
//! windows) and over the minute. Entries can be corrected after the fact (refund or
//! debt, once `usage` is known), which a GCRA cell count cannot do. The upstream's
//! own `x-ratelimit-*` view and its 429 pauses are folded in as further limits.

// Per-dimension state lives in parallel arrays; indexing them by dimension reads
// more plainly than zipping four iterators.
#![allow(clippy::needless_range_loop)]

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::vocab::cost::Cost;
use crate::vocab::headers::RateLimitHeaders;

/// The most one call counts for in a dimension: far above any limit (a call
/// above a limit is refused before it is charged), and low enough that the
/// sums of a window's entries can never overflow.
const MAX_ENTRY: u64 = 1 << 40;

fn bounded(cost: &Cost) -> [u64; 3] {
    cost.dims().map(|c| c.min(MAX_ENTRY))
}

pub const DIM_NAMES: [&str; 3] = ["requests", "tokens", "images"];
const MINUTE: Duration = Duration::from_secs(60);

/// The first dimension in which `cost` is more than a whole minute's limit,
/// with that limit: such a call can never be admitted.
pub fn exceeds(per_minute: &[Option<u64>; 3], cost: &Cost) -> Option<(usize, u64)> {
    let c = cost.dims();
    (0..3).find_map(|d| {
        let limit = per_minute[d]?;
        (c[d] > limit).then_some((d, limit))
    })
}

/// Per-minute limits of a pool and how they are enforced.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// requests, tokens, images per minute; `None` is unlimited.
    pub per_minute: [Option<u64>; 3],
    pub burst: Duration,
    pub margin: Duration,
}

/// Identifies an admitted call, to settle it later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    seq: u64,
    pub at: Instant,
}

#[derive(Debug)]
struct Entry {
    at: Instant,
    cost: [u64; 3],
}

/// The upstream's word on what remains, until `until`.
#[derive(Debug, Clone, Copy)]
struct Hint {
    remaining: u64,
    until: Instant,
    /// Admission time of the call whose response carried it: newer wins.
    seen_for: Instant,
}

/// Remaining capacity of one dimension, for `/status`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DimStatus {
    pub per_minute: u64,
    pub burst_capacity: u64,
    pub burst_remaining: u64,
    pub minute_remaining: u64,
}

#[derive(Debug)]
pub struct Ledger {
    limits: Limits,
    burst_cap: [u64; 3],
    entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]`.
    first_seq: u64,
    /// Index of the first entry still inside the burst window.
    burst_from: usize,
    used_burst: [u64; 3],
    used_minute: [u64; 3],
    hints: [Option<Hint>; 3],
    paused_until: Option<Instant>,
}

/// What one burst window admits of each per-minute limit.
pub fn burst_caps(limits: &Limits) -> [u64; 3] {
    let share = limits.burst.as_secs_f64() / MINUTE.as_secs_f64();
    limits
        .per_minute
        .map(|l| l.map_or(u64::MAX, |l| ((l as f64 * share).floor() as u64).max(1)))
}

impl Ledger {
    pub fn new(limits: Limits) -> Ledger {
        let burst_cap = burst_caps(&limits);
        Ledger {
            limits,
            burst_cap,
            entries: VecDeque::new(),
            first_seq: 0,
            burst_from: 0,
            used_burst: [0; 3],
            used_minute: [0; 3],
            hints: [None; 3],
            paused_until: None,
        }
    }

    /// New per-minute limits (learned from the upstream); what was admitted
    /// stays counted.
    pub fn set_limits(&mut self, per_minute: [Option<u64>; 3]) {
        self.limits.per_minute = per_minute;
        self.burst_cap = burst_caps(&self.limits);
    }

    /// The first dimension in which `cost` is more than a whole minute's
    /// limit, with that limit: such a call can never be admitted.
    pub fn never_fits(&self, cost: &Cost) -> Option<(usize, u64)> {
        exceeds(&self.limits.per_minute, cost)
    }

    /// What one burst window admits, per dimension (`u64::MAX`: unlimited).
    pub fn burst_caps(&self) -> [u64; 3] {
        self.burst_cap
    }

    fn burst_window(&self) -> Duration {
        self.limits.burst + self.limits.margin
    }

    fn minute_window(&self) -> Duration {
        MINUTE + self.limits.margin
    }

    /// Drops what has left the windows.
    fn expire(&mut self, now: Instant) {
        let (bw, mw) = (self.burst_window(), self.minute_window());
        while let Some(e) = self.entries.front() {
            if now < e.at + mw {
                break;
            }
            for d in 0..3 {
                self.used_minute[d] -= e.cost[d];
            }
            if self.burst_from == 0 {
                for d in 0..3 {
                    self.used_burst[d] -= e.cost[d];
                }
            } else {
                self.burst_from -= 1;
            }
            self.entries.pop_front();
            self.first_seq += 1;
        }
        while let Some(e) = self.entries.get(self.burst_from) {
            if now < e.at + bw {
                break;
            }
            for d in 0..3 {
                self.used_burst[d] -= e.cost[d];
            }
            self.burst_from += 1;
        }
        if self.paused_until.is_some_and(|p| p <= now) {
            self.paused_until = None;
        }
        for h in &mut self.hints {
            if h.is_some_and(|h| h.until <= now) {
                *h = None;
            }
        }
    }

    /// When a call of `cost` could be admitted if nothing else were: `now` if it
    /// fits now. A cost larger than a whole window goes when that window is empty,
    /// so it is never refused for ever.
    pub fn ready_at(&mut self, now: Instant, cost: &Cost) -> Instant {
        self.expire(now);
        let mut at = self.paused_until.unwrap_or(now).max(now);
        let c = cost.dims();
        for d in 0..3 {
            let Some(per_minute) = self.limits.per_minute[d] else {
                continue;
            };
            if c[d] == 0 {
                continue;
            }
            let windows = [
                (
                    self.used_burst[d],
                    self.burst_cap[d],
                    self.burst_window(),
                    self.burst_from,
                ),
                (self.used_minute[d], per_minute, self.minute_window(), 0),
            ];
            for (used, cap, window, from) in windows {
                if used.saturating_add(c[d]) <= cap {
                    continue;
                }
                let need = if c[d] > cap {
                    used
                } else {
                    used.saturating_add(c[d]) - cap
                };
                let mut freed = 0u64;
                for e in self.entries.iter().skip(from) {
                    freed = freed.saturating_add(e.cost[d]);
                    if freed >= need {
                        at = at.max(e.at + window);
                        break;
                    }
                }
            }
            if let Some(h) = self.hints[d].filter(|h| h.remaining < c[d]) {
                at = at.max(h.until);
            }
        }
        at
    }

    /// Records an admitted call, sent at `now` (or a moment later: a call
    /// reserved ahead counts from when it goes; entries stay in time order).
    pub fn charge(&mut self, now: Instant, cost: &Cost) -> Ticket {
        let now = self.entries.back().map_or(now, |e| e.at.max(now));
        let c = bounded(cost);
        for d in 0..3 {
            self.used_burst[d] += c[d];
            self.used_minute[d] += c[d];
            if let Some(h) = &mut self.hints[d] {
                h.remaining = h.remaining.saturating_sub(c[d]);
            }
        }
        let seq = self.first_seq + self.entries.len() as u64;
        self.entries.push_back(Entry { at: now, cost: c });
        Ticket { seq, at: now }
    }

    /// Replaces what a call is counted as: a refund when it cost less than the
    /// estimate, debt when it cost more. A call that has left both windows no
    /// longer matters.
    pub fn settle(&mut self, ticket: Ticket, actual: &Cost) {
        let Some(idx) = ticket.seq.checked_sub(self.first_seq) else {
            return;
        };
        let idx = idx as usize;
        let in_burst = idx >= self.burst_from;
        let Some(e) = self.entries.get_mut(idx) else {
            return;
        };
        let new = bounded(actual);
        for d in 0..3 {
            self.used_minute[d] = self.used_minute[d] - e.cost[d] + new[d];
            if in_burst {
                self.used_burst[d] = self.used_burst[d] - e.cost[d] + new[d];
            }
            e.cost[d] = new[d];
        }
    }

    /// Folds in the upstream's `x-ratelimit-*` as seen on the response to the call
    /// admitted at `admitted`: it pulls the pool down when someone else spends the
    /// same key, and never raises it above penstock's own limits.
    pub fn observe(&mut self, now: Instant, admitted: Instant, headers: &RateLimitHeaders) {
        for (d, dim) in [headers.requests, headers.tokens, headers.images]
            .into_iter()
            .enumerate()
        {
            let Some(r) = dim else { continue };
            // The upstream counted at arrival: its reset runs from then (rounded,
            // so the margin again), and calls admitted since are not in its figure.
            let until = admitted + r.reset + self.limits.margin;
            if until <= now || self.hints[d].is_some_and(|h| h.seen_for > admitted) {
                continue;
            }
            let since: u64 = self
                .entries
                .iter()
                .rev()
                .take_while(|e| e.at > admitted)
                .map(|e| e.cost[d])
                .sum();
            self.hints[d] = Some(Hint {
                remaining: r.remaining.saturating_sub(since),
                until,
                seen_for: admitted,
            });
        }
    }

    /// Holds the whole pool until `until` (the upstream said it was rate limited),
    /// plus the margin: the upstream's delays are rounded and measured on its side.
    pub fn pause(&mut self, until: Instant) {
        let until = until + self.limits.margin;
        self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
    }

    pub fn paused_until(&self) -> Option<Instant> {
        self.paused_until
    }

    /// Nothing counted in any window, no pause, no hint: forgetting this ledger
    /// changes nothing.
    pub fn is_idle(&mut self, now: Instant) -> bool {
        self.expire(now);
        self.entries.is_empty()
            && self.paused_until.is_none()
            && self.hints.iter().all(Option::is_none)
    }

    /// Roughly how long until everything in `total` could have been admitted, for
    /// refusing early: whole burst windows for what exceeds the room left now.
    pub fn time_to_serve(&mut self, now: Instant, total: &Cost) -> Duration {
        self.expire(now);
        let mut wait = self.paused_until.map_or(Duration::ZERO, |p| p - now);
        let t = total.dims();
        for d in 0..3 {
            let Some(per_minute) = self.limits.per_minute[d] else {
                continue;
            };
            let room = self.burst_cap[d].saturating_sub(self.used_burst[d]);
            if t[d] > room {
                let windows = (t[d] - room).div_ceil(self.burst_cap[d]);
                wait = wait.max(self.burst_window() * windows.min(u32::MAX as u64) as u32);
            }
            let room = per_minute.saturating_sub(self.used_minute[d]);
            if t[d] > room {
                let minutes = (t[d] - room).div_ceil(per_minute);
                wait = wait.max(self.minute_window() * minutes.min(u32::MAX as u64) as u32);
            }
            if let Some(h) = self.hints[d].filter(|h| h.remaining < t[d]) {
                wait = wait.max(h.until - now);
            }
        }
        wait
    }

    pub fn status(&mut self, now: Instant) -> [Option<DimStatus>; 3] {
        self.expire(now);
        let mut out = [None; 3];
        for d in 0..3 {
            if let Some(per_minute) = self.limits.per_minute[d] {
                out[d] = Some(DimStatus {
                    per_minute,
                    burst_capacity: self.burst_cap[d],
                    burst_remaining: self.burst_cap[d].saturating_sub(self.used_burst[d]),
                    minute_remaining: per_minute.saturating_sub(self.used_minute[d]),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::headers::Remaining;

    fn ledger(rpm: Option<u64>, tpm: Option<u64>, ipm: Option<u64>) -> Ledger {
        Ledger::new(Limits {
            per_minute: [rpm, tpm, ipm],
            burst: Duration::from_secs(1),
            margin: Duration::ZERO,
        })
    }

    fn req() -> Cost {
        Cost {
            requests: 1,
            tokens: 0,
            images: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_minute_of_requests_is_spread_over_burst_windows() {
        // 600 rpm is 10 per second; a minute of demand takes a minute.
        let mut l = ledger(Some(600), None, None);
        let start = Instant::now();
        let mut admitted = 0;
        while admitted < 600 {
            let now = Instant::now();
            let at = l.ready_at(now, &req());
            if at > now {
                tokio::time::sleep_until(at).await;
                continue;
            }
            l.charge(now, &req());
            admitted += 1;
            if admitted == 10 {
                assert_eq!(
                    Instant::now(),
                    start,
                    "a burst of one second's worth goes at once"
                );
                assert_eq!(l.ready_at(now, &req()), start + Duration::from_secs(1));
            }
        }
        assert_eq!(Instant::now() - start, Duration::from_secs(59));
    }

    #[tokio::test(start_paused = true)]
    async fn no_window_of_burst_length_ever_holds_more_than_its_share() {
        let mut l = ledger(Some(600), None, None);
        let mut sent = Vec::new();
        let start = Instant::now();
        while Instant::now() - start < Duration::from_secs(5) {
            let now = Instant::now();
            if l.ready_at(now, &req()) <= now {
                l.charge(now, &req());
                sent.push(now);
            } else {
                tokio::time::sleep(Duration::from_millis(7)).await;
            }
        }
        for (i, t) in sent.iter().enumerate() {
            let in_window = sent[i..]
                .iter()
                .take_while(|s| **s - *t < Duration::from_secs(1))
                .count();
            assert!(
                in_window <= 10,
                "{in_window} calls within one second of {t:?}"
            );
        }
        assert!(
            sent.len() >= 45,
            "the budget is used, not wasted: {}",
            sent.len()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refunds_free_capacity_and_debt_holds_it() {
        // 60k tpm: 1000 tokens per one-second window.
        let mut l = ledger(None, Some(60_000), None);
        let now = Instant::now();
        let big = Cost {
            requests: 1,
            tokens: 800,
            images: 0,
        };
        let t = l.charge(now, &big);
        assert!(l.ready_at(now, &big) > now);
        l.settle(
            t,
            &Cost {
                requests: 1,
                tokens: 100,
                images: 0,
            },
        );
        assert_eq!(l.ready_at(now, &big), now, "the refund made room");
        let t2 = l.charge(now, &big);
        l.settle(
            t2,
            &Cost {
                requests: 1,
                tokens: 3000,
                images: 0,
            },
        );
        // 3100 used against 1000 per window: nothing fits until both leave.
        let tiny = Cost {
            requests: 1,
            tokens: 1,
            images: 0,
        };
        assert_eq!(l.ready_at(now, &tiny), now + Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_larger_than_the_burst_goes_when_the_window_is_empty() {
        // 5 ipm gives a burst share of 1 image; a 10-image call waits for an empty
        // window (and an empty minute), then goes.
        let mut l = ledger(None, None, Some(5));
        let now = Instant::now();
        let ten = Cost {
            requests: 1,
            tokens: 0,
            images: 10,
        };
        assert_eq!(l.ready_at(now, &ten), now, "a full pool takes it");
        l.charge(now, &ten);
        let one = Cost {
            requests: 1,
            tokens: 0,
            images: 1,
        };
        assert_eq!(
            l.ready_at(now, &one),
            now + MINUTE,
            "and pays it off over the minute"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_headers_pull_the_pool_down_but_never_up() {
        let mut l = ledger(Some(600), None, None);
        let now = Instant::now();
        let t = l.charge(now, &req());
        // Someone else spends the key: the upstream says 0 left for 400 ms.
        let h = RateLimitHeaders {
            requests: Some(Remaining {
                remaining: 0,
                reset: Duration::from_millis(400),
            }),
            ..Default::default()
        };
        l.observe(now, t.at, &h);
        assert_eq!(l.ready_at(now, &req()), now + Duration::from_millis(400));
        // A generous figure does not lift penstock's own limit.
        let mut l = ledger(Some(60), None, None);
        let t = l.charge(now, &req());
        let h = RateLimitHeaders {
            requests: Some(Remaining {
                remaining: 1000,
                reset: Duration::from_secs(1),
            }),
            ..Default::default()
        };
        l.observe(now, t.at, &h);
        assert_eq!(l.ready_at(now, &req()), now + Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_everything_until_it_ends() {
        let mut l = ledger(Some(600), None, None);
        let now = Instant::now();
        l.pause(now + Duration::from_secs(2));
        assert_eq!(l.ready_at(now, &req()), now + Duration::from_secs(2));
        assert_eq!(l.time_to_serve(now, &req()), Duration::from_secs(2));
        tokio::time::advance(Duration::from_secs(2)).await;
        let now = Instant::now();
        assert_eq!(l.ready_at(now, &req()), now);
    }

    #[tokio::test(start_paused = true)]
    async fn time_to_serve_counts_whole_windows() {
        let mut l = ledger(Some(600), None, None);
        let now = Instant::now();
        let fifty = Cost {
            requests: 50,
            tokens: 0,
            images: 0,
        };
        // 10 now, then 40 more at 10 per window.
        assert_eq!(l.time_to_serve(now, &fifty), Duration::from_secs(4));
        let few = Cost {
            requests: 10,
            tokens: 0,
            images: 0,
        };
        assert_eq!(l.time_to_serve(now, &few), Duration::ZERO);
    }
}
