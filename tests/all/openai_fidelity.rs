//! Where the real OpenAI differs from a naive fake, and penstock must still keep
//! its promises: compressed answers, limits per organization/project, OpenAI's
//! way of counting tokens, requests that can never fit, fairness by cost, the
//! probe after a 429, defaults for requests without a model, coalesced callers'
//! own limits, and retries of calls that may have been paid.

use std::io::Read;
use std::time::Duration;

use crate::support::*;
use penstock::config::BudgetConfig;
use serde_json::json;

const SDK_ENCODINGS: &str = "gzip, deflate, br";

fn image(prompt: &str) -> serde_json::Value {
    json!({"model": "gpt-image-1", "prompt": prompt, "quality": "low", "size": "1024x1024"})
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[tokio::test]
async fn a_spent_quota_is_understood_through_compression_and_not_retried() {
    let h = start(Behaviour {
        insufficient_quota: true,
        ..Behaviour::default()
    })
    .await;
    let client = http();
    let calls = (0..20).map(|i| {
        let client = client.clone();
        let url = format!("{}/v1/chat/completions", h.url);
        async move {
            client
                .post(url)
                .header("accept-encoding", SDK_ENCODINGS)
                .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": format!("p{i}")}]}))
                .send()
                .await
                .unwrap()
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    for resp in answers {
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["x-should-retry"], "false");
        assert!(resp.headers().get("content-encoding").is_none());
        let v = json(resp).await;
        assert_eq!(v["error"]["code"], "insufficient_quota");
    }
    assert!(
        h.fake.calls() <= 20,
        "one call per request at most, none retried: {}",
        h.fake.calls()
    );
    assert!(
        h.fake
            .requests()
            .iter()
            .all(|r| r.headers["accept-encoding"] == SDK_ENCODINGS),
        "the upstream was asked as the client asked"
    );
}

#[tokio::test]
async fn usage_is_read_from_a_compressed_stream_passed_on_as_it_came() {
    let h = start(Behaviour::default()).await;
    let resp = http()
        .post(format!("{}/v1/chat/completions", h.url))
        .header("accept-encoding", "gzip")
        .json(&json!({"model": "gpt-4o-mini", "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "one two three four five"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let body = gunzip(&resp.bytes().await.unwrap());
    let text = String::from_utf8(body).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let metrics = h.metrics().await;
    assert!(
        sample(
            &metrics,
            "penstock_tokens_total{model=\"gpt-4o-mini\",kind=\"actual\"}"
        ) > 0.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_chat_answers_usage_with_openais_breakdowns_is_what_penstock_counts() {
    let h = start(Behaviour::default()).await;
    let resp = http()
        .post(format!("{}/v1/chat/completions", h.url))
        .json(&json!({"model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "one two three four five"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: serde_json::Value = resp.json().await.unwrap();
    let usage = &answer["usage"];
    assert!(usage["prompt_tokens_details"].is_object(), "{answer}");
    assert!(usage["completion_tokens_details"].is_object(), "{answer}");
    let metrics = h.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "penstock_tokens_total{model=\"gpt-4o-mini\",kind=\"actual\"}"
        ),
        usage["total_tokens"].as_f64().unwrap(),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_coalesced_answer_reaches_each_caller_in_a_coding_it_reads() {
    let h = start(Behaviour {
        latency: (Duration::from_millis(300), Duration::from_millis(300)),
        ..Behaviour::default()
    })
    .await;
    let url = format!("{}/v1/images/generations", h.url);
    let body = image("a lighthouse");
    let (gzip_caller, plain_caller) = tokio::join!(
        http()
            .post(&url)
            .header("accept-encoding", SDK_ENCODINGS)
            .json(&body)
            .send(),
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            http().post(&url).json(&body).send().await
        }
    );
    let (a, b) = (gzip_caller.unwrap(), plain_caller.unwrap());
    assert_eq!(h.fake.calls(), 1);
    assert_eq!(
        h.fake.requests()[0].headers["accept-encoding"],
        "identity",
        "a shared answer is asked for uncompressed"
    );
    assert_eq!(b.headers()["x-penstock-cache"], "coalesced");
    for resp in [a, b] {
        assert_eq!(resp.status(), 200);
        let plain = resp.headers().get("content-encoding").is_none();
        let bytes = resp.bytes().await.unwrap();
        let bytes = if plain {
            bytes.to_vec()
        } else {
            gunzip(&bytes)
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert!(v["data"][0]["b64_json"].is_string());
    }
}

#[tokio::test]
async fn a_hit_does_not_replay_the_headers_of_the_call_that_made_it() {
    let h = start_with(
        Behaviour {
            limits: Some(Limits {
                requests: 100,
                tokens: None,
                window: Duration::from_secs(60),
                ..Limits::default()
            }),
            // Announced on answers, to show they are not replayed.
            image_answer_limits: true,
            ..Behaviour::default()
        },
        |c| {
            c.budgets = vec![BudgetConfig {
                models: vec!["gpt-image-*".into()],
                ipm: Some(100),
                ..BudgetConfig::default()
            }]
        },
        |_| None,
    )
    .await;
    let url = format!("{}/v1/images/generations", h.url);
    let first = http().post(&url).json(&image("owl")).send().await.unwrap();
    assert!(
        first
            .headers()
            .contains_key("x-ratelimit-remaining-requests")
    );
    let hit = http().post(&url).json(&image("owl")).send().await.unwrap();
    assert_eq!(hit.headers()["x-penstock-cache"], "hit");
    assert!(!hit.headers().contains_key("x-ratelimit-remaining-requests"));
    assert!(!hit.headers().contains_key("set-cookie"));
    assert_eq!(h.fake.calls(), 1);
}

/// `n` chat calls that ask for up to 1,000 tokens each and use a handful,
/// against an upstream whose limiter charges 5,000 tokens a second at arrival.
async fn chat_wave(refund: penstock::config::Refund, n: usize) -> Harness {
    let h = start_with(
        Behaviour {
            limits: Some(Limits {
                requests: 1000,
                tokens: Some(5_000),
                window: Duration::from_secs(1),
                ..Limits::default()
            }),
            ..Behaviour::default()
        },
        |c| {
            c.budgets = vec![BudgetConfig {
                models: vec!["gpt-4o-mini".into()],
                tpm: Some(300_000),
                safety_margin: Duration::from_millis(100),
                ..BudgetConfig::default()
            }];
            c.estimate.refund = refund;
        },
        |_| None,
    )
    .await;
    let calls = (0..n).map(|i| {
        let url = format!("{}/v1/chat/completions", h.url);
        async move {
            http()
                .post(url)
                .json(&json!({"model": "gpt-4o-mini", "max_tokens": 1000,
                    "messages": [{"role": "user", "content": format!("hi {i}")}]}))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_charged_at_arrival_and_kept_as_openai_keeps_them() {
    let h = chat_wave(penstock::config::Refund::Refused, 12).await;
    assert_eq!(h.fake.answered(429), 0, "never refused by the upstream");
    // The pool still counts what it charged, not the few tokens used.
    let status = h.status().await;
    let charged = 300_000
        - status["pools"][0]["remaining"]["tokens"]["minute_remaining"]
            .as_u64()
            .unwrap();
    assert!(charged >= 12 * 1000, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_back_unused_tokens_over_admits_against_such_a_limiter() {
    // The reason it is not the default: the upstream has not given them back.
    // 24 calls: 24,000 tokens the upstream counts, which only a machine
    // taking five seconds for them would spread thinly enough.
    let h = chat_wave(penstock::config::Refund::Unused, 24).await;
    assert!(h.fake.answered(429) > 0);
}

fn images_budget(rpm: u64, shared: bool) -> BudgetConfig {
    BudgetConfig {
        models: vec!["gpt-image-*".into()],
        rpm: Some(rpm),
        safety_margin: Duration::from_millis(100),
        shared,
        ..BudgetConfig::default()
    }
}

async fn generate_as(
    h: &Harness,
    key: &str,
    headers: &[(&str, &str)],
    body: serde_json::Value,
) -> reqwest::Response {
    let mut req = http()
        .post(format!("{}/v1/images/generations", h.url))
        .bearer_auth(key)
        .json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn an_organization_header_chooses_another_pool_and_another_cache_tenant() {
    let h = start_with(
        Behaviour::default(),
        |c| c.budgets = vec![images_budget(600, false)],
        |_| None,
    )
    .await;
    let a = [("openai-organization", "org-a")];
    let b = [("openai-organization", "org-b")];
    let first = generate_as(&h, "sk-user", &a, image("same prompt")).await;
    let other = generate_as(&h, "sk-user", &b, image("same prompt")).await;
    let again = generate_as(&h, "sk-user", &a, image("same prompt")).await;
    assert_eq!(first.headers()["x-penstock-cache"], "miss");
    assert_eq!(
        other.headers()["x-penstock-cache"],
        "miss",
        "org B never gets what org A paid for"
    );
    assert_eq!(again.headers()["x-penstock-cache"], "hit");
    assert_eq!(h.fake.calls(), 2);
    let status = h.status().await;
    let pools = status["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 2, "{status}");
    assert!(
        pools
            .iter()
            .any(|p| p["credential"].as_str().unwrap().ends_with("@org-b/")),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_one_project_share_its_pool() {
    // The upstream allows the project two calls a second, whichever key sends.
    let h = start_with(
        Behaviour {
            limits: Some(Limits {
                requests: 2,
                window: Duration::from_secs(1),
                ..Limits::default()
            }),
            key_projects: vec![
                ("Bearer sk-one".into(), "proj".into()),
                ("Bearer sk-two".into(), "proj".into()),
            ],
            ..Behaviour::default()
        },
        |c| {
            c.budgets = vec![images_budget(120, false)];
            c.projects = vec![penstock::config::ProjectConfig {
                name: "proj".into(),
                key_envs: vec!["KEY_ONE".into(), "KEY_TWO".into()],
                ..Default::default()
            }];
        },
        |var| match var {
            "KEY_ONE" => Some("sk-one".into()),
            "KEY_TWO" => Some("sk-two".into()),
            _ => None,
        },
    )
    .await;
    let calls = (0..6).map(|i| {
        let key = if i % 2 == 0 { "sk-one" } else { "sk-two" };
        let h = &h;
        async move {
            generate_as(h, key, &[], image(&format!("prompt {i}")))
                .await
                .status()
        }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(h.fake.answered(429), 0, "one pool, not one per key");
    let status = h.status().await;
    assert_eq!(status["pools"][0]["credential"], "project:proj", "{status}");
    assert_eq!(status["pools"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_shared_budget_is_one_pool_for_every_key() {
    let h = start_with(
        Behaviour::default(),
        |c| c.budgets = vec![images_budget(600, true)],
        |_| None,
    )
    .await;
    for key in ["sk-a", "sk-b", "sk-c"] {
        assert_eq!(generate_as(&h, key, &[], image(key)).await.status(), 200);
    }
    let status = h.status().await;
    assert_eq!(status["pools"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["pools"][0]["credential"], "shared");
}

#[tokio::test]
async fn an_image_call_lost_after_it_was_sent_is_not_bought_twice() {
    let h = start(Behaviour {
        reset_every: Some(1),
        ..Behaviour::default()
    })
    .await;
    let resp = http()
        .post(format!("{}/v1/images/generations", h.url))
        .json(&image("maybe paid"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-should-retry"], "false");
    assert_eq!(resp.headers()["x-penstock-attempts"], "1");
    assert_eq!(h.fake.calls(), 1, "not sent again");
    // A chat call lost the same way is cheap to repeat: retried (and lost again).
    let resp = http()
        .post(format!("{}/v1/chat/completions", h.url))
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(h.fake.calls(), 1 + 4, "retried up to max_attempts");
    let text = h.metrics().await;
    assert_eq!(
        sample(
            &text,
            "penstock_failed_after_send_total{route=\"images.generations\",retried=\"false\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "penstock_failed_after_send_total{route=\"chat.completions\",retried=\"true\"}"
        ),
        3.0
    );
}

#[tokio::test]
async fn a_leaders_own_refusal_is_not_handed_to_those_who_waited_with_it() {
    let h = start_with(
        Behaviour {
            latency: (Duration::from_millis(600), Duration::from_millis(600)),
            ..Behaviour::default()
        },
        |c| {
            c.budgets = vec![BudgetConfig {
                max_in_flight: Some(1),
                ..images_budget(6000, false)
            }]
        },
        |_| None,
    )
    .await;
    let url = format!("{}/v1/images/generations", h.url);
    let post = |prompt: &'static str, max_wait: Option<&'static str>, after: u64| {
        let url = url.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(after)).await;
            let mut req = http().post(url).json(&image(prompt));
            if let Some(ms) = max_wait {
                req = req.header("x-penstock-max-wait-ms", ms);
            }
            req.send().await.unwrap()
        }
    };
    // One call holds the pool's only slot; the leader of "X" will not wait for
    // it, the follower will.
    let (_busy, leader, follower) = tokio::join!(
        post("busy", None, 0),
        post("X", Some("200"), 50),
        post("X", None, 100)
    );
    assert_eq!(leader.status(), 429);
    assert_eq!(
        json(leader).await["error"]["code"],
        "penstock_queue_timeout"
    );
    assert_eq!(follower.status(), 200, "the follower carried the call on");
    assert_eq!(follower.headers()["x-penstock-cache"], "miss");
    assert_eq!(h.fake.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_model_spend_the_default_models_budget() {
    // The upstream allows gpt-image-1 two calls a second; the budget says the same.
    let h = start_with(
        Behaviour {
            limits: Some(Limits {
                requests: 2,
                window: Duration::from_secs(1),
                ..Limits::default()
            }),
            ..Behaviour::default()
        },
        |c| c.budgets = vec![images_budget(120, false)],
        |_| None,
    )
    .await;
    let url = format!("{}/v1/images/generations", h.url);
    let calls = (0..6).map(|i| {
        let url = url.clone();
        async move {
            let req = match i % 3 {
                // No model at all.
                0 => http().post(url).json(&json!({"prompt": format!("p{i}")})),
                // A model that is not a string.
                1 => http()
                    .post(url)
                    .json(&json!({"prompt": format!("p{i}"), "model": null})),
                // JSON under another content type.
                _ => http()
                    .post(url)
                    .header("content-type", "text/plain")
                    .body(json!({"prompt": format!("p{i}")}).to_string()),
            };
            req.send().await.unwrap().status()
        }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(h.fake.answered(429), 0, "all six waited for the budget");
    assert_eq!(h.fake.calls(), 6);
}

#[tokio::test]
async fn a_request_over_a_whole_minutes_limit_is_refused_at_once_and_blocks_nobody() {
    let h = start_with(
        Behaviour::default(),
        |c| {
            c.budgets = vec![BudgetConfig {
                ipm: Some(5),
                ..images_budget(600, false)
            }]
        },
        |_| None,
    )
    .await;
    let url = format!("{}/v1/images/generations", h.url);
    let ten = json!({"model": "gpt-image-1", "prompt": "ten", "n": 10});
    let resp = http().post(&url).json(&ten).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["x-should-retry"], "false");
    let v = json(resp).await;
    assert_eq!(v["error"]["code"], "penstock_request_too_large");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("10 images") && message.contains("5 per minute"),
        "{message}"
    );
    assert_eq!(h.fake.calls(), 0);
    // Smaller requests of others go on at once.
    let one = http().post(&url).json(&image("one")).send().await.unwrap();
    assert_eq!(one.status(), 200);
}
