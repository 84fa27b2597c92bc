//! The first floor: the words every other module speaks. What a request is
//! (route, context, cost, the body type that carries them), what the upstream's
//! headers and answers say (rate-limit headers, `usage`, how an answer is
//! classified, its content encoding), the base URL, the error type and how
//! errors read as responses, what a service of the stack is, and what a
//! pool reports of itself. Nothing here imports any other penstock module.

pub mod body;
pub mod classify;
pub mod context;
pub mod cost;
pub mod encoding;
pub mod error;
pub mod fields;
pub mod headers;
pub mod json;
pub mod render;
pub mod route;
pub mod scope;
pub mod service;
pub mod status;
pub mod url;
pub mod usage;
