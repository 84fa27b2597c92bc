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
//!
//! The application is in four parts: the HTTP API that accepts jobs and
//! tells of them ([`api`]), the runner that takes queued jobs through the
//! stack below this layer ([`runner`]), the webhook client ([`webhook`]), and
//! the [`store`], one trait with a redb and a Redis side. This file holds
//! what they share and the tower layer. The stack hands the runner the
//! edge's parsing of a stored request ([`Prepare`]) and the services below.

mod api;
mod runner;
mod store;
mod webhook;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::future::Either;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tower::Service;

use crate::config::{AfterSend, JobsConfig};
use crate::telemetry::metrics::Metrics;
use crate::vocab::body::Body;
use crate::vocab::context::{Payload, Prepare};
use crate::vocab::error::{Problem, ProxyError};
use crate::vocab::headers::name;
use crate::vocab::route::Route;

/// Where the job API lives: outside `/v1/`, which belongs to the upstream.
pub(crate) const PREFIX: &str = "/penstock/v1/jobs";

/// How often finished jobs past their time are looked for.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(60);

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
pub(crate) enum State {
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

/// Refusals of the job API.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError {
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

/// What is kept in memory beside the store.
#[derive(Default)]
struct Mem {
    /// Running jobs' tasks, to cancel them.
    running: HashMap<String, tokio::task::AbortHandle>,
    /// Recent time from start to end of a job, for the expected wait.
    typical_run: Option<Duration>,
    /// Jobs cancelled while being taken up, before their task could be.
    cancelled: std::collections::HashSet<String>,
}

pub(crate) struct Jobs {
    store: Box<dyn store::Store>,
    config: JobsConfig,
    webhook: webhook::Webhook,
    after_send: AfterSend,
    /// `upstream.attempt_timeout`: how long a sent call may still be running.
    attempt_timeout: Duration,
    metrics: Arc<Metrics>,
    /// The edge's parsing of a stored request, handed over by the stack.
    prepare: Prepare,
    mem: Mutex<Mem>,
    wake: Arc<Notify>,
    started: OnceLock<()>,
}

/// Counts of jobs for `/status`.
#[derive(Debug, Serialize)]
pub(crate) struct JobsStatus {
    /// `redb`, `memory` or `redis`.
    pub(crate) store: &'static str,
    pub(crate) queued: u64,
    pub(crate) running: u64,
    /// Running on this replica.
    pub(crate) running_here: usize,
    pub(crate) bytes: u64,
    pub(crate) durable: bool,
}

impl Jobs {
    /// Opens (or creates) the store and takes up the jobs it holds: redb at
    /// `jobs.path`, or Redis when `redis` is given.
    pub(crate) fn open(
        config: &JobsConfig,
        after_send: AfterSend,
        attempt_timeout: Duration,
        metrics: Arc<Metrics>,
        prepare: Prepare,
        redis: Option<Arc<crate::state::Redis>>,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<Arc<Jobs>, String> {
        let webhook = webhook::Webhook::new(config, env)?;
        let store = store::open(config, after_send, &metrics, redis)?;
        Ok(Arc::new(Jobs {
            store,
            webhook,
            config: config.clone(),
            after_send,
            attempt_timeout,
            metrics,
            prepare,
            mem: Mutex::new(Mem::default()),
            wake: Arc::new(Notify::new()),
            started: OnceLock::new(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.mem.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn load(&self, id: &str) -> Result<Option<Job>, ProxyError> {
        self.store.load(id).await
    }

    /// A job's request body (`answer` false) or answer body.
    async fn bytes(&self, id: &str, answer: bool) -> Result<Option<Bytes>, ProxyError> {
        self.store.bytes(id, answer).await
    }

    /// [`store::Store::change`], with an ended job's credentials dropped (they
    /// are not kept past its end), and the runner woken for a queued one.
    async fn change(
        &self,
        job: &Job,
        expect: &[State],
        result: Option<Bytes>,
    ) -> Result<bool, ProxyError> {
        let ended;
        let job = if job.state.is_done() && job.headers.iter().any(|(k, _)| is_credential(k)) {
            let mut j = job.clone();
            j.headers.retain(|(k, _)| !is_credential(k));
            ended = j;
            &ended
        } else {
            job
        };
        let changed = self.store.change(job, expect, result).await?;
        if changed && job.state == State::Queued {
            self.wake.notify_one();
        }
        Ok(changed)
    }

    /// [`Jobs::change`] for a job's end, tried again while the store is away
    /// (for up to a minute): the answer was paid for.
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

    /// Moves a job to `to`, counting the move (a shared store counts jobs
    /// itself: only ends are counted here).
    fn update(&self, job: &mut Job, to: State) {
        if !self.store.shared() {
            self.metrics
                .job_moved(Some(job.state.label()), Some(to.label()));
        } else if to.is_done() {
            self.metrics.job_moved(None, Some(to.label()));
        }
        job.state = to;
    }

    pub(crate) fn status(&self) -> JobsStatus {
        let running_here = self.lock().running.len();
        self.store.status(running_here)
    }
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
pub(crate) struct Layer {
    jobs: Option<Arc<Jobs>>,
}

impl Layer {
    pub(crate) fn new(jobs: Option<Arc<Jobs>>) -> Layer {
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
pub(crate) struct JobsService<S> {
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
    use crate::vocab::body::full;
    use http_body_util::{BodyExt, Full};

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
