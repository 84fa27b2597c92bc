//! The fourth floor: penstock's logic, without HTTP services. Cost estimates,
//! prices, the classifier of upstream answers, and admission (a pool's ledger,
//! its fair queue, and the pool that drives them); metrics count what happens.
//! Imports the vocabulary, the config and the shared state below it.

pub mod classify;
pub mod encoding;
pub mod estimate;
pub mod learn;
pub mod ledger;
pub mod metrics;
pub mod pool;
pub mod prices;
pub mod queue;
pub mod recent;
pub mod scope;
