//! Coalescing and the cache: identical requests cost one upstream call.

use std::time::Duration;

use crate::support::*;
use serde_json::json;

fn image(prompt: &str) -> serde_json::Value {
    json!({"model": "gpt-image-1", "prompt": prompt, "quality": "low", "size": "1024x1024"})
}

async fn post_as(
    url: &str,
    key: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = http()
        .post(format!("{url}/v1/images/generations"))
        .header("authorization", format!("Bearer {key}"))
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn post(url: &str, body: &serde_json::Value) -> reqwest::Response {
    post_as(url, "sk-a", body, &[]).await
}

fn cache_header(resp: &reqwest::Response) -> String {
    resp.headers()["x-penstock-cache"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_requests_over_five_prompts_cost_five_calls_and_a_second_wave_none() {
    let h = start(Behaviour {
        latency: (Duration::from_millis(300), Duration::from_millis(300)),
        ..Behaviour::default()
    })
    .await;
    let wave = || {
        let url = h.url.clone();
        async move {
            let tasks: Vec<_> = (0..50)
                .map(|i| {
                    let url = url.clone();
                    tokio::spawn(async move {
                        let resp = post(&url, &image(&format!("prompt {}", i % 5))).await;
                        assert_eq!(resp.status(), 200);
                        let outcome = cache_header(&resp);
                        (i % 5, outcome, resp.bytes().await.unwrap())
                    })
                })
                .collect();
            let mut results = Vec::new();
            for t in tasks {
                results.push(t.await.unwrap());
            }
            results
        }
    };
    let first = wave().await;
    assert_eq!(h.fake.calls(), 5, "one upstream call per distinct prompt");
    for p in 0..5 {
        let bodies: Vec<_> = first.iter().filter(|r| r.0 == p).map(|r| &r.2).collect();
        assert!(
            bodies.iter().all(|b| *b == bodies[0]),
            "identical answers for prompt {p}"
        );
    }
    let misses = first.iter().filter(|r| r.1 == "miss").count();
    let coalesced = first.iter().filter(|r| r.1 == "coalesced").count();
    assert_eq!(misses, 5);
    assert_eq!(
        coalesced + first.iter().filter(|r| r.1 == "hit").count(),
        45
    );
    assert!(coalesced > 0);

    let second = wave().await;
    assert_eq!(h.fake.calls(), 5, "the second wave costs nothing");
    assert!(second.iter().all(|r| r.1 == "hit"));
    for (p, _, body) in &second {
        let same = first.iter().find(|r| r.0 == *p).unwrap();
        assert_eq!(body, &same.2);
    }
}

#[tokio::test]
async fn tenants_do_not_share_unless_the_cache_is_global() {
    let h = start(Behaviour::default()).await;
    for key in ["sk-a", "sk-b", "sk-c"] {
        let resp = post_as(&h.url, key, &image("shared prompt"), &[]).await;
        assert_eq!(cache_header(&resp), "miss");
    }
    assert_eq!(h.fake.calls(), 3, "one call per API key");

    let h = start_with(
        Behaviour::default(),
        |c| c.cache.scope = penstock::config::CacheScope::Global,
        |_| None,
    )
    .await;
    for key in ["sk-a", "sk-b", "sk-c"] {
        post_as(&h.url, key, &image("shared prompt"), &[]).await;
    }
    assert_eq!(h.fake.calls(), 1, "global scope: one call for everyone");
}

#[tokio::test]
async fn json_with_keys_reordered_is_the_same_request() {
    let h = start(Behaviour::default()).await;
    let a = r#"{"model":"gpt-image-1","prompt":"fox","size":"1024x1024","quality":"low"}"#;
    let b = "{ \"quality\": \"low\",\n  \"size\": \"1024x1024\", \"prompt\": \"fox\", \"model\": \"gpt-image-1\" }";
    for body in [a, b] {
        let resp = http()
            .post(format!("{}/v1/images/generations", h.url))
            .header("authorization", "Bearer sk-a")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(h.fake.calls(), 1);
}

#[tokio::test]
async fn multipart_edits_with_the_same_files_and_other_boundaries_coalesce() {
    let h = start(Behaviour {
        latency: (Duration::from_millis(300), Duration::from_millis(300)),
        ..Behaviour::default()
    })
    .await;
    let png: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    let send = |boundary: &'static str| {
        let body = multipart(
            boundary,
            &[("prompt", "add a boat"), ("model", "gpt-image-1")],
            &[("image[]", "a.png", &png)],
        );
        let url = h.url.clone();
        async move {
            http()
                .post(format!("{url}/v1/images/edits"))
                .header("authorization", "Bearer sk-a")
                .header(
                    "content-type",
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    let (a, b) = tokio::join!(send("----boundaryA1"), send("----otherB2"));
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let mut outcomes = [cache_header(&a), cache_header(&b)];
    outcomes.sort();
    assert_eq!(outcomes, ["coalesced", "miss"]);
    assert_eq!(a.bytes().await.unwrap(), b.bytes().await.unwrap());
    assert_eq!(cache_header(&send("----third").await), "hit");
    assert_eq!(h.fake.calls(), 1);
}

#[tokio::test]
async fn when_the_first_caller_leaves_the_call_finishes_for_the_others_and_is_stored() {
    let h = start(Behaviour {
        latency: (Duration::from_millis(600), Duration::from_millis(600)),
        ..Behaviour::default()
    })
    .await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(150))
        .build()
        .unwrap();
    let body = image("a castle");
    let leader = impatient
        .post(format!("{}/v1/images/generations", h.url))
        .header("authorization", "Bearer sk-a")
        .json(&body)
        .send();
    let follower = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        post(&h.url, &body).await
    };
    let (leader, follower) = tokio::join!(leader, follower);
    assert!(leader.unwrap_err().is_timeout(), "the first caller gave up");
    assert_eq!(follower.status(), 200, "the follower still got the answer");
    assert_eq!(cache_header(&follower), "coalesced");

    // Alone, too: a caller gives up after the call was sent; it is paid, so kept.
    let lone = impatient
        .post(format!("{}/v1/images/generations", h.url))
        .header("authorization", "Bearer sk-a")
        .json(&image("a tower"))
        .send()
        .await;
    assert!(lone.unwrap_err().is_timeout());
    tokio::time::sleep(Duration::from_millis(700)).await;
    let retry = post(&h.url, &image("a tower")).await;
    assert_eq!(
        cache_header(&retry),
        "hit",
        "the user who retries gets it at once"
    );
    assert_eq!(h.fake.calls(), 2);
}

#[tokio::test]
async fn the_cache_stays_within_its_byte_bound_and_skips_large_entries() {
    // Each answer carries ~40 KB of image data (base64 of 30,000 bytes).
    let h = start_with(
        Behaviour {
            image_bytes: 30_000,
            ..Behaviour::default()
        },
        |c| {
            c.cache.max_size = bytesize::ByteSize::kib(400);
            c.cache.max_entry_size = bytesize::ByteSize::kib(100);
        },
        |_| None,
    )
    .await;
    for i in 0..30 {
        assert_eq!(post(&h.url, &image(&format!("p{i}"))).await.status(), 200);
    }
    let status: serde_json::Value = h.status().await;
    let bytes = status["cache"]["bytes"].as_u64().unwrap();
    let entries = status["cache"]["entries"].as_u64().unwrap();
    assert!(bytes <= 400 * 1024, "{bytes} bytes held");
    assert!((5..=10).contains(&entries), "{entries} entries kept of 30");

    // An answer over max_entry_size is shared, never kept.
    let big = json!({"model": "gpt-image-1", "prompt": "big", "quality": "low", "size": "1024x1024", "n": 3});
    assert_eq!(cache_header(&post(&h.url, &big).await), "miss");
    assert_eq!(cache_header(&post(&h.url, &big).await), "miss");
}

#[tokio::test]
async fn no_cache_refreshes_and_no_store_bypasses() {
    let h = start(Behaviour::default()).await;
    let body = image("a bridge");
    let revised =
        |v: serde_json::Value| v["data"][0]["revised_prompt"].as_str().unwrap().to_string();
    let first = revised(json(post(&h.url, &body).await).await);
    assert_eq!(first, "a bridge (call 1)");

    // no-store: a call of its own, neither looked up nor kept.
    let resp = post_as(&h.url, "sk-a", &body, &[("cache-control", "no-store")]).await;
    assert_eq!(cache_header(&resp), "bypass");
    assert_eq!(revised(json(resp).await), "a bridge (call 2)");
    assert_eq!(
        revised(json(post(&h.url, &body).await).await),
        "a bridge (call 1)"
    );

    // no-cache: a fresh generation, which replaces the kept one.
    let resp = post_as(&h.url, "sk-a", &body, &[("cache-control", "no-cache")]).await;
    assert_eq!(cache_header(&resp), "miss");
    assert_eq!(revised(json(resp).await), "a bridge (call 3)");
    let resp = post(&h.url, &body).await;
    assert_eq!(cache_header(&resp), "hit");
    assert_eq!(resp.headers()["x-penstock-attempts"], "0");
    assert_eq!(revised(json(resp).await), "a bridge (call 3)");
    assert_eq!(h.fake.calls(), 3);
}

#[tokio::test]
async fn errors_are_shared_with_those_waiting_but_never_stored() {
    let h = start_with(
        Behaviour {
            fail_every: Some(1),
            latency: (Duration::from_millis(200), Duration::from_millis(200)),
            ..Behaviour::default()
        },
        |c| c.retry.max_attempts = 1,
        |_| None,
    )
    .await;
    let body = image("doomed");
    let (a, b, c) = tokio::join!(
        post(&h.url, &body),
        post(&h.url, &body),
        post(&h.url, &body)
    );
    for r in [&a, &b, &c] {
        assert!(r.status().is_server_error());
        // Given up on by the one call's retries: by those who waited too.
        assert_eq!(r.headers()["x-should-retry"], "false");
    }
    assert_eq!(h.fake.calls(), 1, "one call, its error shared");
    h.fake.set_behaviour(|b| b.fail_every = None);
    let resp = post(&h.url, &body).await;
    assert_eq!(resp.status(), 200, "the error was not kept");
    assert_eq!(cache_header(&resp), "miss");
}

/// penstock's own error (not an upstream answer) reaches every caller that
/// waited for the call, rendered by each one's edge, and is never kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn penstocks_own_error_reaches_every_waiter_and_is_never_kept() {
    let h = start_with(
        Behaviour {
            latency: (Duration::from_secs(3), Duration::from_secs(3)),
            ..Behaviour::default()
        },
        |c| {
            c.upstream.attempt_timeout = Duration::from_millis(400);
            c.retry.max_attempts = 1;
        },
        |_| None,
    )
    .await;
    let body = image("too slow");
    let (a, b, c) = tokio::join!(
        post(&h.url, &body),
        post(&h.url, &body),
        post(&h.url, &body)
    );
    let mut outcomes = Vec::new();
    for r in [a, b, c] {
        assert_eq!(r.status(), 504);
        let outcome = cache_header(&r);
        let attempts = r.headers()["x-penstock-attempts"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(r.headers()["x-should-retry"], "false");
        let v = json(r).await;
        assert_eq!(v["error"]["code"], "penstock_upstream_timeout", "{v}");
        assert_eq!(v["error"]["type"], "penstock_error");
        outcomes.push((outcome, attempts));
    }
    outcomes.sort();
    assert_eq!(
        outcomes,
        [
            ("coalesced".to_string(), "0".to_string()),
            ("coalesced".to_string(), "0".to_string()),
            ("miss".to_string(), "1".to_string()),
        ]
    );
    assert_eq!(h.fake.calls(), 1, "one call, its error shared");
    h.fake
        .set_behaviour(|b| b.latency = (Duration::ZERO, Duration::ZERO));
    let resp = post(&h.url, &body).await;
    assert_eq!(resp.status(), 200, "the error was not kept");
    assert_eq!(cache_header(&resp), "miss");
}

#[tokio::test]
async fn streams_and_other_paths_bypass_and_disabling_turns_it_off() {
    let h = start(Behaviour::default()).await;
    let stream = json!({"model": "gpt-image-1", "prompt": "s", "stream": true});
    for _ in 0..2 {
        let resp = post(&h.url, &stream).await;
        assert_eq!(cache_header(&resp), "bypass");
        resp.bytes().await.unwrap();
    }
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..2 {
        let resp = http()
            .post(format!("{}/v1/chat/completions", h.url))
            .json(&chat)
            .send()
            .await
            .unwrap();
        assert_eq!(cache_header(&resp), "bypass");
    }
    assert_eq!(h.fake.calls(), 4);

    let h = start_with(Behaviour::default(), |c| c.cache.enabled = false, |_| None).await;
    for _ in 0..2 {
        assert_eq!(cache_header(&post(&h.url, &image("x")).await), "bypass");
    }
    assert_eq!(h.fake.calls(), 2);
}

#[tokio::test]
async fn chat_can_be_added_by_path() {
    let h = start_with(
        Behaviour::default(),
        |c| c.cache.paths.push("/v1/chat/completions".into()),
        |_| None,
    )
    .await;
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        http()
            .post(format!("{}/v1/chat/completions", h.url))
            .json(&chat)
            .send()
            .await
            .unwrap();
    }
    assert_eq!(h.fake.calls(), 1);
}
