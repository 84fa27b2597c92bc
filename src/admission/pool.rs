//! One pool of upstream capacity: its ledger, its fair queue and the task that
//! admits queued requests as capacity returns. A request that fits and finds no
//! one waiting is admitted in its own call; otherwise it waits inside its own
//! future for a ticket, and leaving (a client that disconnects) takes it out of
//! the queue, with nothing charged.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::learn::{Learner, Source};
use super::ledger::{DIM_NAMES, Ledger, Limits, Ticket};
use super::queue::FairQueue;
use super::shared::{Booking, Candidate, MAX_CANDIDATES, PoolKey, STALE_HEAD};
use crate::state::{Answer, Redis};
use crate::vocab::context::Departure;
use crate::vocab::cost::{Cost, Priority};
use crate::vocab::error::Problem;
use crate::vocab::headers::{RateLimitHeaders, name};
use crate::vocab::status::PoolStatus;

/// Why a request was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("penstock's queue is full ({depth} requests are waiting for budget)")]
    QueueFull { depth: usize, retry_after: Duration },
    #[error(
        "budget {pool:?} could take this request in about {}, longer than the {} it may wait",
        humantime::format_duration(round_ms(*wait)),
        humantime::format_duration(*max_wait)
    )]
    WaitTooLong {
        pool: Arc<str>,
        wait: Duration,
        max_wait: Duration,
    },
    #[error(
        "waited {} for budget {pool:?} without being admitted",
        humantime::format_duration(*max_wait)
    )]
    TimedOut {
        pool: Arc<str>,
        max_wait: Duration,
        retry_after: Duration,
    },
    #[error(
        "this request needs {asked} {dimension} of budget {pool:?}, more than its whole limit of {limit} per minute: it can never be sent"
    )]
    TooLarge {
        pool: Arc<str>,
        dimension: &'static str,
        limit: u64,
        asked: u64,
    },
    /// The upstream said the money is gone; its answer is repeated until the
    /// cool-down ends instead of sending calls that cannot succeed.
    #[error("the upstream's quota is exhausted (answered by penstock until the cool-down ends)")]
    CircuitOpen(Arc<Tripped>),
    /// penstock is shutting down and the budget could not take this request
    /// within what is left of the grace period: sent nowhere, charged nothing.
    #[error(
        "penstock is shutting down and budget {pool:?} could not take this request before it stops; send it again (to another replica)"
    )]
    ShuttingDown { pool: Arc<str> },
    /// A reload removed the budget while the request waited, and no pool
    /// covers its model now (the budget layer looks again first).
    #[error("budget {pool:?} was removed by a reload; send the request again")]
    Moved { pool: Arc<str> },
    /// The shared ledger (Redis) has not been reached since start and no
    /// `state.replicas` says how many replicas share the limits: spending on
    /// a guess could overrun them.
    #[error(
        "budget {pool:?} is shared through Redis, which this replica has not reached since it started, and state.replicas is not set: how many replicas share the limits is unknown"
    )]
    StateUnknown { pool: Arc<str> },
}

/// How soon a request refused at shutdown may try again (at another replica,
/// or this one restarted).
const SHUTDOWN_RETRY: Duration = Duration::from_secs(1);

/// An upstream money error, kept to answer with during the cool-down.
#[derive(Debug)]
pub struct Tripped {
    pub(crate) until: Instant,
    pub(crate) status: http::StatusCode,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: bytes::Bytes,
}

impl Tripped {
    /// An answer another replica tripped the shared breaker with.
    fn from_answer(answer: Answer, until: Instant) -> Tripped {
        Tripped {
            until,
            status: answer.status,
            headers: answer.headers,
            body: answer.body,
        }
    }

    /// The upstream's own answer, marked as repeated by penstock.
    pub(crate) fn parts(&self) -> (http::response::Parts, bytes::Bytes) {
        let mut resp = http::Response::new(());
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.clone();
        let h = resp.headers_mut();
        h.insert(name::CIRCUIT, http::HeaderValue::from_static("open"));
        h.insert(name::SHOULD_RETRY, http::HeaderValue::from_static("false"));
        (resp.into_parts().0, self.body.clone())
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

impl Refusal {
    /// When trying again has a chance.
    pub(crate) fn retry_after(&self) -> Duration {
        match self {
            Refusal::CircuitOpen(t) => t.until.saturating_duration_since(Instant::now()),
            Refusal::QueueFull { retry_after, .. } | Refusal::TimedOut { retry_after, .. } => {
                *retry_after
            }
            Refusal::WaitTooLong { wait, max_wait, .. } => wait.saturating_sub(*max_wait),
            Refusal::TooLarge { .. } => Duration::ZERO,
            Refusal::ShuttingDown { .. } | Refusal::StateUnknown { .. } | Refusal::Moved { .. } => {
                SHUTDOWN_RETRY
            }
        }
    }

    pub(crate) fn code(&self) -> &'static str {
        match self {
            Refusal::QueueFull { .. } => "penstock_queue_full",
            Refusal::WaitTooLong { .. } => "penstock_wait_too_long",
            Refusal::TimedOut { .. } => "penstock_queue_timeout",
            Refusal::CircuitOpen(_) => "penstock_circuit_open",
            Refusal::TooLarge { .. } => "penstock_request_too_large",
            Refusal::ShuttingDown { .. } => "penstock_shutting_down",
            Refusal::StateUnknown { .. } => "penstock_state_unavailable",
            Refusal::Moved { .. } => "penstock_budget_removed",
        }
    }
}

impl Problem for Refusal {
    fn status(&self) -> http::StatusCode {
        match self {
            // Waiting cannot help: the caller must ask for less.
            Refusal::TooLarge { .. } => http::StatusCode::BAD_REQUEST,
            // Not the budget's fault: this replica is going away.
            Refusal::ShuttingDown { .. } | Refusal::StateUnknown { .. } | Refusal::Moved { .. } => {
                http::StatusCode::SERVICE_UNAVAILABLE
            }
            _ => http::StatusCode::TOO_MANY_REQUESTS,
        }
    }

    fn code(&self) -> &'static str {
        Refusal::code(self)
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Refusal::TooLarge { .. } => None,
            _ => Some(Refusal::retry_after(self)),
        }
    }

    fn answer(&self) -> Option<(http::response::Parts, bytes::Bytes)> {
        match self {
            Refusal::CircuitOpen(tripped) => Some(tripped.parts()),
            _ => None,
        }
    }

    /// Measured against the caller's own wait limit.
    fn is_personal(&self) -> bool {
        matches!(self, Refusal::WaitTooLong { .. } | Refusal::TimedOut { .. })
    }

    fn model_unavailable(&self) -> bool {
        matches!(
            self,
            Refusal::WaitTooLong { .. }
                | Refusal::TimedOut { .. }
                | Refusal::QueueFull { .. }
                | Refusal::CircuitOpen(_)
                | Refusal::TooLarge { .. }
        )
    }

    /// At shutdown too: a job stays (never sent) and runs after the restart.
    fn may_wait_out(&self) -> bool {
        matches!(
            self,
            Refusal::WaitTooLong { .. }
                | Refusal::TimedOut { .. }
                | Refusal::QueueFull { .. }
                | Refusal::ShuttingDown { .. }
        )
    }
}

/// For the probe after a pause: which pause.
type Probe = Option<u64>;

/// A reservation in the shared ledger: its id, and its time on Redis's clock.
#[derive(Debug, Clone, Copy)]
struct Booked {
    id: u64,
    at: u64,
}

/// An admission: charged here (and in the shared ledger, with Redis), and the
/// moment the call may go (a shared reservation can be a moment ahead).
#[derive(Debug)]
struct Granted {
    /// Where it is counted, and from when: the moment it may go.
    counted: Counted,
    probe: Probe,
}

/// Why a queued request was turned away instead of admitted.
#[derive(Debug)]
enum Turned {
    Tripped(Arc<Tripped>),
    ShuttingDown,
    /// A reload removed the pool's budget: the request looks again for the
    /// pool that covers its model now.
    Moved,
}

