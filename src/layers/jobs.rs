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
//! `retry.after_send` (it may have reached the upstream). When a job ends,
//! a webhook can be told, signed as Standard Webhooks specifies.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};
use tower::Service;

use super::edge::EdgeConfig;
use super::edge::respond;
use crate::config::{AfterSend, JobsConfig};
use crate::logic::metrics::Metrics;
use crate::vocab::body::{Body, full};
use crate::vocab::context::Payload;
use crate::vocab::error::{Problem, ProxyError};
use crate::vocab::route::Route;

/// Where the job API lives: outside `/v1/`, which belongs to the upstream.
pub const PREFIX: &str = "/penstock/v1/jobs";

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const BODIES: TableDefinition<&str, &[u8]> = TableDefinition::new("bodies");
const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");

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
    #[error("webhook URL {0:?} is not under one of the allowed prefixes (jobs.webhook_prefixes)")]
    WebhookNotAllowed(String),
    #[error("the job store failed: {0}")]
    Store(String),
}

impl Problem for JobError {
    fn status(&self) -> StatusCode {
        match self {
            JobError::NotFound(_) | JobError::Expired(_) => StatusCode::NOT_FOUND,
            JobError::NotFinished(..) => StatusCode::CONFLICT,
            JobError::Full(..) => StatusCode::TOO_MANY_REQUESTS,
            JobError::WebhookNotAllowed(_) => StatusCode::BAD_REQUEST,
            JobError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            JobError::Full(_, after) => Some(*after),
            _ => None,
        }
    }
}

fn store_err(e: impl std::fmt::Display) -> ProxyError {
    JobError::Store(e.to_string()).into()
}

