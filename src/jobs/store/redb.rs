//! Jobs in redb, an embedded crash-safe store at `jobs.path` (in memory when
//! there is no path): one replica's jobs, surviving its restarts, with their
//! queue and counts kept in this process ([`LocalStore`]). Every call to the
//! database blocks (a commit waits for the disk); [`LocalStore`] makes them
//! on blocking threads.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{Kept, Store, Submitted, store_err};
use crate::config::{AfterSend, JobStore, JobsConfig};
use crate::jobs::{Job, JobsStatus, State, interrupted, now_ms};
use crate::telemetry::metrics::Metrics;
use crate::vocab::error::ProxyError;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const BODIES: TableDefinition<&str, &[u8]> = TableDefinition::new("bodies");
const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");

type Result<T> = std::result::Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

struct Local {
    db: std::sync::Arc<redb::Database>,
    /// New jobs, written by one thread in shared transactions: one commit
    /// (one wait for the disk) for all the jobs submitted meanwhile.
    committer: Mutex<std::sync::mpsc::Sender<Accepted>>,
}

/// What the store held when it was opened.
#[derive(Default)]
struct Recovered {
    /// Queued jobs, in their order.
    pub(crate) queued: Vec<String>,
    pub(crate) per_tenant: HashMap<String, usize>,
    pub(crate) bytes: u64,
    pub(crate) next_seq: u64,
    /// Every job's state, for the metrics.
    pub(crate) states: Vec<State>,
}