/// What a queued request is sent when its wait ends.
type Admission = Result<Granted, Turned>;

/// How far ahead the shared ledger may reserve a slot: close enough that a
/// reservation is not held long, far enough that a replica's next call is
/// booked before the slot comes.
const HORIZON: Duration = Duration::from_millis(200);

/// The shared ledger hears the upstream's `x-ratelimit-*` at most this often
/// from one replica's pool.
const OBSERVE_EVERY: Duration = Duration::from_millis(100);

/// How soon a queue head deferred to another replica's asks again.
const DEFER: Duration = Duration::from_millis(15);

/// A pool whose ledger is shared by several replicas, in Redis.
pub struct Remote {
    pub(crate) redis: Arc<Redis>,
    pub(crate) key: PoolKey,
}

struct State {
    ledger: Ledger,
    /// The pool's whole limits; with Redis, the local ledger holds a share.
    full: Limits,
    /// The share the local ledger holds (1: all of it).
    share: u32,
    /// With Redis: the epoch of Redis's health last synchronised with.
    epoch: u64,
    /// What was admitted on the local share while Redis was away, told to the
    /// shared ledger when it returns.
    spent_alone: std::collections::VecDeque<(Instant, Cost)>,
    /// Shared bookings of the last two burst windows.
    booked_recent: std::collections::VecDeque<(Instant, Cost)>,
    /// The shared ledger said the queue's requests fit no earlier than then
    /// (while the queue is as it was: its count of changes).
    remote_retry: Option<(Instant, u64)>,
    /// When the last call the shared ledger admitted here went.
    last_booked: Option<Instant>,
    /// When the shared ledger was last told the upstream's `x-ratelimit-*`.
    last_told: Option<Instant>,
    queue: FairQueue<Waiter>,
    /// This replica's queue head is registered in the shared fair order.
    head_shared: bool,
    /// Counts arrivals and departures of the queue: an answer of the shared
    /// ledger to wait holds while it is unchanged.
    changes: u64,
    in_flight: usize,
    next_id: u64,
    tripped: Option<Arc<Tripped>>,
    /// Shutting down: nothing more is admitted, the queue is answered.
    closed_queue: bool,
    /// A reload removed its budget: whoever comes is sent to look again.
    retired: bool,
    /// After an upstream rate limit: one call at a time probes whether capacity
    /// is back, so the end of a pause is not a stampede.
    recovering: bool,
    /// When the probe was admitted, while it is out.
    probe_out: Option<Instant>,
    /// Counts pauses: a probe speaks only for the pause it was admitted in.
    pauses: u64,
    /// Calls that left later than their admission allowed for, and were
    /// counted from when they left.
    late_departures: u64,
    max_in_flight: Option<usize>,
    /// For a pool no budget configures: what it learns of the upstream's limits.
    learner: Option<Learner>,
}

impl State {
    /// The money error still in its cool-down, if any.
    fn tripped(&mut self, now: Instant) -> Option<Arc<Tripped>> {
        if self.tripped.as_ref().is_some_and(|t| t.until <= now) {
            self.tripped = None;
        }
        self.tripped.clone()
    }
}

pub struct Pool {
    pub(crate) name: Arc<str>,
    /// Which upstream credential this pool counts (a hash, never the key).
    pub(crate) credential: Arc<str>,
    /// Its limits are learned (no budget configures it): answers teach it.
    learns: bool,
    /// A probe the upstream has not refused within this long was accepted: an
    /// upstream's 429 comes back at once, an image takes far longer.
    probe_grace: Duration,
    state: Mutex<State>,
    wake: Notify,
    /// Set when the pool is evicted: its admission task ends.
    closed: std::sync::atomic::AtomicBool,
    /// Requests waiting across all pools, against `max_depth`.
    depth: Arc<AtomicUsize>,
    max_depth: AtomicUsize,
    /// The shared ledger, with the Redis backend.
    remote: Option<Remote>,
    /// Its waits for budget, as metrics record them: found on first use.
    pub(crate) queue_wait: std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>,
}

/// A request in a pool's queue: its id, its client (or lane), where its turn
/// is sent, since when it waits, and its places in every queue it waits in.
type Waiter = (u64, Arc<str>, oneshot::Sender<Admission>, Instant, Places);

/// A request's places in the queues it waits in at once (one per upstream
/// serving its model): whatever their number, it counts once against
/// `queue.max_depth`. The default is a request that waits in one queue only,
/// and costs no allocation.
#[derive(Debug, Clone, Default)]
pub(crate) struct Places(Option<Arc<AtomicUsize>>);

impl Places {
    /// For a request about to wait in several queues at once.
    pub(crate) fn several() -> Places {
        Places(Some(Arc::new(AtomicUsize::new(0))))
    }

    /// Takes a place; true when it is the request's first.
    fn take(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(|n| n.fetch_add(1, Ordering::AcqRel) == 0)
    }

    /// Gives a place back; true when it was the request's last.
    fn give(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(|n| n.fetch_sub(1, Ordering::AcqRel) == 1)
    }

    /// The request waits in another queue now.
    fn held(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|n| n.load(Ordering::Acquire) > 0)
    }
}

/// How a pool admits: its limits and how they may change.
pub struct Settings {
    pub limits: Limits,
    pub max_in_flight: Option<usize>,
    pub probe_grace: Duration,
    /// Limits learned from the upstream instead of configured.
    pub learner: Option<Learner>,
    /// A ledger shared with other replicas.
    pub remote: Option<Remote>,
}

impl Pool {
    /// Creates the pool and starts its admission task.
    pub fn start(
        name: Arc<str>,
        credential: Arc<str>,
        settings: Settings,
        depth: Arc<AtomicUsize>,
        max_depth: usize,
    ) -> Arc<Pool> {
        let Settings {
            mut limits,
            mut max_in_flight,
            probe_grace,
            learner,
            remote,
        } = settings;
        if let Some(learned) = learner.as_ref().map(Learner::learned) {
            limits.per_minute = learned.per_minute;
            max_in_flight = learned.max_in_flight;
        }
        let full = limits;
        let share = remote
            .as_ref()
            .map_or(1, |r| r.redis.fallback_share().unwrap_or(1));
        let mut ledger = Ledger::new(limits);
        ledger.set_share(share);
        let pool = Arc::new(Pool {
            name,
            credential,
            learns: learner.is_some(),
            probe_grace,
            state: Mutex::new(State {
                ledger,
                full,
                share,
                epoch: 0,
                spent_alone: std::collections::VecDeque::new(),
                booked_recent: std::collections::VecDeque::new(),
                remote_retry: None,
                last_booked: None,
                last_told: None,
                head_shared: false,
                changes: 0,
                queue: FairQueue::new(full.burst_caps()),
                in_flight: 0,
                next_id: 0,
                tripped: None,
                closed_queue: false,
                retired: false,
                recovering: false,
                probe_out: None,
                pauses: 0,
                late_departures: 0,
                max_in_flight,
                learner,
            }),
            wake: Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
            depth,
            max_depth: AtomicUsize::new(max_depth),
            remote,
            queue_wait: std::sync::OnceLock::new(),
        });
        tokio::spawn(drive(pool.clone()));
        pool
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take admission down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn has_slot(&self, st: &mut State, now: Instant) -> bool {
        if st.recovering
            && let Some(since) = st.probe_out
            && now >= since + self.probe_grace
        {
            // Out this long without a rate limit: the upstream took it.
            st.recovering = false;
        }
        st.max_in_flight.is_none_or(|m| st.in_flight < m)
            && !(st.recovering && st.probe_out.is_some())
    }

    /// Charges an admitted call; while recovering, it is the probe (of the
    /// pause it names). On the local share while Redis is away, it is kept to
    /// tell the shared ledger later.
    fn admit(
        &self,
        st: &mut State,
        now: Instant,
        cost: &Cost,
        booked: Option<(Booked, Instant)>,
    ) -> Granted {
        let (booked, goes) = match booked {
            Some((b, goes)) => {
                st.last_booked = Some(goes);
                (Some(b), goes)
            }
            None => (None, now),
        };
        let ticket = st.ledger.charge(goes, cost);
        if booked.is_some() {
            // The last moments of shared bookings, for a Redis that loses
            // them (a failover replicates asynchronously; a restart loses
            // all): told again on rejoining, counted twice at worst.
            let keep = (st.full.burst + st.full.margin) * 2;
            while st
                .booked_recent
                .front()
                .is_some_and(|(at, _)| goes.saturating_duration_since(*at) >= keep)
            {
                st.booked_recent.pop_front();
            }
            st.booked_recent.push_back((goes, *cost));
        }
        if self.remote.is_some() && booked.is_none() {
            // Only the last minute matters to the shared ledger: a long
            // outage keeps no more than that.
            let window = Duration::from_secs(60) + st.full.margin;
            while st
                .spent_alone
                .front()
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= window)
            {
                st.spent_alone.pop_front();
            }
            st.spent_alone.push_back((now, *cost));
        }
        st.in_flight += 1;
        let probe = (st.recovering && st.probe_out.is_none()).then_some(st.pauses);
        if probe.is_some() {
            st.probe_out = Some(now);
        }
        Granted {
            counted: Counted {
                ticket,
                booked,
                due: goes,
                tolerance: (st.full.margin / 2).max(Duration::from_millis(1)),
            },
            probe,
        }
    }

