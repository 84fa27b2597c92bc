//! penstock: a rate-limiting, retrying, coalescing reverse proxy for the OpenAI API.
//! [`stack::build`] assembles the request path; [`server::start`] serves it.
//!
//! The modules stand on floors; each imports only from the floors below it:
//! 1. [`vocab`]: what a request, a cost, an upstream header and an error are;
//! 2. [`config`]: the configuration, as plain data, and its validation;
//! 3. [`state`]: the shared state of several replicas, in Redis;
//! 4. [`logic`]: estimates, prices, the classifier, admission (ledger, fair
//!    queue, pool) and metrics;
//! 5. [`layers`]: the services of the stack (edge, jobs, coalesce, client
//!    caps, spend, retry, budget, upstream);
//! 6. wiring: [`stack`], [`admin`], [`reload`], [`server`], [`logsink`] and `main`.
//!
//! `tests/all/floors.rs` fails when an import goes the other way.
#![forbid(unsafe_code)]

pub mod vocab;

pub mod config;

pub mod state;

pub mod logic;

pub mod layers;

pub mod admin;
pub mod logsink;
pub mod reload;
pub mod server;
pub mod stack;

pub use config::Config;
pub use server::{Running, start};
