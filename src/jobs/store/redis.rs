//! Async jobs shared by every replica. A job is a hash (its record, as the
//! jobs layer encodes it, and its state); the queue is one sorted set in
//! submit order; a running job is in a second sorted set scored by when its
//! lease ends, with its holder in a hash. Every change of state is one script
//! that checks the state it expects, so a cancel on one replica and an end on
//! another never both win. A replica renews its running jobs' leases; a job
//! whose lease has lapsed (its replica died) is taken over by another.
//! Request bodies and answers are stored as answers are (in pieces).
//!
//! Leases are fenced: each claim or takeover of a job counts its `fence` up
//! and names the holder `replica#fence`; renewals, the holder's changes and
//! the mark that the call is about to go upstream check that name, so a
//! replica that lost its job (Redis away longer than a lease) can neither
//! send it nor record anything for it. A job marked as going upstream is not
//! taken over before its call could have ended (`sent_until`): the replica
//! that sent it may still be running it, and its paid answer is kept.
//!
//! The job keys share one Cluster hash tag, `{jobs}`; bodies and answers
//! have their own. [`RedisStore`] is the jobs application's side of it: it
//! holds this replica's leases and the shared counts as last read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::{HeaderMap, StatusCode};
use redis::AsyncCommands;

use super::{Kept, Store, Submitted, store_err};
use crate::config::JobsConfig;
use crate::jobs::{Job, JobError, JobsStatus, State, now_ms};
use crate::state::{Answer, Kind};
use crate::state::{Redis, Unavailable};
use crate::vocab::error::ProxyError;

/// A job as stored: its record and what scripts keep beside it.
#[derive(Debug, Clone)]
struct StoredJob {
    pub(crate) record: Vec<u8>,
    pub(crate) state: String,
    /// An attempt reached the upstream.
    pub(crate) sent: bool,
    /// Its answer was dropped to keep `jobs.max_bytes`.
    pub(crate) evicted: bool,
}

/// Counts for `/status`.
#[derive(Debug, Clone, Copy, Default)]
struct JobCounts {
    pub(crate) queued: u64,
    pub(crate) running: u64,
    pub(crate) bytes: u64,
}

/// A change of a job's state: the states it may be in, the one it goes to.
struct Change<'a> {
    pub(crate) id: &'a str,
    pub(crate) tenant: &'a str,
    pub(crate) seq: u64,
    pub(crate) expect: &'a [&'a str],
    pub(crate) state: &'a str,
    pub(crate) done: bool,
    pub(crate) record: &'a [u8],
    pub(crate) finished_ms: u64,
    pub(crate) result_bytes: u64,
    /// How long an ended job's record is kept.
    pub(crate) keep: Duration,
    /// The holder making the change (its fenced name), or `None` for a
    /// change any replica may make (a cancel).
    pub(crate) holder: Option<&'a str>,
}

/// A job taken by this replica: its id and the fenced name it holds it by.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Claimed {
    pub(crate) id: String,
    pub(crate) holder: String,
}

fn claims(flat: Vec<String>) -> Vec<Claimed> {
    flat.chunks_exact(2)
        .map(|p| Claimed {
            id: p[0].clone(),
            holder: p[1].clone(),
        })
        .collect()
}

/// KEYS: counts, queue, job, the tenant's list, bytes. ARGV: tenant, max
/// total, max per tenant, id, seq, record, body bytes, max bytes, keep ms.
/// The request body counts in the bytes kept (answers and bodies, against
/// `jobs.max_bytes`) until the job ends.
const SUBMIT: &str = r#"
if redis.call('EXISTS', KEYS[3]) == 1 then return 4 end
local total = tonumber(redis.call('HGET', KEYS[1], '*') or '0')
if total >= tonumber(ARGV[2]) then return 1 end
local mine = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if mine >= tonumber(ARGV[3]) then return 2 end
local bytes = tonumber(redis.call('GET', KEYS[5]) or '0')
if bytes + tonumber(ARGV[7]) > tonumber(ARGV[8]) then return 3 end
redis.call('HINCRBY', KEYS[1], '*', 1)
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('INCRBY', KEYS[5], ARGV[7])
redis.call('HSET', KEYS[3], 'rec', ARGV[6], 'state', 'queued', 'tenant', ARGV[1],
  'body_bytes', ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -2001)
