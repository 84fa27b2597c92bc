//! Submit now, collect later. A request with `Prefer: respond-async` (RFC 7240)
//! is answered at once with `202 Accepted` and the job's `Location`; the job
//! then goes through the rest of the stack (coalescing, cache, budget,
//! retries) with no client attached, and its answer is kept for `jobs.ttl`.
//! `GET /penstock/v1/jobs/{id}` tells its state, `…/result` gives the
//! upstream's answer as the synchronous call would have, `DELETE` cancels;
//! a job is visible only to the tenant that submitted it.
//!
//! Jobs live in redb (an embedded, crash-safe store) at `jobs.path`: a restart,
//! a crash or a deploy loses no accepted job. Queued jobs resume in their
//! order; a job that was running when the process died follows
//! `retry.after_send` (it may have reached the upstream). With
//! `state.backend = "redis"` they live in Redis instead: one queue for all
//! replicas, any replica answers for any job, and a running job is leased to
//! its replica, so another takes it over (by the same policy) when that
//! replica dies. When a job ends, a webhook can be told, signed as Standard
//! Webhooks specifies.

mod local;
mod shared;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use futures_util::future::Either;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};
use tower::Service;

use crate::config::{AfterSend, JobsConfig};
use crate::telemetry::metrics::Metrics;
use crate::vocab::body::{Body, full};
use crate::vocab::context::{Payload, Prepare};
use crate::vocab::error::{Problem, ProxyError};
use crate::vocab::headers::name;
use crate::vocab::route::Route;

/// Where the job API lives: outside `/v1/`, which belongs to the upstream.
pub const PREFIX: &str = "/penstock/v1/jobs";

/// How often finished jobs past their time are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Request headers not kept with a job: the connection's, the job's own, and
/// `accept-encoding` (answers are kept plain, to be read back as JSON).
const NOT_KEPT: [&str; 9] = [
    "prefer",
    "x-penstock-webhook",
    "content-length",
    "accept-encoding",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
];

/// Request headers that carry a credential: kept while a job may still be
/// sent, dropped when it ends.
fn is_credential(name: &str) -> bool {
    name.eq_ignore_ascii_case("authorization") || name.eq_ignore_ascii_case("api-key")
}

/// Answer headers not kept: they belonged to that one connection.
const NOT_KEPT_ANSWER: [&str; 6] = [
    "set-cookie",
    "date",
    "content-length",
    "connection",
    "transfer-encoding",
    "keep-alive",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Finished and past `jobs.ttl` (or evicted by the byte bound): only its
    /// id is remembered, to say so.
    Expired,
}

impl State {
    fn label(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
            State::Expired => "expired",
        }
    }

    fn is_done(self) -> bool {
        !matches!(self, State::Queued | State::Running)
    }

    fn from_label(label: &str) -> Option<State> {
        serde_json::from_value(serde_json::Value::String(label.to_string())).ok()
    }
}

/// A job that was running when its replica stopped: it runs again if it
/// never reached the upstream or `retry.after_send` allows; else it fails.
fn interrupted(job: &mut Job, after_send: AfterSend) {
    let again = !job.sent
        || match after_send {
            AfterSend::Never => false,
            AfterSend::Text => job.text,
            AfterSend::Always => true,
        };
    if again {
        job.state = State::Queued;
        job.started_at = None;
    } else {
        job.state = State::Failed;
        job.finished_at = Some(now_ms());
        job.error = Some("penstock_interrupted: the job was running when penstock stopped; it may have reached the upstream, so it was not sent again (retry.after_send)".into());
    }
}

/// What a webhook delivery came to.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Delivery {
    url: String,
    /// `pending`, `delivered` or `failed`.
    state: String,
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
}

/// The upstream's answer, its body aside.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
}

/// A job as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: String,
    seq: u64,
    tenant: String,
    state: State,
    created_at: u64,
    started_at: Option<u64>,
    finished_at: Option<u64>,
    method: String,
    uri: String,
    /// Values base64, as headers need not be text.
    headers: Vec<(String, String)>,
    /// A text route: the after-send policy `text` may send it again.
    text: bool,
    /// An attempt went to the upstream: after a crash, the after-send policy
    /// decides; before it, the job simply runs again.
    #[serde(default)]
    sent: bool,
    answer: Option<Answer>,
    result_bytes: u64,
    error: Option<String>,
    webhook: Option<Delivery>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

/// Refusals of the job API.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("no job {0:?} (a job is visible only to the credential or client that submitted it)")]
    NotFound(String),
    #[error("job {0:?} has expired: its answer was kept for jobs.ttl")]
    Expired(String),
    #[error("job {0:?} has not finished: its state is {1}")]
    NotFinished(String, &'static str),
    #[error("too many jobs waiting ({0}); try again later")]
    Full(&'static str, Duration),
    #[error(
        "webhook URL {0:?} is not under one of the allowed prefixes (jobs.webhook_prefixes: the same scheme, host and port, the path at or below the prefix's, no user or password)"
    )]
    WebhookNotAllowed(String),
    #[error("the job store failed: {0}")]
    Store(String),
    #[error("the shared job store (Redis) is unavailable; try again")]
    Unavailable,
    /// The replica running a job cannot show it still holds the job's lease
    /// (Redis away, or another replica took it over): its call does not go.
    #[error("job {0:?} is no longer held by this replica; its call was not sent")]
    LeaseLost(String),
}

