//! A pool's ledger. Each admitted call is an entry (when, what it cost); the pool's
//! use is the sum of entries inside a sliding window, checked twice per dimension:
//! over the burst window (a minute's limit as the upstream enforces it, over short
//! windows: never more than its share, rounded up, in any window) and over the
//! minute. A token bucket per dimension, filling at the sustained rate (the
//! limit times the safety fraction), carries what a window could not use into
//! the next: a share of 9.5 calls a window is 9.5 on average, not 9. Entries can
//! be corrected after the fact (refund or debt, once `usage` is known). The
//! upstream's own `x-ratelimit-*` view and its 429 pauses are folded in as
//! further limits; where that view shows room, a learned pool may use what its
//! safety fraction holds back.
//!
//! What each setting costs at the limit: the safety fraction `s` caps the
//! sustained rate at `s × limit`; the margin `m` lengthens each window, capping
//! it at `share / (burst + m)` (4.8 % of a configured limit with the default
//! 50 ms on a 1 s burst). The lower of the two applies, never both.

// Per-dimension state lives in parallel arrays; indexing them by dimension reads
// more plainly than zipping four iterators.
#![allow(clippy::needless_range_loop)]

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::vocab::cost::Cost;
pub use crate::vocab::cost::Limits;
use crate::vocab::headers::RateLimitHeaders;
use crate::vocab::status::DimStatus;

/// The most one call counts for in a dimension: far above any limit (a call
/// above a limit is refused before it is charged), and low enough that the
/// sums of a window's entries can never overflow.
const MAX_ENTRY: u64 = 1 << 40;

fn bounded(cost: &Cost) -> [u64; 3] {
    cost.dims().map(|c| c.min(MAX_ENTRY))
}

/// `secs` as a duration, rounded up to the microsecond, at most a day.
fn seconds_up(secs: f64) -> Duration {
    let micros = (secs * 1e6).ceil();
    if micros.is_nan() || micros <= 0.0 {
        return Duration::ZERO;
    }
    Duration::from_micros(micros.min(crate::vocab::headers::MAX_DELAY.as_micros() as f64) as u64)
}

pub(crate) const DIM_NAMES: [&str; 3] = ["requests", "tokens", "images"];
const MINUTE: Duration = Duration::from_secs(60);