/// What is kept in memory beside the store.
#[derive(Default)]
struct Mem {
    /// Queued job ids, in their order.
    queued: VecDeque<String>,
    /// Running jobs' tasks, to cancel them.
    running: HashMap<String, tokio::task::AbortHandle>,
    /// Jobs waiting or running, per tenant.
    per_tenant: HashMap<String, usize>,
    /// Bytes of answers held.
    bytes: u64,
    next_seq: u64,
    /// Recent time from start to end of a job, for the expected wait.
    typical_run: Option<Duration>,
    /// Jobs cancelled while being taken up, before their task could be.
    cancelled: std::collections::HashSet<String>,
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

pub struct Jobs {
    db: Arc<redb::Database>,
    /// New jobs, written by one thread in shared transactions: one commit
    /// (one wait for the disk) for all the jobs submitted meanwhile.
    committer: Mutex<std::sync::mpsc::Sender<Accepted>>,
    config: JobsConfig,
    after_send: AfterSend,
    metrics: Arc<Metrics>,
    edge: Arc<EdgeConfig>,
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
    pub queued: usize,
    pub running: usize,
    pub bytes: u64,
    pub durable: bool,
}

impl Jobs {
    /// Opens (or creates) the store and takes up the jobs it holds.
    pub fn open(
        config: &JobsConfig,
        after_send: AfterSend,
        metrics: Arc<Metrics>,
        edge: Arc<EdgeConfig>,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<Arc<Jobs>, String> {
        let db = match &config.path {
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
        let db = Arc::new(db);
        let (committer, accepted) = std::sync::mpsc::channel::<Accepted>();
        let writer = db.clone();
        std::thread::Builder::new()
            .name("penstock-jobs-commit".into())
            .spawn(move || group_commit(&writer, &accepted))
            .map_err(|e| format!("jobs: {e}"))?;
        let jobs = Arc::new(Jobs {
            db,
            committer: Mutex::new(committer),
            config: config.clone(),
            after_send,
            metrics,
            edge,
            mem: Mutex::new(Mem::default()),
            wake: Arc::new(Notify::new()),
            started: OnceLock::new(),
            secret,
            client,
        });
        jobs.recover().map_err(|e| format!("jobs.path: {e}"))?;
        Ok(jobs)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.mem.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes up what the store holds: queued jobs in their order; running
    /// ones as the after-send policy says (they may have been sent).
    fn recover(&self) -> Result<(), redb::Error> {
        let txn = self.db.begin_write()?;
        let mut queued: Vec<(u64, String)> = Vec::new();
        let mut per_tenant: HashMap<String, usize> = HashMap::new();
        let mut bytes = 0u64;
        let mut next_seq = 0u64;
        let mut changed: Vec<Job> = Vec::new();
        {
            let table = txn.open_table(JOBS)?;
            for entry in table.iter()? {
                let (_, v) = entry?;
                let Ok(mut job) = serde_json::from_slice::<Job>(v.value()) else {
                    continue;
                };
                next_seq = next_seq.max(job.seq + 1);
                if job.state == State::Running {
                    let again = !job.sent
                        || match self.after_send {
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
                    changed.push(job.clone());
                }
                if job.state == State::Queued {
                    queued.push((job.seq, job.id.clone()));
                    *per_tenant.entry(job.tenant.clone()).or_default() += 1;
                }
                bytes += job.result_bytes;
                self.metrics.job_moved(None, Some(job.state.label()));
            }
        }
        {
            let mut table = txn.open_table(JOBS)?;
            for job in &changed {
                let v = serde_json::to_vec(job).unwrap_or_default();
                table.insert(job.id.as_str(), v.as_slice())?;
            }
        }
        txn.open_table(BODIES)?;
        txn.open_table(RESULTS)?;
        txn.commit()?;
        queued.sort();
        if !queued.is_empty() {
            tracing::info!(
                queued = queued.len(),
                "jobs taken up from the store, in their order"
            );
        }
        let mut mem = self.lock();
        mem.queued = queued.into_iter().map(|(_, id)| id).collect();
        mem.per_tenant = per_tenant;
        mem.bytes = bytes;
        mem.next_seq = next_seq;
        Ok(())
    }

    fn load(&self, id: &str) -> Result<Option<Job>, ProxyError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let table = txn.open_table(JOBS).map_err(store_err)?;
        let Some(v) = table.get(id).map_err(store_err)? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(v.value()).ok())
    }

    fn read(&self, table: TableDefinition<&str, &[u8]>, id: &str) -> Result<Bytes, ProxyError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let t = txn.open_table(table).map_err(store_err)?;
        Ok(t.get(id)
            .map_err(store_err)?
            .map(|v| Bytes::copy_from_slice(v.value()))
            .unwrap_or_default())
    }

    /// Writes a job (and optionally its request body or answer) in one
    /// transaction, durable when it returns.
    fn save(
        &self,
        job: &Job,
        body: Option<&[u8]>,
        result: Option<&[u8]>,
        forget: bool,
    ) -> Result<(), ProxyError> {
        let txn = self.db.begin_write().map_err(store_err)?;
        {
            let mut jobs = txn.open_table(JOBS).map_err(store_err)?;
            let v = serde_json::to_vec(job).map_err(store_err)?;
            jobs.insert(job.id.as_str(), v.as_slice())
                .map_err(store_err)?;
            let mut bodies = txn.open_table(BODIES).map_err(store_err)?;
            if let Some(body) = body {
                bodies.insert(job.id.as_str(), body).map_err(store_err)?;
            }
            let mut results = txn.open_table(RESULTS).map_err(store_err)?;
            if let Some(result) = result {
                results.insert(job.id.as_str(), result).map_err(store_err)?;
            }
            if forget || job.state.is_done() {
                bodies.remove(job.id.as_str()).map_err(store_err)?;
            }
            if forget {
                results.remove(job.id.as_str()).map_err(store_err)?;
            }
        }
        txn.commit().map_err(store_err)
    }

    /// Stores a new job with the next group commit; returns once it is durable.
    fn commit_new(&self, job: &Job, body: Bytes) -> Result<(), ProxyError> {
        let record = serde_json::to_vec(job).map_err(store_err)?;
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
            return Err(store_err("the job store's writer has stopped"));
        }
        wait.recv().map_err(store_err)?.map_err(store_err)
    }

    /// [`Jobs::save`] off the async workers: a commit waits for the disk.
    async fn persist(self: &Arc<Self>, job: &Job, result: Option<Bytes>) -> Result<(), ProxyError> {
        let (me, job) = (self.clone(), job.clone());
        tokio::task::spawn_blocking(move || me.save(&job, None, result.as_deref(), false))
            .await
            .unwrap_or_else(|e| Err(store_err(e)))
    }

    /// Moves a job to `to`, in the store and the metrics.
    fn update(&self, job: &mut Job, to: State) {
        self.metrics
            .job_moved(Some(job.state.label()), Some(to.label()));
        job.state = to;
    }

