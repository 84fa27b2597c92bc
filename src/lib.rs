//! penstock: a rate-limiting, retrying, coalescing reverse proxy for the OpenAI API.
//! [`stack::build`] assembles the request path; [`server::start`] serves it.
#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod budget;
pub mod classify;
pub mod client_limit;
pub mod coalesce;
pub mod config;
pub mod error;
pub mod metrics;
pub mod request;
pub mod retry;
pub mod server;
pub mod stack;
pub mod upstream;
pub mod usage;

pub use config::Config;
pub use server::{Running, start};