/// The first dimension in which `cost` is more than a whole minute's limit,
/// with that limit: such a call can never be admitted.
pub(crate) fn exceeds(per_minute: &[Option<u64>; 3], cost: &Cost) -> Option<(usize, u64)> {
    let c = cost.dims();
    (0..3).find_map(|d| {
        let limit = per_minute[d]?;
        (c[d] > limit).then_some((d, limit))
    })
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

/// What the bucket of a dimension tolerates above its fill, in units.
const EPSILON: f64 = 1e-6;

/// The upstream's word on what remains, until `until`.
#[derive(Debug, Clone, Copy)]
struct Hint {
    remaining: u64,
    until: Instant,
    /// Admission time of the call whose response carried it: newer wins.
    seen_for: Instant,
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
    /// Per dimension: what the bucket holds of admitted cost, draining at
    /// `rate` units a second; a call fits while it stays within `depth`.
    level: [f64; 3],
    /// When `level` was last drained.
    level_at: Instant,
    rate: [f64; 3],
    depth: [f64; 3],
    /// What the minute window holds, per dimension.
    minute_cap: [Option<u64>; 3],
    /// The ledger holds 1/share of the limits (a replica's share while the
    /// shared ledger is away).
    share: u32,
}

/// What one burst window admits of each per-minute limit.
pub(crate) fn burst_caps(limits: &Limits) -> [u64; 3] {
    limits.burst_caps()
}

impl Ledger {
    pub fn new(limits: Limits) -> Ledger {
        let mut ledger = Ledger {
            limits,
            burst_cap: [u64::MAX; 3],
            entries: VecDeque::new(),
            first_seq: 0,
            burst_from: 0,
            used_burst: [0; 3],
            used_minute: [0; 3],
            hints: [None; 3],
            paused_until: None,
            level: [0.0; 3],
            level_at: Instant::now(),
            rate: [0.0; 3],
            depth: [0.0; 3],
            minute_cap: [None; 3],
            share: 1,
        };
        ledger.derive();
        ledger
    }

    /// The burst caps, the minute's caps and the buckets' rates and depths,
    /// from the limits and the share held.
    fn derive(&mut self) {
        // A share of a burst window is its whole cap divided, rounded down:
        // the replicas' shares together never exceed the whole.
        let n = u64::from(self.share.max(1));
        self.burst_cap = self
            .limits
            .burst_caps()
            .map(|c| if c == u64::MAX { c } else { (c / n).max(1) });
        self.rate = self.limits.rates().map(|r| r / n as f64);
        self.minute_cap = self.limits.per_minute.map(|l| l.map(|l| (l / n).max(1)));
        // A share of the bucket likewise.
        let depths = self.limits.depths();
        for d in 0..3 {
            self.depth[d] = match self.burst_cap[d] {
                u64::MAX => 0.0,
                cap => (depths[d] / n as f64).max(cap as f64),
            };
        }
    }

    /// New limits (a reloaded config): what was admitted stays counted, in
    /// the burst window as the new one is long (a longer window counts again
    /// what its start now holds), so a lowered limit never admits what the new
    /// one would not.
    pub(crate) fn reconfigure(&mut self, limits: Limits) {
        self.limits = limits;
        self.burst_from = 0;
        self.used_burst = [0; 3];
        for e in &self.entries {
            for d in 0..3 {
                self.used_burst[d] = self.used_burst[d].saturating_add(e.cost[d]);
            }
        }
        self.derive();
        self.expire(Instant::now());
    }

    /// New per-minute limits (learned from the upstream); what was admitted
    /// stays counted.
    pub(crate) fn set_limits(&mut self, per_minute: [Option<u64>; 3]) {
        self.limits.per_minute = per_minute;
        self.derive();
    }

    /// Holds 1/`share` of the limits from now on (1: all of them).
    pub(crate) fn set_share(&mut self, share: u32) {
        self.share = share.max(1);
        self.derive();
    }

    /// Empties the buckets by what has drained since they were last looked at.
    fn drain(&mut self, now: Instant) {
        if now <= self.level_at {
            return;
        }
        let dt = (now - self.level_at).as_secs_f64();
        for d in 0..3 {
            self.level[d] = (self.level[d] - self.rate[d] * dt).max(0.0);
        }
        self.level_at = now;
    }

    /// What a call costing `c` of dimension `d` adds to its bucket: all of
    /// it, or, where the upstream's latest word shows room for it, only the
    /// safety fraction of it (room no other client of the key is spending).
    fn bucket_charge(&self, d: usize, c: u64, now: Instant) -> f64 {
        let room = self.hints[d].is_some_and(|h| h.until > now && h.remaining >= c);
        match room {
            true => c as f64 * self.limits.safety_fraction(),
            false => c as f64,
        }
    }

    /// When the bucket of `d` has room for `charge` (`now` if it has).
    fn bucket_ready(&self, d: usize, charge: f64, now: Instant) -> Instant {
        let (level, depth, rate) = (self.level[d], self.depth[d], self.rate[d]);
        if rate <= 0.0 || level + charge <= depth + EPSILON {
            return now;
        }
        // A charge larger than the bucket goes when it is empty.
        let over = if charge > depth {
            level
        } else {
            level + charge - depth
        };
        now + seconds_up(over / rate)
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
        self.drain(now);
        let mut at = self.paused_until.unwrap_or(now).max(now);
        let c = cost.dims();
        for d in 0..3 {
            if c[d] == 0 {
                continue;
            }
            // What the upstream says is left paces every dimension it
            // announces, limited here or not.
            if let Some(h) = self.hints[d].filter(|h| h.remaining < c[d]) {
                at = at.max(h.until);
            }
            let Some(per_minute) = self.minute_cap[d] else {
                continue;
            };
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
            at = at.max(self.bucket_ready(d, self.bucket_charge(d, c[d], now), now));
        }
        at
    }

    /// Records an admitted call, sent at `now` (or a moment later: a call
    /// reserved ahead counts from when it goes; entries stay in time order).
    pub fn charge(&mut self, now: Instant, cost: &Cost) -> Ticket {
        let now = self.entries.back().map_or(now, |e| e.at.max(now));
        let c = bounded(cost);
        self.drain(now);
        for d in 0..3 {
            self.used_burst[d] += c[d];
            self.used_minute[d] += c[d];
            if self.rate[d] > 0.0 {
                self.level[d] += self.bucket_charge(d, c[d], now);
            }
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
            // The bucket: what drained of the old charge stays drained.
            let delta = new[d] as f64 - e.cost[d] as f64;
            self.level[d] = (self.level[d] + delta).max(0.0);
            e.cost[d] = new[d];
        }
    }

    /// Counts the call of `ticket` from `now`, when it really left, instead of
    /// when it was admitted: its cost moves to a new entry at `now` (the old
    /// one stays at zero, so later tickets keep their places). The bucket and
    /// the upstream's word are left as they were: the call was charged to
    /// them once. Answers the call's new ticket; a call that has left both
    /// windows keeps its own.
    pub(crate) fn redate(&mut self, ticket: Ticket, now: Instant) -> Ticket {
        self.expire(now);
        let Some(idx) = ticket.seq.checked_sub(self.first_seq) else {
            return ticket;
        };
        let idx = idx as usize;
        let in_burst = idx >= self.burst_from;
        let Some(e) = self.entries.get_mut(idx) else {
            return ticket;
        };
        if now <= e.at || e.cost == [0; 3] {
            return ticket;
        }
        let cost = std::mem::take(&mut e.cost);
        for d in 0..3 {
            self.used_minute[d] -= cost[d];
            if in_burst {
                self.used_burst[d] -= cost[d];
            }
        }
        let now = self.entries.back().map_or(now, |e| e.at.max(now));
        for d in 0..3 {
            self.used_burst[d] += cost[d];
            self.used_minute[d] += cost[d];
        }
        let seq = self.first_seq + self.entries.len() as u64;
        self.entries.push_back(Entry { at: now, cost });
        Ticket { seq, at: now }
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

    pub(crate) fn paused_until(&self) -> Option<Instant> {
        self.paused_until
    }

    /// Nothing counted in any window, no pause, no hint: forgetting this ledger
    /// changes nothing.
    pub(crate) fn is_idle(&mut self, now: Instant) -> bool {
        self.expire(now);
        self.drain(now);
        self.entries.is_empty()
            && self.level.iter().all(|l| *l <= EPSILON)
            && self.paused_until.is_none()
            && self.hints.iter().all(Option::is_none)
    }

    /// Roughly how long until everything in `total` could have been admitted, for
    /// refusing early: whole burst windows for what exceeds the room left now.
    pub(crate) fn time_to_serve(&mut self, now: Instant, total: &Cost) -> Duration {
        self.expire(now);
        self.drain(now);
        let mut wait = self.paused_until.map_or(Duration::ZERO, |p| p - now);
        let t = total.dims();
        for d in 0..3 {
            if let Some(h) = self.hints[d].filter(|h| h.remaining < t[d]) {
                wait = wait.max(h.until - now);
            }
            let Some(per_minute) = self.minute_cap[d] else {
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
            let bucket = self.bucket_ready(d, t[d] as f64, now);
            wait = wait.max(bucket - now);
        }
        wait
    }

    pub(crate) fn status(&mut self, now: Instant) -> [Option<DimStatus>; 3] {
        self.expire(now);
        self.drain(now);
        let sustained = self.limits.sustained();
        let n = u64::from(self.share);
        let mut out = [None; 3];
        for d in 0..3 {
            if let (Some(limit), Some(per_minute)) = (self.minute_cap[d], sustained[d]) {
                let per_minute = (per_minute / n).max(1);
                let bucket = (self.depth[d] - self.level[d]).max(0.0).floor() as u64;
                out[d] = Some(DimStatus {
                    per_minute,
                    limit,
                    burst_capacity: self.burst_cap[d],
                    burst_remaining: self.burst_cap[d]
                        .saturating_sub(self.used_burst[d])
                        .min(bucket),
                    minute_remaining: limit.saturating_sub(self.used_minute[d]),
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
            safety: 1.0,
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
        // 5 ipm gives a burst share of 1 image; a 10-image call waits for an
        // empty window (and an empty minute), then goes.
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
            now + Duration::from_secs(72),
            "and pays it off at the sustained rate: 6 images over, at 5 a minute"
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

    /// Admits one-request calls as fast as the ledger allows for `secs`,
    /// with the upstream's word after each call when `hint` says so
    /// (`remaining` as the fake announces it: its window's room); the calls'
    /// times.
    async fn saturate(l: &mut Ledger, secs: u64, hint: Option<u64>) -> Vec<Instant> {
        let start = Instant::now();
        let mut sent: Vec<Instant> = Vec::new();
        while Instant::now() - start < Duration::from_secs(secs) {
            let now = Instant::now();
            let at = l.ready_at(now, &req());
            if at > now {
                tokio::time::sleep_until(at).await;
                continue;
            }
            let t = l.charge(now, &req());
            if let Some(cap) = hint {
                let in_window = sent
                    .iter()
                    .rev()
                    .take_while(|s| now - **s < Duration::from_secs(1))
                    .count() as u64;
                let h = RateLimitHeaders {
                    requests: Some(Remaining {
                        remaining: cap.saturating_sub(in_window + 1),
                        reset: Duration::from_secs(1),
                    }),
                    ..Default::default()
                };
                l.observe(now, t.at, &h);
            }
            sent.push(now);
        }
        sent
    }

    fn most_in_any(sent: &[Instant], window: Duration) -> usize {
        (0..sent.len())
            .map(|i| {
                sent[i..]
                    .iter()
                    .take_while(|s| **s - sent[i] < window)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_fractional_share_carries_over_and_the_sustained_rate_is_the_limit_times_safety() {
        // 600 a minute announced, 95 % used: 9.5 a second, where whole calls
        // per window gave 9 per 1.05 s (8.57 a second).
        let mut l = Ledger::new(Limits {
            per_minute: [Some(600), None, None],
            burst: Duration::from_secs(1),
            margin: Duration::from_millis(50),
            safety: 0.95,
        });
        let sent = saturate(&mut l, 300, None).await;
        let rate = sent.len() as f64 / 300.0;
        assert!(rate >= 0.98 * 9.5, "{rate} a second");
        assert!(rate <= 9.5 + 0.05, "{rate} a second");
        // The upstream's own window is never overrun.
        assert!(most_in_any(&sent, Duration::from_secs(1)) <= 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_configured_limit_with_a_fractional_share_is_used_whole() {
        // 570 a minute is 9.5 a second: the margin (50 ms) costs less than
        // the rounding did.
        let mut l = Ledger::new(Limits {
            per_minute: [Some(570), None, None],
            burst: Duration::from_secs(1),
            margin: Duration::from_millis(50),
            safety: 1.0,
        });
        let sent = saturate(&mut l, 300, None).await;
        let per_minute = sent.len() as f64 / 5.0;
        assert!(per_minute >= 0.95 * 570.0, "{per_minute} a minute");
        assert!(most_in_any(&sent, Duration::from_secs(60)) <= 570);
        assert!(most_in_any(&sent, Duration::from_millis(1050)) <= 10);
    }

    #[tokio::test(start_paused = true)]
    async fn room_the_upstream_confirms_is_used_beyond_the_safety_fraction() {
        let limits = Limits {
            per_minute: [Some(600), None, None],
            burst: Duration::from_secs(1),
            margin: Duration::from_millis(50),
            safety: 0.95,
        };
        let mut l = Ledger::new(limits);
        let sent = saturate(&mut l, 120, Some(10)).await;
        let rate = sent.len() as f64 / 120.0;
        // As fast as the window with its margin allows: 10 per 1.05 s.
        assert!(rate > 9.5, "{rate} a second");
        assert!(most_in_any(&sent, Duration::from_secs(1)) <= 10);
        assert!(most_in_any(&sent, Duration::from_secs(60)) <= 600);
    }

    #[tokio::test(start_paused = true)]
    async fn the_upstreams_word_paces_a_dimension_no_limit_is_configured_for() {
        // A budget of requests only; the upstream says no tokens are left.
        let mut l = ledger(Some(600), None, None);
        let now = Instant::now();
        let t = l.charge(now, &req());
        let h = RateLimitHeaders {
            tokens: Some(Remaining {
                remaining: 0,
                reset: Duration::from_millis(700),
            }),
            ..Default::default()
        };
        l.observe(now, t.at, &h);
        let chat = Cost {
            requests: 1,
            tokens: 500,
            images: 0,
        };
        assert_eq!(l.ready_at(now, &chat), now + Duration::from_millis(700));
        assert_eq!(l.time_to_serve(now, &chat), Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_left_late_holds_its_window_from_when_it_left() {
        let mut l = ledger(Some(600), None, None);
        let start = Instant::now();
        let late = l.charge(start, &req());
        for _ in 0..9 {
            l.charge(start, &req());
        }
        // The first left 300 ms after its admission.
        let moved = l.redate(late, start + Duration::from_millis(300));
        assert_eq!(moved.at, start + Duration::from_millis(300));
        // A second on, nine have left the window; the late one has not.
        let second = start + Duration::from_secs(1);
        for _ in 0..9 {
            assert_eq!(l.ready_at(second, &req()), second);
            l.charge(second, &req());
        }
        assert_eq!(
            l.ready_at(second, &req()),
            start + Duration::from_millis(1300)
        );
        // Settled on its new ticket, its refund frees its place.
        l.settle(moved, &Cost::default());
        assert_eq!(l.ready_at(second, &req()), second);
        // A ticket the windows have forgotten stays as it was.
        let old = l.redate(late, start + Duration::from_secs(90));
        assert_eq!(old, late);
    }

    /// Calls leave when their task runs, which on a busy host can be later
    /// than their admission; each is counted from when it left (the pool
    /// re-dates it then). However late each leaves, short of a whole
    /// window, no window of departures holds more than the share.
    fn departures(lateness: &[u64]) -> Vec<Instant> {
        let mut l = ledger(Some(600), None, None);
        let mut now = Instant::now();
        let mut pending: Vec<(Instant, Ticket)> = Vec::new();
        let mut departed = Vec::new();
        let mut next = 0;
        while next < lateness.len() || !pending.is_empty() {
            pending.sort_by_key(|(at, _)| *at);
            while pending.first().is_some_and(|(at, _)| *at <= now) {
                let (_, ticket) = pending.remove(0);
                l.redate(ticket, now);
                departed.push(now);
            }
            let mut wake = pending.first().map(|(at, _)| *at);
            if let Some(ms) = lateness.get(next) {
                let ready = l.ready_at(now, &req());
                if ready <= now {
                    let ticket = l.charge(now, &req());
                    pending.push((now + Duration::from_millis(*ms), ticket));
                    next += 1;
                    continue;
                }
                wake = Some(wake.map_or(ready, |w| w.min(ready)));
            }
            if let Some(wake) = wake {
                now = wake;
            }
        }
        departed.sort();
        departed
    }

    proptest::proptest! {
        #[test]
        fn calls_leaving_late_never_crowd_a_window(
            lateness in proptest::collection::vec(
                proptest::prop_oneof![3 => proptest::strategy::Just(0u64), 1 => 0u64..1000],
                1..120,
            )
        ) {
            let departed = departures(&lateness);
            proptest::prop_assert_eq!(departed.len(), lateness.len());
            let most = most_in_any(&departed, Duration::from_secs(1));
            proptest::prop_assert!(most <= 10, "{} calls left within a second", most);
        }
    }
}