    /// When `cost` fits the local ledger. Just after losing Redis, not before
    /// one burst window has passed since the last shared admission: what the
    /// other replicas spent in it is unknown here.
    fn local_ready(&self, st: &mut State, now: Instant, cost: &Cost) -> Instant {
        let at = st.ledger.ready_at(now, cost);
        match st.last_booked {
            Some(last) => at.max(last + st.full.burst + st.full.margin),
            None => at,
        }
    }

    /// The shared ledger decides admission (Redis is healthy, and every
    /// replica has had time to come back to it after an outage).
    fn shared(&self) -> Option<&Remote> {
        self.remote.as_ref().filter(|r| r.redis.settled())
    }

    fn permit(self: &Arc<Self>, granted: &Granted, cost: Cost, queued: Duration) -> Permit {
        Permit {
            leg: Arc::new(Leg {
                pool: self.clone(),
                counted: Mutex::new(granted.counted),
            }),
            cost,
            probe: granted.probe,
            queued,
        }
    }

    /// Whether the admission task has anything to do when budget or a slot
    /// comes free: a queued request, or a shared ledger to keep. With none, it
    /// is left asleep (it often runs on another thread: waking it costs both).
    fn anyone_waiting(&self, st: &State) -> bool {
        self.shared().is_some() || !st.queue.is_empty()
    }

