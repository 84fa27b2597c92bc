//! The upstream's health: a breaker that opens after `breaker_failures`
//! (10) failures in a row (no answer, a timeout, a 5xx), so an outage costs about
//! one call per request instead of every retry of every request. While open,
//! calls are answered at once (503 `penstock_upstream_down`, with
//! `retry-after` at the cool-down's end) and nothing is sent; when the
//! cool-down ends one call goes as a probe: an answer closes the breaker, a
//! failure opens it again for twice as long (up to a minute).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The longest cool-down.
const MAX_COOLDOWN: Duration = Duration::from_secs(60);

/// While a probe is out, others are told to come back this soon.
const PROBE_WAIT: Duration = Duration::from_millis(250);

pub(crate) struct Health {
    /// The upstream's name, for the log.
    name: std::sync::Arc<str>,
    threshold: u32,
    first_cooldown: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    in_a_row: u32,
    open_until: Option<Instant>,
    cooldown: Duration,
    probe_out: bool,
    opened: u64,
}

/// May a call go? A probe must report back ([`Health::record`] with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    Go { probe: bool },
    Down(Duration),
}

/// For `/status`.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub(crate) name: std::sync::Arc<str>,
    pub(crate) healthy: bool,
    pub(crate) failures_in_a_row: u32,
    pub(crate) open_for_ms: u64,
    pub(crate) opened_total: u64,
}

impl Health {
    /// `threshold` 0 turns the breaker off.
    #[cfg(test)]
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Health {
        Health::named("default".into(), threshold, cooldown)
    }

    /// [`Health::new`] for the upstream `name`.
    pub(crate) fn named(name: std::sync::Arc<str>, threshold: u32, cooldown: Duration) -> Health {
        Health {
            name,
            threshold,
            first_cooldown: cooldown.max(Duration::from_millis(1)),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn admit(&self) -> Admit {
        if self.threshold == 0 {
            return Admit::Go { probe: false };
        }
        let mut st = self.lock();
        let Some(until) = st.open_until else {
            return Admit::Go { probe: false };
        };
        let now = Instant::now();
        if now < until {
            return Admit::Down(until - now);
        }
        if st.probe_out {
            return Admit::Down(PROBE_WAIT);
        }
        st.probe_out = true;
        Admit::Go { probe: true }
    }

    /// Whether a call sent now would be answered by the breaker (open, or
    /// its probe out): routing passes such an upstream over. It asks
    /// nothing of the breaker: a cool-down that has ended is available
    /// (the next call is its probe).
    pub(crate) fn unavailable(&self) -> bool {
        if self.threshold == 0 {
            return false;
        }
        let st = self.lock();
        st.open_until
            .is_some_and(|until| Instant::now() < until || st.probe_out)
    }

    /// The upstream refused penstock's own key (401, 403): it is taken out
    /// for a cool-down at once, then probed as after failures.
    pub(crate) fn trip(&self, probe: bool) {
        if self.threshold == 0 {
            return;
        }
        let mut st = self.lock();
        if probe {
            st.probe_out = false;
        }
        if st.open_until.is_some_and(|u| Instant::now() < u) {
            return;
        }
        st.cooldown = match st.open_until {
            Some(_) => st.cooldown.saturating_mul(2).min(MAX_COOLDOWN),
            None => self.first_cooldown,
        };
        st.open_until = Some(Instant::now() + st.cooldown);
        st.opened += 1;
        tracing::warn!(upstream = %self.name, cooldown_ms = st.cooldown.as_millis() as u64, "the upstream refused penstock's key: taken out until a probe is accepted");
    }

    /// What an attempt came to: `failed` (no answer, a timeout, a 5xx) or
    /// not (any answer, errors of the request's own included).
    pub(crate) fn record(&self, failed: bool, probe: bool) {
        if self.threshold == 0 {
            return;
        }
        let mut st = self.lock();
        if probe {
            st.probe_out = false;
        }
        if !failed {
            if st.open_until.is_some() {
                tracing::info!(upstream = %self.name, "the upstream answers again: breaker closed");
            }
            *st = State {
                opened: st.opened,
                ..State::default()
            };
            return;
        }
        st.in_a_row = st.in_a_row.saturating_add(1);
        let reopen = probe && st.open_until.is_some();
        if reopen || (st.open_until.is_none() && st.in_a_row >= self.threshold) {
            st.cooldown = match reopen {
                true => st.cooldown.saturating_mul(2).min(MAX_COOLDOWN),
                false => self.first_cooldown,
            };
            st.open_until = Some(Instant::now() + st.cooldown);
            st.opened += 1;
            tracing::warn!(
                upstream = %self.name,
                failures_in_a_row = st.in_a_row,
                cooldown_ms = st.cooldown.as_millis() as u64,
                "the upstream keeps failing: breaker open, calls answered at once until a probe gets an answer"
            );
        }
    }

    /// A probe's caller left before it was answered: another may probe.
    pub(crate) fn abandon_probe(&self) {
        self.lock().probe_out = false;
    }

    pub(crate) fn status(&self) -> Status {
        let st = self.lock();
        let open_for = st.open_until.map_or(Duration::ZERO, |u| {
            u.saturating_duration_since(Instant::now())
        });
        Status {
            name: self.name.clone(),
            healthy: st.open_until.is_none(),
            failures_in_a_row: st.in_a_row,
            open_for_ms: u64::try_from(open_for.as_millis()).unwrap_or(u64::MAX),
            opened_total: st.opened,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_failures_in_a_row_and_a_probe_closes_it() {
        let h = Health::new(3, Duration::from_secs(2));
        for _ in 0..2 {
            assert_eq!(h.admit(), Admit::Go { probe: false });
            h.record(true, false);
        }
        // An answer in between starts the count over.
        h.record(false, false);
        for _ in 0..3 {
            h.record(true, false);
        }
        assert_eq!(h.admit(), Admit::Down(Duration::from_secs(2)));
        tokio::time::advance(Duration::from_secs(2)).await;
        // One probe; the others wait for it.
        assert_eq!(h.admit(), Admit::Go { probe: true });
        assert_eq!(h.admit(), Admit::Down(PROBE_WAIT));
        // It failed: open twice as long.
        h.record(true, true);
        assert_eq!(h.admit(), Admit::Down(Duration::from_secs(4)));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(h.admit(), Admit::Go { probe: true });
        h.record(false, true);
        assert_eq!(h.admit(), Admit::Go { probe: false });
        assert!(h.status().healthy);
        assert_eq!(h.status().opened_total, 2);
        // Open again: the cool-down starts from the first again.
        for _ in 0..3 {
            h.record(true, false);
        }
        assert_eq!(h.admit(), Admit::Down(Duration::from_secs(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn cool_downs_stop_growing_at_a_minute_and_zero_turns_it_off() {
        let h = Health::new(1, Duration::from_secs(40));
        h.record(true, false);
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(h.admit(), Admit::Go { probe: true });
        h.record(true, true);
        assert_eq!(h.admit(), Admit::Down(MAX_COOLDOWN));
        let off = Health::new(0, Duration::from_secs(1));
        for _ in 0..100 {
            off.record(true, false);
        }
        assert_eq!(off.admit(), Admit::Go { probe: false });
    }
}
