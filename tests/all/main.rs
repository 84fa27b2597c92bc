//! Every integration test but one, in one binary: the crate and its
//! dependencies are linked once. One module per capability, each starting the
//! fake OpenAI and penstock on `127.0.0.1:0`; `support` holds what they
//! share. (`tests/metrics.rs` is a binary of its own: it reads the log lines
//! penstock writes through `tracing`, whose interest in a call site is kept
//! for the whole process, so no other test may run beside it.)

mod support;

mod admin;
mod azure;
mod budget;
mod cache;
mod cli;
mod fallback;
mod floors;
mod hardening;
mod jobs;
mod laws;
mod learn;
mod openai_fidelity;
mod priority;
mod proxy;
mod redis;
mod reload;
mod responses;
mod retry;
mod sdk;
mod spend;
mod tls;
mod upstreams;
