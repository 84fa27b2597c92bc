//! The third floor. The Redis backend several replicas share, when
//! `[state] backend = "redis"`: the connection ([`Redis`], with Sentinel and
//! Cluster) and stored answers with their leases. Each capability keeps its
//! own scripts beside it (`admission::shared`, `jobs::shared`,
//! `spend::shared`) on top of these.
//!
//! Redis is a dependency that can go away. Each command is bounded by
//! `state.command_timeout`; a failed command or heartbeat marks Redis
//! unavailable, and until a heartbeat succeeds again nothing waits on it: the
//! pools fall back to a local share of each limit (see `admission::pool`), the
//! cache and coalescing to this replica alone. Changes of health are logged
//! once each.
//!
//! All keys start with `{prefix}:v1:`; the version is part of every key, so a
//! replica running another version's scripts never touches these keys. The
//! keys of one pool, or of one cached answer, share a Redis Cluster hash tag.

mod client;
mod store;

pub use client::{Redis, Status, Unavailable};
pub use store::{Answer, Kind, Lease};