    /// A waiter left this pool's queue: the last of its places gives back
    /// its one count against `queue.max_depth`.
    fn leave_queue(&self, places: &Places) {
        if places.give() {
            self.depth.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Waits (fairly, up to `max_wait`) until `cost` fits, then charges it.
    pub async fn acquire(
        self: &Arc<Self>,
        client: &Arc<str>,
        cost: Cost,
        max_wait: Duration,
    ) -> Result<Permit, Refusal> {
        self.acquire_as(
            client,
            Priority::Interactive,
            cost,
            max_wait,
            &Places::default(),
        )
        .await
    }

    /// [`Pool::acquire`] for a request of `class`: interactive waiters go
    /// first, batch keeps its minimum share. `places` are the request's
    /// places in every queue it waits in at once: it counts once against
    /// `queue.max_depth`, however many upstreams it waits for.
    pub(crate) async fn acquire_as(
        self: &Arc<Self>,
        client: &Arc<str>,
        class: Priority,
        cost: Cost,
        max_wait: Duration,
        places: &Places,
    ) -> Result<Permit, Refusal> {
        // A client's batch requests wait in a lane of their own.
        let lane: Arc<str>;
        let client = match class {
            Priority::Interactive => client,
            Priority::Batch => {
                lane = format!("batch:{client}").into();
                &lane
            }
        };
        let start = Instant::now();
        let (id, rx) = {
            let mut st = self.lock();
            if let Some(tripped) = st.tripped(start) {
                return Err(Refusal::CircuitOpen(tripped));
            }
            if st.closed_queue {
                return Err(Refusal::ShuttingDown {
                    pool: self.name.clone(),
                });
            }
            if st.retired {
                return Err(Refusal::Moved {
                    pool: self.name.clone(),
                });
            }
            // Redis away and never reached: this replica's share of a limit
            // is unknown (a pool with no limit has nothing to share).
            if let Some(remote) = &self.remote
                && !remote.redis.healthy()
                && remote.redis.fallback_share().is_none()
                && st.full.per_minute.iter().any(Option::is_some)
            {
                return Err(Refusal::StateUnknown {
                    pool: self.name.clone(),
                });
            }
            if let Some((d, limit)) = super::ledger::exceeds(&st.full.per_minute, &cost) {
                return Err(Refusal::TooLarge {
                    pool: self.name.clone(),
                    dimension: DIM_NAMES[d],
                    limit,
                    asked: cost.dims()[d],
                });
            }
            // With a shared ledger, only the admission task asks Redis.
            if self.shared().is_none()
                && st.queue.is_empty()
                && self.has_slot(&mut st, start)
                && self.local_ready(&mut st, start, &cost) <= start
            {
                let granted = self.admit(&mut st, start, &cost, None);
                return Ok(self.permit(&granted, cost, Duration::ZERO));
            }
            // A request already waiting in another upstream's queue holds
            // its one place against `max_depth`.
            let depth = self.depth.load(Ordering::Relaxed);
            if !places.held() && depth >= self.max_depth.load(Ordering::Relaxed) {
                let total = st.queue.total();
                return Err(Refusal::QueueFull {
                    depth,
                    retry_after: st.ledger.time_to_serve(start, &total),
                });
            }
            let mut ahead = st.queue.ahead_of_new_as(client, class, &cost);
            ahead.add(&cost);
            let wait = st.ledger.time_to_serve(start, &ahead);
            if wait > max_wait {
                return Err(Refusal::WaitTooLong {
                    pool: self.name.clone(),
                    wait,
                    max_wait,
                });
            }
            let id = st.next_id;
            st.next_id += 1;
            let (tx, rx) = oneshot::channel();
            st.queue.push_as(
                client,
                class,
                id,
                cost,
                (id, client.clone(), tx, Instant::now(), places.clone()),
            );
            st.changes += 1;
            if places.take() {
                self.depth.fetch_add(1, Ordering::Relaxed);
            }
            (id, rx)
        };
        self.wake.notify_one();
        let mut waiting = Waiting {
            pool: self.clone(),
            client: client.clone(),
            id,
            rx,
            admitted: false,
        };
        match tokio::time::timeout_at(start + max_wait, &mut waiting.rx).await {
            Ok(Ok(Err(turned))) => {
                waiting.admitted = true;
                Err(match turned {
                    Turned::Tripped(tripped) => Refusal::CircuitOpen(tripped),
                    Turned::ShuttingDown => Refusal::ShuttingDown {
                        pool: self.name.clone(),
                    },
                    Turned::Moved => Refusal::Moved {
                        pool: self.name.clone(),
                    },
                })
            }
            Ok(Ok(Ok(granted))) => {
                waiting.admitted = true;
                // A shared reservation may be a moment ahead; leaving before
                // it comes gives it back.
                let unsent = Unsent(Some(self.permit(&granted, cost, Duration::ZERO)));
                // A timer costs a tick (a millisecond) even when already due.
                if granted.counted.due > Instant::now() {
                    tokio::time::sleep_until(granted.counted.due).await;
                }
                let mut permit = unsent.send();
                permit.queued = start.elapsed();
                Ok(permit)
            }
            // The sender is only dropped with the pool; treat it as a timeout.
            Ok(Err(_)) | Err(_) => {
                let retry_after = {
                    let mut st = self.lock();
                    let total = st.queue.total();
                    st.ledger.time_to_serve(Instant::now(), &total)
                };
                Err(Refusal::TimedOut {
                    pool: self.name.clone(),
                    max_wait,
                    retry_after,
                })
            }
        }
    }

    /// A call that leaves late (its task ran late on a busy host, or it
    /// waited for a new connection's handshake) is counted from when it
    /// leaves, here and in the shared ledger: counted from its admission,
    /// the window after it could admit calls that reach the upstream within
    /// one window of it. The margin absorbs half of it without the
    /// bookkeeping; the rest of the margin is the network's.
    fn count_from_departure(&self, leg: &Leg) {
        let now = Instant::now();
        let mut counted = leg.lock();
        let late = now.saturating_duration_since(counted.due);
        // The common case, settled without the pool's lock.
        if late <= counted.tolerance {
            return;
        }
        let mut st = self.lock();
        counted.ticket = st.ledger.redate(counted.ticket, now);
        counted.due = now;
        st.late_departures += 1;
        if counted.booked.is_some() {
            // Redis lost now, the local share waits a window from this call.
            st.last_booked = st.last_booked.max(Some(now));
        }
        drop(st);
        if let (Some(remote), Some(booked)) = (self.shared(), counted.booked.as_mut()) {
            let late = u64::try_from(late.as_millis()).unwrap_or(u64::MAX);
            booked.at = booked.at.saturating_add(late);
            let (redis, key, id) = (remote.redis.clone(), remote.key.clone(), booked.id);
            tokio::spawn(async move {
                let _ = redis.redate(&key, id, late).await;
            });
        }
    }

    /// Admits queued requests while they fit on the local ledger; returns when
    /// to try again (`None`: when woken, by a finished call or a new arrival).
    fn pump(&self) -> Option<Instant> {
        let mut st = self.lock();
        if self.answer_tripped(&mut st) {
            return None;
        }
        loop {
            let now = Instant::now();
            let cost = *st.queue.front()?.0;
            if !self.has_slot(&mut st, now) {
                return self.probe_due(&st);
            }
            let at = self.local_ready(&mut st, now, &cost);
            if at > now {
                return Some(at);
            }
            let (_, _, tx, _, places) = st.queue.pop()?;
            self.leave_queue(&places);
            let granted = self.admit(&mut st, now, &cost, None);
            if let Err(Ok(granted)) = tx.send(Ok(granted)) {
                // Its client left between its turn and now: nothing is charged.
                self.release(&mut st, granted);
            }
        }
    }

    /// While the breaker is open nobody waiting can be served: answers them
    /// all now. True if it is open.
    fn answer_tripped(&self, st: &mut State) -> bool {
        let Some(tripped) = st.tripped(Instant::now()) else {
            return false;
        };
        while let Some((_, _, tx, _, places)) = st.queue.pop() {
            self.leave_queue(&places);
            let _ = tx.send(Err(Turned::Tripped(tripped.clone())));
        }
        true
    }

    /// At the end of a shutdown's grace: what still waits is answered (it
    /// could not be admitted in time), and nothing more is admitted.
    pub(crate) fn close_queue(&self) {
        let mut st = self.lock();
        st.closed_queue = true;
        while let Some((_, _, tx, _, places)) = st.queue.pop() {
            self.leave_queue(&places);
            let _ = tx.send(Err(Turned::ShuttingDown));
        }
        st.changes += 1;
    }

    /// Waiting for a call to end, or for the probe's grace to pass.
    fn probe_due(&self, st: &State) -> Option<Instant> {
        st.probe_out
            .filter(|_| st.recovering)
            .map(|since| since + self.probe_grace)
    }

    /// Admits queued requests as the shared ledger reserves their slots.
    async fn pump_shared(&self, remote: &Remote) -> Option<Instant> {
        self.rejoin(remote).await;
        loop {
            let now = Instant::now();
            // The first request of each client's lane, in this queue's order:
            // the shared ledger picks the one owed the most across replicas.
            let proposal = {
                let mut st = self.lock();
                if self.answer_tripped(&mut st) {
                    return None;
                }
                if st.queue.is_empty() {
                    Err(std::mem::take(&mut st.head_shared))
                } else if !self.has_slot(&mut st, now) {
                    return self.probe_due(&st);
                } else if let Some((at, changes)) = st.remote_retry
                    && at > now
                    && changes == st.changes
                {
                    return Some(at);
                } else if let Some(front) = st.queue.front().map(|(c, _)| *c)
                    && remote.redis.rejoining()
                    && let at = self.local_ready(&mut st, now, &front)
                    && at > now
                {
                    // Just back from an outage, other replicas may still be
                    // spending their own shares, unknown to the shared
                    // ledger: this one keeps within its share too.
                    return Some(at);
                } else {
                    let caps = super::ledger::burst_caps(&st.full);
                    // Across replicas a batch head goes after every
                    // interactive one, unless it is owed its share here or
                    // has waited as long as its share allows (another
                    // replica's steady interactive traffic must not starve it).
                    let patience = match st.queue.batch_every() {
                        0 => Duration::MAX,
                        n => st.full.burst.saturating_mul(n),
                    };
                    let heads: Vec<(Arc<str>, u64, Cost, u64, bool)> = st
                        .queue
                        .lane_heads()
                        .take(MAX_CANDIDATES)
                        .map(|(client, cost, (id, _, _, since, _), _, urgent)| {
                            (
                                client.clone(),
                                *id,
                                *cost,
                                super::queue::weight(cost, &caps),
                                urgent || now.saturating_duration_since(*since) >= patience,
                            )
                        })
                        .collect();
                    st.head_shared = true;
                    let full = st.full;
                    Ok((heads, st.changes, full))
                }
            };
            let (heads, changes, full) = match proposal {
                Ok(p) => p,
                Err(registered) => {
                    if registered {
                        // Nothing waits here: hold no other replica back.
                        let _ = remote.redis.leave(&remote.key).await;
                    }
                    return None;
                }
            };
            let candidates: Vec<Candidate<'_>> = heads
                .iter()
                .map(|(client, _, cost, weight, urgent)| Candidate {
                    client,
                    weight: *weight,
                    cost: *cost,
                    batch: !urgent,
                })
                .collect();
            let booking = remote
                .redis
                .book(&remote.key, &candidates, &full, HORIZON)
                .await;
            let now = Instant::now();
            match booking {
                // Redis went away: the local share takes over at once.
                Err(_) => return Some(now),
                Ok((Booking::Wait(wait), _)) => {
                    // Asked again before the head registered goes stale, so
                    // other replicas keep deferring to it while it waits.
                    let at = now
                        + wait
                            .saturating_sub(HORIZON)
                            .clamp(Duration::from_millis(1), STALE_HEAD / 2);
                    self.lock().remote_retry = Some((at, changes));
                    return Some(at);
                }
                // Another replica's client is owed this turn: ask again soon
                // (the head stays registered meanwhile).
                Ok((Booking::Deferred, _)) => return Some(now + DEFER),
                Ok((Booking::Tripped(_), _)) => {
                    if let Ok(Some((answer, left))) =
                        remote.redis.tripped(remote.key.breaker()).await
                    {
                        self.lock().tripped = Some(Arc::new(Tripped::from_answer(
                            answer,
                            Instant::now() + left,
                        )));
                    }
                    continue;
                }
                Ok((
                    Booking::Booked {
                        id: booked,
                        wait,
                        at,
                    },
                    pick,
                )) => {
                    let booked = Booked { id: booked, at };
                    let (client, id, cost, _, _) = &heads[pick];
                    let mut st = self.lock();
                    st.head_shared = false;
                    st.remote_retry = None;
                    // The lane may have changed while Redis answered.
                    let same =
                        st.queue
                            .lane_heads()
                            .any(|(c, front_cost, (front, _, _, _, _), _, _)| {
                                c == client && front == id && front_cost == cost
                            });
                    if !same || !self.has_slot(&mut st, now) {
                        drop(st);
                        self.cancel_booking(booked);
                        continue;
                    }
                    let Some((_, _, tx, _, places)) = st.queue.pop_lane(client) else {
                        continue;
                    };
                    self.leave_queue(&places);
                    let granted = self.admit(&mut st, now, cost, Some((booked, now + wait)));
                    if let Err(Ok(granted)) = tx.send(Ok(granted)) {
                        self.release(&mut st, granted);
                    }
                }
            }
        }
    }

    /// After Redis was away: tells the shared ledger what was spent on the
    /// local share meanwhile, and what was booked in the last two burst
    /// windows before (a Redis that failed over or restarted may have lost
    /// it), so rejoining is no burst; and follows a change in the number of
    /// replicas the limits are shared by.
    async fn rejoin(&self, remote: &Remote) {
        let epoch = remote.redis.epoch();
        let share = remote.redis.fallback_share().unwrap_or(1);
        let (spent, limits) = {
            let mut st = self.lock();
            if st.share != share {
                st.share = share;
                st.ledger.set_share(share);
            }
            if st.epoch == epoch {
                return;
            }
            st.epoch = epoch;
            let now = Instant::now();
            let window = Duration::from_secs(60) + st.full.margin;
            let recent = (st.full.burst + st.full.margin) * 2;
            let booked = std::mem::take(&mut st.booked_recent)
                .into_iter()
                .filter(|(at, _)| now.saturating_duration_since(*at) < recent);
            let spent: Vec<(Duration, Cost)> = std::mem::take(&mut st.spent_alone)
                .into_iter()
                .filter(|(at, _)| now.duration_since(*at) < window)
                .chain(booked)
                .map(|(at, c)| (now.saturating_duration_since(at), c))
                .collect();
            (spent, st.full)
        };
        if !spent.is_empty() {
            tracing::info!(pool = %self.name, calls = spent.len(), "told the shared ledger what was spent while redis was away");
            let _ = remote.redis.replay(&remote.key, &spent, &limits).await;
        }
    }

    /// Gives a shared reservation back (its caller left before using it).
    fn cancel_booking(&self, booked: Booked) {
        if let Some(remote) = &self.remote {
            let (redis, key) = (remote.redis.clone(), remote.key.clone());
            tokio::spawn(async move {
                let _ = redis.settle(&key, booked.id, &Cost::default()).await;
            });
        }
    }

    /// Undoes an admission whose client is gone.
    fn release(&self, st: &mut State, granted: Granted) {
        st.ledger.settle(granted.counted.ticket, &Cost::default());
        if let Some(booked) = granted.counted.booked {
            self.cancel_booking(booked);
        }
        st.in_flight -= 1;
        probe_done(st, granted.probe);
    }

    /// Answers this pool's queued and new requests with the upstream's money error
    /// until the cool-down ends.
    pub(crate) fn trip(&self, tripped: Tripped) {
        if let Some(remote) = &self.remote {
            let answer = Answer {
                status: tripped.status,
                headers: tripped.headers.clone(),
                body: tripped.body.clone(),
            };
            let cooldown = tripped.until.saturating_duration_since(Instant::now());
            let (redis, key) = (remote.redis.clone(), remote.key.clone());
            tokio::spawn(async move {
                let _ = redis.trip(key.breaker(), &answer, cooldown).await;
            });
        }
        self.lock().tripped = Some(Arc::new(tripped));
        self.wake.notify_one();
    }

    /// Holds the pool until `until`: the upstream said it is rate limited. Then
    /// one call probes before the rest follow.
    pub(crate) fn pause(&self, until: Instant) {
        let mut st = self.lock();
        if let Some(remote) = &self.remote {
            let delay = until.saturating_duration_since(Instant::now()) + st.full.margin;
            let (redis, key) = (remote.redis.clone(), remote.key.clone());
            tokio::spawn(async move {
                let _ = redis.pause(&key, delay).await;
            });
        }
        st.remote_retry = None;
        st.ledger.pause(until);
        st.recovering = true;
        // A probe still out from an earlier pause says nothing about this one.
        st.probe_out = None;
        st.pauses += 1;
        drop(st);
        self.wake.notify_one();
    }

    /// Takes limits announced on an answer no permit of this pool had (the
    /// refusal that made the pool).
    pub(crate) fn hear(&self, headers: &RateLimitHeaders) {
        let mut st = self.lock();
        let Some(learner) = st.learner.as_mut() else {
            return;
        };
        if let Some(learned) = learner.on_headers(headers) {
            self.apply(st, learned);
        }
    }

    /// Enforces newly learned limits from now on.
    fn apply(&self, mut st: MutexGuard<'_, State>, learned: super::learn::Learned) {
        if let Some(learner) = &st.learner {
            tracing::info!(
                pool = %self.name,
                source = learner.source().label(),
                requests_per_minute = learned.per_minute[0],
                tokens_per_minute = learned.per_minute[1],
                images_per_minute = learned.per_minute[2],
                max_in_flight = learned.max_in_flight,
                "learned the upstream's limits"
            );
        }
        st.full.per_minute = learned.per_minute;
        st.remote_retry = None;
        st.ledger.set_limits(learned.per_minute);
        let caps = st.full.burst_caps();
        st.queue.set_caps(caps);
        st.max_in_flight = learned.max_in_flight;
        drop(st);
        self.wake.notify_one();
    }

    /// Nothing waits, nothing is in flight, and nothing is left in its windows.
    /// A pause long over needs no probe any more: a pool whose last call was
    /// the 429 that paused it is idle too (it was never evicted).
    pub(crate) fn is_idle(&self) -> bool {
        let mut st = self.lock();
        let now = Instant::now();
        st.queue.is_empty()
            && st.in_flight == 0
            && st.tripped(now).is_none()
            && st.ledger.is_idle(now)
    }

    /// Ends the admission task; the pool must no longer be reachable.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Batch's share of turns while interactive requests wait too.
    pub(crate) fn set_batch_min_share(&self, share: f64) {
        self.lock().queue.set_batch_min_share(share);
    }

    /// A reloaded `queue.max_depth`, for requests arriving from now on.
    pub(crate) fn set_max_depth(&self, max_depth: usize) {
        self.max_depth.store(max_depth, Ordering::Relaxed);
    }

    /// A reloaded config changed its budget: its limits and its cap on calls
    /// at once, from now on, in place (what it admitted stays counted, what
    /// waits keeps its place). A learned pool keeps what it learned.
    pub(crate) fn reconfigure(&self, limits: Limits, max_in_flight: Option<usize>) {
        if self.learns {
            return;
        }
        let mut st = self.lock();
        st.full = limits;
        st.ledger.reconfigure(limits);
        let caps = st.full.burst_caps();
        st.queue.set_caps(caps);
        st.max_in_flight = max_in_flight;
        st.remote_retry = None;
        drop(st);
        self.wake.notify_one();
    }

    /// A reloaded config removed its budget: everyone waiting is sent, in
    /// the order they waited, to the pool that covers their model now; calls
    /// in flight end here. Its admission task ends.
    pub(crate) fn retire(&self) {
        let mut st = self.lock();
        st.retired = true;
        while let Some((_, _, tx, _, places)) = st.queue.pop() {
            self.leave_queue(&places);
            let _ = tx.send(Err(Turned::Moved));
        }
        drop(st);
        self.close();
    }

    #[cfg(test)]
    pub(crate) fn queue_depth(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn status(&self) -> PoolStatus {
        let mut st = self.lock();
        let now = Instant::now();
        let dims = st.ledger.status(now);
        PoolStatus {
            name: self.name.clone(),
            credential: self.credential.clone(),
            limits: st
                .learner
                .as_ref()
                .map_or(Source::Configured, Learner::source)
                .label(),
            limits_since: st
                .learner
                .as_ref()
                .map(|l| humantime::format_rfc3339_seconds(l.changed()).to_string()),
            max_in_flight: st.max_in_flight,
            queue_depth: st.queue.len(),
            queue_batch: st.queue.len_of(Priority::Batch),
            longest_wait_ms: st
                .queue
                .lane_heads()
                .map(|(_, _, (_, _, _, since, _), _, _)| now.saturating_duration_since(*since))
                .max()
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            in_flight: st.in_flight,
            late_departures: st.late_departures,
            paused_for_ms: st
                .ledger
                .paused_until()
                .map_or(0, |p| p.saturating_duration_since(now).as_millis() as u64),
            remaining: DIM_NAMES
                .iter()
                .zip(dims)
                .filter_map(|(n, d)| Some((*n, d?)))
                .collect(),
        }
    }
}

async fn drive(pool: Arc<Pool>) {
    while !pool.closed.load(Ordering::Acquire) {
        let next = match pool.shared() {
            Some(remote) => pool.pump_shared(remote).await,
            None => pool.pump(),
        };
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = pool.wake.notified() => {}
                }
            }
            None => pool.wake.notified().await,
        }
    }
}

