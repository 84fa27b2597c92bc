//! Priority classes: interactive waiters go before batch ones in a pool;
//! a request chooses with `x-penstock-priority` unless its `[[client]]`
//! forbids it; async jobs wait as batch.

use std::time::Duration;

use penstock::config::{BudgetConfig, ClientConfig};
use penstock::vocab::cost::Priority;
use serde_json::{Value, json};

use crate::support::*;

fn one_a(rpm: u64) -> BudgetConfig {
    BudgetConfig {
        name: Some("images".into()),
        models: vec!["gpt-image-*".into()],
        rpm: Some(rpm),
        // One pool for every key: the clients wait in one queue.
        shared: true,
        ..BudgetConfig::default()
    }
}

async fn generate(
    url: &str,
    key: &str,
    prompt: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = http()
        .post(format!("{url}/v1/images/generations"))
        .header("authorization", format!("Bearer {key}"))
        .header("cache-control", "no-store")
        .json(&json!({"model": "gpt-image-1", "prompt": prompt, "quality": "low", "size": "1024x1024"}));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn until(h: &Harness, what: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..3000 {
        let s = h.status().await;
        if s["pools"].as_array().unwrap().iter().any(&what) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never seen: {}", h.status().await);
}

#[tokio::test]
async fn an_interactive_request_goes_before_batch_requests_that_waited_longer() {
    let h = start_with(
        Behaviour {
            record_bodies: true,
            ..Behaviour::default()
        },
        |c| c.budgets = vec![one_a(60)],
        |_| None,
    )
    .await;
    assert_eq!(generate(&h.url, "sk-0", "first", &[]).await.status(), 200);
    let mut waiting = Vec::new();
    for i in 1..=3 {
        let url = h.url.clone();
        waiting.push(tokio::spawn(async move {
            generate(
                &url,
                &format!("sk-{i}"),
                &format!("batch {i}"),
                &[("x-penstock-priority", "batch")],
            )
            .await
        }));
    }
    until(&h, |p| p["queue_batch"] == 3).await;
    let now = generate(&h.url, "sk-9", "interactive", &[]).await;
    assert_eq!(now.status(), 200);
    for w in waiting {
        assert_eq!(w.await.unwrap().status(), 200);
    }
    let mut calls = h.fake.requests();
    calls.sort_by_key(|r| r.answered_at);
    let prompts: Vec<String> = calls
        .iter()
        .map(|r| {
            serde_json::from_slice::<Value>(&r.body).unwrap()["prompt"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(prompts[..2], ["first", "interactive"], "{prompts:?}");
}

#[tokio::test]
async fn jobs_wait_as_batch_and_a_client_may_be_kept_from_choosing() {
    let forbidden = penstock::edge::key_id_of(b"Bearer sk-batchy");
    let h = start_with(
        Behaviour::default(),
        |c| {
            c.budgets = vec![one_a(1)];
            c.queue.max_wait = Duration::from_secs(600);
            c.clients = vec![ClientConfig {
                id: forbidden.clone(),
                priority: Some(Priority::Batch),
                priority_header: false,
                ..ClientConfig::default()
            }];
        },
        |_| None,
    )
    .await;
    assert_eq!(generate(&h.url, "sk-0", "first", &[]).await.status(), 200);
    let spawn =
        |key: &'static str, prompt: &'static str, headers: Vec<(&'static str, &'static str)>| {
            let url = h.url.clone();
            tokio::spawn(async move { generate(&url, key, prompt, &headers).await })
        };
    // An async job: accepted at once, then waits as batch.
    let job = generate(&h.url, "sk-job", "a job", &[("prefer", "respond-async")]).await;
    assert_eq!(job.status(), 202);
    // Asks for interactive, but its client is batch and may not choose.
    let _a = spawn(
        "sk-batchy",
        "batchy",
        vec![("x-penstock-priority", "interactive")],
    );
    // Asks for batch itself.
    let _b = spawn(
        "sk-polite",
        "polite",
        vec![("x-penstock-priority", "batch")],
    );
    // Asks for nothing: interactive.
    let _c = spawn("sk-plain", "plain", vec![]);
    let s = until(&h, |p| p["queue_depth"] == 4).await;
    let pool = s["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "images")
        .unwrap();
    assert_eq!(pool["queue_batch"], 3, "{pool}");
}