impl Local {
    pub(crate) fn open(path: Option<&std::path::Path>) -> Result<Local> {
        let db = match path {
            Some(path) => {
                let db = redb::Database::create(path)
                    .map_err(|e| format!("jobs.path: {}: {e}", path.display()))?;
                // It holds requests as sent, credentials included: the owner's alone.
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                        .map_err(|e| format!("jobs.path: {}: {e}", path.display()))?;
                }
                db
            }
            None => redb::Database::builder()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .map_err(|e| format!("jobs: {e}"))?,
        };
        let db = std::sync::Arc::new(db);
        let (committer, accepted) = std::sync::mpsc::channel::<Accepted>();
        let writer = db.clone();
        std::thread::Builder::new()
            .name("penstock-jobs-commit".into())
            .spawn(move || group_commit(&writer, &accepted))
            .map_err(|e| format!("jobs: {e}"))?;
        Ok(Local {
            db,
            committer: Mutex::new(committer),
        })
    }

    /// Takes up what the store holds: queued jobs in their order; running
    /// ones as the after-send policy says (they may have been sent).
    pub(crate) fn recover(&self, after_send: AfterSend) -> Result<Recovered> {
        let txn = self.db.begin_write().map_err(err)?;
        let mut out = Recovered::default();
        let mut queued: Vec<(u64, String)> = Vec::new();
        let mut changed: Vec<Job> = Vec::new();
        {
            let table = txn.open_table(JOBS).map_err(err)?;
            for entry in table.iter().map_err(err)? {
                let (_, v) = entry.map_err(err)?;
                let Ok(mut job) = serde_json::from_slice::<Job>(v.value()) else {
                    continue;
                };
                out.next_seq = out.next_seq.max(job.seq + 1);
                if job.state == State::Running {
                    interrupted(&mut job, after_send);
                    changed.push(job.clone());
                }
                if job.state == State::Queued {
                    queued.push((job.seq, job.id.clone()));
                    *out.per_tenant.entry(job.tenant.clone()).or_default() += 1;
                }
                out.bytes += job.result_bytes;
                out.states.push(job.state);
            }
        }
        {
            let mut table = txn.open_table(JOBS).map_err(err)?;
            for job in &changed {
                let v = serde_json::to_vec(job).unwrap_or_default();
                table.insert(job.id.as_str(), v.as_slice()).map_err(err)?;
            }
        }
        txn.open_table(BODIES).map_err(err)?;
        txn.open_table(RESULTS).map_err(err)?;
        txn.commit().map_err(err)?;
        queued.sort();
        out.queued = queued.into_iter().map(|(_, id)| id).collect();
        Ok(out)
    }

    pub(crate) fn load(&self, id: &str) -> Result<Option<Job>> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(JOBS).map_err(err)?;
        let Some(v) = table.get(id).map_err(err)? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(v.value()).ok())
    }

    /// A job's request body (`answer` false) or answer body.
    pub(crate) fn bytes(&self, id: &str, answer: bool) -> Result<Option<Bytes>> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn
            .open_table(if answer { RESULTS } else { BODIES })
            .map_err(err)?;
        Ok(t.get(id)
            .map_err(err)?
            .map(|v| Bytes::copy_from_slice(v.value())))
    }

    /// Writes a job (and its answer) in one transaction, durable when it
    /// returns, if its stored state is one of `expect`. An ended job's
    /// request body goes; `forget` drops its answer too.
    pub(crate) fn save(
        &self,
        job: &Job,
        expect: &[State],
        result: Option<&[u8]>,
        forget: bool,
    ) -> Result<bool> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut jobs = txn.open_table(JOBS).map_err(err)?;
            let current = jobs
                .get(job.id.as_str())
                .map_err(err)?
                .and_then(|v| serde_json::from_slice::<Job>(v.value()).ok())
                .map(|j| j.state);
            if !current.is_some_and(|s| expect.contains(&s)) {
                return Ok(false);
            }
            let v = serde_json::to_vec(job).map_err(err)?;
            jobs.insert(job.id.as_str(), v.as_slice()).map_err(err)?;
            let mut bodies = txn.open_table(BODIES).map_err(err)?;
            let mut results = txn.open_table(RESULTS).map_err(err)?;
            if let Some(result) = result {
                results.insert(job.id.as_str(), result).map_err(err)?;
            }
            if forget || job.state.is_done() {
                bodies.remove(job.id.as_str()).map_err(err)?;
            }
            if forget {
                results.remove(job.id.as_str()).map_err(err)?;
            }
        }
        txn.commit().map_err(err)?;
        Ok(true)
    }

    /// Stores a new job with the next group commit; returns once it is durable.
    pub(crate) fn insert(&self, job: &Job, body: Bytes) -> Result<()> {
        let record = serde_json::to_vec(job).map_err(err)?;
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        let sent = self
            .committer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Accepted {
                id: job.id.clone(),
                record,
                body,
                done,
            });
        if sent.is_err() {
            return Err("the job store's writer has stopped".into());
        }
        wait.recv().map_err(err)?
    }

    /// Marks a running job sent, in one write transaction (so a job finished
    /// meanwhile is not turned back).
    pub(crate) fn mark_sent(&self, id: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut table = txn.open_table(JOBS).map_err(err)?;
            let job = table
                .get(id)
                .map_err(err)?
                .and_then(|v| serde_json::from_slice::<Job>(v.value()).ok());
            if let Some(mut job) = job.filter(|j| j.state == State::Running) {
                job.sent = true;
                let v = serde_json::to_vec(&job).unwrap_or_default();
                table.insert(id, v.as_slice()).map_err(err)?;
            }
        }
        txn.commit().map_err(err)
    }

    /// Jobs matching `keep`.
    pub(crate) fn scan(&self, keep: impl Fn(&Job) -> bool) -> Result<Vec<Job>> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(JOBS).map_err(err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(err)? {
            let (_, v) = entry.map_err(err)?;
            if let Ok(job) = serde_json::from_slice::<Job>(v.value())
                && keep(&job)
            {
                out.push(job);
            }
        }
        Ok(out)
    }

    /// Expires finished jobs past `ttl`, then the oldest finished ones while
    /// answers hold more than `max`; forgets expired ones after another
    /// `ttl`. Returns the bytes still held and the jobs expired or forgotten.
    pub(crate) fn sweep(
        &self,
        ttl_ms: u64,
        max: u64,
        mut bytes: u64,
    ) -> (u64, Vec<(State, Option<State>)>) {
        let now = now_ms();
        let mut moved = Vec::new();
        let mut done = self.scan(|j| j.state.is_done()).unwrap_or_default();
        done.sort_by_key(|j| j.finished_at.unwrap_or(0));
        for mut job in done {
            let finished = job.finished_at.unwrap_or(0);
            if job.state == State::Expired {
                if finished.saturating_add(ttl_ms.saturating_mul(2)) < now
                    && self.forget(&job.id).is_ok()
                {
                    moved.push((State::Expired, None));
                }
                continue;
            }
            if finished.saturating_add(ttl_ms) < now || bytes > max {
                bytes = bytes.saturating_sub(job.result_bytes);
                let from = job.state;
                job.state = State::Expired;
                job.result_bytes = 0;
                job.answer = None;
                if let Ok(true) = self.save(&job, &[from], None, true) {
                    moved.push((from, Some(State::Expired)));
                }
            }
        }
        (bytes, moved)
    }

    fn forget(&self, id: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(JOBS).map_err(err)?.remove(id).map_err(err)?;
        txn.commit().map_err(err)
    }
}

