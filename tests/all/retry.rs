//! Retries: routine failures are absorbed without the client retrying, money errors
//! are never retried, and a failing upstream does not see a retry storm.

use std::time::Duration;

use crate::support::*;
use futures_util::StreamExt;
use penstock::config::BudgetConfig;
use serde_json::json;

fn image() -> serde_json::Value {
    json!({"model": "gpt-image-1", "prompt": "a kite", "quality": "low", "size": "1024x1024"})
}

async fn post(url: &str, body: &serde_json::Value) -> reqwest::Response {
    // Every request here must reach the upstream: none is coalesced or cached.
    http()
        .post(format!("{url}/v1/images/generations"))
        .header("authorization", "Bearer sk-test")
        .header("cache-control", "no-store")
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_fifth_of_calls_failing_and_some_resets_are_absorbed_at_about_one_and_a_quarter_calls_each()
 {
    // Every 5th call fails with 5xx, every 23rd connection is reset; resets of
    // image calls, which may have been paid, are retried only when told to.
    let h = start_with(
        Behaviour {
            fail_every: Some(5),
            reset_every: Some(23),
            ..Behaviour::default()
        },
        |c| c.retry.after_send = penstock::config::AfterSend::Always,
        |_| None,
    )
    .await;
    let mut attempts = 0;
    for _ in 0..100 {
        let resp = post(&h.url, &image()).await;
        assert_eq!(resp.status(), 200, "the client never sees the failure");
        attempts += resp.headers()["x-penstock-attempts"]
            .to_str()
            .unwrap()
            .parse::<usize>()
            .unwrap();
    }
    let calls = h.fake.calls();
    assert_eq!(
        attempts, calls,
        "x-penstock-attempts agrees with the upstream's count"
    );
    let per_request = calls as f64 / 100.0;
    assert!(
        (1.2..=1.4).contains(&per_request),
        "{per_request} upstream calls per request"
    );
    assert!(
        h.fake.answered(0) >= 4,
        "resets happened: {}",
        h.fake.answered(0)
    );
    assert!(h.fake.answered(500) + h.fake.answered(502) + h.fake.answered(503) >= 20);
}

/// An outage: every call fails. Retries would multiply the calls; the
/// upstream's breaker keeps them to about one per request: once it opens,
/// requests are answered at once (503 `penstock_upstream_down`, with
/// `retry-after` at the cool-down's end) and nothing is sent.
#[tokio::test]
async fn an_upstream_that_fails_everything_sees_at_most_one_call_per_request() {
    let h = start(Behaviour {
        fail_every: Some(1),
        ..Behaviour::default()
    })
    .await;
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let url = h.url.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for _ in 0..10 {
                    let resp = post(&url, &image()).await;
                    let status = resp.status().as_u16();
                    let retry = resp.headers()["x-should-retry"]
                        .to_str()
                        .unwrap()
                        .to_string();
                    let code = json(resp).await["error"]["code"]
                        .as_str()
                        .map(str::to_string);
                    answers.push((status, retry, code));
                }
                answers
            })
        })
        .collect();
    let mut down = 0;
    for t in tasks {
        for (status, retry, code) in t.await.unwrap() {
            match code.as_deref() {
                // The breaker: come back when it may be over.
                Some("penstock_upstream_down") => {
                    assert_eq!((status, retry.as_str()), (503, "true"));
                    down += 1;
                }
                // The last upstream error, unchanged.
                _ => {
                    assert!([500, 502, 503].contains(&status), "{status}");
                    assert_eq!(retry, "false");
                }
            }
        }
    }
    let calls = h.fake.calls();
    assert!(calls <= 100, "{calls} upstream calls for 100 requests");
    assert!(down > 0, "the breaker opened");
}

