//! The job API: accepting a request as a job (`Prefer: respond-async`), and
//! `GET {PREFIX}`, `GET|DELETE {PREFIX}/{id}`, `GET {PREFIX}/{id}/result`.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};

use super::{Delivery, Job, JobError, Jobs, NOT_KEPT, PREFIX, State, now_ms, store};
use crate::vocab::body::{Body, full};
use crate::vocab::context::Payload;
use crate::vocab::error::ProxyError;

impl Jobs {
    /// Accepts a request as a job: stored before the answer says so.
    pub(super) async fn submit(&self, req: Request<Payload>) -> Result<Response<Body>, ProxyError> {
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
                if !self.webhook.allows(url) {
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
        let b64 = base64::engine::general_purpose::STANDARD;
        let headers = ctx
            .headers
            .iter()
            .filter(|(k, _)| !NOT_KEPT.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str().to_string(), b64.encode(v.as_bytes())))
            .collect();
        let mut job = Job {
            id: id.clone(),
            seq: 0,
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
        match self.store.submit(&mut job, payload.bytes.clone()).await? {
            store::Submitted::Full(whose) => return Err(JobError::Full(whose, after).into()),
            store::Submitted::Exists => {
                if let Some(found) = self.load(&id).await? {
                    return self.accepted(&found);
                }
            }
            store::Submitted::Accepted => {
                if !self.store.shared() {
                    self.metrics.job_moved(None, Some("queued"));
                }
            }
        }
        self.wake.notify_one();
        self.accepted(&job)
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
    pub(super) async fn api(&self, req: &Request<Payload>) -> Result<Response<Body>, ProxyError> {
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
        let mut jobs: Vec<Job> = self.store.list(tenant).await?;
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
    pub(super) async fn view(
        &self,
        job: &Job,
        with_body: bool,
    ) -> Result<serde_json::Value, ProxyError> {
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
            let pos = self.store.position(&job.id).await;
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
    pub(super) async fn cancel(&self, mut job: Job) -> Result<Response<Body>, ProxyError> {
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
                match mem.running.remove(&job.id) {
                    Some(task) => task.abort(),
                    // Being taken up here, its task not yet made: noted for
                    // the runner. (Running on another replica, it is that
                    // one's to stop, at its next renewal: nothing is noted.)
                    None if before == State::Running && self.store.holds(&job.id) => {
                        mem.cancelled.insert(job.id.clone());
                    }
                    None => {}
                }
            }
            self.store.ended(&job, true);
            self.metrics
                .job_done(job.finished_at.unwrap_or(0).saturating_sub(job.created_at) as f64 / 1e3);
        }
        Ok(json_response(StatusCode::OK, &self.view(&job, true).await?))
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