/// A new job for the group commit, and whom to tell when it is durable.
struct Accepted {
    id: String,
    record: Vec<u8>,
    body: Bytes,
    done: std::sync::mpsc::SyncSender<Result<()>>,
}

/// Writes new jobs: each transaction takes every job waiting for it, so a
/// burst of submits shares a few commits. Ends when the store is dropped.
fn group_commit(db: &redb::Database, accepted: &std::sync::mpsc::Receiver<Accepted>) {
    while let Ok(first) = accepted.recv() {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match accepted.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let written = (|| -> std::result::Result<(), redb::Error> {
            let txn = db.begin_write()?;
            {
                let mut jobs = txn.open_table(JOBS)?;
                let mut bodies = txn.open_table(BODIES)?;
                for a in &batch {
                    jobs.insert(a.id.as_str(), a.record.as_slice())?;
                    bodies.insert(a.id.as_str(), a.body.as_ref())?;
                }
            }
            txn.commit()?;
            Ok(())
        })();
        for a in batch {
            let _ = a
                .done
                .send(written.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        }
    }
}

/// The queue and counts of a store of one replica's own.
#[derive(Default)]
struct Queue {
    /// Queued job ids, in their order.
    queued: VecDeque<String>,
    /// Jobs waiting or running, per tenant.
    per_tenant: HashMap<String, usize>,
    /// Bytes of answers held.
    bytes: u64,
    next_seq: u64,
}

impl Queue {
    /// One of the tenant's jobs ended (or was never taken).
    fn leave(&mut self, tenant: &str) {
        if let Some(n) = self.per_tenant.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_tenant.remove(tenant);
            }
        }
    }
}

/// One replica's jobs: redb, and the queue in this process.
pub(in crate::jobs) struct LocalStore {
    db: Arc<Local>,
    queue: Mutex<Queue>,
    config: JobsConfig,
}

impl LocalStore {
    /// Opens the database and takes up the jobs it holds, in their order.
    pub(super) fn open(
        path: Option<&std::path::Path>,
        config: &JobsConfig,
        after_send: AfterSend,
        metrics: &Metrics,
    ) -> std::result::Result<LocalStore, String> {
        let local = Local::open(path)?;
        let found = local
            .recover(after_send)
            .map_err(|e| format!("jobs.path: {e}"))?;
        if !found.queued.is_empty() {
            tracing::info!(
                queued = found.queued.len(),
                "jobs taken up from the store, in their order"
            );
        }
        for state in found.states {
            metrics.job_moved(None, Some(state.label()));
        }
        Ok(LocalStore {
            db: Arc::new(local),
            queue: Mutex::new(Queue {
                queued: found.queued.into(),
                per_tenant: found.per_tenant,
                bytes: found.bytes,
                next_seq: found.next_seq,
            }),
            config: config.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the database, on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Local) -> Result<T> + Send + 'static,
    ) -> std::result::Result<T, ProxyError> {
        let local = self.db.clone();
        tokio::task::spawn_blocking(move || f(&local))
            .await
            .map_err(store_err)?
            .map_err(store_err)
    }
}

impl Store for LocalStore {
    fn shared(&self) -> bool {
        false
    }

    fn idle(&self) -> Duration {
        Duration::from_secs(5)
    }

    fn tick(&self) -> Duration {
        crate::jobs::SWEEP_EVERY
    }

