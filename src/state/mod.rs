//! The third floor. Shared state for several replicas: budgets, finished answers, in-flight
//! leases and the quota breaker, kept in Redis when `[state] backend = "redis"`.
//! Every replica that names the same Redis and key prefix spends one ledger.
//!
//! Redis is a dependency that can go away. Each command is bounded by
//! `state.command_timeout`; a failed command or heartbeat marks Redis
//! unavailable, and until a heartbeat succeeds again nothing waits on it: the
//! pools fall back to a local share of each limit (see `logic::pool`), the
//! cache and coalescing to this replica alone. Changes of health are logged
//! once each.
//!
//! All keys start with `{prefix}:v1:`; the version is part of every key, so a
//! replica running another version's scripts never touches these keys. The
//! keys of one pool, or of one cached answer, share a Redis Cluster hash tag.

mod client;
mod jobs;
mod ledger;
mod spend;
mod store;

pub use client::{Redis, Status, Unavailable};
pub use jobs::{Change, Claimed, JobCounts, StoredJob, Submitted};
pub use ledger::{Booking, Candidate, MAX_CANDIDATES, PoolKey, STALE_HEAD};
pub use store::{Answer, Kind, Lease};