impl Problem for JobError {
    fn status(&self) -> StatusCode {
        match self {
            JobError::NotFound(_) | JobError::Expired(_) => StatusCode::NOT_FOUND,
            JobError::NotFinished(..) => StatusCode::CONFLICT,
            JobError::Full(..) => StatusCode::TOO_MANY_REQUESTS,
            JobError::WebhookNotAllowed(_) => StatusCode::BAD_REQUEST,
            JobError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            JobError::Unavailable | JobError::LeaseLost(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            JobError::NotFound(_) => "penstock_job_not_found",
            JobError::Expired(_) => "penstock_job_expired",
            JobError::NotFinished(..) => "penstock_job_not_finished",
            JobError::Full(..) => "penstock_jobs_full",
            JobError::WebhookNotAllowed(_) => "penstock_webhook_not_allowed",
            JobError::Store(_) => "penstock_job_store",
            JobError::Unavailable => "penstock_state_unavailable",
            JobError::LeaseLost(_) => "penstock_job_lease_lost",
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            JobError::Full(_, after) => Some(*after),
            JobError::Unavailable | JobError::LeaseLost(_) => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// This replica could not show it still held the job, which was then
    /// not sent: whoever holds it now runs it.
    fn may_wait_out(&self) -> bool {
        matches!(self, JobError::LeaseLost(_))
    }
}

fn store_err(e: impl std::fmt::Display) -> ProxyError {
    JobError::Store(e.to_string()).into()
}

fn unavailable(_: crate::state::Unavailable) -> ProxyError {
    JobError::Unavailable.into()
}

/// What is kept in memory beside the store.
#[derive(Default)]
struct Mem {
    /// Queued job ids, in their order (the redb store's; Redis keeps its own).
    queued: VecDeque<String>,
    /// Running jobs' tasks, to cancel them.
    running: HashMap<String, tokio::task::AbortHandle>,
    /// Jobs waiting or running, per tenant (the redb store's).
    per_tenant: HashMap<String, usize>,
    /// Bytes of answers held (the redb store's).
    bytes: u64,
    next_seq: u64,
    /// Recent time from start to end of a job, for the expected wait.
    typical_run: Option<Duration>,
    /// Jobs cancelled while being taken up, before their task could be.
    cancelled: std::collections::HashSet<String>,
    /// Jobs this replica holds a Redis lease on (running, or waiting to go
    /// back to the queue): the fenced name it holds each by, and when that
    /// lease was last renewed.
    held: HashMap<String, Holding>,
    /// The shared counts, as last read.
    shared: shared::JobCounts,
}

impl Mem {
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

/// A Redis lease on a job, as this replica holds it.
struct Holding {
    holder: String,
    renewed: tokio::time::Instant,
}

/// Asked before a job's call goes upstream: records, first, that it may be
/// paid for (a crash after this never sends it again), and with Redis only
/// while this replica still holds a live lease on the job (fenced): a
/// replica cut off from Redis stops before its lease could lapse.
#[derive(Debug)]
struct JobGate {
    jobs: std::sync::Weak<Jobs>,
    id: String,
    /// How long its call may run once sent: the attempt timeout, within the
    /// request's deadline.
    deadline: tokio::time::Instant,
}

impl crate::vocab::context::SendGate for JobGate {
    fn before_send(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), ProxyError>> + Send>> {
        let (jobs, id, deadline) = (self.jobs.clone(), self.id.clone(), self.deadline);
        Box::pin(async move {
            let lost = || ProxyError::from(JobError::LeaseLost(id.clone()));
            let jobs = jobs.upgrade().ok_or_else(lost)?;
            match &jobs.store {
                Store::Local(l) => {
                    let id = id.clone();
                    Jobs::blocking(l, move |l| l.mark_sent(&id)).await
                }
                Store::Shared(r) => {
                    let claimed = {
                        let mem = jobs.lock();
                        let h = mem.held.get(&id).ok_or_else(lost)?;
                        // Renewed every third of a lease: one that has not
                        // been for two thirds may lapse before the call is
                        // on its way.
                        if h.renewed.elapsed() >= r.lease * 2 / 3 {
                            return Err(lost());
                        }
                        shared::Claimed {
                            id: id.clone(),
                            holder: h.holder.clone(),
                        }
                    };
                    let runs = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match r.job_mark_sent(&claimed, runs).await {
                        Ok(true) => Ok(()),
                        _ => Err(lost()),
                    }
                }
            }
        })
    }
}

/// Where jobs live.
enum Store {
    /// redb: this replica's own.
    Local(Arc<local::Local>),
    /// Redis: every replica's.
    Shared(Arc<crate::state::Redis>),
}

pub struct Jobs {
    store: Store,
    config: JobsConfig,
    /// `jobs.webhook_prefixes`, parsed: compared by scheme, host, port and
    /// path segments.
    webhook_prefixes: Vec<crate::vocab::url::UrlPrefix>,
    after_send: AfterSend,
    /// `upstream.attempt_timeout`: how long a sent call may still be running.
    attempt_timeout: Duration,
    metrics: Arc<Metrics>,
    /// The edge's parsing of a stored request, handed over by the stack.
    prepare: Prepare,
    mem: Mutex<Mem>,
    wake: Arc<Notify>,
    started: OnceLock<()>,
    secret: Option<Vec<u8>>,
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
}

/// Counts of jobs for `/status`.
#[derive(Debug, Serialize)]
pub struct JobsStatus {
    /// `redb` or `redis`.
    pub store: &'static str,
    pub queued: u64,
    pub running: u64,
    /// Running on this replica.
    pub running_here: usize,
    pub bytes: u64,
    pub durable: bool,
}

impl Jobs {
    /// Opens (or creates) the store and takes up the jobs it holds: redb at
    /// `jobs.path`, or Redis when `redis` is given.
    pub fn open(
        config: &JobsConfig,
        after_send: AfterSend,
        attempt_timeout: Duration,
        metrics: Arc<Metrics>,
        prepare: Prepare,
        redis: Option<Arc<crate::state::Redis>>,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<Arc<Jobs>, String> {
        let secret = match &config.webhook_secret_env {
            Some(name) => {
                let value = env(name).ok_or_else(|| {
                    format!("jobs.webhook_secret_env: environment variable {name} is not set")
                })?;
                let encoded = value.strip_prefix("whsec_").unwrap_or(&value);
                Some(
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .map_err(|_| {
                            format!(
                                "jobs.webhook_secret_env: {name} is not whsec_ followed by base64"
                            )
                        })?,
                )
            }
            None => None,
        };
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https);
        let mut mem = Mem::default();
        let store = match redis {
            Some(redis) => {
                if config.path.is_some() {
                    tracing::info!("jobs live in Redis (state.backend); jobs.path is not used");
                }
                Store::Shared(redis)
            }
            None => {
                let path = match config.store {
                    crate::config::JobStore::Memory => None,
                    crate::config::JobStore::Redb => config.path.as_deref(),
                };
                if let Some(dir) = path.and_then(std::path::Path::parent)
                    && !dir.as_os_str().is_empty()
                {
                    create_private_dir(dir)?;
                }
                let local = local::Local::open(path)?;
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
                mem.queued = found.queued.into();
                mem.per_tenant = found.per_tenant;
                mem.bytes = found.bytes;
                mem.next_seq = found.next_seq;
                Store::Local(Arc::new(local))
            }
        };
        let webhook_prefixes = config
            .webhook_prefixes
            .iter()
            .map(|p| crate::vocab::url::UrlPrefix::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("jobs.webhook_prefixes: {e}"))?;
        Ok(Arc::new(Jobs {
            store,
            webhook_prefixes,
            config: config.clone(),
            after_send,
            attempt_timeout,
            metrics,
            prepare,
            mem: Mutex::new(mem),
            wake: Arc::new(Notify::new()),
            started: OnceLock::new(),
            secret,
            client,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.mem.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shared(&self) -> bool {
        matches!(self.store, Store::Shared(_))
    }

    /// Runs `f` on the redb store, on a blocking thread.
    async fn blocking<T: Send + 'static>(
        local: &Arc<local::Local>,
        f: impl FnOnce(&local::Local) -> Result<T, String> + Send + 'static,
    ) -> Result<T, ProxyError> {
        let local = local.clone();
        tokio::task::spawn_blocking(move || f(&local))
            .await
            .map_err(store_err)?
            .map_err(store_err)
    }

    /// A job as Redis holds it; a finished one past `jobs.ttl`, or whose
    /// answer was dropped for `jobs.max_bytes`, is expired.
    fn decode(&self, stored: shared::StoredJob) -> Option<Job> {
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

    async fn load(&self, id: &str) -> Result<Option<Job>, ProxyError> {
        match &self.store {
            Store::Local(l) => {
                let id = id.to_string();
                Self::blocking(l, move |l| l.load(&id)).await
            }
            Store::Shared(r) => Ok(r
                .job_load(id)
                .await
                .map_err(unavailable)?
                .and_then(|s| self.decode(s))),
        }
    }

    /// A job's request body (`answer` false) or answer body.
    async fn bytes(&self, id: &str, answer: bool) -> Result<Option<Bytes>, ProxyError> {
        match &self.store {
            Store::Local(l) => {
                let id = id.to_string();
                Self::blocking(l, move |l| l.bytes(&id, answer)).await
            }
            Store::Shared(r) => r.job_bytes(id, answer).await.map_err(unavailable),
        }
    }

    /// Writes `job` (and its answer) if its stored state is one of `expect`;
    /// false when it was not (another replica or a cancel got there first).
    /// A job back in `Queued` goes to the head of the queue.
    async fn change(
        &self,
        job: &Job,
        expect: &[State],
        result: Option<Bytes>,
    ) -> Result<bool, ProxyError> {
        // An ended job needs no credentials: they are not kept past its end.
        let ended;
        let job = if job.state.is_done() && job.headers.iter().any(|(k, _)| is_credential(k)) {
            let mut j = job.clone();
            j.headers.retain(|(k, _)| !is_credential(k));
            ended = j;
            &ended
        } else {
            job
        };
        let changed = match &self.store {
            Store::Local(l) => {
                let (saved, expect) = (job.clone(), expect.to_vec());
                let changed = Self::blocking(l, move |l| {
                    l.save(&saved, &expect, result.as_deref(), false)
                })
                .await?;
                if changed && job.state == State::Queued {
                    self.lock().queued.push_front(job.id.clone());
                }
                changed
            }
            Store::Shared(r) => {
                let record = serde_json::to_vec(job).map_err(store_err)?;
                let expect: Vec<&str> = expect.iter().map(|s| s.label()).collect();
                // The holder's own changes are fenced; a cancel is anyone's.
                let holder = match job.state {
                    State::Cancelled => None,
                    _ => self.lock().held.get(&job.id).map(|h| h.holder.clone()),
                };
                let change = shared::Change {
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
                r.job_change(&change, result, self.config.ttl)
                    .await
                    .map_err(unavailable)?
            }
        };
        if changed && job.state == State::Queued {
            self.wake.notify_one();
        }
        Ok(changed)
    }

    /// [`Jobs::change`] for a job's end, tried again while Redis is away (for
    /// up to a minute): the answer was paid for.
    async fn change_surely(&self, job: &Job, expect: &[State], result: Option<Bytes>) -> bool {
        let mut pause = Duration::from_millis(100);
        for _ in 0..40 {
            match self.change(job, expect, result.clone()).await {
                Ok(changed) => return changed,
                Err(e) => {
                    tracing::warn!(job = %job.id, error = %e, "cannot store a job's change yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
        tracing::error!(job = %job.id, "gave up storing a job's change");
        false
    }

    /// The next queued job, taken for this replica.
    async fn claim(&self) -> Option<String> {
        match &self.store {
            Store::Local(_) => self.lock().queued.pop_front(),
            Store::Shared(r) => {
                let claimed = r.job_claim().await.ok()??;
                self.hold(&claimed);
                Some(claimed.id)
            }
        }
    }

    /// Records a lease this replica now holds.
    fn hold(&self, claimed: &shared::Claimed) {
        self.lock().held.insert(
            claimed.id.clone(),
            Holding {
                holder: claimed.holder.clone(),
                renewed: tokio::time::Instant::now(),
            },
        );
    }

    /// Moves a job to `to`, in the metrics (with Redis, queued and running
    /// are read from the shared counts instead).
    fn update(&self, job: &mut Job, to: State) {
        if !self.shared() {
            self.metrics
                .job_moved(Some(job.state.label()), Some(to.label()));
        } else if to.is_done() {
            self.metrics.job_moved(None, Some(to.label()));
        }
        job.state = to;
    }

    /// Accepts a request as a job: stored before the answer says so.
    async fn submit(&self, req: Request<Payload>) -> Result<Response<Body>, ProxyError> {
        let (parts, payload) = req.into_parts();
        let Some(ctx) = payload.ctx.clone() else {
            return Err(JobError::Store("the request has no context".into()).into());
        };
        let webhook = match ctx
            .headers
            .get("x-penstock-webhook")
            .and_then(|v| v.to_str().ok())
        {
            Some(url) => {
                let allowed = self.webhook_prefixes.iter().any(|p| p.allows(url));
                if !allowed || self.secret.is_none() {
                    return Err(JobError::WebhookNotAllowed(url.to_string()).into());
                }
                Some(url.to_string())
            }
            None => self.config.webhook_url.clone(),
        };
        let tenant = ctx.tenant.0.to_string();
        let after = self.lock().typical_run.unwrap_or(Duration::from_secs(30));
        // An `Idempotency-Key` names the job: a submit sent again (its
        // answer lost) finds the job the first one made.
        let key = ctx
            .headers
            .get("idempotency-key")
            .map(|v| v.as_bytes())
            .filter(|k| !k.is_empty() && k.len() <= 256);
        let keyed = key.is_some();
        let id = match key {
            Some(key) => {
                let mut h = blake3::Hasher::new();
                h.update(tenant.as_bytes());
                h.update(b"\0");
                h.update(key);
                format!("job_{}", &h.finalize().to_hex()[..24])
            }
            None => format!("job_{:016x}{:08x}", fastrand::u64(..), fastrand::u32(..)),
        };
        if keyed && let Some(existing) = self.load(&id).await? {
            return self.accepted(&existing);
        }
        let seq = match &self.store {
            Store::Local(_) => {
                let mut mem = self.lock();
                let waiting: usize = mem.per_tenant.values().sum();
                let mine = mem.per_tenant.get(&tenant).copied().unwrap_or(0);
                if waiting >= self.config.max_total {
                    return Err(JobError::Full("in all", after).into());
                }
                if mine >= self.config.max_per_tenant {
                    return Err(JobError::Full("for this client", after).into());
                }
                *mem.per_tenant.entry(tenant.clone()).or_default() += 1;
                mem.next_seq += 1;
                mem.next_seq
            }
            Store::Shared(r) => r.job_seq().await.map_err(unavailable)?,
        };
        let b64 = base64::engine::general_purpose::STANDARD;
        let headers = ctx
            .headers
            .iter()
            .filter(|(k, _)| !NOT_KEPT.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str().to_string(), b64.encode(v.as_bytes())))
            .collect();
        let job = Job {
            id: id.clone(),
            seq,
            tenant: tenant.clone(),
            state: State::Queued,
            created_at: now_ms(),
            started_at: None,
            finished_at: None,
            method: parts.method.to_string(),
            uri: parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            headers,
            text: !ctx.route.is_image(),
            sent: false,
            answer: None,
            result_bytes: 0,
            error: None,
            webhook: webhook.map(|url| Delivery {
                url,
                state: "pending".into(),
                attempts: 0,
                last_error: None,
            }),
        };
        match &self.store {
            Store::Local(l) => {
                let (stored, body) = (job.clone(), payload.bytes.clone());
                if let Err(e) = Self::blocking(l, move |l| l.insert(&stored, body)).await {
                    self.lock().leave(&tenant);
                    return Err(e);
                }
                self.metrics.job_moved(None, Some("queued"));
                self.lock().queued.push_back(id.clone());
            }
            Store::Shared(r) => {
                let record = serde_json::to_vec(&job).map_err(store_err)?;
                let submit = || {
                    r.job_submit(
                        &id,
                        &tenant,
                        seq,
                        &record,
                        payload.bytes.clone(),
                        self.config.max_total,
                        self.config.max_per_tenant,
                        self.config.max_bytes.as_u64(),
                        self.config.ttl.saturating_mul(3),
                    )
                };
                let mut submitted = match submit().await {
                    Ok(s) => s,
                    // It may have been applied, its answer lost: look.
                    Err(_) => match self.find_after_loss(&id).await {
                        Some(found) => return self.accepted(&found),
                        None => return Err(JobError::Unavailable.into()),
                    },
                };
                if submitted == shared::Submitted::Full("by size (jobs.max_bytes)") {
                    // Finished answers give way to a new job first.
                    self.sweep().await;
                    submitted = submit().await.map_err(unavailable)?;
                }
                match submitted {
                    shared::Submitted::Full(whose) => {
                        return Err(JobError::Full(whose, after).into());
                    }
                    shared::Submitted::Exists => {
                        if let Some(found) = self.load(&id).await? {
                            return self.accepted(&found);
                        }
                    }
                    shared::Submitted::Accepted => {}
                }
            }
        }
        self.wake.notify_one();
        self.accepted(&job)
    }

    /// A submit whose answer from Redis was lost: the job, if Redis (once it
    /// answers again, within a few seconds) has it.
    async fn find_after_loss(&self, id: &str) -> Option<Job> {
        let Store::Shared(r) = &self.store else {
            return None;
        };
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Ok(found) = r.job_load(id).await {
                return found.and_then(|stored| self.decode(stored));
            }
        }
        None
    }

    /// The 202 for a job accepted (now, or by an earlier submit with the
    /// same idempotency key).
    fn accepted(&self, job: &Job) -> Result<Response<Body>, ProxyError> {
        let mut resp = json_response(
            StatusCode::ACCEPTED,
            &serde_json::json!({
                "id": job.id,
                "object": "penstock.job",
                "status": job.state.label(),
                "created_at": job.created_at / 1000,
            }),
        );
        if let Ok(v) = HeaderValue::try_from(format!("{PREFIX}/{}", job.id)) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        resp.headers_mut().insert(
            "preference-applied",
            HeaderValue::from_static("respond-async"),
        );
        Ok(resp)
    }

    /// The job API: `GET {PREFIX}`, `GET|DELETE {PREFIX}/{id}`, `GET {PREFIX}/{id}/result`.
    async fn api(&self, req: &Request<Payload>) -> Result<Response<Body>, ProxyError> {
        let Some(ctx) = req.body().ctx.as_ref() else {
            return Err(JobError::NotFound(String::new()).into());
        };
        let tenant = &*ctx.tenant.0;
        let rest = req.uri().path().strip_prefix(PREFIX).unwrap_or("");
        let rest = rest.trim_start_matches('/');
        if rest.is_empty() && req.method() == Method::GET {
            return self.list(tenant, req.uri().query()).await;
        }
        let (id, result) = match rest.strip_suffix("/result") {
            Some(id) => (id, true),
            None => (rest, false),
        };
        let job = match self.load(id).await? {
            Some(job) if job.tenant == tenant => job,
            _ => return Err(JobError::NotFound(id.to_string()).into()),
        };
        if job.state == State::Expired {
            return Err(JobError::Expired(id.to_string()).into());
        }
        match (req.method().clone(), result) {
            (Method::GET, false) => {
                Ok(json_response(StatusCode::OK, &self.view(&job, true).await?))
            }
            (Method::GET, true) => self.result(&job).await,
            (Method::DELETE, false) => self.cancel(job).await,
            _ => Err(JobError::NotFound(rest.to_string()).into()),
        }
    }

    /// The tenant's jobs, newest first, a page at a time (`limit`, at most
    /// 100, and `after`, the last id of the page before), without answers:
    /// each names its `result_url`.
    async fn list(&self, tenant: &str, query: Option<&str>) -> Result<Response<Body>, ProxyError> {
        let (mut limit, mut after) = (20usize, None::<String>);
        for pair in query.unwrap_or("").split('&') {
            match pair.split_once('=') {
                Some(("limit", n)) => limit = n.parse().unwrap_or(20).clamp(1, 100),
                Some(("after", id)) if !id.is_empty() => after = Some(id.to_string()),
                _ => {}
            }
        }
        let mut jobs: Vec<Job> = match &self.store {
            Store::Local(l) => {
                let tenant = tenant.to_string();
                Self::blocking(l, move |l| {
                    l.scan(|j| j.tenant == tenant && j.state != State::Expired)
                })
                .await?
            }
            Store::Shared(r) => r
                .job_list(tenant, 2000)
                .await
                .map_err(unavailable)?
                .into_iter()
                .filter_map(|s| self.decode(s))
                .filter(|j| j.state != State::Expired && j.tenant == tenant)
                .collect(),
        };
        jobs.sort_by_key(|j| std::cmp::Reverse(j.seq));
        let start = match &after {
            Some(id) => jobs
                .iter()
                .position(|j| j.id == *id)
                .map_or(jobs.len(), |i| i + 1),
            None => 0,
        };
        let page: Vec<&Job> = jobs.iter().skip(start).take(limit + 1).collect();
        let has_more = page.len() > limit;
        let mut data = Vec::with_capacity(limit);
        for job in page.iter().take(limit) {
            data.push(self.view(job, false).await?);
        }
        let first = data.first().map(|v| v["id"].clone());
        let last = data.last().map(|v| v["id"].clone());
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({
                "object": "list",
                "data": data,
                "first_id": first,
                "last_id": last,
                "has_more": has_more,
            }),
        ))
    }

    /// A job as its client sees it; with its answer's body, or (in a list)
    /// only where to get it.
    async fn view(&self, job: &Job, with_body: bool) -> Result<serde_json::Value, ProxyError> {
        let mut v = serde_json::json!({
            "id": job.id,
            "object": "penstock.job",
            "status": job.state.label(),
            "created_at": job.created_at / 1000,
            "method": job.method,
            "path": job.uri,
        });
        if let Some(t) = job.started_at {
            v["started_at"] = (t / 1000).into();
        }
        if let Some(t) = job.finished_at {
            v["finished_at"] = (t / 1000).into();
        }
        if job.state == State::Queued {
            let pos = match &self.store {
                Store::Local(_) => self.lock().queued.iter().position(|q| *q == job.id),
                Store::Shared(r) => r
                    .job_position(&job.id)
                    .await
                    .ok()
                    .flatten()
                    .map(|p| p as usize),
            };
            if let Some(pos) = pos {
                v["position"] = pos.into();
                let run = self.lock().typical_run.unwrap_or(Duration::from_secs(30));
                let rounds = (pos / self.config.max_running.max(1) + 1) as u32;
                v["expected_wait_ms"] = (run.saturating_mul(rounds).as_millis() as u64).into();
            }
        }
        if let Some(answer) = &job.answer {
            v["response"] = serde_json::json!({
                "status": answer.status,
                "headers": answer.headers.iter().cloned().collect::<HashMap<_, _>>(),
            });
            if with_body {
                let body = self.bytes(&job.id, true).await?.unwrap_or_default();
                v["response"]["body"] = match serde_json::from_slice::<serde_json::Value>(&body) {
                    Ok(json) => json,
                    Err(_) => String::from_utf8_lossy(&body).into_owned().into(),
                };
            }
            v["result_url"] = format!("{PREFIX}/{}/result", job.id).into();
        }
        if let Some(e) = &job.error {
            v["error"] = e.clone().into();
        }
        if let Some(w) = &job.webhook {
            v["webhook"] = serde_json::to_value(w).unwrap_or_default();
        }
        Ok(v)
    }

    /// The upstream's answer itself, as the synchronous call would have had it.
    async fn result(&self, job: &Job) -> Result<Response<Body>, ProxyError> {
        let Some(answer) = &job.answer else {
            return Err(JobError::NotFinished(job.id.clone(), job.state.label()).into());
        };
        let Some(body) = self.bytes(&job.id, true).await? else {
            return Err(JobError::Expired(job.id.clone()).into());
        };
        let mut resp = Response::new(full(body));
        *resp.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
        for (k, v) in &answer.headers {
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::try_from(v)) {
                resp.headers_mut().append(k, v);
            }
        }
        Ok(resp)
    }

    /// Cancels a job: a queued one never reaches the upstream and is charged
    /// nothing; a running one is stopped (if it was sent, it was paid). With
    /// Redis, a job running on another replica stops when that replica next
    /// renews its lease.
    async fn cancel(&self, mut job: Job) -> Result<Response<Body>, ProxyError> {
        if !job.state.is_done() {
            let before = job.state;
            job.state = State::Cancelled;
            job.finished_at = Some(now_ms());
            if !self
                .change(&job, &[State::Queued, State::Running], None)
                .await?
            {
                // It ended meanwhile: say how.
                let now = self.load(&job.id).await?;
                let Some(now) = now else {
                    return Err(JobError::NotFound(job.id).into());
                };
                return Ok(json_response(StatusCode::OK, &self.view(&now, true).await?));
            }
            job.state = before;
            self.update(&mut job, State::Cancelled);
            {
                let mut mem = self.lock();
                mem.queued.retain(|q| *q != job.id);
                match mem.running.remove(&job.id) {
                    Some(task) => task.abort(),
                    // Being taken up here, its task not yet made: noted for
                    // the runner. (Running on another replica, it is that
                    // one's to stop, at its next renewal: nothing is noted.)
                    None if before == State::Running
                        && (!self.shared() || mem.held.contains_key(&job.id)) =>
                    {
                        mem.cancelled.insert(job.id.clone());
                    }
                    None => {}
                }
                if !self.shared() {
                    mem.leave(&job.tenant);
                }
            }
            self.metrics
                .job_done(job.finished_at.unwrap_or(0).saturating_sub(job.created_at) as f64 / 1e3);
        }
        Ok(json_response(StatusCode::OK, &self.view(&job, true).await?))
    }

    /// Runs queued jobs through `inner`, at most `jobs.max_running` at once.
    fn start<S: crate::vocab::service::Inner>(self: &Arc<Self>, inner: S) {
        if self.started.set(()).is_err() {
            return;
        }
        let weak = Arc::downgrade(self);
        let wake = self.wake.clone();
        let slots = Arc::new(Semaphore::new(self.config.max_running));
        // Redis is asked now and then for jobs other replicas queued.
        let idle = match self.store {
            Store::Local(_) => Duration::from_secs(5),
            Store::Shared(_) => Duration::from_millis(250),
        };
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let job = loop {
                    let Some(jobs) = weak.upgrade() else { return };
                    let woken = wake.notified();
                    tokio::pin!(woken);
                    woken.as_mut().enable();
                    match jobs.claim().await {
                        Some(id) => break (jobs, id),
                        None => {
                            drop(jobs);
                            let _ = tokio::time::timeout(idle, woken).await;
                        }
                    }
                };
                let (jobs, id) = job;
                let inner = inner.clone();
                let runner = jobs.clone();
                // Detached: the job's own task; its slot goes with it.
                drop(tokio::spawn(async move {
                    runner.run(&id, inner).await;
                    drop(slot);
                }));
            }
        });
        let weak = Arc::downgrade(self);
        let tick = match &self.store {
            Store::Local(_) => SWEEP_EVERY,
            Store::Shared(r) => {
                (r.lease / 3).clamp(Duration::from_millis(100), Duration::from_secs(1))
            }
        };
        tokio::spawn(async move {
            let mut last_sweep: Option<tokio::time::Instant> = None;
            loop {
                let Some(jobs) = weak.upgrade() else { return };
                if last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY) {
                    jobs.sweep().await;
                    last_sweep = Some(tokio::time::Instant::now());
                }
                if jobs.shared() {
                    jobs.keep_leases().await;
                }
                drop(jobs);
                tokio::time::sleep(tick).await;
            }
        });
    }

    /// With Redis: renews this replica's leases (stopping the jobs it no
    /// longer holds: cancelled, or taken over while Redis was away), takes
    /// over jobs whose replica died, and reads the shared counts.
    async fn keep_leases(self: &Arc<Self>) {
        let Store::Shared(r) = &self.store else {
            return;
        };
        let held: Vec<shared::Claimed> = self
            .lock()
            .held
            .iter()
            .map(|(id, h)| shared::Claimed {
                id: id.clone(),
                holder: h.holder.clone(),
            })
            .collect();
        let asked = tokio::time::Instant::now();
        if let Ok(lost) = r.job_renew(&held).await {
            let mut mem = self.lock();
            for id in &lost {
                mem.held.remove(id);
                if let Some(task) = mem.running.remove(id) {
                    tracing::info!(job = %id, "job stopped: cancelled, or no longer this replica's");
                    task.abort();
                }
            }
            for c in &held {
                if let Some(h) = mem.held.get_mut(&c.id)
                    && h.holder == c.holder
                {
                    h.renewed = asked;
                }
            }
        }
        if let Ok(orphans) = r.job_orphans().await {
            for claimed in orphans {
                self.hold(&claimed);
                self.take_over(&claimed.id).await;
            }
        }
        if let Ok(counts) = r.job_counts().await {
            self.metrics.jobs_shared(counts.queued, counts.running);
            self.lock().shared = counts;
        }
    }

    /// A job whose replica died: back to the queue, or failed as the
    /// after-send policy says if it may have reached the upstream.
    async fn take_over(self: &Arc<Self>, id: &str) {
        let Ok(Some(mut job)) = self.load(id).await else {
            self.lock().held.remove(id);
            return;
        };
        let was = job.state;
        if was == State::Running {
            interrupted(&mut job, self.after_send);
        }
        tracing::info!(job = %id, now = job.state.label(), "job taken over from a replica that stopped");
        let changed = self.change(&job, &[was], None).await.unwrap_or(false);
        self.lock().held.remove(id);
        if changed && job.state.is_done() {
            self.metrics.job_moved(None, Some(job.state.label()));
            if job.webhook.is_some() {
                let me = self.clone();
                tokio::spawn(async move { me.deliver(job).await });
            }
        }
    }

    /// One job, from the store to its answer.
    async fn run<S: crate::vocab::service::Inner>(self: &Arc<Self>, id: &str, inner: S) {
        if !self.run_once(id, inner).await {
            self.lock().held.remove(id);
        }
    }

    /// [`Jobs::run`]; true when the job is still held, to go back to the queue.
    async fn run_once<S: crate::vocab::service::Inner>(
        self: &Arc<Self>,
        id: &str,
        mut inner: S,
    ) -> bool {
        let Ok(Some(mut job)) = self.load(id).await else {
            return false;
        };
        if job.state != State::Queued {
            return false;
        }
        self.update(&mut job, State::Running);
        job.started_at = Some(now_ms());
        if !self
            .change(&job, &[State::Queued], None)
            .await
            .unwrap_or(false)
        {
            return false;
        }
        let body = match self.bytes(id, false).await {
            Ok(Some(body)) => body,
            // Never run without its body: failed, saying so.
            Ok(None) => {
                let mut ended = job.clone();
                ended.state = State::Failed;
                ended.error = Some("penstock_job_body_missing: the job's request body was not found in the store; submit it again".into());
                ended.finished_at = Some(now_ms());
                if self.change_surely(&ended, &[State::Running], None).await {
                    self.metrics.job_moved(None, Some(State::Failed.label()));
                }
                return false;
            }
            // Left running: it goes back to the queue after its lease (or
            // the next start).
            Err(_) => return false,
        };
        let me = self.clone();
        let job_id = id.to_string();
        // In a task of its own, so that a cancel can abort it.
        let call = tokio::spawn(async move {
            let b64 = base64::engine::general_purpose::STANDARD;
            let mut builder = Request::builder().method(job.method.as_str()).uri(&job.uri);
            for (k, v) in &job.headers {
                if let Ok(v) = b64.decode(v) {
                    builder = builder.header(k.as_str(), v);
                }
            }
            let mut ctx = None;
            let resp = match builder.body(Full::new(body)) {
                Ok(req) => {
                    match (me.prepare)(req).await {
                        Ok(mut req) => {
                            ctx = req.body().ctx.clone();
                            // A sent attempt runs no longer than this (the
                            // gate asks again before each).
                            let attempt = tokio::time::Instant::now() + me.attempt_timeout;
                            let deadline = req
                                .body()
                                .ctx
                                .as_ref()
                                .map_or(attempt, |c| c.deadline.min(attempt));
                            req.body_mut().gate = Some(Arc::new(JobGate {
                                jobs: Arc::downgrade(&me),
                                id: job_id.clone(),
                                deadline,
                            }));
                            crate::vocab::service::call_now(&mut inner, req).await
                        }
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(JobError::Store(e.to_string()).into()),
            };
            // This runner is the job's edge: its answer, or its error
            // rendered, becomes the result, with what penstock did for it.
            let wait_out = resp.as_ref().err().and_then(ProxyError::wait_out);
            let mut resp = resp.unwrap_or_else(crate::vocab::render::into_response);
            if let Some(ctx) = ctx {
                let _ = crate::vocab::render::tally_headers(resp.headers_mut(), &ctx.tally.get());
            }
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes());
            (parts, body, job, wait_out)
        });
        {
            let mut mem = self.lock();
            mem.running.insert(id.to_string(), call.abort_handle());
            if mem.cancelled.remove(id) {
                // Cancelled between being taken up and now.
                call.abort();
            }
        }
        let outcome = call.await;
        let still_ours = self.lock().running.remove(id).is_some();
        let Ok((parts, body, mut job, wait_out)) = outcome else {
            // Cancelled: the cancel recorded it.
            return false;
        };
        if !still_ours {
            return false;
        }
        // penstock's own refusal to wait that long for budget: a job has no
        // client waiting, so it goes back to the head of the queue and tries
        // again when the budget could take it. Meanwhile it stays running
        // (and, with Redis, leased), so a crash now still finds it.
        if body.is_ok()
            && let Some(after) = waited_too_long(wait_out)
        {
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                job.started_at = None;
                me.update(&mut job, State::Queued);
                let _ = me.change(&job, &[State::Running], None).await;
                me.lock().held.remove(&job.id);
            });
            return true;
        }
        let (state, body, error) = match body {
            Ok(body) if parts.status.is_success() => (State::Succeeded, body, None),
            Ok(body) => (State::Failed, body, None),
            Err(e) => (
                State::Failed,
                Bytes::new(),
                Some(format!("the answer broke off: {e}")),
            ),
        };
        job.answer = Some(Answer {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .filter(|(k, _)| !NOT_KEPT_ANSWER.contains(&k.as_str()))
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect(),
        });
        job.result_bytes = body.len() as u64;
        job.error = error;
        job.finished_at = Some(now_ms());
        let ran = Duration::from_millis(
            job.finished_at
                .unwrap_or(0)
                .saturating_sub(job.started_at.unwrap_or(0)),
        );
        {
            let mut mem = self.lock();
            mem.typical_run = Some(match mem.typical_run {
                Some(t) => (t * 7 + ran) / 8,
                None => ran,
            });
        }
        let mut ended = job.clone();
        ended.state = state;
        if !self
            .change_surely(&ended, &[State::Running], Some(body))
            .await
        {
            return false;
        }
        self.update(&mut job, state);
        if !self.shared() {
            let mut mem = self.lock();
            mem.leave(&job.tenant);
            mem.bytes += job.result_bytes;
        }
        self.metrics
            .job_done(job.finished_at.unwrap_or(0).saturating_sub(job.created_at) as f64 / 1e3);
        let held = {
            let mem = self.lock();
            match self.shared() {
                false => mem.bytes,
                true => mem.shared.bytes.saturating_add(job.result_bytes),
            }
        };
        if held > self.config.max_bytes.as_u64() {
            self.sweep().await;
        }
        if job.webhook.is_some() {
            let me = self.clone();
            tokio::spawn(async move { me.deliver(job).await });
        }
        false
    }

    /// Expires finished jobs past `jobs.ttl`, then the oldest finished ones
    /// while answers hold more than `jobs.max_bytes`.
    async fn sweep(&self) {
        let ttl = self.config.ttl;
        let max = self.config.max_bytes.as_u64();
        match &self.store {
            Store::Local(l) => {
                let bytes = self.lock().bytes;
                let ttl = ttl.as_millis() as u64;
                let swept = Self::blocking(l, move |l| Ok(l.sweep(ttl, max, bytes))).await;
                if let Ok((bytes, moved)) = swept {
                    self.lock().bytes = bytes;
                    for (from, to) in moved {
                        self.metrics
                            .job_moved(Some(from.label()), to.map(State::label));
                    }
                }
            }
            Store::Shared(r) => {
                let _ = r.job_sweep(ttl, max).await;
            }
        }
    }

    /// Tells the job's webhook, signed as Standard Webhooks specifies, with
    /// retries and a doubling pause; its state is kept on the job.
    async fn deliver(self: Arc<Self>, job: Job) {
        let (Some(delivery), Some(secret)) = (job.webhook.clone(), self.secret.clone()) else {
            return;
        };
        let data = self.view(&job, true).await.unwrap_or_default();
        let payload = serde_json::json!({
            "type": format!("job.{}", job.state.label()),
            "timestamp": now_ms() / 1000,
            "data": data,
        })
        .to_string();
        let msg_id = format!("msg_{}", job.id);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        let mut pause = self.config.webhook_backoff;
        let mut delivery = delivery;
        for attempt in 1..=self.config.webhook_attempts.max(1) {
            let ts = (now_ms() / 1000).to_string();
            let signed = format!("{msg_id}.{ts}.{payload}");
            let sig = base64::engine::general_purpose::STANDARD
                .encode(ring::hmac::sign(&key, signed.as_bytes()).as_ref());
            let req = Request::post(delivery.url.as_str())
                .header("content-type", "application/json")
                .header("webhook-id", msg_id.as_str())
                .header("webhook-timestamp", ts.as_str())
                .header("webhook-signature", format!("v1,{sig}"))
                .body(Full::new(Bytes::from(payload.clone())));
            let outcome = match req {
                Ok(req) => {
                    match tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
                        .await
                    {
                        Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
                        Ok(Ok(resp)) => Err(format!("answered {}", resp.status())),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("timed out".to_string()),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            delivery.attempts = attempt;
            match outcome {
                Ok(()) => {
                    delivery.state = "delivered".into();
                    delivery.last_error = None;
                    self.metrics.webhook("delivered");
                    self.record_delivery(&job.id, &delivery).await;
                    return;
                }
                Err(e) => {
                    delivery.last_error = Some(e);
                    let last = attempt >= self.config.webhook_attempts;
                    delivery.state = if last { "failed" } else { "pending" }.into();
                    self.metrics
                        .webhook(if last { "gave_up" } else { "failed" });
                    self.record_delivery(&job.id, &delivery).await;
                    if last {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                    pause = pause.saturating_mul(2);
                }
            }
        }
    }

    async fn record_delivery(&self, id: &str, delivery: &Delivery) {
        if let Ok(Some(mut job)) = self.load(id).await
            && job.state.is_done()
        {
            job.webhook = Some(delivery.clone());
            let _ = self.change(&job, &[job.state], None).await;
        }
    }

    pub fn status(&self) -> JobsStatus {
        let mem = self.lock();
        match self.store {
            Store::Local(_) => JobsStatus {
                store: match self.config.store {
                    crate::config::JobStore::Memory => "memory",
                    crate::config::JobStore::Redb => "redb",
                },
                queued: mem.queued.len() as u64,
                running: mem.running.len() as u64,
                running_here: mem.running.len(),
                bytes: mem.bytes,
                durable: self.config.store == crate::config::JobStore::Redb,
            },
            Store::Shared(_) => JobsStatus {
                store: "redis",
                queued: mem.shared.queued,
                running: mem.shared.running,
                running_here: mem.running.len(),
                bytes: mem.shared.bytes,
                durable: true,
            },
        }
    }
}

/// When a call ended in penstock's refusal to send now that may be waited
/// out (the wait for budget would be longer than `queue.max_wait`, the queue
/// is full, the client is over its cap, ...: [`Problem::may_wait_out`]): how
/// long until it is worth asking again (at least a second, at most a minute).
fn waited_too_long(wait_out: Option<Duration>) -> Option<Duration> {
    Some(wait_out?.clamp(Duration::from_secs(1), Duration::from_secs(60)))
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(v.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The request asks to be answered later (RFC 7240 `Prefer: respond-async`).
fn wants_async(headers: &HeaderMap) -> bool {
    // A walk over the request's few headers costs less than hashing the name
    // for a lookup (see `vocab::headers::first_of`); every `Prefer` counts.
    headers.iter().any(|(k, v)| {
        k == name::PREFER
            && v.to_str().is_ok_and(|v| {
                v.split([',', ';'])
                    .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
            })
    })
}

#[derive(Clone)]
pub struct Layer {
    jobs: Option<Arc<Jobs>>,
}

impl Layer {
    pub fn new(jobs: Option<Arc<Jobs>>) -> Layer {
        Layer { jobs }
    }
}

impl<S: crate::vocab::service::Inner> tower::Layer<S> for Layer {
    type Service = JobsService<S>;
    fn layer(&self, inner: S) -> JobsService<S> {
        if let Some(jobs) = &self.jobs {
            jobs.start(inner.clone());
        }
        JobsService {
            inner,
            jobs: self.jobs.clone(),
        }
    }
}

/// Accepts `Prefer: respond-async` requests as jobs and serves the job API;
/// everything else goes on.
#[derive(Clone)]
pub struct JobsService<S> {
    inner: S,
    jobs: Option<Arc<Jobs>>,
}

impl<S: crate::vocab::service::Inner> Service<Request<Payload>> for JobsService<S> {
    type Response = Response<Body>;
    type Error = ProxyError;
    /// A call that is not a job goes on as the inner service's own future, not
    /// boxed again.
    type Future = Either<S::Future, crate::vocab::service::BoxCall>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Payload>) -> Self::Future {
        let Some(jobs) = self.jobs.clone() else {
            return Either::Left(self.inner.call(req));
        };
        if req.uri().path().starts_with(PREFIX) {
            return Either::Right(Box::pin(async move { jobs.api(&req).await }));
        }
        let asks = req.method() == Method::POST
            && req
                .body()
                .ctx
                .as_ref()
                .is_some_and(|c| c.route != Route::Other && wants_async(&c.headers));
        if asks {
            return Either::Right(Box::pin(async move { jobs.submit(req).await }));
        }
        Either::Left(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    //! Each change of a job's state, against the in-memory store, with the
    //! stack below the jobs layer played by a script.
    use super::*;
    use crate::config::{Config, JobStore};

    fn jobs() -> Arc<Jobs> {
        let mut config = Config::default();
        config.jobs.store = JobStore::Memory;
        let metrics = Arc::new(Metrics::new(&config.prices));
        let edge = Arc::new(crate::edge::EdgeConfig::new(&config, metrics.clone()));
        let prepare: Prepare = Arc::new(move |req| {
            let edge = edge.clone();
            Box::pin(async move {
                let route = Route::from_path(req.uri().path());
                crate::edge::buffer(req, edge, route, tokio::time::Instant::now()).await
            })
        });
        Jobs::open(
            &config.jobs,
            config.retry.after_send,
            config.upstream.attempt_timeout,
            metrics,
            prepare,
            None,
            &|_| None,
        )
        .expect("an in-memory store opens")
    }

    async fn submit(jobs: &Arc<Jobs>) -> String {
        let req = Request::post("/v1/images/generations")
            .header("content-type", "application/json")
            .header("prefer", "respond-async")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"gpt-image-1","prompt":"a lighthouse"}"#,
            )))
            .unwrap();
        let req = (jobs.prepare)(req).await.unwrap();
        let resp = jobs.submit(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["id"].as_str().unwrap().to_string()
    }

    async fn state(jobs: &Jobs, id: &str) -> State {
        jobs.load(id).await.unwrap().unwrap().state
    }

    /// The stack below, answering every call with `answer()`.
    fn answering(
        answer: fn() -> Result<Response<Body>, ProxyError>,
    ) -> impl crate::vocab::service::Inner {
        tower::service_fn(move |_req: Request<Payload>| std::future::ready(answer()))
    }

    #[tokio::test]
    async fn a_queued_job_runs_and_keeps_its_answer() {
        let jobs = jobs();
        let id = submit(&jobs).await;
        assert_eq!(state(&jobs, &id).await, State::Queued);
        let held = jobs
            .run_once(&id, answering(|| Ok(Response::new(full(r#"{"data":[]}"#)))))
            .await;
        assert!(!held);
        assert_eq!(state(&jobs, &id).await, State::Succeeded);
        let answer = jobs.bytes(&id, true).await.unwrap().unwrap();
        assert_eq!(answer, r#"{"data":[]}"#);
        // Run again: a finished job is left as it is.
        assert!(!jobs.run_once(&id, answering(|| unreachable!())).await);
    }

    #[tokio::test]
    async fn an_upstream_error_fails_the_job_with_the_answer_kept() {
        let jobs = jobs();
        let id = submit(&jobs).await;
        jobs.run_once(
            &id,
            answering(|| {
                let mut resp = Response::new(full(r#"{"error":{"code":"server_error"}}"#));
                *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                Ok(resp)
            }),
        )
        .await;
        assert_eq!(state(&jobs, &id).await, State::Failed);
        let job = jobs.load(&id).await.unwrap().unwrap();
        assert_eq!(job.answer.unwrap().status, 500);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_that_may_be_waited_out_puts_the_job_back_in_the_queue() {
        let jobs = jobs();
        let id = submit(&jobs).await;
        let held = jobs
            .run_once(
                &id,
                answering(|| {
                    Err(crate::admission::pool::Refusal::QueueFull {
                        depth: 10,
                        retry_after: Duration::from_secs(3),
                    }
                    .into())
                }),
            )
            .await;
        assert!(held, "still held, to go back");
        assert_eq!(state(&jobs, &id).await, State::Running);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(state(&jobs, &id).await, State::Queued);
    }

    #[tokio::test]
    async fn a_refusal_that_waiting_cannot_cure_fails_the_job() {
        let jobs = jobs();
        let id = submit(&jobs).await;
        jobs.run_once(
            &id,
            answering(|| {
                Err(crate::admission::pool::Refusal::TooLarge {
                    pool: "images".into(),
                    dimension: "images",
                    limit: 1,
                    asked: 2,
                }
                .into())
            }),
        )
        .await;
        assert_eq!(state(&jobs, &id).await, State::Failed);
    }

    #[tokio::test]
    async fn a_cancelled_job_never_runs() {
        let jobs = jobs();
        let id = submit(&jobs).await;
        let job = jobs.load(&id).await.unwrap().unwrap();
        let resp = jobs.cancel(job).await.unwrap();
        assert!(resp.status().is_success());
        assert_eq!(state(&jobs, &id).await, State::Cancelled);
        assert!(!jobs.run_once(&id, answering(|| unreachable!())).await);
        assert_eq!(state(&jobs, &id).await, State::Cancelled);
    }
}