redis.call('PEXPIRE', KEYS[4], ARGV[9])
return 0
"#;

/// KEYS: job, queue, running, holders, counts, ended, bytes. ARGV: expected
/// states, new state, record, id, tenant, seq, done, finished ms, result
/// bytes, keep ms, holder (empty: any replica, as a cancel).
const CHANGE: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return 0 end
if ARGV[11] ~= '' and redis.call('HGET', KEYS[4], ARGV[4]) ~= ARGV[11] then return 0 end
local allowed = false
for s in string.gmatch(ARGV[1], '%S+') do
  if s == cur then allowed = true end
end
if not allowed then return 0 end
local new = ARGV[2]
local id = ARGV[4]
redis.call('HSET', KEYS[1], 'rec', ARGV[3], 'state', new)
local was_live = (cur == 'queued' or cur == 'running')
if new == 'queued' then
  redis.call('ZREM', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
  redis.call('ZADD', KEYS[2], ARGV[6], id)
elseif ARGV[7] == '1' then
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
  if was_live then
    redis.call('HINCRBY', KEYS[5], '*', -1)
    if redis.call('HINCRBY', KEYS[5], ARGV[5], -1) <= 0 then
      redis.call('HDEL', KEYS[5], ARGV[5])
    end
    redis.call('ZADD', KEYS[6], ARGV[8], id)
    -- The answer is kept from now on; the request body no longer.
    local body = tonumber(redis.call('HGET', KEYS[1], 'body_bytes') or '0')
    redis.call('INCRBY', KEYS[7], tonumber(ARGV[9]) - body)
    redis.call('HSET', KEYS[1], 'bytes', ARGV[9], 'body_bytes', 0)
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[10])
end
return 1
"#;

/// KEYS: queue, running, holders. ARGV: replica, lease ms, job key prefix
/// (not a key: jobs share the hash tag). Takes the first queued job for a
/// lease; its id and the holder's fenced name.
const CLAIM: &str = r#"
local first = redis.call('ZPOPMIN', KEYS[1])
if #first == 0 then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = first[1]
local holder = ARGV[1] .. '#' .. redis.call('HINCRBY', ARGV[3] .. id, 'fence', 1)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), id)
redis.call('HSET', KEYS[3], id, holder)
return {id, holder}
"#;

/// KEYS: running, holders. ARGV: replica, lease ms, then (id, holder) pairs.
/// Renews the leases still held so; returns the ids no longer held
/// (cancelled, or taken over).
const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lost = {}
for i = 3, #ARGV, 2 do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[i])
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"#;

/// KEYS: running, holders. ARGV: replica, lease ms, job key prefix. Takes
/// over jobs whose lease has lapsed (id, holder pairs); a job sent upstream
/// waits until its call could have ended, and one no longer kept is let go.
const ORPHANS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 32)
local taken = {}
for _, id in ipairs(ids) do
  local job = ARGV[3] .. id
  local untl = tonumber(redis.call('HGET', job, 'sent_until') or '0')
  if redis.call('EXISTS', job) == 0 then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
  elseif untl > now then
    redis.call('ZADD', KEYS[1], untl, id)
  else
    local holder = ARGV[1] .. '#' .. redis.call('HINCRBY', job, 'fence', 1)
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
    redis.call('HSET', KEYS[2], id, holder)
    table.insert(taken, id)
    table.insert(taken, holder)
  end
end
return taken
"#;

/// KEYS: job, running, holders. ARGV: id, holder, ms the call may run. Marks
/// a job's call as about to go upstream, if its holder still holds a live
/// lease on it: 1, else 0 (it must not go).
const MARK_SENT: &str = r#"
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or '0')
if score <= now then return 0 end
redis.call('HSET', KEYS[1], 'sent', '1', 'sent_until', now + tonumber(ARGV[3]))
return 1
"#;

/// KEYS: ended, bytes, job key prefix (not a key: jobs share the hash tag).
/// Drops answers past `ttl`, then the oldest while over `max_bytes`; returns
/// the ids whose answers to delete.
const SWEEP: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = {}
local function drop(id)
  local job = ARGV[3] .. id
  local b = tonumber(redis.call('HGET', job, 'bytes') or '0')
  redis.call('DECRBY', KEYS[2], b)
  if redis.call('EXISTS', job) == 1 then
    redis.call('HSET', job, 'evicted', '1')
  end
  redis.call('ZREM', KEYS[1], id)
  table.insert(gone, id)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, 1000)) do
  drop(id)