    fn status(&self, running_here: usize) -> JobsStatus {
        let q = self.lock();
        JobsStatus {
            store: match self.config.store {
                JobStore::Memory => "memory",
                JobStore::Redb => "redb",
            },
            queued: q.queued.len() as u64,
            running: running_here as u64,
            running_here,
            bytes: q.bytes,
            durable: self.config.store == JobStore::Redb,
        }
    }

    fn load<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, std::result::Result<Option<Job>, ProxyError>> {
        let id = id.to_string();
        self.blocking(move |l| l.load(&id)).boxed()
    }

    fn bytes<'a>(
        &'a self,
        id: &'a str,
        answer: bool,
    ) -> BoxFuture<'a, std::result::Result<Option<Bytes>, ProxyError>> {
        let id = id.to_string();
        self.blocking(move |l| l.bytes(&id, answer)).boxed()
    }

    fn submit<'a>(
        &'a self,
        job: &'a mut Job,
        body: Bytes,
    ) -> BoxFuture<'a, std::result::Result<Submitted, ProxyError>> {
        async move {
            {
                let mut q = self.lock();
                let waiting: usize = q.per_tenant.values().sum();
                let mine = q.per_tenant.get(&job.tenant).copied().unwrap_or(0);
                if waiting >= self.config.max_total {
                    return Ok(Submitted::Full("in all"));
                }
                if mine >= self.config.max_per_tenant {
                    return Ok(Submitted::Full("for this client"));
                }
                *q.per_tenant.entry(job.tenant.clone()).or_default() += 1;
                q.next_seq += 1;
                job.seq = q.next_seq;
            }
            let stored = job.clone();
            if let Err(e) = self.blocking(move |l| l.insert(&stored, body)).await {
                self.lock().leave(&job.tenant);
                return Err(e);
            }
            self.lock().queued.push_back(job.id.clone());
            Ok(Submitted::Accepted)
        }
        .boxed()
    }

    fn change<'a>(
        &'a self,
        job: &'a Job,
        expect: &'a [State],
        result: Option<Bytes>,
    ) -> BoxFuture<'a, std::result::Result<bool, ProxyError>> {
        async move {
            let (saved, expect) = (job.clone(), expect.to_vec());
            let changed = self
                .blocking(move |l| l.save(&saved, &expect, result.as_deref(), false))
                .await?;
            if changed && job.state == State::Queued {
                self.lock().queued.push_front(job.id.clone());
            }
            Ok(changed)
        }
        .boxed()
    }

    fn claim(&self) -> BoxFuture<'_, Option<String>> {
        std::future::ready(self.lock().queued.pop_front()).boxed()
    }

    fn mark_sent<'a>(
        &'a self,
        id: &'a str,
        _runs: Duration,
    ) -> BoxFuture<'a, std::result::Result<bool, ProxyError>> {
        let id = id.to_string();
        self.blocking(move |l| l.mark_sent(&id))
            .map(|r| r.map(|()| true))
            .boxed()
    }

    fn list<'a>(
        &'a self,
        tenant: &'a str,
    ) -> BoxFuture<'a, std::result::Result<Vec<Job>, ProxyError>> {
        let tenant = tenant.to_string();
        self.blocking(move |l| l.scan(|j| j.tenant == tenant && j.state != State::Expired))
            .boxed()
    }

    fn position<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<usize>> {
        std::future::ready(self.lock().queued.iter().position(|q| q == id)).boxed()
    }

    fn sweep(&self) -> BoxFuture<'_, Vec<(State, Option<State>)>> {
        async move {
            let bytes = self.lock().bytes;
            let ttl = self.config.ttl.as_millis() as u64;
            let max = self.config.max_bytes.as_u64();
            match self.blocking(move |l| Ok(l.sweep(ttl, max, bytes))).await {
                Ok((bytes, moved)) => {
                    self.lock().bytes = bytes;
                    moved
                }
                Err(_) => Vec::new(),
            }
        }
        .boxed()
    }

    fn ended(&self, job: &Job, cancelled: bool) {
        let mut q = self.lock();
        q.leave(&job.tenant);
        if cancelled {
            q.queued.retain(|id| *id != job.id);
        } else {
            q.bytes += job.result_bytes;
        }
    }

    fn held_bytes(&self, _just_written: u64) -> u64 {
        self.lock().bytes
    }

    fn holds(&self, _id: &str) -> bool {
        true
    }

    fn release(&self, _id: &str) {}

    fn keep(&self) -> BoxFuture<'_, Kept> {
        std::future::ready(Kept::default()).boxed()
    }
}

