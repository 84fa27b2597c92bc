//! Where jobs live, behind one trait: [`redb`] keeps one replica's jobs
//! (durable at `jobs.path`, or in memory) with their queue in this process;
//! [`redis`] keeps every replica's, with one queue and a fenced lease on each
//! running job. The rest of the jobs application (its API, its runner, its
//! webhook) speaks to a [`Store`] and never asks which.

pub(super) mod redb;
pub(super) mod redis;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::{Job, JobError, JobsStatus, State};
use crate::config::{AfterSend, JobStore, JobsConfig};
use crate::telemetry::metrics::Metrics;
use crate::vocab::error::ProxyError;

/// What a submit came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Submitted {
    Accepted,
    /// A job of this id was submitted before (the same idempotency key):
    /// it is that job.
    Exists,
    /// Too many jobs waiting `"in all"` or `"for this client"`, or
    /// `"by size (jobs.max_bytes)"`.
    Full(&'static str),
}

/// What keeping the leases found.
#[derive(Debug, Default)]
pub(super) struct Kept {
    /// Jobs this replica no longer holds (cancelled, or taken over while
    /// the store was away): their calls stop.
    pub(crate) lost: Vec<String>,
    /// Jobs whose replica died, now held here: to be taken over.
    pub(crate) orphans: Vec<String>,
    /// Every replica's jobs queued and running, when the store counts them.
    pub(crate) counts: Option<(u64, u64)>,
}

/// A store of jobs. Its methods that may wait return boxed futures, so the
/// jobs application holds one `dyn Store`.
pub(super) trait Store: Send + Sync {
    /// Shared by every replica: it counts jobs itself, and its running jobs
    /// are leased.
    fn shared(&self) -> bool;

    /// How often the runner looks for work when nothing woke it (other
    /// replicas queue jobs too), and how often leases are kept.
    fn idle(&self) -> Duration;
    fn tick(&self) -> Duration;

    /// Counts for `/status`; `running_here` are the jobs this replica runs.
    fn status(&self, running_here: usize) -> JobsStatus;

    fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Job>, ProxyError>>;

    /// A job's request body (`answer` false) or answer body.
    fn bytes<'a>(
        &'a self,
        id: &'a str,
        answer: bool,
    ) -> BoxFuture<'a, Result<Option<Bytes>, ProxyError>>;

    /// Numbers `job` and keeps it, with its request body, if the limits
    /// (`jobs.max_total`, `max_per_tenant`, `max_bytes`) let it in.
    fn submit<'a>(
        &'a self,
        job: &'a mut Job,
        body: Bytes,
    ) -> BoxFuture<'a, Result<Submitted, ProxyError>>;

    /// Writes `job` (and its answer) if its stored state is one of `expect`;
    /// false when it was not (another replica or a cancel got there first).
    /// A job back in `Queued` goes to the head of the queue.
    fn change<'a>(
        &'a self,
        job: &'a Job,
        expect: &'a [State],
        result: Option<Bytes>,
    ) -> BoxFuture<'a, Result<bool, ProxyError>>;

    /// The next queued job, taken for this replica.
    fn claim(&self) -> BoxFuture<'_, Option<String>>;

    /// Records, before its call goes upstream, that a running job may be
    /// paid for; false when this replica cannot show it still holds the job.
    fn mark_sent<'a>(
        &'a self,
        id: &'a str,
        runs: Duration,
    ) -> BoxFuture<'a, Result<bool, ProxyError>>;

    /// A tenant's jobs, expired ones left out, in no order.
    fn list<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, Result<Vec<Job>, ProxyError>>;

    /// A queued job's place in the queue.
    fn position<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<usize>>;

    /// Expires finished jobs past `jobs.ttl`, then the oldest finished ones
    /// while answers hold more than `jobs.max_bytes`. Returns the moves it
    /// made, when the store does not count jobs itself.
    fn sweep(&self) -> BoxFuture<'_, Vec<(State, Option<State>)>>;

    /// A job ended here (its answer `job.result_bytes` long), or was
    /// cancelled (`cancelled`): its place in the limits is given back.
    fn ended(&self, job: &Job, cancelled: bool);

    /// Bytes of answers held, counting one of `just_written` just kept.
    fn held_bytes(&self, just_written: u64) -> u64;

    /// Whether this replica holds the job (always, for a store of its own).
    fn holds(&self, id: &str) -> bool;

    /// This replica lets go of the job.
    fn release(&self, id: &str);

    /// Renews the leases held here, finds jobs whose replica died, and
    /// reads the shared counts. Nothing, for a store of its own.
    fn keep(&self) -> BoxFuture<'_, Kept>;
}

/// Opens the store: Redis when `redis` is given, else redb at `jobs.path`
/// (or in memory), taking up the jobs it holds.
pub(super) fn open(
    config: &JobsConfig,
    after_send: AfterSend,
    metrics: &Metrics,
    redis: Option<Arc<crate::state::Redis>>,
) -> Result<Box<dyn Store>, String> {
    match redis {
        Some(redis) => {
            if config.path.is_some() {
                tracing::info!("jobs live in Redis (state.backend); jobs.path is not used");
            }
            Ok(Box::new(redis::RedisStore::new(redis, config)))
        }
        None => {
            let path = match config.store {
                JobStore::Memory => None,
                JobStore::Redb => config.path.as_deref(),
            };
            if let Some(dir) = path.and_then(std::path::Path::parent)
                && !dir.as_os_str().is_empty()
            {
                create_private_dir(dir)?;
            }
            Ok(Box::new(redb::LocalStore::open(
                path, config, after_send, metrics,
            )?))
        }
    }
}

pub(super) fn store_err(e: impl std::fmt::Display) -> ProxyError {
    JobError::Store(e.to_string()).into()
}

/// Creates the directory jobs live in (and its parents), readable by its
/// owner alone: the store holds requests as sent, credentials included.
fn create_private_dir(dir: &std::path::Path) -> Result<(), String> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| format!("data_dir: cannot create {}: {e}", dir.display()))
}