end
while #gone < 2000 and tonumber(redis.call('GET', KEYS[2]) or '0') > tonumber(ARGV[2]) do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #oldest == 0 then
    redis.call('SET', KEYS[2], 0)
    break
  end
  drop(oldest[1])
end
if tonumber(redis.call('GET', KEYS[2]) or '0') < 0 then redis.call('SET', KEYS[2], 0) end
return gone
"#;

/// Submit, change, claim, renew, orphans, sweep, mark sent: hashed once.
static SCRIPTS: std::sync::LazyLock<[redis::Script; 7]> = std::sync::LazyLock::new(|| {
    [SUBMIT, CHANGE, CLAIM, RENEW, ORPHANS, SWEEP, MARK_SENT].map(redis::Script::new)
});

/// A job's `rec`, `state`, `sent` and `evicted` fields.
type JobFields = (
    Option<Vec<u8>>,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn stored((record, state, sent, evicted): JobFields) -> Option<StoredJob> {
    Some(StoredJob {
        record: record?,
        state: state?,
        sent: sent.is_some(),
        evicted: evicted.is_some(),
    })
}

/// The version a job's body and answer are stored under: the same for every
/// write of one job's, so a write tried again leaves no pieces behind.
fn version_of(id: &str) -> u64 {
    let h = blake3::hash(id.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

fn millis(d: Duration) -> u64 {
    d.as_millis().clamp(1, u64::MAX as u128) as u64
}

impl Redis {
    fn jobs_key(&self, what: &str) -> String {
        format!("{}jobs:{{jobs}}:{what}", self.base)
    }

    fn job_key(&self, id: &str) -> String {
        self.jobs_key(&format!("job:{id}"))
    }

    /// Deletes a stored body or answer's head; its pieces expire with it.
    async fn drop_answer(&self, kind: Kind, id: &str) {
        if let Ok(mut conn) = self.bulk_conn() {
            let del = conn.del::<_, ()>(self.answer_key(kind, id));
            let _ = self.timed_bulk(del, 0).await;
        }
    }

    /// The next number in the shared submit order.
    async fn job_seq(&self) -> Result<u64, Unavailable> {
        let mut conn = self.conn()?;
        self.timed(conn.incr(self.jobs_key("seq"), 1u64)).await
    }

    /// Stores a new job and its request body and queues it, unless the
    /// tenant or everyone has too many jobs waiting.
    #[allow(clippy::too_many_arguments)]
    async fn job_submit(
        &self,
        id: &str,
        tenant: &str,
        seq: u64,
        record: &[u8],
        body: Bytes,
        max_total: usize,
        max_per_tenant: usize,
        max_bytes: u64,
        keep: Duration,
    ) -> Result<Submitted, Unavailable> {
        let body_len = body.len() as u64;
        let answer = Answer {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body,
        };
        // Most refusals are seen before the body is stored (the script below
        // is what holds the caps).
        let mut conn = self.conn()?;
        let (total, mine): (Option<u64>, Option<u64>) = self
            .timed(
                redis::cmd("HMGET")
                    .arg(self.jobs_key("counts"))
                    .arg("*")
                    .arg(tenant)
                    .query_async(&mut conn),
            )
            .await?;
        if total.unwrap_or(0) >= max_total as u64 {
            return Ok(Submitted::Full("in all"));
        }
        if mine.unwrap_or(0) >= max_per_tenant as u64 {
            return Ok(Submitted::Full("for this client"));
        }
        self.put_version(Kind::JobBody, id, &answer, keep, version_of(id))
            .await?;
        let mut inv = SCRIPTS[0].prepare_invoke();
        inv.key(self.jobs_key("counts"))
            .key(self.jobs_key("queue"))
            .key(self.job_key(id))
            .key(self.jobs_key(&format!("tenant:{tenant}")))
            .key(self.jobs_key("bytes"))
            .arg(tenant)
            .arg(max_total)
            .arg(max_per_tenant)
            .arg(id)
            .arg(seq)
            .arg(record)
            .arg(body_len)
            .arg(max_bytes)
            .arg(millis(keep));
        // A submit that timed out may have been applied: its body stays (it
        // expires with `keep`) and the caller looks for the job before it
        // answers.
        let submitted = match self.timed(inv.invoke_async::<i64>(&mut conn)).await? {
            0 => Submitted::Accepted,
            1 => Submitted::Full("in all"),
            2 => Submitted::Full("for this client"),
            3 => Submitted::Full("by size (jobs.max_bytes)"),
            _ => return Ok(Submitted::Exists),
        };
        if submitted != Submitted::Accepted {
            // Refused: its body is not kept.
            self.drop_answer(Kind::JobBody, id).await;
        }
        Ok(submitted)
    }

    /// A job's record, if it is still kept.
    async fn job_load(&self, id: &str) -> Result<Option<StoredJob>, Unavailable> {
        let mut conn = self.conn()?;
        let fields: JobFields = self
            .timed(self.job_fields(id).query_async(&mut conn))
            .await?;
        Ok(stored(fields))
    }

    /// The command reading what [`StoredJob`] holds of a job.
    fn job_fields(&self, id: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.job_key(id))
            .arg(&["rec", "state", "sent", "evicted"]);
        cmd
    }

    /// A job's request body (`answer` false) or answer body.
    async fn job_bytes(&self, id: &str, answer: bool) -> Result<Option<Bytes>, Unavailable> {
        let kind = if answer {
            Kind::JobResult
        } else {
            Kind::JobBody
        };
        Ok(self.get(kind, id).await?.map(|a| a.body))
    }

    /// Moves a job to another state if it is in one `change.expect` names;
    /// an ended job's answer is stored first, kept for `ttl`.
    async fn job_change(
        &self,
        change: &Change<'_>,
        answer: Option<Bytes>,
        ttl: Duration,
    ) -> Result<bool, Unavailable> {
        if let Some(body) = answer {
            let answer = Answer {
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                body,
            };
            // Tried again (Redis away a moment) into the same pieces.
            self.put_version(
                Kind::JobResult,
                change.id,
                &answer,
                ttl,
                version_of(change.id),
            )
            .await?;
        }
        let mut conn = self.conn()?;
        let mut inv = SCRIPTS[1].prepare_invoke();
        inv.key(self.job_key(change.id))
            .key(self.jobs_key("queue"))
            .key(self.jobs_key("running"))
            .key(self.jobs_key("holders"))
            .key(self.jobs_key("counts"))
            .key(self.jobs_key("ended"))
            .key(self.jobs_key("bytes"))
            .arg(change.expect.join(" "))
            .arg(change.state)
            .arg(change.record)
            .arg(change.id)
            .arg(change.tenant)
            .arg(change.seq)
            .arg(if change.done { "1" } else { "0" })
            .arg(change.finished_ms)
            .arg(change.result_bytes)
            .arg(millis(change.keep))
            .arg(change.holder.unwrap_or(""));
        let changed = self.timed(inv.invoke_async::<i64>(&mut conn)).await? == 1;
        if changed && change.done {
            // The request body is not needed any more.
            self.drop_answer(Kind::JobBody, change.id).await;
        }
        Ok(changed)
    }

    /// Takes the first queued job, leased to this replica.
    async fn job_claim(&self) -> Result<Option<Claimed>, Unavailable> {
        let mut conn = self.conn()?;
        let mut inv = SCRIPTS[2].prepare_invoke();
        inv.key(self.jobs_key("queue"))
            .key(self.jobs_key("running"))
            .key(self.jobs_key("holders"))
            .arg(&self.replica)
            .arg(millis(self.lease))
            .arg(self.job_key(""));
        let got: Option<Vec<String>> = self.timed(inv.invoke_async(&mut conn)).await?;
        Ok(got.and_then(|flat| claims(flat).pop()))
    }

    /// Renews the leases on `held`; returns the ids this replica no longer
    /// holds.
    async fn job_renew(&self, held: &[Claimed]) -> Result<Vec<String>, Unavailable> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn()?;
        let mut inv = SCRIPTS[3].prepare_invoke();
        inv.key(self.jobs_key("running"))
            .key(self.jobs_key("holders"))
            .arg(&self.replica)
            .arg(millis(self.lease));
        for c in held {
            inv.arg(&c.id).arg(&c.holder);
        }
        self.timed(inv.invoke_async(&mut conn)).await
    }

    /// Takes over running jobs whose lease lapsed: their replica is gone.
    async fn job_orphans(&self) -> Result<Vec<Claimed>, Unavailable> {
        let mut conn = self.conn()?;
        let mut inv = SCRIPTS[4].prepare_invoke();
        inv.key(self.jobs_key("running"))
            .key(self.jobs_key("holders"))
            .arg(&self.replica)
            .arg(millis(self.lease))
            .arg(self.job_key(""));
        let flat: Vec<String> = self.timed(inv.invoke_async(&mut conn)).await?;
        Ok(claims(flat))
    }

    /// Marks a held job's call as about to go upstream, where it may run for
    /// `runs` at most; false when this replica no longer holds a live lease
    /// on it (the call must not go).
    async fn job_mark_sent(&self, held: &Claimed, runs: Duration) -> Result<bool, Unavailable> {
        let mut conn = self.conn()?;
        let mut inv = SCRIPTS[6].prepare_invoke();
        inv.key(self.job_key(&held.id))
            .key(self.jobs_key("running"))
            .key(self.jobs_key("holders"))
            .arg(&held.id)
            .arg(&held.holder)
            .arg(millis(runs));
        Ok(self.timed(inv.invoke_async::<i64>(&mut conn)).await? == 1)
    }

    /// Where a queued job stands in the shared queue (0 is next).
    async fn job_position(&self, id: &str) -> Result<Option<u64>, Unavailable> {
        let mut conn = self.conn()?;
        self.timed(conn.zrank(self.jobs_key("queue"), id)).await
    }

    /// A tenant's latest jobs, newest first, at most `max`.
    async fn job_list(&self, tenant: &str, max: usize) -> Result<Vec<StoredJob>, Unavailable> {
        let mut conn = self.conn()?;
        let key = self.jobs_key(&format!("tenant:{tenant}"));
        let stop = max.saturating_sub(1) as isize;
        let ids: Vec<String> = self.timed(conn.zrevrange(&key, 0, stop)).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // One round trip for them all.
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.add_command(self.job_fields(id));
        }
        let found: Vec<JobFields> = self.timed(pipe.query_async(&mut conn)).await?;
        let mut out = Vec::with_capacity(ids.len());
        let mut gone = Vec::new();
        for (id, fields) in ids.into_iter().zip(found) {
            match stored(fields) {
                Some(job) => out.push(job),
                None => gone.push(id),
            }
        }
        if !gone.is_empty() {
            let _ = self.timed(conn.zrem::<_, _, ()>(&key, gone)).await;
        }
        Ok(out)
    }

    /// Drops answers past `ttl`, then the oldest while more than
    /// `max_bytes` are kept.
    async fn job_sweep(&self, ttl: Duration, max_bytes: u64) -> Result<usize, Unavailable> {
        let mut conn = self.conn()?;
        let mut inv = SCRIPTS[5].prepare_invoke();
        inv.key(self.jobs_key("ended"))
            .key(self.jobs_key("bytes"))
            .arg(millis(ttl))
            .arg(max_bytes)
            .arg(self.job_key(""));
        let gone: Vec<String> = self.timed(inv.invoke_async(&mut conn)).await?;
        for id in &gone {
            self.drop_answer(Kind::JobResult, id).await;
        }
        Ok(gone.len())
    }

    /// Jobs queued and running across replicas, and the bytes of answers kept.
    async fn job_counts(&self) -> Result<JobCounts, Unavailable> {
        let mut conn = self.conn()?;
        let (queued, running, bytes): (u64, u64, Option<i64>) = self
            .timed(
                redis::pipe()
                    .zcard(self.jobs_key("queue"))
                    .zcard(self.jobs_key("running"))
                    .get(self.jobs_key("bytes"))
                    .query_async(&mut conn),
            )
            .await?;
        Ok(JobCounts {
            queued,
            running,
            bytes: bytes.unwrap_or(0).max(0) as u64,
        })
    }
}

