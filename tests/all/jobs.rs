//! Submit now, collect later: `Prefer: respond-async` jobs, stored in redb.

use std::time::Duration;

use crate::support::*;
use penstock::config::BudgetConfig;
use serde_json::{Value, json};

fn image(prompt: &str) -> Value {
    json!({"model": "gpt-image-1", "prompt": prompt, "quality": "low", "size": "1024x1024"})
}

async fn submit(url: &str, key: &str, body: &Value, extra: &[(&str, &str)]) -> reqwest::Response {
    let mut req = http()
        .post(format!("{url}/v1/images/generations"))
        .header("authorization", format!("Bearer {key}"))
        .header("prefer", "respond-async")
        .json(body);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// Submits an image job for `key`; its id.
async fn submit_id(url: &str, key: &str, prompt: &str) -> String {
    let resp = submit(url, key, &image(prompt), &[]).await;
    assert_eq!(resp.status(), 202);
    resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A call to the jobs API (`path` after `/penstock/v1/jobs`) as `key`'s tenant.
async fn jobs_api(method: reqwest::Method, url: &str, key: &str, path: &str) -> reqwest::Response {
    http()
        .request(method, format!("{url}/penstock/v1/jobs{path}"))
        .header("authorization", format!("Bearer {key}"))
        .send()
        .await
        .unwrap()
}

async fn job(url: &str, key: &str, id: &str) -> (u16, Value) {
    let resp = jobs_api(reqwest::Method::GET, url, key, &format!("/{id}")).await;
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// A job's answer, as `GET …/result` gives it.
async fn result(url: &str, key: &str, id: &str) -> reqwest::Response {
    jobs_api(reqwest::Method::GET, url, key, &format!("/{id}/result")).await
}

/// Polls until the job has ended; its view.
async fn finished(url: &str, key: &str, id: &str) -> Value {
    for _ in 0..3000 {
        let (status, v) = job(url, key, id).await;
        assert_eq!(status, 200, "{v}");
        if !["queued", "running"].contains(&v["status"].as_str().unwrap()) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {id} never ended");
}

fn budget_10_per_second(c: &mut penstock::Config) {
    c.budgets = vec![BudgetConfig {
        models: vec!["gpt-image-*".into()],
        rpm: Some(600),
        // The tests share the machine: a call can reach the fake late.
        safety_margin: Duration::from_millis(250),
        ..BudgetConfig::default()
    }];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_jobs_are_accepted_at_once_and_all_succeed_without_upstream_rate_limits() {
    let h = start_with(
        Behaviour {
            limits: Some(Limits {
                requests: 10,
                window: Duration::from_secs(1),
                ..Limits::default()
            }),
            latency: (Duration::from_secs(2), Duration::from_secs(2)),
            ..Behaviour::default()
        },
        budget_10_per_second,
        |_| None,
    )
    .await;
    let submits = (0..50).map(|i| {
        let url = h.url.clone();
        async move { submit(&url, "sk-a", &image(&format!("job {i}")), &[]).await }
    });
    let accepted = futures_util::future::join_all(submits).await;
    // Every submit was answered with its job queued, not with its answer.
    let mut ids = Vec::new();
    for resp in accepted {
        assert_eq!(resp.status(), 202);
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["status"], "queued");
        assert_eq!(
            location,
            format!("/penstock/v1/jobs/{}", v["id"].as_str().unwrap())
        );
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    // A synchronous answer, for its shape.
    let sync: Value = http()
        .post(format!("{}/v1/images/generations", h.url))
        .header("authorization", "Bearer sk-a")
        .json(&image("sync"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for id in &ids {
        let v = finished(&h.url, "sk-a", id).await;
        assert_eq!(v["status"], "succeeded", "{v}");
        assert_eq!(v["response"]["status"], 200);
        let result = result(&h.url, "sk-a", id).await;
        assert_eq!(result.status(), 200);
        assert!(
            result.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        let body: Value = result.json().await.unwrap();
        let keys = |v: &Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(&body),
            keys(&sync),
            "the same shape as a synchronous answer"
        );
        assert_eq!(keys(&body["data"][0]), keys(&sync["data"][0]));
        assert_eq!(body, v["response"]["body"]);
    }
    assert_eq!(h.fake.answered(429), 0);
    assert_eq!(h.fake.answered(200), 51);
    let metrics = h.metrics().await;
    assert_eq!(
        sample(&metrics, r#"penstock_jobs{state="succeeded"}"#),
        50.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_read_cancel_or_list_another_tenants_jobs() {
    let h = start(Behaviour::default()).await;
    let id = submit_id(&h.url, "sk-a", "mine").await;
    finished(&h.url, "sk-a", &id).await;
    let (status, v) = job(&h.url, "sk-b", &id).await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "penstock_job_not_found");
    for path in [format!("/{id}/result"), format!("/{id}")] {
        let resp = jobs_api(reqwest::Method::GET, &h.url, "sk-b", &path).await;
        assert_eq!(resp.status(), 404);
    }
    let cancel = jobs_api(reqwest::Method::DELETE, &h.url, "sk-b", &format!("/{id}")).await;
    assert_eq!(cancel.status(), 404);
    assert_eq!(list(&h.url, "sk-b").await.len(), 0);
    let mine = list(&h.url, "sk-a").await;
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_queued_job_never_reaches_the_upstream() {
    let h = start_with(
        Behaviour {
            latency: (Duration::from_millis(500), Duration::from_millis(500)),
            ..Behaviour::default()
        },
        |c| c.jobs.max_running = 1,
        |_| None,
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(submit_id(&h.url, "sk-a", &format!("cancel {i}")).await);
    }
    let (_, third) = job(&h.url, "sk-a", &ids[2]).await;
    assert_eq!(third["status"], "queued");
    assert!(third["position"].as_u64().is_some(), "{third}");
    let cancelled = cancel(&h.url, "sk-a", &ids[2]).await;
    assert_eq!(cancelled["status"], "cancelled");
    for id in &ids[..2] {
        assert_eq!(finished(&h.url, "sk-a", id).await["status"], "succeeded");
    }
    assert_eq!(
        finished(&h.url, "sk-a", &ids[2]).await["status"],
        "cancelled"
    );
    assert_eq!(h.fake.calls(), 2, "the cancelled job was never sent");
    let result = result(&h.url, "sk-a", &ids[2]).await;
    assert_eq!(result.status(), 409);
}

/// A webhook receiver on 127.0.0.1 that fails its first `fail` deliveries;
/// what it received: (webhook-id, webhook-timestamp, webhook-signature, body).
async fn receiver(
    fail: usize,
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(String, String, String, bytes::Bytes)>>>,
) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let h = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .map(|v| v.to_str().unwrap().to_string())
                                    .unwrap_or_default()
                            };
                            let (id, ts, sig) = (
                                h("webhook-id"),
                                h("webhook-timestamp"),
                                h("webhook-signature"),
                            );
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let n = {
                                let mut seen = seen.lock().unwrap();
                                seen.push((id, ts, sig, body));
                                seen.len()
                            };
                            let status = if n <= fail { 500 } else { 200 };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (format!("http://{addr}/"), got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_is_signed_retried_until_delivered_and_confined_to_allowed_prefixes() {
    // Standard Webhooks' example secret.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (hook, got) = receiver(2).await;
    let prefix = hook.clone();
    let h = start_with(
        Behaviour::default(),
        move |c| {
            c.jobs.webhook_prefixes = vec![prefix];
            c.jobs.webhook_secret_env = Some("HOOK_SECRET".into());
            c.jobs.webhook_backoff = Duration::from_millis(50);
        },
        |name| (name == "HOOK_SECRET").then(|| SECRET.to_string()),
    )
    .await;
    // The receiver's prefix is `http://127.0.0.1:PORT/`: look-alikes that
    // start with it as text are refused as well as plain strangers.
    let host = hook.trim_end_matches('/').to_string();
    let look_alikes = [
        "http://attacker.example/collect".to_string(),
        format!("{host}@attacker.example/"),
        format!("{host}.attacker.example/"),
        format!("{host}1/"),
        format!("{host}/../admin"),
    ];
    for url in &look_alikes {
        let refused = submit(
            &h.url,
            "sk-a",
            &image("elsewhere"),
            &[("x-penstock-webhook", url)],
        )
        .await;
        assert_eq!(refused.status(), 400, "{url}");
        let v: Value = refused.json().await.unwrap();
        assert_eq!(v["error"]["code"], "penstock_webhook_not_allowed", "{url}");
    }
    assert_eq!(h.fake.calls(), 0, "a refused submit is not run");
    let target = format!("{hook}done");
    let resp = submit(
        &h.url,
        "sk-a",
        &image("hooked"),
        &[("x-penstock-webhook", &target)],
    )
    .await;
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    finished(&h.url, "sk-a", &id).await;
    let mut delivered = Value::Null;
    for _ in 0..500 {
        let (_, v) = job(&h.url, "sk-a", &id).await;
        if v["webhook"]["state"] == "delivered" {
            delivered = v;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(delivered["webhook"]["attempts"], 3, "{delivered}");
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "two failures, then delivered");
    let key = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        SECRET.trim_start_matches("whsec_"),
    )
    .unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    for (msg_id, ts, sig, body) in &got {
        assert_eq!(msg_id, &format!("msg_{id}"));
        let signed = [msg_id.as_bytes(), b".", ts.as_bytes(), b".", body].concat();
        let expected = ring::hmac::sign(&key, &signed);
        let sent = sig.strip_prefix("v1,").expect("a v1 signature");
        let sent =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, sent).unwrap();
        assert_eq!(sent, expected.as_ref(), "the signature verifies");
        let payload: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(payload["type"], "job.succeeded");
        assert_eq!(payload["data"]["id"], id.as_str());
    }
    let metrics = h.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"penstock_webhook_deliveries_total{outcome="failed"}"#
        ),
        2.0
    );
    assert_eq!(
        sample(
            &metrics,
            r#"penstock_webhook_deliveries_total{outcome="delivered"}"#
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_sigkill_and_what_had_completed_is_not_done_again() {
    const JOBS: usize = 30;
    let fake = fake_taking(Duration::from_millis(200)).await;
    let dir = tempfile::tempdir().unwrap();
    // No jobs.path: durable by default, in the data directory beside the
    // config file.
    let path = config_file(
        &dir,
        &fake.url(),
        "[[budget]]\nmodels = [\"gpt-image-*\"]\nrpm = 300\n[retry]\nafter_send = \"always\"\n",
    );
    let (mut first, url) = spawn_penstock(&path).await;
    let data = dir.path().join("penstock-data");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&data).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        assert!(data.join("jobs.redb").exists());
    }
    // Submitted at once: the 30 take six seconds of budget to run.
    let submits = (0..JOBS).map(|i| {
        let url = url.clone();
        async move { submit_id(&url, "sk-a", &format!("durable {i}")).await }
    });
    let ids = futures_util::future::join_all(submits).await;
    // Some have completed (five a second), most wait.
    while fake.answered(200) < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut completed = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        if job(&url, "sk-a", id).await.1["status"] == "succeeded" {
            completed.push(i);
        }
    }
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    assert!(completed.len() < JOBS, "the kill came before the end");
    let (_second, url) = spawn_penstock(&path).await;
    for id in &ids {
        let v = finished(&url, "sk-a", id).await;
        assert_eq!(v["status"], "succeeded", "{v}");
    }
    // What had completed before the kill reached the upstream once.
    let prompts = answered_prompts(&fake);
    for i in completed {
        let prompt = format!("durable {i}");
        assert_eq!(
            prompts.iter().filter(|p| **p == prompt).count(),
            1,
            "{prompt}"
        );
    }
    for i in 0..JOBS {
        let prompt = format!("durable {i}");
        assert!(prompts.contains(&prompt), "{prompt} never ran");
    }
}

#[test]
fn the_job_store_is_readable_by_its_owner_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.redb");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut config = config_for("http://127.0.0.1:1");
        config.jobs.path = Some(path.clone());
        config.jobs.store = penstock::config::JobStore::Redb;
        let running = penstock::start(&config, |_| None).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        running.shutdown().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_wait_longer_for_budget_than_a_client_would() {
    // One image a second, and no client may wait more than one second: a
    // synchronous burst of five is mostly refused; five jobs all succeed.
    let h = start_with(
        Behaviour::default(),
        |c| {
            c.budgets = vec![BudgetConfig {
                models: vec!["gpt-image-*".into()],
                rpm: Some(60),
                ..BudgetConfig::default()
            }];
            c.queue.max_wait = Duration::from_secs(1);
        },
        |_| None,
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(submit_id(&h.url, "sk-a", &format!("patient {i}")).await);
    }
    for id in &ids {
        let v = finished(&h.url, "sk-a", id).await;
        assert_eq!(v["status"], "succeeded", "{v}");
    }
    assert_eq!(h.fake.calls(), 5);
}

/// The prompts of the calls the fake answered, in order.
fn answered_prompts(fake: &Fake) -> Vec<String> {
    fake.requests()
        .iter()
        .filter_map(|r| {
            let v: Value = serde_json::from_slice(&r.body).ok()?;
            Some(v["prompt"].as_str()?.to_string())
        })
        .collect()
}

/// A config keeping jobs (and budgets) in `redis`, with a 1 s lease.
fn redis_config(upstream: &str, redis: &str) -> penstock::Config {
    let mut c = config_for(upstream);
    c.state.backend = penstock::config::Backend::Redis;
    c.state.redis_url = redis.to_string();
    c.state.heartbeat = Duration::from_millis(200);
    c.state.lease = Duration::from_secs(1);
    c
}

/// A replica of penstock in this process, keeping jobs in `redis`.
async fn redis_replica(upstream: &str, redis: &str, max_running: usize) -> Replica {
    let mut c = redis_config(upstream, redis);
    c.jobs.max_running = max_running;
    replica(&c).await
}

async fn list(url: &str, key: &str) -> Vec<Value> {
    let v: Value = jobs_api(reqwest::Method::GET, url, key, "")
        .await
        .json()
        .await
        .unwrap();
    v["data"].as_array().unwrap().clone()
}

async fn cancel(url: &str, key: &str, id: &str) -> Value {
    jobs_api(reqwest::Method::DELETE, url, key, &format!("/{id}"))
        .await
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_any_replica_answers_cancels_and_lists_any_job() {
    let Some(redis) = crate::support::redis_server::RedisServer::start().await else {
        return;
    };
    let fake = fake_taking(Duration::from_millis(400)).await;
    // One job at a time on each: the third and later wait in Redis.
    let a = redis_replica(&fake.url(), &redis.url(), 1).await;
    let b = redis_replica(&fake.url(), &redis.url(), 1).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(submit_id(&a.url, "sk-a", &format!("shared {i}")).await);
    }
    // The last one, submitted on A, is cancelled on B while queued.
    let (status, last) = job(&b.url, "sk-a", &ids[5]).await;
    assert_eq!(status, 200, "{last}");
    assert_eq!(last["status"], "queued", "{last}");
    assert!(last["position"].as_u64().is_some(), "{last}");
    assert_eq!(cancel(&b.url, "sk-a", &ids[5]).await["status"], "cancelled");
    // Another tenant sees nothing of them on either replica.
    assert_eq!(job(&b.url, "sk-b", &ids[0]).await.0, 404);
    assert_eq!(
        cancel(&a.url, "sk-b", &ids[1]).await["error"]["code"],
        "penstock_job_not_found"
    );
    assert!(list(&b.url, "sk-b").await.is_empty());
    for id in &ids[..5] {
        let v = finished(&b.url, "sk-a", id).await;
        assert_eq!(v["status"], "succeeded", "{v}");
        assert_eq!(v["response"]["status"], 200);
        assert!(
            v["response"]["body"]["data"][0]["b64_json"].is_string(),
            "{v}"
        );
        let result = result(&a.url, "sk-a", id).await;
        assert_eq!(result.status(), 200);
        let body: Value = result.json().await.unwrap();
        assert!(body["data"][0]["b64_json"].is_string());
    }
    assert_eq!(
        finished(&a.url, "sk-a", &ids[5]).await["status"],
        "cancelled"
    );
    // Both replicas took jobs from the one queue, and each ran once.
    let prompts = answered_prompts(&fake);
    for i in 0..5 {
        let prompt = format!("shared {i}");
        assert_eq!(
            prompts.iter().filter(|p| **p == prompt).count(),
            1,
            "{prompt}"
        );
    }
    assert!(
        !prompts.contains(&"shared 5".to_string()),
        "the cancelled job ran"
    );
    let listed = list(&b.url, "sk-a").await;
    assert_eq!(listed.len(), 6);
    assert_eq!(listed[0]["id"], ids[5], "newest first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_a_dead_replicas_jobs_are_taken_over_after_its_lease() {
    let Some(redis) = crate::support::redis_server::RedisServer::start().await else {
        return;
    };
    let fake = fake_taking(Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().unwrap();
    // A sent call is taken over once it could have ended: its attempt
    // timeout after it was sent.
    let path = config_file(
        &dir,
        &fake.url(),
        &format!(
            "attempt_timeout = \"4s\"\n{}[jobs]\nmax_running = 2\n",
            redis.state_toml()
        ),
    );
    // The first replica: a real process, killed with SIGKILL.
    let (mut first, url) = spawn_penstock(&path).await;
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "again"}]});
    let resp = http()
        .post(format!("{url}/v1/chat/completions"))
        .header("authorization", "Bearer sk-a")
        .header("prefer", "respond-async")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let text_id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let image_id = submit_id(&url, "sk-a", "paid once").await;
    let queued_id = submit_id(&url, "sk-a", "still queued").await;
    // Both running jobs reached the upstream, and the replica noted it.
    while fake.calls() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let second = redis_replica(&fake.url(), &redis.url(), 2).await;
    // Text may be sent again (retry.after_send = "text"); an image is not
    // paid for twice; the queued job simply runs.
    let text = finished(&second.url, "sk-a", &text_id).await;
    assert_eq!(text["status"], "succeeded", "{text}");
    let image = finished(&second.url, "sk-a", &image_id).await;
    assert_eq!(image["status"], "failed", "{image}");
    assert!(
        image["error"]
            .as_str()
            .unwrap()
            .starts_with("penstock_interrupted"),
        "{image}"
    );
    let queued = finished(&second.url, "sk-a", &queued_id).await;
    assert_eq!(queued["status"], "succeeded", "{queued}");
    let images = answered_prompts(&fake);
    // The fake records a call when it answers it: the calls the killed
    // replica had in flight are counted, not recorded.
    assert_eq!(images, ["still queued"], "the image job was not sent again");
    assert_eq!(fake.calls(), 4, "the text job twice, each image once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_caps_hold_across_replicas_and_a_cancel_stops_a_job_running_elsewhere() {
    let Some(redis) = crate::support::redis_server::RedisServer::start().await else {
        return;
    };
    let fake = fake_taking(Duration::from_secs(3)).await;
    let mut c = redis_config(&fake.url(), &redis.url());
    c.state.lease = Duration::from_millis(600);
    c.jobs.max_per_tenant = 2;
    c.jobs.max_running = 1;
    let replicas = [
        penstock::start(&c, |_| None).await.unwrap(),
        penstock::start(&c, |_| None).await.unwrap(),
    ];
    let urls = replicas.each_ref().map(|r| format!("http://{}", r.addr));
    let first = submit_id(&urls[0], "sk-a", "cap 0").await;
    // Which replica runs it.
    let runner = 'found: loop {
        for (i, r) in replicas.iter().enumerate() {
            let s: Value = json(
                http()
                    .get(format!("http://{}/status", r.admin_addr))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            if s["jobs"]["running_here"] == 1 {
                break 'found i;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (here, elsewhere) = (&urls[runner], &urls[1 - runner]);
    let _second = submit_id(elsewhere, "sk-a", "cap 1").await;
    // The tenant's third, on either replica, is refused; another tenant is not.
    for url in &urls {
        let third = submit(url, "sk-a", &image("cap 2"), &[]).await;
        assert_eq!(third.status(), 429);
        assert!(third.headers().contains_key("retry-after-ms"));
        assert_eq!(json(third).await["error"]["code"], "penstock_jobs_full");
    }
    assert_eq!(
        submit(here, "sk-b", &image("other"), &[]).await.status(),
        202
    );
    // The refused jobs' bodies were not kept: three jobs, three bodies.
    let bodies: Vec<String> = redis::cmd("KEYS")
        .arg("*jobbody*")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    assert_eq!(bodies.len(), 3, "{bodies:?}");
    // Both replicas are busy (one job each at a time): "other" waits.
    while fake.calls() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Cancelled through the replica not running it: its place is freed at
    // once, and the runner lets go of it at its next lease renewal, so its
    // slot takes "other" before "cap 0" could have been answered.
    assert_eq!(
        cancel(elsewhere, "sk-a", &first).await["status"],
        "cancelled"
    );
    assert_eq!(
        submit(elsewhere, "sk-a", &image("cap 3"), &[])
            .await
            .status(),
        202
    );
    while fake.calls() < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(fake.requests().is_empty(), "nothing answered yet");
    let v = finished(here, "sk-a", &first).await;
    assert_eq!(v["status"], "cancelled", "{v}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = finished(elsewhere, "sk-a", &first).await;
    assert_eq!(v["status"], "cancelled", "{v}");
    assert!(
        v.get("response").is_none(),
        "no answer over the cancel: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_an_answer_past_its_ttl_is_expired_on_every_replica() {
    let Some(redis) = crate::support::redis_server::RedisServer::start().await else {
        return;
    };
    let fake = Fake::start(Behaviour::default()).await;
    let mut c = redis_config(&fake.url(), &redis.url());
    c.jobs.ttl = Duration::from_secs(1);
    let a = penstock::start(&c, |_| None).await.unwrap();
    let b = penstock::start(&c, |_| None).await.unwrap();
    let (a, b) = (format!("http://{}", a.addr), format!("http://{}", b.addr));
    let id = submit_id(&a, "sk-a", "short-lived").await;
    assert_eq!(finished(&b, "sk-a", &id).await["status"], "succeeded");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for url in [&a, &b] {
        let (status, v) = job(url, "sk-a", &id).await;
        assert_eq!(status, 404, "{v}");
        assert_eq!(v["error"]["code"], "penstock_job_expired");
    }
    assert!(list(&b, "sk-a").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_a_submit_is_refused_with_a_retry_not_accepted_unstored() {
    let Some(mut redis) = crate::support::redis_server::RedisServer::start().await else {
        return;
    };
    let fake = Fake::start(Behaviour::default()).await;
    let a = redis_replica(&fake.url(), &redis.url(), 1).await;
    a.until_state(true, 1).await;
    redis.kill();
    let resp = submit(&a.url, "sk-a", &image("while away"), &[]).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after-ms"));
    assert_eq!(
        json(resp).await["error"]["code"],
        "penstock_state_unavailable"
    );
    assert_eq!(fake.calls(), 0, "nothing ran that was not stored");
}

/// The replica running a long image job and a chat job loses Redis for
/// longer than a lease (a partition: Redis is there for the other replica):
/// the other does not take over calls that may still be running, neither job
/// is sent twice, and both paid answers are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_redis_keeps_its_sent_jobs_and_none_is_sent_twice() {
    let Some(redis) = crate::support::redis_server::RedisServer::start().await else {
        return;
    };
    let fake = fake_taking(Duration::from_secs(6)).await;
    let relay = Relay::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let runner = {
        let mut c = redis_config(&fake.url(), &format!("redis://{}", relay.addr));
        c.jobs.max_running = 2;
        replica(&c).await
    };
    runner.until_state(true, 1).await;
    let image_id = submit_id(&runner.url, "sk-a", "a long generation").await;
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "once"}]});
    let resp = http()
        .post(format!("{}/v1/chat/completions", runner.url))
        .header("authorization", "Bearer sk-a")
        .header("prefer", "respond-async")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let chat_id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Both calls are generating upstream.
    while fake.max_in_flight() < 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let other = redis_replica(&fake.url(), &redis.url(), 2).await;
    other.until_state(true, 2).await;
    // The runner is cut off for longer than the lease (1 s); the other
    // replica sees the leases lapse meanwhile.
    relay.freeze(true);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    relay.freeze(false);
    let image = finished(&other.url, "sk-a", &image_id).await;
    assert_eq!(image["status"], "succeeded", "{image}");
    let chat = finished(&other.url, "sk-a", &chat_id).await;
    assert_eq!(chat["status"], "succeeded", "{chat}");
    let answer = result(&other.url, "sk-a", &image_id).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(fake.calls(), 2, "each job sent once");
}

/// A submit sent again with the same `Idempotency-Key` (its first answer
/// lost) is the same job: one job, one upstream call, on either store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_sent_again_with_its_idempotency_key_is_the_same_job() {
    let redis = crate::support::redis_server::RedisServer::start().await;
    let fake = fake_taking(Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut local = config_for(&fake.url());
    local.jobs.path = Some(dir.path().join("jobs.redb"));
    local.jobs.store = penstock::config::JobStore::Redb;
    let mut configs = vec![local];
    if let Some(redis) = &redis {
        configs.push(redis_config(&fake.url(), &redis.url()));
    }
    for (n, config) in configs.iter().enumerate() {
        let r = replica(config).await;
        let key = format!("retry-{n}");
        let once = [("idempotency-key", key.as_str())];
        let first = submit(&r.url, "sk-a", &image(&format!("keyed {n}")), &once).await;
        assert_eq!(first.status(), 202);
        let first: Value = first.json().await.unwrap();
        let again = submit(&r.url, "sk-a", &image(&format!("keyed {n}")), &once).await;
        assert_eq!(again.status(), 202);
        let again: Value = again.json().await.unwrap();
        assert_eq!(first["id"], again["id"]);
        // Another tenant's key of the same text is another job.
        let other = submit(&r.url, "sk-b", &image(&format!("keyed {n}")), &once).await;
        let other: Value = other.json().await.unwrap();
        assert_ne!(other["id"], first["id"]);
        let done = finished(&r.url, "sk-a", first["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        finished(&r.url, "sk-b", other["id"].as_str().unwrap()).await;
        assert_eq!(list(&r.url, "sk-a").await.len(), 1, "one job for the key");
    }
    // Per store: one call for sk-a's key, one for sk-b's.
    assert_eq!(fake.calls(), 2 * configs.len());
}

/// A job whose request body is gone from the store is never run without
/// it: it fails with a code that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_a_job_without_its_body_fails_and_is_never_sent() {
    let Some(redis) = crate::support::redis_server::RedisServer::start().await else {
        return;
    };
    let fake = fake_taking(Duration::from_secs(2)).await;
    let r = redis_replica(&fake.url(), &redis.url(), 1).await;
    r.until_state(true, 1).await;
    let busy = submit_id(&r.url, "sk-a", "keeps the runner busy").await;
    while fake.max_in_flight() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lost = submit_id(&r.url, "sk-a", "its body goes").await;
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*jobbody:{{{lost}}}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    for k in keys {
        let _: i64 = redis::cmd("DEL")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(finished(&r.url, "sk-a", &busy).await["status"], "succeeded");
    let view = finished(&r.url, "sk-a", &lost).await;
    assert_eq!(view["status"], "failed", "{view}");
    assert!(
        view["error"]
            .as_str()
            .unwrap()
            .starts_with("penstock_job_body_missing"),
        "{view}"
    );
    assert_eq!(fake.calls(), 1, "the job without its body was not sent");
}

/// A job over its client's own cap waits its turn, as a job over a budget
/// does, instead of failing with the cap's 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_its_clients_cap_goes_back_to_the_queue() {
    let fake = fake_taking(Duration::from_millis(50)).await;
    let mut c = config_for(&fake.url());
    c.upstream.api_key_env = Some("KEY".into());
    c.clients = vec![penstock::config::ClientConfig {
        id: "batch".into(),
        rpm: Some(60),
        burst: Some(1),
        ..Default::default()
    }];
    c.validate("test").unwrap();
    let running = penstock::start(&c, |_| Some("sk-sidecar".into()))
        .await
        .unwrap();
    let url = format!("http://{}", running.addr);
    let batch = [("x-penstock-client", "batch")];
    let mut ids = Vec::new();
    for i in 0..3 {
        let resp = submit(&url, "", &image(&format!("capped {i}")), &batch).await;
        assert_eq!(resp.status(), 202);
        ids.push(
            resp.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    for id in &ids {
        let mut view = Value::Null;
        for _ in 0..500 {
            let resp = http()
                .get(format!("{url}/penstock/v1/jobs/{id}"))
                .header("x-penstock-client", "batch")
                .send()
                .await
                .unwrap();
            view = resp.json().await.unwrap();
            if !["queued", "running"].contains(&view["status"].as_str().unwrap_or("")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(view["status"], "succeeded", "{view}");
    }
    assert_eq!(fake.calls(), 3);
}

/// The job list comes a page at a time, newest first, without answers (each
/// names where its answer is); an ended job keeps no credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_listed_a_page_at_a_time_and_ended_jobs_keep_no_credentials() {
    let Some(redis) = crate::support::redis_server::RedisServer::start().await else {
        return;
    };
    let fake = fake_taking(Duration::from_millis(20)).await;
    let r = redis_replica(&fake.url(), &redis.url(), 4).await;
    r.until_state(true, 1).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(submit_id(&r.url, "sk-secret-paged", &format!("paged {i}")).await);
    }
    for id in &ids {
        finished(&r.url, "sk-secret-paged", id).await;
    }
    let page = |query: String| {
        let url = r.url.clone();
        async move {
            jobs_api(
                reqwest::Method::GET,
                &url,
                "sk-secret-paged",
                &format!("?{query}"),
            )
            .await
            .json::<Value>()
            .await
            .unwrap()
        }
    };
    let first = page("limit=2".into()).await;
    let seen: Vec<&str> = first["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(seen, [ids[4].as_str(), ids[3].as_str()], "newest first");
    assert_eq!(first["has_more"], true);
    assert!(first["data"][0]["response"]["body"].is_null(), "{first}");
    assert_eq!(
        first["data"][0]["result_url"],
        format!("/penstock/v1/jobs/{}/result", ids[4])
    );
    let second = page(format!(
        "limit=2&after={}",
        first["last_id"].as_str().unwrap()
    ))
    .await;
    assert_eq!(second["data"][0]["id"], ids[2].as_str());
    let last = page(format!(
        "limit=2&after={}",
        second["last_id"].as_str().unwrap()
    ))
    .await;
    assert_eq!(last["data"].as_array().unwrap().len(), 1);
    assert_eq!(last["has_more"], false);
    // What Redis keeps of the ended jobs holds no key.
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    for k in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        let text: String = match kind.as_str() {
            "string" => redis::cmd("GET")
                .arg(&k)
                .query_async::<Vec<u8>>(&mut conn)
                .await
                .map(|b| String::from_utf8_lossy(&b).to_string())
                .unwrap_or_default(),
            "hash" => {
                let v: Vec<Vec<u8>> = redis::cmd("HVALS")
                    .arg(&k)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                v.iter()
                    .map(|b| String::from_utf8_lossy(b).to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            }
            _ => continue,
        };
        let b64 = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "Bearer sk-secret-paged",
        );
        assert!(
            !text.contains("sk-secret-paged") && !text.contains(&b64),
            "{k} keeps the key: {text}"
        );
    }
}
