//! penstock: a rate-limiting, retrying, coalescing reverse proxy for the OpenAI API.
//! [`stack::build`] assembles the request path; [`server::start`] serves it.
//!
//! One folder per capability, and the folders stand on floors; each imports
//! only from the floors below it:
//! 1. [`vocab`]: what a request, a cost, an upstream header, an error and a
//!    service of the stack are;
//! 2. [`config`]: the configuration, as plain data, one file per section,
//!    each with its own validation;
//! 3. [`state`] (the Redis backend) and [`telemetry`] (metrics, prices, logs);
//! 4. the capabilities, each a layer of the stack with all it needs beside
//!    it: [`edge`], [`jobs`], [`cache`], [`client_caps`], [`spend`],
//!    [`retry`], [`admission`], [`upstream`]. A capability never imports
//!    another: what two share is a word of the vocabulary, and what one needs
//!    of another [`stack`] hands it;
//! 5. wiring: [`stack`], [`admin`], [`reload`], [`server`] and `main`.
//!
//! `tests/all/floors.rs` fails when an import goes the other way.
#![forbid(unsafe_code)]

pub mod vocab;

pub mod config;

pub mod state;
pub mod telemetry;

pub mod admission;
pub mod cache;
pub mod client_caps;
pub mod edge;
pub mod jobs;
pub mod retry;
pub mod spend;
pub mod upstream;

pub mod admin;
pub mod reload;
pub mod server;
pub mod stack;

pub use config::Config;
pub use server::{Running, start};