fn unavailable(_: Unavailable) -> ProxyError {
    JobError::Unavailable.into()
}

/// A Redis lease on a job, as this replica holds it.
struct Holding {
    holder: String,
    renewed: tokio::time::Instant,
}

/// Every replica's jobs, in Redis.
pub(in crate::jobs) struct RedisStore {
    redis: Arc<Redis>,
    config: JobsConfig,
    /// Jobs this replica holds a lease on (running, or waiting to go back
    /// to the queue): the fenced name it holds each by, and when that lease
    /// was last renewed.
    held: Mutex<HashMap<String, Holding>>,
    /// The shared counts, as last read.
    counts: Mutex<JobCounts>,
}

impl RedisStore {
    pub(super) fn new(redis: Arc<Redis>, config: &JobsConfig) -> RedisStore {
        RedisStore {
            redis,
            config: config.clone(),
            held: Mutex::new(HashMap::new()),
            counts: Mutex::new(JobCounts::default()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Holding>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn counts(&self) -> JobCounts {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a lease this replica now holds.
    fn hold(&self, claimed: &Claimed) {
        self.held().insert(
            claimed.id.clone(),
            Holding {
                holder: claimed.holder.clone(),
                renewed: tokio::time::Instant::now(),
            },
        );
    }

    /// A job as Redis holds it; a finished one past `jobs.ttl`, or whose
    /// answer was dropped for `jobs.max_bytes`, is expired.
    fn decode(&self, stored: StoredJob) -> Option<Job> {
        let mut job = serde_json::from_slice::<Job>(&stored.record).ok()?;
        job.state = State::from_label(&stored.state)?;
        job.sent |= stored.sent;
        let ttl = self.config.ttl.as_millis() as u64;
        let finished = job.finished_at.unwrap_or(0);
        if job.state.is_done() && (stored.evicted || finished.saturating_add(ttl) < now_ms()) {
            job.state = State::Expired;
            job.answer = None;
        }
        Some(job)
    }

    /// A submit whose answer from Redis was lost: whether Redis (once it
    /// answers again, within a few seconds) has the job.
    async fn found_after_loss(&self, id: &str) -> bool {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Ok(found) = self.redis.job_load(id).await {
                return found.and_then(|stored| self.decode(stored)).is_some();
            }
        }
        false
    }

    async fn submit_once(
        &self,
        job: &Job,
        record: &[u8],
        body: Bytes,
    ) -> Result<Submitted, Unavailable> {
        self.redis
            .job_submit(
                &job.id,
                &job.tenant,
                job.seq,
                record,
                body,
                self.config.max_total,
                self.config.max_per_tenant,
                self.config.max_bytes.as_u64(),
                self.config.ttl.saturating_mul(3),
            )
            .await
    }
}

impl Store for RedisStore {
    fn shared(&self) -> bool {
        true
    }

    fn idle(&self) -> Duration {
        Duration::from_millis(250)
    }

    fn tick(&self) -> Duration {
        (self.redis.lease / 3).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    fn status(&self, running_here: usize) -> JobsStatus {
        let counts = self.counts();
        JobsStatus {
            store: "redis",
            queued: counts.queued,
            running: counts.running,
            running_here,
            bytes: counts.bytes,
            durable: true,
        }
    }

    fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Job>, ProxyError>> {
        async move {
            Ok(self
                .redis
                .job_load(id)
                .await
                .map_err(unavailable)?
                .and_then(|s| self.decode(s)))
        }
        .boxed()
    }

    fn bytes<'a>(
        &'a self,
        id: &'a str,
        answer: bool,
    ) -> BoxFuture<'a, Result<Option<Bytes>, ProxyError>> {
        async move { self.redis.job_bytes(id, answer).await.map_err(unavailable) }.boxed()
    }

    fn submit<'a>(
        &'a self,
        job: &'a mut Job,
        body: Bytes,
    ) -> BoxFuture<'a, Result<Submitted, ProxyError>> {
        async move {
            job.seq = self.redis.job_seq().await.map_err(unavailable)?;
            let record = serde_json::to_vec(&*job).map_err(store_err)?;
            let mut submitted = match self.submit_once(job, &record, body.clone()).await {
                Ok(s) => s,
                // It may have been applied, its answer lost: look.
                Err(_) => {
                    return match self.found_after_loss(&job.id).await {
                        true => Ok(Submitted::Exists),
                        false => Err(JobError::Unavailable.into()),
                    };
                }
            };
            if submitted == Submitted::Full("by size (jobs.max_bytes)") {
                // Finished answers give way to a new job first.
                self.sweep().await;
                submitted = self
                    .submit_once(job, &record, body)
                    .await
                    .map_err(unavailable)?;
            }
            Ok(submitted)
        }
        .boxed()
    }

