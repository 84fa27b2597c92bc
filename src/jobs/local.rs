//! Jobs in redb, an embedded crash-safe store at `jobs.path` (in memory when
//! there is no path): one replica's jobs, surviving its restarts. Every call
//! here blocks (a commit waits for the disk); the jobs layer makes them on
//! blocking threads.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{Job, State, now_ms};
use crate::config::AfterSend;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const BODIES: TableDefinition<&str, &[u8]> = TableDefinition::new("bodies");
const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");

type Result<T> = std::result::Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

pub(super) struct Local {
    db: std::sync::Arc<redb::Database>,
    /// New jobs, written by one thread in shared transactions: one commit
    /// (one wait for the disk) for all the jobs submitted meanwhile.
    committer: Mutex<std::sync::mpsc::Sender<Accepted>>,
}

/// What the store held when it was opened.
#[derive(Default)]
pub(super) struct Recovered {
    /// Queued jobs, in their order.
    pub queued: Vec<String>,
    pub per_tenant: HashMap<String, usize>,
    pub bytes: u64,
    pub next_seq: u64,
    /// Every job's state, for the metrics.
    pub states: Vec<State>,
}

impl Local {
    pub fn open(path: Option<&std::path::Path>) -> Result<Local> {
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
    pub fn recover(&self, after_send: AfterSend) -> Result<Recovered> {
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
                    super::interrupted(&mut job, after_send);
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

    pub fn load(&self, id: &str) -> Result<Option<Job>> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(JOBS).map_err(err)?;
        let Some(v) = table.get(id).map_err(err)? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(v.value()).ok())
    }

    /// A job's request body (`answer` false) or answer body.
    pub fn bytes(&self, id: &str, answer: bool) -> Result<Option<Bytes>> {
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
    pub fn save(
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
    pub fn insert(&self, job: &Job, body: Bytes) -> Result<()> {
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
    pub fn mark_sent(&self, id: &str) -> Result<()> {
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
    pub fn scan(&self, keep: impl Fn(&Job) -> bool) -> Result<Vec<Job>> {
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
    pub fn sweep(
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
