//! Limits learned from the upstream, for models no configured budget covers.
//! OpenAI announces a key's limits in `x-ratelimit-limit-*` on its answers:
//! a learned pool takes them (times a safety fraction) and is then paced like a
//! configured budget. Where nothing is announced, it learns from the upstream's
//! 429s as TCP's congestion control does: calls in flight grow by one for each
//! window's worth of successes and halve on a rate limit. Before the first answer, one call at a
//! time goes.

use crate::vocab::headers::RateLimitHeaders;

/// Where a pool's limits come from, for `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Configured,
    /// Nothing heard yet: one call at a time.
    Pending,
    /// From `x-ratelimit-limit-*`.
    Announced,
    /// From the upstream's 429s, by additive increase and halving.
    RateLimits,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Configured => "configured",
            Source::Pending => "learned: waiting for the first answer",
            Source::Announced => "learned: x-ratelimit-limit headers",
            Source::RateLimits => "learned: upstream 429s",
        }
    }
}

/// What a learned pool should enforce now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Learned {
    /// requests, tokens, images per minute.
    pub per_minute: [Option<u64>; 3],
    pub max_in_flight: Option<usize>,
}

#[derive(Debug)]
pub struct Learner {
    safety: f64,
    ceiling: usize,
    source: Source,
    announced: [Option<u64>; 3],
    /// Calls in flight allowed while learning from 429s.
    window: f64,
}

impl Learner {
    /// `safety`: the fraction of an announced limit used; `ceiling`: the most
    /// calls in flight learning from 429s may reach.
    pub fn new(safety: f64, ceiling: usize) -> Learner {
        Learner {
            safety,
            ceiling: ceiling.max(1),
            source: Source::Pending,
            announced: [None; 3],
            window: 1.0,
        }
    }

    pub fn source(&self) -> Source {
        self.source
    }

    fn current(&self) -> Learned {
        match self.source {
            Source::Announced => Learned {
                per_minute: self.announced.map(|l| {
                    // At least one a minute: a limit of zero is "unknown".
                    l.map(|l| ((l as f64 * self.safety).floor() as u64).max(1))
                }),
                max_in_flight: None,
            },
            _ => Learned {
                per_minute: [None; 3],
                max_in_flight: Some(((self.window + 1e-9).floor() as usize).clamp(1, self.ceiling)),
            },
        }
    }

    /// An answer's headers; the new limits when they changed.
    pub fn on_headers(&mut self, headers: &RateLimitHeaders) -> Option<Learned> {
        let announced = headers.limits.map(|l| l.filter(|l| *l > 0));
        if announced.iter().all(Option::is_none) {
            return None;
        }
        let before = self.current();
        self.announced = announced;
        self.source = Source::Announced;
        let now = self.current();
        (now != before).then_some(now)
    }

    /// An answer that was not a rate limit, with no limits announced.
    pub fn on_success(&mut self) -> Option<Learned> {
        if self.source == Source::Announced {
            return None;
        }
        let before = self.current();
        self.source = Source::RateLimits;
        // One more call in flight per window's worth of successes, as TCP
        // grows its window by one segment per round trip.
        self.window = (self.window + 1.0 / self.window).min(self.ceiling as f64);
        let now = self.current();
        (now != before).then_some(now)
    }

    /// The upstream refused a call for its rate limit.
    pub fn on_rate_limited(&mut self) -> Option<Learned> {
        if self.source == Source::Announced {
            // The pause and the probe handle it; the announced limit stands.
            return None;
        }
        let before = self.current();
        self.source = Source::RateLimits;
        self.window = (self.window / 2.0).max(1.0);
        let now = self.current();
        (now != before).then_some(now)
    }

    pub fn learned(&self) -> Learned {
        self.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announced(requests: u64, tokens: u64) -> RateLimitHeaders {
        RateLimitHeaders {
            limits: [Some(requests), Some(tokens), None],
            ..RateLimitHeaders::default()
        }
    }

    #[test]
    fn announced_limits_are_used_with_the_safety_fraction_and_follow_changes() {
        let mut l = Learner::new(0.95, 64);
        assert_eq!(l.learned().max_in_flight, Some(1), "one at a time at first");
        let got = l.on_headers(&announced(600, 100_000)).unwrap();
        assert_eq!(got.per_minute, [Some(570), Some(95_000), None]);
        assert_eq!(got.max_in_flight, None);
        assert_eq!(l.on_headers(&announced(600, 100_000)), None, "unchanged");
        let lower = l.on_headers(&announced(300, 100_000)).unwrap();
        assert_eq!(lower.per_minute[0], Some(285));
        assert_eq!(l.on_rate_limited(), None);
        assert_eq!(l.source(), Source::Announced);
    }

    #[test]
    fn without_headers_calls_in_flight_grow_slowly_and_halve() {
        let mut l = Learner::new(0.95, 8);
        // Each success adds 1/window: 1, 2, 2.5, 2.9, 3.2, 3.6, 3.8.
        for _ in 0..6 {
            l.on_success();
        }
        assert_eq!(l.learned().max_in_flight, Some(3));
        l.on_rate_limited();
        assert_eq!(l.learned().max_in_flight, Some(1), "halved");
        for _ in 0..100 {
            l.on_success();
        }
        assert_eq!(l.learned().max_in_flight, Some(8), "capped");
        assert_eq!(l.source(), Source::RateLimits);
    }
}
