//! The shared tier, with the Redis backend: the cache and the calls in
//! flight of every replica. Before a call, the shared cache is asked; then
//! one replica takes the call's lease and the others wait for its answer.

use std::sync::Arc;
use std::time::Duration;

use super::stored::Stored;
use crate::state::{Kind, Lease, Redis};
use crate::vocab::context::CacheKey;

/// A cache key as Redis keys carry it.
pub(super) fn hex(key: &CacheKey) -> String {
    use std::fmt::Write;
    key.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What the other replicas have to say about a call about to be made.
pub(super) enum Step {
    /// An answer: cached, or made by another replica's leader meanwhile.
    Answer(Stored),
    /// No replica makes it: this one does, holding the lease.
    Lead(Lease),
    /// Redis is unavailable: this replica alone decides.
    Alone,
}

/// The shared cache first; then the lease on the call, or, while another
/// replica holds it, waiting for its answer. A leader that dies stops renewing
/// its lease: when it lapses, a follower takes the call over.
pub(super) async fn across_replicas(redis: &Redis, hex: &str) -> Step {
    loop {
        match redis.get(Kind::Cache, hex).await {
            Ok(Some(answer)) => return Step::Answer(Stored::from_answer(answer, "hit")),
            Ok(None) => {}
            Err(_) => return Step::Alone,
        }
        match redis.take_lease(hex).await {
            Ok(Some(lease)) => return Step::Lead(lease),
            Ok(None) => {}
            Err(_) => return Step::Alone,
        }
        let mut delay = Duration::from_millis(25);
        loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(400));
            for kind in [Kind::Result, Kind::Cache] {
                match redis.get(kind, hex).await {
                    Ok(Some(answer)) => {
                        return Step::Answer(Stored::from_answer(answer, "coalesced"));
                    }
                    Ok(None) => {}
                    Err(_) => return Step::Alone,
                }
            }
            match redis.leased(hex).await {
                Ok(true) => {}
                // Ended without an answer for others, or its leader died.
                Ok(false) => break,
                Err(_) => return Step::Alone,
            }
        }
    }
}

/// A held lease, renewed while the call runs and given up when it ends. A
/// renewal that fails for Redis's sake (a timeout, a moment unavailable) is
/// tried again, sooner, until the lease would have lapsed: only a lease
/// another replica now holds, or one that lapsed, ends the renewing.
pub(super) struct Held {
    redis: Arc<Redis>,
    lease: Lease,
    renewing: tokio::task::JoinHandle<()>,
}

impl Held {
    pub(super) fn new(redis: Arc<Redis>, lease: Lease) -> Held {
        let (r, l) = (redis.clone(), lease.clone());
        let renewing = tokio::spawn(async move {
            let mut renewed = tokio::time::Instant::now();
            let mut pause = r.lease / 3;
            loop {
                tokio::time::sleep(pause).await;
                match r.renew(&l).await {
                    Ok(true) => {
                        renewed = tokio::time::Instant::now();
                        pause = r.lease / 3;
                    }
                    Ok(false) => return,
                    Err(_) if renewed.elapsed() >= r.lease => return,
                    Err(_) => pause = (r.lease / 10).max(Duration::from_millis(50)),
                }
            }
        });
        Held {
            redis,
            lease,
            renewing,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renewing.abort();
        let (redis, lease) = (self.redis.clone(), self.lease.clone());
        tokio::spawn(async move {
            let _ = redis.release(&lease).await;
        });
    }
}