#[tokio::test]
async fn after_an_outage_a_probe_closes_the_breaker() {
    let h = start_with(
        Behaviour {
            fail_every: Some(1),
            ..Behaviour::default()
        },
        |c| {
            c.upstream.breaker_cooldown = Duration::from_millis(200);
            c.budgets = vec![BudgetConfig {
                name: Some("images".into()),
                models: vec!["gpt-image-*".into()],
                rpm: Some(6000),
                ..BudgetConfig::default()
            }];
        },
        |_| None,
    )
    .await;
    let all: Vec<_> = (0..50)
        .map(|_| {
            let url = h.url.clone();
            tokio::spawn(async move { post(&url, &image()).await.status().as_u16() })
        })
        .collect();
    for t in all {
        assert!([500, 502, 503].contains(&t.await.unwrap()));
    }
    let first = h.fake.calls();
    assert!(first <= 60, "{first} upstream calls for 50 requests");
    let s = h.status().await;
    assert_eq!(s["upstream"]["healthy"], false, "{s}");
    assert!(s["upstream"]["opened_total"].as_u64().unwrap() >= 1);
    // Answered by the breaker: sent nowhere, so charged to no budget.
    let left = |s: &serde_json::Value| {
        s["pools"][0]["remaining"]["requests"]["minute_remaining"]
            .as_u64()
            .unwrap()
    };
    let (before, calls) = (left(&s), h.fake.calls());
    for _ in 0..20 {
        let resp = post(&h.url, &image()).await;
        assert_eq!(json(resp).await["error"]["code"], "penstock_upstream_down");
    }
    // Probes are charged (they went); the rest is not.
    let probes = (h.fake.calls() - calls) as u64;
    assert_eq!(left(&h.status().await), before - probes, "nothing charged");
    let during = h.fake.calls();

    // The upstream is back: after the cool-down one probe goes, and then all.
    h.fake.set_behaviour(|b| b.fail_every = None);
    let mut tries = 0;
    loop {
        tries += 1;
        assert!(tries < 500, "the breaker never closed");
        let resp = post(&h.url, &image()).await;
        if resp.status() == 200 {
            break;
        }
        assert_eq!(json(resp).await["error"]["code"], "penstock_upstream_down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.fake.calls(), during + 1, "one probe, and it was answered");
    assert_eq!(h.status().await["upstream"]["healthy"], true);
}

#[tokio::test]
async fn insufficient_quota_costs_one_call_then_answers_at_once_for_the_cool_down() {
    let h = start_with(
        Behaviour {
            insufficient_quota: true,
            ..Behaviour::default()
        },
        |c| {
            c.budgets = vec![BudgetConfig {
                name: None,
                models: vec!["gpt-image-*".into()],
                rpm: Some(60),
                tpm: None,
                ipm: None,
                burst: Duration::from_secs(1),
                safety_margin: Duration::from_millis(50),
                max_in_flight: None,
                shared: false,
                upstream: None,
            }];
        },
        |_| None,
    )
    .await;
    // Three at once: one goes, two wait for the next one-per-second slot.
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let url = h.url.clone();
            tokio::spawn(async move { post(&url, &image()).await })
        })
        .collect();
    for t in tasks {
        let resp = t.await.unwrap();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["x-should-retry"], "false");
        let v = json(resp).await;
        assert_eq!(v["error"]["code"], "insufficient_quota");
    }
    // The queued ones were answered with it, never sent (their slots would
    // have come a second apart).
    assert_eq!(h.fake.calls(), 1, "the queued ones were never sent");
    // New requests during the cool-down: answered by penstock, the same error.
    let resp = post(&h.url, &image()).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["x-penstock-circuit"], "open");
    assert_eq!(json(resp).await["error"]["type"], "insufficient_quota");
    assert_eq!(h.fake.calls(), 1, "one upstream call in all");
}

#[tokio::test]
async fn a_stream_that_fails_after_its_first_byte_is_not_retried() {
    let h = start(Behaviour {
        cut_stream_after: Some(1),
        ..Behaviour::default()
    })
    .await;
    let resp = post(
        &h.url,
        &json!({"model": "gpt-image-1", "prompt": "p", "stream": true, "partial_images": 2}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-penstock-attempts"], "1");
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("partial_image"));
    let mut failed = false;
    while let Some(chunk) = body.next().await {
        failed |= chunk.is_err();
    }
    assert!(failed, "the client sees the cut");
    assert_eq!(
        h.fake.calls(),
        1,
        "bytes had reached the client: never retried"
    );
}

#[tokio::test]
async fn client_errors_pass_through_once_and_unchanged() {
    let h = start(Behaviour::default()).await;
    let resp = http()
        .post(format!("{}/v1/no/such/thing", h.url))
        .json(&json!({"x": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-penstock-attempts"], "1");
    assert_eq!(resp.headers()["x-should-retry"], "false");
    assert_eq!(h.fake.calls(), 1);
}
