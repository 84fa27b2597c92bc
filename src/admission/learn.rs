//! Limits learned from the upstream, for models no configured budget covers.
//!
//! A learned pool constrains nothing until the upstream has refused something:
//! OpenAI's images endpoints announce no limits on their answers, so a pool
//! that started cautious would make every generation wait behind the first.
//! - **Announced** limits (`x-ratelimit-limit-*` on any answer, a 429's
//!   `-images` included) are taken times a safety fraction, and the pool is
//!   then paced like a configured budget.
//! - **Refused, nothing announced**: calls in flight are limited as TCP limits
//!   its congestion window. The window starts at what was in flight (and not
//!   refused) when the first 429 came; a later 429 halves it; successes grow
//!   it back by one each (doubling per round trip) up to where the last 429
//!   was, then by one per window's worth. 429s of calls sent before the last
//!   decrease belong to the same event: they only bring the window down to
//!   what is still in flight.
//! - An idle pool is dropped (after a minute or two with nothing in its
//!   windows) and the next one starts open again.

use std::time::SystemTime;

use tokio::time::Instant;

use crate::vocab::headers::RateLimitHeaders;

/// Where a pool's limits come from, for `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Configured,
    /// Nothing refused, nothing announced: no limit but the ceiling.
    Open,
    /// From `x-ratelimit-limit-*`.
    Announced,
    /// From the upstream's 429s, by a window of calls in flight.
    RateLimits,
}

impl Source {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Source::Configured => "configured",
            Source::Open => "learned: open (the upstream has refused nothing)",
            Source::Announced => "learned: x-ratelimit-limit headers",
            Source::RateLimits => "learned: upstream 429s",
        }
    }
}

/// What a learned pool should enforce now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Learned {
    /// requests, tokens, images per minute, as the upstream announced them
    /// (the pool applies its safety fraction).
    pub(crate) per_minute: [Option<u64>; 3],
    pub(crate) max_in_flight: Option<usize>,
}

#[derive(Debug)]
pub struct Learner {
    ceiling: usize,
    source: Source,
    announced: [Option<u64>; 3],
    /// Calls in flight allowed while learning from 429s.
    window: f64,
    /// Where the last 429 came: the window grows by doubling up to it.
    threshold: f64,
    /// When the window was last brought down: a 429 of a call sent before
    /// then belongs to that event.
    decreased: Option<Instant>,
    /// When the limits last changed (wall clock, for `/status`).
    changed: SystemTime,
}

impl Learner {
    /// `ceiling`: the most calls in flight a learned pool admits.
    pub fn new(ceiling: usize) -> Learner {
        Learner {
            ceiling: ceiling.max(1),
            source: Source::Open,
            announced: [None; 3],
            window: ceiling.max(1) as f64,
            threshold: ceiling.max(1) as f64,
            decreased: None,
            changed: SystemTime::now(),
        }
    }

    pub(crate) fn source(&self) -> Source {
        self.source
    }

    /// When the limits last changed.
    pub(crate) fn changed(&self) -> SystemTime {
        self.changed
    }

    fn current(&self) -> Learned {
        match self.source {
            Source::Announced => Learned {
                per_minute: self.announced,
                max_in_flight: Some(self.ceiling),
            },
            Source::RateLimits => Learned {
                per_minute: [None; 3],
                max_in_flight: Some(((self.window + 1e-9).floor() as usize).clamp(1, self.ceiling)),
            },
            Source::Open | Source::Configured => Learned {
                per_minute: [None; 3],
                max_in_flight: Some(self.ceiling),
            },
        }
    }

    /// Runs `change`; the new limits when they differ from before.
    fn changing(&mut self, change: impl FnOnce(&mut Learner)) -> Option<Learned> {
        let before = self.current();
        let source = self.source;
        change(self);
        let now = self.current();
        let changed = now != before || self.source != source;
        if changed {
            self.changed = SystemTime::now();
        }
        changed.then_some(now)
    }

    /// An answer's headers (a success's or a refusal's): limits it announces
    /// replace those known for their dimensions.
    pub(crate) fn on_headers(&mut self, headers: &RateLimitHeaders) -> Option<Learned> {
        let announced = headers.limits.map(|l| l.filter(|l| *l > 0));
        if announced.iter().all(Option::is_none) {
            return None;
        }
        self.changing(|l| {
            for (known, new) in l.announced.iter_mut().zip(announced) {
                if new.is_some() {
                    *known = new;
                }
            }
            l.source = Source::Announced;
        })
    }

    /// An answer that was not a rate limit, with nothing announced;
    /// `in_flight` counts the pool's calls out, this one included.
    pub(crate) fn on_success(&mut self, in_flight: usize) -> Option<Learned> {
        if self.source != Source::RateLimits {
            return None;
        }
        // A window the traffic does not fill says nothing about a larger one
        // (RFC 7661): it grows only while in use.
        if (in_flight as f64) + 1.0 < self.window.floor() {
            return None;
        }
        self.changing(|l| {
            let step = if l.window < l.threshold {
                1.0
            } else {
                1.0 / l.window
            };
            l.window = (l.window + step).min(l.ceiling as f64);
        })
    }

