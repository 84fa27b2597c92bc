//! The runner: takes queued jobs, at most `jobs.max_running` at once, through
//! the stack below the jobs layer (handed over by the stack), and keeps their
//! answers. It is the edge of a request answered later: an error becomes the
//! job's result here, rendered as the edge renders it, and a refusal that may
//! be waited out puts the job back in its queue instead. With Redis it also
//! keeps this replica's leases and takes over jobs whose replica died.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;

use super::{Answer, JobError, Jobs, NOT_KEPT_ANSWER, SWEEP_EVERY, State, interrupted, now_ms};
use crate::vocab::error::ProxyError;

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
            let runs = deadline.saturating_duration_since(tokio::time::Instant::now());
            match jobs.store.mark_sent(&id, runs).await? {
                true => Ok(()),
                false => Err(lost()),
            }
        })
    }
}

impl Jobs {
    /// Runs queued jobs through `inner`, at most `jobs.max_running` at once.
    pub(super) fn start<S: crate::vocab::service::Inner>(self: &Arc<Self>, inner: S) {
        if self.started.set(()).is_err() {
            return;
        }
        let weak = Arc::downgrade(self);
        let wake = self.wake.clone();
        let slots = Arc::new(Semaphore::new(self.config.max_running));
        // Redis is asked now and then for jobs other replicas queued.
        let idle = self.store.idle();
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
                    match jobs.store.claim().await {
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
        let tick = self.store.tick();
        tokio::spawn(async move {
            let mut last_sweep: Option<tokio::time::Instant> = None;
            loop {
                let Some(jobs) = weak.upgrade() else { return };
                if last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY) {
                    jobs.sweep().await;
                    last_sweep = Some(tokio::time::Instant::now());
                }
                jobs.keep_leases().await;
                drop(jobs);
                tokio::time::sleep(tick).await;
            }
        });
    }

    /// With Redis: renews this replica's leases (stopping the jobs it no
    /// longer holds: cancelled, or taken over while Redis was away), takes
    /// over jobs whose replica died, and reads the shared counts.
    async fn keep_leases(self: &Arc<Self>) {
        let kept = self.store.keep().await;
        {
            let mut mem = self.lock();
            for id in &kept.lost {
                if let Some(task) = mem.running.remove(id) {
                    tracing::info!(job = %id, "job stopped: cancelled, or no longer this replica's");
                    task.abort();
                }
            }
        }
        for id in &kept.orphans {
            self.take_over(id).await;
        }
        if let Some((queued, running)) = kept.counts {
            self.metrics.jobs_shared(queued, running);
        }
    }

    /// A job whose replica died: back to the queue, or failed as the
    /// after-send policy says if it may have reached the upstream.
    async fn take_over(self: &Arc<Self>, id: &str) {
        let Ok(Some(mut job)) = self.load(id).await else {
            self.store.release(id);
            return;
        };
        let was = job.state;
        if was == State::Running {
            interrupted(&mut job, self.after_send);
        }
        tracing::info!(job = %id, now = job.state.label(), "job taken over from a replica that stopped");
        let changed = self.change(&job, &[was], None).await.unwrap_or(false);
        self.store.release(id);
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
            self.store.release(id);
        }
    }

    /// [`Jobs::run`]; true when the job is still held, to go back to the queue.
    pub(super) async fn run_once<S: crate::vocab::service::Inner>(
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
                Err(e) => Err(super::store::store_err(e)),
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
                me.store.release(&job.id);
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
        self.store.ended(&job, false);
        self.metrics
            .job_done(job.finished_at.unwrap_or(0).saturating_sub(job.created_at) as f64 / 1e3);
        if self.store.held_bytes(job.result_bytes) > self.config.max_bytes.as_u64() {
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
    pub(super) async fn sweep(&self) {
        for (from, to) in self.store.sweep().await {
            self.metrics
                .job_moved(Some(from.label()), to.map(State::label));
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
