//! Admission against RPM/TPM/IPM budgets: the stack's budget layer
//! ([`layer`]), which also picks the upstream, and what it stands on. Each
//! pool ([`pool`]) keeps a ledger of its windows ([`ledger`]), a fair queue
//! of its waiting requests ([`queue`]), and, when it learns its limits from
//! the upstream, a learner ([`learn`]); with Redis, its ledger is shared by
//! every replica through the scripts in [`shared`].

pub mod layer;
pub mod learn;
pub mod ledger;
pub mod pool;
pub mod queue;
pub mod shared;

pub use layer::*;