    /// The upstream refused a call for its rate limit, with no limits
    /// announced. `in_flight` counts the pool's calls out, this one included;
    /// `sent` is when this call was admitted.
    pub(crate) fn on_rate_limited(&mut self, in_flight: usize, sent: Instant) -> Option<Learned> {
        if self.source == Source::Announced {
            // The pause and the probe handle it; the announced limit stands.
            return None;
        }
        let now = Instant::now();
        // What was still going, this refused call not counted.
        let going = in_flight.saturating_sub(1).max(1) as f64;
        self.changing(|l| {
            match l.decreased {
                // The first refusal: the window is what the upstream was taking.
                _ if l.source == Source::Open => {
                    l.window = going.min(l.window);
                    l.threshold = l.window;
                    l.decreased = Some(now);
                }
                // Sent before the last decrease: the same event, seen again
                // as the rest of a burst comes back refused.
                Some(at) if sent < at => {
                    l.window = l.window.min(going);
                    l.threshold = l.threshold.min(l.window.max(going));
                }
                _ => {
                    l.threshold = l.window;
                    l.window = (l.window / 2.0).max(1.0);
                    l.decreased = Some(now);
                }
            }
            l.source = Source::RateLimits;
        })
    }

    pub(crate) fn learned(&self) -> Learned {
        self.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn announced(
        requests: Option<u64>,
        tokens: Option<u64>,
        images: Option<u64>,
    ) -> RateLimitHeaders {
        RateLimitHeaders {
            limits: [requests, tokens, images],
            ..RateLimitHeaders::default()
        }
    }

    #[test]
    fn a_new_pool_is_open_and_successes_keep_it_so() {
        let mut l = Learner::new(256);
        assert_eq!(l.source(), Source::Open);
        assert_eq!(
            l.learned(),
            Learned {
                per_minute: [None; 3],
                max_in_flight: Some(256)
            }
        );
        for n in 0..1000 {
            assert_eq!(l.on_success(n % 300), None);
        }
        assert_eq!(l.source(), Source::Open);
    }

    #[test]
    fn announced_limits_are_taken_per_dimension_and_follow_changes() {
        let mut l = Learner::new(64);
        let got = l
            .on_headers(&announced(Some(600), Some(100_000), None))
            .unwrap();
        assert_eq!(got.per_minute, [Some(600), Some(100_000), None]);
        assert_eq!(
            l.on_headers(&announced(Some(600), Some(100_000), None)),
            None,
            "unchanged"
        );
        // An image 429 announces the image limit alone: the others stay.
        let got = l.on_headers(&announced(None, None, Some(5))).unwrap();
        assert_eq!(got.per_minute, [Some(600), Some(100_000), Some(5)]);
        let lower = l.on_headers(&announced(Some(300), None, None)).unwrap();
        assert_eq!(lower.per_minute, [Some(300), Some(100_000), Some(5)]);
        assert_eq!(l.on_rate_limited(10, Instant::now()), None);
        assert_eq!(l.source(), Source::Announced);
        // "0" is "unknown": not a limit.
        assert_eq!(l.on_headers(&announced(Some(0), None, None)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_429_sets_the_window_to_what_was_going_and_a_burst_is_one_event() {
        let mut l = Learner::new(256);
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(10)).await;
        // 50 went at once; 40 come back refused, one after another, each
        // leaving as it comes: in flight 50, 49, ... 11.
        for k in 0..40 {
            l.on_rate_limited(50 - k, sent);
        }
        assert_eq!(l.source(), Source::RateLimits);
        assert_eq!(l.learned().max_in_flight, Some(10), "the ten it took");
        // A call sent after that, refused: halved.
        let later = Instant::now();
        tokio::time::advance(Duration::from_millis(10)).await;
        l.on_rate_limited(10, later);
        assert_eq!(l.learned().max_in_flight, Some(5));
        // Successes in a full window double it back up to 10 ...
        for _ in 0..5 {
            l.on_success(10);
        }
        assert_eq!(l.learned().max_in_flight, Some(10));
        // ... then it grows by one per window's worth.
        for _ in 0..11 {
            l.on_success(10);
        }
        assert_eq!(l.learned().max_in_flight, Some(11));
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_not_in_use_does_not_grow() {
        let mut l = Learner::new(256);
        l.on_rate_limited(9, Instant::now());
        assert_eq!(l.learned().max_in_flight, Some(8));
        for _ in 0..100 {
            l.on_success(2);
        }
        assert_eq!(l.learned().max_in_flight, Some(8));
    }

    #[tokio::test(start_paused = true)]
    async fn halving_stops_at_one_and_growth_at_the_ceiling() {
        let mut l = Learner::new(8);
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(1)).await;
            let sent = Instant::now();
            tokio::time::advance(Duration::from_millis(1)).await;
            l.on_rate_limited(1, sent);
        }
        assert_eq!(l.learned().max_in_flight, Some(1));
        for _ in 0..1000 {
            l.on_success(64);
        }
        assert_eq!(l.learned().max_in_flight, Some(8));
    }
}