    /// Accepts a request as a job: stored before the answer says so.
    fn submit(&self, req: Request<Payload>) -> Result<Response<Body>, ProxyError> {
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
                let allowed = self
                    .config
                    .webhook_prefixes
                    .iter()
                    .any(|p| url.starts_with(p.as_str()));
                if !allowed || self.secret.is_none() {
                    return Err(JobError::WebhookNotAllowed(url.to_string()).into());
                }
                Some(url.to_string())
            }
            None => self.config.webhook_url.clone(),
        };
        let tenant = ctx.tenant.0.to_string();
        let seq = {
            let mut mem = self.lock();
            let waiting: usize = mem.per_tenant.values().sum();
            let mine = mem.per_tenant.get(&tenant).copied().unwrap_or(0);
            let after = mem.typical_run.unwrap_or(Duration::from_secs(30));
            if waiting >= self.config.max_total {
                return Err(JobError::Full("in all", after).into());
            }
            if mine >= self.config.max_per_tenant {
                return Err(JobError::Full("for this client", after).into());
            }
            *mem.per_tenant.entry(tenant.clone()).or_default() += 1;
            mem.next_seq += 1;
            mem.next_seq
        };
        let id = format!("job_{:016x}{:08x}", fastrand::u64(..), fastrand::u32(..));
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
        if let Err(e) = self.commit_new(&job, payload.bytes.clone()) {
            let mut mem = self.lock();
            mem.leave(&tenant);
            return Err(e);
        }
        self.metrics.job_moved(None, Some("queued"));
        self.lock().queued.push_back(id.clone());
        self.wake.notify_one();
        let mut resp = json_response(
            StatusCode::ACCEPTED,
            &serde_json::json!({
                "id": id,
                "object": "penstock.job",
                "status": "queued",
                "created_at": job.created_at / 1000,
            }),
        );
        if let Ok(v) = HeaderValue::try_from(format!("{PREFIX}/{id}")) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        resp.headers_mut().insert(
            "preference-applied",
            HeaderValue::from_static("respond-async"),
        );
        Ok(resp)
    }

    /// The job API: `GET {PREFIX}`, `GET|DELETE {PREFIX}/{id}`, `GET {PREFIX}/{id}/result`.
    fn api(&self, req: &Request<Payload>) -> Result<Response<Body>, ProxyError> {
        let Some(ctx) = req.body().ctx.as_ref() else {
            return Err(JobError::NotFound(String::new()).into());
        };
        let tenant = &*ctx.tenant.0;
        let rest = req.uri().path().strip_prefix(PREFIX).unwrap_or("");
        let rest = rest.trim_start_matches('/');
        if rest.is_empty() && req.method() == Method::GET {
            return self.list(tenant);
        }
        let (id, result) = match rest.strip_suffix("/result") {
            Some(id) => (id, true),
            None => (rest, false),
        };
        let job = match self.load(id)? {
            Some(job) if job.tenant == tenant => job,
            _ => return Err(JobError::NotFound(id.to_string()).into()),
        };
        if job.state == State::Expired {
            return Err(JobError::Expired(id.to_string()).into());
        }
        match (req.method().clone(), result) {
            (Method::GET, false) => Ok(json_response(StatusCode::OK, &self.view(&job))),
            (Method::GET, true) => self.result(&job),
            (Method::DELETE, false) => self.cancel(job),
            _ => Err(JobError::NotFound(rest.to_string()).into()),
        }
    }

    fn list(&self, tenant: &str) -> Result<Response<Body>, ProxyError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let table = txn.open_table(JOBS).map_err(store_err)?;
        let mut jobs: Vec<Job> = Vec::new();
        for entry in table.iter().map_err(store_err)? {
            let (_, v) = entry.map_err(store_err)?;
            if let Ok(job) = serde_json::from_slice::<Job>(v.value())
                && job.tenant == tenant
                && job.state != State::Expired
            {
                jobs.push(job);
            }
        }
        jobs.sort_by_key(|j| std::cmp::Reverse(j.seq));
        jobs.truncate(1000);
        let data: Vec<_> = jobs.iter().map(|j| self.view(j)).collect();
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"object": "list", "data": data}),
        ))
    }

    /// A job as its client sees it.
    fn view(&self, job: &Job) -> serde_json::Value {
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
            let mem = self.lock();
            if let Some(pos) = mem.queued.iter().position(|q| *q == job.id) {
                v["position"] = pos.into();
                let run = mem.typical_run.unwrap_or(Duration::from_secs(30));
                let rounds = (pos / self.config.max_running + 1) as u32;
                v["expected_wait_ms"] = (run.saturating_mul(rounds).as_millis() as u64).into();
            }
        }
        if let Some(answer) = &job.answer {
            v["response"] = serde_json::json!({
                "status": answer.status,
                "headers": answer.headers.iter().cloned().collect::<HashMap<_, _>>(),
            });
            let body = self.read(RESULTS, &job.id).unwrap_or_default();
            v["response"]["body"] = match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(json) => json,
                Err(_) => String::from_utf8_lossy(&body).into_owned().into(),
            };
            v["result_url"] = format!("{PREFIX}/{}/result", job.id).into();
        }
        if let Some(e) = &job.error {
            v["error"] = e.clone().into();
        }
        if let Some(w) = &job.webhook {
            v["webhook"] = serde_json::to_value(w).unwrap_or_default();
        }
        v
    }

    /// The upstream's answer itself, as the synchronous call would have had it.
    fn result(&self, job: &Job) -> Result<Response<Body>, ProxyError> {
        let Some(answer) = &job.answer else {
            return Err(JobError::NotFinished(job.id.clone(), job.state.label()).into());
        };
        let body = self.read(RESULTS, &job.id)?;
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
    /// nothing; a running one is stopped (if it was sent, it was paid).
    fn cancel(&self, mut job: Job) -> Result<Response<Body>, ProxyError> {
        if !job.state.is_done() {
            {
                let mut mem = self.lock();
                mem.queued.retain(|q| *q != job.id);
                match mem.running.remove(&job.id) {
                    Some(task) => task.abort(),
                    None if job.state == State::Running => {
                        mem.cancelled.insert(job.id.clone());
                    }
                    None => {}
                }
                mem.leave(&job.tenant);
            }
            self.update(&mut job, State::Cancelled);
            job.finished_at = Some(now_ms());
            self.save(&job, None, None, false)?;
            self.metrics
                .job_done(job.finished_at.unwrap_or(0).saturating_sub(job.created_at) as f64 / 1e3);
        }
        Ok(json_response(StatusCode::OK, &self.view(&job)))
    }

    /// Runs queued jobs through `inner`, at most `jobs.max_running` at once.
    fn start<S: crate::layers::Inner>(self: &Arc<Self>, inner: S) {
        if self.started.set(()).is_err() {
            return;
        }
        let weak = Arc::downgrade(self);
        let wake = self.wake.clone();
        let slots = Arc::new(Semaphore::new(self.config.max_running));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let job = loop {
                    let Some(jobs) = weak.upgrade() else { return };
                    let next = jobs.lock().queued.pop_front();
                    match next {
                        Some(id) => break (jobs, id),
                        None => {
                            let woken = wake.notified();
                            tokio::pin!(woken);
                            woken.as_mut().enable();
                            drop(jobs);
                            // Also wakes now and then, to end with the store.
                            let _ = tokio::time::timeout(Duration::from_secs(5), woken).await;
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
        tokio::spawn(async move {
            loop {
                let Some(jobs) = weak.upgrade() else { return };
                jobs.sweep();
                drop(jobs);
                tokio::time::sleep(SWEEP_EVERY).await;
            }
        });
    }

    /// One job, from the store to its answer.
    async fn run<S: crate::layers::Inner>(self: &Arc<Self>, id: &str, mut inner: S) {
        let Ok(Some(mut job)) = self.load(id) else {
            return;
        };
        if job.state != State::Queued {
            return;
        }
        self.update(&mut job, State::Running);
        job.started_at = Some(now_ms());
        if self.persist(&job, None).await.is_err() {
            return;
        }
        let body = self.read(BODIES, id).unwrap_or_default();
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
            let resp = match builder.body(Full::new(body)) {
                Ok(req) => {
                    let route = Route::from_path(req.uri().path());
                    let received = tokio::time::Instant::now();
                    match super::edge::buffer(req, me.edge.clone(), route, job_id.clone(), received)
                        .await
                    {
                        Ok(req) => {
                            let watch = req
                                .body()
                                .ctx
                                .clone()
                                .map(|ctx| me.watch_sent(&job_id, ctx));
                            let resp = crate::layers::call_now(&mut inner, req).await;
                            if let Some(w) = watch {
                                w.abort();
                            }
                            resp
                        }
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(JobError::Store(e.to_string()).into()),
            };
            let resp = resp.unwrap_or_else(respond::into_response);
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes());
            (parts, body, job)
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
        let Ok((parts, body, mut job)) = outcome else {
            // Cancelled: the cancel recorded it.
            return;
        };
        if !still_ours {
            return;
        }
        // penstock's own refusal to wait that long for budget: a job has no
        // client waiting, so it goes back to the head of the queue and tries
        // again when the budget could take it.
        if let Ok(b) = &body
            && let Some(after) = waited_too_long(parts.status, &parts.headers, b)
        {
            job.started_at = None;
            self.update(&mut job, State::Queued);
            if self.persist(&job, None).await.is_ok() {
                let me = self.clone();
                let id = job.id.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    me.lock().queued.push_front(id);
                    me.wake.notify_one();
                });
            }
            return;
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
        self.update(&mut job, state);
        {
            let mut mem = self.lock();
            mem.leave(&job.tenant);
            mem.bytes += job.result_bytes;
            let ran = Duration::from_millis(
                job.finished_at
                    .unwrap_or(0)
                    .saturating_sub(job.started_at.unwrap_or(0)),
            );
            mem.typical_run = Some(match mem.typical_run {
                Some(t) => (t * 7 + ran) / 8,
                None => ran,
            });
        }
        if let Err(e) = self.persist(&job, Some(body)).await {
            tracing::error!(job = %job.id, error = %e, "cannot store a finished job");
        }
        self.metrics
            .job_done(job.finished_at.unwrap_or(0).saturating_sub(job.created_at) as f64 / 1e3);
        if self.lock().bytes > self.config.max_bytes.as_u64() {
            self.sweep();
        }
        if job.webhook.is_some() {
            let me = self.clone();
            tokio::spawn(async move { me.deliver(job).await });
        }
    }

    /// Records in the store, once, that the job's call has gone upstream.
    fn watch_sent(
        self: &Arc<Self>,
        id: &str,
        ctx: Arc<crate::vocab::context::RequestContext>,
    ) -> tokio::task::JoinHandle<()> {
        let (me, id) = (self.clone(), id.to_string());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if ctx.tally.get().sent {
                    let _ = me.mark_sent(&id);
                    return;
                }
            }
        })
    }

    /// Marks a running job sent, in one write transaction (so a job finished
    /// meanwhile is not turned back).
    fn mark_sent(&self, id: &str) -> Result<(), redb::Error> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(JOBS)?;
            let job = table
                .get(id)?
                .and_then(|v| serde_json::from_slice::<Job>(v.value()).ok());
            if let Some(mut job) = job.filter(|j| j.state == State::Running) {
                job.sent = true;
                let v = serde_json::to_vec(&job).unwrap_or_default();
                table.insert(id, v.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Expires finished jobs past `jobs.ttl`, then the oldest finished ones
    /// while answers hold more than `jobs.max_bytes`; forgets expired ones
    /// after another `jobs.ttl`.
    fn sweep(&self) {
        let now = now_ms();
        let ttl = self.config.ttl.as_millis() as u64;
        let mut done: Vec<Job> = Vec::new();
        if let Ok(txn) = self.db.begin_read()
            && let Ok(table) = txn.open_table(JOBS)
            && let Ok(iter) = table.iter()
        {
            for (_, v) in iter.flatten() {
                if let Ok(job) = serde_json::from_slice::<Job>(v.value())
                    && job.state.is_done()
                {
                    done.push(job);
                }
            }
        }
        done.sort_by_key(|j| j.finished_at.unwrap_or(0));
        let mut bytes = self.lock().bytes;
        let max = self.config.max_bytes.as_u64();
        for mut job in done {
            let finished = job.finished_at.unwrap_or(0);
            if job.state == State::Expired {
                if finished.saturating_add(2 * ttl) < now {
                    let _ = self.forget(&job);
                }
                continue;
            }
            if finished.saturating_add(ttl) < now || bytes > max {
                bytes = bytes.saturating_sub(job.result_bytes);
                self.update(&mut job, State::Expired);
                job.result_bytes = 0;
                job.answer = None;
                let _ = self.save(&job, None, None, true);
            }
        }
        self.lock().bytes = bytes;
    }

    fn forget(&self, job: &Job) -> Result<(), redb::Error> {
        let txn = self.db.begin_write()?;
        txn.open_table(JOBS)?.remove(job.id.as_str())?;
        txn.commit()?;
        self.metrics.job_moved(Some(job.state.label()), None);
        Ok(())
    }

    /// Tells the job's webhook, signed as Standard Webhooks specifies, with
    /// retries and a doubling pause; its state is kept on the job.
    async fn deliver(self: Arc<Self>, job: Job) {
        let (Some(delivery), Some(secret)) = (job.webhook.clone(), self.secret.clone()) else {
            return;
        };
        let payload = serde_json::json!({
            "type": format!("job.{}", job.state.label()),
            "timestamp": now_ms() / 1000,
            "data": self.view(&job),
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
                    self.record_delivery(&job.id, &delivery);
                    return;
                }
                Err(e) => {
                    delivery.last_error = Some(e);
                    let last = attempt >= self.config.webhook_attempts;
                    delivery.state = if last { "failed" } else { "pending" }.into();
                    self.metrics
                        .webhook(if last { "gave_up" } else { "failed" });
                    self.record_delivery(&job.id, &delivery);
                    if last {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                    pause = pause.saturating_mul(2);
                }
            }
        }
    }

    fn record_delivery(&self, id: &str, delivery: &Delivery) {
        if let Ok(Some(mut job)) = self.load(id) {
            job.webhook = Some(delivery.clone());
            let _ = self.save(&job, None, None, false);
        }
    }

    pub fn status(&self) -> JobsStatus {
        let mem = self.lock();
        JobsStatus {
            queued: mem.queued.len(),
            running: mem.running.len(),
            bytes: mem.bytes,
            durable: self.config.path.is_some(),
        }
    }
}

/// When an answer is penstock's refusal to wait for budget (the wait would
/// be longer than `queue.max_wait`, or the queue is full): how long until it
/// is worth asking again (at least a second, at most a minute).
fn waited_too_long(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Option<Duration> {
    if status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = v["error"]["code"].as_str()?;
    if !matches!(
        code,
        "penstock_wait_too_long" | "penstock_queue_timeout" | "penstock_queue_full"
    ) {
        return None;
    }
    let after = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map_or(Duration::from_secs(1), Duration::from_millis);
    Some(after.clamp(Duration::from_secs(1), Duration::from_secs(60)))
}

/// A new job for the group commit, and whom to tell when it is durable.
struct Accepted {
    id: String,
    record: Vec<u8>,
    body: Bytes,
    done: std::sync::mpsc::SyncSender<Result<(), String>>,
}

/// Writes new jobs: each transaction takes every job waiting for it, so a
/// burst of submits shares a few commits. Ends when the jobs are dropped.
fn group_commit(db: &redb::Database, accepted: &std::sync::mpsc::Receiver<Accepted>) {
    while let Ok(first) = accepted.recv() {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match accepted.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let written = (|| -> Result<(), redb::Error> {
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
    headers.get_all("prefer").iter().any(|v| {
        v.to_str().is_ok_and(|v| {
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

impl<S: crate::layers::Inner> tower::Layer<S> for Layer {
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

impl<S: crate::layers::Inner> Service<Request<Payload>> for JobsService<S> {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<Body>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Payload>) -> Self::Future {
        let Some(jobs) = self.jobs.clone() else {
            return Box::pin(self.inner.call(req));
        };
        if req.uri().path().starts_with(PREFIX) {
            // The store's reads and commits (an fsync) block: off the workers.
            return Box::pin(async move {
                tokio::task::spawn_blocking(move || jobs.api(&req))
                    .await
                    .unwrap_or_else(|e| Err(store_err(e)))
            });
        }
        let asks = req.method() == Method::POST
            && req
                .body()
                .ctx
                .as_ref()
                .is_some_and(|c| wants_async(&c.headers) && c.route != Route::Other);
        if asks {
            return Box::pin(async move {
                tokio::task::spawn_blocking(move || jobs.submit(req))
                    .await
                    .unwrap_or_else(|e| Err(store_err(e)))
            });
        }
        Box::pin(self.inner.call(req))
    }
}
