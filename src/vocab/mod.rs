//! The first floor: the words every other module speaks. What a request is
//! (route, context, cost, the body type that carries them), what the upstream's
//! headers and answers say (rate-limit headers, `usage`), the base URL, the
//! error type and how errors read as responses, and the shape of a JSON log line. Nothing here imports any other
//! penstock module.

pub mod body;
pub mod context;
pub mod cost;
pub mod error;
pub mod fields;
pub mod headers;
pub mod json;
pub mod logline;
pub mod render;
pub mod route;
pub mod url;
pub mod usage;