    fn change<'a>(
        &'a self,
        job: &'a Job,
        expect: &'a [State],
        result: Option<Bytes>,
    ) -> BoxFuture<'a, Result<bool, ProxyError>> {
        async move {
            let record = serde_json::to_vec(job).map_err(store_err)?;
            let expect: Vec<&str> = expect.iter().map(|s| s.label()).collect();
            // The holder's own changes are fenced; a cancel is anyone's.
            let holder = match job.state {
                State::Cancelled => None,
                _ => self.held().get(&job.id).map(|h| h.holder.clone()),
            };
            let change = Change {
                id: &job.id,
                tenant: &job.tenant,
                seq: job.seq,
                expect: &expect,
                state: job.state.label(),
                done: job.state.is_done(),
                record: &record,
                finished_ms: job.finished_at.unwrap_or(0),
                result_bytes: job.result_bytes,
                keep: self.config.ttl.saturating_mul(3),
                holder: holder.as_deref(),
            };
            self.redis
                .job_change(&change, result, self.config.ttl)
                .await
                .map_err(unavailable)
        }
        .boxed()
    }

    fn claim(&self) -> BoxFuture<'_, Option<String>> {
        async move {
            let claimed = self.redis.job_claim().await.ok()??;
            self.hold(&claimed);
            Some(claimed.id)
        }
        .boxed()
    }

    fn mark_sent<'a>(
        &'a self,
        id: &'a str,
        runs: Duration,
    ) -> BoxFuture<'a, Result<bool, ProxyError>> {
        async move {
            let claimed = {
                let held = self.held();
                let Some(h) = held.get(id) else {
                    return Ok(false);
                };
                // Renewed every third of a lease: one that has not been for
                // two thirds may lapse before the call is on its way.
                if h.renewed.elapsed() >= self.redis.lease * 2 / 3 {
                    return Ok(false);
                }
                Claimed {
                    id: id.to_string(),
                    holder: h.holder.clone(),
                }
            };
            Ok(matches!(
                self.redis.job_mark_sent(&claimed, runs).await,
                Ok(true)
            ))
        }
        .boxed()
    }

    fn list<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, Result<Vec<Job>, ProxyError>> {
        async move {
            Ok(self
                .redis
                .job_list(tenant, 2000)
                .await
                .map_err(unavailable)?
                .into_iter()
                .filter_map(|s| self.decode(s))
                .filter(|j| j.state != State::Expired && j.tenant == tenant)
                .collect())
        }
        .boxed()
    }

    fn position<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<usize>> {
        async move {
            self.redis
                .job_position(id)
                .await
                .ok()
                .flatten()
                .map(|p| p as usize)
        }
        .boxed()
    }

    fn sweep(&self) -> BoxFuture<'_, Vec<(State, Option<State>)>> {
        async move {
            let _ = self
                .redis
                .job_sweep(self.config.ttl, self.config.max_bytes.as_u64())
                .await;
            Vec::new()
        }
        .boxed()
    }

    fn ended(&self, _job: &Job, _cancelled: bool) {}

    fn held_bytes(&self, just_written: u64) -> u64 {
        self.counts().bytes.saturating_add(just_written)
    }

    fn holds(&self, id: &str) -> bool {
        self.held().contains_key(id)
    }

    fn release(&self, id: &str) {
        self.held().remove(id);
    }

    fn keep(&self) -> BoxFuture<'_, Kept> {
        async move {
            let mut kept = Kept::default();
            let held: Vec<Claimed> = self
                .held()
                .iter()
                .map(|(id, h)| Claimed {
                    id: id.clone(),
                    holder: h.holder.clone(),
                })
                .collect();
            let asked = tokio::time::Instant::now();
            if let Ok(lost) = self.redis.job_renew(&held).await {
                let mut mine = self.held();
                for id in &lost {
                    mine.remove(id);
                }
                for c in &held {
                    if let Some(h) = mine.get_mut(&c.id)
                        && h.holder == c.holder
                    {
                        h.renewed = asked;
                    }
                }
                kept.lost = lost;
            }
            if let Ok(orphans) = self.redis.job_orphans().await {
                for claimed in orphans {
                    self.hold(&claimed);
                    kept.orphans.push(claimed.id);
                }
            }
            if let Ok(counts) = self.redis.job_counts().await {
                kept.counts = Some((counts.queued, counts.running));
                *self.counts.lock().unwrap_or_else(|e| e.into_inner()) = counts;
            }
            kept
        }
        .boxed()
    }
}