/// The probe of the current pause is back: another may go.
fn probe_done(st: &mut State, probe: Probe) {
    if probe.is_some() && probe == Some(st.pauses) {
        st.probe_out = None;
    }
}

/// A queued request's place; dropping it before admission gives the place up.
struct Waiting {
    pool: Arc<Pool>,
    client: Arc<str>,
    id: u64,
    rx: oneshot::Receiver<Admission>,
    admitted: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.admitted {
            return;
        }
        let mut st = self.pool.lock();
        if let Some((_, _, _, _, places)) = st.queue.remove(&self.client, self.id) {
            st.changes += 1;
            self.pool.leave_queue(&places);
        } else if let Ok(Ok(granted)) = self.rx.try_recv() {
            // Admitted just as it left: give the charge back.
            self.pool.release(&mut st, granted);
        }
        drop(st);
        self.pool.wake.notify_one();
    }
}

/// An admitted call. It counts as in flight until dropped; settle it once the
/// upstream says what the call really cost.
pub struct Permit {
    leg: Arc<Leg>,
    cost: Cost,
    /// The one call let through after a rate-limit pause.
    probe: Probe,
    /// How long the request waited for budget.
    pub queued: Duration,
}

/// Where an admitted call is counted, in this pool's ledger and the shared
/// one, and from when. Told by the upstream layer when the call leaves.
struct Leg {
    pool: Arc<Pool>,
    counted: Mutex<Counted>,
}