#[cfg(test)]
mod tests {
    //! The local store's own queue and limits, as the trait sees them.
    use super::*;

    fn job(id: &str, tenant: &str) -> Job {
        Job {
            id: id.into(),
            seq: 0,
            tenant: tenant.into(),
            state: State::Queued,
            created_at: now_ms(),
            started_at: None,
            finished_at: None,
            method: "POST".into(),
            uri: "/v1/images/generations".into(),
            headers: Vec::new(),
            text: false,
            sent: false,
            answer: None,
            result_bytes: 0,
            error: None,
            webhook: None,
        }
    }

    fn store(max_per_tenant: usize, max_total: usize) -> LocalStore {
        let config = JobsConfig {
            store: JobStore::Memory,
            max_per_tenant,
            max_total,
            ..JobsConfig::default()
        };
        let metrics = Metrics::new(&Default::default());
        LocalStore::open(None, &config, AfterSend::Never, &metrics).unwrap()
    }

    #[tokio::test]
    async fn jobs_are_numbered_and_taken_in_order_within_the_limits() {
        let s = store(2, 3);
        let mut jobs = [
            job("a", "t1"),
            job("b", "t1"),
            job("c", "t1"),
            job("d", "t2"),
        ];
        let mut said = Vec::new();
        for j in &mut jobs {
            said.push(s.submit(j, Bytes::from_static(b"{}")).await.unwrap());
        }
        assert_eq!(
            said,
            [
                Submitted::Accepted,
                Submitted::Accepted,
                Submitted::Full("for this client"),
                Submitted::Accepted,
            ]
        );
        assert_eq!((jobs[0].seq, jobs[1].seq, jobs[3].seq), (1, 2, 3));
        let mut e = job("e", "t3");
        let full = s.submit(&mut e, Bytes::new()).await.unwrap();
        assert_eq!(full, Submitted::Full("in all"));
        assert_eq!(s.position("b").await, Some(1));
        assert_eq!(s.status(0).queued, 3);
        // A cancel gives its place back, in the queue and in the limits.
        s.ended(&jobs[0], true);
        assert_eq!(s.position("b").await, Some(0));
        let again = s.submit(&mut jobs[2], Bytes::new()).await.unwrap();
        assert_eq!(again, Submitted::Accepted);
        assert_eq!(s.claim().await.as_deref(), Some("b"));
        assert_eq!(s.claim().await.as_deref(), Some("d"));
        assert_eq!(s.claim().await.as_deref(), Some("c"));
        assert_eq!(s.claim().await, None);
        assert_eq!(s.load("c").await.unwrap().unwrap().seq, 4);
    }

    #[tokio::test]
    async fn a_job_put_back_goes_to_the_head_and_an_end_counts_its_bytes() {
        let s = store(10, 10);
        let (mut a, mut b) = (job("a", "t"), job("b", "t"));
        s.submit(&mut a, Bytes::new()).await.unwrap();
        s.submit(&mut b, Bytes::new()).await.unwrap();
        assert_eq!(s.claim().await.as_deref(), Some("a"));
        a.state = State::Running;
        assert!(s.change(&a, &[State::Queued], None).await.unwrap());
        // Put back (a refusal to wait out): before b.
        a.state = State::Queued;
        assert!(s.change(&a, &[State::Running], None).await.unwrap());
        assert_eq!(s.position("a").await, Some(0));
        // A change from a state it is not in is refused.
        assert!(!s.change(&a, &[State::Running], None).await.unwrap());
        assert_eq!(s.claim().await.as_deref(), Some("a"));
        a.state = State::Succeeded;
        a.result_bytes = 5;
        let answer = Some(Bytes::from_static(b"hello"));
        assert!(s.change(&a, &[State::Queued], answer).await.unwrap());
        s.ended(&a, false);
        assert_eq!(s.held_bytes(0), 5);
        assert_eq!(s.bytes("a", true).await.unwrap().unwrap(), "hello");
    }
}
