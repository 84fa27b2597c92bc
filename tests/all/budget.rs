//! Budgets: requests wait for capacity instead of failing, and the upstream never
//! has to refuse a call. The fake enforces its limits as a strict sliding window.

use std::time::{Duration, Instant};

use crate::support::*;
use async_openai::types::images::{CreateImageRequestArgs, ImageModel, ImageQuality, ImageSize};
use async_openai::{Client, config::OpenAIConfig};
use penstock::config::BudgetConfig;
use serde_json::json;

fn budget(models: &[&str], rpm: Option<u64>, tpm: Option<u64>, ipm: Option<u64>) -> BudgetConfig {
    BudgetConfig {
        name: None,
        models: models.iter().map(|m| m.to_string()).collect(),
        rpm,
        tpm,
        ipm,
        burst: Duration::from_secs(1),
        safety_margin: Duration::from_millis(50),
        max_in_flight: None,
        shared: false,
        upstream: None,
    }
}

fn ten_per_second() -> Limits {
    Limits {
        requests: 10,
        tokens: None,
        window: Duration::from_secs(1),
        ..Limits::default()
    }
}

async fn generate(
    url: &str,
    headers: &[(&str, &str)],
    body: serde_json::Value,
) -> reqwest::Response {
    // Every request here must reach the budget: none is coalesced or cached.
    let mut req = http()
        .post(format!("{url}/v1/images/generations"))
        .header("authorization", "Bearer sk-test")
        .header("cache-control", "no-store")
        .json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_simultaneous_generations_all_succeed_without_a_single_upstream_429() {
    let h = start_with(
        Behaviour {
            limits: Some(ten_per_second()),
            latency: (Duration::from_millis(200), Duration::from_millis(600)),
            ..Behaviour::default()
        },
        |c| c.budgets = vec![budget(&["gpt-image-*"], Some(600), None, None)],
        |_| None,
    )
    .await;
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", h.url))
            .with_api_key("sk-test"),
    );
    let started = Instant::now();
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let req = CreateImageRequestArgs::default()
                    .prompt(format!("user {i}'s lighthouse"))
                    .model(ImageModel::GptImage1Mini)
                    .size(ImageSize::S1024x1024)
                    .quality(ImageQuality::Low)
                    .build()
                    .unwrap();
                client.images().generate(req).await
            })
        })
        .collect();
    let mut ok = 0;
    for c in calls {
        if c.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    let wall = started.elapsed();
    assert_eq!(ok, 50, "every generation succeeds");
    assert_eq!(h.fake.answered(429), 0, "the upstream never refused a call");
    assert_eq!(h.fake.calls(), 50, "and was called once per generation");
    // Paced, not serialised: ten at once, ten more each second (ideally
    // 4.6 s; `cargo bench --bench budget` reports the wall time against it).
    assert!(wall >= Duration::from_secs(4), "took {wall:?}: not paced");
    assert!(h.fake.max_in_flight() >= 5, "calls overlapped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_bound_high_quality_images_wait_for_tokens_not_for_errors() {
    // 20k tokens per second upstream: four high-quality squares (4160 + prompt).
    let h = start_with(
        Behaviour {
            limits: Some(Limits {
                requests: 100,
                tokens: Some(20_000),
                window: Duration::from_secs(1),
                ..Limits::default()
            }),
            ..Behaviour::default()
        },
        |c| c.budgets = vec![budget(&["gpt-image-1"], Some(6000), Some(1_200_000), None)],
        |_| None,
    )
    .await;
    let started = Instant::now();
    let calls: Vec<_> = (0..16)
        .map(|i| {
            let url = h.url.clone();
            tokio::spawn(async move {
                let body = json!({"model": "gpt-image-1", "prompt": format!("a red fox in the snow, number {i}"), "quality": "high", "size": "1024x1024"});
                generate(&url, &[], body).await.status().as_u16()
            })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    let wall = started.elapsed();
    assert_eq!(h.fake.answered(429), 0);
    // Four per window: three more windows after the first (no upper bound on
    // wall time here: the machine is shared; the benchmarks measure speed).
    assert!(
        wall >= Duration::from_millis(2900),
        "the token budget paced the calls: {wall:?}"
    );
}

#[tokio::test]
async fn one_clients_burst_does_not_starve_another() {
    let h = start_with(
        Behaviour::default(),
        |c| {
            c.upstream.api_key_env = Some("KEY".into());
            // One request per 100 ms window.
            let mut b = budget(&["gpt-image-*"], Some(600), None, None);
            b.burst = Duration::from_millis(100);
            c.budgets = vec![b];
        },
        |_| Some("sk-sidecar".into()),
    )
    .await;
    let body =
        json!({"model": "gpt-image-1", "prompt": "p", "quality": "low", "size": "1024x1024"});
    let burst: Vec<_> = (0..20)
        .map(|_| {
            let (url, body) = (h.url.clone(), body.clone());
            tokio::spawn(async move {
                generate(&url, &[("x-penstock-client", "batch")], body).await;
                Instant::now()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let asked = Instant::now();
    let resp = generate(&h.url, &[("x-penstock-client", "web")], body).await;
    let waited = asked.elapsed();
    assert_eq!(resp.status(), 200);
    let answered = asked + waited;
    let mut last_batch = asked;
    let mut batch_before_web = 0;
    for b in burst {
        let done = b.await.unwrap();
        last_batch = last_batch.max(done);
        if done > asked && done < answered {
            batch_before_web += 1;
        }
    }
    // The batch client needs ~2 s for its 20; the web client waits a slot or
    // two, not behind the batch's queue.
    assert!(last_batch - asked > Duration::from_secs(1));
    assert!(
        batch_before_web <= 3,
        "{batch_before_web} batch calls went between the web client's arrival and its answer"
    );
}

#[tokio::test]
async fn a_client_that_leaves_the_queue_frees_its_place_and_pays_nothing() {
    let h = start_with(
        Behaviour::default(),
        |c| c.budgets = vec![budget(&["gpt-image-*"], Some(60), None, None)],
        |_| None,
    )
    .await;
    let body =
        json!({"model": "gpt-image-1", "prompt": "p", "quality": "low", "size": "1024x1024"});
    assert_eq!(generate(&h.url, &[], body.clone()).await.status(), 200);
    // The next must wait ~1 s; this client gives up after 200 ms.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let gave_up = impatient
        .post(format!("{}/v1/images/generations", h.url))
        .header("authorization", "Bearer sk-test")
        .json(&body)
        .send()
        .await;
    assert!(gave_up.unwrap_err().is_timeout());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let status: serde_json::Value = h.status().await;
    assert_eq!(status["pools"][0]["queue_depth"], 0, "{status}");
    // Its slot was never spent: the next request, a second after the first, goes at once.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let resp = generate(&h.url, &[], body).await;
    assert_eq!(resp.status(), 200);
    let queued: u64 = resp.headers()["x-penstock-queue-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(queued < 200, "queued {queued} ms");
    assert_eq!(
        h.fake.calls(),
        2,
        "the abandoned request never reached the upstream"
    );
}

#[tokio::test]
async fn hopeless_waits_and_a_full_queue_are_refused_at_once_with_retry_after() {
    let h = start_with(
        Behaviour::default(),
        |c| {
            c.budgets = vec![budget(&["gpt-image-*"], Some(60), None, None)];
            c.queue.max_depth = 2;
        },
        |_| None,
    )
    .await;
    let body =
        json!({"model": "gpt-image-1", "prompt": "p", "quality": "low", "size": "1024x1024"});
    assert_eq!(generate(&h.url, &[], body.clone()).await.status(), 200);

    // Refused at once: `penstock_wait_too_long` (below), not a wait that ended
    // in `penstock_queue_timeout`.
    let resp = generate(&h.url, &[("x-penstock-max-wait-ms", "100")], body.clone()).await;
    assert_eq!(resp.status(), 429);
    let retry_ms: u64 = resp.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (500..=60_000).contains(&retry_ms),
        "retry-after-ms {retry_ms}"
    );
    assert_eq!(resp.headers()["x-should-retry"], "true");
    let v = json(resp).await;
    assert_eq!(v["error"]["code"], "penstock_wait_too_long");
    assert_eq!(v["error"]["type"], "rate_limit_error");

    // Two wait (the queue's depth); the third is refused as full.
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let (url, body) = (h.url.clone(), body.clone());
            tokio::spawn(async move { generate(&url, &[], body).await.status() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let resp = generate(&h.url, &[], body).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after-ms"));
    assert_eq!(json(resp).await["error"]["code"], "penstock_queue_full");
    for w in waiting {
        assert_eq!(w.await.unwrap(), 200);
    }
    assert_eq!(h.fake.calls(), 3, "refusals cost no upstream call");
}

#[tokio::test]
async fn the_upstreams_headers_pull_the_pool_down_when_someone_else_spends_the_key() {
    // penstock's budget is generous; the key is shared with another app that has
    // already spent 8 of the upstream's 10 per second. (OpenAI's image answers
    // announce nothing; an upstream whose answers do, as its text answers.)
    let h = start_with(
        Behaviour {
            limits: Some(ten_per_second()),
            image_answer_limits: true,
            ..Behaviour::default()
        },
        |c| c.budgets = vec![budget(&["gpt-image-*"], Some(6000), None, None)],
        |_| None,
    )
    .await;
    let body =
        json!({"model": "gpt-image-1", "prompt": "p", "quality": "low", "size": "1024x1024"});
    for _ in 0..8 {
        let direct = generate(&h.fake.url(), &[], body.clone()).await;
        assert_eq!(direct.status(), 200);
    }
    let mut waited = Vec::new();
    for _ in 0..4 {
        let resp = generate(&h.url, &[], body.clone()).await;
        assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
        waited.push(
            resp.headers()["x-penstock-queue-ms"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
    }
    assert_eq!(
        h.fake.answered(429),
        0,
        "no call was sent into a spent window"
    );
    assert!(
        waited[2] > 300,
        "the third waited for the window to turn: {waited:?}"
    );
}

#[tokio::test]
async fn an_upstream_rate_limit_pauses_the_whole_pool_and_the_call_is_retried_after_it() {
    let h = start_with(
        Behaviour {
            limits: Some(ten_per_second()),
            ..Behaviour::default()
        },
        |c| c.budgets = vec![budget(&["gpt-image-*"], Some(6000), None, None)],
        |_| None,
    )
    .await;
    let body =
        json!({"model": "gpt-image-1", "prompt": "p", "quality": "low", "size": "1024x1024"});
    // Another app on the same key spends the upstream's whole window, which
    // frees a second after it began.
    let started = Instant::now();
    for _ in 0..10 {
        generate(&h.fake.url(), &[], body.clone()).await;
    }
    let (first, second) = tokio::join!(generate(&h.url, &[], body.clone()), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        generate(&h.url, &[], body.clone()).await
    });
    assert_eq!(first.status(), 200, "the 429 was absorbed");
    assert_eq!(first.headers()["x-penstock-attempts"], "2");
    assert_eq!(second.status(), 200);
    assert_eq!(
        second.headers()["x-penstock-attempts"],
        "1",
        "the pool was held, not stampeded"
    );
    let queued: u64 = second.headers()["x-penstock-queue-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(queued > 500, "waited {queued} ms for the pause");
    assert!(started.elapsed() > Duration::from_millis(800));
    assert_eq!(
        h.fake.answered(429),
        1,
        "one refusal, not one per waiting request"
    );
}

#[tokio::test]
async fn a_request_larger_than_the_burst_still_goes_and_status_shows_the_pool() {
    let h = start_with(
        Behaviour::default(),
        |c| {
            c.budgets = vec![budget(&["gpt-image-*"], Some(60), None, Some(10))];
            // Models no budget covers pass straight through when not learned.
            c.learn.enabled = false;
        },
        |_| None,
    )
    .await;
    // 10 images against 10 ipm: far more than a second's share of one image.
    let body = json!({"model": "gpt-image-1", "prompt": "p", "quality": "low", "size": "1024x1024", "n": 10});
    let resp = generate(&h.url, &[], body).await;
    assert_eq!(
        resp.status(),
        200,
        "10 images against 10 ipm goes through on a full pool"
    );
    assert_eq!(json(resp).await["data"].as_array().unwrap().len(), 10);
    let status: serde_json::Value = h.status().await;
    let pool = &status["pools"][0];
    assert_eq!(pool["name"], "gpt-image-*");
    assert!(pool["credential"].as_str().unwrap().starts_with("key:"));
    assert_eq!(pool["remaining"]["images"]["minute_remaining"], 0);
    assert_eq!(pool["remaining"]["requests"]["minute_remaining"], 59);
    assert_eq!(status["config"]["budgets"][0]["ipm"], 10);
    assert!(!status.to_string().contains("sk-test"));
    // Models no budget covers pass straight through.
    let resp = http()
        .post(format!("{}/v1/embeddings", h.url))
        .json(&json!({"model": "text-embedding-3-small", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers().contains_key("x-penstock-queue-ms"));
}

#[tokio::test]
async fn usage_settles_the_estimate() {
    // tpm 60000: 1000 tokens per window. Each call is estimated at the worst case
    // (quality auto: 6240+) but uses 272 + prompt: after settling, more fit, when
    // unused tokens are given back (not OpenAI's way, so not the default).
    let h = start_with(
        Behaviour::default(),
        |c| {
            c.budgets = vec![budget(&["gpt-image-*"], None, Some(60_000), None)];
            c.estimate.refund = penstock::config::Refund::Unused;
        },
        |_| None,
    )
    .await;
    let body = json!({"model": "gpt-image-1", "prompt": "p", "size": "1024x1024"});
    let first = generate(&h.url, &[], body.clone()).await;
    assert_eq!(first.status(), 200);
    let _ = first.bytes().await.unwrap();
    let status: serde_json::Value = h.status().await;
    let remaining = &status["pools"][0]["remaining"]["tokens"];
    // The fake reports 1 input + 1056 output (medium, its default for an open quality).
    assert_eq!(remaining["minute_remaining"], 60_000 - 1057, "{status}");
}

#[tokio::test]
async fn a_client_over_its_own_cap_is_refused_at_once_and_others_are_not() {
    let h = start_with(
        Behaviour::default(),
        |c| {
            c.upstream.api_key_env = Some("KEY".into());
            c.clients = vec![penstock::config::ClientConfig {
                id: "batch".into(),
                rpm: Some(60),
                burst: Some(2),
                ..Default::default()
            }];
        },
        |_| Some("sk-sidecar".into()),
    )
    .await;
    let body =
        json!({"model": "gpt-image-1", "prompt": "p", "quality": "low", "size": "1024x1024"});
    let batch = [("x-penstock-client", "batch")];
    assert_eq!(generate(&h.url, &batch, body.clone()).await.status(), 200);
    assert_eq!(generate(&h.url, &batch, body.clone()).await.status(), 200);
    let refused = generate(&h.url, &batch, body.clone()).await;
    assert_eq!(refused.status(), 429);
    let retry_ms: u64 = refused.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1000).contains(&retry_ms), "{retry_ms}");
    assert_eq!(refused.headers()["x-should-retry"], "true");
    let v = json(refused).await;
    assert_eq!(v["error"]["code"], "penstock_client_rate_limited");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("60 requests per minute")
    );
    // Another client is not held back.
    for _ in 0..3 {
        let web = generate(&h.url, &[("x-penstock-client", "web")], body.clone()).await;
        assert_eq!(web.status(), 200);
    }
    assert_eq!(h.fake.calls(), 5, "the refusal cost no upstream call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_holds_across_every_proxy_thread() {
    // Four proxy threads, each with its own runtime, listener and upstream
    // connections: one ledger for all of them.
    let h = start_with(
        Behaviour {
            limits: Some(ten_per_second()),
            latency: (Duration::from_millis(200), Duration::from_millis(600)),
            ..Behaviour::default()
        },
        |c| {
            c.server.threads = 4;
            c.budgets = vec![budget(&["gpt-image-*"], Some(600), None, None)];
        },
        |_| None,
    )
    .await;
    // A connection of its own for each request: the kernel spreads them over
    // the four listeners.
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let url = h.url.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .build()
                    .unwrap();
                client
                    .post(format!("{url}/v1/images/generations"))
                    .header("authorization", "Bearer sk-test")
                    .header("cache-control", "no-store")
                    .json(&json!({"model": "gpt-image-1", "prompt": format!("thread {i}"), "quality": "low", "size": "1024x1024"}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    assert_eq!(h.fake.answered(429), 0, "the upstream never refused a call");
    assert_eq!(h.fake.calls(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_shutdown_queued_requests_go_while_the_budget_allows_and_the_rest_are_answered() {
    // One generation a second; ten asked at once; SIGTERM (shutdown) just
    // after, with a grace of three seconds.
    let h = start_with(
        Behaviour {
            latency: (Duration::from_millis(300), Duration::from_millis(300)),
            ..Behaviour::default()
        },
        |c| {
            c.budgets = vec![budget(&["gpt-image-*"], Some(60), None, None)];
            c.server.shutdown_grace = Duration::from_secs(3);
        },
        |_| None,
    )
    .await;
    let url = format!("{}/v1/images/generations", h.url);
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let body =
                    json!({"model": "gpt-image-1", "prompt": format!("p{i}"), "quality": "low"});
                let resp = http().post(url).json(&body).send().await.unwrap();
                let status = resp.status().as_u16();
                let retry = resp.headers().get("retry-after-ms").is_some();
                let body: serde_json::Value = resp.json().await.unwrap();
                (status, retry, body)
            })
        })
        .collect();
    // Shut down once all ten are in (sent, or queued): a request
    // still on its way when the listener closes is not penstock's to answer.
    for _ in 0..200 {
        let status = status_at(&h.admin).await;
        let pools = status["pools"].as_array().cloned().unwrap_or_default();
        let queued: u64 = pools
            .iter()
            .map(|p| p["queue_depth"].as_u64().unwrap_or(0))
            .sum();
        // Each either waits in the queue or has reached the upstream (one on
        // its way between is counted by neither: the loop waits for it).
        if queued as usize + h.fake.calls() >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Harness { fake, penstock, .. } = h;
    penstock.shutdown().await;
    let mut ok = 0;
    let mut refused = 0;
    for c in calls {
        let (status, retry, body) = c.await.expect("every client heard an answer");
        match status {
            200 => ok += 1,
            503 => {
                assert_eq!(body["error"]["code"], "penstock_shutting_down", "{body}");
                assert!(retry, "a refusal says when to try again");
                refused += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    // At one a second, the calls due before the last second of the grace
    // went (the first, and those at 1 s and 2 s at most); the rest were told.
    assert!((1..=3).contains(&ok), "{ok} succeeded");
    assert_eq!(ok + refused, 10);
    assert_eq!(fake.calls(), ok, "a refused request reached nobody");
}

#[tokio::test]
async fn in_a_pool_shared_by_every_key_one_keys_spent_quota_stops_that_key_alone() {
    let h = start_with(
        Behaviour {
            quota_exhausted_keys: vec!["Bearer sk-poor".into()],
            ..Behaviour::default()
        },
        |c| {
            c.budgets = vec![BudgetConfig {
                shared: true,
                ..budget(&["gpt-image-*"], Some(6000), None, None)
            }]
        },
        |_| None,
    )
    .await;
    let call = |key: &'static str, prompt: &'static str| {
        let url = format!("{}/v1/images/generations", h.url);
        async move {
            http()
                .post(url)
                .header("authorization", format!("Bearer {key}"))
                .json(&json!({"model": "gpt-image-1", "prompt": prompt, "quality": "low"}))
                .send()
                .await
                .unwrap()
        }
    };
    let poor = call("sk-poor", "one").await;
    assert_eq!(poor.status(), 429);
    assert_eq!(json(poor).await["error"]["code"], "insufficient_quota");
    // Another key of the same shared pool is another organization's money.
    assert_eq!(call("sk-rich", "two").await.status(), 200);
    let calls = h.fake.calls();
    let again = call("sk-poor", "three").await;
    assert_eq!(again.status(), 429);
    assert_eq!(again.headers()["x-penstock-circuit"], "open");
    assert_eq!(
        h.fake.calls(),
        calls,
        "the spent key is answered by penstock"
    );
    assert_eq!(call("sk-rich", "four").await.status(), 200);
}

#[tokio::test]
async fn a_client_cannot_step_out_of_its_cap_or_pool_by_naming_an_organization() {
    let key = "Bearer sk-test";
    let id = penstock::edge::key_id_of(key.as_bytes());
    let own = fake_openai::own_org(key);
    let h = start_with(
        Behaviour {
            limits: Some(Limits {
                requests: 1,
                window: Duration::from_secs(1),
                ..Limits::default()
            }),
            ..Behaviour::default()
        },
        |c| {
            c.budgets = vec![budget(&["gpt-image-*"], Some(60), None, None)];
            c.clients = vec![penstock::config::ClientConfig {
                id: id.clone(),
                rpm: Some(2),
                burst: Some(2),
                ..Default::default()
            }];
        },
        |_| None,
    )
    .await;
    let body = json!({"model": "gpt-image-1", "prompt": "p", "quality": "low"});
    // Named nothing: billed to the key's own organization, which penstock
    // learns from the answer.
    let first = generate(&h.url, &[], body.clone()).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["openai-organization"], own.as_str());
    // Naming that organization is the same limits: the same pool, which
    // waits its turn (one a second) rather than being refused upstream.
    let named = generate(
        &h.url,
        &[("openai-organization", own.as_str())],
        body.clone(),
    )
    .await;
    assert_eq!(named.status(), 200);
    assert_eq!(h.fake.answered(429), 0, "one pool for one set of limits");
    assert_eq!(h.status().await["pools_total"], 1);
    // The client's cap (two a minute) is spent: whatever organization or
    // project it names, it is refused.
    for extra in [
        ("openai-organization", "org-mine"),
        ("openai-project", "proj_x"),
        ("x-none", "plain"),
    ] {
        let refused = generate(&h.url, &[extra], body.clone()).await;
        assert_eq!(refused.status(), 429, "{extra:?}");
        assert_eq!(
            json(refused).await["error"]["code"],
            "penstock_client_rate_limited",
            "{extra:?}"
        );
    }
}