#[derive(Debug, Clone, Copy)]
struct Counted {
    ticket: Ticket,
    /// Its reservation in the shared ledger.
    booked: Option<Booked>,
    /// When it is counted from: the moment it was admitted for, until it
    /// leaves late.
    due: Instant,
    /// How late it may leave and still be counted from `due`: half the
    /// margin, at least the millisecond a timer may add.
    tolerance: Duration,
}

impl Leg {
    /// Taken before the pool's lock, never while holding it.
    fn lock(&self) -> MutexGuard<'_, Counted> {
        self.counted.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Departure for Leg {
    fn departed(&self) {
        self.pool.count_from_departure(self);
    }
}

/// A call admitted in two pools (a Responses call and its image tool).
impl Departure for [Arc<Leg>; 2] {
    fn departed(&self) {
        for leg in self {
            leg.departed();
        }
    }
}

impl Permit {
    pub(crate) fn estimate(&self) -> Cost {
        self.cost
    }

    /// What the upstream layer tells as this call leaves; with `also`, the
    /// call's other admission (a Responses call's image tool) hears it too.
    pub(crate) fn departure(&self, also: Option<&Permit>) -> Arc<dyn Departure> {
        match also {
            None => self.leg.clone(),
            Some(other) => Arc::new([self.leg.clone(), other.leg.clone()]),
        }
    }

    fn counted(&self) -> Counted {
        *self.leg.lock()
    }

    /// Replaces the estimate with what the call really cost.
    pub(crate) fn settle(&self, actual: &Cost) {
        let counted = self.counted();
        let pool = &self.leg.pool;
        let waiting = {
            let mut st = pool.lock();
            st.ledger.settle(counted.ticket, actual);
            pool.anyone_waiting(&st)
        };
        if let (Some(remote), Some(booked)) = (&pool.remote, counted.booked)
            && *actual != self.cost
        {
            let (redis, key, actual) = (remote.redis.clone(), remote.key.clone(), *actual);
            tokio::spawn(async move {
                let _ = redis.settle(&key, booked.id, &actual).await;
            });
        }
        if waiting {
            self.leg.pool.wake.notify_one();
        }
    }

    /// Folds in the upstream's `x-ratelimit-*` from this call's response.
    pub(crate) fn observe(&self, headers: &RateLimitHeaders) {
        if headers == &RateLimitHeaders::default() {
            return;
        }
        let now = Instant::now();
        let counted = self.counted();
        let (margin, tell) = {
            let mut st = self.leg.pool.lock();
            st.ledger.observe(now, counted.ticket.at, headers);
            // The shared ledger hears the upstream's view at most so often:
            // it changes little from one answer to the next.
            let tell = st.last_told.is_none_or(|t| now >= t + OBSERVE_EVERY);
            if tell {
                st.last_told = Some(now);
            }
            (st.full.margin, tell)
        };
        if let (Some(remote), Some(booked), true) = (&self.leg.pool.remote, counted.booked, tell) {
            let (redis, key, headers) = (remote.redis.clone(), remote.key.clone(), *headers);
            tokio::spawn(async move {
                let _ = redis.observe(&key, booked.at, margin, &headers).await;
            });
        }
    }

    /// Learns from this call's answer, for a pool whose limits are learned:
    /// announced limits, or a success or a rate limit where none are announced.
    pub fn learn(&self, headers: &RateLimitHeaders, rate_limited: bool) {
        let at = self.counted().ticket.at;
        let pool = &self.leg.pool;
        if !pool.learns {
            // A configured pool: no lock taken per answer for nothing.
            return;
        }
        let mut st = pool.lock();
        let in_flight = st.in_flight;
        let Some(learner) = st.learner.as_mut() else {
            return;
        };
        let update = learner.on_headers(headers).or_else(|| {
            if rate_limited {
                learner.on_rate_limited(in_flight, at)
            } else {
                learner.on_success(in_flight)
            }
        });
        if let Some(learned) = update {
            pool.apply(st, learned);
        }
    }

