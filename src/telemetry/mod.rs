//! The third floor, beside the shared state: what penstock tells about
//! itself. Prometheus metrics and what calls cost ([`metrics`], [`prices`]),
//! the admin page's recent history ([`recent`]), and the log: the shape of a
//! JSON line ([`logline`]) and the writer that keeps logging off the request
//! path ([`logsink`]). Imports the vocabulary and the config alone.

pub mod logline;
pub mod logsink;
pub mod metrics;
pub mod prices;
pub mod recent;