    /// The upstream answered this call without a rate limit. Only the probe,
    /// admitted after the pause began, can tell that capacity is back; an
    /// older call's answer says nothing about it.
    pub(crate) fn recovered(&self) {
        if self.probe.is_none() {
            return;
        }
        let mut st = self.leg.pool.lock();
        if st.recovering && self.probe == Some(st.pauses) {
            st.recovering = false;
            drop(st);
            self.leg.pool.wake.notify_one();
        }
    }
}

/// A permit whose shared reservation has not come yet: dropped so (its caller
/// left), the reservation and the charge are given back.
struct Unsent(Option<Permit>);

impl Unsent {
    fn send(mut self) -> Permit {
        self.0.take().expect("an unsent permit is sent once")
    }
}

impl Drop for Unsent {
    fn drop(&mut self) {
        if let Some(permit) = self.0.take() {
            permit.settle(&Cost::default());
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut st = self.leg.pool.lock();
        st.in_flight -= 1;
        probe_done(&mut st, self.probe);
        let waiting = self.leg.pool.anyone_waiting(&st);
        drop(st);
        if waiting {
            self.leg.pool.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(limits: Limits, max_in_flight: Option<usize>) -> Settings {
        Settings {
            limits,
            max_in_flight,
            probe_grace: Duration::from_secs(2),
            learner: None,
            remote: None,
        }
    }

    fn pool(rpm: u64, max_depth: usize) -> Arc<Pool> {
        pool_counting_in(rpm, Arc::new(AtomicUsize::new(0)), max_depth)
    }

    /// A pool whose waiters count in `depth`, which other pools may share.
    fn pool_counting_in(rpm: u64, depth: Arc<AtomicUsize>, max_depth: usize) -> Arc<Pool> {
        Pool::start(
            "test".into(),
            "cred".into(),
            settings(
                Limits {
                    per_minute: [Some(rpm), None, None],
                    burst: Duration::from_secs(1),
                    margin: Duration::ZERO,
                    safety: 1.0,
                },
                None,
            ),
            depth,
            max_depth,
        )
    }

    const ONE: Cost = Cost {
        requests: 1,
        tokens: 0,
        images: 0,
    };

    /// Batch clients flood a pool of ten a second while an interactive
    /// client sends one request a second: each interactive request waits at
    /// most one burst window, and batch still gets its share meanwhile.
    #[tokio::test(start_paused = true)]
    async fn interactive_waits_at_most_a_window_behind_a_batch_flood() {
        let p = pool(600, 10_000);
        let start = Instant::now();
        let interactive: Arc<str> = "i".into();
        // A hundred batch clients: fairness alone would put the interactive
        // client behind a turn of each.
        let flood: Vec<_> = (0..300)
            .map(|i| {
                let (p, batch): (_, Arc<str>) = (p.clone(), format!("b{}", i % 100).into());
                tokio::spawn(async move {
                    let permit = p
                        .acquire_as(
                            &batch,
                            Priority::Batch,
                            ONE,
                            Duration::from_secs(120),
                            &Places::default(),
                        )
                        .await
                        .unwrap();
                    let at = Instant::now() - start;
                    drop(permit);
                    at
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut waits = Vec::new();
        for _ in 0..20 {
            let asked = Instant::now();
            let permit = p
                .acquire_as(
                    &interactive,
                    Priority::Interactive,
                    ONE,
                    Duration::from_secs(120),
                    &Places::default(),
                )
                .await
                .unwrap();
            waits.push(Instant::now() - asked);
            drop(permit);
            tokio::time::sleep_until(asked + Duration::from_secs(1)).await;
        }
        let mut batch_times = Vec::new();
        for t in flood {
            batch_times.push(t.await.unwrap());
        }
        waits.sort();
        assert!(waits[18] <= Duration::from_secs(1), "p95 {:?}", waits[18]);
        assert!(waits[19] <= Duration::from_secs(1), "max {:?}", waits[19]);
        // Batch kept going: in the 20 s the interactive client was there,
        // it got the rest of each second's ten.
        let served = batch_times
            .iter()
            .filter(|t| **t <= Duration::from_secs(20))
            .count();
        assert!(served >= 20 * 10 - 20 - 10, "batch served {served}");
    }

    #[tokio::test(start_paused = true)]
    async fn batch_keeps_its_share_when_interactive_never_stops() {
        let p = pool(600, 10_000);
        let start = Instant::now();
        let spawn = |client: &str, class: Priority, n: usize| {
            let client: Arc<str> = client.into();
            (0..n)
                .map(|_| {
                    let (p, client) = (p.clone(), client.clone());
                    tokio::spawn(async move {
                        let permit = p
                            .acquire_as(
                                &client,
                                class,
                                ONE,
                                Duration::from_secs(600),
                                &Places::default(),
                            )
                            .await
                            .unwrap();
                        let at = Instant::now() - start;
                        drop(permit);
                        at
                    })
                })
                .collect::<Vec<_>>()
        };
        let interactive = spawn("i", Priority::Interactive, 1000);
        tokio::task::yield_now().await;
        let batch = spawn("b", Priority::Batch, 100);
        let mut b = Vec::new();
        for t in batch {
            b.push(t.await.unwrap());
        }
        for t in interactive {
            t.await.unwrap();
        }
        // Ten a second in all, one in ten of them batch while both wait:
        // the hundredth batch request went within about 100 s, long before
        // the thousand interactive ones were done.
        b.sort();
        assert!(
            b[99] <= Duration::from_secs(101),
            "last batch at {:?}",
            b[99]
        );
        assert!(
            b[9] >= Duration::from_secs(5),
            "batch did not jump the queue: {:?}",
            b[9]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fifty_requests_at_ten_per_second_all_get_through_in_four_seconds() {
        let p = pool(600, 1000);
        let start = Instant::now();
        let client: Arc<str> = "c".into();
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (p, client) = (p.clone(), client.clone());
                tokio::spawn(async move {
                    let permit = p
                        .acquire(&client, ONE, Duration::from_secs(120))
                        .await
                        .unwrap();
                    let at = Instant::now() - start;
                    drop(permit);
                    at
                })
            })
            .collect();
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap());
        }
        times.sort();
        assert_eq!(times[9], Duration::ZERO);
        assert_eq!(times[10], Duration::from_secs(1));
        assert_eq!(times[49], Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_client_waits_at_most_one_slot_behind_a_burst() {
        let p = pool(60, 1000); // one per second
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let _first = p.acquire(&a, ONE, Duration::from_secs(600)).await.unwrap();
        let start = Instant::now();
        let mut burst = Vec::new();
        for _ in 0..100 {
            let (p, a) = (p.clone(), a.clone());
            burst.push(tokio::spawn(async move {
                p.acquire(&a, ONE, Duration::from_secs(600))
                    .await
                    .map(|_| Instant::now())
            }));
        }
        tokio::task::yield_now().await;
        let admitted_b = p.acquire(&b, ONE, Duration::from_secs(600)).await.unwrap();
        assert!(
            Instant::now() - start <= Duration::from_secs(2),
            "b waited {:?}",
            Instant::now() - start
        );
        drop(admitted_b);
        for t in burst {
            t.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn leaving_the_queue_releases_the_place_and_charges_nothing() {
        let p = pool(60, 1000);
        let c: Arc<str> = "c".into();
        let _first = p.acquire(&c, ONE, Duration::from_secs(60)).await.unwrap();
        let (p2, c2) = (p.clone(), c.clone());
        let waiter =
            tokio::spawn(
                async move { p2.acquire(&c2, ONE, Duration::from_secs(60)).await.is_ok() },
            );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(p.queue_depth(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(p.queue_depth(), 0, "the place is released at once");
        assert_eq!(p.depth.load(Ordering::Relaxed), 0);
        // Its budget was never charged: one slot per second, the next is ours.
        tokio::time::sleep(Duration::from_millis(900)).await;
        let t = Instant::now();
        p.acquire(&c, ONE, Duration::from_secs(60)).await.unwrap();
        assert_eq!(Instant::now(), t);
    }

    /// Two pools (two upstreams of one model) sharing one depth.
    fn two_pools(max_depth: usize) -> [Arc<Pool>; 2] {
        let depth = Arc::new(AtomicUsize::new(0));
        [0, 1].map(|_| pool_counting_in(60, depth.clone(), max_depth))
    }

    /// A queued call whose task runs 300 ms after its admission (a busy
    /// host) counts from when it left: the calls of the next window go a
    /// whole window after it, so the upstream never sees eleven in one
    /// second.
    #[tokio::test(start_paused = true)]
    async fn a_call_that_leaves_late_holds_the_next_window_back_from_when_it_left() {
        let p = pool(600, 100);
        let c: Arc<str> = "c".into();
        let start = Instant::now();
        let mut left = Vec::new();
        for _ in 0..10 {
            drop(p.acquire(&c, ONE, Duration::from_secs(60)).await.unwrap());
            left.push(Instant::now());
        }
        // The late one is first in the queue, then nineteen that run on time.
        let mut late = Box::pin(p.acquire(&c, ONE, Duration::from_secs(60)));
        assert!(futures_util::poll!(&mut late).is_pending());
        let on_time: Vec<_> = (0..19)
            .map(|_| {
                let (p, c) = (p.clone(), c.clone());
                tokio::spawn(async move {
                    drop(p.acquire(&c, ONE, Duration::from_secs(60)).await.unwrap());
                    Instant::now()
                })
            })
            .collect();
        // Admitted at one second, its task runs at 1.3 s, and it leaves
        // then, as the upstream layer tells.
        tokio::time::sleep_until(start + Duration::from_millis(1300)).await;
        let permit = late.await.unwrap();
        permit.departure(None).departed();
        left.push(Instant::now());
        assert_eq!(permit.queued, Duration::from_millis(1300));
        drop(permit);
        for t in on_time {
            left.push(t.await.unwrap());
        }
        left.sort();
        let most = (0..left.len())
            .map(|i| {
                left[i..]
                    .iter()
                    .take_while(|t| **t - left[i] < Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap();
        assert_eq!(
            most,
            10,
            "{:?}",
            left.iter().map(|t| *t - start).collect::<Vec<_>>()
        );
        assert_eq!(p.status().late_departures, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waiting_on_two_upstreams_counts_once_against_the_depth() {
        let [a, b] = two_pools(2);
        let c: Arc<str> = "c".into();
        // Each pool's one slot a second is taken: what comes next waits.
        let _held = (
            a.acquire(&c, ONE, Duration::from_secs(60)).await.unwrap(),
            b.acquire(&c, ONE, Duration::from_secs(60)).await.unwrap(),
        );
        // Two requests, each waiting in both queues at once.
        let mut waiting = Vec::new();
        for _ in 0..2 {
            let places = Places::several();
            for p in [&a, &b] {
                let (p, c, places) = (p.clone(), c.clone(), places.clone());
                waiting.push(tokio::spawn(async move {
                    p.acquire_as(
                        &c,
                        Priority::Interactive,
                        ONE,
                        Duration::from_secs(60),
                        &places,
                    )
                    .await
                    .is_ok()
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!((a.queue_depth(), b.queue_depth()), (2, 2));
        assert_eq!(
            a.depth.load(Ordering::Relaxed),
            2,
            "two requests, not four places"
        );
        // The depth of 2 is reached: a third request is refused in either.
        for p in [&a, &b] {
            let e = p
                .acquire(&c, ONE, Duration::from_secs(60))
                .await
                .err()
                .unwrap();
            assert_eq!(e.code(), "penstock_queue_full");
        }
        // Leaving every queue gives its one place back.
        for w in &waiting {
            w.abort();
        }
        for w in waiting {
            let _ = w.await;
        }
        assert_eq!(a.depth.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn hopeless_waits_and_full_queues_are_refused_at_once() {
        let p = pool(60, 2);
        let c: Arc<str> = "c".into();
        let _held = p.acquire(&c, ONE, Duration::from_secs(10)).await.unwrap();
        // At one per second, a request that may wait 100 ms cannot be served.
        let start = Instant::now();
        let e = p
            .acquire(&c, ONE, Duration::from_millis(100))
            .await
            .err()
            .unwrap();
        assert_eq!(Instant::now(), start, "refused without waiting");
        assert_eq!(e.code(), "penstock_wait_too_long");
        assert!(e.retry_after() > Duration::ZERO);
        // Fill the queue (depth 2), then the next is refused as full.
        let mut waiters = Vec::new();
        for _ in 0..2 {
            let (p, c) = (p.clone(), c.clone());
            waiters.push(tokio::spawn(async move {
                p.acquire(&c, ONE, Duration::from_secs(60)).await.is_ok()
            }));
        }
        tokio::task::yield_now().await;
        let e = p
            .acquire(&c, ONE, Duration::from_secs(60))
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), "penstock_queue_full");
        assert!(e.retry_after() >= Duration::from_secs(1));
        for w in waiters {
            assert!(w.await.unwrap());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_cap_admits_the_next_when_one_finishes() {
        let p = Pool::start(
            "t".into(),
            "c".into(),
            settings(
                Limits {
                    per_minute: [Some(6000), None, None],
                    burst: Duration::from_secs(1),
                    margin: Duration::ZERO,
                    safety: 1.0,
                },
                Some(2),
            ),
            Arc::new(AtomicUsize::new(0)),
            100,
        );
        let c: Arc<str> = "c".into();
        let a = p.acquire(&c, ONE, Duration::from_secs(60)).await.unwrap();
        let _b = p.acquire(&c, ONE, Duration::from_secs(60)).await.unwrap();
        let (p2, c2) = (p.clone(), c.clone());
        let third = tokio::spawn(async move {
            p2.acquire(&c2, ONE, Duration::from_secs(60))
                .await
                .map(|_| Instant::now())
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!third.is_finished(), "two in flight: the third waits");
        let released = Instant::now();
        drop(a);
        assert_eq!(third.await.unwrap().unwrap(), released);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_queued_requests_then_one_probes_before_the_rest() {
        let p = pool(6000, 100);
        let c: Arc<str> = "c".into();
        let start = Instant::now();
        p.pause(start + Duration::from_secs(3));
        let probe = p.acquire(&c, ONE, Duration::from_secs(60)).await.unwrap();
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
        let (p2, c2) = (p.clone(), c.clone());
        let next = tokio::spawn(async move {
            p2.acquire(&c2, ONE, Duration::from_secs(60))
                .await
                .map(|_| Instant::now())
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!next.is_finished(), "the rest wait for the probe's answer");
        let answered = Instant::now();
        probe.recovered();
        assert_eq!(next.await.unwrap().unwrap(), answered);
        drop(probe);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_not_refused_within_its_grace_lets_the_rest_go() {
        let p = pool(6000, 100);
        let c: Arc<str> = "c".into();
        let start = Instant::now();
        let older = p.acquire(&c, ONE, Duration::from_secs(60)).await.unwrap();
        p.pause(start + Duration::from_secs(3));
        let probe = p.acquire(&c, ONE, Duration::from_secs(60)).await.unwrap();
        let (p2, c2) = (p.clone(), c.clone());
        let next = tokio::spawn(async move {
            p2.acquire(&c2, ONE, Duration::from_secs(60))
                .await
                .map(|_| Instant::now())
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        older.recovered();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !next.is_finished(),
            "a call admitted before the pause does not end it"
        );
        // The probe, still generating, was not refused: at 3 s + 2 s the rest go.
        assert_eq!(next.await.unwrap().unwrap(), start + Duration::from_secs(5));
        drop((probe, older));
    }

    #[tokio::test(start_paused = true)]
    async fn clients_share_images_not_turns() {
        // 600 images a minute: ten a second. One client asks ten at a time, the
        // other one at a time; both keep asking.
        let p = Pool::start(
            "img".into(),
            "cred".into(),
            settings(
                Limits {
                    per_minute: [None, None, Some(600)],
                    burst: Duration::from_secs(1),
                    margin: Duration::ZERO,
                    safety: 1.0,
                },
                None,
            ),
            Arc::new(AtomicUsize::new(0)),
            100,
        );
        let images = |n| Cost {
            requests: 1,
            tokens: 0,
            images: n,
        };
        // Fill the window so that everything below queues.
        let x: Arc<str> = "x".into();
        drop(
            p.acquire(&x, images(10), Duration::from_secs(600))
                .await
                .unwrap(),
        );
        let mut waits = Vec::new();
        for (client, n, count) in [("big", 10, 4), ("small", 1, 40)] {
            for _ in 0..count {
                let (p, c): (_, Arc<str>) = (p.clone(), client.into());
                waits.push(tokio::spawn(async move {
                    p.acquire(&c, images(n), Duration::from_secs(600))
                        .await
                        .map(|_| (c, Instant::now()))
                }));
                tokio::task::yield_now().await;
            }
        }
        let start = Instant::now();
        let mut served = std::collections::HashMap::<String, u64>::new();
        for w in waits {
            let (c, at) = w.await.unwrap().unwrap();
            if at <= start + Duration::from_secs(4) {
                *served.entry(c.to_string()).or_default() += if &*c == "big" { 10 } else { 1 };
            }
        }
        // About 40 images in the first four seconds, shared about evenly.
        let (big, small) = (served["big"], served["small"]);
        assert!(big <= 30 && small >= 15, "big {big}, small {small}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pool_whose_last_call_was_refused_becomes_idle_once_its_pause_is_over() {
        let p = pool(60, 100);
        let c: Arc<str> = "c".into();
        let permit = p.acquire(&c, ONE, Duration::from_secs(1)).await.unwrap();
        p.pause(Instant::now() + Duration::from_secs(5));
        drop(permit);
        assert!(!p.is_idle(), "paused, with a call in its windows");
        tokio::time::sleep(Duration::from_secs(70)).await;
        assert!(p.is_idle(), "nothing waits, runs or counts: it can go");
    }
}
